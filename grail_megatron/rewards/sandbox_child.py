"""What runs inside one sandboxed test process (forked from the zygote, see ``zygote.py``).

``run_test`` never returns: it confines the process, executes ``program`` the way GRAIL's
reference subprocess does, writes one JSON verdict to ``result_fd`` and ``_exit``s.

Reference semantics kept for identical verdicts (GRAIL ``execution.py``): the code runs with
``exec(program, {})`` (full builtins, ``__name__`` resolves to ``"builtins"``), stdout and
stderr are write-only sinks and ``sys.stdin`` is ``None``; ``exit``/``quit``, a list of
``os``/``shutil`` functions and ``subprocess.Popen`` are ``None``; a list of modules cannot be
imported; RLIMIT_AS 2 GiB turns huge allocations into MemoryError; an uncaught SystemExit
ends the process without a verdict ("process_error"). Only the confinement underneath is
ours (namespaces, uid, rlimits, private tmpfs).
"""
from __future__ import annotations

import builtins
import ctypes
import faulthandler
import io
import json
import os
import re
import shutil
import subprocess
import sys

from grail_megatron.rewards.privileges import Limits, drop_capabilities, drop_to

# The reference's reliability_guard: these become None ...
_NULLED_OS = (
    "kill system putenv remove removedirs rmdir fchdir setuid fork forkpty killpg rename renames "
    "truncate replace unlink fchmod fchown chmod chown chroot lchown"
).split()
_NULLED_SHUTIL = ("rmtree", "move", "chown")
# ... and these modules cannot be imported.
_BLOCKED_MODULES = frozenset(
    "ipdb joblib resource psutil tkinter multiprocessing threading socket http urllib ftplib "
    "telnetlib asyncio".split()
)

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/dev/shm")


class _WriteOnlySink(io.TextIOBase):
    """The reference's WriteOnlyStringIO, minus keeping the text (nothing reads it)."""

    def write(self, text: str) -> int:
        return len(text)

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def read(self, *args, **kwargs):
        raise io.UnsupportedOperation("not readable")

    readline = read
    readlines = read


def _mount(libc, source: bytes, target: bytes, fstype: bytes | None, flags: int, data: bytes | None) -> None:
    if libc.mount(source, target, fstype, flags, data) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {target.decode()}: {os.strerror(errno)}")


def import_path_exposure(paths: list[str]) -> dict[str, list[str]]:
    """Import directories an unprivileged uid cannot reach, grouped by the top-most
    ancestor that blocks traversal (e.g. a Python installed under /root, mode 0700).

    The child covers each blocking ancestor with an empty tmpfs and bind-mounts only the
    import directories back, so ``import unicodedata`` works as it does for the reference
    (same user as the trainer) while the rest of that tree stays out of sight.
    """
    plan: dict[str, list[str]] = {}
    for path in sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)}):
        blocker = None
        parts = path.split(os.sep)
        for depth in range(2, len(parts)):
            ancestor = os.sep.join(parts[:depth])
            if not os.stat(ancestor).st_mode & 0o001:
                blocker = ancestor
                break
        if blocker is None:
            continue
        needed = plan.setdefault(blocker, [])
        if not any(path == kept or path.startswith(kept + os.sep) for kept in needed):
            needed.append(path)
    return plan


