"""What runs inside one sandboxed test (forked from the zygote, see ``zygote.py``).

``run_test`` never returns. The forked process becomes the test's *supervisor*: PID 1 of its
own PID namespace, jailed (``jail.py``, ``sandbox_fs.py``), unprivileged, under the seccomp
filter and not dumpable (so nothing it runs can trace it or read its memory). It holds the
verdict channel to the zygote and forks the *worker* that runs the model's code; the worker
only gets a pipe to the supervisor, never the channel.

* A split test (``plain_data.split_test``: ``assert CALL == EXPECTED`` and friends): the
  worker runs the program, the test's imports and setup, evaluates ``CALL`` and sends its
  value as plain data (or its truth value). The expected value is not in the worker, the
  supervisor or the zygote: the scorer compares (``SandboxPool.run_tests``).
* Any other test runs whole, ``exec(code + test)``, as in the reference; the worker reports
  completion with a per-test nonce (it could dig that out of its own memory: such tests
  keep the reference's trust in the code under test).

Reference semantics kept for identical verdicts (GRAIL ``execution.py``): the code runs with
``exec(program, {})`` (full builtins, ``__name__`` resolves to ``"builtins"``), stdout and
stderr are write-only sinks and ``sys.stdin`` is ``None``; ``exit``/``quit``, a list of
``os``/``shutil`` functions and ``subprocess.Popen`` are ``None``; a list of modules cannot be
imported; RLIMIT_AS 2 GiB turns huge allocations into MemoryError; an uncaught SystemExit
ends the process without a verdict ("process_error"). Only the confinement underneath is
ours (namespaces, uid, rlimits, private tmpfs, seccomp).
"""
from __future__ import annotations

import builtins
import ctypes
import faulthandler
import io
import json
import os
import resource
import select
import shutil
import subprocess
import sys

from grail_megatron.rewards import plain_data
from grail_megatron.rewards.jail import IPC_BOUNDED, limit_ipc
from grail_megatron.rewards.privileges import Limits, drop_capabilities, drop_to, leave_namespace_root
from grail_megatron.rewards.sandbox_fs import (  # noqa: F401 - re-exported for the launchers
    hiding_plan, import_path_exposure, jail_filesystem, private_mounts_with_import_paths)

MAX_REPLY_BYTES = 1 << 20  # a value larger than this fails the test
_ERROR_STATUSES = ("syntax_error", "runtime_error", "process_error")
_PR_SET_DUMPABLE = 4


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




