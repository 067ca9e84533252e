"""Checkpoints in verl's Megatron layout: the converter's, step verification, conversion to/from HF.

Training checkpoints are written and loaded by verl's own checkpoint manager (verl path and
`train --local`); this package writes the converter's checkpoints (`convert from-hf` /
`reshard`: weights, no optimizer state), verifies steps and converts to Hugging Face.

Public API (imported lazily so `import grail_megatron.checkpoint` stays cheap):
    save_checkpoint(root, step, models, ...)              collective, atomic (the converter's writer)
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
