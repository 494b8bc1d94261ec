"""The snapshot restore as plan steps, and `runbook snapshot restore` as a run.

The restore's mechanics (verify, replay in one transaction, prove the result) live in the
runbook/snapshots package, which knows nothing of plans or runs; this module composes them
into steps for the one executor (runbook/plan.py, runbook/run.py), so the orchestrator calls
snapshots and never the other way round. `rollback --restore-snapshot` uses `restore_steps`.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runbook import compose
from runbook import intent as intents
from runbook.database import SchemaVersion
from runbook.environment import Environment, Slot, command_arg
from runbook.errors import ExitCode, PreconditionError, RunbookError
from runbook.plan import Aside, NotPutBack, Plan, Skipped, Stays, Step, StepContext
from runbook.restore_records import (
    EARLIER,
    FINISHED_RESTORE,
    MARKED,
    MISMATCH,
    MISMATCH_FIX,
    SERVED_OR_CHANGED,
    SERVED_SINCE,
    TARGET,
    VERIFIED,
    clear_doubt,
    doubt_marker,
    doubted_fix,
    doubted_restore,
    finished_restores,
    forget_unfinished,
    mark_served,
    record_doubt,
    record_unfinished,
    unfinished_marker,
    unfinished_restores,
    unfinished_unreadable,
)
from runbook.run import RunResult, perform
from runbook.snapshots import commands, give_back, sessions
from runbook.snapshots.dump import create
from runbook.snapshots.replay import (
    OutcomeUnknown,
    RestoreRun,
    after_failed_replay,
    check_lock_room,
    check_matches,
    check_privileges,
    prelude,
    replay,
)
from runbook.snapshots.stats import check_readable, current_state, loss_window, server_version
from runbook.snapshots.store import SAFETY_REASON, Snapshot, SnapshotError, default_pick, find
from runbook.snapshots.verify import check_server, identify, verify
from runbook.times import format_utc as _fmt

if TYPE_CHECKING:
    from runbook import docker

__all__ = ["check_named", "doubted_fix", "doubted_restore", "kept_for_killed_restore",
           "known_killed_restore", "prepare", "restore", "restore_steps", "restored_by",
           "start_step"]


CHECK = "Verify schema_migrations and the row counts"  # verify-restore's title


def check_named(env: Environment, ref: str | Path | None) -> None:
    """A snapshot named on the command line, looked up before the lock, the journal or the
    run record are written (as rollback.check_target checks --to): a typo, a directory or a
    file that is no snapshot was refused (exit 2) only under the lock, leaving a journal and
    a run record that `status` then showed as the last run, failed (found by review). Only
    bad input is refused here, from the name and the sidecar (identify: no dump read, no
    Docker asked); the plan judges everything else, as it always did."""
    if ref is None or str(ref) == "":
        return  # "the newest": picked by the plan
    try:
        identify(env, find(env, ref))
    except SnapshotError as exc:
        if exc.exit_code == ExitCode.USAGE:
            raise
    except RunbookError:
        pass  # the configuration, an unreadable folder: the plan says it, as before


def prepare(env: Environment, snap: Snapshot | str | Path,
            moved_from: str | None = None, command: str | None = None) -> RestoreRun:
    """Find and verify the snapshot NOW (raises, changing nothing): the typed record the
    restore's steps share while they run (safety snapshot, stopped containers, restored).
    `moved_from`, `command`: see verify()."""
    snapshot = snap if isinstance(snap, Snapshot) else find(env, snap)
    return RestoreRun(snapshot, verify(env, snapshot, moved_from=moved_from, command=command))


def _refuse_rm_slots(env: Environment, chosen: list[Slot]) -> None:
    """Refuse (exit 4, nothing changed) an app slot the maintenance stop would stop that was
    started with `docker run --rm`: Docker deletes it as it stops, so the undo's `docker
    start` found no container and nothing served (exit 5, proxy 502; found by review)."""
    from runbook import docker

    for slot in chosen:
        info = docker.inspect(env.slot(slot).container)
        if not (info.up and info.auto_remove):
            continue
        tag = docker.tag_of(info.image or "")
        how = (f"through compose (`{compose.recreate_slot(env, slot, tag).display()}`)"
               if tag and compose.can_recreate(env, slot)
               else f"with {info.image} the way this host's own deploy runs it (its "
                    "`docker run`, without --rm)")
        raise PreconditionError(
            f"the {slot} slot's container {info.name} was started with --rm: Docker deletes "
            "it when the restore stops it, so neither the undo nor a rerun could start it "
            "again; nothing was changed",
            f"recreate {info.name} without --rm {how}, then run again; or restore by hand")


def restore_steps(env: Environment, run: RestoreRun,
                  slots: Iterable[Slot | str] | None = None,
                  facts: dict[str, Any] | None = None,
                  run_id: str | None = None, standalone: bool = False,
                  end_sessions: bool = False, switch_to: Slot | None = None,
                  record: dict[str, Any] | None = None,
                  keep_stopped: bool = False, drained_first: bool = False) -> list[Step]:
    """The restore as plan steps, sharing `run` (from prepare()).

    Steps: verify (done) -> stop the app slots (never the database) -> safety snapshot ->
    DROP SCHEMA + replay in one transaction -> verify schema_migrations and row counts.
    The safety snapshot comes after the stop: taken while the app still wrote, a write made
    after its export and before the stop would be in neither it nor the restored database.
    Starting the target slot afterwards is the caller's step. `facts` is only the plan's
    JSON summary (--format json, reports): restore_snapshot, restore_migration_version,
    privileges_lost (the plan's warning of what other roles lose, or None; the caller shows
    it), unproven_sessions (the plan's warnings of the sessions the runbook cannot tell
    from the app slots', which the check after the stop may refuse; the caller shows them),
    and once known safety_snapshot and restored; no step reads it. `run_id` (this
    run's) lets the plan find a previous run killed during or after its own restore
    (`killed_restore`): this run's safety snapshot is then of the database as that run left
    it, and the data from before it is in that run's safety snapshot, which the plan and
    every message name.
    `standalone`: `runbook snapshot restore`, with no target slot to switch to afterwards
    (what a failure after the restore tells on-call to run differs). `keep_stopped`: with
    `standalone`, `--keep-stopped`: nothing starts the app slots again, so the plan says the
    service is down until on-call starts them. `end_sessions`: other
    sessions on the database found before the safety snapshot are ended, not refused
    (snapshots/sessions.py: the app slots are not the only writers a host has).
    `switch_to`: the slot the caller starts and switches to after the restore, named in the
    fix when the run stops once the database is restored. `record`: the rollback's intent
    record, given VERIFIED once the check passed, on disk before the switch: the run that
    finishes it after a kill ends this restore (never one killed before its check).
    `drained_first`: planned for the fleet's maintenance restore, which runs once every host
    is drained: the unproven sessions' warnings say the drain ends the other hosts' apps.
    """
    from runbook import docker, health
    from runbook.snapshots import room

    snapshot, verified = run.snapshot, run.verified
    facts = facts if facts is not None else {}
    facts.update(restore_snapshot=str(snapshot.path), safety_snapshot=None,
                 stopped_containers=run.stopped, held_down=run.held_down, restored=False,
                 restore_migration_version=verified.migration_version)
    chosen = [Slot(s) for s in (slots if slots is not None else env.slots)]
    containers = [env.slot(s).container for s in chosen]
    _refuse_rm_slots(env, chosen)
    tgt = commands.target(env)
    commands.require_container(env)
    commands.require_login(env)  # the safety snapshot's pg_dump and the replay's psql
    # unreachable, or what the safety snapshot's pg_dump may not read (a table, a large
    # object), refused here, before any change: found by the dump, the app was down
    check_readable(env)
    now_schema, _ = current_state(env)
    run.schema_now = now_schema
    check_server(snapshot, verified, server_version(env))
    taken = check_privileges(env)  # refuses a replay this user cannot run, before any change
    check_lock_room(env)  # and one the server's lock table cannot hold
    # a full snapshot folder, refused before the stop: found by the dump, the app slots were
    # down by then (users got errors) for a run that could not go on
    room.refuse_without_snapshot_room(env, "the safety snapshot")
    # a session the check after the stop would refuse, seen now: refused before the stop;
    # one it may refuse (the runbook cannot tell it from the app's) is named in the plan
    facts["unproven_sessions"] = [
        sessions.unproven_warning(s, end_sessions, drained_first)
        for s in sessions.refuse_before_stop(env, verified.database, end_sessions)]
    facts["privileges_lost"] = (
        f"snapshots keep no owners or GRANTs, nor does the safety snapshot: the restore gives "
        f"back, in its own transaction, what other roles hold now ({taken[1]}), each where "
        f"{taken[0]} may (a superuser may all); what it is refused is named when it is done, "
        "with the statement to run" if taken else None)
    window = loss_window(env, snapshot).describe()
    killed, unreadable = known_killed_restore(env, run_id)
    facts["earlier_safety_snapshot"] = killed["safety"] if killed else None
    facts["unfinished_unreadable"] = (
        f"{unreadable.message}: if the serving slot is found stopped, it stays stopped when "
        f"this run stops before its restore; {unreadable.fix}" if unreadable else None)
    run.schema_before_killed = _schema_before(killed)
    kept_down = _kept_down(killed, run.schema_before_killed, now_schema) \
        if unreadable is None else (f"{unfinished_marker(env)} cannot be read, so it cannot "
                                    "be checked that no restore killed since left a database "
                                    "the code that served does not fit")

    down = (f"the database WAS restored to {snapshot.name} and the app slots are stopped: "
            "the service is down")

    def before_restore() -> str:
        """Where the data from before the restore is: a killed earlier run's safety
        snapshot when there was one (this run's own then holds what that run left)."""
        mine = run.safety.path if run.safety else None
        if killed is None and unreadable is not None:
            return (f"the data from before the restore is in {mine}, unless an earlier "
                    f"restore was killed: {unfinished_marker(env)}, which cannot be read, "
                    "names its safety snapshot (keep every snapshot it names)")
        if killed is None:
            return f"the data from before the restore is in {mine}"
        return (f"the data from before the restore is in {killed['safety']} (the safety "
                f"snapshot of the killed run {killed['run_id']}; {mine} is the database as "
                "that run left it)")

    def take_safety(ctx: StepContext) -> None:
        found = sessions.wait_alone(env, ctx.heartbeat)
        if found and end_sessions:
            # said before it is done: a run killed while ending them still records it
            ctx.note(ending_sessions=sessions.refusal_text(found))
            left = sessions.end(env, found, ctx.heartbeat)
            ctx.note(ended_sessions=sessions.refusal_text(
                [s for s in found if s not in left]) or "none")
            if left:
                raise PreconditionError(
                    f"other sessions on database {verified.database} could not be ended: "
                    f"{sessions.refusal_text(left)}; the restore did not begin",
                    "end them as a database superuser (`SELECT pg_terminate_backend(PID)`), "
                    "or stop what they belong to, then run again")
            found = sessions.wait_alone(env, ctx.heartbeat)  # one reconnecting at once
            if found:
                raise PreconditionError(
                    f"other sessions connected to database {verified.database} again once "
                    f"the ones found were ended: {sessions.refusal_text(found)}; the restore "
                    "did not begin", "stop what they belong to (a worker, a pooler that "
                    "reconnects), then run again")
        elif found:
            raise PreconditionError(
                f"other sessions are connected to database {verified.database} with the app "
                f"slots stopped: {sessions.refusal_text(found)}; a write one made after the "
                "safety snapshot would be in neither it nor the restored database, so the "
                "restore did not begin", f"{sessions.STOP_THEM}, or {sessions.END_THEM}")
        # read by `kept_for_killed_restore`: the rerun a killed restore's fix prescribes
        # needs this file too, which cleanup would otherwise delete once it expires
        ctx.note(**{TARGET: str(snapshot.path)})
        run.safety = create(env, SAFETY_REASON)
        facts["safety_snapshot"] = str(run.safety.path)
        ctx.note(safety_snapshot=str(run.safety.path))
        if run.safety.warning:  # large objects written since the target: it cannot restore
            ctx.notice(f"the safety snapshot {run.safety.name}: {run.safety.warning}")
        if killed is not None:  # carried on: a rerun of this run, killed too, still finds it
            ctx.note(**{EARLIER: killed["safety"]})

    stopped_at: list[float] = []  # when this run stopped its first app slot

    def stop_slots(ctx: StepContext) -> None:
        from runbook import slots as slotmod

        def restart() -> Stays | Aside | None:
            if run.restored:  # old code on the restored schema: left stopped for a human
                raise Skipped("the database was restored: the app slots stay stopped")
            if run.outcome_unknown:  # maybe restored: neither code is known to fit it
                raise NotPutBack("the app slots were left stopped: the database may be "
                                 "restored, and neither code is known to fit it")
            started = _start_again()
            if run.held_down:  # the service stays down: exit 5, never "traffic stays" (1)
                return Stays(f"THE SERVICE IS DOWN: {run.held_down[0]}, which serves, was "
                             f"left stopped as the killed run left it: {kept_down}",
                             "fix the cause and run the same command again: it restores the "
                             "snapshot whole, then starts the code that fits it")
            if started and stopped_at:
                # exit 1 reads "traffic stayed on a healthy slot": true of where it is, not
                # of the time between (found by a disk-full fuzz: users got 502s then)
                return Aside(f"the app was stopped for {time.monotonic() - stopped_at[0]:.0f}"
                             " s and is running again (users got errors meanwhile)")
            return None

        def _start_again() -> list[Slot]:
            started: list[Slot] = []
            for slot, name in zip(chosen, containers, strict=True):
                if name in run.stopped and not _stopped_one(run, name).running:
                    if not started:  # said before the app serves (and writes) again
                        said = mark_served(env, run_id or "?", f"the restore run "
                                           f"{run_id or '?'} starts the app slots again (its "
                                           "undo)")
                        if said is not None:
                            ctx.notice(said)
                    docker.run(docker.start_action(name, run.stopped_ids.get(name)))
                    started.append(slot)
            for slot in started:  # "traffic stays where it was" must be true when we exit
                report = health.wait_healthy(env, slot)
                if not report.ok:
                    raise RunbookError(f"the {slot} slot was started again but is not healthy: "
                                       f"{report.reason()}", f"check `docker logs --tail 100 "
                                       f"{env.slot(slot).container}`",
                                       exit_code=ExitCode.ATTENTION)
            return started

        # The undo is registered, and each container listed, BEFORE its stop: a Ctrl-C or a
        # failure during the second stop (or inside the first, which Docker finishes anyway)
        # must start the serving slot again, not report "nothing took effect" with it down.
        ctx.on_failure("start the stopped app containers again", restart)
        # a serving slot an interrupted run already stopped is this run's to start again too:
        # its undo otherwise left the service down under "traffic stays where it was"
        left = _serving_but_stopped(env)
        if left is not None and left in containers and left not in run.stopped:
            if kept_down is None:
                run.stopped.append(left)
            else:  # the killed run may have restored: its code may not fit the schema now
                run.held_down.append(left)
                # read by the next run's killed_restore: this run let nothing serve
                ctx.note(held_down=left)
        for slot, name in zip(chosen, containers, strict=True):
            if name in run.stopped:
                continue
            # a paused or restarting one too: `docker stop` ends both, and either could run
            # old code against the database being replaced (a paused app may hold a lock)
            if (info := docker.inspect(name)).up:
                run.stopped.append(name)
                if info.container_id:
                    run.stopped_ids[name] = info.container_id
                stopped_at[:] = stopped_at or [time.monotonic()]
                ctx.fault(f"restore.stopping-{slot}")
                slotmod.stop(env, slot, maintenance=True, ident=info.container_id)
        ctx.note(stopped=", ".join(run.stopped) or "none were running")

    def do_restore(ctx: StepContext) -> None:
        safety = run.safety.path if run.safety else None
        # beside the state file before the database is replaced: killed from here on, every
        # operator's cleanup keeps what the rerun needs (the run record is this user's)
        unrecorded = record_unfinished(env, run_id or "?", target=str(snapshot.path),
                                       safety=str(safety or ""),
                                       earlier=killed["safety"] if killed else "")
        if unrecorded is not None:
            ctx.note(unfinished_not_recorded=unrecorded)
            ctx.notice(unrecorded)
        try:
            replayed = replay(env, verified, ctx.heartbeat)
        except OutcomeUnknown as exc:
            run.outcome_unknown = True
            ctx.note(restore_outcome=UNKNOWN)  # the next run's killed_restore reads it
            exc.fix = f"{exc.fix}; {before_restore()}"
            raise
        except RunbookError as exc:
            failed = after_failed_replay(env, run, exc, safety)
            if failed.exit_code == ExitCode.FAILED_SAFELY and run_id is not None:
                # the database is as it was: this run's snapshots are copies (an earlier
                # killed run's stay named); kept, were it not proved unchanged
                said = forget_unfinished(env, run_id)
                if said is not None:
                    ctx.note(unfinished_not_cleared=said)
            raise failed from None
        run.restored = facts["restored"] = True
        # undone, the app slots stay stopped on the restored data: a signal from here is held
        # until the code that fits it serves (the commit, or a standalone restore's end)
        ctx.until_commit("the database was restored")
        if replayed.committed_anyway:
            ctx.notice(replayed.committed_anyway)
            ctx.note(exec_failed_but_committed=replayed.committed_anyway)
        refused = replayed.not_given_back
        if refused:  # said where the terminal ends: the app may fail on what its role lost
            said = give_back.describe(refused, taken[0] if taken else "the restoring user")
            ctx.notice(said)
            # every statement in the run record, the terminal naming only the first few
            ctx.note(not_given_back="; ".join(r.describe() for r in refused))
        elif refused is None and taken:
            ctx.notice(f"whether the restore gave back what other roles held before it could "
                       f"not be read (psql's output was lost): {taken[1]}; check them, and "
                       "re-grant what is missing (`GRANT ... TO <role>`, `ALTER ... OWNER TO "
                       "<role>`)")
        elif taken:
            ctx.note(given_back=taken[1])
        arg = command_arg(env)
        if standalone:  # Caddy still dials the slot it served: a switch to it is refused
            fit = [n for n in run.stopped + run.held_down if n not in run.unfit]
            then = (f"start the stopped app containers on the restored database (`docker "
                    f"start {shlex.join(fit) or '<container>'}`, then `runbook healthcheck "
                    f"{arg}`), "
                    f"or, if their code needs another schema, `runbook rollback {arg}` or "
                    f"{compose.deploy_hint(env, '<known-good>')}")
        else:
            then = (f"fix the cause and run `runbook switch {arg} --slot "
                    f"{switch_to or '<target slot>'}` or "
                    f"{compose.deploy_hint(env, '<known-good>')}")
            # the code that served fits the restored database when it is at the schema that
            # code ran on before the restore: `docker start` serves it again at once, what
            # `runbook status` names first then (found by review: only the way to the target,
            # whose gate had just failed, was named)
            ran_on = run.schema_before_killed if killed is not None else run.schema_now
            served = _serving_but_stopped(env)
            if served is not None and served in run.stopped and ran_on is not None \
                    and ran_on == SchemaVersion(verified.migration_version, verified.dirty):
                then = (f"serve again what served before: `docker start {served}` (the "
                        f"restored database is at schema {ran_on.describe()}, the one its code "
                        f"ran on before the restore: it fits); then {then}")
        ctx.cannot_undo(down, f"{then}; {before_restore()}")
        # stopped after its commit (exit 6), the terminal may be all on-call reads
        ctx.after_commit(f"the database was restored to {snapshot.name} first: "
                         f"{before_restore()} (keep it)")
        ctx.note(restored=snapshot.name)

    def check(ctx: StepContext) -> None:
        try:
            ctx.note(found=check_matches(env, run))
            if run.written_since:  # a live writer, never a failed restore (review H2)
                ctx.note(written_since=run.written_since)
                ctx.notice(run.written_since)
        except RunbookError as exc:
            # the run's final fix is the check's, said once: the one do_restore registered
            # (switch to the target, start the slots) starts the app on data it doubts
            fix = (exc.fix or "") + (f"; {before_restore()}" if killed else "")
            ctx.cannot_undo(down, fix)
            ctx.note(**{MISMATCH: exc.message, MISMATCH_FIX: fix})  # doubted_restore's
            # in the run record before anything else: killed from here on, it still says so
            ctx.keep()
            ctx.fault("restore.before-doubt-marker")
            safety = killed["safety"] if killed else str(run.safety.path) if run.safety else ""
            unrecorded = record_doubt(env, {
                "run_id": run_id or "?", "action": "rollback" if not standalone
                else "snapshot-restore", "check": CHECK, "problem": exc.message, "fix": fix,
                "before": safety, "target": str(snapshot.path)})
            if unrecorded is None:
                ctx.note(**{MARKED: str(doubt_marker(env))})
            else:
                ctx.note(doubt_not_recorded=unrecorded)
                ctx.notice(unrecorded)
            exc.fix = None
            raise
        # the database is the snapshot's, whole: a doubt a run before this one recorded
        # beside the state file no longer holds
        said = clear_doubt(env, f"this run restored {snapshot.name} again and its check "
                                "passed")
        if said is not None:
            ctx.note(restore_doubt=said[0])
            if not said[1]:
                ctx.notice(said[0])
        if record is not None:
            record[VERIFIED] = snapshot.name
            ctx.keep_intent()

    recorded = snapshot.tables
    up = {n: i.status for n in containers if (i := docker.inspect(n)).up}
    serving = _serving_container(env, switch_to)
    # where the sidecar says it was dumped from (the tooling's: the published port)
    meta = snapshot.meta or {}
    dumped_at = f"{meta.get('host') or ''}:{meta.get('port') or ''}"
    return [
        Step("verify-snapshot", "Verify the snapshot file (read-only, done)", {
            "file": str(snapshot.path),
            "taken": f"{_fmt(snapshot.timestamp)} ({snapshot.reason or '?'})",
            # the server too: another environment's database of the same name on this host
            # "matched" by its name alone (found by review)
            "database": (f"{verified.database} on {tgt.host}:{tgt.port} (taken from "
                         f"{verified.moved_from}, this database before it moved: "
                         "--moved-from)" if verified.moved_from else
                         f"{verified.database} on {tgt.host}:{tgt.port} (matches"
                         + ("" if dumped_at in (":", f"{tgt.host}:{tgt.port}") else
                            f": its sidecar's {dumped_at} reaches the same server") + ")"
                         if snapshot.names_server else f"{verified.database} (matches; its "
                         "sidecar names no server, so only the name was compared)"),
            "sha256": verified.sha256 + (" (matches the sidecar)" if snapshot.sha256
                                         else " (no sidecar checksum)"),
            "schema_migrations": f"{verified.migration_version}"
                                 f"{' (dirty)' if verified.dirty else ''} (the database is at "
                                 f"{now_schema.describe()} now)",
            "rows recorded": ", ".join(f"{k} {v.rows}" for k, v in sorted(recorded.items()))
                             or "not recorded",
            "data written since": window,
        }),
        Step("stop-app-slots", "Stop the app slots that use the database (not the database)", {
            # those up now, as the step stops them (found by a plan-fidelity review: one
            # already exited was listed, which the run never stops)
            "containers": ", ".join(n if s == "running" else f"{n} ({s})"
                                    for n, s in up.items()) or "none are running",
            **({"no drain": (f"{serving}, which serves, goes down here" if serving in up
                             else "they go down") + " at once, without a drain (a maintenance "
                            "stop): requests in flight then get errors"} if up else {}),
            "kept running": env.database.container,
            # --keep-stopped: no switch and no start follows (found by review: it said
            # "until the switch", which never comes)
            "THE SERVICE IS DOWN": (
                "from here until you start the app containers (--keep-stopped leaves them "
                "stopped)" if standalone and keep_stopped else
                "from here until the app containers are started again (the last step)"
                if standalone else "from here until the switch")
            + ": the one step allowed to stop the serving slot, so no app write is lost during "
              "the restore",
        # a Ctrl-C or a closed terminal while Docker stops a slot is held until the stops
        # end (found by review): Docker finishes a stop it has begun, and an undo run at once
        # saw the container still running, skipped it, and said "undone" with it then down
        }, run=stop_slots, hold_signals=True),
        Step("safety-snapshot", "Take a safety snapshot of the database as it is now", {
            "folder": str(env.database.snapshot_dir),
            "command": commands.dump(tgt, "<exported snapshot>",
                                     into=f"{env.database.snapshot_dir}/<new>.sql.gz").describe(),
            # only what is proved (review H1): the sessions are sampled, and a writer that
            # connects for each write (a cron job's `psql -c`) can fall between the samples
            "taken": "once no app writes (after the stop): every write of the app slots is "
                     "in it or in the database, none is lost between the two",
            "other sessions": "none may be seen connected to the database (sampled until "
                              f"none is seen for {sessions.SETTLE:g} s, for up to "
                              f"{sessions.WAIT:g} s): "
                              + ("they are ended (--end-sessions)" if end_sessions else
                                 "refused, naming them (--end-sessions ends them)")
                              + "; a writer that connects only for a moment (a cron job's "
                                "`psql -c`) can fall between the samples: what it writes "
                                "while this snapshot is taken is in neither it nor the "
                                "restored database, so stop such writers first",
            "on failure": "the app slots are started again; the database was not touched",
            **({"the data from before": f"{killed['safety']}: the data from before the "
                                           f"restore of the run {killed['run_id']} (started "
                                           f"{killed['started_at']}), killed during or after "
                                           "it, or failed after it; this one is of the "
                                           "database as it is now"}
               if killed else {"the data from before": f"in this one, unless an earlier "
                                                       f"restore was killed: "
                                                       f"{unfinished_marker(env)}, which "
                                                       "cannot be read, names its safety "
                                                       "snapshot"}
               if unreadable else {}),
        }, run=take_safety),
        Step("restore-database", f"Replace the database with {snapshot.name} in one transaction", {
            "psql": commands.replay(tgt, str(snapshot.path)).describe(),
            "stdin, first": prelude(verified).decode().replace("\n", " ").strip(),
            "other sessions": "once its DROPs hold every table, a session seen connected "
                              "rolls the restore back (up to 3 s wait); one that connects "
                              "only for a moment may not be seen",
            "stdin, then": f"{snapshot.path}, decompressed in-process (sha256 checked while "
                           "streaming)",
            # snapshots/give_back.py: recorded by the prelude, before its DROPs
            "stdin, last": "the owners and GRANTs of what the prelude dropped, given back to "
                           "what the snapshot made again under the same name (each statement "
                           "refused is named at the end, never fails the restore), then the "
                           "row counts the snapshot recorded, counted in the same transaction "
                           "(a mismatch rolls the restore back), then COMMIT",
            "on failure": "psql rolls back: the database stays exactly as it was; once COMMIT "
                          "is sent, Postgres is asked whether it committed (txid_status): "
                          "unknown leaves the app slots stopped",
            # what until_commit (do_restore) makes of a signal, said before it happens
            "Ctrl-C": "held until the transaction has ended, so its outcome is known; rolled "
                      "back, the run stops there; committed, the app slots would stay down, "
                      + ("so the run carries on until traffic has moved, then stops (exit 6)"
                         if not standalone else
                         "so the run carries on to its end (the app slots left stopped: "
                         "--keep-stopped)" if keep_stopped else
                         "so the run carries on to its end (the app started again)"),
        }, run=do_restore, hold_signals=True),
        Step("verify-restore", CHECK, {
            "expect": f"schema_migrations {verified.migration_version}; "
                      + (", ".join(f"{k} {v.rows}" for k, v in sorted(recorded.items()))
                         or "row counts not recorded"),
        }, run=check),
    ]


