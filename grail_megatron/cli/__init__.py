"""The one `grail-megatron` command, and every command-line entry point of the project.

This package sits above the layers it drives (config, local, workers, checkpoint, eval, data,
rewards); nothing below imports it. Each subcommand lives in its own module with a
`main(argv) -> int` function, imported only when its subcommand runs, so `grail-megatron score`
never pays for importing torch or verl. The validation step every launch path runs is
`grail_megatron.cli.preflight`; the exit codes are `grail_megatron.cli.exits`:
0 ok, 1 a check failed, 2 bad input, 3 broken environment.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("grail_megatron.rewards.cli", "score a JSONL of completions with GRAIL's rewards"),
    "prepare-data": ("grail_megatron.cli.prepare_data", "write verl parquet files for gsm8k / math / mbpp"),
    "plan": ("grail_megatron.cli.plan", "rank and validate TP/PP/DP layouts and memory"),
    "train": ("grail_megatron.cli.train", "compose, validate and launch GRPO (verl or --local)"),
    "convert": ("grail_megatron.cli.convert", "Megatron dist checkpoint <-> Hugging Face, reshard"),
    "eval": ("grail_megatron.cli.eval", "pass@k evaluation of an HF model on a held-out split"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: grail-megatron <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `grail-megatron <command> --help` for a command's options; --debug shows tracebacks.",
              "Exit status: 0 ok, 1 a check failed, 2 bad input (option, key, value or file),",
              "3 broken environment (GPU, package, sandbox); 75 preempted after a checkpoint (train)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] == "--version":
        from grail_megatron import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"grail-megatron: unknown command {name!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
