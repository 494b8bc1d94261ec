"""Addresses: the one Caddy dials after a switch, and the one verification asks through.

A slot published on its own address (127.0.0.2, [slots.<slot>] host saying so) passes its
health gate, but the switch keeps the upstream's host (localhost) and only changes the port:
it must be refused before anything moves. A proxy_url naming an address Caddy does not listen
on must be refused too (every switch failed its verification, and its undo's, exit 5), and
status must say so instead of "users are not served".
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from runbook import caddy, docker, health, rollback, slots, status, switch, traffic
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.environment import Environment, Slot
from runbook.errors import ExitCode, RunbookError
from tests.drill_checks import bridge_gateway, snapshot, through_proxy

pytestmark = pytest.mark.xdist_group("addresses")


@pytest.fixture(scope="module")
def stack() -> Iterator[DrillStack]:
    with DrillStack(shape="docker-run") as s:
        yield s


def republish(stack: DrillStack, slot: Slot, address: str) -> Environment:
    """Recreate `slot`'s container from its own image, published on `address` only, and
    return the environment whose [slots.<slot>] host says so."""
    config = stack.env.slot(slot)
    image = docker.inspect(config.container).image
    assert image is not None
    subprocess.run(["docker", "rm", "-f", config.container], check=True, capture_output=True)
    argv = stack.docker_run_argv(slot, image)
    argv[argv.index(f"127.0.0.1:{config.port}:8080")] = f"{address}:{config.port}:8080"
    subprocess.run(argv, check=True, capture_output=True,
                   env={**os.environ, "DATABASE_URL": stack.app_database_url})
    moved = dataclasses.replace(config, host=address)
    deadline = time.monotonic() + 30
    while not health.probe(moved, "/health").ok:
        assert time.monotonic() < deadline, "the republished slot never became healthy"
        time.sleep(0.2)
    return stack.env.with_(slots={**stack.env.slots, slot: moved})


def refused_changing_nothing(env: Environment, runs: tuple[Callable[[], object], ...],
                             *words: str) -> list[RunbookError]:
    """Each run refused before anything changed (exit 4), saying each of `words`; the
    oracle of "nothing changed" is the host's files, Docker and Caddy (snapshot). Returns
    the refusals."""
    before = snapshot(env)
    refusals = []
    for run in runs:
        with pytest.raises(RunbookError) as err:
            run()
        said = str(err.value)
        assert err.value.exit_code == ExitCode.PRECONDITION, said
        for word in words:
            assert word in said, said
        assert snapshot(env) == before
        refusals.append(err.value)
    return refusals


def test_a_target_published_where_the_upstream_does_not_dial_is_refused_before_anything_moves(
        stack: DrillStack) -> None:
    stack.arrange(scenes.PREVIOUS_RUNNING)  # blue v3 serves, green v2 running
    env = republish(stack, Slot.GREEN, "127.0.0.2")
    port = env.slot(Slot.GREEN).port
    try:
        refused_changing_nothing(
            env, (lambda: switch.switch(env, switch.Options(slot=Slot.GREEN), dry_run=True),
                  lambda: switch.switch(env, switch.Options(slot=Slot.GREEN)),
                  lambda: rollback.rollback(env, dry_run=True),
                  lambda: rollback.rollback(env)),
            f"upstream localhost:{port}", "[slots.green] host is 127.0.0.2",
            "nothing was changed")
        assert through_proxy(env)[0] == "blue"
        said = " ".join(p.problem for p in status.problems(status.collect(env)))
        assert f"upstream localhost:{port}" in said and "127.0.0.2" in said, said
        # green stopped: the plan cannot ask it, but Docker says where it is published
        subprocess.run(["docker", "stop", env.slot(Slot.GREEN).container], check=True,
                       capture_output=True)
        refused_changing_nothing(
            env, (lambda: rollback.rollback(env, dry_run=True), lambda: rollback.rollback(env)),
            f"upstream localhost:{port}", f"published on 127.0.0.2:{port} only")
    finally:  # the scene's own container again (arrange recreates a missing one)
        subprocess.run(["docker", "rm", "-f", env.slot(Slot.GREEN).container],
                       check=True, capture_output=True)
        stack.arrange(scenes.PREVIOUS_RUNNING)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_proxy_url_caddy_does_not_listen_on_is_refused_and_status_names_it(
        stack: DrillStack) -> None:
    stack.arrange(scenes.PREVIOUS_RUNNING)
    elsewhere = f"http://127.0.0.1:{free_port()}"
    env = stack.env.with_(caddy=dataclasses.replace(stack.env.caddy, proxy_url=elsewhere))
    before = snapshot(stack.env)
    for run in (lambda: switch.switch(env, switch.Options(slot=Slot.GREEN), dry_run=True),
                lambda: switch.switch(env, switch.Options(slot=Slot.GREEN)),
                lambda: rollback.rollback(env)):
        with pytest.raises(RunbookError) as err:
            run()
        said = str(err.value)
        assert err.value.exit_code == ExitCode.PRECONDITION, said
        assert f"proxy_url {elsewhere}" in said and "[caddy] proxy_url" in said, said
        assert f":{stack.ports.proxy}" in said, said  # where Caddy's site listens
        assert snapshot(stack.env) == before
    text = " ".join(p.problem for p in status.problems(status.collect(env)))
    assert "users are not served" not in text, text
    assert f"proxy_url {elsewhere}" in text, text


def test_a_refused_proxy_url_caddy_does_listen_on_is_an_outage_not_a_wrong_url(
        stack: DrillStack) -> None:
    """Only an address or port neither Caddy's loaded config nor the Caddyfile listens on is
    refused: a proxy_url Caddy listens at that refuses is an outage to roll back from (the
    serving slot healthy, the same read of Caddy otherwise), and so is one the Caddyfile
    listens at while the loaded config moved elsewhere (found by review: users there get
    nothing, and "fix proxy_url" hid it)."""
    stack.arrange(scenes.PREVIOUS_RUNNING)
    env, proxy = stack.env, stack.ports.proxy
    refused = dataclasses.replace(traffic.read(env),
                                  proxy_error=f"{env.caddy.proxy_url}{env.caddy.verify_path}: "
                                              "connection refused")
    for listens in ((f":{proxy}",), (f"127.0.0.1:{proxy}",), (f"tcp/:{proxy - 1}-{proxy}",),
                    (f"127.0.0.2:{proxy}",), (f":{proxy + 1}",)):  # the Caddyfile's :{proxy}
        assert traffic.proxy_url_missed(env, dataclasses.replace(refused, listens=listens)) \
            is None, listens
    elsewhere = f"http://127.0.0.1:{free_port()}"  # neither config listens there
    wrong = env.with_(caddy=dataclasses.replace(env.caddy, proxy_url=elsewhere))
    said = traffic.proxy_url_missed(wrong, dataclasses.replace(
        refused, proxy_error=f"{elsewhere}{env.caddy.verify_path}: connection refused"))
    assert said is not None and f":{proxy}" in said, said
    assert "users are served there" not in said and "users there get no answer" in said, said
    served = dataclasses.replace(
        refused, proxy_error=f"{env.caddy.proxy_url}/version answers HTTP 502 without "
        "X-Togather-Slot", listens=(f"127.0.0.2:{proxy}",))
    assert traffic.proxy_url_missed(env, served) is None  # an answer: Caddy is reached


def test_a_caddy_in_a_container_off_the_host_network_never_blames_proxy_url(
        stack: DrillStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caddy in a container whose port Docker publishes (README "A host with Caddy in a
    container"): its config listens on :80, proxy_url is the published :8080, so a refused
    connection (Docker's DNAT rules dropped) would always look like a wrong proxy_url (found
    by review). Docker's answer for Caddy's container is faked to a bridged one (no host
    network): the drill's Caddy always runs on the host's network, which the drill needs."""
    stack.arrange(scenes.PREVIOUS_RUNNING)
    env = stack.env
    elsewhere = f"http://127.0.0.1:{free_port()}"  # neither config listens there
    wrong = env.with_(caddy=dataclasses.replace(env.caddy, proxy_url=elsewhere))
    refused = dataclasses.replace(
        traffic.read(env), proxy_error=f"{elsewhere}{env.caddy.verify_path}: connection refused")
    assert traffic.proxy_url_missed(wrong, refused) is not None  # on the host's network
    real = docker.inspect
    monkeypatch.setattr(docker, "inspect", lambda name: dataclasses.replace(real(name), bindings=(
        (80, 8080, ""),)) if name == stack.caddy_container else real(name))
    assert traffic.proxy_url_missed(wrong, refused) is None
    monkeypatch.undo()
    compose = wrong.with_(caddy=dataclasses.replace(  # a container the runbook cannot inspect
        wrong.caddy, command=("docker", "compose", "exec", "caddy", "caddy")))
    assert traffic.proxy_url_missed(compose, refused) is None


