"""The Caddy adapter: pure Caddyfile text functions, judged first by hand-written text and
text properties (bytes outside the markers, idempotence, round trips), then by the real Caddy
of the session drill stack: what its own adapter reads in a rewritten Caddyfile (POST /adapt),
what it runs after a reload (GET /config/) and where a real request through it goes. Every
reload method (admin API, `caddy reload`, `systemctl reload`) and `caddy validate` run against
that Caddy; the parser under test is never its own oracle.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runbook import caddy, status, switch, traffic
from runbook.caddy import CaddyError
from runbook.caddy import admin as caddy_admin
from runbook.drill import http as drill_http
from runbook.drill.stack import DrillStack
from runbook.environment import Environment, ReloadMethod, Slot, from_mapping
from runbook.errors import ExitCode, RunbookError
from tests.drill_checks import closed_port, runbook_cli, through_proxy
from tests.drill_checks import serving as answering


def make_env(caddyfile: Path = Path("/nonexistent/Caddyfile"), *, admin: str = "http://127.0.0.1:1",
             proxy: str = "http://127.0.0.1:2", command: tuple[str, ...] = ("caddy",),
             reload: str = "admin-api", green_port: int = 8082) -> Environment:
    return from_mapping({
        "name": "staging",
        "slots": {"blue": {"container": "togather-server-blue", "service": "togather-blue",
                           "port": 8081},
                  "green": {"container": "togather-server-green", "service": "togather-green",
                            "port": green_port}},
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
    # a fact of the file, met when planning before any change: exit 4, never exit 1's "failed
    # safely" (scripts read that as "something was attempted")
    assert err.value.exit_code == ExitCode.PRECONDITION
    # the same structural errors stop rewrite and inspect before they do anything
    with pytest.raises(CaddyError):
        caddy.rewrite(text, ENV, Slot.GREEN)
    with pytest.raises(CaddyError):
        caddy.inspect(text, ENV)


def test_markers_need_not_be_alone_on_their_comment_line() -> None:
    text = ("a {\n  #  BLUE_GREEN_SLOT_START (managed by deploy.sh)\n  reverse_proxy localhost:8082"
            "\n  # BLUE_GREEN_SLOT_END -- do not edit\n}\n")
    assert caddy.active_slot(text, ENV) is Slot.GREEN


# a host's own comment above its blocks that names the markers, as the review found one
MENTIONS_MARKERS = "# BLUE_GREEN_SLOT_START/BLUE_GREEN_SLOT_END comments below.\n"


def test_duplicated_markers_where_a_comment_only_mentions_them_say_to_reword_it(
        tmp_path: Path) -> None:
    """Found by review: a comment naming the markers (`# BLUE_GREEN_SLOT_START/...`) is read
    as a marker line, and the refusal, "duplicated slot markers (lines 1, 16, 28)", said only
    "exactly one ... line": on-call looked for a second block. The comment line that is no
    bare marker line is named, with the fix the one-line case gives (reword it)."""
    text = MENTIONS_MARKERS + HOST_CADDYFILE
    assert [n for n, line in enumerate(text.split("\n"), 1) if "# BLUE_GREEN" in line] == [
        1, 16, 28]  # the premise: the comment, then the block's own two marker lines
    with pytest.raises(CaddyError) as err:
        caddy.find_block(text)
    assert err.value.message == "the Caddyfile has duplicated slot markers (lines 1, 16, 28)"
    fix = err.value.fix or ""
    assert "exactly one '# BLUE_GREEN_SLOT_START' line" in fix, fix
    assert "line 1 is a comment that names a marker among other words: reword it if it only " \
        "mentions them" in fix, fix
    assert "line 16" not in fix and "line 28" not in fix and "\n" not in fix, fix
    assert err.value.exit_code == ExitCode.PRECONDITION
    # the plan says it too, naming the file, before anything changes
    path = tmp_path / "Caddyfile"
    path.write_text(text)
    with pytest.raises(CaddyError) as planned:
        caddy.plan_switch(make_env(path), Slot.GREEN)
    assert planned.value.message.startswith(f"{path}: the Caddyfile has duplicated slot")
    assert planned.value.fix == fix and planned.value.exit_code == ExitCode.PRECONDITION
    assert path.read_text() == text
    # two comments: both named; bare marker lines doubled: no rewording offered
    two = text.replace("\t# BLUE_GREEN_SLOT_END\n", "\t# BLUE_GREEN_SLOT_END\n"
                       "\t# see # BLUE_GREEN_SLOT_END above\n")
    with pytest.raises(CaddyError) as err:
        caddy.find_block(two)
    assert "lines 1, 29 are comments that name a marker among other words: reword them if " \
        "they only mention them" in (err.value.fix or ""), err.value.fix
    doubled = HOST_CADDYFILE.replace("\t# BLUE_GREEN_SLOT_END\n",
                                     "\t# BLUE_GREEN_SLOT_END\n\t#BLUE_GREEN_SLOT_END\n")
    with pytest.raises(CaddyError) as err:
        caddy.find_block(doubled)
    assert "duplicated slot markers (lines 15, 27, 28)" in err.value.message
    assert "reword" not in (err.value.fix or ""), err.value.fix


@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_markers_in_a_file_the_caddyfile_imports_are_named_with_where_they_must_be(
        tmp_path: Path, absolute: bool) -> None:
    """Found by review: a Caddyfile that imports the app's site from another file, the
    markers in that file, was refused with "has no ... marker line" only: on-call saw the
    markers, in the file Caddy runs them from. The refusal names that file and the import,
    and says they must be in the [caddy] caddyfile file itself (which must be the whole
    config Caddy runs: pointing it at the imported file is refused, see test_rollback)."""
    sites = tmp_path / "sites"
    sites.mkdir()
    app = sites / "togather.caddy"
    start = HOST_CADDYFILE.index("togather.example.org {")
    app.write_text(HOST_CADDYFILE[start:])  # the app's site, markers and all
    (sites / "status.caddy").write_text("status.example.org {\n\trespond ok\n}\n")
    pattern = f"{sites}/*.caddy" if absolute else "sites/*.caddy"
    main = HOST_CADDYFILE[:start] + f"import {pattern}\n"
    path = tmp_path / "Caddyfile"
    path.write_text(main)
    env = make_env(path, reload="caddy-reload")
    with pytest.raises(CaddyError) as err:
        caddy.plan_switch(env, Slot.GREEN)
    message, fix = err.value.message, err.value.fix or ""
    assert message == (
        f"{path}: the Caddyfile has no # BLUE_GREEN_SLOT_START and # BLUE_GREEN_SLOT_END "
        f"marker line; they are in {app}, which it imports (line 12: import {pattern}); "
        "nothing was changed"), message
    assert f"the marker lines must be in the [caddy] caddyfile file itself ({path})" in fix, fix
    assert f"from {app} into {path}, beside the import (line 12)" in fix, fix
    assert f"[caddy] caddyfile cannot name {app} instead" in fix, fix
    assert "status.caddy" not in message + fix  # the file with no markers is not named
    assert err.value.exit_code == ExitCode.PRECONDITION and "\n" not in message + fix
    assert path.read_text() == main and app.read_text() == HOST_CADDYFILE[start:]
    # status's reading of the markers says the same
    assert traffic.markers_problem(env) == (message.removeprefix(f"{path}: ").removesuffix(
        "; nothing was changed"), fix)
    # an import of files none of which holds the markers: the refusal as before
    app.write_text(HOST_CADDYFILE[start:].replace("# BLUE_GREEN_SLOT_", "# SLOT_"))
    with pytest.raises(CaddyError) as err:
        caddy.plan_switch(env, Slot.GREEN)
    assert err.value.message == (
        f"{path}: the Caddyfile has no # BLUE_GREEN_SLOT_START and # BLUE_GREEN_SLOT_END "
        "marker line; nothing was changed"), err.value.message


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
    """No upstream between the markers on a slot's port: no slot is guessed; the switch, the
    guide's repair of "the Caddyfile targets the wrong port", repoints every upstream in it."""
    text = HOST_CADDYFILE.replace("localhost:8081 {", "localhost:8080 {").replace(
        "127.0.0.1:8081", "127.0.0.1:8080")
    found = caddy.inspect(text, ENV)
    assert not found.consistent
    assert found.slot is None
    assert found.ports == (8080,)
    assert [p for p in found.problems if "no slot's port" in p] == [
        f"line {n}: upstream {host}:8080 targets port 8080, which is no slot's port "
        "(known: blue (8081), green (8082))" for n, host in ((17, "localhost"), (23, "127.0.0.1"))]
    assert caddy.active_slot(text, ENV) is None
    repaired = caddy.rewrite(text, ENV, Slot.BLUE)
    assert repaired == HOST_CADDYFILE  # the wrong ports, and only they, repointed
    assert caddy.inspect(repaired, ENV).consistent


def test_an_upstream_on_another_port_beside_the_apps_is_a_warning_not_a_problem() -> None:
    text = HOST_CADDYFILE.replace("127.0.0.1:8081", "127.0.0.1:8080")
    found = caddy.inspect(text, ENV)
    assert found.consistent and found.slot is Slot.BLUE and found.problems == ()
    assert found.ports == (8081, 8080)
    assert found.warnings == ("line 23: upstream 127.0.0.1:8080 is no slot's port (known: "
                              "blue (8081), green (8082)): left as it is",)


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


# Managed blocks whose lines Caddy's lexer joins: each dials blue on a line the switch, reading
# one line at a time, took for no upstream (or for host `\`), so a switch to green left it on
# blue (the review's case: users split between the slots while verification passed).
JOINED = {
    "continuation": ("reverse_proxy 127.0.0.1:8081 \\\n"
                     "              [::1]:8081 {\n"
                     "    header_down X-Togather-Slot \"blue\"\n}\n"),
    "to-continuation": ("reverse_proxy {\n    to localhost:8081 \\\n       [::1]:8081\n"
                        "    header_down X-Togather-Slot \"blue\"\n}\n"),
    "crlf-and-spaces": ("reverse_proxy 127.0.0.1:8081 \\  \r\n    [::1]:8081 {\r\n"
                        "    header_down X-Togather-Slot \"blue\"\r\n}\r\n"),
    "glued": ("reverse_proxy 127.0.0.1:8081\\\n    [::1]:8081 {\n"
              "    header_down X-Togather-Slot \"blue\"\n}\n"),
    "in-a-comment": ("reverse_proxy 127.0.0.1:8081 # was C:\\old\n    [::1]:8081 {\n"
                     "    header_down X-Togather-Slot \"blue\"\n}\n"),
}
# Backslashes Caddy does not join lines at: an escaped one at a line's end, one inside a token
# with a space after it, one mid-line; these blocks are switched.
NOT_JOINED = (
    "@api path_regexp ^/api/\\d+$\n"
    "reverse_proxy @api 127.0.0.1:8081 {\n    header_down X-Note C:\\\\\n"
    "    header_down X-Togather-Slot \"blue\"\n}\n"
    "reverse_proxy [::1]:8081 {\n    header_down X-Other a\\  \n"
    "    header_down X-Togather-Slot \"blue\"\n}\n")


def in_site(block: str) -> str:
    eol = "\r\n" if "\r\n" in block else "\n"
    return (f"http://127.0.0.1:18080 {{{eol}# BLUE_GREEN_SLOT_START{eol}{block}"
            f"# BLUE_GREEN_SLOT_END{eol}}}{eol}")


@pytest.mark.parametrize("case", list(JOINED))
def test_a_line_caddy_joins_to_the_next_in_the_block_is_refused(case: str) -> None:
    """The switch reads the block one line at a time; a line Caddy joins to the next hides
    an upstream from it, so such a block is inconsistent and not rewritten (exit 4)."""
    text = in_site(JOINED[case])
    found = caddy.inspect(text, ENV)
    assert found.slot is None and not found.consistent
    line = 4 if case == "to-continuation" else 3  # the line that ends in (or holds) the `\`
    assert any(p.startswith(f"line {line}: a backslash") for p in found.problems), found.problems
    with pytest.raises(CaddyError, match="continues it onto the next line") as err:
        caddy.rewrite(text, ENV, Slot.GREEN)
    assert err.value.exit_code == ExitCode.PRECONDITION
    assert "with no backslash at a line's end" in (err.value.fix or "")


def test_a_quote_left_open_in_the_block_is_refused() -> None:
    """Caddy runs a quote on over the line's end: the lines after it are no directives."""
    text = in_site('header_down X-Note "a\nreverse_proxy localhost:8081"\n'
                   "reverse_proxy localhost:8081\n")
    assert caddy.inspect(text, ENV).slot is None
    with pytest.raises(CaddyError, match="line 3: a quoted string runs on") as err:
        caddy.rewrite(text, ENV, Slot.GREEN)
    assert err.value.exit_code == ExitCode.PRECONDITION


