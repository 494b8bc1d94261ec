"""Imported first by the CLI (runbook/cli.py), before anything heavy: a Ctrl-C while it is
still importing (its first tenth of a second) is one line and exit 130, never a traceback
from whichever import it landed in (found by a kill fuzz). `release()` gives Python's own
handler back once the CLI module is imported; an inherited SIG_IGN (a job started in the
background) is left as it is."""

from __future__ import annotations

import os
import signal


def _interrupted(signum: int, frame: object) -> None:
    try:
        os.write(2, b"runbook: interrupted while starting; nothing was changed\n")
    finally:
        os._exit(130)


def release() -> None:
    """From here on a Ctrl-C is main()'s (KeyboardInterrupt) and the run's to answer."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted)
