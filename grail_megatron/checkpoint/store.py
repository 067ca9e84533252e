"""Write the converter's checkpoints atomically, and load model weights at any TP/PP.

`convert from-hf` and `convert reshard` (relayout.py) call `save_checkpoint` on every rank (it
is collective): model weights and RNG state are written with megatron-core
`dist_checkpointing` (torch_dist) in verl 0.9.1's directory layout (see `layout.py`), without
optimizer state, into `<root>/.incomplete.global_step_<N>`; rank 0 then fsyncs, writes the
completion marker, renames the directory to `global_step_<N>` and only then updates
`latest_checkpointed_iteration.txt`. A crash at any point leaves either the previous complete
step or the new one, never a directory that looks finished but is not. verl's trainer starts
from such a step (`dist_checkpointing_path`); training checkpoints themselves are written and
loaded by verl's checkpoint manager on both paths. `load_model_weights` reads the weights of
a dist checkpoint saved at any TP/PP into this rank's chunks (reshard, `--verify`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .fsutil import atomic_write_text, fsync_tree, replace_dir
from .layout import (
    DATALOADER_FILE,
    ROLE,
    TRACKER_FILE,
    TRAINER_STATE_FILE,
    TRANSFORMER_CONFIG_FILE,
    VERL_MANIFEST_FILE,
    ActorPaths,
    step_dir,
    temp_step_dir,
)
from .manifest import write_marker

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- distributed helpers


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast_from_rank0(obj):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_on_rank0(fn, *args):
    """Run fn on rank 0 and share its result; its error is raised on every rank (no rank hangs)."""
    outcome = (None, None)
    if _rank() == 0:
        try:
            outcome = (fn(*args), None)
        except Exception as exc:  # noqa: BLE001 - forwarded to all ranks below
            outcome = (None, exc if isinstance(exc, CheckpointError) else CheckpointError(f"{type(exc).__name__}: {exc}"))
    value, error = _broadcast_from_rank0(outcome)
    if error is not None:
        raise error
    return value


# ----------------------------------------------------------------------------- sharded state dicts


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _sharding_metadata() -> dict:
    # Same flags as verl's MegatronCheckpointManager._build_sharded_state_dict_metadata, so the
    # tensors get the same keys (e.g. fused gate/up stored as one key, not `_w`/`_v`).
    return {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def model_sharded_state_dict(models: Sequence) -> dict:
    """{"model": ...} for one chunk, {"model0": ..., "model1": ...} for virtual pipeline chunks."""
    from megatron.core import parallel_state as mpu

    metadata = dict(_sharding_metadata(), dp_cp_group=mpu.get_data_parallel_group(with_context_parallel=True))
    result = {}
    for index, model in enumerate(models):
        key = "model" if len(models) == 1 else f"model{index}"
        if len(models) > 1:
            mpu.set_virtual_pipeline_model_parallel_rank(index)
        result[key] = _unwrap(model).sharded_state_dict(metadata=metadata)
    return result


# Norms that Transformer Engine's layer spec builds as a standalone TE module (TENorm) while the
# local spec (CPU) uses a torch norm; the input/pre-MLP norms are fused into TE linears on GPU
# and mapped onto them by the local spec's `sharded_state_dict_keys_map`, so they need nothing.
TE_STANDALONE_NORMS = ("decoder.final_layernorm",)


def add_te_extra_states(model_sd: dict) -> dict:
    """Give the saved model the `_extra_state` entries a Transformer Engine model asks for.

    verl on GPUs builds the TE spec, whose final norm (TE's RMSNorm) has an `_extra_state`
    (FP8 metadata, empty without FP8). `dist_checkpointing.load` requests it, and torch DCP
    fails on a checkpoint without it ("Missing key in checkpoint state_dict:
    decoder.final_layernorm._extra_state/shard_0_1"). The local spec's torch norm has none,
    so we store an empty one: None, which TE's `set_extra_state` ignores and verl's initial
    load never applies. Replicated like the norm's weight (same replica ids).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

    for chunk in model_sd.values():
        present = {getattr(v, "key", None) for v in chunk.values()}
        for name, value in list(chunk.items()):
            for norm in TE_STANDALONE_NORMS:
                extra = f"{norm}._extra_state"
                if isinstance(value, ShardedTensor) and value.key == f"{norm}.weight" and extra not in present:
                    chunk[name.removesuffix("weight") + "_extra_state"] = make_sharded_object_for_checkpoint(
                        None, extra, (), replica_id=value.replica_id)
                    present.add(extra)
    return model_sd


def _save_strategy():
    from megatron.core import parallel_state as mpu
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return FullyParallelSaveStrategyWrapper(
        TorchDistSaveShardedStrategy("torch_dist", 1), mpu.get_data_parallel_group(with_context_parallel=True)
    )


def _load_strategy():
    from megatron.core import parallel_state as mpu
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    return FullyParallelLoadStrategyWrapper(
        TorchDistLoadShardedStrategy(), mpu.get_data_parallel_group(with_context_parallel=True)
    )


def in_process_results_queue() -> None:
    """Synchronous saves report write results through a queue in this same process.

    megatron-core creates it as `multiprocessing.Manager().Queue()` (needed only for its async
    saves, which write from another process): that starts a server process which then imports
    torch to unpickle the first result, 4-10 s per rank and process on CPU. All our saves are
    synchronous, so a plain in-process queue carries the same results.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def dist_save(state_dict: dict, directory: Path) -> None:
    from megatron.core import dist_checkpointing

    in_process_results_queue()
    dist_checkpointing.save(
        state_dict, str(directory), sharded_strategy=_save_strategy(), content_metadata=_sharding_metadata()
    )


def dist_load(state_dict: dict, directory: Path) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        return dist_checkpointing.load(state_dict, str(directory), sharded_strategy=_load_strategy())
    except (CheckpointingException, CheckpointException, OSError, EOFError, RuntimeError, ValueError, KeyError) as exc:
        # torch.distributed.checkpoint reports unreadable shard files as CheckpointException (a
        # RuntimeError); name the directory so the caller can refuse this step and try another
        raise CheckpointError(f"{directory}: cannot load ({type(exc).__name__}: {exc})") from exc


# ----------------------------------------------------------------------------- save


def _layout_info(models: Sequence) -> dict:
    from megatron.core import parallel_state as mpu

    return {
        "tp": mpu.get_tensor_model_parallel_world_size(),
        "pp": mpu.get_pipeline_model_parallel_world_size(),
        "dp": mpu.get_data_parallel_world_size(),
        "vpp": len(models),
    }


def _transformer_config_json(models: Sequence) -> dict | None:
    config = getattr(_unwrap(models[0]), "config", None)
    if config is None:
        return None
    from dataclasses import fields, is_dataclass

    def plain(value):
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value) if not callable(value) else None

    if not is_dataclass(config):
        return None
    return {f.name: plain(getattr(config, f.name, None)) for f in fields(config) if not callable(getattr(config, f.name, None))}


def _verl_manifest(step: int, paths: ActorPaths, has_hf: bool, world_size: int) -> dict:
    """verl's `ckpt_contents.json` (schema v2) so verl's tooling can locate our contents."""
    rel = lambda p: os.path.relpath(p, paths.actor)  # noqa: E731
    contents = {
        "model": {"path": rel(paths.model_dist), "format": "megatron_dist_checkpoint", "backend": "dist_checkpointing"},
        "rng_state": {"path": rel(paths.extra_dist), "format": "megatron_dist_checkpoint", "key": "rng_state"},
        "transformer_config": {"path": TRANSFORMER_CONFIG_FILE, "format": "json"},
    }
    if has_hf:
        contents["hf_config"] = {"path": rel(paths.huggingface), "format": "huggingface"}
    return {
        "schema_version": 2,
        "framework": "megatron",
        "role": ROLE,
        "global_step": int(step),
        "world_size": world_size,
        "backend": {"has_bridge": False, "use_dist_checkpointing": True, "peft": False},
        "save_contents": ["model", "extra"],
        "contents": contents,
        "saved_any_dist_ckpt": True,
        "writer": "grail-megatron",
    }


def _prepare_temp_dir(tmp: Path, paths: ActorPaths) -> None:
    if tmp.exists():
        logger.warning("removing leftover incomplete checkpoint %s", tmp)
        shutil.rmtree(tmp)
    for directory in (paths.model_dist, paths.extra_dist):
        directory.mkdir(parents=True)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def _copy_hf_assets(source: Path, target: Path) -> None:
    """Config, tokenizer and generation config files of an HF folder, not its weights."""
    if not (source / "config.json").is_file():
        raise CheckpointError(f"{source}: hf_assets_dir is not an HF model folder (no config.json)")
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.is_file() and not entry.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(entry, target / entry.name)


def _write_rank0_files(step, paths, tmp, hf_config, hf_assets_dir, extra_state, dataloader_state, layout,
                       transformer_config, world_size) -> None:
    import torch

    if hf_assets_dir is not None:
        _copy_hf_assets(Path(hf_assets_dir), paths.huggingface)
    if hf_config is not None:
        paths.huggingface.mkdir(parents=True, exist_ok=True)
        hf_config.save_pretrained(paths.huggingface)
    if transformer_config is not None:
        (paths.actor / TRANSFORMER_CONFIG_FILE).write_text(json.dumps(transformer_config, indent=2))
    if dataloader_state is not None:
        torch.save(dataloader_state, tmp / DATALOADER_FILE)
    trainer_state = {"step": int(step), "layout": layout, "saved_unix": time.time(), "state": extra_state or {}}
    (tmp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=2, default=str))
    manifest = _verl_manifest(step, paths, paths.huggingface.is_dir(), world_size)
    (paths.actor / VERL_MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _finalize(root: Path, step: int, tmp: Path, layout: dict) -> None:
    fsync_tree(tmp)
    write_marker(tmp, step, info={"layout": layout})
    replace_dir(tmp, step_dir(root, step))
    atomic_write_text(root / TRACKER_FILE, str(int(step)))


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    models: Sequence,
    *,
    hf_config=None,
    hf_assets_dir: str | os.PathLike | None = None,
    extra_state: dict | None = None,
    dataloader_state: Any = None,
) -> Path:
    """Collective: write step `step` under `root` atomically and point the tracker at it.

    Model weights, RNG state, HF config and trainer state; no optimizer state (verl's trainer
    starts from such a step with a fresh optimizer). models: the rank's GPTModel chunks (one
    per virtual pipeline stage; wrappers with `.module` are unwrapped). hf_config: saved to
    `actor/model/huggingface/`. hf_assets_dir: an HF model folder whose config, tokenizer and
    generation config files are copied there (weights are not copied). extra_state:
    JSON-serialisable trainer state, stored in `trainer_state.json` under "state".
    dataloader_state: any picklable object, stored as `data.pt` (as verl stores
    `StatefulDataLoader.state_dict()`). Returns the final step directory.
    """
    import torch.distributed as dist

    root = Path(root)
    tmp = temp_step_dir(root, step)
    paths = ActorPaths.v2(tmp / ROLE)
    layout = _layout_info(models)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    _run_on_rank0(lambda: (root.mkdir(parents=True, exist_ok=True), _prepare_temp_dir(tmp, paths)))

    dist_save(add_te_extra_states(model_sharded_state_dict(models)), paths.model_dist)
    from .rng import sharded_rng_state

    dist_save({"rng_state": sharded_rng_state()}, paths.extra_dist)

    transformer_config = _transformer_config_json(models)
    _run_on_rank0(
        _write_rank0_files, step, paths, tmp, hf_config, hf_assets_dir, extra_state, dataloader_state, layout,
        transformer_config, world_size,
    )
    # Each rank flushes what it wrote (its own .distcp files) before rank 0 seals the step.
    rank = _rank()
    fsync_tree(paths.actor, name_filter=lambda name: name.startswith(f"__{rank}_"))
    _barrier()
    _run_on_rank0(_finalize, root, step, tmp, layout)
    _barrier()
    return step_dir(root, step)


# ----------------------------------------------------------------------------- load

VOCAB_PADDED_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def load_model_weights(models: Sequence, model_dist_dir: Path) -> None:
    """Collective: load model weights saved at any TP/PP (dist_checkpointing reshards them).

    The vocabulary rows are padded to a multiple of TP, so the embedding / output layer of a
    checkpoint saved at another TP may have a different number of rows: those two tensors are
    read whole and this rank's rows copied (extra padding rows are zero).
    """
    import torch
    from megatron.core.dist_checkpointing import load_tensors_metadata
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from .dist_reader import DistCheckpointReader

    sharded = model_sharded_state_dict(models)
    stored = load_tensors_metadata(str(model_dist_dir))
    resized = []
    for chunk_key, chunk in sharded.items():
        for name, sh in list(chunk.items()):
            if (isinstance(sh, ShardedTensor) and sh.key in VOCAB_PADDED_KEYS and sh.key in stored
                    and tuple(stored[sh.key].global_shape) != tuple(sh.global_shape)):
                resized.append((chunk_key, name, chunk.pop(name)))
    loaded = dist_load(sharded, model_dist_dir)
    if resized:
        reader = DistCheckpointReader(model_dist_dir)
        full = reader.read([(sh.key, None) for _, _, sh in resized])
        for chunk_key, name, sh in resized:
            source = full[(sh.key, None)]
            if source.shape[1:] != tuple(sh.global_shape[1:]):
                raise CheckpointError(f"{model_dist_dir}: {sh.key} has shape {tuple(source.shape)}, model needs "
                                      f"(*, {sh.global_shape[1:]})")
            start = sh.global_offset[0]
            rows = torch.zeros(sh.local_shape, dtype=sh.data.dtype)
            take = max(0, min(source.shape[0] - start, sh.local_shape[0]))
            rows[:take] = source[start:start + take]
            loaded[chunk_key][name] = rows
    for index, model in enumerate(models):
        key = "model" if len(models) == 1 else f"model{index}"
        if key not in loaded:
            raise CheckpointError(f"{model_dist_dir}: no '{key}' entry (saved with a different number of chunks?)")
        _unwrap(model).load_state_dict(loaded[key], strict=True)
