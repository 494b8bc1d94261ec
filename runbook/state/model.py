"""The deployment state as the runbook thinks of it: one model for every dialect.

Deployment (one record) and DeploymentState (the file: current, previous, history, lock,
and what the file said, kept so a rewrite patches it instead of replacing it)."""

from __future__ import annotations

import getpass
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from runbook import times
from runbook.environment import Slot
from runbook.errors import StateError
from runbook.state.schema import DOCUMENTED, dialect_of


def new_id(prefix: str) -> str:
    """An id shaped like the deploy script's (`dep_<16 hex ns>_<24 hex random>`): sortable."""
    return f"{prefix}_{time.time_ns():016x}_{secrets.token_hex(12)}"


# the id a runbook rollback records as the Go CLI's `rollback_id` (journal.new_run_id's)
_RUNBOOK_ROLLBACK_ID = re.compile(r"rbk_[0-9a-f]{16}_[0-9a-f]{24}")


def rolled_back_to(dep: Deployment) -> bool:
    """Whether a runbook rollback made `dep` current, by the Go CLI's keys it recorded with it
    (`rollback`, `rollback_id`): the Go CLI keeps those and drops `status`, so after it
    rewrote the file the previous deployment no longer said `rolled_back`, and a rollback
    typed again went forward to the release users had been taken off (found by review). Not
    the Go CLI's own rollback, which switches nothing (its file is judged by what serves)."""
    rollback_id = dep.extra.get("rollback_id")
    return dep.extra.get("rollback") is True and isinstance(rollback_id, str) \
        and _RUNBOOK_ROLLBACK_ID.fullmatch(rollback_id) is not None


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

    `active_slot` is None for history entries that never recorded it (the documented schema
    lets history omit it) and for a previous deployment today's Go CLI rollback rewrote with
    `"slot": ""`; a current deployment always has one.
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
    # when a rollback (or a switch back) made it serve again; deployed_at stays its first
    # deployment's. None: it has served since deployed_at (or no tool recorded it)
    live_since: datetime | None = None
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
    def went_live(self) -> datetime:
        """When it last began to serve: a rollback to it keeps its first deployed_at, and what
        it ran with before then is another release's business (migration_source)."""
        return max(self.deployed_at, self.live_since or self.deployed_at)

    def live_after(self, moment: datetime) -> datetime | None:
        """The first time it is known to have begun serving after `moment` (its deployment,
        else the rollback that made it serve again), or None."""
        return next((t for t in (self.deployed_at, self.live_since)
                     if t is not None and t > moment), None)

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
class Unread:
    """A deployment_history entry another tool wrote badly (a version that is no 7-hex
    commit, an unknown status, no object at all): not read, never dropped. The writer puts
    `raw` back where it was; a rollback passes it by only when it is provably older than
    its target (DeploymentState.passed_by), else it is refused as any bad record is."""

    index: int  # its place in the file's deployment_history, as written
    raw: Any  # the value as written
    problem: str  # "deployment_history[2].version: 'v0.9.0' is not a 7-hex short commit"
    fix: str
    # how many of the readable entries (`history`, newest first) the file puts before it,
    # when the entries' times show the file's order; None when they do not
    newer: int | None = None
    # its own times, where they can be read: the only witness of its age when the order is
    # not shown (deployed_at, and when it last went live)
    deployed_at: datetime | None = None
    went_live: datetime | None = None


def _not_newer(dep: Deployment, target: Deployment) -> bool:
    """`dep` is the target's own record, or older than it by both its times."""
    return dep.id == target.id or (dep.version, dep.git_commit, dep.deployed_at) == (
        target.version, target.git_commit, target.deployed_at) or (
        dep.deployed_at < target.deployed_at and dep.went_live < target.went_live)