def _stopped_one(run: RestoreRun, name: str) -> docker.ContainerInfo:
    """The container the restore stopped under `name`, as it is now: by its id when this run
    stopped it (under whatever name it has now; absent if removed since), else by name."""
    from runbook import docker

    ident = run.stopped_ids.get(name)
    if ident is None:
        return docker.inspect(name)
    return docker.inspect_id(ident) or docker.ContainerInfo(name=name, exists=False)


def start_step(env: Environment, restore_run: RestoreRun, *, wait: bool = True,
               left_stopped: str | None = None, earlier: str | None = None) -> Step:
    """For a standalone restore: start again the app containers the restore stopped, and the
    serving one (`left_stopped`) when a killed restore had stopped it: this run then stops
    nothing itself, and "none were running" would end it with the service down, exit 0.
    `earlier`: a killed earlier restore's safety snapshot (the data from before it)."""
    from runbook import database, docker, health

    # what each started slot's /health must report: the schema restored (a slot reading
    # another database answered from it, and the restore never reached what users read)
    restored = health.ExpectedSchema(lambda: restore_run.verified.migration_version,
                                     str(restore_run.verified.migration_version),
                                     database.where(env), how="restored")

    def run(ctx: StepContext) -> None:
        stopped = list(restore_run.stopped)
        if left_stopped is not None and left_stopped not in stopped \
                and not docker.inspect(left_stopped).running:
            stopped.append(left_stopped)
        unfit = {n: why for n, why in restore_run.unfit.items() if n in stopped}
        stopped = [n for n in stopped if n not in unfit]
        by_container = {env.slot(s).container: s for s in env.slots}
        for name in stopped:  # each by the id it was stopped by, when this run stopped it
            docker.run(docker.start_action(name, restore_run.stopped_ids.get(name)))
        if wait:
            compared: list[tuple[str, str]] = []  # (container, what it reported)
            for index, name in enumerate(stopped):
                slot = by_container.get(name)
                if slot is None:
                    continue
                try:
                    _, said = health.check_schema(env, slot, health.wait_healthy(env, slot),
                                                  restored)
                except health.SchemaMismatchError as exc:
                    # said as it is (the restore's own words say the slots are stopped): it
                    # runs, is left so (never stopped here), and every other slot started
                    # is named as it is (found by review: "it serves" was said of a standby)
                    mine = restore_run.safety.path if restore_run.safety else None
                    before = (f"{earlier} (the safety snapshot of an earlier restore, killed or "
                              f"failed after it; "
                              f"{mine} is the database as it was before this restore)" if earlier
                              else str(mine))
                    others = "; ".join(
                        [f"{c} started again and gated ({c_said})" for c, c_said in compared]
                        + [f"{o} started again, NOT gated (`runbook healthcheck "
                           f"{command_arg(env)}` shows it)" for o in stopped[index + 1:]])
                    ctx.cannot_undo(
                        f"the database WAS restored to {restore_run.snapshot.name}, and {name} "
                        f"runs again ({_serves(env, slot)}), on the database its DATABASE_URL "
                        "names, which the restore did not touch"
                        + (f"; {others}" if others else ""),
                        # the gate's fix never asks for a rerun of a restore that committed
                        f"{exc.fix}; then check it (`runbook healthcheck {command_arg(env)}`); "
                        f"the data from before the restore is in {before}")
                    raise RunbookError(f"the database was restored, but {exc.message}",
                                       exit_code=ExitCode.ATTENTION) from None
                except RunbookError as exc:
                    raise RunbookError(
                        f"the database was restored, but {name} is not healthy on it: "
                        f"{exc.message}",
                        f"its code may need the newer schema: roll the code back "
                        f"(`runbook rollback {command_arg(env)}`) or redeploy",
                        exit_code=ExitCode.ATTENTION) from None
                compared.append((name, f"{slot}: {said}"))
            if compared:
                ctx.note(schema="; ".join(c_said for _, c_said in compared))
        ctx.note(started=", ".join(stopped) or "none (none were running)")
        if unfit:
            at = restore_run.verified.migration_version
            ctx.note(left_stopped="; ".join(unfit.values()))
            ctx.result = f"{', '.join(unfit)} left stopped"
            for why in unfit.values():
                ctx.notice(f"{why}: left stopped, not started on a schema it never ran on "
                           f"(fix: start a standby only with code that runs on schema {at}, "
                           f"e.g. {compose.deploy_hint(env, f'<one at schema {at}>')}, which "
                           "also moves traffic to it)")

    containers = "those the restore stopped" + (
        f", and {left_stopped}, which serves and was found stopped (an interrupted run's "
        "maintenance stop)" if left_stopped else "")
    return Step("start-app-slots", "Start the app containers that were running, and gate them",
                {"containers": containers,
                 **({"left stopped": "; ".join(restore_run.unfit.values())
                                     + ": its code needs another schema"}
                    if restore_run.unfit else {}),
                 "health": f"wait up to {env.health.timeout:g}s each",
                 "schema": restored.plan_line(env.health.path)}, run=run)


