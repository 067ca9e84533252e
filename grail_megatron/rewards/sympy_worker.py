"""Bounded sympy (and math-verify) equivalence checks in a sandboxed worker process.

``sympy.parse_expr`` evaluates its input with ``eval`` and ``simplify`` can run forever
(``10**10**10``, huge factorials, deep nesting), so the GRAIL strategy "parse both answers,
``simplify(a - b) == 0``" runs in a separate process that:

* is started with an empty environment, imports sympy once and then enters the MBPP
  tests' jail without the writable directories (``_confine``: ``nobody`` or no
  capabilities, no network, no IPC object, no writable path, no Unix socket, no new namespace,
  its own PID namespace, RLIMIT_AS 1 GiB);
* never evaluates anything itself: it forks evaluator processes from its warm state and
  SIGKILLs one that runs past ``budget`` seconds; the replacement is another fork
  (milliseconds), so a hang costs one budget and the next call pays nothing;
* keeps one persistent evaluator (warm sympy cache) for answers made of plain math
  characters (no ``_``, quotes, backslashes or attribute access), which cannot reach and
  alter sympy's state; any other answer gets a one-shot evaluator that dies afterwards,
  so one completion cannot change how later completions are judged.
"""
from __future__ import annotations

import json
import os
import queue
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from grail_megatron.rewards.sandbox import SandboxUnavailable
from grail_megatron.rewards.sandbox_mode import SYMPY_UNAVAILABLE_PREFIX, no_sympy_allowed

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


def _cost_hint(key: tuple[str, str, str]) -> int:
    """A guess at how slow a check is (powers and factorials are what sympy spends long
    on), used only to start those first in a batch: it changes no verdict."""
    text = key[1] + key[2]
    return text.count("**") + text.count("^") + text.count("!") + 2 * text.count("factorial")


def _is_inert(text: str) -> bool:
    return _SAFE_EXPRESSION.fullmatch(text) is not None and _ATTRIBUTE_ACCESS.search(text) is None


def _read_line(fd: int, deadline: float | None, buffer: bytearray) -> bytes | None:
    """One line from ``fd`` (None at the deadline); raises EOFError when the writer is gone."""
    while b"\n" not in buffer:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
        chunk = os.read(fd, 65536)
        if not chunk:
            raise EOFError("peer closed the pipe")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


def _evaluate(request: dict) -> dict:
    try:
        return {"equal": _OPS[request["op"]](request["pred"], request["gold"])}
    except Exception as exc:  # a failing check must never kill the evaluator
        return {"equal": False, "error": f"{type(exc).__name__}: {exc}"}


