"""The production path on CPU: `grail-megatron train` (no --local) runs verl's own trainer.

Everything here is the real thing: the CLI in a subprocess, Ray, verl's TaskRunnerV1 and
`PPOTrainerSync.fit()` through our trainer mode, verl's Megatron engine on 2 gloo ranks, the HF
rollout with verl's weight sync, GRAIL's reward through `reward.custom_reward_function`.
Runs are shared through fixtures (a run is ~2 minutes on 2 cores); each test reads what one run
wrote (console metrics, checkpoints).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "grail_megatron.cli"]
TP = 2
VOCAB = 296  # the tokenizer's 293 rows padded so that TP divides it (verl's engine does not pad)
STEP_LINE = re.compile(r"step:(\d+) - (.*)$")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def run_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="0", TENSORBOARD_DIR=str(tmp / "tensorboard"),
               HOME=str(tmp / "home"),
               # Ray's socket paths must stay under 107 bytes: pytest's tmp paths are too long
               RAY_TMPDIR=tempfile.mkdtemp(prefix="gm-ray-", dir="/tmp"))
    (tmp / "home").mkdir(parents=True, exist_ok=True)
    return env


def parse_metrics(text: str) -> dict[int, dict[str, float]]:
    """verl's console logger: `step:N - key:value - key:value ...` (values may be np.float64(x))."""
    steps: dict[int, dict[str, float]] = {}
    for line in text.splitlines():
        match = STEP_LINE.search(line)
        if not match:
            continue
        metrics = steps.setdefault(int(match.group(1)), {})
        for item in match.group(2).split(" - "):
            key, _, value = item.partition(":")
            number = NUMBER.search(value.replace("np.float64", "").replace("np.int64", "").replace("np.int32", ""))
            if key and number:
                metrics[key.strip()] = float(number.group(0))
    return steps


@dataclass
class Run:
    out: Path
    returncode: int
    log: str
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)

    def check(self) -> "Run":
        assert self.returncode == 0, f"train exited {self.returncode}:\n{self.log[-6000:]}"
        return self


def train(tmp: Path, overrides: list[str], timeout: int = 900) -> Run:
    """`grail-megatron train <overrides>` as a user runs it; console output kept in tmp/train.log."""
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [*CLI, "train", *overrides, f"trainer.default_local_dir={tmp / 'ckpt'}"]
    proc = subprocess.run(cmd, cwd=tmp, env=run_env(tmp), capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    (tmp / "train.log").write_text(log)
    return Run(tmp / "ckpt", proc.returncode, log, parse_metrics(log))


def base_overrides(sums, *extra: str) -> list[str]:
    """The issue's CPU command (tiny preset, cpu cluster, model and data) plus a small batch."""
    return ["model_preset=tiny", "cluster=cpu", f"actor_rollout_ref.model.path={sums.model_dir}",
            f"data.train_files=[{sums.train_file}]", f"data.val_files=[{sums.val_file}]",
            "data.train_batch_size=4", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16", "data.max_prompt_length=32",
            "data.max_response_length=20", "actor_rollout_ref.rollout.temperature=1.0",
            "actor_rollout_ref.actor.optim.lr=1e-3", "trainer.val_before_train=false",
            "trainer.logger=[console,tensorboard]", *extra]


def dist_ckpt_overrides(mcore_init: Path) -> list[str]:
    return ["actor_rollout_ref.actor.megatron.use_dist_checkpointing=true",
            f"actor_rollout_ref.actor.megatron.dist_checkpointing_path={mcore_init}"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- the shared TP2 run
TP2_STEPS = 3
TP2_SAVE_FREQ = 2
# Deterministic rollouts (the HF server's seeds derive from step, prompt and occurrence, and each
# request runs alone): a resumed or rerun process samples what the uninterrupted one sampled.
DETERMINISTIC = "actor_rollout_ref.rollout.full_determinism=true"


def tp2_overrides(sums, mcore_init: Path, *extra: str) -> list[str]:
    """The config of the shared `tp2_run` (conftest.py); `extra` overrides come last and win."""
    return base_overrides(sums, *dist_ckpt_overrides(mcore_init), DETERMINISTIC,
                          f"trainer.total_training_steps={TP2_STEPS}", f"trainer.save_freq={TP2_SAVE_FREQ}",
                          f"trainer.test_freq={TP2_STEPS}", *extra)


# --------------------------------------------------------------------------- a run in the background
@dataclass
class Started:
    """`grail-megatron train` running as a subprocess; console output streams to tmp/train.log."""

    tmp: Path
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)

    @property
    def log_path(self) -> Path:
        return self.tmp / "train.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, pattern: str, timeout: float) -> None:
        """Poll the console until `pattern` (a regex) shows; fail if the run ends or time runs out."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while not regex.search(self.log()):
            if self.proc.poll() is not None:
                raise AssertionError(f"train exited {self.proc.returncode} before {pattern!r}:\n{self.log()[-6000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.log()[-6000:]}")
            time.sleep(0.2)

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)  # the CLI process itself (no shell in between)

    def finish(self, timeout: float) -> Run:
        try:
            self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        log = self.log()
        return Run(self.tmp / "ckpt", self.proc.returncode, log, parse_metrics(log))

    def stop(self) -> None:
        """Our own process only, by its id (its Ray cluster goes down with the driver)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_train(tmp: Path, overrides: list[str]) -> Started:
    """`train` as a subprocess that a test can signal, with the same command line as `train`."""
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [*CLI, "train", *overrides, f"trainer.default_local_dir={tmp / 'ckpt'}"]
    with open(tmp / "train.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, env=run_env(tmp), stdout=out, stderr=subprocess.STDOUT, text=True)
    return Started(tmp, proc)


def latest_step(ckpt: Path) -> int:
    """verl's own pointer to the newest complete checkpoint."""
    return int((ckpt / "latest_checkpointed_iteration.txt").read_text().strip())
