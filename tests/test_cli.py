"""The `runbook` CLI against the real drill stack: status, healthcheck, switch, deploy, unlock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runbook import lock as locks
from runbook.drill import http as drill_http
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from tests.drill_checks import go_cli_takes_and_releases_the_lock, through_proxy

pytestmark = pytest.mark.docker



def runbook(stack: DrillStack, *args: str, env_arg: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert stack.env.source is not None
    argv = [sys.executable, "-m", "runbook.cli", *args]
    if env_arg:
        argv.append(str(stack.env.source))
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def test_help_documents_exit_codes_and_the_prod_alias() -> None:
    out = subprocess.run([sys.executable, "-m", "runbook.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "Exit codes" in out and "4 precondition not met" in out
    rb = subprocess.run([sys.executable, "-m", "runbook.cli", "rollback", "--help"],
                        capture_output=True, text=True, check=True).stdout
    assert "prod" in rb and "--dry-run" in rb and "--to" in rb


def test_version_says_which_runbook_runs_and_its_fleet_protocol() -> None:
    """Nothing told two versions apart (found by review: an upgrade by `pip install` of a
    wheel with the same number installed nothing, and no command could show it). The oracle
    is pyproject.toml's own version, read here, and the fleet package's protocol."""
    import tomllib

    from runbook.fleet import FLEET_PROTOCOL

    root = Path(__file__).resolve().parent.parent
    wanted = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    done = subprocess.run([sys.executable, "-m", "runbook.cli", "--version"],
                          capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout == f"togather-runbook {wanted} (fleet protocol {FLEET_PROTOCOL})\n"


def test_status_shows_state_and_truth(stack: DrillStack) -> None:
    proc = runbook(stack, "status", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["current"]["version"] == VERSIONS["v1"].tag
    assert data["caddy"]["active_slot"] == "blue" and data["caddy"]["running"]
    assert data["slots"]["blue"]["health"] == "healthy"
    assert data["database"]["schema_version"] == 1
    assert data["problems"] == []
    text = runbook(stack, "status").stdout
    assert "No problems found" in text and "traffic   blue" in text
    assert stack.password not in proc.stdout + text


def test_status_text_names_the_older_deployments_a_rollback_may_go_back_to(
        stack: DrillStack) -> None:
    """After a rollback a plain rollback is refused ("name that version with --to: `runbook
    status` lists the deployments"), but the text status showed only current and previous:
    the older versions were in its JSON alone (found by the second hand-built host review).
    The oracle is the state file's own history, read here as JSON."""
    stack.arrange(scenes.PREVIOUS)  # v1, v2, v3 deployed: v3 serves, v2 previous
    doc = json.loads(stack.env.state_file.read_text())
    shown = {doc["current_deployment"]["version"], doc["previous_deployment"]["version"]}
    older = [d["version"] for d in doc["deployment_history"] if d["version"] not in shown]
    assert older == [VERSIONS["v1"].tag], older
    text = runbook(stack, "status").stdout
    assert f"  older     {older[0]} (newest first; a rollback names one with --to VERSION)" \
        in text, text


def test_status_never_offers_a_release_this_host_was_rolled_back_from_as_older(
        stack: DrillStack) -> None:
    """v1, v2, v3 deployed; rolled back v3 -> v2, then --to v1: the history holds v3, rolled
    back from and newer than what serves. The "older" line offered it as a version to go
    further back to (found by review); it lists only releases deployed before the current
    one and never rolled back from. The oracle is the file written here, read as JSON."""
    from runbook import state as states

    stack.arrange(scenes.PREVIOUS)
    st = states.read_state(stack.env.state_file)
    once = states.after_rollback(st)  # v3 -> v2
    v1 = once.find_version(VERSIONS["v1"].tag)
    assert v1 is not None
    states.write_state(stack.env.state_file, states.after_rollback(once, v1))  # -> v1
    doc = json.loads(stack.env.state_file.read_text())
    assert doc["current_deployment"]["version"] == VERSIONS["v1"].tag
    back_from = [d["version"] for d in doc["deployment_history"]
                 if d.get("status") == "rolled_back"]
    assert VERSIONS["v3"].tag in back_from, doc["deployment_history"]
    text = runbook(stack, "status").stdout
    older = [line for line in text.splitlines() if line.startswith("  older ")]
    assert not any(VERSIONS["v3"].tag in line for line in older), text


def test_a_rollback_typed_again_after_the_go_cli_rewrote_the_file_never_goes_forward(
        stack: DrillStack) -> None:
    """Found by review: v3 -> v2 rolled back, then the Go CLI took and released the state
    file's lock, a rewrite through its structs that drops `status` (and keeps `rollback`,
    `rollback_id`). The previous deployment no longer said `rolled_back`, so status had
    nothing to say and `runbook rollback` typed again put v3, the release users had just been
    taken off, back in front of them (exit 0, "rolled back"). Refused, exit 4, nothing
    changed; `--to` is named for going back to it on purpose. The oracle: the proxy's
    answers, the file's bytes, the file's own JSON."""
    stack.arrange(scenes.PREVIOUS)  # v2 on green (stopped), v3 on blue serving
    first = runbook(stack, "rollback", "--yes")
    assert first.returncode == 0, first.stdout + first.stderr
    assert through_proxy(stack.env) == ("green", VERSIONS["v2"].tag)
    go_cli_takes_and_releases_the_lock(stack.env.state_file)
    doc = json.loads(stack.env.state_file.read_text())
    assert "status" not in doc["previous_deployment"], doc  # the premise: the Go rewrite
    assert doc["previous_deployment"]["version"] == VERSIONS["v3"].tag, doc
    assert doc["current_deployment"]["rollback"] is True, doc
    written = stack.env.state_file.read_bytes()
    again = runbook(stack, "rollback", "--yes")
    said = again.stdout + again.stderr
    assert again.returncode == 4, said
    assert "is the one this host was rolled back from" in said, said
    assert f"--to {VERSIONS['v3'].tag}" in said, said
    assert through_proxy(stack.env) == ("green", VERSIONS["v2"].tag)
    assert stack.env.state_file.read_bytes() == written
    status = runbook(stack, "status")
    assert "rolled back from" in status.stdout, status.stdout


def test_status_names_a_caddyfile_targeting_the_wrong_port(stack: DrillStack) -> None:
    path = stack.env.caddy.caddyfile
    path.write_text(path.read_text().replace(f"localhost:{stack.ports.blue}", "localhost:9"))
    proc = runbook(stack, "status")
    assert proc.returncode == 1
    assert "port 9" in proc.stdout and "Problems" in proc.stdout


def test_healthcheck_formats(stack: DrillStack) -> None:
    assert stack.env.source is not None
    argv = [sys.executable, "-m", "runbook.cli", "healthcheck", str(stack.env.source)]
    data = json.loads(subprocess.run([*argv, "--slot", "green", "--format", "json"],
                                     capture_output=True, text=True, check=True).stdout)
    assert data["slot"] == "green" and data["status"] == "healthy" and data["ok"] is True
    assert data["checks"]["migrations"]["details"]["version"] == 1
    table = subprocess.run([*argv, "--slot", "both", "--format", "table"],
                           capture_output=True, text=True, check=True).stdout
    assert "blue" in table and "green" in table and "healthy" in table
    active = subprocess.run([*argv, "--slot", "active", "--format", "simple"],
                            capture_output=True, text=True, check=True).stdout
    assert "blue" in active
    stack.docker("stop", stack.env.slot("green").container)
    down = subprocess.run([*argv, "--slot", "green"], capture_output=True, text=True,
                          check=False)
    assert down.returncode == 1 and "unreachable" in down.stdout


def test_manual_switch_and_back(stack: DrillStack) -> None:
    proc = runbook(stack, "switch", "--slot", "green", "--yes")
    assert proc.returncode == 0, proc.stderr
    response = drill_http.get(f"{stack.env.caddy.proxy_url}/version")
    assert response.headers["X-Togather-Slot"] == "green"
    assert "switch" in proc.stdout and "Journal" in proc.stdout
    again = runbook(stack, "switch", "--slot", "green", "--yes")
    assert again.returncode == 4 and "already takes traffic" in again.stderr
    back = runbook(stack, "switch", "--slot", "blue", "--yes")
    assert back.returncode == 0, back.stderr
    answer = drill_http.get(f"{stack.env.caddy.proxy_url}/version")
    assert answer.headers["X-Togather-Slot"] == "blue"


def test_a_switch_says_the_old_slot_is_left_running_and_how_to_stop_it(
        stack: DrillStack) -> None:
    """Found by a kill fuzz: a switch keeps the old slot running (to switch back at once),
    while the switch's own output never said so. The switch says it, with the switch back
    and the stop status names (as a note, exit 0: that very container is no problem);
    Docker says the old one runs."""
    stack.arrange(scenes.PREVIOUS_RUNNING)  # v3 serves from blue, v2 runs on green
    blue = stack.env.slot("blue").container
    done = runbook(stack, "switch", "--slot", "green", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the old blue slot is left running" in done.stderr, done.stderr
    assert f"`docker stop {blue}`" in done.stderr, done.stderr
    assert stack.docker("inspect", "-f", "{{.State.Running}}", blue).stdout.strip() == "true"
    status = runbook(stack, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"`docker stop {blue}`" in status.stdout + status.stderr  # the same way out


def test_deploy_dry_run_then_deploy_then_rollback_plan(stack: DrillStack) -> None:
    v2 = VERSIONS["v2"].tag
    dry = runbook(stack, "deploy", "--version", v2, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "Dry run: nothing was changed" in dry.stdout and f"IMAGE_TAG={v2}" in dry.stdout
    assert drill_http.get(f"{stack.env.caddy.proxy_url}/version").json()["version"] != v2
    done = runbook(stack, "deploy", "--version", v2, "--yes")
    assert done.returncode == 0, done.stderr
    assert drill_http.get(f"{stack.env.caddy.proxy_url}/version").json()["version"] == v2
    refused = runbook(stack, "rollback", "--yes")
    assert refused.returncode == 4
    assert "migrations ran after the target deployment" in refused.stderr


def test_deploy_of_an_absent_image_or_a_bad_version_is_refused(stack: DrillStack) -> None:
    bad = runbook(stack, "deploy", "--version", "latest", "--yes")
    assert bad.returncode == 2 and "'latest' is not a 7-hex short commit" in bad.stderr
    assert not any(stack.env.log_dir.glob("*.log")), "bad input must not even be journaled"
    proc = runbook(stack, "deploy", "--version", "abcdef0", "--yes")
    assert proc.returncode == 4 and "togather-server:abcdef0 is not present" in proc.stderr


def test_unlock_status_and_refusal_of_a_live_holder(stack: DrillStack) -> None:
    assert runbook(stack, "unlock", "--status").stdout.strip() == "free"
    held = locks.acquire(stack.env, reason="drill test", run_id="test_run")
    try:
        status = runbook(stack, "unlock", "--status")
        assert "drill test" in status.stdout and "pid" in status.stdout
        forced = runbook(stack, "unlock", "--force", "--yes")
        assert forced.returncode == 3
        assert stack.env.lock_path.exists()
        rb = runbook(stack, "rollback", "--yes")
        assert rb.returncode == 3 and "drill test" in rb.stderr
    finally:
        locks.release(stack.env, held)
    assert not stack.env.lock_path.exists()
    # unattended without --yes: the fix names what unlock has (it has no --dry-run)
    asked = runbook(stack, "unlock")
    assert asked.returncode == 2 and "--status" in asked.stderr and "--dry-run" not in asked.stderr
    freed = runbook(stack, "unlock", "--yes", "--format", "json")
    assert freed.returncode == 0 and json.loads(freed.stdout)["ok"] is True, freed.stdout


def test_json_is_printed_for_a_config_error_too() -> None:
    done = subprocess.run([sys.executable, "-m", "runbook.cli", "healthcheck",
                           "/nonexistent/env.toml", "--format", "json"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    answer = json.loads(done.stdout)  # it printed nothing on stdout before
    assert done.returncode == 2 and answer["ok"] is False and answer["exit_code"] == 2
    assert "no such file" in answer["error"] and answer["fix"]


def test_cli_import_leaves_heavy_libraries_for_later() -> None:
    """`runbook --help` stays fast because docker, httpx and psycopg load only when used."""
    code = ("import sys, runbook.cli; "
            "print(sorted(m for m in ('docker', 'httpx', 'psycopg') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def logs(stack: DrillStack) -> dict[str, list[dict[str, Any]]]:
    """Every log file of the environment, by name: its lines."""
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in stack.env.log_dir.glob("*.log")}


def records(stack: DrillStack) -> list[str]:
    runs = stack.env.runs_dir
    return sorted(p.name for p in runs.glob("*.json")) if runs.is_dir() else []


def new_log(stack: DrillStack, before: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    (added,) = [lines for name, lines in logs(stack).items() if name not in before]
    return added


DEAD_HOLDER = """
import os, sys
from runbook import environment, lock
lock.acquire(environment.load(sys.argv[1]), reason="a run killed holding the lock")
os._exit(0)  # killed: never released
"""


def test_unlock_journals_the_lock_it_removed_or_refused_and_who_asked(stack: DrillStack) -> None:
    """Found by review: `runbook unlock --force` removed a lock outside run.perform, so no
    log line said which lock went, or who removed it (README: every run writes the log). It
    writes the contract's lines now; its output and exit codes are what they were, and it
    writes no run record (reports, `status` and a killed restore's look-back read those)."""
    env = stack.env
    assert env.source is not None
    subprocess.run([sys.executable, "-c", DEAD_HOLDER, str(env.source)], check=True,
                   timeout=60)
    assert env.lock_path.exists()
    before, kept = logs(stack), records(stack)
    done = runbook(stack, "unlock", "--force", "--yes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{env.display}: removed a stale lock") and done.stderr == ""
    assert not env.lock_path.exists()
    lines = new_log(stack, before)
    assert lines[0]["message"].startswith(f"unlock started on {env.display} by ")
    assert "runbook unlock --force" in lines[0]["message"]
    (removed,) = [e for e in lines if e["level"] == "SUCCESS" and e.get("lock")]
    assert removed["message"] == done.stdout.strip()
    assert "a run killed holding the lock" in removed["message"]
    assert lines[-1]["message"] == "unlock success (exit code 0)"
    assert len({e["run_id"] for e in lines}) == 1 and records(stack) == kept

    held = locks.acquire(env, reason="drill test", run_id="test_run")
    try:
        before = logs(stack)
        refused = runbook(stack, "unlock", "--force", "--yes")
    finally:
        locks.release(env, held)
    assert refused.returncode == 3, refused.stderr
    lines = new_log(stack, before)
    assert [e.get("exit_code") for e in lines if e["level"] == "ERROR"] == [3, 3], lines
    assert lines[-1]["message"] == "unlock failed (exit code 3)"
    assert refused.stdout == "" and "journal" not in refused.stderr  # said as before


def test_snapshot_create_journals_the_snapshot_it_took(stack: DrillStack) -> None:
    """Found by review: `runbook snapshot create` wrote no log line."""
    before, kept = logs(stack), records(stack)
    done = runbook(stack, "snapshot", "create", "--reason", "journal-test")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Snapshot taken: ") and done.stderr == ""
    path = done.stdout.splitlines()[0].removeprefix("Snapshot taken: ")
    assert Path(path).is_file()
    lines = new_log(stack, before)
    assert lines[0]["message"].startswith("snapshot-create started on ")
    (taken,) = [e for e in lines if e.get("snapshot")]
    assert taken["snapshot"] == path and taken["level"] == "SUCCESS"
    assert isinstance(taken["schema"], int)
    assert lines[-1]["message"] == "snapshot-create success (exit code 0)"
    assert records(stack) == kept


def test_a_ctrl_c_while_the_cli_is_still_importing_is_one_line_not_a_traceback() -> None:
    """Found by a kill fuzz: a Ctrl-C in the CLI's first tenth of a second (its imports)
    printed a Python traceback from whichever import it landed in. The CLI's first import
    (runbook.startup) answers it: one line, exit 130, nothing changed (no command had
    begun). Here the signal comes right after that first import, where the rest would be."""
    program = ("import os, signal, time\n"
               "from runbook import startup\n"
               "os.kill(os.getpid(), signal.SIGINT)\n"
               "time.sleep(5)\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 130, done.stdout + done.stderr
    assert done.stderr == ("runbook: interrupted before the command began; nothing was "
                           "changed\n"), done.stderr


def test_once_the_cli_is_imported_a_ctrl_c_is_pythons_again() -> None:
    """Found by review: the import-time handler stayed in a process that imports the CLI
    without calling main() (pytest's steps do), so a later Ctrl-C there exited 130 saying
    "nothing was changed", skipping every teardown. Once imported, it is Python's own
    KeyboardInterrupt again (a `finally` runs); an inherited SIG_IGN stays ignored."""
    program = ("import os, signal\n"
               "import runbook.cli\n"
               "try:\n"
               "    os.kill(os.getpid(), signal.SIGINT)\n"
               "    signal.pause()\n"
               "except KeyboardInterrupt:\n"
               "    print('KeyboardInterrupt')\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "KeyboardInterrupt"), done.stderr
    ignored = subprocess.run(
        [sys.executable, "-c", "import signal, runbook.cli\n"
         "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"],
        capture_output=True, text=True, timeout=60, check=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert ignored.stdout.strip() == "True", ignored.stderr


_INTERRUPTED_AT = """
import importlib, os, signal, sys
import runbook.startup  # the CLI's first import, as in a real start
entry, where = sys.argv.pop(1), sys.argv.pop(1)
module, _, name = where.partition(":")
owner = importlib.import_module(module)
*outer, name = name.split(".")
for part in outer:
    owner = getattr(owner, part)
original = getattr(owner, name)
sent = getattr(signal, os.environ.get("RUNBOOK_TEST_SIGNAL", "SIGINT"))
def interrupted(*args, **kwargs):
    os.kill(os.getpid(), sent)  # on-call's Ctrl-C (or a SIGTERM, a SIGHUP) lands here
    return original(*args, **kwargs)
setattr(owner, name, interrupted)
if entry == "module":  # python -m runbook.cli
    import runpy
    runpy.run_module("runbook.cli", run_name="__main__", alter_sys=True)
else:  # the console script pip writes (.venv/bin/runbook): it imports main, then calls it
    sys.argv[0] = os.path.join(os.path.dirname(sys.executable), "runbook")
    from runbook.cli import main
    sys.exit(main())
"""


def _interrupted_at(entry: str, where: str, *args: str,
                    signame: str = "SIGINT") -> subprocess.CompletedProcess[str]:
    """`runbook ARGS`, started as `entry` ("module" or "script"), with `signame` sent to itself
    when it first calls `where` ("module:function"): a Ctrl-C (or that signal) at that very
    point."""
    return subprocess.run([sys.executable, "-c", _INTERRUPTED_AT, entry, where, *args],
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False,
                          env={**os.environ, "RUNBOOK_TEST_SIGNAL": signame})


def _scratch_env(tmp_path: Path) -> Path:
    """The packaged staging environment with everything it would write under tmp_path."""
    staging = (Path(__file__).resolve().parents[1] / "runbook" / "environments"
               / "staging.toml").read_text()
    for old, new in (("/opt/togather/src/deploy/config/deployment-state.json",
                      tmp_path / "state.json"), ('dir = "/tmp"', f'dir = "{tmp_path}/lock"'),
                     ("~/.togather/logs/deployments", tmp_path / "logs"),
                     ("~/.togather/runs", tmp_path / "runs"),
                     ("/etc/caddy/Caddyfile", tmp_path / "Caddyfile")):
        assert str(old) in staging, old
        staging = staging.replace(str(old), str(new))
    path = tmp_path / "scratch.toml"
    path.write_text(staging)
    return path


@pytest.mark.parametrize("entry", ["module", "script"])
def test_a_ctrl_c_while_the_command_line_is_parsed_says_nothing_was_changed(
        entry: str, tmp_path: Path) -> None:
    """Found by review: a Ctrl-C once the CLI was imported but before any command began (typer
    parsing the command line) exited 130 with nothing on stderr: typer turns KeyboardInterrupt
    into a silent exit 130, so on-call could not tell whether anything ran. It is one line
    saying nothing was changed, with the 130 README documents, from either way of starting."""
    env = _scratch_env(tmp_path)
    done = _interrupted_at(entry, "typer._click.core:Command.parse_args", "rollback", "--yes",
                           str(env))
    assert done.returncode == 130, done.stdout + done.stderr
    assert done.stderr == ("runbook: interrupted before the command began; nothing was "
                           "changed\n"), done.stderr
    assert done.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch.toml"]  # nothing written


@pytest.mark.parametrize(("where", "args"), [
    ("runbook.status:gather", ["status"]),  # a read-only command, no handling of its own
    ("runbook.disk:refuse_unwritable", ["rollback", "--yes"]),  # before the run's handlers
    ("runbook.run:_dry_run", ["rollback", "--dry-run"]),  # README: a dry run's Ctrl-C
])
def test_a_ctrl_c_once_the_command_began_is_one_line_not_silence(
        where: str, args: list[str], tmp_path: Path) -> None:
    """Found by review: a Ctrl-C after the command began but outside a run's own signal
    handling (a status, a dry run, a rollback still checking its folders) exited 130 in
    silence (typer's doing). It says it was interrupted; no traceback."""
    env = _scratch_env(tmp_path)
    done = _interrupted_at("module", where, *args, str(env))
    assert done.returncode == 130, done.stdout + done.stderr
    assert done.stderr == "runbook: interrupted\n", done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "logs").exists() and not (tmp_path / "lock").exists()


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_sigterm_or_sighup_while_the_cli_starts_says_nothing_was_changed(
        signame: str, tmp_path: Path) -> None:
    """Found by a kill fuzz: SIGTERM or SIGHUP in the CLI's start-up (its imports, typer
    parsing the command line) killed it by the signal's default: exit -15/-1, nothing said.
    As for Ctrl-C there: one line, nothing changed, and the signal's own 128 + its number."""
    signum = getattr(signal, signame)
    program = ("import os, signal, time\n"
               "from runbook import startup\n"
               f"os.kill(os.getpid(), signal.{signame})\n"
               "time.sleep(5)\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 128 + signum, done.stdout + done.stderr
    assert done.stderr == f"runbook: {signame} before the command began; nothing was changed\n"
    env = _scratch_env(tmp_path)
    done = _interrupted_at("script", "typer._click.core:Command.parse_args", "rollback", "--yes",
                           str(env), signame=signame)
    assert done.returncode == 128 + signum, done.stdout + done.stderr
    assert done.stderr == f"runbook: {signame} before the command began; nothing was changed\n"
    assert done.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch.toml"]  # nothing written


def test_an_ignored_sighup_stays_ignored_and_an_imported_cli_leaves_sigterm_alone() -> None:
    """`nohup runbook ...` must outlive the closed session from its first line; a process
    that imports the CLI without running it (pytest) keeps SIGTERM's and SIGHUP's default."""
    ignored = subprocess.run(
        [sys.executable, "-c", "import os, signal\nfrom runbook import startup\n"
         "os.kill(os.getpid(), signal.SIGHUP)\n"
         "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)"],
        capture_output=True, text=True, timeout=60, check=False,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert (ignored.returncode, ignored.stdout.strip()) == (0, "True"), ignored.stderr
    imported = subprocess.run(
        [sys.executable, "-c", "import signal, runbook.cli\n"
         "print([signal.getsignal(s) is signal.SIG_DFL for s in (signal.SIGTERM, signal.SIGHUP)])"],
        capture_output=True, text=True, timeout=60, check=True)
    assert imported.stdout.strip() == "[True, True]", imported.stderr


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize(("where", "args"), [
    ("runbook.status:gather", ["status"]),  # a read-only command, no handling of its own
    ("runbook.disk:refuse_unwritable", ["rollback", "--yes"]),  # before the run's handlers
    ("runbook.run:_dry_run", ["rollback", "--dry-run"]),  # a dry run's own handlers
])
def test_a_sigterm_or_sighup_once_the_command_began_is_one_line_and_its_own_exit(
        where: str, args: list[str], signame: str, tmp_path: Path) -> None:
    """Found by a kill fuzz: SIGTERM or SIGHUP after the command began but before a run's own
    handlers (the environment's checks) killed it silently (exit -15/-1), skipping the
    command's clean-up. It goes Ctrl-C's way (every finally runs) and says so."""
    env = _scratch_env(tmp_path)
    done = _interrupted_at("module", where, *args, str(env), signame=signame)
    assert done.returncode == 128 + getattr(signal, signame), done.stdout + done.stderr
    assert done.stderr == f"runbook: interrupted by {signame}\n", done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "logs").exists() and not (tmp_path / "lock").exists()


def test_a_closed_terminal_never_counts_as_the_second_ctrl_c_that_cuts_compose_off() -> None:
    """Found by review: a closed terminal may send SIGHUP twice (the shell, then the kernel),
    which counted as "another Ctrl-C" and cut compose off half-way: the very leftover the
    held recreate avoids. Only SIGINT and SIGTERM count; SIGHUP is still received."""
    from runbook.plan import Signals

    signals = Signals()
    for signum in (signal.SIGHUP, signal.SIGHUP):
        signals._handler(signum, None)
    assert (signals.received, signals.count) == (signal.SIGHUP, 0)
    signals._handler(signal.SIGINT, None)
    signals._handler(signal.SIGINT, None)
    assert signals.count == 2  # a deliberate second Ctrl-C still counts



def test_a_library_user_keeps_python_s_own_signal_handling() -> None:
    """Found reading the SIGTERM change: runbook/run.py imported runbook/startup.py, whose
    import takes over Ctrl-C, SIGTERM and SIGHUP for the CLI's start-up: any process using the
    library (a bench script, the tests, an operator's own script) had its Ctrl-C exit 130 at
    once with "interrupted before the command began". Only the CLI takes them."""
    code = ("import signal\n"
            "from runbook import deploy, rollback, run, snapshot_restore, status, switch\n"
            "print([signal.getsignal(s) is d for s, d in ((signal.SIGINT, "
            "signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL), (signal.SIGHUP, "
            "signal.SIG_DFL))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[True, True, True]", out
