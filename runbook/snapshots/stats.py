"""What the database holds now: per-table stats in one consistent read, and the loss window.

The sidecar's per-table row counts are taken in the very MVCC snapshot pg_dump reads
(`pg_export_snapshot` + `pg_dump --snapshot`), so they describe the dump exactly: a restore
is verified against them, and the data a restore would undo (the loss window) is measured
against them. Everything here is read-only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from runbook import database
from runbook.environment import Environment
from runbook.snapshots import commands
from runbook.snapshots.store import FUTURE_SLACK, Snapshot, TableStats
from runbook.times import format_utc as _fmt
from runbook.times import human_duration, rough_duration
from runbook.times import now as _now

TABLES_SQL = """
SELECT n.nspname, c.relname,
       EXISTS (SELECT 1 FROM pg_attribute a
               WHERE a.attrelid = c.oid AND a.attname = 'created_at' AND NOT a.attisdropped
                 AND a.atttypid IN ('timestamptz'::regtype, 'timestamp'::regtype, 'date'::regtype))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY 1, 2
"""


def _table_key(schema: str, table: str) -> str:
    return table if schema == "public" else f"{schema}.{table}"


def _tables(conn: Any) -> list[tuple[str, str, bool]]:
    return [(r[0], r[1], bool(r[2])) for r in conn.execute(TABLES_SQL).fetchall()]


def table_stats(conn: Any) -> dict[str, TableStats]:
    """Exact row counts (and newest created_at) of every user table, in the caller's tx."""
    from psycopg import sql

    out: dict[str, TableStats] = {}
    for schema, table, has_created in _tables(conn):
        ident = sql.Identifier(schema, table)
        if has_created:
            row = conn.execute(sql.SQL("SELECT count(*), max(created_at)::text FROM {}")
                               .format(ident)).fetchone()
            out[_table_key(schema, table)] = TableStats(int(row[0]), row[1], True)
        else:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()
            out[_table_key(schema, table)] = TableStats(int(row[0]))
    return out


@contextlib.contextmanager
def read_snapshot(env: Environment) -> Iterator[Any]:
    """A read-only REPEATABLE READ transaction: one consistent view for stats (and pg_dump).

    No limit per answer through the container (counting a large table takes what it takes);
    waiting for a lock is limited instead (commands.LOCK_WAIT_SECONDS)."""
    import psycopg

    with database.connect(env, read_timeout=None) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            conn.execute(f"SET LOCAL lock_timeout = '{commands.LOCK_WAIT_SECONDS}s'")
            yield conn
        except (psycopg.Error, database.DatabaseError) as exc:
            # worded while this transaction still holds its locks (a session queued behind
            # them is still to be seen); a psycopg error never leaves as a traceback
            raise worded(env, exc) from None
        finally:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")


HOLDERS_SQL = """
SELECT l.pid, l.granted, coalesce(a.usename, ''), coalesce(a.application_name, ''),
       coalesce(a.state, ''),
       coalesce(to_char(a.xact_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), ''),
       string_agg(DISTINCT c.relname, ', ')
FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock' AND l.pid IS NOT NULL
  AND l.pid <> pg_backend_pid()
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND c.relkind IN ('r', 'p') AND c.relpersistence <> 't'  -- what the reads and pg_dump lock
GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1
"""


def exclusive_lockers(env: Environment) -> list[tuple[int, str]]:
    """(pid, description) of every other session holding or queued for an exclusive lock on
    a table: what makes a snapshot's reads wait. Empty when none, or when it cannot be read
    (this only words an error already being raised)."""
    found: list[tuple[int, str]] = []
    with contextlib.suppress(Exception), database.connect(env) as conn:
        for pid, granted, user, app, state, since, rels in conn.execute(HOLDERS_SQL).fetchall():
            who = ", ".join(part for part in (f"user {user}" if user else "",
                                              f"application {app!r}" if app else "",
                                              f"{state} since {since}" if state and since
                                              else state) if part)
            verb = "holds" if granted else "is queued for"
            found.append((int(pid), f"session {pid} ({who or 'no details'}) {verb} an "
                                    f"exclusive lock on {rels}"))
    return found


