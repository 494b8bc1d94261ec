"""Files other tools (or a hand) left where the runbook reads: `runbook status` says what is
wrong in one line and its documented exit code, never a traceback, always valid JSON with
--format json. No container: Docker is pointed at a closed port, Caddy too."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from runbook import environment as envmod
from tests.drill_checks import (
    DEPLOY_UID,
    closed_port,
    closed_ports,
    host_env,
    needs_root,
    tmpfs,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def host(tmp_path: Path) -> Path:
    env = host_env(tmp_path)
    admin, proxy = closed_ports(2)
    text = envmod.to_toml(env).replace('"http://localhost:2019"', f'"http://127.0.0.1:{admin}"')
    text = text.replace('proxy_url = "http://localhost"', f'proxy_url = "http://127.0.0.1:{proxy}"')
    source = tmp_path / "host.toml"
    source.write_text(text)
    for folder in ("runs", "locks", "state"):
        (tmp_path / folder).mkdir()
    return source


def status(source: Path, fmt: str = "json") -> tuple[int, dict[str, object] | None, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["DOCKER_HOST"] = f"tcp://127.0.0.1:{closed_port()}"
    done = subprocess.run([sys.executable, "-m", "runbook.cli", "status", str(source),
                           "--format", fmt], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env=env, check=False, cwd=REPO_ROOT)
    assert "Traceback" not in done.stderr and "unexpected failure" not in done.stderr, done.stderr
    data = json.loads(done.stdout) if fmt == "json" else None
    return done.returncode, data, done.stdout + done.stderr


def test_run_records_another_tool_or_environment_left_are_not_this_ones(host: Path) -> None:
    runs = host.parent / "runs"
    (runs / "junk.json").write_text('"just a string"')
    (runs / "odd.json").write_text('{"context": "str", "environment": "production"}')
    (runs / "staging.json").write_text(json.dumps({
        "environment": "staging", "run_id": "rbk_staging1", "action": "rollback",
        "outcome": "failed", "exit_code": 5}))
    code, data, said = status(host)
    assert code == 1 and data is not None  # problems (nothing runs here), listed
    assert "rbk_staging1" not in said  # another environment's run is not this one's


def test_a_lock_path_that_is_no_directory_is_a_problem_status_names(host: Path) -> None:
    (host.parent / "locks" / "togather-deploy-production.lock").write_text("")
    code, data, said = status(host, "text")
    assert code == 1 and "the deploy lock cannot be used" in said, said
    (host.parent / "locks" / "togather-deploy-production.lock").unlink()
    (host.parent / "locks").rmdir()
    (host.parent / "locks").write_text("a file, not a directory")
    code, data, said = status(host)
    assert code == 1 and data is not None and "[lock] dir" in said, said


def test_a_slot_host_with_a_stray_space_is_a_config_error(host: Path) -> None:
    host.write_text(host.read_text().replace('host = "127.0.0.1"', 'host = "localhost "', 1))
    code, data, said = status(host)
    assert code == 2 and data is not None and data["ok"] is False
    assert "slots.blue.host" in said and "'localhost '" in said, said


def test_files_saved_with_a_byte_order_mark_are_read(host: Path) -> None:
    env_file = host.parent / "env.production"
    env_file.write_bytes(b"\xef\xbb\xbfDATABASE_URL=postgresql://u:pw-Kx81@127.0.0.1:1/db\r\n")
    env_file.chmod(0o600)
    text = host.read_text().replace("[database]\n", f'[database]\nenv_file = "{env_file}"\n')
    host.write_bytes(b"\xef\xbb\xbf" + text.encode())
    code, data, said = status(host)
    assert code == 1 and data is not None, said
    assert "DATABASE_URL is missing" not in said and "database unreachable" in said, said
    assert "pw-Kx81" not in said


def test_prod_is_production_in_an_environment_file_too(host: Path) -> None:
    """README: `prod` is accepted for `production` everywhere; a file's `name = "prod"` was
    refused ('prod' is not one of development, staging, production), exit 2."""
    host.write_text(host.read_text().replace('name = "production"', 'name = "prod"', 1))
    code, data, said = status(host)
    assert code == 1 and data is not None and "is not one of" not in said, said


def test_caddy_down_is_said_even_when_the_caddyfile_cannot_be_read(host: Path) -> None:
    """A Caddyfile without the slot markers hid that Caddy did not answer at all: the only
    Caddy problem listed was the markers."""
    caddyfile = host.parent / "Caddyfile"
    caddyfile.write_text("example.org {\n\treverse_proxy localhost:8081\n}\n")
    host.write_text(host.read_text().replace('"/etc/caddy/Caddyfile"', f'"{caddyfile}"'))
    code, _data, said = status(host, "text")
    assert code == 1 and "Caddy is not answering" in said and "BLUE_GREEN_SLOT" in said, said


def test_a_docker_cli_warning_is_not_taken_for_the_created_containers_id(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`docker create` succeeded but warned on stderr (an image for another platform): the
    warning was read as the container id, the migrate check failed (deploy refused) and the
    container was left behind. The docker CLI here is a stand-in that records its calls."""
    from runbook import preflight

    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "docker"
    fake.parent.mkdir()
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {calls}
case "$1 $2" in
  "image inspect") exit 1 ;;
  "create "*) echo "WARNING: The requested image's platform (linux/arm64) does not match" >&2
              echo 0123456789ab ;;
  "cp "*) case "$2" in 0123456789ab:/app/server) exit 0 ;; *) exit 1 ;; esac ;;
  "rm "*) exit 0 ;;
esac
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    env = host_env(tmp_path).with_(migrate_command=("/app/server", "migrate", "up"))
    said = preflight.migrate_path(env, "togather-server:abc1234")
    assert "/app/server is in togather-server:abc1234" in said
    assert "rm -f -v 0123456789ab" in calls.read_text()  # the created container removed


@pytest.mark.parametrize("help_text,ok", [
    ("Usage: docker compose up [OPTIONS] [SERVICE...]\\n      --pull string   Pull image "
     "before running\\n", True),
    ("Usage: up [options] [--scale SERVICE=NUM...] [--] [SERVICE...]\\n  -d, --detach\\n", False),
])
def test_a_compose_without_up_pull_is_refused_in_preflight(
        tmp_path: Path, help_text: str, ok: bool) -> None:
    """The recreate runs `up ... --pull never`; docker-compose v1 (Debian 12's package) has
    no such flag, passed `compose version`, and failed mid-plan. The stand-in prints the help
    of each."""
    from runbook import preflight
    from runbook.errors import PreconditionError

    env = host_env(tmp_path)
    # `config --format json` (pre-flight reads the project too): the slots' services
    project = json.dumps({"services": {s.service: {"container_name": s.container}
                                       for s in env.slots.values()}})
    fake = tmp_path / "compose"
    fake.write_text(f"#!/bin/sh\ncase \"$*\" in *' config '*) echo '{project}'; exit 0;; "
                    f"esac\nprintf '{help_text}'\n")
    fake.chmod(0o755)
    (tmp_path / "compose.yml").write_text("services: {}\n")
    env = env.with_(compose=dataclasses.replace(env.compose, file=tmp_path / "compose.yml",
                                                command=(str(fake),)))
    if ok:
        assert "up --pull never` runs" in preflight.compose_path(env)
        return
    with pytest.raises(PreconditionError, match="no --pull option") as info:
        preflight.compose_path(env)
    assert "nothing was changed" in info.value.message


