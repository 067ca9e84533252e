"""Preemption on the verl path: signal -> request file -> checkpoint after the step -> exit 75.

Units at the trainer's step boundary: verl's real `PPOTrainerSync.on_step_end` runs, with the
checkpoint manager (weight sync) and `_save_checkpoint` (Megatron engines) replaced by
recorders. The whole protocol runs for real in tests/verl_path/test_verl_resume.py.
"""

from __future__ import annotations

import os
import signal

import pytest

from grail_megatron.config import compose
from grail_megatron.workers.preemption import (
    EXIT_PREEMPTED,
    PreemptedAfterCheckpoint,
    install_request_handlers,
    request_path,
    step_saved_checkpoint,
)


class _Recorder:
    def __init__(self):
        self.calls = []

    def update_weights(self, step):
        self.calls.append(("update_weights", step))


@pytest.fixture()
def trainer(tmp_path):
    from grail_megatron.workers import register

    cls = register()
    t = object.__new__(cls)
    t.config = compose([f"trainer.default_local_dir={tmp_path}", "trainer.save_freq=50"])
    t.total_training_steps = 400
    t.timing_raw = {}
    t.checkpoint_manager = _Recorder()
    t.saved = []
    t._save_checkpoint = lambda: t.saved.append(t.global_steps)
    return t


@pytest.mark.parametrize("step,expected", [(7, False), (50, True), (400, True), (401, True), (49, False)])
def test_verls_save_rule(step, expected):
    assert step_saved_checkpoint(step, save_freq=50, total_training_steps=400) is expected


def test_without_a_request_the_step_ends_as_in_verl(trainer):
    trainer.global_steps = 7
    trainer.on_step_end()
    assert trainer.checkpoint_manager.calls == [("update_weights", 7)]
    assert trainer.saved == []


def test_a_request_saves_at_the_step_end_and_stops_before_the_next_step(trainer):
    """verl logs a step after on_step_end: the stop waits for the next on_step_begin, so the
    preempted step's metrics are logged like every other step's."""
    trainer.global_steps = 7
    request_path(trainer.config).write_text("SIGUSR1\n")
    trainer.on_step_end()  # checkpoint now; verl's loop goes on to validate and log step 7
    assert trainer.saved == [7]
    assert trainer.checkpoint_manager.calls == [("update_weights", 7)]
    trainer.global_steps = 8
    with pytest.raises(PreemptedAfterCheckpoint, match="after step 7"):
        trainer.on_step_begin()


def test_a_step_that_just_saved_is_not_saved_twice(trainer):
    trainer.global_steps = 50
    request_path(trainer.config).write_text("SIGUSR1\n")
    trainer.on_step_end()
    assert trainer.saved == []
    with pytest.raises(PreemptedAfterCheckpoint, match="after step 50"):
        trainer.on_step_begin()


def test_driver_turns_the_signal_into_a_request_and_exits_75(tmp_path, monkeypatch):
    import grail_megatron.workers as workers
    from grail_megatron.cli import train as train_cli

    cfg = compose([f"trainer.default_local_dir={tmp_path / 'ckpt'}"])
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}

    def verl_stopped_by_preemption(_cfg):
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning signal, delivered mid-run
        raise RuntimeError("ray.exceptions.RayTaskError(PreemptedAfterCheckpoint)")

    monkeypatch.setattr(workers, "run_verl", verl_stopped_by_preemption)
    try:
        assert train_cli.run_verl_until_done_or_preempted(cfg) == EXIT_PREEMPTED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert not request_path(cfg).exists()  # consumed: the requeued run starts clean


def test_driver_reraises_a_real_failure(tmp_path, monkeypatch):
    import grail_megatron.workers as workers
    from grail_megatron.cli import train as train_cli

    cfg = compose([f"trainer.default_local_dir={tmp_path}"])
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}

    def verl_crashes(_cfg):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(workers, "run_verl", verl_crashes)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            train_cli.run_verl_until_done_or_preempted(cfg)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_handlers_write_the_request_file(tmp_path):
    path = tmp_path / "run" / ".grail_preempt_requested"
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    try:
        install_request_handlers(path)
        os.kill(os.getpid(), signal.SIGTERM)
        assert path.read_text() == "SIGTERM\n"
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGUSR1, previous[1])
