"""One HTTP request whose timeout is a total deadline, not a per-read one.

httpx's (and httpcore's) timeouts bound each socket operation: a server that sends its headers
and then one byte every 0.5 s never trips a 3-second read timeout, and holds a health gate, a
verification or an admin API call (and the deploy lock) forever. Here every connect, write and
read gets only what is left of the deadline, so a request ends by `timeout` whatever the peer
does. It is built on httpcore (httpx's engine) directly: no proxy from the environment (these
are loopback calls) and no TLS context built for plain-HTTP URLs, which saves ~30 ms per call.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import httpcore

MAX_BODY = 1 << 20  # a /health or /version answer is small; more is a broken or hostile server


class HttpFailure(Exception):
    """The request got no (complete) answer; `str()` says why in a few words."""

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # names lower-cased
    content: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        """The body as JSON; raises ValueError when it is not."""
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self, timeout: float | None, expired: type[Exception]) -> float:
        """What an I/O call may wait: the smaller of its own timeout and what is left."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise expired("deadline reached")
        return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    """A network stream whose every operation ends by the request's deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._deadline.left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._deadline.left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname,
                                      self._deadline.left(timeout, httpcore.ConnectTimeout))
        return _Stream(inner, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, deadline: _Deadline) -> None:
        self._inner = httpcore.SyncBackend()
        self._deadline = deadline

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(
            host, port, self._deadline.left(timeout, httpcore.ConnectTimeout), local_address,
            socket_options)
        return _Stream(stream, self._deadline)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None,
                            ) -> httpcore.NetworkStream:
        stream = self._inner.connect_unix_socket(
            path, self._deadline.left(timeout, httpcore.ConnectTimeout), socket_options)
        return _Stream(stream, self._deadline)

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, self._deadline.at - time.monotonic())))


@cache
def _tls() -> ssl.SSLContext:
    """Built once, only when an https URL is asked for (an admin API behind TLS)."""
    return ssl.create_default_context()


def _describe(exc: Exception, deadline: _Deadline) -> HttpFailure:
    if isinstance(exc, httpcore.TimeoutException):
        return HttpFailure(f"timed out after {deadline.seconds:g}s", timed_out=True)
    if isinstance(exc, httpcore.ConnectError):
        text = str(exc)
        return HttpFailure("connection refused" if "refused" in text.lower()
                           else f"cannot connect: {text or type(exc).__name__}")
    if isinstance(exc, httpcore.RemoteProtocolError | httpcore.ReadError |
                  httpcore.WriteError):
        return HttpFailure(f"connection broken: {exc or type(exc).__name__}")
    if isinstance(exc, httpcore.UnsupportedProtocol):
        return HttpFailure(f"unsupported URL: {exc}")
    return HttpFailure(f"{type(exc).__name__}: {exc}")


def request(method: str, url: str, *, timeout: float,
            headers: Mapping[str, str] | None = None, content: bytes | None = None,
            max_body: int | None = MAX_BODY) -> Answer:
    """Send one request on a fresh connection (closed afterwards) and read the whole answer,
    all within `timeout` seconds. Raises HttpFailure when there is no complete answer."""
    deadline = _Deadline(timeout)
    sent = {"Connection": "close", **(headers or {})}
    https = url[:6].lower() == "https:"
    try:
        with httpcore.ConnectionPool(network_backend=_Backend(deadline), retries=0,
                                     ssl_context=_tls() if https else None) as pool:
            limits = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
            with pool.stream(method, url, headers=list(sent.items()), content=content,
                             extensions={"timeout": limits}) as response:
                body = bytearray()
                try:
                    for chunk in response.iter_stream():
                        body += chunk
                        if max_body is not None and len(body) > max_body:
                            raise HttpFailure(f"HTTP {response.status} with a body larger "
                                              f"than {max_body} bytes")
                        deadline.left(None, httpcore.ReadTimeout)
                except httpcore.TimeoutException:
                    raise HttpFailure(f"timed out after {timeout:g}s: HTTP {response.status} "
                                      f"headers came, the body did not finish ({len(body)} "
                                      "bytes)", timed_out=True) from None
                answer_headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                                  for k, v in response.headers}
                return Answer(response.status, answer_headers, bytes(body))
    except HttpFailure:
        raise
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
            httpcore.UnsupportedProtocol) as exc:
        raise _describe(exc, deadline) from None
    except (OSError, ValueError, UnicodeError) as exc:  # e.g. a malformed URL or host name
        raise HttpFailure(f"{type(exc).__name__}: {exc}") from None
