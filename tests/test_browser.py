"""The drill report and the HTML runbook, opened in headless Chromium: a real drill report
(two scenarios of the rollback feature run with the report plugin against the session drill
stack) checked against the engine's own run record; and the report plugin end to end on a
tiny feature (no Docker).

Chromium is Debian's `chromium` package, installed by `make test` (scripts/ensure-chromium.sh).
Its absence fails these tests rather than skipping them: an unrendered report is a broken one.
Screenshots are kept in reports/screenshots/ (printed with -s or in the test's output).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from runbook import deploy, docs
from runbook import environment as envmod
from runbook import journal as journals
from runbook import report as reports
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from tests.drill_checks import pytest_with_report, through_proxy

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "reports" / "screenshots"
PHASES = ("plan", "preflight", "start-slot", "health-gate", "switch", "verify", "state",
          "stop-old-slot")


def chromium() -> str:
    for candidate in (os.environ.get("RUNBOOK_CHROMIUM"), shutil.which("chromium"),
                      "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("headless Chromium is missing: run `make test`, which installs Debian's "
                "chromium package (scripts/ensure-chromium.sh), or set RUNBOOK_CHROMIUM",
                pytrace=False)


def browse(page: Path, tmp_path: Path, *, screenshot: Path | None = None) -> str:
    """Open a file in headless Chromium: its rendered DOM, or a screenshot of it."""
    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--window-size=1280,2000"]
    argv += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    proc = subprocess.run([*argv, page.resolve().as_uri()], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stdout


class Elements(HTMLParser):
    """The rendered DOM as a list of (tag, attributes, ancestors' tags)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str], tuple[str, ...]]] = []
        self.stack: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.found.append((tag, values, tuple(t for t, _ in self.stack)))
        if tag not in ("meta", "br", "link", "img", "input", "rect", "line"):
            self.stack.append((tag, values))

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index][0] == tag:
                del self.stack[index:]
                break

    def having(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a, _ in self.found if t == tag and all(
            v in a.get(k.rstrip("_"), "").split() or a.get(k.rstrip("_")) == v
            for k, v in attrs.items())]


def parse(dom: str) -> Elements:
    parser = Elements()
    parser.feed(dom)
    return parser


