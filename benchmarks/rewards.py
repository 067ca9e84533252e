"""Reward benchmarks: a table, measured in one run (``make bench`` or
``.venv/bin/python benchmarks/rewards.py [--quick]``).

* scores/s per family on the parity corpus, single process (GSM8K; MATH cold = first pass
  with an empty cache, warm = later passes, as in GRPO where 16 rollouts repeat answers);
* MBPP: the zygote pool against a plain one-subprocess-per-test baseline, same programs,
  same parallelism, verdicts compared for equality;
* run as root, the same pool in ``userns`` mode too (the path of non-root SLURM users),
  started as ``nobody`` through ``tests/rewards/nonroot_launcher.py``: rate and verdicts;
* worst-case wall time of one ``compute_score`` call over pathological inputs;
* MATH on a cold verdict cache against an in-process re-implementation of the reference's
  documented rules (``REFERENCE_MATH``), on the rows it does not hang on, in alternating
  rounds (5; 1 with ``--quick``) so that a shared machine's load weighs on both alike;
* the first ``compute_score`` of each family in a fresh process, with and without the
  prestart at import of ``verl_reward``;
* the issue's targets next to the measurements.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from grail_megatron.rewards import SandboxConfig, SandboxPool, compute_score
from grail_megatron.rewards.mbpp import build_tests
from grail_megatron.rewards.sympy_worker import default_checker

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "rewards" / "data" / "grail_rewards_public.jsonl"

# One subprocess per test: the same guard and exec semantics as the sandbox child, without
# the zygote (fresh interpreter each time) and without namespaces; identical verdicts.
BASELINE_CHILD = r"""
import json, os, sys
program = sys.stdin.read()
from grail_megatron.rewards.privileges import Limits
from grail_megatron.rewards.sandbox_child import _WriteOnlySink, _exit_code, _reference_guard
out = os.dup(1)
Limits(address_space=2 * 1024**3, open_files=64).apply()
_reference_guard()
sys.stdout = sys.stderr = _WriteOnlySink()
sys.stdin = None
try:
    exec(program, {})
    verdict = {"status": "success", "error": None}
except SyntaxError as exc:
    verdict = {"status": "syntax_error", "error": str(exc)}
except Exception as exc:
    verdict = {"status": "runtime_error", "error": f"{type(exc).__name__}: {exc}"}
except BaseException as exc:
    os._exit(_exit_code(exc))
