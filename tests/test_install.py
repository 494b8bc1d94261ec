"""The built wheel, installed into a fresh venv as `pipx install` would, is a working `runbook`.

The wheel is built from a copy of the checkout's files (the checkout gets no build/ or
egg-info), installed with its dependencies from the machine's package index into a venv that
does not see the checkout, and run from a directory outside it: the environment defaults are
found inside the installed package, and `runbook status` and `runbook rollback --dry-run`
work against a drill stack addressed through `--config`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from tests.drill_checks import two_deployments

# one xdist worker runs this module (make test: --dist loadgroup): its module fixture once
pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("install")]
REPO_ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = {".git", ".venv", "reports", "build", "dist", "__pycache__", ".pytest_cache",
            ".mypy_cache", ".ruff_cache"}



def run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RUNBOOK_CONFIG", "PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; returns its bin directory."""
    work = tmp_path_factory.mktemp("install")
    source = work / "src"
    shutil.copytree(REPO_ROOT, source, ignore=lambda _dir, names: [
        n for n in names if n in LEFT_OUT or n.endswith(".egg-info")])
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                 str(work / "dist"), str(source)], cwd=work)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((work / "dist").glob("togather_runbook-*.whl"))
    venv = work / "venv"
    # without a pip of its own: this venv's pip installs into it (`pip --python`), which
    # spares ensurepip (~2.5 s); --no-compile spares byte-compiling every dependency (~3 s),
    # which changes nothing a run can see
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=work)
    assert made.returncode == 0, made.stderr
    pip = run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
               "install", "-q", "--no-compile", str(wheel)], cwd=work)
    if pip.returncode != 0 and "No matching distribution found" in pip.stderr:
        pytest.skip("the dependencies are not available from this machine's package index: "
                    + pip.stderr.strip().splitlines()[-1])
    assert pip.returncode == 0, pip.stderr[-2000:]
    return venv / "bin"


def test_the_installed_package_is_the_one_that_runs(installed: Path, tmp_path: Path) -> None:
    where = run([str(installed / "python"), "-c",
                 "import runbook.environment as e; print(e.BUILTIN_DIR)"], cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    builtin = Path(where.stdout.strip())
    assert builtin.is_relative_to(installed.parent), builtin
    assert sorted(p.name for p in builtin.glob("*.toml")) == ["production.toml",
                                                              "staging.toml"]
    # production's defaults are found in the package: it gets as far as the host's state file
    proc = run([str(installed / "runbook"), "rollback", "production", "--dry-run"],
               cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert "no configuration for environment" not in proc.stderr
    assert "/opt/togather/src/deploy/config/deployment-state.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_status_and_rollback_dry_run_against_a_drill(installed: Path, scene_stack: DrillStack,
                                                     tmp_path: Path) -> None:
    env = two_deployments(scene_stack)  # v3 live on blue, v2 (same schema) the previous one
    before = env.state_file.read_bytes()
    config = ["--config", str(env.source)]
    status = run([str(installed / "runbook"), "status", env.name, *config, "--format", "json"],
                 cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    data = json.loads(status.stdout)
    assert data["current"]["version"] == VERSIONS["v3"].tag and data["problems"] == []
    dry = run([str(installed / "runbook"), "rollback", env.name, *config, "--dry-run"],
              cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "Dry run: nothing was changed." in dry.stdout
    assert VERSIONS["v2"].image in dry.stdout and "green" in dry.stdout
    assert env.state_file.read_bytes() == before
