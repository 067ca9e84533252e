"""The local loop's single-process parts: config reading, data, rollout, rewards, metrics, signals."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from grail_megatron.local import scoring, sums
from grail_megatron.local.dataset import DataError, PromptSampler, load_prompts
from grail_megatron.local.metrics import MetricLogger, batch_metrics, reward_component_metrics, to_data_proto
from grail_megatron.local.preemption import PreemptionWatcher
from grail_megatron.local.settings import ConfigError, LocalSettings


def _minimal_config(**changes) -> dict:
    cfg = {
        "algorithm": {"adv_estimator": "grpo", "norm_adv_by_std_in_grpo": True},
        "data": {"train_files": ["~/d/train.parquet"], "val_files": None, "train_batch_size": 4,
                 "max_prompt_length": 32},
        "actor_rollout_ref": {
            "model": {"path": "/m"},
            "rollout": {"n": 2, "temperature": 0.7, "top_p": 0.95, "top_k": 50, "response_length": 16},
            "actor": {"optim": {"lr": 1e-3}, "loss_agg_mode": "token-mean", "use_kl_loss": False,
                      "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "ppo_mini_batch_size": 4,
                      "megatron": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}},
        },
        "trainer": {"total_training_steps": 3, "default_local_dir": "/ck", "logger": ["console"]},
    }
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


def test_settings_read_verl_keys():
    s = LocalSettings.from_config(OmegaConf.create(_minimal_config()))
    assert s.data.train_files == (os.path.expanduser("~/d/train.parquet"),)
    assert (s.sampling.n, s.sampling.top_k, s.sampling.response_length) == (2, 50, 16)
    assert (s.actor.clip_ratio_low, s.actor.clip_ratio_high) == (0.2, 0.28)
    assert s.world_size == 4
    assert s.validation.n == 1 and s.validation.do_sample is False  # verl's val_kwargs defaults


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"algorithm__adv_estimator": "gae"}, "'algorithm.adv_estimator' = 'gae'"),
        ({"trainer__total_training_steps": None}, "'trainer.total_training_steps' must be set"),
        ({"data__train_batch_size": 0}, "'data.train_batch_size' must be > 0"),
        ({"actor_rollout_ref__actor__loss_agg_mode": "sum"}, "loss_agg_mode' = 'sum'"),
    ],
)
def test_settings_errors_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        LocalSettings.from_config(OmegaConf.create(_minimal_config(**change)))


def test_missing_key_is_named():
    cfg = _minimal_config()
    del cfg["actor_rollout_ref"]["rollout"]["top_p"]
    with pytest.raises(ConfigError, match=r"'actor_rollout_ref\.rollout\.top_p' is missing"):
        LocalSettings.from_config(OmegaConf.create(cfg))


# ----------------------------------------------------------------------------- data


def test_prompts_are_chat_templated(sums_run):
    tok = AutoTokenizer.from_pretrained(sums_run.model_dir)
    records = load_prompts((str(sums_run.train_file),), tok, max_prompt_length=32)
    assert len(records) == 512
    first = records[0]
    assert first.data_source == "grail_gsm8k"
    assert first.ground_truth.startswith("#### ")
    text = tok.decode(first.prompt_ids)
    assert text.startswith("<|im_start|>user\nWhat is ") and text.endswith("<|im_start|>assistant\n")


def test_bad_prompt_files_are_named(tmp_path, sums_run):
    import pandas as pd

    tok = AutoTokenizer.from_pretrained(sums_run.model_dir)
    with pytest.raises(DataError, match=f"{tmp_path}/none.parquet does not exist"):
        load_prompts((str(tmp_path / "none.parquet"),), tok, 32)
    pd.DataFrame({"prompt": [[{"role": "user", "content": "x"}]]}).to_parquet(tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match=r"nocol.parquet lacks column\(s\) \['data_source', 'reward_model'\]"):
        load_prompts((str(tmp_path / "nocol.parquet"),), tok, 32)
    long = [sums.row(1, 2, "train", 0), sums.row(1, 2, "train", 1)]
    long[1]["prompt"] = [{"role": "user", "content": "What is 1 + 2? " * 20}]
    sums.write_parquet(long, tmp_path / "long.parquet")
    with pytest.raises(DataError, match=r"long.parquet row 1: prompt has \d+ tokens > data.max_prompt_length=32"):
        load_prompts((str(tmp_path / "long.parquet"),), tok, 32)


@pytest.mark.parametrize("seed", [None, 7])
def test_sampler_is_verls_dataloader_order(seed):
    """The batches verl's trainer draws (its sampler in a drop-last StatefulDataLoader, epoch
    after epoch), including verl's default `data.seed: null`; and the dataloader state a local
    checkpoint saves makes verl's loader continue with the next local batch."""
    from torchdata.stateful_dataloader import StatefulDataLoader
    from verl.trainer.ppo.utils import create_rl_sampler

    data = OmegaConf.create({"shuffle": True, "seed": seed})
    loader = StatefulDataLoader(range(10), batch_size=4, drop_last=True, sampler=create_rl_sampler(data, range(10)),
                                collate_fn=list)
    verl_order = [[int(i) for i in batch] for _ in range(3) for batch in loader]
    sampler = PromptSampler(10, 4, seed=seed)
    assert [sampler.indices(step) for step in range(1, 7)] == verl_order
    resumed = StatefulDataLoader(range(10), batch_size=4, drop_last=True,
                                 sampler=create_rl_sampler(data, range(10)), collate_fn=list)
    resumed.load_state_dict(sampler.dataloader_state(3))
    assert [int(i) for i in next(iter(resumed))] == sampler.indices(4)


