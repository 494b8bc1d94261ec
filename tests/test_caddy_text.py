"""The Caddy adapter: pure Caddyfile functions, then the side effects against loopback HTTP.

No Caddy binary is needed here: the last section runs a tiny stdlib "Caddy" (admin API + proxy
on 127.0.0.1) that loads what it is posted and answers through the managed block, so the
refuse/restore logic of switch() is exercised over real HTTP. Tests against a real Caddy run
on the drill stack.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runbook import caddy
from runbook.caddy import CaddyError, CaddyNotRunningError
from runbook.environment import Environment, Slot, from_mapping
from runbook.errors import ExitCode


def make_env(caddyfile: Path = Path("/nonexistent/Caddyfile"), *, admin: str = "http://127.0.0.1:1",
             proxy: str = "http://127.0.0.1:1", command: tuple[str, ...] = ("caddy",),
             reload: str = "admin-api") -> Environment:
    return from_mapping({
        "name": "staging",
        "slots": {"blue": {"container": "togather-server-blue", "service": "togather-blue",
                           "port": 8081},
                  "green": {"container": "togather-server-green", "service": "togather-green",
                            "port": 8082}},
        "caddy": {"caddyfile": str(caddyfile), "reload": reload, "admin_url": admin,
                  "proxy_url": proxy, "command": list(command)},
    }, Path("/tmp/test-env.toml"))


ENV = make_env()

HOST_CADDYFILE = """\
{
\tadmin localhost:2019
\temail ops@example.org
}

# Other sites on this host must survive a switch untouched.
status.example.org {
\treverse_proxy localhost:8081   # NOT managed: outside the markers
\theader X-Togather-Slot "blue"
}

