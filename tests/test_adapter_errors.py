"""Every Docker, Compose and database library error reaches the user as one line with the
documented exit code, and the process exit code equals the journal's.

Real failures, not mocks: an invalid image reference in the state file sent to the real
engine, a Docker endpoint nobody listens on, a compose binary that does not exist, a database
port nobody listens on and a wrong database password.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from runbook import compose, database, docker
from runbook import environment as envmod
from runbook import state as states
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.errors import ExitCode, RunbookError
from tests.drill_checks import closed_port, docker_context, serving

pytestmark = pytest.mark.docker
REPO_ROOT = Path(__file__).resolve().parents[1]
V2 = VERSIONS["v2"]



def runbook(*args: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RUNBOOK_CONFIG"} | env_extra
    return subprocess.run([sys.executable, "-m", "runbook.cli", *args], capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL, env=env,
                          check=False, cwd=REPO_ROOT)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("runbook: journal")]
    assert len(lines) == 1 and lines[0].startswith("runbook: error: "), proc.stderr
    return lines[0]


def test_an_invalid_image_reference_in_the_state_file(stack: DrillStack) -> None:
    env = stack.env
    st = states.read_state(env.state_file)
    assert st.current is not None
    previous = states.make_deployment(V2.tag, V2.git_commit, "green", status="superseded",
                                      migration_version=1, image="togather-server:NOT A REF")
    states.write_state(env.state_file, st.with_(previous=previous))
    before = env.state_file.read_bytes()
    proc = runbook("rollback", str(env.source), "--yes")
    line = one_line(proc)
    assert proc.returncode == int(ExitCode.PRECONDITION), proc.stderr
    assert "invalid reference format" in line and "NOT A REF" in line, line
    record = json.loads(max(env.runs_dir.glob("*.json"), key=os.path.getmtime).read_text())
    assert record["exit_code"] == proc.returncode, record
    after = states.read_state(env.state_file)
    assert after.current == st.current and after.previous == previous
    assert before == env.state_file.read_bytes()


def test_a_docker_engine_that_does_not_answer(stack: DrillStack) -> None:
    dead = f"tcp://127.0.0.1:{closed_port()}"
    dry = runbook("switch", str(stack.env.source), "--slot", "green", "--dry-run",
                  DOCKER_HOST=dead)
    assert dry.returncode == int(ExitCode.PRECONDITION), dry.stderr
    assert "Docker engine" in one_line(dry)
    status = runbook("status", str(stack.env.source), DOCKER_HOST=dead)
    assert status.returncode == 1 and "Traceback" not in status.stderr, status.stderr
    assert "cannot inspect the blue container" in status.stdout, status.stdout


def test_a_command_on_an_engine_over_ssh_exits_2(stack: DrillStack) -> None:
    """The CLI's side of the ssh refusal below: one line, exit 2 (configuration)."""
    dry = runbook("switch", str(stack.env.source), "--slot", "green", "--dry-run",
                  DOCKER_HOST="ssh://deploy@127.0.0.1:1")
    line = one_line(dry)
    assert dry.returncode == int(ExitCode.USAGE), dry.stderr
    assert "over ssh" in line and "run the runbook on the host itself" in line, line


@pytest.mark.parametrize(("code", "body"), [(200, b"<html>not an engine</html>"),
                                          (404, b"404 page not found")],
                         ids=["200, not JSON", "404 for everything"])
def test_an_endpoint_that_is_not_a_docker_engine_is_said(
        stack: DrillStack, code: int, body: bytes) -> None:
    """Found by review: DOCKER_HOST at something that is not an engine (a web server, a
    proxy): a 200 that is not JSON was "unexpected failure: JSONDecodeError" (exit 5), and
    a 404 for everything showed both slots as removed. Both name the endpoint now."""
    with serving(code, body, "text/plain") as port:
        where = f"tcp://127.0.0.1:{port}"
        dry = runbook("switch", str(stack.env.source), "--slot", "green", "--dry-run",
                      DOCKER_HOST=where)
        status = runbook("status", str(stack.env.source), "--format", "json",
                         DOCKER_HOST=where)
    line = one_line(dry)
    assert dry.returncode == int(ExitCode.PRECONDITION), dry.stderr
    assert where in line and "is it a Docker engine?" in line, line
    assert "Traceback" not in status.stderr and status.returncode == 1, status.stderr
    assert '"absent"' not in status.stdout, status.stdout  # never "removed" on its word
    assert where in status.stdout, status.stdout


