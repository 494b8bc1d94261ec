"""Root pytest configuration: `--env`, `--dry-run`, `.feature` collection, and the safety rules.

`pytest features/rollback.feature` works as typed: each .feature file is collected as a
module whose tests pytest-bdd's `scenarios()` generates. Step definitions live in steps/,
loaded as a plugin (see pyproject's addopts).

The rules, enforced here:
- a real host (`--env` other than drill) is checked before any scenario runs: an unknown
  environment exits 2, a host that is not this machine (no state file, no Docker) exits 4,
  each with one clear line;
- on a real host, @fault scenarios are skipped ("injects faults: drill only"), and a @mutating
  scenario runs only when asked for: `pytest features/rollback.feature` performs the rollback
  (the guide's documented command), any invocation that does not name that file (e.g.
  `pytest features/`) runs none, unless the user selected tests explicitly (-k, -m or a node
  id). The manual switch and the redeploy never run unselected. With --dry-run nothing
  mutates, so the rule does not apply;
- a drill run is strict: an undefined step, or a skipped scenario or step, fails the run
  (except the Then-steps a --dry-run skips after printing the plan).
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("runbook")
    group.addoption(
        "--env", default="drill", metavar="ENV",
        help="where the runbook runs: drill (default: an ephemeral blue/green stack), "
             "development, staging, production (alias: prod), or a path to an environment "
             "TOML file",
    )
    group.addoption("--dry-run", action="store_true", default=False,
                    help="print the plan of every mutating step instead of doing it")
    group.addoption(
        "--shape", default="default", metavar="SHAPE",
        help="the drill host's shape: default, or a comma-separated set of container-caddy, "
             "caddy-reload, docker-network-db, minimal-health, docker-run (README: 'Drill host "
             "shapes')",
    )
    group.addoption(
        "--shape-share", default=None, metavar="K/N",
        help="run only the K-th of N shares of the tests (every N-th, from the K-th, of those "
             "not marked any_shape or shape_specific); features run whole. make test gives "
             "each shape group one share; the nightly drill none (README: 'Drill host shapes')",
    )


class FeatureModule(pytest.Module):
    """A .feature file collected as a module whose scenarios pytest-bdd binds."""

    def _getobj(self) -> types.ModuleType:
        module = types.ModuleType(f"features.{self.path.stem}")
        module.__file__ = str(self.path)
        code = compile("from pytest_bdd import scenarios\nscenarios(__file__)\n",
                       str(self.path), "exec")
        exec(code, module.__dict__)
        return module


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix == ".feature":
        return FeatureModule.from_parent(parent, path=file_path)
    return None


# ---------------------------------------------------------------------------------------------
# Where the run goes: drill or a real host

FAULT_SKIP = "injects faults: drill only"
ROLLBACK_FEATURE = ("features", "rollback.feature")  # the file whose rollback runs when named
MUTATING_SKIP = ("changes the host: on a real host a mutating scenario runs unselected only "
                 "as the rollback of `pytest features/rollback.feature`; to run this one, "
                 "select it explicitly: -k <a word of its name>, -m mutating, or its node id "
                 "(features/<file>.feature::test_<name>)")
DRY_RUN_SKIP = "dry run: plan printed above"
EXIT_USAGE = 2
EXIT_PRECONDITION = 4


def _env_name(config: pytest.Config) -> str:
    return str(config.getoption("--env"))


def _on_drill(config: pytest.Config) -> bool:
    return _env_name(config) == "drill"


def _is_feature(item: pytest.Item) -> bool:
    return item.path.suffix == ".feature"


def pytest_configure(config: pytest.Config) -> None:
    name = _env_name(config)
    if name == "drill":
        return
    from runbook import environment as envmod
    from runbook.errors import RunbookError

    try:
        envmod.find_config(name)
    except RunbookError as exc:
        pytest.exit(f"runbook: --env {name}: {exc}", returncode=EXIT_USAGE)
    if (config.getoption("numprocesses", None) or 0) and not hasattr(config, "workerinput"):
        # workers would run Confirm and the rollback at once: no gate, no one-at-a-time
        pytest.exit(f"runbook: --env {name}: -n (pytest-xdist) is for the drill; on a host "
                    "the scenarios run one after another: drop -n", returncode=EXIT_USAGE)
    config.pluginmanager.register(RealHostSelection(), "runbook-real-host-selection")
    if not config.getoption("--dry-run"):
        # the guide's order is a gate on a real host: a Confirm that fails (the state file
        # and what runs disagree) stops the run before its rollback (found by review)
        config.option.maxfail = 1


def pytest_report_header(config: pytest.Config) -> str | None:
    """On a real host, the environment file the run acts on, first thing on screen (without
    /etc/togather-runbook/<env>.toml it is the built-in defaults: said, never silent)."""
    if _on_drill(config):
        return None
    from runbook import environment as envmod
    from runbook.errors import RunbookError

    name = _env_name(config)
    try:
        path = envmod.find_config(os.environ.get("RUNBOOK_CONFIG") or name)
    except RunbookError:  # pytest_configure has refused a bad one already
        return None
    builtin = path.resolve().is_relative_to(envmod.BUILTIN_DIR.resolve())
    return (f"runbook: --env {name}: {path}"
            + (f" (the built-in defaults: this host has no {envmod.SYSTEM_DIR}/"
               f"{envmod.canonical_name(name)}.toml)" if builtin else ""))


def _explicit_selection(config: pytest.Config) -> bool:
    """-k, -m or a node id (path::name) on the command line."""
    return bool(config.option.keyword or config.option.markexpr
                or any("::" in str(arg) for arg in config.args))


def _rollback_feature(config: pytest.Config) -> Path:
    return Path(config.rootpath, *ROLLBACK_FEATURE).resolve()


def _names_rollback_feature(config: pytest.Config) -> bool:
    """The command line names features/rollback.feature itself (not a folder holding it)."""
    wanted = _rollback_feature(config)
    here = Path(config.invocation_params.dir)
    return any((here / str(arg).split("::", 1)[0]).resolve() == wanted for arg in config.args)


def _share(config: pytest.Config) -> tuple[int, int] | None:
    raw = config.getoption("--shape-share")
    if raw is None:
        return None
    k, _, n = str(raw).partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise pytest.UsageError(f"--shape-share {raw}: expected K/N with 1 <= K <= N, e.g. 1/2")
    return int(k), int(n)


def _take_share(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--shape-share K/N: a shape group's share of the shape-sensitive tests (not the
    features; in collection order, every N-th from the K-th, counted before -m deselects),
    so that N groups together run each of them once on a non-default shape; the rest are
    deselected, as -m does. A test that takes another path, or skips, on some shapes
    (`shape_specific`) is in every share."""
    share = _share(config)
    if share is None:
        return
    k, n = share
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    index = 0
    for item in items:
        if _is_feature(item) or item.get_closest_marker("any_shape") \
                or item.get_closest_marker("shape_specific"):  # skipped where it does not fit
            kept.append(item)
            continue
        (kept if index % n == k - 1 else dropped).append(item)
        index += 1
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _take_share(config, items)
    for item in items:  # one worker brings up the drill fleet (3 hosts), not every worker
        if item.get_closest_marker("fleet") or "drill_fleet" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("fleet"))
    # The longest work first (the features, whose scenes each hold one worker, the other
    # groups, the tests marked long), so that under -n no worker ends the run alone on one
    # of them while the others wait (the end of `make test` had the cores 20-60 % idle).
    # A stable sort: the features keep their order (steps/world.py orders them by scene).
    items.sort(key=lambda item: 0 if _is_feature(item) or item.get_closest_marker(
        "xdist_group") or item.get_closest_marker("long") else 1)
    if _on_drill(config):
        return
    features = [item for item in items if _is_feature(item)]
    for item in features:
        if item.get_closest_marker("fault"):
            item.add_marker(pytest.mark.skip(reason=FAULT_SKIP))


