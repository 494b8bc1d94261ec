"""The features' world under --dry-run (steps/world.py): what it prints is what would happen.

Found by review: `pytest features/... --dry-run` printed "rollback would do" with its plan
where the same step without --dry-run is refused: a deploy lock another run holds (exit 3),
or, on a real host, a plan with warnings (nobody is at its prompt).
"""

from __future__ import annotations

import time

import pytest

from runbook import lock as locks
from runbook.drill.stack import DrillStack
from runbook.plan import Plan
from steps.world import World

pytestmark = pytest.mark.docker


def plan(stack: DrillStack, warnings: list[str]) -> Plan:
    return Plan(action="rollback", env=stack.env, summary="a plan", steps=[],
                warnings=warnings)


def test_a_dry_run_under_a_held_lock_says_the_real_run_is_refused(
        drill_stack: DrillStack, pytestconfig: pytest.Config) -> None:
    world = World(env=drill_stack.env, config=pytestconfig, stack=drill_stack)
    assert world.dry_refusal(plan(drill_stack, [])) is None  # the lock is free
    held = locks.acquire(drill_stack.env, "another run")
    try:
        said = world.dry_refusal(plan(drill_stack, []))
    finally:
        locks.release(drill_stack.env, held)
    assert said is not None and "deploy lock is held" in said, said


def test_a_stale_lock_whose_holder_still_runs_is_a_refusal_too(
        drill_stack: DrillStack, pytestconfig: pytest.Config) -> None:
    """Found by review: past its stale time a lock whose holder still runs read as free
    ("would do"), where the real run is refused (its holder is alive: exit 3)."""
    env = drill_stack.env.with_(lock_stale_after=1)
    world = World(env=env, config=pytestconfig, stack=drill_stack)
    held = locks.acquire(env, "a long run")  # this process: alive
    try:
        time.sleep(1.5)
        stale = locks.status(env)
        assert stale is not None and stale.stale and stale.holder_alive, stale
        said = world.dry_refusal(plan(drill_stack, []))
    finally:
        locks.release(env, held)
    assert said is not None and "deploy lock is held" in said, said


def test_a_dry_run_of_a_plan_with_warnings_on_a_host_says_it_would_not_run(
        drill_stack: DrillStack, pytestconfig: pytest.Config) -> None:
    host = drill_stack.env.with_(allows_faults=False)
    on_host = World(env=host, config=pytestconfig, stack=None)
    said = on_host.dry_refusal(plan(drill_stack, ["the schema guard was NOT checked"]))
    assert said is not None and "the schema guard was NOT checked" in said, said
    on_drill = World(env=drill_stack.env, config=pytestconfig, stack=drill_stack)
    assert on_drill.dry_refusal(plan(drill_stack, ["a warning"])) is None  # its prompt: --yes
