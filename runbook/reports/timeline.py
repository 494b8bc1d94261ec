"""The timeline picture of an engine run: one bar per phase, and the simulated users' row.

The numbers are computed here; runbook/templates/timeline.svg.j2 writes the SVG (autoescaped)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from runbook import templating
from runbook.reports.model import (
    incomplete,
    measured_end_ms,
    measured_to,
    run_duration_ms,
    run_phases,
    unfinished_step,
)
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


def _f(value: float) -> str:
    """Coordinates to a tenth of a pixel: enough for a bar, short in the file."""
    return f"{value:.1f}"


def timeline_svg(run: Mapping[str, Any], width: int = 900) -> str:
    """One horizontal bar per phase of an engine run, at its measured offset and duration.

    The geometry is computed here; templates/timeline.svg.j2 lays it out, autoescaped."""
    phases = run_phases(run)
    if not phases:
        return ""
    label_w, right_w, row_h, bar_h, top, axis_h = 150, 96, 24, 16, 30, 28
    plot_w = width - label_w - right_w
    total = measured_end_ms(run) or 1
    scale = plot_w / total
    users = run.get("traffic") if isinstance(run.get("traffic"), Mapping) else None
    rows = len(phases) + (1 if users else 0)
    height = top + row_h * rows + axis_h
    measured = run_duration_ms(run)
    killed = incomplete(run)  # a run killed mid-step: its figure is not a clean duration
    title = (f"{run.get('action', 'run')} {run.get('run_id', '')}: {run.get('outcome', '')}, "
             f"{format_ms(measured)} measured" + (f", incomplete: {killed}" if killed else ""))
    open_step = unfinished_step(run)
    open_index = max((i for i, p in enumerate(phases) if open_step is not None
                      and p["duration_ms"] is None and p["name"] == open_step.get("name")),
                     default=None)
    step = _nice_step(total)
    axis_y = top + row_h * rows + 4
    ticks = []
    tick = 0.0
    while tick <= total + 1e-9:
        ticks.append({"x": _f(label_w + tick * scale), "y1": top - 4, "y2": axis_y,
                      "label": format_ms(tick)})
        tick += step
    bars = []
    for index, phase in enumerate(phases):
        y = top + index * row_h
        duration = phase["duration_ms"]
        x = label_w + phase["offset_ms"] * scale
        w = max((duration or 0) * scale, 2.0)
        took = format_ms(duration)
        if index == open_index:  # never ended: drawn to where the run is measured to
            w = max((total - phase["offset_ms"]) * scale, 2.0)
            took = "never ended"
        tip = (f"{phase['title']}: {phase['status']}, starts at +{format_ms(phase['offset_ms'])}"
               + (f", never ended (killed): measured to {measured_to(run)[1]}"
                  if index == open_index else f", takes {took}")
               + (f" - {phase['error']}" if phase.get("error") else ""))
        bars.append({"name": phase["name"], "status": phase["status"],
                     "offset_ms": phase["offset_ms"],
                     "duration_ms": duration if duration is not None else "",
                     "tip": tip, "x": _f(x), "y": y, "w": _f(w), "text_y": y + bar_h - 3,
                     "colour": STATUS_COLOURS.get(phase["status"], "#57606a"),
                     "after_x": _f(x + w + 6), "took": took})
    return templating.render(
        "timeline.svg.j2", width=width, height=height, title=title,
        run_id=run.get("run_id", ""), action=run.get("action", "run"), ticks=ticks,
        phases=bars, label_x=label_w - 8, bar_h=bar_h,
        users=_traffic_row(users, top + len(phases) * row_h, label_w, scale, bar_h, total)
        if users else None)


def traffic_line(users: Mapping[str, Any]) -> str:
    """What the simulated users saw during a run, in one line."""
    gap = users.get("longest_gap_ms")
    return (f"users: {users.get('clients')} clients, {users.get('requests')} requests, "
            f"{users.get('non_2xx')} non-2xx, {users.get('failed')} failed, "
            f"{users.get('resets')} raw resets (retried once), longest gap between answers "
            f"{format_ms(gap)}, slowest answer {format_ms(users.get('slowest_ms'))}")


def _traffic_row(users: Mapping[str, Any], y: int, label_w: int, scale: float,
                 bar_h: int, total: float) -> dict[str, Any]:
    """The users' row: requests per bucket (grey), failed or non-2xx (red), raw resets
    (orange tick) and the longest gap between answers (outlined)."""
    bucket_ms = float(users.get("bucket_ms") or 50)
    buckets = [c for c in users.get("buckets") or []
               if isinstance(c, list | tuple) and len(c) == 3]
    most = max((c[0] + c[1] for c in buckets), default=0) or 1
    cells = []
    for index, (served, bad, resets) in enumerate(buckets):
        x = label_w + index * bucket_ms * scale
        width = max(min(bucket_ms, total - index * bucket_ms) * scale, 1.0)  # the last: clipped
        h = max(bar_h * served / most, 1.0) if served else 0.0
        cells.append({"x": _f(x), "w": _f(width), "served": served, "bad": bad,
                      "resets": resets, "served_y": _f(y + bar_h - h), "served_h": _f(h)})
    gap, at = users.get("longest_gap_ms"), users.get("longest_gap_at_ms")
    outline = None
    if isinstance(gap, int | float) and isinstance(at, int | float):
        outline = {"x": _f(label_w + max(at, 0) * scale), "w": _f(max(gap * scale, 1))}
    return {"requests": users.get("requests"), "non_2xx": users.get("non_2xx"),
            "failed": users.get("failed"), "resets": users.get("resets"),
            "longest_gap_ms": users.get("longest_gap_ms"), "line": traffic_line(users),
            "y": y, "text_y": y + bar_h - 3, "cells": cells, "gap": outline,
            "last_x": _f(label_w + min(len(buckets) * bucket_ms, total) * scale + 6)}
