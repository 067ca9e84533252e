"""The jail shared by MBPP tests and the sympy worker: what a process that runs model-written
text may see and do, beyond its uid and rlimits (``privileges.py``).

* ``shared_dirs()``: directories another process could use to talk to a jailed one (every
  world-writable directory, e.g. /tmp, /run/lock, /dev/shm, and every directory holding a
  Unix socket, found at pool start) plus /run and its aliases. Inside the jail each is
  replaced by a private, size-limited tmpfs (one per jailed process, shared by all of them,
  so the size bounds the total), writable for MBPP tests and read-only for the sympy worker;
  everything else is read-only.
* ``limit_ipc``: the limits of a fresh IPC namespace (System V and POSIX message queues),
  so that an IPC object cannot outlive its process or grow without bound. Writing them
  needs root in the user namespace that owns the IPC namespace: real root, or (userns
  mode) the zygote's user namespace, where the caller's uid is mapped to 0 for that reason.
* ``SyscallFilter``: a seccomp filter (libseccomp) refusing new namespaces (no nested user
  namespace, no escape from the mount/PID/IPC ones), Unix sockets, kernel keyrings (shared
  by every process of a uid), io_uring (it bypasses seccomp), ptrace and the mount API;
  with ``refuse_ipc``, also the creation of System V and POSIX IPC objects (the sympy
  worker, and MBPP tests where the IPC limits cannot be written).
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
import time

# /run holds the host's daemons' sockets; /var/run and /var/lock are usually links into it.
ALWAYS_PRIVATE = ("/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue", "/run", "/var/run", "/var/lock")
_PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")
_SCAN_DEPTH = 4  # /var/lib/php/sessions is 4 deep; 11k directories and 35 ms here
_SCAN_SECONDS = 2.0


def _scan(top: str, depth: int, deadline: float, found: set[str]) -> None:
    """Add world-writable directories and directories holding sockets under ``top``."""
    try:
        entries = list(os.scandir(top))
    except OSError:
        return
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISSOCK(info.st_mode):
            found.add(top)
        elif stat.S_ISDIR(info.st_mode) and entry.path not in _PSEUDO_FILESYSTEMS:
            if info.st_mode & stat.S_IWOTH:
                found.add(entry.path)  # covered whole: no need to look inside
            elif depth > 1 and time.monotonic() < deadline:
                _scan(entry.path, depth - 1, deadline, found)


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo", "rb") as handle:
        return [os.fsdecode(line.split()[4]).replace("\\040", " ") for line in handle]


@functools.lru_cache(maxsize=1)
def shared_dirs() -> tuple[str, ...]:
    """Outermost directories to replace by a private tmpfs (see the module docstring):
    ``ALWAYS_PRIVATE`` plus what a bounded scan of the tree and of every mount point finds."""
    found: set[str] = set()
    _scan("/", _SCAN_DEPTH, time.monotonic() + _SCAN_SECONDS, found)
    for point in _mount_points():
        try:
            if os.path.isdir(point) and os.stat(point).st_mode & stat.S_IWOTH:
                found.add(point)
        except OSError:
            continue
    found.update(ALWAYS_PRIVATE)
    real = {os.path.realpath(path) for path in found if os.path.isdir(path)}
    real.discard("/")
    return tuple(sorted(d for d in real if not any(d.startswith(o + os.sep) for o in real)))


# System V limits of a test's own IPC namespace (it dies with the test): a little for the
# rare program that uses it, never hundreds of megabytes; none at all for the sympy worker.
IPC_BOUNDED = {
    "kernel/shmmax": str(16 << 20), "kernel/shmall": str((16 << 20) // 4096), "kernel/shmmni": "4",
    "kernel/msgmni": "4", "kernel/sem": "32 128 32 4", "fs/mqueue/queues_max": "4",
}
IPC_NONE = {"kernel/shmmni": "0", "kernel/msgmni": "0", "kernel/sem": "0 0 0 0", "fs/mqueue/queues_max": "0"}


def limit_ipc(limits: dict[str, str], required: bool) -> bool:
    """Write the limits of the caller's (new) IPC namespace; True if all were written.

    ``required`` as root. In a user namespace the IPC sysctls are writable only by the uid
    mapped to 0 there (Linux >= 5.17 ties them to the IPC namespace and its owner's root);
    where they are not, the caller must refuse IPC creation instead (``SyscallFilter(
    refuse_ipc=True)``): the kernel defaults (4096 segments, no size bound) would let one
    test grow host memory without limit until it dies."""
    for name, value in limits.items():
        try:
            with open(f"/proc/sys/{name}", "w") as handle:
                handle.write(value)
        except OSError:
            if required:
                raise
            return False
    return True


# --------------------------------------------------------------------------- seccomp
_ACT_ALLOW = 0x7FFF0000
_CMP_EQ, _CMP_MASKED_EQ = 4, 7
_AF_UNIX = 1
_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
_REFUSED = (
    "unshare setns mount umount2 pivot_root chroot fsopen fsmount fspick fsconfig move_mount "
    "open_tree mount_setattr keyctl add_key request_key io_uring_setup io_uring_enter "
    "io_uring_register ptrace process_vm_readv process_vm_writev bpf userfaultfd perf_event_open"
).split()
# What creates an IPC object (a fresh IPC namespace has none to attach to or open).
_IPC_CREATION = "shmget msgget semget mq_open".split()


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class SyscallFilter:
    """Built once (in the zygote or the sympy worker), loaded by each jailed process;
    ``refuse_ipc``: also no System V segment, queue or semaphore set, no POSIX queue (ENOSPC,
    what a namespace whose limits are 0 answers)."""

    def __init__(self, refuse_ipc: bool = False) -> None:
        self.refuse_ipc = refuse_ipc
        try:
            self._lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        except OSError as exc:
            raise OSError(errno.ENOENT, f"libseccomp.so.2 not found (install libseccomp2): {exc}") from None
        self._lib.seccomp_init.restype = ctypes.c_void_p
        self._lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self._lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        self._lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self._lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self._ctx = self._lib.seccomp_init(_ACT_ALLOW)
        if not self._ctx:
            raise OSError(errno.ENOMEM, "seccomp_init failed")
        eperm = _errno_action(errno.EPERM)
        for name in _REFUSED:
            self._rule(name, eperm)
        self._rule("clone3", _errno_action(errno.ENOSYS))  # flags are behind a pointer: libc falls back to clone
        for flag in _NAMESPACE_FLAGS:
            self._rule("clone", eperm, _ArgCmp(0, _CMP_MASKED_EQ, flag, flag))
        for name in ("socket", "socketpair"):
            self._rule(name, eperm, _ArgCmp(0, _CMP_EQ, _AF_UNIX, 0))
        if refuse_ipc:
            for name in _IPC_CREATION:
                self._rule(name, _errno_action(errno.ENOSPC))

    def _rule(self, name: str, action: int, *conditions: _ArgCmp) -> None:
        number = self._lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # not a syscall on this architecture
            return
        array = (_ArgCmp * max(1, len(conditions)))(*conditions)
        result = self._lib.seccomp_rule_add_array(self._ctx, action, number, len(conditions), array)
        if result != 0:
            raise OSError(-result, f"seccomp rule for {name}: {os.strerror(-result)}")

    def load(self) -> None:
        """Install the filter on the calling thread for good (sets no_new_privs)."""
        result = self._lib.seccomp_load(self._ctx)
        if result != 0:
            raise OSError(-result, f"seccomp_load: {os.strerror(-result)}")
