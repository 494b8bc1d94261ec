"""The per-environment deploy lock, shared with the shell tooling.

The lock is the directory `env.lock_path` (what the deploy script mkdirs), holding `locked_at`
(epoch seconds, which the shell tooling reads) and `holder.json` (who, why, which process),
mirrored into the state file's `lock` object for tools that only read that. What the old
tooling got wrong and this module does not:

- a crashed holder's lock expires (after env.lock_stale_after) and a lock whose process died
  on this host is stale at once; a lock held by a live process is never removed, not even with
  force;
- stealing a stale lock is race-free: contenders on this host serialize on an flock'd guard
  file, and the stale directory is renamed away and checked by inode before a new one is made,
  so a lock someone else just created is never the one taken away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from runbook import files, procs
from runbook import state as statemod
from runbook.environment import Environment
from runbook.errors import ConfigError, LockedError, StateError
from runbook.times import rough_duration

LOCKED_AT = "locked_at"
HOLDER = "holder.json"
GUARD_TIMEOUT = 10.0  # seconds; the guarded sections take milliseconds
FUTURE_SLACK = 300.0  # a locked_at further in the future than this is not believed

Ident = tuple[int, int]  # (st_dev, st_ino): which directory, not just which name


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as holder.json (or the state file's lock object) says."""

    lock_id: str | None = None
    locked_by: str | None = None
    pid: int | None = None
    hostname: str | None = None
    reason: str | None = None
    deployment_id: str | None = None
    locked_at: datetime | None = None
    expires_at: datetime | None = None
    pid_start: int | None = None  # /proc start time, so a reused pid is not taken for alive

    def describe(self) -> str:
        who = self.locked_by or "an unknown user"
        where = []
        if self.pid is not None:
            where.append(f"pid {self.pid}")
        if self.hostname:
            where.append(f"on {self.hostname}")
        text = f"{who} ({' '.join(where)})" if where else who
        if self.reason:
            text += f" for {self.reason!r}"
        if self.deployment_id:
            text += f", run {self.deployment_id}"
        return text


@dataclass(frozen=True)
class LockStatus:
    """What is known about a held lock, and whether it may be taken over."""

    path: Path
    source: str  # "directory", or "state file" for a lock only the state file records
    holder: Holder | None  # None: created by the shell tooling (only locked_at)
    locked_at: datetime | None
    age: float  # seconds
    stale: bool
    why: str  # why it is (not) stale, in words
    holder_alive: bool | None  # None: cannot tell (no pid, or another host)
    expires_in: float  # seconds until it expires (<= 0 when expired)
    ident: Ident | None = None
    state_lock: Mapping[str, Any] | None = None  # the state file's mirror, for messages
    broken: bool = False  # something that is not a lock directory sits at the path

    @property
    def legacy(self) -> bool:
        return self.holder is None

    @property
    def stealable(self) -> bool:
        """Stale and not demonstrably still running: safe to take without asking."""
        return self.stale and self.holder_alive is not True

    @property
    def is_ours(self) -> bool:
        h = self.holder
        return (h is not None and h.pid == os.getpid() and h.hostname == socket.gethostname())

    def describe(self) -> str:
        if self.holder is not None:
            who = self.holder.describe()
        elif self.state_lock and self.state_lock.get("locked"):
            who = "the shell tooling (" + _state_holder(self.state_lock).describe() + ")"
        else:
            who = "the shell tooling (no holder recorded)"
        since = (f" since {statemod.format_time(self.locked_at)} ({rough_duration(self.age)} ago)"
                 if self.locked_at else "")
        return f"{who}{since}"


