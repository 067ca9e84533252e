"""`grail-megatron prepare-data`: write verl parquet files for gsm8k / math / mbpp."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grail_megatron.cli.exits import BadInput, Parser, debug_requested, guarded, positive_int
from grail_megatron.prompts import SYSTEM_PROMPT


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="grail-megatron prepare-data",
        description="Write train/val(/test).parquet in verl's format with GRAIL's splits and prompts.",
    )
    p.add_argument("--dataset", required=True, choices=("gsm8k", "math", "mbpp"), help="which dataset to write")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--source",
        default="hf",
        help="'hf' (Hugging Face hub via `datasets`, default), 'fixtures' (small files shipped in the "
        "package) or a folder of JSONL/parquet files in the HF schemas",
    )
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt", default=None, help="system message (default: GRAIL's)")
    prompt.add_argument("--system-prompt-file", type=Path, default=None, help="read the system message from a file")
    p.add_argument(
        "--mbpp-scheme",
        choices=("hf", "grail"),
        default="hf",
        help="hf: 374/90/500 (HF full train/validation/test); grail: 774/190 (test redistributed)",
    )
    p.add_argument(
        "--no-mbpp-signature",
        action="store_true",
        help="MBPP prompt without the reference's `def` stub (GRAIL adds it)",
    )
    p.add_argument(
        "--math-val-size",
        type=positive_int,
        default=None,
        help="MATH validation size (default 500 on the real data, 1/15 of a smaller source)",
    )
    p.add_argument("--tokenizer", default=None, help="HF tokenizer folder for --max-prompt-length")
    p.add_argument(
        "--max-prompt-length", type=positive_int, default=None, help="drop prompts longer than N tokens after the chat template"
    )
    p.add_argument("--strict", action="store_true", help="fail on unscorable rows instead of skipping them")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.tokenizer is None) != (args.max_prompt_length is None):
        parser.error("--tokenizer and --max-prompt-length go together")
    return guarded("grail-megatron prepare-data", lambda: run(args), debug=args.debug or debug_requested(argv))


def _check_inputs(args: argparse.Namespace) -> None:
    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        raise BadInput(f"--tokenizer {args.tokenizer}: no such folder")
    if args.system_prompt_file is not None and not args.system_prompt_file.is_file():
        raise BadInput(f"--system-prompt-file {args.system_prompt_file}: no such file")


def run(args: argparse.Namespace) -> int:
    from grail_megatron.data import DataError, prepare_dataset

    _check_inputs(args)

    try:
        system_prompt = _system_prompt(args)
        result = prepare_dataset(
            args.dataset,
            args.out,
            args.source,
            system_prompt=system_prompt,
            mbpp_scheme=args.mbpp_scheme,
            mbpp_signature=not args.no_mbpp_signature,
            math_val_size=args.math_val_size,
            tokenizer=args.tokenizer,
            max_prompt_length=args.max_prompt_length,
            strict=args.strict,
            progress=not args.no_progress,
        )
    except DataError as exc:
        raise BadInput(str(exc)) from None
    print_summary(result)
    return 0


def _system_prompt(args: argparse.Namespace) -> str:
    from grail_megatron.data import DataError

    if args.system_prompt_file is not None:
        try:
            return args.system_prompt_file.read_text(encoding="utf-8").rstrip("\n")
        except OSError as exc:
            raise DataError(str(args.system_prompt_file), f"cannot read system prompt: {exc}") from exc
    return SYSTEM_PROMPT if args.system_prompt is None else args.system_prompt


def print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.dataset} from {result.source}")
    for column in ("split", "rows", "from source", "skipped", "too long", "file"):
        table.add_column(
            column, justify="right" if column in ("rows", "from source", "too long") else "left", overflow="fold"
        )
    for s in result.splits:
        skipped = "; ".join(f"{n} {reason}" for reason, n in sorted(s.skipped.items())) or "0"
        table.add_row(s.name, str(s.rows), str(s.candidates), skipped, str(s.too_long), str(s.path))
    console = Console()
    console.print(table)
    for path in result.removed_stale:
        console.print(f"removed stale {path} (this dataset/scheme has no such split)")
