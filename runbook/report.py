"""Drill reports: the data of a run of the features, and the self-contained HTML page about it.

The pytest plugin (steps/report_plugin.py) fills the data; everything that turns data into
files lives here, so a report can be rendered from any report.json (or from synthetic data in
a test) without running a drill. Nothing here imports pytest, and docker/psycopg are imported
only by the fingerprint functions, which a renderer never calls.

report.json (FORMAT) holds: `features[].scenarios[]` with `status`, `duration_ms`, `steps[]`
({keyword, name, line, status, duration_ms, offset_ms, error}), `runs[]` (the engine's run
records, as runbook.journal writes them) and `time_to_recover_ms`; `fingerprint`; `summary`
and `attention` (recomputed by finalize()).
"""

from __future__ import annotations

import html
import json
import math
import platform
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runbook.environment import Environment

FORMAT = "togather-runbook/drill-report@1"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
JUNIT_XML = "junit.xml"
CUCUMBER_JSON = "cucumber.json"
ENGINE_ACTIONS = ("rollback", "deploy", "switch")  # runs that get a timeline
RECOVERY_ACTION = "rollback"  # time-to-recover counts these runs
REPO_ROOT = Path(__file__).resolve().parent.parent

# Step and scenario statuses, in the words the page uses.
PASSED, FAILED, SKIPPED, UNDEFINED, NOT_RUN, ERROR = (
    "passed", "failed", "skipped", "undefined", "not run", "error")


# ---------------------------------------------------------------------------------------------
# Time


def now_iso() -> str:
    """UTC with milliseconds, the journal's format, so times in one report compare as text."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S") + f".{now.microsecond // 1000:03d}Z"


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_ms(ms: float | None) -> str:
    """123 ms, 4.21 s, 2 min 05 s: what a person reads at a glance."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{round(ms)} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    minutes, seconds = divmod(round(ms / 1000), 60)
    return f"{minutes} min {seconds:02d} s"


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


def run_window(run: Mapping[str, Any]) -> tuple[datetime, datetime] | None:
    """The run's timeline as wall-clock times: its origin (offset 0) and its last step's end."""
    phases = run_phases(run)
    if not phases:
        return None
    origin = min(t for step in run.get("steps") or [] if isinstance(step, Mapping)
                 and (t := parse_time(step.get("started_at"))) is not None)
    run_start = parse_time(run.get("started_at"))
    if run_start is not None and run_start <= origin:
        origin = run_start
    end = max(p["offset_ms"] + (p["duration_ms"] or 0) for p in phases)
    return origin, origin + timedelta(milliseconds=end)


def traffic(run: Mapping[str, Any], records: Iterable[Any], clients: int,
            bucket_ms: int = 50) -> dict[str, Any] | None:
    """What a drill's simulated users (runbook.drill.load Requests) saw during a run, laid on
    the run's timeline: counts, the longest gap and requests per bucket, times in ms from the
    run's origin. None when the run has no timeline."""
    from runbook.drill import load

    window = run_window(run)
    if window is None:
        return None
    start, end = (t.timestamp() for t in window)
    records = list(records)
    data = load.summarize(records, start, end, clients).to_json(origin=start)
    data["bucket_ms"] = bucket_ms
    data["buckets"] = [[b["served"], b["bad"], b["resets"]]
                       for b in load.buckets(records, start, end, bucket_ms / 1000)]
    return data


def run_duration_ms(run: Mapping[str, Any]) -> int | None:
    """First step start to last step end, as measured by the journal."""
    phases = run_phases(run)
    if not phases:
        return None
    start = min(int(p["offset_ms"]) for p in phases)
    end = max(int(p["offset_ms"]) + int(p["duration_ms"] or 0) for p in phases)
    return end - start


