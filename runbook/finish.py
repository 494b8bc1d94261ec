"""What the next run does about an interrupted one: finish it, continue it, or stop and say.

On-call types the same command again after a kill. This module compares the interrupted
run's intent (runbook/intent.py) with what really runs (Caddy's loaded config and the proxy's
answer) and decides:

- traffic already moved to the intended slot and the proxy proves the intended version:
  the run took effect, so FINISH it (record the state, stop the old slot), never another
  rollback in the other direction;
- traffic is still where the run started: nothing took effect; plan the command normally
  (it converges on the same target, since the state file was not changed before the commit);
- anything else: stop with the facts and the command that repairs it (fail closed).
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

from runbook import caddy, database, health, recording, slots, traffic
from runbook import intent as intents
from runbook import lock as locks
from runbook.environment import Environment, Slot, command_arg
from runbook.errors import AlreadyDone, LockedError, PreconditionError, RunbookError
from runbook.plan import Phase, Plan, Step, StepContext

if TYPE_CHECKING:
    from runbook import docker
    from runbook import state as states
    from runbook.database import SchemaVersion

Record = recording.Record


class CannotFinish(PreconditionError):
    """An interrupted run that this run can neither finish nor continue: traffic moved to a
    slot that does not answer as intended, or Caddy names no single slot. Only an explicit
    `runbook switch` (the repair this error prescribes) may go past it."""

    def __init__(self, message: str, fix: str, intent: intents.Intent,
                 moved: bool | None = None) -> None:
        super().__init__(message, fix)
        self.intent = intent
        self.moved = moved  # whether Caddy serves its target (None: not known)


def in_progress(intent: intents.Intent, held: locks.LockStatus | None) -> bool:
    """Whether the run that wrote `intent` still runs: it holds the deploy lock (`held`, read
    by the caller) and its process is alive. Its record is then a run in progress, not an
    interrupted one: calling it "interrupted, `runbook rollback` finishes it" in the middle
    of a long restore pushed on-call towards `unlock --force`."""
    h = held.holder if held is not None else None
    return (held is not None and h is not None and not held.is_ours
            and held.holder_alive is True and h.pid == intent.pid
            and h.hostname == intent.hostname)


def done_already(refusal: PreconditionError, current: states.Deployment | None, live: Slot,
                 runs: str | None, running: bool) -> PreconditionError:
    """A refusal because what the command asks is in effect (a deploy's "already serves", a
    switch's "already takes traffic", a rollback's "already serves" or "rolled back from"),
    said as AlreadyDone when what runs shows the state file's current record in effect: Caddy
    runs the slot it names (`live`), whose container runs (`running`), as its version
    (`runs`). It carries the run that recorded it: a rollback's (or a switch recorded as one)
    `rollback_id`, else the record's id (a deploy's, a switch's new record: its run id; a
    switch between two slots of one version keeps the old id: run.py reads its own run
    record then); runbook/run.py says that run completed when it is the one whose stale lock
    the rerun took over. Otherwise the refusal as it is. Callers ask only while no
    interrupted run's record waits (that run is not complete)."""
    if current is None or live != current.active_slot or runs != current.version \
            or not running:
        return refusal
    by = current.extra.get("rollback_id")
    return AlreadyDone(refusal.message, refusal.fix,
                       done_by=by if isinstance(by, str) else current.id,
                       slot=str(live), version=current.version)


def superseded(intent: intents.Intent,
               state: states.DeploymentState | None) -> states.Deployment | None:
    """The deployment another tool recorded on the record's target slot since the
    interrupted run started, when that run never moved traffic (killed before its switch):
    the host's deploy script deployed to the same standby slot and switched to it. Traffic
    on the target is then that deploy's, not this run's; read as this run's, every command
    was refused with a repair that reverts the fresh deploy. Judged by deployment id, not
    version: a deploy of the same version is another deployment too (taken for the killed
    run's, its finish recorded a second one, current and previous both that version). A
    switch's record names no id: by version then. None otherwise (`state`: a
    DeploymentState, or None when unreadable)."""
    if intent.phase is not intents.Phase.PREPARE:
        return None
    return recording.recorded_since(state, intent)


