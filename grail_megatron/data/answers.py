"""Ground truths in exactly the form GRAIL's rewards read them (DESIGN.md section 6)."""

from __future__ import annotations

import json
import re

from grail_megatron.data.errors import SkippedRow

_GSM8K_FINAL = re.compile(r"####\s*(.+)")


def gsm8k_ground_truth(answer: str) -> str:
    """The full GSM8K answer: the reward takes the last `#### N` itself.

    A row without `####` is skipped: the reward's fallback (the last number of the worked
    solution) is not a gold answer anyone checked.
    """
    if not _GSM8K_FINAL.search(answer):
        raise SkippedRow("gsm8k answer has no '#### <final answer>' line", "answer")
    return answer


def _braced_argument(text: str, open_brace: int) -> str | None:
    """The text between `text[open_brace] == '{'` and its matching `}` (by depth), or None."""
    depth = 0
    for i in range(open_brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : i]
    return None


def first_boxed(solution: str) -> str | None:
    """The argument of the first `\\boxed{...}`, matched by brace depth (not a regex).

    GRAIL reads only `\\boxed{`. A few MATH solutions box their answer with `\\fbox{` and
    no `\\boxed{`; GRAIL's gold is then empty and can never be matched, so we take the first
    `\\fbox{` in that case only. A `\\boxed{` anywhere wins over an earlier `\\fbox{`.
    Returns None when there is no box or its braces never close.
    """
    for command in ("\\boxed{", "\\fbox{"):
        start = solution.find(command)
        if start >= 0:
            return _braced_argument(solution, start + len(command) - 1)
    return None


def math_ground_truth(solution: str) -> str:
    boxed = first_boxed(solution)
    if boxed is None:
        raise SkippedRow("math solution has no complete \\boxed{...}", "solution")
    if not boxed.strip():
        raise SkippedRow("math solution has an empty \\boxed{}", "solution")
    return boxed


def mbpp_ground_truth(test_list: list[str], test_setup_code: str, test_imports: list[str]) -> str:
    """The JSON the MBPP reward parses (key order and separators as GRAIL's json.dumps)."""
    if not test_list:
        raise SkippedRow("mbpp row has an empty test_list", "test_list")
    return json.dumps(
        {"test_list": list(test_list), "test_setup_code": test_setup_code, "test_imports": list(test_imports)}
    )


def mbpp_function_signature(code: str) -> str:
    """The first `def ...:` line of the reference solution (GRAIL's MBPP prompt stub)."""
    for line in code.split("\n"):
        stripped = line.strip()
        if stripped.startswith("def "):
            return stripped
    return ""


def mbpp_question(text: str, code: str, with_signature: bool = True) -> str:
    """GRAIL's MBPP prompt: the task text, then the reference's signature with a `pass` body.

    Without the stub the model must guess the function name the asserts call.
    """
    signature = mbpp_function_signature(code) if with_signature else ""
    return f"{text}\n\n{signature}\n    pass" if signature else text
