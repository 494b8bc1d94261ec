"""Snapshot files: names, sidecars, listing, lookup and retention (no database access).

File names follow the contract: `togather_<db>_<YYYYMMDD_HHMMSS UTC>_<reason>.sql.gz` with a
`<same stem>.meta.json` sidecar (mode 0644: every operator's cleanup reads it; written
atomically by runbook/files.py; the dump stays 0600). What a sidecar says is read leniently: a
file without one still lists, with its problems named; one that exists but cannot be read
(`Snapshot.unread`) is never taken for none where that decides what is kept or restored.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import stat
import time
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from runbook import files, procs
from runbook.environment import Environment, command_arg
from runbook.errors import ExitCode, PreconditionError, RunbookError

if TYPE_CHECKING:
    from runbook import state as states
    from runbook.snapshots.commands import Target
from runbook.times import format_utc as _fmt
from runbook.times import parse_utc as _utc
from runbook.times import rough_duration

SUFFIX = ".sql.gz"
META_SUFFIX = ".meta.json"
PREFIX = "togather_"
SAFETY_REASON = "pre-restore"  # a restore's safety snapshot (snapshot_restore.py)
NAME_RE = re.compile(r"^togather_(?P<db>.+?)_(?P<date>\d{8})_(?P<time>\d{6})_(?P<reason>.+)$")
# seconds: a snapshot dated further after now was taken while the clock ran fast (set back
# since), as a lock dated so is (runbook/lock/policy.py's FUTURE_SLACK, the same slack)
FUTURE_SLACK = 300.0


class SnapshotError(RunbookError):
    """A snapshot file or request is unusable; nothing was changed."""

    exit_code = ExitCode.USAGE


class UnreadSidecarError(SnapshotError):
    """A default pick could be a snapshot whose sidecar this user cannot read (root's, 0600):
    whether it is the one to restore cannot be told (found by review: read as "no sidecar",
    the pre-deploy snapshot was passed over for an older one, or for none)."""

    exit_code = ExitCode.PRECONDITION

    def __init__(self, snap: Snapshot, fix: str) -> None:
        super().__init__(f"the sidecar of snapshot {snap.name} cannot be read ({snap.unread}), "
                         "so whether it is the one to restore cannot be told; nothing was "
                         "changed", f"run as its owner or root, or {fix}")
        self.snapshot = snap


class FutureSnapshotError(SnapshotError):
    """A default pick would be a snapshot dated in the future: which one is the newest
    cannot be told (found by review: a snapshot taken while the clock ran 2 h fast was
    restored over the newer one taken after NTP set it back, its writes lost)."""

    exit_code = ExitCode.PRECONDITION

    def __init__(self, snap: Snapshot, ahead: float, fix: str) -> None:
        super().__init__(f"snapshot {snap.name} is dated {rough_duration(ahead)} in the future "
                         f"({_fmt(snap.timestamp)}): the clock was likely set back since it was "
                         "taken, so which snapshot is the newest cannot be told; nothing was "
                         "changed", fix)
        self.snapshot = snap
        self.ahead = ahead


@dataclass(frozen=True)
class TableStats:
    rows: int
    max_created_at: str | None = None  # text as Postgres prints it; None without the column
    has_created_at: bool = False


@dataclass(frozen=True)
class Snapshot:
    """One `.sql.gz` and what its sidecar says (meta is None for a file without one)."""

    path: Path
    meta: Mapping[str, Any] | None = None
    problems: tuple[str, ...] = ()
    # why its sidecar, which exists, could not be read (Permission denied): what it says is
    # unknown here, not absent (root's 0600 sidecar, read by another operator)
    unread: str = ""

    def __hash__(self) -> int:  # meta is a dict: hash by the file, equal by content
        return hash(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def stem(self) -> str:
        return self.path.name.removesuffix(SUFFIX)

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.stem + META_SUFFIX)

    def _m(self, key: str) -> Any:
        return (self.meta or {}).get(key)

    @property
    def environment(self) -> str | None:
        """The environment the runbook's sidecar says took it (the tooling records none)."""
        value = self._m("environment")
        return str(value) if value else None

    @property
    def names_server(self) -> bool:
        """Whether its sidecar says which server it was dumped from (host or port)."""
        return any(self._m(key) not in (None, "") for key in ("host", "port"))

    @property
    def database(self) -> str | None:
        if self._m("database"):
            return str(self._m("database"))
        match = NAME_RE.match(self.stem)
        return match["db"] if match else None

    @property
    def timestamp(self) -> datetime:
        """Its sidecar's time, else its name's (UTC, by the contract), else its mtime. A
        sidecar time without an offset (another tool's, in the host's local time) gives way
        to the name's: which zone it was written in cannot be told."""
        raw = self._m("timestamp")
        named = _named_time(self.stem)
        if named is not None and _naive(raw):
            return named
        if (value := _in_utc(raw)) is not None:
            return value
        if named is not None:
            return named
        try:
            return datetime.fromtimestamp(self.path.stat().st_mtime, UTC)
        except OSError:
            return datetime.fromtimestamp(0, UTC)

    def ahead(self, now: datetime | None = None) -> float | None:
        """Seconds it is dated after `now`, when more than FUTURE_SLACK: taken while the clock
        ran fast (set back since), so its age, and whether it is newer than another, cannot
        be told from its name, sidecar or mtime (all carry that clock). Else None."""
        seconds = (self.timestamp - (now or datetime.now(UTC))).total_seconds()
        return seconds if seconds > FUTURE_SLACK else None

    @property
    def reason(self) -> str:
        if self._m("reason"):
            return str(self._m("reason"))
        match = NAME_RE.match(self.stem)
        return match["reason"] if match else ""

    @property
    def migration_version(self) -> int | None:
        value = self._m("migration_version")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def migrations_table(self) -> str | None:
        """The schema_migrations migration_version was read from (`app.schema_migrations`),
        qualified as pg_dump writes it; None when the sidecar names none (the tooling's)."""
        value = self._m("migrations_table")
        return value if isinstance(value, str) and value else None

    @property
    def dirty(self) -> bool:
        return bool(self._m("dirty"))

    @property
    def sha256(self) -> str | None:
        return self._m("sha256") or None

    @property
    def deployment_id(self) -> str:
        return str(self._m("deployment_id") or "")

    @property
    def warning(self) -> str | None:
        """What its taking found that on-call must hear (dump.create), e.g. large objects
        the restore refuses."""
        value = self._m("warning")
        return str(value) if value else None

    @property
    def git_commit(self) -> str:
        return str(self._m("git_commit") or "")

    @property
    def tables(self) -> dict[str, TableStats]:
        raw = self._m("tables")
        if not isinstance(raw, Mapping):
            return {}
        out = {}
        for key, value in raw.items():
            if isinstance(value, Mapping) and isinstance(value.get("rows"), int):
                out[str(key)] = TableStats(value["rows"], value.get("max_created_at"),
                                           bool(value.get("has_created_at")))
        return out

    def expires_at(self, retention_days: int) -> datetime:
        """Its own expires_at when recorded, else taken + its own retention_days (what it
        was taken to be kept for: the host's tooling may keep 30 where we keep 7), else
        taken + the environment's retention."""
        own = _in_utc(self._m("expires_at"))
        if own is not None:
            return own
        kept_for = self._m("retention_days")
        if isinstance(kept_for, int) and not isinstance(kept_for, bool) and kept_for > 0:
            retention_days = kept_for
        taken = self.timestamp
        if _naive(raw := self._m("timestamp")):  # its name's time: never sooner than the
            taken = max(taken, _in_utc(raw) or taken)  # sidecar's, in either reading
        try:
            return taken + timedelta(days=retention_days)
        except OverflowError:  # a sidecar dated near year 9999: `snapshot list` and the
            return datetime.max.replace(tzinfo=UTC)  # cleanup crashed, exit 5; never expires

    @property
    def size_bytes(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    @property
    def usable(self) -> bool:
        """Good enough for latest_before(): a sidecar with a version, a checksum, not dirty."""
        return (not self.problems and self.meta is not None and self.sha256 is not None
                and self.migration_version is not None and not self.dirty
                and self.path.exists())

    def describe(self) -> str:
        schema = "?" if self.migration_version is None else str(self.migration_version)
        return (f"{self.name} (taken {_fmt(self.timestamp)}, schema {schema}"
                f"{', dirty' if self.dirty else ''}, reason {self.reason or '?'})")

    def to_json(self, retention_days: int = 7) -> dict[str, Any]:
        return {
            "name": self.name, "path": str(self.path),
            "meta_path": str(self.meta_path) if self.meta is not None else None,
            "database": self.database, "timestamp": _fmt(self.timestamp), "reason": self.reason,
            "migration_version": self.migration_version, "dirty": self.dirty,
            "git_commit": self.git_commit, "deployment_id": self.deployment_id,
            "size_mb": round(self.size_bytes / 1048576, 3), "sha256": self.sha256,
            "expires_at": _fmt(self.expires_at(retention_days)),
            "tables": {k: v.rows for k, v in self.tables.items()},
            "problems": list(self.problems), "dated_in_future": self.ahead() is not None,
            "warning": self.warning,
        }


def _out_of_range(value: object) -> bool:
    """A sidecar time that parses but is past year 9999 once in UTC
    (`9999-12-31T23:00:00-05:00`): formatting it overflowed, ending `snapshot list` and the
    cleanup in exit 5."""
    parsed = _utc(value)
    if parsed is None:
        return False
    try:
        parsed.astimezone(UTC)
    except OverflowError:
        return True
    return False


def _in_utc(value: object) -> datetime | None:
    """A sidecar time in UTC (parse_utc's reading), or None; one out of range (load() names
    it as a problem) is the far future, never the past: a snapshot is not deleted for it.
    One without an offset is the later of its readings as UTC and as the host's local time
    (another tool may write local time: read as UTC west of UTC, a snapshot expired hours
    early; found by review)."""
    parsed = _utc(value)
    if parsed is None:
        return None
    try:
        if _naive(value):
            bare = parsed.replace(tzinfo=None)  # both folds: an hour the clocks repeat
            return max(parsed, *(bare.replace(fold=f).astimezone(UTC) for f in (0, 1)))
        return parsed.astimezone(UTC)
    except (OverflowError, OSError, ValueError):
        return datetime.max.replace(tzinfo=UTC)


def _naive(value: object) -> bool:
    """A sidecar time that parses but carries no UTC offset (`2026-12-07T10:00:00`)."""
    if not isinstance(value, str) or _utc(value) is None:
        return False
    return datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is None


def _named_time(stem: str) -> datetime | None:
    """The UTC time a contract name carries (`togather_<db>_<YYYYMMDD_HHMMSS>_<reason>`)."""
    match = NAME_RE.match(stem)
    if match is None:
        return None
    try:
        return datetime.strptime(match["date"] + match["time"], "%Y%m%d%H%M%S").replace(
            tzinfo=UTC)
    except ValueError:
        return None


META_MAX = 1 << 20  # a sidecar is a few hundred bytes; a larger file is not one


def load(path: Path) -> Snapshot:
    """Read a snapshot and its sidecar; an unreadable sidecar is a problem, not a crash."""
    stem = path.name.removesuffix(SUFFIX)
    meta_path = path.with_name(stem + META_SUFFIX)
    problems: list[str] = []
    meta: dict[str, Any] | None = None
    unread = ""
    if meta_path.exists():
        try:
            # never a blocking read: a FIFO named like a sidecar hung every listing for ever
            loaded = json.loads(files.read_regular(meta_path, META_MAX, follow=True))
            if isinstance(loaded, dict):
                meta = loaded
            else:
                problems.append(f"{meta_path.name} is not a JSON object")
        except (OSError, ValueError) as exc:
            problems.append(f"cannot read {meta_path.name}: {exc}")
            if isinstance(exc, OSError) and not isinstance(exc, files.NotAFile):
                unread = exc.strerror or str(exc)  # another user's may say what we cannot
        except RecursionError:  # `[[[[...`: a crash (exit 5) of list and cleanup, not a problem
            problems.append(f"cannot read {meta_path.name}: it is nested too deeply")
    for key in ("timestamp", "expires_at"):
        value = (meta or {}).get(key)
        if _out_of_range(value):
            problems.append(f"{meta_path.name}: its {key} {value!r} is out of range (after "
                            "year 9999 in UTC): read as the far future")
    if not path.exists():
        problems.append(f"{path.name} is missing")
    return Snapshot(path, meta, tuple(problems), unread)


def list_snapshots(env: Environment) -> list[Snapshot]:
    """Every snapshot in the environment's folder, newest first (see _scan for what is not)."""
    found = [load(p) for p in _scan(env.database.snapshot_dir)[0]]
    return sorted(found, key=lambda s: (s.timestamp, _mtime_ns(s.path), s.name), reverse=True)


_PARTIAL_RE = re.compile(r"^\..+\.sql\.gz\.[0-9a-f]{8}\.partial$")  # dump.create's
PARTIAL_GRACE = 10.0  # seconds: a partial this young may not be flocked by its writer yet


def dead_partials(directory: Path, *, remove: bool = False) -> list[Path]:
    """Our unfinished dumps whose writer is gone: a writer holds a flock on its `.partial`
    from its creation until the dump is named, so one whose lock can be taken was left by a
    killed run. Such a file waited a day for cleanup, and the rerun of the run it belonged
    to found the disk still full of it: "finish without hand edits" failed."""
    found: list[Path] = []
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return found
    now = time.time()
    for path in entries:
        if not _PARTIAL_RE.match(path.name):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < PARTIAL_GRACE:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer holds it: a dump still running
            if remove:
                try:
                    path.unlink()
                except OSError:
                    continue
            found.append(path)
        finally:
            os.close(fd)
    return found


def own_snapshots(env: Environment) -> list[Snapshot]:
    """This environment's database's snapshots, newest first: what a default pick or a
    schema witness may use. The folder may be shared (the default one is): another
    database's snapshot taken while the target was live said which schema it "ran with", and
    was picked to restore (then refused by its verification, over a usable one of ours)."""
    here = server_or_none(env)
    return [s for s in list_snapshots(env) if whose(env, s, here) is None]


LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_ADDRESS = frozenset({"0.0.0.0", "::"})  # every address of this host, as Docker binds it


def _host_key(host: str) -> str:
    """A host as compared: the loopback names are one server, names are case-blind."""
    name = host.strip().strip("[]").lower()
    return "localhost" if name in LOOPBACK else name


@dataclass(frozen=True)
class Server:
    """This environment's database server and every address that reaches it, read once per
    listing, pick or cleanup (one `docker inspect`), not per snapshot.

    The URL names it as the runbook was configured; the host's tooling runs pg_dump on the
    host and records the address it used: on the contract's host the URL is the app's
    (`togather-db:5432`, Docker's network) and the tooling's is `localhost:5433` (the
    published port). Both are this server: (a) the URL's host and port; (b) the database
    container's name, aliases and addresses with the port Postgres listens on inside it; (c)
    this host (loopback, 0.0.0.0, its names and addresses) with a host port Docker publishes
    for that port, at the address Docker publishes it on (127.0.0.1: loopback only)."""

    target: Target
    container: str
    names: frozenset[str] = frozenset()  # the container's name, aliases and IPs (host keys)
    inside: int = 5432  # Postgres's port inside the container
    published: frozenset[int] = frozenset()  # the host ports that reach `inside`
    unknown: str | None = None  # why the container could not be read (None: it was)
    # (host port, host IP) of each publication ("": every address of this host)
    bound: frozenset[tuple[int, str]] = frozenset()

    def here(self, key: str) -> bool:
        """Whether host key `key` is this machine (a published port listens there)."""
        import socket

        from runbook.caddy.text import local_address

        return (key in ("localhost", *ANY_ADDRESS)
                or key in (socket.gethostname().lower(), socket.getfqdn().lower())
                or local_address(key))

    def reaches(self, host: object, port: object) -> bool:
        """Whether a sidecar's host and port (None or "": not recorded) name this server."""
        h = None if host in (None, "") else _host_key(str(host))
        p = None if port in (None, "") else str(port).strip()
        if h in (None, _host_key(self.target.host)) and p in (None, str(self.target.port)):
            return True  # as configured (a sidecar without a host: on the URL's, as before)
        if h is not None and h in self.names and p in (None, str(self.inside)):
            return True
        if p not in {str(n) for n in self.published}:
            return False
        # a sidecar naming no host (an older one): its port alone, as before
        return h is None or (self.here(h) and self.bound_at(h, p))

    def bound_at(self, h: str, p: str) -> bool:
        """Whether published port `p` listens at this host's address `h` (a host key): a port
        Docker publishes on 127.0.0.1 is not reached at the host's other addresses, where
        another server may listen on the same port. Compared only where Docker names an
        address (not on the host's network, nor for a publication it does not list)."""
        ips = {ip for port, ip in self.bound if str(port) == p}
        return not ips or any(ip in ("", *ANY_ADDRESS) or _host_key(ip) == h for ip in ips)

    def describe(self) -> str:
        """Where the database is now: the URL's host and port, and the host addresses Docker
        publishes it on when they differ (`togather-db:5432 (published on 127.0.0.1:5433)`)."""
        at = f"{self.target.host}:{self.target.port}"
        shown = _published(self)
        if not shown or shown == [str(self.target.port)]:
            return at
        return f"{at} (published on {', '.join(shown)} by {self.container})"

    def undecided(self, host: object, port: object) -> bool:
        """A sidecar naming this machine on another port than the URL's, while the URL names
        the container and Docker could not say which ports it publishes: it may be this
        server or another's. Never ours for a pick, a restore or a cleanup (fail closed)."""
        return (self.unknown is not None and host not in (None, "") and port not in (None, "")
                and not self.here(_host_key(self.target.host))
                and self.here(_host_key(str(host))) and not self.reaches(host, port))


def server(env: Environment, tgt: Target) -> Server:
    """The addresses of `tgt`'s server (see Server); the container is read once, here."""
    from runbook import docker

    container = env.database.container
    names = {_host_key(container)}
    try:
        info = docker.inspect(container)
    except RunbookError as exc:  # Docker down: which ports reach it cannot be told
        return Server(tgt, container, frozenset(names),
                      unknown=f"container {container} cannot be inspected ({exc.message})")
    if not info.exists:
        return Server(tgt, container, frozenset(names),
                      unknown=f"container {container} cannot be inspected (no such container)")
    names |= {_host_key(a) for a in info.addresses}
    # the URL names the container: Postgres listens on the URL's port inside it
    inside = tgt.port if _host_key(tgt.host) in names else 5432
    binds = info.host_binds(inside)
    return Server(tgt, container, frozenset(names), inside,
                  frozenset(port for port, _ in binds), bound=binds)


def server_or_none(env: Environment) -> Server | None:
    """The environment's database server (see Server), or None when none is configured."""
    tgt = target_or_none(env)
    return None if tgt is None else server(env, tgt)


def other_server(snap: Snapshot, here: Server) -> str | None:
    """Where `snap`'s sidecar says it was dumped from (`on port 5434, not 5432`) when that
    is not an address of this environment's server (Server: the URL's, the container's, or a
    port Docker publishes for it on this host); None when it is one, or not said.

    Two environments on one host may each have their own server and the same database name
    (and share the default folder); the tooling's sidecars name no environment, only the
    host and port. A sidecar naming neither (an older one) is matched by its database name
    alone, as before: nothing in it tells the servers apart, and refusing it would leave a
    rollback without its pre-deploy snapshot. A value that cannot be read as this server's
    (`"port": "x"`) is another's: never picked, never deleted by this environment."""
    if not snap.names_server:
        return None
    host, port = snap._m("host"), snap._m("port")
    if here.reaches(host, port):
        return None
    tgt = here.target
    if here.undecided(host, port):
        return (f"on {host}:{port}, which may or may not reach this database: the URL names "
                f"{tgt.host}:{tgt.port} and {here.unknown}")
    also = ("" if not here.published or here.published == {tgt.port}
            else f" nor {', '.join(_published(here))} (published by {here.container})")
    if host in (None, "") or _host_key(str(host)) == _host_key(tgt.host):
        return f"on port {port}, not {tgt.port}{also}"
    return f"on {host}:{'?' if port in (None, '') else port}, not {tgt.host}:{tgt.port}{also}"


def _published(here: Server) -> list[str]:
    """Its publications: `5433`, or `127.0.0.1:5433` when Docker binds one address only."""
    return sorted({f"{ip}:{port}" if ip not in ("", *ANY_ADDRESS) else str(port)
                   for port, ip in here.bound or {(n, "") for n in here.published}})


def dumped_from(snap: Snapshot, here: Server) -> str:
    """Where `snap`'s sidecar says it was dumped from, as HOST:PORT; a part it leaves out is
    the URL's, as Server.reaches reads it."""
    host, port = snap._m("host"), snap._m("port")
    return (f"{here.target.host if host in (None, '') else host}:"
            f"{here.target.port if port in (None, '') else port}")


def moved_from(snap: Snapshot, here: Server, given: str) -> bool:
    """Whether `given` (HOST:PORT, `--moved-from`) is the server `snap`'s sidecar names: the
    operator says that server is this database before it moved (the sidecar is right, it
    says where the dump came from; only on-call knows the database moved)."""
    host, _, port = given.strip().rpartition(":")
    taken_host, _, taken_port = dumped_from(snap, here).rpartition(":")
    return bool(host) and _host_key(host) == _host_key(taken_host) and \
        port.strip() == taken_port.strip()


def snapshot_arg(env: Environment, snap: Snapshot) -> str:
    """`snap` as a command names it (SNAPSHOT, --snapshot FILE), quoted: by name in the
    snapshot folder, else by path (a name alone is looked for in the folder, by find())."""
    return shlex.quote(snap.name if snap.path.parent == env.database.snapshot_dir
                       else str(snap.path))


def undecided(snap: Snapshot, here: Server) -> bool:
    """Whether `snap` is refused only because Docker could not say (Server.undecided)."""
    return snap.names_server and here.undecided(snap._m("host"), snap._m("port"))


def whose(env: Environment, snap: Snapshot, here: Server | None = None) -> str | None:
    """Why `snap` is not this environment's database's snapshot (`a snapshot of database
    billing, not togather`), or None when it is: another database name, environment or
    server. Such a one is never listed as ours, picked, a witness, or cleaned by us: its
    own environment's state file protects it, not ours. `here`: the environment's server,
    when the caller has it (None: read here, one `docker inspect`)."""
    here = here or server_or_none(env)
    if here is None:  # fail closed: nothing tells this environment's from another's
        return "no database is configured, so nothing tells whose snapshot it is"
    tgt = here.target
    if snap.database != tgt.dbname:
        return f"a snapshot of database {snap.database}, not {tgt.dbname}"
    if snap.environment not in (None, env.name):
        # two environments with the same database name may share the folder (a staging
        # snapshot in production's "target was live" window said which schema production's
        # target ran with)
        return f"taken in {snap.environment}, not {env.name}"
    if (where := other_server(snap, here)) is not None:
        return f"a snapshot of database {snap.database} {where}"
    return None


def _scan(directory: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The `*.sql.gz` entries that are snapshot files, and the others with why they are not.

    A directory is never a snapshot. A symlink counts only when its name is a snapshot name
    and it leads to a file: a convenience link such as `latest.sql.gz` would otherwise list
    twice, sort first (its target's time) and become the default restore, which then cannot
    tell what database it holds.
    """
    try:  # not glob(): it reads a folder it may not list as empty ("no snapshots")
        if not directory.is_dir():
            if os.path.lexists(directory):  # a file or a dangling link: never "no snapshots"
                raise PreconditionError(
                    f"the snapshot folder {directory} is not a directory; nothing was changed",
                    "point [database] snapshot_dir at the folder the snapshots are in")
            return [], []
        names = sorted(e.name for e in os.scandir(directory) if e.name.endswith(SUFFIX))
    except OSError as exc:
        raise unreadable(directory, exc) from None
    files_, others = [], []
    for path in (directory / name for name in names):
        if path.name.startswith("."):
            continue
        try:
            mode = path.lstat().st_mode
        except OSError:
            others.append((path, "vanished while being read"))
            continue
        if stat.S_ISLNK(mode):
            if not NAME_RE.match(path.name.removesuffix(SUFFIX)):
                others.append((path, "a symlink without a snapshot name: ignored"))
                continue
            if not path.is_file():
                others.append((path, "a symlink that leads to no file: left alone"))
                continue
        elif not stat.S_ISREG(mode):
            others.append((path, "a directory (or other non-file) named like a snapshot: "
                                 "left alone"))
            continue
        files_.append(path)
    return files_, others


def _mtime_ns(path: Path) -> int:
    """Orders snapshots taken within the same second (names only carry seconds)."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def find(env: Environment, ref: str | Path | None = None) -> Snapshot:
    """A snapshot by path, file name or stem (in snapshot_dir); None means the newest that
    is neither a restore's safety snapshot nor dirty.

    A safety snapshot is the database as it was just before a restore: after a restore that
    failed (or was killed once it committed), "the newest" was that one, so the rerun the
    message asks for restored the current data onto itself, or undid the restore, and said
    it succeeded. Restoring one takes its name. A pick dated in the future is refused
    (FutureSnapshotError): which snapshot is the newest cannot be told; naming one restores it.
    A dump still being written (being_written) is passed over by the pick (default_pick),
    and refused when named."""
    if ref is None or str(ref) == "":
        return default_pick(env)[0]
    text = str(ref)
    candidates = [Path(text).expanduser()]
    if os.sep not in text:
        base = env.database.snapshot_dir
        stem = text.removesuffix(SUFFIX).removesuffix(META_SUFFIX)
        candidates = [base / (stem + SUFFIX), *candidates]
    folder = False  # one names a directory: said so, never "does not exist" (found by review)
    for candidate in candidates:
        if candidate.name.endswith(META_SUFFIX):
            candidate = candidate.with_name(candidate.name.removesuffix(META_SUFFIX) + SUFFIX)
        try:
            found = candidate.is_file()
            folder = folder or candidate.is_dir()
        except OSError as exc:  # its folder cannot be searched by this user
            raise unreadable(candidate.parent, exc) from None
        if found:
            snap = load(candidate)
            if (why := being_written(snap)) is not None:
                raise SnapshotError(f"snapshot {snap.name} is still being written ({why}); "
                                    "nothing was changed", "wait until it is done (its "
                                    "sidecar appears), then run again; or name another "
                                    f"(`runbook snapshot list {command_arg(env)}`)",
                                    exit_code=ExitCode.PRECONDITION)
            return snap
    what = "is a directory, not a snapshot file" if folder else "does not exist"
    raise SnapshotError(f"snapshot {text} {what}",
                        f"pick one from `runbook snapshot list {command_arg(env)}` (folder "
                        f"{env.database.snapshot_dir})")


def default_pick(env: Environment) -> tuple[Snapshot, list[tuple[Snapshot, str]]]:
    """find()'s pick without a name, and the newer dumps it passed over as still being
    written, with why (the restore's plan says them): found by review, the pick landed on
    the host's tooling's dump half-written and the restore refused it as incomplete, where
    the newest complete snapshot was there to restore."""
    arg, snaps = command_arg(env), own_snapshots(env)
    chosen = [s for s in snaps if s.reason != SAFETY_REASON and not s.dirty]
    passed: list[tuple[Snapshot, str]] = []
    for snap in chosen:
        if (why := being_written(snap)) is None:
            return _not_ahead(snap, f"name the one to restore: `runbook snapshot restore "
                                    f"{arg} SNAPSHOT` (`runbook snapshot list {arg}`)"), passed
        passed.append((snap, why))
    if passed:
        raise SnapshotError(f"the only snapshots to restore in {env.database.snapshot_dir} "
                            "are still being written ("
                            + ", ".join(f"{s.name}: {why}" for s, why in passed) + ")",
                            "wait until they are done (their sidecars appear), then run again; "
                            f"or name one (`runbook snapshot list {arg}`)",
                            exit_code=ExitCode.PRECONDITION)
    what = (f"only safety or dirty snapshots ({len(snaps)}) in "
            if snaps else "no snapshots in ")
    raise SnapshotError(f"{what}{env.database.snapshot_dir}",
                        f"name the one to restore (`runbook snapshot list {arg}`)"
                        if snaps else f"take one: `runbook snapshot create {arg}`",
                        exit_code=ExitCode.PRECONDITION)


def being_written(snap: Snapshot) -> str | None:
    """Why `snap` is a dump still being written, or None: it has no sidecar yet (the
    tooling writes one once its dump is done, dump.create before naming it) and a process
    holds it open for writing (`pg_dump | gzip > FILE`). A writer of another user's is seen
    by root only: then it is picked, and its read refuses it as incomplete, as before."""
    if os.path.lexists(snap.meta_path):
        return None
    pids = procs.writers(snap.path)
    return (f"process {', '.join(map(str, pids))} has it open for writing" if pids
            else None)


def latest_before(env: Environment, migration_version: int | None, *,
                  deployment_id: str | None = None, before: datetime | None = None,
                  snapshot_path: str | None = None,
                  listed: list[Snapshot] | None = None,
                  command: str | None = None) -> Snapshot | None:
    """The newest usable snapshot whose database was at `migration_version`.

    That is the state a deployment which ran with that version can run on again, with the
    least data lost. A snapshot made for `deployment_id` (its pre-deploy snapshot; or the
    one the Go CLI recorded as its `snapshot_path`) wins when there is one; `before` drops
    snapshots taken later than that moment. With the version unknown (None), only that
    pre-deploy snapshot may be chosen, or None. A pick dated in the future raises
    FutureSnapshotError, and one that a snapshot whose sidecar this user cannot read may
    stand before (the pre-deploy one, or a newer one) UnreadSidecarError: `--snapshot` names
    the one to restore. `listed`: picked from these instead of own_snapshots()
    (before_a_move). `command`: the rollback that names one (its --to kept), as the fix says it.
    """
    command = command or f"runbook rollback {command_arg(env)} --restore-snapshot --snapshot FILE"
    fix = f"name the one to restore: `{command}` (`runbook snapshot list {command_arg(env)}`)"
    listed = own_snapshots(env) if listed is None else listed

    def made_for(s: Snapshot) -> bool:
        return bool((deployment_id and s.deployment_id == deployment_id)
                    or recorded_as(s, snapshot_path))

    # The snapshot dumped right before the deployment that replaced it (its pre-deploy
    # snapshot, by deployment id) holds the target's schema. With the schema unknown it is
    # the only one known to: the newest snapshot of any schema may be at the current one
    # (restoring it helps nothing and drops the writes since). The tooling's sidecar names no
    # version: such a one is taken too, and the caller reads the version from the dump.
    unversioned = [s for s in listed
                   if made_for(s) and s.meta is not None and not s.problems and not s.dirty
                   and s.migration_version is None and s.path.exists()
                   and (before is None or s.timestamp <= before)]
    # newest first: what this user cannot read may be the pre-deploy snapshot, or newer
    unread = [s for s in listed if s.unread and (before is None or s.timestamp <= before)]
    if migration_version is None:
        own = [s for s in listed
               if made_for(s) and s.meta is not None and not s.problems
               and not s.dirty and s.path.exists()
               and (before is None or s.timestamp <= before)]
        if own:
            return _not_ahead(own[0], fix)
        _none_unread(unread, fix)
        return None
    found = [s for s in listed if s.usable
             and s.migration_version == migration_version
             and (before is None or s.timestamp <= before)]
    if deployment_id or snapshot_path:
        own = [s for s in found if made_for(s)]
        if own:
            return _not_ahead(own[0], fix)
        if unversioned:
            return _not_ahead(unversioned[0], fix)
        _none_unread(unread, fix)  # any of them may be the one made for it
    if not found:
        _none_unread(unread, fix)
        return None
    _none_unread([s for s in unread if s.timestamp >= found[0].timestamp], fix)
    return _not_ahead(found[0], fix)


def before_a_move(env: Environment, migration_version: int | None, *,
                  deployment_id: str | None = None,
                  snapshot_path: str | None = None) -> tuple[Snapshot, str] | None:
    """What latest_before would pick among the snapshots refused only for the server their
    sidecar names (this database's before it moved, on-call may say: --moved-from), and
    where it was taken (HOST:PORT); None when none fits. For a refusal that found none of
    ours: "no snapshot exists" sent on-call to roll migrations back by hand while the
    pre-deploy snapshot, taken before the database moved, was there."""
    here = server_or_none(env)
    if here is None:
        return None
    theirs = [s for s in list_snapshots(env) if s.database == here.target.dbname
              and s.environment in (None, env.name) and other_server(s, here) is not None]
    try:
        snap = latest_before(env, migration_version, deployment_id=deployment_id,
                             snapshot_path=snapshot_path, listed=theirs)
    except SnapshotError:  # dated in the future, or an unread sidecar: no hint, not a guess
        return None
    return None if snap is None else (snap, dumped_from(snap, here))


def _none_unread(unread: list[Snapshot], fix: str) -> None:
    """Raise UnreadSidecarError for the newest of `unread`: passed over, the pick says what
    fits while one this user cannot read may fit better."""
    if unread:
        raise UnreadSidecarError(unread[0], fix)


def _not_ahead(snap: Snapshot, fix: str) -> Snapshot:
    """A default pick, unless it is dated in the future: the clock was set back since it was
    taken, so a newer snapshot may sort after it (its writes lost by the restore)."""
    ahead = snap.ahead()
    if ahead is not None:
        raise FutureSnapshotError(snap, ahead, fix)
    return snap


def reason_slug(reason: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", reason.lower()).strip("-")[:40].strip("-")
    return slug or "manual"


def snapshot_stem(db: str, when: datetime, reason: str) -> str:
    return f"{PREFIX}{db}_{when.astimezone(UTC):%Y%m%d_%H%M%S}_{reason_slug(reason)}"


def free_stem(directory: Path, db: str, when: datetime, reason: str) -> str:
    stem = snapshot_stem(db, when, reason)
    candidate, n = stem, 1
    while (directory / (candidate + SUFFIX)).exists() or (
            directory / (candidate + META_SUFFIX)).exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def unreadable(directory: Path, exc: OSError) -> PreconditionError:
    """A snapshot folder this user cannot list: never read as "no snapshots" (which sent
    on-call to --force, the guard's evidence gone), nor a traceback."""
    return PreconditionError(f"cannot read the snapshot folder {directory} "
                             f"({exc.strerror or exc}); nothing was changed",
                             "run as the folder's owner (or root), or give this user read "
                             "and search permission on it")


def no_space(directory: Path, what: str) -> PreconditionError:
    return PreconditionError(
        f"no disk space in {directory} for {what}; nothing was changed",
        "free space there (`df -h`, `runbook snapshot cleanup`) or point [database] "
        "snapshot_dir in the environment file at a bigger disk")


def ensure_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise PreconditionError(f"cannot create snapshot folder {directory}: {exc.strerror}",
                                "create it (mode 0700) or set [database] snapshot_dir") from None
    if not os.access(directory, os.W_OK):
        raise PreconditionError(f"snapshot folder {directory} is not writable",
                                "fix its owner/permissions or set [database] snapshot_dir")


@dataclass(frozen=True)
class CleanupResult:
    removed: list[Snapshot]
    kept: list[Snapshot]  # every snapshot left in place, expired or not
    orphans: list[Path]  # a killed writer's temp files, and sidecars without their dump
    held: list[tuple[Snapshot, str]] = field(default_factory=list)  # expired, kept: why
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # left alone: why
    warnings: list[str] = field(default_factory=list)


def protected(env: Environment, snaps: list[Snapshot],
              now: datetime | None = None) -> tuple[dict[Path, str], str | None]:
    """The snapshots cleanup keeps whatever their age, with why; or a warning that the state
    file cannot be read (then the caller keeps every snapshot).

    Kept: the newest snapshot, the newest usable one (a sidecar of the shell or Go
    tooling has no checksum or schema version, so its snapshots are never "usable": the
    newest of those went too) and the newest with a sidecar, the pre-deploy snapshots of the
    current and the previous deployment (by the sidecar's deployment_id, or the Go CLI's
    snapshot_path), and the snapshot `rollback --restore-snapshot` would pick for each of the
    two (the newest usable at its schema): the ones a rollback restores.

    A snapshot dated in the future (Snapshot.ahead) is kept, its age unknown, and is never
    "the newest" of any kind: those are picked among the others (found by review: one taken
    while the clock ran fast by more than the retention held "the newest", and the real
    newest, expired, was deleted).
    """
    from runbook import state as states

    why: dict[Path, list[str]] = {}
    for snap in snaps:
        if (ahead := snap.ahead(now)) is not None:
            why.setdefault(snap.path, []).append(
                f"dated {rough_duration(ahead)} in the future (taken while the clock ran "
                "fast), so its age cannot be told")
    present = [s for s in snaps if s.path not in why]  # "the newest" is among these
    newest = next((s for s in present if s.usable), None)
    if newest is not None:
        why.setdefault(newest.path, []).append("the newest usable snapshot")
    if present and present[0] is not newest:
        why.setdefault(present[0].path, []).append("the newest snapshot")
    # the tooling writes a sidecar (size_mb, duration_seconds) once its dump is done: one
    # without is a failed or killed dump, or one still being written (found by review: a
    # broken snapshot cron's empty dumps, each "the newest", left the last good one to go)
    done = next((s for s in present if s.meta is not None and not s.problems and not s.dirty),
                None)
    if done is not None and done is not newest and done is not present[0]:
        why.setdefault(done.path, []).append("the newest snapshot with a sidecar (a newer "
                                             "one without may be a failed dump)")
    try:
        state = states.read_state(env.state_file, environment=env.name)
    except RunbookError as exc:
        return ({s.path: "the state file cannot be read" for s in snaps},
                f"cannot read the state file ({exc.message}), so nothing tells which "
                "snapshots a rollback needs: kept every snapshot; fix the state file and run "
                "the cleanup again")
    for label, dep in (("current", state.current), ("previous", state.previous)):
        if dep is None:
            continue
        for snap in snaps:
            if _made_for(snap, dep):
                why.setdefault(snap.path, []).append(
                    f"the pre-deploy snapshot of the {label} deployment {dep.version} "
                    f"({dep.id})")
        version = dep.migration_version
        if version is None and label == "previous" and state.current is not None:
            # the schema guard reads the rollback target's schema from a sidecar then: that
            # sidecar is its only witness, and the snapshot it would restore depends on it
            # (the previous deployment's successor is the current one: migration_source)
            witness, _ = schema_witness(snaps, dep, state.current)
            if witness is not None:
                why.setdefault(witness.path, []).append(
                    f"the snapshot the schema guard reads the previous deployment "
                    f"{dep.version}'s schema from")
                version = witness.migration_version
            else:  # those that disagree about it: the guard cannot tell while all are
                # here; the oldest deleted first left a later deploy's one unchallenged
                for snap in _live_oldest(snaps, dep, state.current).values():
                    why.setdefault(snap.path, []).append(
                        f"one of the snapshots that disagree about the schema the previous "
                        f"deployment {dep.version} ran with")
        if version is not None:  # what the schema guard would restore
            at = next((s for s in present if s.usable and s.migration_version == version), None)
            if at is not None:
                why.setdefault(at.path, []).append(
                    f"the newest usable snapshot at schema {version}, the "
                    f"{label} deployment {dep.version}'s")
    return {path: "; ".join(reasons) for path, reasons in why.items()}, None


def recorded_as(snap: Snapshot, snapshot_path: str | None) -> bool:
    """Is `snap` the file the Go CLI recorded as a deployment's `snapshot_path`? By its name
    too, as cleanup always kept it: the path as written (the folder through a symlink, a
    container's mount point) is not the one this environment lists it under, and the
    restore's pick passed it over (found by review), refusing or taking an older snapshot.
    A name holds the database and the second it was dumped."""
    return bool(snapshot_path) and (str(snap.path) == snapshot_path
                                    or snap.name == PurePath(str(snapshot_path)).name)


def _made_for(snap: Snapshot, dep: states.Deployment) -> bool:
    """Whether `snap` is `dep`'s pre-deploy snapshot: by the sidecar's deployment id, or the
    Go CLI's `snapshot_path`."""
    return bool((snap.deployment_id and snap.deployment_id == dep.id)
                or recorded_as(snap, dep.snapshot_path))


def pre_deploy_witness(listed: list[Snapshot], target: states.Deployment,
                       after: states.Deployment) -> Snapshot | None:
    """The pre-deploy snapshot of `after`, the deployment that replaced `target`, dumped just
    before its migrations: at the schema `target` ran with, when `after` was deployed while
    `target` served (one dumped before `target` went live again, or for a deployment made
    current again by a rollback, says nothing of it). Its sidecar may name no schema (the
    tooling's): the caller then reads the dump. `listed`: newest first."""
    if after.deployed_at <= target.went_live:
        return None
    own = [s for s in listed if not s.dirty and _made_for(s, after)]
    versioned = [s for s in own if s.meta is not None and s.migration_version is not None]
    return next(iter(versioned or own), None)


def live_witness(listed: list[Snapshot], target: states.Deployment,
                 after: states.Deployment) -> tuple[Snapshot | None, str]:
    """The snapshot taken while `target` served whose sidecar says its schema, and how it
    knows; (None, why) when those snapshots disagree; (None, "") when none was taken.

    The window is from when `target` last went live (a rollback records it: before then the
    release it was rolled back from served, at its own schema) until `after` replaced it, or
    `after`'s pre-deploy snapshot was dumped. A restore's safety snapshot is never a witness
    (it holds what served before the restore). The oldest is taken: the deploy script dates a
    deployment only after its migrations, so a snapshot taken during them lies in the window
    at the new schema. When they disagree nothing is inferred: picking one is a guess that
    puts old code on a newer schema, or restores the wrong snapshot (found by review)."""
    oldest = _live_oldest(listed, target, after)
    if not oldest:
        return None, ""
    if len(oldest) > 1:
        seen = ", ".join(f"{oldest[v].stem} at {v}" for v in sorted(oldest))
        return None, (f"the snapshots taken while {target.version} was live disagree about its "
                      f"schema ({seen}; one may have been taken during another deployment's "
                      f"migrations): check which one {target.version} ran with")
    [witness] = oldest.values()
    return witness, f"taken while {target.version} was live"


def _live_oldest(listed: list[Snapshot], target: states.Deployment,
                 after: states.Deployment) -> dict[int, Snapshot]:
    """The oldest snapshot at each schema among those taken while `target` served (see
    live_witness), by schema."""
    start = target.went_live
    end = after.live_after(start) or after.deployed_at
    for own in (s for s in listed if _made_for(s, after) and s.timestamp >= start):
        end = min(end, own.timestamp)  # dumped before its migrations: what follows may not be
    oldest: dict[int, Snapshot] = {}
    for snap in listed:  # newest first: the oldest at each schema stays
        if (snap.meta is not None and snap.migration_version is not None and not snap.dirty
                and snap.reason != SAFETY_REASON and start <= snap.timestamp < end):
            oldest[snap.migration_version] = snap
    return oldest


def unread_in_window(listed: list[Snapshot], target: states.Deployment,
                     after: states.Deployment) -> Snapshot | None:
    """A snapshot taken from when `target` last went live until `after` replaced it whose
    sidecar this user cannot read (root's, 0600): it may be `after`'s pre-deploy snapshot
    (which says `target`'s schema and ends the window) or a witness that disagrees, so
    neither its absence nor the others can be trusted. The newest such, or None."""
    start = target.went_live
    end = after.live_after(start) or after.deployed_at
    return next((s for s in listed if s.unread and start <= s.timestamp < end), None)


def schema_witness(listed: list[Snapshot], target: states.Deployment,
                   after: states.Deployment) -> tuple[Snapshot | None, str]:
    """The snapshot that says the schema `target` ran with, and how it knows: the pre-deploy
    snapshot of `after` (pre_deploy_witness: its sidecar may name no schema, then its dump
    does), else the one taken while `target` served (live_witness; with a reason and no
    snapshot when those disagree). `listed`: newest first."""
    own = pre_deploy_witness(listed, target, after)
    if own is not None:
        return own, f"pre-deploy snapshot of {after.version}"
    return live_witness(listed, target, after)


def _unlink(path: Path) -> str | None:
    """Delete one file; why not, instead of raising (a directory, a permission)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "a directory, not a file: left alone"
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        return f"cannot delete it ({exc.strerror or exc})"
    return None


def cleanup(env: Environment, *, now: datetime | None = None, dry_run: bool = False,
            also_keep: Mapping[str, str] | None = None,
            only: Set[str] | None = None) -> CleanupResult:
    """Remove snapshots past their own expires_at (dump, then sidecar), except the ones a
    rollback needs (`protected`) and `also_keep` (file name: why; what only the run records
    know, read by the caller: a killed restore's safety snapshot); entries that are not
    files are skipped and reported. `only`: the names on-call was shown at the prompt (the
    snapshots and the leftovers); one that expired, or a leftover that appeared, while it
    waited is kept (found by review: deleted unshown)."""
    now = now or datetime.now(UTC)
    retention = env.database.retention_days
    directory = env.database.snapshot_dir
    paths, skipped = _scan(directory)
    # only this database's snapshots, named as the contract names them: the folder may be
    # shared by several environments (the default one is), and hold an operator's own
    # `backup-before-migration.sql.gz`, which an age alone deleted
    # (whose: another database name, environment or server; or none configured)
    mine = server_or_none(env)  # read once: one `docker inspect` for every file
    ours: list[Snapshot] = []
    for snap in (load(p) for p in paths):
        if NAME_RE.match(snap.stem) is None:
            skipped.append((snap.path, "not named as a snapshot (togather_<db>_<time>_"
                                       "<reason>): another tool's file, left alone"))
        elif (why := whose(env, snap, mine)) is not None:
            skipped.append((snap.path, f"{why}: left alone"))
        else:
            ours.append(snap)
    snaps = sorted(ours, key=lambda s: (s.timestamp, _mtime_ns(s.path), s.name), reverse=True)
    keep, warning = protected(env, snaps, now)
    for snap in snaps:
        whys = [(also_keep or {}).get(snap.name, "")]
        if snap.unread:  # fail closed: it may say it is a current or previous deployment's
            # pre-deploy snapshot (found by review: root's 0600 sidecar, deleted with exit 0)
            whys.append(f"its sidecar cannot be read ({snap.unread}), so nothing tells "
                        "whether a rollback needs it: kept; run the cleanup as its owner or "
                        "root")
        if why := "; ".join(w for w in whys if w):
            keep[snap.path] = f"{keep[snap.path]}; {why}" if snap.path in keep else why
    # a symlink that stays keeps what it leads to in the folder (found by review: a
    # protected link's expired target was deleted, leaving the link to nothing)
    by_name = {s.name: s for s in snaps}
    for snap in snaps:
        if snap.path.is_symlink() and (snap.path in keep or snap.expires_at(retention) > now):
            for name in _link_targets(snap.path, directory):
                if (target := by_name.get(name)) is not None and target is not snap:
                    why = f"the symlink {snap.name}, kept, leads to it"
                    keep[target.path] = (f"{keep[target.path]}; {why}" if target.path in keep
                                         else why)
    removed: list[Snapshot] = []
    kept: list[Snapshot] = []
    held: list[tuple[Snapshot, str]] = []
    for snap in snaps:
        if snap.expires_at(retention) > now:
            kept.append(snap)
            continue
        if snap.path in keep:
            kept.append(snap)
            held.append((snap, keep[snap.path]))
            continue
        if only is not None and snap.name not in only:
            kept.append(snap)
            held.append((snap, "expired since the list was shown at the prompt: the next "
                               "cleanup removes it"))
            continue
        if not dry_run:
            problem = _unlink(snap.path)
            if problem is not None:
                skipped.append((snap.path, problem))
                kept.append(snap)
                continue
            problem = _unlink(snap.meta_path)
            if problem is not None:
                skipped.append((snap.meta_path, problem))
        removed.append(snap)
    orphans: list[Path] = []
    if directory.is_dir():
        day_ago = time.time() - 86400
        dead = set(dead_partials(directory))  # a killed run's: removed whatever its age
        for path in sorted(directory.iterdir()):
            # only what this tool leaves: its own partial dumps and temp files, and lone
            # sidecars named as the contract names this database's snapshots (an operator's
            # `notes.meta.json` or another database's sidecar is left alone, as their dumps are)
            leftover = _own_partial(path.name) or files.temp_target(path.name) is not None
            dump = path.with_name(path.name.removesuffix(META_SUFFIX) + SUFFIX)
            sidecar = (Snapshot(dump, _safe_json(path))
                       if path.name.endswith(META_SUFFIX) and not path.name.startswith(".")
                       and NAME_RE.match(path.name.removesuffix(META_SUFFIX)) else None)
            # the same test as a dump's: another server's or environment's is theirs
            theirs = None if sidecar is None else whose(env, sidecar, mine)
            meta_named = sidecar is not None and theirs is None
            if not (leftover or meta_named):
                if theirs is not None and not os.path.lexists(dump):
                    skipped.append((path, f"a sidecar without its dump, {theirs}: left alone"))
                elif (path.name.endswith(".partial") or (path.name.endswith(META_SUFFIX)
                                                         and not os.path.lexists(dump))) \
                        and not path.name.startswith("."):
                    skipped.append((path, "not this database's snapshot or this tool's "
                                          "partial dump (by its name): left alone"))
                continue
            try:
                info = path.lstat()
            except FileNotFoundError:
                skipped.append((path, "vanished while cleaning (a dump finishing?)"))
                continue
            except OSError as exc:
                skipped.append((path, f"cannot read it ({exc.strerror or exc})"))
                continue
            if not stat.S_ISREG(info.st_mode):
                kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a regular file"
                skipped.append((path, f"{kind}: left alone"))
                continue
            stale_partial = leftover and (info.st_mtime < day_ago or path in dead)
            if leftover and not stale_partial:  # said, never silently passed over: a dump
                # killed an hour ago may be what fills the disk
                skipped.append((path, f"an unfinished dump ({info.st_size // (1024 * 1024)} "
                                      "MiB) still being written (its writer holds it), or "
                                      "not lockable here: removed after a day, or by hand "
                                      "once no dump runs"))
                continue
            lone_meta = (sidecar is not None and meta_named and not os.path.lexists(dump)
                         and sidecar.expires_at(retention) <= now)
            if not (stale_partial or lone_meta):
                continue
            # shown by its name, or as its snapshot's (whose dump went since)
            if only is not None and path.name not in only \
                    and not (lone_meta and dump.name in only):
                skipped.append((path, "a leftover since the list was shown at the prompt: the "
                                      "next cleanup removes it"))
                continue
            if not dry_run:
                if not path.exists():
                    skipped.append((path, "vanished while cleaning (a dump finishing?)"))
                    continue
                problem = _unlink(path)
                if problem is not None:
                    skipped.append((path, problem))
                    continue
            orphans.append(path)
    return CleanupResult(removed, kept, orphans, held, skipped,
                         [warning] if warning else [])


def _link_targets(link: Path, directory: Path) -> list[str]:
    """The names in `directory` that symlink `link` leads to, each hop of a chain: removing
    any of them breaks the link."""
    names: list[str] = []
    hop = link
    try:
        folder = directory.resolve()
        for _ in range(40):  # the kernel's own bound on a chain
            if not hop.is_symlink():
                break
            hop = hop.parent / os.readlink(hop)
            if hop.parent.resolve() == folder:
                names.append(hop.name)
    except OSError:  # unreadable: what it leads to is not known here, nothing more is kept
        pass
    return names


def _own_partial(name: str) -> bool:
    """A partial dump named after a snapshot (`.togather_<db>_<time>_<reason>.sql.gz.<hex>
    .partial`, dump.create's, or the tooling's `<snapshot name>[.sql.gz].partial`): never an
    operator's own `*.partial` download."""
    if _PARTIAL_RE.match(name):
        return True
    if not name.endswith(".partial"):
        return False
    stem = re.sub(r"(\.sql\.gz)?(\.[0-9a-f]{8})?\.partial$", "", name.lstrip("."))
    return NAME_RE.match(stem) is not None


def target_or_none(env: Environment) -> Target | None:
    """The environment's database (name, host, port), or None when none is configured."""
    from runbook.snapshots import commands

    try:
        return commands.target(env)
    except RunbookError:
        return None


def _safe_json(path: Path) -> dict[str, Any] | None:
    try:  # never a FIFO's blocking read (load's)
        data = json.loads(files.read_regular(path, META_MAX, follow=True))
    except (OSError, ValueError, RecursionError):  # `[[[[...` too: no crash of the cleanup
        return None
    return data if isinstance(data, dict) else None