os.write(out, json.dumps(verdict).encode() + b"\n")
os._exit(0)
"""


def _baseline_test(program: str, timeout: float) -> dict:
    try:
        done = subprocess.run([sys.executable, "-I", "-c", BASELINE_CHILD], input=program.encode(),
                              capture_output=True, timeout=timeout, env={}, cwd="/tmp")
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": "Execution timed out"}
    line = done.stdout.split(b"\n", 1)[0]
    if line:
        return json.loads(line)
    return {"status": "process_error", "error": f"Process terminated unexpectedly (exit_code={done.returncode})"}


# The GSM8K rules of DESIGN.md section 6 written the naive way (the reference's regexes,
# no time bound, a float result, no components): the speed the targets refer to,
# measured on this machine in the same run.
_NAIVE_THINK = re.compile(r"<start_working_out>.*?</end_working_out>", re.DOTALL | re.IGNORECASE)
_NAIVE_SOLUTION = re.compile(r"<SOLUTION>\s*(.+?)\s*</SOLUTION>", re.DOTALL | re.IGNORECASE)
_NAIVE_HASH = re.compile(r"####\s*(?P<ans>.+)")
_NAIVE_NUMBER = re.compile(r"[-+]?\d+(?:[\.,]\d+)?")
_NAIVE_NUMERIC = re.compile(r"^[-+]?[\d.,]+$")
_NAIVE_TAIL = re.compile(r"[\s\.]+$")


def naive_gsm8k(text: str, truth: str) -> float:
    match = _NAIVE_SOLUTION.search(text)
    answer, numeric, trailing = "", False, 0
    if match:
        inside = match.group(1).strip()
        number = _NAIVE_NUMBER.search(inside)
        if number:
            answer = number.group(0).replace(",", "").strip()
            numeric = bool(_NAIVE_NUMERIC.match(inside.replace(" ", "")))
        trailing = len(text) - match.end()
    golds = list(_NAIVE_HASH.finditer(truth))
    if golds:
        gold = golds[-1].group("ans").strip()
    else:
        numbers = list(_NAIVE_NUMBER.finditer(truth))
        gold = numbers[-1].group(0).replace(",", "").strip() if numbers else ""
    correct = _NAIVE_TAIL.sub("", answer.strip().lower()) == _NAIVE_TAIL.sub("", gold.strip().lower())
    return ((0.6 if correct else 0.0) + (0.15 if match and numeric and trailing == 0 else 0.0)
            + (0.1 if _NAIVE_THINK.search(text) else 0.0) + (0.1 if match else 0.0)
            + (0.05 if trailing == 0 else 0.0))


def interleaved_rates(rows: list[dict], min_seconds: float) -> tuple[float, float]:
    """(ours, naive) GSM8K scores/s, measured in alternating passes so that the load of a
    shared machine weighs on both alike."""
    ours = naive = 0.0
    passes = 0
    while ours + naive < 2 * min_seconds:
        start = time.perf_counter()
        for row in rows:
            compute_score(row["data_source"], row["solution_str"], row["ground_truth"])
        middle = time.perf_counter()
        for row in rows:
            naive_gsm8k(row["solution_str"], row["ground_truth"])
        ours += middle - start
        naive += time.perf_counter() - middle
        passes += 1
    return passes * len(rows) / ours, passes * len(rows) / naive


def load(family: str) -> list[dict]:
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["family"] == family]


def throughput(rows: list[dict], min_seconds: float, **kwargs) -> tuple[float, int]:
    """Scores per second over repeated passes of ``rows`` (at least ``min_seconds``)."""
    count, start = 0, time.perf_counter()
    while True:
        for row in rows:
            compute_score(row["data_source"], row["solution_str"], row["ground_truth"], **kwargs)
        count += len(rows)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return count / elapsed, count


# The MATH rules of DESIGN.md section 6 written the naive way, in-process (regex tags,
# normalise, exact, sympy parse_expr + simplify, float): an in-house re-implementation of
# the reference's documented rules (GRAIL's code is not available here), run in a fresh
# process per pass so its sympy cache starts cold, one line per row with its wall time.
REFERENCE_MATH = r"""
import json, re, sys, time
import sympy
from sympy.parsing.sympy_parser import parse_expr
SOLUTION = re.compile(r"<SOLUTION>\s*(.+?)\s*</SOLUTION>", re.DOTALL | re.IGNORECASE)
THINK = re.compile(r"<start_working_out>.*?</end_working_out>", re.DOTALL | re.IGNORECASE)
def norm(s):
    s = s.strip()
    for old in (r"\dfrac", r"\tfrac", r"\cfrac"):
        s = s.replace(old, r"\frac")
    s = re.sub(r"\\left\b", "", s)
    s = re.sub(r"\\right\b", "", s)
    for old in (r"\,", r"\!", r"\;", r"\:"):
        s = s.replace(old, "")
    return re.sub(r"\s+", "", s).lower()
def equal(a, b):
    if not a or not b:
        return False
    a, b = norm(a), norm(b)
    if a == b:
        return True
    try:
        if sympy.simplify(parse_expr(a) - parse_expr(b)) == 0:
            return True
    except Exception:
        pass
    try:
        return abs(float(a) - float(b)) < 1e-6
    except Exception:
        return False
def score(text, gold):
    match = SOLUTION.search(text)
    answer = match.group(1).strip() if match else ""
    trailing = len(text) - match.end() if match else 0
    return ((0.7 if equal(answer, gold) else 0.0) + (0.15 if match and trailing < 50 else 0.0)
            + (0.1 if THINK.search(text) else 0.0) + (0.05 if trailing == 0 else 0.0))
for line in sys.stdin:
    row = json.loads(line)
    start = time.perf_counter()
    score(row["solution_str"], row["ground_truth"])
    print(json.dumps({"id": row["id"], "seconds": time.perf_counter() - start}), flush=True)
