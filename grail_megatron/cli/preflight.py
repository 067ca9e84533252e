"""The one validation step every launch path runs before it starts anything.

    compose(...)            -> BadInput for unknown keys / presets (names the allowed ones)
    check(cfg, mode)        -> the planner's Plan, or raises:
        BadInput     types, ranges, GRPO rules (config.rules), CPU-run rules (config.cpu_rules),
                     files a launch reads (mode "local" / "verl": model folder, data files)
        CheckFailed  the planner's layout, batch and memory rules (with fixes)

`train` (all modes), `plan`, the training scripts and `submit.sh` (through `train --check`)
call these; verl's own validator runs next to them (config.verl_check).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from typing import Any

from grail_megatron.cli.exits import BadInput, CheckFailed

MODES = ("plan", "dry-run", "local", "verl")
CPU_RULES = "grail_megatron.config.cpu_rules"


def compose(overrides: Sequence[str], config_name: str):
    from grail_megatron.config.compose import ConfigError
    from grail_megatron.config.compose import compose as compose_config

    try:
        return compose_config(list(overrides), config_name)
    except ConfigError as exc:
        raise BadInput(str(exc)) from None


def input_problems(cfg: Any, mode: str) -> list[str]:
    """Everything wrong with the input itself (exit 2), one line each."""
    from grail_megatron.config.rules import config_problems, file_problems

    problems = config_problems(cfg) + cpu_problems(cfg)
    if mode in ("local", "verl"):
        problems += file_problems(cfg)
    return problems


def cpu_problems(cfg: Any) -> list[str]:
    """The CPU-run rule (vLLM, TE, remove-padding, NCCL on trainer.device=cpu), when it is installed."""
    if importlib.util.find_spec(CPU_RULES) is None:
        return []
    return list(importlib.import_module(CPU_RULES).cpu_run_problems(cfg))


def check(cfg: Any, mode: str, model=None):
    """Input rules, then the planner; returns the Plan. Raises BadInput / CheckFailed."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; allowed: {', '.join(MODES)}")
    problems = input_problems(cfg, mode)
    if problems:
        raise BadInput(listing(problems))
    result = make_plan(cfg, model)
    if not result.ok:
        lines = [f"  - {p.key}: {p.reason}\n      fix: {p.fix}" for p in result.problems]
        raise CheckFailed(f"{len(result.problems)} problem(s) found before launch:\n" + "\n".join(lines))
    return result


def make_plan(cfg: Any, model=None):
    from grail_megatron.config.planner import plan, plan_input_from_config

    return plan(plan_input_from_config(cfg, model=model))


def listing(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the input:\n" + "\n".join(f"  - {p}" for p in problems)
