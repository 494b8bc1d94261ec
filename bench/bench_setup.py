"""First-time set-up cost (issue: engine + Compose + images + venv <= 5 min on a bare machine).

Measures what can be redone here without a new machine: a fresh venv with the project and its
test extras, and every drill image from nothing (debootstrap base included). The engine and
Compose install (scripts/ensure-docker.sh on a machine without them) is timed by that script's
own first run; its figure is reported in README from a bare machine.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine

ROOT = Path(__file__).resolve().parents[1]


def timed(argv: list[str], **kw: object) -> float:
    began = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, **kw)  # type: ignore[call-overload]
    return time.monotonic() - began


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        venv_s = timed([sys.executable, "-m", "venv", str(venv)])
        venv_s += timed([str(venv / "bin/python"), "-m", "pip", "install", "-q",
                         "--disable-pip-version-check", "-e", f"{ROOT}[dev]"])
    images = subprocess.run([sys.executable, "-m", "runbook.drill.images", "list"],
                            capture_output=True, text=True, check=True).stdout.split()
    from runbook.drill.images import base_image

    subprocess.run(["docker", "rmi", "-f", *images, base_image()], capture_output=True,
                   check=False)
    images_s = timed([sys.executable, "-m", "runbook.drill.images", "build"])
    again_s = timed([sys.executable, "-m", "runbook.drill.images", "build"])
    print(f"machine: {machine()}")
    print(f"venv + project with test extras (pip, local package index): {venv_s:.1f}s")
    print(f"every drill image from nothing (debootstrap base + builds):  {images_s:.1f}s")
    print(f"`make images` again, nothing changed:                         {again_s:.1f}s")


if __name__ == "__main__":
    main()
