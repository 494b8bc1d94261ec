"""Deploy a version to the standby slot: recreate, migrate, gate, switch, record.

Drills need it to arrange a previous deployment, and so does recovery ("redeploy a known-good
version"). The deployment records the image and the schema version it ran with, so a later
rollback can tell whether migrations ran after it.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass
from typing import Any

from runbook import (
    compose,
    database,
    docker,
    finish,
    health,
    preflight,
    recording,
    slots,
    traffic,
)
from runbook import intent as intents
from runbook import state as states
from runbook.environment import Environment, Slot, command_arg
from runbook.errors import ConfigError, PreconditionError, RunbookError, UsageError
from runbook.plan import Phase, Plan, Stays, Step, StepContext
from runbook.restore_records import refuse_doubted
from runbook.run import RunResult, perform


@dataclass(frozen=True)
class Options:
    version: str
    force: bool = False  # skip the health gate
    reason: str = "deploy"
    slot: Slot | None = None  # default: the standby slot
    # start the app on a restored database its check doubted (restore_records.ACCEPT_FLAG)
    accept_restored_data: bool = False


VERSION = re.compile(r"[0-9a-f]{7}")


# how long a migration may run (the exec waits for its end; Ctrl-C is held meanwhile)
MIGRATE_TIMEOUT = 24 * 3600.0


def check_version(version: str) -> str:
    """A deployable version is an image tag: the 7-hex short commit (bad input otherwise)."""
    version = version.strip().lower()
    if not VERSION.fullmatch(version):
        raise UsageError(f"version {version!r} is not a 7-hex short commit",
                         "pass the image tag, e.g. --version abc1234 (git rev-parse --short=7)")
    return version


def plan(env: Environment, options: Options, run_id: str) -> Plan:
    version = check_version(options.version)
    found = finish.interrupted(env)
    if found is not None and found[1] == "finish":
        done = found[0]
        if done.action == "deploy" and done.to_version == version \
                and options.slot in (None, done.target):
            return finish.plan_for(env, done, run_id)
        raise finish.not_what_it_did(env, done, f"a deploy of {version}")
    # the new version starts (and migrates) on the database: never on one a restore's check
    # doubted unless on-call accepts it
    accepted = refuse_doubted(env, found[0] if found is not None else None, run_id, "deploy",
                              options.accept_restored_data)
    if not database.configured(env):
        # its migrations (a migrate_command, or the app's own on start) would change the
        # schema with no pre-deploy snapshot to bring it back: the rule is snapshot first
        raise ConfigError(f"{env.display}: no database is configured, so the deploy cannot "
                          "snapshot it before the new version migrates; nothing was changed",
                          "set [database] env_file to the host's env file (/opt/togather/"
                          f".env.{env.name}) or export DATABASE_URL")
    state = states.read_or_absent(env.state_file, environment=env.name)
    current = state.current
    warnings: list[str] = []
    if current is not None and current.version == version and options.slot is None:
        # what serves decides, not the file: the old tooling's rollback swaps current and
        # previous in it without switching Caddy, and this recovery path was refused then
        serving, _ = traffic.live_slot(env, current.active_slot)
        info = docker.inspect(env.slot(serving).container)
        runs = info.tag if info.tag and states.is_version(info.tag) else None
        report = (health.probe(env.slot(serving), env.health.path, env.health.request_timeout)
                  if runs in (version, None) and info.running else None)
        if report is not None and report.ok:  # a tag not a version: the file says
            refused = PreconditionError(f"{version} already serves, from the {serving} slot (as "
                                        "Caddy runs it)", "nothing to deploy; use `runbook "
                                        "status` to see both slots")
            # a deploy killed after its last step, typed again: said as done, by that run
            raise refused if found is not None else finish.done_already(
                refused, current, serving, runs, info.running)
        if report is not None:  # found by review: the guide's recovery when it is broken
            warnings.append(f"{version} serves from the {serving} slot but its health check "
                            f"fails ({report.status}: {report.reason()}): deploying "
                            f"{version} again, to the other slot")
        else:
            warnings.append(f"the state file names {version} as the current deployment, but "
                            f"the {serving} slot serves "
                            + (f"{runs}" if info.running else "nothing (its container is "
                               f"{info.status})") + f": deploying {version}")
    dialed_none = False  # Caddy sends users to neither slot (a first deploy)
    if current is None and state.previous is None:
        live = Slot.BLUE
        try:
            live, warnings = traffic.live_slot(env, None)
        except RunbookError as exc:
            # a first deploy may go to a slot Caddy does not dial, never to one it does: with
            # both dialed (or the proxy naming the other), green was planned as "free", its
            # recreate was refused mid-run and the undo's stop raised a false alarm
            if traffic.read(env, proxy=False).slots:
                raise PreconditionError(
                    f"no deployment is recorded and {exc.message}, so no slot is known to be "
                    "free; nothing was changed", "repoint Caddy at the slot that should serve "
                    f"(`runbook switch {command_arg(env)} --slot <blue|green>`), then "
                    "deploy") from None
            live = (options.slot or Slot.GREEN).other  # neither is dialed: either is free
            dialed_none = True
            warnings.append("no deployment recorded and Caddy dials neither slot: deploying "
                            f"to {live.other}")
    else:
        live, said = traffic.live_slot(env, current.active_slot if current else None)
        warnings += said
    target = options.slot or live.other
    image = slots.image_of(env, version)
    if not docker.image_exists(image):
        raise PreconditionError(f"image {image} is not present on this host",
                                "build or load it first "
                                f"(docker images {env.compose.image_repository})")
    from runbook import caddy

    caddy.check_running(env)
    config = env.slot(target)
    observed = slots.Observed()
    compose.check_recreate(env, target, image, action="deploy")  # a `docker run` host
    recreate = compose.recreate_slot(env, target, version)
    standby = docker.inspect(config.container)
    # the compose project that made the slots (Docker's label), as a rollback's recreate
    # checks: under another, compose fails on the name mid-run, or makes a slot on another
    # network when the standby was removed
    live_info = docker.inspect(env.slot(target.other).container)
    replaces = _serving_record(state, live_info, warnings) if target.other == live else None
    compose.check_project_of(env, target, standby, live_info, image, action="deploy")
    # the service compose recreates is the standby's, never the serving container's
    compose.check_service(env, target, standby, live_info)
    # compose would fail on one half-way: stopped ones the plan removes first, others refused
    leftovers = compose.removable_leftovers(env, target, live_info)
    slots.refuse_if_held(env, target, standby)
    slots.refuse_if_migrating(env, target, standby)
    read_now = _refuse_if_dirty(env, version, found[0] if found is not None else None)
    traffic.refuse_recreate_if_pinned(env, target)  # another site's upstream: it serves
    # what compose creates the container from (its file's `image:`): what is checked, shown
    # and recorded from here on
    made, image, named, build = slots.created_image(env, target, version, image,
                                                    slots.claim_of(env, version))
    if named:
        warnings.append(f"the new container runs {image}{named}")
    planned = caddy.plan_switch(env, target, slots.reach(env))
    checks = preflight.start(env, candidate=planned.new_text,
                             recreate=True, migrate_image=image,
                             loaded=lambda: traffic.loaded_config(env), tag=version)
    tools = checks.result()
    warnings += checks.warnings
    # The same deploy rerun after an interruption before traffic moved is that deployment
    # again: its id, and the pre-deploy snapshot it took before its migrations ran. A new one
    # now would be at the migrated schema, and the schema guard, a restore and the cleanup
    # would all take it for the state before this deploy.
    # Only the same run on the same slots: after another tool's deploy took the killed run's
    # slot (and serves from it), this one goes to the other slot, from another schema, and
    # reusing the old snapshot would record data from before that deploy as this one's
    again = found[0] if found is not None and found[0].action == "deploy" \
        and found[0].to_version == version and found[0].record.get("deployment_id") \
        and (found[0].source, found[0].target) == (target.other, target) \
        and not _recorded_since(state, found[0]) else None
    # a new deployment's id is its run's (dep_...): the log names it from its first line
    deployment_id = str(again.record["deployment_id"]) if again else run_id
    taken = finish.taken_snapshot(env, deployment_id) if again else None
    # kept only when the schema moved since it was taken (the killed run migrated): with the
    # schema where it was, nothing migrated, and the snapshot (a day old, maybe) would be
    # what a restore of this deploy loses every write since to; a new one is taken instead
    now_schema = recording.schema(env) if taken is not None else None
    if taken is not None and isinstance(taken.migration_version, int) and now_schema is None:
        # found by review: "unknown" read as "moved", and the old snapshot was kept as this
        # deploy's without knowing whether its migrations ran: fail closed
        raise PreconditionError(
            f"an interrupted deploy of {version} took snapshot {taken.name} before its "
            f"migrations (schema {taken.migration_version}), and the database's schema cannot "
            "be read now, so whether they ran is unknown; nothing was changed",
            f"check the database (`runbook status {command_arg(env)}`), then run the deploy again")
    stale = taken if taken is not None and isinstance(taken.migration_version, int) \
        and now_schema == taken.migration_version else None
    if stale is not None:
        taken = None
    if taken is not None:
        observed.snapshot_path = str(taken.path)
    else:  # while planning: found by the dump, the run had taken the lock, written its intent
        from runbook.snapshots import commands, room

        room.refuse_without_snapshot_room(env, "the pre-deploy snapshot")
        commands.require_container(env)
        commands.require_login(env)  # a password kept beside the URL reaches pg_dump too

    snapshot_schema: list[int | None] = []
    clean_schema: list[int] = []  # that snapshot's schema, when it was not dirty

    def run_snapshot(ctx: StepContext) -> None:
        from runbook import snapshots

        snap = snapshots.pre_deploy_snapshot(env, deployment_id, _revision(image),
                                             recording.schema(env))
        snapshot_schema.append(snap.migration_version)
        if isinstance(snap.migration_version, int) and not snap.dirty:
            clean_schema.append(snap.migration_version)
        observed.snapshot_path = intent.record["snapshot_path"] = str(snap.path)
        ctx.note(snapshot=snap.name, schema=snap.migration_version)
        if snap.warning:  # e.g. large objects written since the plan: before the migration
            ctx.note(warning=snap.warning)
            ctx.notice(f"the pre-deploy snapshot {snap.name}: {snap.warning}")

    def baseline() -> int | None:
        """The schema before this deployment's migrations: a rerun of an interrupted deploy
        reads it from the snapshot taken before them (the database may be migrated already,
        and a change measured from there would be none: "nothing took effect", wrongly)."""
        if taken is not None and isinstance(taken.migration_version, int):
            return int(taken.migration_version)
        # this run's own pre-deploy snapshot, taken before the new version started: read
        # at the migrate step instead, after an image that also migrates on start had run,
        # "before" equalled "after" and a later failure said "nothing took effect"
        if snapshot_schema and isinstance(snapshot_schema[0], int):
            return int(snapshot_schema[0])
        return recording.schema(env)

    def served_on() -> int | None:
        """The schema the deployment users are moved off served on: the read before this
        deployment's migrations (as `baseline`), only from a pre-deploy snapshot that found
        it clean (a rerun's: the interrupted run's own), never a guess."""
        if taken is not None and isinstance(taken.migration_version, int):
            return int(taken.migration_version)
        return clean_schema[0] if clean_schema else None

    created: list[str] = []  # the id of the container compose made: the undo stops that one

    def run_recreate(ctx: StepContext) -> None:
        schema_at_start.append(baseline())
        # the state file's migrations_run says whether this deployment moved the schema:
        # "1" for every deploy with a migrate_command, whether it applied one or none, told
        # on-call nothing (found by review)
        intent.record.setdefault("schema_before", schema_at_start[0])
        # recorded for the deployment it replaces when that record names none (`from_id`)
        if "from_id" in intent.record and (was := served_on()) is not None:
            intent.record.setdefault("from_schema", was)

        def undo() -> Stays | None:
            busy = _still_migrating(env, target)
            if busy is not None:  # cut off half-way, the schema stays dirty under what serves
                flagged.append(True)
                return Stays(
                    f"{config.container} is left running: {busy}, and stopping it would cut "
                    "them off and leave the database schema dirty under the serving version",
                    f"wait until they end (`runbook status {command_arg(env)}` shows the schema "
                    f"without \"dirty\"), then `docker stop {config.container}`; to put the "
                    "schema back, restore the pre-deploy snapshot "
                    f"{observed.snapshot_path or '(see `runbook snapshot list`)'}")
            slots.stop_if_started(env, target, observed, created[0] if created else None)
            # an app that migrates itself (with or without a migrate_command) may have, from
            # its start on, whatever stopped the run before the commit (its gate, the switch,
            # Ctrl-C): said, and the record kept, never "nothing took effect" with the schema
            # moved
            if schema_at_start and not flagged:
                return _schema_moved(schema_at_start[0], "new version's start")
            return None

        # refused (another container under its name since the plan; it serves, another
        # site proxies to it, ...): nothing to undo, and the undo's stop would cut what it
        # serves
        slots.same_container(env, target, standby, verb="recreated",
                             again=f"runbook deploy {command_arg(env)} --version {version}")
        slots.refuse_recreate(env, target)
        # registered before the act (a Ctrl-C or time-out inside it may leave it running)
        ctx.stop_if_signalled()  # a Ctrl-C while it read: nothing to undo yet
        ctx.on_failure(f"stop {config.container} (started by this run)", undo)
        slots.recreate(env, target, version, checked=True, image=made, build=build,
                       cut_off=ctx.cut_off, created=created)

    def run_migrate(ctx: StepContext) -> None:
        before = baseline()
        ctx.fault("migrate.before-exec")
        try:
            # waited for as long as they run: a migration silent for the exec's usual 300 s
            # (an index built on a big table) was given up on while it went on inside the
            # container, and the run said nothing changed
            code, output = docker.exec_run(config.container, list(env.migrate_command),
                                           timeout=MIGRATE_TIMEOUT)
        except BaseException:  # the engine lost, the exec gone: the outcome is unknown
            _schema_changed(ctx, before, "migrations that did not report their end")
            raise
        if code != 0:
            _schema_changed(ctx, before, "failed migrations")  # some may have run
            raise PreconditionError(f"migrations failed in {config.container} (exit {code}): "
                                    f"{output.strip().splitlines()[-1] if output.strip() else ''}",
                                    f"read `docker logs {config.container}`; the database "
                                    "may need a restore (`runbook snapshot list`)")
        after = recording.schema(env)
        observed.migration_version = after
        intent.record["migration_version"] = after  # a resumed run records it too
        ctx.note(schema=f"{before} -> {after}")
        if after != before:  # a later failure must not say "nothing took effect"
            flagged.append(True)
            serving = current.version if current else "the serving version"
            failing = _fails_on_it()
            ctx.cannot_undo(
                f"the new version's migrations changed the database schema ({before} -> "
                f"{after}) and stay: {serving} serves on schema {after}"
                + (f" and fails its health check there ({failing})" if failing else ""),
                f"check it: `runbook status {command_arg(env)}`; to put the schema back, "
                f"restore the pre-deploy snapshot: {_restore_command()}, or deploy a fixed "
                "version")
            if failing:
                # undone, users would stay on a build that fails on this schema, and the one
                # that fits it stopped (found by a kill fuzz: Ctrl-C or a dropped ssh session
                # here left the serving slot's /health failing, the new build stopped)
                ctx.until_commit(f"the migrations moved the database schema to {after}, on "
                                 f"which {serving} on the {live} slot fails its health check")

    def _fails_on_it() -> str:
        """Why the serving slot's /health fails now ('' when it answers ok, or when Caddy
        dials no slot): asked once the migrations moved the schema under it."""
        if dialed_none:
            return ""
        report = health.probe(env.slot(live), env.health.path, env.health.request_timeout)
        return "" if report.ok else report.reason() or report.status

    def _restore_command() -> str:
        """The restore of this deploy's pre-deploy snapshot, exact once it is known."""
        if observed.snapshot_path:
            return f"`runbook snapshot restore {command_arg(env)} {observed.snapshot_path}`"
        return f"`runbook snapshot restore {command_arg(env)} FILE` (`runbook snapshot list`)"

    def _schema_moved(before: int | None, what: str) -> Stays | None:
        """After the new version could migrate: a changed, dirty (or unreadable) schema, as
        what cannot be undone (needing attention, never "nothing took effect"), or None."""
        try:
            read: database.SchemaVersion | None = database.schema_version(env)
        except RunbookError:
            read = None
        now = read.version if read is not None else None
        if read is not None and now == before and not read.dirty:
            return None
        flagged.append(True)
        if read is not None and read.dirty:
            # found by review: said as "is at 2: it may have changed", never "dirty", with
            # the restore's FILE left for on-call to find though this run took it
            return Stays(
                f"the database schema was {before} before the new version started and is at "
                f"{read.describe()} after the {what}: migration {read.version} stopped "
                "part-way (some of it may be applied), golang-migrate runs no migration on it "
                "until it is repaired, and "
                f"{current.version if current else 'the serving version'} serves on it; that "
                "stays",
                f"check it: `runbook status {command_arg(env)}`; put the schema back by "
                f"restoring the pre-deploy snapshot: {_restore_command()} (a deploy refuses "
                "until then)")
        seen = f"is at {now}" if now is not None else "cannot be read now"
        return Stays(
            f"the database schema was {before} before the new version started and {seen} "
            f"after the {what}: it may have changed, and that stays",
            f"check it: `runbook status {command_arg(env)}`; to put the schema back, restore the "
            f"pre-deploy snapshot: {_restore_command()}, or deploy a fixed version")

    def _schema_changed(ctx: StepContext, before: int | None, what: str) -> None:
        if (moved := _schema_moved(before, what)) is not None:
            ctx.cannot_undo(moved.message, moved.fix)

    replaced_from = replaces or current  # what users are moved off
    # the one that really serves (Docker's tag in the slot Caddy runs) and records no
    # schema: the state step records the schema it served on for it (`from_schema`)
    served = _served_unrecorded(replaced_from, live_info if target.other == live
                                and not dialed_none else None,
                                found is not None and again is None)
    intent = intents.Intent(run_id=run_id, action="deploy", environment=env.name,
                            from_slot=str(live), to_slot=str(target),
                            from_version=replaced_from.version if replaced_from else None,
                            to_version=version, to_image=image,
                            **intents.recorded(state),
                            record={"deployment_id": deployment_id,
                                    **({"replaces_deployment_id": replaces.id}
                                       if replaces else {}),
                                    **({"from_id": served.id} if served else {}),
                                    "git_commit": _revision(image) or None,
                                    # its finish re-checks the new slot before stopping the
                                    # old one unless the gate was skipped (finish.py)
                                    "gated": not options.force,
                                    **({"snapshot_path": str(taken.path)} if taken else {})})
    schema_at_start: list[int | None] = []
    flagged: list[bool] = []  # a schema change already said (one message, not two)
    # the schema the new slot's /health must report: the database's after the migrations,
    # as the runbook reads it (a slot reading another database migrated and passed there)
    after_migrations = health.ExpectedSchema(
        lambda: observed.migration_version if observed.migration_version is not None
        else recording.schema(env), "its version after the migrations", database.where(env),
        unknown="the database's schema could not be read after the migrations")
    gate = slots.gate_step(env, target, force=options.force, expected_version=version,
                           observed=observed, record=intent.record, schema=after_migrations)
    if not env.migrate_command and gate.run is not None:
        # an app that migrates itself when it starts: a failed gate may follow a migration
        # (said with the gate's failure; the undo checks the schema on every other failure)
        checked_gate = gate.run

        def run_gate(ctx: StepContext) -> None:
            try:
                checked_gate(ctx)
            except BaseException:
                if schema_at_start:
                    _schema_changed(ctx, schema_at_start[0], "failed health gate")
                raise

        gate = dataclasses.replace(gate, run=run_gate)

    def run_state(ctx: StepContext) -> None:
        recording.deploy(env, intent, observed, run_id, ctx)

    # what the state step writes, as the recorder computes it (its commit is not shown),
    # with the schema the replaced deployment served on as read now (the run reads it again
    # before its migrations: its journal says what it recorded)
    planned_schema = (int(taken.migration_version) if taken is not None
                      and isinstance(taken.migration_version, int) else
                      read_now.version if read_now is not None and not read_now.dirty else None)
    foreseen = intent.with_(record={**intent.record, **(
        {"from_schema": planned_schema} if served and planned_schema is not None else {})})
    written = recording.deployed(state, states.make_deployment(
        version, recording.UNKNOWN_COMMIT, target, status="active",
        deployment_id=deployment_id), foreseen)
    recorded = recording.state_lines(written)
    recorded.update(recording.schema_line(state, written, foreseen))

    steps = [
        Step("preflight", "Pre-flight checks (read-only, done)", {
            "current": _serving_shown(current, replaces, live,
                                      live_info if target.other == live else None),
            "target slot": f"{target} ({config.container}, port {config.port})",
            "image": f"{image} (present)",
            "caddy": f"answering at {env.caddy.admin_url}",
            **tools,
            **({"restored data": accepted} if accepted else {}),
        }, phase=Phase.PREFLIGHT),
        *slots.leftover_steps(env, target, leftovers),
        # before the new slot starts: an app that migrates itself on start (no
        # migrate_command) changes the schema then, and the schema guard must name this file
        Step("snapshot", "Snapshot the database before the new version starts",
             {"folder": str(env.database.snapshot_dir),
              "command": _dump_shown(env),
              "deployment": deployment_id,
              **({"taken": f"{taken.path} (schema {taken.migration_version}), by the "
                           f"interrupted run {again.run_id if again else ''}"} if taken else {}),
              **({"not reused": f"{stale.path}, by the interrupted run "
                                f"{again.run_id if again else ''}: the schema is still "
                                f"{stale.migration_version} (nothing migrated since), so a new "
                                "snapshot holds the writes made since"} if stale else {})},
             run=None if taken else run_snapshot,
             skip="taken before the interrupted run of this deploy migrated: kept" if taken
             else None),
        Step("start-slot", f"Recreate the {target} container with {image}",
             {"command": recreate.display(),
              **({"build": slots.built_line(made, build)} if build is not None else {}),
              "Ctrl-C": slots.RECREATE_CTRL_C},
             run=run_recreate, **slots.recreate_holds(True)),
        Step("migrate", "Run the new version's migrations",
             {"command": shlex.join(["docker", "exec", config.container, *env.migrate_command]),
              "Ctrl-C": "acted on once the migrations have ended, so their outcome is known; "
                        "if they moved the schema and the serving slot then fails its health "
                        "check, the run carries on until traffic has moved, then stops (exit "
                        "6): undone, users would stay on that slot"},
             run=run_migrate, skip=None if env.migrate_command else "no migrate_command",
             hold_signals=True),
        gate,
    ]
    switch, diff = slots.switch_step(env, target, version, observed, planned=planned,
                                     validated=planned.new_text)
    steps += [
        switch,
        Step("state", "Record the deployment in the deployment state",
             {"file": str(env.state_file), **recorded}, run=run_state, phase=Phase.FINISH),
        slots.stop_step(env, live, env.stop_old_slot, gated=not options.force,
                        observed=observed, planned=live_info if target.other == live else None),
    ]
    # the same deploy rerun is that run again: its record is superseded, not put back (a
    # rerun that failed too put the dead run's record back, and the host kept "an
    # interrupted run is unfinished" for good), unless the dead run migrated (its snapshot
    # kept: `taken`): a rerun stopped before its first change then cleared the only record
    # of a migrated schema, and the next deploy took a "pre-deploy" snapshot at it
    old_record = (again if taken is not None else None) if again \
        else finish.replaced(found)
    if old_record is not None and not again:
        warnings.insert(0, finish.replacing_warning(env, old_record, "deploy"))
    if accepted:  # first: what on-call chose to override
        warnings.insert(0, accepted)
    if not taken and _holds_large_objects(env):
        warnings.append("the database holds large objects: the pre-deploy snapshot will be "
                        "one the runbook cannot restore (`rollback --restore-snapshot` refuses "
                        "it), so this deploy migrates without the runbook's way back; restore "
                        "by hand if needed, or move them into a bytea column first")
    summary = (f"deploy {version} to {env.display}'s {target} slot ("
               + ("Caddy dials neither slot when planned)" if dialed_none
                  else f"traffic on {live} when planned)"))
    return Plan("deploy", env, summary, steps, warnings, diff,
                facts={"version": version, "to": version, "to_slot": str(target),
                       "from_slot": str(live)},
                intent=intent,
                resume_command=f"runbook deploy {command_arg(env)} --version {version}",
                replaces=old_record, accepted_doubt=accepted)


