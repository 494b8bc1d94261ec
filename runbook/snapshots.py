"""Database snapshots: consistent dumps, honest listings, and restores that cannot lose data.

Why it is built this way:
- pg_dump and psql run INSIDE the database container (`docker exec`), so client and server
  versions always match and a host needs no Postgres client of its own. The password travels
  in the exec environment (`-e PGPASSWORD` copies it from ours), never on a command line.
- The sidecar's per-table row counts are taken in the very MVCC snapshot pg_dump reads
  (`pg_export_snapshot` + `pg_dump --snapshot`), so they describe the dump exactly: a restore
  can be verified against them, and the data a restore would undo can be measured.
- A restore replays `DROP SCHEMA public CASCADE; CREATE SCHEMA public;` and the dump in ONE
  `psql --single-transaction` run with ON_ERROR_STOP: any failure (bad SQL, a file corrupted
  mid-stream, a lock timeout) leaves the database exactly as it was. A safety snapshot is
  taken first anyway, and only the app slots are stopped, never the database.

File names follow the contract: `togather_<db>_<YYYYMMDD_HHMMSS UTC>_<reason>.sql.gz` with a
`<same stem>.meta.json` sidecar (mode 0600, written to a temp file, fsynced, renamed).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import os
import re
import secrets
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from runbook import database
from runbook.environment import Environment, Slot
from runbook.errors import ExitCode, PreconditionError, RunbookError, UsageError
from runbook.plan import Step, StepContext

if TYPE_CHECKING:
    from runbook.run import RunResult

SUFFIX = ".sql.gz"
META_SUFFIX = ".meta.json"
PREFIX = "togather_"
NAME_RE = re.compile(r"^togather_(?P<db>.+?)_(?P<date>\d{8})_(?P<time>\d{6})_(?P<reason>.+)$")
TRAILER = b"-- PostgreSQL database dump complete"
DUMP_FLAGS = ("--format=plain", "--no-owner", "--no-acl", "--clean", "--if-exists")
IN_CONTAINER_HOST = "127.0.0.1"  # the server as seen from inside its own container
IN_CONTAINER_PORT = "5432"
CHUNK = 1 << 20
GZIP_LEVEL = 6  # what `gzip` uses by default: the contract's `| gzip`
LOCK_TIMEOUT = "30s"  # a restore waits this long for locks, then rolls back and says so
# Appended to psql's input when a restore must not commit: it raises an error in every lexer
# state (ends a COPY, fails as a backslash command, fails as SQL), so ON_ERROR_STOP stops psql
# and --single-transaction rolls everything back, the DROP SCHEMA included.
ABORT = (b"\n\\.\n;\n\\runbook_restore_aborted\n"
         b"SELECT 'restore aborted by runbook'::runbook_restore_aborted;\n")


class SnapshotError(RunbookError):
    """A snapshot file or request is unusable; nothing was changed."""

    exit_code = ExitCode.USAGE


# --- connection ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """Who pg_dump/psql connect as, parsed from DATABASE_URL (percent-decoded)."""

    user: str
    password: str = field(repr=False)
    host: str
    port: int
    dbname: str
    container: str

    def exec_env(self) -> dict[str, str]:
        """Our environment plus PGPASSWORD, which `docker exec -e PGPASSWORD` copies inward."""
        env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
        if self.password:
            env["PGPASSWORD"] = self.password
        return env

    def exec_prefix(self, *, stdin: bool = False) -> list[str]:
        argv = ["docker", "exec"]
        if stdin:
            argv.append("-i")
        if self.password:
            argv += ["-e", "PGPASSWORD"]  # no value: taken from exec_env(), never argv
        return [*argv, self.container]

    def connection_args(self) -> list[str]:
        return ["--no-password", "--host", IN_CONTAINER_HOST, "--port", IN_CONTAINER_PORT,
                "--username", self.user, "--dbname", self.dbname]

    def redact(self, text: str) -> str:
        from runbook.journal import redact

        return redact(text, [self.password] if self.password else [])


def target(env: Environment) -> Target:
    """Parse the environment's DATABASE_URL; never echo it, it holds the password."""
    from psycopg import conninfo

    from runbook import database

    variable = env.database.url_variable
    url = database.url(env)  # checked encoding, password registered as a secret
    fix = (f"write {variable} as postgresql://USER:PASSWORD@HOST:PORT/DB and percent-encode "
           "@ % / : in the password (@ -> %40, % -> %25, / -> %2F)")
    try:
        params = conninfo.conninfo_to_dict(url)
    except Exception:
        raise UsageError(f"{variable} is not a valid PostgreSQL URL", fix) from None
    user = str(params.get("user") or "")
    dbname = str(params.get("dbname") or user)
    if not user:
        raise UsageError(f"{variable} names no user", fix)
    if "@" in dbname or "/" in dbname or "@" in str(params.get("host") or ""):
        raise UsageError(f"{variable} does not parse cleanly: its password probably holds an "
                         "unencoded @ or /", fix)
    try:
        port = int(str(params.get("port") or "5432").split(",")[0])
    except ValueError:
        raise UsageError(f"{variable} has an invalid port", fix) from None
    return Target(user=user, password=str(params.get("password") or ""),
                  host=str(params.get("host") or "localhost"), port=port, dbname=dbname,
                  container=env.database.container)


