"""`runbook fleet drain ENV`: the maintenance path's drain of one host (run by the fleet).

Before the shared database is restored, every host must stop writing to it: each host stops
its app slots with the single-host restore's own stop (`slots.stop(..., maintenance=True)`,
the one action allowed to stop the serving slot). No single-host command stops the slots
without restoring too (`snapshot restore` would restore the database once per host), hence
this small host-side command. `--undo` starts again the containers a drain stopped, for a
maintenance run that stopped before the database was restored. Both hold the host's deploy
lock while they change its slots and journal on the host what they changed.

Both act on containers by Id, never on whatever holds a slot's name by then: the drain
stops the container it inspected and says its Id (journal line and answer), and the undo
starts only that Id, right after checking the name still holds it (found by review: the
undo `docker start`ed by name, so a container `docker create`d meanwhile under the name,
with an older image, was started against the shared database).

Once its stops are done the drain asks Docker whether a container is up under any slot's
name, and refuses if so (`NotDrained`): one renamed or started in under the name between
the inspect and the stop is never the drain's to stop, and it went on writing to the shared
database through the restore (found by review: the restore's check of other sessions misses
an app that connects per request, and --end-sessions ends a pool's that reconnects after it).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

from runbook.environment import Environment
from runbook.errors import ExitCode, LockedError, RunbookError

if TYPE_CHECKING:
    from runbook.docker import ContainerInfo
    from runbook.environment import Slot
    from runbook.plan import Plan

Log = Callable[..., None]
UNDRAIN_LOCK_WAIT = 20.0  # seconds the undrain waits for a live deploy-lock holder to let go
LOCK_POLL = 0.5  # seconds between two tries meanwhile


class Answered(RunbookError):
    """A refusal after some of the command's changes: `answer` (fields of its JSON, beside
    the error's own) says what it did change, so the fleet reads that from fields, never
    from the message's words."""

    def __init__(self, message: str, fix: str, *, exit_code: ExitCode,
                 answer: dict[str, Any]) -> None:
        super().__init__(message, fix, exit_code=exit_code)
        self.answer = answer


class NotDrained(Answered):
    """A container is up under an app slot's name once the drain's stops are done: the
    restore must not begin. `answer` is what the drain stopped (`stopped`, `stopped_ids`),
    so the fleet starts those again as it starts every drained host's."""


def _fleet_fields(fleet_run: str, holder: str) -> dict[str, str | None]:
    return {"fleet_run_id": fleet_run or None, "fleet_holder": holder or None}


def _why(what: str, fleet_run: str, holder: str) -> str:
    return (f"{what} (fleet run {fleet_run or 'not named'}"
            + (f", by {holder}" if holder else "") + ")")


def _refuse_lock_dir(env: Environment) -> None:
    """A [lock] dir that is a file: exit 2 before the log, as every run refuses it (it was
    refused at the lock, after the log was written)."""
    from runbook import lock as locks

    if (refused := locks.lock_dir_refusal(env)) is not None:
        raise refused


@contextlib.contextmanager
def _deploy_lock(env: Environment, why: str, log: Log, notify: Callable[[str], None], *,
                 nothing: str, this: str, fleet: dict[str, str | None],
                 wait: float = 0.0) -> Iterator[None]:
    """The deploy lock held for the block and released on every path (the restore and the
    rollback that follow on this host take it). A live holder refuses, exit 3, with
    `nothing` said, once `wait` seconds have passed without it letting go; a stale one is
    taken over and said. Killed inside, the lock names a dead process, which the next run
    takes over."""
    from runbook import lock as locks
    from runbook import run

    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            held = locks.acquire(env, reason=why)
            break
        except LockedError as exc:
            if time.monotonic() + LOCK_POLL > deadline:
                raise LockedError(f"{exc.message}; {nothing}"
                                  + (f" (waited {wait:g}s for it)" if wait else ""),
                                  exc.fix) from None
            if not said:
                said = True
                waiting = f"the deploy lock is held ({exc.message}): waiting up to {wait:g}s"
                log("WARN", waiting, lock=str(env.lock_path), **fleet)
                notify(waiting)
            time.sleep(LOCK_POLL)
    try:
        taken = (f"took over a stale deploy lock held by {held.stolen_from.describe()} "
                 f"({held.stolen_from.why})" if held.stolen_from is not None else "")
        log("WARN" if taken else "INFO", taken or "took the deploy lock",
            lock=str(env.lock_path), **fleet)
        if taken:
            notify(taken)
        yield
    finally:
        try:
            locks.release(env, held)
        except (RunbookError, OSError) as exc:  # never in place of what was changed
            left = (f"the deploy lock {env.lock_path} could not be released ({exc}); the "
                    f"next run takes it over and says so, since {this} has exited")
            log("WARN", left)
            notify(f"{run.WARNING}{left}")


