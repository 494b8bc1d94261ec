"""Other sessions on the database a restore replaces: what could write after its safety
snapshot and lose that write to the DROP.

The safety snapshot is taken once the app slots are stopped, on the promise that nothing
writes any more: a write made after its export and before the restore's DROP would be in
neither the safety snapshot nor the restored database. The app slots are not the only
writers a host has (a worker, a cron job, an operator's psql, a pooler's server
connections), so the restore asks Postgres who else is connected to this database, right
before the safety snapshot (refused, or ended with --end-sessions) and again inside the
restore's own transaction once its DROPs hold every table (refused: rolled back). One the
first check would refuse that is provably not the app slots' is refused while planning,
before they stop (refuse_before_stop): stopping them for that refusal was an outage for
nothing. One the runbook cannot tell from theirs (a client through the published port, seen
at Docker's gateway address) is named in the plan's warnings instead (`unproven_warning`):
the check after the stop still refuses it should it outlive the stop.

Both checks sample pg_stat_activity: a writer that connects only for a moment for each
write (a cron job's `psql -c "INSERT ..."`) can fall between the samples, and what it writes
while the safety snapshot is taken is then in neither it nor the restored database. The plan
says so; proving that nothing committed since the safety snapshot's export (review H1) is
not done here.

A session of another role is shown to a user without pg_read_all_stats with its details
hidden (backend_type too); it is counted, never guessed away: fail closed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from runbook import database
from runbook.environment import Environment
from runbook.snapshots.commands import RESTORE_APP

WAIT = 5.0  # for the sessions of the containers just stopped, or a probe's, to end
SETTLE = 0.5  # seen with no other session this long: none is there
GLANCE = 1.0  # an unproven session still there after this long is named in the plan
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
    "backend_type IS NULL, "
    # whether pg_terminate_backend would end it: a superuser ends any; a superuser's session
    # only a superuser; another's, its role's members and pg_signal_backend's
    "coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false) OR "
    "coalesce(NOT (SELECT rolsuper FROM pg_roles WHERE oid = usesysid) AND "
    "(pg_has_role(usesysid, 'USAGE') OR pg_has_role('pg_signal_backend', 'USAGE')), false), "
    "coalesce((SELECT rolsuper FROM pg_roles WHERE oid = usesysid), false) "
    f"FROM pg_stat_activity WHERE {WHO} ORDER BY pid")
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
    endable: bool = True  # this user may end it (pg_terminate_backend)
    superuser: bool = False  # a superuser's: only a superuser may end it

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
                    *(r[i] in (True, "t", "true") for i in (6, 7, 8))) for r in rows]


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


STOP_THEM = "stop what they belong to (a worker, a cron job, a psql, a pooler)"
END_THEM = "run again with --end-sessions to end them (their open transactions roll back)"


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client address as Docker writes its containers' (an IPv4 client of an IPv6
    socket as its IPv4 address); None when it is not one."""
    try:
        found = ipaddress.ip_address(text)
    except ValueError:
        return None
    return (found.ipv4_mapped or found) if isinstance(found, ipaddress.IPv6Address) else found


def _overlap(one: str, other: str) -> bool:
    """Whether two mounted host paths share files (one is the other or inside it)."""
    a, b = PurePosixPath(one), PurePosixPath(other)
    return a == b or a in b.parents or b in a.parents


@dataclass(frozen=True)
class Judged:
    """The visible sessions on the database, as the app slots' stop would leave them."""

    not_the_apps: list[Session]  # provably another's: the stop ends none of them
    # neither an app slot's container's nor provably another's: the stop may end them
    unproven: list[Session]


def judge(env: Environment, found: list[Session]) -> Judged:
    """`found`'s visible sessions judged by their client address. Provably not the app
    slots' (whose role this user cannot know: the app may connect as another than the
    runbook's), so stopping them ends none of them: a client address of another running
    container on Docker's networks, or one inside the database container itself (its Unix
    socket, shared with no app slot through a mount, or its loopback). An app slot's: a
    running slot container's address. Any doubt (an address a NAT or the published port's
    proxy gives, a namespace shared with the host or a container, Docker unreadable) is
    unproven: never refused while planning, the check after the stop still fails closed.
    A session whose details are hidden is in neither list: nothing can be said of it."""
    from runbook import docker
    from runbook.errors import RunbookError

    visible = [s for s in found if not s.hidden]
    if not visible:
        return Judged([], [])
    try:
        running = docker.running_containers()
    except RunbookError:
        return Judged([], visible)
    slots = {env.slot(s).container for s in env.slots}
    apps = [c for c in running if c.name in slots]
    db = next((c for c in running if c.name == env.database.container), None)
    if db is None or any(c.network_mode.startswith(("host", "container:"))
                         for c in [*apps, db]):
        return Judged([], visible)
    theirs = {_address(ip) for c in apps for ip in c.ips} - {None}
    others = {_address(ip) for c in running if c.name not in slots and c is not db
              for ip in c.ips} - theirs - {None}
    socket_shared = any(_overlap(mine, its) for c in apps for mine in c.mounts
                        for its in db.mounts)

    def provably_not(session: Session) -> bool:
        if not session.client:  # its Unix socket, or a background worker of its own
            return not socket_shared
        address = _address(session.client)
        return address is not None and (address.is_loopback or address in others)

    def an_app_slots(session: Session) -> bool:
        return bool(session.client) and _address(session.client) in theirs

    provably = [s for s in visible if provably_not(s)]
    return Judged(provably, [s for s in visible
                             if s not in provably and not an_app_slots(s)])


