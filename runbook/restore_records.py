"""What a restore's run records say, read without the snapshot modules: a rollback that
restores nothing plans without importing them (tests/test_speed.py), and it, a switch, a
deploy and `runbook status` must still know when the last restore left a database that does
not match its snapshot."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from runbook.environment import Environment
from runbook.errors import PreconditionError

if TYPE_CHECKING:
    from runbook.intent import Intent

EARLIER = "earlier safety snapshot"  # a step detail of the run record (killed_restore)
TARGET = "restore_target"  # the snapshot a restore replays: a step detail, kept for a rerun
# verify-restore's details when the restored database did not match its snapshot: what
# the check found, and the run's fix (doubted_restore)
MISMATCH = "does_not_match"
MISMATCH_FIX = "fix"
# what a switch or a deploy passes to start the app on such a database anyway (refuse_doubted)
ACCEPT_FLAG = "--accept-restored-data"
# steps after which the app may have served, or the data changed (any verb's)
SERVED_OR_CHANGED = {"start-slot", "migrate", "switch", "restore-database", "start-app-slots"}


def doubted_restore(env: Environment, run_id: str | None = None) -> dict[str, str] | None:
    """The last restore, when the database it left did not match its snapshot (its check
    says "do not start the app on it") and no run since restored, migrated or started the
    app (SERVED_OR_CHANGED): {run_id, action, problem, fix, before, target}. With the
    terminal gone only its record says so, and `runbook status` and a rollback run again
    (which would start the app on that database) must know (found by review)."""
    from runbook import journal

    for data in journal.past_records(env, but=run_id):
        listed = data.get("steps")
        steps = {s.get("name"): s for s in (listed if isinstance(listed, list) else [])
                 if isinstance(s, dict) and s.get("status") != "planned"}
        step = steps.get("verify-restore") or {}
        check = step.get("detail")
        if isinstance(check, dict) and isinstance(check.get(MISMATCH), str):
            safety = (steps.get("safety-snapshot") or {}).get("detail")
            safety = safety if isinstance(safety, dict) else {}
            return {"run_id": str(data.get("run_id")), "action": str(data.get("action")),
                    "check": str(step.get("title") or "verify-restore"),
                    "problem": check[MISMATCH], "fix": str(check.get(MISMATCH_FIX) or ""),
                    "before": str(safety.get(EARLIER) or safety.get("safety_snapshot") or ""),
                    "target": str(safety.get(TARGET) or "")}
        if SERVED_OR_CHANGED & steps.keys():
            return None
    return None


def doubted_fix(name: str, doubted: dict[str, str], again: str | None = None) -> str:
    """The fix while the restored database does not match its snapshot: the run's own (its
    check's), then the two commands that replace that database whole. `again`: the command
    that restores the snapshot again (an interrupted rollback's, as it was started)."""
    ways = []
    if doubted["before"]:
        ways.append(f"`runbook snapshot restore {name} "
                    f"{shlex.quote(Path(doubted['before']).name)}` restores the safety snapshot")
    if again is None and doubted["target"]:
        again = f"runbook snapshot restore {name} {shlex.quote(Path(doubted['target']).name)}"
    if again is not None:
        ways.append(f"`{again}` restores the snapshot again (and checks it again)")
    return "; ".join([doubted["fix"] or "do not start the app on it; investigate", *ways])


def restoring_command(name: str, record: Intent) -> str | None:
    """The command that finishes an interrupted `rollback --restore-snapshot` as it was
    started, or None when it restored nothing."""
    snap = record.record.get("restore_snapshot") if record.action == "rollback" else None
    if not isinstance(snap, str) or not snap:
        return None
    ended = " --end-sessions" if record.record.get("end_sessions") else ""
    return (f"runbook rollback {name} --to {record.to_version} --restore-snapshot "
            f"--snapshot {shlex.quote(snap)}{ended}")


def refuse_doubted(env: Environment, dead: Intent | None, run_id: str, action: str,
                   accept: bool | None = None) -> str | None:
    """Refuse (exit 4, nothing changed) while the database a restore left does not match its
    snapshot: this `action` (a rollback, a switch, a deploy) would start the app on it, which
    that check forbids (found by review: a rollback run again after it, then a switch and a
    deploy, started the app on that database, exit 0). `accept`: a switch's or a deploy's
    ACCEPT_FLAG, for on-call who has investigated and starts the app on that data on purpose:
    the refusal is then the warning returned, for the plan (and so the journal) to say. A
    rollback has none (None): --force does not pass it, only a restore, which replaces that
    database whole, goes on. None when no restore is doubted."""
    doubted = doubted_restore(env, run_id)
    if doubted is None:
        return None
    found = (f"{doubted['problem']} (the check \"{doubted['check']}\" of the "
             f"{doubted['action']} run {doubted['run_id']} failed, and no run has restored the "
             "database since)")
    if accept:
        return (f"{found}: overridden with {ACCEPT_FLAG}: this {action} starts the app on that "
                "database as it is")
    again = restoring_command(env.name, dead) \
        if dead is not None and dead.run_id == doubted["run_id"] else None
    fix = doubted_fix(env.name, doubted, again)
    if accept is not None:
        fix += (f"; or, once you have checked that data and accept it as it is, run this "
                f"{action} again with {ACCEPT_FLAG}")
    raise PreconditionError(f"{found}: this {action} would start the app on it; nothing was "
                            "changed", fix)
