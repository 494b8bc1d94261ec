"""Who holds the deploy lock and whether it may be taken over: read-only.

Reads the lock directory (`locked_at`, `holder.json`) and the state file's mirror, and judges
staleness (expiry, a dead process on this host) without changing anything; runbook/lock/
holding.py takes, refreshes and releases it on that judgement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runbook import files, procs
from runbook import state as statemod
from runbook.environment import Environment, command_arg
from runbook.errors import ConfigError, RunbookError, StateError
from runbook.state.reader import number_as_text
from runbook.times import rough_duration

LOCKED_AT = "locked_at"
HOLDER = "holder.json"
FUTURE_SLACK = 300.0  # a locked_at further in the future than this is not believed
# a lock directory with nothing in it (its maker was killed between mkdir and its files) is
# stale once it is this old: younger, it may be a lock being taken now (the shell tooling
# writes its locked_at right after its mkdir, a runbook its files under the guard)
EMPTY_DIR_GRACE = 10.0
# an empty one dated later than this ahead of now: the clock was set back since its mkdir, its
# age cannot be told (found by review: "2 min old, wait a few seconds" for up to 310 s)
EMPTY_FUTURE_SLACK = 2.0

Ident = tuple[int, int]  # (st_dev, st_ino): which directory, not just which name


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as holder.json (or the state file's lock object) says."""

    lock_id: str | None = None
    locked_by: str | None = None
    pid: int | None = None
    hostname: str | None = None
    reason: str | None = None
    deployment_id: str | None = None  # what the run deploys; before its plan: its run id
    run_id: str | None = None  # the run's own id (older records: in deployment_id)
    locked_at: datetime | None = None
    expires_at: datetime | None = None
    pid_start: int | None = None  # /proc start time, so a reused pid is not taken for alive
    # the pid was written as a string of ASCII digits (a deploy script's `jq --arg`): weaker
    # evidence, so it may show the holder alive (keep the lock held), never dead (_judge)
    pid_as_text: bool = False
    held_since: datetime | None = None  # when it was taken (locked_at is its last refresh)
    # holder.json's (locked_at, expires_at) of each copy it mirrored into the state file:
    # what tells that copy once a Go CLI rewrite dropped its lock_id (_copy_of)
    mirrored: frozenset[tuple[datetime, datetime]] = frozenset()

    def describe(self) -> str:
        """One line whatever another tool wrote in the lock: its fields' control characters
        escaped (a `locked_by` holding a newline printed a forged line of its own)."""
        from runbook.redact import one_line

        who = one_line(self.locked_by or "an unknown user")
        where = []
        if self.pid is not None:
            where.append(f"pid {self.pid}")
        if self.hostname:
            where.append(f"on {one_line(self.hostname)}")
        text = f"{who} ({' '.join(where)})" if where else who
        if self.reason:
            text += f" for {self.reason!r}"  # repr: escaped already
        run = self.run_id or self.deployment_id
        if run:
            text += f", run {one_line(run)}"
        if self.deployment_id and self.deployment_id != run:
            text += f", deployment {one_line(self.deployment_id)}"
        return text


