"""`runbook status` says "No problems" only when there are none, and each problem has its fix.

Every case is arranged for real on the drill stack (stopped database, a state file without a
current deployment, a lock left by a dead process, a standby left running, fields a state file
may leave out or fill with control characters) and `runbook status` is run as on-call would,
through the stack's environment file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runbook import compose, files
from runbook import state as states
from runbook.drill import http as drill_http
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot
from tests.drill_checks import retag, running_from, serving

pytestmark = pytest.mark.docker
REPO_ROOT = Path(__file__).resolve().parents[1]
NO_PROBLEMS = "No problems found: the state file matches what runs."
V1, V2 = VERSIONS["v1"], VERSIONS["v2"]



def status(stack: DrillStack, source: Path | None = None
           ) -> tuple[int, str, list[dict[str, str]]]:
    """(exit code, the text output, the JSON problems), through the stack's environment file
    or `source`."""
    argv = [sys.executable, "-m", "runbook.cli", "status", str(source or stack.env.source)]
    text = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    data = subprocess.run([*argv, "--format", "json"], capture_output=True, text=True,
                          timeout=120, check=False, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    assert "Traceback" not in text.stderr + data.stderr, text.stderr + data.stderr
    assert text.returncode == data.returncode, (text.returncode, data.returncode)
    return text.returncode, text.stdout, json.loads(data.stdout)["problems"]


def status_with(stack: DrillStack, toml: Path, **caddy: str) -> subprocess.CompletedProcess[str]:
    """`runbook status --format json` through an environment file whose [caddy] differs."""
    import dataclasses

    from runbook import environment as envmod

    env = stack.env
    toml.write_text(envmod.to_toml(dataclasses.replace(
        env, caddy=dataclasses.replace(env.caddy, **caddy))))
    argv = [sys.executable, "-m", "runbook.cli", "status", str(toml), "--format", "json"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL, cwd=REPO_ROOT)


def problem(problems: list[dict[str, str]], words: str) -> dict[str, str]:
    found = [p for p in problems if words in p["problem"]]
    assert found, (words, problems)
    assert found[0]["fix"], found[0]
    return found[0]


def assert_listed(code: int, text: str, problems: list[dict[str, str]]) -> None:
    assert code == 1 and problems and NO_PROBLEMS not in text, text
    assert "Problems:" in text
    assert text.count("\n  ! ") == len(problems), text
    for p in problems:  # each problem is printed with its fix
        assert f"    fix: {p['fix']}" in text, text


def test_the_baseline_has_no_problems_and_prints_no_none(stack: DrillStack) -> None:
    code, text, problems = status(stack)
    assert (code, problems) == (0, []), text
    assert text.strip().splitlines()[-1] == NO_PROBLEMS
    assert "None" not in text


def test_database_unreachable_is_a_problem(stack: DrillStack) -> None:
    stack.docker("stop", stack.env.database.container)
    code, text, problems = status(stack)
    assert_listed(code, text, problems)
    found = problem(problems, "database unreachable")
    assert stack.env.database.container in found["fix"]
    assert stack.password not in text + json.dumps(problems)


def test_no_current_deployment_while_a_slot_serves(stack: DrillStack) -> None:
    states.write_state(stack.env.state_file, states.DeploymentState(environment=stack.env.name))
    code, text, problems = status(stack)
    assert_listed(code, text, problems)
    found = problem(problems, "no current deployment is recorded, yet the blue slot serves")
    assert f"runbook deploy {stack.env.source} --version {V1.tag}" in found["fix"]


def test_a_stale_lock_of_a_dead_process(stack: DrillStack) -> None:
    code = ("import sys, pathlib; from runbook import environment, lock; "
            "lock.acquire(environment.load_file(pathlib.Path(sys.argv[1])), reason='crashed')")
    subprocess.run([sys.executable, "-c", code, str(stack.env.source)], check=True,
                   cwd=REPO_ROOT, timeout=60)
    code_, text, problems = status(stack)
    assert_listed(code_, text, problems)
    found = problem(problems, "the deploy lock is stale")
    assert "no longer running" in found["problem"]
    assert f"runbook unlock {stack.env.source} --yes" in found["fix"]


def test_a_lock_whose_age_cannot_be_told_is_a_problem_with_its_way_out(
        stack: DrillStack) -> None:
    """The Go CLI's lock (state file only) dated 6 h in the future (taken while the clock was
    ahead, then set back): every run refuses it, and only `unlock --force` clears it. Status
    showed it on its lock line only, listed no problem and exited 0 (found by review)."""
    from datetime import UTC, datetime, timedelta

    state = json.loads(stack.env.state_file.read_text())
    then = datetime.now(UTC) + timedelta(hours=6)
    state["lock"] = {"locked": True, "locked_by": "ci@build-runner", "hostname": "build-runner",
                     "reason": "deploy e4d2c1b",
                     "locked_at": then.strftime("%Y-%m-%dT%H:%M:%SZ"),
                     "expires_at": (then + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    stack.env.state_file.write_text(json.dumps(state, indent=2))
    code, text, problems = status(stack)
    assert_listed(code, text, problems)
    found = problem(problems, "the deploy lock's age cannot be told")
    assert "in the future" in found["problem"], found
    assert f"runbook unlock {stack.env.source} --force" in found["fix"], found


def test_a_serving_container_of_another_build_than_the_file_names_is_a_problem(
        stack: DrillStack) -> None:
    """Status compares the build (image id) when the names differ, so that a container made
    from `:latest` is not blamed on someone outside the runbook: a name for ANOTHER build is
    still the problem it was. Oracle: the state file as written here, Docker's images."""
    from runbook import docker

    st = states.read_state(stack.env.state_file)
    assert st.current is not None and st.current.version == V1.tag
    assert docker.image_id(V2.image) != docker.image_id(V1.image)  # the premise
    states.write_state(stack.env.state_file, st.with_(current=st.current.with_(image=V2.image)))
    code, text, problems = status(stack)
    assert_listed(code, text, problems)
    found = problem(problems, f"state says {V2.image} is current, the active slot runs "
                              f"{V1.image}")
    assert found["check"] == "image_differs", found


def test_a_standby_left_running_another_version(stack: DrillStack) -> None:
    # the baseline's green runs the live image (a hot spare): no problem; another image is one
    compose.run(compose.recreate_slot(stack.env, Slot.GREEN, V2.tag))
    code, text, problems = status(stack)
    assert_listed(code, text, problems)
    found = problem(problems, "the standby slot green is left running")
    assert V2.image in found["problem"]
    assert f"docker stop {stack.env.slot('green').container}" in found["fix"]


