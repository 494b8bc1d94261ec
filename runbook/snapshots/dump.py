"""Taking a snapshot: pg_dump in the database's own MVCC snapshot, compressed, with a sidecar.

The dump reads an exported snapshot (`pg_export_snapshot` + `pg_dump --snapshot`) of the same
REPEATABLE READ transaction that counts the rows, so the sidecar describes the dump exactly.
pg_dump's stdout is gzip-compressed in this process (the command's `describe()` says so) into
a hidden `.partial` file (0600, fsynced) that is renamed only when the dump is complete: a
full disk or a failed pg_dump leaves no snapshot behind, only nothing.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import subprocess
import tempfile
import time
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from runbook import database, disk, files
from runbook.environment import Environment
from runbook.errors import PreconditionError
from runbook.snapshots import commands
from runbook.snapshots.commands import GZIP_LEVEL, DbCommand, Target, target
from runbook.snapshots.stats import (
    LARGE_OBJECTS,
    LARGE_OBJECTS_SQL,
    read_snapshot,
    refuse_unreadable,
    table_stats,
)
from runbook.snapshots.store import (
    META_SUFFIX,
    SUFFIX,
    Snapshot,
    dead_partials,
    ensure_dir,
    free_stem,
    no_space,
    reason_slug,
)
from runbook.snapshots.verify import CHUNK, TRAILER
from runbook.times import format_utc as _fmt

NAME_GUARD_WAIT = 30.0  # a flock on the folder is held only while a finished dump is named


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


def create(env: Environment, reason: str = "manual", *, git_commit: str = "",
           deployment_id: str = "", expected_migration_version: int | None = None,
           ) -> Snapshot:
    """Dump the database to snapshot_dir; returns the finished, fsynced snapshot.

    Fails before writing anything when the database is unreachable or holds what its user may
    not read (stats.refuse_unreadable), and removes its partial file when the disk fills up
    or pg_dump fails. What the caller must pass on (a schema other than expected, large
    objects the restore refuses) is the sidecar's `warning`.
    """
    tgt = target(env)
    directory = env.database.snapshot_dir
    commands.require_container(env)
    began = time.monotonic()
    when = datetime.now(UTC).replace(microsecond=0)
    held: list[int] = []  # the partial's flock, until the dump is named
    try:
        with read_snapshot(env) as conn:  # a lock wait that ran out is worded there
            refuse_unreadable(conn)  # what pg_dump would be refused, said before it runs
            # the folder once the database answers: a refusal for a container that does not
            # run or a database that does not answer made it (0700, with its parents) first
            ensure_dir(directory)
            stem = free_stem(directory, tgt.dbname, when, reason)  # the name while it runs
            tmp = directory / f".{stem}{SUFFIX}.{secrets.token_hex(4)}.partial"
            dead_partials(directory, remove=True)  # a killed run's dump may fill the disk
            snapshot_id = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
            schema, table = database.read_schema(conn, env.database.url_variable)
            stats = table_stats(conn)
            server = conn.execute("SHOW server_version").fetchone()[0]
            large_objects = bool(conn.execute(LARGE_OBJECTS_SQL).fetchone()[0])
            sha, size = _dump_to(tmp, commands.dump(tgt, snapshot_id), tgt, directory, held)
        meta: dict[str, Any] = {
            "snapshot_name": "",  # chosen when the dump is done (_publish)
            "database": tgt.dbname,
            "host": tgt.host,
            "port": tgt.port,
            "timestamp": _fmt(when),
            "reason": reason_slug(reason),
            "git_commit": git_commit or "",
            "deployment_id": deployment_id or "",
            "retention_days": env.database.retention_days,
            "expires_at": _fmt(when + timedelta(days=env.database.retention_days)),
            "size_mb": round(size / 1048576, 3),
            "duration_seconds": round(time.monotonic() - began, 3),
            "migration_version": schema.version,
            "dirty": schema.dirty,
            # which schema_migrations that is (the one the guard reads), as pg_dump names it:
            # verify reads the dump's copy of that one
            "migrations_table": table,
            "sha256": sha,
            "tables": {k: {"rows": v.rows, "max_created_at": v.max_created_at,
                           "has_created_at": v.has_created_at} for k, v in stats.items()},
            "environment": env.name,
            "server_version": str(server),
            "format": "pg_dump plain, gzip",
            "created_by": "togather-runbook",
        }
        warnings = []
        if expected_migration_version is not None and expected_migration_version != schema.version:
            warnings.append(f"the caller expected schema {expected_migration_version}, the "
                            f"database was at {schema.version}")
        if large_objects:  # said now, not first by the restore's refusal during an incident
            warnings.append(LARGE_OBJECTS)
        if warnings:
            meta["warning"] = "; ".join(warnings)
        return Snapshot(_publish(tmp, directory, tgt.dbname, when, reason, meta), meta)
    finally:
        for fd in held:
            os.close(fd)


def _publish(tmp: Path, directory: Path, db: str, when: datetime, reason: str,
             meta: dict[str, Any]) -> Path:
    """Name the finished dump and write its sidecar, under a flock on the folder itself (no
    file of ours among the host's snapshots): two runs ending in the same second (a
    `snapshot create` beside another) each chose the name free when they began, and the
    second rename replaced the first's snapshot."""
    final = directory / "?"
    stem = ""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if not files.flock_within(fd, NAME_GUARD_WAIT, 0.05):
                raise PreconditionError(
                    f"another process has held a lock on {directory} for over "
                    f"{NAME_GUARD_WAIT:.0f} s; the snapshot was not kept",
                    f"find it (`fuser {directory}`), then run again")
            stem = free_stem(directory, db, when, reason)
            final = directory / (stem + SUFFIX)
            meta["snapshot_name"] = final.name
            # readable by every operator (it holds no secret; the dump, which holds the
            # data, stays 0600): another's cleanup read root's 0600 sidecar as none, and
            # deleted the pre-deploy snapshot it protected (found by review)
            files.atomic_write(directory / (stem + META_SUFFIX),
                               (json.dumps(meta, indent=2) + "\n").encode(), default_mode=0o644)
            os.replace(tmp, final)
            files.fsync_dir(directory)
        finally:
            os.close(fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if stem:
            (directory / (stem + META_SUFFIX)).unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space(directory, "the snapshot") from None
        raise PreconditionError(f"cannot write snapshot {final}: {exc.strerror}",
                                "check the folder's permissions and disk") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def _dump_to(tmp: Path, cmd: DbCommand, tgt: Target, directory: Path,
             held: list[int]) -> tuple[str, int]:
    """Stream pg_dump's stdout through gzip into `tmp` (0600, fsynced); (sha256, size).

    The file is flocked from its creation through a duplicate descriptor appended to `held`
    (the caller closes it once the dump is named): a `.partial` whose lock can be taken is a
    killed run's, removed by the next snapshot or cleanup whatever its age."""
    reserve = _reserve(directory)
    _keep_room(directory, reserve, 0)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space(directory, "the snapshot") from None
        raise PreconditionError(f"cannot write in {directory}: {exc.strerror}",
                                "check the folder's permissions") from None
    held.append(os.dup(fd))
    fcntl.flock(held[-1], fcntl.LOCK_EX)  # a new file: nobody else holds it
    proc: subprocess.Popen[bytes] | None = None
    tail = b""
    try:
        with os.fdopen(fd, "wb", buffering=CHUNK) as fh, tempfile.TemporaryFile() as err:
            out = _Hasher(fh)
            proc = commands.spawn(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=err)
            assert proc.stdout is not None
            compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
            while chunk := proc.stdout.read(CHUNK):
                tail = (tail + chunk)[-4096:]
                out.write(compressor.compress(chunk))
                fh.flush()  # what the disk holds, so the room left is measured truly
                _keep_room(directory, reserve, out.size)
            out.write(compressor.flush())
            code = proc.wait()
            if code != 0:
                err.seek(0)
                # its --lock-wait-timeout, in any locale: the query it names is SQL
                kind = (database.LockWaitError if b"LOCK TABLE" in err.read(65536)
                        else database.DatabaseError)
                raise kind(
                    f"pg_dump failed in {tgt.container} (exit {code}): "
                    f"{commands.stderr_line(err, tgt)}",
                    f"check the database (`docker logs {tgt.container}`) and the user "
                    "and password (DATABASE_URL's, PGPASSWORD's or the password file's)")
            if TRAILER not in tail:
                raise database.DatabaseError("pg_dump ended without its 'dump complete' trailer",
                                             f"check `docker logs {tgt.container}` and retry")
            fh.flush()
            os.fsync(fh.fileno())
        return out.sha.hexdigest(), out.size
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space(directory, "the snapshot") from None
        raise PreconditionError(f"cannot write the snapshot in {directory}: {exc.strerror}",
                                "check the folder's permissions and disk") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _reserve(directory: Path) -> int:
    """The room a dump leaves free on its filesystem (disk.reserve says why)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return 0
    return disk.reserve(st.f_blocks * st.f_frsize)


def _keep_room(directory: Path, reserve: int, written: int) -> None:
    """Stop the dump (its partial file removed by the caller) once the filesystem is down to
    `reserve` free; before the first byte, refuse it."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if free >= reserve and (free > 0 or reserve > 0):
        return
    mib = 1024 * 1024
    done = f"stopped after {written / mib:.1f} MiB: " if written else ""
    raise PreconditionError(
        f"no disk space in {directory} for the snapshot: {done}{free / mib:.1f} MiB free, "
        f"under the {reserve / mib:.1f} MiB kept free for the database and the host (a full "
        "disk can stop Postgres); nothing was changed", no_space(directory, "it").fix)


def pre_deploy_snapshot(env: Environment, deployment_id: str, git_commit: str,
                        migration_version: int | None = None) -> Snapshot:
    """The snapshot deploy takes right before migrating, tied to the deployment it protects.

    The recorded migration_version is read from the database in the dump's own snapshot;
    the caller's value is only a cross-check (a mismatch is written as a warning).
    """
    return create(env, "pre-deploy", git_commit=git_commit, deployment_id=deployment_id,
                  expected_migration_version=migration_version)
