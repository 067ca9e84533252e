"""The warm parent that forks one confined process per MBPP test.

Started once per pool slot (``python -I -m grail_megatron.rewards.zygote``) with an empty
environment. It imports what test programs commonly need, moves itself into a private
network namespace, and then serves requests ``{"program": [...tests], ...}`` as JSON lines
on stdin. It never runs model code itself, so its state stays clean; every test gets a
fresh fork that:

* is PID 1 of a new PID namespace: SIGKILLing it kills everything the test started, even
  processes that called setsid (a hard kill of the whole tree, fork bombs included);
* has its own mount namespace with fresh tmpfs on /tmp, /var/tmp and /dev/shm, so nothing
  it writes survives it or is seen by another test;
* runs as ``nobody`` with rlimits and the reference's guard (``sandbox_child``).
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

from grail_megatron.rewards.sandbox_child import import_path_exposure, run_test
from grail_megatron.rewards.sandbox_config import SandboxConfig

# Warm imports: what an MBPP child typically needs, and what a reference child
# (multiprocessing spawn + GRAIL's guard) already has loaded.
_PRELOAD = (
    "math cmath re itertools functools collections heapq bisect string operator typing random "
    "copy statistics decimal fractions datetime array json pickle tempfile shutil subprocess "
    "signal platform faulthandler contextlib io threading multiprocessing multiprocessing.connection "
    "concurrent.futures ctypes"
).split()

MAX_VERDICT_BYTES = 1 << 16


def _preload() -> None:
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)


def _read_verdict(fd: int, deadline: float) -> tuple[bytes | None, bool]:
    """Read one newline-terminated verdict; returns (verdict or None, timed_out).

    Stops at the newline rather than at EOF: a test may leave processes behind that hold
    the pipe open, and they must not turn a finished test into a timeout.
    """
    data = b""
    while len(data) < MAX_VERDICT_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None, True
        chunk = os.read(fd, MAX_VERDICT_BYTES)
        if not chunk:
            return None, False
        data += chunk
        if b"\n" in data:
            return data.split(b"\n", 1)[0], False
    return None, False


def _wait_exit(pid: int, deadline: float) -> int | None:
    """Wait for ``pid`` to exit until the deadline; its exit status, or None if still alive."""
    pidfd = os.pidfd_open(pid)
    try:
        remaining = max(0.0, deadline - time.monotonic())
        if not select.select([pidfd], [], [], remaining)[0]:
            return None
    finally:
        os.close(pidfd)
    return os.waitpid(pid, 0)[1]


def _parse_verdict(raw: bytes) -> dict:
    try:
        verdict = json.loads(raw)
    except ValueError:
        verdict = None
    if isinstance(verdict, dict) and verdict.get("status") in _STATUSES:
        return {"status": verdict["status"], "error": verdict.get("error")}
    return {"status": "process_error", "error": "Malformed verdict from the test process"}


class Zygote:
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self._own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY)
        self._exposure = import_path_exposure(sys.path) if os.geteuid() == 0 else {}

    def run_test(self, program: str, timeout: float) -> dict:
        read_end, write_end = os.pipe()
        os.unshare(os.CLONE_NEWPID)  # the next child is PID 1 of a fresh namespace
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                os.close(read_end)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                run_test(program, write_end, self.config, self._exposure)
                os._exit(72)
        finally:
            if pid != 0:
                os.setns(self._own_pid_ns, os.CLONE_NEWPID)
        os.close(write_end)
        deadline = time.monotonic() + timeout
        try:
            verdict, timed_out = _read_verdict(read_end, deadline)
        finally:
            os.close(read_end)
        status = None
        if verdict is None and not timed_out:  # pipe closed without a verdict
            status = _wait_exit(pid, deadline)
            timed_out = status is None
        if status is None:
            # SIGKILL to PID 1 takes the whole namespace (and any leftover process) with it.
            os.kill(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
        if timed_out:
            return {"status": "timeout", "error": "Execution timed out"}
        if verdict is not None:
            return _parse_verdict(verdict)
        return {
            "status": "process_error",
            "error": f"Process terminated unexpectedly (exit_code={os.waitstatus_to_exitcode(status)})",
        }

    def serve(self, stdin, stdout) -> None:
        stdout.write(b"ready\n")
        stdout.flush()
        for line in stdin:
            request = json.loads(line)
            results = [self.run_test(test, request["timeout"]) for test in request["programs"]]
            stdout.write(json.dumps({"results": results}).encode() + b"\n")
            stdout.flush()


_STATUSES = {"success", "syntax_error", "runtime_error", "process_error", "timeout"}


def main() -> None:  # pragma: no cover - runs as the zygote process
    from grail_megatron.rewards.privileges import isolate_network

    config = SandboxConfig(**json.loads(sys.argv[1]))
    _preload()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool owner decides when we stop
    isolate_network()
    Zygote(config).serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
