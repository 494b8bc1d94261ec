"""Ansible lookup `fleet_gate`: wait for the controller's decision file and return its word.

Loaded by Ansible itself (beside fleet.yml), never imported by togather-runbook (nor does it
import togather-runbook: Ansible may be another install, on PATH). Runs inside
ansible-playbook: no module shipped to a host, no process started, polled every 20 ms.
Bounded: a controller that died never leaves the playbook waiting; once it is gone (or after
WAIT_S) the lookup claims the gate itself (a hard link of a complete file: whoever links first
decides, so a controller answering at that very moment learns the gate expired) and answers
"expired", which the playbook treats like any word but "go" (nothing more changes).

`lookup('fleet_gate', ..., controller=true)` answers at once "gone" or "alive": checked before
every play that changes a host. A controller killed (kill -9, a crash, the OOM killer) left
its playbook running on: it drained, restored the shared database and rolled back batch after
batch with nobody to journal it, stop it at a failure the playbook cannot judge, or tell
on-call; an operator who killed it to stop it saw it go on.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ansible.plugins.lookup import LookupBase  # type: ignore[import-not-found,import-untyped,unused-ignore]

WAIT_S = float(os.environ.get("RUNBOOK_FLEET_GATE_WAIT_S", "900"))
CHECK_S = 0.25  # how often a waiting gate asks whether the controller is still there


def controller_gone(variables: Any) -> bool:
    """Is the fleet controller that started this playbook gone? Its pid and /proc start time
    (`fleet_controller_pid`, `fleet_controller_pid_start`): no such process, a zombie, or
    another process under that pid. True only when known: anything unreadable is alive (the
    playbook then waits or goes on, as it did before this check). Lookups run on the
    controller's machine, where the controller started ansible-playbook."""
    variables = variables if isinstance(variables, dict) else {}
    try:
        pid = int(variables.get("fleet_controller_pid"))
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    start = variables.get("fleet_controller_pid_start")
    if start is None or not os.path.isdir("/proc/self"):
        # no start time to tell a reused pid by (the controller read no /proc of its own),
        # or no /proc here: only the kernel's word that no such process exists is "gone"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if fields and fields[0] in ("Z", "X"):  # exited, not yet reaped
        return True
    try:
        return int(fields[19]) != int(start)
    except (IndexError, ValueError, TypeError):
        return False


class LookupModule(LookupBase):  # type: ignore[misc]
    def run(self, terms: list[str], variables: Any = None, **kwargs: Any) -> list[str]:
        if kwargs.get("controller"):
            return ["gone" if controller_gone(variables) else "alive"]
        path = terms[0]
        deadline = time.monotonic() + WAIT_S
        checked = time.monotonic()
        while not os.path.exists(path):
            now = time.monotonic()
            gone = now - checked >= CHECK_S and controller_gone(variables)
            checked = now if now - checked >= CHECK_S else checked
            if gone or now > deadline:
                tmp = f"{path}.expired.{os.getpid()}"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write("expired")
                try:
                    os.link(tmp, path)  # fails if the controller decided meanwhile
                except FileExistsError:
                    break
                finally:
                    os.unlink(tmp)
                return ["expired"]
            time.sleep(0.02)
        with open(path, encoding="utf-8") as f:
            return [f.read().strip()]
