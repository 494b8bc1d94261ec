"""`runbook status`'s printed fixes on hosts unlike the drill, each fix run as printed.

Three host shapes, built for real on the drill stack (caddytruth LOW 5): slots published on
[::1] only with upstreams written `[::1]:PORT`; a Caddy in a container on the slots' Docker
network dialing them by container name (`togather-server-blue:8080`); a Caddy whose admin
API listens elsewhere than Caddy's default (the drill's `admin 127.0.0.1:<port>`, [caddy]
admin_url matching it). On each, a state status reports a problem for, and every fix it
prints (text and --format json) done as it says: the oracle is the proxy, Caddy's admin
API, Docker and `runbook status` run again, never the wording alone.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runbook import caddy, docker, slots
from runbook import environment as envmod
from runbook.drill import http as drill_http
from runbook.drill.stack import DrillStack
from runbook.environment import Environment, Slot
from tests.drill_checks import bridge_gateway, closed_port, through_proxy
from tests.test_addresses import caddy_on_the_bridge, publish_also, republish
from tests.test_status_problems import _load_caddyfile, _run_printed, _typed, status

pytestmark = pytest.mark.docker


def _with_source(env: Environment, tmp_path: Path, name: str) -> Environment:
    """`env` written as an environment file (status and the printed fixes read it)."""
    path = tmp_path / f"{name}.toml"
    env = env.with_(source=path)
    path.write_text(envmod.to_toml(env))
    return env


def _fixes(stack: DrillStack, env: Environment) -> list[dict[str, str]]:
    """The problems status lists through `env`'s file: the same fixes in text and JSON."""
    code, text, problems = status(stack, env.source)
    assert code == 1 and problems, text
    for p in problems:
        assert f"    fix: {p['fix']}" in text, text
    return problems


def _clean(stack: DrillStack, env: Environment) -> None:
    code, text, problems = status(stack, env.source)
    assert (code, problems) == (0, []), text


def _no_refused_command(problems: list[dict[str, str]]) -> None:
    """Every `runbook switch|rollback` a fix names, typed as printed (a placeholder such as
    `<slot>` read as each slot), is planned, never refused: its dry run exits 0."""
    for p in problems:
        for argv in _typed(p["fix"], "runbook switch") + _typed(p["fix"], "runbook rollback"):
            typed = " ".join(argv)
            for one in ([typed.replace(h, s) for s in ("blue", "green")]
                        if (h := next((h for h in ("<slot>", "<blue|green>") if h in typed),
                                      None)) else [typed]):
                planned = _run_printed(one, "--dry-run")
                assert planned.returncode == 0, (p, one, planned.stdout + planned.stderr)


# --- (1) slots published on [::1] only, upstreams [::1]:PORT ------------------------------


@pytest.fixture
def loopback6(stack: DrillStack, tmp_path: Path) -> Iterator[Environment]:
    """Both slots published on [::1] only ([slots] host says so), the managed block's
    upstreams written `[::1]:PORT` and loaded: blue serves. The slots' own containers come
    back after (the next reset recreates the removed ones)."""
    env = stack.env
    for slot in Slot:
        env = env.with_(slots={**env.slots, slot: republish(stack, slot, "[::1]").slot(slot)})
    env = _with_source(env, tmp_path, "loopback6")
    text = caddy.read(env)
    assert "localhost:" in text
    _load_caddyfile(env, text.replace("localhost:", "[::1]:"))
    assert through_proxy(env)[0] == "blue"
    _clean(stack, env)
    try:
        yield env
    finally:
        for slot in Slot:
            subprocess.run(["docker", "rm", "-f", env.slot(slot).container], check=True,
                           capture_output=True)
        stack.reset()


def _block(env: Environment, text: str, upstreams: str, slot: Slot) -> str:
    """`text` with its managed block one reverse_proxy of `upstreams` for `slot`."""
    start, end = caddy.find_block(text)
    return (text[:start] + f"\treverse_proxy {upstreams} {{\n\t\tlb_policy round_robin\n"
            f"\t\theader_down X-Togather-Slot \"{slot}\"\n\t}}\n" + text[end:])


