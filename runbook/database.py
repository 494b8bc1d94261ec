"""The Postgres adapter: what schema the shared database is at (more in the database issue).

Also the one place the database URL is read, checked and its password registered as a
secret: a password with a bare `%` or `@` would otherwise reach libpq, whose error messages
(and Python's traceback) then show the URL or part of the password.
"""

from __future__ import annotations

import contextlib
import functools
import re
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from runbook.environment import Environment
from runbook.errors import ConfigError, ExitCode, RunbookError

if TYPE_CHECKING:
    from runbook.docker import ContainerInfo


class DatabaseError(RunbookError):
    exit_code = ExitCode.PRECONDITION


class LockWaitError(DatabaseError):
    """A read gave up waiting for a table lock (lock_timeout, SQLSTATE 55P03, or pg_dump's
    --lock-wait-timeout on its LOCK TABLE): the one failure a session holding a table
    exclusively explains, so the only one worded as such (snapshots.stats.worded)."""


@dataclass(frozen=True)
class SchemaVersion:
    version: int  # 0 when no migration was ever applied
    dirty: bool

    def describe(self) -> str:
        return f"{self.version}{' (dirty)' if self.dirty else ''}"


_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# characters that end the user:password part of a URL unless percent-encoded
_DELIMITERS = {"@": "%40", "/": "%2F", "?": "%3F", "#": "%23"}
ENCODE_FIX = ("percent-encode the password in {variable}: @ -> %40, % -> %25, / -> %2F, "
              "? -> %3F, # -> %23 (python3 -c 'import urllib.parse; "
              "print(urllib.parse.quote(input(), safe=\"\"))' does it)")


_QUERY = re.compile(r"\?[A-Za-z_][A-Za-z0-9_]*=[^&]*(?:&[A-Za-z_][A-Za-z0-9_]*=[^&]*)*$")


def _credentials(url: str) -> str | None:
    """The raw `user:password` part of a URL, or None when the URL has none.

    It ends at the LAST `@` before the query string (a bare `@` `/` `?` in the password must
    not cut it short, so it is found and refused); the query string, where `@` is ordinary
    (`?application_name=a@b`), is the first `?key=value&...` tail after a `/`. When nothing
    before that tail holds an `@`, the tail may be a password's own text: the whole URL is
    then read as before, which refuses rather than passes a misencoded password.
    """
    _, sep, rest = url.partition("://")
    if not sep:
        return None
    head = rest
    slash = rest.find("/")
    if slash >= 0:
        for match in re.finditer(r"\?", rest[slash:]):
            if _QUERY.match(rest, slash + match.start()):
                head = rest[:slash + match.start()]
                break
    at = head.rfind("@")
    if at < 0:
        at = rest.rfind("@")
    return rest[:at] if at >= 0 else None


def password_of(url: str) -> str:
    """The password exactly as written in the URL (maybe still percent-encoded)."""
    creds = _credentials(url)
    return creds.partition(":")[2] if creds else ""


def _query_passwords(url: str) -> list[str]:
    """A `password=` given in the URL's query string (libpq takes it there too), with what a
    bare `&` cut off it (the pieces after it that are no `key=value`): libpq quotes those
    back in its error, as it does a value with a space."""
    _, sep, query = url.partition("?")
    if not sep:
        return []
    found: list[str] = []
    for piece in query.split("#")[0].split("&"):
        if piece.startswith("password="):
            found.append(piece[len("password="):])
        elif found and "=" not in piece:
            found[-1] += "&" + piece
    return found


def secrets_of(url: str) -> set[str]:
    """Every form of the password that could show up in a message: as written and decoded
    (redact adds its percent-encoding), the URL's own and a query string's `password=`.

    Pieces of it only when the URL is misencoded (what check_url refuses): the runbook
    never hands such a URL to libpq, but the app reads the same env file, and its libpq
    shows what a bare `@` `/` `?` `#` `&` or space cuts off (as a host, as a query key) in
    errors that reach /health. A well-encoded password is never cut, and registering its
    pieces masked ordinary words everywhere (`green`, `2025` of `Winter%402025%2Fgreen`)."""
    found: set[str] = set()
    queried = _query_passwords(url)
    raw = password_of(url)
    for value in (*queried, raw):
        found.update((value, urllib.parse.unquote(value)))
    if _misencoded(url):
        for value in queried:
            for form in (value, urllib.parse.unquote(value)):
                found.update(re.split(r"[&\s]", form))
        for form in (raw, urllib.parse.unquote(raw)) if raw else ():
            found.update(re.split(r"[@/?#]", form))
            for cut in re.finditer(r"[@/?#]", form):
                found.update((form[:cut.start()], form[cut.end():]))
    return {value for value in found if value}


