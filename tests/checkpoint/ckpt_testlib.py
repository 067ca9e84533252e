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
    import verl.utils.model  # noqa: F401  - verl's own dist checkpoint loader (test_checkpoint_verl_init)

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


def hf_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


class TENormStandIn(torch.nn.RMSNorm):
    """The state-dict interface of Transformer Engine's RMSNorm, which verl's GPU models use as
    the final norm (TE cannot be imported without CUDA): a torch RMSNorm plus TE's
    `get_extra_state` (pickled quantizer state as a uint8 tensor; `{}` without FP8) and its
    `set_extra_state` (None / empty / `{}` -> nothing to restore)."""

    def get_extra_state(self) -> torch.Tensor:
        import pickle

        return torch.frombuffer(bytearray(pickle.dumps({})), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        import pickle

        if state is None or state.numel() == 0:
            return
        assert pickle.loads(state.numpy().tobytes()) == {}


def _use_te_final_norm(models) -> None:
    from grail_megatron.megatron.bridge import unwrap

    for model in models:
        decoder = unwrap(model).decoder
        old = getattr(decoder, "final_layernorm", None)
        if old is not None:
            new = TENormStandIn(old.weight.shape, eps=old.eps, dtype=old.weight.dtype)
            decoder.final_layernorm = new


def verl_load(hf_dir, dist_dir, layouts, wrap_with_ddp, dtype=torch.float32):
    """Collective. For each (tp, pp): fresh Bridge chunks (seed unlike any saved weights), then
    verl 0.9.1's real `load_mcore_dist_weights(models, dist_dir)` exactly as its Megatron engine
    calls it; returns the full HF tensors before and after loading, per layout.
    layouts: (tp, pp) or (tp, pp, te_final_norm); te_final_norm swaps the final norm for
    `TENormStandIn`, so the model requests what verl's GPU (TE spec) model requests."""
    from transformers import AutoConfig
    from verl.utils.model import load_mcore_dist_weights

    from grail_megatron.megatron import parallel
    from grail_megatron.megatron.bridge import Bridge, BridgeConfig

    results = []
    for tp, pp, *te_final_norm in layouts:
        parallel.initialize(tp=tp, pp=pp, seed=1234)  # another init than the converted weights
        bridge = Bridge(AutoConfig.from_pretrained(str(hf_dir)), BridgeConfig(dtype=dtype))
        models = bridge.build_models(wrap_with_ddp=wrap_with_ddp)
        if te_final_norm and te_final_norm[0]:
            _use_te_final_norm(models)
        # clone: at TP1 PP1 an exported tensor may share storage with the parameter
        before = {name: tensor.clone() for name, tensor in bridge.export_hf_weights(models)}
        load_mcore_dist_weights(models, str(dist_dir))
        after = dict(bridge.export_hf_weights(models))
        results.append((before, after))
    return results


def verl_manager_load(hf_dir, actor_dir, tp, pp, load_contents=("model",)):
    """Collective. verl 0.9.1's real trainer-resume path for the model: a
    `MegatronCheckpointManager` (use_dist_checkpointing=True, as our recipe) on fresh DDP-wrapped
    chunks, `load_checkpoint(<step>/actor)`: content metadata from our checkpoint, sharded state
    dict with it, `load_dist_checkpointing`, then a strict `load_state_dict`. Returns full HF tensors."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig
    from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager

    from grail_megatron.megatron import parallel
    from grail_megatron.megatron.bridge import Bridge, BridgeConfig

    parallel.initialize(tp=tp, pp=pp, seed=4321)
    hf_config = AutoConfig.from_pretrained(str(hf_dir))
    bridge = Bridge(hf_config, BridgeConfig(dtype=torch.float32))
    models = bridge.build_models(wrap_with_ddp=True)
    contents = list(load_contents)
    manager = MegatronCheckpointManager(
        config=OmegaConf.create({"model": {"path": str(hf_dir)}}),
        checkpoint_config=OmegaConf.create({"save_contents": contents, "load_contents": contents}),
        model_config=None, transformer_config=bridge.transformer_config, role="actor", model=models,
        arch=hf_config.architectures[0], hf_config=hf_config, param_dtype=torch.float32,
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings), processing_class=None,
        optimizer=None, optimizer_scheduler=None, use_distributed_optimizer=False, use_dist_checkpointing=True)
    manager.load_checkpoint(str(actor_dir))
    return dict(bridge.export_hf_weights(models))
