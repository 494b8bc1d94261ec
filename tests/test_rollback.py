"""The rollback engine against the real drill stack: every path, every refusal.

Runs against every drill host shape (`--shape`, Makefile `test`). Each test arranges its
scene first: most as a drill scene (what the deploys leave, arranged directly and proved from
Docker, Caddy, the proxy and Postgres: DrillStack.arrange), a few by deploying the way the host
deploys (`runbook deploy` where there is compose, the host's own script, `docker run`,
DrillStack.deploy_docker_run, on a docker-run host, where a removed slot is a precondition,
exit 4, nothing changed, instead of a recreate), which also proves those deploys."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from runbook import (
    caddy,
    compose,
    deploy,
    docker,
    files,
    health,
    rollback,
    slots,
    status,
    switch,
    traffic,
)
from runbook import environment as envmod
from runbook import state as states
from runbook.drill import http as drill_http
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot, command_arg
from runbook.errors import ExitCode, RunbookError
from tests.drill_checks import (
    caddy_reload_through,
    closed_port,
    compose_naming,
    migrated,
    owned_by_a_role,
    rebuilt_as,
    reporting_schema,
    retag,
    runbook_cli,
    running_from,
    serving,
    snapshot,
    through_proxy,
    two_deployments,
    v3_recorded_and_checked,
)

pytestmark = pytest.mark.docker
V1, V2, V3 = VERSIONS["v1"], VERSIONS["v2"], VERSIONS["v3"]


@pytest.fixture
def stack(drill_stack: DrillStack) -> DrillStack:
    """The session stack as the last test left it: every test here arranges its scene first."""
    return drill_stack


def deploy_to(stack: DrillStack, env: Environment, version: str) -> None:
    """Deploy `version` as this host shape deploys (see the module's docstring)."""
    if stack.has("docker-run"):
        stack.deploy_docker_run(VERSIONS[version])
        return
    deploy.deploy(env, deploy.Options(version=VERSIONS[version].tag))


def deployed(stack: DrillStack) -> Environment:
    """v2 deployed over the baseline, for real."""
    stack.reset()
    deploy_to(stack, stack.env, "v2")
    return stack.env


def pin_other_site(env: Environment, upstreams: str) -> str:
    """The drill's other site (outside the slot markers) proxying to `upstreams` for good,
    written and loaded into Caddy; returns the Caddyfile text now on disk and running."""
    text = env.caddy.caddyfile.read_text()
    pinned = text.replace('respond /ping "pong" 200', f"reverse_proxy {upstreams}")
    assert pinned != text
    write_and_load(env, pinned)
    return pinned


def write_and_load(env: Environment, text: str) -> None:
    """`text` as the Caddyfile on disk and the config Caddy runs (a host's own edit)."""
    files.atomic_write(env.caddy.caddyfile, text.encode())
    load_only(env, text)


def load_only(env: Environment, text: str) -> None:
    """Caddyfile `text` loaded into Caddy through its admin API, the file on disk untouched
    (a route loaded during an incident, another environment's switch)."""
    drill_http.post(f"{env.caddy.admin_url}/load", content=text,
                    headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()


def with_emergency_route(text: str) -> str:
    """The drill's Caddyfile `text` with an emergency route on its other site: /export*
    answered 503 "closed"."""
    patched = text.replace('respond /ping "pong" 200',
                           'respond /ping "pong" 200\n\trespond /export* "closed" 503')
    assert patched != text
    return patched


def docker_run_host(stack: DrillStack) -> bool:
    return stack.has("docker-run")


@pytest.mark.shape_specific
def test_deploy_moves_traffic_and_records_the_schema(stack: DrillStack) -> None:
    stack.reset()
    if docker_run_host(stack):  # no compose: runbook deploy refuses before any change
        before = snapshot(stack.env)
        with pytest.raises(RunbookError) as err:
            deploy.deploy(stack.env, deploy.Options(version=V2.tag))
        assert err.value.exit_code == ExitCode.PRECONDITION, err.value
        assert "compose" in str(err.value)
        assert snapshot(stack.env) == before
        return
    env = deployed(stack)
    assert through_proxy(env) == ("green", V2.tag)
    st = states.read_state(env.state_file)
    assert st.current and st.previous
    assert (st.current.version, st.current.active_slot, st.current.migration_version) == (
        V2.tag, Slot.GREEN, 2)
    assert (st.previous.version, st.previous.status) == (V1.tag, "superseded")
    assert not docker.inspect(env.slot("blue").container).running  # stopped, not removed
    assert docker.inspect(env.slot("blue").container).exists
    assert st.current.migrations_run == 1  # its migrate moved the schema 1 -> 2
    # v3 ships schema 2 too: its migrate applies nothing, and the state file says so (it
    # said 1 for every deploy with a migrate_command; found by review)
    deploy_to(stack, env, "v3")
    st = states.read_state(env.state_file)
    assert st.current is not None
    assert (st.current.version, st.current.migration_version, st.current.migrations_run) == (
        V3.tag, 2, 0)


@pytest.mark.shape_specific
def test_deploy_refused_on_a_docker_run_host_names_what_deploys_there(stack: DrillStack) -> None:
    """On a host whose slots were made by `docker run` (no compose file), `runbook deploy` is
    refused, dry and real alike (exit 4, nothing changed). Its fix was the rollback's: recreate
    the slot's container with the image "the way it was created ... then run the rollback
    again" (found by review): no rollback was run, the slot may already run that image (green
    runs v2 here) and a deploy recreates anyway, so following it came back to the same
    refusal. It names the host's own deploy (its `docker run`), then `runbook switch` to that
    slot, or the keys that give `runbook deploy` its compose: `[compose] file` and
    `[slots.<slot>] service` (README: "A host without compose")."""
    if not docker_run_host(stack):
        pytest.skip("only a docker-run host has no compose for `runbook deploy`")
    stack.arrange(scenes.PREVIOUS_RUNNING)  # v3 serves from blue; green still runs v2
    env = stack.env
    green = env.slot(Slot.GREEN)
    assert docker.inspect(green.container).image == V2.image  # the premise
    before = snapshot(env)
    for dry in (("--dry-run",), ("--yes",)):
        done = runbook_cli(env, "deploy", "--version", V2.tag, *dry, "--format", "json")
        assert done.returncode == ExitCode.PRECONDITION, done.stdout + done.stderr
        said = json.loads(done.stdout.splitlines()[-1])
        assert said["exit_code"] == ExitCode.PRECONDITION, said
        assert green.container in said["error"] and "compose" in said["error"], said
        fix = said["fix"]
        assert "rollback" not in fix, fix  # no rollback was asked for
        assert f"runbook deploy {command_arg(env)}" not in fix, fix  # refused here
        assert "docker run" in fix and green.container in fix, fix
        assert f"`runbook switch {command_arg(env)} --slot green`" in fix, fix
        assert "[compose] file" in fix and "[slots.green] service" in fix, fix
        assert "[slots.blue] service" in fix, fix  # deploys alternate: the next goes to blue
        assert str(env.source) in fix, fix
        assert snapshot(env) == before


@pytest.mark.shape_specific
def test_status_with_nothing_to_roll_back_to_names_a_deploy_that_runs_on_this_host(
        stack: DrillStack) -> None:
    """A first deployment whose build is broken (its /health answers 503 on both slots, no
    earlier deployment recorded): `runbook status`'s way out is a deploy of a known-good
    version. On a `docker run` host it named `runbook deploy`, refused there (exit 4): it
    names the host's own deploy and `runbook switch` instead. Oracle: the deploy's own dry
    run on this host."""
    stack.arrange(scenes.baseline("unhealthy"))
    env = stack.env
    assert states.read_state(env.state_file).previous is None  # the premise
    done = subprocess.run([sys.executable, "-m", "runbook.cli", "status", str(env.source),
                           "--format", "json"], capture_output=True, text=True, timeout=120,
                          check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stdout + done.stderr
    [found] = [p for p in json.loads(done.stdout)["problems"]
               if p["check"] == "active_unhealthy"]
    fix = found["fix"]
    assert "deploy a known-good version" in fix, fix
    deploys = runbook_cli(env, "deploy", "--version", V1.tag, "--dry-run")
    if docker_run_host(stack):
        assert deploys.returncode == ExitCode.PRECONDITION, deploys.stdout + deploys.stderr
        assert f"runbook deploy {command_arg(env)}" not in fix, fix  # refused here
        assert "docker run" in fix and f"runbook switch {command_arg(env)} --slot" in fix, fix
    else:
        assert deploys.returncode == 0, deploys.stdout + deploys.stderr
        assert f"`runbook deploy {command_arg(env)} --version <known-good version>`" in fix, fix


def test_rollback_to_a_running_standby(stack: DrillStack) -> None:
    stack.arrange(scenes.PREVIOUS_RUNNING)  # v1, v2, v3 deployed; v2 still running on green
    env = stack.env
    assert through_proxy(env) == ("blue", V3.tag)
    assert docker.inspect(env.slot("green").container).running
    result = rollback.rollback(env)
    assert result.plan.facts["container_action"] == "none"
    assert through_proxy(env) == ("green", V2.tag)
    st = states.read_state(env.state_file)
    assert st.current and st.previous
    assert (st.current.version, st.current.status, st.current.rollback_count) == (
        V2.tag, "active", 1)
    assert (st.previous.version, st.previous.status) == (V3.tag, "rolled_back")
    assert not docker.inspect(env.slot("blue").container).running


def test_an_old_slot_docker_restarts_at_every_engine_start_is_said(stack: DrillStack) -> None:
    """Found by review: under the restart policy `always` (a host's compose file), the old
    slot the rollback stops is started again by Docker at its next engine start (a reboot):
    the build users were taken off runs beside the new one, unsaid. The run says so, with
    the `docker update` that keeps it stopped; the policy itself is the host's, unchanged.
    The oracle: Docker's own inspect of the policy, and the stop as Docker reports it."""
    stack.arrange(scenes.PREVIOUS_RUNNING)
    env = stack.env
    blue = env.slot(Slot.BLUE).container
    stack.docker("update", "--restart", "always", blue)
    said: list[str] = []
    rollback.rollback(env, notify=said.append)
    assert through_proxy(env) == ("green", V2.tag)
    assert stack.docker("inspect", "-f", "{{.State.Status}} {{.HostConfig.RestartPolicy.Name}}",
                        blue).stdout.split() == ["exited", "always"]
    assert any("restart policy is `always`" in m
               and f"docker update --restart unless-stopped {blue}" in m for m in said), said


def _connections_accepted(snmp: Path) -> int:
    """TCP connections accepted in a network namespace, as its kernel counts them
    (PassiveOpens in `snmp`, /proc/<pid>/net/snmp of a process in it)."""
    header, values = [line.split() for line in snmp.read_text().splitlines()
                      if line.startswith("Tcp:")]
    return int(values[header.index("PassiveOpens")])


def test_active_health_checks_move_with_the_switch(stack: DrillStack) -> None:
    """Found by review: a `health_port` in the managed block stayed on the old slot's port.
    The switch was verified (the old slot still answered its checks), then the old slot was
    stopped and Caddy marked the new upstream down: every user got 503 after a run that
    said done. Oracle: Caddy's loaded config, the probes green accepted (the kernel's count)
    with blue stopped, and the proxy."""
    two_deployments(stack)  # green v2 stopped, blue v3 live
    env = stack.env
    blue, green = env.slot(Slot.BLUE).port, env.slot(Slot.GREEN).port
    text = env.caddy.caddyfile.read_text()
    # keepalive off: each probe is a connection of its own, which the kernel counts
    checked = text.replace(f'reverse_proxy localhost:{blue} {{\n\t\t\theader_down',
                           f"reverse_proxy localhost:{blue} {{\n\t\t\thealth_uri /healthz\n"
                           f"\t\t\thealth_port {blue}\n\t\t\thealth_interval 100ms\n"
                           "\t\t\ttransport http {\n\t\t\t\tkeepalive off\n\t\t\t}\n"
                           "\t\t\theader_down")
    assert checked.count(f"health_port {blue}") == 2, checked
    write_and_load(env, checked)
    assert through_proxy(env) == ("blue", V3.tag)
    rollback.rollback(env)
    assert not docker.inspect(env.slot(Slot.BLUE).container).running
    running = json.dumps(drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).json())
    assert f'"port": {green}' in running and f'"port": {blue}' not in running, running
    # ten health intervals with the old slot stopped, counted, not slept (on a busy machine
    # 1 s held far fewer): each of the two handlers' checkers probes once an interval, and
    # nothing else reaches green meanwhile, so 20 connections green accepted. A probe of the
    # stopped blue would fail, mark green down, and the proxy answer 503 below.
    pid = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}",
                          env.slot(Slot.GREEN).container], capture_output=True, text=True,
                         check=True).stdout.strip()
    snmp = Path(f"/proc/{pid}/net/snmp")  # green's namespace: only its app listens there
    probes, deadline = _connections_accepted(snmp), time.monotonic() + 60
    while (seen := _connections_accepted(snmp) - probes) < 20:
        assert time.monotonic() < deadline, f"green was probed {seen} times in 60 s"
        time.sleep(0.05)
    for _ in range(5):
        assert through_proxy(env) == ("green", V2.tag)


def test_a_caddyfile_that_is_not_the_whole_config_caddy_runs_is_refused(
        stack: DrillStack) -> None:
    """Found by review: `/load` replaces Caddy's whole config. With [caddy] caddyfile naming
    one site's file (a host whose Caddyfile imports a file per site) the switch loaded that
    alone: every other site vanished, and verification, of the app's site, passed."""
    env = two_deployments(stack)  # green v2 stopped, blue v3 live
    text = env.caddy.caddyfile.read_text()
    site = text[text.index(f"http://127.0.0.1:{stack.ports.proxy} {{"):]
    fragment = env.caddy.caddyfile.with_name("togather.caddy")
    fragment.write_text(site)  # the app's site alone, slot markers and all
    partial = env.with_(caddy=dataclasses.replace(env.caddy, caddyfile=fragment))
    before = snapshot(env)
    for attempt in (lambda: rollback.rollback(partial),
                    lambda: switch.switch(partial, switch.Options(slot=Slot.GREEN))):
        with pytest.raises(RunbookError) as err:
            attempt()
        assert err.value.exit_code == ExitCode.PRECONDITION, err.value
        assert "would drop what Caddy serves now" in str(err.value), err.value
        assert f"127.0.0.1 on 127.0.0.1:{stack.ports.other_site}" in str(err.value)
    assert snapshot(env) == before
    assert fragment.read_text() == site
    ping = drill_http.get(f"http://127.0.0.1:{stack.ports.other_site}/ping", timeout=5)
    assert ping.status_code == 200 and ping.text == "pong"  # the other site still served
    assert through_proxy(env) == ("blue", V3.tag)


# a comment that names both markers, as a host's own Caddyfile header may
MARKERS_IN_A_COMMENT = ("# Deploy tooling rewrites the lines between # BLUE_GREEN_SLOT_START "
                        "and # BLUE_GREEN_SLOT_END.\n")