def interrupted(env: Environment) -> tuple[intents.Intent, str] | None:
    """(intent, "finish" | "continue") for an interrupted run, or None when there is none."""
    intent = intents.read(env)
    if intent is None:
        return None
    try:
        held = locks.status(env)
    except RunbookError:
        held = None
    if held is not None and in_progress(intent, held):
        stopped = held.suspended and held.pid is not None
        # where it is, as status says it: what Caddy runs, not its record alone
        serving = traffic.serving_now(env)
        now = intent.describe(moved=None if serving is None else serving == intent.target,
                              live=True)
        raise LockedError(f"a run is in progress, not interrupted: {now}, "
                          f"holding the deploy lock ({held.describe()})"
                          + (f", but its process {held.pid} is suspended (Ctrl-Z or SIGSTOP), "
                             "so it never ends by itself" if stopped else "")
                          + "; nothing was changed",
                          (locks.suspended_fix(held.pid) if stopped and held.pid is not None
                           else "wait for it to end")
                          + f"; `runbook status {command_arg(env)}` then says how it ended")
    try:
        found = traffic.read(env)
    except traffic.TrafficUnknownError as exc:
        raise PreconditionError(f"an interrupted run is unfinished ({intent.describe()}) and "
                                f"{exc.message}", exc.fix) from None
    if found.slot == intent.target and superseded(intent, _state(env)) is not None:
        return intent, "continue"  # another tool's deploy serves: this run's record is old
    if found.slot == intent.target:
        check = target_check(env, intent)
        if check.ok:
            return intent, "finish"
        raise cannot_finish(env, intent, check)
    if found.slot == intent.source:
        return intents.standing(intent, found.slot), "continue"
    if intent.phase is intents.Phase.PREPARE and not found.slots:
        # Caddy dials neither slot (a first deploy on a host whose Caddyfile names a wrong
        # port) and the run never reached its switch: traffic did not move, so the next run
        # goes on under its own checks; refusing it left only a hand edit of the record
        return intent, "continue"
    raise CannotFinish(
        f"an interrupted run is unfinished ({intent.describe()}) and Caddy's running config "
        f"names no single slot: {found.problem(env)}",
        traffic.no_single_slot_fix(env, found), intent)


def target_check(env: Environment, intent: intents.Intent) -> caddy.VerifyResult:
    """Whether the run's target answers as its version through the proxy, Caddy serving it:
    what "it took effect" means, here and in `runbook status` (which said so of a target
    that had crashed since, naming a finish that refuses)."""
    return caddy.verify(env, intent.target, intent.to_version, attempts=3, interval=0.2)


def cannot_finish(env: Environment, intent: intents.Intent,
                  check: caddy.VerifyResult) -> CannotFinish:
    """Traffic moved to a target that does not answer as intended: the switch back."""
    return CannotFinish(
        f"an interrupted run moved traffic to {intent.to_slot}, which does not answer as "
        f"{intent.to_version} now: {check.describe()} ({intent.describe(moved=True)})",
        f"put traffic back on the slot you know is healthy: `runbook switch {command_arg(env)} "
        f"--slot {intent.from_slot}`, then check `runbook status {command_arg(env)}`", intent,
        moved=True)


def _state(env: Environment) -> states.DeploymentState | None:
    """The deployment state as written now, or None when it cannot be read (then nothing is
    taken as superseded: the record is judged by what runs, as before)."""
    from runbook import state as states

    try:
        return states.read_state(env.state_file, environment=env.name)
    except (RunbookError, OSError):
        return None


def replaced(found: tuple[intents.Intent, str] | None,
             rerun: intents.Intent | None = None) -> intents.Intent | None:
    """The record of an interrupted run that stopped before traffic moved ("continue"), which
    this run's own record will overwrite: the plan names it, and a failure before the commit
    puts it back (Plan.replaces). A record kept on purpose (a deploy whose schema moved) was
    silently replaced by the next switch or deploy, and lost if that one failed in turn.
    None when this run (`rerun`, its own record) is that same run again: its record
    supersedes the dead one's, never put back (a failed rerun left the dead record, and
    status called it unfinished for good)."""
    if found is None or found[1] != "continue":
        return None
    if rerun is not None and same_run(found[0], rerun):
        return None
    return found[0]


def same_run(old: intents.Intent, new: intents.Intent) -> bool:
    """Whether `new` is `old`'s command again: the same verb, slots and target version.
    A killed restore's record (its snapshot named) is kept unless the rerun restores the
    same snapshot: it is what says the database was replaced."""
    return ((old.action, old.source, old.target, old.to_version)
            == (new.action, new.source, new.target, new.to_version)
            and old.record.get("restore_snapshot") in (None,
                                                       new.record.get("restore_snapshot")))


