"""Registration of the grail_megatron trainer mode with verl 0.9.1 (actor+rollout, separate ref).

Importing this package is cheap; `register()` (or `setup_worker_process()`, the Ray worker
setup hook named in configs/grail/grpo.yaml) imports verl and registers the mode. verl's
`TaskRunnerV1` looks the mode up in its Ray actor process, which is why the registration runs
there through `ray_kwargs.ray_init.runtime_env.worker_process_setup_hook`.
"""

from __future__ import annotations

TRAINER_MODE = "grail_megatron"


def register():
    """Register `trainer.v1.trainer_mode=grail_megatron` in this process; returns the trainer class."""
    from grail_megatron.workers.trainer import register as _register

    return _register()


def setup_worker_process() -> None:
    """Ray `worker_process_setup_hook`: runs in every Ray worker before any actor starts.

    A failure is logged, not raised: Ray would otherwise kill workers that never need the mode
    (reward workers, vLLM servers); the TaskRunner then fails with verl's "Unknown trainer
    'grail_megatron'" next to this log line.
    """
    import logging

    from grail_megatron.quiet import quiet_third_party

    quiet_third_party(summary=False)  # the expected TE/Apex/verl notices, in every Ray worker
    try:
        register()
    except Exception:  # noqa: BLE001 - see docstring
        logging.getLogger(__name__).exception("could not register verl trainer mode %r", TRAINER_MODE)


def export_runtime_env(cfg) -> None:
    """The Ray workers' environment variables (`ray_kwargs.ray_init.runtime_env.env_vars`) in
    this process too, before verl is imported: the driver then loads the same plugins
    (VERL_USE_EXTERNAL_MODULES) and platform (VERL_PLATFORM) as every worker."""
    import os

    env_vars = cfg.ray_kwargs.ray_init.get("runtime_env", {}).get("env_vars", {}) or {}
    for name, value in env_vars.items():
        os.environ[str(name)] = str(value)


def run_verl(cfg) -> None:
    """Run verl's PPO entry (`run_ppo` with verl's own TaskRunnerV1) on a validated config."""
    export_runtime_env(cfg)
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo

    register()
    run_ppo(cfg, task_runner_class=TaskRunnerV1)


__all__ = ["TRAINER_MODE", "register", "run_verl", "setup_worker_process"]