def _misencoded(url: str) -> bool:
    """Whether check_url refuses the URL's password (a bare delimiter or `%`)."""
    _, sep, rest = url.partition("://")
    try:
        _check_encoding(f"postgresql://{rest}" if sep else url, "DATABASE_URL", "")
    except ConfigError:
        return True
    return False


class UnknownParameterError(ConfigError):
    """The URL works for the app (pgx and golang-migrate read their own parameters) but not
    for libpq: the schema cannot be read here, which `rollback --force` may go past as for an
    unreachable database (refused with exit 2 there, the forced rollback of the code was
    lost mid-incident: found by review). A misencoded password stays bad input."""


def check_url(url: str, variable: str, where: str) -> None:
    """Refuse a URL libpq would misread or reject; the message never contains its password.

    Checked here, once, rather than where each path connects: a parameter libpq does not
    know (a Go app's pgx or golang-migrate ones) failed as "database unreachable" through the
    host, "cannot read schema_migrations" through the container and "not a valid PostgreSQL
    URL" for snapshots, each with another (wrong) fix."""
    _check_encoding(url, variable, where)
    _check_parameters(url, variable, where)


@functools.cache
def _libpq_keywords() -> frozenset[str]:
    """The parameters this libpq reads (`ssl=true`: its URI-only alias of sslmode=require)."""
    from psycopg import pq

    return frozenset(d.keyword.decode() for d in pq.Conninfo.get_defaults()) | {"ssl"}


def _check_parameters(url: str, variable: str, where: str) -> None:
    """Refuse a query parameter libpq does not know, naming it and what libpq takes instead;
    then anything else libpq cannot parse, in libpq's words cut before what it quotes of the
    URL (the password, for an unclosed IPv6 bracket)."""
    from psycopg import conninfo

    from runbook.redact import redact

    _, _, query = url.partition("?")
    for piece in query.split("#")[0].split("&") if query else ():
        key, sep, value = piece.partition("=")
        key = urllib.parse.unquote(key)
        if not sep or key in _libpq_keywords():  # no `=`: libpq's own error says so
            continue
        whose = (" (golang-migrate's)" if key.startswith("x-")
                 else " (pgx's)" if key.startswith("pool_") else "")
        fix = (f"remove it from {variable}, or set [database] url_variable to a variable "
               "holding the URL without it")
        if key == "search_path":
            path = urllib.parse.quote(urllib.parse.unquote(value), safe=",")
            fix = f"write options=-csearch_path%3D{path} instead (libpq's form; pgx reads it too)"
        elif key == "x-migrations-table":
            fix += ("; the runbook reads golang-migrate's default table, schema_migrations, on "
                    "the search_path")
        raise UnknownParameterError(f"{variable} ({where}) has the parameter {key}{whose}, "
                                    "which libpq does not know", fix)
    try:
        params = conninfo.conninfo_to_dict(url)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = redact(reason.split('"')[0].rstrip(" :"), [password_of(url)])
        raise ConfigError(f"{variable} ({where}) is not a URL libpq can read: {reason}",
                          "write it as postgresql://USER:<password>@HOST:PORT/DB?KEY=VALUE, "
                          "percent-encoding the password") from None
    _check_values(params, variable, where)


# The values libpq takes for these keys (its connectOptions2), refusing any other before it
# connects anywhere: "connection is bad: invalid port number" (99999, 0) or "invalid sslmode
# value" read as "database unreachable", exit 4 with --force offered (found by review).
_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby",
                             "prefer-standby"),
    "load_balance_hosts": ("disable", "random"),
    "sslnegotiation": ("postgres", "direct"),
    "sslcertmode": ("disable", "allow", "require"),
}
# integers as libpq's parse_int_param reads them (connect_timeout: psycopg passes its own)
_INTEGERS = ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
             "tcp_user_timeout")
_LIBPQ_INT = re.compile(r"\s*[+-]?\d+\s*")