@dataclass
class Lock:
    """A lock this process holds. Use as a context manager, or call release()."""

    env: Environment
    path: Path
    lock_id: str
    deployment_id: str
    reason: str
    locked_by: str
    pid: int
    hostname: str
    locked_at: datetime
    expires_at: datetime
    ident: Ident
    mirror_error: str | None = None  # the state-file mirror failed; the lock itself holds
    stolen_from: LockStatus | None = None  # the stale lock this one replaced
    released: bool = field(default=False)
    published: bool = field(default=False)  # mirrored into the state file

    def holder_json(self) -> dict[str, Any]:
        return {
            "lock_id": self.lock_id,
            "locked_by": self.locked_by,
            "pid": self.pid,
            "hostname": self.hostname,
            "reason": self.reason,
            "deployment_id": self.deployment_id,
            "locked_at": statemod.format_time(self.locked_at),
            "expires_at": statemod.format_time(self.expires_at),
            "pid_start": procs.pid_start(self.pid),
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
            "pid": self.pid,
            "hostname": self.hostname,
            "reason": self.reason,
        }

    def refresh(self, *, mirror: bool = True) -> None:
        """Restart the expiry clock, so a long step is not mistaken for a crashed run.

        mirror=False touches only the lock directory: safe from a background thread while
        the main thread may be writing the state file.
        """
        with _guard(self.env):
            self._check_owned()
            now = time.time()
            self.locked_at = _from_epoch(now)
            self.expires_at = self.locked_at + timedelta(seconds=self.env.lock_stale_after)
            _write_lock_files(self.path, self, now)
        if mirror and self.published:
            self.mirror_error = _mirror(self.env, self.state_json(),
                                        replace_if=self._mirror_is_ours)

    def publish(self) -> None:
        """Mirror the lock into the state file for tools that only read that. Done right
        before the first change, so a run refused while planning leaves the file as it was."""
        self.published = True
        self.mirror_error = _mirror(self.env, self.state_json(), replace_if=lambda _: True)

    def release(self) -> bool:
        return release(self.env, self)

    def _check_owned(self) -> None:
        current = _inspect(self.env)
        if (current is None or current.ident != self.ident or current.holder is None
                or current.holder.lock_id != self.lock_id):
            raise LockedError(f"{self.env.display}: the deploy lock {self.lock_id} is no longer "
                              "held by this run (it was removed or taken over)",
                              "stop and check `runbook status` before changing anything else")

    def _mirror_is_ours(self, lock: Mapping[str, Any]) -> bool:
        return lock.get("lock_id") == self.lock_id

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# Public API


def acquire(env: Environment, reason: str, run_id: str | None = None) -> Lock:
    """Take the deploy lock now or raise LockedError naming the holder and the way out."""
    try:
        return _acquire(env, reason, run_id)
    except OSError as exc:
        raise ConfigError(f"{env.display}: cannot take the deploy lock at {env.lock_path}: "
                          f"{exc.strerror or exc}",
                          "check [lock] dir in the environment file and its permissions") from None


def _acquire(env: Environment, reason: str, run_id: str | None) -> Lock:
    path = env.lock_path
    stolen: LockStatus | None = None
    with _guard(env):
        current = _inspect(env)
        if current is None:
            # Tools that lock only in the state file (the Go CLI) must not be trampled either.
            state_only = _state_lock_status(env)
            if state_only is not None and not state_only.stealable:
                raise _locked_error(env, state_only)
        elif not current.stealable:
            raise _locked_error(env, current)
        else:
            tomb = _entomb(path, current.ident)
            shutil.rmtree(tomb, ignore_errors=True)
            stolen = current
        try:
            # mkdir, not files.atomic_write: its failing when the directory exists is the
            # exclusion itself (and what the deploy script does); a rename would overwrite.
            os.mkdir(path, 0o755)
        except FileExistsError:
            # Someone outside the guard (the shell tooling) got in first.
            other = _inspect(env) or current
            if other is None:
                raise LockedError(f"{env.display}: the deploy lock was taken at this moment",
                                  "run `runbook status` and try again") from None
            raise _locked_error(env, other) from None
        now = time.time()
        st = os.stat(path)
        locked_at = _from_epoch(now)
        lock = Lock(
            env=env, path=path, lock_id=statemod.new_id("lock"),
            deployment_id=run_id or statemod.new_id("run"), reason=reason,
            locked_by=statemod.current_operator(), pid=os.getpid(),
            hostname=socket.gethostname(), locked_at=locked_at,
            expires_at=locked_at + timedelta(seconds=env.lock_stale_after),
            ident=(st.st_dev, st.st_ino), stolen_from=stolen,
        )
        try:
            _write_lock_files(path, lock, now)
        except OSError:
            _remove_dir(path, lock.ident)
            raise
    return lock


def release(env: Environment, lock: Lock) -> bool:
    """Remove our lock; False when it was no longer ours (it is then left alone)."""
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
        _mirror(env, {"locked": False}, replace_if=lock._mirror_is_ours)
    return owned


def status(env: Environment) -> LockStatus | None:
    """The lock as it stands, or None when nobody holds it."""
    return _inspect(env) or _state_lock_status(env)


