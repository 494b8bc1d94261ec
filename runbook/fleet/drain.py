"""`runbook fleet drain ENV`: the maintenance path's drain of one host (run by the fleet).

Before the shared database is restored, every host must stop writing to it: each host stops
its app slots with the single-host restore's own stop (`slots.stop(..., maintenance=True)`,
the one action allowed to stop the serving slot). No single-host command stops the slots
without restoring too (`snapshot restore` would restore the database once per host), hence
this small host-side command. `--undo` starts again the containers a drain stopped, for a
maintenance run that stopped before the database was restored.
"""

from __future__ import annotations

from typing import Any

from runbook.environment import Environment
from runbook.errors import ExitCode, RunbookError


def drain(env: Environment) -> dict[str, Any]:
    """Stop every running app slot of this host; refused while a live run holds its lock."""
    from runbook import docker, slots
    from runbook import lock as locks

    held = locks.status(env)
    if held is not None and not held.stealable:
        raise RunbookError(f"the deploy lock is held by {held.describe()}; nothing was stopped",
                           "let that run finish, then run the fleet rollback again",
                           exit_code=ExitCode.LOCKED)
    stopped: list[str] = []
    for slot in env.slots:
        name = env.slot(slot).container
        if docker.inspect(name).running:
            slots.stop(env, slot, maintenance=True)
            stopped.append(name)
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
