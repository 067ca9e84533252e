"""save_checkpoint / load_checkpoint / latest_complete_step on real gloo ranks."""

from __future__ import annotations

import random

import pytest
import torch

from ckpt_testlib import run_ranks, tiny_hf_model
from grail_megatron.checkpoint import CheckpointError, latest_complete_step, verify_step


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_hf_model(tmp_path_factory.mktemp("store") / "qwen2", arch="qwen2", tie=False, layers=2)


def _setup(hf_dir, tp, pp, seed):
    from grail_megatron.megatron import parallel
    from grail_megatron.megatron.bridge import Bridge

    parallel.initialize(tp=tp, pp=pp, seed=seed)
    bridge = Bridge.from_pretrained(hf_dir)
    models = bridge.build_models()
    params = [p for m in models for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    return bridge, models, optimizer


def _train_step(models, optimizer):
    params = [p for m in models for p in m.parameters()]
    for p in params:  # deterministic fake gradients, identical on every run
        g = torch.Generator().manual_seed(p.numel())
        p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()


def _flat_state(models, optimizer):
    out = {}
    for i, m in enumerate(models):
        for k, v in m.state_dict().items():
            if torch.is_tensor(v) and "_extra_state" not in k:
                out[f"{i}.{k}"] = v.clone()
    for idx, (p, st) in enumerate(optimizer.state.items()):
        for k, v in st.items():
            out[f"opt{idx}.{k}"] = v.clone()
    return out


def _save_worker(hf_dir, root, tp, pp, steps):
    from grail_megatron.checkpoint import save_checkpoint

    bridge, models, optimizer = _setup(hf_dir, tp, pp, seed=1)
    bridge.load_hf_weights(models, hf_dir)
    for step in steps:
        _train_step(models, optimizer)
        save_checkpoint(root, step, models, optimizer, hf_config=bridge.hf_config,
                        extra_state={"metrics": {"loss": 0.5 * step}, "epoch": 0},
                        dataloader_state={"consumed": 8 * step}, checksums=(step == steps[-1]))
    expected = _flat_state(models, optimizer)
    # draws after the save: a resumed run must reproduce them
    return expected, (random.random(), torch.rand(3))


def _load_worker(root, hf_dir, tp, pp, step):
    from grail_megatron.checkpoint import load_checkpoint

    bridge, models, optimizer = _setup(hf_dir, tp, pp, seed=999)  # different init and RNG
    loaded = load_checkpoint(root, models, optimizer, step=step)
    return _flat_state(models, optimizer), loaded, (random.random(), torch.rand(3))


@pytest.mark.multiproc
def test_save_load_roundtrip_tp2_bitwise(tmp_path, hf_dir):
    root = tmp_path / "ckpts"
    saved = run_ranks(_save_worker, 2, hf_dir, root, 2, 1, [1, 2])
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "2"
    actor = root / "global_step_2" / "actor"
    for sub in ("model/dist_ckpt/.metadata", "optimizer/dist_ckpt/.metadata", "extra/dist_ckpt/.metadata",
                "model/huggingface/config.json", "ckpt_contents.json", "transformer_config.json"):
        assert (actor / sub).is_file(), sub
    assert not list(root.glob(".incomplete*"))
    assert verify_step(root / "global_step_2", deep=True) == "marker+sha256"
    assert latest_complete_step(root) == 2

    loaded = run_ranks(_load_worker, 2, root, hf_dir, 2, 1, None)
    for rank in range(2):
        expected, draws = saved[rank]
        got, info, got_draws = loaded[rank]
        assert info.step == 2 and info.optimizer_restored and info.rng_restored
        assert info.trainer_state == {"metrics": {"loss": 1.0}, "epoch": 0}
        assert info.dataloader_state == {"consumed": 16}
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), key
        assert draws[0] == got_draws[0] and torch.equal(draws[1], got_draws[1])


@pytest.mark.multiproc
def test_resume_at_other_layout_reshards_weights_and_optimizer(tmp_path, hf_dir):
    """Saved at TP2, loaded at PP2: every tensor equals the TP1PP1 view of the same checkpoint."""
    root = tmp_path / "ckpts"
    run_ranks(_save_worker, 2, hf_dir, root, 2, 1, [3])
    [reference] = run_ranks(_load_worker, 1, root, hf_dir, 1, 1, 3)
    pp_ranks = run_ranks(_load_worker, 2, root, hf_dir, 1, 2, 3)
    ref_state = reference[0]
    assert not pp_ranks[0][1].rng_restored  # RNG is per (pp, tp) rank: not restorable across layouts
    # stage 0 holds layer 0 (+ embedding), stage 1 layer 1 (+ final norm, output layer)
    by_rank0, by_rank1 = pp_ranks[0][0], pp_ranks[1][0]
    assert torch.equal(by_rank0["0.embedding.word_embeddings.weight"], ref_state["0.embedding.word_embeddings.weight"])
    assert torch.equal(by_rank1["0.output_layer.weight"], ref_state["0.output_layer.weight"])
    assert torch.equal(by_rank1["0.decoder.layers.0.mlp.linear_fc1.weight"],
                       ref_state["0.decoder.layers.1.mlp.linear_fc1.weight"])


def _load_any_worker(root, hf_dir, step):
    from grail_megatron.checkpoint import load_checkpoint

    _bridge, models, optimizer = _setup(hf_dir, 1, 1, seed=5)
    try:
        return load_checkpoint(root, models, optimizer, step=step).step
    except CheckpointError as exc:
        return f"CheckpointError: {exc}"


@pytest.mark.multiproc
def test_corrupt_newest_step_is_refused_and_previous_used(tmp_path, hf_dir, caplog):
    root = tmp_path / "ckpts"
    run_ranks(_save_worker, 2, hf_dir, root, 2, 1, [1, 2])
    shard = sorted((root / "global_step_2" / "actor" / "model" / "dist_ckpt").glob("*.distcp"))[0]
    with open(shard, "r+b") as f:  # a truncated write, e.g. the node died while copying
        f.truncate(shard.stat().st_size // 2)
    with caplog.at_level("WARNING"):
        assert latest_complete_step(root) == 1
    assert "skipping checkpoint step 2" in caplog.text and "truncated" in caplog.text
    # a fresh process resumes from step 1; asking for step 2 explicitly is a clear error
    assert run_ranks(_load_any_worker, 1, root, hf_dir, None) == [1]
    [message] = run_ranks(_load_any_worker, 1, root, hf_dir, 2)
    assert message.startswith("CheckpointError:") and shard.name in message and "truncated" in message
