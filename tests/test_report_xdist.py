"""`--report DIR` under pytest-xdist: the workers' records make ONE report, the same as a run
without xdist would write (the oracle here is that serial run of the same features)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runbook import report as reports

REPO = Path(__file__).resolve().parent.parent

FEATURE = """\
Feature: Spread over workers
  Scenario: First passes
    Given a thing
    When I poke it
    Then it answers

  Scenario: Second passes
    Given a thing
    When I poke it
    Then it answers

  Scenario: Third is skipped
    Given a thing
    When I skip
    Then it answers

  Scenario: Fourth fails
    Given a thing
    When I break it
    Then it answers

  Scenario Outline: Fifth, per colour
    Given a thing
    When I paint it <colour>
    Then it answers

    Examples:
      | colour |
      | red    |
      | blue   |
"""

STEPS = '''\
import os
import time

import pytest
from pytest_bdd import given, parsers, scenarios, then, when

scenarios("spread.feature")


@given("a thing")
def thing():
    with open("workers.txt", "a") as f:  # which process ran it: the test's oracle
        f.write((os.environ.get("PYTEST_XDIST_WORKER") or "main") + "\\n")
    time.sleep(0.2)  # long enough for both workers to take scenarios


@when("I poke it")
def poke():
    time.sleep(0.02)


@when("I skip")
def skip():
    pytest.skip("nothing to poke")


@when("I break it")
def break_it():
    assert 1 == 2, "broken on purpose"


@when(parsers.parse("I paint it {colour}"))
def paint(colour):
    print(os.environ.get("PYTEST_XDIST_WORKER"), colour)


@then("it answers")
def answers():
    pass
'''


def run(work: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "steps.report_plugin", "-p", "no:cacheprovider",
         "--rootdir", str(work), "-q", "--report", str(out), *extra, "test_spread.py"],
        cwd=work, env=env, capture_output=True, text=True, timeout=180, check=False)


def comparable(data: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What must not depend on how the run was spread: every scenario, in order, with its
    status and its steps' statuses and errors (not timings)."""
    return [(feature["file"], s["name"], s["line"], s["status"], s.get("counted_as"),
             [(st["keyword"], st["name"], st["status"], st["error"]) for st in s["steps"]])
            for feature, s in reports.scenarios(data)]


@pytest.fixture
def spread(tmp_path: Path) -> Path:
    work = tmp_path / "spread"
    work.mkdir()
    (work / "spread.feature").write_text(FEATURE)
    (work / "test_spread.py").write_text(STEPS)
    return work


def test_two_workers_write_one_report_equal_to_a_serial_run(spread: Path, tmp_path: Path
                                                            ) -> None:
    serial = run(spread, tmp_path / "serial")
    assert (spread / "workers.txt").exists(), serial.stdout + serial.stderr
    (spread / "workers.txt").unlink()
    parallel = run(spread, tmp_path / "parallel", "-n", "2")
    assert serial.returncode == parallel.returncode == 1, parallel.stdout + parallel.stderr
    # both workers ran scenarios (xdist's load scheduling hands each an initial batch), so the
    # report below really is a merge of two workers' records
    assert set((spread / "workers.txt").read_text().split()) == {"gw0", "gw1"}, parallel.stdout
    one = reports.load(tmp_path / "serial")
    two = reports.load(tmp_path / "parallel")
    assert comparable(two) == comparable(one)
    assert len(comparable(two)) == 6 and two["summary"] == one["summary"]
    assert two["attention"] == one["attention"]
    assert two["fingerprint"]["tool"].startswith("togather-runbook ")
    assert "-n" in two["command"]
    # the other formats are the controller's, and hold every scenario too
    def cucumber(run: str) -> list[tuple[str, list[str]]]:
        (feature,) = json.loads((tmp_path / run / reports.CUCUMBER_JSON).read_text())
        return sorted((e["name"], [st["result"]["status"] for st in e["steps"]])
                      for e in feature["elements"])

    assert len(cucumber("parallel")) == 6 and cucumber("parallel") == cucumber("serial")
    junit = (tmp_path / "parallel" / reports.JUNIT_XML).read_text()
    assert junit.count("<testcase ") == 6
    html = (tmp_path / "parallel" / reports.REPORT_HTML).read_text()
    for name in ("First passes", "Second passes", "Third is skipped", "Fourth fails"):
        assert name in html
