"""Drill host shapes (issue 10): hosts the default drill does not look like.

One stack with every trait at once (Caddy in a container at /etc/caddy reloaded by
`docker exec ... caddy reload`, the database only on Docker's network, /health without
`slot`/`git_commit`, slots made with `docker run` and no compose file). The features run
against each shape through `--shape` (Makefile `test`); these are the targeted checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import psycopg
import pytest

from runbook import database, docker, rollback, snapshots
from runbook.drill import http as drill_http
from runbook.drill import scenes
from runbook.drill.stack import DrillStack, parse_shape
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot
from runbook.errors import ExitCode, RunbookError
from tests.drill_checks import snapshot

# one xdist worker runs this module (make test: --dist loadgroup): its module fixture once
pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("shapes")]
SHAPE = "container-caddy,caddy-reload,docker-network-db,minimal-health,docker-run"


@pytest.fixture(scope="module")
def shaped() -> Iterator[DrillStack]:
    with DrillStack(shape=SHAPE) as stack:
        yield stack


@pytest.fixture
def stack(shaped: DrillStack) -> DrillStack:
    """The module's stack as the last test left it: each test arranges its scene first."""
    return shaped


def deployed_twice(stack: DrillStack) -> Environment:
    """v1 -> v2 -> v3 the docker-run way (the host's own script): v3 live on blue, v2 stopped
    on green."""
    stack.reset()
    stack.deploy_docker_run(VERSIONS["v2"])
    stack.deploy_docker_run(VERSIONS["v3"])
    return stack.env


def previous_exists(stack: DrillStack) -> Environment:
    """What deployed_twice leaves, arranged as a drill scene (proved from what runs)."""
    stack.arrange(scenes.PREVIOUS)
    return stack.env


def test_an_unknown_shape_trait_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(RunbookError) as err:
        parse_shape("container-caddy,podman")
    assert "'podman'" in str(err.value) and "docker-run" in str(err.value)
    assert parse_shape("default") == frozenset()


def test_the_shape_is_what_the_host_would_be(stack: DrillStack) -> None:
    stack.reset()
    env = stack.env
    assert env.compose.file is None and all(env.slot(s).service is None for s in Slot)
    assert env.caddy.container_path == "/etc/caddy/Caddyfile"
    assert not str(env.caddy.caddyfile).startswith("/etc/caddy")
    labels = docker.client().containers.get(env.slot(Slot.BLUE).container).labels
    assert not any(k.startswith("com.docker.compose") for k in labels)  # plain docker run
    assert "@togather-db:" in env.database.url()  # the app's URL, nothing else
    with drill_http.client(timeout=3) as client:
        body = client.get(f"{env.slot(Slot.BLUE).base_url}/health").json()
    assert body["status"] == "healthy" and "slot" not in body and "git_commit" not in body


def test_schema_and_snapshots_go_through_the_database_container(
        stack: DrillStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """No host connection at all: psycopg.connect would fail the test if called."""
    def no_host_connection(*args: object, **kwargs: object) -> None:
        raise AssertionError("a host connection was attempted")

    stack.reset()
    monkeypatch.setattr(psycopg, "connect", no_host_connection)
    env = stack.env
    assert database.via_container(env)
    assert database.schema_version(env) == database.SchemaVersion(1, False)
    snap = snapshots.create(env, reason="shape-test")
    assert snap.migration_version == 1 and snap.path.is_file()
    assert "container" in database.access_description(env)


def test_a_container_connection_error_is_one_line_without_the_password(
        stack: DrillStack, monkeypatch: pytest.MonkeyPatch) -> None:
    stack.reset()
    url = stack.env.database.url()
    wrong = url.replace(database.password_of(url), "Wr0ng-pass", 1)
    env_file = stack.env.database.env_file
    assert env_file is not None
    kept = env_file.read_bytes()
    # in the env file the runbook reads (an exported DATABASE_URL unlike it is refused)
    env_file.write_bytes(kept.replace(url.encode(), wrong.encode()))
    try:
        with pytest.raises(RunbookError) as err:
            database.schema_version(stack.env)
    finally:
        env_file.write_bytes(kept)
    text = str(err.value)
    assert err.value.exit_code == ExitCode.PRECONDITION and "\n" not in text.strip()
    assert "password authentication failed" in text
    assert stack.password not in text and "Wr0ng-pass" not in text


def test_dry_run_shows_each_preflight_result(stack: DrillStack) -> None:
    env = previous_exists(stack)
    before = snapshot(env)
    result = rollback.rollback(env, dry_run=True)
    text = result.plan.render()
    assert "the new Caddyfile validates" in text
    assert "caddy reload --config /etc/caddy/Caddyfile" in text
    assert "psql inside container" in text
    assert snapshot(env) == before


@pytest.mark.parametrize("command", [
    ("no-such-caddy-binary",),
    ("docker", "exec", "{caddy}", "no-such-caddy-binary"),
])
def test_a_reload_command_naming_a_missing_binary_is_refused_before_anything_changes(
        stack: DrillStack, command: tuple[str, ...]) -> None:
    env = previous_exists(stack)
    argv = tuple(part.format(caddy=stack.caddy_container) for part in command)
    broken = env.with_(caddy=dataclasses.replace(env.caddy, command=argv))
    before = snapshot(env)
    assert not docker.inspect(env.slot(Slot.GREEN).container).running
    with pytest.raises(RunbookError) as err:
        rollback.rollback(broken)
    assert err.value.exit_code == ExitCode.PRECONDITION
    assert "pre-flight" in str(err.value) and "no-such-caddy-binary" in str(err.value)
    assert snapshot(env) == before  # the standby was never started


def test_a_wrong_container_path_is_refused_in_preflight(stack: DrillStack) -> None:
    env = previous_exists(stack)
    broken = env.with_(caddy=dataclasses.replace(env.caddy,
                                                 container_path="/srv/nowhere/Caddyfile"))
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(broken)
    assert err.value.exit_code == ExitCode.PRECONDITION and "pre-flight" in str(err.value)
    assert "/srv/nowhere" in str(err.value)
    assert snapshot(env) == before


def test_the_rollback_starts_the_stopped_docker_run_slot(stack: DrillStack) -> None:
    env = deployed_twice(stack)
    rollback.rollback(env)  # raises on any failure
    with drill_http.client(timeout=3) as client:
        answer = client.get(f"{env.caddy.proxy_url}/version")
    assert answer.headers["X-Togather-Slot"] == "green"
    assert answer.json()["version"] == VERSIONS["v2"].tag
    assert (env.caddy.caddyfile.parent / "Caddyfile").read_text().count('"green"') == 2


def test_a_removed_docker_run_slot_is_a_precondition_naming_what_to_run(
        stack: DrillStack) -> None:
    env = previous_exists(stack)
    stack.docker("rm", "-f", env.slot(Slot.GREEN).container)
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env)
    assert err.value.exit_code == ExitCode.PRECONDITION
    assert "docker run" in str(err.value) and env.slot(Slot.GREEN).container in str(err.value)
    assert snapshot(env) == before