def time_to_recover(runs: Iterable[Mapping[str, Any]]) -> int | None:
    """The measured time of the scenario's rollback runs, added up (refused attempts count:
    the on-call spends that time too). None when the scenario ran no rollback."""
    durations = [run_duration_ms(r) for r in runs if r.get("action") == RECOVERY_ACTION]
    measured = [d for d in durations if d is not None]
    return sum(measured) if measured else None


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
        "runs": [], "time_to_recover_ms": None,
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
    from runbook.docs import feature_sort_key

    data["features"] = sorted(data.get("features") or [],
                              key=lambda f: feature_sort_key(Path(f["file"])))
    for _, scenario in scenarios(data):
        scenario["time_to_recover_ms"] = time_to_recover(recovery_runs(scenario))
    data["summary"] = summarize(data)
    data["attention"] = attention(data)
    return data


def write(report_dir: Path, data: dict[str, Any]) -> tuple[Path, Path]:
    """report.json and report.html into `report_dir`."""
    report_dir.mkdir(parents=True, exist_ok=True)
    finalize(data)
    json_path = report_dir / REPORT_JSON
    html_path = report_dir / REPORT_HTML
    json_path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n",
                         encoding="utf-8")
    html_path.write_text(render_html(data), encoding="utf-8")
    return json_path, html_path


def load(path: Path) -> dict[str, Any]:
    """A report.json, given the file or the report directory."""
    file = path / REPORT_JSON if path.is_dir() else path
    data = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{file} is not a drill report ({FORMAT})")
    return data


