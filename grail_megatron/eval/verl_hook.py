"""GRAIL's k-metrics at verl's own validation points (GPU path), without forking verl.

verl 0.9.1's v1 trainer computes its validation metrics in
`PPOTrainerBase._val_metrics_update(data_sources, sample_uids, reward_extra_infos_dict,
sample_turns, ...)`, called by `_validate` before training (`trainer.val_before_train`) and
every `trainer.test_freq` steps. Mixing `GrailValidationMetrics` into the trainer class (as
the first base) keeps verl's metrics and adds ours under `val/<data_source>/...`, computed
from the same per-sample rewards, with k in GRAIL's set for `rollout.val_kwargs.n` samples.
"""

from __future__ import annotations

from typing import Any

from grail_megatron.eval.metrics import derive_ks
from grail_megatron.eval.validation import metrics_from_samples


class GrailValidationMetrics:
    """Mixin for a verl v1 trainer (e.g. `class T(GrailValidationMetrics, PPOTrainerSync)`)."""

    def _val_metrics_update(
        self, data_sources, sample_uids, reward_extra_infos_dict, sample_turns, *args: Any, **kwargs: Any
    ) -> dict[str, float]:
        metrics = super()._val_metrics_update(  # type: ignore[misc]
            data_sources, sample_uids, reward_extra_infos_dict, sample_turns, *args, **kwargs
        )
        scores = reward_extra_infos_dict["reward"]
        samples = int(self.config.actor_rollout_ref.rollout.val_kwargs.n)  # type: ignore[attr-defined]
        metrics.update(metrics_from_samples(list(data_sources), list(sample_uids), scores, derive_ks(samples)))
        return metrics
