"""Is a process alive: the one check the deploy lock and the drill clean-up share.

A pid alone can be reused after its process died; with the start time /proc recorded when
the lock was taken, a reused pid is told apart. A zombie counts as dead.
"""

from __future__ import annotations

import os
import signal
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
    """The pids holding a flock on the file `st` describes, as /proc/locks names them and
    each one's open files confirm; [] where that cannot be read. Lets a run blocked on a
    flock name who blocks it (a suspended process never lets go). /proc/locks alone is not
    trusted: btrfs shows another device than stat does (inode numbers repeat across its
    subvolumes), and it keeps the pid that took the lock after that process exited and
    its child kept it: a `kill` printed for such a pid hits another process (found by
    review). A holder whose files this user may not read is not named."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    candidates: list[int] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or fields[-3].count(":") != 2:
            continue  # a blocked waiter's line ("1: -> FLOCK ...") names no holder
        try:
            pid, inode = int(fields[-4]), int(fields[-3].rsplit(":", 1)[1])
        except ValueError:
            continue
        if inode == st.st_ino and pid not in candidates:
            candidates.append(pid)
    return [pid for pid in candidates if _has_open(pid, st)]


def _has_open(pid: int, st: os.stat_result) -> bool:
    """Whether process `pid` has the file `st` describes open (a stat through /proc/PID/fd
    gives the device and inode our own fstat does, on btrfs too)."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        names = os.listdir(fds)
    except OSError:
        return False
    for name in names:
        try:
            there = os.stat(fds / name)
        except OSError:
            continue
        if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def writers(path: Path) -> list[int]:
    """The pids holding `path` open for writing, as /proc shows them to this user (another
    user's open files only to root); [] where there is no /proc. Only a descriptor whose
    link names the file is stat'ed (never one on a hung network mount); the stat, by device
    and inode, holds across a container's mount namespace."""
    try:
        st = path.stat()
        name_seen = "/" + os.path.basename(os.path.realpath(path))  # a link's: its target's
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    found: list[int] = []
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        try:
            names = os.listdir(fds)
        except OSError:
            continue  # gone, or another user's
        for name in names:
            try:
                if not os.readlink(fds / name).endswith(name_seen):
                    continue
                there = os.stat(fds / name)
                flags = next(int(line.split()[1], 8) for line in Path(
                    f"/proc/{pid}/fdinfo/{name}").read_text().splitlines()
                    if line.startswith("flags:"))
            except (OSError, StopIteration, IndexError, ValueError):
                continue
            if ((there.st_dev, there.st_ino) == (st.st_dev, st.st_ino)
                    and flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)):
                found.append(int(pid))
                break
    return found


def outlives_hangup() -> None:
    """A child's `preexec_fn`: SIGHUP ignored (an ignored signal stays so across exec). A
    closed terminal (a dropped ssh session) sends it to the whole foreground process group,
    our children included: a `docker exec pg_dump` died of it half-way through a rollback's
    safety snapshot, which then undid the run that the runbook itself carries on (found by
    review). What a hangup does is the runbook's to decide (plan.Signals); Ctrl-C and
    SIGTERM reach the child as before. Nothing is imported here: it runs in the forked child,
    where another thread may have held the import lock at the fork."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