def last_verified(data: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(feature file name, scenario name) -> {status, at, environment}: for `runbook docs`."""
    at = data.get("finished_at") or data.get("started_at")
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for feature, scenario in scenarios(data):
        out[(Path(feature["file"]).name, scenario["name"])] = {
            "status": scenario["status"], "at": at,
            "environment": data.get("environment"),
            "time_to_recover_ms": scenario.get("time_to_recover_ms")}
    return out


# ---------------------------------------------------------------------------------------------
# Environment fingerprint (called by the plugin while the environment is up)


def _short(text: str, limit: int = 200) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:limit]


def _command(argv: list[str], timeout: float = 20) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({' '.join(argv[:3])}: {type(exc).__name__})"
    if proc.returncode != 0:
        return f"unknown ({' '.join(argv)} exited {proc.returncode}: {_short(proc.stderr)})"
    return _short(proc.stdout or proc.stderr)


def tool_fingerprint() -> dict[str, Any]:
    """What ran the drill: this tool's version and commit, python, the machine."""
    from importlib import metadata

    try:
        version = metadata.version("togather-runbook")
    except metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    commit = "unknown"
    if (REPO_ROOT / ".git").exists():
        commit = _command(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"], 5)
    return {"tool": f"togather-runbook {version}", "tool_commit": commit,
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "platform": platform.platform(terse=True), "timestamp": now_iso()}


def caddy_version(env: Environment) -> str:
    """`caddy version` the way this environment runs caddy (a drill: docker exec)."""
    return _command([*env.caddy.command, "version"])


def postgres_version(env: Environment) -> str:
    """SELECT version() on the shared database; else `postgres --version` in its container."""
    try:
        from runbook import database

        with database.connect(env) as conn:
            row = conn.execute("SELECT version()").fetchone()
        if row:
            return str(row[0])
    except Exception:  # the fallback below says what it can
        pass
    try:
        from runbook import docker

        code, out = docker.exec_run(env.database.container, ["postgres", "--version"])
        if code == 0:
            return _short(out)
        return f"unknown (postgres --version exited {code})"
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def slot_images(env: Environment) -> dict[str, str | None]:
    """The image each slot's container runs right now."""
    from runbook import docker

    out: dict[str, str | None] = {}
    for slot, config in env.slots.items():
        try:
            out[str(slot)] = docker.inspect(config.container).image
        except Exception:
            out[str(slot)] = None
    return out


def image_ids(images: Iterable[str]) -> dict[str, str]:
    """Image name -> content id, so two reports can tell whether the same build ran."""
    out: dict[str, str] = {}
    try:
        from runbook import docker

        client = docker.client()
    except Exception:
        return out
    for name in sorted(set(images)):
        try:
            out[name] = str(client.images.get(name).id)[:19]
        except Exception:
            out[name] = "absent"
    return out


def docker_engine() -> str:
    try:
        from runbook import docker

        return str(docker.client().version().get("Version", "unknown"))
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def environment_fingerprint(env: Environment) -> dict[str, Any]:
    """Caddy and Postgres versions and the slots' images of a live environment."""
    return {"environment": env.display, "caddy": caddy_version(env),
            "postgres": postgres_version(env), "slot_images": slot_images(env),
            "docker_engine": docker_engine()}


# ---------------------------------------------------------------------------------------------
# The timeline picture

STATUS_COLOURS = {"ok": "#1a7f37", "passed": "#1a7f37", "failed": "#cf222e",
                  "skipped": "#9a6700", "running": "#bf8700", "planned": "#8c959f"}


def _nice_step(total: float, ticks: int = 6) -> float:
    raw = max(total / ticks, 1e-9)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * magnitude >= raw:
            return factor * magnitude
    return 10 * magnitude


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def timeline_svg(run: Mapping[str, Any], width: int = 900) -> str:
    """One horizontal bar per phase of an engine run, at its measured offset and duration."""
    phases = run_phases(run)
    if not phases:
        return ""
    label_w, right_w, row_h, bar_h, top, axis_h = 150, 96, 24, 16, 30, 28
    plot_w = width - label_w - right_w
    total = max(p["offset_ms"] + (p["duration_ms"] or 0) for p in phases) or 1
    scale = plot_w / total
    users = run.get("traffic") if isinstance(run.get("traffic"), Mapping) else None
    rows = len(phases) + (1 if users else 0)
    height = top + row_h * rows + axis_h
    action = _e(run.get("action", "run"))
    run_id = _e(run.get("run_id", ""))
    outcome = _e(run.get("outcome", ""))
    measured = run_duration_ms(run)
    title = f"{action} {run_id}: {outcome}, {format_ms(measured)} measured"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" role="img" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'data-run-id="{run_id}" data-action="{action}" aria-label="{_e(title)}">',
        f"<title>{_e(title)}</title>",
        f'<text x="0" y="16" class="tl-title" font-size="13" font-weight="600" '
        f'fill="#24292f">{_e(title)}</text>',
    ]
    step = _nice_step(total)
    tick = 0.0
    axis_y = top + row_h * rows + 4
    while tick <= total + 1e-9:
        x = label_w + tick * scale
        parts.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{axis_y}" '
                     f'stroke="#d0d7de" stroke-width="1"/>')
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 14}" font-size="11" fill="#57606a" '
                     f'text-anchor="middle">{_e(format_ms(tick))}</text>')
        tick += step
    for index, phase in enumerate(phases):
        y = top + index * row_h
        duration = phase["duration_ms"]
        x = label_w + phase["offset_ms"] * scale
        w = max((duration or 0) * scale, 2.0)
        colour = STATUS_COLOURS.get(phase["status"], "#57606a")
        tip = (f"{phase['title']}: {phase['status']}, starts at +{format_ms(phase['offset_ms'])}"
               f", takes {format_ms(duration)}"
               + (f" - {phase['error']}" if phase.get("error") else ""))
        parts.append(
            f'<g class="phase phase-{_e(phase["status"])}" data-phase="{_e(phase["name"])}" '
            f'data-status="{_e(phase["status"])}" data-offset-ms="{phase["offset_ms"]}" '
            f'data-duration-ms="{duration if duration is not None else ""}">'
            f'<title>{_e(tip)}</title>'
            f'<text x="{label_w - 8}" y="{y + bar_h - 3}" font-size="12" fill="#24292f" '
            f'text-anchor="end">{_e(phase["name"])}</text>'
            f'<rect class="bar" x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" rx="3" '
            f'fill="{colour}"/>'
            f'<text x="{x + w + 6:.1f}" y="{y + bar_h - 3}" font-size="11" fill="#57606a">'
            f'{_e(format_ms(duration))}</text></g>')
    if users:
        parts.append(_traffic_row(users, top + len(phases) * row_h, label_w, scale, bar_h,
                                  total))
    parts.append("</svg>")
    return "".join(parts)


