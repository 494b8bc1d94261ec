"""Slot containers made by `docker run --rm` (HostConfig.AutoRemove), as a host's own script
may make them: Docker deletes such a container when it stops. Found by a lifecycle review:
a rollback's refusal named the serving container as the one to recreate when the previous
one was gone, status said "No problems found" of it, and the old slot's stop, titled
"kept, not removed", deleted the only way back on a `docker run` host. Real containers, the
real CLI; the oracles are `docker inspect`, the proxy's answer, Caddy's admin API and the
state file's bytes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runbook import environment as envmod
from runbook import health
from runbook.drill import http as drill_http
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot
from tests.drill_checks import runbook_cli, through_proxy

pytestmark = pytest.mark.docker
V2, V3 = VERSIONS["v2"], VERSIONS["v3"]
PROJECT_LABEL = "com.docker.compose.project"


def inspected(name: str) -> dict[str, object] | None:
    """`docker inspect` of the container, or None when Docker has none of that name."""
    done = subprocess.run(["docker", "inspect", name], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        return None
    found: dict[str, object] = json.loads(done.stdout)[0]
    return found


@pytest.fixture(autouse=True)
def _no_rm_slot_left(drill_stack: DrillStack) -> Iterator[None]:
    """The drill arranges slots by image only: a `--rm` container (or, on a compose shape, a
    `docker run` one) left here would be taken over by the next test's scene."""
    yield
    for slot in Slot:
        name = drill_stack.env.slot(slot).container
        attrs = inspected(name)
        if attrs is None:
            continue
        host = attrs["HostConfig"]
        labels = attrs["Config"]["Labels"] or {}  # type: ignore[index]
        if host["AutoRemove"] or (  # type: ignore[index]
                not drill_stack.has("docker-run") and PROJECT_LABEL not in labels):
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)


def run_with_rm(stack: DrillStack, slot: Slot, image: str) -> None:
    """The slot's container made anew by `docker run --rm` (the drill's docker-run argv, as a
    host's own script makes it), answering healthy."""
    name = stack.env.slot(slot).container
    stack.docker("rm", "-f", name, check=False)
    argv = stack.docker_run_argv(slot, image)
    argv.insert(2, "--rm")
    subprocess.run(argv, check=True, capture_output=True, text=True,
                   env={**os.environ, "DATABASE_URL": stack.app_database_url})
    health.wait_healthy(stack.env, slot, timeout=30)


def caddy_config(env: Environment) -> str:
    return drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).text


