"""The fleet lock, held on one fixed host while a fleet rollout runs (host side).

A directory `<lock dir>/togather-fleet-<env>.lock` holding `holder.json`: who (the operator
and the controller's host and pid), why, the fleet run id, when, and when it expires. Taken
with mkdir (atomic); refreshed by its controller's heartbeat while it runs (and before a batch);
released by the holder's fleet run id only.
Stale, as on one host (runbook/lock.py): expired, or its controller ran on this very host and
that process is gone. Expired by the wall clock is not enough when the lock's last take or
heartbeat noted this host's monotonic clock (MONOTONIC, same boot): a lock whose last write is
younger than its lifetime on that clock is live, whatever the wall clock says, so a forward
step of this host's clock (NTP, a VM resumed) never lets a new run take over a live
controller's lock before its next heartbeat. Undated, as the deploy lock dated in the future:
its expiry lies beyond what a take or a heartbeat writes, so this host's clock was set back
since (NTP stepping it) and no heartbeat came after. Its controller may still run (a
heartbeat due any minute), so on-call's `--release --force` does not remove it: it re-dates
its expiry to one heartbeat interval plus slack ahead, noting so in the holder; a live
controller's heartbeat then dates it as live, a dead one's reads stale once that passed and
is removed (or taken over) then. A live holder's lock is never removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runbook import files, procs
from runbook.environment import Environment, command_arg
from runbook.errors import LockedError, RunbookError
from runbook.lock.policy import FUTURE_SLACK, lock_dir_refusal
from runbook.times import format_utc, rough_duration

DEFAULT_TTL = 1800.0
# the longest a controller's heartbeat may wait between refreshes (RUNBOOK_FLEET_HEARTBEAT_S)
HEARTBEAT_MAX = DEFAULT_TTL / 4
# an undated lock re-dated by on-call expires this far ahead: a running controller's next
# heartbeat comes before it, with the deploy lock's slack for a beat slowed by SSH
REDATE_FOR = HEARTBEAT_MAX + FUTURE_SLACK
REDATED = "redated_by_on_call"  # the holder's note of that re-dating
# the take's or heartbeat's reading of this host's monotonic clock, and the lifetime it gave
MONOTONIC = "written_at_monotonic"


def path(env: Environment) -> Path:
    return env.lock_dir / f"togather-fleet-{env.name}.lock"


def guard_path(env: Environment) -> Path:
    """Beside the state file, as the deploy lock's guard (runbook/lock/holding.py): in the
    world-writable lock folder (/tmp) any local user could make it first, or hold its flock,
    and block every fleet run; and only its owner or root could fix its mode there."""
    state = Path(os.path.realpath(env.state_file))
    return state.with_name(f".{path(env).name}.guard")


GUARD_TIMEOUT = 10.0  # seconds; a guarded take, refresh or release takes milliseconds
LOCK_DIR_MODE = 0o755  # holder.json is 0644: every operator may read who holds it


@contextlib.contextmanager
def _guarded(env: Environment) -> Iterator[None]:
    """Judge and change the fleet lock as one step among runbook processes: unguarded, a
    contender that judged a stale lock renamed away the fresh lock another had just taken
    over, and both controllers rolled hosts. The kernel drops the flock with its holder.
    A folder or guard that cannot be used is said in one line naming it: made 0600 by root
    under umask 077, the guard was an uncaught PermissionError, exit 5 (found by review)."""
    guard = guard_path(env)
    if (refused := lock_dir_refusal(env, before=False)) is not None:  # said as the deploy
        raise refused  # lock's: mkdir's "File exists" named no fix
    try:
        env.lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise files.write_error(f"cannot use the lock folder {env.lock_dir} for the fleet "
                                f"lock: {exc.strerror or exc}", exc, env.lock_dir,
                                "check [lock] dir in the environment file and its "
                                "permissions") from None
    try:
        guard.parent.mkdir(parents=True, exist_ok=True)
        fd = files.open_guard(guard)
    except OSError as exc:
        raise files.guard_error(f"cannot open the fleet lock's guard {guard} (beside the state "
                                f"file): {exc.strerror or exc}", exc, guard,
                                f"let the user the fleet runs as write {guard.parent} (the "
                                "state file's folder)") from None
    fds = [(fd, guard)]
    try:
        old = _old_guard(env)
        if old is not None:
            fds.append(old)
        for held, where in fds:
            if not files.flock_within(held, GUARD_TIMEOUT, 0.01):
                raise LockedError(f"another runbook process has been changing the fleet lock "
                                  f"for {GUARD_TIMEOUT:.0f} s (it holds {where})",
                                  "run the fleet command again")
        yield
    finally:
        for held, _ in fds:
            os.close(held)


def _old_guard(env: Environment) -> tuple[int, Path] | None:
    """Where runbooks before 2026-12-05 flock the guard (the lock folder): while one may still
    run on this host (a per-user install, an upgrade mid-run), that guard is taken too, after
    the new one (one order: no deadlock), or both took the lock (found by review). Only one
    that exists (none is made in the world-writable folder), is a regular file, and is owned
    by root, this user or the state file's owner: any local user can put a FIFO there (its
    open hung the take) or a file of their own to flock (blocking every take)."""
    old = path(env).with_name(f".{path(env).name}.guard")
    try:
        fd = os.open(old, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        owners = {0, os.geteuid()}
        with contextlib.suppress(OSError):
            owners.add(os.stat(env.state_file).st_uid)
        if stat.S_ISREG(st.st_mode) and st.st_uid in owners:
            return fd, old
    except OSError:
        pass
    os.close(fd)
    return None


@dataclass(frozen=True)
class Held:
    holder: dict[str, Any]
    stale: bool
    why: str
    # dated in the future with no heartbeat since the clock was set back: its age cannot be
    # told, so it would read as live for as long as the clock ran ahead (hours); not taken
    # over by itself; `--release --force` re-dates it (REDATE_FOR ahead, noted in the holder)
    undated: bool = False
    # so re-dated, and no heartbeat of its fleet run refreshed it since: not known live
    redated: bool = False

    def describe(self) -> str:
        h = self.holder
        return (f"{h.get('locked_by', '?')} (pid {h.get('pid', '?')} on {h.get('hostname', '?')})"
                f" for {h.get('reason', '?')!r}, fleet run {h.get('fleet_run_id', '?')}")

    def to_json(self) -> dict[str, Any]:
        return {"locked": True, "holder": self.holder, "stale": self.stale,
                "undated": self.undated, "redated": self.redated, "why": self.why,
                "summary": self.describe()}


_HOLDER_LIMIT = 64 * 1024


def status(env: Environment, now: float | None = None) -> Held | None:
    """Who holds the fleet lock, and whether it is stale; None when free. A [lock] dir that
    is a file is its refusal (exit 2): its holder.json "could not be read" made it a nameless
    live holder, and the fleet refused as "held by another fleet run", exit 3 (found by
    review)."""
    if (refused := lock_dir_refusal(env, before=False)) is not None:  # a read: no "nothing
        raise refused  # was changed"
    now = time.time() if now is None else now
    try:
        # a regular file of a holder's size only: a FIFO or a link to /dev/zero planted in
        # /tmp hung every fleet command (found by review); unreadable is a nameless holder
        holder = json.loads(files.read_regular(path(env) / "holder.json", _HOLDER_LIMIT))
    except FileNotFoundError:
        if not path(env).exists():
            return None
        holder = {}
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict):
        holder = {}
    expires = holder.get("expires_at_epoch")
    if not isinstance(expires, int | float):
        with contextlib.suppress(OSError):
            expires = path(env).stat().st_mtime + DEFAULT_TTL
    note = holder.get(REDATED)
    redated = (isinstance(note, dict) and isinstance(expires, int | float)
               and note.get("expires_at_epoch") == expires)  # no heartbeat since
    expired = isinstance(expires, int | float) and expires <= now
    # on-call's re-dated expiry is judged by the wall clock alone (its minutes are its own)
    young = None if not expired or redated else _younger_than_its_life(holder)
    if expired and young is None:
        return Held(holder, True, "expired" + (f" ({_redated(note)}, and no heartbeat of its "
                                               "fleet run came since)" if redated else ""))
    pid = holder.get("pid")
    here = holder.get("hostname") == socket.gethostname()
    if here and isinstance(pid, int) and not procs.pid_alive(pid):
        return Held(holder, True, f"its controller (pid {pid} on this host) is gone")
    if here and isinstance(pid, int):  # whatever its dates say
        return Held(holder, False, f"held by a live fleet run: its controller (pid {pid} on "
                    "this host) runs")
    if young is not None and isinstance(expires, int | float):
        return Held(holder, False, f"held by a live fleet run: its last take or heartbeat was "
                    f"{rough_duration(young)} ago by this host's monotonic clock, within its "
                    f"lifetime; its expiry ({_when(expires)}) reads past only because "
                    "this host's clock was stepped forward since")
    taken = holder.get("locked_at_epoch")
    taken = taken if isinstance(taken, int | float) and taken > now + FUTURE_SLACK else None
    if isinstance(expires, int | float) and expires > now + DEFAULT_TTL + FUTURE_SLACK:
        return Held(holder, False, _dated_in_future(taken, expires, now), undated=True)
    if redated and isinstance(expires, int | float):
        return Held(holder, False, f"{_redated(note)}, and no heartbeat of its fleet run has "
                    f"refreshed it since: it reads stale at {_when(expires)}, "
                    f"{rough_duration(expires - now)} from now, unless its controller runs",
                    redated=True)
    if taken is not None:  # refreshed since the clock was set back: a heartbeat, so live
        return Held(holder, False, f"held by a live fleet run: its heartbeat refreshed it "
                    f"after this host's clock was set back; it was taken at {_when(taken)}, "
                    f"{rough_duration(taken - now)} in the future")
    return Held(holder, False, "held by a live fleet run")


def _monotonic_clock() -> str | None:
    """Which clock time.monotonic() reads in this process: this boot's (its boot id), in this
    time namespace, so a reading another process on this host noted is known to be on the same
    scale; None without /proc (nothing noted: the wall clock alone judges, as before)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    try:
        namespace = os.readlink("/proc/self/ns/time")
    except OSError:
        namespace = ""
    return f"{boot} {namespace}".strip() or None


