"""torch.distributed + Megatron model-parallel groups, from torchrun's environment.

`initialize(tp, pp, seed)` is the one call a rank makes before building models: it starts
the process group (gloo without a GPU, nccl with one), applies the CPU adjustments when
needed, creates Megatron's TP/PP(/VPP) groups and seeds every RNG Megatron uses.
The data-parallel size is whatever is left: world_size / (tp * pp).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # virtual pipeline chunks per PP rank (None = no interleaving)
    seed: int = 0

    def __post_init__(self):
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp} pp={self.pp}")
        if self.vpp is not None and (self.vpp < 1 or self.pp < 2):
            raise ValueError(f"vpp={self.vpp} needs pp >= 2 (got pp={self.pp})")


def has_gpu() -> bool:
    return torch.cuda.is_available()


def backend() -> str:
    return "nccl" if has_gpu() else "gloo"


def _require_env(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(
            f"environment variable {name} is not set: start this program with torchrun "
            "(or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
        )
    return value


def initialize(tp: int = 1, pp: int = 1, seed: int = 0, vpp: int | None = None,
               timeout_minutes: int = 30) -> ParallelConfig:
    """Start torch.distributed from torchrun's env and Megatron's parallel groups."""
    from megatron.core import parallel_state

    from grail_megatron.megatron import cpu_support

    config = ParallelConfig(tp=tp, pp=pp, vpp=vpp, seed=seed)
    cpu_support.enable_cpu_support()
    if not torch.distributed.is_initialized():
        rank = int(_require_env("RANK"))
        world_size = int(_require_env("WORLD_SIZE"))
        _require_env("MASTER_ADDR")
        _require_env("MASTER_PORT")
        if has_gpu():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(
            backend=backend(), rank=rank, world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    world_size = torch.distributed.get_world_size()
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)
    return config


def seed_everything(seed: int) -> None:
    """Seed python/torch and Megatron's tensor-parallel RNG tracker.

    Each PP stage gets its own seed offset (as Megatron's training loop does) so stages do not
    draw identical random streams; the TP tracker gives TP ranks their own model-parallel
    stream. `inference_rng_tracker=True` selects the tracker that works without CUDA RNG state.
    """
    import random

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    torch.manual_seed(seed)
    # force_reset_rng: a re-initialisation (other TP/PP) must rebuild the tracker, too
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not has_gpu(), force_reset_rng=True)


def destroy() -> None:
    """Tear down Megatron's groups and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def ranks() -> dict[str, int]:
    """This rank's coordinates (handy for logging and for deciding who writes files)."""
    from megatron.core import parallel_state as ps

    return {
        "rank": torch.distributed.get_rank(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }
