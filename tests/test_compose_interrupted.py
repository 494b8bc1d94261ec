"""A compose recreate interrupted half-way, against the real drill stack and real compose.

Found by a kill-fuzz review: Ctrl-C (SIGINT to the terminal's whole process group) 60-130 ms
into `docker compose up --force-recreate` left compose's temporary container
`<old id>_<container name>`; `runbook status` said "No problems found" and the next deploy
failed on Docker's name conflict with a fix that did not run as printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runbook import compose, docker, faults
from runbook.drill import http as drill_http
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot
from tests.drill_checks import two_deployments
from tests.matrix import nightly
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


def make_leftover(env: Environment, slot: Slot, *, running: bool = False) -> str:
    """What compose leaves when stopped between creating the replacement and renaming it: a
    created container named `<old id prefix>_<name>` with the service's every label. Its
    command only sleeps (it publishes no port, serves nothing), so a test can start it:
    `running` does at once."""
    name = env.slot(slot).container
    info = docker.inspect(name)
    assert info.exists and info.container_id and info.image
    leftover = f"{info.container_id[:12]}_{name}"
    labels = [arg for key, value in (info.labels or {}).items()
              for arg in ("--label", f"{key}={value}")]
    subprocess.run(["docker", "create", "--name", leftover, *labels, "--entrypoint", "sleep",
                    info.image, "600"], capture_output=True, text=True, check=True)
    if running:
        subprocess.run(["docker", "start", leftover], capture_output=True, text=True,
                       check=True)
    return leftover


def journaled(env: Environment, words: str) -> list[str]:
    """Every journal line (the JSON log, one object a line) whose message holds `words`."""
    return [entry["message"] for log in sorted(env.log_dir.glob("*.log"))
            for line in log.read_text().splitlines()
            if words in (entry := json.loads(line))["message"]]


def test_a_stopped_leftover_is_named_by_status_and_the_deploy_removes_it_itself(
        stack: DrillStack) -> None:
    """A stopped `<id>_<name>` leftover of the slot a deploy recreates: status names it and
    what removes it; the deploy's plan (--dry-run too) shows its removal by name, id, state
    and exact command, and the deploy removes it before its recreate and finishes, with no
    command by hand."""
    stack.reset()  # v1 on both slots, blue serving
    env = stack.env
    leftover = make_leftover(env, Slot.GREEN)
    ident = _as_docker_says(leftover)[0][:12]
    try:
        status = cli(env, "status")
        assert leftover in status.stdout, status.stdout
        assert f"`docker rm {leftover}`" in status.stdout, status.stdout
        assert "docker rm -f" not in status.stdout, status.stdout  # it serves nothing
        assert "the next `runbook rollback` or `runbook deploy`" in status.stdout, status.stdout
        dry = cli(env, "deploy", "--version", V2.tag, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert f"Remove the stopped leftover {leftover}" in dry.stdout, dry.stdout
        assert f"{leftover} (id {ident}, created)" in dry.stdout, dry.stdout
        assert re.search(rf"command\s+docker rm {re.escape(leftover)}\n", dry.stdout), \
            dry.stdout
        # the removal comes before the recreate
        assert dry.stdout.index("Remove the stopped leftover") \
            < dry.stdout.index("Recreate the green container"), dry.stdout
        assert leftover in service_containers(env, Slot.GREEN)  # a dry run changes nothing
        deploy = cli(env, "deploy", "--version", V2.tag, "--yes")
        assert deploy.returncode == 0, deploy.stderr
        assert f"Remove the stopped leftover {leftover}" in deploy.stdout, deploy.stdout
        assert service_containers(env, Slot.GREEN) == [env.slot(Slot.GREEN).container]
        assert through_proxy(env) == ("green", V2.tag)
        assert journaled(env, f"Remove the stopped leftover {leftover}"), "not journaled"
    finally:
        subprocess.run(["docker", "rm", "-f", leftover], capture_output=True, check=False)


def test_a_rollback_that_recreates_the_standby_removes_its_stopped_leftover(
        stack: DrillStack) -> None:
    """The rollback's recreate (its standby's container was removed) removes a stopped
    leftover of that slot first, as the deploy's does, and rolls back."""
    env = two_deployments(stack)  # v3 on blue serves, v2 on green the previous deployment
    green = env.slot(Slot.GREEN).container
    leftover = make_leftover(env, Slot.GREEN)
    try:
        subprocess.run(["docker", "rm", "-f", green], capture_output=True, check=True)
        rollback = cli(env, "rollback", "--yes")
        assert rollback.returncode == 0, rollback.stderr
        assert f"Remove the stopped leftover {leftover}" in rollback.stdout, rollback.stdout
        assert service_containers(env, Slot.GREEN) == [green]
        assert through_proxy(env) == ("green", V2.tag)
    finally:
        subprocess.run(["docker", "rm", "-f", leftover], capture_output=True, check=False)


