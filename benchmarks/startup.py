"""Start-up time of the checking commands (issue 15's targets): prints a table, asserts nothing.

    .venv/bin/python benchmarks/startup.py [--repeat 3]

Each command runs as a fresh process (the console script), the way a user runs it; the median
of `--repeat` runs is shown with the target, and the CPU time (user + system, the helper
processes included), which does not depend on what else the machine runs. `train --dry-run` is
measured cold (the first run after a fresh install: an empty verdict cache of its own, so verl's
validator is imported in the helper), warm (the same command line again: verl's verdict cached,
no helper), and with the verdict cached for a command line not seen before (the helper started
up front is stopped once the composed config shows the verdict is known). Every run gets its
own XDG_CACHE_HOME; the user's cache is neither read nor written.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "grail_megatron.cli"]

# The verdict caches a case starts from (XDG_CACHE_HOME): "empty" a fresh one per run, "warm" the
# one the warm-up run filled (verdict and command line), "verdicts" a fresh copy of its verdicts
# alone per run (a command line not seen before whose config verl has already checked).
EMPTY, WARM, VERDICTS = "empty", "warm", "verdicts"

# (label, argv, cache, target seconds or None, expected exit code)
CASES = [
    ("grail-megatron --help", ["--help"], WARM, None, 0),
    ("plan", ["plan"], WARM, 2.0, 0),
    ("plan --kl --model qwen2.5-14b-instruct", ["plan", "--kl", "--model", "qwen2.5-14b-instruct"], WARM, 2.0, 0),
    ("plan --nnodes 0 (bad input)", ["plan", "--nnodes", "0"], WARM, 2.0, 2),
    ("train --dry-run, cold (empty cache: verl's validator imported)", ["train", "--dry-run"], EMPTY, 5.0, 0),
    ("train --dry-run, warm (same command line: verdict cached)", ["train", "--dry-run"], WARM, 5.0, 0),
    ("train --dry-run, verdict cached, new command line", ["train", "--dry-run"], VERDICTS, 5.0, 0),
    ("train --dry-run rollout.n=1 (bad input)", ["train", "--dry-run", "actor_rollout_ref.rollout.n=1"], WARM, 5.0, 2),
]


def cache_for(kind: str, warm: Path, scratch: Path) -> Path:
    """The XDG_CACHE_HOME a run of a case starts from."""
    if kind == WARM:
        return warm
    fresh = Path(tempfile.mkdtemp(dir=scratch))
    if kind == VERDICTS:
        verdicts = fresh / "grail-megatron" / "verl-check"
        verdicts.mkdir(parents=True)
        for verdict in (warm / "grail-megatron" / "verl-check").glob("*.json"):
            shutil.copy(verdict, verdicts)
    return fresh


def time_once(argv: list[str], env: dict[str, str], expected: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and the helpers it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    res = subprocess.run(CLI + argv, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if res.returncode != expected:
        raise SystemExit(f"{' '.join(argv)}: exit {res.returncode}, expected {expected}\n{res.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs per command (median shown; default 3)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="grail-startup-") as tmp:
        scratch, warm = Path(tmp), Path(tmp) / "warm"
        warm.mkdir()
        # warm the page cache, and the verdict of the default dry run (the "warm" cache)
        subprocess.run(CLI + ["train", "--dry-run"], cwd=REPO, capture_output=True,
                       env={**os.environ, "XDG_CACHE_HOME": str(warm)})
        for label, argv, cache, target, expected in CASES:
            runs = [time_once(argv, {"XDG_CACHE_HOME": str(cache_for(cache, warm, scratch)),
                                     "GRAIL_NO_CHECK_CACHE": "0"}, expected) for _ in range(args.repeat)]
            times = [wall for wall, _ in runs]
            median = statistics.median(times)
            cpu = statistics.median(c for _, c in runs)
            verdict = "-" if target is None else ("met" if median < target else "NOT MET")
            rows.append((label, f"{median:.2f}", f"{min(times):.2f}-{max(times):.2f}", f"{cpu:.2f}",
                         "-" if target is None else f"< {target:g} s", verdict))
    load = os.getloadavg()[0]
    print(f"start-up times, {os.cpu_count()} CPU(s), load average {load:.1f}, median of {args.repeat} run(s)\n")
    widths = [max(len(r[i]) for r in rows + [HEADER]) for i in range(len(HEADER))]
    for row in [HEADER, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    return 0


HEADER = ("command", "median s", "range s", "CPU s", "target", "")

if __name__ == "__main__":
    sys.exit(main())
