"""The schema version a deployment ran with, when the tool that recorded it did not say.

The deploy script and the Go CLI never record a migration version, so a rollback to one of
their deployments cannot compare schemas from the state file alone. Two other witnesses exist
on a host: the snapshot sidecars (`.meta.json`, whose `migration_version` is the schema at the
moment of the dump). The app's `/health` is no witness of it: its migrations check reports
the database's version as it reads it; only a failing check (the build rejects the schema) is
taken, as a problem. Each answer names its witness, so the plan shows where the number came
from, or that none exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runbook import docker, health
from runbook import state as states
from runbook.environment import Environment, Slot
from runbook.errors import RunbookError

if TYPE_CHECKING:
    from runbook import snapshots as snapshots_type


@dataclass(frozen=True)
class Found:
    """A migration version and its witness; `problem` when the app itself rejects the schema."""

    version: int | None
    source: str
    problem: str | None = None
    witness: Path | None = None  # the snapshot whose sidecar said it (kept by cleanup)


def successor(env: Environment, target: states.Deployment,
              current: states.Deployment) -> states.Deployment:
    """The deployment that most recently replaced `target`; `current` is the one that serves.

    For the previous deployment that is the current one, whatever the dates say: a rollback
    keeps the target's `deployed_at`, so after A, B, a rollback to A and then C, the earliest
    deployment after A is B, whose pre-deploy snapshot is days older than C's. The pair is
    judged as a pair: the old tooling's rollback swaps current and previous in the file
    without switching, so there the target is the file's current and what serves its
    previous (found by review: the dates then chose B). Further back (`--to`) the state file
    keeps no more than the dates: the first one that began serving after the target last
    went live (a rollback to it records when: `live_since`)."""
    try:
        state = states.read_state(env.state_file, environment=env.name)
    except RunbookError:
        return current
    pair = {d.id for d in (state.current, state.previous) if d is not None}
    if target.id != current.id and pair == {target.id, current.id}:
        return current
    since = target.went_live
    later = [(at, d) for d in state.deployments()
             if d.id != target.id and (at := d.live_after(since)) is not None]
    return min(later, key=lambda p: p[0], default=(since, current))[1]


def from_sidecars(env: Environment, target: states.Deployment,
                  after: states.Deployment) -> Found | None:
    """What the snapshots say of the target's schema (store.schema_witness): the pre-deploy
    snapshot of the deployment that replaced it (dumped just before its migrations: its
    sidecar, else its dump), else the snapshots taken while it served, when they agree.
    """
    from runbook import snapshots  # only for targets recorded without a migration version

    try:
        listed = snapshots.own_snapshots(env)
    except RunbookError as exc:  # a folder this user cannot list: said, never "no sidecar"
        return Found(None, exc.message.removesuffix("; nothing was changed"))
    own = snapshots.pre_deploy_witness(listed, target, after)
    if own is not None and own.migration_version is not None:
        return Found(own.migration_version, f"sidecar {own.meta_path.name} (pre-deploy "
                                            f"snapshot of {after.version})", witness=own.path)
    # read before the window: its dump was taken just before the migrations that replaced the
    # target's schema, where the window holds whatever was dumped while it served
    dumped = from_dump(env, own, after) if own is not None else None
    if dumped is not None and dumped.version is not None:
        return dumped
    unread = snapshots.unread_in_window(listed, target, after)
    if unread is not None:  # never read as "no sidecar": it may be the pre-deploy one
        return Found(None, f"the sidecar {unread.meta_path.name} cannot be read "
                           f"({unread.unread}): it may be the pre-deploy snapshot of "
                           f"{after.version} or one taken while {target.version} was live, so "
                           "the snapshots cannot tell; run as its owner or root",
                     witness=unread.path)
    snap, how = snapshots.live_witness(listed, target, after)
    if snap is not None:
        return Found(snap.migration_version, f"sidecar {snap.meta_path.name} ({how})",
                     witness=snap.path)
    if dumped is not None:
        return Found(None, dumped.source + (f"; and {how}" if how else ""),
                     witness=dumped.witness)
    return Found(None, how) if how else None


def from_dump(env: Environment, snap: snapshots_type.Snapshot,
              after: states.Deployment) -> Found:
    """The pre-deploy snapshot of the deployment that replaced the target, taken by the
    tooling (its sidecar names no version, or it has none): the dump's own schema_migrations
    is the target's schema. Without it, every rollback on a host whose history predates the
    runbook went ahead unchecked (found by review). Reads the dump up to schema_migrations'
    rows (most of it: pg_dump writes table data in name order), so only when nothing cheaper
    says it."""
    from runbook.snapshots.verify import schema_version

    try:
        version = schema_version(env, snap)
    except RunbookError as exc:
        return Found(None, f"the pre-deploy snapshot of {after.version}, {snap.name}, cannot "
                           f"be read: {exc.message}", witness=snap.path)
    return Found(version, f"the dump of {snap.name} (pre-deploy snapshot of {after.version}, "
                          "its schema_migrations)", witness=snap.path)


def from_health(env: Environment, target: states.Deployment) -> Found | None:
    """A slot already running the target build whose migrations check fails: the build
    itself rejects the schema (a problem, never a version). The check's `details.version` is
    the database's version as the app reads it, not the one its build ran with: the real app
    reports whatever `schema_migrations` holds, so taking it for the target's schema made the
    guard say "compatible" on any schema (read-only probe). The container is found by its
    build (image id), not its name: one made from `<repo>:latest` holding the target's build,
    whose record names `<repo>:<version>`, is the target (found after such records healed)."""
    names, builds = _target_build(env, target)
    for slot in Slot:
        config = env.slot(slot)
        info = docker.inspect(config.container)
        if not (info.running and (info.image in names or info.image_id in builds)):
            continue
        report = health.probe(config, env.health.path, env.health.request_timeout)
        check = next((c for c in report.checks if c.name == "migrations"), None)
        if check is None or check.status != "fail":
            continue
        source = (f"the migrations check of {target.version} in {config.container} "
                  f"({check.status}: {check.message or 'no message'})")
        return Found(None, source, f"{target.version} in {config.container} rejects the "
                                   f"database schema: {check.message or 'migrations fail'}")
    return None


def _target_build(env: Environment, target: states.Deployment) -> tuple[set[str], set[str]]:
    """The names that stay on the target's build (its recorded image when it does, and
    `[compose] image_repository:<version>`) and the builds (image ids) they name. A moving
    tag (`:latest`, an old record) is left out: it names whatever was pushed last."""
    from runbook import slots

    names = {slots.image_of(env, target.version, target.image or None),
             slots.image_of(env, target.version)}
    names = {n for n in names if docker.names_for_good(n, target.version)}
    builds = {build for build in map(docker.image_id, names) if build is not None}
    return names, builds


def infer(env: Environment, current: states.Deployment,
          target: states.Deployment) -> Found:
    """The target's migration version: recorded, from a sidecar, from the app, or none."""
    if target.migration_version is not None:
        return Found(target.migration_version, "the state file")
    after = successor(env, target, current)
    found = from_sidecars(env, target, after)
    if found is not None and found.version is not None:
        return found
    # a build that rejects the schema is a problem whatever the snapshots could not tell
    found = from_health(env, target) or found
    if found is not None:
        return found
    return Found(None, f"not recorded by the tool that deployed {target.version}, and no "
                       f"snapshot sidecar in {env.database.snapshot_dir} says it (a running "
                       f"{target.version}'s /health reports the database's version, not its "
                       "own)")
