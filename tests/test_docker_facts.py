"""What Docker itself says of a slot's container, told to on-call beside /health's answer.

Found by the container-lifecycle review: a slot whose own Docker HEALTHCHECK fails while its
/health answers 200 passed the gate (rightly: /health is the contract) and was then shown
"health healthy", "No problems found" and healthy by `runbook healthcheck`, Docker's verdict
never said; a serving container killed (exit 137, or by the OOM killer) was "stopped
(exited)", its only fix `docker start`, a rollback said to "move users off the recorded
build". Each case is made for real on the drill stack (`docker run --health-cmd`, `docker
kill`, a real OOM kill under a memory limit); the oracle is `docker inspect`, run here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from typing import Any

import pytest

from runbook.drill import http as drill_http
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot, command_arg
from tests.drill_checks import runbook_cli, through_proxy

pytestmark = pytest.mark.docker
V2, V3 = VERSIONS["v2"], VERSIONS["v3"]
DISAGREES = "Docker's own healthcheck says unhealthy while /health answers ok"


def inspected(name: str) -> dict[str, Any]:
    """`docker inspect NAME`'s State: the oracle, never the runbook's reading of it."""
    done = subprocess.run(["docker", "inspect", name], capture_output=True, text=True,
                          check=True, timeout=30)
    state: dict[str, Any] = json.loads(done.stdout)[0]["State"]
    return state


def status_json(env: Environment) -> dict[str, Any]:
    done = runbook_cli(env, "status", "--format", "json")
    assert "Traceback" not in done.stderr, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def gate_detail(env: Environment) -> dict[str, Any]:
    """The health gate's notes in the last rollback's run record."""
    records = [json.loads(p.read_text()) for p in sorted(
        env.runs_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)]
    run = [r for r in records if r.get("action") == "rollback"][-1]
    [gate] = [s for s in run["steps"] if s.get("name") == "health-gate"]
    detail: dict[str, Any] = gate.get("detail") or {}
    return detail


def test_a_docker_healthcheck_failing_while_health_answers_ok_is_said_never_refused(
        scene_stack: DrillStack) -> None:
    """The standby green (v2) runs under `--health-cmd "exit 1"`: Docker says unhealthy,
    its /health answers 200. The rollback's plan and its gate say Docker's verdict (a
    warning: the gate passes on /health, exit 0, users on green); then `status` shows it on
    green's line, as a note and in its JSON, and `healthcheck` beside /health's answer."""
    scene_stack.arrange(scenes.PREVIOUS_RUNNING)  # v3 serves from blue, v2 runs on green
    env = scene_stack.env
    green = env.slot(Slot.GREEN).container
    scene_stack.docker("rm", "-f", green)
    argv = scene_stack.docker_run_argv(Slot.GREEN, V2.image)
    argv[3:3] = ["--health-cmd", "exit 1", "--health-interval", "1s", "--health-retries", "1"]
    subprocess.run(argv, check=True, capture_output=True, timeout=60,
                   env={**os.environ, "DATABASE_URL": scene_stack.app_database_url})
    try:
        deadline = time.monotonic() + 60
        while (inspected(green).get("Health") or {}).get("Status") != "unhealthy":
            assert time.monotonic() < deadline, inspected(green)
            time.sleep(0.3)
        health_url = f"{env.slot(Slot.GREEN).base_url}{env.health.path}"
        while True:  # /health answers ok all the same: the contract the gate keeps
            try:
                if drill_http.get(health_url, timeout=2).status_code == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "green never answered /health"
            time.sleep(0.2)

        plan = runbook_cli(env, "rollback", "--dry-run")
        assert plan.returncode == 0, plan.stdout + plan.stderr
        [line] = [x for x in plan.stdout.splitlines() if x.strip().startswith("container")
                  and green in x]
        assert "Docker's own healthcheck says unhealthy" in line, plan.stdout

        ran = runbook_cli(env, "rollback", "--yes")
        assert ran.returncode == 0, ran.stdout + ran.stderr  # a warning, not a refusal
        assert through_proxy(env) == ("green", V2.tag)
        assert f"runbook: warning: {DISAGREES}" in ran.stderr, ran.stderr
        assert gate_detail(env).get("docker_health") == "unhealthy", gate_detail(env)

        assert inspected(green)["Health"]["Status"] == "unhealthy"  # still, as status looks
        text = runbook_cli(env, "status")
        [slot_line] = [x for x in text.stdout.splitlines() if x.startswith("  green ")]
        assert "health healthy" in slot_line and "Docker healthcheck unhealthy" in slot_line, \
            text.stdout
        assert DISAGREES in text.stdout, text.stdout
        data = status_json(env)
        assert data["slots"]["green"]["container"]["docker_health"] == "unhealthy", data
        assert data["slots"]["blue"]["container"]["docker_health"] is None, data  # none set
        [note] = [n for n in data["notes"] if n["check"] == "docker_health_disagrees"]
        assert note["slot"] == "green" and DISAGREES in note["note"], note
        assert text.returncode == 0, text.stdout  # the state file matches what runs

        table = runbook_cli(env, "healthcheck", "--slot", "green")
        assert table.returncode == 0, table.stdout  # /health decides the exit code
        assert DISAGREES in table.stdout, table.stdout
        as_json = json.loads(runbook_cli(env, "healthcheck", "--slot", "green", "--format",
                                         "json").stdout)
        assert (as_json["status"], as_json["docker_health"]) == ("healthy", "unhealthy"), \
            as_json
    finally:
        scene_stack.docker("rm", "-f", green, check=False)  # the next arrange remakes it


def _oom_kill(stack: DrillStack, name: str) -> None:
    """A real OOM kill of the app: its container held to 64 MiB, the app (PID 1) made the OOM
    killer's first choice, and a process in the container asking for 200 MiB."""
    stack.docker("update", "--memory", "64m", "--memory-swap", "64m", name)
    subprocess.run(["docker", "exec", name, "sh", "-c",
                    "echo 1000 > /proc/1/oom_score_adj; "
                    "python3 -c 'bytearray(200 * 2 ** 20)'"],
                   capture_output=True, timeout=60, check=False)


