"""Is a process alive: the one check the deploy lock and the drill clean-up share.

A pid alone can be reused after its process died; with the start time /proc recorded when
the lock was taken, a reused pid is told apart. A zombie counts as dead.
"""

from __future__ import annotations

import os
from pathlib import Path


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) from /proc, or None where there is no /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rpartition(")")[2].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_start(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Is `pid` a live process (and, given its /proc start time, the same one, not a reuse)?"""
    if pid <= 0:
        return False  # 0 and negatives address process groups, never a holder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OverflowError:
        return False
    stat = _proc_stat(pid)
    if stat is None:
        return True
    if stat[0] in ("Z", "X"):
        return False  # exited, not yet reaped
    return start is None or stat[1] == start


def pid_suspended(pid: int) -> bool:
    """Is `pid` stopped (Ctrl-Z, SIGSTOP: /proc state T, or t under a tracer)? Alive, yet it
    never ends by itself, and a SIGTERM waits until it is resumed (SIGCONT)."""
    stat = _proc_stat(pid) if pid > 0 else None
    return stat is not None and stat[0] in ("T", "t")


def flock_holders(st: os.stat_result) -> list[int]:
    """The pids /proc/locks names as holding a flock on the file `st` describes (its
    "MAJOR:MINOR:INODE", device numbers in hex); [] where there is no /proc/locks. Lets a
    run blocked on a flock name who blocks it (a suspended process never lets go)."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    exact, by_inode = [], []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or fields[-3].count(":") != 2:
            continue  # a blocked waiter's line ("1: -> FLOCK ...") names no holder
        major, minor, inode = fields[-3].split(":")
        try:
            pid, ident = int(fields[-4]), (int(major, 16), int(minor, 16), int(inode))
        except ValueError:
            continue
        if ident[2] != st.st_ino:
            continue
        by_inode.append(pid)
        if ident[:2] == (os.major(st.st_dev), os.minor(st.st_dev)):
            exact.append(pid)
    # an overlay or FUSE filesystem may show another device than stat does: the inode alone
    # then, and only when it names one holder
    return exact or (by_inode if len(set(by_inode)) == 1 else [])
