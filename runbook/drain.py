"""Wait until the proxy has finished with a slot before that slot is stopped.

Caddy (2.6.2) answers POST /load as soon as the new config runs; the old config's servers are
shut down in the background (`App.Stop` starts `http.Server.Shutdown` in a goroutine and
returns). Shutdown closes the old listener (each config has its own SO_REUSEPORT socket) and
its idle connections at once; a connection with a request in progress is served - proxied to
the OLD upstream - and then closed; a connection accepted with no request read yet (StateNew)
is kept up to 5-6 s and a request that comes on it is still served by the old config (seen:
forwarded 0.72 s after /load). Stopping the old slot while any of that is pending cuts it:
under 64 keep-alive clients, 134 of ~5000 requests got a 502 over 5 rollbacks.

So the old config is done with the old slot exactly when (a) every client connection its
server owned is closed and (b) no request is pending on the slot's port. Both are read from
the kernel (`ss -tien`, iproute2, no shell):

(a) the front: every established connection on Caddy's listening port seen when the wait
    starts (after the switch was verified, so after the old listener closed) is watched by
    identity (4-tuple and inode) until it closes, or until it shows it is the new config's: an
    old connection closes right after its one last answer (Go disables keep-alive in
    shutdown) and reads no request after it, so one that got a request after an answer,
    outlived an answer by SETTLE, or stays idle after answers for SETTLE, is not the old
    config's (were it, its one request is answered; a stream still running shows as bytes
    moving on the slot's port, which must be quiet for SETTLE). One that never carried a
    request is waited for (it may still bring a request to the old config; Go closes such a
    connection after 5-6 s, so a silent pre-connect can hold the drain that long).
    Where the switch itself was watched (`before_reload`/`after_reload` around Caddy's
    reload), the front is sorted exactly: a connection open before the reload is the old
    config's (it must close); one first seen after the old config's listening socket left
    (2.6 gives each config its own SO_REUSEPORT socket) is the new config's (not watched);
    only those accepted in between need the evidence above.
(b) the old slot: no request pending on its port (data received after the last data sent),
    from the accepted side (the app or Docker's proxy, `sport`) and from Caddy's own client
    sockets where Caddy runs in this network namespace (`dport`). Only the slot's sockets:
    where the addresses Caddy dials the slot at are known (`peers`, resolved by the caller
    from the upstreams Caddy ran), a client socket counts only with one of them as its peer,
    and an accepted one only with one of them, or any address where the slot's port listens
    on 0.0.0.0/:: (Docker's proxy), as its local address. By port number alone, this host's
    connection to another service on that port number (10.0.0.5:8081, a listener on
    127.0.0.2) held the drain to its timeout, and on an h2c front left the old slot running.
    Where they are not known (a dial by any name but localhost, a container's name too:
    Caddy's resolver may answer otherwise than ours; a run that did not read the config the
    switch replaced), every socket on the port counts, as before: slower, never unsafe.

"Nothing seen" is only "nothing there" where the port's listening socket is visible here;
otherwise (Docker publishing with DNAT instead of its proxy, Caddy in another namespace) that
side cannot be observed and is waited for: without the front, the slot's port must be quiet
(no byte moved) for QUIET, and the wait lasts PRECONNECT, the life of a connection the old
config accepted with no request yet (silent, it moves no byte, and a request it brings up to
then is still forwarded to the old slot); without the slot's port, the wait lasts at least
FALLBACK_GRACE. Never fail open: an unobservable side is waited for, not assumed done.
A reading that fails (`ss` times out or exits non-zero, or prints what cannot be parsed) is no
evidence of quiet: before any good reading nothing is observable (PRECONNECT, as without the
front); after one, the last good reading stands (it was not drained) and is read again until
the timeout.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from runbook import procs

DRAIN_TIMEOUT = 10.0  # the default of [rollback] drain_timeout_seconds (Environment)
QUIET = 0.5  # front unobservable: no byte moved this long on the slot's port
SETTLE = 0.1  # a front connection idle after answers this long is not the old config's
FALLBACK_GRACE = 1.0  # the slot's port unobservable: wait at least this long
# the front unobservable: wait at least this long. Go closes a connection still waiting for its
# first request 5 s after it was made (whole seconds, checked every <= 0.5 s while shutting
# down), and every such connection of the old config was made before the wait began
PRECONNECT = 6.5
POLL = 0.02
_FIELD = re.compile(r"\b(lastsnd|lastrcv|bytes_sent|bytes_received):(\d+)")
_INODE = re.compile(r"\bino:(\d+)")

Key = tuple[str, str, int]  # local address, peer address, socket inode


def _port(address: str) -> int | None:
    head, _, tail = address.rpartition(":")
    return int(tail) if head and tail.isdigit() else None


@functools.lru_cache(maxsize=4096)  # each socket of each reading
def normal_host(host: str) -> str:
    """A host as `ss` and a dial are compared: no brackets, no zone or interface (`%lo`),
    lower-case, an address in its canonical form (as `ss` prints it), an IPv4-mapped IPv6
    address (a dual-stack socket's, or a dial Go makes over IPv4) as its IPv4 address in
    whatever form it is written (found by review: `[::ffff:7f00:1]` stayed as written while
    Caddy's socket to it reads 127.0.0.1, so the drain dropped it)."""
    host = host.split("%")[0].strip("[]").lower()  # ss: `[fe80::1]%eth0`; a dial: `fe80::1%eth0`
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a name, or ss's `*`
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _host(address: str) -> str:
    """The host of an `ss` address (`127.0.0.1:8081`, `[::1]:8081`, `*:8081`)."""
    return normal_host(address.rpartition(":")[0] if _port(address) is not None else address)


_ANY = frozenset({"*", "::"})  # a listener on every address (`*` is ss's dual-stack one)
_ANY_V4 = "0.0.0.0"


@dataclass(frozen=True)
class Conn:
    """One established connection, as the kernel sees it from one end."""

    peer: str
    last_sent_ms: int | None
    last_received_ms: int | None
    bytes_sent: int
    bytes_received: int = 0
    local: str = "?"
    inode: int = 0

    @property
    def key(self) -> Key:
        return (self.local, self.peer, self.inode)

    @property
    def request_pending(self) -> bool:
        """Server end: a request waits for its answer: data came in after the last data went
        out, or a connection got data and never answered (the kernel's times are whole
        milliseconds, so a request arriving in the same ms as the connection is only seen
        this way)."""
        if self.bytes_received and not self.bytes_sent:
            return True
        if self.last_received_ms is None:
            return False
        return self.last_sent_ms is None or self.last_received_ms < self.last_sent_ms

    @property
    def answer_pending(self) -> bool:
        """Client end (Caddy's socket to the slot): a request went out, its answer has not
        fully come back (the mirror of `request_pending`)."""
        if self.bytes_sent and not self.bytes_received:
            return True
        if self.last_sent_ms is None:
            return False
        return self.last_received_ms is None or self.last_sent_ms < self.last_received_ms


@dataclass(frozen=True)
class Drain:
    """How waiting for a slot's connections went."""

    port: int
    seconds: float
    busy: int | None  # connections still busy when the wait ended; None: nothing observable
    idle: int = 0  # idle keep-alive connections on the slot's port (harmless to cut)
    front_port: int | None = None
    front_observed: bool = False  # Caddy's listening port visible here (criterion a)
    # Caddy also serves the app on ports other than front_port (`:443` beside `proxy_url`'s
    # 80): their connections are not watched, so the wait lasts at least PRECONNECT
    other_fronts: bool = False
    slot_observed: bool = True  # the slot's listening port, or Caddy's sockets to it (b)
    front_watched: int = 0  # front connections seen when the wait started
    front_closed: int = 0  # of them, closed during the wait
    front_kept: int = 0  # of them, shown to be the new config's
    front_new: int = 0  # accepted after the old config's listener left (not watched)
    switch_watched: bool = False  # the reload was watched: before/after sets known
    unwatched: str = "no reload of this run's was seen"  # why not, when not (unwatched_why)
    listener_left_after: float | None = None  # seconds from /load's answer
    last_request: float | None = None  # seconds into the wait of the last pending request seen
    front_done_at: float | None = None  # seconds into the wait when (a) first held
    readings: int = 0  # `ss` readings taken
    kept_for_h2c: bool = False  # not drained, and Caddy holds h2c connections: left running
    failed_readings: int = 0  # readings that failed (`ss` failed, or output unreadable)
    unread: str | None = None  # why the last reading failed, when the wait ended on one
    last_good: float | None = None  # seconds into the wait of the last good reading
    minimum: float = 0.0  # the least the wait had to last for what cannot be seen (PRECONNECT)
    pending: int = 0  # requests pending on the slot's port at the last reading
    # the addresses Caddy dials the slot at, whose sockets alone were counted (None: not
    # known, every socket on the port was)
    peers: tuple[str, ...] | None = None

    @property
    def front_open(self) -> int:
        """Watched front connections neither closed nor shown to be the new config's."""
        return self.front_watched - self.front_closed - self.front_kept

    @property
    def drained(self) -> bool:
        return self.busy == 0

    @property
    def cut_short(self) -> bool:
        """The minimum wait for connections nobody can see (Caddy's other ports, or its port
        not observable) was ended by the timeout, not waited out."""
        unseen = self.other_fronts or not self.front_observed
        return unseen and self.minimum > 0 and self.seconds < self.minimum

    @property
    def how(self) -> str:
        """Which criterion decided, for the plan and the journal."""
        if self.busy is None:
            return f"nothing observable: fixed grace {PRECONNECT:g}s"
        front = (f"front port {self.front_port}: connections closed" if self.front_observed
                 else f"front not observable: port {self.port} quiet {QUIET:g}s, at least "
                      f"{PRECONNECT:g}s")
        if self.other_fronts and self.front_observed:
            front += f"; Caddy's other ports not watched: at least {PRECONNECT:g}s"
        slot = (f"no request pending on port {self.port}" if self.slot_observed
                else f"port {self.port} not observable: at least {FALLBACK_GRACE:g}s")
        if self.slot_observed and self.peers:
            slot += f" (at {', '.join(self.peers)}, where Caddy dials it)"
        return f"{front}; {slot}"

    def describe(self) -> str:
        if self.busy is None:
            tries = (f" ({self.failed_readings} readings, none answered)"
                     if self.failed_readings > 1 else "")
            return (f"connections on port {self.port} cannot be observed: "
                    f"{self.unread or '`ss` gave no reading'}{tries}; waited {self.seconds:.2f}s")
        front = (f"; front: {self.front_watched} connection(s) watched, {self.front_closed} "
                 f"closed, {self.front_kept} shown to be the new config's, {self.front_new} "
                 f"opened after the old listener left" if self.front_observed else "")
        if self.front_observed and not self.switch_watched:
            front += (f" (the reload itself was not watched: {self.unwatched}; every connection"
                      " needed evidence)")
        if self.unread is not None:
            front += (f"; readings failed from {self.last_good or 0.0:.2f}s on ({self.unread};"
                      f" {self.failed_readings} failed in all): the last good one, not drained, "
                      "was waited on until the timeout")
        elif self.failed_readings:
            front += f"; {self.failed_readings} failed reading(s) retried"
        if self.drained and self.cut_short:
            # nothing seen busy, but the cap ended the wait for what cannot be seen
            return (f"nothing seen busy after {self.seconds:.2f}s, the drain's cap "
                    f"(drain_timeout_seconds), short of the {self.minimum:g}s a connection "
                    "Caddy's previous config accepted can wait for its first request: such a "
                    f"connection may still get an error ({self.how}{front}; {self.idle} idle "
                    f"keep-alive connection(s) on port {self.port})")
        if self.drained:
            return (f"drained after {self.seconds:.2f}s ({self.how}{front}; {self.idle} idle "
                    f"keep-alive connection(s) on port {self.port})")
        if self.kept_for_h2c:
            return (f"{self.holding()} after {self.seconds:.1f}s (waiting for: {self.how}"
                    f"{front}); Caddy's previous config keeps its cleartext HTTP/2 (h2c) "
                    "connections: left running")
        kind = "" if self.unread is not None else "; long-lived, e.g. streaming"
        return (f"{self.holding()} after {self.seconds:.1f}s (waiting for: {self.how}"
                f"{front}{kind}): stopping anyway")

    def holding(self) -> str:
        """What held the drain, as `ss` last showed it: its busy count added requests to
        connections ("119 connection(s)" for 64 open and 55 pending: review)."""
        seen = []
        if self.front_open > 0:
            seen.append(f"{self.front_open} connection(s) of Caddy's previous config still open")
        if self.pending > 0:
            seen.append(f"{self.pending} request(s) still pending on port {self.port}")
        return " and ".join(seen) or f"bytes still moving on port {self.port}"


@dataclass(frozen=True)
class Look:
    """One `ss` reading: Caddy's accepted connections, and both ends on the slot's port."""

    front: dict[Key, Conn]
    accepted: list[Conn]  # sport = the slot's port: the app, or Docker's proxy for it
    dialed: list[Conn]  # dport = the slot's port: Caddy's own client sockets, if visible here


class Unparsable(ValueError):
    """`ss` output not in the format the drain reads."""


@dataclass(frozen=True)
class Unread:
    """A reading that failed: why, in words (`ss` missing, timed out, exited non-zero, or its
    output could not be read). `lasting`: it will likely fail the same way again (no `ss`, an
    error exit, e.g. an iproute2 too old for an option, a format not read here); a time-out
    (a loaded host) may not, so it is retried."""

    why: str
    lasting: bool = True


SS_TIMEOUT = 5.0


def _run_ss(args: list[str]) -> str | Unread:
    try:
        done = subprocess.run(["ss", "-H", "-t", "-n", *args], capture_output=True, text=True,
                              timeout=SS_TIMEOUT, check=False, preexec_fn=procs.outlives_hangup)
    except FileNotFoundError:
        return Unread("no `ss` (iproute2) on this host")
    except OSError as exc:
        return Unread(f"`ss` could not run ({exc.strerror or exc})")
    except subprocess.TimeoutExpired:
        return Unread(f"`ss` timed out after {SS_TIMEOUT:g}s", lasting=False)
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()
        return Unread(f"`ss` exited {done.returncode}" + (f": {tail[-1][:120]}" if tail else ""))
    return done.stdout


def _ss(args: list[str]) -> str | None:
    out = _run_ss(args)
    return None if isinstance(out, Unread) else out


def _filter(ports: Iterable[int], *, dport: int | None = None) -> list[str]:
    terms: list[str] = []
    for port in ports:
        terms += (["or"] if terms else []) + ["sport", "=", f":{port}"]
    if dport is not None:
        terms += ["or", "dport", "=", f":{dport}"]
    return ["(", *terms, ")"]


def listening(ports: Iterable[int]) -> dict[int, frozenset[str]] | None:
    """Which of `ports` have a listening socket visible in this network namespace, each with
    the local addresses it listens on (`0.0.0.0`, `::` or `*`: every address)."""
    wanted = set(ports)
    out = _ss(["state", "listening", *_filter(sorted(wanted))])
    if out is None:
        return None
    return {p: a for p, a in parse_listeners(out).items() if p in wanted}


def parse_listening(output: str) -> set[int]:
    """`ss -H -t -n state listening` output: the local ports."""
    return set(parse_listeners(output))


def parse_listeners(output: str) -> dict[int, frozenset[str]]:
    """`ss -H -t -n state listening` output: each local port's listening addresses."""
    found: dict[int, set[str]] = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 3 and (port := _port(fields[2])) is not None:
            found.setdefault(port, set()).add(_host(fields[2]))
    return {p: frozenset(a) for p, a in found.items()}


def narrow(seen: Look, peers: frozenset[str] | None,
           binds: Collection[str] | None = None) -> Look:
    """Only the sockets that can be the slot's: Caddy's client sockets with one of `peers`
    (the addresses Caddy dials the slot at) as their peer; accepted ones with one of them as
    their local address, or any, where the slot's port listens on every address (`binds`,
    its listening addresses; None: not read, so taken as every address). `peers` None: not
    known (or none), so every socket on the port, as `ss` filtered them (fail closed)."""
    if not peers:
        return seen
    every = binds is None or bool(_ANY & set(binds))
    every_v4 = every or _ANY_V4 in (binds or ())

    def accepted(c: Conn) -> bool:
        host = _host(c.local)
        return every or host in peers or (every_v4 and ":" not in host)

    return Look(seen.front, [c for c in seen.accepted if accepted(c)],
                [c for c in seen.dialed if _host(c.peer) in peers])


def read_sockets(slot_port: int, front_port: int | None) -> Look | Unread:
    """One reading of both sides (one `ss` process); Unread when `ss` cannot tell."""
    ports = [slot_port] + ([front_port] if front_port is not None else [])
    out = _run_ss(["-i", "-e", "state", "established", *_filter(ports, dport=slot_port)])
    return out if isinstance(out, Unread) else look_at(out, slot_port, front_port)


def look_at(output: str, slot_port: int, front_port: int | None) -> Look | Unread:
    """One `ss -i -e` output as a reading; Unread when it is not in the expected format."""
    try:
        return split(parse_ss(output), slot_port, front_port)
    except Unparsable as exc:
        return Unread(f"`ss` output in an unexpected format ({exc})")


def split(conns: Iterable[Conn], slot_port: int, front_port: int | None) -> Look:
    front: dict[Key, Conn] = {}
    accepted: list[Conn] = []
    dialed: list[Conn] = []
    for c in conns:
        local, peer = _port(c.local), _port(c.peer)
        if front_port is not None and local == front_port:
            front[c.key] = c
        elif local == slot_port:
            accepted.append(c)
        elif peer == slot_port:
            dialed.append(c)
    return Look(front, accepted, dialed)


def connections(port: int) -> list[Conn] | None:
    """Established TCP connections accepted on `port`; None when `ss` cannot tell."""
    out = _ss(["-i", "-e", "state", "established", *_filter([port])])
    try:
        return None if out is None else parse_ss(out)
    except Unparsable:
        return None


def parse_ss(output: str) -> list[Conn]:
    """`ss -H -t -i -n [-e] state established` output: a socket line (Recv-Q, Send-Q, local,
    peer, then -e's extras), then its info line. Anything else (a State column, the info on
    the socket line, a socket line without its info line) raises Unparsable: a reading that
    cannot be read is no evidence that the slot is quiet."""
    out: list[Conn] = []
    head: list[str] | None = None
    for line in output.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            if head is not None:
                raise Unparsable(f"a socket line with no info line: {' '.join(head)[:80]!r}")
            fields = line.split()
            if (len(fields) < 4 or not fields[0].isdigit() or not fields[1].isdigit()
                    or _port(fields[2]) is None or _port(fields[3]) is None):
                raise Unparsable(f"a socket line in an unexpected format: {line.strip()[:80]!r}")
            if _FIELD.search(line):
                raise Unparsable(f"the info on the socket line: {line.strip()[:80]!r}")
            head = fields
            continue
        if head is None:
            raise Unparsable(f"an info line with no socket line before it: {line.strip()[:80]!r}")
        values = {k: int(v) for k, v in _FIELD.findall(line)}
        sent, received = values.get("bytes_sent", 0), values.get("bytes_received", 0)
        # ss prints lastsnd/lastrcv only when nonzero (iproute2 ss.c): missing after bytes
        # moved is 0 ms ago (this very millisecond), not "never"
        out.append(Conn(head[3], values.get("lastsnd", 0 if sent else None),
                        values.get("lastrcv", 0 if received else None), sent, received,
                        local=head[2], inode=_inode(head[4:])))
        head = None
    if head is not None:
        raise Unparsable(f"a socket line with no info line: {' '.join(head)[:80]!r}")
    return out


def _inode(extras: list[str]) -> int:
    found = _INODE.search(" ".join(extras))
    return int(found.group(1)) if found else 0


@dataclass
class _Front:
    """What one watched front connection has shown since the wait started."""

    first: Conn
    received_at_answer: int | None = None  # bytes_received when an answer was first seen
    answered_at: float | None = None  # when an answer was first seen going out
    idle_since: float | None = None
    idle_counters: tuple[int, int] = (-1, -1)
    kept: bool = False  # shown to be the new config's
    old: bool = False  # open before the reload: the old config's, released only by its close

    def update(self, c: Conn, now: float, settle: float) -> None:
        if self.kept or self.old:
            return
        if self.received_at_answer is None and c.bytes_sent > self.first.bytes_sent:
            self.received_at_answer, self.answered_at = c.bytes_received, now
        elif self.received_at_answer is not None and (
                c.bytes_received > self.received_at_answer
                or (self.answered_at is not None and now - self.answered_at >= settle)):
            # a request came after an answer went out, or the connection outlived an answer
            # by SETTLE: the old config closes a connection right after its last answer (and
            # reads no request after it); were it the old one's after all, its one request is
            # answered (a stream still running shows on the slot's port: see wait_drained)
            self.kept = True
            return
        counters = (c.bytes_sent, c.bytes_received)
        if c.bytes_sent and not c.request_pending:
            if counters != self.idle_counters:
                self.idle_counters, self.idle_since = counters, now
            elif self.idle_since is not None and now - self.idle_since >= settle:
                self.kept = True  # idle after answers: the old server closed its idle ones
        else:
            self.idle_counters, self.idle_since = (-1, -1), None


@dataclass
class _Watch:
    """The state of one wait."""

    front: dict[Key, _Front] = field(default_factory=dict)
    closed: int = 0
    new: int = 0  # accepted after the old listener left: not watched
    previous: dict[Key, tuple[int, int]] = field(default_factory=dict)
    inbound: dict[Key, bool] = field(default_factory=dict)


def _slot_pending(seen: Look, watch: _Watch) -> tuple[int, int]:
    """Requests pending on the slot's port, from either end; the counters' movement between
    two looks also counts (a request arriving in the same kernel millisecond as its
    connection, or as the last answer, has no telling timestamps)."""
    flows: dict[Key, tuple[int, int]] = {}  # (request bytes, answer bytes) per connection
    for c in seen.accepted:
        flows[c.key] = (c.bytes_received, c.bytes_sent)
    for c in seen.dialed:
        flows[c.key] = (c.bytes_sent, c.bytes_received)
    for key, (request, answer) in flows.items():
        before = watch.previous.get(key)
        if before is not None and answer != before[1]:
            watch.inbound[key] = False
        elif before is not None and request != before[0]:
            watch.inbound[key] = True  # only request bytes since the last look
    watch.previous = flows
    accepted = [c for c in seen.accepted if c.request_pending or watch.inbound.get(c.key)]
    dialed = [c for c in seen.dialed if c.answer_pending or watch.inbound.get(c.key)]
    return len(accepted), len(dialed)


CLOSE_WATCH = 1.0  # how long after /load the old listening socket is looked for
SWITCH_MAX_AGE = 60.0  # a watched reload older than this is not used to sort the front


@dataclass
class Switch:
    """Caddy's front port around one reload: the connections there before it, and the first
    reading after the old config's listening socket(s) left.

    The reading before runs in a thread started just before /load is sent (off the
    rollback's path), and counts only if it was complete when /load went out (`seal`): one
    `ss` dump is not atomic, so a reading still running while Caddy loads can list a
    connection the new config accepted among the "before" ones, which then holds the drain
    to its timeout (seen: 1 rollback in 10 under 64 clients waited the full 10 s). A late
    reading is dropped and the front is not sorted: every connection needs evidence, slower,
    never unsafe."""

    front: int
    listeners: frozenset[int] = frozenset()  # listening socket inodes before the reload
    before: frozenset[Key] = frozenset()
    loaded_at: float | None = None
    at_close: frozenset[Key] | None = None  # None: the old listener was not seen leaving
    closed_after: float | None = None  # seconds from /load's answer to that reading
    late: bool = False  # the reading before was not complete when /load went out: dropped
    watch_failed: bool = False  # a reading after /load failed: the close was not looked for
    reading: threading.Thread | None = field(default=None, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)
    _sealed: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def read_before(self, read: Callable[[int], tuple[set[int], set[Key]] | None]) -> None:
        seen = read(self.front)
        with self._lock:
            if seen is not None and not self._sealed:
                self.listeners, self.before = frozenset(seen[0]), frozenset(seen[1])

    def seal(self, wait: float = 0.0) -> None:
        """/load is about to go out: a reading not complete within `wait` no longer counts."""
        if wait > 0 and self.reading is not None:
            self.reading.join(wait)
        with self._lock:
            if not self._sealed and self.reading is not None and self.reading.is_alive():
                self.late = True
            self._sealed = True

    def watch_close(self, read: Callable[[int], tuple[set[int], set[Key]] | None],
                    clock: Callable[[], float] = time.monotonic) -> None:
        """Poll (at most CLOSE_WATCH) until none of the old listening sockets is left."""
        assert self.loaded_at is not None
        if self.reading is not None:
            self.reading.join(CLOSE_WATCH)
        if not self.listeners:  # Caddy's port not visible here: nothing to sort by
            return
        while clock() - self.loaded_at < CLOSE_WATCH:
            seen = read(self.front)
            if seen is None:
                self.watch_failed = True
                return
            listeners, established = seen
            if listeners and not listeners & self.listeners:
                self.at_close = frozenset(established)
                self.closed_after = clock() - self.loaded_at
                return
            time.sleep(0.01)  # each reading is an `ss` process: keep the cores for the run


_switches: dict[int, Switch] = {}
_switches_lock = threading.Lock()


def unwatched_why(switch: Switch | None) -> str:
    """Why a drain's front was not sorted by the reload ("" when it was): the h2c notice
    said "it finishes an interrupted one" for every case, and in CI a plain rollback on a
    loaded host was left running with those words."""
    if switch is None:
        return ("this run watched no reload of Caddy's on that port (it finishes an interrupted"
                f" one, or its reload is over {SWITCH_MAX_AGE:g}s old)")
    if switch.at_close is not None:
        return ""
    if switch.late:
        return ("the reading of Caddy's connections before the reload was not complete when "
                "the reload went out (a loaded host)")
    if not switch.listeners:
        return "Caddy's listening socket was not seen before the reload"
    if switch.watch_failed:
        return "a reading of Caddy's port failed while the reload was watched"
    return (f"Caddy's old listening socket was not seen leaving within {CLOSE_WATCH:g}s of "
            "the reload")


def front_port(proxy_url: str) -> int | None:
    """Caddy's listening port for the site, from the URL verification goes to."""
    url = urlsplit(proxy_url)
    try:
        return url.port or {"http": 80, "https": 443}.get(url.scheme)
    except ValueError:
        return None


def front_sockets(front: int) -> tuple[set[int], set[Key]] | None:
    """Listening socket inodes and established connections on Caddy's port (one `ss`)."""
    out = _ss(["-a", "-e", *_filter([front])])
    return None if out is None else parse_states(out, front)


def parse_states(output: str, port: int) -> tuple[set[int], set[Key]]:
    """`ss -H -t -n -e` output with its State column: listening inodes, established keys."""
    listeners: set[int] = set()
    established: set[Key] = set()
    for line in output.splitlines():
        fields = line.split()
        if len(fields) < 5 or _port(fields[3]) != port:
            continue
        inode = _INODE.search(" ".join(fields[5:]))
        number = int(inode.group(1)) if inode else 0
        if fields[0] == "LISTEN":
            listeners.add(number)
        elif fields[0] == "ESTAB":
            established.add((fields[3], fields[4], number))
    return listeners, established


def before_reload(proxy_url: str) -> Switch | None:
    """Start reading Caddy's front port, right before a reload (returns at once)."""
    front = front_port(proxy_url)
    if front is None:
        return None
    switch = Switch(front)
    switch.reading = threading.Thread(target=switch.read_before, args=(front_sockets,),
                                      name="drain-before-reload", daemon=True)
    switch.reading.start()
    return switch


SEAL_WAIT = 0.05  # what the commit waits for the reading before, at most
# ... where Caddy takes h2c on the front: a reading dropped there leaves the old slot running
# (a hand stop, and every deploy refused until then), and one `ss` took 0.01-2.2 s on a
# loaded 2-core host (review: 2 plain rollbacks of 6 left it running with 3 CPU hogs)
H2C_SEAL_WAIT = 2.5


def sending_reload(switch: Switch | None, wait: float = SEAL_WAIT) -> None:
    """The reload is about to be sent: only a reading complete by now (or within `wait`,
    ~10-30 ms is one `ss` here) sorts the front; the sorted front ends a drain ~0.3 s sooner
    under load (bench/bench_drain.py), worth the wait before the commit (traffic has not
    moved yet); on an h2c front it decides whether the old slot can be stopped at all."""
    if switch is not None:
        switch.seal(wait)


def after_reload(switch: Switch | None) -> None:
    """Caddy answered the reload: watch for its old listener leaving, in the background (off
    the rollback's path); the drain of the old slot picks the record up."""
    if switch is None:
        return
    switch.seal()  # a caller that did not say when it sent: sealed now at the latest
    switch.loaded_at = time.monotonic()
    switch.thread = threading.Thread(target=switch.watch_close, args=(front_sockets,),
                                     name="drain-switch-watch", daemon=True)
    switch.thread.start()
    with _switches_lock:
        _switches[switch.front] = switch


def last_switch(front: int) -> Switch | None:
    """The latest reload watched on `front`, taken (each record serves one drain)."""
    with _switches_lock:
        switch = _switches.pop(front, None)
    fresh = switch is not None and switch.loaded_at is not None \
        and time.monotonic() - switch.loaded_at <= SWITCH_MAX_AGE
    return switch if fresh else None


def wait_drained(port: int, timeout: float = DRAIN_TIMEOUT, *, front: int | None = None,
                 quiet: float = QUIET, settle: float = SETTLE, poll: float = POLL,
                 preconnect: float = PRECONNECT, other_fronts: bool = False,
                 read: Callable[[int, int | None], Look | Unread | None] = read_sockets,
                 visible: Callable[[Iterable[int]], Collection[int] | None] = listening,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 trace: list[tuple[float, int, int, int, int]] | None = None,
                 switch: Switch | None = None,
                 look: Callable[[int], list[Conn] | None] | None = None,
                 peers: frozenset[str] | None = None) -> Drain:
    """Wait (at most `timeout`) until the old config is done with the slot on `port`: every
    connection on Caddy's `front` port seen now has closed or shown it is the new config's,
    and no request is pending on `port` (module docstring; unobservable sides fail closed).
    `peers`: the addresses Caddy dials the slot at (normal_host), whose sockets alone are
    the slot's (`narrow`); None: not known, every socket on `port` is.

    A reading that fails for good (no `ss`, an error exit, output it cannot read) before any
    good one is the fixed grace, as with nothing observable; a time-out (a loaded host) is
    retried until the timeout, and if no reading ever comes, nothing was observed (busy None:
    never "drained", never a connection it did not see). After a good reading, the last one
    (not drained, or the wait would have ended) stands and is read again until the timeout: a
    failed reading is never evidence of quiet."""
    if look is not None:  # the slot's accepted connections alone, from the caller (tests)
        given = look

        def read(port: int, front: int | None) -> Look | None:
            conns = given(port)
            return None if conns is None else Look({}, conns, [])

        def visible(ports: Iterable[int]) -> set[int] | None:
            return set(ports)
    began = clock()
    if switch is None and front is not None and read is read_sockets:
        switch = last_switch(front)
    if switch is not None and switch.thread is not None:
        switch.thread.join(max(0.0, min(timeout, CLOSE_WATCH)))
    sorted_front = switch is not None and switch.at_close is not None
    why_unwatched = unwatched_why(switch)
    ports = [port] + ([front] if front is not None else [])
    shown = visible(ports)
    front_observed = shown is not None and front is not None and front in shown
    slot_listens = shown is not None and port in shown
    # where the slot's port listens: on every address (Docker's proxy) its accepted sockets
    # are all the slot's; on some, only those at an address Caddy dials
    binds = shown.get(port) if isinstance(shown, Mapping) else None
    watch = _Watch()
    moved_at = began  # front not observable: the slot's port must be quiet for `quiet`
    slot_moved_at = began - settle  # observable: quiet for `settle` (a stream still running)
    last_request: float | None = None
    counters_before: dict[Key, tuple[int, int]] = {}
    first = True
    slot_observed = slot_listens
    front_done_at: float | None = None
    readings = 0
    failed = 0  # failed readings in all
    last_good: float | None = None
    last_busy = 1  # what the last good reading left open (at least the unmet condition)

    def seen_so_far(elapsed: float, busy: int, **more: Any) -> Drain:
        """The drain's result from what the readings so far have seen."""
        return Drain(port, elapsed, busy, front_port=front, front_observed=front_observed,
                     minimum=preconnect,
                     other_fronts=other_fronts,
                     slot_observed=slot_observed, front_watched=watch.closed + len(watch.front),
                     front_closed=watch.closed,
                     front_kept=sum(s.kept for s in watch.front.values()),
                     front_new=watch.new, switch_watched=sorted_front,
                     unwatched=why_unwatched,
                     listener_left_after=switch.closed_after if switch else None,
                     last_request=last_request, front_done_at=front_done_at,
                     readings=readings, failed_readings=failed,
                     peers=None if peers is None else tuple(sorted(peers)), **more)

    while True:
        seen = read(port, front if front_observed else None)
        now = clock()
        readings += 1
        if seen is None or isinstance(seen, Unread):
            why = seen.why if isinstance(seen, Unread) else "`ss` gave no reading"
            failed += 1
            lasting = seen is None or seen.lasting
            if last_good is None and lasting:  # nothing observable: the fixed grace
                rest = max(FALLBACK_GRACE, preconnect) - (now - began)
                if rest > 0:
                    sleep(min(rest, max(0.0, timeout - (now - began))))
                return Drain(port, clock() - began, None, front_port=front,
                             failed_readings=failed, unread=why, readings=readings)
            if now - began >= timeout:
                if last_good is None:  # time-outs only, retried: nothing was ever observed
                    return Drain(port, now - began, None, front_port=front, unread=why,
                                 failed_readings=failed, readings=readings)
                return seen_so_far(now - began, last_busy, unread=why, last_good=last_good)
            sleep(min(poll, max(0.0, timeout - (now - began))))
            continue
        last_good = now - began
        seen = narrow(seen, peers, binds)
        # Caddy's own sockets to the slot are only seen where it runs in this namespace
        slot_observed = slot_listens or bool(seen.dialed) or slot_observed
        first_reading = first
        if first:
            for k, c in seen.front.items():
                if not sorted_front:
                    watch.front[k] = _Front(c)
                elif switch is not None and k in switch.before:
                    watch.front[k] = _Front(c, old=True)  # the old config's: must close
                elif switch is not None and switch.at_close is not None and k in switch.at_close:
                    watch.front[k] = _Front(c)  # accepted while both listened
                else:
                    watch.new += 1  # accepted after the old listener left
            first = False
        for key, state in list(watch.front.items()):
            if key not in seen.front:
                del watch.front[key]
                watch.closed += 1
            else:
                state.update(seen.front[key], now, settle)
        open_front = [s for s in watch.front.values() if not s.kept]
        on_accepted, on_dialed = _slot_pending(seen, watch)
        pending = max(on_accepted, on_dialed)  # one connection may be seen from both ends
        if trace is not None:  # for benchmarks: seconds, open front, new-config front, pending
            trace.append((now - began, len(open_front), len(watch.front) - len(open_front),
                          on_accepted, on_dialed))
        if pending:
            last_request = now - began
        counters = {c.key: (c.bytes_sent, c.bytes_received)
                    for c in seen.accepted + seen.dialed}
        if counters != counters_before:
            moved_at = now
        if not first_reading and any(counters_before.get(k) != v for k, v in counters.items()):
            slot_moved_at = now  # bytes moved, or a connection to the slot opened, since the last
        counters_before = counters
        # all the front can show: closed (or quiet, unobserved); then the minimum for what it
        # cannot show (silent connections), which the timeout caps: not a busy connection
        front_seen_done = not open_front if front_observed else now - moved_at >= quiet
        waited_out = now - began >= preconnect or (
            now - began >= timeout and front_seen_done)
        front_done = front_seen_done and (waited_out if (other_fronts or not front_observed)
                                          else True)
        slot_done = (not pending and now - slot_moved_at >= settle) if slot_observed \
            else now - began >= FALLBACK_GRACE
        if front_done and front_done_at is None:
            front_done_at = now - began
        last_busy = max(1, pending + len(open_front))
        over = now - began >= timeout
        if (front_done and slot_done) or over:
            busy = 0 if front_done and slot_done else pending + len(open_front)
            if not (front_done and slot_done) and not busy:
                busy = 1  # the unobservable side's condition, not met in time
            idle = (len(seen.accepted) - on_accepted if seen.accepted
                    else len(seen.dialed) - on_dialed)
            return seen_so_far(now - began, busy, idle=idle, pending=pending)
        sleep(min(poll, max(0.0, timeout - (now - began))))
