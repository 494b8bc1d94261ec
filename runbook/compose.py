"""The Compose adapter: build the exact command a host runs, then run it.

Kept separate (as Kamal does) so `--dry-run` can print the very argument list that execution
would use. Only the target service is ever touched: never `down`, which would stop the
shared database too.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from runbook.docker import ContainerInfo, DockerAction
from runbook.environment import Environment, Slot, command_arg
from runbook.errors import ExitCode, PreconditionError, RunbookError


class ComposeError(RunbookError):
    exit_code = ExitCode.FAILED_SAFELY


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables (never secrets)

    def display(self) -> str:
        import shlex

        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env)
        return (prefix + " " if prefix else "") + shlex.join(self.argv)


def check_recreate(env: Environment, slot: Slot, image: str, why: str = "", *,
                   action: str) -> None:
    """Pre-flight for a plan that recreates `slot` for `action` (rollback, switch, deploy): is
    there a compose file and service to do it.

    Hosts whose slots were started with `docker run` have neither; then only the operator knows
    how the container was created, so the plan stops (exit 4) before anything changes. A
    rollback or a switch runs again once the slot is recreated by hand; a deploy always
    recreates, so sending it back there loops: it is the host's own deploy, or compose.
    """
    config = env.slot(slot)
    no_file = _file_missing(env)  # read once: the deploy's fix below names it from this
    missing = [m for m in (no_file, _no_service(env, slot)) if m is not None]
    if not missing:
        return
    where = env.source or "the environment file"
    lacks = f"this host has no compose to do it: {'; '.join(missing)}"
    if action == "deploy":  # deploys alternate: the keys both slots' recreates need
        keys = [*(["[compose] file (the compose file that makes the slots)"]
                  if no_file is not None else []),
                *(f"[slots.{s}] service" for s in Slot if not env.slot(s).service)]
        raise PreconditionError(
            f"`runbook deploy` recreates slot {slot}'s container {config.container} with "
            f"{image}, but {lacks}; nothing was changed",
            f"{_own_deploy(env, image, slot)}; or give this host compose for it: set "
            f"{' and '.join(keys)} in {where}")
    because = f" ({why})" if why else ""
    raise PreconditionError(
        f"slot {slot}'s container {config.container} must be recreated with {image}{because}, "
        f"but {lacks}",
        f"recreate {config.container} with {image} the way it was created (e.g. its `docker "
        f"run` command, port {config.port}), then run the {action} again; or set [compose] "
        f"file and [slots.{slot}] service in {where}")


def _file_missing(env: Environment) -> str | None:
    """Why this host has no usable compose file (None: it has one): its own answer, so a
    deploy's fix names `[compose] file` from it, never by matching a message's wording."""
    file = env.compose.file
    if file is None:
        return "[compose] file is not set"
    try:
        if not file.is_file():
            return f"the compose file {file} does not exist"
    except OSError as exc:  # a directory this user cannot search: never a crash here
        return f"the compose file {file} cannot be read here ({exc.strerror})"
    return None


def _no_service(env: Environment, slot: Slot) -> str | None:
    """Why compose has no service to recreate `slot` with (None: it has one)."""
    return None if env.slot(slot).service else f"[slots.{slot}] service is not set"


def _missing(env: Environment, slot: Slot) -> list[str]:
    """What this host lacks for compose to recreate `slot` (nothing: it can)."""
    return [m for m in (_file_missing(env), _no_service(env, slot)) if m is not None]


def can_recreate(env: Environment, slot: Slot | None = None) -> bool:
    """Whether compose can recreate `slot` here (default: both slots, so `runbook deploy`
    can work)."""
    return not any(_missing(env, s) for s in ((slot,) if slot is not None else Slot))


def deploy_hint(env: Environment, version: str = "<version>") -> str:
    """How on-call puts `version` on a slot here: `runbook deploy` needs compose; on a host
    whose slots were made by `docker run` it refuses, so naming it would send on-call round
    in a circle: there it is the host's own way, then `runbook switch`."""
    if can_recreate(env):
        return f"`runbook deploy {command_arg(env)} --version {version}`"
    return _own_deploy(env, version)


