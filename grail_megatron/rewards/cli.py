"""``grail-megatron score``: score a JSONL of completions and summarise per data source.

Each input line is a JSON object with ``data_source``, ``solution_str`` (or
``completion``), ``ground_truth`` and optionally ``extra_info``. Prints a table of the
mean reward and the mean of every numeric component per data source; ``--out`` writes
one result per input line (atomically: a temp file renamed into place).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("data_source", "ground_truth")
CHUNK = 64  # rows scored per batch call: keeps the progress bar moving


class InputError(ValueError):
    """A problem with the input file, reported as ``path:line: message``."""


@dataclass(frozen=True)
class ScoreArgs:
    input: Path
    out: Path | None
    workers: int | None
    math_verify: bool
    mbpp_timeout: float
    allow_format_only_mbpp: bool = False


def _positive_seconds(text: str) -> float:
    """argparse type of --mbpp-timeout: seconds > 0 (a bad value is bad input, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


def _positive_workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def _parse_args(argv: list[str]) -> ScoreArgs:
    parser = argparse.ArgumentParser(
        prog="grail-megatron score",
        description="Score a JSONL of completions with GRAIL's rewards (GSM8K, MATH, MBPP).",
    )
    parser.add_argument("input", type=Path,
                        help="JSONL: data_source, solution_str|completion, ground_truth, extra_info")
    parser.add_argument("--out", type=Path, help="write per-row results as JSONL (atomic)")
    parser.add_argument("--workers", type=_positive_workers, default=None,
                        help="parallel scorers / MBPP sandboxes (default: CPU count)")
    parser.add_argument("--math-verify", action="store_true",
                        help="use math-verify for MATH equivalence (departs from GRAIL parity)")
    parser.add_argument("--mbpp-timeout", type=_positive_seconds, default=5.0,
                        help="per-test MBPP timeout in seconds (default 5)")
    parser.add_argument("--allow-format-only-mbpp", action="store_true",
                        help="if no MBPP sandbox can start here, score MBPP rows by their format "
                             "terms only instead of stopping (default: stop with the reason)")
    ns = parser.parse_args(argv)
    return ScoreArgs(ns.input, ns.out, ns.workers, ns.math_verify, ns.mbpp_timeout,
                     ns.allow_format_only_mbpp)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Parse and validate every line first, so a bad line fails fast with its location."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in REQUIRED_KEYS if key not in row]
            if "solution_str" not in row and "completion" not in row:
                missing.append("solution_str (or completion)")
            if missing:
                raise InputError(f"{path}:{number}: missing key(s): {', '.join(missing)}")
            rows.append({
                "data_source": row["data_source"],
                "solution_str": row["solution_str"] if "solution_str" in row else row["completion"],
                "ground_truth": row["ground_truth"],
                "extra_info": row.get("extra_info"),
            })
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def score_rows(rows: list[dict], args: ScoreArgs) -> list[dict]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from grail_megatron.rewards import SandboxConfig, SandboxPool, SandboxUnavailable, compute_score_batch
    from grail_megatron.rewards.sandbox import UnavailablePool

    results: list[dict] = []
    needs_sandbox = any("mbpp" in str(row["data_source"]).lower() for row in rows)
    pool = None
    if needs_sandbox:
        try:
            pool = SandboxPool(args.workers, SandboxConfig(timeout=args.mbpp_timeout))
        except SandboxUnavailable as exc:
            if not args.allow_format_only_mbpp:
                raise
            pool = UnavailablePool(exc)
    try:
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=_console(stderr=True)) as progress:
            task = progress.add_task("scoring", total=len(rows))
            for start in range(0, len(rows), CHUNK):
                chunk = rows[start : start + CHUNK]
                results += compute_score_batch(
                    chunk, max_workers=args.workers, math_verify=args.math_verify, sandbox=pool,
                    allow_format_only_mbpp=args.allow_format_only_mbpp or None)
                progress.advance(task, len(chunk))
    finally:
        if pool is not None:
            pool.close()
    return results


def _numeric(value: Any) -> float | None:
    return float(value) if isinstance(value, bool | int | float) else None


def summarize(rows: list[dict], results: list[dict]) -> dict[str, dict[str, float]]:
    """data_source -> {"n": count, "score": mean, <component>: mean over rows that have it}."""
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row, result in zip(rows, results, strict=True):
        bucket = sums[str(row["data_source"])]
        for key, value in result.items():
            number = _numeric(value)
            if number is not None:
                bucket[key].append(number)
    summary = {}
    for source, columns in sorted(sums.items()):
        means = {"n": float(len(columns["score"]))}
        means.update({key: sum(values) / len(values) for key, values in columns.items()})
        summary[source] = means
    return summary


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def print_summary(summary: dict[str, dict[str, float]]) -> None:
    from rich.table import Table

    table = Table(title="GRAIL rewards: mean per data source")
    table.add_column("metric")
    for source in summary:
        table.add_column(source, justify="right")
    metrics = ["n", "score"] + sorted({key for means in summary.values() for key in means} - {"n", "score"})
    for metric in metrics:
        cells = []
        for means in summary.values():
            value = means.get(metric)
            cells.append("-" if value is None else (f"{int(value)}" if metric == "n" else f"{value:.4f}"))
        table.add_row(metric, *cells)
    _console().print(table)


def write_results_atomically(path: Path, results: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for result in results:
                handle.write(json.dumps(result, ensure_ascii=False) + "\n")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        rows = read_rows(args.input)
    except InputError as exc:
        print(f"grail-megatron score: {exc}", file=sys.stderr)
        return 2
    from grail_megatron.rewards.sandbox import SandboxUnavailable

    try:
        results = score_rows(rows, args)
    except SandboxUnavailable as exc:
        print(f"grail-megatron score: {exc}", file=sys.stderr)
        return 3
    print_summary(summarize(rows, results))
    if args.out is not None:
        write_results_atomically(args.out, results)
        print(f"wrote {len(results)} results to {args.out}", file=sys.stderr)
    return 0