@dataclass(frozen=True)
class LockStatus:
    """What is known about a held lock, and whether it may be taken over."""

    path: Path
    source: str  # "directory", or "state file" for a lock only the state file records
    holder: Holder | None  # None: created by the shell tooling (only locked_at)
    locked_at: datetime | None
    age: float  # seconds since locked_at (negative: dated in the future)
    stale: bool
    why: str  # why it is (not) stale, in words
    holder_alive: bool | None  # None: cannot tell (no pid, or another host)
    expires_in: float  # seconds until it expires (<= 0 when expired)
    ident: Ident | None = None
    state_lock: Mapping[str, Any] | None = None  # the state file's mirror, for messages
    broken: bool = False  # something that is not a lock directory sits at the path
    fix: str | None = None  # a broken lock's way out, when not "remove it by hand"
    # dated in the future (the clock was set back since it was taken): its age cannot be
    # told, so it never expires by itself; on-call, having checked, may remove it with --force
    undated: bool = False
    # holder_alive comes from the state file's mirror (the shell tooling names its pid only
    # there), not from a holder.json with the process's start time: a reused pid would look
    # alive, so --force may remove it once on-call has checked the process
    alive_by_mirror: bool = False
    # the directory holds no lock file (nothing, or only our writer's temp files): being taken
    # at this moment while younger than EMPTY_DIR_GRACE, then stale (a run killed taking it)
    empty: bool = False
    # a state file that cannot be read for good (a directory, a refused read), or a [lock]
    # dir that is a file: what a run, unlock or a dry run raises instead of "locked" (exit 4,
    # or 2 for the configuration; never a live holder's 3)
    refused: RunbookError | None = None

    @property
    def legacy(self) -> bool:
        return self.holder is None

    @property
    def stealable(self) -> bool:
        """Stale and not demonstrably still running: safe to take without asking."""
        return self.stale and self.holder_alive is not True

    @property
    def pid_unverified(self) -> bool:
        """The holder looks alive by its pid alone (the shell tooling's mirror, or a copy with
        no start time): a pid reused after a crash or a reboot looks the same, so on-call,
        having checked the process, may remove it with --force."""
        return self.holder_alive is True and (
            self.alive_by_mirror or (self.holder is not None and (
                self.holder.pid_start is None
                # its start time recorded, but /proc cannot show this pid's (hidepid, another
                # user's process after a reboot): alive by its pid alone, so --force may
                # remove it once checked, never only a hand edit (found by review)
                or (self.holder.pid is not None and procs.pid_start(self.holder.pid) is None))))

    @property
    def suspended(self) -> bool:
        """Its holder's process runs on this host (known by its start time too) but is
        stopped (Ctrl-Z, SIGSTOP): it never ends by itself, nor refreshes the lock. "Wait
        for it to end" and "stop it (kill PID)" (a SIGTERM waits for a SIGCONT) both left
        it there for good (found by review)."""
        return (self.holder_alive is True and not self.pid_unverified
                and self.pid is not None and procs.pid_suspended(self.pid))

    @property
    def pid(self) -> int | None:
        """The holder's pid: holder.json's, or for the shell tooling its state-file mirror's."""
        if self.holder is not None:
            return self.holder.pid
        return _state_holder(self.state_lock).pid if self.state_lock else None

    @property
    def is_ours(self) -> bool:
        h = self.holder
        return (h is not None and h.pid == os.getpid() and h.hostname == socket.gethostname())

    def describe(self) -> str:
        if self.broken:
            return self.why
        if self.holder is not None:
            who = self.holder.describe()
        elif self.empty and not self.undated:  # nobody's yet, or nobody's ever: not the shell
            # tooling's (found by review: "the shell tooling (no holder recorded)", with
            # `unlock --force` as the way out, for a lock the next run took over unasked)
            who = ("no one: the lock directory is empty" if self.stale else
                   "a run taking it at this moment (the lock directory is still empty)")
        elif self.state_lock and self.state_lock.get("locked"):
            who = "the shell tooling (" + _state_holder(self.state_lock).describe() + ")"
        else:
            who = "the shell tooling (no holder recorded)"
        since = ""
        # a state-file lock with expires_at alone recorded no start: none is made up for it
        made_up = (self.source == "state file" and self.holder is not None
                   and self.holder.locked_at is None)
        if self.locked_at and not made_up:  # when it was taken, not its last refresh
            taken = self.holder.held_since if self.holder and self.holder.held_since else None
            start = taken if taken is not None and taken <= self.locked_at else self.locked_at
            age = self.age + (self.locked_at - start).total_seconds()
            # dated in the future (the clock set back since): never "0 s ago" (found by review)
            when = f"{rough_duration(age)} ago" if age > -1 else \
                f"{rough_duration(-age)} in the future"
            since = f" since {statemod.format_time(start)} ({when})"
        return f"{who}{since}"


def suspended_fix(pid: int) -> str:
    """The two ways out of a lock whose holder is suspended (LockStatus.suspended)."""
    return (f"`kill -CONT {pid}` resumes it where it stopped (or `fg` in the shell it was "
            f"suspended in); to stop it instead, `kill {pid}` and then `kill -CONT {pid}` (a "
            "suspended process takes the signal only once resumed: it then stops as on "
            "Ctrl-C: before its commit point (traffic moved and verified) it undoes what it "
            "changed, traffic included, and after it it says what is left to finish; then it "
            "releases the lock)")


