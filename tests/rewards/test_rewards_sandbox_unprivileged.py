"""The MBPP sandbox without root (``userns`` mode), as on a SLURM node, run for real.

This machine (and CI) runs as root, so the scorer is started as ``nobody`` (65534) through
``nonroot_launcher.py``: then ``SandboxPool`` must pick its unprivileged path (a user
namespace of the caller's own uid). The parity MBPP verdicts, the network, the environment,
the hidden home, the read-only tree, timeouts and fork bombs are checked through that path;
``--no-userns`` runs the scorer where user namespaces are forbidden (max_user_namespaces=0)
to check the loud failure and the explicit opt-in.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rewards_cases import load_parity_cases, visible_scratch_dir

HERE = Path(__file__).parent
NOBODY = 65534
SECRET = "hunter2-token"
MBPP_CASES = [case for case in load_parity_cases() if case["components"].get("route") == "mbpp"]
# MATH answers only sympy can match (the strategy order is exact, sympy, numeric).
SYMBOLIC_CASES = [case for case in load_parity_cases() if case["components"].get("strategy") == "symbolic"][:6]
ITEM_KEYS = ("data_source", "solution_str", "ground_truth")


def _run_as_nobody(request: dict, env: dict, no_userns: bool = False) -> dict:
    argv = [sys.executable, str(HERE / "nonroot_launcher.py")]
    argv += ["--no-userns"] if no_userns else []
    argv += [str(HERE / "nonroot_driver.py"), json.dumps(request)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _hostile_programs(port: int, home: Path, victim: Path) -> dict[str, str]:
    return {
        "network": (
            "import _socket\n"
            "s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
            "s.settimeout(0.5)\n"
            f"s.connect(('127.0.0.1', {port}))\n"
        ),
        "environment": (
            "import os\n"
            "seen = [repr(dict(os.environ))]\n"
            "for pid in os.listdir('/proc'):\n"
            "    try:\n"
            "        seen.append(open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace'))\n"
            "    except OSError:\n"
            "        pass\n"
            f"assert any({SECRET!r} in text for text in seen), 'no secret visible'\n"
        ),
        "home": f"print(open({str(home / 'secret.txt')!r}).read())\n",
        "home_listing": f"import os\nassert os.listdir({str(home)!r}) != [], 'home is empty'\n",
        "own_files": (
            "import posix\n"
            f"posix.unlink({str(victim)!r})\n"
        ),
        "regain_capabilities": (  # a nested user namespace would give it CAP_SYS_ADMIN again
            "import posix\n"
            "posix.unshare(posix.CLONE_NEWUSER)\n"
        ),
        "unmount_the_cover": (
            "import ctypes\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            f"assert libc.umount2({str(home).encode()!r}, 2) == 0, ctypes.get_errno()\n"
        ),
        "infinite_loop": "while True:\n    pass\n",
        "fork_bomb": (
            "import posix\n"
            "while True:\n"
            "    try:\n"
            "        if posix.fork() == 0:\n"
            "            posix.setsid()\n"
            "    except OSError:\n"
            "        pass\n"
        ),
        "identity": (
            "import os\n"
            f"assert __name__ == 'builtins' and os.getuid() == {NOBODY} and os.system is None\n"
        ),
    }


def _sympy_probes(home: Path, victim: Path) -> list[list[str]]:
    """Answers that reach ``parse_expr``'s eval (pred, gold): equal iff the attack worked."""
    return [
        [f"len(open('{victim}').read())", "7"],  # control: eval really runs, the tree is readable
        [f"len(open('{home / 'secret.txt'}').read())", str(len(SECRET))],  # the home is hidden
        [f"open('{victim}', 'w').write('x')", "1"],  # read-only
        ["__import__('os').kill(DRIVER_PID, 9) or 1", "1"],  # the scorer is out of reach
        ["len([__import__('os').fork() for _ in range(10**6)])", "1"],  # fork bomb, capped
        ["sqrt(8)", "2*sqrt(2)"],  # and the next check is right
    ]


