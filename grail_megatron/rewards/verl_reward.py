"""The reward as verl consumes it: one flat, uniform schema for every family.

verl's reward loop takes the keys of the *first* sample's dict and builds one numpy array
per key over the batch (``verl/experimental/reward_loop/reward_loop.py``), and validation
averages every non-string value per data source. The full parity result of
``compute_score`` has family-specific keys and list values (MBPP ``test_passed``), so a
batch mixing GSM8K and MBPP would raise a KeyError there. This module maps it onto fixed
scalar keys; point verl at it with::

    reward.custom_reward_function.path=pkg://grail_megatron.rewards.verl_reward
    reward.custom_reward_function.name=compute_score

Importing it (which verl does when a reward worker starts) starts the sympy workers and
the MBPP sandbox pool (``api.prestart``), so the first step's rewards pay no start-up;
``GRAIL_REWARD_PRESTART=0`` skips that (tools that import without scoring).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from grail_megatron.rewards.api import PRESTART_ENV, prestart
from grail_megatron.rewards.api import compute_score as _full_score
from grail_megatron.rewards.api import compute_score_batch as _full_batch

# key -> meaning; every value is a float except the two strings.
VERL_KEYS = {
    "score": "the reward",
    "acc": "1.0 if the answer is right (MBPP: every test passed)",
    "pass_rate": "MBPP fraction of tests passed; GSM8K/MATH: same as acc",
    "format": "the family's format term (GSM8K strict, MATH answer_format, MBPP solution_format)",
    "thinking": "1.0 with a complete thinking block",
    "has_answer": "1.0 with a <SOLUTION>...</SOLUTION> block",
    "trailing": "characters after </SOLUTION>",
    "syntax_valid": "MBPP: the code compiles (0.0 for other families)",
    "timed_out": "1.0 when a check ran past its time bound",
    "bad_input": "1.0 when the input was rejected (see reason)",
    "route": "gsm8k | math | mbpp | unknown",
    "reason": "why an input was rejected or a check failed, else ''",
}


def flatten(result: Mapping[str, Any]) -> dict[str, Any]:
    """Map a full ``compute_score`` result onto ``VERL_KEYS``."""
    route = result.get("route", "unknown")
    if route == "mbpp":
        pass_rate = float(result.get("pass_rate") or 0.0)
        acc = float(result.get("executed", False) and result.get("passed") == result.get("total"))
        format_term = result.get("solution_format", False)
    else:
        acc = float(bool(result.get("correct", False)))
        pass_rate = acc
        format_term = result.get("strict", result.get("answer_format", False))
    reason = result.get("reason", "") or ""
    return {
        "score": float(result["score"]),
        "acc": acc,
        "pass_rate": pass_rate,
        "format": float(bool(format_term)),
        "thinking": float(bool(result.get("thinking", False))),
        "has_answer": float(bool(result.get("answer", False))),
        "trailing": float(result.get("trailing", 0)),
        "syntax_valid": float(bool(result.get("syntax_valid", False))),
        "timed_out": float(bool(result.get("timed_out", False))),
        "bad_input": float(bool(reason) and not reason.startswith("internal error")),
        "route": route,
        "reason": reason,
    }


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict[str, Any]:
    """verl's ``custom_reward_function`` (NaiveRewardManager / reward loop)."""
    return flatten(_full_score(data_source, solution_str, ground_truth, extra_info, **kwargs))


def compute_score_batched(
    data_sources: Sequence[str],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Any] | None = None,
    max_workers: int | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """verl's BatchRewardManager signature: lists in, one flat dict per sample out."""
    extra_infos = extra_infos if extra_infos is not None else [None] * len(data_sources)
    items = [
        {"data_source": d, "solution_str": s, "ground_truth": g, "extra_info": e}
        for d, s, g, e in zip(data_sources, solution_strs, ground_truths, extra_infos, strict=True)
    ]
    return [flatten(result) for result in _full_batch(items, max_workers=max_workers, **kwargs)]


if os.environ.get(PRESTART_ENV, "1").strip().lower() not in {"0", "false", "no"}:
    prestart()