def traffic_line(users: Mapping[str, Any]) -> str:
    """What the simulated users saw during a run, in one line."""
    gap = users.get("longest_gap_ms")
    return (f"users: {users.get('clients')} clients, {users.get('requests')} requests, "
            f"{users.get('non_2xx')} non-2xx, {users.get('failed')} failed, "
            f"{users.get('resets')} raw resets (retried once), longest gap between answers "
            f"{format_ms(gap)}, slowest answer {format_ms(users.get('slowest_ms'))}")


def _traffic_row(users: Mapping[str, Any], y: int, label_w: int, scale: float,
                 bar_h: int, total: float) -> str:
    """The users' row: requests per bucket (grey), failed or non-2xx (red), raw resets
    (orange tick) and the longest gap between answers (outlined)."""
    bucket_ms = float(users.get("bucket_ms") or 50)
    cells = [c for c in users.get("buckets") or [] if isinstance(c, list | tuple) and len(c) == 3]
    most = max((c[0] + c[1] for c in cells), default=0) or 1
    parts = [f'<g class="traffic" data-requests="{_e(users.get("requests"))}" '
             f'data-non-2xx="{_e(users.get("non_2xx"))}" data-failed="{_e(users.get("failed"))}" '
             f'data-resets="{_e(users.get("resets"))}" '
             f'data-longest-gap-ms="{_e(users.get("longest_gap_ms"))}">'
             f"<title>{_e(traffic_line(users))}</title>"
             f'<text x="{label_w - 8}" y="{y + bar_h - 3}" font-size="12" fill="#24292f" '
             f'text-anchor="end">users</text>']
    for index, (served, bad, resets) in enumerate(cells):
        x = label_w + index * bucket_ms * scale
        width = max(min(bucket_ms, total - index * bucket_ms) * scale, 1.0)  # the last: clipped
        if served:
            h = max(bar_h * served / most, 1.0)
            parts.append(f'<rect x="{x:.1f}" y="{y + bar_h - h:.1f}" width="{width:.1f}" '
                         f'height="{h:.1f}" fill="#8c959f"/>')
        if bad:
            parts.append(f'<rect class="bad" x="{x:.1f}" y="{y}" width="{width:.1f}" '
                         f'height="{bar_h}" fill="#cf222e"/>')
        if resets:
            parts.append(f'<rect class="reset" x="{x:.1f}" y="{y - 3}" width="{width:.1f}" '
                         f'height="3" fill="#bf8700"/>')
    gap, at = users.get("longest_gap_ms"), users.get("longest_gap_at_ms")
    if isinstance(gap, int | float) and isinstance(at, int | float):
        x = label_w + max(at, 0) * scale
        parts.append(f'<rect class="gap" x="{x:.1f}" y="{y - 1}" width="{max(gap * scale, 1):.1f}" '
                     f'height="{bar_h + 2}" fill="none" stroke="#0969da" stroke-width="1.5"/>')
    last = label_w + min(len(cells) * bucket_ms, total) * scale
    parts.append(f'<text x="{last + 6:.1f}" y="{y + bar_h - 3}" font-size="11" fill="#57606a">'
                 f'{_e(users.get("requests"))} req</text></g>')
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# The HTML page

