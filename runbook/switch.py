"""The runbook's manual slot switch: point Caddy at a slot you know is healthy.

Health-gated unless --force; the old slot keeps running so the switch can be undone at once.
The state file is updated to describe what now takes traffic. It also repairs a Caddy that
serves no slot at all (its Caddyfile fixed by hand, or never reloaded): there is no slot to
protect then. A managed block with no upstream on a slot's port is refused, not retargeted:
the port may be another service's. With the slot Caddy already serves (its loaded config, the
Caddyfile on disk naming it too, and Caddy running what that file says) while the state file
records the other one, it only records what serves (`_record_only`): nothing else did, short
of a hand edit of the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runbook import (
    caddy,
    caddy_command,
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
from runbook.errors import PreconditionError, RunbookError
from runbook.plan import Phase, Plan, Step, StepContext
from runbook.restore_records import refuse_doubted
from runbook.run import RunResult, perform


@dataclass(frozen=True)
class Options:
    slot: Slot
    force: bool = False
    reason: str = "manual slot switch"
    # start the app on a restored database its check doubted (restore_records.ACCEPT_FLAG)
    accept_restored_data: bool = False


def plan(env: Environment, options: Options, run_id: str) -> Plan:
    repairing: finish.CannotFinish | None = None
    try:
        found = finish.interrupted(env)
    except finish.CannotFinish as exc:  # the repair that error names is this very command
        found, repairing = None, exc
    if found is not None and found[1] == "finish":
        if found[0].target == options.slot:
            return finish.plan_for(env, found[0], run_id)
        # the operator wants the other slot: finishing that run would stop the very slot asked
        # for; this switch replaces its record instead (as in the repair above)
        repairing = finish.CannotFinish(
            f"an interrupted run moved traffic to {found[0].to_slot} "
            f"({found[0].describe(moved=True)})", "", found[0], moved=True)
        found = None
    state = states.read_or_absent(env.state_file, environment=env.name)
    target = options.slot
    config = env.slot(target)
    now = traffic.read(env)
    # which slot serves is read from the ports Caddy dials: with a [slots] entry pairing a
    # container and a port that are not one slot's, "nothing to switch" (or a record-only
    # switch) was decided on the wrong slot (found by review); refused before anything else
    traffic.check_slot_ports(env)
    # the file written back in line while a run that never moved traffic off `target` left
    # its record ("continue": killed between its write and its reload, or undone with a
    # write-back that failed): that record is kept as it is, this switch writes none
    in_line_beside = (repairing is None and found is not None and found[1] == "continue"
                      and found[0].source == target)
    in_line = now.slot == target and now.problem(env) is None
    recorded_slot = state.current.active_slot if state.current is not None else None
    # the file records the other slot, no interrupted run's record open (its finish, or the
    # repair it names, records it): what serves is recorded, nothing moved
    elsewhere = (recorded_slot if found is None and repairing is None
                 and recorded_slot not in (None, target) else None)
    # the app already serves on `target`, off the record: this switch starts nothing, it
    # records what serves (record-only, or with the reload that puts Caddy in line)
    serves = in_line and elsewhere is not None
    # the switch starts the target slot's app: never on a database a restore's check doubted,
    # unless on-call accepts it (refused before anything else is asked but Caddy). Serving
    # already, it is refused all the same (it would record that data as fine to serve), in
    # those words
    accepted = refuse_doubted(env, found[0] if found is not None else
                              repairing.intent if repairing is not None else None,
                              run_id, "switch", options.accept_restored_data, serving=serves)
    warnings: list[str] = [accepted] if accepted else []
    traffic.refuse_if_unverifiable(env, now)
    if (side := traffic.proxy_side_warning(env, now)) is not None:
        warnings.append(side)

    def in_effect(refused: PreconditionError) -> PreconditionError:
        # a switch killed after its last step, typed again: said as done, by that run (the
        # refusal as it is when Docker cannot tell what the slot runs)
        if found is not None or repairing is not None:
            return refused
        try:
            runs = docker.inspect(config.container)
        except RunbookError:
            return refused
        return finish.done_already(refused, state.current, target, runs.tag, runs.running)

    # the file names the other slot, or no slot at all (an edit, a killed run of another
    # tool, a config loaded through the admin API): a reload, a restart or a reboot would
    # move traffic there. Writing the file back in line with what runs is this very switch,
    # and no hand edit at 3 a.m.: the verified reload of what already runs moves nobody
    reloads = _in_line_or_refuse(env, target,
                                 (found is None and repairing is None) or in_line_beside,
                                 elsewhere, done=in_effect) if in_line else None
    if reloads is not None:
        warnings.append(reloads)
    if repairing is not None:
        warnings.append(f"repairing: {repairing.message}; this switch replaces that run's "
                        "record once it is done")
    if now.slot is None:
        warnings.append(f"Caddy serves no single slot ({now.problem(env)}); repointing it at "
                        f"{target}")
    live = now.slot or target.other
    info = docker.inspect(config.container)
    if not info.exists:
        raise PreconditionError(f"container {config.container} does not exist",
                                f"deploy a version to it: {compose.deploy_hint(env)}")
    if info.tag is None or not states.is_version(info.tag):
        # the state step comes after the commit: traffic would move, then every run (and
        # every rerun of this one) would fail to record it
        raise PreconditionError(
            f"{config.container} runs {info.image}, whose tag is not a version the state file "
            "can record (a 7-hex short commit); switching would move traffic and then fail to "
            "record it; nothing was changed",
            f"deploy a version to it: {compose.deploy_hint(env)}")
    try:  # read once, for both guards
        schema: database.SchemaVersion | RunbookError = database.schema_version(env)
    except RunbookError as exc:
        schema = exc
    pending = found[0] if found is not None else repairing.intent if repairing else None
    for said in (_schema_dirty(env, schema, pending, target, options.force, serving=serves),
                 _schema_behind(env, state, info.tag, options.force, schema, serving=serves)):
        if said:
            warnings.append(said)
    if in_line and reloads is None:
        return _record_only(env, state, target, info.tag, info.image, now, run_id, warnings,
                            accepted)
    prep = slots.prepare(env, target, info.tag, info.image, action="switch",
                         claimed_by=f"{config.container} (its image)")
    observed = slots.Observed()
    version = info.tag
    # the deployment whose record this switch carries onto `target` (its commit kept): the
    # build the slot runs must be that one, as a rollback's must (found by review: a
    # standby recreated from a rebuilt tag took users, and the record named the old commit).
    # Not when Caddy already serves `target`: that switch moves nobody
    carried = None if in_line else _carried(state, version)
    if carried is not None:
        warnings += _refuse_another_build(env, state, carried, prep, now.slot, version)
    served = _served_unrecorded(env, state, now.slot, target, version, schema,
                                found is not None or repairing is not None)
    intent = intents.Intent(run_id=run_id, action="switch", environment=env.name,
                            from_slot=str(live), to_slot=str(target),
                            from_version=state.current.version if state.current else None,
                            # what the run creates or starts (a dead container is recreated
                            # from compose's image: its old name is not what will run)
                            to_version=version, to_image=prep.image,
                            # the schema the deployment users are moved off served on, read
                            # above before anything changed: recorded for it (recording.py)
                            record=({"from_id": served[0].id, "from_schema": served[1]}
                                    if served is not None else {}),
                            **intents.recorded(state))
    # the same switch rerun supersedes its dead run's record, never puts it back
    keeps = in_line and in_line_beside
    old_record = None if keeps else finish.replaced(found, intent)
    if keeps and found is not None:
        # found here is a "continue" (a "finish" was planned or turned into `repairing`)
        warnings.append(f"an interrupted run's record is kept as it is "
                        f"({found[0].describe(moved=False)}): "
                        "this switch only writes the file back in line with what runs")
    elif old_record is not None:
        warnings.append(finish.replacing_warning(env, old_record, "switch"))
    elif found is not None and found[1] == "continue":
        warnings.append(f"an interrupted run of this switch changed nothing users see; "
                        f"continuing: {found[0].describe(moved=False)}")

    def run_state(ctx: StepContext) -> None:
        recording.switch(env, intent, observed, run_id, ctx)
        slots.keep_for_switch_back(env, target.other, run_id, ctx)

    recorded = _recorded(env, state, version, target, run_id, intent)

    planned = caddy.plan_switch(env, target, slots.reach(env))
    # Caddy validates what the switch will load before anything changes, as rollback and
    # deploy have it do (found by review: a typo outside the markers passed the dry run, and
    # the switch started and gated the target, then failed naming no cause)
    validated, unvalidated = preflight.split_warnings(
        preflight.validation(env, planned.new_text))  # a dry run may say it did not
    warnings += unvalidated
    # as rollback and deploy ask it: a Caddy container that mounts the file itself never sees
    # the switch's write, and its next reload sends users back to the old slot
    mount = (preflight.caddyfile_mount(env) if caddy_command.runs_in_container(env)
             else "not a container")
    # /load replaces Caddy's whole config: every site it serves now must be in the new one
    kept, drift = preflight.split_warnings(
        preflight.kept_sites(env, planned.new_text, lambda: traffic.loaded_config(env)))
    warnings += drift
    switch, diff = slots.switch_step(env, target, version, observed, planned=planned,
                                     validated=planned.new_text)
    steps = [
        Step("preflight", "Pre-flight checks (read-only, done)", {
            "traffic now": now.describe() if now.slot else f"no single slot ({now.problem(env)})",
            "target": f"{target}: {prep.describe_container}", "validate": validated,
            "sites kept": kept,
            "caddyfile mount": mount,
            **({"restored data": accepted} if accepted else {})},
             phase=Phase.PREFLIGHT),
        *slots.leftover_steps(env, target, prep.leftovers),  # before anything changes
        *([_replace_record(env, repairing)] if repairing is not None else []),
        slots.run_step(env, prep, observed,
                       again=f"runbook switch {command_arg(env)} --slot {target}"),
        slots.gate_step(env, target, force=options.force, expected_version=version,
                        observed=observed,
                        commit=slots.expected_commit(
                            carried, prep, f"the deployment it switches to ({carried.id})",
                            "switch") if carried is not None else None),
        switch,
        Step("state", "Record the switch in the deployment state",
             {"file": str(env.state_file), **recorded}, run=run_state, phase=Phase.FINISH),
    ]
    return Plan("switch", env, f"switch {env.display}'s traffic from "
                f"{now.slot or 'no single slot'} to {target}",
                steps, warnings, diff, facts={"from_slot": str(live), "to_slot": str(target),
                                              "version": version, "to": version},
                # no record of its own beside a kept one: it moves no traffic, and writing
                # its record (then clearing it) lost the one kept
                intent=None if keeps else intent,
                resume_command=f"runbook switch {command_arg(env)} --slot {target}",
                replaces=repairing.intent if repairing is not None else old_record,
                replaces_moved=repairing.moved if repairing is not None else False,
                accepted_doubt=accepted)


def _carried(state: states.DeploymentState, version: str) -> states.Deployment | None:
    """The recorded deployment a switch to `version` records on its slot, keeping its commit
    (recording.switched: the previous one, as a rollback, or the current one moved); None
    when it records a new one, whose commit is the one the app names."""
    current, previous = state.current, state.previous
    if current is not None and previous is not None and previous.version == version:
        return previous
    return current if current is not None and current.version == version else None


def _refuse_another_build(env: Environment, state: states.DeploymentState,
                          carried: states.Deployment, prep: slots.Preparation,
                          serving: Slot | None, version: str) -> list[str]:
    """Refuse, before anything changes (exit 4), a target slot whose build names by its
    revision label another commit than the record the switch carries onto it, as a rollback
    refuses it (slots.labelled_another). Found by review: a standby recreated from a rebuilt
    tag was switched to, exit 0, and the state file recorded the old commit for the build
    users then ran. A label the serving build shares: the plan's warning, and the gate
    compares the commit the slot answers."""
    try:
        theirs = docker.inspect(env.slot(serving).container) if serving is not None else None
    except RunbookError:
        theirs = None
    found = slots.labelled_another(env, prep, carried, theirs, state)
    if found is None:
        return []
    if isinstance(found, str):
        return [found]
    raise PreconditionError(
        found.holds(carried, "switch"),
        slots.put_back(env, prep, found.name, carried, "switch", recreates=False)
        + f"; or, if the build {found.name} holds is meant, record what runs as a new "
          f"deployment: {compose.deploy_hint(env, version)}")


def _served_unrecorded(env: Environment, state: states.DeploymentState, serving: Slot | None,
                       target: Slot, version: str,
                       schema: database.SchemaVersion | RunbookError,
                       after_another: bool) -> tuple[states.Deployment, int] | None:
    """The current deployment users are moved off and the schema it served on, when its
    record names none (the Go CLI and the deploy script record none: a rollback back to it
    went unchecked, "restore the snapshot", throwing writes away; found by review): the
    plan's read of a clean schema, before anything changed, while its version ran in the
    slot Caddy serves (Docker's tag), as deploy judges it. None after an interrupted run's
    record (`after_another`: it may have changed the database), or when nothing tells."""
    current = state.current
    if current is None or current.migration_version is not None or serving is None \
            or serving == target or current.version == version or after_another \
            or isinstance(schema, RunbookError) or schema.dirty:
        return None
    try:
        info = docker.inspect(env.slot(serving).container)
    except RunbookError:
        return None
    return (current, schema.version) if info.running and info.tag == current.version else None


def _schema_dirty(env: Environment, schema: database.SchemaVersion | RunbookError,
                  pending: intents.Intent | None, target: Slot, force: bool, *,
                  serving: bool = False) -> str | None:
    """Refuse a schema golang-migrate left dirty, as deploy does (finish.dirty_refusal) and
    rollback's schema guard: the app started on it answers unhealthy (its migrations check
    fails), so the switch planned as usual, then failed at its health gate after 30 s (found
    by review). None, or a warning: --force goes past it, as rollback's does (its health
    gate skipped too), or a schema that cannot be read (left to _schema_behind). `serving`:
    the record-only switch, whose gate --force never skips: no --force is offered."""
    if isinstance(schema, RunbookError):
        return None
    refused = finish.dirty_refusal(env, schema, pending, "run the switch again",
                                   f"`runbook switch {command_arg(env)} --slot {target}` runs "
                                   "the switch again",
                                   "" if serving else "; or pass --force to switch anyway")
    if refused is None:
        return None
    if not force:
        raise refused
    return f"--force: {refused.message.removesuffix('; nothing was changed')}; switching anyway"


def _schema_behind(env: Environment, state: states.DeploymentState, version: str,
                   force: bool, schema: database.SchemaVersion | RunbookError, *,
                   serving: bool = False) -> str | None:
    """Refuse to serve a version on a database without the migrations it ran with (a
    `--restore-snapshot` rollback took them away): its /health says "degraded" (pending
    migrations), which the gate passes, and its pages fail on missing tables. The rollback's
    schema guard asks the same. None, or a warning: --force, or a schema that cannot be read
    (the switch is the way back to a slot known to serve, so that alone never refuses).
    `serving`: the record-only switch, whose version already serves (said so, and the
    deploy that migrates named as this environment is given: command_arg)."""
    dep = state.find_version(version)
    recorded = dep.migration_version if dep is not None else None
    if recorded is None:
        return None
    if isinstance(schema, RunbookError):
        return (f"the database schema cannot be read ({schema.message}): whether it has the "
                f"migrations {version} ran with ({recorded}) is not checked")
    if schema.version >= recorded:
        return None
    behind = (f"the database schema is at {schema.version} but {version} ran with "
              f"{recorded}: " + (f"{version} already serves without the migrations it needs"
                                 if serving else "it would serve without the migrations it "
                                 "needs"))
    if not force:
        hint = (f"`runbook deploy {command_arg(env)} --version {version}`"
                if serving and compose.can_recreate(env) else compose.deploy_hint(env, version))
        raise PreconditionError(f"{behind}; nothing was changed",
                                f"redeploy it with its migrations: {hint}; or pass --force to "
                                + ("record it as serving anyway" if serving
                                   else "switch anyway"))
    return f"--force: {behind}"


def _recorded(env: Environment, state: states.DeploymentState, version: str, target: Slot,
              run_id: str, intent: intents.Intent | None = None) -> dict[str, str]:
    """The state step's plan: what the recorder writes (its own preview), and when that is a
    rollback, which changes what a plain `runbook rollback` does next (found by review: a
    switch back to the previous version was recorded as a rollback, unannounced)."""
    after = recording.switched(state, version, target, run_id=run_id, intent=intent)
    lines = recording.state_lines(after or state)
    if intent is not None:  # a record-only switch moves nobody: none recorded
        lines.update(recording.schema_line(state, after, intent))
    if after is None:
        lines["current"] += " (already recorded: left as it is)"
    elif state.current is not None and after.previous is not None \
            and after.previous.id == state.current.id and after.previous.status == "rolled_back":
        lines["recorded as"] = f"a rollback from {state.current.version} to {version}" + (
            f": a plain `runbook rollback {command_arg(env)}` then refuses to go back to "
            f"{state.current.version} (name it with --to)" if after.rolled_back_from else "")
    return lines


def _in_line_or_refuse(env: Environment, target: Slot, unrecorded: bool,
                       elsewhere: Slot | None = None, *,
                       done: Callable[[PreconditionError], PreconditionError] | None = None,
                       ) -> str | None:
    """Caddy already runs `target`. Refused (nothing to switch) when the Caddyfile on disk
    names `target` too, unless the state file records the other slot (`elsewhere`: None is
    returned then, for a record-only switch, under the same health check); taken when it
    names the other slot, or no single slot (a third port,
    both slots: refused, the only switch left moved users off the healthy slot that serves
    to fix a file, found by review), provided the target answers healthy (a serving slot
    that is down is never started or stopped by this switch: switch to the other one), and
    no interrupted run's record is open (its own finish, or the repair it names, puts the
    file in line), except one that never moved traffic off `target` (`unrecorded` then:
    rerunning it sent users to the slot that may just have failed, and the only other way
    out was a hand edit). Returns the plan's warning for the switch that writes the file back
    and reloads it; None for the record-only switch, taken only while Caddy runs what the
    file says (`_runs_other_than_the_file`: else it is that reload). "Nothing to switch"
    goes through `done` (finish.done_already: a rerun says a killed switch completed)."""
    refused = f"the {target} slot already takes traffic (as Caddy runs it)"
    try:
        found = caddy.inspect(caddy.read(env), env)
    except RunbookError as exc:
        raise PreconditionError(f"{refused}, and {exc.message}",
                                exc.fix or f"check {env.caddy.caddyfile}") from None
    if found.slot == target and elsewhere is None:
        stopped = docker.inspect(env.slot(target).container)
        if not stopped.running:
            # it takes no traffic: nothing serves (found by review: "already takes traffic"
            # of a stopped container, the proxy answering 502). This switch never starts the
            # slot users are on: `docker start` does, once status says it holds the build to
            # serve on this database
            state = (f"stopped ({stopped.status})" if stopped.status in ("exited", "created",
                                                                         "dead")
                     else stopped.status if stopped.exists else "absent")
            verb = "unpause" if stopped.status == "paused" else "start"
            back = (f"`docker {verb} {stopped.name}` serves its build again"
                    if stopped.exists else f"deploy to it: {compose.deploy_hint(env)}")
            raise PreconditionError(
                f"the {target} slot Caddy points at takes no traffic: its container "
                f"{stopped.name} is {state}, so nothing serves, and a switch to it moves nobody; "
                "nothing was changed",
                f"{back} (`runbook status {command_arg(env)}` says first whether it is the "
                "build to serve on this database)")
        nothing = PreconditionError(refused, "nothing to switch; see `runbook status`")
        raise done(nothing) if done is not None else nothing
    names = (str(found.slot) if found.slot is not None
             else f"no single slot ({'; '.join(found.problems)})")
    if found.slot != target and not unrecorded:
        raise PreconditionError(f"{refused}; the Caddyfile on disk names {names}, and an "
                                "interrupted run's record is open",
                                f"see `runbook status {command_arg(env)}`: it names the "
                                "command that finishes that run (which puts the file in line)")
    report = health.probe(env.slot(target), env.health.path, env.health.request_timeout)
    if not report.ok:
        raise PreconditionError(
            f"{refused}, but does not answer healthy ({report.status}: {report.reason()}); "
            + (f"the Caddyfile on disk names {names}" if found.slot != target else
               f"the state file records {elsewhere}; nothing was written"),
            f"switch to the slot you know is healthy: `runbook switch {command_arg(env)} --slot "
            f"{target.other}`, or get {target} healthy first (`runbook status {command_arg(env)}`)")
    if found.slot != target:
        return (f"Caddy already runs {target}, but {env.caddy.caddyfile} names {names}: this "
                f"switch writes the file back in line with what runs and reloads it; traffic "
                f"stays on {target}")
    other = _runs_other_than_the_file(env, target)
    return None if other is None else (
        f"Caddy already sends users to {target} and {env.caddy.caddyfile} names it, but "
        f"{other}: only recording what serves would leave that running, so this switch "
        f"reloads the file; traffic stays on {target}")


def _runs_other_than_the_file(env: Environment, target: Slot) -> str | None:
    """How Caddy's loaded config differs from the Caddyfile on disk, which names `target`;
    None when its managed block dials `target`'s port alone and it is what the file adapts
    to (where that can be told). Found by review: a config loaded through the admin API
    sending `/api/*` to a closed port while `/` reached `target` passed for "in line"; the
    record-only switch recorded over it (exit 0) and the 502s went unseen."""
    running = traffic.loaded_config(env)
    port = env.slot(target).port
    stray = [d for d in traffic.managed_dials(env, running) if not d.endswith(f":{port}")]
    if stray:
        return f"its running config also dials {', '.join(stray)}"
    try:
        text = caddy.read(env)
        if preflight.sites_uncompared(env, text) is not None:
            return None
        as_file = caddy.adapt(env, text)
    except RunbookError:
        return None
    where = None if as_file is None else caddy.first_difference(running, as_file)
    return None if where is None else (
        f"its running config differs from what the file adapts to (first at {where})")


def _record_only(env: Environment, state: states.DeploymentState, target: Slot, version: str,
                 image: str | None, now: traffic.Traffic, run_id: str, warnings: list[str],
                 accepted: str | None) -> Plan:
    """The switch to the slot users already reach (Caddy's running config and its Caddyfile
    name it, and Caddy runs what that file says) while the state file records the other: it
    records what serves, as a switch records, and changes nothing in Caddy or Docker.
    Otherwise on-call edited the file by hand: a rollback is refused (the file's current is
    not what serves) and a deploy of that version recreates the recorded slot, migrates and
    moves users. Gated as a switch; its
    commit point is the proxy's verified answer (no traffic moves: users are already there),
    so every failure before it writes nothing (exit 4) and only the record comes after it."""
    recorded = state.current
    assert recorded is not None and recorded.active_slot is not None  # plan() checked it
    seen = caddy.verify(env, target, version, attempts=3, interval=0.2)
    if not seen.ok:
        raise PreconditionError(
            f"Caddy's running config sends traffic to {target}, but the proxy does not show "
            f"{target} running {version}: {seen.describe()}; nothing was written",
            f"see `runbook status {command_arg(env)}`")
    observed = slots.Observed()
    # never written (plan.intent stays None): a kill before the record leaves the file as it
    # was, and this same command records it then; the recorder reads what to record from it
    intent = intents.Intent(run_id=run_id, action="switch", environment=env.name,
                            from_slot=str(recorded.active_slot), to_slot=str(target),
                            from_version=recorded.version, to_version=version, to_image=image,
                            **intents.recorded(state))
    warnings.insert(0, f"traffic is already on {target} (Caddy's running config and the "
                       f"proxy), but {env.state_file} records {recorded.version} on "
                       f"{recorded.active_slot}: this switch only records what serves; nothing "
                       "in Caddy or Docker changes")
    gate = slots.gate_step(env, target, force=False, expected_version=version,
                           observed=observed)
    gated = gate.run
    assert gated is not None

    def run_gate(ctx: StepContext) -> None:
        try:
            gated(ctx)
        except health.HealthGateError as exc:  # fails closed: nothing written, nothing moved
            raise PreconditionError(f"{exc.message}; nothing was written", exc.fix) from None

    gate.run = run_gate

    def run_verify(ctx: StepContext) -> None:
        check = caddy.verify(env, target, version)
        if not check.ok:
            raise PreconditionError(f"the proxy does not show {target} running {version}: "
                                    f"{check.describe()}; nothing was written",
                                    f"see `runbook status {command_arg(env)}`")
        ctx.note(proxy=check.describe())
        ctx.commit()

    def run_state(ctx: StepContext) -> None:
        recording.switch(env, intent, observed, run_id, ctx)

    point = f"users already reach {target} ({version}), verified through the proxy"
    steps = [
        Step("preflight", "Pre-flight checks (read-only, done)", {
            "traffic now": now.describe(),
            "state file records": f"{recorded.version} on {recorded.active_slot}",
            "target": f"{target}: {env.slot(target).container} runs {image or version}",
            "proxy": seen.describe(),
            "so": f"traffic is already on {target}: nothing in Caddy or Docker changes; this "
                  "switch only records it",
            **({"restored data": accepted} if accepted else {})}, phase=Phase.PREFLIGHT),
        gate,
        Step("verify", f"Verify through the proxy that users reach {target} ({version})", {
            "url": f"{env.caddy.proxy_url}{env.caddy.verify_path}",
            "expects": f"{caddy.SLOT_HEADER}: {target}, version {version}",
            "commit point": "this check: no traffic moves; before it nothing is written, "
                            "after it only the record"},
             run=run_verify, phase=Phase.COMMIT),
        Step("state", "Record the switch in the deployment state",
             {"file": str(env.state_file), **_recorded(env, state, version, target, run_id),
              **({"restore doubt": "cleared, as accepted"} if accepted else {})},
             run=run_state, phase=Phase.FINISH,
             # as an accepting switch clears it when it starts the app: here the app already
             # serves on that data, and this is where the run records it as serving
             clears_doubt=(f"records the app, which already serves on that database, as "
                           f"serving on {target}") if accepted else None),
    ]
    return Plan("switch", env, f"record {env.display}'s traffic as on {target} ({version}), "
                f"where it already is", steps, warnings, "",
                facts={"from_slot": str(recorded.active_slot), "to_slot": str(target),
                       "version": version, "to": version, "record_only": True},
                resume_command=f"runbook switch {command_arg(env)} --slot {target}",
                accepted_doubt=accepted, commit_point=point)


def _replace_record(env: Environment, repairing: finish.CannotFinish) -> Step:
    """This switch's record (written before its first change) replaces the interrupted run's;
    if the switch fails before traffic moves, the interrupted run's record is put back, so the
    next run still knows of it (the undo is the executor's, registered as the record is
    overwritten: Plan.replaces)."""
    old = repairing.intent

    def run(ctx: StepContext) -> None:
        ctx.note(replaced=old.run_id)

    return Step("replace-record", "Replace the interrupted run's record with this switch's", {
        "interrupted run": old.describe(moved=repairing.moved),
        "on failure": f"its record is put back ({intents.path(env)})",
    }, run=run)


def switch(env: Environment, options: Options, *, dry_run: bool = False, confirm: Any = None,
           progress: Any = None, notify: Any = None) -> RunResult:
    return perform(env, "switch", lambda run_id: plan(env, options, run_id), dry_run=dry_run,
                   reason=options.reason, confirm=confirm, progress=progress, notify=notify)
