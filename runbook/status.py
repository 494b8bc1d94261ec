"""`runbook status`: what the state file claims next to what really runs, and where they differ.

`gather` reads the facts (never changing anything), `problems` judges them: every problem
comes with its fix, and each kind of problem is one small check function in CHECKS, so a new
one is one more function. "No problems" is printed only when every check found nothing.
Everything shown is redacted (secrets) and, in text, escaped (a newline or an escape sequence
inside a state field must not forge a status line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from runbook import caddy, database, disk, docker, health, slots, traffic
from runbook import intent as intents
from runbook import lock as locks
from runbook import state as states
from runbook.caddy import BlockDrift, Unreloadable, VerifyResult
from runbook.environment import Environment, Slot
from runbook.errors import ExitCode, LockedError, RunbookError
from runbook.times import rough_duration

NOT_RECORDED = "not recorded"
SLOT_LABEL = docker.SLOT_LABEL


@dataclass(frozen=True)
class Problem:
    """Something that differs from what a rollback expects, and what to do about it."""

    problem: str
    fix: str
    check: str = ""  # which check found it (CHECKS: its function's name), for machines

    def to_json(self) -> dict[str, str]:
        return {"problem": self.problem, "fix": self.fix, "check": self.check}


@dataclass(frozen=True)
class Note:
    """Something on-call should know that is no problem (exit 0): a slot left running on
    purpose, with how to end it when it is no longer wanted; a snapshot folder without room
    for the next restore's or deploy's snapshot (`disk_notes`)."""

    note: str
    check: str  # the check that would otherwise have listed it as a problem
    slot: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"note": self.note, "check": self.check, "slot": self.slot}


@dataclass
class Facts:
    """What gather() found; the checks read only this (and the environment)."""

    env: Environment
    state: states.DeploymentState | None = None
    state_error: RunbookError | None = None
    containers: dict[Slot, docker.ContainerInfo | None] = field(default_factory=dict)
    container_errors: dict[Slot, RunbookError] = field(default_factory=dict)
    # for a slot whose container does not exist: (name, labels) of each container that
    # publishes its port (None: Docker could not be asked)
    publishers: dict[Slot, list[tuple[str, dict[str, str]]] | None] = field(default_factory=dict)
    reports: dict[Slot, health.HealthReport] = field(default_factory=dict)
    # (version, git_commit) as the slot's own /version says them, asked only where its /health
    # answered naming no git_commit (an app with fewer fields); None: no answer naming either.
    # Found by review: a status-only /health named nothing, and a retagged serving slot was
    # "No problems found" while its /version named the other build
    versions: dict[Slot, tuple[str | None, str | None] | None] = field(default_factory=dict)
    caddy: caddy.Inspection | None = None
    caddy_running: bool = False  # its admin API answers
    caddy_down: Unreloadable | None = None  # why it cannot take a reload
    caddy_error: RunbookError | None = None
    caddy_imports: RunbookError | None = None  # a switch would refuse the file's imports
    # (Caddy's error, where to mend it): Caddy's adapter rejects the Caddyfile on disk
    caddy_rejected: tuple[str, str] | None = None
    # the block between the markers on disk names the slot Caddy serves, but not as Caddy runs
    # it (caddy.block_drift): its next restart or reload loads the file
    block_drift: BlockDrift | None = None
    # why a switch to the standby would be refused: an upstream it keeps on another host
    # than [slots.<standby>] host reaches no standby there (slots.upstream_problem)
    upstream_miss: str | None = None
    schema: database.SchemaVersion | None = None
    database_error: RunbookError | None = None
    # the database's container, read when the database does not answer: paused or stopped
    # is what to fix first (status said only "check `docker ps`" and "roll back")
    database_container: docker.ContainerInfo | None = None
    migrating: str | None = None  # a migration under way: where it runs
    lock: locks.LockStatus | None = None
    traffic: traffic.Traffic | None = None  # what Caddy runs: the truth about traffic
    traffic_error: RunbookError | None = None
    intent: intents.Intent | None = None  # an interrupted run, if any
    intent_error: RunbookError | None = None
    # the interrupted run's target asked through the proxy, when Caddy serves it: what the
    # next run decides "took effect" by (finish.target_check)
    target_check: VerifyResult | None = None
    last_run: dict[str, Any] | None = None
    # the build (image id) the current deployment's image names now; None: not known
    current_build: str | None = None
    held: dict[Slot, dict[str, Any]] = field(default_factory=dict)  # left running for h2c
    # the standby's container as a switch left it running on purpose, that switch still the
    # last run that moved traffic (slots.left_by_switch): its record
    left_by_switch: dict[Slot, dict[str, Any]] = field(default_factory=dict)
    held_error: RunbookError | None = None
    space: list[disk.Space] = field(default_factory=list)  # where a run writes
    # (problem, fix) where the user running status may not write what a run writes
    access: list[tuple[str, str]] = field(default_factory=list)
    # (problem, fix) where a run writes that no one may write, root included (disk.blocked_...)
    blocked: list[tuple[str, str]] = field(default_factory=list)
    # the snapshot folder's problem, when a snapshot would not fit (a note: `disk_notes`)
    snapshot_space: list[tuple[str, str]] = field(default_factory=list)
    # the last restore left a database that does not match its snapshot (its check failed)
    doubted: dict[str, str] | None = None
    doubted_error: RunbookError | None = None  # the record of that cannot be read
    # the record of the restores begun and not finished (beside the state file) cannot be read
    unfinished_error: RunbookError | None = None
    # the newest of them, when nothing started the app since and no interrupted run's record
    # covers it (a standalone `snapshot restore` writes none): restore_records' keys
    unfinished: dict[str, str] | None = None
    # per slot: the containers of its compose service other than its own (compose.leftovers)
    leftovers: dict[Slot, list[tuple[str, str, str]]] = field(default_factory=dict)
    # per slot: {name: why} of its leftovers users reach (compose.serving_leftovers)
    serving_leftovers: dict[Slot, dict[str, str]] = field(default_factory=dict)
    # per slot whose container publishes ports, none the one the environment names for it
    # (traffic.port_mismatch): (problem, fix). Its container's facts are another slot's
    mispaired: dict[Slot, tuple[str, str]] = field(default_factory=dict)
    # `runbook rollback [--to V]` planned as its dry run plans it, asked only when a fix
    # would name it (_rollback_refusal): per --to (None: the previous), its refusal or None
    rollback_plans: dict[str | None, RunbookError | None] = field(default_factory=dict)

    @property
    def active(self) -> Slot | None:
        """The slot Caddy sends traffic to as it runs (its loaded config), never as the
        Caddyfile on disk says; None when that is not one slot or cannot be read, or when
        the proxy answers as the other slot (`Traffic.conflict`): fail closed, as the
        rollback and the switch refuse then. Found by review: admin_url pointing at another
        Caddy, status named that Caddy's slot and told on-call to stop the one users reach."""
        if self.traffic is None or self.traffic.conflict:
            return None
        return self.traffic.slot

    def image(self, slot: Slot) -> str | None:
        info = self.containers.get(slot)
        return info.image if info is not None and info.exists else None

    def running(self, slot: Slot) -> bool:
        info = self.containers.get(slot)
        return info is not None and info.running


def _arg(env: Environment) -> str:
    from runbook.environment import command_arg

    return command_arg(env)


def expected_image(env: Environment, dep: states.Deployment) -> str:
    """The image a deployment runs: as recorded, else `[compose] image_repository:<version>`."""
    from runbook import slots

    return slots.image_of(env, dep.version, dep.image or None)


# ---------------------------------------------------------------------------------------------
# The checks: each yields the problems of one kind


def _error(exc: RunbookError, default_fix: str) -> Problem:
    return Problem(exc.message, exc.fix or default_fix)


def state_unreadable(f: Facts) -> Iterator[Problem]:
    """A state file that cannot be read. Gone while an interrupted run waits (a rollback
    killed at its commit, the file deleted since), its fix was "deploy first", which is
    refused then (found by review): the command that finishes that run records it again."""
    if f.state_error is None:
        return
    pending = f.intent
    if pending is not None and not f.env.state_file.exists():
        fix = _doubted_fix(f) or (
            f"`{_unfinished_command(f, pending)}` finishes the interrupted run (see its "
            "problem) and records the state file again; a deploy is refused until then")
        yield Problem(f.state_error.message, fix)
        return
    served = _unrecorded_serving(f) if isinstance(f.state_error, states.NoStateFile) else None
    if served is not None:
        yield Problem(f"{f.state_error.message}, {served[0]}", served[1])
        return
    yield _error(f.state_error, f"fix {f.env.state_file}")


def slots_mispaired(f: Facts) -> Iterator[Problem]:
    """The environment pairs a slot's container with a port it does not publish ([slots]
    containers or ports swapped, a typo): said first, as the rollback and the switch refuse
    on it. Found by review: status read the other slot's stopped container as the serving
    one ("stopped: `docker start` it", the old build) beside users served; the checks that
    read a mis-paired slot's container are judged without it (`_judged`)."""
    refused = any(f.running(slot) for slot in f.mispaired)  # as check_slot_ports judges
    for slot, (problem, fix) in f.mispaired.items():
        yield Problem(f"{problem}: the environment file pairs the {slot} slot's container and "
                      "port wrongly, so what runs cannot be told slot by slot"
                      + ("; every rollback, deploy or switch is refused until it is mended"
                         if refused else ""), fix)


def _pairing_fix(f: Facts) -> str | None:
    """While a container the environment pairs wrongly runs (every rollback, deploy and
    switch is refused then: traffic.check_slot_ports): the pointer to it for every problem
    whose fix would switch or roll back. None while each such container is stopped: nothing
    is refused then, and the pointer hid `docker start` of the correctly paired serving
    container in an outage (found by review)."""
    refused = [s for s in f.mispaired if f.running(s)]
    if not refused:
        return None
    said = ", ".join(f"[slots.{s}]" for s in refused)
    return (f"mend {said} in {f.env.source or 'the environment file'} or its container "
            "first (see the problem that names the port its container publishes): until "
            "then a rollback or a switch is refused; then "
            f"`runbook status {_arg(f.env)}` again")


def _by_name(f: Facts) -> tuple[Slot | None, str] | None:
    """(the slot whose container Caddy dials by its name or address, that dial) where the
    Caddyfile's block (else Caddy's running config) dials no slot's port but a slot's
    container (`togather-server-blue:8080`, a Caddy on the slots' Docker network); the slot
    None when both slots' are dialed. None otherwise."""
    ports = {cfg.port for cfg in f.env.slots.values()}
    block = f.caddy.upstreams if f.caddy is not None else ()
    dials = ([f"{up.host}:{up.dials}" for up in block if up.host is not None]
             if not any(up.slot is not None for up in block) else [])
    if not dials and f.traffic is not None and not f.traffic.slots:
        dials = list(f.traffic.dials)
    named: dict[Slot, str] = {}
    for dial in dials:
        host, port = traffic.dial_host(dial), traffic.dial_port(dial)
        for slot, info in f.containers.items():
            if info is not None and port not in ports and host in info.addresses:
                named.setdefault(slot, dial)
    if not named:
        return None
    return (next(iter(named)) if len(named) == 1 else None), next(iter(named.values()))


def _by_name_fix(f: Facts) -> str | None:
    """While Caddy dials a slot's container by its name or address (`_by_name`): what to
    write instead, the form that reaches the slot by the port it publishes, and the switch
    that loads it. Found by review (caddytruth LOW 5): the fix named `runbook switch ENV
    --slot <slot>`, which every switch refuses there (exit 4, "not this host"): the runbook
    tells the slots apart by their published ports only."""
    found = _by_name(f)
    if found is None:
        return None
    slot, dial = found
    who = f"the {slot} slot's container" if slot is not None else "the slots' containers"
    said = (f"Caddy dials {who} by name or address ({dial}), not by the port each slot "
            "publishes on this host ([slots] port), the one way the runbook tells the slots "
            "apart: every switch and rollback refuses this Caddyfile")
    order = (slot, slot.other) if slot is not None else tuple(Slot)
    target = next((s for s in order if (r := f.reports.get(s)) is not None and r.ok), None)
    arg = _arg(f.env)
    if target is None:
        return (f"{said}; no slot answers healthy: bring one back first (see the problems "
                f"above), then write the upstream between the slot markers as "
                f"{slots.slot_upstream(f.env)} with that slot's port, and `runbook switch "
                f"{arg} --slot <that slot>` loads it")
    stays = f"; users stay on {target}" if target == slot else ""
    return f"{said}; " + slots.reach_fix(
        f.env, target, f"then `runbook switch {arg} --slot {target}` loads it (health-gated, "
        f"verified through the proxy{stays})")


def container_unknown(f: Facts) -> Iterator[Problem]:
    for slot, exc in f.container_errors.items():
        yield Problem(f"cannot inspect the {slot} container: {exc.message}",
                      exc.fix or "check `docker info`")


def caddy_problems(f: Facts) -> Iterator[Problem]:
    if f.caddy_error is not None:
        yield _error(f.caddy_error, f"check {f.env.caddy.caddyfile}")
    elif f.caddy is not None and not f.caddy.consistent:
        active = f.active
        report = f.reports.get(active) if active is not None else None
        # the slot Caddy serves, healthy, no run's record open: that switch writes the file
        # back and moves nobody; "--slot <slot>" led to it refused as "nothing to switch"
        # and to the other slot, moving users off a healthy one to fix a file (found by review)
        # Lines the switch cannot rewrite: their own fix (the switch refused them, and so
        # did every rollback: found by review)
        yield Problem("Caddyfile managed block: " + "; ".join(f.caddy.problems),
                      "; ".join(f.caddy.fixes) + f" in {f.env.caddy.caddyfile}: until then "
                      "every switch and rollback refuses the file; then `runbook status "
                      f"{_arg(f.env)}` again" if f.caddy.fixes else
                      f"`runbook switch {_arg(f.env)} --slot {active}` writes it back in line "
                      f"with what Caddy runs (traffic stays on {active}); do not reload Caddy "
                      "by hand before that: it would load this file"
                      if active is not None and report is not None and report.ok
                      and f.intent is None else
                      _pairing_fix(f) or _by_name_fix(f) or
                      "make every reverse_proxy and X-Togather-Slot header between the markers "
                      f"name one slot: `runbook switch {_arg(f.env)} --slot <slot>` rewrites it")
    if f.caddy_imports is not None:  # said before a rollback at 3 a.m. refuses on it
        yield _error(f.caddy_imports, f"check {f.env.caddy.caddyfile}")
    if f.caddy_rejected is not None:  # found by review: "No problems found" of a typo
        said, fix = f.caddy_rejected
        yield Problem(f"Caddy rejects {f.env.caddy.caddyfile} as it is on disk ({said}): it "
                      "still runs the config it loaded, but its next reload or restart fails "
                      "on this file, and every switch, rollback or deploy refuses it", fix)
    if f.caddy_down is not None and f.caddy_down.answering:  # up, but cannot take a reload
        yield Problem(f.caddy_down.problem, f.caddy_down.fix)