@pytest.mark.parametrize(("argv", "flag"), [
    (["rollback", "HOST", "--to", "", "--yes"], "--to"),
    (["rollback", "HOST", "--expect-from", "", "--yes"], "--expect-from"),
    (["rollback", "HOST", "--snapshot", "", "--restore-snapshot", "--yes"], "--snapshot"),
    # found by review: a blank SNAPSHOT restored the newest, a blank --config loaded the
    # built-in file of that name, a blank --limit rolled back every host of the inventory,
    # a blank --resume started afresh
    (["snapshot", "restore", "HOST", "", "--yes"], "SNAPSHOT"),
    (["rollback", "production", "--config", "", "--yes"], "--config (or RUNBOOK_CONFIG)"),
    (["status", ""], "ENV"),
    (["fleet", "rollback", "INVENTORY", "--limit", "", "--yes"], "--limit"),
    (["fleet", "rollback", "INVENTORY", "--resume", "", "--yes"], "--resume"),
])
def test_a_blank_value_is_refused_never_taken_for_the_default(
        host: Path, argv: list[str], flag: str) -> None:
    """Found by review: `--to "$TARGET"` with TARGET unset rolled back to the previous
    deployment instead of the one asked for, and a blank --expect-from skipped the fleet's
    guard. Exit 2 before anything is read, one line, nothing written."""
    inventory = host.parent / "hosts.yml"
    inventory.write_text("all:\n  hosts:\n    h1:\n")
    before = sorted(p.relative_to(host.parent) for p in host.parent.rglob("*"))
    argv = [str(host) if a == "HOST" else str(inventory) if a == "INVENTORY" else a
            for a in argv]
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["RUNBOOK_FLEET_DIR"] = str(host.parent / "fleet")
    done = subprocess.run([sys.executable, "-m", "runbook.cli", *argv], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, env=env,
                          check=False, cwd=REPO_ROOT)
    assert done.returncode == 2, done.stderr
    assert f"{flag} is empty; nothing was changed" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert sorted(p.relative_to(host.parent) for p in host.parent.rglob("*")) == before


