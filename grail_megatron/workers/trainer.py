"""The `grail_megatron` trainer mode of verl 0.9.1: actor (+ vLLM rollout) and a separate reference.

verl's default sync trainer puts the reference model inside the actor's worker
(`Role.ActorRolloutRef`): one process per GPU builds both Megatron engines, and verl's
`MegatronEngine._init_device_mesh` returns early when Megatron's parallel state already exists,
so the reference silently runs at the actor's TP/PP whatever `ref.megatron.*` says.

This mode keeps verl's trainer loop and changes only the role -> worker -> resource-pool mapping
(verl's documented extension point `_init_resource_pool_mgr`, registered with
`@register_trainer`):

* no KL (GRAIL's default): `Role.ActorRollout` -> `GrailActorRolloutWorker` on `global_pool`;
* KL: `Role.Actor` -> `GrailActorRolloutWorker` (actor + rollout) on `global_pool`, and
  `Role.RefPolicy` -> verl's `ActorRolloutRefWorker` with role "ref" on `ref_pool`, i.e. its own
  Ray worker group and processes, so its Megatron TP/PP come from `actor_rollout_ref.ref.megatron`.
  `ref_pool` shares the global pool's placement-group bundles (`grail.ref_placement=colocated`,
  a verl `SubRayResourcePool`: same GPUs, other processes) or has GPUs of its own
  (`grail.ref_placement=dedicated`, sized by `grail.ref_pool`).

Nothing of verl is copied: the classes below subclass verl's and call `super()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
from verl.single_controller.ray.base import ResourcePoolManager, split_resource_pool
from verl.trainer.ppo.utils import Role, need_reference_policy
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.engine_workers import ActorRolloutRefWorker

from grail_megatron.eval.verl_hook import GrailValidationMetrics
from grail_megatron.workers.cpu_worker import megatron_methods_in_cpu_threads
from grail_megatron.workers.preemption import CheckpointOnPreemption

TRAINER_MODE = "grail_megatron"
SYNC_MODE = "sync"  # verl's name for the synchronous trainer semantics
GLOBAL_POOL = "global_pool"
REF_POOL = "ref_pool"
REF_PLACEMENTS = ("colocated", "dedicated")


def prepare_engine_process(worker: ActorRolloutRefWorker) -> None:
    """In a process that builds verl's Megatron engine: mbridge/megatron-core compatibility (every
    device), and on the CPU platform the engines in `CpuTrainingWorker` (verl's own
    `actor_worker_cls`/`ref_worker_cls` extension point); on GPUs verl's TrainingWorker as is."""
    from grail_megatron.megatron import mbridge_compat
    from grail_megatron.workers.plugins import on_cpu_platform

    mbridge_compat.apply()
    if on_cpu_platform():
        from grail_megatron.workers.cpu_worker import CpuTrainingWorker

        worker.actor_worker_cls = worker.ref_worker_cls = CpuTrainingWorker


@megatron_methods_in_cpu_threads
class GrailActorRolloutWorker(ActorRolloutRefWorker):
    """verl's hybrid worker as actor + rollout.

    verl's trainer creates a separate reference worker only when the actor role is the bare
    `Role.Actor` (whose role string is "actor"); this worker then still builds the colocated
    rollout, exactly as for "actor_rollout". Every other role string passes through unchanged.
    """

    def __init__(self, config: Any, role: str, distillation_config: Any = None, **kwargs: Any):
        if role == str(Role.Actor):
            role = str(Role.ActorRollout)
        super().__init__(config, role, distillation_config=distillation_config, **kwargs)
        prepare_engine_process(self)


@megatron_methods_in_cpu_threads
class GrailRefWorker(ActorRolloutRefWorker):
    """verl's worker in the "ref" role, in its own worker group (its own TP/PP)."""

    def __init__(self, config: Any, role: str, distillation_config: Any = None, **kwargs: Any):
        super().__init__(config, role, distillation_config=distillation_config, **kwargs)
        prepare_engine_process(self)


@dataclass
class GrailResourcePoolManager(ResourcePoolManager):
    """verl's pool manager plus pools that reuse another pool's placement groups.

    `colocated_pools` maps a pool name to the pool whose GPU bundles it shares. Such a pool adds
    worker processes to the same GPUs (verl creates pools with max_colocate_count=3 processes per
    GPU) without asking Ray for more GPUs, so it is not part of `resource_pool_spec`.
    """

    colocated_pools: dict[str, str] = field(default_factory=dict)

    def create_resource_pool(self) -> None:
        super().create_resource_pool()
        for name, host in self.colocated_pools.items():
            host_pool = self.resource_pool_dict[host]
            (shared,) = split_resource_pool(host_pool, split_size=host_pool.world_size)
            self.resource_pool_dict[name] = shared