def _check_values(params: Mapping[str, Any], variable: str, where: str) -> None:
    """Refuse (exit 2) a value libpq rejects before connecting, naming the key and what it
    takes; a value is never a password (the password's key is not checked)."""
    from runbook.redact import one_line

    def refuse(key: str, value: str, takes: str) -> NoReturn:
        raise ConfigError(f"{variable} ({where}) has {key} {one_line(value)!r}, which libpq "
                          "refuses before connecting to anything", f"set {key} to {takes} in "
                          f"{variable}")

    for port in str(params.get("port") or "").split(","):  # one a host; blank: 5432
        if port and not (_LIBPQ_INT.fullmatch(port) and 1 <= int(port) <= 65535):
            refuse("port", port, "the server's port, 1-65535 (PostgreSQL's default: 5432),")
    for key, choices in _CHOICES.items():
        value = params.get(key)
        if value is not None and str(value) not in choices:
            refuse(key, str(value), "one of " + ", ".join(choices) + ",")
    for key in _INTEGERS:
        value = params.get(key)
        if value is not None and not _LIBPQ_INT.fullmatch(str(value)):
            refuse(key, str(value), "a whole number")


def _refused_value(message: str) -> str | None:
    """The key of a connection value libpq refused before connecting, from its error (a
    value this module's lists let through: another libpq version's, or PGSSLMODE's)."""
    found = re.search(r'\binvalid (?:integer value "[^"]*" for connection option "(\w+)"'
                      r'|(port) number|(\w+) value:)', message)
    return next((g for g in found.groups() if g), None) if found else None


def _check_encoding(url: str, variable: str, where: str) -> None:
    """Refuse a URL whose password libpq would misread; the message holds no part of it."""
    fix = ENCODE_FIX.format(variable=variable, where=where)
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in ("postgres", "postgresql"):
        raise ConfigError(f"{variable} ({where}) is not a postgresql:// URL",
                          "write it as postgresql://USER:<password>@HOST:PORT/DB")
    for value in _query_passwords(url):
        cut = sorted({repr(c) for c in value if c in "& \t"})
        if cut:
            raise ConfigError(f"the password in {variable}'s query string ({where}) holds a bare "
                              + " and a bare ".join(cut), fix)
    creds = _credentials(url)
    if creds is None:
        return
    bare = [char for char in _DELIMITERS if char in creds]
    if _BAD_PERCENT.search(creds):
        bare.insert(0, "%")
    if bare:
        raise ConfigError(f"the credentials in {variable} ({where}) hold a bare "
                          + " and a bare ".join(f"'{c}'" for c in bare), fix)


def url(env: Environment) -> str:
    """The checked database URL; its password is registered as a secret before anything can
    print it. Raises ConfigError (exit 2) for a missing or misencoded URL."""
    from runbook.redact import register_secrets

    config = env.database
    raw = config.url()
    register_secrets(*secrets_of(raw))
    where = "environment" if _from_process(env) else str(config.env_file)
    check_url(raw, config.url_variable, where)
    return raw


def login_password(raw: str) -> str:
    """The password libpq on this machine sends for the URL ('' for none): the URL's own,
    else PGPASSWORD's, else its password file's line for this host, port, database and user
    (PGPASSFILE, ~/.pgpass). Registered as a secret.

    pg_dump and psql run inside the database container, where none of those are: given only
    the URL's, a password kept beside it passed every check made from here (status, the
    schema guard, --dry-run) and failed the dump after the app slots were stopped (found by
    review). Asked of libpq itself, as PQpass after PQconnectStart (which resolves it before
    the first byte is sent; the attempt is ended at once), not parsed here: the rules
    (precedence, wildcards, escapes, a file with loose permissions ignored) stay libpq's.
    """
    import os

    from psycopg import conninfo

    from runbook.redact import register_secrets

    try:
        given = str(conninfo.conninfo_to_dict(raw).get("password") or "")
    except Exception:  # check_url says why, where the URL is used
        return ""
    found = given or _libpq_password(raw, os.environ.get("PGPASSWORD"),
                                     os.environ.get("PGPASSFILE"), os.environ.get("HOME"))
    register_secrets(found)
    return found


@functools.lru_cache(maxsize=8)
def _libpq_password(raw: str, *where: str | None) -> str:
    """libpq's password for `raw`, which has none (`where`: the variables it is read from, so
    one process asking under other ones asks again; one connection attempt each)."""
    from psycopg import pq

    try:
        conn = pq.PGconn.connect_start(raw.encode())
    except Exception:
        return ""
    try:
        return (conn.password or b"").decode(errors="replace")
    finally:
        conn.finish()


def password_said(env: Environment, raw: str, error: str) -> str:
    """For a refused login, where the password came from, or that none is known and where
    to put one (found by review: with PGPASSWORD or a password file, the fix named
    DATABASE_URL alone). Empty for any other failure."""
    if not any(w in error.lower() for w in ("password", "authentication")):
        return ""
    where = password_source(env, raw)
    if where != "nowhere":
        return f", and the password {where} gives"
    return (f"; no password is known: put it in {env.database.url_variable} (percent-encoded), "
            "in PGPASSWORD, or in a password file line (PGPASSFILE, default ~/.pgpass, "
            "mode 0600)")


