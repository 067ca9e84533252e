"""verl 0.9.1's own loaders read what `save_checkpoint` writes (`convert from-hf` output).

With `actor.megatron.use_dist_checkpointing=true` verl initialises the actor with
`verl.utils.model.load_mcore_dist_weights(models, dist_checkpointing_path)` (no sharding
metadata, strict=ASSUME_OK_UNEXPECTED, loads in place, return value unused). These tests call
that real function on fresh GPTModel chunks built by our Bridge (random init, different seed)
and compare what it loaded with the HF weights tensor by tensor; and verl's trainer resume of
the model (`MegatronCheckpointManager.load_checkpoint`, strict `load_state_dict`) on the step.
"""

from __future__ import annotations

import pytest
import torch

from ckpt_testlib import hf_tensors, run_ranks, tiny_hf_model, verl_load, verl_manager_load
from grail_megatron.checkpoint.layout import model_dist_dir
from grail_megatron.checkpoint.relayout import RelayoutJob, run_job


def _from_hf(hf_dir, root, tp, pp):
    return str(run_job(RelayoutJob("from-hf", str(hf_dir), str(root), tp, pp)))


def _assert_equal_tensors(loaded: dict, expected: dict, before: dict) -> None:
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    # the fresh model really started elsewhere, so the equality above was made by the loader
    gate = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(before[gate], expected[gate])


def test_recipe_default_path_is_where_from_hf_writes(tmp_path):
    from grail_megatron.cli.convert import verl_init_hint
    from grail_megatron.config import compose

    cfg = compose([f"grail.mcore_init_root={tmp_path}", "model_preset=qwen2.5-7b-instruct"])
    out_root = tmp_path / cfg.grail.model.name  # the documented `from-hf --out`
    assert cfg.actor_rollout_ref.actor.megatron.use_dist_checkpointing is True
    assert cfg.actor_rollout_ref.actor.megatron.dist_checkpointing_path == str(model_dist_dir(out_root, 0))
    assert f"dist_checkpointing_path={model_dist_dir(out_root, 0)}\n" in verl_init_hint(out_root, 0)


@pytest.mark.parametrize("tied,dtype", [(False, "float32"), (True, "bfloat16")], ids=["fp32-untied", "bf16-tied"])
def test_verl_loader_reads_from_hf_output_tp1(tmp_path, tied, dtype):
    hf = tiny_hf_model(tmp_path / "hf", arch="qwen2", tie=tied, kv_heads=1, dtype=dtype)
    run_ranks(_from_hf, 1, hf, tmp_path / "init", 1, 1)
    # verl wraps the chunks in DDP (and Float16Module for bf16); its unwrap_model sees through both
    dist_dir = model_dist_dir(tmp_path / "init", 0)
    # local spec (as built on CPU) and the final norm as TE builds it on GPU (with an _extra_state)
    results = run_ranks(verl_load, 1, hf, dist_dir, [(1, 1, False), (1, 1, True)], True, getattr(torch, dtype))[0]
    expected = hf_tensors(hf)
    for before, after in results:
        assert {t.dtype for t in expected.values()} == {after["model.norm.weight"].dtype} == {getattr(torch, dtype)}
        _assert_equal_tensors(after, expected, before)
    assert "decoder.final_layernorm._extra_state/shard_0_1" in _stored_keys(dist_dir)


def _stored_keys(dist_dir) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(dist_dir)).read_metadata().state_dict_metadata)


@pytest.mark.multiproc
def test_verl_loader_reads_tp2_from_hf_output_at_tp2_and_pp2(tmp_path):
    """Converted at TP2; verl at the same TP2 and at PP2 (dist_checkpointing reshards on load),
    and verl's checkpoint manager at TP2.

    The vocabulary is a multiple of 2: verl's mbridge does not pad it, so that is what a
    checkpoint verl can load at another TP looks like (real Qwen/Llama vocabularies are).
    """
    from grail_megatron.models.tiny import make_tiny_model

    tiny_hf_model(tmp_path / "probe", arch="llama")  # trains the shared tokenizer once
    hf = make_tiny_model(tmp_path / "hf", arch="llama", tie_word_embeddings=True, tokenizer_dir=tmp_path / "tokenizer",
                         kv_heads=2, layers=2, heads=4, hidden=64, vocab_size=328)
    run_ranks(_from_hf, 2, hf, tmp_path / "init", 2, 1)
    per_rank = run_ranks(verl_load, 2, hf, model_dist_dir(tmp_path / "init", 0), [(2, 1, False), (1, 2, True)], True)
    expected = hf_tensors(hf)
    for rank_results in per_rank:
        for before, after in rank_results:  # export gathers full tensors on every rank
            _assert_equal_tensors(after, expected, before)
    # verl's trainer resume of the model on the step (content metadata from our ckpt_contents.json)
    for resumed_by_verl in run_ranks(verl_manager_load, 2, hf, tmp_path / "init" / "global_step_0" / "actor", 2, 1):
        assert sorted(resumed_by_verl) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(resumed_by_verl[name], tensor), name


def test_from_hf_warns_when_verl_could_not_load_the_padded_vocabulary(tmp_path, capsys):
    from grail_megatron.cli.convert import _warn_if_verl_cannot_build

    (tmp_path / "config.json").write_text('{"vocab_size": 325}')
    _warn_if_verl_cannot_build(tmp_path, 1)
    assert capsys.readouterr().err == ""
    _warn_if_verl_cannot_build(tmp_path, 2)
    err = capsys.readouterr().err
    assert f"{tmp_path}/config.json vocab_size=325 is not a multiple of --tp 2" in err
    assert "stores 326 embedding rows while verl 0.9.1's model (mbridge, no vocab padding) has 325" in err
