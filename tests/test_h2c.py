"""A host whose Caddy also speaks cleartext HTTP/2 (h2c), as behind a load balancer that keeps
HTTP/2 connections to it: Caddy 2.6 never moves the h2c connections it holds to a new config
on a reload (golang/go#26682), so after a switch their requests still reach the old slot.

Measured first (bench/bench_drain.py --h2c): 64 h2c clients, 6 rollbacks, 0.17 raw resets
per switch, but 4562 responses 502 once the drain gave up after 10 s and stopped the old slot
under connections that still used it. The runbook now says so in the plan and leaves the old
slot running for them. The oracle here is what runs: Caddy's answers on the connection that
was open before the switch and on a fresh one, and Docker's view of the old container.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from runbook import deploy, docker, rollback, slots, status, traffic
from runbook.drill import http as drill_http
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot
from runbook.errors import PreconditionError
from tests.drill_checks import host_env, runbook_cli, through_proxy


def test_which_listeners_take_h2c_is_read_from_caddys_json_config() -> None:
    """Caddy's own JSON shapes: no `protocols` is h1 h2 h3 (no h2c); listen addresses come
    as ":port", "host:port", "tcp/host:first-last"."""
    config = {"apps": {"http": {"servers": {
        "srv0": {"listen": [":443"]},
        "srv1": {"listen": ["127.0.0.1:8080", "tcp/[::1]:9000-9009"],
                 "protocols": ["h1", "h2c"]},
        "srv2": {"listen": [":8443"], "protocols": ["h1", "h2"]},
    }}}}
    h2c = traffic.h2c_listens(config)
    assert h2c == ((8080, 8080), (9000, 9009))
    assert traffic.accepts_h2c(h2c, 9005) and traffic.accepts_h2c(h2c, 8080)
    assert not traffic.accepts_h2c(h2c, 443) and not traffic.accepts_h2c(h2c, 8443)
    assert traffic.accepts_h2c(h2c, None)  # Caddy's port unknown: assume the worst
    assert traffic.h2c_listens({}) == () and not traffic.accepts_h2c((), None)


def test_h2c_on_another_port_of_the_app_is_seen_not_only_on_proxy_urls() -> None:
    """The review's case: `proxy_url = "http://localhost"` (port 80) while the app is also
    served on 8443, where Caddy takes h2c (`servers :8443 { protocols h1 h2c }`). Asked
    only about port 80, the stop took the site for h2c-free and stopped the old slot under
    the held h2c connections."""
    route = [{"handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": "localhost:8081"}]}]}]
    config = {"apps": {"http": {"servers": {
        "srv0": {"listen": [":80"], "routes": route},
        "srv1": {"listen": [":8443"], "routes": route, "protocols": ["h1", "h2c"]},
        "other": {"listen": [":9000"], "protocols": ["h1", "h2c"],
                  "routes": [{"handle": [{"handler": "reverse_proxy",
                                          "upstreams": [{"dial": "localhost:3000"}]}]}]},
    }}}}
    found = traffic.from_config(host_env(Path("/nonexistent")), config)
    assert found.fronts == ((80, 80), (8443, 8443))  # not the site proxying to 3000
    assert not traffic.accepts_h2c(found.h2c, 80)
    assert traffic.h2c_port(found, 80) == 8443
    assert traffic.h2c_port(found, 8443) == 8443
    # a site pinned to the other slot (outside the markers) is not where the app is served:
    # it dials green whatever the drain of green waits for
    pinned = json.loads(json.dumps(config))
    pinned["apps"]["http"]["servers"]["status"] = {"listen": [":9100"], "routes": [
        {"handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": "localhost:8082"}]}]}]}
    seen = traffic.from_config(host_env(Path("/nonexistent")), pinned,
                               lambda: Counter({"localhost:8082": 1}))
    assert seen.slots == {Slot.BLUE} and seen.fronts == ((80, 80), (8443, 8443))
    plain = {"apps": {"http": {"servers": {"srv0": {"listen": [":80"], "routes": route}}}}}
    assert traffic.h2c_port(traffic.from_config(host_env(Path("/nonexistent")), plain), 80) \
        is None


@pytest.fixture(scope="module")
def stack() -> Iterator[DrillStack]:
    with DrillStack(shape="h2c") as stack:
        yield stack


def _answer(client: httpx.Client, stack: DrillStack) -> tuple[int, str, str | None, str | None]:
    """(the client's port, so the same connection, HTTP version, slot, version)."""
    return drill_http.version_on(client, stack.env.caddy.proxy_url)


@pytest.mark.docker
@pytest.mark.xdist_group("h2c")
def test_the_plan_says_what_h2c_means_for_the_switch(stack: DrillStack) -> None:
    stack.arrange(scenes.PREVIOUS)
    plan = rollback.rollback(stack.env, dry_run=True).plan
    warning = next(w for w in plan.warnings if "h2c" in w)
    assert f"port {stack.ports.proxy}" in warning and "still reach the old slot" in warning
    assert through_proxy(stack.env)[0] == "blue"  # a dry run changed nothing


@pytest.mark.docker
@pytest.mark.xdist_group("h2c")
def test_without_h2c_connections_the_old_slot_is_stopped_as_usual(stack: DrillStack) -> None:
    stack.arrange(scenes.PREVIOUS)
    rollback.rollback(stack.env)
    assert through_proxy(stack.env) == ("green", VERSIONS["v2"].tag)
    assert docker.inspect(stack.env.slot(Slot.BLUE).container).status == "exited"
    assert not slots.held_marker(stack.env, Slot.BLUE).exists()


@pytest.mark.docker
@pytest.mark.xdist_group("h2c")
def test_a_slow_reading_of_caddys_port_is_waited_for_on_an_h2c_front(
        stack: DrillStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a loaded host one `ss` took 0.2-2.2 s, and the reload went out after 50 ms without
    the reading of Caddy's port from before it: the switch was not watched, so over h2c the
    users' kept-alive connections could not be told from the old config's, and a plain
    rollback with no h2c client at all left the old slot running (review: 2 of 6 under 3 CPU
    hogs), refusing every deploy until a hand stop. Where Caddy takes h2c on the front, the
    reload now waits for that reading. The slow `ss` is simulated (0.4 s on the reading
    before the reload only); Caddy, the users' connections and the drain are real.
    The real `ss` after the 0.4 s can itself take seconds on a loaded host: a reading that
    outlasted the reload's wait for it (H2C_SEAL_WAIT, timed here) rightly leaves the switch
    unwatched and the old slot running, said why; one that did not must never."""
    import time

    from runbook import drain
    from runbook.drill.load import Load

    stack.arrange(scenes.PREVIOUS)
    real, calls, took = drain.front_sockets, [], []

    def slow_first(front: int) -> tuple[set[int], set[drain.Key]] | None:
        calls.append(front)
        if len(calls) > 1:
            return real(front)
        began = time.monotonic()  # the reading before the reload, on a loaded host
        time.sleep(0.4)
        try:
            return real(front)
        finally:
            took.append(time.monotonic() - began)

    monkeypatch.setattr(drain, "front_sockets", slow_first)
    said: list[str] = []
    with Load(stack.env.caddy.proxy_url + "/version", clients=4):
        result = rollback.rollback(stack.env, notify=said.append)
    assert through_proxy(stack.env) == ("green", VERSIONS["v2"].tag)
    stop = next(o for o in result.outcomes if o.name == "stop-old-slot")
    # the wait starts after the reading did: one shorter than it was complete in time
    if stop.result == "left running" and took and took[0] >= drain.H2C_SEAL_WAIT:
        assert any("not complete when the reload went out" in m for m in said), (took, said)
        stack.docker("stop", stack.env.slot(Slot.BLUE).container)  # on-call's fix, as said
        slots.release_held(stack.env, Slot.BLUE)  # the next test starts from no hold
        return
    assert stop.result != "left running", (stop, said, took)
    assert len(calls) >= 2, calls  # the reading before the reload, then the watch of it
    assert docker.inspect(stack.env.slot(Slot.BLUE).container).status == "exited"
    assert not slots.held_marker(stack.env, Slot.BLUE).exists()


@pytest.mark.docker
@pytest.mark.xdist_group("h2c")
def test_an_h2c_connection_from_before_the_switch_keeps_the_old_slot_running(
        stack: DrillStack) -> None:
    stack.arrange(scenes.PREVIOUS)  # v3 live on blue, v2 stopped on green
    env = stack.env
    said: list[str] = []  # what the CLI prints as "runbook: note: ..."
    with drill_http.held_h2c_client() as lb:
        port, *answer = _answer(lb, stack)
        assert answer == ["HTTP/2", "blue", VERSIONS["v3"].tag]
        # the held connection stays busy: the drain waits out its timeout, 2 s here (10 s
        # by default; the cap itself is test_drain's)
        result = rollback.rollback(env.with_(drain_timeout=2.0), notify=said.append)
        # the connection opened before the switch is still served by Caddy's previous config
        assert _answer(lb, stack) == (port, "HTTP/2", "blue", VERSIONS["v3"].tag)
    assert through_proxy(env) == ("green", VERSIONS["v2"].tag)  # a fresh connection moved
    assert docker.inspect(env.slot(Slot.BLUE).container).running  # left running, not cut
    stop = next(o for o in result.outcomes if o.name == "stop-old-slot")
    assert (stop.status, stop.result) == ("ok", "left running")  # the summary: "ok, left running"
    assert any("left running" in m and "h2c" in m and "restart Caddy" in m for m in said)
    assert result.to_json()["notices"] == said  # --format json carries it too
    assert result.log_file is not None
    journal = Path(result.log_file).read_text()
    assert "left running" in journal and "cleartext HTTP/2" in journal


@pytest.mark.docker
@pytest.mark.xdist_group("h2c")
def test_h2c_connections_left_on_a_serving_slot_that_crashed_are_said_after_the_rollback(
        stack: DrillStack) -> None:
    """Found by review: the serving slot crashed (the rollback's main use), on-call rolled
    back: exit 0, "Done", and status "No problems found", while an h2c connection opened
    before the switch got 502 on every request for as long as its client kept it (Caddy's
    previous config keeps it and dials the dead slot). The run says so, with the way to move
    them now; a fresh connection reaches the new slot. The oracle is the held connection's
    own answers."""
    stack.arrange(scenes.PREVIOUS)  # v3 live on blue, v2 stopped on green
    env = stack.env
    said: list[str] = []
    with drill_http.held_h2c_client() as lb:
        port, *answer = _answer(lb, stack)
        assert answer == ["HTTP/2", "blue", VERSIONS["v3"].tag]
        stack.docker("kill", env.slot(Slot.BLUE).container)  # it crashed
        result = rollback.rollback(env, rollback.Options(to=VERSIONS["v2"].tag),
                                   notify=said.append)
        held = lb.get(f"{env.caddy.proxy_url}/version")
        assert (held.http_version, held.status_code) == ("HTTP/2", 502), held
        # the same connection, opened before the switch
        assert held.extensions["network_stream"].get_extra_info("client_addr")[1] == port
    assert through_proxy(env) == ("green", VERSIONS["v2"].tag)  # a fresh connection moved
    stop = next(o for o in result.outcomes if o.name == "stop-old-slot")
    assert stop.status == "ok", stop
    notice = next((m for m in said if "h2c" in m and "warning" not in m), "")
    assert f"port {stack.ports.proxy}" in notice and "get 502 until their clients reconnect" \
        in notice and "restart Caddy" in notice, said
    assert result.to_json()["notices"] == said


@pytest.mark.docker
@pytest.mark.xdist_group("h2c")
def test_a_slot_left_running_for_h2c_connections_is_not_recreated_under_them(
        stack: DrillStack) -> None:
    """A later deploy would recreate that slot (it is the standby now): refused at planning
    and again at the moment of acting, nothing changed; once on-call stopped it, it goes. (A
    running standby nobody left running for h2c is recreated as on any host: the h2c shape
    group runs test_rollback's deploys with both slots running.)"""
    stack.arrange(scenes.PREVIOUS)  # v3 live on blue, v2 stopped on green
    env = stack.env
    blue = env.slot(Slot.BLUE).container
    new = VERSIONS["v3"].tag  # the version rolled back from, as after a fix (v1's schema is older)
    with drill_http.held_h2c_client() as lb:
        port, *_ = _answer(lb, stack)
        began = datetime.now(UTC).replace(microsecond=0)
        rollback.rollback(env.with_(drain_timeout=2.0))  # busy until its timeout: 2 s
        left = docker.inspect(blue)
        assert left.running  # left running for the connection above
        held = json.loads(slots.held_marker(env, Slot.BLUE).read_text())
        assert (held["container"], held["started_at"]) == (blue, left.started_at)
        # when, in UTC with a Z as every file the runbook writes (it was local time, +0100)
        assert held["at"].endswith("Z"), held["at"]
        assert began <= datetime.fromisoformat(held["at"]) <= datetime.now(UTC), held["at"]
        said = [p["problem"] for p in status.gather(env)["problems"]]
        assert any("left running" in p and "h2c" in p and blue in p for p in said), said
        assert not any("it takes no traffic" in p for p in said), said  # it may: h2c
        state = env.state_file.read_bytes()
        loaded = drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).json()
        with pytest.raises(PreconditionError) as refused:
            deploy.deploy(env, deploy.Options(version=new))
        assert f"refusing to recreate {blue}" in refused.value.message
        assert "h2c" in refused.value.message and f"docker stop {blue}" in str(refused.value.fix)
        with pytest.raises(PreconditionError):  # a plan made before it was left running
            slots.recreate(env, Slot.BLUE, new)
        cli = subprocess.run(  # as on-call types it: one line, exit 4 (README, Exit codes)
            [sys.executable, "-m", "runbook.cli", "deploy", str(env.source), "--version", new,
             "--yes"], capture_output=True, text=True, timeout=60, check=False)
        assert cli.returncode == 4, cli.stderr
        assert f"refusing to recreate {blue}" in cli.stderr and "Traceback" not in cli.stderr
        # nothing changed: the held connection is still answered by the same container
        assert _answer(lb, stack) == (port, "HTTP/2", "blue", VERSIONS["v3"].tag)
        assert docker.inspect(blue).started_at == left.started_at
        assert env.state_file.read_bytes() == state
        assert drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).json() == loaded
    docker.stop(blue)  # its users are gone and on-call stopped it, as the message says
    assert not any("left running" in p["problem"] for p in status.gather(env)["problems"])
    deploy.deploy(env, deploy.Options(version=new))
    assert through_proxy(env) == ("blue", new)
    assert docker.inspect(blue).started_at != left.started_at  # recreated this time


@pytest.mark.docker
@pytest.mark.xdist_group("h2c")
def test_another_operators_deploy_never_recreates_a_slot_held_for_h2c(
        stack: DrillStack, tmp_path: Path) -> None:
    """The record that a slot was left running for h2c connections lived under runs_dir,
    `~/.togather/runs` by default: per user. Another operator's deploy (or one under sudo),
    with its own runs_dir, did not see it and recreated the held container under those
    connections. Kept beside the state file, it is every operator's."""
    stack.arrange(scenes.PREVIOUS)  # v3 live on blue, v2 stopped on green
    env = stack.env
    blue = env.slot(Slot.BLUE).container
    new = VERSIONS["v3"].tag
    other = env.with_(runs_dir=tmp_path / "another-operator" / ".togather" / "runs")
    with drill_http.held_h2c_client() as lb:
        port, *_ = _answer(lb, stack)
        rollback.rollback(env.with_(drain_timeout=2.0))  # busy until its timeout: 2 s
        left = docker.inspect(blue)
        assert left.running  # left running for the connection above
        with pytest.raises(PreconditionError) as refused:
            deploy.deploy(other, deploy.Options(version=new))
        assert f"refusing to recreate {blue}" in refused.value.message
        # nothing changed: the held connection is still answered by the same container
        assert _answer(lb, stack) == (port, "HTTP/2", "blue", VERSIONS["v3"].tag)
        assert docker.inspect(blue).started_at == left.started_at


def _stops_offered(env: Environment) -> tuple[list[str], list[str]]:
    """(every `runbook status` problem naming a slot held for h2c, every fix that stops a
    slot's container), as on-call reads them (the CLI, --format json)."""
    done = runbook_cli(env, "status", "--format", "json")
    assert "Traceback" not in done.stderr, done.stderr
    problems = json.loads(done.stdout)["problems"]
    held = [p["problem"] for p in problems if "h2c" in p["problem"]]
    stops = [p["fix"] for p in problems for c in (env.slot(s).container for s in Slot)
             if f"docker stop {c}" in p["fix"]]
    return held, stops


@pytest.mark.docker
@pytest.mark.xdist_group("h2c")
def test_a_slot_held_for_h2c_then_switched_back_to_is_never_offered_to_be_stopped(
        stack: DrillStack) -> None:
    """Found by review: a rollback left the old blue slot running for Caddy's h2c
    connections, then `runbook switch --slot blue` put users back on it; `runbook status`
    still said blue "was left running ... for connections Caddy's previous config held",
    fix `docker stop <blue>`: the container every user reached. Nothing removed the record,
    and status never asked which slot serves. Now status offers no stop of a slot that
    serves (also while a switch killed right after its commit has not removed the record),
    and the run that commits traffic to a slot removes its record (here the rerun that
    finishes the killed switch). Oracle: the proxy, Docker, the record file on disk."""
    stack.arrange(scenes.PREVIOUS)  # v3 live on blue, v2 stopped on green
    env = stack.env
    blue = env.slot(Slot.BLUE).container
    with drill_http.held_h2c_client() as lb:
        _answer(lb, stack)
        rollback.rollback(env.with_(drain_timeout=2.0))  # busy until its timeout: 2 s
    assert docker.inspect(blue).running and slots.held_marker(env, Slot.BLUE).exists()
    assert any(blue in p for p in _stops_offered(env)[0])  # the premise: blue is held
    killed = runbook_cli(env, "switch", "--slot", "blue", "--yes",
                         fault="before:state:SIGKILL")  # after its commit: users on blue
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v3"].tag)
    assert _stops_offered(env) == ([], [])
    finished = runbook_cli(env, "switch", "--slot", "blue", "--yes")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v3"].tag)
    assert not slots.held_marker(env, Slot.BLUE).exists()
    held, stops = _stops_offered(env)
    assert held == [] and not [f for f in stops if f"docker stop {blue}" in f], stops


@pytest.mark.docker
@pytest.mark.xdist_group("h2c")
def test_another_machines_service_on_a_slots_port_is_no_front_of_that_slot(
        stack: DrillStack) -> None:
    """Found by review: another site proxying to another machine's service that happens to
    use green's port number (`reverse_proxy 192.0.2.10:<green's port>`), on a port where
    Caddy takes h2c, was counted as a front of green (matched by port only): the rollback
    to green waited, then left blue running "for h2c connections" although no connection
    of that site ever reaches this machine. Only dials to this machine are fronts. Oracle:
    Docker's view of the old slot, the proxy, what the rollback printed."""
    from runbook import caddy

    stack.arrange(scenes.PREVIOUS)  # v3 live on blue, v2 stopped on green
    env = stack.env
    green = env.slot(Slot.GREEN).port
    text = stack.caddyfile_text(Slot.BLUE, h2c=False)
    elsewhere = text.replace(
        "auto_https off",
        f"auto_https off\n\tservers 127.0.0.1:{stack.ports.other_site} {{\n"
        "\t\tprotocols h1 h2c\n\t}", 1).replace(
        'respond /ping "pong" 200', f"reverse_proxy 192.0.2.10:{green}", 1)
    assert elsewhere.count(f"192.0.2.10:{green}") == 1 and "h2c" in elsewhere
    caddy.apply(env, elsewhere)
    servers = drill_http.get(f"{env.caddy.admin_url}/config/apps/http/servers",
                             timeout=5).json()
    # the premise, as Caddy loaded it: h2c on that site's port alone
    assert [s["listen"] for s in servers.values() if "h2c" in s.get("protocols", ())] \
        == [[f"127.0.0.1:{stack.ports.other_site}"]], servers
    done = runbook_cli(env, "rollback", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("green", VERSIONS["v2"].tag)
    assert docker.inspect(env.slot(Slot.BLUE).container).status == "exited", done.stderr
    assert not slots.held_marker(env, Slot.BLUE).exists()
    assert "h2c" not in done.stdout + done.stderr, done.stdout + done.stderr


def test_a_held_record_where_earlier_versions_kept_it_is_still_honoured(
        tmp_path: Path) -> None:
    """Records written before the move (under runs_dir) still hold their container."""
    env = host_env(tmp_path, name="staging")
    name = env.slot(Slot.BLUE).container
    running = docker.ContainerInfo(name, True, "running", started_at="2026-12-02T05:56:43Z")
    old = env.runs_dir / f"{env.name}.blue.held-for-h2c"
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_text(json.dumps({"container": name, "started_at": running.started_at}))
    with pytest.raises(PreconditionError, match=f"refusing to recreate {name}"):
        slots.refuse_if_held(env, Slot.BLUE, running)


@pytest.mark.docker
@pytest.mark.xdist_group("h2c")
def test_a_run_killed_before_the_stop_is_finished_without_cutting_h2c_connections(
        stack: DrillStack) -> None:
    """The next run finishes a run killed after the switch by stopping the old slot. It did
    not watch that switch, so it cannot tell the old config's h2c connections from the new
    config's (both carry requests after answers): on an h2c Caddy it leaves the slot running."""
    stack.arrange(scenes.PREVIOUS)  # v3 live on blue, v2 stopped on green
    env = stack.env
    blue = env.slot(Slot.BLUE).container
    cli = [sys.executable, "-m", "runbook.cli", "rollback", str(env.source), "--yes"]
    with drill_http.held_h2c_client() as lb:
        before = _answer(lb, stack)
        killed = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=False,
                                env={**os.environ,
                                     "RUNBOOK_DRILL_FAULT": "before:stop-old-slot:SIGKILL"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert through_proxy(env) == ("green", VERSIONS["v2"].tag)  # it took effect
        assert _answer(lb, stack) == before
        finished = subprocess.run(cli, capture_output=True, text=True, timeout=60,
                                  check=False)
        assert finished.returncode == 0, finished.stderr
        assert _answer(lb, stack) == before  # not cut: still the old slot, same connection
        assert docker.inspect(blue).running
        assert "left running" in finished.stderr and f"docker stop {blue}" in finished.stderr
        assert slots.held_marker(env, Slot.BLUE).exists()

def test_the_held_record_matches_only_the_very_container_it_names(tmp_path: Path) -> None:
    """No Docker here: the record against what `docker inspect` would say. A stopped,
    restarted or other container is not held; an unreadable record fails closed."""
    env = host_env(tmp_path, name="staging")
    name = env.slot(Slot.BLUE).container
    running = docker.ContainerInfo(name, True, "running", started_at="2026-12-02T05:56:43Z")
    assert slots.held_record(env, Slot.BLUE, running) is None  # nothing recorded
    marker = slots.held_marker(env, Slot.BLUE)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"container": name, "started_at": running.started_at,
                                  "at": "2026-12-02T05:56:54+0000"}))
    assert slots.held_record(env, Slot.BLUE, running) is not None
    with pytest.raises(PreconditionError, match=f"refusing to recreate {name}"):
        slots.refuse_if_held(env, Slot.BLUE, running)
    restarted = dataclasses.replace(running, started_at="2026-12-02T06:00:00Z")
    stopped = dataclasses.replace(running, status="exited")
    for other in (restarted, stopped):
        assert slots.held_record(env, Slot.BLUE, other) is None
        slots.refuse_if_held(env, Slot.BLUE, other)  # goes ahead
    assert slots.held_record(env, Slot.GREEN, running) is None  # the other slot's record
    marker.write_text("{not json")
    with pytest.raises(PreconditionError, match="cannot read") as unreadable:
        slots.refuse_if_held(env, Slot.BLUE, running)
    assert f"docker stop {name}" in str(unreadable.value.fix)
    slots.refuse_if_held(env, Slot.BLUE, stopped)  # a stopped one needs no record


def test_status_says_which_slot_is_held_or_that_the_record_cannot_be_read(
        tmp_path: Path) -> None:
    env = host_env(tmp_path, name="staging")
    facts = status.Facts(env)
    facts.held = {Slot.GREEN: {"at": "2026-12-02T05:56:54+0000"}}
    facts.held_error = PreconditionError("cannot read /x/staging.blue.held-for-h2c (bad JSON)",
                                         "if it has no users left, `docker stop it`")
    said = {p.problem: p.fix for p in status.problems(facts)}
    held = next(p for p in said if "was left running at 2026-12-02T05:56:54" in p)
    assert env.slot(Slot.GREEN).container in held and "h2c" in held
    assert f"docker stop {env.slot(Slot.GREEN).container}" in said[held]
    assert any(p.startswith("cannot read /x/staging.blue.held-for-h2c") for p in said)


def test_a_quiet_drain_that_could_not_watch_the_h2c_port_never_stops_the_old_slot() -> None:
    """The drain watches proxy_url's port; Caddy may take h2c on another (a load balancer's
    `:8080` beside the users' 80/443), or its port may not be visible here at all (Docker's
    DNAT). A quiet wait of 6.5 s proves nothing about h2c connections, which never close:
    the old slot was stopped under them (502 for the load balancer). Now it is left running,
    as when nothing at all can be observed. The decision's inputs are a drain as `ss` showed
    it; the stop itself over h2c is proved against the drill above."""
    from runbook import drain

    quiet = drain.Drain(port=8082, seconds=6.5, busy=0, front_port=80, front_observed=True,
                        switch_watched=True)
    # h2c on the watched port, the reload watched, nothing left: stopped as usual
    assert slots._held_for_h2c(quiet, True, True, watched=True) is None
    # h2c on a port the drain never watched
    why = slots._held_for_h2c(quiet, True, True, watched=False)
    assert why is not None and "another port" in why
    # Caddy's own port not visible from here: the wait was a guess
    blind = dataclasses.replace(quiet, front_observed=False)
    why = slots._held_for_h2c(blind, True, True, watched=True)
    assert why is not None and "cannot be observed" in why
    # an undo (never switched to) and a Caddy without h2c stay as they were
    assert slots._held_for_h2c(blind, True, False, watched=False) is None
    assert slots._held_for_h2c(blind, False, True, watched=False) is None


def test_h2c_on_a_port_beside_the_watched_one_is_found_and_named_in_the_fix(
        tmp_path: Path) -> None:
    """A global `servers { protocols h1 h2c }` makes the users' port (the one the drain
    watches) AND a load balancer's take h2c: the watched one was found first, so the other's
    held connections were never considered, and the fix told on-call to watch the wrong
    port. Caddy's listens are as its loaded config gives them (traffic.Traffic)."""
    both = traffic.Traffic(slots=frozenset({Slot.GREEN}), dials=(),
                           h2c=((80, 80), (8080, 8080)), fronts=((80, 80), (8080, 8080)))
    assert traffic.unwatched_h2c(both, 80) == 8080
    users_only = traffic.Traffic(slots=frozenset({Slot.GREEN}), dials=(), h2c=((80, 80),),
                                 fronts=((80, 80), (443, 443)))
    assert traffic.unwatched_h2c(users_only, 80) is None  # 443 takes no h2c
    fix = slots.held_fix(host_env(tmp_path), "togather-server-blue", 8080)
    assert "sport = :8080" in fix and "nsenter" in fix, fix


def test_a_drain_held_open_by_something_else_than_connections_says_what_held_it() -> None:
    """The h2c notice said "N connection(s) of Caddy's previous config still open" from the
    drain's busy count, which also holds requests pending on the old slot's port, the old
    slot's port still moving bytes (counted 1), and, when `ss` failed after a good reading,
    the last good one (at least 1): in CI (a loaded 2-core host) the rollback feature's old
    slot was left running with that line, and nothing told which it was. Each is still a
    reason to keep the slot (a failed reading is never quiet), said as what was seen; the
    counts are a drain as `ss` showed it."""
    from runbook import drain

    ended = drain.Drain(port=8082, seconds=10.0, busy=3, front_port=80, front_observed=True,
                        switch_watched=True, front_watched=16, front_closed=13)
    why = slots._held_for_h2c(ended, True, True)
    assert why == "3 connection(s) of Caddy's previous config still open after 10s", why
    # every front connection closed; two requests still pending on the old slot's port
    pending = dataclasses.replace(ended, busy=2, front_closed=16, pending=2)
    why = slots._held_for_h2c(pending, True, True)
    assert why == "2 request(s) still pending on port 8082 after 10s", why
    # nothing open or pending, but bytes moved on the old slot's port at the last reading
    moving = dataclasses.replace(ended, busy=1, front_closed=16)
    why = slots._held_for_h2c(moving, True, True)
    assert why == "bytes still moving on port 8082 after 10s", why
    # `ss` timed out from 4 s on: the last good reading (nothing open) stands
    unread = dataclasses.replace(moving, unread="`ss` timed out after 5s", last_good=4.0)
    why = slots._held_for_h2c(unread, True, True)
    assert why is not None and "connection(s)" not in why, why
    assert "`ss` timed out after 5s" in why and "from 4.0s on" in why, why
