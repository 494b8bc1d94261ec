"""What the health gate says on the on-call's terminal while a slot comes up.

Behind docker-proxy, a slot whose app does not listen yet is accepted and dropped: the reason
alternates between "connection reset by peer" and "closed without response" from one 20 ms
probe to the next. A line per change of reason put a dozen lines in 0.3 s on the terminal
(found by a review that built a host by hand); the gate says a line when the status changes or
every NOTE_EVERY seconds.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from runbook import health, slots
from runbook.environment import Environment, HealthConfig, Slot, from_mapping
from runbook.plan import StepContext
from tests.drill_checks import closed_port

pytestmark = pytest.mark.any_shape


@pytest.fixture
def dropping_listener() -> Iterator[int]:
    """Accept every connection and drop it at once, alternately by RST and by FIN: what a
    published port answers while the container's app is not listening yet."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        reset = True
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            if reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                try:  # let the request arrive, then close without an answer
                    conn.settimeout(0.2)
                    conn.recv(4096)
                except OSError:
                    pass
            conn.close()
            reset = not reset

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        srv.close()


@pytest.fixture
def running_container() -> Iterator[str]:
    """A real running container for the gate's "is it still running" check to find."""
    name = f"test-gate-notes-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "togather-drill-caddy:2",
                    "sleep", "60"], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def test_a_slot_dropped_alternately_by_reset_and_close_gets_a_line_per_half_second(
        dropping_listener: int, running_container: str) -> None:
    env: Environment = from_mapping({
        "name": "staging",
        "slots": {"blue": {"container": running_container, "service": "togather-blue",
                           "port": dropping_listener},
                  "green": {"container": "togather-server-green", "service": "togather-green",
                            "port": closed_port()}},
    }, Path("/tmp/test-env.toml"))
    env = env.with_(health=HealthConfig(path="/health", timeout=1.2, interval=0.25,
                                        max_interval=2.0, request_timeout=0.5))
    # the situation itself: consecutive probes get different reasons
    seen = {health.probe(env.slot(Slot.BLUE), "/health", 0.5).reason() for _ in range(4)}
    assert len(seen) >= 2, seen
    said: list[str] = []
    step = slots.gate_step(env, Slot.BLUE, force=False, expected_version=None)
    began = time.monotonic()
    with pytest.raises(health.HealthGateError):
        assert step.run is not None
        step.run(StepContext(step=step, env=env, say=said.append))
    took = time.monotonic() - began
    attempts = [line for line in said if line.startswith("attempt ")]
    assert took >= 1.0, took
    assert all("unreachable" in line for line in attempts), attempts
    # a line at the start, then one per NOTE_EVERY (0.5 s): 3 in 1.2 s, never one per probe
    assert 1 <= len(attempts) <= int(took / slots.NOTE_EVERY) + 1, attempts


def test_the_plan_says_the_gate_polls_fast_first_as_it_does() -> None:
    """The plan said "backoff 0.25s -> 2s" while the gate asked every 20 ms for its first 3 s
    (found by review: the terminal's attempt numbers did not match the plan)."""
    env = from_mapping({
        "name": "staging",
        "slots": {"blue": {"container": "togather-server-blue", "service": "togather-blue",
                           "port": closed_port()},
                  "green": {"container": "togather-server-green", "service": "togather-green",
                            "port": closed_port()}},
    }, Path("/tmp/test-env.toml")).with_(
        health=HealthConfig(path="/health", timeout=30.0, interval=0.25, max_interval=2.0,
                            request_timeout=0.5))
    step = slots.gate_step(env, Slot.BLUE, force=False, expected_version=None)
    assert step.details["timeout"].endswith(
        "asked every 0.02s for the first 3s, then backoff 0.25s -> 2s"), step.details
