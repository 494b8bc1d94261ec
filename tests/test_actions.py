"""Actions built once (issue 12 item 2): what the plan shows is what runs.

The Docker adapter talks to the engine API itself; the oracle here is the `docker` CLI, a
separate client of the same engine. Every action's command line, typed as shown, must do what
the action does. The Caddy reload is shown and run from one ReloadCommand: a real process
records the argv it was given.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from runbook import caddy, docker, rollback
from runbook.drill import http as drill_http
from runbook.drill.stack import DrillStack
from runbook.environment import Environment, Slot
from runbook.preflight import Probe
from tests.drill_checks import migrated, two_deployments
from tests.test_caddy_text import make_env


def cli_status(name: str) -> str:
    """The container's state as the docker CLI sees it (the independent oracle)."""
    done = subprocess.run(["docker", "inspect", "--format", "{{.State.Status}}", name],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else "absent"


def cli_id(name: str) -> str:
    """The container's short id as the docker CLI sees it."""
    return subprocess.run(["docker", "inspect", "--format", "{{.Id}}", name],
                          capture_output=True, text=True, check=True).stdout.strip()[:12]


@pytest.fixture
def stack(drill_stack: DrillStack) -> DrillStack:
    """The session stack as the last test left it: each test here arranges its scene."""
    return drill_stack


def answering(env: Environment, slot: Slot, timeout: float = 20.0) -> None:
    """Wait until the slot's app answers HTTP: only then has it its SIGTERM handler, so a
    `docker stop` right after a start is not the 10 s wait for a PID 1 that ignores it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            drill_http.get(f"{env.slot(slot).base_url}/health", timeout=1)
            return
        except httpx.HTTPError:
            assert time.monotonic() < deadline, f"slot {slot} never answered"
            time.sleep(0.05)


def v2_on_green(stack: DrillStack) -> Environment:
    """v2 serves on green; blue (v1) is stopped, not removed: free to start and stop."""
    env = migrated(stack)
    assert cli_status(env.slot(Slot.BLUE).container) == "exited"
    return env


@pytest.mark.docker
def test_docker_actions_do_what_their_command_lines_say(stack: DrillStack) -> None:
    env = v2_on_green(stack)
    blue = env.slot(Slot.BLUE).container
    start, stop = docker.start_action(blue), docker.stop_action(blue, timeout=10)
    assert start.display() == f"docker start {blue}"
    assert stop.display() == f"docker stop --time 10 {blue}"
    assert shlex.split(start.display())[:2] == ["docker", "start"]

    docker.run(start)  # the engine request
    assert cli_status(blue) == "running"
    answering(env, Slot.BLUE)
    info = docker.inspect(blue)
    assert (info.exists, info.status) == (True, "running")
    assert info.image == subprocess.run(
        ["docker", "inspect", "--format", "{{.Config.Image}}", blue],
        capture_output=True, text=True, check=True).stdout.strip()

    subprocess.run(shlex.split(stop.display()), check=True, capture_output=True)  # as shown
    assert cli_status(blue) == "exited" and docker.inspect(blue).status == "exited"
    subprocess.run(shlex.split(start.display()), check=True, capture_output=True)
    assert cli_status(blue) == "running"
    answering(env, Slot.BLUE)
    docker.run(stop)
    assert cli_status(blue) == "exited"
    docker.run(stop)  # stopping a stopped container is nothing to do
    assert docker.inspect("no-such-container-here").exists is False
    docker.run(docker.stop_action("no-such-container-here"))  # absent: nothing to stop
    with pytest.raises(docker.DockerError, match="does not exist"):
        docker.run(docker.start_action("no-such-container-here"))


@pytest.mark.docker
def test_exec_logs_and_image_lookups_match_the_cli(stack: DrillStack) -> None:
    stack.reset()
    env = stack.env
    serving = env.slot(Slot.BLUE).container
    code, output = docker.exec_run(serving, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert code == 3 and sorted(output.split()) == ["err", "out"]
    cli = subprocess.run(["docker", "logs", "--tail", "5", serving], capture_output=True,
                         text=True, check=True)
    # the CLI splits stdout from stderr; the adapter keeps them as one stream
    assert sorted(docker.logs(serving, tail=5).splitlines()) == sorted(
        (cli.stdout + cli.stderr).splitlines())
    image = docker.inspect(serving).image
    assert image is not None and docker.image_exists(image)
    labels = json.loads(subprocess.run(
        ["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", image],
        capture_output=True, text=True, check=True).stdout)
    assert docker.image_labels(image) == labels
    assert docker.image_exists("togather-server:no-such-tag") is False


@pytest.mark.docker
def test_the_plan_shows_the_start_and_stop_the_run_performs(stack: DrillStack) -> None:
    env = two_deployments(stack)  # v3 on blue, green (v2) stopped
    green, blue = env.slot(Slot.GREEN).container, env.slot(Slot.BLUE).container
    assert cli_status(green) == "exited"
    dry = rollback.rollback(env, dry_run=True)
    steps = {s.name: s for s in dry.plan.steps}
    # by name, as on-call would type it, and the id the run acts on (the plan's container)
    assert steps["start-slot"].details["command"] == (f"docker start {green} (id "
                                                      f"{cli_id(green)}, as planned)")
    assert steps["stop-old-slot"].details["command"] == (f"docker stop --time 10 {blue} (id "
                                                         f"{cli_id(blue)}, as planned)")
    assert "POST" in steps["switch"].details["reload"]
    assert cli_status(green) == "exited"  # a dry run changes nothing

    done = rollback.rollback(env)
    ran = {o.name: o.status for o in done.outcomes}
    assert ran["start-slot"] == "ok" and ran["stop-old-slot"] == "ok"
    assert cli_status(green) == "running" and cli_status(blue) == "exited"
    same = {s.name: s.details.get("command") for s in done.plan.steps}
    assert same["start-slot"] == steps["start-slot"].details["command"]


@pytest.mark.docker
def test_the_rollback_path_never_imports_the_docker_sdk(stack: DrillStack) -> None:
    """Issue 14 item 2: the SDK (and requests/urllib3) cost ~100 ms of the on-call's wait."""
    env = two_deployments(stack)  # v3 on blue, green (v2) stopped
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "runbook.cli", "rollback",
                           env.name, "--dry-run", "--config", str(env.source)],
                          capture_output=True, text=True, check=False)
    errors = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert done.returncode == 0, errors
    assert f"docker start {env.slot(Slot.GREEN).container}" in done.stdout, done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "runbook.docker" in imported and "runbook.rollback" in imported
    heavy = sorted(m for m in imported if m.split(".")[0] in ("docker", "requests", "urllib3"))
    assert heavy == [], heavy


