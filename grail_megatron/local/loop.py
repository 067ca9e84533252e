"""The local GRPO loop, run by every torchrun rank (see `worker.py`).

    rollout (HF generate, rank 0) -> rewards -> GRPO advantages -> old/ref log-probs
    -> verl's actor update -> verl's weight export to the rollout -> metrics -> checkpoint

The model work is verl's own (`local.policy`: verl's workers and Megatron engine in process,
no Ray); this module keeps what verl has no local counterpart for: the driver, the in-process
rollout on rank 0, GRAIL's rewards and metrics. Rank 0 broadcasts each rollout batch so every
rank of the Megatron model (TP x PP x DP) sees the same tensors; everything else is collective.
Batches, sampling and checkpoints are reproducible from the step number, so a run resumed at
step k continues as if it had never stopped.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from grail_megatron.local import scoring
from grail_megatron.local.dataset import PromptRecord, PromptSampler, load_prompts
from grail_megatron.local.metrics import MetricLogger, batch_metrics, reward_component_metrics, to_data_proto
from grail_megatron.local.preemption import EXIT_PREEMPTED, STATUS_FILE_ENV, PreemptionWatcher, stop_file_from_env
from grail_megatron.local.rollout import LocalRollout
from grail_megatron.local.settings import LocalSettings


def run(s: LocalSettings, cfg) -> int:
    """Train; verl's engine creates the process group and Megatron's parallel state."""
    from megatron.core import parallel_state

    try:
        return train(s, cfg)
    finally:
        if parallel_state.is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def train(s: LocalSettings, cfg) -> int:
    from grail_megatron.local import actor_setup

    policy = actor_setup.build(s, cfg)
    rank0 = dist.get_rank() == 0
    rollout = LocalRollout(policy.config) if rank0 else None
    tokenizer = rollout.tokenizer if rollout is not None else _tokenizer(s.model_path)
    prompts = load_prompts(s.data.train_files, tokenizer, s.data.max_prompt_length, s.data.prompt_key)
    sampler = PromptSampler(len(prompts), s.data.train_batch_size, s.data.seed, s.data.shuffle)
    step = actor_setup.resume(s.trainer.default_local_dir, policy) if s.trainer.resume_mode != "disable" else 0
    actor_setup.sync_rollout_weights(policy, rollout)
    tracker = MetricLogger(s.trainer.project_name, s.trainer.experiment_name, s.trainer.logger,
                           s.trainer.default_local_dir, config=_plain(cfg)) if rank0 else None
    watcher = PreemptionWatcher(stop_file_from_env())
    reward_fn = scoring.load_reward_fn(s.reward_fn_path, s.reward_fn_name)
    validate = actor_setup.validator(s, rollout)
    if step == 0 and s.trainer.val_before_train:
        _log(tracker, validate(), step)

    while step < s.trainer.total_training_steps:
        step += 1
        timing: dict[str, float] = {}
        with _timer(timing, "step"):
            with _timer(timing, "gen"):
                batch = _broadcast(_rollout_and_score(s, rollout, prompts, sampler.indices(step), step, reward_fn)
                                   if rank0 else None)
            with _timer(timing, "old_log_prob"):
                old = policy.compute_log_prob(batch)
                batch["old_log_probs"] = old["log_probs"]
            if policy.ref is not None:
                with _timer(timing, "ref"):
                    batch["ref_log_prob"] = policy.compute_ref_log_prob(batch)
            with _timer(timing, "update_actor"):
                actor_metrics = policy.update_actor(batch)
            with _timer(timing, "update_weights"):
                actor_setup.sync_rollout_weights(policy, rollout)
        stop = watcher.should_stop()
        if stop or step == s.trainer.total_training_steps or _due(step, s.trainer.save_freq):
            with _timer(timing, "save_checkpoint"):
                actor_setup.save(s, policy, step, sampler)
        metrics = {"training/global_step": step, **actor_metrics,
                   "actor/entropy": _entropy(old["entropy"], batch["response_mask"], cfg)}
        if _due(step, s.trainer.test_freq) or (step == s.trainer.total_training_steps and s.trainer.test_freq > 0):
            with _timer(timing, "testing"):
                metrics.update(validate())
        if rank0:
            metrics.update(reward_component_metrics(batch["reward_components"]))
            metrics.update(batch_metrics(_data_proto(batch), timing, dist.get_world_size()))
        _log(tracker, metrics, step)
        if stop:
            return _preempted(step, tracker)
    if tracker is not None:
        tracker.finish()
    return 0


def _rollout_and_score(s: LocalSettings, rollout: LocalRollout, prompts: list[PromptRecord], indices: list[int],
                       step: int, reward_fn) -> dict:
    """Sample n completions per prompt, score them, and compute GRPO advantages (rank 0)."""
    chosen = [prompts[i] for i in indices]
    out = rollout.generate([p.prompt_ids for p in chosen], s.sampling.n, step)
    per_sample = [p for p in chosen for _ in range(s.sampling.n)]
    scored = scoring.score(
        rollout.decode(out.responses, out.response_mask),
        [p.data_source for p in per_sample], [p.ground_truth for p in per_sample],
        [p.extra_info for p in per_sample], reward_fn, s.reward_kwargs,
    )
    rewards = scoring.token_level_rewards(scored.scores, out.response_mask)
    group_ids = np.repeat(np.asarray(indices), s.sampling.n)
    advantages = scoring.grpo_advantages(rewards, out.response_mask, group_ids, s.norm_adv_by_std_in_grpo)
    return {
        "prompts": out.prompts, "responses": out.responses, "input_ids": out.input_ids,
        "attention_mask": out.attention_mask, "position_ids": out.position_ids,
        "response_mask": out.response_mask, "rollout_log_probs": out.rollout_log_probs,
        "token_level_scores": rewards, "token_level_rewards": rewards,
        "advantages": advantages, "returns": advantages,
        "reward_components": scored.components,
    }


def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _entropy(entropy: torch.Tensor, mask: torch.Tensor, cfg) -> float:
    """verl's `actor/entropy` metric: the entropy aggregated with the actor's loss_agg_mode."""
    from verl.trainer.ppo.core_algos import agg_loss

    actor = cfg.actor_rollout_ref.actor
    return float(agg_loss(loss_mat=entropy, loss_mask=mask, loss_agg_mode=actor.loss_agg_mode,
                          loss_scale_factor=actor.get("loss_scale_factor")))


def _data_proto(batch: dict):
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return to_data_proto(tensors, batch["attention_mask"].sum(-1).tolist())


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def _timer(timing: dict, name: str):
    start = time.perf_counter()
    yield
    timing[name] = time.perf_counter() - start


def _due(step: int, freq: int) -> bool:
    return freq > 0 and step % freq == 0


def _log(tracker: MetricLogger | None, metrics: dict, step: int) -> None:
    if tracker is not None and metrics:
        tracker.log(metrics, step)


def _preempted(step: int, tracker: MetricLogger | None) -> int:
    """Checkpoint is written: tell the launcher (status file) and exit with 75."""
    if tracker is not None:
        tracker.finish()
        status = os.environ.get(STATUS_FILE_ENV)
        if status:
            with open(status, "w") as f:
                json.dump({"preempted": True, "step": step}, f)
        print(f"[grail-megatron] preempted: checkpoint of step {step} saved, exiting {EXIT_PREEMPTED}", flush=True)
    dist.barrier()
    return EXIT_PREEMPTED


def _plain(cfg) -> dict | None:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an unresolvable interpolation elsewhere in verl's tree must not stop training
        return OmegaConf.to_container(cfg, resolve=False)
