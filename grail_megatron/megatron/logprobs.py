"""Per-token log-probs of responses on Megatron models, through Megatron's pipeline schedules.

Batch layout (verl's): `input_ids` / `attention_mask` of shape [B, P+R] hold the left-padded
prompt followed by the right-padded response; `responses` [B, R] are the response tokens and
`response_mask` [B, R] marks the real ones.

Before the forward pass each row is *left-aligned* (padding moved to the end): with a causal
model, real tokens then never see a pad token, so no padding mask is needed and the same code
runs with the local attention on CPU and Transformer Engine's causal kernels on GPU. Positions
are 0..n-1 over the real tokens, as for an unpadded sequence.

Log-probs use Megatron's `vocab_parallel_cross_entropy` on the TP-sharded logits (the full
vocabulary is never gathered). Vocabulary rows added for TP padding are masked out of the
softmax, so the numbers equal the HF model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


@dataclass
class AlignedBatch:
    """Left-aligned model inputs plus the index that maps response tokens back."""

    tokens: torch.Tensor  # [B, S] real tokens first, then pad
    position_ids: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S] tokens shifted left by one (next-token targets)
    response_index: torch.Tensor  # [B, R] position in `tokens` whose logits predict each response token


def align_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int,
                pad_to_multiple: int = 1) -> AlignedBatch:
    """Move every row's real tokens to the front (stable), and index the response tokens."""
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} differ in shape")
    batch, total = input_ids.shape
    if response_length > total:
        raise ValueError(f"response_length {response_length} > sequence length {total}")
    valid = attention_mask.bool()
    # stable sort: real tokens keep their order and come first
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    tokens = torch.gather(input_ids, 1, order)
    new_pos = torch.empty_like(order)
    new_pos.scatter_(1, order, torch.arange(total).expand(batch, -1).contiguous())
    # logits at position t predict token t+1: the response token at original position j is
    # scored by the logits at aligned position new_pos[j] - 1 (clamped for masked slots)
    response_index = (new_pos[:, total - response_length:] - 1).clamp_min(0)

    seq = int(valid.sum(1).max().item()) if batch else 0
    seq = max(seq, 1)
    seq = -(-seq // pad_to_multiple) * pad_to_multiple
    if seq > total:  # pad on the right so the length is a multiple of pad_to_multiple
        tokens = torch.nn.functional.pad(tokens, (0, seq - total))
    tokens = tokens[:, :seq].contiguous()
    # masked response slots point past the real tokens; keep their index in range
    response_index = response_index.clamp_max(seq - 1)
    labels = torch.roll(tokens, shifts=-1, dims=1)
    position_ids = torch.arange(seq).expand(batch, -1).contiguous()
    return AlignedBatch(tokens, position_ids, labels, response_index)


def vocab_parallel_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                            temperature: float = 1.0) -> torch.Tensor:
    """log p(label) from TP-sharded logits [B, S, V/tp] -> [B, S], differentiable.

    Padded vocabulary ids (>= vocab_size) get -inf. Megatron's kernel overwrites its logits
    argument in place, so it always receives a fresh tensor here.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    shard = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * shard
    if start + shard > vocab_size:
        is_pad = torch.arange(start, start + shard, device=logits.device) >= vocab_size
        logits = logits.masked_fill(is_pad, float("-inf"))
    else:
        logits = logits.clone()
    return -vocab_parallel_cross_entropy(logits, labels)


@dataclass
class MicroBatch:
    aligned: AlignedBatch
    data: dict  # the caller's tensors for this micro batch (response_mask, advantages, ...)


def split_micro_batches(batch: dict, micro_batch_size: int, pad_to_multiple: int = 1) -> list[MicroBatch]:
    """Cut a verl-style batch dict into aligned micro batches (rows stay in order)."""
    size = batch["input_ids"].shape[0]
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    response_length = batch["responses"].shape[1]
    out = []
    for start in range(0, size, micro_batch_size):
        part = {k: v[start:start + micro_batch_size] if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}
        aligned = align_batch(part["input_ids"], part["attention_mask"], response_length,
                              pad_to_multiple)
        out.append(MicroBatch(aligned, part))
    return out


def _forward_step(vocab_size: int, temperature: float, loss_fn: LossFn, num_micro: int,
                  data_iterator, model):
    micro: MicroBatch = next(data_iterator)
    a = micro.aligned
    output = model(input_ids=a.tokens, position_ids=a.position_ids, attention_mask=None)

    def loss_func(logits):
        token_lp = vocab_parallel_logprobs(logits, a.labels, vocab_size, temperature)
        response_lp = torch.gather(token_lp, 1, a.response_index)
        response_lp = response_lp * micro.data["response_mask"].to(response_lp.dtype)
        loss, metrics = loss_fn(response_lp, micro.data)
        # Megatron divides a 2-tuple loss by the number of micro batches; losses here are
        # already normalised over the whole batch (verl's global token-mean), so undo it.
        return loss * num_micro, {"log_probs": response_lp.detach(), **metrics}

    return output, loss_func


def _no_loss(response_lp: torch.Tensor, data: dict):
    return response_lp.sum() * 0.0, {}


def run_micro_batches(models: Sequence[torch.nn.Module], micro_batches: list[MicroBatch],
                      vocab_size: int, loss_fn: LossFn | None = None, forward_only: bool = True,
                      temperature: float = 1.0) -> list[dict]:
    """Forward (and backward unless forward_only) over micro batches with Megatron's schedule.

    Returns, on every rank, one dict per micro batch with "log_probs" [mb, R] and the
    loss_fn's metrics (as produced on the last pipeline stage, broadcast to the others).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    models = list(models)
    num_micro = len(micro_batches)
    if num_micro == 0:
        raise ValueError("run_micro_batches: the batch is empty")
    step = partial(_forward_step, vocab_size, temperature, loss_fn or _no_loss, num_micro)
    iterators = [iter(micro_batches) for _ in models] if len(models) > 1 else iter(micro_batches)
    max_seq = max(mb.aligned.tokens.shape[1] for mb in micro_batches)
    max_mbs = max(mb.aligned.tokens.shape[0] for mb in micro_batches)
    outputs = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iterators,
        model=models if len(models) > 1 else models[0],
        num_microbatches=num_micro,
        seq_length=max_seq,
        micro_batch_size=max_mbs,
        forward_only=forward_only,
    )
    if ps.get_pipeline_model_parallel_world_size() > 1:
        outputs = _broadcast_from_last_stage(outputs if ps.is_pipeline_last_stage() else None)
    return outputs


def _broadcast_from_last_stage(outputs):
    """Send the last stage's per-micro-batch outputs to every PP rank (small objects)."""
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    src = torch.distributed.get_global_rank(group, ps.get_pipeline_model_parallel_world_size() - 1)
    box = [None if outputs is None else [_to_plain(o) for o in outputs]]
    torch.distributed.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _to_plain(output: dict) -> dict:
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in output.items()}


def token_logprobs(models: Sequence[torch.nn.Module], batch: dict, vocab_size: int,
                   micro_batch_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs [B, R] of `batch["responses"]` (0 where response_mask is 0), on every rank.

    `batch` needs input_ids, attention_mask, responses and response_mask.
    """
    from megatron.core import parallel_state as ps

    for key in ("input_ids", "attention_mask", "responses", "response_mask"):
        if key not in batch:
            raise KeyError(f"token_logprobs: batch has no {key!r} (has {sorted(batch)})")
    micro = split_micro_batches(batch, micro_batch_size, ps.get_tensor_model_parallel_world_size())
    with torch.no_grad():
        outputs = run_micro_batches(models, micro, vocab_size, forward_only=True,
                                    temperature=temperature)
    return torch.cat([o["log_probs"] for o in outputs], dim=0)