def _monotonic_note(ttl: float) -> dict[str, Any] | None:
    """What a take or a heartbeat notes in the holder (MONOTONIC): this host's monotonic clock
    now and the lifetime it gives the lock."""
    clock = _monotonic_clock()
    return None if clock is None else {"clock": clock, "at_s": time.monotonic(), "ttl_s": ttl}


def _with_note(holder: dict[str, Any], ttl: float) -> dict[str, Any]:
    note = _monotonic_note(ttl)
    out = {k: v for k, v in holder.items() if k != MONOTONIC}
    return out if note is None else {**out, MONOTONIC: note}


def _younger_than_its_life(holder: dict[str, Any]) -> float | None:
    """Seconds since the lock's last take or heartbeat by this host's monotonic clock, when
    that is less than the lifetime it was given; None when older, or when it cannot be told
    (no note, another boot or clock, a reading ahead of now).

    A note can only be as recent as a real take or heartbeat of this fleet run, so it makes no
    dead lock live for longer than its lifetime after that write, on that clock (which stands
    still while the host is suspended: such a lock reads stale that much later, never
    sooner). One left behind by an older
    runbook's refresh (which keeps the holder's other fields) is older than that refresh: the
    lock then reads stale no later than by the wall clock alone."""
    note = holder.get(MONOTONIC)
    if not isinstance(note, dict):
        return None
    at, ttl = note.get("at_s"), note.get("ttl_s")
    if not isinstance(at, int | float) or not isinstance(ttl, int | float):
        return None
    if note.get("clock") != _monotonic_clock():
        return None
    age = time.monotonic() - at
    return age if 0 <= age < ttl else None


