"""Shared fixtures of the local-loop tests: a tiny sums model and data (built once per session)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sums_run(tmp_path_factory):
    """Tokenizer + random-init tiny Qwen2 + the recipe's warm start + sums parquet files."""
    from grail_megatron.local.recipes import prepare_sums_run

    return prepare_sums_run(tmp_path_factory.mktemp("sums"))
