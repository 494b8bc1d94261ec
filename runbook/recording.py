"""What each verb records in the state file once traffic has moved, shared by the verbs and by
finish.py (which completes an interrupted run of any verb): one module, so neither the verbs
import each other nor finish imports the verbs.

Each recorder is idempotent (a no-op when the state file already says it), so a rerun after an
interruption converges instead of acting again.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from runbook import database, health, slots
from runbook import intent as intents
from runbook import state as states
from runbook.environment import Environment, Slot
from runbook.errors import RunbookError
from runbook.plan import StepContext

Record = Callable[[Environment, intents.Intent, slots.Observed, str, StepContext], None]
UNKNOWN_COMMIT = "0" * 40  # git's null object id: the commit is not known
_FULL_COMMIT = re.compile(r"[0-9a-f]{40}")


def _exclusive(record: Record) -> Record:
    """The recorder's read-modify-write under states.WRITING (see there)."""
    def recorder(env: Environment, intent: intents.Intent, observed: slots.Observed,
                 run_id: str, ctx: StepContext) -> None:
        try:
            with states.WRITING:
                record(env, intent, observed, run_id, ctx)
        finally:
            # traffic is committed to the target (every recorder runs after the commit, a
            # finishing run's too): a record that it was left running for h2c is void now
            if (kept := slots.release_held(env, intent.target)) is not None:
                ctx.note(held_for_h2c=kept)

    recorder.__doc__ = record.__doc__
    return recorder


def full_commit(*candidates: object) -> str:
    """The first candidate that is a full commit (40 hex), else the null commit. An app's
    /health may say `abc1234` or `unknown`: taken as it was, the state write failed after
    the commit point, and so did every rerun that would finish the run (exit 6 for ever)."""
    for value in candidates:
        text = str(value or "").strip().lower()
        if _FULL_COMMIT.fullmatch(text):
            return text
    return UNKNOWN_COMMIT


def load_or_empty(env: Environment) -> states.DeploymentState:
    """The state a run records onto: empty only where no file was ever written. A file the
    runbook wrote (its kept copy is there) that another tool deleted is refused naming the
    copy: recorded onto nothing, the finish of an interrupted run wrote a file without the
    history and replaced the copy too (found by review)."""
    return states.read_or_absent(env.state_file, environment=env.name)


def schema(env: Environment) -> int | None:
    try:
        return database.schema_version(env).version
    except RunbookError:
        return None


@_exclusive
def deploy(env: Environment, intent: intents.Intent, observed: slots.Observed, run_id: str,
           ctx: StepContext) -> None:
    """Write the deployment into the state file; a no-op when it is already there."""
    fresh = load_or_empty(env)
    dep_id = str(intent.record["deployment_id"])
    # the plan's schema line is the journal's unless replaced: said when this write records
    # none after all (no clean read before the migrations, the file changed since)
    unsaid = {"previous schema": "none recorded"} if intent.record.get("from_id") else {}
    if fresh.current is not None and fresh.current.id == dep_id:
        _written(ctx, fresh, " (already recorded)")
        ctx.note(**unsaid)
        return
    if (later := recorded_since(fresh, intent)) is not None:
        # another tool's deploy of this slot since this run started serves: recording this
        # run over it made a second deployment (current and previous the same version)
        _written(ctx, fresh, f" (already recorded, {later.id} by {later.deployed_by})")
        ctx.note(**unsaid)
        return
    config = env.slot(intent.target)
    report = health.probe(config, env.health.path, env.health.request_timeout)
    # this deployment's own commit, never the current one's: /health, else the image's
    # revision label, else "unknown" as every dialect accepts it (git's null commit)
    commit = full_commit(report.git_commit, intent.record.get("git_commit"))
    migration = (observed.migration_version if observed.migration_version is not None
                 else intent.record.get("migration_version"))
    if migration is None:
        migration = schema(env)
    new = states.make_deployment(
        intent.to_version, commit, intent.target,
        migration_version=migration if isinstance(migration, int) else None,
        image=intent.to_image or "", status="active", deployment_id=dep_id)
    snapshot_path = observed.snapshot_path or intent.record.get("snapshot_path")
    extra = {"snapshot_path": snapshot_path} if snapshot_path else {}
    before = intent.record.get("schema_before")
    # whether this deployment's migrations changed the schema (a count is nowhere to be
    # read: golang-migrate keeps one version); unknown, whether it had any to run
    ran = (int(migration != before) if isinstance(before, int) and isinstance(migration, int)
           else int(bool(env.migrate_command)))
    new = new.with_(health_status=report.status if report.ok else "unknown",
                    migrations_run=ran, extra=extra)
    written = deployed(fresh, new, intent)
    states.write_state(env.state_file, written)
    _written(ctx, written, f" ({new.id})")
    ctx.note(migration_version=migration, **(schema_line(fresh, written, intent) or unsaid))