def _when(epoch: float) -> str:
    try:
        return format_utc(datetime.fromtimestamp(epoch, UTC))
    except (OverflowError, OSError, ValueError):  # a holder file edited by hand: no date
        return f"epoch {epoch:g}"


def _redated(note: Any) -> str:
    """Who re-dated an undated lock, and when (`--release --force`, REDATED)."""
    at = note.get("at_epoch")
    return (f"re-dated by on-call ({note.get('by', '?')} at "
            f"{_when(at) if isinstance(at, int | float) else '?'}, `--release --force`: it "
            "was dated in the future, the clock set back)")


def _dated_in_future(taken: float | None, expires: float, now: float) -> str:
    """Why a lock dated in the future is undated, naming the time it is dated: a take or a
    heartbeat writes an expiry at most its 30 minutes ahead, so a later one was written by a
    clock set back since (found by review: a dead controller's lock, taken while the clock
    ran 6 h fast, read as "held by a live fleet run" for those 6 h, and nothing removed it)."""
    dated = (f"taken at {_when(taken)}, {rough_duration(taken - now)} in the future"
             if taken is not None else f"its expiry {_when(expires)} is "
             f"{rough_duration(expires - now)} in the future, beyond its "
             f"{rough_duration(DEFAULT_TTL)}")
    return (f"dated in the future ({dated} by this host's clock): the clock was set back "
            "since, so its age cannot be told, and no heartbeat of its fleet run has "
            "refreshed it since")


