"""Addresses: the one Caddy dials after a switch, and the one verification asks through.

A slot published on its own address (127.0.0.2, [slots.<slot>] host saying so) passes its
health gate, but the switch keeps the upstream's host (localhost) and only changes the port:
it must be refused before anything moves. A proxy_url naming an address Caddy does not listen
on must be refused too (every switch failed its verification, and its undo's, exit 5), and
status must say so instead of "users are not served".
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from runbook import docker, health, rollback, status, switch, traffic
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.environment import Environment, Slot
from runbook.errors import ExitCode, RunbookError
from tests.drill_checks import snapshot, through_proxy

pytestmark = pytest.mark.xdist_group("addresses")


@pytest.fixture(scope="module")
def stack() -> Iterator[DrillStack]:
    with DrillStack(shape="docker-run") as s:
        yield s


def republish(stack: DrillStack, slot: Slot, address: str) -> Environment:
    """Recreate `slot`'s container from its own image, published on `address` only, and
    return the environment whose [slots.<slot>] host says so."""
    config = stack.env.slot(slot)
    image = docker.inspect(config.container).image
    assert image is not None
    subprocess.run(["docker", "rm", "-f", config.container], check=True, capture_output=True)
    argv = stack.docker_run_argv(slot, image)
    argv[argv.index(f"127.0.0.1:{config.port}:8080")] = f"{address}:{config.port}:8080"
    subprocess.run(argv, check=True, capture_output=True,
                   env={**os.environ, "DATABASE_URL": stack.app_database_url})
    moved = dataclasses.replace(config, host=address)
    deadline = time.monotonic() + 30
    while not health.probe(moved, "/health").ok:
        assert time.monotonic() < deadline, "the republished slot never became healthy"
        time.sleep(0.2)
    return stack.env.with_(slots={**stack.env.slots, slot: moved})


def test_a_target_published_where_the_upstream_does_not_dial_is_refused_before_anything_moves(
        stack: DrillStack) -> None:
    stack.arrange(scenes.PREVIOUS_RUNNING)  # blue v3 serves, green v2 running
    env = republish(stack, Slot.GREEN, "127.0.0.2")
    port = env.slot(Slot.GREEN).port
    try:
        before = snapshot(env)
        for run in (lambda: switch.switch(env, switch.Options(slot=Slot.GREEN), dry_run=True),
                    lambda: switch.switch(env, switch.Options(slot=Slot.GREEN)),
                    lambda: rollback.rollback(env, dry_run=True),
                    lambda: rollback.rollback(env)):
            with pytest.raises(RunbookError) as err:
                run()
            said = str(err.value)
            assert err.value.exit_code == ExitCode.PRECONDITION, said
            assert f"upstream localhost:{port}" in said, said
            assert "[slots.green] host is 127.0.0.2" in said, said
            assert "nothing was changed" in said, said
            assert snapshot(env) == before
        assert through_proxy(env)[0] == "blue"
        said = " ".join(p.problem for p in status.problems(status.collect(env)))
        assert f"upstream localhost:{port}" in said and "127.0.0.2" in said, said
        # green stopped: the plan cannot ask it, but Docker says where it is published
        subprocess.run(["docker", "stop", env.slot(Slot.GREEN).container], check=True,
                       capture_output=True)
        before = snapshot(env)
        for run in (lambda: rollback.rollback(env, dry_run=True),
                    lambda: rollback.rollback(env)):
            with pytest.raises(RunbookError) as err:
                run()
            said = str(err.value)
            assert err.value.exit_code == ExitCode.PRECONDITION, said
            assert f"upstream localhost:{port}" in said, said
            assert f"published on 127.0.0.2:{port} only" in said, said
            assert snapshot(env) == before
    finally:  # the scene's own container again (arrange recreates a missing one)
        subprocess.run(["docker", "rm", "-f", env.slot(Slot.GREEN).container],
                       check=True, capture_output=True)
        stack.arrange(scenes.PREVIOUS_RUNNING)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_proxy_url_caddy_does_not_listen_on_is_refused_and_status_names_it(
        stack: DrillStack) -> None:
    stack.arrange(scenes.PREVIOUS_RUNNING)
    elsewhere = f"http://127.0.0.1:{free_port()}"
    env = stack.env.with_(caddy=dataclasses.replace(stack.env.caddy, proxy_url=elsewhere))
    before = snapshot(stack.env)
    for run in (lambda: switch.switch(env, switch.Options(slot=Slot.GREEN), dry_run=True),
                lambda: switch.switch(env, switch.Options(slot=Slot.GREEN)),
                lambda: rollback.rollback(env)):
        with pytest.raises(RunbookError) as err:
            run()
        said = str(err.value)
        assert err.value.exit_code == ExitCode.PRECONDITION, said
        assert f"proxy_url {elsewhere}" in said and "[caddy] proxy_url" in said, said
        assert f":{stack.ports.proxy}" in said, said  # where Caddy's site listens
        assert snapshot(stack.env) == before
    text = " ".join(p.problem for p in status.problems(status.collect(env)))
    assert "users are not served" not in text, text
    assert f"proxy_url {elsewhere}" in text, text


def test_a_refused_proxy_url_caddy_does_listen_on_is_an_outage_not_a_wrong_url(
        stack: DrillStack) -> None:
    """Only an address or port Caddy's loaded config does not listen on is refused: a
    proxy_url Caddy listens at that refuses is an outage to roll back from (the serving slot
    healthy, the same read of Caddy otherwise)."""
    stack.arrange(scenes.PREVIOUS_RUNNING)
    env, proxy = stack.env, stack.ports.proxy
    refused = dataclasses.replace(traffic.read(env),
                                  proxy_error=f"{env.caddy.proxy_url}{env.caddy.verify_path}: "
                                              "connection refused")
    for listens in ((f":{proxy}",), (f"127.0.0.1:{proxy}",), (f"tcp/:{proxy - 1}-{proxy}",)):
        assert traffic.proxy_url_missed(env, dataclasses.replace(refused, listens=listens)) \
            is None, listens
    for listens in ((f"127.0.0.2:{proxy}",), (f":{proxy + 1}",)):
        said = traffic.proxy_url_missed(env, dataclasses.replace(refused, listens=listens))
        assert said is not None and listens[0] in said, listens
    served = dataclasses.replace(
        refused, proxy_error=f"{env.caddy.proxy_url}/version answers HTTP 502 without "
        "X-Togather-Slot", listens=(f"127.0.0.2:{proxy}",))
    assert traffic.proxy_url_missed(env, served) is None  # an answer: Caddy is reached