"""
HANG_SECONDS = 5.0


def reference_math_times(rows: list[dict]) -> tuple[dict[str, float], list[str]]:
    """Per-row wall time of ``REFERENCE_MATH`` and the rows it hangs on (killed after
    ``HANG_SECONDS``; the remaining rows continue in a fresh process)."""
    times, hangs, pending = {}, [], list(rows)
    while pending:
        proc = subprocess.Popen([sys.executable, "-c", REFERENCE_MATH], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env={"OMP_NUM_THREADS": "1"})
        proc.stdin.write("".join(json.dumps(row) + "\n" for row in pending))
        proc.stdin.close()
        os.set_blocking(proc.stdout.fileno(), True)
        import select

        started = False
        while pending:
            limit = 120.0 if not started else HANG_SECONDS  # the first row waits for the sympy import
            if not select.select([proc.stdout], [], [], limit)[0]:
                hangs.append(pending.pop(0)["id"])
                break
            line = proc.stdout.readline()
            if not line:
                break
            started = True
            done = json.loads(line)
            times[done["id"]] = done["seconds"]
            pending.pop(0)
        proc.kill()
        proc.wait()
    return times, hangs


def _fresh_default_checker(workers: int):
    """A cold verdict cache and ``workers`` started sympy workers (benchmark only)."""
    from grail_megatron.rewards import sympy_worker

    if sympy_worker._DEFAULT is not None:
        sympy_worker._DEFAULT.close()
    sympy_worker._DEFAULT = sympy_worker.SympyChecker(workers=workers)
    sympy_worker._DEFAULT.warmup()


def bench_math_cold(workers: int, rounds: int) -> list[tuple]:
    """MATH scores/s on a cold verdict cache, ours (1 thread; a batch over ``workers``
    workers) against the reference re-implementation, on the rows the reference finishes.

    ``rounds`` rounds, each a fresh reference process and fresh sympy workers (their
    start is not timed), the order of the three passes alternating between rounds, so
    that the load of a shared machine weighs on all of them alike; rates are over all
    rounds, the ratio's per-round range is shown too."""
    from grail_megatron.rewards import compute_score_batch

    rows = load("math")
    times, hangs = reference_math_times(rows)
    kept = [row for row in rows if row["id"] not in hangs]
    items = [{key: row[key] for key in ("data_source", "solution_str", "ground_truth")} for row in kept]

    first = [times]  # the pass that found the hangs is the first round's

    def reference() -> float:
        measured = first.pop() if first else reference_math_times(kept)[0]
        # A row that hangs only under load counts its kill time.
        return sum(measured.get(row["id"], HANG_SECONDS) for row in kept)

    def single() -> float:
        _fresh_default_checker(1)
        start = time.perf_counter()
        for item in items:
            compute_score(**item)
        return time.perf_counter() - start

    def batch() -> float:
        _fresh_default_checker(workers)
        start = time.perf_counter()
        compute_score_batch(items, max_workers=workers)
        return time.perf_counter() - start

    passes = {"reference": reference, "single": single, "batch": batch}
    spent = {name: [] for name in passes}
    for round_ in range(rounds):
        for name in (list(passes) if round_ % 2 == 0 else list(passes)[::-1]):
            spent[name].append(passes[name]())
    rate = {name: rounds * len(kept) / sum(seconds) for name, seconds in spent.items()}
    ratios = sorted(ref / ours for ref, ours in zip(spent["reference"], spent["batch"]))
    note = f"{len(kept)} rows; {len(hangs)} the reference hangs on (> {HANG_SECONDS:.0f} s) left out"
    spread = f"{rounds} round{'s' * (rounds != 1)}, per round {ratios[0]:.2f}x-{ratios[-1]:.2f}x"
    return [
        (f"MATH scores/s, reference rules in-process, cold ({note}; {rounds} round{'s' * (rounds != 1)})",
         rate["reference"], "baseline"),
        ("MATH scores/s, ours, cold cache, one thread, same rows", rate["single"], ""),
        (f"MATH scores/s, ours, cold cache, batch over {workers} threads and sympy workers", rate["batch"], ""),
        (f"MATH cold: ours (batch) / reference ({spread})", rate["batch"] / rate["reference"], ">= 1x"),
    ]


FIRST_CALL = r"""
import json, os, sys, time
t0 = time.perf_counter()
from grail_megatron.rewards import verl_reward
t1 = time.perf_counter()
rows = json.loads(sys.argv[1])
out = {"import": t1 - t0}
for name, row in rows.items():
    start = time.perf_counter()
    verl_reward.compute_score(row["data_source"], row["solution_str"], row["ground_truth"])
    out[name] = time.perf_counter() - start
print(json.dumps(out))
"""


def bench_first_call() -> list[tuple]:
    """Wall time of the first ``compute_score`` of each family in a fresh process, with
    and without the prestart at import of ``verl_reward``."""
    math_row = next(r for r in load("math") if r["components"].get("strategy") == "symbolic")
    mbpp_row = next(r for r in load("mbpp") if r["components"].get("exec_status") == "all_passed")
    gsm_row = load("gsm8k")[0]
    rows = {name: {k: row[k] for k in ("data_source", "solution_str", "ground_truth")}
            for name, row in (("math", math_row), ("mbpp", mbpp_row), ("gsm8k", gsm_row))}
    results = []
    for prestart in ("1", "0"):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1",
               "GRAIL_REWARD_PRESTART": prestart}
        done = subprocess.run([sys.executable, "-c", FIRST_CALL, json.dumps(rows)], capture_output=True,
                              text=True, check=True, env=env, cwd=ROOT)
        results.append((prestart == "1", json.loads(done.stdout.splitlines()[-1])))
    return results


