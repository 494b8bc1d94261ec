"""Snapshot files: names, sidecars, listing, lookup and retention (no database access).

File names follow the contract: `togather_<db>_<YYYYMMDD_HHMMSS UTC>_<reason>.sql.gz` with a
`<same stem>.meta.json` sidecar (mode 0600, written atomically by runbook/files.py). What a
sidecar says is read leniently: a file without one still lists, with its problems named.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from runbook import files
from runbook.environment import Environment
from runbook.errors import ExitCode, PreconditionError, RunbookError
from runbook.times import format_utc as _fmt
from runbook.times import parse_utc as _utc

SUFFIX = ".sql.gz"
META_SUFFIX = ".meta.json"
PREFIX = "togather_"
NAME_RE = re.compile(r"^togather_(?P<db>.+?)_(?P<date>\d{8})_(?P<time>\d{6})_(?P<reason>.+)$")


class SnapshotError(RunbookError):
    """A snapshot file or request is unusable; nothing was changed."""

    exit_code = ExitCode.USAGE


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


def no_space(directory: Path, what: str) -> PreconditionError:
    return PreconditionError(
        f"no disk space in {directory} for {what}; nothing was changed",
        "free space there (`df -h`, `runbook snapshot cleanup`) or point SNAPSHOT_DIR / "
        "[database] snapshot_dir at a bigger disk")


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
    kept: list[Snapshot]
    orphans: list[Path]  # a killed writer's temp files, and sidecars without their dump


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
            leftover = path.name.endswith(".partial") or files.temp_target(path.name) is not None
            stale_partial = leftover and path.stat().st_mtime < day_ago
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
