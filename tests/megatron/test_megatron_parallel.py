"""Megatron model layer on 2 gloo ranks: bridge, log-probs, GRPO loss and one optimiser step.

One pool of 2 ranks serves the whole module; every task re-initialises Megatron's parallel
groups with its own TP/PP (TP1 here means 2 data-parallel replicas). References are computed
in this (pytest) process with the Hugging Face model and verl's core_algos.
"""

import pytest
import torch

from grail_megatron.megatron.spawn import RankPool
from grail_megatron.models.tiny import make_tiny_model, train_tokenizer

pytestmark = pytest.mark.multiproc

TEXTS = [
    f"What is {a} + {b}? <start_working_out>{a} + {b} = {a + b}</end_working_out>"
    f"<SOLUTION>{a + b}</SOLUTION>"
    for a in range(10)
    for b in range(10)
]
P, R = 7, 5  # prompt / response widths of the test batch
TOL = 1e-5


# ----------------------------------------------------------------------------- rank tasks
def _init(tp, pp, vpp=None):
    from grail_megatron.megatron import parallel

    parallel.initialize(tp, pp, seed=0, vpp=vpp)


def task_logprobs(model_dir, batch, tp, pp, vpp=None, micro=2, temperature=1.0):
    from grail_megatron.megatron.bridge import Bridge
    from grail_megatron.megatron.logprobs import token_logprobs

    _init(tp, pp, vpp)
    bridge = Bridge.from_pretrained(model_dir)
    models = bridge.build_models()
    bridge.load_hf_weights(models, model_dir)
    return token_logprobs(models, batch, bridge.vocab_size, micro, temperature)


def task_logits(model_dir, input_ids, tp):
    """Full (TP-gathered, unpadded) logits of a PP1 model."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from grail_megatron.megatron.bridge import Bridge

    _init(tp, 1)
    bridge = Bridge.from_pretrained(model_dir)
    models = bridge.build_models()
    bridge.load_hf_weights(models, model_dir)
    pos = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    with torch.no_grad():
        out = models[0](input_ids=input_ids, position_ids=pos, attention_mask=None)
    full = gather_from_tensor_model_parallel_region(out)
    return full.shape[-1], full[..., : bridge.vocab_size]


def task_export(model_dir, tp, pp, out_dir):
    from grail_megatron.megatron.bridge import Bridge

    _init(tp, pp)
    bridge = Bridge.from_pretrained(model_dir)
    models = bridge.build_models()
    bridge.load_hf_weights(models, model_dir)
    names = [name for name, _ in bridge.export_hf_weights(models)]
    state = bridge.export_state_dict(models)
    bridge.save_hf(models, out_dir, tokenizer_dir=model_dir)
    # refresh a differently initialised HF model in place (the rollout-model update)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(123)
    rollout = AutoModelForCausalLM.from_config(bridge.hf_config)
    copied = bridge.update_hf_model(rollout, models)
    return names, state, copied, {k: v.clone() for k, v in rollout.state_dict().items()}


def task_update(model_dir, batch, tp, pp, config_kwargs):
    from grail_megatron.megatron.actor import ActorConfig, MegatronActor

    _init(tp, pp)
    actor = MegatronActor.from_pretrained(model_dir, ActorConfig(**config_kwargs))
    log_prob = actor.compute_log_prob(batch)
    metrics = actor.update_policy(batch)
    return log_prob, metrics, actor.bridge.export_state_dict(actor.models)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pool():
    with RankPool(world_size=2) as p:
        yield p


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mg")
    train_tokenizer(TEXTS, root / "tok")
    qwen = make_tiny_model(root / "qwen", arch="qwen2", tie_word_embeddings=True,
                           tokenizer_dir=root / "tok", hidden=64, layers=4, heads=4, kv_heads=2)
    # odd vocabulary (one unused row, as real Qwen checkpoints have): TP2 must pad it
    llama = make_tiny_model(root / "llama", arch="llama", tie_word_embeddings=False,
                            tokenizer_dir=root / "tok", hidden=64, layers=4, heads=4, kv_heads=1,
                            vocab_size=295, seed=1)
    return {"qwen": qwen, "llama": llama, "root": root}


def make_batch(vocab, rows=8, seed=1):
    """Left-padded prompts + right-padded responses (one empty response)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, P + R), generator=g)
    mask = torch.ones(rows, P + R, dtype=torch.long)
    prompt_lens = [7, 3, 5, 1, 6, 4, 2, 7][:rows]
    response_lens = [5, 2, 0, 5, 1, 3, 4, 5][:rows]
    for i in range(rows):
        mask[i, : P - prompt_lens[i]] = 0
        mask[i, P + response_lens[i]:] = 0
    ids = ids * mask
    return dict(input_ids=ids, attention_mask=mask, responses=ids[:, P:].clone(),
                response_mask=mask[:, P:].clone())