def test_a_loaded_config_moved_off_proxy_url_is_an_outage_not_a_wrong_url(
        stack: DrillStack) -> None:
    """Found by review: a config loaded by hand that moves Caddy's site to another port,
    while the Caddyfile and proxy_url still name the real one, refuses every user. Status
    said "users are served there" and to change [caddy] proxy_url (a fix that hides the
    outage), and switch/rollback refused with that text. The Caddyfile on disk listens at
    proxy_url: it is an outage, and a rescue is not refused for proxy_url."""
    stack.arrange(scenes.PREVIOUS_RUNNING)  # blue v3 serves, green v2 running
    env, proxy = stack.env, stack.ports.proxy
    moved = free_port()
    bad = env.caddy.caddyfile.with_name("moved.Caddyfile")
    bad.write_text(env.caddy.caddyfile.read_text().replace(f":{proxy}", f":{moved}"))
    caddy_command = [*env.caddy.command, "reload", "--adapter", "caddyfile", "--config"]
    try:
        subprocess.run([*caddy_command, str(bad)], check=True, capture_output=True)
        with pytest.raises(OSError):  # users on the real address get nothing
            socket.create_connection(("127.0.0.1", proxy), timeout=2).close()
        found = status.problems(status.collect(env))
        said = " | ".join(p.problem for p in found)
        fixes = " | ".join(p.fix for p in found)
        assert "users are not served through the proxy" in said, said
        assert "users are served there" not in said, said
        assert "[caddy] proxy_url" not in fixes, fixes
        for run in (lambda: switch.switch(env, switch.Options(slot=Slot.GREEN), dry_run=True),
                    lambda: rollback.rollback(env, dry_run=True)):
            try:
                run()
            except RunbookError as err:  # refused for another reason, never for proxy_url
                assert "[caddy] proxy_url" not in str(err), str(err)
                assert "users are served there" not in str(err), str(err)
    finally:
        subprocess.run([*caddy_command, str(env.caddy.caddyfile)], check=True,
                       capture_output=True)
        bad.unlink(missing_ok=True)
        stack.arrange(scenes.PREVIOUS_RUNNING)


