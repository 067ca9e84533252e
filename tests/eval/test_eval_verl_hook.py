"""The verl validation hook, mixed into verl's real v1 trainer class (its metric method runs
for real; the trainer is not constructed because that needs Ray and GPUs)."""

import pytest
from omegaconf import OmegaConf

from grail_megatron.eval.metrics import derive_ks
from grail_megatron.eval.verl_hook import GrailValidationMetrics


def test_derive_ks_matches_grail():
    assert derive_ks(1) == [1]
    assert derive_ks(3) == [1, 3]
    assert derive_ks(5) == [1, 5]
    assert derive_ks(16) == [1, 5, 10, 16]


def test_hook_adds_val_metrics_next_to_verls_own():
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    class Trainer(GrailValidationMetrics, PPOTrainerSync):
        pass

    trainer = object.__new__(Trainer)  # only `config` is read by the metric step
    trainer.config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"val_kwargs": {"n": 2}}}})
    sources = ["grail_gsm8k"] * 4 + ["grail_math"] * 2
    uids = ["a", "a", "b", "b", "m", "m"]
    rewards = [1.0, 0.4, 0.4, 0.4, 0.75, 0.1]
    metrics = trainer._val_metrics_update(sources, uids, {"reward": rewards}, [1] * 6)

    assert metrics["val-core/grail_gsm8k/reward/mean@2"] == pytest.approx(0.55)  # verl's, kept
    assert metrics["val/grail_gsm8k/pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert metrics["val/grail_gsm8k/pass@2"] == pytest.approx(0.5)
    assert metrics["val/grail_math/pass@2"] == 1.0  # 0.75 >= 0.7
    assert metrics["val/grail_math/best@1"] == 0.75 and metrics["val/grail_math/tasks"] == 1