@pytest.fixture(scope="module")
def nonroot_report(tmp_path_factory):
    """One run of the unprivileged scorer over the parity cases and every hostile program."""
    # Directories the sandbox must protect, owned by nobody, outside /tmp (tests get a
    # fresh /tmp anyway) so that only the home hiding and the read-only tree can save them.
    base = visible_scratch_dir("nonroot")
    home, victim_dir = base / "home", base / "data"
    os.chown(base, NOBODY, NOBODY)
    for directory in (home, victim_dir):
        directory.mkdir(mode=0o755)
        os.chown(directory, NOBODY, NOBODY)
    (home / "secret.txt").write_text(SECRET)
    victim = victim_dir / "checkpoint.bin"
    victim.write_text("keep me")
    for path in (home / "secret.txt", victim):
        os.chown(path, NOBODY, NOBODY)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    request = {
        "parity": [{key: case[key] for key in ITEM_KEYS} for case in MBPP_CASES],
        "hostile": _hostile_programs(listener.getsockname()[1], home, victim),
        # The per-mount remount of kernels < 5.12 (the default uses mount_setattr).
        "remount_each": True,
        "math": [{key: case[key] for key in ITEM_KEYS} for case in SYMBOLIC_CASES],
        "sympy_probes": _sympy_probes(home, victim),
    }
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "GRAIL_FAKE_SECRET": SECRET, "OMP_NUM_THREADS": "1"}
    try:
        report = _run_as_nobody(request, env)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever connected
        report["victim_after"] = victim.read_text()
        yield report
    finally:
        listener.close()
        shutil.rmtree(base)


def test_scorer_runs_as_nobody_in_userns_mode_hiding_its_home(nonroot_report):
    assert nonroot_report["uid"] == NOBODY and nonroot_report["mode"] == "userns"
    assert {"/home", "/root", "/run"} <= set(nonroot_report["hidden_dirs"])
    assert any(path.endswith("/home") and "/nonroot-" in path for path in nonroot_report["hidden_dirs"])


def test_parity_verdicts_through_the_unprivileged_path(nonroot_report):
    results = nonroot_report["parity"]
    assert len(results) == len(MBPP_CASES)
    for case, result in zip(MBPP_CASES, results):
        assert result["score"] == case["expected_score"], (case["id"], case["note"], result)
        for key, expected in case["components"].items():
            assert result[key] == expected, (case["id"], key, expected, result[key])


def test_math_sympy_worker_runs_unprivileged_with_parity(nonroot_report):
    assert len(nonroot_report["math"]) == len(SYMBOLIC_CASES) >= 6
    for case, result in zip(SYMBOLIC_CASES, nonroot_report["math"]):
        assert result["score"] == case["expected_score"] and result["strategy"] == "symbolic", (case["id"], result)


def test_sympy_eval_cannot_read_the_home_write_files_or_reach_the_scorer(nonroot_report):
    control, home, write, kill, bomb, after, leftover = nonroot_report["sympy_probes"]
    assert control == {"equal": True, "timed_out": False, "error": ""}
    assert home == {"equal": False, "timed_out": False, "error": ""}
    assert write == {"equal": False, "timed_out": False, "error": ""}
    assert kill == {"equal": False, "timed_out": False, "error": ""}  # pid not in its namespace
    assert bomb["equal"] is False
    assert after == {"equal": True, "timed_out": False, "error": ""}
    assert leftover["leftover"] == 0, leftover  # closing the worker took the bomb's remains with it
    assert nonroot_report["victim_after"] == "keep me"


def _hostile(report: dict, name: str) -> dict:
    outcome = report["hostile"][name]
    assert outcome["next"] == {"status": "success", "error": None}, (name, outcome)
    assert outcome["leftover"] == 0, (name, outcome)
    return outcome


def test_network_is_unreachable(nonroot_report):
    verdict = _hostile(nonroot_report, "network")["verdict"]
    assert verdict["status"] == "runtime_error" and "Network is unreachable" in verdict["error"], verdict