def take(env: Environment, *, fleet_run_id: str, locked_by: str, hostname: str, pid: int,
         reason: str, ttl: float = DEFAULT_TTL, take_over: str = "") -> dict[str, Any]:
    """Take the fleet lock; a stale one is taken over (and said), a live one refused (exit 3).

    `take_over`: the fleet run id of a run whose controller the resuming controller found dead
    on its own machine (this host cannot see that machine's processes): its lock counts as
    stale, and only its."""
    with _guarded(env):
        return _take(env, fleet_run_id=fleet_run_id, locked_by=locked_by, hostname=hostname,
                     pid=pid, reason=reason, ttl=ttl, take_over=take_over)


def _take(env: Environment, *, fleet_run_id: str, locked_by: str, hostname: str, pid: int,
          reason: str, ttl: float, take_over: str) -> dict[str, Any]:
    now = time.time()
    holder = {"fleet_run_id": fleet_run_id, "locked_by": locked_by, "hostname": hostname,
              "pid": pid, "reason": reason, "locked_at_epoch": now,
              "expires_at_epoch": now + ttl}
    holder = _with_note(holder, ttl)  # the monotonic clock tells its age when the wall cannot
    taken_over = None
    made = False  # by this take (not a retried take's lock, which may be another user's)
    for _ in range(2):
        try:
            path(env).mkdir()
            made = True
        except FileExistsError:
            held = status(env)
            if held is None:
                continue
            if not (path(env) / "holder.json").exists():
                # takes are serialised under the guard, and each writes its holder before
                # letting go: a lock naming nobody is what a take killed in between left
                held = Held({}, True, "left empty by a take that did not finish")
            if held.holder.get("fleet_run_id") == fleet_run_id:
                break  # ours already (a retried take)
            if (not held.stale and take_over
                    and held.holder.get("fleet_run_id") == take_over):
                held = Held(held.holder, True, f"its controller is gone (pid "
                            f"{held.holder.get('pid', '?')} on "
                            f"{held.holder.get('hostname', '?')}, found dead by the resume)")
            if held.undated or held.redated:
                refused = LockedError(f"the fleet lock on this host is held by "
                                      f"{held.describe()}; it is {held.why}",
                                      force_fix(env, held))
                refused.holder = held.holder
                raise refused from None
            if not held.stale:
                refused = LockedError(f"the fleet lock on this host is held by "
                                      f"{held.describe()}", "wait for that fleet run to finish, "
                                      "or stop its controller; a stale one is taken over")
                refused.holder = held.holder  # its controller may know that run is dead
                raise refused from None
            taken_over = held
            aside = path(env).with_name(f"{path(env).name}.stale-{os.getpid()}")
            with contextlib.suppress(OSError):
                path(env).rename(aside)
                shutil.rmtree(aside, ignore_errors=True)
            continue
        break
    else:
        raise LockedError("the fleet lock could not be taken (another run raced for it)",
                          "run the fleet command again")
    try:
        if made:  # its mode and holder.json's whatever the umask (077: others read nobody)
            files.set_dir_mode(path(env), LOCK_DIR_MODE)
        files.atomic_write(path(env) / "holder.json", json.dumps(holder).encode())
    except BaseException as exc:  # a full disk: no lock naming nobody refuses every run
        shutil.rmtree(path(env), ignore_errors=True)
        if isinstance(exc, OSError):
            raise files.write_error(f"cannot write the fleet lock's holder file in "
                                    f"{path(env).parent} ({exc.strerror}); the lock was not "
                                    "taken, nothing changed", exc, path(env).parent,
                                    "fix the permissions of the lock directory") from None
        raise
    out: dict[str, Any] = {"ok": True, "taken": True, "path": str(path(env)), "holder": holder}
    if taken_over is not None:
        out["taken_over"] = {"holder": taken_over.holder, "why": taken_over.why}
    return out


