"""GRAIL's rewards for GSM8K, Hendrycks MATH and MBPP: exact, bounded in time, sandboxed.

``compute_score`` returns ``{"score": float, <components>...}``; verl should use the flat
schema of ``grail_megatron.rewards.verl_reward``. See docs/rewards.md.

Names are imported lazily so that a sandboxed child importing one submodule does not pay
for the whole package.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "compute_score": "grail_megatron.rewards.api",
    "compute_score_batch": "grail_megatron.rewards.api",
    "route_of": "grail_megatron.rewards.api",
    "SandboxPool": "grail_megatron.rewards.sandbox",
    "SandboxUnavailable": "grail_megatron.rewards.sandbox",
    "check_sandbox": "grail_megatron.rewards.sandbox",
    "SandboxConfig": "grail_megatron.rewards.sandbox_config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'grail_megatron.rewards' has no attribute {name!r}")