def test_sampler_is_a_function_of_seed_and_step():
    sampler = PromptSampler(num_records=10, batch_size=4, seed=3)
    epoch0 = sampler.indices(1) + sampler.indices(2)
    assert len(set(epoch0)) == 8  # no repeats inside an epoch (drop_last: 2 batches of 4)
    assert PromptSampler(10, 4, seed=3).indices(2) == sampler.indices(2)
    assert sampler.indices(3) != sampler.indices(1)  # next epoch reshuffles
    with pytest.raises(DataError, match="train_batch_size=11 exceeds the 10"):
        PromptSampler(10, 11, seed=0)


# ----------------------------------------------------------------------------- rollout


@pytest.fixture(scope="module")
def rollout_config(sums_run):
    from omegaconf import OmegaConf

    from grail_megatron.config import compose

    cfg = compose(["model_preset=tiny", "cluster=cpu", f"actor_rollout_ref.model.path={sums_run.model_dir}",
                   "data.max_prompt_length=32", "data.max_response_length=20",
                   "actor_rollout_ref.rollout.temperature=1.0", "actor_rollout_ref.rollout.top_p=1.0",
                   "actor_rollout_ref.rollout.top_k=-1", "actor_rollout_ref.rollout.dtype=float32"])
    arr = cfg.actor_rollout_ref
    OmegaConf.resolve(arr)
    return arr


def _rollout(arr, **changes):
    from omegaconf import OmegaConf

    from grail_megatron.local.rollout import LocalRollout

    arr = arr.copy()
    for key, value in changes.items():
        OmegaConf.update(arr, key, value, force_add=True)
    return LocalRollout(arr)


@pytest.fixture(scope="module")
def rollout(rollout_config):
    return _rollout(rollout_config)


def _sums_prompt_ids(rollout, pairs):
    out = []
    for a, b in pairs:
        ids = rollout.tokenizer.apply_chat_template(sums.messages(a, b), add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"]))
    return out


def test_rollout_is_seeded_and_its_log_probs_match_a_full_forward(rollout):
    prompts = _sums_prompt_ids(rollout, [(1, 2), (7, 8), (0, 0)])
    a = rollout.generate(prompts, n=4, step=3)
    b = rollout.generate(prompts, n=4, step=3)
    assert torch.equal(a.responses, b.responses)
    assert not torch.equal(a.responses, rollout.generate(prompts, n=4, step=4).responses)
    assert a.responses.shape == (12, 20) and a.prompts.shape[0] == 12
    # verl's layout: pads after EOS, EOS included in the mask
    assert torch.all(a.responses[a.response_mask == 0] == rollout.pad_id)
    ended = a.response_mask.sum(-1) < 20
    last = a.responses[torch.arange(12), a.response_mask.sum(-1) - 1]
    assert all(int(t) in rollout.eos_ids for t in last[ended])
    with torch.no_grad():
        logits = rollout.engine.model(input_ids=a.input_ids, attention_mask=a.attention_mask,
                                      position_ids=a.position_ids).logits
    width = a.prompts.shape[1]
    full = torch.log_softmax(logits[:, width - 1:-1].float(), -1).gather(-1, a.responses.unsqueeze(-1)).squeeze(-1)
    diff = ((full - a.rollout_log_probs) * a.response_mask).abs().max().item()
    assert diff < 1e-4


def test_deterministic_rollout_samples_each_prompt_alone(rollout_config):
    """full_determinism: a prompt's samples depend on its ids, occurrence and the weight version
    only (the verl path's server seeds them the same way), not on the other prompts of the batch."""
    det = _rollout(rollout_config, **{"rollout.full_determinism": True})
    one, two, three = _sums_prompt_ids(det, [(1, 2), (7, 8), (3, 3)])
    together = det.generate([one, two], n=2, step=5)
    alone = det.generate([two], n=2, step=5)
    width = alone.response_mask.sum(-1).max()
    assert torch.equal(together.responses[2:, :width], alone.responses[:, :width])
    assert torch.equal(together.response_mask[2:], alone.response_mask)
    assert not torch.equal(det.generate([three, two], n=2, step=6).responses[2:], together.responses[2:])


def test_rollout_load_weights_checks_names_and_shapes(rollout):
    model = rollout.engine.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = "model.norm.weight"
    assert rollout.load_weights([(name, torch.full_like(state[name], 0.5))]) == 1
    assert torch.all(model.get_parameter(name) == 0.5)
    rollout.load_weights([(name, state[name])])
    with pytest.raises(KeyError, match="no weight 'model.bogus'"):
        rollout.load_weights([("model.bogus", torch.zeros(1))])
    with pytest.raises(ValueError, match="has shape"):
        rollout.load_weights([(name, torch.zeros(3))])


# ----------------------------------------------------------------------------- rewards, advantages


def test_real_gsm8k_reward_on_sums():
    texts = [sums.completion(3, 4), sums.completion(3, 4).replace("<SOLUTION>7", "<SOLUTION>8"), "seven"]
    scored = scoring.score(texts, ["grail_gsm8k"] * 3, ["#### 7"] * 3, [{}] * 3)
    # GRAIL's GSM8K weights: 0.6 correct + 0.15 strict + 0.1 thinking + 0.1 answer + 0.05 no trailing
    assert scored.scores.tolist() == pytest.approx([1.0, 0.4, 0.05], abs=1e-6)
    assert scored.components["correct"] == [1.0, 0.0, 0.0]
    metrics = reward_component_metrics(scored.components)
    assert metrics["reward/correct/mean"] == pytest.approx(1 / 3)
    assert metrics["reward/format/mean"] == pytest.approx((2 / 3 + 2 / 3 + 2 / 3 + 1) / 4)


def test_grpo_advantages_are_verls():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]])
    rewards = scoring.token_level_rewards(torch.tensor([1.0, 0.0, 0.5, 0.5]), mask)
    assert rewards.tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0.5], [0, 0, 0.5]]
    adv = scoring.grpo_advantages(rewards, mask, np.array([0, 0, 1, 1]))
    std = torch.tensor([1.0, 0.0]).std().item()
    assert adv[0, 0].item() == pytest.approx(0.5 / (std + 1e-6))
    assert adv[1, 0].item() == pytest.approx(-0.5 / (std + 1e-6))
    assert adv[2].abs().max().item() == 0.0  # no spread in group 1
    assert adv[0, 2].item() == 0.0  # masked