def _pool_fix_serves_blue(env: Environment, original: str, p: dict[str, str]) -> None:
    """The pool fix `p` done as printed (each slot dialed by the form it names, blue's port):
    users get blue, every answer (None: a /health naming no slot, the minimal-health shape)."""
    blue = env.slot(Slot.BLUE)
    form = re.search(r"dial each slot by its own (\S+):<port>", p["fix"])
    assert form is not None, p
    _load_caddyfile(env, _block(env, original, f"{form[1]}:{blue.port}", Slot.BLUE))
    answers = [drill_http.get(f"{env.caddy.proxy_url}/health", timeout=5,
                              headers={"Connection": "close"}) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4, (form[0], p)
    assert {a.json().get("slot") for a in answers} <= {"blue", None}, p
    assert through_proxy(env)[0] == "blue", p


def test_on_a_loopback6_host_the_pool_fix_names_the_slots_own_address(
        stack: DrillStack, loopback6: Environment) -> None:
    """The managed block pools blue's `[::1]:PORT` with green's container address: said,
    with "dial each slot by its own localhost:<port>" as the fix, which there reaches
    nothing (Caddy's localhost is 127.0.0.1, the slots listen on [::1] only: 502 for every
    user). Each fix names the slots' own address; written as printed and loaded (the fix's
    "reload Caddy"), users reach blue alone and status has nothing left to say."""
    env = loopback6
    blue, green = env.slot(Slot.BLUE), env.slot(Slot.GREEN)
    address = next(a for a in docker.inspect(green.container).addresses if a.count(".") == 3)
    original = caddy.read(env)
    _load_caddyfile(env, _block(env, original, f"[::1]:{blue.port} {address}:8080",
                                Slot.BLUE))
    problems = _fixes(stack, env)
    said = [p for p in problems if "dial each slot by its own" in p["fix"]]
    assert {p["check"] for p in said} >= {"dials_the_other_container"}, problems
    _no_refused_command(problems)
    for p in said:
        _pool_fix_serves_blue(env, original, p)
        _clean(stack, env)
        _load_caddyfile(env, _block(env, original, f"[::1]:{blue.port} {address}:8080",
                                    Slot.BLUE))


def test_on_a_loopback6_host_traffic_on_the_standby_is_put_back_as_printed(
        stack: DrillStack, loopback6: Environment) -> None:
    """Caddy pointed at green's [::1] upstream by hand, the state file still saying blue:
    the printed switch back, typed as printed, serves blue through [::1] again."""
    env = loopback6
    blue, green = env.slot(Slot.BLUE), env.slot(Slot.GREEN)
    text = caddy.read(env)
    _load_caddyfile(env, text.replace(f"[::1]:{blue.port}", f"[::1]:{green.port}")
                    .replace('"blue"', '"green"'))
    problems = _fixes(stack, env)
    _no_refused_command(problems)
    back = f"runbook switch {env.source} --slot blue"
    assert any(f"`{back}`" in p["fix"] for p in problems), problems
    done = _run_printed(back, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env)[0] == "blue"
    assert caddy.read(env) == text  # [::1] kept, blue's port back
    _clean(stack, env)


def test_on_a_loopback6_host_the_wrong_port_and_an_edit_not_loaded_are_mended_as_printed(
        stack: DrillStack, loopback6: Environment) -> None:
    """Caddy dialing a dead [::1] port (the guide's "wrong port"): the printed switch
    repairs it on [::1]. The block edited by hand to 127.0.0.1:PORT, not loaded: the fix
    names the edit back to [::1]:PORT at its line, and every other fix keeps [::1]
    (never 127.0.0.1, where no slot listens); done as printed, nothing is left."""
    env = loopback6
    blue = env.slot(Slot.BLUE)
    text = caddy.read(env)
    _load_caddyfile(env, text.replace(f"[::1]:{blue.port}", f"[::1]:{closed_port()}"))
    problems = _fixes(stack, env)
    _no_refused_command(problems)
    repair = f"runbook switch {env.source} --slot blue"
    assert any(f"`{repair}`" in p["fix"] for p in problems), problems
    done = _run_printed(repair, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env)[0] == "blue" and caddy.read(env) == text
    _clean(stack, env)
    line = text[:text.index(f"[::1]:{blue.port}")].count("\n") + 1
    lines = text.split("\n")
    lines[line - 1] = lines[line - 1].replace(f"[::1]:{blue.port}", f"127.0.0.1:{blue.port}")
    env.caddy.caddyfile.write_text("\n".join(lines))  # not loaded
    problems = _fixes(stack, env)
    _no_refused_command(problems)
    drift = next(p for p in problems if p["check"] == "caddyfile_block_differs_from_what_runs")
    assert f"[::1]:{blue.port} instead of 127.0.0.1:{blue.port} at line {line}" in drift["fix"]
    for p in problems:
        assert "[::1]" in p["fix"] and "127.0.0.1:<" not in p["fix"], p
    lines[line - 1] = lines[line - 1].replace(f"127.0.0.1:{blue.port}", f"[::1]:{blue.port}")
    env.caddy.caddyfile.write_text("\n".join(lines))  # the edit back, as printed
    _clean(stack, env)


# --- (2) a Caddy on the slots' Docker network dialing them by container name -------------


@pytest.fixture
def by_name(stack: DrillStack, tmp_path: Path) -> Iterator[Environment]:
    """A real Caddy in a container on the slots' compose network (its site and admin ports
    published on 127.0.0.1, `--add-host host.docker.internal:host-gateway`), its upstream
    blue's container name on the container's port (`togather-server-blue:8080`)."""
    blue = stack.env.slot(Slot.BLUE)
    try:
        with caddy_on_the_bridge(stack, f"{stack.project}_default",
                                 f"{blue.container}:8080") as env:
            yield _with_source(env, tmp_path, "by-name")
    finally:
        subprocess.run(["docker", "rm", "-f", blue.container], check=True, capture_output=True)
        stack.reset()


@pytest.mark.parametrize("dialed", [Slot.BLUE, Slot.GREEN], ids=["recorded", "standby"])
def test_a_caddy_dialing_the_slots_by_container_name_is_told_what_to_write_never_a_refused_switch(
        stack: DrillStack, by_name: Environment, dialed: Slot) -> None:
    """Caddy dials a slot's container by name, blue's (the slot the state file records) or
    green's (traffic on the standby with no record of it). The runbook tells the slots apart
    by the ports they publish, so it reads no slot there: status said "`runbook switch ENV
    --slot <slot>` rewrites it", and every switch is refused (exit 4, "not this host"). The
    fix names no refused command, and says what to write instead (the form a Caddy in a
    container reaches a slot by, here host.docker.internal:PORT with the slot's port
    published where that leads) and the switch that loads it; done as printed, users stay
    on that slot through the new upstream and status says nothing of Caddy."""
    env = by_name
    config = env.slot(dialed)
    text = caddy.read(env)
    if dialed is Slot.GREEN:
        text = text.replace(env.slot(Slot.BLUE).container, config.container).replace(
            '"blue"', '"green"')
        _load_caddyfile(env, text)
    assert through_proxy(env)[0] == str(dialed)
    problems = _fixes(stack, env)
    said = [p for p in problems if p["check"] in ("caddy_problems", "traffic_unclear")]
    assert {p["check"] for p in said} == {"caddy_problems", "traffic_unclear"}, problems
    form = f"host.docker.internal:{config.port}"
    switch = f"runbook switch {env.source} --slot {dialed}"
    # the one command named is the switch that loads the edit (refused before it: exit 4)
    assert {" ".join(a) for p in problems for a in _typed(p["fix"], "runbook ")} == {switch}
    for p in said:
        assert f"{config.container}:8080" in p["problem"] + p["fix"], p
        assert form in p["fix"] and "host-gateway" in p["fix"], p
        assert p["fix"].index(form) < p["fix"].index(f"`{switch}`"), p
    # as printed: the upstream written in that form, the slot published where it leads
    publish_also(stack, dialed, bridge_gateway())
    env.caddy.caddyfile.write_text(text.replace(f"{config.container}:8080", form))
    _no_refused_command(problems)
    done = _run_printed(switch, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env)[0] == str(dialed)
    data = json.loads(_run_printed(f"runbook status {env.source} --format json").stdout)
    assert data["traffic"]["slot"] == str(dialed), data
    assert not [p for p in data["problems"]
                if p["check"] in ("caddy_problems", "traffic_unclear")], data["problems"]
    if dialed is Slot.GREEN:  # no longer blue's container: the reset recreates it
        subprocess.run(["docker", "rm", "-f", config.container], check=True,
                       capture_output=True)


# --- (3) a Caddy whose admin API is not on Caddy's default address ------------------------


@pytest.fixture
def admin_host(stack: DrillStack, tmp_path: Path) -> Iterator[Environment]:
    """The drill's own Caddy: `admin 127.0.0.1:<port>` in its Caddyfile, [caddy] admin_url
    matching it. Put back after by a restart on the stack's own Caddyfile (a test may have
    moved the admin API away from admin_url, where the reset loads)."""
    text = caddy.read(stack.env)
    assert f"admin 127.0.0.1:{stack.ports.admin}" in text
    assert stack.env.caddy.admin_url == f"http://127.0.0.1:{stack.ports.admin}"
    try:
        yield _with_source(stack.env, tmp_path, "admin")
    finally:
        stack.env.caddy.caddyfile.write_text(text)
        subprocess.run(["docker", "restart", stack.caddy_container], check=True,
                       capture_output=True)
        stack.wait_caddy()
        stack.reset()


@pytest.mark.parametrize(("moved", "bom"), [("unix", ""), ("tcp", ""), ("off", ""),
                                           ("tcp", "\ufeff")])
def test_an_admin_api_moved_off_admin_url_is_given_back_as_printed(
        stack: DrillStack, admin_host: Environment, moved: str, bom: str) -> None:
    """The Caddyfile's `admin` edited (to a unix socket, another TCP port, or off) and
    loaded by hand: Caddy serves, its admin API no longer answers at [caddy] admin_url. The
    fix said "give Caddy a TCP admin address (`admin localhost:2019` ...)": Caddy's default,
    not the address the environment file names, and no way to load it (Caddy's admin API
    has moved). It names the address admin_url gives, and the `caddy reload` through where
    Caddy's admin API listens now (with `admin off`, the restart: no reload can reach it);
    done as printed, admin_url answers again and status has nothing to say. Also with a
    Caddyfile that starts with a UTF-8 byte order mark, which Caddy skips (found by review:
    its global options went unread, and the fix named Caddy's default localhost:2019)."""
    env = admin_host
    admin = f"127.0.0.1:{stack.ports.admin}"
    where = {"unix": f"unix/{stack.caddy_mount}/admin.sock", "off": "off",
             "tcp": f"127.0.0.1:{closed_port()}"}[moved]
    text = caddy.read(env)
    edited = bom + text.replace(f"admin {admin}", f"admin {where}")
    _load_caddyfile(env, edited)
    assert through_proxy(env)[0] == "blue"  # Caddy serves
    problems = _fixes(stack, env)
    _no_refused_command(problems)
    [said] = [p for p in problems if "admin API does not answer" in p["problem"]]
    assert "2019" not in said["fix"], said
    assert f"`admin {admin}`" in said["fix"], said
    if moved == "off":
        [load] = _typed(said["fix"], "docker restart")
        assert load == ["docker", "restart", stack.caddy_container], load
    else:
        [load] = _typed(said["fix"], shlex.join(env.caddy.command))
        assert load[-2:] == ["--address", where], load
    env.caddy.caddyfile.write_text(edited.replace(f"admin {where}", f"admin {admin}"))
    done = subprocess.run(load, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    stack.wait_caddy()  # a restart takes a moment; a reload has answered already
    assert drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).status_code == 200
    assert through_proxy(env)[0] == "blue"
    _clean(stack, env)


def test_an_admin_api_moved_with_the_other_slot_in_the_file_keeps_the_serving_slot(
        stack: DrillStack, admin_host: Environment) -> None:
    """Found by review (HIGH): blue serves, green's container is stopped, the Caddyfile's
    managed block was edited to green and never loaded, and Caddy's admin API was moved off
    admin_url. Status's fix said "write the admin line and load it": followed, the load took
    the block too and moved every user to the stopped green (502 until a switch back). Now
    the fix says the block names green while blue serves and gives the lines that put it
    back first; followed as printed (those lines, the admin line, the reload as typed), blue
    still serves. Oracle: the proxy's answer and Caddy's admin API."""
    env = admin_host
    admin = f"127.0.0.1:{stack.ports.admin}"
    where = f"127.0.0.1:{closed_port()}"
    text = caddy.read(env)
    moved = text.replace(f"admin {admin}", f"admin {where}")
    _load_caddyfile(env, moved)  # blue's block, the admin API elsewhere: what runs
    on_disk = green_on_disk_only(stack, env, moved)
    problems = _fixes(stack, env)
    [said] = [p for p in problems if "admin API does not answer" in p["problem"]]
    [load] = _typed(said["fix"], shlex.join(env.caddy.command))
    assert load[-2:] == ["--address", where], load
    # as printed: each line the fix gives (kept where it stands), the admin line, the load
    lines = with_printed_lines(on_disk, said["fix"]).split("\n")
    env.caddy.caddyfile.write_text(
        "\n".join(lines).replace(f"admin {where}", f"admin {admin}"))
    done = subprocess.run(load, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).status_code == 200
    answer = drill_http.get(f"{env.caddy.proxy_url}/version", timeout=5,
                            headers={"Connection": "close"})
    assert (answer.status_code, answer.headers.get("X-Togather-Slot")) == (200, "blue"), \
        said["fix"]
    assert "names green while blue serves" in said["fix"], said
    assert said["fix"].index("line ") < said["fix"].index(f"`admin {admin}`"), said


def green_on_disk_only(stack: DrillStack, env: Environment, loaded: str) -> str:
    """`loaded` (what Caddy runs, blue serving) on disk with its block edited to green, never
    loaded, and green stopped: returns that text."""
    stack.docker("stop", env.slot(Slot.GREEN).container)
    on_disk = caddy.rewrite(loaded, env, Slot.GREEN)
    env.caddy.caddyfile.write_text(on_disk)
    assert through_proxy(env)[0] == "blue"
    return on_disk


def with_printed_lines(text: str, fix: str) -> str:
    """`text` with each `line N: `...`` a fix prints written in place of line N, kept where
    it stands (its indentation), as on-call follows it."""
    lines = text.split("\n")
    for number, written in re.findall(r"line (\d+): `([^`]*)`", fix):
        old = lines[int(number) - 1]
        lines[int(number) - 1] = old[:len(old) - len(old.lstrip())] + written
    return "\n".join(lines)


def test_a_reload_a_fix_names_with_the_other_slot_in_the_file_keeps_the_serving_slot(
        stack: DrillStack, admin_host: Environment) -> None:
    """The same hazard where Caddy's admin API answers: another site's upstream Caddy
    resolves per request (a placeholder), whose fix says "give it a literal address, reload
    Caddy", while the file's managed block was edited to the stopped green, never loaded.
    Followed as printed, the reload took the block too (502). Now that fix gives first the
    lines that put the block back to blue; done as printed, blue still serves."""
    env = admin_host
    admin = f"127.0.0.1:{stack.ports.admin}"
    text = caddy.read(env)
    placeholder = text.replace('respond /ping "pong" 200',
                               "reverse_proxy {http.request.header.X-Up}")
    assert placeholder != text
    _load_caddyfile(env, placeholder)
    on_disk = green_on_disk_only(stack, env, placeholder)
    problems = _fixes(stack, env)
    [said] = [p for p in problems if p["check"] == "upstream_unresolved"]
    assert "reload Caddy" in said["fix"], said
    # as printed: each line the fix gives, that site's literal address, then the reload
    lines = with_printed_lines(on_disk, said["fix"]).split("\n")
    env.caddy.caddyfile.write_text("\n".join(lines).replace(
        "{http.request.header.X-Up}", f"127.0.0.1:{closed_port()}"))
    reload = [*env.caddy.command, "reload", "--config",
              caddy.seen_by_caddy(env, env.caddy.caddyfile), "--adapter", "caddyfile",
              "--address", admin]
    done = subprocess.run(reload, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    answer = drill_http.get(f"{env.caddy.proxy_url}/version", timeout=5,
                            headers={"Connection": "close"})
    assert (answer.status_code, answer.headers.get("X-Togather-Slot")) == (200, "blue"), \
        said["fix"]
    assert "names green while blue serves" in said["fix"], said


@pytest.fixture
def resumed_caddy(stack: DrillStack, admin_host: Environment) -> Iterator[Environment]:
    """The drill's Caddy replaced by one started `caddy run --config ... --resume` (same
    image, host network, Caddyfile mount), [caddy] command naming it; removed after, the
    drill's own started again (admin_host's teardown restarts it)."""
    name = f"{stack.caddy_container}-resume"
    image = docker.inspect(stack.caddy_container).image
    assert image is not None
    subprocess.run(["docker", "stop", stack.caddy_container], check=True, capture_output=True)
    try:
        subprocess.run(["docker", "run", "-d", "--name", name, "--network", "host", "-v",
                        f"{stack.caddy_dir}:{stack.caddy_mount}", image, "caddy", "run",
                        "--config", f"{stack.caddy_mount}/Caddyfile", "--adapter",
                        "caddyfile", "--resume"], check=True, capture_output=True)
        stack.wait_caddy()
        env = admin_host.with_(caddy=dataclasses.replace(
            admin_host.caddy, command=("docker", "exec", name, "caddy")))
        assert env.source is not None
        env.source.write_text(envmod.to_toml(env))
        yield env
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True, check=False)


def test_admin_off_under_caddy_run_resume_is_given_back_as_printed(
        stack: DrillStack, resumed_caddy: Environment) -> None:
    """Found by review (MEDIUM): Caddy started with `caddy run --resume`, `admin off` loaded
    (Caddy autosaves it). The fix said "write the admin line, then `docker restart`": the
    restart loads autosave.json, not the Caddyfile, so the admin API stayed off and the fix
    repeated forever. Now it names --resume and the autosave file to move aside; done as
    printed, the admin API answers at admin_url and blue still serves."""
    env = resumed_caddy
    admin = f"127.0.0.1:{stack.ports.admin}"
    text = caddy.read(env)
    off = text.replace(f"admin {admin}", "admin off")
    _load_caddyfile(env, off)  # autosaved by Caddy: what --resume loads
    assert through_proxy(env)[0] == "blue"
    problems = _fixes(stack, env)
    [said] = [p for p in problems if "admin API does not answer" in p["problem"]]
    env.caddy.caddyfile.write_text(text)  # the admin line, as the fix says
    for command in _typed(said["fix"], "docker "):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 0, (command, done.stdout + done.stderr)
    stack.wait_caddy()
    assert drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).status_code == 200, \
        said["fix"]
    assert through_proxy(env)[0] == "blue"


