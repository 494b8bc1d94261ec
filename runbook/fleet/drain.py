"""`runbook fleet drain ENV`: the maintenance path's drain of one host (run by the fleet).

Before the shared database is restored, every host must stop writing to it: each host stops
its app slots with the single-host restore's own stop (`slots.stop(..., maintenance=True)`,
the one action allowed to stop the serving slot). No single-host command stops the slots
without restoring too (`snapshot restore` would restore the database once per host), hence
this small host-side command. `--undo` starts again the containers a drain stopped, for a
maintenance run that stopped before the database was restored. Both hold the host's deploy
lock while they change its slots and journal on the host what they changed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from runbook.environment import Environment
from runbook.errors import ExitCode, LockedError, RunbookError

if TYPE_CHECKING:
    from runbook.plan import Plan

Log = Callable[..., None]
UNDRAIN_LOCK_WAIT = 20.0  # seconds the undrain waits for a live deploy-lock holder to let go
LOCK_POLL = 0.5  # seconds between two tries meanwhile


def _fleet_fields(fleet_run: str, holder: str) -> dict[str, str | None]:
    return {"fleet_run_id": fleet_run or None, "fleet_holder": holder or None}


def _why(what: str, fleet_run: str, holder: str) -> str:
    return (f"{what} (fleet run {fleet_run or 'not named'}"
            + (f", by {holder}" if holder else "") + ")")


def _refuse_lock_dir(env: Environment) -> None:
    """A [lock] dir that is a file: exit 2 before the log, as every run refuses it (it was
    refused at the lock, after the log was written)."""
    from runbook import lock as locks

    if (refused := locks.lock_dir_refusal(env)) is not None:
        raise refused


@contextlib.contextmanager
def _deploy_lock(env: Environment, why: str, log: Log, notify: Callable[[str], None], *,
                 nothing: str, this: str, fleet: dict[str, str | None],
                 wait: float = 0.0) -> Iterator[None]:
    """The deploy lock held for the block and released on every path (the restore and the
    rollback that follow on this host take it). A live holder refuses, exit 3, with
    `nothing` said, once `wait` seconds have passed without it letting go; a stale one is
    taken over and said. Killed inside, the lock names a dead process, which the next run
    takes over."""
    from runbook import lock as locks
    from runbook import run

    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            held = locks.acquire(env, reason=why)
            break
        except LockedError as exc:
            if time.monotonic() + LOCK_POLL > deadline:
                raise LockedError(f"{exc.message}; {nothing}"
                                  + (f" (waited {wait:g}s for it)" if wait else ""),
                                  exc.fix) from None
            if not said:
                said = True
                waiting = f"the deploy lock is held ({exc.message}): waiting up to {wait:g}s"
                log("WARN", waiting, lock=str(env.lock_path), **fleet)
                notify(waiting)
            time.sleep(LOCK_POLL)
    try:
        taken = (f"took over a stale deploy lock held by {held.stolen_from.describe()} "
                 f"({held.stolen_from.why})" if held.stolen_from is not None else "")
        log("WARN" if taken else "INFO", taken or "took the deploy lock",
            lock=str(env.lock_path), **fleet)
        if taken:
            notify(taken)
        yield
    finally:
        try:
            locks.release(env, held)
        except (RunbookError, OSError) as exc:  # never in place of what was changed
            left = (f"the deploy lock {env.lock_path} could not be released ({exc}); the "
                    f"next run takes it over and says so, since {this} has exited")
            log("WARN", left)
            notify(f"{run.WARNING}{left}")


def plan(env: Environment) -> Plan:
    """What `drain` will do on this host, as a plan (read-only): the deploy lock it takes, and
    each app slot it stops, judged as it judges them (running now); the fleet's maintenance
    dry run and prompt show it, since the drain is the step that takes the service down."""
    from runbook import docker
    from runbook import lock as locks
    from runbook.plan import Phase, Plan, Step

    held = locks.status(env)
    steps = [Step("lock", "Take the deploy lock (released when the drain ends: the restore and "
                  "the rollback that follow take it)",
                  {"path": str(env.lock_path),
                   "now": "free" if held is None else held.describe()
                   + (": would be taken over" if held.stealable else ": refused, exit 3")},
                  phase=Phase.PREFLIGHT)]
    for slot in env.slots:
        name = env.slot(slot).container
        running = docker.inspect(name).running
        steps.append(Step("stop-slot", f"Stop the {slot} app slot {name}",
                          {"container": name, "why": "the shared database is restored next: "
                           "no app may write to it meanwhile"},
                          skip=None if running else "not running"))
    return Plan("fleet-drain", env, f"stop the app slots of {env.display} (THE SERVICE IS "
                "DOWN on this host until its own rollback starts it)", steps)


def drain(env: Environment, *, fleet_run: str = "", holder: str = "",
          notify: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Stop every running app slot of this host under the deploy lock, journaled.

    The lock is held for the drain's duration (a deploy started after a mere check raced the
    stops) and released at its end: the restore and the rollback that follow on this host
    take it. Killed half-way, it names a dead process, which the next run takes over. The
    host's log names the fleet run, who ran it and each container as it stops: a maintenance
    run stopped after the drain left the service down with no record on the host (found by
    review). A live holder refuses, exit 3 (LockedError), and nothing is stopped."""
    from runbook import docker, faults, run, slots

    fleet = _fleet_fields(fleet_run, holder)
    why = _why("fleet maintenance drain", fleet_run, holder)
    _refuse_lock_dir(env)
    with run.journaled(env, "fleet-drain", why, notify) as log:
        stopped: list[str] = []
        with _deploy_lock(env, why, log, notify, nothing="nothing was stopped",
                          this="this drain", fleet=fleet):
            for slot in env.slots:
                name = env.slot(slot).container
                if docker.inspect(name).running:
                    slots.stop(env, slot, maintenance=True)
                    stopped.append(name)
                    log("INFO", f"stopped {name} (fleet maintenance: the database is restored "
                        "next)", container=name, slot=str(slot), **fleet)
                    faults.point(env, "fleet-drain.after-stop")
        log("SUCCESS", f"drained: {len(stopped)} app slot(s) stopped, THE SERVICE IS DOWN on "
            "this host until the fleet's rollback starts it", stopped=stopped, **fleet)
    return {"ok": True, "stopped": stopped, "service": "DOWN on this host"}


