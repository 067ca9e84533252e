"""Wiring of the loop to the other areas: verl's engines, checkpoints, validation.

Each function is a thin call into the owning module (`local.policy` for verl's workers,
`grail_megatron.checkpoint` for the step directories, `grail_megatron.eval`) so the loop
itself reads as the algorithm.

Checkpoints are the verl path's: `<root>/global_step_<k>/actor` written by verl's checkpoint
manager, plus verl's tracker file. A step is written under a temporary name, completed with our
marker (file list and sizes) and renamed, so a save cut short never looks like a checkpoint;
both paths resume from each other's steps (docs/local.md).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch.distributed as dist

from grail_megatron.local.settings import LocalSettings

logger = logging.getLogger(__name__)


def build(s: LocalSettings, cfg):
    """verl's actor (and, with the KL loss, reference) workers of this rank."""
    from grail_megatron.local.policy import LocalPolicy

    return LocalPolicy(cfg, s.trainer.total_training_steps)


def sync_rollout_weights(policy, rollout) -> None:
    """Actor -> rollout model through verl's engine export (collective; rank 0 loads the tensors)."""
    for name, tensor in policy.export_weights():
        if rollout is not None:
            rollout.load_weights([(name, tensor)])


def resume(root: str, policy) -> int:
    """Load the newest step that verifies (ours or the verl path's); 0 when there is none.

    A step that fails verification (partial or truncated save) is refused with the reason and
    the next older one is tried, so one bad save never blocks a restart.
    """
    from grail_megatron.checkpoint import CheckpointError, verify_step
    from grail_megatron.checkpoint.layout import ROLE, list_step_dirs

    choice = [None]
    if dist.get_rank() == 0:
        for step, path in sorted(list_step_dirs(root).items(), reverse=True):
            try:
                verify_step(path)
            except CheckpointError as exc:
                _say(f"refusing checkpoint step {step}: {exc}; trying an older one")
                continue
            choice = [(step, str(path))]
            break
        else:
            if list_step_dirs(root):
                _say(f"no usable checkpoint under {root}: starting from the HF weights")
    dist.broadcast_object_list(choice, src=0)  # every rank loads the same step
    if choice[0] is None:
        return 0
    step, path = choice[0]
    policy.load_checkpoint(str(Path(path) / ROLE))
    _say(f"resumed from {path} (step {step})")
    return step


def save(s: LocalSettings, policy, step: int, sampler) -> Path:
    """verl's checkpoint of `step` (+ verl's dataloader state, data.pt), written aside and renamed
    into place once complete (collective)."""
    import torch

    from grail_megatron.checkpoint.fsutil import atomic_write_text, fsync_tree, replace_dir
    from grail_megatron.checkpoint.layout import DATALOADER_FILE, ROLE, TRACKER_FILE, step_dir, temp_step_dir
    from grail_megatron.checkpoint.manifest import write_marker

    root = Path(s.trainer.default_local_dir)
    tmp, final = temp_step_dir(root, step), step_dir(root, step)
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this step that was cut short
    dist.barrier()
    policy.save_checkpoint(str(tmp / ROLE), step)
    dist.barrier()
    if dist.get_rank() == 0:
        torch.save(sampler.dataloader_state(step), tmp / DATALOADER_FILE)
        fsync_tree(tmp)
        write_marker(tmp, step, info={"writer": "grail-megatron train --local", "layout": _layout()})
        replace_dir(tmp, final)
        atomic_write_text(root / TRACKER_FILE, str(int(step)))
    dist.barrier()
    return final


def _layout() -> dict:
    from megatron.core import parallel_state as mpu

    return {"tp": mpu.get_tensor_model_parallel_world_size(), "pp": mpu.get_pipeline_model_parallel_world_size(),
            "dp": mpu.get_data_parallel_world_size(),
            "vpp": mpu.get_virtual_pipeline_model_parallel_world_size() or 1}


def validator(s: LocalSettings, rollout):
    """`() -> {"val/...": ...}` via grail_megatron.eval on the rollout model (rank 0; {} elsewhere)."""
    if rollout is None or not s.data.val_files:
        return dict
    import pyarrow.parquet as pq

    from grail_megatron.eval.validation import evaluate

    rows = [row for path in s.data.val_files for row in pq.read_table(path).to_pylist()]
    if s.data.val_max_samples > 0:
        rows = rows[: s.data.val_max_samples]

    def run() -> dict[str, float]:
        return evaluate(rollout.generate_texts, rows, samples=s.validation.n, ks=[1], seed=s.actor.seed,
                        batch_size=len(rows))

    return run


def _say(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"[grail-megatron] {message}", flush=True)
    logger.info(message)