def test_compose_that_cannot_run() -> None:
    command = compose.Command(argv=("/nonexistent/docker", "compose", "ps"))
    with pytest.raises(compose.ComposeError) as raised:
        compose.run(command)
    assert raised.value.exit_code == ExitCode.PRECONDITION
    assert "not installed" in str(raised.value) and "\n" not in str(raised.value)
    slow = compose.Command(argv=(sys.executable, "-c", "import time; time.sleep(5)"))
    with pytest.raises(compose.ComposeError, match=r"did not finish within 0\.5s"):
        compose.run(slow, timeout=0.5)


def test_docker_api_errors_are_runbook_errors(stack: DrillStack) -> None:
    with pytest.raises(docker.DockerError) as raised:
        docker.image_exists("Togather-Server:UPPER CASE")
    assert raised.value.exit_code == ExitCode.PRECONDITION
    assert "\n" not in str(raised.value)
    with pytest.raises(RunbookError):
        docker.image_exists("")
    assert docker.inspect("no-such-container-anywhere").exists is False


def test_database_errors_are_one_line(stack: DrillStack, tmp_path: Path) -> None:
    url = urlsplit(stack.database_url)
    for name, bad_url in {
        "nobody listens": f"postgresql://{url.username}:secretpw1@127.0.0.1:{closed_port()}/x",
        "wrong password": (f"postgresql://{url.username}:wrong-Pa55word@{url.hostname}:"
                           f"{url.port}{url.path}"),
    }.items():
        env_file = tmp_path / f"{name.replace(' ', '-')}.env"
        env_file.write_text(f"DATABASE_URL={bad_url}\n")
        env = stack.env.with_(database=replace(stack.env.database, env_file=env_file))
        with pytest.raises(database.DatabaseError) as raised:
            database.schema_version(env)
        message = str(raised.value)
        assert message.startswith("database unreachable: ") and "\n" not in message, message
        assert "secretpw1" not in message and "wrong-Pa55word" not in message, message
        source = tmp_path / f"{name.replace(' ', '-')}.toml"
        source.write_text(envmod.to_toml(env))
        proc = runbook("snapshot", "create", str(source))
        assert proc.returncode == int(ExitCode.PRECONDITION), proc.stderr
        line = one_line(proc)
        assert "secretpw1" not in line and "wrong-Pa55word" not in line, line