def caddy_not_answering(f: Facts) -> Iterator[Problem]:
    """Caddy does not answer: the outage, said first (found by review: after an unreadable
    state file and the containers that could not be inspected)."""
    if f.caddy_down is not None and not f.caddy_down.answering:
        yield Problem(f"Caddy is not answering at {f.env.caddy.admin_url}",
                      f"{f.caddy_down.fix} and check `curl {f.env.caddy.admin_url}/config/`")


def database_unreachable(f: Facts) -> Iterator[Problem]:
    if f.database_error is None:
        return
    down = _database_down(f)
    if down is not None:
        yield Problem(f"{down}: {f.database_error.message}", _database_fix(f) or "")
        return
    yield _error(f.database_error, f"check `docker ps` for {f.env.database.container}")


def _database_down(f: Facts) -> str | None:
    """The database's container is paused or stopped, said (as the rollback's refusal says
    it: database.container_down)."""
    return database.container_down(f.database_container)


def _database_fix(f: Facts) -> str | None:
    """While the database's container is paused or stopped: starting it again, for the
    database's problem and for every problem whose fix would roll back or switch (every
    slot needs the database: found by review, "roll back" was refused by the schema guard)."""
    start = database.container_start(f.database_container)
    if start is None:
        return None
    return (f"`{start}` first (a rollback or a switch needs the database too), then "
            f"`runbook status {_arg(f.env)}` again")


def schema_dirty(f: Facts) -> Iterator[Problem]:
    """A migration under way, or a schema golang-migrate left dirty: found by review, shown
    as "schema 2 (dirty)" with no problem listed, and the interrupted deploy's fix, "runs it
    again", ran the migrations again on it."""
    if f.migrating is not None:
        yield Problem(f"a migration is under way: {f.migrating}"
                      + (f"; the database schema is dirty at version {f.schema.version} until "
                         "it ends" if f.schema is not None and f.schema.dirty else ""),
                      f"wait until it ends (`runbook status {_arg(f.env)}` no longer says so); "
                      "meanwhile stop, recreate or deploy nothing")
    elif f.schema is not None and f.schema.dirty:
        from runbook import finish

        found = finish.dirty_schema(f.env, f.schema, f.intent)
        yield Problem(found.message, found.fix or "")


def no_current_deployment(f: Facts) -> Iterator[Problem]:
    """A slot serves but the state file records nothing: a rollback would have no anchor."""
    if f.state is None or f.state.current is not None:
        return
    served = _unrecorded_serving(f)
    if served is not None:
        yield Problem(f"no current deployment is recorded, {served[0]}", served[1])


def _unrecorded_serving(f: Facts) -> tuple[str, str] | None:
    """("yet the <slot> slot serves traffic (<image>)", the fix that records it: the deploy
    of the version it runs), when the slot Caddy serves runs; for a state file recording
    no current deployment, or none at all (never written: found by review, its fix said
    "deploy first" with no command and no version, while status showed what served)."""
    active = f.active
    if active is None or not f.running(active):
        return None
    version = _running_version(f, active)
    from runbook import compose

    record = (f"record it: `runbook deploy {_arg(f.env)} --version {version or '<version>'}` "
              "deploys that version again and records it" if compose.can_recreate(f.env) else
              # no compose: `runbook deploy` refuses here, and a switch to the slot that
              # already serves changes nothing: the host's own deploy is what records it
              "record it by deploying that version again the way this host's own deploy "
              "does (it writes the state file; `runbook deploy` needs compose, which this "
              "host has not)")
    return (f"yet the {active} slot serves traffic ({f.image(active)})",
            f"{record}; until then a rollback has nothing to roll back from")


def _running_version(f: Facts, slot: Slot) -> str | None:
    """The version (7-hex commit) the slot's container runs, as its /health says it, else its
    image's `org.opencontainers.image.version` label, else its tag; None when none of them is
    a version: a moving tag (`:latest`) names none, and `--version latest` is bad input."""
    info = f.containers.get(slot)
    labels = info.labels if info is not None and info.labels else {}
    for said in (said_build(f, slot)[0],
                 labels.get("org.opencontainers.image.version"),
                 info.tag if info is not None else None):
        if said and states.is_version(said):
            return said.strip().lower()
    return None


def version_beside(env: Environment, slot: Slot,
                   report: health.HealthReport) -> tuple[str | None, str | None] | None:
    """The slot's own /version (version, git_commit), asked only where its /health answered
    naming no commit: cheap where /health names it, and nothing asked of a slot that does
    not answer. On the slot's port, never through the proxy, bounded as the probe is; None
    when it is absent, unreadable or names neither (no problem: nothing is named)."""
    if report.http_status is None or health.named_commit(report.git_commit) is not None:
        return None
    return health.version_of(env.slot(slot), env.health.request_timeout)


def said_build(f: Facts, slot: Slot) -> tuple[str | None, str | None, str]:
    """(version, git_commit, the endpoint that named them) of the build the slot says it
    runs: its /health's, or its own /version's where /health named no commit and /version
    named one (asked by collect): an app with fewer /health fields names its build there
    (CONTRACTS), and a status-only /health hid a retagged serving slot (found by review)."""
    report = f.reports.get(slot)
    version, commit = (report.version, report.git_commit) if report is not None else (None, None)
    asked = f.versions.get(slot)
    if health.named_commit(commit) is None and asked is not None:
        return asked[0], asked[1], health.VERSION_PATH
    return version, commit, f.env.health.path


def _moved_by_interrupted_run(f: Facts) -> bool:
    """Caddy serves the target of an interrupted run's record: that run moved traffic (or
    its record is out of date), and interrupted_run says which and what finishes it. Found
    by review: a rollback killed before its state write was also said as "state says blue is
    active" (a switch to blue undoes it) and "someone changed the container outside the
    runbook" (the runbook's own run did)."""
    return f.intent is not None and f.active is not None and f.active == f.intent.target


def state_disagrees_with_caddy(f: Facts) -> Iterator[Problem]:
    current = f.state.current if f.state else None
    active = f.active
    if _moved_by_interrupted_run(f):
        return
    if current is None or active is None or current.active_slot in (None, active):
        return
    arg, recorded = _arg(f.env), current.active_slot
    back = (f"`runbook switch {arg} --slot {recorded}` puts traffic back on {recorded} "
            f"({current.version}, health-gated)")
    report = f.reports.get(active)
    if (pairing := _pairing_fix(f)) is not None:
        fix = pairing
    elif report is None or not report.ok:
        fix = f"check both slots (`runbook healthcheck {arg} --slot both`), then {back}"
    else:
        # the switch to the slot that serves only records it there (health-gated, verified
        # through the proxy): nothing in Caddy or Docker changes, nobody moves
        version = _running_version(f, active)
        fix = (f"check both slots (`runbook healthcheck {arg} --slot both`); if {recorded} is "
               f"the right one, {back}; if {active} is, `runbook switch {arg} --slot {active}` "
               f"records it as serving ({version or 'the version it runs'}, health-gated; "
               "traffic does not move)")
    yield Problem(f"state says {recorded} is active, Caddy sends traffic to {active}", fix)


def _off_record(f: Facts) -> str | None:
    """While Caddy sends traffic to another slot than the state file records as active (a
    hand edit, another tool's switch; not an interrupted run's target): what is true, and
    the documented way back, the manual switch to the recorded slot (health-gated: nothing
    moves unless it answers). Found by review: the outage's fixes said `runbook rollback`,
    which goes from what serves, a build the file does not record (refused, exit 4, when it
    runs another version than the file's current)."""
    current = f.state.current if f.state is not None else None
    active = f.active
    if current is None or active is None or current.active_slot in (None, active) \
            or _moved_by_interrupted_run(f):
        return None
    recorded = current.active_slot
    return (f"traffic is on {active}, the state file says {recorded} ({current.version}) is "
            f"active: `runbook switch {_arg(f.env)} --slot {recorded}` puts traffic back on "
            f"the recorded deployment (it starts {recorded} if stopped and moves nothing "
            "unless it answers healthy); not a rollback, which would go from a build the "
            "state file does not record")


def _rollback_target(f: Facts) -> tuple[str, str | None] | None:
    """The rollback a fix may name, (command, its --to): `runbook rollback ENV`, or, when the
    previous deployment is the newer one this host was rolled back from (which that command
    refuses), the newest older deployment named with --to (a placeholder to fill in was not
    a command to type); None when there is none to go to (refused then, exit 4: found by
    review)."""
    state = f.state
    current = state.current if state is not None else None
    if state is None or current is None:
        return None
    back = state.rolled_back_from
    if back is None:
        return (f"runbook rollback {_arg(f.env)}", None) if state.previous is not None else None
    older = [d for d in state.deployments() if d.deployed_at < current.deployed_at
             and d.version not in (current.version, back.version)]
    if not older:
        return None
    to = max(older, key=lambda d: d.deployed_at).version
    return f"runbook rollback {_arg(f.env)} --to {to}", to


def _rollback_refusal(f: Facts, to: str | None) -> RunbookError | None:
    """Why `runbook rollback ENV [--to TO]` would be refused now, as its dry run plans it
    (rollback.status_plan: no lock taken, nothing written, no tool run), for the deploy
    user (what this one may not write is a note); None when it would run. Found by review:
    status named the rollback wherever a previous deployment was recorded, and on a dirty
    schema, with Caddy dialing no slot, or back to a build older than the schema, it was
    refused (exit 4, its refusal offering --force). Asked only when a fix would name it (an
    outage), once."""
    if to not in f.rollback_plans:
        from runbook import rollback

        try:
            rollback.status_plan(f.env, to)
        except RunbookError as exc:
            f.rollback_plans[to] = exc
        else:
            f.rollback_plans[to] = None
    return f.rollback_plans[to]


def _absent(f: Facts, slot: Slot | None) -> docker.ContainerInfo | None:
    """The slot's container when Docker says it does not exist (removed)."""
    info = f.containers.get(slot) if slot is not None else None
    return info if info is not None and not info.exists else None


def _redeploy(f: Facts, down: Slot) -> str | None:
    """The deploy of the recorded current build again, when the failing slot's container is
    absent (removed) and its image is here: a rollback would take users off a release
    because its container went (found by review: after a rollback, the only rollback left
    went back past the schema, refused; status never said the container was absent)."""
    current = f.state.current if f.state is not None else None
    if _absent(f, down) is None or current is None or current.active_slot not in (None, down) \
            or f.current_build is None:  # its image gone: the deploy is refused too
        return None
    from runbook import compose

    said = f"redeploy {current.version}, the build the state file records"
    if not compose.can_recreate(f.env):  # the host's own way, then a switch
        return f"{said}: {compose.deploy_hint(f.env, current.version)}"
    return (f"{said}, to {down.other} ({compose.deploy_hint(f.env, current.version)} moves "
            "traffic there once it answers healthy)")


def _way_out(f: Facts, down: Slot | None, *, say_absent: bool = True) -> str:
    """What moves users off a slot that fails (`down`; None: Caddy's config names no slot):
    the redeploy of the recorded build when its container is absent, the rollback when its
    dry run plans it, the switch to the other slot (with no slot named, the one the state
    file records) when it answers healthy now (first when it runs the recorded build), else
    the rollback's refusal or a deploy; led by the container's absence (`say_absent`: not
    said by the problem itself). Found by review: `runbook rollback` was offered with no
    previous deployment recorded, and where it was refused (exit 4)."""
    ways: list[str] = []
    absent = _absent(f, down)
    gone = (f"the {down} slot's container {absent.name} is absent (removed)"
            if absent is not None and down is not None and say_absent else None)
    redeploy = _redeploy(f, down) if down is not None else None
    if redeploy is not None:
        ways.append(redeploy)
    found = _rollback_target(f)
    refused = _rollback_refusal(f, found[1]) if found is not None else None
    if isinstance(refused, LockedError):  # every rollback, deploy or switch is refused
        return "; ".join(x for x in (gone, f"a rollback, a deploy or a switch is refused now: "
                                           f"{refused.message}", refused.fix) if x)
    if found is not None and refused is None:
        ways.append(f"roll back (`{found[0]}`)")
    current = f.state.current if f.state is not None else None
    target = down.other if down is not None else current.active_slot if current else None
    report = f.reports.get(target) if target is not None else None
    if target is not None and report is not None and report.ok:
        same = current is not None and report.version == current.version
        switch = (f"switch to {target}, which answers {report.status} now"
                  + (f" running the recorded {current.version}" if same and current else "")
                  + f" (`runbook switch {_arg(f.env)} --slot {target}`)")
        ways.insert(0 if same else len(ways), switch)
    # why no rollback is named (on-call would ask), its own fix when nothing else is named
    no = (f"a rollback{f' to {found[1]}' if found and found[1] else ''} is refused now "
          f"({refused.message.removesuffix('; nothing was changed')})"
          if found is not None and refused is not None else None)
    if ways:
        said = ", or ".join(ways) + (f"; {no}" if no else "")
    elif no is not None and refused is not None and f.intent is not None:
        # the interrupted run's own problem says how it is finished; the refusal's fix also
        # offers `docker start` of the slot a restore stopped, the app on the data that
        # restore is about to replace (tests/test_interrupted.py: never said by status)
        said = f"{no}: finish the interrupted run as the problem that names it says"
    elif no is not None and refused is not None:
        said = f"{no}: {refused.fix}" if refused.fix else no
    else:  # `runbook deploy` where it can run: a `docker run` host's is refused (exit 4)
        from runbook import compose

        said = (f"deploy a known-good version "
                f"({compose.deploy_hint(f.env, '<known-good version>')}): no earlier "
                "deployment is recorded to roll back to, and no other slot answers healthy")
    return ": ".join(x for x in (gone, said) if x)


