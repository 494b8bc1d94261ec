"""`--report DIR`: a drill report for every run of the features.

Writes DIR/report.html and DIR/report.json (runbook.report renders them), and turns on
pytest's junit XML (DIR/junit.xml) and pytest-bdd's cucumber JSON (DIR/cucumber.json) unless
the command line already chose paths for them.

Per step, pytest-bdd's hooks give status and duration: a step that raised pytest.skip gets
neither after_step nor step_error, so a step still "running" when its scenario ends was
skipped (or interrupted), which the call's report then tells apart. The engine's run records
are read from env.runs_dir at the end of each scenario, before the next scenario's drill reset
wipes that directory; a run that the drill's user load (steps/world.py) watched gets what the
users saw during it (`traffic`: requests, non-2xx, resets, the longest gap, per 50 ms), over
its whole window (a run killed mid-step: to where runbook.reports.model.measure_unfinished
measures it, not to the start of the step it was killed in), each request counted in one run
(runbook.reports.model.add_traffic). The environment is captured when its fixture is set up,
so the plugin never starts a drill stack by itself.

Under pytest-xdist (`-n 2`) every worker runs its own drill stack and its own DrillReport,
which records the scenarios that worker ran and hands them to the controller at its end
(`workeroutput`); the controller merges them (pytest_testnodedown) and writes ONE report, as a
run without xdist would: same scenarios, steps, engine runs and users' traffic.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from runbook import report as reports

PLUGIN_NAME = "runbook-drill-report"
MESSAGE_LIMIT = 4000
WORKER_OUTPUT = "runbook_drill_report"  # key of a worker's records in xdist's workeroutput


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("runbook")
    group.addoption("--report", metavar="DIR", default=None,
                    help="write a drill report into DIR: report.html (self-contained), "
                         "report.json, junit.xml and cucumber.json")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Runs before junitxml's and pytest-bdd's configure, so the paths set here count."""
    target = config.getoption("--report", default=None)
    if target is None:
        return
    if not str(target).strip():  # `--report "$DIR"` with DIR unset: never no report quietly
        raise pytest.UsageError("--report is empty: give the folder to write the report in")
    directory = Path(str(target)).expanduser().resolve()
    if hasattr(config, "workerinput"):  # an xdist worker: records, the controller writes
        config.pluginmanager.register(DrillReport(config, directory, worker=True), PLUGIN_NAME)
        return
    from runbook import files

    # a file there (or on its way) was an INTERNALERROR traceback from mkdir (found by review)
    if (blocking := files.not_a_folder(directory)) is not None:
        raise pytest.UsageError(f"--report {directory}: {blocking} is a file, not a directory: "
                                "give a folder for the report")
    directory.mkdir(parents=True, exist_ok=True)
    for name in (reports.REPORT_JSON, reports.REPORT_HTML, reports.JUNIT_XML,
                 reports.CUCUMBER_JSON):
        (directory / name).unlink(missing_ok=True)  # never leave last night's report looking new
    if not config.option.xmlpath:
        config.option.xmlpath = str(directory / reports.JUNIT_XML)
    if not getattr(config.option, "cucumber_json_path", None):
        config.option.cucumber_json_path = str(directory / reports.CUCUMBER_JSON)
    config.pluginmanager.register(DrillReport(config, directory), PLUGIN_NAME)


# pytest-bdd keeps a scenario's cucumber data in a registry keyed by the report object, which
# does not cross from an xdist worker to the controller (where cucumber.json is written). These
# two hooks carry it along with the serialized report.
BDD_CONTEXT = "runbook_bdd_context"


@pytest.hookimpl(wrapper=True)
def pytest_report_to_serializable(config: pytest.Config, report: Any) -> Any:
    data = yield
    if isinstance(data, dict) and hasattr(config, "workerinput"):
        try:
            from pytest_bdd.reporting import test_report_context_registry
            context = test_report_context_registry.get(report)
        except (ImportError, TypeError):
            context = None
        if context is not None:
            data[BDD_CONTEXT] = {"scenario": context.scenario, "name": context.name}
    return data


