"""The living runbook: docs/runbook.md is fresh, covers the old guide, and says what to type."""

from __future__ import annotations

import difflib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runbook import docs
from runbook import report as reports

REPO = Path(__file__).resolve().parent.parent
# shared/ lies beside the checkout, on a developer machine and on CI alike
SEED_GUIDE = Path(__file__).resolve().parents[2] / "shared" / "runbook-seed.md"

# The seed guide's sections, as of the guide this project replaces; used when the guide itself
# is not on this machine (a CI clone). When it is, the test reads it instead.
SEED_SECTIONS_SNAPSHOT = (
    "Quick Reference", "Rollback Workflow", "Rollback Workflow: 1. Confirm deployment state",
    "Rollback Workflow: 2. Run rollback", "Rollback Workflow: 3. Verify health",
    "Rollback Workflow: 4. If health fails", "What rollback changes", "Database Considerations",
    "Troubleshooting", "Troubleshooting: No previous deployment found",
    "Troubleshooting: Health checks fail", "Troubleshooting: Traffic does not switch",
    "Troubleshooting: Schema mismatch", "Recovery", "Recovery: Manual slot switch",
    "Additional Resources", "Getting Help",
)


def seed_sections(text: str) -> list[str]:
    """Every heading of the seed guide, its bold 'What rollback changes' block, each
    troubleshooting case, the numbered workflow steps and the manual slot switch."""
    sections: list[str] = []
    current = ""
    for line in text.splitlines():
        if heading := re.match(r"^## (.+?)\s*$", line):
            current = heading[1]
            sections.append(current)
        elif bold := re.match(r"^\*\*(.+?):?\*\*:?\s*$", line):
            sections.append(bold[1].rstrip(":"))
        elif current == "Troubleshooting" and (case := re.match(r"^- \*\*(.+?)\*\*:", line)):
            sections.append(f"Troubleshooting: {case[1]}")
        elif current == "Rollback Workflow" and (step := re.match(r"^(\d+)\. ([^,:.]+)",
                                                                   line)):
            sections.append(f"Rollback Workflow: {step[1]}. {step[2].strip()}")
        elif current == "Recovery" and (manual := re.match(r"^(Manual slot switch)\b", line)):
            sections.append(f"Recovery: {manual[1]}")
    return sections


def test_committed_runbook_is_fresh() -> None:
    fresh, _ = docs.render()
    committed = docs.DOCS_MD.read_text(encoding="utf-8") if docs.DOCS_MD.is_file() else ""
    if committed != fresh:
        diff = "".join(list(difflib.unified_diff(
            committed.splitlines(keepends=True), fresh.splitlines(keepends=True),
            "docs/runbook.md (committed)", "docs/runbook.md (fresh render)"))[:60])
        pytest.fail("docs/runbook.md is stale: the features or steps changed since it was "
                    f"rendered. Run `runbook docs` and commit docs/runbook.md.\n{diff}",
                    pytrace=False)


def test_the_render_is_deterministic_and_has_no_local_paths() -> None:
    first = docs.render()
    assert docs.render() == first
    for text in first:
        assert str(REPO) not in text
        assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", text), "a timestamp without a report"


def test_the_seed_guide_is_parsed_as_expected() -> None:
    if not SEED_GUIDE.is_file():
        pytest.skip("the seed guide is not on this machine; the snapshot below stands in")
    assert tuple(seed_sections(SEED_GUIDE.read_text(encoding="utf-8"))) == \
        SEED_SECTIONS_SNAPSHOT


def test_the_runbook_covers_every_section_of_the_seed_guide() -> None:
    sections = (seed_sections(SEED_GUIDE.read_text(encoding="utf-8")) if SEED_GUIDE.is_file()
                else list(SEED_SECTIONS_SNAPSHOT))
    runbook = docs.build()
    missing_keys = [s for s in sections if s not in docs.SEED_MAP]
    assert not missing_keys, f"seed sections with no entry in runbook.docs.SEED_MAP: " \
                             f"{missing_keys}"
    for section in sections:
        names = docs.SEED_MAP[section]
        assert names, f"{section!r} maps to no scenario"
        absent = [n for n in names if runbook.scenario(n) is None]
        assert not absent, (f"{section!r} maps to scenarios that no feature has: {absent}; "
                            "fix runbook.docs.SEED_MAP or the features")
    markdown, page = docs.render()
    table = markdown.split("## Where the old rollback guide went", 1)[1]
    for section in sections:
        assert f"| {section} |" in table
        for name in docs.SEED_MAP[section]:
            found = runbook.scenario(name)
            assert found is not None
            scenario = found[1].name
            assert f"[{scenario}](#{docs.github_slug(scenario)})" in table
            assert f"### {scenario}\n" in markdown
    assert 'id="seed-map"' in page


