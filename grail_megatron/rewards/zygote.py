"""The warm parent that forks one confined process per MBPP test.

Started once per pool slot (``python -I -m grail_megatron.rewards.zygote``) with an empty
environment. It imports what test programs commonly need, moves itself into a private
network namespace, and then serves JSON-line requests on stdin,
``{"jobs": [job, ...], "timeout": seconds}`` (a job is ``{"program": code + test}`` or a
split test, ``plain_data.SplitTest.job``), one reply per job. It never runs model code
itself, so its state stays clean, and it never holds a split test's expected value; every
test gets a fresh fork (the supervisor of ``sandbox_child``) that:

* is PID 1 of a new PID namespace: SIGKILLing it kills everything the test started, even
  processes that called setsid (a hard kill of the whole tree, fork bombs included);
* has its own mount and IPC namespaces: a read-only tree, one private size-limited tmpfs
  in place of every shared directory (/tmp, /run, /dev/shm, ...), bounded System V IPC,
  so nothing it writes survives it or is seen by another test or the host;
* runs as ``nobody`` with rlimits, a seccomp filter and, in its worker process, the
  reference's guard (``sandbox_child``).

Not root (``userns`` mode, ``sandbox_mode.py``), the zygote first enters a user namespace
in which its uid is mapped to 0, with fresh network, IPC and PID namespaces, and serves from
a forked child that is PID 1 there (so that it may re-enter its own PID namespace after each
fork). Being root of that namespace lets it write the limits of each test's IPC namespace.
Tests then enter a nested user namespace in which they have the caller's uid again, see a
read-only tree with private directories hidden, and drop every capability; they may create
no further user namespace.
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

from grail_megatron.rewards.jail import SyscallFilter
from grail_megatron.rewards.sandbox_child import MAX_REPLY_BYTES, run_test
from grail_megatron.rewards.sandbox_fs import jail_plans
from grail_megatron.rewards.sandbox_config import SandboxConfig
from grail_megatron.rewards.privileges import enter_unprivileged_sandbox
from grail_megatron.rewards.sandbox_mode import explain_os_error, unavailable_message

# Warm imports: what an MBPP child typically needs, and what a reference child
# (multiprocessing spawn + GRAIL's guard) already has loaded.
_PRELOAD = (
    "math cmath re itertools functools collections heapq bisect string operator typing random "
    "copy statistics decimal fractions datetime array json pickle tempfile shutil subprocess "
    "signal platform faulthandler contextlib io threading multiprocessing multiprocessing.connection "
    "concurrent.futures ctypes"
).split()

MAX_VERDICT_BYTES = MAX_REPLY_BYTES + (1 << 12)  # a value, JSON-quoted once more
MAX_CONCURRENT_TESTS = 16  # tests of one program run at once, like the reference's pool
# userns: the zygote's limit on live nested user namespaces (one per running test; a dead
# test's namespace is freed asynchronously, hence the margin).
TEST_USER_NAMESPACES = 1024


def _preload() -> None:
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)


def _wait_exit(pid: int, deadline: float) -> int | None:
    """Wait for ``pid`` to exit until the deadline; its wait status, or None if still alive."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # Linux < 5.3 (e.g. RHEL 8's 4.18): poll instead
        while not (reaped := os.waitpid(pid, os.WNOHANG))[0]:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)
        return reaped[1]
    try:
        remaining = max(0.0, deadline - time.monotonic())
        if not select.select([pidfd], [], [], remaining)[0]:
            return None
    finally:
        os.close(pidfd)
    return os.waitpid(pid, 0)[1]


def _parse_verdict(raw: bytes) -> dict:
    """The supervisor's line (it runs no model code, but stay strict about shapes)."""
    try:
        verdict = json.loads(raw)
    except ValueError:
        verdict = None
    if not (isinstance(verdict, dict) and verdict.get("status") in _STATUSES):
        return {"status": "process_error", "error": "Malformed verdict from the test process"}
    return verdict


