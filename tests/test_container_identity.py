"""A run acts on the containers its plan resolved, not on whatever holds a slot's name when
it acts (found by a lifecycle review).

The window is real: a run confirms at the prompt and then executes with no re-plan, so the
slot's name can be given to another container meanwhile. `runbook rollback` held at its
start (the drill's fault point, SIGSTOP) while green was renamed away and a v1 container
was `docker create`d under its name: the run `docker start`ed that one (old code on
schema 2 for 30 s), then advised a data-losing `--restore-snapshot`. Each test here asks
Docker (the docker CLI), the proxy (HTTP) and the files themselves, never the runbook.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from runbook import docker, faults
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot
from tests.drill_checks import runbook_cli, through_proxy, wait_stopped

pytestmark = pytest.mark.docker
V1, V2, V3 = VERSIONS["v1"], VERSIONS["v2"], VERSIONS["v3"]
NEVER = "0001-01-01T00:00:00Z"  # Docker's StartedAt of a container never started


def docker_says(name: str) -> dict[str, str]:
    """A container's id, status, start time and image, from the docker CLI itself."""
    out = subprocess.run(["docker", "inspect", name], capture_output=True, text=True,
                         check=True)
    attrs = json.loads(out.stdout)[0]
    return {"id": attrs["Id"], "status": attrs["State"]["Status"],
            "started": attrs["State"]["StartedAt"], "image": attrs["Config"]["Image"]}


def exists(name: str) -> bool:
    return subprocess.run(["docker", "inspect", name], capture_output=True).returncode == 0


