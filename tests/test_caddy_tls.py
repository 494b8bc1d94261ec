"""A lone real Caddy (the drill's image) unlike the drill's: an HTTPS site on Caddy's local CA
(`tls internal`), and an admin API that is not where [caddy] admin_url says. Two tiny HTTP
servers stand in for the slots; Caddy's own answers and files are the oracle."""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runbook import caddy, status, traffic
from runbook.drill import http as drill_http
from runbook.environment import Environment, Slot, from_mapping
from runbook.errors import ConfigError, ExitCode, RunbookError
from tests.drill_checks import closed_ports

IMAGE = "togather-drill-caddy:2"
SITE = "togather.test"
ROOT = "/data/caddy/pki/authorities/local/root.crt"  # Caddy's local CA, in its container

pytestmark = pytest.mark.docker


class _Slot(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"status": "healthy", "version": "aaaaaaa",
                           "git_commit": "a" * 40}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@dataclass(frozen=True)
class Lone:
    admin: int
    http: int
    https: int
    blue: int
    green: int
    caddyfile: Path
    root: Path  # Caddy's local root certificate, copied out of its container

    def env(self, *, admin: int | None = None, ca_file: Path | None = None) -> Environment:
        return from_mapping({
            "name": "staging",
            "slots": {"blue": {"container": "lone-blue", "port": self.blue},
                      "green": {"container": "lone-green", "port": self.green}},
            "caddy": {"caddyfile": str(self.caddyfile), "reload": "admin-api",
                      "admin_url": f"http://127.0.0.1:{admin or self.admin}",
                      "proxy_url": f"https://127.0.0.1:{self.https}", "site": SITE,
                      **({"ca_file": str(ca_file)} if ca_file else {})},
        }, self.caddyfile.parent / "env.toml")


@pytest.fixture(scope="module")
def lone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lone]:
    """Caddy serving SITE over HTTPS from its local CA, proxying to the blue stand-in."""
    work = tmp_path_factory.mktemp("lone-caddy")
    admin, http_port, https, *_ = closed_ports(3)
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slot) for _ in Slot]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    blue, green = (s.server_address[1] for s in servers)
    caddyfile = work / "Caddyfile"
    caddyfile.write_text(
        f"{{\n\tadmin 127.0.0.1:{admin}\n\thttp_port {http_port}\n\thttps_port {https}\n"
        f"\tskip_install_trust\n}}\n{SITE} {{\n\ttls internal\n\t# BLUE_GREEN_SLOT_START\n"
        f"\treverse_proxy localhost:{blue} {{\n\t\theader_down X-Togather-Slot \"blue\"\n"
        "\t}\n\t# BLUE_GREEN_SLOT_END\n}\n")
    name = f"lone-caddy-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "--network", "host",
                    "-e", "XDG_DATA_HOME=/data", "-v", f"{work}:{work}:ro", IMAGE,
                    "caddy", "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
                   check=True, capture_output=True)
    try:
        root = work / "root.crt"
        for _ in range(100):  # the local CA is made when the site's certificate is
            got = subprocess.run(["docker", "exec", name, "cat", ROOT], capture_output=True)
            if got.returncode == 0 and got.stdout:
                root.write_bytes(got.stdout)
                break
            threading.Event().wait(0.1)
        lone = Lone(admin, http_port, https, blue, green, caddyfile, root)
        for _ in range(100):  # the site's own certificate is issued
            if _slot_header(https, root) == "blue":
                break
            threading.Event().wait(0.1)
        yield lone
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        for server in servers:
            server.shutdown()
            server.server_close()


def _slot_header(port: int, root: Path) -> str | None:
    """X-Togather-Slot of SITE's /version through Caddy, trusting `root` (the oracle: not the
    code under test)."""
    context = ssl.create_default_context(cafile=str(root))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=SITE) as tls:
            tls.sendall(f"GET /version HTTP/1.1\r\nHost: {SITE}\r\nConnection: close\r\n\r\n"
                        .encode())
            head = b""
            while b"\r\n\r\n" not in head and (chunk := tls.recv(4096)):
                head += chunk
    except OSError:
        return None
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "x-togather-slot":
            return value.strip()
    return None


