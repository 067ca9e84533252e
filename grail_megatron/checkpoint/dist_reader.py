"""Read single tensors (or one layer of a stacked tensor) from a torch_dist checkpoint.

megatron-core's torch_dist format is a torch.distributed.checkpoint (DCP) directory. All
transformer layers of one parameter share a key with a leading layer axis
(`decoder.layers.mlp.linear_fc2.weight` has shape [num_layers, ...]), chunked the way the saving
ranks held them. A DCP load planner that asks for the chunk [layer, ...] reads only the bytes of
that layer, whatever TP/PP the checkpoint was saved with: that is what makes the conversion
streaming. (megatron's own `dist_checkpointing.load` cannot express "one layer" in a single
process: it assumes the other layers live on other ranks.) No process group is needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, IncompleteCheckpointError
from .layout import DIST_CKPT_METADATA

LAYER_PREFIX = "decoder.layers."


@dataclass(frozen=True)
class StoredTensor:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def _slice_planner(offsets: dict[str, tuple[int, ...]]):
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
        """Each destination tensor is the chunk of the stored tensor starting at `offsets[key]`."""

        def create_local_plan(self) -> LoadPlan:
            items = []
            for fqn, tensor in self.state_dict.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets[fqn]), sizes=tensor.size())
                items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            # the destination is a plain tensor standing for the chunk at offsets[fqn]
            return self.state_dict[index.fqn]

    return SlicePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


class DistCheckpointReader:
    def __init__(self, directory: str | os.PathLike):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.directory = Path(directory)
        if not (self.directory / DIST_CKPT_METADATA).is_file():
            raise IncompleteCheckpointError(
                f"{self.directory}: not a complete dist checkpoint (no {DIST_CKPT_METADATA}; missing or interrupted save)"
            )
        try:
            metadata = FileSystemReader(str(self.directory)).read_metadata()
        except Exception as exc:  # noqa: BLE001 - any unreadable metadata is a corrupt checkpoint
            raise CheckpointError(f"{self.directory}/{DIST_CKPT_METADATA}: cannot read ({type(exc).__name__}: {exc})") from exc
        self.tensors = {
            key: StoredTensor(key, tuple(md.size), md.properties.dtype)
            for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }

    def is_layered(self, key: str) -> bool:
        return key.startswith(LAYER_PREFIX)

    def read(self, requests: list[tuple[str, int | None]]) -> dict[tuple[str, int | None], torch.Tensor]:
        """Load several (key, layer) pieces in one pass; layer=None reads the whole tensor."""
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        if len({key for key, _ in requests}) != len(requests):
            raise ValueError("one read per key and call")
        state, offsets = {}, {}
        for key, layer in requests:
            stored = self.tensors.get(key)
            if stored is None:
                raise CheckpointError(f"{self.directory}: tensor {key} is not in the checkpoint")
            if layer is None:
                state[key] = torch.empty(stored.shape, dtype=stored.dtype)
                offsets[key] = (0,) * len(stored.shape)
            else:
                state[key] = torch.empty((1, *stored.shape[1:]), dtype=stored.dtype)
                offsets[key] = (layer,) + (0,) * (len(stored.shape) - 1)
        try:
            dcp_load(state, storage_reader=FileSystemReader(str(self.directory)), planner=_slice_planner(offsets),
                     no_dist=True)
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - truncated/missing shard files
            names = ", ".join(f"{k}[{layer}]" if layer is not None else k for k, layer in requests[:3])
            raise CheckpointError(f"{self.directory}: reading {names} failed: {type(exc).__name__}: {exc}") from exc
        return {(key, layer): state[key] if layer is None else state[key][0] for key, layer in requests}
