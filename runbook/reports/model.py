"""The drill report's data: what report.json holds, and what derives from it.

The pytest plugin (steps/report_plugin.py) fills the data; this module builds and reads it,
so a report can be rendered from any report.json (or from synthetic data in a test) without
running a drill. Nothing here runs a command or opens a connection: the environment's
fingerprint comes from runbook/reports/fingerprint.py, through the caller.

report.json (FORMAT) holds: `features[].scenarios[]` with `status`, `duration_ms`, `steps[]`
({keyword, name, line, status, duration_ms, offset_ms, error}), `runs[]` (the engine's run
records, as runbook.journal writes them, plus what the report adds: `traffic`, what the users
saw, and for a run killed mid-step `measured_to`, where it is measured to), `time_to_recover_ms`
and `time_to_recover_incomplete` (why that figure is not clean, or null); `fingerprint`;
`summary` and `attention` (recomputed by finalize()).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from runbook.feature_order import feature_sort_key
from runbook.times import format_ms_utc as now_iso
from runbook.times import parse_utc as parse_time

FORMAT = "togather-runbook/drill-report@1"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
JUNIT_XML = "junit.xml"
CUCUMBER_JSON = "cucumber.json"
ENGINE_ACTIONS = ("rollback", "deploy", "switch")  # runs that get a timeline
RECOVERY_ACTION = "rollback"  # time-to-recover counts these runs

# Step and scenario statuses, in the words the page uses.
PASSED, FAILED, SKIPPED, UNDEFINED, NOT_RUN, ERROR = (
    "passed", "failed", "skipped", "undefined", "not run", "error")


# ---------------------------------------------------------------------------------------------
# Engine run records


def collect_runs(runs_dir: Path, since: datetime | None = None,
                 seen: set[str] | None = None) -> list[dict[str, Any]]:
    """Run records in `runs_dir` that started at or after `since` and are not in `seen`.

    Called at the end of each scenario, before the next drill reset wipes the directory; on a
    real host the directory holds history, which `since` leaves out."""
    seen = seen if seen is not None else set()
    found: list[dict[str, Any]] = []
    try:
        paths = sorted(p for p in runs_dir.glob("*.json") if not p.name.startswith("."))
    except OSError:
        return []
    for path in paths:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict):
            continue
        run_id = str(record.get("run_id") or path.stem)
        started = parse_time(record.get("started_at"))
        if run_id in seen or (since is not None and started is not None
                              and started.timestamp() < since.timestamp() - 1.0):
            continue
        seen.add(run_id)
        found.append(record)
    found.sort(key=lambda r: (str(r.get("started_at") or ""), str(r.get("run_id") or "")))
    return found


def run_phases(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The measured phases of a run: offset from the run's start and duration, in ms."""
    timed: list[tuple[datetime, Mapping[str, Any]]] = []
    for step in run.get("steps") or []:
        if isinstance(step, Mapping) and (began := parse_time(step.get("started_at"))):
            timed.append((began, step))
    if not timed:
        return []
    origin = min(t for t, _ in timed)
    run_start = parse_time(run.get("started_at"))
    if run_start is not None and run_start <= origin:
        origin = run_start
    phases = []
    for started, step in timed:
        duration = step.get("duration_ms")
        phases.append({
            "name": str(step.get("name") or "?"),
            "title": str(step.get("title") or step.get("name") or ""),
            "status": str(step.get("status") or "unknown"),
            "offset_ms": round((started - origin).total_seconds() * 1000),
            "duration_ms": int(duration) if isinstance(duration, int | float) else None,
            "error": step.get("error"),
        })
    return phases


