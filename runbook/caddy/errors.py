"""Caddy's errors: one type for a failed step, one for a Caddy that does not answer."""

from __future__ import annotations

from pathlib import Path

from runbook.errors import ExitCode, RunbookError


class CaddyError(RunbookError):
    """A Caddy step failed. `restored` tells whether the previous config is back in place."""

    exit_code = ExitCode.FAILED_SAFELY

    def __init__(self, message: str, fix: str | None = None, *,
                 exit_code: ExitCode | None = None, stage: str | None = None,
                 restored: bool | None = None, backup: Path | None = None) -> None:
        super().__init__(message, fix, exit_code=exit_code)
        self.stage = stage
        self.restored = restored
        self.backup = backup


class CaddyRejectedError(CaddyError):
    """Caddy itself rejected a Caddyfile (its adapter's error, with the line it names): the
    file must be mended, no tool or path of the runbook's is at fault."""


class SlotMarkersError(CaddyError):
    """The Caddyfile's slot marker lines cannot be read (one missing or doubled, both on one
    line, END above START): which text is the managed block cannot be told, so nothing may
    rewrite it. A precondition (exit 4): a fact of the file, found when planning, before any
    change (a step that meets it later is said by the plan as what it did: undone, exit 1;
    after the commit, exit 6)."""

    exit_code = ExitCode.PRECONDITION
    # no marker line at all: the file may import the block from another (admin.markers_imported)
    none_found = False


class CaddyNotRunningError(CaddyError):
    """Caddy (or its admin API) does not answer: nothing may be written or reloaded.

    A precondition (exit 4): it is found before anything changes.
    """

    exit_code = ExitCode.PRECONDITION


class CaddyConflictError(CaddyError):
    """Caddy refused a load made on the condition that its config had not changed since it
    was read (`If-Match`: HTTP 412): someone else loaded a change in between, which the load
    would have dropped. Nothing was loaded; a precondition (exit 4), as the drift refusal."""

    exit_code = ExitCode.PRECONDITION
    # set by an undo's restore that met it: what it had said of an edit it kept aside (the
    # next attempt finds the file already put back and would not say it again), and whether
    # the previous Caddyfile had been written back (not on a full disk)
    kept: str | None = None
    file_back: bool = True


# --------------------------------------------------------------------------------------------