@pytest.hookimpl(wrapper=True)
def pytest_report_from_serializable(config: pytest.Config, data: Any) -> Any:
    context = data.pop(BDD_CONTEXT, None) if isinstance(data, dict) else None
    report = yield
    if context is not None and report is not None:
        try:
            from pytest_bdd.reporting import ReportContext, test_report_context_registry
            test_report_context_registry[report] = ReportContext(**context)
        except (ImportError, TypeError):
            pass
    return report


def _line(item: pytest.Item) -> int:
    template = _template(item)
    return int(template.line_number) if template is not None else 0


def _template(item: pytest.Item) -> Any:
    """The pytest-bdd ScenarioTemplate behind a test item, or None for ordinary tests."""
    try:
        from pytest_bdd.scenario import scenario_wrapper_template_registry
    except ImportError:
        return None
    func = getattr(item, "obj", None)
    try:
        return scenario_wrapper_template_registry.get(func) if func is not None else None
    except TypeError:  # not weak-referenceable
        return None


def _short(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """Masked, then shortened: every step error, failure and traceback the report keeps goes
    through here, and a failed step's message may quote the database password (the report
    is read, attached and archived like a log)."""
    from runbook.redact import redact

    text = redact(text).strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _failure(report: pytest.TestReport) -> str:
    """The crash line first (what a person reads), then the end of the traceback."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = report.longreprtext
    head = str(getattr(crash, "message", "") or "").strip()
    if not head:
        return _short(text)
    tail = _short(text, 1500)
    return head if head in text and len(text) < 200 else f"{_short(head, 1500)}\n\n{tail}"


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr: Any = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return _short(str(longrepr[2]).removeprefix("Skipped: "))
    return _short(str(longrepr))


def _scenario_load(request: pytest.FixtureRequest) -> Any:
    """The user load of the scenario's world (still running: the world is torn down later).
    A fleet scenario has no world (steps/world.py): never start one here."""
    if request.node.get_closest_marker("fleet") is not None:
        return None
    try:
        return getattr(request.getfixturevalue("world"), "load", None)
    except Exception:  # no world (not a feature), or it failed to set up
        return None


def _register_secrets(env: Any) -> list[str]:
    """The environment's known secrets (its database password, its env file's *PASSWORD
    values), registered so that _short masks them even where no pattern would (a bare
    password in an assertion message); returned for the xdist controller, which writes
    junit.xml and cucumber.json and never sets the environment up. Never fails the drill: a
    broken configuration is the steps' to report."""
    from runbook import database
    from runbook.redact import register_secrets

    with contextlib.suppress(Exception):
        known = [str(v) for v in database.known_secrets(env) if v]
        register_secrets(*known)
        return known
    return []


def _mask_file(path: Path) -> None:
    """Mask the secrets this process knows in a finished junit.xml or cucumber.json, read as
    XML or JSON so that escaped forms are matched and the file stays well-formed (masking its
    text let `PASSWORD=\\S*` eat a closing quote). A file that is absent or cannot be read as
    what it is stays as it is."""
    from xml.etree import ElementTree

    from runbook.redact import redact, scrub

    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            masked = scrub(data)
            if masked != data:
                path.write_text(json.dumps(masked, indent=4), encoding="utf-8")
            return
        tree = ElementTree.parse(path)
    except (OSError, ValueError, ElementTree.ParseError):
        return
    changed = False
    for element in tree.iter():
        for key, value in element.attrib.items():
            if (masked_value := redact(value)) != value:
                element.set(key, masked_value)
                changed = True
        for part in ("text", "tail"):
            value = getattr(element, part)
            if value and (masked_value := redact(value)) != value:
                setattr(element, part, masked_value)
                changed = True
    if changed:
        tree.write(path, encoding="utf-8", xml_declaration=True)


