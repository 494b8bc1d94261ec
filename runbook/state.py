"""deployment-state.json: one model for the three dialects found on real hosts.

The documented dialect, the deploy script's and the Go CLI's all describe the same facts with
different keys. Reading normalizes them, and remembers what the file said. Writing patches that
original: every key and value another tool wrote stays exactly as written (nanosecond times, slot
keys, lock fields; absent fields stay absent), and only what changed is written, in the file's
own dialect and formatting. A rewrite with no change is byte-identical, so a rewrite by us never
destroys another tool's data (the bug that made the dialects corrupt each other). Every problem
surfaces as one StateError line naming the file, the key and the fix, because an operator reads
it in the middle of an incident.
"""

from __future__ import annotations

import copy
import getpass
import hashlib
import json
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runbook import files, times
from runbook.environment import ENV_NAMES, Slot, canonical_name
from runbook.errors import StateError

HISTORY_LIMIT = 50
DOCUMENTED, DEPLOY_SCRIPT, GO_CLI = "documented", "deploy-script", "go-cli"
DIALECTS = (DOCUMENTED, DEPLOY_SCRIPT, GO_CLI)
MAX_STATE_BYTES = 8 * 1024 * 1024  # a real file is a few KiB; anything this big is not ours
HEALTH_STATUSES = ("healthy", "degraded", "unhealthy", "unknown")
STATUSES = ("active", "deploying", "failed", "rolled_back", "superseded")
DEFAULT_IMAGE_REPOSITORY = "togather-server"

_VERSION = re.compile(r"[0-9a-f]{7}")
_COMMIT = re.compile(r"[0-9a-f]{40}")

# Keys the model owns; everything else rides along in `extra` untouched.
_DEPLOYMENT_KEYS = frozenset({
    "id", "version", "git_commit", "deployed_at", "deployed_by", "active_slot", "slot",
    "health_status", "status", "migrations_run", "rollback_count", "docker_image",
    "migration_version",
})
_TOP_KEYS = frozenset({
    "environment", "current_deployment", "previous_deployment", "deployment_history", "lock",
})
_LOCK_ORDER = ("locked", "lock_id", "locked_by", "locked_at", "lock_expires_at", "deployment_id",
               "pid", "hostname", "reason")
_LOCK_TIME_KEYS = ("locked_at", "lock_expires_at")
# The Go CLI's lock struct, in its field order; its zero times mean "not set".
_GO_LOCK_ORDER = ("locked", "locked_at", "locked_by", "reason", "expires_at")
_GO_ZERO = "0001-01-01T00:00:00Z"


def new_id(prefix: str) -> str:
    """An id shaped like the deploy script's (`dep_<16 hex ns>_<24 hex random>`): sortable."""
    return f"{prefix}_{time.time_ns():016x}_{secrets.token_hex(12)}"


def current_operator() -> str:
    """`user@host`, the deploy script's `deployed_by`; works without a passwd entry too."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


# One source for the state file's times: runbook/times.py (names kept for callers).
format_time = times.format_rfc3339
parse_time = times.parse_rfc3339


@dataclass(frozen=True)
class Deployment:
    """One deployment as every dialect describes it.

    `active_slot` is None only for history entries that never recorded it (the documented
    schema lets history omit it); current and previous deployments always have one.
    """

    id: str
    version: str  # 7-hex short commit, also the image tag
    git_commit: str
    deployed_at: datetime
    deployed_by: str
    active_slot: Slot | None
    health_status: str = "unknown"
    status: str | None = None
    migrations_run: int = 0
    rollback_count: int = 0
    image: str = ""  # "" = not recorded: [compose] image_repository:<version> (slots.image_of)
    migration_version: int | None = None  # schema_migrations.version this deployment ran with
    extra: Mapping[str, Any] = field(default_factory=dict)
    # The record as read (itself, holding the file's object in `raw`); None for a new record.
    # A writer patches `origin.raw` with what differs from `origin`, so nothing else moves.
    origin: Deployment | None = field(default=None, compare=False, repr=False)
    raw: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def with_(self, **changes: Any) -> Deployment:
        return replace(self, **changes)

    @property
    def slot(self) -> Slot:
        """The slot, for callers that need one; a history entry may not know it."""
        if self.active_slot is None:
            raise StateError(f"deployment {self.id} ({self.version}) does not record its slot",
                             "choose the slot explicitly")
        return self.active_slot

    @property
    def snapshot_path(self) -> str | None:
        """The Go CLI's pre-deploy snapshot, when it recorded one."""
        value = self.extra.get("snapshot_path")
        return value if isinstance(value, str) and value and value != "none" else None

    def matches(self, ref: str) -> bool:
        """True for its id, its short version, or any 7+ hex prefix of its commit."""
        ref = ref.strip().lower()
        if not ref:
            return False
        if ref in (self.id.lower(), self.version):
            return True
        return len(ref) >= 7 and self.git_commit.startswith(ref)


