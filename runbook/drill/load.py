"""A bounded user load through the drill's proxy: the evidence that a switch drops nobody.

N keep-alive clients (threads of a child process, each with its own httpx.Client, so its own
connection) GET a path through Caddy at a modest rate and record every request: when it
started and ended, its HTTP status (0: no answer), the X-Togather-Slot header, the version the
app answered and whether a retry was needed. A kept-alive connection closed under a client
(Caddy reloading its config) is a *raw reset*: the idempotent GET is retried once on a fresh
connection, and a retried request that is answered counts as served, as a browser would do
it; a retry reset too is a second raw reset (and the request failed). Loopback only, bounded
in clients, time and requests; drills and benchmarks only, never a real host.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, astuple, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any
from urllib.parse import urlsplit

import httpx

from runbook.drill import http as drill_http

SLOT_HEADER = "X-Togather-Slot"
CLIENTS = 16
INTERVAL = 0.05  # seconds between one client's requests: 16 clients -> about 320 requests/s
MAX_SECONDS = 300.0  # a load nobody stopped ends by itself
MAX_REQUESTS = 200_000
TIMEOUT = 5.0
READY_TIMEOUT = 30.0  # a fresh interpreter importing httpx, on a busy machine
WARM_TIMEOUT = 5.0  # for the users' first requests after a start (a refused one counts too)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# What a connection closed under a kept-alive client raises (the GET is retried once). A
# refused connection (nothing listens: ConnectError) is no reset: it fails at once.
RESETS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


@dataclass(frozen=True, slots=True)
class Request:
    """One user request as the user saw it (times: epoch seconds, time.time())."""

    started: float
    ended: float
    status: int  # the final answer's HTTP status; 0 when there was none
    slot: str | None = None  # X-Togather-Slot of the answer
    version: str | None = None  # "version" of the answer's JSON body
    retried: bool = False  # the first attempt hit a reset connection (a raw reset)
    error: str | None = None  # why there was no answer (after the retry, if any)
    path: str = ""  # what it asked (the data clients' path reads the database)
    reset_again: bool = False  # the retry hit a reset connection too (a second raw reset)

    @property
    def served(self) -> bool:
        return 200 <= self.status < 300

    @property
    def raw_resets(self) -> int:
        """Attempts of this request that hit a reset connection: 0, 1 or 2."""
        return int(self.retried) + int(self.reset_again)


@dataclass(frozen=True)
class Gap:
    """The longest time between two successful answers (or a window's edge and one)."""

    start: float
    end: float

    @property
    def ms(self) -> int:
        return round((self.end - self.start) * 1000)


@dataclass(frozen=True)
class Summary:
    """What users saw in one window: the figures a drill asserts and its report shows."""

    start: float
    end: float
    clients: int
    requests: int
    served: int
    non_2xx: int  # answered, but not 2xx (e.g. a 502 from Caddy)
    failed: int  # no answer even after the one retry
    resets: int  # raw resets: every attempt on a reset connection (a retry's too)
    longest_gap: Gap | None
    slowest_ms: int | None  # the longest a served request took
    slots: tuple[str, ...]  # the slots that answered, in the order they first answered
    versions: tuple[str, ...]
    problems: tuple[Request, ...]  # the first non-2xx or failed requests, for a message

    @property
    def ok(self) -> bool:
        """Every request of the window was served (retried ones included)."""
        return self.non_2xx == 0 and self.failed == 0

    def to_json(self, origin: float | None = None) -> dict[str, Any]:
        """Plain data for a report; times as ms from `origin` (default: the window's start)."""
        origin = self.start if origin is None else origin

        def ms(t: float) -> int:
            return round((t - origin) * 1000)

        gap = self.longest_gap
        return {
            "clients": self.clients, "requests": self.requests, "served": self.served,
            "non_2xx": self.non_2xx, "failed": self.failed, "resets": self.resets,
            "longest_gap_ms": gap.ms if gap else None,
            "longest_gap_at_ms": ms(gap.start) if gap else None,
            "slowest_ms": self.slowest_ms,
            "slots": list(self.slots), "versions": list(self.versions),
            "window_ms": [ms(self.start), ms(self.end)],
            "problems": [
                {"at_ms": ms(r.started), "status": r.status, "error": r.error,
                 "retried": r.retried, "path": r.path} for r in self.problems],
        }

    def describe(self) -> str:
        """One line: what users saw."""
        gap = f"{self.longest_gap.ms} ms" if self.longest_gap else "no answer at all"
        return (f"{self.clients} clients, {self.requests} requests: {self.served} served, "
                f"{self.non_2xx} non-2xx, {self.failed} failed, {self.resets} raw resets "
                f"(retried once), longest gap between answers {gap}, slowest answer "
                f"{self.slowest_ms if self.slowest_ms is not None else '-'} ms; slots "
                f"{' -> '.join(self.slots) or 'none'}")


def in_window(records: Iterable[Request], start: float, end: float,
              sent_from: float | None = None) -> list[Request]:
    """The requests of the window [start, end), in the order they were sent: those whose time
    in flight overlaps it, i.e. sent before `end` and ended (answered, or given up after the
    retry) at or after `start`. So a request sent just before the window that fails inside it
    is the window's, and so is one sent in it that fails after it (Load.settle waits for
    those); one sent exactly at `end` is the next window's.

    Windows of one report that touch (a run killed mid-step is measured to the next run's
    start; see runbook.reports.model.add_traffic) would both hold a request in flight across
    their common edge: the later window then passes its start as `sent_from`, and requests
    sent before it are left to the earlier one, where they were sent. Each request is counted
    once."""
    return sorted((r for r in records if r.started < end and r.ended >= start
                   and (sent_from is None or r.started >= sent_from)), key=lambda r: r.started)


def summarize(records: Iterable[Request], start: float, end: float, clients: int = 0,
              keep: int = 5, sent_from: float | None = None) -> Summary:
    """What users saw in the window [start, end): its requests as in_window() gives them
    (in flight in it; see
    there for `sent_from`). The longest gap is between the successful answers received in
    the window (whichever window their request is counted in), counted from `start` and up
    to `end` too, so a window without answers is one long gap (an answer of a request that
    outlives the window shows in `slowest_ms`). Resets are raw: every attempt on a reset
    connection, a retry's too."""
    records = list(records)
    chosen = in_window(records, start, end, sent_from)
    points = sorted([start, end, *(r.ended for r in records
                                   if r.served and start <= r.ended <= end)])
    gap: Gap | None = None
    for before, after in itertools.pairwise(points):
        if gap is None or after - before > gap.end - gap.start:
            gap = Gap(before, after)
    slots: list[str] = []
    versions: list[str] = []
    for r in chosen:
        if r.served and r.slot and r.slot not in slots:
            slots.append(r.slot)
        if r.served and r.version and r.version not in versions:
            versions.append(r.version)
    bad = [r for r in chosen if not r.served]
    return Summary(
        start=start, end=end, clients=clients, requests=len(chosen),
        served=sum(r.served for r in chosen),
        non_2xx=sum(1 for r in chosen if r.status and not r.served),
        failed=sum(1 for r in chosen if not r.status),
        resets=sum(r.raw_resets for r in chosen), longest_gap=gap,
        slowest_ms=max((round((r.ended - r.started) * 1000) for r in chosen if r.served),
                       default=None),
        slots=tuple(slots), versions=tuple(versions), problems=tuple(bad[:keep]))


def buckets(records: Iterable[Request], start: float, end: float, width: float = 0.05,
            sent_from: float | None = None) -> list[dict[str, int]]:
    """The window's requests (in_window) per time bucket: served, bad (non-2xx or failed),
    raw resets. By start time; one sent before the window is in the first bucket, so each
    request is in one bucket and the buckets add up to summarize()'s requests."""
    count = max(1, int((end - start) / width) + 1)
    out = [{"served": 0, "bad": 0, "resets": 0} for _ in range(count)]
    for r in in_window(records, start, end, sent_from):
        bucket = out[min(count - 1, int((max(r.started, start) - start) / width))]
        bucket["served" if r.served else "bad"] += 1
        bucket["resets"] += r.raw_resets
    return out


def settle_bound(timeout: float) -> float:
    """How long a settle waits for requests of `timeout`: one retried request may take two
    connects and two reads; one still in flight after that hangs (a trickling answer)."""
    return 4 * timeout + 1


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK:
        raise ValueError(f"the drill load goes to loopback only, not to {host!r}")


@dataclass
class _Clients:
    """The clients themselves: one thread each, in the process that runs them."""

    url: str
    clients: int = CLIENTS
    interval: float = INTERVAL
    max_seconds: float = MAX_SECONDS
    max_requests: int = MAX_REQUESTS
    timeout: float = TIMEOUT
    data_url: str | None = None
    data_clients: int = 0
    started: float | None = None
    stopped: float | None = None
    _records: list[Request] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _sending: threading.Event = field(default_factory=threading.Event, repr=False)
    _threads: list[threading.Thread] = field(default_factory=list, repr=False)
    # requests sent and not yet recorded: settle() waits for them (guarded by _idle, which
    # also guards the check of _sending before a request, so none starts unseen)
    _inflight: int = field(default=0, repr=False)
    _idle: threading.Condition = field(default_factory=threading.Condition, repr=False)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> _Clients:
        """Start the clients, or resume them after pause()."""
        self._sending.set()
        if self._threads:
            return self
        self.started = time.time()
        context = drill_http.context()  # one per process: building one costs ~20 ms each
        deadline = time.monotonic() + self.max_seconds
        for index in range(self.clients):
            delay = self.interval * index / self.clients
            url = self.data_url if self.data_url and index < self.data_clients else self.url
            thread = threading.Thread(target=self._client,
                                      args=(context, delay, deadline, url),
                                      name=f"drill-load-{index}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def pause(self) -> None:
        """Send nothing more until start(); the kept-alive connections stay open. On return no
        request starts: a client decides to send, and takes its start time, under `_idle`."""
        with self._idle:
            self._sending.clear()

    def settle(self, timeout: float) -> int:
        """Pause, then wait until every request already sent is recorded (answered, failed
        or timed out): a window judged before then missed a request sent late in it that
        failed a moment after. Returns how many were still in flight at `timeout` (0: none)."""
        self.pause()
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout)
            return self._inflight

    def stop(self, timeout: float = TIMEOUT + 1) -> list[Request]:
        """Stop every client (an in-flight request finishes first); return all records."""
        self._stop.set()
        self._sending.set()
        for thread in self._threads:
            thread.join(timeout=timeout)
        if self.stopped is None and self.started is not None:
            self.stopped = time.time()
        return self.records()

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # -- results -------------------------------------------------------------------------------
    def records(self) -> list[Request]:
        with self._lock:
            return list(self._records)

    # -- one client ----------------------------------------------------------------------------
    def _client(self, context: ssl.SSLContext, delay: float, deadline: float,
                url: str) -> None:
        if self._stop.wait(delay):
            return
        with httpx.Client(timeout=self.timeout, trust_env=False, verify=context) as client:
            next_at = time.monotonic()
            while not self._stop.is_set() and time.monotonic() < deadline:
                with self._idle:
                    sending = self._sending.is_set()
                    if sending:
                        self._inflight += 1
                        started = time.time()  # under the lock: none starts after a pause
                if not sending:  # paused: resume in the same staggered order
                    self._sending.wait(max(0.0, deadline - time.monotonic()))
                    if self._stop.wait(delay):
                        return
                    next_at = time.monotonic()
                    continue
                try:
                    record = self._request(client, url, started)
                    with self._lock:
                        if len(self._records) >= self.max_requests:
                            return
                        self._records.append(record)
                finally:
                    with self._idle:
                        self._inflight -= 1
                        self._idle.notify_all()
                next_at = max(next_at + self.interval, time.monotonic())
                self._stop.wait(next_at - time.monotonic())

    def _request(self, client: httpx.Client, url: str, started: float) -> Request:
        retried = again = False
        path = urlsplit(url).path
        try:
            try:
                response = client.get(url)
            except RESETS:
                retried = True  # a raw reset: retry the idempotent GET once, fresh connection
                try:
                    response = client.get(url)
                except RESETS:
                    again = True  # reset again: a second raw reset, and no answer
                    raise
        except httpx.HTTPError as exc:
            return Request(started, time.time(), 0, retried=retried,
                           error=type(exc).__name__, path=path, reset_again=again)
        version = None
        with contextlib.suppress(ValueError, AttributeError):
            version = response.json().get("version")
        return Request(started, time.time(), response.status_code,
                       response.headers.get(SLOT_HEADER), version, retried, path=path)



def _child(conn: Connection, settings: dict[str, Any]) -> None:
    """A load process: "go" starts (or resumes) its clients, "pause" pauses them, "get" is
    answered with the records since the last answer (and whether its clients still run), and
    "stop" (or its parent gone) stops them. "pause", "settle" and "stop" are answered as "get"
    is, once done: the parent waits for that answer."""
    clients = _Clients(**settings)
    sent = 0
    left = 0
    conn.send("ready")
    while True:
        try:
            command = conn.recv()
        except (EOFError, OSError):
            command = "stop"
        if command == "go":
            clients.start()
            continue
        if command == "pause":  # answered once no request starts (the parent waits for it)
            clients.pause()
        left = 0
        if command == "settle":  # answered like "get", once nothing is in flight (or the bound)
            left = clients.settle(settle_bound(clients.timeout))
        if command == "stop":
            clients.stop()
        records = clients.records()
        with contextlib.suppress(OSError):
            conn.send(([astuple(r) for r in records[sent:]], clients.running, left))
        sent = len(records)
        if command == "stop":
            return


@dataclass
class Load:
    """`clients` keep-alive users of `url`, each a request every `interval` seconds; the
    first `data_clients` of them ask `data_url` instead (a page that reads the database: an
    app whose data access broke fails users even while /version answers).

    Use as a context manager, or prepare()/start()/stop(). The clients run in a child process
    of their own, so they never compete for this process's GIL with the rollback they watch;
    prepare() starts that process ahead (returns at once), start() then costs a millisecond
    and the clients' first requests spread over one interval. `in_process=True` runs them as
    threads here instead. It stops by itself after `max_seconds` or `max_requests`, or when
    this process ends, so a forgotten load never runs on."""

    url: str
    clients: int = CLIENTS
    interval: float = INTERVAL
    max_seconds: float = MAX_SECONDS
    max_requests: int = MAX_REQUESTS
    timeout: float = TIMEOUT
    data_url: str | None = None
    data_clients: int = 0
    in_process: bool = False
    started: float | None = None
    stopped: float | None = None
    # requests the last settle() left in flight at its bound: a window holding them cannot be
    # judged (they may fail a moment later), so a judge must refuse it while this is not 0
    unsettled: int = 0
    _records: list[Request] = field(default_factory=list, repr=False)
    _running: bool = field(default=False, repr=False)
    _threads: _Clients | None = field(default=None, repr=False)
    _process: BaseProcess | None = field(default=None, repr=False)
    _conn: Connection | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_loopback(self.url)
        if self.data_url is not None:
            _check_loopback(self.data_url)
        if not 0 <= self.data_clients <= self.clients:
            raise ValueError(f"data_clients must be 0..{self.clients}, not {self.data_clients}")
        if not 1 <= self.clients <= 256:
            raise ValueError(f"clients must be 1..256, not {self.clients}")

    def _settings(self) -> dict[str, Any]:
        return {"url": self.url, "clients": self.clients, "interval": self.interval,
                "max_seconds": self.max_seconds, "max_requests": self.max_requests,
                "timeout": self.timeout, "data_url": self.data_url,
                "data_clients": self.data_clients}

    # -- lifecycle -----------------------------------------------------------------------------
    def prepare(self) -> Load:
        """Start the load's process, not its requests (a fresh interpreter: ~0.1 s, unwaited)."""
        if self.in_process or self._process is not None:
            return self
        context = multiprocessing.get_context("spawn")  # nothing inherited from this process
        mine, theirs = context.Pipe()
        self._process = context.Process(target=_child, args=(theirs, self._settings()),
                                        name="drill-load", daemon=True)
        self._process.start()
        theirs.close()
        self._conn = mine
        return self

    def start(self) -> Load:
        """Start sending, or resume after pause(); returns once the users really send (see
        `_wait_sending`), so an action begun after it is watched from its first moment."""
        began = time.time()
        if self.started is not None:
            if self._threads is not None:
                self._threads.start()
            elif self._conn is not None:
                self._conn.send("go")
            self._wait_sending(began, 1)
            return self
        if self.in_process:
            self.started = time.time()
            self._threads = _Clients(**self._settings()).start()
        else:
            self.prepare()
            assert self._conn is not None
            # a process prepared moments ago may still be importing: wait, so the users really
            # send from now on (bounded: a process that never gets ready is an error)
            if not self._conn.poll(READY_TIMEOUT) or self._conn.recv() != "ready":
                raise TimeoutError(f"the load process was not ready in {READY_TIMEOUT} s")
            self.started = time.time()
            self._conn.send("go")
        self._running = True
        self._wait_sending(self.started, self.clients)
        return self

    def _wait_sending(self, since: float, answers: int, timeout: float = WARM_TIMEOUT) -> None:
        """Wait until `answers` requests sent since `since` are recorded (answered or not).

        A first start is a full round (every client has made its connection: 16 threads and
        clients in a fresh process took longer than a 0.15 s rollback on a busy 2-core
        machine, whose window then held no request); a resume is one request. Bounded: a
        proxy that hangs is the scenario's to judge, not a reason to wait on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running:
            if sum(1 for r in self.records()[-4 * answers:] if r.started >= since) >= answers:
                return
            time.sleep(0.005)

    def pause(self) -> None:
        """Send nothing until start() again (between the actions a drill watches); each client
        keeps its connection, and resumes in its place of the stagger. Returns once no request
        starts any more (the load's process answers when paused): it returned on sending the
        word, and a process a loaded host scheduled late sent requests after it (a test of
        the pause failed 1 of 8 runs under CPU load)."""
        if self._threads is not None:
            self._threads.pause()
        elif self._conn is not None and self.started is not None:
            self._ask("pause")

    def settle(self) -> int:
        """Pause, and return once every request already sent is recorded: a window judged
        right after an action holds all of its requests. Bounded (settle_bound of the
        requests' timeout); returns, and keeps as `unsettled`, how many were still in flight
        at the bound (0: every one recorded)."""
        bound = settle_bound(self.timeout)
        if self._threads is not None:
            self.unsettled = self._threads.settle(bound)
        elif self._conn is not None and self.started is not None:
            self.unsettled = self._ask("settle", bound + 5)
        return self.unsettled

    def stop(self, timeout: float = TIMEOUT + 5) -> list[Request]:
        """Stop every client (an in-flight request finishes first); return all records."""
        if self._threads is not None:
            self._threads.stop(timeout)
        elif self._conn is not None and self._process is not None:
            self._ask("stop", timeout)
            self._conn.close()
            self._conn = None
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
        self._running = False
        if self.stopped is None and self.started is not None:
            self.stopped = time.time()
        return self.records()

    @property
    def running(self) -> bool:
        """The clients still send requests (they stop at a bound by themselves)."""
        if self._threads is not None:
            return self._threads.running
        if self._conn is not None and self.started is not None:
            self._ask("get")
        return self._running

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- results -------------------------------------------------------------------------------
    def _ask(self, command: str, timeout: float = TIMEOUT + 5) -> int:
        """Fetch the child's new records (and whether it still runs); returns how many
        requests a "settle" left in flight (0 for any other command)."""
        assert self._conn is not None
        try:
            self._conn.send(command)
            if not self._conn.poll(timeout):
                raise TimeoutError(f"the load process did not answer {command!r} in {timeout} s")
            answer = self._conn.recv()
            if answer == "ready":  # prepared, never started: its first word is still queued
                if not self._conn.poll(timeout):
                    raise TimeoutError(f"the load process did not answer {command!r} in "
                                       f"{timeout} s")
                answer = self._conn.recv()
            rows, self._running, left = answer
        except (EOFError, OSError):  # the child is gone: what it sent is all there is
            self._running = False
            return 0
        self._records.extend(Request(*row) for row in rows)
        return int(left)

    def records(self) -> list[Request]:
        """Every request so far, in the order they were recorded."""
        if self._threads is not None:
            return self._threads.records()
        if self._conn is not None and self.started is not None:
            self._ask("get")
        return list(self._records)

    def summary(self, start: float | None = None, end: float | None = None) -> Summary:
        """What users saw between `start` and `end` (default: the whole load until now)."""
        records = self.records()
        begin = start if start is not None else (self.started or time.time())
        finish = end if end is not None else (self.stopped or time.time())
        return summarize(records, begin, finish, self.clients)


def as_json(records: Sequence[Request]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]