def private_mounts_with_import_paths(paths: list[str]) -> None:
    """For a root process about to drop to an unprivileged uid: a private mount namespace
    in which the import directories stay readable (see ``import_path_exposure``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    os.unshare(os.CLONE_NEWNS)
    _mount(libc, b"none", b"/", None, _MS_REC | _MS_PRIVATE, None)
    _expose(libc, import_path_exposure(paths))


def _expose(libc, plan: dict[str, list[str]]) -> None:
    for blocker, needed in plan.items():
        handles = [os.open(path, os.O_PATH | os.O_DIRECTORY) for path in needed]
        _mount(libc, b"tmpfs", blocker.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=1m,mode=0755")
        for path, handle in zip(needed, handles):
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{handle}".encode(), path.encode(), None, _MS_BIND | _MS_REC, None)
            os.close(handle)


def hiding_plan(hidden: tuple[str, ...], paths: list[str]) -> dict[str, list[str]]:
    """For ``userns`` mode: each directory to hide (outermost only) with the import
    directories inside it that must stay visible (bind-mounted back, read-only)."""
    imports = sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)})
    outermost = [d for d in hidden if not any(d != o and d.startswith(o + os.sep) for o in hidden)]
    plan: dict[str, list[str]] = {}
    for directory in outermost:
        needed = plan.setdefault(directory, [])
        for path in imports:
            inside = path == directory or path.startswith(directory + os.sep)
            if inside and not any(path == kept or path.startswith(kept + os.sep) for kept in needed):
                needed.append(path)
    return plan


_SYS_MOUNT_SETATTR = 442  # the same number on x86_64 and aarch64
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
_MS_REMOUNT = 0x20
# Per-mount flags a remount inside a user namespace must repeat (they are locked).
_LOCKED_OPTIONS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC,
                   "noatime": 0x400, "nodiratime": 0x800, "relatime": 0x200000}


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def make_tree_read_only(libc, force_remount: bool = False) -> None:
    """Every mount of this (private) mount namespace becomes read-only: in ``userns`` mode
    the test runs as the caller's uid, which owns files it must not change."""
    if not force_remount:
        attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
        if libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE,
                        ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
            return
        if ctypes.get_errno() != 38:  # ENOSYS: kernel < 5.12, remount one by one below
            errno = ctypes.get_errno()
            raise OSError(errno, f"mount_setattr /: {os.strerror(errno)}")
    with open("/proc/self/mountinfo", "rb") as handle:
        mounts = [line.split() for line in handle]
    for fields in mounts:
        # Mount points are octal-escaped (a space is \040).
        target = re.sub(rb"\\([0-7]{3})", lambda match: bytes([int(match.group(1), 8)]), fields[4])
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for option in fields[5].decode().split(","):
            flags |= _LOCKED_OPTIONS.get(option, 0)
        if libc.mount(None, target, None, flags, None) != 0:
            errno = ctypes.get_errno()
            if errno not in (2, 13):  # ENOENT/EACCES: a mount point we cannot even reach
                where = target.decode(errors="replace")
                raise OSError(errno, f"remount {where} read-only: {os.strerror(errno)}")


def _hide(libc, plan: dict[str, list[str]]) -> None:
    """Cover each planned directory with an empty read-only tmpfs, import dirs bound back."""
    _expose(libc, plan)
    for directory in plan:
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
        _mount(libc, b"none", directory.encode(), None, flags, None)


def _private_filesystem(config, exposure: dict[str, list[str]]) -> str:
    """New mount namespace: fresh tmpfs on the world-writable dirs, a /proc of our pid
    namespace; returns the private work directory (gone when the namespace dies).

    ``root`` mode: ``exposure`` (import_path_exposure) makes the imports reachable for
    ``nobody``. ``userns`` mode: the whole tree is read-only and ``exposure``
    (hiding_plan) hides the caller's private directories.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    os.unshare(os.CLONE_NEWNS)
    _mount(libc, b"none", b"/", None, _MS_REC | _MS_PRIVATE, None)
    if config.mode == "userns":
        make_tree_read_only(libc, force_remount=config.remount_each)
        _hide(libc, exposure)
    else:
        _expose(libc, exposure)
    _private_tmp(libc, config.tmpfs_bytes)
    _mount_proc(libc)
    workdir = "/tmp/work"
    os.mkdir(workdir, 0o700)
    if config.mode == "root":
        os.chown(workdir, config.uid, config.gid)
    return workdir


def unprivileged_view(hidden: tuple[str, ...], paths: list[str], tmpfs_bytes: int) -> None:
    """``userns`` mode's file system for a long-lived process (the sympy worker), called
    after ``privileges.enter_unprivileged_sandbox``: private mounts, a read-only tree,
    ``hidden`` covered (import dirs in ``paths`` kept), private tmpfs, our own /proc."""
    libc = ctypes.CDLL(None, use_errno=True)
    os.unshare(os.CLONE_NEWNS)
    _mount(libc, b"none", b"/", None, _MS_REC | _MS_PRIVATE, None)
    make_tree_read_only(libc)
    _hide(libc, hiding_plan(hidden, paths))
    _private_tmp(libc, tmpfs_bytes)
    _mount_proc(libc)


def _private_tmp(libc, tmpfs_bytes: int) -> None:
    options = f"size={tmpfs_bytes},mode=1777".encode()
    for target in _PRIVATE_TMPFS:
        if os.path.isdir(target):
            _mount(libc, b"tmpfs", target.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options)


def _mount_proc(libc) -> None:
    """A /proc of the test's own PID namespace. Where the kernel refuses a new procfs
    (a container that masks parts of /proc, in userns mode), an empty one: the host's
    /proc would show the trainer's processes, whose environment our uid may read."""
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    if libc.mount(b"proc", b"/proc", b"proc", flags, None) == 0:
        return
    _mount(libc, b"tmpfs", b"/proc", b"tmpfs", flags | _MS_RDONLY, b"size=4k,mode=0555")


