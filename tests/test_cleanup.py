"""`make clean-drills` removes a killed drill's stack and never a live one's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from runbook.drill import cleanup
from runbook.drill.stack import DrillStack, resources

# cleanup.main() also sweeps dead drill fleets (runbook.drill.fleet.clean_orphans): on the
# fleet's worker, beside the fleet tests rather than across them
pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("fleet")]

KILLED_DRILL = """
import os, sys
from runbook.drill.stack import DrillStack
stack = DrillStack(keep_dir=False).start()
print(stack.run_id, flush=True)
os._exit(0)  # killed: no teardown runs
"""


def test_orphans_of_a_killed_drill_are_swept_and_live_ones_kept(drill_stack: DrillStack) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_DRILL], capture_output=True, text=True,
                          timeout=120, check=True)
    orphan = proc.stdout.strip().splitlines()[-1]
    assert resources(orphan)["container"], "the killed drill should have left its stack"
    assert orphan in cleanup.orphans()
    assert drill_stack.run_id not in cleanup.orphans()
    assert cleanup.main() == 0
    assert resources(orphan) == {"container": [], "network": [], "volume": []}
    assert resources(drill_stack.run_id)["container"], "a live drill must be left alone"