def deployed(fresh: states.DeploymentState, new: states.Deployment,
             intent: intents.Intent) -> states.DeploymentState:
    """What the deploy writes over `fresh`. Pure: the plan shows it, the recorder writes it;
    what served (the record's `replaces_deployment_id`) becomes previous when the file's
    current is another. That one gains the schema it served on (`from_schema`, read before
    this deploy's migrations) when its record names none, only when it is the one the plan
    saw serve (`from_id`): the file's current may be another since."""
    replaced = intent.record.get("replaces_deployment_id")
    old = fresh.find_id(str(replaced)) if replaced else None
    leaves = old if old is not None else fresh.current
    served_id = intent.record.get("from_id")
    served_on = (_count(intent.record.get("from_schema"))
                 if leaves is not None and served_id and str(served_id) == leaves.id else None)
    return states.after_deploy(fresh, new, old, served_schema=served_on)


def recorded_since(state: states.DeploymentState | None,
                   intent: intents.Intent) -> states.Deployment | None:
    """The deployment another tool recorded as current on the record's target slot after
    its run started, or None: judged by deployment id, not version (a deploy of the same
    version is another deployment too); a switch's record names no id, so by version. Read
    by finish.superseded (whether an interrupted run is out of date) and by the deploy's
    state write (never a second record of that deployment). "After" by the ids the file held
    when the run was planned, not by clocks (intents.recorded_after)."""
    current = state.current if state is not None else None
    if current is None or current.active_slot != intent.target \
            or not intents.recorded_after(intent, current, unknown=False):
        return None
    own = own_deployment_id(intent)
    if (current.id == own) if own is not None else current.version == intent.to_version:
        return None
    return current


def own_deployment_id(intent: intents.Intent) -> str | None:
    """The deployment id the record's run records as current: a deploy's new one, a
    rollback's target; None for a switch (it records by version)."""
    return intent.deployment_id


def state_lines(state: states.DeploymentState) -> dict[str, str]:
    """The state step's `current` and `previous`, one wording for what a plan promises and
    what a run wrote (its journal), so the two compare."""
    cur, prev = state.current, state.previous
    count = f", rollback_count {cur.rollback_count}" if cur and cur.rollback_count else ""
    return {"current": (f"{cur.version} on {cur.active_slot or 'no slot'}, status "
                        f"{cur.status or 'not recorded'}{count}" if cur else "none"),
            "previous": (f"{prev.version}, status {prev.status or 'not recorded'}" if prev
                         else "none")}


def _written(ctx: StepContext, state: states.DeploymentState, said: str = "") -> None:
    """The journal's state step says what the file holds now, never the plan's promise (a
    run that found it recorded already wrote nothing)."""
    lines = state_lines(state)
    ctx.note(current=lines["current"] + said, previous=lines["previous"])


