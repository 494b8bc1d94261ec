"""Errors that carry their exit code and the fix, so every front end reports them the same way."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Documented exit codes of `runbook` (and of the step library's failures)."""

    OK = 0
    FAILED_SAFELY = 1  # the action failed; traffic stays on a healthy slot, state tells the truth
    USAGE = 2  # bad input or configuration; nothing was changed
    LOCKED = 3  # another run holds the deploy lock; nothing was changed
    PRECONDITION = 4  # e.g. no previous deployment, schema ahead, image gone; nothing was changed
    ATTENTION = 5  # failed and not fully undone, or the service down: read the message now
    TOOK_EFFECT = 6  # traffic moved (verified) but finishing steps are left: run it again


MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.FAILED_SAFELY: "failed safely: traffic stayed on a healthy slot, the state file "
                            "tells the truth",
    ExitCode.USAGE: "usage or bad input/configuration; nothing changed",
    ExitCode.LOCKED: "locked by another run (the message names the holder); nothing changed",
    ExitCode.PRECONDITION: "precondition not met (no previous deployment, schema ahead, image "
                           "gone); nothing changed",
    ExitCode.ATTENTION: "failed and could not be fully undone, or undone with the service "
                        "down (THE SERVICE IS DOWN: the slot Caddy points at is not running): "
                        "read the message now",
    ExitCode.TOOK_EFFECT: "took effect (traffic moved and was verified) but finishing steps "
                          "are left: run the same command again to finish it",
}
"""The one definition of what each exit code means: `--help`, docs/runbook.md and the README
table are rendered from it (tests/test_docs.py checks the README)."""


def exit_codes_text() -> str:
    """The exit codes as one paragraph, for `--help`."""
    return "Exit codes: " + "; ".join(f"{int(code)} {meaning}"
                                      for code, meaning in MEANINGS.items()) + "."


def exit_codes_markdown() -> str:
    """The exit codes as the README's table."""
    rows = [f"| {int(code)} | {meaning} |" for code, meaning in MEANINGS.items()]
    return "\n".join(["| code | meaning |", "|---|---|", *rows])


class RunbookError(Exception):
    """A failure with a one-line message, the fix, and an exit code."""

    exit_code: ExitCode = ExitCode.FAILED_SAFELY

    def __init__(self, message: str, fix: str | None = None, *,
                 exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message


class ActFirstError(RunbookError):
    """A failure after the commit whose own fix comes before finishing the run: finishing
    (the same command again) is what it must not be read as (found by review: "switch back
    now" and "run it again to finish" were said side by side)."""


class ConfigError(RunbookError):
    exit_code = ExitCode.USAGE


class UsageError(RunbookError):
    exit_code = ExitCode.USAGE


class LockedError(RunbookError):
    exit_code = ExitCode.LOCKED
    holder: dict[str, object] | None = None  # who holds it, as its lock file says (fleet lock)


class LockLostError(LockedError):
    """The lock this run took was removed or taken over: it must not change anything more."""


class PreconditionError(RunbookError):
    exit_code = ExitCode.PRECONDITION


class AlreadyDone(PreconditionError):
    """A refusal because what the command would do is done, and what runs shows it:
    `done_by` is the run the state file records as having done it (None: it names none),
    `slot` and `version` where traffic is, as Caddy runs it. A rerun that took over that
    run's stale lock says the killed run completed (runbook/run.py), not only "refused"
    (found by a kill fuzz)."""

    def __init__(self, message: str, fix: str | None = None, *, done_by: str | None,
                 slot: str, version: str) -> None:
        super().__init__(message, fix)
        self.done_by = done_by
        self.slot = slot
        self.version = version
        self.serving = f"{slot} {version}"


class StateError(RunbookError):
    """The state file is missing, unreadable or invalid."""

    exit_code = ExitCode.PRECONDITION


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP once a CLI command began (runbook/startup.py): Ctrl-C's path, every
    `finally` run, with the signal's own exit code."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum
