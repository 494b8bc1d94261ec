"""The living runbook's model: features/*.feature parsed into on-call documentation.

The features are the runbook; this presents them in on-call order, with the exact commands
to type (runbook/livedocs/phrases.py), what each step checks, and the drill that last proved
each scenario. Parsing uses gherkin, the parser pytest-bdd itself uses, so what is documented
is what runs. Nothing here imports pytest: step definitions are read from steps/*.py with ast.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runbook.feature_order import FEATURE_ORDER, feature_sort_key
from runbook.livedocs.phrases import SEED_MAP, actions_for, checks_for
from runbook.reports import model as reports
from runbook.times import format_ms

__all__ = ["FEATURE_ORDER", "feature_sort_key"]

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
FEATURES_DIR = REPO_ROOT / "features"
STEPS_DIR = REPO_ROOT / "steps"
DOCS_MD = REPO_ROOT / "docs" / "runbook.md"
NOT_VERIFIED = "not yet verified by a drill"
ENV = "<env>"

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
        """The commands to type, in step order; one typed again right after itself is shown
        once (a command typed again later is shown again: found by review, the rollback that
        ends the schema-mismatch recipe was dropped as "already shown" at its start)."""
        seen: list[str] = []
        for step in self.steps:
            for command in step.actions:
                if not seen or seen[-1] != command:
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


def verified_from_report(report: Mapping[str, Any]) -> dict[tuple[str, str], str]:
    """(feature file name, scenario) -> "passed in the drill of <time> ..." from a report."""
    out = {}
    for key, seen in reports.last_verified(report).items():
        ttr = seen.get("time_to_recover_ms")
        extra = f", time to recover {format_ms(ttr)}" if ttr is not None else ""
        if ttr is not None and seen.get("time_to_recover_incomplete"):
            extra += f" (incomplete: {seen['time_to_recover_incomplete']})"
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
