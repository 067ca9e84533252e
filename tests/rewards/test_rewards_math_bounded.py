"""MATH correctness stays exact where sympy finishes and bounded where it would not."""
from __future__ import annotations

import time

import pytest

from grail_megatron.rewards import compute_score
from grail_megatron.rewards.math_answer import _cannot_parse, answers_equal
from grail_megatron.rewards.sympy_worker import SympyChecker, _sympy_equal, default_checker

BUDGET = 0.5


@pytest.fixture(scope="module")
def checker():
    checker = SympyChecker(budget=BUDGET)
    checker.warmup()
    yield checker
    checker.close()


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


@pytest.mark.parametrize(
    "pred",
    [
        "10**10**10",
        "factorial(10**9)",
        "9**9**9**9",
        "(" * 150 + "x+1" + ")" * 150 + "**10**10",
    ],
)
def test_hanging_sympy_inputs_time_out_within_the_bound(checker, pred):
    (correct, strategy, timed_out, _), elapsed = _timed(answers_equal, pred, "1", checker=checker)
    assert (correct, strategy, timed_out) == (False, "none", True)
    assert elapsed < 1.0
    # The worker was replaced by the warm spare: the next check is fast and right.
    (correct, strategy, timed_out, _), elapsed = _timed(answers_equal, "0.75", "3/4", checker=checker)
    assert (correct, strategy, timed_out) == (True, "symbolic", False)
    assert elapsed < 0.5


def test_deeply_nested_input_is_bounded_and_wrong(checker):
    pred = "-" * 100_000 + "1"
    (correct, _, _, _), elapsed = _timed(answers_equal, pred, "1", checker=checker)
    assert correct is False and elapsed < 1.0


def test_timeouts_are_cached_so_a_repeat_costs_nothing(checker):
    answers_equal("10**10**11", "2", checker=checker)
    kills = checker.timeouts
    (_, _, timed_out, _), elapsed = _timed(answers_equal, "10**10**11", "2", checker=checker)
    assert timed_out is True and elapsed < 0.01 and checker.timeouts == kills


def test_completion_level_result_reports_timeout():
    default_checker().warmup()  # the process-wide worker's start is not part of a call
    text = "<start_working_out>w</end_working_out><SOLUTION>10**10**10</SOLUTION>"
    result, elapsed = _timed(compute_score, "grail_math", text, "1")
    assert elapsed < 1.0
    assert result["timed_out"] is True and result["correct"] is False
    assert result["score"] == 0.0 + 0.15 + 0.1 + 0.05
    result, elapsed = _timed(compute_score, "grail_math", text.replace("10**10**10", "10**10**12"), "1")
    assert result["timed_out"] is True and elapsed < 1.0


def test_a_completion_cannot_tamper_with_later_checks(checker):
    # Against a naive persistent sympy process this makes every later answer "correct".
    attack = "__import__('sympy').__setattr__('simplify',__import__('sympy').sympify(0).__mul__)"
    answers_equal(attack, "1", checker=checker)
    assert answers_equal("1", "2", checker=checker)[0] is False
    assert answers_equal("x+1", "x+2", checker=checker)[0] is False


def test_backslash_answers_never_parse_so_skipping_sympy_is_exact():
    # math_answer skips the worker for LaTeX (a backslash outside quotes): parse_expr
    # raises on all of them, so the reference's sympy strategy is always False there.
    for text in [r"\frac{1}{2}", r"2\sqrt{3}", r"\pi", r"(-\infty,3]", r"\text{(c)}", r"x\\", r"5^\circ"]:
        assert _cannot_parse(text) and _sympy_equal(text, text) is False
    # ... but a backslash in a comment is legal Python: those still go to sympy.
    assert not _cannot_parse("1#\\pi") and _sympy_equal("1#\\pi", "1") is True
    assert answers_equal("1#\\pi", "1")[:2] == (True, "symbolic")


