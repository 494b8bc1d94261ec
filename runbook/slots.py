"""Making a slot run a given version, and proving it healthy: shared by rollback, deploy and
switch, so every path starts, recreates and gates a slot the same way."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runbook import (
    caddy,
    caddy_command,
    compose,
    docker,
    drain,
    files,
    health,
    preflight,
    times,
    traffic,
)
from runbook import intent as intents
from runbook import state as states
from runbook.docker import ContainerInfo
from runbook.environment import Environment, Slot, command_arg
from runbook.errors import ActFirstError, ExitCode, PreconditionError, RunbookError
from runbook.plan import CADDY_UNDO, WARNING, Aside, Phase, Skipped, Step, StepContext
from runbook.probes import Probe


def stop(env: Environment, slot: Slot, *, maintenance: bool = False,
         running: bool | None = None, after_switch: bool = False,
         on_drain: Callable[[drain.Drain], None] | None = None,
         ident: str | None = None, dials: tuple[str, ...] | None = None) -> str | None:
    """Stop a slot's container, unless Caddy sends traffic to it at this very moment.

    `maintenance` is for the snapshot restore alone, which the operator asked for and
    confirmed: it stops every app slot so no code writes while the database is replaced.
    `running` is what the caller has just inspected (None: inspect here). `after_switch`:
    the slot served until a switch (the stop-old-slot step), not one started by this run and
    never switched to (an undo). `on_drain` is told how the drain before the stop went (for
    the journal). `ident`: the full id of the container the run planned (or started) to
    stop: the stop goes to it, never to another container given the name since. `dials`:
    the upstreams of the config Caddy ran while it sent users to the slot (Observed), with
    those of the config it runs now the addresses the drain counts Caddy's connections to
    the slot at (traffic.slot_peers); None: not read by this run, every socket on the slot's
    port counts.

    Returns None once stopped, or why it was left running: connections Caddy's previous
    config still holds over cleartext HTTP/2 never move to the new config (their clients
    would get errors from a stopped slot, not the other slot), so it is not stopped under them.
    """
    container = env.slot(slot).container
    if not maintenance:
        running_config = traffic.refuse_if_serving(env, slot, "stop")
        if after_switch and running_config.unresolved:  # it may still serve that site
            return (f"{traffic.unresolved_site(env, running_config)} (fix: "
                    f"{traffic.UNRESOLVED_FIX})")
        if after_switch and slot in running_config.pinned:
            # that site still sends its users here: stopped, it answered them 502 while the
            # run said "Done" and status "No problems found" (found by review)
            return (f"{traffic.pinned_by(env, running_config, slot)}; stopped, it would "
                    f"answer that site 502, so its users still reach this build: "
                    f"{traffic.pinned_left_fix(env, slot, container)}")
        # Caddy's old config may still hand it requests after the switch: let them finish
        # (runbook/drain.py); a side it cannot observe is waited for, not assumed done.
        if running is None:
            running = docker.inspect(container).running
        if running:
            front = front_port(env)
            # users may reach the app on more of Caddy's ports than proxy_url's (`:443`
            # beside 80, an h2c port): those are not watched, and may take h2c
            others = any(not lo == hi == front for lo, hi in running_config.fronts)
            # a slot never switched to (an undo) had no config sending to it: no connection of
            # the old config can be silent on it, so no minimum wait
            port = env.slot(slot).port
            peers = None if dials is None else traffic.slot_peers(
                (*dials, *running_config.dials), port, traffic.ThisHost(env))
            drained = drain.wait_drained(port, env.drain_timeout, front=front,
                                         other_fronts=others, peers=peers,
                                         preconnect=drain.PRECONNECT if after_switch else 0.0)
            h2c_port = traffic.h2c_port(running_config, front)
            elsewhere = traffic.unwatched_h2c(running_config, front)
            if elsewhere is not None and after_switch:
                h2c_port = elsewhere  # the one to check before stopping it
            why = _held_for_h2c(drained, h2c_port is not None, after_switch,
                                watched=elsewhere is None)
            if why:
                drained = dataclasses.replace(drained, kept_for_h2c=True)
            if on_drain is not None:
                on_drain(drained)
            if why:
                return _record_held(env, slot, (
                    f"{why}, and Caddy takes cleartext HTTP/2 (h2c) on port {h2c_port}:"
                    " h2c connections never move to the new config, so their requests can still"
                    f" reach {container}: {held_fix(env, container, h2c_port)}"), h2c_port)
        # the drain can last drain_timeout: Caddy may have been switched back to this slot
        # meanwhile (another operator, a concurrent tool). Read it again right before the
        # stop; refuses, and fails closed when Caddy cannot be read now.
        traffic.refuse_if_serving(env, slot, "stop")
    docker.run(docker.stop_action(container, ident=ident))
    return None


def comes_back(info: ContainerInfo) -> str | None:
    """Said of an old slot stopped (or found down) under the restart policy `always`, which
    Docker applies again when its engine starts (a reboot, an upgrade): the build users were
    taken off then runs again beside the new one, its workers and cron writing to the
    database (found by review: unsaid). `unless-stopped` keeps a stopped one stopped. The
    policy is the host's (its compose file's): said, never changed."""
    if info.restart_policy != "always":
        return None
    return (f"{info.name}'s restart policy is `always`: Docker starts it again when its engine "
            "restarts (a reboot), the build users were taken off running beside the new one; "
            f"to keep it stopped, `docker update --restart unless-stopped {info.name}` (and the "
            "same `restart:` in the host's compose file)")


def h2c_left_on_a_dead_slot(env: Environment, slot: Slot, info: ContainerInfo) -> str | None:
    """What users on cleartext HTTP/2 meet after a switch away from a slot that was already
    down (crashed, or stopped by a restore's maintenance stop), or None where Caddy takes no
    h2c (or cannot be read: nothing is claimed). Caddy's previous config keeps every h2c
    connection it holds and goes on dialing the old slot: their requests get 502 until the
    clients reconnect, though the run switched and the new slot serves (found by review:
    93 s of 502 on a held connection after "Done", unsaid). Said; Caddy is not restarted
    for them: a restart cuts every open connection, the healthy ones too."""
    try:
        found = traffic.from_config(env, traffic.loaded_config(env))
    except RunbookError:
        return None
    front = front_port(env)
    port = traffic.h2c_port(found, front) or traffic.unwatched_h2c(found, front)
    if port is None:
        return None
    state = info.status if info.exists else "absent"
    return (f"Caddy takes cleartext HTTP/2 (h2c) on port {port}, whose connections never move "
            f"to the new config: any opened before the switch still go to the old {slot} "
            f"slot, which is down ({info.name} {state}), and get 502 until their clients "
            "reconnect; restart Caddy to move them now (it cuts every open connection once)")


def _held_for_h2c(drained: drain.Drain, h2c: bool, after_switch: bool, *,
                  watched: bool = True) -> str | None:
    """Why the old config may still hold h2c connections to the slot (None: it does not).

    Over h2c the drain's evidence that a connection is the new config's (a request after an
    answer, or idle after answers) fits the old config's h2c connections too, which Caddy
    never closes. Only the reload watched by this process (connections open before it must
    close) tells them apart; a run finishing an interrupted one watched none, so on such a
    Caddy it cannot tell and fails closed after a switch, as when nothing can be observed.
    The same when the h2c port is not the one the drain watched (`watched` False: h2c on a
    load balancer's port beside the users' 80/443), or Caddy's port cannot be seen at all: a
    quiet wait proves nothing about connections that never close.
    A slot this run started and never switched to (an undo) had no config sending to it."""
    if not h2c:
        return None
    if drained.busy is not None and drained.busy > 0:
        return f"{_still_busy(drained)} after {drained.seconds:.0f}s"
    if not after_switch:
        return None
    if drained.busy is None:
        return "Caddy's connections cannot be observed from here"
    if not watched:
        return "the drain watches another port of Caddy's than the h2c one"
    if not drained.front_observed:
        return "Caddy's listening port cannot be observed from here"
    if not drained.switch_watched and drained.front_kept > 0:
        return (f"{drained.front_kept} connection(s) on Caddy's port still carry requests, and "
                f"the switch was not watched ({drained.unwatched}), so this run cannot tell "
                "whether they are the previous config's")
    return None


def _still_busy(drained: drain.Drain) -> str:
    """What kept a drain busy, as `ss` showed it: its busy count alone read as connections of
    the previous config even when it was requests on the old slot, bytes still moving there
    (counted 1), or a last good reading that failed readings left standing."""
    if drained.unread is not None:
        return (f"`ss` readings failed from {drained.last_good or 0.0:.1f}s on "
                f"({drained.unread}), and the last good one was not drained")
    return drained.holding()


def stop_if_started(env: Environment, slot: Slot, observed: Observed | None = None,
                    ident: str | None = None) -> None:
    """The undo of a start or recreate that may not have happened (interrupted, timed out):
    a container that is not there or not running has nothing to undo. `observed`: the run's,
    which says whether its switch had sent users to the slot before the run failed.
    `ident`: the full id of the container this run started (None: whatever compose made
    under the name, its id not read yet): that one is stopped, by its id, whatever holds the
    slot's name by now; another container given the name since is never the undo's."""
    info = docker.inspect(env.slot(slot).container) if ident is None else docker.inspect_id(ident)
    if info is not None and info.exists and info.up:
        stop_for_undo(env, slot, after_switch=observed is not None and observed.sent_to_target,
                      ident=ident, running=info.running,
                      dials=None if observed is None else observed.dials_loaded)


def stop_for_undo(env: Environment, slot: Slot, *, after_switch: bool = False,
                  ident: str | None = None, running: bool | None = None,
                  dials: tuple[str, ...] | None = None) -> None:
    """`stop` as an undo: a slot left running for Caddy's h2c connections is reported (the
    undo did not fully happen), never passed over in silence. `after_switch`: a failed
    verification's config sent users to it, so it is drained as an old slot is."""
    kept = stop(env, slot, after_switch=after_switch, ident=ident, running=running,
                dials=dials)
    if kept is not None:
        raise RunbookError(f"left running: {kept}", "see `runbook status`")


def same_container(env: Environment, slot: Slot, planned: ContainerInfo, *, verb: str,
                   again: str | None = None) -> ContainerInfo:
    """The slot's container as it is now, when it is the one the plan resolved (its Id; or
    still none, where the plan found none). Else refused, before the act (exit 4): the run
    confirmed at its prompt and executes with no new plan, so the name may have been given
    to another container meanwhile (found by review: a v1 container `docker create`d under
    green's name was started in place of the kept v2 one, then a data-losing restore was
    advised). `verb`: what the step was to do with it ("started", "recreated"); `again`:
    the command that plans anew."""
    now = docker.inspect(env.slot(slot).container)
    if now.exists == planned.exists and (not now.exists
                                         or now.container_id == planned.container_id):
        return now
    rerun = f"`{again}`" if again else "the same command"
    if planned.exists and not now.exists:
        raise PreconditionError(
            f"the {slot} slot's container {planned.name} (id {_short(planned)}, planned to be "
            f"{verb}) is gone since this run was planned (renamed or removed); nothing was "
            f"{verb}, nothing was changed",
            f"if it was renamed, give it its name back (`docker rename <its name> "
            f"{planned.name}`); then run {rerun} again: it plans anew from what runs now (on "
            "a compose host it recreates a removed container)")
    raise PreconditionError(
        f"the {slot} slot's container changed since this run was planned ({_as_planned(planned)}"
        f", now {_described(now)}); nothing was changed",
        f"check who changed it (`docker events --since 1h --until 0s --filter "
        f"container={planned.name}`), then run {rerun} again to see the plan as it is now")


def _short(info: ContainerInfo) -> str:
    return (info.container_id or "unknown")[:12]


def _described(info: ContainerInfo) -> str:
    """A container as the identity refusal names it: its id and image, or none."""
    return f"id {_short(info)} image {info.image or 'unknown'}" if info.exists else "none"


def _as_planned(info: ContainerInfo) -> str:
    return f"planned {_described(info)}"


def front_port(env: Environment) -> int | None:
    """Caddy's listening port for the site (from proxy_url), whose connections the drain
    watches; None when the URL names none that can be known."""
    return drain.front_port(env.caddy.proxy_url)


def recreate(env: Environment, slot: Slot, tag: str,
             command: compose.Command | None = None, *, checked: bool = False,
             image: str | None = None, build: str | None = None,
             cut_off: Callable[[], bool] = lambda: False,
             created: list[str] | None = None) -> None:
    """Recreate a slot's container through compose, after `refuse_recreate` (`checked`: the
    caller has just made it). `command` is the one the plan showed (built here when not
    given). `image`: the one the plan showed; the created container must run it (its
    .Config.Image), else this fails before traffic moves and the step's undo stops it (the
    compose file or its env file changed since the plan). `build`: the image id the plan
    showed for it; the created container's (.Image) must be it too: a name that moves
    (`:latest`) retagged after the plan (while the prompt waited, or since a dry run) passed
    the name check, and the wrong build ran (and migrated, in a deploy) until the gate.
    `cut_off`: compose is stopped half-way when it says so (a second Ctrl-C). `created` is
    given the created container's id, for the undo to stop that one by its id."""
    if not checked:
        refuse_recreate(env, slot)
    compose.run(command or compose.recreate_slot(env, slot, tag), cut_off=cut_off)
    container = env.slot(slot).container
    info = docker.inspect(container)
    if created is not None and info.exists and info.container_id:
        created.append(info.container_id)
    if image is None:
        return
    made = info.image
    if made != image:
        raise compose.ComposeError(
            f"compose created {container} from {made or 'no image'}, not {image} as the plan "
            "showed: its file or env file changed since the plan",
            f"check the `image:` of service {env.slot(slot).service} in {env.compose.file} "
            "(and IMAGE_TAG), then run the command again to see the plan as it is now")
    if build is not None and info.image_id != build:
        got = docker.short_id(info.image_id) if info.image_id else "no known build"
        raise compose.ComposeError(
            f"compose created {container} from {image} as the plan showed, but from build "
            f"{got}, not {docker.short_id(build)}, the build the plan showed for {tag}: "
            f"{image} was retagged or pushed since the plan",
            f"make {image} name {tag}'s build again, or the `image:` of service "
            f"{env.slot(slot).service} in {env.compose.file} name the version (e.g. "
            f"`{image.rsplit(':', 1)[0]}:${{IMAGE_TAG}}`); then run the command again to see "
            "the plan as it is now")