def test_a_stopped_caddy_on_a_non_default_admin_address_is_started_as_printed(
        stack: DrillStack, admin_host: Environment) -> None:
    """Caddy's container stopped: every fix names starting it and asking admin_url (never
    Caddy's default address); done as printed, Caddy answers there and serves blue."""
    env = admin_host
    stack.docker("stop", stack.caddy_container)
    problems = _fixes(stack, env)
    assert "2019" not in json.dumps(problems), problems
    [start] = {tuple(a) for p in problems for a in _typed(p["fix"], "docker start")}
    assert start == ("docker", "start", stack.caddy_container), start
    subprocess.run(start, check=True, capture_output=True, timeout=60)
    stack.wait_caddy()
    [curl] = {tuple(a) for p in problems for a in _typed(p["fix"], "curl ")}
    assert curl == ("curl", f"{env.caddy.admin_url}/config/"), curl
    assert subprocess.run(curl, capture_output=True, timeout=30).returncode == 0
    assert through_proxy(env)[0] == "blue"
    _clean(stack, env)


# --- (4) upstreams that miss the slot, as Caddy dials them from where it runs -------------
# Left open by ea25c9d (its three shapes): the words built where Caddy's network cannot be
# seen (runbook/caddy/text.py) still said localhost:<port>, and a [::1]-only slot dialed at
# localhost was blamed on "the proxy".

