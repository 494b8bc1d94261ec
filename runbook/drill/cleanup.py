"""`make clean-drills`: remove what killed drills left behind, never a live drill's stack.

Every drill resource carries io.togather.drill.owner=<host>:<pid>; a run is an orphan when
that pid is dead on this host (another host's runs are left alone).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from runbook import procs
from runbook.drill.stack import RUN_LABEL, sweep

OWNER_LABEL = "io.togather.drill.owner"


def owners() -> dict[str, str]:
    """run id -> owner, for every drill container, network and volume on this engine."""
    found: dict[str, str] = {}
    for kind in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
        proc = subprocess.run(["docker", *kind, "--filter", f"label={RUN_LABEL}",
                               "--format", "{{json .Labels}}"], capture_output=True, text=True,
                              check=False)
        for line in proc.stdout.splitlines():
            labels = dict(item.split("=", 1) for item in json.loads(line).split(",")
                          if "=" in item)
            run_id = labels.get(RUN_LABEL, "")
            if labels.get(OWNER_LABEL) or run_id not in found:
                found[run_id] = labels.get(OWNER_LABEL, "")
    found.pop("", None)
    return found


def orphans() -> list[str]:
    host = socket.gethostname()
    out = []
    for run_id, owner in owners().items():
        owner_host, _, pid = owner.rpartition(":")
        if (owner_host == host and pid.isdigit() and not procs.pid_alive(int(pid))) or not owner:
            out.append(run_id)
    return out


def main() -> int:
    runs = orphans()
    for run_id in runs:
        sweep(run_id)
        for leftover in Path(tempfile.gettempdir()).glob(f"togather-drill-{run_id}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    print(f"clean-drills: removed {len(runs)} orphaned drill run(s)"
          + (f": {', '.join(runs)}" if runs else ""), file=sys.stderr)
    from runbook.drill.fleet import clean_orphans

    fleets = clean_orphans()  # issue 13: a killed drill fleet's sshd and directory
    if fleets:
        print(f"clean-drills: removed {len(fleets)} orphaned drill fleet(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
