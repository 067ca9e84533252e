"""The local loop's actor is verl's own: `LocalPolicy` (verl's workers and Megatron engine in the
torchrun rank, no Ray) at TP2, PP2 and DP2 on 2 gloo ranks, against Hugging Face.

One tiny Qwen2 (vocab 296), one right-padded batch of 4 rows (prompt 4, response 4, one padded
response token), the composed `model_preset=tiny cluster=cpu` config (rollout temperature 0.7,
token-mean). Per layout, in process: verl's old-log-prob pass (log-probs + entropy), the weight
export to the rollout, one `update_actor` with old log-probs = those log-probs (ratio 1), the
log-probs again. Ground truth: the HF model in fp32 in this process. verl's engine keeps bf16
parameters (its McoreEngineConfig accepts bf16/fp16 only), so the bound is bf16's.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from grail_megatron.megatron.spawn import RankPool

pytestmark = [pytest.mark.multiproc, pytest.mark.filterwarnings("ignore")]

WORKER_ENV = {"VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": "grail_megatron.workers.plugins",
              "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
TEMPERATURE = 0.7
ROWS, PROMPT, RESPONSE = 4, 4, 4
ADVANTAGES = [1.0, -1.0, 0.5, 0.25]  # one per row; token mean over the 15 response tokens: 2/15
# bf16 weights and activations, fp32 softmax: measured 2.2e-3 on log-probs of about -6
BF16_BOUND = 1e-2
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (ROWS, PROMPT + RESPONSE), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -1:] = 0
    ids[0, -1] = 0  # the padded slot holds the pad id, as the rollout writes it
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                prompts=ids[:, :PROMPT].clone(), responses=ids[:, PROMPT:].clone(),
                response_mask=mask[:, PROMPT:].clone())


def advantages() -> torch.Tensor:
    return torch.tensor(ADVANTAGES).unsqueeze(1).expand(ROWS, RESPONSE).clone()


def task_policy(model_dir, tp, pp):
    import verl  # noqa: F401  (loads VERL_USE_EXTERNAL_MODULES, as the local worker does)
    from megatron.core import parallel_state

    from grail_megatron.local.policy import LocalPolicy

    cfg = _config(model_dir, tp, pp)
    policy = LocalPolicy(cfg, total_training_steps=10)
    try:
        b = batch()
        out = {"dp": parallel_state.get_data_parallel_world_size()}
        first = policy.compute_log_prob(b)
        out["log_probs"], out["entropy"] = first["log_probs"], first["entropy"]
        out["export"] = {name: tensor.float().clone() for name, tensor in policy.export_weights()}
        out["metrics"] = policy.update_actor({**b, "old_log_probs": first["log_probs"], "advantages": advantages()})
        out["after"] = policy.compute_log_prob(b)["log_probs"]
        return out
    finally:
        parallel_state.destroy_model_parallel()


def _config(model_dir, tp, pp):
    from grail_megatron.config import compose

    return compose(["model_preset=tiny", "cluster=cpu", f"actor_rollout_ref.model.path={model_dir}",
                    f"actor_rollout_ref.rollout.temperature={TEMPERATURE}", "actor_rollout_ref.rollout.n=1",
                    f"actor_rollout_ref.actor.ppo_mini_batch_size={ROWS}",
                    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
                    "actor_rollout_ref.actor.optim.lr=0.01",
                    f"actor_rollout_ref.actor.megatron.tensor_model_parallel_size={tp}",
                    f"actor_rollout_ref.actor.megatron.pipeline_model_parallel_size={pp}"])


def _update(policy):
    b = batch()
    old = policy.compute_log_prob(b)["log_probs"]
    return policy.update_actor({**b, "old_log_probs": old, "advantages": advantages()})


def _adam_steps(policy) -> list[float]:
    optimizer = policy.actor.actor.engine.optimizer
    return sorted({float(state["step"]) for inner in getattr(optimizer, "chained_optimizers", [optimizer])
                   for state in inner.optimizer.state.values()})


def task_resume(model_dir, ckpt_dir, remove_adjustment):
    """Two updates, checkpoint, a third update; then a fresh engine loads the checkpoint and
    makes the third update again. Returns (weights equal, Adam steps after the resumed update)."""
    import verl  # noqa: F401
    from megatron.core import parallel_state

    from grail_megatron.local.policy import LocalPolicy
    from grail_megatron.megatron import mbridge_compat

    cfg = _config(model_dir, 2, 1)
    first = LocalPolicy(cfg, total_training_steps=10)
    _update(first)
    _update(first)
    first.save_checkpoint(ckpt_dir, 2)
    _update(first)
    uninterrupted = {name: t.float().clone() for name, t in first.export_weights()}
    parallel_state.destroy_model_parallel()
    resumed = LocalPolicy(cfg, total_training_steps=10)
    with mbridge_compat.without("adam_step_on_resume") if remove_adjustment else contextlib.nullcontext():
        resumed.load_checkpoint(ckpt_dir)
    _update(resumed)
    again = {name: t.float().clone() for name, t in resumed.export_weights()}
    steps = _adam_steps(resumed)
    parallel_state.destroy_model_parallel()
    return all(torch.equal(uninterrupted[k], again[k]) for k in uninterrupted), steps


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from grail_megatron.models.tiny import make_tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("local_policy")
    train_tokenizer([f"What is {a} + {b}? {a + b}" for a in range(10) for b in range(10)], root / "tok")
    return str(make_tiny_model(root / "model", tokenizer_dir=root / "tok", hidden=32, layers=2, heads=2,
                               kv_heads=1, vocab_size=296))


@pytest.fixture(scope="module")
def results(model_dir, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("resume")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in WORKER_ENV.items():
            mp.setenv(key, value)
        with RankPool(world_size=2) as pool:
            out = {name: pool.run(task_policy, model_dir, tp, pp) for name, (tp, pp) in LAYOUTS.items()}
            out["resume"] = pool.run(task_resume, model_dir, str(ckpt / "with" / "actor"), False)
            out["resume_without"] = pool.run(task_resume, model_dir, str(ckpt / "without" / "actor"), True)
            return out


@pytest.fixture(scope="module")
def hf(model_dir):
    """log-probs and entropy of the HF model in fp32 (temperature-scaled, as verl's actor)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    b = batch()
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits.float() / TEMPERATURE
    logp = torch.log_softmax(logits, -1)[:, PROMPT - 1:-1]
    mask = b["response_mask"]
    return {"log_probs": logp.gather(-1, b["responses"][..., None])[..., 0] * mask,
            "entropy": -(logp.exp() * logp).sum(-1) * mask, "state": model.state_dict(), "tied": model.config.tie_word_embeddings}


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def test_every_rank_gets_the_whole_batch_and_dp2_is_data_parallel(results):
    assert results["dp2"][0]["dp"] == 2 and results["tp2"][0]["dp"] == 1
    for name, ranks in ((name, results[name]) for name in LAYOUTS):
        assert ranks[0]["log_probs"].shape == (ROWS, RESPONSE), name
        assert torch.equal(ranks[0]["log_probs"], ranks[1]["log_probs"]), name


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_log_probs_and_entropy_match_hf_within_bf16(results, hf, name):
    r = results[name][0]
    assert max_diff(r["log_probs"], hf["log_probs"]) < BF16_BOUND
    assert max_diff(r["entropy"], hf["entropy"]) < BF16_BOUND
    assert float(r["log_probs"][0, -1]) == 0.0  # the padded slot


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_weight_export_is_the_loaded_hf_model_in_bf16(results, hf, name):
    export = results[name][0]["export"]
    expected = {k: v for k, v in hf["state"].items() if not (hf["tied"] and k == "lm_head.weight")}
    assert set(export) - {"lm_head.weight"} == set(expected) - {"lm_head.weight"}
    for key, value in expected.items():
        assert torch.equal(export[key], value.to(torch.bfloat16).float()), key


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_update_of_step_1_is_the_closed_form_and_moves_the_policy(results, name):
    """Old log-probs = current ones: ratio 1, so verl's token-mean pg_loss = -mean(advantages)."""
    r = results[name][0]
    mask = batch()["response_mask"].float()
    expected = float(-(advantages() * mask).sum() / mask.sum())
    assert abs(expected + 2 / 15) < 1e-7
    assert abs(r["metrics"]["actor/pg_loss"] - expected) < 1e-6, r["metrics"]
    assert r["metrics"]["actor/ppo_kl"] == 0.0 and r["metrics"]["actor/pg_clipfrac"] == 0.0
    assert r["metrics"]["actor/grad_norm"] > 0 and r["metrics"]["actor/lr"] == pytest.approx(0.01)
    assert max_diff(r["after"], r["log_probs"]) > 1e-3  # the update changed the weights


def test_layouts_agree_on_the_gradient_to_bf16_precision(results):
    norms = {name: results[name][0]["metrics"]["actor/grad_norm"] for name in LAYOUTS}
    assert max(norms.values()) - min(norms.values()) < 1e-2 * max(norms.values()), norms


def test_a_resumed_update_is_bitwise_the_uninterrupted_one(results):
    """verl's checkpoint of step 2 restores the optimizer exactly: the resumed third update
    gives the uninterrupted run's weights bit for bit, with Adam at step 3."""
    for equal, steps in results["resume"]:
        assert equal and steps == [3.0]


def test_without_the_adam_step_adjustment_the_resume_is_off(results):
    """mbridge_compat.adam_step_on_resume: without it every parameter state shares the template's
    step tensor, which each parameter's update increments (Adam's bias correction is wrong)."""
    for equal, steps in results["resume_without"]:
        assert not equal
        assert steps != [3.0] and len(steps) == 1 and steps[0] > 3.0, steps
