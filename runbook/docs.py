"""The living runbook: features/*.feature rendered as on-call documentation.

The features are the runbook; this module only presents them in on-call order, with the exact
commands to type (from a small table of step phrases below), what each step checks, and the
drill that last proved each scenario. Parsing uses gherkin, the parser pytest-bdd itself uses,
so what is documented is what runs. The output is deterministic (no clock, no absolute paths):
tests/test_docs.py compares the committed docs/runbook.md with a fresh render.

Nothing here imports pytest: step definitions are read from steps/*.py with `ast`.
"""

from __future__ import annotations

import ast
import html
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runbook.errors import MEANINGS

REPO_ROOT = Path(__file__).resolve().parent.parent
FEATURES_DIR = REPO_ROOT / "features"
STEPS_DIR = REPO_ROOT / "steps"
DOCS_MD = REPO_ROOT / "docs" / "runbook.md"
NOT_VERIFIED = "not yet verified by a drill"
ENV = "<env>"

# On-call order: the rollback workflow first, then the database, troubleshooting, recovery,
# getting help. Feature files not named here follow, alphabetically.
FEATURE_ORDER = ("rollback", "database", "troubleshooting", "recovery", "getting-help",
                 "getting_help", "help")

TAGS = {
    "mutating": "changes the environment; on a real host only the rollback of `pytest "
                "features/rollback.feature` runs unselected, any other only when selected "
                "explicitly (-k, -m, node id)",
    "fault": "drill only: breaks things on purpose; skipped on a real host",
    "database": "about the database schema or its data",
}

# ---------------------------------------------------------------------------------------------
# Step phrases -> commands. ACTIONS: what to type for a Given/When; CHECKS: how to check a Then
# by hand. `{name}` is filled from the phrase's named group; <env>, <slot>, <version> are
# the reader's to fill.


@dataclass(frozen=True)
class Phrase:
    pattern: str
    commands: tuple[str, ...]
    kinds: tuple[str, ...] = ("given", "when", "then")

    def match(self, kind: str, text: str) -> list[str] | None:
        if kind not in self.kinds:
            return None
        found = re.search(self.pattern, text)
        if found is None:
            return None
        values = {k: v for k, v in found.groupdict().items() if v is not None}
        return [c.format(**values) for c in self.commands]


HEALTH = "runbook healthcheck <env> --slot {slot} --format {form}"
ACTIONS: tuple[Phrase, ...] = (
    Phrase(r"^I confirm the deployment state$", ("runbook status <env>",)),
    Phrase(r"^I preview the rollback$", ("runbook rollback <env> --dry-run",)),
    Phrase(r"^I force the rollback$", ("runbook rollback <env> --force",)),
    Phrase(r"^I roll back restoring", (
        "runbook rollback <env> --restore-snapshot   # or add --snapshot FILE to choose one",)),
    Phrase(r"^I roll back the migrations", (
        "runbook status <env>   # the schema each deployment ran with",
        "# run each newer migration's .down.sql, newest first (golang-migrate down), then:",
        "runbook rollback <env>")),
    Phrase(r"^I roll back$", ("runbook rollback <env>",)),
    Phrase(r"^I redeploy the known-good version", ("runbook deploy <env> --version <version>",)),
    Phrase(r"^I switch traffic by hand", ("runbook switch <env> --slot <slot>",)),
    Phrase(r"^I check the health of the (?P<slot>blue|green) slot as JSON",
           (HEALTH.replace("{form}", "json"),)),
    Phrase(r"^I check the health of the (?P<slot>blue|green) slot as a table",
           (HEALTH.replace("{form}", "table"),)),
    Phrase(r"^I check the health", ("runbook healthcheck <env> --slot both --format table",)),
    Phrase(r"^I ask each slot's own port for its health", (
        "curl -s http://localhost:8081/health   # blue",
        "curl -s http://localhost:8082/health   # green")),
    Phrase(r"holds the deploy lock", ("runbook unlock <env> --status",)),
    Phrase(r"releases the deploy lock", ("runbook unlock <env>   # only a dead or expired "
                                         "holder's lock is ever removed",)),
    Phrase(r"^I start Caddy", ("sudo systemctl start caddy",)),
    Phrase(r"^I take a snapshot", ("runbook snapshot create <env>",)),
    Phrase(r"^I restore", ("runbook snapshot restore <env> <snapshot>",)),
    Phrase(r"^I unlock", ("runbook unlock <env>",)),
    Phrase(r"for (?:its|their) help", ("runbook --help", "runbook <command> --help")),
)