def plan(env: Environment) -> Plan:
    """What `drain` will do on this host, as a plan (read-only): the deploy lock it takes, and
    each app slot it stops, judged as it judges them (running now); the fleet's maintenance
    dry run and prompt show it, since the drain is the step that takes the service down."""
    from runbook import docker
    from runbook import lock as locks
    from runbook.plan import Phase, Plan, Step

    held = locks.status(env)
    # judged as taking it judges it (another user's stale lock in a sticky folder: refused)
    refused = locks.refusal(env) if held is not None else None
    steps = [Step("lock", "Take the deploy lock (released when the drain ends: the restore and "
                  "the rollback that follow take it)",
                  {"path": str(env.lock_path),
                   "now": "free" if held is None else held.describe()
                   + (": would be taken over" if refused is None
                      else f": refused, exit {int(refused.exit_code)}")},
                  phase=Phase.PREFLIGHT)]
    for slot in env.slots:
        name = env.slot(slot).container
        info = docker.inspect(name)
        steps.append(Step("stop-slot", f"Stop the {slot} app slot {name}",
                          {"container": name, "id": _short(info.container_id),
                           "why": "the shared database is restored next: no app may write "
                           "to it meanwhile (stopped by this Id, which the undrain starts)"},
                          skip=None if info.up else "not running"))
    return Plan("fleet-drain", env, f"stop the app slots of {env.display} (THE SERVICE IS "
                "DOWN on this host until its own rollback starts it)", steps)


