"""HTML through Jinja2 templates with autoescaping: one place that renders a page.

Templates are package data (runbook/templates/). Every value is escaped unless a renderer
marks it `Markup` on purpose (our own CSS, an SVG built by runbook/reports/timeline.py).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2
from markupsafe import Markup


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("runbook", "templates"), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True)


def render(template: str, **context: Any) -> str:
    """Render `template` with `context`, every value HTML-escaped."""
    return _environment().get_template(template).render(**context)


def safe(text: str) -> Markup:
    """Text that is already HTML or CSS of our own making, inserted as is."""
    return Markup(text)
