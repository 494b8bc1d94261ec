"""The drain of the old slot under 64 keep-alive clients (issue 14 items 1 and 4, task 15d).

--watch: the model behind runbook.drain, observed: after a rollback that keeps the old slot
running, `ss` samples Caddy's front port and the old slot's port every few ms for WATCH
seconds and prints when each front connection seen at the commit closed (or stayed: the new
config's), and the last request pending on the old slot's port, relative to the commit.

Default: ROUNDS rollbacks alternating between a running and a stopped standby, each under the
load, with the drain as wired in (`--old`: today's criterion before this change, the slot's
port quiet for QUIET, no front view), printing 5xx, failures after one retry, raw resets per
switch and the drain's times. Loopback only; the load is bounded (bench_rollback.Load).

--h2c: Caddy also speaks cleartext HTTP/2 (the drill's `h2c` host shape) and each client keeps
one HTTP/2 connection, as a load balancer's pool does: Caddy never moves those to the new
config on a reload, so the old slot is left running for them (tests/test_h2c.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, summary
from bench_rollback import CLIENTS, Load

from runbook import bounded_http, deploy, docker, drain, rollback, slots, traffic
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot

WATCH = 7.0
SAMPLE = 0.005


def sample(env: Environment, old: Slot, stop: threading.Event,
           out: list[tuple[float, drain.Look]]) -> None:
    port, front = env.slot(old).port, slots.front_port(env)
    while not stop.is_set():
        seen = drain.read_sockets(port, front)
        if isinstance(seen, drain.Look):
            out.append((time.monotonic(), seen))
        time.sleep(SAMPLE)


def watch(env: Environment, stack: DrillStack) -> None:
    v2, v3 = VERSIONS["v2"].tag, VERSIONS["v3"].tag
    keep = env.with_(stop_old_slot=False)
    stack.reset()
    deploy.deploy(env, deploy.Options(version=v2))
    deploy.deploy(keep, deploy.Options(version=v3))
    old = traffic.serving_slot(env)
    looks: list[tuple[float, drain.Look]] = []
    stop = threading.Event()
    loads: list[tuple[float, float]] = []
    post = bounded_http.request

    def timed_post(method: str, url: str, **kw: Any) -> Any:
        sent = time.monotonic()
        try:
            return post(method, url, **kw)
        finally:
            if url.endswith("/load"):
                loads.append((sent, time.monotonic()))

    bounded_http.request = timed_post  # type: ignore[assignment]
    with Load(f"{env.caddy.proxy_url}/version") as load:
        sampler = threading.Thread(target=sample, args=(env, old, stop, looks))
        sampler.start()
        time.sleep(0.3)
        began = time.monotonic()
        result = rollback.rollback(keep)
        committed = time.monotonic()
        time.sleep(WATCH)
        stop.set()
        sampler.join()
    bounded_http.request = post  # type: ignore[assignment]
    steps = {o.name: o.duration_ms / 1000 for o in result.outcomes}
    load_sent, load_returned = loads[0]
    print(f"rollback 0..{committed - began:.3f}s; POST /load {load_sent - began:.3f}.."
          f"{load_returned - began:.3f}s; steps: "
          + ", ".join(f"{k} {v:.3f}" for k, v in steps.items()))
    print(f"load: {load.requests} requests, {load.errors_5xx} 5xx, {load.resets} resets, "
          f"{load.failures} failures after one retry")
    for label, mark in (("/load sent", load_sent), ("/load returned", load_returned),
                        ("the commit", committed)):
        _front(looks, mark, label)
    pending_at = [t - load_returned for t, s in looks
                  if any(c.request_pending for c in s.accepted)
                  or any(c.answer_pending for c in s.dialed)]
    moved = []
    before: dict[drain.Key, tuple[int, int]] = {}
    for t, s in looks:
        now = {c.key: (c.bytes_sent, c.bytes_received) for c in s.accepted}
        if any(before.get(k) not in (None, v) for k, v in now.items()):
            moved.append(t - load_returned)
        before = now
    print(f"old slot port {env.slot(old).port}: last pending request seen at "
          f"{max(pending_at) if pending_at else float('nan'):+.3f}s from /load's answer; last "
          f"byte moved at {max(moved) if moved else float('nan'):+.3f}s; connections at the "
          f"end: {len(looks[-1][1].accepted)} accepted, {len(looks[-1][1].dialed)} from Caddy")


def _front(looks: list[tuple[float, drain.Look]], mark: float, label: str) -> None:
    """When the front connections open at `mark` closed (the old config's close at once or
    after their answer; the new config's stay)."""
    committed = mark
    at_commit = next(s for t, s in looks if t >= committed)
    closed: dict[drain.Key, float] = {}
    last_seen: dict[drain.Key, float] = {}
    for t, s in looks:
        if t < committed:
            continue
        for key in at_commit.front:
            if key in s.front:
                last_seen[key] = t
            elif key not in closed:
                closed[key] = t
    stayed = [k for k in at_commit.front if k not in closed]
    times = sorted(v - committed for v in closed.values())
    print(f"front connections open at {label}: {len(at_commit.front)}; closed after: "
          f"{summary(times) if times else '-'}; still open {WATCH:g}s later: {len(stayed)}")


def round_drain(record_file: str | None, seen: list[drain.Drain]) -> tuple[drain.Drain | None,
                                                                             str]:
    """The drain this round's rollback made before stopping its old slot: among the drains
    seen during that rollback, the one its run record (this run's id) says the stop-old-slot
    step drained. `drains[-1]` printed an earlier round's drain when this rollback's stop step
    drained nothing (the slot already stopped, the step skipped or failed first). (None, why)
    when there was none."""
    try:
        record = json.loads(Path(str(record_file)).read_text())
    except (OSError, ValueError) as exc:
        return None, f"no drain known: the run record {record_file} is unreadable ({exc})"
    run_id = record.get("run_id", "?")
    step = next((s for s in record.get("steps", []) if s.get("name") == "stop-old-slot"), None)
    if step is None:
        return None, f"no drain in run {run_id} (no stop-old-slot step)"
    detail = step.get("detail") or {}
    said = detail.get("drained")
    found = next((d for d in seen if d.describe() == said), None) if said else None
    if found is not None:
        return found, ""
    if said:
        return None, f"no drain of this round matches run {run_id}'s record: {said}"
    why = detail.get("container") or detail.get("skipped_because") or step.get("error")
    return None, f"no drain in run {run_id} (stop-old-slot {step.get('status')}: {why})"


def rounds(env: Environment, stack: DrillStack, n: int, old_criterion: bool,
           h2c: bool = False) -> None:
    v2, v3 = VERSIONS["v2"].tag, VERSIONS["v3"].tag
    keep = env.with_(stop_old_slot=False)
    drains: list[drain.Drain] = []
    real = drain.wait_drained

    def wait(port: int, timeout: float = drain.DRAIN_TIMEOUT, **kw: Any) -> drain.Drain:
        if old_criterion:
            kw["front"] = None
        trace: list[tuple[float, int, int, int, int]] = []
        d = real(port, timeout, trace=trace, **kw)
        if recording and d.seconds > 1.0:
            print("    trace (s, open front, new-config front, pending at slot, pending from "
                  "Caddy): " + " ".join(f"{t:.2f}/{a}/{b}/{c}/{e}" for t, a, b, c, e in trace))
        if recording:
            drains.append(d)
        return d

    drain.wait_drained = wait  # type: ignore[assignment]
    recording = False  # the rollbacks' drains, not the deploys'
    loads = []
    walls = []
    stop_steps = []
    ours: list[drain.Drain] = []  # each round's own drain (round_drain), for the summary
    left_running: list[bool] = []  # the old slot, after the rollback (Docker's view)
    try:
        for i in range(n):
            stack.reset()
            deploy.deploy(env, deploy.Options(version=v2))
            deploy.deploy(keep if i % 2 == 0 else env, deploy.Options(version=v3))
            old = traffic.serving_slot(env)
            with Load(f"{env.caddy.proxy_url}/version", h2c=h2c) as load:
                began = time.monotonic()
                mark = len(drains)
                recording = True
                result = rollback.rollback(env)
                recording = False
                walls.append(time.monotonic() - began)
            loads.append(load)
            left_running.append(docker.inspect(env.slot(old).container).running)
            steps = {o.name: o.duration_ms / 1000 for o in result.outcomes}
            stop_steps.append(steps.get("stop-old-slot", float("nan")))
            d, none = round_drain(result.record_file, drains[mark:])
            if d is not None:
                ours.append(d)
            print(f"  round {i + 1} ({'running' if i % 2 == 0 else 'stopped'} standby): "
                  f"{load.requests} requests, {load.errors_5xx} 5xx, {load.resets} resets, "
                  f"{load.failures} failed, answered by {dict(load.slots)} (old: {old}, "
                  f"left running: {left_running[-1]}); "
                  + (none if d is None else
                     f"drain {d.seconds:.3f}s, {d.readings} readings, front "
                     f"done at {d.front_done_at}, last request at {d.last_request}, old "
                     f"listener left {d.listener_left_after} s after /load ({d.describe()})"),
                  flush=True)
    finally:
        drain.wait_drained = real  # type: ignore[assignment]
    label = "before (slot port quiet 0.5 s)" if old_criterion else "exact drain"
    resets = [x.resets for x in loads]
    print(f"{label}: {n} rollbacks (alternating running/stopped standby), {CLIENTS} keep-alive "
          f"clients: {sum(x.requests for x in loads)} requests, "
          f"{sum(x.errors_5xx for x in loads)} 5xx, {sum(x.failures for x in loads)} failures "
          f"after one retry, raw resets per switch {resets} (mean "
          f"{sum(resets) / n:.2f})")
    kinds: Counter[str] = Counter()
    for x in loads:
        kinds.update(x.kinds)
    print("  raw resets as the clients saw them: " + ("; ".join(
        f"{count}x {kind}" for kind, count in kinds.most_common()) or "none"))
    print(f"  old slot left running after the rollback (`docker inspect`): "
          f"{sum(left_running)}/{len(left_running)}")
    late = sum("not watched" in d.describe() for d in ours)
    print(f"  reloads whose front was not sorted (reading before /load late or unusable): "
          f"{late}/{len(ours)}")
    print(f"  drain wait: {summary([d.seconds for d in ours])}; stop-old-slot step: "
          f"{summary(stop_steps)}; rollback end to end: {summary(walls)}")
    print(f"  drained {sum(d.drained for d in ours)}/{len(ours)}; front observed "
          f"{sum(d.front_observed for d in ours)}; front connections watched "
          f"{summary([float(d.front_watched) for d in ours], unit='')}, closed "
          f"{summary([float(d.front_closed) for d in ours], unit='')}, new config's "
          f"{summary([float(d.front_kept) for d in ours], unit='')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--watch", action="store_true")
    parser.add_argument("--old", action="store_true", help="today's criterion (before)")
    parser.add_argument("--h2c", action="store_true",
                        help="Caddy also speaks cleartext HTTP/2 and the clients use it, each "
                             "on one kept connection (a load balancer's pool)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with DrillStack(shape="h2c" if args.h2c else "default") as stack:
        if args.watch:
            watch(stack.env, stack)
        else:
            rounds(stack.env, stack, args.rounds, args.old, args.h2c)


if __name__ == "__main__":
    main()