def test_a_path_naming_no_users_home_is_a_usage_error(host: Path) -> None:
    """Found by review: `--config ~nosuchuser/x.toml` was "unexpected failure:
    RuntimeError", exit 5 ("could not be fully undone")."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    for argv in (["status", "~nosuchuser-rb/x.toml"],
                 ["status", "production", "--config", "~nosuchuser-rb/x.toml"]):
        done = subprocess.run([sys.executable, "-m", "runbook.cli", *argv],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, env=env, check=False, cwd=REPO_ROOT)
        assert done.returncode == 2, done.stderr
        assert "~nosuchuser-rb is no user's home on this machine" in done.stderr, done.stderr


@needs_root
def test_snapshot_list_of_an_unreadable_folder_is_exit_4_not_an_unexpected_failure(
        shared_dir: Path) -> None:
    """Found by review: `snapshot list` let the folder's error through as "unexpected
    failure", exit 5 ("could not be fully undone") for a read-only command. Here a user who
    is not root lists a root-only (0700) snapshot folder, as on-call on a host may."""
    folder = shared_dir / "snapshots"
    folder.mkdir(mode=0o700)
    env = host_env(shared_dir)
    env = env.with_(database=dataclasses.replace(env.database, snapshot_dir=folder))
    source = shared_dir / "host.toml"
    source.write_text(envmod.to_toml(env))
    # the same reads done once as root first, so every module they load lazily is loaded
    # (Python itself may not be readable by uid 1000); then the CLI runs as uid 1000, its
    # exit code the process's
    code = ("import sys, os\nimport runbook.cli\n"
            "from runbook import environment, snapshots\n"
            "snapshots.list_snapshots(environment.load(sys.argv[1]))\n"
            f"os.setgroups([]); os.setgid({DEPLOY_UID}); os.setuid({DEPLOY_UID})\n"
            "sys.argv = ['runbook', 'snapshot', 'list', sys.argv[1]]\nrunbook.cli.main()\n")
    done = subprocess.run([sys.executable, "-c", code, str(source)], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 4, (done.returncode, done.stderr)
    assert "Permission denied" in done.stderr, done.stderr
    assert "unexpected failure" not in done.stderr and done.stderr.count("\n") == 1


def test_the_fleets_host_commands_mask_secrets_and_lock_status_exists(host: Path) -> None:
    """Found by review: `runbook fleet lock`, `drain` and `host-check` printed an argument
    holding a DATABASE_URL with its password (the main CLI masks it), host-check exited 4 on
    a configuration error its JSON called exit 2, and `runbook fleet lock ENV --status`,
    which README and the fleet's own refusal name, did not exist."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}

    def fleet(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runbook.cli", "fleet", *argv],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, env=env, check=False, cwd=REPO_ROOT)

    secret = "postgresql://togather:S3cretPw@db/x.toml"
    for argv in (["lock", secret], ["drain", secret], ["host-check", secret]):
        done = fleet(*argv)
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        assert "S3cretPw" not in done.stdout + done.stderr, (argv, done.stdout, done.stderr)
        assert json.loads(done.stdout.splitlines()[-1]), done.stdout  # still JSON
    status = fleet("lock", str(host), "--status")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["locked"] is False


def test_a_stale_runbook_config_a_fifo_env_file_and_a_snapshot_dir_that_is_a_file(
        host: Path) -> None:
    """Found by review: a stale RUNBOOK_CONFIG was reported as if the ENV typed did not
    exist; a FIFO as [database] env_file hung `runbook status` until killed; a snapshot_dir
    that is a file was "No snapshots", exit 0, and the restore advised taking one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}

    def cli(*argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runbook.cli", *argv],
                              capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL, env=env | extra, check=False,
                              cwd=REPO_ROOT)

    gone = cli("status", "staging", RUNBOOK_CONFIG=str(host.parent / "gone.toml"))
    assert gone.returncode == 2 and "(from RUNBOOK_CONFIG)" in gone.stderr, gone.stderr
    assert "unset RUNBOOK_CONFIG" in gone.stderr, gone.stderr

    fifo = host.parent / "env.fifo"
    os.mkfifo(fifo)
    piped = host.parent / "fifo.toml"
    assert "[database]\n" in host.read_text()
    piped.write_text(host.read_text().replace("[database]\n",
                                              f'[database]\nenv_file = "{fifo}"\n', 1))
    hung = cli("status", str(piped))  # the timeout would raise: it must not hang
    assert hung.returncode == 1, hung.stdout + hung.stderr  # a problem status lists
    assert f"env file {fifo} is not a regular file" in hung.stdout, hung.stdout

    folder_file = host.parent / "snapfile"
    folder_file.write_text("")
    text = host.read_text()
    assert "snapshot_dir = " in text, text
    as_file = host.parent / "snapfile.toml"
    as_file.write_text(re.sub(r'snapshot_dir = "[^"]*"', f'snapshot_dir = "{folder_file}"', text))
    listed = cli("snapshot", "list", str(as_file))
    assert listed.returncode == 4, listed.stdout + listed.stderr
    assert "is not a directory" in listed.stderr and "No snapshots" not in listed.stdout


def test_healthcheck_without_env_takes_the_config_files_environment(host: Path) -> None:
    """Found by review: `runbook healthcheck` without ENV meant production, so with
    RUNBOOK_CONFIG (or --config) naming a staging file every call was refused, exit 2."""
    staging = host.parent / "staging.toml"
    staging.write_text(re.sub(r'(?m)^name = "[^"]*"', 'name = "staging"', host.read_text()))
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    for argv, extra in ((["--config", str(staging)], {}), ([], {"RUNBOOK_CONFIG": str(staging)})):
        done = subprocess.run([sys.executable, "-m", "runbook.cli", "healthcheck", *argv,
                               "--format", "json"], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, env=env | extra, check=False,
                              cwd=REPO_ROOT)
        assert "describes environment" not in done.stdout + done.stderr, done.stdout
        assert done.returncode == 1, done.stdout + done.stderr  # nothing answers here


def test_a_usage_error_is_one_line_and_json_when_asked() -> None:
    """Found by review: click printed four lines (usage, hint, blank, error) for an unknown
    flag or a bad choice, and nothing on stdout with --format json."""
    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runbook.cli", *argv],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, check=False, cwd=REPO_ROOT)

    bad = cli("rollback", "production", "--bogus")
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr == ("runbook: error: No such option: --bogus; see `runbook rollback "
                          "--help`\n"), bad.stderr
    for fmt in (["--format", "json"], ["--format=json"]):
        choice = cli("healthcheck", "--slot", "purple", *fmt)
        assert choice.returncode == 2 and choice.stderr.count("\n") == 1, choice.stderr
        assert ".;" not in choice.stderr, choice.stderr  # click's period, then ours
        assert json.loads(choice.stdout)["exit_code"] == 2, choice.stdout
    table = cli("healthcheck", "--format", "table", "--slot", "json")  # "json", not a format
    assert table.returncode == 2 and table.stdout == "", table.stdout
    alone = cli()  # the help, as before
    assert alone.returncode == 2 and "Commands:" in alone.stdout + alone.stderr


def test_a_config_nested_too_deep_or_with_a_huge_integer_is_bad_toml_exit_2(host: Path) -> None:
    """Found by review: a 5000-deep nested array (RecursionError in tomllib) or a 5000-digit
    integer (ValueError: Python's integer-string limit) was "unexpected failure", exit 5
    ("could not be fully undone") before anything was read. Bad input: exit 2, the file
    named, one line."""
    deep = host.parent / "deep.toml"
    deep.write_text('name = "production"\nx = ' + "[" * 5000 + "]" * 5000 + "\n")
    huge = host.parent / "huge.toml"
    huge.write_text('name = "production"\nx = ' + "9" * 5000 + "\n")
    for source in (deep, huge):
        code, data, said = status(source)
        assert code == 2 and data is not None and data["ok"] is False, said
        assert f"{source}: not valid TOML" in said, said


def test_an_unexpected_error_before_any_change_is_not_exit_5(host: Path) -> None:
    """Exit 5 means "failed and could not be fully undone": a bug met while only reading (the
    configuration, a status) changed nothing, and said so it sent on-call to undo what was
    never done. Such a crash is exit 1 and says nothing was changed; one met where something
    may have changed stays exit 5. The bug is simulated (a patched function raises), since
    there is no real one to trigger."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["DOCKER_HOST"] = f"tcp://127.0.0.1:{closed_port()}"

    def crash(target: str, *argv: str) -> subprocess.CompletedProcess[str]:
        module, name = target.rsplit(".", 1)
        code = (f"import sys, importlib, runbook.cli\nmod = importlib.import_module({module!r})\n"
                "def bug(*a, **k):\n    raise TypeError('simulated bug')\n"
                f"setattr(mod, {name!r}, bug)\nsys.argv = ['runbook', *sys.argv[1:]]\n"
                "runbook.cli.main()\n")
        return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL, env=env,
                              check=False, cwd=REPO_ROOT)

    for target in ("runbook.status.gather", "runbook.environment.load_file"):
        done = crash(target, "status", str(host))
        assert done.returncode == 1, (target, done.returncode, done.stderr)
        assert "unexpected failure before anything was changed" in done.stderr, done.stderr
        assert "TypeError: simulated bug" in done.stderr and "undone" not in done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
    released = crash("runbook.lock.unlock", "unlock", str(host), "--yes")
    assert released.returncode == 5, released.stderr  # may have removed a lock: not known


def test_an_unexpected_error_while_planning_is_exit_1_in_a_real_run_as_in_a_dry_run(
        host: Path) -> None:
    """Found by review: the same bug met while planning (under the lock, before any step)
    exited 1 in a dry run but 5 ("could not be fully undone") in a real run, though nothing
    had changed. Both are exit 1, say nothing was changed, and the journal records exit 1.
    The bug is simulated (a patched function raises), the real one being fixed."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["DOCKER_HOST"] = f"tcp://127.0.0.1:{closed_port()}"
    code = ("import sys, runbook.cli, runbook.snapshot_restore as sr\n"
            "def bug(*a, **k):\n    raise TypeError('simulated bug')\n"
            "sr.find = sr.default_pick = bug\n"  # the pick by name, and without one
            "sys.argv = ['runbook', *sys.argv[1:]]\nrunbook.cli.main()\n")
    runs = host.parent / "runs"
    for extra in (["--dry-run"], ["--yes"]):
        done = subprocess.run([sys.executable, "-c", code, "snapshot", "restore", str(host),
                               *extra], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, env=env, check=False, cwd=REPO_ROOT)
        assert done.returncode == 1, (extra, done.stderr)
        assert "before anything was changed" in done.stderr, done.stderr
        assert "TypeError: simulated bug" in done.stderr, done.stderr
    records = [json.loads(p.read_text()) for p in runs.glob("*.json")]
    assert [(r["outcome"], r["exit_code"]) for r in records] == [("failed", 1)], records
    assert not (host.parent / "locks" / "togather-deploy-production.lock").exists()


def test_an_unexpected_error_while_planning_with_an_interrupted_run_waiting_is_exit_5(
        host: Path) -> None:
    """Found by review: the exit 1 ("before anything was changed: nothing needs undoing")
    was also said while an interrupted run's record waited, whose change may have taken
    effect: that is exit 5, sending on-call to the journal and `runbook status`."""
    from runbook import intent as intents

    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["DOCKER_HOST"] = f"tcp://127.0.0.1:{closed_port()}"
    code = ("import sys, runbook.cli, runbook.snapshot_restore as sr\n"
            "def bug(*a, **k):\n    raise TypeError('simulated bug')\n"
            "sr.find = sr.default_pick = bug\n"  # the pick by name, and without one
            "sys.argv = ['runbook', *sys.argv[1:]]\nrunbook.cli.main()\n")
    waiting = intents.path(envmod.load("production", config=str(host)))
    waiting.write_text(json.dumps({"run_id": "rbk_killed", "action": "rollback"}))
    done = subprocess.run([sys.executable, "-c", code, "snapshot", "restore", str(host),
                           "--yes"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env=env, check=False, cwd=REPO_ROOT)
    assert done.returncode == 5, done.stderr
    assert "TypeError: simulated bug" in done.stderr, done.stderr
    assert "before anything was changed" not in done.stderr, done.stderr


def two_deployments_state(host: Path) -> None:
    """A state file whose history holds bbbbbbb (current) and aaaaaaa (previous)."""
    def deployment(version: str, slot: str, when: str, status: str) -> dict[str, str]:
        return {"id": f"dep-{version}", "version": version, "git_commit": version * 5 + "aaaaa",
                "deployed_at": when, "deployed_by": "ci", "active_slot": slot,
                "health_status": "healthy", "status": status}

    (host.parent / "state" / "deployment-state.json").write_text(json.dumps({
        "environment": "production",
        "current_deployment": deployment("bbbbbbb", "green", "2026-12-01T10:00:00Z", "active"),
        "previous_deployment": deployment("aaaaaaa", "blue", "2026-11-30T10:00:00Z",
                                          "superseded"),
        "deployment_history": [], "lock": {"locked": False}}))


def test_rollback_to_a_version_not_in_the_history_is_a_usage_error_that_writes_nothing(
        host: Path) -> None:
    """Found by review: `runbook rollback ENV --yes --to nosuch` (a typo) was exit 4, found
    only once the lock was taken: it left a journal and a run record behind. It is bad input:
    exit 2 naming the known versions, before the lock, the journal or the run record."""
    two_deployments_state(host)
    before = {p: p.read_bytes() if p.is_file() else None for p in host.parent.rglob("*")}
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["DOCKER_HOST"] = f"tcp://127.0.0.1:{closed_port()}"
    for fmt in ("text", "json"):
        done = subprocess.run([sys.executable, "-m", "runbook.cli", "rollback", str(host),
                               "--yes", "--to", "nosuch", "--format", fmt],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, env=env, check=False, cwd=REPO_ROOT)
        assert done.returncode == 2, (done.returncode, done.stderr)
        assert "--to nosuch is not in the deployment history" in done.stderr, done.stderr
        assert "bbbbbbb, aaaaaaa" in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert "journal" not in done.stderr, done.stderr
        assert {p: p.read_bytes() if p.is_file() else None
                for p in host.parent.rglob("*")} == before  # no lock, log or run record


def test_records_under_keys_no_dialect_uses_are_refused_by_every_command(host: Path) -> None:
    """Found by review: the drill's state file with its keys renamed `current`, `previous`,
    `history` read as "nothing recorded": rollback said "first deployment or cleared state",
    status showed none and advised a redeploy, and `deploy` planned a first record over a
    file holding deployments it could not see. Each refuses it (exit 4), naming those keys,
    and nothing is changed: the file is never rewritten, no lock is left; status
    lists it as a problem and says the records are not known, never "none"."""
    two_deployments_state(host)
    state_file = host.parent / "state" / "deployment-state.json"
    doc = json.loads(state_file.read_text())
    doc["deployment_history"] = [doc["current_deployment"], doc["previous_deployment"]]
    renamed = {"current_deployment": "current", "previous_deployment": "previous",
               "deployment_history": "history"}
    state_file.write_text(json.dumps({renamed.get(k, k): v for k, v in doc.items()}, indent=2))
    before = state_file.read_bytes()
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["DOCKER_HOST"] = f"tcp://127.0.0.1:{closed_port()}"
    # a database is configured, so a deploy's plan reaches the state file
    env["DATABASE_URL"] = f"postgresql://togather@127.0.0.1:{closed_port()}/togather"
    for args in (["status"], ["rollback", "--yes"], ["rollback", "--dry-run"],
                 ["deploy", "--version", "a7f3fbb", "--dry-run"],
                 ["deploy", "--version", "a7f3fbb", "--yes"]):
        done = subprocess.run([sys.executable, "-m", "runbook.cli", args[0], str(host),
                               *args[1:]], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, env=env, check=False, cwd=REPO_ROOT)
        said = done.stdout + done.stderr
        assert "Traceback" not in said and "unexpected failure" not in said, said
        # status lists problems (exit 1): the file among them, its records "not known"
        assert done.returncode == (1 if args == ["status"] else 4), (args, said)
        assert f"{state_file}: current_deployment: " in said, (args, said)
        assert "'current', 'previous', 'history'" in said, (args, said)
        assert "first deployment or cleared state" not in said, (args, said)
        assert not re.search(r"current +none", said), (args, said)
        assert state_file.read_bytes() == before, args
        assert not any((host.parent / "locks").iterdir()), args


def test_a_read_only_state_directory_refuses_the_lock_exit_4_not_a_config_error(
        host: Path) -> None:
    """Found by review: the state file's directory on a read-only mount (a bind mount left
    `ro`) was exit 2, "cannot open the deploy lock's guard ... Read-only file system": a
    configuration error, while the host is only not ready to be written (README: exit 4,
    precondition not met, nothing changed, as for a full disk before the run)."""
    two_deployments_state(host)
    state_file = host.parent / "state" / "deployment-state.json"
    with tmpfs(host.parent / "ro", "1m") as ro:
        moved = ro / state_file.name
        moved.write_bytes(state_file.read_bytes())
        host.write_text(host.read_text().replace(str(state_file), str(moved)))
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        before = moved.read_bytes()
        env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
        env["DOCKER_HOST"] = f"tcp://127.0.0.1:{closed_port()}"
        for command in ("rollback", "switch"):
            args = ["--slot", "blue"] if command == "switch" else []
            done = subprocess.run([sys.executable, "-m", "runbook.cli", command, str(host),
                                   *args, "--yes"], capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL, env=env, check=False,
                                  cwd=REPO_ROOT)
            said = done.stdout + done.stderr
            assert "Traceback" not in said, said
            assert done.returncode == 4, (command, said)
            assert "cannot open the deploy lock's guard" in said, said
            assert f"{ro} is on a read-only filesystem" in said and "remount" in said, said
            assert moved.read_bytes() == before
            assert not any((host.parent / "locks").iterdir()), said


def test_rollback_checks_to_again_under_the_lock(host: Path) -> None:
    """The history may change between the check before the lock and the plan under it: the
    plan refuses a --to it does not find the same way (exit 2, the known versions named)."""
    from runbook import rollback
    from runbook.errors import RunbookError

    two_deployments_state(host)
    with pytest.raises(RunbookError) as refused:
        rollback.plan(envmod.load(str(host)), rollback.Options(to="nosuch"), "rbk_test")
    assert refused.value.exit_code == 2, refused.value
    assert "--to nosuch is not in the deployment history" in str(refused.value)
    assert "bbbbbbb, aaaaaaa" in str(refused.value)


def test_a_config_value_is_always_a_path(host: Path, tmp_path: Path) -> None:
    """Found by review: `--config host.conf` (an existing file, no .toml suffix, no `/`) was
    "unknown environment 'host.conf'", blaming the valid ENV argument, and `--config
    staging` quietly loaded the packaged staging file. --config and RUNBOOK_CONFIG name a
    file, relative to where the command runs: read it, or say it does not exist."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "host.conf").write_text(host.read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env |= {"DOCKER_HOST": f"tcp://127.0.0.1:{closed_port()}", "PYTHONPATH": str(REPO_ROOT)}

    def cli(*argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runbook.cli", *argv], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL,
                              env=env | extra, check=False, cwd=workdir)

    for done in (cli("status", "production", "--config", "host.conf", "--format", "json"),
                 cli("status", "production", "--format", "json", RUNBOOK_CONFIG="host.conf")):
        assert "unknown environment" not in done.stderr, done.stderr
        assert done.returncode == 1, done.stderr  # read: problems (nothing runs here) listed
        assert json.loads(done.stdout)["state_file"] == str(host.parent / "state"
                                                             / "deployment-state.json")
    missing = cli("status", "staging", "--config", "staging")
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert "--config staging: no such file" in missing.stderr, missing.stderr
    assert missing.stderr.count("\n") == 1, missing.stderr
    from_env = cli("status", "staging", RUNBOOK_CONFIG="staging")
    assert from_env.returncode == 2, from_env.stdout + from_env.stderr
    assert "staging: no such file (from RUNBOOK_CONFIG)" in from_env.stderr, from_env.stderr