@dataclass(frozen=True)
class DeploymentState:
    """The whole file. `environment` is "" only when the file never said (a first-ever file)."""

    environment: str
    current: Deployment | None = None
    previous: Deployment | None = None
    history: tuple[Deployment, ...] = ()  # newest first
    lock: Mapping[str, Any] = field(default_factory=lambda: {"locked": False})
    extra: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""  # where it was read from, for messages
    # The state as read (itself, holding the document and its bytes); None for a new state.
    origin: DeploymentState | None = field(default=None, compare=False, repr=False)
    raw: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    raw_bytes: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def dialect(self) -> str:
        """The dialect of the file this state was read from (new states: the documented one)."""
        return dialect_of(self.origin.raw) if self.origin and self.origin.raw else DOCUMENTED

    def with_(self, **changes: Any) -> DeploymentState:
        return replace(self, **changes)

    def deployments(self) -> Iterator[Deployment]:
        """Current, previous, then history, each id once, newest information first."""
        seen: set[str] = set()
        for dep in (self.current, self.previous, *self.history):
            if dep is not None and dep.id not in seen:
                seen.add(dep.id)
                yield dep

    def find_version(self, ref: str) -> Deployment | None:
        """The deployment a user means by a version, commit prefix or id, newest first."""
        return next((d for d in self.deployments() if d.matches(ref)), None)

    def find_id(self, deployment_id: str) -> Deployment | None:
        return next((d for d in self.deployments() if d.id == deployment_id), None)

    @property
    def locked(self) -> bool:
        return bool(self.lock.get("locked"))


# ---------------------------------------------------------------------------------------------
# Reading


class _Reader:
    """Builds one-line StateErrors that name the file, the key and the fix."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str, fix: str) -> StateError:
        where = f"{self.source}: {key}" if key else self.source
        return StateError(f"{where}: {problem}", fix)

    def string(self, obj: Mapping[str, Any], key: str, where: str, *,
               required: bool = True) -> str | None:
        if key not in obj or obj[key] is None:
            if required:
                raise self.fail(f"{where}.{key}", "required key is missing",
                                f"add {key!r} to that object")
            return None
        value = obj[key]
        if not isinstance(value, str):
            raise self.fail(f"{where}.{key}", f"expected a string, got {_show(value)}",
                            f"write {key!r} as a JSON string")
        return value

    def count(self, obj: Mapping[str, Any], key: str, where: str) -> int | None:
        value = obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(f"{where}.{key}",
                            f"expected a non-negative integer, got {_show(value)}",
                            f"write {key!r} as a whole number >= 0")
        return value

    def time(self, value: str, key: str, fix: str) -> datetime | None:
        try:
            return parse_time(value)
        except (ValueError, OverflowError) as exc:
            raise self.fail(key, f"{_show(value)} is not a valid time ({exc})", fix) from None


def _show(value: Any) -> str:
    """A short, single-line rendering of a bad value for an error message."""
    try:
        text = repr(value) if isinstance(value, str) else json.dumps(value, default=repr)[:60]
    except (ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _derived_id(version: str, commit: str, deployed_at: datetime) -> str:
    """A stable id for the Go CLI's entries, which have none: same entry, same id, every read."""
    digest = hashlib.sha256(f"{commit}|{version}|{format_time(deployed_at)}".encode()).hexdigest()
    return f"dep_{digest[:16]}_{digest[16:40]}"