class _Evaluator:
    """A process forked from the warm server that evaluates requests; killed on overrun.

    The persistent evaluator serves inert requests (its sympy cache stays warm); a one-shot
    evaluator serves a single request that could alter interpreter state, then dies.
    """

    def __init__(self) -> None:
        to_child, self._to_child = os.pipe()
        self._from_child, from_parent = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - evaluator process
            os.close(self._to_child)
            os.close(self._from_child)
            self._serve_child(to_child, from_parent)
        os.close(to_child)
        os.close(from_parent)
        self._buffer = bytearray()

    @staticmethod
    def _serve_child(requests: int, replies: int) -> None:  # pragma: no cover - child
        import resource

        # A runaway that escapes the process group (setsid) still dies of CPU exhaustion.
        resource.setrlimit(resource.RLIMIT_CPU, (EVALUATOR_CPU_SECONDS, EVALUATOR_CPU_SECONDS))
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        # Keep only our own pipes: a one-shot evaluator must not be able to talk to the
        # persistent one (whose pipe ends the server holds) or to the scoring process.
        low, high = sorted((requests, replies))
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, 1 << 16)
        buffer = bytearray()
        while True:
            try:
                line = _read_line(requests, None, buffer)
            except EOFError:
                os._exit(0)
            os.write(replies, json.dumps(_evaluate(json.loads(line))).encode() + b"\n")

    def ask(self, request: dict, deadline: float) -> dict | None:
        """The reply, or None if the deadline passed first."""
        try:
            os.write(self._to_child, json.dumps(request).encode() + b"\n")
            line = _read_line(self._from_child, deadline, self._buffer)
        except (EOFError, BrokenPipeError):
            return {"equal": False, "error": "evaluator died"}
        return None if line is None else json.loads(line)

    def kill(self) -> None:
        """SIGKILL without waiting: tearing down gigabytes of address space can take
        seconds, which must not delay the reply; ``_Server`` reaps the pid later."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(self._to_child)
        os.close(self._from_child)


EVALUATOR_CPU_SECONDS = 120  # RLIMIT_CPU of an evaluator (the persistent one is recycled at half)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live child (0 if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class _Server:
    """The worker process's loop. It never evaluates anything itself: it forks evaluators,
    so replacing a killed one costs a fork (milliseconds), not a sympy import (seconds).
    Forks happen after the reply (``prepare``) where they can: a persistent evaluator to
    replace a killed one, and a one-shot evaluator ready for the next non-inert answer."""

    def __init__(self) -> None:
        self._persistent: _Evaluator | None = _Evaluator()
        self._spare: _Evaluator | None = None
        self._killed: list[int] = []

    def prepare(self) -> None:
        """Off the clock, between a reply and the next request: the evaluators the next
        request may need. The persistent evaluator is recycled once it has used half of
        its CPU allowance, so that RLIMIT_CPU never kills it in the middle of a check."""
        if self._persistent is not None and _cpu_seconds(self._persistent.pid) > EVALUATOR_CPU_SECONDS / 2:
            self._retire(self._persistent)
            self._persistent = None
        if self._persistent is None:
            self._persistent = _Evaluator()
        if self._spare is None:
            self._spare = _Evaluator()

    def _take_persistent(self) -> _Evaluator:
        if self._persistent is None:
            self._persistent = _Evaluator()
        return self._persistent

    def _take_one_shot(self) -> _Evaluator:
        evaluator, self._spare = self._spare, None
        return evaluator or _Evaluator()

    def _retire(self, evaluator: _Evaluator) -> None:
        evaluator.kill()
        self._killed.append(evaluator.pid)

    def _reap(self) -> None:
        for pid in list(self._killed):
            if os.waitpid(pid, os.WNOHANG)[0]:
                self._killed.remove(pid)

    @staticmethod
    def _inert(request: dict) -> bool:
        return request["op"] == "sympy" and _is_inert(request["pred"]) and _is_inert(request["gold"])

    def handle(self, request: dict) -> dict:
        self._reap()
        deadline = time.monotonic() + float(request["budget"])
        inert = self._inert(request)
        evaluator = self._take_persistent() if inert else self._take_one_shot()
        reply = evaluator.ask(request, deadline)
        broken = reply is None or reply.get("error") == "evaluator died"
        if broken or not inert:
            self._retire(evaluator)
        if broken and inert:
            self._persistent = None  # replaced by prepare(), after the reply
        if reply is None:  # over budget: the reference would still be running
            return {"equal": False, "timed_out": True}
        return reply

    def handle_many(self, requests: list[dict]) -> list[dict]:
        """The replies ``handle`` would give, one per request, in order. Inert requests go
        to the persistent evaluator back to back (``_pipeline``), so that it never waits
        for the next one; the others get their one-shot evaluators as in ``handle``."""
        self._reap()
        replies: list[dict | None] = [None] * len(requests)
        pending = []
        for index, request in enumerate(requests):
            if self._inert(request):
                pending.append(index)
            else:
                replies[index] = self.handle(request)
        while pending:
            pending = self._pipeline(requests, pending, replies)
        return replies

    def _pipeline(self, requests: list[dict], indices: list[int], replies: list) -> list[int]:
        """Stream ``requests[indices]`` to the persistent evaluator and collect its replies.
        Each request has its own budget, counted from the reply to the one before it (the
        evaluator starts it then). On an overrun (or the evaluator's death) that request
        gets ``handle``'s reply, a fresh evaluator replaces the old one, and the indices
        not yet answered are returned."""
        evaluator = self._take_persistent()
        outgoing = bytearray(b"".join(json.dumps(requests[i]).encode() + b"\n" for i in indices))
        done, died = 0, False
        deadline = time.monotonic() + float(requests[indices[0]]["budget"])
        os.set_blocking(evaluator._to_child, False)  # never block on a busy evaluator
        try:
            while done < len(indices):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                writers = [evaluator._to_child] if outgoing else []
                readable, writable, _ = select.select([evaluator._from_child], writers, [], remaining)
                if writable:
                    try:
                        del outgoing[: os.write(evaluator._to_child, outgoing)]
                    except BlockingIOError:
                        pass
                    except BrokenPipeError:
                        died = True
                        break
                if not readable:
                    continue
                chunk = os.read(evaluator._from_child, 65536)
                if not chunk:
                    died = True
                    break
                evaluator._buffer += chunk
                while b"\n" in evaluator._buffer and done < len(indices):
                    line, _, rest = bytes(evaluator._buffer).partition(b"\n")
                    evaluator._buffer[:] = rest
                    replies[indices[done]] = json.loads(line)
                    done += 1
                    if done < len(indices):
                        deadline = time.monotonic() + float(requests[indices[done]]["budget"])
        finally:
            if not died:
                os.set_blocking(evaluator._to_child, True)
        if done == len(indices):
            return []
        self._retire(evaluator)
        self._persistent = None  # the next _pipeline round forks a fresh one
        replies[indices[done]] = ({"equal": False, "error": "evaluator died"} if died
                                  else {"equal": False, "timed_out": True})
        return indices[done + 1:]


# Exercised once before serving so that lazily imported sympy machinery (trigsimp,
# combinatorics, floats, relationals) is already loaded in every forked evaluator.
_WARMUP = (
    ("sqrt(8)", "2*sqrt(2)"), ("(x-1)*(x+1)", "x**2-1"), ("sin(x)**2+cos(x)**2", "1"),
    ("exp(i*pi*x)", "cos(pi*x)+i*sin(pi*x)"), ("factorial(5)", "binomial(6,3)*6"),
    ("0.75", "3/4"), ("log(8)/log(2)", "3"), ("(1,2)", "(2,1)"), ("x>1", "1<x"), ("oo", "pi"),
    ("tan(x)", "sin(x)/cos(x)"), ("1/sqrt(2)", "sqrt(2)/2"),
)


def _confine() -> None:  # pragma: no cover - runs in the worker process
    """The MBPP tests' jail, read-only: own network, IPC (no System V objects, no message
    queues: limits 0 where writable, and seccomp refuses their creation in any case) and PID
    namespaces, a read-only tree whose shared directories (/tmp, /run, /dev/shm, ...) are
    empty read-only tmpfs, the seccomp filter (no Unix sockets, no new namespaces, no IPC
    objects). Root: the import dirs stay reachable for ``nobody``, then ``nobody``.
    Not root: its own user namespace, the caller's private directories hidden (``--hide``),
    no capabilities."""
    from grail_megatron.rewards.jail import IPC_NONE, SyscallFilter, limit_ipc, shared_dirs
    from grail_megatron.rewards.privileges import (
        become_namespace_init, drop_capabilities, drop_to, enter_unprivileged_sandbox)
    from grail_megatron.rewards.sandbox_fs import jail_filesystem, jail_plans

    root = os.geteuid() == 0
    hide = next((arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--hide=")), "")
    imports = [sys.base_prefix, sys.prefix, *sys.path]  # with <prefix>/lib's shared libraries
    plans = jail_plans("root" if root else "userns", tuple(d for d in hide.split(":") if d),
                       shared_dirs(), imports)
    # No IPC object at all (its limits are 0 as root; in a user namespace that maps only
    # the caller's uid they cannot be written, so seccomp refuses their creation).
    syscall_filter = SyscallFilter(refuse_ipc=True)
    if root:
        os.unshare(os.CLONE_NEWNET | os.CLONE_NEWIPC | os.CLONE_NEWPID)
        become_namespace_init()
    else:
        enter_unprivileged_sandbox()
    limit_ipc(IPC_NONE, required=root)
    jail_filesystem(*plans, 1 << 20, writable=False)
    if root:
        drop_to()
    else:
        drop_capabilities()
    syscall_filter.load()


def _serve() -> None:  # pragma: no cover - exercised through SympyChecker in a subprocess
    from grail_megatron.rewards.privileges import Limits, nproc_counts_per_user_namespace
    from grail_megatron.rewards.sandbox_mode import explain_os_error, sympy_unavailable_message

    import sympy  # noqa: F401 - imported before the sandbox closes, so evaluators start warm

    for pred, gold in _WARMUP:
        _sympy_equal(pred, gold)
    if "--math-verify" in sys.argv:
        _math_verify_equal("\\frac{1}{2}", "0.5")
    unprivileged = os.geteuid() != 0  # before _confine: as root it becomes nobody
    try:
        _confine()
    except OSError as exc:
        sys.stderr.write(sympy_unavailable_message(explain_os_error(exc)) + "\n")
        sys.exit(1)
    # 1 GiB is far beyond what real answers need, and bounds what a kill must tear down.
    # Not root, the worker has a user namespace of its own, in which a process cap bounds
    # an answer that forks (``__import__('os').fork()`` reaches eval) without touching
    # the trainer's processes (as root it shares ``nobody`` with the MBPP tests: no cap).
    processes = 64 if unprivileged and nproc_counts_per_user_namespace() else None
    Limits(address_space=1024**3, open_files=64, processes=processes).apply()
    server = _Server()
    server.prepare()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(b"ready\n")
    stdout.flush()
    for line in stdin:
        request = json.loads(line)
        if "many" in request:  # SympyChecker.check_many
            reply = {"replies": server.handle_many(request["many"])}
        else:
            reply = server.handle(request)
        stdout.write(json.dumps(reply).encode() + b"\n")
        stdout.flush()
        server.prepare()


# --------------------------------------------------------------------------- client side
_DYING: list[subprocess.Popen] = []
_DYING_LOCK = threading.Lock()  # workers start and die in several threads (check_many)
LATE_REPLY_SECONDS = 2.0  # how long a late worker may take to answer before it is replaced


class _Worker:
    def __init__(self, math_verify: bool) -> None:
        with _DYING_LOCK:
            _DYING[:] = [proc for proc in _DYING if proc.poll() is None]
        from grail_megatron.rewards.sandbox_mode import hidden_dirs

        argv = [sys.executable, "-I", "-m", "grail_megatron.rewards.sympy_worker"]
        if math_verify:
            argv.append("--math-verify")
        if os.geteuid() != 0:  # the worker's env is empty: it cannot find the home itself
            argv.append("--hide=" + ":".join(hidden_dirs()))
        self._stderr = tempfile.TemporaryFile()  # read only if it fails to start
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
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
            try:
                line = self._readline(deadline)
            except EOFError:
                line = None
            self.ready = line == b"ready"
        return self.ready

    def startup_error(self) -> str:
        """The last line the worker wrote to stderr (why it did not start)."""
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def ask(self, request: dict, deadline: float) -> dict | None:
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        line = self._readline(deadline)
        return None if line is None else json.loads(line)

    def read_late_reply(self, deadline: float) -> bool:
        """Consume the reply the caller gave up on; True if it came before the deadline."""
        return self._readline(deadline) is not None

    def signal_kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal_kill()
        with _DYING_LOCK:
            _DYING.append(self.proc)  # reaped later: teardown of a huge process takes a while
        self._stderr.close()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class SympyChecker:
    """Thread-safe front end: up to ``workers`` worker processes per mode (a batch scored
    from several threads checks that many answers at once), an LRU cache of verdicts.

    A worker enforces ``budget`` itself (it kills and re-forks its evaluator); this side
    only waits ``budget + slack`` and replaces the whole worker if even that passes.
    """

    def __init__(self, budget: float = 0.5, slack: float = 0.25, startup_timeout: float = 60.0,
                 cache_size: int = 65536, workers: int = 1):
        self.budget = budget
        self.slack = slack
        self.startup_timeout = startup_timeout
        self.cache_size = cache_size
        self.max_workers = max(1, workers)
        self._cache: OrderedDict[tuple[str, str, str], CheckResult] = OrderedDict()
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._idle: dict[bool, list[_Worker]] = {False: [], True: []}
        self._started: dict[bool, int] = {False: 0, True: 0}
        self._unavailable = ""  # why no worker can start here (accepted via GRAIL_ALLOW_NO_SYMPY)
        self.timeouts = 0
        self._draining: set[_Worker] = set()  # late for their caller, maybe still fine

    def check(self, pred: str, gold: str, op: str = "sympy") -> CheckResult:
        key = (op, pred, gold)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        result = self._ask(op, pred, gold)
        with self._lock:
            self._cache[key] = result
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result

    def check_many(self, checks: list[tuple[str, str, str]]) -> list[CheckResult]:
        """``check(pred, gold, op)`` for each ``(op, pred, gold)``, the same verdicts, faster:
        the checks not in the cache are sent in chunks to all the workers at once, and a
        worker streams a chunk's inert answers to its persistent evaluator back to back
        (``_Server.handle_many``) instead of one round trip per answer."""
        with self._lock:
            missing = list(dict.fromkeys(key for key in checks if key not in self._cache))
        chunks: queue.SimpleQueue[list[tuple[str, str, str]]] = queue.SimpleQueue()
        count = 0
        for op in dict.fromkeys(key[0] for key in missing):
            keys = [key for key in missing if key[0] == op]
            keys.sort(key=_cost_hint, reverse=True)  # likely slow answers start first
            # Several chunks per worker, strided, so that the workers share a batch evenly
            # even where slow answers (the rollouts of one hard prompt) are adjacent.
            parts = min(len(keys), max(4 * self.max_workers, -(-len(keys) // 16)))
            for part in range(parts):
                chunks.put(keys[part::parts])
                count += 1
        errors: list[BaseException] = []

        def drain() -> None:
            while True:
                try:
                    part = chunks.get_nowait()
                except queue.Empty:
                    return
                try:
                    self._ask_many(part)
                except SandboxUnavailable as exc:
                    errors.append(exc)
                    return
                except Exception:  # this chunk is then asked one answer at a time, below
                    continue

        threads = [threading.Thread(target=drain) for _ in range(min(self.max_workers, count))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        # Cache hits now, except where a worker failed: those are asked one by one.
        return [self.check(pred, gold, op) for op, pred, gold in checks]

    def warmup(self, math_verify: bool = False) -> None:
        """Start every worker (at once) and wait for them, so no check pays a start."""
        with self._lock:
            missing = self.max_workers - self._started[math_verify]
            self._started[math_verify] += missing
        fresh = [_Worker(math_verify) for _ in range(missing)]
        for worker in fresh:
            self._release(self._ready_or_raise(worker, math_verify), math_verify)

    def close(self) -> None:
        with self._lock:
            workers = self._idle[False] + self._idle[True]
            self._idle = {False: [], True: []}
            self._started = {False: 0, True: 0}
            draining, self._draining = self._draining, set()
        for worker in workers:
            worker.kill()
        for worker in draining:  # its waiting thread sees EOF and closes its pipes
            worker.signal_kill()

    # -- internals
    def _acquire(self, math_verify: bool) -> _Worker:
        with self._lock:
            while True:
                if self._unavailable:  # do not pay a failing start (a sympy import) per check
                    raise RuntimeError(self._unavailable)
                if self._idle[math_verify]:
                    return self._idle[math_verify].pop()
                if self._started[math_verify] < self.max_workers:
                    self._started[math_verify] += 1
                    break
                self._freed.wait()
        return self._ready_or_raise(_Worker(math_verify), math_verify)

    def _ready_or_raise(self, worker: _Worker, math_verify: bool) -> _Worker:
        if worker.wait_ready(time.monotonic() + self.startup_timeout):
            return worker
        error = worker.startup_error()
        self._retire(worker, math_verify)
        if error.startswith(SYMPY_UNAVAILABLE_PREFIX):
            if not no_sympy_allowed():
                raise SandboxUnavailable(error)  # loud: MATH scores would silently change
            with self._lock:
                self._unavailable = error
        raise RuntimeError(f"sympy worker did not start: {error}")

    def _release(self, worker: _Worker, math_verify: bool) -> None:
        with self._lock:
            self._idle[math_verify].append(worker)
            self._freed.notify()

    def _retire(self, worker: _Worker, math_verify: bool) -> None:
        worker.kill()
        with self._lock:
            self._started[math_verify] -= 1
            self._freed.notify()

    def _ask_many(self, keys: list[tuple[str, str, str]]) -> None:
        """One chunk through one worker; its verdicts go to the cache. A failure caches
        nothing (``check`` then asks again, one answer at a time)."""
        math_verify = keys[0][0] == "math_verify"
        requests = [{"op": op, "pred": pred, "gold": gold, "budget": self.budget} for op, pred, gold in keys]
        try:
            worker = self._acquire(math_verify)
        except SandboxUnavailable:
            raise
        except RuntimeError:  # the worker could not start: check() reports it per answer
            return
        # The worker bounds each answer by the budget (and a fork): this only catches a
        # stuck worker.
        deadline = time.monotonic() + len(keys) * (self.budget + self.slack) + self.slack
        try:
            reply = worker.ask({"many": requests}, deadline)
        except (EOFError, OSError, ValueError):
            reply = None
        if reply is None or len(reply.get("replies", ())) != len(keys):
            self._retire(worker, math_verify)
            return
        self._release(worker, math_verify)
        results = [CheckResult(bool(r["equal"]), bool(r.get("timed_out")), r.get("error", ""))
                   for r in reply["replies"]]
        with self._lock:
            self.timeouts += sum(result.timed_out for result in results)
            for key, result in zip(keys, results):
                self._cache[key] = result
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _await_late_reply(self, worker: _Worker, math_verify: bool) -> None:
        """A worker that did not answer within budget + slack: usually its own kill and
        reply were delayed by a loaded machine. Keep it if the reply comes within
        ``LATE_REPLY_SECONDS`` (sparing later checks a worker start, seconds), else replace
        it. Meanwhile it is neither idle nor retired, so ``_acquire`` waits for it."""
        with self._lock:
            self._draining.add(worker)

        def wait() -> None:
            try:
                late = worker.read_late_reply(time.monotonic() + LATE_REPLY_SECONDS)
            except (EOFError, OSError, ValueError):
                late = False
            with self._lock:
                ours = worker in self._draining
                self._draining.discard(worker)
            if not ours:  # closed meanwhile
                worker.kill()
            elif late:
                self._release(worker, math_verify)
            else:
                self._retire(worker, math_verify)

        threading.Thread(target=wait, name="sympy-late-reply", daemon=True).start()

    def _ask(self, op: str, pred: str, gold: str) -> CheckResult:
        math_verify = op == "math_verify"
        request = {"op": op, "pred": pred, "gold": gold, "budget": self.budget}
        try:
            worker = self._acquire(math_verify)
        except SandboxUnavailable:
            raise
        except RuntimeError as exc:
            return CheckResult(False, error=f"sympy worker failed: {exc}")
        try:
            reply = worker.ask(request, time.monotonic() + self.budget + self.slack)
        except (EOFError, OSError, ValueError) as exc:
            self._retire(worker, math_verify)
            return CheckResult(False, error=f"sympy worker failed: {exc}")
        if reply is None:  # the worker is late (or stuck): the caller's wait is over
            self._await_late_reply(worker, math_verify)
            reply = {"equal": False, "timed_out": True}
        else:
            self._release(worker, math_verify)
        if reply.get("timed_out"):
            with self._lock:
                self.timeouts += 1
        return CheckResult(bool(reply["equal"]), bool(reply.get("timed_out")), reply.get("error", ""))


_DEFAULT: SympyChecker | None = None
_DEFAULT_LOCK = threading.Lock()


def default_workers() -> int:
    """``GRAIL_SYMPY_WORKERS``, else the CPU count, at most 4 (each holds ~100 MB)."""
    return int(os.environ.get("GRAIL_SYMPY_WORKERS", "0")) or min(os.cpu_count() or 1, 4)


def default_checker() -> SympyChecker:
    """The process-wide checker: ``default_workers()`` workers, budget (seconds) from
    ``GRAIL_SYMPY_BUDGET``."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = SympyChecker(budget=float(os.environ.get("GRAIL_SYMPY_BUDGET", "0.5")),
                                    workers=default_workers())
            import atexit

            atexit.register(_DEFAULT.close)
        return _DEFAULT


if __name__ == "__main__":
    _serve()