_FORM = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(<port>|\d+)")


def _written_as(fix: str, port: int) -> str:
    """The first upstream a fix names (`host:<port>` or `host:PORT`), with `port`."""
    form = _FORM.search(fix)
    assert form is not None, fix
    return f"{form[1]}:{port}"


def test_a_switch_refused_for_a_caddy_dialing_a_container_name_names_what_reaches_the_slot(
        stack: DrillStack, by_name: Environment) -> None:
    """`runbook switch ENV --slot green` while Caddy, on the slots' Docker network, dials
    blue's container by name: refused (exit 4: the runbook tells the slots apart by their
    published ports only), nothing changed. Its fix said "proxy to the slots' published
    ports on this host (localhost:<port>)": in Caddy's container localhost is Caddy itself,
    so the switch run again on that upstream was refused once more (or would serve 502).
    It names the form that reaches green's published port from Caddy's container
    (host.docker.internal:PORT, the add-host, the publish); written as printed, the same
    switch moves users to green through it."""
    env = by_name
    blue, green = env.slot(Slot.BLUE), env.slot(Slot.GREEN)
    text = caddy.read(env)
    switch = f"runbook switch {env.source} --slot green"
    refused = _run_printed(switch, "--yes", "--format", "json")
    said = json.loads(refused.stdout)
    assert refused.returncode == 4 and "not this host" in said["error"], said
    assert caddy.read(env) == text and through_proxy(env)[0] == "blue"  # nothing changed
    fix = said["fix"]
    assert "localhost" not in fix and "host-gateway" in fix, fix
    assert "\n" not in said["error"] + fix, said  # one line, as before
    try:
        # as printed: green published where that leads from Caddy's container, the upstream
        # between the markers written in that form, the same switch run again
        publish_also(stack, Slot.GREEN, bridge_gateway())
        env.caddy.caddyfile.write_text(
            text.replace(f"{blue.container}:8080", _written_as(fix, green.port)))
        done = _run_printed(switch, "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        answers = [drill_http.get(f"{env.caddy.proxy_url}/health", timeout=5,
                                  headers={"Connection": "close"}) for _ in range(4)]
        assert [a.status_code for a in answers] == [200] * 4, fix
        assert through_proxy(env)[0] == "green"
    finally:  # no longer as the drill made it: the reset recreates it
        subprocess.run(["docker", "rm", "-f", green.container], check=True,
                       capture_output=True)


