"""The runbook's manual slot switch: point Caddy at a slot you know is healthy.

Health-gated unless --force; the old slot keeps running so the switch can be undone at once.
The state file is updated to describe what now takes traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

from runbook import caddy, docker, slots
from runbook import state as states
from runbook.environment import Environment, Slot
from runbook.errors import PreconditionError, RunbookError
from runbook.plan import Plan, Step, StepContext
from runbook.rollback import live_slot
from runbook.run import RunResult, perform


@dataclass(frozen=True)
class Options:
    slot: Slot
    force: bool = False
    reason: str = "manual slot switch"


def plan(env: Environment, options: Options, run_id: str) -> Plan:
    from runbook.deploy import load_or_empty

    state = load_or_empty(env)
    target = options.slot
    config = env.slot(target)
    live, warnings = (live_slot(env, state) if state.current
                      else (target.other, ["no deployment recorded in the state file"]))
    if live == target:
        # live_slot falls back to the state file when Caddy's block names no single slot
        # (e.g. it targets a dead port): repointing Caddy at the recorded slot is the fix then.
        try:
            pointed = caddy.active_slot(caddy.read(env), env)
        except RunbookError:
            pointed = None
        if pointed == target:
            raise PreconditionError(f"the {target} slot already takes traffic",
                                    "nothing to switch; see `runbook status`")
        warnings.append(f"Caddy's managed block points at no single slot; repointing it at "
                        f"{target}")
    info = docker.inspect(config.container)
    if not info.exists or info.tag is None:
        raise PreconditionError(f"container {config.container} does not exist",
                                f"deploy a version to it: `runbook deploy {env.name} "
                                "--version <version>`")
    prep = slots.prepare(env, target, info.tag, info.image)
    facts: dict[str, object] = {}
    version = info.tag

    def run_state(ctx: StepContext) -> None:
        fresh = load_or_empty(env)
        health_status = str(facts.get("health_status") or "unknown")
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
            from runbook import health

            report = health.probe(config, env.health.path, env.health.request_timeout)
            commit = report.git_commit or commit
            dep = states.make_deployment(version, commit, target, image=info.image or "",
                                         status="active",
                                         migration_version=known.migration_version if known
                                         else None)
            new = states.after_deploy(fresh, dep.with_(health_status=health_status))
        states.write_state(env.state_file, new)
        ctx.note(current=f"{version} on {target}")

    switch, diff = slots.switch_step(env, target, version, facts)
    steps = [
        Step("preflight", "Pre-flight checks (read-only, done)", {
            "traffic now": str(live), "target": f"{target}: {prep.describe_container}"}),
        slots.run_step(env, prep),
        slots.gate_step(env, target, force=options.force, expected_version=version, facts=facts),
        switch,
        Step("state", "Record the switch in the deployment state",
             {"file": str(env.state_file), "current": f"{version} on {target}"}, run=run_state),
    ]
    return Plan("switch", env, f"switch {env.display}'s traffic from {live} to {target}",
                steps, warnings, diff, facts={"from_slot": str(live), "to_slot": str(target),
                                              "version": version})


def switch(env: Environment, options: Options, *, dry_run: bool = False, confirm=None,
           progress=None) -> RunResult:  # type: ignore[no-untyped-def]
    return perform(env, "switch", lambda run_id: plan(env, options, run_id), dry_run=dry_run,
                   reason=options.reason, confirm=confirm, progress=progress)