def test_a_running_leftover_is_still_refused_and_nothing_changes(stack: DrillStack) -> None:
    """A running `<id>_<name>` leftover may be serving: never removed by the runbook. The
    deploy refuses (exit 4) before any change, naming the `docker rm -f` to run once on-call
    has checked nothing is served from it; the leftover, both slots and traffic untouched."""
    stack.reset()  # v1 on both slots, blue serving
    env = stack.env
    blue, green = env.slot(Slot.BLUE), env.slot(Slot.GREEN)
    leftover = make_leftover(env, Slot.GREEN, running=True)
    try:
        before = {name: _as_docker_says(name) for name in (blue.container, green.container,
                                                           leftover)}
        assert before[leftover][2] == "running"
        deploy = cli(env, "deploy", "--version", V2.tag, "--yes")
        assert deploy.returncode == 4, deploy.stderr
        assert "nothing was changed" in deploy.stderr, deploy.stderr
        assert f"`docker rm -f {leftover}`" in deploy.stderr, deploy.stderr
        assert "is running" in deploy.stderr, deploy.stderr
        assert {name: _as_docker_says(name) for name in before} == before
        assert through_proxy(env) == ("blue", V1.tag)
        status = cli(env, "status")
        assert f"`docker rm -f {leftover}`" in status.stdout, status.stdout
    finally:
        subprocess.run(["docker", "rm", "-f", leftover], capture_output=True, check=False)


