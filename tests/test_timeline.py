"""The drill report's timeline SVG (templates/timeline.svg.j2): what a run record says comes
out as text, never as markup, escaped once. The oracle is Python's HTML parser on the output
and the literal strings of the record. And how long a run killed mid-step is measured, from
the records runbook.journal itself leaves. No Docker."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from runbook import report as reports
from runbook.journal import Journal
from runbook.livedocs.model import verified_from_report
from runbook.reports.timeline import timeline_svg
from runbook.times import format_ms, format_ms_utc, parse_utc
from tests.drill_checks import host_env

EVIL = '<script>alert("x")</script> & \'quoted\''


class Read(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_data(self, data: str) -> None:
        if data.strip():
            self.text.append(data)


def run_record() -> dict[str, object]:
    def step(name: str, second: float, ms: int, status: str = "ok",
             error: str | None = None) -> dict[str, object]:
        return {"name": name, "title": name, "status": status, "duration_ms": ms,
                "started_at": f"2026-01-01T00:00:{second:06.3f}Z", "error": error}

    return {"action": "rollback", "run_id": "rbk_a&b", "outcome": "failed",
            "started_at": "2026-01-01T00:00:00.000Z",
            "steps": [step("lock", 0.0, 10), step(EVIL, 0.5, 200, "failed", error=EVIL)],
            "traffic": {"clients": 2, "requests": 9, "non_2xx": 1, "failed": 0, "resets": 1,
                        "bucket_ms": 50, "buckets": [[4, 0, 0], [3, 1, 1]],
                        "longest_gap_ms": 30, "longest_gap_at_ms": 20, "slowest_ms": 12}}


def test_a_hostile_step_name_and_error_stay_text() -> None:
    svg = timeline_svg(run_record())
    read = Read()
    read.feed(svg)
    assert "script" not in {tag for tag, _ in read.tags}
    assert EVIL in read.text  # the bar's label, as written in the record
    (phase,) = [a for t, a in read.tags if t == "g" and a.get("data-status") == "failed"]
    assert phase["data-phase"] == EVIL
    assert any(EVIL in text and "takes 200 ms" in text for text in read.text)  # the tooltip


def test_the_title_is_escaped_once() -> None:
    read = Read()
    read.feed(timeline_svg(run_record()))
    (svg,) = [a for t, a in read.tags if t == "svg"]
    assert svg["data-run-id"] == "rbk_a&b"
    assert svg["aria-label"].startswith("rollback rbk_a&b: failed, ")  # not rbk_a&amp;b


def test_bars_and_the_users_row_carry_the_record_s_numbers() -> None:
    read = Read()
    read.feed(timeline_svg(run_record()))
    phases = [a for t, a in read.tags if t == "g" and "phase" in a.get("class", "").split()]
    assert [(p["data-offset-ms"], p["data-duration-ms"]) for p in phases] == [
        ("0", "10"), ("500", "200")]
    (users,) = [a for t, a in read.tags if t == "g" and a.get("class") == "traffic"]
    assert (users["data-requests"], users["data-non-2xx"], users["data-resets"],
            users["data-longest-gap-ms"]) == ("9", "1", "1", "30")
    assert [a.get("class") for t, a in read.tags if t == "rect" and a.get("class") in (
        "bad", "reset", "gap")] == ["bad", "reset", "gap"]


# ---------------------------------------------------------------------------------------------
# A run killed during a step: its record keeps that step `running`, with no duration. Found by
# review: the report measured such a run to the START of that step (the step counted as 0 ms),
# so its timeline, its measured time, the time to recover and the users' window all stopped
# where the step began. The records here are runbook.journal's own, as a kill leaves them.


def killed_run(tmp_path: Path, *, finished: bool = False) -> dict[str, Any]:
    """A rollback journaled up to the start of its switch: its record as a kill then leaves
    it (with `finished`, the run's finish was also recorded while the step still ran)."""
    env = host_env(tmp_path, name="staging")
    journal = Journal.open(env, "rollback", why="killed mid-switch")
    with journal.step("lock", "Take the deploy lock"):
        time.sleep(0.02)
    switch = journal.step("switch", "Switch traffic to green")
    switch.__enter__()
    time.sleep(0.05)
    if finished:
        journal.finish("interrupted", 130)
    (record,) = reports.collect_runs(env.runs_dir)
    switch.__exit__(None, None, None)  # after the read: the record above is the killed run's
    (step,) = [s for s in record["steps"] if s["name"] == "switch"]
    assert (step["status"], step["duration_ms"]) == ("running", None), step  # what a kill leaves
    assert (record["finished_at"] is not None) == finished
    return record


def scenario_with(runs: list[dict[str, Any]], ends: datetime) -> dict[str, Any]:
    """A report whose one scenario ran `runs` in a When that ended at `ends`."""
    data = reports.new_report(environment="drill")
    feature = reports.feature_entry(data, "features/rollback.feature", "Rollback")
    scenario = reports.scenario_entry(feature, nodeid="x::killed", name="Killed mid-switch")
    began = min(parse_utc(r["started_at"]) for r in runs) - timedelta(milliseconds=100)
    (step,) = scenario["steps"] = [reports.step_entry("When", "the rollback runs", type_="when")]
    step.update(status=reports.PASSED, started_at=format_ms_utc(began),
                duration_ms=round((ends - began).total_seconds() * 1000))
    scenario["status"] = reports.PASSED
    scenario["runs"] = runs
    reports.finalize(data)
    return data


def first_step_start(run: dict[str, Any]) -> datetime:
    return min(parse_utc(s["started_at"]) for s in run["steps"])


def ms(later: datetime, earlier: datetime) -> int:
    return round((later - earlier).total_seconds() * 1000)


def test_a_run_killed_mid_step_is_measured_to_the_scenario_s_end_and_says_so(
        tmp_path: Path) -> None:
    record = killed_run(tmp_path)
    switch_began = parse_utc(record["steps"][-1]["started_at"])
    ends = switch_began + timedelta(seconds=3)
    data = scenario_with([record], ends)
    ((_, scenario),) = reports.scenarios(data)
    window = reports.run_window(record)
    assert window is not None and window[1] == ends, (window, ends)
    took = reports.run_duration_ms(record)
    assert took == ms(ends, first_step_start(record)) and took > 3000
    assert scenario["time_to_recover_ms"] == took
    said = "killed during Switch traffic to green; measured to the scenario's end"
    assert scenario["time_to_recover_incomplete"] == said
    page = reports.render_html(data)
    assert f"time to recover: {format_ms(took)}</span>" not in page  # never a clean figure
    for html in (page, timeline_svg(record)):
        read = Read()
        read.feed(html)
        assert any(said in text for text in read.text), read.text
    (verified,) = verified_from_report(data).values()  # what `runbook docs` prints
    assert verified.endswith(f"time to recover {format_ms(took)} (incomplete: {said})")


def test_a_killed_run_whose_finish_was_recorded_is_measured_to_it(tmp_path: Path) -> None:
    record = killed_run(tmp_path, finished=True)
    finished = parse_utc(record["finished_at"])
    scenario_with([record], finished + timedelta(seconds=5))
    window = reports.run_window(record)
    assert window is not None and window[1] == finished
    assert reports.run_duration_ms(record) == ms(finished, first_step_start(record))
    assert reports.incomplete(record) == (
        "killed during Switch traffic to green; measured to its record's finished_at")


def test_a_killed_run_followed_by_another_is_measured_to_the_next_run_s_start(
        tmp_path: Path) -> None:
    record = killed_run(tmp_path)
    time.sleep(0.1)
    env = host_env(tmp_path, name="staging")
    with Journal.open(env, "rollback", why="the rerun") as rerun, \
            rerun.step("lock", "Take the deploy lock"):
        pass
    (again,) = [r for r in reports.collect_runs(env.runs_dir) if r["run_id"] != record["run_id"]]
    killed = record
    data = scenario_with([killed, again], parse_utc(again["finished_at"]) + timedelta(seconds=4))
    ((_, scenario),) = reports.scenarios(data)
    window = reports.run_window(killed)
    assert window is not None and window[1] == parse_utc(again["started_at"])
    assert scenario["time_to_recover_ms"] == (reports.run_duration_ms(killed)
                                              + reports.run_duration_ms(again))
    assert reports.incomplete(killed) == (
        "killed during Switch traffic to green; measured to the next run's start")
    assert reports.incomplete(again) is None
