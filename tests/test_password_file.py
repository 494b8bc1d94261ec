"""A database password kept out of DATABASE_URL (in a password file, PGPASSFILE, or in
PGPASSWORD), as libpq allows, reaches the pg_dump and psql that run inside the database
container; where none can be known and the database asks for one, the run refuses while
planning.

Found by review: libpq on this machine read the password there, so `status`, the schema guard
and `rollback --restore-snapshot --dry-run` all passed; the real run stopped the app slots
(an outage) and then failed its safety snapshot with "fe_sendauth: no password supplied": the
in-container tools got a password only from the URL, and the operator's PGPASSWORD was even
dropped from their environment.

The drill database is reached with a URL that holds no password, through an env file that
holds nothing else (no POSTGRES_PASSWORD whose registration would mask the password by
chance). What the runs did is read back from Postgres, the snapshot folder and the proxy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from runbook import environment as envmod
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.errors import ExitCode
from tests.drill_checks import everything_written, migrated, snapshot, through_proxy

pytestmark = pytest.mark.docker
REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER = "written-after-the-deploy-7Qx"


def without_password(stack: DrillStack, tmp_path: Path, access: str = "auto",
                     ) -> tuple[Path, str]:
    """An environment file like the drill's whose DATABASE_URL names user, host, port and
    database but no password (its env file holds that URL alone); and the password.
    `access`: [database] access (`container`: every read through psql in the container)."""
    url = urlsplit(stack.database_url)
    env_file = tmp_path / ".env.database"
    env_file.write_text(f"DATABASE_URL=postgresql://{url.username}@{url.hostname}:{url.port}"
                        f"{url.path}\n")
    env_file.chmod(0o600)
    env = stack.env.with_(database=dataclasses.replace(stack.env.database, env_file=env_file,
                                                       access=access),
                          log_dir=tmp_path / "logs", runs_dir=tmp_path / "runs")
    source = tmp_path / "host.toml"
    source.write_text(envmod.to_toml(env))
    return source, unquote(url.password or "")


def pgpass_line(stack: DrillStack, password: str) -> str:
    """The password file's line for the drill database (`:` and `\\` escaped, as libpq reads
    them)."""
    url = urlsplit(stack.database_url)
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    return f"{url.hostname}:{url.port}:{url.path.lstrip('/')}:{url.username}:{escaped}\n"


def runbook(extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with no password in the process environment but what `extra` gives it."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RUNBOOK_CONFIG", "DATABASE_URL", "PGPASSWORD", "PGPASSFILE")}
    env.update(extra)
    return subprocess.run([sys.executable, "-m", "runbook.cli", *args], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL, env=env,
                          check=False, cwd=REPO_ROOT)


@pytest.mark.parametrize(("kept_in", "access"), [("password file", "auto"),
                                                  ("PGPASSWORD", "auto"),
                                                  ("password file", "container")])
def test_a_restore_takes_its_safety_snapshot_with_a_password_kept_outside_the_url(
        scene_stack: DrillStack, tmp_path: Path, kept_in: str, access: str) -> None:
    stack = scene_stack
    env = migrated(stack)  # v2 serving from green, its pre-deploy snapshot at schema 1
    [pre] = sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))
    with stack.connect() as conn:
        conn.execute("INSERT INTO items (name) VALUES (%s)", (MARKER,))
    source, password = without_password(stack, tmp_path, access)
    if kept_in == "password file":
        pgpass = tmp_path / "secrets" / "pgpass"
        pgpass.parent.mkdir()
        pgpass.write_text(pgpass_line(stack, password))
        pgpass.chmod(0o600)
        extra = {"PGPASSFILE": str(pgpass)}
    else:
        extra = {"PGPASSWORD": password, "PGPASSFILE": str(tmp_path / "no-such-file")}

    dry = runbook(extra, "rollback", str(source), "--restore-snapshot", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    done = runbook(extra, "rollback", str(source), "--restore-snapshot", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr

    # the safety snapshot was taken, and holds the row written after the deploy
    [safety] = sorted(env.database.snapshot_dir.glob("*_pre-restore.sql.gz"))
    with gzip.open(safety, "rt") as fh:
        assert MARKER in fh.read()
    # the database is the pre-deploy snapshot's again: schema 1, no orders, no marker
    with stack.connect() as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (1,)
        assert conn.execute("SELECT to_regclass('public.orders')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM items WHERE name = %s",
                            (MARKER,)).fetchone() == (0,)
    assert pre.exists()
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    written = everything_written(tmp_path, dry, done)
    assert (tmp_path / "runs").exists() and any((tmp_path / "logs").iterdir())
    assert password not in written
    assert "-e PGPASSWORD" in dry.stdout, dry.stdout  # the name only: the exec copies it


@contextlib.contextmanager
def host_logins_trusted(stack: DrillStack) -> Iterator[None]:
    """This machine's connections to the drill database need no password (a pg_hba `trust`
    line for the address they arrive from), while the container's own (127.0.0.1 inside it)
    still do: a host where libpq here never needs a password that pg_dump inside does."""
    with stack.connect() as conn:
        [addr] = conn.execute("SELECT host(inet_client_addr())").fetchone() or [""]
        hba = conn.execute("SELECT setting FROM pg_settings WHERE name = 'hba_file'"
                           ).fetchone()[0]
    assert addr and addr not in ("127.0.0.1", "::1"), addr
    original = stack.docker("exec", stack.db_container, "cat", hba).stdout
    trusted = f"host all all {addr}/32 trust\n" + original
    stack.docker("exec", "-u", "postgres", stack.db_container, "sh", "-c",
                 f"printf '%s' \"$1\" > {hba}", "-", trusted)
    with stack.connect() as conn:
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        stack.docker("exec", "-u", "postgres", stack.db_container, "sh", "-c",
                     f"printf '%s' \"$1\" > {hba}", "-", original)
        with stack.connect() as conn:
            conn.execute("SELECT pg_reload_conf()")


@pytest.mark.shape_specific
def test_no_password_known_where_the_container_needs_one_is_refused_while_planning(
        scene_stack: DrillStack, tmp_path: Path) -> None:
    stack = scene_stack
    if stack.has("docker-network-db"):
        pytest.skip("no connection from this machine: the schema read itself needs the password")
    env = migrated(stack)
    source, password = without_password(stack, tmp_path)
    extra = {"PGPASSFILE": str(tmp_path / "no-such-file")}
    folder = sorted(p.name for p in env.database.snapshot_dir.iterdir())
    before = snapshot(env)
    with host_logins_trusted(stack):
        status = runbook(extra, "status", str(source))
        assert "no password" not in status.stdout + status.stderr  # the host needs none
        dry = runbook(extra, "rollback", str(source), "--restore-snapshot", "--dry-run")
        real = runbook(extra, "rollback", str(source), "--restore-snapshot", "--yes")
        deploy = runbook(extra, "deploy", str(source), "--version", VERSIONS["v3"].tag, "--yes")
    said = []
    for proc in (dry, real, deploy):
        assert proc.returncode == int(ExitCode.PRECONDITION), proc.stdout + proc.stderr
        # one error line (a real run adds the line naming its journal)
        [line] = [ln for ln in proc.stderr.splitlines() if not ln.startswith("runbook: journal")]
        assert "no password is known" in line and "nothing was changed" in line, line
        assert "DATABASE_URL" in line and "PGPASSFILE" in line, line  # where to put it
        said.append(line)
    assert said[0] == said[1]  # the dry run says what the real run does
    assert snapshot(env) == before  # still serving v2 from green, nothing stopped
    assert sorted(p.name for p in env.database.snapshot_dir.iterdir()) == folder
    assert password not in everything_written(tmp_path, status, dry, real, deploy)


def test_a_password_from_the_password_file_is_masked_in_the_journal(
        stack: DrillStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever prints it (a libpq message, a command's output): registered as the URL's is."""
    from runbook import journal

    source, password = without_password(stack, tmp_path)
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(pgpass_line(stack, password))
    pgpass.chmod(0o600)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    run = journal.Journal.open(envmod.load_file(source), "deploy", why="secret test")
    run.log("INFO", f"a tool said: {password}", detail=f"x {password} y")
    run.finish("success", 0)
    written = run.log_path.read_text() + run.record_path.read_text()
    assert password not in written and journal.MASK in written


