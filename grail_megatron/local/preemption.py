"""The preemption protocol: SIGUSR1/SIGTERM -> finish the step, checkpoint, exit 75.

A signal only sets a flag (or, in the launcher, touches a stop file that the ranks watch,
because torchrun's agent would otherwise kill its workers on SIGTERM). At the end of every
step all ranks agree on the flag with one all-reduce, so they checkpoint and stop together.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; SLURM requeue scripts key on it
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STOP_FILE_ENV = "GRAIL_LOCAL_STOP_FILE"
STATUS_FILE_ENV = "GRAIL_LOCAL_STATUS_FILE"  # rank 0 reports {"preempted": true, "step": N} here


class PreemptionWatcher:
    """Records a preemption signal or the launcher's stop file; `should_stop` is collective."""

    def __init__(self, stop_file: str | None = None):
        self.stop_file = Path(stop_file) if stop_file else None
        self.signalled: int | None = None
        self._previous = {}
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = signum

    def requested(self) -> bool:
        return self.signalled is not None or (self.stop_file is not None and self.stop_file.exists())

    def should_stop(self) -> bool:
        """True on every rank if any rank saw a request (one all-reduce of a flag)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.requested() else 0], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def stop_file_from_env() -> str | None:
    return os.environ.get(STOP_FILE_ENV) or None