def refresh(env: Environment, fleet_run_id: str, ttl: float = DEFAULT_TTL) -> dict[str, Any]:
    """Push the expiry forward; refused when the lock is no longer this fleet run's (judged
    under the guard, so a lock another run took over or a released one is never rewritten)."""
    with _guarded(env):
        return _refresh(env, fleet_run_id, ttl)


def _refresh(env: Environment, fleet_run_id: str, ttl: float) -> dict[str, Any]:
    held = status(env)
    if held is None or held.holder.get("fleet_run_id") != fleet_run_id:
        raise LockedError("the fleet lock is no longer held by fleet run " + fleet_run_id
                          + (f" (now: {held.describe()})" if held else " (it is free)"),
                          "someone took it over: stop here and find out who") from None
    holder = _with_note({**held.holder, "expires_at_epoch": time.time() + ttl}, ttl)
    files.atomic_write(path(env) / "holder.json", json.dumps(holder).encode())
    return {"ok": True, "refreshed": True, "holder": holder}


def release(env: Environment, fleet_run_id: str) -> dict[str, Any]:
    """Remove the fleet lock if this fleet run holds it; someone else's is left alone."""
    with _guarded(env):
        return _release(env, fleet_run_id)


def checked(env: Environment) -> dict[str, str]:
    """Which fleet lock an answer is about: a host may carry two environments (staging beside
    development), each with its own lock in one folder; a bare "already free" left on-call to
    guess which one was looked at. With how this host's own commands name that environment
    (`environment_arg`): the controller names it so in the fixes it prints for the lock host,
    which runs no host-check when --limit leaves it out."""
    return {"environment": env.name, "host": socket.gethostname(), "lock": str(path(env)),
            "environment_arg": command_arg(env)}


def _named(env: Environment) -> str:
    where = checked(env)
    return f"the {where['environment']} fleet lock on {where['host']} ({where['lock']})"


def force_fix(env: Environment, held: Held) -> str:
    """The way out of an undated lock (Held.undated) or one on-call re-dated (Held.redated),
    for the refusals that meet it: no command here can tell a dead controller from a live one
    on another machine whose heartbeat has not come since the clock was set back."""
    h = held.holder
    controller = f"its controller (pid {h.get('pid', '?')} on {h.get('hostname', '?')})"
    release = f"`runbook fleet lock {command_arg(env)} --release --force`"
    if held.redated:
        expires = h.get("expires_at_epoch")
        until = _when(expires) if isinstance(expires, int | float) else "its expiry"
        return (f"wait until {until}: if {controller} runs, its heartbeat dates the lock as "
                f"live before; if not, the lock then reads stale: a new run takes it over, "
                f"or {release} on {socket.gethostname()} then removes it")
    return (f"{release} on {socket.gethostname()} re-dates the lock to expire in "
            f"{rough_duration(REDATE_FOR)} (it cannot be removed at once: {controller} may "
            f"still run); if it runs, its heartbeat dates the lock as live within "
            f"{rough_duration(HEARTBEAT_MAX)}; if not, the lock reads stale after those "
            f"{rough_duration(REDATE_FOR)} and a new run takes it over (or {release} then "
            "removes it)")