def unfinished_step(run: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The step a run was killed during: the last one that began and was never timed (its
    record keeps it `running`, with no duration). None for a run whose every step ended."""
    left = [s for s in run.get("steps") or [] if isinstance(s, Mapping)
            and parse_time(s.get("started_at")) is not None
            and not isinstance(s.get("duration_ms"), int | float)]
    return left[-1] if left else None


def scenario_end(scenario: Mapping[str, Any]) -> datetime | None:
    """When the scenario's last timed step ended, as the report measured its steps."""
    ends = [began + timedelta(milliseconds=float(step["duration_ms"]))
            for step in scenario.get("steps") or [] if isinstance(step, Mapping)
            and (began := parse_time(step.get("started_at"))) is not None
            and isinstance(step.get("duration_ms"), int | float)]
    return max(ends, default=None)


def measure_unfinished(runs: Iterable[Any], ends: datetime | None) -> None:
    """Say where each run killed mid-step is measured to (`measured_to` in its entry): its
    record's finished_at if it has one, else the next run's start, else `ends` (the
    scenario's end), whichever is known first; the step's start when none is. Without this
    the killed step counts as 0 ms and the run's window stops where that step began (found by
    review). Recomputed from the records each time, so it may run again (finalize does)."""
    mine = [r for r in runs if isinstance(r, dict)]
    for run in mine:
        run.pop("measured_to", None)
        step = unfinished_step(run)
        if step is None:
            continue
        began = parse_time(step.get("started_at"))
        if began is None:  # unfinished_step names only steps that began
            continue
        later = sorted(t for other in mine if other is not run
                       and (t := parse_time(other.get("started_at"))) is not None
                       and t >= began)
        finished = parse_time(run.get("finished_at"))
        for at, what in ((finished, "its record's finished_at"),
                         (later[0] if later else None, "the next run's start"),
                         (ends, "the scenario's end")):
            if at is not None and at >= began:
                run["measured_to"] = {"at": now_iso(at), "what": what}
                break


def measured_to(run: Mapping[str, Any]) -> tuple[datetime | None, str]:
    """Where a run killed mid-step is measured to, and what that time is."""
    mark = run.get("measured_to")
    if isinstance(mark, Mapping) and (at := parse_time(mark.get("at"))) is not None:
        return at, str(mark.get("what") or "a later time")
    if (finished := parse_time(run.get("finished_at"))) is not None:
        return finished, "its record's finished_at"
    return None, "that step's start (nothing later is known)"


def incomplete(run: Mapping[str, Any]) -> str | None:
    """How a run killed mid-step is measured, in words (None for a run whose steps all
    ended): its figures are never a clean duration, and the report says so next to them."""
    step = unfinished_step(run)
    if step is None:
        return None
    _, what = measured_to(run)
    title = step.get("title") or step.get("name") or "?"
    return f"killed during {title}; measured to {what}"


def _origin(run: Mapping[str, Any]) -> datetime | None:
    """Offset 0 of a run's timeline: its start, or its first step's if that is earlier."""
    starts = [t for step in run.get("steps") or [] if isinstance(step, Mapping)
              and (t := parse_time(step.get("started_at"))) is not None]
    if not starts:
        return None
    origin = min(starts)
    run_start = parse_time(run.get("started_at"))
    return run_start if run_start is not None and run_start <= origin else origin


def measured_end_ms(run: Mapping[str, Any]) -> int | None:
    """The end of a run's timeline, in ms from its origin: its last step's end, or for a run
    killed mid-step where it is measured to (measure_unfinished)."""
    phases = run_phases(run)
    origin = _origin(run)
    if not phases or origin is None:
        return None
    end = max(p["offset_ms"] + (p["duration_ms"] or 0) for p in phases)
    if unfinished_step(run) is not None and (at := measured_to(run)[0]) is not None:
        end = max(end, round((at - origin).total_seconds() * 1000))
    return int(end)


def run_window(run: Mapping[str, Any]) -> tuple[datetime, datetime] | None:
    """The run's timeline as wall-clock times: its origin (offset 0) and its last step's end
    (a run killed mid-step: where it is measured to, see measure_unfinished)."""
    origin = _origin(run)
    end = measured_end_ms(run)
    if origin is None or end is None:
        return None
    return origin, origin + timedelta(milliseconds=end)


def traffic(run: Mapping[str, Any], records: Iterable[Any], clients: int,
            bucket_ms: int = 50, sent_from: float | None = None) -> dict[str, Any] | None:
    """What a drill's simulated users (runbook.drill.load Requests) saw during a run, laid on
    the run's timeline: counts, the longest gap and requests per bucket, times in ms from the
    run's origin. The requests in flight in the run's window (runbook.drill.load.in_window,
    which says what `sent_from` is for). None when the run has no timeline."""
    from runbook.drill import load

    window = run_window(run)
    if window is None:
        return None
    start, end = (t.timestamp() for t in window)
    records = list(records)
    data = load.summarize(records, start, end, clients, sent_from=sent_from
                          ).to_json(origin=start)
    data["bucket_ms"] = bucket_ms
    data["buckets"] = [[b["served"], b["bad"], b["resets"]] for b in load.buckets(
        records, start, end, bucket_ms / 1000, sent_from=sent_from)]
    return data


def add_traffic(runs: Iterable[Any], records: Iterable[Any], clients: int,
                since: float | None = None) -> None:
    """Give each run of a scenario what its users saw (`traffic` in its entry), from the
    records of the one load that watched them: not a run whose window starts before `since`
    (the load's start), nor one during which no request was in flight (the load was paused).
    A window that begins where an earlier one ends, or inside it (a run killed mid-step is
    measured to the next run's start: measure_unfinished), takes only the requests sent from
    its start, so a request in flight across that edge is counted once, in the run it was
    sent in. Call measure_unfinished first."""
    records = list(records)
    laid = sorted(((window, run) for run in runs if isinstance(run, dict)
                   and (window := run_window(run)) is not None), key=lambda x: x[0][0])
    reach: datetime | None = None  # the latest end of the windows before
    for (start, end), run in laid:
        touches = reach is not None and reach >= start
        if since is None or start.timestamp() >= since:
            users = traffic(run, records, clients,
                            sent_from=start.timestamp() if touches else None)
            if users and users["requests"]:
                run["traffic"] = users
        reach = end if reach is None else max(reach, end)


def run_duration_ms(run: Mapping[str, Any]) -> int | None:
    """First step start to last step end, as measured by the journal (a run killed mid-step:
    to where it is measured to; incomplete() says so)."""
    phases = run_phases(run)
    end = measured_end_ms(run)
    if not phases or end is None:
        return None
    return end - min(int(p["offset_ms"]) for p in phases)


def time_to_recover(runs: Iterable[Mapping[str, Any]]) -> int | None:
    """The measured time of the scenario's rollback runs, added up (refused attempts count:
    the on-call spends that time too). None when the scenario ran no rollback."""
    durations = [run_duration_ms(r) for r in runs if r.get("action") == RECOVERY_ACTION]
    measured = [d for d in durations if d is not None]
    return sum(measured) if measured else None


def recovery_incomplete(runs: Iterable[Mapping[str, Any]]) -> str | None:
    """Why a time to recover is not a clean figure: its rollback runs killed mid-step."""
    notes = [note for r in runs if r.get("action") == RECOVERY_ACTION
             and (note := incomplete(r)) is not None]
    return "; ".join(notes) or None


def run_step(scenario: Mapping[str, Any], run: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The scenario step during which an engine run started (steps carry `started_at`)."""
    started = parse_time(run.get("started_at"))
    if started is None:
        return None
    during = None
    for step in scenario.get("steps") or []:
        began = parse_time(step.get("started_at"))
        if began is not None and began <= started:
            during = step
    return during


def is_arrangement(scenario: Mapping[str, Any], run: Mapping[str, Any]) -> bool:
    """A run a drill's Given made to set the scene (e.g. deploys v2 then v3): not recovery."""
    step = run_step(scenario, run)
    return step is not None and step.get("type") == "given"


def recovery_runs(scenario: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [r for r in scenario.get("runs") or []
            if isinstance(r, Mapping) and not is_arrangement(scenario, r)]


def images_in(value: Any, found: set[str] | None = None) -> set[str]:
    """Every `repo:tag` image named under an *image* key of a run record."""
    found = found if found is not None else set()
    if isinstance(value, Mapping):
        for key, item in value.items():
            if "image" in str(key).lower() and isinstance(item, str) and ":" in item \
                    and " " not in item:
                found.add(item)
            else:
                images_in(item, found)
    elif isinstance(value, list | tuple):
        for item in value:
            images_in(item, found)
    return found


# ---------------------------------------------------------------------------------------------
# Building and finishing the data


def new_report(*, environment: str, command: Iterable[str] = (), dry_run: bool = False,
               started_at: str | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "environment": environment,
        "dry_run": dry_run,
        "command": list(command),
        "started_at": started_at or now_iso(),
        "finished_at": None,
        "duration_ms": None,
        "exit_status": None,
        "fingerprint": {},
        "features": [],
        "artifacts": {"html": REPORT_HTML, "json": REPORT_JSON, "junit": JUNIT_XML,
                      "cucumber": CUCUMBER_JSON},
    }


def feature_entry(data: dict[str, Any], file: str, name: str,
                  description: str = "") -> dict[str, Any]:
    """The feature's entry (created on first use, in the order scenarios arrive)."""
    for feature in data["features"]:
        if feature["file"] == file:
            return feature  # type: ignore[no-any-return]
    feature = {"file": file, "name": name, "description": description.strip(),
               "scenarios": []}
    data["features"].append(feature)
    return feature


def scenario_entry(feature: dict[str, Any], *, nodeid: str, name: str, line: int | None = None,
                   tags: Iterable[str] = (),
                   steps: Iterable[tuple[str, str, int | None]] = ()) -> dict[str, Any]:
    scenario = {
        "nodeid": nodeid, "name": name, "line": line, "tags": sorted(tags),
        "status": NOT_RUN, "message": None, "started_at": None, "duration_ms": None,
        "steps": [step_entry(kw, text, ln) for kw, text, ln in steps],
        "runs": [], "time_to_recover_ms": None, "time_to_recover_incomplete": None,
    }
    feature["scenarios"].append(scenario)
    return scenario


def step_entry(keyword: str, name: str, line: int | None = None,
               type_: str | None = None) -> dict[str, Any]:
    """A step as the report keeps it; `type` is given/when/then (And takes the previous)."""
    return {"keyword": keyword, "name": name, "line": line, "type": type_,
            "status": NOT_RUN, "started_at": None, "offset_ms": None, "duration_ms": None,
            "error": None}


def scenarios(data: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for feature in data.get("features") or []:
        for scenario in feature.get("scenarios") or []:
            yield feature, scenario


def summarize(data: Mapping[str, Any]) -> dict[str, Any]:
    """Counts of scenarios and steps by status."""
    by_scenario: dict[str, int] = {}
    by_step: dict[str, int] = {}
    for _, scenario in scenarios(data):
        by_scenario[scenario["status"]] = by_scenario.get(scenario["status"], 0) + 1
        for step in scenario.get("steps") or []:
            by_step[step["status"]] = by_step.get(step["status"], 0) + 1
    return {"scenarios": sum(by_scenario.values()), "scenario_status": by_scenario,
            "steps": sum(by_step.values()), "step_status": by_step}


def _n(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def attention(data: Mapping[str, Any]) -> list[str]:
    """Plain sentences about everything the run did not prove; empty when it proved it all."""
    failed, skipped_scenarios, skipped, undefined, not_run = [], [], [], [], 0
    never: list[str] = []
    for feature, scenario in scenarios(data):
        where = f"{feature['name']} / {scenario['name']}"
        steps = scenario.get("steps") or []
        if scenario["status"] in (FAILED, ERROR):
            failed.append(where)
        if scenario["status"] == NOT_RUN:
            never.append(where)
            continue
        if scenario["status"] == SKIPPED and not any(
                s["status"] in (PASSED, FAILED, UNDEFINED) for s in steps):
            reason = f" ({scenario['message']})" if scenario.get("message") else ""
            skipped_scenarios.append(where + reason)
            continue
        for step in steps:
            text = f"{where} / {step['keyword']} {step['name']}"
            if step["status"] == SKIPPED:
                skipped.append(text + (f" ({step['error']})" if step.get("error") else ""))
            elif step["status"] == UNDEFINED:
                undefined.append(text)
            elif step["status"] == NOT_RUN and scenario["status"] in (FAILED, ERROR):
                not_run += 1
    lines = []
    total = sum(1 for _ in scenarios(data))
    if total == 0:
        lines.append("No scenario ran: this report proves nothing.")
    if failed:
        lines.append(f"{len(failed)} of {_n(total, 'scenario')} FAILED: " + "; ".join(failed))
    if skipped_scenarios:
        lines.append(f"{_n(len(skipped_scenarios), 'scenario')} SKIPPED, so none of their "
                     "steps ran: " + "; ".join(skipped_scenarios))
    if skipped:
        lines.append(f"{_n(len(skipped), 'step')} SKIPPED: " + "; ".join(skipped))
    if undefined:
        lines.append(f"{_n(len(undefined), 'step')} UNDEFINED (no step definition matched): "
                     + "; ".join(undefined))
    if never:
        lines.append(f"{_n(len(never), 'scenario')} never ran (the run stopped early, was "
                     "interrupted or only collected): " + "; ".join(never))
    if not_run:
        lines.append(f"{_n(not_run, 'step')} did not run because an earlier step of its "
                     "scenario failed.")
    return lines


def finalize(data: dict[str, Any]) -> dict[str, Any]:
    """Recompute what derives from the scenarios: time-to-recover, summary, attention."""
    data["features"] = sorted(data.get("features") or [],
                              key=lambda f: feature_sort_key(Path(f["file"])))
    for _, scenario in scenarios(data):
        measure_unfinished(scenario.get("runs") or [], scenario_end(scenario))
        scenario["time_to_recover_ms"] = time_to_recover(recovery_runs(scenario))
        scenario["time_to_recover_incomplete"] = recovery_incomplete(recovery_runs(scenario))
    data["summary"] = summarize(data)
    data["attention"] = attention(data)
    return data


def last_verified(data: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(feature file name, scenario name) -> {status, at, environment}: for `runbook docs`."""
    at = data.get("finished_at") or data.get("started_at")
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for feature, scenario in scenarios(data):
        out[(Path(feature["file"]).name, scenario["name"])] = {
            "status": scenario["status"], "at": at,
            "environment": data.get("environment"),
            "time_to_recover_ms": scenario.get("time_to_recover_ms"),
            "time_to_recover_incomplete": scenario.get("time_to_recover_incomplete")}
    return out
