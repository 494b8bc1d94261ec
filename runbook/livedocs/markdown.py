"""docs/runbook.md: the living runbook as Markdown (deterministic: committed and compared)."""

from __future__ import annotations

import re

from runbook.livedocs.model import ENV, DocFeature, DocScenario, Runbook
from runbook.livedocs.phrases import EXIT_CODES, QUICK_REFERENCE, TAGS

# ---------------------------------------------------------------------------------------------
# Markdown


def github_slug(text: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_check(command: str) -> str:
    return command.removeprefix("# ") if command.startswith("# ") else f"`{command}`"


def _md_scenario(feature: DocFeature, scenario: DocScenario) -> list[str]:
    out = [f"### {scenario.name}", ""]
    facts = []
    if scenario.tags:
        facts.append("Tags: " + ", ".join(f"`@{t}`" for t in scenario.tags))
    facts.append("Runs on: " + ("drill only" if scenario.drill_only else "a drill or a real host"))
    facts.append(f"Last verified: {scenario.verified}")
    out += [" · ".join(facts), ""]
    if scenario.description:
        out += [scenario.description, ""]
    out.append("Steps:")
    out.append("")
    for index, step in enumerate(scenario.steps, 1):
        flag = " *(no step definition yet)*" if step.defined is False else ""
        out.append(f"{index}. **{step.keyword}** {step.text}{flag}")
        if step.table:
            out.append("")
            out.append("   | " + " | ".join(_md_cell(c) for c in step.table[0]) + " |")
            out.append("   |" + "---|" * len(step.table[0]))
            out += ["   | " + " | ".join(_md_cell(c) for c in row) + " |"
                    for row in step.table[1:]]
            out.append("")
        if step.docstring is not None:
            out += ["", "   ```", *(f"   {line}" for line in step.docstring.splitlines()),
                    "   ```", ""]
    out.append("")
    commands = scenario.commands()
    if commands:
        out += ["Commands to type:", "", "```bash", *commands, "```", ""]
    checks = [s for s in scenario.steps if s.kind == "then"]
    if checks:
        out += ["What each step checks:", ""]
        for step in checks:
            line = f"- {step.text}"
            if step.checks:
                line += " (by hand: " + "; ".join(_md_check(c) for c in step.checks) + ")"
            out.append(line)
            if step.definition is not None and step.definition.doc:
                out.append(f"  - how: {' '.join(step.definition.doc.split())}")
        out.append("")
    hows = [s for s in scenario.steps if s.kind != "then" and s.definition is not None
            and s.definition.doc]
    if hows:
        out += ["How the drill does it:", ""]
        out += [f"- {s.text}: {' '.join(s.definition.doc.split())}" for s in hows
                if s.definition is not None and s.definition.doc]
        out.append("")
    out += [f"Run this scenario: `{scenario.pytest_command}`", ""]
    return out


def render_markdown(runbook: Runbook) -> str:
    out = ["# Togather rollback runbook", "",
           "<!-- Generated from features/*.feature by `runbook docs`; do not edit by hand. -->",
           "",
           "Every section below is an executable scenario in `features/`, proved against an "
           "ephemeral blue/green stack by `make drill`. `<env>` is `production` (alias `prod`), "
           "`staging`, `development`, or the path of an environment TOML file. Givens are "
           "arranged on a drill and checked on a real host.", ""]
    if runbook.report_note:
        out += [f"Last verified from: {runbook.report_note}", ""]
    out += ["## Quick Reference", "", "| To | Type | Replaces |", "|---|---|---|"]
    out += [f"| {what} | `{_md_cell(new)}` | {f'`{_md_cell(old)}`' if old else ''} |"
            for what, new, old in QUICK_REFERENCE]
    out += ["", "Exit codes:", "", "| code | meaning |", "|---|---|"]
    out += [f"| {code} | {meaning} |" for code, meaning in EXIT_CODES]
    out += ["", "## Contents", ""]
    for feature in runbook.features:
        out.append(f"- [{feature.name}](#{github_slug(feature.name)})")
        out += [f"  - [{s.name}](#{github_slug(s.name)})" for s in feature.scenarios]
    out.append("")
    for feature in runbook.features:
        out += [f"## {feature.name}", ""]
        if feature.description:
            out += [" ".join(feature.description.split()), ""]
        out += [f"Run the whole section: `pytest {feature.path} --env {ENV}` "
                "(scenarios tagged `@fault` run on a drill only)", ""]
        for scenario in feature.scenarios:
            out += _md_scenario(feature, scenario)
    out += ["## Tags", ""]
    out += [f"- `@{tag}`: {meaning}" for tag, meaning in TAGS.items()]
    out += ["", "## Where the old rollback guide went", "",
            "| Old guide section | Now proved by |", "|---|---|"]
    for section, names in runbook.seed_map.items():
        links = []
        for name in names:
            found = runbook.scenario(name)
            links.append(f"[{found[1].name}](#{github_slug(found[1].name)})" if found else
                         f"{name} *(missing)*")
        out.append(f"| {_md_cell(section)} | {'; '.join(links)} |")
    out.append("")
    return "\n".join(out)
