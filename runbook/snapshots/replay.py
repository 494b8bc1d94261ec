"""Replacing the database with a verified snapshot, in ONE transaction, and proving it.

The replay feeds `BEGIN; DROP SCHEMA public CASCADE; CREATE SCHEMA public;`, the dump and,
only once the whole file streamed and checked out, `COMMIT;` to one psql run with
ON_ERROR_STOP: any failure (bad SQL, a file corrupted mid-stream, a lock timeout) leaves the
database exactly as it was. The COMMIT is ours, not psql's: `--single-transaction` commits at
the end of its input, and a runbook killed mid-stream (SIGKILL, the OOM killer, a Ctrl-C that
reaches `docker exec` too) ends that input early, which would commit the DROP and half a dump.
Without our COMMIT, psql ends with the transaction open and Postgres rolls it back.

Once COMMIT is sent, psql's (or `docker exec`'s) exit code no longer says what happened: the
Docker CLI can die, or the daemon drop the exec, after Postgres committed. The prelude has psql
print its transaction id, and COMMIT is sent only once it is known; after a failure Postgres
itself says (`txid_status`) whether that transaction committed. Committed: the restore is done
and the run goes on. Unknown: the run stops and leaves the app slots stopped, since old code
started on a restored schema, or new code on an old one, is worse than the service down.
The plan steps around it (stopping the app slots, the safety snapshot) live in
runbook/snapshot_restore.py.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from runbook import database, faults
from runbook.environment import Environment, command_arg
from runbook.errors import ExitCode, PreconditionError, RunbookError
from runbook.snapshots import commands, give_back, sessions
from runbook.snapshots.stats import current_state, read_snapshot
from runbook.snapshots.store import Snapshot
from runbook.snapshots.verify import TRAILER, Verified, chunks

LOCK_TIMEOUT = "30s"  # a restore waits this long for locks, then rolls back and says so
# Appended to psql's input when a restore must not commit: it raises an error in every lexer
# state (ends a COPY, fails as a backslash command, fails as SQL), so ON_ERROR_STOP stops psql
# at once and the open transaction is rolled back, the DROP SCHEMA included.
ABORT = (b"\n\\.\n;\n\\runbook_restore_aborted\n"
         b"SELECT 'restore aborted by runbook'::runbook_restore_aborted;\n")
COMMIT = b"\nCOMMIT;\n"  # written only after the whole file streamed and checked out
TXID = b"runbook-restore-txid:"  # psql prints it with the transaction's id, first thing
TXID_WAIT = 30.0  # for psql to print it (it does so right after connecting)
# For a transaction still "in progress" after psql's exec failed: psql in the container may
# still be building the dump's indexes, minutes on a large database (the lock is kept fresh)
OUTCOME_WAIT = 600.0
UNANSWERED_WAIT = 30.0  # for Postgres to answer at all (restarting, or a connection refused)
END_WAIT = 10.0  # for a terminated session of a failed restore to end


class ReplayFailed(RunbookError):
    """The replay failed and its transaction did not commit: the database is as it was
    (proved: COMMIT was never sent, or Postgres says the transaction aborted)."""


class OutcomeUnknown(RunbookError):
    """COMMIT was sent, psql's exec failed, and Postgres could not say what became of the
    transaction: the database may or may not be restored."""


@dataclass
class RestoreRun:
    """Shared between the restore steps while they run (and readable by the caller after)."""

    snapshot: Snapshot
    verified: Verified
    safety: Snapshot | None = None
    stopped: list[str] = field(default_factory=list)
    # the full id of each container it stopped (by name): started again by that id, never
    # another container given the name meanwhile
    stopped_ids: dict[str, str] = field(default_factory=dict)
    restored: bool = False
    outcome_unknown: bool = False  # COMMIT sent, psql's exec failed, Postgres could not say
    schema_now: database.SchemaVersion | None = None  # the database's, read while planning
    # a killed earlier restore's: the schema in its safety snapshot (before that restore)
    schema_before_killed: database.SchemaVersion | None = None
    held_down: list[str] = field(default_factory=list)  # serving, stopped by it, left so
    # a standalone restore's running standby whose code ran with another schema than the
    # snapshot's: stopped with the others, never started again on it (container: why)
    unfit: dict[str, str] = field(default_factory=dict)
    # rows another session wrote after the restore's COMMIT, seen by check_matches
    written_since: str | None = None


# Every schema left once the dump's own are dropped was made after the snapshot (a migration's
# `CREATE SCHEMA audit`): the database is the dump's, so it goes too (it is in the safety
# snapshot). Left, the check after the replay found its tables, after the commit: exit 5 with
# the service down. System schemas (pg_*, information_schema) are never touched.
DROP_THE_REST = (b"DO $runbook$ DECLARE s name; BEGIN FOR s IN SELECT nspname FROM pg_namespace "
                 b"WHERE nspname <> 'information_schema' AND nspname NOT LIKE 'pg\\_%' LOOP "
                 b"EXECUTE format('DROP SCHEMA %I CASCADE', s); END LOOP; END $runbook$;\n")


def prelude(verified: Verified) -> bytes:
    """Drop what the dump does not know about: its schemas go, then every other one made
    since, then public comes back empty. Between the two, with every table held, no other
    session may be connected (snapshots/sessions.py): one that connected since the safety
    snapshot may have written what neither holds, so the restore rolls back."""
    drops = b"".join(b"DROP SCHEMA IF EXISTS " + name + b" CASCADE;\n"
                     for name in verified.schemas if name != b"public")
    return (b"BEGIN;\nSET client_min_messages = warning;\n"
            b"SET lock_timeout = '" + LOCK_TIMEOUT.encode() + b"';\n"
            b"SELECT '" + TXID + b"' || txid_current();\n"
            + give_back.RECORD + drops + b"DROP SCHEMA IF EXISTS public CASCADE;\n" + DROP_THE_REST
            + sessions.IN_TRANSACTION.encode()
            + b"CREATE SCHEMA public;\nGRANT USAGE ON SCHEMA public TO PUBLIC;\n")


# Who runs the replay, and what it may do. The prelude's DROP SCHEMA needs the ownership of
# each schema (a schema's owner drops what is in it, whoever owns that); the dump then
# creates every schema again (CREATE on the database) and the extensions in them, which a
# superuser alone may for an untrusted one (file_fdw, postgres_fdw).
_WHO_SQL = """
SELECT current_user::text, r.rolsuper, has_database_privilege(current_database(), 'CREATE'),
       quote_ident(current_user) AS quser, quote_ident(current_database()) AS qdb