def _serves(env: Environment, slot: Slot) -> str:
    """Whether Caddy's running config sends users to `slot`, for a message: "serves" only
    when it does (a standby the restore started again was said to serve; found by review)."""
    from runbook import traffic

    try:
        serving = traffic.read(env, proxy=False).slot
    except RunbookError:
        return "left running: whether it serves cannot be told, Caddy cannot be read"
    if serving is None:
        return "left running: Caddy's running config names no single slot that serves"
    return ("left running: it serves, Caddy points at it" if serving == slot else
            f"left running as a standby: Caddy points at {serving}")


# restore_outcome of a restore-database step whose COMMIT Postgres could not place: that
# run is finished like a killed one (its safety snapshot holds the data from before)
UNKNOWN = "unknown"


def killed_restore(env: Environment, run_id: str | None) -> dict[str, str] | None:
    """The environment's last run before `run_id`, when it was killed (its record still
    says "running": a run that ends, however it ends, says how) once its restore had begun,
    after its safety snapshot, or ended failed once its restore had replaced the database
    (`_left_restored`): {run_id, started_at, safety}. `safety` holds the data from
    before that restore (carried on from an earlier killed run of the same kind); runs that
    changed no data and let the app serve nothing, ended or not, are looked past. None when
    there is none or the records cannot tell: nothing here changes what runs, only what the
    plan and the messages name, and whether an undo starts the code that served (_kept_down).
    The run records are this operator's (per user): a restore another operator (or sudo)
    began after what they tell is read from beside the state file (`unfinished_marker`),
    and so is a later run of theirs that served or changed the data (SERVED_SINCE; found by
    review: another operator's rerun named no earlier safety snapshot and started the code
    that served on the restored schema). PreconditionError when that file cannot be read:
    the caller decides the safe way and says so (`_killed_by_the_records` is what is known)."""
    found, decided = _killed_by_the_records(env, run_id)
    try:
        runs = [r for r in unfinished_restores(env) if r.get("run_id") != run_id]
    except (OSError, ValueError) as exc:
        raise unfinished_unreadable(env, exc) from None
    if not runs:
        return found  # none recorded, or a restore finished since: the records tell
    last = runs[-1]  # the newest: a later run's served-since covers every earlier one
    same = decided is not None and last.get("run_id") == decided.get("run_id")
    if decided is not None and not same and not _recorded_after(last, decided):
        return found  # the records decided on a run after it
    if last.get(SERVED_SINCE):
        return None
    if same:
        return found  # its record says more (when it started; what it left)
    path = last.get(EARLIER) or last.get("safety_snapshot")
    return {"run_id": last.get("run_id") or "?", "safety": path,
            "started_at": last.get("at") or "?"} if path else None