def lock_dir_problem(env: Environment) -> tuple[str, str] | None:
    """(problem, fix) when [lock] dir, or a folder on its way, is a file (or a link to
    nothing): no lock can ever be made or read there, whoever waits. It was "the deploy lock
    cannot be used ... remove it by hand", exit 3 (a live holder's code), for every dry run
    and the fleet's pre-flight, and a real run's exit 2 came after its journal and run
    record (found by review). A configuration error, as a [logs] dir that is a file."""
    found = files.not_a_folder(env.lock_dir)
    if found is None:
        return None
    what = "a link to nothing" if os.path.islink(found) else "a file"
    where = ("" if found == Path(os.path.abspath(env.lock_dir))
             else f" ({found} on its way is {what})")
    return (f"the lock directory {env.lock_dir} is not a directory{where}",
            f"point [lock] dir in {env.source or 'the environment file'} at a directory, or "
            f"move {found} aside")


def lock_dir_refusal(env: Environment, *, before: bool = True) -> ConfigError | None:
    """lock_dir_problem as the refusal (exit 2) every command that takes or reads the lock
    raises; `before`: raised before anything changed (not so when releasing)."""
    found = lock_dir_problem(env)
    if found is None:
        return None
    return ConfigError(f"{env.display}: {found[0]}" + ("; nothing was changed" if before else ""),
                       found[1])


def _inspect(env: Environment, now: float | None = None) -> LockStatus | None:
    now = time.time() if now is None else now
    path = env.lock_path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # the lock directory is a file, or cannot be searched
        if (bad := lock_dir_problem(env)) is not None:  # the configuration's, not a holder
            return LockStatus(path=path, source="directory", holder=None, locked_at=None,
                              age=0.0, stale=False, why=bad[0], holder_alive=None,
                              expires_in=float("inf"), broken=True, fix=bad[1],
                              refused=lock_dir_refusal(env))
        return LockStatus(path=path, source="directory", holder=None, locked_at=None, age=0.0,
                          stale=False, why=f"{path} cannot be read: {exc.strerror or exc} "
                          f"(check [lock] dir {path.parent})", holder_alive=None,
                          expires_in=float("inf"), broken=True)
    ident = (st.st_dev, st.st_ino)
    if not os.path.isdir(path) or os.path.islink(path):
        return LockStatus(path=path, source="directory", holder=None, locked_at=None, age=0.0,
                          stale=False, why=f"{path} is not a lock directory", holder_alive=None,
                          expires_in=float("inf"), ident=ident, broken=True)
    try:
        holder = _read_holder(path / HOLDER)
        epoch = None
        if holder is not None and holder.locked_at is not None:
            epoch = holder.locked_at.timestamp()
        basis = "holder.json"
        if epoch is None:
            epoch, basis = _read_locked_at(path / LOCKED_AT), "locked_at"
    except files.NotAFile as exc:  # neither the runbook nor the shell tooling makes one
        return LockStatus(path=path, source="directory", holder=None, locked_at=None, age=0.0,
                          stale=False, why=f"{exc.filename} is {exc.strerror}, so it is no "
                          "lock's file (made by hand or by another user)", holder_alive=None,
                          expires_in=float("inf"), ident=ident, broken=True)
    except PermissionError as exc:
        return _unreadable(env, path, st, exc)
    if epoch is None or epoch > now + FUTURE_SLACK:
        # Not written yet (being acquired), or garbage: the directory's own age decides.
        epoch, basis = st.st_mtime, "the directory's mtime"
    try:  # only evidence that a legacy directory's holder runs; judged again on its own
        state_lock = None if holder is not None else _state_lock_mapping(env)
    except StateError:
        state_lock = None
    running = basis == "locked_at" and _mirror_running(state_lock, epoch)
    # an empty directory expires EMPTY_DIR_GRACE after its mkdir, not the lifetime after: it
    # was judged fresh for 30 minutes, and every reader (status, unlock, the fleet's host
    # check) but the run taking the lock called it held, or removable only with --force
    empty = holder is None and _only_our_temp_files(path) is not None
    judged = _judge(env, path, "directory", holder, epoch, basis, now, ident, state_lock,
                    expires=epoch + EMPTY_DIR_GRACE if empty else None, running=running)
    if empty:
        judged = dataclasses.replace(judged, empty=True, why=(
            f"a run killed while taking it left it empty, {rough_duration(judged.age)} ago"
            if judged.stale else "a run is taking it at this moment: its directory is still "
            f"empty, {rough_duration(judged.age)} old"))
    if epoch > now + (EMPTY_FUTURE_SLACK if empty else FUTURE_SLACK) and not judged.stale \
            and (judged.holder_alive is not True or judged.pid_unverified):
        # its directory too was made "later" than now: the clock was set back since (NTP
        # stepping it). It read as fresh for hours, and a lock that has not expired was not
        # removable even with --force (found by review); a pid alone proves no holder
        judged = dataclasses.replace(judged, undated=True,
                                     why=_dated_in_future(epoch - now, basis))
    return dataclasses.replace(judged, alive_by_mirror=running) if running else judged


