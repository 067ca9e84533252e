"""Helpers for the checkpoint tests: run a function on N gloo ranks, build tiny models."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback
from pathlib import Path

import torch


def preload() -> None:
    """Import the heavy libraries once in the parent so forked ranks do not each pay ~10 s."""
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import transformers  # noqa: F401

    import grail_megatron.checkpoint.store  # noqa: F401
    import grail_megatron.megatron.bridge  # noqa: F401
    import grail_megatron.megatron.parallel  # noqa: F401


preload()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world_size, port, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        result = fn(*args)
        # plain bytes: torch's shared-memory tensor passing breaks once the child has exited
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        from grail_megatron.megatron import parallel

        parallel.destroy()


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """Run fn(*args) on `world_size` forked processes (torchrun-style env); return per-rank results.

    Forking reuses the parent's imported torch/megatron (each spawn would re-import for ~10 s).
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in procs:
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def tiny_hf_model(out_dir: Path, arch: str = "qwen2", tie: bool = True, kv_heads: int = 2,
                  layers: int = 2, dtype: str = "float32", tokenizer_dir: Path | None = None) -> Path:
    """A random-init tiny HF model folder built with the project's own tiny-model maker.

    The tokenizer has an odd vocabulary (321 BPE tokens + 4 GRAIL tags = 325), so TP=2 pads
    the Megatron vocabulary and the converter has to trim it.
    """
    from grail_megatron.models.tiny import make_tiny_model, train_tokenizer

    if tokenizer_dir is None:
        tokenizer_dir = out_dir.parent / "tokenizer"
        if not tokenizer_dir.exists():
            texts = [f"Question: what is {a} + {b}? <answer>{a + b}</answer> The capital of France is Paris."
                     for a in range(20) for b in range(20)]
            train_tokenizer(texts, tokenizer_dir, vocab_size=321)
    return make_tiny_model(out_dir, arch=arch, tie_word_embeddings=tie, tokenizer_dir=tokenizer_dir,
                           kv_heads=kv_heads, layers=layers, dtype=dtype, heads=4, hidden=64)