def test_a_lone_backslash_is_no_upstream_host() -> None:
    """`\\` is no host: not another service's upstream to leave be, but one not understood."""
    text = in_site("reverse_proxy localhost:8081 \\ x\n")
    found = caddy.inspect(text, ENV)
    assert found.slot is None
    assert any("upstream '\\\\' is not host:port" in p for p in found.problems), found.problems


IMPORT_IN_THE_BLOCK = """\
{
\tadmin off
}
(app_api) {
\treverse_proxy /api/* localhost:8081
}
http://127.0.0.1:18080 {
\t# BLUE_GREEN_SLOT_START
\timport app_api
\treverse_proxy localhost:8081 {
\t\theader_down X-Togather-Slot "blue"
\t}
\t# BLUE_GREEN_SLOT_END
}
"""


def test_an_import_between_the_markers_is_a_problem_and_refused() -> None:
    """The review's case: the snippet's upstream was never rewritten, so the switch split the
    traffic (/api/* stayed on blue) and verification, on /version, passed."""
    found = caddy.inspect(IMPORT_IN_THE_BLOCK, ENV)
    assert not found.consistent and found.slot is None
    assert found.problems == (
        "line 9: `import app_api` brings in text the switch cannot see or rewrite",)
    with pytest.raises(CaddyError) as err:
        caddy.rewrite(IMPORT_IN_THE_BLOCK, ENV, Slot.GREEN)
    assert err.value.message == ("cannot rewrite the managed block: line 9: `import app_api` "
                                 "brings in text the switch cannot see or rewrite")
    assert err.value.fix == "inline the snippet between the slot markers"
    assert err.value.exit_code == 4


@pytest.mark.parametrize(("line", "words", "fix"), [
    ("\treverse_proxy localhost:8081 {\n\t\timport upstreams\n\t}", "`import upstreams`",
     "inline the snippet"),
    ("\timport /etc/caddy/togather-*.caddy", "`import /etc/caddy/togather-*.caddy`",
     "inline the snippet"),
    ("\tinvoke app_route", "`invoke app_route` runs a named route", "inline the named route"),
    ("\treverse_proxy /api/* {\n\t\tdynamic a localhost 8081\n\t}",
     "`dynamic a localhost 8081` looks its upstreams up per request", "plain host:port"),
])
def test_directives_whose_upstreams_the_switch_cannot_see_are_refused(
        line: str, words: str, fix: str) -> None:
    text = ("site {\n\t# BLUE_GREEN_SLOT_START\n\treverse_proxy localhost:8081\n"
            f"{line}\n\t# BLUE_GREEN_SLOT_END\n}}\n")
    found = caddy.inspect(text, ENV)
    assert found.slot is None and any(words in p for p in found.problems), found.problems
    with pytest.raises(CaddyError) as err:
        caddy.rewrite(text, ENV, Slot.GREEN)
    assert words in err.value.message and "\n" not in err.value.message
    assert err.value.fix and fix in err.value.fix


def test_an_import_outside_the_markers_is_not_the_switchs() -> None:
    text = ("(x) {\n\trespond ok\n}\nsite {\n\timport x\n\t# BLUE_GREEN_SLOT_START\n"
            "\treverse_proxy localhost:8081\n\t# BLUE_GREEN_SLOT_END\n}\n")
    assert caddy.active_slot(text, ENV) is Slot.BLUE
    assert caddy.rewrite(text, ENV, Slot.GREEN) == text.replace(":8081", ":8082")


# --- imports of files: where Caddy looks for them depends on how it is given the Caddyfile ---

SITES_IMPORTED = HOST_CADDYFILE.replace(
    "# Other sites on this host", "(common) {\n\tencode gzip\n}\nimport sites/*.caddy\r\n"
    "import /etc/caddy/global.caddy # absolute\n\n# Other sites on this host").replace(
    "\tencode gzip\n\t@api", "\timport common\n\t\"import\" later\n\t@api")
SITES_LATER = SITES_IMPORTED + "(later) {\n\theader X-Later 1\n}\n"


def test_file_imports_are_every_import_but_of_a_snippet_defined_above_it() -> None:
    assert caddy.file_imports(SITES_LATER) == (
        caddy.FileImport(9, "sites/*.caddy"), caddy.FileImport(10, "/etc/caddy/global.caddy"),
        caddy.FileImport(20, "later"))  # defined below: Caddy globs a file (see the real test)
    assert [i.relative for i in caddy.file_imports(SITES_LATER)] == [True, False, True]
    assert caddy.file_imports(HOST_CADDYFILE) == ()


def test_a_relative_file_import_is_refused_when_caddy_is_sent_the_text() -> None:
    """The admin API gets the text with no path: Caddy would glob sites/*.caddy in its own
    working directory, match nothing (a warning only) and drop those sites."""
    env = make_env(Path("/etc/caddy/Caddyfile"))
    with pytest.raises(CaddyError) as err:
        caddy.check_imports(env, SITES_LATER)
    assert err.value.message == (
        '/etc/caddy/Caddyfile has a relative file import (line 9: import sites/*.caddy, line '
        '20: import later): with reload = "admin-api" Caddy is sent the text without its path '
        'and looks for the files in its own working directory, so the reload would drop what '
        'they hold; nothing was changed')
    assert err.value.fix == (
        'make the import path absolute (import /etc/caddy/sites/*.caddy), or set reload = '
        '"caddy-reload" or "systemctl" under [caddy] in /tmp/test-env.toml, so Caddy reads the '
        'Caddyfile itself')
    assert err.value.exit_code == 4
    for method in ("caddy-reload", "systemctl"):  # Caddy reads the file: imports resolve
        caddy.check_imports(make_env(reload=method), SITES_LATER)
    caddy.check_imports(env, SITES_LATER.replace("import sites/", "import /etc/caddy/sites/")
                        .replace("(later)", "(unused)").replace("\"import\" later", ""))
    caddy.check_imports(env, HOST_CADDYFILE)


@pytest.mark.parametrize("reload", ["admin-api", "caddy-reload"])
def test_the_plan_refuses_a_relative_import_before_anything_changes(
        tmp_path: Path, reload: str) -> None:
    path = tmp_path / "Caddyfile"
    path.write_bytes(SITES_IMPORTED.encode())
    env = make_env(path, reload=reload)
    if reload == "caddy-reload":
        assert caddy.plan_switch(env, Slot.GREEN).changed
        return
    with pytest.raises(CaddyError, match="line 9: import sites/") as err:
        caddy.plan_switch(env, Slot.GREEN)
    assert f"import {tmp_path}/sites/*.caddy" in (err.value.fix or "")
    assert path.read_bytes() == SITES_IMPORTED.encode()


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


def test_rewrite_leaves_an_upstream_on_another_port_as_it_is() -> None:
    """A port that is no slot's may be another service's: never retargeted to the app."""
    text = HOST_CADDYFILE.replace("localhost:8081 {", "localhost:9999 {")
    assert caddy.active_slot(text, ENV) is Slot.BLUE
    assert caddy.rewrite(text, ENV, Slot.BLUE) == text
    assert caddy.rewrite(text, ENV, Slot.GREEN) == text.replace(
        "127.0.0.1:8081", "127.0.0.1:8082").replace('header_down X-Togather-Slot "blue"',
                                                    'header_down X-Togather-Slot "green"')


def test_health_check_ports_on_a_slot_move_with_the_switch() -> None:
    """A health_port or health_upstream left on the old slot's port marks the new upstream
    down once the old slot stops: they are rewritten with the upstreams, and one naming the
    other slot makes the block inconsistent (refused, never guessed)."""
    text = HOST_CADDYFILE.replace("\t\t\thealth_uri /health\n",
                                  "\t\t\thealth_uri /health\n\t\t\thealth_port 8081\n"
                                  "\t\t\thealth_upstream 127.0.0.1:8081\n")
    assert caddy.active_slot(text, ENV) is Slot.BLUE
    green = caddy.rewrite(text, ENV, Slot.GREEN)
    assert "health_port 8082\n" in green and "health_upstream 127.0.0.1:8082\n" in green
    assert "8081" not in green.split("# BLUE_GREEN_SLOT_START")[1].split("# BLUE_GREEN")[0]
    assert caddy.rewrite(green, ENV, Slot.BLUE) == text
    mixed = text.replace("health_port 8081", "health_port 8082")
    found = caddy.inspect(mixed, ENV)
    assert found.slot is None and any("names both slots" in p for p in found.problems)
    elsewhere = text.replace("health_port 8081", "health_port 9100")  # a port of its own
    assert "health_port 9100" in caddy.rewrite(elsewhere, ENV, Slot.GREEN)
    bad = text.replace("health_port 8081", "health_port {$HEALTH_PORT}")
    assert caddy.inspect(bad, ENV).problems


def test_the_wrong_port_repair_refuses_an_upstream_named_after_a_container() -> None:
    """Found by review: with Caddy in a container proxying to `togather-server-blue:8080`
    (the slots' network, no slot's port), the repair kept the name and put a slot's port on
    it: a 502 for every user until verification put the file back. So is a container's (or
    another machine's) address; one of this host is still repaired."""
    text = HOST_CADDYFILE.replace("localhost:8081 {", "togather-server-blue:8080 {").replace(
        "127.0.0.1:8081 {", "togather-server-blue:8080 {")
    with pytest.raises(CaddyError, match="not this host") as err:
        caddy.rewrite(text, ENV, Slot.GREEN)
    assert err.value.exit_code == ExitCode.PRECONDITION
    elsewhere = text.replace("togather-server-blue:8080", "192.0.2.7:8080")  # TEST-NET-1
    with pytest.raises(CaddyError, match="not this host"):
        caddy.rewrite(elsewhere, ENV, Slot.GREEN)
    loopback = text.replace("togather-server-blue:8080", "127.0.0.2:8018")
    assert "127.0.0.2:8082" in caddy.rewrite(loopback, ENV, Slot.GREEN)


GRAFANA_BESIDE_THE_APP = """\
togather.example.org {
\t# BLUE_GREEN_SLOT_START
\thandle_path /grafana/* {
\t\treverse_proxy localhost:3000
\t}
\treverse_proxy /legacy/* localhost
\treverse_proxy localhost:8081 {
\t\theader_down X-Togather-Slot "blue"
\t}
\t# BLUE_GREEN_SLOT_END
}
"""


def test_only_upstreams_on_a_slot_port_are_switched() -> None:
    """The review's case: another service's route between the markers. Before, the switch
    sent /grafana/* (port 3000) and /legacy/* (no port: 80) to the app too."""
    assert caddy.rewrite(GRAFANA_BESIDE_THE_APP, ENV, Slot.GREEN) == """\
togather.example.org {
\t# BLUE_GREEN_SLOT_START
\thandle_path /grafana/* {
\t\treverse_proxy localhost:3000
\t}
\treverse_proxy /legacy/* localhost
\treverse_proxy localhost:8082 {
\t\theader_down X-Togather-Slot "green"
\t}
\t# BLUE_GREEN_SLOT_END
}
"""
    found = caddy.inspect(GRAFANA_BESIDE_THE_APP, ENV)
    assert found.slot is Slot.BLUE and found.consistent and found.problems == ()
    assert found.warnings == (
        "line 4: upstream localhost:3000 is no slot's port (known: blue (8081), green (8082)): "
        "left as it is",
        "line 6: upstream localhost (port 80) is no slot's port (known: blue (8081), "
        "green (8082)): left as it is")


def test_an_upstream_without_a_port_is_switched_only_when_its_default_port_is_a_slots() -> None:
    env = make_env().with_(slots={
        slot: dataclasses.replace(cfg, port=80 if slot is Slot.BLUE else cfg.port)
        for slot, cfg in ENV.slots.items()})
    # two routes (one pool of both would be refused: a switch could not move it whole)
    text = ("# BLUE_GREEN_SLOT_START\nreverse_proxy localhost\n"
            "reverse_proxy /s/* https://localhost\n# BLUE_GREEN_SLOT_END\n")
    assert caddy.active_slot(text, env) is Slot.BLUE  # port 80; https:// is 443
    assert caddy.rewrite(text, env, Slot.GREEN) == text.replace(
        "proxy localhost\n", "proxy localhost:8082\n")
    pooled = text.replace("localhost\nreverse_proxy /s/* https", "localhost https")
    with pytest.raises(CaddyError, match=r"line 2: upstream https://localhost .* pool"):
        caddy.rewrite(pooled, env, Slot.GREEN)
    # with no upstream on a slot's port (80 is no slot's here), the repair repoints them all
    assert caddy.rewrite(pooled, ENV, Slot.GREEN) == pooled.replace(
        "proxy localhost https://localhost", "proxy localhost:8082 https://localhost:8082")


