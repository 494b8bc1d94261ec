"""Room for a snapshot in `[database] snapshot_dir`, judged before a run that takes one changes
anything: a restore found its folder full only once its app slots were stopped and its safety
snapshot refused (found by a fuzz). Judged only where a snapshot will be taken: a full folder
never blocks a rollback that takes none (status says it as a note, the fleet only on the host
whose dry run restores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
from pathlib import Path

from runbook import disk, files
from runbook.disk import MIN_DUMP, SNAPSHOT_INODES, Space
from runbook.environment import Environment, command_arg
from runbook.errors import PreconditionError, RunbookError
from runbook.snapshots import commands, store

RECENT = 3  # the snapshots the dump estimate reads: the largest of this database's newest few


def snapshot_room(env: Environment) -> Space | None:
    """The snapshot folder's room, judged by what a snapshot needs there (`Space.need`). A
    killed dump's dead `.partial` counts as free: the next dump removes it before it begins
    (found by review: a folder full of one refused the very restore that would free it)."""
    directory = env.database.snapshot_dir
    room = disk.space(directory)
    if room is None:
        return None
    freed = files_freed = 0
    for dead in store.dead_partials(directory):
        with contextlib.suppress(OSError):
            freed += dead.stat().st_blocks * 512
            files_freed += 1
    return dataclasses.replace(
        room, free=room.free + freed, dump_estimate=dump_estimate(directory, _dbname(env)),
        free_inodes=None if room.free_inodes is None else room.free_inodes + files_freed)


def _dbname(env: Environment) -> str | None:
    """The database whose snapshots the estimate reads; None when its URL cannot be read
    (the run that would dump says why)."""
    try:
        return commands.target(env).dbname
    except RunbookError:
        return None


def _snapshots(directory: Path, dbname: str | None = None) -> list[tuple[str, float, int, str]]:
    """(name's UTC time, mtime, size, file name) of each snapshot named as the contract names
    them (of `dbname` only, when given) in `directory`; none where it cannot be read: a stat
    of each, no sidecar read."""
    found: list[tuple[str, float, int, str]] = []
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            named = store.NAME_RE.match(entry.name.removesuffix(store.SUFFIX)) \
                if entry.name.endswith(store.SUFFIX) else None
            if named is None or (dbname is not None and named["db"] != dbname):
                continue
            with contextlib.suppress(OSError):
                info = entry.stat()
                found.append((named["date"] + named["time"], info.st_mtime, info.st_size,
                              entry.name))
    return found


def dump_estimate(directory: Path, dbname: str | None) -> int:
    """The largest of the newest RECENT snapshots of `dbname` in `directory` (0: none). Only
    this database's: the folder may be shared by environments (the default one is), and
    another database's snapshot refused a restore with room (found by review); the largest
    of a few, as one small dump (a quiet night, a table truncated since) under-counts."""
    newest = sorted(_snapshots(directory, dbname), reverse=True)[:RECENT]
    return max((size for _, _, size, _ in newest), default=0)


def snapshot_problems(env: Environment, own: list[Space]) -> list[tuple[str, str]]:
    """The snapshot folder's problem, unless its filesystem's is among `own`'s (`rooms`):
    what a restore or a deploy would be refused for."""
    room = snapshot_room(env)
    if room is None:
        return []
    return disk.problems([*own, room], lambda: snapshot_fix(env))[len(disk.problems(own)):]


def refuse_without_snapshot_room(env: Environment, what: str) -> None:
    """Refuse (exit 4, before any change) a run whose snapshot cannot be written: found only
    once the dump began, a restore had stopped its app slots by then (users got errors).
    A read-only folder or one out of inodes likewise (found by review: let through, "the
    dump's own refusal words it", which came after the stop). A folder this user may not
    write likewise (`disk.refuse_unwritable`, whose check of every run leaves this folder
    out): a restore stopped the app slots, then failed at its safety snapshot."""
    disk.refuse_unwritable(env, caddyfile=False, records=False, state=False, lock=False,
                           snapshot_dir=True)
    room = snapshot_room(env)
    if room is None:
        return
    where, mib = env.database.snapshot_dir, 1024 * 1024
    if room.read_only:
        raise PreconditionError(f"cannot take {what}: {where} is on a read-only filesystem; "
                                "nothing was changed", files.read_only_fix())
    if room.free_inodes is not None and room.free_inodes < SNAPSHOT_INODES:
        raise PreconditionError(
            f"no room for {what} in {where}: {room.free_inodes} free inodes there, under the "
            f"{SNAPSHOT_INODES} a snapshot needs; nothing was changed", files.no_inodes_fix(where))
    if room.free >= room.need:
        return
    raise PreconditionError(
        f"no room for {what} in {where}: {room.free / mib:.1f} MiB free, under the "
        f"{room.need / mib:.1f} MiB it needs ({room.reserve / mib:.1f} MiB kept free for the "
        f"database and the host, and about {max(room.dump_estimate or 0, MIN_DUMP) / mib:.1f}"
        " MiB for the dump, the largest of this database's last snapshots); nothing was "
        "changed", snapshot_fix(env))


def snapshot_fix(env: Environment) -> str:
    """Free space (`snapshot cleanup`: only expired snapshots no rollback or unfinished restore
    needs), or a bigger disk."""
    return disk.free_or_move(env.database.snapshot_dir, _cleanup_said(env))


def _cleanup_said(env: Environment) -> str:
    """The cleanup, with its dry run to see what it would free, and what this database's
    snapshots take: never a count cleanup would not free, nor a file to `rm`. Found by
    review: the count left out what cleanup keeps for an unfinished restore, and the "remove
    one with rm" list offered its safety snapshot (the only copy of the data from before it)
    and other environments' snapshots in a shared folder."""
    where, mib = env.database.snapshot_dir, 1024 * 1024
    arg = command_arg(env)
    said = (f"`runbook snapshot cleanup {arg}` removes the expired snapshots that no rollback "
            f"or unfinished restore needs (`--dry-run` first says which)")
    own = _snapshots(where, _dbname(env))
    return said + (
        f"; this database's {len(own)} snapshot(s) there take "
        f"{sum(size for _, _, size, _ in own) / mib:.1f} MiB (`runbook snapshot list {arg}`"
        " lists them)" if own else
        f"; what fills {where} is none of this database's snapshots: "
        f"`du -sh {shlex.quote(str(where))}/*`")
