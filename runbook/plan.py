"""Plan, then act, as one transaction with a commit point.

A mutating run is a list of steps in four phases:

    preflight (read-only, done while planning)
    prepare   (undoable: start/recreate the standby, restore, migrate, health gate)
    commit    (the verified traffic switch: the commit point)
    finish    (record the state, stop the old slot)

`--dry-run` renders the steps with every resolved value; execution runs the very same steps in
order, journaling each. There is exactly one undo mechanism: a prepare or commit step registers
what undoes it (`ctx.on_failure`). Before the commit, any failure or signal runs the undos in
reverse and leaves traffic where it was, but a signal once a step did what only the commit
ends the outage of (a restored database, `ctx.until_commit`): undone, the service stays down,
so the run carries on to the commit. After the commit nothing is ever undone: a failure or
signal in finish stops, says the change TOOK EFFECT and what is left (exit 6), and the next run
of the same command finishes it from the intent record (runbook/intent.py).
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from runbook import faults, files
from runbook import intent as intents
from runbook.environment import Environment, Slot, command_arg
from runbook.errors import ActFirstError, ExitCode, PreconditionError, RunbookError
from runbook.redact import redact
from runbook.restore_records import (
    ACCEPT_FLAG,
    CLEARS_AT_START,
    FINISHED_RESTORE,
    VERIFIED,
    clear_doubt,
    forget_finished,
    forget_unfinished,
    mark_served,
)

if TYPE_CHECKING:
    from runbook import docker

PUT_BACK = "put back the interrupted run's record"  # an undo that moves no traffic
# the switch step's undo (slots.switch_step): once it ran, Caddy may have sent users to the
# target before the undo, so an interrupted run never says "nothing took effect"
CADDY_UNDO = "put back the previous Caddyfile and load the config Caddy ran before"
WARNING = "warning: "  # a notice that starts so is a plan warning (the CLI labels it)


class Phase(StrEnum):
    PREFLIGHT = "preflight"
    PREPARE = "prepare"
    COMMIT = "commit"
    FINISH = "finish"


@dataclass
class Step:
    name: str  # machine name: preflight, start-slot, health-gate, switch, state, ...
    title: str  # on-call words: "Start the stopped green container"
    details: dict[str, str] = field(default_factory=dict)  # every resolved value
    run: Callable[[StepContext], Any] | None = None
    skip: str | None = None  # why this step will not run (shown in the plan)
    phase: Phase = Phase.PREPARE
    # a step a signal must not cut in half (a migration, the restore's transaction): one that
    # arrives meanwhile is acted on when the step ends, so what it did is known and reported
    hold_signals: bool = False
    # what a second signal does in such a step, when it has a way out (compose cut off: it
    # may hang); said on the terminal with the first signal's answer. None: it is held too
    second_signal: str | None = None
    # why this step clears a restore doubt on-call accepted (--accept-restored-data) though it
    # starts nothing (the record-only switch: the app already serves on that database); the
    # steps that start the app or change the data clear it anyway (CLEARS_AT_START)
    clears_doubt: str | None = None


_STEP_REF = re.compile(r"\{step:([a-z0-9-]+)\}")


def step_number(name: str) -> str:
    """A step detail's reference to the number the plan gives the step named `name`, filled
    in where the plan is shown (render, to_json, the journal): a dry run numbers its lock
    step first and a real run does not, so no number is known when the step is made."""
    return f"{{step:{name}}}"


@dataclass(frozen=True)
class Stays:
    """What an undo found it cannot undo (an app that migrated itself when it started): the
    run then ends as needing attention with this message and fix, as `cannot_undo` makes
    it, instead of "nothing took effect"."""

    message: str
    fix: str


@dataclass(frozen=True)
class Aside:
    """What an undo kept aside rather than write over (an edit made to the Caddyfile while
    the switch verified): said with the run's outcome; the undo itself was done."""

    message: str


class NotPutBack(Exception):
    """The replaced record was left replaced on purpose (this run's own says what stays)."""


class Skipped(Exception):
    """The undo did nothing, on purpose (why: the journal's): never said as "undone" (found
    by review: "undone: start the stopped app containers again" once the database was
    restored, which that undo never starts them on)."""