PROXY_CHECK = "curl -si http://localhost/version   # X-Togather-Slot: the slot; body: version"
OUTPUT = "# read it in the runbook command's output, or in its deployment log"
CHECKS: tuple[Phrase, ...] = (
    Phrase(r"^users saw no failed request", (
        "while sleep 0.05; do curl -s -o /dev/null -w '%{{http_code}}\\n' "
        "http://localhost/version; done | uniq -c   # in a second terminal while it runs; "
        "Ctrl-C after: only 200s",), ("then",)),
    Phrase(r"users (?:are|get)|users are still", (PROXY_CHECK,), ("then",)),
    Phrase(r"exit code", ("echo $?   # right after the runbook command",), ("then",)),
    Phrase(r"^the (?:rollback says|advice|refusal|failing health check is named)", (OUTPUT,),
           ("then",)),
    Phrase(r"^the plan shows", ("runbook rollback <env> --dry-run",), ("then",)),
    Phrase(r"JSON report", ("runbook healthcheck <env> --slot blue --format json",), ("then",)),
    Phrase(r"table has a row", ("runbook healthcheck <env> --slot green --format table",),
           ("then",)),
    Phrase(r"answers for itself on its own port", (
        "curl -s http://localhost:8081/health   # blue",
        "curl -s http://localhost:8082/health   # green"), ("then",)),
    Phrase(r"help", ("runbook <command> --help",), ("then",)),
    Phrase(r"health", ("runbook healthcheck <env> --slot active",), ("then",)),
    Phrase(r"deployment log", (
        'tail -n 30 "$(ls -t ~/.togather/logs/deployments/<env>_*.log | head -n 1)"',),
        ("then",)),
    Phrase(r"snapshot", ("runbook snapshot list <env>",), ("then",)),
    Phrase(r"stopped|keeps running|running without a restart",
           ("docker ps -a --filter name=togather-",), ("then",)),
    Phrase(r"Caddyfile", ("sudo caddy validate --config /etc/caddy/Caddyfile",), ("then",)),
    Phrase(r"environment file", ("ls -l /opt/togather/.env.<env>   # unchanged time and size",),
           ("then",)),
    Phrase(r"other sites", ("curl -sI http://localhost:<other site port>/",), ("then",)),
    Phrase(r"state|schema|image|nothing has changed|matches|rollback|status",
           ("runbook status <env>",), ("then",)),
)


def actions_for(kind: str, text: str) -> list[str]:
    for phrase in ACTIONS:
        if (found := phrase.match(kind, text)) is not None:
            return found
    return []


def checks_for(kind: str, text: str) -> list[str]:
    for phrase in CHECKS:
        if (found := phrase.match(kind, text)) is not None:
            return found
    return []


QUICK_REFERENCE: tuple[tuple[str, str, str], ...] = (
    ("Confirm the deployment state", "runbook status <env>",
     "cat .../deployment-state.json | jq ."),
    ("Preview a rollback (every value, the Caddyfile diff)", "runbook rollback <env> --dry-run",
     "server deploy rollback <environment> --dry-run"),
    ("Roll back", "runbook rollback <env>", "server deploy rollback <environment>"),
    ("Roll back past the health gate and schema guard", "runbook rollback <env> --force",
     "server deploy rollback <environment> --force"),
    ("Verify health", "runbook healthcheck <env> --slot both --format table",
     "server healthcheck --slot blue --format json"),
    ("Switch traffic by hand", "runbook switch <env> --slot <slot>",
     "edit /etc/caddy/Caddyfile; systemctl reload caddy"),
    ("Redeploy a known-good version", "runbook deploy <env> --version <version>",
     "./deploy/scripts/deploy.sh <environment> --force"),
    ("Roll back past migrations, restoring a snapshot",
     "runbook rollback <env> --restore-snapshot",
     "gunzip -c <snapshot>.sql.gz | psql \"$DATABASE_URL\""),
    ("Database snapshots", "runbook snapshot list|create|restore <env>",
     "server snapshot"),
    ("Who holds the deploy lock", "runbook unlock <env> --status", ""),
)

EXIT_CODES = tuple((str(int(code)), meaning) for code, meaning in MEANINGS.items())

# ---------------------------------------------------------------------------------------------
# The seed guide (the old on-call rollback guide) -> the scenarios that now carry each part.
# Each entry is a scenario's name or the start of it (so a scenario may grow a clause).

