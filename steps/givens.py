"""Givens: on a drill they ARRANGE the situation; on a real host they only CHECK it.

One step function per phrase: `world.on_drill` decides. A real host whose situation does not
match fails with the runbook's own advice, and is never changed by a Given.
"""

from __future__ import annotations

import dataclasses
import socket

from pytest_bdd import given

from runbook import caddy, database, deploy
from runbook import state as states
from runbook.drill import http as drill_http
from runbook.drill import scenes
from runbook.drill.versions import VERSIONS
from runbook.errors import RunbookError
from runbook.rollback import no_previous_fix
from steps.world import World, through_proxy

# A broken build must fail the health gate quickly on a drill (a healthy slot passes in <1 s),
# but only after the gate saw its 503, to name the failing check: its container, started by
# the rollback, took more than 2.5 s to answer on a machine at load 35 (measured), and more
# than 4 s once in a CI run of `make test` (the gate ended on Docker's port proxy), so 8 s.
BROKEN_BUILD_HEALTH_TIMEOUT = 8.0


def arrange_deploys(world: World, *names: str, force: bool = False) -> None:
    """Deploy drill versions through the runbook library, exactly as an operator would (on a
    docker-run host, which has no compose, the way its own deploy script does)."""
    stack = world.stack
    if stack is not None and stack.has("docker-run"):
        for name in names:
            stack.deploy_docker_run(VERSIONS[name])
        return
    for name in names:
        deploy.deploy(world.env, deploy.Options(version=VERSIONS[name].tag, force=force,
                                                reason=f"drill: arrange {name}"))


def recorded_state(world: World) -> states.DeploymentState:
    try:
        return world.state()
    except RunbookError as exc:
        world.check(False, f"cannot read the deployment state: {exc}")
        raise  # unreachable: check() failed the step


@given("a deployment is live")
def a_deployment_is_live(world: World) -> None:
    if world.on_drill:  # the baseline: v1 live on blue (schema 1), green running v1 as well
        world.arrange(scenes.baseline(world.drill_base()))
        return
    st = recorded_state(world)
    world.check(st.current is not None,
                "no deployment is recorded; " + no_previous_fix(world.env))


@given("a previous deployment exists")
def a_previous_deployment_exists(world: World) -> None:
    if world.on_drill:
        # v1 -> v2 -> v3: v3 is live on blue, v2 (same schema) is the previous deployment
        world.arrange(scenes.PREVIOUS)
        return
    st = recorded_state(world)
    world.check(st.previous is not None,
                "No previous deployment found: " + no_previous_fix(world.env))


@given("no previous deployment is recorded")
def no_previous_deployment(world: World) -> None:
    if world.on_drill:  # the baseline is a first deployment: nothing before it
        world.arrange(scenes.baseline(world.drill_base()))
        return
    st = recorded_state(world)
    world.check(st.previous is None,
                f"a previous deployment is recorded ({st.previous.version if st.previous else ''})"
                "; this case needs a first deployment or a cleared state")


@given("migrations ran after the previous deployment")
def migrations_ran_after_previous(world: World) -> None:
    if world.on_drill:  # v1 ran with schema 1; v2 migrated to 2 (after its snapshot)
        if world.scene is None:
            world.arrange(scenes.MIGRATED)
        else:  # on top of what the Givens before did (e.g. data recorded): a real deploy
            arrange_deploys(world, "v2")
        return
    st = recorded_state(world)
    world.check(st.previous is not None,
                "No previous deployment found: " + no_previous_fix(world.env))
    assert st.previous is not None
    schema = database.schema_version(world.env).version
    recorded = st.previous.migration_version
    world.check(recorded is not None and schema > recorded,
                f"the database schema is {schema} and the previous deployment ran with "
                f"{recorded}: no migration ran after it")


@given("a previous deployment exists whose build is broken")
def previous_build_is_broken(world: World) -> None:
    """v1, a broken build forced live on green, v2 deployed over it on blue: the previous
    deployment is the broken build, kept stopped on green, so a rollback starts it."""
    world.arrange(scenes.BROKEN_PREVIOUS)  # fails on a real host
    world.env = world.env.with_(health=dataclasses.replace(
        world.env.health, timeout=BROKEN_BUILD_HEALTH_TIMEOUT))


