"""Running an operation: lock, plan, confirm, execute, journal, release. One path for all.

Every mutating command goes through `perform`, so every one gets the same guarantees: the
deploy lock (kept fresh while the run lasts), signals handled (runbook/plan.py), the leftovers
of a killed run cleaned, the intent of an interrupted run honoured, one line for any failure,
and the process exit code equal to the one the journal records. The few that have no plan to
run (snapshot create and cleanup, unlock) still write the log, through `journaled`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from runbook import disk, dry, files
from runbook import intent as intents
from runbook import journal as journals
from runbook import lock as locks
from runbook.environment import Environment, Slot, command_arg
from runbook.errors import (
    AlreadyDone,
    ExitCode,
    LockLostError,
    RunbookError,
    Terminated,
    UsageError,
)
from runbook.plan import WARNING as WARNING  # defined there: steps warn too
from runbook.plan import Interrupted, Phase, Plan, Signals, Step, StepOutcome, execute
from runbook.redact import one_line


class NotConfirmed(UsageError):
    """The operator said no at the prompt; nothing was changed."""


@dataclass
class RunResult:
    plan: Plan
    run_id: str
    dry_run: bool
    outcomes: list[StepOutcome] = field(default_factory=list)
    log_file: str | None = None
    record_file: str | None = None
    notices: list[str] = field(default_factory=list)  # said on the terminal, e.g. a takeover

    def to_json(self) -> dict[str, Any]:
        # a dry run's id is never used (NEW_RUN_ID): null, not an id the real run will not have
        return {"run_id": None if self.dry_run else self.run_id, "dry_run": self.dry_run,
                "plan": self.plan.to_json(),
                "steps": [o.__dict__ for o in self.outcomes], "log_file": self.log_file,
                "record_file": self.record_file, "notices": self.notices}


# the commands that never write the Caddyfile (nor check that they may)
NO_CADDYFILE = frozenset({"snapshot-restore", "restore-kept"})
# the commands that record nothing in the state file: its lock's copy there is only said when
# it cannot be written (README: "a snapshot restore, which does not read it, goes on")
NO_STATE_RECORD = frozenset({"snapshot-restore"})


# a dry run's plan names the run's own id (a new deployment's) so: found by review, its id
# differed from the real run's (and from the next dry run's), and was quoted in tickets
NEW_RUN_ID = "<new: the run's id, given when it starts>"


def perform(env: Environment, action: str, build: Callable[[str], Plan], *, dry_run: bool,
            reason: str, confirm: Callable[[Plan], bool] | None = None,
            progress: Callable[..., None] | None = None,
            notify: Callable[[str], None] | None = None) -> RunResult:
    """Plan (under the lock) and execute; a dry run plans without lock and changes nothing.
    Both refuse first where this user may not write what a run writes (disk.access_problems):
    before the journal, which may be one of those places, and before the lock's guard, which
    a dry run's lock check opens (the real run stopped part way where the dry run passed)."""
    deferred = _caddyfile_as_finished(env, action)
    disk.refuse_unwritable(env, caddyfile=action not in NO_CADDYFILE and not deferred,
                           state_file=action not in NO_STATE_RECORD)
    run_id = journals.new_run_id(action)
    if dry_run:
        with _dry_signals():
            return _dry_run(env, build, run_id, caddyfile_deferred=deferred)
    signals = Signals()
    with signals.installed():
        return _perform(env, action, build, run_id, reason, confirm, progress,
                        notify or (lambda message: None), signals, deferred)


def _caddyfile_as_finished(env: Environment, action: str) -> bool:
    """An interrupted run that took effect (its record committed) with the Caddyfile on disk
    already naming its target: its finish does not write the Caddyfile, so whether it may is
    asked only once the plan shows it does (`_refuse_caddyfile`). Found by review: a rerun
    finishing such a run was refused over a Caddyfile `chattr +i` since the kill."""
    if action in NO_CADDYFILE:
        return False
    try:
        intent = intents.read(env)
    except RunbookError:
        return False  # the plan says it
    if intent is None or intent.phase is not intents.Phase.COMMITTED:
        return False
    from runbook import finish

    return finish.caddyfile_names(env, intent.target)


