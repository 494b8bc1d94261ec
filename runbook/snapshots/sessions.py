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

WAIT = 5.0  # for the sessions of the containers just stopped, or a probe's, to end
# Client sessions on this database but ours; a row whose type this user may not see counts
# when a role owns it (Postgres's own background processes have none, or none here).
WHO = ("datname = current_database() AND pid <> pg_backend_pid() AND "
       "(backend_type = 'client backend' OR (backend_type IS NULL AND usename IS NOT NULL))")
SESSIONS_SQL = (
    "SELECT pid, coalesce(usename, ''), coalesce(application_name, ''), "
    "coalesce(host(client_addr), ''), coalesce(state, ''), "
    "coalesce(to_char(state_change AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), ''), "
    f"backend_type IS NULL FROM pg_stat_activity WHERE {WHO} ORDER BY pid")
# The same question inside the restore's transaction, after its DROPs: waits up to 3 s for
# such sessions to end (one connecting for a moment), then raises, and psql rolls back.
IN_TRANSACTION = (
    "DO $runbook$ DECLARE found text; BEGIN FOR i IN 1..30 LOOP "
    "SELECT string_agg(format('%s (user %s%s)', pid, coalesce(usename, '?'), "
    "CASE WHEN coalesce(application_name, '') <> '' THEN ', application ' || application_name "
    "ELSE '' END), ', ') INTO found FROM pg_stat_activity WHERE " + WHO + "; "
    "EXIT WHEN found IS NULL; PERFORM pg_sleep(0.1); END LOOP; "
    "IF found IS NOT NULL THEN RAISE EXCEPTION 'runbook: another session connected to the "
    "database after the safety snapshot was taken: %; a write it made since would be lost, "
    "so nothing was restored', found; END IF; END $runbook$;\n")


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
               wait: float = WAIT) -> list[Session]:
    """The sessions still there after up to `wait` seconds: a stopped container's backends
    end a moment after it, and a probe's (pg_isready, a monitor) within a second."""
    deadline = time.monotonic() + wait
    while True:
        heartbeat()
        found = other(env)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def end(env: Environment, found: list[Session],
        heartbeat: Callable[[], None] = lambda: None) -> list[Session]:
    """End `found` (pg_terminate_backend: their open transactions roll back) and wait for
    them to be gone; the ones still there after WAIT (not ours to end: another role's
    without pg_signal_backend)."""
    pids = [s.pid for s in found]
    with database.connect(env) as conn:
        for pid in pids:
            with contextlib.suppress(Exception):  # not ours to end: still there, said below
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    deadline = time.monotonic() + WAIT
    while True:
        heartbeat()
        left = [s for s in other(env) if s.pid in pids]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def refusal_text(found: list[Session]) -> str:
    return "; ".join(s.describe() for s in found)
