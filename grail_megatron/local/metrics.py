"""Step metrics under verl's names, logged through verl's own `Tracking`, plus a console table.

The batch is packed into verl's `DataProto` with verl's key names so that verl's metric
functions (`compute_data_metrics`, `compute_timing_metrics`, `compute_throughout_metrics`,
`calculate_debug_metrics` for the rollout/actor mismatch) produce exactly the keys a verl
run logs: `critic/score/mean`, `response_length/mean`, `actor/pg_loss`, `actor/pg_clipfrac`,
`training/rollout_probs_diff_mean`, `timing_s/step`, ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

# The per-step table: (column title, metric key, format).
TABLE_COLUMNS = (
    ("step", "training/global_step", "{:.0f}"),
    ("reward", "critic/score/mean", "{:.3f}"),
    ("correct", "reward/correct/mean", "{:.3f}"),
    ("format", "reward/format/mean", "{:.3f}"),
    ("loss", "actor/pg_loss", "{:+.4f}"),
    ("clipfrac", "actor/pg_clipfrac", "{:.3f}"),
    ("kl", "actor/kl_loss", "{:.4f}"),
    ("mismatch", "training/rollout_probs_diff_mean", "{:.1e}"),
    ("resp_len", "response_length/mean", "{:.1f}"),
    ("time_s", "timing_s/step", "{:.1f}"),
)


def to_data_proto(tensors: dict[str, torch.Tensor], global_token_num: list[int]):
    from verl import DataProto

    return DataProto.from_dict(tensors=tensors, meta_info={"global_token_num": global_token_num})


# GRAIL's 0/1 components: correctness (first name present wins) and format (mean of those present).
CORRECT_COMPONENTS = ("correct", "acc", "pass_rate")
FORMAT_COMPONENTS = ("strict", "thinking", "answer", "has_answer", "no_trailing")


def reward_component_metrics(components: dict[str, list[float]]) -> dict[str, float]:
    """`reward/<component>/mean` for every numeric component the reward returned, plus the
    table's summaries `reward/correct/mean` and `reward/format/mean`."""
    metrics = {f"reward/{key}/mean": sum(values) / len(values) for key, values in components.items() if values}
    correct = [f"reward/{k}/mean" for k in CORRECT_COMPONENTS if f"reward/{k}/mean" in metrics]
    if correct:
        metrics["reward/correct/mean"] = metrics[correct[0]]
    present = [f"reward/{k}/mean" for k in FORMAT_COMPONENTS if f"reward/{k}/mean" in metrics]
    if present:
        metrics["reward/format/mean"] = sum(metrics[k] for k in present) / len(present)
    return metrics


def batch_metrics(batch, timing_raw: dict[str, float], n_ranks: int) -> dict[str, float]:
    from verl.trainer.ppo.metric_utils import (
        compute_data_metrics,
        compute_throughout_metrics,
        compute_timing_metrics,
    )
    from verl.utils.debug.metrics import calculate_debug_metrics

    metrics = compute_data_metrics(batch, use_critic=False)
    metrics.update(compute_timing_metrics(batch, timing_raw))
    metrics.update(compute_throughout_metrics(batch, timing_raw, n_ranks))
    if "rollout_log_probs" in batch.batch and "old_log_probs" in batch.batch:
        metrics.update(calculate_debug_metrics(batch))
    return {k: float(v) for k, v in metrics.items()}


@dataclass
class MetricLogger:
    """verl's `Tracking` (console / tensorboard / wandb) on rank 0 plus the per-step table."""

    project_name: str
    experiment_name: str
    backends: tuple[str, ...]
    log_dir: str
    config: dict | None = None
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        from verl.utils.tracking import Tracking

        # Defaults that keep a CPU run self-contained; explicit environment settings win.
        os.environ.setdefault("TENSORBOARD_DIR", os.path.join(self.log_dir, "tensorboard"))
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", self.log_dir)
        os.makedirs(self.log_dir, exist_ok=True)
        # verl's console backend prints every metric on one line; the table below replaces it.
        self._console = "console" in self.backends
        backends = [b for b in self.backends if b != "console"]
        self.tracking = Tracking(self.project_name, self.experiment_name, backends or [], config=self.config)
        self._printed_header = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.history.append(dict(metrics))
        self.tracking.log(metrics, step=step)
        if self._console:
            self._print_row(metrics)

    def _print_row(self, metrics: dict[str, float]) -> None:
        cells = []
        for title, key, fmt in TABLE_COLUMNS:
            value = metrics.get(key)
            text = "-" if value is None else fmt.format(value)
            cells.append(f"{text:>{max(len(title), 8)}}")
        if not self._printed_header:
            print(" ".join(f"{title:>{max(len(title), 8)}}" for title, _, _ in TABLE_COLUMNS), flush=True)
            self._printed_header = True
        print(" ".join(cells), flush=True)

    def finish(self) -> None:
        self.tracking.finish()