def _refuse_caddyfile(env: Environment, plan: Plan, deferred: bool) -> None:
    """The Caddyfile check perform deferred, for a plan that writes it after all: anything
    but a finish (a committed record whose traffic went back: a new run), or a finish whose
    Caddyfile step runs (the file changed since)."""
    if deferred and (plan.finishing is None or any(
            step.name == "caddyfile" and step.skip is None for step in plan.steps)):
        disk.refuse_unwritable(env, records=False, state=False, lock=False, log=False)


def plan_only(env: Environment, action: str, build: Callable[[str], Plan]) -> Plan:
    """The plan a dry run makes (every refusal it raises: the lock's, the plan's), for
    `runbook status`, which asks before naming the command: not through the CLI. Without
    perform's refusal of what this user may not write (status says that as a note: it judges
    the command as the deploy user runs it; a read-only watcher was told the rollback was
    refused) nor its signal handlers: `build` must start no tool check that writes or leaves
    something to clean up (status writes nothing)."""
    return _dry_run(env, build, journals.new_run_id(action)).plan


class DryRunSignal(Terminated):
    """SIGTERM or SIGHUP ending a dry run as Ctrl-C does, with the atexit clean-up: cli._begins
    says "runbook: interrupted by SIGTERM" and exits 128 + the signal's number, as it does for
    one that came before the dry run's handlers (it used to be that exit, nothing said)."""


