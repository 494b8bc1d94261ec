"""How close the runbook's rollback is to the bare minimum (issue 14 item 1).

The floor is what a person who knows the stack by heart would do, with nothing checked twice:
docker start the standby (one engine API request) -> poll its /health every 20 ms -> swap the
port and slot name in the Caddyfile -> POST /load -> one GET through the proxy. Against it, the
library rollback (`runbook.rollback.rollback`, the environment's defaults: the old slot is
stopped afterwards), both on the same drill stack in one run, median of `--rounds` each, for a
running standby and a stopped one. Besides end to end, it prints the time to traffic switched
(the end of the library's `switch` step) since the floor records nothing and stops nothing.

Goals: running standby <= 1.5x the floor end to end; stopped standby <= 1.3x. It also runs
`runbook rollback --yes` as a process (a running standby; --no-cli skips it) against the
library's time: goal <= library + 0.3 s (issue 14 item 2).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
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
STALE_AFTER_LOAD: list[str | None] = []  # answers from the old config after /load returned


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
        docker.start(green.container)  # one engine request (POST /containers/X/start)
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
    for _ in range(100):  # one GET; again only if Caddy still answered from the old config
        answer = http.get(f"{env.caddy.proxy_url}/version", headers={"Connection": "close"})
        if answer.headers.get("X-Togather-Slot") == "green":
            break
        STALE_AFTER_LOAD.append(answer.headers.get("X-Togather-Slot"))
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


def library(env: Environment, parts: dict[str, list[float]]) -> tuple[float, float]:
    """The runbook's library rollback: (end to end, time to traffic switched); where the time
    went is appended to `parts` (lock+plan, each step that ran, unlock+journal)."""
    marks: list[tuple[str, str, float]] = []

    def progress(event: str, step: object, message: str = "") -> None:
        if event in ("start", "done"):
            marks.append((event, getattr(step, "name", ""), time.perf_counter()))

    began = time.perf_counter()
    rollback.rollback(env, progress=progress)
    ended = time.perf_counter()
    parts.setdefault("lock+plan", []).append(marks[0][2] - began)
    for (event, name, at), (_, _, done) in zip(marks[::2], marks[1::2], strict=True):
        assert event == "start"
        parts.setdefault(name, []).append(done - at)
    parts.setdefault("unlock+journal", []).append(ended - marks[-1][2])
    switched = next(at for event, name, at in marks if event == "done" and name == "switch")
    return ended - began, switched - began


def cli(stack: DrillStack) -> tuple[float, str]:
    """`runbook rollback --yes` as on-call types it: (wall time, its "Done in" line)."""
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "runbook.cli", "rollback", stack.env.name, "--yes",
         "--config", str(stack.env.source)], capture_output=True, text=True, check=True)
    took = time.perf_counter() - began
    line = next(x for x in done.stdout.splitlines() if x.startswith("Done in"))
    return took, line.split(". Journal")[0]


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-cli", dest="cli", action="store_false",
                        help="skip `runbook rollback` as a process (item 2: <= library + 0.3 s)")
    args = parser.parse_args()
    cli_walls: list[float] = []
    breakdown: dict[str, dict[str, list[float]]] = {}
    rows: dict[str, dict[str, list[float]]] = {}
    with DrillStack() as stack, httpx.Client(timeout=10, trust_env=False) as http:
        for round_no in range(args.rounds):
            for running in (True, False):
                kind = "running" if running else "stopped"
                row = rows.setdefault(kind, {"floor": [], "library": [], "switched": []})
                parts = breakdown.setdefault(kind, {})
                env = arrange(stack, running=running)
                row["floor"].append(floor(env, http, running=running))
                undo_floor(stack, env, http, running=running)
                took, switched = library(env, parts)
                row["library"].append(took)
                row["switched"].append(switched)
                print(f"round {round_no + 1} {kind}: floor {row['floor'][-1]:.3f}s, library "
                      f"{took:.3f}s (switched at {switched:.3f}s)", flush=True)
            if args.cli:
                arrange(stack, running=True)
                took, line = cli(stack)
                cli_walls.append(took)
                print(f"round {round_no + 1} cli (running standby): wall {took:.3f}s; {line}",
                      flush=True)
    load = os.getloadavg()
    print(f"machine: {machine()}; load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    goals = {"running": 1.5, "stopped": 1.3}
    print(f"{'standby':<8} {'floor':>8} {'library':>8} {'ratio':>6} {'goal':>5}  "
          f"{'to switched':>11} {'ratio':>6}   (median of {args.rounds})")
    for kind, row in rows.items():
        f, lib, sw = med(row["floor"]), med(row["library"]), med(row["switched"])
        print(f"{kind:<8} {f:>7.3f}s {lib:>7.3f}s {lib / f:>5.2f}x {goals[kind]:>4}x  "
              f"{sw:>10.3f}s {sw / f:>5.2f}x")
    for kind, parts in breakdown.items():
        print(f"library, {kind} standby, median per part: " + ", ".join(
            f"{name} {med(values):.3f}s" for name, values in parts.items()))
    if STALE_AFTER_LOAD:
        print(f"note: {len(STALE_AFTER_LOAD)} GET(s) through the proxy right after POST /load "
              "returned were still answered by the old config")
    if cli_walls:
        lib = med(rows["running"]["library"])
        print(f"`runbook rollback --yes` (running standby): wall {med(cli_walls):.3f}s, library "
              f"{lib:.3f}s, CLI overhead {med(cli_walls) - lib:+.3f}s (goal <= +0.3 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
