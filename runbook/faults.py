"""Named points where a drill may break a run on purpose (the kill matrix).

Only an environment that `allows_faults` (a drill stack) honours them: on any other
environment `point()` returns at once, whatever the process environment says. A fault is
`RUNBOOK_DRILL_FAULT=<point>:<SIGNAL>` (several: comma-separated), e.g.
`switch.after-reload:SIGKILL`: when the run reaches that point it sends itself the signal,
as an operator or the OOM killer would.
Points: `before:<step>` and `after:<step>` for every executed step, and inside the switch
`switch.after-write`, `switch.after-reload`, `switch.after-verify`, and `state.before-rename`;
inside a restore's replay `restore.mid-stream` and `restore.before-commit`, and in its check,
once a mismatch is in the run record, `restore.before-doubt-marker`; in the fleet's
maintenance drain, right before a slot's stop `fleet-drain.before-stop`, once it is stopped
and logged `fleet-drain.after-stop`.
"""

from __future__ import annotations

import os
import signal
import time

from runbook.environment import Environment

VARIABLE = "RUNBOOK_DRILL_FAULT"


def point(env: Environment, name: str) -> None:
    if not env.allows_faults:
        return
    # several faults, comma-separated: each point's own (a stop, then a kill further on)
    specs = [spec.rpartition(":") for spec in os.environ.get(VARIABLE, "").split(",")]
    signame = next((sig for where, _, sig in specs if where and where == name), "")
    if not signame:
        return
    signum = getattr(signal, signame, None)
    if not isinstance(signum, int):
        return
    os.kill(os.getpid(), signum)
    if signum == signal.SIGKILL:
        time.sleep(60)  # never returns
    # Python runs the handler for a catchable signal between bytecodes: give it that chance
    # right here, where the fault was asked for.
    time.sleep(0)