def dump_command(tgt: Target, snapshot_id: str | None = None) -> list[str]:
    """The exact pg_dump invocation (inside the database container)."""
    argv = [*tgt.exec_prefix(), "pg_dump", *DUMP_FLAGS, *tgt.connection_args()]
    if snapshot_id:
        argv += ["--snapshot", snapshot_id]
    return argv


def replay_command(tgt: Target) -> list[str]:
    """psql reading stdin (`-f -`, which --single-transaction needs) in one transaction."""
    return [*tgt.exec_prefix(stdin=True), "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
            "--single-transaction", "--file", "-", *tgt.connection_args()]


def _require_container(env: Environment) -> None:
    from runbook import docker

    info = docker.inspect(env.database.container)
    if not info.running:
        state = "does not exist" if not info.exists else f"is {info.status}"
        raise database.DatabaseError(
            f"database unreachable: container {env.database.container} {state}",
            f"start it (`docker start {env.database.container}`) and check `docker ps`")


# --- table statistics --------------------------------------------------------------------------

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


@dataclass(frozen=True)
class TableStats:
    rows: int
    max_created_at: str | None = None  # text as Postgres prints it; None without the column
    has_created_at: bool = False


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


def _schema_row(conn: Any) -> database.SchemaVersion:
    if conn.execute("SELECT to_regclass('public.schema_migrations')").fetchone()[0] is None:
        return database.SchemaVersion(0, False)
    row = conn.execute("SELECT version, dirty FROM public.schema_migrations LIMIT 1").fetchone()
    return database.SchemaVersion(int(row[0]), bool(row[1])) if row else database.SchemaVersion(
        0, False)


@contextlib.contextmanager
def _read_snapshot(env: Environment) -> Iterator[Any]:
    """A read-only REPEATABLE READ transaction: one consistent view for stats (and pg_dump)."""
    with database.connect(env) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield conn
        finally:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")


def current_state(env: Environment) -> tuple[database.SchemaVersion, dict[str, TableStats]]:
    """The schema version and per-table stats right now, read consistently."""
    with _read_snapshot(env) as conn:
        return _schema_row(conn), table_stats(conn)


# --- snapshot files ----------------------------------------------------------------------------

