"""Scores MBPP rows and hostile programs as a non-root user; prints one JSON report.

Started by ``test_rewards_sandbox_unprivileged.py`` through ``nonroot_launcher.py`` (so it
runs as ``nobody`` and the sandbox must take its ``userns`` path). argv[1] is a JSON
request: ``{"parity": [mbpp items], "hostile": {name: program}, "math": [items],
"sympy_probes": [[pred, gold]]}``, or
``{"expect_unavailable": mbpp item, "math": item}`` for a node without user namespaces.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _nested_processes(uid: int, below: int = 2) -> int:
    """Live processes of ``uid`` at least ``below`` PID namespaces below this one (2: MBPP
    tests, in their own namespace inside the zygote's; 1: also the sympy worker's)."""
    return len(_nested_names(uid, below))


def _parent(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError):
        return 0


def _ours(pid: str) -> bool:
    """A descendant of this driver (the root-mode tests' sympy workers also run as nobody
    in a PID namespace of their own, but belong to the pytest process)."""
    ancestor = _parent(pid)
    while ancestor > 1 and ancestor != os.getpid():
        ancestor = _parent(str(ancestor))
    return ancestor == os.getpid()


def _nested_names(uid: int, below: int) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        nested = len(fields.get("NSpid", "").split()) > below
        if int(fields["Uid"].split()[0]) == uid and nested and _ours(entry.name):
            found.append(f"{entry.name}:{fields['Name'].strip()}:{fields['State'].strip()}")
    return found


def _scored(request: dict) -> dict:
    from grail_megatron.rewards import SandboxConfig, SandboxPool, compute_score, compute_score_batch

    report: dict = {"uid": os.geteuid()}
    with SandboxPool(workers=2) as pool:
        report["mode"] = pool.mode
        report["hidden_dirs"] = list(pool.config.hidden_dirs)
        report["parity"] = compute_score_batch(request["parity"], max_workers=2, sandbox=pool)
        # The read-only tree through mount_setattr (the hostile pool below remounts each mount).
        [report["own_files_default"]] = pool.run([request["hostile"]["own_files"]])
    config = SandboxConfig(timeout=1.0, memory_bytes=512 * 2**20, remount_each=request["remount_each"])
    hostile = {}
    with SandboxPool(workers=1, config=config) as pool:
        for name, program in request["hostile"].items():
            start = time.monotonic()
            [verdict] = pool.run([program])
            elapsed = time.monotonic() - start
            [after] = pool.run(["assert sum([2, 3]) == 5"])  # the next program is unaffected
            hostile[name] = {"verdict": verdict, "elapsed": elapsed, "next": after,
                             "leftover": _nested_processes(os.geteuid())}
    report["hostile"] = hostile
    # MATH's sympy worker takes the same unprivileged path (its own namespaces, home hidden).
    report["math"] = [compute_score(**item) for item in request["math"]]
    from grail_megatron.rewards.sympy_worker import default_checker

    default_checker().close()  # so that only the probes' worker is left to count
    report["sympy_probes"] = _sympy_probes(request["sympy_probes"])
    return report


def _sympy_probes(probes: list[list[str]]) -> list[dict]:
    """Raw checks of answers that reach sympy's eval; the driver's pid is substituted."""
    from grail_megatron.rewards.sympy_worker import SympyChecker

    checker = SympyChecker()
    try:
        results = []
        for pred, gold in probes:
            result = checker.check(pred.replace("DRIVER_PID", str(os.getpid())), gold)
            results.append({"equal": result.equal, "timed_out": result.timed_out, "error": result.error})
        checker.close()
        deadline = time.monotonic() + 30.0  # SIGKILLed, the worker's namespace dies with it (slowly under load)
        while _nested_processes(os.geteuid(), below=1) and time.monotonic() < deadline:
            time.sleep(0.05)
        results.append({"leftover": _nested_processes(os.geteuid(), below=1),
                        "names": _nested_names(os.geteuid(), below=1)})
        return results
    finally:
        checker.close()


def _unavailable(request: dict) -> dict:
    from grail_megatron.rewards import SandboxPool, SandboxUnavailable, compute_score, compute_score_batch

    report: dict = {"uid": os.geteuid()}
    try:
        SandboxPool(workers=1)
        report["pool"] = "started"
    except SandboxUnavailable as exc:
        report["pool"] = str(exc)
    for name, call in (("score", lambda: compute_score(**request["expect_unavailable"])),
                       ("batch", lambda: compute_score_batch([request["expect_unavailable"]]))):
        try:
            report[name] = call()
        except SandboxUnavailable as exc:
            report[name] = f"SandboxUnavailable: {exc}"
    report["opted_in"] = compute_score(**request["expect_unavailable"], allow_format_only_mbpp=True)
    try:
        report["math"] = compute_score(**request["math"])
    except SandboxUnavailable as exc:
        report["math"] = f"SandboxUnavailable: {exc}"
    os.environ["GRAIL_ALLOW_NO_SYMPY"] = "1"
    report["math_opted_in"] = compute_score(**request["math"])
    return report


def main() -> None:
    request = json.loads(sys.argv[1])
    report = _unavailable(request) if "expect_unavailable" in request else _scored(request)
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
