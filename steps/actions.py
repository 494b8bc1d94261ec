"""Whens: what the on-call does. Runbook actions go through `world.act`, so `--dry-run` turns
each mutating one into its printed plan; the fault fixes only ever run on a drill."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

from pytest_bdd import parsers, when

from runbook import database, deploy, docker, health, rollback, switch
from runbook import lock as locks
from runbook import status as statuses
from runbook.drill.versions import VERSIONS
from runbook.environment import Slot, command_arg
from steps.world import World


def version_tag(name: str) -> str:
    """A drill version's name (v1, v2, v3) or a real 7-hex version, as written."""
    return VERSIONS[name].tag if name in VERSIONS else name


# -- confirm -----------------------------------------------------------------------------------


@when("I confirm the deployment state")
def confirm_the_deployment_state(world: World) -> None:
    world.status = statuses.gather(world.env)
    world.notes["state file"] = (json.loads(world.env.state_file.read_bytes())
                                 if world.env.state_file.exists() else None)


# -- roll back ---------------------------------------------------------------------------------


@when("I roll back")
def roll_back(world: World) -> None:
    world.act("rollback", lambda dry, **kw: rollback.rollback(
        world.env, rollback.Options(reason="runbook feature: rollback"), dry_run=dry, **kw))


@when("I force the rollback")
def force_the_rollback(world: World) -> None:
    world.act("rollback --force", lambda dry, **kw: rollback.rollback(
        world.env, rollback.Options(force=True, reason="runbook feature: forced rollback"),
        dry_run=dry, **kw), cli="--force")


@when("I preview the rollback")
def preview_the_rollback(world: World) -> None:
    world.act("rollback --dry-run", lambda _dry, **_kw: rollback.rollback(world.env,
                                                                          dry_run=True),
              mutating=False)
    world.notes["preview"] = True
    if world.result is not None:
        world.show("rollback --dry-run", world.result.plan.render())


@when("I roll back restoring that snapshot")
def roll_back_restoring_the_snapshot(world: World) -> None:
    snapshot = world.notes["snapshot"]
    world.act("rollback with snapshot restore", lambda dry, **kw: rollback.rollback(
        world.env, rollback.Options(restore_snapshot=snapshot,  # type: ignore[call-arg]
                                    reason="runbook feature: rollback with snapshot restore"),
        dry_run=dry, **kw), cli=f"--restore-snapshot --snapshot {snapshot}")


# -- recovery ----------------------------------------------------------------------------------


@when(parsers.parse('I redeploy the known-good version "{name}"'))
def redeploy_known_good_version(world: World, name: str) -> None:
    tag = version_tag(name)
    world.notes["deployed version"] = tag
    world.act(f"deploy {tag}", lambda dry, **kw: deploy.deploy(
        world.env, deploy.Options(version=tag, reason="runbook feature: redeploy known-good"),
        dry_run=dry, **kw), cli=f"--version {tag}")


def switch_by_hand(world: World, target: Slot) -> None:
    world.notes["target slot"] = target
    world.act(f"switch to {target}", lambda dry, **kw: switch.switch(
        world.env, switch.Options(slot=target, reason="runbook feature: manual slot switch"),
        dry_run=dry, **kw), cli=f"--slot {target}")


@when("I switch traffic by hand to the standby slot")
def switch_to_the_standby_slot(world: World) -> None:
    live = world.live_slot()
    assert live is not None, "Caddy's managed block names no single slot"
    switch_by_hand(world, live.other)


@when("I switch traffic by hand to the slot the state file names as active")
def switch_to_the_recorded_slot(world: World) -> None:
    current = world.state().current
    assert current is not None and current.active_slot is not None
    switch_by_hand(world, current.active_slot)


# -- health ------------------------------------------------------------------------------------


