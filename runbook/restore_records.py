"""What a restore's run records say, read without the snapshot modules: a rollback that
restores nothing plans without importing them (tests/test_speed.py), and it and `runbook
status` must still know when the last restore left a database that does not match its
snapshot."""

from __future__ import annotations

from pathlib import Path

from runbook.environment import Environment

EARLIER = "earlier safety snapshot"  # a step detail of the run record (killed_restore)
TARGET = "restore_target"  # the snapshot a restore replays: a step detail, kept for a rerun
# verify-restore's details when the restored database did not match its snapshot: what
# the check found, and the run's fix (doubted_restore)
MISMATCH = "does_not_match"
MISMATCH_FIX = "fix"
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
    import shlex

    ways = []
    if doubted["before"]:
        ways.append(f"`runbook snapshot restore {name} "
                    f"{shlex.quote(Path(doubted['before']).name)}` restores the safety snapshot")
    if again is None and doubted["target"]:
        again = f"runbook snapshot restore {name} {shlex.quote(Path(doubted['target']).name)}"
    if again is not None:
        ways.append(f"`{again}` restores the snapshot again (and checks it again)")
    return "; ".join([doubted["fix"] or "do not start the app on it; investigate", *ways])
