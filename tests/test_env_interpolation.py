"""Env files are read as Docker Compose reads them: `$VAR`, `${VAR}`, `${VAR:-default}` and
`${VAR-default}` expanded (from this process's environment, then the keys above in the same
file, as compose-go's dotenv does), `$$` a literal `$`, single quotes literal, escapes
read inside double quotes.

Found by review on a drill stack: a DATABASE_URL built from the file's own variables
(`postgresql://u:p@localhost:${POSTGRES_PORT}/db`, beside POSTGRES_PORT as CONTRACTS has them)
was used with `${POSTGRES_PORT}` in it: `status` said "database unreachable ... check docker
ps", and `rollback` (exit 4) sent on-call to --force, which skips the schema guard and the
health gate. The oracle here is `docker compose config` itself, never the runbook's parser.
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
from runbook.drill.versions import VERSIONS
from runbook.errors import ConfigError, ExitCode
from tests.drill_checks import everything_written, snapshot, through_proxy, two_deployments

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every form the runbook reads, in one file; RBX_FROM_ENV and RBX_SHADOWED come from the
# process's environment (the second also set in the file: the environment wins in a `${...}`,
# the file's own key keeps its value), RBX_UNSET from nowhere.
ENV_FILE = """\
# a comment
POSTGRES_USER=togather
POSTGRES_PORT=5433
export POSTGRES_DB=togather
DATABASE_URL=postgresql://${POSTGRES_USER}:pw@localhost:${POSTGRES_PORT}/${POSTGRES_DB}
BARE=$POSTGRES_PORT/x
GLUED=a${POSTGRES_PORT}b # a comment
DEFAULTED=${RBX_UNSET:-fallback}
DASH_DEFAULT=${RBX_UNSET-dash}
EMPTY=
EMPTY_COLON=${EMPTY:-used}
EMPTY_DASH=${EMPTY-unused}
NESTED=${RBX_UNSET:-${POSTGRES_PORT}}
ALT=${POSTGRES_PORT:+set}
SINGLE='lit ${POSTGRES_PORT} $$ \\n \\' x'
DOUBLE="q \\"${POSTGRES_USER}\\" \\\\ back\\nslash $$ \\$POSTGRES_PORT \\t\\0101\\089"
Q="a\\"b"
DOLLARS=cost $$5
LONE=$
DIGIT=$5
FROM_ENV=${RBX_FROM_ENV}/x
RBX_SHADOWED=file
SHADOW_USE=${RBX_SHADOWED}
HASH=x#y
TABHASH=x\t# kept
QUOTED_HASH="x # y" # comment
PW_HEAD=Se5ame
POSTGRES_PASSWORD=${PW_HEAD}-0pen
MULTI="one
two=2"
PLAIN_UNSET=${RBX_UNSET}
  SPACED  =  v  \n"""
PROCESS = {"RBX_FROM_ENV": "envval", "RBX_SHADOWED": "fromenv"}


def compose_reads(tmp_path: Path, env_file: Path, environ: dict[str, str],
                  how: str, keys: list[str] | None = None) -> tuple[dict[str, str], str]:
    """What `docker compose config` makes of `env_file`: a service's `env_file:` (`how` =
    "env_file"), or the project's `--env-file` interpolated into `environment:` for `keys`
    (how the runbook's own compose commands pass it); and compose's stderr."""
    compose = tmp_path / f"compose-{how}.yml"
    if how == "env_file":
        service = {"image": "alpine", "env_file": [str(env_file)]}
    else:
        service = {"image": "alpine", "environment": {k: f"${{{k}}}" for k in keys or ()}}
    compose.write_text(json.dumps({"name": "envinterp-oracle", "services": {"s": service}}))
    argv = ["docker", "compose", "-f", str(compose)]
    if how == "--env-file":
        argv += ["--env-file", str(env_file)]
    done = subprocess.run([*argv, "config", "--format", "json"], capture_output=True,
                          text=True, env=environ, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout)["services"]["s"].get("environment") or {}
    # `config` writes a file Compose would read again: its every `$` doubled
    return {k: (v or "").replace("$$", "$") for k, v in said.items()}, done.stderr


def isolated(monkeypatch: pytest.MonkeyPatch, keys: list[str]) -> dict[str, str]:
    """This process's environment without the file's keys (and RBX_UNSET), with PROCESS:
    the same for compose and for the runbook."""
    for key in [*keys, "RBX_UNSET"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in PROCESS.items():
        monkeypatch.setenv(key, value)
    return dict(os.environ)


@pytest.mark.docker
def test_env_file_values_are_what_docker_compose_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(ENV_FILE)
    environ = isolated(monkeypatch, ["POSTGRES_USER", "POSTGRES_PORT", "POSTGRES_DB",
                                     "DATABASE_URL", "EMPTY", "PW_HEAD", "POSTGRES_PASSWORD"])
    compose, _ = compose_reads(tmp_path, env_file, environ, "env_file")
    assert compose["DATABASE_URL"] == "postgresql://togather:pw@localhost:5433/togather"
    ours = envmod.read_env_file(env_file)
    assert ours == compose  # every key, every value
    # the project's --env-file (the runbook's own compose commands) reads it the same way,
    # but for a key the process's environment sets (that one wins for the project)
    keys = [k for k in compose if k not in PROCESS]
    project, _ = compose_reads(tmp_path, env_file, environ, "--env-file", keys)
    assert {k: ours[k] for k in keys} == project


def _refused(env_file: Path) -> ConfigError:
    db = envmod.DatabaseConfig(env_file=env_file)
    with pytest.raises(ConfigError) as refused:
        db.url()
    return refused.value


@pytest.mark.docker
@pytest.mark.parametrize(("lines", "variable", "compose_says"), [
    (["DATABASE_URL=postgresql://u:Pw-Secret1@localhost:${RBX_UNSET}/db"], "RBX_UNSET",
     "RBX_UNSET\\\" variable is not set"),  # Compose: a blank port (a warning)
    (["PORT=${RBX_UNSET}", "DATABASE_URL=postgresql://u:Pw-Secret1@localhost:$PORT/db"],
     "RBX_UNSET", "RBX_UNSET\\\" variable is not set"),  # through another key
    (["DATABASE_URL=postgresql://u:Pw-Secret1@localhost:${RBX_UNSET:?the port}/db"],
     "RBX_UNSET", "required variable RBX_UNSET is missing a value"),  # Compose refuses
    (["DATABASE_URL=postgresql://u:Pw-Secret1@localhost:${5433}/db"], "",
     "Invalid template"),
], ids=["unset", "through-another-key", "required", "invalid"])
def test_a_database_url_compose_cannot_resolve_is_refused_naming_the_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lines: list[str], variable: str,
        compose_says: str) -> None:
    """One line (exit 2) naming the file, the key and the variable, never the value: a
    blank port, or a URL Compose itself would not start the app with, is never probed as
    if the database were down."""
    env_file = tmp_path / ".env.production"
    env_file.write_text("\n".join(lines) + "\n")
    environ = isolated(monkeypatch, ["PORT", "DATABASE_URL"])
    # the oracle: Compose itself cannot resolve it either (a warning, or a refusal)
    compose = subprocess.run(
        ["docker", "compose", "-f", "-", "config", "--format", "json"],
        input=json.dumps({"name": "envinterp-oracle", "services": {
            "s": {"image": "alpine", "env_file": [str(env_file)]}}}),
        capture_output=True, text=True, env=environ, timeout=60, check=False)
    assert compose_says in compose.stderr, compose.stderr
    error = _refused(env_file)
    said = f"{error.message}\n{error.fix}"
    assert error.exit_code == ExitCode.USAGE
    assert "\n" not in error.message and "\n" not in (error.fix or "")
    assert str(env_file) in error.message and "DATABASE_URL" in error.message, said
    if variable:
        assert variable in error.message and f"export {variable}" in (error.fix or ""), said
    assert "Pw-Secret1" not in said and "5433" not in said, said


def test_an_exported_variable_resolves_it_and_an_exported_url_still_agrees(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file's URL, expanded, is what an exported DATABASE_URL is compared with: the same
    database written out is no disagreement (it was: the text still held `${...}`)."""
    env_file = tmp_path / ".env.production"
    env_file.write_text("POSTGRES_PORT=5433\n"
                        "DATABASE_URL=postgresql://u:p@db:${POSTGRES_PORT}/${RBX_DB}\n")
    monkeypatch.delenv("POSTGRES_PORT", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("RBX_DB", "togather")
    db = envmod.DatabaseConfig(env_file=env_file)
    assert db.url() == "postgresql://u:p@db:5433/togather"
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@db:5433/togather")
    assert db.url() == "postgresql://u:p@db:5433/togather"


# --- on the drill stack ---------------------------------------------------------------------


def built_from_variables(stack: DrillStack, tmp_path: Path, url_port: str = "",
                         ) -> tuple[Path, str]:
    """An environment file like the drill's whose env file builds DATABASE_URL from the keys
    above it (user, password, port, database) and POSTGRES_PASSWORD from two pieces, as a
    host may (CONTRACTS); and the password. `url_port`: what the URL says for its port."""
    lines = stack.env_file.read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines)
    url = urlsplit(values["DATABASE_URL"])
    password = unquote(url.password or "")
    head, tail = password[:6], password[6:]
    assert "$" not in password and "#" not in password and " " not in password
    port = url_port or ("${POSTGRES_PORT}" if str(url.port) == values["POSTGRES_PORT"]
                        else str(url.port))  # a docker-network-db host: the app's 5432
    kept = [line for line in lines if not line.startswith(("DATABASE_URL=",
                                                           "POSTGRES_PASSWORD="))]
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join([
        *kept,
        f"PW_HEAD={head}",
        f"POSTGRES_PASSWORD=${{PW_HEAD}}{tail}",
        f'PW_IN_URL="{quote(head, safe="")}"',
        f"DATABASE_URL=postgresql://${{POSTGRES_USER}}:${{PW_IN_URL}}{quote(tail, safe='')}"
        f"@{url.hostname}:{port}/${{POSTGRES_DB:-none}}", ""]))
    env_file.chmod(0o600)
    env = stack.env.with_(database=replace(stack.env.database, env_file=env_file),
                          log_dir=tmp_path / "logs", runs_dir=tmp_path / "runs")
    source = tmp_path / "host.toml"
    source.write_text(envmod.to_toml(env))
    return source, password