def refuse_recreate(env: Environment, slot: Slot) -> None:
    """The checks made right before a recreate: never the container that serves (nor one a
    site outside the slot markers proxies to), nor another slot's (`compose.check_service`),
    nor one left running for Caddy's h2c connections (`refuse_if_held`), nor one migrations
    run in. A step makes them BEFORE it registers its undo: a refused recreate changed
    nothing, and the undo's stop would cut what the container still serves."""
    traffic.refuse_if_serving(env, slot, "recreate")
    info = docker.inspect(env.slot(slot).container)
    # the service compose recreates must be this slot's, checked again at the act
    compose.check_service(env, slot, info, docker.inspect(env.slot(slot.other).container),
                          planning=False)
    compose.refuse_leftovers(env, slot, planning=False)
    refuse_if_held(env, slot, info)
    refuse_if_migrating(env, slot, info)


def held_marker(env: Environment, slot: Slot) -> Path:
    """Where `stop` records that it left `slot` running for Caddy's h2c connections: beside
    the state file, as the intent record is, so every operator's run sees it. Under the
    runs_dir (a home folder: `~/.togather/runs`), another operator's deploy, or sudo's, never
    saw it and recreated the held container under those connections."""
    state = Path(os.path.realpath(env.state_file))
    return state.with_name(f".{state.name}.{env.name}.{slot}.held-for-h2c")


def legacy_held_marker(env: Environment, slot: Slot) -> Path:
    """Where earlier versions recorded it (per user, under runs_dir): still read."""
    return env.runs_dir / f"{env.name}.{slot}.held-for-h2c"


def _record_held(env: Environment, slot: Slot, reason: str, port: int | None = None) -> str:
    """Record which container was left running (its name and start time: a restarted or
    recreated one is another), so a later run does not recreate it under those connections.
    Returns the reason, with a warning if it could not be recorded."""
    info = docker.inspect(env.slot(slot).container)
    record = {"container": info.name, "started_at": info.started_at,
              "at": times.format_utc(times.now()), "why": reason, "port": port}
    target = held_marker(env, slot)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # readable by every operator (it holds no secret): each one's deploy must see it
        files.atomic_write(target, json.dumps(record, indent=1).encode(), default_mode=0o644)
    except OSError as exc:
        return (f"{reason} (not recorded in {target}: {exc.strerror}; a later "
                "deploy will not know, so stop it before you deploy)")
    return reason


def held_port(record: dict[str, Any]) -> int | None:
    """The h2c port a held record names (None: an older record: proxy_url's)."""
    port = record.get("port")
    return port if isinstance(port, int) and not isinstance(port, bool) else None


def held_record(env: Environment, slot: Slot, info: ContainerInfo) -> dict[str, Any] | None:
    """What `stop` recorded when it left this very container running for Caddy's h2c
    connections (still running, same start time), or None. An unreadable record is a
    PreconditionError naming the file (fail closed: it may say exactly that)."""
    if not info.running:
        return None
    for path in (held_marker(env, slot), legacy_held_marker(env, slot)):
        try:
            record = json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            # a file where its folder should be (runs_dir a file): nothing can be recorded
            # under it, so none is (found by review: it was "cannot read", fix `docker stop`
            # of the serving slot); `status` says the folder is a file
            continue
        except (OSError, ValueError) as exc:
            raise PreconditionError(
                f"cannot read {path} ({exc}), which says whether {info.name} was left running "
                "for Caddy's h2c connections",
                f"if {info.name} has no users left, `docker stop {info.name}`, then run again"
            ) from None
        if isinstance(record, dict) and (record.get("container"), record.get("started_at")) \
                == (info.name, info.started_at):
            return record
    return None


def release_held(env: Environment, slot: Slot) -> str | None:
    """Remove the record that `slot` was left running for h2c connections: called once a run
    has committed traffic to it (it serves: nothing is held off it). Found by review: the
    record outlived a switch back to that slot, and status told on-call to stop the serving
    container. Returns why a record stays (status still never offers to stop a slot that
    serves), or None."""
    for path in (held_marker(env, slot), legacy_held_marker(env, slot)):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"{path} not removed ({exc.strerror}); {slot} serves, so it holds nothing"
    return None


def held_fix(env: Environment, container: str, port: int | None = None) -> str:
    """`port`: the h2c port whose connections hold it (default: proxy_url's). `ss` run where
    Caddy's sockets are: on the host, or in Caddy's network namespace when it runs in a
    container whose port is published (the host's `ss` then shows none of them)."""
    port = port or front_port(env)
    return (f"stop it yourself once they have closed (`ss -tn state established '( sport = "
            f":{port or 'PORT'} )'`, run where Caddy's sockets are: on the host, or `nsenter "
            f"-t <caddy pid> -n ss ...` for a Caddy in a container; then `docker stop "
            f"{container}`), or restart Caddy to move them now (which cuts every open "
            "connection)")


def switch_marker(env: Environment, slot: Slot) -> Path:
    """Where a switch records the old slot's container it left running on purpose (a switch
    back is instant): beside the state file, as `held_marker`, so every operator's status
    sees it."""
    state = Path(os.path.realpath(env.state_file))
    return state.with_name(f".{state.name}.{env.name}.{slot}.left-by-switch")


def _served(dep: states.Deployment | None) -> dict[str, str | None]:
    """The state file's current deployment as a switch left it: a later run that moved
    traffic (a deploy, a rollback, another switch) records another one."""
    if dep is None:
        return {}
    since = dep.live_since or dep.deployed_at
    return {"id": dep.id, "version": dep.version,
            "slot": str(dep.active_slot) if dep.active_slot else None,
            "since": states.format_time(since)}