def test_rewrite_preserves_crlf_files_byte_for_byte() -> None:
    crlf = HOST_CADDYFILE.replace("\n", "\r\n")
    new = caddy.rewrite(crlf, ENV, Slot.GREEN)
    assert outside(new) == outside(crlf)
    assert new.encode() == caddy.rewrite(HOST_CADDYFILE, ENV, Slot.GREEN).replace(
        "\n", "\r\n").encode()
    assert new.count("\r\n") == crlf.count("\r\n")


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
# Above the block and in it, text Caddy reads line by line: no backslash (it continues a line,
# even in a comment) and no quote (one left open runs into the block); such a block is
# refused whole (test_a_line_caddy_joins_to_the_next_in_the_block_is_refused). UTF-8 only: a
# Caddyfile is read as UTF-8, so a lone surrogate cannot be in one (it cannot even be sent).
QUIET_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\\\"`"),
                     max_size=60).filter(
    lambda s: "BLUE_GREEN_SLOT" not in s)
LINE_TEXT = QUIET_TEXT.map(lambda s: s.replace("\n", " "))


SLOT_PORT_TEXT = [":8081", ":8082"]
OTHER_PORT_TEXT = [":8080", ":9000", ":1", ":3000", ""]


@st.composite
def upstream(draw: st.DrawFn, ports: list[str] | None = None) -> str:
    host = draw(st.sampled_from(["localhost", "127.0.0.1", "http://localhost", "[::1]",
                                 "h2c://127.0.0.1"]))
    port = draw(st.sampled_from(ports or SLOT_PORT_TEXT + OTHER_PORT_TEXT))
    quote = draw(st.sampled_from(["", '"']))
    return f"{quote}{host}{port}{quote}"


def one_pool(draw: st.DrawFn) -> list[str]:
    """The ports of one reverse_proxy's upstreams: all a slot's, or all another service's (a
    pool that mixes them is refused: test_a_pool_mixing_a_slot_with_another_upstream_...)."""
    return draw(st.sampled_from([SLOT_PORT_TEXT, OTHER_PORT_TEXT]))


@st.composite
def unit(draw: st.DrawFn) -> str:
    ind, eol = draw(INDENT), draw(EOL)
    ups = " ".join(draw(st.lists(upstream(one_pool(draw)), min_size=1, max_size=3)))
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
    return draw(QUIET_TEXT) + start_line + "".join(units) + end_line + draw(FREE_TEXT)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(text=caddyfile(), target=st.sampled_from(list(Slot)))
def test_rewrite_never_changes_bytes_outside_the_markers_and_is_idempotent(
        text: str, target: Slot) -> None:
    new = caddy.rewrite(text, ENV, target)
    assert outside(new) == outside(text)
    assert new.count("\n") == text.count("\n")
    assert new.count("\r") == text.count("\r")
    assert caddy.rewrite(new, ENV, target) == new
    assert caddy.rewrite(caddy.rewrite(new, ENV, target.other), ENV, target) == new


# --- what the real Caddy reads in a rewritten Caddyfile (POST /adapt: nothing is loaded) ------

SLOT_HEADER_KEY = "X-Togather-Slot"
Config = dict[str, Any]


@pytest.fixture
def admin(drill_stack: DrillStack) -> Iterator[httpx.Client]:
    """A client for the session drill Caddy's admin API; Caddy is (re)started first when an
    earlier test left it stopped. /adapt changes nothing, so no reset is needed."""
    if not caddy.is_running(drill_stack.env):
        drill_stack.reset()
    with drill_http.client(base_url=drill_stack.env.caddy.admin_url, timeout=10) as client:
        yield client


def adapt(client: httpx.Client, text: str) -> Config:
    """Caddy's own JSON for a Caddyfile: its adapter is the oracle of what the text means."""
    answer = client.post("/adapt", content=text.encode(),
                         headers={"Content-Type": "text/caddyfile"})
    assert answer.status_code == 200, f"Caddy rejected it: {answer.text}\n{text}"
    result: Config = answer.json()["result"]
    return result


def routes_of(config: Config) -> Iterator[tuple[list[str], Config]]:
    """(listen addresses, top-level route) of every server."""
    for server in config["apps"]["http"]["servers"].values():
        for route in server.get("routes", []):
            yield server["listen"], route


def hosts(route: Config) -> set[str]:
    return {h for m in route.get("match", []) for h in m.get("host", [])}


SLOT_PORTS = {str(c.port) for c in ENV.slots.values()}


def retarget(node: Any, port: int, slot: Slot) -> Any:
    """`node` with every upstream Caddy dials on a slot's port dialling `port` instead and
    every X-Togather-Slot header saying `slot`: what a switch must change in Caddy's view, and
    nothing else (another service's upstream, on another port, keeps its dial)."""
    if isinstance(node, dict):
        out: Config = {}
        for key, value in node.items():
            if key == "dial" and isinstance(value, str) and value.rsplit(":", 1)[1] in SLOT_PORTS:
                out[key] = f"{value.rsplit(':', 1)[0]}:{port}"
            elif key == SLOT_HEADER_KEY and isinstance(value, list):
                out[key] = [str(slot)] * len(value)
            else:
                out[key] = retarget(value, port, slot)
        return out
    if isinstance(node, list):
        return [retarget(item, port, slot) for item in node]
    return node


def expected_view(config: Config, managed: Callable[[list[str], Config], bool], port: int,
                  slot: Slot) -> Config:
    """Caddy's view of the old text with only the managed site's routes retargeted."""
    out = copy.deepcopy(config)
    for server in out["apps"]["http"]["servers"].values():
        server["routes"] = [retarget(route, port, slot) if managed(server["listen"], route)
                            else route for route in server.get("routes", [])]
    return out


def proxy_handlers(node: Any) -> list[Config]:
    """Every reverse_proxy handler under `node`, in order."""
    found: list[Config] = []
    if isinstance(node, dict):
        if node.get("handler") == "reverse_proxy":
            found.append(node)
        for value in node.values():
            found += proxy_handlers(value)
    elif isinstance(node, list):
        for item in node:
            found += proxy_handlers(item)
    return found


def proxies(node: Any) -> list[tuple[list[str], list[str]]]:
    """(dials, X-Togather-Slot values) of every reverse_proxy handler under `node`."""
    found: list[tuple[list[str], list[str]]] = []
    for handler in proxy_handlers(node):
        headers = handler.get("headers", {}).get("response", {})
        values = [v for part in ("set", "add") for v in
                  headers.get(part, {}).get(SLOT_HEADER_KEY, [])]
        found.append(([u["dial"] for u in handler.get("upstreams", [])], values))
    return found


def togather_site(_listen: list[str], route: Config) -> bool:
    return "togather.example.org" in hosts(route)


@pytest.mark.docker
@pytest.mark.parametrize("eol", ["\n", "\r\n"])
@pytest.mark.parametrize("target", list(Slot))
def test_caddy_reads_a_rewritten_host_caddyfile_as_the_target_and_nothing_else(
        admin: httpx.Client, eol: str, target: Slot) -> None:
    text = HOST_CADDYFILE.replace("\n", eol)
    before = adapt(admin, text)
    after = adapt(admin, caddy.rewrite(text, ENV, target))
    port = ENV.slot(target).port
    assert after == expected_view(before, togather_site, port, target)
    managed = [p for _, r in routes_of(after) if togather_site([], r) for p in proxies(r)]
    assert sorted(managed) == [([f"127.0.0.1:{port}"], [str(target)]),
                               ([f"localhost:{port}"], [str(target)])], managed
    other = [r for _, r in routes_of(after) if "status.example.org" in hosts(r)]
    assert proxies(other) == [(["localhost:8081"], [])], "the unmanaged site moved"
    assert f'"{SLOT_HEADER_KEY}":["blue"]' in json.dumps(other, separators=(",", ":"))


MANAGED_LISTEN = ":18080"
WRAPPER = (
    "{{\n\tadmin off\n}}\n"
    "http://127.0.0.1:18081 {{\n"
    "\treverse_proxy localhost:8081 {{\n\t\theader_down X-Togather-Slot blue\n\t}}\n"
    "}}\n"
    "http://127.0.0.1:18080 {{\n"
    "\t@api path /api/*\n"
    "{block}"
    "\n}}\n"
)


@st.composite
def valid_unit(draw: st.DrawFn) -> str:
    """A unit Caddy accepts: one scheme per reverse_proxy (Caddy 2.6 refuses to mix)."""
    ind, eol = draw(INDENT), draw(EOL)
    scheme = draw(st.sampled_from(["", "http://", "h2c://"]))

    parts = []
    ports = one_pool(draw)
    for host in draw(st.lists(st.sampled_from(["localhost", "127.0.0.1", "[::1]"]),
                              min_size=1, max_size=3)):
        port = draw(st.sampled_from(ports))
        quote = draw(st.sampled_from(["", '"']))
        parts.append(f"{quote}{scheme}{host}{port}{quote}")
    upstreams = " ".join(parts)
    matcher = draw(st.sampled_from(["", "@api ", "/api/* ", "* "]))
    value = draw(st.sampled_from(['"blue"', '"green"', "blue", "green", "`blue`"]))
    plus = draw(st.sampled_from(["", "+"]))
    kind = draw(st.sampled_from(["plain", "block", "handle", "to", "comment", "respond",
                                 "header", "blank", "other service"]))
    if kind == "plain":
        return f"{ind}reverse_proxy {matcher}{upstreams}{eol}"
    if kind == "block":
        return (f"{ind}reverse_proxy {matcher}{upstreams} {{{eol}{ind}\theader_down "
                f"{plus}X-Togather-Slot {value}{eol}{ind}}}{eol}")
    if kind == "to":
        return (f"{ind}reverse_proxy {matcher}{{{eol}{ind}\tto {upstreams}{eol}{ind}"
                f"\theader_down X-Togather-Slot {value}{eol}{ind}}}{eol}")
    if kind == "handle":
        return (f"{ind}handle {matcher}{{{eol}{ind}\treverse_proxy {upstreams} {{{eol}"
                f"{ind}\t\theader_down X-Togather-Slot {value}{eol}{ind}\t}}{eol}{ind}}}{eol}")
    if kind == "comment":
        return f"{ind}# {draw(LINE_TEXT).replace(chr(13), ' ')}{eol}"
    if kind == "respond":
        return f'{ind}respond /where "localhost:{draw(st.sampled_from([8081, 8082]))}"{eol}'
    if kind == "header":
        return f"{ind}header {matcher}X-Togather-Slot {value}{eol}"
    if kind == "other service":
        return (f"{ind}handle_path /grafana/* {{{eol}{ind}\treverse_proxy localhost:3000{eol}"
                f"{ind}}}{eol}")
    return f"{ind}{eol}"


@st.composite
def caddy_site(draw: st.DrawFn) -> str:
    units = draw(st.lists(valid_unit(), min_size=0, max_size=5))
    units.insert(draw(st.integers(0, len(units))), f"\treverse_proxy localhost:8081{draw(EOL)}")
    start = "\t# BLUE_GREEN_SLOT_START" + draw(LINE_TEXT).replace("\r", " ") + draw(EOL)
    end = "\t# BLUE_GREEN_SLOT_END" + draw(LINE_TEXT).replace("\r", " ")
    return WRAPPER.format(block=start + "".join(units) + end)


def managed_server(listen: list[str], _route: Config) -> bool:
    return any(a.endswith(MANAGED_LISTEN) for a in listen)


@pytest.mark.docker
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=caddy_site(), target=st.sampled_from(list(Slot)))
def test_caddy_sees_every_managed_upstream_and_slot_header_retargeted_and_nothing_else(
        admin: httpx.Client, text: str, target: Slot) -> None:
    """Whatever valid block the generator writes, Caddy's own reading of the rewritten file
    is its reading of the old one with exactly the managed dials on a slot's port and the
    slot headers changed; dials on any other port (another service's) are Caddy's as before."""
    before = adapt(admin, text)
    after = adapt(admin, caddy.rewrite(text, ENV, target))
    port = ENV.slot(target).port
    assert after == expected_view(before, managed_server, port, target)
    seen = [d for listen, r in routes_of(after) if managed_server(listen, r)
            for dials, _ in proxies(r) for d in dials if d.rsplit(":", 1)[1] in SLOT_PORTS]
    assert seen and all(d.endswith(f":{port}") for d in seen), seen
    values = [v for listen, r in routes_of(after) if managed_server(listen, r)
              for _, vs in proxies(r) for v in vs]
    assert all(v == str(target) for v in values), values


