"""Reading deployment-state.json of any dialect into the model: every problem one
StateError line naming the file, the key and the fix (an operator reads it mid-incident)."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from runbook import files, strict_json
from runbook import kept_state as kept
from runbook.environment import ENV_NAMES, Slot, canonical_name
from runbook.errors import StateError
from runbook.state.model import Deployment, DeploymentState, Unread, format_time, parse_time
from runbook.state.schema import (
    _COMMIT,
    _DEPLOYMENT_KEYS,
    _LOCK_ORDER,
    _LOCK_TIME_KEYS,
    _TOP_KEYS,
    _VERSION,
    HEALTH_STATUSES,
    MAX_STATE_BYTES,
    STATUSES,
)


class _Reader:
    """Builds one-line StateErrors that name the file, the key and the fix."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str, fix: str) -> Refused:
        where = f"{self.source}: {key}" if key else self.source
        return Refused(f"{where}: {problem}", fix)

    def string(self, obj: Mapping[str, Any], key: str, where: str, *,
               required: bool = True) -> str | None:
        if key not in obj or obj[key] is None:
            if required:
                raise self.missing(obj, key, where)
            return None
        value = obj[key]
        if not isinstance(value, str):
            raise self.fail(f"{where}.{key}", f"expected a string, got {_show(value)}",
                            f"write {key!r} as a JSON string")
        return value

    def missing(self, obj: Mapping[str, Any], key: str, where: str,
                fix: str | None = None) -> Refused:
        """A required string that is absent, or null: a null was said to be "missing", and
        on-call went looking for a key that was there (found by review)."""
        if key in obj:
            what, example = _NEEDS.get(key, ("", ""))
            return self.fail(f"{where}.{key}", "is null, where a string is needed"
                             + (f" ({what})" if what else ""),
                             f"write {key!r} as a JSON string"
                             + (f", {example}" if example else ""))
        return self.fail(f"{where}.{key}", "required key is missing",
                         fix or f"add {key!r} to that object")

    def count(self, obj: Mapping[str, Any], key: str, where: str, *,
              digits: bool = False) -> int | None:
        """A whole number >= 0. `digits`: also one written as a string of ASCII digits, as
        a deploy script that builds the file with `jq --arg` writes every value; only for
        what decides nothing (the counters): the writer puts it back as text (dialects)."""
        value = obj.get(key)
        if value is None:
            return None
        if digits and (as_number := number_as_text(value)) is not None:
            return as_number
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


# A number `jq --arg` wrote as text: ASCII digits only (str.isdigit takes "²" and "٣"), few
# enough for any tool's integer (and for int(), which refuses thousands of digits).
_DIGITS = re.compile(r"[0-9]{1,18}")


def number_as_text(value: object) -> int | None:
    """The whole number a string of digits holds (a deploy script's `jq --arg`), else None:
    one rule for the reader's counters and pid and the lock's judge (lock.policy)."""
    return int(value) if isinstance(value, str) and _DIGITS.fullmatch(value) else None

# What a required string of a deployment holds, and an example: said of one written as null.
_NEEDS = {
    "version": ("the 7-hex short commit", 'e.g. "abc1234"'),
    "git_commit": ("the 40-hex commit", "the output of `git rev-parse HEAD`"),
    "deployed_at": ("an RFC 3339 time with a zone", 'e.g. "2026-01-28T10:30:00Z"'),
    "active_slot": ("the slot it runs in", '"blue" or "green"'),
}


def _show(value: Any) -> str:
    """A short, single-line rendering of a bad value for an error message."""
    return strict_json.show(value, 60)


def _derived_id(version: str, commit: str, deployed_at: datetime) -> str:
    """A stable id for an entry with none (the Go CLI writes none): same entry, same id, every
    read, and the one written when the runbook rewrites that entry. `dep_<16 hex>_<24 hex>`
    (the deploy script's shape), the first 40 hex digits of the sha256 of
    "<git_commit>|<version>|<deployed_at in UTC, RFC 3339, microseconds>"."""
    digest = hashlib.sha256(f"{commit}|{version}|{format_time(deployed_at)}".encode()).hexdigest()
    return f"dep_{digest[:16]}_{digest[16:40]}"


def content_key(dep: Deployment) -> str:
    """The deployment's key by its content (version, commit, deployment time), whatever id
    the file gives it: the id the reader derives for it when it has none. A rewrite by the
    Go CLI, whose struct has no `id`, drops every id; this key stays (a reformatted time,
    reordered or added keys change nothing)."""
    return _derived_id(dep.version, dep.git_commit, dep.deployed_at)


