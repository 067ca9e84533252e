"""Hostile MBPP programs are contained, scored as failing, and leave host and pool intact."""
from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest

from grail_megatron.rewards import SandboxConfig, SandboxPool
from rewards_cases import visible_scratch_dir

HARMLESS = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5"


@pytest.fixture(scope="module")
def pool():
    # One zygote, so every hostile program is followed by a program on the same zygote;
    # a 1 s timeout keeps the looping cases short (the default is the reference's 5 s) and a
    # 512 MiB address space spares the shared test machine (the default is 2 GiB, covered
    # by the parity case "huge allocation -> MemoryError").
    with SandboxPool(workers=1, config=SandboxConfig(timeout=1.0, memory_bytes=512 * 2**20)) as pool:
        yield pool


def _sandboxed_processes(pool) -> list[int]:
    """Live descendants of the pool's zygotes: test processes or anything they started
    (the sympy worker also runs as nobody in a PID namespace of its own, so uid and
    namespace depth alone cannot tell them apart)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        parents[int(entry.name)] = int(stat_line.rsplit(")", 1)[1].split()[1])
    roots = {zygote.proc.pid for zygote in pool._all}
    found = []
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor and ancestor not in roots:
            ancestor = parents.get(ancestor)
        if ancestor in roots:
            found.append(pid)
    return found


def _run_hostile(pool, program: str) -> tuple[dict, float]:
    start = time.monotonic()
    [verdict] = pool.run([program])
    elapsed = time.monotonic() - start
    assert verdict["status"] != "success", verdict
    # The next program on the same zygote is unaffected.
    assert pool.run([HARMLESS]) == [{"status": "success", "error": None}]
    assert _sandboxed_processes(pool) == []
    return verdict, elapsed


def test_fork_bomb_is_killed_with_its_whole_tree(pool):
    program = (
        "import posix\n"  # os.fork is None (reference guard); posix.fork is the real one
        "while True:\n"
        "    try:\n"
        "        if posix.fork() == 0:\n"
        "            posix.setsid()\n"  # try to leave the process group
        "    except OSError:\n"
        "        pass\n"
    )
    verdict, elapsed = _run_hostile(pool, program)
    assert verdict == {"status": "timeout", "error": "Execution timed out"}
    assert elapsed < 3.0


def test_memory_hog_hits_the_address_space_limit(pool):
    # Its own pool: the default 5 s timeout, so a loaded machine cannot turn the
    # MemoryError into a timeout, and a 256 MiB cap so the hog stays small.
    program = "blocks = []\nwhile True:\n    blocks.append(b'x' * 32 * 2**20)\n"  # touches every page
    config = SandboxConfig(memory_bytes=256 * 2**20)
    with SandboxPool(workers=1, config=config) as hog_pool:
        verdict, _ = _run_hostile(hog_pool, program)
    assert verdict == {"status": "runtime_error", "error": "MemoryError: "}
    [big] = pool.run(["x = bytearray(8 * 2**30)"])  # one huge allocation fails at once
    assert big == {"status": "runtime_error", "error": "MemoryError: "}


def test_infinite_loop_times_out(pool):
    verdict, elapsed = _run_hostile(pool, "while True:\n    pass\n")
    assert verdict["status"] == "timeout" and 0.9 < elapsed < 3.0


def test_busy_loop_catching_timeouts_and_signals_is_still_killed(pool):
    program = (
        "import signal\n"
        "for sig in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGXCPU):\n"
        "    signal.signal(sig, signal.SIG_IGN)\n"
        "while True:\n"
        "    try:\n"
        "        while True:\n"
        "            pass\n"
        "    except BaseException:\n"
        "        pass\n"
    )
    verdict, elapsed = _run_hostile(pool, program)
    assert verdict["status"] == "timeout" and elapsed < 3.0


def test_writing_a_gigabyte_file_is_stopped_and_leaves_nothing(pool):
    program = (
        "chunk = b'x' * 2**20\n"
        "with open('big.bin', 'wb') as handle:\n"
        "    for _ in range(1024):\n"
        "        handle.write(chunk)\n"
        "with open('/tmp/leftover.txt', 'w') as handle:\n"
        "    handle.write('x')\n"
    )
    verdict, _ = _run_hostile(pool, program)
    assert verdict["status"] == "runtime_error" and "File too large" in verdict["error"]
    assert not Path("/tmp/work/big.bin").exists()


def test_environment_secrets_are_invisible(pool, monkeypatch):
    monkeypatch.setenv("GRAIL_FAKE_SECRET", "hunter2-token")
    program = (
        "import os\n"
        "seen = [os.environ.get('GRAIL_FAKE_SECRET', '')]\n"
        "for pid in os.listdir('/proc'):\n"
        "    try:\n"
        "        seen.append(open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace'))\n"
        "    except OSError:\n"
        "        pass\n"
        f"for pid in ({os.getpid()}, {os.getppid()}):\n"
        "    try:\n"
        "        seen.append(open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace'))\n"
        "    except OSError:\n"
        "        pass\n"
        "assert any('hunter2-token' in text for text in seen), 'no secret visible'\n"
    )
    # A fresh pool: its zygote starts after the secret is planted in this process.
    with SandboxPool(workers=1, config=SandboxConfig(timeout=2.0)) as fresh:
        [verdict] = fresh.run([program])
        assert verdict == {"status": "runtime_error", "error": "AssertionError: no secret visible"}
        [verdict] = fresh.run(["import os\nassert dict(os.environ) == {}, dict(os.environ)"])
        assert verdict["status"] == "success"


def test_no_socket_reaches_a_host_listener(pool):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    program = (
        "import _socket\n"  # `socket` itself is blocked by the reference guard
        "s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
        "s.settimeout(0.5)\n"
        f"s.connect(('127.0.0.1', {port}))\n"
        "s.send(b'stolen')\n"
    )
    try:
        verdict, _ = _run_hostile(pool, program)
        assert verdict["status"] == "runtime_error" and "unreachable" in verdict["error"], verdict
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


def test_files_outside_the_private_directory_cannot_be_deleted(pool):
    victim_dir = visible_scratch_dir("victim")
    victim = victim_dir / "precious.txt"
    victim.write_text("keep me")
    victim.chmod(0o644)
    # Owned by the sandbox uid: only the read-only tree can protect it.
    os.chown(victim_dir, 65534, 65534)
    os.chown(victim, 65534, 65534)
    program = (
        "import posix, shutil\n"
        "for attempt in (lambda: posix.unlink(PATH), lambda: shutil.rmtree(DIR),\n"
        "                lambda: open(PATH, 'w').write('pwned'), lambda: posix.rename(PATH, PATH + '.x')):\n"
        "    try:\n"
        "        attempt()\n"
        "    except Exception as exc:\n"
        "        last = exc\n"
        "raise last\n"
    ).replace("PATH", repr(str(victim))).replace("DIR", repr(str(victim_dir)))
    try:
        verdict, _ = _run_hostile(pool, program)
        assert verdict["status"] == "runtime_error" and "Read-only file system" in verdict["error"]
        assert victim.read_text() == "keep me"
        assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    finally:
        victim.unlink()
        victim_dir.rmdir()


def test_killing_the_parent_or_everything_fails_only_the_program(pool):
    zygote_pid = pool._all[0].proc.pid
    program = (
        "import posix\n"
        f"for pid in (posix.getppid(), {zygote_pid}, {os.getpid()}, -1):\n"
        "    try:\n"
        "        posix.kill(pid, 9)\n"
        "    except OSError:\n"
        "        pass\n"
        "assert False, 'still alive'\n"
    )
    verdict, _ = _run_hostile(pool, program)
    assert verdict["status"] in {"process_error", "runtime_error"}
    assert pool._all[0].proc.poll() is None  # the zygote lives on


def test_programs_share_no_files_or_globals(pool):
    writer = (
        "import builtins\n"
        "builtins.LEAK = 1\n"
        "open('/tmp/leak.txt', 'w').write('x')\n"
        "open('/dev/shm/leak.txt', 'w').write('x')\n"
        "open('note.txt', 'w').write('x')\n"
    )
    reader = (
        "import builtins, os\n"
        "assert not hasattr(builtins, 'LEAK')\n"
        "assert not os.path.exists('/tmp/leak.txt') and not os.path.exists('/dev/shm/leak.txt')\n"
        "assert os.listdir('.') == []\n"
    )
    assert pool.run([writer]) == [{"status": "success", "error": None}]
    assert pool.run([reader]) == [{"status": "success", "error": None}]
    assert not Path("/tmp/leak.txt").exists() and not Path("/dev/shm/leak.txt").exists()


def test_reference_semantics_inside_the_sandbox(pool):
    programs = [
        "assert __name__ == 'builtins'",  # exec(code, {}) as the reference
        "import sys\nassert sys.stdin is None",
        "import os\nassert os.system is None and os.getuid() == 65534",
        "import threading",  # blocked by the reference's import guard
        "import sys\nsys.exit(3)",  # SystemExit ends the process without a verdict
    ]
    verdicts = pool.run(programs)
    assert [v["status"] for v in verdicts] == ["success", "success", "success", "runtime_error", "process_error"]
    assert verdicts[3]["error"] == "ImportError: Module 'threading' is not allowed in sandboxed execution"
    assert verdicts[4]["error"] == "Process terminated unexpectedly (exit_code=3)"


def test_tests_of_one_program_run_concurrently_so_a_call_is_bounded_by_one_timeout(pool):
    start = time.monotonic()
    verdicts = pool.run(["while True:\n    pass\n"] * 4)
    assert [v["status"] for v in verdicts] == ["timeout"] * 4
    assert time.monotonic() - start < 2.5  # 4 sequential timeouts would take 4 s


def test_a_made_up_verdict_on_every_descriptor_is_not_believed(pool):
    program = (
        "import posix\n"
        "fake = b'{\"status\": \"success\", \"error\": null}\\n'\n"
        "for fd in range(64):\n"
        "    try:\n"
        "        posix.write(fd, fake)\n"
        "    except OSError:\n"
        "        pass\n"
        "posix._exit(0)\n"
    )
    verdict, _ = _run_hostile(pool, program)
    assert verdict == {"status": "process_error", "error": "Forged verdict from the test process"}


def test_patching_the_harness_or_raising_from_str_does_not_pass(pool):
    patch_json = (
        "import json\n"
        "json.dumps = lambda *a, **k: '{\"status\": \"success\", \"error\": null}'\n"
        "assert False\n"
    )
    bad_str = "class E(Exception):\n    def __str__(self):\n        raise RuntimeError\nraise E()\n"
    verdicts = pool.run([patch_json, bad_str])
    assert verdicts[0] == {"status": "runtime_error", "error": "AssertionError: "}
    assert verdicts[1]["status"] == "process_error"
    assert pool.run([HARMLESS]) == [{"status": "success", "error": None}]
