"""Fleet rollback of 3 drill hosts (canary, then a batch of 2) next to the single-host rollbacks.

Issue 13's numbers: the fleet's wall time (`runbook fleet rollback`, real ansible-playbook over
real SSH), the sum of the three single-host rollbacks (`runbook rollback ENV --yes` on each
host, measured in the same run, each host from the same starting point), and the fleet's
overhead per host: (fleet wall time - the rollbacks on its critical path, i.e. the canary's
plus the slower of the batch's two) / 3. The goal is <= 1 s per host. The same computed from the
rollbacks the fleet itself ran (their `done_in`) is printed too: on a loaded machine the
separate single-host runs drift from the fleet's own. Each phase of the fleet
run (pre-flight + fleet lock, database, rollout) comes from its fleet journal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, summary

from runbook.drill.fleet import DrillFleet


def single(fleet: DrillFleet, name: str) -> float:
    """One host's own rollback, as on-call types it on that host (its RUNBOOK_CONFIG)."""
    host = fleet.host(name)
    began = time.monotonic()
    proc = subprocess.run([fleet.runbook_command, "rollback", "development", "--yes",
                           "--format", "json"], capture_output=True, text=True, check=False,
                          env={**os.environ, "RUNBOOK_CONFIG": str(host.env.source)})
    took = time.monotonic() - began
    assert proc.returncode == 0, proc.stderr
    return took


def main(runs: int = 3) -> None:
    walls, sums, overheads, inside, own = [], [], [], [], []
    phases: dict[str, list[float]] = {}
    with DrillFleet(size=3) as fleet, tempfile.TemporaryDirectory() as journal_dir:
        for _ in range(runs):
            # each host on v3, its previous deployment v2, as a deploy leaves it: made the
            # first time, then put back (DrillFleet.on_new_deployment)
            fleet.on_new_deployment("v3")
            singles = {h.name: single(fleet, h.name) for h in fleet.hosts}
            sums.append(sum(singles.values()))
            fleet.on_new_deployment("v3")
            began = time.monotonic()
            proc = subprocess.run([fleet.runbook_command, "fleet", "rollback",
                                   str(fleet.inventory), "--batches", "100%", "--yes",
                                   "--format", "json", "--journal-dir", journal_dir],
                                  capture_output=True, text=True, check=False,
                                  stdin=subprocess.DEVNULL)
            wall = time.monotonic() - began
            assert proc.returncode == 0, proc.stdout + proc.stderr
            record = json.loads(proc.stdout.splitlines()[-1])["record"]
            assert record["batches"] == [["host1"], ["host2", "host3"]], record["batches"]
            walls.append(wall)
            critical = singles["host1"] + max(singles["host2"], singles["host3"])
            overheads.append((wall - critical) / 3)
            done = {n: h["run"]["timing"]["done_in_s"] for n, h in record["hosts"].items()}
            inside.append(sum(done.values()))
            own.append((wall - done["host1"] - max(done["host2"], done["host3"])) / 3)
            for p in record["phases"]:
                phases.setdefault(p["name"], []).append(p["duration_ms"] / 1000)
    print(f"machine: {machine()}")
    print(f"fleet rollback, 3 hosts (canary, then a batch of 2): {summary(walls)}")
    print(f"sum of the 3 single-host rollbacks (same run):       {summary(sums)}")
    print(f"the 3 rollbacks as run by the fleet (sum of done_in): {summary(inside)}")
    print(f"fleet overhead per host ((wall - critical path) / 3): {summary(overheads)}")
    print(f"  the same from the fleet's own rollbacks (their done_in on its critical path; "
          f"independent of the load's drift between the two measurements): {summary(own)}")
    for name, values in phases.items():
        print(f"  phase {name:<10} {summary(values)}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
