"""The Docker engine and the slot containers misbehaving around the stop of the old slot:
both slots dead, a new slot a restart policy brought back after its gate, an old slot paused
or renamed, the engine gone during the gate (found by the docker-engine review).

Each run is the real CLI on a drill stack, paused at a fault point (SIGSTOP) while the
containers are changed by hand, as an engine restart, the OOM killer or an operator would."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runbook import docker, faults, health
from runbook import intent as intents
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.environment import Environment, Slot, command_arg
from runbook.errors import ExitCode
from tests.drill_checks import runbook_cli, through_proxy, wait_stopped

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def stack(drill_stack: DrillStack) -> Iterator[DrillStack]:
    yield drill_stack


def arrange(stack: DrillStack) -> Environment:
    """v3 serving from blue, v2 the previous deployment, stopped on green."""
    stack.arrange(scenes.PREVIOUS)
    return stack.env


def paused_run(env: Environment, fault: str, meanwhile: Callable[[], None],
               **environ: str) -> subprocess.CompletedProcess[str]:
    """`runbook rollback --yes`, stopped at `fault` (SIGSTOP), `meanwhile` done, continued."""
    assert env.source is not None
    extra = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    run = subprocess.Popen([sys.executable, "-m", "runbook.cli", "rollback", "--yes",
                            str(env.source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, stdin=subprocess.DEVNULL,
                           env=extra | {faults.VARIABLE: f"{fault}:SIGSTOP"} | environ)
    try:
        wait_stopped(run.pid)
        meanwhile()
        os.kill(run.pid, signal.SIGCONT)
        out, err = run.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(run.pid, signal.SIGCONT)
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert "Traceback" not in err, err
    return subprocess.CompletedProcess(run.args, run.returncode, out, err)


def journal_note(env: Environment, step: str, key: str) -> str:
    """What the last run's journal noted under `key` for `step`."""
    records = [json.loads(p.read_text()) for p in sorted(
        env.runs_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)]
    data = [r for r in records if r.get("action") == "rollback"][-1]
    for entry in data.get("steps", []):
        if entry.get("name") == step:
            return str(entry.get("detail", {}).get(key, ""))
    raise AssertionError(f"no step {step} in run {data.get('run_id')}")


def test_both_slots_dead_at_the_stop_ends_exit_6_saying_both_are_down(
        stack: DrillStack) -> None:
    """An engine restart (with `restart: no`), the OOM killer or an operator took both slots
    down after the switch. The stop step noted "already stopped" and skipped the re-check of
    the new slot, which ran only inside the drain: exit 0 "Done" with the proxy answering
    502. The new slot is asked on that path too; the run says both are down and the fix."""
    env = arrange(stack)
    blue, green = env.slot(Slot.BLUE).container, env.slot(Slot.GREEN).container

    def both_die() -> None:
        stack.docker("kill", green, blue)

    done = paused_run(env, "before:stop-old-slot", both_die)
    assert done.returncode == ExitCode.TOOK_EFFECT, done.stdout + done.stderr
    assert "both slots are down" in done.stderr, done.stderr
    assert f"`docker start {blue}`" in done.stderr, done.stderr
    assert f"`runbook switch {command_arg(env)} --slot blue`" in done.stderr, done.stderr
    assert "kept running" not in done.stderr, done.stderr  # it is not running


def crash_looping(stack: DrillStack, slot: Slot, image: str, up: float,
                  start: bool = False) -> str:
    """A slot's container replaced by one of `image` that dies `up` seconds after each
    start, under `--restart always` (a build that crashes, on a host whose compose file sets
    a restart policy): the compose labels of the one it replaces; created stopped (as the
    scene leaves the standby) unless `start`."""
    config = stack.env.slot(slot)
    labels = docker.inspect(config.container).labels or {}
    stack.docker("rm", "-f", config.container)
    argv = ["docker", "create", "--name", config.container, "--restart", "always",
            "--network", f"{stack.project}_default", "-p", f"127.0.0.1:{config.port}:8080",
            "-e", f"SLOT={slot}", "-e", "DATABASE_URL", "-e", "HEALTH_FIELDS=full",
            "--stop-timeout", "5", "--entrypoint", "sh"]
    for key, value in labels.items():
        argv += ["--label", f"{key}={value}"]
    argv += [image, "-c", f"python3 /app/server.py & sleep {up}; kill -9 $!; exit 1"]
    subprocess.run(argv, check=True, capture_output=True, text=True,
                   env={**os.environ, "DATABASE_URL": stack.app_database_url})
    if start:
        stack.docker("start", config.container)
    return config.container