def test_every_feature_and_scenario_is_rendered_in_on_call_order() -> None:
    runbook = docs.build()
    markdown, page = docs.render()
    files = [Path(f.path).stem for f in runbook.features]
    known = [f for f in files if f in docs.FEATURE_ORDER]
    assert known == sorted(known, key=docs.FEATURE_ORDER.index)
    assert files[0] == "rollback"
    positions = [markdown.index(f"\n## {f.name}\n") for f in runbook.features]
    assert positions == sorted(positions)
    for feature in runbook.features:
        assert f'id="feature-{feature.stem}"' in page
        assert f"pytest {feature.path} --env <env>" in markdown
        for scenario in feature.scenarios:
            assert f"### {scenario.name}\n" in markdown
            assert f'id="scenario-{docs.github_slug(scenario.name)}"' in page


FEATURE = """\
@sample
Feature: {name}
  What this part of the runbook is for.

  Scenario: Roll back with checks
    Given a previous deployment exists
    When I preview the rollback
    And I roll back
    And I check the health of the green slot as a table
    Then users are served the previous version from the other slot
    And the slot taking traffic is healthy

  @fault @mutating
  Scenario: Recover by hand
    Given a deployment is live
    When I switch traffic by hand to the standby slot
    And I redeploy the known-good version "v3"
    And I roll back restoring that snapshot
    Then users are served version "v3"
    And a step nobody has defined yet
"""

STEPS = '''\
from pytest_bdd import given, parsers, then, when


@given("a previous deployment exists")
def previous(): ...


@given("a deployment is live")
def live(): ...


@when("I preview the rollback")
def preview(): ...


@when("I roll back")
def roll_back():
    """Runs the rollback engine with default options."""


@when(parsers.re(r"I check the health of the (?P<slot>blue|green) slot as (?P<form>JSON|a table)"))
def health(slot, form): ...


@when("I switch traffic by hand to the standby slot")
def switch(): ...


@when(parsers.parse('I redeploy the known-good version "{name}"'))
def redeploy(name): ...


@when("I roll back restoring that snapshot")
def restoring(): ...


@then("users are served the previous version from the other slot")
def served_previous():
    """Asks Caddy for /version and compares X-Togather-Slot with the target slot."""


@then(parsers.parse('users are served version "{name}"'))
def served(name): ...


@then("the slot taking traffic is healthy")
def healthy(): ...
'''


@pytest.fixture
def sample(tmp_path: Path) -> tuple[Path, Path]:
    features = tmp_path / "features"
    features.mkdir()
    for stem in ("zeta", "recovery", "rollback", "troubleshooting", "database", "alpha"):
        (features / f"{stem}.feature").write_text(FEATURE.format(name=f"{stem} part"))
    steps = tmp_path / "steps"
    steps.mkdir()
    (steps / "sample_steps.py").write_text(STEPS)
    return features, steps


def test_sections_follow_the_fixed_order_then_the_unknown_ones(sample: tuple[Path, Path]
                                                                 ) -> None:
    features, steps = sample
    runbook = docs.build(features, steps)
    assert [f.stem for f in runbook.features] == [
        "rollback", "database", "troubleshooting", "recovery", "alpha", "zeta"]


