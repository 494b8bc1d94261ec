"""Other sessions on the database a restore replaces: what could write after its safety
snapshot and lose that write to the DROP.

The safety snapshot is taken once the app slots are stopped, on the promise that nothing
writes any more: a write made after its export and before the restore's DROP would be in
neither the safety snapshot nor the restored database. The app slots are not the only
writers a host has (a worker, a cron job, an operator's psql, a pooler's server
connections), so the restore asks Postgres who else is connected to this database, right
before the safety snapshot (refused, or ended with --end-sessions) and again inside the
restore's own transaction once its DROPs hold every table (refused: rolled back).

A session of another role is shown to a user without pg_read_all_stats with its details
hidden (backend_type too); it is counted, never guessed away: fail closed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from runbook import database
from runbook.environment import Environment
from runbook.snapshots.commands import RESTORE_APP

WAIT = 5.0  # for the sessions of the containers just stopped, or a probe's, to end
SETTLE = 0.5  # seen with no other session this long: none is there
# Every process on this database that a role runs, but ours: client sessions, and background
# workers that write (a logical replication apply worker, pg_cron's); Postgres's own
# (autovacuum, the checkpointer) have no role. A walsender only reads (logical decoding).
# A row whose type this user may not see counts: fail closed.
WHO = ("datname = current_database() AND pid <> pg_backend_pid() AND usesysid IS NOT NULL "
       "AND coalesce(backend_type, '') <> 'walsender'")
SESSIONS_SQL = (
    "SELECT pid, coalesce(usename, ''), coalesce(application_name, ''), "
    "coalesce(host(client_addr), ''), coalesce(state, ''), "
    "coalesce(to_char(state_change AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), ''), "
    f"backend_type IS NULL FROM pg_stat_activity WHERE {WHO} ORDER BY pid")
# The same question inside the restore's transaction, after its DROPs: waits up to 3 s for
# such sessions to end (one connecting for a moment, the safety snapshot's own exiting),
# then raises, and psql rolls back. pg_stat_activity is read once per transaction unless
# its snapshot is cleared: without that, the loop saw its first reading 30 times.
IN_TRANSACTION = (
    "DO $runbook$ DECLARE others text; BEGIN FOR i IN 1..30 LOOP "
    "PERFORM pg_stat_clear_snapshot(); "
    "SELECT string_agg(format('%s (user %s%s)', pid, coalesce(usename, '?'), "
    "CASE WHEN coalesce(application_name, '') <> '' THEN ', application ' || application_name "
    "ELSE '' END), ', ') INTO others FROM pg_stat_activity WHERE " + WHO + "; "
    "EXIT WHEN others IS NULL; PERFORM pg_sleep(0.1); END LOOP; "
    "IF others IS NOT NULL THEN RAISE EXCEPTION 'runbook: another session is connected to "
    "the database (since or during the safety snapshot): %; a write it made since would be "
    "lost, so nothing was restored', others; END IF; END $runbook$;\n")


@dataclass(frozen=True)
class Session:
    pid: int
    user: str
    application: str
    client: str
    state: str
    since: str
    hidden: bool  # this user may not see its details (another role's, no pg_read_all_stats)

    def describe(self) -> str:
        if self.application == RESTORE_APP:  # its psql: found only while its run lives
            return (f"session {self.pid} (a runbook restore's psql: a restore running from "
                    "another host or environment on this database, or one a killed run left)")
        if self.hidden:
            return (f"session {self.pid} (user {self.user or '?'}; its details are hidden "
                    "from this database user)")
        parts = [f"user {self.user}" if self.user else "",
                 f"application {self.application!r}" if self.application else "",
                 f"from {self.client}" if self.client else "local socket",
                 f"{self.state} since {self.since}" if self.state and self.since else self.state]
        return f"session {self.pid} ({', '.join(p for p in parts if p)})"


def other(env: Environment) -> list[Session]:
    """Every other client session on this environment's database, now."""
    with database.connect(env) as conn:
        rows = conn.execute(SESSIONS_SQL).fetchall()
    return [Session(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]),
                    r[6] in (True, "t", "true")) for r in rows]


def wait_alone(env: Environment, heartbeat: Callable[[], None] = lambda: None,
               wait: float = WAIT, settle: float = SETTLE) -> list[Session]:
    """The sessions still there after up to `wait` seconds: a stopped container's backends
    end a moment after it, and a probe's (pg_isready, a monitor) within a second. None only
    once none was seen for `settle` seconds: a pooler or a worker that reconnects the moment
    it is ended leaves gaps a single reading can fall into."""
    deadline = time.monotonic() + wait
    empty_since: float | None = None
    while True:
        heartbeat()
        found = other(env)
        now = time.monotonic()
        if found:
            empty_since = None
            if now > deadline:
                return found
        else:
            empty_since = now if empty_since is None else empty_since
            if now - empty_since >= settle:
                return []
        time.sleep(0.05)


def end(env: Environment, found: list[Session],
        heartbeat: Callable[[], None] = lambda: None) -> list[Session]:
    """End `found` (pg_terminate_backend: their open transactions roll back) and wait for
    them to be gone; the ones still there after WAIT (not ours to end: another role's
    without pg_signal_backend)."""
    pids = [s.pid for s in found]
    for pid in pids:  # one connection each: a refusal ends a `docker exec` psql connection
        with contextlib.suppress(Exception), database.connect(env) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))  # not ours: left, said
    deadline = time.monotonic() + WAIT
    while True:
        heartbeat()
        left = [s for s in other(env) if s.pid in pids]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def refusal_text(found: list[Session]) -> str:
    return "; ".join(s.describe() for s in found)
