"""How close the runbook's rollback is to the bare minimum (issue 14 item 1).

The floor is what a person who knows the stack by heart would do, with nothing checked twice:
docker start the standby -> poll its /health every 20 ms -> swap the port and slot name in the
Caddyfile -> POST /load -> one GET through the proxy. Against it, the library rollback
(`runbook.rollback.rollback`, the environment's defaults: the old slot is stopped afterwards),
both on the same drill stack in one run, median of `--rounds` each, for a running standby and a
stopped one. Besides end to end, it prints the time to traffic switched (the end of the
library's `switch` step) since the floor records nothing and stops nothing.

Goals: running standby <= 1.5x the floor end to end; stopped standby <= 1.3x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine

from runbook import deploy, docker, rollback
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot

POLL = 0.02


def arrange(stack: DrillStack, *, running: bool) -> Environment:
    """v3 serves on blue, v2 (the rollback target) waits on green, running or stopped."""
    env = stack.env
    stack.reset()
    deploy.deploy(env, deploy.Options(version=VERSIONS["v2"].tag))
    keep = env.with_(stop_old_slot=False) if running else env
    deploy.deploy(keep, deploy.Options(version=VERSIONS["v3"].tag))
    green = docker.inspect(env.slot(Slot.GREEN).container)
    assert green.running == running, green
    return env


def floor(env: Environment, http: httpx.Client, *, running: bool) -> float:
    """The bare-minimum rollback to green; returns its wall time."""
    green = env.slot(Slot.GREEN)
    blue = env.slot(Slot.BLUE)
    began = time.perf_counter()
    if not running:
        docker.client().containers.get(green.container).start()
    while True:
        try:
            if http.get(f"{green.base_url}/health", headers={"Connection": "close"}
                        ).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(POLL)
    path = env.caddy.caddyfile
    text = path.read_text().replace(f"localhost:{blue.port}", f"localhost:{green.port}")
    text = text.replace('X-Togather-Slot "blue"', 'X-Togather-Slot "green"')
    path.write_text(text)
    http.post(f"{env.caddy.admin_url}/load", content=text.encode(),
              headers={"Content-Type": "text/caddyfile"}).raise_for_status()
    answer = http.get(f"{env.caddy.proxy_url}/version", headers={"Connection": "close"})
    took = time.perf_counter() - began
    assert answer.headers.get("X-Togather-Slot") == "green", answer.headers
    return took


def undo_floor(stack: DrillStack, env: Environment, http: httpx.Client, *,
               running: bool) -> None:
    """Back to the arranged picture (traffic on blue, green as it was) without a full reset."""
    text = stack.caddyfile_text(Slot.BLUE)
    env.caddy.caddyfile.write_text(text)
    http.post(f"{env.caddy.admin_url}/load", content=text.encode(),
              headers={"Content-Type": "text/caddyfile"}).raise_for_status()
    if not running:
        docker.stop(env.slot(Slot.GREEN).container)


def library(env: Environment) -> tuple[float, float]:
    """The runbook's library rollback: (end to end, time to traffic switched)."""
    marks: dict[str, float] = {}

    def progress(event: str, step: object, message: str = "") -> None:
        if event == "done":
            marks[getattr(step, "name", "")] = time.perf_counter()

    began = time.perf_counter()
    rollback.rollback(env, progress=progress)
    took = time.perf_counter() - began
    return took, marks["switch"] - began


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows: dict[str, dict[str, list[float]]] = {}
    with DrillStack() as stack, httpx.Client(timeout=10, trust_env=False) as http:
        for round_no in range(args.rounds):
            for running in (True, False):
                kind = "running" if running else "stopped"
                row = rows.setdefault(kind, {"floor": [], "library": [], "switched": []})
                env = arrange(stack, running=running)
                row["floor"].append(floor(env, http, running=running))
                undo_floor(stack, env, http, running=running)
                took, switched = library(env)
                row["library"].append(took)
                row["switched"].append(switched)
                print(f"round {round_no + 1} {kind}: floor {row['floor'][-1]:.3f}s, library "
                      f"{took:.3f}s (switched at {switched:.3f}s)", flush=True)
    load = os.getloadavg()
    print(f"machine: {machine()}; load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    goals = {"running": 1.5, "stopped": 1.3}
    print(f"{'standby':<8} {'floor':>8} {'library':>8} {'ratio':>6} {'goal':>5}  "
          f"{'to switched':>11} {'ratio':>6}   (median of {args.rounds})")
    for kind, row in rows.items():
        f, lib, sw = med(row["floor"]), med(row["library"]), med(row["switched"])
        print(f"{kind:<8} {f:>7.3f}s {lib:>7.3f}s {lib / f:>5.2f}x {goals[kind]:>4}x  "
              f"{sw:>10.3f}s {sw / f:>5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
