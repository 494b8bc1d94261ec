"""`runbook snapshot create|list|restore|cleanup`: database snapshots from a terminal.

Mounted by runbook/cli.py as a sub-app. The helpers it shares with cli.py (fail, run_action,
require_yes) live in runbook/cli_common.py: this module never imports runbook.cli (which
imports it, and `python -m runbook.cli` would load twice).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from runbook.cli_common import (
    ask_first,
    echo,
    fail,
    load_env,
    notice,
    only_reading,
    refuse_bad_moved_from,
    refuse_blank,
    require_yes,
    run_action,
)
from runbook.cli_options import ConfigOpt, EnvArg, Format, FormatOpt, MovedFromOpt
from runbook.errors import RunbookError

if TYPE_CHECKING:
    from runbook.environment import Environment
    from runbook.snapshots import CleanupResult

snapshot_app = typer.Typer(
    name="snapshot", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="Database snapshots: take one, list them, restore one safely, clean up old ones.\n\n"
         "Restore stops only the app slots (never the database), then takes a safety "
         "snapshot (no write can fall between the two) and replays in one transaction: a "
         "failure leaves the database as it was.",
)


def _fail(exc: RunbookError, fmt: Format) -> NoReturn:
    fail(exc, fmt)


def _env(name: str, config: str | None, fmt: Format) -> Environment:
    try:
        return load_env(name, config)
    except RunbookError as exc:
        _fail(exc, fmt)


@snapshot_app.command("create")
def create(
    env: EnvArg,
    reason: Annotated[str, typer.Option("--reason", help="why, part of the file name")] = "manual",
    fmt: FormatOpt = Format.text, config: ConfigOpt = None,
) -> None:
    """Take a snapshot now (pg_dump inside the database container, gzip, sidecar)."""
    from runbook import disk, run, snapshots

    environment = _env(env, config, fmt)
    try:
        # before the journal and the database: it found the folder unwritable only once
        # connected, after journaling, in words that named no owner and no command to type
        # (the log folder is not required: journaled warns and the snapshot is taken, as an
        # hourly cron's backups must be; found by review)
        disk.refuse_unwritable(environment, caddyfile=False, records=False, state=False,
                               lock=False, log=False, snapshot_dir=True)
        with run.journaled(environment, "snapshot-create", reason, notice) as log:
            snap = snapshots.create(environment, reason)
            log("SUCCESS", f"snapshot taken: {snap.path}", snapshot=str(snap.path),
                schema=snap.migration_version, sha256=(snap.meta or {}).get("sha256"))
            if snap.warning:
                log("WARN", f"snapshot {snap.name}: {snap.warning}")
                notice(f"{run.WARNING}snapshot {snap.name}: {snap.warning}")
    except RunbookError as exc:
        _fail(exc, fmt)
    data = snap.to_json(environment.database.retention_days)
    if fmt is Format.json:
        echo(json.dumps({"ok": True, "snapshot": data}, indent=2))
        return
    rows = ", ".join(f"{k} {v}" for k, v in sorted(data["tables"].items())) or "no tables"
    echo(f"Snapshot taken: {snap.path}\n  {data['size_mb']} MB in "
         f"{(snap.meta or {}).get('duration_seconds')}s, schema "
         f"{snap.migration_version}, rows: {rows}\n  expires {data['expires_at']}")


@snapshot_app.command("list")
def list_(env: EnvArg, fmt: FormatOpt = Format.text, config: ConfigOpt = None) -> None:
    """List snapshots, newest first, with their schema version and expiry."""
    from runbook import snapshots

    environment = _env(env, config, fmt)
    try:  # an unreadable folder is a precondition (exit 4), never "unexpected" (exit 5)
        with only_reading():
            snaps = snapshots.list_snapshots(environment)
    except RunbookError as exc:
        _fail(exc, fmt)
    retention = environment.database.retention_days
    # the folder may be shared: another database's (name, environment or server) is shown,
    # said as not this environment's (found by review: another server's of the same name
    # was listed as ours)
    here = snapshots.server_or_none(environment)  # one `docker inspect`, not one a file
    theirs = {s.path: snapshots.whose(environment, s, here) for s in snaps}
    # a dump this user may not read (root's 0600 pre-deploy dump): said, so on-call runs the
    # restore as one who may rather than picking an older one (found by review)
    unreadable = {s.path for s in snaps if _unreadable(s.path)}
    if fmt is Format.json:
        echo(json.dumps([s.to_json(retention) | {"ours": theirs[s.path] is None,
                                                 "not_ours": theirs[s.path],
                                                 "readable": s.path not in unreadable}
                         for s in snaps], indent=2))
        return
    if not snaps:
        echo(f"No snapshots in {environment.database.snapshot_dir}.")
        return
    header = ("name", "taken (UTC)", "schema", "MB", "expires", "deployment")
    lines = []
    ahead = False
    for s in snaps:
        d = s.to_json(retention)
        schema = "?" if s.migration_version is None else str(s.migration_version)
        ahead = ahead or d["dated_in_future"]
        taken = d["timestamp"] + (" dated in the future" if d["dated_in_future"] else "")
        lines.append((s.name, taken, schema + (" dirty" if s.dirty else "")
                      + (" !" if s.problems or s.meta is None else "")
                      + (" ~" if theirs[s.path] is not None else "")
                      + (" x" if s.path in unreadable else ""),
                      f"{d['size_mb']:.3f}", d["expires_at"], s.deployment_id or "-"))
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    for row in [header, *lines]:
        echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    echo(f"Folder: {environment.database.snapshot_dir}  (! = no or unreadable sidecar)")
    if any(why is not None for why in theirs.values()):
        echo(f"~ = not {environment.name}'s (another database, environment or server): never "
             "restored, a schema witness or cleaned up by this environment")
    if unreadable:
        echo(f"x = {_me()} may not read it: restore it as a user who may (`sudo runbook "
             "...`), not an older one")
    if ahead:
        echo("Dated in the future: taken while the clock ran fast (set back since), so which "
             "snapshot is the newest cannot be told; a restore without a name refuses it: "
             "name the one to restore")


def _unreadable(path: Path) -> bool:
    """Whether this user may not read the dump (it exists: a missing one is `!`)."""
    try:
        return path.exists() and not os.access(path, os.R_OK)
    except OSError:
        return False


def _me() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


@snapshot_app.command("restore")
def restore(
    env: EnvArg,
    snapshot: Annotated[str | None, typer.Argument(
        help="file name or path (default: the newest that is not a restore's safety "
             "snapshot (pre-restore), dirty or still being written; refused when it is dated "
             "in the future)",
        metavar="[SNAPSHOT]")] = None,
    keep_stopped: Annotated[bool, typer.Option(
        "--keep-stopped", help="leave the app containers stopped after the restore")] = False,
    end_sessions: Annotated[bool, typer.Option(
        "--end-sessions", help="end other sessions connected to the database once the app "
        "slots are stopped (default: refuse, naming them)")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="verify the file, show the plan "
                                          "and the data-loss window; change nothing")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    fmt: FormatOpt = Format.text, config: ConfigOpt = None,
    reason: Annotated[str | None, typer.Option("--reason", help="why, for the journal")] = None,
    moved_from: MovedFromOpt = None,
) -> None:
    """Restore a snapshot: stop app slots, safety snapshot, replay in one transaction, verify."""
    from runbook import snapshot_restore

    try:
        # blank: never "the newest" instead
        refuse_blank(("SNAPSHOT", snapshot))
        refuse_bad_moved_from(moved_from)
    except RunbookError as exc:
        _fail(exc, fmt)
    environment = _env(env, config, fmt)
    run_action(
        lambda **kw: snapshot_restore.restore(environment, snapshot, restart=not keep_stopped,
                                       dry_run=dry_run, reason=reason or "snapshot restore",
                                       end_sessions=end_sessions, moved_from=moved_from,
                                       **kw),
        fmt, yes=yes, dry_run=dry_run, what="`runbook snapshot restore`")


def _cleanup_locked(environment: Environment,
                    only: set[str] | None = None) -> CleanupResult:
    """Under the deploy lock (found by review): a cron cleanup deleted an expired snapshot
    that a restore, waiting at its prompt or taking its safety snapshot, was about to replay.
    A held lock refuses (exit 3) and deletes nothing; the next cron run does the work.
    Journaled: what it deleted, who ran it, or why it was refused."""
    from runbook import lock as locks
    from runbook import run, snapshots
    from runbook.snapshot_restore import kept_for_killed_restore

    with run.journaled(environment, "snapshot-cleanup", "runbook snapshot cleanup",
                       notice) as log:
        held = locks.acquire(environment, reason="snapshot cleanup")
        if held.state_warning:
            log("WARN", held.state_warning)
            notice(f"{run.WARNING}{held.state_warning}")
        try:
            result = snapshots.cleanup(environment, only=only,
                                       also_keep=kept_for_killed_restore(environment))
        finally:
            locks.release(environment, held)
        for snap in result.removed:
            log("INFO", f"removed {snap.name}", snapshot=str(snap.path))
        for path in result.orphans:
            log("INFO", f"removed leftover {path.name}", path=str(path))
        for warning in result.warnings:
            log("WARN", warning)
        log("SUCCESS", f"removed {len(result.removed)} snapshot(s); kept {len(result.kept)}",
            removed=[s.name for s in result.removed],
            held={s.name: why for s, why in result.held})
        return result


@snapshot_app.command("cleanup")
def cleanup(
    env: EnvArg,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only say what would go")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    fmt: FormatOpt = Format.text, config: ConfigOpt = None,
) -> None:
    """Delete snapshots past their own expires_at (default retention: 7 days), keeping the
    newest usable one, the current and previous deployments' pre-deploy snapshots, and a
    killed restore's safety snapshot."""
    from runbook import disk

    environment = _env(env, config, fmt)
    try:
        # its dry run too (the real run's refusal, as every dry run): a folder it may not
        # delete in was "Skipped ...: cannot delete it", exit 0, under the lock and journaled
        # (a snapshot folder not made yet holds nothing to delete: a daily cron cleanup as
        # a user who may not create it was refused every day; the log folder is not
        # required, as for create; both found by review)
        disk.refuse_unwritable(environment, caddyfile=False, records=False, state=False,
                               log=False, snapshot_dir=os.path.isdir(
                                   environment.database.snapshot_dir))
        if dry_run:
            result = _cleanup_preview(environment)
        else:
            require_yes(yes, "`runbook snapshot cleanup`")
            shown: set[str] | None = None
            if not yes:  # on a terminal: what would go, and the question
                looked = _cleanup_preview(environment)
                ask_first(yes, "\n".join(_cleanup_lines(environment, looked, dry_run=True)),
                          fmt)
                # and nothing else goes: no snapshot, no leftover
                shown = {s.name for s in looked.removed} | {p.name for p in looked.orphans}
            result = _cleanup_locked(environment, shown)
    except RunbookError as exc:
        _fail(exc, fmt)
    if fmt is Format.json:
        echo(json.dumps({"ok": True, "dry_run": dry_run,
                         "removed": [s.name for s in result.removed],
                         "kept": [s.name for s in result.kept],
                         "held": [{"name": s.name, "why": why} for s, why in result.held],
                         "skipped": [{"name": p.name, "why": why}
                                     for p, why in result.skipped],
                         "orphans": [p.name for p in result.orphans],
                         "warnings": result.warnings}, indent=2))
        return
    for line in _cleanup_lines(environment, result, dry_run=dry_run):
        echo(line)


