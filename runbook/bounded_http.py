"""One HTTP request whose timeout is a total deadline, not a per-read one.

httpx's (and http.client's) timeouts bound each socket operation: a server that sends its
headers and then one byte every 0.5 s never trips a 3-second read timeout, and holds a health
gate, a verification or an admin API call (and the deploy lock) forever. Here every connect,
send and receive gets only what is left of the deadline, so a request ends by `timeout`
whatever the peer does.

Built on the standard library's http.client (already loaded by the Docker SDK): no proxy from
the environment (these are loopback calls), no TLS context for plain-HTTP URLs and no extra
import on the on-call's path (httpx cost ~30 ms to import and ~30 ms per client for its TLS
context).
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import ssl

MAX_BODY = 1 << 20  # a /health or /version answer is small; more is a broken or hostile server
_CHUNK = 65536


class HttpFailure(Exception):
    """The request got no (complete) answer; `reason` says why in a few words."""

    def __init__(self, reason: str, *, timed_out: bool = False, untrusted: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out
        # the server's TLS certificate did not verify: something answers, but what it is
        # cannot be told (not an outage: Caddy's local CA, not in the trusted store)
        self.untrusted = untrusted


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # names lower-cased
    content: bytes
    # a chunked answer's trailer fields, names lower-cased: Caddy's GET /config/ sends its
    # ETag there (http.client reads and drops them)
    trailers: Mapping[str, str] = field(default_factory=dict)

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

    def left(self) -> float:
        """What the next socket operation may wait; raises TimeoutError when nothing is left."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline reached")
        return left


class _Reader(io.RawIOBase):
    """What http.client reads headers and body through: each receive gets what is left."""

    def __init__(self, owner: _Socket) -> None:
        self._owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        sock = self._owner.sock
        sock.settimeout(self._owner.deadline.left())
        return sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._owner.reader_closed()
        super().close()


class _Socket:
    """The socket http.client sees: sends and the reader it makes are deadline-bound.

    Closed only once its readers are, as socket.socket does with makefile(): an answer that
    says `Connection: close` (ours always ask for it) makes http.client close the connection
    right after the headers, and the body may still be on its way (a server that writes the
    headers and the body apart): closing the socket then lost it ("Bad file descriptor")."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self.sock = sock
        self.deadline = deadline
        self._readers = 0
        self._closing = False

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(self.deadline.left())  # bounds the whole sendall (3.5+)
        self.sock.sendall(data)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        self._readers += 1
        return io.BufferedReader(_Reader(self), _CHUNK)

    def reader_closed(self) -> None:
        self._readers -= 1
        if self._closing and self._readers <= 0:
            self.sock.close()

    def close(self) -> None:
        self._closing = True
        if self._readers <= 0:
            self.sock.close()


class _Response(http.client.HTTPResponse):
    """An HTTPResponse that keeps a chunked body's trailer fields instead of dropping them.

    Overrides http.client's `_read_and_discard_trailer` (private, unchanged since 3.5): the
    same reads through the same deadline-bound reader, with the same line limit, and at most
    as many fields as http.client takes headers."""

    def __init__(self, sock: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.trailers: dict[str, str] = {}

    def _read_and_discard_trailer(self) -> None:
        limit: int = getattr(http.client, "_MAXLINE", 65536)
        fields = 0
        while True:
            line = self.fp.readline(limit + 1)
            if len(line) > limit:
                raise http.client.LineTooLong("trailer line")
            if line in (b"\r\n", b"\n", b""):  # the end (or a server that EOFs before it)
                return
            fields += 1
            if fields > getattr(http.client, "_MAXHEADERS", 100):
                raise http.client.HTTPException("too many trailer fields")
            name, colon, value = line.decode("iso-8859-1").partition(":")
            if colon:
                self.trailers[name.strip().lower()] = value.strip()


class _Connection(http.client.HTTPConnection):
    response_class = _Response

    def __init__(self, host: str, port: int | None, deadline: _Deadline,
                 tls: ssl.SSLContext | None, server_name: str | None = None) -> None:
        super().__init__(host, port, timeout=deadline.seconds)
        self._deadline = deadline
        self._tls = tls
        self._server_name = server_name or host

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self._deadline.left())
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            sock.settimeout(self._deadline.left())
            sock = self._tls.wrap_socket(sock, server_hostname=self._server_name)
        self.sock = _Socket(sock, self._deadline)


@cache
def _tls(ca_file: str | None = None) -> ssl.SSLContext:
    """Built once, and only when an https URL is asked for. `ca_file` is trusted besides the
    system store: a site on Caddy's local CA (`tls internal`) is trusted by no system store."""
    import ssl

    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context


