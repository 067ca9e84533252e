"""Preemption for the verl path: SIGUSR1/SIGTERM -> checkpoint at the end of the step -> exit 75.

The same protocol as the local loop (docs/local.md) and the SLURM launcher (docs/slurm.md).
verl's trainer runs in a Ray actor (TaskRunnerV1), possibly on another node than the
`grail-megatron train` driver that receives SLURM's signal, so the driver only drops a request
file into `trainer.default_local_dir` (the checkpoint directory, shared by every node); the
trainer checks it after each step, saves a checkpoint unless the step just saved one, and
stops. The driver then exits with EXIT_PREEMPTED and the launcher requeues the job, which
resumes from that checkpoint through verl's own `resume_mode=auto`.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

EXIT_PREEMPTED = 75
REQUEST_NAME = ".grail_preempt_requested"


class PreemptedAfterCheckpoint(RuntimeError):
    """Raised inside the trainer to stop verl's fit loop once the checkpoint is written."""


def request_path(cfg: Any) -> Path:
    return Path(str(cfg.trainer.default_local_dir)) / REQUEST_NAME


def install_request_handlers(path: Path) -> None:
    """In the driver: turn SIGUSR1/SIGTERM into the request file (cheap, signal-safe enough)."""

    def _request(signum, _frame):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{signal.Signals(signum).name}\n")

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _request)


def step_saved_checkpoint(global_steps: int, save_freq: int, total_training_steps: int) -> bool:
    """verl's own rule (PPOTrainer.fit) for whether this step already saved a checkpoint."""
    return save_freq > 0 and (global_steps >= total_training_steps or global_steps % save_freq == 0)


class CheckpointOnPreemption:
    """Mixin for a verl v1 trainer: honour a preemption request at the end of each step.

    The checkpoint is written in `on_step_end`; the stop comes at the next `on_step_begin`,
    after verl's fit loop has validated (if due) and logged the step, so the preempted step's
    metrics reach the loggers like every other step's. After the last step verl's loop ends by
    itself (the driver still exits 75: a requeued run resumes at the end and stops at once)."""

    _grail_preempted_after: int | None = None

    def on_step_end(self) -> None:
        super().on_step_end()  # type: ignore[misc]
        path = request_path(self.config)  # type: ignore[attr-defined]
        if not path.exists() or self._grail_preempted_after is not None:
            return
        trainer_cfg = self.config.trainer  # type: ignore[attr-defined]
        step = int(self.global_steps)  # type: ignore[attr-defined]
        if not step_saved_checkpoint(step, int(trainer_cfg.save_freq), int(self.total_training_steps)):  # type: ignore[attr-defined]
            self._save_checkpoint()  # type: ignore[attr-defined]
        self._grail_preempted_after = step

    def on_step_begin(self) -> None:
        if self._grail_preempted_after is not None:
            raise PreemptedAfterCheckpoint(
                f"preempted after step {self._grail_preempted_after}: checkpoint saved, exiting {EXIT_PREEMPTED}")
        super().on_step_begin()  # type: ignore[misc]
