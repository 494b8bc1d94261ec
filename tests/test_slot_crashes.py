"""The Docker engine and the slot containers misbehaving around the stop of the old slot:
both slots dead, a new slot a restart policy brought back after its gate, an old slot paused
or renamed, the engine gone during the gate (found by the docker-engine review).

Each run is the real CLI on a drill stack, paused at a fault point (SIGSTOP) while the
containers are changed by hand, as an engine restart, the OOM killer or an operator would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from runbook import docker, faults, health
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.environment import Environment, Slot
from runbook.errors import ExitCode
from tests.drill_checks import wait_stopped

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
    assert f"`runbook switch {env.name} --slot blue`" in done.stderr, done.stderr
    assert "kept running" not in done.stderr, done.stderr  # it is not running


def crash_looping_green(stack: DrillStack, up: float) -> str:
    """Slot green's container replaced by one of v2 that dies `up` seconds after each start,
    under `--restart always` (a build that crashes after its gate, on a host whose compose
    file sets a restart policy): the compose labels of the one it replaces, created stopped,
    as the scene leaves green."""
    config = stack.env.slot(Slot.GREEN)
    labels = docker.inspect(config.container).labels or {}
    stack.docker("rm", "-f", config.container)
    argv = ["docker", "create", "--name", config.container, "--restart", "always",
            "--network", f"{stack.project}_default", "-p", f"127.0.0.1:{config.port}:8080",
            "-e", "SLOT=green", "-e", "DATABASE_URL", "-e", "HEALTH_FIELDS=full",
            "--stop-timeout", "5", "--entrypoint", "sh"]
    for key, value in labels.items():
        argv += ["--label", f"{key}={value}"]
    argv += [scenes.PREVIOUS.version(Slot.GREEN).image, "-c",
             f"python3 /app/server.py & sleep {up}; kill -9 $!; exit 1"]
    subprocess.run(argv, check=True, capture_output=True, text=True,
                   env={**os.environ, "DATABASE_URL": stack.app_database_url})
    return config.container


def test_a_new_slot_its_restart_policy_brought_back_after_its_gate_keeps_the_old_slot(
        stack: DrillStack) -> None:
    """Green passed its gate, crashed, and Docker's restart policy started it again: its
    /health answered again by the stop, so the re-check passed and the last good slot was
    stopped under a crash-looping one, reported as a success. The container the gate proved
    is compared with the one that runs now (id, start time, restart count): another one
    keeps the old slot, exit 6, saying so."""
    env = arrange(stack)
    green = crash_looping_green(stack, up=8)
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
        assert f"`runbook switch {env.name} --slot blue`" in done.stderr, done.stderr
        assert docker.inspect(env.slot(Slot.BLUE).container).running  # the last good slot
    finally:
        stack.docker("rm", "-f", green, check=False)  # the next arrange recreates it
