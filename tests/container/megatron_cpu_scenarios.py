"""CPU scenarios that megatron-core 0.18.0 fails without a GPU; `patches/` fixes each one.

Run as a script in a fresh interpreter (the megatron tree under test comes first on
PYTHONPATH): `python megatron_cpu_scenarios.py rope schedules clip_grads`. It prints one
JSON object per line, `{"scenario", "ok", "error", "megatron"}`, and always exits 0 so the
caller can compare an unpatched and a patched tree scenario by scenario. Each scenario
checks exact values, so "ok" means the code ran on the CPU *and* computed the right thing.

Nothing here imports grail_megatron: the point is to exercise megatron-core alone,
without the runtime adjustments of grail_megatron.megatron.cpu_support.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import traceback
from typing import Callable

import torch


def _init_single_rank_gloo() -> None:
    """A one-rank gloo world: the collectives in the code under test really run."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )


def scenario_rope() -> None:
    """GPTModel's RoPE on the CPU, both initialisation modes (patch 0001)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    dim, seq = 16, 8
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    expected = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    for cpu_init in (True, False):
        rope = RotaryEmbedding(kv_channels=dim, rotary_percent=1.0, use_cpu_initialization=cpu_init)
        emb = rope(seq)
        assert emb.device.type == "cpu", emb.device
        assert torch.equal(emb, expected), (emb - expected).abs().max()


class _Scale(torch.nn.Module):
    """y = w * x with a megatron config: the smallest model the schedules accept."""

    def __init__(self, config) -> None:
        super().__init__()
        from megatron.core.transformer.enums import ModelType

        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.weight = torch.nn.Parameter(torch.tensor([2.0]))

    def set_input_tensor(self, tensor) -> None:  # called by the schedules
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x


def scenario_schedules() -> None:
    """forward_backward_no_pipelining with per-token loss on the CPU (patch 0002)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
    from megatron.core.transformer.transformer_config import TransformerConfig

    _init_single_rank_gloo()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    seen_tokens = []
    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, calculate_per_token_loss=True
    )
    config.finalize_model_grads_func = lambda models, num_tokens, **kw: seen_tokens.append(
        int(num_tokens)
    )
    model = _Scale(config)
    batches = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0])]

    def forward_step(data_iterator, model):
        x = next(data_iterator)

        def loss_func(output):
            loss = output.sum()
            return loss, torch.tensor(x.numel(), dtype=torch.int), {"loss": loss.detach()}

        return model(x), loss_func

    forward_backward_no_pipelining(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=3,
        micro_batch_size=1,
    )
    # d/dw sum_b sum_i w * x_bi = sum of all inputs; 5 tokens in two micro-batches.
    assert seen_tokens == [5], seen_tokens
    assert model.weight.grad.item() == 15.0, model.weight.grad


def scenario_clip_grads() -> None:
    """Gradient norm, clipping and zero count of megatron's optimizer on the CPU (patch 0003)."""
    from megatron.core.optimizer.clip_grads import (
        clip_grad_by_total_norm_fp32,
        count_zeros_fp32,
        get_grad_norm_fp32,
    )

    _init_single_rank_gloo()
    group = torch.distributed.group.WORLD
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    params[0].grad = torch.tensor([3.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0, 0.0])
    grads = [p.grad for p in params]

    norm = get_grad_norm_fp32(grads, norm_type=2, grad_stats_parallel_group=group)
    assert math.isclose(norm, 5.0, rel_tol=1e-6), norm
    inf_norm = get_grad_norm_fp32(grads, norm_type=math.inf, grad_stats_parallel_group=group)
    assert inf_norm == 4.0, inf_norm
    assert count_zeros_fp32(params, grad_stats_parallel_group=group) == 3

    clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    scale = 1.0 / (5.0 + 1.0e-6)
    assert torch.allclose(params[0].grad, torch.tensor([3.0 * scale, 0.0]), rtol=0, atol=1e-7)
    assert torch.allclose(params[1].grad, torch.tensor([0.0, 4.0 * scale, 0.0]), rtol=0, atol=1e-7)


def scenario_selftest_sees_patches() -> None:
    """docker/selftest/check_kernels.py's patch check accepts this tree (the image's check)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "docker" / "selftest" / "check_kernels.py"
    spec = importlib.util.spec_from_file_location("selftest_check_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.check_patches()


SCENARIOS: dict[str, Callable[[], None]] = {
    "rope": scenario_rope,
    "schedules": scenario_schedules,
    "clip_grads": scenario_clip_grads,
    "selftest_sees_patches": scenario_selftest_sees_patches,
}


def _describe(exc: BaseException) -> str:
    """`Type at file.py:line: message`, naming the deepest frame inside megatron/core."""
    frames = traceback.extract_tb(exc.__traceback__)
    in_megatron = [f for f in frames if f"{os.sep}megatron{os.sep}core{os.sep}" in f.filename]
    frame = (in_megatron or frames)[-1]
    return f"{type(exc).__name__} at {os.path.basename(frame.filename)}:{frame.lineno}: {exc}"


def run(names: list[str]) -> list[dict]:
    import megatron.core

    results = []
    for name in names:
        try:
            SCENARIOS[name]()
            results.append({"scenario": name, "ok": True, "error": ""})
        except Exception as exc:  # the failure itself is the result being reported
            results.append({"scenario": name, "ok": False, "error": _describe(exc)})
        results[-1]["megatron"] = os.path.dirname(megatron.core.__file__)
    return results


def main(argv: list[str]) -> int:
    names = argv or list(SCENARIOS)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        print(f"unknown scenario(s) {unknown}; choose from {sorted(SCENARIOS)}", file=sys.stderr)
        return 2
    for result in run(names):
        print(json.dumps(result), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