def password_source(env: Environment, raw: str) -> str:
    """Where login_password found the password, for messages (never the value)."""
    import os

    from psycopg import conninfo

    with contextlib.suppress(Exception):
        if conninfo.conninfo_to_dict(raw).get("password"):
            return env.database.url_variable
    if os.environ.get("PGPASSWORD"):
        return "PGPASSWORD"
    if login_password(raw):
        return f"the password file {os.environ.get('PGPASSFILE') or '~/.pgpass'}"
    return "nowhere"


def _from_process(env: Environment) -> bool:
    import os

    return bool(os.environ.get(env.database.url_variable))


_REFERENCE_ONLY = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?:[-:?+][^}]*)?\}")


def known_secrets(env: Environment) -> set[str]:
    """The database password (every form) and every secret the env file holds (a value
    holding a password, or a key's whose name ends in a secret word: redact.secret_by_name),
    for the journal's secret list. Never raises: a broken configuration is reported by
    whoever uses it.

    The env file's values both as Compose expands them (`POSTGRES_PASSWORD=${PW_HEAD}rest` is
    the password it expands to) and as written, which is what `docker run --env-file` hands
    the app on a host without compose (`pa$word`, of which Compose's reading kept only `pa`):
    a secret is masked whichever way a tool read it. The file's URL too even where url()
    refuses it (a variable it uses is unset: Compose gave the app what it expands to, blanks
    and all, and that password is a secret in whatever the app answers)."""
    found: set[str] = set()
    with contextlib.suppress(RunbookError):
        raw = env.database.url()
        found |= secrets_of(raw)
        if not _misencoded(raw):  # a password kept beside the URL (login_password)
            found |= {login_password(raw)} - {""}
    if env.database.env_file is not None:
        import os

        from runbook.environment.model import credential_variables, read_env_entries
        from runbook.redact import holds_password, secret_by_name

        for interpolate in (True, False):
            try:
                entries = read_env_entries(env.database.env_file, interpolate=interpolate)
            except RunbookError:
                entries = {}
            values = {key: entry.value for key, entry in entries.items()}
            found |= secrets_of(values.get(env.database.url_variable, ""))
            # every key named a secret (DB_PASS, API_TOKEN, JWT_SECRET_KEY...) and every value
            # holding a password (REDIS_URL=redis://:pw@...), not only *PASSWORD and *_SECRET:
            # an app quoting one bare matched no pattern (found by review). A name ending in
            # the word only, an ordinary word only as a password: SECRETS_BACKEND=production
            # masked the environment's name everywhere (found by review)
            for key, value in values.items():
                if key == env.database.url_variable:
                    continue
                if holds_password(value):
                    found |= {value} | (secrets_of(value) if "://" in value else set())
                elif secret_by_name(key, value):
                    found.add(value)
            # A `$` in the password that Compose reads as a variable set nowhere: the rest
            # of the password is that variable's name (the refusal never names it), and a
            # key the credentials use holding it (DB_PW=pa$word) holds the password
            for name, holder in credential_variables(env.database.url_variable,
                                                     entries).items():
                if name in entries or name in os.environ:
                    continue
                found.add(name)
                if holder != env.database.url_variable:
                    found |= {entries[holder].written, entries[holder].value} - {""}
    # a value that is one `${NAME}` as written (a password read literally, or a key as
    # written) names a variable, no secret, and the refusal names it (`uses
    # ${POSTGRES_PASSWORD}`): masked, it read `uses ***` (found by review)
    return {value for value in found if not _REFERENCE_ONLY.fullmatch(value)}


def configured(env: Environment) -> bool:
    """Whether this environment has a database at all: a URL in the process environment or
    an env file to read it from. A configured but broken one counts as configured."""
    return _from_process(env) or env.database.env_file is not None


def url_host(raw: str) -> str:
    """The host part of a postgresql:// URL ('' for a socket or none)."""
    from psycopg import conninfo

    try:
        host = str(conninfo.conninfo_to_dict(raw).get("host") or "")
    except Exception:
        return ""
    return host.split(",")[0]


