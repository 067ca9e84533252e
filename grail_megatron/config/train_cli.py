"""`grail-megatron train`: compose, validate (ours + verl's), then launch verl or the local loop.

    grail-megatron train [--kl] [--dry-run | --local] [hydra overrides...]

Order of work, nothing is launched before every check passed:
  1. compose `configs/<config-name>` on top of verl 0.9.1's config tree (grail_megatron.config);
  2. our planner (layouts, batch divisibility, memory per GPU) and verl's
     `verl.utils.config.validate_config`;
  3. --dry-run: print the resolved config and the plan, exit 0 (no GPU needed);
     --local:   hand the composed config to the local GRPO loop (grail_megatron.local);
     otherwise: launch-time checks (GPUs present, dist checkpoint to start from) and verl's
                `run_ppo` with the grail_megatron trainer mode (grail_megatron.workers).
Exit status: 0 done, 1 a check failed (reasons and fixes printed), 2 bad arguments/config.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


class LaunchError(RuntimeError):
    """A check that must pass before anything is launched."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grail-megatron train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", default="grpo_grail", help="primary config (grpo_grail | grpo_grail_kl)")
    parser.add_argument("--kl", action="store_true", help="the KL variant (same as --config-name grpo_grail_kl)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, then exit")
    mode.add_argument("--local", action="store_true", help="run the single-machine GRPO loop (CPU capable)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (key=value)")
    return parser


def validate_with_verl(cfg: Any) -> None:
    """verl's own pre-flight check (the one main_ppo runs), on a copy it may not mutate."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    try:
        validate_config(config=copy, use_reference_policy=need_reference_policy(copy), use_critic=need_critic(copy))
    except (AssertionError, ValueError) as exc:
        raise LaunchError(f"verl's validate_config rejected the config: {exc}") from exc


def check_config(cfg: Any):
    """Our planner + verl's validator; returns the plan, raises LaunchError listing every problem."""
    from grail_megatron.config.planner import plan, plan_input_from_config

    result = plan(plan_input_from_config(cfg))
    if not result.ok:
        lines = [f"{len(result.problems)} problem(s) found before launch:"]
        lines += [f"  - {p.key}: {p.reason}\n      fix: {p.fix}" for p in result.problems]
        raise LaunchError("\n".join(lines))
    validate_with_verl(cfg)
    return result


def check_launch_environment(cfg: Any) -> None:
    """What only the real launch needs (skipped by --dry-run)."""
    megatron = cfg.actor_rollout_ref.actor.megatron
    if megatron.use_dist_checkpointing:
        path = Path(str(megatron.dist_checkpointing_path))
        if not path.is_dir():
            raise LaunchError(
                f"actor_rollout_ref.actor.megatron.dist_checkpointing_path={path} does not exist: with "
                "use_dist_checkpointing=true verl 0.9.1 starts from a Megatron dist checkpoint. Convert the HF "
                "model first (`grail-megatron convert`, see docs/checkpoint.md), set GRAIL_MCORE_INIT_ROOT, or pass "
                "actor_rollout_ref.actor.megatron.use_dist_checkpointing=false to start from the HF weights.")
    import torch

    if not torch.cuda.is_available():
        raise LaunchError("no CUDA GPU is visible: verl's Megatron trainer needs GPUs. Use --dry-run to check a "
                          "config here, or --local to run the CPU loop.")


def print_dry_run(cfg: Any, result) -> None:
    from omegaconf import OmegaConf

    from grail_megatron.config import plan_report as report

    print("# resolved config")
    print(OmegaConf.to_yaml(cfg, resolve=True))
    print("# plan")
    print(report.describe_input(result.input))
    print()
    print(report.configured_section(result))
    print()
    print(report.problems_section(result))
    print("verl validate_config: passed")
    print("DRY RUN: nothing launched.")


def run_local(cfg: Any, overrides: list[str], config_name: str) -> int:
    """Delegate to the local loop's entry point (owned by grail_megatron.local)."""
    import grail_megatron.local as local

    return int(local.main(overrides, config_name=config_name, cfg=cfg) or 0)


def main(argv: list[str] | None = None) -> int:
    from grail_megatron.config.compose import ConfigError, compose

    args = build_parser().parse_args(argv)
    config_name = "grpo_grail_kl" if args.kl else args.config_name
    try:
        cfg = compose(args.overrides, config_name)
    except ConfigError as exc:
        print(f"grail-megatron train: {exc}", file=sys.stderr)
        return 2
    try:
        result = check_config(cfg)
        if args.dry_run:
            print_dry_run(cfg, result)
            return 0
        if args.local:
            return run_local(cfg, args.overrides, config_name)
        check_launch_environment(cfg)
    except LaunchError as exc:
        print(f"grail-megatron train: {exc}", file=sys.stderr)
        return 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    return run_verl_until_done_or_preempted(cfg)


def run_verl_until_done_or_preempted(cfg: Any) -> int:
    """verl's trainer; SIGUSR1/SIGTERM -> checkpoint after the current step, exit 75 (requeue)."""
    from grail_megatron.workers import run_verl
    from grail_megatron.workers.preemption import EXIT_PREEMPTED, install_request_handlers, request_path

    request = request_path(cfg)
    request.unlink(missing_ok=True)  # a request left by an earlier, already requeued run
    install_request_handlers(request)
    try:
        run_verl(cfg)
    except Exception:
        if not request.exists():
            raise
    if request.exists():
        request.unlink()
        print(f"grail-megatron train: preempted; checkpoint saved in {cfg.trainer.default_local_dir}, "
              f"exiting {EXIT_PREEMPTED} so the launcher requeues", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
