"""Checkpoints in verl's Megatron layout, and conversion to/from Hugging Face.

Public API (imported lazily so `import grail_megatron.checkpoint` stays cheap):
    save_checkpoint(root, step, models, optimizer, ...)   collective, atomic
    load_checkpoint(root, models, optimizer, ...)         collective, newest complete step
    latest_complete_step(root) -> int | None
    verify_step(step_dir)                                 raises CheckpointError
    CheckpointError, IncompleteCheckpointError, UnsupportedModelError
See docs/checkpoint.md.
"""

from __future__ import annotations

from .errors import CheckpointError, IncompleteCheckpointError, UnsupportedModelError
from .manifest import latest_complete_step, verify_step

_LAZY = {
    "save_checkpoint": "store",
    "load_checkpoint": "store",
    "LoadedCheckpoint": "store",
}

__all__ = [
    "CheckpointError",
    "IncompleteCheckpointError",
    "UnsupportedModelError",
    "latest_complete_step",
    "verify_step",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
