"""Proving a snapshot file before anything touches the database (read-only).

A full read checks the gzip CRC, the sha256 the sidecar recorded, pg_dump's "dump complete"
trailer, which database and environment it is of, and the schema_migrations rows the dump
itself holds. The replay re-hashes while it streams (runbook/snapshots/replay.py), so a file
that changes after this check is still caught.

A process reads a file once: the schema guard, the snapshot pick and the restore's prepare
each asked for the same pre-deploy dump, three full reads before the prompt (54 s for a
955 MiB dump, found by review). What a read found is kept for the file as it was (path,
device, inode, size, mtime and ctime), never for a file changed since. The schema guard only
asks which schema the dump is at (`schema_version`), read as far as schema_migrations' rows.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pwd
import re
import shlex
import threading
import time
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from runbook import database
from runbook.environment import Environment, command_arg
from runbook.errors import ExitCode
from runbook.snapshots.commands import Target, target
from runbook.snapshots.store import (
    Snapshot,
    SnapshotError,
    dumped_from,
    moved_from,
    other_server,
    server,
    snapshot_arg,
    undecided,
)

TRAILER = b"-- PostgreSQL database dump complete"
CHUNK = 1 << 20
_T = TypeVar("_T")

@dataclass(frozen=True)
class Verified:
    """What a full read of the file proved, before anything touches the database."""

    snapshot: Snapshot
    sha256: str
    migration_version: int  # from the dump's own schema_migrations (0: none)
    dirty: bool
    schemas: tuple[bytes, ...]  # `CREATE SCHEMA x` names in the dump, as written
    database: str
    dumped_by: tuple[int, int] | None = None  # pg_dump's version, from the dump's header
    restrict: bool = False  # the dump holds psql's `\restrict` (pg_dump 17.6, 16.10, ...)
    moved_from: str | None = None  # taken from this server before it moved (--moved-from)


# pg_dump's COPY of a schema_migrations in any schema, named as database.read_schema records
# it (the sidecar's migrations_table); the columns, then the rows up to `\.`
_SM_MARK = b".schema_migrations ("
_SM_NAME = rb'(?:"(?:[^"\n]|"")+"|[^\s."]+)\.schema_migrations'
_SM_START = re.compile(rb"^COPY " + _SM_NAME + rb" \(", re.M)
_SM_RE = re.compile(rb"^COPY (" + _SM_NAME + rb") \(([^)]*)\) FROM stdin;\n(.*?)^\\\.$",
                    re.M | re.S)
DEFAULT_TABLE = "public.schema_migrations"
_SCHEMA_RE = re.compile(rb"^CREATE SCHEMA ([^;\n]+);$", re.M)


_DUMPED_BY_RE = re.compile(rb"^-- Dumped by pg_dump version (\d+)(?:\.(\d+))?", re.M)
_RESTRICT_RE = re.compile(rb"^\\restrict ", re.M)
# pg_dump writes large objects' data between its own BEGIN; and COMMIT;
_LARGE_OBJECT_RE = re.compile(rb"^SELECT pg_catalog\.lo_open\(", re.M)
# the first minor of each major whose psql knows `\restrict` (the August 2025 releases)
RESTRICT_SINCE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}


# a schema_migrations' version, or why the dump's copy holds none (as database.read_schema
# refuses the database's)
Rows = tuple[int, bool] | str


def _schema_rows(piece: bytes) -> dict[str, Rows]:
    """Each schema_migrations' row in `piece` by its qualified name (0 for an empty table).
    golang-migrate keeps one row: several, or one that is no number, is no version at all
    (the first taken, a guard read the oldest of rows 1 and 2; found by review)."""
    found: dict[str, Rows] = {}
    for match in _SM_RE.finditer(piece):
        name = match.group(1).decode()
        columns = [c.strip() for c in match.group(2).decode().split(",")]
        rows = [dict(zip(columns, r.split("\t"), strict=False))
                for r in match.group(3).decode().splitlines() if r]
        if not rows:
            found[name] = (0, False)
        elif "version" not in columns:
            continue  # not golang-migrate's (version, dirty)
        elif len(rows) > 1:
            versions = sorted(((_number(r["version"]), r.get("dirty") == "t") for r in rows),
                              key=lambda v: (0, v[0], "") if isinstance(v[0], int)
                              else (1, 0, v[0]))
            found[name] = database.several_rows(name, versions, len(rows))
        elif isinstance(version := _number(rows[0]["version"]), int):
            found[name] = (version, rows[0].get("dirty") == "t")
        else:
            found[name] = f"{name} holds {version!r}, not a version number"
    return found


def _number(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def _answered(snap: Snapshot, found: dict[str, Rows]) -> bool:
    """Whether `found` holds the table _pick takes, so a read may stop."""
    return (snap.migrations_table or DEFAULT_TABLE) in found


def _pick(snap: Snapshot, found: dict[str, Rows]) -> tuple[int, bool]:
    """The dump's version of the schema_migrations its sidecar names: the one the database's
    user read (on its search_path) when it was taken. A tooling sidecar names none: public's,
    else the only one; several and none of them public's cannot be told apart. A copy of no
    known version is refused (never a guess), as the database's is."""
    table = snap.migrations_table
    if table is None and DEFAULT_TABLE in found:
        table = DEFAULT_TABLE
    if table is None and len(found) > 1:
        raise SnapshotError(
            f"snapshot {snap.name} holds schema_migrations in several schemas "
            f"({', '.join(sorted(found))}) and no sidecar says which the app uses; nothing "
            "was changed", "pick a snapshot taken by the runbook (`runbook snapshot list`), "
            "whose sidecar names it")
    rows = found.get(table or next(iter(found), ""), (0, False))
    if isinstance(rows, str):
        raise _bad_file(snap, f"is at no known schema: {rows}")
    return rows


