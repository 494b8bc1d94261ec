"""What a restore's run records say, read without the snapshot modules: a rollback that
restores nothing plans without importing them (tests/test_speed.py), and it, a switch, a
deploy and `runbook status` must still know when the last restore left a database that does
not match its snapshot. That doubt is also recorded beside the state file (`doubt_marker`),
where every operator's run sees it: the run records are per user. So are the snapshots an
unfinished restore still needs (`unfinished_marker`), which every operator's cleanup keeps."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runbook import files, times
from runbook.environment import Environment, command_arg
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
# those whose start clears the doubt recorded beside the state file (the executor's); a
# restore clears it once its own check passes: a replay that rolled back left the database
# the check doubted as it was
CLEARS_AT_START = SERVED_OR_CHANGED - {"restore-database"}
# verify-restore's detail once the doubt is recorded beside the state file: that file
# decides from then on, and its absence means a later run cleared it (doubted_restore)
MARKED = "doubt_marker"
MARKER_LIMIT = 1 << 16  # the marker is a few hundred bytes; a larger file is not one
# a rollback's intent record once its restore's check passed (the database is the
# snapshot's, whole): the run that finishes it after a kill ends that restore (Plan's end)
VERIFIED = "restore_verified"
# the run record's context key of the run that so ended it: the killed run's id, for this
# operator's readers even when the record beside the state file could not say it
FINISHED_RESTORE = "finished_restore"


def doubt_marker(env: Environment) -> Path:
    """Where a restore whose check failed records it: beside the state file, as the h2c
    marker (slots.held_marker) and the intent record, so every operator's run sees it. Only
    in the run records (`~/.togather/runs`, per user, mode 0600), another operator's switch,
    deploy or rollback (or sudo's) never saw it and started the app on that database."""
    state = Path(os.path.realpath(env.state_file))
    return state.with_name(f".{state.name}.{env.name}.restore-doubted.json")


def record_doubt(env: Environment, doubted: dict[str, str]) -> str | None:
    """Write the doubt (doubted_restore's keys) beside the state file, readable by every
    operator (it holds no secret: masked anyway); None, or why it could not be written."""
    from runbook.redact import redact

    record = {"run_id": doubted["run_id"], "action": doubted["action"],
              "check": doubted["check"], "problem": redact(doubted["problem"]),
              "fix": redact(doubted["fix"]), "safety_snapshot": doubted["before"],
              "restored_snapshot": doubted["target"], "at": times.format_utc(times.now())}
    target = doubt_marker(env)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write(target, json.dumps(record, indent=1).encode(), default_mode=0o644)
    except OSError as exc:
        return (f"the failed check could not be recorded in {target} ({exc.strerror or exc}): "
                "only this operator's run records say it, so another operator's switch, "
                "deploy or rollback would start the app on that database: tell them")
    return None


def _marked(env: Environment) -> dict[str, str] | None:
    """The doubt recorded beside the state file, or None when there is none; a file there
    that cannot be read is a PreconditionError naming it (fail closed: it says "do not start
    the app")."""
    target = doubt_marker(env)
    try:
        data: Any = json.loads(files.read_regular(target, MARKER_LIMIT))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        data, problem = None, why
    else:
        problem = "not a record of a restore's failed check"
    if isinstance(data, dict) and all(isinstance(data.get(k), str) and data[k]
                                      for k in ("run_id", "problem")):
        def text(key: str) -> str:
            value = data.get(key)
            return value if isinstance(value, str) else ""

        return {"run_id": text("run_id"), "action": text("action") or "restore",
                "check": text("check") or "verify-restore", "problem": text("problem"),
                "fix": text("fix"), "before": text("safety_snapshot"),
                "target": text("restored_snapshot")}
    raise PreconditionError(
        f"{target}, which records whether the last restore left a database that does not "
        f"match its snapshot, cannot be read ({problem})",
        f"read it (`cat {shlex.quote(str(target))}`) and the restore runs' journals; restore "
        f"a snapshot again (`runbook rollback {command_arg(env)} --restore-snapshot` or `runbook "
        f"snapshot restore {command_arg(env)} <snapshot>`), which replaces that file, or, once you "
        f"have checked the data, move it aside (`mv {shlex.quote(str(target))} "
        f"{shlex.quote(str(target))}.checked`)")


def unfinished_marker(env: Environment) -> Path:
    """Where a restore names, before it replaces the database, the snapshots a rerun of it
    needs (the one it replays, its safety snapshot): beside the state file, as the doubt
    marker, so every operator's `snapshot cleanup` keeps them. Only in the run records
    (per user), root's cron cleanup deleted what another operator's killed restore replays
    (found by review)."""
    state = Path(os.path.realpath(env.state_file))
    return state.with_name(f".{state.name}.{env.name}.restore-unfinished.json")


UNFINISHED_LIMIT = 1 << 20  # a few hundred bytes per unfinished restore
# the record's list of restores a later run finished (forget_finished): {run_id,
# FINISHED_BY, at}; the newest FINISHED_KEPT of them (a hundred bytes each), as every
# operator's killed run's own record keeps calling it killed during or after its restore
FINISHED = "finished"
FINISHED_BY = "finished_by"
FINISHED_KEPT = 64
# an unfinished restore's key once a later run started the app or changed the data: the
# database is no longer what it left, so its safety snapshot no longer holds "the data from
# before" the next restore (killed_restore; cleanup still keeps it)
SERVED_SINCE = "served_since"


def unfinished_restores(env: Environment) -> list[dict[str, str]]:
    """The restores begun and not finished (killed, their COMMIT's outcome unknown, or
    failed once the database was replaced), oldest first: {run_id, at, restore_target,
    safety_snapshot, EARLIER, and SERVED_SINCE once a later run started the app or changed
    the data}; [] when there is no such file. OSError or ValueError when it
    cannot be read: the caller fails closed (nothing tells what it keeps)."""
    try:
        data: Any = json.loads(files.read_regular(unfinished_marker(env), UNFINISHED_LIMIT))
    except FileNotFoundError:
        return []
    except RecursionError:
        raise ValueError("nested too deeply") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ValueError("not a record of unfinished restores")
    return [{str(k): v for k, v in r.items() if isinstance(v, str)} for r in runs]


def _finished(env: Environment) -> list[dict[str, str]]:
    """The record's FINISHED entries, oldest first; [] when there is none or the record
    cannot be read (its readers then call those restores killed: the safe side)."""
    try:
        data: Any = json.loads(files.read_regular(unfinished_marker(env), UNFINISHED_LIMIT))
    except (OSError, ValueError, RecursionError):
        return []
    listed = data.get(FINISHED) if isinstance(data, dict) else None
    return [{str(k): v for k, v in f.items() if isinstance(v, str)}
            for f in (listed if isinstance(listed, list) else [])
            if isinstance(f, dict) and isinstance(f.get("run_id"), str)]


def finished_restores(env: Environment) -> dict[str, str]:
    """The runs whose restore a later run finished (forget_finished), every operator's:
    {run_id: the finishing run's id}. The killed run's own record (per user) still says it
    was killed during or after its restore; its readers (killed_restore, the cleanup's
    kept_for_killed_restore) read it as finished. {} when the record cannot be read."""
    return {f["run_id"]: f.get(FINISHED_BY, "") for f in _finished(env)}


def _write_unfinished(env: Environment, runs: list[dict[str, str]],
                      finished: list[dict[str, str]] | None = None) -> None:
    """The record as `runs` and `finished` (by default the FINISHED it has), atomically in
    one write: a restore is never taken out without being said finished; removed when both
    are empty. OSError as the write's."""
    target = unfinished_marker(env)
    finished = _finished(env) if finished is None else finished[-FINISHED_KEPT:]
    if not runs and not finished:
        try:
            target.unlink()
        except FileNotFoundError:
            return
        files.fsync_dir(target.parent)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"runs": runs, **({FINISHED: finished} if finished else {})}
    files.atomic_write(target, json.dumps(record, indent=1).encode(),
                       default_mode=0o644)  # no secret: names and ids; every cleanup reads it


