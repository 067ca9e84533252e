"""One exit-code convention for every `grail-megatron` command, and the errors that map to it.

    0  done
    1  a check failed (the planner, verification, a failed run: reasons and fixes printed)
    2  bad input (an option, a config key or value, a file that must exist)
    3  broken environment (no GPU where one is needed, a missing package, no sandbox)

Commands raise `BadInput`, `CheckFailed` or `BrokenEnvironment`; `guarded()` prints the message
on one line per problem, without a traceback (`--debug` or GRAIL_DEBUG=1 shows it), and returns
the code.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

OK, CHECK_FAILED, BAD_INPUT, BROKEN_ENVIRONMENT = 0, 1, 2, 3

EXIT_CODES_HELP = ("exit status: 0 ok, 1 a check failed, 2 bad input (option, key, value or file), "
                   "3 broken environment (GPU, package, sandbox)")


class CommandError(Exception):
    """An error a command reports to its user: a message and an exit code, no traceback."""

    code = CHECK_FAILED


class BadInput(CommandError):
    """A bad option, config key, value or missing file (exit 2)."""

    code = BAD_INPUT


class CheckFailed(CommandError):
    """A check the input itself passed, but the run would not (exit 1)."""

    code = CHECK_FAILED


class BrokenEnvironment(CommandError):
    """The machine lacks what the command needs (exit 3)."""

    code = BROKEN_ENVIRONMENT


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("GRAIL_DEBUG", "") not in ("", "0")


def guarded(prog: str, body: Callable[[], int], debug: bool = False,
            translate: Callable[[BaseException], CommandError | None] | None = None) -> int:
    """Run `body`; turn our errors (and those `translate` recognises) into a message and a code."""
    try:
        return int(body() or 0)
    except CommandError as exc:
        return _report(prog, exc, exc.code, debug)
    except Exception as exc:
        mapped = translate(exc) if translate else None
        if mapped is None:
            raise
        return _report(prog, mapped, mapped.code, debug, cause=exc)


def _report(prog: str, exc: BaseException, code: int, debug: bool, cause: BaseException | None = None) -> int:
    if debug:
        traceback.print_exception(cause or exc, file=sys.stderr)
    print(f"{prog}: {exc}", file=sys.stderr)
    return code


class Parser(argparse.ArgumentParser):
    """argparse with the exit codes in its help and a `--debug` flag (usage errors already exit 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("epilog", EXIT_CODES_HELP)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the traceback of an error")

    def error(self, message: str):
        """One line instead of the whole usage block: `prog: error: message (see prog --help)`."""
        self.exit(BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _ranged(int, text, lambda v: v >= 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    return _ranged(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _ranged(float, text, lambda v: v > 0, "a number > 0")


def _ranged(kind, text: str, ok, allowed: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}")
    return value