def bench_text_families(min_seconds: float) -> list[tuple]:
    gsm8k = load("gsm8k")
    short = [row for row in gsm8k if len(row["solution_str"]) < 10_000]
    math_rows = load("math")
    default_checker().warmup()
    start = time.perf_counter()
    for row in math_rows:
        compute_score(row["data_source"], row["solution_str"], row["ground_truth"])
    math_cold = len(math_rows) / (time.perf_counter() - start)
    math_warm, _ = throughput(math_rows, min_seconds)
    gsm_all, _ = throughput(gsm8k, min_seconds)
    gsm_short, naive_short = interleaved_rates(short, min_seconds)
    return [
        ("GSM8K scores/s, whole corpus (incl. 100k-char completions)", gsm_all, ">= 100,000 (reference ~120,000)"),
        (f"GSM8K scores/s, {len(short)} completions < 10k chars", gsm_short, ">= 100,000 (reference ~120,000)"),
        ("GSM8K scores/s, naive reference-rules regex scorer (same rows, same run)", naive_short, "baseline"),
        ("GSM8K ours / naive (bounded + full components vs float only)", gsm_short / naive_short, ">= 0.83 (100k/120k)"),
        ("MATH scores/s, cold cache (first pass, incl. sympy timeouts)", math_cold, ">= 1,000 (reference ~400)"),
        ("MATH scores/s, warm cache (repeated answers)", math_warm, ">= 1,000 (reference ~400)"),
    ]


def mbpp_programs() -> list[tuple[str, list[str]]]:
    """(code, tests) of every executed MBPP case except those that wait for a timeout."""
    from grail_megatron.rewards.extract import parse_completion

    programs = []
    for row in load("mbpp"):
        components = row["components"]
        if not components.get("executed") or components.get("exec_status") == "syntax_error":
            continue
        if "Execution timed out" in (components.get("test_errors") or []):
            continue
        programs.append((parse_completion(row["solution_str"]).inside, build_tests(json.loads(row["ground_truth"]))))
    return programs


def pool_rate(programs: list[tuple[str, list[str]]], workers: int) -> tuple[float, list[list[dict]], str]:
    """Programs/s through a ``SandboxPool`` of the mode this process gets (the scorer's
    ``run_tests``: split tests judged here), its verdicts."""
    with SandboxPool(workers=workers, config=SandboxConfig()) as pool:
        pool.run(["pass"])  # both zygotes are up before the clock starts
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(workers) as executor:
            pooled = list(executor.map(lambda program: pool.run_tests(*program), programs))
        return len(programs) / (time.perf_counter() - start), pooled, pool.mode