# What a snapshot reads that the URL's user may not: a table's or sequence's data (pg_dump
# COPYs each one, reads each sequence and locks each table), the schema holding it (USAGE), and
# each large object (pg_dump opens it, and a role other than its owner needs SELECT on it);
# never an extension's own table, which pg_dump leaves to CREATE EXTENSION (its config tables
# excepted: their rows are dumped).
# From the catalog, which any role may read. Left to pg_dump, the refusal came after the app
# slots stopped for a restore, with a fix that fixed nothing (found by review).
UNREADABLE_SQL = """
SELECT CASE c.relkind WHEN 'S' THEN 'sequence' ELSE 'table' END,
       format('%I.%I', n.nspname, c.relname), quote_ident(n.nspname),
       has_schema_privilege(n.oid, 'USAGE'), has_table_privilege(c.oid, 'SELECT')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'S')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
  AND (c.oid IN (SELECT unnest(extconfig) FROM pg_extension) OR NOT EXISTS (
       SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
         AND d.deptype = 'e'))
  AND NOT (has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT'))
ORDER BY 2
"""
# lo_open's own test (its owner's rights or a SELECT grant, through role membership too,
# unless lo_compat_privileges is on), on any server version: has_largeobject_privilege is 17's
UNREADABLE_LARGE_OBJECTS_SQL = """
SELECT m.oid::bigint, quote_ident(pg_get_userbyid(m.lomowner)), count(*) OVER ()
FROM pg_largeobject_metadata m
WHERE NOT current_setting('lo_compat_privileges')::boolean
  AND NOT pg_has_role(m.lomowner, 'USAGE')
  AND NOT EXISTS (SELECT 1 FROM aclexplode(m.lomacl) a
                  WHERE a.privilege_type = 'SELECT'
                    AND CASE WHEN a.grantee = 0 THEN true
                             ELSE pg_has_role(a.grantee, 'USAGE') END)
ORDER BY 1 LIMIT 3
"""
NAMED = 6  # objects named in one GRANT; past it, every one in their schemas
READ_ALL = ("or take snapshots as a role that may read every table and large object (a "
            "superuser): set [database] url_variable to a variable holding that role's URL")


def refuse_unreadable(conn: Any) -> None:
    """Refuse (DatabaseError, exit 4) a snapshot pg_dump would fail for lack of privileges,
    before anything is written or stopped, naming each object and the GRANT that fixes it."""
    who, user = conn.execute("SELECT current_user::text, quote_ident(current_user)").fetchone()
    rows = conn.execute(UNREADABLE_SQL).fetchall()
    if rows:
        yes = database.boolean
        unusable = sorted({str(schema) for _, _, schema, usage, _ in rows if not yes(usage)})
        unselectable = [(str(kind), str(name), str(schema))
                        for kind, name, schema, _, select in rows if not yes(select)]
        said = [f"schema {name} (no USAGE)" for name in unusable]
        said += [f"{kind} {name}" for kind, name, _ in unselectable[:NAMED]]
        more = len(unselectable) - NAMED
        grants = [f"`GRANT USAGE ON SCHEMA {', '.join(unusable)} TO {user}`"] if unusable \
            else []
        if 0 < len(unselectable) <= NAMED:
            grants.append(f"`GRANT SELECT ON {', '.join(n for _, n, _ in unselectable)} "
                          f"TO {user}`")
        elif unselectable:
            schemas = ", ".join(sorted({schema for _, _, schema in unselectable}))
            grants += [f"`GRANT SELECT ON ALL TABLES IN SCHEMA {schemas} TO {user}`",
                       f"`GRANT SELECT ON ALL SEQUENCES IN SCHEMA {schemas} TO {user}`"]
        raise database.DatabaseError(
            f"the database user {who} may not read {', '.join(said)}"
            f"{f' and {more} more' if more > 0 else ''}, which every snapshot dumps "
            "(pg_dump reads each); nothing was changed",
            f"{' and '.join(grants)} as their owner or a superuser, {READ_ALL}")
    objects = conn.execute(UNREADABLE_LARGE_OBJECTS_SQL).fetchall()
    if objects:
        count = int(objects[0][2])
        named = ", ".join(f"{oid} (owner {owner})" for oid, owner, _ in objects)
        extra = f" and {count - len(objects)} more" if count > len(objects) else ""
        first = objects[0][0]
        each = f" (the same for each of the {count})" if count > 1 else ""
        raise database.DatabaseError(
            f"the database user {who} may not read large object{'s' if count > 1 else ''} "
            f"{named}{extra}, which every snapshot dumps (pg_dump opens each); nothing was "
            "changed",
            f"`ALTER LARGE OBJECT {first} OWNER TO {user}` or `GRANT SELECT ON LARGE OBJECT "
            f"{first} TO {user}`{each}, as its owner or a superuser, {READ_ALL}")