def _recorded_since(state: states.DeploymentState, intent: intents.Intent) -> bool:
    """Whether another tool recorded a deployment after the interrupted run started (its
    deploy, then a rollback back onto the same slots, included): that run's snapshot is then
    from before another deployment, not from before this one. By the ids the file held
    when that run was planned, not by clocks (intents.recorded_after)."""
    return any(intents.recorded_after(intent, d, unknown=True) for d in state.deployments())


def _serving_record(state: states.DeploymentState, serving: docker.ContainerInfo,
                    warnings: list[str]) -> states.Deployment | None:
    """The recorded deployment that serves when the file's current is another (found by
    review: the old tooling swaps current and previous in the file without switching, and
    the deploy recorded the file's current as the previous deployment, so the next rollback
    went to a release that never served). None when the file agrees, or when what serves
    cannot be named (a tag that is not a version, a release the history does not know):
    then the file's current stays the previous deployment, and a warning says so."""
    current = state.current
    tag = serving.tag if serving.running and serving.tag else None
    if current is None or tag is None or not states.is_version(tag) or tag == current.version:
        return None
    found = state.find_version(tag)
    if found is None:
        warnings.append(f"the state file names {current.version} as the current deployment, "
                        f"but {tag} serves, which its history does not know: {current.version} "
                        "will be recorded as the previous deployment")
        return None
    warnings.append(f"the state file names {current.version} as the current deployment, but "
                    f"{tag} serves: {tag} is recorded as the previous deployment")
    return found