CSS = """
:root { --ok:#1a7f37; --bad:#cf222e; --warn:#9a6700; --undef:#8250df; --mute:#57606a; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color:#24292f;
       margin: 0 auto; max-width: 1120px; padding: 24px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #d0d7de; }
h3 { margin: 0; font-size: 17px; }
.meta { color: var(--mute); margin: 0 0 16px; }
.banner { border-radius: 8px; padding: 14px 18px; margin: 16px 0; font-size: 16px; }
.banner strong { font-size: 19px; display: block; margin-bottom: 6px; }
.banner.attention { background: #fff1e5; border: 3px solid var(--bad); }
.banner.ok { background: #dafbe1; border: 2px solid var(--ok); }
.banner ul { margin: 6px 0 0 18px; padding: 0; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 12px 0; }
.card { border: 1px solid #d0d7de; border-radius: 8px; padding: 10px 14px; min-width: 150px; }
.card b { display: block; font-size: 22px; }
table { border-collapse: collapse; width: 100%; margin: 8px 0; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eaeef2;
         vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; border-radius: 10px; padding: 0 8px; font-size: 12px;
         font-weight: 600; color: #fff; background: var(--mute); white-space: nowrap; }
.badge.passed, .badge.ok { background: var(--ok); }
.badge.failed, .badge.error { background: var(--bad); }
.badge.skipped { background: var(--warn); } .badge.undefined { background: var(--undef); }
.badge.not-run { background: #8c959f; }
.scenario { border: 1px solid #d0d7de; border-radius: 8px; padding: 12px 16px; margin: 14px 0; }
.scenario.failed, .scenario.error { border-left: 6px solid var(--bad); }
.scenario.skipped { border-left: 6px solid var(--warn); }
.scenario.passed { border-left: 6px solid var(--ok); }
.scenario header { display: flex; gap: 10px; align-items: baseline; flex-wrap: wrap; }
.tag { font-family: ui-monospace, monospace; font-size: 12px; color: var(--mute); }
.ttr { font-weight: 600; }
pre { background: #f6f8fa; padding: 8px; border-radius: 6px; overflow-x: auto;
      white-space: pre-wrap; font-size: 12px; }
figure { margin: 10px 0; overflow-x: auto; } figcaption { color: var(--mute); font-size: 13px; }
code { font-family: ui-monospace, monospace; font-size: 13px; }
tr.step-skipped td, tr.step-undefined td { background: #fff8c5; }
tr.step-failed td { background: #ffebe9; }
"""


def _badge(status: str) -> str:
    return f'<span class="badge {_e(status.replace(" ", "-"))}">{_e(status)}</span>'


def _slug(text: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in text)
    return "-".join(filter(None, out.split("-")))


def _banner(lines: list[str], summary: Mapping[str, Any]) -> str:
    if lines:
        items = "".join(f"<li>{_e(line)}</li>" for line in lines)
        return ('<section id="banner" class="banner attention" role="alert">'
                "<strong>ATTENTION: this run did not prove every step of the runbook</strong>"
                f"<ul>{items}</ul></section>")
    return ('<section id="banner" class="banner ok"><strong>Every scenario passed and every '
            f'step ran</strong>{summary["scenarios"]} scenarios, {summary["steps"]} steps.'
            "</section>")


def _fingerprint_table(fingerprint: Mapping[str, Any]) -> str:
    labels = [("tool", "tool version"), ("tool_commit", "tool commit"), ("python", "python"),
              ("platform", "platform"), ("environment", "environment"),
              ("app_images", "app image(s) seen"), ("slot_images", "slot images at first look"),
              ("app_image_ids", "app image ids"), ("caddy", "Caddy"), ("postgres", "Postgres"),
              ("docker_engine", "Docker engine"), ("timestamp", "timestamp")]
    known = {key for key, _ in labels}
    rows = []
    for key, label in [*labels, *((k, k) for k in sorted(fingerprint) if k not in known)]:
        if key not in fingerprint:
            continue
        value = fingerprint[key]
        if isinstance(value, Mapping):
            shown = "<br>".join(f"{_e(k)}: <code>{_e(v)}</code>" for k, v in value.items())
        elif isinstance(value, list | tuple):
            shown = "<br>".join(f"<code>{_e(v)}</code>" for v in value) or "none seen"
        else:
            shown = f"<code>{_e(value)}</code>"
        rows.append(f"<tr><th>{_e(label)}</th><td>{shown}</td></tr>")
    if not rows:
        rows.append('<tr><td>no environment was observed in this run</td></tr>')
    return f'<table class="fingerprint">{"".join(rows)}</table>'