def known_killed_restore(env: Environment, run_id: str | None
                         ) -> tuple[dict[str, str] | None, PreconditionError | None]:
    """killed_restore, or, when the record beside the state file cannot be read, what this
    operator's run records tell and why the rest cannot be: the caller decides the safe way
    (the code that served stays stopped; "may have restored") and says so."""
    try:
        return killed_restore(env, run_id), None
    except PreconditionError as exc:
        return _killed_by_the_records(env, run_id)[0], exc


def _recorded_after(entry: dict[str, str], record: dict[str, Any]) -> bool:
    """Whether an unfinished restore beside the state file began after the run record
    `record` started; a time that cannot be read counts as after (it then decides: named,
    and an undo leaves the code that served stopped unless the schema is proved the same)."""
    from runbook import times

    began, started = times.parse_utc(entry.get("at")), times.parse_utc(record.get("started_at"))
    return began is None or started is None or began > started


def _killed_by_the_records(env: Environment, run_id: str | None
                           ) -> tuple[dict[str, str] | None, dict[str, Any] | None]:
    """killed_restore's reading of this operator's run records: (what they find, the record
    data; None when none did). A run a later run finished (_finished_since) is no killed
    one: its restore ended, as if it had not been killed."""
    from runbook import journal

    finished = finished_restores(env)
    for data in journal.past_records(env, but=run_id):
        if _finished_since(data, finished):
            return None, data
        listed = data.get("steps")
        steps = {s.get("name"): s for s in (listed if isinstance(listed, list) else [])
                 if isinstance(s, dict) and s.get("status") != "planned"}  # started ones
        detail = (steps.get("safety-snapshot") or {}).get("detail")
        detail = detail if isinstance(detail, dict) else {}
        path = detail.get(EARLIER) or detail.get("safety_snapshot")
        restore_detail = (steps.get("restore-database") or {}).get("detail")
        unknown = isinstance(restore_detail, dict) \
            and restore_detail.get("restore_outcome") == UNKNOWN
        # a run that ends says how; one whose restore's outcome is unknown is as good as killed
        killed = data.get("outcome") == "running" or unknown
        if _left_restored(data, steps) and isinstance(path, str):
            return {"run_id": str(data.get("run_id")), "safety": path,
                    "started_at": str(data.get("started_at"))}, data
        # Since this run, the app may have served (and written), or the data changed: the
        # database is no longer what that restore left, so its pointer is stale. An ended
        # run that stopped the app slots started them again (its undo, or its last step).
        stop = (steps.get("stop-app-slots") or {}).get("detail")
        held = isinstance(stop, dict) and bool(stop.get("held_down"))
        if SERVED_OR_CHANGED & steps.keys() or (not killed and "stop-app-slots" in steps
                                                and not held):
            return None, data
        # It changed nothing and let nothing serve (stopped before any such step, refused,
        # declined, a dry run): the run before it still tells.
    return None, None