def _schema_first(f: Facts) -> str | None:
    """While a migration runs or the schema is left dirty (schema_dirty): the pointer to that
    problem for every problem whose fix would roll back, switch or deploy. Found by review:
    "roll back" was named on a dirty schema, refused (exit 4) with --force as its way out."""
    if f.migrating is not None:
        return ("wait for the migration under way to end first (see that problem): a "
                "rollback, a deploy or a switch now starts code on a schema it is changing")
    if f.schema is None or not f.schema.dirty:
        return None
    return (f"repair the database schema first (see its problem: the database schema is dirty "
            f"at version {f.schema.version}): a rollback, a deploy or a switch is refused on it "
            f"until then (`runbook status {_arg(f.env)}` again once it is repaired)")


def active_unhealthy(f: Facts) -> Iterator[Problem]:
    active = f.active
    if active is not None and active in f.reports and not f.reports[active].ok:
        absent = _absent(f, active)
        yield Problem(f"the active slot {active} is {f.reports[active].status}"
                      + (f": its container {absent.name} is absent" if absent else ""),
                      _doubted_fix(f) or _unfinished_fix(f) or _start_first(f)
                      or _pairing_fix(f)
                      or _database_fix(f) or _schema_first(f) or _off_record(f)
                      or f"{_way_out(f, active, say_absent=False)}; or see "
                      f"`runbook healthcheck {_arg(f.env)} --slot {active}`")


def image_differs(f: Facts) -> Iterator[Problem]:
    current = f.state.current if f.state else None
    active = f.active
    if current is None or active is None or _moved_by_interrupted_run(f):
        return
    running, expected = f.image(active), expected_image(f.env, current)
    info = f.containers.get(active)
    # the same build under another name (a container made from `:latest`, the record naming
    # its version) is what the file says: the container's build is compared, not its name
    same = info is not None and info.image_id is not None and info.image_id == f.current_build
    if not running or running == expected or same:
        return
    recorded = current.active_slot
    if recorded is not None and recorded != active:
        # traffic is off the recorded slot: that is why (found by review: "someone changed
        # the container ... before rolling back", with the switch back as the way out)
        kept = f.containers.get(recorded)
        holds = kept is not None and kept.exists and _holds_current(f, kept)
        fix = (f"traffic is on {active}, not on {recorded}, the slot the state file records "
               f"(see the problem that says so): {active} runs another build than the "
               "recorded one" + (f"; {recorded} holds the recorded build" if holds else
                                 f"; find out what {recorded} holds (`docker inspect "
                                 f"{f.env.slot(recorded).container}`)"))
    else:
        fix = ("someone changed the container outside the runbook: find out what runs "
               f"(`docker inspect {f.env.slot(active).container}`) before rolling back")
    yield Problem(f"state says {expected} is current, the active slot runs {running}", fix)


def commit_differs(f: Facts) -> Iterator[Problem]:
    """The serving slot names another build (its /health, or its own /version where /health
    names no commit) than the state file records for the deployment it serves as: the same
    tag holding other code, rebuilt or retagged and its container recreated from it (found
    by review: "No problems found" while a rollback's target ran the code rolled back from;
    again on a host whose /health names no commit, its /version naming the other build).
    Naming none is no problem: nothing contradicts (a host with fewer fields whose /version
    is absent or names nothing)."""
    current = f.state.current if f.state else None
    active = f.active
    if current is None or active is None or active not in f.reports \
            or _moved_by_interrupted_run(f) or current.active_slot != active:
        return
    version, commit, where = said_build(f, active)
    named = health.names_build(current.version, version, commit)
    if named is False:
        if next(image_differs(f), None) is not None:
            return  # its image is another than the record's: that problem says so
        said = health.named_commit(commit)
        runs = f"version {version}" if health.build_key(version) else f"commit {said}"
        if health.build_key(version) and said is not None:
            runs += f" (commit {said[:7]})"
        recorded = f"{current.version} ({current.id})"
    elif health.commits_differ(current.git_commit, commit):
        said = health.named_commit(commit) or ""
        cut = 7 if said[:7] != current.git_commit[:7] else None  # never two alike
        runs = f"commit {said[:cut]}"
        recorded = f"{current.git_commit[:cut]} for {current.version} ({current.id})"
    else:
        return
    container = f.env.slot(active).container
    image = f.image(active) or expected_image(f.env, current)
    yield Problem(
        f"{active} runs {runs} (its {where}), but the state file records {recorded}: users "
        "get another build than the recorded one",
        f"its image tag {image} was rebuilt or retagged since {current.version} was recorded: "
        f"find out which build serves (`docker inspect --format '{{{{.Image}}}}' "
        f"{container}`); to serve commit {current.git_commit} again, rebuild it as {image} "
        f"(or `docker tag` that build as {image} if this host still has it), then recreate "
        "a slot from it with a rollback or a deploy, whose health gate refuses a build "
        "naming another commit than the recorded one")


def stale_lock(f: Facts) -> Iterator[Problem]:
    held = f.lock
    if held is not None and held.broken:  # every run is refused by it, stale or not
        yield Problem(f"the deploy lock cannot be used: {held.why}",
                      held.fix or (f"remove {held.path} by hand if nothing uses it"
                                   if held.path.parent.is_dir() else
                                   f"point [lock] dir at a directory ({held.path.parent} is "
                                   "not one)"))
    elif held is not None and held.stale and held.empty:
        # no one's lock: the next run takes it over by itself, and unlock removes it as it
        # is; it was "the shell tooling's lock", held or stale, with `unlock --force` (found by
        # review, after runs took it over unasked)
        yield Problem(f"the deploy lock directory {held.path} is empty, "
                      f"{rough_duration(held.age)} old: a run killed while taking the lock "
                      "left it (between its mkdir and its holder file); the next runbook "
                      "rollback, deploy or switch takes it over by itself (the old "
                      "deploy.sh refuses it)",
                      f"`runbook unlock {_arg(f.env)} --yes` removes it; otherwise the next "
                      "runbook rollback, deploy or switch takes it over")
    elif held is not None and held.stale:
        from runbook import finish

        if f.intent is not None and finish.in_progress(f.intent, held):
            return  # interrupted_run says it: a run in progress, never a lock to release
        # what `runbook unlock` would do, by its own judgement: "add --force" was offered for
        # a live holder, which unlock refuses even so (found by review)
        plain = locks.removal_refusal(f.env, held, force=False)
        forced = locks.removal_refusal(f.env, held, force=True) if plain is not None else None
        if plain is None:
            fix = f"release it: `runbook unlock {_arg(f.env)} --yes`"
        elif forced is None:
            fix = (f"once you have checked that its process {held.pid} is not that run (it is "
                   "known by its pid alone, which may be reused), release it: "
                   f"`runbook unlock {_arg(f.env)} --yes --force`")
        else:  # a live holder: the lock module's own way out (stop it, or resume it)
            fix = forced.fix or forced.message
        stopped = (f"; its process {held.pid} is suspended (Ctrl-Z or SIGSTOP), so it never "
                   "ends by itself" if held.suspended else "")
        yield Problem(f"the deploy lock is stale: {held.why}{stopped} (held by "
                      f"{held.describe()})", fix)
    elif held is not None and held.undated:  # refused by every run; only --force clears it
        yield Problem(f"the deploy lock's age cannot be told: {held.why} (held by "
                      f"{held.describe()})",
                      "once you have checked that no deploy or rollback runs (its holder is "
                      f"named above), release it: `runbook unlock {_arg(f.env)} --force`")


def live_lock(f: Facts) -> Iterator[Problem]:
    """A live run holds the deploy lock (another tool's deploy, or a run of the runbook whose
    record does not say it is in progress): every rollback, deploy and switch is refused
    until it is released. Found by review: the shell tooling's deploy holding it was shown on
    the lock line only, with "No problems found" and exit 0, while each rollback was refused."""
    held = f.lock
    if held is None or held.stale or held.broken or held.undated or held.is_ours:
        return
    from runbook import finish

    if f.intent is not None and finish.in_progress(f.intent, held):
        return  # interrupted_run says it: a run in progress, with its own way out
    if held.empty:  # a run between its mkdir and its holder file: seconds, never "30 min"
        yield Problem(f"the deploy lock is being taken at this moment: its directory "
                      f"{held.path} is still empty, {rough_duration(held.age)} old; every "
                      "rollback, deploy or switch is refused until that run names itself in "
                      "it", "wait a few seconds and run `runbook status "
                      f"{_arg(f.env)}` again: the run taking it is named there; if it stays "
                      "empty (a run killed while taking it), the next rollback, deploy or "
                      "switch takes it over by itself once it is "
                      f"{locks.EMPTY_DIR_GRACE:.0f} s old")
        return
    if held.suspended and held.pid is not None:
        fix = locks.suspended_fix(held.pid)
    else:
        # a process known by its start time makes it stale as it exits; one known by its
        # pid alone (the shell tooling's mirror) only once it expires
        when = ("at once" if held.holder_alive is True and not held.pid_unverified
                else f"in {rough_duration(held.expires_in)}" if held.expires_in != float("inf")
                else f"once its process {held.pid or '?'} has exited")
        fix = (f"wait for that run to end (`runbook status {_arg(f.env)}` again says when the "
               f"lock is free); if its process has died, `runbook unlock {_arg(f.env)}` "
               f"removes the lock once it is stale ({when})")
    yield Problem(f"the deploy lock is held by {held.describe()}: {held.why}; every rollback, "
                  "deploy or switch is refused until it is released", fix)


def _standby_left(f: Facts) -> tuple[Slot, str, docker.ContainerInfo] | None:
    """The standby that should be stopped (`[rollback] stop_old_slot`): (slot, image,
    container), or None. A standby running the live build is a hot spare (both slots after
    `compose up`); one running anything else is left over from a run or a hand. A live run's
    lock explains it. The builds (image ids) are compared, not the names: a spare made from
    `<repo>:latest` runs the live build as much as one made from `<repo>:<version>`."""
    active = f.active
    if active is None or not f.env.stop_old_slot:
        return None
    if f.lock is not None and not f.lock.stale:
        return None
    standby = active.other
    image = f.image(standby)
    if standby in f.held or docker.crash_loop(f.containers.get(standby)) is not None:
        return None  # its own check says why and what to do
    spare, live = f.containers.get(standby), f.containers.get(active)
    # paused, it still holds its port and its database connections (found by review: "No
    # problems found"); restarting is crash_looping's
    if spare is None or not spare.up or image is None or image == f.image(active):
        return None
    if live is not None and spare.image_id is not None and spare.image_id == live.image_id:
        return None  # the live build under another name: a hot spare
    if f.traffic is not None and standby in f.traffic.pinned:
        return None  # another site proxies to it (outside the markers): stopping it cuts it
    if f.intent is not None and standby in (f.intent.source, f.intent.target):
        return None  # an unfinished run's slot: its own problem says what to do with it
    report = f.reports.get(active)
    if report is not None and not report.ok:
        return None  # the serving slot does not answer: the standby may be the only good one
    return standby, image, spare


def standby_running(f: Facts) -> Iterator[Problem]:
    """A standby left running by an interrupted or manual run, or restarted or recreated
    since a switch left it (found by review: the very container a clean `runbook switch`
    keeps on purpose, for an instant switch back, was listed here, exit 1: a false alarm
    after every switch; it is `standby_notes`' now)."""
    found = _standby_left(f)
    if found is None or found[0] in f.left_by_switch:
        return
    standby, image, spare = found
    if _kept_rm(f, standby, spare) is not None:
        return  # left running as the only way back: standby_notes says it
    active = standby.other
    left = "paused" if spare.status == "paused" else "running"
    yield Problem(f"the standby slot {standby} is left {left} ({image}) while {active} takes "
                  "traffic",
                  f"stop it (it takes no traffic): `docker stop {f.env.slot(standby).container}`"
                  "; a rollback starts it again when needed")


def standby_absent(f: Facts) -> Iterator[Problem]:
    """The standby slot, where a rollback goes back to the recorded deployment, has no
    container of its name (renamed or removed): the rollback cannot just start a kept one.
    Found by review: after a container renamed away under a run, status said "No problems
    found" with the slot absent. Not while a run holds the lock (a recreate under way) or an
    interrupted run's record names the slot (its own problem says what to do)."""
    active = f.active
    info = f.containers.get(active.other) if active is not None else None
    if active is None or info is None or info.exists:
        return
    if f.lock is not None and not f.lock.stale:
        return
    if f.intent is not None and active.other in (f.intent.source, f.intent.target):
        return
    if next(previous_absent(f), None) is not None:  # said there, as a `docker run` host makes it
        return
    found = _rollback_target(f)
    if found is None:  # no deployment recorded to go back to: nothing is missing
        return
    standby, name = active.other, info.name
    refused = _rollback_refusal(f, found[1])
    then = (f"otherwise `{found[0]}` recreates it before it moves traffic" if refused is None
            else f"otherwise a rollback is refused now ({refused.message}): {refused.fix}"
            if refused.fix else f"otherwise a rollback is refused now ({refused.message})")
    yield Problem(f"the standby slot {standby}'s container {name} is absent (renamed or "
                  "removed): a rollback has no kept container to start there",
                  f"if it was renamed, give it its name back: `docker ps -a --filter "
                  f"label={SLOT_LABEL}={standby}` finds it, then `docker rename <its name> "
                  f"{name}`; {then}")


