"""RNG state in verl's format: a ShardedObject "rng_state" sharded over (pp, tp), one per DP group.

Each rank stores [{random_rng_state, np_rng_state, torch_rng_state, rng_tracker_states,
(cuda_rng_state)}], exactly as verl's MegatronCheckpointManager, so a step written by
`save_checkpoint` has the `extra` (RNG) contents its verl manifest lists.
"""

from __future__ import annotations

import random


def collect_rng_state() -> dict:
    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def sharded_rng_state():
    """This rank's RNG state wrapped for dist_checkpointing (key "rng_state")."""
    from megatron.core import parallel_state as mpu
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state",
        [collect_rng_state()],
        (mpu.get_pipeline_model_parallel_world_size(), mpu.get_tensor_model_parallel_world_size()),
        (mpu.get_pipeline_model_parallel_rank(), mpu.get_tensor_model_parallel_rank()),
        replica_id=mpu.get_data_parallel_rank(with_context_parallel=True),
    )
