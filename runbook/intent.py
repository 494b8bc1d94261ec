"""The intent of a mutating run, written (fsynced) before its first change.

A run that is killed (SIGKILL, power loss, closed laptop) leaves its intent beside the state
file. The next run of the same environment reads it, compares it with what really runs, and
finishes the job instead of planning a new one from a state file that no longer tells the
truth. `runbook status` reports it. The record holds only facts (slots, versions, ids, the
phase reached), never secrets.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypedDict

from runbook import files, journal
from runbook import state as states
from runbook.environment import Environment, Slot
from runbook.errors import PreconditionError, RunbookError
from runbook.times import parse_utc


class Phase(StrEnum):
    PREPARE = "prepare"  # changes so far are undoable; traffic has not moved
    COMMITTED = "committed"  # traffic moved to `to_slot` and was verified: finish, never undo


@dataclass(frozen=True)
class Intent:
    run_id: str
    action: str  # rollback | deploy | switch
    environment: str
    from_slot: str
    to_slot: str
    from_version: str | None
    to_version: str
    to_image: str | None = None
    phase: Phase = Phase.PREPARE
    pid: int = field(default_factory=os.getpid)
    hostname: str = field(default_factory=socket.gethostname)
    operator: str = field(default_factory=states.current_operator)
    started_at: str = field(default_factory=lambda: states.format_time(datetime.now(UTC)))
    last_step: str | None = None  # the last step its run record shows (read() fills it in)
    record: dict[str, Any] = field(default_factory=dict)  # what "record the state" needs
    # the ids of the deployments the state file held when the run was planned, and their
    # content keys (state.content_key): what "recorded since" judges by (recorded, and
    # recorded_after); None in a record an older version wrote (recorded_keys alone: in
    # one the version before this wrote, which kept only the ids)
    recorded_ids: tuple[str, ...] | None = None
    recorded_keys: tuple[str, ...] | None = None

    @property
    def target(self) -> Slot:
        return Slot(self.to_slot)

    @property
    def source(self) -> Slot:
        return Slot(self.from_slot)

    @property
    def deployment_id(self) -> str | None:
        """The deployment id the run records as current: a deploy's new one, a rollback's
        target; None for a switch (it records by version) and a restore."""
        key = {"deploy": "deployment_id", "rollback": "target_id"}.get(self.action)
        value = self.record.get(key) if key is not None else None
        return value if isinstance(value, str) and value else None

    def with_(self, **changes: Any) -> Intent:
        return replace(self, **changes)

    def describe(self, *, moved: bool | None = None, live: bool = False) -> str:
        """`moved`: whether Caddy now serves `to_slot` by this run, when the caller has read
        it (False too for a run another tool's deploy superseded: traffic on its target is
        not its); None when not known. The record's phase can lag what runs: a run killed
        inside the switch, or one whose disk filled up, never marked the commit; what runs
        wins over what the record says, and without it "before traffic moved" is never said
        (found by review: "stopped before traffic moved; whether it moved traffic is
        unknown", and of a run killed between Caddy's reload and its commit mark).
        `live`: its process still holds the deploy lock (finish.in_progress), so it has not
        "stopped" anywhere: said as where it is so far (found by review: "stopped before
        traffic moved" of a run suspended just after Caddy moved)."""
        if live:
            return f"{self._who()}; {self._so_far(moved)}{self._step()}"
        if self.phase is Phase.COMMITTED and moved is False:
            where = (f"after traffic moved, its record says; Caddy does not serve {self.to_slot} "
                     "now")
        elif self.phase is Phase.COMMITTED:
            where = ("after traffic moved (it took effect)" if moved
                     else "after traffic moved, its record says")
        elif moved:
            where = "after traffic moved (its record was not updated)"
        elif moved is None:
            return (f"{self._who()}, stopped; whether it moved traffic is unknown (its record "
                    f"says it had not){self._step()}")
        else:
            where = "before traffic moved"
        return f"{self._who()}, stopped {where}{self._step()}"

    def _who(self) -> str:
        return (f"{self.action} {self.run_id} ({self.from_version or '?'} on {self.from_slot} "
                f"-> {self.to_version} on {self.to_slot}), started {self.started_at} by "
                f"{self.operator} (pid {self.pid} on {self.hostname})")

    def _step(self) -> str:
        return f"; its last recorded step: {self.last_step}" if self.last_step else ""

    def _so_far(self, moved: bool | None) -> str:
        """Where a run still running is, what runs first (its record is written after)."""
        to = self.to_slot
        if self.phase is Phase.COMMITTED:
            return (f"it moved traffic to {to}, its record says; Caddy does not serve {to} now"
                    if moved is False else f"it has moved traffic to {to}"
                    + ("" if moved else ", its record says"))
        if moved:  # between Caddy's reload and the record's commit mark
            return f"it has moved traffic to {to} (its record does not say so yet)"
        return "it has not moved traffic yet" + ("" if moved is False else ", its record says")


def path(env: Environment) -> Path:
    state = Path(os.path.realpath(env.state_file))
    return state.with_name(f".{state.name}.runbook-intent.json")


def write(env: Environment, intent: Intent) -> None:
    """Durably record the intent; OSError propagates (the caller decides what it means).
    A new record takes the state file's mode, owner and group (0600 when there is none):
    always 0600, another on-call user of a shared deploy group could not read a killed
    run's record, and every command then refused."""
    data = json.dumps(asdict(intent), indent=2, sort_keys=True) + "\n"
    target = path(env)
    target.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(target, data.encode(), default_mode=0o600,
                       like=Path(os.path.realpath(env.state_file)))


def read(env: Environment) -> Intent | None:
    """The interrupted run's intent, or None. A record that cannot be read is an error:
    guessing would plan from the wrong picture."""
    target = path(env)
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PreconditionError(f"cannot read the interrupted run's record {target}: "
                                f"{exc.strerror or exc}", "fix its permissions, then run again"
                                ) from None
    fix = (f"check `runbook status`; if nothing is half-done, move {target} aside and run "
           "again")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # we write it as JSON in UTF-8: another writer, or a torn disk
        raise PreconditionError(f"the interrupted run's record {target} is unreadable (not "
                                "UTF-8 text: binary or corrupted)", fix) from None
    try:
        data = json.loads(text)
        action = data.get("action") if isinstance(data, dict) else None
        if isinstance(action, str) and action not in ACTIONS:
            # a newer runbook's verb (an upgrade or a per-user install on the same host):
            # finished as a rollback (the fallback recorder, `rollback --to`) it would do
            # another run's job; moved aside, the newer run's record is lost (found by review)
            raise PreconditionError(
                f"the interrupted run's record {target} is of a `{action}` run, which this "
                f"togather-runbook ({_version()}) does not know: another (newer) version wrote "
                "it; nothing was changed",
                "finish it with the version that started it (`runbook status` there says "
                "what it was doing), then run this command again")
        intent = from_dict(data)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise PreconditionError(f"the interrupted run's record {target} is unreadable ({exc})",
                                fix) from None
    return intent if intent.last_step else intent.with_(last_step=last_recorded_step(env, intent))


RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def last_recorded_step(env: Environment, intent: Intent) -> str | None:
    """Where the run stopped, as its own run record says: for a run that never finished
    (killed), the last step it began and how far that got; for one that finished and kept
    its record, the step that failed. The record is rewritten at each step without fsync
    (the journal's log is the durable account), so after a power loss it may lag:
    "recorded", never "was in". None when there is no such record or it cannot be read, or
    no step to name: nothing is claimed then."""
    last = _last_recorded(env, intent)
    if last is None or not isinstance(last.get("title"), str):
        return None
    status = last.get("status")
    return f"{last['title']} ({status})" if isinstance(status, str) else last["title"]


def failed_step(env: Environment, intent: Intent) -> str | None:
    """The name of the step the run's own record says failed (e.g. "health-gate"), or None:
    a rerun whose target's gate failed there is said to be one (found by review: status
    named it as the fix with nothing saying it had just failed)."""
    last = _last_recorded(env, intent)
    if last is None or last.get("status") != "failed" or not isinstance(last.get("name"), str):
        return None
    return str(last["name"])


def _last_recorded(env: Environment, intent: Intent) -> dict[str, Any] | None:
    """The last step the run's record shows (see last_recorded_step), or None."""
    if not RUN_ID.fullmatch(intent.run_id):  # a name, never a path out of runs_dir
        return None
    record_path = env.runs_dir / f"{intent.run_id}.json"
    try:  # never a FIFO or a device (files.NotAFile, an OSError): status must not hang
        record = json.loads(files.read_regular(record_path, journal.MAX_RECORD))
        steps = [s for s in record["steps"] if s.get("started_at")]
        if record.get("finished_at"):  # its later steps (the lock's release) say nothing
            steps = [s for s in steps if s.get("status") == "failed"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    last = steps[-1] if steps else None
    return last if isinstance(last, dict) else None


ACTIONS = frozenset({"deploy", "switch", "rollback"})  # the runs that write this record


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("togather-runbook")
    except metadata.PackageNotFoundError:
        return "this checkout"


def from_dict(data: Any) -> Intent:
    """An intent as write() stores it; ValueError, KeyError or TypeError when it is not one."""
    if not isinstance(data, dict):
        raise TypeError("not an object")
    data = dict(data)
    data["phase"] = Phase(data["phase"])
    for name in ("recorded_ids", "recorded_keys"):
        if isinstance(data.get(name), list):  # JSON's array; anything else refused
            data[name] = tuple(data[name])
    known = set(Intent.__dataclass_fields__)
    intent = Intent(**{k: v for k, v in data.items() if k in known})
    _check_types(intent)
    return intent


REPLACES = "replaces"  # in a record: the interrupted run's record this run's replaced
# in a record: the target's container as its health gate proved it, carried by the commit's
# write; its finish asks whether the target is still that one before it stops the old slot
GATED_CONTAINER = "gated_container"

Identity = tuple[str | None, str | None, int]  # a container's id, start time, restart count


def identity_entry(identity: Identity) -> dict[str, Any]:
    """A container's identity as the record holds it (named fields: on-call may read it)."""
    return dict(zip(("container_id", "started_at", "restart_count"), identity, strict=True))


def gated_container(intent: Intent) -> Identity | None:
    """The target's container as the interrupted run's gate proved it; None in a record
    written before it passed its gate, or by an older version (which never wrote it): its
    finish then catches only a target restarting at that moment, as that version did."""
    entry = intent.record.get(GATED_CONTAINER)
    if entry is None:
        return None
    return entry["container_id"], entry["started_at"], entry["restart_count"]


def standing(intent: Intent, serving: Slot | None) -> Intent:
    """The record that stands for what is unfinished. A run that replaced an interrupted
    run's record keeps a copy of it (REPLACES): killed itself (SIGKILL, power loss) before
    traffic moved, its put-back never ran, and the replaced record (a deploy whose schema
    moved, and its pre-deploy snapshot) would be lost; with traffic still on that run's
    source, the replaced record is the one to go on from."""
    older = intent.record.get(REPLACES)
    if intent.phase is not Phase.PREPARE or serving != intent.source or older is None:
        return intent
    try:
        kept = from_dict(older)
    except (ValueError, KeyError, TypeError, RecursionError):
        return intent
    return kept if kept.source == serving else intent


class Recorded(TypedDict):
    """What an intent keeps of the state file its run was planned from."""

    recorded_ids: tuple[str, ...]
    recorded_keys: tuple[str, ...]


def recorded(state: states.DeploymentState) -> Recorded:
    """The ids and the content keys of every deployment `state` records (current, previous,
    history), kept in the record of a run planned from it (`Intent(..., **recorded(state))`),
    so a later run can tell what was recorded since. Both: a rewrite by the Go CLI (a lock
    taken and released is enough) drops every id, and the reader derives others."""
    every = (dep for dep in (state.current, state.previous, *state.history) if dep is not None)
    return {"recorded_ids": tuple(dep.id for dep in state.deployments()),
            # each entry's, even one under an id another entry has (deployments() skips it)
            "recorded_keys": tuple(dict.fromkeys(states.content_key(dep) for dep in every))}


def recorded_after(intent: Intent, dep: states.Deployment, *, unknown: bool) -> bool:
    """Whether `dep` was recorded after `intent`'s run was planned: neither its id nor its
    content key (version, commit, deployment time) is one the state file held then; by the
    id alone, every deployment was "since" once the Go CLI's rewrite dropped the ids (found
    by review). Never by comparing `deployed_at` with `started_at`: two wall clocks
    (another tool's, another run's), and one stepped back between the runs hid a later
    deploy (found by review), one ahead made a deployment already there "later". A record
    an older version wrote holds no keys: judged by its ids alone then; no ids either: by
    those times, as that version did; `unknown` is the answer when its start time cannot
    be read."""
    if intent.recorded_ids is not None:
        return dep.id not in intent.recorded_ids and (
            intent.recorded_keys is None or states.content_key(dep) not in intent.recorded_keys)
    started = parse_utc(intent.started_at)
    return unknown if started is None else dep.deployed_at > started


def _check_types(intent: Intent) -> None:
    """Each field as this module writes it: a slot named `Green`, or a `record` that is a
    list, read fine and then failed wherever it was used (`runbook status` lost every other
    fact to one "unexpected failure"). Raises ValueError or TypeError, as read() expects."""
    for slot in (intent.from_slot, intent.to_slot):
        Slot(slot)  # ValueError when it names no slot
    for name in ("run_id", "action", "environment", "to_version"):
        if not isinstance(getattr(intent, name), str):
            raise TypeError(f"{name} is not a string")
    for name in ("from_version", "to_image", "last_step"):
        if getattr(intent, name) is not None and not isinstance(getattr(intent, name), str):
            raise TypeError(f"{name} is not a string")
    if not isinstance(intent.record, dict):
        raise TypeError("record is not an object")
    for name in ("recorded_ids", "recorded_keys"):
        ids = getattr(intent, name)
        if ids is not None and not (isinstance(ids, tuple)
                                    and all(isinstance(i, str) for i in ids)):
            raise TypeError(f"{name} is not a list of strings")
    gated = intent.record.get(GATED_CONTAINER)
    if gated is not None and not (
            isinstance(gated, dict)
            and all(k in gated and isinstance(gated[k], str | None)
                    for k in ("container_id", "started_at"))
            and type(gated.get("restart_count")) is int):
        raise TypeError(f"{GATED_CONTAINER} is not a container's id, start time and restart "
                        "count")


def clear(env: Environment, run_id: str | None = None) -> bool:
    """Remove the record (only `run_id`'s, when given). False when it could not be removed."""
    target = path(env)
    if run_id is not None:
        try:
            current = read(env)
        except RunbookError:  # unreadable now (EIO, EACCES): after the commit that turned a
            return False  # rollback that worked into exit 4 (found by review); left, said
        if current is None or current.run_id != run_id:
            return True
    try:
        target.unlink()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    files.fsync_dir(target.parent)
    return True