def switched(fresh: states.DeploymentState, version: str, target: Slot, *,
             health_status: str = "unknown", run_id: str | None = None, image: str = "",
             commit: Callable[[states.Deployment | None], str] | None = None,
             previous_image: str | None = None,
             intent: intents.Intent | None = None) -> states.DeploymentState | None:
    """What a switch to `version` on `target` writes over `fresh`, or None when `fresh` says it
    already. Pure: the plan shows it, the recorder writes it. `commit` names a new record's
    commit from its known record (the recorder asks the app; a plan shows no commit). The
    current one users are moved off gains the schema it served on (the record's
    `from_schema`) when its record names none, only when it is the one the plan saw serve
    (`from_id`): the file's current may be another since."""
    if fresh.current is not None and fresh.current.version == version \
            and fresh.current.active_slot == target:
        return None
    served_id = intent.record.get("from_id") if intent is not None else None
    served_on = (_count(intent.record.get("from_schema")) if intent is not None
                 and fresh.current is not None and served_id
                 and str(served_id) == fresh.current.id else None)
    # a rollback needs a deployment to roll back from: with `current_deployment: null` (a
    # valid file) the switch is recorded as a deploy of that version, from its known record
    if fresh.current is not None and fresh.previous is not None \
            and fresh.previous.version == version:
        return states.after_rollback(fresh, slot=target, health_status=health_status,
                                     run_id=run_id, image=previous_image,
                                     served_schema=served_on)
    if fresh.current is not None and fresh.current.version == version:
        return fresh.with_(current=fresh.current.with_(active_slot=target))
    known = fresh.find_version(version)
    named = commit(known) if commit is not None else full_commit(known.git_commit if known
                                                                 else None)
    # under the run's id, which its log lines and its lock carry as deployment_id (a
    # switch's plan names no deployment): a new id of its own joined nothing (review)
    dep = states.make_deployment(version, named, target, image=image, status="active",
                                 deployment_id=run_id,
                                 migration_version=known.migration_version if known else None)
    return states.after_deploy(fresh, dep.with_(health_status=health_status),
                               served_schema=served_on)


@_exclusive
def switch(env: Environment, intent: intents.Intent, observed: slots.Observed, run_id: str,
           ctx: StepContext) -> None:
    """Describe the switch in the state file; a no-op when it already does."""
    fresh = load_or_empty(env)
    target, version = intent.target, intent.to_version
    health_status = observed.health_status or "unknown"
    if health_status == "unreachable":
        health_status = "unknown"

    def commit(known: states.Deployment | None) -> str:
        report = health.probe(env.slot(target), env.health.path, env.health.request_timeout)
        return full_commit(report.git_commit, known.git_commit if known else None)

    # the id of the run that moved traffic (its log lines carry it), also when a later run
    # finishes this one after an exit 6
    new = switched(fresh, version, target, health_status=health_status, run_id=intent.run_id,
                   image=intent.to_image or "", commit=commit,
                   previous_image=(_runs_instead(env, fresh.previous, intent)
                                   if fresh.previous is not None else None), intent=intent)
    if new is None:
        _written(ctx, fresh, " (already recorded)")
        return
    states.write_state(env.state_file, new)
    _written(ctx, new)
    ctx.note(**schema_line(fresh, new, intent))


def rolled_back(fresh: states.DeploymentState, intent: intents.Intent,
                target: states.Deployment, *, health_status: str | None = None,
                run_id: str | None = None,
                image: str | None = None) -> states.DeploymentState | None:
    """What the rollback writes over `fresh`, or None when `fresh` says it already. Pure: the
    plan shows it, the recorder writes it. Rolled back from the deployment that served when
    the run began (the record's `from_id`), not the file's current, which the old tooling's
    rollback swaps with the previous without switching (found by review). The target is
    recorded as live from now, with the schema the run's guard checked it runs on when its
    record names none (`target_schema`): what a later guard reads instead of guessing; and
    the one rolled back from with the schema it served on (`from_schema`), likewise."""
    slot = intent.target
    served = deployment_of(fresh, intent, "from")
    if served is not None and served.id == target.id:
        served = None
    current = fresh.current
    previous = fresh.previous
    # already recorded: the one rolled back from marked so, or, its `status` dropped by the
    # Go CLI's rewrite since, the target carrying the runbook rollback's Go keys
    if current is not None and current.id == target.id and current.active_slot == slot and (
            served is None or (previous is not None and previous.id == served.id and (
                previous.status == "rolled_back" or (previous.status is None
                                                     and states.rolled_back_to(current))))):
        return None
    if served is None and current is not None and current.id == target.id:
        # the file called the target current and what served is not known: it now serves,
        # from `slot`, which only the record's slot has to say
        return fresh.with_(current=current.with_(active_slot=slot))
    schema = intent.record.get("target_schema")
    # only onto the record of what served (`from_id`): the file's current may be another
    served_on = intent.record.get("from_schema") if served is not None else None
    return states.after_rollback(fresh, target, slot=slot, health_status=health_status,
                                 run_id=run_id, served=served, image=image,
                                 migration_version=_count(schema),
                                 served_schema=_count(served_on))