def _runs_table(runs: list[Mapping[str, Any]]) -> str:
    rows = []
    for run in runs:
        error = run.get("error") or {}
        message = error.get("message") if isinstance(error, Mapping) else str(error)
        rows.append(
            f"<tr><td><code>{_e(run.get('run_id', ''))}</code></td>"
            f"<td>{_e(run.get('action', ''))}</td><td>{_e(run.get('outcome', ''))}</td>"
            f"<td class=num>{_e(run.get('exit_code', ''))}</td>"
            f"<td class=num>{_e(format_ms(run_duration_ms(run)))}</td>"
            f"<td>{_e(run.get('who', ''))}</td><td>{_e(run.get('why', ''))}</td>"
            f"<td>{_e(message or '')}</td></tr>")
    return ('<table class="runs"><tr><th>run</th><th>action</th><th>outcome</th>'
            "<th>exit</th><th>measured</th><th>who</th><th>why</th><th>error</th></tr>"
            + "".join(rows) + "</table>")


def _figure(scenario: Mapping[str, Any], run: Mapping[str, Any]) -> str:
    if run.get("action") not in ENGINE_ACTIONS or not (svg := timeline_svg(run)):
        return ""
    step = run_step(scenario, run)
    during = f" during <b>{_e(step['keyword'])}</b> {_e(step['name'])}" if step else ""
    return (f'<figure class="run-timeline">{svg}<figcaption>measured phases of '
            f"<code>{_e(run.get('run_id', ''))}</code> ({_e(run.get('action'))}, "
            f"{_e(run.get('outcome'))}, exit {_e(run.get('exit_code'))}){during}, from its "
            "run record" + (f"; {_e(traffic_line(users))}" if isinstance(
                users := run.get("traffic"), Mapping) else "") + "</figcaption></figure>")


def _scenario_html(feature: Mapping[str, Any], scenario: Mapping[str, Any]) -> str:
    status = scenario["status"]
    sid = "scenario-" + _slug(f"{Path(feature['file']).stem} {scenario['name']}")
    tags = " ".join(f'<span class="tag">@{_e(t)}</span>' for t in scenario.get("tags") or [])
    ttr = scenario.get("time_to_recover_ms")
    ttr_html = (f'<span class="ttr">time to recover: {_e(format_ms(ttr))}</span>'
                if ttr is not None else "")
    out = [f'<section class="scenario {_e(status.replace(" ", "-"))}" id="{_e(sid)}" '
           f'data-status="{_e(status)}">',
           f"<header><h3>{_e(scenario['name'])}</h3>{_badge(status)}"
           f"<span>{_e(format_ms(scenario.get('duration_ms')))}</span>{ttr_html}{tags}</header>"]
    if scenario.get("message"):
        head, _, rest = str(scenario["message"]).partition("\n\n")
        out.append(f"<pre class=message>{_e(head)}</pre>")
        if rest.strip():
            out.append(f"<details><summary>traceback</summary><pre>{_e(rest)}</pre></details>")
    rows = []
    for step in scenario.get("steps") or []:
        s = step["status"]
        err = f"<br><small>{_e(step['error'])}</small>" if step.get("error") else ""
        rows.append(f'<tr class="step step-{_e(s.replace(" ", "-"))}">'
                    f"<td><b>{_e(step['keyword'])}</b> {_e(step['name'])}{err}</td>"
                    f"<td>{_badge(s)}</td>"
                    f"<td class=num>{_e(format_ms(step.get('duration_ms')))}</td></tr>")
    out.append('<table class="steps"><tr><th>step</th><th>status</th><th>duration</th></tr>'
               + "".join(rows) + "</table>")
    runs = [r for r in scenario.get("runs") or [] if isinstance(r, Mapping)]
    arranged = [r for r in runs if is_arrangement(scenario, r)]
    out += [_figure(scenario, r) for r in runs if r not in arranged]
    if arranged:
        out.append(f'<details class="arrangement"><summary>drill arrangement: '
                   f"{len(arranged)} engine run(s) made by Given steps to set the scene (not "
                   "counted in time to recover)</summary>"
                   + "".join(_figure(scenario, r) for r in arranged) + "</details>")
    if runs:
        out.append("<details><summary>engine run records (" + str(len(runs)) + ")</summary>"
                   + _runs_table(runs) + "</details>")
    out.append("</section>")
    return "".join(out)


