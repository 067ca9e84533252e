"""The production path at other layouts: actor PP2 on MBPP (GRAIL's code reward through the
sandbox, inside verl's reward worker) with use_distributed_optimizer=false, and the KL variant with the reference in its own worker
group at another layout than the actor's (actor TP2, reference TP1)."""

from __future__ import annotations

import pytest
from verl_testlib import base_overrides, train

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

# bf16: verl's Megatron engine accepts only bf16/fp16 parameters, so two layouts of the same
# weights (different reduction orders) agree to bf16 precision, not to fp32's 1e-5.
BF16_LOG_PROB_BOUND = 0.05

# GRPO gives a group whose completions all earn the same reward a zero advantage; on MBPP every
# completion of the warm-started model usually earns the same 0.1 compile share, so the policy
# gradient alone can be exactly zero (CI saw grad_norm 0.0). verl's entropy bonus gives every
# update a non-zero gradient whatever the rewards, so "the update ran" stays a fact to assert.
ENTROPY_BONUS = "actor_rollout_ref.actor.entropy_coeff=0.01"


@pytest.fixture(scope="module")
def mbpp_data(sums, tmp_path_factory):
    """The sums prompts as MBPP tasks: GRAIL's MBPP reward (data_source routes on "mbpp") with
    `assert add(a, b) == a + b` tests. The warm-started model answers `<SOLUTION>n</SOLUTION>`,
    code that compiles, so every completion's tests run in the sandbox (and fail: no `add`)."""
    import json

    import pandas as pd

    out = tmp_path_factory.mktemp("mbpp_sums")
    for split, source in (("train", sums.train_file), ("val", sums.val_file)):
        rows = pd.read_parquet(source)
        rows["data_source"] = "grail_mbpp"
        rows["ability"] = "code"
        rows["reward_model"] = [
            {"style": "rule", "ground_truth": json.dumps({
                "test_list": [f"assert add({q.split()[2]}, {q.split()[4].rstrip('?')}) == {gt['ground_truth'][5:]}"],
                "test_setup_code": "", "test_imports": []})}
            for q, gt in zip(rows["extra_info"].map(lambda e: e["question"]), rows["reward_model"])]
        rows.to_parquet(out / f"{split}.parquet")
    return out


def test_pp2_mbpp_through_the_sandbox_without_distributed_optimizer(sums, mbpp_data, tmp_path):
    run = train(tmp_path, base_overrides(
        sums, f"data.train_files=[{mbpp_data / 'train.parquet'}]", f"data.val_files=[{mbpp_data / 'val.parquet'}]",
        "data.val_max_samples=4",
        "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=1",
        "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2",
        # verl's option (our default is true): no flat param buffer; verl's weight export to the
        # rollout used to fail on it (mbridge_compat.no_param_buffer)
        "actor_rollout_ref.actor.megatron.use_distributed_optimizer=false",
        ENTROPY_BONUS, "trainer.total_training_steps=1", "trainer.test_freq=1", "trainer.save_freq=-1")).check()
    step = run.metrics[1]
    assert step["actor/grad_norm"] > 0
    for key in ("critic/score/mean", "actor/pg_loss", "actor/entropy_loss", "timing_s/update_actor"):
        assert key in step
    # code that compiles is run against its tests in the sandbox pool of verl's reward worker
    # (GRAIL's MBPP reward; they fail: no `add`), so it earns the 0.1 compile share only
    assert step["val-aux/grail_mbpp/syntax_valid/mean@5"] > 0
    assert step["val/grail_mbpp/pass@5"] == 0.0


def test_kl_reference_in_its_own_group_at_another_layout(sums, tmp_path):
    run = train(tmp_path, ["--kl", *base_overrides(
        sums, "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
        "actor_rollout_ref.ref.megatron.tensor_model_parallel_size=1",
        "actor_rollout_ref.ref.megatron.pipeline_model_parallel_size=1", ENTROPY_BONUS,
        "trainer.total_training_steps=1", "trainer.test_freq=-1", "trainer.save_freq=-1")]).check()
    step = run.metrics[1]
    # two engines were built, at two layouts (verl prints each engine's TransformerConfig)
    assert "TransformerConfig(tensor_model_parallel_size=2" in run.log
    assert "TransformerConfig(tensor_model_parallel_size=1" in run.log
    drift = step["grail/ref_vs_actor_log_prob/abs_max"]
    assert drift < BF16_LOG_PROB_BOUND, f"reference TP1 vs actor TP2 log-probs differ by {drift}"
    assert step["grail/ref_vs_actor_log_prob/abs_mean"] < BF16_LOG_PROB_BOUND / 10
    assert "actor/kl_loss" in step and abs(step["actor/kl_loss"]) < 1e-3
    assert step["actor/grad_norm"] > 0