def keep_screenshot(page: Path, tmp_path: Path, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    target = SCREENSHOTS / name
    target.unlink(missing_ok=True)
    browse(page, tmp_path, screenshot=target)
    assert target.is_file() and target.stat().st_size > 20_000, "an empty screenshot"
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {target}")
    return target


# ---------------------------------------------------------------------------------------------
# The report reads the engine's run records: a real one, with real measured (short) phases


@pytest.fixture
def run_record(tmp_path: Path) -> dict[str, Any]:
    """A rollback journaled by runbook.journal itself, with real measured (short) phases."""
    env = envmod.load_file(REPO / "runbook" / "environments" / "staging.toml").with_(
        runs_dir=tmp_path / "runs", log_dir=tmp_path / "logs", label="drill test")
    journal = journals.Journal.open(env, "rollback", why="browser test")
    with journal:
        with journal.step("lock", "Take the deploy lock"):
            time.sleep(0.005)
        for index, name in enumerate(PHASES):
            with journal.step(name, name.replace("-", " ")) as step:
                if name == "start-slot":
                    step.detail(image="togather-server:abc1234")
                time.sleep(0.004 * (index + 1))
        with journal.step("unlock", "Release the deploy lock"):
            pass
    (record,) = reports.collect_runs(env.runs_dir)
    return record



def drill_report(stack: DrillStack, out: Path) -> subprocess.CompletedProcess[str]:
    """A real drill report: pytest runs two scenarios of features/rollback.feature with the
    report plugin against the session stack, addressed as a host by its environment file
    (Givens check there; the rollback really runs; no second stack is started)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    argv = [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "steps.plugin",
            "-p", "no:cacheprovider", "--strict-markers", "-q", "features/rollback.feature",
            "-k", "confirm or run_the_rollback", "--env", str(stack.env.source),
            "--report", str(out)]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.long
@pytest.mark.docker
def test_a_real_drill_report_renders_in_chromium(stack: DrillStack, tmp_path: Path) -> None:
    """The page a drill leaves, opened in Chromium, shows what really ran: the scenarios'
    outcomes, and the rollback's phases as the engine recorded them in its run record. (Run
    as a host, the last Then, which needs the drill's simulated users, is skipped: the report
    must say so in its banner, and does.)"""
    for version in ("v2", "v3"):  # a previous deployment to roll back to, the operator's way
        deploy.deploy(stack.env, deploy.Options(version=VERSIONS[version].tag,
                                                reason="browser test: arrange"))
    out = tmp_path / "report"
    proc = drill_report(stack, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert through_proxy(stack.env) == ("green", VERSIONS["v2"].tag), "no rollback ran"
    data = json.loads((out / reports.REPORT_JSON).read_text())
    scenarios = {s["name"]: s for _, s in reports.scenarios(data)}
    assert len(scenarios) == 2, list(scenarios)
    (rollback_scenario,) = [s for n, s in scenarios.items() if n.startswith("Run the rollback")]
    (run,) = [r for r in rollback_scenario["runs"] if r["action"] == "rollback"]
    on_disk = json.loads((stack.env.runs_dir / f"{run['run_id']}.json").read_text())
    assert on_disk["outcome"] == "success" and on_disk["exit_code"] == 0, on_disk["outcome"]
    log = Path(on_disk["log_file"]).read_text()
    assert f'"deployment_id": "{run["run_id"]}"' in log

    page = out / reports.REPORT_HTML
    text = page.read_text(encoding="utf-8")
    assert "<link" not in text and "<script" not in text and "src=" not in text
    rendered = browse(page, tmp_path)
    dom = parse(rendered)
    (banner,) = dom.having("section", id="banner")
    assert ("attention" if data["attention"] else "ok") in banner["class"].split()
    assert dom.having("h2", id="fingerprint") and dom.having("h2", id="time-to-recover")
    assert len(dom.having("section", class_="scenario")) == 2
    (svg,) = dom.having("svg", class_="timeline")
    assert svg["data-action"] == "rollback" and svg["data-run-id"] == run["run_id"]
    groups = dom.having("g", class_="phase")
    recorded = [(s["name"], s["status"], s["duration_ms"]) for s in on_disk["steps"]]
    shown = [(g["data-phase"], g["data-status"], int(g["data-duration-ms"])) for g in groups]
    assert shown == recorded, (shown, recorded)
    assert {"lock", "switch", "health-gate", "unlock"} <= {name for name, _, _ in shown}
    bars = [a for t, a, anc in dom.found
            if t == "rect" and "bar" in a.get("class", "").split() and "svg" in anc]
    assert len(bars) == len(recorded)
    assert float(bars[-1]["x"]) > float(bars[0]["x"])  # later phases sit further right
    caddy_said = subprocess.run(["docker", "exec", stack.caddy_container, "caddy", "version"],
                                capture_output=True, text=True, check=True).stdout.split()[0]
    assert caddy_said in data["fingerprint"]["caddy"], data["fingerprint"]
    assert caddy_said in rendered
    keep_screenshot(page, tmp_path, "drill-report.png")


def test_the_html_runbook_renders_in_chromium(tmp_path: Path) -> None:
    runbook = docs.build()
    _, html = docs.render()
    page = tmp_path / "runbook.html"
    page.write_text(html, encoding="utf-8")
    dom = parse(browse(page, tmp_path))
    assert dom.having("section", id="quick-reference")
    assert dom.having("nav", id="contents")
    assert dom.having("section", id="seed-map")
    for feature in runbook.features:
        assert dom.having("section", id=f"feature-{feature.stem}"), feature.path
        for scenario in feature.scenarios:
            assert dom.having("section", id=f"scenario-{docs.github_slug(scenario.name)}")
    assert len(dom.having("pre", class_="commands")) >= 5
    keep_screenshot(page, tmp_path, "runbook.png")


# ---------------------------------------------------------------------------------------------
# The plugin, end to end, on a tiny feature (no Docker)

TINY_FEATURE = """\
Feature: Tiny
  A feature with trivial steps.

  Scenario: Everything passes
    Given a thing
    When I poke it
    Then it answers
{extra}"""

MORE_SCENARIOS = """
  Scenario: A step is skipped
    Given a thing
    When I skip
    Then it answers

  Scenario: A step is undefined
    Given a thing
    When I do what nobody defined
    Then it answers
