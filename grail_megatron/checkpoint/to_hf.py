"""Megatron dist checkpoint (verl layout, any TP/PP) -> Hugging Face folder, streaming, on CPU.

One process, no model is built: the checkpoint's tensor metadata gives every stored tensor's
global shape, the bridge's own name/tensor mapping (run on meta tensors) turns that into the
list of HF tensors, the safetensors shards are planned and their headers written, and then
the checkpoint is read one transformer layer at a time, mapped to HF tensors and written at
their offsets. Peak memory: one layer (or the embedding) plus a fixed overhead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .dist_reader import LAYER_PREFIX, DistCheckpointReader
from .errors import CheckpointError, UnsupportedModelError
from .fsutil import fsync_tree, remove_stale_temp_dirs, replace_dir
from .layout import ActorPaths, resolve_actor_dir
from .safetensors_stream import DEFAULT_MAX_SHARD_BYTES, StreamingSafetensorsWriter, TensorSpec

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
VOCAB_PADDED_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
# files of an HF folder that are weights or config (everything else there is tokenizer/processor)
_NOT_TOKENIZER = re.compile(r"(\.safetensors|\.bin|\.pt|\.index\.json|^config\.json|^generation_config\.json)$")


@dataclass
class ConversionReport:
    out_dir: Path
    num_tensors: int
    total_bytes: int
    shards: list[str]
    dtype: str
    seconds: float
    source_layout: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Unit:
    """One stored tensor (or one layer of it) and the HF tensors it becomes."""

    mcore_name: str  # e.g. decoder.layers.3.self_attention.linear_qkv.weight
    reads: tuple[str, ...]  # checkpoint keys, concatenated on dim 0 (2 for separately stored gate/up)
    layer: int | None
    outputs: tuple[TensorSpec, ...]


def check_supported(hf_config) -> None:
    model_type = getattr(hf_config, "model_type", None)
    archs = list(getattr(hf_config, "architectures", None) or [])
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} (architectures {archs}) is not supported; supported: "
            + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
        )
    if archs and archs != [SUPPORTED_ARCHITECTURES[model_type]]:
        raise UnsupportedModelError(f"architectures {archs} is not supported for model_type {model_type!r}")


def load_hf_config(actor: ActorPaths, hf_config_dir: str | os.PathLike | None):
    from transformers import AutoConfig

    source = Path(hf_config_dir) if hf_config_dir else actor.huggingface
    if not (source / "config.json").is_file():
        raise CheckpointError(
            f"{source}/config.json not found: the checkpoint has no HF config to tell the architecture "
            "(pass --hf-config DIR with the original model's config.json)"
        )
    try:
        config = AutoConfig.from_pretrained(str(source))
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad config
        kind = UnsupportedModelError if "model_type" in str(exc) or isinstance(exc, KeyError) else CheckpointError
        raise kind(f"{source}/config.json: cannot load ({type(exc).__name__}: {exc})") from exc
    check_supported(config)
    return config, source


def ensure_single_rank_group() -> None:
    """dist_checkpointing and the bridge need torch.distributed + Megatron groups: one CPU rank."""
    import torch.distributed as dist

    from grail_megatron.megatron import parallel

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("the converter runs in a single process; call it outside a multi-rank job")
        return
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    parallel.initialize(tp=1, pp=1, seed=0)


class _Mapper:
    """mcore name + full tensor -> HF names + tensors, through the project's Bridge (mbridge)."""

    def __init__(self, hf_config):
        from grail_megatron.megatron.bridge import Bridge

        self.vocab_size = int(hf_config.vocab_size)
        self._bridge = Bridge(hf_config)

    def __call__(self, mcore_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if mcore_name in VOCAB_PADDED_KEYS:
            # rows past the HF vocabulary are TP padding; trim them (mbridge's own trim assumes
            # the padding of the current process, not of the saving job)
            names = self._bridge.hf_names_of(mcore_name)
            return [(names[0], tensor[: self.vocab_size])]
        return self._bridge.mcore_to_hf(mcore_name, tensor)


def _layer_sort_key(name: str):
    match = re.search(r"\.layers\.(\d+)\.", name)
    return (0 if name.startswith("model.embed") else 1, int(match.group(1)) if match else 1 << 30, name)


def plan_units(reader: DistCheckpointReader, mapper: _Mapper, hf_config) -> list[_Unit]:
    """Every stored model tensor as (layer) units with the HF tensors they produce (meta tensors)."""
    keys = [k for k in reader.tensors if not k.startswith("optimizer.") and not k.endswith("_extra_state")]
    grouped: dict[str, tuple[str, ...]] = {}
    for key in keys:
        if key.endswith(("_w", "_v")) and key[:-2].endswith("linear_fc1.weight"):
            # saved with singleton_local_shards: gate (_w) and up (_v) under two keys
            grouped[key[:-2]] = (key[:-2] + "_w", key[:-2] + "_v")
        else:
            grouped[key] = (key,)
    num_layers = int(hf_config.num_hidden_layers)
    dtype = output_dtype(reader)
    units = []
    for base, reads in sorted(grouped.items()):
        stored = [reader.tensors[k] for k in reads]
        shape = list(stored[0].shape)
        shape[1 if reader.is_layered(base) else 0] = sum(s.shape[1 if reader.is_layered(base) else 0] for s in stored)
        layers = [None]
        if reader.is_layered(base):
            if shape[0] != num_layers:
                raise CheckpointError(
                    f"{reader.directory}: {base} stores {shape[0]} layers but config.json has "
                    f"num_hidden_layers={num_layers} (checkpoint and config do not match)"
                )
            layers, shape = list(range(num_layers)), shape[1:]
        for layer in layers:
            name = base if layer is None else f"{LAYER_PREFIX}{layer}.{base[len(LAYER_PREFIX):]}"
            try:
                produced = mapper(name, torch.empty(shape, dtype=stored[0].dtype, device="meta"))
            except (NotImplementedError, AssertionError, RuntimeError) as exc:
                raise UnsupportedModelError(f"{reader.directory}: cannot map checkpoint tensor {name}: {exc}") from exc
            outputs = tuple(TensorSpec(n, tuple(t.shape), dtype) for n, t in produced)
            units.append(_Unit(name, reads, layer, outputs))
    return units


def output_dtype(reader: DistCheckpointReader) -> torch.dtype:
    """The checkpoint's parameter dtype (the embedding's): every HF tensor is written in it.

    Megatron's local layer spec keeps RMSNorm weights in fp32 even in a bf16 model; HF keeps one
    dtype per model, so those are cast (bf16 stays bf16).
    """
    embedding = reader.tensors.get("embedding.word_embeddings.weight")
    if embedding is None:
        raise CheckpointError(f"{reader.directory}: no embedding.word_embeddings.weight (not a GPT model checkpoint?)")
    return embedding.dtype


def expected_hf_tensors(hf_config) -> dict[str, tuple[int, ...]]:
    """Names and shapes `from_pretrained` will look for (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if getattr(hf_config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    return expected


def check_against_config(units: list[_Unit], hf_config, source: Path) -> list[TensorSpec]:
    specs: dict[str, TensorSpec] = {}
    for unit in units:
        for spec in unit.outputs:
            if spec.name in specs:
                tied = getattr(hf_config, "tie_word_embeddings", None)
                raise CheckpointError(
                    f"{source}: two checkpoint tensors map to {spec.name}: config.json says "
                    f"tie_word_embeddings={tied} but the checkpoint stores a separate output layer"
                )
            specs[spec.name] = spec
    expected = expected_hf_tensors(hf_config)
    missing = sorted(set(expected) - set(specs))
    extra = sorted(set(specs) - set(expected))
    wrong = sorted(n for n in set(specs) & set(expected) if specs[n].shape != expected[n])
    if missing or extra or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:4]}")
        if extra:
            details.append(f"unexpected {extra[:4]}")
        if wrong:
            details += [f"{n}: checkpoint {specs[n].shape} vs config {expected[n]}" for n in wrong[:4]]
        raise CheckpointError(
            f"{source}: checkpoint does not match config.json "
            f"(tie_word_embeddings={getattr(hf_config, 'tie_word_embeddings', None)}): " + "; ".join(details)
        )
    return sorted(specs.values(), key=lambda s: _layer_sort_key(s.name))


def _write_config_and_tokenizer(hf_config, source: Path, tmp: Path, dtype: torch.dtype) -> None:
    from transformers import GenerationConfig

    hf_config.dtype = dtype  # saved as "dtype": "bfloat16" etc.
    hf_config.architectures = [SUPPORTED_ARCHITECTURES[hf_config.model_type]]
    hf_config.save_pretrained(str(tmp))
    if (source / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", tmp / "generation_config.json")
    else:
        GenerationConfig.from_model_config(hf_config).save_pretrained(str(tmp))
    for entry in source.iterdir():
        if entry.is_file() and not _NOT_TOKENIZER.search(entry.name):
            shutil.copy2(entry, tmp / entry.name)


def _source_layout(actor_dir: Path) -> dict:
    state = actor_dir.parent / "trainer_state.json"
    if state.is_file():
        return json.loads(state.read_text()).get("layout", {})
    return {}


def convert_to_hf(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    hf_config_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    before_publish=None,
) -> ConversionReport:
    """Write an HF folder for the model in `ckpt` (`.../global_step_N/actor` or `.../global_step_N`).

    `before_publish(tmp_dir)` runs on the finished temp folder before it is renamed to `out_dir`
    (the CLI's --verify): if it raises, nothing is published.
    """
    started = time.perf_counter()
    actor = ActorPaths.detect(resolve_actor_dir(ckpt))
    if not actor.actor.is_dir():
        raise CheckpointError(f"{ckpt}: checkpoint directory does not exist")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    hf_config, source = load_hf_config(actor, hf_config_dir)
    if not (actor.model_dist / ".metadata").exists() and list(actor.huggingface.glob("*.safetensors")):
        # verl's default (use_dist_checkpointing=False + bridge): weights already saved as HF
        return _reshard_hf_weights(actor, hf_config, source, out_dir, max_shard_bytes, progress, before_publish,
                                   started)
    ensure_single_rank_group()
    reader = DistCheckpointReader(actor.model_dist)
    mapper = _Mapper(hf_config)
    units = plan_units(reader, mapper, hf_config)
    specs = check_against_config(units, hf_config, actor.model_dist)
    dtype = specs[0].dtype

    with _staged_output(out_dir) as tmp:
        writer = StreamingSafetensorsWriter(tmp, specs, max_shard_bytes)
        try:
            index = _stream_layers(reader, mapper, units, specs, dtype, writer, progress)
        except BaseException:
            writer.abort()
            raise
        _publish(tmp, out_dir, hf_config, source, dtype, before_publish)
    shards = sorted(set(index["weight_map"].values()))
    return ConversionReport(out_dir, len(specs), index["metadata"]["total_size"], shards,
                            str(dtype).removeprefix("torch."), time.perf_counter() - started,
                            _source_layout(actor.actor))


def _hf_weight_files(folder: Path) -> dict[str, Path]:
    """{tensor name: file} of an HF folder's safetensors (via the index when there is one)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: folder / filename for name, filename in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise CheckpointError(f"{folder}: shard {path.name} listed in {index.name} is missing")
        return files
    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                files.update({name: path for name in f.keys()})
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    return files


def _reshard_hf_weights(actor: ActorPaths, hf_config, source: Path, out_dir: Path, max_shard_bytes: int,
                        progress: bool, before_publish, started: float) -> ConversionReport:
    """Checkpoint whose weights verl already saved as HF: validate and re-shard them, streaming."""
    from safetensors import safe_open

    files = _hf_weight_files(actor.huggingface)
    expected = expected_hf_tensors(hf_config)
    missing, extra = sorted(set(expected) - set(files)), sorted(set(files) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{actor.huggingface}: weights do not match config.json: missing {missing[:4]}, "
                              f"unexpected {extra[:4]}")
    specs = []
    try:
        for name in sorted(files, key=_layer_sort_key):
            with safe_open(str(files[name]), "pt") as f:
                sl = f.get_slice(name)
                shape, dtype = tuple(sl.get_shape()), getattr(torch, _SAFETENSORS_TO_TORCH[sl.get_dtype()])
            if shape != expected[name]:
                raise CheckpointError(f"{files[name]}: {name} has shape {shape}, config.json implies {expected[name]}")
            specs.append(TensorSpec(name, shape, dtype))
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{actor.huggingface}: unreadable safetensors ({exc})") from exc
    with _staged_output(out_dir) as tmp:
        writer = StreamingSafetensorsWriter(tmp, specs, max_shard_bytes)
        try:
            for spec in specs:
                with safe_open(str(files[spec.name]), "pt") as f:
                    writer.write(spec.name, f.get_tensor(spec.name))
            index = writer.close()
        except BaseException:
            writer.abort()
            raise
        _publish(tmp, out_dir, hf_config, source, specs[0].dtype, before_publish)
    return ConversionReport(out_dir, len(specs), index["metadata"]["total_size"], sorted(set(index["weight_map"].values())),
                            str(specs[0].dtype).removeprefix("torch."), time.perf_counter() - started,
                            _source_layout(actor.actor))


_SAFETENSORS_TO_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                         "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _batches(units: list[_Unit], layer: int | None):
    """A transformer layer is read in one pass; the big non-layer tensors one by one."""
    if layer is None:
        return [[u] for u in units]
    return [units] if units else []


def _stream_layers(reader, mapper, units, specs, dtype, writer, progress: bool) -> dict:
    """Read the checkpoint one layer at a time, map to HF tensors, write them; returns the index."""
    from tqdm import tqdm

    by_layer: dict[int | None, list[_Unit]] = {}
    for unit in units:
        by_layer.setdefault(unit.layer, []).append(unit)
    order = [None] + sorted(k for k in by_layer if k is not None)
    bar = tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="to-hf", disable=not progress)
    for layer in order:
        for unit_batch in _batches(by_layer.get(layer, []), layer):
            pieces = reader.read([(key, unit.layer) for unit in unit_batch for key in unit.reads])
            for unit in unit_batch:
                parts = [pieces.pop((key, unit.layer)) for key in unit.reads]
                full = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
                for name, tensor in mapper(unit.mcore_name, full):
                    writer.write(name, tensor.to(dtype))
                    bar.update(tensor.numel() * tensor.element_size())
                del parts, full, tensor  # free before the next read: peak = one piece, not two
            del pieces
    bar.close()
    return writer.close()


@contextlib.contextmanager
def _staged_output(out_dir: Path):
    """A temp folder next to `out_dir`, removed on any error: nothing half-written is left."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.incomplete-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out_dir: Path, hf_config, source, dtype, before_publish) -> None:
    """Config + tokenizer, fsync, the caller's check (--verify), then the atomic rename."""
    _write_config_and_tokenizer(hf_config, source, tmp, dtype)
    fsync_tree(tmp)
    if before_publish is not None:
        before_publish(tmp)
    if out_dir.exists():
        replace_dir(tmp, out_dir)
    else:
        os.replace(tmp, out_dir)