class _Scanner:
    """Finds schema_migrations' rows, CREATE SCHEMA lines, pg_dump's version and psql's
    restrict meta-command in the streamed SQL."""

    def __init__(self) -> None:
        self.carry = b""
        self.tail = b""
        self.schemas: list[bytes] = []
        self.sm: dict[str, Rows] = {}  # schema_migrations' rows, by table
        self.head = True
        self.dumped_by: tuple[int, int] | None = None
        self.restrict = False
        self.large_objects = False

    def feed(self, chunk: bytes) -> None:
        if self.head:  # pg_dump writes its version in the first lines
            self.head = False
            if found := _DUMPED_BY_RE.search(chunk[:8192]):
                self.dumped_by = (int(found.group(1)), int(found.group(2) or 0))
        if not self.restrict and b"\\restrict " in self.carry[-64:] + chunk:
            self.restrict = bool(_RESTRICT_RE.search(self.carry[-64:] + chunk))
        if not self.large_objects and b"lo_open(" in self.carry[-64:] + chunk:
            self.large_objects = bool(_LARGE_OBJECT_RE.search(self.carry[-64:] + chunk))
        self.tail = (self.tail + chunk)[-4096:]
        buf = self.carry + chunk
        cut = buf.rfind(b"\n") + 1
        starts = [m.start() for m in _SM_START.finditer(buf, 0, cut)] if _SM_MARK in buf else []
        if starts and buf.find(b"\n\\.\n", starts[-1]) == -1:
            cut = starts[-1]  # keep the unfinished COPY block for the next chunk
        self._scan(buf[:cut])
        self.carry = buf[cut:]
        if len(self.carry) > 16 * CHUNK:  # a pathological line: stop carrying it
            self.carry = b""

    def finish(self) -> None:
        self._scan(self.carry + b"\n")
        self.carry = b""

    def _scan(self, piece: bytes) -> None:
        if b"CREATE SCHEMA " in piece:
            self.schemas += [m.group(1).strip() for m in _SCHEMA_RE.finditer(piece)]
        if _SM_MARK in piece:
            self.sm.update(_schema_rows(piece))


def chunks(path: Path, sha: Any) -> Generator[bytes, None, None]:
    """Decompressed chunks of `path` (CHUNK at most), hashing every compressed byte on the way.

    Read as gzip reads it (members one after another, zeros allowed after one; zlib checks
    each member's CRC and length; EOFError for a file cut short, zlib.error for a corrupt
    one), by zlib directly: GzipFile fed zlib 8 KiB at a time, and a 955 MiB dump took a
    third longer to read (the guard, verify and the replay all read through here).
    """
    with open(path, "rb") as raw:
        inflate: Any = None  # the member being read
        data = b""  # read, not yet inflated
        members = 0
        while True:
            if inflate is None:  # between members: zeros may pad, else another member
                if members:
                    data = data.lstrip(b"\0")
                if not data:
                    data = raw.read(CHUNK)
                    sha.update(data)
                    if not data:
                        return
                    continue
                inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip's wrapper only
                members += 1
            if not data:
                data = raw.read(CHUNK)
                sha.update(data)
            out = inflate.decompress(data, CHUNK)
            if inflate.eof:
                data, inflate = inflate.unused_data, None
            elif not data and not out:
                raise EOFError("the gzip stream ends before its end-of-stream marker")
            else:
                data = inflate.unconsumed_tail
            if out:
                yield out


