"""Rollback: put the previous (or a named) deployment back in front of users, safely.

lock -> an interrupted run? finish it -> load state -> pick target -> pre-flight (what Caddy
runs, image, container, schema) -> prepare: make the standby slot run the target, health gate
-> commit: switch Caddy and verify -> finish: record the state, stop the old slot -> release
the lock. The transaction (runbook/plan.py) guarantees that a failure before the commit
leaves traffic where it was and that nothing after it is undone.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from runbook import caddy, compose, database, docker, finish, health, recording, slots, traffic
from runbook import intent as intents
from runbook import preflight as tool_checks
from runbook import state as states
from runbook.environment import Environment, Slot, command_arg
from runbook.errors import ConfigError, PreconditionError, RunbookError, UsageError
from runbook.plan import Phase, Plan, Step, StepContext, step_number
from runbook.redact import one_line
from runbook.restore_records import refuse_doubted, restoring_command
from runbook.run import RunResult, perform, plan_only
from runbook.times import rough_duration

if TYPE_CHECKING:  # imported where needed: most rollbacks never touch a snapshot
    from runbook import snapshots


@dataclass(frozen=True)
class Options:
    to: str | None = None  # a version, commit prefix or deployment id from the history
    force: bool = False  # skip the health gate and the schema guard (never a live lock)
    reason: str = "rollback"
    # restore a snapshot first: "auto" = the one the schema guard names, else a name or path
    restore_snapshot: str | None = None
    # refuse unless this is the current deployment (the fleet's pre-flight saw it: a host
    # rolled back since, by hand or by another run, is never rolled again, i.e. forward)
    expect_from: str | None = None
    # with restore_snapshot: end other sessions on the database instead of refusing
    end_sessions: bool = False
    # with restore_snapshot: HOST:PORT, where the snapshot was taken (its sidecar says so),
    # is this database before it moved (verify(); default: refused as another server's)
    moved_from: str | None = None
    # the fleet's maintenance pre-flight (host-check --restore-snapshot): `runbook fleet
    # rollback` restores the pick, it has no --snapshot or --moved-from: a refusal names none
    fleet: bool = False
    # a dry run only (the fleet's maintenance pre-flight of a host whose shared database the
    # fleet restores first): the schema guard's refusal is kept in the plan's facts
    # ("schema_refusal") and every other check still runs, so a host broken otherwise is
    # refused before any host is drained
    schema_restored_first: bool = False


FLEET_PICKS = ("`runbook fleet rollback --maintenance` restores only the snapshot it picks, "
               "the newest taken at the target's schema where the database is now (it has no "
               "--snapshot): see `runbook snapshot list` on this host")


def no_previous_fix(env: Environment) -> str:
    return ("first deployment or cleared state: redeploy the target version with "
            + compose.deploy_hint(env, "<known-good version>"))


@dataclass
class Guard:
    """What the schema guard found: the values to show, warnings, and a snapshot to restore."""

    details: dict[str, str]
    warnings: list[str]
    restore: snapshots.Snapshot | None = None
    refused: SchemaRefusal | None = None  # kept, not raised (Options.schema_restored_first)
    # the schema the target serves on, checked ("compatible", or the snapshot restored for
    # it): recorded with the rollback when the target's record names none
    schema: int | None = None
    # the database's schema_migrations version as the guard read it (None: not read): what
    # the target's /health must report at its gate, unless a restore replaces it
    read: int | None = None
    dirty: bool = False  # that read found a migration half applied


class SchemaRefusal(PreconditionError):
    """The schema guard's refusal: the database schema is newer than (or dirty for) what the
    target ran with. A snapshot restore resolves it, and nothing else does."""


def _guarded(probe: tool_checks.Probe[Guard], options: Options) -> Guard:
    """The schema guard's result; its refusal kept instead of raised when the fleet restores
    the database first (the checks after it must still run on this host)."""
    try:
        return probe.result()
    except SchemaRefusal as exc:
        if not options.schema_restored_first:
            raise
        return Guard({"schema guard": f"refused ({exc.message}): the fleet restores the "
                      "snapshot first"}, [], refused=exc)


def schema_guard(env: Environment, current: states.Deployment, target: states.Deployment,
                 options: Options) -> Guard:
    """Refuse to put old code on a newer schema unless a snapshot is restored first (or forced).

    The refusal names the snapshot to restore and what restoring it would lose. It fails
    closed: an unreadable schema stops the rollback (exit 4) unless --force, and then the plan's
    warnings say what was skipped. A target recorded without a migration version (older tooling)
    gets one from the snapshot sidecars or the app's own migrations check, or the plan says
    neither exists.
    """
    from runbook import migration_source

    guard = Guard({}, [])
    try:
        schema = database.schema_version(env)
    except RunbookError as exc:
        if options.restore_snapshot or (isinstance(exc, ConfigError) and not isinstance(
                exc, database.UnknownParameterError)):
            raise  # a misencoded DATABASE_URL is bad input (exit 2), even with --force
        reason = exc.message
        down, start = _database_stopped(env)
        if not options.force and start is not None:
            # both slots read that database: a rollback (forced or not) only moves users
            # from one release that cannot reach it to another (found by the on-call
            # walkthrough review: --force did, and marked the release rolled back)
            raise PreconditionError(
                f"schema guard: the database schema cannot be read ({reason}): {down}, and "
                "both slots use that database, so no rollback can help while it is down; "
                "nothing was changed",
                f"`{start}`, then `runbook status {command_arg(env)}`: roll back only if the "
                "release serving is still unhealthy once the database runs") from None
        if not options.force:
            raise PreconditionError(
                f"schema guard: the database schema cannot be read ({reason}), so nothing "
                f"tells whether {target.version} can run on it; nothing was changed",
                (f"{exc.fix}; " if exc.fix else "") + "then run the rollback again, or pass "
                "--force to roll back the code without the schema check (--force cannot help "
                "if the database is down for both slots: it only skips this check)") from None
        guard.warnings.append(f"schema guard skipped (--force): the database schema cannot "
                              f"be read ({reason}); {target.version} may not run on it"
                              + (f"; {down}: both slots use it, `{start}`" if start else ""))
        guard.details["database schema"] = f"unknown: {reason}"
        guard.details["schema guard"] = "skipped (--force): the schema could not be read"
        return guard
    guard.read, guard.dirty = schema.version, schema.dirty
    found = migration_source.infer(env, current, target)
    recorded = found.version
    guard.details["database schema"] = schema.describe()
    guard.details["target ran with"] = (f"not known: {found.source}" if recorded is None
                                        else f"{recorded} (from {found.source})")
    problem = found.problem  # the target build itself rejects the schema
    if problem is None and schema.dirty:
        problem = f"the database schema is dirty at version {schema.version}"
    elif problem is None and recorded is not None and schema.version > recorded:
        problem = (f"migrations ran after the target deployment: the database schema is at "
                   f"{schema.version} but {target.version} ran with {recorded}")
    if options.restore_snapshot or (problem and not options.force):
        from runbook import snapshots  # only when one is named or needed (~20 ms to import)
    if options.restore_snapshot:
        # the pre-deploy snapshot of the deployment that replaced the target (the current one
        # unless --to goes further back) was dumped at the target's schema
        after = migration_source.successor(env, target, current)
        snap = (snapshots.latest_before(env, recorded, deployment_id=after.id,
                                        snapshot_path=after.snapshot_path,
                                        command=None if options.fleet
                                        else restoring(env, options, None))
                if options.restore_snapshot == "auto"
                else snapshots.find(env, options.restore_snapshot))
        if snap is None and recorded is None:
            raise PreconditionError(
                f"the schema {target.version} ran with is unknown and the pre-deploy snapshot "
                f"of {after.version} ({after.id}) is not in {env.database.snapshot_dir}, so no "
                "snapshot can be chosen safely; nothing was changed",
                (FLEET_PICKS if options.fleet else
                 f"pick the one taken at {target.version}'s schema from `runbook snapshot "
                 f"list {command_arg(env)}` and pass it with --snapshot FILE")
                + _before_a_move(env, options, recorded, after))
        if snap is None:
            raise PreconditionError(f"no usable snapshot at schema {recorded} was found in "
                                    f"{env.database.snapshot_dir}",
                                    (FLEET_PICKS if options.fleet else
                                     "list them with `runbook snapshot list "
                                     f"{command_arg(env)}` and pass one with --snapshot FILE")
                                    + _before_a_move(env, options, recorded, after))
        snap_schema = snap.migration_version
        if recorded is not None and snap_schema is None:
            # a sidecar the shell tooling wrote names no version: the dump itself does
            from runbook.snapshots.verify import verify

            snap_schema = verify(env, snap, moved_from=options.moved_from,
                                 command=restoring(env, options, snap)).migration_version
        if recorded is not None and snap_schema != recorded:
            raise PreconditionError(f"snapshot {snap.name} is at schema {snap_schema}, but "
                                    f"{target.version} ran with {recorded}",
                                    "pick a snapshot taken at the target's schema")
        window = snapshots.loss_window(env, snap)
        guard.restore = snap
        guard.details["restore"] = snap.name
        guard.details["data-loss window"] = window.describe()
        guard.details["schema guard"] = "restoring the snapshot first"
        guard.schema = recorded  # None: no schema was checked, so none is recorded
        return guard
    if recorded is None and not problem:
        # not "the health gate will refuse a build that rejects the schema": the real app's
        # migrations check reports the database's version and passes (found by review)
        guard.warnings.append(
            f"schema guard NOT checked: the migration version {target.version} ran with is "
            f"unknown ({found.source}). If migrations ran since {target.version} was live, "
            f"it will run on a schema it does not know, and its health check may not notice: "
            f"answer no, and restore the snapshot taken before them with "
            f"`{restoring(env, options, None)}` (`runbook snapshot list {command_arg(env)}`)")
        guard.details["schema guard"] = "not checked (version not known)"
        return guard
    if not problem and recorded is not None and schema.version < recorded:
        # behind the target: no snapshot helps (a restore took its migrations away, e.g. a
        # `--restore-snapshot` rollback undone by `--to`); its /health says "degraded"
        # (pending migrations), which the gate passes, and its pages fail on missing tables
        behind = (f"the database schema is at {schema.version} but {target.version} ran with "
                  f"{recorded}: it would run without the migrations it needs")
        if not options.force:
            raise PreconditionError(
                f"schema guard: {behind}; nothing was changed",
                f"redeploy it with its migrations: {compose.deploy_hint(env, target.version)}; "
                "or pass --force to roll back the code anyway")
        guard.warnings.append(f"schema guard skipped (--force): {behind}; rolling back the "
                              "code anyway")
        guard.details["schema guard"] = "skipped (--force)"
        return guard
    if problem and not options.force:
        # as --restore-snapshot picks (above): from the deployment that replaced the target,
        # not the current one when --to goes further back (found by review: with the
        # current's pre-deploy snapshot the tooling's, naming no schema, the refusal named it
        # and the command it printed was refused for its schema)
        after = migration_source.successor(env, target, current)
        try:
            snap = (snapshots.latest_before(env, recorded, deployment_id=after.id,
                                            snapshot_path=after.snapshot_path)
                    if recorded is not None else None)
        except snapshots.FutureSnapshotError as exc:  # the refusal stays the schema's
            raise SchemaRefusal(problem, (
                f"the snapshot `--restore-snapshot` would pick, {exc.snapshot.name}, is dated "
                f"{rough_duration(exc.ahead)} in the future: the clock was likely set back "
                "since it was taken, so which snapshot is the newest cannot be told; name the "
                f"one to restore and roll back in one go with `{restoring(env, options, None)}` "
                f"(`runbook snapshot list {command_arg(env)}`), or pass --force to roll back "
                "the code anyway")) from None
        except snapshots.UnreadSidecarError as exc:  # the refusal stays the schema's too
            raise SchemaRefusal(problem, (
                f"which snapshot `--restore-snapshot` would pick cannot be told: the sidecar "
                f"of {exc.snapshot.name} cannot be read ({exc.snapshot.unread}); run as its "
                f"owner or root, or name the one to restore and roll back in one go with "
                f"`{restoring(env, options, None)}`, or pass --force to roll back the code "
                "anyway")) from None
        if snap is None:
            at = f"at schema {recorded}" if recorded is not None else "at the target's schema"
            moved = (_before_a_move(env, options, recorded, after)
                     if recorded is not None else "")
            fix = (f"no snapshot {at} exists in {env.database.snapshot_dir}: "
                   "roll the migrations back by hand, or pass --force to roll back the code "
                   "anyway" if not moved else
                   f"no snapshot {at} taken where the database is now exists in "
                   f"{env.database.snapshot_dir}{moved}; otherwise roll the migrations back "
                   "by hand, or pass --force to roll back the code anyway")
        else:
            window = snapshots.loss_window(env, snap)
            # the snapshot named too: the one checked here is the one on-call restores,
            # whatever the folder holds by the time the command is typed
            fix = (f"restore snapshot {snap.name} and roll back in one go with "
                   f"`{restoring(env, options, snap)}` "
                   f"({window.describe()}), or pass --force to roll back the code anyway")
        raise SchemaRefusal(problem, fix)
    if problem:
        guard.warnings.append(f"schema guard skipped (--force): {problem}; rolling back the "
                              "code anyway")
        guard.details["schema guard"] = "skipped (--force)"
    else:
        guard.details["schema guard"] = "compatible"
        guard.schema = schema.version
    return guard


def served_schema(found: tuple[intents.Intent, str] | None, served: states.Deployment | None,
                  guard: Guard, serving: docker.ContainerInfo) -> int | None:
    """The schema the deployment rolled back from served on, recorded for it when its record
    names none (the Go CLI and the deploy script record none: a rollback back to it went
    unchecked, "restore the snapshot", throwing writes away; found by review). Only the
    guard's own read, taken while it served and before this run changed anything (a restore
    comes after it), of a clean schema, with its container running. After an interrupted run,
    which may have changed the database (its restore), only that run's own value is carried."""
    if served is None or served.migration_version is not None:
        return None
    if found is not None:
        was = found[0]
        carried = was.record.get("from_schema")
        return (carried if was.action == "rollback" and was.record.get("from_id") == served.id
                and isinstance(carried, int) and not isinstance(carried, bool) else None)
    if guard.read is None or guard.dirty or not serving.running:
        return None
    return guard.read