def keep_for_switch_back(env: Environment, old: Slot, run_id: str, ctx: StepContext) -> None:
    """After a switch is recorded: the old slot keeps running so a switch back is instant.
    Said where on-call reads the outcome (found by a kill fuzz), and recorded (its container's
    id, start time and build, and the deployment the switch recorded) so `runbook status`
    can tell that very container from one restarted, recreated or left by another run, which
    stay problems. Best effort: the switch is recorded; an engine that does not answer now,
    or a record that cannot be written, changes nothing of it (status then lists the slot)."""
    left = env.slot(old).container
    try:
        info = docker.inspect(left)
    except RunbookError:
        return
    if not (env.stop_old_slot and info.up):
        return
    unrecorded = ""
    try:
        current = states.read_state(env.state_file, environment=env.name).current
        record = {"container": info.name, "id": info.container_id,
                  "started_at": info.started_at, "image": info.image,
                  "image_id": info.image_id, "run_id": run_id,
                  "at": times.format_utc(times.now()), "served": _served(current)}
        target = switch_marker(env, old)
        target.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write(target, json.dumps(record, indent=1).encode(), default_mode=0o644)
        ctx.note(left_running=f"{info.name} (id {(info.container_id or '?')[:12]}, started "
                              f"{info.started_at}, {info.image})")
    except (OSError, RunbookError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else exc.message
        unrecorded = (f" (not recorded in {switch_marker(env, old)}: {why}; `runbook status` "
                      "lists it as left running)")
    ctx.notice(f"the old {old} slot is left running ({left}){unrecorded}: `runbook switch "
               f"{command_arg(env)} --slot {old}` switches back at once; "
               + _when_to_stop(env, old, left))


def _when_to_stop(env: Environment, old: Slot, container: str) -> str:
    """When on-call may stop the old slot a switch left running. Never "stop it" while a site
    outside the slot markers proxies to it (`Traffic.pinned`): found by review, following
    that advice answered that site 502 (the rollback warns of it, status offers no stop)."""
    try:
        found = traffic.read(env, proxy=False)
    except RunbookError as exc:
        return (f"before you stop it (`docker stop {container}`), check that `runbook status "
                f"{command_arg(env)}` shows no other site proxying to it (Caddy's running "
                f"config cannot be read now: {exc.message})")
    if old not in found.pinned:
        return f"stop it when that is no longer needed: `docker stop {container}`"
    return (f"{traffic.pinned_by(env, found, old)}: do not stop it while "
            + ("that site may reach it" if found.unresolved else "it does"))


def left_by_switch(env: Environment, slot: Slot, info: ContainerInfo,
                   current: states.Deployment | None) -> dict[str, Any] | None:
    """What `keep_for_switch_back` recorded, when it is this very container as the switch
    left it (running, same id, same start, same build) and the state file still records the
    deployment that switch recorded (no run moved traffic since); else None. An unreadable
    record is None too: the slot is then listed as left running, as without one."""
    if not info.running or None in (info.container_id, info.started_at, info.image_id):
        return None
    try:
        # never a plain read: a FIFO planted there would hang status (files.read_regular)
        record = json.loads(files.read_regular(switch_marker(env, slot), 64 * 1024))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or current is None:
        return None
    same = (record.get("container"), record.get("id"), record.get("started_at"),
            record.get("image_id")) == (info.name, info.container_id, info.started_at,
                                        info.image_id)
    return record if same and record.get("served") == _served(current) else None


def refuse_if_held(env: Environment, slot: Slot, info: ContainerInfo) -> None:
    """Refuse to recreate the very container a rollback or deploy left running for Caddy's h2c
    connections (`held_record`).

    Why: connections such a Caddy accepted before a switch stay with the config that accepted
    them (golang/go#26682), so they may still send their users' requests to it; recreating it
    would answer them 502. Which connections those are cannot be read from outside Caddy, so
    the container stays until on-call stops it (or it is restarted): then the record no
    longer matches what runs."""
    record = held_record(env, slot, info)
    if record is None:
        return
    raise PreconditionError(
        f"refusing to recreate {info.name}: it was left running at {record.get('at', '?')} for "
        "connections Caddy's previous config held over cleartext HTTP/2 (h2c), which may still "
        "send requests to it (h2c connections never move to a new config); recreating it "
        "would answer them 502", held_fix(env, info.name, held_port(record)) + "; then run again")


def refuse_if_migrating(env: Environment, slot: Slot, info: ContainerInfo) -> None:
    """Refuse to recreate a container in which migrations still run through `docker exec`.

    Why: a deploy killed (SIGKILL, OOM, a lost session) while its migrations ran leaves them
    running inside the new slot; the rerun's recreate cut them off halfway, golang-migrate's
    `dirty` flag stayed set, and the rerun's own `migrate up` then failed on it: a half
    migrated schema under the serving version, and a hand-run `migrate force` to get out.
    Matched: the environment's migrate_command, or any command with a `migrate` argument."""
    found = migrate_exec(env, info)
    if found is not None:
        pid, argv = found
        raise PreconditionError(
            f"refusing to recreate {info.name}: migrations still run inside it "
            f"(`{shlex.join(argv)}`, pid {pid} on this host), probably those of a run "
            "that was killed; recreating it would cut them off and leave the schema dirty",
            f"wait until they end (`docker top {info.name}` no longer lists them), then "
            "run the same command again")


def migrate_exec(env: Environment, info: ContainerInfo) -> tuple[int, list[str]] | None:
    """(pid, argv) of migrations running through `docker exec` in a running container: the
    environment's migrate_command, or any command with a `migrate` argument."""
    if not info.exists or info.status != "running":
        return None
    wanted = list(env.migrate_command)
    for pid, argv in docker.running_execs(info.name):
        if (wanted and argv == wanted) or "migrate" in argv[1:] or argv[:1] == ["migrate"]:
            return pid, argv
    return None


@dataclass(frozen=True)
class Preparation:
    """What it takes to make `slot` run `image`: nothing, a start, an unpause or a recreate."""

    slot: Slot
    container: ContainerInfo
    image: str
    tag: str
    action: str  # none | start | unpause | recreate
    reason: str
    # a recreate: the name compose makes the container from (its .Config.Image, checked
    # after it), which is not `image` (shown and recorded) when it is a moving tag; None: `image`
    made: str | None = None
    # a recreate: the build (image id) that name gave at plan time, shown in the plan and
    # checked against the created container's .Image (None: nothing made through compose)
    build: str | None = None
    # a recreate: the stopped leftovers of an interrupted one its plan removes first
    # (compose.removable_leftovers; `leftover_steps`)
    leftovers: tuple[compose.Leftover, ...] = ()

    @property
    def describe_container(self) -> str:
        c = self.container
        if not c.exists:
            return f"{c.name}: gone (removed)"
        # what Docker says beside /health (found by review: a crash, Docker's own
        # healthcheck failing, were never said)
        return f"{c.name}: {c.state_said}, image {c.image}" + (
            "; Docker's own healthcheck says unhealthy (the gate asks /health, the contract)"
            if c.docker_health == health.UNHEALTHY else
            f"; Docker healthcheck {c.docker_health}" if c.docker_health else "")


@dataclass
class Observed:
    """What a run's steps learn for the steps after them, typed (it was a `facts` dict):
    filled as the run goes, read by the state step that records the run."""

    health_status: str | None = None  # the health gate's verdict on the target slot
    verified: str | None = None  # what the proxy answered after the switch
    migration_version: int | None = None  # deploy: the schema after its migrations
    snapshot_path: str | None = None  # deploy: its pre-deploy snapshot
    # the switch wrote or loaded a Caddy config that sends users to the target: an undo's
    # stop of the target then waits as the stop of an old slot does (users' connections the
    # failed config accepted may still hand it a request), never at once
    sent_to_target: bool = False
    # the target's container as its health gate passed (id, start time, restart count): the
    # stop of the old slot asks whether it is still that one, not one a restart policy
    # started again after a crash (whose /health answers again within a second)
    gated_container: intents.Identity | None = None
    # the upstreams of the config the switch replaced (it sent users to the old slot), and of
    # the one it loaded (to the target): where the drain before a stop counts Caddy's
    # connections to the slot (None: not read by this run, every socket on its port counts)
    dials_before: tuple[str, ...] | None = None
    dials_loaded: tuple[str, ...] | None = None


def image_of(env: Environment, version: str, image: str | None = None) -> str:
    """The image a deployment of `version` claims: as recorded (`image`, the state file's
    docker_image), else `[compose] image_repository:<version>`. A claim: what runs is a
    container's .Config.Image, and what a recreate runs is compose's (`created_image`)."""
    return image or f"{env.compose.image_repository}:{version}"


def claim_of(env: Environment, version: str, image: str | None = None) -> str:
    """Where `image_of`'s answer comes from, as a refusal names it."""
    return (f"the image recorded for {version} in {env.state_file}" if image
            else f"[compose] image_repository in {env.source or 'the environment file'}")


def created_image(env: Environment, slot: Slot, tag: str, wanted: str,
                  claimed_by: str) -> tuple[str, str, str, str | None]:
    """The image a recreate of `slot` creates the container from (its .Config.Image, checked
    after the recreate), the one the run shows and records, what the plan says when
    `wanted` named it otherwise ('' when it did not), and the build (image id) it names now,
    which the plan shows and the recreate checks (None: nothing is made through compose).

    Compose creates the container from its own file's `image:` (with IMAGE_TAG=`tag`), never
    from the state file's docker_image nor [compose] image_repository: the file is what runs,
    those are claims (`claimed_by` names which). So compose's image is the one shown and
    checked, as long as it is the build the run means to run: another name for `wanted`'s
    build is said, not refused (a retag, the Go CLI's record); another build, or one that
    cannot be told (either image absent, no `image:`), is refused here, at plan time (exit 4,
    nothing changed). Compose's name is recorded only when it stays on the build
    (`docker.names_for_good`): a file naming `:latest` gets `wanted` recorded, or the record
    would name another build after the next push. A host with no compose for the slot
    (`docker run`) creates nothing through it: `wanted` (compose.check_recreate refuses the
    recreate)."""
    if not compose.can_recreate(env, slot):
        return wanted, wanted, "", None
    made = preflight.compose_image(env, slot, tag)
    if not docker.names_for_good(wanted, tag):
        return _made_by_moving_claim(env, slot, tag, made, wanted, claimed_by)
    build = docker.image_id(made) if made else None
    if made == wanted and build is not None:
        return wanted, wanted, "", build
    meant = docker.image_id(wanted)
    if made and build is not None and build == meant:
        if not docker.names_for_good(made, tag):
            return made, wanted, (f"; compose names it {made}, the same build, by a tag "
                                  f"that moves: the run records {wanted}"), build
        return made, made, f"; {claimed_by} names it {wanted}, the same build", build
    config = env.slot(slot)
    why = ("the service names no image" if not made
           else f"{made} is not on this host" if build is None
           else f"{wanted} is not on this host, so whether they are one build cannot be told"
           if meant is None else "they are different builds")
    raise PreconditionError(
        f"compose would create slot {slot}'s container {config.container} from "
        f"{made or '(no image)'} (service {config.service} of {env.compose.file}, "
        f"IMAGE_TAG={tag}), but {claimed_by} names {wanted}: {why}; nothing was changed",
        f"make them name the same build: the service's `image:` (e.g. "
        f"`{wanted.rsplit(':', 1)[0]}:${{IMAGE_TAG}}`) or {claimed_by}; then run again")


def _made_by_moving_claim(env: Environment, slot: Slot, tag: str, made: str | None,
                          wanted: str, claimed_by: str) -> tuple[str, str, str, str | None]:
    """`created_image` when the claim is a tag that moves (`<repo>:latest`, a record earlier
    versions wrote): it names whatever was pushed last, so it proves no build, not even when
    compose names the same tag. Compose's image is the version's build only when its image
    id is that of `[compose] image_repository:<version>`; then that name is recorded (or
    compose's, when it stays on the build). Otherwise refused here (exit 4, nothing changed),
    as another build is: the recreate made the newest build and only the health gate's
    version check stopped it, with a container already made."""
    stable = image_of(env, tag)
    build = docker.image_id(made) if made else None
    meant = docker.image_id(stable)
    if made and build is not None and build == meant:
        recorded = made if docker.names_for_good(made, tag) else stable
        return made, recorded, (f"; {claimed_by} names it {wanted}, a tag that moves; "
                                f"{made} is the build of {stable}: the run records {recorded}"
                                ), build
    config = env.slot(slot)
    why = ("the service names no image" if not made
           else f"{made} is not on this host" if build is None
           else f"{stable} is not on this host, so whether {made} is {tag}'s build cannot be "
                "told" if meant is None
           else f"{made} names another build than {stable} (pushed or retagged since)")
    raise PreconditionError(
        f"compose would create slot {slot}'s container {config.container} from "
        f"{made or '(no image)'} (service {config.service} of {env.compose.file}, "
        f"IMAGE_TAG={tag}), and {claimed_by} names {wanted}, a tag that moves, which proves "
        f"no build: {why}; nothing was changed",
        f"make the service's `image:` name the version (e.g. "
        f"`{stable.rsplit(':', 1)[0]}:${{IMAGE_TAG}}`), or tag {tag}'s build as {stable} if "
        "this host still has it; then run again")


def prepare(env: Environment, slot: Slot, version: str, image: str | None = None,
            *, action: str, recovery: str = "", info: ContainerInfo | None = None,
            claimed_by: str | None = None) -> Preparation:
    """Inspect the slot's container (the running truth) and decide; never changes anything.
    `info`: the container as the caller has just inspected it (not asked twice). `action`:
    the command planning it (rollback, switch), which a refusal's fix says to run again.

    `image` (default `image_of`) is what the run means to run, a claim (`claimed_by` says
    whose; default `claim_of`): the container holding that build under another name is
    started as it is, and a recreate runs compose's image (`created_image`). The name shown
    and recorded is the container's when it stays on the build (`docker.names_for_good`),
    else the claim: a moving tag (`:latest`) recorded would name another build tomorrow, and
    status and later rollbacks would no longer know what the container runs."""
    claimed_by = claimed_by or claim_of(env, version, image)
    image = image_of(env, version, image)
    if info is None:
        info = docker.inspect(env.slot(slot).container)
    named, holds = "", info.exists and info.image == image
    if info.exists and info.image and info.image != image and info.image_id is not None \
            and docker.image_id(image) == info.image_id:
        holds = True
        if docker.names_for_good(info.image, version):
            named = f"; {claimed_by} names it {image}, the same build"
            image = info.image
        else:
            named = (f"; the container names it {info.image}, the same build, by a tag that "
                     f"moves: the run records {image}")
    elif holds and info.image and not docker.names_for_good(info.image, version):
        image, named = _for_good(env, info, version, claimed_by)
    if holds:
        kept = image + _tag_moved(info, image, version) + named
        # running in the seconds of a crash loop is the loop (found by review: the same dry
        # run planned "already running" or refused, by the instant it looked)
        loop = docker.crash_loop(info) if info.running else None
        if info.running and loop is None:
            return Preparation(slot, info, image, version, "none", f"already running {kept}")
        if info.status in ("exited", "created"):
            return Preparation(slot, info, image, version, "start",
                               f"start the {info.status} container (it keeps {kept})")
        if info.status == "paused":  # Docker refuses to start a paused container
            return Preparation(slot, info, image, version, "unpause",
                               f"unpause the paused container (it keeps {kept})")
        if info.status == "restarting" or loop is not None:  # its policy restarts it: it exits
            raise PreconditionError(
                f"slot {slot}'s container {info.name} is "
                + (f"crash-looping ({loop})" if loop is not None else "restarting")
                + f": it keeps exiting and Docker's restart policy keeps starting it again "
                f"({image}); nothing was changed",
                f"read `docker logs --tail 100 {info.name}`; once it runs (or after `docker "
                f"stop {info.name}`, which ends the loop), run the same command again")
        # "dead" (Docker failed to remove it): it cannot be started, only replaced
    if not docker.image_exists(image):
        raise PreconditionError(
            f"image {image} is gone and slot {slot}'s container "
            + ("was removed" if not info.exists else f"runs {info.image}"),
            recovery or f"rebuild {image} from its commit, or deploy a version whose image "
                        f"exists: {compose.deploy_hint(env)}")
    why = ("the container was removed" if not info.exists
           else f"it is {info.status}: Docker cannot start it" if holds
           else f"it runs {info.image}")
    # a `docker run` host: say so, change nothing
    compose.check_recreate(env, slot, image, why, action=action)
    # the label of the compose project that made it: the removed one's from its sibling
    other = docker.inspect(env.slot(slot.other).container)
    compose.check_project_of(env, slot, info, other, image, action=action)
    compose.check_service(env, slot, info, other)  # never the other slot's container
    # compose would fail on one half-way: stopped ones the plan removes first, others refused
    leftovers = compose.removable_leftovers(env, slot, other)
    refuse_if_held(env, slot, info)
    refuse_if_migrating(env, slot, info)
    traffic.refuse_recreate_if_pinned(env, slot)  # another site's upstream: it serves
    made, image, named, build = created_image(env, slot, version, image, claimed_by)
    return Preparation(slot, info, image, version, "recreate",
                       f"recreate through compose with {image} ({why}{named})", made, build,
                       tuple(leftovers))


def _for_good(env: Environment, info: ContainerInfo, version: str,
              claimed_by: str) -> tuple[str, str]:
    """The name to show and record for a container made from the claim itself, when that
    is a moving tag (a record earlier versions wrote from such a container): the configured
    `image_repository:<version>` when it names the container's build, and what the plan says
    about it. Else the claim is recorded again, and the plan says so: no name on the host
    stays on the build (a digest reference would, but a locally built image has none), and
    a name the runbook would make (`docker tag`) changes the host beyond what it was asked."""
    claim = info.image or ""
    stable = image_of(env, version)
    if stable == claim or info.image_id is None:
        return claim, ""
    now = docker.image_id(stable)
    if now != info.image_id:
        build = docker.short_id(info.image_id)
        why = (f"{stable} is not on this host (`docker tag {build} {stable}` would name it)"
               if now is None else f"{stable} names another build, {docker.short_id(now)}")
        return claim, (f"; {claimed_by} names it {claim}, a tag that moves, and no name on "
                       f"this host stays on its build {build} ({why}): the run records "
                       f"{claim} again, which names another build after the next push")
    return stable, (f"; {claimed_by} names it {claim}, a moving tag"
                    + _tag_moved(info, claim, version) + f"; recorded as {stable}, the same "
                    "build")


def _tag_moved(info: ContainerInfo, image: str, version: str) -> str:
    """Said in the plan when the tag names another build than the container holds (rebuilt
    or retagged since): the container keeps the build that ran as `version`, and that is
    what starts, not what the tag names now. '' when they agree or cannot be told."""
    now = docker.image_id(image)
    if now is None or info.image_id is None or now == info.image_id:
        return ""
    return (f"; the tag now names another build, {docker.short_id(now)}: the container keeps "
            f"{docker.short_id(info.image_id)}, the build that ran as {version}")


def ran_before(env: Environment, deployment_id: str, info: ContainerInfo,
               names: tuple[str, ...]) -> tuple[str, str] | None:
    """(build, where that is known from) of the build that last ran as `deployment_id`:
    the slot's own container when it still holds one of `names` (a dead one a recreate
    replaces), else the newest run record that gated it (its health gate notes the build);
    None when neither tells. No build id is in the state file (no dialect has one)."""
    if info.exists and info.image in names and info.image_id:
        return info.image_id, f"its container {info.name}"
    from runbook import journal

    for record in journal.past_records(env):
        if record.get("deployment_id") != deployment_id or record.get("exit_code") not in (
                ExitCode.OK, ExitCode.TOOK_EFFECT):
            continue
        for step in record.get("steps", []):
            detail = step.get("detail")
            build = detail.get("build") if isinstance(detail, dict) else None
            if step.get("name") == "health-gate" and isinstance(build, str) and build:
                return build, f"run {record.get('run_id')}, whose health gate passed it"
    return None


def moved_since(made: str, build: str, ran: tuple[str, str] | None, version: str,
                recorded_commit: str | None) -> str | None:
    """The plan's warning when the build a recreate makes is not the one that ran as
    `version` (its tag rebuilt or retagged since), or None."""
    if ran is None or ran[0] == build:
        return None
    gate = (f"its health gate refuses it if its /health names another commit than the "
            f"recorded {recorded_commit[:7]}" if recorded_commit
            else "the state file records no commit for the gate to compare")
    return (f"{made} now names build {docker.short_id(build)}, not "
            f"{docker.short_id(ran[0])}, the build that ran as {version} ({ran[1]}): the tag "
            f"was rebuilt or retagged since, so the recreate runs another build under that "
            f"name; {gate}")


def build_commit(image: str, labels: dict[str, str] | None = None) -> str | None:
    """The commit a build names itself by: its image's `org.opencontainers.image.revision`
    label (`image`: a tag or an image id), as health.named_commit reads one; `labels` (a
    container's own, which carry its image's) when the image cannot be inspected. None when
    no label names a commit (absent, `unknown`): a build is never refused for what it does
    not say. Read before a container is made from a tag that moves (`docker tag`, a rebuild),
    which only the gate's /health or /version told, once it ran."""
    found = docker.image_labels(image)
    if found is None:
        found = labels or {}
    return health.named_commit(found.get(docker.REVISION_LABEL))


def label_shared(serving: docker.ContainerInfo | None, build: str | None, said: str,
                 state: states.DeploymentState) -> bool:
    """Whether the serving container runs another build than `build` whose revision label
    names the same commit `said`, one no deployment in the state file records: a label two
    builds share that names none of them (one a base image sets and the app's Dockerfile
    does not override) cannot tell them apart, so it is read as neither build's commit, as
    for a build with no label. Found by review: such a label refused every rollback as
    "another build than the recorded one", with no way past but a rebuild. A recorded
    commit is the app's (a rebuild of the serving commit under the target's tag is still
    refused), and the gate compares the commit the target answers with the record."""
    if serving is None or not serving.exists or serving.image_id is None \
            or serving.image_id == build \
            or any(health.commits_differ(d.git_commit, said) is False
                   for d in state.deployments()):
        return False
    try:
        theirs = build_commit(serving.image_id, serving.labels)
    except RunbookError:
        return False
    return theirs is not None and health.commits_differ(theirs, said) is False


def shared_label_said(said: str) -> str:
    """The plan's warning when label_shared set a label aside."""
    return (f"the {docker.REVISION_LABEL} label of the target's build names commit {said[:12]}, "
            "as the serving build's does: not read as either build's commit (a label both "
            "builds share, e.g. a base image's); the health gate compares the commit the "
            "target answers with the record")


def build_to_run(prep: Preparation) -> tuple[str | None, str]:
    """(image id, name) of the build the target slot would run: compose's image for a
    recreate (the id the plan shows), else the container's own build, as a start keeps it."""
    if prep.action == "recreate":
        name = prep.made or prep.image
        return prep.build or docker.image_id(name), name
    return prep.container.image_id, prep.container.image or prep.image


@dataclass(frozen=True)
class AnotherBuild:
    """What `labelled_another` found: the build the target slot would run names, by its
    revision label, commit `said` where the state file records `recorded` for the deployment
    the run records there. `cut`: how much of each to show (never two alike)."""

    build: str
    name: str
    said: str
    recorded: str
    cut: int | None
    container: str  # the plan's words for what would run it

    def holds(self, target: states.Deployment, verb: str) -> str:
        """The refusal's first part: `verb` is what the run would do (`rollback`, ...)."""
        return (f"{self.container} holds commit {self.said[:self.cut]} (the "
                f"{docker.REVISION_LABEL} label of its build {docker.short_id(self.build)}), "
                f"but the state file records commit {self.recorded[:self.cut]} for "
                f"{target.version} ({target.id}): the {verb} would run another build than the "
                "one recorded (its tag rebuilt or retagged since); nothing was changed")


def labelled_another(env: Environment, prep: Preparation, target: states.Deployment,
                     serving: ContainerInfo | None,
                     state: states.DeploymentState) -> AnotherBuild | str | None:
    """Read before anything changes, by rollback and switch alike: whether the build the
    target slot would run (a start, a recreate, or kept running) names by its
    `org.opencontainers.image.revision` label another commit than the state file records
    for `target`, the deployment the run records there. Neither the tag nor a container's
    name tells the build; its label does. None: no label (or `unknown`), no recorded
    commit, or the same; a str: a label the serving build shares (label_shared), the plan's
    warning; else what differs, for the caller's refusal."""
    build, name = build_to_run(prep)
    if build is None:
        return None
    said = build_commit(build, prep.container.labels if prep.action != "recreate" else None)
    recorded = health.named_commit(target.git_commit)
    if said is None or recorded is None or health.commits_differ(recorded, said) is not True:
        return None
    if label_shared(serving, build, said, state):
        return shared_label_said(said)
    container = (f"slot {prep.slot}'s {prep.container.status} container "
                 f"{prep.container.name} (made from {name})"
                 if prep.action != "recreate" else f"{name}, which the recreate of {prep.slot}"
                 " would run,")
    return AnotherBuild(build, name, said, recorded, 7 if said[:7] != recorded[:7] else None,
                        container)


def put_back(env: Environment, prep: Preparation, name: str, target: states.Deployment,
             verb: str, *, recreates: bool = True) -> str:
    """The fix for a target slot holding another build than `target`'s record: that
    commit's build back under `name`, and a standby kept from the other build replaced,
    then the `verb` (`rollback`, `switch`) run again. `recreates`: the verb makes a removed
    slot container again through compose (a rollback does; a switch refuses one, so its
    fix names the compose command that makes it)."""
    commit = health.named_commit(target.git_commit) or target.git_commit
    fix = (f"put commit {commit}'s build back under {name}: rebuild it (cd /opt/togather/src "
           f"&& git checkout {commit} && docker build -f deploy/docker/Dockerfile --build-arg "
           f"VERSION={target.version} --build-arg GIT_COMMIT={commit} -t {name} .), or "
           f"`docker tag` that build as {name} if this host still has it")
    if prep.action != "recreate":
        container = env.slot(prep.slot).container
        fix += (f", then replace {container} (it serves no users) with a container of it: "
                + ((f"`docker rm -f {container}` and the {verb} recreates it through "
                    "compose" if recreates else
                    f"`{compose.recreate_slot(env, prep.slot, prep.tag).display()}`")
                   if compose.can_recreate(env, prep.slot) else
                   "the way this host makes its slots (its `docker run` command)"))
    return fix + f"; then run the {verb} again"


def expected_commit(target: states.Deployment, prep: Preparation, recorded: str, verb: str,
                    outcome: str = "nothing took effect") -> health.ExpectedCommit:
    """The commit a gate compares (the state file's record of `target`, `recorded` saying
    whose), and the fix when the slot runs another: the recorded commit's build put back
    under the tag, then the `verb` run again."""
    commit, image = target.git_commit, prep.made or prep.image
    return health.ExpectedCommit(commit, recorded, (
        f"put commit {commit}'s build back under {image}: rebuild it (cd /opt/togather/src "
        f"&& git checkout {commit} && docker build -f deploy/docker/Dockerfile --build-arg "
        f"VERSION={target.version} --build-arg GIT_COMMIT={commit} -t {image} .), or "
        f"`docker tag` that build as {image} if this host still has it; then run the "
        f"{verb} again"), outcome)


def tag_holds_another(image: str, recorded: str,
                      shares: tuple[docker.ContainerInfo | None, states.DeploymentState]
                      | None = None) -> str | None:
    """What `image` (a deployment's tag) holds when its build's revision label names another
    commit than `recorded` (the state file's git_commit; retagged or rebuilt since), said in
    a fix that would make a slot from it; None when they agree, either names none, the
    image cannot be read, or the serving build shares that label (`shares`: the serving
    container and the state, label_shared).
    Found by review: status offered recreating the previous slot from
    a tag moved to v1's build as the way back, and the rollback then failed its gate."""
    try:
        said = build_commit(image)
    except RunbookError:
        return None
    commit = health.named_commit(recorded)
    if said is None or commit is None or health.commits_differ(commit, said) is not True:
        return None
    try:
        if shares is not None and label_shared(shares[0], docker.image_id(image), said,
                                               shares[1]):
            return None
    except RunbookError:
        pass  # the serving build unread: the label stands, as without one
    cut = 7 if said[:7] != commit[:7] else None  # never two alike
    return (f"its build's {docker.REVISION_LABEL} label names commit {said[:cut]}, the state "
            f"file records {commit[:cut]}")


def built_line(made: str, build: str) -> str:
    """The plan's line for the build a recreate makes: the one the created container is
    checked against, so the plan says exactly what runs, not only a name."""
    return (f"{docker.short_id(build)} ({made} now; the created container must run this "
            "build, else the step fails before traffic moves)")


def run_step(env: Environment, prep: Preparation, observed: Observed | None = None, *,
             again: str | None = None) -> Step:
    """`again`: the command that reruns the run (plans anew), which a refusal names."""
    config = env.slot(prep.slot)
    details = {"container": prep.describe_container, "wanted image": prep.image,
               "decision": prep.reason}
    # built once: the plan shows the very command the step runs. A start goes to the id of
    # the container the plan inspected: never another one given its name since
    ident = prep.container.container_id if prep.container.exists else None
    recreate_command = (compose.recreate_slot(env, prep.slot, prep.tag)
                        if prep.action == "recreate" else None)
    start_action = (docker.unpause_action(config.container, ident) if prep.action == "unpause"
                    else docker.start_action(config.container, ident))
    if recreate_command is not None:
        details["command"] = recreate_command.display()
        if prep.build is not None:
            details["build"] = built_line(prep.made or prep.image, prep.build)
    elif prep.action in ("start", "unpause"):
        details["command"] = start_action.as_planned()
    titles = {"none": f"Keep the {prep.slot} slot running {prep.image}",
              "start": f"Start the stopped {prep.slot} container",
              "unpause": f"Unpause the paused {prep.slot} container",
              "recreate": f"Recreate the {prep.slot} container with {prep.image}"}

    def run(ctx: StepContext) -> None:
        # the undo is registered BEFORE the act: a Ctrl-C or a Docker time-out in the middle
        # of it may leave the container started (Docker finishes what it was asked), and
        # "nothing took effect" must then be true
        # should the undo fail (the engine stopped answering): what on-call does by hand
        by_hand = (f"{config.container} may still be running: stop it with `docker stop "
                   f"{config.container}` once `docker info` answers")
        # still the container the plan resolved (refused before the undo is registered:
        # nothing to undo, and the undo's stop would be another container's)
        verb = {"start": "started", "unpause": "unpaused"}.get(prep.action, "recreated")
        same_container(env, prep.slot, prep.container, verb=verb, again=again)
        if prep.action in ("start", "unpause"):
            ctx.on_failure(f"stop {config.container} again",
                           lambda: stop_if_started(env, prep.slot, observed, ident), by_hand)
            docker.run(start_action)
        elif recreate_command is not None:
            refuse_recreate(env, prep.slot)  # refused: nothing to undo
            ctx.stop_if_signalled()  # a Ctrl-C while it read: nothing to undo either
            made: list[str] = []  # the created container's id, once compose has made it
            ctx.on_failure(f"stop {config.container} (started by this run)",
                           lambda: stop_if_started(env, prep.slot, observed,
                                                   made[0] if made else None), by_hand)
            recreate(env, prep.slot, prep.tag, recreate_command, checked=True,
                     image=prep.made or prep.image, build=prep.build, cut_off=ctx.cut_off,
                     created=made)
        ctx.fault("start-slot.acted")  # Docker has done it; the step has not returned
        info = docker.inspect(config.container)
        ctx.note(container=f"{info.status}, image {info.image}")

    if recreate_command is not None:
        details["Ctrl-C"] = RECREATE_CTRL_C
    return Step("start-slot", titles[prep.action], details,
                run=None if prep.action == "none" else run,
                skip="already running the wanted image" if prep.action == "none" else None,
                **recreate_holds(recreate_command is not None))


def leftover_steps(env: Environment, slot: Slot,
                   found: list[compose.Leftover] | tuple[compose.Leftover, ...]) -> list[Step]:
    """The plan's removal of the stopped leftovers of an interrupted recreate of `slot`
    (`compose.removable_leftovers` found them, and says why it is safe), placed right after
    the pre-flight: before anything else changes, so that Docker refusing one started since
    the plan (`docker rm` without -f) stops the run with nothing else changed. Built here,
    run by `compose.remove_leftover`: the plan shows each one's exact command."""
    if not found:
        return []
    # built once: the plan shows the very commands the step runs
    removals = [(leftover, docker.remove_action(leftover[1], force=False)) for leftover in found]
    details: dict[str, str] = {}
    for n, ((ident, name, state), action) in enumerate(removals, 1):
        number = f" {n}" if len(found) > 1 else ""
        details[f"leftover{number}"] = f"{name} (id {ident}, {state})"
        details[f"command{number}"] = action.display()
    details["why"] = (f"what a recreate of {slot} stopped half-way left (compose interrupted "
                      "or killed): not running, so it serves nothing; compose would fail on "
                      "its name, and `--force-recreate` removes the old container anyway; "
                      "named volumes are kept")
    details["if it started since"] = ("Docker refuses to remove it (no -f): the run stops "
                                      "here, traffic stays, exit 4")
    names = ", ".join(name for _, name, _ in found)
    plural = "s" if len(found) > 1 else ""

    def run(ctx: StepContext) -> None:
        def kept() -> None:
            raise Skipped("a stopped leftover of an interrupted recreate is not put back: it "
                          "served nothing, and a recreate fails on it")

        ctx.on_failure(f"remove {names}", kept)  # before the act: a Ctrl-C may cut it
        done = [compose.remove_leftover(env, slot, leftover, action)
                for leftover, action in removals]
        ctx.note(removed="; ".join(done))

    return [Step("remove-leftover", f"Remove the stopped leftover{plural} {names} of an "
                 "interrupted recreate", details, run=run)]


# compose cut off half-way leaves a temporary `<id>_<name>` container (a kill-fuzz review):
# a Ctrl-C waits for it to finish, then undoes; a second one is the way out of a hung compose
RECREATE_CTRL_C = ("acted on once compose has finished (then undone: traffic stays); a second "
                   "Ctrl-C stops compose half-way")
# said after "another Ctrl-C" with the first one's answer, and after "it" with the second's
SECOND_CTRL_C = ("stops compose half-way, which may leave a half-recreated container "
                 "(`runbook status` names it; the next run removes it when it is stopped)")


def recreate_holds(recreates: bool) -> dict[str, Any]:
    """A recreate step's signal handling (Step fields): held until compose ends, a second
    signal cutting it off."""
    return {"hold_signals": True, "second_signal": SECOND_CTRL_C} if recreates else {}


NOTE_EVERY = 0.5  # seconds between two identical health-gate notes
FORCED_POLL = 0.05  # seconds between a forced gate's attempts (it waits only for an answer)


class EarlyHealth:
    """The standby's /health, asked while the planner waits on other probes, when the
    standby already runs (nothing will start it): the health gate's first attempt if it is
    still fresh when the gate runs, so the gate does not wait on the app's answer again right
    after it came. A stale one (a long confirmation prompt) is not used: the gate asks anew."""

    FRESH = 1.0  # seconds

    def __init__(self, env: Environment, slot: Slot) -> None:
        from runbook.preflight import Probe

        config = env.slot(slot)

        def ask() -> tuple[health.HealthReport, float]:
            report = health.probe(config, env.health.path, env.health.request_timeout)
            return report, time.monotonic()

        self._probe = Probe(ask, f"health-{slot}")

    def fresh(self, wait: float) -> health.HealthReport | None:
        """The report if it came less than FRESH ago; waits for an answer still on its way
        at most `wait` seconds (the gate's timeout: the gate's deadline holds)."""
        self._probe.settle(wait)
        if not self._probe.done:
            return None
        report, at = self._probe.result()
        return report if time.monotonic() - at <= self.FRESH else None

    def settle(self, timeout: float) -> None:
        self._probe.settle(timeout)


def _build_seen(env: Environment, slot: Slot, expected_version: str | None,
                report: health.HealthReport, *, ask_version: bool) -> tuple[str, str | None]:
    """The build the slot names, checked against `expected_version` the way the switch's
    verification checks it (health.names_build: an empty version skipped every check here,
    found by review; a commit alone is its version's 40 hex, CONTRACTS; case and a trailing
    newline do not count), and the commit it names (/health's, or /version's when that was
    asked; None: neither names one). Raises when it names another build. `ask_version`:
    when /health names none (an app with fewer fields), the slot's own /version is asked."""
    config = env.slot(slot)
    version = report.version
    commit = report.git_commit
    named = (health.names_build(expected_version, report.version, report.git_commit)
             if expected_version else None)
    if named is False:
        answer = (f"version {report.version}"
                  + (f" (git_commit {report.git_commit})" if report.git_commit else "")
                  + f", expected {expected_version}"
                  if health.build_key(report.version) else
                  f"git_commit {report.git_commit}, expected version {expected_version} "
                  f"(its {env.health.path} names no version)")
        raise PreconditionError(f"slot {slot} answers {answer}",
                                f"check `docker inspect {config.container}`")
    said = health.build_key(report.version)
    if named and said != health.build_key(expected_version):  # named by its commit
        version = f"{report.git_commit} (git_commit" + (
            f"; version {report.version.strip()}" if said and report.version else "") + ")"
    if expected_version and named is None:
        if not ask_version:
            return f"not named by {env.health.path} (the switch verifies it)", commit
        # /health names no build (an app with fewer fields): the slot's own /version,
        # asked now, so a wrong build is refused before traffic moves, not after
        seen = health.version_of(config, env.health.request_timeout)
        if seen is not None and not health.names_build(expected_version, *seen):
            raise PreconditionError(
                f"slot {slot} answers version {seen[0] or '(none)'} (git_commit "
                f"{seen[1] or '(none)'}) at {health.VERSION_PATH}, expected "
                f"{expected_version}; its {env.health.path} names no version",
                f"check `docker inspect {config.container}`")
        version = (f"{seen[0] or seen[1]} (from {health.VERSION_PATH})" if seen
                   else f"not checked here: neither {env.health.path} nor "
                        f"{health.VERSION_PATH} names one (the switch verifies it)")
        commit = seen[1] if seen is not None else None
    return str(version), commit


def _commit_seen(env: Environment, slot: Slot, expected: health.ExpectedCommit | None,
                 said: str | None, report: health.HealthReport) -> str:
    """The gate's word on the slot's commit: compared with the one the state file records
    (found by review: a tag rebuilt from other code under the same version passed on the
    version alone, and served the very build being rolled back from). Raises
    CommitMismatchError when they contradict; when either names none, says it was not
    checked (a host with fewer /health fields is never refused for it)."""
    if expected is None:
        return ""
    differs = health.commits_differ(expected.commit, said)
    if differs is None:
        why = ("the state file records none" if health.named_commit(expected.commit) is None
               else f"{env.health.path} names none")
        return f", commit not checked ({why})"
    if differs:
        runs = health.named_commit(said) or ""
        # 7 hex each, unless those are the same (then whole, or they would read alike)
        cut = 7 if runs[:7] != expected.commit[:7] else None
        raise health.CommitMismatchError(
            f"{slot} runs commit {runs[:cut]} but {expected.recorded} recorded "
            f"{expected.commit[:cut]}: its image tag was rebuilt or retagged since; "
            f"{expected.outcome}", expected.fix, report=report)
    return f", commit {expected.commit[:7]} as recorded"


def gate_step(env: Environment, slot: Slot, *, force: bool, expected_version: str | None,
              observed: Observed | None = None, early: EarlyHealth | None = None,
              record: dict[str, Any] | None = None,
              schema: health.ExpectedSchema | None = None,
              way_out: str | None = None,
              commit: health.ExpectedCommit | None = None) -> Step:
    """The health gate; the report's status lands in `observed.health_status` for the state.
    `early`: the slot's health as asked while planning (see EarlyHealth). `record`: the run's
    intent record, given the container the gate proved, which the commit point's write
    carries: a run finishing this one after a kill asks whether it still serves (finish.py).
    `schema`: the version the runbook read for this run, which the slot's reported one must
    equal (health.check_schema): a slot reading another database passed on its own
    database's answer, and users were served from one the run never checked. `way_out`:
    added to a failed gate's fix (a rollback's other versions), unless the slot reads
    another database than the runbook's, which no other version mends. `commit`: the
    commit the state file records for the build the slot must run, refused when the slot
    names another (`_commit_seen`)."""
    observed = observed if observed is not None else Observed()
    config = env.slot(slot)

    def passed(ctx: StepContext, report: health.HealthReport) -> None:
        observed.health_status = report.status
        info = docker.inspect(config.container)
        observed.gated_container = _identity(info)
        if info.image_id:  # the build that ran: a later recreate's plan compares (ran_before)
            ctx.note(build=info.image_id)
        if info.docker_health is not None:  # said, never gated on (found by review)
            ctx.note(docker_health=info.docker_health)
        if (disagrees := report.docker_disagrees(info.docker_health)) is not None:
            ctx.notice(f"{WARNING}{disagrees}: the {slot} slot's container {config.container} "
                       "(the gate passed on /health, the contract)")
            ctx.result = "Docker healthcheck unhealthy"
        if record is not None:  # on disk before the switch (a kill after its reload)
            record[intents.GATED_CONTAINER] = intents.identity_entry(observed.gated_container)
            ctx.keep_intent()

    # what is applied: a forced gate takes any answer (a wrong build excepted), polled fast;
    # the plan and journal said the skipped gate's criterion beside an "unhealthy" ok
    details = {"url": f"{config.base_url}{env.health.path}",
               "passes on": "healthy or degraded (HTTP 200)" if not force else
                            "any answer, whatever its status (503 included: --force skips "
                            "the health verdict), unless it names another build",
               "timeout": f"{env.health.timeout_text}; asked every {health.FAST_INTERVAL:g}s "
                          f"for the first {health.FAST_WINDOW:g}s, then backoff "
                          f"{env.health.interval:g}s -> {env.health.max_interval:g}s"
                          if not force else
                          f"{env.health.timeout_text}, asked every {FORCED_POLL:g}s"}
    if expected_version:
        details["expected version"] = expected_version
    if commit is not None and health.named_commit(commit.commit) is not None:
        details["expected commit"] = (f"{commit.commit}, as {commit.recorded} recorded it: "
                                      "refused when the slot names another; not compared "
                                      "when it names none")
    if schema is not None:
        details["schema"] = schema.plan_line(env.health.path) + (
            " (--force: a difference is said, not refused)" if force else "")

    def run(ctx: StepContext) -> None:
        try:
            gated(ctx)
        except health.HealthGateError as exc:
            if way_out and not isinstance(exc, health.SchemaMismatchError):
                exc.fix = f"{exc.fix}; {way_out}" if exc.fix else way_out
            raise

    def gated(ctx: StepContext) -> None:
        if force:
            # Not gated on health, but traffic never goes to a slot that does not answer at
            # all (a container still starting, crashed, hung): that would be 502s for nothing
            # until verification gave up. At the deadline it went on all the same (found by
            # review); it fails now, before anything moved.
            began = time.monotonic()
            deadline = began + env.health.timeout
            asked_running = began
            while True:
                report = health.probe(config, env.health.path, env.health.request_timeout)
                if report.status != health.UNREACHABLE:
                    break
                now = time.monotonic()
                gone = False
                if now - asked_running >= 1.0 or now >= deadline:
                    asked_running = now
                    gone = not docker.inspect(config.container).running
                if now >= deadline or gone:
                    why = (f"its container {config.container} is not running" if gone
                           else f"within {env.health.timeout:g}s")
                    raise health.HealthGateError(
                        f"slot {slot} did not answer {config.base_url}{env.health.path} {why} "
                        f"({report.reason() or report.status}): --force skips the health "
                        "verdict, never an answer; traffic stays where it was",
                        f"check `docker logs --tail 100 {config.container}`",
                        report=report, elapsed=now - began)
                ctx.heartbeat()
                time.sleep(FORCED_POLL)
            # the build is checked all the same (found by review): a wrong one would take
            # users until the switch's verification undid it
            seen, runs = _build_seen(env, slot, expected_version, report, ask_version=False)
            checked = _commit_seen(env, slot, commit, runs, report)
            if schema is not None:
                report, compared = health.check_schema(env, slot, report, schema,
                                                       refuse=False)
                ctx.note(schema=compared)
                if compared.startswith("DIFFERS"):
                    ctx.notice(compared)
            passed(ctx, report)
            ctx.note(health=f"{report.status} (not gated: --force; waited until it answers), "
                            f"version {seen}{checked}")
            return
        said: list[tuple[str, float]] = []  # the last note and when it was said

        def waiting(attempt: int, report: health.HealthReport) -> None:
            ctx.heartbeat()
            if not report.ok:
                # polled every 20 ms while a slot starts: a line when the status changes or
                # every NOTE_EVERY, not fifty lines a second on the on-call's terminal. Keyed
                # on the status, not its reason: behind docker-proxy a slot not yet listening
                # alternates "reset by peer" and "closed without response" (found by review:
                # 13 lines in 0.3 s)
                now = time.monotonic()
                if not said or said[-1][0] != report.status or now - said[-1][1] >= NOTE_EVERY:
                    said[:] = [(report.status, now)]
                    reason = report.reason()
                    ctx.say(f"attempt {attempt}: {report.status}"
                            + (f" ({reason})" if reason else ""))

        began = time.monotonic()
        first = early.fresh(env.health.timeout) if early is not None else None
        report = health.wait_healthy(  # its deadline counts the wait for the early answer
            env, slot, on_attempt=waiting,
            is_running=lambda: docker.inspect(config.container).running,
            first=first, began=began)
        version, runs = _build_seen(env, slot, expected_version, report, ask_version=True)
        checked = _commit_seen(env, slot, commit, runs, report)
        if schema is not None:  # decided on an ok answer: a differing one fails at once
            report, compared = health.check_schema(env, slot, report, schema)
            ctx.note(schema=compared)
        passed(ctx, report)
        ctx.note(health=f"{report.status}, version {version}{checked}")

    title = (f"Health gate: wait for the {slot} slot to be healthy" if not force
             else f"Wait until the {slot} slot answers (health gate skipped: --force)")
    return Step("health-gate", title, details, run=run)


RECHECK_TRIES = 3  # answers of the new slot asked before the old one is stopped
RECHECK_PAUSE = 0.3  # seconds between them: one slow or reset answer is not a dead slot


def check_still_healthy(env: Environment, serving: Slot, old: Slot,
                        observed: Observed | None = None,
                        old_info: ContainerInfo | None = None,
                        notice: Callable[[str], None] | None = None) -> str:
    """Right before the old slot is stopped (after the drain), the slot that now serves
    must still answer healthy: one that passed its gate and then died (a worker that panics
    after start, its first cron tick) had the last good slot stopped under it, a full outage
    reported as a success. It must also still be the container its gate proved (`observed`):
    a restart policy starts a crashed one again, whose /health answers within a second.
    Raises (exit 6, the old slot kept) when it is not, or none of a few answers is ok;
    returns the answer it saw. `old_info`: the old slot's container as just inspected (None:
    running), so the message says what is true of it. `notice`: says on the terminal what
    was let pass (a serving slot restarted since its gate, the old one already down)."""
    moved = restarted_since_gate(env, serving, observed)
    report = _recheck(env, serving) if moved is None or _nothing_to_keep(old_info) else None
    if report is not None and report.ok:
        if moved is None:
            return report.status
        passed = _restarted_but_serving(env, serving, old, moved, report, notice)
        if passed is not None:
            return passed
    why = moved or (f"no longer answers healthy ({report.status}: {report.reason()})"
                    if report is not None else "")
    raise not_stopping(env, serving, old, why, old_info, restarted=moved is not None)


def _nothing_to_keep(old_info: ContainerInfo | None) -> bool:
    """The old slot is no way back a refusal could keep: exited, absent, or crash-looping
    (its stop ends the loop), also in the half second of its loop it runs (docker.crash_loop:
    found under load, a refusal then kept it as a way back); running or paused (unpaused at
    once) it is one. None: running."""
    return old_info is not None and (old_info.status not in ("running", "paused")
                                     or docker.crash_loop(old_info) is not None)


def _restarted_but_serving(env: Environment, serving: Slot, old: Slot, moved: str,
                           report: health.HealthReport,
                           notice: Callable[[str], None] | None) -> str | None:
    """A serving slot restarted since its gate that answers healthy now, with the old slot
    no way back (_nothing_to_keep): said, and the run goes on (None: it is restarting now).
    Refused, it read "both slots are down" while it served, and every rerun refused the
    same, for ever after a host's reboot (found by review); on-call's way out after a
    refusal that kept the old one (stop it, run again) ends here too."""
    if not docker.inspect(env.slot(serving).container).running:  # restarting: no answer
        return None
    said = (f"the {serving} slot answers {report.status}, though it {moved}; the old {old} "
            "slot is no way back (not running), so nothing waits on that answer: read "
            f"`docker logs --tail 100 {env.slot(serving).container}`")
    if notice is not None:
        notice(said)
    return said


def restarted_since_gate(env: Environment, serving: Slot,
                         observed: Observed | None) -> str | None:
    """Why the serving slot's container is not the one its health gate proved (None: it is,
    or the gate's was not recorded: a run finishing one whose record an older version wrote).
    Restarting now, or another id, start time or restart count: it crashed (or was replaced)
    after its gate."""
    info = docker.inspect(env.slot(serving).container)
    if info.status == "restarting":
        return ("is restarting: it keeps exiting and its restart policy keeps starting it "
                f"(restarts {info.restart_count})")
    gated = observed.gated_container if observed is not None else None
    if gated is None:
        return None
    if not info.exists:
        return (f"has no container named {info.name} any more (removed or renamed since its "
                "health gate)")
    if info.container_id != gated[0]:
        return (f"runs another container than its health gate proved (id "
                f"{(gated[0] or '?')[:12]} then, {(info.container_id or '?')[:12]} now): "
                "replaced since its health gate")
    if _identity(info) != gated:
        how = (f"restarts {gated[2]} then, {info.restart_count} now; started "
               f"{info.started_at}: it crashed after the gate and its restart policy started "
               "it again" if info.restart_count != gated[2] else
               f"started {gated[1]} then, {info.started_at} now: it stopped or crashed after "
               "the gate and was started again")
        return f"was restarted since its health gate ({how}), so /health answering now " \
               "proves nothing"
    return None


def _identity(info: ContainerInfo) -> intents.Identity:
    """What tells one run of a container from the next: id, start time, restart count."""
    return info.container_id, info.started_at, info.restart_count


def not_stopping(env: Environment, serving: Slot, old: Slot, why: str,
                 old_info: ContainerInfo | None = None, *,
                 restarted: bool = False) -> ActFirstError:
    """The failed re-check of the serving slot (exit 6), in words true of the old slot: kept
    running to go back to, or not up either (both slots down: start it, then switch).
    `restarted`: the serving slot is not the container its gate proved, though it may answer
    now: besides the switch back, the way to finish once on-call judges it stable (a refusal
    alone would refuse every rerun: after a host's reboot, for ever)."""
    logs = f"`docker logs --tail 100 {env.slot(serving).container}`"
    back = f"`runbook switch {command_arg(env)} --slot {old}`"
    container = env.slot(old).container
    if old_info is None or old_info.running:
        keep = (f"; or, once `docker ps` shows {env.slot(serving).container} up for minutes "
                f"with no restart and you judge it healthy, stop the old slot yourself "
                f"(`docker stop {container}`) and run the same command again: it finishes "
                f"without stopping anything" if restarted else "")
        return ActFirstError(
            f"not stopping {container}: the {serving} slot, which now takes the traffic, "
            f"{why}; the old {old} slot is kept running so traffic can go back to it",
            f"switch back now: {back}; then read {logs}{keep}", exit_code=ExitCode.ATTENTION)
    if old_info.status == "paused":
        return ActFirstError(
            f"not stopping {container}: the {serving} slot, which now takes the traffic, "
            f"{why}; the old {old} slot is paused (kept so, to go back to)",
            f"unpause it: `docker unpause {container}`, then switch back: {back}; then read "
            f"{logs}", exit_code=ExitCode.ATTENTION)
    if not old_info.exists:
        port = env.slot(old).port
        state, fix = (f"has no container named {container} (removed or renamed)",
                      f"find the old one: `docker ps -a --filter publish={port}`; give it "
                      f"its name back (`docker rename`) and start it, then switch back: "
                      f"{back}")
    elif old_info.status == "restarting":
        state, fix = (f"is crash-looping ({container} is restarting)",
                      f"read `docker logs --tail 100 {container}` too; once one of them runs "
                      f"healthy, switch to it ({back} for the old one)")
    else:
        state, fix = (f"does not run either ({container} is {old_info.status})",
                      f"start the old one: `docker start {container}`, then switch back: "
                      f"{back}")
    return ActFirstError(
        f"both slots are down: the {serving} slot, which now takes the traffic, {why}, and "
        f"the old {old} slot {state}", f"{fix}; then read {logs}",
        exit_code=ExitCode.ATTENTION)


def _recheck(env: Environment, serving: Slot) -> health.HealthReport:
    """The serving slot's health, asked up to RECHECK_TRIES times until one answer is ok."""
    config = env.slot(serving)
    report = health.probe(config, env.health.path, env.health.request_timeout)
    for _ in range(RECHECK_TRIES - 1):
        if report.ok:
            break
        time.sleep(RECHECK_PAUSE)
        report = health.probe(config, env.health.path, env.health.request_timeout)
    return report


class _KeptForForce(Exception):
    """A forced run's new slot does not answer healthy: the old one is what traffic can go
    back to, so it is left running (not an error: the operator forced past the gate)."""


def stop_step(env: Environment, slot: Slot, enabled: bool, *, gated: bool = True,
              observed: Observed | None = None, down: str | None = None,
              planned: ContainerInfo | None = None) -> Step:
    """`gated`: the run's health gate passed (not --force), so the slot that now serves
    must still answer healthy before this one is stopped (check_still_healthy). A forced
    run (no gate) leaves the old slot running instead when the new one is not healthy: it
    forced past the gate on purpose, and stopping the slot users can go back to would make
    a bad outcome worse (found by review: old code forced onto a newer schema).
    `observed`: the run's, whose gate recorded the container it proved (a restart policy
    must not pass off a crashed and restarted one as it); a finishing run's holds what the
    interrupted run's record says of it (nothing, in a record an older version wrote).

    The serving slot is asked whatever state the old one is in (found by review: an old
    slot already down skipped the question, and both slots dead read "Done", exit 0).
    `down`: why the slot is down by the time this step runs (a restore's maintenance stop
    earlier in the run), said in place of a drain and a stop that will not happen (found by
    a plan-fidelity review: the plan showed both, the journal "container: already exited").
    `planned`: the old slot's container as the plan inspected it: the stop goes to its id,
    and another container given the name since (or one where the plan found none) is never
    stopped (None: whatever holds the name, as a plan that did not inspect it). One
    started with `docker run --rm` is deleted by its stop (`rm_kept`)."""
    container = env.slot(slot).container
    ident = planned.container_id if planned is not None and planned.exists else None
    action = docker.stop_action(container, ident=ident)

    def serving_now(ctx: StepContext, old_info: ContainerInfo | None = None) -> str:
        """The serving slot's answer, or why the old one is not stopped (raised)."""
        if gated:
            return check_still_healthy(env, slot.other, slot, observed, old_info, ctx.notice)
        moved = restarted_since_gate(env, slot.other, observed)
        report = _recheck(env, slot.other)
        if report.ok and moved is None:
            return report.status
        if report.ok and moved is not None and _nothing_to_keep(old_info):
            passed = _restarted_but_serving(env, slot.other, slot, moved, report, ctx.notice)
            if passed is not None:
                return passed
        why = moved or f"does not answer healthy ({report.status}: {report.reason()})"
        if old_info is not None and not old_info.running:
            if moved is not None or report.status == health.UNREACHABLE:
                raise not_stopping(env, slot.other, slot, why, old_info)  # nothing serves
            if not old_info.up:  # answers, if unhealthy, as forced; the old one is down
                return report.status
        raise _KeptForForce(
            f"the {slot.other} slot, forced past its health gate, {why}, so traffic can go "
            f"back to {slot} (`runbook switch {command_arg(env)} --slot {slot}`); stop it once "
            f"that is no longer needed: `docker stop {container}`")

    def run(ctx: StepContext) -> None:
        info = docker.inspect(container)
        kept: str | None
        if planned is not None and info.exists and (
                not planned.exists or info.container_id != planned.container_id):
            # after the commit nothing is undone: said, and nothing is stopped (a container
            # given the name since may be what someone is bringing up; the planned one is
            # no longer the slot's)
            said = (f"not stopping {container}: the {slot} slot's container changed since this "
                    f"run was planned ({_as_planned(planned)}, now {_described(info)}): check "
                    "who changed it (`docker events --since 1h --until 0s --filter "
                    f"container={container}`)"
                    + (f"; the planned one is not stopped either: once nothing needs it, "
                       f"`docker stop {_short(planned)}`" if planned.exists else ""))
            ctx.note(container=said)
            ctx.notice(said)
            ctx.result = "not stopped: another container"
            return
        left = rm_kept(env, slot, info)
        if left is not None:  # nothing is stopped, so there is nothing to drain or re-ask
            ctx.note(container=f"left running: {left}")
            ctx.notice(f"the old {slot} container is left running: {left}")
            ctx.result = "left running (--rm)"
            return
        if not info.running:
            # nothing to drain: it answers nobody. The serving slot is asked all the same,
            # before anything is stopped; then one paused or crash-looping is stopped
            # (`docker stop` ends a restart loop and stops a paused container)
            try:
                ctx.note(serving=serving_now(ctx, info))
            except _KeptForForce as why:
                kept = str(why)
            else:
                kept = None
                if not info.up:
                    ctx.note(container=f"already {info.status}" if info.exists
                             else f"absent: no container named {container}")
                    if (failing := h2c_left_on_a_dead_slot(env, slot, info)) is not None:
                        ctx.note(h2c=failing)
                        ctx.notice(failing)
                    if (back := comes_back(info)) is not None:
                        ctx.note(restart_policy=back)
                        ctx.notice(back)
                    if not info.exists:
                        port = env.slot(slot).port
                        ctx.notice(f"no container named {container}: renamed or removed by "
                                   "someone; one renamed may still run on the old "
                                   f"{slot} slot's port {port} (`docker ps --filter "
                                   f"publish={port}`): stop it yourself if it is the old "
                                   "slot; nothing else was stopped")
                        ctx.result = "no container of that name"
                    return
                kept = stop(env, slot, running=False, after_switch=True, ident=ident,
                            dials=None if observed is None else observed.dials_before)
        else:
            def drained(d: drain.Drain) -> None:
                ctx.note(drained=d.describe())
                # after the drain, the last moment before the stop; as inspected, so one in
                # the seconds of a crash loop it runs is no way back either (found in CI)
                ctx.note(serving=serving_now(ctx, info))

            try:
                kept = stop(env, slot, running=True, after_switch=True, on_drain=drained,
                            ident=ident,
                            dials=None if observed is None else observed.dials_before)
            except _KeptForForce as why:
                kept = str(why)
        if kept is not None:
            ctx.note(container=f"left running: {kept}")
            ctx.notice(f"the old {slot} container is left running: {kept}")
            ctx.result = "left running"
            return
        if info.auto_remove:  # Docker deletes it as it stops: never said "kept"
            ctx.note(container=f"removed by Docker (--rm) (was {info.status})")
            ctx.result = "removed by Docker (--rm)"
            return
        ctx.note(container=docker.inspect(container).status
                 + (f" (was {info.status})" if not info.running else ""))
        if (back := comes_back(info)) is not None:
            ctx.note(restart_policy=back)
            ctx.notice(back)

    guard = ("refused if Caddy sends traffic to it at that moment"
             + f"; kept running if the {slot.other} slot "
             + ("no longer answers healthy" if gated else
                "does not answer healthy (forced: its gate was skipped)")
             + " or is not the container its gate proved (restarted since); "
               "asked whether the old slot runs or not")
    details = ({"container": f"{container}: {down}", "guard": guard,
                "if running again": "(started by hand since) drained and stopped as any old "
                                    "slot"} if down is not None else
               {"container": container, "guard": guard,
                "drain": drain_plan(env, slot),
                "left running": "instead, when the drain ends with connections still open "
                                "and Caddy takes cleartext HTTP/2 (h2c) on the site's port: "
                                "those never move to the new config (said at the end); or "
                                "while a site outside the slot markers still dials its port",
                "command": action.as_planned()})
    title = f"Stop the old {slot} container (kept, not removed)"
    # not when the slot is down by this step (`down`): nothing is left to keep or delete
    # (found by review: a restore's plan titled a slot its stop deletes "Keep ... running")
    seen = None if down is not None else (
        planned if planned is not None else docker.inspect(container))
    if seen is not None and seen.auto_remove and seen.up:
        left = rm_kept(env, slot, seen)
        if left is not None:
            title = f"Keep the old {slot} container running (started with --rm)"
            details = {"container": container, "left running": left}
        else:
            title = f"Stop the old {slot} container (Docker removes it: --rm)"
            details["--rm"] = (f"docker stop removes it (it was started with --rm); a "
                               f"rollback to {slot} recreates it through compose")
    return Step("stop-old-slot", title,
                details, run=run, skip=None if enabled else "rollback.stop_old_slot = false",
                phase=Phase.FINISH)


def rm_kept(env: Environment, slot: Slot, info: ContainerInfo) -> str | None:
    """Why the old slot's container is left running instead of stopped (None: it is
    stopped as usual): it was started with `docker run --rm`, so Docker deletes it as it
    stops, and nothing here could make it again (compose.made_again: a `docker run` host).
    Stopped, it took the only way back with it, while the step said "kept, not removed"
    (found by review); left running, it holds its port and its build until on-call stops it.
    Not one that is down already: nothing is deleted by a stop of it."""
    if not info.auto_remove or not info.up:
        return None
    why = compose.made_again(env, slot, docker.inspect(env.slot(slot.other).container))
    if why is None:
        return None
    return (f"{info.name} was started with --rm, so `docker stop` would delete it, and {why}: "
            f"it is the way back to {info.image}; stop it yourself once no rollback to it "
            f"is needed: `docker stop {info.name}` (Docker then removes it)")


def down_when_planned(info: ContainerInfo, why: str = "") -> str | None:
    """stop_step's `down` for an old slot not up when the run is planned (None: it is up,
    so it is drained and stopped): its step only notes it, with no drain and no `docker
    stop` (found by a plan-fidelity review: the finish of a killed restoring rollback showed
    both for the slot its restore had stopped). `why`: how it came to be down, when known."""
    if info.up:
        return None
    said = (f"already {info.status}" if info.exists else "absent (no container of that name)")
    return f"{said} when this run was planned{why}; no drain and no `docker stop`: nothing runs"


def drain_plan(env: Environment, slot: Slot) -> str:
    """The drain as the plan shows it: what it waits for, and its fallbacks."""
    port, front = env.slot(slot).port, front_port(env)
    where = (f"every connection on Caddy's port {front} open at the stop has closed (or "
             "shown it is the new config's)" if front is not None
             else f"no byte moved on port {port} for {drain.QUIET:g}s, and at least "
                  f"{drain.PRECONNECT:g}s")
    return (f"wait until {where} and no request is pending on port {port}, at most "
            f"{env.drain_timeout:g}s ([rollback] drain_timeout_seconds); a side `ss` cannot "
            f"see is waited for instead (front: port {port} quiet {drain.QUIET:g}s and at "
            f"least {drain.PRECONNECT:g}s, the life of a connection with no request yet, as "
            f"when Caddy serves the app on more ports than {front or 'proxy_url'}'s; slot: at "
            f"least {drain.FALLBACK_GRACE:g}s)")


def _aside(said: str | None) -> Aside | None:
    return Aside(said) if said else None


UNDO_LOAD_TRIES = 3  # an undo's load refused (412) because Caddy changed again: decide again


Seen = tuple[int | None, str]  # the proxy's answer: (its HTTP status, None: none; what it was)


def _failing_before(witness: Probe[tuple[str | None, str | None, str | None, int | None]]
                    | None, before: Slot | None) -> Seen | None:
    """How the proxy failed the serving slot (`before`) just before the switch; None when it
    answered 200 as that slot, or not within a moment (never waited for long: users wait
    for the switch; a request still open at the reload may see either config)."""
    if witness is None or before is None:
        return None
    witness.settle(PROXY_BEFORE_WAIT)
    if not witness.done:
        return None
    try:
        header, error, unverifiable, status = witness.result()
    except Exception:  # unread: the undo says "could not be undone", as before
        return None
    if status == 200 and header == before.value:
        return None
    return status, (error or unverifiable
                    or f"HTTP {status}, {caddy.SLOT_HEADER}={header or '(none)'}")


PROXY_BEFORE_WAIT = 0.5  # seconds the switch waits, at most, for the proxy's answer before it


def _undo_switch(env: Environment, data: bytes, before: Slot | None, running: Any,
                 target: Slot, written: str, loaded: Any, refused: bool = False,
                 failing: Seen | None = None) -> Aside | None:
    """The switch's undo: decided first what to load (traffic.undo_config: over a change
    another environment made to Caddy since, only ours goes back, or nothing), then the
    previous Caddyfile put back and that loaded (caddy.restore), If-Match the config it was
    decided from: a change loaded in between is never dropped (refused, decided again).
    `refused`: Caddy refused the switch's own load (412), so only the file goes back.
    `failing`: the proxy's failed answer for `before` ahead of the switch (caddy.restore)."""
    if refused:
        return _aside(caddy.restore(env, data, before, written=written.encode("utf-8"),
                                    load=False))
    kept: str | None = None  # an edit kept aside by an attempt Caddy refused: said at the end
    for attempt in range(1, UNDO_LOAD_TRIES + 1):
        said, etag, config = None, None, running
        if running is not None:
            now, etag = caddy.running_config_tagged(env)
            if now is None and attempt > 1:
                # refused (412): another change runs, and what runs can no longer be read;
                # loading the config from before the switch unconditionally would drop it
                raise caddy.CaddyError(
                    "the undo's load was refused (Caddy's config changed since it was read) "
                    "and Caddy's config cannot be read again: nothing was loaded"
                    + (f"; {kept}" if kept else ""),
                    f"see who changes Caddy (`curl {env.caddy.admin_url}/config/`), then "
                    f"check `runbook status {command_arg(env)}`", stage="restore",
                    exit_code=ExitCode.ATTENTION)
            config, said = traffic.undo_config(env, running, before, target, loaded, now)
        try:
            aside = caddy.restore(env, data, before, config, written=written.encode("utf-8"),
                                  said=said, etag=etag, ran=running,
                                  failing=None if failing is None else caddy.answer_words(
                                      failing[0]))
        except caddy.CaddyConflictError as exc:
            kept = kept or exc.kept
            if attempt == UNDO_LOAD_TRIES:
                file = (f"{env.caddy.caddyfile} was put back" if exc.file_back else
                        f"{env.caddy.caddyfile} could not be written back either (it still "
                        "names the new slot: a Caddy restart or reload would load it)")
                raise caddy.CaddyError(
                    f"{exc.message} (the undo's load, {attempt} times: Caddy's config kept "
                    f"changing); {file}, Caddy's config was not"
                    + (f"; {kept}" if kept else ""),
                    f"see who changes Caddy (`curl {env.caddy.admin_url}/config/`), then "
                    f"check `runbook status {command_arg(env)}`", stage="restore",
                    exit_code=ExitCode.ATTENTION) from None
            continue
        # an edit kept aside by a refused attempt: the later ones found the file put back
        return _aside("; ".join(s for s in (kept, aside) if s) or None)
    raise AssertionError("unreachable")


def _refuse_unverifiable(env: Environment, target: Slot, serving: Slot | None) -> None:
    """With no slot header in the managed block, verification through the proxy sees the
    target only when the app sends the header itself: asked of the target directly (the
    plan asked the proxy, but a serving slot that is down answers nothing there)."""
    problem = caddy.slot_header_problem(env, target)
    if problem is not None:
        raise caddy.no_slot_header(env, serving, problem)


def _changed_since_plan(env: Environment) -> PreconditionError:
    """The Caddyfile was edited since the plan read it (by hand, or by another tool): the
    switch would load an edit nobody reviewed, or write over it."""
    return PreconditionError(
        f"{env.caddy.caddyfile} changed since the plan: the switch would write and load a "
        "file that is not the one the plan showed; nothing was changed",
        "check who edits it, then run the command again to see the plan for the file as it "
        "is now")


def _caddy_changed_since_plan(where: str) -> PreconditionError:
    """Caddy's running config changed after the plan read it (an emergency route loaded
    through its admin API during the gate): the load would drop it unseen."""
    return PreconditionError(
        f"Caddy's config changed since the plan (first at {where}): the switch loads the "
        "Caddyfile over the whole config, so that change would be dropped; nothing was "
        "changed",
        "run the command again: its plan shows the change (add it to the Caddyfile to keep it)")


def _host_key(host: str) -> str:
    return host.strip("[]").split("%")[0].lower()


def _addresses(host: str, port: int) -> frozenset[str]:
    """The addresses `host` resolves to here, as Caddy's dialer on this host resolves it
    (empty: it does not resolve here)."""
    import socket

    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return frozenset()
    return frozenset(str(info[4][0]).split("%")[0] for info in found)


def _unproven_upstreams(env: Environment, target: Slot, text: str) -> list[caddy.Upstream]:
    """The upstreams of `text`'s managed block on `target`'s port whose host is not the
    address the health gate asks (`[slots.<target>] host`, or one resolving to exactly its
    addresses): the gate proves nothing of them. The rewrite keeps each upstream's host and
    puts the target's port on it."""
    config = env.slot(target)
    want = _host_key(config.host)
    try:
        upstreams = caddy.inspect(text, env).upstreams
    except RunbookError:
        return []  # a block the rewrite cannot read is refused on its own
    out: list[caddy.Upstream] = []
    for up in upstreams:
        if up.slot != target or up.host is None:
            continue
        host = _host_key(up.host)
        if host == want:
            continue
        mine = _addresses(host, config.port)
        if mine and mine == _addresses(want, config.port):
            continue
        out.append(up)
    return out


def _docker_host(env: Environment, host: str) -> frozenset[str] | None:
    """The addresses `host` (host.docker.internal, which this host cannot resolve) leads to
    as Caddy's container resolves it (`docker exec NAME getent hosts`, read only). Empty:
    it does not resolve there (getent's exit 2, "not found"), an answer too. None: not
    asked (Caddy's command is no `docker exec`) or no answer (no getent in its image, the
    container not running): where it leads is then only guessed (`_docker_host_reach`)."""
    name = caddy_command.exec_container(env.caddy.command)
    if name is None:
        return None
    try:
        code, out = docker.exec_run(name, ["getent", "hosts", host], timeout=5)
    except RunbookError:
        return None
    if code == 2:
        return frozenset()
    found = frozenset(_host_key(line.split()[0]) for line in out.splitlines() if line.split())
    return found if code == 0 and found else None


def _docker_host_reach(env: Environment, target: Slot, host: str) -> bool | None:
    """Whether Caddy in a container reaches `target` at `host`, a name only its container
    resolves (host.docker.internal). Refused (False) only on Caddy's container's answer
    (found by review: a guess refused every switch and rollback on a host where the name
    leads elsewhere): it does not resolve the name, or the slot is published neither on
    every address nor on one the name leads to. On the host's network the slot listens on
    every address. Not asked: Docker's bridge gateway (where `host-gateway` leads unless
    the daemon's `host-gateway-ip` says otherwise) lets a slot published there through;
    else None: not known, and the switch goes ahead as before this check."""
    config = env.slot(target)
    leads = _docker_host(env, host)
    if leads == frozenset():
        return False
    info = docker.inspect(config.container)
    if info.bindings is None:
        return True if info.exists else None
    ips = {_host_key(ip) for _inside, port, ip in info.bindings if port == config.port}
    if ips & {"", "0.0.0.0", "::"}:
        return True
    if leads is not None:
        return bool(ips & leads)
    return True if ips & (docker.bridge_gateways() or frozenset()) else None


def _unresolved(env: Environment, target: Slot,
                unproven: list[caddy.Upstream]) -> str | None:
    """Why the switch's upstreams cannot reach `target`: Caddy's container does not resolve
    a host only it would (getent: not found), wherever the slot is published; or None."""
    port = env.slot(target).port
    for up in unproven:
        host = _host_key(up.host or "")
        if _only_in_container(host, port) and _docker_host(env, host) == frozenset():
            name = caddy_command.exec_container(env.caddy.command)
            return (f"the Caddyfile's upstream {up.host}:{port} (line {up.line}, after the "
                    f"switch) reaches no {target} slot: Caddy's container {name} cannot "
                    f"resolve {up.host} (`docker exec {name} getent hosts {up.host}`: not "
                    f"found; an `--add-host {up.host}:host-gateway` on it makes it "
                    "resolve), so the switch would send every user to a name Caddy "
                    "cannot dial")
    return None


def _only_in_container(host: str, port: int) -> bool:
    """A name Caddy dials this host by that this host cannot resolve (host.docker.internal):
    resolved in Caddy's container only."""
    return host in caddy.THIS_HOST_NAMES and not _addresses(host, port)


def unchecked_upstreams(env: Environment, target: Slot, text: str) -> list[str]:
    """The upstreams of `text` on `target`'s port that lead where no one can tell (a name
    only Caddy's container resolves, it not saying where, and the slot not published on
    Docker's bridge gateway, the guess): not refused, said in the plan."""
    port = env.slot(target).port
    hosts = dict.fromkeys(_host_key(up.host or "")
                          for up in _unproven_upstreams(env, target, text))
    return [f"{host}:{port}" for host in hosts if _only_in_container(host, port)
            and _docker_host_reach(env, target, host) is None]


def _unpublished(env: Environment, target: Slot,
                 unproven: list[caddy.Upstream]) -> str | None:
    """A target that does not answer yet (stopped, to be started by the run): refused
    already when Docker publishes its port only on addresses none of the upstream hosts
    resolves to here, or a name only Caddy's container resolves leads to (then it cannot
    answer there once started); else None, and the switch asks it right before the write."""
    config = env.slot(target)
    bindings = docker.inspect(config.container).bindings
    ips = {_host_key(ip) for _inside, host, ip in bindings or () if host == config.port}
    if not ips or ips & {"", "0.0.0.0", "::"}:
        return None  # on the host's network, or on every address: asked once it runs
    for up in unproven:
        host = _host_key(up.host or "")
        if _only_in_container(host, config.port):
            if _docker_host_reach(env, target, host) is not False:
                continue
        elif _addresses(host, config.port) & ips:
            continue
        published = ", ".join(f"[{ip}]" if ":" in ip else ip for ip in sorted(ips))
        return (f"the Caddyfile's upstream {up.host}:{config.port} (line {up.line}, "
                f"after the switch) reaches no {target} slot ({config.container} is "
                f"published on {published}:{config.port} only), but [slots.{target}] "
                f"host is {config.host}, where the health gate asks {target}: the switch "
                f"would send every user where {target} does not listen")
    return None


def _loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: in a container, the container itself."""
    import ipaddress

    key = _host_key(host).rstrip(".")
    if key == "localhost" or key.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(key).is_loopback
    except ValueError:
        return False


def _caddy_off_host_network(env: Environment) -> tuple[str, bool] | None:
    """(why, known) Caddy's loopback is not this host's, or None (Caddy on the host, or in a
    container Docker says shares the host's network). Caddy runs in a container when
    `[caddy] command` goes through docker or `container_path` is set; its network is read
    from Docker (HostConfig.NetworkMode), and one that cannot be read fails closed
    (`known` False)."""
    if not caddy_command.runs_in_container(env) and env.caddy.container_path is None:
        return None
    if caddy_command.runs_podman(env.caddy.command):  # never Docker's container of its name
        return ("Caddy runs in a podman container ([caddy] command), which the runbook cannot "
                "inspect through Docker's engine, so whether it is on the host's network is "
                "not known", False)
    name = caddy_command.exec_container(env.caddy.command)
    try:
        if name is None and (service := caddy_command.compose_exec_service(
                env.caddy.command)) is not None:
            # `docker compose exec SERVICE` (or docker-compose's): its one running container,
            # by Compose's labels
            # (found by review of the first version: every compose-run Caddy was refused)
            project, svc = service
            running = [found for found in docker.labelled(
                {"com.docker.compose.service": svc,
                 **({"com.docker.compose.project": project} if project else {})})
                if found[2] == "running"]
            if len(running) == 1:
                name = running[0][1]
        if name is None:
            return ("Caddy runs in a container ([caddy] command or container_path) that [caddy] "
                    "command does not name as one running container (`docker exec NAME caddy`, "
                    "or `docker compose [-p PROJECT] exec SERVICE caddy` with one running "
                    "container of that service), so whether it is on the host's network cannot "
                    "be read from Docker", False)
        info = docker.inspect(name)
    except RunbookError as exc:
        return (f"Caddy's container {name} could not be inspected ({exc.message}), so "
                "whether it is on the host's network is not known", False)
    if not info.exists:
        return (f"Caddy's container {name} is not on the Docker engine the runbook inspects, "
                "so whether it is on the host's network is not known", False)
    mode = info.network_mode or ""
    if mode.startswith("container:"):  # another container's network (compose `service:x`)
        owner = mode.split(":", 1)[1]
        try:
            shared = docker.network_mode_of(owner)
        except RunbookError as exc:
            return (f"Caddy's container {name} shares the network of container {owner}, "
                    f"which could not be inspected ({exc.message}), so whether it is on the "
                    "host's network is not known", False)
        if shared is None:
            return (f"Caddy's container {name} shares the network of container {owner}, "
                    "which Docker does not know, so whether it is on the host's network is "
                    "not known", False)
        mode = shared  # one hop: Docker never chains them
    if mode == "host":
        return None
    return (f"Caddy's container {name} is on Docker network {mode}, not the host's", True)


def _caddy_listens_on(env: Environment, host: str, port: int) -> bool:
    """Whether Caddy's running config serves a site of its own on `host`:`port` (a relay,
    whose routes dial elsewhere): a loopback upstream there reaches that site, not nothing.
    Never the site whose routes dial that port itself (the one being switched: a loop to
    itself, found by review). Not known (Caddy not read) is no."""
    from runbook.caddy.switch import running_config

    try:
        return traffic.relay_listens_at(running_config(env), host, port)
    except RunbookError:
        return False


def _loopback_upstream(env: Environment, target: Slot, text: str) -> str | None:
    """An upstream of `text` on `target`'s port at a loopback host, while Caddy runs off the
    host's network: there it dials its own container, never the slot (found by review: the
    health gate's 127.0.0.1 passed as "the slot", the switch sent every user to Caddy
    itself, 502 until verification undid it). None: no such upstream, or Caddy's loopback
    is this host's."""
    try:
        upstreams = caddy.inspect(text, env).upstreams
    except RunbookError:
        return None  # a block the rewrite cannot read is refused on its own
    loops = [up for up in upstreams if up.slot == target and up.host and _loopback(up.host)]
    if not loops or (off := _caddy_off_host_network(env)) is None:
        return None
    (why, known), up, port = off, loops[0], env.slot(target).port
    if known and _caddy_listens_on(env, up.host or "127.0.0.1", port):
        return None  # a site of Caddy's own on that port (a relay to the slot, in its
        # container): what it reaches is judged by the switch's verification, as before
    return (f"the Caddyfile's upstream {up.host}:{port} (line {up.line}, after the switch) "
            + (f"is not the {target} slot on this host: {why}, and there {up.host} is "
               "Caddy's own container, so the switch would send every user where nothing "
               "listens" if known else
               f"cannot be proven to be the {target} slot on this host: {why}, and off the "
               f"host's network {up.host} is Caddy's own container, where nothing listens"))


