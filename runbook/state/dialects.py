"""The model back to JSON in the file's own dialect: only what changed is written, every
key another tool wrote stays as written (nanosecond times, slot keys, lock fields)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from runbook.state.model import Deployment, DeploymentState, Unread, format_time
from runbook.state.schema import (
    _DEPLOYMENT_KEYS,
    _GO_LOCK_ORDER,
    _GO_ZERO,
    _LOCK_ORDER,
    DEPLOY_SCRIPT,
    DOCUMENTED,
    GO_CLI,
    go_lock,
)


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
            data["active_slot"] = slot  # what the documented readers (deploy.sh) look for
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
    if dep.live_since is not None:
        data["live_since"] = format_time_as(dep.live_since, dialect)
    for key, value in dep.extra.items():
        if key not in data and key not in _DEPLOYMENT_KEYS:
            data[key] = copy.deepcopy(value)
    return data


def _complete(data: dict[str, Any], dep: Deployment, dialect: str) -> dict[str, Any]:
    """A record the runbook writes (new, changed, or moved into the history) with every key the
    documented schema requires, added after the dialect's own keys, which stay as written:
    deploy.sh reads `active_slot` (blue when missing) and refuses a record with no `id`, the
    Go CLI reads `slot`; both slot keys say the same. An id the file never had is the one the
    reader derives for that entry (reader._derived_id), so it is the same on every read."""
    slot = None if dep.active_slot is None else dep.active_slot.value
    for key, value in (("id", dep.id), ("deployed_by", dep.deployed_by), ("active_slot", slot),
                       ("health_status", dep.health_status)):
        if value is not None and data.get(key) is None:  # a null is no value (review)
            data[key] = value
    if dialect == GO_CLI and slot is not None and "slot" not in data:
        data["slot"] = slot
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
    for counter, value, old in (("migrations_run", dep.migrations_run, was.migrations_run),
                                ("rollback_count", dep.rollback_count, was.rollback_count)):
        if value != old and isinstance(out.get(counter), str):
            # read from a string of digits (a deploy script's `jq --arg`): written back as
            # one. That script treats it as text (`"n=" + .rollback_count`, `== "0"`), which
            # a number breaks, while jq -r and `tonumber` read either; and the record keeps
            # one type for its counters. Unchanged, it stays as written (put)
            out[counter] = str(value)
        else:
            put(counter, value, old)
    put("docker_image", dep.image, was.image)
    put("migration_version", dep.migration_version, was.migration_version)
    if dep.live_since != was.live_since:
        if dep.live_since is None:
            out.pop("live_since", None)
        else:
            out["live_since"] = format_time_as(dep.live_since, dialect)
    _patch_extra(out, dep.extra, was.extra)
    return out


def normalized_history(history: tuple[Deployment, ...] | list[Deployment],
                       ) -> tuple[Deployment, ...]:
    """Newest first, each id once (its first, newest entry wins). Never cut to a length: the
    entries are other tools' records too, and a rewrite by us must not drop them."""
    seen: set[str] = set()
    out: list[Deployment] = []
    for dep in history:
        if dep.id not in seen:
            seen.add(dep.id)
            out.append(dep)
    return tuple(out)


def _with_unread(entries: list[Any], ids: list[str], was: DeploymentState) -> list[Any]:
    """The rewritten history (newest first, `ids` its entries' ids) with every entry another
    tool wrote badly put back as written, where it was: right behind the nearest entry the
    file put before it that is still there, else in front of the nearest one after it, else
    last. Never dropped: it is another tool's record, and only a person can mend it."""
    if not was.unread:
        return entries
    layout: list[Any] = list(was.history[::-1] if was.history_oldest_first else was.history)
    for entry in sorted(was.unread, key=lambda u: u.index):  # the file's order, as read
        layout.insert(entry.index, entry)
    if was.history_oldest_first:
        layout.reverse()
    out: list[tuple[Any, Any]] = list(zip(ids, entries, strict=True))
    for at, item in enumerate(layout):
        if not isinstance(item, Unread):
            continue
        newer = (_spot(out, layout[i]) for i in range(at - 1, -1, -1))
        older = (_spot(out, layout[i]) for i in range(at + 1, len(layout))
                 if not isinstance(layout[i], Unread))
        behind = next((k + 1 for k in newer if k is not None), None)
        spot = behind if behind is not None else next(
            (k for k in older if k is not None), len(out))
        out.insert(spot, (item, copy.deepcopy(item.raw)))
    return [value for _, value in out]


