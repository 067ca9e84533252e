"""Completion marker of a checkpoint step and the search for the newest complete step.

The marker (`global_step_<N>/grail_checkpoint.json`) is written last, inside the temp directory,
right before the atomic rename. It lists every file of the step with its size (and optionally its
SHA-256), so a step that was copied partially, truncated, or had a shard deleted is detected
without reading the tensors. Steps written by verl itself (no marker) are accepted on a weaker
check: verl's `ckpt_contents.json` (written last by verl) plus the dist_checkpointing metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from .errors import CheckpointError, IncompleteCheckpointError
from .fsutil import atomic_write_json
from .layout import (
    DIST_CKPT_METADATA,
    MARKER_FILE,
    ROLE,
    TRACKER_FILE,
    VERL_MANIFEST_FILE,
    ActorPaths,
    list_step_dirs,
    read_tracker,
    step_dir,
)

logger = logging.getLogger(__name__)

MARKER_FORMAT = "grail-megatron-checkpoint"
MARKER_VERSION = 1
_HASH_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _walk_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MARKER_FILE)


def write_marker(directory: str | os.PathLike, step: int, *, checksums: bool = False, info: dict | None = None) -> dict:
    """List every file under `directory` (sizes, optional sha256) into the completion marker."""
    directory = Path(directory)
    files = {}
    for path in _walk_files(directory):
        entry = {"size": path.stat().st_size}
        if checksums:
            entry["sha256"] = sha256_file(path)
        files[path.relative_to(directory).as_posix()] = entry
    marker = {
        "format": MARKER_FORMAT,
        "version": MARKER_VERSION,
        "step": int(step),
        "created_unix": time.time(),
        "checksums": bool(checksums),
        "files": files,
        **({"info": info} if info else {}),
    }
    atomic_write_json(directory / MARKER_FILE, marker)
    return marker


def read_marker(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MARKER_FILE
    try:
        marker = json.loads(path.read_text())
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"{directory}: no completion marker {MARKER_FILE} (partial or interrupted save)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: completion marker is not valid JSON ({exc})") from None
    if marker.get("format") != MARKER_FORMAT or "files" not in marker:
        raise CheckpointError(f"{path}: not a grail-megatron completion marker")
    return marker


def verify_step(directory: str | os.PathLike, *, deep: bool = False) -> str:
    """Raise CheckpointError unless the step directory is complete. Returns how it was verified.

    deep=True also re-hashes files when the marker has checksums.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise IncompleteCheckpointError(f"{directory}: checkpoint step directory does not exist")
    if not (directory / MARKER_FILE).exists() and (directory / ROLE / VERL_MANIFEST_FILE).exists():
        _verify_verl_step(directory)
        return "verl-manifest"
    marker = read_marker(directory)
    expected_step = directory.name.removeprefix("global_step_")
    if expected_step.isdigit() and int(expected_step) != marker["step"]:
        raise CheckpointError(f"{directory}: marker says step {marker['step']} but the directory is {directory.name}")
    for rel, entry in marker["files"].items():
        path = directory / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise IncompleteCheckpointError(f"{directory}: file {rel} listed in {MARKER_FILE} is missing") from None
        if size != entry["size"]:
            raise IncompleteCheckpointError(
                f"{directory}: file {rel} has {size} bytes, {MARKER_FILE} records {entry['size']} (truncated or rewritten)"
            )
        if deep and "sha256" in entry and sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{directory}: file {rel} does not match its recorded sha256 (corrupt)")
    return "marker+sha256" if deep and marker.get("checksums") else "marker"


def _verify_verl_step(directory: Path) -> None:
    """Weaker check for a step saved by verl's trainer: its manifest plus dist-ckpt metadata."""
    manifest_path = directory / ROLE / VERL_MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path}: not valid JSON ({exc})") from None
    for name, content in manifest.get("contents", {}).items():
        if content.get("format") == "megatron_dist_checkpoint":
            meta = directory / ROLE / content["path"] / DIST_CKPT_METADATA
            if not meta.exists():
                raise IncompleteCheckpointError(f"{directory}: {name} dist checkpoint lacks {meta.name} ({meta.parent})")
    paths = ActorPaths.v2(directory / ROLE)
    if not paths.model_dist.is_dir() and not paths.huggingface.is_dir():
        raise IncompleteCheckpointError(f"{directory}: verl manifest present but no model weights")


def latest_complete_step(root: str | os.PathLike, *, deep: bool = False) -> int | None:
    """Newest step under `root` that verifies as complete, or None if there is none.

    A step that fails verification (including the one the tracker names) is skipped with a
    warning that says why, and the next older complete step is used.
    """
    steps = list_step_dirs(root)
    tracker = read_tracker(root)
    if tracker is not None and tracker not in steps:
        logger.warning("%s: tracker names step %d but %s does not exist", root, tracker, step_dir(root, tracker))
    for step in sorted(steps, reverse=True):
        try:
            verify_step(steps[step], deep=deep)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint step %d: %s", step, exc)
            continue
        if tracker is not None and step != tracker:
            logger.warning("%s: using step %d (tracker says %d)", root, step, tracker)
        return step
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint root resolves to its newest complete step; step and actor dirs stay as given."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if (path / TRACKER_FILE).exists() or list_step_dirs(path):
        step = latest_complete_step(path)
        if step is None:
            raise CheckpointError(f"{path}: no complete checkpoint step found")
        return step_dir(path, step)
    return path
