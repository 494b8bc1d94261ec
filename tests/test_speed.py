"""What the CLI says about time is the time the person waited (issue 14 item 2).

"Done in" counts from process start to exit (start-up, lock and plan included), with the time
to traffic switched beside it. The oracle is the test's own clock around the process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from runbook.drill.stack import DrillStack
from tests.drill_checks import two_deployments


def rollback_cli(stack: DrillStack, *extra: str) -> tuple[subprocess.CompletedProcess[str],
                                                           float]:
    argv = [sys.executable, "-m", "runbook.cli", "rollback", str(stack.env.source), "--yes",
            *extra]
    began = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, check=False)
    return proc, time.monotonic() - began


@pytest.mark.docker
def test_done_in_is_the_whole_run_with_the_switch_time_beside_it(scene_stack: DrillStack) -> None:
    two_deployments(scene_stack)
    proc, wall = rollback_cli(scene_stack)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"Done in (\d+\.\d\d)s \(traffic switched at (\d+\.\d\d)s\)\. Journal: ",
                      proc.stdout)
    assert match, proc.stdout
    done, switched = float(match[1]), float(match[2])
    # from process start: at most the wall time the test saw, and not much less (only the
    # interpreter's exit after the line is printed is missing)
    assert wall - 0.5 <= done <= wall + 0.02, (done, wall)
    steps = sum(float(x) for x in re.findall(r"(\d+\.\d\d)s$", proc.stdout, re.M))
    assert done > steps  # start-up, lock and plan count too
    assert 0 < switched < done
    for title in ("Health gate", "Switch Caddy to the green slot", "Stop the old blue"):
        assert title in proc.stdout


@pytest.mark.docker
def test_json_output_carries_the_same_timing(scene_stack: DrillStack) -> None:
    two_deployments(scene_stack)
    proc, wall = rollback_cli(scene_stack, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    timing = json.loads(proc.stdout)["timing"]
    assert 0 < timing["switched_at_s"] < timing["done_in_s"] <= wall + 0.02


def test_the_rollback_modules_import_neither_httpx_nor_httpcore_nor_rich() -> None:
    """Each costs the on-call tens of milliseconds (httpx also builds a TLS context per
    client); loopback calls go through runbook.bounded_http on http.client instead."""
    code = ("import sys, runbook.cli\n"
            "from runbook import bounded_http, caddy, deploy, health, rollback, slots, status\n"
            "from runbook import switch\n"
            "print(sorted(m for m in ('httpx', 'httpcore', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.docker
def test_a_rollback_without_a_snapshot_leaves_the_snapshot_modules_unimported(
        scene_stack: DrillStack) -> None:
    """The schema guard imports them only when a snapshot is named or needed (they cost the
    on-call ~20 ms of start-up otherwise)."""
    two_deployments(scene_stack)
    code = ("import sys\n"
            "from runbook import cli\n"
            f"sys.argv = ['runbook', 'rollback', {str(scene_stack.env.source)!r}, '--dry-run']\n"
            "try:\n"
            "    cli.app()\n"
            "except SystemExit as exc:\n"
            "    assert not exc.code, exc.code\n"
            "print(sorted(m for m in sys.modules if m.startswith('runbook.snapshots')),"
            " file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Dry run: nothing was changed." in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "[]"