def _utc(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _fmt(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24}h"


@dataclass(frozen=True)
class Snapshot:
    """One `.sql.gz` and what its sidecar says (meta is None for a file without one)."""

    path: Path
    meta: Mapping[str, Any] | None = None
    problems: tuple[str, ...] = ()

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
    def database(self) -> str | None:
        if self._m("database"):
            return str(self._m("database"))
        match = NAME_RE.match(self.stem)
        return match["db"] if match else None

    @property
    def timestamp(self) -> datetime:
        if (value := _utc(self._m("timestamp"))) is not None:
            return value
        match = NAME_RE.match(self.stem)
        if match:
            with contextlib.suppress(ValueError):
                return datetime.strptime(match["date"] + match["time"],
                                         "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        try:
            return datetime.fromtimestamp(self.path.stat().st_mtime, UTC)
        except OSError:
            return datetime.fromtimestamp(0, UTC)

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
    def dirty(self) -> bool:
        return bool(self._m("dirty"))

    @property
    def sha256(self) -> str | None:
        return self._m("sha256") or None

    @property
    def deployment_id(self) -> str:
        return str(self._m("deployment_id") or "")

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
        """Its own expires_at when recorded, else taken + the environment's retention."""
        return _utc(self._m("expires_at")) or self.timestamp + timedelta(days=retention_days)

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
            "problems": list(self.problems),
        }


def load(path: Path) -> Snapshot:
    """Read a snapshot and its sidecar; an unreadable sidecar is a problem, not a crash."""
    stem = path.name.removesuffix(SUFFIX)
    meta_path = path.with_name(stem + META_SUFFIX)
    problems: list[str] = []
    meta: dict[str, Any] | None = None
    if meta_path.exists():
        try:
            loaded = json.loads(meta_path.read_text())
            if isinstance(loaded, dict):
                meta = loaded
            else:
                problems.append(f"{meta_path.name} is not a JSON object")
        except (OSError, ValueError) as exc:
            problems.append(f"cannot read {meta_path.name}: {exc}")
    if not path.exists():
        problems.append(f"{path.name} is missing")
    return Snapshot(path, meta, tuple(problems))


def list_snapshots(env: Environment) -> list[Snapshot]:
    """Every snapshot in the environment's folder, newest first."""
    directory = env.database.snapshot_dir
    if not directory.is_dir():
        return []
    found = [load(p) for p in directory.glob(f"*{SUFFIX}") if not p.name.startswith(".")]
    return sorted(found, key=lambda s: (s.timestamp, _mtime_ns(s.path), s.name), reverse=True)


def _mtime_ns(path: Path) -> int:
    """Orders snapshots taken within the same second (names only carry seconds)."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def find(env: Environment, ref: str | Path | None = None) -> Snapshot:
    """A snapshot by path, file name or stem (in snapshot_dir); None means the newest."""
    if ref is None or str(ref) == "":
        snaps = list_snapshots(env)
        if not snaps:
            raise SnapshotError(f"no snapshots in {env.database.snapshot_dir}",
                                f"take one: `runbook snapshot create {env.name}`",
                                exit_code=ExitCode.PRECONDITION)
        return snaps[0]
    text = str(ref)
    candidates = [Path(text).expanduser()]
    if os.sep not in text:
        base = env.database.snapshot_dir
        stem = text.removesuffix(SUFFIX).removesuffix(META_SUFFIX)
        candidates = [base / (stem + SUFFIX), *candidates]
    for candidate in candidates:
        if candidate.name.endswith(META_SUFFIX):
            candidate = candidate.with_name(candidate.name.removesuffix(META_SUFFIX) + SUFFIX)
        if candidate.is_file():
            return load(candidate)
    raise SnapshotError(f"snapshot {text} does not exist",
                        f"pick one from `runbook snapshot list {env.name}` (folder "
                        f"{env.database.snapshot_dir})")


def latest_before(env: Environment, migration_version: int | None, *,
                  deployment_id: str | None = None, before: datetime | None = None,
                  ) -> Snapshot | None:
    """The newest usable snapshot whose database was at `migration_version`.

    That is the state a deployment which ran with that version can run on again, with the
    least data lost. A snapshot made for `deployment_id` (its pre-deploy snapshot) wins
    when there is one; `before` drops snapshots taken later than that moment.
    """
    found = [s for s in list_snapshots(env) if s.usable
             and (migration_version is None or s.migration_version == migration_version)
             and (before is None or s.timestamp <= before)]
    if deployment_id:
        own = [s for s in found if s.deployment_id == deployment_id]
        if own:
            return own[0]
    return found[0] if found else None


def _reason_slug(reason: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", reason.lower()).strip("-")[:40].strip("-")
    return slug or "manual"


def snapshot_stem(db: str, when: datetime, reason: str) -> str:
    return f"{PREFIX}{db}_{when.astimezone(UTC):%Y%m%d_%H%M%S}_{_reason_slug(reason)}"


def _free_stem(directory: Path, db: str, when: datetime, reason: str) -> str:
    stem = snapshot_stem(db, when, reason)
    candidate, n = stem, 1
    while (directory / (candidate + SUFFIX)).exists() or (
            directory / (candidate + META_SUFFIX)).exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_space(directory: Path, what: str) -> PreconditionError:
    return PreconditionError(
        f"no disk space in {directory} for {what}; nothing was changed",
        "free space there (`df -h`, `runbook snapshot cleanup`) or point SNAPSHOT_DIR / "
        "[database] snapshot_dir at a bigger disk")


def _ensure_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise PreconditionError(f"cannot create snapshot folder {directory}: {exc.strerror}",
                                "create it (mode 0700) or set [database] snapshot_dir") from None
    if not os.access(directory, os.W_OK):
        raise PreconditionError(f"snapshot folder {directory} is not writable",
                                "fix its owner/permissions or set [database] snapshot_dir")


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _Hasher:
    """A write-through file wrapper that hashes and counts the compressed bytes."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        if data:
            self.fh.write(data)
            self.sha.update(data)
            self.size += len(data)


def _stderr_line(fh: IO[bytes], tgt: Target) -> str:
    fh.seek(0)
    text = fh.read(65536).decode(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "ERROR" in ln or "error:" in ln or "FATAL" in ln]
    chosen = (errors or lines or ["no output"])[0]
    return tgt.redact(chosen)[:300]


def create(env: Environment, reason: str = "manual", *, git_commit: str = "",
           deployment_id: str = "", expected_migration_version: int | None = None,
           ) -> Snapshot:
    """Dump the database to snapshot_dir; returns the finished, fsynced snapshot.

    Fails before writing anything when the database is unreachable, and removes its partial
    file when the disk fills up or pg_dump fails.
    """
    tgt = target(env)
    directory = env.database.snapshot_dir
    _ensure_dir(directory)
    _require_container(env)
    began = time.monotonic()
    when = datetime.now(UTC).replace(microsecond=0)
    stem = _free_stem(directory, tgt.dbname, when, reason)
    final = directory / (stem + SUFFIX)
    tmp = directory / f".{stem}{SUFFIX}.{secrets.token_hex(4)}.partial"
    with _read_snapshot(env) as conn:
        snapshot_id = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
        schema = _schema_row(conn)
        stats = table_stats(conn)
        server = conn.execute("SHOW server_version").fetchone()[0]
        sha, size = _dump_to(tmp, dump_command(tgt, snapshot_id), tgt, directory)
    meta: dict[str, Any] = {
        "snapshot_name": final.name,
        "database": tgt.dbname,
        "host": tgt.host,
        "port": tgt.port,
        "timestamp": _fmt(when),
        "reason": _reason_slug(reason),
        "git_commit": git_commit or "",
        "deployment_id": deployment_id or "",
        "retention_days": env.database.retention_days,
        "expires_at": _fmt(when + timedelta(days=env.database.retention_days)),
        "size_mb": round(size / 1048576, 3),
        "duration_seconds": round(time.monotonic() - began, 3),
        "migration_version": schema.version,
        "dirty": schema.dirty,
        "sha256": sha,
        "tables": {k: {"rows": v.rows, "max_created_at": v.max_created_at,
                       "has_created_at": v.has_created_at} for k, v in stats.items()},
        "environment": env.name,
        "server_version": str(server),
        "format": "pg_dump plain, gzip",
        "created_by": "togather-runbook",
    }
    if expected_migration_version is not None and expected_migration_version != schema.version:
        meta["warning"] = (f"the caller expected schema {expected_migration_version}, the "
                           f"database was at {schema.version}")
    try:
        _write_json_atomic(directory / (stem + META_SUFFIX), meta)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        (directory / (stem + META_SUFFIX)).unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(directory, "the snapshot") from None
        raise PreconditionError(f"cannot write snapshot {final}: {exc.strerror}",
                                "check the folder's permissions and disk") from None
    return Snapshot(final, meta)


def _dump_to(tmp: Path, argv: list[str], tgt: Target, directory: Path) -> tuple[str, int]:
    """Stream pg_dump's stdout through gzip into `tmp` (0600, fsynced); (sha256, size)."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(directory, "the snapshot") from None
        raise PreconditionError(f"cannot write in {directory}: {exc.strerror}",
                                "check the folder's permissions") from None
    proc: subprocess.Popen[bytes] | None = None
    tail = b""
    try:
        with os.fdopen(fd, "wb", buffering=CHUNK) as fh, tempfile.TemporaryFile() as err:
            out = _Hasher(fh)
            try:
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                        stdin=subprocess.DEVNULL, env=tgt.exec_env())
            except FileNotFoundError:
                raise PreconditionError("the docker command is not installed",
                                        "install the Docker CLI") from None
            assert proc.stdout is not None
            compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
            while chunk := proc.stdout.read(CHUNK):
                tail = (tail + chunk)[-4096:]
                out.write(compressor.compress(chunk))
            out.write(compressor.flush())
            code = proc.wait()
            if code != 0:
                raise database.DatabaseError(
                    f"pg_dump failed in {tgt.container} (exit {code}): {_stderr_line(err, tgt)}",
                    f"check the database (`docker logs {tgt.container}`) and "
                    "DATABASE_URL's user and password")
            if TRAILER not in tail:
                raise database.DatabaseError("pg_dump ended without its 'dump complete' trailer",
                                             f"check `docker logs {tgt.container}` and retry")
            fh.flush()
            os.fsync(fh.fileno())
        return out.sha.hexdigest(), out.size
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(directory, "the snapshot") from None
        raise PreconditionError(f"cannot write the snapshot in {directory}: {exc.strerror}",
                                "check the folder's permissions and disk") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def pre_deploy_snapshot(env: Environment, deployment_id: str, git_commit: str,
                        migration_version: int | None = None) -> Snapshot:
    """The snapshot deploy takes right before migrating, tied to the deployment it protects.

    The recorded migration_version is read from the database in the dump's own snapshot;
    the caller's value is only a cross-check (a mismatch is written as a warning).
    """
    return create(env, "pre-deploy", git_commit=git_commit, deployment_id=deployment_id,
                  expected_migration_version=migration_version)


@dataclass(frozen=True)
class CleanupResult:
    removed: list[Snapshot]
    kept: list[Snapshot]
    orphans: list[Path]  # leftover .partial files and sidecars without their dump


def cleanup(env: Environment, *, now: datetime | None = None, dry_run: bool = False,
            ) -> CleanupResult:
    """Remove snapshots past their own expires_at (sidecar first read, then both files)."""
    now = now or datetime.now(UTC)
    retention = env.database.retention_days
    removed, kept = [], []
    for snap in list_snapshots(env):
        if snap.expires_at(retention) <= now:
            removed.append(snap)
            if not dry_run:
                snap.path.unlink(missing_ok=True)
                snap.meta_path.unlink(missing_ok=True)
        else:
            kept.append(snap)
    orphans: list[Path] = []
    directory = env.database.snapshot_dir
    if directory.is_dir():
        day_ago = time.time() - 86400
        for path in directory.iterdir():
            stale_partial = path.name.endswith(".partial") and path.stat().st_mtime < day_ago
            lone_meta = (path.name.endswith(META_SUFFIX) and not path.name.startswith(".")
                         and not path.with_name(path.name.removesuffix(META_SUFFIX)
                                                + SUFFIX).exists()
                         and Snapshot(path.with_name(path.name.removesuffix(META_SUFFIX)
                                                     + SUFFIX), _safe_json(path))
                         .expires_at(retention) <= now)
            if stale_partial or lone_meta:
                orphans.append(path)
                if not dry_run:
                    path.unlink(missing_ok=True)
    return CleanupResult(removed, kept, orphans)


def _safe_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- verification ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verified:
    """What a full read of the file proved, before anything touches the database."""

    snapshot: Snapshot
    sha256: str
    migration_version: int  # from the dump's own schema_migrations (0: none)
    dirty: bool
    schemas: tuple[bytes, ...]  # `CREATE SCHEMA x` names in the dump, as written
    database: str


_SM_HEADER = b"\nCOPY public.schema_migrations "
_SCHEMA_RE = re.compile(rb"^CREATE SCHEMA ([^;\n]+);$", re.M)
_SM_RE = re.compile(rb"^COPY public\.schema_migrations \(([^)]*)\) FROM stdin;\n(.*?)^\\\.$",
                    re.M | re.S)


class _Scanner:
    """Finds schema_migrations' rows and CREATE SCHEMA lines in the streamed SQL."""

    def __init__(self) -> None:
        self.carry = b""
        self.tail = b""
        self.schemas: list[bytes] = []
        self.sm: tuple[int, bool] | None = None

    def feed(self, chunk: bytes) -> None:
        self.tail = (self.tail + chunk)[-4096:]
        buf = self.carry + chunk
        cut = buf.rfind(b"\n") + 1
        start = buf.rfind(_SM_HEADER, 0, cut)
        if start != -1 and buf.find(b"\n\\.\n", start) == -1:
            cut = start + 1  # keep the unfinished COPY block for the next chunk
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
        if b"COPY public.schema_migrations " in piece:
            match = _SM_RE.search(piece)
            if match:
                columns = [c.strip() for c in match.group(1).decode().split(",")]
                rows = [r for r in match.group(2).decode().splitlines() if r]
                if rows:
                    values = dict(zip(columns, rows[0].split("\t"), strict=False))
                    with contextlib.suppress(ValueError, KeyError):
                        self.sm = (int(values["version"]), values.get("dirty") == "t")
                else:
                    self.sm = (0, False)


def _chunks(path: Path, sha: Any) -> Iterator[bytes]:
    """Decompressed chunks of `path`, hashing the compressed bytes on the way."""

    class Tee:
        def __init__(self, raw: IO[bytes]) -> None:
            self.raw = raw

        def read(self, n: int = -1) -> bytes:
            data = self.raw.read(n)
            sha.update(data)
            return data

    with open(path, "rb") as raw:
        tee = Tee(raw)
        with gzip.GzipFile(fileobj=tee, mode="rb") as gz:  # type: ignore[call-overload]
            while chunk := gz.read(CHUNK):
                yield chunk
        while rest := raw.read(CHUNK):  # gzip may stop short of trailing bytes
            sha.update(rest)


def _bad_file(snap: Snapshot, problem: str) -> SnapshotError:
    return SnapshotError(f"snapshot {snap.name} {problem}; nothing was changed",
                         "pick another one (`runbook snapshot list`); keep this file for "
                         "inspection")


def verify(env: Environment, snap: Snapshot) -> Verified:
    """Read the whole file (checksum, gzip CRC, dump trailer) and check it fits this database.

    Read-only; raises a one-line SnapshotError (USAGE) for a missing, truncated, corrupt or
    foreign snapshot.
    """
    if not snap.path.is_file():
        raise SnapshotError(f"snapshot {snap.path} does not exist; nothing was changed",
                            f"pick one from `runbook snapshot list {env.name}`")
    if snap.problems:
        raise _bad_file(snap, "has an unreadable sidecar: " + "; ".join(snap.problems))
    tgt = target(env)
    if snap.database is None:
        raise SnapshotError(f"cannot tell which database {snap.name} is of (no sidecar, "
                            "no togather_<db>_... name); nothing was changed",
                            "add its .meta.json or rename it "
                            "togather_<db>_<YYYYMMDD_HHMMSS>_<reason>.sql.gz")
    if snap.database != tgt.dbname:
        raise SnapshotError(f"snapshot {snap.name} is of database {snap.database!r}, this "
                            f"environment's database is {tgt.dbname!r}; nothing was changed",
                            f"pick a snapshot of {tgt.dbname!r} "
                            f"(`runbook snapshot list {env.name}`)")
    recorded_env = (snap.meta or {}).get("environment")
    if recorded_env and recorded_env != env.name:
        raise SnapshotError(f"snapshot {snap.name} was taken in {recorded_env}, not "
                            f"{env.name}; nothing was changed",
                            f"pick a snapshot of {env.name} (`runbook snapshot list {env.name}`)")
    sha = hashlib.sha256()
    scanner = _Scanner()
    try:
        for chunk in _chunks(snap.path, sha):
            scanner.feed(chunk)
    except EOFError:
        raise _bad_file(snap, "is truncated (the gzip stream ends early)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise _bad_file(snap, f"is corrupt ({exc})") from None
    except OSError as exc:
        raise _bad_file(snap, f"cannot be read ({exc.strerror or exc})") from None
    scanner.finish()
    digest = sha.hexdigest()
    if snap.sha256 and digest != snap.sha256:
        raise _bad_file(snap, "does not match its recorded sha256 (changed or corrupt)")
    if TRAILER not in scanner.tail:
        raise _bad_file(snap, "is incomplete: no 'dump complete' trailer (pg_dump was cut off)")
    version, dirty = scanner.sm or (0, False)
    if snap.migration_version is not None and snap.migration_version != version:
        raise _bad_file(snap, f"holds schema_migrations {version} but its sidecar says "
                              f"{snap.migration_version}")
    return Verified(snap, digest, version, dirty, tuple(dict.fromkeys(scanner.schemas)),
                    tgt.dbname)


# --- data-loss window --------------------------------------------------------------------------

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

    now = now or datetime.now(UTC)
    then = snap.tables
    seconds = (now - snap.timestamp).total_seconds()
    if not then:
        return LossWindow(snap.name, snap.timestamp, seconds, (), known=False)
    losses: list[TableLoss] = []
    with _read_snapshot(env) as conn:
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


# --- restore -----------------------------------------------------------------------------------

@dataclass
class RestoreRun:
    """Shared between the restore steps while they run (and readable by the caller after)."""

    snapshot: Snapshot
    verified: Verified
    safety: Snapshot | None = None
    stopped: list[str] = field(default_factory=list)
    restored: bool = False


def _prelude(verified: Verified) -> bytes:
    """Drop what the dump does not know about: its schemas go, then public comes back empty."""
    drops = b"".join(b"DROP SCHEMA IF EXISTS " + name + b" CASCADE;\n"
                     for name in verified.schemas if name != b"public")
    return (b"SET client_min_messages = warning;\n"
            b"SET lock_timeout = '" + LOCK_TIMEOUT.encode() + b"';\n"
            + drops + b"DROP SCHEMA IF EXISTS public CASCADE;\nCREATE SCHEMA public;\n"
            b"GRANT USAGE ON SCHEMA public TO PUBLIC;\n")


def replay(env: Environment, verified: Verified) -> None:
    """Feed prelude + dump to one `psql --single-transaction`; commit only a clean, whole file.

    The compressed bytes are hashed again while streaming: a file that changed or broke since
    verify() gets ABORT instead of EOF, so psql rolls back and the database stays as it was.
    """
    tgt = target(env)
    snap = verified.snapshot
    sha = hashlib.sha256()
    problem: str | None = None
    tail = b""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(replay_command(tgt), stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=err, env=tgt.exec_env())
        assert proc.stdin is not None
        try:
            try:
                proc.stdin.write(_prelude(verified))
                for chunk in _chunks(snap.path, sha):
                    tail = (tail + chunk)[-4096:]
                    proc.stdin.write(chunk)
            except BrokenPipeError:
                pass  # psql stopped on an error: its exit code tells
            except EOFError:
                problem = "it is truncated (the gzip stream ends early)"
            except (gzip.BadGzipFile, zlib.error) as exc:
                problem = f"it is corrupt ({exc})"
            except OSError as exc:
                problem = f"it cannot be read ({exc.strerror or exc})"
            if problem is None and proc.poll() is None:
                if sha.hexdigest() != verified.sha256:
                    problem = "its checksum changed since it was verified"
                elif TRAILER not in tail:
                    problem = "it has no 'dump complete' trailer"
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
        if problem is None and code == 0:
            return
        why = (f"{snap.name}: {problem}" if problem
               else f"psql exit {code}: {_stderr_line(err, tgt)}")
        raise RunbookError(f"restore failed and was rolled back ({why})",
                           exit_code=ExitCode.FAILED_SAFELY)


def _check_matches(env: Environment, run: RestoreRun) -> str:
    """After the replay: schema_migrations and every recorded row count match the snapshot."""
    schema, stats = current_state(env)
    want = run.verified
    problems = []
    if (schema.version, schema.dirty) != (want.migration_version, want.dirty):
        problems.append(f"schema_migrations is {schema.describe()}, the snapshot holds "
                        f"{want.migration_version}{' (dirty)' if want.dirty else ''}")
    for table, old in run.snapshot.tables.items():
        now = stats.get(table)
        if now is None:
            problems.append(f"table {table} is missing")
        elif now.rows != old.rows:
            problems.append(f"{table} has {now.rows} rows, the snapshot recorded {old.rows}")
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


def restore_steps(env: Environment, snap: Snapshot | str | Path,
                  slots: Iterable[Slot | str] | None = None,
                  facts: dict[str, Any] | None = None) -> list[Step]:
    """The restore as plan steps; verifies the file NOW (raises, changing nothing).

    Steps: verify (done) -> safety snapshot -> stop the app slots (never the database) ->
    DROP SCHEMA + replay in one transaction -> verify schema_migrations and row counts.
    Starting the target slot afterwards is the caller's step. `facts` (JSON-friendly) gets
    restore_snapshot, restore_migration_version, and while running: safety_snapshot,
    stopped_containers (a list filled in place) and restored.
    """
    from runbook import docker

    snapshot = snap if isinstance(snap, Snapshot) else find(env, snap)
    verified = verify(env, snapshot)
    run = RestoreRun(snapshot, verified)
    facts = facts if facts is not None else {}
    facts.update(restore_snapshot=str(snapshot.path), safety_snapshot=None,
                 stopped_containers=run.stopped, restored=False,
                 restore_migration_version=verified.migration_version)
    chosen = [Slot(s) for s in (slots if slots is not None else env.slots)]
    containers = [env.slot(s).container for s in chosen]
    tgt = target(env)
    _require_container(env)
    now_schema, _ = current_state(env)  # unreachable -> refused here, before any change
    window = loss_window(env, snapshot).describe()

    def take_safety(ctx: StepContext) -> None:
        run.safety = create(env, "pre-restore")
        facts["safety_snapshot"] = str(run.safety.path)
        ctx.note(safety_snapshot=str(run.safety.path))

    def stop_slots(ctx: StepContext) -> None:
        from runbook import slots as slotmod

        for slot, name in zip(chosen, containers, strict=True):
            if docker.inspect(name).running:
                slotmod.stop(env, slot, maintenance=True)
                run.stopped.append(name)

        def restart() -> None:
            if run.restored:
                return  # old code on the restored schema: leave them stopped for a human
            for name in run.stopped:
                docker.start(name)

        ctx.on_failure("start the stopped app containers again (only when the database "
                       "was not restored)", restart)
        ctx.note(stopped=", ".join(run.stopped) or "none were running")

    def do_restore(ctx: StepContext) -> None:
        safety = run.safety.path if run.safety else None
        try:
            replay(env, verified)
        except RunbookError as exc:
            raise _after_failed_replay(env, run, exc, safety) from None
        run.restored = facts["restored"] = True
        ctx.cannot_undo(
            f"the database WAS restored to {snapshot.name} and the app slots are stopped: the "
            "service is down", f"fix the cause and run `runbook switch {env.name} --slot <target "
            f"slot>` or `runbook deploy {env.name} --version <known-good>`; the data from "
            f"before the restore is in {facts.get('safety_snapshot')}")
        ctx.note(restored=snapshot.name)

    def check(ctx: StepContext) -> None:
        ctx.note(found=_check_matches(env, run))

    recorded = snapshot.tables
    return [
        Step("verify-snapshot", "Verify the snapshot file (read-only, done)", {
            "file": str(snapshot.path),
            "taken": f"{_fmt(snapshot.timestamp)} ({snapshot.reason or '?'})",
            "database": f"{verified.database} (matches)",
            "sha256": verified.sha256 + (" (matches the sidecar)" if snapshot.sha256
                                         else " (no sidecar checksum)"),
            "schema_migrations": f"{verified.migration_version}"
                                 f"{' (dirty)' if verified.dirty else ''} (the database is at "
                                 f"{now_schema.describe()} now)",
            "rows recorded": ", ".join(f"{k} {v.rows}" for k, v in sorted(recorded.items()))
                             or "not recorded",
            "data written since": window,
        }),
        Step("safety-snapshot", "Take a safety snapshot of the database as it is now", {
            "folder": str(env.database.snapshot_dir),
            "command": " ".join(dump_command(tgt, "<exported snapshot>")) + " | gzip",
            "on failure": "stop here; nothing was changed",
        }, run=take_safety),
        Step("stop-app-slots", "Stop the app slots that use the database (not the database)", {
            "containers": ", ".join(containers) or "none",
            "kept running": env.database.container,
            "THE SERVICE IS DOWN": "from here until the switch: the one step allowed to stop "
                                   "the serving slot, so no write is lost during the restore",
        }, run=stop_slots),
        Step("restore-database", f"Replace the database with {snapshot.name} in one transaction", {
            "psql": " ".join(replay_command(tgt)),
            "stdin, first": _prelude(verified).decode().replace("\n", " ").strip(),
            "stdin, then": f"gunzip -c {snapshot.path} (sha256 checked while streaming)",
            "on failure": "psql rolls back: the database stays exactly as it was",
        }, run=do_restore),
        Step("verify-restore", "Verify schema_migrations and the row counts", {
            "expect": f"schema_migrations {verified.migration_version}; "
                      + (", ".join(f"{k} {v.rows}" for k, v in sorted(recorded.items()))
                         or "row counts not recorded"),
        }, run=check),
    ]


def _after_failed_replay(env: Environment, run: RestoreRun, exc: RunbookError,
                         safety: Path | None) -> RunbookError:
    """Prove the rollback left the data as it was (compare with the safety snapshot)."""
    back = (f"the safety snapshot {safety} holds the data as it was; restore it with "
            f"`runbook snapshot restore {env.name} {safety.name}`" if safety
            else "no safety snapshot was taken")
    same = False
    with contextlib.suppress(Exception):
        if run.safety is not None and run.safety.tables:
            schema, stats = current_state(env)
            same = (schema.version == run.safety.migration_version
                    and {k: v.rows for k, v in stats.items()}
                    == {k: v.rows for k, v in run.safety.tables.items()})
    if same:
        return RunbookError(f"{exc.message}; the database is unchanged",
                            f"fix the cause and run again; {back}",
                            exit_code=ExitCode.FAILED_SAFELY)
    return RunbookError(f"{exc.message}, but the database could not be proved unchanged",
                        f"check it now; {back}", exit_code=ExitCode.ATTENTION)


def start_step(env: Environment, facts: dict[str, Any], *, wait: bool = True) -> Step:
    """For a standalone restore: start again the app containers the restore stopped."""
    from runbook import docker, health

    def run(ctx: StepContext) -> None:
        stopped: list[str] = facts.get("stopped_containers") or []
        by_container = {env.slot(s).container: s for s in env.slots}
        for name in stopped:
            docker.start(name)
        if wait:
            for name in stopped:
                slot = by_container.get(name)
                if slot is None:
                    continue
                try:
                    health.wait_healthy(env, slot)
                except RunbookError as exc:
                    raise RunbookError(
                        f"the database was restored, but {name} is not healthy on it: "
                        f"{exc.message}",
                        f"its code may need the newer schema: roll the code back "
                        f"(`runbook rollback {env.name}`) or redeploy",
                        exit_code=ExitCode.ATTENTION) from None
        ctx.note(started=", ".join(stopped) or "none (none were running)")

    return Step("start-app-slots", "Start the app containers that were running, and gate them",
                {"containers": "those the restore stopped",
                 "health": f"wait up to {env.health.timeout:g}s each"}, run=run)


def restore(env: Environment, ref: str | Path | None = None, *, restart: bool = True,
            dry_run: bool = False, reason: str = "snapshot restore",
            confirm: Callable[..., bool] | None = None,
            progress: Callable[..., None] | None = None,
            notify: Callable[[str], None] | None = None) -> RunResult:
    """`runbook snapshot restore`: lock, verify, safety snapshot, restore, restart, journal."""
    from runbook.plan import Plan
    from runbook.run import perform

    def build(run_id: str) -> Plan:
        snap = find(env, ref)
        facts: dict[str, Any] = {}
        steps = restore_steps(env, snap, facts=facts)
        warnings = []
        with contextlib.suppress(RunbookError):
            warnings.append(loss_window(env, snap).describe())
        if restart:
            steps.append(start_step(env, facts))
        else:
            steps.append(Step("start-app-slots", "Start the app containers again",
                              skip="--keep-stopped"))
        summary = (f"restore {env.display}'s database from {snap.name} (schema "
                   f"{facts['restore_migration_version']})")
        return Plan("snapshot-restore", env, summary, steps, warnings, facts=facts)

    return perform(env, "snapshot-restore", build, dry_run=dry_run, reason=reason,
                   confirm=confirm, progress=progress, notify=notify)
