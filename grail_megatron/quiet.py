"""Hide the third-party warnings that are expected on this machine; every other warning shows.

Megatron-core prints a Transformer Engine / Apex "falling back" warning per module and rank on
a machine without them (every CPU box), torch logs "No CUDA runtime is found", and a few
deprecations come from code we do not own. They bury the lines that matter. `quiet_third_party()`
(called by every entry point and by each rank of the converter) drops exactly those, counts
them and prints one summary line at exit. Anything not listed here is shown as usual.
GRAIL_SHOW_WARNINGS=1 turns the filter off.

Imports nothing heavy: it must run before torch / megatron are imported.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Expected:
    """One expected message: where it comes from (a warning, or a named logger) and why it is harmless."""

    pattern: str
    why: str
    logger: str | None = None  # None: a `warnings.warn` message
    cpu_only: bool = False  # expected only on a machine without NVIDIA GPUs
    prefix: str | None = None  # the message's literal start, for child processes (PYTHONWARNINGS)

    def matches(self, text: str) -> bool:
        return re.search(self.pattern, text) is not None


EXPECTED = (
    Expected(r"(Transformer Engine and )?Apex (is|are) not installed", "TE/Apex fallbacks", cpu_only=True,
             prefix="Apex is not installed"),
    Expected(r"Transformer Engine (and Apex )?(is|are) not installed", "TE/Apex fallbacks", cpu_only=True,
             prefix="Transformer Engine and Apex are not installed"),
    Expected(r"No CUDA runtime is found", "no CUDA runtime", logger="torch.utils.cpp_extension", cpu_only=True),
    Expected(r"full scope is deprecated", "Megatron deprecations", prefix="full scope is deprecated"),
    Expected(r"MCore's async save is deprecated", "Megatron deprecations",
             logger="megatron.core.dist_checkpointing.strategies.torch"),
    Expected(r"Disabled critic as algorithm.adv_estimator != gae", "verl notices"),
    Expected(r"imports from `dynamic_context.py` will be removed", "Megatron deprecations",
             prefix="The following imports from `dynamic_context.py`"),
    Expected(r"(torchtitan|veomni|automodel) engine is not available", "verl's optional engines (not installed)",
             prefix="torchtitan engine is not available"),
    Expected(r"target_num_threads \d+ should not exceed total physical CPU cores", "TransferQueue thread cap",
             logger="transfer_queue.utils.common"),
    Expected(r"No index file found, saving index file failed", "mbridge: a one-file HF export has no index",
             prefix="No index file found"),
    Expected(r"torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a "
             r"single process", "single-process checkpoint reads", prefix="torch.distributed is disabled"),
    # verl's engine on our configs (docs/verl_path.md says why each setting is what it is)
    Expected(r"legacy mbridge backend selected by `vanilla_mbridge=True` is deprecated", "verl notices",
             prefix="The legacy mbridge backend"),
    Expected(r"full_param_layout not provided with use_distributed_optimizer=True", "Megatron notices",
             logger="megatron.core.distributed.distributed_data_parallel"),
    Expected(r"TypedStorage is deprecated", "torch deprecations (verl's param-buffer offload)",
             prefix="TypedStorage is deprecated"),
    Expected(r"c10d::broadcast_: an autograd kernel was not registered", "torch notices (Megatron's TP "
             "broadcast on gloo)", cpu_only=True),
    Expected(r"is_fx_tracing will return true for both fx.symbolic_trace and torch.export", "torch notices",
             logger="torch.fx._symbolic_trace"),
)

_hidden: dict[str, int] = {}
_installed = False


def has_nvidia_gpu() -> bool:
    return Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir())


def active_rules() -> list[Expected]:
    gpu = has_nvidia_gpu()
    return [rule for rule in EXPECTED if not (rule.cpu_only and gpu)]


def quiet_third_party(summary: bool = True) -> None:
    """Install the filter (idempotent). `summary`: print the count of hidden messages at exit."""
    global _installed
    if _installed or os.environ.get("GRAIL_SHOW_WARNINGS", "0") not in ("", "0"):
        return
    _installed = True
    rules = active_rules()
    os.environ["PYTHONWARNINGS"] = child_warning_filters(os.environ.get("PYTHONWARNINGS", ""))
    _hide_warnings([r for r in rules if r.logger is None])
    for rule in rules:
        if rule.logger is not None:
            logging.getLogger(rule.logger).addFilter(_LogFilter(rule))
    if summary and os.environ.get("RANK", "0") == "0":
        atexit.register(_print_summary)


def child_warning_filters(existing: str = "") -> str:
    """PYTHONWARNINGS for processes we start (ranks, Ray workers, helpers): the same expected
    warnings ignored by their literal start (no count there; log messages are not covered)."""
    entries = [e for e in existing.split(",") if e]
    for rule in active_rules():
        entry = f"ignore:{rule.prefix}" if rule.prefix and rule.logger is None else None
        if entry and entry not in entries:
            entries.append(entry)
    return ",".join(entries)


def _hide_warnings(rules: list[Expected]) -> None:
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        for rule in rules:
            if rule.matches(text):
                _count(rule)
                return
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


class _LogFilter(logging.Filter):
    def __init__(self, rule: Expected):
        super().__init__()
        self.rule = rule

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rule.matches(record.getMessage()):
            _count(self.rule)
            return False
        return True


def _count(rule: Expected) -> None:
    _hidden[rule.why] = _hidden.get(rule.why, 0) + 1


def hidden_counts() -> dict[str, int]:
    return dict(_hidden)


def summary_line() -> str | None:
    if not _hidden:
        return None
    total = sum(_hidden.values())
    kinds = ", ".join(sorted(_hidden))
    return f"({total} expected third-party warning(s) hidden: {kinds}; GRAIL_SHOW_WARNINGS=1 shows them)"


def _print_summary() -> None:
    line = summary_line()
    if line:
        print(line, file=sys.stderr)


if __name__ == "__main__":  # scripts/slurm/ray_node.sh: the filters for a Ray node's processes
    print("" if os.environ.get("GRAIL_SHOW_WARNINGS", "0") not in ("", "0") else
          child_warning_filters(os.environ.get("PYTHONWARNINGS", "")))
