"""Minimal runtime adjustments that let megatron-core 0.18 train on CPU (gloo).

megatron-core assumes CUDA in a handful of places that have nothing to do with the maths.
Each adjustment below is small, named, documented with the exact failure it prevents, and
applied only when no GPU is present (`enable_cpu_support()` is a no-op with a GPU and is
idempotent). tests/megatron/test_megatron_cpu_support.py runs every case once without its
adjustment and asserts the original error.

| name            | what fails without it (CUDA build of torch, no driver)                        |
|-----------------|-------------------------------------------------------------------------------|
| current_device  | `torch.cuda.current_device()` in RoPE, TP layers and pipeline receive buffers |
|                 | raises "Found no NVIDIA driver": it answers "cpu" instead                     |
| cuda_literals   | schedules/clip_grads allocate with a literal `device="cuda"`; a global         |
|                 | TorchFunctionMode maps CUDA device arguments (and `Tensor.cuda()`) to the CPU |
| synchronize     | pipeline shape exchange calls `torch.cuda.synchronize()`: a no-op on CPU       |
| tensor_type     | Megatron's DistributedOptimizer and Float16 optimizer accept only parameters  |
|                 | whose `type()` is `torch.cuda.{Float,Half,BFloat16}Tensor` (TypeError on CPU), |
|                 | and gradient clipping asserts `grad.type() == 'torch.cuda.FloatTensor'`:      |
|                 | `Tensor.type()` without arguments answers the CUDA name for CPU tensors, and  |
|                 | Megatron's own clipping maths runs                                            |
| rng_tracker_load| (verl workers only) verl's resume restores Megatron's RNG tracker states; a   |
|                 | CPU run's inference tracker saved none (KeyError): nothing to restore         |

The TorchFunctionMode is per thread: wrap functions that run in other threads with
`on_cpu_thread`.

Not patches but settings (see `parallel.seed_everything` and `bridge.Bridge`): the RNG uses
`model_parallel_cuda_manual_seed(..., inference_rng_tracker=True)` (the CUDA tracker reads the
CUDA RNG state), models use the local (non Transformer-Engine) layer spec, dropout 0,
`use_cpu_initialization=True`, `sequence_parallel=False` and no fused kernels.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

_applied: set[str] = set()
_suspended: set[str] = set()  # removed for the moment by `without`
_thread = threading.local()  # .mode: the CudaToCpuMode entered in this thread


@dataclass(frozen=True)
class Adjustment:
    name: str
    why: str
    apply: Callable[[], None]
    revert: Callable[[], None]


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal for torch factory functions and Tensor.to/cuda.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA device arguments to "cpu"; `Tensor.cuda()` returns the tensor itself."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_current_device():
    return torch.device("cpu")


_originals: dict[str, object] = {}


def _patch_current_device() -> None:
    _originals["current_device"] = torch.cuda.current_device
    torch.cuda.current_device = _cpu_current_device


def _revert_current_device() -> None:
    torch.cuda.current_device = _originals.pop("current_device")


def _enter_mode_in_this_thread() -> None:
    """Torch function modes are per thread: each thread that runs Megatron code needs its own."""
    if getattr(_thread, "mode", None) is None:
        _thread.mode = CudaToCpuMode()
        _thread.mode.__enter__()  # stays active for the life of the thread


def _patch_cuda_literals() -> None:
    _enter_mode_in_this_thread()


def _revert_cuda_literals() -> None:
    mode = getattr(_thread, "mode", None)
    if mode is not None:
        mode.__exit__(None, None, None)
        _thread.mode = None


def _noop_synchronize(device=None) -> None:
    """Nothing runs asynchronously on the CPU, so there is nothing to wait for."""


def _patch_synchronize() -> None:
    _originals["synchronize"] = torch.cuda.synchronize
    torch.cuda.synchronize = _noop_synchronize


def _revert_synchronize() -> None:
    torch.cuda.synchronize = _originals.pop("synchronize")


def _cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
    """`Tensor.type()` as a query answers the CUDA type name for CPU tensors (conversions unchanged)."""
    original = _originals["tensor_type"]
    if dtype is not None or kwargs:
        return original(self, dtype, non_blocking, **kwargs)
    name = original(self)
    if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
        return "torch.cuda." + name[len("torch."):]
    return name


def _patch_tensor_type() -> None:
    _originals["tensor_type"] = torch.Tensor.type
    torch.Tensor.type = _cuda_type_name


def _revert_tensor_type() -> None:
    torch.Tensor.type = _originals.pop("tensor_type")


def _tolerant_load_rng_states(original):
    @functools.wraps(original)
    def load_rng_states(self, *args, **kwargs):
        from megatron.core import tensor_parallel

        try:
            return original(self, *args, **kwargs)
        except KeyError:
            # the saved tracker states are empty (a CPU run's inference tracker) and so are ours:
            # there is nothing to restore (dropout is 0 on CPU)
            if tensor_parallel.get_cuda_rng_tracker().get_states():
                raise

    return load_rng_states


def _patch_rng_tracker_load() -> None:
    from verl.utils.checkpoint import megatron_checkpoint_manager as manager

    _originals["rng_tracker_load"] = manager.MegatronCheckpointManager.load_rng_states
    manager.MegatronCheckpointManager.load_rng_states = _tolerant_load_rng_states(_originals["rng_tracker_load"])


def _revert_rng_tracker_load() -> None:
    from verl.utils.checkpoint import megatron_checkpoint_manager as manager

    manager.MegatronCheckpointManager.load_rng_states = _originals.pop("rng_tracker_load")


ADJUSTMENTS: tuple[Adjustment, ...] = (
    Adjustment("current_device", "torch.cuda.current_device() answers 'cpu'",
               _patch_current_device, _revert_current_device),
    Adjustment("cuda_literals", "device='cuda' arguments and .cuda() map to the CPU",
               _patch_cuda_literals, _revert_cuda_literals),
    Adjustment("synchronize", "torch.cuda.synchronize() is a no-op",
               _patch_synchronize, _revert_synchronize),
    Adjustment("tensor_type", "Tensor.type() names CPU tensors with the CUDA type names Megatron's "
               "mixed-precision and distributed optimizers (and gradient clipping) accept",
               _patch_tensor_type, _revert_tensor_type),
)
# verl-only: applied by enable_verl_cpu_support in verl's worker processes
VERL_ADJUSTMENTS: tuple[Adjustment, ...] = (
    Adjustment("rng_tracker_load", "resuming verl's checkpoint with the (empty) inference RNG tracker",
               _patch_rng_tracker_load, _revert_rng_tracker_load),
)
_BY_NAME = {a.name: a for a in ADJUSTMENTS + VERL_ADJUSTMENTS}
NAMES = tuple(a.name for a in ADJUSTMENTS)
VERL_NAMES = NAMES + tuple(a.name for a in VERL_ADJUSTMENTS)


def enable_cpu_support(skip: Iterable[str] = ()) -> list[str]:
    """Apply the CPU adjustments (all but `skip`) when no GPU is present; return those active.

    Idempotent; with a GPU it does nothing and returns []. `skip` exists for the tests that
    demonstrate what each adjustment prevents.
    """
    if torch.cuda.is_available():
        return []
    skip = set(skip)
    unknown = skip - set(NAMES)
    if unknown:
        raise ValueError(f"unknown CPU adjustments {sorted(unknown)}; known: {list(NAMES)}")
    for adjustment in ADJUSTMENTS:
        if adjustment.name in skip or adjustment.name in _applied or adjustment.name in _suspended:
            continue
        adjustment.apply()
        _applied.add(adjustment.name)
    if "cuda_literals" in _applied:
        _enter_mode_in_this_thread()  # a later call from another thread covers that thread too
    return sorted(_applied)


def is_enabled() -> bool:
    return bool(_applied)


def active() -> list[str]:
    return sorted(_applied)


@contextlib.contextmanager
def without(name: str):
    """Temporarily undo one adjustment (diagnostics and the tests that show why it exists)."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown CPU adjustment {name!r}; known: {list(NAMES)}")
    was_applied = name in _applied
    if was_applied:
        _BY_NAME[name].revert()
        _applied.discard(name)
    _suspended.add(name)  # a nested enable_cpu_support() must not bring it back
    try:
        yield
    finally:
        _suspended.discard(name)
        if was_applied:
            _BY_NAME[name].apply()
            _applied.add(name)


def on_cpu_thread(fn: Callable) -> Callable:
    """Decorate a function that runs in another thread: the device mode is per thread."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "cuda_literals" in _applied:
            with CudaToCpuMode():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def enable_verl_cpu_support() -> list[str]:
    """The adjustments verl's own Megatron engine needs in a CPU worker process (VERL_PLATFORM=cpu):
    all of `enable_cpu_support` plus VERL_ADJUSTMENTS. A no-op with a GPU, idempotent."""
    active_now = enable_cpu_support()
    if not active_now:
        return []
    for adjustment in VERL_ADJUSTMENTS:
        if adjustment.name not in _applied and adjustment.name not in _suspended:
            adjustment.apply()
            _applied.add(adjustment.name)
    return sorted(_applied)
