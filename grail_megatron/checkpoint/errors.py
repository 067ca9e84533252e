"""Exceptions of the checkpoint package (no heavy imports, safe to import anywhere)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible.

    The message always names the offending path (and file or key when known).
    """


class IncompleteCheckpointError(CheckpointError):
    """A step directory lacks its completion marker or a listed file is missing/truncated."""


class UnsupportedModelError(CheckpointError):
    """The model architecture is not one the converter handles."""