def held(env: Environment, point: str, meanwhile: Callable[[], None], *args: str,
         command: tuple[str, ...] = ("rollback", "--yes"),
         stops: int = 1) -> subprocess.CompletedProcess[str]:
    """`runbook COMMAND ARGS ENV` stopped (SIGSTOP) at the drill's fault `point`; `meanwhile`
    runs while it is stopped, then it goes on to its end (let go each of the `stops` times
    it reaches the point: the fleet drain's once per slot)."""
    assert env.source is not None
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    proc = subprocess.Popen([sys.executable, "-m", "runbook.cli", *command, *args,
                             str(env.source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL,
                            env=environ | {faults.VARIABLE: f"{point}:SIGSTOP"})
    try:
        wait_stopped(proc.pid)
        meanwhile()
        os.kill(proc.pid, signal.SIGCONT)
        for _ in range(stops - 1):
            wait_stopped(proc.pid)
            os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def create_under(stack: DrillStack, slot: Slot, image: str) -> None:
    """Another container made under the slot's name, never started (`docker create`, as a
    docker-run host's script would make it)."""
    argv = stack.docker_run_argv(slot, image)
    argv[1] = "create"
    argv.remove("-d")
    subprocess.run(argv, check=True, capture_output=True, text=True,
                   env={**os.environ, "DATABASE_URL": stack.app_database_url})


@contextlib.contextmanager
def put_back(stack: DrillStack, slot: Slot) -> Iterator[str]:
    """The slot's container as the scene left it, once the test is done: whatever holds its
    name then is removed and the one set aside (the yielded name) gets its name back."""
    name = stack.env.slot(slot).container
    aside = f"{name}-aside"
    try:
        yield aside
    finally:
        if exists(aside):
            stack.docker("rm", "-f", name, check=False)
            stack.docker("rename", aside, name, check=False)


def test_a_container_swapped_in_under_the_target_name_is_never_started(
        stack: DrillStack) -> None:
    """The review's case: the plan said "start the exited container (it keeps v2)"; green was
    renamed away and a v1 container created under its name while the run waited. The run
    refuses before acting (exit 4, its planned and current ids and images named), starts
    neither container, and leaves traffic, the state file and the lock as they were."""
    stack.arrange(scenes.PREVIOUS)  # v3 serving on blue, v2 stopped on green
    env = stack.env
    green = env.slot(Slot.GREEN).container
    planned = docker_says(green)
    assert planned["status"] == "exited" and planned["image"] == V2.image
    state = env.state_file.read_bytes()
    with put_back(stack, Slot.GREEN) as aside:
        def swap() -> None:
            stack.docker("rename", green, aside)
            create_under(stack, Slot.GREEN, V1.image)

        run = held(env, "before:start-slot", swap)
        impostor, kept = docker_says(green), docker_says(aside)
        served = through_proxy(env)
    assert run.returncode == 4, run.stderr
    assert served == ("blue", V3.tag)  # users never left v3
    assert impostor["image"] == V1.image
    assert impostor["status"] == "created" and impostor["started"] == NEVER, impostor
    assert kept["status"] == "exited" and kept["started"] == planned["started"], kept
    assert ("the green slot's container changed since this run was planned (planned id "
            f"{planned['id'][:12]} image {V2.image}, now id {impostor['id'][:12]} image "
            f"{V1.image}); nothing was changed") in run.stderr, run.stderr
    assert "docker events" in run.stderr, run.stderr
    assert "--restore-snapshot" not in run.stderr, run.stderr  # no data-losing advice
    assert env.state_file.read_bytes() == state
    assert not env.lock_path.exists()


def test_a_target_renamed_away_since_the_plan_says_so_and_status_flags_it(
        stack: DrillStack) -> None:
    """Green renamed away right before its start: the run said "container ... does not exist;
    undone: stop ... again; recreate it" (nothing had been started; "recreate it" named no
    command), and status afterwards "No problems found" with green absent. Now it says the
    container planned is gone since the plan, that nothing was started, and the command that
    plans again; status names the absent container and what brings it back."""
    stack.arrange(scenes.PREVIOUS)
    env = stack.env
    green = env.slot(Slot.GREEN).container
    planned = docker_says(green)
    state = env.state_file.read_bytes()
    with put_back(stack, Slot.GREEN) as aside:
        run = held(env, "before:start-slot", lambda: stack.docker("rename", green, aside))
        kept = docker_says(aside)
        served = through_proxy(env)
        status = runbook_cli(env, "status")
    assert run.returncode == 4, run.stderr
    assert served == ("blue", V3.tag)
    assert kept["status"] == "exited" and kept["started"] == planned["started"], kept
    assert (f"the green slot's container {green} (id {planned['id'][:12]}, planned to be "
            "started) is gone since this run was planned (renamed or removed); nothing was "
            "started") in run.stderr, run.stderr
    assert "undone: stop" not in run.stderr and "recreate it" not in run.stderr, run.stderr
    assert f"`runbook rollback {env.source} --to {V2.tag}`" in run.stderr, run.stderr
    assert env.state_file.read_bytes() == state
    assert not env.lock_path.exists()
    assert status.returncode == 1, status.stdout
    assert "No problems found" not in status.stdout, status.stdout
    assert f"{green} is absent" in status.stdout, status.stdout
    assert f"`docker rename <its name> {green}`" in status.stdout, status.stdout
    assert f"`runbook rollback {env.source}`" in status.stdout, status.stdout


def test_a_container_appearing_where_the_plan_found_none_is_not_recreated_over(
        stack: DrillStack) -> None:
    """The plan found green removed (a recreate); a container was made under its name while
    the run waited. The run refuses before compose runs (exit 4): that container is left as
    it was, never replaced nor started."""
    if stack.has("docker-run"):
        pytest.skip("a recreate needs compose: on the docker-run shape the plan refuses a "
                    "removed slot before any fault point (test_rm_slots.py proves that)")
    stack.arrange(scenes.PREVIOUS)
    env = stack.env
    green = env.slot(Slot.GREEN).container
    state = env.state_file.read_bytes()
    with put_back(stack, Slot.GREEN) as aside:
        stack.docker("rename", green, aside)  # the plan finds no green
        run = held(env, "before:start-slot", lambda: create_under(stack, Slot.GREEN, V1.image))
        impostor = docker_says(green)
        served = through_proxy(env)
    assert run.returncode == 4, run.stderr
    assert served == ("blue", V3.tag)
    assert impostor["status"] == "created" and impostor["started"] == NEVER, impostor
    assert impostor["image"] == V1.image
    assert ("the green slot's container changed since this run was planned (planned none, "
            f"now id {impostor['id'][:12]} image {V1.image}); nothing was changed"
            ) in run.stderr, run.stderr
    assert env.state_file.read_bytes() == state
    assert not env.lock_path.exists()


def test_the_old_slot_swapped_after_the_switch_is_not_stopped(stack: DrillStack) -> None:
    """After the commit the run stops the old blue container it planned; one running under
    blue's name in its place since (blue renamed away, another started) is not it: it is
    left running, and so is the one set aside, with what to do said."""
    stack.arrange(scenes.PREVIOUS)
    env = stack.env
    blue = env.slot(Slot.BLUE).container
    planned = docker_says(blue)
    with put_back(stack, Slot.BLUE) as aside:
        def swap() -> None:
            stack.docker("rename", blue, aside)
            # publishes no port (the one set aside still holds blue's): only sleeps
            stack.docker("run", "-d", "--name", blue, "--label",
                         f"com.togather.deployment.slot={Slot.BLUE}", "--entrypoint", "sleep",
                         V3.image, "600")

        run = held(env, "before:stop-old-slot", swap)
        impostor, kept = docker_says(blue), docker_says(aside)
        served = through_proxy(env)
    assert run.returncode == 0, run.stderr
    assert served == ("green", V2.tag)  # the rollback took effect
    assert impostor["status"] == "running", impostor
    assert kept["id"] == planned["id"] and kept["status"] == "running", kept
    assert (f"not stopping {blue}: the blue slot's container changed since this run was "
            f"planned (planned id {planned['id'][:12]} image {V3.image}, now id "
            f"{impostor['id'][:12]} image {V3.image})") in run.stderr, run.stderr
    assert "docker events" in run.stderr, run.stderr


def test_an_action_sent_by_id_acts_on_that_container_whatever_holds_its_name(
        drill_stack: DrillStack) -> None:
    """The act itself goes to the planned container's id: a name swapped between the run's
    check and its request still cannot redirect a start or a stop to another container."""
    name = f"identity-probe-{os.getpid()}"
    made: list[str] = []

    def create(under: str) -> str:
        done = subprocess.run(["docker", "create", "--name", under, "--entrypoint", "sleep",
                               V1.image, "600"], capture_output=True, text=True, check=True)
        made.append(under)
        return done.stdout.strip()

    try:
        planned = create(name)
        subprocess.run(["docker", "rename", name, f"{name}-aside"], check=True,
                       capture_output=True)
        made[0] = f"{name}-aside"
        other = create(name)
        start = docker.start_action(name, planned)
        assert start.as_planned() == f"docker start {name} (id {planned[:12]}, as planned)"
        docker.run(start)
        assert docker_says(planned)["status"] == "running"
        assert docker_says(other)["started"] == NEVER  # the one under the name: untouched
        docker.run(docker.stop_action(name, 1, ident=planned))
        assert docker_says(planned)["status"] == "exited"
        assert docker_says(other)["status"] == "created"
    finally:
        for each in made:
            subprocess.run(["docker", "rm", "-f", each], capture_output=True, check=False)
