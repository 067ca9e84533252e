"""Hendrycks MATH reward: 0.7 correct + 0.15 (answer, trailing < 50) + 0.1 thinking + 0.05 no trailing.

Correctness follows GRAIL's ``_math_answers_equal``: normalise LaTeX, then exact match,
then sympy (``simplify(parse_expr(a) - parse_expr(b)) == 0``), then ``float`` within 1e-6.
sympy runs in a bounded, sandboxed worker (``sympy_worker``); an answer whose check runs
past the budget counts as not correct with ``timed_out=True``.

``math_verify=True`` replaces the sympy strategy by the math-verify library: a documented
departure from parity (it understands LaTeX such as ``\\frac{1}{2}`` vs ``0.5``).
"""
from __future__ import annotations

import re
from typing import Any

from grail_megatron.rewards.extract import parse_completion
from grail_megatron.rewards.sympy_worker import SympyChecker, default_checker

_LEFT = re.compile(r"\\left\b")
_RIGHT = re.compile(r"\\right\b")
_WHITESPACE = re.compile(r"\s+")


def normalize(answer: str) -> str:
    s = answer.strip()
    s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac").replace(r"\cfrac", r"\frac")
    s = _RIGHT.sub("", _LEFT.sub("", s))
    s = s.replace(r"\,", "").replace(r"\!", "").replace(r"\;", "").replace(r"\:", "")
    return _WHITESPACE.sub("", s).lower()


def _cannot_parse(text: str) -> bool:
    """A backslash outside a string literal or comment is a tokenizer error, so parse_expr
    raises before evaluating anything; skipping the worker then gives the same "not equal".
    (Whitespace is gone after normalisation, so it cannot be a line continuation.)"""
    return "\\" in text and not any(char in text for char in "'\"#")


def _float_close(pred: str, gold: str) -> bool:
    try:
        return abs(float(pred) - float(gold)) < 1e-6
    except (ValueError, TypeError):
        return False


def _worker_check(predicted: str, gold: str, pred_norm: str, gold_norm: str,
                  math_verify: bool) -> tuple[str, str, str] | None:
    """The ``(op, pred, gold)`` the worker must decide, or None (not needed: empty,
    exactly equal, or known not to parse)."""
    if not predicted or not gold or pred_norm == gold_norm:
        return None
    if math_verify:
        return ("math_verify", predicted, gold)  # math-verify parses LaTeX itself: raw answers
    if _cannot_parse(pred_norm) or _cannot_parse(gold_norm):
        return None
    return ("sympy", pred_norm, gold_norm)


def answers_equal(
    predicted: str, gold: str, *, checker: SympyChecker | None = None, math_verify: bool = False
) -> tuple[bool, str, bool, str]:
    """Return (correct, strategy, timed_out, error) with GRAIL's strategy order."""
    if not predicted or not gold:
        return False, "empty", False, ""
    pred_norm, gold_norm = normalize(predicted), normalize(gold)
    if pred_norm == gold_norm:
        return True, "exact", False, ""
    timed_out, error = False, ""
    key = _worker_check(predicted, gold, pred_norm, gold_norm, math_verify)
    if key is not None:
        op, pred, gold_text = key
        result = (checker or default_checker()).check(pred, gold_text, op=op)
        if result.equal:
            return True, "math_verify" if math_verify else "symbolic", False, ""
        timed_out, error = result.timed_out, result.error
    if _float_close(pred_norm, gold_norm):
        return True, "numeric", timed_out, error
    return False, "none", timed_out, error


def prefetch(rows: list[tuple[str, str]], *, checker: SympyChecker | None = None,
             math_verify: bool = False) -> None:
    """Decide the worker checks of many ``(solution_str, ground_truth)`` rows at once
    (``SympyChecker.check_many``: every worker, answers streamed), so that scoring each
    row afterwards finds its verdict cached. The scores are those of ``score`` alone."""
    keys = []
    for solution_str, ground_truth in rows:
        predicted = parse_completion(solution_str).inside
        key = _worker_check(predicted, ground_truth, normalize(predicted), normalize(ground_truth), math_verify)
        if key is not None:
            keys.append(key)
    if keys:
        (checker or default_checker()).check_many(keys)


def score(
    solution_str: str,
    ground_truth: str,
    *,
    checker: SympyChecker | None = None,
    math_verify: bool = False,
) -> dict[str, Any]:
    parsed = parse_completion(solution_str)
    answer_text = parsed.inside
    correct, strategy, timed_out, error = answers_equal(
        answer_text, ground_truth, checker=checker, math_verify=math_verify
    )
    answer_format = parsed.has_solution and parsed.trailing < 50
    no_trailing = parsed.trailing == 0
    total = (
        (0.7 if correct else 0.0)
        + (0.15 if answer_format else 0.0)
        + (0.1 if parsed.thinking else 0.0)
        + (0.05 if no_trailing else 0.0)
    )
    return {
        "score": total,
        "route": "math",
        "answer_text": answer_text,
        "pred_norm": normalize(answer_text),
        "gold_norm": normalize(ground_truth),
        "correct": correct,
        "strategy": strategy,
        "answer_format": answer_format,
        "thinking": parsed.thinking,
        "answer": parsed.has_solution,
        "trailing": parsed.trailing,
        "no_trailing": no_trailing,
        "timed_out": timed_out,
        "check_error": error,  # the checker's own failure (not the input's fault), else ""
        "reason": "",
    }
