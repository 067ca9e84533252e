"""`grail-megatron train --local`: compose the config, then run the loop under torchrun.

The launcher is the process SLURM (or a user) signals. It starts torchrun in its own session
with TP x PP ranks (gloo on CPU, one OpenMP thread each) and turns SIGUSR1/SIGTERM into a stop
file the ranks watch (torchrun's agent would kill its workers on SIGTERM before they could
checkpoint). When the ranks report that they stopped for a preemption, it exits with 75.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from grail_megatron.local.preemption import EXIT_PREEMPTED, PREEMPT_SIGNALS, STATUS_FILE_ENV, STOP_FILE_ENV

CONFIG_FILE_NAME = "local_config.yaml"


def torchrun_command(world_size: int, config_path: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone",  # rendezvous on a free local port: several runs can share a machine
        "--nproc-per-node", str(world_size),
        "--max-restarts", "0",
        "-m", "grail_megatron.local.worker", "--config", str(config_path),
    ]


def write_config(cfg, run_dir: Path) -> Path:
    """The composed config, saved next to the checkpoints (atomically) for the ranks to read."""
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG_FILE_NAME}-", dir=run_dir)
    os.close(fd)
    OmegaConf.save(cfg, tmp)
    os.replace(tmp, path)
    return path


def run_torchrun(world_size: int, config_path: Path, env: dict | None = None) -> int:
    """Run the ranks; forward preemption as a stop file and Ctrl-C as SIGINT. Returns the exit code."""
    control = Path(tempfile.mkdtemp(prefix="grail-local-"))
    stop_file, status_file = control / "stop", control / "status.json"
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("OMP_NUM_THREADS", "1")  # several ranks share the cores
    child_env[STOP_FILE_ENV] = str(stop_file)
    child_env[STATUS_FILE_ENV] = str(status_file)
    proc = subprocess.Popen(torchrun_command(world_size, config_path), env=child_env, start_new_session=True)

    def request_stop(signum, frame):
        print(f"[grail-megatron] signal {signal.Signals(signum).name}: finishing the step, then checkpoint "
              f"and exit {EXIT_PREEMPTED}", file=sys.stderr, flush=True)
        stop_file.touch()

    def interrupt(signum, frame):
        proc.send_signal(signal.SIGINT)

    previous = {sig: signal.signal(sig, request_stop) for sig in PREEMPT_SIGNALS}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    for item in control.iterdir():
        item.unlink()
    control.rmdir()
    if status.get("preempted"):
        return EXIT_PREEMPTED
    return code


def main(overrides: Sequence[str] = (), config_name: str = "grpo_grail", cfg=None) -> int:
    """Entry point of `grail-megatron train --local [overrides]`.

    `cfg` may be an already composed config (train_cli composes and validates it first);
    otherwise it is composed here from `overrides` with `grail_megatron.config.compose`.
    """
    from grail_megatron.local.settings import LocalSettings

    if cfg is None:
        from grail_megatron.config import compose

        cfg = compose(list(overrides), config_name=config_name)
    settings = LocalSettings.from_config(cfg)  # fail here, before any rank starts
    config_path = write_config(cfg, Path(settings.trainer.default_local_dir))
    print(f"[grail-megatron] local GRPO: {settings.world_size} rank(s) (TP={settings.actor.tensor_model_parallel_size}, "
          f"PP={settings.actor.pipeline_model_parallel_size}), checkpoints in {settings.trainer.default_local_dir}",
          flush=True)
    return run_torchrun(settings.world_size, config_path)
