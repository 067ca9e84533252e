"""GSM8K reward: 0.6 correct + 0.15 strict + 0.1 thinking + 0.1 answer + 0.05 no trailing.

Rules of GRAIL's research reward (DESIGN.md section 6), summed in the reference's order so
the float is bit-identical.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from grail_megatron.rewards.extract import parse_completion

_HASH = re.compile(r"####\s*(?P<ans>.+)")
_NUMBER = re.compile(r"[-+]?\d+(?:[\.,]\d+)?")
_NUMERIC_ONLY = re.compile(r"^[-+]?[\d.,]+$")


def parse_gold(raw: str | None) -> str:
    """Last ``#### answer`` stripped (commas kept), else the last number without commas."""
    raw = raw or ""
    last = None
    for last in _HASH.finditer(raw):
        pass
    if last is not None:
        return last.group("ans").strip()
    number = None
    for number in _NUMBER.finditer(raw):
        pass
    return number.group(0).replace(",", "").strip() if number is not None else ""


def normalize(answer: str) -> str:
    """``re.sub(r"[\\s\\.]+$", "", s.strip().lower())`` without the quadratic regex."""
    s = answer.strip().lower()
    if not s or (s[-1] != "." and not s[-1].isspace()):
        return s  # the common case: nothing to trim
    end = len(s)
    while end and (s[end - 1] == "." or s[end - 1].isspace()):
        end -= 1
    return s[:end]


@lru_cache(maxsize=65536)
def _gold(ground_truth: str | None) -> tuple[str, str]:
    """(parsed, normalised) gold; cached because GRPO scores many rollouts per prompt."""
    parsed = parse_gold(ground_truth)
    return parsed, normalize(parsed)


def score(solution_str: str, ground_truth: str | None) -> dict[str, Any]:
    parsed = parse_completion(solution_str)
    answer_text = ""
    numeric_only = False
    if parsed.has_solution:
        number = _NUMBER.search(parsed.inside)
        if number is not None:
            answer_text = number.group(0).replace(",", "").strip()
            numeric_only = _NUMERIC_ONLY.match(parsed.inside.replace(" ", "")) is not None
    gold_parsed, gold_norm = _gold(ground_truth)
    pred_norm = normalize(answer_text)
    correct = pred_norm == gold_norm
    strict = parsed.has_solution and numeric_only and parsed.trailing == 0
    no_trailing = parsed.trailing == 0
    total = (
        (0.6 if correct else 0.0)
        + (0.15 if strict else 0.0)
        + (0.1 if parsed.thinking else 0.0)
        + (0.1 if parsed.has_solution else 0.0)
        + (0.05 if no_trailing else 0.0)
    )
    return {
        "score": total,
        "route": "gsm8k",
        "answer_text": answer_text,
        "gold_parsed": gold_parsed,
        "pred_norm": pred_norm,
        "gold_norm": gold_norm,
        "correct": correct,
        "strict": strict,
        "thinking": parsed.thinking,
        "answer": parsed.has_solution,
        "is_numeric_only": numeric_only,
        "trailing": parsed.trailing,
        "no_trailing": no_trailing,
        "timed_out": False,
        "reason": "",
    }