# --------------------------------------------------------------------------- supervisor
def _keep_only(fd: int) -> None:
    devnull = os.open("/dev/null", os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(devnull, std)
    os.closerange(3, fd)
    os.closerange(fd + 1, 1 << 16)


def _jail(config, plans) -> tuple[str, bool]:
    """Private IPC namespace (bounded), file system and work directory; returns the latter
    and whether the IPC limits are in place.

    userns: the zygote is root of its user namespace, which owns the IPC namespace made
    here, so it can write the limits; the test then enters a nested user namespace in
    which it is the caller's uid again (``leave_namespace_root``), holding capabilities
    over nothing the zygote's namespace owns. Where the limits cannot be written (kernels
    before 5.17), the caller refuses IPC creation with seccomp instead."""
    hide, shared = plans
    root = config.mode == "root"
    os.unshare(os.CLONE_NEWIPC)
    limited = limit_ipc(IPC_BOUNDED, required=root)
    # A writable handle on /proc/sys/user (the zygote's /proc) for the nested namespace's
    # own limit: the test's /proc/sys is read-only (mount_proc) by the time it exists.
    sysctl_dir = None if root else os.open("/proc/sys/user", os.O_PATH | os.O_DIRECTORY)
    jail_filesystem(hide, shared, config.tmpfs_bytes, writable=True, force_remount=config.remount_each)
    workdir = "/tmp/work"
    os.mkdir(workdir, 0o700)
    if root:
        os.chown(workdir, config.uid, config.gid)
    else:
        # Before the nested namespace exists: it records this limit for the zygote's
        # namespace, so that the tests of one zygote share max_processes, as before.
        resource.setrlimit(resource.RLIMIT_NPROC, (config.max_processes, config.max_processes))
        leave_namespace_root(config.uid, config.gid, sysctl_dir)
        os.close(sysctl_dir)
    return workdir, limited


def _unprivileged(config, syscall_filter) -> None:
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
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:  # no ptrace, no /proc/1/mem or fd/
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")
    syscall_filter.load()


def _collect(pid: int, fd: int) -> tuple[bytes | None, int | None]:
    """The worker's first line (None if it exited without one) and, then, its wait status.
    Stops at the newline or at the worker's exit, not at EOF: processes it left behind
    may hold the pipe open."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # Linux < 5.3: EOF only
        pidfd = None
    buffer = b""
    while True:
        watched = [fd] if pidfd is None else [fd, pidfd]
        ready = select.select(watched, [], [])[0]
        if fd in ready:
            chunk = os.read(fd, MAX_REPLY_BYTES)
            buffer += chunk
            if b"\n" in buffer or len(buffer) >= MAX_REPLY_BYTES:
                return buffer.split(b"\n", 1)[0], None
            if chunk:
                continue
        elif not ready:
            continue
        os.set_blocking(fd, False)  # the worker is gone: take what it wrote, then its status
        try:
            buffer += os.read(fd, MAX_REPLY_BYTES)
        except BlockingIOError:
            pass
        if b"\n" in buffer:
            return buffer.split(b"\n", 1)[0], None
        return None, os.waitpid(pid, 0)[1]


def _report(job: dict, line: bytes | None, status: int | None, nonce: str) -> dict:
    """The verdict (or, for a split test, the value) the zygote gets."""
    if line is None:
        code = os.waitstatus_to_exitcode(status)
        return {"status": "process_error", "error": f"Process terminated unexpectedly (exit_code={code})"}
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        return {"status": "process_error", "error": "Malformed verdict from the test process"}
    if reply.get("status") in _ERROR_STATUSES and isinstance(reply.get("error"), str) and len(reply) == 2:
        return reply  # a failure needs no proof: the code can always fail
    if "program" in job:
        if reply == {"done": nonce}:
            return {"status": "success", "error": None}
        return {"status": "process_error", "error": "Forged verdict from the test process"}
    if job["reply"] == "truth" and set(reply) == {"truth"} and type(reply["truth"]) is bool:
        return {"status": "truth", "truth": reply["truth"]}
    if job["reply"] == "value" and set(reply) == {"value"}:
        return {"status": "value", "value": reply["value"]}
    return {"status": "opaque", "error": None}  # not plain data, or not what was asked


def run_test(  # pragma: no cover - runs in the forked supervisor only
    job: dict, result_fd: int, config, plans, syscall_filter, ipc_filter=None
) -> None:
    """Jail, fork the worker, relay its outcome, exit. ``config`` is a ``SandboxConfig``,
    ``plans`` the zygote's ``sandbox_fs.jail_plans``, ``syscall_filter`` its
    ``jail.SyscallFilter``, ``ipc_filter`` the same with ``refuse_ipc`` (loaded instead
    where the IPC limits could not be written)."""
    write, exit_now = os.write, os._exit
    try:
        _keep_only(result_fd)
        workdir, ipc_limited = _jail(config, plans)
        os.chdir(workdir)
        if not ipc_limited:
            if ipc_filter is None:
                raise OSError("the IPC limits could not be written")
            syscall_filter = ipc_filter
        _unprivileged(config, syscall_filter)
        nonce = os.urandom(16).hex()
        read_end, write_end = os.pipe()
        pid = os.fork()
    except BaseException as exc:  # confinement failed: never run the code unconfined
        failure = {"status": "process_error", "error": f"Sandbox error: {exc}"}
        write(result_fd, json.dumps(failure).encode() + b"\n")
        exit_now(70)
    if pid == 0:
        os.close(result_fd)
        os.close(read_end)
        _run_program(job, write_end, nonce)
    try:
        os.close(write_end)
        verdict = _report(job, *_collect(pid, read_end), nonce)
        write(result_fd, json.dumps(verdict).encode() + b"\n")
    except BaseException:
        exit_now(71)
    exit_now(0)


# --------------------------------------------------------------------------- worker
def _reply_for(job: dict, value, dumps) -> str:
    if job["reply"] == "truth":
        return '{"truth": true}' if value else '{"truth": false}'
    try:
        return dumps({"value": plain_data.encode(value)})
    except Exception:  # not plain data: the scorer fails the test
        return '{"opaque": true}'


def _run_program(job: dict, out_fd: int, nonce: str) -> None:  # pragma: no cover - worker only
    # Bound before the program runs, so it cannot swap them (json.dumps is patchable).
    write, exit_now, dumps = os.write, os._exit, json.dumps
    quote = json.encoder.encode_basestring_ascii  # a C function
    _reference_guard()
    sys.stdout = sys.stderr = _WriteOnlySink()
    sys.stdin = None
    try:
        if "program" in job:
            exec(job["program"], {})
            line = '{"done": "%s"}' % nonce
        else:
            namespace: dict = {}
            exec(job["code"] + "\n\n" + job["prefix"], namespace)
            line = _reply_for(job, eval(compile(job["call"], "<string>", "eval"), namespace), dumps)
    except SyntaxError as exc:
        line = None
        status, error = _describe(exc, "syntax_error", str)
    except Exception as exc:
        line = None
        status, error = _describe(exc, "runtime_error", lambda e: f"{type(e).__name__}: {e}")
    except BaseException as exc:  # SystemExit & co. end the reference process silently
        exit_now(_exit_code(exc))
    try:
        if line is None:
            line = '{"status": "%s", "error": %s}' % (status, quote(error))
        write(out_fd, line.encode() + b"\n")
    except BaseException:
        exit_now(71)
    exit_now(0)
