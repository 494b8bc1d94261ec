"""What drill tests read back from a stack to check a run: shared so every test judges the
same way (through the proxy, not through the code under test)."""

from __future__ import annotations

import dataclasses

import httpx

from runbook import docker
from runbook.environment import Environment, Slot


def through_proxy(env: Environment) -> tuple[str, str]:
    """(X-Togather-Slot, version) as a user sees them through Caddy."""
    response = httpx.get(f"{env.caddy.proxy_url}/version", headers={"Connection": "close"})
    return response.headers["X-Togather-Slot"], response.json()["version"]


def snapshot(env: Environment) -> dict[str, object]:
    """Everything a refused or dry run must leave untouched."""
    return {
        "state": env.state_file.read_bytes(),
        "caddyfile": env.caddy.caddyfile.read_bytes(),
        "containers": {s: dataclasses.astuple(docker.inspect(env.slot(s).container))[:4]
                       for s in Slot},
        "lock": env.lock_path.exists(),
        "traffic": through_proxy(env),
    }