def unlock(env: Environment, force: bool = False) -> str:
    """`runbook unlock`: remove a stale lock (or our own), or raise LockedError saying why not.

    A lock whose holder is still running on this host is never removed, not even with force
    (runs refresh their lock, so an expired one with a live holder is a hung run: stop that
    process first). Force removes an expired lock whose holder cannot be checked (another host).
    """
    with _guard(env):
        current = _inspect(env)
        if current is None:
            state_only = _state_lock_status(env)
            if state_only is None:
                return f"{env.display}: no deploy lock is held; nothing to do"
            _check_removable(env, state_only, force)
            _mirror(env, {"locked": False}, replace_if=lambda _: True)
            return (f"{env.display}: cleared the state file's lock ({state_only.why}), held by "
                    f"{state_only.describe()}")
        _check_removable(env, current, force)
        _remove_dir(env.lock_path, current.ident)
    holder_id = current.holder.lock_id if current.holder else None
    _mirror(env, {"locked": False},
            replace_if=lambda lock: holder_id is None or lock.get("lock_id") in (None, holder_id))
    what = "our own lock" if current.is_ours else f"a stale lock ({current.why})"
    return f"{env.display}: removed {what}, held by {current.describe()}"


# ---------------------------------------------------------------------------------------------
# Inspection


def _inspect(env: Environment, now: float | None = None) -> LockStatus | None:
    now = time.time() if now is None else now
    path = env.lock_path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    ident = (st.st_dev, st.st_ino)
    if not os.path.isdir(path) or os.path.islink(path):
        return LockStatus(path=path, source="directory", holder=None, locked_at=None, age=0.0,
                          stale=False, why=f"{path} is not a lock directory", holder_alive=None,
                          expires_in=float("inf"), ident=ident, broken=True)
    holder = _read_holder(path / HOLDER)
    epoch = None
    if holder is not None and holder.locked_at is not None:
        epoch = holder.locked_at.timestamp()
    basis = "holder.json"
    if epoch is None:
        epoch, basis = _read_locked_at(path / LOCKED_AT), "locked_at"
    if epoch is None or epoch > now + FUTURE_SLACK:
        # Not written yet (being acquired), or garbage: the directory's own age decides.
        epoch, basis = st.st_mtime, "the directory's mtime"
    state_lock = None if holder is not None else _state_lock_mapping(env)
    return _judge(env, path, "directory", holder, epoch, basis, now, ident, state_lock)


def _judge(env: Environment, path: Path, source: str, holder: Holder | None, epoch: float,
           basis: str, now: float, ident: Ident | None,
           state_lock: Mapping[str, Any] | None, expires: float | None = None) -> LockStatus:
    age = now - epoch
    deadline = expires if expires is not None else epoch + env.lock_stale_after
    expires_in = deadline - now
    alive = None
    pid = holder.pid if holder is not None else None
    if holder is not None and pid is not None and holder.hostname == socket.gethostname():
        alive = procs.pid_alive(pid, holder.pid_start)
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
                      locked_at=_from_epoch(epoch), age=max(age, 0.0), stale=stale, why=why,
                      holder_alive=alive, expires_in=expires_in, ident=ident,
                      state_lock=state_lock)


def _state_lock_mapping(env: Environment) -> Mapping[str, Any] | None:
    try:
        return statemod.read_state(env.state_file).lock
    except StateError:
        return None


def _state_lock_status(env: Environment, now: float | None = None) -> LockStatus | None:
    """A lock recorded only in the state file (the Go CLI locks nowhere else)."""
    now = time.time() if now is None else now
    lock = _state_lock_mapping(env)
    if not lock or not lock.get("locked"):
        return None
    holder = _state_holder(lock)
    epoch = holder.locked_at.timestamp() if holder.locked_at else None
    expires = holder.expires_at.timestamp() if holder.expires_at else None
    if epoch is None:
        epoch = expires - env.lock_stale_after if expires is not None else 0.0
    return _judge(env, env.state_file, "state file", holder, epoch, "the state file", now,
                  None, lock, expires)


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

    pid = lock.get("pid")
    return Holder(lock_id=text("lock_id"), locked_by=text("locked_by"),
                  pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
                  hostname=text("hostname"), reason=text("reason"),
                  deployment_id=text("deployment_id"), locked_at=when("locked_at"),
                  expires_at=when("lock_expires_at") or when("expires_at"))


def _read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    holder = _state_holder(data)
    start = data.get("pid_start")
    if isinstance(start, int) and not isinstance(start, bool):
        holder = dataclasses.replace(holder, pid_start=start)
    return holder


