"""`grail-megatron train`: compose, validate (ours + verl's), then launch verl or the local loop.

    grail-megatron train [--kl] [--dry-run [--print-config] | --check | --local] [hydra overrides...]

Order of work, nothing is launched before every check passed:
  1. compose `configs/<config-name>` on top of verl 0.9.1's config tree (grail_megatron.config);
  2. the validation step (grail_megatron.cli.preflight): types, ranges, GRPO rules, the CPU-run
     rules, the files the run reads (--local and the verl launch), our planner (layouts, batch
     divisibility, memory per GPU); verl's `validate_config` runs beside it in a helper process
     started before step 1 (config.verl_check);
  3. --dry-run: print the plan and the keys that differ from verl's defaults (--print-config:
     the whole resolved config), exit 0 (no GPU needed); --check: the same checks as a launch
     (files included), print one line, exit 0 (what submit.sh runs before sbatch);
     --local:   hand the composed config to the local GRPO loop (grail_megatron.local);
     otherwise: launch-time checks (a GPU, the dist checkpoint to start from) and verl's
                `run_ppo` with the grail_megatron trainer mode (grail_megatron.workers).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from grail_megatron.cli.exits import (BadInput, BrokenEnvironment, CheckFailed, Parser, debug_requested,
                                      guarded)

PROG = "grail-megatron train"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", default="grpo_grail", help="primary config (grpo_grail | grpo_grail_kl)")
    parser.add_argument("--kl", action="store_true", help="the KL variant (same as --config-name grpo_grail_kl)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print the plan and the keys that differ from verl's defaults, then exit")
    mode.add_argument("--local", action="store_true", help="run the single-machine GRPO loop (CPU capable)")
    parser.add_argument("--check", action="store_true",
                        help="run every check the launch (verl, or --local) runs before starting, files included, "
                             "but no GPU check; print one line and exit (submit.sh runs it before sbatch)")
    parser.add_argument("--print-config", action="store_true", help="with --dry-run: also print the whole resolved config")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (key=value)")
    return parser


def mode_of(args: argparse.Namespace) -> str:
    if args.dry_run:
        return "dry-run"
    return "local" if args.local else "verl"


def check_config(cfg: Any, mode: str = "dry-run"):
    """The validation step + verl's validator, in this process; returns the plan."""
    from grail_megatron.cli import preflight
    from grail_megatron.config.verl_check import verl_problem

    result = preflight.check(cfg, mode)
    problem = verl_problem(cfg)
    if problem:
        raise CheckFailed(problem)
    return result


def check_launch_environment(cfg: Any) -> None:
    """What only the real verl launch needs (skipped by --dry-run)."""
    check_start_checkpoint(cfg)
    check_model_vocabulary(cfg)
    if str(cfg.trainer.device) == "cpu":
        return  # cluster=cpu: verl's trainer on CPU cores (grail_megatron.workers.platform_cpu)
    import torch

    if not torch.cuda.is_available():
        raise BrokenEnvironment("no CUDA GPU is visible: verl's Megatron trainer needs GPUs. Use cluster=cpu to "
                                "run verl's trainer on CPU cores, --dry-run to check a config here, or --local for "
                                "the single-machine loop.")


def check_model_vocabulary(cfg: Any) -> None:
    """verl's engine does not pad the vocabulary: it must divide by the actor's/ref's TP."""
    import json

    from grail_megatron.config.cpu_rules import vocabulary_problems

    config_json = Path(str(cfg.actor_rollout_ref.model.path)) / "config.json"
    if not config_json.is_file():
        return  # a hub id or remote path: the model files are checked elsewhere
    problems = vocabulary_problems(cfg, json.loads(config_json.read_text()).get("vocab_size"))
    if problems:
        raise BadInput("\n".join(problems))


def check_start_checkpoint(cfg: Any) -> None:
    """verl starts from a Megatron dist checkpoint when use_dist_checkpointing=true: it must exist."""
    megatron = cfg.actor_rollout_ref.actor.megatron
    if megatron.use_dist_checkpointing:
        path = Path(str(megatron.dist_checkpointing_path))
        if not path.is_dir():
            raise BadInput(
                f"actor_rollout_ref.actor.megatron.dist_checkpointing_path={path} does not exist: with "
                "use_dist_checkpointing=true verl 0.9.1 starts from a Megatron dist checkpoint. Convert the HF "
                "model first (`grail-megatron convert`, see docs/checkpoint.md), set GRAIL_MCORE_INIT_ROOT, or pass "
                "actor_rollout_ref.actor.megatron.use_dist_checkpointing=false to start from the HF weights.")