def check_readable(env: Environment) -> None:
    """refuse_unreadable for a run about to stop the app slots for a dump (a restore)."""
    with read_snapshot(env) as conn:
        refuse_unreadable(conn)


def _denied(exc: Exception) -> bool:
    """A read refused for lack of privileges (SQLSTATE 42501), through either way in."""
    import psycopg

    return (isinstance(exc, psycopg.errors.InsufficientPrivilege)
            or (isinstance(exc, database.DatabaseError) and "42501" in exc.message))


def worded(env: Environment, exc: Exception) -> Exception:
    """A failed read (or dump) inside read_snapshot as the error to raise. A lock wait that
    ran out names the sessions holding (or queued for) a table exclusively; any other
    failure keeps its own words (a psycopg one as a one-line DatabaseError)."""
    import psycopg

    from runbook.redact import redact

    waited = isinstance(exc, database.LockWaitError | psycopg.errors.LockNotAvailable)
    lockers = exclusive_lockers(env) if waited else []
    if lockers:
        first = lockers[0][0]
        return database.DatabaseError(
            f"a table the runbook must read is locked: {'; '.join(t for _, t in lockers)}, "
            f"and the read waited {commands.LOCK_WAIT_SECONDS} s for it",
            f"let that session finish, or end it in psql (`SELECT pg_terminate_backend({first})`)"
            ", then run again")
    if _denied(exc):  # what refuse_unreadable does not foresee: never "check docker logs"
        # psql's verbose line in a container ("ERROR:  42501: permission denied for ..."):
        # what follows the SQLSTATE, never its "database unreachable through container"
        text = str(exc.message if isinstance(exc, database.DatabaseError) else exc)
        text = text.split("42501:", 1)[-1].strip()
        line = redact(text.splitlines()[0]) if text else type(exc).__name__
        user = commands.target(env).user
        return database.DatabaseError(
            f"the database user {user} may not read what the runbook must: {line}",
            f"grant it what it lacks (`GRANT SELECT ON <table> TO {user}`, as the table's "
            f"owner or a superuser), {READ_ALL}")
    if isinstance(exc, psycopg.Error):
        text = str(exc).strip()
        line = redact(text.splitlines()[0]) if text else type(exc).__name__
        cls = database.LockWaitError if waited else database.DatabaseError
        return cls(f"cannot read the database: {line}",
                   "see which session holds the table (pg_locks), then run again" if waited
                   else f"check `docker logs {env.database.container}` and retry")
    return exc


def server_version(env: Environment) -> tuple[int, int]:
    """The server's (major, minor), e.g. (15, 4): what its psql, which replays a restore,
    understands."""
    with read_snapshot(env) as conn:
        number = int(conn.execute("SHOW server_version_num").fetchone()[0])
    return number // 10000, number % 10000


LARGE_OBJECTS_SQL = "SELECT EXISTS (SELECT 1 FROM pg_largeobject_metadata)"
# a snapshot's sidecar warning, and what the deploy plan says before its pre-deploy snapshot
LARGE_OBJECTS = ("it holds large objects, which the runbook's one-transaction restore refuses: "
                 "the runbook cannot restore this snapshot (restore it by hand, as the "
                 "refusal says, or move the large objects into a bytea column)")


def holds_large_objects(env: Environment) -> bool:
    """Whether the database holds large objects: a snapshot of it is one the restore refuses
    (verify.py), which on-call must learn before a deploy migrates behind it."""
    with read_snapshot(env) as conn:
        return bool(conn.execute(LARGE_OBJECTS_SQL).fetchone()[0])


def current_state(env: Environment) -> tuple[database.SchemaVersion, dict[str, TableStats]]:
    """The schema version (the table the guard reads) and per-table stats right now, read
    consistently."""
    with read_snapshot(env) as conn:
        return database.read_schema(conn, env.database.url_variable)[0], table_stats(conn)



# --- data-loss window ----------------------------------------------------------------------