def no_host_docker_internal_here() -> None:
    try:
        socket.getaddrinfo("host.docker.internal", 80)
        pytest.skip("this host resolves host.docker.internal: the check is not needed")
    except OSError:
        pass


@contextlib.contextmanager
def bridged_caddy(stack: DrillStack, add_host: str, *,
                  getent: bool = True) -> Iterator[Environment]:
    """A throwaway container of the drill's Caddy image on Docker's bridge, where
    host.docker.internal leads to `add_host` (as an --add-host or the daemon's
    `host-gateway-ip` makes it), standing in for Caddy's (the drill's own runs on the host's
    network): the environment whose Caddy command is `docker exec` in it. `getent=False`:
    its image has no getent (Caddy's container cannot say where the name leads)."""
    image = docker.inspect(stack.caddy_container).image
    assert image is not None
    name = f"{stack.caddy_container}-bridged"
    subprocess.run(["docker", "run", "-d", "--name", name, "--add-host",
                    f"host.docker.internal:{add_host}", "--entrypoint", "sleep", image, "300"],
                   check=True, capture_output=True)
    try:
        if not getent:
            subprocess.run(["docker", "exec", name, "rm", "-f", "/usr/bin/getent",
                            "/bin/getent"], check=True, capture_output=True)
        yield stack.env.with_(caddy=dataclasses.replace(
            stack.env.caddy, command=("docker", "exec", name, "caddy")))
    finally:
        subprocess.run(["docker", "rm", "-f", name], check=True, capture_output=True)