@pytest.fixture
def off_host(stack: DrillStack, tmp_path: Path) -> Iterator[Environment]:
    """A real Caddy in a container on the slots' compose network (not the host's), its
    upstream host.docker.internal:PORT (`--add-host host.docker.internal:host-gateway`),
    blue published on Docker's bridge gateway too, where that name leads: blue serves."""
    blue = stack.env.slot(Slot.BLUE)
    try:
        publish_also(stack, Slot.BLUE, bridge_gateway())
        with caddy_on_the_bridge(stack, f"{stack.project}_default") as env:
            yield _with_source(env, tmp_path, "off-host")
    finally:
        subprocess.run(["docker", "rm", "-f", blue.container], check=True, capture_output=True)
        stack.reset()


def test_a_pool_fix_for_a_caddy_off_the_hosts_network_names_what_reaches_the_slots_from_it(
        stack: DrillStack, off_host: Environment) -> None:
    """Caddy in a container off the host's network pools blue's host.docker.internal:PORT
    with green's container address in the managed block. The Caddyfile problem's fix (built
    where Caddy's network cannot be seen) said "dial each slot by its own localhost:<port>":
    in Caddy's container that is Caddy itself, 502 for every user who wrote it. Every fix
    names the form that reaches a slot from Caddy's container; written as printed and loaded,
    users reach blue alone and status says nothing of the block."""
    env = off_host
    blue, green = env.slot(Slot.BLUE), env.slot(Slot.GREEN)
    address = next(a for a in docker.inspect(green.container).addresses if a.count(".") == 3)
    original = caddy.read(env)
    pooled = _block(env, original, f"host.docker.internal:{blue.port} {address}:8080",
                    Slot.BLUE)
    _load_caddyfile(env, pooled)
    problems = _fixes(stack, env)
    said = [p for p in problems if "dial each slot by its own" in p["fix"]]
    assert {p["check"] for p in said} >= {"caddy_problems", "dials_the_other_container"}, \
        problems
    _no_refused_command(problems)
    for p in said:
        _pool_fix_serves_blue(env, original, p)
        data = json.loads(_run_printed(f"runbook status {env.source} --format json").stdout)
        assert not [q for q in data["problems"] if q["check"] in
                    ("caddy_problems", "dials_the_other_container")], data["problems"]
        _load_caddyfile(env, pooled)