def upstream_problem(env: Environment, target: Slot, text: str, *,
                     planning: bool = False) -> str | None:
    """Why the switch's Caddyfile (`text`) would send users where `target` does not listen,
    or None. The health gate asks the slot at `[slots.<slot>] host`, but Caddy dials each
    upstream's own host (found by review: a slot published on [::1] or 127.0.0.2 passed its
    gate, then Caddy dialed localhost:PORT, where nothing listened: 502s until verification
    undid it, on every try). Each upstream on another host must answer as `target` there
    (an answer naming no slot, as a minimal /health, counts: the port is the target's); a
    name this host cannot resolve (host.docker.internal, resolved in Caddy's container)
    only where Docker publishes the port on every address or where the name leads, and
    never when Caddy's container cannot resolve it (not refused when where it leads is
    not known: `_docker_host_reach`). A loopback upstream of a Caddy off the host's
    network is refused whatever answers here (`_loopback_upstream`). `planning`: only when
    the target answers already (else asked again right before the write)."""
    if (loopback := _loopback_upstream(env, target, text)) is not None:
        return loopback
    config = env.slot(target)
    unproven = _unproven_upstreams(env, target, text)
    if not unproven:
        return None
    if (unresolved := _unresolved(env, target, unproven)) is not None:
        return unresolved
    if planning and health.probe(config, env.health.path,
                                 env.health.request_timeout).http_status is None:
        return _unpublished(env, target, unproven)
    for up in unproven:
        host = _host_key(up.host or "")
        report = health.probe(dataclasses.replace(config, host=host), env.health.path,
                              env.health.request_timeout)
        if report.http_status is not None and report.reported_slot in (None, str(target)):
            continue
        if _only_in_container(host, config.port) \
                and _docker_host_reach(env, target, host) is not False:
            continue
        seen = (f"it answers as {report.reported_slot}" if report.http_status is not None
                else report.error or report.status)
        return (f"the Caddyfile's upstream {up.host}:{config.port} (line {up.line}, after the "
                f"switch) reaches no {target} slot ({seen}), but [slots.{target}] host is "
                f"{config.host}, where the health gate asks {target}: the switch would send "
                f"every user where {target} does not listen")
    return None