def kept_for_killed_restore(env: Environment) -> dict[str, str]:
    """What `snapshot cleanup` keeps whatever its age for killed restores (file name: why):
    the safety snapshot of each run killed during or after its restore (or whose COMMIT's
    outcome was unknown) since the last restore that finished: the only copy of the data
    from before it; and that run's target snapshot, which the rerun its fix prescribes
    ("run the same command again") restores whole. Only the run records know them, which
    the snapshots package never reads.
    A run refused or stopped since (before its own restore) does not end it, unlike
    `killed_restore`'s pointer for messages. The records are read newest first, one at a
    time, back to that restore (every one when none finished; all of them held at once took
    784 MiB for 20,000, under the deploy lock), and one among them that cannot be listed or
    read keeps every snapshot (fail closed): a killed restore's target may be any of them,
    not only a safety snapshot (found by review: the target went, and the rerun its fix
    prescribes failed "does not exist"). Kept, not refused: nothing is deleted either way,
    and the cleanup still removes dead partial dumps (what may fill the disk), as it does
    when the state file cannot be read.
    The run records are this user's: what another operator's unfinished restore needs is
    read from beside the state file (`unfinished_marker`), kept the same way, and kept all
    when that file cannot be read."""
    from runbook import files
    from runbook.snapshots.store import list_snapshots

    marker = unfinished_marker(env)
    try:
        kept = _kept_by_the_marker(env)
    except (OSError, ValueError) as exc:
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        why = (f"kept: {marker} cannot be read ({what}), so nothing tells whether an "
               f"unfinished restore replays it or needs it; make it readable to this user (or "
               f"run the cleanup as root), or, once the restores it names are finished or "
               f"given up, move it aside; then run the cleanup again")
        return {s.name: why for s in list_snapshots(env)}
    try:
        for name, why in _kept_by_the_records(env).items():
            kept.setdefault(name, why)
    except OSError as exc:
        fix = (f"move it out of {env.runs_dir} (it is no run record)"
               if isinstance(exc, files.NotAFile) else "make them readable to this user")
        why = (f"kept: the run records cannot be read ({exc.filename or env.runs_dir}: "
               f"{exc.strerror or exc}), so nothing tells whether a killed restore replays it "
               f"or needs it; {fix}, then run the cleanup again")
        return {s.name: why for s in list_snapshots(env)}
    try:
        for name, why in _kept_by_the_intent(env).items():
            kept.setdefault(name, why)
    except PreconditionError as exc:
        why = (f"kept: {exc.message}, so nothing tells whether the interrupted run it names "
               f"needs it; {exc.fix}, then run the cleanup again")
        return {s.name: why for s in list_snapshots(env)}
    return kept