def _deployment(obj: Any, where: str, r: _Reader, *, need_slot: bool) -> Deployment:
    if not isinstance(obj, Mapping):
        raise r.fail(where, f"expected an object or null, got {_show(obj)}",
                     "restore the file from a backup or re-record the deployment")
    raw_version = r.string(obj, "version", where)
    assert raw_version is not None
    version = raw_version.strip().lower()
    if not _VERSION.fullmatch(version):
        raise r.fail(f"{where}.version", f"{_show(raw_version)} is not a 7-hex short commit",
                     "write the short git commit, e.g. \"abc1234\"")
    raw_commit = r.string(obj, "git_commit", where)
    assert raw_commit is not None
    commit = raw_commit.strip().lower()
    if not _COMMIT.fullmatch(commit):
        raise r.fail(f"{where}.git_commit", f"{_show(raw_commit)} is not a 40-hex commit",
                     "write the full git commit (git rev-parse HEAD)")
    raw_at = r.string(obj, "deployed_at", where)
    assert raw_at is not None
    deployed_at = r.time(raw_at, f"{where}.deployed_at", "write an RFC 3339 time with a zone, "
                         "e.g. 2026-01-28T10:30:00Z")
    if deployed_at is None:
        raise r.fail(f"{where}.deployed_at", "is the zero time, so the deployment has no date",
                     "write the real deployment time (RFC 3339)")
    dep_id = r.string(obj, "id", where, required=False)
    if dep_id is not None and not dep_id.strip():
        raise r.fail(f"{where}.id", "is empty", "write the deployment id or remove the key")
    deployed_by = r.string(obj, "deployed_by", where, required=False) or "unknown"

    slots: dict[str, str] = {}
    for key in ("active_slot", "slot"):
        value = r.string(obj, key, where, required=False)
        if value:  # Go writes "" for an unset slot
            if value.strip().lower() not in ("blue", "green"):
                raise r.fail(f"{where}.{key}", f"{_show(value)} is not a slot",
                             "write \"blue\" or \"green\"")
            slots[key] = value.strip().lower()
    if len(set(slots.values())) > 1:
        raise r.fail(f"{where}.active_slot", f"says {slots['active_slot']} but slot says "
                     f"{slots['slot']}", "check which slot serves it (docker ps) and keep that one")
    slot_name = slots.get("active_slot") or slots.get("slot")
    if slot_name is None and need_slot:
        raise r.fail(f"{where}.active_slot", "required key is missing",
                     "add \"active_slot\": \"blue\" or \"green\" (the slot it runs in)")

    health = r.string(obj, "health_status", where, required=False) or "unknown"
    if health not in HEALTH_STATUSES:
        raise r.fail(f"{where}.health_status", f"{_show(health)} is not a health status",
                     "write one of " + ", ".join(HEALTH_STATUSES))
    status = r.string(obj, "status", where, required=False) or None
    if status is not None and status not in STATUSES:
        raise r.fail(f"{where}.status", f"{_show(status)} is not a deployment status",
                     "write one of " + ", ".join(STATUSES))
    image = r.string(obj, "docker_image", where, required=False) or ""
    migration_version = r.count(obj, "migration_version", where)
    dep = Deployment(
        id=(dep_id or _derived_id(version, commit, deployed_at)).strip(),
        version=version,
        git_commit=commit,
        deployed_at=deployed_at,
        deployed_by=deployed_by,
        active_slot=Slot(slot_name) if slot_name else None,
        health_status=health,
        status=status,
        migrations_run=r.count(obj, "migrations_run", where) or 0,
        rollback_count=r.count(obj, "rollback_count", where) or 0,
        image=image.strip(),
        migration_version=migration_version,
        extra={k: copy.deepcopy(v) for k, v in obj.items() if k not in _DEPLOYMENT_KEYS},
        raw=copy.deepcopy(dict(obj)),
    )
    object.__setattr__(dep, "origin", dep)
    return dep