def test_a_new_slot_its_restart_policy_brought_back_after_its_gate_keeps_the_old_slot(
        stack: DrillStack) -> None:
    """Green passed its gate, crashed, and Docker's restart policy started it again: its
    /health answered again by the stop, so the re-check passed and the last good slot was
    stopped under a crash-looping one, reported as a success. The container the gate proved
    is compared with the one that runs now (id, start time, restart count): another one
    keeps the old slot, exit 6, saying so."""
    env = arrange(stack)
    green = crash_looping(stack, Slot.GREEN, scenes.PREVIOUS.version(Slot.GREEN).image, up=8)
    config = env.slot(Slot.GREEN)
    try:
        def restarted() -> None:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                # asked of Docker directly: the oracle is not the code under test
                state = stack.docker("inspect", "-f", "{{.State.Status}} {{.RestartCount}}",
                                     green).stdout.split()
                if state[0] == "running" and int(state[1]) >= 1 and health.probe(
                        config, env.health.path, 1.0).ok:
                    return
                time.sleep(0.1)
            raise AssertionError(f"{green} was never restarted and healthy again")

        done = paused_run(env, "before:stop-old-slot", restarted)
        assert done.returncode == ExitCode.TOOK_EFFECT, done.stdout + done.stderr
        assert "restarted" in done.stderr and "since its health gate" in done.stderr, \
            done.stderr
        assert f"`runbook switch {command_arg(env)} --slot blue`" in done.stderr, done.stderr
        assert docker.inspect(env.slot(Slot.BLUE).container).running  # the last good slot
    finally:
        stack.docker("rm", "-f", green, check=False)  # the next arrange recreates it