def taken_snapshot(env: Environment, deployment_id: str) -> Any:
    """The usable pre-deploy snapshot an interrupted run of deployment `deployment_id` took,
    or None (it was interrupted before the snapshot was done: nothing after it ran)."""
    from runbook import snapshots

    own = [s for s in snapshots.list_snapshots(env)
           if s.deployment_id == deployment_id and s.usable and s.path.exists()]
    return own[0] if own else None


def dirty_schema(env: Environment, schema: SchemaVersion,
                 pending: intents.Intent | None) -> PreconditionError:
    """The schema golang-migrate left dirty, no migration under way: migration N failed or
    was cut off part-way, so some of it may be applied. golang-migrate runs nothing on it
    until it is repaired, and migrations run again re-apply a file that half ran (found by
    review: a deploy rerun did both). The repair named is exact when the deploy that left it
    is known (`pending`, its record): the restore of its pre-deploy snapshot."""
    name = command_arg(env)
    snap = None
    left = ""
    if pending is not None and pending.action == "deploy":
        left = f" (by the deploy {pending.run_id} of {pending.to_version})"
        deployment = pending.record.get("deployment_id")
        try:
            snap = taken_snapshot(env, deployment) if isinstance(deployment, str) else None
        except (OSError, RunbookError):  # not found: the general repair is named instead
            snap = None
    version = schema.version
    message = (f"the database schema is dirty at version {version}: migration {version} "
               f"failed or was cut off part-way{left}, so some of it may be applied, and "
               "golang-migrate runs no migration on it until it is repaired")
    force = (f"`migrate force` to the version before {version} (golang-migrate) is safe "
             f"only once you have checked by hand that migration {version} left nothing "
             "behind, or undone what it left")
    if snap is not None:
        return PreconditionError(message, (
            "restore the pre-deploy snapshot that deploy took before its migrations (schema "
            f"{snap.migration_version}): `runbook snapshot restore {name} {snap.path}` (it "
            "names the writes since that it undoes, and keeps them in a safety snapshot); "
            f"instead, {force}"))
    return PreconditionError(message, (
        f"restore a snapshot taken before migration {version} ran (`runbook snapshot list "
        f"{name}` shows each one's schema): `runbook snapshot restore {name} FILE`; "
        f"instead, {force}"))


def dirty_refusal(env: Environment, schema: SchemaVersion, pending: intents.Intent | None,
                  again: str, rerun: str, forced: str = "") -> PreconditionError | None:
    """Why a run that starts code on the database refuses a schema golang-migrate left dirty
    (None: it is not): a migration under way (golang-migrate's advisory lock held: wait,
    then `again`), or one that failed or was cut off part-way (dirty_schema's repair, then
    `rerun`, and `forced`, how --force goes past it, where it does). Deploy and switch refuse
    alike (found by review: a switch planned on it, then failed at its health gate)."""
    if not schema.dirty:
        return None
    try:
        running = database.migration_lock(env)
    except RunbookError:  # cannot tell: never a restore advised under a running migration
        running = "a session may (pg_locks cannot be read)"
    if running:
        return PreconditionError(
            f"the database schema is dirty at version {schema.version} and a migration lock is "
            f"held ({running}): a migration is under way; nothing was changed",
            f"wait until it ends (`runbook status {command_arg(env)}` shows the schema without "
            f"\"dirty\"), then {again}; if that session runs no migration (another program's "
            "advisory lock), have it release the lock first")
    dirty = dirty_schema(env, schema, pending)
    return PreconditionError(f"{dirty.message}; nothing was changed",
                             f"{dirty.fix}; then {rerun} (once migration {schema.version} is "
                             f"fixed, if it failed){forced}")


