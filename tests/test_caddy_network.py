"""Whether Caddy's loopback is this host's, read from Docker for a Caddy that
`docker compose exec SERVICE caddy` runs: the first version of the loopback-upstream check
knew only `docker exec NAME` and refused every compose-run Caddy's loopback upstream, a
host-networked one too (found by review of that change)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from runbook import caddy_command, preflight, slots
from runbook.environment import Environment, from_mapping
from runbook.errors import ExitCode, RunbookError
from tests.drill_checks import closed_port

pytestmark = pytest.mark.any_shape


def test_compose_exec_service_is_read_past_compose_and_exec_options() -> None:
    read = caddy_command.compose_exec_service
    assert read(("docker", "compose", "exec", "caddy", "caddy")) == (None, "caddy")
    assert read(("sudo", "docker", "compose", "-f", "/srv/c.yml", "-p", "edge", "exec", "-T",
                 "-u", "root", "web-caddy", "caddy")) == ("edge", "web-caddy")
    assert read(("docker", "compose", "--project-name=edge", "exec", "--index", "1", "caddy",
                 "caddy")) == ("edge", "caddy")
    # Compose v1's own binary, as `docker compose` (found by review: read as Caddy on the host)
    assert read(("docker-compose", "-p", "edge", "exec", "-T", "caddy", "caddy")) == (
        "edge", "caddy")
    assert read(("sudo", "/usr/local/bin/docker-compose", "exec", "web", "caddy")) == (
        None, "web")
    assert read(("docker", "compose", "run", "caddy", "caddy")) is None
    assert read(("docker", "exec", "caddy", "caddy")) is None
    assert read(("caddy",)) is None


@pytest.fixture
def compose_caddies() -> Iterator[tuple[str, str]]:
    """Two running containers labelled as Compose makes them, one service on the host's
    network and one on Docker's bridge: (project, run id)."""
    run = uuid.uuid4().hex[:8]
    project = f"test-net-{run}"
    made = []
    for service, network in (("hostnet", "host"), ("bridged", "bridge")):
        name = f"{project}-{service}-1"
        subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "--network", network,
                        "--label", f"com.docker.compose.project={project}",
                        "--label", f"com.docker.compose.service={service}-{run}",
                        "togather-drill-caddy:2", "sleep", "120"],
                       check=True, capture_output=True)
        made.append(name)
    try:
        yield project, run
    finally:
        subprocess.run(["docker", "rm", "-f", *made], capture_output=True)


def _env(command: list[str]) -> Environment:
    return from_mapping({
        "name": "staging",
        "slots": {"blue": {"container": "togather-server-blue", "service": "togather-blue",
                           "port": closed_port()},
                  "green": {"container": "togather-server-green", "service": "togather-green",
                            "port": closed_port()}},
        "caddy": {"command": command},
    }, Path("/tmp/test-env.toml"))


def test_a_compose_run_caddy_on_the_hosts_network_shares_its_loopback(
        compose_caddies: tuple[str, str]) -> None:
    project, run = compose_caddies
    on_host = _env(["docker", "compose", "-p", project, "exec", f"hostnet-{run}", "caddy"])
    assert slots._caddy_off_host_network(on_host) is None
    bridged = slots._caddy_off_host_network(
        _env(["docker", "compose", "-p", project, "exec", f"bridged-{run}", "caddy"]))
    assert bridged is not None and bridged[1], bridged
    assert "bridge" in bridged[0] and f"{project}-bridged-1" in bridged[0], bridged
    # a service with no running container: not known, so it fails closed
    missing = slots._caddy_off_host_network(
        _env(["docker", "compose", "-p", project, "exec", f"nothere-{run}", "caddy"]))
    assert missing is not None and not missing[1], missing


def test_a_docker_compose_v1_run_caddy_is_read_as_compose_v2s(
        compose_caddies: tuple[str, str]) -> None:
    """`docker-compose exec SERVICE caddy` (Compose v1, still on hosts) was not read as a
    container at all: a Caddy on Docker's bridge passed as one on this host, its loopback
    upstream as the slot (found by review). Its container is found by Compose's labels, as
    for `docker compose exec`; a `caddy reload` through it runs in Caddy's container."""
    project, run = compose_caddies
    on_host = _env(["docker-compose", "-p", project, "exec", "-T", f"hostnet-{run}", "caddy"])
    assert slots._caddy_off_host_network(on_host) is None
    bridged = slots._caddy_off_host_network(
        _env(["docker-compose", "-p", project, "exec", "-T", f"bridged-{run}", "caddy"]))
    assert bridged is not None and bridged[1], bridged
    assert "bridge" in bridged[0] and f"{project}-bridged-1" in bridged[0], bridged
    assert caddy_command.execs_in_caddys_container(on_host.caddy.command)


@pytest.fixture
def docker_caddy_on_host_network() -> Iterator[str]:
    """A running Docker container on the host's network: the name a podman command names."""
    name = f"test-net-podman-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "--network", "host",
                    "togather-drill-caddy:2", "sleep", "120"], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def test_a_podman_run_caddy_fails_closed_never_read_from_dockers_container_of_its_name(
        docker_caddy_on_host_network: str) -> None:
    """podman keeps its containers apart from Docker's engine, the one the runbook inspects
    (`podman exec` never reads DOCKER_HOST, and a rootless podman has a store per user), so
    the container a podman command runs Caddy in cannot be read through Docker: `podman exec
    NAME` was read as Docker's container NAME (here one on the host's network: a loopback
    upstream passed as the slot, the mount check passed on its mounts), and
    `podman-compose exec` as a Caddy on this host. Both fail closed: the loopback check
    does not know the network, and pre-flight refuses, exit 4, naming podman and the fix."""
    name = docker_caddy_on_host_network
    for command in (["podman", "exec", name, "caddy"],
                    ["sudo", "podman", "compose", "exec", name, "caddy"],
                    ["podman-compose", "-p", "edge", "exec", name, "caddy"]):
        env = _env(command)
        off = slots._caddy_off_host_network(env)
        assert off is not None and not off[1] and "podman" in off[0], (command, off)
        with pytest.raises(RunbookError) as err:
            preflight.caddyfile_mount(env)
        said = err.value
        assert said.exit_code == ExitCode.PRECONDITION, (command, said)
        assert "podman" in said.message and "nothing was changed" in said.message, said.message
        assert "\n" not in said.message and "docker exec" in (said.fix or ""), said.fix


def test_a_caddy_sharing_a_host_networked_containers_network_shares_its_loopback() -> None:
    """`--network container:NAME` (compose `network_mode: service:x`): Docker reports
    `container:<id>`, which is the host's network when that container's is (found by review:
    refused as "not the host's")."""
    run = uuid.uuid4().hex[:8]
    owner, caddy, bridged_owner, caddy2 = (f"test-net-{k}-{run}" for k in (
        "owner", "caddy", "bowner", "caddy2"))
    try:
        for name, network in ((owner, "host"), (caddy, f"container:{owner}"),
                              (bridged_owner, "bridge"), (caddy2, f"container:{bridged_owner}")):
            subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "--network", network,
                            "togather-drill-caddy:2", "sleep", "120"],
                           check=True, capture_output=True)
        assert slots._caddy_off_host_network(_env(["docker", "exec", caddy, "caddy"])) is None
        off = slots._caddy_off_host_network(_env(["docker", "exec", caddy2, "caddy"]))
        assert off is not None and off[1] and "bridge" in off[0], off
    finally:
        subprocess.run(["docker", "rm", "-f", caddy, caddy2, owner, bridged_owner],
                       capture_output=True)
