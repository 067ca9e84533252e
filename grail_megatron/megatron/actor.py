"""The Megatron actor (and reference) model: log-probs and GRPO/PPO policy updates.

Same code on GPU and CPU. The loss is verl's own (`core_algos.get_policy_loss_fn`,
`agg_loss`, `kl_penalty`) with verl's global token-mean normalisation: every micro batch is
normalised by the number of response tokens of the whole mini batch, so the gradient does not
depend on how the mini batch is cut into micro batches or ranks. The optimiser is Megatron's
(`get_megatron_optimizer`, Adam, gradient clipping, fp32 main grads through Megatron's DDP)
with `OptimizerParamScheduler` for the learning rate, as in verl's Megatron engine; on CPU it
runs thanks to `cpu_support` (the `clip_grad` adjustment).

Data parallelism: every rank passes the same full batch; each data-parallel rank works on its
contiguous share of the rows and the results are gathered back.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from grail_megatron.megatron.bridge import Bridge, BridgeConfig
from grail_megatron.megatron.logprobs import run_micro_batches, split_micro_batches

REQUIRED_FOR_LOGPROB = ("input_ids", "attention_mask", "responses", "response_mask")
REQUIRED_FOR_UPDATE = REQUIRED_FOR_LOGPROB + ("old_log_probs", "advantages")


@dataclass
class ActorConfig:
    """Actor settings; names follow verl's `actor_rollout_ref.actor.*` keys."""

    lr: float = 1e-6
    lr_warmup_steps: int = 0  # linear warmup, then constant (verl's default decay style)
    min_lr: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 1.0
    ppo_mini_batch_size: int | None = None  # sequences per optimiser step (None: whole batch)
    ppo_micro_batch_size_per_gpu: int = 4
    ppo_epochs: int = 1
    clip_ratio: float = 0.2
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 3.0
    loss_agg_mode: str = "token-mean"
    policy_loss_mode: str = "vanilla"
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    temperature: float = 1.0  # rollout temperature: logits are divided by it, as in verl
    bridge: BridgeConfig = field(default_factory=BridgeConfig)

    def __post_init__(self):
        if self.ppo_micro_batch_size_per_gpu < 1:
            raise ValueError("ppo_micro_batch_size_per_gpu must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.betas = tuple(self.betas)

    @classmethod
    def from_verl(cls, config, role: str = "actor") -> ActorConfig:
        """Read verl's composed config (`actor_rollout_ref.{actor|ref}.*`, rollout.n/temperature)."""
        arr = config.actor_rollout_ref
        actor = arr.actor
        optim = actor.optim
        n = int(arr.rollout.n)
        warmup = int(optim.get("lr_warmup_steps", -1) or -1)
        if warmup < 0:
            ratio = float(optim.get("lr_warmup_steps_ratio", 0.0) or 0.0)
            total = int(optim.get("total_training_steps", -1) or -1)
            warmup = int(ratio * total) if total > 0 else 0
        micro = arr[role].get("ppo_micro_batch_size_per_gpu") if role == "actor" else \
            arr.ref.get("log_prob_micro_batch_size_per_gpu")
        return cls(
            lr=float(optim.lr),
            lr_warmup_steps=warmup,
            min_lr=float(optim.get("min_lr", 0.0) or 0.0),
            weight_decay=float(optim.get("weight_decay", 0.01)),
            betas=tuple(optim.get("betas", (0.9, 0.999))),
            clip_grad=float(optim.get("clip_grad", 1.0)),
            ppo_mini_batch_size=int(actor.ppo_mini_batch_size) * n,
            ppo_micro_batch_size_per_gpu=int(micro or 1),
            ppo_epochs=int(actor.get("ppo_epochs", 1)),
            clip_ratio=float(actor.clip_ratio),
            clip_ratio_low=float(actor.clip_ratio_low),
            clip_ratio_high=float(actor.clip_ratio_high),
            clip_ratio_c=float(actor.get("clip_ratio_c", 3.0)),
            loss_agg_mode=str(actor.loss_agg_mode),
            policy_loss_mode=str(actor.policy_loss.get("loss_mode", "vanilla")),
            use_kl_loss=bool(actor.use_kl_loss),
            kl_loss_coef=float(actor.kl_loss_coef),
            kl_loss_type=str(actor.kl_loss_type),
            temperature=float(arr.rollout.get("temperature", 1.0)),
        )

    def verl_actor_config(self):
        """verl's ActorConfig carrying the loss settings (what `get_policy_loss_fn` reads)."""
        from verl.workers.config import ActorConfig as VerlActorConfig
        from verl.workers.config.actor import PolicyLossConfig

        return VerlActorConfig(
            strategy="megatron",
            rollout_n=1,
            ppo_micro_batch_size_per_gpu=self.ppo_micro_batch_size_per_gpu,
            clip_ratio=self.clip_ratio,
            clip_ratio_low=self.clip_ratio_low,
            clip_ratio_high=self.clip_ratio_high,
            clip_ratio_c=self.clip_ratio_c,
            loss_agg_mode=self.loss_agg_mode,
            policy_loss=PolicyLossConfig(loss_mode=self.policy_loss_mode),
            use_kl_loss=self.use_kl_loss,
            kl_loss_coef=self.kl_loss_coef,
            kl_loss_type=self.kl_loss_type,
            use_torch_compile=False,
        )


def grpo_loss(log_prob: torch.Tensor, data: dict, verl_config, batch_num_tokens: int,
              global_batch_size: int, dp_size: int) -> tuple[torch.Tensor, dict]:
    """verl's actor loss on one micro batch (as `verl.workers.utils.losses.ppo_loss`).

    Policy loss from the registry (`vanilla`: clipped, dual-clip, clip_ratio_low/high),
    aggregated with `agg_loss` over the *global* mini batch, plus the KL loss against
    `ref_log_prob` when `use_kl_loss`.
    """
    from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn, kl_penalty

    verl_config.global_batch_info.update(
        dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
        loss_scale_factor=verl_config.loss_scale_factor,
    )
    response_mask = data["response_mask"].bool()
    policy_loss_fn = get_policy_loss_fn(verl_config.policy_loss.get("loss_mode", "vanilla"))
    pg_loss, pg_metrics = policy_loss_fn(
        old_log_prob=data["old_log_probs"], log_prob=log_prob, advantages=data["advantages"],
        response_mask=response_mask, loss_agg_mode=verl_config.loss_agg_mode, config=verl_config,
        rollout_is_weights=data.get("rollout_is_weights"),
    )
    metrics = {k: float(v) for k, v in pg_metrics.items()}
    metrics["actor/pg_loss"] = float(pg_loss.detach())
    loss = pg_loss
    if verl_config.use_kl_loss:
        if "ref_log_prob" not in data:
            raise KeyError("use_kl_loss is on but the batch has no 'ref_log_prob'")
        kld = kl_penalty(logprob=log_prob, ref_logprob=data["ref_log_prob"],
                         kl_penalty=verl_config.kl_loss_type)
        kl_loss = agg_loss(loss_mat=kld, loss_mask=response_mask,
                           loss_agg_mode=verl_config.loss_agg_mode, **verl_config.global_batch_info)
        loss = loss + kl_loss * verl_config.kl_loss_coef
        metrics["actor/kl_loss"] = float(kl_loss.detach())
        metrics["actor/kl_coef"] = verl_config.kl_loss_coef
    return loss, metrics


# Summed over micro batches (each micro batch holds its share of the mini batch's token-mean);
# the other per-micro-batch statistics are averaged, as verl aggregates them.
_SUMMED = ("actor/pg_loss", "actor/kl_loss")


class MegatronActor:
    """Megatron model chunks (+ optimizer when trainable) for one policy or reference model."""

    def __init__(self, bridge: Bridge, models: list[torch.nn.Module], config: ActorConfig,
                 trainable: bool = True):
        self.bridge = bridge
        self.models = models
        self.config = config
        self.trainable = trainable
        self.optimizer = None
        self.scheduler = None
        self._verl_config = config.verl_actor_config()
        if trainable:
            self.optimizer, self.scheduler = self._make_optimizer()

    @classmethod
    def from_pretrained(cls, hf_dir: str | os.PathLike, config: ActorConfig | None = None,
                        trainable: bool = True) -> MegatronActor:
        """Build the models for the current TP/PP (see `parallel.initialize`) and load HF weights."""
        config = config or ActorConfig()
        bridge = Bridge.from_pretrained(hf_dir, config.bridge)
        models = bridge.build_models(wrap_with_ddp=trainable)
        bridge.load_hf_weights(models, hf_dir)
        if trainable:
            # every data-parallel replica starts from exactly the same weights
            for m in models:
                m.broadcast_params()
        for m in models:
            m.train(trainable)
        return cls(bridge, models, config, trainable)

    # ----------------------------------------------------------------- optimizer
    def _make_optimizer(self):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        c = self.config
        half = self.bridge.config.dtype in (torch.bfloat16, torch.float16)
        if half and not torch.cuda.is_available():
            # GPU-only seam: Float16OptimizerWithFloat16Params accepts only torch.cuda.* tensors
            raise ValueError(
                f"training in {self.bridge.config.dtype} needs a GPU (Megatron's mixed-precision "
                "optimizer only accepts CUDA tensors); on CPU use BridgeConfig(dtype=torch.float32)"
                " (bf16 works on CPU for log-probs, trainable=False)"
            )
        tf_config = self.bridge.transformer_config
        # all-reduces grads across DP, tied embeddings across PP and layernorms with SP
        tf_config.finalize_model_grads_func = finalize_model_grads
        opt_config = OptimizerConfig(
            optimizer="adam", lr=c.lr, min_lr=c.min_lr, weight_decay=c.weight_decay,
            adam_beta1=c.betas[0], adam_beta2=c.betas[1], adam_eps=c.eps, clip_grad=c.clip_grad,
            bf16=self.bridge.config.dtype == torch.bfloat16,
            fp16=self.bridge.config.dtype == torch.float16,
            params_dtype=self.bridge.config.dtype, use_distributed_optimizer=False,
        )
        optimizer = get_megatron_optimizer(opt_config, self.models)
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0 if c.lr_warmup_steps else c.lr, max_lr=c.lr, min_lr=c.min_lr,
            lr_warmup_steps=c.lr_warmup_steps, lr_decay_steps=max(c.lr_warmup_steps + 1, 10**9),
            lr_decay_style="constant", start_wd=c.weight_decay, end_wd=c.weight_decay,
            wd_incr_steps=1, wd_incr_style="constant",
        )
        return optimizer, scheduler

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer else 0.0

    # ----------------------------------------------------------------- data parallel helpers
    @staticmethod
    def _dp():
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

    def _dp_shard(self, batch: dict) -> dict:
        dp, rank = self._dp()
        size = batch["input_ids"].shape[0]
        if size % dp:
            raise ValueError(f"batch size {size} is not divisible by data-parallel size {dp}")
        per = size // dp
        return {k: v[rank * per:(rank + 1) * per] if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _dp_gather(self, local: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        dp, _ = self._dp()
        if dp == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(dp)]
        torch.distributed.all_gather(parts, local.contiguous(), group=ps.get_data_parallel_group())
        return torch.cat(parts, 0)

    # ----------------------------------------------------------------- API
    def compute_log_prob(self, batch: dict) -> torch.Tensor:
        """Per-token log-probs [B, R] of batch["responses"] (0 at masked slots), on every rank."""
        _check_keys(batch, REQUIRED_FOR_LOGPROB, "compute_log_prob")
        from megatron.core import parallel_state as ps

        for m in self.models:
            m.eval()
        local = self._dp_shard(batch)
        micro = split_micro_batches(local, self.config.ppo_micro_batch_size_per_gpu,
                                    ps.get_tensor_model_parallel_world_size())
        with torch.no_grad():
            outputs = run_micro_batches(self.models, micro, self.bridge.vocab_size,
                                        forward_only=True, temperature=self.config.temperature)
        for m in self.models:
            m.train(self.trainable)
        return self._dp_gather(torch.cat([o["log_probs"] for o in outputs], 0))

    def update_policy(self, batch: dict) -> dict[str, float]:
        """PPO/GRPO update on `batch` (ppo_epochs x mini batches); returns verl-named metrics.

        Needs input_ids, attention_mask, responses, response_mask, old_log_probs, advantages
        (+ ref_log_prob with use_kl_loss). Metrics: actor/pg_loss, actor/pg_clipfrac,
        actor/ppo_kl, actor/pg_clipfrac_lower, actor/grad_norm, actor/lr (+ actor/kl_loss,
        actor/kl_coef), averaged over the optimiser steps of this call.
        """
        if not self.trainable:
            raise RuntimeError("update_policy on a non-trainable (reference) model")
        _check_keys(batch, REQUIRED_FOR_UPDATE, "update_policy")
        if self.config.use_kl_loss:
            _check_keys(batch, ("ref_log_prob",), "update_policy (use_kl_loss)")
        size = batch["input_ids"].shape[0]
        mini = self.config.ppo_mini_batch_size or size
        if size % mini:
            raise ValueError(f"batch size {size} is not divisible by ppo_mini_batch_size {mini}")
        step_metrics = []
        for _ in range(self.config.ppo_epochs):
            for start in range(0, size, mini):
                part = {k: v[start:start + mini] if isinstance(v, torch.Tensor) else v
                        for k, v in batch.items()}
                step_metrics.append(self._optimizer_step(part))
        return {k: sum(m[k] for m in step_metrics) / len(step_metrics) for k in step_metrics[0]}

    def _optimizer_step(self, mini_batch: dict) -> dict[str, float]:
        from megatron.core import parallel_state as ps

        dp, _ = self._dp()
        batch_num_tokens = int(mini_batch["response_mask"].sum())
        global_batch_size = int(mini_batch["input_ids"].shape[0])
        local = self._dp_shard(mini_batch)
        micro = split_micro_batches(local, self.config.ppo_micro_batch_size_per_gpu,
                                    ps.get_tensor_model_parallel_world_size())

        def loss_fn(log_prob, data):
            return grpo_loss(log_prob, data, self._verl_config, batch_num_tokens,
                             global_batch_size, dp)

        for m in self.models:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = run_micro_batches(self.models, micro, self.bridge.vocab_size, loss_fn=loss_fn,
                                    forward_only=False, temperature=self.config.temperature)
        lr = self.lr  # the learning rate this step uses (reported as actor/lr)
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=1)
        metrics = _reduce_micro_metrics(outputs)
        metrics = _dp_mean(metrics)
        metrics["actor/grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["actor/lr"] = lr
        return metrics

    # ----------------------------------------------------------------- weights
    def export_hf_weights(self):
        """(HF name, full tensor) pairs, e.g. to refresh the rollout model (collective)."""
        return self.bridge.export_hf_weights(self.models)

    def save_hf(self, out_dir, tokenizer_dir=None):
        return self.bridge.save_hf(self.models, out_dir, tokenizer_dir=tokenizer_dir)


def _check_keys(batch: dict, keys, where: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{where}: batch is missing {missing} (has {sorted(batch)})")


def _reduce_micro_metrics(outputs: list[dict]) -> dict[str, float]:
    acc = defaultdict(list)
    for out in outputs:
        for k, v in out.items():
            if k != "log_probs":
                acc[k].append(float(v))
    return {k: (sum(v) if k in _SUMMED else sum(v) / len(v)) for k, v in acc.items()}


def _dp_mean(metrics: dict[str, float]) -> dict[str, float]:
    """Average over data-parallel ranks.

    Each rank's pg_loss is (its token sum / global tokens) * dp (verl's agg_loss), so the mean
    over ranks is the global token-mean; the per-micro-batch statistics are plain means.
    """
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    if dp == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(values, group=ps.get_data_parallel_group())
    return {k: float(v) / dp for k, v in zip(keys, values)}


__all__ = ["ActorConfig", "MegatronActor", "grpo_loss"]