FROM pg_roles r WHERE r.rolname = current_user
"""
_DROPPED = "nspname <> 'information_schema' AND nspname NOT LIKE 'pg\\_%'"  # DROP_THE_REST's
_CANNOT_SQL = f"""
SELECT 'schema', quote_ident(nspname), quote_ident(pg_get_userbyid(nspowner))
FROM pg_namespace WHERE {_DROPPED} AND NOT pg_has_role(current_user, nspowner, 'USAGE')
UNION ALL
SELECT 'extension', quote_ident(e.extname), quote_ident(n.nspname)
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
LEFT JOIN pg_available_extension_versions v ON v.name = e.extname AND v.version = e.extversion
WHERE {_DROPPED.replace("nspname", "n.nspname")}
  AND coalesce(v.superuser AND NOT coalesce((to_jsonb(v) ->> 'trusted')::boolean, false), true)
ORDER BY 1 DESC, 2
"""
# What other roles hold in the schemas the replay drops: the dump (--no-acl --no-owner)
# brings none of it back, and the restoring user owns everything after. Not counted: its own
# (and pg_database_owner's when it owns the database), an owner's rights (said as the
# ownership), extensions' members (created again by the dump), and what PUBLIC gets again
# anyway (EXECUTE on functions, USAGE on public: the prelude's GRANT).
_LOST_SQL = f"""
WITH me AS (
  SELECT oid FROM pg_roles WHERE rolname = current_user
  UNION SELECT r.oid FROM pg_roles r JOIN pg_database d ON d.datname = current_database()
  WHERE r.rolname = 'pg_database_owner' AND d.datdba = (SELECT oid FROM pg_roles
                                                        WHERE rolname = current_user)),