@dataclass(frozen=True)
class TableLoss:
    table: str
    rows_at_snapshot: int | None  # None: the table did not exist when the snapshot was taken
    rows_now: int
    written_since: int  # rows a restore would drop (created_at based, else the net growth)
    exact: bool  # counted by created_at; otherwise a lower bound

    def describe(self) -> str:
        if self.rows_at_snapshot is None:
            return (f"{self.table}: {self.rows_now} rows (table created after the snapshot; "
                    "the restore drops it)")
        bound = "" if self.exact else "at least "
        rows = "row" if self.written_since == 1 else "rows"
        return f"{self.table}: {bound}{self.written_since} new {rows}"


@dataclass(frozen=True)
class LossWindow:
    """What restoring `snapshot` now would undo: time since it was taken, rows since."""

    snapshot: str
    taken_at: datetime
    seconds: float
    tables: tuple[TableLoss, ...]
    known: bool = True  # False when the snapshot recorded no row counts

    @property
    def rows(self) -> int:
        return sum(t.written_since for t in self.tables)

    @property
    def affected(self) -> tuple[TableLoss, ...]:
        return tuple(t for t in self.tables if t.written_since or t.rows_at_snapshot is None)

    def describe(self) -> str:
        if self.seconds < -FUTURE_SLACK:
            # taken while the clock ran fast (set back since): never "taken 0s ago" (found by
            # review); its rows' created_at carry that clock too, so counts are lower bounds
            said = (f"{self.snapshot} is dated {rough_duration(-self.seconds)} in the future: "
                    "how many writes a restore undoes cannot be told (the clock was likely "
                    "set back since it was taken)")
            counted = "; ".join(dataclasses.replace(t, exact=False).describe()
                                for t in self.affected)
            return (f"{said}; by row counts: {counted} (updates and deletes since then are "
                    "undone too)" if counted else said)
        ago = human_duration(self.seconds)
        if not self.known:
            return (f"{self.snapshot} was taken {ago} ago; it recorded no row counts, so the "
                    "writes since then cannot be counted")
        if not self.affected:
            return (f"{self.snapshot} was taken {ago} ago; no rows were added since "
                    "(updates and deletes since then are undone too)")
        parts = "; ".join(t.describe() for t in self.affected)
        return (f"restoring {self.snapshot} undoes {ago} of writes: {parts} "
                "(updates and deletes since then are undone too)")

    def to_json(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "taken_at": _fmt(self.taken_at),
                "seconds": round(self.seconds, 1), "rows": self.rows, "known": self.known,
                "tables": [t.__dict__ for t in self.tables], "summary": self.describe()}


def loss_window(env: Environment, snap: Snapshot, now: datetime | None = None) -> LossWindow:
    """Compare the database now with the snapshot's recorded counts (read-only)."""
    from psycopg import sql

    now = now or _now()
    then = snap.tables
    seconds = (now - snap.timestamp).total_seconds()
    if not then:
        return LossWindow(snap.name, snap.timestamp, seconds, (), known=False)
    losses: list[TableLoss] = []
    with read_snapshot(env) as conn:
        for schema, table, has_created in _tables(conn):
            key = _table_key(schema, table)
            ident = sql.Identifier(schema, table)
            old = then.get(key)
            if old is None:
                rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()
                losses.append(TableLoss(key, None, int(rows[0]), int(rows[0]), True))
                continue
            if has_created:
                threshold = old.max_created_at if old.rows else None
                if threshold is None and old.rows:
                    threshold = _fmt(snap.timestamp)
                query = (sql.SQL("SELECT count(*), count(*) FILTER (WHERE created_at > %s) "
                                 "FROM {}") if threshold is not None
                         else sql.SQL("SELECT count(*), count(*) FROM {}"))
                row = conn.execute(query.format(ident),
                                   (threshold,) if threshold is not None else None).fetchone()
                now_rows, by_time = int(row[0]), int(row[1])
                losses.append(TableLoss(key, old.rows, now_rows,
                                        max(by_time, now_rows - old.rows), True))
            else:
                row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()
                now_rows = int(row[0])
                losses.append(TableLoss(key, old.rows, now_rows, max(0, now_rows - old.rows),
                                        False))
    return LossWindow(snap.name, snap.timestamp, seconds, tuple(losses))
