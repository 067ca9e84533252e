"""verl's own workers in this torchrun rank: the local loop's actor and reference, without Ray.

Each rank builds verl 0.9.1's `ActorRolloutRefWorker` in the "actor" role (and, with the KL
loss, a second one in the "ref" role) from the same `actor_rollout_ref` config verl's trainer
hands its Ray workers, prepared exactly as on the verl path (`prepare_engine_process`: the
mbridge compatibility and, on CPU, `CpuTrainingWorker`). Their methods are verl's: `init_model`
builds `MegatronEngineWithLMHead` through mbridge, `compute_log_prob` / `compute_ref_log_prob`
run verl's forward, `update_actor` verl's PPO loss and Megatron optimizer step, the engine's
`get_per_tensor_param` the weight export to the rollout, `save_checkpoint` / `load_checkpoint`
verl's checkpoint manager (verl's layout, the verl path's own files).

What verl's single controller does around these calls is done here: the batch is converted to
verl's no-padding layout, every data-parallel rank gets its contiguous share of the rows (verl's
dispatch), the outputs of the ranks that hold them are gathered back to every rank, and the
metadata verl's trainer attaches (temperature, mini batch size, epochs, ...) is attached.
The reference runs at the actor's layout: both engines live in one process, and Megatron's
parallel state is per process (verl's colocated reference behaves the same way).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

ROW_KEYS = ("input_ids", "attention_mask", "position_ids", "prompts", "responses", "response_mask")
UPDATE_KEYS = ("old_log_probs", "advantages", "ref_log_prob", "rollout_is_weights")


def worker_config(cfg, total_training_steps: int):
    """`actor_rollout_ref`, resolved, as verl's trainer gives it to its workers: the optimizer
    knows the run's length (Megatron's LR scheduler needs it) and the reference uses the
    actor's layout (one Megatron parallel state per process)."""
    from omegaconf import OmegaConf, open_dict

    arr = copy.deepcopy(cfg.actor_rollout_ref)
    OmegaConf.resolve(arr)
    with open_dict(arr):
        arr.actor.optim.total_training_steps = int(total_training_steps)
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                    "virtual_pipeline_model_parallel_size", "context_parallel_size"):
            if arr.ref.megatron.get(key) != arr.actor.megatron.get(key):
                logger.info("local loop: reference %s=%s follows the actor's %s", key,
                            arr.ref.megatron.get(key), arr.actor.megatron.get(key))
                arr.ref.megatron[key] = arr.actor.megatron.get(key)
    return arr


def _build_worker(arr, role: str):
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from grail_megatron.workers.trainer import prepare_engine_process

    worker = ActorRolloutRefWorker(copy.deepcopy(arr), role=role)
    prepare_engine_process(worker)
    _quietly(worker.init_model)
    return worker