def test_a_path_with_a_secret_looking_word_is_said_whole(host: Path) -> None:
    """Found by review: masking took the word after a path holding `secret` for its value:
    "cannot read env file /opt/togather/.env.production.secret: *** such file or
    directory", ".../secrets/production-secrets.toml: *** valid TOML"."""
    env_file = host.parent / ".env.production.secret"  # not there
    text = host.read_text()
    assert "[compose]\n" in text, text
    with_env = host.parent / "envfile.toml"
    with_env.write_text(text.replace("[compose]\n", f'[compose]\nenv_file = "{env_file}"\n', 1))
    code, _, said = status(with_env, "text")
    assert f"cannot read env file {env_file}: No such file or directory" in said, said
    folder = host.parent / "secrets"
    folder.mkdir()
    broken = folder / "production-secrets.toml"
    broken.write_text('name = "production"\nport = = 1\n')
    code, _, said = status(broken, "text")
    assert code == 2 and f"{broken}: not valid TOML: Invalid" in said, said


def test_a_snapshot_argument_that_is_a_directory_is_said_so(host: Path) -> None:
    """Found by review: `runbook snapshot restore ENV /tmp --dry-run` said "snapshot /tmp
    does not exist", of a directory that does."""
    folder = host.parent / "dumps"
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["DOCKER_HOST"] = f"tcp://127.0.0.1:{closed_port()}"
    done = subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", "restore", str(host),
                           str(folder), "--dry-run"], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, env=env, check=False,
                          cwd=REPO_ROOT)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"snapshot {folder} is a directory, not a snapshot file" in done.stderr, done.stderr
    assert "does not exist" not in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_a_lock_dir_that_is_a_file_is_said_to_be_no_directory(host: Path) -> None:
    """Found by review: a [lock] dir that is a file was "cannot use the lock directory ...:
    File exists" (mkdir's words) when a run or `snapshot cleanup` took the lock; `status`
    already said it is not a directory."""
    (host.parent / "locks").rmdir()
    (host.parent / "locks").write_text("a file, not a directory")
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["DOCKER_HOST"] = f"tcp://127.0.0.1:{closed_port()}"
    done = subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", "cleanup", str(host),
                           "--yes"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env=env, check=False, cwd=REPO_ROOT)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"the lock directory {host.parent / 'locks'} is not a directory" in done.stderr, \
        done.stderr
    assert "File exists" not in done.stderr, done.stderr