def killed_after_its_commit(stack: DrillStack) -> tuple[Environment, str]:
    """A rollback of two deployments with the standby running (v3 serving from blue, v2
    running on green) killed (-9) after its commit point, before the stop of the old slot;
    returns the environment and green's StartedAt then, as Docker says it (what the killed
    run's gate proved: green ran untouched from before the run to its kill)."""
    stack.arrange(scenes.PREVIOUS_RUNNING)
    env = stack.env
    killed = runbook_cli(env, "rollback", "--yes", fault="before:stop-old-slot:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert through_proxy(env) == ("green", scenes.PREVIOUS.version(Slot.GREEN).tag)
    started = stack.docker("inspect", "-f", "{{.State.StartedAt}}",
                           env.slot(Slot.GREEN).container).stdout.strip()
    return env, started


def finish_stop_step(env: Environment) -> dict[str, str]:
    """The stop-old-slot step of the finish's dry-run plan (it must say what it checks)."""
    looked = runbook_cli(env, "rollback", "--dry-run", "--format", "json")
    assert looked.returncode == 0, looked.stdout + looked.stderr
    plan = json.loads(looked.stdout)["plan"]
    assert plan["finishing"], plan["summary"]
    [step] = [s for s in plan["steps"] if s["name"] == "stop-old-slot"]
    return {k: str(v) for k, v in step["details"].items()}


def test_a_finish_keeps_the_old_slot_when_the_new_one_was_restarted_since_its_gate(
        stack: DrillStack) -> None:
    """A rollback killed after its commit, before the stop of the old slot; then the new
    slot's container was started again (`docker restart`: as a crash its restart policy
    answered, or an operator). Its /health answers again at once, and the finishing run had
    no record of the container the killed run's gate proved: it stopped the last good slot.
    The intent record carries that container (id, start time, restart count) from the commit
    point on, and the finish refuses as the run itself would: exit 6, blue kept running."""
    env, started = killed_after_its_commit(stack)
    green, blue = env.slot(Slot.GREEN).container, env.slot(Slot.BLUE).container
    stack.docker("restart", "-t", "1", green)
    deadline = time.monotonic() + 40
    while not health.probe(env.slot(Slot.GREEN), env.health.path, 1.0).ok:
        assert time.monotonic() < deadline, f"{green} never answered healthy again"
        time.sleep(0.1)
    assert stack.docker("inspect", "-f", "{{.State.StartedAt}}",
                        green).stdout.strip() != started  # Docker says: started again
    shown = finish_stop_step(env)
    assert started in shown["new slot"], shown  # what the finish compares, before it acts
    done = runbook_cli(env, "rollback", "--yes")
    assert done.returncode == ExitCode.TOOK_EFFECT, done.stdout + done.stderr
    assert "restarted since its health gate" in done.stderr, done.stderr
    assert f"`runbook switch {command_arg(env)} --slot blue`" in done.stderr, done.stderr
    assert stack.docker("inspect", "-f", "{{.State.Running}}", blue).stdout.strip() == "true"
    # the other way out it names, once on-call judges green stable (after a host's reboot
    # every rerun would otherwise refuse for ever): stop the old slot, run it again
    assert f"`docker stop {blue}`" in done.stderr, done.stderr
    stack.docker("stop", "-t", "1", blue)
    again = runbook_cli(env, "rollback", "--yes")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "restarted since its health gate" in again.stderr, again.stderr  # said, not hidden
    assert "both slots are down" not in again.stderr, again.stderr  # green serves
    assert not intents.path(env).exists()  # finished
    assert through_proxy(env) == ("green", scenes.PREVIOUS.version(Slot.GREEN).tag)


def test_a_finish_stops_the_old_slot_when_the_new_one_is_the_container_its_gate_proved(
        stack: DrillStack) -> None:
    """The same kill, the new slot left as its gate proved it: the finish checks the same
    container and stops the old slot, exit 0."""
    env, started = killed_after_its_commit(stack)
    blue = env.slot(Slot.BLUE).container
    shown = finish_stop_step(env)
    assert started in shown["new slot"], shown
    done = runbook_cli(env, "rollback", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    running = stack.docker("inspect", "-f", "{{.State.Running}}", blue).stdout.strip()
    if stack.has("h2c") and running == "true":  # left for a held h2c connection, said so
        assert "left running" in done.stderr, done.stderr  # (tests/test_h2c.py)
    else:
        assert running == "false", done.stderr
    assert through_proxy(env) == ("green", scenes.PREVIOUS.version(Slot.GREEN).tag)


def test_a_finish_of_a_record_without_the_gated_container_finishes_as_before(
        stack: DrillStack) -> None:
    """A record written by an older version names no gated container: it is read and
    finished as then (only a new slot restarting at that moment is caught), and the plan
    says so."""
    env, _ = killed_after_its_commit(stack)
    record = intents.path(env)
    data = json.loads(record.read_text())
    data["record"].pop(intents.GATED_CONTAINER, None)
    record.write_text(json.dumps(data))
    shown = finish_stop_step(env)
    assert "not recorded" in shown["new slot"], shown
    done = runbook_cli(env, "rollback", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("green", scenes.PREVIOUS.version(Slot.GREEN).tag)
    assert not intents.path(env).exists()


def test_a_paused_old_slot_is_stopped_not_noted_already_stopped(stack: DrillStack) -> None:
    """Someone paused the old slot during the run: the stop tested `.running`, noted
    "already stopped" and left it paused, holding its port. `docker stop` stops a paused
    container (and ends a restart loop): it is stopped, and the note says what it was."""
    env = arrange(stack)
    blue = env.slot(Slot.BLUE).container
    try:
        done = paused_run(env, "before:stop-old-slot", lambda: stack.docker("pause", blue))
        assert done.returncode == 0, done.stdout + done.stderr
        assert docker.inspect(blue).status == "exited", docker.inspect(blue).status
        assert "already stopped" not in journal_note(env, "stop-old-slot", "container")
    finally:
        stack.docker("unpause", blue, check=False)  # left paused: the next arrange cannot


def test_a_crash_looping_old_slot_is_stopped_ending_its_loop(stack: DrillStack) -> None:
    """The old slot crash-loops under its restart policy (a common reason to roll back): at
    the stop it was "restarting", which the stop took for "already stopped", and Docker kept
    starting the build rolled away from against the database. `docker stop` ends the loop.
    The container the plan resolved is the one that loops (its code moved away, its process
    interrupted, under `--restart always`): another one made under the name since is never
    the run's to stop (tests/test_container_identity.py)."""
    env = arrange(stack)
    blue = env.slot(Slot.BLUE).container
    try:
        def looping() -> None:
            stack.docker("update", "--restart", "always", blue)
            stack.docker("exec", blue, "sh", "-c",
                         "mv /app/server.py /app/server.py.gone && kill -INT 1")
            # between two starts, once Docker's backoff has grown past a second (it doubles
            # from 0.1s at each restart): the run's inspect must find it "restarting"
            deadline = time.monotonic() + 40
            while stack.docker("inspect", "-f", "{{.State.Status}} {{.RestartCount}}",
                               blue).stdout.split() not in (["restarting", str(n)]
                                                            for n in range(5, 9)):
                assert time.monotonic() < deadline, f"{blue} never restarting"
                time.sleep(0.02)

        done = paused_run(env, "before:stop-old-slot", looping)
        assert done.returncode == 0, done.stdout + done.stderr
        time.sleep(2)  # a loop left alive would be restarting or running again by now
        state = stack.docker("inspect", "-f", "{{.State.Status}}", blue).stdout.strip()
        assert state == "exited", state
        assert "already stopped" not in journal_note(env, "stop-old-slot", "container")
    finally:
        stack.docker("rm", "-f", blue, check=False)  # the next arrange recreates it


def test_an_old_slot_renamed_away_is_said_and_never_stopped_by_a_guess(
        stack: DrillStack) -> None:
    """Someone renamed the old slot's container during the run: the stop found no container
    of that name and said "ok" in silence, while the renamed one kept running on the slot's
    port (the next deploy to it collides). It is said; nothing else is stopped."""
    env = arrange(stack)
    blue = env.slot(Slot.BLUE).container
    moved = f"{blue}-x"
    try:
        done = paused_run(env, "before:stop-old-slot",
                          lambda: stack.docker("rename", blue, moved))
        assert done.returncode == 0, done.stdout + done.stderr
        said = done.stdout + done.stderr
        assert f"no container named {blue}" in said, said
        assert f"publish={env.slot(Slot.BLUE).port}" in said, said
        assert docker.inspect(moved).running  # never stopped on a guess
    finally:
        stack.docker("rm", "-f", moved, check=False)  # the next arrange recreates blue


def test_the_engine_gone_during_the_gate_says_traffic_did_not_move(
        stack: DrillStack, tmp_path: Path) -> None:
    """The engine stopped answering during the gate (before the commit), and the undo of the
    start could not stop green: the run said "traffic may not be where it was", though no
    switch had started. It says traffic did not move and how to stop the started slot."""
    env = arrange(stack)
    green = env.slot(Slot.GREEN).container
    link = tmp_path / "engine.sock"  # the engine this run talks to, until it goes away
    link.symlink_to("/var/run/docker.sock")

    def engine_gone() -> None:
        link.unlink()
        stack.docker("kill", green)

    done = paused_run(env, "before:health-gate", engine_gone, DOCKER_HOST=f"unix://{link}")
    assert done.returncode == ExitCode.ATTENTION, done.stdout + done.stderr
    assert "traffic did not move" in done.stderr, done.stderr
    assert "may not be where it was" not in done.stderr, done.stderr
    assert f"`docker stop {green}`" in done.stderr and "`docker info`" in done.stderr, \
        done.stderr


def restarted(stack: DrillStack, env: Environment, slot: Slot) -> None:
    """`docker restart` of `slot` (as a host's reboot or an operator), until it answers."""
    container = env.slot(slot).container
    stack.docker("restart", "-t", "1", container)
    deadline = time.monotonic() + 40
    while not health.probe(env.slot(slot), env.health.path, 1.0).ok:
        assert time.monotonic() < deadline, f"{container} never answered healthy again"
        time.sleep(0.1)


def test_a_forced_finish_with_the_old_slot_down_and_the_new_one_restarted_finishes(
        stack: DrillStack) -> None:
    """Found by review: a forced rollback killed before the stop of the old slot; the old
    (bad) slot then exited and the new one was restarted (a reboot does both). Every rerun
    said "both slots are down" (exit 6) while green served, naming only the way back to the
    build being rolled away from. It is said and finished."""
    stack.arrange(scenes.PREVIOUS_RUNNING)
    env = stack.env
    killed = runbook_cli(env, "rollback", "--yes", "--force",
                         fault="before:stop-old-slot:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    stack.docker("stop", "-t", "1", env.slot(Slot.BLUE).container)
    restarted(stack, env, Slot.GREEN)
    done = runbook_cli(env, "rollback", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restarted since its health gate" in done.stderr, done.stderr
    assert "both slots are down" not in done.stderr, done.stderr
    assert not intents.path(env).exists()
    assert through_proxy(env) == ("green", scenes.PREVIOUS.version(Slot.GREEN).tag)


# (up: seconds each start runs, what Docker says when the finish runs)
CRASH_LOOPS = {
    # restarting, its restart policy's back-off long by now (6 s and more)
    "restarting": (0.5, [["restarting", str(n)] for n in range(6, 9)]),
    # found in CI, under load: met in the seconds of its loop it runs (restarted by its
    # policy, not yet crashed again), it was taken for a way back and kept (exit 6) while
    # green served; judged as status judges a crash loop (docker.crash_loop)
    "running": (20.0, [["running", "1"]]),
}


@pytest.mark.parametrize("loop", sorted(CRASH_LOOPS))
def test_a_finish_with_a_crash_looping_old_slot_and_the_new_one_restarted_stops_the_loop(
        stack: DrillStack, loop: str) -> None:
    """Found by review: the same kill (gated), the old slot crash-looping and the new one
    restarted: "both slots are down" (exit 6) while green served. A crash-looping old slot
    is no way back, whatever it does at the instant it is looked at: the finish says the
    restart, stops the loop and ends."""
    up, seen = CRASH_LOOPS[loop]
    stack.arrange(scenes.PREVIOUS_RUNNING)
    env = stack.env
    blue = env.slot(Slot.BLUE).container
    killed = runbook_cli(env, "rollback", "--yes", fault="before:stop-old-slot:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    try:
        crash_looping(stack, Slot.BLUE, scenes.PREVIOUS.version(Slot.BLUE).image, up=up,
                      start=True)
        restarted(stack, env, Slot.GREEN)
        deadline = time.monotonic() + 60
        while stack.docker("inspect", "-f", "{{.State.Status}} {{.RestartCount}}",
                           blue).stdout.split() not in seen:
            assert time.monotonic() < deadline, f"blue never came to {seen}"
            time.sleep(0.02)
        done = runbook_cli(env, "rollback", "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "restarted since its health gate" in done.stderr, done.stderr
        assert stack.docker("inspect", "-f", "{{.State.Status}}", blue).stdout.strip() in (
            "exited", "created"), "the crash loop goes on"
        assert through_proxy(env) == ("green", scenes.PREVIOUS.version(Slot.GREEN).tag)
    finally:
        stack.docker("rm", "-f", blue, check=False)  # the next arrange recreates it


def test_a_run_killed_right_after_caddys_reload_has_its_gated_container_recorded(
        stack: DrillStack) -> None:
    """Found by review: killed between Caddy's reload and the commit's write (a reboot's
    window during the switch), the record named no gated container ("an older version
    wrote"), so after the reboot's restart of green the finish stopped the last good slot.
    The gate's proof is on disk before the switch: the finish keeps blue (exit 6)."""
    stack.arrange(scenes.PREVIOUS_RUNNING)
    env = stack.env
    killed = runbook_cli(env, "rollback", "--yes", fault="switch.after-reload:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert json.loads(intents.path(env).read_text())["record"].get(intents.GATED_CONTAINER)
    restarted(stack, env, Slot.GREEN)
    done = runbook_cli(env, "rollback", "--yes")
    assert done.returncode == ExitCode.TOOK_EFFECT, done.stdout + done.stderr
    assert "restarted since its health gate" in done.stderr, done.stderr
    assert docker.inspect(env.slot(Slot.BLUE).container).running