def _kept_by_the_intent(env: Environment) -> dict[str, str]:
    """kept_for_killed_restore's reading of the interrupted run's record beside the state
    file (and the record it replaced): a deploy's pre-deploy snapshot, dumped before its
    migrations, which its rerun takes as that deployment's again (gone, the rerun dumps a new
    one at the migrated schema and records it as the state before the deploy: found by
    review, a cron cleanup deleted it once expired), and the snapshot an interrupted
    `rollback --restore-snapshot` restores, which the rerun its fix names (`--snapshot
    FILE`) replays. PreconditionError when that record cannot be read."""
    from runbook import intent as intents
    from runbook.snapshots.store import list_snapshots

    pending = intents.read(env)
    if pending is None:
        return {}
    kept: dict[str, str] = {}
    older = pending.record.get(intents.REPLACES)
    mine = {"action": pending.action, "run_id": pending.run_id,
            "to_version": pending.to_version, "record": pending.record}
    for entry in (mine, older if isinstance(older, dict) else {}):
        record = entry.get("record")
        record = record if isinstance(record, dict) else {}
        run = (f"the interrupted {entry.get('action', '?')} {entry.get('run_id', '?')} of "
               f"{entry.get('to_version', '?')} (recorded in {intents.path(env)})")
        deployment = record.get("deployment_id") if entry.get("action") == "deploy" else None
        # by its sidecar's deployment id too, as the rerun finds it (finish.taken_snapshot):
        # a run killed once its dump was named, before its record said so
        named = [s.name for s in list_snapshots(env)
                 if isinstance(deployment, str) and deployment
                 and s.deployment_id == deployment]
        if isinstance(path := record.get("snapshot_path"), str) and path:
            named.append(Path(path).name)
        for name in named:
            kept.setdefault(name, (
                f"the pre-deploy snapshot of {run}, taken before its migrations: its rerun "
                "takes it as that deployment's"))
        if isinstance(path := record.get("restore_snapshot"), str) and path:
            kept.setdefault(Path(path).name, (
                f"the snapshot {run} restores: running it again replays it"))
    return kept


def _kept_by_the_marker(env: Environment) -> dict[str, str]:
    """kept_for_killed_restore's reading of the unfinished restores recorded beside the
    state file (every operator's); OSError or ValueError when that file cannot be read."""
    kept: dict[str, str] = {}
    where = unfinished_marker(env)
    for entry in reversed(unfinished_restores(env)):  # newest first, as the records
        run = (f"the restore run {entry.get('run_id', '?')} (its restore began "
               f"{entry.get('at', '?')}), which has not finished (recorded in {where})")
        if path := entry.get("safety_snapshot"):
            kept.setdefault(Path(path).name, (f"the safety snapshot of {run}: the only copy "
                                              "of the data from before it"))
        if path := entry.get(EARLIER):
            kept.setdefault(Path(path).name, (
                f"the safety snapshot of the killed restore that {run} carried on from: the "
                "only copy of the data from before them"))
        if path := entry.get(TARGET):
            kept.setdefault(Path(path).name, (f"the snapshot {run} replayed: running that "
                                              "command again restores it whole"))
    return kept


def _kept_by_the_records(env: Environment) -> dict[str, str]:
    """kept_for_killed_restore's reading of the run records; OSError when one of those it
    reaches cannot be listed or read."""
    from runbook import journal

    kept: dict[str, str] = {}
    finished = finished_restores(env)
    for data in journal.past_records(env, strict=True):
        if _finished_since(data, finished):
            break  # a restore that finished (by a later run): from here on, ordinary retention
        listed = data.get("steps")
        steps = {s.get("name"): s for s in (listed if isinstance(listed, list) else [])
                 if isinstance(s, dict) and s.get("status") != "planned"}
        restore = steps.get("restore-database")
        if restore is None:
            continue
        if not _left_restored(data, steps):
            if restore.get("status") == "ok":
                break  # a restore that finished: from here on, ordinary retention
            continue  # it failed and was rolled back: its safety snapshot is a copy
        safety = (steps.get("safety-snapshot") or {}).get("detail")
        safety = safety if isinstance(safety, dict) else {}
        for path in (safety.get("safety_snapshot"), safety.get(EARLIER)):
            if isinstance(path, str) and path:
                kept.setdefault(Path(path).name, (
                    f"the safety snapshot of the restore run {data.get('run_id')} (started "
                    f"{data.get('started_at')}), killed during or after its restore: the only "
                    "copy of the data from before it"))
        target = safety.get(TARGET)
        if isinstance(target, str) and target:
            kept.setdefault(Path(target).name, (
                f"the snapshot the restore run {data.get('run_id')} (started "
                f"{data.get('started_at')}), killed during or after its restore, replayed: "
                "running that command again restores it whole"))
    return kept


def _finished_since(data: dict[str, Any], finished: dict[str, str]) -> bool:
    """Whether the run of a run record (read newest first) was killed during or after a
    restore that a later run finished, as the record beside the state file says
    (`finished`, every operator's), or a newer record of this operator's (its context's
    FINISHED_RESTORE, added to `finished` as read): its own record still says "running"."""
    context = data.get("context")
    ended = context.get(FINISHED_RESTORE) if isinstance(context, dict) else None
    if isinstance(ended, str) and ended:
        finished.setdefault(ended, str(data.get("run_id")))
    return str(data.get("run_id")) in finished