def _cleanup_preview(environment: Environment) -> CleanupResult:
    """What the cleanup would remove now, deleting nothing. A lock the real run would be
    refused by refuses this too (exit 3), as every dry run (found by review: it said "Would
    remove ..." with exit 0 while the run it previewed exited 3)."""
    from runbook import lock as locks
    from runbook import snapshots
    from runbook.snapshot_restore import kept_for_killed_restore

    if (refused := locks.refusal(environment)) is not None:
        raise refused
    return snapshots.cleanup(environment, dry_run=True,
                             also_keep=kept_for_killed_restore(environment))


def _cleanup_lines(environment: Environment, result: CleanupResult, *,
                   dry_run: bool) -> list[str]:
    """The cleanup's report in words: the dry run's, the prompt's and the run's."""
    verb = "Would remove" if dry_run else "Removed"
    retention = environment.database.retention_days
    lines = [f"Warning: {warning}" for warning in result.warnings]
    lines += [f"{verb} {snap.name} (expired {snap.to_json(retention)['expires_at']})"
              for snap in result.removed]
    lines += [f"{'Would keep' if dry_run else 'Kept'} {snap.name} (expired "
              f"{snap.to_json(retention)['expires_at']}): {why}" for snap, why in result.held]
    lines += [f"{verb} leftover {path.name}" for path in result.orphans]
    lines += [f"Skipped {path.name}: {why}" for path, why in result.skipped]
    lines.append(f"{verb} {len(result.removed)} snapshot(s); kept {len(result.kept)}"
                 + (f", {len(result.held)} of them expired but needed" if result.held else "")
                 + ".")
    return lines