@contextlib.contextmanager
def _dry_signals() -> Iterator[None]:
    """A dry run stopped by SIGTERM or a dropped session (SIGHUP) leaves as from Ctrl-C, so
    the atexit clean-up runs (its check container, Caddy's candidate file); their default
    ended the process at once and left them. A hangup the run was started to ignore (nohup)
    stays ignored, as in a real run (plan.Signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are only delivered to the main thread anyway
        return

    def stop(signum: int, frame: object) -> None:
        raise DryRunSignal(signum)

    previous: dict[signal.Signals, Any] = {}
    for handled in (signal.SIGTERM, signal.SIGHUP):
        if handled == signal.SIGHUP and signal.getsignal(handled) is signal.SIG_IGN:
            continue
        previous[handled] = signal.signal(handled, stop)
    try:
        yield
    finally:
        for handled, was in previous.items():
            signal.signal(handled, was)


def _dry_run(env: Environment, build: Callable[[str], Plan], run_id: str, *,
             caddyfile_deferred: bool = False) -> RunResult:
    """The plan as the real run would make it, with no lock taken and nothing changed."""
    # judged as taking it would judge it (the real run stops there, exit 3): read only as
    # "held", a live holder's lock gave a normal plan while the real run was refused
    if (refused := locks.refusal(env)) is not None:
        raise refused
    with dry.planning():  # its checks write nothing (a candidate Caddyfile included)
        plan = _with_room(env, build(run_id))
    _refuse_caddyfile(env, plan, caddyfile_deferred)
    if (refused := locks.refusal(env)) is not None:  # taken while this one planned
        raise refused
    for step in plan.steps:  # this id is never used: the real run takes its own
        step.details = {k: v.replace(run_id, NEW_RUN_ID) if isinstance(v, str) else v
                        for k, v in step.details.items()}
    held = locks.status(env)
    # no refusal: taking it takes any lock there over (a dead holder's, a half-written one)
    now = ("free" if held is None else f"{held.describe()}: would be taken over"
           + (f" ({held.why})" if held.stealable else ""))
    plan.steps.insert(0, Step("lock", "Take the deploy lock",
                              {"path": str(env.lock_path), "now": now},
                              phase=Phase.PREFLIGHT))
    return RunResult(plan, run_id, dry_run=True)


def _perform(env: Environment, action: str, build: Callable[[str], Plan], run_id: str,
             reason: str, confirm: Callable[[Plan], bool] | None,
             progress: Callable[..., None] | None, notify: Callable[[str], None],
             signals: Signals, caddyfile_deferred: bool = False) -> RunResult:
    journal = journals.Journal.open(env, action, run_id=run_id, why=reason)
    result: RunResult | None = None
    notices: list[str] = []
    executing = False  # before execute() nothing has changed: the lock, the plan, the prompt

    def say(message: str) -> None:
        notices.append(message)
        with contextlib.suppress(OSError, ValueError):  # a closed terminal never stops a run
            notify(message)

    for warning in journal.warnings:  # a log folder others can write
        say(f"{WARNING}{warning}")
    try:
        with journal.step("lock", "Take the deploy lock") as rec:
            # not interruptible: taking the lock never waits, and a signal between its mkdir
            # and its holder file would leave a lock naming nobody (stale only after
            # lock_stale_after); one that arrives now is acted on when planning starts
            held = locks.acquire(env, reason=reason, run_id=run_id)
            refreshed = [time.monotonic()]  # when the lock's expiry clock last restarted
            rec.detail(path=str(env.lock_path))
            if held.stolen_from is not None:
                taken = (f"took over a stale deploy lock held by {held.stolen_from.describe()} "
                         f"({held.stolen_from.why})")
                journal.log("WARN", taken, step="lock")
                journal.set(stale_lock_taken_over=taken)
                say(taken)
            if held.state_warning:  # corrupt for good: the plans that need it refuse
                journal.log("WARN", held.state_warning, step="lock")
                say(f"{WARNING}{held.state_warning}")
        try:
            with _heartbeat(held, env), journal.step("plan", "Load state and plan") as rec:
                for swept in _sweep(env):
                    journal.log("WARN", f"removed a temp file a killed run left: {swept}",
                                step="plan")
                with signals.interruptible():
                    try:
                        plan = _with_room(env, build(run_id))
                    except AlreadyDone as done:
                        raise _completed(env, done, held.stolen_from) from None
                _refuse_caddyfile(env, plan, caddyfile_deferred)
                # where it sends traffic, in its run record: a rerun that takes over its
                # lock, should it be killed after its last step, reads what it did there
                journal.set(**{key: str(plan.facts[fact]) for key, fact in (
                    ("to_slot", "to_slot"), ("to_version", "to")) if plan.facts.get(fact)})
                named = plan.intent.deployment_id if plan.intent else None
                journal.for_deployment(named)
                with contextlib.suppress(OSError):  # publish writes it into the state file
                    held.for_deployment(named)  # the lock's deployment_id says the same
                if plan.finishing:
                    say(f"finishing an interrupted run: {plan.finishing}")
                    journal.set(finishing=plan.finishing)
            journal.log("INFO", f"plan: {plan.summary}", plan=plan.to_json())
            result = RunResult(plan, run_id, dry_run=False, notices=notices)
            if confirm is None:  # no prompt shows the plan (--yes): its warnings still show
                for warning in plan.warnings:
                    say(f"{WARNING}{warning}")
            # confirmed (or --yes): from here a closed terminal no longer stops the run
            hung_up = functools.partial(_hung_up, journal, say)
            if confirm is not None:  # a prompt may stay open: the lock is kept fresh
                with signals.interruptible(), _heartbeat(held, env):
                    if not confirm(plan):
                        raise NotConfirmed("not confirmed at the prompt; nothing was changed",
                                           "run again and answer y, or pass --yes")
                    # at the answer, still inside: the heartbeat's join (up to 5 s) and the
                    # trap's end come after it, where a SIGHUP stopped the confirmed run
                    # (found by review)
                    signals.on_hangup = hung_up
            signals.on_hangup = hung_up
            # its first record makes the file anyway; a write refused there refuses the run
            # only where the run records in the file (a snapshot restore does not)
            held.publish(create=action == "deploy", strict=action not in NO_STATE_RECORD)
            if held.owner_lost:  # the run goes on: the file is written, its owner changed
                journal.log("WARN", held.owner_lost, step="lock")
                say(held.owner_lost)

            # a corrupt file's mirror failure is the corruption said above: never said again
            told: set[str] = {held.mirror_error} if held.state_warning and held.mirror_error \
                else set()
            telling = threading.Lock()

            def tell() -> None:
                # each problem once: another tool's lock in the state file beside this run,
                # or lock files that cannot be refreshed (they age for other tools). From
                # the heartbeat thread too: during a 30-minute restore, said then, not after
                with telling:
                    for problem in (held.mirror_error, held.lock_error):
                        if problem and problem not in told:
                            told.add(problem)
                            journal.log("WARN", f"deploy lock: {problem}", step="lock")
                            say(f"{WARNING}deploy lock: {problem}")

            def beat() -> None:
                # before every step and during long waits: a run whose lock was removed or
                # taken over (LockLostError) stops, and undoes what it did before the commit.
                # The refresh is due one interval after the lock was taken or last refreshed
                # (a quick run does not rewrite the state file at once).
                now = time.monotonic()
                if now - refreshed[0] < _interval(env):
                    held.check_owned()
                    return
                refreshed[0] = now
                try:
                    held.refresh()
                except LockLostError:
                    raise
                except (RunbookError, OSError):
                    pass  # a slow guard: the lock itself still holds
                tell()

            executing = True
            with _heartbeat(held, env, tell):
                result.outcomes = execute(plan, journal, progress, signals=signals,
                                          heartbeat=beat, notice=say)
        finally:
            _release(env, held, journal, say)
    except Interrupted as exc:
        error = RunbookError(f"interrupted by {exc} before any change; nothing was changed",
                             "run the command again when ready",
                             exit_code=ExitCode.FAILED_SAFELY)
        raise _failed(journal, error, result) from None
    except RunbookError as exc:
        raise _failed(journal, exc, result) from None
    except Exception as exc:
        # a bug met before any step ran: exit 1, as in a dry run; but not while an
        # interrupted run's record waits (its change may have taken effect: what is left of
        # it is for the journal and status, exit 5, found by review)
        if not executing and not _interrupted_run_waits(env):
            error = RunbookError(
                "unexpected failure before anything was changed (a bug in runbook: please "
                f"report this line): {type(exc).__name__}: {exc}",
                f"nothing needs undoing; the journal {journal.log_path} has what it met, and "
                f"`runbook status {command_arg(env)}` shows what runs",
                exit_code=ExitCode.FAILED_SAFELY)
        else:
            error = RunbookError(f"unexpected failure: {type(exc).__name__}: {exc}",
                                 f"read the journal {journal.log_path}; run `runbook status "
                                 f"{command_arg(env)}` to see what runs",
                                 exit_code=ExitCode.ATTENTION)
        journal.log("ERROR", f"unexpected failure: {type(exc).__name__}: {exc}",
                    exception=repr(exc))
        raise _failed(journal, error, result) from None
    journal.log("SUCCESS", f"{action} finished: {plan.summary}")
    journal.finish("success", 0)
    if (lost := incomplete(journal)) is not None:
        say(lost)
    result.log_file = str(journal.log_path)
    result.record_file = str(journal.record_path)
    return result


@contextlib.contextmanager
def journaled(env: Environment, action: str, why: str,
              notify: Callable[[str], None]) -> Iterator[Callable[..., None]]:
    """The contract's log of a command that changes the host outside `perform` (snapshot
    create and cleanup, unlock): its first line says who ran it, the block logs what it
    changed through the function it is given, and the last line how it ended, with the exit
    code the process exits with. No run record: status shows the last run's, and a killed
    restore is looked for back through the records (journal.past_records), to which an
    hourly `snapshot create` would add one each hour. Never in the command's way: a log that
    cannot be written (a full disk) is said through `notify`, and the command goes on; a log
    folder this user may not write, each caller refuses first (disk.refuse_unwritable)."""
    journal: journals.Journal | None = None
    try:
        journal = journals.Journal.open(env, action, why=why, record=False)
    except RunbookError as exc:
        notify(f"{WARNING}the journal is incomplete: {exc.message}; this output is the full "
               "account of this command")
    for warning in journal.warnings if journal is not None else ():
        notify(f"{WARNING}{warning}")

    def log(level: str, message: str, /, **fields: Any) -> None:
        if journal is not None:
            journal.log(level, message, **fields)

    try:
        yield log
    except BaseException as exc:
        if journal is not None:
            if isinstance(exc, RunbookError):  # printed by the command as before, unchanged
                journal.log("ERROR", str(exc), exit_code=int(exc.exit_code))
            journal.fail(exc)
        raise
    else:
        if journal is not None:
            journal.finish("success", 0)
    finally:
        if journal is not None and (lost := incomplete(journal)) is not None:
            notify(f"{WARNING}{lost}")


def _hung_up(journal: Any, say: Callable[[str], None]) -> None:
    """The terminal closed (SIGHUP) while the confirmed run executes: it goes on (plan.Signals);
    the journal says so, and where the rest of its output is. Stdin becomes /dev/null: no
    later read (of ours, or of a child started from here) waits on a terminal nobody is at."""
    if journal.finished_at is None:
        journal.log("WARN", f"terminal closed (SIGHUP): the run goes on; its output is in "
                    f"the journal {journal.log_path}", step="signal")
    say("terminal closed (SIGHUP): the run goes on")  # a `kill -HUP`'s terminal may be there
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.dup2(devnull, 0)
    os.close(devnull)


def _interrupted_run_waits(env: Environment) -> bool:
    """An interrupted run's record is there (or cannot be looked for)."""
    try:
        return intents.path(env).exists()
    except OSError:
        return True