def drain(env: Environment, *, fleet_run: str = "", holder: str = "",
          notify: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Stop every running app slot of this host under the deploy lock, journaled.

    The lock is held for the drain's duration (a deploy started after a mere check raced the
    stops) and released at its end: the restore and the rollback that follow on this host
    take it. Killed half-way, it names a dead process, which the next run takes over. The
    host's log names the fleet run, who ran it and each container as it stops: a maintenance
    run stopped after the drain left the service down with no record on the host (found by
    review). A live holder refuses, exit 3 (LockedError), and nothing is stopped.

    A paused or restarting slot is stopped too, as the restore's own stop does (either runs
    again, against the restored database). Once the stops are done, a container up under a
    slot's name (renamed or started in since its inspect) refuses the drain (NotDrained):
    exit 5 with what it stopped, which the fleet starts again, or 4 when it stopped nothing."""
    from runbook import docker, faults, run, slots

    fleet = _fleet_fields(fleet_run, holder)
    why = _why("fleet maintenance drain", fleet_run, holder)
    _refuse_lock_dir(env)
    with run.journaled(env, "fleet-drain", why, notify) as log:
        stopped: list[str] = []
        ids: dict[str, str] = {}
        with _deploy_lock(env, why, log, notify, nothing="nothing was stopped",
                          this="this drain", fleet=fleet):
            for slot in env.slots:
                name = env.slot(slot).container
                info = docker.inspect(name)
                if info.up:
                    faults.point(env, "fleet-drain.before-stop")
                    # the stop goes to the Id inspected, and that Id is what the undo starts
                    # again: another container given the name since is never the drain's
                    slots.stop(env, slot, maintenance=True, ident=info.container_id)
                    stopped.append(name)
                    if info.container_id:
                        ids[name] = info.container_id
                    log("INFO", f"stopped {name} (id {_short(info.container_id)}, image "
                        f"{info.image or 'unknown'}; fleet maintenance: the database is "
                        "restored next)", container=name, container_id=info.container_id,
                        image=info.image, slot=str(slot), **fleet)
                    faults.point(env, "fleet-drain.after-stop")
            _refuse_left_up(env, stopped, ids, log, fleet)
        log("SUCCESS", f"drained: {len(stopped)} app slot(s) stopped, THE SERVICE IS DOWN on "
            "this host until the fleet's rollback starts it", stopped=stopped,
            stopped_ids=ids, **fleet)
    return {"ok": True, "stopped": stopped, "stopped_ids": ids, "service": "DOWN on this host"}


def _refuse_left_up(env: Environment, stopped: list[str], ids: dict[str, str], log: Log,
                    fleet: dict[str, str | None]) -> None:
    """Refuse (NotDrained) when Docker says a container is up under an app slot's name now
    that the stops are done: the drain stopped the Id it inspected, so one renamed or started
    in under the name meanwhile still runs, and would write to the shared database through
    the restore (its sessions are no proof: an app may connect only per request, or again
    once --end-sessions ended it). Truth from Docker, asked again after the last stop."""
    from runbook import docker
    from runbook.environment import command_arg

    left: list[tuple[str, ContainerInfo]] = []
    for slot in env.slots:
        name = env.slot(slot).container
        now = docker.inspect(name)
        if now.up:
            left.append((name, now))
            log("ERROR", f"{name} is {now.status} once the drain's stops are done "
                f"({_described(now)}): the restore must not begin", container=name,
                container_id=now.container_id, image=now.image, slot=str(slot), **fleet)
    if not left:
        return
    what = "; ".join(f"{name} is {now.status} once its stops are done ({_described(now)})"
                     for name, now in left)
    undo = ",".join(f"{n}@{ids[n]}" if n in ids else n for n in stopped)
    done = (f"stopped: {', '.join(f'{n} (id {_short(ids.get(n))})' for n in stopped)}; THE "
            "SERVICE IS DOWN on this host" if stopped else "nothing was stopped")
    events = " ".join(f"--filter container={name}" for name, _ in left)
    raise NotDrained(
        f"not drained: {what}, renamed or started under the slot's name during the drain; it "
        f"would write to the shared database while it is restored, so the restore must not "
        f"begin; {done}",
        f"find out who started it (`docker events --since 24h --until 0s {events}`) and stop "
        f"it (`docker stop {' '.join(_short(now.container_id) for _, now in left)}`) once it "
        "may be stopped, then run the maintenance again" + (
            f" (the fleet starts again what this drain stopped; by hand: `runbook fleet drain "
            f"{command_arg(env)} --undo {undo}`)" if stopped else ""),
        exit_code=ExitCode.ATTENTION if stopped else ExitCode.PRECONDITION,
        answer={"stopped": stopped, "stopped_ids": ids, "left_up": [n for n, _ in left]})


def _short(ident: str | None) -> str:
    return (ident or "unknown")[:12]


def _described(info: ContainerInfo | None) -> str:
    return (f"id {_short(info.container_id)} image {info.image or 'unknown'}"
            if info is not None and info.exists else "none")


_FULL_ID = re.compile(r"[0-9a-f]{64}")


def parse_undo(text: str) -> list[tuple[str, str | None]]:
    """`--undo`'s CONTAINERS: `NAME@ID` as the drain answered them (the controller passes
    them so), or a bare `NAME` (an older controller, or by hand): its Id is then the one
    this host's own log says its last drain stopped (`journaled_ids`). A container name
    never holds '@' (Docker's names are [a-zA-Z0-9][a-zA-Z0-9_.-]*)."""
    out: list[tuple[str, str | None]] = []
    for item in (x.strip() for x in text.split(",")):
        if item:
            name, at, ident = item.partition("@")
            if at and not _FULL_ID.fullmatch(ident):
                # a short prefix never equals the Id Docker reports, so its refusal named
                # the right container as another one, every time (found by review)
                raise RunbookError(f"--undo {item}: {ident or 'nothing'} after '@' is not a "
                                   "full container id; nothing was started",
                                   f"pass the full id the drain answered ({name}@ and its 64 "
                                   "hex digits: the drain's `stopped` line in this host's log "
                                   "has it as container_id), or the bare name for that Id",
                                   exit_code=ExitCode.USAGE)
            out.append((name, ident or None))
    return out


def journaled_ids(env: Environment, names: list[str]) -> tuple[dict[str, str], bool]:
    """The Id each of `names` had when this host's last drain that stopped anything stopped
    it, as that drain's own log lines say, less the Ids an undrain since started again; and
    whether such a drain was found. Not found (no drain here, or an older runbook's, which
    journaled no Id): its undo refuses a stopped name rather than start whatever holds it.
    A drain that stopped nothing is passed over: a maintenance run tried again after its
    undrain was lost drains nothing, and the drain before it is the one to undo.

    Each log is read as a stream, newest first, and only as far as needed: the first line
    says whose it is, so another command's log (a deploy's, an hourly snapshot's, however
    large) is left after it; a drain's or an undrain's, small, is read through. Every file
    was read whole, each the next one too, until a drain turned up: slow and memory-hungry
    on a host with a large log folder (found by review)."""
    try:
        logs = sorted(env.log_dir.glob(f"{env.name}_*.log"), reverse=True)
    except OSError:
        return {}, False
    undone: set[str] = set()  # Ids a later undrain started again
    for path in logs:
        stopped: dict[str, str | None] = {}
        try:
            with path.open(errors="replace") as lines:
                whose = _whose(lines)
                if whose is None:
                    continue
                lines.seek(0)
                for line in (part for raw in lines for part in raw.splitlines()):
                    try:
                        entry = json.loads(line)
                    except ValueError:  # a line cut short (a writer killed mid-write)
                        continue
                    if not isinstance(entry, dict):
                        continue
                    name, ident = entry.get("container"), entry.get("container_id")
                    message = str(entry.get("message", ""))
                    if whose == "fleet-undrain":
                        if message.startswith("started ") and isinstance(ident, str) and ident:
                            undone.add(ident)
                    elif isinstance(name, str) and message.startswith("stopped "):
                        # the name's last such line, as when read from the end
                        stopped[name] = ident if isinstance(ident, str) and ident else None
        except OSError:
            continue
        if stopped:
            if None in stopped.values():
                return {}, False  # an older runbook's drain: which Id it stopped is unknown
            # the last drain that stopped anything is the one undone: a name it did not stop
            # (the standby a deploy stopped since) is left, never an older drain's Id
            # started (found by review)
            return {n: i for n, i in stopped.items()
                    if n in names and i is not None and i not in undone}, True
    return {}, False


_PIECE = 8192  # characters of a first line read at a time: a line with no end is never held


def _whose(lines: TextIO) -> str | None:
    """"fleet-undrain" or "fleet-drain" when the log's first line is that command's (as it
    names its action), else None; read in pieces up to the line's end, never further."""
    found: set[str] = set()
    carry = ""  # the end of the pieces read so far: a name cut between two pieces
    while piece := lines.readline(_PIECE):
        head = piece.splitlines()[0]
        text = carry + head
        found.update(a for a in ("fleet-undrain", "fleet-drain") if f'"{a}"' in text)
        if len(piece.splitlines(keepends=True)[0]) > len(head):  # the first line ended
            break
        carry = text[-len('"fleet-undrain"'):]
    return next((a for a in ("fleet-undrain", "fleet-drain") if a in found), None)


def undo(env: Environment, containers: list[tuple[str, str | None]], *,
         fleet_run: str = "", holder: str = "",
         notify: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Start again the containers a drain stopped (only this host's own app slots), under the
    deploy lock, journaled, as the drain itself.

    It started them with no lock and no word on the host (found by review): a deploy running
    then raced the starts, and nothing on the host said who started its slots again. Every
    name is checked before anything is taken or started (one not this host's app slot: exit
    2, nothing started, no lock, no log). A live holder refuses, exit 3, nothing started; a
    stale one is taken over and said. The host's log names each container started, and each
    already running and left so, with the fleet run and who ran it.

    `containers`: (name, Id the drain stopped) pairs; a bare name's Id is the one this host's
    log says its last drain that stopped anything stopped (`journaled_ids`); a name that
    drain did not stop is left as it is; no such drain journaled: a stopped name is
    refused, never guessed. Right before
    each start the name is inspected again: when it holds another container, or none, that
    one is refused (nothing started for it, the others are) and the undo fails at its end,
    exit 4 when it started nothing, else 5 (the host is not as it was before the drain),
    its answer listing what it started and each container refused with its own fix
    (UndrainRefused); a container whose start fails (a port taken meanwhile) is answered
    so too, the others started. The start itself goes to the Id, so a rename in between
    cannot redirect it."""
    from runbook import run
    from runbook.environment import command_arg

    own = {env.slot(s).container: s for s in env.slots}
    wanted: dict[str, str | None] = {}
    for name, ident in containers:  # each once, in the order given
        if wanted.get(name) is None:
            wanted[name] = ident
    for name in wanted:
        if name not in own:
            raise RunbookError(f"{name} is not an app slot of {env.name} on this host; nothing "
                               "was started", "pass only the containers `fleet drain` printed",
                               exit_code=ExitCode.USAGE)
    fleet = _fleet_fields(fleet_run, holder)
    why = _why("fleet maintenance undrain: the database was not restored", fleet_run, holder)
    _refuse_lock_dir(env)
    with run.journaled(env, "fleet-undrain", why, notify) as log:
        started: list[str] = []
        running: list[str] = []
        refused: list[dict[str, str | None]] = []  # each with its own reason and fix
        kept: list[str] = []  # bare names no drain's Id names: not the drain's to start
        # a holder of a few seconds (a cron's snapshot cleanup) is waited out: refused at
        # once, the undrain left this host DOWN for it (found by review)
        with _deploy_lock(env, why, log, notify, nothing="nothing was started",
                          this="this undrain", fleet=fleet, wait=UNDRAIN_LOCK_WAIT):
            bare = [n for n, i in wanted.items() if i is None]
            journaled, found = journaled_ids(env, bare) if bare else ({}, False)
            for name, given in wanted.items():
                ident = given or journaled.get(name)
                try:
                    _undo_one(env, name, ident, found, own, log, fleet, started=started,
                              running=running, refused=refused, kept=kept)
                except RunbookError as exc:
                    # its start (or its inspect) failed, after others may have been started:
                    # answered with what was started, as a refusal is, and the rest go on;
                    # raised as it came, the answer listed nothing started and the fleet
                    # named a host whose other slot it had started DOWN (found by review)
                    error = f"{name}: starting it again failed: {exc.message}"
                    again = f"{name}@{ident}" if ident else name
                    refused.append({"container": name, "container_id": ident, "now_id": None,
                                    "error": error, "fix": f"{exc.fix or 'see the error'}; "
                                    f"then `runbook fleet drain {command_arg(env)} --undo "
                                    f"{again}`"})
                    log("ERROR", error, container=name, container_id=ident,
                        slot=str(own[name]), **fleet)
        if refused:
            done = (f"started again: {', '.join(started)}" if started else "nothing was started")
            raise UndrainRefused("; ".join(str(r["error"]) for r in refused) + f"; {done}",
                                 "; ".join(str(r["fix"]) for r in refused),
                                 exit_code=ExitCode.ATTENTION if started else
                                 ExitCode.PRECONDITION,
                                 answer={"started": started, "already_running": running,
                                         "not_drained": kept, "refused": refused})
        log("SUCCESS", f"undrained: {len(started)} app slot(s) started again, {len(running)} "
            f"already running, {len(kept)} not stopped by the last drain", started=started,
            already_running=running, not_drained=kept, **fleet)
    return {"ok": True, "started": started, "already_running": running, "not_drained": kept}


def _undo_one(env: Environment, name: str, ident: str | None, found: bool,
              own: dict[str, Slot], log: Log, fleet: dict[str, str | None], *,
              started: list[str], running: list[str], refused: list[dict[str, str | None]],
              kept: list[str]) -> None:
    """One container of the undo: left, refused, found running or started (by its Id),
    added to its list and logged."""
    from runbook import docker

    now = docker.inspect(name)
    if ident is None and now.running:  # nothing to start: no Id needed to leave it
        ident = now.container_id
    if ident is None and found:  # a bare name the last drain did not stop
        kept.append(name)
        log("INFO", f"{name} is left as it is: this host's last drain did not stop "
            "it (or an undrain started it again since)", container=name,
            slot=str(own[name]), **fleet)
        return
    if ident is None or not now.exists or now.container_id != ident:
        drained = docker.inspect_id(ident) if ident else None
        refusal = _refusal(name, ident, drained, now)
        refused.append({"container": name, "container_id": ident,
                        "now_id": now.container_id if now.exists else None,
                        "error": refusal, "fix": _fix(env, name, ident)})
        log("ERROR", refusal, container=name, container_id=ident,
            now_id=now.container_id, now_image=now.image, slot=str(own[name]),
            **fleet)
        return
    if now.running:
        running.append(name)
        log("INFO", f"{name} is already running: left as it is", container=name,
            container_id=ident, slot=str(own[name]), **fleet)
        return
    docker.run(docker.start_action(name, ident))
    started.append(name)
    log("INFO", f"started {name} again (id {_short(ident)}, image "
        f"{now.image or 'unknown'}; fleet maintenance stopped before the "
        "database was restored)", container=name, container_id=ident,
        slot=str(own[name]), **fleet)


class UndrainRefused(Answered):
    """An undrain that refused a container: `answer` says what it did start and each
    container it refused, with its own fix. The fleet read what was started only from the
    message's words, and named a host whose undrain started its slots but one "DOWN" (found
    by review)."""


def _fix(env: Environment, name: str, ident: str | None) -> str:
    """What brings `name`'s drained container back: who changed the name, then the undo
    again with the drained Id (or, none known, the container checked by hand)."""
    from runbook.environment import command_arg

    events = (f"check who changed it (`docker events --since 24h --until 0s --filter "
              f"container={name}`)")
    if ident is None:
        return (f"{events}; `docker inspect {name}`: start it (`runbook fleet drain "
                f"{command_arg(env)} --undo {name}@<its full id>`) only if it is the container "
                "the drain stopped")
    return (f"{events}; give the drained container {_short(ident)} its name back (`docker "
            f"rename <its name> {name}`, the other one renamed or removed first), then run "
            f"`runbook fleet drain {command_arg(env)} --undo {name}@{ident}`")


def _refusal(name: str, ident: str | None, drained: ContainerInfo | None,
             now: ContainerInfo) -> str:
    """Why `name` is not started: the drain's container (its Id and image, where it is now)
    and what holds the name now."""
    if ident is None:
        return (f"{name} was not started: no drain on this host journaled the id it stopped "
                f"(it holds {_described(now)}), so which container to start is unknown")
    where = ("gone" if drained is None else
             f"image {drained.image or 'unknown'}, now named {drained.name}"
             if drained.name != name else f"image {drained.image or 'unknown'}")
    return (f"{name} was not started: it is not the container the drain stopped (id "
            f"{_short(ident)} {where}; {name} now holds {_described(now)})")