def test_environment_secret_is_invisible(nonroot_report):
    assert _hostile(nonroot_report, "environment")["verdict"] == {
        "status": "runtime_error", "error": "AssertionError: no secret visible"}


def test_home_is_hidden_and_own_files_are_read_only(nonroot_report):
    home = _hostile(nonroot_report, "home")["verdict"]
    assert home["status"] == "runtime_error" and home["error"].startswith("FileNotFoundError"), home
    assert _hostile(nonroot_report, "home_listing")["verdict"] == {
        "status": "runtime_error", "error": "AssertionError: home is empty"}
    own = _hostile(nonroot_report, "own_files")["verdict"]
    assert own["status"] == "runtime_error" and "Read-only file system" in own["error"], own
    default = nonroot_report["own_files_default"]
    assert default["status"] == "runtime_error" and "Read-only file system" in default["error"], default
    assert nonroot_report["victim_after"] == "keep me"


def test_capabilities_cannot_be_regained(nonroot_report):
    nested = _hostile(nonroot_report, "regain_capabilities")["verdict"]
    # Refused twice over: the seccomp filter (EPERM) before max_user_namespaces=0 (ENOSPC).
    assert nested == {"status": "runtime_error", "error": "PermissionError: [Errno 1] Operation not permitted"}, nested
    unmount = _hostile(nonroot_report, "unmount_the_cover")["verdict"]
    assert unmount == {"status": "runtime_error", "error": "AssertionError: 1"}  # EPERM


def test_infinite_loop_and_fork_bomb_are_killed_with_their_tree(nonroot_report):
    for name in ("infinite_loop", "fork_bomb"):
        outcome = _hostile(nonroot_report, name)
        assert outcome["verdict"] == {"status": "timeout", "error": "Execution timed out"}, name
        assert 0.9 < outcome["elapsed"] < 4.0, (name, outcome)


def test_reference_semantics_with_the_callers_uid(nonroot_report):
    assert _hostile(nonroot_report, "identity")["verdict"] == {"status": "success", "error": None}


def test_without_user_namespaces_mbpp_scoring_fails_loudly_unless_opted_in():
    case = next(c for c in MBPP_CASES if c["components"].get("exec_status") == "all_passed")
    item = {key: case[key] for key in ITEM_KEYS}
    math_case = SYMBOLIC_CASES[0]
    request = {"expect_unavailable": item, "math": {key: math_case[key] for key in ITEM_KEYS}}
    report = _run_as_nobody(request, {"PATH": "/usr/bin:/bin"}, no_userns=True)
    assert report["uid"] == NOBODY
    message = report["pool"]
    assert message.startswith("MBPP sandbox unavailable: uid 65534 cannot create an unprivileged user namespace")
    assert "[Errno 28]" in message and "max_user_namespaces is 0" in message
    assert "sysctl -w user.max_user_namespaces" in message and "GRAIL_ALLOW_FORMAT_ONLY_MBPP=1" in message
    assert report["score"] == report["batch"] == f"SandboxUnavailable: {message}"
    opted_in = report["opted_in"]
    # Format terms only: the case passes every test, so its reward loses exactly 0.7.
    assert opted_in["score"] == pytest.approx(case["expected_score"] - 0.7) and opted_in["pass_rate"] == 0.0
    assert opted_in["reason"] == message and opted_in["exec_status"] == "error"
    # MATH: the sympy worker cannot be confined either; loud, unless GRAIL_ALLOW_NO_SYMPY=1.
    assert report["math"].startswith("SandboxUnavailable: sympy sandbox unavailable: uid 65534")
    assert "GRAIL_ALLOW_NO_SYMPY=1" in report["math"]
    no_sympy = report["math_opted_in"]
    assert no_sympy["correct"] is False and no_sympy["strategy"] == "none"
    assert no_sympy["check_error"].startswith("sympy worker failed: sympy worker did not start: "
                                              "sympy sandbox unavailable: uid 65534")