def _left_restored(data: dict[str, Any], steps: dict[Any, Any]) -> bool:
    """Whether a run record's run left the database as its restore left it (or may have),
    the data from before in its safety snapshot, for a rerun to finish: killed once its
    restore began (the record still says "running"), its COMMIT's outcome unknown, or ended
    failed after the restore replaced the database (a gate or a switch that failed then:
    the undo never starts the app on the restored data; found by review, such a run was
    taken for one that finished, and its safety snapshot went unnamed)."""
    restore = steps.get("restore-database")
    if not isinstance(restore, dict):
        return False
    detail = restore.get("detail")
    if isinstance(detail, dict) and detail.get("restore_outcome") == UNKNOWN:
        return True
    outcome = data.get("outcome")
    return outcome == "running" or (outcome == "failed" and restore.get("status") == "ok")


def restored_by(env: Environment, run_id: str) -> tuple[str, bool] | None:
    """The safety snapshot holding the data from before the restore the run `run_id` began
    (carried on from a killed earlier one), and whether that restore ended replacing the
    database; None when the run began none or its record cannot tell. What `runbook
    status` names beside the run's unfinished record: with the terminal gone (a dropped
    ssh session), the only pointer to that data. Not in this operator's run records (per
    user: another operator's, or sudo's), it is read from beside the state file, which
    tells only that the restore began (None when that file cannot be read: status says so)."""
    from runbook import journal

    # its own record alone (`<run_id>.json`): scanning for it read every record whenever it
    # was not there (another operator's runs folder), on every `runbook status`
    data = journal.record_of(env, run_id)
    if data is None:
        try:
            runs = unfinished_restores(env)
        except (OSError, ValueError):
            return None
        entry = next((r for r in runs if r.get("run_id") == run_id), {})
        path = entry.get(EARLIER) or entry.get("safety_snapshot")
        return (path, False) if path else None
    listed = data.get("steps")
    steps = {s.get("name"): s for s in (listed if isinstance(listed, list) else [])
             if isinstance(s, dict) and s.get("status") != "planned"}
    restore = steps.get("restore-database")
    detail = (steps.get("safety-snapshot") or {}).get("detail")
    detail = detail if isinstance(detail, dict) else {}
    path = detail.get(EARLIER) or detail.get("safety_snapshot")
    if restore is None or not isinstance(path, str) or not path:
        return None
    return path, restore.get("status") == "ok"




def restored_at_schema_before(env: Environment, run_id: str, now: SchemaVersion) -> str | None:
    """The safety snapshot of the run `run_id` (the data from before its restore, carried
    on from a killed earlier run) when that run's restore ended replacing the database and
    the database is now (`now`) at the schema that snapshot holds: the schema the code that
    served before the restore ran on, so that code fits the database, the condition on
    which a rerun's undo starts it again (_kept_down). None otherwise, or when it cannot be
    told."""
    restored = restored_by(env, run_id)
    if restored is None or not restored[1]:
        return None
    before = _schema_before({"safety": restored[0]})
    return restored[0] if before is not None and before == now else None


def _schema_before(killed: dict[str, str] | None) -> SchemaVersion | None:
    """The schema a killed restore's safety snapshot holds (the database's before that
    restore, which the code that served then ran on), or None when there is none or its
    sidecar cannot tell."""
    from runbook.snapshots.store import load

    if killed is None:
        return None
    try:
        snap = load(Path(killed["safety"]))
        version = snap.migration_version
        return None if version is None else SchemaVersion(version, snap.dirty)
    except (OSError, ValueError, RecursionError, RunbookError):
        return None


def _kept_down(killed: dict[str, str] | None, before: SchemaVersion | None,
               now: SchemaVersion) -> str | None:
    """Why the serving container a killed restore stopped is not this run's to start again
    on an undo, or None when it is. That run may have committed its restore: the database
    may be at the snapshot's schema, which the code that served may not fit (started, it
    serves without its tables, or migrates the restored data forward). Its schema before
    that restore is in its safety snapshot; the same schema now means it fits."""
    if killed is None or before == now:
        return None
    why = (f"the database is at schema {now.describe()}, not the {before.describe()} its "
           f"safety snapshot {killed['safety']} holds" if before is not None else
           f"the schema before it could not be read from its safety snapshot "
           f"{killed['safety']}, so it cannot be checked that the database still fits the "
           "code that served")
    return (f"the run {killed['run_id']} was killed during or after its restore, and {why}: "
            "the code that served may not fit it; run the same command again once the cause "
            "is fixed")


def _serving_container(env: Environment, switch_to: Slot | None) -> str | None:
    """The container of the slot that serves: the other of the rollback's target, else the
    one Caddy's running config sends to (None: Caddy cannot be read)."""
    from runbook import traffic

    if switch_to is not None:
        return env.slot(switch_to.other).container
    serving = traffic.serving_now(env)
    return env.slot(serving).container if serving is not None else None


def _serving_but_stopped(env: Environment) -> str | None:
    """The container of the slot Caddy's running config serves, when it exists and is not
    running (Caddy unread: only the containers this run stops are started)."""
    from runbook import traffic

    down = traffic.serving_stopped(env)
    return down[1].name if down is not None and down[1].exists else None


def _ran_with(env: Environment, run: RestoreRun, tag: str | None
              ) -> tuple[SchemaVersion | None, str]:
    """The schema the code tagged `tag` ran with, and the witness: its deployment's record;
    else the database's before a killed restore (its safety snapshot: the database now is
    what that run left), else the database's now (it ran on it)."""
    from runbook import state as states

    if tag and states.is_version(tag):
        try:
            recorded = next((d for d in states.read_state(env.state_file,
                                                          environment=env.name).deployments()
                             if d.version == tag and d.migration_version is not None), None)
        except RunbookError:
            recorded = None  # the state file cannot tell: the database's schema
        if recorded is not None and recorded.migration_version is not None:
            return (SchemaVersion(recorded.migration_version, False),
                    "ran with (as its deployment recorded)")
    if run.schema_before_killed is not None:
        return run.schema_before_killed, ("ran on before a killed restore (its safety "
                                          "snapshot; its deployment recorded none)")
    return run.schema_now, "runs on now (its deployment recorded none)"


def _refuse_other_schema(env: Environment, run: RestoreRun) -> None:
    """A standalone restore starts again the code that serves: on a snapshot at another
    schema than the one that code ran with, it runs on a schema it never ran on (a /health
    that does not check the schema passes, and it serves without its tables; or, migrating
    itself on start, it migrates the restored data forward).

    Which code serves comes from what runs (the slot Caddy's loaded config dials, its
    container's version tag), the schema it ran with from its deployment's record; the
    database's schema now is only the fallback when none is recorded: after a failed deploy
    or a lost volume it is not the serving code's, and a restore of its pre-deploy snapshot
    is the way back."""
    from runbook import docker, traffic
    from runbook import state as states

    verified = run.verified
    at = SchemaVersion(verified.migration_version, verified.dirty)
    serving, tag = "the code that serves", None
    try:
        slot = traffic.read(env, proxy=False).slot
        tag = docker.inspect(env.slot(slot).container).tag if slot is not None else None
        if tag and states.is_version(tag):
            serving = f"{tag}, which serves from the {slot} slot,"
    except RunbookError:
        tag = None  # Caddy or Docker cannot tell: the database's schema now
    expected, witness = _ran_with(env, run, tag)
    if expected is None or at == expected:
        return
    name = shlex.quote(run.snapshot.name)
    # accepted as this database's before it moved: the rollback must say so too
    moved = f" --moved-from {shlex.quote(verified.moved_from)}" if verified.moved_from else ""
    raise PreconditionError(
        f"{run.snapshot.name} is at schema {at.describe()}, and {serving} {witness} schema "
        f"{expected.describe()}: started again after the restore, it would run on a schema "
        "it never ran on; nothing was changed",
        f"move code and schema together with `runbook rollback {command_arg(env)} "
        f"--restore-snapshot --snapshot {name}{moved}`, or restore and start nothing with "
        "--keep-stopped (then start the code that fits that schema yourself)")


