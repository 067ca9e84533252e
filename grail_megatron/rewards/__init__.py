"""GRAIL's rewards for GSM8K, Hendrycks MATH and MBPP: exact, bounded in time, sandboxed.

``compute_score`` is verl's ``reward.custom_reward_function`` (keyword call); it returns
``{"score": float, <components>...}``. See docs/rewards.md.
"""
from grail_megatron.rewards.api import compute_score, compute_score_batch, route_of
from grail_megatron.rewards.sandbox import SandboxPool, SandboxUnavailable
from grail_megatron.rewards.sandbox_config import SandboxConfig

__all__ = [
    "SandboxConfig",
    "SandboxPool",
    "SandboxUnavailable",
    "compute_score",
    "compute_score_batch",
    "route_of",
]
