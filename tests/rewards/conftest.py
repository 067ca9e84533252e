"""Shared fixtures for the rewards tests."""
from __future__ import annotations

import pytest

from grail_megatron.rewards import SandboxPool


@pytest.fixture(scope="session")
def sandbox_pool():
    """Two zygotes, as many as the CI machine has cores."""
    with SandboxPool(workers=2) as pool:
        yield pool