def standby_notes(f: Facts) -> list[Note]:
    """The standby a switch left running on purpose, as it left it (the same container, id,
    start and build, and no run moved traffic since: slots.left_by_switch): no problem, said
    with the switch back and the stop, for when it is no longer needed."""
    found = _standby_left(f)
    record = f.left_by_switch.get(found[0]) if found is not None else None
    kept = _kept_rm(f, found[0], found[2]) if found is not None else None
    if found is not None and record is None and kept is not None:
        standby, image, _ = found
        container = f.env.slot(standby).container
        return [Note(f"the {standby} slot ({container}, {image}) is left running: it was "
                     f"started with --rm, so `docker stop` deletes it, and {kept}; it is the "
                     f"way back to {image} (`runbook switch {_arg(f.env)} --slot {standby}`); "
                     f"`docker stop {container}` once no rollback to it is needed (Docker then "
                     "removes it)", standby_running.__name__, str(standby))]
    if found is None or record is None:
        return []
    standby, image, _ = found
    container = f.env.slot(standby).container
    return [Note(f"the {standby} slot ({container}, {image}) was left running by the switch "
                 f"at {record.get('at', '?')} (run {record.get('run_id', '?')}) so a switch "
                 f"back is instant: `runbook switch {_arg(f.env)} --slot {standby}`; "
                 f"`docker stop {container}` when you no longer need it",
                 standby_running.__name__, str(standby))]


def docker_health_notes(f: Facts) -> list[Note]:
    """Each slot whose container's own Docker healthcheck says unhealthy while its /health
    answers ok: a note, never a problem (/health is the contract every gate keeps; found by
    review: status said "health healthy" and nothing else)."""
    notes = []
    for slot in Slot:
        info, report = f.containers.get(slot), f.reports.get(slot)
        said = report.docker_disagrees(info.docker_health) if info and report else None
        if said is not None and info is not None:
            notes.append(Note(
                f"{said}: the {slot} slot's container {info.name} (`docker inspect --format "
                f"'{{{{json .State.Health}}}}' {info.name}` shows its checks' output); a "
                "rollback, a deploy or a switch gates on /health", "docker_health_disagrees",
                str(slot)))
    return notes


def _kept_rm(f: Facts, standby: Slot, spare: docker.ContainerInfo) -> str | None:
    """Why a standby started with `docker run --rm` is left running (None: it is not one, or
    compose makes it again): its stop deletes it and nothing here could make it again
    (compose.made_again), so the old slot's stop left it running as the way back
    (slots.stop_step); `docker stop` is not a fix to offer for it."""
    if not spare.auto_remove:
        return None
    from runbook import compose

    return compose.made_again(f.env, standby, f.containers.get(standby.other))


def previous_absent(f: Facts) -> Iterator[Problem]:
    """The previous deployment's container absent (removed by hand, or by Docker: one started
    with `docker run --rm` is deleted by its stop) where nothing here makes it again
    (compose.made_again): every rollback to it is refused until on-call recreates it. Where
    compose makes it again a rollback recreates it: no problem. Found by review: "No problems
    found" before and after a rollback refused for it, and that refusal named the serving
    container as the one to recreate."""
    state = f.state
    prev = state.previous if state is not None else None
    slot = prev.active_slot if prev is not None else None
    current = state.current if state is not None else None
    if state is None or prev is None or slot is None or slot == f.active \
            or (current is not None and current.active_slot == slot):
        return
    if f.lock is not None and not f.lock.stale:  # a deploy may be making it right now
        return
    if f.intent is not None and slot in (f.intent.source, f.intent.target):
        return  # the interrupted run's own problem says what to do
    info = f.containers.get(slot)
    if info is None or info.exists:
        return
    from runbook import compose

    why = compose.made_again(f.env, slot, f.containers.get(slot.other))
    if why is None:
        return
    config = f.env.slot(slot)
    serves = " (it serves)" if f.active == slot.other else ""
    back = f"runbook rollback {_arg(f.env)}" + (f" --to {prev.version}"
                                                if state.rolled_back_from is not None else "")
    image = expected_image(f.env, prev)
    recreate = (f"recreate {slot} ({config.container}) with {image} on port {config.port} the "
                f"way this host makes its slots (its `docker run` command), never "
                f"{slot.other}{serves}; then `{back}` goes back to it")
    moved = slots.tag_holds_another(image, prev.git_commit,
                                    (f.containers.get(slot.other), state))
    if moved is not None:  # recreated from it, the rollback is refused (found by review)
        recreate = (f"{image} no longer holds {prev.version}'s build: {moved}, so a container "
                    f"made from it is not the way back; put commit {prev.git_commit}'s build "
                    f"back under {image} first (rebuild it, or `docker tag` that build as "
                    f"{image} if this host still has it), then {recreate}")
    yield Problem(f"the previous deployment {prev.version}'s {slot} container {config.container} "
                  f"is absent (renamed, or removed: Docker deletes one started with --rm when "
                  f"it stops), and {why}: a rollback to {prev.version} is refused",
                  f"if it was renamed, give it its name back: `docker ps -a --filter "
                  f"label={SLOT_LABEL}={slot}` finds it, then `docker rename <its name> "
                  f"{config.container}`; otherwise {recreate}")


def previous_other_build(f: Facts) -> Iterator[Problem]:
    """The previous deployment's container, kept in the standby slot under its recorded tag,
    holds a build whose revision label names another commit than the state file records
    (the tag retagged or rebuilt, the container made again from it): a rollback to it is
    refused (rollback._refuse_another_build). Found by review: after status's own fix was
    followed with a tag moved to v1's build, status said "No problems found", and the
    rollback failed its gate. No label naming a commit: no problem (nothing contradicts)."""
    state, active = f.state, f.active
    prev = state.previous if state is not None else None
    if state is None or prev is None or active is None or prev.active_slot != active.other:
        return
    if (f.lock is not None and not f.lock.stale) or (
            f.intent is not None and active.other in (f.intent.source, f.intent.target)):
        return  # a run may be making it now; an interrupted run's problem says what to do
    slot, info = active.other, f.containers.get(active.other)
    image = expected_image(f.env, prev)
    if info is None or not info.exists or info.image != image or info.image_id is None:
        return
    try:
        said = slots.build_commit(info.image_id, info.labels)
    except RunbookError:
        return
    recorded = health.named_commit(prev.git_commit)
    if said is None or recorded is None or health.commits_differ(recorded, said) is not True \
            or slots.label_shared(f.containers.get(active), info.image_id, said, state):
        return
    from runbook import compose

    cut = 7 if said[:7] != recorded[:7] else None  # never two alike
    how = (f"`docker rm -f {info.name}`, and the rollback recreates it through compose"
           if compose.made_again(f.env, slot, f.containers.get(active)) is None else
           "the way this host makes its slots (its `docker run` command)")
    yield Problem(f"the previous deployment {prev.version}'s {slot} container {info.name} "
                  f"holds commit {said[:cut]} (its build's {docker.REVISION_LABEL} label, made "
                  f"from {image}), but the state file records {recorded[:cut]}: a rollback to "
                  f"{prev.version} is refused (it would run another build than the recorded one)",
                  f"put commit {prev.git_commit}'s build back under {image} (rebuild it, or "
                  f"`docker tag` that build as {image} if this host still has it), then replace "
                  f"{info.name} (it serves no users) with a container of it: {how}")


def upstream_unresolved(f: Facts) -> Iterator[Problem]:
    """Another site's upstream Caddy resolves only per request may reach either slot: no
    run stops or recreates one while it runs (traffic.Traffic.unresolved)."""
    if f.traffic is not None and f.traffic.unresolved:
        yield Problem(f"{traffic.unresolved_site(f.env, f.traffic)}: no rollback or deploy "
                      "stops or recreates a running slot (the old one is left running)",
                      traffic.UNRESOLVED_FIX)


def pinned_slot_down(f: Facts) -> Iterator[Problem]:
    """A slot a site outside the slot markers proxies to, whose container is down: that site
    answers 502 (found by review: after a rollback stopped such a slot, "No problems
    found"). The serving slot down is serving_stopped's; a per-request upstream is
    upstream_unresolved's."""
    found = f.traffic
    if found is None or found.unresolved:
        return
    for slot in sorted(found.pinned - found.slots):
        info = f.containers.get(slot)
        if info is None or info.up:
            continue
        container = f.env.slot(slot).container
        state = (f"is {'stopped' if info.status == 'exited' else info.status}" if info.exists
                 else "does not exist")
        serving = (f" (or at {f.active}'s port {f.env.slot(f.active).port}, which serves)"
                   if f.active is not None and f.active != slot else "")
        yield Problem(f"{traffic.pinned_by(f.env, found, slot)}, but {container} {state}: "
                      "that site's requests get errors (502)",
                      f"point that site's reverse_proxy between the slot markers (it then "
                      f"follows every switch){serving} and reload Caddy; or, if it must reach "
                      f"{slot}'s build, `docker start {container}`" if info.exists else
                      f"point that site's reverse_proxy between the slot markers (it then "
                      f"follows every switch){serving} and reload Caddy")


def held_for_h2c(f: Facts) -> Iterator[Problem]:
    """A slot a run left running for connections Caddy's previous config still held over h2c:
    stopping it is on-call's call (when they have closed), and no deploy recreates it.
    Never a slot that serves now, by either witness (found by review: after a switch back
    to it, the record stood and its fix stopped the container every user reached); the run
    that commits traffic to a slot removes its record, but one killed right after its
    commit has not."""
    if f.held_error is not None:
        yield _error(f.held_error, "see the file named")
    serving = f.traffic.serving() if f.traffic is not None else frozenset()
    for slot, record in f.held.items():
        if str(slot) in serving:
            continue
        container = f.env.slot(slot).container
        yield Problem(f"the {slot} slot ({container}) was left running at "
                      f"{record.get('at', '?')} for connections Caddy's previous config held "
                      "over cleartext HTTP/2 (h2c): they may still be answered by it, and no "
                      "deploy recreates it while it runs",
                      slots.held_fix(f.env, container, slots.held_port(record)))


