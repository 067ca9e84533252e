"""GRAIL's k-metrics over groups of sampled completions (one group per task).

Names and definitions follow GRAIL's `KMetricsAggregator` (grail/trainer/metrics.py), so runs
compare one to one with GRAIL's W&B panels:

- `pass@k`: unbiased estimator (Chen et al. 2021), 1 - C(n-c, k) / C(n, k), task-averaged;
  c = samples with reward >= the dataset's success threshold.
- `pass_ordered@k`: any success among the first k samples (order-sensitive diagnostic).
- `mean@k` / `best@k`: mean / max reward of the first k samples, task-averaged.
- `reward_mean_all`, `reward_std_all` (population), `success_rate_all`: over all samples.
- `reward_mean_taskavg_all`, `success_rate_taskavg_all`: per task first, then averaged.
- `tasks`, `replicates`: counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

# GRAIL's success thresholds: the correctness weight of each reward.
SUCCESS_THRESHOLDS = {"gsm8k": 0.6, "math": 0.7, "mbpp": 0.7}


def success_threshold(data_source: str) -> float:
    """Threshold for a data source, routed like the rewards (first of gsm8k, math, mbpp)."""
    lowered = data_source.lower()
    for family, threshold in SUCCESS_THRESHOLDS.items():
        if family in lowered:
            return threshold
    raise ValueError(
        f"no success threshold for data_source {data_source!r}; expected one containing {tuple(SUCCESS_THRESHOLDS)}"
    )


def derive_ks(samples: int) -> list[int]:
    """GRAIL's reported k values for `samples` completions per task: 1, 5, 10 and n, capped at n."""
    n = max(1, int(samples))
    return sorted({1, min(5, n), min(10, n), n})


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one task: n samples, c of them successful."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    # exact big-integer ratio: no overflow or cancellation even for n in the thousands
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_at_k(rewards: Sequence[float], k: int) -> float:
    _check_prefix(rewards, k)
    return sum(rewards[:k]) / k


def best_at_k(rewards: Sequence[float], k: int) -> float:
    _check_prefix(rewards, k)
    return max(rewards[:k])


def _check_prefix(rewards: Sequence[float], k: int) -> None:
    if not 1 <= k <= len(rewards):
        raise ValueError(f"need 1 <= k <= {len(rewards)} samples, got k={k}")


def summarize(groups: Mapping[str, Sequence[float]], threshold: float, ks: Iterable[int]) -> dict[str, float]:
    """All k-metrics for `groups` (task id -> rewards in sample order).

    Every task must have at least max(ks) samples; an empty `groups` gives {}.
    """
    ks = sorted(set(ks))
    if not groups:
        return {}
    smallest = min(len(r) for r in groups.values())
    if not ks or ks[0] < 1 or ks[-1] > smallest:
        raise ValueError(f"every k must be in 1..{smallest} (the fewest samples of any task), got {ks}")

    out: dict[str, float] = {}
    tasks = len(groups)
    successes = {task: [r >= threshold for r in rewards] for task, rewards in groups.items()}
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(len(s), sum(s), k) for s in successes.values()) / tasks
        out[f"pass_ordered@{k}"] = sum(any(s[:k]) for s in successes.values()) / tasks
        out[f"mean@{k}"] = sum(mean_at_k(r, k) for r in groups.values()) / tasks
        out[f"best@{k}"] = sum(best_at_k(r, k) for r in groups.values()) / tasks

    flat = [r for rewards in groups.values() for r in rewards]
    flat_success = [s for task in successes.values() for s in task]
    mean = sum(flat) / len(flat)
    out["reward_mean_all"] = mean
    out["reward_std_all"] = math.sqrt(sum((r - mean) ** 2 for r in flat) / len(flat))
    out["success_rate_all"] = sum(flat_success) / len(flat_success)
    out["reward_mean_taskavg_all"] = sum(sum(r) / len(r) for r in groups.values()) / tasks
    out["success_rate_taskavg_all"] = sum(sum(s) / len(s) for s in successes.values()) / tasks
    out["tasks"] = float(tasks)
    out["replicates"] = float(len(flat))
    return out


def summarize_by_source(
    results: Iterable[tuple[str, str, Sequence[float]]], ks: Iterable[int], prefix: str = ""
) -> dict[str, float]:
    """Metrics per data source from (data_source, task id, rewards) triples.

    Keys are `f"{prefix}{data_source}/{metric}"`, e.g. `val/grail_gsm8k/pass@1`.
    """
    by_source: dict[str, dict[str, Sequence[float]]] = {}
    for source, task, rewards in results:
        by_source.setdefault(source, {})[task] = rewards
    ks = list(ks)
    out = {}
    for source in sorted(by_source):
        metrics = summarize(by_source[source], success_threshold(source), ks)
        out.update({f"{prefix}{source}/{name}": value for name, value in metrics.items()})
    return out