def _served_unrecorded(replaced: states.Deployment | None,
                       serving: docker.ContainerInfo | None,
                       after_another: bool) -> states.Deployment | None:
    """The deployment users are moved off, when its record names no schema (the Go CLI and
    the deploy script record none: a rollback back to it went unchecked, "restore the
    snapshot", throwing writes away; found by review) and it really serves: its version is
    what runs in the slot Caddy serves (`serving`, Docker's tag), as `_serving_record`
    judges. None after another run's interrupted record (`after_another`: it may have
    changed the database under it, a migration or a restore), or when nothing tells."""
    if replaced is None or replaced.migration_version is not None or serving is None \
            or after_another:
        return None
    return replaced if serving.running and serving.tag == replaced.version else None


def _serving_shown(current: states.Deployment | None, replaces: states.Deployment | None,
                   live: Slot, serving: docker.ContainerInfo | None) -> str:
    """The pre-flight's "current": what serves (Docker's tag), and what the file says when
    that differs (found by review: it showed the file's current while another version ran)."""
    if current is None:
        return "none recorded"
    tag = serving.tag if serving is not None and serving.running and serving.tag else None
    if replaces is not None:
        return (f"{replaces.version} on {live} ({replaces.id}); the state file says "
                f"{current.version}")
    if tag is not None and states.is_version(tag) and tag != current.version:
        return (f"{tag} on {live} (not in the deployment history); the state file says "
                f"{current.version}")
    return f"{current.version} on {live}"


