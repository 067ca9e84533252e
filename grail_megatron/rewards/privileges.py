"""Dropping privileges for processes that touch model output (sympy's eval, MBPP code).

Run as root (the training containers do), a process gives itself a private network
namespace (loopback down, so no socket reaches anything) and then becomes an unprivileged
uid: RLIMIT_NPROC is ignored for uid 0, and only a non-root uid cannot read other users'
files or signal their processes. Run as a normal user, it enters a new user namespace so
that it can still create the network namespace.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass

NOBODY_UID = 65534
NOBODY_GID = 65534


@dataclass(frozen=True)
class Limits:
    """Resource limits applied with setrlimit (soft = hard, so they cannot be raised)."""

    address_space: int | None = 2 * 1024**3  # reference: RLIMIT_AS 2 GiB -> MemoryError
    cpu_seconds: int | None = None
    processes: int | None = None
    file_size: int | None = None
    open_files: int | None = 64  # reference: RLIMIT_NOFILE 64

    def apply(self) -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        for which, value in (
            (resource.RLIMIT_AS, self.address_space),
            (resource.RLIMIT_CPU, self.cpu_seconds),
            (resource.RLIMIT_NPROC, self.processes),
            (resource.RLIMIT_FSIZE, self.file_size),
            (resource.RLIMIT_NOFILE, self.open_files),
        ):
            if value is not None:
                resource.setrlimit(which, (value, value))


def isolate_network() -> None:
    """Move the calling process into a new network (and IPC) namespace."""
    flags = os.CLONE_NEWNET | os.CLONE_NEWIPC
    if os.geteuid() == 0:
        os.unshare(flags)
        return
    uid, gid = os.geteuid(), os.getegid()
    os.unshare(flags | os.CLONE_NEWUSER)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def drop_to(uid: int = NOBODY_UID, gid: int = NOBODY_GID) -> None:
    """Become ``uid``/``gid`` for good (no supplementary groups); a no-op when not root."""
    if os.geteuid() != 0:
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
