"""The database password never prints, however DATABASE_URL is (mis)encoded.

The drill stack's env file is copied with DATABASE_URL's password rewritten with a bare `%`,
a bare `@` or a bare `/`, and the CLI is run through an environment file pointing at it, as
on a host: no traceback, no part of the password anywhere (stdout, stderr, journal, run
records), and a one-line error naming the fix (percent-encode the password) with exit 2
where the database is needed. The real password is registered with the journal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest

from runbook import database, journal
from runbook import environment as envmod
from runbook.drill.stack import DrillStack
from runbook.errors import ConfigError, ExitCode
from tests.drill_checks import everything_written

pytestmark = pytest.mark.docker
REPO_ROOT = Path(__file__).resolve().parents[1]
# each holds a character libpq misreads unencoded, between two long fragments
BAD_PASSWORDS = {
    "bare %": "Sesame%Open-Kx81Lq",
    "bare @": "Sesame@Open-Kx81Lq",
    "bare /": "Sesame/Open-Kx81Lq",
}
FRAGMENTS = ("Sesame", "Open-Kx81Lq")


def host_with_password(stack: DrillStack, tmp_path: Path, password: str) -> Path:
    """An environment file like the drill's, whose env file's DATABASE_URL has `password`
    written in as is (unencoded)."""
    url = urlsplit(stack.database_url)
    bad_url = (f"postgresql://{url.username}:{password}@{url.hostname}:{url.port}"
               f"{url.path}")
    lines = [line for line in stack.env_file.read_text().splitlines()
             if not line.startswith("DATABASE_URL=")]
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join([*lines, f"DATABASE_URL={bad_url}", ""]))
    env_file.chmod(0o600)
    env = stack.env.with_(database=replace(stack.env.database, env_file=env_file),
                          log_dir=tmp_path / "logs", runs_dir=tmp_path / "runs")
    source = tmp_path / "host.toml"
    source.write_text(envmod.to_toml(env))
    return source


def runbook(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    return subprocess.run([sys.executable, "-m", "runbook.cli", *args], capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL, env=env,
                          check=False, cwd=REPO_ROOT)


@pytest.mark.parametrize("case", sorted(BAD_PASSWORDS))
def test_a_misencoded_password_never_prints(stack: DrillStack, tmp_path: Path,
                                            case: str) -> None:
    password = BAD_PASSWORDS[case]
    source = str(host_with_password(stack, tmp_path, password))
    status = runbook("status", source)
    status_json = runbook("status", source, "--format", "json")
    snapshot = runbook("snapshot", "create", source)
    rollback = runbook("rollback", source, "--yes")
    switch = runbook("switch", source, "--slot", "green", "--yes")  # journaled, no database
    procs = (status, status_json, snapshot, rollback, switch)
    for proc in procs:
        assert "Traceback" not in proc.stderr, proc.stderr
    written = everything_written(tmp_path, *procs)
    for secret in (password, quote(password, safe=""), *FRAGMENTS):
        assert secret not in written, (case, secret)
    assert (tmp_path / "logs").exists() and any((tmp_path / "logs").iterdir())

    # status lists the misencoding as a problem with the fix
    assert status.returncode == 1
    problems = json.loads(status_json.stdout)["problems"]
    bare = case.split()[1]
    found = [p for p in problems if f"hold a bare '{bare}'" in p["problem"]]
    assert found and "percent-encode the password" in found[0]["fix"], problems
    # where the database is needed: one line, exit 2, naming the fix
    assert snapshot.returncode == int(ExitCode.USAGE), snapshot.stderr
    lines = snapshot.stderr.strip().splitlines()
    assert len(lines) == 1 and f"bare '{bare}'" in lines[0], snapshot.stderr
    assert "percent-encode the password" in lines[0]
    # the rollback has no previous deployment on the baseline: it stops there, exit 4
    assert rollback.returncode == int(ExitCode.PRECONDITION), rollback.stderr
    assert switch.returncode == 0, switch.stderr


def test_the_real_password_is_registered_with_the_journal(stack: DrillStack,
                                                          tmp_path: Path) -> None:
    """Even text that no pattern recognises (a bare password, a broken URL) is masked; what
    a bare `@` cuts off is masked too where the URL has one (the app's libpq, reading the
    same env file, shows it as a host), and only there: a well-encoded password is never
    cut, and its pieces would mask ordinary words."""
    password = unquote(urlsplit(stack.database_url).password or "")
    assert len(password) >= journal.MIN_SECRET_LENGTH
    tail = password.split("@", 1)[-1]  # what libpq shows as a host past a bare @
    misencoded = envmod.load_file(host_with_password(stack, tmp_path, password))
    for env, cut in ((stack.env, False), (misencoded, True)):
        env = env.with_(log_dir=tmp_path / f"logs-{cut}", runs_dir=tmp_path / f"runs-{cut}")
        run = journal.Journal.open(env, "deploy", why="secret test")
        run.log("INFO", f"libpq said: failed to resolve host '{tail}@db' for {password}",
                detail=f"x{password}y")
        run.finish("success", 0)
        written = run.log_path.read_text() + run.record_path.read_text()
        assert password not in written and journal.MASK in written
        assert (tail not in written) is cut, written


def test_bad_encodings_are_refused_before_libpq_sees_them(stack: DrillStack,
                                                          tmp_path: Path) -> None:
    for case, password in BAD_PASSWORDS.items():
        env = envmod.load_file(host_with_password(stack, tmp_path, password))
        with pytest.raises(ConfigError) as raised:
            database.schema_version(env)
        assert raised.value.exit_code == ExitCode.USAGE
        assert "percent-encode" in str(raised.value), case
        assert all(fragment not in str(raised.value) for fragment in FRAGMENTS)
    # encoded, the same password works
    good = host_with_password(stack, tmp_path, quote(unquote(
        urlsplit(stack.database_url).password or ""), safe=""))
    assert database.schema_version(envmod.load_file(good)).version == 1


def test_a_password_in_the_migrate_command_never_prints_with_the_plan(
        stack: DrillStack) -> None:
    """Found by review: golang-migrate's own CLI takes the database URL as an argument. The
    journal masked it, but the plan (the terminal's, --dry-run's and --format json's) printed
    it in clear, into tickets and CI logs."""
    from runbook import deploy, run
    from runbook.drill.versions import VERSIONS

    secret = "Migr4te-Pw-Zq93"
    env = stack.env.with_(migrate_command=(  # a program the drill image has, then the URL
        "env", "-database", f"postgres://togather:{secret}@togather-db:5432/togather", "up"))
    result = deploy.deploy(env, deploy.Options(version=VERSIONS["v2"].tag), dry_run=True)
    assert isinstance(result, run.RunResult)
    text, data = result.plan.render(), json.dumps(result.to_json(), default=str)
    assert "-database" in text and "togather-db:5432" in text, text  # the command is shown
    assert secret not in text and secret not in data


# --- a `$` in the password, which Compose reads as a variable ----------------------------------

DOLLAR_PASSWORD = "Xy$Tr0ub4dorHorse9"  # Compose reads `$Tr0ub4dorHorse9` as a variable
DOLLAR_TAIL = "Tr0ub4dorHorse9"


def host_with_dollar_password(stack: DrillStack, tmp_path: Path, through: str) -> Path:
    """The drill's env file with DOLLAR_PASSWORD written as is (no `$$`) in DATABASE_URL
    (`url`), or in a key of its own the URL uses (`key`: DB_PW=..., then ${DB_PW} in it)."""
    if through == "url":
        return host_with_password(stack, tmp_path, DOLLAR_PASSWORD)
    url = urlsplit(stack.database_url)
    lines = [line for line in stack.env_file.read_text().splitlines()
             if not line.startswith("DATABASE_URL=")]
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join([*lines, f"DB_PW={DOLLAR_PASSWORD}", "DATABASE_URL=postgresql"
                                   f"://{url.username}:${{DB_PW}}@{url.hostname}:{url.port}"
                                   f"{url.path}", ""]))
    env_file.chmod(0o600)
    env = stack.env.with_(database=replace(stack.env.database, env_file=env_file),
                          log_dir=tmp_path / "logs", runs_dir=tmp_path / "runs")
    assert env.database.compose_reads  # the drill has compose: it expands `$...`
    source = tmp_path / "host.toml"
    source.write_text(envmod.to_toml(env))
    return source


@pytest.mark.parametrize("through", ["url", "key"])
def test_a_dollar_in_the_password_is_never_named_as_a_variable(
        stack: DrillStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        through: str) -> None:
    """Found by review: `postgresql://togather:Xy$Tr0ub4dorHorse9@...` (Compose reads
    `$Tr0ub4dorHorse9` as a variable, set nowhere) was refused as "uses ${Tr0ub4dorHorse9},
    ... or export Tr0ub4dorHorse9": the rest of the password in clear in every command's
    output and in the journal. Still refused (exit 2 where the database is needed, a problem
    in status), saying the password holds a `$` and to write `$$`; the variable never named."""
    monkeypatch.delenv(DOLLAR_TAIL, raising=False)
    source = str(host_with_dollar_password(stack, tmp_path, through))
    status = runbook("status", source)
    status_json = runbook("status", source, "--format", "json")
    snapshot = runbook("snapshot", "create", source)
    snapshot_json = runbook("snapshot", "create", source, "--format", "json")
    rollback = runbook("rollback", source, "--yes")
    procs = (status, status_json, snapshot, snapshot_json, rollback)
    written = everything_written(tmp_path, *procs)
    assert "Traceback" not in written
    assert DOLLAR_TAIL not in written and DOLLAR_PASSWORD not in written, written
    assert snapshot.returncode == int(ExitCode.USAGE), snapshot.stderr
    [line] = snapshot.stderr.strip().splitlines()
    assert "DATABASE_URL" in line and "$$" in line and "Compose" in line, line
    assert json.loads(snapshot_json.stdout)["exit_code"] == int(ExitCode.USAGE)
    problems = json.loads(status_json.stdout)["problems"]
    assert any("$$" in p["fix"] and "DATABASE_URL" in p["problem"] for p in problems), problems
    # the second layer: whatever else names it (a tool, the journal) has it masked
    env = envmod.load_file(Path(source))
    assert DOLLAR_TAIL in database.known_secrets(env)
