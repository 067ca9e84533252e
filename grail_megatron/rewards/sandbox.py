"""Pool of warm zygotes running MBPP programs in confined, per-test processes.

``SandboxPool(workers)`` starts ``workers`` zygote processes (``zygote.py``); each program
is sent to a free zygote, which forks a fresh confined process per test and reports one
verdict per test. Threads may call ``run``/``run_tests`` concurrently: at most ``workers``
programs run at once, the rest wait for a free zygote.

``run_tests(code, tests)`` is the scorer's entry point: tests of the form ``assert CALL ==
EXPECTED`` (``plain_data``) are split, so that ``EXPECTED`` stays in this process, which
compares it with the value the sandbox sends back.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import queue
import subprocess
import sys
import threading

from grail_megatron.rewards import plain_data
from grail_megatron.rewards.jail import shared_dirs
from grail_megatron.rewards.sandbox_config import SandboxConfig
from grail_megatron.rewards.sandbox_mode import (
    MODE_ENV, UNAVAILABLE_PREFIX, hidden_dirs, resolve_mode, unavailable_message)


class SandboxUnavailable(RuntimeError):
    """No confinement can start here: neither root nor unprivileged user namespaces (the
    message names what is missing and how to fix it; see docs/rewards.md)."""


def resolve_config(config: SandboxConfig) -> SandboxConfig:
    """``config`` with a concrete mode and, for ``userns``, the directories to hide;
    raises SandboxUnavailable for a forced mode that cannot work for this uid."""
    try:
        mode = resolve_mode(config.mode)
    except ValueError as exc:
        raise SandboxUnavailable(f"{UNAVAILABLE_PREFIX}{exc}") from None
    if mode == "root" and os.geteuid() != 0:
        detail = f"running as uid {os.geteuid()} with {MODE_ENV}=root: unset it to use user namespaces"
        raise SandboxUnavailable(unavailable_message("root", detail))
    if mode == "userns" and os.geteuid() == 0:
        # uid 0 mapped into a namespace is still exempt from RLIMIT_NPROC.
        raise SandboxUnavailable(f"{UNAVAILABLE_PREFIX}{MODE_ENV}=userns is for non-root processes "
                                 f"(uid 0 has no process limit); use {MODE_ENV}=root or auto")
    dirs = hidden_dirs(config.hidden_dirs) if mode == "userns" else config.hidden_dirs
    shared = tuple(dict.fromkeys((*shared_dirs(), *config.shared_dirs)))
    return dataclasses.replace(config, mode=mode, hidden_dirs=dirs, shared_dirs=shared)


class _ZygoteProcess:
    def __init__(self, config: SandboxConfig) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "grail_megatron.rewards.zygote", json.dumps(config.to_json_dict())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={},  # nothing secret to inherit, not even in /proc/<pid>/environ
            start_new_session=True,
        )
        line = self.proc.stdout.readline()
        if line != b"ready\n":
            error = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            self.close()
            last = error[-1] if error else "no output"
            if last.startswith(UNAVAILABLE_PREFIX):
                raise SandboxUnavailable(last)
            raise SandboxUnavailable(unavailable_message(config.mode, f"the zygote failed to start: {last}"))

    def run(self, jobs: list[dict], timeout: float) -> list[dict]:
        self.proc.stdin.write(json.dumps({"jobs": jobs, "timeout": timeout}).encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError("sandbox zygote exited")
        return json.loads(line)["results"]

    def close(self) -> None:
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


class SandboxPool:
    """Thread-safe pool of ``workers`` zygotes sharing one ``SandboxConfig``."""

    def __init__(self, workers: int | None = None, config: SandboxConfig | None = None) -> None:
        self.config = resolve_config(config or SandboxConfig())
        self.mode = self.config.mode  # "root" or "userns"
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._free: queue.Queue[_ZygoteProcess] = queue.Queue()
        self._all: list[_ZygoteProcess] = []
        self._lock = threading.Lock()
        try:
            for _ in range(self.workers):
                self._add()
        except BaseException:
            self.close()
            raise

    def _add(self) -> None:
        zygote = _ZygoteProcess(self.config)
        with self._lock:
            self._all.append(zygote)
        self._free.put(zygote)

    def run(self, programs: list[str]) -> list[dict]:
        """Run each program (code + test) whole in its own confined process, with the
        reference's semantics; one verdict each: ``{"status": "success"|"runtime_error"|
        "syntax_error"|"timeout"|"process_error", "error": str | None}``."""
        return self._run_jobs([{"program": program} for program in programs])

    def run_tests(self, code: str, tests: list[str]) -> list[dict]:
        """Verdicts of ``code`` against each test (``code + "\n\n" + test``), split tests
        judged here from the value the sandbox sends back (same verdicts as ``run`` for
        honest code; see ``plain_data``)."""
        splits = [plain_data.split_test(test) for test in tests]
        jobs = [split.job(code) if split else {"program": f"{code}\n\n{test}"}
                for split, test in zip(splits, tests)]
        replies = self._run_jobs(jobs)
        return [plain_data.judge(split, reply) if split else reply for split, reply in zip(splits, replies)]

    def _run_jobs(self, jobs: list[dict]) -> list[dict]:
        zygote = self._free.get()
        try:
            results = zygote.run(jobs, self.config.timeout)
        except (EOFError, OSError, ValueError) as exc:
            # The zygote never runs model code, so this is an infrastructure failure:
            # replace it and report the tests as errored rather than guessing.
            with self._lock:
                self._all.remove(zygote)
            zygote.close()
            self._add()
            return [{"status": "process_error", "error": f"sandbox failure: {exc}"} for _ in jobs]
        self._free.put(zygote)
        return results

    def close(self) -> None:
        with self._lock:
            zygotes, self._all = self._all, []
        for zygote in zygotes:
            zygote.close()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class UnavailablePool:
    """Stands in for a pool that could not start (after an explicit format-only opt-in):
    every ``run`` raises the start error again, so no other pool is tried silently."""

    def __init__(self, error: SandboxUnavailable) -> None:
        self.error = error

    def run(self, programs: list[str]) -> list[dict]:
        raise self.error

    def run_tests(self, code: str, tests: list[str]) -> list[dict]:
        raise self.error

    def close(self) -> None:
        pass


_DEFAULT: SandboxPool | None = None
_DEFAULT_ERROR: SandboxUnavailable | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> SandboxPool:
    """The process-wide pool, started on first use: ``GRAIL_SANDBOX_WORKERS`` zygotes
    (default: the CPU count, at most 16) with the default ``SandboxConfig``."""
    global _DEFAULT, _DEFAULT_ERROR
    with _DEFAULT_LOCK:
        if _DEFAULT_ERROR is not None:  # do not pay a failing start on every call
            raise _DEFAULT_ERROR
        if _DEFAULT is None:
            workers = int(os.environ.get("GRAIL_SANDBOX_WORKERS", "0")) or min(os.cpu_count() or 1, 16)
            try:
                _DEFAULT = SandboxPool(workers)
            except SandboxUnavailable as exc:
                _DEFAULT_ERROR = exc
                raise
            atexit.register(_DEFAULT.close)
        return _DEFAULT


def check_sandbox() -> str:
    """Start the process-wide pool now and return its mode (``root`` or ``userns``).

    Call it where a trainer starts (before the first MBPP reward), so that a node without
    a usable sandbox fails at once with ``SandboxUnavailable`` naming the missing capability.
    """
    return default_pool().mode