def runbook(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with none of the env file's variables in its environment: they come from the
    file itself."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RUNBOOK_CONFIG", "DATABASE_URL", "PW_HEAD", "PW_IN_URL")
           and not k.startswith("POSTGRES_")}
    return subprocess.run([sys.executable, "-m", "runbook.cli", *args], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL, env=env,
                          check=False, cwd=REPO_ROOT)


@pytest.mark.docker
def test_a_database_url_built_from_the_files_variables_reaches_the_database(
        scene_stack: DrillStack, tmp_path: Path) -> None:
    stack = scene_stack
    env = two_deployments(stack)  # v3 serves on blue, v2 (schema 2) is the previous
    source, password = built_from_variables(stack, tmp_path)
    status = runbook("status", str(source))
    assert status.returncode == 0, status.stdout + status.stderr
    assert "schema 2" in status.stdout, status.stdout
    assert "database unreachable" not in status.stdout + status.stderr
    dry = runbook("rollback", str(source), "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "database schema" in dry.stdout and "cannot be read" not in dry.stdout, dry.stdout
    done = runbook("rollback", str(source), "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("green", VERSIONS["v2"].tag)
    # the expanded password (the URL's, and POSTGRES_PASSWORD's built from two pieces) is
    # nowhere in what the commands printed or wrote
    written = everything_written(tmp_path, status, dry, done)
    assert password not in written and quote(password, safe="") not in written


@pytest.mark.docker
def test_the_expanded_password_is_the_one_masked(scene_stack: DrillStack,
                                                 tmp_path: Path) -> None:
    """POSTGRES_PASSWORD=${PW_HEAD}rest is registered as the password it expands to, even
    where the URL cannot be used (its port unresolved): never as its text `${PW_HEAD}...`."""
    source, password = built_from_variables(scene_stack, tmp_path, url_port="${RBX_UNSET}")
    env = envmod.load_file(source)
    with pytest.raises(ConfigError, match="RBX_UNSET"):
        env.database.url()
    assert password in database.known_secrets(env)
    run = journal.Journal.open(env, "deploy", why="secret test")
    run.log("INFO", f"a tool said: {password}", detail=f"x {password} y")
    run.finish("success", 0)
    written = run.log_path.read_text() + run.record_path.read_text()
    assert password not in written and journal.MASK in written


@pytest.mark.docker
def test_an_unresolved_port_is_refused_before_the_database_is_probed(
        scene_stack: DrillStack, tmp_path: Path) -> None:
    """Status names the variable to set instead of "database unreachable"; the rollback
    refuses with one line and exit 2, never sending on-call to --force."""
    stack = scene_stack
    two_deployments(stack)  # a rollback that reaches its schema guard
    before = snapshot(stack.env)
    source, password = built_from_variables(stack, tmp_path, url_port="${RBX_UNSET}")
    status = runbook("status", str(source))
    dry = runbook("rollback", str(source), "--dry-run")
    said = status.stdout + status.stderr
    assert "database unreachable" not in said and "RBX_UNSET" in said, said
    assert dry.returncode == int(ExitCode.USAGE), dry.stdout + dry.stderr
    [line] = dry.stderr.strip().splitlines()
    assert "RBX_UNSET" in line and "DATABASE_URL" in line and "--force" not in line, line
    assert password not in everything_written(tmp_path, status, dry)
    assert snapshot(stack.env) == before


# --- hosts without compose: `docker run --env-file` reads the file literally ------------------
#
# Found by review: on a host whose slots are made by plain `docker run --env-file` (README
# "Drill host shapes", the docker-run trait) the app reads `pa$word` as written; the Compose
# reading refused such a URL (exit 2, "Compose would make it empty"), and registered only `pa`
# of POSTGRES_PASSWORD=pa$word for masking. The oracle is `docker run --env-file` itself.

# every form docker's reading differs from Compose's on; `export` and a key with a space in it
# make docker refuse the whole file, so they have their own test below
LITERAL_FILE = """\
# a comment
POSTGRES_PORT=5433
DATABASE_URL=postgresql://u:pa$word@h:${POSTGRES_PORT}/db
POSTGRES_PASSWORD=pa$word
DOUBLE="quoted ${POSTGRES_PORT}"
SINGLE='single'
ESCAPED="a\\"b"
COMMENTED=x # not a comment
SPACES=  lead and trail  \n  INDENTED=v
EQUALS=a=b
EMPTY=
DOLLARS=$$x
CRLF=crlf\r
"""


def docker_run_reads(env_file: Path) -> dict[str, str]:
    """What a container started with `docker run --env-file` sees, less the image's own
    variables (a drill image present on this machine: never pulled)."""
    from runbook.drill.images import LOCAL_POSTGRES

    def run(file: Path) -> dict[str, str]:
        done = subprocess.run(["docker", "run", "--rm", "--pull", "never", "--env-file",
                               str(file), "--entrypoint", "env", LOCAL_POSTGRES, "-0"],
                              capture_output=True, text=True, timeout=60, check=False)
        if "No such image" in done.stderr:
            pytest.skip(f"{LOCAL_POSTGRES} is not on this machine (`runbook drill` builds it)")
        assert done.returncode == 0, done.stderr
        return dict(item.split("=", 1) for item in done.stdout.split("\0") if item)

    empty = env_file.with_name("empty.env")
    empty.write_text("")
    image_own = run(empty)
    return {k: v for k, v in run(env_file).items() if k not in image_own}  # PATH, HOSTNAME...


def no_compose(tmp_path: Path, env_file: Path) -> envmod.Environment:
    """A host without compose (no [compose] file): its env file is the app's `--env-file`."""
    from tests.drill_checks import host_env

    env = host_env(tmp_path)
    env = env.with_(database=replace(env.database, env_file=env_file))
    assert env.compose.file is None
    return env


@pytest.mark.docker
def test_without_compose_the_env_file_is_read_as_docker_run_reads_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env.production"
    env_file.write_bytes(LITERAL_FILE.encode())
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("POSTGRES_PORT", raising=False)
    docker = docker_run_reads(env_file)
    assert docker["DATABASE_URL"] == "postgresql://u:pa$word@h:${POSTGRES_PORT}/db"
    env = no_compose(tmp_path, env_file)
    # the URL the app was given, `$` and all: no refusal, no `${...}` expanded
    assert env.database.url() == docker["DATABASE_URL"]
    assert envmod.read_env_file(env_file, interpolate=False) == docker  # every key, every value
    # the password as the app reads it is masked (Compose's reading registered only `pa`)
    assert "pa$word" in database.known_secrets(env)


@pytest.mark.docker
@pytest.mark.parametrize("line", ["export DATABASE_URL=postgresql://u:p@h/db",
                                  "DATABASE_URL =postgresql://u:p@h/db"])
def test_a_line_docker_run_refuses_is_no_key(tmp_path: Path, line: str) -> None:
    """`docker run --env-file` refuses a file with `export KEY=` or `KEY =` in it (a key with a
    space): the app never read a DATABASE_URL from it, so the runbook reads none either."""
    env_file = tmp_path / ".env.production"
    env_file.write_text(line + "\n")
    from runbook.drill.images import LOCAL_POSTGRES

    done = subprocess.run(["docker", "run", "--rm", "--pull", "never", "--env-file",
                           str(env_file), "--entrypoint", "true", LOCAL_POSTGRES],
                          capture_output=True, text=True, timeout=60, check=False)
    assert "contains whitespaces" in done.stderr, done.stderr
    assert "DATABASE_URL" not in envmod.read_env_file(env_file, interpolate=False)


def test_both_readings_of_a_password_are_masked_whichever_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A password is a secret whichever way a tool read it: as written (`docker run`, a shell
    script's `cut`) and as Compose expands it, on a host with compose or without."""
    env_file = tmp_path / ".env.production"
    env_file.write_text("PW_HEAD=Se5ame\nPOSTGRES_PASSWORD=${PW_HEAD}-0pen\n"
                        "DATABASE_URL=postgresql://u:Url${PW_HEAD}@h:5432/db\n")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("PW_HEAD", raising=False)
    without = no_compose(tmp_path, env_file)
    compose_file = tmp_path / "compose.yml"
    compose_file.write_text("services: {}\n")
    with_compose = without.with_(compose=replace(without.compose, file=compose_file))
    for env in (without, with_compose):
        found = database.known_secrets(env)
        assert {"Se5ame-0pen", "${PW_HEAD}-0pen", "UrlSe5ame", "Url${PW_HEAD}"} <= found, found


@pytest.mark.docker
def test_on_a_docker_run_stack_a_literal_dollar_password_reaches_the_database(
        tmp_path: Path) -> None:
    """End to end on the drill's docker-run shape (no compose): a role whose password holds
    `$word`, written as is in the env file as `docker run --env-file` passes it. Status reads
    the schema and the rollback's dry run plans, the password masked (on c9da502: exit 2,
    "uses ${word} ... (Compose would make it empty)")."""
    password = "Pa$word-9zQ"
    with DrillStack(shape="docker-run") as stack:
        stack.reset()
        stack.deploy_docker_run(VERSIONS["v2"])
        stack.deploy_docker_run(VERSIONS["v3"])  # v3 live, v2 (schema 2) the previous
        created = subprocess.run(
            ["docker", "exec", stack.db_container, "psql", "-v", "ON_ERROR_STOP=1", "-U",
             "togather", "-d", "togather", "-c",
             f"CREATE ROLE rbx_literal LOGIN PASSWORD '{password}'; GRANT SELECT ON ALL "
             "TABLES IN SCHEMA public TO rbx_literal"],
            capture_output=True, text=True, timeout=60, check=False)
        assert created.returncode == 0, created.stderr
        url = urlsplit(stack.database_url)
        env_file = tmp_path / ".env"
        env_file.write_text("".join(
            line + "\n" for line in stack.env_file.read_text().splitlines()
            if not line.startswith("DATABASE_URL=")) + f"DATABASE_URL=postgresql://rbx_literal:"
            f"{password}@{url.hostname}:{url.port}{url.path}\n")
        env_file.chmod(0o600)
        env = stack.env.with_(database=replace(stack.env.database, env_file=env_file),
                              log_dir=tmp_path / "logs", runs_dir=tmp_path / "runs")
        assert env.compose.file is None  # the shape: slots made by `docker run`
        source = tmp_path / "host.toml"
        source.write_text(envmod.to_toml(env))
        status = runbook("status", str(source))
        assert status.returncode == 0, status.stdout + status.stderr
        assert "schema 2" in status.stdout, status.stdout
        dry = runbook("rollback", str(source), "--dry-run")
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert "database schema" in dry.stdout and "cannot be read" not in dry.stdout
        assert password not in everything_written(tmp_path, status, dry)