def hf_logprobs(model, batch, temperature=1.0):
    pos = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=pos).logits.float() / temperature
    lp = torch.log_softmax(logits, -1)[:, P - 1:-1].gather(-1, batch["responses"][..., None])[..., 0]
    return lp * batch["response_mask"]


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path))


# ----------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("name", ["qwen", "llama"])
def test_logprobs_tp2_pp2_vpp_match_tp1_and_hf(pool, models, name):
    batch = make_batch(295 if name == "llama" else 294)
    with torch.no_grad():
        ref = hf_logprobs(load_hf(models[name]), batch, temperature=0.7)
    runs = {
        "tp1": pool.run(task_logprobs, models[name], batch, 1, 1, temperature=0.7),
        "tp2": pool.run(task_logprobs, models[name], batch, 2, 1, temperature=0.7),
        "pp2": pool.run(task_logprobs, models[name], batch, 1, 2, temperature=0.7),
        "pp2vpp2": pool.run(task_logprobs, models[name], batch, 1, 2, vpp=2, temperature=0.7),
    }
    for label, per_rank in runs.items():
        assert torch.equal(per_rank[0], per_rank[1]), f"{label}: ranks disagree"
        assert per_rank[0].shape == (8, R)
        assert (per_rank[0] - runs["tp1"][0]).abs().max() <= TOL, label
        assert (per_rank[0] - ref).abs().max() <= TOL, label
    # masked response slots are exactly zero and real ones are proper log-probs
    lp = runs["tp2"][0]
    assert torch.all(lp[batch["response_mask"] == 0] == 0)
    assert torch.all(lp[batch["response_mask"] == 1] < 0)


# ----------------------------------------------------------------------------- bridge
def test_bridge_logits_match_hf_and_vocab_padding(pool, models):
    ids = make_batch(295)["input_ids"].clamp_min(3)
    padded, logits = pool.run(task_logits, models["llama"], ids, 2)[0]
    assert padded == 296  # 295 rows padded to a multiple of TP=2
    with torch.no_grad():
        ref = load_hf(models["llama"])(ids).logits
    assert (logits - ref).abs().max() <= TOL


@pytest.mark.parametrize("name,tp,pp", [("qwen", 2, 1), ("qwen", 1, 2), ("llama", 2, 1)])
def test_bridge_export_is_exact_and_reloads(pool, models, name, tp, pp):
    from safetensors.torch import load_file

    out = models["root"] / f"export_{name}_{tp}{pp}"
    names, state, copied, rollout = pool.run(task_export, models[name], tp, pp, out)[0]
    original = load_file(models[name] / "model.safetensors")
    assert copied == len(original)
    for key, tensor in original.items():
        assert torch.equal(rollout[key], tensor), key
    if name == "qwen":  # tied: the rollout model's lm_head follows the embedding
        assert torch.equal(rollout["lm_head.weight"], original["model.embed_tokens.weight"])
    assert sorted(names) == sorted(original) and len(names) == len(set(names))
    for key, tensor in original.items():
        assert torch.equal(state[key], tensor), key
    tied = "lm_head.weight" not in original
    assert tied == (name == "qwen")
    reloaded = load_file(out / "model.safetensors")
    assert sorted(reloaded) == sorted(original)
    ids = make_batch(294)["input_ids"].clamp_min(3)
    with torch.no_grad():
        assert torch.equal(load_hf(out)(ids).logits, load_hf(models[name])(ids).logits)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


# ----------------------------------------------------------------------------- GRPO update
UPDATE_CONFIG = dict(lr=1e-4, weight_decay=0.1, clip_grad=1.0, ppo_micro_batch_size_per_gpu=2,
                     clip_ratio_low=0.2, clip_ratio_high=0.28, use_kl_loss=True,
                     kl_loss_coef=0.1, kl_loss_type="low_var_kl", temperature=0.7)


def update_batch(vocab):
    batch = make_batch(vocab)
    g = torch.Generator().manual_seed(7)
    mask = batch["response_mask"].float()
    # old log-probs a bit off the current ones (so ratios are clipped), a distinct reference
    batch["old_log_probs"] = None  # filled per model below
    batch["advantages"] = torch.randn(8, 1, generator=g).expand(8, R) * mask
    batch["noise"] = 0.3 * torch.randn(8, R, generator=g) * mask
    batch["ref_noise"] = 0.2 * torch.randn(8, R, generator=g) * mask
    return batch


