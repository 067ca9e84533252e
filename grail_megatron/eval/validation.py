"""Validation during training: sample, score with GRAIL's rewards, return `val/` metrics.

The local GRPO loop calls `evaluate` at `trainer.test_freq` (and before training when
`trainer.val_before_train`); the standalone `grail-megatron eval` uses the same pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from grail_megatron.eval.generation import Messages, task_seed
from grail_megatron.eval.metrics import success_threshold, summarize_by_source

# (prompts, n, seeds) -> n completion strings per prompt; seeds has one entry per prompt
GenerateFn = Callable[[list[Messages], int, list[int]], list[list[str]]]


@dataclass
class TaskResult:
    """All samples of one task with their rewards (one line of the eval JSONL)."""

    task: str
    data_source: str
    completions: list[str]
    rewards: list[float]
    successes: list[bool]

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "data_source": self.data_source,
            "rewards": self.rewards,
            "successes": self.successes,
            "completions": self.completions,
        }


def task_key(row: Mapping[str, Any], position: int) -> str:
    """`split/index` from verl's extra_info (stable across runs), else the row's position."""
    extra = row.get("extra_info") or {}
    if "split" in extra and "index" in extra:
        return f"{extra['split']}/{extra['index']}"
    return str(position)


def score_tasks(
    rows: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    completions: Sequence[Sequence[str]],
    max_workers: int | None = None,
) -> list[TaskResult]:
    """Score every completion with `compute_score_batch` and group the rewards per task."""
    from grail_megatron.rewards import compute_score_batch

    items = [
        {
            "data_source": row["data_source"],
            "solution_str": text,
            "ground_truth": row["reward_model"]["ground_truth"],
            "extra_info": row.get("extra_info"),
        }
        for row, texts in zip(rows, completions, strict=True)
        for text in texts
    ]
    scores = iter(compute_score_batch(items, max_workers=max_workers))
    results = []
    for row, key, texts in zip(rows, keys, completions, strict=True):
        rewards = [float(next(scores)["score"]) for _ in texts]
        threshold = success_threshold(row["data_source"])
        results.append(TaskResult(key, row["data_source"], list(texts), rewards, [r >= threshold for r in rewards]))
    return results


def metrics_of(results: Iterable[TaskResult], ks: Iterable[int], prefix: str = "") -> dict[str, float]:
    return summarize_by_source(((r.data_source, r.task, r.rewards) for r in results), ks, prefix=prefix)


def metrics_from_samples(
    data_sources: Sequence[str],
    task_ids: Sequence[Any],
    scores: Sequence[float],
    ks: Sequence[int],
    prefix: str = "val/",
) -> dict[str, float]:
    """The same metrics from flat per-sample lists, as verl's validation step has them
    (`data_source`, the prompt `uid`, the reward score of every sample).

    For a verl trainer hook: call it with the validation batch's lists and merge the result
    into the step's metrics. Samples of one task keep their order of appearance.
    """
    if not len(data_sources) == len(task_ids) == len(scores):
        raise ValueError(f"lists differ in length: {len(data_sources)}, {len(task_ids)}, {len(scores)}")
    groups: dict[tuple[str, str], list[float]] = {}
    for source, task, score in zip(data_sources, task_ids, scores, strict=True):
        groups.setdefault((source, str(task)), []).append(float(score))
    return summarize_by_source(((s, t, r) for (s, t), r in groups.items()), ks, prefix=prefix)


def evaluate(
    generate_fn: GenerateFn,
    rows: Sequence[Mapping[str, Any]],
    samples: int,
    ks: Sequence[int],
    seed: int,
    *,
    prefix: str = "val/",
    batch_size: int = 16,
    max_workers: int | None = None,
) -> dict[str, float]:
    """Sample `samples` completions for every row, score them, return prefixed k-metrics.

    `rows` are verl records (`data_source`, `prompt`, `reward_model.ground_truth`,
    `extra_info`), e.g. `pyarrow.parquet.read_table(val_file).to_pylist()`. Keys look like
    `val/grail_gsm8k/pass@1`; see `grail_megatron.eval.metrics` for the metric names.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not ks or min(ks) < 1 or max(ks) > samples:
        raise ValueError(f"every k must be in 1..samples={samples}, got {list(ks)}")
    keys = [task_key(row, i) for i, row in enumerate(rows)]
    results: list[TaskResult] = []
    for start in range(0, len(rows), batch_size):
        batch_rows = rows[start : start + batch_size]
        batch_keys = keys[start : start + batch_size]
        prompts = [list(row["prompt"]) for row in batch_rows]
        completions = generate_fn(prompts, samples, [task_seed(seed, k) for k in batch_keys])
        if len(completions) != len(prompts) or any(len(c) != samples for c in completions):
            raise ValueError(f"generate_fn must return {samples} completions for each of {len(prompts)} prompts")
        results.extend(score_tasks(batch_rows, batch_keys, completions, max_workers=max_workers))
    return metrics_of(results, ks, prefix=prefix)
