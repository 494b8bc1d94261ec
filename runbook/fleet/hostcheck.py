"""`runbook fleet host-check ENV`: one host's pre-flight for a fleet rollout (read-only).

Everything the controller must know before it touches any host, in one JSON object and one
SSH round trip: this runbook's version and fleet protocol, the current deployment, the host's
deploy lock, the fleet lock, and the single-host rollback's own dry run (state and Caddy read,
target image present, the standby's state, the schema guard), whose plan (its steps, and as
`runbook rollback --dry-run` prints it) and refusal are passed on unchanged; on the
maintenance path also the plans of what the fleet runs there before its rollback (its drain,
and on the database host the restore), each as its own dry run makes it.
"""

from __future__ import annotations

import socket
from importlib import metadata
from typing import TYPE_CHECKING, Any

from runbook.errors import LockedError, RunbookError
from runbook.fleet import FLEET_PROTOCOL

if TYPE_CHECKING:
    from runbook.environment import Environment
    from runbook.plan import Plan


def version() -> str:
    try:
        return metadata.version("togather-runbook")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def check(env_name: str, config: str | None, to: str | None = None, *,
          restore: bool = False, take_lock: dict[str, Any] | None = None,
          schema_restored_first: bool = False, end_sessions: bool = False) -> dict[str, Any]:
    """Never raises for a host problem: each is a `problems` line (the controller prints them).

    `schema_restored_first` (the maintenance path's hosts other than the database host, whose
    shared database the fleet restores before they roll back): the schema guard's refusal is
    reported as before, but every other check of the dry run still runs, and a failure of any
    of them is reported instead (`dry_run.schema_refusal_only` says there was none). Without
    it the dry run stopped at the guard, and a host whose Caddy, reload path or compose was
    broken passed pre-flight, was drained, and stayed down (found by review). Its plan is
    sent all the same (`dry_run.steps`, `rendered`): it is what this host's rollback runs.

    `restore` or `schema_restored_first` (the maintenance path) adds `maintenance`: the
    other plans the fleet runs on this host (`_maintenance`). `end_sessions`: the fleet's
    restore ends other sessions (`--end-sessions`), so the restore is planned with it.

    `take_lock` (the fleet lock host's check: hostlock.take's arguments) takes the fleet lock
    first, in the same SSH round trip; its answer is "fleet_lock_take" (`taken`, or the
    refusal's error, fix and exit code), and a refused take skips the checks: the controller
    stops there."""
    from runbook import disk, environment, recording
    from runbook import lock as locks
    from runbook import rollback as rb
    from runbook.fleet import hostlock

    out: dict[str, Any] = {"runbook_version": version(), "fleet_protocol": FLEET_PROTOCOL,
                           "hostname": socket.gethostname(), "problems": []}
    problems: list[dict[str, Any]] = out["problems"]
    try:
        env = environment.load(env_name, config=config)
    except RunbookError as exc:
        problems.append({"check": "environment", "message": str(exc),
                         "exit_code": int(exc.exit_code)})
        if take_lock is not None:
            out["fleet_lock_take"] = {"taken": False, "error": exc.message, "fix": exc.fix,
                                      "exit_code": int(exc.exit_code)}
        return out
    out["environment"] = env.name
    # how this host's own commands name it (the file its RUNBOOK_CONFIG names, say), for the
    # fixes the controller prints for this host: the bare name may load another file or none
    out["environment_arg"] = environment.command_arg(env)
    try:  # what a resume compares with what its run saw first (never re-roll a finished host)
        state = recording.load_or_empty(env)
        current = state.current
        out["deployment"] = ({"id": current.id, "version": current.version,
                              # rolled back already: its own rollback would go forward to it
                              "rolled_back_from": state.rolled_back_from.version
                              if state.rolled_back_from is not None else None}
                             if current is not None else None)
    except (RunbookError, OSError):
        out["deployment"] = None  # the rollback's dry run below says why
    if take_lock is not None:
        try:
            out["fleet_lock_take"] = hostlock.take(env, **take_lock)
        except RunbookError as exc:
            out["fleet_lock_take"] = {"taken": False, "error": exc.message, "fix": exc.fix,
                                      "exit_code": int(exc.exit_code),
                                      "holder": exc.holder if isinstance(exc, LockedError)
                                      else None}
            return out
    held = locks.status(env)
    out["deploy_lock"] = (
        # unjudgeable for good (the configuration, the state file): no holder's, never
        # "locked"; the dry run below refuses it with its fix
        {"locked": None, "error": held.refused.message, "fix": held.refused.fix}
        if held is not None and held.refused is not None else
        {"locked": True, "summary": held.describe(), "stale": held.stale}
        if held else {"locked": False})
    # a state file that cannot be read for good, or a [lock] dir that is a file, is no
    # holder (exit 3 sent the fleet to wait for good): the rollback's dry run below refuses
    # it once, exit 4 or 2, with its fix
    if held is not None and not held.stealable and held.refused is None:
        problems.append({"check": "deploy lock", "exit_code": 3,
                         "message": f"the deploy lock is held by {held.describe()}"})
    # a rollout must not stop on it. Not the snapshot folder: the dry run below refuses a
    # full one only where it plans a restore (found by review: a full one on every host
    # refused a fleet rollback that takes no snapshot, during an incident)
    for problem, fix in disk.problems(disk.rooms(env)):
        problems.append({"check": "disk space", "message": problem, "fix": fix,
                         "exit_code": 4})
    try:
        fleet_held = hostlock.status(env)
        out["fleet_lock"] = fleet_held.to_json() if fleet_held else {"locked": False}
    except RunbookError as exc:  # [lock] dir a file: the dry run below refuses it, once
        out["fleet_lock"] = {"locked": None, "error": exc.message, "fix": exc.fix}
    try:
        options = rb.Options(to=to, reason="fleet pre-flight",
                             restore_snapshot="auto" if restore else None, fleet=restore,
                             end_sessions=end_sessions and restore,
                             schema_restored_first=schema_restored_first and not restore)
        result = rb.rollback(env, options, dry_run=True)
    except RunbookError as exc:
        problems.append({"check": "rollback dry run", "message": exc.message, "fix": exc.fix,
                         "exit_code": int(exc.exit_code)})
        out["dry_run"] = {"ok": False, "error": exc.message, "fix": exc.fix,
                          "exit_code": int(exc.exit_code)}
        return out
    # the whole plan, for the fleet's dry run and prompt to show what this host's rollback
    # runs: its steps as `runbook rollback --dry-run --format json` has them, and as that
    # dry run prints them (rendered here, by the one renderer; the controller indents it).
    # Optional for the controller: an older host without them is shown by its summary
    out["dry_run"] = _shown(result.plan)
    refused = out["dry_run"]["facts"].get("schema_refusal")
    if refused:  # the only failure: what the restore resolves (the controller judges it).
        # Its plan is still sent, its guard step saying the fleet restores the snapshot
        # first: the maintenance dry run showed no step of this host's rollback (found by
        # review), and what a dry run shows is what runs
        problems.append({"check": "rollback dry run", "message": refused["error"],
                         "fix": refused["fix"], "exit_code": 4})
        out["dry_run"].update({"ok": False, "error": refused["error"], "fix": refused["fix"],
                               "exit_code": 4, "schema_refusal_only": True})
    if restore or schema_restored_first:
        _maintenance(env, out, problems, to, restore=restore, end_sessions=end_sessions)
    return out