def unproven_warning(session: Session, end_sessions: bool, drained_first: bool = False
                     ) -> str:
    """The plan's warning of a session the runbook cannot tell from the app slots' (found by
    a plan-fidelity review: the dry run said nothing, and the real run stopped the serving
    slot, then refused it: exit 1, the app down for seconds, users got errors).
    `drained_first`: the fleet's maintenance restore, which runs once every host is drained."""
    what = (f"{session.describe()} cannot be told from the app slots' (its client address is "
            "neither an app slot container's nor provably another client's)")
    refused = ("the restore is refused then, with the service down for a few seconds until "
               "the app slots are started again")
    stop = "stop what it belongs to (a worker, a cron job, a psql, a pooler)"
    if drained_first:
        # the fleet's maintenance restore, planned before its drain: another host's app pool
        # connects from that host's address, so is unproven here, and the drain ends it
        # (found by review: the single-host advice had on-call stop the app by hand)
        what += ("; the fleet's drain of every host ends the app's sessions before this "
                 "restore; if it is still connected after the drain, ")
        if end_sessions and session.endable:
            return what + "--end-sessions ends it (its open transaction rolls back)"
        refusal = "the restore refuses it and every drained host is started again"
        if end_sessions:
            return what + f"{refusal} (this database user may not end it: stop it first)"
        return what + f"{refusal} (one that is not an app's: stop it, or add --end-sessions)"
    if end_sessions and session.endable:
        return (f"{what}: if it is still connected once the app slots are stopped, "
                "--end-sessions ends it (its open transaction rolls back)")
    if end_sessions:
        return (f"{what}: if it is still connected once the app slots are stopped, this "
                f"database user may not end it, so {refused}; {stop} first")
    return (f"{what}: if it is still connected once the app slots are stopped, {refused}; "
            f"{stop} first, or run with --end-sessions to end it")


def refuse_before_stop(env: Environment, database_name: str,
                       end_sessions: bool) -> list[Session]:
    """Refuse now, before the app slots stop (PreconditionError, nothing changed), when a
    session is connected that the check after the stop would refuse: one provably not the
    app slots' (judge), and, with --end-sessions, one this user may not end. Found by
    review: such a session was seen while planning, and the run stopped the app only to
    refuse it then: an outage for nothing. Returns the unproven sessions still connected
    (judge), for the plan to name (unproven_warning)."""
    from runbook.errors import PreconditionError

    judged = judge(env, other(env))
    found, unproven = judged.not_the_apps, judged.unproven
    blocking = [s for s in found if not s.endable] if end_sessions else found
    # only one still there after WAIT, as the check after the stop waits: one ending now
    # (a probe's, or this run's own psql of a moment ago) is not refused; an unproven one
    # still there after GLANCE is named (this run's own connections of a moment ago, seen
    # through the published port as any client is, are not)
    began = time.monotonic()
    while (blocking and time.monotonic() < began + WAIT) or (
            unproven and time.monotonic() < began + GLANCE):
        time.sleep(0.2)
        still = {(s.pid, s.user, s.client) for s in other(env)}
        blocking = [s for s in blocking if (s.pid, s.user, s.client) in still]
        unproven = [s for s in unproven if (s.pid, s.user, s.client) in still]
    if not blocking:
        return unproven
    with database.connect(env) as conn:
        row = conn.execute("SELECT quote_ident(current_user)").fetchone()
    me = str(row[0]) if row else "<runbook database user>"
    unendable = [s for s in blocking if not s.endable]
    grant = (f"`GRANT pg_signal_backend TO {me}` (as a superuser), or end them as their own "
             "role or a superuser (`SELECT pg_terminate_backend(PID)`)"
             + ("; a superuser's session only a superuser may end"
                if any(s.superuser for s in unendable) else ""))
    if end_sessions:
        raise PreconditionError(
            f"other sessions are connected to database {database_name} that this database "
            f"user ({me}) may not end, and stopping the app slots would not end them: "
            f"{refusal_text(blocking)}; --end-sessions would stop the app and then fail to "
            "end them, so the restore was refused before the app slots stopped; nothing was "
            "changed", f"{grant}, or {STOP_THEM}, then run again")
    may_not = (f"; this database user may not end {', '.join(str(s.pid) for s in unendable)}:"
               f" {grant}" if unendable else "")
    raise PreconditionError(
        f"other sessions are connected to database {database_name} that stopping the app "
        f"slots would not end: {refusal_text(blocking)}; a write one made after the safety "
        "snapshot would be in neither it nor the restored database, so the restore was "
        "refused before the app slots stopped; nothing was changed",
        f"{STOP_THEM}, or {END_THEM}{may_not}")