def test_commands_come_from_the_step_phrases(sample: tuple[Path, Path]) -> None:
    features, steps = sample
    runbook = docs.build(features, steps)
    first, second = runbook.features[0].scenarios
    assert first.commands() == ["runbook rollback <env> --dry-run", "runbook rollback <env>",
                                "runbook healthcheck <env> --slot green --format table"]
    assert second.commands()[:2] == ["runbook switch <env> --slot <slot>",
                                     "runbook deploy <env> --version <version>"]
    assert "--restore-snapshot" in second.commands()[2]
    markdown, page = docs.render(features, steps)
    assert "```bash\nrunbook rollback <env> --dry-run\nrunbook rollback <env>\n" in markdown
    assert 'pytest "features/rollback.feature::test_roll_back_with_checks" --env <env>' \
        in markdown
    # a @fault scenario runs on a drill only: no --env in its command
    assert 'pytest "features/rollback.feature::test_recover_by_hand"`' in markdown
    assert "Runs on: drill only" in markdown and "`@fault`" in markdown
    assert "curl -si http://localhost/version" in markdown  # how to check "users are served"
    assert "runbook healthcheck &lt;env&gt; --slot green --format table" in page


def test_step_definitions_say_how_and_undefined_steps_are_flagged(sample: tuple[Path, Path]
                                                                   ) -> None:
    features, steps = sample
    markdown, _ = docs.render(features, steps)
    assert "how: Asks Caddy for /version and compares X-Togather-Slot" in markdown
    assert "I roll back: Runs the rollback engine with default options." in markdown
    assert "a step nobody has defined yet *(no step definition yet)*" in markdown
    assert "users are served version \"v3\" *(no step" not in markdown  # parse pattern matched


def test_the_real_steps_define_every_step_of_the_features() -> None:
    runbook = docs.build()
    undefined = [f"{f.path}:{s.line} {s.keyword} {s.text}" for f in runbook.features
                 for sc in f.scenarios for s in sc.steps if s.defined is False]
    assert not undefined, f"steps with no definition in steps/: {undefined}"


def _report_for(features: Path) -> dict[str, object]:
    data = reports.new_report(environment="drill", started_at="2031-05-04T03:02:01.000Z")
    feature = reports.feature_entry(data, "features/rollback.feature", "rollback part")
    passed = reports.scenario_entry(feature, nodeid="x::a", name="Roll back with checks")
    passed["status"] = reports.PASSED
    failed = reports.scenario_entry(feature, nodeid="x::b", name="Recover by hand")
    failed["status"] = reports.FAILED
    data["finished_at"] = "2031-05-04T03:09:00.000Z"
    return reports.finalize(data)


def test_last_verified_comes_from_the_drill_report(sample: tuple[Path, Path]) -> None:
    features, steps = sample
    markdown, page = docs.render(features, steps, _report_for(features), "drill report X")
    section = markdown.split("## rollback part", 1)[1].split("\n## ", 1)[0]
    assert "Last verified: passed on drill at 2031-05-04T03:09:00.000Z" in section
    assert "Last verified: FAILED on drill at 2031-05-04T03:09:00.000Z: not verified" in section
    other = markdown.split("## database part", 1)[1].split("\n## ", 1)[0]
    assert f"Last verified: {docs.NOT_VERIFIED}" in other
    assert "Last verified from: drill report X" in markdown
    assert "passed on drill at 2031-05-04T03:09:00.000Z" in page


def test_runbook_docs_command_writes_checks_and_reads_a_report(sample: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    features, _ = sample
    out, page = tmp_path / "out" / "runbook.md", tmp_path / "out" / "runbook.html"

    def runbook(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runbook.cli", "docs", "--features",
                               str(features), "--out", str(out), *args], capture_output=True,
                              text=True, timeout=60, check=False)

    proc = runbook("--html", str(page))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().startswith("# Togather rollback runbook")
    assert page.read_text().startswith("<!DOCTYPE html>")
    assert "<link" not in page.read_text() and "<script" not in page.read_text()
    assert runbook("--check").returncode == 0
    out.write_text(out.read_text() + "edited by hand\n")
    stale = runbook("--check")
    assert stale.returncode == 1 and "run `runbook docs`" in stale.stderr
    report_dir = tmp_path / "drill"
    report_dir.mkdir()
    (report_dir / "report.json").write_text(json.dumps(_report_for(features)))
    assert runbook("--html", str(page), "--report", str(report_dir)).returncode == 0
    assert "passed on drill at 2031-05-04T03:09:00.000Z" in out.read_text()
    bad = runbook("--report", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "cannot read the drill report" in bad.stderr


def test_the_readme_exit_codes_are_the_ones_the_code_defines() -> None:
    """One source: runbook/errors.py MEANINGS; `--help` and docs render it, README must match."""
    from runbook.errors import exit_codes_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert exit_codes_markdown() in readme, "README's exit-code table differs from errors.py"


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runbook.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False, cwd=cwd or REPO,
                          stdin=subprocess.DEVNULL)


