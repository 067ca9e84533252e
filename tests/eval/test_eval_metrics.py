"""k-metrics against hand-computed values."""

import math

import pytest

from grail_megatron.eval.metrics import (
    best_at_k,
    mean_at_k,
    pass_at_k,
    success_threshold,
    summarize,
    summarize_by_source,
)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 0, 1, 0.0),  # c = 0: never
        (5, 0, 5, 0.0),
        (5, 5, 1, 1.0),  # c = n: always
        (5, 5, 3, 1.0),
        (5, 1, 5, 1.0),  # k = n: any success counts
        (5, 2, 1, 0.4),  # c/n for k = 1
        (5, 2, 2, 1 - 3 / 10),  # C(3,2)/C(5,2) = 3/10
        (4, 1, 2, 0.5),  # C(3,2)/C(4,2) = 3/6
        (10, 3, 5, 1 - 21 / 252),  # C(7,5)=21, C(10,5)=252
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15)


def test_pass_at_k_is_exact_for_large_n():
    # 1 - C(1900, 100) / C(2000, 100) computed in logs as an independent check
    log_ratio = sum(math.log((1900 - i) / (2000 - i)) for i in range(100))
    assert pass_at_k(2000, 100, 100) == pytest.approx(1 - math.exp(log_ratio), rel=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 1, 0), (5, 1, 6)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_and_best_over_the_first_k():
    rewards = [0.2, 1.0, 0.1, 0.35]
    assert mean_at_k(rewards, 1) == 0.2
    assert mean_at_k(rewards, 2) == pytest.approx(0.6)
    assert mean_at_k(rewards, 4) == pytest.approx(1.65 / 4)
    assert best_at_k(rewards, 1) == 0.2 and best_at_k(rewards, 4) == 1.0
    with pytest.raises(ValueError, match="1 <= k <= 4"):
        best_at_k(rewards, 5)


def test_thresholds_follow_grail_and_route_like_the_rewards():
    assert success_threshold("grail_gsm8k") == 0.6
    assert success_threshold("grail_math") == 0.7
    assert success_threshold("grail_mbpp") == 0.7
    assert success_threshold("mbpp_math") == 0.7  # "math" is found before "mbpp"
    with pytest.raises(ValueError, match="no success threshold"):
        success_threshold("humaneval")


def test_summarize_two_tasks_by_hand():
    groups = {"a": [1.0, 0.3, 0.7], "b": [0.0, 0.0, 0.65]}
    m = summarize(groups, threshold=0.7, ks=[1, 3])
    # successes: a = [T, F, T] (0.7 >= 0.7 counts), b = [F, F, F] (0.65 < 0.7)
    assert m["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["pass@3"] == pytest.approx((1 + 0) / 2)
    assert m["pass_ordered@1"] == 0.5
    assert m["mean@1"] == pytest.approx(0.5)
    assert m["mean@3"] == pytest.approx((2.0 / 3 + 0.65 / 3) / 2)
    assert m["best@1"] == pytest.approx(0.5) and m["best@3"] == pytest.approx((1.0 + 0.65) / 2)
    flat = [1.0, 0.3, 0.7, 0.0, 0.0, 0.65]
    mean = sum(flat) / 6
    assert m["reward_mean_all"] == pytest.approx(mean)
    assert m["reward_std_all"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in flat) / 6))
    assert m["success_rate_all"] == pytest.approx(2 / 6)
    assert m["tasks"] == 2 and m["replicates"] == 6


def test_task_average_differs_from_sample_average_with_uneven_groups():
    m = summarize({"a": [1.0, 1.0, 1.0, 1.0], "b": [0.0]}, threshold=0.6, ks=[1])
    assert m["success_rate_all"] == pytest.approx(4 / 5)
    assert m["success_rate_taskavg_all"] == pytest.approx(0.5)
    assert m["reward_mean_taskavg_all"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="1..1"):
        summarize({"a": [1.0, 1.0], "b": [0.0]}, threshold=0.6, ks=[2])


def test_summarize_by_source_prefixes_and_uses_each_threshold():
    m = summarize_by_source([("grail_gsm8k", "t1", [0.65]), ("grail_math", "t1", [0.65])], ks=[1], prefix="val/")
    assert m["val/grail_gsm8k/pass@1"] == 1.0  # 0.65 >= 0.6
    assert m["val/grail_math/pass@1"] == 0.0  # 0.65 < 0.7
    assert summarize({}, 0.6, [1]) == {}


def test_metrics_from_flat_samples_group_by_source_and_task():
    from grail_megatron.eval.validation import metrics_from_samples

    sources = ["grail_math", "grail_math", "grail_gsm8k", "grail_math", "grail_gsm8k", "grail_math"]
    uids = ["u1", "u2", "g1", "u1", "g1", "u2"]
    scores = [1.0, 0.2, 0.6, 0.0, 0.1, 0.9]
    m = metrics_from_samples(sources, uids, scores, ks=[1, 2])
    assert m["val/grail_math/pass@2"] == 1.0 and m["val/grail_math/pass@1"] == pytest.approx(0.5)
    assert m["val/grail_math/mean@1"] == pytest.approx((1.0 + 0.2) / 2)  # first sample of u1, u2
    assert m["val/grail_gsm8k/pass@1"] == pytest.approx(0.5) and m["val/grail_gsm8k/tasks"] == 1
    with pytest.raises(ValueError, match="differ in length"):
        metrics_from_samples(sources, uids, scores[:-1], ks=[1])