def dial_miss(env: Environment, slot: Slot, dials: tuple[str, ...]) -> tuple[str, str] | None:
    """(a dial of Caddy's running config on `slot`'s port at another host than [slots]
    host, what asking the slot there met) where nothing answers at that address from this
    host; None when each such dial answers or does not resolve here, or Caddy is not on this
    host's network (what it reaches from its container cannot be asked from here). Found
    by review: slots on [::1] only, Caddy dialing localhost:PORT (127.0.0.1 first): status
    blamed the proxy's transport, though the upstream's address reaches no slot."""
    config = env.slot(slot)
    others = [d for d in dials if traffic.dial_port(d) == config.port
              and traffic.dial_host(d) not in ("", _host_key(config.host))]
    if not others or _caddy_off_host_network(env) is not None:
        return None
    for dial in others:
        if not _addresses(traffic.dial_host(dial), config.port):
            # a name only Caddy's container resolves (its --add-host host.docker.internal
            # on the host's network): this host cannot ask it, so nothing is said of it
            # (found by review: "nothing answers" there overrode the proxy's real fault)
            continue
        report = health.probe(dataclasses.replace(config, host=traffic.dial_host(dial)),
                              env.health.path, env.health.request_timeout)
        if report.http_status is None:
            return dial, report.error or report.status
    return None