@pytest.mark.parametrize("how", ["kill", "oom"])
def test_a_serving_container_killed_is_said_crashed_with_the_rollback_beside_docker_start(
        scene_stack: DrillStack, how: str) -> None:
    """v3 serves from blue, v2 the previous deployment on green; blue's app is killed
    (`docker kill`: exit 137) or OOM-killed. Status says the exit code (and the OOM kill)
    and that the build crashed, with `docker start` and the rollback its dry run plans as
    equal ways out; no fix says a rollback would move users off the recorded build."""
    scene_stack.arrange(scenes.PREVIOUS)
    env = scene_stack.env
    blue = env.slot(Slot.BLUE).container
    try:
        if how == "kill":
            scene_stack.docker("kill", blue)
        else:
            _oom_kill(scene_stack, blue)
        deadline = time.monotonic() + 30
        while inspected(blue)["Status"] != "exited":
            assert time.monotonic() < deadline, inspected(blue)
            time.sleep(0.2)
        state = inspected(blue)
        assert (state["ExitCode"], state["OOMKilled"]) == (137, how == "oom"), state

        text = runbook_cli(env, "status")
        assert text.returncode == 1, text.stdout
        said = ("exited with code 137 (killed: out of memory)" if how == "oom"
                else "exited with code 137")
        [slot_line] = [x for x in text.stdout.splitlines() if x.startswith("  blue ")]
        assert said in slot_line, text.stdout
        data = status_json(env)
        container = data["slots"]["blue"]["container"]
        assert (container["exit_code"], container["oom_killed"]) == (
            state["ExitCode"], state["OOMKilled"]), container
        [stopped] = [p for p in data["problems"] if p["check"] == "serving_stopped"]
        assert said in stopped["problem"], stopped
        if how == "kill":  # Docker does not say who killed it: neither does status
            assert "out of memory" not in stopped["problem"], stopped
            assert "it crashed, or was killed by hand" in stopped["problem"], stopped
        rollback = f"runbook rollback {command_arg(env)}"
        assert f"`docker start {blue}`" in stopped["fix"], stopped
        assert f"`{rollback}`" in stopped["fix"], stopped
        for p in data["problems"]:
            assert "would move users off the recorded build" not in p["fix"], p
        # the rollback named is one that runs: its dry run plans it
        [named] = {m for p in data["problems"] for m in re.findall(r"`(runbook rollback [^`]*)`",
                                                                  p["fix"])}
        assert named == rollback, named
        assert runbook_cli(env, "rollback", "--dry-run").returncode == 0
    finally:
        if how == "oom":  # its memory limit stays with it: the next arrange remakes it
            scene_stack.docker("rm", "-f", blue, check=False)