def via_container(env: Environment) -> bool:
    """Whether to reach the database through its container rather than from this machine.

    `auto` picks the container when the URL's host does not resolve here: a host whose
    Postgres listens on Docker's network only has one DATABASE_URL (the app's, host
    `togather-db`), and no host connection can work there. Likewise a unix socket that is
    not on this machine (`?host=/var/run/postgresql`, a folder the database's container
    shares with the app's): libpq failed "No such file or directory" (found by review), and
    the container is where pg_dump and psql run for snapshots anyway.
    """
    import socket

    access = env.database.access
    if access != "auto":
        return access == "container"
    raw = url(env)
    host = url_host(raw)
    if not host:
        return False
    if host.startswith("/"):
        return not _socket_here(raw)
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return True
    return False


def _socket_path(raw: str) -> str:
    """The unix socket file a URL with a socket folder as its host names (libpq's name)."""
    import os

    from psycopg import conninfo

    params = conninfo.conninfo_to_dict(raw)
    port = str(params.get("port") or os.environ.get("PGPORT") or "5432").split(",")[0]
    return os.path.join(url_host(raw), f".s.PGSQL.{port}")


def _socket_here(raw: str) -> bool:
    """Whether the URL's unix socket exists on this machine (a folder this user may not look
    into counts as not: no connection from here could work either)."""
    import os

    return os.path.exists(_socket_path(raw))


def where(env: Environment) -> str:
    """The database the runbook reads, for messages: host:port/database and where its URL
    comes from, never the user or the password. Never raises (a broken URL is said by
    whoever connects)."""
    from psycopg import conninfo

    variable = env.database.url_variable
    source = "the environment" if _from_process(env) else str(env.database.env_file or "?")
    try:
        params = conninfo.conninfo_to_dict(url(env))
    except Exception:
        return f"{variable} in {source}"
    host = str(params.get("host") or "localhost").split(",")[0]
    port = str(params.get("port") or "5432").split(",")[0]
    name = str(params.get("dbname") or params.get("user") or "?")
    return f"{host}:{port}/{name}, {variable} in {source}"


def access_description(env: Environment) -> str:
    """How the database is reached, for pre-flight and --dry-run (never the URL itself)."""
    host = url_host(url(env))
    if via_container(env):
        why = (f"socket {_socket_path(url(env))} does not exist on this machine"
               if host.startswith("/") else f"host {host or '-'} is on Docker's network only")
        return (f"psql inside container {env.database.container} (docker exec; {why})"
                if env.database.access == "auto"
                else f"psql inside container {env.database.container} (docker exec)")
    return f"from this machine to {host or 'the local socket'}"


_END = "__runbook_end_{n}__"
_WRAPPED = re.compile(r"^\s*(select|with|values)\b", re.IGNORECASE)


