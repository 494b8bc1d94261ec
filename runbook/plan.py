"""Plan, then act: every mutating operation is a list of steps with their resolved values.

`--dry-run` renders the plan; execution runs the very same steps in order, journaling each
one with its duration. A step may register an undo, run in reverse order when a later step
fails, so a failure leaves things as they were (traffic never moves to an unproved slot).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runbook.environment import Environment


@dataclass
class Step:
    name: str  # machine name: lock, preflight, start-slot, health-gate, switch, state, ...
    title: str  # on-call words: "Start the stopped green container"
    details: dict[str, str] = field(default_factory=dict)  # every resolved value
    run: Callable[[StepContext], Any] | None = None
    skip: str | None = None  # why this step will not run (shown in the plan)


@dataclass
class StepContext:
    """What a running step may use: notes for the journal and an undo for failures."""

    step: Step
    notes: dict[str, Any] = field(default_factory=dict)
    undos: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    say: Callable[[str], None] = lambda message: None  # live progress for people waiting

    def note(self, **values: Any) -> None:
        self.notes.update(values)

    def on_failure(self, title: str, undo: Callable[[], None]) -> None:
        self.undos.append((title, undo))


@dataclass
class Plan:
    action: str  # rollback | deploy | switch
    env: Environment
    summary: str
    steps: list[Step]
    warnings: list[str] = field(default_factory=list)
    caddy_diff: str = ""
    facts: dict[str, Any] = field(default_factory=dict)  # for --format json and reports

    def render(self) -> str:
        lines = [f"Plan: {self.summary}", f"Environment: {self.env.display}"
                 + (f" ({self.env.source})" if self.env.source else "")]
        for warning in self.warnings:
            lines.append(f"  ! {warning}")
        for index, step in enumerate(self.steps, 1):
            marker = "skip" if step.skip else f"{index:>2}."
            skipped = f"  [skipped: {step.skip}]" if step.skip else ""
            lines.append(f"{marker} {step.title}{skipped}")
            width = max((len(k) for k in step.details), default=0)
            for key, value in step.details.items():
                lines.append(f"      {key.ljust(width)}  {value}")
        if self.caddy_diff:
            lines.append("Caddyfile change:")
            lines.extend("      " + line for line in self.caddy_diff.rstrip("\n").splitlines())
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action, "environment": self.env.name, "summary": self.summary,
            "warnings": self.warnings, "caddy_diff": self.caddy_diff,
            "steps": [{"name": s.name, "title": s.title, "details": s.details, "skip": s.skip}
                      for s in self.steps],
            "facts": self.facts,
        }


@dataclass
class StepOutcome:
    name: str
    title: str
    status: str  # ok | failed | skipped | done (read-only checks made while planning)
    duration_ms: float
    error: str | None = None


def execute(plan: Plan, journal: Any, progress: Callable[..., None] | None = None,
            ) -> list[StepOutcome]:
    """Run the plan's steps in order; on failure run the undos in reverse and re-raise."""
    outcomes: list[StepOutcome] = []
    undos: list[tuple[str, Callable[[], None]]] = []
    for step in plan.steps:
        if step.run is None and not step.skip:  # read-only checks, already done while planning
            outcomes.append(StepOutcome(step.name, step.title, "done", 0.0))
            journal.log("INFO", f"checked: {step.title}", step=step.name, **step.details)
            continue
        if step.skip or step.run is None:
            outcomes.append(StepOutcome(step.name, step.title, "skipped", 0.0, step.skip))
            journal.log("INFO", f"skipped: {step.title} ({step.skip})", step=step.name)
            continue
        if progress:
            progress("start", step)
        ctx = StepContext(step)
        if progress:
            ctx.say = lambda message, step=step: progress("note", step, message)
        started = time.monotonic()
        try:
            with journal.step(step.name, step.title) as record:
                record.detail(**step.details)
                try:
                    step.run(ctx)
                finally:
                    undos.extend(ctx.undos)
                    if ctx.notes:
                        record.detail(**{k: str(v) for k, v in ctx.notes.items()})
        except BaseException as exc:
            outcomes.append(StepOutcome(step.name, step.title, "failed",
                                        (time.monotonic() - started) * 1000, str(exc)))
            if progress:
                progress("failed", step)
            _undo(undos, journal)
            raise
        outcomes.append(StepOutcome(step.name, step.title, "ok",
                                    (time.monotonic() - started) * 1000))
        if progress:
            progress("done", step)
    return outcomes


def _undo(undos: list[tuple[str, Callable[[], None]]], journal: Any) -> None:
    for title, undo in reversed(undos):
        try:
            undo()
            journal.log("WARN", f"undone: {title}", step="undo")
        except Exception as exc:  # keep undoing the rest; report loudly
            journal.log("ERROR", f"could not undo: {title}: {exc}", step="undo")