def _recovery_outcomes(scenario: Mapping[str, Any]) -> str:
    return ", ".join(f"{r.get('outcome', '?')} (exit {r.get('exit_code')})"
                     for r in recovery_runs(scenario) if r.get("action") == RECOVERY_ACTION)


def render_html(data: Mapping[str, Any]) -> str:
    """The whole report as one page: inline CSS and SVG, no external asset."""
    summary = summarize(data)
    lines = attention(data)
    fingerprint = dict(data.get("fingerprint") or {})
    sc = summary["scenario_status"]
    st = summary["step_status"]
    ttrs = [(f, s) for f, s in scenarios(data) if s.get("time_to_recover_ms") is not None]
    cards = [("scenarios passed", f"{sc.get(PASSED, 0)} / {summary['scenarios']}"),
             ("scenarios failed", sc.get(FAILED, 0) + sc.get(ERROR, 0)),
             ("steps skipped", st.get(SKIPPED, 0)), ("steps undefined", st.get(UNDEFINED, 0)),
             ("run time", format_ms(data.get("duration_ms")))]
    if ttrs:
        cards.append(("longest time to recover",
                      format_ms(max(s["time_to_recover_ms"] for _, s in ttrs))))
    title = f"Drill report: {data.get('environment', '?')}"
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="meta">started {_e(data.get("started_at"))}, finished '
            f'{_e(data.get("finished_at") or "-")}; '
            f'<code>{_e(" ".join(data.get("command") or []))}</code>'
            + (" (--dry-run: mutating steps printed their plans)" if data.get("dry_run")
               else "") + "</p>",
            _banner(lines, summary),
            '<div class="cards">' + "".join(f'<div class="card"><b>{_e(v)}</b>{_e(k)}</div>'
                                            for k, v in cards) + "</div>",
            '<h2 id="fingerprint">Environment fingerprint</h2>', _fingerprint_table(fingerprint)]
    if ttrs:
        rows = "".join(
            f"<tr><td>{_e(f['name'])} / {_e(s['name'])}</td>"
            f"<td class=num>{_e(format_ms(s['time_to_recover_ms']))}</td>"
            f"<td>{_e(_recovery_outcomes(s))}</td></tr>" for f, s in ttrs)
        body.append('<h2 id="time-to-recover">Time to recover</h2><p>Measured from the first '
                    "step's start to the last step's end of each rollback run in the scenario, "
                    "added up (refused attempts included).</p><table><tr><th>scenario</th>"
                    f"<th>time to recover</th><th>rollback outcomes</th></tr>{rows}</table>")
    body.append('<h2 id="scenarios">Scenarios</h2>')
    for feature in data.get("features") or []:
        fid = "feature-" + _slug(Path(feature["file"]).stem)
        body.append(f'<section class="feature" id="{_e(fid)}"><h2>{_e(feature["name"])}</h2>'
                    f'<p class="meta"><code>{_e(feature["file"])}</code></p>')
        for scenario in feature.get("scenarios") or []:
            body.append(_scenario_html(feature, scenario))
        body.append("</section>")
    artifacts = data.get("artifacts") or {}
    body.append('<h2 id="files">Files of this report</h2><ul>' + "".join(
        f'<li><a href="{_e(name)}">{_e(name)}</a> ({_e(kind)})</li>'
        for kind, name in artifacts.items()) + "</ul>")
    return page(title, "".join(body), CSS)


def page(title: str, body: str, css: str) -> str:
    """A complete, self-contained HTML document."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{css}</style></head>"
            f"<body>{body}</body></html>\n")