def docker_run_host(stack: DrillStack, folder: Path) -> Environment:
    """The environment of a host whose slots `docker run` makes: the drill's on the
    docker-run shape; else the same host described without compose (no file, no services)."""
    if stack.has("docker-run"):
        return stack.env
    env = stack.env
    source = folder / "docker-run-host.toml"
    env = env.with_(slots={s: dataclasses.replace(c, service=None) for s, c in env.slots.items()},
                    compose=dataclasses.replace(env.compose, file=None), source=source)
    source.write_text(envmod.to_toml(env))
    return env


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("runbook: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.shape_specific
def test_absent_previous_on_a_docker_run_made_host_names_it_never_the_serving_one(
        scene_stack: DrillStack) -> None:
    """A compose host whose serving blue was made by `docker run --rm`, the previous green
    (also `--rm`) gone after its stop: the refusal names green as the one to recreate, never
    blue, and status lists it before and after."""
    if scene_stack.has("docker-run"):
        pytest.skip("a compose host: the docker-run shape has no compose file at all")
    scene_stack.arrange(scenes.PREVIOUS)
    env = scene_stack.env
    blue, green = env.slot(Slot.BLUE), env.slot(Slot.GREEN)
    run_with_rm(scene_stack, Slot.BLUE, V3.image)
    scene_stack.docker("rm", "-f", green.container)
    serving = inspected(blue.container)
    assert serving is not None and serving["HostConfig"]["AutoRemove"]  # type: ignore[index]
    state, config = env.state_file.read_bytes(), caddy_config(env)

    def listed(proc: subprocess.CompletedProcess[str]) -> None:
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "No problems found" not in proc.stdout
        problems = proc.stdout.split("Problems:", 1)[1]
        assert f"{green.container} is absent" in problems, proc.stdout
        assert f"recreate green ({green.container}) with {V2.image} on port {green.port}" \
            in problems and "never blue" in problems, proc.stdout

    listed(runbook_cli(env, "status"))
    for args in (("--dry-run",), ("--yes",)):
        proc = runbook_cli(env, "rollback", *args)
        assert proc.returncode == 4, proc.stdout + proc.stderr
        line = error_line(proc)
        assert f"green's container {green.container} is absent and must be recreated with " \
               f"{V2.image} on port {green.port}" in line
        assert f"recreate green ({green.container})" in line and "never blue" in line
        # the old words: "container <blue> was not created by compose ... recreate it"
        assert f"container {blue.container} was not created by compose" not in line
        assert "nothing was changed" in line
        assert through_proxy(env) == ("blue", V3.tag)
        assert caddy_config(env) == config
        assert env.state_file.read_bytes() == state
        now = inspected(blue.container)
        assert now is not None and now["Id"] == serving["Id"]
        assert now["State"]["Status"] == "running"  # type: ignore[index]
        assert inspected(green.container) is None
    listed(runbook_cli(env, "status"))


@pytest.mark.shape_specific
def test_stopping_an_rm_old_slot_compose_can_recreate_says_docker_removes_it(
        scene_stack: DrillStack) -> None:
    """A compose host, its serving blue made by `docker run --rm`: the rollback's stop
    removes it (Docker does); the plan and the result say so, never "kept", and the way
    back is a recreate through compose."""
    if scene_stack.has("docker-run"):
        pytest.skip("a compose host: the docker-run shape has no compose file at all")
    scene_stack.arrange(scenes.PREVIOUS)
    env = scene_stack.env
    blue = env.slot(Slot.BLUE).container
    run_with_rm(scene_stack, Slot.BLUE, V3.image)

    plan = runbook_cli(env, "rollback", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "kept, not removed" not in plan.stdout
    assert "docker stop removes it (it was started with --rm)" in plan.stdout, plan.stdout

    run = runbook_cli(env, "rollback", "--yes")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "kept, not removed" not in run.stdout + run.stderr
    assert "removed by Docker (--rm)" in run.stdout + run.stderr, run.stdout + run.stderr
    assert inspected(blue) is None
    assert through_proxy(env) == ("green", V2.tag)
    back = runbook_cli(env, "rollback", "--dry-run", "--to", V3.tag)
    assert back.returncode == 0, back.stderr
    assert "recreate through compose" in back.stdout


def test_an_rm_old_slot_nothing_could_recreate_is_left_running(
        scene_stack: DrillStack, tmp_path: Path) -> None:
    """A `docker run` host, its serving blue made with `--rm`: `docker stop` would delete the
    only container of that build and nothing here could make it again, so the rollback
    leaves it running, says why and how to stop it by hand; the way back stays."""
    scene_stack.arrange(scenes.PREVIOUS)
    run_with_rm(scene_stack, Slot.BLUE, V3.image)
    env = docker_run_host(scene_stack, tmp_path)
    blue = env.slot(Slot.BLUE).container
    before = inspected(blue)
    assert before is not None

    plan = runbook_cli(env, "rollback", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "kept, not removed" not in plan.stdout
    assert f"{blue} was started with --rm" in plan.stdout and "left running" in plan.stdout, \
        plan.stdout

    run = runbook_cli(env, "rollback", "--yes")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "kept, not removed" not in out
    assert "left running" in out and f"docker stop {blue}" in out and "--rm" in out, out
    after = inspected(blue)
    assert after is not None and after["Id"] == before["Id"], "the way back was deleted"
    assert after["State"]["Status"] == "running"  # type: ignore[index]
    assert through_proxy(env) == ("green", V2.tag)

    status = runbook_cli(env, "status")
    assert status.returncode == 0, status.stdout
    assert "--rm" in status.stdout.split("Notes:", 1)[1], status.stdout
    for way_back in (("rollback", "--dry-run", "--to", V3.tag),
                     ("switch", "--dry-run", "--slot", "blue")):
        proc = runbook_cli(env, *way_back)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.shape_specific
def test_a_previous_container_absent_while_a_deploy_holds_the_lock_is_no_problem(
        scene_stack: DrillStack, tmp_path: Path) -> None:
    """A `docker run` host's own deploy removes the slot's container before its `docker
    run`, holding the deploy lock: status listed "the previous deployment's container is
    absent ... recreate green", telling on-call to make a container in the slot that deploy
    is filling right then (found by review). Under a live lock it is not a problem; once the
    lock is released it is."""
    from runbook import lock as locks

    scene_stack.arrange(scenes.PREVIOUS)  # v3 serves on blue, v2 stopped on green
    env = docker_run_host(scene_stack, tmp_path)
    green = env.slot(Slot.GREEN).container
    held = locks.acquire(env, reason="a deploy by hand")
    try:
        scene_stack.docker("rm", "-f", green)
        during = runbook_cli(env, "status", "--format", "json")
    finally:
        locks.release(env, held)
    after = runbook_cli(env, "status", "--format", "json")
    assert inspected(green) is None  # the oracle: Docker has no such container
    checks = [[p["check"] for p in json.loads(proc.stdout)["problems"]]
              for proc in (during, after)]
    assert "previous_absent" not in checks[0], during.stdout
    assert "previous_absent" in checks[1], after.stdout


@pytest.mark.shape_specific
def test_an_absent_previous_whose_tag_holds_another_build_is_not_offered_as_the_way_back(
        scene_stack: DrillStack, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Found by review (MEDIUM, a docker-run host): with the previous deployment v2's
    container gone, status's fix said to recreate green from v2's tag with the host's `docker
    run`, though that tag had been moved to v1's build (`docker tag`): followed, the rollback
    failed its gate. The tag's build names v1's commit in its revision label: the fix says
    so, and puts the recorded commit's build back under the tag first; so does the
    rollback's refusal, which names the same recreate."""
    from runbook import state as states
    from tests.drill_checks import retag

    scene_stack.arrange(scenes.PREVIOUS)  # v3 serves on blue, v2 stopped on green
    env = docker_run_host(scene_stack, tmp_path)
    moved = retag(scene_stack, request, VERSIONS["v1"].image, "togather-retag", tag=V2.tag)
    st = states.read_state(env.state_file)
    assert st.previous is not None
    states.write_state(env.state_file, st.with_(previous=st.previous.with_(image=moved)))
    green = env.slot(Slot.GREEN).container
    scene_stack.docker("rm", "-f", green)
    # the oracle: the tag's build is v1's, by Docker's image id
    assert (inspected(moved) or {}).get("Id") == (inspected(VERSIONS["v1"].image) or {}).get("Id")
    seen = json.loads(runbook_cli(env, "status", "--format", "json").stdout)
    found = [p for p in seen["problems"] if p["check"] == "previous_absent"]
    assert len(found) == 1, seen["problems"]
    fix = found[0]["fix"]
    assert (f"{moved} no longer holds {V2.tag}'s build" in fix
            and f"names commit {VERSIONS['v1'].tag}, the state file records {V2.tag}" in fix
            and f"put commit {V2.git_commit}'s build back under {moved} first" in fix), fix
    assert fix.index("back under") < fix.index(f"recreate green ({green}) with {moved}"), fix
    # the rollback's own refusal (it cannot make green here) says it too, before its recreate
    refused = runbook_cli(env, "rollback", "--dry-run")
    line = error_line(refused)
    assert refused.returncode == 4, refused.stderr
    assert (f"{moved} no longer holds {V2.tag}'s build" in line
            and line.index("back under") < line.index(f"recreate {green} with {moved}")), line


def test_a_restoring_rollback_refuses_an_rm_app_slot_its_stop_would_delete(
        scene_stack: DrillStack, tmp_path: Path) -> None:
    """The serving green made by `docker run --rm`: the restore's maintenance stop would
    have Docker delete it, so its undo ("start the stopped app containers again") found
    nothing to start, exit 5 with nothing serving (found by review). Refused while planned,
    dry run and real alike, nothing changed."""
    scene_stack.arrange(scenes.MIGRATED)  # v2 serves on green, v1 stopped on blue
    run_with_rm(scene_stack, Slot.GREEN, V2.image)
    env = docker_run_host(scene_stack, tmp_path)
    green = env.slot(Slot.GREEN).container
    serving = inspected(green)
    assert serving is not None and serving["HostConfig"]["AutoRemove"]  # type: ignore[index]
    state = env.state_file.read_bytes()

    def migrations() -> list[tuple[object, ...]]:
        with scene_stack.connect() as conn:
            return list(conn.execute("SELECT * FROM schema_migrations").fetchall())

    schema = migrations()
    for args in (("--dry-run",), ("--yes",)):
        proc = runbook_cli(env, "rollback", "--restore-snapshot", *args)
        assert proc.returncode == 4, proc.stdout + proc.stderr
        line = error_line(proc)
        assert f"{green} was started with --rm" in line and "could start it again" in line, line
        assert "without --rm" in line and "by hand" in line, line
        assert through_proxy(env) == ("green", V2.tag)
        now = inspected(green)
        assert now is not None and now["Id"] == serving["Id"], "the serving slot was deleted"
        assert now["State"]["Status"] == "running"  # type: ignore[index]
        assert env.state_file.read_bytes() == state
        assert migrations() == schema
