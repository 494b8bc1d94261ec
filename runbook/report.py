"""Drill reports, moved to the runbook/reports package; this module keeps the old names.

New code imports from runbook.reports.<module>: model (the data), output (write/load),
fingerprint (the one part that asks live tools), timeline (SVG), page (the HTML page).
"""

from __future__ import annotations

from runbook.reports.fingerprint import (
    REPO_ROOT,
    caddy_version,
    docker_engine,
    environment_fingerprint,
    image_ids,
    postgres_version,
    slot_images,
    tool_fingerprint,
)
from runbook.reports.model import (
    CUCUMBER_JSON,
    ENGINE_ACTIONS,
    ERROR,
    FAILED,
    FORMAT,
    JUNIT_XML,
    NOT_RUN,
    PASSED,
    RECOVERY_ACTION,
    REPORT_HTML,
    REPORT_JSON,
    SKIPPED,
    UNDEFINED,
    add_traffic,
    attention,
    collect_runs,
    feature_entry,
    finalize,
    images_in,
    incomplete,
    is_arrangement,
    last_verified,
    measure_unfinished,
    measured_end_ms,
    measured_to,
    new_report,
    recovery_incomplete,
    recovery_runs,
    run_duration_ms,
    run_phases,
    run_step,
    run_window,
    scenario_end,
    scenario_entry,
    scenarios,
    step_entry,
    summarize,
    time_to_recover,
    traffic,
    unfinished_step,
)
from runbook.reports.output import (
    load,
    write,
)
from runbook.reports.page import (
    CSS,
    render_html,
)
from runbook.reports.timeline import (
    STATUS_COLOURS,
    timeline_svg,
    traffic_line,
)
from runbook.times import format_ms
from runbook.times import format_ms_utc as now_iso
from runbook.times import parse_utc as parse_time

__all__ = [
    "CSS", "CUCUMBER_JSON", "ENGINE_ACTIONS", "ERROR", "FAILED", "FORMAT", "JUNIT_XML",
    "NOT_RUN", "PASSED", "RECOVERY_ACTION", "REPORT_HTML", "REPORT_JSON", "REPO_ROOT",
    "SKIPPED", "STATUS_COLOURS", "UNDEFINED", "add_traffic", "attention", "caddy_version",
    "collect_runs", "docker_engine", "environment_fingerprint", "feature_entry", "finalize",
    "format_ms", "image_ids", "images_in", "incomplete", "is_arrangement", "last_verified",
    "load", "measure_unfinished", "measured_end_ms", "measured_to", "new_report", "now_iso",
    "parse_time", "postgres_version", "recovery_incomplete", "recovery_runs", "render_html",
    "run_duration_ms", "run_phases", "run_step", "run_window", "scenario_end", "scenario_entry",
    "scenarios", "slot_images", "step_entry", "summarize", "time_to_recover", "timeline_svg",
    "tool_fingerprint", "traffic", "traffic_line", "unfinished_step", "write",
]