def _refuse_if_dirty(env: Environment, version: str,
                     pending: intents.Intent | None) -> database.SchemaVersion | None:
    """Refuse (nothing changed) on a schema golang-migrate left dirty (finish.dirty_refusal).
    Found by review: a rerun after a migration failed half-way recreated the new slot and ran
    the migrations again on the dirty schema (a half-applied file re-applied, or
    golang-migrate refusing): exit 5, no repair named. An unreadable schema is left to the
    snapshot step, which fails closed on it. Returns the read (the plan shows it), or None."""
    try:
        schema = database.schema_version(env)
    except RunbookError:
        return None
    refused = finish.dirty_refusal(env, schema, pending, "run the deploy again",
                                   f"`runbook deploy {command_arg(env)} --version {version}` "
                                   "runs the deploy again")
    if refused is not None:
        raise refused
    return schema


def _still_migrating(env: Environment, slot: Slot) -> str | None:
    """Why the new container must not be stopped now: migrations run in it (a migrate exec)
    or the schema is `dirty` while a session holds golang-migrate's advisory lock (an app
    that migrates itself at start-up does so in its main process). None when neither is
    seen, or the schema cannot be read (then nothing migrates through it either)."""
    info = docker.inspect(env.slot(slot).container)
    if not info.running:
        return None
    if (execs := slots.migrate_exec(env, info)) is not None:
        return f"migrations still run inside it (`{shlex.join(execs[1])}`)"
    try:
        schema = database.schema_version(env)
    except RunbookError:
        return None
    if not schema.dirty:
        return None
    try:  # dirty, and a migration's lock held: under way (dirty alone: failed or cut off)
        running = database.migration_lock(env)
    except RunbookError:  # cannot tell: the container is not cut off on a guess
        running = "pg_locks cannot be read"
    if running:
        return (f"a migration is under way (the database schema is dirty at version "
                f"{schema.version} and a migration lock is held: {running})")
    return None