def _quietly(method, *args, **kwargs):
    """Call verl's `method`, keeping what it prints at DEBUG: verl prints each engine's whole
    TransformerConfig (a 9 kB line per rank) when it builds an engine and saves a checkpoint."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = method(*args, **kwargs)
    if printed.getvalue():
        logger.debug("verl %s printed: %s", getattr(method, "__name__", method), printed.getvalue())
    return result


class LocalPolicy:
    """The actor (and optional reference) engines of this rank, behind padded-batch methods."""

    def __init__(self, cfg, total_training_steps: int):
        self.config = worker_config(cfg, total_training_steps)
        self.actor = _build_worker(self.config, "actor")
        self.ref = _build_worker(self.config, "ref") if self.config.actor.use_kl_loss else None
        self.temperature = float(self.config.rollout.temperature)

    # ------------------------------------------------------------------ data-parallel plumbing
    @staticmethod
    def _dp() -> tuple[int, int]:
        from megatron.core import parallel_state as mpu

        return mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()

    def _shard(self, batch: dict, keys) -> tuple:
        """This rank's rows in verl's no-padding TensorDict (and the padded view for outputs)."""
        from tensordict import TensorDict
        from verl.workers.utils.padding import left_right_2_no_padding

        dp, rank = self._dp()
        rows = batch["input_ids"].shape[0]
        if rows % dp:
            raise ValueError(f"batch of {rows} rows does not split over {dp} data-parallel ranks")
        share = slice(rank * rows // dp, (rank + 1) * rows // dp)
        fields = {k: batch[k][share] for k in keys if k in batch}
        return left_right_2_no_padding(TensorDict(fields, batch_size=[share.stop - share.start]))

    def _gather(self, local: dict | None) -> dict:
        """Every data-parallel share's outputs (held by its TP/PP source rank), in row order."""
        _, rank = self._dp()
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (rank, local))
        shares = {dp_rank: out for dp_rank, out in everyone if out is not None}
        return {key: torch.cat([shares[r][key] for r in sorted(shares)], 0) for key in shares[min(shares)]}

    # ------------------------------------------------------------------ verl's entry points
    def _log_probs(self, method, batch: dict, calculate_entropy: bool) -> dict:
        from verl.utils import tensordict_utils as tu
        from verl.workers.utils.padding import no_padding_2_padding

        td = self._shard(batch, ROW_KEYS)
        tu.assign_non_tensor(td, calculate_entropy=calculate_entropy, compute_loss=False,
                             temperature=self.temperature)
        output = method(td)
        local = None
        if output is not None:
            local = {"log_probs": no_padding_2_padding(tu.get(output, "log_probs"), td).float()}
            if calculate_entropy:
                local["entropy"] = no_padding_2_padding(tu.get(output, "entropy"), td).float()
        gathered = self._gather(local)
        mask = batch["response_mask"][:, : gathered["log_probs"].shape[1]]
        return {k: _pad_to(v * mask, batch["response_mask"].shape[1]) for k, v in gathered.items()}

    def compute_log_prob(self, batch: dict) -> dict:
        """verl's old-log-prob pass: {"log_probs", "entropy"} [B, R], on every rank."""
        return self._log_probs(self.actor.compute_log_prob, batch, calculate_entropy=True)

    def compute_ref_log_prob(self, batch: dict) -> torch.Tensor:
        return self._log_probs(self.ref.compute_ref_log_prob, batch, calculate_entropy=False)["log_probs"]

    def update_actor(self, batch: dict) -> dict[str, float]:
        """One verl `update_actor` call (ppo_epochs x mini batches); verl's reduced actor/* metrics."""
        from verl.utils import tensordict_utils as tu
        from verl.utils.metric import reduce_metrics
        from verl.utils.py_functional import rename_dict

        actor = self.config.actor
        mini = int(actor.ppo_mini_batch_size) * int(self.config.rollout.n)
        td = self._shard(batch, ROW_KEYS + UPDATE_KEYS)
        tu.assign_non_tensor(td, calculate_entropy=bool(actor.get("calculate_entropy", False))
                             or float(actor.entropy_coeff) != 0.0,
                             distillation_use_topk=False, distillation_only=False, global_batch_size=mini,
                             mini_batch_size=mini, epochs=int(actor.ppo_epochs),
                             seed=int(actor.data_loader_seed), dataloader_kwargs={"shuffle": bool(actor.shuffle)},
                             temperature=self.temperature)
        output = self.actor.update_actor(td)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, tu.get(output, "metrics") if output is not None else None)
        raw = next(m for m in everyone if m is not None)
        renamed = rename_dict(raw, "actor/")  # as verl's trainer names them
        if "actor/mfu" in renamed:
            renamed["perf/mfu/actor"] = renamed.pop("actor/mfu")
        return reduce_metrics(renamed)

    def export_weights(self):
        """(HF name, full tensor) pairs from verl's engine export (collective: drain on every rank)."""
        per_tensor, _ = self.actor.actor.engine.get_per_tensor_param()
        yield from per_tensor

    def save_checkpoint(self, actor_dir: str, step: int) -> None:
        if not self.config.actor.checkpoint.get("async_save", False):
            from grail_megatron.checkpoint.store import in_process_results_queue

            in_process_results_queue()  # a synchronous save needs no queue server process per rank
        _quietly(self.actor.save_checkpoint, actor_dir, None, step, max_ckpt_to_keep=None)

    def load_checkpoint(self, actor_dir: str) -> None:
        _quietly(self.actor.load_checkpoint, actor_dir)


def _pad_to(tensor: torch.Tensor, width: int) -> torch.Tensor:
    if tensor.shape[1] >= width:
        return tensor[:, :width]
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]))