def _bad_file(snap: Snapshot, problem: str) -> SnapshotError:
    return SnapshotError(f"snapshot {snap.name} {problem}; nothing was changed",
                         "pick another one (`runbook snapshot list`); keep this file for "
                         "inspection")


def not_readable_by_user(snap: Snapshot) -> SnapshotError:
    """The refusal of a snapshot this user may not read (exit 4: an access precondition,
    not a bad file): run as one who may; never another snapshot for that reason."""
    try:
        st = snap.path.stat()
        whose = f"belongs to {_user_name(st.st_uid)} mode {st.st_mode & 0o7777:o}"
        sudo = "sudo" if st.st_uid == 0 else f"sudo -u {_user_name(st.st_uid)}"
    except OSError:  # its folder this user may not search
        whose, sudo = "cannot be looked at", "sudo"
    return SnapshotError(f"snapshot {snap.name} {whose} and {_user_name(os.geteuid())} may "
                         "not read it; nothing was changed",
                         f"run the same command as a user who may read it (`{sudo} runbook "
                         "...`); the file is fine: an older snapshot loses the writes since",
                         exit_code=ExitCode.PRECONDITION)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def identify(env: Environment, snap: Snapshot) -> Target:
    """Refuse a file that is missing, has a bad sidecar, or is of another database or
    environment, from its name and sidecar alone (no dump read, no Docker asked): what a
    named snapshot is checked for before the lock (snapshot_restore.check_named); the
    environment's database target."""
    arg = command_arg(env)
    if not snap.path.is_file():
        raise SnapshotError(f"snapshot {snap.path} does not exist; nothing was changed",
                            f"pick one from `runbook snapshot list {arg}`")
    if snap.problems:
        raise _bad_file(snap, "has an unreadable sidecar: " + "; ".join(snap.problems))
    if snap.database is None:
        raise SnapshotError(f"cannot tell which database {snap.name} is of (no sidecar, "
                            "no togather_<db>_... name); nothing was changed",
                            "add its .meta.json or rename it "
                            "togather_<db>_<YYYYMMDD_HHMMSS>_<reason>.sql.gz")
    tgt = target(env)
    if snap.database != tgt.dbname:
        raise SnapshotError(f"snapshot {snap.name} is of database {snap.database!r}, this "
                            f"environment's database is {tgt.dbname!r}; nothing was changed",
                            f"pick a snapshot of {tgt.dbname!r} "
                            f"(`runbook snapshot list {arg}`)")
    recorded_env = (snap.meta or {}).get("environment")
    if recorded_env and recorded_env != env.name:
        raise SnapshotError(f"snapshot {snap.name} was taken in {recorded_env}, not "
                            f"{env.name}; nothing was changed",
                            f"pick a snapshot of {env.name} (`runbook snapshot list {arg}`)")
    return tgt


def _fits(env: Environment, snap: Snapshot, moved: str | None = None,
          command: str | None = None) -> tuple[Target, str | None]:
    """identify(), then refuse a snapshot of another server's database of its name; the
    environment's database target, and `moved` when it is what accepted the snapshot (taken
    from that server, this database before it moved). `command`: the one that restores
    `snap` (default `runbook snapshot restore`), which the refusal of a moved database's
    snapshot names with --moved-from added."""
    arg = command_arg(env)
    tgt = identify(env, snap)
    # another server's database of the same name (another environment's on this host): its
    # data replacing this one's is the loss a restore exists to undo
    here = server(env, tgt) if snap.names_server else None
    if here is None or other_server(snap, here) is None:
        return tgt, None
    if moved is not None and moved_from(snap, here, moved):
        return tgt, moved  # the operator says that server is this database, moved
    taken = dumped_from(snap, here)
    # the sidecar is right (where the dump came from): editing it is never the fix
    command = command or f"runbook snapshot restore {arg} {snapshot_arg(env, snap)}"
    accept = (f"if {taken} was this database before it moved, say so: `{command} "
              f"--moved-from {shlex.quote(taken)}`")
    if undecided(snap, here):
        # Docker cannot say which host ports reach the container: refused, not guessed
        raise SnapshotError(f"snapshot {snap.name} is of database {snap.database!r} "
                            f"{other_server(snap, here)}; nothing was changed",
                            f"start the Docker engine and container {here.container} so the "
                            f"ports it publishes can be read (`docker inspect "
                            f"{here.container}`), or pick a snapshot of {env.name} "
                            f"(`runbook snapshot list {arg}`); {accept}",
                            exit_code=ExitCode.PRECONDITION)
    raise SnapshotError(f"snapshot {snap.name} of database {snap.database!r} was taken from "
                        f"{taken} (its sidecar), and the {env.name} database is now on "
                        f"{here.describe()} ({env.database.url_variable}): another server's, "
                        "or this database's before it moved; nothing was changed",
                        f"pick a snapshot of {env.name} (`runbook snapshot list {arg}`); "
                        + accept)