# ----------------------------------------------------------------------------- metrics


def _toy_batch():
    prompts = torch.tensor([[0, 5, 6], [7, 8, 9]])
    responses = torch.tensor([[3, 2, 0], [4, 4, 2]])
    response_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    scores = torch.tensor([1.0, 0.0])
    rewards = scoring.token_level_rewards(scores, response_mask)
    adv = scoring.grpo_advantages(rewards, response_mask, np.array([0, 0]))
    lp = torch.tensor([[-0.5, -1.0, 0.0], [-0.1, -0.2, -0.3]])
    return {
        "prompts": prompts, "responses": responses, "response_mask": response_mask,
        "attention_mask": torch.cat([torch.tensor([[0, 1, 1], [1, 1, 1]]), response_mask], 1),
        "token_level_scores": rewards, "token_level_rewards": rewards, "advantages": adv, "returns": adv,
        "rollout_log_probs": lp, "old_log_probs": lp + 0.01 * response_mask,
    }


def test_batch_metrics_use_verl_names_and_values():
    batch = _toy_batch()
    proto = to_data_proto(batch, batch["attention_mask"].sum(-1).tolist())
    metrics = batch_metrics(proto, {"step": 2.0, "gen": 1.0}, n_ranks=2)
    assert metrics["critic/score/mean"] == pytest.approx(0.5)
    assert metrics["response_length/mean"] == pytest.approx(2.5)
    assert metrics["prompt_length/mean"] == pytest.approx(2.5)
    assert metrics["timing_s/step"] == 2.0
    assert metrics["perf/throughput"] == pytest.approx((4 + 6) / (2.0 * 2))
    assert metrics["training/rollout_probs_diff_valid"] == 1
    assert 0 < metrics["training/rollout_probs_diff_max"] < 0.01


def test_metric_logger_writes_tensorboard(tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_DIR", str(tmp_path / "tb"))
    logger = MetricLogger("p", "e", ("console", "tensorboard"), str(tmp_path))
    logger.log({"training/global_step": 1, "critic/score/mean": 0.25, "actor/pg_loss": -0.5}, step=1)
    logger.log({"training/global_step": 2, "critic/score/mean": 0.75, "actor/pg_loss": 0.5}, step=2)
    logger.finish()
    out = capsys.readouterr().out
    assert "reward" in out and "0.250" in out and "0.750" in out
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("critic/score/mean")] == [(1, 0.25), (2, 0.75)]


# ----------------------------------------------------------------------------- preemption


def test_preemption_signal_and_stop_file(tmp_path):
    watcher = PreemptionWatcher(str(tmp_path / "stop"))
    try:
        assert not watcher.should_stop()
        (tmp_path / "stop").touch()
        assert watcher.should_stop()
        (tmp_path / "stop").unlink()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watcher.signalled == signal.SIGUSR1 and watcher.should_stop()
    finally:
        watcher.restore()