def test_a_leftover_started_since_the_plan_is_refused_by_docker_and_nothing_else_changes(
        stack: DrillStack) -> None:
    """The plan saw the leftover stopped; it started before the removal ran (the run held
    right there, at the drill's `before:` point, by SIGSTOP). `docker rm` without -f: Docker
    itself refuses, the run exits 4 naming `runbook status`, and nothing else changed."""
    stack.reset()  # v1 on both slots, blue serving
    env = stack.env
    assert env.source is not None
    blue, green = env.slot(Slot.BLUE), env.slot(Slot.GREEN)
    leftover = make_leftover(env, Slot.GREEN)
    environ = {**os.environ, faults.VARIABLE: "before:remove-leftover:SIGSTOP"}
    proc = subprocess.Popen([sys.executable, "-m", "runbook.cli", "deploy", "--version",
                             V2.tag, "--yes", str(env.source)], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _until(lambda: _stopped(proc.pid) or proc.poll() is not None, 120,
               "the run never reached the removal")
        assert proc.poll() is None, proc.communicate()[1]  # stopped there, never ended
        before = {name: _as_docker_says(name) for name in (blue.container, green.container)}
        subprocess.run(["docker", "start", leftover], capture_output=True, check=True)
        os.kill(proc.pid, signal.SIGCONT)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        started = _as_docker_says(leftover)[2]
        subprocess.run(["docker", "rm", "-f", leftover], capture_output=True, check=False)
    assert proc.returncode == 4, err
    assert started == "running", started  # Docker refused to remove it
    assert "`runbook status" in err, err  # where to look before removing a running one
    assert f"`docker rm -f {leftover}`" in err, err
    assert {name: _as_docker_says(name) for name in before} == before
    assert through_proxy(env) == ("blue", V1.tag)


def _stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (SIGSTOP: state T in /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "T"


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


def _watch_creates(events: subprocess.Popen[str], name: str, seen: list[dict[str, Any]],
                   created: Callable[[dict[str, Any]], None]) -> None:
    """Read `docker events` (JSON lines) into `seen`, calling `created` at the create of a
    container named `name`."""
    assert events.stdout is not None
    for line in events.stdout:
        event = json.loads(line)
        seen.append(event)
        if event["Action"] == "create" and event["Actor"]["Attributes"].get("name") == name:
            created(event)


def test_ctrl_c_to_the_process_group_during_the_recreate_waits_for_compose(
        stack: DrillStack) -> None:
    """Ctrl-C reaches the terminal's whole foreground process group. The runbook (the group
    leader here, as under a shell) waits for compose to finish the recreate, then undoes it:
    green recreated on v2 and stopped, no temporary container left, blue serving."""
    stack.reset()
    env = stack.env
    assert env.source is not None
    old = docker.inspect(env.slot(Slot.GREEN).container)  # the container compose replaces
    assert old.container_id
    # Docker's own events, from the run's start: the Ctrl-C comes the moment compose's
    # temporary container `<old id prefix>_<name>` exists (the window the review found:
    # created, not yet renamed; 60-130 ms on an idle machine, which a fixed sleep missed on
    # a busy one)
    temporary_name = f"{old.container_id[:12]}_{old.name}"
    events = subprocess.Popen(
        ["docker", "events", "--since", f"{time.time():.3f}", "--format", "{{json .}}",
         "--filter", "type=container", "--filter", "event=create", "--filter", "event=rename"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc = subprocess.Popen([sys.executable, "-m", "runbook.cli", "deploy", "--version",
                             V2.tag, "--yes", str(env.source)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    seen: list[dict[str, Any]] = []
    interrupted: list[tuple[str, int]] = []  # (the temporary container's id, when: ns)

    def ctrl_c(event: dict[str, Any]) -> None:
        if not interrupted:
            when = time.time_ns()  # before the signal: a rename after it is in the window
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            interrupted.append((event["Actor"]["ID"], when))

    watcher = threading.Thread(target=_watch_creates, args=(events, temporary_name, seen, ctrl_c),
                               daemon=True)
    watcher.start()
    try:
        deadline = time.monotonic() + 120
        pid = None
        while pid is None and time.monotonic() < deadline and proc.poll() is None:
            pid = _compose_pid(proc.pid)
            time.sleep(0.005)
        assert pid is not None, "compose never ran"
        while not interrupted and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert interrupted, "compose never created its temporary container"
        _out, err = proc.communicate(timeout=180)
        compose_gone = not Path(f"/proc/{pid}").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        events.terminate()
        events.wait()
        watcher.join(timeout=10)
    [(temporary, when)] = interrupted
    renamed = [e["timeNano"] for e in seen if e["Action"] == "rename"
               and e["Actor"]["ID"] == temporary]
    assert all(at > when for at in renamed), "the Ctrl-C came after compose's rename"
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


def _as_docker_says(name: str) -> tuple[str, ...]:
    """(id, StartedAt, status) of a container, from the docker CLI itself."""
    out = subprocess.run(["docker", "inspect", "-f",
                          "{{.Id}} {{.State.StartedAt}} {{.State.Status}}", name],
                         capture_output=True, text=True, check=True)
    return tuple(out.stdout.split())


def _dials(node: object) -> set[str]:
    """Every upstream address in Caddy's loaded JSON config."""
    if isinstance(node, dict):
        return {str(v) for k, v in node.items() if k == "dial"} \
            | {d for v in node.values() for d in _dials(v)}
    if isinstance(node, list):
        return {d for v in node for d in _dials(v)}
    return set()


def _group_alive(pgid: int) -> bool:
    """Whether any process is left in process group `pgid` (compose's: the docker CLI and its
    compose plugin)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                return True
    return False


def _until(what: Callable[[], object], timeout: float, why: str) -> object:
    """What `what` found once it finds something (polled, for the moments compose is in),
    failing with `why` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline, why
        time.sleep(0.02)
    return found


def hung_recreate_cut_off(stack: DrillStack, tmp_path: Path, second: str) -> str:
    """`runbook deploy` of v2 onto green, whose app no longer answers SIGTERM (frozen:
    SIGSTOP), so compose's `up --force-recreate` waits in its stop of the old container for
    the whole stop grace period (5 s in the drill's compose file; 10 s by default; for ever
    when the engine hangs). A Ctrl-C then, and `second` while it is held. Checks what the
    product promises at once (README, "Ctrl-C ... while compose recreates a slot"): the
    first signal held while compose runs; the second stops compose's group at once; exit 1;
    Caddy still runs blue, which was never touched, and the proxy answers v1; compose's
    temporary `<id>_<name>` container left (created, never started), and `runbook status`
    naming it with its `docker rm` and that the next rollback or deploy removes it. Returns
    that command."""
    stack.reset()  # v1 on both slots, blue serving, green (the standby) running
    env = stack.env
    assert env.source is not None
    blue, green = env.slot(Slot.BLUE), env.slot(Slot.GREEN)
    loaded = drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).json()
    assert _dials(loaded) == {f"localhost:{blue.port}"}, loaded
    serving = _as_docker_says(blue.container)
    assert through_proxy(env) == ("blue", V1.tag)
    subprocess.run(["docker", "kill", "--signal", "STOP", green.container],
                   capture_output=True, check=True)  # the standby's app hangs
    stderr = tmp_path / "stderr"
    with stderr.open("w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "runbook.cli", "deploy", "--version",
                                 V2.tag, "--yes", str(env.source)],
                                stdout=subprocess.DEVNULL, stderr=err_file, text=True,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        # compose has made the new container under its temporary name and waits on the old
        made = _until(lambda: [n for n in service_containers(env, Slot.GREEN)
                               if n != green.container], 120, "compose never recreated")
        assert isinstance(made, list) and len(made) == 1, made
        temp = made[0]
        pid = _compose_pid(proc.pid)
        assert pid is not None, "compose is not the runbook's child"
        os.kill(proc.pid, signal.SIGINT)
        _until(lambda: "SIGINT received while" in stderr.read_text(), 10,
               "the first Ctrl-C was never answered")
        # held: the run still waits on compose, which is still half-way
        assert proc.poll() is None, stderr.read_text()
        assert _group_alive(pid), stderr.read_text()
        assert service_containers(env, Slot.GREEN) == sorted([green.container, temp])
        os.kill(proc.pid, getattr(signal, second))
        sent = time.monotonic()
        _until(lambda: not _group_alive(pid), compose.GRACE + 5, "compose was not cut off")
        compose_took = time.monotonic() - sent
        proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(["docker", "kill", "--signal", "CONT", green.container],
                       capture_output=True, check=False)
    err = stderr.read_text()
    assert proc.returncode == 1, err
    assert f"{second} received again: it stops compose half-way" in err, err
    assert "was stopped half-way by a second signal" in err, err
    assert compose_took < 3, err  # at once: not when the stop it waited on ended
    assert took < 10, err  # its undo's stop of the hung standby waits that stop out
    # the world: traffic never moved, the serving container never touched
    now = drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).json()
    assert now == loaded, now
    assert _as_docker_says(blue.container) == serving
    assert through_proxy(env) == ("blue", V1.tag)
    # compose never renamed its new container: the temporary one is left
    assert service_containers(env, Slot.GREEN) == sorted([green.container, temp])
    listed = re.search(r"`(docker compose [^`]+ ps -a)`", err)  # the error's own fix
    assert listed is not None, err
    assert temp in subprocess.run(shlex.split(listed.group(1)), capture_output=True,
                                  text=True, check=True).stdout
    status = cli(env, "status")
    named = re.findall(r"`(docker rm [^`]+)`", status.stdout)
    assert named == [f"docker rm {temp}"], status.stdout  # stopped: no -f needed
    assert "the next `runbook rollback` or `runbook deploy`" in status.stdout, status.stdout
    return named[0]


@nightly  # the same cut-off as the second Ctrl-C below, by another signal: a matrix cell
@pytest.mark.long
def test_a_sigterm_after_a_ctrl_c_cuts_a_hung_recreate_off_too(
        stack: DrillStack, tmp_path: Path) -> None:
    """SIGTERM (a supervisor's stop) counts as the second signal as Ctrl-C does: the same
    cut-off, and the leftover goes with the fix status prints, as printed."""
    remove = hung_recreate_cut_off(stack, tmp_path, "SIGTERM")
    subprocess.run(shlex.split(remove), check=True, capture_output=True)
    env = stack.env
    assert service_containers(env, Slot.GREEN) == [env.slot(Slot.GREEN).container]
    assert through_proxy(env) == ("blue", V1.tag)


@pytest.mark.long
def test_a_second_ctrl_c_cuts_a_hung_recreate_off_and_the_same_deploy_then_finishes(
        stack: DrillStack, tmp_path: Path) -> None:
    """A second Ctrl-C stops a hung compose half-way, traffic never moves; the same deploy,
    run again with no command by hand, removes the stopped temporary container it left
    (saying so, journaled as a step) before its recreate, and deploys."""
    remove = hung_recreate_cut_off(stack, tmp_path, "SIGINT")
    temp = remove.split()[-1]
    env = stack.env
    try:
        rerun = cli(env, "deploy", "--version", V2.tag, "--yes")
    finally:  # never left for the next test, whatever the rerun did
        gone = subprocess.run(["docker", "rm", "-f", temp], capture_output=True, text=True,
                              check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert "No such container" in gone.stderr, gone.stderr  # the rerun removed it
    assert f"Remove the stopped leftover {temp}" in rerun.stdout, rerun.stdout
    assert through_proxy(env) == ("green", V2.tag)
    assert service_containers(env, Slot.GREEN) == [env.slot(Slot.GREEN).container]
    assert journaled(env, f"Remove the stopped leftover {temp}"), "not journaled"
