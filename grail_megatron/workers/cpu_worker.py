"""verl's `TrainingWorker` (the process-local owner of one Megatron engine) on CPU cores.

Selected through verl's own extension point, `ActorRolloutRefWorker.actor_worker_cls` /
`ref_worker_cls`, and only on the CPU platform (`grail_megatron.workers.trainer`). Before verl's
constructor runs it does the three things verl would do differently on a GPU:

- the process group: verl builds the backend string `"cpu:gloo,<device>:<backend>"`, which with
  the CPU platform is `"cpu:gloo,cpu:gloo"` and torch rejects (duplicate device). verl skips its
  own `init_process_group` when one exists, so plain `gloo` is initialised here from the same
  RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT environment verl's Ray worker sets.
- Megatron's RNG tracker: `model_parallel_cuda_manual_seed` (which verl calls) forks CUDA RNG
  states; the inference tracker (no CUDA states, same seeding of the default generator) is
  created first, and Megatron then keeps it.
- the engine: verl registers its Megatron engines for device "cuda" only; the same classes are
  registered for "cpu" with verl's own `EngineRegistry.register`.
- the CPU adjustments of `grail_megatron.megatron.cpu_support` for this process.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
from verl.workers.engine_workers import TrainingWorker


def init_gloo_process_group() -> None:
    if torch.distributed.is_initialized():
        return
    torch.distributed.init_process_group(
        backend="gloo",
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        init_method=os.environ.get("DIST_INIT_METHOD") or None,
    )


def init_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    initialize_rng_tracker(inference_rng_tracker=True)


def register_megatron_engines_for_cpu() -> None:
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead, MegatronEngineWithValueHead

    for model_type, engine in (("language_model", MegatronEngineWithLMHead), ("value_model", MegatronEngineWithValueHead)):
        if "cpu" not in EngineRegistry._engines.get(model_type, {}).get("megatron", {}):
            EngineRegistry.register(model_type=model_type, backend="megatron", device="cpu")(engine)


class CpuTrainingWorker(TrainingWorker):
    def __init__(self, config):
        from grail_megatron.megatron.cpu_support import enable_verl_cpu_support

        enable_verl_cpu_support()
        init_gloo_process_group()
        init_cpu_rng_tracker()
        register_megatron_engines_for_cpu()
        super().__init__(config)


# verl's worker methods that run Megatron code. Ray runs actor methods in executor threads (and
# the async weight sync in the event loop's thread), and torch function modes are per thread.
MEGATRON_METHODS = ("init_model", "to", "compute_ref_log_prob", "compute_log_prob", "update_actor",
                    "load_checkpoint", "save_checkpoint", "update_weights")


def _ensure_cpu_support_in_this_thread() -> None:
    from grail_megatron.workers.plugins import on_cpu_platform

    if on_cpu_platform():
        from grail_megatron.megatron.cpu_support import enable_verl_cpu_support

        enable_verl_cpu_support()


def _in_cpu_thread(method):
    """`method` with the CPU support entered in the calling thread first (nothing on a GPU).

    functools.wraps copies the function's __dict__, which holds verl's @register dispatch
    attributes, so verl's worker group binds the wrapper exactly as the original."""
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def async_wrapper(*args, **kwargs):
            _ensure_cpu_support_in_this_thread()
            return await method(*args, **kwargs)

        return async_wrapper

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        _ensure_cpu_support_in_this_thread()
        return method(*args, **kwargs)

    return wrapper


def megatron_methods_in_cpu_threads(cls):
    """Class decorator for verl's hybrid worker subclasses (grail_megatron.workers.trainer)."""
    for name in MEGATRON_METHODS:
        setattr(cls, name, _in_cpu_thread(getattr(cls, name)))
    return cls