def _reference_guard() -> None:
    faulthandler.disable()
    builtins.exit = None
    builtins.quit = None
    for name in _NULLED_OS:
        if hasattr(os, name):
            setattr(os, name, None)
    for name in _NULLED_SHUTIL:
        setattr(shutil, name, None)
    subprocess.Popen = None
    original_import = builtins.__import__

    def guarded_import(name, *args, **kwargs):
        if name in _BLOCKED_MODULES or name.split(".")[0] in _BLOCKED_MODULES:
            raise ImportError(f"Module '{name}' is not allowed in sandboxed execution")
        return original_import(name, *args, **kwargs)

    builtins.__import__ = guarded_import


def _describe(exc: BaseException, status: str, render) -> tuple[str, str]:
    """(status, message); an exception whose ``__str__`` raises is a process error, as in
    the reference (where it escapes into the sandbox's own error handler)."""
    try:
        return status, render(exc)
    except BaseException:
        return "process_error", "Sandbox error: the exception could not be rendered"


def _exit_code(exc: BaseException) -> int:
    """multiprocessing's exit code for an exception escaping the process."""
    if isinstance(exc, SystemExit):
        if exc.code is None:
            return 0
        return exc.code & 0xFF if isinstance(exc.code, int) else 1
    return 1


def run_test(  # pragma: no cover - runs in the forked child only
    program: str, result_fd: int, config, exposure: dict[str, list[str]], nonce: str
) -> None:
    """Confine, execute, report, exit (child only). ``config`` is a ``SandboxConfig``,
    ``exposure`` the result of ``import_path_exposure`` (root mode) or ``hiding_plan``; the verdict carries ``nonce``, so
    a program that writes a made-up verdict to every descriptor is not believed (one that
    digs the nonce out of this frame could still lie: the verdict of code running in the
    same interpreter is only as honest as that code, as in the reference)."""
    # Bound before the program runs, so it cannot swap them (json.dumps is patchable).
    write = os.write
    exit_now = os._exit
    quote = json.encoder.encode_basestring_ascii  # a C function
    try:
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.closerange(3, result_fd)
        os.closerange(result_fd + 1, 1 << 16)
        workdir = _private_filesystem(config, exposure)
        os.chdir(workdir)
        os.environ.clear()
        Limits(
            address_space=config.memory_bytes,
            cpu_seconds=config.cpu_seconds,
            processes=config.max_processes,
            file_size=config.max_file_bytes,
            open_files=config.max_open_files,
        ).apply()
        if config.mode == "root":
            drop_to(config.uid, config.gid)
        else:  # userns: keep the caller's uid, give up the namespace's capabilities
            drop_capabilities()
        _reference_guard()
        sys.stdout = sys.stderr = _WriteOnlySink()
        sys.stdin = None
    except BaseException as exc:  # confinement failed: never run the code unconfined
        failure = {"status": "process_error", "error": f"Sandbox error: {exc}", "nonce": nonce}
        write(result_fd, json.dumps(failure).encode() + b"\n")
        exit_now(70)
    try:
        exec(program, {})
        status, error = "success", None
    except SyntaxError as exc:
        status, error = _describe(exc, "syntax_error", str)
    except Exception as exc:
        status, error = _describe(exc, "runtime_error", lambda e: f"{type(e).__name__}: {e}")
    except BaseException as exc:  # SystemExit & co. end the reference process silently
        exit_now(_exit_code(exc))
    try:
        line = '{"status": "%s", "error": %s, "nonce": "%s"}\n' % (
            status, "null" if error is None else quote(error), nonce)
        write(result_fd, line.encode())
    except BaseException:
        exit_now(71)
    exit_now(0)