def _own_deploy(env: Environment, what: str, slot: Slot | None = None) -> str:
    """The host's own deploy of `what` into `slot` (None: the standby), then the switch to it:
    how a version goes live where `runbook deploy` has no compose."""
    into = (f"slot {slot}'s container {env.slot(slot).container} (port {env.slot(slot).port})"
            if slot is not None else "the standby slot's container")
    return (f"run {what} in {into} the way this host's own deploy does (its `docker run`: "
            f"`runbook deploy` needs compose, which this host has not), then "
            f"`runbook switch {command_arg(env)} --slot {slot or '<that slot>'}`")


PROJECT_LABEL = "com.docker.compose.project"
ONEOFF_LABEL = "com.docker.compose.oneoff"  # "True" on `docker compose run` containers


def check_project(env: Environment, *containers: ContainerInfo) -> None:
    """Refuse a recreate under another compose project than the one that created the slots.

    Why: the environment's project (`-p`) is a guess from its name (togather-<env>) unless
    set; the host's own tooling may use another (COMPOSE_PROJECT_NAME). Compose would then
    try to create a second container of the same name, and fail mid-plan. The label Docker
    keeps on each container is the truth."""
    for info in containers:
        label = (info.labels or {}).get(PROJECT_LABEL)
        if info.exists and not label:
            # made by `docker run` (no compose label), though a compose file is configured:
            # compose would make a container of its own (its network, env, labels) or fail
            # on the name mid-run; only the operator knows how this one was made
            raise PreconditionError(
                f"container {info.name} was not created by compose (it has no "
                f"{PROJECT_LABEL} label): a recreate through compose would not make it the "
                "way it was made; nothing was changed",
                f"recreate it the way it was created (its `docker run` command), or leave "
                f"[compose] file out of {env.source or 'the environment file'} on this host")
        if info.exists and label and label != env.compose.project:
            raise PreconditionError(
                f"container {info.name} was created by compose project {label!r}, but the "
                f"environment's is {env.compose.project!r}: a recreate would run under the "
                "wrong project",
                f"set [compose] project = \"{label}\" in {env.source or 'the environment file'}")


def check_project_of(env: Environment, slot: Slot, target: ContainerInfo,
                     other: ContainerInfo, image: str, *, action: str) -> None:
    """check_project for a recreate of `slot`: its own container's label, or, when it was
    removed, the other slot's (the project that made the slots). An other slot made by `docker
    run` means this host makes its slots that way: the refusal is then about the absent slot,
    the one to recreate. Found by review: it was the other container's refusal as it is,
    "container <the serving one> was not created by compose ... recreate it", which reads
    at 3 a.m. as "recreate the container users reach" (an outage)."""
    if target.exists:
        check_project(env, target)
        return
    if other.exists and not (other.labels or {}).get(PROJECT_LABEL):
        raise absent_made_by_docker_run(env, slot, image, other, action=action)
    check_project(env, other)


def absent_made_by_docker_run(env: Environment, slot: Slot, image: str, other: ContainerInfo,
                              *, action: str) -> PreconditionError:
    """The refusal of a recreate of `slot`'s absent container through compose where the
    other slot's container was made by `docker run`: it names `slot` as the one to recreate,
    never the other one (which serves when up)."""
    config, where = env.slot(slot), env.source or "the environment file"
    serves = ", which serves," if other.up else ""
    never = f"never {slot.other}" + (" (it serves)" if other.up else "")
    if action == "deploy":  # a deploy recreates its slot whatever it finds: a loop
        fix = (f"run {image} in {slot}'s container ({config.container}) on port {config.port} "
               f"the way {slot.other}'s was made (its `docker run` command), {never}, then "
               f"`runbook switch {command_arg(env)} --slot {slot}`")
    else:
        fix = (f"recreate {slot} ({config.container}) with {image} on port {config.port} the "
               f"way {slot.other}'s was made (its `docker run` command), {never}; then run "
               f"the {action} again")
    return PreconditionError(
        f"slot {slot}'s container {config.container} is absent and must be recreated with "
        f"{image} on port {config.port}; this host makes its slots with `docker run` "
        f"({slot.other}'s container {other.name}{serves} has no {PROJECT_LABEL} label): "
        f"compose would not make {slot} the way {slot.other} was made; nothing was changed",
        f"{fix}; or leave [compose] file out of {where} on this host")