class DrillReport:
    """Collects one run's scenarios, steps and engine runs; writes the report at the end."""

    def __init__(self, config: pytest.Config, directory: Path, *, worker: bool = False) -> None:
        self.config = config
        self.directory = directory
        self.worker = worker  # an xdist worker hands its records to the controller
        self.ran: set[str] = set()  # nodeids this process ran (a worker collects them all)
        self.secrets: set[str] = set()  # known secrets of the environments set up here
        self.data = reports.new_report(
            environment=str(config.getoption("--env", default="drill")),
            command=["pytest", *map(str, config.invocation_params.args)],
            dry_run=bool(config.getoption("--dry-run", default=False)))
        self.began = time.monotonic()
        self.entries: dict[str, dict[str, Any]] = {}
        self.scenario_began: dict[str, tuple[float, datetime]] = {}
        self.step_index: dict[str, dict[int, int]] = {}
        self.step_began: dict[tuple[str, int], float] = {}
        self.seen_runs: set[str] = set()
        self.images: set[str] = set()
        self.env: Any = None
        self.env_fingerprint: dict[str, Any] = {}
        self.fingerprint_tries = 0
        self.written: Path | None = None

    # -- what will run ---------------------------------------------------------------------------

    def _feature_file(self, filename: str) -> str:
        try:
            return os.path.relpath(filename, self.config.rootpath)
        except ValueError:
            return filename

    def _entry(self, item: pytest.Item, feature: Any = None, template: Any = None
               ) -> dict[str, Any] | None:
        if item.nodeid in self.entries:
            return self.entries[item.nodeid]
        template = template or _template(item)
        if template is None:
            return None
        feature = feature or template.feature
        fentry = reports.feature_entry(self.data, self._feature_file(feature.filename),
                                       feature.name, feature.description or "")
        name = template.name
        callspec = getattr(item, "callspec", None)
        if callspec is not None and getattr(template, "templated", False):
            name = f"{name} [{callspec.id}]"
        entry = reports.scenario_entry(
            fentry, nodeid=item.nodeid, name=name, line=template.line_number,
            tags=sorted(template.tags | set(getattr(feature, "tags", set()))),
            steps=[(s.keyword, s.name, s.line_number) for s in template.steps])
        self.entries[item.nodeid] = entry
        return entry

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        # in the files' order, whatever order they run in (steps/world.py runs them scene
        # by scene)
        for item in sorted(session.items, key=lambda i: (str(i.path), _line(i))):
            self._entry(item)

    # -- the environment -------------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[Any],
                             request: pytest.FixtureRequest) -> Any:
        result = yield
        if fixturedef.argname == "environment" and hasattr(result, "runs_dir"):
            self.env = result
            self.secrets.update(_register_secrets(result))
        return result

    def _fingerprint(self) -> None:
        """Once, at the start of a scenario (after its reset, when everything runs); again
        later if a part was unknown, e.g. Caddy was stopped on purpose."""
        if self.env is None or self.fingerprint_tries >= 3:
            return
        if self.env_fingerprint and not any(
                str(v).startswith("unknown") for v in self.env_fingerprint.values()):
            return
        self.fingerprint_tries += 1
        try:
            fresh = reports.environment_fingerprint(self.env)
        except Exception as exc:  # a report must never fail the drill
            fresh = {"error": _short(f"{type(exc).__name__}: {exc}", 1000)}
        for key, value in fresh.items():
            if key not in self.env_fingerprint or str(
                    self.env_fingerprint[key]).startswith("unknown"):
                self.env_fingerprint[key] = value

    # -- scenarios and steps ---------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_bdd_before_scenario(self, request: pytest.FixtureRequest, feature: Any,
                                   scenario: Any) -> None:
        entry = self._entry(request.node, feature)
        if entry is None:
            return
        nodeid = request.node.nodeid
        entry["started_at"] = reports.now_iso()
        entry["steps"] = [reports.step_entry(s.keyword, s.name, s.line_number, s.type)
                          for s in scenario.steps]
        self.step_index[nodeid] = {id(s): i for i, s in enumerate(scenario.steps)}
        self.scenario_began[nodeid] = (time.monotonic(), datetime.now(UTC))
        self._fingerprint()

    def _step(self, request: pytest.FixtureRequest, step: Any) -> tuple[dict[str, Any], float
                                                                          ] | None:
        nodeid = request.node.nodeid
        entry = self.entries.get(nodeid)
        index = self.step_index.get(nodeid, {}).get(id(step))
        if entry is None or index is None:
            return None
        began = self.step_began.get((nodeid, index), time.monotonic())
        return entry["steps"][index], began

    def pytest_bdd_before_step(self, request: pytest.FixtureRequest, feature: Any,
                               scenario: Any, step: Any, step_func: Any) -> None:
        found = self._step(request, step)
        if found is None:
            return
        record, _ = found
        nodeid = request.node.nodeid
        now = time.monotonic()
        index = self.step_index[nodeid][id(step)]
        self.step_began[(nodeid, index)] = now
        record["status"] = "running"
        record["started_at"] = reports.now_iso()
        record["offset_ms"] = round((now - self.scenario_began[nodeid][0]) * 1000)

    def _end_step(self, request: pytest.FixtureRequest, step: Any, status: str,
                  error: str | None = None) -> None:
        found = self._step(request, step)
        if found is None:
            return
        record, began = found
        record["status"] = status
        record["duration_ms"] = round((time.monotonic() - began) * 1000)
        if error:
            record["error"] = _short(error, 1000)

    def pytest_bdd_after_step(self, request: pytest.FixtureRequest, feature: Any,
                              scenario: Any, step: Any, step_func: Any,
                              step_func_args: dict[str, Any]) -> None:
        self._end_step(request, step, reports.PASSED)

    def pytest_bdd_step_error(self, request: pytest.FixtureRequest, feature: Any,
                              scenario: Any, step: Any, step_func: Any,
                              step_func_args: dict[str, Any], exception: Exception) -> None:
        self._end_step(request, step, reports.FAILED, str(exception) or type(exception).__name__)

    @pytest.hookimpl(tryfirst=True)  # before a conftest's hook fails the test
    def pytest_bdd_step_func_lookup_error(self, request: pytest.FixtureRequest, feature: Any,
                                          scenario: Any, step: Any, exception: Exception
                                          ) -> None:
        found = self._step(request, step)
        if found is not None:
            found[0]["status"] = reports.UNDEFINED
            found[0]["duration_ms"] = 0
            found[0]["error"] = "no step definition matches this step"

    @pytest.hookimpl(tryfirst=True)
    def pytest_bdd_after_scenario(self, request: pytest.FixtureRequest, feature: Any,
                                  scenario: Any) -> None:
        nodeid = request.node.nodeid
        entry = self.entries.get(nodeid)
        if entry is None:
            return
        now = time.monotonic()
        for index, record in enumerate(entry["steps"]):
            if record["status"] == "running":  # left by pytest.skip (or an interrupt)
                record["duration_ms"] = round(
                    (now - self.step_began.get((nodeid, index), now)) * 1000)
        self._collect_runs(nodeid, entry, _scenario_load(request))
        self._collect_fleet(request, entry)

    def _collect_fleet(self, request: pytest.FixtureRequest, entry: dict[str, Any]) -> None:
        """The fleet journal records a fleet scenario wrote (steps/fleet.py's journal_dir)."""
        if "fleet_world" not in request.fixturenames:  # set up by a step: never start it here
            return
        try:
            directory = getattr(request.getfixturevalue("fleet_world"), "journal_dir", None)
        except Exception:  # a report must never fail the drill
            return
        if directory is None or not Path(directory).is_dir():
            return
        from runbook.reports import fleet

        for path in sorted(Path(directory).glob("fleet_*.json")):
            try:
                entry.setdefault("fleet_runs", []).append(
                    fleet.reduce(json.loads(path.read_text())))
            except Exception:  # a report must never fail the drill
                continue

    def _collect_runs(self, nodeid: str, entry: dict[str, Any], load: Any = None) -> None:
        if self.env is None:
            return
        since = self.scenario_began.get(nodeid, (0.0, None))[1]
        try:
            runs = reports.collect_runs(Path(self.env.runs_dir), since, self.seen_runs)
        except Exception:  # a report must never fail the drill
            return
        entry["runs"].extend(runs)
        for run in runs:
            reports.images_in(run, self.images)
        # a run killed mid-step is measured (and its users counted) past that step's start
        reports.measure_unfinished(entry["runs"], reports.scenario_end(entry))
        if load is not None and load.started is not None:
            # windows laid out together: a request in flight where two touch is counted once
            with contextlib.suppress(Exception):  # a report must never fail the drill
                reports.add_traffic(runs, load.records(), load.clients, since=load.started)

    # -- outcomes --------------------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        """Innermost wrapper: sees the outcome before a conftest rewrites it (a strict drill
        turns a skip into a failure; the report still says it was skipped)."""
        report = yield
        entry = self.entries.get(item.nodeid)
        if entry is not None:
            self._phase(entry, report, call)
        return report

    def _phase(self, entry: dict[str, Any], report: pytest.TestReport,
               call: pytest.CallInfo[None]) -> None:
        self.ran.add(entry["nodeid"])
        entry["duration_ms"] = (entry["duration_ms"] or 0) + round(report.duration * 1000)
        skip_exc = pytest.skip.Exception
        if report.when == "setup":
            if report.skipped:
                entry["status"] = reports.SKIPPED
                entry["message"] = _skip_reason(report)
                for record in entry["steps"]:
                    record["status"] = reports.SKIPPED
            elif report.failed:
                entry["status"] = reports.ERROR
                entry["message"] = "setup failed: " + _failure(report)
        elif report.when == "call":
            skipped = report.skipped or (call.excinfo is not None
                                         and isinstance(call.excinfo.value, skip_exc))
            reason = _skip_reason(report) if report.skipped else None
            after_skip = False
            for record in entry["steps"]:
                if record["status"] == "running":
                    record["status"] = reports.SKIPPED if skipped else reports.FAILED
                    record["error"] = reason if skipped else (
                        record["error"] or _short(report.longreprtext, 1000))
                    after_skip = skipped
                elif after_skip and record["status"] == reports.NOT_RUN:
                    record["status"] = reports.SKIPPED
                    record["error"] = "not reached: an earlier step was skipped"
            if report.passed:
                entry["status"] = reports.PASSED
            elif skipped:
                entry["status"] = reports.SKIPPED
                entry["message"] = reason
            else:
                entry["status"] = reports.FAILED
                entry["message"] = _failure(report)
        elif report.when == "teardown" and report.failed:
            if entry["status"] == reports.PASSED:
                entry["status"] = reports.ERROR
            entry["message"] = ((entry["message"] + "\n") if entry["message"] else "") + (
                "teardown failed: " + _failure(report))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """The final word on the outcome (after every plugin had its say)."""
        entry = self.entries.get(report.nodeid)
        if entry is None or not report.failed or entry["status"] in (reports.FAILED,
                                                                     reports.ERROR):
            return
        if entry["status"] == reports.SKIPPED:
            entry["counted_as"] = "failed"
            entry["message"] = (f"{entry['message'] or 'skipped'}\ncounted as a failure: "
                                + _short(report.longreprtext, 500))

    # -- xdist: the workers' records, merged on the controller -----------------------------------

    def _worker_output(self) -> str:
        """What this worker collected (every scenario, in collection order) and which of them
        it ran, as JSON text (execnet carries only plain types)."""
        return json.dumps({"features": self.data["features"], "ran": sorted(self.ran),
                           "fingerprint": self.env_fingerprint, "images": sorted(self.images),
                           # in memory to the controller only, to mask the files it writes
                           "secrets": sorted(self.secrets)}, default=str)

    @pytest.hookimpl(optionalhook=True)  # an xdist hook: absent with -p no:xdist
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """Controller: take a finished worker's scenarios (a crashed worker has none to give:
        its scenarios stay 'not run', and the run fails anyway)."""
        output = getattr(node, "workeroutput", None) or {}
        if WORKER_OUTPUT in output:
            part = json.loads(output[WORKER_OUTPUT])
            from runbook.redact import register_secrets

            register_secrets(*(str(v) for v in part.pop("secrets", []) if v))
            self.merge(part)

    def merge(self, part: dict[str, Any]) -> None:
        """Fold one worker's records into this report. Every worker collects the same
        scenarios in the same order, so the first one sets the order; a scenario a worker ran
        replaces the 'not run' entry another worker had for it."""
        ran = set(part.get("ran") or ())
        for feature in part["features"]:
            fentry = reports.feature_entry(self.data, feature["file"], feature["name"],
                                           feature["description"])
            known = {s["nodeid"]: i for i, s in enumerate(fentry["scenarios"])}
            for scenario in feature["scenarios"]:
                nodeid = scenario["nodeid"]
                if nodeid not in known:
                    known[nodeid] = len(fentry["scenarios"])
                    fentry["scenarios"].append(scenario)
                elif nodeid in ran:
                    fentry["scenarios"][known[nodeid]] = scenario
        self.ran |= ran
        for key, value in (part.get("fingerprint") or {}).items():
            if key not in self.env_fingerprint or str(
                    self.env_fingerprint[key]).startswith("unknown"):
                self.env_fingerprint[key] = value
        self.images.update(part.get("images") or [])

    # -- the end ---------------------------------------------------------------------------------

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.worker:
            workeroutput = getattr(self.config, "workeroutput", None)
            if workeroutput is not None:
                workeroutput[WORKER_OUTPUT] = self._worker_output()
            return
        data = self.data
        data["finished_at"] = reports.now_iso()
        data["duration_ms"] = round((time.monotonic() - self.began) * 1000)
        data["exit_status"] = int(exitstatus)
        fingerprint = reports.tool_fingerprint()
        fingerprint["timestamp"] = data["started_at"]
        fingerprint.update(self.env_fingerprint)
        slot_images = self.env_fingerprint.get("slot_images") or {}
        images = self.images | {i for i in slot_images.values() if i}
        fingerprint["app_images"] = sorted(images)
        if images:
            fingerprint["app_image_ids"] = reports.image_ids(images)
        data["fingerprint"] = fingerprint
        try:
            _, self.written = reports.write(self.directory, data)
        except Exception as exc:  # say so, loudly, but never hide the test outcome
            self.written = None
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"drill report: could not be written: {exc}", red=True)

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        """junit.xml and cucumber.json are written by pytest and pytest-bdd themselves, with
        tracebacks as they were: masked here once they exist, with the secrets this process
        knows (a run on a host is one process: its environment's; found by review)."""
        if self.worker:
            return
        for name in (reports.JUNIT_XML, reports.CUCUMBER_JSON):
            _mask_file(self.directory / name)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.written is None:
            return
        attention = self.data.get("attention") or []
        terminalreporter.write_sep("-", "drill report")
        terminalreporter.write_line(f"drill report: {self.written}")
        if attention:
            terminalreporter.write_line("ATTENTION: this run did not prove every step:",
                                        yellow=True, bold=True)
            for line in attention:
                terminalreporter.write_line(f"  - {line[:300]}", yellow=True)
