"""The local trainer's actor (Megatron optimizer, DDP-wrapped chunks): checkpoint, resume, export."""

from __future__ import annotations

import pytest
import torch

from ckpt_testlib import hf_tensors, run_ranks, tiny_hf_model, verl_load, verl_manager_load


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_hf_model(tmp_path_factory.mktemp("actor") / "qwen2", arch="qwen2", tie=True, layers=2)


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "responses": ids[:, 6:],
            "response_mask": torch.ones(4, 6, dtype=torch.long), "advantages": torch.randn(4, 6, generator=g)}


def _actor(hf_dir, tp):
    from grail_megatron.megatron import parallel
    from grail_megatron.megatron.actor import ActorConfig, MegatronActor

    parallel.initialize(tp=tp, pp=1, seed=0)
    return MegatronActor.from_pretrained(hf_dir, ActorConfig(lr=1e-2, ppo_micro_batch_size_per_gpu=2))


def _params(actor):
    return {k: v.detach().clone() for k, v in actor.models[0].module.state_dict().items() if "_extra_state" not in k}


def _train_and_save(hf_dir, root):
    from grail_megatron.checkpoint import save_checkpoint

    actor = _actor(hf_dir, 2)
    batch = _batch(actor.bridge.vocab_size)
    batch["old_log_probs"] = actor.compute_log_prob(batch)
    actor.update_policy(batch)
    save_checkpoint(root, 1, actor.models, actor.optimizer, lr_scheduler=actor.scheduler,
                    hf_config=actor.bridge.hf_config, hf_assets_dir=hf_dir, extra_state={"global_step": 1})
    # the step after the checkpoint, which a resumed run must reproduce exactly
    batch["old_log_probs"] = actor.compute_log_prob(batch)
    actor.update_policy(batch)
    return _params(actor)


def _resume_and_step(hf_dir, root):
    from grail_megatron.checkpoint import load_checkpoint

    actor = _actor(hf_dir, 2)
    loaded = load_checkpoint(root, actor.models, actor.optimizer, lr_scheduler=actor.scheduler)
    assert loaded.optimizer_restored and loaded.trainer_state == {"global_step": 1}
    batch = _batch(actor.bridge.vocab_size)
    batch["old_log_probs"] = actor.compute_log_prob(batch)
    actor.update_policy(batch)
    return _params(actor)


def _export(root, out):
    from grail_megatron.checkpoint.to_hf import convert_to_hf
    from grail_megatron.checkpoint.verify import verify_logits

    convert_to_hf(root / "global_step_1", out, progress=False)
    return verify_logits(root / "global_step_1", out).max_abs_diff


@pytest.mark.multiproc
def test_actor_checkpoint_resumes_bitwise_and_exports_a_generating_model(tmp_path, hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path / "ckpts"
    uninterrupted = run_ranks(_train_and_save, 2, hf_dir, root)
    resumed = run_ranks(_resume_and_step, 2, hf_dir, root)
    for rank in range(2):
        assert uninterrupted[rank].keys() == resumed[rank].keys()
        for key, value in uninterrupted[rank].items():
            assert torch.equal(value, resumed[rank][key]), (rank, key)

    [max_diff] = run_ranks(_export, 1, root, tmp_path / "hf_out")
    assert max_diff <= 1e-4

    # verl's resume / init from a trained step: its own loader on the step's model/dist_ckpt gives
    # exactly the weights `to-hf` exported (fresh TP2 chunks, DDP-wrapped as verl's engine does)
    exported = hf_tensors(tmp_path / "hf_out")
    dist_dir = root / "global_step_1" / "actor" / "model" / "dist_ckpt"
    for [(before, after)] in run_ranks(verl_load, 2, hf_dir, dist_dir, [(2, 1)], True):
        assert sorted(after) == sorted(exported)
        for name, tensor in exported.items():
            assert torch.equal(after[name], tensor), name
        assert not torch.equal(before["model.embed_tokens.weight"], exported["model.embed_tokens.weight"])
    # verl's trainer resume of the model (MegatronCheckpointManager.load_checkpoint, strict load_state_dict)
    for resumed_by_verl in run_ranks(verl_manager_load, 2, hf_dir, dist_dir.parent.parent, 2, 1):
        assert sorted(resumed_by_verl) == sorted(exported)
        for name, tensor in exported.items():
            assert torch.equal(resumed_by_verl[name], tensor), name
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_out"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf_out"))
    trained = {k: v for k, v in model.state_dict().items()}
    original = AutoModelForCausalLM.from_pretrained(str(hf_dir)).state_dict()
    assert not torch.equal(trained["model.embed_tokens.weight"], original["model.embed_tokens.weight"])  # it trained
    out = model.generate(**tok("What is 2 + 2?", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 4
