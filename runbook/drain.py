"""Wait until the proxy has finished with a slot before that slot is stopped.

Caddy (2.6.2 measured) answers POST /load as soon as the new config runs; the old config's
in-flight requests keep going to the old upstream in the background (a 2-second request on the
old config completed with 200 well after /load had returned in 35-94 ms). Stopping the old
slot right after the switch cuts them: under 64 keep-alive clients, 134 of ~5000 requests got
a 502 over 5 rollbacks (Caddy's log: "read tcp ...->127.0.0.1:<old port>: connection reset by
peer").

Counting connections is not enough: Caddy keeps idle keep-alive connections to the old upstream
open for minutes, and under load the old config still hands requests it had already read from
its clients to the old upstream a few hundred ms later (seen: up to 0.72 s after /load
returned, 64 clients on 2 busy cores). So each connection on the slot's port is watched from
the kernel's own view (`ss -tin`, iproute2; no shell): the slot is drained when no request is
pending on any connection (data received after the last data sent: `lastrcv < lastsnd`) and no
byte has moved on any of them for `quiet` seconds. The sockets seen are the ones accepted on
the slot's port on this host (the app, or Docker's proxy in front of it), wherever Caddy runs.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

DRAIN_TIMEOUT = 10.0  # as long as `docker stop` itself waits for a graceful exit
QUIET = 0.5  # no byte moved for this long on any connection: the old config is done with it
FALLBACK_GRACE = 1.0  # where `ss` cannot tell, wait this long before stopping a slot
POLL = 0.03
_FIELD = re.compile(r"\b(lastsnd|lastrcv|bytes_sent|bytes_received):(\d+)")


@dataclass(frozen=True)
class Conn:
    """One established connection on the slot's port, as the kernel sees it."""

    peer: str
    last_sent_ms: int | None
    last_received_ms: int | None
    bytes_sent: int
    bytes_received: int = 0

    @property
    def request_pending(self) -> bool:
        """A request waits for its answer: data came in after the last data went out, or a
        connection got data and never answered (the kernel's times are whole milliseconds,
        so a request arriving in the same ms as the connection is only seen this way)."""
        if self.bytes_received and not self.bytes_sent:
            return True
        if self.last_received_ms is None:
            return False
        return self.last_sent_ms is None or self.last_received_ms < self.last_sent_ms


@dataclass(frozen=True)
class Drain:
    """How waiting for a slot's connections went."""

    port: int
    seconds: float
    busy: int | None  # connections still busy when the wait ended; None: not observable
    idle: int = 0  # idle keep-alive connections (harmless to cut)

    @property
    def drained(self) -> bool:
        return self.busy == 0

    def describe(self) -> str:
        if self.busy is None:
            return (f"connections on port {self.port} cannot be observed on this host (no "
                    "`ss`); not waited")
        if self.drained:
            return (f"no request in flight on port {self.port} after {self.seconds:.2f}s "
                    f"({self.idle} idle keep-alive connection(s))")
        return (f"{self.busy} connection(s) on port {self.port} still busy after "
                f"{self.seconds:.1f}s (long-lived, e.g. streaming): stopping anyway")


def connections(port: int) -> list[Conn] | None:
    """Established TCP connections accepted on `port`; None when `ss` cannot tell."""
    try:
        done = subprocess.run(["ss", "-H", "-t", "-i", "-n", "state", "established",
                               "(", "sport", "=", f":{port}", ")"],
                              capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return parse_ss(done.stdout)


def parse_ss(output: str) -> list[Conn]:
    """`ss -H -t -i -n state established` output: a socket line, then its info line."""
    out: list[Conn] = []
    peer: str | None = None
    for line in output.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            fields = line.split()
            peer = fields[-1] if fields else "?"
            continue
        values = {k: int(v) for k, v in _FIELD.findall(line)}
        out.append(Conn(peer or "?", values.get("lastsnd"), values.get("lastrcv"),
                        values.get("bytes_sent", 0), values.get("bytes_received", 0)))
        peer = None
    return out


def wait_drained(port: int, timeout: float = DRAIN_TIMEOUT, *, quiet: float = QUIET,
                 poll: float = POLL,
                 look: Callable[[int], list[Conn] | None] = connections) -> Drain:
    """Wait (at most `timeout`) until no request is pending on `port` and nothing has moved
    on it for `quiet` seconds."""
    began = time.monotonic()
    moved_at = began
    previous: dict[str, tuple[int, int]] = {}
    inbound: dict[str, bool] = {}  # per connection: was the last movement seen data coming in?
    while True:
        seen = look(port)
        now = time.monotonic()
        if seen is None:
            return Drain(port, now - began, None)
        counters = {c.peer: (c.bytes_sent, c.bytes_received) for c in seen}
        if any(previous.get(peer) != value for peer, value in counters.items()):
            moved_at = now
        for peer, (sent, received) in counters.items():
            before = previous.get(peer)
            if before is not None and received != before[1]:
                inbound[peer] = sent == before[0]  # only data in since the last look: pending
            elif before is not None and sent != before[0]:
                inbound[peer] = False
        pending = [c for c in seen if c.request_pending or inbound.get(c.peer)]
        busy = len(pending) if pending or now - moved_at < quiet else 0
        if (not pending and now - moved_at >= quiet) or now - began >= timeout:
            return Drain(port, now - began, busy if now - began >= timeout else 0,
                         idle=len(seen) - busy)
        previous = counters
        time.sleep(min(poll, max(0.0, timeout - (now - began))))
