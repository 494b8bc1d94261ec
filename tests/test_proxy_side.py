"""Failures that are Caddy's own, not a slot's, on a real Caddy (found by review, 2.6.2):

- the proxy fails for every slot because of the managed block's own upstream config (an h2c
  transport to an app that speaks HTTP/1.1: Caddy logs "unexpected EOF" and answers 502).
  A switch then failed its verification, undid itself exactly, and, since the undo's own
  verification got the same 502, said "could not be undone" (exit 5); status sent on-call
  to that same switch. The undo is clean (exit 1) when Caddy runs exactly what it ran and
  the proxy failed the same way before the switch; status points at Caddy's log and config.
- a switch loading a Caddyfile whose `admin` line was edited (not reloaded) moved Caddy's
  admin listener away from [caddy] admin_url: every later status, rollback or undo could not
  reach Caddy. It is refused (exit 4) before anything changes.

The oracle is what runs: the proxy's and the slots' own answers, Caddy's loaded config read
through its admin API, the Caddyfile's bytes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runbook import caddy, files, preflight, switch
from runbook.drill import http as drill_http
from runbook.drill.stack import DrillStack
from runbook.environment import Environment, ReloadMethod, Slot
from runbook.errors import ExitCode, RunbookError
from tests.drill_checks import closed_port
from tests.test_caddy_text import with_reload

pytestmark = pytest.mark.docker
REPO_ROOT = Path(__file__).resolve().parents[1]
H2C_TRANSPORT = "\t\t\ttransport http {\n\t\t\t\tversions h2c\n\t\t\t}\n"


def _cli(env: Environment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runbook.cli", args[0], str(env.source),
                           *args[1:]], capture_output=True, text=True, timeout=180,
                          check=False, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)


def _config(env: Environment, admin_url: str | None = None) -> object:
    return drill_http.get(f"{admin_url or env.caddy.admin_url}/config/", timeout=5).json()


def _proxy_status(env: Environment) -> int:
    return drill_http.get(f"{env.caddy.proxy_url}/version", headers={"Connection": "close"},
                          timeout=5).status_code


def _direct_health(env: Environment, slot: Slot) -> int:
    return drill_http.get(f"{env.slot(slot).base_url}{env.health.path}", timeout=5).status_code


@pytest.fixture
def h2c_upstreams(stack: DrillStack) -> Iterator[Environment]:
    """Caddy runs (and its Caddyfile says) the managed block's reverse_proxy with an h2c
    transport, the app speaking HTTP/1.1 only: every request through the proxy gets 502."""
    env = stack.env
    text = caddy.read(env)
    start, end = caddy.find_block(text)
    block = text[start:end].replace("\t\t\theader_down", H2C_TRANSPORT + "\t\t\theader_down")
    assert block.count("versions h2c") == 2, block
    changed = text[:start] + block + text[end:]
    files.atomic_write(env.caddy.caddyfile, changed.encode())
    drill_http.post(f"{env.caddy.admin_url}/load", content=changed,
                    headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()
    # the premise: the proxy fails, the slot that serves answers healthy on its own port
    assert _proxy_status(env) == 502
    assert _direct_health(env, Slot.BLUE) == 200
    assert _direct_health(env, Slot.GREEN) == 200
    yield env
    stack.reset()


def test_a_switch_undone_exactly_over_a_proxy_that_already_failed_is_a_clean_undo(
        h2c_upstreams: Environment) -> None:
    """The switch to green fails its verification (502) and is undone: Caddy runs exactly
    what it ran before, byte for byte on disk and JSON for JSON in Caddy; the undo's own
    verification gets the 502 users got before the switch. That is a safe failure (exit 1)
    saying so, never "undoing failed" (exit 5); the plan warned that the proxy already
    failed while the serving slot answers healthy on its own."""
    env = h2c_upstreams
    file_before, config_before = env.caddy.caddyfile.read_bytes(), _config(env)
    done = _cli(env, "switch", "--slot", "green", "--yes")
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    assert done.returncode == 1, out
    assert "AND undoing failed" not in out, out
    assert "Caddy runs exactly what it ran before the switch" in out, out
    assert "users were already getting HTTP 502 before it" in out, out
    assert "the proxy, not the slot: the blue slot answers healthy directly" in out, out
    # the plan said it before anything moved: a switch cannot fix what the proxy does
    assert ("runbook: warning: the proxy answers HTTP 502 for the blue slot, and the blue slot "
            "answers healthy on its own port") in done.stderr, done.stderr
    assert "the switch will likely fail its verification and be undone" in done.stderr
    assert "moving traffic to another slot cannot fix what the proxy does" in done.stderr
    # what runs is what ran
    assert env.caddy.caddyfile.read_bytes() == file_before
    assert _config(env) == config_before
    assert _proxy_status(env) == 502
    assert _direct_health(env, Slot.BLUE) == 200


def test_status_points_at_caddys_log_and_config_when_the_proxy_fails_a_healthy_slot(
        stack: DrillStack, h2c_upstreams: Environment) -> None:
    """The proxy answers 502 while the blue slot it sends to answers healthy on its own port:
    status says the proxy, not the slot, fails, and points at Caddy's log (this stack runs
    Caddy in a container: `docker logs`) and the block's reverse_proxy/transport config,
    never at a switch (which cannot fix it)."""
    env = h2c_upstreams
    data = subprocess.run([sys.executable, "-m", "runbook.cli", "status", str(env.source),
                           "--format", "json"], capture_output=True, text=True, timeout=120,
                          check=False, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    assert "Traceback" not in data.stderr, data.stderr
    assert data.returncode == 1, data.stdout + data.stderr
    problems = json.loads(data.stdout)["problems"]
    [found] = [p for p in problems if p["check"] == "proxy_unanswered"]
    assert "the blue slot answers healthy on its own port" in found["problem"], found
    assert f"docker logs --tail 100 {stack.caddy_container}" in found["fix"], found
    assert "reverse_proxy" in found["fix"] and "transport" in found["fix"], found
    assert str(env.caddy.caddyfile) in found["fix"], found
    assert "runbook switch" not in json.dumps(problems), problems


def _admin_back(stack: DrillStack, env: Environment, text: str, moved: str) -> None:
    """Had a switch moved Caddy's admin listener to `moved` (the code before the fix), bring
    it back with the original Caddyfile `text` for the next test; then the baseline scene."""
    for where in (env.caddy.admin_url, f"http://{moved}"):  # never another Caddy's 2019
        try:
            if where == env.caddy.admin_url:
                drill_http.get(f"{where}/config/", timeout=5).raise_for_status()
                break
            drill_http.post(f"{where}/load", content=text,
                            headers={"Content-Type": "text/caddyfile"}, timeout=10)
            break
        except Exception:  # not there: the next address
            continue
    stack.reset()


def test_a_switch_that_would_move_caddys_admin_listener_is_refused(stack: DrillStack) -> None:
    """The Caddyfile's `admin` line was edited to another port and not reloaded: the switch
    would load it, and Caddy's admin API would leave [caddy] admin_url (every later status,
    rollback or undo then cannot reach Caddy). Refused, dry run and run alike (exit 4),
    naming both addresses; nothing changes, and Caddy still answers where the environment
    says. Also without an `admin` line (Caddy's default, localhost:2019)."""
    env = stack.env
    text = caddy.read(env)
    admin = re.search(r"^\tadmin (\S+)$", text, re.M)
    assert admin is not None and admin[1] == env.caddy.admin_url.removeprefix("http://")
    moved = f"127.0.0.1:{closed_port()}"
    config_before = _config(env)
    try:
        for edited, listen in ((text.replace(admin[0], f"\tadmin {moved}"), moved),
                               (text.replace(admin[0] + "\n", ""), "localhost:2019")):
            files.atomic_write(env.caddy.caddyfile, edited.encode())
            for args in (("--dry-run",), ("--yes",)):
                done = _cli(env, "switch", "--slot", "green", *args)
                out = done.stdout + done.stderr
                assert "Traceback" not in out, out
                assert done.returncode == 4, out
                assert f"admin listener at {listen}" in done.stderr, done.stderr
                assert env.caddy.admin_url in done.stderr, done.stderr
                assert "nothing was changed" in done.stderr, done.stderr
                assert env.caddy.caddyfile.read_bytes() == edited.encode()
                assert _config(env) == config_before  # still answering at admin_url
                assert _proxy_status(env) == 200
    finally:
        _admin_back(stack, env, text, moved)


@pytest.mark.parametrize("imported", ["conf.d/*.caddy", "imported.caddy"])
@pytest.mark.parametrize("method", [ReloadMethod.CADDY_RELOAD, ReloadMethod.SYSTEMCTL])
def test_a_moved_admin_listener_is_refused_where_the_sites_are_not_compared(
        stack: DrillStack, method: ReloadMethod, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, imported: str) -> None:
    """Found by review: where the sites Caddy serves are not compared with the new Caddyfile
    (systemctl reloads the unit's file; `caddy reload` alone resolves a relative import),
    pre-flight's refusal of a Caddyfile whose `admin` line was edited and not reloaded was
    swallowed by the suppression meant for an unread config: the switch loaded it (exit 0),
    Caddy's admin API left [caddy] admin_url, and every later status, rollback or undo could
    not reach Caddy. Refused (exit 4), nothing changed, Caddy still answering where it did."""
    env = with_reload(stack, method, tmp_path, monkeypatch)
    text = caddy.read(env)
    admin = re.search(r"^\tadmin (\S+)$", text, re.M)
    assert admin is not None
    moved = f"127.0.0.1:{closed_port()}"
    # a relative glob matching nothing (Caddy warns and loads the rest), or a file beside
    # the Caddyfile (Caddy's /adapt, which resolves it from its own working directory,
    # rejected it: the check was skipped, found by review)
    (env.caddy.caddyfile.parent / "imported.caddy").write_text("(unused) {\n}\n")
    edited = text.replace(admin[0], f"\tadmin {moved}") + f"\nimport {imported}\n"
    assert preflight.sites_uncompared(env, edited) is not None  # the premise
    config_before = _config(env)
    try:
        files.atomic_write(env.caddy.caddyfile, edited.encode())
        with pytest.raises(RunbookError) as err:
            switch.switch(env, switch.Options(slot=Slot.GREEN, reason="test: admin moved"))
        said = f"{err.value.message} / {err.value.fix}"
        assert err.value.exit_code == ExitCode.PRECONDITION, said
        assert f"admin listener at {moved}" in said and "nothing was changed" in said, said
        assert env.caddy.caddyfile.read_bytes() == edited.encode()
        assert _config(env) == config_before  # still answering at admin_url
        assert _proxy_status(env) == 200
    finally:
        _admin_back(stack, env, text, moved)


@pytest.mark.parametrize("method", [ReloadMethod.CADDY_RELOAD, ReloadMethod.SYSTEMCTL])
def test_an_admin_line_moved_in_an_imported_file_after_the_plan_is_refused_at_the_write(
        stack: DrillStack, method: ReloadMethod, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: where the sites are not compared, the admin listener was checked in
    pre-flight only. The switch's write checks that the Caddyfile and Caddy's config are the
    plan's, but not the files it imports, which the reload reads: global options imported
    from a file beside it, their `admin` line edited as the switch step starts, moved Caddy's
    admin API away from [caddy] admin_url. Refused just before the write (exit 4), nothing
    changed, Caddy still answering where it did."""
    env = with_reload(stack, method, tmp_path, monkeypatch)
    text = caddy.read(env)
    options = re.search(r"^\{\n(?:\t.*\n)*?\}\n", text, re.M)
    assert options is not None and "\tadmin " in options[0], text
    imported = env.caddy.caddyfile.parent / "global.caddy"
    importing = text.replace(options[0], "import global.caddy\n", 1)
    moved = f"127.0.0.1:{closed_port()}"
    admin = re.search(r"^\tadmin (\S+)$", options[0], re.M)
    assert admin is not None

    def edit_the_import(event: str, step: object, message: str = "") -> None:
        if event == "start" and getattr(step, "name", "") == "switch":
            imported.write_text(options[0].replace(admin[0], f"\tadmin {moved}"))

    try:
        imported.write_text(options[0])
        files.atomic_write(env.caddy.caddyfile, importing.encode())
        caddy.reload(env, importing)  # what Caddy runs: the file, its import beside it
        config_before = _config(env)
        with pytest.raises(RunbookError) as err:
            switch.switch(env, switch.Options(slot=Slot.GREEN, reason="test: admin imported"),
                          progress=edit_the_import)
        said = f"{err.value.message} / {err.value.fix}"
        assert err.value.exit_code == ExitCode.PRECONDITION, said
        assert f"admin listener at {moved}" in said and "nothing was changed" in said, said
        assert env.caddy.caddyfile.read_bytes() == importing.encode()
        assert _config(env) == config_before  # still answering at admin_url
        assert _proxy_status(env) == 200
    finally:
        _admin_back(stack, env, text, moved)


def test_an_unreloaded_edit_of_another_site_is_said_with_systemctl_too(
        stack: DrillStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the plan says when Caddy runs a config that differs from its
    Caddyfile beyond the slot (an edit of another site not yet reloaded goes live with the
    switch), but not with reload = "systemctl", where the sites are not compared: `systemctl
    reload` loaded someone's pending edit of another site with the switch, and the plan's
    diff showed the managed block alone. Said there too (with a relative import: below)."""
    env = with_reload(stack, ReloadMethod.SYSTEMCTL, tmp_path, monkeypatch)
    text = caddy.read(env)
    assert text.count('respond /ping "pong" 200') == 1
    edited = text.replace('respond /ping "pong" 200', 'respond /ping "edited" 200')
    try:
        files.atomic_write(env.caddy.caddyfile, edited.encode())  # not reloaded
        plan = switch.switch(env, switch.Options(slot=Slot.GREEN), dry_run=True).plan
        said = "\n".join(plan.warnings)
        assert "differs from" in said and "beyond the slot" in said, plan.render()
        files.atomic_write(env.caddy.caddyfile, text.encode())
        calm = switch.switch(env, switch.Options(slot=Slot.GREEN), dry_run=True).plan
        assert not any("beyond the slot" in w for w in calm.warnings), calm.render()
    finally:
        stack.reset()


@pytest.mark.parametrize("method", [ReloadMethod.CADDY_RELOAD, ReloadMethod.SYSTEMCTL])
def test_an_unreloaded_edit_is_said_with_a_relative_import_too(
        stack: DrillStack, method: ReloadMethod, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: with a relative `import` in the Caddyfile, the plan said nothing of
    an edit not yet reloaded, of the file or of a file it imports (/adapt, given the text
    without its path, resolves the import from Caddy's working directory, so the comparison
    was skipped): the switch's reload loaded it unseen. The import is resolved from the
    Caddyfile's folder, as the reload resolves it: a real Caddy runs the imported site, the
    plan is calm while nothing is pending, and warns of each pending edit."""
    env = with_reload(stack, method, tmp_path, monkeypatch)
    text = caddy.read(env)
    site = env.caddy.caddyfile.parent / "imported.caddy"
    served = f"http://imported.test:{stack.ports.proxy} {{\n\tbind 127.0.0.1\n\trespond " \
             '"imported" 200\n}\n'
    importing = text + "\nimport *.caddy\n"
    assert preflight.sites_uncompared(env, importing) is not None  # the premise

    def warned() -> str:
        plan = switch.switch(env, switch.Options(slot=Slot.GREEN), dry_run=True).plan
        return "\n".join(w for w in plan.warnings if "Caddy runs" in w)

    try:
        site.write_text(served)
        files.atomic_write(env.caddy.caddyfile, importing.encode())
        caddy.reload(env, importing)  # Caddy reads the file and imports beside it
        seen = drill_http.get(f"{env.caddy.proxy_url}/", headers={"Host": "imported.test"},
                              timeout=5)
        assert seen.text == "imported", seen.text  # the premise: Caddy runs the import
        assert warned() == ""  # what Caddy runs is the file as it reads it
        edited = importing.replace('respond /ping "pong" 200', 'respond /ping "edited" 200')
        assert edited != importing
        files.atomic_write(env.caddy.caddyfile, edited.encode())  # not reloaded
        said = warned()
        assert "differs from" in said and "beyond the slot" in said, said
        files.atomic_write(env.caddy.caddyfile, importing.encode())
        site.write_text(served.replace('"imported"', '"edited"'))  # the import's, not loaded
        said = warned()
        assert "differs from" in said and "beyond the slot" in said, said
    finally:
        stack.reset()


# `caddy hash-password --plaintext drill-secret`, Caddy 2.6.2's bcrypt
BASIC_AUTH_HASH = "$2a$14$LlAbnFSchAdKxQVyrNup6e1Ld1AwKL5lvsEu2RllWTFFjaST9LP4C"


@pytest.mark.parametrize("encoding", ["bcrypt", "base64"])
def test_a_basic_auth_hash_beside_the_slot_never_prints_with_the_plan(
        stack: DrillStack, encoding: str) -> None:
    """Found by review: the plan's Caddyfile diff shows the lines around the upstream it
    changes, and a basic-auth password hash there (bcrypt, as Caddy prints it, or base64 of
    it, as its basicauth also takes it) was printed in the dry run, the plan's JSON and the
    journal: a password to crack offline. Masked, on a real Caddy that loaded the file."""
    import base64

    env = stack.env
    secret = (BASIC_AUTH_HASH if encoding == "bcrypt"
              else base64.b64encode(BASIC_AUTH_HASH.encode()).decode())
    text = caddy.read(env)
    guarded = text.replace("\thandle @api {\n", "\thandle @api {\n\t\tbasicauth {\n"
                           f"\t\t\tops {secret}\n\t\t}}\n", 1)
    assert guarded != text
    try:
        files.atomic_write(env.caddy.caddyfile, guarded.encode())
        drill_http.post(f"{env.caddy.admin_url}/load", content=guarded,
                        headers={"Content-Type": "text/caddyfile"},
                        timeout=10).raise_for_status()
        # the premise: Caddy runs it (the API asks for the password)
        asked = drill_http.get(f"{env.caddy.proxy_url}/api/x", timeout=5)
        assert asked.status_code == 401, asked.status_code
        for fmt in ("text", "json"):
            done = _cli(env, "switch", "--slot", "green", "--dry-run", "--format", fmt)
            said = done.stdout + done.stderr
            assert done.returncode == 0, said
            assert "ops ***" in said, said  # the diff shows the line, its hash masked
            assert secret not in said and BASIC_AUTH_HASH[7:29] not in said, said
        assert caddy.read(env) == guarded  # a dry run
    finally:
        stack.reset()


@pytest.mark.parametrize("method", [ReloadMethod.CADDY_RELOAD, ReloadMethod.SYSTEMCTL])
def test_a_snippet_from_an_imported_file_keeps_the_admin_check(
        stack: DrillStack, method: ReloadMethod, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: with snippets in a file the Caddyfile imports (`import
    snippets.caddy`, then `import common` in a site), `import common` was taken for a file
    beside the Caddyfile and made a path, so Caddy's adapter failed: every plan warned that
    nothing could be told, and a Caddyfile whose `admin` line was edited was accepted. A bare
    name with no such file beside the Caddyfile is left for Caddy to read as a snippet: the
    plan is calm, and the moved admin listener is refused (exit 4), nothing changed."""
    env = with_reload(stack, method, tmp_path, monkeypatch)
    text = caddy.read(env)
    (env.caddy.caddyfile.parent / "snippets.caddy").write_text(
        '(common) {\n\trespond "snip" 200\n}\n')
    importing = text + (f"\nimport snippets.caddy\nhttp://snip.test:{stack.ports.proxy} {{\n"
                        "\tbind 127.0.0.1\n\timport common\n}\n")
    admin = re.search(r"^\tadmin (\S+)$", importing, re.M)
    assert admin is not None
    moved = f"127.0.0.1:{closed_port()}"
    try:
        files.atomic_write(env.caddy.caddyfile, importing.encode())
        caddy.reload(env, importing)
        seen = drill_http.get(f"{env.caddy.proxy_url}/", headers={"Host": "snip.test"},
                              timeout=5)
        assert seen.text == "snip", seen.text  # the premise: Caddy runs the snippet
        plan = switch.switch(env, switch.Options(slot=Slot.GREEN), dry_run=True).plan
        assert not any("cannot be told" in w for w in plan.warnings), plan.warnings
        files.atomic_write(env.caddy.caddyfile,
                           importing.replace(admin[0], f"\tadmin {moved}").encode())
        config_before = _config(env)
        with pytest.raises(RunbookError) as err:
            switch.switch(env, switch.Options(slot=Slot.GREEN, reason="test: snippet"))
        said = f"{err.value.message} / {err.value.fix}"
        assert err.value.exit_code == ExitCode.PRECONDITION, said
        assert f"admin listener at {moved}" in said, said
        assert _config(env) == config_before
        assert _proxy_status(env) == 200
    finally:
        _admin_back(stack, env, text, moved)