def _one_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected failure" not in proc.stderr, \
        proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("runbook: error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize(("option", "where", "said"), [
    ("--out", "", "--out is empty"),
    ("--out", "adir", "is a directory"),
    ("--out", "afile/runbook.md", "is a file, not a directory"),
    ("--html", "", "--html is empty"),
    ("--html", "adir", "is a directory"),
    ("--html", "afile/runbook.html", "is a file, not a directory"),
])
def test_docs_refuses_an_output_path_it_cannot_write_before_writing_anything(
        sample: tuple[Path, Path], tmp_path: Path, option: str, where: str, said: str) -> None:
    """Found by review: `--out ''`, a directory or a path under a file was "unexpected
    failure: IsADirectoryError", exit 5, and with `--html DIR` the Markdown was already
    written. Exit 2 now, one line naming the option, and neither file written."""
    features, _ = sample
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("a file")
    out, page = tmp_path / "runbook.md", tmp_path / "runbook.html"
    paths = {"--out": str(out), "--html": str(page)}
    paths[option] = str(tmp_path / where) if where else ""
    line = _one_error(_cli("docs", "--features", str(features), "--out", paths["--out"],
                           "--html", paths["--html"]))
    assert said in line and option in line, line
    assert not out.exists() and not page.exists()
    assert (tmp_path / "afile").read_text() == "a file" and not any((tmp_path / "adir").iterdir())
    if option == "--out" and where:  # --check reads --out: refused the same way
        assert said in _one_error(_cli("docs", "--features", str(features), "--out",
                                       paths["--out"], "--check"))


def test_docs_refuses_a_features_folder_without_feature_files(tmp_path: Path) -> None:
    """Found by review: `--features` at a folder with no .feature file wrote a runbook with
    no scenario over --out, exit 0."""
    empty = tmp_path / "features"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a feature")
    out = tmp_path / "runbook.md"
    out.write_text("the committed runbook")
    line = _one_error(_cli("docs", "--features", str(empty), "--out", str(out),
                           "--html", str(tmp_path / "runbook.html")))
    assert f"{empty} holds no .feature file" in line, line
    assert out.read_text() == "the committed runbook"
    assert not (tmp_path / "runbook.html").exists()


@pytest.mark.parametrize(("where", "said"), [
    ("", "--report is empty"), ("afile", "is a file, not a directory"),
    ("afile/report", "is a file, not a directory")])
def test_drill_refuses_a_report_path_that_is_blank_or_a_file(tmp_path: Path, where: str,
                                                             said: str) -> None:
    """Found by review: `runbook drill --report FILE` was a pytest INTERNALERROR traceback
    (FileExistsError), and `--report ''` wrote the report into the working directory. Exit
    2 before pytest starts. (The pytest arguments only keep an old runbook from running the
    drill: it collects, matches nothing.)"""
    (tmp_path / "afile").write_text("a file")
    report = str(tmp_path / where) if where else ""
    line = _one_error(_cli("drill", "--report", report, "--collect-only", "-q", "-k",
                           "no_scenario_has_this_name", cwd=tmp_path))
    assert said in line and "--report" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert (tmp_path / "afile").read_text() == "a file"


@pytest.mark.parametrize("where", ["", "afile", "afile/report"])
def test_pytest_report_option_at_a_file_or_blank_is_a_usage_error(tmp_path: Path,
                                                                  where: str) -> None:
    """The plugin's side (`pytest features/ --report FILE`, no `runbook drill` before it):
    pytest's usage error (exit 4, one ERROR line), never an INTERNALERROR traceback, and a
    blank one is refused rather than silently writing no report."""
    import os

    (tmp_path / "afile").write_text("a file")
    (tmp_path / "test_one.py").write_text("def test_one() -> None:\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "steps.report_plugin", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-q", "--report", str(tmp_path / where) if where else "",
         "test_one.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        check=False)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "INTERNALERROR" not in proc.stdout + proc.stderr, proc.stderr
    assert "--report" in proc.stderr and ("is empty" if not where else "is a file") \
        in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "test_one.py"]
