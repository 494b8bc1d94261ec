"""A compose recreate interrupted half-way, against the real drill stack and real compose.

Found by a kill-fuzz review: Ctrl-C (SIGINT to the terminal's whole process group) 60-130 ms
into `docker compose up --force-recreate` left compose's temporary container
`<old id>_<container name>`; `runbook status` said "No problems found" and the next deploy
failed on Docker's name conflict with a fix that did not run as printed.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runbook import compose, docker
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot
from tests.test_interrupted import cli, through_proxy

pytestmark = pytest.mark.docker
V1, V2 = VERSIONS["v1"], VERSIONS["v2"]


@pytest.fixture(scope="module")
def stack(drill_stack: DrillStack) -> Iterator[DrillStack]:
    yield drill_stack


def service_containers(env: Environment, slot: Slot) -> list[str]:
    """Every container, running or not, carrying the slot's compose project and service
    labels, as Docker lists them (the oracle: `docker ps -a`, not the runbook)."""
    out = subprocess.run(
        ["docker", "ps", "-a", "--format", "{{.Names}}",
         "--filter", f"label={compose.PROJECT_LABEL}={env.compose.project}",
         "--filter", f"label={compose.SERVICE_LABEL}={env.slot(slot).service}"],
        capture_output=True, text=True, check=True)
    return sorted(out.stdout.split())


def make_leftover(env: Environment, slot: Slot) -> str:
    """What compose leaves when stopped between creating the replacement and renaming it: a
    created container named `<old id prefix>_<name>` with the service's every label."""
    name = env.slot(slot).container
    info = docker.inspect(name)
    assert info.exists and info.container_id and info.image
    leftover = f"{info.container_id[:12]}_{name}"
    labels = [arg for key, value in (info.labels or {}).items()
              for arg in ("--label", f"{key}={value}")]
    subprocess.run(["docker", "create", "--name", leftover, *labels, info.image],
                   capture_output=True, text=True, check=True)
    return leftover


def test_a_leftover_of_an_interrupted_recreate_is_named_by_status_and_the_deploy(
        stack: DrillStack) -> None:
    stack.reset()  # v1 on both slots, blue serving
    env = stack.env
    leftover = make_leftover(env, Slot.GREEN)
    try:
        status = cli(env, "status")
        assert leftover in status.stdout + status.stderr, status.stdout
        assert f"docker rm -f {leftover}" in status.stdout, status.stdout
        deploy = cli(env, "deploy", "--version", V2.tag, "--yes")
        assert "Conflict" not in deploy.stderr, deploy.stderr
        assert deploy.returncode == 4, deploy.stderr  # refused before any change
        assert "nothing was changed" in deploy.stderr, deploy.stderr
        assert through_proxy(env) == ("blue", V1.tag)
        named = re.search(r"`(docker rm -f [^`]+)`", deploy.stderr)
        assert named is not None, deploy.stderr
        # the fix runs as printed
        subprocess.run(shlex.split(named.group(1)), check=True, capture_output=True)
        assert service_containers(env, Slot.GREEN) == [env.slot(Slot.GREEN).container]
        again = cli(env, "deploy", "--version", V2.tag, "--yes")
        assert again.returncode == 0, again.stderr
        assert through_proxy(env) == ("green", V2.tag)
    finally:
        subprocess.run(["docker", "rm", "-f", leftover], capture_output=True, check=False)


def test_a_one_off_compose_run_container_is_no_leftover_and_blocks_no_deploy(
        stack: DrillStack) -> None:
    """Found by review: a `docker compose run` container of the slot's service (a migration
    or a backfill, maybe still running) carries the same project and service labels; it was
    called a leftover, every recreate refused (exit 4, "the next recreate fails on it": it
    does not), and status said to `docker rm -f` the live job. It is neither."""
    stack.reset()  # v1 on both slots, blue serving
    env = stack.env
    service = env.slot(Slot.GREEN).service
    assert service is not None
    job = subprocess.run([*compose.base(env), "run", "-d", "--no-deps", "--entrypoint",
                          "sleep", service, "600"], capture_output=True, text=True, check=True)
    one_off = subprocess.run(["docker", "inspect", "-f", "{{.Name}}",
                              job.stdout.strip().splitlines()[-1]], capture_output=True,
                             text=True, check=True).stdout.strip().lstrip("/")
    try:
        assert one_off in service_containers(env, Slot.GREEN), job.stdout  # green's labels
        status = cli(env, "status")
        assert "docker rm -f" not in status.stdout + status.stderr, status.stdout
        deploy = cli(env, "deploy", "--version", V2.tag, "--yes")
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        assert through_proxy(env) == ("green", V2.tag)
        running = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", one_off],
                                 capture_output=True, text=True, check=True)
        assert running.stdout.strip() == "true"  # the job goes on
    finally:
        subprocess.run(["docker", "rm", "-f", one_off], capture_output=True, check=False)


def test_a_failed_compose_names_a_compose_command_that_runs(stack: DrillStack) -> None:
    """The generic fix of a failed compose names `docker compose -p .. -f .. ps -a`, as the
    runbook invokes compose, and it runs as printed."""
    from runbook.compose import Command, ComposeError, run

    stack.reset()
    env = stack.env
    bad = Command(argv=(*compose.base(env), "up", "-d", "--no-deps", "no-such-service"))
    with pytest.raises(ComposeError) as caught:
        run(bad)
    found = re.search(r"`(docker compose [^`]+ ps -a)`", caught.value.fix or "")
    assert found is not None, caught.value.fix
    done = subprocess.run(shlex.split(found.group(1)), capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert env.slot(Slot.BLUE).container in done.stdout


def _compose_pid(runbook_pid: int) -> int | None:
    """The pid of the `up --force-recreate` compose the runbook started (its child)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == runbook_pid and b"--force-recreate" in argv:
            return int(entry.name)
    return None


def test_ctrl_c_to_the_process_group_during_the_recreate_waits_for_compose(
        stack: DrillStack) -> None:
    """Ctrl-C reaches the terminal's whole foreground process group. The runbook (the group
    leader here, as under a shell) waits for compose to finish the recreate, then undoes it:
    green recreated on v2 and stopped, no temporary container left, blue serving."""
    stack.reset()
    env = stack.env
    assert env.source is not None
    proc = subprocess.Popen([sys.executable, "-m", "runbook.cli", "deploy", "--version",
                             V2.tag, "--yes", str(env.source)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        pid = None
        while pid is None and time.monotonic() < deadline and proc.poll() is None:
            pid = _compose_pid(proc.pid)
            time.sleep(0.005)
        assert pid is not None, "compose never ran"
        time.sleep(0.09)  # inside the window the review found (60-130 ms)
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=180)
        compose_gone = not Path(f"/proc/{pid}").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, err
    assert "nothing took effect" in err, err
    assert compose_gone, "the runbook exited while compose still ran"
    assert service_containers(env, Slot.GREEN) == [env.slot(Slot.GREEN).container], err
    green = docker.inspect(env.slot(Slot.GREEN).container)
    assert green.image is not None and green.image.endswith(f":{V2.tag}"), green
    assert not green.running, green  # undone: stopped
    assert through_proxy(env) == ("blue", V1.tag)
    again = cli(env, "deploy", "--version", V2.tag, "--yes")
    assert again.returncode == 0, again.stderr