def refuse_upstream(env: Environment, target: Slot, problem: str) -> PreconditionError:
    """The refusal of upstream_problem's `problem`, with its fix: for a Caddy off the host's
    network, the form its upstreams reach this host by (`_off_host_fix`), never the health
    gate's address (found by review: "127.0.0.1:PORT, the address Caddy reaches" was Caddy's
    own container there)."""
    config = env.slot(target)
    if _caddy_off_host_network(env) is not None:
        return PreconditionError(f"{problem}; nothing was changed", _off_host_fix(env, target))
    return PreconditionError(
        f"{problem}; nothing was changed",
        f"write the upstream between the slot markers of {env.caddy.caddyfile} as the "
        f"address Caddy reaches {target} at ({config.base_url.removeprefix('http://')}), or "
        f"set [slots.{target}] host to the address Caddy dials (and publish the slot there), "
        "then run again")


def reach_fix(env: Environment, target: Slot, then: str) -> str:
    """How to write the upstream between the slot markers so Caddy reaches `target` by the
    port it publishes (the one way the runbook tells the slots apart), then `then`: for a
    Caddy off the host's network, `_off_host_fix`'s form; else the slot's own address on
    this host (`caddy.slot_address`). For an upstream the runbook cannot read as a slot
    (a container's name on Docker's network: caddytruth LOW 5)."""
    if _caddy_off_host_network(env) is not None:
        return _off_host_fix(env, target, then)
    return (f"write the upstream between the slot markers of {env.caddy.caddyfile} as "
            f"{caddy.slot_address(env, target)}; {then}")


