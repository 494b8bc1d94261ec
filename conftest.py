"""Root pytest configuration: `--env`, `--dry-run`, `.feature` collection, environment fixtures.

`pytest features/rollback.feature` works as typed: each .feature file is collected as a
module whose tests pytest-bdd's `scenarios()` generates. Step definitions live in steps/,
loaded as a plugin (see pyproject's addopts).
"""

from __future__ import annotations

import os
import types
from pathlib import Path

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


class FeatureModule(pytest.Module):
    """A .feature file collected as a module whose scenarios pytest-bdd binds."""

    def _getobj(self) -> types.ModuleType:
        module = types.ModuleType(f"features.{self.path.stem}")
        module.__file__ = str(self.path)
        code = compile("from pytest_bdd import scenarios\nscenarios(__file__)\n",
                       str(self.path), "exec")
        exec(code, module.__dict__)  # fixed code: binds the scenarios
        return module


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix == ".feature":
        return FeatureModule.from_parent(parent, path=file_path)
    return None
