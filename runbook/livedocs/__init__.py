"""The living runbook: features/*.feature rendered as on-call documentation.

    phrases   step phrase -> the command to type / how to check it; quick reference; SEED_MAP
    model     the features parsed (gherkin) into DocFeature/DocScenario/DocStep; build()
    markdown  docs/runbook.md (deterministic: tests/test_docs.py compares it)
    page      reports/runbook.html (runbook/templates/runbook.html.j2, autoescaped)

Nothing here is used on a host during a rollback; runbook/docs.py keeps the old names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runbook.livedocs.markdown import render_markdown
from runbook.livedocs.model import FEATURES_DIR, STEPS_DIR, build
from runbook.livedocs.page import render_html


def render(features_dir: Path = FEATURES_DIR, steps_dir: Path | None = STEPS_DIR,
           report: Mapping[str, Any] | None = None, report_note: str = "") -> tuple[str, str]:
    """(markdown, html) of the runbook."""
    runbook = build(features_dir, steps_dir, report, report_note)
    return render_markdown(runbook), render_html(runbook)