dropped AS (SELECT oid, nspname, nspowner, nspacl FROM pg_namespace WHERE {_DROPPED}),
members AS (SELECT classid, objid FROM pg_depend WHERE deptype = 'e'),
objects AS (
  SELECT 'schema ' || quote_ident(nspname) AS what, nspowner AS owner, nspacl AS acl
  FROM dropped
  UNION ALL
  SELECT format('%I.%I', n.nspname, c.relname), c.relowner, c.relacl
  FROM pg_class c JOIN dropped n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND c.oid NOT IN (
    SELECT objid FROM members WHERE classid = 'pg_class'::regclass)
  UNION ALL
  SELECT format('%I.%I (%I)', n.nspname, c.relname, a.attname), NULL, a.attacl
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
  JOIN dropped n ON n.oid = c.relnamespace
  WHERE a.attacl IS NOT NULL AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT 'function ' || p.oid::regprocedure::text, p.proowner, p.proacl
  FROM pg_proc p JOIN dropped n ON n.oid = p.pronamespace
  WHERE p.oid NOT IN (SELECT objid FROM members WHERE classid = 'pg_proc'::regclass)
  UNION ALL
  SELECT 'new ' || CASE d.defaclobjtype WHEN 'r' THEN 'tables' WHEN 'S' THEN 'sequences'
                    WHEN 'f' THEN 'functions' WHEN 'T' THEN 'types' ELSE 'schemas' END
         || ' in schema ' || quote_ident(n.nspname), NULL, d.defaclacl
  FROM pg_default_acl d JOIN dropped n ON n.oid = d.defaclnamespace)
SELECT role, what FROM (
  SELECT pg_get_userbyid(owner) AS role, 'ownership of ' || what AS what, 0 AS kind
  FROM objects WHERE owner IS NOT NULL AND owner NOT IN (SELECT oid FROM me)
  UNION ALL
  SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
         string_agg(a.privilege_type, ', ' ORDER BY a.privilege_type) || ' on ' || o.what, 1
  FROM objects o CROSS JOIN LATERAL aclexplode(o.acl) a
  WHERE a.grantee NOT IN (SELECT oid FROM me) AND a.grantee IS DISTINCT FROM o.owner
    AND NOT (a.grantee = 0 AND (o.what LIKE 'function %' AND a.privilege_type = 'EXECUTE'
                                OR o.what = 'schema public' AND a.privilege_type = 'USAGE'))
  GROUP BY a.grantee, o.what) lost