def undo(env: Environment, containers: list[str], *, fleet_run: str = "", holder: str = "",
         notify: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Start again the containers a drain stopped (only this host's own app slots), under the
    deploy lock, journaled, as the drain itself.

    It started them with no lock and no word on the host (found by review): a deploy running
    then raced the starts, and nothing on the host said who started its slots again. Every
    name is checked before anything is taken or started (one not this host's app slot: exit
    2, nothing started, no lock, no log). A live holder refuses, exit 3, nothing started; a
    stale one is taken over and said. The host's log names each container started, and each
    already running and left so, with the fleet run and who ran it."""
    from runbook import docker, run

    own = {env.slot(s).container: s for s in env.slots}
    names = list(dict.fromkeys(containers))  # each once, in the order given
    for name in names:
        if name not in own:
            raise RunbookError(f"{name} is not an app slot of {env.name} on this host; nothing "
                               "was started", "pass only the containers `fleet drain` printed",
                               exit_code=ExitCode.USAGE)
    fleet = _fleet_fields(fleet_run, holder)
    why = _why("fleet maintenance undrain: the database was not restored", fleet_run, holder)
    _refuse_lock_dir(env)
    with run.journaled(env, "fleet-undrain", why, notify) as log:
        started: list[str] = []
        running: list[str] = []
        # a holder of a few seconds (a cron's snapshot cleanup) is waited out: refused at
        # once, the undrain left this host DOWN for it (found by review)
        with _deploy_lock(env, why, log, notify, nothing="nothing was started",
                          this="this undrain", fleet=fleet, wait=UNDRAIN_LOCK_WAIT):
            for name in names:
                if docker.inspect(name).running:
                    running.append(name)
                    log("INFO", f"{name} is already running: left as it is", container=name,
                        slot=str(own[name]), **fleet)
                    continue
                docker.start(name)
                started.append(name)
                log("INFO", f"started {name} again (fleet maintenance stopped before the "
                    "database was restored)", container=name, slot=str(own[name]), **fleet)
        log("SUCCESS", f"undrained: {len(started)} app slot(s) started again, {len(running)} "
            "already running", started=started, already_running=running, **fleet)
    return {"ok": True, "started": started, "already_running": running}