SEED_MAP: dict[str, tuple[str, ...]] = {
    "Quick Reference": ("Run the rollback", "Preview the rollback with a dry run",
                        "Force a rollback past the health gate and the schema guard"),
    "Rollback Workflow": ("Confirm the deployment state before rolling back", "Run the rollback",
                          "Verify the health of both slots"),
    "Rollback Workflow: 1. Confirm deployment state": (
        "Confirm the deployment state before rolling back",),
    "Rollback Workflow: 2. Run rollback": ("Run the rollback",),
    "Rollback Workflow: 3. Verify health": ("Verify the health of both slots",),
    "Rollback Workflow: 4. If health fails": ("Health checks fail on the previous deployment",),
    "What rollback changes": ("Run the rollback, then check what it changed",),
    "Database Considerations": ("Restore a snapshot when migrations ran after the target "
                                "deployment",
                                "Schema mismatch between the previous version and the database"),
    "Troubleshooting": ("No previous deployment found",
                        "Health checks fail on the previous deployment",
                        "Traffic does not switch because Caddy is not running",
                        "Traffic does not switch because the Caddyfile targets the wrong port",
                        "Schema mismatch between the previous version and the database"),
    "Troubleshooting: No previous deployment found": ("No previous deployment found",),
    "Troubleshooting: Health checks fail": ("Health checks fail on the previous deployment",),
    "Troubleshooting: Traffic does not switch": (
        "Traffic does not switch because Caddy is not running",
        "Traffic does not switch because the Caddyfile targets the wrong port"),
    "Troubleshooting: Schema mismatch": (
        "Schema mismatch between the previous version and the database",),
    "Recovery": ("Redeploy a known-good version when the service is down and rollback cannot "
                 "help", "Switch traffic by hand to the slot you know is healthy"),
    "Recovery: Manual slot switch": ("Switch traffic by hand to the slot you know is healthy",),
    "Additional Resources": ("Every command explains itself",),
    "Getting Help": ("The deployment log and the state file say what happened",),
}

# ---------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class DocStep:
    keyword: str  # as written: Given, When, Then, And, But
    kind: str  # given | when | then (And/But take the previous step's)
    text: str
    line: int
    definition: StepDef | None = None
    defined: bool | None = None  # None: step definitions were not read
    table: tuple[tuple[str, ...], ...] = ()  # a data table under the step, header first
    docstring: str | None = None

    @property
    def actions(self) -> list[str]:
        return actions_for(self.kind, self.text)

    @property
    def checks(self) -> list[str]:
        return checks_for(self.kind, self.text)


@dataclass(frozen=True)
class DocScenario:
    name: str
    line: int
    tags: tuple[str, ...]
    description: str
    steps: tuple[DocStep, ...]
    feature_path: str  # features/rollback.feature
    verified: str = NOT_VERIFIED

    @property
    def test_name(self) -> str:
        """pytest-bdd's test function name (its make_python_name), for a node id."""
        name = re.sub(r"\W", "", self.name.replace(" ", "_"))
        return "test_" + re.sub(r"^\d+_*", "", name).lower()

    @property
    def drill_only(self) -> bool:
        return "fault" in self.tags

    @property
    def pytest_command(self) -> str:
        env = "" if self.drill_only else f" --env {ENV}"
        return f'pytest "{self.feature_path}::{self.test_name}"{env}'

    def commands(self) -> list[str]:
        """The commands to type, in step order, each once."""
        seen: list[str] = []
        for step in self.steps:
            for command in step.actions:
                if command not in seen:
                    seen.append(command)
        return seen


@dataclass(frozen=True)
class DocFeature:
    path: str  # features/rollback.feature (relative, so the render is the same anywhere)
    name: str
    description: str
    tags: tuple[str, ...]
    scenarios: tuple[DocScenario, ...]

    @property
    def stem(self) -> str:
        return Path(self.path).stem


@dataclass(frozen=True)
class Runbook:
    features: tuple[DocFeature, ...]
    report_note: str = ""  # which drill report "last verified" comes from
    seed_map: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(SEED_MAP))

    def scenario(self, name: str) -> tuple[DocFeature, DocScenario] | None:
        """The scenario called `name`, else the first whose name starts with it."""
        every = [(f, s) for f in self.features for s in f.scenarios]
        for feature, scenario in every:
            if scenario.name == name:
                return feature, scenario
        for feature, scenario in every:
            if scenario.name.startswith(name):
                return feature, scenario
        return None


