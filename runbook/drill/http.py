"""HTTP to the drill's own services on loopback (Caddy, its admin API, the app slots), for the
drill stack, the steps and the tests.

httpx builds a TLS context for every client it makes, and `httpx.get` makes a client per
call: loading the CA bundle costs ~24 ms of CPU each time on this 2-core machine, for URLs
that are all plain http on loopback (`perf` put it at ~3 % of the CPU of a features run).
Here one context serves the whole process, and the environment's proxy settings are never
read (loopback only).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import httpx


@functools.cache
def context() -> ssl.SSLContext:
    return ssl.create_default_context()


def client(**kwargs: Any) -> httpx.Client:
    kwargs.setdefault("trust_env", False)
    return httpx.Client(verify=context(), **kwargs)


def get(url: str, **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("trust_env", False)
    return httpx.get(url, verify=context(), **kwargs)


def post(url: str, **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("trust_env", False)
    return httpx.post(url, verify=context(), **kwargs)


def held_h2c_client(timeout: float = 5.0) -> httpx.Client:
    """One cleartext HTTP/2 connection (prior knowledge), reused for every request, as a load
    balancer's pool keeps its connection to Caddy (needs the `h2` package)."""
    return client(http1=False, http2=True, timeout=timeout,
                  limits=httpx.Limits(max_connections=1, max_keepalive_connections=1,
                                      keepalive_expiry=None))


def version_on(held: httpx.Client, proxy_url: str) -> tuple[int, str, str | None, str | None]:
    """GET /version on that client's connection: (its own port, so which connection, the HTTP
    version, X-Togather-Slot, the app's version). A non-2xx answer raises."""
    response = held.get(f"{proxy_url}/version").raise_for_status()
    port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    return (port, response.http_version, response.headers.get("X-Togather-Slot"),
            response.json().get("version"))


@contextlib.contextmanager
def watched(url: str, interval: float = 0.1,
            keep: int = 100) -> Iterator[collections.deque[tuple[int, str]]]:
    """GET `url` every `interval` seconds on a thread of its own while the block runs, as a
    plain client (an observer apart from the runbook): the deque holds the last `keep`
    answers, (HTTP status, body); no answer (a stopped slot) is not kept."""
    seen: collections.deque[tuple[int, str]] = collections.deque(maxlen=keep)
    stop = threading.Event()

    def poll() -> None:
        with client(timeout=2) as asking:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    answer = asking.get(url, headers={"Connection": "close"})
                    seen.append((answer.status_code, answer.text))
                stop.wait(interval)

    thread = threading.Thread(target=poll, name=f"watch {url}", daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=5)
