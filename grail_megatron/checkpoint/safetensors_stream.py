"""Write safetensors shards tensor by tensor, without holding a shard in memory.

The shard plan (names, shapes, dtypes -> file and byte range) is fixed before any data is
read, so each file's header is written first and every tensor is then written at its offset as
soon as it is produced. Peak memory is the tensor being written, not the shard.
Format (https://github.com/huggingface/safetensors): u64-LE header length, JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # "5GB", as transformers' save_pretrained
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 12345 -> bytes (decimal units like transformers)."""
    if isinstance(text, int):
        return text
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class _Shard:
    filename: str
    specs: list[TensorSpec] = field(default_factory=list)
    data_start: int = 0  # file offset where tensor data begins (after the header)
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[_Shard]:
    """Greedy packing in the given order; a tensor larger than the limit gets its own shard."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    total = len(groups)
    names = [SINGLE_FILE] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    return [_Shard(filename=name, specs=group) for name, group in zip(names, groups)]


class StreamingSafetensorsWriter:
    """Pre-plans shards, writes headers, then accepts tensors in any order via `write(name, t)`."""

    def __init__(self, out_dir: str | os.PathLike, specs: list[TensorSpec], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(specs, max_shard_bytes)
        self._where: dict[str, _Shard] = {}
        self._files = {}
        self._written: set[str] = set()
        self._specs = {s.name: s for s in specs}
        for shard in self.shards:
            self._open(shard, metadata or {"format": "pt"})

    def _open(self, shard: _Shard, metadata: dict) -> None:
        header: dict = {"__metadata__": metadata}
        cursor = 0
        for spec in shard.specs:
            header[spec.name] = {
                "dtype": SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [cursor, cursor + spec.nbytes],
            }
            shard.offsets[spec.name] = (cursor, cursor + spec.nbytes)
            cursor += spec.nbytes
            self._where[spec.name] = shard
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
        f = open(self.out_dir / shard.filename, "wb")
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        shard.data_start = 8 + len(raw)
        f.truncate(shard.data_start + cursor)  # full size now; regions are filled by write()
        self._files[shard.filename] = f

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._specs.get(name)
        if spec is None:
            raise KeyError(f"tensor {name!r} is not in the shard plan")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {spec.shape} {spec.dtype}")
        if name in self._written:
            raise ValueError(f"tensor {name!r} written twice")
        shard = self._where[name]
        begin, _end = shard.offsets[name]
        data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        f = self._files[shard.filename]
        f.seek(shard.data_start + begin)
        f.write(memoryview(data))
        self._written.add(name)

    def close(self) -> dict:
        """Check every planned tensor was written, fsync, close; write the index. Returns it."""
        missing = sorted(set(self._specs) - self._written)
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[:3]}")
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in self._specs.values())},
            "weight_map": {spec.name: shard.filename for shard in self.shards for spec in shard.specs},
        }
        if len(self.shards) > 1:
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return index

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