def _only_our_temp_files(path: Path) -> list[str] | None:
    """The lock directory's entries when each is a temp file of our own lock writer (a run
    killed inside its write: not content), [] when it is empty; None otherwise."""
    try:
        with os.scandir(path) as entries:
            names = [e.name for e in entries]
    except OSError:
        return None
    return names if all(files.temp_target(n) in (HOLDER, LOCKED_AT) for n in names) else None


def _unreadable(env: Environment, path: Path, st: os.stat_result,
                exc: PermissionError) -> LockStatus:
    """A lock whose files this user may not read: another user's, made under a restrictive
    umask (an older runbook's, or the shell tooling's, under root's cron or Ansible). Read as
    absent, it was "the shell tooling (no holder recorded)", dated by its directory's mtime,
    its holder's pid never checked (found by review). Who holds it and whether that run
    lives cannot be told here: never taken or removed by this user (a live lock is never
    removed); its owner or root can judge it."""
    who = files.owner_name(st.st_uid)
    by = "root" if st.st_uid == 0 else f"{who} or root"
    return LockStatus(
        path=path, source="directory", holder=None, locked_at=None, age=0.0, stale=False,
        why=f"{exc.filename} cannot be read ({exc.strerror}): the lock belongs to {who} (mode "
            f"{stat.S_IMODE(st.st_mode):o}, taken under a restrictive umask), so who holds it "
            "and whether that run still lives cannot be told",
        holder_alive=None, expires_in=float("inf"), ident=(st.st_dev, st.st_ino), broken=True,
        fix=f"ask {who} whether that run still goes on; as {by}, `runbook unlock "
            f"{command_arg(env)} --status` names its holder, and `runbook unlock "
            f"{command_arg(env)}` removes it once it is stale")


def _dated_in_future(ahead: float, basis: str) -> str:
    return (f"it is dated {rough_duration(ahead)} in the future (by {basis}): the clock was set "
            "back since it was taken, so its age cannot be told")


MIRROR_MATCH = 2.0  # seconds: the mirror's locked_at and the directory's are the same run's


def _mirror_running(state_lock: Mapping[str, Any] | None, epoch: float) -> bool:
    """Whether the state file's lock is this directory's (the same `locked_at`) and names a
    process running on this host. The shell tooling's directory holds only `locked_at`; its
    mirror names the pid. Only ever evidence that the holder runs, never that it died."""
    if not state_lock or not state_lock.get("locked"):
        return False
    mirror = _state_holder(state_lock)
    return (mirror.pid is not None and mirror.hostname == socket.gethostname()
            and mirror.locked_at is not None
            and abs(mirror.locked_at.timestamp() - epoch) <= MIRROR_MATCH
            and procs.pid_alive(mirror.pid, mirror.pid_start) is True)


def _judge(env: Environment, path: Path, source: str, holder: Holder | None, epoch: float,
           basis: str, now: float, ident: Ident | None,
           state_lock: Mapping[str, Any] | None, expires: float | None = None, *,
           running: bool = False) -> LockStatus:
    age = now - epoch
    deadline = expires if expires is not None else epoch + env.lock_stale_after
    expires_in = deadline - now
    alive = None
    pid = holder.pid if holder is not None else None
    if holder is not None and pid is not None and holder.hostname == socket.gethostname():
        alive = procs.pid_alive(pid, holder.pid_start)
        if alive is False and holder.pid_as_text:
            # text from another tool never makes a held lock stale (no file did before the
            # state reader took it): as if no pid were recorded, its times decide
            alive = None
    elif running and state_lock:  # a legacy directory whose mirror's process still runs
        alive, pid = True, _state_holder(state_lock).pid
    if expires_in <= 0:
        why = f"expired {rough_duration(-expires_in)} ago (by {basis})"
        if alive:
            why += f"; its process {pid} is still running on this host"
        stale = True
    elif alive is False:
        why = f"its process {pid} is no longer running on this host"
        stale = True
    else:
        stale = False
        if alive:
            why = f"its process is running; expires in {rough_duration(expires_in)}"
        elif holder is not None and holder.hostname and holder.hostname != socket.gethostname():
            why = (f"held from another host ({holder.hostname}); expires in "
                   f"{rough_duration(expires_in)}")
        else:
            why = f"expires in {rough_duration(expires_in)} (by {basis})"
    return LockStatus(path=path, source=source, holder=holder,
                      locked_at=_from_epoch(epoch), age=age, stale=stale, why=why,
                      holder_alive=alive, expires_in=expires_in, ident=ident,
                      state_lock=state_lock)