@pytest.mark.parametrize("access", ["auto", "container"])
def test_a_wrong_password_from_pgpassword_is_named_as_where_it_came_from(
        scene_stack: DrillStack, tmp_path: Path, access: str) -> None:
    """Found by review: with the password in PGPASSWORD (or a password file) the refused
    login's fix named DATABASE_URL alone, which holds none: it names PGPASSWORD now."""
    env = migrated(scene_stack)
    source, password = without_password(scene_stack, tmp_path, access)
    before = snapshot(env)
    refused = runbook({"PGPASSWORD": "not-" + password}, "rollback", str(source),
                      "--restore-snapshot", "--dry-run")
    assert refused.returncode == ExitCode.PRECONDITION, (refused.stdout, refused.stderr)
    assert "the password PGPASSWORD gives" in refused.stderr, refused.stderr
    assert password not in refused.stdout + refused.stderr
    assert snapshot(env) == before


def test_a_socket_urls_password_file_line_is_named_under_localhost(
        scene_stack: DrillStack) -> None:
    """Found by review: libpq looks a line up under `localhost` for its default socket
    folder; the fix named the folder, whose line did nothing."""
    from runbook.snapshots import commands

    env = scene_stack.env
    tgt = dataclasses.replace(commands.target(env), host="/var/run/postgresql", password="")
    said = commands.login_fix(env, tgt)
    assert f"a password file line localhost:{tgt.port}:" in said, said
