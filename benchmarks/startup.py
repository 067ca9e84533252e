"""Start-up time of the checking commands (issue 15's targets): prints a table, asserts nothing.

    .venv/bin/python benchmarks/startup.py [--repeat 3]

Each command runs as a fresh process (the console script), the way a user runs it; the median
of `--repeat` runs is shown with the target, and the CPU time (user + system, the helper
processes included), which does not depend on what else the machine runs. `train --dry-run` is measured cold (verl's
validator imported in its helper process, GRAIL_NO_CHECK_CACHE=1) and warm (its verdict for
the same config cached).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "grail_megatron.cli"]

# (label, argv, extra environment, target seconds or None, expected exit code)
CASES = [
    ("grail-megatron --help", ["--help"], {}, None, 0),
    ("plan", ["plan"], {}, 2.0, 0),
    ("plan --kl --model qwen2.5-14b-instruct", ["plan", "--kl", "--model", "qwen2.5-14b-instruct"], {}, 2.0, 0),
    ("plan --nnodes 0 (bad input)", ["plan", "--nnodes", "0"], {}, 2.0, 2),
    ("train --dry-run, cold (verl's validator imported)", ["train", "--dry-run"], {"GRAIL_NO_CHECK_CACHE": "1"}, 5.0, 0),
    ("train --dry-run, warm (verl's verdict cached)", ["train", "--dry-run"], {}, 5.0, 0),
    ("train --dry-run rollout.n=1 (bad input)", ["train", "--dry-run", "actor_rollout_ref.rollout.n=1"], {}, 5.0, 2),
]


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
    subprocess.run(CLI + ["train", "--dry-run"], cwd=REPO, capture_output=True)  # warm the page cache and verdict
    rows = []
    for label, argv, env, target, expected in CASES:
        runs = [time_once(argv, env, expected) for _ in range(args.repeat)]
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
