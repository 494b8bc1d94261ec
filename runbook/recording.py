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
from runbook.environment import Environment
from runbook.errors import RunbookError
from runbook.plan import StepContext

Record = Callable[[Environment, intents.Intent, slots.Observed, str, StepContext], None]
UNKNOWN_COMMIT = "0" * 40  # git's null object id: the commit is not known
_FULL_COMMIT = re.compile(r"[0-9a-f]{40}")


def _exclusive(record: Record) -> Record:
    """The recorder's read-modify-write under states.WRITING (see there)."""
    def recorder(env: Environment, intent: intents.Intent, observed: slots.Observed,
                 run_id: str, ctx: StepContext) -> None:
        with states.WRITING:
            record(env, intent, observed, run_id, ctx)

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
    if not env.state_file.exists():
        return states.absent(env.state_file, environment=env.name)
    return states.read_state(env.state_file, environment=env.name)


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
    if fresh.current is not None and fresh.current.id == dep_id:
        ctx.note(current=f"{intent.to_version} on {intent.to_slot} (already recorded)")
        return
    if (later := recorded_since(fresh, intent)) is not None:
        # another tool's deploy of this slot since this run started serves: recording this
        # run over it made a second deployment (current and previous the same version)
        ctx.note(current=f"{later.version} on {intent.to_slot} (already recorded, "
                         f"{later.id} by {later.deployed_by})")
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
    new = new.with_(health_status=report.status if report.ok else "unknown",
                    migrations_run=int(bool(env.migrate_command)), extra=extra)
    replaced = intent.record.get("replaces_deployment_id")  # what served, if not the file's
    states.write_state(env.state_file, states.after_deploy(
        fresh, new, fresh.find_id(str(replaced)) if replaced else None))
    ctx.note(current=f"{intent.to_version} on {intent.to_slot} ({new.id})",
             migration_version=migration)


def recorded_since(state: states.DeploymentState | None,
                   intent: intents.Intent) -> states.Deployment | None:
    """The deployment another tool recorded as current on the record's target slot after
    its run started, or None: judged by deployment id, not version (a deploy of the same
    version is another deployment too); a switch's record names no id, so by version. Read
    by finish.superseded (whether an interrupted run is out of date) and by the deploy's
    state write (never a second record of that deployment)."""
    from runbook.times import parse_utc

    current = state.current if state is not None else None
    started = parse_utc(intent.started_at)
    if current is None or started is None or current.active_slot != intent.target \
            or current.deployed_at <= started:
        return None
    own = own_deployment_id(intent)
    if (current.id == own) if own is not None else current.version == intent.to_version:
        return None
    return current


def own_deployment_id(intent: intents.Intent) -> str | None:
    """The deployment id the record's run records as current: a deploy's new one, a
    rollback's target; None for a switch (it records by version)."""
    return intent.deployment_id


@_exclusive
def switch(env: Environment, intent: intents.Intent, observed: slots.Observed, run_id: str,
           ctx: StepContext) -> None:
    """Describe the switch in the state file; a no-op when it already does."""
    fresh = load_or_empty(env)
    target, version = intent.target, intent.to_version
    if fresh.current is not None and fresh.current.version == version \
            and fresh.current.active_slot == target:
        ctx.note(current=f"{version} on {target} (already recorded)")
        return
    health_status = observed.health_status or "unknown"
    if health_status == "unreachable":
        health_status = "unknown"
    # a rollback needs a deployment to roll back from: with `current_deployment: null` (a
    # valid file) the switch is recorded as a deploy of that version, from its known record
    if fresh.current is not None and fresh.previous is not None \
            and fresh.previous.version == version:
        new = states.after_rollback(fresh, slot=target, health_status=health_status,
                                    run_id=run_id,
                                    image=_runs_instead(env, fresh.previous, intent))
    elif fresh.current is not None and fresh.current.version == version:
        new = fresh.with_(current=fresh.current.with_(active_slot=target))
    else:
        known = fresh.find_version(version)
        report = health.probe(env.slot(target), env.health.path, env.health.request_timeout)
        commit = full_commit(report.git_commit, known.git_commit if known else None)
        # under the run's id, which its log lines and its lock carry as deployment_id (a
        # switch's plan names no deployment): a new id of its own joined nothing (review)
        dep = states.make_deployment(version, commit, target, image=intent.to_image or "",
                                     status="active", deployment_id=run_id,
                                     migration_version=known.migration_version if known
                                     else None)
        new = states.after_deploy(fresh, dep.with_(health_status=health_status))
    states.write_state(env.state_file, new)
    ctx.note(current=f"{version} on {target}")


@_exclusive
def rollback(env: Environment, intent: intents.Intent, observed: slots.Observed, run_id: str,
           ctx: StepContext) -> None:
    """Write the rollback into the state file; a no-op when it is already there, so a rerun
    after an interruption converges instead of rolling back again."""
    fresh = states.read_state(env.state_file, environment=env.name)
    target_id = str(intent.record["target_id"])
    slot = intent.target
    if fresh.current is not None and fresh.current.id == target_id \
            and fresh.current.active_slot == slot:
        ctx.note(current=f"{intent.to_version} on {slot} (already recorded)")
        return
    target = fresh.find_id(target_id)
    if target is not None and fresh.current is not None and fresh.current.id == target_id:
        # the file called the target current while another version served (the old
        # tooling's rollback swaps the records without switching; `--to` it was asked for):
        # it now serves, from `slot`, which only the record's slot has to say
        switch(env, intent, observed, run_id, ctx)
        ctx.note(recorded_as=f"{intent.to_version}, already current in {env.state_file}, now "
                             f"on {slot}")
        return
    if target is None:
        # another tool rewrote the state file meanwhile: traffic moved and was verified, so
        # what runs is recorded as a switch does (by version). Refused, every rerun failed
        # here, and the `runbook switch` it prescribed finished this very run: the same error
        switch(env, intent, observed, run_id, ctx)
        ctx.note(recorded_as=f"a switch to {intent.to_version}: deployment {target_id} is no "
                             f"longer in {env.state_file} (another tool rewrote it)")
        return
    new = states.after_rollback(fresh, target, slot=slot,
                                health_status=observed.health_status or None, run_id=run_id,
                                image=_runs_instead(env, target, intent))
    states.write_state(env.state_file, new,
                       before_rename=lambda: ctx.fault("state.before-rename"))
    ctx.note(current=f"{intent.to_version} on {slot} (active)",
             previous=f"{intent.from_version} (rolled_back)")


def _runs_instead(env: Environment, target: states.Deployment,
                  intent: intents.Intent) -> str | None:
    """The image the run's target container runs when its record names it otherwise (the
    same build under another name: slots.prepare), recorded over it so the file says what
    runs; None: the record is kept as it is."""
    claimed = slots.image_of(env, target.version, target.image or None)
    return intent.to_image if intent.to_image and intent.to_image != claimed else None


BY_ACTION: dict[str, Record] = {"deploy": deploy, "switch": switch, "rollback": rollback}