def test_the_engine_is_the_docker_clis_current_context(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`docker context use rootless`: compose and the CLI talk to that engine; the adapter
    read the default socket, so "what runs" came from another engine than the one acted on."""
    from runbook import docker

    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    docker_context(tmp_path, "rootless", "unix:///run/user/1000/docker.sock")
    docker._engine.cache_clear()
    try:
        assert docker._engine() == docker._Engine(unix="/run/user/1000/docker.sock")
        monkeypatch.setenv("DOCKER_CONTEXT", "default")  # the variable wins, as in the CLI
        docker._engine.cache_clear()
        assert docker._engine() == docker._Engine(unix=docker._SOCKET)
        monkeypatch.delenv("DOCKER_CONTEXT")
        other = tmp_path / "tls"
        monkeypatch.setenv("DOCKER_CONFIG", str(other))
        docker_context(other, "remote", "tcp://10.0.0.5:2376", tls=True)
        docker._engine.cache_clear()
        with pytest.raises(docker.DockerError, match="needs TLS or ssh") as info:
            docker.inspect("togather-server-blue")
        assert info.value.exit_code == ExitCode.PRECONDITION
        assert "DOCKER_HOST" in (info.value.fix or "")
    finally:
        docker._engine.cache_clear()


def test_an_engine_over_ssh_is_a_configuration_error_not_a_stopped_engine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: DOCKER_HOST=ssh://... (or a docker context over ssh) failed with
    "cannot reach the Docker engine; start it (systemctl start docker)" (the SDK lacks
    paramiko), advice for an engine that may run fine. The runbook acts on the host it runs
    on (its Caddyfile, state file and slot ports are that host's), so an engine over ssh is
    refused as configuration (exit 2) with the fix: run it on the host itself."""
    monkeypatch.setenv("DOCKER_HOST", "ssh://deploy@127.0.0.1:1")
    monkeypatch.delenv("DOCKER_CONTEXT", raising=False)
    said: list[docker.DockerError] = []
    docker._engine.cache_clear()
    docker.client.cache_clear()  # an earlier test's client (xdist: same worker) is cached
    try:
        for call in (lambda: docker.inspect("togather-server-blue"), docker.client):
            with pytest.raises(docker.DockerError) as info:
                call()
            said.append(info.value)
        monkeypatch.delenv("DOCKER_HOST")
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
        docker_context(tmp_path, "remote", "ssh://deploy@10.0.0.5")
        docker._engine.cache_clear()
        with pytest.raises(docker.DockerError) as info:
            docker.inspect("togather-server-blue")
        said.append(info.value)
    finally:
        docker._engine.cache_clear()
        docker.client.cache_clear()
    for error, where in zip(said, ("DOCKER_HOST=ssh://deploy@127.0.0.1:1",) * 2
                            + ("context 'remote' (ssh://deploy@10.0.0.5)",), strict=True):
        message, fix = str(error), error.fix or ""
        assert error.exit_code == ExitCode.USAGE, (error.exit_code, message)
        assert where in message and "over ssh" in message and "\n" not in message, message
        assert "run the runbook on the host itself" in fix and "start it" not in fix, fix


@pytest.mark.parametrize(("image", "tag"), [
    ("togather-server:abc1234", "abc1234"),
    ("registry:5000/togather-server:abc1234", "abc1234"),
    ("togather-server:abc1234@sha256:" + "a" * 64, "abc1234"),
    ("registry:5000/togather-server@sha256:" + "b" * 64, None),
    ("togather-server", None),
])
def test_an_images_tag_is_never_its_digest(image: str, tag: str | None) -> None:
    """Found by review: an image referenced by digest read the digest as its tag (a switch
    refused a container that carried the right one)."""
    assert docker.ContainerInfo(name="x", exists=True, image=image).tag == tag


@pytest.mark.docker
def test_a_name_no_container_has_is_never_another_containers_id_prefix(
        drill_stack: DrillStack) -> None:
    """Found by review: the engine takes an unknown name as a unique id prefix, so a
    configured name made of hex letters that no container has ("db", "cafe") inspected as
    another container, and start/stop would act on it. The oracle: the docker CLI's id."""
    other = drill_stack.caddy_container
    full = subprocess.run(["docker", "inspect", "--format", "{{.Id}}", other],
                          capture_output=True, text=True, check=True).stdout.strip()
    prefix = next(full[:n] for n in range(4, 13)
                  if subprocess.run(["docker", "inspect", full[:n]], capture_output=True,
                                    check=False).returncode == 0)
    assert not docker.inspect(prefix).exists  # the engine alone would answer `other`
    assert docker.inspect(other).exists
    assert docker.bind_sources(prefix) is None and docker.running_execs(prefix) == []
    with pytest.raises(docker.DockerError, match="does not exist"):
        docker.exec_run(prefix, ["true"])  # would have run in `other`


@pytest.mark.parametrize(("call", "name"), [
    (docker.inspect, "../x"), (docker.inspect, "."), (docker.image_id, "../x:1"),
    (docker.image_id, "x/../y:1")])
def test_a_name_the_engine_redirects_is_said_to_be_a_bad_name(
        call: Callable[[str], object], name: str) -> None:
    """Found by review: the engine's router cleans `..` and `.` out of a path and answers
    301 (`/containers/../x/json` -> `/x/json`), which was "docker failed to inspect container
    '../x': no detail; read `docker info` ...", exit 1. Now the name is said to be one the
    engine cannot take, exit 4 (a precondition: nothing changed). The real engine answers."""
    with pytest.raises(docker.DockerError) as raised:
        call(name)
    message = str(raised.value)
    assert raised.value.exit_code == ExitCode.PRECONDITION, message
    assert f"{name!r} is not a name the Docker engine takes" in message, message
    assert "no detail" not in message and "docker info" not in message, message


REPOSITORIES = ["togather-server", "togather_server", "a__b", "a___b", "a--b", "a.-b",
                "Togather/server", "togather/Server", "org/togather-server", "localhost/x",
                "localhost:5000/x", "registry.example.org:5000/togather/server",
                "Registry.Example.org/togather", "myhost:80/x", "x/", "-x", "x:y/z"]
# not `../x`: the engine cleans path steps out of the request before it reads a name (the
# redirect above), so its answer there is about another name


@pytest.mark.parametrize("repository", REPOSITORIES)
def test_the_image_repository_check_agrees_with_the_engine(tmp_path: Path,
                                                           repository: str) -> None:
    """`[compose] image_repository` is taken exactly when this engine takes
    `<repository>:<version>` as a reference (the oracle: `docker image inspect`'s own
    "invalid reference format", or a plain "No such image")."""
    engine = subprocess.run(["docker", "image", "inspect", "--", f"{repository}:v1"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert engine.returncode != 0, engine.stdout  # no such image is ever built here
    valid = "invalid reference format" not in engine.stderr
    source = tmp_path / "production.toml"
    source.write_text('name = "production"\n[slots.blue]\ncontainer = "blue"\nport = 8081\n'
                      '[slots.green]\ncontainer = "green"\nport = 8082\n'
                      f'[compose]\nimage_repository = "{repository}"\n')
    try:
        envmod.load(str(source))
        taken = True
    except RunbookError as exc:
        assert "compose.image_repository" in str(exc), str(exc)
        taken = False
    assert taken == valid, (repository, engine.stderr)


# one character, two (the engine's minimum), a first character it refuses, and what compose
# names a service's container (v1 `<project>_<service>_1`, v2 `<project>-<service>-1`)
CONTAINER_NAMES = ["a", "Z", "9", "q7", "Q_", "_x", ".x", "-x", "a b",
                   "togather-production_blue_1", "togather-production-green-1"]


@pytest.mark.parametrize("name", CONTAINER_NAMES)
def test_the_container_name_check_agrees_with_the_engine(tmp_path: Path, name: str) -> None:
    """Found by review: a one-character `container` passed the load and was then asked of
    Docker, which refuses it. `[slots.*] container` is taken exactly when this engine creates
    a container of that name (the oracle: `docker create --name`, its "Invalid container
    name", or a container made, then removed by its id, or one of that name already there)."""
    from runbook.drill.images import LOCAL_POSTGRES

    engine = subprocess.run(["docker", "create", "--pull", "never", "--name", name,
                             LOCAL_POSTGRES], capture_output=True, text=True, timeout=60,
                            check=False)
    if "No such image" in engine.stderr:
        pytest.skip(f"{LOCAL_POSTGRES} is not on this machine (`runbook drill` builds it)")
    if engine.returncode == 0:  # only the container this test made
        subprocess.run(["docker", "rm", engine.stdout.strip()], capture_output=True,
                       timeout=60, check=True)
    valid = "Invalid container name" not in engine.stderr
    assert valid == (engine.returncode == 0 or "already in use" in engine.stderr), engine.stderr
    source = tmp_path / "production.toml"
    source.write_text(f'name = "production"\n[slots.blue]\ncontainer = "{name}"\nport = 8081\n'
                      '[slots.green]\ncontainer = "green"\nport = 8082\n')
    try:
        envmod.load(str(source))
        taken = True
    except RunbookError as exc:
        assert "slots.blue.container" in str(exc), str(exc)
        taken = False
    assert taken == valid, (name, engine.stderr)