STATE_REREAD_PAUSE = 0.5  # seconds: a file the Go CLI rewrites in place reads whole by then


def _state_lock_mapping(env: Environment,
                        corrupt: list[str] | None = None) -> Mapping[str, Any] | None:
    """The state file's lock object, read alone (statemod.read_lock): a bad record elsewhere
    in the file never hides it. StateError while the file cannot be read as JSON and changes
    (the Go CLI rewrites it in place, holding its lock: mid-write it is not JSON).

    Not JSON and unchanged after a pause, the file is corrupt, not being written (a write
    cut short by a full disk): no lock is read from it, as with no state file, and why is
    appended to `corrupt`. Refused, it blocked every run and unlock for ever, as "locked by
    another run", restores that never read the file too (found by review)."""
    try:
        return statemod.read_lock(env.state_file)
    except statemod.NotJSON as exc:
        first = exc
    time.sleep(STATE_REREAD_PAUSE)
    try:
        return statemod.read_lock(env.state_file)  # whole now: what it says is judged
    except statemod.NotJSON as exc:
        if exc.raw != first.raw:
            raise  # still changing
        if corrupt is not None:
            corrupt.append(f"{exc.message}, and it did not change in {STATE_REREAD_PAUSE:g} s, "
                           "so it is corrupt, not being written: the deploy lock is judged by "
                           f"{env.lock_path} alone and not recorded in the file; "
                           f"{exc.fix or 'restore it from a backup'}")
        return None


def _copy_of(holder: Holder, lock: Mapping[str, Any]) -> bool:
    """Whether the state file's lock is a copy `holder` wrote: by its lock_id; without one,
    by what the holder wrote. The Go CLI rewrites the whole file through its lock struct
    (locked, locked_at, locked_by, reason, expires_at), dropping our lock_id, pid and
    hostname: a copy left so by a run killed holding the lock was taken for the Go CLI's
    live lock, and the next run refused for up to 30 minutes (found by review). The holder's
    copy: its locked_by and reason, and the very times of a copy it wrote (to the
    microsecond: another lock is not taken at that instant); a holder.json that lists none
    (written before it did) wrote its own locked_at and expires_at."""
    seen = _state_holder(lock)
    if seen.lock_id is not None:
        return holder.lock_id is not None and seen.lock_id == holder.lock_id
    times = set(holder.mirrored)
    if holder.locked_at is not None and holder.expires_at is not None:
        times.add((holder.locked_at, holder.expires_at))
    return (bool(lock.get("locked")) and holder.locked_by is not None
            and seen.locked_by == holder.locked_by and seen.reason == holder.reason
            and seen.pid in (None, holder.pid) and seen.hostname in (None, holder.hostname)
            and seen.locked_at is not None and seen.expires_at is not None
            and (seen.locked_at, seen.expires_at) in times)


STRIPPED_COPY = ("; the state file's lock is its copy, stripped of its lock_id, pid and "
                 "hostname by another tool's rewrite (the Go CLI)")


def _beside(env: Environment, current: LockStatus,
            corrupt: list[str] | None = None) -> tuple[LockStatus, LockStatus | None]:
    """A stale lock directory and the state file's lock beside it, judged: a live lock there
    (the Go CLI's, taken since) is a holder all the same. That lock is None when it is the
    directory's own copy, stripped by the Go CLI's rewrite (_copy_of): the directory's `why`
    says so."""
    try:
        lock = _state_lock_mapping(env, corrupt)
    except StateError as exc:
        return current, _unjudged(env, exc)
    if lock and current.holder is not None and current.stale \
            and lock.get("lock_id") is None and _copy_of(current.holder, lock):
        return dataclasses.replace(current, why=current.why + STRIPPED_COPY), None
    return current, _judge_state_lock(env, lock)


