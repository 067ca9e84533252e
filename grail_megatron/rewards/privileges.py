"""Dropping privileges for processes that touch model output (sympy's eval, MBPP code).

Run as root (the training containers do), a process gives itself a private network
namespace (loopback down, so no socket reaches anything) and then becomes an unprivileged
uid: RLIMIT_NPROC is ignored for uid 0, and only a non-root uid cannot read other users'
files or signal their processes. Run as a normal user (a SLURM node), it enters a new user
namespace mapping only its own uid, which lets it create the other namespaces and mounts;
the code it then runs gives up every capability (``drop_capabilities``). The MBPP zygote
maps its uid to 0 there (``as_root``: the IPC limits of its tests' IPC namespaces are
writable only by that root), and each test then enters a nested user namespace in which it
has the caller's uid again (``leave_namespace_root``).
"""
from __future__ import annotations

import ctypes
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
    """Move the calling process into a new network (and IPC) namespace; a non-root caller
    first enters its own user namespace."""
    flags = os.CLONE_NEWNET | os.CLONE_NEWIPC
    if os.geteuid() == 0:
        os.unshare(flags)
        return
    enter_user_namespace(flags)


def enter_user_namespace(flags: int = 0, as_root: bool = False) -> None:
    """Unshare a user namespace (with ``flags``) that maps only the caller's uid and gid:
    to themselves, or with ``as_root`` to 0 (the owner's root, the only uid that may write
    the IPC limits of an IPC namespace the new user namespace owns). Either way: full
    capabilities over the new namespaces, none over anything else."""
    uid, gid = os.geteuid(), os.getegid()
    os.unshare(os.CLONE_NEWUSER | flags)
    inside_uid, inside_gid = (0, 0) if as_root else (uid, gid)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{inside_uid} {uid} 1")
    _write("/proc/self/gid_map", f"{inside_gid} {gid} 1")


def enter_unprivileged_sandbox(flags: int = 0, as_root: bool = False,
                               nested: int = 0) -> None:  # pragma: no cover - parent never returns
    """For a non-root process: a user namespace of its own uid (mapped to 0 with
    ``as_root``) with fresh network, IPC and PID namespaces (plus ``flags``) in which at
    most ``nested`` user namespaces may exist (0: none). The caller returns as PID 1 of
    the new PID namespace (so every process it starts is invisible to, and cannot signal,
    anything outside); its parent only relays the exit status, and its death kills the
    caller (and with it the whole namespace)."""

    enter_user_namespace(os.CLONE_NEWNET | os.CLONE_NEWIPC | os.CLONE_NEWPID | flags, as_root=as_root)
    forbid_nested_user_namespaces(nested)
    become_namespace_init()


def leave_namespace_root(uid: int, gid: int, sysctl_dir: int | None = None) -> None:
    """From the root of a user namespace that ``enter_user_namespace(as_root=True)`` made:
    a nested user namespace in which the caller is ``uid``/``gid`` again (the ids it has
    outside), and in which no further user namespace may be created.

    The userns-mode test process does this after its IPC limits and mounts are in place:
    it then holds capabilities only over the nested namespace (which owns nothing), never
    over the IPC and mount namespaces the zygote's namespace owns, and shows the caller's
    uid (``os.getuid()``), as the reference's process does. ``sysctl_dir``: as for
    ``forbid_nested_user_namespaces``."""
    os.unshare(os.CLONE_NEWUSER)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} 0 1")
    _write("/proc/self/gid_map", f"{gid} 0 1")
    forbid_nested_user_namespaces(0, sysctl_dir)


def become_namespace_init() -> None:  # pragma: no cover - parent never returns
    """After ``unshare(CLONE_NEWPID)``: the caller returns as PID 1 of the new namespace,
    killed when its parent dies; the parent only relays the exit status."""
    import signal

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        os.read(read_end, 1)  # the child has set its death signal: no race with our death
        os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) & 0xFF)
    os.close(read_end)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        _raise_errno("prctl(PR_SET_PDEATHSIG)")
    os.close(write_end)


def nproc_counts_per_user_namespace() -> bool:
    """Linux >= 5.14 counts RLIMIT_NPROC per (user namespace, uid): inside our own user
    namespace the caller's other processes (the trainer, Ray) do not count."""
    import platform
    import re

    version = re.match(r"(\d+)\.(\d+)", platform.release())
    return bool(version) and (int(version[1]), int(version[2])) >= (5, 14)


def forbid_nested_user_namespaces(limit: int = 0, sysctl_dir: int | None = None) -> bool:
    """No process of our user namespace may create another one (its per-namespace
    ``max_user_namespaces`` becomes ``limit``, 0 by default): sandboxed code cannot regain
    capabilities. (The userns zygote allows its tests' namespaces, ``leave_namespace_root``,
    which allow none.) ``sysctl_dir``: a handle on a writable ``/proc/sys/user`` (the
    test's own /proc/sys is read-only by then); the entry resolves to the caller's
    namespace whichever procfs it is reached through.

    Defence in depth, so best effort (False where /proc/sys is read-only, as in many
    containers): a nested namespace would still find every mount locked (MNT_LOCKED and
    its read-only flag), unable to reveal what the tmpfs hides or write to the tree."""
    try:
        if sysctl_dir is None:
            _write("/proc/sys/user/max_user_namespaces", str(limit))
        else:
            handle = os.open("max_user_namespaces", os.O_WRONLY, dir_fd=sysctl_dir)
            try:
                os.write(handle, str(limit).encode())
            finally:
                os.close(handle)
    except OSError:
        return False
    return True


_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """Give up every capability for good: empty bounding set, empty effective/permitted/
    inheritable sets, no_new_privs (no setuid or file-capability binary restores any).

    For a process of a user namespace that maps only its own (non-zero) uid: without
    CAP_SYS_ADMIN it cannot unmount what hides the caller's files or remount them writable.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/sys/kernel/cap_last_cap") as handle:
        last_cap = int(handle.read())
    for cap in range(last_cap + 1):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            _raise_errno(f"prctl(PR_CAPBSET_DROP, {cap})")
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        _raise_errno("capset")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _raise_errno("prctl(PR_SET_NO_NEW_PRIVS)")


def _raise_errno(what: str) -> None:
    errno = ctypes.get_errno()
    raise OSError(errno, f"{what}: {os.strerror(errno)}")


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