def made_again(env: Environment, slot: Slot, other: ContainerInfo | None) -> str | None:
    """Why nothing here could make `slot`'s container again once it is gone (None: a
    rollback to it recreates it through compose): this host has no compose for it, or the
    other slot's container was made by `docker run` (check_project_of refuses then). Asked
    of a `docker run --rm` container, which its stop deletes, and of an absent one."""
    missing = _missing(env, slot)
    if missing:
        return f"this host has no compose to make it again ({'; '.join(missing)})"
    if other is not None and other.exists and not (other.labels or {}).get(PROJECT_LABEL):
        return (f"this host makes its slots with `docker run` ({slot.other}'s container "
                f"{other.name} has no {PROJECT_LABEL} label), so compose will not make it")
    return None


SERVICE_LABEL = "com.docker.compose.service"


def check_service(env: Environment, slot: Slot, target: ContainerInfo, other: ContainerInfo,
                  *, planning: bool = True) -> None:
    """Refuse a recreate whose `[slots.<slot>] service` is not the compose service that made
    the slot's container (Docker's `com.docker.compose.service` label).

    Why: compose recreates the container its service names, whatever the environment calls
    it. With blue's and green's services swapped in the environment file, a deploy to green
    recreated the serving blue container with an ungated image. `other` is the other slot's
    container (the serving one, for a deploy or rollback). A container without the label (a
    `docker run` host, or a removed one) is not judged here. `planning`: said before anything
    changed (else right before the recreate, after earlier steps)."""
    service = env.slot(slot).service
    if not service:
        return  # check_recreate says so
    where = env.source or "the environment file"
    unchanged = "; nothing was changed" if planning else ""
    shown = ("`docker inspect -f '{{index .Config.Labels \"" + SERVICE_LABEL
             + "\"}}' <container>` shows it")
    made = (target.labels or {}).get(SERVICE_LABEL) if target.exists else None
    if made and made != service:
        raise PreconditionError(
            f"[slots.{slot}] service is {service!r}, but {target.name} was created by compose "
            f"service {made!r}: a recreate of {service!r} would replace another container "
            f"than {target.name}{unchanged}",
            f"set [slots.{slot}] service = \"{made}\" in {where} (each slot's service is the "
            f"one that created its container: {shown})")
    labels = other.labels or {}
    theirs = labels.get(SERVICE_LABEL) if other.exists else None
    # under another project, `-p <ours> up <service>` would not touch it
    if theirs and theirs == service and labels.get(PROJECT_LABEL) in (None,
                                                                      env.compose.project):
        raise PreconditionError(
            f"[slots.{slot}] service is {service!r}, the compose service of the {slot.other} "
            f"slot's container {other.name}: a recreate would replace {other.name}, not "
            f"{env.slot(slot).container}{unchanged}",
            f"correct [slots.blue] service and [slots.green] service in {where}: each is the "
            f"compose service that created that slot's container ({shown})")


# Docker states of a container that runs no process: what a recreate cut off half-way leaves
# (created, never started), and what `docker rm` without -f removes (it refuses any other)
STOPPED = frozenset({"created", "exited", "dead"})
Leftover = tuple[str, str, str]  # (short id, name, state), as `leftovers` lists them


