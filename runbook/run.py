"""Running an operation: lock, plan, confirm, execute, journal, release. One path for all."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runbook import journal as journals
from runbook import lock as locks
from runbook.environment import Environment
from runbook.errors import ExitCode, RunbookError, UsageError
from runbook.plan import Plan, Step, StepOutcome, execute


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

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "dry_run": self.dry_run, "plan": self.plan.to_json(),
                "steps": [o.__dict__ for o in self.outcomes], "log_file": self.log_file,
                "record_file": self.record_file}


def perform(env: Environment, action: str, build: Callable[[str], Plan], *, dry_run: bool,
            reason: str, confirm: Callable[[Plan], bool] | None = None,
            progress: Callable[..., None] | None = None) -> RunResult:
    """Plan (under the lock) and execute; a dry run plans without lock and changes nothing."""
    run_id = journals.new_run_id(action)
    if dry_run:
        plan = build(run_id)
        held = locks.status(env)
        plan.steps.insert(0, Step("lock", "Take the deploy lock",
                                  {"path": str(env.lock_path),
                                   "now": held.describe() if held else "free"}))
        return RunResult(plan, run_id, dry_run=True)
    journal = journals.Journal.open(env, action, run_id=run_id, why=reason)
    result: RunResult | None = None
    try:
        with journal.step("lock", "Take the deploy lock") as rec:
            held = locks.acquire(env, reason=reason, run_id=run_id)
            rec.detail(path=str(env.lock_path))
        try:
            with journal.step("plan", "Load state and check preconditions"):
                plan = build(run_id)
            journal.log("INFO", f"plan: {plan.summary}", plan=plan.to_json())
            result = RunResult(plan, run_id, dry_run=False)
            if confirm is not None and not confirm(plan):
                raise NotConfirmed("not confirmed at the prompt; nothing was changed",
                                   "run again and answer y, or pass --yes")
            result.outcomes = execute(plan, journal, progress)
        finally:
            with journal.step("unlock", "Release the deploy lock"):
                locks.release(env, held)
    except RunbookError as exc:
        journal.log("ERROR", str(exc), exit_code=int(exc.exit_code))
        journal.finish("failed", int(exc.exit_code))
        _attach(exc, journal, result)
        raise
    except BaseException as exc:
        journal.log("ERROR", f"unexpected failure: {type(exc).__name__}: {exc}")
        journal.finish("failed", int(ExitCode.ATTENTION))
        raise
    journal.log("SUCCESS", f"{action} finished: {plan.summary}")
    journal.finish("success", 0)
    result.log_file = str(journal.log_path)
    result.record_file = str(journal.record_path)
    return result


def _attach(exc: RunbookError, journal: Any, result: RunResult | None) -> None:
    """Let front ends point at the journal of a failed run."""
    with contextlib.suppress(Exception):
        exc.log_file = str(journal.log_path)  # type: ignore[attr-defined]
        exc.result = result  # type: ignore[attr-defined]