def record_unfinished(env: Environment, run_id: str, *, target: str, safety: str,
                      earlier: str = "") -> str | None:
    """Add this restore to the record beside the state file, durably, before it replaces the
    database: killed from then on, every operator's cleanup keeps what its rerun needs. None,
    or why it could not be added (the run goes on: it is said, and this operator's run
    records still name them). A record there that cannot be read is never overwritten:
    every cleanup keeps every snapshot while it is so, these too."""
    where = unfinished_marker(env)
    try:
        runs = [r for r in unfinished_restores(env) if r.get("run_id") != run_id]
        # milliseconds: killed_restore orders it among the run records' start times
        runs.append({"run_id": run_id, "at": times.format_ms_utc(), TARGET: target,
                     "safety_snapshot": safety, EARLIER: earlier})
        _write_unfinished(env, runs)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return (f"the snapshots this restore needs could not be recorded in {where} ({why}): "
                f"only this operator's run records name them, so another operator's `snapshot "
                f"cleanup` may delete {Path(target).name} once it expires if this run is "
                "killed: tell them")
    return None


def forget_unfinished(env: Environment, run_id: str | None = None) -> str | None:
    """Take `run_id`'s restore out of the record beside the state file (its replay rolled
    back: the database is as it was), or, with None, empty it (a restore finished: what
    earlier ones kept is ordinary retention again, as the run records' reading stops at a
    finished restore; the restores said FINISHED stay said so). None, or the line saying it
    could not be (it then keeps them: safe, and said)."""
    where = unfinished_marker(env)
    try:
        runs = [] if run_id is None else unfinished_restores(env)
        if run_id is not None and not any(r.get("run_id") == run_id for r in runs):
            return None
        _write_unfinished(env, [r for r in runs if r.get("run_id") != run_id])
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return (f"{where} could not be updated ({why}): every `snapshot cleanup` keeps the "
                f"snapshots it names; once the restores it names are finished or given up, "
                f"remove it (`rm {shlex.quote(str(where))}`)")
    return None


