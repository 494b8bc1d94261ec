"""The living runbook, moved to the runbook/livedocs package; this module keeps the old names."""

from __future__ import annotations

from runbook.feature_order import FEATURE_ORDER, feature_sort_key
from runbook.livedocs import render
from runbook.livedocs.markdown import (
    github_slug,
    render_markdown,
)
from runbook.livedocs.model import (
    DOCS_MD,
    ENV,
    FEATURES_DIR,
    KIND_BY_TYPE,
    NOT_VERIFIED,
    REPO_ROOT,
    STEPS_DIR,
    DocFeature,
    DocScenario,
    DocStep,
    Runbook,
    StepDef,
    build,
    parse_feature,
    step_definitions,
    verified_from_report,
)
from runbook.livedocs.page import (
    CSS,
    render_html,
)
from runbook.livedocs.phrases import (
    ACTIONS,
    CHECKS,
    EXIT_CODES,
    HEALTH,
    OUTPUT,
    PROXY_CHECK,
    QUICK_REFERENCE,
    SEED_MAP,
    TAGS,
    Phrase,
    actions_for,
    checks_for,
)

__all__ = [
    "ACTIONS",
    "CHECKS",
    "CSS",
    "DOCS_MD",
    "ENV",
    "EXIT_CODES",
    "FEATURES_DIR",
    "FEATURE_ORDER",
    "HEALTH",
    "KIND_BY_TYPE",
    "NOT_VERIFIED",
    "OUTPUT",
    "PROXY_CHECK",
    "QUICK_REFERENCE",
    "REPO_ROOT",
    "SEED_MAP",
    "STEPS_DIR",
    "TAGS",
    "DocFeature",
    "DocScenario",
    "DocStep",
    "Phrase",
    "Runbook",
    "StepDef",
    "actions_for",
    "build",
    "checks_for",
    "feature_sort_key",
    "github_slug",
    "parse_feature",
    "render",
    "render_html",
    "render_markdown",
    "step_definitions",
    "verified_from_report",
]