def leftovers(env: Environment, slot: Slot) -> list[Leftover]:
    """(short id, name, state) of each container of `slot`'s compose service (this project's
    labels) that is not the slot's container: what a compose recreate stopped half-way leaves
    (`<old id>_<name>`: compose killed, an operator's interrupted `docker compose up`). The
    next recreate fails on it with Docker's name conflict. None here: no compose."""
    from runbook import docker

    service = env.slot(slot).service
    if not service or env.compose.file is None:
        return []
    # only compose's own temporary name for a recreate: a one-off `docker compose run`
    # container (a migration, a backfill) carries the same labels, blocks no recreate, and
    # may be a live job (found by review: every deploy refused, and status said to rm it)
    temporary = re.compile(rf"[0-9a-f]{{12}}_{re.escape(env.slot(slot).container.lstrip('/'))}")
    return [found for found in docker.labelled({PROJECT_LABEL: env.compose.project,
                                                SERVICE_LABEL: service,
                                                ONEOFF_LABEL: "False"})
            if temporary.fullmatch(found[1])]


def serving_leftovers(env: Environment, found: list[Leftover],
                      dialed: frozenset[Slot] | None) -> dict[str, str]:
    """{name: why} of each of `found` that users may reach: up and publishing the port of a
    slot Caddy dials (on the host's network: any port), or carrying the label of such a slot
    whose own container does not exist (the slot's container under compose's temporary
    name: a `docker compose up` of the serving slot cut off half-way). `dialed`: the slots
    Caddy's running config dials, the managed block's and other sites' (None: not known,
    every slot). Found by review: status and the refusals said `docker rm -f` of the
    container serving every user (typed as printed: every request 502)."""
    from runbook import docker

    said: dict[str, str] = {}
    for _, name, _ in found:
        info = docker.inspect(name)
        label = (info.labels or {}).get(docker.SLOT_LABEL)
        for slot in Slot if dialed is None else sorted(dialed):
            port = env.slot(slot).port
            dials = (f"port {port}, the {slot} slot's, " + (
                "where Caddy sends traffic" if dialed is not None else
                "where Caddy may send traffic (its running config cannot be read)"))
            if info.up and info.published is None:
                said[name] = (f"it is {info.status} on the host's network, where it may "
                              f"answer on {dials}")
            elif info.up and port in (info.published or ()):
                said[name] = f"it is {info.status} and publishes {dials}"
            elif label == str(slot) and not docker.inspect(env.slot(slot).container).exists:
                said[name] = (f"it carries the {slot} slot's label and no container is named "
                              f"{env.slot(slot).container}: it is that container renamed, "
                              f"the one for {dials}")
            else:
                continue
            break
    return said


def dialed_slots(env: Environment) -> frozenset[Slot] | None:
    """The slots Caddy's running config dials (the managed block's and other sites'), as
    `serving_leftovers` takes them; None when it cannot be read."""
    from runbook import traffic

    try:
        found = traffic.read(env, proxy=False)
    except RunbookError:
        return None
    return found.slots | found.pinned


def leftover_said(env: Environment, slot: Slot, found: list[Leftover],
                  serving: dict[str, str] | None = None) -> tuple[str, str]:
    """(problem, fix) for `leftovers`: each one by name, id and state, and the exact command
    that removes it. Stopped ones, the next recreate by the runbook removes itself
    (`removable_leftovers`); one that is not stopped it never removes: it may be serving
    (on-call checks that Caddy does not send users to it first). One that serves
    (`serving`, from `serving_leftovers`) is never offered for removal: its name back, when
    the slot's own container is gone, else what to find out."""
    import shlex

    service = env.slot(slot).service
    listed = "; ".join(f"{name} (id {ident}, {state or 'unknown state'})"
                       for ident, name, state in found)
    live = [f"{name} is {state or 'in an unknown state'}" for _, name, state in found
            if state not in STOPPED]
    said = (f"compose service {service!r} (project {env.compose.project!r}) has a container "
            f"other than slot {slot}'s {env.slot(slot).container}: {listed}; it is what a "
            "recreate stopped half-way leaves (compose interrupted or killed)")
    if serving:
        return _serving_said(env, slot, found, serving, said)
    if not live:
        removes = " and ".join(f"`docker rm {shlex.quote(name)}`" for _, name, _ in found)
        return (f"{said}; a recreate of that slot by anything else (`docker compose up`) "
                "fails on it (Docker's name conflict)",
                "it is not running, so nothing is served from it: the next `runbook "
                "rollback` or `runbook deploy` (or a `runbook switch` that recreates the slot) "
                f"removes it itself before its recreate, as its plan shows; to remove it now: "
                f"{removes}")
    removes = " and ".join(f"`docker rm -f {shlex.quote(name)}`" for _, name, _ in found)
    return (f"{said}, and the next recreate of that slot fails on it (Docker's name "
            "conflict)",
            f"{', '.join(live)}, so it may be serving and the runbook never removes it: first "
            "make sure no user is served by it (`runbook status` says what Caddy sends "
            f"traffic to), then remove it: {removes}; then run the command again")