def forget_finished(env: Environment, run_id: str, by: str) -> str | None:
    """A killed run's restore, its check passed (VERIFIED), ended by the run `by` that
    finished that run: its entry and every earlier one go, as they would had it not been
    killed (forget_unfinished at its end); a later one, another operator's restore begun
    since, stays. Left there, every operator's status called it unfinished for good, and its
    fix replayed the old snapshot over every write since (found by a disk-full fuzz). In the
    same write they are said FINISHED: the killed run's own record still says it was killed
    during or after its restore, and its readers then named its safety snapshot (from before
    the finished restore) as "the data from before" the next one, and every cleanup kept it
    (found by review). Killed before that write, nothing changed: still unfinished (safe).
    None, or the line saying it could not be (it then keeps them: safe, and said)."""
    where = unfinished_marker(env)
    try:
        runs = unfinished_restores(env)
        ids = [r.get("run_id") for r in runs]
        upto = ids.index(run_id) + 1 if run_id in ids else 0
        ended = [i for i in ids[:upto] if isinstance(i, str)] or [run_id]
        at = times.format_ms_utc()
        finished = [f for f in _finished(env) if f["run_id"] not in ended]
        finished += [{"run_id": i, FINISHED_BY: by, "at": at} for i in ended]
        _write_unfinished(env, runs[upto:], finished)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return (f"{where} could not be updated ({why}): every `snapshot cleanup` keeps the "
                f"snapshots it names, `runbook status` calls the restore of the run {run_id} "
                f"unfinished although it finished, and the run records of whoever ran it "
                f"(this run's say it finished) call it killed during or after its restore, "
                f"naming its safety snapshot as the data from before the next one, which it "
                f"is not; remove it (`rm {shlex.quote(str(where))}`)")
    return None


def mark_served(env: Environment, run_id: str, why: str) -> str | None:
    """Record, on every other unfinished restore beside the state file, that the run
    `run_id` starts the app or changes the data (`why`), before it does: another operator's
    later restore then no longer names their safety snapshots as the data from before it
    (only the run records of this operator said so). None, or the line saying it could not
    be recorded. A record that cannot be read is left as it is: its readers fail closed."""
    where = unfinished_marker(env)
    if not os.path.lexists(where):
        return None
    try:
        runs = unfinished_restores(env)
    except (OSError, ValueError):
        return None
    if all(r.get(SERVED_SINCE) or r.get("run_id") == run_id for r in runs):
        return None
    try:
        _write_unfinished(env, [r if r.get(SERVED_SINCE) or r.get("run_id") == run_id
                                else r | {SERVED_SINCE: f"{why} ({times.format_ms_utc()})"}
                                for r in runs])
    except OSError as exc:
        return (f"{where} could not be updated ({exc.strerror or exc}) although {why}: "
                "another operator's next restore may name a safety snapshot it lists as the "
                "data from before it, which it no longer is (the app has served since)")
    return None


