"""Bad input never raises: it scores with a reason; batches keep order; verl takes the result."""
from __future__ import annotations

import json

import numpy as np
import pytest

from grail_megatron.rewards import compute_score, compute_score_batch
from grail_megatron.rewards.verl_reward import VERL_KEYS

GOOD_GSM8K = "<start_working_out>6*7</end_working_out><SOLUTION>42</SOLUTION>"
GOOD_MBPP = "<start_working_out>x</end_working_out><SOLUTION>def add(a, b):\n    return a + b</SOLUTION>"
MBPP_GT = json.dumps({"test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]})


@pytest.mark.parametrize(
    "data_source, solution, truth, reason_start",
    [
        (None, GOOD_GSM8K, "#### 42", "data_source must be a string, got NoneType"),
        (7, GOOD_GSM8K, "#### 42", "data_source must be a string, got int"),
        ("humaneval", GOOD_GSM8K, "#### 42", "unknown data_source 'humaneval'"),
        ("grail_gsm8k", None, "#### 42", "solution_str must be a string, got NoneType"),
        ("grail_math", b"bytes", "1", "solution_str must be a string, got bytes"),
        ("grail_gsm8k", GOOD_GSM8K, 42, "ground_truth must be a string, got int"),
        ("grail_math", GOOD_GSM8K, None, "ground_truth must be a string, got NoneType"),
    ],
)
def test_rejected_inputs_score_zero_with_a_reason(data_source, solution, truth, reason_start):
    result = compute_score(data_source, solution, truth)
    assert result["score"] == 0.0
    assert result["reason"].startswith(reason_start), result["reason"]


@pytest.mark.parametrize(
    "truth, reason_start, score",
    [
        ("{not json", "ground_truth is not valid JSON", 0.30000000000000004),
        (None, "ground_truth is not valid JSON", 0.30000000000000004),
        ("[1, 2]", "ground_truth JSON must be an object, got list", 0.30000000000000004),
        (json.dumps({"test_list": ["assert True"], "test_imports": 5}),
         "ground_truth test fields are malformed", 0.30000000000000004),
    ],
)
def test_malformed_mbpp_ground_truth_keeps_the_format_terms(truth, reason_start, score):
    result = compute_score("grail_mbpp", GOOD_MBPP, truth)
    assert result["score"] == score  # compiles + format + thinking, as the reference
    assert result["executed"] is False and result["reason"].startswith(reason_start)


def test_gsm8k_none_ground_truth_follows_the_reference():
    # The reference parses `raw or ""`: an empty gold, compared as such.
    result = compute_score("grail_gsm8k", GOOD_GSM8K, None)
    assert result["gold_parsed"] == "" and result["correct"] is False and result["reason"] == ""


def test_batch_keeps_order_and_survives_bad_items(sandbox_pool):
    items = [
        {"data_source": "grail_mbpp", "solution_str": GOOD_MBPP, "ground_truth": MBPP_GT},
        "not a mapping",
        {"data_source": "grail_gsm8k", "solution_str": GOOD_GSM8K, "ground_truth": "#### 42"},
        {"data_source": "grail_mbpp", "solution_str": GOOD_MBPP.replace("a + b", "a - b"), "ground_truth": MBPP_GT},
    ]
    results = compute_score_batch(items, max_workers=2, sandbox=sandbox_pool)
    assert [r["score"] for r in results] == [0.9999999999999999, 0.0, 1.0, 0.6499999999999999]
    assert results[1]["reason"] == "batch item must be a mapping, got str"
    assert results[3]["test_passed"] == [False, True]


def test_verl_schema_is_uniform_across_families_so_a_mixed_batch_aggregates():
    # verl's reward loop takes the keys of the first sample and builds one array per key
    # (importing verl costs ~7 s of CPU, so its two steps are reproduced here).
    from grail_megatron.rewards.verl_reward import compute_score as verl_compute_score

    samples = [
        ("grail_gsm8k", GOOD_GSM8K, "#### 42"),
        ("grail_mbpp", GOOD_MBPP, MBPP_GT),
        ("grail_math", "<SOLUTION>\\frac{1}{2}</SOLUTION>", "\\frac{1}{2}"),
        ("humaneval", GOOD_GSM8K, "#### 42"),
    ]
    outputs = [verl_compute_score(data_source=d, solution_str=s, ground_truth=g, extra_info={}, math_verify=False)
               for d, s, g in samples]
    keys = list(outputs[0])
    assert keys == list(VERL_KEYS)
    arrays = {key: np.array([out[key] for out in outputs]) for key in keys}
    assert all(array.shape == (4,) for array in arrays.values())
    assert arrays["score"].tolist() == [1.0, 0.9999999999999999, 0.9, 0.0]
    assert arrays["acc"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert arrays["bad_input"].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert arrays["route"].tolist() == ["gsm8k", "mbpp", "math", "unknown"]
