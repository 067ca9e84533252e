"""A run on `cluster=cpu` (trainer.device=cpu) must not ask for what only a GPU has.

`configs/cluster/cpu.yaml` carries the CPU value of every such key; an override that puts a
GPU-only value back (vLLM, Transformer Engine's attention, THD packing, fused kernels, NCCL)
would otherwise fail deep inside a Ray worker minutes later. Each problem is one line naming
the key, the value given and the value a CPU run needs. Checked before anything starts.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

AR = "actor_rollout_ref"
CPU_ROLLOUTS = ("hf",)

# key -> (the CPU value, why the GPU value cannot run here)
CPU_VALUES: dict[str, tuple[Any, str]] = {
    f"{AR}.model.use_remove_padding": (False, "THD packing needs Transformer Engine's attention"),
    f"{AR}.model.use_fused_kernels": (False, "fused kernels are CUDA kernels"),
    f"{AR}.actor.megatron.sequence_parallel": (False, "the local (non-TE) layer spec runs without it"),
    f"{AR}.ref.megatron.sequence_parallel": (False, "the local (non-TE) layer spec runs without it"),
    f"{AR}.actor.megatron.override_transformer_config.attention_backend": (
        "local", "flash/fused attention are Transformer Engine kernels"),
    f"{AR}.ref.megatron.override_transformer_config.attention_backend": (
        "local", "flash/fused attention are Transformer Engine kernels"),
    f"{AR}.actor.megatron.override_transformer_config.gradient_accumulation_fusion": (
        False, "a Transformer Engine/Apex kernel"),
    f"{AR}.rollout.checkpoint_engine.backend": ("naive", "NCCL needs GPUs; the naive engine syncs in process"),
    "ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM": ("cpu", "verl's CPU platform (gloo, no CUDA)"),
}


def _select(cfg: Any, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def cpu_run_problems(cfg: Any) -> list[str]:
    """One line per GPU-only setting left in a CPU run; [] when trainer.device is not cpu."""
    if str(_select(cfg, "trainer.device")) != "cpu":
        return []
    problems = []
    rollout = _select(cfg, f"{AR}.rollout.name")
    if rollout not in CPU_ROLLOUTS:
        problems.append(f"{AR}.rollout.name={rollout!r} needs a GPU; a CPU run (trainer.device=cpu) uses "
                        f"{AR}.rollout.name=hf (Hugging Face generate)")
    for key, (cpu_value, why) in CPU_VALUES.items():
        value = _select(cfg, key)
        if value != cpu_value:
            problems.append(f"{key}={value!r} needs a GPU ({why}); a CPU run (trainer.device=cpu) uses "
                            f"{key}={cpu_value!r}")
    return problems


def vocabulary_problems(cfg: Any, vocab_size: int | None) -> list[str]:
    """verl's engine builds the embedding through mbridge, which does not pad the vocabulary:
    it must divide by the actor's and the reference's tensor-parallel size (any device)."""
    if vocab_size is None:
        return []
    problems = []
    for role in ("actor", "ref"):
        key = f"{AR}.{role}.megatron.tensor_model_parallel_size"
        tp = _select(cfg, key)
        if isinstance(tp, int) and tp > 0 and vocab_size % tp:
            problems.append(f"{key}={tp} does not divide the model's vocab_size={vocab_size} "
                            f"({_select(cfg, f'{AR}.model.path')}/config.json): verl's Megatron engine does not "
                            f"pad the vocabulary; use a TP that divides {vocab_size}")
    return problems