"""

TINY_STEPS = '''\
import time

import pytest
from pytest_bdd import given, scenarios, then, when

scenarios("tiny.feature")


@given("a thing")
def thing():
    time.sleep(0.01)


@when("I poke it")
def poke():
    time.sleep(0.02)


@when("I skip")
def skip():
    pytest.skip("nothing to poke")


@then("it answers")
def answers():
    pass
'''


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[Path]:
    work = tmp_path / "tiny"
    work.mkdir()
    (work / "test_tiny.py").write_text(TINY_STEPS)
    yield work


def run_tiny(work: Path, extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    (work / "tiny.feature").write_text(TINY_FEATURE.format(extra=extra))
    return pytest_with_report(work, "test_tiny.py")


def test_the_plugin_reports_a_clean_run(tiny: Path, tmp_path: Path) -> None:
    proc, out = run_tiny(tiny, "")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"drill report: {out / 'report.html'}" in proc.stdout
    data = json.loads((out / "report.json").read_text())
    ((feature_file, scenario),) = [(f["file"], s) for f, s in reports.scenarios(data)]
    assert feature_file == "tiny.feature" and scenario["status"] == "passed"
    assert [s["status"] for s in scenario["steps"]] == ["passed"] * 3
    assert scenario["steps"][1]["duration_ms"] >= 20
    assert data["attention"] == []
    assert data["fingerprint"]["tool"].startswith("togather-runbook ")
    assert data["fingerprint"]["python"]
    cucumber = json.loads((out / "cucumber.json").read_text())
    assert cucumber[0]["elements"][0]["name"] == "Everything passes"
    assert "<testsuite" in (out / "junit.xml").read_text()
    dom = parse(browse(out / "report.html", tmp_path))
    (banner,) = dom.having("section", id="banner")
    assert "ok" in banner["class"].split()


def test_the_plugin_says_plainly_when_a_step_was_skipped_or_undefined(tiny: Path,
                                                                      tmp_path: Path) -> None:
    proc, out = run_tiny(tiny, MORE_SCENARIOS)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ATTENTION: this run did not prove every step" in proc.stdout
    data = json.loads((out / "report.json").read_text())
    by_name = {s["name"]: s for _, s in reports.scenarios(data)}
    skipped = by_name["A step is skipped"]
    assert skipped["status"] == "skipped"
    assert [s["status"] for s in skipped["steps"]] == ["passed", "skipped", "skipped"]
    assert skipped["steps"][1]["error"] == "nothing to poke"
    undefined = by_name["A step is undefined"]
    assert undefined["status"] == "failed"
    assert [s["status"] for s in undefined["steps"]] == ["passed", "undefined", "not run"]
    attention = " ".join(data["attention"])
    assert "2 steps SKIPPED" in attention and "1 step UNDEFINED" in attention
    assert "When I do what nobody defined" in attention
    dom_text = browse(out / "report.html", tmp_path)
    dom = parse(dom_text)
    (banner,) = dom.having("section", id="banner")
    assert "attention" in banner["class"].split()
    assert "UNDEFINED" in dom_text and "SKIPPED" in dom_text
    keep_screenshot(out / "report.html", tmp_path, "drill-report-attention.png")


def test_runbook_drill_runs_pytest_on_the_features_with_a_report(tmp_path: Path) -> None:
    out = tmp_path / "drill"
    proc = subprocess.run([sys.executable, "-m", "runbook.cli", "drill", "--report", str(out),
                           "--collect-only", "-q", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"drill report: {out / 'report.html'}" in proc.stdout
    data = json.loads((out / "report.json").read_text())
    assert data["command"][:4] == ["pytest", "features/", "--report", str(out)]
    assert data["summary"]["scenarios"] >= 1
    assert "never ran" in data["attention"][0]  # only collected: the report must not say "ok"
    assert (out / "junit.xml").is_file() and (out / "cucumber.json").is_file()