def _state_lock_status(env: Environment, now: float | None = None,
                       corrupt: list[str] | None = None) -> LockStatus | None:
    """A lock recorded only in the state file (the Go CLI locks nowhere else); a broken
    LockStatus while the file cannot be read as JSON and changes: never "free" for want of
    reading it (a file corrupt for good: see _state_lock_mapping)."""
    try:
        lock = _state_lock_mapping(env, corrupt)
    except StateError as exc:
        return _unjudged(env, exc)
    return _judge_state_lock(env, lock, now)


def _unjudged(env: Environment, exc: StateError) -> LockStatus:
    """The state file cannot be read as JSON (being rewritten in place at this moment, or
    unreadable): whether another tool (the Go CLI) holds the lock in it cannot be told, so the
    lock is not taken, and said so, not taken for free (found by review).

    A lock object with a key written twice (state.reader.Ambiguous: the shell tooling reads
    the first value, Python the last) is no write under way either: its holder is unknown.

    Only a file still changing (NotJSON: _state_lock_mapping read it twice) may be a write
    under way, worth a retry. Any other refusal (a directory, a read error, a lock that is no
    object) stays until someone fixes the file: it was "run again in a minute", exit 3 (a
    live holder's code), for good (found by review). It is `refused`: exit 4, its fix."""
    why = (f"{exc.message}, so whether another tool (the Go CLI) holds the deploy lock in it "
           "cannot be told")
    fix = exc.fix or "restore it from a backup"
    if isinstance(exc, statemod.NotJSON):
        return LockStatus(path=env.state_file, source="state file", holder=None,
                          locked_at=None, age=0.0, stale=False, why=why, holder_alive=None,
                          expires_in=float("inf"), broken=True,
                          fix=f"{fix} (if a deploy is writing it at this moment, run again "
                          "in a minute)")
    refused = StateError(f"{why}; nothing was changed", fix)  # exit 4: precondition
    return LockStatus(path=env.state_file, source="state file", holder=None, locked_at=None,
                      age=0.0, stale=False, why=why, holder_alive=None,
                      expires_in=float("inf"), broken=True, fix=fix, refused=refused)


def _judge_state_lock(env: Environment, lock: Mapping[str, Any] | None,
                      now: float | None = None) -> LockStatus | None:
    now = time.time() if now is None else now
    if not lock or not lock.get("locked"):
        return None
    holder = _state_holder(lock)
    epoch = holder.locked_at.timestamp() if holder.locked_at else None
    expires = holder.expires_at.timestamp() if holder.expires_at else None
    recorded = epoch is not None
    if epoch is None and expires is not None:
        epoch = expires - env.lock_stale_after
    if epoch is None:
        return _judge_undated_state_lock(env, lock, holder, now)
    judged = _judge(env, env.state_file, "state file", holder, epoch, "the state file", now,
                    None, lock, expires)
    # only a locked_at it records dates it: with expires_at alone the start is a guess (its
    # tool's time-to-live, unknown to CONTRACTS.md, may pass [lock] stale_after), and a live
    # lock read as "dated in the future" was removed by --force (found by review)
    if recorded and epoch > now + FUTURE_SLACK and not judged.stale \
            and (judged.holder_alive is not True or judged.pid_unverified):
        # as a lock directory dated in the future (_inspect): the Go CLI's lock taken while
        # the clock was hours ahead, then set back by NTP, read as fresh for those hours and
        # was not removable even with --force (found by review)
        judged = dataclasses.replace(judged, undated=True,
                                     why=_dated_in_future(epoch - now, "the state file"))
    return judged


STATE_LOCK_TIMES = ("locked_at", "lock_expires_at", "expires_at")