@when(parsers.re(r"I check the health of the (?P<slot>blue|green) slot as (?P<form>JSON|a table)"))
def check_health_of_a_slot(world: World, slot: str, form: str) -> None:
    """`runbook healthcheck ENV --slot SLOT --format json|table`, as on-call types it."""
    # the command itself, not runbook.health (found by review: a broken command passed); a
    # process of its own, as typed: in this one, the CLI's per-process set-up (the state
    # file's kept copy) outlived the step and changed later tests in the same worker
    fmt = "json" if form == "JSON" else "table"
    argv = [sys.executable, "-m", "runbook.cli", "healthcheck",
            *shlex.split(command_arg(world.env)), "--slot", slot, "--format", fmt]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60,
                          stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "100"})
    world.notes["health slot"] = slot
    world.notes["healthcheck"] = (done.returncode, done.stdout, done.stderr)


@when("I ask each slot's own port for its health")
def ask_each_port(world: World) -> None:
    env = world.env
    world.notes["health reports"] = [
        health.probe(env.slot(slot), env.health.path, env.health.request_timeout)
        for slot in Slot]


# -- locks -------------------------------------------------------------------------------------


@when("another on-call holds the deploy lock")
def another_on_call_holds_the_lock(world: World) -> None:
    world.drill()
    world.notes["foreign lock"] = locks.acquire(world.env, reason="another on-call's deploy")


@when("the other on-call releases the deploy lock")
def the_other_on_call_releases(world: World) -> None:
    world.drill()
    held = world.notes.pop("foreign lock")
    assert locks.release(world.env, held)


# -- fixing what the drill broke ------------------------------------------------------------


@when("I start Caddy again")
def start_caddy_again(world: World) -> None:
    stack = world.drill()
    if world.would("start Caddy", f"docker start {stack.caddy_container}"):
        return
    stack.docker("start", stack.caddy_container)
    stack.wait_caddy()


@when("I roll back the migrations to the schema the previous deployment ran with")
def roll_back_the_migrations(world: World) -> None:
    """golang-migrate style: run each newer migration's .down.sql, newest first, shipped in
    the image that applied it (the live slot's), and record the version it leaves."""
    stack = world.drill()
    env = world.env
    previous = world.state().previous
    assert previous is not None and previous.migration_version is not None
    target = previous.migration_version
    live = world.live_slot()
    assert live is not None
    container = env.slot(live).container
    schema = database.schema_version(env).version
    if world.would("roll back the migrations",
                   f"run the .down.sql of migrations {schema}..{target + 1} shipped in "
                   f"{container}, newest first, and record schema version {target}"):
        return
    # the drill's own connection: on a docker-network-db shape the runbook's goes through
    # psql in the database container, one statement batch at a time, with no transaction
    with stack.connect() as conn:
        for version in range(schema, target, -1):
            code, sql = docker.exec_run(container, [
                "sh", "-c", f"cat /app/migrations/{version:06d}_*.down.sql"])
            assert code == 0, f"no down migration {version} in {container}: {sql}"
            with conn.transaction():
                conn.execute(sql)
                conn.execute("DELETE FROM schema_migrations")
                if version - 1 > 0:
                    conn.execute("INSERT INTO schema_migrations VALUES (%s, false)",
                                 (version - 1,))
    assert database.schema_version(env).version == target
    world.notes["migrations rolled back"] = f"{schema} -> {target}"


# -- help --------------------------------------------------------------------------------------


@when("I ask every command for its help")
def ask_every_command_for_help(world: World) -> None:
    from typer.main import get_command
    from typer.testing import CliRunner

    from runbook.cli import app

    group = get_command(app)
    names = ["runbook", *group.commands]  # type: ignore[attr-defined]
    runner = CliRunner()
    helps = {}
    for name in names:
        args = ["--help"] if name == "runbook" else [name, "--help"]
        result = runner.invoke(app, args, terminal_width=100)
        helps[name] = (result.exit_code, result.output)
    world.notes["help"] = helps


ask_every_command_for_help.stackless = True  # type: ignore[attr-defined]  # no scene needed