def test_slot_markers_the_switch_cannot_read_are_refused_exit_4_naming_the_line_to_fix(
        stack: DrillStack) -> None:
    """Found by review: with both marker names in line 1's comment (loaded into Caddy as it
    is), `rollback --dry-run`, `rollback --yes` and `switch --yes` exited 1 ("failed safely":
    something was attempted) although nothing was changed. With another site outside the
    markers proxying to the standby too, the rollback's refusal said only "Caddy's running
    config dials both slots' ports" and offered `runbook switch` as the fix, which failed on
    the markers: on-call went round in a circle. Each refusal is exit 4, names the file,
    the marker line and its fix, and never offers the switch (nor does status); the fix, as
    printed, lets the rollback plan. Oracle: the exit codes, Caddy's loaded config
    (GET /config/), Docker, the proxy and the files, read back."""
    env = two_deployments(stack, stop_old_slot=False)  # v3 on blue serves, v2 runs on green
    text = MARKERS_IN_A_COMMENT + env.caddy.caddyfile.read_text()
    green = env.slot(Slot.GREEN).port
    pinned = text.replace('respond /ping "pong" 200', f"reverse_proxy localhost:{green}")
    assert pinned != text
    for caddyfile, commands in (
            (text, [("rollback", "--to", V2.tag, "--dry-run"), ("rollback", "--to", V2.tag,
                                                                 "--yes"),
                    ("switch", "--slot", "green", "--yes")]),
            (pinned, [("rollback", "--dry-run"), ("rollback", "--yes"),
                      ("switch", "--slot", "green", "--yes")])):
        write_and_load(env, caddyfile)
        before = snapshot(env)
        running = drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).json()
        for args in commands:
            done = runbook_cli(env, *args)
            said = done.stdout + done.stderr
            assert done.returncode == ExitCode.PRECONDITION, (args, said)
            assert "line 1 holds both # BLUE_GREEN_SLOT_START and # BLUE_GREEN_SLOT_END" \
                in said, (args, said)
            assert f"{env.caddy.caddyfile}" in said, (args, said)
            assert "split line 1, or reword it if it only mentions them" in said, (args, said)
            assert "nothing was changed" in said, (args, said)
            assert "runbook switch" not in said, (args, said)  # it fails the same way
        assert snapshot(env) == before
        assert drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).json() == running
    # status offers no switch for it either (it would fail the same way)
    looked = runbook_cli(env, "status", "--format", "json")
    problems = json.loads(looked.stdout)["problems"]
    assert [p for p in problems if "line 1 holds both" in p["problem"]], problems
    assert not [p for p in problems if "runbook switch" in p["fix"]], problems
    # the fix, as printed: line 1 reworded (a comment: Caddy runs the same config)
    reworded = pinned.replace(MARKERS_IN_A_COMMENT, "# Deploy tooling rewrites the slot block.\n")
    files.atomic_write(env.caddy.caddyfile, reworded.encode())
    done = runbook_cli(env, "rollback", "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("blue", V3.tag)


def _at_switch(action: Callable[[], None]) -> Callable[..., None]:
    """A progress callback that runs `action` as the switch step starts: a colleague's
    change between the plan (and its health gate) and the switch's write."""
    def progress(event: str, step: object, message: str = "") -> None:
        if event == "start" and getattr(step, "name", "") == "switch":
            action()
    return progress


def _another_site(text: str, port: int, host: str) -> str:
    """A site block for `host` on the app's port, bound as this shape binds the app's site
    (so the same Caddy server takes it), answering its own name."""
    head = f"http://127.0.0.1:{port} {{\n"
    bind = text[text.index(head) + len(head):].split("\n", 1)[0]
    assert bind.strip().startswith("bind "), bind
    return f'\nhttp://{host}:{port} {{\n{bind}\n\trespond "{host}"\n}}\n'


def _refused_unchanged(stack: DrillStack, env: Environment, err: RunbookError) -> None:
    """The standby the rollback started is stopped again and users stay on blue v3."""
    assert err.exit_code == ExitCode.FAILED_SAFELY, err
    assert not docker.inspect(env.slot(Slot.GREEN).container).running
    assert through_proxy(env) == ("blue", V3.tag)
    current = states.read_state(env.state_file).current
    assert current is not None and current.version == V3.tag


def test_a_site_loaded_into_caddy_during_the_rollback_is_never_dropped(
        stack: DrillStack) -> None:
    """Found by review: the sites Caddy serves were compared with the new Caddyfile's at plan
    time only. A site loaded through the admin API during the health gate was dropped by the
    switch's load, and the run, verifying only the app's site, ended with exit 0."""
    env = two_deployments(stack)  # green v2 stopped, blue v3 live
    text = env.caddy.caddyfile.read_text()
    extra = text + _another_site(text, stack.ports.proxy, "extra.test")

    def load_extra() -> None:
        drill_http.post(f"{env.caddy.admin_url}/load", content=extra,
                        headers={"Content-Type": "text/caddyfile"}, timeout=10
                        ).raise_for_status()

    with pytest.raises(RunbookError) as err:
        rollback.rollback(env, progress=_at_switch(load_extra))
    assert "(extra.test on " in err.value.message, err.value
    _refused_unchanged(stack, env, err.value)
    assert env.caddy.caddyfile.read_text() == text
    seen = drill_http.get(f"{env.caddy.proxy_url}/", headers={"Host": "extra.test"},
                          timeout=5)
    assert (seen.status_code, seen.text) == (200, "extra.test")  # still served


def test_a_route_loaded_into_caddy_during_the_rollback_is_never_dropped(
        stack: DrillStack) -> None:
    """Found by review: the switch compared only the sites (host and listener) Caddy ran
    with the plan's, so an emergency route loaded into an existing site through the admin
    API during the health gate (here /export* answered 503) was dropped by the switch's
    load, silently. The switch now refuses when Caddy's config changed since the plan."""
    env = two_deployments(stack)  # green v2 stopped, blue v3 live
    text = env.caddy.caddyfile.read_text()
    patched = with_emergency_route(text)
    load_only(env, text)  # Caddy runs the file, whatever an earlier test on this stack loaded

    try:
        with pytest.raises(RunbookError) as err:
            rollback.rollback(env, progress=_at_switch(lambda: load_only(env, patched)))
        assert "Caddy's config changed since the plan" in err.value.message, err.value
        _refused_unchanged(stack, env, err.value)
        assert env.caddy.caddyfile.read_text() == text
        seen = drill_http.get(f"http://127.0.0.1:{stack.ports.other_site}/export/all",
                              timeout=5)
        assert (seen.status_code, seen.text) == (503, "closed")  # still there
    finally:
        load_only(env, text)


@pytest.mark.parametrize("command", ["rollback", "switch"])
def test_a_route_loaded_into_caddy_between_the_switchs_check_and_its_load_is_never_dropped(
        stack: DrillStack, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """Found by review: the switch compared Caddy's running config with the plan's, then
    wrote the Caddyfile and POSTed it to /load. A change loaded in between (another
    environment sharing this Caddy switching at the same moment, an emergency route) was
    replaced by that load, silently. The load is now POST /config/ If-Match the ETag of the
    config the check compared: Caddy refuses it (412), the run is refused before the commit
    point and says so, the other change keeps running, traffic stays on blue."""
    if stack.env.caddy.reload is not envmod.ReloadMethod.ADMIN_API:
        pytest.skip("`caddy reload` and `systemctl reload` POST /load themselves, with no "
                    "If-Match: only the admin-API reload is a compare-and-swap (README)")
    env = two_deployments(stack, stop_old_slot=command == "rollback")  # blue v3 live
    text = env.caddy.caddyfile.read_text()
    patched = with_emergency_route(text)

    real_reload = caddy.reload
    reloads: list[str] = []

    def another_change_first(*args: Any, **kwargs: Any) -> None:
        if not reloads:  # the switch's own load, after its check and its write
            reloads.append("switch")
            load_only(env, patched)
        real_reload(*args, **kwargs)

    monkeypatch.setattr(caddy, "reload", another_change_first)
    try:
        with pytest.raises(RunbookError) as err:
            if command == "rollback":
                rollback.rollback(env)
            else:
                switch.switch(env, switch.Options(slot=Slot.GREEN, reason="test: the race"))
        seen = drill_http.get(f"http://127.0.0.1:{stack.ports.other_site}/export/all",
                              timeout=5)
        on_disk = env.caddy.caddyfile.read_text()
        proxied = through_proxy(env)
    finally:
        monkeypatch.undo()
        write_and_load(env, text)
    assert reloads == ["switch"]
    assert (seen.status_code, seen.text) == (503, "closed")  # the other change still runs
    assert proxied == ("blue", V3.tag)
    assert on_disk == text  # the written Caddyfile is put back by the switch's undo
    assert "Caddy's config changed after it was checked (HTTP 412" in err.value.message, \
        err.value
    assert err.value.exit_code == ExitCode.FAILED_SAFELY, err.value  # what it did undone
    if command == "rollback":
        assert not docker.inspect(env.slot(Slot.GREEN).container).running
    current = states.read_state(env.state_file).current
    assert current is not None and current.version == V3.tag


def test_a_route_loaded_into_caddy_between_the_undos_read_and_its_load_is_never_dropped(
        stack: DrillStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the undo of a failed switch read Caddy's config, decided what to load
    from it, then POSTed that to /load: a change loaded in between (here an emergency route
    on another site) was replaced. The undo's load is now If-Match the ETag of the config it
    decided from; refused (412), it decides again from what runs, keeping the change."""
    env = two_deployments(stack)  # green v2 stopped, blue v3 live
    text = env.caddy.caddyfile.read_text()
    real_verify, real_undo_config = caddy.verify, traffic.undo_config
    changes: list[str] = []

    def fail(*args: Any, **kwargs: Any) -> caddy.VerifyResult:
        result = real_verify(*args, **kwargs)
        return dataclasses.replace(result, ok=False, error="a verification that failed")

    def another_change_after(*args: Any, **kwargs: Any) -> Any:
        decided = real_undo_config(*args, **kwargs)
        if not changes:  # what Caddy runs now (the switch's load), with a route added
            patched = with_emergency_route(env.caddy.caddyfile.read_text())
            load_only(env, patched)
            changes.append(patched)
        return decided

    monkeypatch.setattr(caddy, "verify", fail)
    monkeypatch.setattr(traffic, "undo_config", another_change_after)
    try:
        with pytest.raises(RunbookError) as err:
            rollback.rollback(env)
        seen = drill_http.get(f"http://127.0.0.1:{stack.ports.other_site}/export/all",
                              timeout=5)
        monkeypatch.undo()
        proxied = through_proxy(env)
        on_disk = env.caddy.caddyfile.read_text()
    finally:
        monkeypatch.undo()
        write_and_load(env, text)
    assert len(changes) == 1
    assert (seen.status_code, seen.text) == (503, "closed")  # the other change still runs
    assert proxied == ("blue", V3.tag)  # and this environment's traffic went back
    assert on_disk == text
    assert err.value.exit_code == ExitCode.FAILED_SAFELY, err.value
    assert "that change was kept" in err.value.message, err.value


@pytest.mark.parametrize("when", ["before the switch step", "inside the switch step"])
def test_a_caddyfile_edited_during_the_rollback_is_neither_loaded_nor_overwritten(
        stack: DrillStack, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """Found by review: the switch rewrote the Caddyfile as it was at the switch, not as the
    plan showed it, so an edit made during the health gate (here a new site, not yet
    reloaded) went live unseen; one made while the switch step ran (its validation, its
    backup) was written over."""
    env = two_deployments(stack)  # green v2 stopped, blue v3 live
    text = env.caddy.caddyfile.read_text()
    edited = text + _another_site(text, stack.ports.proxy, "edited.test")

    def edit() -> None:
        files.atomic_write(env.caddy.caddyfile, edited.encode())

    progress = None
    if when == "before the switch step":
        progress = _at_switch(edit)
    else:
        real = caddy.write_backup

        def edit_then_back_up(*args: Any, **kwargs: Any) -> Any:
            edit()
            return real(*args, **kwargs)

        monkeypatch.setattr(caddy, "write_backup", edit_then_back_up)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env, progress=progress)
    assert "changed since the plan" in err.value.message, err.value
    _refused_unchanged(stack, env, err.value)
    assert env.caddy.caddyfile.read_text() == edited  # the colleague's edit is kept
    seen = drill_http.get(f"{env.caddy.proxy_url}/", headers={"Host": "edited.test"},
                          timeout=5)
    assert seen.text != "edited.test"  # and was not loaded by this run


def test_an_edit_made_while_the_switch_verifies_is_kept_aside_by_its_undo(
        stack: DrillStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: a colleague edited the Caddyfile in the seconds between the switch's
    write and its failed verification; the undo wrote the previous file over the edit, which
    was lost without a word. Traffic still goes back; the edit is copied aside and named."""
    env = two_deployments(stack)  # green v2 stopped, blue v3 live
    text = env.caddy.caddyfile.read_text()
    edits: list[bytes] = []
    real_verify = caddy.verify

    def edit_then_fail(*args: Any, **kwargs: Any) -> caddy.VerifyResult:
        result = real_verify(*args, **kwargs)
        edited = env.caddy.caddyfile.read_bytes() + b"\n# a colleague's edit\n"
        files.atomic_write(env.caddy.caddyfile, edited)
        edits.append(edited)
        return dataclasses.replace(result, ok=False, error="a verification that failed")

    monkeypatch.setattr(caddy, "verify", edit_then_fail)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env)
    _refused_unchanged(stack, env, err.value)
    assert env.caddy.caddyfile.read_text() == text  # the previous file, as the undo says
    assert len(edits) == 1
    kept = [p for p in env.caddy.caddyfile.parent.glob(".*runbook-edited-*")]
    assert [p.read_bytes() for p in kept] == edits, kept  # the edit, byte for byte
    assert f"that edit was kept at {kept[0]}" in err.value.message, err.value


def test_a_site_served_by_name_is_verified_through_this_hosts_caddy(stack: DrillStack) -> None:
    """Found by review: a host's Caddyfile serves the app by name (togather.example.org),
    so the default proxy_url (http://localhost) reached no site, every verification failed
    and every switch was undone; the only way round was proxy_url = the public name, which
    goes through DNS to whatever answers it. `[caddy] site` asks this host's Caddy for it."""
    env = two_deployments(stack)  # green v2 stopped, blue v3 live
    text = env.caddy.caddyfile.read_text()
    named = text.replace(f"http://127.0.0.1:{stack.ports.proxy} {{",
                         f"http://togather.test:{stack.ports.proxy} {{")
    assert named != text
    write_and_load(env, named)
    plain = drill_http.get(f"{env.caddy.proxy_url}/version", timeout=5)
    assert "X-Togather-Slot" not in plain.headers  # no site answers for the address alone
    site = env.with_(caddy=dataclasses.replace(env.caddy, site="togather.test"))
    toml = stack.run_dir / "site.toml"
    toml.write_text(envmod.to_toml(site))
    assert envmod.load_file(toml).caddy.site == "togather.test"  # the file says it too
    rollback.rollback(site)
    seen = drill_http.get(f"{env.caddy.proxy_url}/version", headers={"Host": "togather.test"},
                          timeout=5)
    assert (seen.headers["X-Togather-Slot"], seen.json()["version"]) == ("green", V2.tag)


@pytest.mark.any_shape
def test_a_previous_deployment_with_no_slot_is_rolled_back_to(stack: DrillStack) -> None:
    """Found by review: today's Go CLI rewrites the previous deployment with `"slot": ""`
    (its struct has no `active_slot`), and every runbook command refused such a file. The
    slot the previous deployment returns to is the one Caddy does not serve."""
    env = two_deployments(stack)  # green v2 stopped, blue v3 live
    doc = json.loads(env.state_file.read_text())
    previous = doc["previous_deployment"]
    previous.pop("active_slot")
    previous["slot"] = ""
    files.atomic_write(env.state_file, json.dumps(doc, indent=2).encode())
    read = states.read_state(env.state_file).previous
    assert read is not None and read.active_slot is None
    rollback.rollback(env)
    assert through_proxy(env) == ("green", V2.tag)
    current = states.read_state(env.state_file).current
    assert current is not None and (current.version, current.active_slot) == (V2.tag, Slot.GREEN)


@pytest.mark.any_shape
@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_a_state_file_a_deploy_script_built_with_jq_arg_is_rolled_back(
        stack: DrillStack) -> None:
    """Found by review on a drill stack: a deploy script that builds the state file with
    `jq --arg` writes numbers as strings and "" for an unset time. `"migrations_run": "1"`
    made status exit 1 and the rollback exit 4, and a lock's `"pid": "48213"` or
    `"locked_at": ""` did too: the emergency rollback waited for a hand edit. Oracle: jq
    writes the file and reads the result; the proxy says what serves."""
    env = two_deployments(stack)  # v3 serves from blue; v2 the previous (green)

    def jq(*args: str) -> str:
        return subprocess.run(["jq", *args, str(env.state_file)], capture_output=True,
                              text=True, check=True, timeout=30).stdout

    files.atomic_write(env.state_file, jq(
        "--arg", "ran", "1", "--arg", "none", "0", "--arg", "pid", "48213", "--arg", "unset", "",
        ".current_deployment.migrations_run = $ran | .current_deployment.rollback_count = $none"
        " | .previous_deployment.migrations_run = $ran"
        " | .previous_deployment.rollback_count = $none"
        " | .lock = {locked: false, pid: $pid, locked_at: $unset, lock_expires_at: $unset}"
    ).encode())
    seen = runbook_cli(env, "status")
    assert seen.returncode == 0 and "expected" not in seen.stdout, seen.stdout + seen.stderr
    done = runbook_cli(env, "rollback", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("green", V2.tag)
    assert jq("-r", ".current_deployment.version") == f"{V2.tag}\n"
    # the counter the rollback incremented in the type the script wrote it in, and what it
    # did not change as jq wrote it
    assert jq("-r", '"rollbacks=" + .current_deployment.rollback_count') == "rollbacks=1\n"
    assert jq("-c", ".previous_deployment.version, .previous_deployment.migrations_run") \
        == f'"{V3.tag}"\n"1"\n'
    assert jq("-c", ".lock.locked") == "false\n"


def test_a_state_file_with_a_key_written_twice_is_refused_and_left_as_it_is(
        stack: DrillStack) -> None:
    """Found by review: a state file with `"active_slot": "blue", ..., "active_slot":
    "green"` in its current deployment (a script that appends a key instead of replacing it)
    says two things: grep or sed read blue, Python, jq and Go green. Read last-wins, status
    reported what no tool agreed on, and a rollback's rewrite kept one value and dropped the
    other without a word. Both refuse it as a state file they cannot read is refused: the
    same exit code, one line naming the file, the key and the fix, nothing changed (the
    file's bytes, Caddy's running config, the proxy, the containers, no lock left); so does
    `state restore-kept` (exit 4).
    Oracle: a cut-short file's exit code, Caddy's admin API, Docker, the proxy, the files."""
    env = two_deployments(stack)  # v3 serves from blue; v2 the previous, stopped on green
    whole = env.state_file.read_text()
    config_url = f"{env.caddy.admin_url}/config/"
    before, running = snapshot(env), drill_http.get(config_url, timeout=5).json()

    env.state_file.write_text(whole[: len(whole) // 2])  # what a state file not read gives
    commands = (("status",), ("rollback", "--yes"))
    cut = [runbook_cli(env, *args) for args in commands]
    # status: exit 1 with the file's problem; the rollback: exit 4 (README)
    assert [c.returncode for c in cut] == [ExitCode.FAILED_SAFELY, ExitCode.PRECONDITION]

    doc = json.loads(whole)
    assert doc["current_deployment"]["active_slot"] == "blue"
    once = '"active_slot": "blue"'
    first = whole.index(once)  # the current deployment's, the first in the file
    twice = whole[:first] + f'{once}, "active_slot": "green"' + whole[first + len(once):]
    assert json.loads(twice)["current_deployment"]["active_slot"] == "green"  # last-wins
    env.state_file.write_text(twice)
    # and the kept copy is never put over it: older than the other tool's write
    expected = [*((args, c.returncode) for args, c in zip(commands, cut, strict=True)),
                (("state", "restore-kept", "--yes"), ExitCode.PRECONDITION)]
    for args, code in expected:
        done = runbook_cli(env, *args)
        said = [line for line in (done.stdout + done.stderr).splitlines()
                if "current_deployment.active_slot" in line]
        assert done.returncode == code, (args, done.stdout + done.stderr)
        assert len(said) == 1, (args, done.stdout + done.stderr)
        assert str(env.state_file) in said[0] and "written twice" in said[0], said
        assert '"active_slot" appears once in current_deployment' in done.stdout + done.stderr
        assert env.state_file.read_text() == twice
        assert drill_http.get(config_url, timeout=5).json() == running
        assert snapshot(env) == before | {"state": twice.encode()}


@pytest.mark.shape_specific
def test_a_health_answer_with_its_status_written_twice_fails_the_gate(
        stack: DrillStack) -> None:
    """Found by review: the standby's /health answered `{"status": "unhealthy", ...,
    "status": "healthy", ...}` (an app that writes the key twice): a shell check (grep)
    reads unhealthy, Python's json the last, healthy, and the rollback's gate passed it and
    sent users there. An answer that says two things is no pass: the gate fails naming the
    key, and users stay on the slot that serves. Oracle: the proxy's answer, Docker."""
    env = two_deployments(stack)  # v3 serves from blue; v2 the previous, stopped on green
    if stack.has("docker-run"):
        pytest.skip("the standby is made by the host's docker-run script here")
    config = env.slot(Slot.GREEN)
    labels = docker.inspect(config.container).labels or {}
    # green's own build (v2), its /health body sent with `"status": "unhealthy"` first
    app = ("import json, sys\nsys.path.insert(0, '/app')\nimport server\n"
           "real = server.Handler.send_json\n"
           "def send_json(self, code, body):\n"
           "    if self.path.split('?')[0] != '/health':\n"
           "        return real(self, code, body)\n"
           "    data = b'{\"status\": \"unhealthy\", ' + json.dumps(body).encode()[1:]\n"
           "    self.send_response(code)\n"
           "    self.send_header('Content-Type', 'application/json')\n"
           "    self.send_header('Content-Length', str(len(data)))\n"
           "    self.end_headers()\n"
           "    self.wfile.write(data)\n"
           "server.Handler.send_json = send_json\n"
           "sys.exit(server.serve())\n")
    stack.docker("rm", "-f", config.container)
    argv = ["docker", "create", "--name", config.container, "--network",
            f"{stack.project}_default", "-p", f"127.0.0.1:{config.port}:8080",
            "-e", "SLOT=green", "-e", "DATABASE_URL", "-e", "HEALTH_FIELDS=full",
            "--stop-timeout", "5", "--entrypoint", "python3"]
    for key, value in labels.items():
        argv += ["--label", f"{key}={value}"]
    subprocess.run([*argv, V2.image, "-c", app], check=True, capture_output=True, text=True,
                   env={**os.environ, "DATABASE_URL": stack.app_database_url})
    try:
        fast = env.with_(health=dataclasses.replace(env.health, timeout=10.0))
        with pytest.raises(RunbookError) as err:
            rollback.rollback(fast)
        said = str(err.value)
        assert err.value.exit_code == ExitCode.FAILED_SAFELY, said
        assert "did not become healthy" in said and "status is written twice" in said, said
        assert through_proxy(env) == ("blue", V3.tag)
        assert not docker.inspect(config.container).running  # undone: stopped again
    finally:
        stack.docker("rm", "-f", config.container, check=False)  # the next arrange remakes it


def test_rollback_to_a_stopped_standby_starts_it(stack: DrillStack) -> None:
    env = two_deployments(stack)  # green v2 stopped, blue v3 live
    assert docker.inspect(env.slot("green").container).status == "exited"
    result = rollback.rollback(env)
    assert result.plan.facts["container_action"] == "start"
    assert through_proxy(env) == ("green", V2.tag)
    steps = {o.name: o.status for o in result.outcomes}
    assert steps == {"preflight": "done", "start-slot": "ok", "health-gate": "ok",
                     "switch": "ok", "state": "ok", "stop-old-slot": "ok"}


@pytest.mark.any_shape
def test_rollback_to_a_paused_standby_unpauses_it(stack: DrillStack) -> None:
    """Docker refuses `docker start` on a paused container ("try unpause instead")."""
    stack.arrange(scenes.PREVIOUS_RUNNING)  # v2 still running on green, blue v3 live
    env = stack.env
    stack.docker("pause", env.slot("green").container)
    assert docker.inspect(env.slot("green").container).status == "paused"
    ident = stack.docker("inspect", "-f", "{{.Id}}", env.slot("green").container).stdout
    result = rollback.rollback(env)
    assert result.plan.facts["container_action"] == "unpause"
    start = next(s for s in result.plan.steps if s.name == "start-slot")
    assert start.details["command"] == (f"docker unpause {env.slot('green').container} (id "
                                        f"{ident.strip()[:12]}, as planned)")
    assert docker.inspect(env.slot("green").container).status == "running"
    assert through_proxy(env) == ("green", V2.tag)


@pytest.mark.any_shape
@pytest.mark.parametrize("status", ["dead", "restarting", "running in its loop"])
def test_a_dead_standby_is_replaced_and_a_restarting_one_is_refused(
        stack: DrillStack, status: str) -> None:
    """Neither can be started: a dead container only replaced; a restarting one keeps exiting
    (its restart policy starts it again), and the gate would call it "not running": refused
    up front, naming its logs. The states are hard to reach on purpose, so the container is
    described as Docker would report it. The baseline first: green's labels are read from
    the container this shape makes (the last test may have left none there: a failed CI)."""
    stack.reset()
    env = stack.env
    name = env.slot("green").container
    info = docker.ContainerInfo(name, True, status, V2.image,
                                labels=docker.inspect(name).labels)  # compose's, as made
    if status == "running in its loop":  # found by review: planned "already running" or
        # refused, by the instant it looked; its policy started it again a second ago
        info = dataclasses.replace(info, status="running", restart_count=4, started_at=(
            datetime.now(UTC) - timedelta(seconds=1)).isoformat().replace("+00:00", "Z"))
    if status != "dead" or docker_run_host(stack):  # dead: no compose to replace it
        with pytest.raises(RunbookError) as err:
            slots.prepare(env, Slot.GREEN, V2.tag, action="rollback", info=info)
        assert err.value.exit_code == ExitCode.PRECONDITION, err.value
        assert status.split()[0] in str(err.value) or "crash-looping" in str(err.value)
        if status != "dead":
            assert f"docker logs --tail 100 {name}" in (err.value.fix or "")
        return
    prep = slots.prepare(env, Slot.GREEN, V2.tag, action="rollback", info=info)
    assert prep.action == "recreate"
    assert "dead: Docker cannot start it" in prep.reason


@pytest.mark.any_shape
def test_a_restore_stops_a_paused_target_then_starts_it(stack: DrillStack) -> None:
    """The review's case: the restore stopped only `running` slots, so a paused target was
    left paused through the restore, and the `docker start` after it failed (409) with the
    serving slot stopped and the database replaced: the service down."""
    stack.reset()
    deploy_to(stack, stack.env, "v2")  # pre-deploy snapshot at schema 1, then migration 2
    env = stack.env
    blue = env.slot("blue").container
    stack.docker("start", blue)  # v1, the target, on a schema it does not know
    stack.docker("pause", blue)
    result = rollback.rollback(env, rollback.Options(restore_snapshot="auto"))
    assert result.plan.facts["container_action"] == "start"
    assert docker.inspect(blue).status == "running"
    assert through_proxy(env) == ("blue", V1.tag)
    with stack.connect() as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (1,)


@pytest.mark.shape_specific
def test_rollback_recreates_a_removed_container(stack: DrillStack) -> None:
    env = two_deployments(stack)
    docker.remove(env.slot("green").container)
    if docker_run_host(stack):  # nothing to recreate it from: exit 4, naming what to run
        before = snapshot(env)
        with pytest.raises(RunbookError) as err:
            rollback.rollback(env)
        assert err.value.exit_code == ExitCode.PRECONDITION, err.value
        assert env.slot("green").container in str(err.value)
        assert snapshot(env) == before
        return
    result = rollback.rollback(env)
    assert result.plan.facts["container_action"] == "recreate"
    info = docker.inspect(env.slot("green").container)
    assert info.running and info.image == V2.image
    assert info.labels and info.labels["com.togather.deployment.slot"] == "green"
    assert through_proxy(env) == ("green", V2.tag)


@pytest.mark.shape_specific
def test_a_docker_run_slot_is_never_recreated_through_a_compose_file_configured_anyway(
        stack: DrillStack) -> None:
    """A host whose slots were made by `docker run` (no compose label) but whose environment
    file names a compose file (the source checkout has one on every host): the project check
    passed a container without the label, and compose made a slot of its own (its network,
    env and labels, not the `docker run` ones). Refused, nothing changed."""
    if not docker_run_host(stack):
        pytest.skip("only a docker-run host's slots have no compose label (the docker-run "
                    "shape group of make test runs this)")
    from runbook.drill.stack import COMPOSE_FILE

    env = two_deployments(stack)
    docker.remove(env.slot("green").container)
    configured = env.with_(compose=dataclasses.replace(env.compose, file=COMPOSE_FILE,
                                                       env_file=stack.env_file),
                           slots={s: dataclasses.replace(c, service=f"togather-{s}")
                                  for s, c in env.slots.items()})
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(configured)
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    # about green, the absent one, never "recreate" the serving blue (found by review)
    green = env.slot("green").container
    assert f"slot green's container {green} is absent and must be recreated" in str(err.value)
    assert f"recreate green ({green})" in str(err.value) and "never blue" in str(err.value)
    assert snapshot(env) == before
    assert through_proxy(env) == ("blue", V3.tag)


@pytest.mark.any_shape
@pytest.mark.shape_specific
def test_a_recreate_under_another_compose_project_is_refused_and_changes_nothing(
        stack: DrillStack) -> None:
    if docker_run_host(stack):
        pytest.skip("a docker-run host has no compose: test_rollback_recreates_a_removed_"
                    "container proves its refusal")
    env = two_deployments(stack)
    docker.remove(env.slot("green").container)
    real = docker.inspect(env.slot("blue").container).labels or {}
    assert real["com.docker.compose.project"] == env.compose.project  # the drill's own truth
    other = dataclasses.replace(env, compose=dataclasses.replace(env.compose, project="togather-x"))
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(other)
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert f"compose project {env.compose.project!r}" in str(err.value)
    assert f'project = "{env.compose.project}"' in (err.value.fix or "")
    assert snapshot(env) == before
    assert through_proxy(env) == ("blue", V3.tag)
    # a deploy recreates too: the same refusal, before its snapshot and anything else
    snapshots_before = sorted(env.database.snapshot_dir.glob("*.sql.gz"))
    with pytest.raises(RunbookError) as err:
        deploy.deploy(other, deploy.Options(version=V2.tag))
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert f"compose project {env.compose.project!r}" in str(err.value)
    assert sorted(env.database.snapshot_dir.glob("*.sql.gz")) == snapshots_before
    assert snapshot(env) == before


@pytest.mark.any_shape
@pytest.mark.shape_specific
def test_a_compose_env_file_or_service_compose_cannot_use_is_refused_before_the_snapshot(
        stack: DrillStack, tmp_path: Path) -> None:
    """Pre-flight proved compose only with `up --help`: a missing or unreadable [compose]
    env_file (or a service the compose file lacks) passed the dry run, then the real deploy
    took its snapshot and failed at the recreate (exit 1, a snapshot left). Compose now reads
    the very project first (`config`): exit 4, nothing changed, the file named."""
    if docker_run_host(stack):
        pytest.skip("a docker-run host has no compose")
    env = two_deployments(stack)  # v3 serving from blue, v2 stopped on green
    unreadable = tmp_path / ".env.production"
    unreadable.write_text("IMAGE_TAG=abc1234\n")
    unreadable.chmod(0)
    if os.access(unreadable, os.R_OK):
        unreadable = tmp_path / "missing" / ".env.production"  # root reads anything
    green = env.slot(Slot.GREEN)
    broken = [env.with_(compose=dataclasses.replace(env.compose, env_file=unreadable)),
              env.with_(slots={**env.slots, Slot.GREEN: dataclasses.replace(
                  green, service="togather-gren")})]
    before = snapshot(env)
    snapshots_before = sorted(env.database.snapshot_dir.glob("*.sql.gz"))
    for bad, named in zip(broken, (str(unreadable), "'togather-gren'"), strict=True):
        with pytest.raises(RunbookError) as err:
            deploy.deploy(bad, deploy.Options(version=V2.tag))
        assert err.value.exit_code == ExitCode.PRECONDITION, err.value
        assert "nothing was changed" in err.value.message and named in err.value.message
        assert sorted(env.database.snapshot_dir.glob("*.sql.gz")) == snapshots_before
        assert snapshot(env) == before
    # a rollback that recreates (green removed) reads it too
    docker.remove(green.container)
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(broken[0])
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert str(unreadable) in err.value.message
    assert snapshot(env) == before
    assert through_proxy(env) == ("blue", V3.tag)


def container_identity(stack: DrillStack, name: str) -> str:
    """Docker's own id, start time and image of a container: a recreate changes the first."""
    return stack.docker("inspect", "-f", "{{.Id}} {{.State.StartedAt}} {{.Config.Image}}",
                        name).stdout.strip()


@pytest.mark.any_shape
@pytest.mark.shape_specific
def test_swapped_compose_services_never_recreate_the_serving_container(
        stack: DrillStack) -> None:
    """[slots.blue] service and [slots.green] service swapped in the environment file: a
    deploy to green ran `compose up --force-recreate togather-blue`, which recreated the
    SERVING blue container with the ungated image, then said "failed safely". The compose
    service label Docker keeps on each container is the truth: refused before anything
    changed (exit 4), at the rollback's recreate too, and at the act itself."""
    if docker_run_host(stack):
        pytest.skip("a docker-run host has no compose service labels (and no compose)")
    env = two_deployments(stack)  # v3 serving from blue, v2 stopped on green
    blue, green = env.slot(Slot.BLUE), env.slot(Slot.GREEN)
    label = "com.docker.compose.service"
    assert (docker.inspect(blue.container).labels or {})[label] == blue.service  # the truth
    swapped = env.with_(slots={Slot.BLUE: dataclasses.replace(blue, service=green.service),
                               Slot.GREEN: dataclasses.replace(green, service=blue.service)})
    serving = container_identity(stack, blue.container)
    before = snapshot(env)
    snapshots_before = sorted(env.database.snapshot_dir.glob("*.sql.gz"))
    with pytest.raises(RunbookError) as err:
        deploy.deploy(swapped, deploy.Options(version=V2.tag))
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert "nothing was changed" in err.value.message
    assert f"[slots.green] service is {blue.service!r}" in err.value.message
    assert f'[slots.green] service = "{green.service}"' in (err.value.fix or "")
    assert container_identity(stack, blue.container) == serving
    assert sorted(env.database.snapshot_dir.glob("*.sql.gz")) == snapshots_before
    assert snapshot(env) == before
    # a rollback that recreates (green removed): the service it would recreate is blue's
    docker.remove(green.container)
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(swapped)
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert f"would replace {blue.container}" in err.value.message
    assert container_identity(stack, blue.container) == serving
    assert snapshot(env) == before
    # and right at the act (a plan made before someone edited the file): still refused
    with pytest.raises(RunbookError):
        slots.recreate(swapped, Slot.GREEN, V2.tag)
    assert container_identity(stack, blue.container) == serving
    assert through_proxy(env) == ("blue", V3.tag)


@pytest.mark.any_shape
@pytest.mark.shape_specific
def test_a_standby_whose_tag_moved_since_is_started_as_it_ran_and_the_plan_says_so(
        stack: DrillStack) -> None:
    """The stopped standby's tag was rebuilt or retagged since it ran: the runbook compared
    tag names only, planned "it keeps <tag>" and recorded the tag, though the tag names
    another build now. The container (the build that ran) is what starts: the plan says so."""
    if docker_run_host(stack):
        pytest.skip("the deploys below recreate through compose; a docker-run host has none")
    import secrets

    stack.reset()  # v1 on blue, serving
    env = stack.env
    tag = secrets.token_hex(4)[:7]
    moved = f"{env.compose.image_repository}:{tag}"

    def build(base: str) -> None:  # a build of `base` that answers as version `tag`
        subprocess.run(["docker", "build", "-q", "-t", moved, "-"], text=True,
                       input=f"FROM {base}\nENV APP_VERSION={tag}\n", capture_output=True,
                       check=True, timeout=300)

    build(V2.image)
    try:
        deploy.deploy(env, deploy.Options(version=tag))  # green runs the tag (v2's build)
        deploy.deploy(env, deploy.Options(version=V3.tag))  # blue serves; green stopped
        green = docker.inspect(env.slot("green").container)
        assert green.image == moved and not green.running
        build(V3.image)  # the tag moves to another build
        shown = rollback.rollback(env, dry_run=True).plan.render()
        assert "the tag now names another build" in shown, shown
        assert (green.image_id or "")[:19] in shown
        rollback.rollback(env)
        assert docker.inspect(env.slot("green").container).image_id == green.image_id
        assert through_proxy(env) == ("green", tag)
    finally:
        stack.docker("rmi", "--no-prune", moved, check=False)


def gate_note(env: Environment) -> str:
    """What the newest run record's health gate noted (its `health` detail)."""
    record = json.loads(max(env.runs_dir.glob("*.json"), key=os.path.getmtime).read_text())
    gate = next(s for s in record["steps"] if s["name"] == "health-gate")
    return str(gate["detail"].get("health"))


@pytest.mark.shape_specific
def test_a_recreate_from_a_rebuilt_tag_is_refused_at_its_gate_when_the_commit_differs(
        stack: DrillStack) -> None:
    """Found by review: the previous deployment's container was removed and its tag rebuilt
    from other code (v3's, the very build rolled back from) under the same APP_VERSION. The
    plan showed the new build id without saying it differs from the build that ran, the gate
    passed on the version alone, and users got v3 again with "No problems found". A build
    whose org.opencontainers.image.revision label names v3's commit is refused by the plan
    (exit 4, nothing changed: review MEDIUM, the gate used to find it only after a recreate).
    One whose label names no commit (`unknown`) is planned, and the gate compares the commit
    /health names with the one the state file records: refused before the commit point,
    traffic stays, the started container is stopped, the state file is untouched. A host
    whose /health names no commit (minimal-health) keeps rolling back, the gate saying the
    commit was not checked."""
    if docker_run_host(stack):
        pytest.skip("the deploys below recreate through compose; a docker-run host has none")
    import secrets

    stack.reset()  # v1 on blue, serving
    env = stack.env
    tag = secrets.token_hex(4)[:7]
    moved = f"{env.compose.image_repository}:{tag}"
    ran = rebuilt_as(stack, tag, V2.image)
    labelled = ""
    try:
        deploy.deploy(env, deploy.Options(version=tag))  # green runs the tag (v2's build)
        deploy.deploy(env, deploy.Options(version=V3.tag))  # blue serves; green stopped
        recorded = states.read_state(env.state_file).previous
        assert recorded is not None and recorded.git_commit == V2.git_commit  # its /health's
        stack.docker("rm", "-f", env.slot("green").container)
        labelled = rebuilt_as(stack, tag, V3.image)  # the tag moves to v3's code, labelled
        assert labelled != ran
        before = snapshot(env)
        refused = runbook_cli(env, "rollback", "--dry-run")
        said = refused.stdout + refused.stderr
        assert refused.returncode == ExitCode.PRECONDITION, said
        assert (f"{moved}, which the recreate of green would run, holds commit {V3.tag}" in said
                and f"records commit {V2.git_commit[:7]} for {tag}" in said), said
        assert "rebuild it" in said and V2.git_commit in said, said  # the fix
        assert runbook_cli(env, "rollback", "--yes").returncode == ExitCode.PRECONDITION
        assert snapshot(env) == before  # nothing changed: no container made
        now = rebuilt_as(stack, tag, V3.image, revision="unknown")  # a build naming none
        assert now not in (ran, labelled)
        planned = runbook_cli(env, "rollback", "--dry-run")
        assert planned.returncode == 0, planned.stderr
        # the plan says the tag names another build than the one that ran as `tag`
        warned = [line for line in planned.stdout.splitlines()
                  if docker.short_id(now) in line and docker.short_id(ran) in line]
        assert warned and "rebuilt or retagged" in warned[0], planned.stdout
        state_before = env.state_file.read_bytes()
        run = runbook_cli(env, "rollback", "--yes")
        if stack.has("minimal-health"):  # /health names no commit: today's gate, and said
            assert run.returncode == 0, run.stderr
            assert through_proxy(env) == ("green", tag)
            assert "commit not checked" in gate_note(env), gate_note(env)
            return
        said = run.stdout + run.stderr
        assert run.returncode == ExitCode.FAILED_SAFELY, said
        assert (f"green runs commit {V3.tag}" in said
                and f"recorded {V2.git_commit[:7]}" in said), said
        assert "rebuild" in said and V2.git_commit in said, said  # the fix names the commit
        assert through_proxy(env) == ("blue", V3.tag)  # traffic never moved
        green = docker.inspect(env.slot("green").container)
        assert not green.running, green  # the undo stopped what the run started
        assert env.state_file.read_bytes() == state_before
    finally:
        stack.docker("rm", "-f", env.slot("green").container, check=False)
        stack.docker("rmi", "-f", "--no-prune", moved, check=False)
        for build in (labelled, ran):  # the builds the tag named before, untagged since
            if build:
                stack.docker("rmi", "-f", build, check=False)


@pytest.mark.shape_specific
def test_a_revision_label_every_build_inherits_never_refuses_the_rollback(
        stack: DrillStack) -> None:
    """Found by review: a host whose Dockerfile sets no revision label of its own, each build
    inheriting its base image's (one commit of the base image's repository, on every build).
    Every rollback was refused before any change ("holds commit <base>, but the state file
    records ..."), and status called the kept standby another build: on-call had no way back
    but a rebuild. A label the serving build shares, naming no recorded deployment, is read
    as no label: the plan says so, the gate compares the commit /health names, and the
    rollback serves the previous deployment."""
    if docker_run_host(stack):
        pytest.skip("the deploys below recreate through compose; a docker-run host has none")
    import secrets

    stack.reset()  # v1 on blue, serving
    env = stack.env
    base = secrets.token_hex(20)  # the base image's commit: no deployment records it
    older, newer = secrets.token_hex(4)[:7], secrets.token_hex(4)[:7]
    builds = [rebuilt_as(stack, older, V2.image, revision=base),
              rebuilt_as(stack, newer, V3.image, revision=base)]
    try:
        deploy.deploy(env, deploy.Options(version=older))  # green
        deploy.deploy(env, deploy.Options(version=newer))  # blue serves; green stopped
        state = states.read_state(env.state_file)
        assert state.previous is not None and state.current is not None
        if stack.has("minimal-health"):  # /health names no commit: the deploy records the label
            assert state.previous.git_commit == base, state.previous
        else:
            assert (state.previous.git_commit, state.current.git_commit) == (
                V2.git_commit, V3.git_commit), state
        for image in builds:  # both builds name the base's commit, as docker inspect says
            shown = subprocess.run(["docker", "image", "inspect", "-f",
                                    "{{index .Config.Labels \"" + docker.REVISION_LABEL + "\"}}",
                                    image], capture_output=True, text=True, check=True)
            assert shown.stdout.strip() == base, shown
        seen = json.loads(runbook_cli(env, "status", "--format", "json").stdout)
        assert not [p for p in seen["problems"] if p["check"] == "previous_other_build"], seen
        planned = runbook_cli(env, "rollback", "--dry-run")
        assert planned.returncode == 0, planned.stdout + planned.stderr
        if not stack.has("minimal-health"):  # there the records name the label's commit
            assert f"names commit {base[:12]}, as the serving build's does" in planned.stdout, \
                planned.stdout
        run = runbook_cli(env, "rollback", "--yes")
        assert run.returncode == 0, run.stdout + run.stderr
        assert through_proxy(env) == ("green", older)
    finally:
        stack.reset()  # both slots back on the base version's build
        for tag in (older, newer):
            stack.docker("rmi", "-f", "--no-prune", f"{env.compose.image_repository}:{tag}",
                         check=False)


@pytest.mark.shape_specific
def test_status_says_the_serving_slot_runs_another_commit_than_the_state_file_records(
        stack: DrillStack) -> None:
    """Found by review: a slot serving another commit than its deployment's record (its tag
    rebuilt from other code and its container recreated by another tool) was "No problems
    found". Its /health's commit is compared with the record's: a problem. Where /health
    names no commit (minimal-health) the slot's own /version names it (review MEDIUM: it
    was no problem there)."""
    if docker_run_host(stack):
        pytest.skip("the deploy below recreates through compose; a docker-run host has none")
    import secrets

    stack.reset()  # v1 on blue, serving
    env = stack.env
    tag = secrets.token_hex(4)[:7]
    moved = f"{env.compose.image_repository}:{tag}"
    rebuilt_as(stack, tag, V2.image)
    try:
        deploy.deploy(env, deploy.Options(version=tag))  # green serves the tag (v2's build)
        rebuilt_as(stack, tag, V3.image)
        # another tool recreates the serving slot from the rebuilt tag
        compose.run(compose.recreate_slot(env, Slot.GREEN, tag))
        health.wait_healthy(env, Slot.GREEN, timeout=30)
        assert through_proxy(env) == ("green", tag)
        seen = json.loads(runbook_cli(env, "status", "--format", "json").stdout)
        found = [p for p in seen["problems"] if p["check"] == "commit_differs"]
        assert len(found) == 1, seen["problems"]
        endpoint = "/version" if stack.has("minimal-health") else env.health.path
        assert (f"green runs commit {V3.tag} (its {endpoint})" in found[0]["problem"]
                and V2.git_commit[:7] in found[0]["problem"]), found
        assert V2.git_commit in found[0]["fix"], found
    finally:
        stack.docker("rm", "-f", env.slot("green").container, check=False)
        stack.docker("rmi", "-f", "--no-prune", moved, check=False)


@pytest.mark.shape_specific
def test_status_says_a_serving_slot_recreated_from_a_retagged_tag_runs_another_build(
        stack: DrillStack) -> None:
    """Found by review (MEDIUM, on a minimal-health drill host): the serving deployment's
    tag was retagged to another build (`docker tag`, no rebuild: that build names its own
    version and commit) and the slot recreated from it, as a host script would. The proxy's
    /version and the image named the other build, yet status said "No problems found" (exit
    0), its JSON `"version": null`. The slot's own /version is asked where /health names no
    commit: the build it names is compared with the record, a problem (exit 1) naming the
    endpoint; on a host whose /health names it, /health is what names it."""
    if docker_run_host(stack):
        pytest.skip("the deploy below recreates through compose; a docker-run host has none")
    import secrets

    stack.reset()  # v1 on blue, serving
    env = stack.env
    tag = secrets.token_hex(4)[:7]
    moved = f"{env.compose.image_repository}:{tag}"
    ran = rebuilt_as(stack, tag, V2.image)
    try:
        deploy.deploy(env, deploy.Options(version=tag))  # green serves the tag (v2's build)
        recorded = states.read_state(env.state_file).current
        assert recorded is not None and recorded.git_commit == V2.git_commit
        stack.docker("tag", V3.image, moved)  # the tag now names v3's build, as it is
        compose.run(compose.recreate_slot(env, Slot.GREEN, tag))  # a host script's recreate
        health.wait_healthy(env, Slot.GREEN, timeout=30)
        # the oracle: what the proxy serves, and the build Docker runs there
        assert through_proxy(env) == ("green", V3.tag)
        assert docker.inspect(env.slot("green").container).image_id == \
            docker.image_id(V3.image)
        text = runbook_cli(env, "status")
        assert text.returncode == 1, text.stdout + text.stderr
        endpoint = "/version" if stack.has("minimal-health") else env.health.path
        assert (f"green runs version {V3.tag} (commit {V3.git_commit[:7]}) (its {endpoint}), "
                f"but the state file records {tag} ({recorded.id})") in text.stdout, text.stdout
        seen = json.loads(runbook_cli(env, "status", "--format", "json").stdout)
        found = [p for p in seen["problems"] if p["check"] == "commit_differs"]
        assert len(found) == 1, seen["problems"]
        assert V2.git_commit in found[0]["fix"], found
        green = seen["slots"]["green"]
        assert (green["version"], green["git_commit"], green["build_from"]) == \
            (V3.tag, V3.git_commit, endpoint), green
    finally:
        stack.docker("rm", "-f", env.slot("green").container, check=False)
        stack.docker("rmi", "-f", "--no-prune", moved, check=False)
        stack.docker("rmi", "-f", ran, check=False)  # the build the tag named first


def with_image(env: Environment, which: str, image: str) -> None:
    """The state file's `which` deployment (current or previous) recorded under `image`: the
    tag the host's own tooling named it by (retag's own repository: the drill's tags stay)."""
    st = states.read_state(env.state_file)
    dep = getattr(st, which)
    assert dep is not None
    states.write_state(env.state_file, st.with_(**{which: dep.with_(image=image)}))


@pytest.mark.shape_specific
def test_a_standby_made_from_a_tag_retagged_to_another_build_is_refused_before_anything_changes(
        stack: DrillStack, request: pytest.FixtureRequest) -> None:
    """Found by review (MEDIUM, a docker-run host): the previous deployment v2's tag was
    moved to v1's build (`docker tag`) and its slot made again from it, as status's fix
    said. The plan said "start the exited container" and "schema guard compatible"; the
    gate failed 30 s later, and its fix offered `--to` v1, which the schema guard refuses.
    The build's org.opencontainers.image.revision label names v1's commit, not the one the
    state file records for v2: refused at plan time (exit 4, nothing changed), naming the
    tag, both commits and the rebuild; v1 is not offered (the guard refuses it: v1 ran with
    schema 1, the database is at 2). Status, which said "No problems found", says the
    previous deployment's container holds another commit (previous_other_build)."""
    env = two_deployments(stack)  # v3 serves on blue; v2 stopped on green
    moved = retag(stack, request, V1.image, "togather-retag", tag=V2.tag)  # v1's build
    with_image(env, "previous", moved)
    green = env.slot(Slot.GREEN).container
    stack.docker("rm", "-f", green)
    try:
        stack.docker_run(Slot.GREEN, moved)  # as the host makes its slots, from the tag
        stack.docker("stop", green)
        made = docker.inspect(green)
        assert made.image == moved and made.image_id == docker.image_id(V1.image)  # oracle
        # status said "No problems found" of it: the way back is another build
        seen = json.loads(runbook_cli(env, "status", "--format", "json").stdout)
        found = [p for p in seen["problems"] if p["check"] == "previous_other_build"]
        assert len(found) == 1, seen["problems"]
        assert (f"holds commit {V1.tag}" in found[0]["problem"]
                and f"records {V2.tag}: a rollback to {V2.tag} is refused" in found[0]["problem"]
                and f"put commit {V2.git_commit}'s build back under {moved}" in found[0]["fix"]
                ), found
        before = snapshot(env)
        for args in (("--dry-run",), ("--yes",)):
            run = runbook_cli(env, "rollback", *args)
            said = run.stdout + run.stderr
            assert run.returncode == ExitCode.PRECONDITION, said
            assert (f"container {green} (made from {moved}) holds commit {V1.tag}" in said
                    and f"records commit {V2.git_commit[:7]} for {V2.tag}" in said), said
            assert V2.git_commit in said and "docker tag" in said, said  # rebuild or retag
            assert f"--to {V1.tag}`" not in said and "refused by the schema guard" in said, said
            errors = [line for line in run.stderr.splitlines()
                      if line.startswith("runbook: error:")]
            assert len(errors) == 1 and V2.git_commit in errors[0], run.stderr  # one line
            assert snapshot(env) == before
    finally:  # made from a tag the test removes: the next test's arrange makes it anew
        stack.docker("rm", "-f", green, check=False)


@pytest.mark.shape_specific
def test_a_rollback_onto_the_build_that_serves_is_refused(
        stack: DrillStack, request: pytest.FixtureRequest) -> None:
    """Found by review (residual): the serving deployment v3's tag was retagged to v2's build
    and the serving container recreated from it; the rollback to v2 planned "roll back from
    a7f3fbb to 5db0fdf" onto the very build users already ran. Refused (exit 4, nothing
    changed): the target would run the same build that serves."""
    env = two_deployments(stack)  # v3 serves on blue; v2 stopped on green
    moved = retag(stack, request, V2.image, "togather-retag", tag=V3.tag)  # v2's build
    with_image(env, "current", moved)
    blue = env.slot(Slot.BLUE).container
    stack.docker("rm", "-f", blue)
    stack.docker_run(Slot.BLUE, moved)  # the serving slot made again from the moved tag
    try:
        health.wait_healthy(env, Slot.BLUE, timeout=30)
        # the oracle: users get v2's build from blue, and green holds that very build
        assert through_proxy(env) == ("blue", V2.tag)
        assert docker.inspect(blue).image_id == docker.inspect(
            env.slot(Slot.GREEN).container).image_id == docker.image_id(V2.image)
        before = snapshot(env)
        run = runbook_cli(env, "rollback", "--dry-run")
        said = run.stdout + run.stderr
        assert run.returncode == ExitCode.PRECONDITION, said
        assert "the target would run the same build that serves" in said, said
        assert "users already run that build" in said and "--to" in said, said
        assert snapshot(env) == before
    finally:  # the next test's arrange makes blue again from the drill's own tag
        stack.docker("rm", "-f", blue, check=False)


def test_a_second_rollback_goes_back_only_when_named(stack: DrillStack) -> None:
    """A rollback typed again (its output lost, a scenario reported skipped) used to roll
    forward, back to the release users were just taken off (found by review): it is refused,
    exit 4, nothing changed; `--to` that version goes back on purpose."""
    env = two_deployments(stack)
    rollback.rollback(env)
    assert through_proxy(env) == ("green", V2.tag)
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env)
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert f"--to {V3.tag}" in str(err.value), err.value
    assert snapshot(env) == before
    rollback.rollback(env, rollback.Options(to=V3.tag))
    assert through_proxy(env) == ("blue", V3.tag)
    st = states.read_state(env.state_file)
    assert st.current and st.current.version == V3.tag and st.current.rollback_count == 1
    assert st.previous and st.previous.version == V2.tag
    # found by review: now v2, the older one, is marked rolled_back: a rollback from v3 is a
    # real one again (the refusal is for going forward only)
    assert st.previous.status == "rolled_back"
    from runbook.fleet import hostcheck  # the fleet's pre-flight judges it alike

    seen = hostcheck.check(str(env.source), None, None)
    assert seen["deployment"]["rolled_back_from"] is None, seen["deployment"]
    rollback.rollback(env)
    assert through_proxy(env) == ("green", V2.tag)


@pytest.mark.shape_specific
def test_health_gate_refuses_a_broken_target_and_traffic_stays(stack: DrillStack) -> None:
    env = migrated(stack)
    # the previous deployment's build turns out broken (its container was pruned)
    st = states.read_state(env.state_file)
    assert st.previous is not None
    # recorded as that build names itself (its revision label: a record naming another
    # commit is refused before the gate, tests/test_rollback.py)
    broken = st.previous.with_(version=VERSIONS["unhealthy"].tag,
                               git_commit=VERSIONS["unhealthy"].git_commit,
                               image=VERSIONS["unhealthy"].image, migration_version=2)
    states.write_state(env.state_file, st.with_(previous=broken))
    docker.remove(env.slot("blue").container)
    if docker_run_host(stack):  # the host's script made it; the rollback starts it
        stack.docker_run(Slot.BLUE, VERSIONS["unhealthy"].image)
        docker.stop(env.slot("blue").container)
    before = snapshot(env)
    # long enough for the broken build to answer (503) at least once, even on a busy machine
    # (steps/givens.py: more than 2.5 s at load 35; 5 s was not enough at load 17 with the
    # container started anew, on 2 cores: 129 attempts, all unreachable; 4 s was not enough
    # for the feature's broken build in a CI run of `make test`, so 20 s)
    fast = env.with_(health=dataclasses.replace(env.health, timeout=20.0))
    with pytest.raises(RunbookError) as err:
        rollback.rollback(fast)
    assert err.value.exit_code == ExitCode.FAILED_SAFELY
    assert "did not become healthy" in str(err.value) and "app" in str(err.value)
    # no deployment older than the target: the way out is a known-good version deployed
    assert compose.deploy_hint(env, "<known-good version>") in str(err.value), err.value
    assert "--to" not in str(err.value), err.value
    after = snapshot(env)
    assert after["traffic"] == ("green", V2.tag)
    assert after["state"] == before["state"]
    assert after["caddyfile"] == before["caddyfile"]
    assert not after["lock"]
    assert not docker.inspect(env.slot("blue").container).running  # undone: stopped again


@pytest.mark.shape_specific
def test_a_failed_gate_names_the_older_deployment_only_where_the_schema_guard_lets_it_run(
        stack: DrillStack) -> None:
    """Found by the on-call walkthrough review: a rollback whose target failed its health
    gate (exit 1, traffic stays) said only `docker logs`, while the troubleshooting feature's
    way out is another version. v1, a broken build, then v2 (serving): the rollback to the
    broken build fails its gate and names the deploy of a known-good version, and the
    deployment before it, v1, with `--to` only where the schema guard lets that run. Found
    by review (MEDIUM): it offered `--to v1`, which the runbook then refused (exit 4, v1 ran
    with schema 1, the database is at 2). As arranged, v1 is said refused; recorded at the
    database's schema, it is offered; recorded with none (older tooling), whether the guard
    lets it run is not known here, and the dry run that tells is named instead."""
    stack.arrange(scenes.BROKEN_PREVIOUS)
    env = stack.env
    command = f"runbook rollback {command_arg(env)} --to {V1.tag}"
    # long enough for the broken build's 503 to be seen (test_health_gate_refuses_...)
    fast = env.with_(health=dataclasses.replace(env.health, timeout=20.0))

    def failed_gate() -> str:
        before = snapshot(env)
        with pytest.raises(RunbookError) as err:
            rollback.rollback(fast)
        said = str(err.value)
        assert err.value.exit_code == ExitCode.FAILED_SAFELY, said
        assert "did not become healthy" in said, said
        assert compose.deploy_hint(env, "<known-good version>") in said, said
        assert "\n" not in err.value.message
        after = snapshot(env)
        assert after["traffic"] == before["traffic"] and after["state"] == before["state"]
        assert not after["lock"]
        return said

    def guard_refuses_v1() -> bool:  # the oracle: the schema guard itself, asked of v1
        st = states.read_state(env.state_file)
        v1 = st.find_version(V1.tag)
        assert st.current is not None and v1 is not None
        try:
            rollback.schema_guard(env, st.current, v1, rollback.Options())
        except rollback.SchemaRefusal:
            return True
        return False

    def v1_recorded_at(schema: int | None) -> None:
        st = states.read_state(env.state_file)
        v1 = st.find_version(V1.tag)
        assert v1 is not None
        states.write_state(env.state_file, st.with_(history=tuple(
            d.with_(migration_version=schema) if d.id == v1.id else d for d in st.history)))
        assert states.read_state(env.state_file).find_version(V1.tag).migration_version \
            == schema

    assert guard_refuses_v1()
    said = failed_gate()
    assert f"`{command}`" not in said, said
    assert (f"to {V1.tag}, is refused by the schema guard: {V1.tag} ran with schema 1, the "
            "database is at 2" in said), said
    v1_recorded_at(2)
    assert not guard_refuses_v1()
    said = failed_gate()
    assert f"roll back further, to {V1.tag}: `{command}`" in said, said
    v1_recorded_at(None)
    said = failed_gate()
    assert f"`{command}`" not in said and f"`{command} --dry-run` says" in said, said


def test_caddy_not_running_is_a_clear_error_and_nothing_changes(stack: DrillStack) -> None:
    env = migrated(stack)
    stack.docker("stop", stack.caddy_container)
    state_before = env.state_file.read_bytes()
    caddy_before = env.caddy.caddyfile.read_bytes()
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env)
    assert "Caddy" in str(err.value) and "\n" not in err.value.message
    assert err.value.exit_code == ExitCode.PRECONDITION
    assert env.state_file.read_bytes() == state_before
    assert env.caddy.caddyfile.read_bytes() == caddy_before
    assert docker.inspect(env.slot("blue").container).status == "exited"
    assert not env.lock_path.exists()


@pytest.mark.any_shape
def test_a_caddy_reload_that_would_expand_placeholders_in_another_environment_is_refused(
        stack: DrillStack) -> None:
    """Found by review: `caddy reload` expands the Caddyfile's {$VAR} placeholders in the
    environment of the process that runs it, not in the one of the Caddy that loads the
    result (a systemd unit's EnvironmentFile). A reload run with another environment changed
    what another site answers, or a secret. Refused in pre-flight, nothing changed, the value
    never shown; with the same environment the rollback goes on."""
    env = two_deployments(stack)
    text = caddy.read(env)
    probed = text.replace('respond /ping "pong" 200', 'respond /ping "{$RUNBOOK_PROBE:pong}" 200')
    assert probed != text
    container = env.caddy.command[2]
    here = dataclasses.replace(env.caddy, reload=envmod.ReloadMethod.CADDY_RELOAD)
    other = env.with_(caddy=dataclasses.replace(
        here, command=("docker", "exec", "-e", "RUNBOOK_PROBE=s3cr3t-probe", container,
                       "caddy")))
    try:
        env.caddy.caddyfile.write_text(probed)
        drill_http.post(f"{env.caddy.admin_url}/load", content=probed,
                        headers={"Content-Type": "text/caddyfile"}, timeout=10)
        before = snapshot(env)
        with pytest.raises(RunbookError) as err:
            rollback.rollback(other)
        assert snapshot(env) == before
        same = rollback.rollback(env.with_(caddy=here), dry_run=True)
    finally:
        env.caddy.caddyfile.write_text(text)
        drill_http.post(f"{env.caddy.admin_url}/load", content=text,
                        headers={"Content-Type": "text/caddyfile"}, timeout=10)
    message = str(err.value)
    assert err.value.exit_code == ExitCode.PRECONDITION, message
    assert "{$VAR} placeholders" in message and "reload = admin-api" in message, message
    assert "s3cr3t" not in message + (err.value.fix or ""), message
    assert "every site Caddy serves now is in the new Caddyfile" in same.plan.render(), \
        same.plan.render()


@pytest.mark.any_shape
def test_slot_ports_that_do_not_match_the_containers_are_refused_before_any_change(
        stack: DrillStack) -> None:
    """Found by review: which slot serves is read from the ports Caddy dials. With the
    environment's slot ports swapped against what the containers publish (a `-p` typo, a
    swapped compose file or [slots] entry), the serving blue container was taken for the
    standby "green": recreated, gated on the wrong port, then stopped by the undo. Refused
    in pre-flight (exit 4, nothing changed), and the act-time invariant itself asks Docker."""
    env = two_deployments(stack)  # v3 serving from blue, v2 stopped on green
    blue, green = env.slot(Slot.BLUE), env.slot(Slot.GREEN)
    swapped = env.with_(slots={Slot.BLUE: dataclasses.replace(blue, port=green.port),
                               Slot.GREEN: dataclasses.replace(green, port=blue.port)})
    # the act-time invariant itself: never the container whose published port Caddy dials
    with pytest.raises(traffic.ServingContainerError) as refused:
        traffic.refuse_if_serving(swapped, Slot.BLUE, "stop")
    assert f"it publishes port {blue.port}, which Caddy's running config dials" \
        in str(refused.value), refused.value
    before = snapshot(env)
    for run in (lambda: rollback.rollback(swapped),
                lambda: switch.switch(swapped, switch.Options(slot=Slot.BLUE))):
        with pytest.raises(RunbookError) as err:
            run()
        assert err.value.exit_code == ExitCode.PRECONDITION, err.value
        assert f"{blue.container} publishes port {blue.port}, but the environment names " \
               f"port {green.port} for the blue slot" in str(err.value), err.value
        assert snapshot(env) == before
    assert through_proxy(env) == ("blue", V3.tag)


@pytest.mark.any_shape
def test_a_running_config_that_differs_from_the_caddyfile_is_said_in_the_plan(
        stack: DrillStack) -> None:
    """Found by review: a route loaded through the admin API during an incident (or an edit
    to the file not yet reloaded) was dropped (or went live) with the switch's load of the
    file, and verification of the app's site still passed. The plans now say so."""
    env = two_deployments(stack)  # v3 serving from blue, v2 stopped on green
    text = caddy.read(env)
    patched = with_emergency_route(text)
    try:
        load_only(env, patched)
        plans = [rollback.rollback(env, dry_run=True).plan,
                 switch.switch(env, switch.Options(slot=Slot.GREEN), dry_run=True).plan]
    finally:
        load_only(env, text)
    for plan in plans:
        said = "\n".join(plan.warnings)
        assert "differs from" in said and "beyond the slot" in said, plan.render()
    calm = rollback.rollback(env, dry_run=True).plan
    assert not any("beyond the slot" in w for w in calm.warnings), calm.warnings


@pytest.mark.long
def test_failed_verification_restores_the_caddyfile(stack: DrillStack,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    env = two_deployments(stack)
    # the fault below is a proxy_url Caddy does not listen on, refused in pre-flight since
    # (test_addresses.py); let through here, it makes the verification fail after the write
    monkeypatch.setattr(traffic, "proxy_url_missed", lambda *_: None)
    before = snapshot(env)
    # fault: verification requests go to a port where nothing answers
    wrong = env.with_(caddy=dataclasses.replace(env.caddy, proxy_url="http://127.0.0.1:9"))
    with pytest.raises(RunbookError) as err:
        rollback.rollback(wrong)
    assert "restored" in str(err.value)
    assert env.caddy.caddyfile.read_bytes() == before["caddyfile"]
    assert through_proxy(env) == ("blue", V3.tag)
    assert env.state_file.read_bytes() == before["state"]


@pytest.mark.long
def test_the_undo_of_a_failed_switch_loads_back_what_caddy_ran_not_the_file(
        stack: DrillStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the undo of a failed verification reloaded the previous Caddyfile.
    A route loaded through the admin API during an incident (here: /export answered 503
    "closed") is not in that file, so the undo, the "traffic stays where it was" path, took
    it away. The undo now loads back the JSON Caddy ran before the switch."""
    env = two_deployments(stack)  # v3 serving from blue, v2 stopped on green
    monkeypatch.setattr(traffic, "proxy_url_missed", lambda *_: None)  # as above
    text = caddy.read(env)
    patched = with_emergency_route(text)
    config_url = f"{env.caddy.admin_url}/config/"
    try:
        load_only(env, patched)
        ran = drill_http.get(config_url, timeout=10).json()
        before = snapshot(env)
        wrong = env.with_(caddy=dataclasses.replace(env.caddy, proxy_url="http://127.0.0.1:9"))
        with pytest.raises(RunbookError) as err:
            rollback.rollback(wrong)  # verification asks a port where nothing answers
        after = drill_http.get(config_url, timeout=10).json()
        export = drill_http.get(f"http://127.0.0.1:{stack.ports.other_site}/export/all",
                                timeout=10)
    finally:
        load_only(env, text)
    assert "restored" in str(err.value), err.value
    assert after == ran, "Caddy runs another config than before the failed switch"
    assert (export.status_code, export.text) == (503, "closed")
    assert env.caddy.caddyfile.read_bytes() == before["caddyfile"]
    assert through_proxy(env) == ("blue", V3.tag)


def _with_other_environment(env: Environment, other_site: int, upstream: str) -> str:
    """Another environment on this host's Caddy (a staging beside production): its own site,
    b.test, in a file the Caddyfile imports outside the slot markers, proxying to `upstream`
    (its serving slot); loaded. Returns the Caddyfile text, now on disk and running."""
    fragment = env.caddy.caddyfile.parent / "b.caddy"
    _other_environment_on(fragment, other_site, upstream)
    text = env.caddy.caddyfile.read_text()
    head = text.index("\n# Another site on this host.")
    with_b = text[:head] + f"\nimport {caddy.seen_by_caddy(env, fragment)}\n" + text[head:]
    write_and_load(env, with_b)
    return with_b


def _other_environment_on(fragment: Path, other_site: int, upstream: str) -> None:
    files.atomic_write(fragment, (f"http://b.test:{other_site} {{\n\tbind 127.0.0.1\n"
                                  f"\treverse_proxy {upstream}\n}}\n").encode())


def _b_answers(stack: DrillStack) -> str:
    return drill_http.get(f"http://127.0.0.1:{stack.ports.other_site}/",
                          headers={"Host": "b.test", "Connection": "close"}, timeout=5).text


def _b_switches_while_verifying(env: Environment, monkeypatch: pytest.MonkeyPatch,
                                other_site: int, upstream: str) -> None:
    """The other environment's switch lands while this run's switch verifies (its file
    rewritten, the main Caddyfile loaded as `systemctl reload caddy` loads it); this run's
    verification then fails, so its undo runs over the other environment's change."""
    real_verify = caddy.verify

    def b_switches_then_fail(*args: Any, **kwargs: Any) -> caddy.VerifyResult:
        _other_environment_on(env.caddy.caddyfile.parent / "b.caddy", other_site, upstream)
        drill_http.post(f"{env.caddy.admin_url}/load", content=env.caddy.caddyfile.read_text(),
                        headers={"Content-Type": "text/caddyfile"}, timeout=10
                        ).raise_for_status()
        result = real_verify(*args, **kwargs)
        return dataclasses.replace(result, ok=False, error="a verification that failed")

    monkeypatch.setattr(caddy, "verify", b_switches_then_fail)


def test_an_undo_whose_own_load_went_unread_never_says_another_change_was_kept(
        stack: DrillStack) -> None:
    """Found by review: when the switch's own load could not be read back (a reload that
    raised after Caddy applied it, a signal during the read), its undo said "Caddy's config
    had changed ... that change was kept" when only the switch itself had changed it, and
    on-call went looking for another environment's change. What it loads back is what ran
    before, and it says nothing of another change."""
    env = two_deployments(stack)  # blue v3 live
    text = env.caddy.caddyfile.read_text()
    running = caddy.running_config(env)  # what the switch reads before its write
    try:
        load_only(env, stack.caddyfile_text(Slot.GREEN))  # the switch's load, unread
        config, said = traffic.undo_config(env, running, Slot.BLUE, Slot.GREEN, None)
    finally:
        load_only(env, text)  # Caddy as the file says: the next test's arrangement
    assert said is None, said
    assert caddy.first_difference(config, running) is None


@pytest.mark.parametrize("command", ["rollback", "switch"])
def test_the_undo_of_a_failed_switch_keeps_another_environments_switch_made_meanwhile(
        stack: DrillStack, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """Found by review: two environments behind one Caddy, each with its own lock. The undo of
    a failed switch loaded Caddy's whole config as read before the switch, so a switch the
    other environment made during the verification was silently undone: its site went back
    to the slot that run had already stopped (502s), and this run said only "traffic back on
    blue". The undo now points back only this environment's upstreams and says so. (`runbook
    switch` and the deploy share this switch step.)"""
    env = two_deployments(stack, stop_old_slot=False)  # v3 serving from blue, v2 on green
    text = env.caddy.caddyfile.read_text()
    try:
        with serving(200, b"b old slot") as b_old, serving(200, b"b new slot") as b_new:
            with_b = _with_other_environment(env, stack.ports.other_site, f"127.0.0.1:{b_old}")
            assert _b_answers(stack) == "b old slot"
            _b_switches_while_verifying(env, monkeypatch, stack.ports.other_site,
                                        f"127.0.0.1:{b_new}")
            with pytest.raises(RunbookError) as err:
                if command == "rollback":
                    rollback.rollback(env)
                else:
                    switch.switch(env, switch.Options(slot=Slot.GREEN, reason="test: two envs"))
            b_after = _b_answers(stack)
            a_after = through_proxy(env)
            on_disk = env.caddy.caddyfile.read_text()
    finally:
        monkeypatch.undo()
        write_and_load(env, text)
        (env.caddy.caddyfile.parent / "b.caddy").unlink(missing_ok=True)
    assert b_after == "b new slot", "the undo put the other environment back on its old slot"
    assert a_after == ("blue", V3.tag)
    assert on_disk == with_b  # this environment's Caddyfile is put back, byte for byte
    assert err.value.exit_code == ExitCode.FAILED_SAFELY, err.value
    assert "Caddy's config had changed since the switch loaded it (first at " in \
        err.value.message, err.value
    assert "that change was kept" in err.value.message, err.value


def test_an_undo_that_cannot_tell_its_own_routes_in_a_changed_caddy_loads_nothing(
        stack: DrillStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same race, where the other environment's new upstream is this environment's target
    port: which dials of that port are this switch's cannot be told, so the undo loads
    nothing (neither the stale whole config nor a guess), stops with exit 5 and says where
    this environment's traffic is."""
    env = two_deployments(stack)  # v3 serving from blue, v2 stopped on green
    text = env.caddy.caddyfile.read_text()
    green = f"localhost:{env.slot(Slot.GREEN).port}"
    try:
        with serving(200, b"b old slot") as b_old:
            _with_other_environment(env, stack.ports.other_site, f"127.0.0.1:{b_old}")
            _b_switches_while_verifying(env, monkeypatch, stack.ports.other_site, green)
            with pytest.raises(RunbookError) as err:
                rollback.rollback(env)
            config_after = drill_http.get(f"{env.caddy.admin_url}/config/", timeout=10).json()
            a_after = through_proxy(env)
            on_disk = caddy.inspect(env.caddy.caddyfile.read_text(), env).slot
    finally:
        monkeypatch.undo()
        write_and_load(env, text)
        (env.caddy.caddyfile.parent / "b.caddy").unlink(missing_ok=True)
    assert err.value.exit_code == ExitCode.ATTENTION, err.value
    assert "nothing was loaded" in err.value.message, err.value
    assert "traffic is on green" in err.value.message, err.value
    assert a_after[0] == "green"  # where the message says, untouched
    assert on_disk == Slot.GREEN  # the file still names what Caddy runs
    assert green.rpartition(":")[2] in json.dumps(config_after)


@pytest.mark.any_shape  # compose's recreate arranges it; the check reads Docker alone
def test_a_switch_to_a_container_whose_tag_is_no_version_is_refused_before_traffic_moves(
        stack: DrillStack) -> None:
    """Found by review: `runbook switch` took the version to record from the container's
    tag. To one run from `:latest` (or pinned by digest), with --force or an app whose /health
    names no version, traffic moved, then the state step refused the tag: exit 6, and every
    rerun failed the same way. Refused in the plan now."""
    env = two_deployments(stack)  # v3 serving from blue, v2 stopped on green
    green = env.slot(Slot.GREEN).container
    stack.docker("tag", V2.image, f"{env.compose.image_repository}:latest")
    try:
        from runbook import compose

        compose.run(compose.recreate_slot(env, Slot.GREEN, "latest"))
        assert docker.inspect(green).tag == "latest"
        before = snapshot(env)
        with pytest.raises(RunbookError) as err:  # --force: no gate to ask the app's version
            switch.switch(env, switch.Options(slot=Slot.GREEN, force=True))
    finally:
        stack.docker("rmi", f"{env.compose.image_repository}:latest", check=False)
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert f"{green} runs {env.compose.image_repository}:latest, whose tag is not a version" \
        in str(err.value), err.value
    assert snapshot(env) == before
    assert through_proxy(env) == ("blue", V3.tag)


def test_a_switch_to_the_previous_version_says_in_its_plan_that_it_records_a_rollback(
        stack: DrillStack) -> None:
    """Found by review: `runbook switch` to the slot running the previous deployment is
    recorded as a rollback (v2 active with rollback_count + 1, v3 rolled_back; a plain
    `runbook rollback` then refuses as going forward), while its plan promised only
    "current: v2 on green". The plan shows what the state step writes (the recorder's own
    preview), and the file holds exactly that afterwards."""
    env = two_deployments(stack, stop_old_slot=False)  # v3 serves from blue; v2 runs on green
    before = states.read_state(env.state_file, environment=env.name)
    assert before.previous is not None and before.previous.version == V2.tag
    count = before.previous.rollback_count
    plan = switch.switch(env, switch.Options(slot=Slot.GREEN), dry_run=True).plan
    promised = next(s for s in plan.steps if s.name == "state").details
    assert promised["current"] == (f"{V2.tag} on green, status active, rollback_count "
                                   f"{count + 1}"), promised
    assert promised["previous"] == f"{V3.tag}, status rolled_back", promised
    assert "rollback" in promised.get("recorded as", ""), promised
    switch.switch(env, switch.Options(slot=Slot.GREEN, reason="test: switch back"))
    assert through_proxy(env) == ("green", V2.tag)
    after = states.read_state(env.state_file, environment=env.name)
    assert after.current is not None and after.previous is not None
    assert (after.current.version, after.current.status, after.current.rollback_count) == (
        V2.tag, "active", count + 1)
    assert (after.previous.version, after.previous.status) == (V3.tag, "rolled_back")


@pytest.mark.any_shape
def test_a_verification_url_that_cannot_see_the_slot_is_refused_before_any_change(
        stack: DrillStack) -> None:
    """Found by review: where verification asks (a site served by name with automatic HTTPS
    and no [caddy] site: a 308), the proxy answered without the slot header, and nothing
    looked at that before the switch. The rollback started the target, moved users, failed
    its verification; the undo's own verification failed the same way, so the run said the
    undo failed and stopped the slot that had passed its gate. Refused in the plan now
    (here the URL reaches the drill's other site: 200 "pong", no header)."""
    env = two_deployments(stack)  # v3 serving from blue, v2 stopped on green
    elsewhere = env.with_(caddy=dataclasses.replace(
        env.caddy, proxy_url=f"http://127.0.0.1:{stack.ports.other_site}", verify_path="/ping"))
    before = snapshot(env)
    for run in (lambda: rollback.rollback(elsewhere),
                lambda: switch.switch(elsewhere, switch.Options(slot=Slot.GREEN))):
        with pytest.raises(RunbookError) as err:
            run()
        assert err.value.exit_code == ExitCode.PRECONDITION, err.value
        assert "/ping answers HTTP 200 without X-Togather-Slot" in str(err.value), err.value
        assert "[caddy] site" in (err.value.fix or "")
        assert snapshot(env) == before
    assert through_proxy(env) == ("blue", V3.tag)


@pytest.mark.any_shape
def test_a_serving_slot_down_behind_caddys_error_redirect_still_rolls_back(
        stack: DrillStack) -> None:
    """The check above must not refuse an outage: with the serving slot down, a site's
    `handle_errors` (here a redirect to a status page) answers without the slot header, and
    the healthy target's answers, after the switch, carry it. The serving slot is asked
    directly: down, so the rollback goes ahead and is verified."""
    env = two_deployments(stack)  # v3 serving from blue, v2 stopped on green
    text = caddy.read(env)
    marker = f'header X-Drill-Run "{stack.run_id}"'
    errors = marker + "\n\thandle_errors {\n\t\tredir https://status.example.com 302\n\t}"
    assert marker in text
    write_and_load(env, text.replace(marker, errors))
    try:
        stack.docker("stop", "-t", "1", env.slot(Slot.BLUE).container)
        answer = drill_http.get(f"{env.caddy.proxy_url}{env.caddy.verify_path}", timeout=10)
        assert answer.status_code == 302 and "X-Togather-Slot" not in answer.headers
        rollback.rollback(env)
        assert through_proxy(env) == ("green", V2.tag)
    finally:
        write_and_load(env, caddy.read(env).replace(errors, marker))


def test_dry_run_changes_nothing_and_shows_every_value(stack: DrillStack) -> None:
    env = two_deployments(stack)
    before = snapshot(env)
    logs = sorted(env.log_dir.glob("*.log"))
    result = rollback.rollback(env, dry_run=True)
    assert snapshot(env) == before
    text = result.plan.render()
    for expected in (env.slot("green").container, V2.image, env.caddy.admin_url,
                     str(env.state_file), str(env.caddy.caddyfile), str(env.lock_path),
                     f"-\t\treverse_proxy localhost:{env.slot('blue').port}",
                     f"+\t\treverse_proxy localhost:{env.slot('green').port}"):
        assert expected.replace("\t", "") in text.replace("\t", ""), expected
    assert sorted(env.log_dir.glob("*.log")) == logs  # not even a journal entry


def test_schema_ahead_is_refused_unless_forced(stack: DrillStack) -> None:
    env = migrated(stack)  # migrated to schema 2; v1 ran with 1
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env)
    assert err.value.exit_code == ExitCode.PRECONDITION
    assert "migrations ran after the target deployment" in str(err.value)
    assert snapshot(env) == before


def schema_rows(stack: DrillStack) -> list[tuple[int, bool]]:
    with stack.connect() as conn:
        return conn.execute("SELECT version, dirty FROM schema_migrations ORDER BY version"
                            ).fetchall()


def test_a_schema_migrations_holding_several_rows_is_refused_never_read_as_its_first(
        stack: DrillStack) -> None:
    """Found by review: MIGRATED (v2 on schema 2, v1 ran with 1), schema_migrations holding
    rows 1 and 2: the guard read `LIMIT 1` with no order, took the row first on disk (1),
    said "database schema 1", "compatible" (exit 0), and would have put v1 on schema 2.
    golang-migrate keeps one row: anything else is no known version, refused (exit 4) with
    the rows named and the repair, nothing changed. Oracle: the rows inserted here."""
    env = migrated(stack)
    with stack.connect() as conn:
        conn.execute("DELETE FROM schema_migrations")
        conn.execute("INSERT INTO schema_migrations VALUES (1, false)")
        conn.execute("INSERT INTO schema_migrations VALUES (2, false)")
    try:
        before = snapshot(env)
        files_before = sorted(env.database.snapshot_dir.iterdir())
        dry = runbook_cli(env, "rollback", "--dry-run")
        real = runbook_cli(env, "rollback", "--yes")
        after = snapshot(env)
        files_after = sorted(env.database.snapshot_dir.iterdir())
        rows = schema_rows(stack)
    finally:
        with stack.connect() as conn:
            conn.execute("DELETE FROM schema_migrations WHERE version <> 2")
    for run in (dry, real):
        said = run.stdout + run.stderr
        assert run.returncode == 4, said
        assert "Traceback" not in said and "compatible" not in said, said
        assert "schema_migrations holds 2 rows (versions 1, 2)" in said, said
        assert "golang-migrate keeps one" in said and "force" in said, said
        assert "nothing was changed" in said, said
    assert (after, files_after, rows) == (before, files_before, [(1, False), (2, False)])


def _with_history_entry(env: Environment, at: int, **changes: Any) -> dict[str, Any]:
    """The state file with an entry another tool wrote badly inserted at `at` of its
    history: v1's entry with `changes`, under its own id. Returns that entry."""
    doc = json.loads(env.state_file.read_text())
    assert [h["version"] for h in doc["deployment_history"]] == [V2.tag, V1.tag]  # premise
    bad = {**doc["deployment_history"][1], "id": "dep_written_badly", "x_tool": [1, {"a": None}],
           **changes}
    doc["deployment_history"].insert(at, bad)
    files.atomic_write(env.state_file, json.dumps(doc, indent=2).encode())
    return bad


def test_a_malformed_history_entry_older_than_the_target_is_passed_by_and_kept(
        stack: DrillStack) -> None:
    """Found open: one history entry another tool wrote badly (a version that is no 7-hex
    commit), older than every other, refused every rollback (exit 4) and status said the
    state file could not be read. It is passed by: status, the dry run and the run name it
    (index, what is wrong, the fix), the journal records that same warning, and the file
    the rollback rewrites keeps the entry as written, where it was. Oracle: the entry as
    written here, what serves through the proxy."""
    env = two_deployments(stack)  # v3 serves from blue; v2 the previous (green); v1 older
    bad = _with_history_entry(env, 2, version="v0.9.0", deployed_at="2025-12-31T23:00:00Z")
    problem = "deployment_history[2].version: 'v0.9.0' is not a 7-hex short commit"
    seen = runbook_cli(env, "status")
    said = seen.stdout + seen.stderr
    assert problem in said and "write the short git commit" in said, said
    assert "cannot be read" not in said, said
    before = snapshot(env)
    dry = runbook_cli(env, "rollback", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    [shown] = [line for line in dry.stdout.splitlines() if problem in line]
    assert shown.startswith("  ! ") and "write the short git commit" in shown, shown
    assert snapshot(env) == before
    real = runbook_cli(env, "rollback", "--yes", "--format", "json")
    assert real.returncode == 0, real.stdout + real.stderr
    assert through_proxy(env) == ("green", V2.tag)
    out = json.loads(real.stdout)
    [warning] = [w for w in out["plan"]["warnings"] if problem in w]
    assert shown == f"  ! {warning}"  # the plan shown is the plan run
    assert f"runbook: warning: {warning}" in real.stderr, real.stderr
    journal = [json.loads(line) for line in Path(out["log_file"]).read_text().splitlines()]
    [planned] = [e for e in journal if e["message"].startswith("plan: ")]
    assert warning in planned["plan"]["warnings"], planned
    history = json.loads(env.state_file.read_text())["deployment_history"]
    assert [h == bad for h in history] == [False, False, True], history  # kept, in its place
    assert history[1]["version"] == V1.tag and history[2] == bad
    assert json.dumps(history[2]) == json.dumps(bad)  # same keys, order and values


def test_a_malformed_history_entry_that_may_be_the_target_or_newer_still_refuses(
        stack: DrillStack) -> None:
    """The other half: between v2 (the previous) and v1, an entry another tool wrote badly
    is passed by for a rollback to v2 but refuses one to v1 (it may be newer than v1), and
    in front of v2 it refuses every rollback; the one-line problem and its fix, exit 4,
    nothing changed, the dry run as the run."""
    env = two_deployments(stack)
    original = env.state_file.read_bytes()
    _with_history_entry(env, 1, status="done", deployed_at="2026-01-01T00:00:00Z",
                        version="1abcdef")
    problem = "deployment_history[1].status: 'done' is not a deployment status"
    before = snapshot(env)
    passed = runbook_cli(env, "rollback", "--dry-run")
    assert passed.returncode == 0 and problem in passed.stdout, passed.stdout + passed.stderr
    for extra in ("--dry-run", "--yes"):
        refused = runbook_cli(env, "rollback", "--to", V1.tag, extra)
        said = refused.stdout + refused.stderr
        assert refused.returncode == int(ExitCode.PRECONDITION), said
        [error] = [line for line in said.splitlines() if line.startswith("runbook: error:")]
        assert problem in error and V1.tag in error and "nothing was changed" in error, error
        assert "write one of active" in error, error
    assert snapshot(env) == before
    files.atomic_write(env.state_file, original)
    _with_history_entry(env, 0, git_commit="not-a-commit", deployed_at="2026-01-01T00:00:00Z")
    before = snapshot(env)
    problem = "deployment_history[0].git_commit: 'not-a-commit' is not a 40-hex commit"
    for extra in ("--dry-run", "--yes"):
        refused = runbook_cli(env, "rollback", extra)
        said = refused.stdout + refused.stderr
        assert refused.returncode == int(ExitCode.PRECONDITION), said
        assert problem in said and "git rev-parse HEAD" in said, said
    assert snapshot(env) == before


def test_a_redeployed_version_is_judged_by_its_newest_record_whatever_the_historys_order(
        stack: DrillStack) -> None:
    """Found by review: in a history written oldest first (another tool appends) holding the
    same commit twice, `rollback --to` took its oldest record (schema 1, another id) and the
    schema guard refused, exit 4, "pass --force"; the same file newest first planned. Both
    orders plan against the record that went live last. Oracle: the file as written here,
    the real database's schema (2, as v2 migrated it), the exit codes, nothing changed."""
    stack.arrange(scenes.PREVIOUS)  # v3 serves from blue, v2 stopped on green, schema 2
    env = stack.env
    doc = json.loads(env.state_file.read_text())
    v2 = doc["previous_deployment"]
    assert v2["version"] == V2.tag and v2["migration_version"] == 2, v2  # the premise
    v1 = next(h for h in doc["deployment_history"] if h["version"] == V1.tag)
    older = {**v2, "id": "dep_0000000000000001_000000000000000000000001",
             "deployed_at": "2026-01-01T00:00:00Z", "migration_version": 1,
             "status": "superseded"}
    doc["previous_deployment"] = None  # a tool that records none: only the history names v2
    for history in ([older, v1, v2], [v2, v1, older]):
        doc["deployment_history"] = history
        files.atomic_write(env.state_file, json.dumps(doc, indent=2).encode())
        before = snapshot(env)
        done = runbook_cli(env, "rollback", "--to", V2.tag, "--dry-run")
        said = done.stdout + done.stderr
        assert done.returncode == 0, said
        assert "compatible" in said and "ran with 1" not in said, said
        assert snapshot(env) == before
    assert through_proxy(env) == ("blue", V3.tag)


def test_a_rollback_records_the_schema_the_deployment_it_leaves_served_on(
        stack: DrillStack) -> None:
    """Found by review (a host whose deployments the Go CLI or the deploy script recorded:
    no migration_version anywhere): after a rollback v3 -> v2, whose schema guard read the
    database at schema 2 while v3 served, `rollback --dry-run --to v3` said "schema guard NOT
    checked" and told on-call to restore a snapshot (throwing writes away), and v3 stayed
    "schema not recorded". The rollback records on v3's record the schema it served on, in
    its one state write; v2's, never read, is not guessed. Oracle: Postgres's own
    schema_migrations, the file, the dry run's words."""
    stack.arrange(scenes.PREVIOUS)  # v3 serves from blue, v2 stopped on green, schema 2
    env = stack.env
    doc = json.loads(env.state_file.read_text())
    for record in (doc["current_deployment"], doc["previous_deployment"],
                   *doc["deployment_history"]):
        record.pop("migration_version", None)  # as the Go CLI and the host scripts write it
    files.atomic_write(env.state_file, json.dumps(doc, indent=2).encode())
    with stack.connect() as conn:
        row = conn.execute("SELECT version, dirty FROM schema_migrations").fetchone()
    assert row is not None and row[1] is False, row
    served_on = int(row[0])
    assert served_on == V3.schema  # the premise: v3 serves on its own schema
    done = rollback.rollback(env)
    assert "schema guard NOT checked" in " ".join(done.plan.warnings)  # v2's is not known
    [state_step] = [step for step in done.plan.steps if step.name == "state"]
    assert state_step.details["previous schema"].startswith(f"{served_on}, recorded for "
                                                            f"{V3.tag}"), state_step.details
    assert through_proxy(env) == ("green", V2.tag)
    v3_recorded_and_checked(env, served_on)


def test_a_url_libpq_cannot_read_is_a_schema_that_cannot_be_read_and_force_goes_past_it(
        stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: a URL parameter libpq does not know (the Go app's own URL, with pgx's
    pool_max_conns) became a configuration error, exit 2 even with --force, so the forced
    rollback of the code, which needs no database, was refused mid-incident. Without --force
    it is the schema that cannot be read (exit 4, nothing changed); with it, the rollback
    runs and says the guard was skipped."""
    stack.arrange(scenes.PREVIOUS_RUNNING)
    url = stack.database_url + ("&" if "?" in stack.database_url else "?") + "pool_max_conns=10"
    env_file = tmp_path / ".env.pgx"
    env_file.write_text(f"DATABASE_URL={url}\n")
    env_file.chmod(0o600)
    env = stack.env.with_(database=dataclasses.replace(stack.env.database, env_file=env_file))
    before, was = snapshot(env), through_proxy(env)
    with pytest.raises(RunbookError) as refused:
        rollback.rollback(env)
    said = str(refused.value)
    assert refused.value.exit_code == ExitCode.PRECONDITION, said
    assert "cannot be read" in said and "pool_max_conns" in said and "--force" in said, said
    # found by the on-call walkthrough review: --force only skips this check
    assert "--force cannot help if the database is down for both slots" in said, said
    assert stack.password not in said
    assert snapshot(env) == before
    done = rollback.rollback(env, rollback.Options(force=True, reason="pgx url"))
    assert any("schema guard skipped (--force)" in w and "pool_max_conns" in w
               for w in done.plan.warnings), done.plan.warnings
    now = through_proxy(env)
    assert now[0] != was[0] and now[1] != was[1], (was, now)  # traffic on the previous release


def test_a_restore_pick_dated_in_the_future_is_refused_and_a_named_one_is_not(
        stack: DrillStack) -> None:
    """Found by review: a snapshot taken while the host clock ran fast (NTP set it back since)
    sorted as the newest, so `--restore-snapshot` picked it, and a newer one's writes were
    lost. The pick is refused (exit 4, nothing changed), the schema guard's refusal offers
    no such pick, and the snapshot named with --snapshot is restored as before."""
    from datetime import UTC, datetime, timedelta

    env = migrated(stack)  # v2 serving on schema 2; its pre-deploy snapshot at schema 1
    [pre] = sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))[-1:]
    sidecar = pre.with_name(pre.name.replace(".sql.gz", ".meta.json"))
    kept = sidecar.read_bytes()
    ahead = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    sidecar.write_text(json.dumps(json.loads(kept) | {"timestamp": ahead}))
    try:
        before = snapshot(env)
        with pytest.raises(RunbookError) as guard:
            rollback.rollback(env)
        said = str(guard.value)
        assert guard.value.exit_code == ExitCode.PRECONDITION, said
        assert "migrations ran after the target deployment" in said, said
        assert f"{pre.name}, is dated " in said and " in the future" in said, said
        assert (f"`runbook rollback {command_arg(env)} --restore-snapshot --snapshot FILE`"
                in said), said
        with pytest.raises(RunbookError) as auto:
            rollback.rollback(env, rollback.Options(restore_snapshot="auto"))
        said = str(auto.value)
        assert auto.value.exit_code == ExitCode.PRECONDITION, said
        assert f"snapshot {pre.name} is dated " in said and "clock was likely set back" in said
        assert (f"`runbook rollback {command_arg(env)} --restore-snapshot --snapshot FILE`"
                in said), said
        # found by the on-call walkthrough review: a rollback --to X is named with its --to
        # (without it the command goes to the previous deployment, whatever X was)
        for restore in (None, "auto"):
            with pytest.raises(RunbookError) as named_to:
                rollback.rollback(env, rollback.Options(to=V1.tag, restore_snapshot=restore))
            assert (f"`runbook rollback {command_arg(env)} --to {V1.tag} --restore-snapshot "
                    "--snapshot FILE`" in str(named_to.value)), (restore, named_to.value)
        assert snapshot(env) == before
        named = rollback.rollback(env, rollback.Options(restore_snapshot=pre.name),
                                  dry_run=True)
        shown = step_of(named.plan, "preflight").details
        assert shown["restore"] == pre.name, shown
        assert "in the future: how many writes a restore undoes cannot be told" in shown[
            "data-loss window"], shown
        assert snapshot(env) == before
    finally:
        sidecar.write_bytes(kept)


def test_a_moved_databases_snapshot_is_restored_by_the_rollback_its_refusal_names(
        stack: DrillStack) -> None:
    """Found by review: the database moved (another host port, another container) since v2's
    pre-deploy snapshot was taken, so its sidecar names where it was then. `rollback
    --restore-snapshot --snapshot FILE` refused it as another server's and named `runbook
    snapshot restore ... --moved-from` (which restores the database and leaves v2, which
    cannot run on it, to be started again: refused too) while `runbook rollback` had no
    --moved-from: on-call was stuck mid-incident. The rollback takes --moved-from HOST:PORT,
    validated as the restore's is (a bad value: exit 2, one line, nothing changed); its
    refusal names the rollback with it, that command runs, its plan says so, and a run killed
    during its restore names the command that finishes it, --moved-from included."""
    env = migrated(stack)  # v2 serving from green on schema 2; its pre-deploy snapshot at 1
    [pre] = sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))[-1:]
    sidecar = pre.with_name(pre.name.replace(".sql.gz", ".meta.json"))
    meta = json.loads(sidecar.read_text())
    # taken where the database was before it moved: neither its URL's port nor Docker's
    other = next(p for p in (int(meta["port"]) + 1, int(meta["port"]) + 2)
                 if p != stack.ports.postgres)
    sidecar.write_text(json.dumps(meta | {"host": "localhost", "port": other}))
    moved = f"localhost:{other}"

    def untouched() -> dict[str, object]:
        with stack.connect() as conn:
            schema = conn.execute("SELECT version FROM schema_migrations").fetchone()
        return {**snapshot(env), "schema": schema,
                "snapshots": sorted(p.name for p in env.database.snapshot_dir.iterdir())}

    before = untouched()
    assert before["schema"] == (2,) and before["traffic"] == ("green", V2.tag)
    def error(result: subprocess.CompletedProcess[str]) -> str:
        """The one error line (a run that started also names its journal)."""
        [line] = [x for x in result.stderr.splitlines() if x.startswith("runbook: error:")]
        return line

    refused = runbook_cli(env, "rollback", "--restore-snapshot", "--snapshot", pre.name,
                          "--yes")
    assert refused.returncode == ExitCode.USAGE, refused.stderr
    said = error(refused)
    assert f"was taken from {moved}" in said, said
    assert "runbook snapshot restore" not in said, said  # not the rollback's fix
    [command] = re.findall(r"`(runbook rollback [^`]*)`", said)
    named = shlex.split(command)
    assert named[:3] == ["runbook", "rollback", *shlex.split(command_arg(env))], command
    assert named[3:] == ["--restore-snapshot", "--snapshot", pre.name, "--moved-from", moved]
    assert untouched() == before
    # the rollback on-call types first, and its --restore-snapshot: never "no snapshot
    # exists" (roll the migrations back by hand) while this one is there; the same command
    for args, code in (([], ExitCode.PRECONDITION),
                       (["--restore-snapshot"], ExitCode.PRECONDITION)):
        first = runbook_cli(env, "rollback", *args, "--yes")
        assert first.returncode == code, (args, first.stderr)
        said = error(first)
        assert f"{pre.name} was taken from {moved}" in said, said
        assert re.findall(r"`(runbook rollback [^`]*--moved-from[^`]*)`", said) == [command]
        assert untouched() == before, args
    # a bad --moved-from: refused as the snapshot restore refuses it, nothing changed
    for args, words in (
            (["--restore-snapshot", "--moved-from", "db-before"], "is not HOST:PORT"),
            (["--restore-snapshot", "--moved-from", " "], "--moved-from is empty"),
            (["--moved-from", moved], "only makes sense with --restore-snapshot"),
            (["--restore-snapshot", "--snapshot", pre.name, "--moved-from",
              f"localhost:{other + 10}"], f"was taken from {moved}")):
        bad = runbook_cli(env, "rollback", *args, "--yes")
        assert bad.returncode == ExitCode.USAGE, (args, bad.stderr)
        said = error(bad)
        assert words in said, (args, said)
        assert untouched() == before, args
    # the fleet's maintenance pre-flight of this host (the database host's dry run with the
    # restore, as `runbook fleet host-check --restore-snapshot` runs it): the fleet has no
    # --snapshot or --moved-from, so its refusal names neither, and says why
    from runbook.fleet import hostcheck

    assert env.source is not None
    [fleet] = [p for p in hostcheck.check(str(env.source), None, restore=True)["problems"]
               if p["check"] == "rollback dry run"]
    assert fleet["exit_code"] == ExitCode.PRECONDITION, fleet
    assert f"{pre.name} was taken from {moved}" in fleet["fix"], fleet
    assert "the fleet cannot restore it" in fleet["fix"], fleet
    assert "runbook rollback" not in fleet["fix"] and "--snapshot FILE" not in fleet["fix"]
    assert untouched() == before
    # the snapshot restore, told the same, refuses to start v2 on the snapshot's schema 1,
    # naming this rollback: with --moved-from too (it named the rollback without it)
    alone = subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", "restore",
                            str(env.source), pre.name, "--moved-from", moved, "--dry-run"],
                           capture_output=True, text=True, timeout=180, check=False,
                           stdin=subprocess.DEVNULL)
    assert alone.returncode == ExitCode.PRECONDITION, alone.stderr
    assert re.findall(r"`(runbook rollback [^`]*)`", error(alone)) == [command], alone.stderr
    assert untouched() == before
    # the command the refusal names runs; its plan shows where the snapshot was taken
    dry = runbook_cli(env, "rollback", *named[3:], "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"taken from {moved}, this database before it moved" in dry.stdout, dry.stdout
    assert untouched() == before
    # killed once its maintenance stop stopped the serving slot: a rerun (without the flags)
    # names the command that finishes it, and that command runs
    first = runbook_cli(env, "rollback", *named[3:], "--yes",
                        fault="after:stop-app-slots:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    again = runbook_cli(env, "rollback", "--yes")
    assert again.returncode == ExitCode.PRECONDITION, again.stderr
    [finish] = re.findall(r"`(runbook rollback [^`]*--restore-snapshot[^`]*)`", again.stderr)
    finishing = shlex.split(finish)
    assert finishing[:3] == ["runbook", "rollback", *shlex.split(command_arg(env))], finish
    assert finishing[-2:] == ["--moved-from", moved], finish
    done = runbook_cli(env, "rollback", *finishing[3:], "--yes")
    assert done.returncode == 0, done.stderr
    assert through_proxy(env) == ("blue", V1.tag)
    with stack.connect() as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (1,)


def test_a_forced_rollback_onto_an_unhealthy_slot_leaves_the_old_one_running(
        stack: DrillStack) -> None:
    """Found by review: --force skipped the recheck before the old slot's stop, so old code
    forced onto a newer schema (its /health failing, /version fine) had the slot users could
    go back to stopped under it. It is left running now, and the run says so."""
    env = migrated(stack)  # v2 serving from green on schema 2; v1 (schema 1) stopped on blue
    result = rollback.rollback(env, rollback.Options(force=True))
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    inspected = subprocess.run(["docker", "inspect", "--format", "{{.State.Running}}",
                                env.slot(Slot.GREEN).container],
                               capture_output=True, text=True, check=True).stdout.strip()
    assert inspected == "true"  # the docker CLI's word: still running
    said = " ".join(result.notices)
    assert "forced past its health gate, does not answer healthy" in said, said
    assert f"runbook switch {command_arg(env)} --slot green" in said, said
    # the plan and the journal state the criterion applied, not the skipped gate's (found by
    # review: "passes on: healthy or degraded", "backoff 0.1s -> 1s" beside an "unhealthy" ok)
    record = json.loads(Path(str(result.record_file)).read_text())
    gate = next(step for step in record["steps"] if step["name"] == "health-gate")
    assert gate["status"] == "ok" and "unhealthy" in gate["detail"]["health"], gate
    for details in (gate["detail"], step_of(result.plan, "health-gate").details):
        assert "healthy or degraded" not in details["passes on"], details
        assert "503 included" in details["passes on"], details
        assert "backoff" not in details["timeout"], details
        assert f"every {slots.FORCED_POLL:g}s" in details["timeout"], details


@pytest.mark.any_shape
def test_image_gone_names_the_recovery_command(stack: DrillStack) -> None:
    env = migrated(stack)
    st = states.read_state(env.state_file)
    assert st.previous is not None
    gone = st.previous.with_(version="deadbee", image="togather-server:deadbee",
                             migration_version=2)
    states.write_state(env.state_file, st.with_(previous=gone))
    docker.remove(env.slot("blue").container)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env)
    assert err.value.exit_code == ExitCode.PRECONDITION
    assert "togather-server:deadbee is gone" in str(err.value)
    # the upstream's Dockerfile, with the build arguments that make the image name itself
    # as the gate expects (not `dev` / `unknown`)
    assert ("docker build -f deploy/docker/Dockerfile --build-arg VERSION=deadbee --build-arg "
            f"GIT_COMMIT={gone.git_commit} -t togather-server:deadbee .") in str(err.value), err
    # the other way out names what works on this host: `runbook deploy` needs compose, and
    # on a `docker run` host it refuses (it sent on-call round in a circle there)
    if docker_run_host(stack):
        assert f"runbook deploy {command_arg(env)} --version" not in str(err.value), err.value
        assert "docker run" in str(err.value) and "runbook switch" in str(err.value), err.value
    else:
        assert f"runbook deploy {command_arg(env)} --version" in str(err.value), err.value


def step_of(plan: Any, name: str) -> Any:
    return next(step for step in plan.steps if step.name == name)


@pytest.mark.shape_specific
def test_a_recorded_image_naming_the_stopped_containers_build_starts_it_and_records_what_runs(
        stack: DrillStack, request: pytest.FixtureRequest) -> None:
    """The state file's docker_image may name the previous build by another name than the one
    its container was made from (a retag, the Go CLI's record). The plan wanted that name, so
    it recreated the stopped container, which already held that build, through compose, which
    made it from its own file's `image:`: the plan said one image, another ran, the step said
    ok and `runbook status` then blamed "someone outside the runbook" (found by review). The
    container is started: what runs (its .Config.Image) is what the plan shows and the state
    records."""
    from runbook import status as statusmod

    env = two_deployments(stack)  # v3 serves from blue, v2 stopped on green
    alt = retag(stack, request, V2.image, "togather-alt")
    st = states.read_state(env.state_file)
    assert st.previous is not None and st.previous.version == V2.tag
    states.write_state(env.state_file, st.with_(previous=st.previous.with_(image=alt)))
    green = env.slot(Slot.GREEN).container
    made = container_identity(stack, green).split()[0]
    dry = rollback.rollback(env, dry_run=True)
    assert dry.plan.facts["container_action"] == "start", dry.plan.render()
    assert step_of(dry.plan, "preflight").details["target image"] == V2.image
    assert alt in step_of(dry.plan, "start-slot").details["decision"]  # the record's name, said
    result = rollback.rollback(env)
    assert result.plan.facts["container_action"] == "start"
    info = docker.inspect(green)
    assert info.running and info.image == V2.image
    assert container_identity(stack, green).split()[0] == made  # started, not recreated
    assert through_proxy(env) == ("green", V2.tag)
    now = states.read_state(env.state_file)
    assert now.current is not None and now.current.image == V2.image
    assert not [p for p in statusmod.problems(statusmod.collect(env))
                if p.check == "image_differs"]


def made_from(stack: DrillStack, env: Environment, tmp_path: Path, slot: Slot,
              image: str) -> str:
    """The slot's container made anew from `image` (a name whose tag is no version, e.g.
    `:latest`) through compose, and stopped, as a deploy by another tool leaves a standby;
    returns Docker's id of it."""
    running_from(env, tmp_path, slot, image)
    container = env.slot(slot).container
    docker.stop(container)
    info = docker.inspect(container)
    assert (info.image, info.running) == (image, False), info
    return container_identity(stack, container).split()[0]


def build_of(stack: DrillStack, image: str) -> str:
    """The build (image id) `image` names now, as the docker CLI says: the test's oracle."""
    return stack.docker("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()


def image_problems(env: Environment) -> list[Any]:
    """What `runbook status` says of the image the active slot runs against the file's."""
    from runbook import status as statusmod

    return [p for p in statusmod.problems(statusmod.collect(env))
            if p.check == "image_differs" or "outside the runbook" in p.problem]


@pytest.mark.shape_specific
def test_a_standby_made_from_a_moving_tag_is_started_and_its_version_recorded(
        stack: DrillStack, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The stopped standby was made from `<repo>:latest`, which named the previous build then:
    the run adopted that name as what runs, so the state file and the run record said
    `:latest`, which names another build after the next push, and nobody could tell any
    more what that container runs. The container is started as it is (it holds the build),
    the plan says the name it was made from, and the versioned name is what is shown and
    recorded; once the tag has moved, `runbook status` still finds the build the file names,
    no false problem. Oracles: Docker (the container's id and build), the state file read
    back, the run record, the app's /version through the proxy."""
    from runbook import status as statusmod

    if docker_run_host(stack):
        pytest.skip("the standby is made through compose; a docker-run host has none")
    env = two_deployments(stack)  # v3 serves from blue, v2 stopped on green
    green = env.slot(Slot.GREEN).container
    latest = retag(stack, request, V2.image, "togather-moving", tag="latest")
    made = made_from(stack, env, tmp_path, Slot.GREEN, latest)
    dry = rollback.rollback(env, dry_run=True)
    assert dry.plan.facts["container_action"] == "start", dry.plan.render()
    start = step_of(dry.plan, "start-slot")
    assert f"the container names it {latest}, the same build" in start.details["decision"]
    assert start.details["wanted image"] == V2.image, start.details
    assert step_of(dry.plan, "preflight").details["target image"] == V2.image
    result = rollback.rollback(env)
    assert result.plan.facts["container_action"] == "start"
    info = docker.inspect(green)
    assert info.running and info.image == latest
    assert container_identity(stack, green).split()[0] == made  # started, not recreated
    assert through_proxy(env) == ("green", V2.tag)
    now = states.read_state(env.state_file)
    assert now.current is not None and now.current.version == V2.tag
    assert now.current.image == V2.image, now.current
    record = json.loads(Path(str(result.record_file)).read_text())
    start = next(step for step in record["steps"] if step["name"] == "start-slot")
    assert start["detail"]["wanted image"] == V2.image, start
    assert f"the run records {V2.image}" in start["detail"]["decision"], start
    assert image_problems(env) == []
    stack.docker("tag", V3.image, latest)  # the tag moves on to another build
    assert docker.image_id(latest) != info.image_id
    assert image_problems(env) == []
    seen = statusmod.gather(env)
    assert seen["current"]["image"] == V2.image, seen["current"]
    assert seen["slots"]["green"]["version"] == V2.tag, seen["slots"]["green"]


def recorded_moving_tag(stack: DrillStack, request: pytest.FixtureRequest,
                        tmp_path: Path) -> tuple[Environment, str, str, str]:
    """Two deployments; green (v2, the previous) made from a moving tag naming v2's build,
    which the state file, as earlier versions wrote it, records as v2's image. (env, green's
    container, the tag, the made container's id)"""
    if docker_run_host(stack):
        pytest.skip("the standby is made through compose; a docker-run host has none")
    env = two_deployments(stack)
    latest = retag(stack, request, V2.image, "togather-moving", tag="latest")
    made = made_from(stack, env, tmp_path, Slot.GREEN, latest)
    st = states.read_state(env.state_file)
    assert st.previous is not None and st.previous.version == V2.tag
    states.write_state(env.state_file, st.with_(previous=st.previous.with_(image=latest)))
    return env, env.slot(Slot.GREEN).container, latest, made


@pytest.mark.shape_specific
def test_a_recorded_moving_tag_is_recorded_again_by_its_version(
        stack: DrillStack, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A state file written by earlier versions records a moving tag (`:latest`) as the
    previous deployment's image, and the tag has moved on to another build since: the
    container still holds the build that ran, so it is started, and the versioned name,
    which names that build, is recorded in place of the tag (the record says what runs
    again). Oracles: Docker, the state file read back."""
    env, green, latest, made = recorded_moving_tag(stack, request, tmp_path)
    stack.docker("tag", V3.image, latest)  # moved on since
    dry = rollback.rollback(env, dry_run=True)
    assert dry.plan.facts["container_action"] == "start", dry.plan.render()
    decision = step_of(dry.plan, "start-slot").details["decision"]
    assert f"names it {latest}, a moving tag" in decision, decision
    assert f"recorded as {V2.image}, the same build" in decision, decision
    rollback.rollback(env)
    assert container_identity(stack, green).split()[0] == made  # started, not recreated
    assert through_proxy(env) == ("green", V2.tag)
    now = states.read_state(env.state_file)
    assert now.current is not None and now.current.image == V2.image, now.current
    assert image_problems(env) == []


@pytest.mark.shape_specific
def test_a_recorded_moving_tag_with_no_versioned_name_for_its_build_is_said_in_the_plan(
        stack: DrillStack, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A state file written by earlier versions records a moving tag (`:latest`) for the
    previous deployment, its container was made from it, and `<image_repository>:<version>`
    names no build the container holds (absent, or another build): no name on the host stays
    on that build, so the run records the tag again. The README promised it never would and
    the plan said nothing of it. Now the plan says the tag is recorded again and why, and
    the README says when. Oracles: Docker, the state file read back."""
    env, green, latest, made = recorded_moving_tag(stack, request, tmp_path)
    other = retag(stack, request, V1.image, "togather-other", tag=V2.tag)  # v1's build
    absent = env.with_(compose=dataclasses.replace(
        env.compose, image_repository=f"{other.rsplit(':', 1)[0]}-absent"))
    named = env.with_(compose=dataclasses.replace(
        env.compose, image_repository=other.rsplit(":", 1)[0]))
    build, v1_build = build_of(stack, V2.image)[:19], build_of(stack, V1.image)[:19]
    for host, why in ((absent, "is not on this host"),
                      (named, f"names another build, {v1_build}")):
        decision = step_of(rollback.rollback(host, dry_run=True).plan,
                           "start-slot").details["decision"]
        assert f"no name on this host stays on its build {build}" in decision, decision
        assert why in decision and f"the run records {latest} again" in decision, decision
    rollback.rollback(named)
    assert container_identity(stack, green).split()[0] == made  # started, not recreated
    assert through_proxy(env) == ("green", V2.tag)
    now = states.read_state(env.state_file)
    assert now.current is not None and now.current.image == latest, now.current


@pytest.mark.shape_specific
def test_a_compose_file_naming_a_moving_tag_gets_the_version_recorded(
        stack: DrillStack, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A compose file whose `image:` is `<repo>:latest` (no IMAGE_TAG): a rollback's recreate
    and a deploy checked it names the build they mean, then recorded `:latest` as the
    deployment's image. The container is made from it (checked after the recreate), the
    versioned name is recorded, and `runbook status` finds no false problem. Oracles:
    Docker, the state file read back, the proxy."""
    if docker_run_host(stack):
        pytest.skip("a docker-run host has no compose file")
    env = two_deployments(stack)  # v3 serves from blue, v2 stopped on green
    latest = retag(stack, request, V2.image, "togather-moving", tag="latest")
    moving = compose_naming(env, tmp_path, latest, literal=True)
    docker.remove(env.slot(Slot.GREEN).container)
    rollback.rollback(moving)
    assert docker.inspect(env.slot(Slot.GREEN).container).image == latest
    assert through_proxy(env) == ("green", V2.tag)
    now = states.read_state(env.state_file)
    assert now.current is not None and now.current.image == V2.image, now.current
    assert image_problems(env) == []
    stack.docker("tag", V3.image, latest)  # the next build is pushed as `:latest`
    deploy.deploy(moving, deploy.Options(version=V3.tag))
    assert docker.inspect(env.slot(Slot.BLUE).container).image == latest
    assert through_proxy(env) == ("blue", V3.tag)
    now = states.read_state(env.state_file)
    assert now.current is not None and now.previous is not None
    assert (now.current.image, now.previous.image) == (V3.image, V2.image), now
    assert image_problems(env) == []


@pytest.mark.shape_specific
def test_a_recreate_from_a_recorded_moving_tag_runs_only_the_versions_build(
        stack: DrillStack, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The state file (written by earlier versions) records `<repo>:latest` for the previous
    deployment, the compose file names the same `:latest`, and the container was removed:
    the recreate was planned without asking which build the tag names now, so after the next
    push it made the new build and only the health gate's version check stopped it, with a
    container already made. The tag proves the version's build only when its image id is
    that of `<image_repository>:<version>`: then the recreate goes ahead and records that
    name; when the tag names another build, or the versioned name is not on the host, the
    plan refuses (exit 4, nothing changed), as for any other build. Oracles: Docker (the
    tag moved here, the container still absent), the state file, the proxy."""
    if docker_run_host(stack):
        pytest.skip("a docker-run host has no compose file")
    env = two_deployments(stack)  # v3 serves from blue, v2 stopped on green
    green = env.slot(Slot.GREEN).container
    latest = retag(stack, request, V2.image, "togather-moving", tag="latest")
    moving = compose_naming(env, tmp_path, latest, literal=True)
    st = states.read_state(env.state_file)
    assert st.previous is not None and st.previous.version == V2.tag
    states.write_state(env.state_file, st.with_(previous=st.previous.with_(image=latest)))
    docker.remove(green)
    dry = rollback.rollback(moving, dry_run=True)  # the tag names v2's build: proved
    assert dry.plan.facts["container_action"] == "recreate", dry.plan.render()
    assert step_of(dry.plan, "start-slot").details["wanted image"] == V2.image
    unproved = moving.with_(compose=dataclasses.replace(  # no `<repository>:<v2>` on the host
        moving.compose, image_repository=latest.rsplit(":", 1)[0]))
    stack.docker("tag", V3.image, latest)  # the next build is pushed as `:latest`
    for host, why in ((moving, "names another build"), (unproved, "is not on this host")):
        before = snapshot(env)
        with pytest.raises(RunbookError) as err:
            rollback.rollback(host)
        assert err.value.exit_code == ExitCode.PRECONDITION, err.value
        assert f"{latest}, a tag that moves" in str(err.value) and why in str(err.value), \
            err.value
        assert snapshot(env) == before
        assert not docker.inspect(green).exists
    assert through_proxy(env) == ("blue", V3.tag)


@pytest.mark.shape_specific
def test_a_recreate_runs_the_image_compose_makes_and_refuses_another_build(
        stack: DrillStack, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Compose creates a slot's container from its own file's `image:` (with the IMAGE_TAG the
    run sets), whatever the state file's docker_image or [compose] image_repository say: the
    plan said "Recreate ... with togather-server:<v2>" and compose made it from the name its
    file gives. The same build under compose's name: the plan shows that name, the container
    runs it, the state records it. Another build: refused at plan time, exit 4, both named,
    nothing changed."""
    if docker_run_host(stack):
        pytest.skip("a docker-run host has no compose file to read the image from")
    env = two_deployments(stack)
    green = env.slot(Slot.GREEN).container
    other = retag(stack, request, V2.image, "togather-other")
    moved = compose_naming(env, tmp_path, other)
    docker.remove(green)
    dry = rollback.rollback(moved, dry_run=True)
    assert dry.plan.facts["container_action"] == "recreate"
    start = step_of(dry.plan, "start-slot")
    assert start.title == f"Recreate the green container with {other}", start.title
    assert step_of(dry.plan, "preflight").details["target image"] == other
    rollback.rollback(moved)
    assert docker.inspect(green).image == other
    assert through_proxy(env) == ("green", V2.tag)
    now = states.read_state(env.state_file)
    assert now.current is not None and now.current.image == other
    # the name compose makes now names another build (v3's): refused before any change
    env = two_deployments(stack)
    docker.remove(green)
    stack.docker("tag", V3.image, other)
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(moved, dry_run=True)
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert other in err.value.message and V2.image in err.value.message, err.value
    assert "nothing was changed" in err.value.message and err.value.fix
    assert snapshot(env) == before


@pytest.mark.shape_specific
def test_a_recreate_that_makes_another_image_than_the_plan_showed_fails_before_traffic_moves(
        stack: DrillStack, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The compose file edited between the plan and the recreate (by hand, another tool): the
    container came up from an image the plan never showed and the step said ok. The created
    container's .Config.Image is checked: a mismatch fails the step before the commit point,
    and its undo leaves traffic where it was."""
    if docker_run_host(stack):
        pytest.skip("a docker-run host has no compose: nothing recreates")
    env = two_deployments(stack)
    green = env.slot(Slot.GREEN).container
    other = retag(stack, request, V2.image, "togather-edited")
    moved = compose_naming(env, tmp_path, V2.image)  # a copy naming togather-server, as now
    assert moved.compose.file is not None
    (tmp_path / "edited").mkdir()
    edited = compose_naming(env, tmp_path / "edited", other).compose.file
    docker.remove(green)

    def edit(plan: Any) -> bool:  # at the prompt: someone else edits the compose file
        assert moved.compose.file is not None and edited is not None
        moved.compose.file.write_bytes(edited.read_bytes())
        return True

    with pytest.raises(RunbookError) as err:
        rollback.rollback(moved, confirm=edit)
    assert err.value.exit_code == ExitCode.FAILED_SAFELY, err.value
    assert other in str(err.value) and V2.image in str(err.value), err.value
    assert through_proxy(env) == ("blue", V3.tag)
    assert not docker.inspect(green).running  # the undo stopped it
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.version == V3.tag


@pytest.mark.shape_specific
@pytest.mark.parametrize("action", ["rollback", "deploy"])
def test_a_moving_tag_that_moves_after_the_plan_fails_the_recreate_naming_both_builds(
        stack: DrillStack, request: pytest.FixtureRequest, tmp_path: Path, action: str) -> None:
    """A compose file naming `<repo>:latest` is accepted when the tag names the version's
    build at plan time. Found by review: the tag moved after the plan (pushed while the
    prompt waited, or between a dry run and the run), the check after the recreate compared
    names (`:latest` == `:latest`) and passed; green ran v3's build and only the health gate
    caught it, in a deploy after the wrong build's migrations had run. The plan shows the
    build it checks; the created container's build (.Image) must be it: a mismatch fails the
    recreate step before the commit point, naming both builds, and the undo stops it.
    Oracles: `docker image inspect` (the builds), the proxy, the state file, the run record."""
    if docker_run_host(stack):
        pytest.skip("a docker-run host has no compose: nothing recreates")
    env = two_deployments(stack)  # v3 serves from blue, v2 stopped on green
    green = env.slot(Slot.GREEN).container
    latest = retag(stack, request, V2.image, "togather-moving", tag="latest")
    moving = compose_naming(env, tmp_path, latest, literal=True)
    docker.remove(green)
    meant, pushed = build_of(stack, V2.image), build_of(stack, V3.image)
    shown: list[str] = []

    def push(plan: Any) -> bool:  # at the prompt: the next build is pushed as `:latest`
        shown.append(plan.render())
        stack.docker("tag", V3.image, latest)
        return True

    with pytest.raises(RunbookError) as err:
        if action == "rollback":
            rollback.rollback(moving, confirm=push)
        else:
            deploy.deploy(moving, deploy.Options(version=V2.tag), confirm=push)
    assert meant.removeprefix("sha256:")[:12] in shown[0], shown[0]  # the plan says the build
    assert err.value.exit_code == ExitCode.FAILED_SAFELY, err.value
    said = str(err.value)
    assert meant.removeprefix("sha256:")[:12] in said, said
    assert pushed.removeprefix("sha256:")[:12] in said, said
    record = json.loads(max(env.runs_dir.glob("*.json"), key=os.path.getmtime).read_text())
    failed = [s["name"] for s in record["steps"] if s.get("status") == "failed"]
    assert failed == ["start-slot"], record["steps"]  # never the migrate step, nor the gate
    assert through_proxy(env) == ("blue", V3.tag)
    assert not docker.inspect(green).running  # the undo stopped it
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.version == V3.tag


@pytest.mark.shape_specific
def test_deploy_checks_and_runs_the_image_compose_makes(
        stack: DrillStack, request: pytest.FixtureRequest) -> None:
    """Deploy checked `[compose] image_repository:<version>` for presence (and its migrate
    command), then compose made the container from its own file's `image:`. The same build
    under another name: the plan shows compose's; another build: exit 4, nothing changed (no
    snapshot either)."""
    if docker_run_host(stack):
        pytest.skip("a docker-run host has no compose: deploy refuses (see the test above)")
    env = two_deployments(stack)  # v3 serves from blue: a deploy of v2 goes to green
    same = retag(stack, request, V2.image, "togather-repo")
    named = env.with_(compose=dataclasses.replace(env.compose,
                                                  image_repository=same.rsplit(":", 1)[0]))
    dry = deploy.deploy(named, deploy.Options(version=V2.tag), dry_run=True)
    start = step_of(dry.plan, "start-slot")
    assert start.title == f"Recreate the green container with {V2.image}", start.title
    stack.docker("tag", V1.image, same)  # the configured name now names another build
    before = snapshot(env)
    snapshots_before = sorted(env.database.snapshot_dir.glob("*.sql.gz"))
    with pytest.raises(RunbookError) as err:
        deploy.deploy(named, deploy.Options(version=V2.tag))
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert same in err.value.message and V2.image in err.value.message, err.value
    assert sorted(env.database.snapshot_dir.glob("*.sql.gz")) == snapshots_before
    assert snapshot(env) == before


@pytest.mark.shape_specific
def test_a_dry_run_interrupted_in_the_migrate_check_leaves_no_container(
        stack: DrillStack, tmp_path: Path) -> None:
    """`deploy --dry-run` proves the migrate command's program is in the new image inside a
    container created from it (never started), removed in its probe thread: a Ctrl-C there
    ended the process (os._exit) with that container left behind, unnamed. The plan names it,
    and an interrupt removes it. The docker CLI here is a stand-in that runs the real one,
    records the ids `docker create` prints and holds in `docker cp`."""
    import shutil
    import signal

    if docker_run_host(stack):
        pytest.skip("a docker-run host has no compose: deploy refuses before pre-flight")
    env = two_deployments(stack)  # v3 serves from blue: a deploy of v2 goes to green
    assert env.migrate_command
    dry = deploy.deploy(env, deploy.Options(version=V2.tag), dry_run=True)
    said = step_of(dry.plan, "preflight").details["migrate command"]
    # the same words in every process, so a dry run's plan equals the real run's (found by
    # review: the per-process container name made them differ); what follows names the
    # containers of dead runs this check removed (another worker's test leaves one)
    said = said.split("; removed the check container")[0]
    assert "a temporary container" in said and "never started" in said, said
    assert "runbook-migrate-check-" not in said, said
    real, created, reached = shutil.which("docker"), tmp_path / "created", tmp_path / "reached"
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text(f"""#!/bin/sh
case "$1" in
  create) out=$({real} "$@"); rc=$?; echo "$out" >> {created}; echo "$out"; exit $rc ;;
  cp) touch {reached}; sleep 20; exit 1 ;;
esac
exec {real} "$@"
""")
    fake.chmod(0o755)
    proc = subprocess.Popen(
        [sys.executable, "-m", "runbook.cli", "deploy", str(env.source), "--version", V2.tag,
         "--dry-run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"})
    try:
        deadline = time.monotonic() + 60
        while not reached.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reached.exists(), proc.communicate(timeout=30)
        proc.send_signal(signal.SIGINT)  # Ctrl-C while the check container exists
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, (out, err)
        ids = created.read_text().split()
        assert ids
        for cid in ids:
            assert stack.docker("inspect", cid, check=False).returncode != 0, f"{cid} left"
    finally:
        if proc.poll() is None:
            proc.kill()
        for cid in (created.read_text().split() if created.exists() else []):
            stack.docker("rm", "-f", "-v", cid, check=False)


def check_containers(stack: DrillStack) -> list[str]:
    """The names of the containers the migrate check labels as its own."""
    listed = stack.docker("ps", "-a", "--filter",
                          "label=com.togather.runbook.check=migrate-command", "--format",
                          "{{.Names}}")
    return listed.stdout.split()


def caddy_temps(env: Environment) -> list[str]:
    return sorted(p.name for p in env.caddy.caddyfile.parent.glob(".Caddyfile.runbook-*"))


@pytest.mark.shape_specific
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_dry_run_ended_by_sigterm_or_sighup_in_the_migrate_check_leaves_nothing(
        stack: DrillStack, signame: str, tmp_path: Path) -> None:
    """Found by review: a dry run installed no handler, so SIGTERM (or a dropped ssh session's
    SIGHUP) while the check container existed ended the process without its atexit clean-up,
    and the container stayed `Created` for ever. Now it leaves as from Ctrl-C, exit 128+n.
    The docker CLI here is a stand-in that runs the real one and holds in `docker cp`, so the
    signal surely lands while the container exists."""
    import shutil
    import signal

    if docker_run_host(stack):
        pytest.skip("a docker-run host has no compose: deploy refuses before pre-flight")
    env = two_deployments(stack)  # v3 serves from blue: a deploy of v2 goes to green
    assert env.source is not None and env.migrate_command
    signum = getattr(signal, signame)
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text(f"""#!/bin/sh
if [ "$1" = cp ]; then sleep 20; exit 1; fi
exec {shutil.which("docker")} "$@"
""")
    fake.chmod(0o755)
    proc = subprocess.Popen(
        [sys.executable, "-m", "runbook.cli", "deploy", str(env.source), "--version", V2.tag,
         "--dry-run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"})
    mine = f"runbook-migrate-check-{proc.pid}-"
    try:
        deadline = time.monotonic() + 60
        while (proc.poll() is None and time.monotonic() < deadline
               and not any(n.startswith(mine) for n in check_containers(stack))):
            time.sleep(0.02)
        assert proc.poll() is None, ("ended before its check container was seen",
                                     proc.communicate(timeout=30))
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signum, (proc.returncode, out, err)
        assert not [n for n in check_containers(stack) if n.startswith(mine)]
        assert caddy_temps(env) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for name in check_containers(stack):
            if name.startswith(mine):
                stack.docker("rm", "-f", "-v", name, check=False)


def other_drills(stack: DrillStack) -> set[str]:
    """The run ids of the other drill stacks running on this Docker daemon."""
    from runbook.drill.stack import RUN_LABEL

    listed = stack.docker("ps", "--filter", f"label={RUN_LABEL}",
                          "--format", f'{{{{.Label "{RUN_LABEL}"}}}}')
    return set(listed.stdout.split()) - {stack.run_id}


@pytest.mark.shape_specific
def test_the_migrate_check_sweeps_the_containers_of_dead_runs_only(stack: DrillStack) -> None:
    """Found by review: a check container a killed run left (SIGKILL: no clean-up can run) was
    never removed, and `runbook status` did not say. The next check removes those whose
    creator (pid and start time, on this boot) is gone, and says so (checked when this test
    runs alone: workers sharing the daemon sweep it too); a live run's is kept, and one made
    on another boot (another host sharing the Docker daemon) too."""
    from runbook import procs

    if docker_run_host(stack):
        pytest.skip("a docker-run host has no compose: deploy refuses before pre-flight")
    env = two_deployments(stack)
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_start = procs.pid_start(gone.pid)
    gone.wait(timeout=30)
    assert gone_start is not None and not procs.pid_alive(gone.pid, gone_start)
    me = os.getpid()
    made = {"dead": (gone.pid, gone_start, boot), "live": (me, procs.pid_start(me), boot),
            "other-boot": (gone.pid, gone_start, "0" * 8 + boot[8:])}
    names = {what: f"runbook-migrate-check-test-{what}-{time.monotonic_ns()}" for what in made}
    try:
        for what, (pid, start, made_on) in made.items():
            stack.docker("create", "--name", names[what],
                         "--label", "com.togather.runbook.check=migrate-command",
                         "--label", f"com.togather.runbook.check.pid={pid}",
                         "--label", f"com.togather.runbook.check.start={start}",
                         "--label", f"com.togather.runbook.check.boot={made_on}", V2.image)
        dry = deploy.deploy(env, deploy.Options(version=V2.tag), dry_run=True)
        left = check_containers(stack)
        assert names["dead"] not in left
        assert names["live"] in left and names["other-boot"] in left, left
        said = step_of(dry.plan, "preflight").details["migrate command"]
        # another drill on the same Docker daemon (an xdist worker, or make test's shape
        # groups beside its main run) may sweep the dead one first (that too is the sweep at
        # work): then this plan does not name it (the fresh-clone CI failed so once)
        if not os.environ.get("PYTEST_XDIST_WORKER") and not other_drills(stack):
            assert f"a killed run left: {names['dead']}" in said, said
        assert names["live"] not in said and names["other-boot"] not in said, said
        assert [n for n in left if n.startswith(f"runbook-migrate-check-{me}-")] == []
    finally:
        for name in names.values():
            stack.docker("rm", "-f", "-v", name, check=False)


@pytest.mark.shape_specific
def test_a_dry_run_ended_by_sigterm_in_caddy_validation_leaves_no_temp_file(
        stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: with reload = caddy-reload (or systemctl) the candidate Caddyfile was
    validated from a hidden temp file beside the Caddyfile, in a probe thread whose `finally`
    never runs when the process leaves (os._exit): SIGTERM, SIGHUP, even Ctrl-C there left
    it. A dry run now writes no such file at all (test_a_dry_run_writes_nothing_on_the_host);
    SIGTERM while Caddy validates still ends it as Ctrl-C does, with the folder as it was.
    The `[caddy] command` here is a stand-in that holds in `validate`, then runs Caddy."""
    import signal

    env = two_deployments(stack)
    reached = tmp_path / "reached"
    source = caddy_reload_through(
        env, tmp_path, f'if [ "$1" = validate ]; then touch {reached}; sleep 20; fi')
    folder = env.caddy.caddyfile.parent
    before = (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns)
    proc = subprocess.Popen(
        [sys.executable, "-m", "runbook.cli", "rollback", str(source), "--dry-run"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not reached.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reached.exists(), proc.communicate(timeout=30)  # Caddy's validate runs
        assert caddy_temps(env) == []
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, out, err)
        assert (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns) == before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for name in caddy_temps(env):
            (env.caddy.caddyfile.parent / name).unlink(missing_ok=True)


@pytest.mark.any_shape
def test_no_previous_deployment(stack: DrillStack) -> None:
    stack.reset()
    with pytest.raises(RunbookError) as err:
        rollback.rollback(stack.env)
    assert err.value.exit_code == ExitCode.PRECONDITION
    assert "No previous deployment found" in str(err.value)
    assert "runbook deploy" in str(err.value)


def host_files(stack: DrillStack) -> dict[str, tuple[int, ...]]:
    """Every folder and file of the drill host (its run folder: the Caddyfile's folder, the
    state file's, the lock's, the journals, the run records, the snapshots): a folder's
    mtime, which a file created and removed straight after changes too, and a file's size
    and mtime."""
    found: dict[str, tuple[int, ...]] = {}
    for root, _, names in os.walk(stack.run_dir):
        found[root] = (os.stat(root).st_mtime_ns,)
        for name in names:
            st = os.stat(os.path.join(root, name), follow_symlinks=False)
            found[os.path.join(root, name)] = (st.st_size, st.st_mtime_ns)
    return found


@pytest.mark.shape_specific
@pytest.mark.parametrize("command", [
    "rollback", "switch --slot green", f"deploy --version {V2.tag}",
    "rollback --restore-snapshot", "snapshot restore --keep-stopped"])
def test_a_dry_run_writes_nothing_on_the_host(stack: DrillStack, command: str) -> None:
    """Found by review: on a caddy-reload host (and systemctl) a dry run had Caddy validate
    and adapt candidate Caddyfiles it wrote as temp files beside the Caddyfile and removed:
    the folder's listing was the same after, its mtime was not, and a dry run must change
    nothing. The plan still says the new Caddyfile validates (the drill's `docker exec`
    Caddy validates it without a file). Oracle: every folder's and file's mtime under the
    drill host's run folder, the Caddyfile's folder's listing, the running state."""
    restores = "restore" in command
    # v3 serves from blue, v2 stopped on green; a restore: v2 serves, migrated past v1
    env = migrated(stack) if restores else two_deployments(stack)
    folder = env.caddy.caddyfile.parent
    before = (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns, host_files(stack),
              snapshot(env))
    dry = runbook_cli(env, *command.split(), "--dry-run")
    said = dry.stdout + dry.stderr
    after = (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns, host_files(stack),
             snapshot(env))
    if command.startswith("deploy") and docker_run_host(stack):
        assert dry.returncode == 4 and "compose" in said, said  # no compose: refused
    else:
        assert dry.returncode == 0, said
        assert command.startswith("snapshot") or "the new Caddyfile validates" in said, said
    assert after == before, said


@pytest.mark.shape_specific
def test_a_dry_run_that_cannot_give_caddy_the_file_never_says_it_validates(
        stack: DrillStack, tmp_path: Path) -> None:
    """A dry run gives Caddy the candidate on its standard input (it writes no file beside
    the Caddyfile); a `[caddy] command` that does not pass stdin on (here a wrapper running
    `docker exec NAME caddy`, no `-i`: Caddy reads an empty config) cannot validate it so.
    The dry run must not say it validates: it says it did not (a plan warning too), and
    that the real run does, before any change, naming how. Oracle: the plan's words (Caddy
    was given nothing to validate), the folder's listing and mtime."""
    if stack.has("container-caddy"):
        pytest.skip("a wrapper names no container: the upstream of a Caddy in a container "
                    "cannot be proven then (exit 4 before this)")
    env = two_deployments(stack)
    source = caddy_reload_through(env, tmp_path, ":")
    folder = env.caddy.caddyfile.parent
    before = (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns, snapshot(env))
    dry = subprocess.run([sys.executable, "-m", "runbook.cli", "rollback", str(source),
                          "--dry-run"], capture_output=True, text=True, timeout=180,
                         stdin=subprocess.DEVNULL, check=False)
    said = dry.stdout + dry.stderr
    assert (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns,
            snapshot(env)) == before, said
    assert dry.returncode == 0, said
    assert "the new Caddyfile validates" not in said, said
    assert "NOT validated by this dry run" in said, said
    assert "this dry run did not validate the new Caddyfile" in said, said  # the warning
    assert "does not read a Caddyfile from its standard input" in said, said
    real = f"caddy validate --config {folder}/.Caddyfile.runbook-validate-XXXX.tmp"
    assert f"the real run validates it before any change: {tmp_path}/{real}" in said, said


@pytest.mark.shape_specific
def test_a_dry_run_validates_relative_imports_from_the_caddyfiles_folder(
        stack: DrillStack) -> None:
    """The dry run gives Caddy the candidate on its stdin, not as a file beside the
    Caddyfile: its relative imports must still resolve from the Caddyfile's folder, as
    `caddy reload` resolves them (a copy in a temp dir, or Caddy's own working directory,
    would not find them). A good imported file validates; a typo in it is Caddy's refusal
    (exit 4) naming it. Oracle: Caddy's own words, the folder's listing and mtime."""
    env = two_deployments(stack)
    if env.caddy.reload is envmod.ReloadMethod.ADMIN_API:
        pytest.skip("reload = admin-api refuses relative imports (check_imports)")
    ping = env.caddy.caddyfile.with_name("ping.caddy")
    text = env.caddy.caddyfile.read_text()
    try:
        files.atomic_write(ping, b'respond /ping "pong" 200\n')
        files.atomic_write(env.caddy.caddyfile, text.replace(
            '\trespond /ping "pong" 200', "\timport ping.caddy").encode())
        folder = env.caddy.caddyfile.parent
        before = (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns)
        good = runbook_cli(env, "rollback", "--dry-run")
        assert (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns) == before
        files.atomic_write(ping, b'respnd /ping "pong" 200\n')
        before = (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns)
        bad = runbook_cli(env, "rollback", "--dry-run")
        assert (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns) == before
    finally:
        ping.unlink(missing_ok=True)
        files.atomic_write(env.caddy.caddyfile, text.encode())
    said = good.stdout + good.stderr
    assert good.returncode == 0 and "the new Caddyfile validates" in said, said
    said = bad.stdout + bad.stderr
    assert bad.returncode == int(ExitCode.PRECONDITION), said
    assert "unrecognized directive: respnd" in said and "ping.caddy:1" in said, said


def caddys_compose_service(stack: DrillStack) -> tuple[str, str]:
    """(project, service) of the drill's Caddy, which Compose started, from its labels."""
    labels = json.loads(stack.docker("inspect", stack.caddy_container, "--format",
                                     "{{json .Config.Labels}}").stdout)
    return labels["com.docker.compose.project"], labels["com.docker.compose.service"]


@contextlib.contextmanager
def ping_imported(env: Environment, imported: bytes = b'respond /ping "pong" 200\n',
                  ) -> Iterator[None]:
    """The Caddyfile's other site importing its /ping from ping.caddy beside it (a relative
    import), as long as the block runs."""
    ping = env.caddy.caddyfile.with_name("ping.caddy")
    text = env.caddy.caddyfile.read_text()
    try:
        files.atomic_write(ping, imported)
        files.atomic_write(env.caddy.caddyfile, text.replace(
            '\trespond /ping "pong" 200', "\timport ping.caddy").encode())
        yield
    finally:
        ping.unlink(missing_ok=True)
        files.atomic_write(env.caddy.caddyfile, text.encode())


@pytest.mark.shape_specific
def test_a_dry_run_through_docker_compose_exec_validates_relative_imports_from_the_folder(
        stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: with `[caddy] command = docker compose -p PROJECT exec SERVICE caddy`
    a dry run started that command in the Caddyfile's folder, which moves only the local
    docker client: Caddy read the Caddyfile from its stdin in its container's working
    directory (/srv), did not find `import ping.caddy` there, and the dry run refused (exit 4,
    "a reload or restart of Caddy would fail on it too") a rollback the real run made. Now
    Compose starts Caddy in the folder (`exec -T -w FOLDER`). Oracle: Caddy's own words (a
    typo in the imported file is refused naming ping.caddy, so the file was read), the
    folder's listing and mtime."""
    env = two_deployments(stack)
    project, service = caddys_compose_service(stack)
    source = tmp_path / "environment.toml"
    source.write_text(envmod.to_toml(env.with_(caddy=dataclasses.replace(
        env.caddy, reload=envmod.ReloadMethod.CADDY_RELOAD,
        command=("docker", "compose", "-p", project, "exec", service, "caddy")),
        source=source)))
    composed = env.with_(source=source)
    folder = env.caddy.caddyfile.parent
    with ping_imported(env):
        before = (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns)
        good = runbook_cli(composed, "rollback", "--dry-run")
        assert (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns) == before
    with ping_imported(env, b'respnd /ping "pong" 200\n'):
        bad = runbook_cli(composed, "rollback", "--dry-run")
    said = good.stdout + good.stderr
    assert good.returncode == 0 and "the new Caddyfile validates" in said, said
    seen = os.path.dirname(caddy.seen_by_caddy(env, env.caddy.caddyfile))  # /etc/caddy there
    assert f"exec -T -w {seen} {service} caddy" in said, said
    said = bad.stdout + bad.stderr
    assert bad.returncode == int(ExitCode.PRECONDITION), said
    assert "unrecognized directive: respnd" in said and "ping.caddy:1" in said, said


@pytest.mark.shape_specific
def test_docker_compose_exec_without_a_project_is_run_where_the_runbook_runs(
        stack: DrillStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`docker compose exec SERVICE caddy` with no -p finds its project from the folder it is
    started in (here a .env naming it), as the real run's `caddy validate` and `caddy reload`
    run it: the dry run started it in the Caddyfile's folder, where Compose found no project
    and the plan said the Caddyfile was NOT validated. Oracle: Caddy validates the candidate,
    relative import and all, from the folder Compose was started in."""
    env = two_deployments(stack)
    project, service = caddys_compose_service(stack)
    (tmp_path / ".env").write_text(f"COMPOSE_PROJECT_NAME={project}\n")
    monkeypatch.chdir(tmp_path)
    composed = env.with_(caddy=dataclasses.replace(
        env.caddy, reload=envmod.ReloadMethod.CADDY_RELOAD,
        command=("docker", "compose", "exec", service, "caddy")))
    with ping_imported(env):
        ran, unchecked = caddy.validate_unwritten(composed, env.caddy.caddyfile.read_text())
    assert unchecked is None, unchecked
    assert ran.startswith("docker compose exec -T -w "), ran


@pytest.mark.shape_specific
def test_a_dry_run_that_cannot_start_caddy_in_the_folder_never_validates_relative_imports(
        stack: DrillStack, tmp_path: Path) -> None:
    """A `[caddy] command` the runbook cannot start in the Caddyfile's folder as Caddy sees it
    (a wrapper script, here one passing stdin on to `docker exec -i NAME caddy`): Caddy
    resolves the relative imports of a config read from stdin from its own working
    directory, so validating there refused (exit 4, "File to import not found") what the
    real run, which gives Caddy a file beside the Caddyfile, validates. The dry run must say
    it did not validate it, neither "validates" nor a refusal. Oracle: the plan's words,
    the folder's listing and mtime."""
    if stack.has("container-caddy"):
        pytest.skip("a wrapper names no container: the upstream of a Caddy in a container "
                    "cannot be proven then (exit 4 before this)")
    env = two_deployments(stack)
    wrapper = tmp_path / "caddy"
    wrapper.write_text(f'#!/bin/sh\nexec docker exec -i {stack.caddy_container} caddy "$@"\n')
    wrapper.chmod(0o755)
    source = tmp_path / "environment.toml"
    source.write_text(envmod.to_toml(env.with_(caddy=dataclasses.replace(
        env.caddy, reload=envmod.ReloadMethod.CADDY_RELOAD, command=(str(wrapper),)),
        source=source)))
    folder = env.caddy.caddyfile.parent
    with ping_imported(env):
        before = (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns, snapshot(env))
        dry = runbook_cli(env.with_(source=source), "rollback", "--dry-run")
        after = (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns, snapshot(env))
    said = dry.stdout + dry.stderr
    assert after == before, said
    assert dry.returncode == 0, said
    assert "the new Caddyfile validates" not in said, said
    assert "NOT validated by this dry run" in said, said
    assert "this dry run did not validate the new Caddyfile" in said, said  # the warning
    assert "relative imports (line " in said and "import ping.caddy" in said, said


@pytest.mark.shape_specific
def test_a_dry_run_starts_a_caddy_on_this_host_in_the_caddyfiles_folder(
        stack: DrillStack, tmp_path: Path) -> None:
    """A `[caddy] command` that is Caddy's own binary on this host (here the drill Caddy's,
    copied out of its image) is started in the Caddyfile's folder, the one way to have it
    resolve the relative imports of a config read from stdin there (`-w` is a container's
    alone). Oracle: Caddy's own words (a typo in the imported file is refused naming
    ping.caddy, so the file was read), the folder's listing and mtime."""
    if stack.has("container-caddy"):
        pytest.skip("the Caddyfile's folder is /etc/caddy to Caddy there (container_path), "
                    "which a Caddy on this host does not have")
    env = two_deployments(stack)
    binary = tmp_path / "bin" / "caddy"
    binary.parent.mkdir()
    stack.docker("cp", f"{stack.caddy_container}:/usr/bin/caddy", str(binary))
    source = tmp_path / "environment.toml"
    source.write_text(envmod.to_toml(env.with_(caddy=dataclasses.replace(
        env.caddy, reload=envmod.ReloadMethod.CADDY_RELOAD, command=(str(binary),)),
        source=source)))
    local = env.with_(source=source)
    folder = env.caddy.caddyfile.parent
    with ping_imported(env):
        before = (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns)
        good = runbook_cli(local, "rollback", "--dry-run")
        assert (sorted(os.listdir(folder)), os.stat(folder).st_mtime_ns) == before
    with ping_imported(env, b'respnd /ping "pong" 200\n'):
        bad = runbook_cli(local, "rollback", "--dry-run")
    said = good.stdout + good.stderr
    assert good.returncode == 0 and "the new Caddyfile validates" in said, said
    assert f"this dry run: `{binary} validate --config -" in said, said
    said = bad.stdout + bad.stderr
    assert bad.returncode == int(ExitCode.PRECONDITION), said
    assert "unrecognized directive: respnd" in said and "ping.caddy:1" in said, said


def cli(env_file: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "runbook.cli", *args, str(env_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


@pytest.mark.any_shape
def test_two_concurrent_rollbacks_exactly_one_proceeds(stack: DrillStack) -> None:
    env = two_deployments(stack)
    assert env.source is not None
    procs = [cli(env.source, "rollback", "--yes") for _ in range(2)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read())  # type: ignore[union-attr]
               for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 3], results
    locked = next(err for code, _, err in results if code == 3)
    assert "lock is held by" in locked and "pid" in locked
    assert through_proxy(env) == ("green", V2.tag)


@pytest.mark.any_shape
def test_cli_errors_have_one_line_and_their_exit_code(stack: DrillStack) -> None:
    stack.reset()
    assert stack.env.source is not None
    cases = [
        (["rollback", "--yes"], 4, "No previous deployment found"),
        (["rollback", "--yes", "--to", "fffffff"], 2, "not in the deployment history"),
    ]
    for args, code, text in cases:
        proc = cli(stack.env.source, *args)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, (args, out, err)
        assert text in err and "Traceback" not in err
    bad = subprocess.run([sys.executable, "-m", "runbook.cli", "rollback", "nowhere", "--yes"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "unknown environment 'nowhere'" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.any_shape
def test_cli_rollback_json_output(stack: DrillStack) -> None:
    env = two_deployments(stack)
    assert env.source is not None
    proc = cli(env.source, "rollback", "--yes", "--format", "json")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    data = json.loads(out)
    assert data["ok"] and data["plan"]["facts"]["to"] == V2.tag
    assert [s["name"] for s in data["steps"]][-1] == "stop-old-slot"
    assert caddy.active_slot(env.caddy.caddyfile.read_text(), env) == Slot.GREEN


def test_schema_ahead_names_the_snapshot_and_restore_rolls_back_with_known_loss(
        stack: DrillStack) -> None:
    stack.reset()
    with stack.connect() as conn:
        conn.execute("INSERT INTO items (name) SELECT 'before-' || g FROM generate_series(1, 5) g")
    deploy_to(stack, stack.env, "v2")  # pre-deploy snapshot at schema 1, then migration 2
    env = stack.env
    snaps = sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))
    assert len(snaps) == 1
    st = states.read_state(env.state_file)
    assert st.current and st.current.snapshot_path == str(snaps[0])
    with stack.connect() as conn:
        conn.execute("INSERT INTO items (name, priority) VALUES ('after-1', 1), ('after-2', 2)")
        conn.execute("INSERT INTO orders (item_id, quantity) SELECT id, 1 FROM items LIMIT 3")
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env)
    text = str(err.value)
    assert err.value.exit_code == ExitCode.PRECONDITION
    assert snaps[0].name in text and "--restore-snapshot" in text
    assert "items: 2" in text and "orders" in text  # the data-loss window, per table
    dry = rollback.rollback(env, rollback.Options(restore_snapshot="auto"), dry_run=True)
    names = [s.name for s in dry.plan.steps]
    assert names.index("safety-snapshot") < names.index("restore-database") < names.index(
        "start-slot") < names.index("switch")
    result = rollback.rollback(env, rollback.Options(restore_snapshot="auto"))
    assert through_proxy(env) == ("blue", V1.tag)
    with stack.connect() as conn:
        names_left = [r[0] for r in conn.execute("SELECT name FROM items ORDER BY id")]
        version = conn.execute("SELECT version FROM schema_migrations").fetchone()
        orders = conn.execute("SELECT to_regclass('public.orders')").fetchone()
    assert names_left == [f"before-{i}" for i in range(1, 6)]
    assert version == (1,) and orders == (None,)
    assert {o.name: o.status for o in result.outcomes}["restore-database"] == "ok"
    st = states.read_state(env.state_file)
    assert st.current and st.current.version == V1.tag and st.current.status == "active"
    safety = sorted(env.database.snapshot_dir.glob("*.sql.gz"))
    assert len(safety) == 2  # the pre-deploy snapshot and the safety snapshot of the restore


def test_a_restore_the_database_user_may_not_perform_is_refused_while_planning(
        stack: DrillStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review (drill_owner.py): with the app user owning all but a DBA's schema,
    `rollback --restore-snapshot --dry-run` passed, and the real run stopped the serving
    slot and took the safety snapshot before its DROP SCHEMA failed "must be owner": an
    outage of the restore's length, made by the tool. Both refuse while planning now."""
    migrated(stack)
    role = "runbook_test_owner"
    with owned_by_a_role(stack, monkeypatch, role) as env, reporting_schema(stack, role):
        folder = sorted(p.name for p in env.database.snapshot_dir.iterdir())
        before = snapshot(env)
        for dry_run in (True, False):
            with pytest.raises(RunbookError) as err:
                rollback.rollback(env, rollback.Options(restore_snapshot="auto"),
                                  dry_run=dry_run)
            assert err.value.exit_code == ExitCode.PRECONDITION, str(err.value)
            assert "schema reporting" in err.value.message, err.value.message
            assert snapshot(env) == before  # still serving v2 from green, nothing stopped
            assert sorted(p.name for p in env.database.snapshot_dir.iterdir()) == folder


def test_a_rollback_that_restores_names_the_restored_and_the_safety_snapshot_in_its_output(
        stack: DrillStack) -> None:
    """Found by review: `rollback --restore-snapshot` gave the restore's steps no facts, so
    after a successful run neither `--format json` nor the text output named the snapshot
    restored or the safety snapshot holding the data from before it (a standalone `snapshot
    restore` names them). Both outputs name them now, the safety snapshot being the
    `pre-restore` file the run left in the snapshot folder."""
    def cli(env: Environment, *args: str) -> subprocess.CompletedProcess[str]:
        assert env.source is not None
        return subprocess.run([sys.executable, "-m", "runbook.cli", "rollback", str(env.source),
                               "--restore-snapshot", "--yes", *args], capture_output=True,
                              text=True, check=False, timeout=300, stdin=subprocess.DEVNULL)

    for fmt in ("json", "text"):
        stack.reset()
        deploy_to(stack, stack.env, "v2")  # pre-deploy snapshot at schema 1, then migration 2
        env = stack.env
        pre = sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))
        assert len(pre) == 1
        done = cli(env, "--format", fmt)
        assert done.returncode == 0, done.stderr
        assert through_proxy(env) == ("blue", V1.tag)
        safety = sorted(env.database.snapshot_dir.glob("*_pre-restore.sql.gz"))
        assert len(safety) == 1, safety
        if fmt == "json":
            facts = json.loads(done.stdout)["plan"]["facts"]
            assert facts["restore_snapshot"] == str(pre[0]), facts
            assert facts["safety_snapshot"] == str(safety[0]), facts
            assert facts["restored"] is True, facts
        else:
            assert str(safety[0]) in done.stdout, done.stdout
            assert pre[0].name in done.stdout, done.stdout


def tooling_recorded_v2(stack: DrillStack) -> tuple[Path, Path, dict[str, Any]]:
    """v2 deployed over v1 as the deploy script records it: no migration version in the
    state file or in v2's pre-deploy sidecar. (the dump, its sidecar, the sidecar's keys)"""
    if stack.has("docker-run"):
        pytest.skip("the docker-run host's own deploy writes the sidecar this test rewrites")
    stack.reset()
    deploy_to(stack, stack.env, "v2")  # pre-deploy snapshot at schema 1, then migration 2
    env = stack.env
    [pre] = sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))
    sidecar = pre.with_name(pre.name.replace(".sql.gz", ".meta.json"))
    meta = json.loads(sidecar.read_text())
    for key in ("migration_version", "sha256", "tables", "dirty"):
        meta.pop(key, None)  # what scripts/ write: the contract's keys only
    sidecar.write_text(json.dumps(meta))
    st = states.read_state(env.state_file)
    assert st.previous is not None and st.current is not None
    states.write_state(env.state_file, dataclasses.replace(
        st, previous=st.previous.with_(migration_version=None)))
    return pre, sidecar, meta


@pytest.mark.shape_specific
def test_an_unknown_target_schema_restores_only_its_successors_pre_deploy_snapshot(
        stack: DrillStack, tmp_path: Path) -> None:
    """The shell tooling records no migration version, in the state or the sidecar: the
    newest snapshot (a manual one at the current schema) must never be the automatic choice."""
    import time

    from runbook import snapshots

    pre, sidecar, meta = tooling_recorded_v2(stack)
    env = stack.env
    st = states.read_state(env.state_file)
    assert st.current is not None and meta["deployment_id"] == st.current.id
    stack.docker("stop", env.slot(Slot.BLUE).container)  # no running v1 to ask /health
    time.sleep(1.1)  # snapshot names carry seconds
    manual = snapshots.create(env, "manual")
    assert manual.migration_version == 2

    dry = rollback.rollback(env, rollback.Options(restore_snapshot="auto"), dry_run=True)
    shown = dry.plan.render()
    assert pre.name in shown and manual.name not in shown

    aside = tmp_path / "aside"
    aside.mkdir()
    for path in (pre, sidecar):
        path.rename(aside / path.name)
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env, rollback.Options(restore_snapshot="auto"), dry_run=True)
    assert err.value.exit_code == ExitCode.PRECONDITION
    assert "\n" not in err.value.message and "unknown" in err.value.message
    assert err.value.fix and "--snapshot FILE" in err.value.fix
    assert manual.name not in str(err.value)
    assert snapshot(env) == before


@pytest.mark.shape_specific
def test_a_restore_plan_on_a_tooling_host_reads_the_pre_deploy_dump_in_full_once(
        stack: DrillStack, read_bytes: dict[Path, list[int]]) -> None:
    """Found by review: with no migration version in the state file or the sidecar (the
    deploy script's host), `rollback --restore-snapshot` read the whole pre-deploy dump three
    times before its prompt, dry run included: the schema guard, the snapshot pick and the
    restore's prepare (54 s for a 955 MiB dump). The pick and prepare now share one full read;
    the guard reads up to schema_migrations' rows (the whole of a dump this small); the real
    run's replay streams the file again and checks it against that read."""
    from tests.drill_checks import settled

    pre, _, _ = tooling_recorded_v2(stack)
    env = stack.env
    settled(pre)  # as old as a host's pre-deploy dump is when a rollback needs it
    dry = rollback.rollback(env, rollback.Options(restore_snapshot="auto"), dry_run=True)
    shown = dry.plan.render()
    assert pre.name in shown and "the dump of" in shown, shown
    size = pre.stat().st_size
    assert len(read_bytes[pre]) == 2 and sum(read_bytes[pre]) <= 2 * size, (
        read_bytes[pre], size)  # was three times in full


@pytest.mark.any_shape
def test_a_named_snapshot_whose_sidecar_has_no_version_is_judged_by_its_dump(
        stack: DrillStack) -> None:
    """`--snapshot FILE` whose sidecar the shell tooling wrote (the contract's keys only): it
    was refused as "at schema None", a good snapshot and no usable fix. The dump says 1."""
    stack.arrange(scenes.MIGRATED)  # v2 serving on schema 2, v1 ran with 1
    env = stack.env
    [pre] = sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))[-1:]
    sidecar = pre.with_name(pre.name.replace(".sql.gz", ".meta.json"))
    meta = json.loads(sidecar.read_text())
    meta.pop("migration_version", None)
    sidecar.write_text(json.dumps(meta))
    dry = rollback.rollback(env, rollback.Options(restore_snapshot=str(pre)), dry_run=True)
    assert pre.name in dry.plan.render()
    later = rollback.rollback(env, rollback.Options(restore_snapshot=str(pre)))
    assert later.outcomes[-1].status == "ok" and through_proxy(env) == ("blue", V1.tag)


def test_a_snapshot_restore_at_another_schema_than_the_serving_code_runs_on_is_refused(
        stack: DrillStack) -> None:
    """Found by review: `runbook snapshot restore` of a snapshot at schema 1 while v2 serves
    on schema 2 restored it, started v2 again and ended exit 0: v2 (its /health does not
    check the schema) then served on a schema it never ran on, its `orders` table gone, and
    nothing said so; an app that migrates itself on start would have migrated the restored
    data forward. Code and schema move together with `rollback --restore-snapshot`: this is
    refused, nothing changed, and `--keep-stopped` (restore, start nothing) does it by hand."""
    from runbook import snapshot_restore

    env = migrated(stack)  # v2 serving from green on schema 2; v1 stopped, schema 1 before
    [pre] = sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))[-1:]
    before = snapshot(env)
    listed = sorted(env.database.snapshot_dir.iterdir())
    with pytest.raises(RunbookError) as err:
        snapshot_restore.restore(env, pre.name)
    text = str(err.value)
    assert err.value.exit_code == ExitCode.PRECONDITION, text
    assert "schema 1" in text and "schema 2" in text, text
    assert (f"runbook rollback {command_arg(env)} --restore-snapshot --snapshot {pre.name}"
            in text), text
    assert "--keep-stopped" in text, text
    assert snapshot(env) == before and sorted(env.database.snapshot_dir.iterdir()) == listed
    with stack.connect() as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (2,)
    kept = snapshot_restore.restore(env, pre.name, restart=False)  # as the message says
    assert {o.name: o.status for o in kept.outcomes}["verify-restore"] == "ok"
    down = {s.name: s.details for s in kept.plan.steps}["stop-app-slots"]["THE SERVICE IS DOWN"]
    assert down.startswith("from here until you start the app containers"), down  # no switch
    ctrl_c = {s.name: s.details for s in kept.plan.steps}["restore-database"]["Ctrl-C"]
    assert ctrl_c.endswith("(the app slots left stopped: --keep-stopped)"), ctrl_c
    with stack.connect() as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (1,)
    assert not any(docker.inspect(env.slot(s).container).running for s in Slot)
    # The database is at 1 now, and v2 (stopped, still what Caddy dials) ran with 2: the
    # same restore without --keep-stopped would start v2 on schema 1. The schema the serving
    # code ran with is its deployment's record, not the database's schema now (found by
    # review: compared with the database, this passed, and putting back the safety snapshot,
    # the way back the restore names, was refused).
    with pytest.raises(RunbookError) as again:
        snapshot_restore.restore(env, pre.name)
    assert again.value.exit_code == ExitCode.PRECONDITION, str(again.value)
    assert f"{V2.tag}, which serves from the green slot, ran with" in str(again.value)
    assert not docker.inspect(env.slot(Slot.GREEN).container).running
    back = snapshot_restore.restore(env, kept.plan.facts["safety_snapshot"])
    assert {o.name: o.status for o in back.outcomes}["start-app-slots"] == "ok"
    down = {s.name: s.details for s in back.plan.steps}["stop-app-slots"]["THE SERVICE IS DOWN"]
    assert down.startswith("from here until the app containers are started again"), down
    ctrl_c = {s.name: s.details for s in back.plan.steps}["restore-database"]["Ctrl-C"]
    assert ctrl_c.endswith("(the app started again)"), ctrl_c
    with stack.connect() as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (2,)
    assert through_proxy(env) == ("green", V2.tag)


def test_a_snapshot_restore_leaves_a_running_standby_stopped_whose_code_needs_another_schema(
        stack: DrillStack) -> None:
    """Found by review: on a host whose standby keeps running (stop_old_slot = false), v2 was
    rolled back to v1 with --force (the database stays at schema 2), then v1's schema put
    back with `runbook snapshot restore` of the pre-deploy snapshot (schema 1). The serving
    v1 fits it, so the restore went ahead, and it started again every slot it had stopped:
    the standby v2 too, on schema 1, which it never ran on (its /health does not check the
    schema: a switch to it passes its gate, and it serves without its `orders` table). It is
    left stopped, said in the plan before any change and at the end with the fix; the
    serving slot is started again as the restore always does."""
    from runbook import snapshot_restore

    env = migrated(stack).with_(stop_old_slot=False)  # v2 on green, schema 2; v1 stopped
    [pre] = sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))[-1:]
    rollback.rollback(env, rollback.Options(force=True))  # v1 serves, on schema 2
    green = env.slot(Slot.GREEN).container
    assert through_proxy(env) == ("blue", V1.tag) and docker.inspect(green).running
    dry = snapshot_restore.restore(env, pre.name, dry_run=True)
    assert any(green in w and "schema 2" in w and "left stopped" in w
               for w in dry.plan.warnings), dry.plan.warnings
    done = snapshot_restore.restore(env, pre.name)
    assert {o.name: o.status for o in done.outcomes}["start-app-slots"] == "ok"
    with stack.connect() as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (1,)
    assert docker.inspect(green).status == "exited"  # stopped, not started on schema 1
    assert docker.inspect(env.slot(Slot.BLUE).container).running
    assert through_proxy(env) == ("blue", V1.tag)
    said = " ".join(done.notices)
    assert green in said and "schema 2" in said and "schema 1" in said, said


def test_a_snapshot_restore_is_refused_when_another_site_uses_a_standby_unfit_for_its_schema(
        stack: DrillStack) -> None:
    """The scene above, and a site outside the slot markers proxies to the standby's port:
    left stopped, that site is cut; started, it runs on a schema it never ran on. Refused
    before any change (exit 4), naming --keep-stopped; the site still answers."""
    from runbook import snapshot_restore

    env = migrated(stack).with_(stop_old_slot=False)
    [pre] = sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))[-1:]
    rollback.rollback(env, rollback.Options(force=True))  # v1 serves, v2 runs on green
    green = env.slot(Slot.GREEN)
    pin_other_site(env, f"localhost:{green.port}")
    site = f"http://127.0.0.1:{stack.ports.other_site}/version"
    try:  # Caddy 2.6 resets a connection that lands as the config it just loaded takes over
        first = drill_http.get(site, timeout=5)
    except httpx.TransportError:  # (found by a loaded CI run): one retry, as a user's GET
        first = drill_http.get(site, timeout=5)
    assert first.json()["version"] == V2.tag
    before = snapshot(env)
    listed = sorted(env.database.snapshot_dir.iterdir())
    with pytest.raises(RunbookError) as err:
        snapshot_restore.restore(env, pre.name)
    text = str(err.value)
    assert err.value.exit_code == ExitCode.PRECONDITION, text
    assert "another site" in text and "schema 2" in text and "--keep-stopped" in text, text
    assert "nothing was changed" in text, text
    assert snapshot(env) == before and sorted(env.database.snapshot_dir.iterdir()) == listed
    with stack.connect() as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (2,)
    assert drill_http.get(site, timeout=5).json()["version"] == V2.tag


@pytest.mark.any_shape
def test_answering_no_at_the_prompt_changes_nothing(stack: DrillStack) -> None:
    from runbook.run import NotConfirmed

    env = two_deployments(stack)
    before = snapshot(env)
    shown: list[str] = []
    with pytest.raises(NotConfirmed) as err:
        rollback.rollback(env, confirm=lambda plan: shown.append(plan.render()) is not None)
    assert err.value.exit_code == ExitCode.USAGE and "nothing was changed" in str(err.value)
    assert shown and "Switch Caddy to the green slot" in shown[0]
    assert snapshot(env) == before


def test_a_caddyfile_caddy_rejects_is_refused_in_preflight_before_the_standby_starts(
        stack: DrillStack) -> None:
    """Someone edited the Caddyfile on disk (outside the markers) without reloading: Caddy
    runs the old config, and the real `caddy validate` rejects the file. Pre-flight validates
    the candidate (issue 10): exit 4 before anything changes, the standby is never started."""
    env = two_deployments(stack)
    path = env.caddy.caddyfile
    broken = path.read_text().replace("\theader X-Drill-Run", "\tnot_a_directive on\n"
                                      "\theader X-Drill-Run")
    path.write_text(broken)
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env)
    assert err.value.exit_code == ExitCode.PRECONDITION
    assert "rejected the new Caddyfile" in str(err.value) and "not_a_directive" in str(err.value)
    assert "pre-flight" in str(err.value)
    assert snapshot(env) == before  # green never started; file, state and traffic as they were


def test_no_step_ever_stops_the_container_that_serves(stack: DrillStack) -> None:
    """The invariant is checked when acting, against what Caddy runs, not what a plan
    assumed: a stale plan that would stop the serving slot is refused."""
    from runbook import slots
    from runbook.traffic import ServingContainerError

    env = two_deployments(stack)  # blue serves v3
    with pytest.raises(ServingContainerError) as err:
        slots.stop(env, Slot.BLUE)
    assert "it is serving traffic" in str(err.value)
    with pytest.raises(ServingContainerError):
        slots.recreate(env, Slot.BLUE, V3.tag)
    assert docker.inspect(env.slot("blue").container).running
    assert through_proxy(env) == ("blue", V3.tag)
    # a stale stop step, planned when green served, refused at execution time
    step = slots.stop_step(env, Slot.BLUE, True)
    from runbook.plan import StepContext

    with pytest.raises(ServingContainerError):
        assert step.run is not None
        step.run(StepContext(step, env=env))
    assert through_proxy(env) == ("blue", V3.tag)


@pytest.mark.any_shape
@pytest.mark.parametrize("network", ["", "tcp/"])
def test_a_slot_caddy_dials_by_container_name_is_never_stopped_or_recreated(
        stack: DrillStack, network: str) -> None:
    """A Caddy on Docker's network dials the container itself (`togather-server-blue:8080`),
    not the host port the environment names. Judged by port alone, Caddy dialed neither slot
    and the guard let the container that serves be stopped (found by review). Caddy also
    takes the address with its network first (`tcp/togather-server-blue:8080`), which the
    name check did not see past (a doubt of a review, confirmed)."""
    from runbook import slots

    env = two_deployments(stack)  # blue serves v3
    blue = env.slot(Slot.BLUE)
    text = env.caddy.caddyfile.read_text()
    by_name = text.replace(f"localhost:{blue.port}", f"{network}{blue.container}:8080")
    assert by_name != text
    write_and_load(env, by_name)
    assert traffic.read(env, proxy=False).slots == frozenset()  # no slot port dialed
    with pytest.raises(traffic.ServingContainerError) as refused:
        traffic.refuse_if_serving(env, Slot.BLUE, "recreate")
    assert f"{network}{blue.container}:8080" in str(refused.value)
    with pytest.raises(traffic.ServingContainerError):
        slots.stop(env, Slot.BLUE)
    assert docker.inspect(blue.container).running
    traffic.refuse_if_serving(env, Slot.GREEN, "recreate")  # the other one is free to go


@pytest.mark.any_shape
def test_a_host_network_container_is_never_named_by_the_machines_hostname(
        stack: DrillStack) -> None:
    """Both slots on the host's network carry the machine's hostname: a Caddy dialing
    `<hostname>:8082` would have made the guard refuse the idle slot (found by review). Such a
    container is reached on its port only; a bridge one by its name too."""
    name = f"{stack.prefix}hostnet-probe"
    image = VERSIONS["v1"].image
    for network in ("host", "bridge"):
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        subprocess.run(["docker", "run", "-d", "--name", name, "--network", network,
                        "--entrypoint", "sleep", image, "60"], capture_output=True, check=True)
        try:
            found = docker.inspect(name).addresses
        finally:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        if network == "host":
            assert found == frozenset(), found
        else:
            assert name in found and any(a.count(".") == 3 for a in found), found


def test_status_and_planning_trust_what_caddy_runs_not_the_file(stack: DrillStack) -> None:
    """A run killed between writing the Caddyfile and reloading leaves a file that lies:
    status names the slot Caddy serves and lists the difference as a problem."""
    from runbook import status as statusmod

    env = two_deployments(stack)  # blue serves v3
    path = env.caddy.caddyfile
    path.write_text(caddy.rewrite(path.read_text(), env, Slot.GREEN))  # written, not loaded
    data = statusmod.gather(env)
    assert data["traffic"]["slot"] == "blue" and data["caddy"]["file_slot"] == "green"
    assert any("on disk points at green but Caddy runs blue" in p["problem"]
               for p in data["problems"])
    result = rollback.rollback(env, dry_run=True)
    assert result.plan.facts["from_slot"] == "blue" and result.plan.facts["to_slot"] == "green"


def _stale_current_for_a_deploy(stack: DrillStack, status: str | None = None) -> Environment:
    """v3 serves from blue while the state file's current names v1 (the old tooling's swap;
    `status` given, with that status): skipped on a docker-run host, which has no deploy."""
    if docker_run_host(stack):
        pytest.skip("runbook deploy needs compose: a docker-run host refuses it before any "
                    "change (test_deploy_moves_traffic_and_records_the_schema proves that)")
    stack.arrange(scenes.PREVIOUS)  # v1 then v2 then v3 deployed: v3 serves from blue
    env = stack.env
    st = states.read_state(env.state_file, environment=env.name)
    v1 = st.find_version(V1.tag)
    assert v1 is not None and st.current is not None
    stale = v1.with_(status=status) if status is not None else v1
    states.write_state(env.state_file, st.with_(current=stale, previous=st.current))
    return env


@pytest.mark.shape_specific
def test_a_deploy_records_what_served_as_the_previous_deployment_not_the_files_current(
        stack: DrillStack) -> None:
    """Found by review: with the file's current stale (the old tooling swaps records without
    switching: here it names v1 while v3 serves), a deploy of v2 recorded v1 as the
    previous deployment, and the next `runbook rollback` went for v1, which never served
    (refused: migrations ran after it). What served when the deploy began is the previous."""
    env = _stale_current_for_a_deploy(stack)
    assert through_proxy(env) == ("blue", V3.tag)  # the oracle: what users get
    done = deploy.deploy(env, deploy.Options(version=V2.tag, reason="test: stale current"))
    assert any(f"{V3.tag} serves" in w for w in done.plan.warnings), done.plan.warnings
    assert through_proxy(env) == ("green", V2.tag)
    after = states.read_state(env.state_file, environment=env.name)
    assert after.previous is not None and after.previous.version == V3.tag, after.previous
    assert after.find_version(V1.tag) is not None  # the file's stale current is kept
    planned = rollback.rollback(env, dry_run=True)  # goes back to what served: v3
    assert planned.plan.facts["to"] == V3.tag, planned.plan.facts


@pytest.mark.shape_specific
def test_a_deploy_over_a_stale_current_shows_and_journals_what_served_as_the_previous(
        stack: DrillStack) -> None:
    """Found by review: with the file's current stale (it names v1, active, while v3 serves
    from blue), the deploy's pre-flight said "current: v1 on blue", its state step promised
    "previous: v1, status superseded" against its own warning, its journal said so after
    the run had recorded v3 as previous, and v1 stayed "active" in the history beside the
    new deployment. The plan, the journal and the file all name what served (v3), and the
    displaced v1 is superseded."""
    env = _stale_current_for_a_deploy(stack, status="active")
    assert through_proxy(env) == ("blue", V3.tag)  # the oracle: what users get
    options = deploy.Options(version=V2.tag, reason="test: stale current")
    plan = deploy.deploy(env, options, dry_run=True).plan
    shown = next(s for s in plan.steps if s.name == "preflight").details["current"]
    assert shown.startswith(f"{V3.tag} on blue") and V1.tag in shown, shown
    promised = next(s for s in plan.steps if s.name == "state").details
    assert promised["previous"] == f"{V3.tag}, status superseded", promised
    done = deploy.deploy(env, options)
    assert through_proxy(env) == ("green", V2.tag)
    after = states.read_state(env.state_file, environment=env.name)
    assert after.previous is not None and after.previous.version == V3.tag, after.previous
    assert [d.version for d in after.deployments() if d.status == "active"] == [V2.tag], [
        (d.version, d.status) for d in after.deployments()]
    record = json.loads(Path(str(done.record_file)).read_text())
    journaled = next(s for s in record["steps"] if s["name"] == "state")["detail"]
    assert journaled["previous"] == f"{V3.tag}, status superseded", journaled


@pytest.mark.shape_specific
def test_a_deploy_of_the_version_the_state_file_calls_current_but_that_does_not_serve_goes_ahead(
        stack: DrillStack) -> None:
    """Found by review: "already the current deployment" was read from the state file. The
    old tooling's rollback swaps current and previous in that file without switching Caddy,
    so it can name v2 while v3 serves: `runbook deploy --version v2`, the recovery path,
    was refused (exit 4, "nothing to deploy"). What serves decides: v2 is deployed."""
    if docker_run_host(stack):
        pytest.skip("runbook deploy needs compose: a docker-run host refuses it before any "
                    "change (test_deploy_moves_traffic_and_records_the_schema proves that)")
    env = two_deployments(stack)  # v3 serving from blue; v2 on green, stopped
    lying = states.read_state(env.state_file, environment=env.name)
    assert lying.current is not None and lying.previous is not None
    states.write_state(env.state_file, lying.with_(current=lying.previous,
                                                   previous=lying.current))
    assert through_proxy(env) == ("blue", V3.tag)
    deploy.deploy(env, deploy.Options(version=V2.tag, reason="test: state file lies"))
    assert through_proxy(env) == ("green", V2.tag)
    with pytest.raises(RunbookError) as again:  # now it does serve: nothing to deploy
        deploy.deploy(env, deploy.Options(version=V2.tag, reason="test: again"))
    assert again.value.exit_code == ExitCode.PRECONDITION
    assert "already" in again.value.message and "serves" in again.value.message


def test_redeploying_the_serving_version_goes_ahead_when_it_is_broken(
        stack: DrillStack) -> None:
    """Found by review: `runbook deploy --version X` was refused ("X already serves, nothing
    to deploy") while X served and failed its health check: the guide's recovery "redeploy a
    version you know is good" when a rollback cannot help. Refused still when it serves
    healthy; planned, with a warning naming the failing check, when not (here the drill's
    broken build, live, its /health answering 503: the state file names it current)."""
    if docker_run_host(stack):
        pytest.skip("no compose on a docker-run host: runbook deploy refuses before it asks "
                    "what serves (test_deploy_moves_traffic_and_records_the_schema)")
    env = two_deployments(stack)  # v3 serving from blue; v2 on green, stopped
    with pytest.raises(RunbookError) as healthy:
        deploy.deploy(env, deploy.Options(version=V3.tag), dry_run=True)
    assert "already serves" in healthy.value.message, healthy.value
    stack.arrange(scenes.BROKEN_LIVE)  # the broken build serves from green
    broken = VERSIONS["unhealthy"].tag
    health = drill_http.get(f"{env.slot(Slot.GREEN).base_url}/health", timeout=5)
    assert health.status_code == 503  # the oracle: the slot's own answer
    planned = deploy.deploy(env, deploy.Options(version=broken), dry_run=True)
    assert any("health check fails" in w for w in planned.plan.warnings), planned.plan.warnings


def test_a_rollback_never_takes_the_state_files_current_for_what_serves(
        stack: DrillStack) -> None:
    """The old tooling's rollback swaps current and previous in the state file without
    switching Caddy: the file then calls v2 current while v3 serves. A rollback read "from"
    and "to" from the file: it planned "from v2 (blue) to v3", rebuilt green with v3, the
    very version serving, switched to it and said "rolled back", the users still on v3; and
    `--to v2` was refused as "already the current deployment". What serves decides: without
    --to it refuses (exit 4, naming both versions), `--to v2` rolls back to v2, and `--to v3`
    (serving) is refused."""
    env = two_deployments(stack)  # v3 serving from blue; v2 on green, stopped
    lying = states.read_state(env.state_file, environment=env.name)
    assert lying.current is not None and lying.previous is not None
    # the swap, its current record naming the slot that serves (v3's): found by review, a
    # rollback `--to v2` switched traffic and then failed at every state write ("v2 is
    # already current"), exit 6 for good
    states.write_state(env.state_file, lying.with_(
        current=lying.previous.with_(active_slot=Slot.BLUE), previous=lying.current))
    with pytest.raises(RunbookError) as refused:
        rollback.rollback(env, dry_run=True)
    said = f"{refused.value.message} / {refused.value.fix}"
    assert refused.value.exit_code == ExitCode.PRECONDITION, said
    assert f"says the current deployment is {V2.tag}" in said and f"runs {V3.tag}" in said, said
    assert "--to <version>" in said, said
    with pytest.raises(RunbookError) as serving:
        rollback.rollback(env, rollback.Options(to=V3.tag), dry_run=True)
    assert serving.value.exit_code == ExitCode.PRECONDITION
    assert f"{V3.tag} already serves" in serving.value.message, serving.value.message
    rollback.rollback(env, rollback.Options(to=V2.tag, reason="test: state file lies"))
    assert through_proxy(env) == ("green", V2.tag)
    after = states.read_state(env.state_file, environment=env.name)
    assert after.current is not None and after.current.version == V2.tag
    assert after.current.active_slot == Slot.GREEN


def test_a_rollback_to_rolls_back_from_what_serves_and_writes_what_its_plan_shows(
        stack: DrillStack) -> None:
    """Found by review: with current and previous swapped in the state file (the old
    tooling's rollback, Caddy untouched: v3 still serves from blue), `rollback --to v2` said
    "roll back from v2 (blue)", recorded v2 as what it went back from, promised "previous v2,
    status rolled_back, rollback_count 1", then wrote nothing ("already recorded") while its
    journal still showed the promise. What serves (Docker: blue runs v3) is what it rolls
    back from; what the plan shows is what the file holds afterwards, and the journal's
    state step says what was written."""
    env = two_deployments(stack)  # v3 serving from blue; v2 on green, stopped
    lying = states.read_state(env.state_file, environment=env.name)
    assert lying.current is not None and lying.previous is not None
    states.write_state(env.state_file, lying.with_(current=lying.previous,
                                                   previous=lying.current))
    assert through_proxy(env) == ("blue", V3.tag)  # the oracle: what users get
    v2_count = lying.previous.rollback_count
    planned = rollback.rollback(env, rollback.Options(to=V2.tag), dry_run=True)
    plan = planned.plan
    assert plan.facts["from"] == V3.tag, plan.facts
    assert f"from {V3.tag} (blue) to {V2.tag} (green)" in plan.summary, plan.summary
    shown = next(s for s in plan.steps if s.name == "preflight").details["current"]
    assert f"state file says {V2.tag}" in shown and f"serving {V3.tag}" in shown, shown
    promised = next(s for s in plan.steps if s.name == "state").details
    assert promised["previous"] == f"{V3.tag}, status rolled_back", promised
    assert promised["current"] == (f"{V2.tag} on green, status active, rollback_count "
                                   f"{v2_count + 1}"), promised
    done = rollback.rollback(env, rollback.Options(to=V2.tag, reason="test: swapped file"))
    assert through_proxy(env) == ("green", V2.tag)
    after = states.read_state(env.state_file, environment=env.name)
    assert after.current is not None and after.previous is not None
    assert (after.current.version, after.current.active_slot, after.current.status,
            after.current.rollback_count) == (V2.tag, Slot.GREEN, "active", v2_count + 1)
    assert (after.previous.version, after.previous.status) == (V3.tag, "rolled_back")
    record = json.loads(Path(str(done.record_file)).read_text())
    journaled = next(s for s in record["steps"] if s["name"] == "state")["detail"]
    assert journaled["previous"].startswith(f"{V3.tag}, status rolled_back"), journaled
    assert journaled["current"].startswith(promised["current"]), journaled


def swap_current_and_previous(env: Environment) -> None:
    """What the old tooling's rollback does: current and previous swapped in the state file,
    no container started, Caddy untouched."""
    lying = states.read_state(env.state_file, environment=env.name)
    assert lying.current is not None and lying.previous is not None
    states.write_state(env.state_file, lying.with_(current=lying.previous,
                                                   previous=lying.current))


def test_expect_from_is_judged_by_what_serves_not_by_the_files_current(
        stack: DrillStack) -> None:
    """`--expect-from` (the fleet's pin: what the host's pre-flight saw) compared with the
    state file's current, which the old tooling's rollback swaps without switching: a host
    whose file says v2 while v3 serves was refused as "already rolled back", and one whose
    file says v3 while v2 serves (rolled back since) was rolled again, forward to v3. What
    serves (Docker and the proxy) is what it must match."""
    env = two_deployments(stack)  # v3 serving from blue; v2 on green, stopped
    swap_current_and_previous(env)  # the file says v2; v3 serves
    assert through_proxy(env) == ("blue", V3.tag)  # the oracle: what users get
    rollback.rollback(env, rollback.Options(to=V2.tag, expect_from=V3.tag,
                                            reason="test: expect what serves"))
    assert through_proxy(env) == ("green", V2.tag)
    swap_current_and_previous(env)  # now the file says v3; v2 serves (rolled back since)
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env, rollback.Options(to=V3.tag, expect_from=V3.tag,
                                                reason="test: rolled back since"))
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    said = str(err.value)
    assert f"the current deployment is {V2.tag} (as Caddy runs it; the state file says " \
        f"{V3.tag}), not {V3.tag} as expected" in said, said
    assert "nothing was changed" in said, said
    assert snapshot(env) == before


def test_the_fleets_pin_is_what_serves_so_a_swapped_file_host_still_rolls_back(
        stack: DrillStack) -> None:
    """The fleet pinned each host's `--expect-from` to the state file's current from its
    pre-flight, while the host's rollback compares it with what serves: a host whose file
    the old tooling swapped (v2 said, v3 serving) was refused by its own pin. The pin is what
    the pre-flight's dry run rolls back from."""
    from runbook.fleet import hostcheck, rollout

    env = two_deployments(stack)  # v3 serving from blue; v2 on green, stopped
    swap_current_and_previous(env)  # the file says v2; v3 serves
    seen = hostcheck.check(str(env.source), None, V2.tag)
    assert seen["dry_run"]["ok"], seen
    pin = rollout._pins({"host1": seen}, ["host1"])["host1"]
    assert pin == {"from": V3.tag, "to": V2.tag}, pin
    rollback.rollback(env, rollback.Options(to=pin["to"], expect_from=pin["from"],
                                            reason="test: the fleet's pin"))
    assert through_proxy(env) == ("green", V2.tag)


def test_the_schema_guard_picks_the_snapshot_of_what_serves_not_of_the_files_current(
        stack: DrillStack) -> None:
    """v1, v2 (migrated to 2), a rollback to v1 restoring v2's pre-deploy snapshot, then v3
    (its pre-deploy snapshot at schema 1, migrated to 2): v3 serves and replaced v1 last, so
    `rollback --to v1 --restore-snapshot` restores v3's pre-deploy snapshot. With current and
    previous swapped in the state file (the old tooling's rollback, Caddy untouched), the
    guard reasoned from the file's current (v1 itself) and took the earliest deployment after
    v1 by date, v2, restoring v2's older snapshot: the writes made while v1 served again were
    lost too. It reasons from what serves."""
    from runbook import snapshots

    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2, v1 (schema 1) before
    env = stack.env
    rollback.rollback(env, rollback.Options(restore_snapshot="auto", reason="test: v1 again"))
    deploy_to(stack, env, "v3")
    assert through_proxy(env) == ("green", V3.tag)
    v3 = states.read_state(env.state_file, environment=env.name).find_version(V3.tag)
    assert v3 is not None
    own = [s.name for s in snapshots.own_snapshots(env) if s.deployment_id == v3.id]
    assert len(own) == 1, own  # the oracle: v3's pre-deploy snapshot, by its sidecar
    honest = rollback.rollback(env, rollback.Options(to=V1.tag, restore_snapshot="auto"),
                               dry_run=True)
    assert step_of(honest.plan, "preflight").details["restore"] == own[0]
    swap_current_and_previous(env)  # the file says v1; v3 serves
    assert through_proxy(env) == ("green", V3.tag)
    swapped = rollback.rollback(env, rollback.Options(to=V1.tag, restore_snapshot="auto"),
                                dry_run=True)
    shown = step_of(swapped.plan, "preflight").details
    assert shown["restore"] == own[0], shown
    assert shown["schema judged from"].startswith(f"{V3.tag}, which serves"), shown


def _restoring_rollback(text: str) -> list[str]:
    """The one `runbook rollback ... --restore-snapshot ...` command `text` names, split as
    the shell splits it when on-call pastes it."""
    [command] = re.findall(r"`(runbook rollback [^`]*--restore-snapshot[^`]*)`", text)
    return shlex.split(command)


@pytest.mark.shape_specific
def test_the_schema_guards_refusal_of_a_named_target_names_the_restore_that_goes_there(
        stack: DrillStack) -> None:
    """Found by the on-call walkthrough review: `rollback --to v1` (v2's migration ran after
    v1; v3 serves) was refused, exit 4, with "restore snapshot X and roll back in one go with
    `runbook rollback ENV --restore-snapshot`": typed as given, that rolled back to v2, the
    previous deployment, and restored v3's pre-deploy snapshot instead of X (an outage and a
    lost row in the review). The command named carries `--to v1` and `--snapshot X` (so does
    the refusal `runbook status` shows, rollback.status_plan); typed as given, it goes to v1
    with X restored."""
    if docker_run_host(stack):
        pytest.skip("the rollback to v1 recreates green, which a docker-run host refuses")
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2; v1 (schema 1) before
    env = stack.env
    deploy_to(stack, env, "v3")  # its pre-deploy snapshot at schema 2; v3 serves from blue
    assert through_proxy(env) == ("blue", V3.tag)
    v2 = states.read_state(env.state_file).find_version(V2.tag)
    assert v2 is not None
    # the oracle: v2's pre-deploy snapshot (dumped at v1's schema), by its sidecar's own words
    [x] = [p.name.removesuffix(".meta.json") + ".sql.gz"
           for p in env.database.snapshot_dir.glob("*.meta.json")
           if json.loads(p.read_text()).get("deployment_id") == v2.id]
    before = snapshot(env)
    refused = runbook_cli(env, "rollback", "--to", V1.tag, "--yes")
    assert refused.returncode == ExitCode.PRECONDITION, refused.stderr
    assert "migrations ran after the target deployment" in refused.stderr, refused.stderr
    assert f"restore snapshot {x}" in refused.stderr, refused.stderr
    named = _restoring_rollback(refused.stderr)
    assert named[:3] == ["runbook", "rollback", *shlex.split(command_arg(env))], named
    assert named[3:] == ["--to", V1.tag, "--restore-snapshot", "--snapshot", x], named
    assert snapshot(env) == before
    with pytest.raises(RunbookError) as planned:  # what status names, when it names it
        rollback.status_plan(env, V1.tag)
    assert _restoring_rollback(str(planned.value)) == named, planned.value
    done = subprocess.run([sys.executable, "-m", "runbook.cli", *named[1:], "--yes"],
                          capture_output=True, text=True, timeout=300, check=False,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("green", V1.tag)
    with stack.connect() as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (1,)
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.version == V1.tag
    assert x in done.stdout + done.stderr, done.stdout + done.stderr


@pytest.mark.any_shape  # the snapshot folder and the schema guard: no shape changes them
def test_the_refusal_of_a_named_target_never_names_the_current_deployments_tooling_snapshot(
        stack: DrillStack) -> None:
    """As above (`rollback --to v1`, v3 serving, v2's migration ran after v1), with v3's
    pre-deploy snapshot written by the shell tooling (its sidecar names no schema). Found by
    review: the refusal picked its snapshot from v3's (the current deployment's), not from
    v2's, the one that replaced the target, as `--restore-snapshot` itself does: it named
    v3's, dumped at schema 2, and the command it printed was then refused ("is at schema 2,
    but v1 ran with 1"), a dead end at 3 a.m. It names v2's pre-deploy snapshot."""
    stack.arrange(scenes.MIGRATED)
    env = stack.env
    deploy_to(stack, env, "v3")
    st = states.read_state(env.state_file)
    v2, v3 = st.find_version(V2.tag), st.current
    assert v2 is not None and v3 is not None and v3.version == V3.tag
    sidecars = {json.loads(p.read_text()).get("deployment_id"): p
                for p in env.database.snapshot_dir.glob("*.meta.json")}
    tooling = json.loads(sidecars[v3.id].read_text())
    tooling.pop("migration_version")  # the tooling's sidecar: no schema
    sidecars[v3.id].write_text(json.dumps(tooling))
    x = sidecars[v2.id].name.removesuffix(".meta.json") + ".sql.gz"
    refused = runbook_cli(env, "rollback", "--to", V1.tag, "--yes")
    assert refused.returncode == ExitCode.PRECONDITION, refused.stderr
    assert "migrations ran after the target deployment" in refused.stderr, refused.stderr
    assert f"restore snapshot {x}" in refused.stderr, refused.stderr
    assert _restoring_rollback(refused.stderr)[-2:] == ["--snapshot", x], refused.stderr
    assert through_proxy(env) == ("blue", V3.tag)


def test_a_stopped_database_is_refused_naming_its_start_and_never_force(
        stack: DrillStack) -> None:
    """Found by the on-call walkthrough review: with the database container stopped, the
    rollback's refusal (the schema cannot be read) offered --force; both slots read that
    database, so the forced rollback moved users from one unhealthy release to another and
    marked v3 rolled back. The refusal names `docker start` of the container and no --force;
    nothing changed."""
    env = two_deployments(stack)  # v3 serving blue, v2 stopped on green
    db = stack.db_container
    before = snapshot(env)
    stack.docker("stop", db)
    try:
        refused = runbook_cli(env, "rollback", "--yes")
        state_after = env.state_file.read_bytes()
    finally:
        stack.docker("start", db)
        stack.wait_db()
    said = refused.stderr
    assert refused.returncode == ExitCode.PRECONDITION, said
    assert "the database schema cannot be read" in said, said
    assert f"the database container {db} is exited" in said, said
    assert f"`docker start {db}`" in said, said
    assert "--force" not in said, said
    assert state_after == before["state"]
    assert snapshot(env) == before


def test_a_refusal_after_the_standby_started_is_a_safe_failure_not_nothing_changed(
        stack: DrillStack) -> None:
    """Exit 4 promises "nothing was changed". A refusal met once the run had started the
    standby (here the switch's: the managed block sets no X-Togather-Slot and the app does
    not send it, found only when the serving slot is down) is undone first: the standby
    stopped again, traffic where it was. The slot Caddy points at was stopped before the run
    (the outage the rollback was for), so the run says THE SERVICE IS DOWN, exit 5, not
    exit 1's "traffic stayed on a healthy slot"."""
    env = two_deployments(stack)  # v3 serving from blue; v2 on green, stopped
    text = caddy.read(env)
    bare = text.replace('header_down X-Togather-Slot "blue"', "")
    assert "header_down" not in bare
    write_and_load(env, bare)
    stack.docker("stop", env.slot(Slot.BLUE).container)  # the outage a rollback is for
    with pytest.raises(RunbookError) as failed:
        rollback.rollback(env, rollback.Options(reason="test: refused mid-run"))
    said = failed.value.message
    assert failed.value.exit_code == ExitCode.ATTENTION, said
    assert said.startswith("THE SERVICE IS DOWN: blue, the slot Caddy points at, is not "
                           "running"), said
    assert "before this run began" in said and "this run did not stop it" in said, said
    assert "no header_down X-Togather-Slot" in said and "undone" in said, said
    assert not docker.inspect(env.slot(Slot.GREEN).container).running
    assert caddy.read(env) == bare


def test_switch_puts_a_caddyfile_that_names_the_other_slot_back_in_line(
        stack: DrillStack) -> None:
    """Caddy runs green (a config loaded through the admin API, another tool's killed run)
    while the file names blue: a reload, a restart or a reboot would move the users to blue.
    `runbook switch --slot green` refused ("already takes traffic") and status prescribed a
    hand edit of the managed block. The switch now writes the file back in line with what
    runs and reloads it: the users stay on green throughout, and the state says so."""
    from runbook import health
    from runbook import status as statusmod
    from tests.drill_checks import Poller

    env = two_deployments(stack)  # v3 serving from blue; v2, the previous, on green
    green = env.slot(Slot.GREEN)
    stack.docker("start", green.container)
    health.wait_healthy(env, Slot.GREEN)
    on_disk = caddy.read(env)
    on_green = caddy.rewrite(on_disk, env, Slot.GREEN)
    drill_http.post(f"{env.caddy.admin_url}/load", content=on_green,
                    headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()
    assert through_proxy(env)[0] == "green" and caddy.read(env) == on_disk
    said = [f"{p['problem']} / {p['fix']}" for p in statusmod.gather(env)["problems"]]
    assert any("on disk points at blue but Caddy runs green" in p
               and "--slot green` writes the file back" in p for p in said), said
    with Poller(env) as users:
        switch.switch(env, switch.Options(slot=Slot.GREEN, reason="test: file back in line"))
    assert caddy.read(env) == on_green  # the slot's tokens only, byte for byte otherwise
    assert users.seen and not users.failures, users.failures
    assert {slot for _, slot, _ in users.seen} == {"green"}, "users were moved"
    assert through_proxy(env)[0] == "green"
    after = statusmod.gather(env)
    assert not any("on disk points at" in p["problem"] for p in after["problems"]), after
    state = states.read_state(env.state_file, environment=env.name)
    assert state.current is not None and state.current.active_slot == Slot.GREEN
    assert state.current.version == VERSIONS["v2"].tag
    with pytest.raises(RunbookError) as again:  # in line now: nothing left to switch
        switch.switch(env, switch.Options(slot=Slot.GREEN, reason="test: again"))
    assert "already takes traffic" in again.value.message


def test_a_caddyfile_out_of_line_with_a_serving_slot_that_is_down_is_never_put_back_by_starting_it(
        stack: DrillStack) -> None:
    """Found by review of the test above's fix: with the slot Caddy runs down, the switch
    that puts the file back in line would start that very container (the one Caddy sends
    users to), and on a failed gate its undo could not stop it. Refused (exit 4), naming a
    switch to the other slot; nothing is touched."""
    env = two_deployments(stack)  # v3 serving from blue; v2 on green, stopped
    on_green = caddy.rewrite(caddy.read(env), env, Slot.GREEN)
    drill_http.post(f"{env.caddy.admin_url}/load", content=on_green,
                    headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()
    def untouched() -> tuple[object, ...]:  # snapshot() less the proxy, which answers 502
        return (env.state_file.read_bytes(), env.caddy.caddyfile.read_bytes(),
                traffic.loaded_config(env), env.lock_path.exists(),
                [docker.inspect(env.slot(s).container).status for s in Slot])

    before = untouched()  # Caddy dials green, which is stopped; the file names blue
    with pytest.raises(RunbookError) as refused:
        switch.switch(env, switch.Options(slot=Slot.GREEN, reason="test: serving slot down"))
    assert refused.value.exit_code == ExitCode.PRECONDITION, refused.value.message
    assert "does not answer healthy" in refused.value.message, refused.value.message
    assert "--slot blue" in (refused.value.fix or ""), refused.value.fix
    assert untouched() == before
    assert not docker.inspect(env.slot(Slot.GREEN).container).running


@pytest.mark.any_shape
def test_a_pinned_site_edited_on_disk_but_not_loaded_never_makes_the_serving_slot_look_idle(
        stack: DrillStack) -> None:
    """Caddy runs the app on blue and a site pinned to green; the file on disk has that site
    moved to blue, not loaded yet. Subtracting the file's outside dials from what runs named
    green as serving, and blue (which serves) passed the guard against recreating it."""
    env = two_deployments(stack)  # v3 serving from blue
    blue, green = env.slot(Slot.BLUE).port, env.slot(Slot.GREEN).port
    stack.docker("start", env.slot(Slot.GREEN).container)
    # as many dials as the managed block has (two): with the file's moved to blue, what
    # runs minus the file's outside dials leaves green alone
    running = pin_other_site(env, f"localhost:{green} 127.0.0.1:{green}")
    assert traffic.read(env, proxy=False).slots == {Slot.BLUE}  # file and config agree
    edited = running.replace(f"reverse_proxy localhost:{green} 127.0.0.1:{green}",
                             f"reverse_proxy localhost:{blue} 127.0.0.1:{blue}")
    files.atomic_write(env.caddy.caddyfile, edited.encode())  # not loaded
    assert traffic.read(env, proxy=False).slots == {Slot.BLUE, Slot.GREEN}  # cannot be told
    with pytest.raises(traffic.ServingContainerError):
        traffic.refuse_if_serving(env, Slot.BLUE, "recreate")


@pytest.mark.any_shape
def test_a_run_killed_between_the_caddyfile_write_and_the_reload_is_finished_beside_a_pinned_site(
        stack: DrillStack) -> None:
    """With a site outside the markers pinned to green (so Caddy dials both slots), a
    rollback to green killed once it wrote the Caddyfile and before Caddy loaded it: the
    file's managed block is ahead of what runs. Comparing the whole file with Caddy's config
    made the next run unable to tell which slot serves (exit 4, a slot to pick by hand); the
    same command must finish the rollback."""
    from runbook import faults

    env = two_deployments(stack)  # v3 serving from blue, v2 the previous, stopped on green
    pin_other_site(env, f"localhost:{env.slot(Slot.GREEN).port}")
    assert env.source is not None

    def cli(fault: str | None = None) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
        return subprocess.run([sys.executable, "-m", "runbook.cli", "rollback", "--yes",
                               str(env.source)], capture_output=True, text=True, check=False,
                              timeout=180, stdin=subprocess.DEVNULL,
                              env=environ | ({faults.VARIABLE: fault} if fault else {}))

    first = cli("switch.after-write:SIGKILL")
    assert first.returncode == -9, first.stderr
    assert through_proxy(env) == ("blue", V3.tag)  # Caddy has not loaded the new file
    again = cli()
    assert again.returncode == 0, again.stdout + again.stderr
    assert through_proxy(env) == ("green", V2.tag)


def other_site_answer(stack: DrillStack) -> tuple[int, str]:
    """(HTTP status, version) the drill's other site (outside the slot markers) answers."""
    answer = drill_http.get(f"http://127.0.0.1:{stack.ports.other_site}/version",
                            headers={"Connection": "close"}, timeout=5)
    return answer.status_code, answer.json().get("version", "") \
        if answer.status_code == 200 else ""


def test_a_running_standby_another_site_proxies_to_is_never_recreated(
        stack: DrillStack) -> None:
    """A status page outside the slot markers proxies to green's port; blue serves, green
    runs (stop_old_slot = false). A deploy of a bad build force-recreated green (the status
    page served the unverified build during the gate), the gate failed, the undo stopped
    green: the status page answered 502 and the run said "traffic stays where it is". For a
    recreate such a slot counts as serving: refused before anything changes (exit 4), for a
    deploy and for a rollback that would recreate it. The oracle is the other site itself."""
    if docker_run_host(stack):
        pytest.skip("the deploy and the rollback below recreate through compose")
    env = two_deployments(stack, stop_old_slot=False)  # v3 serving blue, v2 running on green
    green = env.slot(Slot.GREEN)
    pin_other_site(env, f"localhost:{green.port}")

    def other_site() -> tuple[int, str]:
        return other_site_answer(stack)

    assert other_site() == (200, V2.tag)
    kept = container_identity(stack, green.container)
    before = snapshot(env)
    snapshots_before = sorted(env.database.snapshot_dir.glob("*.sql.gz"))
    with pytest.raises(RunbookError) as err:
        deploy.deploy(env, deploy.Options(version=VERSIONS["unhealthy"].tag))
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert "nothing was changed" in err.value.message
    assert f"localhost:{green.port}" in err.value.message  # the other site's dial, named
    assert other_site() == (200, V2.tag)
    assert container_identity(stack, green.container) == kept
    assert sorted(env.database.snapshot_dir.glob("*.sql.gz")) == snapshots_before
    assert snapshot(env) == before
    # a rollback that would recreate it: green runs v3 now (not the previous v2)
    subprocess.run([*compose.base(env), "up", "-d", "--no-deps", "--force-recreate",
                    "--pull", "never", green.service or ""], check=True, capture_output=True,
                   env={**os.environ, "IMAGE_TAG": V3.tag}, timeout=120)
    wait_for(lambda: other_site() == (200, V3.tag))
    kept = container_identity(stack, green.container)
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env)
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert f"localhost:{green.port}" in err.value.message
    assert other_site() == (200, V3.tag)
    assert container_identity(stack, green.container) == kept
    assert snapshot(env) == before
    # and at the act itself (a plan made before the site was pinned)
    with pytest.raises(traffic.ServingContainerError):
        slots.recreate(env, Slot.GREEN, V2.tag)
    assert container_identity(stack, green.container) == kept
    assert through_proxy(env) == ("blue", V3.tag)


@pytest.mark.shape_specific
def test_a_site_proxying_to_another_machine_on_a_slots_port_number_pins_nothing(
        stack: DrillStack) -> None:
    """Found by review: a site outside the markers proxies to a remote service that happens
    to use green's port number (192.0.2.10, TEST-NET-1: Caddy is loaded with it and never
    sent a request there). Counted by port alone, green was pinned: the rollback that
    recreates green was refused (exit 4) and told on-call to repoint an unrelated service.
    Only a dial of this machine is the slot's: the same site dialing host.docker.internal
    (how a Caddy in a container reaches this host) still pins green, refused as before."""
    if docker_run_host(stack):
        pytest.skip("the rollback below recreates through compose")
    env = two_deployments(stack, stop_old_slot=False)  # v3 serving blue, v2 running on green
    green = env.slot(Slot.GREEN)
    # green runs v3: rolling back to v2 recreates it
    subprocess.run([*compose.base(env), "up", "-d", "--no-deps", "--force-recreate",
                    "--pull", "never", green.service or ""], check=True, capture_output=True,
                   env={**os.environ, "IMAGE_TAG": V3.tag}, timeout=120)
    wait_for(lambda: docker.inspect(green.container).running)
    remote = pin_other_site(env, f"192.0.2.10:{green.port}")
    assert f"192.0.2.10:{green.port}" in json.dumps(traffic.loaded_config(env))  # Caddy has it
    assert traffic.read(env, proxy=False).pinned == frozenset()
    dry = runbook_cli(env, "rollback", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "recreate" in dry.stdout and "proxies to it" not in dry.stdout + dry.stderr
    traffic.refuse_recreate_if_pinned(env, Slot.GREEN)  # not refused
    write_and_load(env, remote.replace(f"192.0.2.10:{green.port}",
                                       f"host.docker.internal:{green.port}"))
    assert traffic.read(env, proxy=False).pinned == {Slot.GREEN}
    refused = runbook_cli(env, "rollback", "--dry-run")
    assert refused.returncode == ExitCode.PRECONDITION, refused.stdout + refused.stderr
    assert f"host.docker.internal:{green.port}" in refused.stderr, refused.stderr
    assert through_proxy(env) == ("blue", V3.tag)


def test_an_edit_outside_the_markers_not_loaded_is_said_as_that_never_as_a_blind_switch(
        stack: DrillStack) -> None:
    """Found by review: a site outside the slot markers proxies to green while blue serves,
    and an edit outside the markers sat on disk, not loaded. Which dials are the managed
    block's could not be told, and status said only "Caddy's running config dials both
    slots' ports", with the fix `runbook switch --slot <blue|green>`: a blind choice, whose
    load would take that edit live too. The reason is said (the part outside the markers is
    not what Caddy runs), the refusal stays (exit 4, nothing changed), and the fix names
    the edit, never a switch; loaded, blue is told as serving again."""
    env = two_deployments(stack)  # v3 serving from blue, v2 the previous, stopped on green
    green = env.slot(Slot.GREEN)
    loaded = pin_other_site(env, f"localhost:{green.port}")
    assert traffic.read(env, proxy=False).slot == Slot.BLUE  # told apart: the file is what runs
    edited = loaded.replace(f"reverse_proxy localhost:{green.port}",
                            f"header X-Edited \"1\"\n\treverse_proxy localhost:{green.port}")
    assert edited != loaded
    files.atomic_write(env.caddy.caddyfile, edited.encode())  # on disk only
    try:
        seen = json.loads(runbook_cli(env, "status", "--format", "json").stdout)
        said = [p for p in seen["problems"] if "dials both slots' ports" in p["problem"]]
        assert len(said) == 1, seen["problems"]
        assert (f"{env.caddy.caddyfile} outside the slot markers is not what Caddy runs"
                in said[0]["problem"]), said
        assert "--slot <blue|green>" not in said[0]["fix"] and "edit not loaded" in \
            said[0]["fix"], said
        before = snapshot(env)
        refused = runbook_cli(env, "rollback", "--dry-run")
        assert refused.returncode == ExitCode.PRECONDITION, refused.stdout + refused.stderr
        assert "outside the slot markers is not what Caddy runs" in refused.stderr, \
            refused.stderr
        assert snapshot(env) == before
        load_only(env, edited)  # the edit is meant: loaded as the host reloads
        assert traffic.read(env, proxy=False).slot == Slot.BLUE
        assert through_proxy(env)[0] == "blue"
    finally:
        stack.reset()


@pytest.mark.parametrize("upstream", ["placeholder", "dynamic"])
def test_a_site_outside_the_markers_with_a_runtime_upstream_keeps_both_slots(
        stack: DrillStack, upstream: str) -> None:
    """Found by review: another site, outside the slot markers, whose upstream Caddy
    resolves only per request (a placeholder, `dynamic` upstreams) was invisible: the
    rollback stopped the old slot under it. Which slot it reaches cannot be told from the
    config, so neither may be stopped or recreated: the old slot is left running, saying
    why, and `status` says so. The oracle is the other site itself."""
    env = two_deployments(stack)  # v3 serving from blue, v2 stopped on green
    blue = env.slot(Slot.BLUE).port
    via = ("{http.request.header.X-Legacy-Upstream}" if upstream == "placeholder"
           else f"{{\n\t\tdynamic a localhost {blue}\n\t}}")
    pin_other_site(env, via)
    site = f"http://127.0.0.1:{stack.ports.other_site}/version"

    def other_site() -> tuple[int, str]:
        answer = drill_http.get(site, timeout=5, headers={
            "Connection": "close", "X-Legacy-Upstream": f"localhost:{blue}"})
        return answer.status_code, answer.json().get("version", "") \
            if answer.status_code == 200 else ""

    # a connection the old config's server took as /load swapped them is answered by it
    # (no route: an empty 200), seen once under load: the pinned site, once it serves
    wait_for(lambda: other_site() == (200, V3.tag), timeout=10)
    result = rollback.rollback(env)
    assert through_proxy(env) == ("green", V2.tag)
    assert docker.inspect(env.slot(Slot.BLUE).container).running, result
    assert other_site() == (200, V3.tag)  # still served by blue
    with pytest.raises(traffic.ServingContainerError) as err:
        traffic.refuse_if_serving(env, Slot.BLUE, "recreate")
    assert "resolves only per request" in err.value.message, err.value
    said = [p.problem for p in status.problems(status.collect(env))]
    assert any("resolves only per request" in p for p in said), said


def wait_for(ready: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll until `ready` holds (a container compose has just started)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, "not ready in time"
        time.sleep(0.2)


def test_a_managed_block_on_a_dead_port_is_no_slot_serving_though_another_site_dials_one(
        stack: DrillStack) -> None:
    """Found by review: another site outside the markers proxies to blue's port, and the
    managed block points at a port no slot has (the guide's "Caddyfile targets the wrong
    port"): users get 502, yet blue was taken to serve (subtraction ran only with both slots
    dialed) and `runbook switch --slot blue`, the repair, was refused "nothing to switch"."""
    env = two_deployments(stack)  # v3 serving from blue, v2 stopped on green
    blue = env.slot(Slot.BLUE).port
    text = pin_other_site(env, f"localhost:{blue}")
    start, end = text.index("# BLUE_GREEN_SLOT_START"), text.index("# BLUE_GREEN_SLOT_END")
    dead = closed_port()
    broken = (text[:start] + text[start:end].replace(f"localhost:{blue}", f"localhost:{dead}")
              + text[end:])
    assert broken != text
    write_and_load(env, broken)
    answer = drill_http.get(f"{env.caddy.proxy_url}/version", timeout=5)
    assert answer.status_code == 502  # the oracle: what users get
    found = traffic.read(env)
    assert found.slot is None and Slot.BLUE in found.pinned, found
    switch.switch(env, switch.Options(slot=Slot.BLUE, reason="test: repair the wrong port"))
    assert through_proxy(env) == ("blue", V3.tag)


@pytest.mark.long
def test_a_site_outside_the_markers_that_proxies_to_a_slot_never_hides_which_slot_serves(
        stack: DrillStack) -> None:
    """Another site on the host proxies to blue's port for good (outside the slot markers,
    which a switch never touches). Caddy then dials both slots' ports once green serves; the
    managed block's dials are told from that site's by Caddy's own adapter, so both rollbacks
    go through (before: the first refused to stop blue after its commit, exit 6, and the
    second could not tell which slot serves). The old blue slot that site still proxies to
    is left running, said in the plan and the run (found by review: the rollback stopped it,
    that site answered 502 after "Done", and status said "No problems found"); stopped by
    hand, status names that site's 502. The oracle is the other site's own answer."""
    env = two_deployments(stack)  # v3 serving from blue, v2 the previous, stopped on green
    pinned = pin_other_site(env, f"localhost:{env.slot(Slot.BLUE).port}")
    blue = env.slot(Slot.BLUE).container
    assert other_site_answer(stack) == (200, V3.tag)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        assert env.source is not None
        return subprocess.run([sys.executable, "-m", "runbook.cli", *args, str(env.source)],
                              capture_output=True, text=True, check=False, timeout=180,
                              stdin=subprocess.DEVNULL)

    planned = cli("rollback", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    said = ("another site (or route) outside the slot markers proxies to blue's port "
            f"{env.slot(Slot.BLUE).port}: the switch does not move it, so the old blue slot is "
            "left running")
    assert said in planned.stdout, planned.stdout
    away = cli("rollback", "--yes")
    assert away.returncode == 0, away.stderr
    assert said in away.stderr, away.stderr
    assert "the old blue container is left running: a site outside the slot markers" \
        in away.stderr, away.stderr
    assert through_proxy(env) == ("green", V2.tag)
    assert docker.inspect(blue).running
    assert other_site_answer(stack) == (200, V3.tag)  # that site still served, never 502
    status = json.loads(cli("status", "--format", "json").stdout)
    assert status["traffic"]["slot"] == "green", status["traffic"]
    assert not [p for p in status["problems"] if p["check"] == "pinned_slot_down"], status
    stack.docker("stop", blue)  # on-call stops it by hand: that site answers 502
    assert other_site_answer(stack)[0] == 502
    status = json.loads(cli("status", "--format", "json").stdout)
    down = [p for p in status["problems"] if p["check"] == "pinned_slot_down"]
    assert len(down) == 1 and f"localhost:{env.slot(Slot.BLUE).port}" in down[0]["problem"] \
        and f"{blue} is stopped" in down[0]["problem"], status["problems"]
    back = cli("rollback", "--to", V3.tag, "--yes")  # back on purpose (never unnamed)
    assert back.returncode == 0, back.stderr
    assert "another site outside the slot markers" not in back.stderr  # green stops: not pinned
    assert through_proxy(env) == ("blue", V3.tag)
    assert pinned.split("# BLUE_GREEN_SLOT_START")[0] in env.caddy.caddyfile.read_text()


def test_rolling_back_a_rollback_that_restored_is_refused_onto_the_older_schema(
        stack: DrillStack) -> None:
    """`rollback --restore-snapshot` took v2 back to v1 and the database back to schema 1;
    `runbook rollback --to v2` (on-call undoing it, as a plain rollback's refusal says) made
    v2, which ran with schema 2, the target: the guard checked only a schema NEWER than the
    target's, v2 started on schema 1 (its /health "degraded": pending migrations, which the
    gate passes) and took the traffic without the tables its pages read. Refused, nothing
    changed, naming the deploy that runs its migrations; --force rolls back the code anyway,
    saying so. A switch to the slot of v2 is refused the same way."""
    env = migrated(stack)  # v2 serving from green on schema 2, v1 ran with 1
    restored = rollback.rollback(env, rollback.Options(restore_snapshot="auto"))
    assert restored.outcomes[-1].status == "ok" and through_proxy(env) == ("blue", V1.tag)
    with stack.connect() as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (1,)
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env, rollback.Options(to=V2.tag))
    text = str(err.value)
    assert err.value.exit_code == ExitCode.PRECONDITION, text
    assert "schema is at 1" in text and f"{V2.tag} ran with 2" in text, text
    # the way to put it on with its migrations: `runbook deploy`, or on a docker-run host
    # (no compose, where deploy refuses) the host's own deploy of it
    assert (f"runbook deploy {command_arg(env)} --version {V2.tag}" in text
            or f"run {V2.tag} in the standby slot's container the way this host's own deploy "
               "does" in text), text
    assert snapshot(env) == before
    # `runbook switch --slot green` (v2's slot) starts and serves the same code: refused too
    with pytest.raises(RunbookError) as err:
        switch.switch(env, switch.Options(slot=Slot.GREEN))
    text = str(err.value)
    assert err.value.exit_code == ExitCode.PRECONDITION, text
    assert "schema is at 1" in text and f"{V2.tag} ran with 2" in text, text
    assert snapshot(env) == before
    forced = rollback.rollback(env, rollback.Options(to=V2.tag, force=True))
    assert any("ran with 2" in w for w in forced.plan.warnings), forced.plan.warnings
    assert forced.outcomes[-1].status == "ok" and through_proxy(env) == ("green", V2.tag)


def test_a_switch_on_a_dirty_schema_is_refused_while_planning_as_rollback_and_deploy_are(
        stack: DrillStack) -> None:
    """Found by the "plan equals run" review: on a schema golang-migrate left dirty, `runbook
    switch --slot green` planned as usual (dry run exit 0); the real run started green, timed
    out at its health gate after 30 s ("migration 2 is dirty"), undid the start and exited 1,
    while rollback and deploy refused in planning (exit 4). The switch refuses as they do
    now, dry run and real run alike, with the dirty schema's own problem and repair; its
    --force goes past it as rollback's --force does, saying so; status names no switch.
    Oracle: Postgres' schema_migrations, Docker (the green container never started), Caddy's
    loaded config (GET /config/), the proxy and the files, read back."""
    stack.arrange(scenes.PREVIOUS)  # v3 serves from blue, v2 stopped on green, schema 2
    env = stack.env
    green = env.slot(Slot.GREEN).container

    def started() -> str:
        return stack.docker("inspect", "-f", "{{.State.Status}} {{.State.StartedAt}}",
                            green).stdout.strip()

    with stack.connect() as conn:
        conn.execute("UPDATE schema_migrations SET dirty = true")
    try:
        before, was = snapshot(env), started()
        assert was.startswith("exited "), was  # the premise: green stopped
        running = drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).json()
        rolled = runbook_cli(env, "rollback", "--dry-run")  # what the switch now does too
        assert rolled.returncode == ExitCode.PRECONDITION, rolled.stdout + rolled.stderr
        assert "the database schema is dirty at version 2" in rolled.stderr, rolled.stderr
        for args in (("--dry-run",), ("--yes",)):
            done = runbook_cli(env, "switch", "--slot", "green", *args)
            said = done.stdout + done.stderr
            assert done.returncode == ExitCode.PRECONDITION, (args, said)
            [error] = [line for line in done.stderr.splitlines()
                       if line.startswith("runbook: error:")]
            assert ("the database schema is dirty at version 2: migration 2 failed or was cut "
                    "off part-way") in error, (args, said)
            assert "nothing was changed" in error, (args, said)
            # the dirty schema's own repair, as deploy and status name it, then this switch
            assert f"`runbook snapshot restore {command_arg(env)} FILE`" in error, (args, said)
            assert f"`runbook switch {command_arg(env)} --slot green`" in error, (args, said)
            assert "pass --force to switch anyway" in error, (args, said)
            assert "Health gate" not in said, (args, said)  # refused in planning
            assert started() == was, args  # green never started
            assert snapshot(env) == before, args
            assert drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).json() == running
        # --force, as rollback's: past the dirty schema, said in the plan
        forced = runbook_cli(env, "switch", "--slot", "green", "--force", "--dry-run")
        assert forced.returncode == 0, forced.stdout + forced.stderr
        assert "--force: the database schema is dirty at version 2" in forced.stdout \
            + forced.stderr, forced.stdout + forced.stderr
        assert snapshot(env) == before and started() == was
        # status names no switch (it would be refused) in this state
        problems = json.loads(runbook_cli(env, "status", "--format", "json").stdout)["problems"]
        assert [p for p in problems if p["check"] == "schema_dirty"], problems
        assert not [p for p in problems if "runbook switch" in p["fix"]], problems
    finally:
        with stack.connect() as conn:
            conn.execute("UPDATE schema_migrations SET dirty = false")
    assert through_proxy(env) == ("blue", V3.tag)


def test_a_switch_never_tells_on_call_to_stop_a_slot_another_site_proxies_to(
        stack: DrillStack) -> None:
    """Found by review: green served, another site outside the markers proxied to green's
    port; `runbook switch --slot blue` ended "stop it when that is no longer needed: `docker
    stop ...green`", which would answer that site 502. It says another site proxies to it,
    and not to stop it while it does. Oracle: that site itself, before and after."""
    env = two_deployments(stack)  # v3 serving from blue, v2 stopped on green
    blue = env.slot(Slot.BLUE)
    pin_other_site(env, f"localhost:{blue.port}")

    def other_site() -> tuple[int, str]:
        return other_site_answer(stack)

    assert other_site() == (200, V3.tag)
    done = runbook_cli(env, "switch", "--slot", "green", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("green", V2.tag)
    assert other_site() == (200, V3.tag)  # still served by the old slot
    said = done.stdout + done.stderr
    assert f"docker stop {blue.container}" not in said, said
    assert "do not stop it while it does" in said and f"localhost:{blue.port}" in said, said


def test_a_caddyfile_caddy_rejects_is_refused_by_the_switch_before_anything_changes(
        stack: DrillStack) -> None:
    """Found by review: a typo outside the markers, not reloaded. `switch --dry-run` passed
    ("sites kept: not compared"), and the real switch started and gated the stopped target,
    then failed at the switch step with "check `curl .../config/` answers" (exit 1), Caddy's
    own error never shown. The switch plans as the rollback does: Caddy validates the file
    first, and the refusal (exit 4, nothing changed) names Caddy's error and its line, which
    lies outside the managed block (the rollback said "fix the managed block")."""
    env = two_deployments(stack)  # v3 serving from blue, v2 stopped on green
    text = env.caddy.caddyfile.read_text()
    typo = text.replace('respond /ping "pong" 200', 'respnd /ping "pong" 200')
    assert typo != text
    files.atomic_write(env.caddy.caddyfile, typo.encode())  # not loaded
    line = typo.splitlines().index('\trespnd /ping "pong" 200') + 1
    before = snapshot(env)
    for args in (("switch", "--slot", "green", "--dry-run"), ("switch", "--slot", "green",
                                                              "--yes"),
                 ("rollback", "--dry-run")):
        done = runbook_cli(env, *args)
        said = done.stdout + done.stderr
        assert done.returncode == int(ExitCode.PRECONDITION), (args, said)
        assert "unrecognized directive: respnd" in said, (args, said)
        assert f"line {line} of {env.caddy.caddyfile}" in said, (args, said)
        assert "fix the managed block" not in said, (args, said)
        assert snapshot(env) == before  # green never started, nothing written or loaded
    assert not docker.inspect(env.slot(Slot.GREEN).container).running


def test_a_file_caddy_rejects_at_the_switch_step_is_said_in_caddys_words(
        stack: DrillStack) -> None:
    """The switch step's own check, after the plan validated: a file the Caddyfile imports
    (outside the markers) broke during the health gate. It said "Caddy did not adapt ...
    check `curl .../config/` answers" (which answered), Caddy's own error never shown. It
    says Caddy's error and the imported file's line; traffic stays where it was."""
    import signal

    from runbook import faults
    from tests.drill_checks import wait_stopped

    env = two_deployments(stack)  # v3 serving from blue, v2 stopped on green
    if env.caddy.reload is not envmod.ReloadMethod.ADMIN_API:
        pytest.skip("the switch step compares sites by Caddy's /adapt with the admin API only")
    ping = env.caddy.caddyfile.with_name("ping.caddy")
    ping.write_text('respond /ping "pong" 200\n')
    text = env.caddy.caddyfile.read_text()
    write_and_load(env, text.replace('respond /ping "pong" 200',
                                     f"import {caddy.seen_by_caddy(env, ping)}"))
    assert env.source is not None
    run = subprocess.Popen([sys.executable, "-m", "runbook.cli", "switch", "--slot", "green",
                            "--yes", str(env.source)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                           env={**os.environ, faults.VARIABLE: "before:switch:SIGSTOP"})
    try:
        wait_stopped(run.pid)
        ping.write_text('respnd /ping "pong" 200\n')  # broken during the gate
    finally:
        os.kill(run.pid, signal.SIGCONT)
    out, err = run.communicate(timeout=120)
    assert run.returncode != 0, out + err
    assert "unrecognized directive: respnd" in out + err, out + err
    assert f"line 1 of {caddy.seen_by_caddy(env, ping)}" in out + err, out + err
    assert "config/` answers" not in out + err, out + err
    assert through_proxy(env) == ("blue", V3.tag)


def test_a_restoring_rollbacks_plan_stops_only_what_runs_and_the_restore_stops_the_old_slot(
        stack: DrillStack) -> None:
    """Found by a plan-fidelity review (every Docker API call logged through a proxy): the
    plan of `rollback --restore-snapshot` listed in "Stop the app slots" a container already
    exited, which the run never stops, and showed a drain and a `docker stop` of the old
    serving slot at the end, which the restore had stopped long before (the journal said
    "container: already exited"). The stop step names only the running containers and
    says the serving slot goes down there without a drain; the old slot's step says the
    restore stopped it, at the step the plan numbers, and the run runs exactly those steps."""
    env = migrated(stack)  # v2 serving from green on schema 2; v1 exited on blue
    blue, green = env.slot(Slot.BLUE).container, env.slot(Slot.GREEN).container
    assert docker.inspect(blue).status == "exited" and docker.inspect(green).running
    options = rollback.Options(restore_snapshot="auto")
    dry = rollback.rollback(env, options, dry_run=True)
    planned = {s["name"]: s["details"] for s in dry.plan.to_json()["steps"]}  # as shown
    stop = planned["stop-app-slots"]
    assert green in stop["containers"] and blue not in stop["containers"], stop
    assert any(green in v and "without a drain" in v for v in stop.values()), stop
    shown = dry.plan.render()
    [number] = re.findall(r"^ *(\d+)\. Stop the app slots", shown, re.M)
    old = planned["stop-old-slot"]
    down = f"already stopped by the restore (no drain: it went down at step {number})"
    assert down in old["container"] and down in shown, old
    assert "drain" not in old and "command" not in old, old  # neither happens
    real = rollback.rollback(env, options)
    assert through_proxy(env) == ("blue", V1.tag)
    assert [s.name for s in dry.plan.steps if s.name != "lock"] \
        == [s.name for s in real.plan.steps] == [o.name for o in real.outcomes]
    assert all(o.status in ("ok", "done") for o in real.outcomes), real.outcomes
    assert docker.inspect(green).status == "exited"
    record = json.loads(Path(str(real.record_file)).read_text())
    [ended] = [s for s in record["steps"] if s["name"] == "stop-old-slot"]
    assert ended["detail"]["container"] == "already exited", ended  # never drained or stopped
    assert "drained" not in ended["detail"], ended
    [stopped] = [s for s in record["steps"] if s["name"] == "stop-app-slots"]
    assert stopped["detail"]["stopped"] == green, stopped  # what the plan named, no more


def test_a_restoring_rollbacks_plan_names_a_session_it_cannot_tell_from_the_apps(
        stack: DrillStack) -> None:
    """The plan-fidelity review's session (tests/test_snapshots.py has the standalone
    restore's): a client through the database's published port, which the run would refuse
    only after stopping the serving slot, is named in `rollback --restore-snapshot`'s plan."""
    import psycopg

    env = migrated(stack)
    worker = psycopg.connect(stack.database_url, autocommit=True, connect_timeout=3,
                             application_name="reporting-dashboard")
    try:
        pid = worker.info.backend_pid
        dry = rollback.rollback(env, rollback.Options(restore_snapshot="auto"), dry_run=True)
        named = [w for w in dry.plan.warnings if f"session {pid} " in w]
        assert len(named) == 1 and "'reporting-dashboard'" in named[0], dry.plan.warnings
        assert "--end-sessions" in named[0], named[0]
    finally:
        worker.close()
