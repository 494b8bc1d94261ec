"""The machine-wide claim drill stacks take from picking their ports until their Caddy listens
(runbook/drill/stack.py: ports_claim): a second stack waits for it, and a holder killed with
SIGKILL never leaves it taken."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from runbook.drill.stack import DrillError, ports_claim

HOLD = ("import sys, time\n"
        "from runbook.drill.stack import ports_claim\n"
        "with ports_claim():\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n")


def test_a_second_claim_waits_and_a_killed_holder_releases_it() -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        began = time.monotonic()
        with pytest.raises(DrillError, match="another drill stack held"), ports_claim(timeout=0.5):
            pass
        assert time.monotonic() - began >= 0.5
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        with ports_claim(timeout=60):  # other stacks of this suite may start meanwhile
            pass
    finally:
        holder.kill()
        holder.wait(timeout=10)
