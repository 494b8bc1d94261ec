"""The external commands of snapshots, built once: the plan shows them, `spawn` runs them.

As Kamal separates building commands from running them, every pg_dump and psql the
snapshots run is a `DbCommand` value: its argv, and in words what feeds its stdin and what
happens to its stdout. `describe()` is what `--dry-run` and the plan print; `spawn()` is the
one place that starts it. Compression is done in this process (zlib, gzip format, level
`GZIP_LEVEL`, the level `gzip` uses by default) and `describe()` says so, rather than showing
a `| gzip` pipe that does not run.

pg_dump and psql run INSIDE the database container (`docker exec`), so client and server
versions always match and a host needs no Postgres client. The password travels in the
exec's environment (`-e PGPASSWORD` with no value copies it from ours), never in argv: the
one libpq here uses (the URL's, PGPASSWORD's or the password file's), as nothing of this
machine's reaches the container otherwise. `require_login` proves it works there while
planning.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass, field
from typing import IO

from runbook import database, procs
from runbook.environment import Environment
from runbook.errors import PreconditionError, UsageError

IN_CONTAINER_HOST = "127.0.0.1"  # the server as seen from inside its own container
IN_CONTAINER_PORT = "5432"
LOCK_WAIT_SECONDS = 10
"""How long a snapshot's reads (the counts, and pg_dump's `--lock-wait-timeout`) wait for a
table another session holds exclusively (an ALTER, a TRUNCATE, a `LOCK TABLE` left open), then
fail naming it. Without it the read waited for ever: with the app slots stopped, during a
restore. And a pg_dump queued behind an ALTER that queues behind this very transaction's own
locks is a wait Postgres never detects."""
DUMP_FLAGS = ("--format=plain", "--no-owner", "--no-acl", "--clean", "--if-exists")
GZIP_LEVEL = 6  # what `gzip` uses by default: the contract's `| gzip`
# the restore's psql session's application_name: what the run ends when its `docker exec` died
# before COMMIT while psql lived on in the container (runbook/snapshots/replay.py)
RESTORE_APP = "runbook-restore"


@dataclass(frozen=True)
class Target:
    """Who pg_dump/psql connect as, parsed from DATABASE_URL (percent-decoded); `password`
    is libpq's for it (database.login_password), '' when none is known."""

    user: str
    password: str = field(repr=False)
    host: str
    port: int
    dbname: str
    container: str

    def exec_env(self) -> dict[str, str]:
        """Our environment plus PGPASSWORD, which `docker exec -e PGPASSWORD` copies inward."""
        env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
        if self.password:
            env["PGPASSWORD"] = self.password
        return env

    def exec_prefix(self, *, stdin: bool = False, app: str | None = None) -> list[str]:
        argv = ["docker", "exec"]
        if stdin:
            argv.append("-i")
        if self.password:
            argv += ["-e", "PGPASSWORD"]  # no value: taken from exec_env(), never argv
        if app:
            argv += ["-e", f"PGAPPNAME={app}"]  # its session, found in pg_stat_activity
        return [*argv, self.container]

    def connection_args(self) -> list[str]:
        return ["--no-password", "--host", IN_CONTAINER_HOST, "--port", IN_CONTAINER_PORT,
                "--username", self.user, "--dbname", self.dbname]

    def redact(self, text: str) -> str:
        from runbook.redact import redact

        return redact(text, [self.password] if self.password else [])


def target(env: Environment) -> Target:
    """Parse the environment's DATABASE_URL; never echo it, it holds the password."""
    from psycopg import conninfo

    variable = env.database.url_variable
    url = database.url(env)  # checked encoding, password registered as a secret
    fix = (f"write {variable} as postgresql://USER:<password>@HOST:PORT/DB and percent-encode "
           "@ % / : in the password (@ -> %40, % -> %25, / -> %2F)")
    try:
        params = conninfo.conninfo_to_dict(url)
    except Exception:
        raise UsageError(f"{variable} is not a valid PostgreSQL URL", fix) from None
    user = str(params.get("user") or "")
    dbname = str(params.get("dbname") or user)
    if not user:
        raise UsageError(f"{variable} names no user", fix)
    if "@" in dbname or "/" in dbname or "@" in str(params.get("host") or ""):
        raise UsageError(f"{variable} does not parse cleanly: its password probably holds an "
                         "unencoded @ or /", fix)
    try:
        port = int(str(params.get("port") or "5432").split(",")[0])
    except ValueError:
        raise UsageError(f"{variable} has an invalid port", fix) from None
    return Target(user=user, password=database.login_password(url),
                  host=str(params.get("host") or "localhost"), port=port, dbname=dbname,
                  container=env.database.container)


@dataclass(frozen=True)
class DbCommand:
    """One external command: argv (no secret), and what feeds and takes its streams."""

    argv: tuple[str, ...]
    stdin: str = ""  # what this process writes to its stdin ("" = nothing)
    stdout: str = ""  # what this process does with its stdout ("" = discarded)
    env: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def describe(self) -> str:
        """The command line as it runs, plus where its streams come from and go."""
        text = shlex.join(self.argv)
        if self.stdin:
            text += f" < {self.stdin}"
        if self.stdout:
            text += f" > {self.stdout}"
        return text


def dump(tgt: Target, snapshot_id: str | None = None, into: str = "the snapshot file",
         ) -> DbCommand:
    """pg_dump of the whole database (reading an exported snapshot when given one)."""
    argv = [*tgt.exec_prefix(), "pg_dump", *DUMP_FLAGS,
            f"--lock-wait-timeout={LOCK_WAIT_SECONDS}s", *tgt.connection_args()]
    if snapshot_id:
        argv += ["--snapshot", snapshot_id]
    return DbCommand(tuple(argv), stdout=f"(gzip level {GZIP_LEVEL}, in-process) {into}",
                     env=tgt.exec_env())


