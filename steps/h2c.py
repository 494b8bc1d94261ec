"""A load balancer keeping HTTP/2 connections to a Caddy that takes cleartext HTTP/2 (h2c):
Caddy never moves those connections to a new config (golang/go#26682), so after a switch
they still reach the old slot, which the rollback therefore leaves running for them.

The oracle is what runs: the load balancer's own connection (the same client port) and its
answers, Docker's view of the old container, and `runbook status`."""

from __future__ import annotations

import httpx
from pytest_bdd import given, then, when

from runbook import docker, files, status
from runbook.drill import http as drill_http
from runbook.environment import Slot
from runbook.run import WARNING
from steps.world import World

LB = "load balancer"  # world.notes key: its client and what it saw before the rollback
H2C_DRAIN_TIMEOUT = 1.0  # seconds: the drill's old-slot drain (a host waits 10 s by default)


def _answer(client: httpx.Client, world: World) -> tuple[int, str, str | None, str | None]:
    """(the client's own port: the same connection, HTTP version, slot, version); a non-2xx
    answer (the load balancer cut off: 502) fails the step."""
    return drill_http.version_on(client, world.env.caddy.proxy_url)


@given("Caddy also takes cleartext HTTP/2 from a load balancer that keeps its connections open")
def caddy_takes_h2c(world: World) -> None:
    """The site's Caddyfile with `servers { protocols h1 h2c }`, loaded; the next scenario's
    arrangement loads the drill's own again."""
    stack = world.drill()
    live = world.live_slot()
    assert live is not None, "no slot takes traffic before the rollback"
    text = stack.caddyfile_text(live, h2c=True)
    files.atomic_write(world.env.caddy.caddyfile, text.encode())
    drill_http.post(f"{world.env.caddy.admin_url}/load", content=text.encode(),
                    headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()


@given("the old slot's stop waits at most 1 second for Caddy's previous config")
def short_drain(world: World) -> None:
    world.drill()
    world.env = world.env.with_(drain_timeout=H2C_DRAIN_TIMEOUT)


@given("the load balancer holds a connection opened before the rollback")
def load_balancer_connection(world: World) -> None:
    world.drill()
    client = world.closing.enter_context(drill_http.held_h2c_client())
    before = _answer(client, world)
    assert before[1] == "HTTP/2", before
    world.notes[LB] = (client, before)


@then("the load balancer's connection is still answered by the old slot, not cut")
def still_answered_by_the_old_slot(world: World) -> None:
    world.succeeded()
    client, before = world.notes[LB]
    assert _answer(client, world) == before  # same connection, same slot, same version
    assert world.live_slot() == Slot(before[2]).other  # a fresh connection: the other slot


def _old_container(world: World) -> str:
    _, before = world.notes[LB]
    return world.env.slot(Slot(before[2])).container


@then("the old slot was left running, and the rollback said how to stop it")
def old_slot_left_running(world: World) -> None:
    result = world.succeeded()
    container = _old_container(world)
    assert docker.inspect(container).running
    stop = next(o for o in result.outcomes if o.name == "stop-old-slot")
    assert (stop.status, stop.result) == ("ok", "left running")
    said = [n for n in result.notices if "left running" in n and not n.startswith(WARNING)]
    assert said and f"docker stop {container}" in said[0] and "restart Caddy" in said[0], \
        result.notices


def _held_problems(world: World) -> list[str]:
    container = _old_container(world)
    return [p["problem"] for p in status.gather(world.env)["problems"]
            if "left running" in p["problem"] and container in p["problem"]]


@then("the status names the old slot as left running for those connections")
def status_names_the_held_slot(world: World) -> None:
    world.outcome()
    assert _held_problems(world), "runbook status does not name the slot left running"


@when("the load balancer closes its connection and I stop the old slot as advised")
def stop_as_advised(world: World) -> None:
    if world.would("docker stop", "close the load balancer's connection, then `docker stop`"):
        return
    client, _ = world.notes[LB]
    client.close()
    docker.stop(_old_container(world))


@then("the status no longer names it")
def status_no_longer_names_it(world: World) -> None:
    world.outcome()
    assert not docker.inspect(_old_container(world)).running
    assert not _held_problems(world)