@dataclass
class StepContext:
    """What a running step may use: notes for the journal, its undo, live progress."""

    step: Step
    env: Environment | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    undos: list[tuple[str, Callable[[], Stays | Aside | None]]] = field(default_factory=list)
    undo_fixes: dict[str, str] = field(default_factory=dict)  # title -> on_failure's fix
    irreversible: list[tuple[str, str]] = field(default_factory=list)
    lasting: list[str] = field(default_factory=list)
    say: Callable[[str], None] = lambda message: None  # live progress for people waiting
    # what on-call must see even when the run succeeds (shown, and in --format json notices)
    notice: Callable[[str], None] = lambda message: None
    heartbeat: Callable[[], None] = lambda: None  # long waits call it: the lock stays fresh
    commit: Callable[[], None] = lambda: None  # the commit step calls it once verified
    signalled: Callable[[], int | None] = lambda: None  # a signal held since the step began
    # a step's way out of what it waits for (Step.second_signal): a second signal came
    cut_off: Callable[[], bool] = lambda: False
    # the step did what only the commit ends the outage of (a restored database, the app
    # slots stopped): from here a signal is held until the commit (`_Execution.carry_on`)
    until_commit: Callable[[str], None] = lambda why: None
    # a few words beside "ok" when the title is not the whole truth ("left running")
    result: str | None = None
    # write the notes so far into the run record now, durably: what a kill right after must
    # not lose (the journal records them otherwise when the step ends)
    keep: Callable[[], None] = lambda: None
    # write the run's intent record now, as the steps changed it (the container the health
    # gate proved): a kill between the switch and the commit's own write must not lose it
    keep_intent: Callable[[], None] = lambda: None

    def stop_if_signalled(self) -> None:
        """Right before a step that holds signals makes its first change: a Ctrl-C that came
        while it only read stops it here, where nothing needs undoing. Acted on only at the
        commit, it moved the users to the target and back again (found by review)."""
        if (signum := self.signalled()) is not None:
            raise Interrupted(signum)

    def note(self, **values: Any) -> None:
        self.notes.update(values)

    def on_failure(self, title: str, undo: Callable[[], Stays | Aside | None],
                   fix: str | None = None) -> None:
        """Register how to undo what this step just did, should the run stop before commit.
        `fix`: what on-call does by hand should the undo itself fail (said with the run's
        outcome when traffic never moved)."""
        self.undos.append((title, undo))
        if fix is not None:
            self.undo_fixes[title] = fix

    def cannot_undo(self, message: str, fix: str) -> None:
        """What this step did cannot be undone (a restored database): a later failure before
        the commit is reported as needing attention, with this message and fix."""
        self.irreversible.append((message, fix))

    def after_commit(self, what: str) -> None:
        """What this step did that stays once traffic moved, said with the outcome when the
        run stops after its commit (exit 6): `cannot_undo`'s words (the service is down) are
        no longer true then, but on-call must still find e.g. the data from before a
        restore, and the terminal may be all they read."""
        self.lasting.append(what)

    def fault(self, name: str) -> None:
        """A named point a drill may break the run at (runbook/faults.py)."""
        if self.env is not None:
            faults.point(self.env, name)


@dataclass
class Plan:
    action: str  # rollback | deploy | switch
    env: Environment
    summary: str
    steps: list[Step]
    warnings: list[str] = field(default_factory=list)
    caddy_diff: str = ""
    facts: dict[str, Any] = field(default_factory=dict)  # for --format json and reports
    intent: intents.Intent | None = None  # written before the first change
    resume_command: str = ""  # what to type to finish it after an interruption
    finishing: str | None = None  # the interrupted run this plan finishes, if any
    # an interrupted run's record this plan's intent overwrites (a repairing switch): put back
    # by an undo registered the moment it is overwritten, so every failure before the commit
    # (a signal or a lost lock right after the write included) leaves it for the next run
    replaces: intents.Intent | None = None
    # whether Caddy serves that record's target by it, as planned (Intent.describe's `moved`):
    # False for a record the run goes on from (finish.replaced), a repair's own reading else
    replaces_moved: bool | None = False
    # the restore doubt this run overrides with --accept-restored-data (its warning): said
    # when the run clears it, starting the app on that database (restore_records)
    accepted_doubt: str | None = None
    # what the commit point is when no traffic moves (a switch that records what serves)
    commit_point: str | None = None

    def details(self, step: Step) -> dict[str, str]:
        """`step`'s details, each reference to another step (step_number) as its number."""
        numbers: dict[str, int] = {}  # as render numbers them: the steps not skipped
        for number, each in enumerate((s for s in self.steps if not s.skip), 1):
            numbers.setdefault(each.name, number)
        return {k: _STEP_REF.sub(lambda m: str(numbers.get(m[1], "?")), v)
                if isinstance(v, str) else v for k, v in step.details.items()}

    def render(self) -> str:
        lines = [f"Plan: {self.summary}", f"Environment: {self.env.display}"
                 + (f" ({self.env.source})" if self.env.source else "")]
        for warning in self.warnings:
            lines.append(f"  ! {warning}")
        index = 0
        phase: Phase | None = None
        for step in self.steps:
            if step.phase is not phase and step.phase in (Phase.COMMIT, Phase.FINISH):
                lines.append(f"   --- commit point: {self.commit_point or 'traffic moves here'}; "
                             "nothing after it is undone ---" if step.phase is Phase.COMMIT
                             else "   --- after the commit: finishing steps ---")
            phase = step.phase
            if step.skip:
                marker = "skip"
            else:
                index += 1
                marker = f"{index:>2}."
            skipped = f"  [skipped: {step.skip}]" if step.skip else ""
            lines.append(f"{marker} {step.title}{skipped}")
            details = self.details(step)
            width = max((len(k) for k in details), default=0)
            for key, value in details.items():
                lines.append(f"      {key.ljust(width)}  {value}")
        if self.caddy_diff:
            lines.append("Caddyfile change:")
            lines.extend("      " + line for line in self.caddy_diff.rstrip("\n").splitlines())
        # what a prompt, --dry-run and a ticket show: a migrate command or a Caddyfile line
        # may hold a password, which the journal masks too
        return redact("\n".join(lines))

    def to_json(self) -> dict[str, Any]:
        from runbook.redact import scrub

        data: dict[str, Any] = scrub({
            "action": self.action, "environment": self.env.name, "summary": self.summary,
            "warnings": self.warnings, "caddy_diff": self.caddy_diff,
            "finishing": self.finishing,
            "steps": [{"name": s.name, "title": s.title, "phase": s.phase.value,
                       "details": self.details(s), "skip": s.skip} for s in self.steps],
            "facts": self.facts,
        })
        return data