def _failed(journal: Any, exc: RunbookError, result: RunResult | None) -> RunbookError:
    """Journal the failure with the exit code the process will exit with."""
    journal.log("ERROR", str(exc), exit_code=int(exc.exit_code))
    journal.failure = {"type": type(exc).__name__, "message": exc.message, "fix": exc.fix}
    journal.finish("took effect" if exc.exit_code is ExitCode.TOOK_EFFECT else "failed",
                   int(exc.exit_code))
    with contextlib.suppress(Exception):
        exc.log_file = str(journal.log_path)  # type: ignore[attr-defined]
        exc.journal_incomplete = incomplete(journal)  # type: ignore[attr-defined]
        exc.result = result  # type: ignore[attr-defined]
    return exc


def _completed(env: Environment, done: AlreadyDone,
               dead: locks.LockStatus | None) -> RunbookError:
    """A refusal because the work is done, said as the completion it is when the run that
    did it is the one whose stale lock this run took over: killed after its last step, before
    its release, it finished. Found by a kill fuzz: "rolled back from" alone, with the lock
    taken over, read at 3 a.m. as a failure. What that run was is its own run record's
    action, never this run's: a switch back to the previous version is recorded as a
    rollback, and was called one by a `runbook rollback` typed after it. A switch between
    two slots running one version names no run in the state file (its record keeps its id):
    that run's own record must show it instead (_switched_there). The exit code stays the
    refusal's."""
    holder = dead.holder if dead is not None else None
    if holder is None:
        return done
    if done.done_by and done.done_by in (holder.run_id, holder.deployment_id):
        by = done.done_by  # older holders: the run id there
        record = journals.record_of(env, holder.run_id or done.done_by)
    elif holder.run_id and (record := _switched_there(env, holder.run_id, done)) is not None:
        by = holder.run_id
    else:
        return done
    who = ", ".join(([f"pid {holder.pid}"] if holder.pid is not None else []) + [f"run {by}"])
    was = record.get("action") if record is not None else None
    return AlreadyDone(
        f"the killed run whose stale lock this one took over ({who}) had completed its "
        f"{one_line(was) if isinstance(was, str) and was else 'work'} before it died: traffic "
        f"is on {done.serving}, nothing is left to do, and `runbook status {command_arg(env)}` "
        f"confirms it; so this run is refused: {done.message}", done.fix,
        done_by=by, slot=done.slot, version=done.version)


