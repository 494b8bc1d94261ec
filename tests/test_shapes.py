"""Drill host shapes (issue 10): hosts the default drill does not look like.

One stack with every trait at once (Caddy in a container at /etc/caddy reloaded by
`docker exec ... caddy reload`, the database only on Docker's network, /health without
`slot`/`git_commit`, slots made with `docker run` and no compose file). The features run
against each shape through `--shape` (Makefile `test`); these are the targeted checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from runbook import caddy, database, docker, rollback, slots, snapshot_restore, snapshots
from runbook.drill import http as drill_http
from runbook.drill import scenes
from runbook.drill.stack import RUN_LABEL, DrillStack, parse_shape
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, ReloadMethod, Slot
from runbook.errors import ExitCode, RunbookError
from tests.drill_checks import bridge_gateway, closed_ports, snapshot

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
    for dry_run in (True, False):  # the dry run too (it gives Caddy the file on stdin)
        with pytest.raises(RunbookError) as err:
            rollback.rollback(broken, dry_run=dry_run)
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


def as_tooling_made(snap: snapshots.Snapshot, host: str, port: int, deployment_id: str,
                    ) -> snapshots.Snapshot:
    """`snap` as the host's shell tooling leaves its pre-deploy snapshot: pg_dump run on the
    host through a port Docker publishes, its sidecar naming that address (and no
    environment)."""
    meta = {k: v for k, v in (snap.meta or {}).items() if k != "environment"}
    snap.meta_path.write_text(json.dumps(meta | {"host": host, "port": port,
                                                 "reason": "pre-deploy",
                                                 "deployment_id": deployment_id}))
    return snapshots.load(snap.path)


def published_db_port(stack: DrillStack) -> int:
    """The host port the stack's database container publishes for 5432/tcp, read through
    the Docker SDK (not the runbook's adapter, the code under test)."""
    bound = docker.client().containers.get(stack.db_container).ports["5432/tcp"]
    ports = {int(b["HostPort"]) for b in bound}
    assert ports == {stack.ports.postgres}, ports
    return stack.ports.postgres


def test_a_tooling_snapshot_naming_the_databases_published_port_is_ours(
        stack: DrillStack) -> None:
    """The production host (CONTRACTS.md): the runbook's URL is the app's (togather-db:5432,
    Docker's network), the tooling dumps on the host through the published port and writes
    localhost:<that port>. Found by review: every such pre-deploy snapshot counted as another
    server's, so `rollback --restore-snapshot` found none and naming one was refused."""
    stack.reset()
    env = stack.env
    assert "@togather-db:5432/" in env.database.url()
    port = published_db_port(stack)
    for old in env.database.snapshot_dir.glob("togather_*"):
        old.unlink()
    snap = as_tooling_made(snapshots.create(env, "pre-deploy"), "localhost", port, "dep_tool")
    assert [s.name for s in snapshots.own_snapshots(env)] == [snap.name]
    assert snapshots.find(env).name == snap.name
    picked = snapshots.latest_before(env, None, deployment_id="dep_tool")
    assert picked is not None and picked.name == snap.name  # the rollback's pick
    assert snapshots.whose(env, snap) is None
    planned = snapshot_restore.restore(env, snap.name, dry_run=True)
    text = planned.plan.render()
    assert snap.name in text and "togather-db:5432 (matches: its sidecar's " \
        f"localhost:{port} reaches the same server)" in text, text


def test_a_tooling_snapshot_naming_another_loopback_port_is_not_ours(
        stack: DrillStack) -> None:
    """The same host with a second Postgres published on another port (staging's): its
    tooling snapshot of the same database name is never ours, picked, restored or cleaned."""
    stack.reset()
    env = stack.env
    port = published_db_port(stack)
    other = next(p for p in (5433, 5434, 5435) if p != port)
    for old in env.database.snapshot_dir.glob("togather_*"):
        old.unlink()
    snap = as_tooling_made(snapshots.create(env, "pre-deploy"), "localhost", other,
                           "dep_other")
    assert snapshots.own_snapshots(env) == []
    assert snapshots.latest_before(env, None, deployment_id="dep_other") is None
    assert f"localhost:{other}" in (snapshots.whose(env, snap) or "")
    with pytest.raises(RunbookError) as err:
        snapshot_restore.restore(env, snap.name, dry_run=True)
    assert err.value.exit_code == ExitCode.USAGE and f"localhost:{other}" in str(err.value)
    assert "\n" not in err.value.message
    future = datetime.now(UTC) + timedelta(days=400)
    result = snapshots.cleanup(env, now=future)
    assert snap.path.exists() and snap.name in {p.name for p, _ in result.skipped}


def test_a_tooling_snapshot_naming_another_address_of_this_host_on_a_loopback_port_is_not_ours(
        stack: DrillStack) -> None:
    """The database's port is published on 127.0.0.1 only: this host's other addresses on
    that port do not reach it (another server may listen there, e.g. a Postgres bound to the
    host's Docker bridge address). The identity compared the port alone, so a sidecar naming
    <bridge address>:<that port> counted as ours. The address Docker publishes it on is
    compared too, where both sides name one (a sidecar naming no host: the port alone)."""
    stack.reset()
    env = stack.env
    port = published_db_port(stack)
    sdk = docker.client()
    bound = sdk.containers.get(stack.db_container).ports["5432/tcp"]
    assert {b["HostIp"] for b in bound} == {"127.0.0.1"}, bound  # the drill publishes so
    bridge = bridge_gateway()  # this host's
    for old in env.database.snapshot_dir.glob("togather_*"):
        old.unlink()
    snap = as_tooling_made(snapshots.create(env, "pre-deploy"), bridge, port, "dep_other")
    assert snapshots.own_snapshots(env) == []
    assert f"{bridge}:{port}" in (snapshots.whose(env, snap) or "")
    with pytest.raises(RunbookError) as err:
        snapshot_restore.restore(env, snap.name, dry_run=True)
    assert err.value.exit_code == ExitCode.USAGE and f"{bridge}:{port}" in str(err.value)
    assert f"127.0.0.1:{port}" in str(err.value), err.value  # where it is published
    for host in ("127.0.0.1", None):  # loopback, and an older sidecar naming no host
        ours = as_tooling_made(snap, host, port, "dep_tool")  # type: ignore[arg-type]
        assert [s.name for s in snapshots.own_snapshots(env)] == [ours.name], host


def test_a_loopback_snapshot_is_not_judged_ours_when_the_database_container_cannot_be_read(
        stack: DrillStack) -> None:
    """Docker cannot say which host ports reach the database (here: the configured container
    is absent), and the URL names the container: a sidecar naming a loopback port may be
    ours or another server's. Fail closed: not picked, a restore naming it refused saying
    what to fix, never cleaned."""
    stack.reset()
    env = stack.env
    port = published_db_port(stack)
    for old in env.database.snapshot_dir.glob("togather_*"):
        old.unlink()
    snap = as_tooling_made(snapshots.create(env, "pre-deploy"), "localhost", port, "dep_tool")
    blind = env.with_(database=dataclasses.replace(env.database,
                                                   container=f"{stack.prefix}no-such-db"))
    assert snapshots.own_snapshots(blind) == []
    why = snapshots.whose(blind, snap) or ""
    assert f"localhost:{port}" in why and f"{stack.prefix}no-such-db" in why, why
    with pytest.raises(RunbookError) as err:
        snapshot_restore.restore(blind, snap.name, dry_run=True)
    assert err.value.exit_code == ExitCode.PRECONDITION and "\n" not in err.value.message
    assert f"{stack.prefix}no-such-db" in str(err.value.fix), err.value.fix
    result = snapshots.cleanup(blind, now=datetime.now(UTC) + timedelta(days=400))
    assert snap.path.exists() and snap.name in {p.name for p, _ in result.skipped}


# Caddy on a Docker bridge network, as the review built a host by hand: its admin API on
# 0.0.0.0:2019 in there, published on this host under another port. A container never
# reaches this host's 127.0.0.1, where the drill publishes its slots: sites of its own on
# the slots' ports (outside the markers) stand in for this host's network, so the managed
# block dials localhost:<slot port> as on a host.
PUBLISHED_CADDYFILE = """\
{{
\tadmin 0.0.0.0:2019
\tauto_https off
}}

:{blue} {{
\treverse_proxy {blue_container}:8080
}}

:{green} {{
\treverse_proxy {green_container}:8080
}}

:80 {{
\t# BLUE_GREEN_SLOT_START
\treverse_proxy localhost:{blue} {{
\t\theader_down X-Togather-Slot "blue"
\t}}
\t# BLUE_GREEN_SLOT_END
}}
"""


@contextlib.contextmanager
def published_caddy(stack: DrillStack, where: Path) -> Iterator[Environment]:
    """A Caddy container of the drill's image on the stack's bridge network (where its
    docker-run slots are), its site (80) and admin API (2019) published on 127.0.0.1 under
    other ports, its directory `where` mounted at /etc/caddy: the environment reloading it
    with `docker exec NAME caddy reload`. Removed after, whatever happened."""
    image = docker.inspect(stack.caddy_container).image
    assert image is not None
    blue, green = stack.env.slot(Slot.BLUE), stack.env.slot(Slot.GREEN)
    (where / "Caddyfile").write_text(PUBLISHED_CADDYFILE.format(
        blue=blue.port, green=green.port, blue_container=blue.container,
        green_container=green.container))
    admin, proxy = closed_ports(2)
    name = f"{stack.prefix}caddy-published"
    subprocess.run(["docker", "rm", "-f", name], check=False, capture_output=True)
    try:
        subprocess.run(
            ["docker", "run", "-d", "--name", name, "--label", f"{RUN_LABEL}={stack.run_id}",
             "--network", f"{stack.project}_default",
             "--add-host", "host.docker.internal:host-gateway",
             "-p", f"127.0.0.1:{proxy}:80", "-p", f"127.0.0.1:{admin}:2019",
             "-v", f"{where}:/etc/caddy", image,
             "caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"],
            check=True, capture_output=True)
        env = stack.env.with_(caddy=dataclasses.replace(
            stack.env.caddy, caddyfile=where / "Caddyfile", reload=ReloadMethod.CADDY_RELOAD,
            admin_url=f"http://127.0.0.1:{admin}", proxy_url=f"http://127.0.0.1:{proxy}",
            command=("docker", "exec", name, "caddy"),
            container_path="/etc/caddy/Caddyfile"),
            # the stand-in sites dial each slot by its container's name, and the runbook
            # (rightly) stops no slot Caddy's config still dials
            stop_old_slot=False)
        deadline = time.monotonic() + 20
        while proxy_slot(env) != "blue":  # Caddy up, through its published ports
            assert time.monotonic() < deadline, "the published Caddy did not serve blue"
            time.sleep(0.2)
        yield env
    finally:
        subprocess.run(["docker", "rm", "-f", name], check=False, capture_output=True)


def proxy_slot(env: Environment) -> str | None:
    """Which slot answers through the proxy (its X-Togather-Slot), None: no answer."""
    try:
        with drill_http.client(timeout=3) as client:
            answer = client.get(f"{env.caddy.proxy_url}/version")
    except httpx.HTTPError:  # not up yet
        return None
    return answer.headers.get("X-Togather-Slot") if answer.status_code == 200 else None


def test_caddy_reload_in_caddys_container_dials_its_admin_api_as_the_container_sees_it(
        stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: with Caddy in a container whose admin API Docker publishes under
    another port (`admin 0.0.0.0:2019`, `-p 127.0.0.1:<port>:2019`), `caddy reload` run by
    `docker exec` was given [caddy] admin_url's address, this host's: in the container
    nothing listens there, so every real switch failed (connection refused) and was undone,
    while its dry run passed. The address comes from Caddy's running config, as its
    container reaches it: the dry run shows it, the rollback moves traffic (asked through
    the proxy), and a failed reload's fix names the container's log, not journalctl."""
    previous_exists(stack)
    with published_caddy(stack, tmp_path) as env:
        host_view = caddy.admin_address(env)
        before = snapshot(env)
        text = rollback.rollback(env, dry_run=True).plan.render()
        assert "--address 127.0.0.1:2019" in text, text
        assert f"--address {host_view}" not in text, text
        assert "admin 0.0.0.0:2019" in text, text  # where it comes from
        assert snapshot(env) == before
        rollback.rollback(env)  # raises on any failure
        assert proxy_slot(env) == "green"
        with drill_http.client(timeout=3) as client:
            answer = client.get(f"{env.caddy.proxy_url}/version")
        assert answer.json()["version"] == VERSIONS["v2"].tag
        assert env.caddy.caddyfile.read_text().count('"green"') == 1
        broken = caddy.ReloadCommand(ReloadMethod.CADDY_RELOAD, argv=(
            *env.caddy.command, "reload", "--config", "/etc/caddy/no-such-Caddyfile",
            "--adapter", "caddyfile", "--address", "127.0.0.1:2019"))
        with pytest.raises(caddy.CaddyError) as err:
            caddy.reload(env, caddy.read(env), broken)
        assert f"docker logs --tail 100 {env.caddy.command[2]}" in (err.value.fix or "")
        assert "journalctl" not in (err.value.fix or "")


def test_a_site_whose_own_routes_dial_its_port_is_no_relay_for_a_loopback_upstream(
        stack: DrillStack, tmp_path: Path) -> None:
    """A loopback upstream of a Caddy off the host's network is let through only when Caddy
    serves a site of its own on that address (a relay, whose reach the switch's
    verification judges): the stand-in sites above. Never a site whose own routes dial the
    port it listens on: the switch would send every user to a site that sends them back to
    itself (found by review of the relay exemption; untested until now). Caddy's real
    running config, reloaded in its container: with green's site a relay the switch to
    green is not refused; with green's site dialing localhost:<green port> it is."""
    previous_exists(stack)
    green = stack.env.slot(Slot.GREEN)
    with published_caddy(stack, tmp_path) as env:
        switched = caddy.rewrite(env.caddy.caddyfile.read_text(), env, Slot.GREEN)
        assert f"localhost:{green.port}" in switched  # the upstream the check is about
        assert slots.upstream_problem(env, Slot.GREEN, switched, planning=True) is None
        looped = env.caddy.caddyfile.read_text().replace(
            f"reverse_proxy {green.container}:8080", f"reverse_proxy localhost:{green.port}")
        assert looped != env.caddy.caddyfile.read_text()
        env.caddy.caddyfile.write_text(looped)
        subprocess.run([*env.caddy.command, "reload", "--config", "/etc/caddy/Caddyfile",
                        "--adapter", "caddyfile"], check=True, capture_output=True)
        said = slots.upstream_problem(env, Slot.GREEN, caddy.rewrite(looped, env, Slot.GREEN),
                                      planning=True)
        assert said is not None and f"upstream localhost:{green.port}" in said, said
        assert "Caddy's own container" in said, said