@dataclass
class StepOutcome:
    name: str
    title: str
    status: str  # ok | failed | skipped | done (read-only checks made while planning) | left
    duration_ms: float
    error: str | None = None
    phase: str = Phase.PREPARE.value
    result: str | None = None  # StepContext.result: what an "ok" step did instead of its title


class TookEffectError(RunbookError):
    """The change committed (traffic moved, verified) but finishing steps did not all run."""

    exit_code = ExitCode.TOOK_EFFECT


# ---------------------------------------------------------------------------------------------
# Signals


class Interrupted(BaseException):
    """A signal arrived where stopping at once is safe (inside an undoable step)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Signals:
    """SIGINT, SIGTERM and SIGHUP become a decision, not a traceback.

    Inside `interruptible()` (undoable waits such as the health gate) a signal raises
    Interrupted at once; anywhere else (the switch, undos, finishing, journal writes) it is
    only recorded, and the executor acts on it at the next step boundary; from a point of
    no return until the commit (`going_on`), at the first boundary after the commit.
    Once the run executes its confirmed plan (`on_hangup` set), SIGHUP is none of these: a
    closed terminal is no request to stop (found by review: a dropped ssh session undid a
    confirmed rollback, users back on the bad release, where the same drop without a pty,
    which sends no SIGHUP, completed it; every terminal write already survives a closed
    terminal), so it is only told to `on_hangup`, once, and the run goes on to its own end.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.count = 0  # every signal handled so far (a second one may cut a step off)
        self.second: str | None = None  # what a second one does in the held step, if not held
        self.step_began = 0  # `count` when the step began
        self._armed = False
        self._previous: dict[signal.Signals, Any] = {}
        # the step that cannot stop half-way, while it runs, and how to tell on-call that
        # their Ctrl-C was heard (found by review: a held migration or restore took it in
        # silence, for as long as it ran, and a second Ctrl-C too)
        self.holding: str | None = None
        self.tell: Callable[[str], None] | None = None
        # what a signal is told instead while the run carries on to its commit point (a
        # restored database: stopping before it leaves the service down), and whether it was
        self.going_on: str | None = None
        self.told_going_on = False
        # set by the run once its plan executes: what a hangup does then instead of stopping
        # it (journal it); `hung_up`: it did, once, for the shell's and the kernel's SIGHUPs
        self.on_hangup: Callable[[], None] | None = None
        self.hung_up = False

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def _handler(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP and self.on_hangup is not None:
            # never `received` (nothing acts on it), never counted, never raised, even in
            # an undoable wait: the run goes on
            if not self.hung_up:
                self.hung_up = True
                with contextlib.suppress(Exception):  # nothing it meets stops the run
                    self.on_hangup()
            return
        if self.received is None:
            self.received = signum
        if signum != signal.SIGHUP:  # a closed terminal may send two: nobody asked twice
            self.count += 1
        if self._armed:
            self._armed = False
            raise Interrupted(signum)
        if self.going_on is not None and self.tell is not None:
            with contextlib.suppress(Exception):  # a closed terminal never stops the run
                self.tell(f"{signal.Signals(signum).name} received after {self.going_on}")
                self.told_going_on = True
        elif self.holding is not None and self.tell is not None:
            name = signal.Signals(signum).name
            with contextlib.suppress(Exception):  # a closed terminal never stops the run
                if self.second is not None and self.count - self.step_began >= 2:
                    self.tell(f"{name} received again: it {self.second}")
                    return
                self.tell(f"{name} received while \"{self.holding}\" "
                          "runs: it cannot be stopped half-way, so the run stops when it ends "
                          "(undoing what it did, traffic included, if it is before the "
                          "commit point, or saying what is left to finish if it is after)"
                          + (f"; another Ctrl-C {self.second}" if self.second else ""))

    @contextlib.contextmanager
    def installed(self) -> Iterator[Signals]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals are only delivered to the main thread anyway
            return
        for handled in HANDLED:
            # a hangup the run was started to ignore stays ignored: `nohup runbook ...` must
            # outlive the closed session, not undo itself (or stop after its commit with the
            # old slot left running). SIGINT is always handled: a shell ignores it in its
            # background jobs, and Ctrl-C there is still on-call's way to stop a run
            if handled == signal.SIGHUP and signal.getsignal(handled) is signal.SIG_IGN:
                continue
            self._previous[handled] = signal.signal(handled, self._handler)
        try:
            yield self
        finally:
            for handled, previous in self._previous.items():
                if handled == signal.SIGHUP and self.on_hangup is not None \
                        and callable(previous):
                    # the run executed: its outcome stands, and the CLI's own handler (which
                    # stops a command) would turn the closed terminal's next SIGHUP (the
                    # kernel's, after the shell's) into "interrupted", exit 129, as it
                    # reports a finished run. A default or SIG_IGN is put back as it was.
                    previous = _after_the_run
                signal.signal(handled, previous)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        if self.received is not None:
            raise Interrupted(self.received)
        self._armed = True
        try:
            yield
        finally:
            self._armed = False


def _after_the_run(signum: int, frame: object) -> None:
    """SIGHUP once a run executed, while its outcome is reported: nothing to stop."""


# ---------------------------------------------------------------------------------------------
# The executor


def execute(plan: Plan, journal: Any, progress: Callable[..., None] | None = None, *,
            signals: Signals | None = None,
            heartbeat: Callable[[], None] = lambda: None,
            notice: Callable[[str], None] = lambda message: None) -> list[StepOutcome]:
    """Run the plan as one transaction (see the module docstring)."""
    run = _Execution(plan, journal, progress, signals or Signals(), heartbeat, notice)
    return run.go()


@dataclass
class _Execution:
    plan: Plan
    journal: Any
    progress: Callable[..., None] | None
    signals: Signals
    heartbeat: Callable[[], None]
    notice: Callable[[str], None]
    outcomes: list[StepOutcome] = field(default_factory=list)
    undos: list[tuple[str, Callable[[], Stays | Aside | None]]] = field(default_factory=list)
    irreversible: list[tuple[str, str]] = field(default_factory=list)
    lasting: list[str] = field(default_factory=list)  # StepContext.after_commit
    committed: bool = False
    # why the run no longer stops for a signal before the commit (StepContext.until_commit):
    # the undo cannot end an outage this run made, going on to the commit point does
    carry_on: str | None = None
    carry_logged: bool = False
    intent_written: bool = False
    undo_failed: bool = False
    undo_fixes: dict[str, str] = field(default_factory=dict)  # StepContext.on_failure's
    # a COMMIT step (the switch) began: before that, traffic cannot have moved, whatever an
    # undo that failed left (found by review: "traffic may not be where it was" was said of
    # a start the engine could not undo, with no switch begun)
    commit_begun: bool = False

    @property
    def env(self) -> Environment:
        return self.plan.env

    def _say(self, event: str, step: Step, message: str = "") -> None:
        if self.progress is None:
            return
        with contextlib.suppress(OSError, ValueError):  # a closed terminal never stops a run
            self.progress(event, step, message) if message else self.progress(event, step)

    def go(self) -> list[StepOutcome]:
        steps = self.plan.steps
        for index, step in enumerate(steps):
            if step.run is None or step.skip:
                status = "skipped" if step.skip else "done"
                self.outcomes.append(StepOutcome(step.name, step.title, status, 0.0, step.skip,
                                                 step.phase.value))
                self.journal.log("INFO", f"{'skipped' if step.skip else 'checked'}: "
                                 f"{step.title}" + (f" ({step.skip})" if step.skip else ""),
                                 step=step.name, phase=step.phase.value)
                continue
            self._begin_changes()
            faults.point(self.env, f"before:{step.name}")
            self._check_signal(steps[index:])
            self._beat(steps[index:])
            self._run(step, steps[index + 1:])
            faults.point(self.env, f"after:{step.name}")
            self._check_signal(steps[index + 1:])
        self._end()
        return self.outcomes

    def _begin_changes(self) -> None:
        """Before the first change: the intent, durably; failing that, nothing happens."""
        if self.intent_written or self.plan.intent is None:
            return
        if (old := self.plan.replaces) is not None:
            def put_back(old: intents.Intent = old) -> None:
                # unless this run left something that stays, or an undo failed: its own
                # record says so then (the run keeps it, and the next one must read it)
                if not self.irreversible and not self.undo_failed:
                    intents.write(self.env, old)
                    return
                # this run's record stands now: without its copy of the one it replaced,
                # which the next run would otherwise go on from (intents.standing; found by
                # review: a second failed deploy was forgotten for the first one)
                mine = self.plan.intent
                if mine is not None and intents.REPLACES in mine.record:
                    mine = mine.with_(record={k: v for k, v in mine.record.items()
                                              if k != intents.REPLACES})
                    try:
                        intents.write(self.env, mine)
                        self.plan.intent = mine
                    except OSError:
                        pass  # the copy stays; the message below still names the record
                said = old.describe(moved=self.plan.replaces_moved)
                raise NotPutBack(f"the interrupted run's record ({said}) was not "
                                 "put back: this run's record, which says what stays, "
                                 "replaces it")

            self.undos.append((PUT_BACK, put_back))
            self.journal.log("WARN", f"this run's record replaces the interrupted run's: "
                             f"{old.describe(moved=self.plan.replaces_moved)}", step="intent",
                             replaced=old.run_id)
            # and keeps a copy of it: killed before traffic moves, this run never puts it
            # back, and the next run reads it from here (intents.standing)
            copy = asdict(old)
            copy["record"] = {k: v for k, v in copy["record"].items() if k != intents.REPLACES}
            self.plan.intent.record[intents.REPLACES] = copy
        try:
            intents.write(self.env, self.plan.intent)
        except OSError as exc:
            raise PreconditionError(
                f"cannot record the run's intent at {intents.path(self.env)}: "
                f"{exc.strerror or exc}; nothing was changed",
                files.write_fix(exc, intents.path(self.env).parent,
                                "fix the permissions of the state file's directory",
                                target=intents.path(self.env))) from None
        self.intent_written = True
        if self.plan.intent.phase is intents.Phase.COMMITTED:
            self.committed = True  # finishing an interrupted run that already took effect
            self.journal.log("SUCCESS", "commit point reached: traffic moved and was verified "
                             f"(by the interrupted run {self.plan.intent.run_id})",
                             step="commit")

    def _run(self, step: Step, rest: list[Step]) -> None:
        ctx = StepContext(step, env=self.env, heartbeat=self.heartbeat)
        ctx.say = lambda message: self._say("note", step, redact(message))  # app text too
        ctx.notice = self.notice
        ctx.commit = self._commit
        ctx.keep_intent = self._keep_intent
        ctx.signalled = lambda: None if self._carrying else self.signals.received
        began_at = self.signals.step_began = self.signals.count
        # never while carrying on to the commit: cut off there, the service stays down
        ctx.cut_off = lambda: step.second_signal is not None and not self._carrying \
            and self.signals.count - began_at >= 2
        ctx.until_commit = lambda why: self._until_commit(why, rest)
        self._say("start", step)
        started = time.monotonic()
        if step.phase is Phase.COMMIT:
            self.commit_begun = True
        interruptible = step.phase is Phase.PREPARE and not step.hold_signals \
            and not self._carrying
        self.signals.tell = self.notice
        self.signals.holding = None if interruptible else step.title
        self.signals.second = None if interruptible or self._carrying else step.second_signal
        try:
            with self.journal.step(step.name, step.title) as record:
                record.detail(phase=step.phase.value, **self.plan.details(step))

                def keep() -> None:
                    record.detail(**{k: str(v) for k, v in ctx.notes.items()})
                    self.journal.save()

                ctx.keep = keep
                if step.name in CLEARS_AT_START:
                    self._clear_doubt(step)
                    self._mark_served(step)
                elif step.clears_doubt is not None and self.plan.accepted_doubt:
                    self._clear_doubt(step, step.clears_doubt)
                try:
                    with self.signals.interruptible() if interruptible \
                            else contextlib.nullcontext():
                        step.run(ctx)  # type: ignore[misc]
                finally:
                    self.undos.extend(ctx.undos)
                    self.undo_fixes.update(ctx.undo_fixes)
                    self.irreversible.extend(ctx.irreversible)
                    self.lasting.extend(ctx.lasting)
                    if ctx.notes:
                        record.detail(**{k: str(v) for k, v in ctx.notes.items()})
        except BaseException as exc:
            self.signals.holding = self.signals.second = None  # the undos say their own
            took = (time.monotonic() - started) * 1000
            self.outcomes.append(StepOutcome(step.name, step.title, "failed", took,
                                             _describe(exc), step.phase.value))
            self._say("failed", step)
            if self.committed:
                raise self._took_effect(exc, rest, failed=step) from None
            raise self._rolled_back(exc) from None
        finally:
            self.signals.holding = self.signals.second = None
        self.outcomes.append(StepOutcome(step.name, step.title, "ok",
                                         (time.monotonic() - started) * 1000, None,
                                         step.phase.value, ctx.result))
        self._say("done", step)
        if step.phase is Phase.COMMIT and not self.committed:
            try:  # a commit step that returned without committing: a pending signal still
                self._commit()  # undoes it (raised bare, it read "before any change")
            except Interrupted as exc:
                raise self._rolled_back(exc) from None

    def _clear_doubt(self, step: Step, does: str = "starts the app on that database or "
                                                    "changes it") -> None:
        """A step that starts the app or changes the data (its record says it began, which
        clears the doubt in the run records too), or that `does` what on-call accepted: the
        restore doubt recorded beside the state file is cleared, and the journal says so and
        why."""
        accepted = f", as {ACCEPT_FLAG} accepted" if self.plan.accepted_doubt else ""
        said = clear_doubt(self.env, f"the {self.plan.action} run {self.journal.run_id} "
                                     f"{does} (its step \"{step.title}\"{accepted})")
        if said is None:
            return
        message, cleared = said
        self.journal.log("INFO" if cleared else "WARN", message, step=step.name)
        if not cleared:
            with contextlib.suppress(Exception):  # a closed terminal never stops a run
                self.notice(message)

    def _mark_served(self, step: Step) -> None:
        """A step that starts the app or changes the data: an unfinished restore recorded
        beside the state file no longer left the database as it is (another operator's next
        restore must not name its safety snapshot as the data from before)."""
        said = mark_served(self.env, self.journal.run_id,
                           f"the {self.plan.action} run {self.journal.run_id} starts the app "
                           f"or changes the data (its step \"{step.title}\")")
        if said is not None:
            self.journal.log("WARN", said, step=step.name)
            with contextlib.suppress(Exception):  # a closed terminal never stops a run
                self.notice(said)

    def _keep_intent(self) -> None:
        """The intent record as the steps changed it, on disk before the switch: the finish
        of a run killed between Caddy's reload and the commit's write reads it (a reboot
        there restarts the new slot, whose proved container the finish must compare)."""
        if self.plan.intent is None or not self.intent_written:
            return
        try:
            intents.write(self.env, self.plan.intent)
        except OSError as exc:  # the commit's write tries again; say it, go on
            self.journal.log("WARN", f"could not write the intent record: "
                             f"{exc.strerror or exc}", step="health-gate")

    def _commit(self) -> None:
        """The commit point: the switch is verified. A signal that arrived during the switch,
        before this, still undoes it; from here on nothing is undone."""
        if self.committed:
            return
        if self.signals.received is not None and not self._carrying:
            raise Interrupted(self.signals.received)
        self.committed = True
        self.signals.going_on = None  # held from here as after any commit (_check_signal)
        self.journal.log("SUCCESS", "commit point reached: "
                         + (self.plan.commit_point or "traffic moved and was verified"),
                         step="commit")
        intent = self.plan.intent
        if intent is None:
            return
        self.plan.intent = intent = intent.with_(phase=intents.Phase.COMMITTED)
        try:
            intents.write(self.env, intent)
        except OSError as exc:  # the next run reads Caddy anyway; say it, go on
            self.journal.log("WARN", f"could not mark the intent as committed: "
                             f"{exc.strerror or exc}", step="commit")

    def _beat(self, rest: list[Step]) -> None:
        """The heartbeat between steps: it raises when the run lost its lock (another run
        or tool holds it now), which stops this one like any failure at that point."""
        try:
            self.heartbeat()
        except RunbookError as exc:
            if self.committed:
                raise self._took_effect(exc, [s for s in rest if s.run and not s.skip]) \
                    from None
            raise self._rolled_back(exc) from None

    @property
    def _carrying(self) -> bool:
        return self.carry_on is not None and not self.committed

    def _until_commit(self, why: str, rest: list[Step]) -> None:
        """From here until the commit point (or the plan's end, when it has none: a
        standalone restore's last step starts the app again) a signal no longer stops the
        run: what it did cannot be undone and leaves the service down until then, so
        stopping would turn a maintenance window into an open-ended outage. After the
        commit, a signal stops the run at the next step boundary as usual (exit 6)."""
        if self.carry_on is not None:
            return
        self.carry_on = why
        until = ("until traffic has moved (the commit point), then stops"
                 if any(s.phase is Phase.COMMIT for s in rest) else "to its end")
        self.signals.going_on = (f"{why}: stopping now would leave the service down, so the "
                                 f"run carries on {until}")

    def _check_signal(self, rest: list[Step]) -> None:
        if self.signals.received is None:
            return
        if self._carrying:  # said once, at once (the handler says it of a later signal)
            if not self.signals.told_going_on and self.signals.going_on is not None:
                self.signals.told_going_on = True
                with contextlib.suppress(Exception):  # a closed terminal never stops it
                    self.notice(f"{self.signals.name} received after {self.signals.going_on}")
            if not self.carry_logged:
                self.carry_logged = True
                self.journal.log("WARN", f"{self.signals.name} received after "
                                 f"{self.signals.going_on}", step="signal")
            return
        exc = Interrupted(self.signals.received)
        if self.committed:
            left = [s for s in rest if s.run and not s.skip]
            if not left:  # everything is done: the signal came too late to matter
                self.journal.log("WARN", f"{self.signals.name} received after the last step; "
                                 "the run is complete", step="finish")
                return
            raise self._took_effect(exc, left)
        raise self._rolled_back(exc)

    def _restore_finished(self) -> None:
        """This run's restore finished (the run ended): what unfinished restores kept beside
        the state file is ordinary retention again, for every operator's cleanup, as the run
        records' reading stops at a finished restore. Killed or failed after it (even after
        the commit), the record stays: a rerun needs what it names, and the one that finishes
        the run ends it, when the run's intent record says its check passed (VERIFIED)."""
        intent = self.plan.intent
        if any(o.name == "restore-database" and o.status == "ok" for o in self.outcomes):
            said = forget_unfinished(self.env)
        elif self.plan.finishing is not None and intent is not None \
                and intent.record.get(VERIFIED):
            # a finish of a run killed after its restore's check passed (its record says so;
            # the run records are per user): that restore ends with it, as it would have;
            # said beside the state file for every operator's readers, and in this run's
            # record for this operator's, should that write fail
            said = forget_finished(self.env, intent.run_id, self.journal.run_id)
            self.journal.set(**{FINISHED_RESTORE: intent.run_id})
        else:
            return
        if said is not None:
            self.journal.log("WARN", said, step="finish")

    def _end(self) -> None:
        self._restore_finished()
        if self.intent_written and self.plan.intent is not None \
                and not intents.clear(self.env, self.plan.intent.run_id):
            self.journal.log("WARN", f"could not remove {intents.path(self.env)} (or read "
                             "it): the next run finds the work done and removes it, or, "
                             "unreadable, says so and how to move it aside", step="finish")

    # -- failure before the commit: undo everything, in reverse --------------------------
    def _rolled_back(self, cause: BaseException) -> RunbookError:
        """Undo what the run did (_undone), then say the service is down when it is: exit 1
        reads "traffic stayed on a healthy slot", untrue while the slot Caddy points at is
        not running (found by review: a rollback whose target failed its gate, both slots
        stopped, the proxy answering 502, exited 1 saying nothing of it)."""
        error = self._undone(cause)
        if error.exit_code != ExitCode.FAILED_SAFELY or (down := self._serving_down()) is None:
            return error
        slot, info = down
        state = f"{info.status}" if info.exists else "absent"
        # no step before the commit leaves the serving slot stopped but a restore's, whose
        # undo starts it again or ends the run with exit 5 itself (Stays, cannot_undo)
        said = (f"THE SERVICE IS DOWN: {slot}, the slot Caddy points at, is not running (its "
                f"container {info.name} is {state}{self._down_since(info)}): this run did "
                "not stop it, and traffic stays there")
        error.exit_code = ExitCode.ATTENTION
        error.message = f"{said}; {error.message}"
        error.args = (error.message,)
        # status first: whether `docker start` is safe depends on what it alone reads (the
        # build it holds, a restore unfinished or doubted, the schema the database is at)
        verb = "unpause" if info.status == "paused" else "start"
        back = (f"`docker {verb} {info.name}` when it holds the build the state file records "
                "and nothing there says otherwise" if info.exists
                else f"a deploy, its container {info.name} being absent")
        error.fix = (f"`runbook status {command_arg(self.env)}` first: it names what brings "
                     f"{slot} back ({back})" + (f"; then {error.fix}" if error.fix else ""))
        self.journal.log("ERROR", said, step="undo")
        return error

    def _down_since(self, info: docker.ContainerInfo) -> str:
        """When the container stopped, as Docker's FinishedAt says, against this run's start
        (the oracle for "it was down before this run"); "" when that cannot be told (never
        started, unreadable)."""
        from runbook.times import format_utc, parse_rfc3339

        if info.status not in ("exited", "dead"):  # paused, restarting: it stopped no time
            return ""
        try:
            stopped = parse_rfc3339(info.finished_at or "")
        except ValueError:
            return ""
        began = getattr(self.journal, "started_at", None)
        if stopped is None or not isinstance(began, datetime) or began.tzinfo is None:
            return ""
        if stopped < began:
            return f" since {format_utc(stopped)}, before this run began"
        return f" since {format_utc(stopped)}, during this run"

    def _serving_down(self) -> tuple[Slot, docker.ContainerInfo] | None:
        """(slot, its container) when the slot Caddy's loaded config points at is not
        running; None when it runs, or when Caddy or Docker cannot tell (nothing is
        claimed then)."""
        from runbook import traffic

        try:
            return traffic.serving_stopped(self.env)
        except Exception:  # unread: the run's own error stands, and nothing is claimed
            return None

    def _undone(self, cause: BaseException) -> RunbookError:
        failed: list[str] = []  # undos of what users reach (traffic, slots)
        fixes: list[str] = []  # what to do by hand for those (StepContext.on_failure's fix)
        unkept: list[str] = []  # what was not put back, or was kept aside: said as it is
        done: list[str] = []
        for title, undo in reversed(self.undos):
            try:
                stays = undo()
                if isinstance(stays, Aside):  # undone; what it kept aside is said with it
                    unkept.append(stays.message)
                    self.journal.log("WARN", stays.message, step="undo")
                elif stays is not None:  # undone, and found what cannot be (ctx.cannot_undo)
                    self.irreversible.append((stays.message, stays.fix))
            except Skipped as why:  # it did nothing: the run's own words say what stays
                self.journal.log("INFO", f"not undone: {title}: {why}", step="undo")
                continue
            except NotPutBack as kept_own:  # said as it is, never "undone: put back"
                unkept.append(str(kept_own))
                self.journal.log("WARN", str(kept_own), step="undo")
                continue
            except Exception as exc:  # keep undoing the rest; report loudly
                if title == PUT_BACK:
                    unkept.append(f"the interrupted run's record could not be put back at "
                                  f"{intents.path(self.env)} ({_describe(exc)}): the next "
                                  "run will not name it")
                    self.journal.log("ERROR", unkept[-1], step="undo")
                    continue
                failed.append(f"{title}: {_describe(exc)}")
                if title in self.undo_fixes:
                    fixes.append(self.undo_fixes[title])
                self.undo_failed = True
                self.journal.log("ERROR", f"could not undo: {title}: {_describe(exc)}",
                                 step="undo")
            else:
                done.append(title)
                self.journal.log("WARN", f"undone: {title}", step="undo")
        self.undos.clear()
        if self.intent_written and self.plan.intent is not None and not failed \
                and not self.irreversible:
            intents.clear(self.env, self.plan.intent.run_id)
        what = (f"interrupted by {signal.Signals(cause.signum).name} before the commit point"
                if isinstance(cause, Interrupted) else _describe(cause))
        undone = f"; undone: {', '.join(done)}" if done else ""
        undone += "".join(f"; {line}" for line in unkept)
        check = self._after_failed_undo(fixes)
        if self.irreversible:
            message, fix = self.irreversible[-1]
            if failed:  # both: the failed undo first, it is what users may meet now
                return RunbookError(f"ATTENTION: {what}; AND undoing failed: "
                                    f"{'; '.join(failed)}; {message}{undone}",
                                    f"{check}; then: {fix}", exit_code=ExitCode.ATTENTION)
            return RunbookError(f"{what}; {message}{undone}", fix,
                                exit_code=ExitCode.ATTENTION)
        if failed:
            return RunbookError(f"ATTENTION: {what}; AND undoing failed: {'; '.join(failed)}"
                                f"{undone}", check, exit_code=ExitCode.ATTENTION)
        if isinstance(cause, RunbookError):  # keep its type and fields for front ends
            if cause.exit_code == ExitCode.PRECONDITION and any(t != PUT_BACK for t in done):
                # exit 4 says "nothing was changed": after undoing what this run did (a
                # standby started or recreated), the run failed safely instead (exit 1), and
                # the refusal's own words, written for before any change, say so too
                cause.exit_code = ExitCode.FAILED_SAFELY
                cause.message = _NOTHING_CHANGED.sub(_UNDONE_WORDS, cause.message)
                cause.fix = cause.fix and _NOTHING_CHANGED.sub(_UNDONE_WORDS, cause.fix)
            cause.message = f"{cause.message}{undone}"
            cause.args = (cause.message,)
            return cause
        if isinstance(cause, Interrupted):
            again = (f"run `{self.plan.resume_command}` again when ready"
                     if self.plan.resume_command else "run the command again")
            if any(t.startswith(CADDY_UNDO) for t in done):
                # a signal held through the switch: Caddy may have loaded the new config and
                # served from the target (~70 ms) before the undo (found by review: "nothing
                # took effect" of a switch verified and then undone)
                return RunbookError(f"{what}: the switch was undone (Caddy may have sent "
                                    f"requests to the new slot for a moment){undone}; traffic "
                                    "is back where it was", again,
                                    exit_code=ExitCode.FAILED_SAFELY)
            return RunbookError(f"{what}: nothing took effect{undone}; traffic stays where it "
                                "was", again, exit_code=ExitCode.FAILED_SAFELY)
        return RunbookError(f"unexpected failure: {what}{undone}; traffic stays where it was",
                            "this is a bug: the journal has the details",
                            exit_code=ExitCode.FAILED_SAFELY)

    def _after_failed_undo(self, fixes: list[str]) -> str:
        """What on-call checks first when an undo failed: where traffic may be, and what the
        failed undos left to do by hand. Before any COMMIT step began, traffic did not move
        (the switch never ran), so it is not sent looking for a traffic problem."""
        if self.commit_begun:
            return "check `runbook status` now: traffic may not be where it was"
        # where Caddy points, never "serves": a restore before it may have stopped that slot
        before = self.plan.facts.get("from_slot")
        return ("traffic did not move" + (f" (Caddy still points at {before})" if before else "")
                + ": no switch began" + "".join(f"; {fix}" for fix in fixes)
                + "; then check `runbook status`")

    # -- failure after the commit: never undo, say what took effect and what is left -----
    def _took_effect(self, cause: BaseException, rest: list[Step],
                     failed: Step | None = None) -> TookEffectError:
        # the unfinished restore's record stays (its rerun needs what it names), as the run
        # records' reading keeps a run that failed once its restore replaced the database
        left = ([failed] if failed else []) + [s for s in rest if s.run and not s.skip]
        for step in left[1 if failed else 0:]:
            self.outcomes.append(StepOutcome(step.name, step.title, "left", 0.0, None,
                                             step.phase.value))
        facts = self.plan.facts
        where = (f"traffic is on {facts.get('to_slot', '?')}"
                 + (f" ({facts['to']})" if facts.get("to") else "")
                 + " and was verified" + "".join(f"; {what}" for what in self.lasting))
        why = (f"interrupted by {signal.Signals(cause.signum).name}"
               if isinstance(cause, Interrupted) else _describe(cause))
        todo = ", ".join(s.title for s in left) or "nothing"
        self.journal.log("WARN", f"{self.plan.action} took effect; left to do: {todo}",
                         step="finish", left=[s.name for s in left])
        finish = (f"run `{self.plan.resume_command or 'the same command'}` to finish it (it "
                  "finishes this run; it does not start another)")
        if isinstance(cause, ActFirstError) and cause.fix:
            why, finish = cause.message, f"first {cause.fix}; only after that, {finish}"
        return TookEffectError(
            f"the {self.plan.action} TOOK EFFECT: {where}; left to do: {todo} ({why})", finish)


_NOTHING_CHANGED = re.compile(r"\bnothing (?:was |has been )?changed\b")
_UNDONE_WORDS = "what this run did was undone"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Interrupted):
        return f"interrupted by {exc}"
    if isinstance(exc, RunbookError):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
