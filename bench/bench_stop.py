"""Stopping the old slot after the commit: `POST /containers/X/stop` against `kill` (SIGTERM)
+ `wait?condition=not-running` on this engine (issue 14, task 15c item 3).

Both on the drill's standby container, alternating, after its app answers /healthz (so its
SIGTERM handler is installed: a PID 1 without one ignores SIGTERM, and kill+wait would then
wait for ever where stop falls back to SIGKILL after its timeout). Each trial ends with the
same truth checked: the container is not running and its exit code is known.
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

from runbook import docker
from runbook.docker import DockerAction, _q, send
from runbook.drill.stack import DrillStack
from runbook.environment import Slot


def kill_action(name: str) -> DockerAction:
    return DockerAction("signal container", ("docker", "kill", "--signal", "SIGTERM", name),
                        "POST", f"/containers/{_q(name)}/kill", (("signal", "SIGTERM"),),
                        target=name)


def wait_action(name: str) -> DockerAction:
    return DockerAction("wait for container", ("docker", "wait", name), "POST",
                        f"/containers/{_q(name)}/wait", (("condition", "not-running"),),
                        target=name)


def ready(http: httpx.Client, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within {timeout:g}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    took: dict[str, list[float]] = {"stop": [], "kill+wait": []}
    with DrillStack() as stack, httpx.Client(timeout=5, trust_env=False) as http:
        green = stack.env.slot(Slot.GREEN)
        name = green.container
        for round_no in range(args.rounds):
            order = ("stop", "kill+wait") if round_no % 2 == 0 else ("kill+wait", "stop")
            for how in order:
                docker.start(name)
                ready(http, f"{green.base_url}/healthz")
                time.sleep(0.2)
                began = time.perf_counter()
                if how == "stop":
                    docker.run(docker.stop_action(name))
                else:
                    send(kill_action(name))
                    send(wait_action(name), timeout=15)
                took[how].append(time.perf_counter() - began)
                info = docker.inspect(name)
                assert not info.running and info.exit_code is not None, info
                print(f"round {round_no + 1} {how:<9} {took[how][-1] * 1000:6.0f} ms "
                      f"({info.status}, exit {info.exit_code})", flush=True)
    load = os.getloadavg()
    print(f"machine: {machine()}; load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    for how, values in took.items():
        print(f"{how:<9} median {statistics.median(values) * 1000:.0f} ms, "
              f"min {min(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms "
              f"(n={len(values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