def test_math_verify_is_an_opt_in_departure():
    text = "<start_working_out>w</end_working_out><SOLUTION>0.5</SOLUTION>"
    parity = compute_score("grail_math", text, r"\frac{1}{2}")
    departure = compute_score("grail_math", text, r"\frac{1}{2}", math_verify=True)
    assert (parity["correct"], parity["strategy"], parity["score"]) == (False, "none", 0.3)
    assert (departure["correct"], departure["strategy"], departure["score"]) == (True, "math_verify", 1.0)


def test_check_many_gives_the_verdicts_of_check_one_by_one():
    """The batch path (every worker, answers streamed to the persistent evaluator) decides
    exactly what ``check`` decides alone: timeouts bounded per answer, tampering answers
    in one-shot evaluators that cannot change their neighbours' verdicts."""
    attack = "__import__('sympy').__setattr__('simplify',__import__('sympy').sympify(0).__mul__)"
    keys = [("sympy", pred, gold) for pred, gold in [
        ("0.75", "3/4"), ("10**10**10", "1"), ("x+1", "x+2"), (attack, "1"), ("1", "2"),
        ("sqrt(8)", "2*sqrt(2)"), ("9**9**9**9", "3"), ("(x-1)*(x+1)", "x**2-1"), ("1", "2"),
        ("sin(x)**2+cos(x)**2", "1"), ("__import__('math').pi*0+1", "1"), ("2**10", "1024"),
    ]]
    alone = SympyChecker(budget=BUDGET)
    many = SympyChecker(budget=BUDGET, workers=2)
    try:
        expected = [alone.check(pred, gold, op) for op, pred, gold in keys]
        many.warmup()
        (results, elapsed) = _timed(many.check_many, keys)
        assert results == expected
        assert [r.equal for r in results] == [True, False, False, False, False, True, False, True, False,
                                              True, True, True]
        assert [r.timed_out for r in results] == [False, True] + [False] * 4 + [True] + [False] * 5
        # Bounded per answer (a stuck worker would cost 12 x (budget + slack) = 9 s).
        assert many.timeouts == 2 and elapsed < 6.0
        # Cached: asking again costs nothing.
        assert _timed(many.check_many, keys)[1] < 0.05
    finally:
        alone.close()
        many.close()


def test_cpu_time_of_an_evaluator_is_readable_for_its_recycling():
    """The worker recycles its persistent evaluator at half its RLIMIT_CPU (read from
    /proc/<pid>/stat) rather than let the limit kill it in the middle of a check."""
    import os

    from grail_megatron.rewards.sympy_worker import EVALUATOR_CPU_SECONDS, _cpu_seconds

    sum(i * i for i in range(200_000))
    assert 0 < _cpu_seconds(os.getpid()) < EVALUATOR_CPU_SECONDS * 1000
    assert _cpu_seconds(2**22 + 12345) == 0.0  # gone (or never was): counts as fresh


def test_a_worker_late_for_its_caller_is_kept_when_it_answers():
    """No slack at all: the worker's own kill-and-reply after the budget always comes after
    the caller has given up (as on a loaded machine). The caller still gets its bounded
    "timed out"; the worker is kept once its late reply arrives, so the next check costs a
    check, not a worker start (seconds)."""
    checker = SympyChecker(budget=BUDGET, slack=0.0)
    try:
        checker.warmup()
        [worker] = checker._idle[False]
        (correct, _, timed_out, _), elapsed = _timed(answers_equal, "10**10**10", "1", checker=checker)
        assert (correct, timed_out) == (False, True) and elapsed < 1.0
        (correct, strategy, timed_out, _), elapsed = _timed(answers_equal, "0.75", "3/4", checker=checker)
        assert (correct, strategy, timed_out) == (True, "symbolic", False) and elapsed < 0.5
        assert checker._idle[False] == [worker]
    finally:
        checker.close()