def _serving_said(env: Environment, slot: Slot, found: list[Leftover],
                  serving: dict[str, str], said: str) -> tuple[str, str]:
    """`leftover_said` of leftovers among which one or more serve: never their removal."""
    import shlex

    from runbook import docker

    why = "; ".join(f"{name}: {reason}" for name, reason in serving.items())
    problem = (f"{said}, and it is what Caddy sends users to ({why}), so it must not be "
               "removed; the next recreate of that slot fails on it (Docker's name conflict)")
    container = env.slot(slot).container
    names = list(serving)
    if len(names) == 1 and not docker.inspect(container).exists:
        name = names[0]
        state = next((s for _, n, s in found if n == name), "")
        start = (f"; then `docker start {shlex.quote(container)}` (it is {state or 'not running'})"
                 if state in STOPPED else " (it keeps serving)")
        return (problem, f"never remove {name}: `docker rename {shlex.quote(name)} "
                         f"{shlex.quote(container)}` gives it its name back{start}; then "
                         f"`runbook status {command_arg(env)}` again")
    shown = " ".join(shlex.quote(n) for n in (*names, container))
    return (problem, f"never remove {', '.join(names)} while Caddy sends users to it: find out "
                     f"which container should serve the {slot} slot (`docker inspect {shown}`) "
                     "before any rollback, deploy or switch; then `runbook status "
                     f"{command_arg(env)}` again")


def _refuse(env: Environment, slot: Slot, found: list[Leftover], planning: bool,
            serving: dict[str, str] | None = None) -> None:
    """Refuse (exit 4) a recreate of `slot` beside `found`; `serving`: serving_leftovers
    of them, read here when not given."""
    if serving is None:
        serving = serving_leftovers(env, found, dialed_slots(env))
    problem, fix = leftover_said(env, slot, found, serving)
    unchanged = "; nothing was changed" if planning else ""
    raise PreconditionError(f"refusing to recreate {env.slot(slot).container}: {problem}"
                            f"{unchanged}", fix)


def refuse_leftovers(env: Environment, slot: Slot, *, planning: bool = True) -> None:
    """Refuse (exit 4) a recreate of `slot` beside any leftover of its service: compose would
    fail on it half-way. Right before the recreate (`planning` False) the plan has removed
    the stopped ones already (`removable_leftovers`). `planning`: said before anything
    changed."""
    found = leftovers(env, slot)
    if found:
        _refuse(env, slot, found, planning)


def removable_leftovers(env: Environment, slot: Slot, serving: ContainerInfo) -> list[Leftover]:
    """The leftovers of `slot`'s service that a recreate of it removes first, as a step of
    its plan (a rerun after a recreate cut off half-way then finishes with no command by
    hand); refused as `refuse_leftovers` (exit 4, nothing changed) unless every one is
    stopped and none is one users reach (`serving_leftovers`: a stopped one may be the
    serving slot's container, renamed). `serving`: the other slot's container, the one that
    serves.

    Why it is safe: a stopped leftover serves nothing; it is of the slot being recreated
    (its service's labels and compose's `<id>_<name>` name), never the serving container
    (its id is checked against `serving`'s); `--force-recreate` would have removed the old
    container anyway. Removed without -f (`remove_leftover`), so one started since the plan
    is refused by Docker itself; named volumes are kept (no -v)."""
    found = leftovers(env, slot)
    if not found:
        return found
    reached = serving_leftovers(env, found, dialed_slots(env))
    if reached or any(state not in STOPPED for _, _, state in found):
        _refuse(env, slot, found, True, reached)
    for ident, name, _ in found:
        _never_serving(ident, name, serving)
    return found


