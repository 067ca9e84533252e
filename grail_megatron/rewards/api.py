"""verl's entry points: ``compute_score`` (one completion) and ``compute_score_batch``.

Routing is GRAIL's: the first of "gsm8k", "math", "mbpp" found in ``data_source.lower()``;
anything else scores 0.0. Bad input (None, non-strings, unknown data sources, malformed
MBPP ground truth) never raises: the result carries a ``reason`` instead, because one odd
row must not kill a training step.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from functools import lru_cache
from collections.abc import Iterable, Mapping
from typing import Any

from grail_megatron.rewards import gsm8k, math_answer, mbpp
from grail_megatron.rewards.sandbox import SandboxPool, SandboxUnavailable, default_pool
from grail_megatron.rewards.sandbox_mode import format_only_allowed

ROUTES = ("gsm8k", "math", "mbpp")
PRESTART_ENV = "GRAIL_REWARD_PRESTART"
_LOG = logging.getLogger(__name__)


def prestart() -> dict[str, str]:
    """Start the sympy workers and the MBPP pool now, concurrently, and wait for them, so
    that no ``compute_score`` call (the first included) pays their start (1-3 s).

    ``verl_reward`` calls it when a reward worker imports it. Returns what could not start
    (``{"sympy": message, "mbpp": message}``, logged too): that error is raised again by
    the first row that needs it, as without a prestart.
    """
    from grail_megatron.rewards.sympy_worker import default_checker

    failures: dict[str, str] = {}

    def start(name: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # SandboxUnavailable included: surfaced again on use
            failures[name] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=start, args=("sympy", default_checker().warmup)),
               threading.Thread(target=start, args=("mbpp", default_pool))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, message in failures.items():
        _LOG.warning("reward prestart: %s did not start: %s", name, message)
    return failures


@lru_cache(maxsize=4096)
def route_of(data_source: str) -> str:
    """GRAIL's routing: the first of ROUTES found in ``data_source.lower()``."""
    lowered = data_source.lower()
    for route in ROUTES:
        if route in lowered:
            return route
    return "unknown"


def _rejected(reason: str, route: str = "unknown") -> dict[str, Any]:
    return {"score": 0.0, "route": route, "timed_out": False, "reason": reason}


def compute_score(
    data_source: Any,
    solution_str: Any,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    *,
    math_verify: bool = False,
    sandbox: SandboxPool | None = None,
    allow_format_only_mbpp: bool | None = None,
    **_unused: Any,
) -> dict[str, Any]:
    """Score one completion; returns ``{"score": float, <components>...}``.

    ``math_verify=True`` swaps sympy for the math-verify library in MATH correctness (a
    departure from GRAIL parity). ``sandbox`` selects the MBPP execution pool (default: a
    shared pool sized to the CPU count). Extra keyword arguments from verl's
    ``reward.reward_kwargs`` are accepted and ignored.

    Where no MBPP sandbox can start (neither root nor user namespaces), an MBPP row raises
    ``SandboxUnavailable``: that is a broken deployment, not a bad row, and scores made of
    format terms only would silently train on a wrong reward. ``allow_format_only_mbpp=True``
    (or ``GRAIL_ALLOW_FORMAT_ONLY_MBPP=1``) accepts those scores explicitly.
    """
    try:
        return _score(data_source, solution_str, ground_truth, math_verify, sandbox, allow_format_only_mbpp)
    except SandboxUnavailable:
        raise
    except Exception as exc:  # the last line of defence: a reward never kills a step
        return _rejected(f"internal error: {type(exc).__name__}: {exc}")


def _score(data_source, solution_str, ground_truth, math_verify, sandbox, allow_format_only) -> dict[str, Any]:
    if not isinstance(data_source, str):
        return _rejected(f"data_source must be a string, got {type(data_source).__name__}")
    route = route_of(data_source)
    if route == "unknown":
        return _rejected(f"unknown data_source {data_source!r}: expected one containing {ROUTES}")
    if not isinstance(solution_str, str):
        return _rejected(f"solution_str must be a string, got {type(solution_str).__name__}", route)
    if route == "gsm8k":
        if ground_truth is not None and not isinstance(ground_truth, str):
            return _rejected(f"ground_truth must be a string, got {type(ground_truth).__name__}", route)
        return gsm8k.score(solution_str, ground_truth)
    if route == "math":
        if not isinstance(ground_truth, str):
            return _rejected(f"ground_truth must be a string, got {type(ground_truth).__name__}", route)
        return math_answer.score(solution_str, ground_truth, math_verify=math_verify)
    return mbpp.score(solution_str, ground_truth, pool=sandbox, allow_format_only=allow_format_only)


def _has_mbpp(items: list) -> bool:
    return any(isinstance(item, Mapping) and isinstance(item.get("data_source"), str)
               and route_of(item["data_source"]) == "mbpp" for item in items)


def _prefetch_math(items: list, math_verify: bool) -> None:
    """The sympy verdicts of the batch's MATH rows, all at once over every sympy worker
    (``math_answer.prefetch``); each row is then scored as alone, from the cache."""
    rows = [(item["solution_str"], item["ground_truth"]) for item in items
            if isinstance(item, Mapping) and isinstance(item.get("data_source"), str)
            and route_of(item["data_source"]) == "math"
            and isinstance(item.get("solution_str"), str) and isinstance(item.get("ground_truth"), str)]
    if not rows:
        return
    try:
        math_answer.prefetch(rows, math_verify=math_verify)
    except SandboxUnavailable:
        raise
    except Exception as exc:  # the rows are scored (and any failure reported) one by one
        _LOG.warning("MATH prefetch failed, scoring row by row: %s: %s", type(exc).__name__, exc)


def compute_score_batch(
    items: Iterable[Mapping[str, Any]],
    max_workers: int | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Score many completions, results in input order.

    Items are dicts with ``compute_score``'s keyword names (``data_source``,
    ``solution_str``, ``ground_truth``, ``extra_info``). At most ``max_workers`` (default:
    CPU count) completions are in flight; MBPP programs run concurrently in the sandbox
    pool, GSM8K/MATH scoring is cheap and runs in the same threads. The MATH rows' sympy
    checks are made first, together, over every sympy worker (``_prefetch_math``).
    """
    items = list(items)
    workers = max(1, min(max_workers or os.cpu_count() or 1, len(items) or 1))
    if kwargs.get("sandbox") is None and _has_mbpp(items) and not format_only_allowed(
            kwargs.get("allow_format_only_mbpp")):
        default_pool()  # a missing sandbox raises SandboxUnavailable here, before any scoring
    _prefetch_math(items, bool(kwargs.get("math_verify", False)))

    def one(item: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(item, Mapping):
            return _rejected(f"batch item must be a mapping, got {type(item).__name__}")
        return compute_score(
            item.get("data_source"),
            item.get("solution_str"),
            item.get("ground_truth"),
            item.get("extra_info"),
            **kwargs,
        )

    if workers == 1:
        return [one(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as executor:
        return list(executor.map(one, items))