@pytest.mark.docker
def test_caddy_still_sends_another_services_route_to_its_own_port_after_a_switch(
        admin: httpx.Client) -> None:
    """The review's case, judged by Caddy's adapter: /grafana/* dials port 3000 and /legacy/*
    port 80 after the switch as before; only the app's upstream moves."""
    text = WRAPPER.format(block="".join(
        GRAFANA_BESIDE_THE_APP.splitlines(keepends=True)[1:-1]))
    before = adapt(admin, text)
    after = adapt(admin, caddy.rewrite(text, ENV, Slot.GREEN))
    assert after == expected_view(before, managed_server, 8082, Slot.GREEN)
    managed = sorted(p for listen, r in routes_of(after) if managed_server(listen, r)
                     for p in proxies(r))
    assert managed == [(["localhost:3000"], []), (["localhost:80"], []),
                       (["localhost:8082"], ["green"])], managed


@pytest.mark.docker
def test_caddy_dials_a_slot_through_an_import_the_switch_cannot_rewrite(
        admin: httpx.Client) -> None:
    """Caddy's adapter shows what the imported snippet brings between the markers: a second
    upstream on blue's port. A rewrite could not move it, so it refuses."""
    view = adapt(admin, IMPORT_IN_THE_BLOCK)
    managed = sorted(p for listen, r in routes_of(view) if managed_server(listen, r)
                     for p in proxies(r))
    assert managed == [(["localhost:8081"], []), (["localhost:8081"], ["blue"])], managed
    with pytest.raises(CaddyError, match="`import app_api`"):
        caddy.rewrite(IMPORT_IN_THE_BLOCK, ENV, Slot.GREEN)


@pytest.mark.docker
def test_caddy_joins_the_lines_the_switch_refuses_and_only_those(admin: httpx.Client) -> None:
    """Caddy's adapter is the oracle: in each refused block it dials blue's port on the joined
    line too ([::1]:8081, to no line the switch read as an upstream); in the switched one it
    reads each line alone, and after the switch dials green only."""
    for case, block in JOINED.items():
        dials = sorted(d for _, r in routes_of(adapt(admin, in_site(block)))
                       for p in proxies(r) for d in p[0])
        assert "[::1]:8081" in dials and all(d.endswith(":8081") for d in dials), (case, dials)
        with pytest.raises(CaddyError):
            caddy.rewrite(in_site(block), ENV, Slot.GREEN)
    text = in_site(NOT_JOINED)
    assert caddy.inspect(text, ENV).slot is Slot.BLUE
    before = [p for _, r in routes_of(adapt(admin, text)) for p in proxies(r)]
    assert sorted(d for p in before for d in p[0]) == ["127.0.0.1:8081", "[::1]:8081"]
    after = [p for _, r in routes_of(adapt(admin, caddy.rewrite(text, ENV, Slot.GREEN)))
             for p in proxies(r)]
    assert sorted(after) == [(["127.0.0.1:8082"], ["green"]), (["[::1]:8082"], ["green"])]


@pytest.mark.docker
@pytest.mark.parametrize("text", [
    "(common) {\n\trespond ok\n}\nhttp://127.0.0.1:18080 {\n\timport common\n}\n",
    "http://127.0.0.1:18080 {\n\timport common\n}\n(common) {\n\trespond ok\n}\n",
    "http://127.0.0.1:18080 {\n\t\"import\" common\n}\n(common) {\n\trespond ok\n}\n",
    "import /nonexistent/common\nhttp://127.0.0.1:18080 {\n\trespond ok\n}\n",
    "\ufeffimport /nonexistent/common\nhttp://127.0.0.1:18080 {\n\trespond ok\n}\n",  # BOM
])
def test_file_imports_are_what_caddy_looks_for_as_files(admin: httpx.Client, text: str) -> None:
    """Caddy's adapter is the oracle: it takes `import common` for a file, and says it found
    none, exactly when file_imports names it."""
    answer = admin.post("/adapt", content=text.encode(),
                        headers={"Content-Type": "text/caddyfile"})
    looked_for = re.findall(r"File to import not found: (\S+)$", answer.json().get("error", ""))
    assert [i.pattern for i in caddy.file_imports(text)] == looked_for, answer.text


@pytest.mark.docker
@pytest.mark.parametrize("line", ["import sites/common", '\t"import" "sites/common" # why',
                                  "import `sites/common` arg", "import /srv/abs/common",
                                  "\ufeff import sites/common"])
@pytest.mark.parametrize("folder", ["/srv/caddy", "/srv/my caddy/", '/srv/a"b', "/srv/a`b"])
def test_a_relative_import_is_made_the_file_caddy_reads_beside_the_caddyfile(
        admin: httpx.Client, line: str, folder: str) -> None:
    """imports_from (what the plan adapts to compare with what Caddy runs): Caddy's adapter,
    given the text, looks for the file beside the Caddyfile's folder, as its reload of the
    file does; quoted as written, an absolute import as it is."""
    text = f"{line}\nhttp://127.0.0.1:18080 {{\n\trespond ok\n}}\n"
    answer = admin.post("/adapt", content=caddy.imports_from(text, folder).encode(),
                        headers={"Content-Type": "text/caddyfile"})
    looked_for = re.findall(r"File to import not found: (.+)$", answer.json().get("error", ""))
    want = "/srv/abs/common" if "/srv/abs" in line else f"{folder.rstrip('/')}/sites/common"
    assert looked_for == [want], answer.text


def test_what_may_not_be_a_file_beside_the_caddyfile_is_left_as_written(
        tmp_path: Path) -> None:
    """Found by review: a bare name may be a snippet another imported file defines (made a
    path, Caddy's adapter looked for a file and failed); `{$VAR}` may hold an absolute path;
    a line inside a quoted string that runs on is no import. Each stays as written; a bare
    name with a file of that name beside the Caddyfile is that file."""
    text = ("import snippets.caddy\nimport common\nimport {$SITES}/*.caddy\n"
            'respond "a\nimport quoted\n"\nimport beside\n')
    (tmp_path / "snippets.caddy").write_text("(common) {\n}\n")
    (tmp_path / "beside").write_text("")
    out = caddy.imports_from(text, "/etc/caddy", tmp_path).split("\n")
    assert out[:6] == ["import /etc/caddy/snippets.caddy", "import common",
                       "import {$SITES}/*.caddy", 'respond "a', "import quoted", '"'], out
    assert out[6] == "import /etc/caddy/beside", out


def other_site_answers(stack: DrillStack) -> str:
    """The drill's other site, as a request to it finds it ('' when Caddy serves it not)."""
    answer = drill_http.get(f"http://127.0.0.1:{stack.ports.other_site}/ping", timeout=5)
    return answer.text if answer.status_code == 200 else ""


@pytest.mark.docker
@pytest.mark.parametrize(("method", "path"), [
    (ReloadMethod.ADMIN_API, "relative"), (ReloadMethod.CADDY_RELOAD, "relative"),
    (ReloadMethod.ADMIN_API, "absolute")])
def test_a_switch_never_drops_the_sites_the_caddyfile_imports(
        stack: DrillStack, method: ReloadMethod, path: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The review's case with the real Caddy: the drill's other site moved into a file the
    Caddyfile imports (`import extra-*.caddy`) and Caddy loads it. Through the admin API the
    switch used to POST the text and Caddy globbed its own working directory: the switch
    said success and the site was gone. Now it is refused before anything changes; with
    `caddy reload` (Caddy reads the file) or an absolute import it switches, site kept."""
    env = with_reload(stack, method, tmp_path, monkeypatch)
    text = caddy.read(env)
    site = re.search(rf"\nhttp://127\.0\.0\.1:{stack.ports.other_site} {{\n.*?\n}}\n", text,
                     re.DOTALL)
    assert site is not None, text
    (stack.caddy_dir / "extra-site.caddy").write_text(site[0])
    where = "extra-*.caddy" if path == "relative" else f"{stack.caddy_mount}/extra-*.caddy"
    text = text.replace(site[0], f"\nimport {where}\n")
    env.caddy.caddyfile.write_text(text)
    loads = caddy.reload_action(stack.env.with_(caddy=dataclasses.replace(
        env.caddy, reload=ReloadMethod.CADDY_RELOAD)))  # `caddy reload`: it reads the file
    assert subprocess.run(loads, capture_output=True, timeout=60, check=False).returncode == 0
    assert other_site_answers(stack) == "pong"
    running = running_config(env)
    if (method, path) == (ReloadMethod.ADMIN_API, "relative"):
        with pytest.raises(CaddyError) as err:
            switch.switch(env, switch.Options(slot=Slot.GREEN, reason="test: relative import"))
        line = text[:text.index("import extra")].count("\n") + 1
        assert f"line {line}: import extra-*.caddy" in err.value.message
        assert err.value.exit_code == 4 and "\n" not in err.value.message
        assert f"import {stack.caddy_mount}/extra-*.caddy" in (err.value.fix or "")
        assert env.caddy.caddyfile.read_text() == text and running_config(env) == running
        assert_caddy_serves(env, Slot.BLUE)
        said = [p.problem for p in status.problems(status.collect(env))]  # before 3 a.m.
        assert any(f"line {line}: import extra-*.caddy" in p for p in said), said
    else:
        switch.switch(env, switch.Options(slot=Slot.GREEN, reason=f"test: {path} import"))
        assert_caddy_serves(env, Slot.GREEN)
        assert f"\nimport {where}\n" in env.caddy.caddyfile.read_text()
    assert other_site_answers(stack) == "pong"


# --- what the real Caddy runs after a reload, and where a request through it goes ----------



def running_config(env: Environment) -> Config:
    """What Caddy runs now, from its admin API."""
    answer = drill_http.get(f"{env.caddy.admin_url}/config/", timeout=10)
    assert answer.status_code == 200, answer.text
    config: Config = answer.json()
    return config


def served_dials(env: Environment) -> set[str]:
    """Every upstream Caddy dials for the proxied app's site (the proxy port's server)."""
    proxy_port = env.caddy.proxy_url.rsplit(":", 1)[1]
    return {d for listen, route in routes_of(running_config(env))
            if any(a.endswith(f":{proxy_port}") for a in listen)
            for dials, _ in proxies(route) for d in dials}


def assert_caddy_serves(env: Environment, slot: Slot) -> None:
    assert served_dials(env) == {f"localhost:{env.slot(slot).port}"}, served_dials(env)
    header, _ = through_proxy(env)
    assert header == str(slot)


def test_a_load_on_the_etag_of_a_config_caddy_no_longer_runs_is_refused_changing_nothing(
        stack: DrillStack) -> None:
    """The switch's load is a compare-and-swap: the ETag Caddy sends with its config (a
    trailer of its chunked GET /config/ answer, which http.client drops) is read as Caddy
    sent it (Caddy itself takes a POST /config/ If-Match it), a load If-Match it goes
    through, and a load If-Match the ETag of a config replaced since is refused (412, exit 4)
    with Caddy's config untouched."""
    env = stack.env
    blue, green = stack.caddyfile_text(Slot.BLUE), stack.caddyfile_text(Slot.GREEN)
    try:
        config, etag = caddy.running_config_tagged(env)
        assert etag is not None and etag.startswith('"/config/ '), etag
        taken = drill_http.post(f"{env.caddy.admin_url}/config/", content=json.dumps(config),
                                headers={"Content-Type": "application/json",
                                         "If-Match": etag}, timeout=10)
        assert taken.status_code == 200, taken.text  # Caddy's own ETag, as it sent it
        drill_http.post(f"{env.caddy.admin_url}/load", content=green,
                        headers={"Content-Type": "text/caddyfile"}, timeout=10
                        ).raise_for_status()  # another change: Caddy now runs green
        changed = running_config(env)
        with pytest.raises(caddy.CaddyConflictError) as err:
            caddy_admin.load_running(env, config, etag)
        assert err.value.exit_code == ExitCode.PRECONDITION
        assert "HTTP 412" in err.value.message, err.value.message
        with pytest.raises(caddy.CaddyConflictError):
            caddy.reload(env, blue, etag=etag)
        assert running_config(env) == changed  # neither load changed anything
        now, fresh = caddy.running_config_tagged(env)
        assert fresh is not None and fresh != etag and now == changed
        caddy.reload(env, blue, etag=fresh)  # on the ETag of what runs: loaded
        assert_caddy_serves(env, Slot.BLUE)
    finally:
        drill_http.post(f"{env.caddy.admin_url}/load", content=blue,
                        headers={"Content-Type": "text/caddyfile"}, timeout=10)