def publish_green(stack: DrillStack, monkeypatch: pytest.MonkeyPatch,
                  bindings: tuple[tuple[int, int, str], ...] | None) -> None:
    """Docker's answer for green's publication, faked (its bindings): the drill publishes
    its slots on 127.0.0.1 only."""
    green = stack.env.slot(Slot.GREEN)
    real = docker.inspect
    monkeypatch.undo()
    monkeypatch.setattr(docker, "inspect", lambda name: dataclasses.replace(
        real(name), bindings=bindings) if name == green.container else real(name))


def host_docker_internal_text(stack: DrillStack) -> str:
    """The switch's Caddyfile text with its upstreams at host.docker.internal (in memory)."""
    text = caddy.rewrite(stack.env.caddy.caddyfile.read_text().replace(
        "localhost:", "host.docker.internal:"), stack.env, Slot.GREEN)
    assert f"host.docker.internal:{stack.env.slot(Slot.GREEN).port}" in text
    return text


def test_a_slot_caddy_reaches_by_host_docker_internal_is_not_refused(
        stack: DrillStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: Caddy in a container dialing host.docker.internal (which this host
    cannot resolve) was let through only for a slot Docker publishes on every address: one on
    the host's network, or published on the Docker bridge gateway (where the name leads), was
    refused, and with it every switch and rollback, the outage's rescue too. Loopback only
    stays refused (a container never reaches the host's 127.0.0.1). Caddy's container is a
    bridged stand-in where the name leads to the gateway (`host-gateway`, asked for real);
    Docker's answer for the slot is faked (its bindings), and the Caddyfile text is rewritten
    in memory: the drill cannot put its Caddy on Docker's bridge network (it runs on the
    host's, see runbook/drill/stack.py), so no end-to-end dial through host.docker.internal
    is possible."""
    no_host_docker_internal_here()
    stack.arrange(scenes.PREVIOUS_RUNNING)  # blue serves, green v2 running
    green = stack.env.slot(Slot.GREEN)
    text = host_docker_internal_text(stack)
    try:
        with bridged_caddy(stack, "host-gateway") as env:
            for running in (True, False):  # planning: asked of it, or (stopped) of Docker
                for bindings in (None, ((8080, green.port, bridge_gateway()),),
                                 ((8080, green.port, "0.0.0.0"),)):
                    publish_green(stack, monkeypatch, bindings)
                    assert slots.upstream_problem(env, Slot.GREEN, text,
                                                  planning=True) is None, (running, bindings)
                    assert slots.unchecked_upstreams(env, Slot.GREEN, text) == []
                publish_green(stack, monkeypatch, ((8080, green.port, "127.0.0.1"),))
                said = slots.upstream_problem(env, Slot.GREEN, text, planning=True)
                assert said is not None and f"host.docker.internal:{green.port}" in said, running
                monkeypatch.undo()
                stack.docker("stop", green.container)
    finally:
        monkeypatch.undo()
        stack.arrange(scenes.PREVIOUS_RUNNING)


def test_where_host_docker_internal_leads_is_asked_of_caddys_container_else_not_refused(
        stack: DrillStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """host.docker.internal leads where Caddy's container resolves it (the daemon's
    `host-gateway-ip`, an --add-host of another address), asked there for real: a throwaway
    container of the drill's Caddy image on Docker's bridge stands in for Caddy's (the drill's
    own runs on the host's network). Found by review: when Caddy's container cannot be asked
    (no `docker exec` command, no getent in its image), Docker's bridge gateway was taken as
    where the name leads, and a slot published where it really leads was refused (exit 4),
    every switch and rollback with it. That guess only lets a slot published there through:
    else the switch is not refused (before the check it never was) and the plan says it was
    not checked. The slot's publication is faked as in the test above."""
    no_host_docker_internal_here()
    stack.arrange(scenes.PREVIOUS_RUNNING)
    green = stack.env.slot(Slot.GREEN)
    text = host_docker_internal_text(stack)
    unchecked = [f"host.docker.internal:{green.port}"]
    try:
        with bridged_caddy(stack, "10.250.0.1") as env:
            for ip, refused in (("10.250.0.1", False), (bridge_gateway(), True)):
                publish_green(stack, monkeypatch, ((8080, green.port, ip),))
                said = slots.upstream_problem(env, Slot.GREEN, text, planning=True)
                assert (said is not None) is refused, (ip, said)
                assert slots.unchecked_upstreams(env, Slot.GREEN, text) == []
        # not asked: Caddy not run through `docker exec`, or no getent in its image
        no_exec = stack.env.with_(caddy=dataclasses.replace(stack.env.caddy,
                                                            command=("caddy",)))
        with bridged_caddy(stack, "10.250.0.1", getent=False) as no_getent:
            for env in (no_exec, no_getent):
                for ip, not_checked in (("10.250.0.1", unchecked), ("127.0.0.1", unchecked),
                                        (bridge_gateway(), [])):
                    publish_green(stack, monkeypatch, ((8080, green.port, ip),))
                    assert slots.upstream_problem(env, Slot.GREEN, text,
                                                  planning=True) is None, (env.caddy, ip)
                    assert slots.unchecked_upstreams(env, Slot.GREEN, text) == not_checked, \
                        (env.caddy, ip)
        # and Docker not saying where its bridge gateway is: not known either
        monkeypatch.setattr(docker, "bridge_gateways", lambda: None)
        assert slots.upstream_problem(no_exec, Slot.GREEN, text, planning=True) is None
        assert slots.unchecked_upstreams(no_exec, Slot.GREEN, text) == unchecked
    finally:
        monkeypatch.undo()


def test_a_name_caddys_container_cannot_resolve_is_refused_wherever_the_slot_is_published(
        stack: DrillStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: getent's "not found" (exit 2) in Caddy's container was taken as "not
    known" and Docker's bridge gateway guessed instead, so a slot published there (or on
    every address) was let through, and the switch sent every user to a name Caddy cannot
    dial (502s until verification undid it). It is an answer: refused, saying so, before
    anything moves, for a running target or a stopped one (the rollback's rescue). The
    drill's own Caddy (on the host's network, no --add-host) really does not resolve
    host.docker.internal; the slot's publication is faked (the drill publishes on 127.0.0.1
    only)."""
    no_host_docker_internal_here()
    stack.arrange(scenes.PREVIOUS_RUNNING)
    env = stack.env
    green = env.slot(Slot.GREEN)
    text = host_docker_internal_text(stack)
    try:
        for running in (True, False):
            for bindings in (None, ((8080, green.port, bridge_gateway()),),
                             ((8080, green.port, "0.0.0.0"),)):
                publish_green(stack, monkeypatch, bindings)
                said = slots.upstream_problem(env, Slot.GREEN, text, planning=True)
                assert said is not None, (running, bindings)
                assert f"host.docker.internal:{green.port}" in said, said
                assert f"{stack.caddy_container} cannot resolve host.docker.internal" in said, \
                    said
                assert slots.unchecked_upstreams(env, Slot.GREEN, text) == []
            monkeypatch.undo()
            stack.docker("stop", green.container)
    finally:
        monkeypatch.undo()
        stack.arrange(scenes.PREVIOUS_RUNNING)


CADDYFILE_ON_THE_BRIDGE = """\
{{
	admin 0.0.0.0:{admin}
	auto_https off
}}