def _database_stopped(env: Environment) -> tuple[str | None, str | None]:
    """(what database.container_down says, the command that runs it again) of the database
    container the environment names; (None, None) when it runs, is absent (a database
    outside Docker) or Docker does not answer: the schema is unreadable for another reason."""
    try:
        info = docker.inspect(env.database.container)
    except RunbookError:
        return None, None
    return database.container_down(info), database.container_start(info)


def restoring(env: Environment, options: Options, snap: snapshots.Snapshot | None) -> str:
    """This rollback restoring `snap` (None: `FILE`, for on-call to choose), as on-call would
    type it: every fix that names a restoring rollback. Its --to above all: without it the
    command went to the previous deployment and restored another snapshot (found by the
    on-call walkthrough review: an outage and a lost row)."""
    from runbook.snapshots.store import snapshot_arg

    return " ".join(["runbook rollback", command_arg(env),
                     *(["--to", shlex.quote(options.to)] if options.to else []),
                     *(["--force"] if options.force else []),
                     "--restore-snapshot", "--snapshot",
                     snapshot_arg(env, snap) if snap is not None else "FILE",
                     *(["--end-sessions"] if options.end_sessions else [])])


def _before_a_move(env: Environment, options: Options, version: int | None,
                   after: states.Deployment) -> str:
    """`; SNAPSHOT was taken from HOST:PORT: if ...` naming this rollback restoring it with
    --moved-from, when none of ours fits but one refused only for its server would (the
    database moved since); else "". `after`: the deployment whose pre-deploy snapshot it is."""
    from runbook import snapshots

    found = snapshots.before_a_move(env, version, deployment_id=after.id,
                                    snapshot_path=after.snapshot_path)
    if found is None:
        return ""
    snap, taken = found
    if options.fleet:  # left out: the fleet's restore takes no --moved-from
        return (f"; {snap.name} was taken from {taken} (its sidecar), maybe this database "
                "before it moved: the fleet cannot restore it (`runbook fleet rollback` has "
                "no --moved-from)")
    return (f"; {snap.name} was taken from {taken} (its sidecar): if that was this database "
            f"before it moved, restore it and roll back in one go with "
            f"`{restoring(env, options, snap)} --moved-from {shlex.quote(taken)}`")


