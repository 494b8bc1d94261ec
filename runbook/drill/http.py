"""HTTP to the drill's own services on loopback (Caddy, its admin API, the app slots), for the
drill stack, the steps and the tests.

httpx builds a TLS context for every client it makes, and `httpx.get` makes a client per
call: loading the CA bundle costs ~24 ms of CPU each time on this 2-core machine, for URLs
that are all plain http on loopback (`perf` put it at ~3 % of the CPU of a features run).
Here one context serves the whole process, and the environment's proxy settings are never
read (loopback only).
"""

from __future__ import annotations

import functools
import ssl
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
