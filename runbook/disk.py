"""Room on the filesystems the runbook writes to, checked before a run needs it.

A run writes its lock, its intent record, the state file (a temp copy, then a rename), the
Caddyfile, the journal and its run record: tens of KiB. A full or read-only filesystem
there fails the run at its lock, or after the commit at the state file; saying so first
(`runbook status`, the fleet's pre-flight, the plan's warnings) lets on-call free space first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from runbook import files
from runbook.environment import Environment

LOW = 1 << 20  # bytes: well above what one run writes
LOW_INODES = 64  # a run creates a dozen files (temp copies, lock, intent, records)


@dataclass(frozen=True)
class Space:
    """Room on the filesystem a directory lives on (statvfs of it, or of its nearest existing
    parent: a directory a run would create counts where it would be created)."""

    directory: Path
    device: int
    free: int  # bytes an unprivileged writer may still use
    read_only: bool
    free_inodes: int | None = None  # None: the filesystem counts no inodes (btrfs, some NFS)


def space(directory: Path) -> Space | None:
    """None when nothing on the path can be read (the run would say why in its own words)."""
    probe = Path(directory)
    while True:
        try:
            vfs = os.statvfs(probe)
            device = os.stat(probe).st_dev
        except FileNotFoundError:
            if probe.parent == probe:
                return None
            probe = probe.parent
            continue
        except OSError:
            return None
        return Space(Path(directory), device, vfs.f_bavail * vfs.f_frsize,
                     bool(vfs.f_flag & os.ST_RDONLY), vfs.f_favail if vfs.f_files else None)


def rooms(env: Environment) -> list[Space]:
    """The state file's, the lock's, the journal's, the run records' and the Caddyfile's."""
    found = (space(directory) for directory in (
        env.state_file.parent, env.lock_dir, env.log_dir, env.runs_dir,
        env.caddy.caddyfile.parent))
    return [room for room in found if room is not None]


def problems(found: list[Space]) -> list[tuple[str, str]]:
    """(problem, fix) once per filesystem a run could not write to (read-only, under LOW
    bytes or LOW_INODES inodes free), named by the first directory on it."""
    out: list[tuple[str, str]] = []
    seen: set[int] = set()
    for room in found:
        if room.device in seen:
            continue
        where = room.directory
        if room.read_only:
            seen.add(room.device)
            out.append((f"{where} is on a read-only filesystem: the next run cannot write its "
                        "lock, its intent or the state", files.read_only_fix()))
        elif room.free < LOW:
            seen.add(room.device)
            out.append((f"{room.free // 1024} KiB free where {where} lives: the next run may "
                        "fail to take the lock or to record the state",
                        files.no_space_fix(where)))
        elif room.free_inodes is not None and room.free_inodes < LOW_INODES:
            # bytes to spare but no inode left: every new file fails with "No space left"
            seen.add(room.device)
            out.append((f"{room.free_inodes} free inodes where {where} lives: the next run may "
                        "fail to create its lock or to record the state",
                        files.no_inodes_fix(where)))
    return out