def _names(env: Environment, ref: str, version: str) -> bool:
    """Whether `--to REF` (a version, commit prefix or deployment id) names `version`."""
    if ref[:7] == version:
        return True
    try:
        found = states.read_state(env.state_file, environment=env.name).find_version(ref)
    except RunbookError:
        return False
    return found is not None and found.version == version


def down_after_interrupted(env: Environment, dead: intents.Intent, live: Slot,
                           refused: RunbookError) -> PreconditionError:
    """A rerun refused while the interrupted run left the serving slot stopped (a restore's
    maintenance stop, killed before its COMMIT): the refusal alone (the schema guard's
    "or pass --force") hid that users get errors, and --force would put old code on the
    newer schema (found by review)."""
    container = env.slot(live).container
    again = restoring_command(env, dead)
    fix = (f"finish the interrupted run as it was started: `{again}`; or serve again at once "
           f"with the code that ran: `docker start {container}`" if again else
           f"serve again at once with the code that ran: `docker start {container}`; then "
           f"{refused.fix or 'see `runbook status`'}")
    return PreconditionError(
        f"an interrupted run ({dead.describe()}) left the serving slot {live} ({container}) "
        f"STOPPED: users get errors now; this run was refused: {refused.message}", fix)


def _serving_is_current(env: Environment, state: states.DeploymentState,
                        current: states.Deployment, target: states.Deployment, live: Slot,
                        serving: docker.ContainerInfo, *, named: bool,
                        done: Callable[[PreconditionError], PreconditionError]) -> None:
    """What serves decides what is rolled back from, not the state file: the old tooling's
    rollback swaps current and previous there without switching Caddy, and this run then
    rebuilt the version serving as the "previous" one and said "rolled back". A serving
    container whose tag names no version (`:latest`) cannot be compared: the file is used.
    What is rolled back from is `serving_deployment`'s, as deploy's `_serving_record` reads
    it (found by review: `--to` took it from the file, and its plan, its record and its
    messages named a version that did not run). Its "already serves" goes through `done`
    (finish.done_already: a rerun typed `--to` the version a killed rollback left serving
    says that run completed)."""
    runs = _runs(serving)
    if runs is not None and runs != current.version and not named:
        known = ", ".join(dict.fromkeys(d.version for d in state.deployments()))
        raise PreconditionError(
            f"the state file says the current deployment is {current.version}, but the "
            f"{live} slot, which serves (as Caddy runs it), runs {runs}: the file is out of "
            "date (a rollback that rewrote it without switching?), so what to roll back to "
            "is not known; nothing was changed",
            f"check `runbook status {command_arg(env)}`, then name the version to go to: `runbook "
            f"rollback {command_arg(env)} --to <version>` (known: {known})")
    if (runs is not None and target.version == runs) or (
            runs is None and (target.id == current.id or target.version == current.version)):
        raise done(PreconditionError(f"{target.version} already serves, from the {live} slot "
                                     "(as Caddy runs it); nothing was changed",
                                     "nothing to roll back to; pass --to <another version>"))