def _crashed_lock(host: Path, reason: str) -> None:
    """A lock whose holder died (stale): what `runbook unlock` removes."""
    code = ("import sys, pathlib; from runbook import environment, lock; "
            "lock.acquire(environment.load_file(pathlib.Path(sys.argv[1])), reason=sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(host), reason], check=True, cwd=REPO_ROOT,
                   timeout=60)


def _unlock_answering_after(host: Path, meanwhile: Callable[[], None]) -> tuple[int, str]:
    """`runbook unlock HOST` on a terminal: `meanwhile` runs once the prompt is shown, then
    "y" is typed. The exit code and everything it said."""
    import pty
    import select

    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    primary, replica = pty.openpty()
    said = b""
    try:
        proc = subprocess.Popen([sys.executable, "-m", "runbook.cli", "unlock", str(host)],
                                stdin=replica, stdout=replica, stderr=replica, env=env,
                                cwd=REPO_ROOT)
        os.close(replica)
        replica = -1
        answered = False
        while True:
            if not answered and b"Remove it?" in said:
                meanwhile()
                os.write(primary, b"y\n")
                answered = True
            if not select.select([primary], [], [], 60)[0]:
                proc.kill()
                break
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the command exited, the terminal closed
                break
            if not chunk:
                break
            said += chunk
        return proc.wait(timeout=60), said.decode(errors="replace")
    finally:
        os.close(primary)
        if replica != -1:
            os.close(replica)