def unfinished_unreadable(env: Environment, exc: OSError | ValueError) -> PreconditionError:
    """The error of a record of unfinished restores that cannot be read: what its readers
    say when they fail closed (whether another operator's restore was killed, and where the
    data from before it is, cannot be told)."""
    where = unfinished_marker(env)
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return PreconditionError(
        f"{where}, which records the restores begun and not finished (every operator's), "
        f"cannot be read ({why}): whether one was killed during or after its restore, and "
        "which safety snapshot holds the data from before it, cannot be told",
        f"read it (`cat {shlex.quote(str(where))}`) and keep every snapshot it names; make it "
        f"readable to this user, or, once the restores it names are finished or given up, "
        f"move it aside (`mv {shlex.quote(str(where))} {shlex.quote(str(where))}.checked`)")


def clear_doubt(env: Environment, why: str) -> tuple[str, bool] | None:
    """Remove the doubt recorded beside the state file, `why` (this run restored again and
    its check passed; it starts the app on that database): (the journal's line, whether it
    was removed), or None when there was none. Not removed (permissions), every later
    switch, deploy and rollback is refused on it: the line says how to remove it."""
    target = doubt_marker(env)
    if not os.path.lexists(target):
        return None
    try:
        doubted = _marked(env)
    except PreconditionError:
        doubted = None
    what = (f"the restore doubt of the {doubted['action']} run {doubted['run_id']} "
            f"({doubted['problem']})" if doubted is not None else "the restore doubt")
    try:
        target.unlink()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return (f"{what} recorded in {target} could not be cleared ({exc.strerror or exc}) "
                f"although {why}: every later switch, deploy and rollback is refused on it; "
                f"remove it (`rm {shlex.quote(str(target))}`)", False)
    files.fsync_dir(target.parent)
    return f"{what} recorded in {target} is cleared: {why}", True


def doubted_restore(env: Environment, run_id: str | None = None) -> dict[str, str] | None:
    """The last restore, when the database it left did not match its snapshot (its check
    says "do not start the app on it") and no run since restored, migrated or started the
    app (SERVED_OR_CHANGED): {run_id, action, check, problem, fix, before, target}. With
    the terminal gone only its records say so, and `runbook status` and a rollback run again
    (which would start the app on that database) must know (found by review).
    Read first beside the state file (`doubt_marker`; PreconditionError when that file
    cannot be read), then in this operator's run records: a doubt recorded before that file
    existed, or by a run killed before it wrote it. A record whose doubt went to that file
    (MARKED) is decided by it: gone, a later run cleared it, maybe another operator's."""
    from runbook import journal

    marked = _marked(env)
    if marked is not None:
        return marked
    for data in journal.past_records(env, but=run_id):
        listed = data.get("steps")
        steps = {s.get("name"): s for s in (listed if isinstance(listed, list) else [])
                 if isinstance(s, dict) and s.get("status") != "planned"}
        step = steps.get("verify-restore") or {}
        check = step.get("detail")
        check = check if isinstance(check, dict) else {}
        problem, fix = check.get(MISMATCH), check.get(MISMATCH_FIX)
        if not isinstance(problem, str) and step.get("status") == "failed":
            # a check that failed without saying what it found: a runbook older than the
            # MISMATCH detail wrote only its error (after an upgrade mid-incident, that
            # doubt went unseen and a switch started the app on the database), or the
            # check could not run; either way the database is not known to match
            problem = str(step.get("error") or "its check failed, saying nothing of why")
            fix = ""
        if isinstance(problem, str):
            if check.get(MARKED):
                return None  # recorded beside the state file, and cleared since
            safety = (steps.get("safety-snapshot") or {}).get("detail")
            safety = safety if isinstance(safety, dict) else {}
            return {"run_id": str(data.get("run_id")), "action": str(data.get("action")),
                    "check": str(step.get("title") or "verify-restore"),
                    "problem": problem, "fix": str(fix or ""),
                    "before": str(safety.get(EARLIER) or safety.get("safety_snapshot") or ""),
                    "target": str(safety.get(TARGET) or "")}
        if SERVED_OR_CHANGED & steps.keys():
            return None
    return None


