"""Ground-truth extraction: GSM8K `####`, MATH's first box by brace depth, MBPP test JSON."""

import json
from pathlib import Path

import pytest

from grail_megatron.data import answers
from grail_megatron.data.errors import SkippedRow

# the repository's copy of shared/parity (tests/rewards/data), so a clone tests on its own
PARITY = Path(__file__).resolve().parents[1] / "rewards" / "data" / "grail_rewards_public.jsonl"


@pytest.mark.parametrize(
    ("solution", "gold"),
    [
        ("So $x = \\boxed{5}$.", "5"),
        # nested braces: a regex up to the first } would stop after {1
        ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("$\\boxed{\\sqrt{\\frac{a^{2}}{b}}+1}$ done", "\\sqrt{\\frac{a^{2}}{b}}+1"),
        # several boxes: the first one is the answer
        ("First $\\boxed{3}$, then again $\\boxed{4}$.", "3"),
        # \fbox only when there is no \boxed anywhere, even if it comes first
        ("We get $\\fbox{32}$.", "32"),
        ("Try $\\fbox{1}$; final $\\boxed{2}$.", "2"),
        # escaped set braces come in pairs, so depth counting still closes at the right brace
        ("$\\boxed{(1, \\{2\\})}$", "(1, \\{2\\})"),
    ],
)
def test_first_boxed_by_brace_depth(solution, gold):
    assert answers.first_boxed(solution) == gold


@pytest.mark.parametrize("solution", ["no box here", "$\\boxed{\\frac{1}{2}$", "\\boxed 5", "\\fbox{open"])
def test_missing_or_unclosed_box_is_none(solution):
    assert answers.first_boxed(solution) is None


def test_math_ground_truth_skips_unscorable_solutions():
    assert answers.math_ground_truth("$\\boxed{ 7 }$") == " 7 "  # kept verbatim, as GRAIL does
    with pytest.raises(SkippedRow, match="no complete") as info:
        answers.math_ground_truth("The answer is 7.")
    assert info.value.field == "solution"
    with pytest.raises(SkippedRow, match="empty"):
        answers.math_ground_truth("$\\boxed{}$")


def test_gsm8k_ground_truth_is_the_full_answer():
    full = "3*4=<<3*4=12>>12\n#### 12"
    assert answers.gsm8k_ground_truth(full) == full
    with pytest.raises(SkippedRow, match="####") as info:
        answers.gsm8k_ground_truth("The answer is 12.")
    assert info.value.field == "answer"


def test_mbpp_ground_truth_has_the_exact_shape_of_the_parity_cases():
    cases = [json.loads(line) for line in PARITY.read_text().splitlines()]
    # the parity file also holds malformed ground truths (not JSON, a bare list, a string
    # test_imports) to test the reward's robustness; the well-formed ones are what we write
    mbpp = [c for c in cases if c["family"] == "mbpp" and _well_formed_mbpp(c["ground_truth"])]
    assert len(mbpp) >= 40
    for case in mbpp:
        gold = json.loads(case["ground_truth"])
        rebuilt = answers.mbpp_ground_truth(gold["test_list"], gold["test_setup_code"], gold["test_imports"])
        assert rebuilt == case["ground_truth"]
    with pytest.raises(SkippedRow, match="empty test_list"):
        answers.mbpp_ground_truth([], "", [])


def _well_formed_mbpp(ground_truth: str) -> bool:
    try:
        gold = json.loads(ground_truth)
    except json.JSONDecodeError:
        return False
    return (
        isinstance(gold, dict)
        and set(gold) == {"test_list", "test_setup_code", "test_imports"}
        and all(isinstance(gold[k], list) for k in ("test_list", "test_imports"))
    )


def test_mbpp_question_appends_the_reference_signature():
    code = "import re\r\ndef text_match(text):\r\n  return bool(re.search('ab', text))"
    assert answers.mbpp_question("Match 'ab'.", code) == "Match 'ab'.\n\ndef text_match(text):\n    pass"
    assert answers.mbpp_question("Match 'ab'.", code, with_signature=False) == "Match 'ab'."
    assert answers.mbpp_question("No function.", "x = 1") == "No function."