def ref_placement(config: Any) -> str:
    placement = str(config.get("grail", {}).get("ref_placement", "colocated"))
    if placement not in REF_PLACEMENTS:
        raise ValueError(f"grail.ref_placement={placement!r}; allowed values: {', '.join(REF_PLACEMENTS)}")
    return placement


def _ref_in_actor(config: Any) -> bool:
    """verl's own rule: with LoRA the reference is the actor without its adapter."""
    model = config.actor_rollout_ref.model
    lora_rank = model.get("lora", {}).get("rank", 0)
    if lora_rank <= 0:
        lora_rank = model.get("lora_rank", 0)
    return lora_rank > 0 or model.get("lora_adapter_path") is not None


class ReferenceDriftMetrics:
    """Log how far the reference's log-probs are from the actor's old log-probs on the same tokens.

    `grail/ref_vs_actor_log_prob/abs_max` and `abs_mean`, over response tokens, after verl's
    `_compute_ref_log_prob`. At step 1 both models hold the same weights, so the value is the
    numerical difference between the two layouts (the reference runs in its own worker group,
    at its own TP/PP); later it is the policy's drift that the KL loss penalises.
    """

    def _compute_ref_log_prob(self, batch, metrics: dict):
        import transfer_queue as tq

        batch = super()._compute_ref_log_prob(batch, metrics=metrics)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                               select_fields=["old_log_probs", "ref_log_prob", "response_mask"]).to_padded_tensor()
        mask = data["response_mask"].bool()
        diff = (data["ref_log_prob"].float() - data["old_log_probs"].float()).abs()[mask]
        if diff.numel():
            metrics["grail/ref_vs_actor_log_prob/abs_max"] = float(diff.max())
            metrics["grail/ref_vs_actor_log_prob/abs_mean"] = float(diff.mean())
        return batch


class GrailMegatronTrainer(CheckpointOnPreemption, GrailValidationMetrics, ReferenceDriftMetrics, PPOTrainerSync):
    """verl's synchronous PPO trainer with the grail_megatron role mapping (module docstring),
    GRAIL's pass@k metrics at verl's validation points (`GrailValidationMetrics`) and a
    checkpoint-and-stop on a preemption request (`CheckpointOnPreemption`)."""

    # verl's trainer base reads `self.trainer_mode` (set from trainer.v1.trainer_mode) and compares
    # it with the literal "sync" to choose the replay buffer, the generation batch size and
    # whether TransferQueue state is saved. Registered under another name, the sync trainer would
    # run the async replay buffer with gen_batch_size=1. This mode *is* verl's sync mode with
    # another role mapping, so it reports "sync" (and reads `trainer.v1.sync.*` like verl's own).
    @property
    def trainer_mode(self) -> str:
        return SYNC_MODE

    @trainer_mode.setter
    def trainer_mode(self, configured: str) -> None:
        if configured != TRAINER_MODE:
            raise ValueError(f"trainer.v1.trainer_mode={configured!r} selects another trainer than {TRAINER_MODE!r}")

    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        config = self.config
        separate_ref = bool(need_reference_policy(config)) and not _ref_in_actor(config)
        for role in (Role.ActorRolloutRef, Role.ActorRollout, Role.Actor, Role.RefPolicy):
            self.role_worker_mapping.pop(role, None)
            self.mapping.pop(role, None)
        actor_role = Role.Actor if separate_ref else Role.ActorRollout
        self.role_worker_mapping[actor_role] = ray.remote(GrailActorRolloutWorker)
        self.mapping[actor_role] = GLOBAL_POOL

        spec = dict(self.resource_pool_manager.resource_pool_spec)
        colocated: dict[str, str] = {}
        if separate_ref:
            self.role_worker_mapping[Role.RefPolicy] = ray.remote(GrailRefWorker)
            self.mapping[Role.RefPolicy] = REF_POOL
            if ref_placement(config) == "dedicated":
                pool = config.grail.ref_pool
                spec[REF_POOL] = [int(pool.n_gpus_per_node)] * int(pool.nnodes)
            else:
                colocated[REF_POOL] = GLOBAL_POOL
        self.resource_pool_manager = GrailResourcePoolManager(
            resource_pool_spec=spec, mapping=self.mapping, colocated_pools=colocated)


def register() -> type[GrailMegatronTrainer]:
    """Register the trainer mode once per process (idempotent: imports may repeat)."""
    if TRAINER_REGISTRY.get(TRAINER_MODE) is not GrailMegatronTrainer:
        register_trainer(TRAINER_MODE)(GrailMegatronTrainer)
    return GrailMegatronTrainer
