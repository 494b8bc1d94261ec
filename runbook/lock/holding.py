"""Taking, refreshing, releasing and removing the per-environment deploy lock (the lock
itself, and what the old tooling got wrong, are described in runbook/lock/__init__.py).

Every change happens under the flock'd guard; a stale lock is taken only on what
policy.py judged, and only after its directory is renamed away and checked by inode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from runbook import files, procs
from runbook import state as statemod
from runbook.environment import Environment, command_arg
from runbook.errors import (
    ExitCode,
    LockedError,
    LockLostError,
    PreconditionError,
    RunbookError,
    StateError,
)
from runbook.lock.policy import (
    EMPTY_DIR_GRACE,
    HOLDER,
    LOCK_FILE_MAX,
    LOCKED_AT,
    MIRROR_MATCH,
    Holder,
    Ident,
    LockStatus,
    _beside,
    _copy_of,
    _from_epoch,
    _inspect,
    _judge_state_lock,
    _only_our_temp_files,
    _state_lock_mapping,
    _state_lock_status,
    _unjudged,
    lock_dir_refusal,
    suspended_fix,
)
from runbook.times import rough_duration


class LockNotRemovable(LockedError):
    """A stale lock this user may not remove (another user's, in a sticky directory)."""


GUARD_TIMEOUT = 10.0  # seconds; the guarded sections take milliseconds


@dataclass
class Lock:
    """A lock this process holds. Use as a context manager, or call release()."""

    env: Environment
    path: Path
    lock_id: str
    deployment_id: str  # the run's id until its plan names the deployment (for_deployment)
    reason: str
    locked_by: str
    pid: int
    hostname: str
    locked_at: datetime
    expires_at: datetime
    ident: Ident
    run_id: str = ""  # the run's own id (journal's run_id), whatever deployment_id says
    mirror_error: str | None = None  # the state-file mirror failed; the lock itself holds
    # the lock directory's last refresh failed (its files age for other tools): said once
    lock_error: str | None = None
    # the mirror's rewrite could not keep the state file's owner or group (files.atomic_write)
    owner_lost: str | None = None
    stolen_from: LockStatus | None = None  # the stale lock this one replaced
    # the state file is corrupt for good (no lock read from it): the run says it, once
    state_warning: str | None = None
    released: bool = field(default=False)
    # what the release cleared of the stale lock it took over (_clear_stolen_copy), to say
    cleared_copy: str | None = field(default=None)
    # the release could not clear the state file's copy: it says "locked" until it expires
    unreleased_copy: str | None = field(default=None)
    published: bool = field(default=False)  # mirrored into the state file
    # a missing state file is created for the mirror (a deploy's: see publish)
    create_state: bool = field(default=False)
    _mirrored_at: float = field(default=0.0)  # when the state file's copy was last refreshed
    _written_at: float = field(default=0.0)  # the epoch the lock files last recorded
    held_since: datetime | None = None  # when it was taken (a refresh moves locked_at)
    _foreign: str | None = field(default=None)  # a live lock of another tool the refresh met
    # (locked_at, expires_at) of each copy mirrored into the state file: what tells our copy
    # once a Go CLI rewrite has dropped its lock_id (_mirror_is_ours); listed in holder.json
    # too, for the next run when this one is killed (policy._copy_of)
    _copies: set[tuple[datetime, datetime]] = field(default_factory=set)

    def holder_json(self) -> dict[str, Any]:
        return {
            "lock_id": self.lock_id,
            "locked_by": self.locked_by,
            "pid": self.pid,
            "hostname": self.hostname,
            "reason": self.reason,
            "deployment_id": self.deployment_id,
            "run_id": self.run_id,
            "locked_at": statemod.format_time(self.locked_at),
            "expires_at": statemod.format_time(self.expires_at),
            "held_since": statemod.format_time(self.held_since or self.locked_at),
            "pid_start": procs.pid_start(self.pid),
            "mirrored": [[statemod.format_time(a), statemod.format_time(b)]
                         for a, b in sorted(self._copies)[-MIRRORED_KEPT:]],
            "tool": "togather-runbook",
            **({"took_over": self.stolen_from.describe() + f" ({self.stolen_from.why})"}
               if self.stolen_from else {}),
        }

    def state_json(self) -> dict[str, Any]:
        return {
            "locked": True,
            "lock_id": self.lock_id,
            "locked_by": self.locked_by,
            "locked_at": statemod.format_time(self.locked_at),
            "lock_expires_at": statemod.format_time(self.expires_at),
            "deployment_id": self.deployment_id,
            "run_id": self.run_id,
            "pid": self.pid,
            # with it, a pid reused after a power loss (the lock directory on /tmp gone, the
            # mirror left) is not taken for a live holder: no run for 30 min, no unlock
            "pid_start": procs.pid_start(self.pid),
            "hostname": self.hostname,
            "reason": self.reason,
        }

    def _copy(self) -> dict[str, Any]:
        """state_json(), its times remembered before it is written (_copies), and recorded
        in holder.json: a run killed once the Go CLI's rewrite dropped the copy's lock_id
        left a copy the next run took for the Go CLI's live lock (found by review)."""
        with _guard(self.env):
            self.check_owned()
            copy = self.state_json()  # under the guard: the heartbeat moves locked_at
            if (self.locked_at, self.expires_at) not in self._copies:
                self._copies.add((self.locked_at, self.expires_at))
                with contextlib.suppress(OSError):  # the mirror is best effort; so is this
                    files.atomic_write(self.path / HOLDER, _holder_bytes(self))
        return copy

    def for_deployment(self, deployment_id: str | None) -> None:
        """Name the deployment the plan names (journal.for_deployment's), so the lock's
        deployment_id says what the run's log lines say; it was the run id, which status
        printed as "run ..." (found by review). holder.json at once; the state file's copy
        when it is next written (publish, or a refresh when it is published already)."""
        if not deployment_id or deployment_id == self.deployment_id:
            return
        self.deployment_id = deployment_id
        self.refresh()

    def refresh(self, *, mirror: bool = True) -> None:
        """Restart the expiry clock, so a long step is not mistaken for a crashed run.

        mirror=False touches only the lock directory: safe from a background thread while
        the main thread may be writing the state file.
        """
        with _guard(self.env):
            self.check_owned()
            now = time.time()
            self.locked_at = _from_epoch(now)
            self.expires_at = self.locked_at + timedelta(seconds=self.env.lock_stale_after)
            if mirror and self.published:  # its copy is written next: recorded now, once
                self._copies.add((self.locked_at, self.expires_at))
            self._write_refreshed(now)
        # whatever the lock's folder did: the copy is on another disk, and raised past (a
        # full lock folder) it aged too, until the Go CLI could take it (found by review)
        if mirror and self.published:
            self._refresh_mirror()

    def _write_refreshed(self, now: float) -> None:
        """The lock files with the new times; on a full disk (or quota), where the replace's
        temp file gets no block, their times rewritten in place. Raised to the run's beat, a
        failure was swallowed there and the lock aged silently until the shell tooling took
        a live run's lock (found by review): it is kept in lock_error, for the run to say.
        Rewritten in place, holder.json keeps its other fields as they were: one that should
        have changed is said there too (found by review: for_deployment's id was lost)."""
        stale: dict[str, Any] = {}
        full: OSError | None = None
        try:
            try:
                _write_lock_files(self.path, self, now)
            except OSError as exc:
                if exc.errno not in files.NO_SPACE:
                    raise
                try:
                    stale = _rewrite_in_place(self.path, self, now)
                except (OSError, ValueError):
                    raise exc from None  # the full disk is what on-call can fix
                full = exc
        except OSError as exc:
            self.lock_error = self._refresh_failure(exc)
            return
        self._written_at = now
        self.lock_error = self._partly_written(full, stale) if full and stale else None

    def _partly_written(self, exc: OSError, stale: dict[str, Any]) -> str:
        """One line: what holder.json still says after its times alone were rewritten in
        place (`stale`: its fields that differ, as the file holds them), and the fix. Said
        without times: each distinct problem is said once (run.py's tell)."""
        said = []
        for key, old in stale.items():
            if key == "deployment_id":  # what `runbook status` shows of this run
                said.append(f"it still names deployment {old}, not {self.deployment_id} (as "
                            "`runbook status` does)")
            elif key == "mirrored":
                said.append("it does not list the state file's copy of this lock (killed now, "
                            "the run leaves a copy the next run may take for another tool's)")
            else:
                said.append(f"its {key} is as before")
        folder = shlex.quote(str(self.path.parent))
        return (f"cannot rewrite {self.path / HOLDER} whole ({exc.strerror or exc}): only its "
                f"times were rewritten in place: {'; '.join(said)}; free disk "
                f"space where {self.path.parent} lives (`df -h {folder}`): the run's next "
                "refresh writes it whole")

    def _refresh_failure(self, exc: OSError) -> str:
        """One line: what failed, when each tool sees the lock expire, and the fix."""
        written = self._written_at or (self.held_since or self.locked_at).timestamp()
        folder = shlex.quote(str(self.path.parent))
        if exc.errno in files.NO_SPACE:
            fix = f"free disk space where {self.path.parent} lives (`df -h {folder}`)"
        elif exc.errno == errno.EROFS:
            fix = f"remount it read-write (`findmnt -T {folder}`)"
        else:
            fix = f"make {self.path} writable again"
        return (f"cannot refresh {self.path} ({exc.strerror or exc}): its files still date "
                f"it {_clock(written)}, so the shell tooling takes this live run's lock for "
                f"expired at {_clock(int(written) + SHELL_STALE_AFTER)} and `runbook status` "
                f"calls it stale from {_clock(written + self.env.lock_stale_after)}; {fix}: "
                "the run's next refresh writes it again")

    def refresh_from_thread(self) -> None:
        """The heartbeat thread's refresh: the directory always; the state file's copy only
        once half its lifetime is gone (a step longer than that: a big restore, migrations)
        and only when no state write of this process is under way. Refreshed by the main
        thread alone, between steps, the copy expired during a 30-minute step, and a tool
        that locks only there (the Go CLI) could take the lock beside this run."""
        self.refresh(mirror=False)
        due = self._mirrored_at + self.env.lock_stale_after / 2
        if not self.published or time.time() < due \
                or not statemod.WRITING.acquire(blocking=False):
            return
        try:
            self._refresh_mirror()
        finally:
            statemod.WRITING.release()

    def _refresh_mirror(self) -> None:
        with statemod.WRITING:
            try:
                self.mirror_error, lost = _mirror(self.env, self._copy(),
                                                  replace_if=self._ours_or_cleared,
                                                  create=self.create_state)
            except statemod.StateChangedError as exc:
                self.mirror_error, lost = exc.message, None
            self.mirror_error = self.mirror_error or self._foreign
            if self.mirror_error is None:
                self._mirrored_at = time.time()
            self.owner_lost = self.owner_lost or lost

    def publish(self, *, create: bool = False, strict: bool = True) -> None:
        """Mirror the lock into the state file for tools that only read that. Done right
        before the first change, so a run refused while planning leaves the file as it was.
        `create`: a missing state file is created for it (a deploy, which writes the file's
        first record anyway); any other run leaves a missing file missing (found by review:
        a refused first switch or restore left a lock-only file, and the rollback then said
        "no current deployment is recorded", not "the state file does not exist").

        Planning and the prompt took time: the lock is checked again here, as is the state
        file, where the Go CLI (which locks nowhere else) may have taken its lock meanwhile.
        Either raises LockedError, and nothing has changed yet; a file that cannot be written
        (its write refused: the immutable attribute, a read-only mount, a full disk) raises
        PreconditionError, exit 4, as the run could not record its change; not `strict` (a
        run that records nothing there: a snapshot restore), it is only said (mirror_error)."""
        try:
            with _guard(self.env):
                self.check_owned()
                try:
                    recorded = _state_lock_mapping(self.env)
                except StateError as exc:  # cannot be read as JSON: no one can tell
                    raise _locked_error(self.env, _unjudged(self.env, exc)) from None
                self._refuse_a_live_state_lock(recorded)
            self.create_state = create
            copy = self._copy()
            with statemod.WRITING:
                self.mirror_error, lost = _mirror(self.env, copy,
                                                  replace_if=self._refuse_a_live_state_lock,
                                                  create=create, strict=strict)
            self._mirrored_at = time.time()
        except statemod.StateWriteError as exc:
            # the run would record what it changed in this same file, by the same rename:
            # found by review, a state file `chattr +i` (or a read-only bind mount of it) let
            # the rollback move traffic, then fail to record it, exit 6, and every rerun the
            # same. Refused here, the last moment before the first change
            raise PreconditionError(
                f"cannot write the state file {self.env.state_file} "
                f"({exc.cause.strerror or exc.cause}): this run could not record its lock nor "
                "what it changes there; nothing was changed", exc.fix) from None
        except statemod.StateChangedError:
            raise LockedError(f"{self.env.state_file} kept changing while this run mirrored "
                              "its lock into it (another tool is writing it); nothing was "
                              "changed", "run the command again in a moment; `runbook status "
                              f"{command_arg(self.env)}` shows who holds the lock") from None
        except LockedError as error:
            error.message += "; nothing was changed"
            error.args = (error.message,)
            raise
        self.published = True
        self.owner_lost = self.owner_lost or lost

    def _ours_or_cleared(self, lock: Mapping[str, Any]) -> bool:
        self._foreign = None  # judged anew on each try (_mirror reads again on a change)
        if self.released:
            return False  # a refresh that outlived the release never puts the copy back
        """The refresh rewrites our copy, and puts it back where another tool's write
        cleared it (the Go CLI saves the whole file it read before this run published: its
        `locked: false` went unnoticed, and that CLI then saw no lock for the rest of the
        run). A live lock of another tool there is left, and said (mirror_error)."""
        if self._mirror_is_ours(lock) or self._left_by_stolen(lock):
            return True
        other = _judge_state_lock(self.env, lock)
        if other is None or other.stealable:
            return True
        holder = other.holder.describe() if other.holder is not None else "another tool"
        self._foreign = (f"the state file now records another tool's lock (held by {holder}), "
                         "taken while this run held the deploy lock")
        return False

    def _refuse_a_live_state_lock(self, lock: Mapping[str, Any] | None) -> bool:
        if lock and not self._mirror_is_ours(lock) and not self._left_by_stolen(lock):
            other = _judge_state_lock(self.env, lock)
            if other is not None and not other.stealable:
                raise _locked_error(self.env, other)
        return True

    def release(self) -> bool:
        return release(self.env, self)

    def check_owned(self) -> None:
        """Raise LockLostError unless the lock directory is still this run's (read-only)."""
        current = _inspect(self.env)
        if (current is None or current.ident != self.ident or current.holder is None
                or current.holder.lock_id != self.lock_id):
            raise LockLostError(f"{self.env.display}: the deploy lock {self.lock_id} is no "
                                "longer held by this run (it was removed or taken over)",
                                "check `runbook status` and who holds the lock before "
                                "changing anything else")

    def _mirror_is_ours(self, lock: Mapping[str, Any]) -> bool:
        """Our copy, even stripped of its lock_id by the Go CLI's rewrite (policy._copy_of):
        taken for another tool's lock, the release left it locked, and every run and unlock
        (--force too) refused until it expired (found by review)."""
        return _copy_of(Holder(lock_id=self.lock_id, locked_by=self.locked_by, pid=self.pid,
                               hostname=self.hostname, reason=self.reason,
                               mirrored=frozenset(self._copies)), lock)

    def _left_by_stolen(self, lock: Mapping[str, Any]) -> bool:
        """The copy the dead holder of the stale lock we took over left, stripped of its
        lock_id (policy._beside judged it so): replaced by ours, never refused."""
        stolen = self.stolen_from.holder if self.stolen_from is not None else None
        return stolen is not None and lock.get("lock_id") is None and _copy_of(stolen, lock)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


LOCK_DIR_FIX = "check [lock] dir in the environment file and its permissions"
LOCK_DIR_MODE = 0o755  # its files are 0644: every operator may read who holds it


def acquire(env: Environment, reason: str, run_id: str | None = None) -> Lock:
    """Take the deploy lock now or raise LockedError naming the holder and the way out."""
    try:
        return _acquire(env, reason, run_id)
    except OSError as exc:
        message = (f"{env.display}: cannot take the deploy lock at {env.lock_path}: "
                   f"{exc.strerror or exc}; nothing was changed")
        raise _read_only_is_the_host(files.write_error(message, exc, env.lock_dir,
                                                       LOCK_DIR_FIX), exc) from None


def _read_only_is_the_host(error: RunbookError, exc: OSError) -> RunbookError:
    """A read-only filesystem where the lock is taken (its directory, its guard beside the
    state file) is the host not ready, as a full disk is: exit 4, precondition, nothing
    changed. It was exit 2, a configuration error (found by review: a read-only bind mount
    of the state file's directory), while README's rows for a write that fails before the
    run say exit 4."""
    if exc.errno == errno.EROFS and error.exit_code == ExitCode.USAGE:
        return PreconditionError(error.message, error.fix)
    return error


def refusing_holder(env: Environment) -> LockStatus | None:
    """The holder `acquire` would refuse on now, or None when it would take the lock: the
    same judgement, read-only, for a dry run that says what the real run would meet (found
    by review: a stale lock whose holder still runs read as free, and a killed writer's
    temp-file-only lock as held)."""
    current = _inspect(env)
    if current is not None and not current.stealable and not _killed_taking_it(current):
        return current
    state_only = _beside(env, current)[1] if current is not None else _state_lock_status(env)
    return state_only if state_only is not None and not state_only.stealable else None


def refusal(env: Environment) -> RunbookError | None:
    """The error `acquire` would raise now (refusing_holder's judgement, worded as the real
    run's), or None when it would take the lock: a dry run raises it, as its run would. A
    stale directory this user may not remove (another user's, in a sticky folder) is refused
    as the take-over's rename is: the dry run said "would be taken over" where the real run
    exited 3 (found by review; a fleet's pre-flight trusts the dry run)."""
    holder = refusing_holder(env)
    if holder is not None:
        return _locked_error(env, holder)
    current = _inspect(env)
    if current is None:
        return None
    if not current.stealable:  # as _acquire words it
        current = dataclasses.replace(current, why=(
            "a run killed while taking it left only its half-written holder file"))
    return _not_ours_to_remove(env, current.path, _beside(env, current)[0])


def _acquire(env: Environment, reason: str, run_id: str | None) -> Lock:
    path = env.lock_path
    stolen: LockStatus | None = None
    tomb: Path | None = None
    corrupt: list[str] = []
    with _guard(env):
        current = _inspect(env)
        if current is None:
            # Tools that lock only in the state file (the Go CLI) must not be trampled either.
            state_only = _state_lock_status(env, corrupt=corrupt)
            if state_only is not None and not state_only.stealable:
                raise _locked_error(env, state_only)
            # an expired lock there is taken over too: said and journaled, as a directory's
            # is (run.perform); it was replaced without a word (found by review)
            stolen = state_only
        elif not current.stealable and not _killed_taking_it(current):
            raise _locked_error(env, current)
        else:
            # (an empty one older than EMPTY_DIR_GRACE is stale, said so: policy._inspect)
            if not current.stealable:  # said as what it is, not as being taken now
                current = dataclasses.replace(current, why=(
                    "a run killed while taking it left only its half-written holder file"))
            # the directory is stale, but a live lock in the state file (the Go CLI's, taken
            # since) is a holder all the same; the directory's own stripped copy is not
            current, state_only = _beside(env, current, corrupt)
            if state_only is not None and not state_only.stealable:
                raise _locked_error(env, state_only)
            tomb = _entomb(path, current.ident, env=env, judged=current)
            stolen = current
        # The stale lock stays aside (renamed, whole) until the new one stands: a takeover
        # that fails (a full /tmp) puts it back, so "nothing was changed" is true; it was
        # removed first, and its holder.json was lost with it (found by review).
        try:
            lock = _make(env, path, reason, run_id, stolen)
        except FileExistsError:
            # Someone outside the guard (the shell tooling) got in first; what was stale stays
            # removed (it was judged so, and the name is theirs now).
            if tomb is not None:
                shutil.rmtree(tomb, ignore_errors=True)
            other = _inspect(env) or current
            if other is None:
                raise LockedError(f"{env.display}: the deploy lock was taken at this moment",
                                  "run `runbook status` and try again") from None
            raise _locked_error(env, other) from None
        except BaseException:
            if tomb is not None:
                _put_back(path, tomb)
            raise
        if tomb is not None:
            shutil.rmtree(tomb, ignore_errors=True)
    lock.state_warning = corrupt[0] if corrupt else None
    return lock


def _make(env: Environment, path: Path, reason: str, run_id: str | None,
          stolen: LockStatus | None) -> Lock:
    """mkdir, not files.atomic_write: its failing when the directory exists is the exclusion
    itself (and what the deploy script does); a rename would overwrite. Its mode is set
    whatever the umask: made 0700 under umask 077 (root's cron, Ansible), no other operator
    could read who holds it (found by review)."""
    os.mkdir(path, LOCK_DIR_MODE)
    ident: Ident | None = None
    try:
        st = files.set_dir_mode(path, LOCK_DIR_MODE)
        ident = (st.st_dev, st.st_ino)
        now = time.time()
        locked_at = _from_epoch(now)
        run_id = run_id or statemod.new_id("run")
        lock = Lock(
            env=env, path=path, lock_id=statemod.new_id("lock"), run_id=run_id,
            deployment_id=run_id, reason=reason,
            locked_by=statemod.current_operator(), pid=os.getpid(),
            hostname=socket.gethostname(), locked_at=locked_at,
            expires_at=locked_at + timedelta(seconds=env.lock_stale_after),
            ident=ident, stolen_from=stolen, held_since=locked_at,
        )
        _write_lock_files(path, lock, now)
        lock._written_at = now
    except BaseException:
        # (an interrupt right after the mkdir too: an empty lock left here needed --force)
        try:
            if ident is None:
                os.rmdir(path)  # still empty: nothing was written into it
            else:
                _remove_dir(path, ident)
        except OSError:
            shutil.rmtree(path, ignore_errors=True)  # ours, made just now under the guard
        raise
    return lock


def _put_back(path: Path, tomb: Path) -> None:
    """The stale lock back under its name, unless another tool took the name meanwhile: a
    plain rename replaces a directory that is still empty, the shell tooling's lock the
    instant after its `mkdir` (found by review), so it is renameat2(RENAME_NOREPLACE); where
    that is not available, the stale lock stays renamed aside (it was judged removable)."""
    if not _rename_noreplace(tomb, path):
        shutil.rmtree(tomb, ignore_errors=True)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(source: Path, target: Path) -> bool:
    """rename(2) that fails when `target` exists; False when it did not rename."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    return bool(renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                          _RENAME_NOREPLACE) == 0)


def release(env: Environment, lock: Lock, *, clear_stolen_copy: bool = False) -> bool:
    """Remove our lock; False when it was no longer ours (it is then left alone).
    `clear_stolen_copy`: no run is left unfinished (no intent record), so the copy of a stale
    lock this one took over may go (`_clear_stolen_copy`); while a killed run's record waits,
    that copy keeps the Go CLI off the host, and a refused rerun changes nothing."""
    if lock.released:
        return True
    owned = False
    with _guard(env):
        current = _inspect(env)
        if (current is not None and current.ident == lock.ident and current.holder is not None
                and current.holder.lock_id == lock.lock_id):
            _remove_dir(lock.path, lock.ident)
            owned = True
    lock.released = True
    if lock.published:
        with contextlib.suppress(statemod.StateChangedError), statemod.WRITING:
            # (a changed file never replaces the outcome)
            lock.unreleased_copy, _ = _mirror(env, {"locked": False},
                                              replace_if=lock._mirror_is_ours)
    elif lock.stolen_from is not None and clear_stolen_copy:
        _clear_stolen_copy(env, lock)
    return owned


def _clear_stolen_copy(env: Environment, lock: Lock) -> None:
    """A run that took a stale lock over and published nothing (refused while planning)
    clears the copy the dead holder left in the state file: found by a kill fuzz, a rollback
    killed after its last step left it, its rerun had nothing to do, and the copy named the
    dead pid for 30 more minutes, blocking the Go CLI (which reads only that copy) and making
    status ask for an unlock. Only that copy, only while no live holder is judged to hold
    it (another tool's lock taken since stays), and only while it has not expired."""
    stolen = lock.stolen_from
    if stolen is None or stolen.holder is None:
        return

    holder = stolen.holder
    replaced = [False]  # what the last judgement said (_mirror judges again on a change)

    def the_dead_ones(recorded: Mapping[str, Any] | None) -> bool:
        judged = _judge_state_lock(env, recorded) if recorded and recorded.get("locked") \
            and _copy_of(holder, recorded) else None
        # a copy already expired blocks no tool (the Go CLI honours one until it expires):
        # left as it is, so a refused run changes nothing there (a stale expired copy, the
        # deploy script's, was rewritten by a `restore-kept` that refused)
        replaced[0] = judged is not None and judged.stealable and judged.expires_in > 0
        return replaced[0]

    with contextlib.suppress(statemod.StateChangedError), statemod.WRITING:
        failed, _ = _mirror(env, {"locked": False}, replace_if=the_dead_ones)
        if failed is None and replaced[0]:
            lock.cleared_copy = (f"cleared the state file's copy of the stale lock it took over "
                                 f"(held by {stolen.describe()})")


def status(env: Environment) -> LockStatus | None:
    """The lock as it stands, or None when nobody holds it. A stale lock directory never
    hides a live lock the state file records (the Go CLI's): status said "stale, release
    it" and named the standby of that deploy as left running (found by review)."""
    current = _inspect(env)
    if current is not None and not current.stale:
        return current
    if current is None:
        return _state_lock_status(env)
    current, recorded = _beside(env, current)
    return recorded if recorded is not None and not recorded.stale else current


def unlock(env: Environment, force: bool = False, shown: LockStatus | None = None) -> str:
    """`runbook unlock`: remove a stale lock (or our own), or raise LockedError saying why not.

    A lock whose holder is still running on this host is never removed, not even with force
    (runs refresh their lock, so an expired one with a live holder is a hung run: stop that
    process first). Force removes an expired lock whose holder cannot be checked (another host).
    `shown`: the lock the prompt showed (status); only that one is removed, another found by
    then is refused and nothing changes (found by review: a "y" removed whatever stale lock
    had replaced it while the prompt waited).
    """
    with _guard(env):
        current = _inspect(env)
        if current is None:
            corrupt: list[str] = []
            try:
                judged = _state_lock_mapping(env, corrupt)
            except StateError as exc:  # cannot be read as JSON: nothing judged, nothing cleared
                raise _locked_error(env, _unjudged(env, exc), unlocking=True) from None
            state_only = _judge_state_lock(env, judged)
            if state_only is None:
                return (f"{env.display}: no deploy lock is held; nothing to do"
                        + "".join(f" (warning: {why})" for why in corrupt))
            _check_removable(env, state_only, force)
            _check_shown(env, shown, state_only)
            # only the lock judged removable: a file written since (the Go CLI's new lock)
            # is read again by _mirror and left alone; one whose times no tool can read is
            # replaced all the same (_judge_undated_state_lock)
            try:
                failed, _ = _mirror(env, {"locked": False},
                                    replace_if=lambda lock: lock == judged,
                                    lock_as_written=True)
            except statemod.StateChangedError:
                failed = f"{env.state_file} kept changing (another tool writes it)"
            try:
                now = _state_lock_mapping(env)
            except StateError as exc:
                failed, now = failed or exc.message, None
            if failed is not None or (now and now.get("locked")):
                why = failed or "it changed since it was judged (another tool's lock now)"
                raise LockedError(f"{env.display}: the state file's lock was left as it is: "
                                  f"{why}", f"read `runbook unlock {command_arg(env)} --status`, "
                                  "then run this again")
            return (f"{env.display}: cleared the state file's lock ({state_only.why}), held by "
                    f"{state_only.describe()}")
        _check_removable(env, current, force)
        # the prompt may have shown the live lock the state file records beside a stale
        # directory (status): the directory alone goes, as without a prompt; a stale one
        # shown had no directory beside it, so a directory now is another lock
        _check_shown(env, shown, current, *(
            [_beside(env, current)[1]] if shown and not shown.stale
            and shown.source != current.source else []))
        if current.stale:  # its copy stripped by the Go CLI goes with it: said (_beside)
            current = _beside(env, current)[0]
        tomb = _entomb(env.lock_path, current.ident, env=env, judged=current)
        shutil.rmtree(tomb, ignore_errors=True)
    removed = current.holder

    def removed_ones(lock: Mapping[str, Any]) -> bool:
        # the removed directory's mirror (stripped of its lock_id by the Go CLI's rewrite
        # too), or a lock nobody holds any more; never a live lock another tool (the Go CLI)
        # recorded in the state file alone
        if removed is not None and _copy_of(removed, lock):
            return True
        judged = _judge_state_lock(env, lock)
        # with --force, also an expired copy whose pid may be reused (no start time: the
        # shell tooling's): kept, it blocked every run, and --force too, for ever
        return judged is None or judged.stealable or (
            force and judged.stale and judged.pid_unverified) or (
            # with --force, the copy of a directory dated in the future, dated as it is (the
            # clock was ahead for both): kept, it took a second --force (found by review)
            force and current.undated and judged.undated and _same_time(current, judged))

    note = ""
    try:
        _mirror(env, {"locked": False}, replace_if=removed_ones)
    except statemod.StateChangedError:
        note = f"; {env.state_file} kept changing, so its copy of the lock was left as it is"
    what = ("our own lock" if current.is_ours else
            f"{'a' if current.undated else 'a stale'} lock ({current.why})")
    return f"{env.display}: removed {what}, held by {current.describe()}{note}"


def _same_time(one: LockStatus, other: LockStatus) -> bool:
    """Taken at the same moment (a lock directory and its state-file copy)."""
    return (one.locked_at is not None and other.locked_at is not None
            and abs((one.locked_at - other.locked_at).total_seconds()) <= MIRROR_MATCH)


def _which(lock: LockStatus) -> tuple[object, ...]:
    """What tells one lock from another: where it is recorded, its directory (by inode), its
    holder's lock_id, and without one (the shell tooling's, the Go CLI's) when it was taken."""
    lock_id = lock.holder.lock_id if lock.holder is not None else None
    return lock.source, lock.ident, lock_id, None if lock_id else lock.locked_at


def _check_shown(env: Environment, shown: LockStatus | None, *found: LockStatus | None) -> None:
    if shown is None or any(f is not None and _which(f) == _which(shown) for f in found):
        return
    raise LockedError(f"{env.display}: the lock changed while the prompt waited: "
                      f"{found[0].describe() if found[0] else 'another'} holds it now, not "
                      f"{shown.describe()}; nothing was removed",
                      f"run `runbook unlock {command_arg(env)}` again to see the new holder")


@contextlib.contextmanager
def _guard(env: Environment) -> Iterator[None]:
    """Serialize inspect-and-steal among runbook processes; the kernel frees it on death.

    The guard file sits beside the state file, a directory only the deploying users may
    write: in a world-writable lock directory (/tmp) another local user could pre-create it
    and hold its flock to block every run.
    """
    guard = guard_path(env)
    # a file there (or on its way): mkdir's "File exists" or "Not a directory" said nothing
    # useful (met when releasing too: nothing here says "nothing was changed")
    if (unusable := lock_dir_refusal(env, before=False)) is not None:
        raise unusable
    try:
        env.lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # also met when releasing, after a run's changes: nothing here says "nothing changed"
        message = f"{env.display}: cannot use the lock directory {env.lock_dir}: " \
                  f"{exc.strerror or exc}"
        raise _read_only_is_the_host(files.write_error(message, exc, env.lock_dir,
                                                       LOCK_DIR_FIX), exc) from None
    if (refused := files.link_refusal(env.state_file, "the state file", "[state] file")):
        # the guard sits beside the state file: never `mkdir -p` under an empty mount point
        # (met when releasing too: nothing here says "nothing was changed")
        raise PreconditionError(f"{env.display}: {refused[0]}", refused[1])
    try:
        guard.parent.mkdir(parents=True, exist_ok=True)
        fd = files.open_guard(guard)
    except OSError as exc:
        # the guard sits beside the state file, not in [lock] dir: name where it is (a
        # read-only /opt named "/tmp is on a read-only filesystem")
        message = (f"{env.display}: cannot open the deploy lock's guard {guard} (beside the "
                   f"state file): {exc.strerror or exc}")
        raise _read_only_is_the_host(files.guard_error(
            message, exc, guard, f"let the deploying user write {guard.parent} (the state "
            "file's directory), or create the guard file there once: "
            f"`touch {shlex.quote(str(guard))}`"), exc) from None
    try:
        if not files.flock_within(fd, GUARD_TIMEOUT, 0.01):
            raise _guard_held(env, guard, fd)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _guard_held(env: Environment, guard: Path, fd: int) -> LockedError:
    """Who keeps the guard: a run suspended (Ctrl-Z, SIGSTOP) while its heartbeat held it
    never lets go, and "try again" then never works (found when a drill test stopped a run
    at that instant), so it is named with its two ways out."""
    holders = [pid for pid in procs.flock_holders(os.fstat(fd)) if pid != os.getpid()]
    stopped = [pid for pid in holders if procs.pid_suspended(pid)]
    if stopped:
        return LockedError(f"{env.display}: runbook process {stopped[0]} holds the deploy "
                           "lock's guard and is suspended (Ctrl-Z or SIGSTOP), so it never "
                           "lets go by itself", suspended_fix(stopped[0]))
    who = f"runbook process {holders[0]}" if holders else "another runbook process"
    return LockedError(f"{env.display}: {who} has been inspecting the deploy lock for "
                       f"{GUARD_TIMEOUT:.0f} s", f"find it with `fuser {guard}` and try again")


def guard_path(env: Environment) -> Path:
    state = Path(os.path.realpath(env.state_file))
    return state.with_name(f".{env.lock_path.name}.guard")


def _entomb(path: Path, ident: Ident | None, *, env: Environment | None = None,
            judged: LockStatus | None = None) -> Path:
    """Rename the judged directory away; refuse if the name now points at another one."""
    tomb = path.with_name(f".{path.name}.stale-{secrets.token_hex(6)}")
    try:
        os.rename(path, tomb)
    except FileNotFoundError:
        raise LockedError(f"{path} vanished while it was being taken over",
                          "run again") from None
    except PermissionError as exc:
        if env is not None and judged is not None:
            refused = _not_ours_to_remove(env, path, judged)
            if refused is not None:
                raise refused from exc
        raise
    st = os.lstat(tomb)
    if ident is not None and (st.st_dev, st.st_ino) != ident:
        # A fresh lock replaced the stale one between judging and renaming: put it back.
        with contextlib.suppress(OSError):
            os.rename(tomb, path)
        raise LockedError(f"{path} was re-created by another process while it was being "
                          "taken over", "run `runbook status` to see who holds it")
    if judged is not None and judged.empty and _only_our_temp_files(tomb) is None:
        # judged empty, filled since: a tool stalled between its mkdir and its locked_at (a
        # Ctrl-Z'd deploy.sh) wrote it during the takeover; its lock now (found by review)
        with contextlib.suppress(OSError):
            os.rename(tomb, path)
        raise LockedError(f"{path} was empty, but its holder wrote its lock file into it "
                          "while it was being taken over", "run `runbook status` to see who "
                          "holds it")
    return tomb


def _not_ours_to_remove(env: Environment, path: Path,
                        judged: LockStatus) -> LockNotRemovable | None:
    """The contract's lock lives in /tmp, which is sticky: a lock another user's crashed run
    left there may be removed by that user or root only. It was exit 2, "check [lock] dir in
    the environment file", which names neither who owns it nor the way out."""
    try:
        owner = os.lstat(path).st_uid
        folder = os.stat(path.parent)
    except OSError:
        return None
    # in a sticky folder the file's owner, the folder's and root may rename it (CAP_FOWNER;
    # a root run never gets here): judged so before any rename too (refusal, unlock's check)
    if not folder.st_mode & stat.S_ISVTX or os.geteuid() in (0, owner, folder.st_uid):
        return None
    who = files.owner_name(owner)
    return LockNotRemovable(
        f"{env.display}: the deploy lock {path} "
        f"{f'is stale, {judged.why},' if judged.stale else f'names no holder ({judged.why}),'}"
        " but it belongs to "
        f"{who} and {path.parent} is sticky: only its owner or root may remove it; nothing "
        "was changed",
        f"check that no deploy of {who} still runs (`ps -u {owner} -o pid,lstart,args`), "
        f"then remove it as root: `sudo rm -r {shlex.quote(str(path))}`, and run again")


def _remove_dir(path: Path, ident: Ident | None) -> None:
    """Atomic removal: readers see the whole lock or none, never a half-deleted one."""
    try:
        tomb = _entomb(path, ident)
    except LockedError:
        return
    shutil.rmtree(tomb, ignore_errors=True)


MIRRORED_KEPT = 64  # copies listed in holder.json: older ones have expired (one a refresh)


def _holder_bytes(lock: Lock) -> bytes:
    return (json.dumps(lock.holder_json(), indent=2) + "\n").encode()


def _write_lock_files(path: Path, lock: Lock, now: float) -> None:
    """Inside the lock directory (made by mkdir, which is what excludes a second holder): these
    files are only read, so a plain atomic replace (as every file the runbook writes) will do."""
    # holder.json first: a run killed between the two leaves a lock naming its (dead) pid,
    # which the next run takes over at once; the other way round it left a bare `locked_at`,
    # read as the shell tooling's, that blocked every run (and --force) for its lifetime. The
    # shell tooling takes a directory without `locked_at` for one being taken: never stolen
    files.atomic_write(path / HOLDER, _holder_bytes(lock))
    files.atomic_write(path / LOCKED_AT, f"{int(now)}\n".encode())


def _rewrite_in_place(path: Path, lock: Lock, now: float) -> dict[str, Any]:
    """The new times written over the old ones in both lock files, each the same number of
    bytes at the same offset: no block is allocated, so a full disk (or quota) takes it where
    the replace's temp file got none (tmpfs, ext4, xfs; a copy-on-write filesystem may still
    refuse). Only the times change (holder.json's other fields stay as last written): the
    files stay what the shell tooling (`locked_at`, epoch seconds) and every runbook read.
    Returns holder.json's other fields that differ from what `lock` would write, as the file
    holds them (for_deployment's new id, a copy `mirrored` does not list): the caller says
    so. ValueError where a file is not as written (its times not found, or of another
    width)."""
    holder = path / HOLDER
    data = files.read_regular(holder, LOCK_FILE_MAX)
    new = bytearray(data)
    first, last = len(data), 0
    for key, value in (("locked_at", lock.locked_at), ("expires_at", lock.expires_at)):
        # a top-level key (indent=2, _holder_bytes), not text inside another field's value
        found = re.search(rb'\n  "' + key.encode() + rb'": "([^"\\]*)"', data)
        if found is None:
            raise ValueError(f"{holder}: no {key} to rewrite")
        new[found.start(1):found.end(1)] = _same_width(value, found.end(1) - found.start(1))
        first, last = min(first, found.start(1)), max(last, found.end(1))
    parsed = json.loads(bytes(new))
    if not isinstance(parsed, dict) or parsed.get("lock_id") != lock.lock_id:  # whole, ours
        raise ValueError(f"{holder}: not this run's")
    stamp = f"{int(now)}\n".encode()
    if os.stat(path / LOCKED_AT).st_size != len(stamp):
        raise ValueError(f"{path / LOCKED_AT}: not {len(stamp)} bytes")
    # holder.json first, as _write_lock_files; one write for both times: never read apart
    _overwrite(holder, bytes(new[first:last]), first)
    _overwrite(path / LOCKED_AT, stamp, 0)
    return _left_stale(parsed, lock.holder_json())


def _left_stale(written: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """holder.json's fields, as `written` (the file, its new times in), that are not what
    `wanted` says. `mirrored` lists the state file's copies: one it lacks is stale unless it
    is the file's own times (policy._copy_of reads both, as times: a time rewritten in place
    is of the old one's width), as after a refresh that mirrors."""
    stale = {key: written.get(key) for key in sorted(wanted.keys() | written.keys())
             if key not in ("locked_at", "expires_at", "mirrored")
             and written.get(key) != wanted.get(key)}
    listed = written.get("mirrored")
    known = {_times(pair) for pair in (listed if isinstance(listed, list) else [])}
    known.add(_times([written.get("locked_at"), written.get("expires_at")]))
    if any(_times(pair) not in known for pair in wanted["mirrored"]):
        stale["mirrored"] = listed
    return stale


def _times(pair: Any) -> tuple[datetime | None, ...]:
    """A [locked_at, expires_at] pair of holder.json as times; None for what is not one."""
    def parsed(text: Any) -> datetime | None:
        try:
            return statemod.parse_time(text) if isinstance(text, str) else None
        except ValueError:
            return None

    return tuple(parsed(t) for t in pair) if isinstance(pair, list) else (None,)


def _same_width(value: datetime, width: int) -> bytes:
    """`value` as RFC 3339 in `width` characters: with microseconds (27) or without (20)."""
    for spec in ("microseconds", "seconds"):
        text = value.astimezone(UTC).isoformat(timespec=spec).removesuffix("+00:00") + "Z"
        if len(text) == width:
            return text.encode()
    raise ValueError(f"no time {width} characters wide")


def _overwrite(path: Path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        if os.pwrite(fd, data, offset) != len(data):
            raise OSError(errno.EIO, f"short write to {path}")
    finally:
        os.close(fd)


SHELL_STALE_AFTER = 1800  # seconds: the shell tooling's locks are stale so old (CONTRACTS)


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(epoch))


_MIRROR_TRIES = 3


def _mirror(env: Environment, lock: Mapping[str, Any], *,
            replace_if: Callable[[Mapping[str, Any]], bool],
            create: bool = False, lock_as_written: bool = False,
            strict: bool = False) -> tuple[str | None, str | None]:
    """Best effort: the directory is the lock; the state file only reports it to other tools.

    With no state file (a host's first deploy, `create`) a held lock's copy creates it,
    never over a file another tool created meanwhile: the contract mirrors the lock there,
    and the Go CLI reads nothing else (it saw no lock for the whole run). A release writes
    no new file.

    `lock_as_written`: the file's lock is read as written when its own fields are refused
    (unlock replacing a lock whose times cannot be read); every other record still strictly.

    Returns (why the mirror failed, what of the file's owner and group its rewrite could not
    keep): the publish is a run's first rewrite of the state file, so that is where a writer
    that is not the file's owner changes it, and where the run must hear of it.
    `strict`: a write the file system refuses raises its StateWriteError (publish refuses the
    run on it), a file that cannot be read is still only said."""
    path = env.state_file
    changed = statemod.StateChangedError(f"{path} kept changing", "")
    for _ in range(_MIRROR_TRIES):
        if not path.exists() and not (create and lock.get("locked")):
            return None, None
        try:
            current = (statemod.read_state(path, environment=env.name,
                                           lock_as_written=lock_as_written) if path.exists()
                       else statemod.absent(path, environment=env.name))
            if not replace_if(current.lock):
                return None, None
            return None, statemod.write_state(path, statemod.with_lock(current, lock))
        except statemod.StateChangedError as exc:
            # another tool wrote the file since it was read (the Go CLI taking its lock):
            # read it again, so `replace_if` judges what is there now (publish refuses a
            # live foreign lock); passed over, the run went on beside that lock
            changed = exc
            continue
        except statemod.StateWriteError as exc:
            if strict:
                raise
            return str(exc), None
        except StateError as exc:
            return str(exc), None
        except OSError as exc:
            return f"{path}: {exc.strerror or exc}", None
    raise changed  # still changing: the caller decides (publish refuses)


def _check_removable(env: Environment, current: LockStatus, force: bool) -> None:
    """Refuse what `unlock` may not remove: by the lock's policy, then a directory this user
    may not rename away (another user's, in a sticky folder: status offered `runbook unlock`
    for it, which the rename then refused; found by review)."""
    _check_policy(env, current, force)
    if current.source == "directory" and not current.is_ours:
        refused = _not_ours_to_remove(env, current.path, current)
        if refused is not None:
            raise refused


def _check_policy(env: Environment, current: LockStatus, force: bool) -> None:
    if current.is_ours or current.stealable:
        return
    if force and current.stale and (current.holder_alive is not True
                                    or current.pid_unverified):
        return  # (a pid known without its start time may be reused: on-call checked it)
    if force and current.undated:
        return  # dated in the future: on-call checked that no deploy runs
    if current.refused is not None:  # the state file cannot be read for good: exit 4
        raise current.refused
    # (an empty one older than EMPTY_DIR_GRACE is stale, so removed above without --force: the
    # next run takes it over by itself; younger, _locked_error says it is being taken)
    if current.broken:
        raise LockedError(f"{current.why}; not touching it",
                          current.fix or f"remove {current.path} by hand")
    raise _locked_error(env, current, unlocking=True)


def removal_refusal(env: Environment, current: LockStatus,
                    force: bool) -> RunbookError | None:
    """What `runbook unlock` (with `force` or not) would say of `current`, or None when it
    would remove it: the same judgement, read-only, for status's fix (which offered
    "add --force" for a live holder, refused even so: found by review)."""
    try:
        _check_removable(env, current, force)
    except (LockedError, StateError) as exc:
        return exc
    return None


def _killed_taking_it(current: LockStatus) -> bool:
    """A lock directory holding only our own writer's temp files (a run killed inside its
    holder.json write), seen under the guard: every runbook takes the lock under it, so no
    one is writing them now, and the shell tooling never writes such files. It read as the
    shell tooling's lock, and blocked every run for 30 minutes (found by review). An empty
    directory is not this: it may be the shell tooling's, the instant after its mkdir."""
    if current.source != "directory" or current.broken or current.holder is not None:
        return False
    return bool(_only_our_temp_files(current.path))


def _locked_error(env: Environment, current: LockStatus, *,
                  unlocking: bool = False) -> RunbookError:
    """LockedError (exit 3) naming the holder; a state file that cannot be read for good is
    its own refusal instead (exit 4: policy._unjudged)."""
    if current.refused is not None:
        return current.refused
    name = command_arg(env)
    if current.broken:
        return LockedError(f"{env.display}: the deploy lock cannot be used: {current.why}",
                           current.fix or f"remove {current.path} by hand if nothing uses it")
    if current.empty and not current.stale and not current.undated:
        # never "wait for that run (it expires in 30 min)", nor --force: in seconds it names
        # its holder, or it is a killed run's and the next run takes it over (found by review)
        return LockedError(
            f"{env.display}: the deploy lock {current.path} is being taken at this moment: "
            f"its directory is still empty, {rough_duration(current.age)} old",
            f"wait a few seconds: the run taking it names itself in it (`runbook status "
            f"{name}`); if it stays empty (a run killed while taking it), the next rollback, "
            f"deploy or switch takes it over by itself once it is {EMPTY_DIR_GRACE:.0f} s old")
    where = "" if current.source == "directory" else " (recorded only in the state file)"
    message = (f"{env.display}: the deploy lock{where} is held by {current.describe()}; "
               f"{current.why}")
    if current.suspended and current.pid is not None:
        message += (f"; its process {current.pid} is suspended (Ctrl-Z or SIGSTOP), so it "
                    "never ends by itself")
        fix = ("the lock is never removed under it, not even with --force: "
               if unlocking else "") + suspended_fix(current.pid)
    elif (current.stale or current.undated) and current.pid_unverified:
        pid = current.pid or "?"
        fix = (f"its process {pid} looks alive, but by its pid alone: if that is the deploy "
               f"(`sudo ps -o pid,lstart,args -p {pid}`: as root, which /proc's hidepid does "
               f"not hide from), let it finish; if it is not (its pid was reused), remove the "
               f"lock with `runbook unlock {name} --force`")
    elif current.undated:
        fix = (f"if no deploy is running on this host (its age cannot be told), remove it "
               f"with `runbook unlock {name} --force`")
    elif current.stale and current.holder_alive:
        pid = current.pid or "?"
        fix = (f"its process {pid} is still running, so the lock is never removed, not even "
               f"with --force: if that run hangs, stop it (kill {pid}); its lock is then stale "
               "and the next run takes it over")
    elif current.pid is None and current.source == "directory" and _expires(current):
        # a shell tool's lock (only `locked_at`): nothing tells whether its run goes on, and
        # on-call was left up to 30 minutes with no way out named (found by review)
        fix = ("it names no process (a shell tool's lock holds only its `locked_at`), so "
               "whether its run still goes on cannot be told: check that no deploy runs on "
               "this host (`pgrep -af deploy`, `ps -ef`); if none does, remove it by hand "
               f"(`rm -r {shlex.quote(str(current.path))}`) and run again; else wait for it to "
               f"finish (it expires in {rough_duration(current.expires_in)})")
    elif unlocking:
        fix = ("a live lock is never removed, not even with --force: wait for that run to "
               "finish " + (f"(it expires in {rough_duration(current.expires_in)} if it "
                            "crashed)" if _expires(current) else
                            f"(its process {current.pid or '?'} still runs)"))
    else:
        fix = (f"wait for that run to finish; if it crashed, `runbook unlock {name}` removes it "
               "once it is stale " + (f"(in {rough_duration(current.expires_in)})"
                                      if _expires(current) else
                                      f"(once its process {current.pid or '?'} has exited)"))
    return LockedError(message, fix)


def _expires(current: LockStatus) -> bool:
    """Whether a live lock has an expiry to name: one whose times cannot be read has none
    (held by a running process, it is stale once that exits), never "in never"."""
    return current.expires_in != float("inf")
