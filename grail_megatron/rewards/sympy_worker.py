"""Bounded sympy (and math-verify) equivalence checks in a sandboxed worker process.

``sympy.parse_expr`` evaluates its input with ``eval`` and ``simplify`` can run forever
(``10**10**10``, huge factorials, deep nesting), so the GRAIL strategy "parse both answers,
``simplify(a - b) == 0``" runs in a separate process that:

* is started with an empty environment, holds no privileges (``nobody``, no network,
  RLIMIT_AS 2 GiB) and imports sympy once;
* answers requests over a pipe; the scoring process waits at most ``budget`` seconds and
  otherwise SIGKILLs the worker's process group and switches to a pre-started spare, so a
  hang costs one budget and the next call pays nothing;
* evaluates in-process only answers made of plain math characters (no ``_``, quotes,
  backslashes or attribute access), which cannot reach and alter sympy's state; anything
  else is evaluated in a forked child that dies afterwards, so one completion cannot
  change how later completions are judged.
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

_SAFE_EXPRESSION = re.compile(r"[0-9a-z+\-*/^().,=<>!\[\]{}%|&~ ]*")
_ATTRIBUTE_ACCESS = re.compile(r"\.[a-z]")


@dataclass(frozen=True)
class CheckResult:
    equal: bool
    timed_out: bool = False
    error: str = ""


# --------------------------------------------------------------------------- worker side
def _sympy_equal(pred: str, gold: str) -> bool:
    import sympy

    try:
        return bool(sympy.simplify(sympy.parse_expr(pred) - sympy.parse_expr(gold)) == 0)
    except Exception:  # the reference treats every failure as "not equal"
        return False


def _math_verify_equal(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    try:
        # Timeouts are ours (the whole worker is killed), so math-verify's signal-based
        # ones are switched off.
        gold_parsed = parse(gold, parsing_timeout=None)
        pred_parsed = parse(pred, parsing_timeout=None)
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:
        return False


_OPS = {"sympy": _sympy_equal, "math_verify": _math_verify_equal}


def _is_inert(text: str) -> bool:
    return _SAFE_EXPRESSION.fullmatch(text) is not None and _ATTRIBUTE_ACCESS.search(text) is None


def _evaluate_in_child(op, pred: str, gold: str) -> bool:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        os.close(read_end)
        import resource

        # A child that escapes the process group (setsid) still dies of CPU exhaustion.
        resource.setrlimit(resource.RLIMIT_CPU, (5, 5))
        os.write(write_end, b"1" if op(pred, gold) else b"0")
        os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as reader:
            return reader.read(1) == b"1"
    finally:
        os.waitpid(pid, 0)


def _handle(request: dict) -> bool:
    op = _OPS[request["op"]]
    pred, gold = request["pred"], request["gold"]
    if request["op"] == "sympy" and _is_inert(pred) and _is_inert(gold):
        return op(pred, gold)
    return _evaluate_in_child(op, pred, gold)


def _serve() -> None:  # pragma: no cover - exercised through SympyChecker in a subprocess
    from grail_megatron.rewards.privileges import Limits, drop_to, isolate_network

    import sympy  # noqa: F401 - imported before the sandbox closes, so requests start warm

    _sympy_equal("sqrt(8)", "2*sqrt(2)")
    _sympy_equal("(x-1)*(x+1)", "x**2-1")
    if os.environ.get("GRAIL_PRELOAD_MATH_VERIFY") == "1" or "--math-verify" in sys.argv:
        _math_verify_equal("\\frac{1}{2}", "0.5")
    isolate_network()
    Limits(open_files=64).apply()
    drop_to()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(b"ready\n")
    stdout.flush()
    for line in stdin:
        try:
            equal = _handle(json.loads(line))
            reply = {"equal": equal}
        except Exception as exc:  # a failing check must never kill the worker
            reply = {"equal": False, "error": f"{type(exc).__name__}: {exc}"}
        stdout.write(json.dumps(reply).encode() + b"\n")
        stdout.flush()


# --------------------------------------------------------------------------- client side
class _Worker:
    def __init__(self, math_verify: bool) -> None:
        argv = [sys.executable, "-I", "-m", "grail_megatron.rewards.sympy_worker"]
        if math_verify:
            argv.append("--math-verify")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={},
            start_new_session=True,  # its own process group: killpg reaches forked children
        )
        self.ready = False
        self._buffer = b""

    def _readline(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("sympy worker exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def wait_ready(self, deadline: float) -> bool:
        if not self.ready:
            line = self._readline(deadline)
            self.ready = line == b"ready"
        return self.ready

    def ask(self, request: dict, deadline: float) -> dict | None:
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        line = self._readline(deadline)
        return None if line is None else json.loads(line)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class SympyChecker:
    """Thread-safe front end: one active worker, one warm spare, an LRU cache."""

    def __init__(self, budget: float = 0.5, startup_timeout: float = 60.0, cache_size: int = 65536):
        self.budget = budget
        self.startup_timeout = startup_timeout
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str, str], CheckResult] = OrderedDict()
        self._lock = threading.Lock()
        self._active: dict[bool, _Worker] = {}
        self._spare: dict[bool, _Worker] = {}
        self.kills = 0

    def check(self, pred: str, gold: str, op: str = "sympy") -> CheckResult:
        key = (op, pred, gold)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            result = self._ask(op, pred, gold)
            self._cache[key] = result
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return result

    def warmup(self, math_verify: bool = False) -> None:
        """Start (and wait for) the worker so the first check pays no startup."""
        with self._lock:
            self._worker(math_verify)
            self._spare_for(math_verify)

    def close(self) -> None:
        with self._lock:
            for worker in [*self._active.values(), *self._spare.values()]:
                worker.kill()
            self._active.clear()
            self._spare.clear()

    # -- internals (called with the lock held)
    def _spare_for(self, math_verify: bool) -> _Worker:
        if math_verify not in self._spare:
            self._spare[math_verify] = _Worker(math_verify)
        return self._spare[math_verify]

    def _worker(self, math_verify: bool) -> _Worker:
        worker = self._active.get(math_verify)
        if worker is None:
            worker = self._spare.pop(math_verify, None) or _Worker(math_verify)
            self._active[math_verify] = worker
            self._spare_for(math_verify)  # start the replacement while this one works
        if not worker.wait_ready(time.monotonic() + self.startup_timeout):
            raise RuntimeError("sympy worker did not start")
        return worker

    def _ask(self, op: str, pred: str, gold: str) -> CheckResult:
        math_verify = op == "math_verify"
        try:
            worker = self._worker(math_verify)
            reply = worker.ask({"op": op, "pred": pred, "gold": gold}, time.monotonic() + self.budget)
        except (EOFError, BrokenPipeError, OSError, RuntimeError) as exc:
            self._retire(math_verify)
            return CheckResult(False, error=f"sympy worker failed: {exc}")
        if reply is None:  # over budget: the reference would still be running
            self._retire(math_verify)
            self.kills += 1
            return CheckResult(False, timed_out=True)
        return CheckResult(bool(reply["equal"]), error=reply.get("error", ""))

    def _retire(self, math_verify: bool) -> None:
        worker = self._active.pop(math_verify, None)
        if worker is not None:
            worker.kill()


_DEFAULT: SympyChecker | None = None
_DEFAULT_LOCK = threading.Lock()


def default_checker() -> SympyChecker:
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = SympyChecker()
            import atexit

            atexit.register(_DEFAULT.close)
        return _DEFAULT


if __name__ == "__main__":
    _serve()