def _read_locked_at(path: Path) -> float | None:
    try:
        value = float(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return value if value >= 1_000_000_000 else None  # what the shell tooling also rejects


# ---------------------------------------------------------------------------------------------
# Mechanics


@contextlib.contextmanager
def _guard(env: Environment) -> Iterator[None]:
    """Serialize inspect-and-steal among runbook processes; the kernel frees it on death.

    The guard file sits beside the state file, a directory only the deploying users may
    write: in a world-writable lock directory (/tmp) another local user could pre-create it
    and hold its flock to block every run.
    """
    guard = guard_path(env)
    try:
        env.lock_dir.mkdir(parents=True, exist_ok=True)
        guard.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(guard, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            fd = os.open(guard, os.O_RDONLY)  # another user's guard file: flock still works
    except OSError as exc:
        raise ConfigError(f"{env.display}: cannot use the lock directory {env.lock_dir}: "
                          f"{exc.strerror or exc}",
                          "check [lock] dir in the environment file and its permissions"
                          ) from None
    try:
        deadline = time.monotonic() + GUARD_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockedError(f"{env.display}: another runbook process has been "
                                      f"inspecting the deploy lock for {GUARD_TIMEOUT:.0f} s",
                                      f"find it with `fuser {guard}` and try again") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def guard_path(env: Environment) -> Path:
    state = Path(os.path.realpath(env.state_file))
    return state.with_name(f".{env.lock_path.name}.guard")


def _entomb(path: Path, ident: Ident | None) -> Path:
    """Rename the judged directory away; refuse if the name now points at another one."""
    tomb = path.with_name(f".{path.name}.stale-{secrets.token_hex(6)}")
    try:
        os.rename(path, tomb)
    except FileNotFoundError:
        raise LockedError(f"{path} vanished while it was being taken over",
                          "run again") from None
    st = os.lstat(tomb)
    if ident is not None and (st.st_dev, st.st_ino) != ident:
        # A fresh lock replaced the stale one between judging and renaming: put it back.
        with contextlib.suppress(OSError):
            os.rename(tomb, path)
        raise LockedError(f"{path} was re-created by another process while it was being "
                          "taken over", "run `runbook status` to see who holds it")
    return tomb


def _remove_dir(path: Path, ident: Ident | None) -> None:
    """Atomic removal: readers see the whole lock or none, never a half-deleted one."""
    try:
        tomb = _entomb(path, ident)
    except LockedError:
        return
    shutil.rmtree(tomb, ignore_errors=True)


def _write_lock_files(path: Path, lock: Lock, now: float) -> None:
    """Inside the lock directory (made by mkdir, which is what excludes a second holder): these
    files are only read, so a plain atomic replace (as every file the runbook writes) will do."""
    files.atomic_write(path / LOCKED_AT, f"{int(now)}\n".encode())
    files.atomic_write(path / HOLDER, (json.dumps(lock.holder_json(), indent=2) + "\n").encode())


def _mirror(env: Environment, lock: Mapping[str, Any], *,
            replace_if: Callable[[Mapping[str, Any]], bool]) -> str | None:
    """Best effort: the directory is the lock; the state file only reports it to other tools."""
    path = env.state_file
    if not path.exists():
        return None
    try:
        current = statemod.read_state(path, environment=env.name)
        if not replace_if(current.lock):
            return None
        statemod.write_state(path, statemod.with_lock(current, lock))
    except StateError as exc:
        return str(exc)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None


def _check_removable(env: Environment, current: LockStatus, force: bool) -> None:
    if current.is_ours or current.stealable:
        return
    if force and current.stale and current.holder_alive is not True:
        return
    if current.broken:
        raise LockedError(f"{current.why}; not touching it", f"remove {current.path} by hand")
    raise _locked_error(env, current, unlocking=True)


def _locked_error(env: Environment, current: LockStatus, *,
                  unlocking: bool = False) -> LockedError:
    name = env.name
    where = "" if current.source == "directory" else " (recorded only in the state file)"
    message = (f"{env.display}: the deploy lock{where} is held by {current.describe()}; "
               f"{current.why}")
    if current.broken:
        return LockedError(message, f"remove {current.path} by hand if nothing uses it")
    if current.stale and current.holder_alive:
        pid = current.holder.pid if current.holder else "?"
        fix = (f"its process {pid} is still running, so the lock is never removed, not even "
               f"with --force: if that run hangs, stop it (kill {pid}); its lock is then stale "
               "and the next run takes it over")
    elif unlocking:
        fix = ("a live lock is never removed, not even with --force: wait for that run to "
               f"finish (it expires in {rough_duration(current.expires_in)} if it crashed)")
    else:
        fix = (f"wait for that run to finish; if it crashed, `runbook unlock {name}` removes it "
               f"once it is stale (in {rough_duration(current.expires_in)})")
    return LockedError(message, fix)


def _from_epoch(epoch: float) -> datetime:
    try:
        return datetime.fromtimestamp(epoch, UTC)
    except (OverflowError, OSError, ValueError):
        return datetime.fromtimestamp(0, UTC)
