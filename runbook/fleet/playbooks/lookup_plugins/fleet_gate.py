"""Ansible lookup `fleet_gate`: wait for the controller's decision file and return its word.

Loaded by Ansible itself (beside fleet.yml), never imported by togather-runbook. Runs inside
ansible-playbook: no module shipped to a host, no process started, polled every 20 ms. Bounded:
a controller that died never leaves the playbook waiting for ever; after WAIT_S the lookup
claims the gate itself (a hard link of a complete file: whoever links first decides, so a
controller answering at that very moment learns the gate expired) and answers "expired", which
the playbook treats like any word but "go" (nothing more changes).
"""

from __future__ import annotations

import os
import time
from typing import Any

from ansible.plugins.lookup import LookupBase  # type: ignore[import-not-found,import-untyped,unused-ignore]

WAIT_S = float(os.environ.get("RUNBOOK_FLEET_GATE_WAIT_S", "900"))


class LookupModule(LookupBase):  # type: ignore[misc]
    def run(self, terms: list[str], variables: Any = None, **kwargs: Any) -> list[str]:
        path = terms[0]
        deadline = time.monotonic() + WAIT_S
        while not os.path.exists(path):
            if time.monotonic() > deadline:
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