def doubted_fix(env: Environment, doubted: dict[str, str], again: str | None = None) -> str:
    """The fix while the restored database does not match its snapshot: the run's own (its
    check's), then the two commands that replace that database whole. `again`: the command
    that restores the snapshot again (an interrupted rollback's, as it was started)."""
    name = command_arg(env)
    ways = []
    if doubted["before"]:
        ways.append(f"`runbook snapshot restore {name} "
                    f"{shlex.quote(Path(doubted['before']).name)}` restores the safety snapshot")
    if again is None and doubted["target"]:
        again = f"runbook snapshot restore {name} {shlex.quote(Path(doubted['target']).name)}"
    if again is not None:
        ways.append(f"`{again}` restores the snapshot again (and checks it again)")
    return "; ".join([doubted["fix"] or "do not start the app on it; investigate", *ways])


def restoring_command(env: Environment, record: Intent) -> str | None:
    """The command that finishes an interrupted `rollback --restore-snapshot` as it was
    started, or None when it restored nothing."""
    snap = record.record.get("restore_snapshot") if record.action == "rollback" else None
    if not isinstance(snap, str) or not snap:
        return None
    ended = " --end-sessions" if record.record.get("end_sessions") else ""
    moved = record.record.get("moved_from")  # accepted as this database's before it moved
    if isinstance(moved, str) and moved:
        ended += f" --moved-from {shlex.quote(moved)}"
    return (f"runbook rollback {command_arg(env)} --to {record.to_version} --restore-snapshot "
            f"--snapshot {shlex.quote(snap)}{ended}")


def refuse_doubted(env: Environment, dead: Intent | None, run_id: str, action: str,
                   accept: bool | None = None, *, serving: bool = False) -> str | None:
    """Refuse (exit 4, nothing changed) while the database a restore left does not match its
    snapshot: this `action` (a rollback, a switch, a deploy) would start the app on it, which
    that check forbids (found by review: a rollback run again after it, then a switch and a
    deploy, started the app on that database, exit 0). `accept`: a switch's or a deploy's
    ACCEPT_FLAG, for on-call who has investigated and starts the app on that data on purpose:
    the refusal is then the warning returned, for the plan (and so the journal) to say. A
    rollback has none (None): --force does not pass it, only a restore, which replaces that
    database whole, goes on. `serving`: a switch that only records what serves (the app
    already serves on that database, it starts nothing): refused all the same (it would
    record that data as fine), in those words; accepted, it clears the doubt as a switch that
    starts the app does (switch._record_only). None when no restore is doubted."""
    def does(it: str, accepted: bool) -> str:  # what this action does on that database
        if serving:
            return (f"the app already serves on {it}; this {action} records it as serving as "
                    "it is, and clears the doubt" if accepted else
                    f"the app already serves on {it}; this {action} would record it as "
                    "serving, which waits for your decision about that data")
        return (f"this {action} starts the app on {it} as it is" if accepted
                else f"this {action} would start the app on {it}")

    try:
        doubted = doubted_restore(env, run_id)
    except PreconditionError as exc:  # the record beside the state file cannot be read
        if accept:
            return (f"{exc.message}: overridden with {ACCEPT_FLAG}: "
                    f"{does('the restored database', True)}")
        fix = exc.fix or ""
        if accept is not None:
            fix += (f"; or, once you have checked that data and accept it as it is, run this "
                    f"{action} again with {ACCEPT_FLAG}")
        raise PreconditionError(f"{exc.message}: {does('the restored database', False)}; "
                                "nothing was changed", fix) from None
    if doubted is None:
        return None
    found = (f"{doubted['problem']} (the check \"{doubted['check']}\" of the "
             f"{doubted['action']} run {doubted['run_id']} failed, and no run has restored the "
             "database since)")
    if accept:
        return f"{found}: overridden with {ACCEPT_FLAG}: {does('that database', True)}"
    again = restoring_command(env, dead) \
        if dead is not None and dead.run_id == doubted["run_id"] else None
    fix = doubted_fix(env, doubted, again)
    if accept is not None:
        fix += (f"; or, once you have checked that data and accept it as it is, run this "
                f"{action} again with {ACCEPT_FLAG}")
    raise PreconditionError(f"{found}: {does('it', False)}; nothing was changed", fix)