def _never_serving(ident: str, name: str, serving: ContainerInfo) -> None:
    """Refuse (exit 4) to remove `name` unless its id is known and is not `serving`'s."""
    theirs = serving.container_id if serving.exists else None
    if re.fullmatch(r"[0-9a-f]{12,64}", ident) and not (theirs and theirs.startswith(ident)):
        return
    raise PreconditionError(
        f"refusing to remove {name} (id {ident or 'unknown'}) before a recreate: "
        + (f"it is {serving.name}, the serving slot's container" if ident else
           "its id cannot be told from the serving slot's container's")
        + "; nothing was changed",
        f"read `docker ps -a` and `runbook status`; remove {name} by hand only once nothing is "
        "served from it, then run the command again")


def remove_leftover(env: Environment, slot: Slot, leftover: Leftover,
                    action: DockerAction) -> str:
    """Remove one leftover the plan showed (`removable_leftovers`) by the `docker rm NAME` it
    showed (`action`), never -f: one started since the plan is refused by Docker itself, and
    the run stops there (exit 4: traffic stays, nothing else was changed). One gone since is
    fine (a rerun after a kill finds it gone). Returns what was done, for the journal."""
    from runbook import docker

    ident, name, state = leftover
    info = docker.inspect(name)
    if not info.exists:
        return f"{name}: already gone"
    container = env.slot(slot).container
    serving = docker.inspect(env.slot(slot.other).container)
    if not (info.container_id or "").startswith(ident):
        raise PreconditionError(
            f"refusing to recreate {container}: {name} is another container (id "
            f"{(info.container_id or 'unknown')[:12]}) than the leftover the plan showed "
            f"(id {ident}); traffic stays where it was, nothing else was changed",
            "run the command again to see the plan as it is now (`runbook status` names "
            "the leftover)")
    _never_serving(ident, name, serving)
    if reached := serving_leftovers(env, [leftover], dialed_slots(env)):  # since the plan
        problem, fix = leftover_said(env, slot, [(ident, name, info.status)], reached)
        raise PreconditionError(f"refusing to recreate {container}: {problem}; traffic stays "
                                "where it was, nothing else was changed", fix)
    try:  # to the id just checked: never another container given the name meanwhile
        docker.run(docker.to_container(action, info.container_id or ident))
    except docker.DockerError as exc:
        now = docker.inspect(name)
        if not now.exists or now.status in STOPPED:
            raise
        _, fix = leftover_said(env, slot, [(ident, name, now.status)],
                               serving_leftovers(env, [leftover], dialed_slots(env)))
        raise PreconditionError(
            f"refusing to recreate {container}: the leftover {name} (id {ident}) was {state} "
            f"when the plan was made and is {now.status} now, and Docker refused to remove "
            f"it without -f ({exc.message}); traffic stays where it was, nothing else was "
            "changed", fix) from None
    return f"{name}: removed"


def base(env: Environment) -> list[str]:
    if env.compose.file is None:
        raise PreconditionError("this host has no compose file ([compose] file is not set)",
                                "set [compose] file in the environment file")
    argv = [*env.compose.command, "-p", env.compose.project, "-f", str(env.compose.file)]
    if env.compose.env_file is not None:
        argv += ["--env-file", str(env.compose.env_file)]
    return argv