def force_release(env: Environment, fleet_run_id: str | None = None) -> dict[str, Any]:
    """On-call's way out of a fleet lock no fleet run will release: stale, or left empty by a
    take killed half-way, it is removed; dated in the future (Held.undated), it is re-dated
    (_redate): its controller may be alive, its heartbeat not yet come since the clock was set
    back (found by review: the live run's next refresh failed, its rollout stopped between
    batches, and another run could start). Whoever holds it (or, given `fleet_run_id`, only
    that run's). Judged under the guard: never a lock a live run's heartbeat keeps fresh, nor
    one whose controller runs on this host."""
    with _guarded(env):
        held = status(env)
        if held is None:
            return {"ok": True, "released": False, **checked(env),
                    "why": f"{_named(env)} is already free"}
        if fleet_run_id and held.holder.get("fleet_run_id") != fleet_run_id:
            raise RunbookError(f"{_named(env)} is held by {held.describe()}, not by fleet run "
                               f"{fleet_run_id}; left alone", "nothing to do")
        # takes write the holder under the guard: a lock naming nobody is a killed take's
        named = (path(env) / "holder.json").exists()
        if held.redated and named:
            raise LockedError(f"{_named(env)} is held by {held.describe()}; it is {held.why}; "
                              "left alone", force_fix(env, held))
        # a lock no heartbeat can refresh (naming no fleet run) has no live run to stop
        if held.undated and named and isinstance(held.holder.get("fleet_run_id"), str):
            return _redate(env, held)
        if not (held.stale or held.undated or not named):
            pid, host = held.holder.get("pid", "?"), held.holder.get("hostname", "?")
            raise LockedError(f"{_named(env)} is held by {held.describe()} ({held.why}); left "
                              "alone", "a live fleet run's lock is never removed, not even with "
                              f"--force: wait for that run to finish, or stop its controller "
                              f"(pid {pid} on {host}); its lock then expires by itself "
                              f"{rough_duration(DEFAULT_TTL)} after its last heartbeat")
        aside = path(env).with_name(f"{path(env).name}.forced-{os.getpid()}")
        try:  # at once (a rename), or not at all: never a lock half removed
            path(env).rename(aside)
        except OSError as exc:
            raise files.write_error(f"cannot remove {_named(env)}: {exc.strerror or exc}; "
                                    "nothing was changed", exc, path(env).parent,
                                    f"remove {path(env)} as its owner (or root)") from None
        shutil.rmtree(aside, ignore_errors=True)
        return {"ok": True, "released": True, "forced": True, **checked(env),
                "holder": held.holder,
                "why": f"removed {_named(env)}, held by {held.describe()} ({held.why})"}


def _redate(env: Environment, held: Held) -> dict[str, Any]:
    """Re-date an undated lock to expire REDATE_FOR from now, every holder field kept and the
    re-dating noted (REDATED), in one atomic write under the caller's guard: a running
    controller's heartbeat then dates it as live (its refresh only asks that the lock name its
    run), and a dead one's reads stale once the re-dated expiry passed."""
    from runbook.state.model import current_operator

    now = time.time()
    holder = {**held.holder, "expires_at_epoch": now + REDATE_FOR,
              REDATED: {"at_epoch": now, "by": current_operator(),
                        "expires_at_epoch": now + REDATE_FOR,
                        "was_expires_at_epoch": held.holder.get("expires_at_epoch")}}
    try:
        files.atomic_write(path(env) / "holder.json", json.dumps(holder).encode())
    except OSError as exc:
        raise files.write_error(f"cannot re-date {_named(env)}: {exc.strerror or exc}; "
                                "nothing was changed", exc, path(env),
                                f"fix the permissions of {path(env)}") from None
    release = f"`runbook fleet lock {command_arg(env)} --release --force`"
    h = held.holder
    return {"ok": True, "released": False, "redated": True, **checked(env), "holder": holder,
            "why": f"re-dated {_named(env)}, held by {held.describe()}, to expire at "
                   f"{_when(now + REDATE_FOR)}, not removed: it was {held.why}. If its "
                   f"controller (pid {h.get('pid', '?')} on {h.get('hostname', '?')}) runs, "
                   f"its heartbeat dates the lock as live within "
                   f"{rough_duration(HEARTBEAT_MAX)}; if not, the lock reads stale in "
                   f"{rough_duration(REDATE_FOR)}, and a new run then takes it over, or "
                   f"{release} again removes it"}


def _release(env: Environment, fleet_run_id: str) -> dict[str, Any]:
    held = status(env)
    if held is None:
        return {"ok": True, "released": False, **checked(env),
                "why": f"{_named(env)} is already free"}
    if held.holder.get("fleet_run_id") != fleet_run_id:
        raise RunbookError(f"{_named(env)} is held by {held.describe()}, not by fleet run "
                           f"{fleet_run_id}; left alone", "nothing to do")
    shutil.rmtree(path(env), ignore_errors=True)
    return {"ok": True, "released": True, **checked(env), "why": f"released {_named(env)}"}