ORDER BY role, kind, what
"""
NAMED = 6  # of each role's losses, the rest counted


def check_privileges(env: Environment) -> tuple[str, str] | None:
    """Refuse, before anything changes, a restore the database user cannot run (PRECONDITION):
    found only mid-replay ("must be owner of schema ..."), it had stopped the app and taken
    the safety snapshot first. Returns (that user, what other roles hold: privileges and
    ownerships the dump does not hold), or None when they lose nothing. A database that
    cannot be asked refuses too (DatabaseError), as the restore's other reads do."""
    with read_snapshot(env) as conn:
        user, superuser, create, quser, qdb = conn.execute(_WHO_SQL).fetchone()
        cannot = [] if database.boolean(superuser) else [
            tuple(r) for r in conn.execute(_CANNOT_SQL).fetchall()]
        lost: dict[str, list[str]] = {}
        for role, what in conn.execute(_LOST_SQL).fetchall():
            lost.setdefault(str(role), []).append(str(what))
        # owners this user may not give their objects back to (no superuser, no member):
        # said now, not first in the run's last words (found by review)
        owners = [r for r, items in lost.items() if any(i.startswith("ownership of ")
                                                        for i in items)]
        kept = [] if database.boolean(superuser) else [
            r for r in owners if not database.boolean(conn.execute(
                "SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_roles "
                "WHERE rolname = %s", (r,)).fetchone()[0])]
    problems = [f"it does not own schema {name} (owner {owner})" if kind == "schema" else
                f"only a superuser may create extension {name} (in {owner}) again"
                for kind, name, owner in cannot]
    # each statement that lets the user run it, with the real names (a fix said "`ALTER
    # SCHEMA ... OWNER TO`" for a user that owned every schema but lacked CREATE)
    statements = [f"`ALTER SCHEMA {name} OWNER TO {quser}`"
                  for kind, name, _ in cannot if kind == "schema"][:3]
    if not database.boolean(superuser) and not database.boolean(create):
        problems.append("it lacks CREATE on the database, which CREATE SCHEMA needs")
        statements.append(f"`GRANT CREATE ON DATABASE {qdb} TO {quser}`")
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        granting = f"; or, as a superuser, {' and '.join(statements)}" if statements else ""
        if granting and any(kind == "extension" for kind, _, _ in cannot):
            granting += " (the extension still needs a superuser to run the restore)"
        raise PreconditionError(
            f"the database user {user} cannot run this restore, which drops every schema and "
            f"creates what the snapshot holds again: {'; '.join(problems[:3])}{more}; it "
            "would fail after the app slots stopped; nothing was changed",
            "run it as a role that owns every schema and may create schemas (a superuser, "
            "for an untrusted extension): set [database] url_variable to a variable holding "
            f"that role's URL{granting}")
    if not lost:
        return None
    return str(user), "; ".join(
        f"{role} holds {', '.join(items[:NAMED])}"
        + (f" and {len(items) - NAMED} more" if len(items) > NAMED else "")
        + (f" ({user} may not give {role} its ownerships back, not being a member of it: "
           f"{user} keeps them, and {role} gets its rights on them as GRANTs)"
           if role in kept else "")
        for role, items in lost.items())


@dataclass(frozen=True)
class Replayed:
    """A committed replay: what on-call must know when it committed although psql's exec
    failed, and what the give-back (snapshots/give_back.py) was refused (None: its report
    was lost with the exec, so whether all was given back is not known)."""

    committed_anyway: str | None = None
    not_given_back: list[give_back.NotGivenBack] | None = None


# The objects the prelude's DROPs lock, one lock each (relations, their row and array types,
# functions, constraints, defaults), against the server's shared lock table. Measured on the
# drill's Postgres 15 (max_locks_per_transaction 64, 100 connections: 6400): 800 tables
# counted 5613 (0.88 times it) restored; 1100, 7713 (1.2 times), failed "out of shared
# memory" after the app had stopped (the toast relations, not counted, and the dump's
# creates take locks too, and Postgres lends the table spare shared memory).
_LOCKS_SQL = f"""
WITH dropped AS (SELECT oid FROM pg_namespace WHERE {give_back.DROPPED})
SELECT (SELECT count(*) FROM pg_class WHERE relnamespace IN (SELECT oid FROM dropped))
     + (SELECT count(*) FROM pg_type WHERE typnamespace IN (SELECT oid FROM dropped))
     + (SELECT count(*) FROM pg_proc WHERE pronamespace IN (SELECT oid FROM dropped))
     + (SELECT count(*) FROM pg_constraint WHERE connamespace IN (SELECT oid FROM dropped))
     + (SELECT count(*) FROM pg_attrdef d JOIN pg_class c ON c.oid = d.adrelid
        WHERE c.relnamespace IN (SELECT oid FROM dropped)),
       current_setting('max_locks_per_transaction')::int,
       current_setting('max_connections')::int
       + current_setting('max_prepared_transactions')::int
"""
LOCK_ROOM_FACTOR = 1.0


