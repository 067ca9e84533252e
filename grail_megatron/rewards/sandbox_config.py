"""Limits of the MBPP sandbox (one typed object shared by the pool, the zygote and the child)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from grail_megatron.rewards.privileges import NOBODY_GID, NOBODY_UID


@dataclass(frozen=True)
class SandboxConfig:
    timeout: float = 5.0  # per test, wall clock (the reference's per-test timeout)
    memory_bytes: int = 2 * 1024**3  # RLIMIT_AS, as the reference: MemoryError beyond it
    max_processes: int = 64  # RLIMIT_NPROC of the sandbox uid (counts all its processes)
    max_file_bytes: int = 16 * 1024**2  # RLIMIT_FSIZE
    max_open_files: int = 64  # RLIMIT_NOFILE, as the reference
    tmpfs_bytes: int = 64 * 1024**2  # the one tmpfs behind every shared dir of a test (/tmp, /run, ...)
    uid: int = NOBODY_UID  # root mode: tests switch to this uid/gid (userns: the zygote sets the caller's)
    gid: int = NOBODY_GID
    mode: str = "auto"  # auto | root | userns (sandbox_mode.py); the pool resolves "auto"
    hidden_dirs: tuple[str, ...] = ()  # userns mode: extra directories tests must not see
    # Replaced by the private tmpfs (jail.shared_dirs, found when the pool starts).
    shared_dirs: tuple[str, ...] = ()
    # userns mode: make the tree read-only one mount at a time, as on kernels < 5.12
    # (no mount_setattr), even where the single recursive call exists (tests use it).
    remount_each: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dirs", tuple(self.hidden_dirs))  # JSON gives a list
        object.__setattr__(self, "shared_dirs", tuple(self.shared_dirs))

    @property
    def cpu_seconds(self) -> int:
        # Backstop only: the wall-clock deadline kills first.
        return math.ceil(self.timeout) + 1

    def to_json_dict(self) -> dict:
        return asdict(self)