def recreate_slot(env: Environment, slot: Slot, tag: str) -> Command:
    """`up -d --no-deps --force-recreate togather-<slot>` with IMAGE_TAG set, as on a host."""
    service = env.slot(slot).service
    if not service:  # each command's plan refuses first, saying what works (check_recreate)
        raise PreconditionError(f"[slots.{slot}] service is not set: compose cannot recreate "
                                f"{env.slot(slot).container}",
                                f"set [slots.{slot}] service in "
                                f"{env.source or 'the environment file'}")
    return Command(
        argv=(*base(env), "up", "-d", "--no-deps", "--force-recreate", "--pull", "never", service),
        env=(("IMAGE_TAG", tag),),
    )


GRACE = 10.0  # seconds compose is given to stop on its own once cut off (then SIGKILL)


def ps_command(argv: tuple[str, ...] | list[str]) -> str:
    """`docker compose -p <project> -f <file> [--env-file ...] ps -a` from a compose argv: the
    project as the runbook invokes it (a bare `docker compose ps` reads another project in
    another folder, and names nothing)."""
    import shlex

    words = list(argv)
    end = len(words)
    for at, word in enumerate(words):
        if word in ("up", "ps", "config", "version", "down", "stop", "rm", "start"):
            end = at
            break
    return shlex.join([*words[:end], "ps", "-a"])


def run(command: Command, timeout: float = 300,
        cut_off: Callable[[], bool] = lambda: False) -> str:
    """Run it; every way it can fail becomes one line (compose's own output is redacted).

    Compose runs in a process group of its own (in our session): the terminal's Ctrl-C, sent
    to its whole foreground group, reached compose half-way through a recreate and left its
    temporary `<old id>_<name>` container (found by a kill-fuzz review), which broke the next
    run on Docker's name conflict. The run holds that signal until compose ends (the plan's
    `hold_signals`), so it never undoes beside a compose still running (the reason compose
    was once left in the terminal's group: the interrupt killed only the docker CLI and its
    plugin raced the undo). The way out when compose hangs: `cut_off()` (a second signal) or
    `timeout` stop the whole group (SIGINT, then SIGKILL after GRACE), and it is waited for."""
    from runbook.journal import redact

    try:
        proc = subprocess.Popen(
            list(command.argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **dict(command.env)}, stdin=subprocess.DEVNULL,
            process_group=0)
    except FileNotFoundError:
        raise ComposeError(f"cannot run `{command.display()}`: {command.argv[0]} is not "
                           "installed or not on PATH",
                           "install Docker with the Compose v2 plugin (`docker compose "
                           "version`), or set [compose] command in the environment file",
                           exit_code=ExitCode.PRECONDITION) from None
    except OSError as exc:
        raise ComposeError(f"cannot run `{command.display()}`: {exc.strerror or exc}",
                           "check [compose] command in the environment file",
                           exit_code=ExitCode.PRECONDITION) from None
    leftovers = (f"`{ps_command(command.argv)}` lists what it left (a container named "
                 "`<id>_<name>`: `runbook status` names it; the next run removes it itself "
                 "when it is not running)")
    deadline = time.monotonic() + timeout
    why = ""
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            if cut_off():
                why = "was stopped half-way by a second signal"
            elif time.monotonic() >= deadline:
                why = f"did not finish within {timeout:g}s and was stopped"
            if why:
                out, err = _stop(proc)
                break
    finally:
        if proc.poll() is None:  # anything else that ends the wait: never left behind
            _stop(proc)
    if why:
        raise ComposeError(f"`{command.display()}` {why}: it may have left the container "
                           "half-recreated", f"{leftovers}; check `docker info` too (the "
                           "engine may be overloaded)")
    if proc.returncode != 0:
        last = (err or out).strip().splitlines()[-1:] or ["no output"]
        raise ComposeError(f"`{command.display()}` failed: {redact(last[0].strip())}",
                           f"read the compose output above; {leftovers}")
    return out


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Stop compose's whole group (the docker CLI and its plugin), as a Ctrl-C would, then
    kill it if it does not end within GRACE; waited for either way."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.communicate(timeout=GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()
