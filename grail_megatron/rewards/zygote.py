"""The warm parent that forks one confined process per MBPP test.

Started once per pool slot (``python -I -m grail_megatron.rewards.zygote``) with an empty
environment. It imports what test programs commonly need, moves itself into a private
network namespace, and then serves JSON-line requests on stdin,
``{"programs": [code + test, ...], "timeout": seconds}``, one verdict per program. It
never runs model code itself, so its state stays clean; every test gets a fresh fork that:

* is PID 1 of a new PID namespace: SIGKILLing it kills everything the test started, even
  processes that called setsid (a hard kill of the whole tree, fork bombs included);
* has its own mount namespace with fresh tmpfs on /tmp, /var/tmp and /dev/shm, so nothing
  it writes survives it or is seen by another test;
* runs as ``nobody`` with rlimits and the reference's guard (``sandbox_child``).

Not root (``userns`` mode, ``sandbox_mode.py``), the zygote first enters a user namespace
of its own uid with fresh network, IPC and PID namespaces, and serves from a forked child
that is PID 1 there (so that it may re-enter its own PID namespace after each fork). Tests
keep the caller's uid but see a read-only tree with private directories hidden, and drop
every capability; nested user namespaces are forbidden.
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

from grail_megatron.rewards.sandbox_child import hiding_plan, import_path_exposure, run_test
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

MAX_VERDICT_BYTES = 1 << 16
MAX_CONCURRENT_TESTS = 16  # tests of one program run at once, like the reference's pool


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


def _parse_verdict(raw: bytes, nonce: str) -> dict:
    try:
        verdict = json.loads(raw)
    except ValueError:
        verdict = None
    if not (isinstance(verdict, dict) and verdict.get("status") in _STATUSES):
        return {"status": "process_error", "error": "Malformed verdict from the test process"}
    if verdict.get("nonce") != nonce:
        return {"status": "process_error", "error": "Forged verdict from the test process"}
    return {"status": verdict["status"], "error": verdict.get("error")}


class _RunningTest:
    """One forked test process: PID 1 of its namespace, verdict pipe, what it reported."""

    def __init__(self, pid: int, fd: int, nonce: str) -> None:
        self.pid, self.fd, self.nonce = pid, fd, nonce
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
            return _parse_verdict(self.verdict, self.nonce)
        if self.exited_in_time:
            code = os.waitstatus_to_exitcode(self.status)
            return {"status": "process_error", "error": f"Process terminated unexpectedly (exit_code={code})"}
        return {"status": "timeout", "error": "Execution timed out"}


class Zygote:
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self._own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY)
        if config.mode == "root":
            self._exposure = import_path_exposure(sys.path)
        else:
            # The whole installation, not only sys.path: lazily loaded extension modules
            # link against shared libraries in <prefix>/lib (conda's libcrypto, libsqlite3).
            self._exposure = hiding_plan(config.hidden_dirs, [sys.base_prefix, sys.prefix, *sys.path])

    def _start(self, program: str) -> _RunningTest:
        nonce = os.urandom(16).hex()
        read_end, write_end = os.pipe()
        os.unshare(os.CLONE_NEWPID)  # the next child is PID 1 of a fresh namespace
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                os.close(read_end)
                try:
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    run_test(program, write_end, self.config, self._exposure, nonce)
                finally:
                    os._exit(72)  # never fall back into the zygote's own code
        finally:
            if pid != 0:
                os.setns(self._own_pid_ns, os.CLONE_NEWPID)
        os.close(write_end)
        return _RunningTest(pid, read_end, nonce)

    def run_tests(self, programs: list[str], timeout: float) -> list[dict]:
        """Run programs concurrently (as the reference does), each with ``timeout``."""
        results = []
        for start in range(0, len(programs), MAX_CONCURRENT_TESTS):
            results += self._run_group(programs[start : start + MAX_CONCURRENT_TESTS], timeout)
        return results

    def _run_group(self, programs: list[str], timeout: float) -> list[dict]:
        tests = [self._start(program) for program in programs]
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
            results = self.run_tests(request["programs"], request["timeout"])
            stdout.write(json.dumps({"results": results}).encode() + b"\n")
            stdout.flush()


_STATUSES = {"success", "syntax_error", "runtime_error", "process_error", "timeout"}


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
            config = _process_limit(config)
            enter_unprivileged_sandbox()
    except OSError as exc:
        sys.stderr.write(unavailable_message(config.mode, explain_os_error(exc)) + "\n")
        sys.exit(1)
    zygote = Zygote(config)
    # Fail loudly at start (not with every verdict) where namespaces or mounts are denied,
    # e.g. an unprivileged container with a restrictive seccomp profile.
    probe = zygote.run_tests(["import os\nassert os.getuid() != 0"], timeout=max(config.timeout, 5.0))[0]
    if probe["status"] != "success":
        detail = f"the sandbox self-test failed: {probe['error']}"
        sys.stderr.write(unavailable_message(config.mode, detail) + "\n")
        sys.exit(1)
    zygote.serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