class RealHostSelection:
    """Registered on a real host only (pytest_configure)."""

    @pytest.hookimpl(trylast=True)  # after -k and -m have deselected: what will really run
    def pytest_collection_modifyitems(self, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        _real_host_selection(config, items)


def _real_host_selection(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a real host: the features only, and at most one mutating scenario per run (found
    by review: any -k or -m, even `-m "not fleet"`, counted as selecting, so the manual
    switch ran and then the rollback rolled back to the release just left)."""
    if config.option.collectonly:
        return
    others = [item.nodeid for item in items if not _is_feature(item)]
    if others:
        pytest.exit(f"runbook: --env {_env_name(config)} runs the runbook's features only; "
                    f"{others[0]} (and {len(others) - 1} more) needs the drill: run "
                    "`pytest features/rollback.feature --env ...` on a host, `pytest` alone "
                    "on the drill", returncode=EXIT_USAGE)
    if config.getoption("--dry-run"):
        return
    mutating = [item for item in items if item.get_closest_marker("mutating")
                and not item.get_closest_marker("fault")]
    if _explicit_selection(config):
        runs = mutating
    else:
        rollback = _rollback_feature(config)
        runs = [item for item in mutating
                if _names_rollback_feature(config) and item.path.resolve() == rollback][:1]
    if len(runs) > 1:
        pytest.exit(f"runbook: --env {_env_name(config)}: {len(runs)} scenarios that change "
                    f"the host are selected ({', '.join(item.name for item in runs[:3])}"
                    f"{', ...' if len(runs) > 3 else ''}); one run performs at most one: "
                    "select it by its node id (features/<file>.feature::test_<name>)",
                    returncode=EXIT_USAGE)
    for item in mutating:
        if item not in runs:
            item.add_marker(pytest.mark.skip(reason=MUTATING_SKIP))



def _host_problem(name: str) -> tuple[str, int] | None:
    """Why this machine cannot run the scenarios against `name`, or None."""
    from runbook import environment as envmod
    from runbook.errors import RunbookError

    try:
        env = envmod.load(name)
    except RunbookError as exc:
        return f"runbook: --env {name}: {exc}", EXIT_USAGE
    if not env.state_file.is_file():
        return (f"runbook: --env {name}: {env.display}'s state file {env.state_file} does not "
                "exist, so this machine is not that host; run on the host itself, or pass "
                "--env <environment file> for this one", EXIT_PRECONDITION)
    try:
        from runbook import docker

        docker.client().ping()
    except Exception as exc:  # any failure means the same thing here
        detail = exc.message if isinstance(exc, RunbookError) else type(exc).__name__
        return (f"runbook: --env {name}: cannot reach the Docker engine ({detail}); start it "
                "(systemctl start docker) and check `docker info`", EXIT_PRECONDITION)
    return None


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    if _on_drill(config) or config.option.collectonly:
        return
    if not any(_is_feature(item) for item in session.items):
        return
    problem = _host_problem(_env_name(config))
    if problem is not None:
        message, code = problem
        pytest.exit(message, returncode=code)


# ---------------------------------------------------------------------------------------------
# Strict drill runs


def _skip_reason(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail"):
        return f"xfail: {report.wasxfail}"
    longrepr: Any = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _scenario_line(item: pytest.Item) -> int | None:
    from pytest_bdd.scenario import scenario_wrapper_template_registry

    template = scenario_wrapper_template_registry.get(getattr(item, "obj", None))  # type: ignore[arg-type]
    return template.line_number if template is not None else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if not (report.skipped and _is_feature(item)):
        return report
    reason = _skip_reason(report)
    if _on_drill(item.config) and not (item.config.getoption("--dry-run")
                                       and reason.startswith(DRY_RUN_SKIP)):
        report.outcome = "failed"
        report.longrepr = (f"strict drill run: a skipped scenario or step fails the run "
                           f"({reason})")
    elif isinstance(report.longrepr, tuple):
        # point the skip summary at the scenario in its .feature file, not at pytest-bdd
        report.longrepr = (str(item.path), _scenario_line(item), report.longrepr[2])
    return report


def pytest_bdd_step_func_lookup_error(request: pytest.FixtureRequest, feature: Any,
                                      scenario: Any, step: Any, exception: Exception) -> None:
    """An undefined step fails its scenario, anywhere, and says how to define it."""
    pytest.fail(f"undefined step at {feature.rel_filename}:{step.line_number}: "
                f"{step.keyword} {step.name}\n"
                f"  define it in steps/: @{step.type}({step.name!r})", pytrace=False)