class ContainerConnection:
    """A database session through `psql` inside the database container (`docker exec -i`).

    For hosts whose Postgres is reachable only on Docker's network. It offers what the
    runbook uses of a psycopg connection: `execute(query, params).fetchone()/fetchall()` in
    autocommit mode, one session (so BEGIN ... pg_export_snapshot() ... ROLLBACK holds).
    SELECTs come back typed (each row as JSON); other statements as text. The password goes
    to the exec in PGPASSWORD, never on a command line; any error ends the session. The
    URL's `options` (`-csearch_path=app`) go in PGOPTIONS: dropped, the same URL read schema
    42 from the host and 0 through the container.
    """

    def __init__(self, env: Environment, timeout: float | None = 30.0) -> None:
        import os
        import subprocess

        from psycopg import conninfo

        from runbook import procs

        raw = url(env)
        params = conninfo.conninfo_to_dict(raw)
        self.env = env
        self.container = env.database.container
        self.timeout = timeout
        self._count = 0
        self._password = login_password(raw)  # the URL's, PGPASSWORD's or .pgpass's
        user = str(params.get("user") or "")
        dbname = str(params.get("dbname") or user)
        options = str(params.get("options") or "")
        exec_env = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "PGOPTIONS")}
        argv = ["docker", "exec", "-i"]
        if self._password:
            exec_env["PGPASSWORD"] = self._password
            argv += ["-e", "PGPASSWORD"]  # no value: copied from exec_env, never argv
        if options:
            exec_env["PGOPTIONS"] = options
            argv += ["-e", "PGOPTIONS"]
        argv += [self.container, "psql", "-X", "-q", "-A", "-t", "-F", "\x1f",
                 "--no-password", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose",
                 "--host", "127.0.0.1",
                 "--port", "5432", "--username", user, "--dbname", dbname]
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env=exec_env,
                                          preexec_fn=procs.outlives_hangup)
        except OSError as exc:
            raise DatabaseError(f"database unreachable: cannot run docker exec ({exc.strerror})",
                                "install Docker's CLI, or set [database] access = \"host\""
                                ) from None
        self._buffer = b""

    def __enter__(self) -> ContainerConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        import subprocess

        proc = self._proc
        with contextlib.suppress(OSError, ValueError):
            assert proc.stdin is not None
            proc.stdin.write(b"\\q\n")
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()

    def _fail(self, what: str) -> DatabaseError:
        from runbook.redact import redact

        self._proc.kill()
        self._proc.wait()
        err = b""
        with contextlib.suppress(OSError, ValueError):
            assert self._proc.stderr is not None
            err = self._proc.stderr.read()
        lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        first = next((line for line in lines if "ERROR" in line or "FATAL" in line),
                     lines[0] if lines else what)
        first = redact(first.strip(), [self._password] if self._password else [])
        if "55P03" in first:  # lock_timeout (verbose errors carry the SQLSTATE, any locale)
            return LockWaitError(f"a read through container {self.container} gave up waiting "
                                 f"for a table lock: {first}", "see which session holds it "
                                 "(pg_locks), then run again")
        return DatabaseError(f"database unreachable through container {self.container}: "
                             f"{first}", f"check `docker ps` for {self.container} and the "
                             f"user and database in {self.env.database.url_variable}"
                             f"{password_said(self.env, url(self.env), first)}")

    def _read_until(self, marker: bytes) -> list[bytes]:
        import os
        import select
        import time

        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            head, sep, tail = self._buffer.partition(marker + b"\n")
            if sep:
                self._buffer = tail
                return [line for line in head.split(b"\n") if line]
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise self._fail(f"no answer within {self.timeout:g}s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise self._fail("psql ended")
                self._buffer += chunk

    def execute(self, query: object, params: Sequence[object] | None = None) -> _Rows:
        import json

        from psycopg import sql

        text = query.as_string(None) if isinstance(query, sql.Composable) else str(query)
        if params:
            pieces = text.split("%s")
            text = pieces[0] + "".join(sql.Literal(value).as_string(None) + rest
                                       for value, rest in zip(params, pieces[1:], strict=True))
        text = text.strip().rstrip(";")
        wrapped = bool(_WRAPPED.match(text))
        if wrapped:
            text = f"SELECT row_to_json(q)::text FROM ({text}) q"
        self._count += 1
        marker = _END.format(n=self._count).encode()
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(text.encode() + b";\n\\echo " + marker + b"\n")
            self._proc.stdin.flush()
        except OSError:
            raise self._fail("psql ended") from None
        lines = self._read_until(marker)
        if wrapped:
            rows = [tuple(v for _, v in json.loads(line, object_pairs_hook=list))
                    for line in lines]
        else:
            rows = [tuple(line.decode().split("\x1f")) for line in lines]
        return _Rows(rows)


def boolean(value: object) -> bool:
    """A boolean as psycopg (True) or a ContainerConnection (JSON true) answers it."""
    return value is True or value in ("t", "true")


class _Rows:
    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self.rows)


def connect(env: Environment, timeout: int = 5,  # type: ignore[no-untyped-def]
            read_timeout: float | None = 30.0):
    """A session, autocommit. `read_timeout` bounds each answer through the container (None:
    as long as psql runs, for reads that scan whole tables under their own lock_timeout)."""
    import psycopg

    from runbook.redact import redact

    target = url(env)
    if via_container(env):
        return ContainerConnection(env, timeout=read_timeout)
    try:
        return psycopg.connect(target, connect_timeout=timeout, autocommit=True)
    except psycopg.Error as exc:
        text = str(exc).strip()
        first = redact(text.splitlines()[0] if text else "no answer")
        if (key := _refused_value(first)) is not None:  # nothing was tried: bad input
            raise ConfigError(f"{env.database.url_variable} has a value libpq refuses before "
                              f"connecting: {first.removeprefix('connection is bad: ')}",
                              f"correct {key} in {env.database.url_variable} (or the PG* "
                              "variable setting it)") from None
        fix = (f"check `docker ps` for {env.database.container} and "
               f"{env.database.url_variable} in {env.database.env_file or 'the environment'}"
               f"{password_said(env, target, first)}")
        if url_host(target).startswith("/") and not _socket_here(target):
            # (`auto` goes through the container itself then: this is `host` forced)
            fix = (f"its socket {_socket_path(target)} is not on this machine: reach the "
                   f"database through container {env.database.container} "
                   f"(`[database] access = \"container\"`), or {fix}")
        raise DatabaseError(f"database unreachable: {first}", fix) from None