@given("a previous deployment exists that cannot reach the database")
def previous_cannot_reach_database(world: World) -> None:
    """PREVIOUS (v3 serving from blue, v2 stopped on green), then v2's container taken off
    the database's Docker network: started by the rollback, it answers, but its database
    check fails, while the database answers the runbook and blue. Its /health is watched by a
    plain client meanwhile (the Thens' oracle); both undone when the scenario ends."""
    world.arrange(scenes.PREVIOUS)  # fails on a real host
    stack = world.drill()
    previous = scenes.PREVIOUS.live.other
    world.closing.enter_context(stack.off_the_database_network(previous))
    url = f"{world.env.slot(previous).base_url}{world.env.health.path}"
    world.notes["previous slot's health"] = world.closing.enter_context(drill_http.watched(url))
    # the gate must fail soon, yet only after it has seen the failing check (as above)
    world.env = world.env.with_(health=dataclasses.replace(
        world.env.health, timeout=BROKEN_BUILD_HEALTH_TIMEOUT))


@given("a broken version went live after a migration")
def broken_version_live(world: World) -> None:
    """Forced past the health gate, it migrated to schema 2 and answers 503 on green."""
    world.arrange(scenes.BROKEN_LIVE)


@given("the live slot has crashed, so users get errors")
def live_slot_crashed(world: World) -> None:
    """The outage of the guide's "rollback fails and the service is down": on a drill the
    live slot's container is killed (Caddy still sends users to it: 502); on a real host it
    is only checked that the proxy answers with an error."""
    if world.on_drill:
        stack = world.drill()
        live = world.routed_slot()
        assert live is not None, "no slot takes traffic to crash"
        stack.docker("kill", world.env.slot(live).container)
    code, _, _ = through_proxy(world.env)
    world.check(code == 0 or code >= 500,
                f"the proxy answers HTTP {code}: the service is not down, roll back instead")


@given("Caddy is not running")
def caddy_is_not_running(world: World) -> None:
    if world.on_drill:
        stack = world.drill()
        stack.docker("stop", "-t", "2", stack.caddy_container)
        return
    world.check(not caddy.is_running(world.env), "Caddy is running: nothing to fix here")


def dead_loopback_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@given("the Caddyfile sends traffic to a port where no slot listens")
def caddyfile_wrong_port(world: World) -> None:
    if not world.on_drill:
        inspection = caddy.inspect(caddy.read(world.env), world.env)
        world.check(any("no slot's port" in p for p in inspection.problems),
                    "the Caddyfile's managed block targets a slot's port: nothing to fix here")
        return
    world.drill()
    env = world.env
    text = caddy.read(env)
    start, end = caddy.find_block(text)
    dead = dead_loopback_port()
    block = text[start:end]
    for config in env.slots.values():
        block = block.replace(f"localhost:{config.port}", f"localhost:{dead}")
    broken = text[:start] + block + text[end:]
    assert broken != text
    env.caddy.caddyfile.write_text(broken)
    drill_http.post(f"{env.caddy.admin_url}/load", content=broken,
                    headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()
    world.notes["dead port"] = dead


def post_item(world: World, name: str) -> None:
    response = drill_http.post(f"{world.env.caddy.proxy_url}/items", json={"name": name},
                               timeout=5, headers={"Connection": "close"})
    assert response.status_code == 201, response.text


@given("customer data was recorded before the migration")
def data_before_migration(world: World) -> None:
    world.drill()
    names = ["before-migration-1", "before-migration-2"]
    for name in names:
        post_item(world, name)
    world.notes["kept items"] = names


@given("orders were taken after the migration")
def orders_after_migration(world: World) -> None:
    stack = world.drill()
    names = ["after-migration-1"]
    for name in names:
        post_item(world, name)
    with stack.connect() as conn:
        conn.execute("INSERT INTO orders (item_id, quantity) "
                     "SELECT id, 3 FROM items WHERE name = %s", (names[0],))
    world.notes["lost items"] = names