def _switched_there(env: Environment, run_id: str, done: AlreadyDone) -> dict[str, Any] | None:
    """The run record of `run_id` when it shows a switch to where traffic is (`done`: the
    state file records it there, Caddy runs it, no intent record waits) whose every step
    ended, its state step done: the switch finished, as its intent record, gone, says too.
    None otherwise, and for a record a power loss left older (only the last write is
    fsynced), or that names no target (written before `to_slot` was recorded): never said
    completed on less."""
    record = journals.record_of(env, run_id)
    if record is None or record.get("action") != "switch":
        return None
    context, steps = record.get("context"), record.get("steps")
    if not isinstance(context, dict) or not isinstance(steps, list) \
            or context.get("to_slot") != done.slot or context.get("to_version") != done.version:
        return None
    ended = (journals.StepStatus.OK.value, journals.StepStatus.SKIPPED.value)
    if not all(isinstance(s, dict) and s.get("status") in ended for s in steps):
        return None
    return record if any(s.get("name") == "state" and s.get("status") == ended[0]
                         for s in steps) else None


def _with_room(env: Environment, plan: Plan) -> Plan:
    """The plan, warning of a filesystem the run may not be able to write to (nearly full,
    or read-only) before on-call confirms: after the commit, the state file is written there.
    Not the snapshot folder: a run that takes a snapshot refuses a short one while it plans
    (snapshots/room.py), and one that takes none is not held up by it (nor made to import the
    snapshot modules: ~20 ms of every start, tests/test_speed.py)."""
    plan.warnings += [f"{problem}; {fix}" for problem, fix in disk.problems(disk.rooms(env))]
    return plan