def slot_upstream(env: Environment, slot: Slot | None = None) -> str:
    """How a slot is dialed, as a fix names it (`slot`: that slot's, with its port; None:
    each slot's, `<port>`): the slots' own address on this host, or, for a Caddy off the
    host's network, the form `_off_host_fix` explains (host.docker.internal). Found by
    review (caddytruth LOW 5): "localhost:<port>" there is Caddy's own container, and on a
    host publishing its slots on [::1] only, nothing."""
    if _caddy_off_host_network(env) is None:
        return caddy.slot_address(env, slot)
    if slot is None:
        return ("host.docker.internal:<port> (`--add-host host.docker.internal:host-gateway` "
                "on Caddy's container, each slot's port published where that leads)")
    form, said, published = _off_host_form(env, slot)
    return (f"{form}{said}, with {slot}'s port {env.slot(slot).port} published where that "
            f"leads from Caddy's container (on 0.0.0.0, or on Docker's bridge gateway"
            f"{published})")


def reach(env: Environment) -> caddy.Reach:
    """slot_upstream as the words runbook/caddy's refusals and fixes name an upstream by
    (asked only when one is said: it may ask Docker where Caddy runs)."""
    return lambda slot: slot_upstream(env, slot)


def _off_host_fix(env: Environment, target: Slot, then: str = "then run again") -> str:
    """How a Caddy in a container off the host's network reaches `target`: `_off_host_form`,
    the slot published where that leads (as the serving slot is); or Caddy on the host's
    network. `then`: what follows."""
    port = env.slot(target).port
    form, said, published = _off_host_form(env, target)
    named = ("" if caddy_command.exec_container(env.caddy.command) is not None else
             " (if it is on it already, name its container in [caddy] command, `docker exec "
             "NAME caddy`, so Docker can say so)")
    return (f"write the upstream between the slot markers of {env.caddy.caddyfile} as {form}"
            f"{said}, publish {target}'s port {port} where that leads from Caddy's container "
            f"(on 0.0.0.0, or on Docker's bridge gateway{published}), or run Caddy on the "
            f"host's network (--network host){named}; {then}")


