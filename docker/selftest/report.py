"""The self-test's JSON report (standard library only: runs with the node's Python).

scripts/gpu_selftest.sh calls

    report.py add WORK NAME STATUS SECONDS REASON [LOG]   after each check
    report.py finish WORK MODE                            at the end -> WORK/report.json

`add` appends one record to WORK/checks.jsonl with the helper's own `PASS|FAIL|SKIP <name>: ...`
lines of LOG as sub-checks. `finish` writes WORK/report.json: the checks in order, the facts
the helpers left in WORK/results/*.json (GPU, components, parity numbers, throughput ...),
the counts, and the machine it ran on.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import socket
import sys
from pathlib import Path

VERDICT = re.compile(r"^(PASS|FAIL|SKIP) ([\w.-]+):? ?(.*)$")


def sub_checks(log: Path) -> list[dict]:
    if not log.is_file():
        return []
    found = []
    for line in log.read_text(errors="replace").splitlines():
        match = VERDICT.match(line)
        if match:
            found.append({"name": match.group(2), "status": match.group(1), "detail": match.group(3)})
    return found


def add(work: Path, name: str, status: str, seconds: str, reason: str, log: str | None = None) -> None:
    record = {"name": name, "status": status, "seconds": int(seconds), "reason": reason}
    if log:
        record["log"] = log
        record["sub_checks"] = sub_checks(Path(log))
    with open(work / "checks.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


def finish(work: Path, mode: str) -> Path:
    checks_file = work / "checks.jsonl"
    checks = [json.loads(line) for line in checks_file.read_text().splitlines()] if checks_file.is_file() else []
    results = {}
    for path in sorted((work / "results").glob("*.json")):
        try:
            results[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            results[path.stem] = {"error": f"unreadable: {exc}"}
    counts = {s: sum(c["status"] == s for c in checks) for s in ("PASS", "FAIL", "SKIP")}
    report = {
        "mode": mode,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "work_dir": str(work),
        "seconds": sum(c["seconds"] for c in checks),
        "counts": {"passed": counts["PASS"], "failed": counts["FAIL"], "skipped": counts["SKIP"]},
        "checks": checks,
        "results": results,
    }
    out = work / "report.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out


def main(argv: list[str]) -> int:
    if len(argv) >= 6 and argv[1] == "add":
        add(Path(argv[2]), argv[3], argv[4], argv[5], argv[6] if len(argv) > 6 else "",
            argv[7] if len(argv) > 7 else None)
        return 0
    if len(argv) == 4 and argv[1] == "finish":
        print(f"report: {finish(Path(argv[2]), argv[3])}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
