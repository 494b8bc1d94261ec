"""Imported first by the CLI (runbook/cli.py), before anything heavy: a Ctrl-C before the
command's own function begins (the imports, its first tenth of a second, then typer parsing
the command line) is one line and exit 130, never a traceback from whichever import it landed
in (found by a kill fuzz), nor typer's silent exit 130 (found by review). `release()` gives
Python's own handler back when the command begins, or once the CLI module is imported by a
process that does not run it (pytest); an inherited SIG_IGN (a job started in the background)
is left as it is. SIGTERM and SIGHUP likewise (found by a kill fuzz: their default killed it
in silence, exit -15/-1): one line and exit 128 + the signal's number before the command
begins; from `begin()` until a run installs its own handlers, Terminated (a KeyboardInterrupt:
every `finally` runs, as for Ctrl-C), which cli._begins says."""

from __future__ import annotations

import os
import signal

_LINE = b"runbook: interrupted before the command began; nothing was changed\n"


_STOPPED = (signal.SIGTERM, signal.SIGHUP)


def _stopped(signum: int, frame: object) -> None:
    try:  # a closed terminal (SIGHUP) cannot be written to: the exit still comes
        os.write(2, b"runbook: %s before the command began; nothing was changed\n"
                 % signal.Signals(signum).name.encode())
    finally:
        os._exit(128 + signum)


def _terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _interrupted(signum: int, frame: object) -> None:
    try:
        os.write(2, _LINE)
    finally:
        os._exit(130)


def hold() -> None:
    """Until release(), a Ctrl-C is _LINE and exit 130: nothing has begun to change."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)
    for stopping in _STOPPED:  # only their default: an inherited SIG_IGN (nohup) stays
        if signal.getsignal(stopping) is signal.SIG_DFL:
            signal.signal(stopping, _stopped)


def begin() -> None:
    """The command begins: a Ctrl-C is KeyboardInterrupt again, a SIGTERM or SIGHUP
    Terminated, until a run's own handlers (plan.Signals, run._dry_signals) take them over
    and give these back when they end."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for stopping in _STOPPED:
        if signal.getsignal(stopping) is _stopped:
            signal.signal(stopping, _terminated)


def release() -> None:
    """A process that imports the CLI without running it (pytest): Python's own handling of
    all three again (KeyboardInterrupt; SIGTERM's and SIGHUP's default)."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for stopping in _STOPPED:
        if signal.getsignal(stopping) in (_stopped, _terminated):
            signal.signal(stopping, signal.SIG_DFL)


# inline, not hold(): a call is one more place for a Ctrl-C to land before it is installed
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted)
if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _stopped)
if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
    signal.signal(signal.SIGHUP, _stopped)

# after the handlers: nothing delays them (errors.py has no side effect, unlike this module,
# which a library user such as runbook/run.py must never import: it would take their Ctrl-C)
from runbook.errors import Terminated  # noqa: E402

__all__ = ["Terminated", "begin", "hold", "release"]