def _failure(exc: BaseException, deadline: _Deadline, status: int | None) -> HttpFailure:
    import ssl  # already loaded by http.client

    if isinstance(exc, ssl.SSLCertVerificationError):
        return HttpFailure(f"cannot verify its TLS certificate: {exc.verify_message or exc}",
                           untrusted=True)
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        if status is not None:
            return HttpFailure(f"timed out after {deadline.seconds:g}s: HTTP {status} headers "
                               "came, the body did not finish", timed_out=True)
        return HttpFailure(f"timed out after {deadline.seconds:g}s", timed_out=True)
    if isinstance(exc, ConnectionRefusedError):
        return HttpFailure("connection refused")
    if isinstance(exc, http.client.HTTPException | ConnectionError):
        return HttpFailure(f"connection broken: {exc or type(exc).__name__}")
    if isinstance(exc, socket.gaierror):
        return HttpFailure(f"cannot connect: {exc.strerror or exc}")
    return HttpFailure(f"cannot connect: {exc.strerror or exc}" if isinstance(exc, OSError)
                       else f"{type(exc).__name__}: {exc}")


def request(method: str, url: str, *, timeout: float,
            headers: Mapping[str, str] | None = None, content: bytes | None = None,
            max_body: int | None = MAX_BODY, site: str | None = None,
            ca_file: str | None = None) -> Answer:
    """Send one request on a fresh connection (closed afterwards) and read the whole answer,
    all within `timeout` seconds. Raises HttpFailure when there is no complete answer.
    `site`: the host name asked for (Host header, TLS server name and certificate check)
    while connecting to the URL's address. `ca_file`: a PEM bundle trusted besides the system
    store for an https URL."""
    try:
        parts = urlsplit(url)
        # http.client would dial 80 for an https:// URL without a port
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise HttpFailure(f"invalid URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpFailure(f"unsupported URL {url!r}: only http:// and https:// with a host")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # built before the deadline starts: loading the trust store on a process's first https
    # request took 0.2-0.45 s of a loaded machine's CPU, half of a 1 s budget meant for the
    # network (review: the request timed out before it dialled)
    tls = _tls(ca_file) if parts.scheme == "https" else None
    deadline = _Deadline(timeout)
    conn = _Connection(parts.hostname, port, deadline, tls, site)
    if site:
        headers = {**(headers or {}), "Host": site}
    status: int | None = None
    body = bytearray()
    response: _Response | None = None
    try:
        conn.request(method, target, body=content,
                     headers={"Connection": "close", **(headers or {})})
        response = cast(_Response, conn.getresponse())  # response_class
        status = response.status
        while chunk := response.read(_CHUNK):
            body += chunk
            if max_body is not None and len(body) > max_body:
                raise HttpFailure(f"HTTP {status} with a body larger than {max_body} bytes")
            deadline.left()
        answer_headers = {k.lower(): v for k, v in response.getheaders()}
        return Answer(status, answer_headers, bytes(body), dict(response.trailers))
    except HttpFailure:
        raise
    except (OSError, http.client.HTTPException, ValueError, UnicodeError) as exc:
        raise _failure(exc, deadline, status) from None
    finally:
        if response is not None:
            response.close()  # its reader: the socket closes with the last one
        conn.close()
