"""Ansible lookup `fleet_gate`: wait for the controller's decision file and return its word.

Loaded by Ansible itself (beside fleet.yml), never imported by togather-runbook. Runs inside
ansible-playbook: no module shipped to a host, no process started, polled every 20 ms.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ansible.plugins.lookup import LookupBase  # type: ignore[import-not-found]


class LookupModule(LookupBase):  # type: ignore[misc]
    def run(self, terms: list[str], variables: Any = None, **kwargs: Any) -> list[str]:
        path = terms[0]
        while not os.path.exists(path):
            time.sleep(0.02)
        with open(path, encoding="utf-8") as f:
            return [f.read().strip()]