def _curl_through_proxy(env: Environment) -> str:
    """The curl that asks what verification asks: with a site, this host's Caddy for it
    (`--connect-to`, so the TLS name and the certificate are the site's)."""
    c = env.caddy
    if not c.site:
        return f"curl -sI {c.proxy_url}{c.verify_path}"
    parts = urlsplit(c.proxy_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return (f"curl -sI --connect-to {c.site}:{port}:{parts.hostname}:{port} "
            f"{parts.scheme}://{c.site}:{port}{c.verify_path}")


def traffic_unclear(f: Facts) -> Iterator[Problem]:
    """Caddy runs a config that sends traffic to no slot, both, or not where the proxy says;
    or which slot serves cannot be read at all: every check that needs the serving slot is
    then skipped, so that alone is a problem (never "No problems found")."""
    if f.traffic is None:
        # Caddy down, or serving with its admin API off or elsewhere: said by caddy_problems
        # (in the same words: it was said twice, found by review)
        if f.traffic_error is not None and f.caddy_running and f.caddy_down is None:
            yield _error(f.traffic_error, f"check `curl {f.env.caddy.admin_url}/config/` and "
                         f"`{_curl_through_proxy(f.env)}`")
        return
    trouble = f.traffic.problem(f.env)
    if trouble and f.traffic.conflict:  # in the words of the rollback's and switch's refusal
        yield Problem(traffic.cannot_tell(f.env, f.traffic).message.removesuffix(
            traffic.NOTHING_CHANGED), traffic.no_single_slot_fix(f.env, f.traffic))
    elif trouble:  # marker lines that cannot be read: a switch refuses them too
        yield Problem(trouble, traffic.no_single_slot_fix(f.env, f.traffic)
                      if f.traffic.markers is not None or f.traffic.outside_differs else
                      _pairing_fix(f) or _by_name_fix(f)
                      or "repoint Caddy at the slot you know is healthy: "
                      f"`runbook switch {_arg(f.env)} --slot <blue|green>`")


def dials_the_other_container(f: Facts) -> Iterator[Problem]:
    """Caddy sends the app to one slot and also dials the other slot's container by its
    name or address (`172.20.0.3:8080`): part of the traffic reaches the slot a switch moved
    users off, and the slot header, stamped by the managed block's header_down, hides it
    (found by review: a reverse_proxy pool of `localhost:<port>` and the old slot's container
    address, "No problems found" after the switch)."""
    if f.traffic is None or f.active is None:
        return
    other = f.active.other
    info = f.containers.get(other)
    if info is None or not info.addresses:
        return
    dials = [d for d in f.traffic.dials if traffic.dial_host(d) in info.addresses]
    if dials:
        yield Problem(
            f"Caddy's running config sends the app to {f.active} but also dials "
            f"{', '.join(dials)}, the {other} slot's container {info.name} by its name or "
            f"address: requests there reach {other}, which no switch moves",
            f"dial each slot by its own {slots.slot_upstream(f.env)} only between the slot "
            "markers (move any other upstream out of the managed block), reload Caddy, then "
            f"check with `runbook status {_arg(f.env)}`")


def _stopped_serving(f: Facts) -> docker.ContainerInfo | None:
    """The container of the slot Caddy serves, when it exists and is stopped (exited, or
    created and never started) or paused (found by review: said only as unreachable, with a
    rollback as the fix), and no interrupted run's record stands: that run's problem
    says the slot is stopped and names what finishes it (a restoring run stops it on
    purpose; started by hand, the app runs on the database that run is replacing). Unless
    that run restored the database and stopped before traffic moved, leaving it at the
    schema the recorded build this container holds ran on (_fits_after_restore)."""
    active = f.active
    info = f.containers.get(active) if active is not None else None
    if info is None or not info.exists or info.status not in ("exited", "created", "paused"):
        return None
    if f.intent is not None:  # unless out of date (interrupted_run: "nothing of it to finish")
        from runbook import finish

        if finish.in_progress(f.intent, f.lock):
            return None
        later = finish.superseded(f.intent, f.state) if active == f.intent.target else None
        if later is None and (_fits_after_restore(f) is None or not _holds_current(f, info)):
            return None
    return info


def _fits_after_restore(f: Facts) -> str | None:
    """The safety snapshot of the interrupted run when it restored the database and stopped
    before traffic moved (its target failed its gate: exit 5, the app slots stopped), and
    the database is at the schema that snapshot holds, the one the code that served ran on
    before the restore: started again, that code fits it, as a rerun's undo would start it
    (README, "When a run is interrupted"). Found by review: status named only the rerun,
    back to the target whose gate had just failed, while `docker start` of the recorded
    build was the way back. None otherwise."""
    pending = f.intent
    if pending is None or f.active is None or f.active != pending.source \
            or f.active == pending.target or f.schema is None or f.schema.dirty:
        return None
    from runbook.snapshot_restore import restored_at_schema_before

    return restored_at_schema_before(f.env, pending.run_id, f.schema)


def _holds_current(f: Facts, info: docker.ContainerInfo) -> bool:
    """The container holds the build the state file records as current: its build, or the
    same image name (as image_differs compares them)."""
    current = f.state.current if f.state is not None else None
    if current is None:
        return False
    return info.image == expected_image(f.env, current) \
        or (info.image_id is not None and info.image_id == f.current_build)


def _held_lock(f: Facts) -> str | None:
    """The run that holds the deploy lock now (not stale, usable, dated), described: a run
    may have stopped the serving slot on purpose (a restore)."""
    held = f.lock
    if held is None or held.stale or held.broken or held.undated:
        return None
    return held.describe()


def _held_fix(f: Facts) -> str | None:
    """While a live run holds the deploy lock and the serving container is stopped (a
    restore's maintenance stop): wait for it, or, suspended, the ways out. The outage's
    problems said "roll back" or "switch" beside "wait" (found by review); the lock
    refuses both while it is held."""
    holder = _held_lock(f)
    if holder is None or _stopped_serving(f) is None:
        return None
    said = (f"a run holds the deploy lock ({holder}) and may have stopped it: wait for it to "
            f"end, then `runbook status {_arg(f.env)}` again")
    held = f.lock.holder if f.lock is not None else None
    if f.lock is not None and f.lock.suspended and held is not None and held.pid is not None:
        said += f"; {locks.suspended_fix(held.pid)}"
    return said


def _start_first(f: Facts) -> str | None:
    """For the outage's other problems while the serving container is stopped holding the
    recorded build: the pointer to starting it, never a rollback or a switch (found by
    review: each was refused, failed its gate, or led to --force on the wrong schema); while
    a run holds the lock, the pointer to waiting for it (_held_fix)."""
    info = _stopped_serving(f)
    if info is None:
        return None
    if (held := _held_fix(f)) is not None:
        return held
    if not _holds_current(f, info):
        # a rollback goes from that unrecorded build (refused when it names another version,
        # or with no previous), a switch serves whatever the other slot holds, maybe that
        # same build: neither is known to help until on-call knows which build should serve
        # (found by review: both were offered)
        return _off_record(f) or (
            f"find out which build should serve first (see the problem of the stopped "
            f"container {info.name}, which holds another build than the state file records): "
            "until then neither a rollback nor a switch is known to serve the right one")
    if (way := _crashed_way_out(f, info)) is not None:
        return (f"the serving container {info.state_said} (see that problem): "
                f"`{_bring_back(info)}`, "
                f"or {way}")
    return (f"start the stopped container first (see that problem): `{_bring_back(info)}`; "
            "a rollback or a switch would move users off the recorded build")


def _crashed_way_out(f: Facts, info: docker.ContainerInfo) -> str | None:
    """The rollback its dry run plans, named beside `docker start` when the serving
    container crashed (a non-zero exit, the OOM killer): started again, the recorded build
    may crash again. Found by review: a killed one was "stopped (exited)", and a rollback
    said to "move users off the recorded build". None for a clean stop, or no rollback."""
    if not info.crashed:
        return None
    found = _rollback_target(f)
    if found is None or _rollback_refusal(f, found[1]) is not None:
        return None
    return f"roll back (`{found[0]}`: the previous build, health-gated)"


def _bring_back(info: docker.ContainerInfo) -> str:
    """The command that serves a stopped or paused container's build again."""
    return f"docker {'unpause' if info.status == 'paused' else 'start'} {info.name}"


def serving_stopped(f: Facts) -> Iterator[Problem]:
    """The container of the slot Caddy serves is stopped (a host reboot, the OOM killer, a
    stray `docker stop`). Found by review: status said only that users were not served and
    the slot was unreachable, and named a rollback (refused by the schema guard, which
    offered --force: old code on a newer schema), a switch to the older build (failing its
    gate) or one to the serving slot (refused: "nothing to switch"), while `docker start`
    alone brought the recorded build back. A container of another build is started only
    once on-call knows that build is the one to serve."""
    info = _stopped_serving(f)
    active = f.active
    if info is None or active is None:
        return
    said = (f"the {active} slot Caddy serves is "
            f"{'paused' if info.status == 'paused' else f'stopped ({info.status})'}: its container "
            f"{info.name} holds {info.image or 'an image not recorded'}")
    # a non-zero exit is a crash, or a `docker kill` / a stop that timed out (137, 143):
    # Docker does not say who stopped it, so neither does this
    crash = (f"; its container {info.state_said}" + (
        "" if info.oom_killed else ": it crashed, or was killed by hand")
        if info.crashed else "")
    current = f.state.current if f.state is not None else None
    if not _holds_current(f, info):
        recorded = (f"not {expected_image(f.env, current)}, the build the state file records "
                    "as current" if current is not None
                    else "and the state file records no current deployment")
        yield Problem(f"{said}, {recorded}{crash}",
                      _doubted_fix(f) or _unfinished_fix(f) or _held_fix(f)
                      or f"find out which build should serve (`docker inspect {info.name}`): "
                      f"`{_bring_back(info)}` serves {info.image or 'that image'} again, "
                      "which the state file does not record; otherwise "
                      + (_off_record(f) or "deploy or roll back to the build to serve"))
        return
    safety = _fits_after_restore(f) if f.intent is not None else None
    fits = "" if safety is None or f.schema is None else (
        f"; the interrupted run restored the database to schema {f.schema.describe()}, the one "
        f"this build ran on before that restore ({safety}, its safety snapshot, holds it): it "
        "fits")
    way = _crashed_way_out(f, info)
    yield Problem(f"{said}, the build the state file records as current{crash}",
                  _doubted_fix(f) or _unfinished_fix(f) or _held_fix(f)
                  or (f"either `{_bring_back(info)}` (the recorded build again; nothing else "
                      f"changes{fits}; it may crash again: `docker logs --tail 100 "
                      f"{info.name}` says why it stopped) or {way}; then "
                      f"`runbook status {_arg(f.env)}` again" if way is not None else
                      f"`{_bring_back(info)}` (it serves the recorded build again; "
                      f"nothing else changes{fits}), then `runbook status {_arg(f.env)}` again"))


def proxy_unanswered(f: Facts) -> Iterator[Problem]:
    """Caddy's config names the slot, but users are served through the proxy: one that is
    refused or answers 5xx on its own is an outage, never "No problems found" (found by
    review: the slot's own /health is asked on its port, not through Caddy). A 5xx while
    that slot answers healthy on its own port is the proxy's: its log and config are the
    fix, never a switch (found by review: the switch it named failed the same way)."""
    if f.traffic is None:
        return
    if (missed := traffic.proxy_url_missed(f.env, f.traffic)) is not None:
        yield Problem(missed, traffic.proxy_url_fix(f.env))
        return
    if f.traffic.proxy_error is not None:
        check = (f"check Caddy's listener (`{_curl_through_proxy(f.env)}`) and the "
                 f"{f.active or 'serving'} slot")
        # a rollback or a switch would start the app on it
        doubted = (_doubted_fix(f) or _unfinished_fix(f) or _start_first(f)
                   or _pairing_fix(f) or _database_fix(f) or _schema_first(f)
                   or (_by_name_fix(f) if f.active is None else None))
        report = f.reports.get(f.active) if f.active is not None else None
        side = traffic.proxy_side(f.env, f.traffic, report is not None and report.ok)
        if side is not None and not doubted and (
                unreached := _dial_missed(f, f.traffic.slot)) is not None:
            yield Problem(f"users are not served through the proxy: {f.traffic.proxy_error}; "
                          f"{unreached[0]}", unreached[1])
            return
        if side is not None and not doubted:  # no switch ends it: Caddy's log says why
            yield Problem(f"users are not served through the proxy: {f.traffic.proxy_error}; "
                          f"{side}", f"{traffic.proxy_side_fix(f.env)}; then "
                          f"`{_curl_through_proxy(f.env)}` answers as {f.active}")
            return
        doubted = doubted or _off_record(f)
        yield Problem(f"users are not served through the proxy: {f.traffic.proxy_error}",
                      f"{check}; {doubted}" if doubted else
                      f"{check}; if that slot is down: {_way_out(f, f.active)}")


def _dial_missed(f: Facts, slot: Slot | None) -> tuple[str, str] | None:
    """(why, fix) where Caddy dials `slot` (healthy at its own address) at an address that
    reaches nothing (slots.dial_miss): the upstream's address is the cause, not the proxy's
    settings (found by review: a [::1]-only slot dialed at localhost:PORT was "the proxy,
    not the slot, fails", with Caddy's transport to check). The fix writes the address the
    slot answers at, where the Caddyfile names the dial, and the command that loads it."""
    if slot is None or f.traffic is None:
        return None
    found = slots.dial_miss(f.env, slot, f.traffic.dials)
    if found is None:
        return None
    dial, met = found
    config, path = f.env.slot(slot), f.env.caddy.caddyfile
    own = config.base_url.removeprefix("http://")
    written = [up for up in (f.caddy.upstreams if f.caddy is not None else ())
               if up.host is not None and dial in (up.text, f"{up.host}:{up.dials}")]
    lines = ", ".join(str(up.line) for up in written)
    edit = (f"write {own} in place of {written[0].text} at line{'s' if len(written) > 1 else ''}"
            f" {lines} of {path} " if written and len({up.text for up in written}) == 1 else
            f"write the {slot} upstream between the slot markers of {path} as {own} ")
    running = None
    with contextlib.suppress(RunbookError):
        running = traffic.loaded_config(f.env)
    return (f"Caddy dials the {slot} slot at {dial}, where nothing answers ({met}), but "
            f"{slot} listens at {own} ([slots.{slot}] host), where it answers healthy: the "
            "upstream's address does not reach the slot (not the proxy's settings)",
            f"{edit}(where {slot} answers) and load it: {caddy.load_advice(f.env, running)}; "
            f"then `{_curl_through_proxy(f.env)}` answers as {slot}")


def serving_absent(f: Facts) -> Iterator[Problem]:
    """The slot Caddy serves has no container of its name, yet something answers on its
    port: users are served by a container the runbook does not know, which no run stops or
    replaces (each acts on the slot's container by name). Found by review: a renamed one was
    shown "absent ... health healthy", with "No problems found"."""
    active = f.active
    info = f.containers.get(active) if active is not None else None
    report = f.reports.get(active) if active is not None else None
    if active is None or info is None or info.exists or report is None \
            or report.status == "unreachable":  # nothing answers: the outage's checks say it
        return
    config = f.env.slot(active)
    found = f.publishers.get(active)
    said = (f"the {active} slot Caddy serves has no container named {config.container}, yet "
            f"its port {config.port} answers (health {report.status})")
    look = f"`docker ps --filter publish={config.port}`"
    if found is None:
        yield Problem(f"{said}: what answers there cannot be asked of Docker",
                      f"find out what answers there ({look}, `ss -ltnp 'sport = :{config.port}'`)")
        return
    if not found:
        yield Problem(f"{said}: no container publishes that port (a process on the host, or a "
                      "container on the host's network)",
                      f"find out what answers there: `ss -ltnp 'sport = :{config.port}'`; no "
                      "run stops or replaces it")
        return
    names = ", ".join(name for name, _ in found)
    ours = [name for name, labels in found if labels.get(SLOT_LABEL) == str(active)]
    yield Problem(f"{said}: {names} publishes it (from {look}), a container the runbook does "
                  "not know: no run stops or replaces it",
                  f"it carries the {active} slot's label (the slot's container renamed): "
                  f"`docker rename {ours[0]} {config.container}` gives it its name back"
                  if len(found) == 1 and ours else
                  f"find out what it is (`docker inspect {found[0][0]}`) before any rollback, "
                  "deploy or switch: each acts on the slot's container by name")


def crash_looping(f: Facts) -> Iterator[Problem]:
    """A slot's container exits and its restart policy starts it again, over and over: the
    serving one fails users while it is down, a standby starts old code against the shared
    database again and again. Found by review: shown as "running ... healthy" or
    "restarting", with "No problems found"."""
    for slot, info in f.containers.items():
        how = docker.crash_loop(info)
        if how is None or info is None:
            continue
        logs = f"`docker logs --tail 100 {info.name}` says why it exits"
        if slot in f.mispaired:  # whether it serves cannot be told (slots_mispaired)
            yield Problem(f"the container {info.name} is crash-looping: {how}", logs)
        elif slot == f.active:
            yield Problem(f"the {slot} slot's container {info.name}, which Caddy serves, is "
                          f"crash-looping: {how}; users get errors while it is down",
                          f"{logs}; " + (_doubted_fix(f) or _unfinished_fix(f)
                                         or _database_fix(f) or _schema_first(f)
                                         or _off_record(f)
                                         or f"if its build is at fault: "
                                         f"{_way_out(f, slot)}"))
        elif f.active is not None and not (f.traffic is not None
                                           and slot in f.traffic.pinned):
            yield Problem(f"the standby slot's container {info.name} is crash-looping: {how}; "
                          f"it takes no traffic, yet starts {info.image or 'its image'} "
                          "against the database again and again",
                          f"stop it: `docker stop {info.name}` (a rollback starts it again "
                          f"when needed); {logs}")
        else:  # which slot serves is not known, or another site proxies to it: not stopped
            yield Problem(f"the {slot} slot's container {info.name} is crash-looping: {how}",
                          logs)


def upstream_misses_standby(f: Facts) -> Iterator[Problem]:
    """A switch to the standby would send users where it does not listen (its Caddyfile
    upstream is on another host than the one its health is asked at): refused by the switch
    and the rollback, said here first."""
    if f.upstream_miss is not None and f.active is not None:
        refused = slots.refuse_upstream(f.env, f.active.other, f.upstream_miss)
        yield Problem(f"a switch to {f.active.other} would be refused: {f.upstream_miss}",
                      refused.fix or "")


def proxy_unverifiable(f: Facts) -> Iterator[Problem]:
    """The proxy answers, but which slot users reach through it cannot be verified."""
    if f.traffic is None or f.traffic.proxy_error is not None:
        return
    if f.traffic.untrusted:
        yield Problem(f"{f.traffic.proxy_unverifiable}: which slot users reach through the "
                      "proxy cannot be verified (nor a switch)", traffic.untrusted_fix(f.env))
    elif f.traffic.proxy_unverifiable is not None:
        yield Problem(f"{f.traffic.proxy_unverifiable} without X-Togather-Slot: which slot "
                      "users reach cannot be told there (nor a switch verified while the "
                      "serving slot answers)",
                      "set [caddy] site to the host name Caddy serves the app at, or fix "
                      "[caddy] proxy_url and verify_path")


def caddyfile_differs_from_what_runs(f: Facts) -> Iterator[Problem]:
    """A run stopped between writing the Caddyfile and reloading Caddy: the file lies. The
    switch that writes the file back to what Caddy runs is named only while that slot
    answers healthy: found by review, with Caddy's config loaded onto a stopped slot, the fix
    led with that switch, refused (exit 4), while the switch to the slot the file names,
    which answered healthy, served users again."""
    on_disk = f.caddy.slot if f.caddy is not None else None
    active = f.active
    if active is None or on_disk is None or on_disk == active:
        return
    pending = f.intent
    report, other = f.reports.get(active), f.reports.get(on_disk)
    runs_ok = report is not None and report.ok
    # a record of a run that never moved traffic off what runs is kept by that switch
    back = (f"`runbook switch {_arg(f.env)} --slot {active}` writes the file back in line "
            f"with what Caddy runs (traffic stays on {active})"
            if runs_ok and (pending is None or pending.source == active)
            else f"put the block between the markers back to {active} (port "
                 f"{f.env.slot(active).port})")
    if pending is not None and pending.target == on_disk:
        # killed between its write and its reload, or failed with an undo that could not
        # write the file back (it loaded what ran through the admin API): only its journal
        # tells which, and redoing a failed switch would send users to the slot that failed
        fix = (f"if that run was killed, `{_command(f, pending)}` redoes it (it rewrites the "
               f"file); if it failed and was undone (its journal says so), {back} instead; "
               "do not reload Caddy by hand before that")
    elif runs_ok:  # no run of the runbook's left it: an edit, or another tool
        fix = (f"{back} or, once {on_disk} is healthy, switch to it on purpose (`runbook "
               f"switch {_arg(f.env)} --slot {on_disk}`); do not reload Caddy by hand before "
               "that")
    else:  # the switch back to what runs is refused (it does not answer healthy)
        down = report.status if report is not None else "not asked"
        first = _doubted_fix(f) or _unfinished_fix(f) or _pairing_fix(f) or _database_fix(f)
        serve = first or (
            f"`runbook switch {_arg(f.env)} --slot {on_disk}` serves users from {on_disk}, "
            f"which answers {other.status} now (health-gated, verified through the proxy; "
            "the file already names it)" if other is not None and other.ok else
            "neither slot answers healthy: bring one back first (see the problems above), "
            f"then `runbook switch {_arg(f.env)} --slot <that slot>`")
        fix = (f"{serve}; a switch to {active} is refused while it is {down}; do not reload "
               "Caddy by hand: the switch verifies the slot before users reach it")
    yield Problem(f"the Caddyfile on disk points at {on_disk} but Caddy runs {active} (a run "
                  "stopped between writing the file and reloading Caddy, or an edit not "
                  f"reloaded); a reload would move traffic to {on_disk}", fix)


def caddyfile_block_differs_from_what_runs(f: Facts) -> Iterator[Problem]:
    """The block between the markers on disk names the slot Caddy serves, but not as Caddy
    runs it (an upstream edited by hand and not loaded; a failed run's undo loads back what
    Caddy ran and writes back the file as it found it): Caddy's next restart, or a reload by
    anyone, loads the file. Found by a review that built a host by hand: "No problems found"
    beside a block naming 127.0.0.1 that Caddy did not run. The fix is the edit back: a
    switch to the serving slot rewrites only the slot's port and header, so it would load
    the rest of the edit (caddy.block_drift judges between the markers only)."""
    drift, active = f.block_drift, f.active
    if drift is None or active is None or f.caddy is None:
        return
    path, arg, upstreams = f.env.caddy.caddyfile, _arg(f.env), f.caddy.upstreams

    def at(dial: str) -> str:
        found = [str(up.line) for up in upstreams
                 if up.host is not None and dial in (up.text, f"{up.host}:{up.dials}")]
        return f" at line{'s' if len(found) > 1 else ''} {', '.join(found)}" if found else ""

    differs = [f"it names {filed}{at(filed)} where Caddy dials {now}"
               for now, filed in drift.dials]
    back = [f"{now} instead of {filed}{at(filed)}" for now, filed in drift.dials]
    if drift.where is not None:  # not an address: the JSON path (a value may be a secret)
        differs.append(f"it differs from Caddy's running config at {drift.where}")
        back.append(f"as `curl {f.env.caddy.admin_url}/config/` shows it at {drift.where}")
    yield Problem(f"the block between the markers in {path} names {active}, the slot Caddy "
                  f"serves, but not as Caddy runs it: {'; '.join(differs)}; Caddy's next "
                  "restart, or a reload by anyone, would load the file",
                  f"edit the block between the markers in {path} back to what Caddy runs "
                  f"({'; '.join(back)}), then `runbook status {arg}` again; do not restart or "
                  "reload Caddy, nor switch or roll back, before that: each loads the file")


def restore_doubted(f: Facts) -> Iterator[Problem]:
    """The last restore left a database that does not match its snapshot: its check said
    "do not start the app on it", and only the record of it says so (beside the state file,
    or in its run record; found by review: status then advised a rerun, a rollback or a
    switch, each starting the app on it)."""
    if f.doubted_error is not None:  # fail closed: every run that starts the app refuses
        yield _error(f.doubted_error, "see the file named")
    fix = _doubted_fix(f, said=True)
    if f.doubted is not None and fix is not None:
        yield Problem(f"{f.doubted['problem']} (the check \"{f.doubted['check']}\" of the "
                      f"{f.doubted['action']} run {f.doubted['run_id']} failed): the app must "
                      "not be started on it", fix)


def restore_unfinished(f: Facts) -> Iterator[Problem]:
    """A restore begun and not finished (killed, or failed once the database was replaced)
    that no interrupted run's record covers: every operator's status said only that users
    were not served, and pointed at a rollback, which starts code on a database holding
    either the data from before the restore or the snapshot's. Or the record of such
    restores cannot be read: whether one was killed, and where the data from before it is,
    cannot be told (every cleanup keeps every snapshot, and a restore leaves a stopped
    serving slot stopped, while it is so)."""
    if f.unfinished_error is not None:
        yield _error(f.unfinished_error, "see the file named")
    left = f.unfinished
    if left is None:
        return
    from runbook.restore_records import EARLIER, TARGET

    target = left.get(TARGET) or "?"
    before = left.get(EARLIER) or left.get("safety_snapshot") or "?"
    yield Problem(
        f"a restore of the database was begun and not finished (run {left.get('run_id')}, "
        f"{left.get('at')}; killed, or failed once the database was replaced): the database "
        f"holds either the data from before it or {target}, and the data from before it is "
        f"in {before}",
        f"`runbook snapshot restore {_arg(f.env)} {Path(target).name}` finishes it (it "
        "snapshots the database as it is, restores that file again and starts the app); "
        "do not roll back or switch before: they start code on whichever data it holds")


def _unfinished_fix(f: Facts) -> str | None:
    """While a restore is unfinished (restore_unfinished): the pointer to it for every
    problem whose fix would start the app on the database it may have replaced."""
    if f.unfinished is None:
        return None
    return ("finish the restore of the database that was begun first (see that problem): a "
            "rollback or a switch now starts code on whichever data it left")


def _doubted_fix(f: Facts, said: bool = False) -> str | None:
    """While the restored database does not match its snapshot: the run's own fix (its
    check's) for the problem that says so (`said`), and for every other whose fix would
    start the app on it (a rerun, a rollback, a switch), a pointer to it: said once."""
    if f.doubted is None and f.doubted_error is not None and not said:
        return ("do not start the app on the restored database until the record of its "
                "check can be read: see that problem")
    if f.doubted is None:
        return None
    if not said:
        return ("do not start the app on the restored database, which does not match its "
                "snapshot: see that problem (its safety snapshot, and how to go on)")
    from runbook.restore_records import doubted_fix, restoring_command

    pending = f.intent
    again = restoring_command(f.env, pending) \
        if pending is not None and pending.run_id == f.doubted["run_id"] else None
    return doubted_fix(f.env, f.doubted, again)


def _command(f: Facts, pending: intents.Intent) -> str:
    """The command that finishes (or runs again) the interrupted run `pending`."""
    return f"runbook {pending.action} {_arg(f.env)}" + (
        f" --version {pending.to_version}" if pending.action == "deploy" else
        f" --slot {pending.to_slot}" if pending.action == "switch" else
        f" --to {pending.to_version}")  # a rollback: its target, never "the previous" again


def _unfinished_command(f: Facts, pending: intents.Intent) -> str:
    """What finishes the interrupted run `pending` (its target serves), or runs it again:
    a restoring rollback killed before its restore began runs again with it; one whose
    restore ended with the database at the target's schema, without it (_restore_done)."""
    command = _command(f, pending)
    if f.active is None or f.active != pending.target:
        from runbook.restore_records import restoring_command
        from runbook.snapshot_restore import known_killed_restore

        began = known_killed_restore(f.env, None)[0]  # unreadable: restore_unfinished says it
        if (began is None or began["run_id"] != pending.run_id) \
                and _restore_done(f, pending) is None:
            command = restoring_command(f.env, pending) or command
    return command


def _restore_done(f: Facts, pending: intents.Intent) -> str | None:
    """The schema the database is at (described) when the interrupted rollback `pending`
    restored it (its own record: the restore ended replacing the database) and it is still,
    clean, at the schema the state file says the target ran with: that run needs no restore
    again. Found by review of 91a0202: once the app had served on the restored database (a
    `docker start`, or a rerun that started the target), the killed-restore pointer was
    stale and status named `rollback --restore-snapshot --snapshot <the same one>` as "runs
    it again": typed, it stopped the serving slot and restored over every write since. A
    rerun without the flag keeps the schema guard, which names a restore if one is needed
    after all. None otherwise."""
    if pending.action != "rollback" or not pending.record.get("restore_snapshot") \
            or f.schema is None or f.schema.dirty or f.state is None:
        return None
    from runbook.snapshot_restore import restored_by

    restored = restored_by(f.env, pending.run_id)
    target = f.state.find_version(pending.to_version)
    if restored is None or not restored[1] or target is None \
            or target.migration_version != f.schema.version:
        return None
    return f.schema.describe()


def _restore_again(f: Facts, pending: intents.Intent, command: str) -> str:
    """What the rerun `command` of the interrupted rollback `pending` does to the database,
    when that run's restore ended: not restored again (_restore_done), or restored again,
    which takes every write since out of it (kept only in the new safety snapshot). "" when
    that run restored nothing."""
    from runbook.snapshot_restore import restored_by

    restored = restored_by(f.env, pending.run_id) if pending.action == "rollback" else None
    if restored is None or not restored[1]:
        return ""
    if "--restore-snapshot" not in shlex.split(command):
        done = _restore_done(f, pending)
        return ("" if done is None else
                f"; its restore is done (the database is at schema {done}, the one "
                f"{pending.to_version} ran with): this does not restore it again")
    snap = pending.record.get("restore_snapshot")
    return (f"; that run's restore is done, and this restores {snap} again: every write "
            "since that restore is taken out of the database (kept only in the safety "
            "snapshot it takes first; its --dry-run shows them)")


def _moved(f: Facts, pending: intents.Intent) -> bool | None:
    """Whether Caddy serves the run's target now by that run; None when what it runs is not
    known. False when another tool's deploy serves there since (finish.superseded): the
    problem says its record is out of date, and the JSON summary said "after traffic moved".
    Every summary of the run says it from this (found by review: one said "before traffic
    moved" beside "traffic: green" and another summary's "after traffic moved")."""
    from runbook import finish

    if f.active is None:
        return None
    return f.active == pending.target and finish.superseded(pending, f.state) is None


def interrupted_run(f: Facts) -> Iterator[Problem]:
    if f.intent_error is not None:
        yield _error(f.intent_error, "see the journal in the logs directory")
    pending = f.intent
    if pending is None:
        return
    from runbook import finish

    if finish.in_progress(pending, f.lock):
        held = f.lock
        stopped = held is not None and held.suspended and held.pid is not None
        # suspended (Ctrl-Z, SIGSTOP), it never ends: "wait for it to end" left it for good
        now = pending.describe(moved=_moved(f, pending), live=True)
        yield Problem(f"a run is in progress: {now}; it holds the deploy lock "
                      f"({held.describe() if held else '?'})"
                      + (f", but its process {held.pid} is suspended (Ctrl-Z or SIGSTOP), so "
                         "it never ends by itself" if stopped and held else ""),
                      (f"{locks.suspended_fix(held.pid)}; `runbook status {_arg(f.env)}` "
                       "again says how it ended; do not unlock or start another run meanwhile"
                       if stopped and held and held.pid is not None else
                       f"wait for it to end (`runbook status {_arg(f.env)}` again says how it "
                       "ended); do not unlock or start another run meanwhile"))
        return
    later = finish.superseded(pending, f.state) if f.active == pending.target else None
    if later is not None:
        yield Problem(f"an interrupted run's record is out of date: "
                      f"{pending.describe(moved=False)}; "
                      f"since, {later.version} was deployed to {pending.to_slot} "
                      f"({later.deployed_at:%Y-%m-%dT%H:%M:%SZ} by {later.deployed_by}), "
                      "which serves", "nothing of it to finish: the next `runbook` command "
                      "replaces the record (`runbook rollback` rolls back from what serves)")
        return
    # what runs decides, as the finishing run decides (finish.interrupted): a record marked
    # committed whose target Caddy does not serve (switched back by hand) is run again
    took = f.active is not None and f.active == pending.target
    if took and f.target_check is not None and not f.target_check.ok:
        # the next run refuses to finish it (exit 4): the switch back is what repairs it
        refused = finish.cannot_finish(f.env, pending, f.target_check)
        yield Problem(refused.message, refused.fix or "")
        return
    command = _unfinished_command(f, pending)
    if not took and f.active is None:  # what runs is not known: never "did not move"
        why = ("Caddy's running config cannot be read" if f.traffic is None
               else "Caddy's running config names no single slot")
        # describe() says so of a record not marked committed (a run killed between
        # Caddy's reload and its commit mark never says it moved): said once
        unknown = (f"; {why}" if pending.phase is intents.Phase.PREPARE else
                   f"; whether traffic is still on {pending.to_slot} is unknown ({why})")
        yield Problem(f"an interrupted run is unfinished: {pending.describe()}{unknown}",
                      f"once Caddy is fixed (see above), `runbook status {_arg(f.env)}` says "
                      f"whether it took effect; `{command}` then finishes it or runs it again")
        return
    # a deploy run again on a dirty schema refuses, one run during a migration too: the
    # repair (schema_dirty's) comes first
    first = ("once the migration under way has ended, " if f.migrating is not None
             else "once the database schema is repaired (see its problem), "
             if f.schema is not None and f.schema.dirty else "")
    from runbook.snapshot_restore import restored_by

    # the data from before its restore: with the terminal gone, only this names it
    restored = restored_by(f.env, pending.run_id)
    before = "" if restored is None else (
        f"; it {'restored' if restored[1] else 'began restoring'} the database first (the "
        f"data from before that restore is in {restored[0]}, its safety snapshot: keep it)")
    doubted = None if took else _doubted_fix(f)  # run again, it starts the app on it
    again = "runs it again" + ("" if took else _restore_again(f, pending, command))
    if not took and intents.failed_step(f.env, pending) == "health-gate":
        # never the first fix with nothing saying so (found by review: it led back to it)
        again += (f" (in that run {pending.to_version} failed its health gate on "
                  f"{pending.to_slot}: find out why first, `docker logs --tail 100 "
                  f"{f.env.slot(pending.target).container}`)")
    down = None if took else _stopped_serving(f)
    if down is not None and not first:  # the recorded build fits the restored database
        first = (f"first `{_bring_back(down)}` (see that problem: it serves the recorded "
                 "build again); then, only to go on with that run, ")
    yield Problem(f"an interrupted run is unfinished: {pending.describe(moved=took)}; "
                  # describe() says whether it took effect: said once
                  + (f"traffic is on {pending.to_slot}" if took
                     else f"traffic did not move{_serves(f, f.active)}") + before,
                  doubted or f"{first}`{command}` " + (
                      ("finishes it (records the state)" if pending.action == "switch" else
                       f"finishes it (records the state{_stops_old(f, pending)})") if took
                      else again))


def _stops_old(f: Facts, pending: intents.Intent) -> str:
    """What the finish does to the old slot, as its plan will say: nothing when it is down
    already (a restoring rollback's maintenance stop took it down; found by review: "stops
    the old slot" of one exited)."""
    info = f.containers.get(pending.source)
    if info is not None and not info.up:
        return f"; the old {pending.source} slot is {info.status if info.exists else 'absent'}" \
               " already, so it stops nothing"
    return ", stops the old slot"


def _serves(f: Facts, slot: Slot | None) -> str:
    """Whether the slot Caddy points at serves, as Docker and the proxy say: Caddy's config
    alone never makes it (found by review: "green serves" of a stopped green, the proxy
    answering 502, after a failed gate once a restore had stopped both slots)."""
    if slot is None:  # what Caddy runs is not known: interrupted_run said so already
        return ""
    info = f.containers.get(slot)
    proxy = f.traffic.proxy_error if f.traffic is not None else None
    if info is not None and not info.running:
        down = (f"is {'stopped' if info.status == 'exited' else info.status}" if info.exists
                else "does not exist")
    elif proxy is not None:
        down = f"does not answer through the proxy ({proxy})"
    else:
        return f" ({slot} serves)"
    return f"; {slot}, the slot Caddy points at, {down}: nothing serves"


def compose_leftovers(f: Facts) -> Iterator[Problem]:
    """A recreate stopped half-way left compose's `<id>_<name>` container: the next recreate
    of that slot fails on Docker's name conflict (found by a kill-fuzz review: status said
    "No problems found")."""
    from runbook import compose

    for slot, found in f.leftovers.items():
        if found:
            # one users reach (the serving slot's container under compose's temporary name)
            # is never offered for removal: found by review, `docker rm -f` of it, typed as
            # printed, made every request 502
            problem, fix = compose.leftover_said(f.env, slot, found,
                                                 f.serving_leftovers.get(slot))
            yield Problem(problem, fix)


def disk_space(f: Facts) -> Iterator[Problem]:
    for problem, fix in disk.problems(f.space) + f.blocked:
        yield Problem(problem, fix)


def access_notes(f: Facts) -> list[Note]:
    """A place a run writes that the user running status may not: a note (exit 0), not a
    problem. It is about the account, not the host: a read-only watcher's status must not
    say exit 1 for it for good, and a run as that user is refused before any change in these
    words (disk.refuse_unwritable); said here so on-call learns it before the real run."""
    return [Note(f"{problem}; {fix}", "disk_access") for problem, fix in f.access]


def history_notes(f: Facts) -> list[Note]:
    """The history entries another tool wrote badly that a rollback to the previous
    deployment passes by, as its plan warns of them (the reader refuses a file holding one
    that may be the target or newer: a problem, state_unreadable's)."""
    st = f.state
    if st is None or st.previous is None or not st.unread:
        return []
    try:
        return [Note(w, state_unreadable.__name__) for w in st.passed_by(st.previous)]
    except RunbookError:  # (the reader refused such a file already)
        return []


def disk_notes(f: Facts) -> list[Note]:
    """A snapshot folder without room for a snapshot: a note, not a problem (exit 0 says
    nothing needs on-call now). Nothing that runs is harmed, a rollback that takes no
    snapshot goes ahead, and a restore or a deploy is refused before any change, in these
    words; found by review: as a problem, status said exit 1 during an incident for it alone."""
    return [Note(f"{problem}; {fix}", disk_space.__name__) for problem, fix in f.snapshot_space]


Check = Callable[[Facts], Iterator[Problem]]
# the outage first: users not served (found by review: a bad port loaded into Caddy was said
# third, after the Caddyfile's block and the running config that caused it; Caddy down after
# an unreadable state file)
CHECKS: list[Check] = [
    caddy_not_answering, slots_mispaired, serving_stopped, proxy_unanswered, crash_looping,
    serving_absent, state_unreadable, container_unknown, caddy_problems,
    traffic_unclear, dials_the_other_container, proxy_unverifiable,
    caddyfile_differs_from_what_runs, caddyfile_block_differs_from_what_runs, schema_dirty,
    restore_doubted, restore_unfinished,
    interrupted_run, database_unreachable, no_current_deployment, state_disagrees_with_caddy,
    active_unhealthy, image_differs, commit_differs, stale_lock, live_lock, held_for_h2c,
    standby_running, previous_absent, previous_other_build, standby_absent,
    upstream_unresolved, pinned_slot_down,
    upstream_misses_standby, compose_leftovers, disk_space,
]


# the checks that read a mis-paired slot's container themselves (the rest judge `_judged`)
_SEE_MISPAIRED = (slots_mispaired, crash_looping)


def problems(facts: Facts) -> list[Problem]:
    """Every problem of every check, in CHECKS order."""
    judged = _judged(facts)
    return [_block_first(facts, dataclasses.replace(problem, check=check.__name__))
            for check in CHECKS
            for problem in check(facts if check in _SEE_MISPAIRED else judged)]


# a fix that makes Caddy read the Caddyfile on disk: a reload, a /load of it, a restart
_LOADS_FILE = re.compile(r"reload Caddy|caddy reload|systemctl (?:reload|restart) |/load\b"
                         r"|restart Caddy|docker restart |and load it")
# the checks that say the file and what runs differ, with their own way back
_SAY_THE_FILE = ("caddyfile_differs_from_what_runs", "caddyfile_block_differs_from_what_runs")


def _block_first(f: Facts, problem: Problem) -> Problem:
    """`problem` with, before a fix that makes Caddy read the Caddyfile on disk, the lines
    that put its managed block back to the slot Caddy serves, when it names another (found
    by review, HIGH: a fix followed word for word loaded a block naming the stopped green
    while blue served, and users got 502 until a switch back). A fix that says "do not
    reload" keeps its words; the checks on the file's difference say it themselves."""
    if f.active is None or f.caddy is None or problem.check in _SAY_THE_FILE \
            or not _LOADS_FILE.search(problem.fix) or "do not reload" in problem.fix \
            or "do not restart" in problem.fix:
        return problem
    try:
        text = caddy.read(f.env)
    except RunbookError:
        return problem
    first = caddy.block_first(f.env, text, f.active, f"Caddy's running config dials {f.active}")
    return problem if first is None else dataclasses.replace(problem, fix=f"{first} {problem.fix}")


def _judged(f: Facts) -> Facts:
    """The facts without the containers of the slots the environment pairs wrongly
    (slots_mispaired), as if not inspected: each is another slot's, and judged as this
    one's, a stopped standby was "the serving slot, stopped" (`docker start` the old build)
    and the serving one "the standby left running" (`docker stop` it). What is asked by the
    slot's port (its health, the slot Caddy dials) stays."""
    if not f.mispaired:
        return f
    return dataclasses.replace(
        f, containers={s: None if s in f.mispaired else i for s, i in f.containers.items()},
        held={s: r for s, r in f.held.items() if s not in f.mispaired},
        left_by_switch={s: r for s, r in f.left_by_switch.items() if s not in f.mispaired})


# ---------------------------------------------------------------------------------------------
# Reading the facts (read-only)


def collect(env: Environment) -> Facts:
    f = Facts(env)
    try:
        f.state = states.read_state(env.state_file, environment=env.name)
    except RunbookError as exc:
        f.state_error = exc
    for slot in Slot:
        config = env.slot(slot)
        try:
            f.containers[slot] = docker.inspect(config.container)
        except RunbookError as exc:
            f.containers[slot] = None
            f.container_errors[slot] = exc
        f.reports[slot] = health.probe(config, env.health.path, env.health.request_timeout)
        f.versions[slot] = version_beside(env, slot, f.reports[slot])
        info = f.containers[slot]
        if info is not None and not info.exists:
            try:
                f.publishers[slot] = docker.publishing(config.port)
            except RunbookError:
                f.publishers[slot] = None
    for slot, info in f.containers.items():
        # stopped too: HostConfig keeps what a `docker start` publishes again
        if info is not None and (wrong := traffic.port_mismatch(
                env, slot, info, f.containers.get(slot.other))) is not None:
            f.mispaired[slot] = wrong
    # whether Caddy answers is asked whatever the file says: an unreadable Caddyfile hid a
    # Caddy that was down (and said "NOT answering" of one that answered)
    f.caddy_down = caddy.running_problem(env)
    f.caddy_running = f.caddy_down is None or f.caddy_down.answering
    try:
        text = caddy.read(env)
        f.caddy = caddy.inspect(text, env, slots.reach(env))
    except caddy.SlotMarkersError as exc:  # the block in a file it imports: named
        f.caddy_error = caddy.markers_imported(env, text, exc)
    except RunbookError as exc:
        f.caddy_error = exc
    else:
        try:
            caddy.check_imports(env, text)
        except RunbookError as exc:
            f.caddy_imports = exc
        if f.caddy_down is None:  # its admin API answers: one /adapt, nothing loaded
            f.caddy_rejected = caddy.rejection(env, text)
    try:
        f.traffic = traffic.read(env)
    except RunbookError as exc:
        f.traffic_error = exc
    if f.active is not None and f.caddy is not None and f.caddy.slot == f.active \
            and f.caddy_down is None and f.caddy_rejected is None and f.caddy_imports is None:
        # another slot named, Caddy's config unread or the file rejected: said by their checks
        with contextlib.suppress(RunbookError):
            f.block_drift = caddy.block_drift(env, traffic.loaded_config(env), caddy.read(env),
                                              f.active)
    if f.active is not None and f.caddy is not None and f.caddy_error is None:
        standby = f.active.other
        # a file the switch cannot rewrite is said by caddy_problems
        with contextlib.suppress(RunbookError):
            f.upstream_miss = slots.upstream_problem(
                env, standby, caddy.rewrite(caddy.read(env), env, standby), planning=True)
    try:
        f.intent = intents.read(env)
    except RunbookError as exc:
        f.intent_error = exc
    try:
        f.schema = database.schema_version(env)
    except RunbookError as exc:
        f.database_error = exc
        try:
            f.database_container = docker.inspect(env.database.container)
        except RunbookError:
            f.database_container = None  # Docker does not answer: said by other checks
    f.migrating = _migrating(env, f)
    f.lock = locks.status(env)
    if f.intent is not None:
        from runbook import finish

        if not finish.in_progress(f.intent, f.lock):  # a killed replacer: what it replaced
            f.intent = intents.standing(f.intent, f.active)
            if f.active == f.intent.target and finish.superseded(f.intent, f.state) is None:
                f.target_check = finish.target_check(env, f.intent)
    f.last_run = _last_run(env, f.lock)
    if f.state is not None and f.state.current is not None:
        try:
            f.current_build = docker.image_id(expected_image(env, f.state.current))
        except RunbookError:
            f.current_build = None  # not known: the names alone are compared
    from runbook.restore_records import doubted_restore

    try:
        f.doubted = doubted_restore(env)
    except RunbookError as exc:
        f.doubted_error = exc
    from runbook.restore_records import SERVED_SINCE, unfinished_restores, unfinished_unreadable

    try:
        left = unfinished_restores(env)
    except (OSError, ValueError) as exc:
        f.unfinished_error = unfinished_unreadable(env, exc)
    else:  # the newest: a later run that served or changed the data covers every earlier one
        newest = left[-1] if left else None
        covered = f.intent is not None and newest is not None \
            and newest.get("run_id") == f.intent.run_id  # interrupted_run says it
        # a live holder, dated or not (an undated lock, the clock set back, is no less held)
        held = (f.lock.holder if f.lock is not None and not f.lock.stale
                and not f.lock.broken else None)
        running = held is not None and newest is not None \
            and newest.get("run_id") in (held.run_id, held.deployment_id)
        if newest is not None and not newest.get(SERVED_SINCE) and not covered \
                and not running:  # it runs now (it holds the lock): nothing unfinished yet
            f.unfinished = newest
    if f.active is not None and f.state is not None:
        spare = f.containers.get(f.active.other)
        kept = (slots.left_by_switch(env, f.active.other, spare, f.state.current)
                if spare is not None else None)
        if kept is not None:
            f.left_by_switch[f.active.other] = kept
    for slot, info in f.containers.items():
        try:
            record = slots.held_record(env, slot, info) if info is not None else None
        except RunbookError as exc:
            f.held_error = exc
            continue
        if record is not None:
            f.held[slot] = record
    from runbook import compose

    dialed = (f.traffic.slots | f.traffic.pinned) if f.traffic is not None else None
    for slot in Slot:
        with contextlib.suppress(RunbookError):  # Docker not answering: said by other checks
            found = compose.leftovers(env, slot)
            # both or neither: a leftover whose reach was not read is never listed alone
            f.serving_leftovers[slot] = (compose.serving_leftovers(env, found, dialed)
                                         if found else {})
            f.leftovers[slot] = found
    f.space = disk.rooms(env)
    # what no one may write, root included (`chattr +i`): the host's problem where every run
    # writes, a note for the snapshot folder (only a run taking a snapshot needs it)
    from runbook import journal

    f.blocked = journal.folder_problems(env) + disk.blocked_problems(env)
    f.access = disk.access_problems(env, snapshot_dir=True) + disk.blocked_problems(
        env, caddyfile=False, records=False, state=False, lock=False, log=False,
        snapshot_dir=True)
    from runbook.snapshots import room

    f.snapshot_space = room.snapshot_problems(env, f.space)
    return f


def _migrating(env: Environment, f: Facts) -> str | None:
    """Where a migration runs now: a migrate command in a slot (a killed deploy's goes on),
    or, the schema dirty, a session holding golang-migrate's lock (an app migrating itself
    at start-up). Cannot tell: said as under way, never a restore advised under it."""
    for info in f.containers.values():
        try:
            found = slots.migrate_exec(env, info) if info is not None else None
        except RunbookError:
            found = None
        if found is not None and info is not None:
            return f"`{shlex.join(found[1])}` runs inside {info.name}"
    if f.schema is None or not f.schema.dirty:
        return None
    try:
        held = database.migration_lock(env)
    except RunbookError as exc:
        return f"whether one is cannot be read ({exc.message})"
    return f"a migration lock is held: {held}" if held else None


def _last_run(env: Environment, held: locks.LockStatus | None = None) -> dict[str, Any] | None:
    """The last run: the one holding the deploy lock while its process lives (`held`, read
    by the caller), else the newest run record but those of runs refused at the lock; with
    its outcome, and a stale lock it took over (said here too). By mtime alone, a second
    command refused at the lock (exit 3, it changed nothing) was "the last run: failed"
    while the run holding the lock went on, and hid it once ended (found by review)."""
    from runbook import journal

    holder = held.holder if held is not None else None
    data = None
    if held is not None and holder is not None and held.holder_alive is True \
            and holder.run_id:
        data = journal.record_of(env, holder.run_id)  # None: another operator's runs folder
    if data is None:
        data = next((d for d in journal.past_records(env) if not _refused_at_the_lock(d)),
                    None)
    if data is None:
        return None
    context = data.get("context")
    context = context if isinstance(context, dict) else {}
    last: dict[str, Any] = {"run_id": data.get("run_id"), "action": data.get("action"),
                            "outcome": data.get("outcome"), "exit_code": data.get("exit_code"),
                            "finished_at": data.get("finished_at"),
                            "took_over": context.get("stale_lock_taken_over")}
    error = data.get("error")
    if data.get("exit_code") not in (0, None) and isinstance(error, dict):
        # why it failed, as it said then: on-call back after a dropped session reads it here
        # (found by review: status said only "failed (exit 1)" while the record held this)
        last["error"] = {"message": error.get("message"), "fix": error.get("fix")}
        last["log_file"] = data.get("log_file")
    if last["outcome"] == "running":
        # its record says "running" until it ends, however it ends: a killed run's says so
        # for good, and the summary called it running beside problems saying it was gone
        last["alive"] = (held.holder_alive if held is not None and holder is not None
                         and last["run_id"] in (holder.run_id, holder.deployment_id)
                         else False)
    return last


def _refused_at_the_lock(record: dict[str, Any]) -> bool:
    """A run whose one started step is the deploy lock it did not take (exit 3): it changed
    nothing, so it is never the last run. Any other refusal (its plan's, the prompt's) is:
    it took the lock, and says why it went no further."""
    listed = record.get("steps")
    started = [s for s in (listed if isinstance(listed, list) else [])
               if isinstance(s, dict) and s.get("status") != "planned"]
    return (record.get("exit_code") == ExitCode.LOCKED and len(started) == 1
            and started[0].get("name") == "lock" and started[0].get("status") == "failed")


def _deployment(env: Environment, dep: states.Deployment | None) -> dict[str, Any] | None:
    if dep is None:
        return None
    return {"id": dep.id, "version": dep.version,
            "slot": str(dep.active_slot) if dep.active_slot else None,
            "status": dep.status, "deployed_at": states.format_time(dep.deployed_at),
            "deployed_by": dep.deployed_by, "image": expected_image(env, dep),
            "migration_version": dep.migration_version, "rollback_count": dep.rollback_count}


def to_json(f: Facts) -> dict[str, Any]:
    env = f.env
    st = f.state
    out: dict[str, Any] = {
        "environment": env.name, "label": env.display, "state_file": str(env.state_file),
        "current": _deployment(env, st.current) if st else None,
        "previous": _deployment(env, st.previous) if st else None,
        "history": [d.version for d in st.history] if st else [],
    }
    # what a rollback may go further back to: deployed before the current one, never one
    # this host was rolled back from (found by review: a rolled-back release was offered)
    current = st.current if st else None
    out["older"] = list(dict.fromkeys(
        d.version for d in (st.history if st else ())
        if current is not None and d.deployed_at < current.deployed_at
        and d.status != "rolled_back" and d.version not in (
            current.version, st.previous.version if st and st.previous else None)))
    if st is None and f.state_error is not None:  # not read: no deployment is known, none
        out["state_error"] = f.state_error.message  # is said to be recorded (review)
    slots_out: dict[str, Any] = {}
    for slot in Slot:
        config = env.slot(slot)
        info = f.containers.get(slot)
        if info is None:
            error = f.container_errors.get(slot)
            container: dict[str, Any] = {"name": config.container, "status": "unknown",
                                         "error": str(error) if error else None}
        else:
            container = {"name": config.container, "status": info.status, "image": info.image,
                         # what Docker says beside /health (found by review: never said)
                         "exit_code": info.exit_code, "oom_killed": info.oom_killed,
                         "docker_health": info.docker_health}
        report = f.reports[slot]
        version, commit, where = said_build(f, slot)
        slots_out[str(slot)] = {"port": config.port, "container": container,
                                "health": report.status, "version": version,
                                "git_commit": commit,
                                # which endpoint named them: /health, or the slot's own
                                # /version where /health names no commit
                                "build_from": where if version or commit else None}
    out["slots"] = slots_out
    if f.caddy_error is not None:
        # whether Caddy answers is known without the file: dropping it said "NOT answering"
        # of a Caddy that answered
        out["caddy"] = {"caddyfile": str(env.caddy.caddyfile), "error": str(f.caddy_error),
                        "running": f.caddy_running}
    elif f.caddy is not None:
        out["caddy"] = {"caddyfile": str(env.caddy.caddyfile),
                        "active_slot": str(f.active) if f.active else None,
                        "file_slot": str(f.caddy.slot) if f.caddy.slot else None,
                        "consistent": f.caddy.consistent, "problems": list(f.caddy.problems),
                        "running": f.caddy_running}
    out["traffic"] = ({"slot": str(f.active) if f.active else None,
                       "source": "Caddy's running config (admin API)",
                       "dials": list(f.traffic.dials), "proxy_slot": f.traffic.proxy_slot,
                       "proxy_error": f.traffic.proxy_error,
                       "proxy_unverifiable": f.traffic.proxy_unverifiable}
                      if f.traffic is not None else
                      {"slot": None, "error": str(f.traffic_error)})
    if f.intent is not None:
        from runbook import finish

        out["interrupted"] = {"run_id": f.intent.run_id, "action": f.intent.action,
                              "phase": f.intent.phase.value,
                              "summary": f.intent.describe(
                                  moved=_moved(f, f.intent),
                                  live=finish.in_progress(f.intent, f.lock))}
    if f.last_run is not None:
        out["last_run"] = f.last_run
    out["database"] = ({"schema_version": f.schema.version, "dirty": f.schema.dirty}
                       if f.schema is not None else {"error": str(f.database_error)})
    held = f.lock
    out["lock"] = ({"locked": True, "summary": held.describe(), "stale": held.stale,
                    "empty": held.empty, "why": held.why, "path": str(held.path)}
                   if held else {"locked": False})
    out["notes"] = [n.to_json() for n in [*history_notes(f), *standby_notes(_judged(f)),
                                                 *docker_health_notes(_judged(f)),
                                                 *disk_notes(f), *access_notes(f)]]
    out["problems"] = [p.to_json() for p in problems(f)]
    from runbook.redact import scrub

    return scrub(out)  # type: ignore[no-any-return]


def gather(env: Environment) -> dict[str, Any]:
    """The status as data (what `--format json` prints); secrets masked."""
    return to_json(collect(env))


# ---------------------------------------------------------------------------------------------
# Text


def printable(value: object, missing: str = NOT_RECORDED) -> str:
    """One line whatever the value holds: None -> `missing`, control and format characters
    (newline, ESC, bidi overrides) escaped as \\n, \\x1b, \\u202e."""
    from runbook.redact import one_line

    if value is None or value == "":
        return missing
    return one_line(str(value))


OLDER_SHOWN = 5  # older deployments named on status's "older" line


def render(data: dict[str, Any]) -> str:
    p = printable
    lines = [f"Environment {p(data['label'])} ({p(data['state_file'])})"]
    # "none" is said only of a file read that records none: one that cannot be read said
    # "none" too, which reads as "nothing recorded" (found by review)
    missing = ("not known: the state file cannot be read (see Problems)"
               if data.get("state_error") else "none")
    for key in ("current", "previous"):
        dep = data.get(key)
        lines.append(f"  {key:<9} " + (
            f"{p(dep['version'])} on {p(dep['slot'], 'an unrecorded slot')} "
            f"({p(dep['status'], 'status not recorded')}, {p(dep['deployed_at'])} by "
            f"{p(dep['deployed_by'], 'someone not recorded')}, "
            f"schema {p(dep['migration_version'])})" if dep else missing))
    # the deployments a rollback may name with --to beyond the previous one: shown only in
    # the JSON, so after a rollback on-call could not find the version to go further back to
    # (found by the second hand-built host review)
    older = data.get("older") or []
    if older:
        more = len(older) - OLDER_SHOWN
        lines.append(f"  older     {', '.join(p(v) for v in older[:OLDER_SHOWN])}"
                     + (f" and {more} more" if more > 0 else "")
                     + " (newest first; a rollback names one with --to VERSION)")
    caddy_info = data.get("caddy", {})
    lines.append(f"  traffic   {p(data.get('traffic', {}).get('slot'), 'unknown')} "
                 f"(as Caddy runs it; Caddy "
                 f"{'answering' if caddy_info.get('running') else 'NOT answering'})")
    for slot, info in data["slots"].items():
        c = info["container"]
        state = docker.state_said(c["status"], c.get("exit_code"), bool(c.get("oom_killed")))
        lines.append(f"  {slot:<9} {p(c['name'])}: {p(state, 'unknown')}, "
                     f"{p(c.get('image'), '-')}, port {info['port']}, "
                     f"health {p(info['health'], 'unknown')}"
                     + (f", Docker healthcheck {p(c['docker_health'])}"
                        if c.get("docker_health") else ""))
    db = data.get("database", {})
    lines.append("  database  " + (f"schema {db['schema_version']}"
                                   + (" (dirty)" if db.get("dirty") else "")
                                   if "schema_version" in db else p(db.get("error"), "unknown")))
    lock = data.get("lock", {})
    lines.append("  lock      " + ("free" if not lock.get("locked")
                                   else p(lock.get("summary"), "held (holder not recorded)")
                                   + (" [left by a killed run: the next run takes it over]"
                                      if lock.get("stale") and lock.get("empty") else
                                      " [stale]" if lock.get("stale") else "")))
    last = data.get("last_run")
    if last:
        outcome = ("in progress: its process holds the deploy lock"
                   if last.get("outcome") == "running" and last.get("alive") is True else
                   f"{p(last['outcome'])} (exit {p(last['exit_code'])})"
                   if last.get("alive") is not False else
                   "did not end: its record says running, and no live process holds the "
                   "deploy lock for it (killed, or its machine stopped)")
        lines.append(f"  last run  {p(last['action'])} {p(last['run_id'])}: {outcome}"
                     + (f"; it {p(last['took_over'])}" if last.get("took_over") else ""))
        error = last.get("error")
        if isinstance(error, dict):
            lines.append(f"            {p(error.get('message'))}")
            if error.get("fix"):
                lines.append(f"            fix: {p(error['fix'])}")
            lines.append(f"            journal: {p(last.get('log_file'))}")
    if data.get("notes"):
        lines.append("Notes:")
        lines += [f"  - {p(note['note'])}" for note in data["notes"]]
    if data["problems"]:
        lines.append("Problems:")
        for problem in data["problems"]:
            lines.append(f"  ! {p(problem['problem'])}")
            lines.append(f"    fix: {p(problem['fix'])}")
    else:
        lines.append("No problems found: the state file matches what runs.")
    return "\n".join(lines)
