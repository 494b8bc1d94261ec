"""The runbook's manual slot switch: point Caddy at a slot you know is healthy.

Health-gated unless --force; the old slot keeps running so the switch can be undone at once.
The state file is updated to describe what now takes traffic. It also repairs a Caddy that
serves no slot at all (a Caddyfile targeting a dead port): there is no slot to protect then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runbook import docker, finish, health, slots, traffic
from runbook import intent as intents
from runbook import state as states
from runbook.environment import Environment, Slot
from runbook.errors import PreconditionError
from runbook.plan import Phase, Plan, Step, StepContext
from runbook.run import RunResult, perform


@dataclass(frozen=True)
class Options:
    slot: Slot
    force: bool = False
    reason: str = "manual slot switch"


def load_or_empty(env: Environment) -> states.DeploymentState:
    if not env.state_file.exists():
        return states.DeploymentState(environment=env.name)
    return states.read_state(env.state_file, environment=env.name)


def record(env: Environment, intent: intents.Intent, observed: slots.Observed, run_id: str,
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
    if fresh.previous is not None and fresh.previous.version == version:
        new = states.after_rollback(fresh, slot=target, health_status=health_status,
                                    run_id=run_id)
    elif fresh.current is not None and fresh.current.version == version:
        new = fresh.with_(current=fresh.current.with_(active_slot=target))
    else:
        known = fresh.find_version(version)
        commit = known.git_commit if known else "0" * 40
        report = health.probe(env.slot(target), env.health.path, env.health.request_timeout)
        commit = report.git_commit or commit
        dep = states.make_deployment(version, commit, target, image=intent.to_image or "",
                                     status="active",
                                     migration_version=known.migration_version if known
                                     else None)
        new = states.after_deploy(fresh, dep.with_(health_status=health_status))
    states.write_state(env.state_file, new)
    ctx.note(current=f"{version} on {target}")


def plan(env: Environment, options: Options, run_id: str) -> Plan:
    found = finish.interrupted(env)
    if found is not None and found[1] == "finish":
        return finish.plan_for(env, found[0], run_id)
    state = load_or_empty(env)
    target = options.slot
    config = env.slot(target)
    warnings: list[str] = []
    now = traffic.read(env)
    if now.slot == target and now.problem(env) is None:
        raise PreconditionError(f"the {target} slot already takes traffic (as Caddy runs it)",
                                "nothing to switch; see `runbook status`")
    if now.slot is None:
        warnings.append(f"Caddy serves no single slot ({now.problem(env)}); repointing it at "
                        f"{target}")
    live = now.slot or target.other
    info = docker.inspect(config.container)
    if not info.exists or info.tag is None:
        raise PreconditionError(f"container {config.container} does not exist",
                                f"deploy a version to it: `runbook deploy {env.name} "
                                "--version <version>`")
    prep = slots.prepare(env, target, info.tag, info.image)
    observed = slots.Observed()
    version = info.tag
    intent = intents.Intent(run_id=run_id, action="switch", environment=env.name,
                            from_slot=str(live), to_slot=str(target),
                            from_version=state.current.version if state.current else None,
                            to_version=version, to_image=info.image)

    def run_state(ctx: StepContext) -> None:
        record(env, intent, observed, run_id, ctx)

    switch, diff = slots.switch_step(env, target, version, observed)
    steps = [
        Step("preflight", "Pre-flight checks (read-only, done)", {
            "traffic now": now.describe() if now.slot else f"no single slot ({now.problem(env)})",
            "target": f"{target}: {prep.describe_container}"}, phase=Phase.PREFLIGHT),
        slots.run_step(env, prep),
        slots.gate_step(env, target, force=options.force, expected_version=version,
                        observed=observed),
        switch,
        Step("state", "Record the switch in the deployment state",
             {"file": str(env.state_file), "current": f"{version} on {target}"}, run=run_state,
             phase=Phase.FINISH),
    ]
    return Plan("switch", env, f"switch {env.display}'s traffic from "
                f"{now.slot or 'no single slot'} to {target}",
                steps, warnings, diff, facts={"from_slot": str(live), "to_slot": str(target),
                                              "version": version, "to": version},
                intent=intent, resume_command=f"runbook switch {env.name} --slot {target}")


def switch(env: Environment, options: Options, *, dry_run: bool = False, confirm: Any = None,
           progress: Any = None, notify: Any = None) -> RunResult:
    return perform(env, "switch", lambda run_id: plan(env, options, run_id), dry_run=dry_run,
                   reason=options.reason, confirm=confirm, progress=progress, notify=notify)
