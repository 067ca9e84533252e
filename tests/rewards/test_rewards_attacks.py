"""Issue 14's attacks, as a hostile completion would run them, in every sandbox mode this
machine has: each is contained, scores 0 on correctness, and leaves nothing on the host
(files, System V objects, processes).

Modes: ``root`` (the scorer is uid 0: tests run as ``nobody``) and ``userns`` (the scorer is
an ordinary user). Run as root, as here, the userns side is a scorer started as ``nobody``
through ``nonroot_launcher.py`` (``nonroot_server.py``, driven line by line) so that its
pool and sympy worker take the unprivileged path for real; this process checks the host
between requests. Run as another uid, root mode is skipped and userns runs in process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from grail_megatron.rewards import SandboxConfig, SandboxPool, SandboxUnavailable, compute_score, sympy_worker
from rewards_cases import visible_scratch_dir

HERE = Path(__file__).parent
THINK = "<start_working_out>w</end_working_out>"
SHARED_HOST_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
CONFIG = SandboxConfig(timeout=3.0)


class _InProcess:
    """A pool and a sympy checker of this process (root mode as uid 0, else userns)."""

    def __init__(self, mode: str) -> None:
        self.pool = SandboxPool(workers=1, config=SandboxConfig(timeout=CONFIG.timeout, mode=mode))
        self.mode = self.pool.mode
        self._saved = sympy_worker._DEFAULT
        sympy_worker._DEFAULT = self.checker = sympy_worker.SympyChecker(workers=1)
        self.checker.warmup()

    def score(self, family: str, solution_str: str, ground_truth: str) -> dict:
        return compute_score(f"grail_{family}", solution_str, ground_truth, sandbox=self.pool)

    def run(self, programs: list[str]) -> list[dict]:
        return self.pool.run(programs)

    def zygotes(self) -> list[int]:
        return [zygote.proc.pid for zygote in self.pool._all]

    def sympy_pids(self) -> list[int]:
        return [worker.proc.pid for workers in self.checker._idle.values() for worker in workers]

    def close_math(self) -> None:
        self.checker.close()
        for proc in list(sympy_worker._DYING):
            proc.wait()

    def close(self) -> None:
        self.pool.close()
        self.checker.close()
        sympy_worker._DEFAULT = self._saved


class _AsNobody:
    """``nonroot_server.py`` as ``nobody``: the userns path, driven from this (root) process."""

    def __init__(self) -> None:
        argv = [sys.executable, str(HERE / "nonroot_launcher.py"), str(HERE / "nonroot_server.py"),
                json.dumps(CONFIG.to_json_dict())]
        env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "GRAIL_SYMPY_WORKERS": "1"}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd="/")
        hello = self._line()
        if "unavailable" in hello:
            self.close()
            pytest.skip(f"userns mode cannot run here: {hello['unavailable']}")
        self.mode, self._zygotes = hello["mode"], hello["zygotes"]

    def _line(self):
        line = self.proc.stdout.readline()
        assert line, f"nonroot_server.py exited with {self.proc.wait()}"
        return json.loads(line)

    def _ask(self, **request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._line()

    def score(self, family: str, solution_str: str, ground_truth: str) -> dict:
        return self._ask(op=family, solution_str=solution_str, ground_truth=ground_truth)

    def run(self, programs: list[str]) -> list[dict]:
        return self._ask(op="run", programs=programs)

    def zygotes(self) -> list[int]:
        # Not root, a zygote is PID 1 of its namespace under a relay (privileges.py).
        return [child for relay in self._zygotes for child in _children(relay)]

    def sympy_pids(self) -> list[int]:
        return self._ask(op="sympy_pids")

    def close_math(self) -> None:
        assert self._ask(op="close_math") == "closed"

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def world_writable():
    """A mode-1777 directory made before the scorers start (the pool's scan of shared
    directories may find it, else it is read-only like the rest of the tree)."""
    base = visible_scratch_dir("world-writable")
    drop = base / "drop"
    drop.mkdir()
    drop.chmod(0o1777)
    yield drop
    for entry in drop.iterdir():
        entry.unlink()
    drop.rmdir()
    base.rmdir()


@pytest.fixture(scope="module", params=["root", "userns"])
def sandbox(request, world_writable):
    """One scorer per mode; a mode this machine lacks is skipped with the reason."""
    mode = request.param
    if mode == "root" and os.geteuid() != 0:
        pytest.skip(f"root mode needs uid 0; this scorer runs as uid {os.geteuid()}")
    try:
        scorer = _AsNobody() if mode == "userns" and os.geteuid() == 0 else _InProcess(mode)
    except SandboxUnavailable as exc:
        pytest.skip(f"{mode} mode cannot run here: {exc}")
    assert scorer.mode == mode
    try:
        yield scorer
    finally:
        scorer.close()


def _mbpp(sandbox, code: str, tests: list[str]) -> dict:
    return sandbox.score("mbpp", f"{THINK}<SOLUTION>{code}</SOLUTION>", json.dumps({"test_list": tests}))


def _math(sandbox, answer: str, gold: str) -> dict:
    return sandbox.score("math", f"{THINK}<SOLUTION>{answer}</SOLUTION>", gold)


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
    return parents


def _children(pid: int) -> list[int]:
    return [child for child, parent in _parents().items() if parent == pid]


def _descendants(roots: set[int]) -> list[int]:
    parents = _parents()
    found = []
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor and ancestor not in roots:
            ancestor = parents.get(ancestor)
        if ancestor in roots:
            found.append(pid)
    return found


def _alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still exist and are not zombies."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _no_test_process_left(sandbox) -> None:
    assert _descendants(set(sandbox.zygotes())) == []


def _sysv_keys(ipc_namespace_of: int | None = None) -> set[int]:
    """Keys of System V segments, queues and semaphore sets (``ipcs``), here or in the IPC
    namespace of a pid."""
    prefix = ["nsenter", f"--ipc=/proc/{ipc_namespace_of}/ns/ipc"] if ipc_namespace_of else []
    done = subprocess.run([*prefix, "ipcs", "-m", "-q", "-s"], capture_output=True, text=True, check=True)
    return {int(line.split()[0], 16) for line in done.stdout.splitlines() if line.startswith("0x")}


@pytest.fixture
def marker():
    name = f"grail-attack-{uuid.uuid4().hex}"
    yield name
    for directory in SHARED_HOST_DIRS:
        Path(directory, name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- MATH
def test_math_answer_cannot_write_files_or_use_ipc_sockets_or_namespaces(sandbox, marker):
    visible = visible_scratch_dir("math-control")
    (visible / "seven.txt").write_text("7654321")
    host_keys = _sysv_keys()
    try:
        # Control: the answer really reaches parse_expr's eval, which reads a visible file.
        control = _math(sandbox, f"len(open('{visible / 'seven.txt'}').read())", "7")
        assert control["correct"] is True and control["strategy"] == "symbolic", control
        attacks = [f"open('{directory}/{marker}','w').write('x')" for directory in SHARED_HOST_DIRS]
        attacks += [
            "int(__import__('ctypes').CDLL(None).shmget(4660,4096,0o1666)>=0)",  # System V IPC
            "int(__import__('ctypes').CDLL(None).msgget(4661,0o1666)>=0)",
            "int(__import__('ctypes').CDLL(None).semget(4662,1,0o1666)>=0)",
            "int(__import__('_socket').socket(1,1).fileno()>=0)",  # a Unix socket
            "int(__import__('os').unshare(0x10000000) is None)",  # a user namespace
            "int(open('/proc/sys/kernel/shmmni','w').write('1')>0)",  # raising the IPC limits
        ]
        workers = set(sandbox.sympy_pids())
        assert workers
        for answer in attacks:
            result = _math(sandbox, answer, "1")
            assert (result["correct"], result["score"]) == (False, 0.3), (answer, result)
        tree = workers | set(_descendants(workers))
        sandbox.close_math()
        deadline = time.monotonic() + 30.0  # SIGKILLed, the worker's namespace dies with it
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(tree)
    finally:
        (visible / "seven.txt").unlink()
        visible.rmdir()
    for directory in SHARED_HOST_DIRS:
        assert not Path(directory, marker).exists()
    assert not {4660, 4661, 4662} & _sysv_keys()
    assert _sysv_keys() <= host_keys


# --------------------------------------------------------------------------- MBPP sandbox
def test_no_shared_directory_or_unix_socket_reaches_the_host(sandbox, marker, world_writable):
    path = f"/run/lock/{marker}.sock"
    directories = (*SHARED_HOST_DIRS, str(world_writable))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o777)
    listener.listen(4)
    listener.settimeout(0.3)
    code = (
        "import _socket, os\n"
        "def attack():\n"
        f"    for directory in {directories!r}:\n"
        "        try:\n"
        "            os.makedirs(directory, exist_ok=True)\n"  # the private /run starts empty
        f"            open(directory + '/{marker}', 'w').write('x')\n"
        "        except OSError:\n"  # read-only: try the next one
        "            pass\n"
        f"    assert not os.path.exists({path!r}), 'the host socket is visible'\n"
        "    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n"  # refused by seccomp
        f"    s.connect({path!r})\n"
        "    return 1\n"
    )
    try:
        result = _mbpp(sandbox, code, ["assert attack() == 1"])
        assert result["correctness"] == 0 and result["test_errors"] == ["PermissionError: [Errno 1] Operation not permitted"]
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()
        os.unlink(path)
    for directory in directories:
        assert not Path(directory, marker).exists()
    _no_test_process_left(sandbox)


def test_system_v_objects_are_bounded_and_die_with_their_program(sandbox):
    key = 0x6A11
    host_keys = _sysv_keys()
    writer = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.shmat.restype = ctypes.c_void_p\n"
        "def make(size):\n"
        f"    ids = [libc.shmget({key} + i, size, 0o1666) for i in range(4)]\n"
        "    assert min(ids) >= 0, ctypes.get_errno()\n"
        "    for shm in ids:\n"
        "        ctypes.memset(libc.shmat(shm, None, 0), 120, size)\n"
        f"    assert libc.msgget({key}, 0o1666) >= 0\n"
        f"    assert libc.semget({key}, 4, 0o1666) >= 0\n"
        "    return 1\n"
    )
    reader = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def find():\n"
        f"    return ([libc.shmget({key} + i, 0, 0o666) for i in range(4)]\n"
        f"            + [libc.msgget({key}, 0o666), libc.semget({key}, 0, 0o666)])\n"
    )
    raise_limits = (  # the limits are the test's own namespace's: can it lift them?
        "def lift():\n"
        "    for name, value in (('shmmax', 1 << 30), ('shmall', 1 << 20), ('shmmni', 4096)):\n"
        "        open('/proc/sys/kernel/' + name, 'w').write(str(value))\n"
        "    return 1\n"
    )
    # Bounded per test (16 MiB in all): 4 segments of 4 MiB fit, 4 of 64 MiB (the issue's
    # 260 MB of host memory per program) do not, nor does lifting the limits.
    assert _mbpp(sandbox, writer, ["assert make(4 << 20) == 1"])["correctness"] == 0.7
    big = _mbpp(sandbox, writer, ["assert make(64 << 20) == 1"])
    assert big["correctness"] == 0 and big["test_errors"] == ["AssertionError: 22"], big  # EINVAL: > shmmax
    lifted = _mbpp(sandbox, raise_limits, ["assert lift() == 1"])
    assert lifted["correctness"] == 0 and "Read-only file system" in lifted["test_errors"][0], lifted
    assert _mbpp(sandbox, reader, ["assert find() == [-1, -1, -1, -1, -1, -1]"])["correctness"] == 0.7
    for zygote in sandbox.zygotes():
        assert not set(range(key, key + 4)) & _sysv_keys(zygote)
    assert not set(range(key, key + 4)) & _sysv_keys() and _sysv_keys() <= host_keys
    _no_test_process_left(sandbox)


def test_nested_namespaces_are_refused(sandbox):
    code = (
        "import posix\n"
        "def nest(flag):\n"
        "    posix.unshare(flag)\n"
        "    return 1\n"
    )
    tests = [f"assert nest({flag:#x}) == 1" for flag in (0x10000000, 0x20000, 0x8000000, 0x40000000)]
    result = _mbpp(sandbox, code, tests)
    assert result["correctness"] == 0
    assert result["test_errors"] == ["PermissionError: [Errno 1] Operation not permitted"] * 4
    _no_test_process_left(sandbox)


# --------------------------------------------------------------------------- reward hacks
ALWAYS_EQUAL = (
    "class Anything:\n"
    "    def __eq__(self, other):\n"
    "        return True\n"
    "    __ne__ = lambda self, other: False\n"
    "    __bool__ = lambda self: True\n"
    "def add(a, b):\n"
    "    return Anything()\n"
)
FORGE_VERDICT = (
    "import sys, posix, re\n"
    "def add(a, b):\n"
    "    fds, nonces, frame = set(range(64)), set(), sys._getframe(1)\n"
    "    while frame is not None:\n"
    "        for name, value in frame.f_locals.items():\n"
    "            if isinstance(value, str) and re.fullmatch('[0-9a-f]{32}', value):\n"
    "                nonces.add(value)\n"
    "        frame = frame.f_back\n"
    "    for nonce in nonces or {''}:\n"
    "        for line in ('{\"done\": \"%s\"}\\n' % nonce, '{\"status\": \"success\", \"error\": null}\\n',\n"
    "                     '{\"status\": \"success\", \"error\": null, \"nonce\": \"%s\"}\\n' % nonce):\n"
    "            for fd in fds:\n"
    "                try:\n"
    "                    posix.write(fd, line.encode())\n"
    "                except OSError:\n"
    "                    pass\n"
    "    posix._exit(0)\n"
)
READ_THE_TEST = (  # any string in reach that holds this test, from frames or the heap
    "import gc, re, sys\n"
    "def strings(value, depth=0):\n"
    "    if isinstance(value, str):\n"
    "        yield value\n"
    "    elif type(value) is dict and depth < 4:\n"
    "        for item in value.values():\n"
    "            yield from strings(item, depth + 1)\n"
    "    elif type(value) in (list, tuple) and depth < 4:  # not lazy namedtuples\n"
    "        for item in value:\n"
    "            yield from strings(item, depth + 1)\n"
    "def add(a, b):\n"
    "    pattern = re.compile(r'add\\(%r, %r\\) == (.+)' % (a, b))\n"
    "    frame, roots = sys._getframe(1), gc.get_objects()\n"
    "    while frame is not None:\n"
    "        roots += [frame.f_locals, frame.f_globals]\n"
    "        frame = frame.f_back\n"
    "    for root in roots:\n"
    "        for text in strings(root):\n"
    "            found = pattern.search(text)\n"
    "            if found:\n"
    "                return eval(found.group(1).splitlines()[0])\n"
    "    raise LookupError('no test text in reach')\n"
)
READ_THE_CONSTANTS = (  # the caller's code object holds the literal it compares against
    "import sys\n"
    "def add(a, b):\n"
    "    return [c for c in sys._getframe(1).f_code.co_consts if type(c) is int][-1]\n"
)
# No expected value equals an argument, so that guessing from the call's own constants fails.
HACK_TESTS = ["assert add(2, 3) == 5", "assert add(10, -4) == 6", "assert add(-1, -1) == -2"]


@pytest.mark.parametrize("code", [ALWAYS_EQUAL, FORGE_VERDICT, READ_THE_TEST, READ_THE_CONSTANTS],
                         ids=["always-equal", "forged-verdict", "test-text", "code-constants"])
def test_reward_hacks_earn_nothing(sandbox, code):
    result = _mbpp(sandbox, code, HACK_TESTS)
    assert result["syntax_valid"] is True and result["correctness"] == 0 and result["passed"] == 0, result
    assert result["score"] == pytest.approx(0.3)  # the format terms only
    _no_test_process_left(sandbox)


@pytest.mark.parametrize("code", [ALWAYS_EQUAL, FORGE_VERDICT, READ_THE_TEST, READ_THE_CONSTANTS],
                         ids=["always-equal", "forged-verdict", "test-text", "code-constants"])
def test_the_same_hacks_pass_a_test_run_whole(sandbox, code):
    """The control (and the documented limit): a test of another form runs whole, with the
    reference's semantics, and these programs pass it as they pass the reference."""
    assert sandbox.run([f"{code}\n\n{test}" for test in HACK_TESTS]) == [{"status": "success", "error": None}] * 3


def test_an_honest_program_still_scores_full(sandbox):
    result = _mbpp(sandbox, "def add(a, b):\n    return a + b\n", HACK_TESTS)
    assert result["score"] == 0.7 + 0.1 + 0.1 + 0.1 and result["passed"] == 3 and result["test_errors"] == [None] * 3
