"""Our Megatron bridge (the converter's model code) on 2 gloo ranks: logits and HF export.

One pool of 2 ranks serves the whole module; every task re-initialises Megatron's parallel
groups with its own TP/PP. References are computed in this (pytest) process with the Hugging
Face model. Training log-probs and updates are verl's engine's: tests/local/test_local_policy.py.
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
    return names, state


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


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path))


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
    names, state = pool.run(task_export, models[name], tp, pp, out)[0]
    original = load_file(models[name] / "model.safetensors")
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