@dataclass(frozen=True)
class DeploymentState:
    """The whole file. `environment` is "" only when the file never said (a first-ever file)."""

    environment: str
    current: Deployment | None = None
    previous: Deployment | None = None
    history: tuple[Deployment, ...] = ()  # newest first
    # The file writes its history oldest first (the documented order is newest first): read
    # reversed into `history`, and written back so, new entries appended (reader._oldest_first)
    history_oldest_first: bool = False
    lock: Mapping[str, Any] = field(default_factory=lambda: {"locked": False})
    extra: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""  # where it was read from, for messages
    # history entries another tool wrote badly, kept as written (none is in `history`)
    unread: tuple[Unread, ...] = ()
    # The state as read (itself, holding the document and its bytes); None for a new state,
    # and for one read where no file was (`source` set: see reader.absent).
    origin: DeploymentState | None = field(default=None, compare=False, repr=False)
    raw: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    raw_bytes: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def dialect(self) -> str:
        """The dialect of the file this state was read from (new states: the documented one)."""
        return dialect_of(self.origin.raw) if self.origin and self.origin.raw else DOCUMENTED

    def with_(self, **changes: Any) -> DeploymentState:
        return replace(self, **changes)

    @property
    def rolled_back_from(self) -> Deployment | None:
        """The previous deployment when it is the newer one this host was rolled back from:
        a plain rollback to it would go forward (an older one marked so, users switched
        forward by hand since, is a real rollback). Marked so by its `status`, or, where the
        Go CLI rewrote the file without it, by the runbook rollback recorded on the current
        one (rolled_back_to). runbook rollback refuses it, status's fixes and the fleet's
        pre-flight say so."""
        previous, current = self.previous, self.current
        if previous is None or current is None or not (
                previous.status == "rolled_back"
                or (previous.status is None and rolled_back_to(current))):
            return None
        return previous if previous.deployed_at > current.deployed_at else None

    def deployments(self) -> Iterator[Deployment]:
        """Current, previous, then history, each id once, newest information first."""
        seen: set[str] = set()
        for dep in (self.current, self.previous, *self.history):
            if dep is not None and dep.id not in seen:
                seen.add(dep.id)
                yield dep

    def find_version(self, ref: str) -> Deployment | None:
        """The deployment a user means by a version, commit prefix or id: of several records
        of it (the same commit deployed again), the one that went live last, by its times,
        never by its place in the file (found by review: a history written oldest first gave
        `rollback --to` the oldest record, and the schema guard judged its schema)."""
        found = [d for d in self.deployments() if d.matches(ref)]
        return max(found, key=lambda d: d.went_live, default=None)  # a tie: the first listed

    def older_than(self, entry: Unread, target: Deployment) -> bool:
        """Whether an unread entry is provably older than `target`: where the times show
        the file's order, by its place (behind the target's own entry, or one older than
        it); where they do not, by its own times. Never by the contract's "newest first"
        alone: another tool may append."""
        own = (entry.deployed_at is not None and entry.went_live is not None
               and entry.deployed_at < target.deployed_at
               and entry.went_live < target.went_live)
        if entry.newer is not None:  # places in the history as read
            if entry.deployed_at is not None and entry.went_live is not None and not own:
                return False  # its own times say newer: another tool appended it (review)
            read = self.origin if self.origin is not None else self
            return any(_not_newer(dep, target) for dep in read.history[:entry.newer])
        return own

    def passed_by(self, target: Deployment | None) -> list[str]:
        """A rollback to `target` (None: a version no readable record holds) passes by the
        unread entries provably older than it: the warning for each, which its plan shows
        and its journal records (status shows them for the previous deployment). The first
        that may be the target, or newer than it, is refused: the problem and its fix,
        exit 4, as the reader refuses a bad record."""
        where = f"{self.source}: " if self.source else ""
        warnings = []
        for entry in self.unread:
            if target is None or not self.older_than(entry, target):
                may = ("the deployment asked for" if target is None else
                       f"newer than {target.version}, the version to roll back to")
                raise StateError(f"{where}{entry.problem} (another tool wrote it; it may be "
                                 f"{may}, so no rollback passes it by); nothing was changed",
                                 entry.fix)
            warnings.append(f"{where}{entry.problem}: another tool wrote this entry, older "
                            f"than {target.version} (the rollback target), so the rollback "
                            f"passes it by and the file keeps it as written; fix: {entry.fix} "
                            "(togather-runbook before 0.2.0 refuses this file: finish an "
                            "interrupted run with this version, never after a downgrade)")
        return warnings

    def find_id(self, deployment_id: str) -> Deployment | None:
        return next((d for d in self.deployments() if d.id == deployment_id), None)

    @property
    def locked(self) -> bool:
        return bool(self.lock.get("locked"))
