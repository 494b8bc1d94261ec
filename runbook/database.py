"""The Postgres adapter: what schema the shared database is at (more in the database issue).

Also the one place the database URL is read, checked and its password registered as a
secret: a password with a bare `%` or `@` would otherwise reach libpq, whose error messages
(and Python's traceback) then show the URL or part of the password.
"""

from __future__ import annotations

import contextlib
import re
import urllib.parse
from dataclasses import dataclass

from runbook.environment import Environment
from runbook.errors import ConfigError, ExitCode, RunbookError


class DatabaseError(RunbookError):
    exit_code = ExitCode.PRECONDITION


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


def _credentials(url: str) -> str | None:
    """The raw `user:password` part of a URL, taken up to the LAST `@` (a bare `@` in the
    password must not cut it short), or None when the URL has none."""
    _, sep, rest = url.partition("://")
    if not sep:
        return None
    at = rest.rfind("@")
    return rest[:at] if at >= 0 else None


def password_of(url: str) -> str:
    """The password exactly as written in the URL (maybe still percent-encoded)."""
    creds = _credentials(url)
    return creds.partition(":")[2] if creds else ""


def secrets_of(url: str) -> set[str]:
    """Every form of the password that could show up in a message: as written, decoded, and
    what a bare `@` `/` `?` `#` would cut it into (libpq shows the part after it as a host)."""
    raw = password_of(url)
    if not raw:
        return set()
    found: set[str] = set()
    for form in (raw, urllib.parse.unquote(raw)):
        found.add(form)
        found.update(re.split(r"[@/?#]", form))
        for cut in re.finditer(r"[@/?#]", form):
            found.update((form[:cut.start()], form[cut.end():]))
    return {value for value in found if value}


def check_url(url: str, variable: str, where: str) -> None:
    """Refuse a URL libpq would misread; the message never contains any part of it."""
    fix = ENCODE_FIX.format(variable=variable, where=where)
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in ("postgres", "postgresql"):
        raise ConfigError(f"{variable} ({where}) is not a postgresql:// URL",
                          "write it as postgresql://USER:PASSWORD@HOST:PORT/DB")
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
    from runbook import journal

    config = env.database
    raw = config.url()
    journal.register_secrets(*secrets_of(raw))
    where = "environment" if _from_process(env) else str(config.env_file)
    check_url(raw, config.url_variable, where)
    return raw


def _from_process(env: Environment) -> bool:
    import os

    return bool(os.environ.get(env.database.url_variable))


def known_secrets(env: Environment) -> set[str]:
    """The database password (every form) and POSTGRES_PASSWORD, for the journal's secret
    list. Never raises: a broken configuration is reported by whoever uses it."""
    found: set[str] = set()
    with contextlib.suppress(RunbookError):
        found |= secrets_of(env.database.url())
    if env.database.env_file is not None:
        from runbook.environment import read_env_file

        try:
            values = read_env_file(env.database.env_file)
        except RunbookError:
            values = {}
        found |= {value for key, value in values.items()
                  if value and (key.endswith("PASSWORD") or key.endswith("_SECRET"))}
    return found


def configured(env: Environment) -> bool:
    """Whether this environment has a database at all: a URL in the process environment or
    an env file to read it from. A configured but broken one counts as configured."""
    return _from_process(env) or env.database.env_file is not None


def connect(env: Environment, timeout: int = 5):  # type: ignore[no-untyped-def]
    import psycopg

    from runbook.journal import redact

    target = url(env)
    try:
        return psycopg.connect(target, connect_timeout=timeout, autocommit=True)
    except psycopg.Error as exc:
        text = str(exc).strip()
        first = redact(text.splitlines()[0] if text else "no answer")
        raise DatabaseError(f"database unreachable: {first}",
                            f"check `docker ps` for {env.database.container} and "
                            f"{env.database.url_variable} in {env.database.env_file}") from None


def schema_version(env: Environment) -> SchemaVersion:
    """golang-migrate's schema_migrations(version, dirty): one row, or none.

    Any failure to read it is one DatabaseError naming why (never a traceback, never a guess):
    the schema guard fails closed on it.
    """
    import psycopg

    from runbook.journal import redact

    try:
        with connect(env) as conn:
            conn.execute("SET statement_timeout = 5000")  # a locked table must not hang us
            try:
                row = conn.execute(
                    "SELECT version, dirty FROM schema_migrations LIMIT 1").fetchone()
            except psycopg.errors.UndefinedTable:
                return SchemaVersion(0, False)
    except psycopg.Error as exc:
        text = str(exc).strip()
        first = redact(text.splitlines()[0]) if text else type(exc).__name__
        raise DatabaseError(f"cannot read schema_migrations: {first}",
                            f"check that {env.database.url_variable} in "
                            f"{env.database.env_file or 'the environment'} names the app's "
                            "database and user") from None
    if row is None:
        return SchemaVersion(0, False)
    try:
        return SchemaVersion(int(row[0]), bool(row[1]))
    except (TypeError, ValueError):
        raise DatabaseError(f"schema_migrations holds {row[0]!r}, not a version number",
                            "repair schema_migrations (golang-migrate force VERSION)") from None