@contextlib.contextmanager
def bounded(conn: Any, milliseconds: int = 5000) -> Iterator[None]:
    """A read-only transaction whose statements give up after `milliseconds` (a locked table
    must not hang us). SET LOCAL, not SET: behind a transaction pooler (PgBouncer) each
    autocommit statement may run on another server connection, so a session's SET did not
    bound the query after it and stayed on a pooled connection, cutting the app's own
    transactions there short."""
    conn.execute("BEGIN READ ONLY")
    try:
        conn.execute(f"SET LOCAL statement_timeout = {int(milliseconds)}")
        yield
    finally:
        with contextlib.suppress(Exception):  # a failed container session is gone already
            conn.execute("ROLLBACK")


def _first_line(exc: Exception) -> str:
    from runbook.redact import redact

    text = str(exc).strip()
    return redact(text.splitlines()[0]) if text else type(exc).__name__


MIGRATION_LOCK_SQL = """
SELECT count(*) OVER (), l.pid, coalesce(a.application_name, ''), coalesce(a.usename::text, ''),
       coalesce(extract(epoch FROM now() - a.backend_start)::bigint, -1),
       (l.classid::bigint << 32) | l.objid::bigint
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY a.backend_start NULLS LAST LIMIT 1
"""


def migration_lock(env: Environment) -> str | None:
    """Who holds an advisory lock in this database, as golang-migrate does for the whole of a
    migration (None: nobody): a `dirty` schema with none is a migration that failed or was cut
    off, not one still running. Said with the session's pid, application and age: another
    program's advisory lock looks the same from here, and "a migration is under way" for a
    reporting job's lock was a wait that never ends (found by review). Raises DatabaseError
    when it cannot be read."""
    import psycopg

    try:
        with connect(env) as conn, bounded(conn):
            row = conn.execute(MIGRATION_LOCK_SQL).fetchone()
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot read pg_locks: {_first_line(exc)}",
                            "check the database") from None
    if not row:
        return None
    count, pid, app, user, age, key = row
    who = ", ".join(x for x in (f"application '{app}'" if app else "",
                                f"user {user}" if user else "",
                                f"connected {int(age) // 60} min ago" if int(age) >= 0 else "")
                    if x)
    more = f", and {int(count) - 1} more" if int(count) > 1 else ""
    return f"session pid {pid}{f' ({who})' if who else ''} holds advisory lock {key}{more}"


def migration_under_way(env: Environment) -> bool:
    """Whether a session of this database holds an advisory lock (migration_lock)."""
    return migration_lock(env) is not None


# the schema_migrations the URL's user sees (its search_path, as golang-migrate's own
# unqualified name), qualified as pg_dump writes it; and every schema that holds one, from the
# catalog, which any user may read (a schema without USAGE is left off the search_path)
MIGRATIONS_TABLE_SQL = """
SELECT t.nspname, t.relname, t.qualified,
       (SELECT string_agg(n.nspname, ', ' ORDER BY n.nspname)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relname = 'schema_migrations' AND c.relkind IN ('r', 'p')
          AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%') AS anywhere,
       (SELECT string_agg(n.nspname, ', ' ORDER BY n.nspname)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relname = 'schema_migrations' AND c.relkind IN ('r', 'p')
          AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
          AND NOT has_schema_privilege(n.oid, 'USAGE')) AS unusable,
       current_user AS who
FROM (SELECT 1) AS one LEFT JOIN (
    SELECT n.nspname, c.relname, quote_ident(n.nspname) || '.' || quote_ident(c.relname)
           AS qualified
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = to_regclass('schema_migrations')) AS t ON true
"""


