"""`runbook fleet drain ENV`: the maintenance path's drain of one host (run by the fleet).

Before the shared database is restored, every host must stop writing to it: each host stops
its app slots with the single-host restore's own stop (`slots.stop(..., maintenance=True)`,
the one action allowed to stop the serving slot). No single-host command stops the slots
without restoring too (`snapshot restore` would restore the database once per host), hence
this small host-side command. `--undo` starts again the containers a drain stopped, for a
maintenance run that stopped before the database was restored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from runbook.environment import Environment
from runbook.errors import ExitCode, LockedError, RunbookError


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
    from runbook import lock as locks

    fleet = {"fleet_run_id": fleet_run or None, "fleet_holder": holder or None}
    why = (f"fleet maintenance drain (fleet run {fleet_run or 'not named'}"
           + (f", by {holder}" if holder else "") + ")")
    with run.journaled(env, "fleet-drain", why, notify) as log:
        try:
            held = locks.acquire(env, reason=why)
        except LockedError as exc:
            raise LockedError(f"{exc.message}; nothing was stopped", exc.fix) from None
        try:
            taken = (f"took over a stale deploy lock held by {held.stolen_from.describe()} "
                     f"({held.stolen_from.why})" if held.stolen_from is not None else "")
            log("WARN" if taken else "INFO", taken or "took the deploy lock",
                lock=str(env.lock_path), **fleet)
            if taken:
                notify(taken)
            stopped: list[str] = []
            for slot in env.slots:
                name = env.slot(slot).container
                if docker.inspect(name).running:
                    slots.stop(env, slot, maintenance=True)
                    stopped.append(name)
                    log("INFO", f"stopped {name} (fleet maintenance: the database is restored "
                        "next)", container=name, slot=str(slot), **fleet)
                    faults.point(env, "fleet-drain.after-stop")
        finally:
            try:
                locks.release(env, held)
            except (RunbookError, OSError) as exc:  # never in place of what was stopped
                left = (f"the deploy lock {env.lock_path} could not be released ({exc}); the "
                        "next run takes it over and says so, since this drain has exited")
                log("WARN", left)
                notify(f"{run.WARNING}{left}")
        log("SUCCESS", f"drained: {len(stopped)} app slot(s) stopped, THE SERVICE IS DOWN on "
            "this host until the fleet's rollback starts it", stopped=stopped, **fleet)
    return {"ok": True, "stopped": stopped, "service": "DOWN on this host"}


def undo(env: Environment, containers: list[str]) -> dict[str, Any]:
    """Start again the containers a drain stopped (only this host's own app slots)."""
    from runbook import docker

    own = {env.slot(s).container for s in env.slots}
    started = []
    for name in containers:
        if name not in own:
            raise RunbookError(f"{name} is not an app slot of {env.name} on this host",
                               "pass only the containers `fleet drain` printed",
                               exit_code=ExitCode.USAGE)
        if not docker.inspect(name).running:
            docker.start(name)
        started.append(name)
    return {"ok": True, "started": started}
