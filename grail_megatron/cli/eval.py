"""`grail-megatron eval`: GRAIL's pass@k metrics of an HF model on a held-out split."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grail_megatron.cli.exits import (BadInput, Parser, debug_requested, guarded, non_negative_int, positive_float,
                                      positive_int)
from grail_megatron.eval.generation import SamplingSettings


def unit_interval(text: str) -> float:
    """argparse type: a number in (0, 1] (top-p)."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in (0, 1]")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = SamplingSettings()
    p = Parser(
        prog="grail-megatron eval",
        description="Sample completions, score them with GRAIL's rewards, report pass@k / mean@k / best@k.",
    )
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder (config + weights + tokenizer)")
    p.add_argument("--dataset", required=True, choices=("gsm8k", "math", "mbpp"), help="which GRAIL task (scored with its reward)")
    p.add_argument("--split", default="val", help="val (default) or test")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", type=Path, default=None, help="folder written by `grail-megatron prepare-data`")
    data.add_argument("--source", default="hf", help="no --data: prepare from hf (default), fixtures or a folder")
    p.add_argument("--samples", type=positive_int, default=5, help="completions per task (default 5)")
    p.add_argument("--k", default="1,5", help="comma-separated k values (default 1,5)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default 0)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N tasks")
    p.add_argument("--out", type=Path, required=True, help="output folder (samples.jsonl, summary.json)")
    p.add_argument("--overwrite", action="store_true", help="discard samples of an earlier run in --out")
    p.add_argument(
        "--backend",
        choices=("auto", "hf", "vllm"),
        default="auto",
        help="auto: vLLM when a GPU is present, else HF generate",
    )
    p.add_argument("--temperature", type=non_negative_float, default=None, help=f"default {defaults.temperature} (GRAIL)")
    p.add_argument("--top-p", type=unit_interval, default=None, help=f"default {defaults.top_p}")
    p.add_argument("--top-k", type=int, default=None, help=f"default {defaults.top_k}")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help=f"default {defaults.max_new_tokens}")
    p.add_argument(
        "--from-config",
        nargs="*",
        metavar="OVERRIDE",
        default=None,
        help="take sampling settings from the composed training config (grpo_grail + Hydra overrides)",
    )
    p.add_argument("--wandb-project", default=None, help="also log the metrics to this W&B project")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _ks(text: str, samples: int) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise BadInput(f"--k must be comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1 or ks[-1] > samples:
        raise BadInput(f"--k {text!r}: every k must be in 1..--samples ({samples})")
    return ks


def _check_paths(args: argparse.Namespace) -> None:
    if not (args.model / "config.json").is_file():
        raise BadInput(f"--model {args.model}: not a Hugging Face model folder (no config.json)")
    if args.data is not None and not args.data.is_dir():
        raise BadInput(f"--data {args.data}: no such folder (write it with `grail-megatron prepare-data`)")


def _sampling(args: argparse.Namespace) -> SamplingSettings:
    base = SamplingSettings()
    if args.from_config is not None:
        from grail_megatron.cli.preflight import compose

        base = SamplingSettings.from_config(compose(args.from_config, "grpo_grail"))
    return SamplingSettings(
        temperature=base.temperature if args.temperature is None else args.temperature,
        top_p=base.top_p if args.top_p is None else args.top_p,
        top_k=base.top_k if args.top_k is None else args.top_k,
        max_new_tokens=base.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    from grail_megatron.quiet import quiet_third_party

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    quiet_third_party()
    return guarded("grail-megatron eval", lambda: run_eval(args), debug=args.debug or debug_requested(argv))


def run_eval(args: argparse.Namespace) -> int:
    from grail_megatron.eval.runner import EvalError, EvalJob, run

    _check_paths(args)

    job = EvalJob(
        model_dir=args.model,
        dataset=args.dataset,
        out_dir=args.out,
        split=args.split,
        data_dir=args.data,
        source=args.source,
        samples=args.samples,
        ks=_ks(args.k, args.samples),
        seed=args.seed,
        limit=args.limit,
        backend=args.backend,
        sampling=_sampling(args),
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    try:
        outcome = run(job)
    except EvalError as exc:
        raise BadInput(str(exc)) from None
    print_table(job, outcome)
    if args.wandb_project:
        log_to_wandb(args.wandb_project, job, outcome.metrics)
    return 0


def print_table(job, outcome) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{job.dataset}/{job.split}",
        caption=f"{outcome.tasks_total} tasks x {job.samples} samples, "
        f"{outcome.tasks_generated} tasks generated in this run",
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in outcome.metrics.items():
        table.add_row(name, f"{value:.0f}" if name in ("tasks", "replicates") else f"{value:.4f}")
    console = Console()
    console.print(table)
    console.print(f"summary: {outcome.summary_path}\nsamples: {outcome.samples_path}")


def log_to_wandb(project: str, job, metrics: dict[str, float]) -> None:
    import os

    import wandb

    # wandb reads WANDB_DIR/WANDB_MODE once per process; pass them explicitly so a run started
    # after another wandb run in the same process (the trainer's) still lands where asked.
    run = wandb.init(
        project=project,
        dir=os.environ.get("WANDB_DIR"),
        mode=os.environ.get("WANDB_MODE"),
        name=f"eval-{job.model_dir.name}-{job.dataset}-{job.split}",
        config={
            "model": str(job.model_dir),
            "dataset": job.dataset,
            "split": job.split,
            "samples": job.samples,
            "seed": job.seed,
        },
        reinit="finish_previous",
    )
    run.log({f"eval/{job.dataset}/{name}": value for name, value in metrics.items()})
    run.finish()
