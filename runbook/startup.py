"""Imported first by the CLI (runbook/cli.py), before anything heavy: a Ctrl-C before the
command's own function begins (the imports, its first tenth of a second, then typer parsing
the command line) is one line and exit 130, never a traceback from whichever import it landed
in (found by a kill fuzz), nor typer's silent exit 130 (found by review). `release()` gives
Python's own handler back when the command begins, or once the CLI module is imported by a
process that does not run it (pytest); an inherited SIG_IGN (a job started in the background)
is left as it is."""

from __future__ import annotations

import os
import signal

_LINE = b"runbook: interrupted before the command began; nothing was changed\n"


def _interrupted(signum: int, frame: object) -> None:
    try:
        os.write(2, _LINE)
    finally:
        os._exit(130)


def hold() -> None:
    """Until release(), a Ctrl-C is _LINE and exit 130: nothing has begun to change."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)


def release() -> None:
    """From here on a Ctrl-C is KeyboardInterrupt again: the command's and its run's to answer."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# inline, not hold(): a call is one more place for a Ctrl-C to land before it is installed
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted)