@contextlib.contextmanager
def _reading(snap: Snapshot) -> Iterator[None]:
    """A read that fails is a one-line refusal of the file."""
    try:
        yield
    except EOFError:
        raise _bad_file(snap, "is truncated (the gzip stream ends early)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise _bad_file(snap, f"is corrupt ({exc})") from None
    except PermissionError:
        # the file is fine: another user's (root's 0600 pre-deploy dump). "Pick another
        # one" sent on-call to an older dump, every write since lost (found by review)
        raise not_readable_by_user(snap) from None
    except OSError as exc:
        raise _bad_file(snap, f"cannot be read ({exc.strerror or exc})") from None


RACY = 2.0  # s: a file changed this recently is read again each time (_File.settled)
_KEEP = 32  # files a process remembers


@dataclass(frozen=True)
class _File:
    """A file as it is: what a read of it found is served again only to the same."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int  # set by the kernel on every change; no user can put it back

    @classmethod
    def of(cls, path: Path) -> _File:
        st = os.stat(path)
        return cls(str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def settled(self, read_at: float) -> bool:
        """Whether any later change must show in its size or times: not when it changed
        within RACY before the read. File times are as coarse as the kernel's clock tick (a
        second on some file systems), so a rewrite of the same size in that tick leaves them
        as they were (git's "racily clean" files)."""
        return max(self.mtime_ns, self.ctime_ns) < (read_at - RACY) * 1e9


_LOCK = threading.Lock()  # plans read files from probe threads
_READS: dict[_File, tuple[str, _Scanner]] = {}  # a whole file: its sha256 and what it holds
# a file read up to schema_migrations' rows: for which table (the sidecar's), what it holds
_SCHEMAS: dict[_File, tuple[str | None, tuple[int, bool]]] = {}


def _recalled(memo: dict[_File, _T], file: _File) -> _T | None:
    with _LOCK:
        return memo.get(file)


def _remember(memo: dict[_File, _T], file: _File, read_at: float, found: _T) -> None:
    """Keep what a read found, if the file is still the one it started reading, and
    settled."""
    try:
        same = _File.of(Path(file.path)) == file
    except OSError:
        return
    if same and file.settled(read_at):
        with _LOCK:
            memo.pop(file, None)
            memo[file] = found
            while len(memo) > _KEEP:
                del memo[next(iter(memo))]


def _whole(snap: Snapshot) -> tuple[str, _Scanner]:
    """The sha256 of the whole file and what the scanner found in it: read once a process
    for the same file (the sidecar's checks are verify's, made on every call)."""
    read_at = time.time()
    with _reading(snap):
        file = _File.of(snap.path)
        if (found := _recalled(_READS, file)) is not None:
            return found
        sha = hashlib.sha256()
        scanner = _Scanner()
        for chunk in chunks(snap.path, sha):
            scanner.feed(chunk)
    scanner.finish()
    found = (sha.hexdigest(), scanner)
    _remember(_READS, file, read_at, found)
    return found


class _Unhashed:
    """For a read that stops early: its hash would prove nothing."""

    def update(self, data: bytes) -> None:
        pass


def schema_version(env: Environment, snap: Snapshot) -> int:
    """The schema_migrations version the dump holds, read only as far as its rows: the
    schema guard's question about a tooling snapshot, whose sidecar names none. pg_dump
    writes table data in name order: the tables after schema_migrations and the indexes are
    not read, nor is anything hashed (a tooling dump without public.schema_migrations is read
    to its end: another schema's may not be the only one). No proof that the file restores
    (verify() is, and the restore calls it). Raises what verify() raises for a file that is
    not this database's, or that is cut off or corrupt before the rows."""
    _fits(env, snap)
    read_at = time.time()
    scanner = _Scanner()
    with _reading(snap):
        file = _File.of(snap.path)
        if (whole := _recalled(_READS, file)) is not None:
            scanner = whole[1]
        elif (known := _recalled(_SCHEMAS, file)) is not None and known[0] == snap.migrations_table:
            return known[1][0]
        else:
            with contextlib.closing(chunks(snap.path, _Unhashed())) as stream:
                for chunk in stream:
                    scanner.feed(chunk)
                    if _answered(snap, scanner.sm):
                        break
                else:
                    scanner.finish()
    if not _answered(snap, scanner.sm) and TRAILER not in scanner.tail:
        raise _bad_file(snap, "is incomplete: no 'dump complete' trailer (pg_dump was cut off)")
    found = _pick(snap, scanner.sm)  # none at all: 0, as verify() reads it
    _remember(_SCHEMAS, file, read_at, (snap.migrations_table, found))
    return found[0]


def verify(env: Environment, snap: Snapshot, *, moved_from: str | None = None,
           command: str | None = None) -> Verified:
    """Read the whole file (checksum, gzip CRC, dump trailer) and check it fits this database.

    `moved_from` (HOST:PORT): the operator says the server the sidecar names is this
    database before it moved; only a snapshot taken from exactly there is accepted so.
    `command`: the command restoring it (default `runbook snapshot restore`), which the
    refusal of a moved database's snapshot names with --moved-from: one that runs (a
    rollback's refusal named the snapshot restore, and the rollback had no --moved-from).

    Read-only; raises a one-line SnapshotError (USAGE) for a missing, truncated, corrupt or
    foreign snapshot. The read is made once a process for the same file (`_whole`); the
    replay streams it again and checks the checksum found here.
    """
    tgt, moved = _fits(env, snap, moved_from, command)
    digest, scanner = _whole(snap)
    if snap.sha256 and digest != snap.sha256:
        raise _bad_file(snap, "does not match its recorded sha256 (changed or corrupt)")
    if scanner.large_objects:
        # their BEGIN;/COMMIT; inside the replay's one transaction would commit the DROP
        # SCHEMA and what came before: a kill or an error later left a mix of old and new
        raise SnapshotError(
            f"snapshot {snap.name} holds large objects, whose data pg_dump writes in a "
            "transaction of its own: the one-transaction restore cannot hold it (every "
            "snapshot of this database will); nothing was changed",
            "restore it by hand: stop the app slots, take a snapshot, then `gunzip -c FILE | "
            f"docker exec -i {tgt.container or 'CONTAINER'} psql -X -v ON_ERROR_STOP=1 "
            f"-U USER {tgt.dbname}` after dropping the schema; or move the large objects into "
            "a bytea column")
    if TRAILER not in scanner.tail:
        raise _bad_file(snap, "is incomplete: no 'dump complete' trailer (pg_dump was cut off)")
    version, dirty = _pick(snap, scanner.sm)
    # A sidecar with a version but no table is a runbook's from before 2026-12-05, which read
    # public's table only (0 without one): compared with that, or every such snapshot of a
    # database whose table is elsewhere was refused as a bad file after the upgrade (found by
    # review). What it holds is still _pick's, the table the app's user sees.
    recorded = (version if snap.migrations_table is not None or DEFAULT_TABLE in scanner.sm
                else 0)
    if snap.migration_version is not None and snap.migration_version != recorded:
        raise _bad_file(snap, f"holds schema_migrations {recorded} but its sidecar says "
                              f"{snap.migration_version}")
    return Verified(snap, digest, version, dirty, tuple(dict.fromkeys(scanner.schemas)),
                    tgt.dbname, scanner.dumped_by, scanner.restrict, moved)


def check_server(snap: Snapshot, verified: Verified, server: tuple[int, int]) -> None:
    """Refuse, before anything changes, a dump the server's own psql cannot replay: one by
    a pg_dump 17 or later into an older server (`SET transaction_timeout`), or one holding
    the restrict meta-command that the server's psql predates. Found only mid-replay, it
    stopped the app, took the safety snapshot, failed and rolled back: downtime for a cryptic
    psql error. The tooling dumps with the host's pg_dump; the runbook's runs in the database
    container."""
    if verified.dumped_by is None:
        return
    dumped, (major, minor) = verified.dumped_by, server
    knows_restrict = major >= 18 or minor >= RESTRICT_SINCE.get(major, 10**6)
    # pg_dump 17 writes `SET transaction_timeout` whatever the server it dumped: older
    # servers reject it (older pg_dumps into older servers mostly load, and are let be)
    why = (f"which writes settings the server ({major}.{minor}) does not know"
           if dumped[0] >= 17 > major
           else f"with psql's \\restrict, which the server's psql {major}.{minor} predates"
           if verified.restrict and not knows_restrict else None)
    if why is not None:
        raise SnapshotError(
            f"snapshot {snap.name} was written by pg_dump {dumped[0]}.{dumped[1]}, {why}: "
            "its replay would fail after the app was stopped; nothing was changed",
            "pick a snapshot taken by the runbook (pg_dump inside the database container), "
            "or take a new one: `runbook snapshot create`")
