"""Issue 14's attacks, as a hostile completion would run them (root mode, this machine):
each is contained, scores 0 on correctness, and leaves nothing on the host."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from grail_megatron.rewards import SandboxConfig, SandboxPool, compute_score, mbpp
from rewards_cases import visible_scratch_dir

THINK = "<start_working_out>w</end_working_out>"
SHARED_HOST_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=1, config=SandboxConfig(timeout=3.0)) as pool:
        yield pool


def _mbpp(pool, code: str, tests: list[str]) -> dict:
    completion = f"{THINK}<SOLUTION>{code}</SOLUTION>"
    return mbpp.score(completion, json.dumps({"test_list": tests}), pool=pool)


def _math(answer: str, gold: str) -> dict:
    return compute_score("grail_math", f"{THINK}<SOLUTION>{answer}</SOLUTION>", gold)


def _descendants(roots: set[int]) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
    found = []
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor and ancestor not in roots:
            ancestor = parents.get(ancestor)
        if ancestor in roots:
            found.append(pid)
    return found


def _sysv_keys(ipc_namespace_of: int | None = None) -> set[int]:
    """Keys of System V segments and queues, here or in the IPC namespace of a pid."""
    prefix = ["nsenter", f"--ipc=/proc/{ipc_namespace_of}/ns/ipc"] if ipc_namespace_of else []
    keys = set()
    for table in ("shm", "msg"):
        done = subprocess.run([*prefix, "cat", f"/proc/sysvipc/{table}"], capture_output=True, text=True, check=True)
        keys |= {int(line.split()[0]) for line in done.stdout.splitlines()[1:] if line.strip()}
    return keys


# --------------------------------------------------------------------------- MATH
@pytest.fixture
def marker():
    name = f"grail-attack-{uuid.uuid4().hex}"
    yield name
    for directory in SHARED_HOST_DIRS:
        Path(directory, name).unlink(missing_ok=True)


def test_math_answer_cannot_write_files_or_use_ipc_sockets_or_namespaces(marker):
    visible = visible_scratch_dir("math-control")
    (visible / "seven.txt").write_text("7654321")
    try:
        # Control: the answer really reaches parse_expr's eval, which reads a visible file.
        control = _math(f"len(open('{visible / 'seven.txt'}').read())", "7")
        assert control["correct"] is True and control["strategy"] == "symbolic"
        attacks = [f"open('{directory}/{marker}','w').write('x')" for directory in SHARED_HOST_DIRS]
        attacks += [
            "int(__import__('ctypes').CDLL(None).shmget(4660,4096,0o1666)>=0)",  # System V IPC
            "int(__import__('ctypes').CDLL(None).msgget(4661,0o1666)>=0)",
            "int(__import__('_socket').socket(1,1).fileno()>=0)",  # a Unix socket
            "int(__import__('os').unshare(0x10000000) is None)",  # a user namespace
        ]
        for answer in attacks:
            result = _math(answer, "1")
            assert (result["correct"], result["score"]) == (False, 0.3), (answer, result)
    finally:
        (visible / "seven.txt").unlink()
        visible.rmdir()
    for directory in SHARED_HOST_DIRS:
        assert not Path(directory, marker).exists()
    assert not {4660, 4661} & _sysv_keys()


# --------------------------------------------------------------------------- MBPP sandbox
def test_no_shared_directory_or_unix_socket_reaches_the_host(pool, marker):
    path = f"/run/lock/{marker}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o777)
    listener.listen(4)
    listener.settimeout(0.3)
    code = (
        "import _socket, os\n"
        "def attack():\n"
        f"    for directory in {SHARED_HOST_DIRS!r}:\n"
        "        os.makedirs(directory, exist_ok=True)\n"  # the private /run starts empty
        f"        open(directory + '/{marker}', 'w').write('x')\n"
        f"    assert not os.path.exists({path!r}), 'the host socket is visible'\n"
        "    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n"  # refused by seccomp
        f"    s.connect({path!r})\n"
        "    return 1\n"
    )
    try:
        result = _mbpp(pool, code, ["assert attack() == 1"])
        assert result["correctness"] == 0 and result["test_errors"] == ["PermissionError: [Errno 1] Operation not permitted"]
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()
        os.unlink(path)
    for directory in SHARED_HOST_DIRS:
        assert not Path(directory, marker).exists()
    assert _descendants({zygote.proc.pid for zygote in pool._all}) == []


def test_system_v_objects_die_with_their_program(pool):
    key = 0x6A11
    writer = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.shmat.restype = ctypes.c_void_p\n"
        "def make():\n"
        f"    ids = [libc.shmget({key} + i, 4 << 20, 0o1666) for i in range(4)]\n"
        "    assert min(ids) >= 0, ctypes.get_errno()\n"
        "    ctypes.memset(libc.shmat(ids[0], None, 0), 120, 4 << 20)\n"
        f"    assert libc.msgget({key}, 0o1666) >= 0\n"
        "    return 1\n"
    )
    reader = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def find():\n"
        f"    return [libc.shmget({key} + i, 0, 0o666) for i in range(4)] + [libc.msgget({key}, 0o666)]\n"
    )
    # Bounded per test (16 MiB in all): 4 segments of 4 MiB fit, one of 64 MiB does not.
    assert _mbpp(pool, writer, ["assert make() == 1"])["correctness"] == 0.7
    assert _mbpp(pool, writer.replace("4 << 20, 0o1666", "64 << 20, 0o1666"), ["assert make() == 1"])["correctness"] == 0
    assert _mbpp(pool, reader, ["assert find() == [-1, -1, -1, -1, -1]"])["correctness"] == 0.7
    zygote = pool._all[0].proc.pid
    assert not set(range(key, key + 4)) & (_sysv_keys(zygote) | _sysv_keys())


def test_nested_namespaces_are_refused(pool):
    code = (
        "import posix\n"
        "def nest(flag):\n"
        "    posix.unshare(flag)\n"
        "    return 1\n"
    )
    tests = [f"assert nest({flag:#x}) == 1" for flag in (0x10000000, 0x20000, 0x8000000, 0x40000000)]
    result = _mbpp(pool, code, tests)
    assert result["correctness"] == 0
    assert result["test_errors"] == ["PermissionError: [Errno 1] Operation not permitted"] * 4


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
    "    elif isinstance(value, dict) and depth < 4:\n"
    "        for item in value.values():\n"
    "            yield from strings(item, depth + 1)\n"
    "    elif isinstance(value, (list, tuple)) and depth < 4:\n"
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
def test_reward_hacks_earn_nothing(pool, code):
    result = _mbpp(pool, code, HACK_TESTS)
    assert result["syntax_valid"] is True and result["correctness"] == 0 and result["passed"] == 0, result
    assert result["score"] == pytest.approx(0.3)  # the format terms only
    assert _descendants({zygote.proc.pid for zygote in pool._all}) == []


@pytest.mark.parametrize("code", [ALWAYS_EQUAL, FORGE_VERDICT, READ_THE_TEST, READ_THE_CONSTANTS],
                         ids=["always-equal", "forged-verdict", "test-text", "code-constants"])
def test_the_same_hacks_pass_a_test_run_whole(pool, code):
    """The control (and the documented limit): a test of another form runs whole, with the
    reference's semantics, and these programs pass it as they pass the reference."""
    assert pool.run([f"{code}\n\n{test}" for test in HACK_TESTS]) == [{"status": "success", "error": None}] * 3


def test_an_honest_program_still_scores_full(pool):
    result = _mbpp(pool, "def add(a, b):\n    return a + b\n", HACK_TESTS)
    assert result["score"] == 0.7 + 0.1 + 0.1 + 0.1 and result["passed"] == 3 and result["test_errors"] == [None] * 3