def _unfit_standby(env: Environment, run: RestoreRun) -> dict[str, str]:
    """The running standby containers whose code ran with another schema than the snapshot's
    (container: why): the restore stops them with the others, and a standalone one started
    them all again, such a standby on a schema it never ran on (found by review, a host
    with `stop_old_slot = false`: its /health does not check the schema, so a switch to it
    would pass its gate). They are left stopped, as `stop_old_slot = true` leaves a standby.
    Refused before any change (PreconditionError) when that is not known to be safe: another
    site outside the slot markers proxies to it, or Caddy cannot tell which slot serves."""
    from runbook import docker, traffic

    at = SchemaVersion(run.verified.migration_version, run.verified.dirty)
    try:
        found = traffic.read(env, proxy=False)
        serving, pinned, unknown = found.slot, found.pinned, found.problem(env)
    except RunbookError as exc:
        serving, pinned, unknown = None, frozenset(), exc.message
    unfit: dict[str, str] = {}
    for slot in env.slots:
        name = env.slot(slot).container
        if slot == serving:
            continue  # _refuse_other_schema's
        info = docker.inspect(name)
        if not info.up:
            continue  # the restore neither stops nor starts it
        expected, witness = _ran_with(env, run, info.tag)
        if expected is None or expected == at:
            continue
        why = (f"{name} (the {'standby ' if serving is not None else ''}{slot} slot) runs "
               f"{info.tag or 'untagged code'}, which {witness} schema {expected.describe()}, "
               f"not the snapshot's {at.describe()}")
        if serving is None or slot in pinned:
            cause = (f"another site outside the slot markers proxies to it (port "
                     f"{env.slot(slot).port}), so it can be neither started again on a schema "
                     "it never ran on nor left stopped" if serving is not None else
                     f"which slot serves cannot be told ({unknown}), so it may be the one "
                     "that serves")
            raise PreconditionError(
                f"{why}: {cause}; nothing was changed",
                f"restore and start nothing with `runbook snapshot restore {command_arg(env)} "
                f"{shlex.quote(run.snapshot.name)} --keep-stopped`, then start the code "
                f"that fits schema {at.describe()} yourself")
        unfit[name] = why
    return unfit


def _closes_deploy(env: Environment, snap: Snapshot) -> intents.Intent | None:
    """The interrupted deploy whose pre-deploy snapshot `snap` is, while traffic never moved
    to it (its record's phase): restored, nothing of that deploy is left (its migrations were
    all it did that stays), so its record is closed by the restore. Found by review: after
    the documented restore of a deploy that failed its gate once its migrations ran, status
    still said "an interrupted run is unfinished" and named `runbook deploy` to finish it.
    None when unreadable (the record stays, as before)."""
    try:
        pending = intents.read(env)
    except (RunbookError, OSError):
        return None
    if pending is None or pending.action != "deploy" \
            or pending.phase is not intents.Phase.PREPARE:
        return None
    deployment, taken = pending.record.get("deployment_id"), pending.record.get("snapshot_path")
    ours = (isinstance(taken, str) and bool(taken) and Path(taken).name == snap.name) or (
        isinstance(deployment, str) and bool(deployment) and snap.deployment_id == deployment)
    return pending if ours else None


def _close_deploy_step(env: Environment, pending: intents.Intent, snap: Snapshot) -> Step:
    """The last step of a restore of an interrupted deploy's pre-deploy snapshot: its record
    removed once the database holds what it held before that deploy, unless another run
    replaced the record meanwhile (then it is left)."""
    def run(ctx: StepContext) -> None:
        if not intents.clear(env, pending.run_id):
            raise RunbookError(f"{intents.path(env)} could not be removed: the interrupted "
                               f"deploy of {pending.to_version} is still named as unfinished",
                               f"remove it by hand: the database holds {snap.name}, from "
                               "before that deploy", exit_code=ExitCode.ATTENTION)
        ctx.notice(f"the interrupted deploy of {pending.to_version} ({pending.run_id}) is "
                   f"closed: this restore of its pre-deploy snapshot undid its migrations, and "
                   f"traffic never moved to it; `runbook deploy {command_arg(env)} --version "
                   f"{pending.to_version}` deploys it anew (it failed before: find out why "
                   "first)")

    return Step("close-deploy-record",
                f"Close the interrupted deploy's record ({pending.to_version}, "
                f"{pending.run_id})", {
                    "record": str(intents.path(env)),
                    "why": f"{snap.name} is that deploy's pre-deploy snapshot: restored, its "
                           f"migrations are undone, and traffic never moved to "
                           f"{pending.to_slot}: nothing of it is left to finish",
                }, run=run)


def restore(env: Environment, ref: str | Path | None = None, *, restart: bool = True,
            dry_run: bool = False, reason: str = "snapshot restore",
            confirm: Callable[..., bool] | None = None,
            progress: Callable[..., None] | None = None,
            notify: Callable[[str], None] | None = None,
            end_sessions: bool = False, moved_from: str | None = None,
            drained_first: bool = False) -> RunResult:
    """`runbook snapshot restore`: lock, verify, safety snapshot, restore, restart, journal.
    `moved_from`: see verify(). `drained_first`: see restore_steps()."""

    def build(run_id: str) -> Plan:
        snap, passed = (find(env, ref), []) if ref else default_pick(env)
        facts: dict[str, Any] = {}
        restore_run = prepare(env, snap, moved_from)
        steps = restore_steps(env, restore_run, facts=facts, run_id=run_id, standalone=True,
                              end_sessions=end_sessions, keep_stopped=not restart,
                              drained_first=drained_first)
        warnings = [facts[k] for k in ("unfinished_unreadable", "privileges_lost") if facts.get(k)]
        warnings += facts["unproven_sessions"]
        if facts.get("earlier_safety_snapshot"):
            # "killed" alone was untrue of a run that ended exit 5 at its restart gate,
            # its slots serving since (found by review): its record is read the same way
            warnings.append(f"the last run was killed during or after its restore, or failed "
                            f"after it: the data from before it is in "
                            f"{facts['earlier_safety_snapshot']}; this run's safety snapshot "
                            "will hold the database as it is now")
        with contextlib.suppress(RunbookError):
            warnings.append(loss_window(env, snap).describe())
        warnings += [f"{newer.name} is newer but still being written ({why}): passed over "
                     f"for {snap.name}" for newer, why in passed]
        left = _serving_but_stopped(env)
        if left is not None:
            warnings.insert(0, f"the serving slot's container {left} is STOPPED (an interrupted "
                               "restore's maintenance stop?): users get errors; "
                               + ("this run starts it again once the database is restored"
                                  if restart else "--keep-stopped leaves it so"))
        if restart:
            _refuse_other_schema(env, restore_run)
            restore_run.unfit = _unfit_standby(env, restore_run)
            warnings += [f"{why}: it is left stopped after the restore, never started on a "
                         "schema it never ran on" for why in restore_run.unfit.values()]
            steps.append(start_step(env, restore_run, left_stopped=left,
                                    earlier=facts.get("earlier_safety_snapshot")))
        else:
            steps.append(Step("start-app-slots", "Start the app containers again",
                              skip="--keep-stopped"))
        if (closing := _closes_deploy(env, snap)) is not None:
            steps.append(_close_deploy_step(env, closing, snap))
        summary = (f"restore {env.display}'s database from {snap.name} (schema "
                   f"{restore_run.verified.migration_version})")
        return Plan("snapshot-restore", env, summary, steps, warnings, facts=facts)

    check_named(env, ref)
    return perform(env, "snapshot-restore", build, dry_run=dry_run, reason=reason,
                   confirm=confirm, progress=progress, notify=notify)
