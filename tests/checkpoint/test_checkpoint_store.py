"""save_checkpoint (the converter's writer) / load_model_weights / latest_complete_step on real gloo ranks."""

from __future__ import annotations

import json

import pytest
import torch

from ckpt_testlib import run_ranks, tiny_hf_model
from grail_megatron.checkpoint import CheckpointError, latest_complete_step, verify_step


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_hf_model(tmp_path_factory.mktemp("store") / "qwen2", arch="qwen2", tie=False, layers=2)


def _models(hf_dir, tp, pp, seed):
    from grail_megatron.megatron import parallel
    from grail_megatron.megatron.bridge import Bridge

    parallel.initialize(tp=tp, pp=pp, seed=seed)
    bridge = Bridge.from_pretrained(hf_dir)
    return bridge, bridge.build_models()


def _flat_state(models):
    return {f"{i}.{k}": v.clone() for i, m in enumerate(models) for k, v in m.state_dict().items()
            if torch.is_tensor(v) and "_extra_state" not in k}


def _save_worker(hf_dir, root, tp, pp, steps):
    from grail_megatron.checkpoint import save_checkpoint

    bridge, models = _models(hf_dir, tp, pp, seed=1)
    bridge.load_hf_weights(models, hf_dir)
    for step in steps:
        with torch.no_grad():  # deterministic changes, so every step holds other weights
            for p in (p for m in models for p in m.parameters()):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + step)))
        save_checkpoint(root, step, models, hf_config=bridge.hf_config, hf_assets_dir=hf_dir,
                        extra_state={"metrics": {"loss": 0.5 * step}, "epoch": 0},
                        dataloader_state={"consumed": 8 * step})
    return _flat_state(models)


def _load_worker(root, hf_dir, tp, pp, step):
    from grail_megatron.checkpoint.layout import model_dist_dir
    from grail_megatron.checkpoint.store import load_model_weights

    _bridge, models = _models(hf_dir, tp, pp, seed=999)  # another init than the saved weights
    before = _flat_state(models)
    load_model_weights(models, model_dist_dir(root, step))
    return before, _flat_state(models)


@pytest.mark.multiproc
def test_save_tp2_then_load_weights_at_tp2_tp1_and_pp2(tmp_path, hf_dir):
    root = tmp_path / "ckpts"
    saved = run_ranks(_save_worker, 2, hf_dir, root, 2, 1, [1, 2])
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "2"
    step = root / "global_step_2"
    actor = step / "actor"
    for sub in ("model/dist_ckpt/.metadata", "extra/dist_ckpt/.metadata", "model/huggingface/config.json",
                "model/huggingface/tokenizer.json", "ckpt_contents.json", "transformer_config.json"):
        assert (actor / sub).is_file(), sub
    assert not (actor / "optimizer").exists() and not list(actor.rglob("*.safetensors"))
    manifest = json.loads((actor / "ckpt_contents.json").read_text())
    assert manifest["save_contents"] == ["model", "extra"] and "optimizer" not in manifest["contents"]
    assert manifest["global_step"] == 2 and manifest["world_size"] == 2
    trainer_state = json.loads((step / "trainer_state.json").read_text())
    assert trainer_state["state"] == {"metrics": {"loss": 1.0}, "epoch": 0}
    assert trainer_state["layout"] == {"tp": 2, "pp": 1, "dp": 1, "vpp": 1}
    assert torch.load(step / "data.pt", weights_only=False) == {"consumed": 16}
    assert not list(root.glob(".incomplete*"))
    assert verify_step(step) == "marker" and latest_complete_step(root) == 2

    # the same layout: bitwise what each rank saved
    for rank, (before, got) in enumerate(run_ranks(_load_worker, 2, root, hf_dir, 2, 1, 2)):
        assert saved[rank].keys() == got.keys()
        for key in got:
            assert torch.equal(saved[rank][key], got[key]), (rank, key)
        assert not torch.equal(before["0.decoder.layers.0.mlp.linear_fc1.weight"],
                               got["0.decoder.layers.0.mlp.linear_fc1.weight"])
    # another layout: dist_checkpointing reshards; every tensor equals the TP1PP1 view
    [(_, reference)] = run_ranks(_load_worker, 1, root, hf_dir, 1, 1, 2)
    (_, by_rank0), (_, by_rank1) = run_ranks(_load_worker, 2, root, hf_dir, 1, 2, 2)
    # stage 0 holds layer 0 (+ embedding), stage 1 layer 1 (+ final norm, output layer)
    assert torch.equal(by_rank0["0.embedding.word_embeddings.weight"], reference["0.embedding.word_embeddings.weight"])
    assert torch.equal(by_rank1["0.output_layer.weight"], reference["0.output_layer.weight"])
    assert torch.equal(by_rank1["0.decoder.layers.0.mlp.linear_fc1.weight"],
                       reference["0.decoder.layers.1.mlp.linear_fc1.weight"])
    # TP2 shards of the saved fc2 (split on the input axis) make up the TP1 tensor
    fc2 = "0.decoder.layers.0.mlp.linear_fc2.weight"
    assert torch.equal(torch.cat([saved[0][fc2], saved[1][fc2]], dim=1), reference[fc2])


def _failed_save_worker(hf_dir, root, bad_assets):
    from grail_megatron.checkpoint import save_checkpoint

    _bridge, models = _models(hf_dir, 1, 1, seed=1)
    try:
        save_checkpoint(root, 3, models, hf_assets_dir=bad_assets)  # rank 0 fails after the tensors
    except CheckpointError as exc:
        return f"CheckpointError: {exc}"
    return "no error"


@pytest.mark.multiproc
def test_failed_save_leaves_previous_step_and_corrupt_newest_step_is_refused(tmp_path, hf_dir, caplog):
    root = tmp_path / "ckpts"
    run_ranks(_save_worker, 1, hf_dir, root, 1, 1, [1, 2])

    # a save that fails on rank 0 raises on every rank and leaves only its temp dir behind
    results = run_ranks(_failed_save_worker, 2, hf_dir, root, tmp_path / "not_hf")
    assert all(r.startswith("CheckpointError:") and "no config.json" in r for r in results), results
    assert not (root / "global_step_3").exists() and (root / ".incomplete.global_step_3").is_dir()
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "2" and latest_complete_step(root) == 2

    shard = sorted((root / "global_step_2" / "actor" / "model" / "dist_ckpt").glob("*.distcp"))[0]
    with open(shard, "r+b") as f:  # a truncated write, e.g. the node died while copying
        f.truncate(shard.stat().st_size // 2)
    with caplog.at_level("WARNING"):
        assert latest_complete_step(root) == 1
    assert "skipping checkpoint step 2" in caplog.text and "truncated" in caplog.text
    with pytest.raises(CheckpointError, match="truncated") as info:
        verify_step(root / "global_step_2")
    assert shard.name in str(info.value)

    # the next save of step 3 replaces the leftover temp dir
    run_ranks(_save_worker, 1, hf_dir, root, 1, 1, [3])
    assert not list(root.glob(".incomplete*")) and latest_complete_step(root) == 3
