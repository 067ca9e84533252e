"""Small filesystem helpers for crash-safe writes (temp file/dir + fsync + rename)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a directory entry change (create/rename) on POSIX filesystems."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike, name_filter=None) -> None:
    """fsync every file (optionally only those whose name passes `name_filter`) and dir under root."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if name_filter is None or name_filter(name):
                fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so readers see either the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Rename a finished temp directory onto `final_dir` (same filesystem).

    An existing `final_dir` is first moved aside (one rename) and deleted only after the new
    directory is in place, so at every instant `final_dir` is either the old or the new tree.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    trash = None
    if final_dir.exists():
        trash = final_dir.with_name(f".trash.{final_dir.name}.{os.getpid()}.{time.time_ns()}")
        os.replace(final_dir, trash)
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temp_dirs(out_dir: str | os.PathLike, marker: str = "incomplete") -> list[Path]:
    """Remove `.<name>.<marker>-<pid>` folders next to `out_dir` whose process is gone.

    An interrupted conversion that could not clean up (SIGKILL, a power cut) leaves its temp
    folder; the next run to the same `out_dir` removes it. Folders of live processes stay.
    """
    out_dir = Path(out_dir)
    removed = []
    for path in out_dir.parent.glob(f".{out_dir.name}.{marker}-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