def _spot(out: list[tuple[Any, Any]], item: Any) -> int | None:
    """Where `item` (an unread entry, or a deployment as read: by its id) is in `out`."""
    return next((k for k, (key, _) in enumerate(out)
                 if key is item or (isinstance(item, Deployment) and key == item.id)), None)


def _lock_json(lock: Mapping[str, Any], raw: Any, dialect: str) -> dict[str, Any]:
    """The lock mirror in the file's dialect (the Go CLI's key order and zero times), its
    expiry under both names with the same time: the Go CLI reads `expires_at` and takes a
    missing one for "never expires", the documented schema and the deploy script read
    `lock_expires_at`; a run killed holding the lock must be seen to expire by every tool."""
    data = copy.deepcopy(dict(lock)) if lock else {}
    data.setdefault("locked", False)
    expiry = data.pop("lock_expires_at", None)
    go_expiry = data.pop("expires_at", None)
    if expiry is not None or go_expiry is not None:
        data["lock_expires_at"] = data["expires_at"] = expiry if expiry is not None \
            else go_expiry
    raw_keys = list(raw) if isinstance(raw, Mapping) else []
    if isinstance(raw, Mapping):  # keys no tool here knows are another's: kept as written
        known = {*_LOCK_ORDER, *_GO_LOCK_ORDER}
        for key in raw_keys:
            if key not in known and key not in data:
                data[key] = copy.deepcopy(raw[key])
    go = dialect == GO_CLI or (isinstance(raw, Mapping) and go_lock(raw))
    if go:
        for key in ("locked_at", "expires_at"):  # Go's time.Time has no "absent"
            data.setdefault(key, _GO_ZERO)
        order: tuple[str, ...] = (*_GO_LOCK_ORDER, "lock_expires_at")
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
            "current_deployment": None if state.current is None else _complete(
                _deployment_json(state.current), state.current, DOCUMENTED),
            "previous_deployment": None if state.previous is None else _complete(
                _deployment_json(state.previous), state.previous, DOCUMENTED),
            "deployment_history": [_complete(_deployment_json(d), d, DOCUMENTED)
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
            out[key] = None if dep is None else _complete(_deployment_json(dep, dialect, env),
                                                          dep, dialect)
    history_same = len(state.history) == len(was.history) and all(
        _unchanged(a, b) for a, b in zip(state.history, was.history, strict=True))
    if not history_same:
        # entries still as the file's history had them stay as written; the others are ours
        as_read = {id(h) for h in was.history}
        kept = normalized_history(state.history)
        entries = _with_unread([
            _deployment_json(d, dialect, env) if id(d.origin) in as_read and d == d.origin
            else _complete(_deployment_json(d, dialect, env), d, dialect)
            for d in kept], [d.id for d in kept], was)
        # the file's own order: one written oldest first gets new entries appended
        out["deployment_history"] = entries[::-1] if was.history_oldest_first else entries
    if not _same(dict(state.lock), dict(was.lock)):
        out["lock"] = _lock_json(state.lock, was.raw.get("lock"), dialect)
    _patch_extra(out, state.extra, was.extra)
    # A write that records a deployment fills a blank environment (the deploy script's
    # first-ever file) with the name the run knows: the script's own validation refuses "" on
    # its next update, and the contract requires it. A lock and its release, or a write that
    # changes nothing, leave the file as the other tool wrote it.
    raw_env = out.get("environment")
    recorded = any(out.get(k) != was.raw.get(k) for k in (
        "current_deployment", "previous_deployment", "deployment_history"))
    if recorded and state.environment and not (isinstance(raw_env, str) and raw_env.strip()):
        out["environment"] = state.environment
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