:{proxy} {{
	# BLUE_GREEN_SLOT_START
	handle {{
		reverse_proxy {host}:{port} {{
			header_down X-Togather-Slot "{slot}"
		}}
	}}
	# BLUE_GREEN_SLOT_END
}}
"""


def publish_also(stack: DrillStack, slot: Slot, address: str) -> None:
    """Recreate `slot`'s container from its own image, published on 127.0.0.1 (where the
    health gate asks it) and on `address` too."""
    config = stack.env.slot(slot)
    image = docker.inspect(config.container).image
    assert image is not None
    subprocess.run(["docker", "rm", "-f", config.container], check=True, capture_output=True)
    argv = stack.docker_run_argv(slot, image)
    at = argv.index(f"127.0.0.1:{config.port}:8080") + 1
    argv[at:at] = ["-p", f"{address}:{config.port}:8080"]
    subprocess.run(argv, check=True, capture_output=True,
                   env={**os.environ, "DATABASE_URL": stack.app_database_url})
    deadline = time.monotonic() + 30
    while not health.probe(config, "/health").ok:
        assert time.monotonic() < deadline, "the republished slot never became healthy"
        time.sleep(0.2)


@contextlib.contextmanager
def caddy_on_the_bridge(stack: DrillStack, network: str = "bridge",
                        upstream: str | None = None) -> Iterator[Environment]:
    """A real Caddy serving the app from a container on Docker's default bridge (not the
    host's network), as on the reviewed host: its upstream host.docker.internal
    (`--add-host host.docker.internal:host-gateway`), its site and admin ports published on
    127.0.0.1, its config directory bind-mounted at /etc/caddy. Blue serves. Yields the
    environment whose [caddy] is that Caddy; the container is removed after. `network`:
    another Docker network (the slots', where their container names resolve); `upstream`:
    blue's upstream as written instead (`togather-server-blue:8080`)."""
    image = docker.inspect(stack.caddy_container).image
    assert image is not None
    name, proxy, admin = f"{stack.caddy_container}-on-bridge", free_port(), free_port()
    folder = stack.run_dir / "caddy-on-bridge"
    folder.mkdir(exist_ok=True)
    caddyfile = folder / "Caddyfile"
    host, port = (upstream.rsplit(":", 1) if upstream is not None
                  else ("host.docker.internal", str(stack.env.slot(Slot.BLUE).port)))
    caddyfile.write_text(CADDYFILE_ON_THE_BRIDGE.format(
        admin=admin, proxy=proxy, host=host, port=port, slot="blue"))
    subprocess.run(["docker", "run", "-d", "--name", name, "--network", network,
                    "--label", f"io.togather.drill.run={stack.run_id}",
                    "--add-host", "host.docker.internal:host-gateway",
                    "-p", f"127.0.0.1:{proxy}:{proxy}", "-p", f"127.0.0.1:{admin}:{admin}",
                    "-v", f"{folder}:/etc/caddy", image, "caddy", "run", "--config",
                    "/etc/caddy/Caddyfile", "--adapter", "caddyfile"],
                   check=True, capture_output=True)
    try:
        env = stack.env.with_(caddy=dataclasses.replace(
            stack.env.caddy, caddyfile=caddyfile, container_path="/etc/caddy/Caddyfile",
            command=("docker", "exec", name, "caddy"), admin_url=f"http://127.0.0.1:{admin}",
            proxy_url=f"http://127.0.0.1:{proxy}"))
        deadline = time.monotonic() + 30
        while True:
            try:
                if through_proxy(env)[0] == "blue":
                    break
            except Exception:  # not listening yet, or no slot header yet
                pass
            assert time.monotonic() < deadline, "the bridged Caddy never served blue"
            time.sleep(0.2)
        yield env
    finally:
        subprocess.run(["docker", "rm", "-f", name], check=True, capture_output=True)


def test_a_loopback_upstream_of_a_caddy_on_dockers_bridge_is_refused_before_anything_moves(
        stack: DrillStack) -> None:
    """Found by review, on a host whose Caddy runs in a container on Docker's bridge
    network (upstreams host.docker.internal:PORT): the refusal of a target published on
    127.0.0.1 only told to write the upstream as 127.0.0.1:PORT, "the address Caddy reaches
    green at" (the health gate's), though in Caddy's container 127.0.0.1 is Caddy itself.
    Done, the dry run passed and the real run switched: 502 for every user for 3 s, then
    undone, exit 1. A loopback upstream can never be the slot for a Caddy off the host's
    network (Docker's answer for its container): refused in the plan, exit 4, nothing
    changed, users still on blue through that Caddy; the fix names the serving slot's
    form (host.docker.internal:PORT), never the gate's loopback address. A real Caddy
    container on the bridge, real slots (blue published on the bridge gateway too, where
    host.docker.internal leads, green on 127.0.0.1 only, as on the reviewed host)."""
    no_host_docker_internal_here()
    stack.arrange(scenes.PREVIOUS_RUNNING)  # blue v3 serves, green v2 running
    publish_also(stack, Slot.BLUE, bridge_gateway())
    green = stack.env.slot(Slot.GREEN).port
    try:
        with caddy_on_the_bridge(stack) as env:
            def runs() -> tuple[Callable[[], object], ...]:
                return (lambda: rollback.rollback(env, dry_run=True),
                        lambda: rollback.rollback(env))

            # green published on 127.0.0.1 only: refused (as before); the fix names the form
            # the serving slot's upstream has, not the gate's address
            for err in refused_changing_nothing(env, runs(), f"host.docker.internal:{green}"):
                assert err.fix is not None and f"host.docker.internal:{green}" in err.fix, \
                    err.fix
                assert f"127.0.0.1:{green}" not in err.fix, err.fix
                assert "[slots.green] host" not in err.fix, err.fix
            # that advice followed the old way: the upstream written as 127.0.0.1 (the file
            # only; Caddy still runs host.docker.internal)
            text = env.caddy.caddyfile.read_text()
            env.caddy.caddyfile.write_text(text.replace("host.docker.internal:", "127.0.0.1:"))
            name = env.caddy.command[2]
            for err in refused_changing_nothing(
                    env, runs(), f"upstream 127.0.0.1:{green}", name, "nothing was changed"):
                assert err.fix is not None and f"host.docker.internal:{green}" in err.fix, \
                    err.fix
                assert f"127.0.0.1:{green}" not in err.fix, err.fix
            assert through_proxy(env)[0] == "blue"
            said = " | ".join(f"{p.problem} {p.fix}"
                              for p in status.problems(status.collect(env)))
            assert f"upstream 127.0.0.1:{green}" in said, said
            # every loopback host; a Caddy whose container cannot be inspected: fail closed
            upstreams = env.caddy.caddyfile.read_text()
            for host in ("localhost", "127.0.0.2", "[::1]"):
                loop = caddy.rewrite(upstreams.replace("127.0.0.1:", f"{host}:"), env,
                                     Slot.GREEN)
                said = slots.upstream_problem(env, Slot.GREEN, loop, planning=True)
                assert said is not None and f"upstream {host}:{green}" in said, (host, said)
            loop = caddy.rewrite(upstreams, env, Slot.GREEN)
            # (a service no running container has: the drill's own Caddy is the compose
            # service "caddy", found by its labels when it runs alone on this engine)
            for command in (("docker", "compose", "exec", f"{name}-service", "caddy"),
                            ("docker", "exec", f"{name}-gone", "caddy")):
                unknown = env.with_(caddy=dataclasses.replace(env.caddy, command=command))
                said = slots.upstream_problem(unknown, Slot.GREEN, loop, planning=True)
                assert said is not None and f"upstream 127.0.0.1:{green}" in said, said
            # Caddy on the host's network (the drill's own container), or on the host: as
            # before, the loopback upstream is the slot
            for caddy_config in (stack.env.caddy, dataclasses.replace(
                    stack.env.caddy, command=("caddy",), container_path=None)):
                host_env = env.with_(caddy=dataclasses.replace(
                    caddy_config, caddyfile=env.caddy.caddyfile))
                assert slots.upstream_problem(host_env, Slot.GREEN, loop,
                                              planning=True) is None, caddy_config
    finally:
        subprocess.run(["docker", "rm", "-f", stack.env.slot(Slot.BLUE).container],
                       check=True, capture_output=True)
        stack.arrange(scenes.PREVIOUS_RUNNING)