def dry_run_report(cfg: Any, result, print_config: bool = False) -> str:
    """What --dry-run prints once every check passed."""
    from omegaconf import OmegaConf

    from grail_megatron.config import plan_report as report
    from grail_megatron.config.config_diff import differing_keys, render_differences

    parts = ["# resolved config", OmegaConf.to_yaml(cfg, resolve=True)] if print_config else []
    parts += [render_differences(differing_keys(cfg)), "", "# plan", report.describe_input(result.input), "",
              report.configured_section(result), "", report.problems_section(result),
              "verl validate_config: passed", "DRY RUN: nothing launched."]
    return "\n".join(parts)


def print_dry_run(cfg: Any, result, print_config: bool = False) -> None:
    print(dry_run_report(cfg, result, print_config))


def run_local(cfg: Any, overrides: list[str], config_name: str) -> int:
    """Delegate to the local loop's entry point (owned by grail_megatron.local)."""
    import grail_megatron.local as local
    from grail_megatron.local.settings import ConfigError, LocalSettings

    try:
        LocalSettings.from_config(cfg)
    except ConfigError as exc:
        raise BadInput(str(exc)) from None
    # the local loop builds verl's engine too: the same start checkpoint and vocabulary rules
    check_start_checkpoint(cfg)
    check_model_vocabulary(cfg)
    return int(local.main(overrides, config_name=config_name, cfg=cfg) or 0)


def validated(args: argparse.Namespace, config_name: str, prepare=None):
    """Compose and run the validation step, verl's validator beside it; (cfg, plan, prepared).

    The helper that imports verl starts before composing (unless this command line's verdict is
    cached), so its ~4 s import overlaps composition, our checks, the planner and
    `prepare(cfg, plan)` (e.g. the dry run's report), which is returned for use once verl agreed."""
    from grail_megatron.cli import preflight
    from grail_megatron.config.verl_check import VerlCheck

    verl = VerlCheck.begin(config_name, args.overrides)  # first: verl's import overlaps all of ours
    try:
        cfg = preflight.compose(args.overrides, config_name)
        result = preflight.check(cfg, mode_of(args))
        prepared = prepare(cfg, result) if prepare is not None else None
        problem = verl.result(cfg)
    except BaseException:
        verl.cancel()
        raise
    if problem:
        raise CheckFailed(problem)
    return cfg, result, prepared


def run(args: argparse.Namespace) -> int:
    if args.print_config and not args.dry_run:
        raise BadInput("--print-config goes with --dry-run")
    if args.check and args.dry_run:
        raise BadInput("--check and --dry-run exclude each other (--check also checks the files a run reads)")
    config_name = "grpo_grail_kl" if args.kl else args.config_name
    report = (lambda cfg, result: dry_run_report(cfg, result, args.print_config)) if args.dry_run else None
    cfg, result, text = validated(args, config_name, prepare=report)
    if args.dry_run:
        print(text)  # only now: verl's validator has passed the config too
        return 0
    if args.check:
        check_start_checkpoint(cfg)  # both paths build verl's engine
        print(f"{PROG}: config, files and plan pass every check ({result.input.cluster.world_size} GPU(s), "
              f"actor {result.actor.layout.label}); nothing launched")
        return 0
    if args.local:
        return run_local(cfg, args.overrides, config_name)
    check_launch_environment(cfg)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    return run_verl_until_done_or_preempted(cfg)


def main(argv: list[str] | None = None) -> int:
    from grail_megatron.quiet import quiet_third_party

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    quiet_third_party()
    return guarded(PROG, lambda: run(args), debug=args.debug or debug_requested(argv))


def run_verl_until_done_or_preempted(cfg: Any) -> int:
    """verl's trainer; SIGUSR1/SIGTERM -> checkpoint after the current step, exit 75 (requeue)."""
    from grail_megatron.workers import run_verl  # exports the Ray workers' env before importing verl
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
        print(f"{PROG}: preempted; checkpoint saved in {cfg.trainer.default_local_dir}, "
              f"exiting {EXIT_PREEMPTED} so the launcher requeues", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