def _dialed(env: Environment) -> str:
    """The host the loopback6_by_localhost premise dials: localhost where it is 127.0.0.1
    alone, else 127.0.0.1."""
    import socket

    found = {i[0] for i in socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)}
    return "localhost" if found == {socket.AF_INET} else "127.0.0.1"


@pytest.fixture
def loopback6_by_localhost(stack: DrillStack, tmp_path: Path) -> Iterator[Environment]:
    """Both slots published on [::1] only ([slots] host says so), the Caddyfile's upstreams
    still `localhost:PORT` and loaded: Caddy's localhost is 127.0.0.1 (this host's
    /etc/hosts), where no slot listens. Where /etc/hosts has `::1 localhost` too (GitHub's
    runners), Go falls back to ::1 and nothing misses: there the upstream is written
    `127.0.0.1:PORT`, the same miss (found by review)."""
    env = stack.env
    try:
        for slot in Slot:
            env = env.with_(slots={**env.slots,
                                   slot: republish(stack, slot, "[::1]").slot(slot)})
        if _dialed(env) != "localhost":
            _load_caddyfile(env, _block(env, caddy.read(env),
                                        f"127.0.0.1:{env.slot(Slot.BLUE).port}", Slot.BLUE))
        yield _with_source(env, tmp_path, "loopback6-localhost")
    finally:
        for slot in Slot:
            subprocess.run(["docker", "rm", "-f", env.slot(slot).container], check=True,
                           capture_output=True)
        stack.reset()


