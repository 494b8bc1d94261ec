"""The timeline picture of an engine run: one bar per phase, and the simulated users' row."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

from runbook.reports.model import run_duration_ms, run_phases
from runbook.times import format_ms

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