def replay(tgt: Target, source: str = "the snapshot file") -> DbCommand:
    """psql reading stdin; the transaction is the input's own (BEGIN in the prelude, COMMIT
    only after the whole file checked out: runbook/snapshots/replay.py), never
    --single-transaction, which commits whatever arrived when its input ends."""
    argv = [*tgt.exec_prefix(stdin=True, app=RESTORE_APP), "psql", "-X", "-q", "-v",
            "ON_ERROR_STOP=1",
            "--file", "-", *tgt.connection_args()]
    return DbCommand(tuple(argv), stdin=f"the prelude, then (gunzip in-process) {source}",
                     env=tgt.exec_env())


def dump_command(tgt: Target, snapshot_id: str | None = None) -> list[str]:
    """The exact pg_dump argv (kept for callers that compose their own pipes, e.g. bench)."""
    return list(dump(tgt, snapshot_id).argv)


def replay_command(tgt: Target) -> list[str]:
    """The exact psql argv of a restore's replay."""
    return list(replay(tgt).argv)


def spawn(cmd: DbCommand, *, stdin: int | IO[bytes] | None, stdout: int | IO[bytes] | None,
          stderr: IO[bytes], own_session: bool = False) -> subprocess.Popen[bytes]:
    """The one executor of snapshot commands: argv list, secrets only in the environment.

    `own_session`: out of the terminal's process group, so a Ctrl-C there reaches only the
    runbook, which holds it until the step ends (the restore's replay), instead of killing
    the child in the middle of it."""
    try:
        return subprocess.Popen(list(cmd.argv), stdin=stdin, stdout=stdout, stderr=stderr,
                                env=cmd.env or None, start_new_session=own_session,
                                preexec_fn=None if own_session else procs.outlives_hangup)
    except FileNotFoundError:
        raise PreconditionError(f"the {cmd.argv[0]} command is not installed",
                                "install the Docker CLI") from None


def stderr_line(fh: IO[bytes], tgt: Target) -> str:
    """The line of a failed command's stderr that says why, with the password masked."""
    fh.seek(0)
    text = fh.read(65536).decode(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "ERROR" in ln or "error:" in ln or "FATAL" in ln]
    chosen = (errors or lines or ["no output"])[0]
    return tgt.redact(chosen)[:300]


LOGIN_TIMEOUT = 30.0  # seconds for the planning's `SELECT 1` inside the container


def login_fix(env: Environment, tgt: Target) -> str:
    """What to check when the in-container tools cannot log in: where the password is kept."""
    variable, raw = env.database.url_variable, database.url(env)
    where = database.password_source(env, raw)
    if tgt.password:
        return (f"check {variable}'s user ({tgt.user}) and the password {where} gives it "
                f"(`docker logs {tgt.container}` says which one the server refused)")
    env_file = env.database.env_file or "the environment"
    # libpq looks a socket URL's line up under `localhost` for its default socket folder, and
    # under the folder itself for another (found by review: the folder's line did nothing)
    socket = tgt.host.startswith("/")
    line = (f"{'localhost' if socket else tgt.host}:{tgt.port}:{tgt.dbname}:{tgt.user}:PASSWORD"
            + (f" ({tgt.host} in place of localhost if that is not libpq's default socket "
               "folder)" if socket else ""))
    return (f"put the password in {variable} in {env_file} (after `{tgt.user}:`, before the "
            f"`@`, percent-encoded), in PGPASSWORD, or in a password file line {line} "
            "(PGPASSFILE, default ~/.pgpass, mode 0600)")


def require_login(env: Environment) -> None:
    """pg_dump and psql log in inside the container with the password they will be given, or
    a one-line refusal (exit 4) while planning: found by the dump, the app slots were already
    stopped (a restore) for a run that could not go on, and --dry-run had passed. Read-only
    (`SELECT 1`)."""
    tgt = target(env)
    argv = [*tgt.exec_prefix(), "psql", "-X", "-q", "-A", "-t", "-c", "SELECT 1",
            *tgt.connection_args()]
    try:
        done = subprocess.run(argv, env=tgt.exec_env(), capture_output=True,
                              timeout=LOGIN_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise PreconditionError("the docker command is not installed",
                                "install the Docker CLI") from None
    except subprocess.TimeoutExpired:
        raise database.DatabaseError(
            f"psql inside container {tgt.container} did not answer `SELECT 1` within "
            f"{LOGIN_TIMEOUT:g}s; nothing was changed",
            f"check the database (`docker logs {tgt.container}`)") from None
    if done.returncode == 0 and done.stdout.strip() == b"1":
        return
    lines = [ln.strip() for ln in done.stderr.decode(errors="replace").splitlines()
             if ln.strip()]
    said = tgt.redact(next((ln for ln in lines if "error" in ln.lower() or "FATAL" in ln),
                           lines[0] if lines else f"exit {done.returncode}"))[:300]
    known = "" if tgt.password else (
        f"; no password is known ({env.database.url_variable} holds none, nor do PGPASSWORD "
        "or a password file on this machine)")
    raise database.DatabaseError(
        f"pg_dump and psql inside container {tgt.container} cannot log in: {said}{known}; "
        "nothing was changed", login_fix(env, tgt))


def require_container(env: Environment) -> None:
    """The database container runs, or a one-line DatabaseError before anything is written."""
    from runbook import docker

    info = docker.inspect(env.database.container)
    if not info.running:
        state = "does not exist" if not info.exists else f"is {info.status}"
        raise database.DatabaseError(
            f"database unreachable: container {env.database.container} {state}",
            f"start it (`docker start {env.database.container}`) and check `docker ps`")