togather.example.org {
\tencode gzip
\t@api path /api/*
\t# BLUE_GREEN_SLOT_START
\thandle @api {
\t\treverse_proxy localhost:8081 {
\t\t\theader_down X-Togather-Slot "blue"
\t\t\thealth_uri /health
\t\t}
\t}
\thandle {
\t\treverse_proxy 127.0.0.1:8081 {
\t\t\theader_down X-Togather-Slot "blue"
\t\t}
\t}
\t# BLUE_GREEN_SLOT_END
\tlog {
\t\toutput file /var/log/caddy/togather.log
\t}
}
"""


def outside(text: str) -> tuple[str, str]:
    start, end = caddy.find_block(text)
    return text[:start], text[end:]


# --- find_block ----------------------------------------------------------------------------

def test_find_block_returns_the_text_between_the_marker_lines() -> None:
    start, end = caddy.find_block(HOST_CADDYFILE)
    inner = HOST_CADDYFILE[start:end]
    assert inner.startswith("\thandle @api {\n")
    assert inner.endswith("\t}\n")
    assert "BLUE_GREEN" not in inner
    assert HOST_CADDYFILE[:start].endswith("# BLUE_GREEN_SLOT_START\n")
    assert HOST_CADDYFILE[end:].startswith("\t# BLUE_GREEN_SLOT_END\n")


@pytest.mark.parametrize(("text", "words"), [
    ("site {\n\treverse_proxy localhost:8081\n}\n",
     ["BLUE_GREEN_SLOT_START", "BLUE_GREEN_SLOT_END"]),
    ("# BLUE_GREEN_SLOT_START\nreverse_proxy localhost:8081\n", ["no", "BLUE_GREEN_SLOT_END"]),
    ("reverse_proxy localhost:8081\n# BLUE_GREEN_SLOT_END\n", ["no", "BLUE_GREEN_SLOT_START"]),
    ("# BLUE_GREEN_SLOT_START\n# BLUE_GREEN_SLOT_START\nreverse_proxy localhost:8081\n"
     "# BLUE_GREEN_SLOT_END\n", ["duplicated", "lines 1, 2, 4"]),
    ("# BLUE_GREEN_SLOT_START\nreverse_proxy localhost:8081\n# BLUE_GREEN_SLOT_END\n"
     "# BLUE_GREEN_SLOT_END\n", ["duplicated"]),
    ("# BLUE_GREEN_SLOT_END\nreverse_proxy localhost:8081\n# BLUE_GREEN_SLOT_START\n",
     ["comes before", "line 1", "line 3"]),
    ("# BLUE_GREEN_SLOT_START # BLUE_GREEN_SLOT_END\n", ["both"]),
])
def test_find_block_rejects_missing_duplicated_or_misordered_markers(
        text: str, words: list[str]) -> None:
    with pytest.raises(CaddyError) as err:
        caddy.find_block(text)
    for word in words:
        assert word in str(err.value)
    assert err.value.fix
    # the same structural errors stop rewrite and inspect before they do anything
    with pytest.raises(CaddyError):
        caddy.rewrite(text, ENV, Slot.GREEN)
    with pytest.raises(CaddyError):
        caddy.inspect(text, ENV)


def test_markers_need_not_be_alone_on_their_comment_line() -> None:
    text = ("a {\n  #  BLUE_GREEN_SLOT_START (managed by deploy.sh)\n  reverse_proxy localhost:8082"
            "\n  # BLUE_GREEN_SLOT_END -- do not edit\n}\n")
    assert caddy.active_slot(text, ENV) is Slot.GREEN


# --- inspect / active_slot -----------------------------------------------------------------

def test_inspect_reads_ports_and_headers_of_every_upstream_block() -> None:
    found = caddy.inspect(HOST_CADDYFILE, ENV)
    assert found.ports == (8081,)
    assert found.header_slots == ("blue", "blue")
    assert found.consistent and found.problems == () and found.warnings == ()
    assert found.slot is Slot.BLUE
    assert [u.line for u in found.upstreams] == [17, 23]
    assert caddy.active_slot(HOST_CADDYFILE, ENV) is Slot.BLUE


def test_a_caddyfile_targeting_the_wrong_port_is_reported_not_guessed() -> None:
    text = HOST_CADDYFILE.replace("127.0.0.1:8081", "127.0.0.1:8080")
    found = caddy.inspect(text, ENV)
    assert not found.consistent
    assert found.slot is None
    assert found.ports == (8081, 8080)
    assert any("port 8080" in p and "line 23" in p and "blue (8081)" in p
               for p in found.problems), found.problems
    assert caddy.active_slot(text, ENV) is None


def test_upstreams_and_headers_that_disagree_are_inconsistent() -> None:
    tail = '\n\t\t}\n\t}\n\t# BLUE'
    mixed_header = HOST_CADDYFILE.replace('"blue"' + tail, '"green"' + tail)
    found = caddy.inspect(mixed_header, ENV)
    assert found.header_slots == ("blue", "green")
    assert found.slot is None and not found.consistent
    assert any("names both slots" in p for p in found.problems)

    mixed_ports = HOST_CADDYFILE.replace("127.0.0.1:8081", "127.0.0.1:8082")
    assert caddy.inspect(mixed_ports, ENV).slot is None

    bad_value = HOST_CADDYFILE.replace('Slot "blue"\n\t\t\thealth', 'Slot "purple"\n\t\t\thealth')
    found = caddy.inspect(bad_value, ENV)
    assert found.slot is None
    assert any("'purple'" in p for p in found.problems)


def test_comments_inside_the_block_are_ignored() -> None:
    text = ("# BLUE_GREEN_SLOT_START\n"
            "# reverse_proxy localhost:8081   (blue, before the last deploy)\n"
            "reverse_proxy localhost:8082 # header_down X-Togather-Slot \"blue\"\n"
            "# BLUE_GREEN_SLOT_END\n")
    found = caddy.inspect(text, ENV)
    assert found.ports == (8082,)
    assert found.slot is Slot.GREEN
    assert found.warnings and "header_down" in found.warnings[0]
    assert caddy.rewrite(text, ENV, Slot.BLUE) == text.replace("localhost:8082 #",
                                                               "localhost:8081 #")


def test_an_empty_block_has_nothing_to_switch() -> None:
    text = "x {\n# BLUE_GREEN_SLOT_START\n\trespond \"localhost:8081\"\n# BLUE_GREEN_SLOT_END\n}\n"
    found = caddy.inspect(text, ENV)
    assert found.slot is None and "no reverse_proxy upstream" in found.problems[0]
    with pytest.raises(CaddyError, match="nothing to switch"):
        caddy.rewrite(text, ENV, Slot.GREEN)


def test_placeholder_upstreams_cannot_be_rewritten() -> None:
    text = "# BLUE_GREEN_SLOT_START\nreverse_proxy {env.UPSTREAM}\n# BLUE_GREEN_SLOT_END\n"
    assert caddy.inspect(text, ENV).slot is None
    with pytest.raises(CaddyError, match="not host:port"):
        caddy.rewrite(text, ENV, Slot.GREEN)


# --- rewrite -------------------------------------------------------------------------------

def test_rewrite_switches_every_upstream_and_header_and_nothing_else() -> None:
    new = caddy.rewrite(HOST_CADDYFILE, ENV, Slot.GREEN)
    assert outside(new) == outside(HOST_CADDYFILE)
    start, end = caddy.find_block(new)
    inner = new[start:end]
    assert "reverse_proxy localhost:8082 {" in inner
    assert "reverse_proxy 127.0.0.1:8082 {" in inner  # the host spelling is kept
    assert inner.count('header_down X-Togather-Slot "green"') == 2
    assert "8081" not in inner and "blue" not in inner
    assert len(new) == len(HOST_CADDYFILE) + 2  # "green" is one char longer, twice
    # the unmanaged site keeps pointing at blue
    assert "\treverse_proxy localhost:8081   # NOT managed" in new
    assert caddy.active_slot(new, ENV) is Slot.GREEN
    assert caddy.rewrite(new, ENV, Slot.BLUE) == HOST_CADDYFILE


def test_rewrite_handles_to_subdirective_matchers_schemes_quotes_and_several_upstreams() -> None:
    text = (
        "# BLUE_GREEN_SLOT_START\n"
        "reverse_proxy /api/* http://localhost:8081 \"127.0.0.1:8081\" {\n"
        "\tto [::1]:8081\n"
        "\theader_down +X-Togather-Slot blue\n"
        "\tlb_policy first\n"
        "}\n"
        "reverse_proxy @ws localhost:8081\n"
        "header X-Togather-Slot `blue`\n"
        "respond /where \"localhost:8081 is blue\"\n"
        "# BLUE_GREEN_SLOT_END\n"
    )
    expected = (
        "# BLUE_GREEN_SLOT_START\n"
        "reverse_proxy /api/* http://localhost:8082 \"127.0.0.1:8082\" {\n"
        "\tto [::1]:8082\n"
        "\theader_down +X-Togather-Slot green\n"
        "\tlb_policy first\n"
        "}\n"
        "reverse_proxy @ws localhost:8082\n"
        "header X-Togather-Slot `green`\n"
        "respond /where \"localhost:8081 is blue\"\n"  # not an upstream: untouched
        "# BLUE_GREEN_SLOT_END\n"
    )
    assert caddy.rewrite(text, ENV, Slot.GREEN) == expected
    found = caddy.inspect(text, ENV)
    assert found.ports == (8081,) and found.slot is Slot.BLUE
    assert len(found.upstreams) == 4


def test_rewrite_fixes_a_wrong_port() -> None:
    text = HOST_CADDYFILE.replace("localhost:8081 {", "localhost:9999 {")
    assert caddy.active_slot(text, ENV) is None
    fixed = caddy.rewrite(text, ENV, Slot.BLUE)
    assert fixed == HOST_CADDYFILE
    assert caddy.inspect(fixed, ENV).consistent


def test_rewrite_preserves_crlf_files_byte_for_byte() -> None:
    crlf = HOST_CADDYFILE.replace("\n", "\r\n")
    new = caddy.rewrite(crlf, ENV, Slot.GREEN)
    assert outside(new) == outside(crlf)
    assert new.encode() == caddy.rewrite(HOST_CADDYFILE, ENV, Slot.GREEN).replace(
        "\n", "\r\n").encode()
    assert new.count("\r\n") == crlf.count("\r\n")
    assert caddy.active_slot(new, ENV) is Slot.GREEN


def test_rewrite_preserves_mixed_line_ends_trailing_spaces_and_no_final_newline() -> None:
    text = ("\ufeff{\r\n  admin 127.0.0.1:2019\n}\n\t \n"
            "a {\r\n# BLUE_GREEN_SLOT_START   \r\n  reverse_proxy   localhost:8081   \r\n"
            "\t# BLUE_GREEN_SLOT_END\n}")
    new = caddy.rewrite(text, ENV, Slot.GREEN)
    assert new == text.replace("localhost:8081", "localhost:8082")
    assert new.encode("utf-8").startswith(b"\xef\xbb\xbf")


def test_rewrite_to_the_active_slot_changes_nothing_and_is_idempotent() -> None:
    assert caddy.rewrite(HOST_CADDYFILE, ENV, Slot.BLUE) == HOST_CADDYFILE
    once = caddy.rewrite(HOST_CADDYFILE, ENV, "green")
    assert caddy.rewrite(once, ENV, Slot.GREEN) == once


def test_unified_diff_shows_only_the_managed_lines() -> None:
    new = caddy.rewrite(HOST_CADDYFILE, ENV, Slot.GREEN)
    diff = caddy.unified_diff(HOST_CADDYFILE, new, "/etc/caddy/Caddyfile")
    assert diff.startswith("--- /etc/caddy/Caddyfile (current)\n+++ /etc/caddy/Caddyfile")
    removed = [line for line in diff.splitlines() if line.startswith("-") and
               not line.startswith("---")]
    added = [line for line in diff.splitlines() if line.startswith("+") and
             not line.startswith("+++")]
    assert len(removed) == len(added) == 4
    assert all("8082" in line or "green" in line for line in added)
    assert caddy.unified_diff(HOST_CADDYFILE, HOST_CADDYFILE, "x") == ""


# --- properties ----------------------------------------------------------------------------

EOL = st.sampled_from(["\n", "\r\n"])
INDENT = st.sampled_from(["", "\t", "  ", "\t\t"])
FREE_TEXT = st.text(max_size=60).filter(lambda s: "BLUE_GREEN_SLOT" not in s)
LINE_TEXT = FREE_TEXT.map(lambda s: s.replace("\n", " "))


@st.composite
def upstream(draw: st.DrawFn) -> str:
    host = draw(st.sampled_from(["localhost", "127.0.0.1", "http://localhost", "[::1]",
                                 "h2c://127.0.0.1"]))
    port = draw(st.sampled_from([8081, 8082, 8080, 9000, 1]))
    quote = draw(st.sampled_from(["", '"']))
    return f"{quote}{host}:{port}{quote}"


@st.composite
def unit(draw: st.DrawFn) -> str:
    ind, eol = draw(INDENT), draw(EOL)
    ups = " ".join(draw(st.lists(upstream(), min_size=1, max_size=3)))
    matcher = draw(st.sampled_from(["", "@api ", "/api/* ", "* "]))
    value = draw(st.sampled_from(['"blue"', '"green"', "blue", "green"]))
    kind = draw(st.sampled_from(["plain", "block", "handle", "comment", "blank", "respond", "to"]))
    if kind == "plain":
        return f"{ind}reverse_proxy {matcher}{ups}{eol}"
    if kind == "block":
        return (f"{ind}reverse_proxy {matcher}{ups} {{{eol}{ind}\theader_down X-Togather-Slot "
                f"{value}{eol}{ind}}}{eol}")
    if kind == "to":
        return (f"{ind}reverse_proxy {{{eol}{ind}\tto {ups}{eol}{ind}\theader_down "
                f"X-Togather-Slot {value}{eol}{ind}}}{eol}")
    if kind == "handle":
        return (f"{ind}handle {matcher}{{{eol}{ind}\treverse_proxy {ups} {{{eol}"
                f"{ind}\t\theader_down X-Togather-Slot {value}{eol}{ind}\t}}{eol}{ind}}}{eol}")
    if kind == "comment":
        return f"{ind}# {draw(LINE_TEXT)}{eol}"
    if kind == "respond":
        return f'{ind}respond "{draw(upstream()).strip(chr(34))}"{eol}'
    return f"{ind}{eol}"


@st.composite
def caddyfile(draw: st.DrawFn) -> str:
    units = draw(st.lists(unit(), min_size=0, max_size=6))
    units.insert(draw(st.integers(0, len(units))), f"reverse_proxy localhost:8081{draw(EOL)}")
    start_line = draw(INDENT) + "# BLUE_GREEN_SLOT_START" + draw(LINE_TEXT) + draw(EOL)
    end_line = draw(INDENT) + "# BLUE_GREEN_SLOT_END" + draw(LINE_TEXT)
    return draw(FREE_TEXT) + start_line + "".join(units) + end_line + draw(FREE_TEXT)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(text=caddyfile(), target=st.sampled_from(list(Slot)))
def test_rewrite_never_changes_bytes_outside_the_markers_and_is_idempotent(
        text: str, target: Slot) -> None:
    new = caddy.rewrite(text, ENV, target)
    assert outside(new) == outside(text)
    assert new.count("\n") == text.count("\n")
    assert new.count("\r") == text.count("\r")
    assert caddy.rewrite(new, ENV, target) == new
    found = caddy.inspect(new, ENV)
    assert found.slot is target, found.problems
    assert set(found.ports) == {ENV.slot(target).port}
    assert caddy.rewrite(caddy.rewrite(new, ENV, target.other), ENV, target) == new


# --- side effects against loopback HTTP (no Caddy binary needed) --------------------------

VERSIONS = {"blue": "aaaaaaa", "green": "bbbbbbb"}


@dataclass
class FakeCaddy:
    """Just enough Caddy: GET /config/, POST /load (Caddyfile text), and a proxy on /version
    that answers as whatever slot the loaded managed block names."""

    loaded: str
    reject: Callable[[FakeCaddy, str], bool] = lambda fake, body: False  # answer /load with 500
    adapt_error: str | None = None  # answer POST /adapt with 400 and this error
    adapts: list[str] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def fake_caddy() -> Iterator[FakeCaddy]:
    state = FakeCaddy(loaded=HOST_CADDYFILE)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def reply(self, code: int, body: object, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/config/":
                self.reply(200, {"apps": {}})
            elif self.path == "/version":
                slot = caddy.active_slot(state.loaded, ENV)
                if slot is None:
                    self.reply(502, {"error": "bad gateway"})
                else:
                    self.reply(200, {"version": VERSIONS[slot]},
                               {"X-Togather-Slot": slot.value})
            else:
                self.reply(404, {})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            if self.path == "/adapt" and self.headers["Content-Type"] == "text/caddyfile":
                state.adapts.append(body)
                if state.adapt_error:
                    self.reply(400, {"error": state.adapt_error})
                else:
                    self.reply(200, {"result": {"apps": {}}, "warnings": [
                        {"file": "Caddyfile", "line": 2, "message": "input is not formatted"}]})
                return
            if self.path != "/load" or self.headers["Content-Type"] != "text/caddyfile":
                self.reply(400, {"error": "bad request"})
                return
            if state.reject(state, body):
                self.reply(500, {"error": "loading new config: simulated failure"})
                return
            state.loads.append(body)
            state.loaded = body
            self.reply(200, {})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def caddyfile_path(tmp_path: Path) -> Path:
    path = tmp_path / "caddy" / "Caddyfile"
    path.parent.mkdir()
    path.write_bytes(HOST_CADDYFILE.replace("\n", "\r\n").encode())
    path.chmod(0o640)
    return path


def env_for(path: Path, fake: FakeCaddy | None, **kw: object) -> Environment:
    url = fake.url if fake else f"http://127.0.0.1:{closed_port()}"
    return make_env(path, admin=url, proxy=url, command=("true",), **kw)  # type: ignore[arg-type]


def test_switch_writes_reloads_and_verifies(caddyfile_path: Path, fake_caddy: FakeCaddy) -> None:
    env = env_for(caddyfile_path, fake_caddy)
    before = caddyfile_path.read_bytes()
    plan = caddy.plan_switch(env, Slot.GREEN)
    assert plan.changed and plan.current.slot is Slot.BLUE and plan.target_port == 8082
    assert caddyfile_path.read_bytes() == before and fake_caddy.loads == []  # a plan only reads
    assert "8082" in plan.diff and "blue -> green" in plan.describe()

    result = caddy.switch(env, Slot.GREEN, "bbbbbbb", verify_interval=0.05)
    assert result.verify.ok and result.verify.slot_header == "green"
    assert result.previous is Slot.BLUE and result.changed
    after = caddyfile_path.read_bytes()
    assert after == caddy.rewrite(before.decode(), env, Slot.GREEN).encode()
    assert fake_caddy.loads == [after.decode()]
    assert result.backup is not None and result.backup.read_bytes() == before
    assert caddyfile_path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in caddyfile_path.parent.iterdir()) == [
        ".Caddyfile.runbook-previous", "Caddyfile"]  # no temp files left behind


def test_a_failed_verification_restores_the_previous_file_byte_for_byte(
        caddyfile_path: Path, fake_caddy: FakeCaddy) -> None:
    env = env_for(caddyfile_path, fake_caddy)
    before = caddyfile_path.read_bytes()
    with pytest.raises(CaddyError) as err:
        caddy.switch(env, Slot.GREEN, "ccccccc", verify_attempts=2, verify_interval=0.05)
    assert err.value.restored is True and err.value.exit_code is ExitCode.FAILED_SAFELY
    assert err.value.stage == "verify"
    message = str(err.value)
    assert "restored" in message and "traffic stays on blue" in message and "ccccccc" in message
    assert caddyfile_path.read_bytes() == before
    assert fake_caddy.loaded == before.decode()  # and Caddy runs the old config again


def test_a_rejected_reload_restores_the_previous_file(
        caddyfile_path: Path, fake_caddy: FakeCaddy) -> None:
    fake_caddy.reject = lambda fake, body: caddy.active_slot(body, ENV) is Slot.GREEN
    fake_caddy.loaded = caddyfile_path.read_text()
    env = env_for(caddyfile_path, fake_caddy)
    before = caddyfile_path.read_bytes()
    with pytest.raises(CaddyError) as err:
        caddy.switch(env, Slot.GREEN, "bbbbbbb")
    assert err.value.stage == "reload"
    assert "simulated failure" in str(err.value)
    assert caddyfile_path.read_bytes() == before
    # Caddy kept the old config (a rejected load changes nothing), so blue still answers
    assert err.value.restored is True and err.value.exit_code is ExitCode.FAILED_SAFELY


def test_a_failed_restore_says_so_loudly_with_the_backup_path(
        caddyfile_path: Path, fake_caddy: FakeCaddy) -> None:
    fake_caddy.reject = lambda fake, body: len(fake.loads) >= 1  # the restore is refused
    env = env_for(caddyfile_path, fake_caddy)
    before = caddyfile_path.read_bytes()
    with pytest.raises(CaddyError) as err:
        caddy.switch(env, Slot.GREEN, "ccccccc", verify_attempts=1)
    assert err.value.exit_code is ExitCode.ATTENTION and err.value.restored is False
    backup = err.value.backup
    assert backup is not None and backup.read_bytes() == before
    assert "ATTENTION" in str(err.value) and str(backup) in str(err.value)
    assert caddyfile_path.read_bytes() == before  # the file itself was put back


def test_caddy_not_running_is_an_error_before_anything_is_written(caddyfile_path: Path) -> None:
    env = env_for(caddyfile_path, None)
    before = caddyfile_path.read_bytes()
    mtime = caddyfile_path.stat().st_mtime_ns
    assert not caddy.is_running(env)
    with pytest.raises(CaddyNotRunningError) as err:
        caddy.switch(env, Slot.GREEN, "bbbbbbb")
    assert "not running" in str(err.value) and "connection refused" in str(err.value)
    assert "not touched" in str(err.value)
    with pytest.raises(CaddyNotRunningError):
        caddy.apply(env, caddy.rewrite(before.decode(), env, Slot.GREEN))
    assert caddyfile_path.read_bytes() == before
    assert caddyfile_path.stat().st_mtime_ns == mtime
    assert os.listdir(caddyfile_path.parent) == ["Caddyfile"]


def test_a_rejected_validation_changes_nothing(caddyfile_path: Path,
                                               fake_caddy: FakeCaddy) -> None:
    """admin-api: the candidate goes to POST /adapt (no process); Caddy's error is shown."""
    env = make_env(caddyfile_path, admin=fake_caddy.url, proxy=fake_caddy.url, command=("false",))
    fake_caddy.adapt_error = "Caddyfile:14 - Error during parsing: unrecognized directive: x"
    before = caddyfile_path.read_bytes()
    with pytest.raises(CaddyError) as err:
        caddy.switch(env, Slot.GREEN, "bbbbbbb")
    assert err.value.stage == "validate" and "nothing was changed" in str(err.value)
    assert "unrecognized directive: x" in str(err.value) and "/adapt" in str(err.value)
    assert fake_caddy.adapts == [caddy.rewrite(before.decode(), env, Slot.GREEN)]
    assert caddyfile_path.read_bytes() == before and fake_caddy.loads == []
    assert os.listdir(caddyfile_path.parent) == ["Caddyfile"]


def test_validation_through_the_admin_api_returns_caddys_warnings(
        caddyfile_path: Path, fake_caddy: FakeCaddy) -> None:
    env = make_env(caddyfile_path, admin=fake_caddy.url, proxy=fake_caddy.url, command=("false",))
    assert caddy.validate(env, HOST_CADDYFILE) == "input is not formatted"
    assert fake_caddy.adapts == [HOST_CADDYFILE] and fake_caddy.loads == []
    assert caddy.validate_command(env, "/x/.tmp") == [
        "POST", f"{fake_caddy.url}/adapt", "Content-Type: text/caddyfile"]


def test_a_file_based_reload_is_validated_by_the_caddy_command(
        caddyfile_path: Path, fake_caddy: FakeCaddy) -> None:
    """caddy-reload/systemctl read the file, so the file is checked the way they read it."""
    env = make_env(caddyfile_path, admin=fake_caddy.url, proxy=fake_caddy.url,
                   command=("false",), reload="caddy-reload")
    with pytest.raises(CaddyError) as err:
        caddy.validate(env, HOST_CADDYFILE)
    assert err.value.stage == "validate" and "caddy validate exited 1" in str(err.value)
    assert fake_caddy.adapts == []
    assert os.listdir(caddyfile_path.parent) == ["Caddyfile"]


def test_reload_commands_are_argument_lists_for_a_command_prefix(tmp_path: Path) -> None:
    env = make_env(tmp_path / "Caddyfile", admin="http://127.0.0.1:2999",
                   command=("docker", "exec", "drill-caddy", "caddy"), reload="caddy-reload")
    assert caddy.reload_action(env) == [
        "docker", "exec", "drill-caddy", "caddy", "reload", "--config",
        str(tmp_path / "Caddyfile"), "--adapter", "caddyfile", "--address", "127.0.0.1:2999"]
    assert caddy.validate_command(env, "/x/.tmp")[:5] == [
        "docker", "exec", "drill-caddy", "caddy", "validate"]
    assert caddy.reload_action(make_env(reload="systemctl")) == ["systemctl", "reload", "caddy"]
