"""The drill report as one self-contained page (inline CSS and SVG, no external asset).

Data is prepared here; all markup is in runbook/templates/report.html.j2 (autoescaped).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runbook import templating
from runbook.reports import fleet
from runbook.reports.model import (
    ENGINE_ACTIONS,
    ERROR,
    FAILED,
    PASSED,
    RECOVERY_ACTION,
    SKIPPED,
    UNDEFINED,
    attention,
    incomplete,
    is_arrangement,
    recovery_runs,
    run_duration_ms,
    run_step,
    scenarios,
    summarize,
)
from runbook.reports.timeline import timeline_svg, traffic_line
from runbook.times import format_ms

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

FINGERPRINT_LABELS = (
    ("tool", "tool version"), ("tool_commit", "tool commit"), ("python", "python"),
    ("platform", "platform"), ("environment", "environment"),
    ("app_images", "app image(s) seen"), ("slot_images", "slot images at first look"),
    ("app_image_ids", "app image ids"), ("caddy", "Caddy"), ("postgres", "Postgres"),
    ("docker_engine", "Docker engine"), ("timestamp", "timestamp"))


def _slug(text: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in text)
    return "-".join(filter(None, out.split("-")))


def _fingerprint_rows(fingerprint: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    known = {key for key, _ in FINGERPRINT_LABELS}
    rows: list[tuple[str, str, Any]] = []
    for key, label in [*FINGERPRINT_LABELS,
                       *((k, k) for k in sorted(fingerprint) if k not in known)]:
        if key not in fingerprint:
            continue
        value = fingerprint[key]
        if isinstance(value, Mapping):
            rows.append((label, "mapping", list(value.items())))
        elif isinstance(value, list | tuple):
            rows.append((label, "list", list(value)))
        else:
            rows.append((label, "text", value))
    return rows


def _figure(scenario: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any] | None:
    if run.get("action") not in ENGINE_ACTIONS or not (svg := timeline_svg(run)):
        return None
    users = run.get("traffic")
    return {"svg": templating.safe(svg), "run_id": run.get("run_id", ""),
            "action": run.get("action"), "outcome": run.get("outcome"),
            "exit_code": run.get("exit_code"), "step": run_step(scenario, run),
            "users": traffic_line(users) if isinstance(users, Mapping) else None}


def _measured(ms: float | None, why_incomplete: str | None) -> str:
    """A measured time as the page shows it: one from a run killed mid-step is never shown
    as a clean duration."""
    return format_ms(ms) + (f" (incomplete: {why_incomplete})" if why_incomplete else "")


def _ttr(scenario: Mapping[str, Any]) -> str:
    return _measured(scenario.get("time_to_recover_ms"),
                     scenario.get("time_to_recover_incomplete"))


def _run_row(run: Mapping[str, Any]) -> dict[str, Any]:
    error = run.get("error") or {}
    message = error.get("message") if isinstance(error, Mapping) else str(error)
    return {"run_id": run.get("run_id", ""), "action": run.get("action", ""),
            "outcome": run.get("outcome", ""), "exit_code": run.get("exit_code", ""),
            "measured": _measured(run_duration_ms(run), incomplete(run)),
            "who": run.get("who", ""),
            "why": run.get("why", ""), "error": message or ""}


def _scenario(feature: Mapping[str, Any], scenario: Mapping[str, Any]) -> dict[str, Any]:
    head, rest = None, ""
    if scenario.get("message"):
        head, _, rest = str(scenario["message"]).partition("\n\n")
    runs = [r for r in scenario.get("runs") or [] if isinstance(r, Mapping)]
    arranged = [r for r in runs if is_arrangement(scenario, r)]
    ttr = scenario.get("time_to_recover_ms")
    return {
        "id": "scenario-" + _slug(f"{Path(feature['file']).stem} {scenario['name']}"),
        "name": scenario["name"], "status": scenario["status"],
        "duration": format_ms(scenario.get("duration_ms")),
        "ttr": _ttr(scenario) if ttr is not None else None,
        "tags": list(scenario.get("tags") or []),
        "message_head": head, "traceback": rest if rest.strip() else "",
        "steps": [{"keyword": s["keyword"], "name": s["name"], "status": s["status"],
                   "error": s.get("error") or "", "duration": format_ms(s.get("duration_ms"))}
                  for s in scenario.get("steps") or []],
        "figures": [f for r in runs if r not in arranged if (f := _figure(scenario, r))],
        "arranged": arranged,
        "arranged_figures": [f for r in arranged if (f := _figure(scenario, r))],
        "runs": [_run_row(r) for r in runs],
        "fleet": [fleet.section(r) for r in scenario.get("fleet_runs") or []
                  if isinstance(r, Mapping)],
    }


def _recovery_outcomes(scenario: Mapping[str, Any]) -> str:
    return ", ".join(f"{r.get('outcome', '?')} (exit {r.get('exit_code')})"
                     for r in recovery_runs(scenario) if r.get("action") == RECOVERY_ACTION)


def render_html(data: Mapping[str, Any]) -> str:
    """The whole report as one page: inline CSS and SVG, no external asset."""
    summary = summarize(data)
    sc = summary["scenario_status"]
    st = summary["step_status"]
    ttrs = [(f, s) for f, s in scenarios(data) if s.get("time_to_recover_ms") is not None]
    cards: list[tuple[str, Any]] = [
        ("scenarios passed", f"{sc.get(PASSED, 0)} / {summary['scenarios']}"),
        ("scenarios failed", sc.get(FAILED, 0) + sc.get(ERROR, 0)),
        ("steps skipped", st.get(SKIPPED, 0)), ("steps undefined", st.get(UNDEFINED, 0)),
        ("run time", format_ms(data.get("duration_ms")))]
    if ttrs:
        longest = max((s for _, s in ttrs), key=lambda s: s["time_to_recover_ms"])
        cards.append(("longest time to recover",
                      format_ms(longest["time_to_recover_ms"])
                      + (" (incomplete)" if longest.get("time_to_recover_incomplete") else "")))
    features = [{"id": "feature-" + _slug(Path(f["file"]).stem), "name": f["name"],
                 "file": f["file"],
                 "scenarios": [_scenario(f, s) for s in f.get("scenarios") or []]}
                for f in data.get("features") or []]
    return templating.render(
        "report.html.j2", title=f"Drill report: {data.get('environment', '?')}",
        css=templating.safe(CSS), started_at=data.get("started_at"),
        finished_at=data.get("finished_at") or "-",
        command=shlex.join(str(a) for a in data.get("command") or []),
        dry_run=bool(data.get("dry_run")),
        attention=attention(data), summary=summary, cards=cards,
        fingerprint=_fingerprint_rows(dict(data.get("fingerprint") or {})),
        ttrs=[{"feature": f["name"], "scenario": s["name"],
               "ttr": _ttr(s), "outcomes": _recovery_outcomes(s)}
              for f, s in ttrs],
        features=features, artifacts=list((data.get("artifacts") or {}).items()))