SYSTEMCTL = """\
#!{python}
\"\"\"`systemctl` for this test: systemd cannot run in the test's container, so this stands in
for it, doing what caddy.service does on a host: `is-active caddy` asks whether the Caddy
process runs, `reload caddy` runs its ExecReload (`caddy reload --config ...`), here inside
the drill's Caddy container. Every call is appended to {log!r}.\"\"\"
import json, subprocess, sys
CONTAINER, CADDYFILE, ADMIN, LOG = {container!r}, {caddyfile!r}, {address!r}, {log!r}
with open(LOG, "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
verb, unit = sys.argv[1], sys.argv[-1]
if unit != "caddy":
    sys.exit(f"Unit {{unit}}.service could not be found.")
if verb == "is-active":
    if {outside!r}:  # a Caddy started by hand or by another supervisor: not the unit's
        print("inactive")
        sys.exit(3)
    out = subprocess.run(["docker", "inspect", "-f", "{{{{.State.Running}}}}", CONTAINER],
                         capture_output=True, text=True, check=False)
    running = out.stdout.strip() == "true"
    print("active" if running else "inactive")
    sys.exit(0 if running else 3)
if verb == "reload":
    sys.exit(subprocess.run(["docker", "exec", CONTAINER, "caddy", "reload", "--config",
                             CADDYFILE, "--adapter", "caddyfile", "--address", ADMIN],
                            check=False).returncode)
sys.exit(f"unsupported: {{sys.argv[1:]}}")
"""


def with_reload(stack: DrillStack, method: ReloadMethod, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch, *, outside: bool = False) -> Environment:
    """The stack's environment reloading Caddy the given way. For systemctl, a `systemctl`
    executable first on PATH (see SYSTEMCTL) reloads the real Caddy; its calls are logged.
    `outside`: Caddy runs, but not as the unit (is-active says inactive)."""
    env = stack.env
    env = env.with_(caddy=dataclasses.replace(env.caddy, reload=method))
    if method is ReloadMethod.SYSTEMCTL:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "systemctl"
        shim.write_text(SYSTEMCTL.format(
            python=sys.executable, log=str(tmp_path / "systemctl.log"), outside=outside,
            container=stack.caddy_container, caddyfile=caddy.seen_by_caddy(
                env, env.caddy.caddyfile), address=caddy.admin_address(env)))
        shim.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return env


@pytest.mark.docker
@pytest.mark.parametrize("method", list(ReloadMethod))
def test_a_switch_through_each_reload_method_changes_what_caddy_runs(
        stack: DrillStack, method: ReloadMethod, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """admin-api POSTs /load; caddy-reload runs `docker exec <caddy> caddy reload`; systemctl
    runs `systemctl reload caddy` (the stand-in above, which reloads the same real Caddy).
    Each is judged by Caddy's running config and by a real request through it."""
    env = with_reload(stack, method, tmp_path, monkeypatch)
    assert_caddy_serves(env, Slot.BLUE)
    switch.switch(env, switch.Options(slot=Slot.GREEN, reason=f"test: reload by {method}"))
    assert_caddy_serves(env, Slot.GREEN)
    if method is ReloadMethod.SYSTEMCTL:
        calls = [json.loads(line) for line in (tmp_path / "systemctl.log").read_text()
                 .splitlines()]
        assert ["is-active", "caddy"] in calls and calls[-1] == ["reload", "caddy"], calls


@pytest.mark.docker
@pytest.mark.parametrize("serving", ["healthy", "down"])
def test_a_block_without_the_slot_header_is_refused_before_caddy_is_touched(
        stack: DrillStack, serving: str) -> None:
    """Found by review: with no `header_down X-Togather-Slot` between the markers (and an
    app that does not send the header itself) verification through the proxy can never see
    the target. With the serving slot healthy the plan refused, but blamed [caddy] proxy_url;
    with it down (the outage a rollback is for) the switch was written, failed to verify and
    was undone, users moved to the target and back, and the undo's own verification failed
    the same way. Both are refused before the Caddyfile is written, naming the header."""
    env = stack.env
    text = caddy.read(env)
    bare = re.sub(r"\n\s*header_down X-Togather-Slot \"blue\"", "", text)
    assert bare.count("header_down") == 0 and "reverse_proxy localhost:" in bare
    caddy.apply(env, bare)  # what the host runs: the proxy answers without the header
    assert served_dials(env) == {f"localhost:{env.slot(Slot.BLUE).port}"}
    if serving == "down":
        stack.docker("stop", env.slot(Slot.BLUE).container)
    inode, running = env.caddy.caddyfile.stat().st_ino, running_config(env)
    with pytest.raises(CaddyError) as err:
        switch.switch(env, switch.Options(slot=Slot.GREEN, reason="test: no slot header"))
    said = f"{err.value.message} / {err.value.fix}"
    assert err.value.exit_code == ExitCode.PRECONDITION, said
    assert "no header_down X-Togather-Slot" in said and "not moved" in said, said
    assert 'add header_down X-Togather-Slot "blue"' in (err.value.fix or ""), said
    assert env.caddy.caddyfile.stat().st_ino == inode, "the Caddyfile was written"
    assert env.caddy.caddyfile.read_text() == bare
    assert running_config(env) == running


def test_the_slot_header_check_asks_the_target_itself(tmp_path: Path) -> None:
    """An app that sends X-Togather-Slot itself needs no header_down: the switch asks the
    target slot directly, on the verification path, what it sends (real HTTP servers)."""
    import http.server
    import threading

    def serve(header: str | None, starting: int = 0
              ) -> tuple[http.server.ThreadingHTTPServer, int]:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.path)
                if len(seen) <= starting:  # a slot still starting: 503, no header
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                if header is not None:
                    self.send_header("X-Togather-Slot", header)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, server.server_address[1]

    seen: list[str] = []
    for header, expected in (("green", None), (None, "carries no X-Togather-Slot"),
                             ("blue", "X-Togather-Slot: blue")):
        server, port = serve(header)
        try:
            env = make_env(green_port=port)
            problem = caddy.slot_header_problem(env, Slot.GREEN)
        finally:
            server.shutdown()
            server.server_close()
        if expected is None:
            assert problem is None
        else:
            assert problem is not None and expected in problem, problem
    assert seen == [ENV.caddy.verify_path] * 3  # an answer below 500 is asked once
    seen.clear()
    server, port = serve("green", starting=2)  # 503 twice, then the header
    try:
        assert caddy.slot_header_problem(make_env(green_port=port), Slot.GREEN) is None
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 3
    closed = caddy.slot_header_problem(make_env(green_port=port), Slot.GREEN, interval=0.01)
    assert closed is not None and "did not answer" in closed, closed


