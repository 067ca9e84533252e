"""Single-process pieces of the Megatron layer: batch alignment, configs, input errors."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from grail_megatron.megatron.actor import ActorConfig, grpo_loss
from grail_megatron.megatron.logprobs import align_batch

VERL_CONFIG = (Path(torch.__file__).parents[1] / "verl" / "trainer" / "config"
               / "_generated_ppo_megatron_trainer.yaml")


def test_align_batch_left_aligns_and_indexes_responses():
    # row 0: 2 pad + prompt [5, 6] | response [7, 8, pad]; row 1: prompt [1, 2, 3, 4] | [9, pad, pad]
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 0], [1, 2, 3, 4, 9, 0, 0]])
    mask = (ids != 0).long()
    a = align_batch(ids, mask, response_length=3)
    assert a.tokens.tolist() == [[5, 6, 7, 8, 0], [1, 2, 3, 4, 9]]
    assert a.position_ids.tolist() == [[0, 1, 2, 3, 4]] * 2
    assert a.labels[:, :-1].tolist() == [[6, 7, 8, 0], [2, 3, 4, 9]]
    # response token j is predicted by the logits one position earlier in the aligned row
    assert a.response_index[0, :2].tolist() == [1, 2]  # 7 after 6 (pos 1), 8 after 7 (pos 2)
    assert a.response_index[1, 0].item() == 3  # 9 after 4 (pos 3)
    for row in range(2):
        for j in range(3):
            if mask[row, 4 + j]:
                assert a.labels[row, a.response_index[row, j]] == ids[row, 4 + j]
    assert int(a.response_index.max()) < a.tokens.shape[1]


def test_align_batch_pads_to_tp_multiple_and_checks_shapes():
    ids = torch.tensor([[0, 5, 6, 7]])
    a = align_batch(ids, (ids != 0).long(), response_length=1, pad_to_multiple=4)
    assert a.tokens.shape == (1, 4) and a.tokens.tolist() == [[5, 6, 7, 0]]
    with pytest.raises(ValueError, match="differ in shape"):
        align_batch(ids, torch.ones(1, 3), response_length=1)
    with pytest.raises(ValueError, match="response_length 9 > sequence length 4"):
        align_batch(ids, torch.ones_like(ids), response_length=9)


def test_actor_config_from_verl_megatron_trainer():
    config = OmegaConf.load(VERL_CONFIG)
    arr = config.actor_rollout_ref
    arr.rollout.n = 16
    arr.rollout.temperature = 0.7
    arr.actor.ppo_mini_batch_size = 8
    arr.actor.ppo_micro_batch_size_per_gpu = 4
    arr.actor.optim.lr = 3e-6
    arr.actor.optim.lr_warmup_steps = 20
    arr.actor.clip_ratio_high = 0.28
    actor = ActorConfig.from_verl(config)
    assert actor.lr == 3e-6 and actor.lr_warmup_steps == 20
    assert actor.ppo_mini_batch_size == 8 * 16  # verl counts prompts; we count sequences
    assert actor.ppo_micro_batch_size_per_gpu == 4
    assert (actor.clip_ratio_low, actor.clip_ratio_high) == (0.2, 0.28)
    assert actor.temperature == 0.7 and actor.loss_agg_mode == "token-mean"
    assert actor.clip_grad == 1.0 and actor.betas == (0.9, 0.999)
    verl_cfg = actor.verl_actor_config()
    assert verl_cfg.clip_ratio_high == 0.28 and verl_cfg.policy_loss.loss_mode == "vanilla"


def test_actor_config_warmup_ratio_and_validation():
    config = OmegaConf.load(VERL_CONFIG)
    config.actor_rollout_ref.actor.optim.lr_warmup_steps_ratio = 0.05
    config.actor_rollout_ref.actor.optim.total_training_steps = 400
    assert ActorConfig.from_verl(config).lr_warmup_steps == 20
    with pytest.raises(ValueError, match="temperature"):
        ActorConfig(temperature=0.0)
    with pytest.raises(ValueError, match="ppo_micro_batch_size_per_gpu"):
        ActorConfig(ppo_micro_batch_size_per_gpu=0)


def test_grpo_loss_token_mean_and_missing_ref():
    config = ActorConfig(use_kl_loss=True).verl_actor_config()
    log_prob = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    data = {"old_log_probs": log_prob.clone(), "advantages": torch.tensor([[1.0, 1.0], [-2.0, 0.0]]),
            "response_mask": torch.tensor([[1, 1], [1, 0]])}
    with pytest.raises(KeyError, match="ref_log_prob"):
        grpo_loss(log_prob, data, config, 3, 2, 1)
    data["ref_log_prob"] = log_prob.clone()
    loss, metrics = grpo_loss(log_prob, data, config, 3, 2, 1)
    # ratio 1 everywhere: pg loss = -mean(A) over the 3 real tokens = -(1 + 1 - 2) / 3 = 0
    assert float(loss) == pytest.approx(0.0, abs=1e-7)
    assert metrics["actor/kl_loss"] == 0.0 and metrics["actor/pg_clipfrac"] == 0.0
    # a global token count of 6 (a mini batch twice this micro batch) halves the share
    data["advantages"] = torch.ones(2, 2)
    loss6, _ = grpo_loss(log_prob, data, config, 6, 4, 1)
    loss3, _ = grpo_loss(log_prob, data, config, 3, 2, 1)
    assert float(loss3) == pytest.approx(-1.0) and float(loss6) == pytest.approx(-0.5)


def test_bridge_rejects_non_hf_folder(tmp_path):
    from grail_megatron.megatron.bridge import Bridge

    with pytest.raises(FileNotFoundError, match="config.json not found"):
        Bridge.from_pretrained(tmp_path)


def test_parallel_initialize_needs_torchrun_env(monkeypatch):
    from grail_megatron.megatron import parallel

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="tp and pp must be >= 1"):
        parallel.ParallelConfig(tp=0)
    with pytest.raises(ValueError, match="vpp=2 needs pp >= 2"):
        parallel.ParallelConfig(pp=1, vpp=2)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="RANK is not set: start this program with torchrun"):
            parallel._require_env("RANK")