def replacing_warning(env: Environment, old: intents.Intent, action: str) -> str:
    """What the plan says of the record it replaces, with a deploy's pre-deploy snapshot:
    the database from before that deploy's migrations, which its record points to."""
    deployment = old.record.get("deployment_id") if old.action == "deploy" else None
    try:
        snapshot = taken_snapshot(env, deployment) if isinstance(deployment, str) else None
    except (OSError, RunbookError):  # a warning's detail: never what stops a repair
        snapshot = None
    kept = (f"; its pre-deploy snapshot {snapshot.path} holds the database from before it"
            if snapshot is not None else "")
    # a "continue" record (replaced()): traffic where it was, or on another tool's deploy
    return (f"an interrupted run stopped before traffic moved: {old.describe(moved=False)}"
            f"{kept}; this "
            f"{action} replaces its record once it changes anything, and puts it back if it "
            "fails before traffic moves")


def plan_for(env: Environment, intent: intents.Intent, run_id: str) -> Plan:
    """The finish plan of an interrupted run of any action: its verb's recorder and the
    command that reruns it (runbook/recording.py: no verb imported here)."""
    record = recording.BY_ACTION.get(intent.action, recording.rollback)
    return finish_plan(env, intent, run_id, record, resume_command(env, intent))


def _stop_old(env: Environment, intent: intents.Intent, observed: slots.Observed) -> Step:
    """A switch keeps the old slot running (it can be switched back at once): finishing an
    interrupted one must not stop it either; a rollback's or a deploy's is stopped.
    `observed`: the container the interrupted run's gate proved, as its record says."""
    # re-gated as the interrupted run was (its record says whether --force skipped its gate):
    # ungated, the finish a refused stop names would stop the last good slot under an
    # unhealthy new one
    planned = _old_container(env, intent)
    step = slots.stop_step(env, intent.source, env.stop_old_slot,
                           gated=intent.record.get("gated") is not False, observed=observed,
                           down=_down_now(env, intent, planned), planned=planned)
    gated = observed.gated_container
    container = env.slot(intent.target).container
    step.details["new slot"] = (
        f"{container} must still be the container the interrupted run's health gate proved "
        f"(its record): id {(gated[0] or '?')[:12]}, started {gated[1]}, restarts {gated[2]}"
        if gated is not None else
        f"the container the interrupted run's health gate proved is not recorded (a record "
        f"an older version wrote, or one written before its gate passed): only {container} "
        "restarting at that moment is caught")
    if intent.action == "switch":
        step.skip = "a switch keeps the old slot running, to switch back at once"
    return step


def _old_container(env: Environment, intent: intents.Intent) -> docker.ContainerInfo | None:
    """The old slot's container as this finish plans it (None: Docker cannot be read): its
    stop goes to that one, never to another given the name since."""
    from runbook import docker

    try:
        return docker.inspect(env.slot(intent.source).container)
    except RunbookError:
        return None


def _down_now(env: Environment, intent: intents.Intent,
              info: docker.ContainerInfo | None) -> str | None:
    """Why the old slot will be neither drained nor stopped by the finish: it is not up now
    (a restoring rollback's maintenance stop took it down before its switch). None: it is
    up, or Docker cannot be read (the plan then shows the drain and the stop)."""
    if info is None:
        return None
    restored = intent.record.get("restore_snapshot") is not None
    return slots.down_when_planned(info, f" (the interrupted run {intent.run_id} restored the "
                                         "database: its maintenance stop takes every app slot "
                                         "down)" if restored else "")


def resume_command(env: Environment, intent: intents.Intent) -> str:
    """The command that reruns (so finishes) the interrupted run."""
    if intent.action == "deploy":
        return f"runbook deploy {command_arg(env)} --version {intent.to_version}"
    if intent.action == "switch":
        return f"runbook switch {command_arg(env)} --slot {intent.to_slot}"
    # named: a rerun without it goes to the previous deployment, not to the version a
    # `rollback --to` was going to (found by review)
    return f"runbook rollback {command_arg(env)} --to {intent.to_version}"


def not_what_it_did(env: Environment, intent: intents.Intent, asked: str) -> PreconditionError:
    """A command asking for something else than the interrupted run that took effect did: it
    is refused, not turned into that run's finish (which exited 0 without doing what was
    asked: a `deploy --version Y` that finished a rollback and never deployed Y)."""
    return PreconditionError(
        f"an interrupted run took effect and is not finished ({intent.describe(moved=True)}); "
        f"{asked} is not what it did, so nothing was changed",
        f"finish it first with `{resume_command(env, intent)}`, then run this command again; "
        f"or undo it: `runbook switch {command_arg(env)} --slot {intent.from_slot}` puts "
        f"traffic back on {intent.from_version or intent.from_slot} (a switch does not check "
        "the schema: after a deploy that migrated, finish it and then `runbook rollback`, "
        "whose schema guard does)")


