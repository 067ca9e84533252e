"""Where things live in a checkpoint: verl 0.9.1's Megatron layout (schema v2) plus our marker.

    <root>/latest_checkpointed_iteration.txt      tracker: the newest step (verl's file)
    <root>/global_step_<N>/
        grail_checkpoint.json                     our completion marker: file list + sizes (+ sha256)
        trainer_state.json                        the converter's: step, layout, free-form state
        data.pt                                   dataloader state_dict (verl writes it here too)
        actor/
            ckpt_contents.json                    verl's manifest (schema_version 2)
            transformer_config.json               mcore TransformerConfig as JSON (verl)
            model/dist_ckpt/                      megatron dist_checkpointing, torch_dist: "model" / "model<i>"
            model/huggingface/                    HF config.json, generation_config.json, tokenizer
            optimizer/dist_ckpt/                  verl's training steps only: "optimizer" (+ "lr_scheduler")
            extra/dist_ckpt/                      "rng_state" ShardedObject, (pp, tp) sharded, as verl

verl 0.9.1 refuses the older v1 layout (``actor/dist_ckpt``, ``actor/huggingface``) on resume;
the converter still *reads* v1 checkpoints. Nothing here imports torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MARKER_FILE = "grail_checkpoint.json"
TRAINER_STATE_FILE = "trainer_state.json"
DATALOADER_FILE = "data.pt"
VERL_MANIFEST_FILE = "ckpt_contents.json"
TRANSFORMER_CONFIG_FILE = "transformer_config.json"
STEP_DIR_RE = re.compile(r"^global_step_(\d+)$")
DIST_CKPT_METADATA = ".metadata"  # written by torch.distributed.checkpoint when a save completes
ROLE = "actor"


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"global_step_{int(step)}"


def temp_step_dir(root: str | os.PathLike, step: int) -> Path:
    """Where a step is written before its atomic rename (same filesystem as the final dir)."""
    return Path(root) / f".incomplete.global_step_{int(step)}"


def list_step_dirs(root: str | os.PathLike) -> dict[int, Path]:
    """{step: path} of every `global_step_<N>` directory under root (temp dirs excluded)."""
    root = Path(root)
    if not root.is_dir():
        return {}
    found = {}
    for entry in root.iterdir():
        match = STEP_DIR_RE.match(entry.name)
        if match and entry.is_dir():
            found[int(match.group(1))] = entry
    return found


@dataclass(frozen=True)
class ActorPaths:
    """Paths inside `global_step_<N>/actor` (verl v2 layout, or the legacy v1 one when reading)."""

    actor: Path
    model_dist: Path
    extra_dist: Path
    huggingface: Path

    @classmethod
    def v2(cls, actor_dir: str | os.PathLike) -> "ActorPaths":
        actor = Path(actor_dir)
        return cls(
            actor=actor,
            model_dist=actor / "model" / "dist_ckpt",
            extra_dist=actor / "extra" / "dist_ckpt",
            huggingface=actor / "model" / "huggingface",
        )

    @classmethod
    def detect(cls, actor_dir: str | os.PathLike) -> "ActorPaths":
        """v2 if present, else the legacy v1 layout (dist_ckpt/ and huggingface/ directly in actor/)."""
        paths = cls.v2(actor_dir)
        if paths.model_dist.is_dir() or paths.huggingface.is_dir():
            return paths
        actor = Path(actor_dir)
        if (actor / "dist_ckpt").is_dir():
            return cls(
                actor=actor,
                model_dist=actor / "dist_ckpt",
                extra_dist=actor / "dist_ckpt",
                huggingface=actor / "huggingface",
            )
        return paths


def model_dist_dir(root: str | os.PathLike, step: int) -> Path:
    """The model's dist checkpoint of a step: what verl's `dist_checkpointing_path` must name.

    verl 0.9.1 (`use_dist_checkpointing=true`) initialises the actor with
    `verl.utils.model.load_mcore_dist_weights(models, dist_checkpointing_path)`, i.e.
    `dist_checkpointing.load(model.sharded_state_dict(), path)`: the path is a plain
    torch_dist directory (`.metadata`, `*.distcp`, `common.pt`, `metadata.json`), not a step dir.
    """
    return ActorPaths.v2(step_dir(root, step) / ROLE).model_dist


def resolve_actor_dir(path: str | os.PathLike) -> Path:
    """Accept `.../global_step_N/actor`, `.../global_step_N`, or a checkpoint root (-> latest)."""
    path = Path(path)
    if (path / ROLE).is_dir():
        return path / ROLE
    return path


def read_tracker(root: str | os.PathLike) -> int | None:
    """Step recorded in the tracker file, or None when absent or unreadable."""
    tracker = Path(root) / TRACKER_FILE
    try:
        return int(tracker.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