@pytest.fixture(scope="module")
def update_runs(pool, models):
    hf = load_hf(models["qwen"])
    batch = update_batch(294)
    with torch.no_grad():
        current = hf_logprobs(hf, batch, UPDATE_CONFIG["temperature"])
    batch["old_log_probs"] = current + batch.pop("noise")
    batch["ref_log_prob"] = current + batch.pop("ref_noise")
    runs = {f"tp{tp}pp{pp}": pool.run(task_update, models["qwen"], batch, tp, pp, UPDATE_CONFIG)
            for tp, pp in [(1, 1), (2, 1), (1, 2)]}
    return batch, runs


def hf_reference_step(model_dir, batch):
    """One step of the same GRPO loss on the HF model with torch.optim.AdamW."""
    from grail_megatron.megatron.actor import ActorConfig, grpo_loss

    config = ActorConfig(**UPDATE_CONFIG)
    model = load_hf(model_dir)
    log_prob = hf_logprobs(model, batch, config.temperature)
    loss, metrics = grpo_loss(log_prob, batch, config.verl_actor_config(),
                              int(batch["response_mask"].sum()), 8, 1)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
    # Megatron's parameter groups: no weight decay on biases and 1-D (norm) weights
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=config.lr, betas=config.betas, eps=config.eps)
    opt.step()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return state, float(grad_norm), metrics


def test_one_optimizer_step_tp2_pp2_match_tp1_and_hf_adamw(update_runs, models):
    batch, runs = update_runs
    ref_state, ref_norm, ref_metrics = hf_reference_step(models["qwen"], batch)
    base_state = runs["tp1pp1"][0][2]
    for label, per_rank in runs.items():
        _, metrics, state = per_rank[0]
        assert per_rank[1][1] == metrics, f"{label}: ranks report different metrics"
        diff = max((state[k] - base_state[k]).abs().max().item() for k in base_state)
        assert diff <= TOL, f"{label} vs TP1: {diff}"
        hf_diff, key = max(((state[k] - ref_state[k]).abs().max().item(), k) for k in state)
        assert hf_diff <= TOL, f"{label} vs HF AdamW: {hf_diff} ({key})"
        assert metrics["actor/grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
        assert metrics["actor/lr"] == UPDATE_CONFIG["lr"]
    # the step really changed the weights (a no-op update would pass the comparisons above)
    from safetensors.torch import load_file

    before = load_file(models["qwen"] / "model.safetensors")
    moved = max((base_state[k] - before[k]).abs().max().item() for k in before)
    assert moved > 5e-5
    assert ref_norm > UPDATE_CONFIG["clip_grad"]  # clipping (the CPU replacement) was exercised


def test_grpo_loss_equals_verl_core_algos(update_runs):
    """pg_loss / kl_loss / clip fractions from the Megatron path vs core_algos on full tensors."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo import core_algos

    batch, runs = update_runs
    log_prob, metrics, _ = runs["tp2pp1"][0]
    mask = batch["response_mask"].bool()
    config = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
                               "clip_ratio_c": 3.0, "global_batch_info": {}})
    pg_loss, pg_metrics = core_algos.compute_policy_loss_vanilla(
        old_log_prob=batch["old_log_probs"], log_prob=log_prob, advantages=batch["advantages"],
        response_mask=mask, loss_agg_mode="token-mean", config=config)
    kl = core_algos.kl_penalty(log_prob, batch["ref_log_prob"], "low_var_kl")
    kl_loss = core_algos.agg_loss(kl, mask, "token-mean")
    assert metrics["actor/pg_loss"] == pytest.approx(float(pg_loss), abs=1e-6)
    assert metrics["actor/kl_loss"] == pytest.approx(float(kl_loss), abs=1e-6)
    assert metrics["actor/kl_coef"] == UPDATE_CONFIG["kl_loss_coef"]
    assert 0.0 < pg_metrics["actor/pg_clipfrac"] < 1.0  # the case exercises clipping
    # verl averages the clip fraction and ppo_kl over micro batches (TP2: DP1, 4 micro batches
    # of 2 rows): the same statistics per micro batch from core_algos, then their mean
    per_micro = [
        core_algos.compute_policy_loss_vanilla(
            old_log_prob=batch["old_log_probs"][i:i + 2], log_prob=log_prob[i:i + 2],
            advantages=batch["advantages"][i:i + 2], response_mask=mask[i:i + 2],
            loss_agg_mode="token-mean", config=config)[1]
        for i in range(0, 8, 2)
    ]
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        expected = sum(m[key] for m in per_micro) / len(per_micro)
        assert metrics[key] == pytest.approx(expected, abs=1e-6), key
    assert set(metrics) >= {"actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl",
                            "actor/pg_clipfrac_lower", "actor/grad_norm", "actor/lr",
                            "actor/kl_loss", "actor/kl_coef"}