def _runs(serving: docker.ContainerInfo) -> str | None:
    """The version the serving container's tag names (None: `:latest` names none)."""
    return serving.tag if serving.tag and states.is_version(serving.tag) else None


def serving_deployment(state: states.DeploymentState, current: states.Deployment,
                       serving: docker.ContainerInfo) -> tuple[str, states.Deployment | None]:
    """The version that serves and its record (None: the history does not know it); the
    file's current when the serving tag names no version. What every check that asks "what
    is this host on" judges by: the file's current is what the old tooling swapped."""
    runs = _runs(serving)
    if runs is None or runs == current.version:
        return current.version, current
    return runs, state.find_version(runs)


def _expected(options: Options, current: states.Deployment,
              from_version: str, served: states.Deployment | None) -> None:
    """`--expect-from` (the fleet's pre-flight saw it) against what serves: a host rolled
    back since is never rolled again, and one whose file was swapped without a switch is not
    taken for rolled back (found by review: it compared the file's current)."""
    wanted = options.expect_from
    if not wanted or (served.matches(wanted) if served is not None
                      else wanted.strip().lower() == from_version):
        return
    says = ("" if from_version == current.version else
            f" (as Caddy runs it; the state file says {current.version})")
    raise PreconditionError(f"the current deployment is {from_version}{says}, not {wanted} as "
                            "expected (it changed since it was checked); nothing was changed",
                            "read `runbook status` here; a fleet run: run it again, its "
                            "pre-flight reads every host anew")


def readable_after(state: states.DeploymentState, target: states.Deployment, *,
                   served: states.Deployment | None = None, slot: Slot | None = None) -> None:
    """Refuse (exit 4, before any change) a rollback whose own write of the state file would
    leave it refused by the next read: an entry another tool wrote badly is passed by only
    when it is provably older than the target, and the proof may be the target's own
    history entry, which the rollback's write removes (it becomes current). Found by
    review: the file the rollback had just written was refused by `runbook status` and
    every later run, and the release of the lock could no longer clear its copy there."""
    if served is not None and served.id == target.id:
        served = None  # as recording.py's write: the file's current is the target
    try:
        after = states.after_rollback(state, target, slot=slot, served=served)
        written = states.dumps(after)
    except RunbookError:
        return  # not simulated here (found by review: a refusal of the simulation itself
        # blocked legitimate rollbacks); the write judges its own inputs, as before
    try:
        states.parse_state(written, state.source or "deployment-state.json")
    except RunbookError as exc:
        where = state.source or "the state file"
        raise PreconditionError(
            f"{where}: after this rollback the file would not be readable ({exc.message}): "
            "an entry another tool wrote badly is passed by only while the target's own "
            "entry shows it older; nothing was changed",
            f"{exc.fix + ', ' if exc.fix else ''}then run the rollback again") from None