def _release(env: Environment, held: locks.Lock, journal: Any,
             say: Callable[[str], None]) -> None:
    """Release the lock without ever replacing the run's outcome: it runs in a `finally`, and
    an error raised there (a filesystem gone read-only) would stand in for the one in flight,
    e.g. turn "the rollback TOOK EFFECT" into "cannot use the lock directory" with exit 2.
    A lock left behind names this run's process, which has exited: the next run takes it over
    and says so."""
    try:
        with journal.step("unlock", "Release the deploy lock"):
            locks.release(env, held, clear_stolen_copy=not intents.path(env).exists())
            if held.cleared_copy:  # a takeover that changed nothing: the dead run's copy
                journal.log("INFO", f"deploy lock: {held.cleared_copy}", step="unlock")
                say(f"deploy lock: {held.cleared_copy}")
            # found by review: unsaid, the Go CLI waited 30 min (a corrupt file holds no copy
            # anyone reads: its corruption was said instead)
            if held.unreleased_copy and not held.state_warning:
                left = (f"deploy lock: the state file {env.state_file} still says this run "
                        f"holds the lock ({held.unreleased_copy}): tools that read only that "
                        f"file (the Go CLI) wait until it expires (by "
                        f"{held.expires_at:%Y-%m-%dT%H:%M:%SZ} at the latest), or until "
                        f"`runbook unlock {command_arg(env)} --yes` by a user who may write "
                        "it clears it")
                journal.log("WARN", left, step="unlock")
                say(left)
    except (RunbookError, OSError) as exc:
        say(f"the deploy lock {env.lock_path} could not be released ({exc}); the next run "
            "takes it over and says so, since this run has exited")


def incomplete(journal: Any) -> str | None:
    """What on-call must know when the journal could not be written (a full disk): the
    journal would otherwise be cited as the record of a run it holds only part of."""
    errors: list[str] = journal.write_errors
    if not errors:
        return None
    return (f"the journal is incomplete: {len(errors)} write(s) failed (first: {errors[0]}); "
            "this output is the full account of this run, and `runbook status` shows what "
            "runs")


def _interval(env: Environment) -> float:
    """How often the lock is refreshed: well before it could be judged expired."""
    return max(1.0, min(60.0, env.lock_stale_after / 4))


@contextlib.contextmanager
def _heartbeat(held: locks.Lock, env: Environment,
               tell: Callable[[], None] | None = None) -> Iterator[None]:
    """Refresh the lock from a thread while a step blocks (a long restore, a slow Docker):
    the run never looks crashed. The state file's copy is refreshed by the main thread
    between steps and, during a step longer than half the lock's lifetime, by this thread,
    never inside one of this process's state writes (Lock.refresh_from_thread)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(_interval(env)):
            with contextlib.suppress(RunbookError, OSError):
                held.refresh_from_thread()
            if tell is not None:  # what the refresh met (lock_error, mirror_error), once
                tell()

    thread = threading.Thread(target=loop, name="runbook-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _sweep(env: Environment) -> list[str]:
    """Temp files a killed writer left beside the state file, the Caddyfile and every record
    a run writes beside them: those of the Caddyfile's backup, the slot markers, the restore
    markers and the kept state copy were never swept (found by a kill fuzz)."""
    from runbook import kept_state, restore_records, slots
    from runbook.caddy import switch

    targets = [env.state_file, env.caddy.caddyfile, intents.path(env), switch.backup_path(env),
               restore_records.doubt_marker(env), restore_records.unfinished_marker(env),
               kept_state.copy_path(env.runs_dir, env.state_file, env.name),
               *(marker(env, slot) for slot in Slot
                 for marker in (slots.held_marker, slots.switch_marker))]
    return [str(p) for target in targets for p in files.sweep_temps(target)]
