"""The Postgres adapter: what schema the shared database is at (more in the database issue)."""

from __future__ import annotations

from dataclasses import dataclass

from runbook.environment import Environment
from runbook.errors import ExitCode, RunbookError


class DatabaseError(RunbookError):
    exit_code = ExitCode.PRECONDITION


@dataclass(frozen=True)
class SchemaVersion:
    version: int  # 0 when no migration was ever applied
    dirty: bool

    def describe(self) -> str:
        return f"{self.version}{' (dirty)' if self.dirty else ''}"


def connect(env: Environment, timeout: int = 5):  # type: ignore[no-untyped-def]
    import psycopg

    try:
        return psycopg.connect(env.database.url(), connect_timeout=timeout, autocommit=True)
    except psycopg.OperationalError as exc:
        from runbook.journal import redact

        first = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else "no answer")
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
