"""The outage a failed `rollback --restore-snapshot` leaves, against the real drill stack.

Found by an on-call walkthrough: v1, then a broken build (its /health answers 503, schema 2),
then v2 deployed over it (blue, current; the broken build the previous, stopped on green).
`runbook rollback --restore-snapshot` restored v2's pre-deploy snapshot (schema 2) and then
the broken build failed its gate: exit 5, the app slots stopped, the proxy answering 502.
From there `runbook status` named only commands leading back to the broken build, a rollback
failed the same gate and exited 1 ("traffic stayed on a healthy slot") while nothing served,
and `runbook switch --slot blue` said blue "already takes traffic" of a stopped container.
`docker start` of blue (v2, the recorded current build, on the schema it ran with) was the
way back."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from runbook import docker, rollback, switch
from runbook.drill import http as drill_http
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot
from runbook.errors import ExitCode, RunbookError
from tests.drill_checks import through_proxy

pytestmark = pytest.mark.docker
REPO_ROOT = Path(__file__).resolve().parents[1]
# scenes.BROKEN_PREVIOUS as the runbook's own deploys leave it: v2's deploy took its
# pre-deploy snapshot (at schema 2, the broken build's) before it switched. Its history starts
# at the broken build: the drill builds schema 1 only in a slot running v1, which neither does
BROKEN_PREVIOUS_SNAPSHOTS = dataclasses.replace(
    scenes.BROKEN_PREVIOUS, name="broken previous, snapshots", snapshots=True,
    history=scenes.BROKEN_PREVIOUS.history[1:])


def failed_restore(stack: DrillStack) -> tuple[Environment, str]:
    """The scene above after the restore-rollback whose gate failed (exit 5): returns the
    environment with a gate short enough to fail the broken build quickly, and what the
    restore-rollback said."""
    stack.arrange(BROKEN_PREVIOUS_SNAPSHOTS)
    # long enough for the broken build to answer (503) at least once on a busy machine
    # (tests/test_rollback.py: test_health_gate_refuses_a_broken_target_and_traffic_stays)
    env = stack.env.with_(health=dataclasses.replace(stack.env.health, timeout=20.0))
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env, rollback.Options(restore_snapshot="auto", reason="test"))
    said = str(err.value)
    assert err.value.exit_code == ExitCode.ATTENTION, said
    assert "the database WAS restored" in said and "the service is down" in said, said
    # the oracle: what Docker and the proxy say, not the runbook
    for slot in Slot:
        assert not docker.inspect(env.slot(slot).container).running, slot
    assert proxy_status(env) >= 500
    return env, said


def proxy_status(env: Environment) -> int:
    return drill_http.get(f"{env.caddy.proxy_url}/version", headers={"Connection": "close"},
                          timeout=5).status_code


def status_problems(env: Environment) -> list[dict[str, str]]:
    argv = [sys.executable, "-m", "runbook.cli", "status", str(env.source), "--format", "json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    assert "Traceback" not in done.stderr, done.stderr
    problems: list[dict[str, str]] = json.loads(done.stdout)["problems"]
    return problems


def test_status_names_docker_start_of_the_recorded_build_before_rerunning_the_failed_gate(
        scene_stack: DrillStack) -> None:
    """Blue holds v2, the recorded current build, and the restore left the database at the
    schema v2 ran with (its safety snapshot's): `docker start` it comes first, before the
    interrupted run's rerun, whose target just failed its gate (said so where it is named)."""
    env, restore_said = failed_restore(scene_stack)
    blue = env.slot(Slot.BLUE).container
    problems = status_problems(env)
    fixes = [p["fix"] for p in problems]
    start = f"docker start {blue}"
    assert start in fixes[0] or start in problems[0]["problem"], problems
    # no problem names a way back to the broken build as its fix without saying its gate
    # just failed, and none sends on-call there before the start
    for p in problems:
        for command in ("runbook rollback", "runbook switch"):
            if command in p["fix"]:
                assert start in p["fix"], p
                assert p["fix"].index(start) < p["fix"].index(command), p
    interrupted = next(p for p in problems if "interrupted run is unfinished" in p["problem"])
    if "--to" in interrupted["fix"]:
        assert "failed its health gate" in interrupted["fix"], interrupted
    # the restore's own exit-5 message names it too, before the switch to the failed target
    assert start in restore_said, restore_said
    assert restore_said.index(start) < restore_said.index("runbook switch"), restore_said
    # the fix named serves the recorded build again (the oracle: the proxy's answer)
    assert not docker.inspect(blue).running
    docker.start(blue)
    deadline = time.monotonic() + 60
    while not serves_v2(env):
        assert time.monotonic() < deadline, "v2 never answered through the proxy"
        time.sleep(0.2)


def serves_v2(env: Environment) -> bool:
    try:
        return through_proxy(env) == ("blue", VERSIONS["v2"].tag)
    except (httpx.HTTPError, KeyError, ValueError):
        return False


def test_a_rollback_whose_gate_fails_while_nothing_serves_says_the_service_is_down(
        scene_stack: DrillStack) -> None:
    """The rollback run again fails the broken build's gate and undoes its start: traffic is
    on no healthy slot (Caddy points at stopped blue), so never exit 1's "traffic stayed on a
    healthy slot": exit 5, THE SERVICE IS DOWN, and that this run did not stop it."""
    env, _ = failed_restore(scene_stack)
    before = snapshot_without_traffic(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env, rollback.Options(reason="test: again"))
    said = str(err.value)
    assert err.value.exit_code == ExitCode.ATTENTION, said
    assert "THE SERVICE IS DOWN" in said, said
    assert "this run did not stop it" in said and "before this run began" in said, said
    assert f"docker start {env.slot(Slot.BLUE).container}" in said, said
    assert snapshot_without_traffic(env) == before
    assert proxy_status(env) >= 500


def test_switch_to_the_stopped_slot_caddy_points_at_says_it_is_stopped(
        scene_stack: DrillStack) -> None:
    """`runbook switch --slot blue` with blue stopped: never "already takes traffic"; it says
    blue is stopped and names `docker start` of it, nothing changed (exit 4)."""
    env, _ = failed_restore(scene_stack)
    blue = env.slot(Slot.BLUE).container
    before = snapshot_without_traffic(env)
    with pytest.raises(RunbookError) as err:
        switch.switch(env, switch.Options(slot=Slot.BLUE))
    said = str(err.value)
    assert err.value.exit_code == ExitCode.PRECONDITION, said
    assert "already takes traffic" not in said, said
    assert "stopped" in said and f"docker start {blue}" in said, said
    assert snapshot_without_traffic(env) == before


def snapshot_without_traffic(env: Environment) -> dict[str, object]:
    """What a refused or undone run leaves untouched (tests.drill_checks.snapshot without the
    proxy's answer: nothing serves here)."""
    return {"state": env.state_file.read_bytes(), "caddyfile": env.caddy.caddyfile.read_bytes(),
            "containers": {s: dataclasses.astuple(docker.inspect(env.slot(s).container))[:4]
                           for s in Slot},
            "lock": env.lock_path.exists()}



def typed(argv: list[str], *, yes: bool = False) -> subprocess.CompletedProcess[str]:
    """A command as printed, split as the shell splits it (`runbook` is this checkout's);
    `yes`: on-call's answer to the confirmation prompt (stdin is no terminal here)."""
    if argv[0] == "runbook":
        argv = [sys.executable, "-m", "runbook.cli", *argv[1:]]
    done = subprocess.run([*argv, *(["--yes"] if yes else [])], capture_output=True, text=True,
                          timeout=300, check=False, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def named(problems: list[dict[str, str]], pattern: str) -> list[list[str]]:
    """Every command in backquotes the fixes name that starts with `pattern`, shlex-split."""
    return [shlex.split(found) for p in problems
            for found in re.findall(rf"`({re.escape(pattern)}[^`]*)`", p["fix"])]


def rows(stack: DrillStack) -> list[str]:
    with stack.connect() as conn:
        return [str(r[0]) for r in conn.execute("SELECT name FROM items ORDER BY id")]


def test_after_the_docker_start_status_never_names_that_restore_again(
        scene_stack: DrillStack) -> None:
    """Found by review of 91a0202: once on-call typed the `docker start` status named, v2
    served on the restored database and took writes. Status named the interrupted run's
    rerun (`rollback --to <broken>`): it failed the same gate, exit 1, v2 still serving. Then
    status named it as `rollback --to <broken> --restore-snapshot --snapshot <pre-deploy>`,
    "runs it again": typed as printed, that stopped v2 (the outage again), restored the
    pre-deploy snapshot over every write since the first restore, and failed the same gate,
    exit 5. The database already held what that run restored (the target's schema): every
    command status names from there leaves v2 serving and the rows written."""
    env, _ = failed_restore(scene_stack)
    starts = named(status_problems(env), "docker start")
    assert starts and all(argv == starts[0] for argv in starts), starts
    assert typed(starts[0]).returncode == 0
    deadline = time.monotonic() + 60
    while not serves_v2(env):
        assert time.monotonic() < deadline, "v2 never answered through the proxy"
        time.sleep(0.2)
    with scene_stack.connect() as conn:
        conn.execute("INSERT INTO items (name) VALUES ('written-after-the-start')")
    for attempt in (1, 2):  # the rerun status names, then the one it names after that
        problems = status_problems(env)
        assert not named(problems, "docker start"), problems  # blue runs
        reruns = named(problems, "runbook rollback")
        assert reruns, problems
        for argv in reruns:
            assert "--restore-snapshot" not in argv, (attempt, problems)
        done = typed(reruns[0], yes=True)
        # the broken build fails its gate again; traffic stays on v2, which still serves
        assert done.returncode == ExitCode.FAILED_SAFELY, (attempt, done.stderr)
        assert "changed nothing users see" not in done.stderr, done.stderr
        assert serves_v2(env), (attempt, done.stderr)
        assert rows(scene_stack) == ["written-after-the-start"], (attempt, done.stderr)