def schema_line(fresh: states.DeploymentState, new: states.DeploymentState | None,
                intent: intents.Intent) -> dict[str, str]:
    """The state step's line for the schema `rolled_back`, `deployed` or `switched` records
    for the deployment users were moved off (`from_schema`), shown alike by the plan and the
    journal: read from what `new` holds, so it is said only where it is written; empty when
    none is."""
    served = deployment_of(fresh, intent, "from") if intent.action == "rollback" else (
        fresh.find_id(str(served_id)) if (served_id := intent.record.get("from_id")) else None)
    schema = _count(intent.record.get("from_schema"))
    written = new.find_id(served.id) if new is not None and served is not None else None
    if served is None or served.migration_version is not None or schema is None \
            or written is None or written.migration_version != schema \
            or intent.deployment_id == served.id:
        return {}
    how = {"rollback": "this run's schema guard read it",
           "deploy": "this deploy read it before its migrations"}.get(
        intent.action, f"this {intent.action} read it before it started anything")
    return {"previous schema": f"{schema}, recorded for {served.version}: the database schema "
                               f"it served on, as {how}"}


def _count(value: object) -> int | None:
    """A schema version from a run's record (JSON: a bool is no version), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@_exclusive
def rollback(env: Environment, intent: intents.Intent, observed: slots.Observed, run_id: str,
           ctx: StepContext) -> None:
    """Write the rollback into the state file; a no-op when it is already there, so a rerun
    after an interruption converges instead of rolling back again."""
    fresh = load_or_empty(env)  # removed since the run began: its target is gone, below
    target = deployment_of(fresh, intent, "target")
    if (why := _as_switch(env, fresh, intent, target)) is not None or target is None:
        # another tool rewrote (or removed) the state file meanwhile: traffic moved and was
        # verified, so what runs is recorded as a switch does (by version). Refused, every
        # rerun failed here, and the `runbook switch` it prescribed finished this very run:
        # the same error
        switch(env, intent, observed, run_id, ctx)
        ctx.note(recorded_as=why)
        return
    new = rolled_back(fresh, intent, target, health_status=observed.health_status or None,
                      run_id=run_id, image=_runs_instead(env, target, intent))
    if new is None:
        _written(ctx, fresh, " (already recorded)")
        return
    states.write_state(env.state_file, new,
                       before_rename=lambda: ctx.fault("state.before-rename"))
    _written(ctx, new)
    ctx.note(**schema_line(fresh, new, intent))


def preview(env: Environment, intent: intents.Intent, observed: slots.Observed,
            run_id: str) -> dict[str, str]:
    """The state step's plan when a later run records `intent` (finish.py): what the
    action's recorder above writes, from its own pure preview of the file as it reads it
    (its commit and image are not shown), or that the file already says it."""
    target: states.Deployment | None = None
    new: states.DeploymentState | None = None
    recorded_as: str | None = None
    schema: dict[str, str] = {}
    if intent.action == "deploy":
        fresh = load_or_empty(env)
        dep_id = str(intent.record["deployment_id"])
        if not ((fresh.current is not None and fresh.current.id == dep_id)
                or recorded_since(fresh, intent) is not None):
            new = deployed(fresh, states.make_deployment(
                intent.to_version, UNKNOWN_COMMIT, intent.target, status="active",
                deployment_id=dep_id), intent)
            # the interrupted run's own read, from its record: never one taken now
            schema = schema_line(fresh, new, intent)
    else:  # a rollback (finish.plan_for's default), by its target's id; gone from the file
        fresh = load_or_empty(env)  # (or the file gone), it is recorded as a switch (above)
        if intent.action != "switch":
            target = deployment_of(fresh, intent, "target")
            recorded_as = _as_switch(env, fresh, intent, target)
        if intent.action != "switch" and recorded_as is None and target is not None:
            new = rolled_back(fresh, intent, target, run_id=run_id,
                              health_status=observed.health_status or None)
            schema = schema_line(fresh, new, intent)
        else:
            new = switched(fresh, intent.to_version, intent.target, run_id=intent.run_id,
                           health_status=observed.health_status or "unknown", intent=intent)
            schema = schema_line(fresh, new, intent)
    lines = state_lines(new or fresh)
    if new is None:
        lines["current"] += " (already recorded: left as it is)"
    lines.update(schema)  # the recorder's own line, as it journals it
    if recorded_as is not None:
        lines["recorded as"] = recorded_as
    return lines


def _as_switch(env: Environment, fresh: states.DeploymentState, intent: intents.Intent,
               target: states.Deployment | None) -> str | None:
    """Why a rollback that moved traffic is recorded as a switch (by version), or None: the
    file, rewritten or removed by another tool since, no longer holds its target, or no
    deployment it rolled back from (neither the one that served nor a current). A rollback
    record needs both, and refusing failed every rerun (exit 6) naming itself as the fix."""
    gone = "(another tool rewrote or removed it)"
    if target is None:
        return (f"a switch to {intent.to_version}: deployment {intent.record['target_id']} is "
                f"no longer in {env.state_file} {gone}")
    if fresh.current is None and deployment_of(fresh, intent, "from") is None:
        return (f"a switch to {intent.to_version}: {env.state_file} no longer records the "
                f"deployment it was rolled back from {gone}")
    return None


def deployment_of(fresh: states.DeploymentState, intent: intents.Intent,
                  which: str) -> states.Deployment | None:
    """A rollback's target (`which` "target") or the deployment it rolled back from ("from")
    in the file as read now: by the id its record names, else by the content key (version,
    commit, deployment time) it recorded beside it, else, for a record without keys (an
    older version's), by its version where one deployment alone holds it. The Go CLI's
    rewrite drops every id (its own rollback too, which swaps current and previous): found
    by id only, the finish of an interrupted rollback was recorded as a switch, "already
    recorded", the one rolled back from left unmarked, and the next rollback went forward
    to it (found by review)."""
    record = intent.record
    if (wanted := record.get(f"{which}_id")) and (dep := fresh.find_id(str(wanted))):
        return dep
    every = [d for d in (fresh.current, fresh.previous, *fresh.history) if d is not None]
    if (key := record.get(f"{which}_key")) is not None:
        return next((d for d in every if states.content_key(d) == key), None)
    if which == "from" and not record.get("from_id"):
        return None  # nothing served by a record (none was known when it was planned)
    version = intent.to_version if which == "target" else intent.from_version
    found = {d.id: d for d in every if d.version == version}
    return next(iter(found.values())) if version and len(found) == 1 else None


def _runs_instead(env: Environment, target: states.Deployment,
                  intent: intents.Intent) -> str | None:
    """The image the run's target container runs when its record names it otherwise (the
    same build under another name: slots.prepare), recorded over it so the file says what
    runs; None: the record is kept as it is."""
    claimed = slots.image_of(env, target.version, target.image or None)
    return intent.to_image if intent.to_image and intent.to_image != claimed else None


BY_ACTION: dict[str, Record] = {"deploy": deploy, "switch": switch, "rollback": rollback}
