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
    """golang-migrate's schema_migrations(version, dirty): one row, or none."""
    import psycopg

    with connect(env) as conn:
        try:
            row = conn.execute("SELECT version, dirty FROM schema_migrations LIMIT 1").fetchone()
        except psycopg.errors.UndefinedTable:
            return SchemaVersion(0, False)
    return SchemaVersion(int(row[0]), bool(row[1])) if row else SchemaVersion(0, False)