def test_probes_run_at_once_and_fail_in_the_order_asked() -> None:
    started: list[str] = []
    gate = threading.Event()

    def slow() -> str:
        started.append("slow")
        gate.wait(5)
        raise ValueError("first asked, failed last")

    def fast() -> str:
        started.append("fast")
        gate.set()
        raise KeyError("second asked, failed first")

    began = time.monotonic()
    first, second = Probe(slow), Probe(fast)
    with pytest.raises(ValueError, match="first asked"):
        first.result()
    with pytest.raises(KeyError):
        second.result()
    assert sorted(started) == ["fast", "slow"] and time.monotonic() - began < 5
    assert Probe(lambda: 42).result() == 42


def test_the_caddy_reload_shown_is_the_argv_that_runs(tmp_path: Path) -> None:
    """A real process stands in for `caddy` and records its arguments."""
    seen = tmp_path / "argv.json"
    recorder = (sys.executable, "-c",
                f"import json, sys; open({str(seen)!r}, 'w').write(json.dumps(sys.argv[1:]))")
    env = make_env(tmp_path / "Caddyfile", admin="http://127.0.0.1:2999", command=recorder,
                   reload="caddy-reload")
    command = caddy.reload_command(env)
    caddy.reload(env, "{\n}\n", command)
    ran = [*recorder, *json.loads(seen.read_text())]
    assert shlex.split(command.display()) == ran == command.words()
    assert ran[3:] == ["reload", "--config", str(tmp_path / "Caddyfile"), "--adapter",
                       "caddyfile", "--address", "127.0.0.1:2999"]
    systemd = caddy.reload_command(make_env(reload="systemctl"))
    assert systemd.display() == "systemctl reload caddy"
    admin = caddy.reload_command(make_env(admin="http://127.0.0.1:2999"))
    assert admin.url == "http://127.0.0.1:2999/load" and admin.display().startswith("POST ")
