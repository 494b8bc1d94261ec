"""scripts/ensure-docker.sh on machines it cannot fix: one clear line, a distinct exit code.

A machine without Docker cannot exist here (this one has it), so these tests put stand-in
`docker`/`id` commands first on PATH: the only stubs in the suite, for what cannot exist.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ensure-docker.sh"


def fake_bin(tmp_path: Path, **scripts: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def test_engine_not_running_and_not_root_says_how_to_start_it(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, docker="exit 1", id="echo 1000", dockerd="exit 1")
    proc = run(env)
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "start it" in lines[0]


def test_compose_too_old_and_not_root_says_what_to_install(tmp_path: Path) -> None:
    docker = ('case "$1 $2" in\n'
              '  "info "*) exit 0;;\n'
              '  "compose version") echo 2.12.2;;\n'
              '  *) exit 0;;\n'
              "esac")
    env = fake_bin(tmp_path, docker=docker, id="echo 1000")
    proc = run(env)
    assert proc.returncode == 3
    assert "Compose v2.20+ is missing or too old" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_working_engine_is_left_alone() -> None:
    proc = run(dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "ok: engine" in proc.stderr