def check_lock_room(env: Environment) -> None:
    """Refuse, before anything changes, a restore whose one transaction cannot hold a lock on
    everything it drops (PRECONDITION): found mid-replay, it had stopped the app and taken the
    safety snapshot for a rollback with a cryptic "out of shared memory"."""
    with read_snapshot(env) as conn:
        objects, per_tx, slots = (int(v) for v in conn.execute(_LOCKS_SQL).fetchone())
    room = per_tx * slots
    if objects <= LOCK_ROOM_FACTOR * room:
        return
    want = -(-objects // slots) * 2  # per transaction: what the DROPs and the dump's creates take
    raise PreconditionError(
        f"the restore drops {objects} database objects in one transaction, a lock each, and "
        f"the server's lock table holds about {room} (max_locks_per_transaction {per_tx} x "
        f"{slots} connections): it would fail \"out of shared memory\" after the app slots "
        "stopped; nothing was changed",
        f"raise it: `ALTER SYSTEM SET max_locks_per_transaction = {want}` as a superuser, "
        "then restart Postgres (a restart ends every session), and run this again")


def replay(env: Environment, verified: Verified,
           heartbeat: Callable[[], None] = lambda: None) -> Replayed:
    """Feed prelude + dump + give-back to one psql in one transaction; commit only a clean,
    whole file.

    The compressed bytes are hashed again while streaming: a file that changed or broke since
    verify() gets ABORT instead of EOF, so psql rolls back and the database stays as it was.
    Raises ReplayFailed (not committed) or OutcomeUnknown.
    """
    tgt = commands.target(env)
    snap = verified.snapshot
    sha = hashlib.sha256()
    problem: str | None = None
    tail = b""
    commit_sent = False
    stopped_reading = False  # psql closed its input: it stopped on an error
    txid: int | None = None
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        proc = commands.spawn(commands.replay(tgt, str(snap.path)), stdin=subprocess.PIPE,
                              stdout=out, stderr=err, own_session=True)
        assert proc.stdin is not None
        try:
            try:
                proc.stdin.write(prelude(verified))
                for index, chunk in enumerate(chunks(snap.path, sha)):
                    tail = (tail + chunk)[-4096:]
                    proc.stdin.write(chunk)
                    if index == 0:
                        proc.stdin.flush()  # psql has the DROP before a fault here
                        faults.point(env, "restore.mid-stream")
            except BrokenPipeError:
                # psql stopped on an error: its exit code and stderr tell. The part sent
                # is no whole file, so no checksum or trailer verdict is drawn from it (one
                # was, while the exec had not yet ended: psql's reason never shown)
                stopped_reading = True
            except EOFError:
                problem = "it is truncated (the gzip stream ends early)"
            except (gzip.BadGzipFile, zlib.error) as exc:
                problem = f"it is corrupt ({exc})"
            except OSError as exc:
                problem = f"it cannot be read ({exc.strerror or exc})"
            if problem is None and not stopped_reading and proc.poll() is None:
                if sha.hexdigest() != verified.sha256:
                    problem = "its checksum changed since it was verified"
                elif TRAILER not in tail:
                    problem = "it has no 'dump complete' trailer"
            if problem is None and not stopped_reading and proc.poll() is None:
                with contextlib.suppress(OSError):  # psql gone: its exit code says why
                    proc.stdin.write(give_back.GIVE_BACK)  # owners and GRANTs, then COMMIT
                    # the check, before COMMIT: a mismatch rolls the restore back, and what
                    # another session commits after it cannot fail it (review H2)
                    proc.stdin.write(in_transaction_check(snap))
                    proc.stdin.flush()
                txid = _wait_txid(out, proc)
                if txid is None and proc.poll() is None:
                    problem = (f"psql did not print its transaction id within {TXID_WAIT:g} s, "
                               "so the outcome of a COMMIT could not be checked")
            if problem is None and proc.poll() is None and not stopped_reading:
                faults.point(env, "restore.before-commit")
                commit_sent = True  # from here on, psql's exit code alone proves nothing
                try:
                    proc.stdin.write(COMMIT)  # (the buffer is empty: flushed above)
                    proc.stdin.flush()
                except BrokenPipeError:
                    # the exec's input was closed before it: ten bytes into a pipe are
                    # written whole or not at all, so COMMIT never reached psql
                    commit_sent = False
                    stopped_reading = True
                except OSError:
                    pass
            if problem is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.write(ABORT)
            with contextlib.suppress(OSError):
                proc.stdin.close()
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        refused = give_back.not_given_back(out.read())
        if problem is None and code == 0 and commit_sent:
            return Replayed(None, refused)  # (an exec ending 0 without COMMIT restored nothing)
        why = (f"{snap.name}: {problem}" if problem
               else f"psql exit {code}: {commands.stderr_line(err, tgt)}")
        if "out of shared memory" in why:  # the lock table (the planning's check let it by)
            why += ("; the restore takes a lock on each object it drops and creates: raise "
                    "max_locks_per_transaction (ALTER SYSTEM, then restart Postgres)")
    if not commit_sent:
        left = end_session(env, heartbeat)
        note = (f"; whether psql's session is still open could not be checked or ended "
                f"({left}): if it is, the app waits on its locks until psql ends (it can "
                "never commit)") if left else ""
        raise ReplayFailed(f"restore failed and was rolled back ({why}){note}",
                           exit_code=ExitCode.FAILED_SAFELY)
    assert txid is not None
    outcome = transaction_outcome(env, txid, heartbeat)
    if outcome == "committed":
        return Replayed(f"psql's exec failed after COMMIT was sent ({why}), but Postgres "
                        f"reports the restore's transaction {txid} committed: the database is "
                        "restored", refused)
    if outcome == "aborted":
        raise ReplayFailed(f"restore failed and was rolled back ({why}; Postgres reports "
                           f"transaction {txid} aborted)", exit_code=ExitCode.FAILED_SAFELY)
    raise OutcomeUnknown(
        f"the restore's outcome is unknown: psql's exec failed after COMMIT was sent ({why}), "
        f"and Postgres could not say whether transaction {txid} committed ({outcome}); the app "
        "slots stay stopped: the service is down",
        f"once `SELECT txid_status({txid})` in {env.database.container} no longer says "
        f"'in progress', `SELECT version FROM schema_migrations` tells (the snapshot holds "
        f"{verified.migration_version}); then run the same command again: it restores the "
        "snapshot whole either way", exit_code=ExitCode.ATTENTION)


def _wait_txid(out: IO[bytes], proc: subprocess.Popen[bytes]) -> int | None:
    """The id psql printed for the restore's transaction (read without moving the file
    offset psql writes at); None when psql ended or stayed silent for TXID_WAIT."""
    deadline = time.monotonic() + TXID_WAIT
    while True:
        found = re.search(re.escape(TXID) + rb"(\d+)", os.pread(out.fileno(), 4096, 0))
        if found:
            return int(found.group(1))
        if proc.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def end_session(env: Environment, heartbeat: Callable[[], None] = lambda: None) -> str | None:
    """End the restore's psql session if it outlived its `docker exec` (the Docker CLI killed,
    the daemon dropping the exec: psql lives on in the container, mid-statement or waiting
    for input), so Postgres rolls its transaction back now. Only ever called before COMMIT
    was sent, so ending it never loses a restore. Left, it held the DROP SCHEMA's locks, and
    the app slots started again at once waited on them (found by review). None when no such
    session is left; else why it could not be ended."""
    deadline = time.monotonic() + END_WAIT
    while True:
        heartbeat()
        try:
            with database.connect(env) as conn:
                rows = conn.execute(
                    "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND datname = current_database() "
                    "AND pid <> pg_backend_pid()",
                    (commands.RESTORE_APP,)).fetchall()
        except Exception as exc:  # unreachable: nothing more to do here
            return f"Postgres could not be asked: {_first_line(exc)}"
        if not rows:
            return None
        if time.monotonic() > deadline:
            pids = ", ".join(str(row[0]) for row in rows)
            return f"its backend {pids} was still there after {END_WAIT:g} s"
        time.sleep(0.1)


def _first_line(exc: Exception) -> str:
    """Why a question to Postgres failed, in one redacted line (a URL may hold a password)."""
    from runbook.redact import redact

    said = (str(exc) or type(exc).__name__).splitlines()[0]
    return redact(said)[:200]


def transaction_outcome(env: Environment, txid: int,
                        heartbeat: Callable[[], None] = lambda: None) -> str:
    """Postgres's word on a transaction: "committed", "aborted", or why it cannot tell: still
    "in progress" after OUTCOME_WAIT, forgotten, or no answer for UNANSWERED_WAIT (the
    database unreachable, or a server before 10, which has no txid_status)."""
    deadline = time.monotonic() + OUTCOME_WAIT
    answered = time.monotonic()  # when Postgres last answered
    while True:
        heartbeat()
        try:
            with database.connect(env) as conn:
                row = conn.execute("SELECT txid_status(%s)", (txid,)).fetchone()
            status = str(row[0]) if row and row[0] is not None else "forgotten by the server"
            answered = time.monotonic()
        except Exception as exc:  # unreachable, or an id it never issued: cannot tell yet
            status = f"asking failed: {_first_line(exc)}"
        if status in ("committed", "aborted", "forgotten by the server"):
            return status
        now = time.monotonic()
        if now > deadline or now - answered > UNANSWERED_WAIT:
            return status
        time.sleep(0.2)


MISMATCH_MARK = "runbook: the restored database does not match the snapshot: "


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def in_transaction_check(snap: Snapshot) -> bytes:
    """The row counts the sidecar recorded, compared inside the restore's own transaction,
    right before COMMIT: the tables it created are invisible to every other session until
    then, so the count is the dump's alone. A mismatch raises, psql stops (ON_ERROR_STOP)
    and rolls back: the database stays as it was. Counted after COMMIT instead, a writer
    that connects for each INSERT (a cron job) wrote in between, and the check failed a
    restore that was exact, with the app left stopped (review H2). Empty when the sidecar
    recorded no counts (the check after the commit says so)."""
    if not snap.tables:
        return b""
    checks = []
    keys = []
    for key, stats in sorted(snap.tables.items()):
        schema, _, table = key.rpartition(".")
        qualified = f"{_ident(schema or 'public')}.{_ident(table)}"
        keys.append(_literal(f"{schema or 'public'}.{table}"))
        checks.append(
            f"IF to_regclass({_literal(qualified)}) IS NULL THEN problems := problems || "
            f"format('table %s is missing', {_literal(key)}); ELSE EXECUTE "
            f"{_literal('SELECT count(*) FROM ' + qualified)} INTO counted; "
            f"IF counted <> {int(stats.rows)} THEN problems := problems || "
            f"format('%s has %s rows, the snapshot recorded %s', "
            f"{_literal(key)}, counted, {int(stats.rows)}); END IF; END IF;")
    extra = (
        "SELECT string_agg(CASE WHEN n.nspname = 'public' THEN c.relname::text ELSE "
        "n.nspname || '.' || c.relname END, ', ') INTO others FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND NOT "
        "c.relispartition AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND "
        "n.nspname NOT LIKE 'pg\\_%' AND n.nspname || '.' || c.relname NOT IN ("
        + ", ".join(keys) + "); IF others IS NOT NULL THEN problems := problems || "
        "('tables not in the snapshot: ' || others); END IF;")
    body = (
        "DO $runbook$ DECLARE counted bigint; others text; problems text[] := '{}'; BEGIN "
        + " ".join(checks) + " " + extra
        + " IF cardinality(problems) > 0 THEN RAISE EXCEPTION '%', "
        + _literal(MISMATCH_MARK) + " || array_to_string(problems, '; '); END IF; "
        "END $runbook$;\n")
    return body.encode()


def check_matches(env: Environment, run: RestoreRun) -> str:
    """After the replay: schema_migrations and every recorded row count match the snapshot.

    The row counts were proved inside the restore's transaction (in_transaction_check);
    counted again here, after COMMIT, a table that only grew is another session's writes
    since the commit (a worker, a cron job), said as that in `run.written_since`, never a
    failed restore: one did stop the service for a restore that was exact (review H2)."""
    schema, stats = current_state(env)
    want = run.verified
    problems = []
    grew = []
    if (schema.version, schema.dirty) != (want.migration_version, want.dirty):
        problems.append(f"schema_migrations is {schema.describe()}, the snapshot holds "
                        f"{want.migration_version}{' (dirty)' if want.dirty else ''}")
    for table, old in run.snapshot.tables.items():
        now = stats.get(table)
        if now is None:
            problems.append(f"table {table} is missing")
        elif now.rows > old.rows and run.restored:
            grew.append(f"{table} {now.rows - old.rows}")
        elif now.rows != old.rows:
            problems.append(f"{table} has {now.rows} rows, the snapshot recorded {old.rows}")
    if grew:
        run.written_since = (
            "the restore's own transaction matched every recorded row count before its "
            "COMMIT; since then another session wrote rows (" + ", ".join(grew) + "): a "
            "writer other than the app slots is live on the database (a worker, a cron job): "
            "its writes are in the restored database")
    extra = sorted(set(stats) - set(run.snapshot.tables)) if run.snapshot.tables else []
    if extra:
        problems.append("tables not in the snapshot: " + ", ".join(extra))
    if problems:
        raise RunbookError(
            "the restored database does not match the snapshot: " + "; ".join(problems),
            "do not start the app on it; investigate, or restore the safety snapshot "
            f"{run.safety.path if run.safety else '(none)'}", exit_code=ExitCode.ATTENTION)
    counted = ", ".join(f"{k} {v.rows}" for k, v in sorted(stats.items()))
    return f"schema {schema.describe()}; rows: {counted or 'no tables'}"


def after_failed_replay(env: Environment, run: RestoreRun, exc: RunbookError,
                         safety: Path | None) -> RunbookError:
    """Prove the rollback left the data as it was (compare with the safety snapshot). The
    safety snapshot is offered as the way back only where the database could not be proved
    unchanged: unchanged, a restore of it drops every write made since it was taken (found
    by review: 110 rows a reconnecting worker wrote after it, advice followed)."""
    kept = (f"the safety snapshot {safety} holds the data as it was when this run took it; "
            "do not restore it: the database is unchanged, and a restore of it would drop "
            "the writes made since" if safety else "no safety snapshot was taken")
    back = (f"the safety snapshot {safety} holds the data as it was when this run took it; "
            f"if the database is not as it was, restore it with `runbook snapshot restore "
            f"{command_arg(env)} {safety.name}` (that drops any write made after it was "
            "taken)" if safety else "no safety snapshot was taken")
    if isinstance(exc, ReplayFailed):  # COMMIT never sent, or Postgres says it aborted
        return RunbookError(f"{exc.message}; the database is unchanged",
                            f"fix the cause and run again; {kept}",
                            exit_code=ExitCode.FAILED_SAFELY)
    same = False
    with contextlib.suppress(Exception):
        if run.safety is not None and run.safety.tables:
            schema, stats = current_state(env)
            same = (schema.version == run.safety.migration_version
                    and {k: v.rows for k, v in stats.items()}
                    == {k: v.rows for k, v in run.safety.tables.items()})
    if same:
        return RunbookError(f"{exc.message}; the database is unchanged",
                            f"fix the cause and run again; {kept}",
                            exit_code=ExitCode.FAILED_SAFELY)
    return RunbookError(f"{exc.message}, but the database could not be proved unchanged",
                        f"check it now; {back}", exit_code=ExitCode.ATTENTION)