def _shown(plan: Plan) -> dict[str, Any]:
    """A dry run's plan as host-check sends it: its summary, warnings, pre-flight values,
    facts, steps, and its text as the single-host dry run prints it."""
    data = plan.to_json()
    return {"ok": True, "summary": data["summary"], "warnings": data["warnings"],
            "preflight": next((s["details"] for s in data["steps"]
                               if s["name"] == "preflight"), {}),
            "facts": data["facts"], "steps": data["steps"], "rendered": plan.render()}


def _maintenance(env: Environment, out: dict[str, Any], problems: list[dict[str, Any]],
                 to: str | None, *, restore: bool, end_sessions: bool) -> None:
    """The maintenance path's other plans of this host, each what the fleet then runs here
    (`maintenance`): its drain (`runbook fleet drain`); on the database host also the restore
    (`runbook snapshot restore ENV SNAPSHOT --keep-stopped`'s own dry run, of the snapshot its
    rollback's dry run picked) and the rollback the rollout runs after it, without a restore
    (dry-run past its schema guard, as on the other hosts). The rollback dry-run above WITH
    the restore only judges it (the snapshot picked and verified): its plan is not what runs
    here, and the maintenance dry run showed it instead (found by review)."""
    from runbook import rollback as rb
    from runbook import snapshot_restore
    from runbook.fleet import drain

    plans: dict[str, Any] = {}
    out["maintenance"] = plans
    try:
        plans["drain"] = _shown(drain.plan(env))
    except RunbookError as exc:
        problems.append({"check": "drain", "message": exc.message, "fix": exc.fix,
                         "exit_code": int(exc.exit_code)})
    snapshot = out["dry_run"].get("preflight", {}).get("restore")
    if not restore or not out["dry_run"].get("ok") or not snapshot:
        return  # a refused restore is the dry run's problem, said above
    try:
        restoring = snapshot_restore.restore(env, str(snapshot), restart=False, dry_run=True,
                                             reason="fleet pre-flight",
                                             end_sessions=end_sessions,
                                             # planned before the drain that ends the
                                             # other hosts' app sessions
                                             drained_first=True)
        plans["restore"] = {**_shown(restoring.plan), "snapshot": str(snapshot)}
    except RunbookError as exc:
        problems.append({"check": "snapshot restore dry run", "message": exc.message,
                         "fix": exc.fix, "exit_code": int(exc.exit_code)})
        return
    try:
        after = rb.rollback(env, rb.Options(to=to, reason="fleet pre-flight",
                                            schema_restored_first=True), dry_run=True)
    except RunbookError as exc:
        problems.append({"check": "rollback dry run (after the restore)",
                         "message": exc.message, "fix": exc.fix,
                         "exit_code": int(exc.exit_code)})
        return
    plans["rollback"] = _shown(after.plan)
