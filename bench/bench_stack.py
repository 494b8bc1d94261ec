"""Drill stack bring-up and teardown with images present (issue: <= 10 s up, <= 3 s down)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, summary

from runbook.drill.stack import DrillStack, resources


def main(runs: int = 3) -> None:
    ups, downs = [], []
    for _ in range(runs):
        began = time.monotonic()
        stack = DrillStack().start()
        ups.append(time.monotonic() - began)
        began = time.monotonic()
        stack.stop()
        downs.append(time.monotonic() - began)
        assert resources(stack.run_id) == {"container": [], "network": [], "volume": []}
    print(f"machine: {machine()}")
    print(f"stack bring-up (to healthy, migrated, state written): {summary(ups)}")
    print(f"stack teardown (nothing left by label):              {summary(downs)}")


if __name__ == "__main__":
    main()
