"""A verl platform for machines without a GPU: `VERL_PLATFORM=cpu` (set by `cluster=cpu`).

verl 0.9.1 asks `verl.plugin.platform.get_platform()` for every device decision (device name,
torch device module, collective backend, Ray resource, seeding). It ships CUDA, NPU and ROCm
platforms; this one is registered through verl's own `PlatformRegistry` and selected by the
`VERL_PLATFORM` environment variable, which verl reads before auto-detection.

Ray scheduling keeps verl's "GPU" resource: the CPU cluster advertises logical GPUs
(`ray.init(num_gpus=N)`), one per Megatron rank, so verl's placement groups and worker
groups are built exactly as on a GPU node.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch

PLATFORM_NAME = "cpu"


class CpuDeviceModule(types.ModuleType):
    """`torch.cpu` plus the `torch.cuda`-style calls verl makes on its device module.

    verl calls e.g. `get_torch_device().manual_seed(...)`, `.empty_cache()`,
    `.memory_allocated()`, `.get_device_name()` (flops counter) and `.mem_get_info()`;
    `torch.cpu` lacks those. Anything else is looked up on `torch.cpu`.
    """

    def __init__(self) -> None:
        super().__init__("grail_megatron_cpu_device")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def set_device(device: Any) -> None:
        """One device: nothing to select."""

    @staticmethod
    def synchronize(device: Any = None) -> None:
        """CPU kernels run synchronously."""

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def empty_cache() -> None:
        """No caching allocator on the CPU."""

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        """Nothing is tracked."""

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        import psutil

        memory = psutil.virtual_memory()
        return memory.available, memory.total

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)


def _platform_class():
    from verl.plugin.platform.platform_base import PlatformBase

    class PlatformCPU(PlatformBase):
        """verl on CPU cores: gloo collectives, logical Ray GPUs, no profiler, no IPC."""

        _module = CpuDeviceModule()

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> types.ModuleType:
            return self._module

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check: bool = False) -> bool:
            # Only ever chosen by name (VERL_PLATFORM=cpu): verl's auto-detection probes every
            # registered platform, and a CPU-only Ray actor on a GPU node (no nvidia-smi on PATH)
            # must keep verl's own fallback to "nvidia" rather than turn into a CPU run.
            import os

            return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME

        def current_device(self) -> int:
            return 0

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            """One device."""

        def synchronize(self, device_index: int | None = None) -> None:
            """Synchronous."""

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            """verl sets CUDA allocator options (expandable segments); nothing to set here."""

        def empty_cache(self) -> None:
            """No caching allocator."""

        def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            # Ray sets CUDA_VISIBLE_DEVICES for actors holding logical GPUs; reading it is harmless.
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            """No device profiler."""

        def profiler_stop(self) -> None:
            """No device profiler."""

        def ray_resource_name(self) -> str:
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> Any:
            return None

    return PlatformCPU


def register_cpu_platform() -> type:
    """Register the platform with verl (idempotent); selected only by VERL_PLATFORM=cpu."""
    from verl.plugin.platform import PlatformRegistry

    existing = PlatformRegistry.get(PLATFORM_NAME)
    if existing is not None and existing.__module__ == __name__:
        return existing
    return PlatformRegistry.register(platform=PLATFORM_NAME)(_platform_class())
