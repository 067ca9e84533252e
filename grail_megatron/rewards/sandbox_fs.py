"""The file system a jailed process sees (MBPP tests and the sympy worker, both modes).

In a private mount namespace: the whole tree read-only; directories that must stay out of
sight covered by an empty read-only tmpfs (userns: the caller's home, /root, ...; root: the
0700 ancestors of the Python installation), with the import directories inside them bound
back; every shared directory (``jail.shared_dirs``: /tmp, /run, /dev/shm, ...) replaced by
one private, size-limited tmpfs; a /proc of the process's own PID namespace (/proc/sys
read-only).
"""
from __future__ import annotations

import ctypes
import os
import re

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
_SYS_MOUNT_SETATTR = 442  # the same number on x86_64 and aarch64
_AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
# Per-mount flags a remount inside a user namespace must repeat (they are locked).
_LOCKED_OPTIONS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC,
                   "noatime": 0x400, "nodiratime": 0x800, "relatime": 0x200000}


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, source: bytes, target: bytes, fstype: bytes | None, flags: int, data: bytes | None) -> None:
    if libc.mount(source, target, fstype, flags, data) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {target.decode()}: {os.strerror(errno)}")


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory + os.sep)


def import_path_exposure(paths: list[str]) -> dict[str, list[str]]:
    """Import directories an unprivileged uid cannot reach, grouped by the top-most
    ancestor that blocks traversal (e.g. a Python installed under /root, mode 0700).

    The jail covers each blocking ancestor with an empty tmpfs and bind-mounts only the
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
        if not any(_inside(path, kept) for kept in needed):
            needed.append(path)
    return plan


def hiding_plan(hidden: tuple[str, ...], paths: list[str]) -> dict[str, list[str]]:
    """Each directory to cover (outermost only) with the import directories inside it
    that must stay visible (bind-mounted back, read-only)."""
    imports = sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)})
    outermost = [d for d in hidden if not any(d != o and d.startswith(o + os.sep) for o in hidden)]
    plan: dict[str, list[str]] = {}
    for directory in outermost:
        needed = plan.setdefault(directory, [])
        for path in imports:
            if _inside(path, directory) and not any(_inside(path, kept) for kept in needed):
                needed.append(path)
    return plan


def private_mounts_with_import_paths(paths: list[str]) -> None:
    """For a root process about to drop to an unprivileged uid: a private mount namespace
    in which the import directories stay readable (see ``import_path_exposure``)."""
    libc = _libc()
    os.unshare(os.CLONE_NEWNS)
    _mount(libc, b"none", b"/", None, _MS_REC | _MS_PRIVATE, None)
    _expose(libc, import_path_exposure(paths))


def _bind_back(libc, handles: dict[str, int]) -> None:
    for path, handle in handles.items():
        os.makedirs(path, mode=0o755, exist_ok=True)
        _mount(libc, f"/proc/self/fd/{handle}".encode(), path.encode(), None, _MS_BIND | _MS_REC, None)
        os.close(handle)


def _handles(paths: list[str]) -> dict[str, int]:
    """O_PATH handles taken before a directory is covered, to bind its import dirs back."""
    return {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in paths}


def _expose(libc, plan: dict[str, list[str]]) -> None:
    for blocker, needed in plan.items():
        handles = _handles(needed)
        _mount(libc, b"tmpfs", blocker.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=1m,mode=0755")
        _bind_back(libc, handles)


def _remount_read_only(libc, directory: str) -> None:
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
    _mount(libc, b"none", directory.encode(), None, flags, None)


def _hide(libc, plan: dict[str, list[str]]) -> None:
    """Cover each planned directory with an empty read-only tmpfs, import dirs bound back."""
    _expose(libc, plan)
    for directory in plan:
        _remount_read_only(libc, directory)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def make_tree_read_only(libc, force_remount: bool = False) -> None:
    """Every mount of this (private) mount namespace becomes read-only; later mounts
    (the tmpfs of ``cover_shared_dirs``) are the only writable places."""
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


def cover_shared_dirs(libc, plan: dict[str, list[str]], size: int, writable: bool) -> None:
    """One tmpfs of ``size`` bytes shown at every directory of ``plan`` (each its own empty,
    mode-1777 subdirectory, so the size bounds them all together), import dirs bound back.

    The tmpfs is first mounted at the first directory; each directory (that one last)
    is then a bind of a fresh subdirectory, which hides the staging root under it."""
    if not plan:
        return
    handles = {directory: _handles(needed) for directory, needed in plan.items()}
    order = list(plan)
    stage = order[0]
    _mount(libc, b"tmpfs", stage.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size},mode=1777".encode())
    for index, directory in enumerate(order[1:] + order[:1]):
        private = f"{stage}/.{index}"
        os.mkdir(private)
        os.chmod(private, 0o1777)
        _mount(libc, private.encode(), directory.encode(), None, _MS_BIND, None)
    for directory in order:
        _bind_back(libc, handles[directory])
        if not writable:
            _remount_read_only(libc, directory)


def mount_proc(libc) -> None:
    """A /proc of the process's own PID namespace, with /proc/sys read-only. Where the
    kernel refuses a new procfs (a container that masks parts of /proc, in userns mode), an
    empty one: the host's /proc would show the trainer's processes, whose environment our
    uid may read.

    /proc/sys is read-only because in userns mode the test's uid is the root of the user
    namespace owning its IPC namespace, which makes the IPC limits (``jail.limit_ipc``)
    writable by permission bits alone, capabilities or not."""
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    if libc.mount(b"proc", b"/proc", b"proc", flags, None) == 0:
        _mount(libc, b"/proc/sys", b"/proc/sys", None, _MS_BIND, None)
        _mount(libc, b"none", b"/proc/sys", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags, None)
        return
    _mount(libc, b"tmpfs", b"/proc", b"tmpfs", flags | _MS_RDONLY, b"size=4k,mode=0555")


def jail_plans(mode: str, hidden: tuple[str, ...], shared: tuple[str, ...],
               paths: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(cover-and-hide plan, shared-dir plan) for ``jail_filesystem``, computed once per
    zygote or worker. Root hides only what ``nobody`` could not traverse anyway (and
    must, for the imports); a shared directory is never also hidden."""
    if mode == "root":
        hide = import_path_exposure(paths)
    else:
        # The whole installation, not only sys.path: lazily loaded extension modules
        # link against shared libraries in <prefix>/lib (conda's libcrypto, libsqlite3).
        hide = hiding_plan(tuple(d for d in hidden if not any(_inside(d, s) for s in shared)), paths)
    shared_plan = hiding_plan(tuple(s for s in shared if not any(_inside(s, h) for h in hide)), paths)
    return hide, shared_plan


def jail_filesystem(hide: dict[str, list[str]], shared: dict[str, list[str]], tmpfs_bytes: int,
                    writable: bool, force_remount: bool = False) -> None:
    """Build the view of the module docstring in a new mount namespace (the caller holds
    CAP_SYS_ADMIN over it: root, or the owner of its user namespace)."""
    libc = _libc()
    os.unshare(os.CLONE_NEWNS)
    _mount(libc, b"none", b"/", None, _MS_REC | _MS_PRIVATE, None)
    # Read-only first: binds made afterwards inherit it, fresh tmpfs mounts do not.
    make_tree_read_only(libc, force_remount=force_remount)
    _hide(libc, hide)
    cover_shared_dirs(libc, shared, tmpfs_bytes, writable)
    mount_proc(libc)