def test_on_a_loopback6_host_a_localhost_upstream_is_said_to_miss_the_slot_and_mended_as_printed(
        stack: DrillStack, loopback6_by_localhost: Environment) -> None:
    """Slots on [::1] only, Caddy dialing localhost:PORT: every user gets 502 while blue
    answers healthy at [::1]:PORT. Status said "the proxy, not the slot, fails" and sent
    on-call to Caddy's transport settings. It names the cause (the upstream's address does
    not reach the slot, which listens on [::1]) and the fix: [::1]:PORT written at the
    upstream's lines and loaded with the command it prints; done as printed, users reach
    blue and status has nothing left to say."""
    env = loopback6_by_localhost
    blue = env.slot(Slot.BLUE)
    assert drill_http.get(f"{env.caddy.proxy_url}/health", timeout=5).status_code == 502
    problems = _fixes(stack, env)
    _no_refused_command(problems)
    [said] = [p for p in problems if p["check"] == "proxy_unanswered"]
    dialed = f"{_dialed(env)}:{blue.port}"
    assert "the proxy, not the slot, fails" not in said["problem"], said
    assert dialed in said["problem"], said
    assert f"[::1]:{blue.port}" in said["problem"], said
    edit = re.search(r"write (\S+) in place of (\S+) at lines? ([\d, ]+?) of (\S+) ",
                     said["fix"])
    assert edit is not None, said
    assert (edit[1], edit[2], edit[4]) == (f"[::1]:{blue.port}", dialed,
                                           str(env.caddy.caddyfile)), said
    # as printed: the edit at those lines, then the load command it names
    lines = caddy.read(env).split("\n")
    for line in (int(n) for n in edit[3].split(", ")):
        assert edit[2] in lines[line - 1], (line, lines[line - 1])
        lines[line - 1] = lines[line - 1].replace(edit[2], edit[1])
    env.caddy.caddyfile.write_text("\n".join(lines))
    # the drill's Caddy is an admin-api one: the load a run makes, POST /load
    [load] = _typed(said["fix"], "curl -fsS -X POST")
    done = subprocess.run(load, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    answers = [drill_http.get(f"{env.caddy.proxy_url}/health", timeout=5,
                              headers={"Connection": "close"}) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4, said
    assert through_proxy(env)[0] == "blue"
    [curl] = _typed(said["fix"], "curl -sI")
    assert subprocess.run(curl, capture_output=True, timeout=30).returncode == 0
    _clean(stack, env)


def test_a_dial_only_caddys_container_resolves_is_never_said_to_miss_the_slot(
        stack: DrillStack) -> None:
    """Found by review: a Caddy on the host's network in a container with `--add-host
    host.docker.internal:host-gateway` dials a name this host cannot resolve; status said
    "nothing answers there ... not the proxy's settings" and its printed fix gave 502, over
    the proxy's real fault. A name that does not resolve here (`.invalid`, RFC 6761) is not
    asked; a loopback address where nothing listens still is."""
    env = stack.env
    blue = env.slot(Slot.BLUE)
    assert slots.dial_miss(env, Slot.BLUE, (f"caddy-only.invalid:{blue.port}",)) is None
    free = closed_port()
    missed = slots.dial_miss(env.with_(slots={**env.slots, Slot.BLUE: dataclasses.replace(
        blue, port=free)}), Slot.BLUE, (f"127.0.0.2:{free}",))
    assert missed is not None and missed[0] == f"127.0.0.2:{free}", missed