def test_unlock_removes_only_the_lock_its_prompt_showed(host: Path) -> None:
    """Found by review: after the "y", unlock judged the lock again and removed whatever stale
    lock was there by then: another holder's than the one shown, had it changed while the
    prompt waited. Replaced by another stale lock meanwhile: refused (exit 3), nothing
    removed; the lock shown, still there, is removed as before."""
    env = envmod.load_file(host)
    _crashed_lock(host, "the first crashed run")

    def swap() -> None:
        shutil.rmtree(env.lock_path)
        _crashed_lock(host, "another crashed run")

    code, said = _unlock_answering_after(host, swap)
    assert "the first crashed run" in said, said
    assert code == 3 and "the lock changed while the prompt waited" in said, said
    assert "nothing was removed" in said and "removed a" not in said, said
    holder = json.loads((env.lock_path / "holder.json").read_text())
    assert holder["reason"] == "another crashed run"
    code, said = _unlock_answering_after(host, lambda: None)
    assert code == 0 and "another crashed run" in said and "removed a stale lock" in said, said
    assert not env.lock_path.exists()


def test_unlock_force_clears_the_go_clis_lock_dated_in_the_future(host: Path) -> None:
    """Found by review: the Go CLI's lock (in the state file only) taken while the clock was
    6 h ahead, then NTP set the clock back: `runbook unlock --force` refused it ("a live lock
    is never removed") for 6 hours. It clears it now (exit 0), the rest of the file byte for
    byte as it was; a plain `unlock` still refuses it (exit 3), naming --force."""
    from datetime import UTC, datetime, timedelta

    env = envmod.load_file(host)
    doc = {**json.loads((REPO_ROOT / "tests" / "data" / "state" / "go_cli.json").read_text()),
           "environment": env.name}
    unlocked = doc["lock"]  # the Go CLI's own unlocked lock (its zero times)
    assert unlocked["locked"] is False
    then = datetime.now(UTC) + timedelta(hours=6)
    doc["lock"] = {"locked": True, "locked_at": then.strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "locked_by": "ci@build-runner", "reason": "deploy e4d2c1b",
                   "expires_at": (then + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    env.state_file.write_text(json.dumps(doc, indent=2) + "\n")
    before = env.state_file.read_bytes()
    run_env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}

    def unlock(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runbook.cli", "unlock", str(host), *extra],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, env=run_env, check=False, cwd=REPO_ROOT)

    refused = unlock("--yes")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "in the future" in refused.stderr and "--force" in refused.stderr, refused.stderr
    assert env.state_file.read_bytes() == before
    done = unlock("--force", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cleared the state file's lock" in done.stdout and done.stderr == "", done
    assert json.loads(env.state_file.read_text())["lock"] == unlocked
    assert env.state_file.read_bytes() == (json.dumps({**doc, "lock": unlocked},
                                                      indent=2) + "\n").encode()
    assert not env.lock_path.exists()


def test_a_runs_dir_that_is_a_file_is_said_as_such_by_status_and_a_run(host: Path) -> None:
    """Found by review: with `[logs] runs_dir` a regular file, status said nothing of it (on a
    host with a running slot it said "cannot read .../production.green.held-for-h2c ([Errno
    20] Not a directory)" and offered `docker stop`), and a rollback said mkdir's "File
    exists". Both now say the key's folder is a file, and how to fix it."""
    runs = host.parent / "runs"
    runs.rmdir()
    runs.write_text("a file, not a folder")
    problem = f"[logs] runs_dir {runs} is not a folder"
    code, data, said = status(host)
    assert code == 1 and data is not None, said
    found = [p for p in data["problems"] if problem in p["problem"]]  # type: ignore[union-attr, index]
    assert found and f"point [logs] runs_dir in {host} at a folder" in found[0]["fix"], said
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["DOCKER_HOST"] = f"tcp://127.0.0.1:{closed_port()}"
    done = subprocess.run([sys.executable, "-m", "runbook.cli", "rollback", str(host), "--yes"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env=env, check=False, cwd=REPO_ROOT)
    assert done.returncode == 2, done.stderr
    assert f"{problem}; nothing was changed" in done.stderr, done.stderr
    assert "File exists" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert runs.read_text() == "a file, not a folder"


def test_a_name_longer_than_the_filesystem_takes_is_a_usage_error(host: Path) -> None:
    """Found by review: `runbook status <5000 x's>.toml`, and a `[lock] dir` with a 300-byte
    component, were "unexpected failure ... (a bug in runbook...): OSError: [Errno 36] File
    name too long", the first echoing all 5000 characters. Exit 2, one line, the name cut."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["DOCKER_HOST"] = f"tcp://127.0.0.1:{closed_port()}"
    long = "x" * 5000
    host.with_name("long.toml").write_text(
        host.read_text().replace(f'dir = "{host.parent / "locks"}"',
                                 f'dir = "{host.parent / ("y" * 300)}"'))
    for argv, said in ((["status", f"{long}.toml"], "environment file"),
                       (["status", "production", "--config", f"/tmp/{long}"], "--config"),
                       (["status", str(host.with_name("long.toml"))], "lock.dir: ")):
        done = subprocess.run([sys.executable, "-m", "runbook.cli", *argv], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL, env=env,
                              check=False, cwd=REPO_ROOT)
        assert done.returncode == 2, done.stderr
        assert said in done.stderr and "is longer than" in done.stderr, done.stderr
        assert "unexpected failure" not in done.stderr and "x" * 300 not in done.stderr \
            and "y" * 300 not in done.stderr, done.stderr[:500]


BLANK_INVENTORY = """\
all:
  vars:
    runbook_env: production
    ansible_host: 127.0.0.1
    ansible_port: {port}
  children:
    canary:
      hosts:
        web1:
"""


@pytest.mark.parametrize(("argv", "flag"), [
    # `runbook fleet rollback "$INV"` with INV unset: Path("") is ".", so the working
    # directory was read as the inventory (its inv.yml taken, a FIFO hung ansible-inventory)
    (["fleet", "rollback", "", "--dry-run"], "INVENTORY"),
    (["fleet", "rollback", "inventory.yml", "--journal-dir", "", "--yes"], "--journal-dir"),
    (["docs", "--out", "", "--check"], "--out"),
    (["docs", "--features", "", "--check"], "--features"),
    (["docs", "--html", "", "--check"], "--html"),
    (["docs", "--report", "", "--check"], "--report"),
    (["drill", "--report", "", "--collect-only", "-q"], "--report"),
])
def test_a_blank_path_is_refused_never_taken_for_the_working_directory(
        tmp_path: Path, argv: list[str], flag: str) -> None:
    """Found by review: a blank path argument or option (an unset shell variable) became
    Path(""), which is ".": `fleet rollback ""` read the working directory's inventory and ran
    a pre-flight on its hosts, `--journal-dir ""` wrote the fleet journal there. Refused, exit
    2, one line, before anything is read or written."""
    (tmp_path / "inventory.yml").write_text(BLANK_INVENTORY.format(port=closed_port()))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["RUNBOOK_FLEET_DIR"] = str(tmp_path.parent / f"{tmp_path.name}-fleet")
    done = subprocess.run([sys.executable, "-m", "runbook.cli", *argv], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, env=env,
                          check=False, cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert f"{flag} is empty; nothing was changed" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "leave it out" not in done.stderr or not flag.isupper(), done.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (tmp_path.parent / f"{tmp_path.name}-fleet").exists()


def _with_snapshot_dir(host: Path) -> Path:
    folder = host.parent / "snapshots"
    folder.mkdir()
    host.write_text(host.read_text().replace('"/var/lib/togather/db-snapshots"',
                                             f'"{folder}"'))
    return folder


@pytest.mark.parametrize(("argv", "said"), [
    (["snapshot", "restore", "HOST", "nosuch.sql.gz", "--yes"],
     "snapshot nosuch.sql.gz does not exist"),
    (["snapshot", "restore", "HOST", "FOLDER", "--yes"], "is a directory, not a snapshot file"),
    (["snapshot", "restore", "HOST", "PASSWD", "--yes"],
     "cannot tell which database passwd is of"),
    (["rollback", "HOST", "--restore-snapshot", "--snapshot", "nosuch.sql.gz", "--yes"],
     "snapshot nosuch.sql.gz does not exist"),
    (["rollback", "HOST", "--restore-snapshot", "--snapshot", "FOLDER", "--yes"],
     "is a directory, not a snapshot file"),
])
def test_a_snapshot_named_that_is_none_is_refused_before_the_lock_writing_nothing(
        host: Path, argv: list[str], said: str) -> None:
    """Found by review: `snapshot restore ENV nosuch.sql.gz --yes` (a typo; or a directory,
    or a file that is no snapshot) was refused, exit 2, only once the lock was taken: it left
    a journal and a run record, and `status` then said the last run "failed (exit 2)". The
    name is looked up first, as rollback's --to is: nothing is written."""
    two_deployments_state(host)
    _with_snapshot_dir(host)
    folder = host.parent / "dumps"
    folder.mkdir()
    (host.parent / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    argv = [str(host) if a == "HOST" else str(folder) if a == "FOLDER"
            else str(host.parent / "passwd") if a == "PASSWD" else a for a in argv]
    before = {p: p.read_bytes() if p.is_file() else None for p in host.parent.rglob("*")}
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["DOCKER_HOST"] = f"tcp://127.0.0.1:{closed_port()}"
    env["DATABASE_URL"] = f"postgresql://togather:pw@127.0.0.1:{closed_port()}/togather"
    done = subprocess.run([sys.executable, "-m", "runbook.cli", *argv], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, env=env,
                          check=False, cwd=REPO_ROOT)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert said in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert "journal" not in done.stderr, done.stderr
    assert {p: p.read_bytes() if p.is_file() else None
            for p in host.parent.rglob("*")} == before  # no lock, log or run record


@pytest.mark.parametrize("shape", ["directory", "symlink to a directory"])
def test_a_state_file_path_that_cannot_be_read_for_good_is_exit_4_naming_it(
        host: Path, shape: str) -> None:
    """Found by review: a [state] file that is a directory (or a symlink to one) refused
    rollback, unlock and restore-kept with exit 3, "the deploy lock cannot be used ... (if a
    deploy is writing it at this moment, run again in a minute)": README's code for a live
    holder, and a wait that never ends. A path that cannot be read for good is exit 4,
    naming [state] file and its fix; status lists it without "run again"."""
    state = host.parent / "state" / "deployment-state.json"
    if shape == "directory":
        state.mkdir()
    else:
        (host.parent / "elsewhere").mkdir()
        state.symlink_to(host.parent / "elsewhere")
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["DOCKER_HOST"] = f"tcp://127.0.0.1:{closed_port()}"
    for args in (["rollback", "--yes"], ["rollback", "--dry-run"], ["unlock", "--yes"],
                 ["state", "restore-kept", "--yes"], ["switch", "--slot", "blue", "--yes"],
                 ["fleet", "host-check"]):  # the fleet's pre-flight: not a lock to wait for
        cmd = args[:2] if args[0] in ("state", "fleet") else args[:1]
        done = subprocess.run([sys.executable, "-m", "runbook.cli", *cmd, str(host),
                               *args[len(cmd):]], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, env=env, check=False, cwd=REPO_ROOT)
        said = done.stdout + done.stderr
        assert "Traceback" not in said and "unexpected failure" not in said, (args, said)
        assert done.returncode == 4, (args, done.returncode, said)
        assert "[state] file" in said and "run again in a minute" not in said, (args, said)
        assert not any((host.parent / "locks").iterdir()), args
    code, _, said = status(host, "text")
    assert code == 1 and "[state] file" in said and "run again in a minute" not in said, said


@pytest.mark.parametrize(("query", "key"), [
    ("@127.0.0.1:99999/togather", "port"),
    ("@127.0.0.1:0/togather", "port"),
    ("@127.0.0.1:5x/togather", "port"),
    ("@127.0.0.1:5432/togather?port=70000", "port"),
    ("@127.0.0.1:5432/togather?sslmode=bogus", "sslmode"),
    ("@127.0.0.1:5432/togather?target_session_attrs=zz", "target_session_attrs"),
    ("@127.0.0.1:5432/togather?gssencmode=zz", "gssencmode"),
    ("@127.0.0.1:5432/togather?channel_binding=zz", "channel_binding"),
    ("@127.0.0.1:5432/togather?keepalives=zz", "keepalives"),
])
def test_a_connection_value_libpq_refuses_is_a_config_error_naming_its_key(
        query: str, key: str) -> None:
    """Found by review: DATABASE_URL with port 99999 or 0, or sslmode=bogus, was "database
    unreachable" (exit 4, --force offered) while nothing was tried: libpq refuses the value
    before connecting. The oracle is libpq itself (psycopg.connect refuses it at once, never
    reaching a server); the runbook refuses it as bad input (exit 2), naming the key."""
    import psycopg

    from runbook import database
    from runbook.errors import ConfigError, ExitCode

    url = "postgresql://togather:Pw-9xq" + query
    with pytest.raises(psycopg.OperationalError, match="invalid"):
        psycopg.connect(url, connect_timeout=2)
    with pytest.raises(ConfigError) as refused:
        database.check_url(url, "DATABASE_URL", "environment")
    assert refused.value.exit_code == ExitCode.USAGE
    assert key in refused.value.message and "Pw-9xq" not in str(refused.value), refused.value
    assert refused.value.fix and key in refused.value.fix, refused.value.fix
    for good in ("@127.0.0.1:65535/togather", "@127.0.0.1:1/togather?sslmode=verify-full",
                 "@127.0.0.1,127.0.0.2:5432,/togather?target_session_attrs=read-write",
                 "@127.0.0.1/togather?keepalives=1&gssencmode=disable"):
        database.check_url("postgresql://togather:Pw-9xq" + good, "DATABASE_URL", "environment")


def test_a_database_port_out_of_range_is_bad_input_not_an_unreachable_database(
        host: Path) -> None:
    """The same through the command line: status listed "database unreachable: connection is
    bad: invalid port number", with "check `docker ps`" for its fix (a rollback's schema guard
    offered --force). It names the key and the fix instead."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["DOCKER_HOST"] = f"tcp://127.0.0.1:{closed_port()}"
    env["DATABASE_URL"] = "postgresql://togather:pw@127.0.0.1:99999/togather"
    done = subprocess.run([sys.executable, "-m", "runbook.cli", "status", str(host),
                           "--format", "json"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env=env, check=False, cwd=REPO_ROOT)
    problems = [p for p in json.loads(done.stdout)["problems"] if "99999" in p["problem"]]
    assert len(problems) == 1, done.stdout
    assert "port" in problems[0]["problem"], problems
    assert "unreachable" not in problems[0]["problem"], problems
    assert "1-65535" in problems[0]["fix"] and "docker ps" not in problems[0]["fix"], problems


def test_a_value_libpq_refuses_from_its_environment_is_a_config_error_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the URL check cannot see (PGSSLMODE=bogus beside a good URL): libpq's own refusal,
    made before it connects anywhere, is bad input naming the key, never "database
    unreachable". The oracle is libpq's error itself."""
    from runbook import database
    from runbook.errors import ConfigError, ExitCode

    monkeypatch.setenv("DATABASE_URL", f"postgresql://togather:pw@127.0.0.1:{closed_port()}/db")
    monkeypatch.setenv("PGSSLMODE", "bogus")
    env = host_env(tmp_path)
    env = env.with_(database=dataclasses.replace(env.database, access="host"))
    with pytest.raises(ConfigError) as refused:
        database.connect(env)
    assert refused.value.exit_code == ExitCode.USAGE, refused.value
    assert 'invalid sslmode value: "bogus"' in refused.value.message, refused.value
    assert "unreachable" not in str(refused.value) and "sslmode" in (refused.value.fix or "")


LOCK_DIR_COMMANDS = [
    ["rollback", "HOST", "--yes"], ["rollback", "HOST", "--dry-run"],
    ["rollback", "HOST", "--restore-snapshot", "--snapshot", "SNAP", "--yes"],
    ["switch", "HOST", "--slot", "blue", "--yes"], ["switch", "HOST", "--slot", "blue",
                                                    "--dry-run"],
    ["deploy", "HOST", "--version", "ccccccc", "--yes"],
    ["deploy", "HOST", "--version", "ccccccc", "--dry-run"],
    ["snapshot", "restore", "HOST", "SNAP", "--yes"],
    ["snapshot", "restore", "HOST", "SNAP", "--dry-run"],
    ["snapshot", "cleanup", "HOST", "--yes"], ["snapshot", "cleanup", "HOST", "--dry-run"],
    ["state", "restore-kept", "HOST", "--yes"],
    ["unlock", "HOST", "--yes"], ["unlock", "HOST", "--force", "--yes"],
    ["fleet", "drain", "HOST"], ["fleet", "drain", "HOST", "--undo", "togather-server-blue"],
    ["fleet", "lock", "HOST", "--status"],
    ["fleet", "lock", "HOST", "--take", "--fleet-run", "flt_1", "--holder", "ops",
     "--controller-host", "ops-laptop", "--pid", "1"],
]


@pytest.mark.parametrize("where", ["[lock] dir", "a folder on its way"])
def test_a_lock_dir_that_is_a_file_is_bad_configuration_for_every_command_not_a_holder(
        host: Path, where: str) -> None:
    """Found by review: a [lock] dir that is a file (or under a file) was exit 3, "the deploy
    lock cannot be used ... remove it by hand" (README's code for a live holder: run again in
    a minute) for every dry run, and the fleet's pre-flight said the deploy lock, and the
    fleet lock, were held (a fleet run refused as "held by another fleet run", exit 3). A
    real run refused it with exit 2 only once its journal and run record were written. It
    is a configuration error that waiting never ends: exit 2 before anything, in one line
    naming [lock] dir and the fix, as a [logs] dir that is a file is."""
    two_deployments_state(host)
    snaps = _with_snapshot_dir(host)
    snap = snaps / "togather_togather_20261201_000000_manual.sql.gz"
    snap.write_bytes(b"\x1f\x8b")  # named as a snapshot of this database: looked up, not read
    blocker = host.parent / "locks"
    blocker.rmdir()
    blocker.write_text("a file, not a directory")
    if where == "a folder on its way":
        host.write_text(host.read_text().replace(f'"{blocker}"', f'"{blocker / "deploy"}"'))
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    env["DOCKER_HOST"] = f"tcp://127.0.0.1:{closed_port()}"
    env["DATABASE_URL"] = f"postgresql://togather:pw@127.0.0.1:{closed_port()}/togather"
    before = {p: p.read_bytes() if p.is_file() else None for p in host.parent.rglob("*")}
    wrong: list[tuple[str, int, str]] = []  # every command's verdict, not only the first's
    for argv in LOCK_DIR_COMMANDS:
        argv = [str(host) if a == "HOST" else snap.name if a == "SNAP" else a for a in argv]
        done = subprocess.run([sys.executable, "-m", "runbook.cli", *argv],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, env=env, check=False, cwd=REPO_ROOT)
        said = done.stderr
        named = (f"[lock] dir in {host}" in said and "is not a directory" in said
                 and f"move {blocker} aside" in said and (
                     where == "[lock] dir" or f"({blocker} on its way is a file)" in said))
        after = {p: p.read_bytes() if p.is_file() else None for p in host.parent.rglob("*")}
        written = sorted(str(p.relative_to(host.parent)) for p in after.keys() - before.keys())
        if (done.returncode != 2 or said.count("\n") != 1 or not named or after != before
                or "run again" in said or "by hand" in said):
            wrong.append((" ".join(a for a in argv if a != str(host)), done.returncode,
                          said.replace(str(host.parent), "T"), written))
        before = after  # each command judged on its own
    assert not wrong, "\n".join(map(str, wrong))
    check = subprocess.run([sys.executable, "-m", "runbook.cli", "fleet", "host-check",
                            str(host)], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL, env=env, check=False, cwd=REPO_ROOT)
    data = json.loads(check.stdout)
    assert data["fleet_lock"].get("locked") is not True, data["fleet_lock"]
    assert data["deploy_lock"].get("locked") is not True, data["deploy_lock"]
    assert [p["exit_code"] for p in data["problems"]] == [2], data["problems"]
    assert "[lock] dir" in data["problems"][0]["fix"], data["problems"]
    code, _, said = status(host, "text")  # listed as the configuration's problem, no crash
    assert code == 1 and f"point [lock] dir in {host} at a directory" in said, said
    assert "by hand" not in said and "run again" not in said, said
