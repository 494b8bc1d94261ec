"""Transitions of the state (pure: they return new objects): a new deployment, after a
deploy, after a rollback, the lock mirror."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from runbook.environment import Slot
from runbook.errors import StateError
from runbook.state.dialects import normalized_history
from runbook.state.model import Deployment, DeploymentState, current_operator, new_id
from runbook.state.schema import _COMMIT, _VERSION, HEALTH_STATUSES, STATUSES


def is_version(text: str) -> bool:
    """Whether `text` is a version a deployment record can hold (a 7-hex short commit)."""
    return bool(_VERSION.fullmatch(text.strip().lower()))


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
                  *front: Deployment | None) -> tuple[Deployment, ...]:
    """Put `front` (updated records) first, drop stale copies and the current deployment."""
    fresh = [d for d in front if d is not None]
    fresh_ids = {d.id for d in fresh}
    rest = [d for d in state.history if d.id not in fresh_ids]
    skip = current.id if current is not None else None
    return normalized_history([d for d in (*fresh, *rest) if d.id != skip])


def _all_keys_of(state: DeploymentState, dep: Deployment) -> dict[str, Any]:
    """The keys no tool here knows of every record of `dep` in the file (previous, history),
    its own values winning: the previous deployment's copy became current without the keys
    only its history entry held (found by review)."""
    extra = dict(dep.extra)
    for record in (state.previous, *state.history):
        if record is not None and record.id == dep.id:
            for key, value in record.extra.items():
                extra.setdefault(key, value)
    return extra


def _superseded(dep: Deployment) -> Deployment:
    """A deployment replaced while recorded as serving (or with no status) is superseded."""
    return dep.with_(status="superseded") if dep.status in (None, "active") else dep


def after_deploy(state: DeploymentState, new: Deployment,
                 replaces: Deployment | None = None, *,
                 served_schema: int | None = None) -> DeploymentState:
    """New deployment becomes current; the one it replaced becomes previous (superseded).

    `replaces`: the deployment that served when the deploy began, when the file's current
    is another (the old tooling swaps current and previous in the file without switching):
    that one becomes previous, and the file's current is kept in the history, superseded.
    `served_schema`: the schema the replaced deployment served on (read before the deploy's
    migrations), recorded only when its record names none: the Go CLI and the deploy script
    record none, and a rollback back to it went unchecked (found by review)."""
    if new.active_slot is None:
        raise StateError(f"deployment {new.id} has no slot", "record the slot it runs in")
    current = new if new.status is not None else new.with_(status="active")
    old = replaces if replaces is not None else state.current
    if old is not None and old.id == current.id:
        return state.with_(current=current)
    if old is not None and old.migration_version is None and served_schema is not None:
        old = old.with_(migration_version=served_schema)
    previous = _superseded(old) if old is not None else None
    # a file's current that did not serve is no longer active either (found by review: the
    # history kept two "active" deployments)
    displaced = _superseded(state.current) if state.current is not None else None
    kept = [d for d in (displaced, state.previous)
            if d is not None and (previous is None or d.id != previous.id)]
    return state.with_(current=current, previous=previous,
                       history=_with_history(state, current, previous, *kept))


def after_rollback(state: DeploymentState, target: Deployment | None = None, *,
                   slot: Slot | None = None, health_status: str | None = None,
                   run_id: str | None = None, image: str | None = None,
                   served: Deployment | None = None, live_since: datetime | None = None,
                   migration_version: int | None = None,
                   served_schema: int | None = None) -> DeploymentState:
    """Target (default: previous) becomes current and active; the current is `rolled_back`.

    `slot` overrides the slot the target now runs in (it may have been recreated in the other
    one); `run_id` is recorded as the Go CLI's `rollback_id` so its readers see a rollback.
    `image`: the image its container runs now, recorded over the name the record gave it (the
    same build under another name: what runs is the truth `runbook status` compares with).
    `served`: the deployment that served when the rollback began, when the file's current is
    another (the old tooling swaps current and previous without switching): that one is
    rolled back from, and the file's current is kept in the history, superseded.
    `live_since` (default now): when the target serves again, recorded beside its first
    deployed_at, so the time the release rolled back from served (at its schema) is never
    taken for the target's; `migration_version`: the schema the guard checked it runs on,
    recorded when its record names none (one recorded is its deploy's, kept);
    `served_schema`: the schema the deployment rolled back from served on (read while it
    served, before the run changed anything), recorded likewise only when its record names
    none: the Go CLI and the deploy script record none, and a rollback back to it went
    unchecked and steered on-call to a snapshot restore (found by review).
    """
    old = served if served is not None else state.current
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
    extra = _all_keys_of(state, target)
    if run_id:
        extra.update(rollback=True, rollback_id=run_id)
    current = target.with_(status="active", rollback_count=target.rollback_count + 1,
                           active_slot=new_slot, extra=extra, image=image or target.image,
                           health_status=health_status or target.health_status,
                           live_since=live_since or datetime.now(UTC),
                           migration_version=(target.migration_version
                                              if target.migration_version is not None
                                              else migration_version))
    previous = old.with_(status="rolled_back",
                         migration_version=(old.migration_version
                                            if old.migration_version is not None
                                            else served_schema))
    displaced = (_superseded(state.current) if state.current is not None
                 and state.current.id not in (old.id, target.id) else None)
    return state.with_(current=current, previous=previous,
                       history=_with_history(state, current, previous, state.previous,
                                             displaced))


def with_lock(state: DeploymentState, lock: Mapping[str, Any]) -> DeploymentState:
    """The state with its `lock` mirror replaced (`locked` is always present).

    Give the documented keys; the writer puts them in the file's dialect (the Go CLI's
    `expires_at`, its zero times when unlocked), keeping keys another tool added.
    """
    data = dict(lock)
    data.setdefault("locked", False)
    return state.with_(lock=data)