def read_schema(conn: Any, variable: str = "DATABASE_URL",
                ) -> tuple[SchemaVersion, str | None]:
    """golang-migrate's schema_migrations(version, dirty) as the URL's user sees it, and the
    name it was read under, qualified as pg_dump writes it (None: there is none), in the
    caller's session and transaction: the one lookup of the guard, the snapshots' sidecar
    and the restore's check, so none reads another table than the others.

    A table that exists where the user does not see it (off its search_path, or in a schema
    it may not use) raises DatabaseError: read as "no migration ever ran" (schema 0), it let
    the guard put old code on a newer schema. So does a table of several rows (golang-migrate
    keeps one): any one of them taken for the version is a guess. None is schema 0.
    """
    from psycopg import sql

    schema, name, qualified, anywhere, unusable, who = conn.execute(
        MIGRATIONS_TABLE_SQL).fetchone()
    if qualified is None:
        if not anywhere:
            return SchemaVersion(0, False), None
        first = str(anywhere).split(", ")[0]
        search = (f"add the parameter options=-csearch_path%3D{first} to {variable}, or run "
                  f"`ALTER ROLE {who} SET search_path = {first}, public`")
        if unusable:
            blocked = str(unusable).split(", ")[0]
            raise DatabaseError(
                f"schema_migrations is in schema {anywhere}, and {variable}'s user {who} has "
                f"no USAGE on schema {blocked}",
                f"run `GRANT USAGE ON SCHEMA {blocked} TO {who}` and `GRANT SELECT ON "
                f"{blocked}.schema_migrations TO {who}`, with the schema on the user's "
                f"search_path ({search})")
        raise DatabaseError(
            f"schema_migrations is in schema {anywhere}, which is not on the search_path of "
            f"{variable}'s user {who}", search)
    # every row, counted: golang-migrate keeps one, and `LIMIT 1` alone took whichever came
    # first on disk (often the oldest: "schema 1" of rows 1 and 2, and the guard let v1 onto
    # schema 2; found by review)
    rows = conn.execute(sql.SQL(
        "SELECT version, dirty, count(*) OVER () FROM {} ORDER BY version LIMIT %s").format(
        sql.Identifier(schema, name)), (SHOWN_ROWS,)).fetchall()
    if not rows:  # no migration ever ran (golang-migrate reads it so too)
        return SchemaVersion(0, False), str(qualified)
    if rows[0][2] > 1:
        said = several_rows(str(qualified), [(v, bool(d)) for v, d, _ in rows], rows[0][2])
        raise DatabaseError(f"{said}, so the schema version is not known",
                            one_row_fix(str(qualified), variable, several=True))
    version, dirty, _ = rows[0]
    try:
        return SchemaVersion(int(version), bool(dirty)), str(qualified)
    except (TypeError, ValueError):
        raise DatabaseError(f"{qualified} holds {version!r}, not a version number",
                            one_row_fix(str(qualified), variable)) from None


SHOWN_ROWS = 5  # of a schema_migrations holding several: the versions a refusal names


def several_rows(table: str, rows: Sequence[tuple[object, bool]], count: int) -> str:
    """`table` holds `count` rows (`rows`, the first few in version order), where
    golang-migrate keeps exactly one: its version is none of them for sure. Said alike of
    the database and of a dump's copy (snapshots/verify.py)."""
    shown = ", ".join(f"{v if isinstance(v, int) else repr(v)}{' dirty' if d else ''}"
                      for v, d in rows[:SHOWN_ROWS])
    more = ", ..." if count > len(rows[:SHOWN_ROWS]) else ""
    return f"{table} holds {count} rows (versions {shown}{more}); golang-migrate keeps one"


def one_row_fix(table: str, variable: str, *, several: bool = False) -> str:
    """The repair of a schema_migrations golang-migrate cannot read: one row, at the version
    whose migrations the schema really holds (only a person can tell which). Deleting the
    others repairs several rows only when that version is among them: none left is schema 0."""
    force = (f"check by hand which migrations the schema holds, then set that VERSION with "
             f"golang-migrate: `migrate -path <migrations dir> -database \"${variable}\" force "
             "VERSION` (it empties the table and writes that one row)")
    return force + (f", or, if VERSION is one of the rows, `DELETE FROM {table} WHERE version "
                    "<> VERSION`" if several else "")


def schema_version(env: Environment) -> SchemaVersion:
    """golang-migrate's schema_migrations(version, dirty): one row, or none (read_schema;
    several are refused, never one of them taken).

    Any failure to read it is one DatabaseError naming why (never a traceback, never a guess):
    the schema guard fails closed on it.
    """
    import psycopg

    try:
        with connect(env) as conn, bounded(conn):
            return read_schema(conn, env.database.url_variable)[0]
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot read schema_migrations: {_first_line(exc)}",
                            f"check that {env.database.url_variable} in "
                            f"{env.database.env_file or 'the environment'} names the app's "
                            "database and user") from None


def container_down(info: ContainerInfo | None) -> str | None:
    """`the database container NAME is STATUS` when the container the environment names
    (`[database] container`, inspected) is paused or stopped: every slot's database is down,
    not one slot's code; None when it runs, is absent (a database outside Docker) or Docker
    did not say."""
    if info is None or not info.exists or info.status not in ("paused", "exited", "created"):
        return None
    return f"the database container {info.name} is {info.status}"


def container_start(info: ContainerInfo | None) -> str | None:
    """The command that runs a container_down database again (`docker unpause` a paused
    one, else `docker start`); None when it is not down."""
    if info is None or container_down(info) is None:
        return None
    return f"docker {'unpause' if info.status == 'paused' else 'start'} {info.name}"