class _RunningTest:
    """One forked test supervisor: PID 1 of its namespace, verdict pipe, what it reported."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid, self.fd = pid, fd
        self.buffer = b""
        self.verdict: bytes | None = None
        self.closed_without_verdict = False
        self.status: int | None = None  # wait status once reaped
        self.exited_in_time = False

    def feed(self) -> bool:
        """Read what is available; True once the test has nothing more to say."""
        chunk = os.read(self.fd, MAX_VERDICT_BYTES)
        if not chunk:
            self.closed_without_verdict = True
            return True
        self.buffer += chunk
        if b"\n" in self.buffer:
            # Stop at the newline, not at EOF: processes the test left behind may hold
            # the pipe open, and they must not turn a finished test into a timeout.
            self.verdict = self.buffer.split(b"\n", 1)[0]
            return True
        return len(self.buffer) >= MAX_VERDICT_BYTES

    def result(self) -> dict:
        if self.verdict is not None:
            return _parse_verdict(self.verdict)
        if self.exited_in_time:
            code = os.waitstatus_to_exitcode(self.status)
            return {"status": "process_error", "error": f"Process terminated unexpectedly (exit_code={code})"}
        return {"status": "timeout", "error": "Execution timed out"}


class Zygote:
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self._own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY)
        imports = [sys.base_prefix, sys.prefix, *sys.path]
        self._plans = jail_plans(config.mode, config.hidden_dirs, config.shared_dirs, imports)
        self._filter = SyscallFilter()
        # Loaded by a test whose IPC limits could not be written (userns, kernels < 5.17).
        self._ipc_filter = SyscallFilter(refuse_ipc=True) if config.mode == "userns" else None

    def _start(self, job: dict) -> _RunningTest:
        read_end, write_end = os.pipe()
        os.unshare(os.CLONE_NEWPID)  # the next child is PID 1 of a fresh namespace
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                os.close(read_end)
                try:
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    run_test(job, write_end, self.config, self._plans, self._filter, self._ipc_filter)
                finally:
                    os._exit(72)  # never fall back into the zygote's own code
        finally:
            if pid != 0:
                os.setns(self._own_pid_ns, os.CLONE_NEWPID)
        os.close(write_end)
        return _RunningTest(pid, read_end)

    def run_tests(self, jobs: list[dict], timeout: float) -> list[dict]:
        """Run jobs concurrently (as the reference does), each with ``timeout``."""
        results = []
        for start in range(0, len(jobs), MAX_CONCURRENT_TESTS):
            results += self._run_group(jobs[start : start + MAX_CONCURRENT_TESTS], timeout)
        return results

    def _run_group(self, jobs: list[dict], timeout: float) -> list[dict]:
        tests = [self._start(job) for job in jobs]
        deadline = time.monotonic() + timeout
        pending = {test.fd: test for test in tests}
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd in select.select(list(pending), [], [], remaining)[0]:
                if pending[fd].feed():
                    del pending[fd]
        for test in tests:
            os.close(test.fd)
            if test.closed_without_verdict:  # exited (or closed the pipe): wait, bounded
                test.status = _wait_exit(test.pid, deadline)
                test.exited_in_time = test.status is not None
            if test.status is None:
                # SIGKILL to PID 1 takes its whole namespace (and any leftovers) with it.
                os.kill(test.pid, signal.SIGKILL)
                test.status = os.waitpid(test.pid, 0)[1]
        return [test.result() for test in tests]

    def serve(self, stdin, stdout) -> None:
        stdout.write(b"ready\n")
        stdout.flush()
        for line in stdin:
            request = json.loads(line)
            results = self.run_tests(request["jobs"], request["timeout"])
            stdout.write(json.dumps({"results": results}).encode() + b"\n")
            stdout.flush()


# "value", "truth" and "opaque" carry a split test's outcome to the scorer (plain_data.judge).
_STATUSES = {"success", "syntax_error", "runtime_error", "process_error", "timeout", "value", "truth", "opaque"}


def _enter_root_mode() -> None:
    from grail_megatron.rewards.privileges import isolate_network

    if os.geteuid() != 0:
        # Per-test PID/mount namespaces, setns back, and the switch to an unprivileged uid
        # (which is what makes RLIMIT_NPROC bite) all need real root.
        raise PermissionError(f"running as uid {os.geteuid()}")
    isolate_network()


def _process_limit(config: SandboxConfig) -> SandboxConfig:
    """RLIMIT_NPROC counts per user namespace from Linux 5.14 on; before, it counts every
    process of the (shared) uid, so the cap becomes "what exists now + the configured"."""
    import dataclasses

    from grail_megatron.rewards.privileges import nproc_counts_per_user_namespace

    if config.mode != "userns" or nproc_counts_per_user_namespace():
        return config
    uid = os.getuid()
    existing = sum(1 for entry in os.listdir("/proc") if entry.isdigit() and _owner(entry) == uid)
    return dataclasses.replace(config, max_processes=existing + config.max_processes)


def _owner(pid: str) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1


def main() -> None:  # pragma: no cover - runs as the zygote process
    config = SandboxConfig(**json.loads(sys.argv[1]))
    _preload()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool owner decides when we stop
    try:
        if config.mode == "root":
            _enter_root_mode()
        else:
            import dataclasses

            # Tests get these ids back in their own user namespace (leave_namespace_root).
            config = dataclasses.replace(_process_limit(config), uid=os.getuid(), gid=os.getgid())
            # Root of its user namespace, so that it may write its tests' IPC limits; room
            # for the tests' own (nested) user namespaces, which allow none themselves.
            enter_unprivileged_sandbox(as_root=True, nested=TEST_USER_NAMESPACES)
    except OSError as exc:
        sys.stderr.write(unavailable_message(config.mode, explain_os_error(exc)) + "\n")
        sys.exit(1)
    zygote = Zygote(config)
    # Fail loudly at start (not with every verdict) where namespaces or mounts are denied,
    # e.g. an unprivileged container with a restrictive seccomp profile.
    probe = zygote.run_tests([{"program": "import os\nassert os.getuid() != 0"}], timeout=max(config.timeout, 5.0))[0]
    if probe["status"] != "success":
        detail = f"the sandbox self-test failed: {probe['error']}"
        sys.stderr.write(unavailable_message(config.mode, detail) + "\n")
        sys.exit(1)
    zygote.serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