def userns_pool_rate(workers: int, repeats: int) -> tuple[float, list[list[dict]]]:
    """``pool_rate`` in ``userns`` mode: this script again, as nobody (root only)."""
    launcher = ROOT / "tests" / "rewards" / "nonroot_launcher.py"
    argv = [sys.executable, str(launcher), str(Path(__file__).resolve()), "--pool-only",
            "--workers", str(workers), "--repeats", str(repeats)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["mode"] == "userns", report
    return report["rate"], report["verdicts"]


def bench_mbpp(workers: int, repeats: int) -> tuple[list[tuple], bool]:
    programs = mbpp_programs() * repeats
    pool_rate_, pooled, mode = pool_rate(programs, workers)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as executor:
        baseline = list(executor.map(
            lambda program: [_baseline_test(f"{program[0]}\n\n{t}", 5.0) for t in program[1]], programs))
    base_rate = len(programs) / (time.perf_counter() - start)
    statuses = [[v["status"] for v in p] for p in pooled]
    same = statuses == [[v["status"] for v in b] for b in baseline]
    tests = sum(len(p[1]) for p in programs)
    rows = [
        (f"MBPP programs/s, zygote pool, {mode} mode ({workers} workers, {len(programs)} programs, "
         f"{tests} tests)", pool_rate_, ""),
        (f"MBPP programs/s, one subprocess per test ({workers} in parallel)", base_rate, ""),
        ("MBPP pool speed-up over the baseline", pool_rate_ / base_rate, ">= 8x (reference ~9 programs/s)"),
    ]
    if os.geteuid() == 0:
        userns_rate, userns_verdicts = userns_pool_rate(workers, repeats)
        same = same and statuses == [[v["status"] for v in p] for p in userns_verdicts]
        rows += [
            ("MBPP programs/s, zygote pool, userns mode (as nobody, same programs)", userns_rate, ""),
            ("MBPP userns-mode pool speed-up over the baseline", userns_rate / base_rate, ">= 8x"),
        ]
    return rows, same


PATHOLOGICAL = [
    ("gsm8k: unclosed <SOLUTION> + 100k spaces", "grail_gsm8k", "<SOLUTION>" + " " * 100_000, "#### 1"),
    ("math: unclosed <SOLUTION> + 100k spaces", "grail_math", "<SOLUTION>" + " " * 100_000, "1"),
    ("mbpp: unclosed <SOLUTION> + 100k spaces", "grail_mbpp", "<SOLUTION>" + " " * 100_000,
     json.dumps({"test_list": ["assert True"]})),
    ("gsm8k: 100k-char completion", "grail_gsm8k", "<SOLUTION>" + "7 " * 50_000 + "</SOLUTION>", "#### 7"),
    ("gsm8k: 5000 unclosed thinking tags", "grail_gsm8k", "<start_working_out>" * 5_000, "#### 7"),
    ("math: 10**10**10", "grail_math", "<SOLUTION>10**10**10</SOLUTION>", "1"),
    ("math: factorial(10**9)", "grail_math", "<SOLUTION>factorial(10**9)</SOLUTION>", "2"),
    ("math: 9**9**9**9", "grail_math", "<SOLUTION>9**9**9**9</SOLUTION>", "3"),
    ("math: 150 nested parentheses ** 10**10", "grail_math",
     "<SOLUTION>" + "(" * 150 + "x+1" + ")" * 150 + "**10**10</SOLUTION>", "4"),
    ("math: 100k unary minus", "grail_math", "<SOLUTION>" + "-" * 100_000 + "1</SOLUTION>", "1"),
    ("math: 100k-char answer", "grail_math", "<SOLUTION>" + "x+" * 50_000 + "1</SOLUTION>", "1"),
]


def bench_worst_case() -> list[tuple]:
    default_checker().warmup()
    rows = []
    for name, source, text, truth in PATHOLOGICAL:
        start = time.perf_counter()
        result = compute_score(source, text, truth)
        rows.append((name, time.perf_counter() - start, result["timed_out"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (smoke check of the script)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--pool-only", action="store_true", help=argparse.SUPPRESS)  # userns_pool_rate
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pool_only:
        rate, verdicts, mode = pool_rate(mbpp_programs() * args.repeats, args.workers)
        print(json.dumps({"rate": rate, "verdicts": verdicts, "mode": mode}))
        return 0
    min_seconds = 0.5 if args.quick else 3.0
    console = Console()

    first_calls = bench_first_call()
    text_rows = bench_text_families(min_seconds)
    math_rows = bench_math_cold(args.workers, rounds=1 if args.quick else 5)
    mbpp_rows, same_verdicts = bench_mbpp(args.workers, repeats=1 if args.quick else 4)
    worst = bench_worst_case()

    table = Table(title=f"GRAIL rewards benchmark ({os.cpu_count()} CPUs, single process unless noted)")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_column("target")
    for name, value, target in text_rows + math_rows + mbpp_rows:
        ratio = "speed-up" in name or " / " in name
        table.add_row(name, f"{value:,.2f}x" if ratio else f"{value:,.1f}", target)
    table.add_row("MBPP verdicts identical (pool, userns pool, baseline)", "yes" if same_verdicts else "NO",
                  "identical")
    table.add_row("worst-case compute_score wall time, s", f"{max(t for _, t, _ in worst):.3f}", "<= 1 s")
    console.print(table)

    detail = Table(title="pathological inputs (one call each, sympy worker warm)")
    detail.add_column("input")
    detail.add_column("wall s", justify="right")
    detail.add_column("timed_out")
    for name, seconds, timed_out in worst:
        detail.add_row(name, f"{seconds:.3f}", str(timed_out))
    console.print(detail)

    first = Table(title="first compute_score in a fresh process (s; the import of verl_reward starts the workers)")
    for column in ("prestart at import", "import", "first MATH (sympy)", "first MBPP", "first GSM8K"):
        first.add_column(column, justify="right")
    for prestarted, times in first_calls:
        first.add_row("yes" if prestarted else "no (GRAIL_REWARD_PRESTART=0)",
                      *(f"{times[key]:.3f}" for key in ("import", "math", "mbpp", "gsm8k")))
    console.print(first)
    return 0 if same_verdicts else 1


if __name__ == "__main__":
    sys.exit(main())