# ---------------------------------------------------------------------------------------------
# Step definitions, read with ast (no pytest import): their pattern and docstring


@dataclass(frozen=True)
class StepDef:
    kind: str  # given | when | then | step
    regex: str
    doc: str | None
    where: str  # steps/outcomes.py:52

    def matches(self, kind: str, text: str) -> bool:
        return self.kind in (kind, "step") and re.fullmatch(self.regex, text) is not None


def _parse_to_regex(pattern: str) -> str:
    """A `parse` format ('exit code {code:d} saying "{text}"') as a regex."""
    out = []
    for token in re.split(r"(\{\{|\}\}|\{[^{}]*\})", pattern):
        if token == "{{":
            out.append(re.escape("{"))
        elif token == "}}":
            out.append(re.escape("}"))
        elif token.startswith("{") and token.endswith("}"):
            out.append(r"-?\d+" if token.endswith(":d}") else ".+?")
        else:
            out.append(re.escape(token))
    return "".join(out)


def _decorator_pattern(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.escape(node.value)
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        kind = node.func.attr if isinstance(node.func, ast.Attribute) else \
            getattr(node.func, "id", "")
        if kind == "re":
            return node.args[0].value
        if kind in ("parse", "cfparse"):
            return _parse_to_regex(node.args[0].value)
        if kind == "string":
            return re.escape(node.args[0].value)
    return None


def step_definitions(steps_dir: Path = STEPS_DIR) -> list[StepDef]:
    defs: list[StepDef] = []
    for path in sorted(steps_dir.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for dec in node.decorator_list:
                if not (isinstance(dec, ast.Call) and dec.args):
                    continue
                name = dec.func.attr if isinstance(dec.func, ast.Attribute) else \
                    getattr(dec.func, "id", "")
                if name not in ("given", "when", "then", "step"):
                    continue
                regex = _decorator_pattern(dec.args[0])
                if regex is not None:
                    defs.append(StepDef(name, regex, ast.get_docstring(node),
                                        f"{steps_dir.name}/{path.name}:{node.lineno}"))
    return defs


# ---------------------------------------------------------------------------------------------
# Features


KIND_BY_TYPE = {"Context": "given", "Action": "when", "Outcome": "then"}


def _dedent(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines()]
    return "\n".join(lines).strip()


def parse_feature(path: Path, root: Path, defs: list[StepDef] | None = None,
                  verified: Mapping[tuple[str, str], str] | None = None) -> DocFeature:
    """One .feature file, through gherkin (pytest-bdd's own parser)."""
    from gherkin.parser import Parser

    document: Any = Parser().parse(path.read_text(encoding="utf-8"))
    data = document["feature"]
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        rel = f"features/{path.name}"
    scenarios: list[DocScenario] = []
    background: list[dict[str, Any]] = []

    def steps_of(raw: Iterable[dict[str, Any]]) -> tuple[DocStep, ...]:
        out: list[DocStep] = []
        kind = "given"
        for step in raw:
            kind = KIND_BY_TYPE.get(step.get("keywordType", ""), kind)
            text = step["text"]
            definition = None
            if defs is not None:
                definition = next((d for d in defs if d.matches(kind, text)), None)
            rows = tuple(tuple(str(c.get("value", "")) for c in row.get("cells", []))
                         for row in (step.get("dataTable") or {}).get("rows", []))
            doc = (step.get("docString") or {}).get("content")
            out.append(DocStep(step["keyword"].strip(), kind, text, step["location"]["line"],
                               definition, None if defs is None else definition is not None,
                               rows, doc))
        return tuple(out)

    def add(scenario: dict[str, Any], extra_tags: Iterable[str] = ()) -> None:
        tags = sorted({t["name"].lstrip("@") for t in scenario.get("tags", [])}
                      | set(extra_tags) | {t["name"].lstrip("@") for t in data.get("tags", [])})
        name = scenario["name"]
        scenarios.append(DocScenario(
            name=name, line=scenario["location"]["line"], tags=tuple(tags),
            description=_dedent(scenario.get("description", "")),
            steps=steps_of([*background, *scenario["steps"]]), feature_path=rel,
            verified=(verified or {}).get((path.name, name), NOT_VERIFIED)))

    for child in data.get("children", []):
        if "background" in child:
            background = list(child["background"]["steps"])
        elif "scenario" in child:
            add(child["scenario"])
        elif "rule" in child:
            rule = child["rule"]
            rule_tags = [t["name"].lstrip("@") for t in rule.get("tags", [])]
            for sub in rule.get("children", []):
                if "scenario" in sub:
                    add(sub["scenario"], rule_tags)
    return DocFeature(path=rel, name=data["name"], description=_dedent(data["description"]),
                      tags=tuple(sorted(t["name"].lstrip("@") for t in data.get("tags", []))),
                      scenarios=tuple(scenarios))


def feature_sort_key(path: Path) -> tuple[int, str]:
    try:
        return FEATURE_ORDER.index(path.stem), path.name
    except ValueError:
        return len(FEATURE_ORDER), path.name


def verified_from_report(report: Mapping[str, Any]) -> dict[tuple[str, str], str]:
    """(feature file name, scenario) -> "passed in the drill of <time> ..." from a report."""
    from runbook import report as reports

    out = {}
    for key, seen in reports.last_verified(report).items():
        ttr = seen.get("time_to_recover_ms")
        extra = f", time to recover {reports.format_ms(ttr)}" if ttr is not None else ""
        where = seen.get("environment") or "drill"
        if seen["status"] == reports.PASSED:
            out[key] = f"passed on {where} at {seen['at']}{extra}"
        else:
            out[key] = f"{seen['status'].upper()} on {where} at {seen['at']}: not verified"
    return out


def build(features_dir: Path = FEATURES_DIR, steps_dir: Path | None = STEPS_DIR,
          report: Mapping[str, Any] | None = None, report_note: str = "") -> Runbook:
    root = features_dir.resolve().parent
    defs = step_definitions(steps_dir) if steps_dir is not None and steps_dir.is_dir() else None
    verified = verified_from_report(report) if report is not None else None
    paths = sorted(features_dir.glob("*.feature"), key=feature_sort_key)
    return Runbook(tuple(parse_feature(p, root, defs, verified) for p in paths), report_note)


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


# ---------------------------------------------------------------------------------------------
# HTML

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


def _h(text: str) -> str:
    return html.escape(text, quote=True)


def _html_step_extras(step: DocStep) -> str:
    out = ""
    if step.table:
        head = "".join(f"<th>{_h(c)}</th>" for c in step.table[0])
        rows = "".join("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in row) + "</tr>"
                       for row in step.table[1:])
        out += f'<table class="datatable"><tr>{head}</tr>{rows}</table>'
    if step.docstring is not None:
        out += f'<pre class="docstring">{_h(step.docstring)}</pre>'
    return out


def _html_scenario(feature: DocFeature, scenario: DocScenario) -> str:
    sid = "scenario-" + github_slug(scenario.name)
    tags = " ".join(f'<span class="tag {_h(t)}">@{_h(t)}</span>' for t in scenario.tags)
    ok = scenario.verified.startswith("passed")
    out = [f'<section class="scenario" id="{_h(sid)}">', f"<h3>{_h(scenario.name)}</h3>",
           f'<p class="facts">{tags} Runs on: '
           f'{"drill only" if scenario.drill_only else "a drill or a real host"} · '
           f'Last verified: <span class="verified {"yes" if ok else "no"}">'
           f"{_h(scenario.verified)}</span></p>"]
    if scenario.description:
        out.append(f"<p>{_h(scenario.description)}</p>")
    items = "".join(
        f"<li><b>{_h(s.keyword)}</b> {_h(s.text)}"
        + (' <span class="undefined">(no step definition yet)</span>' if s.defined is False
           else "") + _html_step_extras(s) + "</li>" for s in scenario.steps)
    out.append(f'<h4>Steps</h4><ol class="steps">{items}</ol>')
    if commands := scenario.commands():
        out.append('<h4>Commands to type</h4><pre class="commands">'
                   + _h("\n".join(commands)) + "</pre>")
    checks = [s for s in scenario.steps if s.kind == "then"]
    if checks:
        rows = []
        for step in checks:
            by_hand = "<br>".join(_h(c.removeprefix("# ")) if c.startswith("# ")
                                  else f"<code>{_h(c)}</code>" for c in step.checks)
            how = (f"<br><small>how: {_h(' '.join(step.definition.doc.split()))}</small>"
                   if step.definition is not None and step.definition.doc else "")
            rows.append(f"<tr><td>{_h(step.text)}{how}</td><td>{by_hand}</td></tr>")
        out.append('<h4>What each step checks</h4><table class="checks"><tr><th>checks that'
                   "</th><th>check it by hand</th></tr>" + "".join(rows) + "</table>")
    hows = [s for s in scenario.steps if s.kind != "then" and s.definition is not None
            and s.definition.doc]
    if hows:
        out.append("<h4>How the drill does it</h4><ul>" + "".join(
            f"<li>{_h(s.text)}: {_h(' '.join(s.definition.doc.split()))}</li>" for s in hows
            if s.definition is not None and s.definition.doc) + "</ul>")
    out.append(f"<p>Run this scenario: <code>{_h(scenario.pytest_command)}</code></p></section>")
    return "".join(out)


def render_html(runbook: Runbook) -> str:
    from runbook.report import page

    body = ["<h1>Togather rollback runbook</h1>",
            "<p>Every section is an executable scenario in <code>features/</code>, proved "
            "against an ephemeral blue/green stack by <code>make drill</code>. "
            "<code>&lt;env&gt;</code> is <code>production</code> (alias <code>prod</code>), "
            "<code>staging</code>, <code>development</code> or an environment TOML file. "
            "Generated by <code>runbook docs</code>.</p>"]
    if runbook.report_note:
        body.append(f"<p>Last verified from: <code>{_h(runbook.report_note)}</code></p>")
    rows = "".join(f"<tr><td>{_h(what)}</td><td><code>{_h(new)}</code></td>"
                   f"<td>{f'<code>{_h(old)}</code>' if old else ''}</td></tr>"
                   for what, new, old in QUICK_REFERENCE)
    codes = "".join(f"<tr><td>{c}</td><td>{_h(m)}</td></tr>" for c, m in EXIT_CODES)
    body.append('<section id="quick-reference"><h2>Quick Reference</h2><table><tr><th>To</th>'
                f"<th>Type</th><th>Replaces</th></tr>{rows}</table><h4>Exit codes</h4>"
                f"<table><tr><th>code</th><th>meaning</th></tr>{codes}</table></section>")
    nav = "".join(
        f'<li><a href="#feature-{_h(f.stem)}">{_h(f.name)}</a><ul>'
        + "".join(f'<li><a href="#scenario-{_h(github_slug(s.name))}">{_h(s.name)}</a></li>'
                  for s in f.scenarios) + "</ul></li>" for f in runbook.features)
    body.append(f'<nav id="contents"><h2>Contents</h2><ul>{nav}</ul></nav>')
    for feature in runbook.features:
        body.append(f'<section class="feature" id="feature-{_h(feature.stem)}">'
                    f"<h2>{_h(feature.name)}</h2>")
        if feature.description:
            body.append(f"<p>{_h(' '.join(feature.description.split()))}</p>")
        body.append(f"<p>Run the whole section: <code>pytest {_h(feature.path)} --env "
                    "&lt;env&gt;</code> (scenarios tagged <code>@fault</code> run on a drill "
                    "only)</p>")
        body += [_html_scenario(feature, s) for s in feature.scenarios]
        body.append("</section>")
    tags = "".join(f'<li><span class="tag {_h(t)}">@{_h(t)}</span> {_h(m)}</li>'
                   for t, m in TAGS.items())
    body.append(f'<section id="tags"><h2>Tags</h2><ul>{tags}</ul></section>')
    rows_seed = []
    for section, names in runbook.seed_map.items():
        found = [(n, runbook.scenario(n)) for n in names]
        links = "; ".join(
            f'<a href="#scenario-{_h(github_slug(f[1].name))}">{_h(f[1].name)}</a>' if f
            else f"{_h(n)} <em>(missing)</em>" for n, f in found)
        rows_seed.append(f"<tr><td>{_h(section)}</td><td>{links}</td></tr>")
    body.append('<section id="seed-map"><h2>Where the old rollback guide went</h2><table>'
                "<tr><th>Old guide section</th><th>Now proved by</th></tr>"
                + "".join(rows_seed) + "</table></section>")
    return page("Togather rollback runbook", "".join(body), CSS)


def render(features_dir: Path = FEATURES_DIR, steps_dir: Path | None = STEPS_DIR,
           report: Mapping[str, Any] | None = None, report_note: str = "") -> tuple[str, str]:
    """(markdown, html) of the runbook."""
    runbook = build(features_dir, steps_dir, report, report_note)
    return render_markdown(runbook), render_html(runbook)