def _off_host_form(env: Environment, target: Slot) -> tuple[str, str, str]:
    """(the upstream, what it takes, where the serving slot is published) by which a Caddy in
    a container off the host's network reaches `target`: the host part the serving slot is
    dialed at in Caddy's running config (not a loopback one) with the target's port, else
    host.docker.internal (with its --add-host)."""
    serving, port = target.other, env.slot(target).port
    form, said = f"host.docker.internal:{port}", " (with `--add-host host.docker.internal:" \
                                                 "host-gateway` on Caddy's container)"
    with contextlib.suppress(RunbookError):
        want = str(env.slot(serving).port)
        for dial in traffic.managed_dials(env, traffic.loaded_config(env)):
            host = traffic.dial_host(dial)
            if dial.rpartition(":")[2] == want and host and not _loopback(host):
                form = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                said = f" (as Caddy's running config dials {serving})"
                break
    published = ""
    with contextlib.suppress(RunbookError):
        serving_port = env.slot(serving).port
        ips = sorted({ip or "0.0.0.0" for _inside, host_port, ip in
                      docker.inspect(env.slot(serving).container).bindings or ()
                      if host_port == serving_port and not _loopback(ip or "0.0.0.0")})
        if ips:
            published = f", as {serving} is on {', '.join(ips)}"
    return form, said, published


def switch_step(env: Environment, target: Slot, expected_version: str,
                observed: Observed, *, planned: caddy.SwitchPlan | None = None,
                validated: str | None = None) -> tuple[Step, str]:
    """The commit: point Caddy at `target`, reload, verify through the proxy.

    Its undo (registered once the file is written) puts back the Caddyfile that matches what
    Caddy ran before, reloads it and proves the proxy answers from that slot again.
    `planned`: the switch as the planner already computed it. `validated`: the candidate text
    pre-flight had Caddy validate; when the switch writes exactly those bytes, Caddy is not
    asked the same question again (any other text is validated here).
    """
    sp = planned or caddy.plan_switch(env, target, reach(env))
    # built once, from the plan's reading of Caddy: shown here, run by the switch (which
    # refuses when Caddy's config changed since that reading: caddy_changed_since)
    reload_command = sp.command or caddy.reload_command(env, sp.running)
    try:
        sp_upstreams = [u for u in caddy.inspect(sp.new_text, env).upstreams if u.slot == target]
    except RunbookError:
        sp_upstreams = []
    details = {
        "Caddyfile": str(sp.caddyfile),
        "now": str(sp.current.slot or "inconsistent: " + "; ".join(sp.current.problems)),
        "target": f"{target} -> " + (", ".join(dict.fromkeys(
            f"{u.host}:{sp.target_port}" for u in sp_upstreams if u.host))
            or f"port {sp.target_port}"),
        "validate": caddy.shown(sp.reload, sp.validate_command)
                    + (" (in pre-flight, the same bytes)" if validated is not None else ""),
        "reload": f"{sp.reload}: " + reload_command.display(
            tagged=None if sp.running is None else sp.etag is not None)
        + (f"; {reload_command.note}" if reload_command.note else ""),
        "verify": f"GET {sp.verify_url}: X-Togather-Slot={target}, version={expected_version}",
        "on failure": "put back the Caddyfile matching what Caddy ran before, and load back "
                      "the config Caddy ran (its JSON, read just before the write); if Caddy's "
                      "config changed since the switch loaded it (another environment's "
                      "switch), only this environment's upstreams are pointed back, or, "
                      "not told apart, nothing is loaded (exit 5)",
    }
    if sp.current.warnings:  # e.g. another service's upstream between the markers, kept
        details["warnings"] = "; ".join(sp.current.warnings)
    if (problem := upstream_problem(env, target, sp.new_text, planning=True)) is not None:
        raise refuse_upstream(env, target, problem)
    if unproven := _unproven_upstreams(env, target, sp.new_text):
        details["upstream"] = (
            f"{', '.join(f'{u.host}:{sp.target_port}' for u in unproven)} (not [slots."
            f"{target}] host {env.slot(target).host}): asked to answer as {target} right "
            "before the write (else refused, nothing changed)")
        if unchecked := unchecked_upstreams(env, target, sp.new_text):
            details["upstream"] += (
                f"; where {', '.join(unchecked)} leads was not checked (this host does not "
                "resolve it, Caddy's container was not asked or did not say, and the slot "
                "is not published on Docker's bridge gateway, where it usually leads): not "
                "refused")

    def run(ctx: StepContext) -> None:
        # who is on Caddy's port before the reload, read beside this step's own work (the
        # drain of the old slot sorts the old config's connections by it: runbook/drain.py)
        watch = drain.before_reload(env.caddy.proxy_url)
        old_bytes = caddy.read_bytes(env)
        old = old_bytes.decode("utf-8")
        if old != sp.old_text:  # what would be written is not the change the plan showed
            raise _changed_since_plan(env)
        new = caddy.rewrite(old, env, target)
        caddy.check_imports(env, new)  # an imported file may have changed since the plan
        try:  # what Caddy runs: the undo loads it back as it was (caddy.restore)
            # and its ETag: the load below is If-Match it, so a change loaded into Caddy
            # after the check just below (another environment's switch) is never dropped
            running, etag = traffic.loaded_config_tagged(env)
            ran = traffic.from_config(env, running,
                                      lambda: traffic.outside_addresses(env, running))
            before, answered = ran.slot, True
            observed.dials_before = ran.dials  # how Caddy dials the old slot: its drain
        except traffic.TrafficUnknownError:
            running, etag, before, answered = None, None, None, False
        # the proxy's answer for the slot that serves, before anything changes, asked beside
        # the checks below: when it fails already, an undo that puts back exactly what ran
        # and meets the same failure is clean (caddy.restore), not "could not be undone"
        witness = (Probe(lambda: traffic.ask_proxy(env), "proxy-before")
                   if before is not None and running is not None else None)
        # a down Caddy must never look like a switch (the config just read answered: the
        # same GET is not sent twice; systemd is still asked when it reloads)
        caddy.check_running(env, admin_answered=answered)
        if new != old and new != validated:  # first: a file Caddy rejects is said as that
            caddy.validate(env, new)
        if running is not None:  # a site loaded into Caddy during the gate is not dropped
            preflight.sites_dropped_now(env, new, running)
        if answered and (where := caddy.caddy_changed_since(sp, running)) is not None:
            raise _caddy_changed_since_plan(where)  # nor a route, a handler, a TLS setting
        if not caddy.inspect(old, env).headers:
            _refuse_unverifiable(env, target, before)
        if (problem := upstream_problem(env, target, new)) is not None:
            raise refuse_upstream(env, target, problem)
        # What to put back: the file as consistent with what runs (a killed run may have
        # written the disk without reloading).
        restore_bytes = (caddy.rewrite(old, env, before).encode("utf-8") if before is not None
                         else old_bytes)
        failing = _failing_before(witness, before)
        ctx.fault("switch.before-write")
        ctx.stop_if_signalled()  # the last moment nothing needs undoing
        backup = caddy.write_backup(env, restore_bytes)
        if caddy.read_bytes(env) != old_bytes:  # an edit during this step: never overwritten
            raise _changed_since_plan(env)
        observed.sent_to_target = True  # from the write on: a Caddy may watch its file
        if new != old:
            owner = caddy.write_config(env, new)
            if owner is not None:  # written, but by a user that cannot give it away
                ctx.note(caddyfile_owner=owner)
        loaded: list[Any] = []  # what the reload loaded: its undo goes back over it alone
        refused: list[bool] = []  # Caddy refused the load (412): it still runs what it ran
        ctx.on_failure(CADDY_UNDO + (f" (traffic back on {before})" if before else ""),
                       lambda: _undo_switch(env, restore_bytes, before, running, target,
                                            new, loaded[0] if loaded else None,
                                            refused=bool(refused), failing=failing))
        ctx.fault("switch.after-write")
        try:
            # an h2c front: the reading before the reload is waited for (a dropped one
            # leaves the old slot running); elsewhere it only makes the drain quicker
            h2c = running is not None and traffic.accepts_h2c(traffic.h2c_listens(running),
                                                              front_port(env))
            caddy.reload(env, new, reload_command, switch=watch, etag=etag,
                         seal_wait=drain.H2C_SEAL_WAIT if h2c else drain.SEAL_WAIT)
        except caddy.CaddyConflictError:
            refused.append(True)
            raise
        loaded.append(caddy.running_config(env))
        # how Caddy dials the target: the drain before an undo's stop of it
        observed.dials_loaded = (None if loaded[0] is None
                                 else tuple(dict.fromkeys(traffic.every_dial(loaded[0]))))
        ctx.fault("switch.after-reload")
        result = caddy.verify(env, target, expected_version, quick=True)
        if not result.ok:
            # the proxy answered the serving slot with an error too: Caddy's, not the target's
            fix = (traffic.proxy_side_fix(env) if failing is not None and (failing[0] or 0) >= 500
                   else f"check `docker logs --tail 100 {env.slot(target).container}` and that "
                   f"{env.caddy.proxy_url} reaches Caddy")
            raise caddy.CaddyError(f"verification failed: {result.describe()}" + (
                f"; before the switch the proxy already failed for {before} ({failing[1]})"
                if failing is not None else ""), fix, stage="verify")
        ctx.commit()
        ctx.fault("switch.after-verify")
        observed.verified = result.describe()
        ctx.note(verified=result.describe(), backup=str(backup or "-"))

    return Step("switch", f"Switch Caddy to the {target} slot", details, run=run,
                phase=Phase.COMMIT), sp.diff