def running_config(env: Environment) -> Any:
    return drill_http.get(f"{env.caddy.admin_url}/config/", timeout=10).json()


def test_an_https_site_on_caddys_local_ca_is_refused_before_anything_moves(lone: Lone) -> None:
    """Found by review: a certificate the system store does not trust was taken for an outage:
    the plan went ahead, the switch moved users, could not verify, moved them back and said
    the undo failed; status said users were not served. It cannot verify what the proxy
    serves: refused (exit 4) before anything moves, naming the site and [caddy] ca_file."""
    env = lone.env()
    before = running_config(env)
    found = traffic.read(env)
    assert found.proxy_error is None, found
    assert found.proxy_unverifiable and SITE in found.proxy_unverifiable, found
    with pytest.raises(RunbookError) as err:
        traffic.live_slot(env, None)
    said = f"{err.value.message} / {err.value.fix}"
    assert err.value.exit_code == ExitCode.PRECONDITION, said
    assert SITE in err.value.message and "nothing was changed" in said, said
    assert "ca_file" in (err.value.fix or ""), said
    assert running_config(env) == before
    problems = [f"{p.problem} / {p.fix}" for p in status.problems(status.collect(env))]
    assert not any("not served" in p for p in problems), problems
    assert any("cannot verify" in p and "ca_file" in p for p in problems), problems


def test_with_caddys_root_as_ca_file_the_proxy_is_verified(lone: Lone) -> None:
    env = lone.env(ca_file=lone.root)
    found = traffic.read(env)
    assert (found.proxy_slot, found.proxy_error, found.proxy_unverifiable) == (
        "blue", None, None), found
    assert traffic.live_slot(env, None)[0] is Slot.BLUE
    assert caddy.verify(env, Slot.BLUE, "aaaaaaa", attempts=1).ok


@pytest.mark.parametrize("kind", ["missing", "not a certificate"])
def test_a_ca_file_that_cannot_be_used_is_a_config_error(lone: Lone, tmp_path: Path,
                                                         kind: str) -> None:
    bad = tmp_path / "root.crt"
    if kind != "missing":
        bad.write_text("hello\n")
    with pytest.raises(ConfigError) as err:
        lone.env(ca_file=bad)
    assert err.value.exit_code == ExitCode.USAGE
    assert "caddy.ca_file" in str(err.value) and str(bad) in str(err.value), str(err.value)


def test_an_admin_api_elsewhere_while_caddy_serves_is_not_called_down(lone: Lone) -> None:
    """Found by review: admin off, on another port or a unix socket while Caddy serves was
    reported as "Caddy is not running", with the fix to start it. Still refused, but truly."""
    env = lone.env(admin=closed_ports(1)[0], ca_file=lone.root)
    for check in (lambda: caddy.check_running(env), lambda: traffic.loaded_config(env)):
        with pytest.raises(RunbookError) as err:
            check()
        said = f"{err.value.message} / {err.value.fix}"
        assert err.value.exit_code == ExitCode.PRECONDITION, said
        assert "not running" not in said and "start" not in (err.value.fix or ""), said
        assert f"Caddy serves at {env.caddy.proxy_url}" in said, said
        assert f"does not answer at {env.caddy.admin_url}" in said, said
        assert "`admin` global option" in said and str(lone.caddyfile) in said, said


def test_status_says_an_admin_api_that_does_not_answer_once(lone: Lone) -> None:
    """Found by review: with the admin API off (or elsewhere) while Caddy serves, `runbook
    status` printed the same problem twice: Caddy's (it cannot take a reload) and the
    traffic check's (which slot serves cannot be read), the same words."""
    env = lone.env(admin=closed_ports(1)[0], ca_file=lone.root)
    found = status.problems(status.collect(env))
    said = [p for p in found if f"does not answer at {env.caddy.admin_url}" in p.problem]
    assert len(said) == 1, [(p.check, p.problem) for p in found]