def _lock(obj: Any, r: _Reader) -> dict[str, Any]:
    """Normalize the lock to the documented keys, keeping unknown ones."""
    if obj is None:
        return {"locked": False}
    if not isinstance(obj, Mapping):
        raise r.fail("lock", f"expected an object, got {_show(obj)}",
                     "write {\"locked\": false} if no deployment is running")
    if "locked" not in obj:
        raise r.fail("lock.locked", "required key is missing", "add \"locked\": false or true")
    if not isinstance(obj["locked"], bool):
        raise r.fail("lock.locked", f"expected true or false, got {_show(obj['locked'])}",
                     "write \"locked\": false or true")
    data = {k: copy.deepcopy(v) for k, v in obj.items()}
    named = {"locked_at": "locked_at", "lock_expires_at": "lock_expires_at"}
    if "expires_at" in data:  # the Go CLI's name
        go_value = data.pop("expires_at")
        if "lock_expires_at" not in data:
            data["lock_expires_at"] = go_value
            named["lock_expires_at"] = "expires_at"  # errors name the key the file has
    for key in _LOCK_TIME_KEYS:
        value = data.get(key)
        if value is None:
            data.pop(key, None)
            continue
        where = f"lock.{named[key]}"
        if not isinstance(value, str):
            raise r.fail(where, f"expected a time string, got {_show(value)}",
                         "write an RFC 3339 time or remove the key")
        if r.time(value, where, "write an RFC 3339 time or remove the key") is None:
            del data[key]  # Go's zero time: "not set"
    pid = data.get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
        raise r.fail("lock.pid", f"expected an integer, got {_show(pid)}",
                     "write the holder's process id as a number or remove the key")
    for key in ("lock_id", "locked_by", "deployment_id", "hostname", "reason"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise r.fail(f"lock.{key}", f"expected a string, got {_show(data[key])}",
                         f"write {key!r} as a string or remove it")
    ordered = {k: data[k] for k in _LOCK_ORDER if k in data}
    ordered.update((k, v) for k, v in data.items() if k not in ordered)
    return ordered


def _encode(text: str) -> bytes | None:
    try:
        return text.encode()
    except UnicodeEncodeError:  # lone surrogates: no file holds these bytes
        return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_state(text: str | bytes, source: str = "deployment-state.json", *,
                environment: str | None = None) -> DeploymentState:
    """Parse any dialect. `environment`, when given, fills a blank one and must match."""
    r = _Reader(source)
    raw_bytes = text if isinstance(text, bytes) else _encode(text)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise r.fail("", "is not UTF-8 text (binary or corrupted)",
                         "restore it from a backup or re-record the deployment") from None
    try:
        data = json.loads(text.removeprefix("\ufeff"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(
            exc, json.JSONDecodeError) else ""
        raise r.fail("", f"is not valid JSON ({detail}{where})",
                     "fix the syntax or restore it from a backup") from None
    if not isinstance(data, dict):
        raise r.fail("", f"expected a JSON object at the top, got {_show(data)}",
                     "restore it from a backup or re-record the deployment")
    try:
        state = _build(data, r, environment)
    except RecursionError:
        raise r.fail("", "is nested too deeply to be a deployment state file",
                     "restore it from a backup") from None
    state = replace(state, raw=data, raw_bytes=raw_bytes)
    object.__setattr__(state, "origin", state)
    return state


def _build(data: dict[str, Any], r: _Reader, environment: str | None) -> DeploymentState:
    if "environment" not in data:
        raise r.fail("environment", "required key is missing",
                     "add \"environment\": one of " + ", ".join(ENV_NAMES))
    env_value = data["environment"]
    if not isinstance(env_value, str):
        raise r.fail("environment", f"expected a string, got {_show(env_value)}",
                     "write one of " + ", ".join(ENV_NAMES))
    env_name = canonical_name(env_value.strip())
    if env_name and env_name not in ENV_NAMES:
        raise r.fail("environment", f"{_show(env_value)} is not an environment",
                     "write one of " + ", ".join(ENV_NAMES))

    current_raw = data.get("current_deployment")
    previous_raw = data.get("previous_deployment")
    history_raw = data.get("deployment_history")
    if history_raw is None:
        history_raw = []
    if not isinstance(history_raw, list):
        raise r.fail("deployment_history", f"expected an array, got {_show(history_raw)}",
                     "write an array of deployments (newest first) or []")
    current = None if current_raw is None else _deployment(
        current_raw, "current_deployment", r, need_slot=True)
    previous = None if previous_raw is None else _deployment(
        previous_raw, "previous_deployment", r, need_slot=True)
    history = tuple(_deployment(item, f"deployment_history[{i}]", r, need_slot=False)
                    for i, item in enumerate(history_raw))

    if not env_name and current is not None:
        # The deploy script never fills the top-level key but stamps each deployment.
        inner = current.extra.get("environment")
        if isinstance(inner, str) and canonical_name(inner) in ENV_NAMES:
            env_name = canonical_name(inner)
    if environment is not None:
        wanted = canonical_name(environment)
        if env_name and env_name != wanted:
            raise r.fail("environment", f"this file belongs to {env_name}, not {wanted}",
                         "point [state] file at this environment's state file")
        env_name = wanted
    return DeploymentState(
        environment=env_name,
        current=current,
        previous=previous,
        history=history,
        lock=_lock(data.get("lock"), r),
        extra={k: copy.deepcopy(v) for k, v in data.items() if k not in _TOP_KEYS},
        source=r.source,
    )


def read_state(path: Path, *, environment: str | None = None) -> DeploymentState:
    """Read and normalize the state file; a missing file is an error, never an empty state."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        raise StateError(f"{path}: no deployment has been recorded (the state file does not "
                         "exist)", "deploy first, or check [state] file in the environment "
                         "configuration") from None
    except OSError as exc:
        raise StateError(f"{path}: cannot read the state file ({exc.strerror or exc})",
                         "check the path and its permissions") from None
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(f"{path}: larger than {MAX_STATE_BYTES // (1024 * 1024)} MiB, so it is "
                         "not a deployment state file", "restore it from a backup")
    return parse_state(raw, str(path), environment=environment)


# ---------------------------------------------------------------------------------------------
# Writing


def dialect_of(doc: Mapping[str, Any]) -> str:
    """Which tool wrote this document: its keys give it away (CONTRACTS: three dialects)."""
    deps = [doc.get("current_deployment"), doc.get("previous_deployment")]
    history = doc.get("deployment_history")
    if isinstance(history, list):
        deps += history
    objects = [d for d in deps if isinstance(d, Mapping)]
    lock = doc.get("lock")
    if ((isinstance(lock, Mapping) and "expires_at" in lock)
            or any("slot" in d and "active_slot" not in d for d in objects)):
        return GO_CLI
    if (any(k in doc for k in ("active_slot", "slots", "last_deployment"))
            or any("environment" in d for d in objects)):
        return DEPLOY_SCRIPT
    return DOCUMENTED


def _same(a: Any, b: Any) -> bool:
    """JSON equality that also tells true from 1 and keeps key order: 'as written'."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _unchanged(dep: Deployment | None, was: Deployment | None) -> bool:
    """The same record as read, with no field changed (so its raw object is still the truth)."""
    if dep is None or was is None:
        return dep is was
    return dep.origin is not None and dep.origin is was.origin and dep == was


def format_time_as(value: datetime, dialect: str) -> str:
    """A new time in the file's own style: Go's RFC3339Nano trims trailing zero digits."""
    text = format_time(value)
    if dialect == GO_CLI and "." in text:
        head, frac = text[:-1].split(".")
        frac = frac.rstrip("0")
        text = f"{head}.{frac}Z" if frac else f"{head}Z"
    return text


def _new_deployment_json(dep: Deployment, dialect: str, environment: str) -> dict[str, Any]:
    """A record this tool creates (a deploy, a switch): in the file's dialect."""
    slot = None if dep.active_slot is None else dep.active_slot.value
    data: dict[str, Any]
    if dialect == GO_CLI:
        data = {"version": dep.version, "deployed_at": format_time_as(dep.deployed_at, dialect),
                "git_commit": dep.git_commit}
        if dep.image:
            data["docker_image"] = dep.image
        if slot is not None:
            data["slot"] = slot
        # The Go CLI ignores what it does not know; these keep our facts (and the id) readable.
        data.update(deployed_by=dep.deployed_by, id=dep.id, health_status=dep.health_status)
        if dep.status is not None:
            data["status"] = dep.status
        if dep.migrations_run:
            data["migrations_run"] = dep.migrations_run
        if dep.rollback_count:
            data["rollback_count"] = dep.rollback_count
    else:
        data = {"id": dep.id, "version": dep.version, "git_commit": dep.git_commit,
                "deployed_at": format_time(dep.deployed_at), "deployed_by": dep.deployed_by}
        if slot is not None:
            data["active_slot"] = slot
        data["health_status"] = dep.health_status
        if dep.status is not None:
            data["status"] = dep.status
        data["migrations_run"] = dep.migrations_run
        data["rollback_count"] = dep.rollback_count
        if dep.image:
            data["docker_image"] = dep.image
        if dialect == DEPLOY_SCRIPT and environment and "environment" not in dep.extra:
            data["environment"] = environment  # the deploy script stamps every deployment
    if dep.migration_version is not None:
        data["migration_version"] = dep.migration_version
    for key, value in dep.extra.items():
        if key not in data and key not in _DEPLOYMENT_KEYS:
            data[key] = copy.deepcopy(value)
    return data


def _patch_extra(out: dict[str, Any], extra: Mapping[str, Any],
                 was: Mapping[str, Any]) -> None:
    for key in [k for k in was if k not in extra]:
        out.pop(key, None)
    for key, value in extra.items():
        if key not in was or not _same(value, was[key]):
            out[key] = copy.deepcopy(value)


def _deployment_json(dep: Deployment, dialect: str = DOCUMENTED,
                     environment: str = "") -> dict[str, Any]:
    """The record as its file wrote it, with only the fields that changed written over it."""
    was = dep.origin
    if was is None or was.raw is None:
        return _new_deployment_json(dep, dialect, environment)
    out = copy.deepcopy(dict(was.raw))

    def put(key: str, value: Any, old: Any) -> None:
        if value == old and type(value) is type(old):
            return
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value

    put("id", dep.id, was.id)
    put("version", dep.version, was.version)
    put("git_commit", dep.git_commit, was.git_commit)
    if dep.deployed_at != was.deployed_at:
        out["deployed_at"] = format_time_as(dep.deployed_at, dialect)
    put("deployed_by", dep.deployed_by, was.deployed_by)
    if dep.active_slot != was.active_slot:
        keys = [k for k in ("active_slot", "slot") if k in out]
        if not keys:
            keys = ["slot" if dialect == GO_CLI else "active_slot"]
        for key in keys:
            if dep.active_slot is not None:
                out[key] = dep.active_slot.value
            elif key == "slot":
                out[key] = ""  # Go's "not set"
            else:
                del out[key]
    put("health_status", dep.health_status, was.health_status)
    put("status", dep.status, was.status)
    put("migrations_run", dep.migrations_run, was.migrations_run)
    put("rollback_count", dep.rollback_count, was.rollback_count)
    put("docker_image", dep.image, was.image)
    put("migration_version", dep.migration_version, was.migration_version)
    _patch_extra(out, dep.extra, was.extra)
    return out


def normalized_history(history: tuple[Deployment, ...] | list[Deployment],
                       limit: int = HISTORY_LIMIT) -> tuple[Deployment, ...]:
    """Newest first, each id once (its first, newest entry wins), at most `limit` entries."""
    seen: set[str] = set()
    out: list[Deployment] = []
    for dep in history:
        if dep.id not in seen:
            seen.add(dep.id)
            out.append(dep)
    return tuple(out[:limit])


def _lock_json(lock: Mapping[str, Any], raw: Any, dialect: str) -> dict[str, Any]:
    """The lock mirror in the file's dialect: the Go CLI's `expires_at` and zero times."""
    data = copy.deepcopy(dict(lock)) if lock else {}
    data.setdefault("locked", False)
    raw_keys = list(raw) if isinstance(raw, Mapping) else []
    go = dialect == GO_CLI or "expires_at" in raw_keys
    if go:
        if "lock_expires_at" in data:
            data.setdefault("expires_at", data.pop("lock_expires_at"))
        for key in ("locked_at", "expires_at"):  # Go's time.Time has no "absent"
            data.setdefault(key, _GO_ZERO)
        order: tuple[str, ...] = _GO_LOCK_ORDER
    else:
        order = _LOCK_ORDER
    ordered = {k: data[k] for k in order if k in data}
    ordered.update((k, data[k]) for k in raw_keys if k in data and k not in ordered)
    ordered.update((k, v) for k, v in data.items() if k not in ordered)
    return ordered


def to_json(state: DeploymentState) -> dict[str, Any]:
    """The document to write: the file as read with only what changed written over it.

    A state with no file behind it gets the documented dialect.
    """
    was = state.origin
    if was is None or was.raw is None:
        lock = _lock_json(state.lock, None, DOCUMENTED)
        data: dict[str, Any] = {
            "environment": state.environment,
            "current_deployment": None if state.current is None else _deployment_json(
                state.current),
            "previous_deployment": None if state.previous is None else _deployment_json(
                state.previous),
            "deployment_history": [_deployment_json(d)
                                   for d in normalized_history(state.history)],
            "lock": lock,
        }
        for key, value in state.extra.items():
            if key not in data:
                data[key] = copy.deepcopy(value)
        return data
    dialect = state.dialect
    env = state.environment
    out = copy.deepcopy(dict(was.raw))
    if state.environment != was.environment:
        out["environment"] = state.environment
    for key, dep, old in (("current_deployment", state.current, was.current),
                          ("previous_deployment", state.previous, was.previous)):
        if not _unchanged(dep, old):
            out[key] = None if dep is None else _deployment_json(dep, dialect, env)
    history_same = len(state.history) == len(was.history) and all(
        _unchanged(a, b) for a, b in zip(state.history, was.history, strict=True))
    if not history_same:
        out["deployment_history"] = [_deployment_json(d, dialect, env)
                                     for d in normalized_history(state.history)]
    if not _same(dict(state.lock), dict(was.lock)):
        out["lock"] = _lock_json(state.lock, was.raw.get("lock"), dialect)
    _patch_extra(out, state.extra, was.extra)
    return out


def _check_finite(value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("NaN and infinity are not valid JSON")
    if isinstance(value, Mapping):
        for item in value.values():
            _check_finite(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_finite(item)


@dataclass(frozen=True)
class _Style:
    """How the file's writer formatted it, so our rewrite looks like theirs."""

    indent: str | None = "  "
    item_sep: str = ","  # json.dumps' own choice with an indent: no trailing spaces
    key_sep: str = ": "
    ensure_ascii: bool = False
    html_escape: bool = False  # Go's encoder writes <, >, & as \u003c, \u003e, \u0026
    newline_at_end: bool = True
    crlf: bool = False
    bom: bool = False


_NON_ASCII_ESCAPE = re.compile(r"\\u(?:00[89a-fA-F][0-9a-fA-F]|0[1-9a-fA-F][0-9a-fA-F]{2}|"
                               r"[1-9a-fA-F][0-9a-fA-F]{3})")
_HTML_ESCAPE = re.compile(r"\\u00(?:3[cCeE]|26)")
_SEPARATORS = re.compile(r'"(\s*):(\s*)["\[{0-9tfn-]')


def _style_of(raw: bytes, dialect: str) -> _Style:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return _Style()
    bom = text.startswith("\ufeff")
    text = text.removeprefix("\ufeff")
    body = text.strip()
    indent: str | None = None
    if "\n" in body:
        for line in body.splitlines()[1:]:
            lead = line[:len(line) - len(line.lstrip(" \t"))]
            if lead and line.strip():
                indent = lead
                break
        else:
            indent = ""
    key_sep, item_sep = ": ", ","
    match = _SEPARATORS.search(body)
    if match:
        key_sep = f"{match.group(1)}:{match.group(2)}" if indent is not None or match.group(2) \
            else ":"
    if indent is None:
        item_sep = ", " if re.search(r'[\]}"0-9el], "', body) else ","
    elif re.search(r", \r?\n", body):  # old Python json.dumps: trailing spaces after commas
        item_sep = ", "
    has_non_ascii = any(ord(c) > 127 for c in text)
    return _Style(
        indent=indent, item_sep=item_sep, key_sep=key_sep,
        ensure_ascii=not has_non_ascii and bool(_NON_ASCII_ESCAPE.search(text)),
        html_escape=bool(_HTML_ESCAPE.search(text)) or dialect == GO_CLI,
        newline_at_end=text.endswith("\n"), crlf="\r\n" in text, bom=bom,
    )


def _render(data: Mapping[str, Any], style: _Style) -> bytes:
    text = json.dumps(data, indent=style.indent, separators=(style.item_sep, style.key_sep),
                      ensure_ascii=style.ensure_ascii, allow_nan=False)
    if style.html_escape:  # these characters only ever occur inside JSON strings
        text = (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
                .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    if style.newline_at_end:
        text += "\n"
    if style.crlf:
        text = text.replace("\n", "\r\n")
    return (("\ufeff" if style.bom else "") + text).encode()


def dumps(state: DeploymentState) -> bytes:
    """The exact bytes write_state stores: the file's own bytes when nothing changed."""
    data = to_json(state)
    _check_finite(data)
    was = state.origin
    if was is None or was.raw is None:
        return _render(data, _Style())
    if was.raw_bytes is not None and _same(data, was.raw):
        return was.raw_bytes
    return _render(data, _style_of(was.raw_bytes or b"", state.dialect))


def write_state(path: Path, state: DeploymentState, *,
                before_rename: Callable[[], None] | None = None) -> None:
    """Replace the file atomically: readers see the old file or the new one, never a mix.

    The file keeps its mode, owner and group (a new one is 0600). `before_rename` is the
    drill's fault point between the fsynced temp file and the rename (the kill matrix's
    "during the state write").
    """
    target = Path(os.path.realpath(path))  # keep a symlinked state file a symlink
    try:
        payload = dumps(state)
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
        raise StateError(f"{target}: refusing to write, the state cannot be serialized ({exc})",
                         "this is a bug in the caller; the file was not changed") from None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write(target, payload, default_mode=0o600, before_rename=before_rename)
    except OSError as exc:
        raise StateError(f"{target}: cannot write the state file ({exc.strerror or exc})",
                         "check free disk space and permissions; the old file is unchanged"
                         ) from None


# ---------------------------------------------------------------------------------------------
# Transitions (pure: they return new objects)


def make_deployment(version: str, git_commit: str, slot: Slot | str, *,
                    deployed_by: str | None = None, deployed_at: datetime | None = None,
                    migration_version: int | None = None, image: str = "",
                    status: str = "deploying", deployment_id: str | None = None) -> Deployment:
    """A new deployment record, validated like one read from a file."""
    version = version.strip().lower()
    git_commit = git_commit.strip().lower()
    if not _VERSION.fullmatch(version):
        raise StateError(f"version {version!r} is not a 7-hex short commit",
                         "pass the short git commit, e.g. abc1234")
    if not _COMMIT.fullmatch(git_commit):
        raise StateError(f"git commit {git_commit!r} is not 40 hex characters",
                         "pass the full commit (git rev-parse HEAD)")
    if status not in STATUSES:
        raise StateError(f"status {status!r} is not a deployment status",
                         "use one of " + ", ".join(STATUSES))
    return Deployment(
        id=deployment_id or new_id("dep"), version=version, git_commit=git_commit,
        deployed_at=deployed_at or datetime.now(UTC), deployed_by=deployed_by or
        current_operator(), active_slot=Slot(slot), status=status,
        migration_version=migration_version, image=image,
    )


def _with_history(state: DeploymentState, current: Deployment | None,
                  *front: Deployment | None, limit: int = HISTORY_LIMIT,
                  ) -> tuple[Deployment, ...]:
    """Put `front` (updated records) first, drop stale copies and the current deployment."""
    fresh = [d for d in front if d is not None]
    fresh_ids = {d.id for d in fresh}
    rest = [d for d in state.history if d.id not in fresh_ids]
    skip = current.id if current is not None else None
    return normalized_history([d for d in (*fresh, *rest) if d.id != skip], limit)


def after_deploy(state: DeploymentState, new: Deployment, *,
                 limit: int = HISTORY_LIMIT) -> DeploymentState:
    """New deployment becomes current; the old current becomes previous (superseded)."""
    if new.active_slot is None:
        raise StateError(f"deployment {new.id} has no slot", "record the slot it runs in")
    current = new if new.status is not None else new.with_(status="active")
    old = state.current
    if old is not None and old.id == current.id:
        return state.with_(current=current)
    previous = None
    if old is not None:
        previous = old.with_(status="superseded") if old.status in (None, "active") else old
    return state.with_(current=current, previous=previous,
                       history=_with_history(state, current, previous, state.previous,
                                             limit=limit))


def after_rollback(state: DeploymentState, target: Deployment | None = None, *,
                   slot: Slot | None = None, health_status: str | None = None,
                   run_id: str | None = None, limit: int = HISTORY_LIMIT) -> DeploymentState:
    """Target (default: previous) becomes current and active; the current is `rolled_back`.

    `slot` overrides the slot the target now runs in (it may have been recreated in the other
    one); `run_id` is recorded as the Go CLI's `rollback_id` so its readers see a rollback.
    """
    old = state.current
    target = target or state.previous
    if old is None:
        raise StateError(f"{state.source or 'state'}: no current deployment to roll back from",
                         "deploy first; nothing is running according to the state file")
    if target is None:
        raise StateError(f"{state.source or 'state'}: no previous deployment to roll back to",
                         "name a version from the history, or deploy the version you want")
    if target.id == old.id:
        raise StateError(f"deployment {target.version} is already current",
                         "choose a different version")
    new_slot = slot or target.active_slot
    if new_slot is None:
        raise StateError(f"deployment {target.version} does not record its slot",
                         "pass the slot it will run in")
    if health_status is not None and health_status not in HEALTH_STATUSES:
        raise StateError(f"health status {health_status!r} is not valid",
                         "use one of " + ", ".join(HEALTH_STATUSES))
    extra = dict(target.extra)
    if run_id:
        extra.update(rollback=True, rollback_id=run_id)
    current = target.with_(status="active", rollback_count=target.rollback_count + 1,
                           active_slot=new_slot, extra=extra,
                           health_status=health_status or target.health_status)
    previous = old.with_(status="rolled_back")
    return state.with_(current=current, previous=previous,
                       history=_with_history(state, current, previous, state.previous,
                                             limit=limit))


def with_lock(state: DeploymentState, lock: Mapping[str, Any]) -> DeploymentState:
    """The state with its `lock` mirror replaced (`locked` is always present).

    Give the documented keys; the writer puts them in the file's dialect (the Go CLI's
    `expires_at`, its zero times when unlocked), keeping keys another tool added.
    """
    data = dict(lock)
    data.setdefault("locked", False)
    return state.with_(lock=data)