def test_a_standby_holding_the_live_build_under_a_moving_tag_is_a_hot_spare(
        stack: DrillStack, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The standby check compared names: a standby made from `<repo>:latest` naming the build
    that serves was said to be "left running" with a fix to stop it, though it is the hot
    spare the check means to leave alone. The builds (image ids) are compared: the same build
    is no problem, another build under the same moving tag still is. Oracle: Docker's images
    (the tag is the test's own, moved here)."""
    if stack.has("docker-run"):
        pytest.skip("the standby is made through compose; a docker-run host has none")
    latest = retag(stack, request, V1.image, "togather-moving", tag="latest")
    running_from(stack.env, tmp_path / "same", Slot.GREEN, latest)
    code, text, problems = status(stack)
    assert (code, problems) == (0, []), text
    stack.docker("tag", V2.image, latest)  # the tag moves on to another build
    running_from(stack.env, tmp_path / "other", Slot.GREEN, latest)
    code, text, problems = status(stack)
    assert_listed(code, text, problems)
    found = problem(problems, f"the standby slot green is left running ({latest})")
    assert found["check"] == "standby_running", found


def test_no_current_deployment_names_the_version_a_moving_tag_runs(
        stack: DrillStack, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The fix for "no current deployment" named the serving container's tag as the version:
    made from `<repo>:latest`, it said `runbook deploy ... --version latest`, which the deploy
    refuses (a version is a 7-hex commit). The version the container runs is named (its
    /health, else its image's labels). Oracle: the drill's versions."""
    if stack.has("docker-run"):
        pytest.skip("the container is made through compose; a docker-run host has none")
    latest = retag(stack, request, V1.image, "togather-moving", tag="latest")
    running_from(stack.env, tmp_path, Slot.BLUE, latest)
    states.write_state(stack.env.state_file, states.DeploymentState(environment=stack.env.name))
    code, text, problems = status(stack)
    assert_listed(code, text, problems)
    found = problem(problems, "no current deployment is recorded, yet the blue slot serves")
    assert f"runbook deploy {stack.env.source} --version {V1.tag}`" in found["fix"], found
    assert "--version latest" not in text, text


def test_a_standby_another_site_proxies_to_is_never_to_be_stopped(stack: DrillStack) -> None:
    """Found by review: with another site of the Caddyfile (outside the markers) proxying to
    the standby's port, status said "stop it (it takes no traffic)": that site's traffic."""
    compose.run(compose.recreate_slot(stack.env, Slot.GREEN, V2.tag))
    text = stack.env.caddy.caddyfile.read_text()
    pinned = text.replace('respond /ping "pong" 200',
                          f"reverse_proxy localhost:{stack.env.slot(Slot.GREEN).port}")
    assert pinned != text
    files.atomic_write(stack.env.caddy.caddyfile, pinned.encode())
    drill_http.post(f"{stack.env.caddy.admin_url}/load", content=pinned,
                    headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()
    _, text_out, problems = status(stack)
    assert not [p for p in problems if "docker stop" in p["fix"]], problems
    assert "it takes no traffic" not in text_out, text_out


def test_unrecorded_fields_and_control_characters(stack: DrillStack) -> None:
    st = states.read_state(stack.env.state_file)
    assert st.current is not None
    forged = f"drill\n{NO_PROBLEMS}\n\x1b[2Jop\u202eerator"
    states.write_state(stack.env.state_file, st.with_(current=st.current.with_(
        migration_version=None, status=None, deployed_by=forged)))
    code, text, problems = status(stack)
    assert (code, problems) == (0, []), text
    lines = text.splitlines()
    assert lines.count(NO_PROBLEMS) == 1 and lines[-1] == NO_PROBLEMS, text
    assert "None" not in text
    current = next(line for line in lines if line.startswith("  current"))
    assert "schema not recorded" in current and "status not recorded" in current, current
    assert "\\n" in current and "\\x1b" in current and "\\u202e" in current, current
    assert not re.search(r"[\x00-\x1f\x7f\u202e]", text.replace("\n", "")), text


def test_traffic_that_cannot_be_read_is_a_problem_even_when_caddy_answers(
        stack: DrillStack, tmp_path: Path) -> None:
    """The review's case: an admin URL that answers 200 with something that is not Caddy's
    config (a site's catch-all page): which slot serves could not be read, every check that
    needs it was skipped, and status said "No problems found", exit 0."""
    with serving(200, b"<!doctype html><title>app</title>", "text/html") as port:
        done = status_with(stack, tmp_path / "catch-all-admin.toml",
                           admin_url=f"http://127.0.0.1:{port}")
    assert "Traceback" not in done.stderr, done.stderr
    problems = json.loads(done.stdout)["problems"]
    assert done.returncode == 1 and problems, done.stdout
    assert all(p["fix"] for p in problems), problems


def test_a_caddyfile_that_cannot_be_read_never_says_caddy_is_not_answering(
        stack: DrillStack) -> None:
    """Found by review: with the Caddyfile unreadable (here moved away), status printed
    "Caddy NOT answering" of a Caddy that answered (and served the traffic it showed): the
    JSON's caddy section lost `running`. Oracle: Caddy's admin API answers here."""
    from runbook.drill import http as drill_http

    stack.reset()
    caddyfile = stack.env.caddy.caddyfile
    aside = caddyfile.with_name(caddyfile.name + ".aside")
    caddyfile.rename(aside)
    try:
        assert drill_http.get(f"{stack.env.caddy.admin_url}/config/", timeout=5).status_code == 200
        code, text, problems = status(stack)
        data = json.loads(subprocess.run(
            [sys.executable, "-m", "runbook.cli", "status", str(stack.env.source), "--format",
             "json"], capture_output=True, text=True, timeout=120, check=False,
            stdin=subprocess.DEVNULL, cwd=REPO_ROOT).stdout)
    finally:
        aside.rename(caddyfile)
    assert "Caddy answering" in text and "NOT answering" not in text, text
    assert data["caddy"]["running"] is True and data["caddy"]["error"], data["caddy"]
    assert code == 1 and problem(problems, "Caddyfile")


def test_no_recorded_deployment_on_a_host_without_compose_names_what_works_there(
        tmp_path: Path) -> None:
    """On a `docker run` host, status told on-call to record the serving version with
    `runbook deploy`, which needs compose and refuses there. The facts are as `gather` reads
    them: Caddy serves blue, blue runs, the state file records nothing."""
    import dataclasses

    from runbook import docker, traffic
    from runbook import status as statusmod
    from tests.drill_checks import host_env

    base = host_env(tmp_path)
    compose_file = tmp_path / "docker-compose.blue-green.yml"
    compose_file.write_text("services: {}\n")
    with_compose = base.with_(
        compose=dataclasses.replace(base.compose, file=compose_file),
        slots={s: dataclasses.replace(c, service=c.service or f"togather-{s}")
               for s, c in base.slots.items()})
    for env, says_deploy in ((base.with_(compose=dataclasses.replace(base.compose, file=None)),
                              False),
                             (with_compose, True)):
        f = statusmod.Facts(env)
        f.state = states.DeploymentState(environment=env.name)
        f.traffic = traffic.Traffic(slots=frozenset({Slot.BLUE}), dials=())
        f.containers[Slot.BLUE] = docker.ContainerInfo(
            env.slot(Slot.BLUE).container, True, "running", "togather-server:abc1234")
        [found] = list(statusmod.no_current_deployment(f))
        assert ("`runbook deploy " in found.fix and "--version abc1234`" in found.fix) \
            == says_deploy, found.fix


def test_no_current_deployment_never_names_a_moving_tag_as_the_version(
        tmp_path: Path) -> None:
    """The facts as `gather` reads them when the serving container was made from `:latest`:
    the version comes from its /health, else its image's labels (Docker copies them onto the
    container), else a placeholder for on-call to fill in, never `--version latest`."""
    import dataclasses

    from runbook import docker, health, traffic
    from runbook import status as statusmod
    from tests.drill_checks import host_env

    base = host_env(tmp_path)
    compose_file = tmp_path / "docker-compose.blue-green.yml"
    compose_file.write_text("services: {}\n")
    env = base.with_(compose=dataclasses.replace(base.compose, file=compose_file))
    label = {"org.opencontainers.image.version": "abc1234"}
    answered = health.HealthReport("http://127.0.0.1:8081/health", "healthy", version="def5678")
    down = health.HealthReport("http://127.0.0.1:8081/health", "unreachable")
    for labels, report, named in ((label, answered, "def5678"), (label, down, "abc1234"),
                                  ({}, down, "<version>"),
                                  ({"org.opencontainers.image.version": "latest"}, None,
                                   "<version>")):
        f = statusmod.Facts(env)
        f.state = states.DeploymentState(environment=env.name)
        f.traffic = traffic.Traffic(slots=frozenset({Slot.BLUE}), dials=())
        f.containers[Slot.BLUE] = docker.ContainerInfo(
            env.slot(Slot.BLUE).container, True, "running", "togather-server:latest",
            labels=labels)
        if report is not None:
            f.reports[Slot.BLUE] = report
        [found] = list(statusmod.no_current_deployment(f))
        assert f"--version {named}`" in found.fix, (named, found.fix)
        assert "--version latest" not in found.fix, found.fix


def test_a_proxy_that_serves_nobody_is_a_problem(stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: status read which slot serves from Caddy's config and asked that
    slot's /health on its own port, never what users get through Caddy: with the proxy
    refusing connections, or answering 502 on its own, it said "No problems found"."""

    from tests.drill_checks import closed_port

    env = stack.env
    done = status_with(stack, tmp_path / "closed-proxy.toml",
                       proxy_url=f"http://127.0.0.1:{closed_port()}")
    assert "Traceback" not in done.stderr, done.stderr
    found = json.loads(done.stdout)
    assert done.returncode == 1, done.stdout
    # a port Caddy's site does not listen on, while blue is healthy: the URL is wrong, users
    # are served (test_addresses.py); a refusal where Caddy listens is said as not served
    wrong = problem(found["problems"], "proxy_url http://127.0.0.1:")
    said = wrong["problem"]
    assert "connection refused" in said and "Caddy's site listens on" in said, said
    # the check it names runs as printed: the environment as given, a file (found by review)
    assert f"`runbook status {tmp_path / 'closed-proxy.toml'}`" in wrong["fix"], wrong
    assert "connection refused" in found["traffic"]["proxy_error"], found["traffic"]

    serving = env.slot(Slot.BLUE).container  # the baseline: blue serves
    stack.docker("stop", serving)
    code, text, problems = status(stack)
    assert_listed(code, text, problems)
    said = problem(problems, "users are not served through the proxy")["problem"]
    assert "HTTP 502" in said, said
    problem(problems, "the active slot blue is")  # and its own /health, as before


def _run_printed(command: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """A `runbook ...` command as a fix prints it, run through the CLI (with `extra`)."""
    import shlex

    return subprocess.run([sys.executable, "-m", "runbook.cli", *shlex.split(command)[1:],
                           *extra], capture_output=True, text=True, timeout=300, check=False,
                          stdin=subprocess.DEVNULL, cwd=REPO_ROOT)


def _way_out_fixes(problems: list[dict[str, str]]) -> list[dict[str, str]]:
    """The problems whose fix is the outage's way out (a rollback, a switch, a redeploy)."""
    return [p for p in problems if p["check"] in ("active_unhealthy", "proxy_unanswered")]


def test_a_removed_serving_container_after_a_rollback_is_said_absent_and_redeployed(
        scene_stack: DrillStack) -> None:
    """Found by review ("follow the printed fix verbatim"): after a rollback (v2 on green, v3
    rolled back from), the serving container removed, status said only "unreachable" / 502
    and named `runbook rollback ENV --to <an older version than v2>`: the only one, v1, ran
    with schema 1 on a schema-2 database, and that rollback is refused (exit 4, offering
    --force). The fix says the container is absent and names the redeploy of the recorded
    build, which, typed as printed, serves users again. Oracle: the dry run's exit, the
    proxy."""
    from runbook import rollback
    from tests.drill_checks import two_deployments
    from tests.test_interrupted import through_proxy

    env = two_deployments(scene_stack)  # v3 on blue, v2 the previous
    rollback.rollback(env)  # v2 on green serves, v3 is the one rolled back from
    green = env.slot(Slot.GREEN).container
    # removed, not stopped: a stopped container of the recorded build is started again
    # (test_a_stopped_serving_container_is_said_first_and_its_printed_fix_serves_users_again)
    scene_stack.docker("rm", "-f", green)
    refused = _cli(env.source, "rollback", "--to", V1.tag, "--dry-run")  # the premise
    assert refused.returncode == 4, refused.stdout + refused.stderr
    code, text, problems = status(scene_stack)
    assert_listed(code, text, problems)
    assert "runbook rollback" not in json.dumps(problems), problems
    said = _way_out_fixes(problems)
    assert {p["check"] for p in said} == {"active_unhealthy", "proxy_unanswered"}, problems
    redeploy = f"runbook deploy {env.source} --version {V2.tag}"
    for p in said:
        assert f"{green} is absent" in p["problem"] + p["fix"], p
        assert f"`{redeploy}`" in p["fix"], p
    done = _run_printed(redeploy, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("blue", V2.tag)
    code, text, problems = status(scene_stack)
    assert not _way_out_fixes(problems), text


def test_a_removed_serving_container_of_a_healthy_release_is_redeployed_first(
        scene_stack: DrillStack) -> None:
    """PREVIOUS (v3 serving from blue, v2 stopped on green), blue's container removed: the
    rollback runs, but it takes users off a healthy release because a container was removed.
    The fix says the container is absent and names the redeploy of the recorded build first,
    then the rollback; the redeploy, typed as printed, serves v3 again. Oracle: the dry
    runs, the proxy."""
    from runbook.drill import scenes
    from tests.test_interrupted import through_proxy

    scene_stack.arrange(scenes.PREVIOUS)
    env = scene_stack.env
    blue = env.slot(Slot.BLUE).container
    scene_stack.docker("rm", "-f", blue)
    code, text, problems = status(scene_stack)
    assert_listed(code, text, problems)
    redeploy = f"runbook deploy {env.source} --version {VERSIONS['v3'].tag}"
    said = _way_out_fixes(problems)
    assert said, problems
    for p in said:
        assert f"{blue} is absent" in p["problem"] + p["fix"], p
        assert f"`{redeploy}`" in p["fix"], p
        assert f"`runbook rollback {env.source}`" in p["fix"], p
        assert p["fix"].index(redeploy) < p["fix"].index("runbook rollback"), p
    _each_runs(_changing(problems))
    done = _run_printed(redeploy, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("green", VERSIONS["v3"].tag)
    code, text, problems = status(scene_stack)
    assert not _way_out_fixes(problems), text


def test_status_in_an_outage_on_a_caddy_reload_host_writes_nothing_beside_the_caddyfile(
        scene_stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: status plans the rollback in an outage to decide whether to name it,
    and with reload = caddy-reload (or systemctl) that plan's pre-flight ran `caddy validate`
    and `caddy adapt` of temp files beside the Caddyfile (.Caddyfile.runbook-*.tmp): status,
    which writes nothing, wrote there, and one killed meanwhile left them. The `[caddy]
    command` here is a stand-in that records each call, then runs Caddy. Oracle: the calls,
    the folder's entries and its mtime; `rollback --dry-run` still checks the tools."""
    from runbook.drill import scenes
    from tests.drill_checks import caddy_reload_through

    scene_stack.arrange(scenes.PREVIOUS)
    env = scene_stack.env
    calls = tmp_path / "calls"
    source = caddy_reload_through(env, tmp_path, f'echo "$1" >> {calls}')
    scene_stack.docker("rm", "-f", env.slot(Slot.BLUE).container)
    dry = _cli(source, "rollback", "--dry-run")  # the premise: it plans, checking the tools
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "validate" in calls.read_text().split(), calls.read_text()
    calls.unlink()
    folder = env.caddy.caddyfile.parent
    before = (sorted(p.name for p in folder.iterdir()), folder.stat().st_mtime_ns)
    code, text, problems = status(scene_stack, source)
    assert_listed(code, text, problems)
    assert not calls.exists(), calls.read_text()  # no `caddy` started
    assert (sorted(p.name for p in folder.iterdir()), folder.stat().st_mtime_ns) == before
    said = _way_out_fixes(problems)
    assert said, problems
    for p in said:  # the rollback still judged, and named
        assert f"`runbook rollback {source}`" in p["fix"], p
        assert "is refused now" not in p["fix"], p


def test_a_dirty_schema_points_the_outage_at_its_repair_never_at_a_refused_rollback(
        scene_stack: DrillStack) -> None:
    """Found by review: PREVIOUS with the schema left dirty (no snapshot at schema 2): the
    unhealthy active slot's fix said `runbook rollback ENV`, refused (exit 4: the schema is
    dirty, "or pass --force"). It points at the dirty schema's own problem, whose repair
    (here: the flag cleared, as `migrate force` does once nothing was left half-applied)
    serves users again. Oracle: the dry run's exit, the proxy."""
    from runbook.drill import scenes
    from tests.test_interrupted import through_proxy

    scene_stack.arrange(scenes.PREVIOUS)
    env = scene_stack.env
    try:
        with scene_stack.connect() as conn:
            conn.execute("UPDATE schema_migrations SET dirty = true")
        refused = _cli(env.source, "rollback", "--dry-run")  # the premise
        assert refused.returncode == 4 and "dirty" in refused.stdout + refused.stderr, \
            refused.stdout + refused.stderr
        code, text, problems = status(scene_stack)
        assert_listed(code, text, problems)
        assert "runbook rollback" not in json.dumps(problems), problems
        problem(problems, "the database schema is dirty at version 2")
        [unhealthy] = [p for p in problems if p["check"] == "active_unhealthy"]
        assert "the database schema is dirty" in unhealthy["fix"], unhealthy
    finally:
        with scene_stack.connect() as conn:
            conn.execute("UPDATE schema_migrations SET dirty = false")
    assert through_proxy(env) == ("blue", VERSIONS["v3"].tag)
    code, text, problems = status(scene_stack)
    assert (code, problems) == (0, []), text


def test_a_schema_migrations_holding_several_rows_is_a_schema_not_known_and_never_snapshotted(
        scene_stack: DrillStack) -> None:
    """Found by review: schema_migrations holding rows 3, 9 and 7 (in that order): `status`
    said "database schema 3" and `snapshot create` recorded schema 3 in its sidecar, the
    row first on disk. golang-migrate keeps one row: status says the schema is not known,
    with the rows and the repair; the snapshot is refused (exit 4), as for a version that
    cannot be read, and writes nothing. Oracle: the rows inserted here, the folder."""
    from runbook.drill import scenes

    scene_stack.arrange(scenes.PREVIOUS)
    env = scene_stack.env
    folder = env.database.snapshot_dir
    try:
        with scene_stack.connect() as conn:
            conn.execute("DELETE FROM schema_migrations")
            for version in (3, 9, 7):
                conn.execute("INSERT INTO schema_migrations VALUES (%s, false)", (version,))
        code, text, problems = status(scene_stack)
        files = sorted(folder.iterdir()) if folder.exists() else []
        made = _cli(env.source, "snapshot", "create")
        files_after = sorted(folder.iterdir()) if folder.exists() else []
        with scene_stack.connect() as conn:
            rows = conn.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()
    finally:
        with scene_stack.connect() as conn:
            conn.execute("DELETE FROM schema_migrations")
            conn.execute("INSERT INTO schema_migrations VALUES (2, false)")
    assert_listed(code, text, problems)
    said = "schema_migrations holds 3 rows (versions 3, 7, 9); golang-migrate keeps one"
    found = problem(problems, said)
    assert "force" in found["fix"] and "DELETE FROM" in found["fix"], found
    assert "database schema 3" not in text and "schema 3" not in text, text
    [database_line] = [line for line in text.splitlines() if line.startswith("  database  ")]
    assert said in database_line, database_line
    assert made.returncode == 4, made.stdout + made.stderr
    assert said in made.stderr and "Traceback" not in made.stderr, made.stderr
    assert files_after == files, made.stdout
    assert rows == [(3,), (7,), (9,)]


def test_caddy_dialing_a_third_port_names_the_switch_that_runs_never_the_refused_rollback(
        scene_stack: DrillStack) -> None:
    """Found by review: PREVIOUS, Caddy's running config (loaded through its admin API, the
    file left as it is) dialing a port no slot listens on: the fix said "roll back (`runbook
    rollback ENV`), or switch to blue"; the rollback is refused (exit 4: which slot takes
    traffic cannot be told). Only the switch is named, and, typed as printed, it serves
    users again. Oracle: the dry run's exit, the proxy."""
    from runbook import caddy
    from runbook.drill import scenes
    from tests.drill_checks import closed_port
    from tests.test_interrupted import through_proxy

    scene_stack.arrange(scenes.PREVIOUS)
    env = scene_stack.env
    text = caddy.read(env)
    start, end = caddy.find_block(text)
    dead = closed_port()
    block = text[start:end].replace(f"localhost:{env.slot(Slot.BLUE).port}",
                                    f"localhost:{dead}")
    drill_http.post(f"{env.caddy.admin_url}/load", content=text[:start] + block + text[end:],
                    headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()
    assert drill_http.get(f"{env.caddy.proxy_url}/version", timeout=5).status_code == 502
    refused = _cli(env.source, "rollback", "--dry-run")  # the premise
    assert refused.returncode == 4, refused.stdout + refused.stderr
    code, text_out, problems = status(scene_stack)
    assert_listed(code, text_out, problems)
    assert "runbook rollback" not in json.dumps(problems), problems
    [unserved] = [p for p in problems if p["check"] == "proxy_unanswered"]
    [switch] = _typed(unserved["fix"], "runbook switch")
    assert switch[1:] == ["switch", str(env.source), "--slot", "blue"], unserved
    done = _run_printed(" ".join(switch), "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v3"].tag)
    code, text_out, problems = status(scene_stack)
    assert (code, problems) == (0, []), text_out


@pytest.mark.parametrize("how", ["stop", "pause"])
def test_a_stopped_serving_container_is_said_first_and_its_printed_fix_serves_users_again(
        scene_stack: DrillStack, how: str) -> None:
    """Found by review: with the serving slot's container stopped (a reboot, the OOM killer, a
    stray `docker stop`), status said only that users were not served and the slot was
    unreachable, and named a rollback (refused by the schema guard, offering --force) or a
    switch to the older build (failing its gate) or, for the serving slot, one refused as
    "nothing to switch". `docker start` alone brings the recorded build back: said first
    among the outage's problems, and no fix moves users off that build. Oracle: Docker and
    the proxy; the fix is run as printed. A paused one (found by review) the same, its fix
    `docker unpause`: it was said only as unreachable, the fix a rollback."""
    import shlex
    import time

    from runbook import docker
    from runbook.drill import scenes

    scene_stack.arrange(scenes.MIGRATED)  # v2 serves from green on schema 2; v1 on blue
    env = scene_stack.env
    green = env.slot(Slot.GREEN).container
    scene_stack.docker(how, green)
    assert docker.inspect(green).status == {"stop": "exited", "pause": "paused"}[how]
    if how == "stop":  # a paused one accepts the connection and never answers
        assert drill_http.get(f"{env.caddy.proxy_url}/version", timeout=5).status_code == 502
    code, text, problems = status(scene_stack)
    assert_listed(code, text, problems)
    checks = [p["check"] for p in problems]
    assert checks.index("serving_stopped") < checks.index("proxy_unanswered"), checks
    assert checks.index("serving_stopped") < checks.index("active_unhealthy"), checks
    stopped = problems[checks.index("serving_stopped")]
    assert green in stopped["problem"] and V2.image in stopped["problem"], stopped
    for p in problems:  # no fix moves users off the recorded build while it can be started
        assert "runbook rollback" not in p["fix"] and "runbook switch" not in p["fix"], p
    [command] = re.findall(r"`(docker (?:start|unpause) [^`]*)`", stopped["fix"])
    assert command.split()[1] == {"stop": "start", "pause": "unpause"}[how], command
    subprocess.run(shlex.split(command), check=True, capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while drill_http.get(f"{env.caddy.proxy_url}/version", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "users are still not served"
        time.sleep(0.5)
    response = drill_http.get(f"{env.caddy.proxy_url}/version", timeout=5)
    assert (response.headers["X-Togather-Slot"], response.json()["version"]) == ("green",
                                                                                 V2.tag)
    code, text, problems = status(scene_stack)
    assert (code, problems) == (0, []), text


def test_a_stopped_serving_container_of_another_build_is_never_started_blindly(
        stack: DrillStack) -> None:
    """The stopped serving container holds another build than the state file records as
    current: starting it serves that build, so status says what it holds rather than
    `docker start` as the fix. Oracle: the state file as written here, Docker."""
    st = states.read_state(stack.env.state_file)
    assert st.current is not None and st.current.version == V1.tag
    states.write_state(stack.env.state_file, st.with_(current=st.current.with_(image=V2.image)))
    blue = stack.env.slot(Slot.BLUE).container
    stack.docker("stop", blue)
    code, text, problems = status(stack)
    assert_listed(code, text, problems)
    [stopped] = [p for p in problems if p["check"] == "serving_stopped"]
    assert V1.image in stopped["problem"] and V2.image in stopped["problem"], stopped
    assert not stopped["fix"].startswith("`docker start"), stopped
    assert f"docker inspect {blue}" in stopped["fix"], stopped


def _suspended_rollback(stack: DrillStack, tmp_path: Path) -> tuple[Path, subprocess.Popen[str]]:
    """PREVIOUS (v3 serving from blue, v2 stopped on green), then `runbook rollback --yes`
    suspended (SIGSTOP, as Ctrl-Z does) right before its switch, through an environment file
    whose lock lives 3 s: it is stale by the time status reads it (its heartbeat stopped
    with the process)."""
    import dataclasses
    import os
    import time

    from runbook import environment as envmod
    from runbook import faults
    from runbook.drill import scenes
    from tests.drill_checks import wait_stopped

    stack.arrange(scenes.PREVIOUS)
    toml = tmp_path / "short-lock.toml"
    toml.write_text(envmod.to_toml(dataclasses.replace(stack.env, lock_stale_after=3.0)))
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    run = subprocess.Popen([sys.executable, "-m", "runbook.cli", "rollback", "--yes", str(toml)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
                           env=environ | {faults.VARIABLE: "before:switch:SIGSTOP"})
    wait_stopped(run.pid)
    time.sleep(4)  # its lock expires: stale, its process alive (and stopped)
    return toml, run


def _cli(toml: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runbook.cli", *args, str(toml)],
                          capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL, cwd=REPO_ROOT)


def _typed(fix: str, starting: str) -> list[list[str]]:
    """The commands in backquotes of a fix that start with `starting`, as argument lists."""
    import shlex

    return [shlex.split(c) for c in re.findall(r"`([^`]+)`", fix) if c.startswith(starting)]


@pytest.mark.parametrize("way_out", ["resume", "stop"])
def test_a_suspended_run_is_said_with_both_ways_out_and_never_as_a_lock_to_unlock(
        stack: DrillStack, tmp_path: Path, way_out: str) -> None:
    """Found by review: a rollback suspended (Ctrl-Z, SIGSTOP) before its switch, its lock
    stale: status said "a run is in progress: wait for it to end; do not unlock" (it never
    ends) and, beside it, "the deploy lock is stale: `runbook unlock ENV --yes` (add --force:
    its process still runs)", which unlock refuses (exit 3) even with --force. Now one
    problem says it is suspended, with `kill -CONT PID` (resume) and `kill PID` then
    `kill -CONT PID` (stop: a stopped process takes SIGTERM only once resumed); the
    rollback it blocks says the same; each way out, typed as printed, works."""
    import signal

    from tests.test_interrupted import through_proxy

    toml, run = _suspended_rollback(stack, tmp_path)
    try:
        pid = run.pid
        done = _cli(toml, "status", "--format", "json")
        assert done.returncode == 1, done.stdout + done.stderr
        problems = json.loads(done.stdout)["problems"]
        checks = [p["check"] for p in problems]
        assert "stale_lock" not in checks, problems  # the run's own problem speaks for it
        said = problem(problems, "a run is in progress")
        assert f"its process {pid} is suspended" in said["problem"], said
        fix = said["fix"]
        assert f"`kill -CONT {pid}`" in fix and f"`kill {pid}`" in fix, fix
        assert "wait for it to end" not in fix and "--force" not in json.dumps(problems), fix
        refused = _cli(toml, "rollback", "--yes")  # what the rollback it blocks says
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert f"kill -CONT {pid}" in refused.stderr and "suspended" in refused.stderr, \
            refused.stderr
        assert "(kill " not in refused.stderr, refused.stderr  # never `kill` alone
        resume = _typed(fix, "kill -CONT")[0]  # named for both ways out: the same command
        if way_out == "stop":
            stop, = _typed(fix, f"kill {pid}")
            subprocess.run(stop, check=True, timeout=10)
        subprocess.run(resume, check=True, timeout=10)
        out, err = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            os_kill = __import__("os").kill
            os_kill(run.pid, signal.SIGKILL)
            os_kill(run.pid, signal.SIGCONT)
            run.wait(30)
    if way_out == "resume":  # it carries on where it stopped and finishes
        assert run.returncode == 0, out + err
        assert through_proxy(stack.env) == ("green", V2.tag)
    else:  # stopped as on Ctrl-C before its switch: nothing moved, the lock released
        assert run.returncode != 0, out + err
        assert through_proxy(stack.env) == ("blue", VERSIONS["v3"].tag)
    assert not stack.env.lock_path.exists()
    after = _cli(toml, "status", "--format", "json")
    assert "a run is in progress" not in after.stdout, after.stdout


@pytest.mark.parametrize("edit", ["third-port", "both-slots"])
def test_a_caddyfile_naming_no_slot_is_written_back_by_the_switch_status_names(
        stack: DrillStack, edit: str) -> None:
    """Found by review: the Caddyfile edited by hand to a third port (or its block naming both
    slots), not reloaded, while Caddy serves blue: status said "`runbook switch ENV --slot
    <slot>` rewrites it", and a switch to blue (the slot that serves) was refused, exit 4,
    "nothing to switch; see `runbook status`"; only a switch to green was taken, moving every
    user off a healthy slot to fix a file (and the next reload sent them to the third port).
    Status names the serving slot, and that switch, typed as printed, writes the file back,
    reloads what already runs and moves nobody; run again, it has nothing to do."""
    import shlex

    from runbook import caddy
    from tests.drill_checks import Poller, closed_port
    from tests.test_interrupted import through_proxy

    env = stack.env
    path = env.caddy.caddyfile
    original = path.read_text()
    blue, green = env.slot(Slot.BLUE).port, env.slot(Slot.GREEN).port
    edited = (original.replace(f"localhost:{blue}", f"localhost:{closed_port()}")
              if edit == "third-port" else original.replace(f"localhost:{blue}",
                                                            f"localhost:{green}", 1))
    assert edited != original and caddy.inspect(edited, env).slot is None
    files.atomic_write(path, edited.encode())
    code, text, problems = status(stack)
    assert_listed(code, text, problems)
    fix = problem(problems, "Caddyfile managed block")["fix"]
    commands = [c for c in re.findall(r"`([^`]+)`", fix) if c.startswith("runbook switch")]
    assert commands == [f"runbook switch {env.source} --slot blue"], fix
    argv = [sys.executable, "-m", "runbook.cli", *shlex.split(commands[0])[1:]]
    planned = subprocess.run([*argv, "--dry-run"], capture_output=True, text=True, timeout=120,
                             check=False, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "traffic stays on blue" in planned.stdout, planned.stdout
    with Poller(env) as user:
        done = subprocess.run([*argv, "--yes"], capture_output=True, text=True, timeout=180,
                              check=False, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert user.failures == [], user.failures[:5]
    assert {slot for _, slot, _ in user.seen} == {"blue"}, set(user.seen)
    assert path.read_text() == original  # in line with what runs, byte for byte
    assert through_proxy(env) == ("blue", V1.tag)
    code, text, problems = status(stack)
    assert (code, problems) == (0, []), text
    again = subprocess.run([*argv, "--yes"], capture_output=True, text=True, timeout=120,
                           check=False, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    assert again.returncode == 4 and "nothing to switch" in again.stderr, again.stderr


def test_a_paused_database_is_said_with_unpause_as_every_fix(stack: DrillStack) -> None:
    """Found by review: with the database container paused (`docker pause`), status said
    only that the database could not be read ("check `docker ps`") and that the active slot
    was unhealthy, with "roll back" as its fix (refused by the schema guard: the schema
    cannot be read). It says the container is paused, and every fix unpauses it first; the
    fix, typed as written, brings the database back."""
    stack.reset()
    db = stack.db_container
    stack.docker("pause", db)  # tried again if the freezer gives up (DrillStack.docker)
    try:
        code, _, problems = status(stack)
        assert code != 0
        [found] = [p for p in problems if f"the database container {db} is paused" in p["problem"]]
        assert f"`docker unpause {db}`" in found["fix"], found
        assert not [p for p in problems if "runbook rollback" in p["fix"]
                    or "runbook switch" in p["fix"]], problems
    finally:
        stack.docker("unpause", db)  # as said
    stack.wait_db()
    _, _, problems = status(stack)
    assert not [p for p in problems if "database" in p["problem"]], problems


def _load_a_dead_port(env: Environment) -> None:
    """Caddy loads its Caddyfile with the managed block's upstreams on a closed port (an
    outage: the proxy answers 502), the file on disk changed the same way."""
    from runbook import caddy
    from tests.drill_checks import closed_port

    text = caddy.read(env)
    start, end = caddy.find_block(text)
    block, dead = text[start:end], closed_port()
    for config in env.slots.values():
        block = block.replace(f"localhost:{config.port}", f"localhost:{dead}")
    _load_caddyfile(env, text[:start] + block + text[end:])


def _load_caddyfile(env: Environment, text: str) -> None:
    """The Caddyfile written and loaded as another tool, or a hand edit, does it."""
    files.atomic_write(env.caddy.caddyfile, text.encode())
    drill_http.post(f"{env.caddy.admin_url}/load", content=text,
                    headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()


def test_a_live_lock_of_another_tools_deploy_is_a_problem_with_its_holder_and_way_out(
        stack: DrillStack) -> None:
    """Found by review: the shell tooling's deploy holding the lock (its directory with
    `locked_at` only, mirrored into the state file with its pid, as the contract's "locks"
    says) refused every rollback (exit 3), while status showed it on its lock line only,
    said "No problems found" and exited 0. It is a problem naming its holder, since when,
    and the way out. Oracle: the lock as written here, a live process, the dry run's exit."""
    import os
    import signal
    import socket
    import time
    from datetime import UTC, datetime, timedelta

    env = stack.env
    deploy = subprocess.Popen(["sleep", "300"])  # the other tool's deploy: alive
    try:
        now = int(time.time())
        at = datetime.fromtimestamp(now, UTC)
        env.lock_path.mkdir()
        (env.lock_path / "locked_at").write_text(f"{now}\n")
        state = json.loads(env.state_file.read_text())
        state["lock"] = {"locked": True, "lock_id": "lock_deploysh",
                         "locked_by": "deploy@ci-runner",
                         "locked_at": states.format_time(at),
                         "lock_expires_at": states.format_time(at + timedelta(minutes=30)),
                         "deployment_id": "dep_0123456789abcdef_0123456789abcdef01234567",
                         "pid": deploy.pid, "hostname": socket.gethostname()}
        env.state_file.write_text(json.dumps(state, indent=2))
        refused = _cli(env.source, "rollback", "--dry-run")  # the premise: every run refused
        assert refused.returncode == 3, refused.stdout + refused.stderr
        code, text, problems = status(stack)
        assert_listed(code, text, problems)
        [found] = [p for p in problems if "deploy@ci-runner" in p["problem"]]
        assert states.format_time(at) in found["problem"], found
        assert "wait for" in found["fix"], found
        assert f"`runbook unlock {env.source}`" in found["fix"], found
    finally:
        os.kill(deploy.pid, signal.SIGKILL)
        deploy.wait(10)
        import shutil

        shutil.rmtree(env.lock_path, ignore_errors=True)


@pytest.mark.parametrize("age", [5 * 60, 2 * 3600], ids=["5-min", "2-h"])
def test_an_empty_lock_directory_a_killed_run_left_is_said_as_the_next_run_takes_it_over(
        stack: DrillStack, age: int) -> None:
    """Found by review: a run killed between the deploy lock's mkdir and its holder file
    leaves the directory empty, and the next rollback, deploy or switch takes it over by
    itself once it is 10 s old; status still said it was the shell tooling's lock, live or
    stale, with `unlock` "once it is stale" in 30 min or `unlock --force` as the way out.
    It is said as what it is, with its age and that the next run takes it over; the one
    command offered works as printed, without --force. Oracle: the directory on disk, the
    dry run's exit (not refused on the lock), the printed command's exit."""
    import time

    env = stack.env
    env.lock_path.mkdir()
    try:
        then = time.time() - age
        os.utime(env.lock_path, (then, then))
        dry = _cli(env.source, "rollback", "--dry-run")  # the premise: no run is refused by it
        assert dry.returncode != 3, dry.stdout + dry.stderr
        code, text, problems = status(stack)
        assert_listed(code, text, problems)
        found = problem(problems, "empty")
        assert found["check"] == "stale_lock", found
        said = found["problem"] + " " + found["fix"]
        assert "killed while taking" in found["problem"], found
        assert ("5 min" if age == 300 else "2 h 00 min") in found["problem"], found
        assert "takes it over by itself" in said, found
        everything = text + json.dumps(problems)
        assert "--force" not in everything and "shell tooling" not in everything, everything
        data = json.loads(_cli(env.source, "status", "--format", "json").stdout)
        assert data["lock"]["empty"] is True and "empty" in data["lock"]["summary"], data
        [unlock] = _typed(found["fix"], "runbook unlock")
        done = _run_printed(" ".join(unlock))
        assert done.returncode == 0, done.stdout + done.stderr
        assert not env.lock_path.exists()
        code, text, problems = status(stack)
        assert (code, problems) == (0, []), text
    finally:
        import shutil

        shutil.rmtree(env.lock_path, ignore_errors=True)


def test_an_empty_lock_directory_made_just_now_is_a_run_taking_the_lock_never_removable(
        stack: DrillStack) -> None:
    """Its companion: an empty lock directory younger than 10 s may be a run taking the lock
    at this instant (the shell tooling writes its locked_at right after its mkdir): every run
    is refused by it, and status says to wait, never to remove it; `runbook unlock` keeps it.
    Its mtime is kept fresh while the test runs, as a lock being taken now has it (a loaded
    machine runs status for longer than 10 s). Oracle: the dry run's exit, the directory."""
    import threading

    env = stack.env
    env.lock_path.mkdir()
    stop = threading.Event()

    def fresh() -> None:
        while not stop.wait(0.5):
            os.utime(env.lock_path)

    toucher = threading.Thread(target=fresh, daemon=True)
    toucher.start()
    try:
        refused = _cli(env.source, "rollback", "--dry-run")  # the premise: every run refused
        assert refused.returncode == 3, refused.stdout + refused.stderr
        code, text, problems = status(stack)
        assert_listed(code, text, problems)
        found = problem(problems, "being taken")
        assert "empty" in found["problem"] and "wait" in found["fix"], found
        assert "runbook unlock" not in found["fix"], found
        everything = text + json.dumps(problems)
        assert "--force" not in everything and "shell tooling" not in everything, everything
        kept = _cli(env.source, "unlock", "--yes")
        assert kept.returncode == 3, kept.stdout + kept.stderr
        assert "being taken" in kept.stderr and "--force" not in kept.stderr, kept.stderr
        assert env.lock_path.is_dir()
    finally:
        stop.set()
        toucher.join(5)
        import shutil

        shutil.rmtree(env.lock_path, ignore_errors=True)


def test_traffic_going_nowhere_is_the_first_problem(stack: DrillStack) -> None:
    """Found by review: with Caddy running a config that dials a port where no slot listens
    (users get 502: the outage), status listed the Caddyfile's block and the running config
    first, and "users are not served" third. Oracle: the proxy answers 502 here."""
    env = stack.env
    _load_a_dead_port(env)
    assert drill_http.get(f"{env.caddy.proxy_url}/version", timeout=5).status_code == 502
    code, text_out, problems = status(stack)
    assert_listed(code, text_out, problems)
    assert problems[0]["check"] == "proxy_unanswered", problems
    assert text_out.split("Problems:\n", 1)[1].startswith("  ! users are not served"), text_out


def _caddy_to(env: Environment, slot: Slot) -> None:
    """Caddy pointed at `slot` by hand (written and loaded), the state file left as it is."""
    from runbook import caddy

    text = caddy.read(env)
    start, end = caddy.find_block(text)
    other = slot.other
    block = text[start:end].replace(f"localhost:{env.slot(other).port}",
                                    f"localhost:{env.slot(slot).port}")
    _load_caddyfile(env, text[:start] + block.replace(f'"{other}"', f'"{slot}"') + text[end:])


def test_traffic_off_the_recorded_slot_is_fixed_by_the_switch_back_never_a_rollback(
        scene_stack: DrillStack) -> None:
    """Found by review: Caddy pointed at green by hand (its container stopped: v2, the
    previous) while the state file records v3 on blue: the outage's fixes said `runbook
    rollback`, which is refused there (exit 4: what serves is not what the file records).
    They say what is true (traffic on green, the file says blue) and name the switch back,
    which, typed as printed, serves the recorded build and leaves no problem. Oracle: the
    dry run's exit, the proxy."""
    from runbook.drill import scenes

    scene_stack.arrange(scenes.PREVIOUS)  # v3 serves from blue; v2 stopped on green
    env = scene_stack.env
    _caddy_to(env, Slot.GREEN)
    refused = _cli(env.source, "rollback", "--dry-run")  # the premise: a rollback is refused
    assert refused.returncode == 4, refused.stdout + refused.stderr
    code, text, problems = status(scene_stack)
    assert_listed(code, text, problems)
    assert "runbook rollback" not in json.dumps(problems), problems
    switch = f"runbook switch {env.source} --slot blue"
    for check in ("proxy_unanswered", "active_unhealthy"):
        [found] = [p for p in problems if p["check"] == check]
        assert "traffic is on green, the state file says blue" in found["fix"], found
        assert f"`{switch}`" in found["fix"], found
    _serves_v3_on_blue_as_typed(scene_stack, switch)


def _serves_v3_on_blue_as_typed(stack: DrillStack, switch: str) -> None:
    """`switch`, a printed `runbook switch`, typed as printed (with --yes): it is taken,
    users reach v3 on blue, and no problem is left. Oracle: the proxy."""
    import shlex

    from tests.test_interrupted import through_proxy

    done = subprocess.run([sys.executable, "-m", "runbook.cli", *shlex.split(switch)[1:],
                           "--yes"], capture_output=True, text=True, timeout=180, check=False,
                          stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(stack.env) == ("blue", VERSIONS["v3"].tag)
    code, text, problems = status(stack)
    assert (code, problems) == (0, []), text


def test_a_stopped_serving_container_of_another_build_gets_no_rollback_or_switch_elsewhere(
        stack: DrillStack) -> None:
    """Found by review: the serving container stopped, holding another build than the state
    file records, the outage's other problems said `runbook rollback` (refused here: exit 4)
    or `runbook switch --slot green`, whose plan serves the very build status will not start
    blindly. They point at the stopped container's problem (which build should serve).
    Oracle: the state file as written here, the dry runs' exits and plans."""
    st = states.read_state(stack.env.state_file)
    assert st.current is not None and st.current.version == V1.tag
    states.write_state(stack.env.state_file, st.with_(current=st.current.with_(image=V2.image)))
    env = stack.env
    stack.docker("stop", env.slot(Slot.BLUE).container)
    refused = _cli(env.source, "rollback", "--dry-run")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    planned = _cli(env.source, "switch", "--slot", "green", "--dry-run")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert f"already running {V1.image}" in planned.stdout, planned.stdout  # not the record's
    code, text, problems = status(stack)
    assert_listed(code, text, problems)
    others = [p for p in problems if p["check"] != "serving_stopped"]
    assert {p["check"] for p in others} >= {"proxy_unanswered", "active_unhealthy"}, problems
    for p in others:
        assert "runbook rollback" not in p["fix"] and "runbook switch" not in p["fix"], p
    for check in ("proxy_unanswered", "active_unhealthy"):
        [found] = [p for p in problems if p["check"] == check]
        assert "which build should serve" in found["fix"], found


def _crash_looping(stack: DrillStack, slot: Slot, image: str, seconds: float) -> str:
    """The slot's container made anew by hand (as the review did) under `--restart always`,
    its server killed `seconds` after each start: it answers for a moment, exits, and Docker
    starts it again, over and over. Returns its name; the caller removes it."""
    import os

    name = stack.env.slot(slot).container
    stack.docker("rm", "-f", name)
    argv = stack.docker_run_argv(slot, image)
    argv = [*argv[:-1], "--restart", "always", "--entrypoint", "timeout", image, str(seconds),
            "python3", "/app/server.py"]
    subprocess.run(argv, check=True, capture_output=True, timeout=60,
                   env={**os.environ, "DATABASE_URL": stack.app_database_url})
    return name


def _restarted(name: str, times: int) -> None:
    """Wait until Docker's restart policy has started `name` again `times` times."""
    import time

    deadline = time.monotonic() + 60
    while True:
        said = subprocess.run(["docker", "inspect", "--format", "{{.RestartCount}}", name],
                              capture_output=True, text=True, check=True, timeout=30)
        if int(said.stdout) >= times:
            return
        assert time.monotonic() < deadline, said.stdout
        time.sleep(0.2)


def test_a_crash_looping_serving_container_is_a_problem_whenever_status_looks(
        stack: DrillStack) -> None:
    """Found by review: the serving slot crash-looping under a restart policy was "running ...
    health healthy" and "No problems found" (exit 0) whenever status looked while it was up:
    whether on-call heard of it depended on the instant. Docker's restart count and start
    time say it every time. Oracle: Docker's RestartCount, read here."""
    blue = _crash_looping(stack, Slot.BLUE, V1.image, 3)
    try:
        _restarted(blue, 2)
        for _ in range(3):  # up or between two starts: said each time
            code, text, problems = status(stack)
            # the outage's other problems come and go with the loop (text and JSON are two
            # looks): the loop itself is said in both, every time
            assert code == 1 and NO_PROBLEMS not in text, text
            assert "crash-looping" in text, text
            [found] = [p for p in problems if p["check"] == "crash_looping"]
            assert blue in found["problem"] and "restart" in found["problem"], found
            assert f"`docker logs --tail 100 {blue}`" in found["fix"], found
            assert "docker stop" not in found["fix"], found  # never stop what serves
    finally:
        stack.docker("rm", "-f", blue)
        stack.reset()


def test_a_crash_looping_standby_is_a_problem_and_its_printed_stop_ends_it(
        stack: DrillStack) -> None:
    """Found by review: a standby restarting over and over (old code started again and again
    against the shared database) was shown as "restarting" and "No problems found", exit 0.
    It is a problem; `docker stop`, typed as printed, ends the loop."""
    import shlex

    from runbook import docker

    green = _crash_looping(stack, Slot.GREEN, V2.image, 0.2)
    try:
        _restarted(green, 2)
        code, text, problems = status(stack)
        assert_listed(code, text, problems)
        [found] = [p for p in problems if green in p["problem"]]
        assert found["check"] == "crash_looping", problems
        assert f"`docker logs --tail 100 {green}`" in found["fix"], found
        [stop] = [c for c in re.findall(r"`([^`]+)`", found["fix"]) if c.startswith("docker stop")]
        subprocess.run(shlex.split(stop), check=True, capture_output=True, timeout=60)
        assert docker.inspect(green).status == "exited"
        code, text, problems = status(stack)
        assert (code, problems) == (0, []), text
    finally:
        stack.docker("rm", "-f", green)
        stack.reset()


def test_a_paused_standby_of_another_build_is_left_running_and_its_printed_stop_ends_it(
        stack: DrillStack) -> None:
    """Found by review: a paused standby (old code still attached to the database, holding its
    port) was "paused" and "No problems found". A paused standby counts as a running one;
    its `docker stop`, typed as printed, stops it."""
    import shlex

    from runbook import docker

    compose.run(compose.recreate_slot(stack.env, Slot.GREEN, V2.tag))
    green = stack.env.slot(Slot.GREEN).container
    stack.docker("pause", green)  # tried again if the freezer gives up (DrillStack.docker)
    try:
        code, text, problems = status(stack)
        assert_listed(code, text, problems)
        found = problem(problems, "the standby slot green is left paused")
        [stop] = [c for c in re.findall(r"`([^`]+)`", found["fix"]) if c.startswith("docker stop")]
        subprocess.run(shlex.split(stop), check=True, capture_output=True, timeout=60)
        assert docker.inspect(green).status == "exited"
    finally:
        stack.docker("unpause", green, check=False)


def test_an_absent_serving_container_whose_port_answers_names_what_answers(
        stack: DrillStack) -> None:
    """Found by review: the serving slot's container renamed, status showed it "absent ...
    health healthy" and "No problems found": users served by a container the runbook does
    not know. It is a problem naming the container that publishes the port (from Docker);
    the rename back, typed as printed, leaves no problem. Oracle: `docker ps --filter`."""

    env = stack.env
    blue, port = env.slot(Slot.BLUE).container, env.slot(Slot.BLUE).port
    stray = f"{blue}-x"
    stack.docker("rename", blue, stray)
    try:
        listed = stack.docker("ps", "--filter", f"publish={port}", "--format", "{{.Names}}")
        assert listed.stdout.split() == [stray], listed.stdout  # the premise, from Docker
        code, text, problems = status(stack)
        assert_listed(code, text, problems)
        [found] = [p for p in problems if p["check"] == "serving_absent"]
        assert blue in found["problem"] and stray in found["problem"], found
        assert str(port) in found["problem"], found
        [back] = _typed(found["fix"], "docker rename")
        assert back == ["docker", "rename", stray, blue], found
        subprocess.run(back, check=True, capture_output=True, timeout=60)
        code, text, problems = status(stack)
        assert (code, problems) == (0, []), text
    finally:
        stack.docker("rename", stray, blue, check=False)


def _changing(problems: list[dict[str, str]]) -> set[str]:
    """The runbook commands that change the host named (in full, no placeholder) in fixes."""
    return {c for p in problems for c in re.findall(r"`(runbook [^`<]+)`", p["fix"])
            if c.split()[1] in ("rollback", "switch", "deploy", "unlock", "snapshot")}


def _each_runs(commands: set[str]) -> None:
    """Each command, run as printed with --dry-run, is taken (exit 0), not refused."""
    import shlex

    for command in commands:
        done = subprocess.run([sys.executable, "-m", "runbook.cli", *shlex.split(command)[1:],
                               "--dry-run"], capture_output=True, text=True, timeout=120,
                              check=False, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
        assert done.returncode == 0, (command, done.stdout + done.stderr)


def test_with_no_previous_deployment_a_bad_port_offers_only_commands_that_run(
        stack: DrillStack) -> None:
    """Left by the last fix: a bad port loaded into Caddy and no previous deployment recorded
    (the baseline), the outage's fix offered `runbook rollback`, refused there (exit 4).
    Every runbook command a fix names runs (its dry run exits 0). Oracle: the dry runs."""
    env = stack.env
    assert states.read_state(env.state_file).previous is None  # the premise
    _load_a_dead_port(env)
    refused = _cli(env.source, "rollback", "--dry-run")  # the premise: refused here
    assert refused.returncode == 4, refused.stdout + refused.stderr
    code, text_out, problems = status(stack)
    assert_listed(code, text_out, problems)
    assert "runbook rollback" not in json.dumps(problems), problems
    commands = _changing(problems)
    assert commands, problems
    _each_runs(commands)


def test_caddy_not_answering_comes_before_an_unreadable_state_file(stack: DrillStack) -> None:
    """Left by the last fix: Caddy down (the outage) was listed after an unreadable state
    file. It comes first. Oracle: Caddy's container stopped here."""
    env = stack.env
    env.state_file.write_text("{ not json")
    stack.docker("stop", stack.caddy_container)
    try:
        code, text, problems = status(stack)
        assert_listed(code, text, problems)
        assert problems[0]["problem"].startswith("Caddy is not answering"), problems
        assert any(p["check"] == "state_unreadable" for p in problems), problems
    finally:
        stack.docker("start", stack.caddy_container)
        stack.wait_caddy()
        stack.reset()


def test_a_refused_state_file_is_shown_as_unreadable_never_as_no_deployment(
        stack: DrillStack) -> None:
    """Found by review: with a record the reader refuses (`"version": 1234567`), status printed
    "current none" and "previous none", which reads as "nothing recorded". It says the file
    cannot be read and points at the problem listed. Oracle: the file as written here."""
    env = stack.env
    doc = json.loads(env.state_file.read_text())
    doc["current_deployment"]["version"] = 1234567
    try:
        files.atomic_write(env.state_file, json.dumps(doc, indent=2).encode())
        code, text, problems = status(stack)
        assert_listed(code, text, problems)
        assert problem(problems, "current_deployment.version")
        for key in ("current", "previous"):
            line = next(x for x in text.splitlines() if x.startswith(f"  {key} "))
            assert "none" not in line and "cannot be read" in line, text
            assert "see Problems" in line, text
    finally:
        stack.reset()


def _traffic_on_green_v2(stack: DrillStack) -> None:
    """The file records v1 on blue; Caddy serves green, running v2 and answering."""
    from runbook import health

    env = stack.env
    compose.run(compose.recreate_slot(env, Slot.GREEN, V2.tag))
    health.wait_healthy(env, Slot.GREEN, timeout=30)
    _caddy_to(env, Slot.GREEN)


def test_traffic_on_the_other_slot_is_said_as_such_not_as_a_changed_container(
        stack: DrillStack) -> None:
    """Left by the last fix: the file records v1 on blue, Caddy serves green (v2). The image
    problem said someone changed the container outside the runbook "before rolling back":
    what is true is that traffic is on the other slot (its own problem says so)."""
    _traffic_on_green_v2(stack)
    code, text, problems = status(stack)
    assert_listed(code, text, problems)
    [image] = [p for p in problems if p["check"] == "image_differs"]
    assert "outside the runbook" not in image["fix"] and "rolling back" not in image["fix"], image
    assert "traffic is on green" in image["fix"], image


def test_the_right_slot_serving_off_the_record_is_fixed_by_commands_that_run(
        stack: DrillStack) -> None:
    """Left by the last fix: the file records v1 on blue, Caddy serves green (v2, healthy).
    The disagreement's fix named `runbook switch ENV --slot <the right one>`, then no way to
    record green at all (its switch refused: nothing to switch). It names the switch back to
    blue and the record-only switch to green; each runs (its dry run exits 0), and the one to
    green, typed as printed, leaves no problem and moves nobody. Oracle: the dry runs, the
    proxy, the state file as read back."""
    import shlex

    from tests.drill_checks import Poller
    from tests.test_interrupted import through_proxy

    env = stack.env
    _traffic_on_green_v2(stack)
    code, text, problems = status(stack)
    assert_listed(code, text, problems)
    [disagree] = [p for p in problems if p["check"] == "state_disagrees_with_caddy"]
    assert "<the right one>" not in disagree["fix"], disagree
    assert "no runbook command records" not in disagree["fix"], disagree
    assert f"`runbook switch {env.source} --slot blue`" in disagree["fix"], disagree
    record = f"runbook switch {env.source} --slot green"
    assert f"`{record}`" in disagree["fix"], disagree
    _each_runs(_changing(problems))
    with Poller(env) as user:
        done = subprocess.run([sys.executable, "-m", "runbook.cli", *shlex.split(record)[1:],
                               "--yes"], capture_output=True, text=True, timeout=180,
                              check=False, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert user.failures == [], user.failures[:5]
    assert {slot for _, slot, _ in user.seen} == {"green"}, set(user.seen)
    assert through_proxy(env) == ("green", V2.tag)
    # left: the standby blue still running (listed before the switch too), whose own fix,
    # typed as printed, stops it
    [standby] = [p for p in problems if p["check"] == "standby_running"]
    code, text, left = status(stack)
    assert left == [standby], text
    [stop] = _typed(standby["fix"], "docker stop")
    subprocess.run(stop, check=True, capture_output=True, timeout=60)
    code, text, left = status(stack)
    assert (code, left) == (0, []), text


def _switch(env: Environment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runbook.cli", "switch", str(env.source),
                           "--slot", "green", *args], capture_output=True, text=True,
                          timeout=180, check=False, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)


def test_a_switch_to_the_slot_that_serves_off_the_record_records_it_and_changes_nothing_else(
        stack: DrillStack) -> None:
    """Found by the helper on `runbook status` (42a8763): Caddy serves green (v2, healthy) while
    the file records v1 on blue, and `runbook switch ENV --slot green` was refused as
    "nothing to switch" (as were `rollback` and `rollback --to v2`); `deploy` moves users.
    It is a record-only switch now: its plan (the dry run's too) says traffic is already on
    green and nothing in Caddy or Docker changes, and shows what the state step writes; the
    run takes the lock, is journaled, records v2 on green as a switch does (v1 previous),
    leaves Caddy, the containers and the users as they were; run again, nothing to switch.
    Oracle: Docker, the Caddyfile's bytes, the proxy, the state file as read back."""
    from tests.drill_checks import Poller, snapshot

    env = stack.env
    _traffic_on_green_v2(stack)
    before = snapshot(env)
    planned = _switch(env, "--dry-run")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "traffic is already on green" in planned.stdout, planned.stdout
    assert "nothing in Caddy or Docker changes" in planned.stdout, planned.stdout
    assert f"{V2.tag} on green, status active" in planned.stdout, planned.stdout  # the write
    assert "Caddyfile change:" not in planned.stdout, planned.stdout
    assert snapshot(env) == before  # a dry run changes nothing
    with Poller(env) as user:
        done = _switch(env, "--yes", "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert user.failures == [], user.failures[:5]
    assert {slot for _, slot, _ in user.seen} == {"green"}, set(user.seen)
    after = snapshot(env)
    assert after["caddyfile"] == before["caddyfile"]
    assert after["containers"] == before["containers"]
    assert not after["lock"]
    st = states.read_state(env.state_file)
    assert st.current is not None and st.previous is not None
    assert (st.current.version, st.current.active_slot, st.current.status) == (
        V2.tag, "green", "active")
    assert st.previous.version == V1.tag
    result = json.loads(done.stdout)
    runs = list(env.runs_dir.glob("*.json"))
    assert [r for r in runs if r.stem == result["run_id"]], (result, runs)  # journaled
    again = _switch(env, "--dry-run")
    assert again.returncode == 4 and "nothing to switch" in again.stderr, again.stderr


def test_a_record_only_switch_fails_closed_on_an_unhealthy_slot(stack: DrillStack) -> None:
    """Caddy serves green while the file records blue, green answering 503: the switch that
    records green is refused (exit 4) and writes nothing. Oracle: the state file's bytes."""
    from runbook import health

    env = stack.env
    compose.run(compose.recreate_slot(env, Slot.GREEN, VERSIONS["unhealthy"].tag))
    assert not health.probe(env.slot(Slot.GREEN), env.health.path, 5).ok  # the premise
    _caddy_to(env, Slot.GREEN)
    state = env.state_file.read_bytes()
    for args in (("--dry-run",), ("--yes",)):
        done = _switch(env, *args)
        assert done.returncode == 4, done.stdout + done.stderr
        assert "does not answer healthy" in done.stderr, done.stderr
        assert env.state_file.read_bytes() == state


def test_a_record_only_switch_fails_closed_when_caddys_config_cannot_be_read(
        stack: DrillStack, tmp_path: Path) -> None:
    """Caddy serves green while the file records blue, its admin API not answering where the
    environment says: what serves is not known, so nothing is recorded (exit 4)."""
    from tests.drill_checks import closed_port

    env = stack.env
    _traffic_on_green_v2(stack)
    state = env.state_file.read_bytes()
    toml = tmp_path / "env.toml"
    unread = status_with(stack, toml, admin_url=f"http://127.0.0.1:{closed_port()}")
    assert "Traceback" not in unread.stderr, unread.stderr  # the file is written; status says
    done = subprocess.run([sys.executable, "-m", "runbook.cli", "switch", str(toml), "--slot",
                           "green", "--yes"], capture_output=True, text=True, timeout=120,
                          check=False, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    assert done.returncode == 4, done.stdout + done.stderr
    assert env.state_file.read_bytes() == state


def _loaded_only(env: Environment, text: str) -> None:
    """`text` loaded into Caddy through its admin API, the Caddyfile on disk left as it is
    (a change made during an incident)."""
    drill_http.post(f"{env.caddy.admin_url}/load", content=text,
                    headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()


def _api(env: Environment) -> int:
    return drill_http.get(f"{env.caddy.proxy_url}/api/x", headers={"Connection": "close"},
                          timeout=5).status_code


@pytest.mark.parametrize("change", ["api-to-a-closed-port", "a-header-outside-the-block"])
def test_a_record_only_switch_is_never_taken_while_caddy_runs_other_than_its_caddyfile(
        stack: DrillStack, change: str) -> None:
    """Found by review (diff41b #1): the file records v1 on blue, Caddy serves green (v2)
    and its Caddyfile names green, but the config loaded through the admin API sends
    `/api/*` to a closed port (users get 502 there) or differs outside the block. The
    record-only switch said "nothing in Caddy or Docker changes", exit 0, and left the 502
    unseen by status. It is not taken: the switch reloads the Caddyfile (users stay on green
    throughout), and records v2 on green. Oracle: the proxy, Caddy's loaded config against
    its own adaptation of the file (`/adapt`), the state file as read back."""
    from runbook import caddy
    from tests.drill_checks import Poller, closed_port

    env = stack.env
    _traffic_on_green_v2(stack)
    text = caddy.read(env)
    start, end = caddy.find_block(text)
    green = f"localhost:{env.slot(Slot.GREEN).port}"
    if change == "api-to-a-closed-port":
        assert text[start:end].count(green) == 2  # the drill's block: /api/* and the rest
        loaded = text[:start] + text[start:end].replace(
            green, f"localhost:{closed_port()}", 1) + text[end:]
    else:
        loaded = text.replace("header X-Drill-Run", "header X-Drill-Other", 1)
        assert loaded != text
    _loaded_only(env, loaded)
    if change == "api-to-a-closed-port":
        assert _api(env) == 502  # the premise: part of the site is down
    assert caddy.read(env) == text
    planned = _switch(env, "--dry-run")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "nothing in Caddy or Docker changes" not in planned.stdout, planned.stdout
    assert "reloads" in planned.stdout, planned.stdout
    with Poller(env) as user:
        done = _switch(env, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert user.failures == [], user.failures[:5]
    assert {slot for _, slot, _ in user.seen} == {"green"}, set(user.seen)
    assert _api(env) != 502
    assert caddy.read(env) == text
    running = drill_http.get(f"{env.caddy.admin_url}/config/", timeout=10).json()
    adapted = drill_http.post(f"{env.caddy.admin_url}/adapt", content=text,
                              headers={"Content-Type": "text/caddyfile"}, timeout=10)
    assert running == adapted.json()["result"]
    st = states.read_state(env.state_file)
    assert st.current is not None
    assert (st.current.version, st.current.active_slot) == (V2.tag, "green")
    _, text_out, problems = status(stack)
    assert not [p for p in problems if p["check"] == "state_disagrees_with_caddy"], text_out


def test_a_record_only_switch_on_doubted_data_says_the_app_already_serves_on_it(
        stack: DrillStack) -> None:
    """Found by review (diff41b #4): with a restore doubted, the record-only switch was refused
    as one that "would start the app on it" (it already serves there), and accepted with
    --accept-restored-data it warned it "starts the app" and left the doubt, so status still
    said the app must not be started, while it served. Refused, it says the app already
    serves on that data and names the doubt's own fix; accepted, it records the switch and
    clears the doubt as an accepting switch does. Oracle: the folder beside the state file,
    the state file, status."""
    from runbook import restore_records

    env = stack.env
    _traffic_on_green_v2(stack)
    folder = env.state_file.resolve().parent
    assert restore_records.record_doubt(env, {
        "run_id": "20260101T000000Z-dead", "action": "rollback", "check": "verify-restore",
        "problem": "the restored database does not match the snapshot (orders: 3 rows, "
                   "the snapshot has 4)",
        "fix": "compare the orders table with the snapshot", "before": "", "target": ""}) is None
    [marker] = [p for p in folder.iterdir() if p.name.startswith(".") and "doubt" in p.name]
    state = env.state_file.read_bytes()
    refused = _switch(env, "--dry-run")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    [error] = [line for line in refused.stderr.splitlines() if line.startswith("runbook: error:")]
    assert "start the app" not in refused.stderr, refused.stderr
    assert "already serves on it" in error, error
    assert "compare the orders table with the snapshot" in refused.stderr, refused.stderr
    assert "--accept-restored-data" in refused.stderr, refused.stderr
    assert env.state_file.read_bytes() == state and marker.exists()
    planned = _switch(env, "--dry-run", "--accept-restored-data")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "starts the app" not in planned.stdout, planned.stdout
    assert "already serves on that database" in planned.stdout, planned.stdout
    assert env.state_file.read_bytes() == state and marker.exists()
    done = _switch(env, "--yes", "--accept-restored-data")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "starts the app" not in done.stdout + done.stderr, done.stdout + done.stderr
    st = states.read_state(env.state_file)
    assert st.current is not None
    assert (st.current.version, st.current.active_slot) == (V2.tag, "green")
    assert not marker.exists()
    _, text_out, problems = status(stack)
    assert not [p for p in problems if "does not match the snapshot" in p["problem"]], text_out


def test_a_record_only_switch_on_a_schema_behind_says_it_already_serves_and_names_the_deploy(
        stack: DrillStack) -> None:
    """Found by review (diff41b #4): the file records v1 on blue, Caddy serves green (v2),
    whose recorded migrations are above the schema: the record-only switch's refusal said v2
    "would serve" without them (it already serves) and named `runbook deploy <name>`, which
    loads no configuration for an environment given by its file. It says v2 already serves
    without them, and names the deploy as this environment is given. Oracle: the schema as
    Postgres reports it, the state file's bytes."""
    from runbook import database

    env = stack.env
    _traffic_on_green_v2(stack)
    schema = database.schema_version(env).version
    st = states.read_state(env.state_file)
    v2 = states.make_deployment(V2.tag, V2.git_commit, Slot.GREEN, status="superseded",
                                migration_version=schema + 1)
    states.write_state(env.state_file, st.with_(history=(v2, *st.history)))
    state = env.state_file.read_bytes()
    refused = _switch(env, "--dry-run")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    [error] = [line for line in refused.stderr.splitlines() if line.startswith("runbook: error:")]
    assert f"schema is at {schema} but {V2.tag} ran with {schema + 1}" in error, error
    assert "would serve" not in refused.stderr, refused.stderr
    assert f"{V2.tag} already serves without the migrations it needs" in error, error
    assert f"`runbook deploy {env.source} --version {V2.tag}`" in refused.stderr, refused.stderr
    assert env.state_file.read_bytes() == state


def _status_json(stack: DrillStack) -> dict[str, object]:
    argv = [sys.executable, "-m", "runbook.cli", "status", str(stack.env.source), "--format",
            "json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    data: dict[str, object] = json.loads(done.stdout)
    return data


def _identity(stack: DrillStack, container: str) -> tuple[str, str]:
    """(container id, StartedAt) as Docker says them: the test's oracle, not the runbook's."""
    out = stack.docker("inspect", "--format", "{{.Id}} {{.State.StartedAt}}", container).stdout
    cid, started = out.split()
    return cid, started


def _switched_to_green(stack: DrillStack) -> str:
    """v3 serving from blue, v2 stopped on green; then `runbook switch ENV --slot green` as
    on-call types it, which leaves blue running on purpose. Returns the switch's run id (its
    log lines carry it)."""
    from runbook.drill import scenes
    from tests.drill_checks import runbook_cli, through_proxy

    stack.arrange(scenes.PREVIOUS)
    env = stack.env
    done = runbook_cli(env, "switch", "--slot", "green", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("green", VERSIONS["v2"].tag)
    blue = env.slot(Slot.BLUE).container
    assert stack.docker("inspect", "--format", "{{.State.Status}}", blue).stdout.strip() \
        == "running"  # the premise: the switch left it running, and said so
    assert f"docker stop {blue}" in done.stderr + done.stdout, done.stderr
    lines = [json.loads(line) for log in env.log_dir.glob("*.log")
             for line in log.read_text().splitlines()]
    runs = sorted((e["timestamp"], e["run_id"]) for e in lines
                  if e["message"].startswith("switch ") and e.get("exit_code") == 0)
    assert runs, lines[-3:]
    return str(runs[-1][1])


@pytest.mark.parametrize("since", ["nothing", "restart", "recreate"])
def test_the_old_slot_a_switch_left_running_is_a_note_until_it_is_restarted_or_recreated(
        scene_stack: DrillStack, since: str) -> None:
    """Found by review: right after a clean `runbook switch`, which leaves the old slot
    running on purpose (a switch back is instant) and says so, `runbook status` listed that
    slot as a problem and exited 1: a false alarm at 3 a.m. The very container the switch
    left (same id, same start, same build) is a note naming the switch, its run and the
    `docker stop`; exit 0. Restarted or recreated since, it is not what the switch left: a
    problem again, as before. Oracle: Docker's container id and start time."""
    stack = scene_stack
    env = stack.env
    run = _switched_to_green(stack)
    blue = env.slot(Slot.BLUE).container
    before = _identity(stack, blue)
    if since == "restart":
        stack.docker("restart", blue)
    elif since == "recreate":  # the same image, another container
        compose.run(compose.recreate_slot(env, Slot.BLUE, VERSIONS["v3"].tag))
    after = _identity(stack, blue)
    code, text, problems = status(stack)
    data = _status_json(stack)
    if since == "nothing":
        assert after == before
        assert (code, problems) == (0, []), text
        assert text.strip().splitlines()[-1] == NO_PROBLEMS, text
        notes = data.get("notes")
        assert isinstance(notes, list) and len(notes) == 1, data
        [note] = notes
        assert note["slot"] == "blue" and note["check"] == "standby_running", note
        for said in (note["note"], text):
            assert "left running by the switch at" in said, said
            assert f"(run {run})" in said, said
            assert f"`docker stop {blue}`" in said, said
            assert f"`runbook switch {env.source} --slot blue`" in said, said
        return
    assert after[0] != before[0] if since == "recreate" else after[1] != before[1]
    assert_listed(code, text, problems)
    found = problem(problems, "the standby slot blue is left running")
    assert found["check"] == "standby_running", found
    assert f"docker stop {blue}" in found["fix"], found
    assert not data.get("notes"), data
    assert "left running by the switch" not in text, text


def test_the_old_slot_stays_a_problem_once_a_later_run_recorded_another_deployment(
        scene_stack: DrillStack) -> None:
    """The note is for the standby the LAST run that moved traffic left: once the state file
    records another deployment than the switch wrote (a later deploy or rollback of another
    tool, which moved traffic and did not stop it), that container was left by that run,
    not by the switch: a problem, as before. Oracle: the state file's bytes as written here."""
    stack = scene_stack
    env = stack.env
    _switched_to_green(stack)
    st = states.read_state(env.state_file)
    assert st.current is not None
    later = states.make_deployment(VERSIONS["v2"].tag, VERSIONS["v2"].git_commit, Slot.GREEN,
                                   status="active")
    states.write_state(env.state_file, states.after_deploy(st, later))
    code, text, problems = status(stack)
    assert_listed(code, text, problems)
    found = problem(problems, "the standby slot blue is left running")
    assert found["check"] == "standby_running", found
    assert "left running by the switch" not in text, text


def test_a_standby_started_by_hand_after_a_rollback_stays_a_problem(
        scene_stack: DrillStack) -> None:
    """A rollback stops the old slot (`[rollback] stop_old_slot`); started again by hand, it
    was left running by nobody's run: a problem with its `docker stop`, never a note."""
    from runbook.drill import scenes
    from tests.drill_checks import runbook_cli, through_proxy

    stack = scene_stack
    env = stack.env
    stack.arrange(scenes.PREVIOUS)
    done = runbook_cli(env, "rollback", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("green", VERSIONS["v2"].tag)
    blue = env.slot(Slot.BLUE).container
    assert stack.docker("inspect", "--format", "{{.State.Status}}", blue).stdout.strip() \
        == "exited"
    code, text, problems = status(stack)
    assert (code, problems) == (0, []), text
    stack.docker("start", blue)
    code, text, problems = status(stack)
    assert_listed(code, text, problems)
    found = problem(problems, "the standby slot blue is left running")
    assert f"docker stop {blue}" in found["fix"], found
    assert "left running by the switch" not in text, text


def test_the_old_slot_of_a_killed_switch_finished_by_its_rerun_is_a_note(
        scene_stack: DrillStack) -> None:
    """A switch killed (-9) after its commit, before it recorded anything, is finished by the
    same command, which keeps the old slot running as the switch does (finish._stop_old): that
    finish records it too, so status says it as a note naming the switch that moved traffic
    (its log lines' run id), not as a problem. Oracle: the proxy, Docker, the log lines."""
    import signal

    from runbook.drill import scenes
    from tests.drill_checks import runbook_cli, through_proxy

    stack = scene_stack
    env = stack.env
    stack.arrange(scenes.PREVIOUS)
    killed = runbook_cli(env, "switch", "--slot", "green", "--yes",
                         fault="switch.after-verify:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    lines = [json.loads(line) for log in env.log_dir.glob("*.log")
             for line in log.read_text().splitlines()]
    [moved] = sorted({(e["timestamp"], e["run_id"]) for e in lines
                      if e["message"].startswith("switch started")})[-1:]
    done = runbook_cli(env, "switch", "--slot", "green", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("green", VERSIONS["v2"].tag)
    blue = env.slot(Slot.BLUE).container
    assert f"`docker stop {blue}`" in done.stderr, done.stderr
    code, text, problems = status(stack)
    assert (code, problems) == (0, []), text
    assert "left running by the switch at" in text and f"(run {moved[1]})" in text, text


def _mispaired_file(stack: DrillStack, toml: Path, *, containers: bool) -> Environment:
    """The stack's environment file with [slots.blue] and [slots.green] swapped against what
    runs: their `container` and `service` (each slot keeping its port), or their `port`
    (each keeping its container). Returns it loaded, as `runbook ... <toml>` reads it."""
    import dataclasses

    from runbook import environment as envmod

    env = stack.env
    blue, green = env.slot(Slot.BLUE), env.slot(Slot.GREEN)
    if containers:
        slots = {Slot.BLUE: dataclasses.replace(blue, container=green.container,
                                                service=green.service),
                 Slot.GREEN: dataclasses.replace(green, container=blue.container,
                                                 service=blue.service)}
    else:
        slots = {Slot.BLUE: dataclasses.replace(blue, port=green.port),
                 Slot.GREEN: dataclasses.replace(green, port=blue.port)}
    toml.write_text(envmod.to_toml(env.with_(slots=slots)))
    return envmod.load_file(toml)


def _said_on_the_pairing(stack: DrillStack, toml: Path, serving: str, published: int,
                         named: int, slot: str) -> None:
    """Status through `toml` names the pairing first (the container, the port Docker says
    it publishes, the port the file names), with the environment file as the fix, and no
    advice built on the wrong pairing: no `docker start`, no "stopped", no "someone
    changed the container"."""
    code, text, problems = status(stack, toml)
    assert_listed(code, text, problems)
    assert "publishes port" in problems[0]["problem"], problems  # said first
    [found] = [p for p in problems if f"{serving} publishes port {published}, but the "
               f"environment names port {named} for the {slot} slot" in p["problem"]]
    assert str(toml) in found["fix"] and f"[slots.{slot}]" in found["fix"], found
    said = text + json.dumps(problems)
    assert "docker start" not in said and "stopped (exited)" not in said, text
    assert "someone changed the container outside the runbook" not in said, text
    assert not [p for p in problems if p["check"] in ("serving_stopped", "image_differs")], \
        problems


def test_slots_whose_containers_are_swapped_in_the_file_are_said_as_such_not_as_stopped(
        scene_stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: [slots.blue] and [slots.green] naming each other's container (ports
    kept), blue serving and green stopped: status said "the blue slot Caddy serves is stopped
    (exited)" with `docker start <the green container>` (the old build) as its fix, beside a
    healthy blue and users served, while the rollback refused the same file on the ports
    Docker publishes. Oracle: `docker port` of the containers, the proxy."""
    from runbook.drill import scenes
    from tests.drill_checks import through_proxy

    stack = scene_stack
    stack.arrange(scenes.PREVIOUS)  # v3 serving from blue, v2 stopped on green
    env = stack.env
    blue, green = env.slot(Slot.BLUE), env.slot(Slot.GREEN)
    assert f":{blue.port}" in stack.docker("port", blue.container).stdout  # the truth
    assert through_proxy(env) == ("blue", VERSIONS["v3"].tag)
    code, text, problems = status(stack)  # the right file: the stopped green is no problem
    assert (code, problems) == (0, []), text
    _mispaired_file(stack, tmp_path / "env-swapped.toml", containers=True)
    _said_on_the_pairing(stack, tmp_path / "env-swapped.toml", blue.container, blue.port,
                         green.port, "green")
    assert through_proxy(env) == ("blue", VERSIONS["v3"].tag)


def test_slots_whose_ports_are_swapped_in_the_file_are_said_as_such(
        scene_stack: DrillStack, tmp_path: Path) -> None:
    """The same with the ports swapped (each slot keeping its container): Caddy's port is
    then green's by the file, whose container is stopped; never `docker start` it."""
    from runbook.drill import scenes

    stack = scene_stack
    stack.arrange(scenes.PREVIOUS)  # v3 serving from blue, v2 stopped on green
    blue, green = stack.env.slot(Slot.BLUE), stack.env.slot(Slot.GREEN)
    _mispaired_file(stack, tmp_path / "env-swapped.toml", containers=False)
    _said_on_the_pairing(stack, tmp_path / "env-swapped.toml", blue.container, blue.port,
                         green.port, "blue")


@pytest.mark.parametrize("target", ["blue", "green"])
def test_a_switch_through_a_swapped_file_is_refused_whatever_the_target(
        scene_stack: DrillStack, tmp_path: Path, target: str) -> None:
    """Found by review: `switch --slot blue` (the slot Caddy serves by the file's ports)
    answered "nothing to switch" before it asked Docker which container publishes which
    port. Refused on the pairing (exit 4), dry run or not, nothing changed: Caddy's loaded
    config, the state file, the containers, what users reach."""
    from runbook import traffic
    from runbook.drill import scenes
    from tests.drill_checks import runbook_cli, snapshot

    stack = scene_stack
    stack.arrange(scenes.PREVIOUS)  # v3 serving from blue, v2 stopped on green
    env = stack.env
    blue, green = env.slot(Slot.BLUE), env.slot(Slot.GREEN)
    swapped = _mispaired_file(stack, tmp_path / "env-swapped.toml", containers=True)
    loaded, before = traffic.loaded_config(env), snapshot(env)
    for mode in ("--dry-run", "--yes"):
        done = runbook_cli(swapped, "switch", "--slot", target, mode)
        assert done.returncode == 4, (mode, done.stdout + done.stderr)
        assert f"{blue.container} publishes port {blue.port}, but the environment names port " \
               f"{green.port} for the green slot" in done.stderr, (mode, done.stderr)
        assert "nothing to switch" not in done.stderr, done.stderr
        assert traffic.loaded_config(env) == loaded
        assert snapshot(env) == before


def test_a_stopped_container_publishing_the_other_slots_port_is_mended_on_the_container(
        scene_stack: DrillStack) -> None:
    """Found by review: green removed and re-created (not started) with a `-p` typo, the
    blue slot's port: the fix said "set [slots.green] port to the one `docker port ...`
    shows" (it shows nothing for a stopped container, and that port is blue's: the file
    then pairs both slots with one port, which no command loads). Then blue stopped (a real
    outage): the outage's fixes said "mend [slots.green] first", hiding `docker start` of
    the correctly paired blue, though nothing is refused while the mis-paired one is stopped.
    Oracle: Docker's own `docker port` and HostConfig, the proxy's answer."""
    from runbook.drill import scenes

    stack = scene_stack
    stack.arrange(scenes.PREVIOUS)  # v3 serving from blue, v2 stopped on green
    env = stack.env
    blue, green = env.slot(Slot.BLUE), env.slot(Slot.GREEN)
    image = stack.docker("inspect", "-f", "{{.Config.Image}}", green.container).stdout.strip()
    argv = stack.docker_run_argv(Slot.GREEN, image)
    argv = ["docker", "create", *argv[argv.index("--name"):]]  # as a host's script, not started
    argv[argv.index(f"127.0.0.1:{green.port}:8080")] = f"127.0.0.1:{blue.port}:8080"  # typo
    try:
        stack.docker("rm", "-f", green.container)
        subprocess.run(argv, check=True, capture_output=True, text=True,
                       env={**os.environ, "DATABASE_URL": stack.app_database_url})
        assert stack.docker("port", green.container).stdout.strip() == ""  # nothing to read
        bound = stack.docker("inspect", "-f", "{{json .HostConfig.PortBindings}}",
                             green.container).stdout.strip()
        assert str(blue.port) in bound, bound
        code, text, problems = status(stack)
        assert_listed(code, text, problems)
        [found] = [p for p in problems if f"{green.container} publishes port {blue.port}, but "
                   f"the environment names port {green.port} for the green slot"
                   in p["problem"]]
        fix = found["fix"]
        # the container is mended, never the file onto blue's port
        assert "set [slots.green] port" not in fix and "docker port" not in fix, fix
        assert f"docker inspect -f '{{{{json .HostConfig.PortBindings}}}}' {green.container}" \
            in fix and f"{green.port}" in fix, fix
        assert "mend [slots" not in json.dumps(
            [p for p in problems if p is not found]), problems  # nothing is refused on it

        stack.docker("stop", blue.container)  # the outage
        code, text, problems = status(stack)
        assert_listed(code, text, problems)
        start = f"docker start {blue.container}"
        [stopped] = [p for p in problems if p["check"] == "serving_stopped"]
        assert start in stopped["fix"], problems
        for said in ("users are not served through the proxy", "the active slot blue is"):
            [p] = [p for p in problems if p["problem"].startswith(said)]
            assert "mend [slots" not in p["fix"] and start in p["fix"], p
    finally:
        stack.docker("rm", "-f", green.container, check=False)  # the next arrange makes it


def test_ports_published_as_a_range_or_left_to_docker_are_no_port_mismatch() -> None:
    """Found by review: `-p 127.0.0.1:18600-18601:8080` (HostPort "18600-18601") was read as
    no port and `-p ...:0:...` as port 0, so the slot naming 18600 was "mis-paired": its
    serving container hidden from status, switch and rollback refused. Oracle: Docker's
    HostConfig and `docker port` of a real container, created then started."""
    from runbook import docker, traffic
    from runbook.environment import from_mapping

    name = f"togather-test-port-range-{os.getpid()}"
    env = from_mapping({
        "name": "staging",
        "slots": {"blue": {"container": name, "service": "togather-blue", "port": 18600},
                  "green": {"container": f"{name}-green", "service": "togather-green",
                            "port": 18602}},
        "caddy": {"caddyfile": "/nonexistent/Caddyfile", "admin_url": "http://127.0.0.1:1",
                  "proxy_url": "http://127.0.0.1:2"},
    }, Path("/tmp/test-env.toml"))
    run = ["docker", "create", "--name", name, "-p", "127.0.0.1:18600-18601:8080",
           "-p", "127.0.0.1:0:9090", "-p", "127.0.0.1::9091", "--entrypoint", "sleep",
           V1.image, "60"]
    try:
        subprocess.run(run, check=True, capture_output=True, text=True)
        configured = subprocess.run(
            ["docker", "inspect", "-f", "{{json .HostConfig.PortBindings}}", name],
            check=True, capture_output=True, text=True).stdout
        assert "18600-18601" in configured, configured  # the range as Docker keeps it
        info = docker.inspect(name)
        assert info.published is not None and {18600, 18601} <= set(info.published), info
        assert 0 not in info.published, info
        assert traffic.port_mismatch(env, Slot.BLUE, info, None) is None
        subprocess.run(["docker", "start", name], check=True, capture_output=True)
        shown = subprocess.run(["docker", "port", name, "9090/tcp"], check=True,
                               capture_output=True, text=True).stdout
        random_port = int(shown.split()[0].rpartition(":")[2])  # what Docker bound
        info = docker.inspect(name)
        assert info.published is not None and 0 not in info.published, info
        assert traffic.port_mismatch(env, Slot.BLUE, info, None) is None
        # the port Docker bound for 0 is one it publishes: a slot naming it is paired right
        bound_env = env.with_(slots={Slot.BLUE: dataclasses.replace(
            env.slot(Slot.BLUE), port=random_port), Slot.GREEN: env.slot(Slot.GREEN)})
        assert traffic.port_mismatch(bound_env, Slot.BLUE, info, None) is None
        # and one it does not publish at all is still a mismatch
        wrong_env = env.with_(slots={Slot.BLUE: dataclasses.replace(
            env.slot(Slot.BLUE), port=18603), Slot.GREEN: env.slot(Slot.GREEN)})
        assert traffic.port_mismatch(wrong_env, Slot.BLUE, info, None) is not None
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)


# Managed blocks the switch cannot rewrite (each a valid Caddyfile Caddy runs): status named
# the switch as their fix, which refused them (exit 4), as it refused every rollback
UNSWITCHABLE = {
    "env-placeholder": ("\t\treverse_proxy localhost:{{$RUNBOOK_UNSET_PORT:{port}}} {{",
                        "use plain host:port upstreams"),
    "imported-header": ("\t\treverse_proxy localhost:{port} {{\n\t\t\timport slot_header",
                        "inline the snippet"),
}


@pytest.mark.parametrize("case", list(UNSWITCHABLE))
def test_a_managed_block_the_switch_refuses_is_fixed_by_what_the_refusal_says(
        stack: DrillStack, case: str) -> None:
    """Found by review: for a managed block the switch cannot rewrite, status said
    "`runbook switch ENV --slot blue` writes it back in line", and that switch refused it
    ("cannot rewrite the managed block ... inline the snippet"). The fix status gives is the
    refusal's own. Oracle: the switch run as on-call would, its exit code and words."""
    env = stack.env
    blue = env.slot(Slot.BLUE).port
    line, fix_words = UNSWITCHABLE[case]
    text = env.caddy.caddyfile.read_text()
    start, end = text.index("# BLUE_GREEN_SLOT_START"), text.index("# BLUE_GREEN_SLOT_END")
    block = text[start:end].replace(f"\t\treverse_proxy localhost:{blue} {{",
                                    line.format(port=blue), 1)
    header = '\t\t\theader_down X-Togather-Slot "blue"\n'
    if case == "imported-header":
        block = block.replace(header, "", 1)
        other = text.index("# Another site on this host.")  # below the global options
        text = f'{text[:other]}(slot_header) {{\n{header}}}\n\n{text[other:]}'
        start, end = text.index("# BLUE_GREEN_SLOT_START"), text.index("# BLUE_GREEN_SLOT_END")
    edited = text[:start] + block + text[end:]
    assert edited != text
    _load_caddyfile(env, edited)
    assert drill_http.get(f"{env.caddy.proxy_url}/version",
                          timeout=5).headers["X-Togather-Slot"] == "blue"  # Caddy runs it
    code, out, problems = status(stack)
    assert_listed(code, out, problems)
    found = problem(problems, "Caddyfile managed block")
    assert fix_words in found["fix"] and "runbook switch" not in found["fix"], found
    refused = _cli(env.source, "switch", "--slot", "blue", "--dry-run")
    assert refused.returncode == 4 and fix_words in refused.stderr, refused.stderr


def test_a_bare_port_upstream_is_caddys_localhost_and_the_switch_moves_it(
        stack: DrillStack) -> None:
    """Found by review: `reverse_proxy :PORT` (Caddy dials this host's port) was "not
    host:port", status sent on-call to a switch that refused it. It is a slot's upstream:
    no problem, and the switch moves it. Oracle: the proxy and Caddy's running config."""
    env = stack.env
    blue, green = env.slot(Slot.BLUE).port, env.slot(Slot.GREEN).port
    text = env.caddy.caddyfile.read_text()
    start, end = text.index("# BLUE_GREEN_SLOT_START"), text.index("# BLUE_GREEN_SLOT_END")
    edited = text[:start] + text[start:end].replace(f"localhost:{blue}", f":{blue}") + text[end:]
    assert edited != text
    _load_caddyfile(env, edited)
    code, out, problems = status(stack)
    assert (code, problems) == (0, []), out
    done = _cli(env.source, "switch", "--slot", "green", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    answer = drill_http.get(f"{env.caddy.proxy_url}/version", timeout=5)
    assert answer.headers["X-Togather-Slot"] == "green", answer.headers
    running = json.dumps(drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).json())
    assert f'"dial": ":{green}"' in running and f":{blue}\"" not in running, running


def test_a_caddyfile_caddy_rejects_is_a_problem_naming_caddys_error_and_its_line(
        stack: DrillStack) -> None:
    """Found by review: a typo outside the markers, not reloaded: status said "No problems
    found", while Caddy would fail to load the file on its next reload or restart, and every
    rollback, deploy and switch refuses it. Oracle: Caddy's own validation of the file."""
    env = stack.env
    text = env.caddy.caddyfile.read_text()
    typo = text.replace('respond /ping "pong" 200', 'respnd /ping "pong" 200')
    assert typo != text
    files.atomic_write(env.caddy.caddyfile, typo.encode())  # not loaded
    said = drill_http.post(f"{env.caddy.admin_url}/adapt", content=typo,
                           headers={"Content-Type": "text/caddyfile"}, timeout=10)
    assert said.status_code == 400 and "respnd" in said.text, said.text  # the premise
    line = typo.splitlines().index('\trespnd /ping "pong" 200') + 1
    code, out, problems = status(stack)
    assert_listed(code, out, problems)
    found = problem(problems, "unrecognized directive: respnd")
    assert f"line {line} of {env.caddy.caddyfile}" in found["fix"], found


def test_the_serving_container_left_under_composes_temporary_name_is_never_offered_for_removal(
        scene_stack: DrillStack) -> None:
    """Found by review: the serving slot's container left under compose's temporary
    `<id>_<name>` (a `docker compose up` of the serving slot cut off half-way). Status said
    it right once (the slot's container renamed: `docker rename` it back) and once as a
    leftover of the blue service, whose fix was `docker rm -f` it: typed as printed, every
    request answered 502. No fix offers its removal; every `docker rm`/`docker rename` the
    fixes print, typed as printed, leaves users served throughout and no problem. Oracle:
    a user polling through the proxy, Docker."""
    from tests.drill_checks import Poller

    env, blue = scene_stack.env, scene_stack.env.slot(Slot.BLUE).container
    with _serving_under_a_temporary_name(scene_stack) as temporary:
        code, text, problems = status(scene_stack)
        assert_listed(code, text, problems)
        typed = [c for p in problems for c in _typed(p["fix"], "docker r")]
        assert not [c for c in typed if c[:2] == ["docker", "rm"]], problems
        renames = {tuple(c) for c in typed if c[:2] == ["docker", "rename"]}
        assert renames == {("docker", "rename", temporary, blue)}, problems
        [left] = [p for p in problems if p["check"] == "compose_leftovers"]
        assert "rm -f" not in left["fix"], left
        with Poller(env) as user:
            for command in sorted(renames):
                subprocess.run(list(command), check=True, capture_output=True, timeout=60)
        assert user.failures == [], user.failures[:5]
        assert {slot for _, slot, _ in user.seen} == {"blue"}, set(user.seen)
        code, text, problems = status(scene_stack)
        assert (code, problems) == (0, []), text


@contextlib.contextmanager
def _serving_under_a_temporary_name(stack: DrillStack) -> Iterator[str]:
    """PREVIOUS (v3 serving from blue, v2 stopped on green), blue's container renamed to
    compose's temporary `<12 hex of its id>_<name>`, as a `docker compose up` of the serving
    slot cut off half-way leaves it; yields that name, and gives the name back after."""
    from runbook.drill import scenes
    from tests.test_interrupted import through_proxy

    stack.arrange(scenes.PREVIOUS)
    blue = stack.env.slot(Slot.BLUE).container
    ident = stack.docker("inspect", "-f", "{{.Id}}", blue).stdout.strip()[:12]
    temporary = f"{ident}_{blue}"
    stack.docker("rename", blue, temporary)
    try:
        assert through_proxy(stack.env) == ("blue", VERSIONS["v3"].tag)  # still served
        yield temporary
    finally:
        stack.docker("rename", temporary, blue, check=False)


@pytest.mark.parametrize("state", ["running", "stopped"])
def test_a_recreate_is_refused_without_removing_a_leftover_that_serves(
        scene_stack: DrillStack, state: str) -> None:
    """The refusal of a recreate beside a leftover (what `runbook rollback`, `deploy` and
    `switch` print) never names `docker rm` of a leftover Caddy sends users to: here blue's
    container left under compose's temporary name, running (it publishes blue's port) or
    stopped (it carries blue's label, and blue has no container of its name), which the
    plan's removal step took for a stopped leftover. Refused with the rename back; nothing
    changed. Called directly: each command refuses to recreate the slot Caddy serves before
    it gets there, so this guards what they would print. Oracle: Docker, the proxy."""
    from runbook import docker
    from runbook.errors import PreconditionError
    from tests.test_interrupted import through_proxy

    env, blue = scene_stack.env, scene_stack.env.slot(Slot.BLUE).container
    with _serving_under_a_temporary_name(scene_stack) as temporary:
        if state == "stopped":
            scene_stack.docker("stop", temporary)
        green = docker.inspect(env.slot(Slot.GREEN).container)
        for refuse in (lambda: compose.refuse_leftovers(env, Slot.BLUE),
                       lambda: compose.removable_leftovers(env, Slot.BLUE, green)):
            with pytest.raises(PreconditionError) as refused:
                refuse()
            said = f"{refused.value.message} {refused.value.fix}"
            assert "docker rm" not in said, said
            assert f"`docker rename {temporary} {blue}`" in (refused.value.fix or ""), said
        assert docker.inspect(temporary).status == {"running": "running",
                                                    "stopped": "exited"}[state]
        if state == "running":
            assert through_proxy(env) == ("blue", VERSIONS["v3"].tag)


def test_a_caddyfile_behind_a_config_loaded_onto_a_down_slot_is_fixed_by_the_switch_that_serves(
        scene_stack: DrillStack) -> None:
    """Found by review: Caddy's running config pointed at green (stopped) through POST
    /load, the Caddyfile on disk still naming blue. The fix began "`runbook switch ENV --slot
    green` writes the file back in line with what Caddy runs": typed as printed, refused
    (exit 4, green does not answer healthy). The first switch it names serves users again:
    typed as printed, it exits 0 and users reach v3 on blue, with no problem left. Oracle:
    the proxy."""

    from runbook import caddy
    from runbook.drill import scenes

    scene_stack.arrange(scenes.PREVIOUS)  # v3 serves from blue; v2 stopped on green
    env = scene_stack.env
    text = caddy.read(env)
    start, end = caddy.find_block(text)
    block = text[start:end].replace(f"localhost:{env.slot(Slot.BLUE).port}",
                                    f"localhost:{env.slot(Slot.GREEN).port}")
    _loaded_only(env, text[:start] + block.replace('"blue"', '"green"') + text[end:])
    assert caddy.read(env) == text  # the premise: the file names blue, Caddy runs green
    assert drill_http.get(f"{env.caddy.proxy_url}/version", timeout=5).status_code == 502
    code, out, problems = status(scene_stack)
    assert_listed(code, out, problems)
    [differs] = [p for p in problems if p["check"] == "caddyfile_differs_from_what_runs"]
    switches = re.findall(r"`(runbook switch [^`]+)`", differs["fix"])
    assert switches, differs
    assert switches[0] == f"runbook switch {env.source} --slot blue", differs
    _serves_v3_on_blue_as_typed(scene_stack, switches[0])


def test_a_deleted_state_file_with_no_kept_copy_names_the_deploy_of_the_version_that_serves(
        scene_stack: DrillStack) -> None:
    """Found by review: the state file deleted (no copy kept), blue serving v3: the fix was
    "deploy first, or check [state] file in the environment configuration", no command, no
    version, while status showed blue serving a7f3fbb. It names `runbook deploy ENV
    --version <what blue's /health says>`, which is taken as printed (its dry run exits 0).
    Oracle: the version's own tag, the dry run."""
    from runbook import kept_state
    from runbook.drill import scenes

    scene_stack.arrange(scenes.PREVIOUS)  # v3 serves from blue; v2 stopped on green
    env = scene_stack.env
    env.state_file.unlink()
    kept_state.copy_path(env.runs_dir, env.state_file, env.name).unlink(missing_ok=True)
    code, text, problems = status(scene_stack)
    assert_listed(code, text, problems)
    [gone] = [p for p in problems if p["check"] == "state_unreadable"]
    deploy = f"runbook deploy {env.source} --version {VERSIONS['v3'].tag}"
    assert f"`{deploy}`" in gone["fix"], gone
    _each_runs({deploy})


@pytest.mark.parametrize("edit", ["an-upstreams-host", "the-other-slots-port",
                                  "a-setting-in-the-block-and-one-outside",
                                  "outside-the-markers"])
def test_a_caddyfile_block_edited_on_disk_and_not_loaded_is_a_problem_until_put_back(
        stack: DrillStack, edit: str) -> None:
    """Found by a review that built a host by hand: after a failed rollback's undo, the block
    between the markers on disk named an upstream edited by hand to 127.0.0.1 while Caddy
    served the config it had loaded, and status said "No problems found": a Caddy restart, or
    a reload by another tool, would have loaded the file. Edited on disk only (Caddy not
    reloaded), the block is a problem naming what the file names and what Caddy dials, with
    exit 1, in text and JSON alike; put back, "No problems found" again. An edit outside the
    markers is the operator's own: no problem. Oracle: Caddy's own adaptation of the file
    (`/adapt`) against the config it runs (`/config/`)."""
    from runbook import caddy

    env = stack.env
    path = env.caddy.caddyfile
    text = path.read_text()
    start, end = caddy.find_block(text)
    blue, green = env.slot(Slot.BLUE).port, env.slot(Slot.GREEN).port
    block = text[start:end]
    if edit == "an-upstreams-host":  # the review's: one of the block's two upstreams
        assert block.count(f"localhost:{blue}") == 2, block
        edited = text[:start] + block.replace(f"localhost:{blue}", f"127.0.0.1:{blue}", 1) \
            + text[end:]
    elif edit == "the-other-slots-port":
        edited = text[:start] + block.replace(f"localhost:{blue}", f"localhost:{green}") \
            .replace('"blue"', '"green"') + text[end:]
    elif edit == "a-setting-in-the-block-and-one-outside":
        setting = block.replace('"blue"\n', '"blue"\n\t\t\tflush_interval -1\n', 1)
        assert setting != block
        edited = (text[:start] + setting + text[end:]).replace(
            'respond /ping "pong" 200', 'respond /ping "pang" 200', 1)
    else:
        edited = text.replace('respond /ping "pong" 200', 'respond /ping "pang" 200', 1)
    assert edited != text
    running = drill_http.get(f"{env.caddy.admin_url}/config/", timeout=10).json()
    files.atomic_write(path, edited.encode())  # on disk only: Caddy is not reloaded
    try:
        adapted = drill_http.post(f"{env.caddy.admin_url}/adapt", content=edited,
                                  headers={"Content-Type": "text/caddyfile"}, timeout=10)
        assert adapted.json()["result"] != running  # the premise: a reload would change it
        assert drill_http.get(f"{env.caddy.admin_url}/config/", timeout=10).json() == running
        code, out, problems = status(stack)
        if edit == "outside-the-markers":
            assert (code, problems) == (0, []), out
            assert out.strip().splitlines()[-1] == NO_PROBLEMS
        else:
            assert_listed(code, out, problems)
            if edit == "an-upstreams-host":
                [found] = [p for p in problems
                           if p["check"] == "caddyfile_block_differs_from_what_runs"]
                line = edited[:edited.index(f"127.0.0.1:{blue}")].count("\n") + 1
                assert f"127.0.0.1:{blue} at line {line}" in found["problem"], found
                assert f"Caddy dials localhost:{blue}" in found["problem"], found
                assert "restart" in found["problem"], found
                assert f"(localhost:{blue} instead of 127.0.0.1:{blue} at line {line})" \
                    in found["fix"], found
                assert "runbook switch" not in found["fix"], found  # it would load the edit
            elif edit == "the-other-slots-port":
                [found] = [p for p in problems
                           if p["check"] == "caddyfile_differs_from_what_runs"]
                assert "points at green but Caddy runs blue" in found["problem"], found
            else:  # a JSON path inside the block's handler, never the one outside
                [found] = [p for p in problems
                           if p["check"] == "caddyfile_block_differs_from_what_runs"]
                assert re.search(r"differs from Caddy's running config at apps\.http\.servers"
                                 r"\.\w+\.routes\S*\.handle\[\d+\]\.flush_interval;",
                                 found["problem"]), found
            assert len(problems) == 1, problems  # said once
    finally:
        files.atomic_write(path, text.encode())
    code, out, problems = status(stack)
    assert (code, problems) == (0, []), out
    assert out.strip().splitlines()[-1] == NO_PROBLEMS


@contextlib.contextmanager
def _second_caddy(stack: DrillStack, slot: Slot) -> Iterator[str]:
    """Another real Caddy on this host (the drill's image, on the host's network as the
    drill's own), whose loaded config sends a site of its own to `slot`. Yields its admin
    URL: what an environment file's admin_url names when it points at the wrong Caddy."""
    import time

    from runbook import docker
    from tests.drill_checks import closed_ports

    admin, site = closed_ports(2)
    folder = stack.run_dir / "second-caddy"
    folder.mkdir(exist_ok=True)
    (folder / "Caddyfile").write_text(
        f"{{\n\tadmin 127.0.0.1:{admin}\n\tauto_https off\n}}\n\n"
        f"http://127.0.0.1:{site} {{\n\tbind 127.0.0.1\n"
        f"\treverse_proxy localhost:{stack.env.slot(slot).port} {{\n"
        f"\t\theader_down X-Togather-Slot \"{slot}\"\n\t}}\n}}\n")
    name = f"{stack.prefix}second-caddy"
    stack.docker("rm", "-f", name, check=False)
    stack.docker("run", "-d", "--rm", "--network", "host", "--name", name,
                 "--label", f"io.togather.drill.run={stack.run_id}",
                 "-v", f"{folder}:{folder}:ro", docker.inspect(stack.caddy_container).image
                 or "", "caddy", "run", "--config", f"{folder}/Caddyfile",
                 "--adapter", "caddyfile")
    url = f"http://127.0.0.1:{admin}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(Exception):
                if drill_http.get(f"{url}/config/", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, stack.docker("logs", name, check=False).stderr
            time.sleep(0.2)
        yield url
    finally:
        stack.docker("rm", "-f", name, check=False)


def test_caddy_and_the_proxy_disagreeing_names_no_slot_to_stop_and_no_command_that_refuses(
        scene_stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: admin_url pointed at a second Caddy whose config dials green while
    the proxy (the real Caddy) answers X-Togather-Slot: blue (v3 there, v2 on green, both
    running). The rollback and the switch refuse ("cannot tell which slot takes traffic"),
    but status named green as the traffic slot and said to stop blue, "it takes no
    traffic": the container users reach. Now it says it cannot tell, in the refusal's
    words, names no slot as serving, and no fix stops either slot or names a command that
    refuses. Oracle: the real proxy's answer, the rollback's own refusal, the dry runs."""
    from runbook import health
    from runbook.drill import scenes
    from tests.drill_checks import through_proxy

    scene_stack.arrange(scenes.PREVIOUS)  # v3 serves from blue; v2 stopped on green
    env = scene_stack.env
    scene_stack.docker("start", env.slot(Slot.GREEN).container)  # a healthy standby
    health.wait_healthy(env, Slot.GREEN, 60)
    toml = tmp_path / "second-caddy.toml"
    with _second_caddy(scene_stack, Slot.GREEN) as admin:
        done = status_with(scene_stack, toml, admin_url=admin)
        text = _cli(toml, "status")
        refused = _cli(toml, "rollback", "--dry-run")  # the premise: refused
        assert refused.returncode == 4, refused.stdout + refused.stderr
        said = refused.stderr.split("cannot tell which slot takes traffic: ", 1)[1]
        assert through_proxy(env)[0] == "blue"  # users reach blue
        assert "Traceback" not in done.stderr + text.stderr, done.stderr + text.stderr
        data = json.loads(done.stdout)
        problems = data["problems"]
        for container in (env.slot(Slot.BLUE).container, env.slot(Slot.GREEN).container):
            assert f"docker stop {container}" not in json.dumps(problems), problems
        assert "it takes no traffic" not in json.dumps(problems), problems
        assert done.returncode == 1 and text.returncode == 1, done.stdout
        assert data["traffic"]["slot"] is None and data["traffic"]["proxy_slot"] == "blue", data
        assert "  traffic   unknown" in text.stdout, text.stdout
        unclear = problem(problems, "cannot tell which slot takes traffic: ")
        assert said.split("; nothing was changed")[0] in unclear["problem"], (said, unclear)
        assert "runbook switch" not in json.dumps(problems), problems
        _each_runs(_changing(problems))  # none refuses (none is named: each would)


def test_a_runs_dir_that_is_a_file_is_said_never_as_a_held_slot_to_stop(
        stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: with `[logs] runs_dir` a regular file, status read the older h2c
    record under it for each running slot and said "cannot read .../<env>.green.held-for-h2c
    ([Errno 20] Not a directory ...)", its fix a `docker stop` of that container (the one
    serving users). Nothing can be recorded under a file: the problem is the key's folder."""
    from runbook import environment as envmod

    runs = tmp_path / "runs"
    runs.write_text("a file, not a folder")
    toml = tmp_path / "host.toml"
    toml.write_text(envmod.to_toml(dataclasses.replace(stack.env, runs_dir=runs)))
    argv = [sys.executable, "-m", "runbook.cli", "status", str(toml), "--format", "json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    assert "Traceback" not in done.stderr, done.stderr
    problems = json.loads(done.stdout)["problems"]
    assert done.returncode == 1, done.stdout
    found = problem(problems, f"[logs] runs_dir {runs} is not a folder")
    assert f"point [logs] runs_dir in {toml} at a folder" in found["fix"], found
    assert "held-for-h2c" not in done.stdout and "docker stop" not in done.stdout, problems
    assert len(problems) == 1, problems  # the baseline has none
