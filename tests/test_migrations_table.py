"""Where golang-migrate's schema_migrations lives, as the runbook reads it (review pg, 1/2/5/7).

Each test gets a database of its own in the drill's Postgres (the drill's `togather` is left
alone), its schema_migrations in a schema `app` rather than `public`: the guard, the
snapshots' sidecar, the dump scan and the restore's check must all read the table the URL's
user sees, through the host and through the database container alike, or fail closed."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from runbook import database, rollback, snapshots
from runbook.drill.stack import DrillStack
from runbook.environment import Environment, Slot
from runbook.errors import ConfigError, ExitCode, RunbookError
from runbook.snapshots import commands, replay, stats
from runbook.snapshots import verify as verify_module
from runbook.state.model import Deployment

pytestmark = pytest.mark.docker

ACCESS = ("host", "container")


@dataclasses.dataclass
class SideDb:
    stack: DrillStack
    name: str
    tmp: Path

    def sql(self, *statements: str) -> None:
        with self.stack.connect(self.name) as conn:
            for statement in statements:
                conn.execute(statement)

    def env(self, access: str, query: str = "", user: str = "", password: str = "",
            ) -> Environment:
        """The drill's environment pointed at this database (`user`: the drill's own)."""
        creds = (f"{user}:{quote(password, safe='')}" if user
                 else f"togather:{quote(self.stack.password, safe='')}")
        url = (f"postgresql://{creds}@127.0.0.1:{self.stack.ports.postgres}/{self.name}"
               f"{query}")
        env_file = self.tmp / f".env.{access}.{secrets.token_hex(3)}"
        env_file.write_text(f"DATABASE_URL={url}\n")
        env_file.chmod(0o600)
        base = self.stack.env
        return base.with_(database=dataclasses.replace(
            base.database, env_file=env_file, access=access,
            snapshot_dir=self.tmp / "snapshots"))


@pytest.fixture
def side_db(scene_stack: DrillStack, tmp_path: Path) -> Iterator[SideDb]:
    """A fresh database holding only app.schema_migrations at 42 (and app.events)."""
    name = f"pgschema{secrets.token_hex(4)}"  # no "_": togather_<db>_<date>_...
    with scene_stack.connect() as conn:
        conn.execute(f"CREATE DATABASE {name}")
    db = SideDb(scene_stack, name, tmp_path)
    db.sql("CREATE SCHEMA app",
           "CREATE TABLE app.schema_migrations (version bigint NOT NULL PRIMARY KEY, "
           "dirty boolean NOT NULL)",
           "INSERT INTO app.schema_migrations VALUES (42, false)",
           "CREATE TABLE app.events (id serial PRIMARY KEY, name text)",
           "INSERT INTO app.events (name) VALUES ('a'), ('b')")
    try:
        yield db
    finally:
        with scene_stack.connect() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def deployment(ident: str, version: str, migration: int, slot: Slot) -> Deployment:
    return Deployment(id=ident, version=version, git_commit=version * 5 + "00000",
                      deployed_at=datetime.now(UTC), deployed_by="test", active_slot=slot,
                      migration_version=migration)


CURRENT = deployment("d2", "bbbbbbb", 42, Slot.GREEN)
TARGET = deployment("d1", "aaaaaaa", 41, Slot.BLUE)  # ran with 41: the guard must refuse


# -- 1. the guard reads the table the URL's user sees, or fails closed -------------------------

@pytest.mark.parametrize("access", ACCESS)
def test_the_urls_search_path_option_is_honoured_through_the_host_and_the_container(
        side_db: SideDb, access: str) -> None:
    env = side_db.env(access, "?options=-csearch_path%3Dapp")
    assert database.schema_version(env) == database.SchemaVersion(42, False)
    with pytest.raises(RunbookError) as refused:
        rollback.schema_guard(env, CURRENT, TARGET, rollback.Options())
    assert "schema is at 42" in str(refused.value)


@pytest.mark.parametrize("access", ACCESS)
def test_a_migrations_table_off_the_search_path_fails_the_guard_closed(
        side_db: SideDb, access: str) -> None:
    env = side_db.env(access)  # search_path "$user", public: app.schema_migrations unseen
    with pytest.raises(database.DatabaseError) as err:
        database.schema_version(env)
    text = str(err.value)
    assert "\n" not in text.strip() and err.value.exit_code == ExitCode.PRECONDITION
    assert "schema app" in err.value.message and "search_path" in text, text
    assert "options=-csearch_path%3Dapp" in (err.value.fix or ""), err.value.fix
    assert side_db.stack.password not in text
    with pytest.raises(RunbookError):  # never "compatible"
        rollback.schema_guard(env, CURRENT, TARGET, rollback.Options())


@pytest.mark.parametrize("access", ACCESS)
def test_a_user_without_usage_on_the_tables_schema_fails_the_guard_closed(
        side_db: SideDb, access: str) -> None:
    role, password = f"pgschema_u_{secrets.token_hex(3)}", secrets.token_hex(8)
    side_db.sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'",
                f"ALTER ROLE {role} SET search_path = app, public",
                f"GRANT CONNECT ON DATABASE {side_db.name} TO {role}")
    try:
        env = side_db.env(access, user=role, password=password)
        with pytest.raises(database.DatabaseError) as err:
            database.schema_version(env)
        assert "schema app" in err.value.message and "USAGE" in str(err.value), err.value
        assert password not in str(err.value)
        with pytest.raises(RunbookError):
            rollback.schema_guard(env, CURRENT, TARGET, rollback.Options())
    finally:
        side_db.sql(f"DROP OWNED BY {role}", f"DROP ROLE {role}")


# -- 2. snapshots record, scan and check the same table ----------------------------------------

def test_a_snapshot_records_verifies_and_restores_the_table_the_guard_reads(
        side_db: SideDb) -> None:
    side_db.sql(f"ALTER ROLE togather IN DATABASE {side_db.name} SET search_path = app, public")
    env = side_db.env("host")
    assert database.schema_version(env).version == 42  # the guard's reading: the oracle is
    snap = snapshots.create(env, "manual")              # the row inserted above
    assert (snap.migration_version, snap.meta.get("migrations_table")) == (
        42, "app.schema_migrations"), snap.meta
    verified = verify_module.verify(env, snap)
    assert verified.migration_version == 42
    assert verify_module.schema_version(env, snap) == 42
    # a tooling snapshot of the same dump: no sidecar names the table or the version
    tooling = snap.path.with_name(snap.path.name.replace("_manual", "_tooling"))
    tooling.write_bytes(snap.path.read_bytes())
    bare = snapshots.Snapshot(tooling, None)
    assert verify_module.schema_version(env, bare) == 42
    # the container's reading is the host's
    assert stats.current_state(side_db.env("container"))[0].version == 42
    # restored over a database migrated on to 43, the check reads 42 again
    side_db.sql("UPDATE app.schema_migrations SET version = 43",
                "INSERT INTO app.events (name) VALUES ('c')")
    # committed, its own exec's word; and every owner and right given back (none refused)
    assert replay.replay(env, verified) == replay.Replayed(None, [])
    said = replay.check_matches(env, replay.RestoreRun(snap, verified))
    assert said.startswith("schema 42;"), said


def test_a_snapshot_whose_sidecar_an_older_runbook_wrote_still_verifies(
        side_db: SideDb) -> None:
    """Found by review: before 2026-12-05 the runbook's sidecar recorded public's table only
    (0 here, where the app's is app.schema_migrations) and named no table; after the upgrade
    every such snapshot was refused as a bad file ("holds 42 but its sidecar says 0"). It is
    compared with what that version read; the version it holds is the app's table's."""
    import json

    side_db.sql(f"ALTER ROLE togather IN DATABASE {side_db.name} SET search_path = app, public")
    env = side_db.env("host")
    snap = snapshots.create(env, "manual")
    meta = json.loads(snap.meta_path.read_text())
    del meta["migrations_table"]
    snap.meta_path.write_text(json.dumps(meta | {"migration_version": 0}))
    older = snapshots.load(snap.path)
    assert older.migrations_table is None and older.migration_version == 0
    assert verify_module.verify(env, older).migration_version == 42
    snap.meta_path.write_text(json.dumps(meta | {"migration_version": 7}))  # still a liar
    with pytest.raises(RunbookError, match="holds schema_migrations 0 but its sidecar says 7"):
        verify_module.verify(env, snapshots.load(snap.path))


# -- 3. golang-migrate keeps one row: several are no known version, none is schema 0 ------------

SEVERAL = "app.schema_migrations holds 3 rows (versions 3, 7, 9); golang-migrate keeps one"


def several_rows(side_db: SideDb) -> None:
    """app.schema_migrations holding 3, 9 and 7 (inserted in that order), the URL's user
    reading it (search_path app)."""
    side_db.sql(f"ALTER ROLE togather IN DATABASE {side_db.name} SET search_path = app, public",
                "DELETE FROM app.schema_migrations",
                "INSERT INTO app.schema_migrations VALUES (3, false)",
                "INSERT INTO app.schema_migrations VALUES (9, false)",
                "INSERT INTO app.schema_migrations VALUES (7, false)")


def rows(side_db: SideDb) -> list[tuple[int, bool]]:
    with side_db.stack.connect(side_db.name) as conn:
        return conn.execute("SELECT version, dirty FROM app.schema_migrations ORDER BY 1"
                            ).fetchall()


@pytest.mark.parametrize("access", ACCESS)
def test_several_rows_are_no_known_schema_for_the_guard_and_the_snapshot(
        side_db: SideDb, access: str) -> None:
    """Found by review: `SELECT version, dirty ... LIMIT 1` took the row first on disk (3),
    so the guard, status and a snapshot's sidecar read schema 3 of rows 3, 9, 7. Each
    refuses with the rows named and the repair, and nothing is written."""
    several_rows(side_db)
    env = side_db.env(access)
    with pytest.raises(database.DatabaseError) as err:
        database.schema_version(env)
    text = str(err.value)
    assert err.value.exit_code == ExitCode.PRECONDITION and "\n" not in text.strip(), text
    assert SEVERAL in err.value.message, text
    fix = err.value.fix or ""
    assert "force" in fix and "DELETE FROM app.schema_migrations" in fix, fix
    assert side_db.stack.password not in text
    with pytest.raises(RunbookError) as refused:
        rollback.schema_guard(env, CURRENT, TARGET, rollback.Options())
    assert refused.value.exit_code == ExitCode.PRECONDITION
    assert SEVERAL in str(refused.value), refused.value
    with pytest.raises(RunbookError) as no_snapshot:
        snapshots.create(env, "manual")
    assert SEVERAL in str(no_snapshot.value), no_snapshot.value
    assert list((side_db.tmp / "snapshots").glob("togather_*")) == []
    with pytest.raises(RunbookError, match="golang-migrate keeps one"):
        stats.current_state(env)  # the restore's reading
    assert rows(side_db) == [(3, False), (7, False), (9, False)]


@pytest.mark.parametrize("access", ACCESS)
def test_an_empty_schema_migrations_is_still_schema_0(side_db: SideDb, access: str) -> None:
    """No row: no migration ever ran (golang-migrate's own reading), not "several"."""
    side_db.sql(f"ALTER ROLE togather IN DATABASE {side_db.name} SET search_path = app, public",
                "DELETE FROM app.schema_migrations")
    env = side_db.env(access)
    assert database.schema_version(env) == database.SchemaVersion(0, False)


def test_a_dump_holding_several_rows_is_refused_by_verify_and_the_guards_read(
        side_db: SideDb) -> None:
    """The dump's own copy is read as the database is: a tooling dump (real pg_dump, no
    sidecar) of rows 3, 9, 7 was "schema 3" to the guard's question and to verify."""
    import gzip

    several_rows(side_db)
    env = side_db.env("host")
    stack = side_db.stack
    dumped = stack.docker("exec", stack.db_container, "pg_dump", "--username", "togather",
                          "--dbname", side_db.name, "--no-owner", "--no-acl", "--clean",
                          "--if-exists")
    assert "COPY app.schema_migrations (version, dirty) FROM stdin;" in dumped.stdout
    folder = side_db.tmp / "snapshots"
    folder.mkdir(exist_ok=True)
    path = folder / f"togather_{side_db.name}_20260101_000000_pre-deploy.sql.gz"
    path.write_bytes(gzip.compress(dumped.stdout.encode()))
    bare = snapshots.Snapshot(path, None)  # app's table is the only one: the one read
    for read in (verify_module.schema_version, verify_module.verify):
        with pytest.raises(RunbookError) as err:
            read(env, bare)
        text = str(err.value)
        assert f"{bare.name} is at no known schema: {SEVERAL}" in text, text
        assert "nothing was changed" in text and "\n" not in text.strip(), text


# -- 5. the read's statement_timeout ends with its transaction ----------------------------------

@pytest.mark.parametrize("access", ACCESS)
def test_the_schema_reads_leave_no_setting_on_their_server_connection(
        side_db: SideDb, access: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind a transaction pooler the session is the pool's: what the read SETs stays for
    the app's next transaction on that server connection. Asked on the read's own session,
    right after it, as that next transaction would find it."""
    env = side_db.env(access, "?options=-csearch_path%3Dapp")
    left: list[str] = []
    real = database.connect

    class Pooled:
        def __init__(self, conn: Any) -> None:
            self.conn = conn

        def __enter__(self) -> Any:
            return self.conn

        def __exit__(self, *exc: object) -> None:
            left.append(str(self.conn.execute("SHOW statement_timeout").fetchone()[0]))
            self.conn.close()

    monkeypatch.setattr(database, "connect", lambda *a, **kw: Pooled(real(*a, **kw)))
    assert database.schema_version(env).version == 42
    assert database.migration_under_way(env) is False
    assert left == ["0", "0"], left


# -- 7. URL parameters libpq does not know: one configuration error ----------------------------

@pytest.mark.parametrize(("query", "name", "fix"), [
    ("?search_path=app", "search_path", "options=-csearch_path%3Dapp"),
    ("?x-migrations-table=app.schema_migrations", "x-migrations-table", "url_variable"),
    ("?sslmode=disable&pool_max_conns=10", "pool_max_conns", "url_variable"),
])
@pytest.mark.parametrize("access", ACCESS)
def test_a_parameter_libpq_does_not_know_is_one_configuration_error(
        side_db: SideDb, access: str, query: str, name: str, fix: str) -> None:
    env = side_db.env(access, query)
    for read in (database.schema_version, database.migration_under_way, commands.target):
        with pytest.raises(ConfigError) as err:
            read(env)
        text = str(err.value)
        assert err.value.exit_code == ExitCode.USAGE and "\n" not in text.strip(), text
        assert f"parameter {name}" in err.value.message, text
        assert fix in (err.value.fix or ""), err.value.fix
        assert side_db.stack.password not in text
        assert quote(side_db.stack.password, safe="") not in text


def test_a_url_libpq_cannot_read_never_quotes_the_password() -> None:
    """libpq quotes the whole URL back for some errors (an unclosed IPv6 bracket)."""
    url = "postgresql://togather:Sekr1tPw9@[::1:5432/togather"
    with pytest.raises(ConfigError) as err:
        database.check_url(url, "DATABASE_URL", "environment")
    assert "Sekr1tPw9" not in str(err.value) and "\n" not in str(err.value).strip()


# -- 6. an advisory lock is said with whose it is ---------------------------------------------

@pytest.mark.parametrize("access", ACCESS)
def test_an_advisory_lock_is_said_with_the_session_that_holds_it(side_db: SideDb,
                                                                 access: str) -> None:
    """Any advisory lock reads as golang-migrate's (its key differs between its versions), so
    the refusal must say whose it is: a reporting job's lock was "a migration is under way",
    a wait that never ends, with nothing naming the session (found by review)."""
    import psycopg

    env = side_db.env(access)
    assert database.migration_lock(env) is None
    url = (f"postgresql://togather:{quote(side_db.stack.password, safe='')}@127.0.0.1:"
           f"{side_db.stack.ports.postgres}/{side_db.name}?application_name=nightly-report")
    with psycopg.connect(url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(12345)")
        pid = holder.execute("SELECT pg_backend_pid()").fetchone()
        said = database.migration_lock(env)
        assert said is not None and pid is not None
        assert f"pid {pid[0]}" in said and "application 'nightly-report'" in said, said
        assert "user togather" in said and "advisory lock 12345" in said, said
        assert database.migration_under_way(env) is True
        # released by its holder (the statement returns once Postgres has let it go): a
        # closed connection's backend may hold it a moment longer, which the last fresh-clone
        # run caught under load
        holder.execute("SELECT pg_advisory_unlock(12345)")
        assert database.migration_lock(env) is None