def _deployment(obj: Any, where: str, r: _Reader, *, need_slot: bool) -> Deployment:
    if not isinstance(obj, Mapping):
        if where.startswith("deployment_history"):  # a null is no entry (a jq prepend of a
            # null previous_deployment writes one): named as what to remove, not restore
            raise r.fail(where, f"expected an object, got {_show(obj)}",
                         "remove that entry from deployment_history (each one is a "
                         "deployment object)")
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
        raise r.missing(obj, "active_slot", where,
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
    raw_live = r.string(obj, "live_since", where, required=False)
    live_since = (r.time(raw_live, f"{where}.live_since", "write an RFC 3339 time with a zone, "
                         "or remove the key") if raw_live else None)
    dep = Deployment(
        id=(dep_id or _derived_id(version, commit, deployed_at)).strip(),
        version=version,
        git_commit=commit,
        deployed_at=deployed_at,
        deployed_by=deployed_by,
        active_slot=Slot(slot_name) if slot_name else None,
        health_status=health,
        status=status,
        # informational counters (no decision reads them): a string of digits is read too.
        # migration_version is not: the schema guard decides from it whether a rollback
        # needs a restore, and a file whose deploy script wrote it as text is refused, named
        migrations_run=r.count(obj, "migrations_run", where, digits=True) or 0,
        rollback_count=r.count(obj, "rollback_count", where, digits=True) or 0,
        image=image.strip(),
        migration_version=migration_version,
        live_since=live_since,
        extra={k: copy.deepcopy(v) for k, v in obj.items() if k not in _DEPLOYMENT_KEYS},
        raw=copy.deepcopy(dict(obj)),
    )
    object.__setattr__(dep, "origin", dep)
    return dep


def _own_id(dep: Deployment) -> bool:
    """Whether the file gave the record an id (not missing, not null: the reader derived it)."""
    return dep.raw is not None and isinstance(dep.raw.get("id"), str)


def _with_id_of(dep: Deployment | None, history: tuple[Deployment, ...]) -> Deployment | None:
    """A current or previous record the file gave no id (`null`, or a tool that writes none
    rewrote it), under the id of its history entry: the same version, commit and deployment
    time, one id. Under the derived id the same deployment was recorded twice (found by
    review)."""
    if dep is None or _own_id(dep):
        return dep
    ids = {h.id for h in history if _own_id(h) and (h.version, h.git_commit, h.deployed_at)
           == (dep.version, dep.git_commit, dep.deployed_at)}
    if len(ids) != 1:
        return dep
    adopted = replace(dep, id=ids.pop())
    object.__setattr__(adopted, "origin", adopted)
    return adopted


def _history_entry(obj: Any, index: int, r: _Reader) -> Deployment | Unread:
    """One history entry; one another tool wrote badly is kept unread, as written (whether
    a rollback may pass it by is judged once the whole history is read)."""
    try:
        return _deployment(obj, f"deployment_history[{index}]", r, need_slot=False)
    except Refused as exc:
        deployed_at, went_live = _own_times(obj)
        return Unread(index=index, raw=copy.deepcopy(obj),
                      problem=exc.message.removeprefix(f"{r.source}: "), fix=exc.fix or "",
                      deployed_at=deployed_at, went_live=went_live)


def _own_times(obj: Any) -> tuple[datetime | None, datetime | None]:
    """An unread entry's deployed_at and when it last went live, where both can be read."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("deployed_at"), str):
        return None, None
    live = obj.get("live_since")
    try:
        deployed = parse_time(obj["deployed_at"])
        since = parse_time(live) if isinstance(live, str) and live else None
    except (ValueError, OverflowError):
        return None, None
    if deployed is None or (live is not None and live != "" and since is None):
        return None, None
    return deployed, max(deployed, since or deployed)


def _order_shown(history: tuple[Deployment, ...]) -> bool:
    """Whether the readable entries' times show the file's order: some neighbours, where
    when they were deployed and when they went live agree, in one direction, none in the
    other (_oldest_first counts the same pairs)."""
    pairs = list(itertools.pairwise(history))
    rising = any(a.deployed_at < b.deployed_at and a.went_live < b.went_live for a, b in pairs)
    falling = any(a.deployed_at > b.deployed_at and a.went_live > b.went_live for a, b in pairs)
    return rising != falling


def _placed(entry: Unread, items: list[Deployment | Unread], oldest_first: bool,
            shown: bool) -> Unread:
    """The unread entry with how many readable entries the file puts before it, newest
    first (None where the order is not shown)."""
    if not shown:
        return entry
    side = items[entry.index + 1:] if oldest_first else items[:entry.index]
    return replace(entry, newer=sum(isinstance(d, Deployment) for d in side))


def _oldest_first(history: tuple[Deployment, ...]) -> bool:
    """Whether the file writes its history oldest first (some tools append; the documented
    order is newest first): more neighbours in rising order than in falling, a pair counting
    only where when it was deployed and when it went live agree (a rollback's live_since
    alone made a two-entry newest-first history read as oldest first, and the next entry was
    appended at its end: found by review). Such a history is read reversed and written back
    in its own order, so a new entry is appended and no other tool's entry moves."""
    pairs = list(itertools.pairwise(history))
    rising = sum(a.deployed_at < b.deployed_at and a.went_live < b.went_live for a, b in pairs)
    falling = sum(a.deployed_at > b.deployed_at and a.went_live > b.went_live for a, b in pairs)
    return rising > falling


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
    times: dict[str, datetime] = {}
    for key in (*_LOCK_TIME_KEYS, "expires_at"):  # the last one is the Go CLI's name
        value = data.get(key)
        if value is None or value == "":  # "": jq's unset time, as Go's zero time below
            data.pop(key, None)
            continue
        where = f"lock.{key}"
        if not isinstance(value, str):
            raise r.fail(where, f"expected a time string, got {_show(value)}",
                         "write an RFC 3339 time or remove the key")
        when = r.time(value, where, "write an RFC 3339 time or remove the key")
        if when is None:
            del data[key]  # Go's zero time: "not set"
        else:
            times[key] = when
    if "expires_at" in data:
        # The runbook writes both names, equal. Another tool may refresh only its own: the
        # later time is when the lock really ends (an earlier one would steal a live lock).
        go_value = data.pop("expires_at")
        if "lock_expires_at" not in times or times["expires_at"] > times["lock_expires_at"]:
            data["lock_expires_at"] = go_value
    pid = data.get("pid")
    # `jq --arg`'s pid ("48213") is no reason to refuse the file, and is kept as written:
    # the lock's judge takes it as proof the holder runs, never that it died
    # (lock.policy._state_holder), so text never becomes a takeover it never was
    if pid is not None and number_as_text(pid) is None and (
            isinstance(pid, bool) or not isinstance(pid, int)):
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


class _Overflow:
    """A number literal too large for a float (1e400): Python reads it as infinity, which no
    JSON can hold, so the rewrite after the commit point would fail. Kept to name it at read."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:  # for _show, should one sit where an object belongs
        return self.text


def _parse_float(text: str) -> float | _Overflow:
    value = float(text)
    return value if math.isfinite(value) else _Overflow(text)


def _check_numbers(data: Any, r: _Reader) -> None:
    """Refuse the first number too large for JSON, naming its key path (iterative: a deeply
    nested document must not overflow the stack here)."""
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, _Overflow):
            raise r.fail(where, f"{value.text[:40]} is too large a number (it reads as "
                         "infinity, which JSON cannot hold)",
                         "write a smaller number (or a string), or restore the file from a "
                         "backup")
        if isinstance(value, dict):
            todo.extend((f"{where}.{k}" if where else str(k), v)
                        for k, v in reversed(value.items()))
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value))))


def parse_state(text: str | bytes, source: str = "deployment-state.json", *,
                environment: str | None = None,
                lock_as_written: bool = False) -> DeploymentState:
    """Parse any dialect. `environment`, when given, fills a blank one and must match.
    `lock_as_written`: a lock object whose own fields are refused is kept as written, for a
    writer about to replace it (read_state)."""
    r = _Reader(source)
    raw_bytes = text if isinstance(text, bytes) else _encode(text)
    data = _load(text, r)
    _check_numbers(data, r)
    try:
        state = _build(data, r, environment, lock_as_written)
    except RecursionError:
        raise r.fail("", "is nested too deeply to be a deployment state file",
                     "restore it from a backup") from None
    state = replace(state, raw=data, raw_bytes=raw_bytes)
    object.__setattr__(state, "origin", state)
    return state


def _load(text: str | bytes, r: _Reader) -> dict[str, Any]:
    """The file's JSON object, before any of its records is judged."""
    raw = text if isinstance(text, bytes) else text.encode()
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise NotJSON(r.source, "is not UTF-8 text (binary or corrupted)",
                          "restore it from a backup or re-record the deployment", raw) from None
    try:
        data = strict_json.loads(text.removeprefix("\ufeff"), parse_constant=_reject_constant,
                                 parse_float=_parse_float)
    except strict_json.DuplicateKeyError as exc:
        if isinstance(exc.document, dict):
            raise Ambiguous(r.source, exc) from None
        data = exc.document  # no object at the top: refused as such below
    except (ValueError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(
            exc, json.JSONDecodeError) else ""
        raise NotJSON(r.source, f"is not valid JSON ({detail}{where})",
                      "fix the syntax or restore it from a backup", raw) from None
    if not isinstance(data, dict):
        raise NotJSON(r.source, f"expected a JSON object at the top, got {_show(data)}",
                      "restore it from a backup or re-record the deployment", raw)
    return data


class Refused(StateError):
    """A JSON object whose record the reader refuses (a wrong type, a required key missing):
    broken, where the kept copy may go back (runbook state restore-kept). Never another
    environment's file, a whole one the configuration points at by mistake. `raw`: the bytes
    judged, when read_state read them (what restore-kept may replace, and only those)."""

    raw: bytes | None = None


class Ambiguous(StateError):
    """A state file with a key written twice (or more) in one object: the shell tooling
    (grep, sed) reads the first value, jq, Python and Go the last. Neither is taken: read
    last-wins, the runbook acted on one and its rewrite dropped the other. Not Refused: the
    kept copy is older than the other tool's write in it, and putting it back would lose
    that write too; the fix is an edit that keeps the true value."""

    def __init__(self, source: str, exc: strict_json.DuplicateKeyError,
                 dup: strict_json.Duplicate | None = None) -> None:
        dup = dup or exc.found[0]
        where = dup.parent or "the top-level object"
        super().__init__(f"{source}: {dup.said()}: the shell tooling (grep, sed) reads the "
                         "first, jq, Python and Go the last",
                         f"edit the file so that {json.dumps(dup.key)} appears once in "
                         f"{where}, with the value that is true")
        self.exc = exc


class NoStateFile(StateError):
    """No file where the state file should be, and no copy the runbook kept of one that
    recorded a deployment: nothing was ever recorded here (a host's first deploy), or it was
    removed on purpose. Status names the deploy that records what serves."""


class NotJSON(StateError):
    """The file is no JSON object at all (truncated, binary), not a record in it refused;
    `raw` is what was read, so the lock's judge can tell a file being rewritten in place (it
    changes) from one left corrupt (it does not)."""

    def __init__(self, source: str, problem: str, fix: str, raw: bytes) -> None:
        super().__init__(f"{source}: {problem}", fix)
        self.raw = raw


def _build(data: dict[str, Any], r: _Reader, environment: str | None,
           lock_as_written: bool = False) -> DeploymentState:
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

    if "current_deployment" not in data:
        _refuse_unknown_dialect(data, r)
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
    # The previous deployment may not know its slot: today's Go CLI rollback reads a record
    # deploy.sh wrote (`active_slot`, a key its struct lacks) and writes it back as
    # previous_deployment with `"slot": ""`. Which slot serves is read from Caddy, never here.
    previous = None if previous_raw is None else _deployment(
        previous_raw, "previous_deployment", r, need_slot=False)
    items = [_history_entry(item, i, r) for i, item in enumerate(history_raw)]
    history = tuple(d for d in items if isinstance(d, Deployment))
    current, previous = (_with_id_of(current, history), _with_id_of(previous, history))
    oldest_first = _oldest_first(history)
    shown = _order_shown(history)
    if oldest_first:
        history = history[::-1]
    unread = tuple(_placed(d, items, oldest_first, shown) for d in items
                   if isinstance(d, Unread))
    # An entry another tool wrote badly is passed by only when it is provably older than the
    # previous deployment (the rollback's target; a plan judges a --to one again): one that
    # may be it, or newer, is refused as ever (found open: one old bad entry refused every
    # rollback, and status could not read the file).
    judge = DeploymentState(environment="", history=history, unread=unread)
    for entry in unread:
        if previous is None or not judge.older_than(entry, previous):
            raise r.fail("", entry.problem, entry.fix)

    if not env_name and current is not None:
        # The deploy script never fills the top-level key but stamps each deployment.
        inner = current.extra.get("environment")
        if isinstance(inner, str) and canonical_name(inner) in ENV_NAMES:
            env_name = canonical_name(inner)
    if environment is not None:
        wanted = canonical_name(environment)
        if env_name and env_name != wanted:  # whole, only not this environment's: not Refused
            raise StateError(f"{r.source}: environment: this file belongs to {env_name}, not "
                             f"{wanted}", "point [state] file at this environment's state file")
        env_name = wanted
    return DeploymentState(
        environment=env_name,
        current=current,
        previous=previous,
        history=history,
        history_oldest_first=oldest_first,
        unread=unread,
        lock=_lock_or_as_written(data.get("lock"), r) if lock_as_written
        else _lock(data.get("lock"), r),
        extra={k: copy.deepcopy(v) for k, v in data.items() if k not in _TOP_KEYS},
        source=r.source,
    )


# What a deployment record holds in every dialect (CONTRACTS.md): its version and one of
# these; both mark an object as one, wherever it sits. `version` alone does not: another
# tool's `"meta": {"version": 2}` beside the deploy script's first file was refused as records
# in no known dialect (found by review).
_RECORD_KEYS = frozenset({"git_commit", "commit", "deployed_at"})


def _record_like(value: Any) -> bool:
    """An object shaped like a deployment record, or a list holding one (a history)."""
    if isinstance(value, list):
        return any(isinstance(v, Mapping) and _record_like(v) for v in value)
    return isinstance(value, Mapping) and "version" in value \
        and not _RECORD_KEYS.isdisjoint(value)


def _refuse_unknown_dialect(data: Mapping[str, Any], r: _Reader) -> None:
    """A file with no `current_deployment` (the documented schema requires it) whose other
    top-level keys hold deployment records: written in no dialect the runbook reads (keys
    renamed by hand, another tool's). Read as "nothing recorded", a rollback said "first
    deployment or cleared state", status showed none, and a deploy planned a first record
    over records it could not see (found by review). A file recording none (a cleared one,
    the deploy script's first: `active_slot`, `slots`, `last_deployment: null`) reads on."""
    keys = [k for k, v in data.items() if k not in _TOP_KEYS and _record_like(v)]
    if not keys:
        return
    named = ", ".join(repr(k) for k in keys)
    raise r.fail("current_deployment", f"required key is missing, while {named} "
                 f"hold{'s' if len(keys) == 1 else ''} deployment records: the file is in "
                 "none of the three dialects the runbook reads",
                 "the documented dialect, the deploy script's and the Go CLI's keep "
                 "deployments under \"current_deployment\", \"previous_deployment\" and "
                 f"\"deployment_history\" (README, \"Rolling back a host\"): rename {named} "
                 "to those keys, or write \"current_deployment\": null if nothing is deployed")


def absent(path: Path, *, environment: str) -> DeploymentState:
    """The state of a host with no file at `path` yet (a first-ever deploy): empty, and
    remembering it was read there, so its write creates the file and never replaces one
    another tool created since (write_state raises StateChangedError)."""
    return DeploymentState(environment=environment, source=str(path))


def read_or_absent(path: Path, *, environment: str) -> DeploymentState:
    """What a plan reads: `absent` where no file was ever written (a host's first deploy),
    else read_state. A file the runbook wrote (its kept copy is there) that another tool
    deleted or moved away is refused naming the copy: planned as a first deploy, the switch
    wrote a new file without the history, and that write replaced the copy too."""
    if not path.exists() and not _kept_deployments(path) and missing_link(path) is None:
        return absent(path, environment=environment)
    return read_state(path, environment=environment)


def missing_link(path: Path) -> StateError | None:
    """The refusal for a state file behind a symlink into a missing directory (an unmounted
    volume): read as "deleted or moved away", or as a first deploy, its write made the
    directories under the empty mount point (found by review). None when there is none."""
    refused = files.link_refusal(path, "the state file", "[state] file")
    return None if refused is None else StateError(*refused)


def _dangling(path: Path) -> str:
    """What the message adds for a state file that is a symlink to no file."""
    if not path.is_symlink():
        return ""
    return f"; it is a symlink to {os.path.realpath(path)}, which does not exist"


def _kept_deployments(path: Path) -> bool:
    """Whether the runbook kept a copy of the file at `path` that records a deployment: a
    copy recording none (the lock-only file a failed first deploy leaves) keeps nothing a
    deliberate `rm` could lose, so that file's absence is a first deploy again (found by
    review). A copy that cannot be read is taken as recording some: it is named, not lost."""
    named = kept.kept_for(path)
    if named is None:
        return False
    try:
        saved = parse_state(named[0].raw, str(named[0].path))
    except StateError:
        return True
    return saved.current is not None or saved.previous is not None or bool(saved.history)


def read_lock(path: Path) -> dict[str, Any] | None:
    """The state file's `lock` object alone, for judging the deploy lock; None when there is
    no file or no lock in it. A record read_state refuses elsewhere (a Go zero time in the
    history) made the whole file read as unlocked, and a run took the lock beside the Go
    CLI's (found by review). Normalized as read_state does where the lock's own fields allow,
    else as written (the judge reads it leniently). StateError only when the file cannot be
    read as a JSON object, or its lock is not an object: no one can tell it is unlocked."""
    raw = _read_bytes(path)
    if raw is None:
        return None
    r = _Reader(str(path))
    try:
        data = _load(raw, r)
    except Ambiguous as exc:
        # a key written twice in the lock (or `lock` itself): who holds it cannot be told;
        # one elsewhere leaves the lock as every tool reads it (read_state refuses the file)
        dup = next((d for d in exc.exc.found if re.match(r"lock(\.|\[|$)", d.path)), None)
        if dup is not None:
            raise Ambiguous(r.source, exc.exc, dup) from None
        data = exc.exc.document
    lock = data.get("lock")
    return None if lock is None else _lock_or_as_written(lock, r)


def _lock_or_as_written(lock: Any, r: _Reader) -> dict[str, Any]:
    """The lock normalized (_lock), or as written when its own fields are refused; StateError
    when it is no object at all."""
    if not isinstance(lock, dict):
        raise r.fail("lock", f"expected an object, got {_show(lock)}",
                     "write {\"locked\": false} if no deployment is running")
    try:
        return _lock(lock, r)
    except (StateError, RecursionError):
        return lock


def read_state(path: Path, *, environment: str | None = None,
               lock_as_written: bool = False) -> DeploymentState:
    """Read and normalize the state file; a missing file is an error, never an empty state.

    `lock_as_written`: for `runbook unlock --force` replacing a lock whose times no tool can
    read (no UTC offset, epoch numbers): refused here, the file could not be rewritten, and
    only a hand edit cleared that lock (found by review). Nothing else is read leniently."""
    raw = _read_bytes(path)
    if raw is None:
        if (refused := missing_link(path)) is not None:
            raise refused
        if _kept_deployments(path):  # the runbook wrote it: deleted or moved away
            raise StateError(f"{path}: the state file does not exist (deleted or moved away: "
                             f"the runbook wrote it before{_dangling(path)})", kept.refusal_fix(
                                 path, "check [state] file in the environment configuration; "
                                 "or, if it was removed on purpose (nothing to keep), delete "
                                 "the copy"))
        raise NoStateFile(f"{path}: no deployment has been recorded (the state file does not "
                          f"exist{_dangling(path)})", "deploy first, or check [state] file in the "
                          "environment configuration")
    try:
        return parse_state(raw, str(path), environment=environment,
                           lock_as_written=lock_as_written)
    except (NotJSON, Refused) as exc:  # empty, cut short, a record refused: name the copy
        exc.fix = kept.refusal_fix(path, exc.fix)  # the runbook kept, if any
        if isinstance(exc, Refused):
            exc.raw = raw
        raise


def _read_bytes(path: Path) -> bytes | None:
    """The file's bytes; None when it does not exist."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return None
    except IsADirectoryError:  # (or a symlink to one) never a file being replaced: for good
        raise StateError(f"{path}: cannot read the state file: it is a directory",
                         "point [state] file in the environment file at the state file "
                         "itself, or move that directory away") from None
    except OSError as exc:
        raise StateError(f"{path}: cannot read the state file ({exc.strerror or exc})",
                         "check [state] file in the environment file, and that this user "
                         "may read that path") from None
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(f"{path}: larger than {MAX_STATE_BYTES // (1024 * 1024)} MiB, so it is "
                         "not a deployment state file", "restore it from a backup")
    return raw
