"""SIGTERM behaves like Ctrl-C inside a command, so `finally`/`except BaseException` clean-up runs.

Python's default SIGTERM ends the process at once: temp folders (a half-written HF export)
stay behind. `interruptible(body)` runs `body` with a SIGTERM handler that raises `Terminated`;
the command's clean-up code runs and the command exits 128 + the signal number, as a killed
process would. Libraries that wrap every exception (torch.distributed.checkpoint turns it into a
CheckpointException) cannot hide the interruption: once a signal arrived, any error is reported
as the interruption.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM (a KeyboardInterrupt, so generic handlers let it pass)."""


def interruptible(body: Callable[[], int]) -> int:
    if threading.current_thread() is not threading.main_thread():
        return body()
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        raise Terminated(f"signal {signum}") if signum == signal.SIGTERM else KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return body()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) or received:
            _exit_interrupted(received[0] if received else signal.SIGINT)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_interrupted(signum: int):
    name = signal.Signals(signum).name
    print(f"interrupted ({name}): partial output removed", file=sys.stderr)
    raise SystemExit(128 + signum) from None
