"""Writing and reading a report directory: report.json and the page rendered from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runbook.reports.model import FORMAT, REPORT_HTML, REPORT_JSON, finalize
from runbook.reports.page import render_html


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