@pytest.mark.docker
def test_a_caddy_started_outside_systemd_is_not_called_down(
        stack: DrillStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: with reload = "systemctl" and a Caddy that answers but was not
    started by its unit, the switch said "Caddy is not running" and its fix was `systemctl
    start caddy` (a second Caddy on a taken port), and status said Caddy was "not answering".
    The refusal stands (systemctl reload cannot reach that Caddy), but says what is true and
    what fixes it."""
    env = with_reload(stack, ReloadMethod.SYSTEMCTL, tmp_path, monkeypatch, outside=True)
    before = env.caddy.caddyfile.read_bytes(), running_config(env)
    with pytest.raises(RunbookError) as err:
        switch.switch(env, switch.Options(slot=Slot.GREEN, reason="test: outside systemd"))
    said = f"{err.value.message} / {err.value.fix}"
    assert err.value.exit_code == ExitCode.PRECONDITION, said
    assert "not running" not in said, said
    assert not (err.value.fix or "").startswith("systemctl start"), said
    assert "answers" in said and "started outside that unit" in said, said
    assert 'reload = "admin-api"' in said, said
    assert (env.caddy.caddyfile.read_bytes(), running_config(env)) == before
    assert_caddy_serves(env, Slot.BLUE)
    found = status.gather(env)
    assert found["caddy"]["running"] is True, found["caddy"]
    problems = [f"{p['problem']} / {p['fix']}" for p in found["problems"]]
    assert not any("not answering" in p for p in problems), problems
    assert any("started outside that unit" in p and 'reload = "admin-api"' in p
               for p in problems), problems


@pytest.mark.docker
@pytest.mark.parametrize("method", list(ReloadMethod))
def test_the_real_caddy_validates_each_way_and_a_rejected_file_changes_nothing(
        stack: DrillStack, method: ReloadMethod, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation is Caddy's own: POST /adapt for admin-api, `caddy validate` run through
    `docker exec` for the other two. A block Caddy refuses is rejected in Caddy's words, and
    neither the file nor what Caddy runs changes."""
    env = with_reload(stack, method, tmp_path, monkeypatch)
    good = caddy.rewrite(caddy.read(env), env, Slot.GREEN)
    caddy.validate(env, good)
    broken = good.replace("\t# BLUE_GREEN_SLOT_END",
                          "\tnot_a_directive on\n\t# BLUE_GREEN_SLOT_END")
    on_disk, running = env.caddy.caddyfile.read_bytes(), running_config(env)
    with pytest.raises(CaddyError) as err:
        caddy.validate(env, broken)
    assert "not_a_directive" in str(err.value) and err.value.stage == "validate"
    assert env.caddy.caddyfile.read_bytes() == on_disk and running_config(env) == running
    assert not list(env.caddy.caddyfile.parent.glob(".*validate*")), "a temp file was left"
    assert_caddy_serves(env, Slot.BLUE)


@pytest.mark.docker
def test_reload_commands_are_argument_lists_caddy_accepts(stack: DrillStack) -> None:
    """The argv a plan shows for caddy-reload is the one that runs: run it, and Caddy loads
    the file it names."""
    env = stack.env.with_(caddy=dataclasses.replace(stack.env.caddy,
                                                    reload=ReloadMethod.CADDY_RELOAD))
    argv = caddy.reload_action(env)
    assert argv[:len(env.caddy.command)] == list(env.caddy.command)
    assert argv[len(env.caddy.command):] == [
        "reload", "--config", str(env.caddy.caddyfile), "--adapter", "caddyfile",
        "--address", caddy.admin_address(env)]
    caddy.write_config(env, caddy.rewrite(caddy.read(env), env, Slot.GREEN))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert_caddy_serves(env, Slot.GREEN)
    assert caddy.reload_action(make_env(reload="systemctl")) == ["systemctl", "reload", "caddy"]


def test_caddy_reload_in_caddys_container_dials_the_admin_address_caddy_listens_on_there(
        ) -> None:
    """Found by review: [caddy] admin_url is this host's view of Caddy's admin API, which
    Docker may publish under another port; `caddy reload` run by `docker exec` dials from
    inside the container, so it is given the address Caddy's running config names, as the
    container reaches it (Caddy's documented `admin` listen forms). What cannot be told is
    refused before anything changes (exit 4), naming reload = "admin-api"; Caddy on this
    host keeps admin_url's address, its admin API not even asked."""
    inside = make_env(command=("docker", "exec", "caddy", "caddy"), reload="caddy-reload",
                      admin="http://127.0.0.1:22019")
    for listen, want in (("0.0.0.0:2019", "127.0.0.1:2019"), (":2019", "127.0.0.1:2019"),
                         ("[::]:2019", "127.0.0.1:2019"), ("tcp6/[::]:2019", "[::1]:2019"),
                         ("tcp/0.0.0.0:2020", "127.0.0.1:2020"),
                         ("localhost:2019", "localhost:2019"),
                         ("10.0.0.5:2019", "10.0.0.5:2019"), ("[::1]:2019", "[::1]:2019"),
                         ("unix//run/caddy/admin.sock", "unix//run/caddy/admin.sock"),
                         (None, "localhost:2019"), ("", "localhost:2019")):
        config: Any = {"admin": {"listen": listen}} if listen is not None else {"apps": {}}
        command = caddy.reload_command(inside, config)
        assert command.argv[-2:] == ("--address", want), listen
        assert want in command.note and "127.0.0.1:22019" in command.note
    for config in ({"admin": {"listen": "0.0.0.0:2019-2020"}},
                   {"admin": {"listen": "{env.CADDY_ADMIN_ADDRESS}"}},
                   {"admin": {"listen": "udp/0.0.0.0:2019"}}, {"admin": {"disabled": True}}):
        with pytest.raises(CaddyError) as err:
            caddy.reload_command(inside, config)
        assert err.value.exit_code == ExitCode.PRECONDITION, config
        assert "nothing was changed" in err.value.message and "\n" not in err.value.message
        assert 'reload = "admin-api"' in (err.value.fix or "")
    nowhere = f"http://127.0.0.1:{closed_port()}"  # its running config cannot be read
    with pytest.raises(CaddyError) as err:
        caddy.reload_command(inside.with_(caddy=dataclasses.replace(
            inside.caddy, admin_url=nowhere)))
    assert err.value.exit_code == ExitCode.PRECONDITION and "could not be read" in str(err.value)
    assert 'reload = "admin-api"' in (err.value.fix or "")
    with pytest.raises(CaddyError) as err:  # in an undo (not planning): no "nothing changed"
        caddy.reload_command(inside, {"admin": {"disabled": True}}, planning=False)
    assert err.value.exit_code == ExitCode.FAILED_SAFELY
    assert "nothing was changed" not in err.value.message
    here = make_env(command=("caddy",), reload="caddy-reload", admin=nowhere)
    command = caddy.reload_command(here)  # never asked: nothing listens there
    assert command.argv[-2:] == ("--address", nowhere.removeprefix("http://"))
    assert command.note == ""


def test_the_repair_never_repoints_another_services_upstream() -> None:
    """No upstream on a slot's port, and two services between the markers (a /grafana/*
    route on 3000, the app's on a wrong 8018): which is the app's is not guessed."""
    text = ("app.example.org {\n"
            "\t# BLUE_GREEN_SLOT_START\n"
            "\thandle /grafana/* {\n\t\treverse_proxy localhost:3000\n\t}\n"
            "\thandle {\n\t\treverse_proxy localhost:8018 {\n"
            '\t\t\theader_down X-Togather-Slot "blue"\n\t\t}\n\t}\n'
            "\t# BLUE_GREEN_SLOT_END\n}\n")
    with pytest.raises(caddy.CaddyError, match="different ports") as info:
        caddy.rewrite(text, ENV, Slot.BLUE)
    assert info.value.exit_code == ExitCode.PRECONDITION
    assert "line 4: port 3000; line 7: port 8018" in info.value.message
    # once the app's upstream is on a slot's port, the switch leaves Grafana's alone
    fixed = text.replace("8018", "8081")
    assert caddy.rewrite(fixed, ENV, Slot.GREEN) == fixed.replace("8081", "8082").replace(
        '"blue"', '"green"')


def test_a_forward_auth_to_a_slot_moves_with_the_switch() -> None:
    """forward_auth proxies like reverse_proxy: left on the old slot's port, the switch would
    look complete while /auth still went to the old slot (and its stop would be refused)."""
    text = ("# BLUE_GREEN_SLOT_START\n"
            "forward_auth localhost:8081 {\n\turi /auth\n}\n"
            "forward_auth /admin/* localhost:9091 {\n\turi /api/verify\n}\n"
            "reverse_proxy localhost:8081\n"
            "# BLUE_GREEN_SLOT_END\n")
    assert caddy.inspect(text, ENV).slot is Slot.BLUE
    assert caddy.rewrite(text, ENV, Slot.GREEN) == text.replace("8081", "8082")


def test_a_forward_auth_to_an_auth_service_is_left_out_of_the_switch() -> None:
    """An auth service's forward_auth (a placeholder, a socket, another port) is not the
    app's: it neither blocks the switch nor the wrong-port repair."""
    for auth in ("forward_auth {$AUTH_UPSTREAM} {\n\turi /verify\n}\n",
                 "forward_auth unix//run/authelia.sock {\n\turi /verify\n}\n",
                 "forward_auth localhost:9091 {\n\turi /api/verify\n}\n"):
        text = (f"# BLUE_GREEN_SLOT_START\n{auth}reverse_proxy localhost:8081\n"
                "# BLUE_GREEN_SLOT_END\n")
        assert caddy.inspect(text, ENV).slot is Slot.BLUE, auth
        assert caddy.rewrite(text, ENV, Slot.GREEN) == text.replace("8081", "8082")
        wrong = text.replace("localhost:8081", "localhost:8018")  # the repair, beside it
        assert caddy.rewrite(wrong, ENV, Slot.BLUE) == text


@pytest.mark.parametrize(("command", "reload", "said"), [
    (("docker", "exec", "togather-caddy", "caddy"), "admin-api",
     "`docker start togather-caddy`"),
    (("docker", "exec", "-u", "root", "togather-caddy", "caddy"), "admin-api", "start Caddy"),
    (("caddy",), "systemctl", "`systemctl start caddy`"),
    (("caddy",), "admin-api", "start Caddy"),
])
def test_the_advice_to_start_caddy_names_only_what_it_can_tell(
        command: tuple[str, ...], reload: str, said: str) -> None:
    """Found by review: with `docker exec -u root NAME caddy` the advice said `docker start
    root`. A container is named only when the command is exactly `docker exec NAME ...`."""
    advice = caddy.start_advice(make_env(command=command, reload=reload))
    assert said in advice, advice
    assert "docker start root" not in advice


def test_a_backup_in_the_temp_dir_never_writes_through_a_planted_symlink(
        tmp_path: Path) -> None:
    """Found by review: when the Caddyfile's own directory could not take the backup, it went
    to a fixed name in the temp directory, written through whatever was there: another
    local user's symlink to any file the runbook's user can write replaced that file."""
    import tempfile

    env = make_env(Path("/nonexistent/dir/Caddyfile"))  # no backup beside it
    victim = tmp_path / "authorized_keys"
    victim.write_text("ssh-ed25519 AAAA the victim's key\n")
    planted = Path(tempfile.gettempdir()) / f"togather-runbook-{env.name}-Caddyfile.previous"
    planted.unlink(missing_ok=True)
    planted.symlink_to(victim)
    try:
        backup = caddy.write_backup(env, b"# the previous Caddyfile\n")
    finally:
        planted.unlink(missing_ok=True)
    assert victim.read_text() == "ssh-ed25519 AAAA the victim's key\n"
    assert backup is not None and not backup.is_symlink(), backup
    try:
        assert backup.read_bytes() == b"# the previous Caddyfile\n"
    finally:
        backup.unlink()


# Run in a child: an audit hook (sys.addaudithook) cannot be removed once added. At each
# file operation the child makes (os.open, fchmod, rename, link, chmod, ...), before it, it
# looks at every file in the Caddyfile's folder holding the secret: a kill there leaves what
# it sees. Nothing is replaced: the hook only watches.
_COPY_WATCH = """
import json, os, stat, sys
from pathlib import Path
from runbook import caddy
from runbook.caddy import switch
from runbook.environment import from_mapping

folder, secret = Path(sys.argv[1]), sys.argv[2].encode()
path = folder / "Caddyfile"
env = from_mapping({"name": "staging",
    "slots": {"blue": {"container": "app-blue", "port": 8081},
              "green": {"container": "app-green", "port": 8082}},
    "caddy": {"caddyfile": str(path), "admin_url": "http://127.0.0.1:1"}}, folder / "env.toml")
os.umask(0)  # the mode a file is created with cannot lean on the umask
seen, busy = [], [False]

def watch(event, args):
    if busy[0] or event not in ("open", "os.chmod", "os.chown", "os.rename", "os.link",
                                "os.remove", "os.setxattr", "os.utime"):
        return
    busy[0] = True
    try:
        allowed = stat.S_IMODE(os.stat(path).st_mode)
        for name in os.listdir(folder):
            copy = folder / name
            if copy == path or not copy.is_file() or secret not in copy.read_bytes():
                continue
            extra = stat.S_IMODE(os.stat(copy).st_mode) & ~allowed
            if extra:
                seen.append([event, name, oct(extra)])
    finally:
        busy[0] = False

sys.addaudithook(watch)
previous = path.read_bytes()
backup = switch.write_backup(env, previous)
path.write_bytes(previous + b"# an edit made during the switch\\n")
kept = switch.keep_an_edit(env, b"what the switch wrote", previous)
print(json.dumps({"seen": seen, "backup": str(backup), "kept": kept}))
"""


@pytest.mark.parametrize("earlier", [None, 0o644])
def test_a_copy_of_a_private_caddyfile_is_never_more_readable_than_it(
        tmp_path: Path, earlier: int | None) -> None:
    """Found by review: the Caddyfile's backup, and the copy of an edit made during a switch,
    were written with the default mode (0644, or an earlier backup's) and chmod'ed to the
    Caddyfile's only after: a 0600 Caddyfile's basic-auth hash was readable by any local user
    for a moment, and for ever when the run was killed in between. Checked before every file
    operation the writes make (a kill at any of them), umask 0, with and without an earlier
    backup left 0644; the copies end at the Caddyfile's mode, byte for byte."""
    secret = "$2a$14$runbook.copy.watch.secret"
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(f"localhost {{\n\tbasic_auth {{\n\t\tops {secret}\n\t}}\n}}\n")
    caddyfile.chmod(0o600)
    if earlier is not None:
        old = caddy.backup_path(make_env(caddyfile))
        old.write_text("# an earlier backup\n")
        old.chmod(earlier)
    done = subprocess.run([sys.executable, "-c", _COPY_WATCH, str(tmp_path), secret],
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout)
    assert said["seen"] == [], said  # (event, file, the mode bits beyond the Caddyfile's)
    backup = Path(said["backup"])
    assert backup == caddy.backup_path(make_env(caddyfile)), said
    [edit] = tmp_path.glob(".Caddyfile.runbook-edited-*")
    assert f"kept at {edit}" in said["kept"], said
    for kept in (backup, edit):
        assert os.stat(kept).st_mode & 0o777 == 0o600, kept
    assert secret in backup.read_text() and secret in edit.read_text()


@pytest.mark.docker
def test_a_caddy_container_the_engine_does_not_have_is_a_refusal_not_a_pass() -> None:
    """Found by review: `[caddy] command` exec'ing into a container the runbook's engine does
    not have (the command reaching another engine) made the mount check "not checked" and
    the run went on: a Caddy bind-mounting the file itself never sees the switch's rename."""
    from runbook import preflight
    from runbook.errors import PreconditionError

    env = make_env(command=("docker", "exec", "no-such-caddy-7f3e2a", "caddy"))
    with pytest.raises(PreconditionError) as err:
        preflight.caddyfile_mount(env)
    assert "is not on the Docker engine the runbook inspects" in err.value.message, err.value
    assert "nothing was changed" in err.value.message


@pytest.mark.docker
@pytest.mark.parametrize("site", [
    "reverse_proxy localhost:0{green}",
    "reverse_proxy localhost:9100 {{\n\t\thealth_uri /health\n\t\thealth_port {green}\n\t}}",
    "reverse_proxy {{\n\t\tto localhost:{green}\n\t}}",
])
def test_the_text_check_says_maybe_wherever_caddy_dials_a_slot_outside_the_markers(
        drill_stack: DrillStack, site: str) -> None:
    """Found by review: the text pre-check (no Caddy round trip when the part outside the
    markers cannot dial a slot) looked for `:PORT` only, and said "surely not" for
    `:0PORT` and `health_port PORT`, which Caddy's adapter dials. The oracle: the drill
    Caddy's own adapter."""
    from runbook import caddy as caddymod
    from runbook import traffic

    env = drill_stack.env
    green = env.slot(Slot.GREEN).port
    outside = f"http://127.0.0.1:1 {{\n\t{site.format(green=green)}\n}}\n"
    adapted = caddymod.adapt(env, outside)
    assert adapted is not None
    assert green in traffic._port_counts(adapted), adapted  # Caddy dials it
    assert traffic._may_dial_a_slot(env, outside)


# --- the undo's compare-and-swap load refused (412): what it says and what it never loads ----
# Caddy's 412 at an exact moment is arranged by replacing the admin calls (the real Caddy's
# own refusal is proved above and in tests/test_rollback.py); the files are real.

def _refused_once(monkeypatch: pytest.MonkeyPatch, reads: list[tuple[Any, str | None]],
                  refusals: int) -> list[str | None]:
    """Caddy's reads of its config (in order) and `refusals` 412s on the undo's loads; the
    If-Match of each load tried is returned as it is made."""
    from runbook import traffic
    from runbook.caddy import CaddyConflictError
    from runbook.caddy import switch as sw

    tried: list[str | None] = []
    answers = iter(reads)
    monkeypatch.setattr(caddy, "running_config_tagged", lambda env: next(answers))
    monkeypatch.setattr(traffic, "undo_config",
                        lambda env, running, before, target, loaded, now: (running, None))

    def load(env: Environment, config: Any, etag: str | None = None) -> None:
        tried.append(etag)
        if len(tried) <= refusals:
            raise CaddyConflictError("Caddy's config changed after it was checked (HTTP 412)",
                                     "x", stage="reload")

    monkeypatch.setattr(sw, "load_running", load)
    monkeypatch.setattr(sw, "verify", lambda *a, **k: SimpleNamespace(ok=True))
    return tried


def test_an_edit_kept_aside_by_a_refused_undo_load_is_still_said(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the undo's first load refused (412) after it had kept a colleague's
    edit of the Caddyfile aside and written over it; the retry found the file already put
    back and said nothing of the edit, which then vanished from the live file unsaid."""
    from runbook import slots

    path = tmp_path / "Caddyfile"
    env = make_env(path)
    path.write_text("# a colleague's edit, made while the switch verified\n")
    tried = _refused_once(monkeypatch, [({"n": 1}, '"/config/ 1"'), ({"n": 2}, '"/config/ 2"')],
                          refusals=1)
    aside = slots._undo_switch(env, b"# previous (blue)\n", Slot.BLUE, {"ran": 1}, Slot.GREEN,
                               "# switch wrote (green)\n", None)
    assert tried == ['"/config/ 1"', '"/config/ 2"']
    [kept] = [p for p in tmp_path.iterdir() if "edited" in p.name]
    assert aside is not None and kept.name in str(aside), aside
    assert path.read_bytes() == b"# previous (blue)\n"


def test_a_refused_undo_load_never_falls_back_to_an_unconditional_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: refused once (another change runs), then Caddy's config could not be
    read again: the undo loaded the config from before the switch with no If-Match (/load),
    dropping the change the 412 had just protected. It loads nothing and says so (exit 5)."""
    from runbook import slots

    path = tmp_path / "Caddyfile"
    env = make_env(path)
    path.write_text("# switch wrote (green)\n")
    tried = _refused_once(monkeypatch, [({"n": 1}, '"/config/ 1"'), (None, None)], refusals=1)
    with pytest.raises(RunbookError) as err:
        slots._undo_switch(env, b"# previous (blue)\n", Slot.BLUE, {"ran": 1}, Slot.GREEN,
                           "# switch wrote (green)\n", None)
    assert tried == ['"/config/ 1"'], tried  # no second load, conditional or not
    assert err.value.exit_code == ExitCode.ATTENTION
    assert "nothing was loaded" in str(err.value), str(err.value)


def test_a_refused_undo_on_a_full_disk_never_says_the_file_was_put_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the file could not be written back (a full disk) and every load was
    refused: the undo said the Caddyfile "was put back" while it still named the new slot."""
    from runbook import slots
    from runbook.caddy import switch as sw

    path = tmp_path / "Caddyfile"
    env = make_env(path)
    path.write_text("# switch wrote (green)\n")
    _refused_once(monkeypatch, [({"n": i}, f'"/config/ {i}"') for i in range(3)], refusals=3)

    def full(env: Environment, text: str) -> None:
        raise caddy.CaddyError(f"cannot write {path}: No space left on device", "free space",
                               stage="write")

    monkeypatch.setattr(sw, "write_config", full)
    with pytest.raises(RunbookError) as err:
        slots._undo_switch(env, b"# previous (blue)\n", Slot.BLUE, {"ran": 1}, Slot.GREEN,
                           "# switch wrote (green)\n", None)
    said = str(err.value)
    assert "could not be written back" in said and "was put back" not in said, said
    assert path.read_bytes() == b"# switch wrote (green)\n"


# --- `:PORT` upstreams: Caddy's own shorthand for this host --------------------------------

BARE_PORT = ("http://127.0.0.1:18080 {\n\t# BLUE_GREEN_SLOT_START\n"
             "\treverse_proxy :8081 {\n\t\theader_down X-Togather-Slot \"blue\"\n\t}\n"
             "\treverse_proxy /api/* http://:8081\n\t# BLUE_GREEN_SLOT_END\n}\n")


def test_a_bare_port_upstream_is_this_hosts_port_and_is_switched_as_written() -> None:
    """Found by review: `reverse_proxy :8081` (Caddy dials the port on this host) was "not
    host:port (placeholders and unix sockets cannot be switched)": status told on-call to run
    the switch, which refused the block, and so did every rollback."""
    found = caddy.inspect(BARE_PORT, ENV)
    assert found.consistent and found.slot is Slot.BLUE, found.problems
    assert not any("not host:port" in p for p in found.problems)
    assert caddy.rewrite(BARE_PORT, ENV, Slot.GREEN) == BARE_PORT.replace(
        ":8081", ":8082").replace('"blue"', '"green"')


def test_an_unswitchable_block_carries_the_fix_its_refusal_gives() -> None:
    """What status says to do about a block the switch refuses is that refusal's own fix."""
    text = ("site {\n\t# BLUE_GREEN_SLOT_START\n\treverse_proxy localhost:{$BLUE_PORT:8081}\n"
            "\treverse_proxy localhost:8081 {\n\t\timport hdr\n\t}\n\t# BLUE_GREEN_SLOT_END\n}\n")
    found = caddy.inspect(text, ENV)
    with pytest.raises(CaddyError) as err:
        caddy.rewrite(text, ENV, Slot.GREEN)
    assert found.slot is None and found.fixes, found
    assert "; ".join(found.fixes) == err.value.fix
    assert any("'localhost:{$BLUE_PORT:8081}' is not host:port" in p for p in found.problems)


@pytest.mark.docker
def test_caddy_dials_a_bare_port_upstream_on_this_host_before_and_after_a_switch(
        admin: httpx.Client) -> None:
    """Caddy's adapter is the oracle: it dials `:8081` as written; after the rewrite every
    managed dial is `:8082`, and nothing else changed."""
    before = adapt(admin, BARE_PORT)
    assert sorted(d for _, r in routes_of(before) for dials, _ in proxies(r)
                  for d in dials) == [":8081", ":8081"]
    after = adapt(admin, caddy.rewrite(BARE_PORT, ENV, Slot.GREEN))
    assert after == expected_view(before, lambda _listen, _route: True, 8082, Slot.GREEN)


@pytest.mark.docker
@pytest.mark.parametrize("method", list(ReloadMethod))
def test_a_rejected_line_is_named_where_it_is_inside_or_outside_the_markers(
        stack: DrillStack, method: ReloadMethod, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: a typo on another site (outside the markers) was "fix the managed
    block" though nothing there was wrong. Caddy's own error names the line; the fix says
    which line of which file, and whether it is the managed block's."""
    env = with_reload(stack, method, tmp_path, monkeypatch)
    good = caddy.rewrite(caddy.read(env), env, Slot.GREEN)
    outside_typo = good.replace('respond /ping "pong" 200', 'respnd /ping "pong" 200')
    line = outside_typo.splitlines().index('\trespnd /ping "pong" 200') + 1
    with pytest.raises(CaddyError) as err:
        caddy.validate(env, outside_typo)
    assert "unrecognized directive: respnd" in err.value.message, err.value
    assert f"line {line} of {env.caddy.caddyfile}" in (err.value.fix or ""), err.value.fix
    assert "outside the slot markers" in (err.value.fix or "")
    assert "fix the managed block" not in (err.value.fix or "")
    inside_typo = good.replace("\t# BLUE_GREEN_SLOT_END",
                               "\tnot_a_directive on\n\t# BLUE_GREEN_SLOT_END")
    line = inside_typo.splitlines().index("\tnot_a_directive on") + 1
    with pytest.raises(CaddyError) as err:
        caddy.validate(env, inside_typo)
    assert f"fix the managed block (line {line}) in {env.caddy.caddyfile}" in (
        err.value.fix or ""), err.value.fix


# --- a reverse_proxy pool mixing a slot's upstream with another (found by review) ------------
# `reverse_proxy localhost:8081 172.20.0.3:8080` balances every request over both: after a
# switch Caddy dialed localhost:8082 and blue's container address, /health alternated blue and
# green, and header_down stamped every answer "green", so verification and status passed.

POOLS = {  # (the block, the text of the upstream no switch would move, as written)
    "one line": ("\treverse_proxy localhost:8081 172.20.0.3:8080 {\n\t\tlb_policy round_robin"
                 '\n\t\theader_down X-Togather-Slot "blue"\n\t}\n', "172.20.0.3:8080"),
    "to lines": ("\treverse_proxy {\n\t\tto localhost:8081\n\t\tto localhost:9000\n"
                 '\t\theader_down X-Togather-Slot "blue"\n\t}\n', "localhost:9000"),
    "no port": ("\treverse_proxy /api/* 127.0.0.1:8081 localhost {\n"
                '\t\theader_down X-Togather-Slot "blue"\n\t}\n', "8081 localhost {"),
}


def pooled_site(block: str) -> str:
    return WRAPPER.format(block="\t# BLUE_GREEN_SLOT_START\n" + block + "\t# BLUE_GREEN_SLOT_END")


@pytest.mark.docker
@pytest.mark.parametrize("case", list(POOLS))
def test_a_pool_mixing_a_slot_with_another_upstream_is_refused_naming_the_line(
        admin: httpx.Client, case: str) -> None:
    """Caddy's adapter is the oracle that the two upstreams are one pool (one reverse_proxy
    handler dials both): the switch cannot move that whole, so it refuses (exit 4, nothing
    rewritten) naming the line of the upstream it would leave and the fix; inspect says so
    as a problem (status), not as an upstream "left as it is"."""
    block, left = POOLS[case]
    text = pooled_site(block)
    managed = [p for listen, r in routes_of(adapt(admin, text)) if managed_server(listen, r)
               for p in proxies(r)]
    assert len(managed) == 1 and len(managed[0][0]) == 2, managed  # one pool of two
    assert sum(d.endswith(":8081") for d in managed[0][0]) == 1, managed  # one a slot's
    line = text[:text.index(left)].count("\n") + 1
    with pytest.raises(CaddyError) as err:
        caddy.rewrite(text, ENV, Slot.GREEN)
    assert err.value.exit_code == ExitCode.PRECONDITION
    assert f"line {line}: upstream " in err.value.message and "pool" in err.value.message
    assert "localhost:<port>" in (err.value.fix or "") and "out of the managed block" in (
        err.value.fix or "")
    found = caddy.inspect(text, ENV)
    assert not found.consistent and found.slot is None
    assert any(f"line {line}: upstream " in p and "pool" in p for p in found.problems)
    assert not any("left as it is" in w for w in found.warnings), found.warnings
    # each upstream in a reverse_proxy of its own: the other service's is left as it is
    apart = pooled_site('\treverse_proxy localhost:8081 {\n\t\theader_down X-Togather-Slot '
                        '"blue"\n\t}\n\treverse_proxy /other/* 172.20.0.3:8080\n')
    assert "localhost:8082" in caddy.rewrite(apart, ENV, Slot.GREEN)


def pool_policies(node: Any) -> list[tuple[list[str], str | None]]:
    """(dials in order, load-balancing selection policy) of every reverse_proxy handler."""
    return [([u["dial"] for u in h.get("upstreams", [])],
             ((h.get("load_balancing") or {}).get("selection_policy") or {}).get("policy"))
            for h in proxy_handlers(node)]


FALLBACK = ("\treverse_proxy localhost:8081 localhost:8090 {\n\t\tlb_policy first\n"
            '\t\theader_down X-Togather-Slot "blue"\n\t}\n')


@pytest.mark.docker
def test_a_fallback_after_the_slot_in_an_lb_policy_first_pool_is_left_as_it_is(
        admin: httpx.Client) -> None:
    """`reverse_proxy localhost:8081 localhost:8090 { lb_policy first }` is a maintenance
    page fallback: Caddy picks the first available upstream, so the second is dialed only
    while the slot is down. Found by review: refused as a pool (exit 4), every switch and
    rollback on such a host was refused. Caddy's adapter is the oracle that it is one pool,
    in that order, with the `first` policy, before and after the rewrite, which moves the
    slot's upstream alone; inspect warns that the fallback is left as it is."""
    text = pooled_site(FALLBACK)
    managed = [p for listen, r in routes_of(adapt(admin, text)) if managed_server(listen, r)
               for p in pool_policies(r)]
    assert managed == [(["localhost:8081", "localhost:8090"], "first")], managed
    found = caddy.inspect(text, ENV)
    assert found.consistent and found.slot is Slot.BLUE and not found.problems, found
    line = text[:text.index("localhost:8090")].count("\n") + 1
    said = [w for w in found.warnings if w.startswith(f"line {line}: upstream localhost:8090")]
    assert len(said) == 1 and "left as it is" in said[0] and "fallback" in said[0], said
    assert "slot it serves is down, users get the fallback" in said[0], said
    moved = caddy.rewrite(text, ENV, Slot.GREEN)
    assert moved == text.replace("localhost:8081 localhost:8090", "localhost:8082 localhost:8090"
                                 ).replace('"blue"', '"green"'), moved
    managed = [p for listen, r in routes_of(adapt(admin, moved)) if managed_server(listen, r)
               for p in pool_policies(r)]
    assert managed == [(["localhost:8082", "localhost:8090"], "first")], managed
    assert caddy.rewrite(moved, ENV, Slot.BLUE) == text  # the rollback moves it back


@pytest.mark.docker
@pytest.mark.parametrize("block", [
    # the other upstream first: Caddy sends every request to it while it is up
    FALLBACK.replace("localhost:8081 localhost:8090", "localhost:8090 localhost:8081"),
    # between two of the slot's: the second is reached only after the other
    "\treverse_proxy {\n\t\tto localhost:8081\n\t\tto localhost:8090\n\t\tto 127.0.0.1:8081"
    '\n\t\tlb_policy first\n\t\theader_down X-Togather-Slot "blue"\n\t}\n',
    # another policy: balanced over both
    FALLBACK.replace("lb_policy first", "lb_policy random"),
])
def test_a_pool_that_is_no_fallback_after_the_slot_is_still_refused(
        admin: httpx.Client, block: str) -> None:
    """Only `lb_policy first` with every slot upstream listed before every other is a
    fallback; Caddy's adapter is the oracle that each of these is one pool with both."""
    text = pooled_site(block)
    managed = [p for listen, r in routes_of(adapt(admin, text)) if managed_server(listen, r)
               for p in pool_policies(r)]
    assert len(managed) == 1 and "localhost:8090" in managed[0][0], managed
    assert any(d.endswith(":8081") for d in managed[0][0]), managed
    line = text[:text.index("localhost:8090")].count("\n") + 1
    with pytest.raises(CaddyError) as err:
        caddy.rewrite(text, ENV, Slot.GREEN)
    assert err.value.exit_code == ExitCode.PRECONDITION
    assert f"line {line}: upstream localhost:8090" in err.value.message, err.value.message
    found = caddy.inspect(text, ENV)
    assert not found.consistent and not any("left as it is" in w for w in found.warnings)


# --- a dial of another machine on a slot's port number is not the slot (found by review) -----

def beside_blue(stack: DrillStack, tmp_path: Path, host: str) -> tuple[Environment, Any]:
    """(env, Caddy's own adapted config) of a Caddyfile whose managed block dials blue and
    whose other site proxies to `<host>:<green's port>`, written under tmp_path."""
    blue, green = stack.env.slot(Slot.BLUE), stack.env.slot(Slot.GREEN)
    text = (f"{{\n\tadmin off\n}}\nhttp://127.0.0.1:18082 {{\n\treverse_proxy {host}:{green.port}"
            f"\n}}\nhttp://127.0.0.1:18080 {{\n\t# BLUE_GREEN_SLOT_START\n\treverse_proxy "
            f"localhost:{blue.port} {{\n\t\theader_down X-Togather-Slot blue\n\t}}\n"
            "\t# BLUE_GREEN_SLOT_END\n}\n")
    path = tmp_path / "Caddyfile"
    path.write_text(text)
    env = stack.env.with_(caddy=dataclasses.replace(stack.env.caddy, caddyfile=path))
    config = caddy.adapt(env, text)
    assert config is not None
    assert f"{host}:{green.port}" in json.dumps(config)  # Caddy dials it
    return env, config


@pytest.mark.docker
@pytest.mark.parametrize(("host", "pins"), [
    ("192.0.2.10", False),  # TEST-NET-1: another machine (never dialed: no request is sent)
    ("localhost", True), ("127.0.0.1", True), ("[::1]", True), ("host.docker.internal", True),
    ("container", True),  # the green slot's container, by its name (a Caddy on its network)
])
def test_only_a_dial_of_this_machine_on_a_slots_port_pins_that_slot(
        drill_stack: DrillStack, tmp_path: Path, host: str, pins: bool) -> None:
    """A site outside the markers proxies to `<host>:<green's port>` while the managed block
    dials blue. Caddy's own adapter reads the file (the config it would run, and the part
    outside the markers): only a host of this machine, or green's container, is green; a
    remote service that happens to use that port number pinned green, and rollback and
    deploy refused to recreate it, telling on-call to repoint an unrelated service."""
    from runbook import traffic

    green = drill_stack.env.slot(Slot.GREEN)
    host = green.container if host == "container" else host
    env, config = beside_blue(drill_stack, tmp_path, host)
    found = traffic.from_config(env, config, lambda: traffic.outside_addresses(env))
    assert found.slots == {Slot.BLUE}, found
    assert found.pinned == ({Slot.GREEN} if pins else frozenset()), found
    assert (traffic.ThisHost(env)(f"{host}:{green.port}")) is pins


@pytest.mark.docker
def test_a_name_that_does_not_resolve_in_time_is_this_machine_and_asked_once(
        drill_stack: DrillStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A site outside the markers proxies to `status.internal:<green's port>` (a name, not
    this machine's) while DNS does not answer. Found by review: every traffic read (status,
    the plan, the check before stopping a container, the undo of a failed verify) waited the
    resolver's own timeouts, again in each reading. Now a lookup is bounded by a short
    deadline, its timeout counts as this machine (fail closed: green stays pinned), and the
    name is not looked up again in this process. The OS resolver cannot be made slow here
    (no nameserver of ours, /etc/hosts answers at once), so socket.getaddrinfo and
    socket.getfqdn (a reverse lookup) are replaced, for that name only, by lookups that hang;
    the config is Caddy's own adapter's and the containers are Docker's."""
    import socket
    import threading
    import time
    import uuid

    from runbook import traffic

    name = f"status-{uuid.uuid4().hex[:8]}.internal"  # asked for the first time here
    env, config = beside_blue(drill_stack, tmp_path, name)
    # adapted before the lookups hang: Caddy's adapter is asked over HTTP on this machine
    real_lookup, released, asked = socket.getaddrinfo, threading.Event(), []

    def hanging_lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != name:
            return real_lookup(host, *args, **kwargs)
        asked.append(host)
        released.wait(30)  # DNS not answering
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    def hanging_fqdn(*args: Any) -> str:
        released.wait(30)  # the reverse lookup of this host's name, DNS not answering
        return "host.example.org"

    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    monkeypatch.setattr(socket, "getfqdn", hanging_fqdn)
    try:
        took = []
        for _ in range(2):  # two readings, as a command makes several
            began = time.monotonic()
            found = traffic.from_config(env, config, lambda: traffic.outside_addresses(env))
            took.append(time.monotonic() - began)
            assert found.slots == {Slot.BLUE}, found
            assert found.pinned == {Slot.GREEN}, found  # cannot be told: fail closed
        assert took[0] < 5, took  # bounded, not the resolver's timeouts (the hang is 30 s)
        assert took[1] < 5, took
        assert asked == [name], asked  # the second reading did not ask again
    finally:
        released.set()


def health_slots(env: Environment, asks: int = 6) -> set[str]:
    """The slots the /health bodies name through the proxy, each on a fresh connection."""
    return {drill_http.get(f"{env.caddy.proxy_url}/health", headers={"Connection": "close"},
                           timeout=5).json().get("slot") for _ in range(asks)}


def load_pool(env: Environment, serving: Slot, address: str) -> str:
    """The drill Caddyfile with its managed block one round-robin pool of `serving`'s
    localhost:<port> and `address`, written and loaded (a host's own edit); returns it."""
    text = caddy.read(env)
    start, end = caddy.find_block(text)
    pooled = (text[:start] + f"\treverse_proxy localhost:{env.slot(serving).port} {address} {{\n"
              f"\t\tlb_policy round_robin\n\t\theader_down X-Togather-Slot \"{serving}\"\n\t}}\n"
              + text[end:])
    env.caddy.caddyfile.write_text(pooled)
    drill_http.post(f"{env.caddy.admin_url}/load", content=pooled,
                    headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()
    return pooled


@pytest.mark.docker
def test_a_pool_with_a_slots_container_address_is_refused_and_verification_and_status_see_it(
        stack: DrillStack) -> None:
    """The review's case end to end on the drill's real Caddy: the managed block pools
    localhost:<blue's port> with blue's container address (172.x:8080) round robin. The
    switch to green exited 0 leaving every other request on blue (the /health bodies through
    the proxy are the oracle), verification and status passed. Now the switch is refused
    (exit 4, nothing changed, the line and the fix named); and where Caddy runs such a pool
    after all (loaded by hand), verification fails on the /health bodies and status names
    the dial of blue's container. (A /health that names no slot, the minimal-health shape,
    leaves verification nothing to compare: the refusal and status still say it.)"""
    from runbook import docker

    env = stack.env
    blue = env.slot(Slot.BLUE)
    says = not stack.has("minimal-health")  # its /health body names its slot
    address = next(a for a in docker.inspect(blue.container).addresses if a.count(".") == 3)
    pooled = load_pool(env, Slot.BLUE, f"{address}:8080")
    assert served_dials(env) == {f"localhost:{blue.port}", f"{address}:8080"}
    assert health_slots(env) == ({"blue"} if says else {None})  # both upstreams are blue's
    running = running_config(env)
    done = runbook_cli(env, "switch", "--slot", "green", "--yes")
    assert done.returncode == ExitCode.PRECONDITION, done.stdout + done.stderr
    line = pooled[:pooled.index(f"{address}:8080")].count("\n") + 1
    assert f"line {line}: upstream {address}:8080" in done.stderr, done.stderr
    assert "localhost:<port>" in done.stderr and "nothing was changed" in done.stderr
    assert env.caddy.caddyfile.read_text() == pooled and running_config(env) == running
    said = [p for p in status.problems(status.collect(env))
            if f"line {line}: upstream {address}:8080" in p.problem]
    assert len(said) == 1 and "localhost:<port>" in said[0].fix, said
    assert "runbook switch" not in said[0].fix, said  # the switch refuses it: not the way out
    # what the switch used to leave: green's port pooled with blue's container
    load_pool(env, Slot.GREEN, f"{address}:8080")
    assert through_proxy(env)[0] == "green"  # the header says green whoever answers
    if says:
        assert health_slots(env) == {"blue", "green"}  # half the users still on blue
        check = caddy.verify(env, Slot.GREEN, None, attempts=2, interval=0.1)
        assert not check.ok and "blue" in (check.error or ""), check.describe()
    found = status.problems(status.collect(env))
    named = [p for p in found if p.check == "dials_the_other_container"]
    assert len(named) == 1 and f"{address}:8080" in named[0].problem, found


@pytest.mark.parametrize("said, elsewhere", [("BLUE", False), ("blue\n", False), ("blue", False),
                                             ("green", True), ("GREEN ", True),
                                             ("primary", False)])
def test_the_health_bodys_slot_is_read_as_the_gate_reads_it(said: str, elsewhere: bool) -> None:
    """Found by review: verification's samples compared the /health body's slot raw, so an app
    the gate passes ("BLUE", "blue\\n" are blue) failed every verify, and so its undo. Another
    word names no slot and says nothing either way. The oracle: a real HTTP server answering
    as such an app, through its proxy URL."""
    body = json.dumps({"status": "healthy", "slot": said}).encode()
    with answering(200, body) as port:
        env = make_env(proxy=f"http://127.0.0.1:{port}")
        found = caddy_admin.slot_elsewhere(env, Slot.BLUE, 5.0)
    assert (found is not None) is elsewhere, found
    if elsewhere:
        assert "green" in found, found


def test_a_new_backup_of_the_caddyfile_has_its_group(tmp_path: Path) -> None:
    """Found by review: a new backup got the Caddyfile's mode but the runner's own group: a
    `0640 root:caddy` Caddyfile's secrets became readable to the on-call user's group (a
    wide one on many hosts). It takes the Caddyfile's owner and group, as this user may give
    them (root here; another user keeps its own, as any file it writes)."""
    if os.geteuid() != 0:
        pytest.skip("only root can give a file another group (the drill machine's CI runs as root)")
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text("localhost {\n\trespond ok\n}\n")
    caddyfile.chmod(0o640)
    os.chown(caddyfile, 0, 1)  # root:daemon (gid 1), not the runner's group 0
    backup = caddy.write_backup(make_env(caddyfile), caddyfile.read_bytes())
    assert backup == caddy.backup_path(make_env(caddyfile))
    st = os.stat(backup)
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 0, 1)