def _judge_undated_state_lock(env: Environment, lock: Mapping[str, Any], holder: Holder,
                              now: float) -> LockStatus:
    """A held lock in the state file with no time that reads as RFC 3339 with an offset (what
    every tool writes: CONTRACTS.md): dated at the epoch, it was "expired 20792 d ago" and
    the next run took it over without a word (found by review). Only its process, when it is
    on this host, tells anything; else its age cannot be told: undated, as a lock directory
    dated in the future (removable with --force once on-call has checked)."""
    judged = _judge(env, env.state_file, "state file", holder, now, "the state file", now,
                    None, lock)
    shown = ", ".join(f"{key}={_shorten(repr(lock[key]))}" for key in STATE_LOCK_TIMES
                      if key in lock)
    why = (f"its times cannot be read ({shown or 'none is recorded'}; RFC 3339 with a UTC "
           "offset expected), so its age cannot be told")
    if judged.stale:  # its process is gone from this host: that is judged as ever
        why = f"{judged.why}; {why}"
    elif judged.holder_alive:
        why = f"{why}; its process {holder.pid} is running on this host"
    judged = dataclasses.replace(judged, locked_at=None, age=0.0, expires_in=float("inf"),
                                 why=why)
    # running by its pid alone (no start time recorded, or none /proc shows) may be a reused
    # pid: undated too, so --force removes it once on-call has checked the process; kept as
    # live, it blocked every run and --force until a hand edit (found by review)
    return dataclasses.replace(judged, undated=not judged.stale and (
        not judged.holder_alive or judged.pid_unverified))


def _shorten(text: str, limit: int = 40) -> str:
    from runbook.redact import redact

    text = redact(text)  # masked before it is cut: a cut secret matches nothing that masks it
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _state_holder(lock: Mapping[str, Any]) -> Holder:
    def text(key: str) -> str | None:
        value = lock.get(key)
        return value if isinstance(value, str) and value else None

    def when(key: str) -> datetime | None:
        value = lock.get(key)
        if not isinstance(value, str):
            return None
        try:
            return statemod.parse_time(value)
        except (ValueError, OverflowError):
            return None

    def number(key: str) -> int | None:
        value = lock.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    pid = number("pid")
    # a pid `jq --arg` wrote as text ("48213", which the state reader accepts): read as no
    # pid, a live deploy's lock older than stale_after was taken over (found by review)
    as_text = (said := number_as_text(lock.get("pid"))) is not None
    if said is not None:
        pid = said

    def pairs(key: str) -> frozenset[tuple[datetime, datetime]]:
        found = set()
        value = lock.get(key)
        for pair in value if isinstance(value, list) else ():
            if isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str)
                                                                 for v in pair):
                with contextlib.suppress(ValueError, OverflowError):
                    at, until = statemod.parse_time(pair[0]), statemod.parse_time(pair[1])
                    if at is not None and until is not None:
                        found.add((at, until))
        return frozenset(found)

    return Holder(lock_id=text("lock_id"), locked_by=text("locked_by"),
                  pid=pid, pid_as_text=as_text,
                  pid_start=number("pid_start"), mirrored=pairs("mirrored"),
                  hostname=text("hostname"), reason=text("reason"),
                  deployment_id=text("deployment_id"), run_id=text("run_id"),
                  locked_at=when("locked_at"),
                  held_since=when("held_since"),
                  # read leniently too (a lock read_state refused): the later of the two
                  # names, as read_state keeps it (an earlier one would steal a live lock)
                  expires_at=max(filter(None, (when("lock_expires_at"), when("expires_at"))),
                                 default=None))


LOCK_FILE_MAX = 64 * 1024  # holder.json is a few hundred bytes, locked_at a dozen


def _read_holder(path: Path) -> Holder | None:
    """files.NotAFile for what is no lock's file (a FIFO, a symlink to /dev/zero): read, it
    hung every command (found by review). PermissionError for one this user may not read:
    that is no missing holder (_unreadable)."""
    try:
        data = json.loads(files.read_regular(path, LOCK_FILE_MAX))
    except (files.NotAFile, PermissionError):
        raise
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    return _state_holder(data)


def _read_locked_at(path: Path) -> float | None:
    """As _read_holder: files.NotAFile for what is no lock's file, PermissionError."""
    try:
        value = float(files.read_regular(path, LOCK_FILE_MAX).strip())
    except (files.NotAFile, PermissionError):
        raise
    except (OSError, ValueError):
        return None
    return value if value >= 1_000_000_000 else None  # what the shell tooling also rejects


def _from_epoch(epoch: float) -> datetime:
    try:
        return datetime.fromtimestamp(epoch, UTC)
    except (OverflowError, OSError, ValueError):
        return datetime.fromtimestamp(0, UTC)