def _holds_large_objects(env: Environment) -> bool:
    """Whether the pre-deploy snapshot will hold large objects, which the restore refuses:
    said in the plan, before the migration it is taken for. A database that cannot be read
    now fails the snapshot step itself, before any change."""
    from runbook import snapshots

    try:
        return snapshots.holds_large_objects(env)
    except RunbookError:
        return False


def _revision(image: str) -> str:
    """The image's git commit label, when the build recorded a full (40-hex) one."""
    try:
        labels = docker.image_labels(image) or {}
    except Exception:
        return ""
    revision = str(labels.get(docker.REVISION_LABEL, "")).strip().lower()
    return revision if re.fullmatch(r"[0-9a-f]{40}", revision) else ""


def deploy(env: Environment, options: Options, *, dry_run: bool = False, confirm: Any = None,
           progress: Any = None, notify: Any = None) -> RunResult:
    return perform(env, "deploy", lambda run_id: plan(env, options, run_id), dry_run=dry_run,
                   reason=options.reason, confirm=confirm, progress=progress, notify=notify)


def _dump_shown(env: Environment) -> str:
    """The pre-deploy snapshot's pg_dump as it will run (runbook/snapshots/commands.py)."""
    from runbook.snapshots import commands

    if not database.configured(env):
        return "none"
    try:
        tgt = commands.target(env)
    except RunbookError as exc:
        return f"pg_dump in {env.database.container} (cannot be built yet: {exc.message})"
    return commands.dump(tgt, "<exported snapshot>",
                         into=f"{env.database.snapshot_dir}/<new>.sql.gz").describe()
