"""The living runbook as one HTML page (runbook/templates/runbook.html.j2, autoescaped)."""

from __future__ import annotations

from typing import Any

from runbook import templating
from runbook.livedocs.markdown import github_slug
from runbook.livedocs.model import DocScenario, Runbook
from runbook.livedocs.phrases import EXIT_CODES, QUICK_REFERENCE, TAGS

CSS = """
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #24292f;
       max-width: 1000px; margin: 0 auto; padding: 24px; }
h1 { font-size: 28px; } h2 { border-bottom: 1px solid #d0d7de; margin-top: 40px; }
h3 { margin-top: 28px; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 13px; }
pre { background: #161b22; color: #e6edf3; padding: 10px 12px; border-radius: 6px;
      overflow-x: auto; }
table { border-collapse: collapse; width: 100%; margin: 8px 0; }
th, td { text-align: left; border-bottom: 1px solid #eaeef2; padding: 4px 8px;
         vertical-align: top; }
th { background: #f6f8fa; }
.scenario { border: 1px solid #d0d7de; border-radius: 8px; padding: 4px 16px 12px;
            margin: 16px 0; }
.facts { color: #57606a; font-size: 14px; }
.tag { font-family: ui-monospace, monospace; background: #eaeef2; border-radius: 10px;
       padding: 0 7px; font-size: 12px; }
.tag.fault { background: #ffebe9; color: #a40e26; }
.verified.no { color: #9a6700; } .verified.yes { color: #1a7f37; }
.undefined { color: #cf222e; font-style: italic; }
ol.steps b { display: inline-block; min-width: 48px; }
nav > ul > li { margin-bottom: 6px; }
"""


def _doc(text: str) -> str:
    return " ".join(text.split())


def _scenario(scenario: DocScenario) -> dict[str, Any]:
    checks = []
    for step in scenario.steps:
        if step.kind != "then":
            continue
        by_hand = [("note", c.removeprefix("# ")) if c.startswith("# ") else ("code", c)
                   for c in step.checks]
        how = (_doc(step.definition.doc) if step.definition is not None
               and step.definition.doc else "")
        checks.append({"text": step.text, "how": how, "by_hand": by_hand})
    hows = [(s.text, _doc(s.definition.doc)) for s in scenario.steps
            if s.kind != "then" and s.definition is not None and s.definition.doc]
    return {
        "name": scenario.name, "slug": github_slug(scenario.name), "tags": scenario.tags,
        "runs_on": "drill only" if scenario.drill_only else "a drill or a real host",
        "ok": scenario.verified.startswith("passed"), "verified": scenario.verified,
        "description": scenario.description,
        "steps": [{"keyword": s.keyword, "text": s.text, "undefined": s.defined is False,
                   "table": s.table, "docstring": s.docstring} for s in scenario.steps],
        "commands": "\n".join(scenario.commands()), "checks": checks, "hows": hows,
        "pytest_command": scenario.pytest_command,
    }


def render_html(runbook: Runbook) -> str:
    features = [{"stem": f.stem, "name": f.name, "path": f.path,
                 "description": _doc(f.description) if f.description else "",
                 "scenarios": [_scenario(s) for s in f.scenarios]} for f in runbook.features]
    seed_map = []
    for section, names in runbook.seed_map.items():
        links = []
        for name in names:
            found = runbook.scenario(name)
            links.append((found[1].name, github_slug(found[1].name)) if found else (name, ""))
        seed_map.append((section, links))
    return templating.render(
        "runbook.html.j2", title="Togather rollback runbook", css=templating.safe(CSS),
        report_note=runbook.report_note, quick_reference=QUICK_REFERENCE,
        exit_codes=EXIT_CODES, features=features, tags=list(TAGS.items()), seed_map=seed_map)