def caddyfile_names(env: Environment, target: Slot) -> bool:
    """The Caddyfile on disk names `target` (its finish step is then skipped); False where
    it cannot be read (the plan says that)."""
    from runbook.caddy import text as caddy_text

    try:
        return bool(caddy_text.inspect(caddy.read(env), env).slot == target)
    except (RunbookError, OSError):
        return False


def _caddyfile_step(env: Environment, intent: intents.Intent) -> Step:
    """The file on disk made to name the slot Caddy runs. An undo that wrote the old file back
    and then could not reload it (or was killed between the two) left the file naming the
    old slot while Caddy runs the new one; finishing then stopped that old slot, and the next
    Caddy restart or reload sent every user to a stopped container."""
    from runbook.caddy import switch as caddy_switch
    from runbook.caddy import text as caddy_text

    target = intent.target
    path = env.caddy.caddyfile
    try:
        names: str = str(caddy_text.inspect(caddy.read(env), env).slot or "no single slot")
    except RunbookError as exc:
        names = f"unreadable now ({exc.message})"
    details = {"file": str(path), "names": names, "Caddy runs": str(target)}

    def run(ctx: StepContext) -> None:
        text = caddy.read(env)
        if caddy_text.inspect(text, env).slot == target:
            ctx.note(caddyfile=f"names {target}")
            return
        caddy_switch.write_config(env, caddy_text.rewrite(text, env, target))  # no reload:
        ctx.note(caddyfile=f"rewritten to name {target}")  # Caddy already runs the target

    step = Step("caddyfile", f"Make the Caddyfile on disk name {target}, as Caddy runs it",
                details | {"then": f"rewrite its managed block to {target} (no reload)"},
                run=run, phase=Phase.FINISH)
    if names == str(target):
        step.skip = f"the Caddyfile on disk already names {target}"
    return step


def finish_plan(env: Environment, intent: intents.Intent, run_id: str, record: Record,
                resume_command: str) -> Plan:
    """The steps left after the commit of an interrupted run, as a plan of their own."""
    facts: dict[str, Any] = {"from": intent.from_version, "to": intent.to_version,
                             "from_slot": intent.from_slot, "to_slot": intent.to_slot,
                             "finishing": intent.run_id, "container_action": "none"}
    report = health.probe(env.slot(intent.target), env.health.path, env.health.request_timeout)
    observed = slots.Observed(health_status=report.status if report.ok else "unknown",
                              gated_container=intents.gated_container(intent))
    facts["health_status"] = observed.health_status

    def run_record(ctx: StepContext) -> None:
        record(env, intent, observed, run_id, ctx)
        if intent.action == "switch":  # its old slot is kept (`_stop_old`): said, recorded
            slots.keep_for_switch_back(env, intent.source, intent.run_id, ctx)

    try:  # what the recorder writes, from its own preview
        recorded = recording.preview(env, intent, observed, run_id)
    except RunbookError as exc:
        recorded = {"current": f"unreadable now ({exc.message})"}

    steps = [
        Step("preflight", "Check the interrupted run against what runs (read-only, done)", {
            "interrupted run": intent.describe(moved=True),
            "traffic": f"{intent.to_slot}: the proxy answers {intent.to_version} (verified)",
            "so": "it took effect: finish it (no new switch, nothing undone)",
        }, phase=Phase.PREFLIGHT),
        _caddyfile_step(env, intent),
        Step("state", f"Record the {intent.action} in the deployment state",
             {"file": str(env.state_file), **recorded},
             run=run_record, phase=Phase.FINISH),
        _stop_old(env, intent, observed),
    ]
    return Plan(intent.action, env,
                f"finish the interrupted {intent.action} {intent.run_id} on {env.display}: "
                f"{intent.to_version} on {intent.to_slot}", steps,
                [f"an interrupted run took effect and is being finished: "
                 f"{intent.describe(moved=True)}"],
                # the process that carries the run now: with the killed run's pid, status
                # and a dry run called this very run "interrupted, finish it" while it ran
                facts=facts, intent=intent.with_(phase=intents.Phase.COMMITTED,
                                                 pid=os.getpid(),
                                                 hostname=socket.gethostname()),
                resume_command=resume_command, finishing=intent.describe(moved=True))