def named_target(env: Environment, state: states.DeploymentState,
                 ref: str) -> states.Deployment:
    """The deployment `--to REF` names; one the history does not hold is a typo, bad input
    (exit 2), never a precondition met under the lock (found by review)."""
    target = state.find_version(ref)
    if target is None:
        known = ", ".join(dict.fromkeys(d.version for d in state.deployments())) or "none"
        # a history entry another tool wrote badly may be the one meant: said beside the
        # typo's words, never taken for it (found by review: its refusal alone hid the typo)
        # every such entry: the one meant may be any of them (found by review: only the
        # first was named)
        bad = list(state.unread)
        said = "; ".join(b.problem for b in bad[:3]) + (
            f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        those, which, one = (("that entry", "it", "that entry") if len(bad) == 1
                             else ("those entries", "one", "one"))
        fixes = "; ".join(dict.fromkeys(b.fix for b in bad[:3]))
        raise UsageError(f"--to {one_line(ref)} is not in the deployment history (known: "
                         f"{known}"
                         + (f"; and {said}: another tool wrote {those} badly, {which} may be "
                            "the one meant" if bad else "")
                         + "); nothing was changed",
                         f"pass one of them (`runbook status {command_arg(env)}` shows them), "
                         "a commit prefix or a deployment id"
                         + (f"; to roll back to {one}, "
                            f"mend it first ({fixes})" if bad else ""))
    return target


def check_target(env: Environment, ref: str) -> None:
    """`--to` checked against the history read without the lock (as a dry run reads it),
    before the lock, the journal or the run record are written: a typo left a journal and a
    run record behind, exit 4 (found by review). A state file that cannot be read, or an
    interrupted run's record (its own target is judged by the plan), is left to the plan,
    which says what it finds."""
    if os.path.lexists(intents.path(env)):
        return
    try:
        state = states.read_state(env.state_file, environment=env.name)
    except RunbookError:
        return
    named_target(env, state, ref)


def _other_target(env: Environment, found: tuple[intents.Intent, str] | None,
                  options: Options, serving: str,
                  target: states.Deployment) -> PreconditionError | None:
    """An interrupted `rollback --to X` typed again without --to went to the previous
    deployment instead, the version on-call had chosen to skip (found by review). Judged by
    what serves (`serving`), as the interrupted run recorded it: the file's current is what
    the old tooling's rollback swaps without switching."""
    if (found is None or found[0].action != "rollback" or options.to
            or found[0].from_version != serving or found[0].to_version == target.version):
        return None
    again = restoring_command(env, found[0]) or finish.resume_command(env, found[0])
    other = (f"`runbook rollback {command_arg(env)} --to {target.version}`"
             if target.version != serving else
             # the file's previous is what serves (a swapped file): no rollback goes there
             f"another version with `runbook rollback {command_arg(env)} --to <version>`")
    return PreconditionError(
        f"an interrupted rollback was going to {found[0].to_version}, and this one would go "
        f"to {target.version}" + (" (which serves already: the state file is out of date)"
                                  if target.version == serving else "")
        + "; nothing was changed",
        f"name the one you want: `{again}` (the interrupted one) or {other}")


def _past_a_failed_gate(env: Environment, state: states.DeploymentState,
                        target: states.Deployment, serving: str, guard: Guard) -> str:
    """What a rollback whose target fails its health gate offers next (traffic stays), as
    features/troubleshooting.feature does: the newest deployment older than the target,
    named with --to, when the history has one, and a known-good version deployed. Found by
    the on-call walkthrough review: the failure said only `docker logs`. That --to is offered
    only where the schema guard lets it run (`_guard_lets`, from what it read for this run):
    found by review, it offered one the runbook then refused (exit 4, schema); one it cannot
    tell is said so, with the dry run that tells."""
    deploy = f"deploy a known-good version: {compose.deploy_hint(env, '<known-good version>')}"
    older = [d for d in state.deployments() if d.deployed_at < target.deployed_at
             and d.version not in (target.version, serving)]
    if not older:
        return f"or {deploy}"
    back = max(older, key=lambda d: d.deployed_at)
    command = f"runbook rollback {command_arg(env)} --to {back.version}"
    lets, why = _guard_lets(back, guard)
    if lets:
        return f"or roll back further, to {back.version}: `{command}`; or {deploy}"
    if lets is False:
        return (f"or {deploy} (rolling back further, to {back.version}, is refused by the "
                f"schema guard: {why})")
    return (f"or {deploy}; whether the schema guard lets a rollback further, to "
            f"{back.version}, run cannot be told here ({why}): `{command} --dry-run` says")


def _guard_lets(dep: states.Deployment, guard: Guard) -> tuple[bool | None, str]:
    """Would the schema guard let a rollback to `dep` run now? Judged from what it read for
    this run (the database's schema) and the schema `dep`'s record names, as the guard
    judges a recorded one: True, False, or None when that cannot be told without its own
    read (no schema recorded: sidecars or the app would say; the database not read; a
    restore replacing it first); and why, said with False or None."""
    if guard.restore is not None:
        return None, "this run restores the database first"
    if guard.read is None:
        return None, "the database's schema was not read"
    if guard.dirty:
        return False, f"the database schema is dirty at version {guard.read}"
    if dep.migration_version is None:
        return None, f"{dep.version}'s record names no schema"
    if dep.migration_version != guard.read:
        return False, (f"{dep.version} ran with schema {dep.migration_version}, the database "
                       f"is at {guard.read}")
    return True, ""


def _refuse_another_build(env: Environment, state: states.DeploymentState,
                          target: states.Deployment, prep: slots.Preparation,
                          serving: docker.ContainerInfo, live: Slot, from_version: str,
                          guard: Guard) -> list[str]:
    """Refuse, before anything changes (exit 4), a target slot that would run (a start, a
    recreate, or kept running) a build whose `org.opencontainers.image.revision` label names
    another commit than the state file records for the target (slots.labelled_another, which
    the switch asks too), or the very build that serves. Found by review (a docker-run host,
    its standby recreated by hand from a tag moved to another build): the plan said "start
    the exited container", "schema guard compatible", and the gate failed 30 s later; with
    the serving tag retagged and its container recreated from it, the plan rolled back onto
    the build users already ran. No label (or `unknown`), or one the serving build shares
    (slots.label_shared: the plan's warning returned): as before, the gate compares what the
    slot answers."""
    build, name = slots.build_to_run(prep)
    if build is None:
        return []
    if serving.exists and serving.image_id == build:
        container = (f"slot {prep.slot}'s {prep.container.status} container "
                     f"{prep.container.name} (made from {name})"
                     if prep.action != "recreate" else f"{name}, which the recreate of "
                     f"{prep.slot} would run,")
        runs = serving.image or "an image it does not name"
        raise PreconditionError(
            f"the target would run the same build that serves: {container} holds build "
            f"{docker.short_id(build)}, the one {live}'s container {serving.name} runs as "
            f"{from_version} ({runs}); rolling back to {target.version} would change nothing "
            "users run; nothing was changed",
            f"users already run that build (`runbook status {command_arg(env)}` compares it "
            f"with the record: {runs} retagged or rebuilt, and {serving.name} made again from "
            f"it); to serve {from_version}'s recorded build again, put it back under {runs} "
            f"and deploy it ({compose.deploy_hint(env, from_version)}); to go further back, "
            "name another version with --to")
    found = slots.labelled_another(env, prep, target, serving, state)
    if found is None:
        return []
    if isinstance(found, str):
        return [found]
    said, cut = found.said, found.cut
    holds = [d for d in state.deployments() if health.commits_differ(d.git_commit, said) is False]
    meant = max(holds, key=lambda d: d.deployed_at) if holds else None
    if meant is None:
        other = f" (no deployment in the history records commit {said[:cut]})"
    elif meant.version == from_version:
        other = f" (commit {said[:cut]} is {from_version}'s, the build rolled back from)"
    else:
        lets, why = _guard_lets(meant, guard)
        command = f"runbook rollback {command_arg(env)} --to {meant.version}"
        other = (f"; or, if {meant.version}'s build (the one {name} holds) is meant: "
                 f"`{command}`" if lets else
                 f" ({name} holds {meant.version}'s build, and a rollback to {meant.version} "
                 f"is refused by the schema guard: {why})" if lets is False else
                 f"; or, if {meant.version}'s build (the one {name} holds) is meant, `{command}"
                 f" --dry-run` says whether the schema guard lets it run ({why})")
    raise PreconditionError(found.holds(target, "rollback"),
                            slots.put_back(env, prep, name, target, "rollback") + other)


def _expected_commit(target: states.Deployment, prep: slots.Preparation,
                     restored: bool) -> health.ExpectedCommit:
    """The commit the target's gate compares (the state file's record of it), and the fix
    when the slot runs another (the gate's way out adds the other versions). `restored`: the
    run restores the database before the gate, so its refusal never says nothing took
    effect."""
    return slots.expected_commit(target, prep, f"the deployment it rolls back to ({target.id})",
                                 "rollback", "traffic did not move" if restored
                                 else "nothing took effect")


def resume_command(env: Environment, version: str) -> str:
    """What reruns this rollback: its target named (the previous deployment or a --to one)."""
    return f"runbook rollback {command_arg(env)} --to {version}"


def plan(env: Environment, options: Options, run_id: str, *, tools: bool = True) -> Plan:
    """The rollback's plan; `tools` False (`status_plan` only) starts none of the tool
    checks (Caddy's validation and adapt, which write temp files beside the Caddyfile; the
    reload and compose commands) nor the standby's early health probe."""
    found = finish.interrupted(env)
    if found is not None and found[1] == "finish":
        done = found[0]
        wanted = (options.to or "").strip().lower()
        if done.action == "rollback" and (not wanted or _names(env, wanted, done.to_version)):
            return finish.plan_for(env, done, run_id)
        raise finish.not_what_it_did(env, done, "a rollback" + (f" to {wanted}" if wanted
                                                                else ""))
    if not options.restore_snapshot and not options.schema_restored_first:
        refuse_doubted(env, found[0] if found is not None else None, run_id, "rollback")
    state = states.read_state(env.state_file, environment=env.name)
    current = state.current
    if current is None:
        raise PreconditionError("no current deployment is recorded",
                                no_previous_fix(env))
    forward: PreconditionError | None = None
    if options.to:
        target = named_target(env, state, options.to)  # again under the lock: it may change
    else:
        if state.previous is None:
            raise PreconditionError("No previous deployment found",
                                    no_previous_fix(env))
        target = state.previous
        if state.rolled_back_from is not None:
            # the deployment this host was rolled back FROM: a rollback typed again (its
            # output lost, a scenario reported skipped, a terminal that dropped) went forward,
            # back to the release users were just taken off (found by review). An older one
            # marked so (users switched forward again by hand since) is a real rollback.
            # Raised once what serves is known, after an interrupted run's own refusal.
            forward = PreconditionError(
                f"the previous deployment {target.version} is the one this host was rolled "
                f"back from: rolling back again would put it back in front of users; nothing "
                "was changed",
                f"to return to it on purpose: `runbook rollback {command_arg(env)} --to "
                f"{target.version}`; to go further back, name that version with --to "
                f"(`runbook status {command_arg(env)}` lists the deployments)")
    if not options.to and (target.id == current.id or target.version == current.version):
        raise PreconditionError(f"{target.version} is already the current deployment",
                                "nothing to roll back to; pass --to <another version>")
    # history entries another tool wrote badly: each provably older than the target is named
    # (the plan's warning, so the journal's); one that may be it or newer is refused
    passed = state.passed_by(target)
    # Independent read-only probes run at once (runbook/preflight.py: Probe); each result is
    # taken where the sequential plan used it, so the first failure reported is the same.
    guard_probe = tool_checks.Probe(lambda: schema_guard(env, current, target, options),
                                    "schema-guard")
    containers = {s: tool_checks.Probe(partial(docker.inspect, env.slot(s).container),
                                       f"inspect-{s}") for s in Slot}
    checks: tool_checks.Checks | None = None
    killed_restore: str | None = None  # the run id of an interrupted run that restored
    early: slots.EarlyHealth | None = None
    try:
        live, warnings = traffic.live_slot(env, current.active_slot)
        warnings += passed
        from_version, served = serving_deployment(state, current, containers[live].result())
        _expected(options, current, from_version, served)
        running = containers[live].result().running

        def in_effect(refused: PreconditionError) -> PreconditionError:
            # what is asked is in effect: said as done (by whom), unless a record waits
            return refused if found is not None else finish.done_already(
                refused, current, live, from_version, running)

        refusal = _other_target(env, found, options, from_version, target) or forward
        if refusal is not None and refusal is forward:
            refusal = in_effect(refusal)
        if refusal is not None:  # said with the outage an interrupted run may have left
            if found is not None and not containers[live].result().running:
                raise down_after_interrupted(env, found[0], live, refusal)
            raise refusal
        _serving_is_current(env, state, current, target, live, containers[live].result(),
                            named=bool(options.to), done=in_effect)
        if state.unread:  # simulated as the commit writes it: what serves, the other slot
            readable_after(state, target, served=served, slot=live.other)
        if served is not None and served.id != current.id:
            # the file's current is not what serves (the old tooling's swap): the guard,
            # started before the serving slot was known, judged from the file; it judges
            # again from what serves, whose migrations the database ran (found by review)
            guard_probe.settle(2.0)
            guard_probe = tool_checks.Probe(partial(schema_guard, env, served, target, options),
                                            "schema-guard")
        if found is not None:
            # a killed restore may have stopped the serving slot (its maintenance stop): say
            # so, never "nothing users see" while users get errors
            seen = ("changed nothing users see" if containers[live].result().running
                    else f"left the serving slot {live} STOPPED (users get errors until this "
                         "run switches traffic)")
            # a `rollback --restore-snapshot` killed once its restore began is resumed by
            # the command it names, without the flag: it must still say the database was
            # replaced, and where the data from before is (it said "nothing users see")
            from runbook.snapshot_restore import known_killed_restore, restored_by

            # unreadable beside the state file: said, never "changed nothing users see"
            restored, unreadable = known_killed_restore(env, run_id)
            if restored is not None and restored["run_id"] == found[0].run_id:
                killed_restore = found[0].run_id
                seen = (f"restored the database before it stopped (the data from before that "
                        f"restore is in {restored['safety']}, its safety snapshot: keep it)"
                        + ("" if containers[live].result().running
                           else f" and left the serving slot {live} STOPPED"))
            elif (ended := restored_by(env, found[0].run_id)) is not None and ended[1]:
                # its own record: the restore ended and the app served since (a `docker
                # start`, an earlier rerun), so no killed restore is pending, but that run
                # did change the database (found by review: "changed nothing users see")
                seen = (f"restored the database before it stopped (the data from before that "
                        f"restore is in {ended[0]}, its safety snapshot: keep it)")
            elif unreadable is not None and restoring_command(env, found[0]):
                from runbook.restore_records import unfinished_marker

                seen = (f"may have restored the database before it stopped (whether it did "
                        f"cannot be told: {unfinished_marker(env)} cannot be read; keep every "
                        "snapshot it names, and see `runbook status`)"
                        + ("" if containers[live].result().running
                           else f" and left the serving slot {live} STOPPED"))
            warnings.insert(0, f"an interrupted run {seen}; continuing: "
                            f"{found[0].describe(moved=False)}"
                            if found[0].action == "rollback" else
                            # another verb's record (a deploy whose schema moved keeps it):
                            # this rollback replaces it, and names its pre-deploy snapshot
                            finish.replacing_warning(env, found[0], "rollback"))
        standby = live.other
        wanted = slots.image_of(env, target.version, target.image or None)
        # the upstream's Dockerfile and its build arguments (VERSION defaults to `dev`,
        # GIT_COMMIT to `unknown`): the build must name itself as the gate expects
        recovery = (f"the image is gone: rebuild it from commit {target.git_commit} "
                    f"(cd /opt/togather/src && git checkout {target.git_commit} && docker build "
                    f"-f deploy/docker/Dockerfile --build-arg VERSION={target.version} "
                    f"--build-arg GIT_COMMIT={target.git_commit} -t {wanted} .) and run the "
                    f"rollback again, or deploy a known-good version: {compose.deploy_hint(env)}")
        try:
            prep = slots.prepare(env, standby, target.version, target.image or None,
                                 action="rollback", recovery=recovery,
                                 info=containers[standby].result())
        except PreconditionError as exc:
            # a refusal whose fix makes the slot from the tag (a `docker run` host): said
            # when that tag holds another commit now, or following it fails the rollback
            moved = slots.tag_holds_another(wanted, target.git_commit,
                                            (containers[live].result(), state))
            if moved is not None and exc.fix and wanted in exc.fix:
                exc.fix = (f"{wanted} no longer holds {target.version}'s build ({moved}): "
                           f"put commit {target.git_commit}'s build back under it first "
                           f"(rebuild it, or `docker tag` that build as {wanted} if this host "
                           f"still has it); then {exc.fix}")
            raise
        if prep.action == "recreate" and prep.build is not None:
            # the tag may name another build than the one that ran as the target (found by
            # review: rebuilt from the code rolled back from, and the plan did not say so)
            moved = slots.moved_since(
                prep.made or prep.image, prep.build,
                slots.ran_before(env, target.id, prep.container,
                                 (wanted, prep.image, prep.made or prep.image)),
                target.version, health.named_commit(target.git_commit))
            if moved is not None:
                warnings.append(moved)
        if prep.action == "none" and not options.force and tools:  # ask its health meanwhile
            early = slots.EarlyHealth(env, standby)
        # live_slot has just read Caddy's running config through its admin API: it answers
        caddy.check_running(env, admin_answered=True)
        try:
            sp = caddy.plan_switch(env, standby, slots.reach(env))
        except RunbookError:
            _guarded(guard_probe, options)  # the schema guard's failure first, as before
            raise
        # every tool and file the plan will use, proved before the first change (issue 10);
        # started now, so Caddy validates while the schema guard still waits on the database
        if tools:
            checks = tool_checks.start(env, candidate=sp.new_text,
                                       recreate=prep.action == "recreate", admin_answered=True,
                                       loaded=lambda: traffic.loaded_config(env),
                                       tag=prep.tag)
        try:
            guard = _guarded(guard_probe, options)
        except PreconditionError as exc:
            if found is None or containers[live].result().running:
                raise
            raise down_after_interrupted(env, found[0], live, exc) from None
        warnings += guard.warnings
        # the build the target slot would run: its label's commit, and not the serving one
        warnings += _refuse_another_build(env, state, target, prep,
                                          containers[live].result(), live, from_version, guard)
        if from_version != current.version:
            guard.details["schema judged from"] = (
                f"{from_version}, which serves (the state file's current is {current.version})"
                if served is not None else
                f"the state file's current {current.version}: {from_version}, which serves, is "
                "not in the deployment history")
        checked = checks.result() if checks is not None else {}
        warnings += checks.warnings if checks is not None else []
    except BaseException:
        guard_probe.settle(2.0)
        for probe in containers.values():
            probe.settle(2.0)
        if checks is not None:
            checks.settle(2.0)
        if early is not None:
            early.settle(2.0)
        raise
    observed = slots.Observed()
    restore_steps: list[Step] = []
    # the restore's own facts (the snapshot restored, the safety snapshot once taken), filled
    # in as it runs: the plan's, so --format json names them as a standalone restore does
    facts: dict[str, Any] = {}
    record: dict[str, Any] = {}  # the intent's: the restore's check says in it that it passed
    # the schema the target's /health must report at its gate: the database's as the guard
    # read it, or the snapshot's once restored (a slot reading another database answered
    # from it, passed, and served users from a database the run never checked)
    gate_schema = health.ExpectedSchema(
        lambda: guard.read, str(guard.read) if guard.read is not None else "its version",
        database.where(env), unknown="the schema guard could not read the database's schema")
    if guard.restore is not None:
        from runbook import snapshot_restore

        restore_run = snapshot_restore.prepare(env, guard.restore, options.moved_from,
                                               restoring(env, options, guard.restore))
        restore_steps = snapshot_restore.restore_steps(
            env, restore_run, facts=facts, run_id=run_id, end_sessions=options.end_sessions,
            switch_to=standby, record=record)
        restored_at = restore_run.verified.migration_version
        gate_schema = dataclasses.replace(gate_schema, version=lambda: restored_at,
                                          planned=str(restored_at), how="restored")
        warnings += [facts[k] for k in ("unfinished_unreadable", "privileges_lost") if facts.get(k)]
        warnings += facts["unproven_sessions"]
        early = None  # asked before the restore, which stops the slot: never its gate's
        if prep.action in ("none", "unpause"):  # the restore stops every app slot, the target too
            prep = slots.Preparation(prep.slot, prep.container, prep.image, prep.tag, "start",
                                     "start it again after the restore stopped it")
    switch, diff = slots.switch_step(env, standby, target.version, observed, planned=sp,
                                     validated=sp.new_text)
    served_on = served_schema(found, served, guard, containers[live].result())
    record.update({
        "target_id": target.id,
        # what served: the state step rolls back from it (recording.py)
        **({"from_id": served.id} if served is not None else {}),
        # their content keys (version, commit, deployment time): how the state step still
        # finds them after another tool's rewrite dropped the ids (recording.deployment_of)
        "target_key": states.content_key(target),
        **({"from_key": states.content_key(served)} if served is not None else {}),
        "gated": not options.force,  # for its finish (finish.py)
        # the schema the guard checked, recorded for the target
        **({"target_schema": guard.schema} if guard.schema is not None else {}),
        # the schema what served ran on, recorded for it when its record names none
        **({"from_schema": served_on} if served_on is not None else {}),
        # a rerun without the flag is told the command that finishes it
        **({"restore_snapshot": str(guard.restore.path),
            "end_sessions": options.end_sessions,
            **({"moved_from": options.moved_from} if options.moved_from else {})}
           if guard.restore is not None else {}),
    })
    intent = intents.Intent(run_id=run_id, action="rollback", environment=env.name,
                            from_slot=str(live), to_slot=str(standby),
                            from_version=from_version, to_version=target.version,
                            to_image=prep.image, record=record,
                            **intents.recorded(state))

    def update_state(ctx: StepContext) -> None:
        recording.rollback(env, intent, observed, run_id, ctx)

    gate = slots.gate_step(env, standby, force=options.force, expected_version=target.version,
                           observed=observed, early=early, record=intent.record,
                           schema=gate_schema,
                           commit=_expected_commit(target, prep, guard.restore is not None),
                           # a failed gate after a restore has its own words (the database
                           # was replaced): no other version is offered there
                           way_out=(_past_a_failed_gate(env, state, target, from_version, guard)
                                    if guard.restore is None else None))
    recorded = recording.rolled_back(state, intent, target, run_id=run_id)
    after = recording.state_lines(recorded or state)
    if recorded is None:
        after["current"] += " (already recorded: left as it is)"
    else:
        after.update(recording.schema_line(state, recorded, intent))
    preflight = Step("preflight", "Pre-flight checks (read-only, done)", {
        "current": f"{current.version} on {live} ({current.id})"
                   if from_version == current.version else
                   f"state file says {current.version} ({current.id}); serving {from_version} "
                   f"on {live} " + (f"({served.id})" if served is not None
                                    else "(not in the deployment history)"),
        "traffic": f"{live} (as Caddy runs it)",
        "target": f"{target.version} ({target.id}, deployed "
                  f"{states.format_time(target.deployed_at)}"
                  f" by {target.deployed_by})",
        "target slot": f"{standby} ({env.slot(standby).container}, port {env.slot(standby).port})",
        "target image": prep.image,
        "caddy": f"answering at {env.caddy.admin_url}",
        **guard.details,
        **checked,
    }, phase=Phase.PREFLIGHT)
    steps = [
        preflight,
        *slots.leftover_steps(env, standby, prep.leftovers),  # before anything changes
        *restore_steps,
        slots.run_step(env, prep, observed, again=resume_command(env, target.version)),
        gate, switch,
        Step("state", "Record the rollback in the deployment state",
             {"file": str(env.state_file), **after}, run=update_state,
             phase=Phase.FINISH),
        slots.stop_step(env, live, env.stop_old_slot, gated=not options.force,
                        observed=observed, down=_down_before_stop(
                            restore_steps, containers[live].result(), killed_restore),
                        planned=containers[live].result()),
    ]
    summary = (f"roll back {env.display} from {from_version} ({live}) to "
               f"{target.version} ({standby})")
    facts.update({"from": from_version, "to": target.version, "from_slot": str(live),
                  "to_slot": str(standby), "container_action": prep.action,
                  **({"schema_refusal": {"error": guard.refused.message,
                                         "fix": guard.refused.fix}}
                     if guard.refused is not None else {})})
    return Plan("rollback", env, summary, steps, warnings, diff, facts=facts,
                # a restoring run's Ctrl-C names its flags too (found by review: typed as
                # printed, the schema guard refused it, a wasted step during an outage)
                intent=intent, resume_command=restoring_command(env, intent)
                or resume_command(env, target.version),
                replaces=finish.replaced(found, intent))


def _down_before_stop(restore_steps: list[Step], serving: docker.ContainerInfo,
                      killed_restore: str | None) -> str | None:
    """Why the old serving slot is neither drained nor stopped by the stop-old-slot step
    (None: it is, as any old slot). Down when the run is planned (a killed restoring
    rollback's maintenance stop, `killed_restore` its run id, whose rerun goes on from its
    gate; found by a plan-fidelity review: its plan showed a drain and a `docker stop`, the
    journal "container: already exited"), or stopped by this run's own restore, which takes
    every app slot down and starts only the target again."""
    why = (f" (the interrupted run {killed_restore} restored the database: its maintenance "
           "stop takes every app slot down)" if killed_restore is not None else "")
    if not serving.up:
        return slots.down_when_planned(serving, why + (", and the restore leaves it so"
                                                       if restore_steps else ""))
    if not restore_steps:
        return None
    return (f"already stopped by the restore (no drain: it went down at step "
            f"{step_number('stop-app-slots')})")


def status_plan(env: Environment, to: str | None = None) -> Plan:
    """Whether `runbook rollback ENV [--to TO]` would plan now, for `runbook status` before it
    names it (a library call: the CLI's --dry-run checks the tools): every refusal that reads
    (the state file, the lock, the schema guard, Caddy's running config, Docker), raised as
    that command raises it. Neither what this user may not write (found by review: a read-only
    watcher was told the rollback was refused; status says it as a note) nor the tool checks
    (found by review: on a caddy-reload or systemctl host status wrote Caddy's temp files
    beside the Caddyfile, and a status killed meanwhile left them)."""
    options = Options(to=to)
    return plan_only(env, "rollback", lambda run_id: plan(env, options, run_id, tools=False))


def rollback(env: Environment, options: Options = Options(), *, dry_run: bool = False,
             confirm: Any = None, progress: Any = None, notify: Any = None) -> RunResult:
    if options.schema_restored_first and not dry_run:
        raise ValueError("schema_restored_first is for a dry run only: a rollback must never "
                         "run past its schema guard's refusal")
    if options.to and not dry_run:  # a dry run plans without the lock anyway
        check_target(env, options.to)
    # --snapshot, as --to: a name that is no snapshot is refused before the lock (an
    # interrupted run's record, as for --to, is left to the plan, which finishes that run)
    if options.restore_snapshot not in (None, "auto") and not dry_run \
            and not os.path.lexists(intents.path(env)):
        from runbook.snapshot_restore import check_named

        check_named(env, options.restore_snapshot)
    return perform(env, "rollback", lambda run_id: plan(env, options, run_id), dry_run=dry_run,
                   reason=options.reason, confirm=confirm, progress=progress, notify=notify)
