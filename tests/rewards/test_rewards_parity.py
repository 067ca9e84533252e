"""Every public parity case: the score is the reference's float (==) and components agree."""
from __future__ import annotations

import pytest

from grail_megatron.rewards import compute_score, compute_score_batch
from rewards_cases import load_parity_cases

CASES = load_parity_cases()
TEXT_CASES = [case for case in CASES if case["components"].get("route") != "mbpp"]
MBPP_CASES = [case for case in CASES if case["components"].get("route") == "mbpp"]


def _assert_matches(case: dict, result: dict) -> None:
    assert result["score"] == case["expected_score"], (case["id"], case["note"], result)
    for key, expected in case["components"].items():
        assert result[key] == expected, (case["id"], key, expected, result[key])
    assert isinstance(result["timed_out"], bool) and isinstance(result["reason"], str)


def test_corpus_covers_all_families():
    assert {c["components"]["route"] for c in CASES} == {"gsm8k", "math", "mbpp", "unknown"}
    assert len(TEXT_CASES) + len(MBPP_CASES) == len(CASES) >= 40


@pytest.mark.parametrize("case", TEXT_CASES, ids=[c["id"] for c in TEXT_CASES])
def test_gsm8k_math_and_routing_parity(case):
    _assert_matches(case, compute_score(case["data_source"], case["solution_str"], case["ground_truth"]))


def test_mbpp_parity_through_the_batch_api(sandbox_pool):
    items = [
        {"data_source": c["data_source"], "solution_str": c["solution_str"], "ground_truth": c["ground_truth"]}
        for c in MBPP_CASES
    ]
    results = compute_score_batch(items, max_workers=2, sandbox=sandbox_pool)
    assert len(results) == len(MBPP_CASES)
    for case, result in zip(MBPP_CASES, results):
        _assert_matches(case, result)


def test_math_parity_through_the_batch_api_on_a_cold_cache(monkeypatch):
    """The batch's sympy prefetch (every worker, answers streamed) on an empty verdict
    cache gives every MATH case the reference's score and components."""
    from grail_megatron.rewards import sympy_worker

    cases = [case for case in TEXT_CASES if case["components"].get("route") == "math"]
    checker = sympy_worker.SympyChecker(workers=2)
    monkeypatch.setattr(sympy_worker, "_DEFAULT", checker)

    def one_by_one(*args):
        raise AssertionError(f"asked one by one: {args}")

    monkeypatch.setattr(checker, "_ask", one_by_one)  # every verdict must come from the prefetch
    try:
        items = [{key: case[key] for key in ("data_source", "solution_str", "ground_truth")} for case in cases]
        results = compute_score_batch(items, max_workers=2)
        for case, result in zip(cases, results):
            _assert_matches(case, result)
        assert len(checker._cache) > 40
    finally:
        checker.close()
