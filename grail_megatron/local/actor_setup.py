"""Wiring of the loop to the other areas: Megatron actor/reference, checkpoints, validation.

Each function is a thin call into the owning module (grail_megatron.megatron,
grail_megatron.checkpoint, grail_megatron.eval) so the loop itself reads as the algorithm.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from grail_megatron.local.settings import LocalSettings

logger = logging.getLogger(__name__)


def build(s: LocalSettings, cfg):
    """The trainable actor and, when the KL loss is on, a frozen reference (same HF weights)."""
    from grail_megatron.megatron.actor import ActorConfig, MegatronActor

    actor = MegatronActor.from_pretrained(s.model_path, ActorConfig.from_verl(cfg, role="actor"), trainable=True)
    ref = None
    if s.actor.use_kl_loss:
        ref = MegatronActor.from_pretrained(s.model_path, ActorConfig.from_verl(cfg, role="ref"), trainable=False)
    return actor, ref


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def sync_rollout_weights(actor, rollout) -> None:
    """Actor -> rollout model through the bridge export (collective; rank 0 copies the tensors)."""
    for name, tensor in actor.export_hf_weights():
        if rollout is not None:
            rollout.load_weights([(name, tensor)])


def resume(root: str, actor) -> int:
    """Load the newest checkpoint that loads cleanly; 0 when there is none.

    A step that fails verification (partial or truncated save) or loading is refused with the
    reason, and the next older step is tried, so one bad save never blocks a restart.
    """
    from grail_megatron.checkpoint import CheckpointError, load_checkpoint
    from grail_megatron.checkpoint.layout import list_step_dirs

    box = [sorted(list_step_dirs(root), reverse=True) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)  # every rank tries the same steps in the same order
    for step in box[0]:
        try:
            loaded = load_checkpoint(root, actor.models, actor.optimizer, step=step, lr_scheduler=actor.scheduler)
        except CheckpointError as exc:
            _say(f"refusing checkpoint step {step}: {exc}; trying an older one")
            continue
        _say(f"resumed from {loaded.path} (step {loaded.step})")
        return loaded.step
    if box[0]:
        _say(f"no usable checkpoint under {root}: starting from the HF weights")
    return 0


def save(s: LocalSettings, actor, step: int, tokenizer) -> Path:
    from grail_megatron.checkpoint import save_checkpoint

    return save_checkpoint(
        s.trainer.default_local_dir, step, actor.models, actor.optimizer, lr_scheduler=actor.scheduler,
        hf_config=actor.bridge.hf_config, tokenizer=tokenizer, extra_state={"global_step": step},
    )


def validator(s: LocalSettings, rollout):
    """`() -> {"val/...": ...}` via grail_megatron.eval on the rollout model (rank 0; {} elsewhere)."""
    if rollout is None or not s.data.val_files:
        return dict
    import pyarrow.parquet as pq

    from grail_megatron.eval.validation import evaluate
    from grail_megatron.local.settings import SamplingSettings

    rows = [row for path in s.data.val_files for row in pq.read_table(path).to_pylist()]
    if s.data.val_max_samples > 0:
        rows = rows[: s.data.val_max_samples]
    v = s.validation
    sampling = SamplingSettings(n=v.n, temperature=v.temperature or 1.0, top_p=v.top_p, top_k=v.top_k,
                                response_length=s.sampling.response_length, do_sample=v.do_sample)

    def generate(messages, n, seeds):
        return rollout.generate_texts(messages, n, seeds, sampling)

    def run() -> dict[str, float]:
        return evaluate(generate, rows, samples=v.n, ks=[1], seed=s.actor.seed, batch_size=len(rows))

    return run


def _say(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"[grail-megatron] {message}", flush=True)
    logger.info(message)


