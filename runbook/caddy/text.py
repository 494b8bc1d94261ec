"""The managed Caddyfile block as text: find it, read what it points at, rewrite it.

Pure functions, no I/O. Only the text between the `# BLUE_GREEN_SLOT_START` and
`# BLUE_GREEN_SLOT_END` comment lines is ever changed; everything else (other sites, CRLF line
ends, comments) survives byte for byte.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runbook.caddy.errors import CaddyError, SlotMarkersError
from runbook.environment import Environment, Slot
from runbook.errors import ExitCode

START_MARKER = "# BLUE_GREEN_SLOT_START"
END_MARKER = "# BLUE_GREEN_SLOT_END"
SLOT_HEADER = "X-Togather-Slot"

_START_RE = re.compile(r"#\s*BLUE_GREEN_SLOT_START")
_END_RE = re.compile(r"#\s*BLUE_GREEN_SLOT_END")
# a line that is a marker and nothing else: any other comment holding one may only mention it
_BARE_MARKER_RE = re.compile(r"#\s*BLUE_GREEN_SLOT_(?:START|END)")
# [scheme://]host[:port] or [scheme://]:port; a host is a name, an IPv4 address or a
# bracketed IPv6 address. A name is letters, digits, `-`, `_` and `.` only: anything else (a
# lone `\` continuing the line, a stray quote) is no host the switch may take for another
# service's and leave be. No host (`:8081`) is Caddy's own shorthand: it dials that port on
# this host, so it is read as localhost and rewritten as written (`:8082`).
_UPSTREAM_RE = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?(?:(?P<host>\[[0-9A-Fa-f:.%]+\]|[A-Za-z0-9_.-]+)"
    r"(?::(?P<port>\d{1,5}))?|:(?P<bare>\d{1,5}))$"
)
_BARE_HOST = "localhost"  # what Caddy dials for an upstream written `:PORT`
_MATCHER_PREFIXES = ("@", "/", "*")
_SNIPPET_RE = re.compile(r"^\((?P<name>[^()\s]+)\)$")  # `(name) {`: a snippet's definition
_DEFAULT_PORTS = {"https://": 443}  # any other scheme, or none, dials port 80
_PLAIN_UPSTREAMS = "use plain host:port upstreams between the slot markers"
# Directives between the markers whose upstreams the switch cannot see, so cannot rewrite
# (a slot's upstream among them would keep its slot, the traffic split while verification
# passes): (name, the block it counts in, "" for any; why; fix).
_OPAQUE = (
    ("import", "", "brings in text the switch cannot see or rewrite",
     "inline the snippet between the slot markers"),
    ("invoke", "", "runs a named route defined elsewhere, which the switch cannot rewrite",
     "inline the named route's directives between the slot markers"),
    ("dynamic", "reverse_proxy", "looks its upstreams up per request, which the switch "
     "cannot rewrite", _PLAIN_UPSTREAMS),
)


def find_block(text: str) -> tuple[int, int]:
    """Offsets (start, end) of the managed block: text[start:end] is everything between the
    marker lines, which themselves stay outside so they are never rewritten. Marker lines it
    cannot read: SlotMarkersError (exit 4)."""
    starts: list[tuple[int, int, int]] = []  # (line number, line start, line end incl. newline)
    ends: list[tuple[int, int, int]] = []
    offset = 0
    for number, line in enumerate(text.split("\n"), start=1):
        line_end = offset + len(line) + 1  # past the "\n" (one past len(text) on the last line)
        has_start, has_end = bool(_START_RE.search(line)), bool(_END_RE.search(line))
        if has_start and has_end:
            raise SlotMarkersError(f"line {number} holds both {START_MARKER} and {END_MARKER}",
                                   "each marker goes on a comment line of its own and is "
                                   f"named on no other line: split line {number}, or reword "
                                   "it if it only mentions them")
        if has_start:
            starts.append((number, offset, line_end))
        if has_end:
            ends.append((number, offset, line_end))
        offset = line_end
    fix = (f"the managed block must be delimited by exactly one '{START_MARKER}' line and, "
           f"below it, exactly one '{END_MARKER}' line")
    if not starts or not ends:
        missing = " and ".join(m for m, found in ((START_MARKER, starts), (END_MARKER, ends))
                               if not found)
        refused = SlotMarkersError(f"the Caddyfile has no {missing} marker line", fix)
        refused.none_found = not starts and not ends  # admin.markers_imported says where
        raise refused
    if len(starts) > 1 or len(ends) > 1:
        found = sorted(starts + ends)
        lines = ", ".join(str(n) for n, _, _ in found)
        raise SlotMarkersError(f"the Caddyfile has duplicated slot markers (lines {lines})",
                               fix + _mentions(text, [n for n, _, _ in found]))
    (start_no, _, start_after), (end_no, end_at, _) = starts[0], ends[0]
    if end_no < start_no:
        raise SlotMarkersError(f"{END_MARKER} (line {end_no}) comes before {START_MARKER} "
                               f"(line {start_no})", fix)
    return min(start_after, len(text)), end_at


def _mentions(text: str, numbers: list[int]) -> str:
    """The duplicated-markers fix's advice on the comment lines among `numbers` that hold a
    marker beside other words: a comment that only mentions the markers (`# BLUE_GREEN_SLOT_
    START/BLUE_GREEN_SLOT_END comments below.`) reads as a marker line, and "exactly one
    line" alone sent on-call looking for a second block (found by review). "" when every
    one is a bare marker line (a block doubled: which one to keep is on-call's call)."""
    lines = text.split("\n")
    named = [n for n in numbers if (line := lines[n - 1].strip()).startswith("#")
             and not _BARE_MARKER_RE.fullmatch(line)]
    if not named:
        return ""
    if len(named) == 1:
        return (f"; line {named[0]} is a comment that names a marker among other words: "
                "reword it if it only mentions them (any line holding a marker reads as one)")
    return (f"; lines {', '.join(map(str, named))} are comments that name a marker among other "
            "words: reword them if they only mention them (any line holding a marker reads as "
            "one)")


@dataclass(frozen=True)
class _Token:
    start: int
    end: int
    text: str

    @property
    def quote(self) -> str:
        return self.text[0] if self.text[:1] in ('"', "`") else ""

    @property
    def value(self) -> str:
        q = self.quote
        return self.text[1:-1] if q and len(self.text) >= 2 and self.text.endswith(q) else self.text


def _tokenize(line: str) -> list[_Token]:
    """Caddyfile tokens of one line with their offsets; `#` at a token start begins a comment."""
    tokens: list[_Token] = []
    i, n = 0, len(line)
    while i < n:
        if line[i].isspace():
            i += 1
            continue
        if line[i] == "#":
            break
        start = i
        if line[i] in ('"', "`"):
            quote = line[i]
            i += 1
            while i < n and line[i] != quote:
                i += 2 if line[i] == "\\" and quote == '"' else 1
            i = min(i + 1, n)
        else:
            while i < n and not line[i].isspace():
                i += 1
        tokens.append(_Token(start, i, line[start:i]))
    return tokens


def _go_space(ch: str) -> bool:
    """Go's unicode.IsSpace, which Caddy's lexer uses (Python's isspace also takes the
    \\x1c-\\x1f separators)."""
    return ch.isspace() and ch not in "\x1c\x1d\x1e\x1f"


def _joined_lines(text: str) -> dict[int, str]:
    """{line number: "continuation" | "quote"} of every line whose end Caddy's lexer (2.6's
    caddyfile/lexer.go, step for step) does not take for the end of a line: a `\\` outside
    quotes, even in a comment and with spaces after it, joins the next line to it; a quote
    left open runs on. _tokenize reads one line at a time, so what the next line adds to a
    directive there (a second upstream, left on the old slot) is what the switch would miss."""
    joined: dict[int, str] = {}
    line = 1
    val = comment = quoted = bt = escaped = False
    for ch in text:
        if not escaped and not bt and ch == "\\":
            escaped = True
            continue
        if quoted or bt:
            if quoted and escaped:
                escaped = False
            elif (quoted and ch == '"') or (bt and ch == "`"):
                val = comment = quoted = bt = escaped = False  # the token ends
                continue
            if ch == "\n":
                joined[line] = "quote"
                line += 1
            continue
        if _go_space(ch):
            if ch == "\r":
                continue
            if ch == "\n":
                if escaped:
                    joined[line] = "continuation"
                    escaped = False
                comment = False
                line += 1
            if val:
                val = comment = quoted = bt = escaped = False  # the token ends
            continue
        if ch == "#" and not val:
            comment = True
        if comment:
            continue
        if not val and ch == '"':
            quoted = True
            continue
        if not val and ch == "`":
            bt = True
            continue
        escaped = False
        val = True
    return joined


def _unseen(text: str, start: int, end: int) -> list[_Unsupported]:
    """The lines from the start marker's to the block's last that Caddy joins to the next:
    the managed block read one line at a time would not be the block Caddy runs. (The end
    marker's line is left out: what it joins is outside the block, as its own tokens are.)"""
    first = _first_line(text, start) - 1  # the start marker's line
    last = _first_line(text, end) - 1  # the line above the end marker's
    found: list[_Unsupported] = []
    for number, how in sorted(_joined_lines(text).items()):
        if not first <= number <= last:
            continue
        if how == "continuation":
            found.append(_Unsupported(
                f"line {number}: a backslash (\\) continues it onto the next line, as Caddy "
                "reads it (even in a comment), so the switch cannot see each directive whole",
                "write each directive on one line between the slot markers, with no "
                "backslash at a line's end or in a comment there"))
        else:
            found.append(_Unsupported(
                f"line {number}: a quoted string runs on past its end, as Caddy reads it, so "
                "the switch cannot see each directive whole",
                "close every quote on the line it opens between the slot markers"))
    return found


@dataclass(frozen=True)
class Upstream:
    """One reverse_proxy upstream inside the markers."""

    line: int  # 1-based line number in the whole Caddyfile
    text: str  # as written, without quotes
    host: str | None
    port: int | None  # as written (None: none written, or not host:port)
    slot: Slot | None  # the slot whose port Caddy dials, if any
    dials: int | None = None  # the port Caddy dials (80, or 443 for https, when none is written)
    directive: int = 0  # the line of the reverse_proxy (or forward_auth) it belongs to


@dataclass(frozen=True)
class SlotHeader:
    """One `header_down X-Togather-Slot <value>` inside the markers."""

    line: int
    value: str
    slot: Slot | None


@dataclass(frozen=True)
class HealthProbe:
    """A reverse_proxy's `health_port` or `health_upstream`: where Caddy's active health
    checks go. One left on the old slot's port marks the new upstream down once that slot
    stops, after the switch was verified (the old slot still answered then)."""

    line: int
    text: str
    port: int
    slot: Slot | None


@dataclass(frozen=True)
class _Edit:
    line_index: int
    token: _Token
    # "upstream" (on a slot's port) | "other" (another port) | "header" | "health" (a health
    # check's port on a slot's port) | "health-other" (on another port)
    kind: str
    # what goes before `:<port>` as written (`http://localhost`, `[::1]`, `` for `:8081`);
    # None: the port alone (`health_port 8081`)
    prefix: str | None = None


@dataclass(frozen=True)
class _Unsupported:
    message: str
    fix: str


@dataclass(frozen=True)
class _Parsed:
    upstreams: tuple[Upstream, ...]
    headers: tuple[SlotHeader, ...]
    edits: tuple[_Edit, ...]  # slot headers, and the upstreams on a slot's port
    unsupported: tuple[_Unsupported, ...]
    probes: tuple[HealthProbe, ...] = ()
    firsts: frozenset[int] = frozenset()  # the proxy directives (lines) with `lb_policy first`


_PROXIES = ("reverse_proxy", "forward_auth")


def _slot_by_port(env: Environment) -> dict[int, Slot]:
    return {cfg.port: slot for slot, cfg in env.slots.items()}


def _header_name(token: str) -> str:
    return token.lstrip("+>").lower()


Reach = Callable[[Slot | None], str]
"""How an upstream reaches a slot from where Caddy runs, as a fix tells on-call to write it:
`slot`'s (with its port), or None: every slot's (`<port>`). This module cannot see where
Caddy runs (no I/O): slot_address is right for a Caddy on this host's network; the caller,
which can ask Docker, passes the form a Caddy in a container reaches the slots by
(slots.reach). Found by review: in Caddy's container `localhost:<port>` is Caddy itself."""


def _parse_block(block: str, first_line: int, env: Environment,
                 reach: Reach | None = None) -> _Parsed:
    """Find every upstream and slot header in the block, remembering where each token sits.
    `reach`: how a fix names the upstream that reaches a slot (default: slot_address)."""
    ports = _slot_by_port(env)
    upstreams: list[Upstream] = []
    headers: list[SlotHeader] = []
    edits: list[_Edit] = []
    unsupported: list[_Unsupported] = []
    probes: list[HealthProbe] = []
    firsts: set[int] = set()
    stack: list[str] = []  # directive names of the open `{` blocks
    opened: list[int] = []  # the line each of them opened on
    wanted = SLOT_HEADER.lower()
    for index, line in enumerate(block.split("\n")):
        number = first_line + index
        tokens = _tokenize(line)
        if not tokens:
            continue
        first = tokens[0].value
        if first == "}":
            if stack:
                stack.pop()
                opened.pop()
            continue
        opens = tokens[-1].text == "{"
        args = tokens[1:-1] if opens else tokens[1:]
        parent = stack[-1] if stack else ""
        candidates: list[_Token] = []
        for name, within, why, fix in _OPAQUE:
            if first == name and within in ("", parent):
                said = " ".join(t.text for t in tokens)
                unsupported.append(_Unsupported(f"line {number}: `{said}` {why}", fix))
        directive = number
        # forward_auth proxies too: an upstream of it on a slot's port moves with the switch;
        # any other (an auth service, a placeholder, a socket) is none of the switch's business
        auth_only = first == "forward_auth" or (first == "to" and parent == "forward_auth")
        if first in _PROXIES:
            if args and args[0].value.startswith(_MATCHER_PREFIXES):
                args = args[1:]
            if first == "forward_auth" and args and args[0].value.startswith("/"):
                args = args[1:]  # a path matcher
            candidates = args
        elif first == "to" and parent in _PROXIES:
            candidates = args
            directive = opened[-1]
        elif first in ("header_down", "header"):
            if first == "header" and args and args[0].value.startswith(_MATCHER_PREFIXES):
                args = args[1:]
            if args and _header_name(args[0].value) == wanted:
                if len(args) == 2:
                    value = args[1].value
                    headers.append(SlotHeader(number, value, _as_slot(value)))
                    edits.append(_Edit(index, args[1], "header"))
                else:
                    unsupported.append(_Unsupported(
                        f"line {number}: unsupported {first} form "
                        f"{' '.join(t.text for t in tokens)!r}", _PLAIN_UPSTREAMS))
        elif first in _HEALTH_PORTS and parent == "reverse_proxy":
            probe = _health_probe(number, args, ports)
            if isinstance(probe, _Unsupported):
                unsupported.append(probe)
            else:
                probes.append(probe[0])
                edits.append(_Edit(index, args[0], "health" if probe[0].slot is not None
                                   else "health-other", probe[1]))
        elif first == "lb_policy" and parent in _PROXIES:
            if [t.value for t in args] == ["first"]:
                firsts.add(opened[-1])
        elif parent == "header" and _header_name(first) == wanted and len(tokens) == 2:
            # header { X-Togather-Slot "blue" }
            value = tokens[1].value
            headers.append(SlotHeader(number, value, _as_slot(value)))
            edits.append(_Edit(index, tokens[1], "header"))
        for token in candidates:
            address = _address(token.value)
            if auth_only and (address is None or ports.get(address.dials) is None):
                continue
            if address is None:
                unsupported.append(_Unsupported(
                    f"line {number}: upstream {token.value!r} is not host:port or :port "
                    "(placeholders and unix sockets cannot be switched)", _PLAIN_UPSTREAMS))
                upstreams.append(Upstream(number, token.value, None, None, None,
                                          directive=directive))
                continue
            slot = ports.get(address.dials)
            upstreams.append(Upstream(number, token.value, address.host or _BARE_HOST,
                                      address.port, slot, address.dials, directive))
            # another service's upstream is retargeted only by the repair of a block with no
            # upstream on a slot's port at all (see rewrite)
            edits.append(_Edit(index, token, "upstream" if slot is not None else "other",
                               address.scheme + address.host))
        if opens:
            stack.append(first)
            opened.append(number)
    unsupported += [_pooled_problem(up, beside, reach or _on_host(env)) for up, beside, fallback
                    in _pooled(upstreams, frozenset(firsts)) if not fallback]
    return _Parsed(tuple(upstreams), tuple(headers), tuple(edits), tuple(unsupported),
                   tuple(probes), frozenset(firsts))


@dataclass(frozen=True)
class _Address:
    """An upstream address as written: `[scheme://]host[:port]` or `[scheme://]:port`."""

    scheme: str
    host: str  # "" for `:port` (Caddy dials that port on this host)
    port: int | None  # as written

    @property
    def dials(self) -> int:
        """The port Caddy dials (80, or 443 for https, when none is written)."""
        return self.port if self.port is not None \
            else _DEFAULT_PORTS.get(self.scheme.lower(), 80)


def _address(value: str) -> _Address | None:
    """`value` read as an upstream address; None when it is none (a placeholder, a socket)."""
    match = _UPSTREAM_RE.match(value)
    if match is None:
        return None
    port = match["port"] or match["bare"]
    return _Address(match["scheme"] or "", match["host"] or "", int(port) if port else None)


def _pooled(upstreams: list[Upstream] | tuple[Upstream, ...], firsts: frozenset[int],
            ) -> list[tuple[Upstream, Upstream, bool]]:
    """(upstream, a slot's upstream of the same directive, whether it is a fallback) for each
    upstream that is no slot's in a reverse_proxy pool with one that is. Why: Caddy balances
    each request over the whole pool, so part of the traffic goes where no switch moves it (a
    slot's container address beside `localhost:<port>` kept the old slot on every other
    request after the switch), and the header_down the switch rewrites stamps those answers
    with the new slot, so verification passed (found by review). A fallback is none of that:
    with `lb_policy first` Caddy picks the first available upstream, so another listed after
    every slot's (a maintenance page) is dialed only while the slot is down (found by review:
    refusing it refused every switch and rollback on such a host)."""
    first_slot: dict[int, Upstream] = {}
    last_slot: dict[int, int] = {}  # directive: the index of its last slot upstream
    for index, up in enumerate(upstreams):
        if up.slot is not None:
            first_slot.setdefault(up.directive, up)
            last_slot[up.directive] = index
    others = [(index, up) for index, up in enumerate(upstreams)
              if up.slot is None and up.directive in first_slot]
    # a pool is a fallback only when every upstream no slot's comes after every slot's
    mixed = {up.directive for index, up in others if index < last_slot[up.directive]}
    return [(up, first_slot[up.directive], up.directive in firsts - mixed)
            for _, up in others if up.host is not None]


def _pooled_problem(up: Upstream, beside: Upstream, reach: Reach) -> _Unsupported:
    return _Unsupported(
        f"line {up.line}: upstream {_named(up)} is no slot's, but is in one reverse_proxy "
        f"pool (line {up.directive}) with {beside.text}, a slot's: Caddy sends part of the "
        "traffic to it, and a switch would leave that part where it is",
        f"dial each slot by its own {reach(None)} only in that reverse_proxy, or move "
        "that upstream out of the managed block (a route of its own)")


def _on_host(env: Environment) -> Reach:
    """slot_address as a Reach: the words for a Caddy on this host's network."""
    return lambda slot: slot_address(env, slot)


def slot_address(env: Environment, slot: Slot | None = None) -> str:
    """How an upstream on this host dials a slot, as a fix tells on-call to write it: the
    slot's own address (`[slots] host`, where it is published and its gate asks it) with its
    port, or `<port>` for every slot. `localhost` where every slot is on 127.0.0.1: Caddy
    dials localhost there. Found by review (caddytruth LOW 5): on a host publishing its
    slots on [::1] only, "localhost:<port>" reached nothing (Caddy's localhost is
    127.0.0.1): 502 for every user who followed the fix."""
    def host(name: str) -> str:
        name = name.strip("[]")
        return f"[{name}]" if ":" in name else name

    hosts = {cfg.host.strip("[]").lower() for cfg in env.slots.values()}
    if slot is not None:
        config = env.slot(slot)
        return f"{'localhost' if hosts <= _LOCALHOST else host(config.host)}:{config.port}"
    if hosts <= _LOCALHOST:
        return "localhost:<port>"
    if len(hosts) == 1:
        return f"{host(next(iter(hosts)))}:<port>"
    return ", ".join(f"{host(cfg.host)}:{cfg.port} ({s})" for s, cfg in sorted(env.slots.items()))


_LOCALHOST = frozenset({"127.0.0.1", "localhost"})  # what Caddy's `localhost` dials


_HEALTH_PORTS = ("health_port", "health_upstream")


def _health_probe(number: int, args: list[_Token], ports: dict[int, Slot],
                  ) -> tuple[HealthProbe, str | None] | _Unsupported:
    """(probe, what an edit writes before `:<port>`) of `health_port N` (None: the port
    alone) / `health_upstream host:N`."""
    said = " ".join(t.text for t in args)
    if len(args) == 1 and args[0].value.isdigit():
        port = int(args[0].value)
        return HealthProbe(number, said, port, ports.get(port)), None
    address = _address(args[0].value) if len(args) == 1 else None
    if address is None or address.port is None:
        return _Unsupported(f"line {number}: health check target {said!r} is not a port or "
                            "host:port (the switch must move it with the upstream)",
                            "write health_port or health_upstream as a plain port or host:port")
    return (HealthProbe(number, said, address.port, ports.get(address.port)),
            address.scheme + address.host)


def _one_service(upstreams: tuple[Upstream, ...]) -> None:
    """The repair repoints every upstream of the block: only when they are one service's,
    i.e. every proxy directive dials the same ports. A `/grafana/*` route on 3000 beside the
    app's on a wrong 8018 is two services, and which is the app's is not guessed."""
    by_directive: dict[int, set[int | None]] = {}
    for up in upstreams:
        by_directive.setdefault(up.directive, set()).add(up.dials)
    if len({frozenset(ports) for ports in by_directive.values()}) <= 1:
        return
    lines = "; ".join(f"line {line}: port {', '.join(str(p) for p in sorted(ports, key=str))}"
                      for line, ports in sorted(by_directive.items()))
    raise CaddyError("no upstream between the slot markers is on a slot's port, and they "
                     f"proxy to different ports ({lines}): which is the app's is not guessed",
                     "set the app's upstream to a slot's port by hand, then run `runbook "
                     "switch` (it leaves the other services' upstreams as they are)",
                     exit_code=ExitCode.PRECONDITION)


_THIS_HOST = {"localhost", "host.docker.internal"}
THIS_HOST_NAMES = frozenset(_THIS_HOST)  # names Caddy dials this host by


def _on_this_host(upstreams: tuple[Upstream, ...], env: Environment, target: Slot,
                  reach: Reach) -> None:
    """The repair keeps each upstream's host and puts the slot's port on it: right for this
    host's loopback (or an address of it), wrong for a container's name, where the slot's
    published port listens on nothing (`togather-server-blue:8080` became
    `togather-server-blue:8082`: a 502 for every user until verification put it back).
    The fix names `target`'s upstream as `reach` says Caddy reaches it: "localhost:<port>"
    there was Caddy's own container for a Caddy on the slots' Docker network, so the switch
    run again on it was refused (found by review of caddytruth LOW 5's fix)."""
    import socket

    allowed = _THIS_HOST | {cfg.host.lower() for cfg in env.slots.values()} | {
        socket.gethostname().lower(), socket.getfqdn().lower()}
    for up in upstreams:
        host = (up.host or "").strip("[]").lower()
        if not host or host in allowed or local_address(host):
            continue
        raise CaddyError(
            f"no upstream between the slot markers is on a slot's port, and line {up.line} "
            f"dials {up.text}, which is not this host: repointing it at {host}:<slot port> "
            "would reach no slot (a container's name or address is not where the slots' "
            "published ports listen)",
            f"write the upstream between the slot markers by hand as {reach(target)} (the "
            "runbook tells the slots apart by the port each publishes on this host), then run "
            "again", exit_code=ExitCode.PRECONDITION)


def local_address(host: str) -> bool:
    """An IP address of this host: loopback, or one a socket can bind to here (the one
    read of the machine in this module; a container's address on a Docker network is not)."""
    import ipaddress
    import socket

    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


def _as_slot(value: str) -> Slot | None:
    try:
        return Slot(value)
    except ValueError:
        return None


def _first_line(text: str, start: int) -> int:
    return text.count("\n", 0, start) + 1


def in_managed_block(text: str, line: int) -> bool | None:
    """Whether line `line` (1-based) of `text` lies between its slot marker lines; None when
    the markers cannot be read."""
    try:
        start, end = find_block(text)
    except SlotMarkersError:
        return None
    return _first_line(text, start) - 1 <= line <= _first_line(text, end)


def _known(env: Environment) -> str:
    return ", ".join(f"{s} ({c.port})" for s, c in sorted(env.slots.items()))


def _named(up: Upstream) -> str:
    return up.text if up.port is not None else f"{up.text} (port {up.dials})"


@dataclass(frozen=True)
class Inspection:
    """What the managed block points at, and why it cannot be trusted when it cannot."""

    ports: tuple[int, ...]  # distinct upstream ports, in order of appearance
    header_slots: tuple[str, ...]  # X-Togather-Slot values, in order of appearance
    consistent: bool
    problems: tuple[str, ...]
    slot: Slot | None  # the one slot everything names; None when inconsistent
    upstreams: tuple[Upstream, ...] = ()
    headers: tuple[SlotHeader, ...] = ()
    warnings: tuple[str, ...] = ()
    # what mends the lines the switch cannot rewrite (rewrite refuses the block until then,
    # with these very words): status's fix for them, never the switch that refuses
    fixes: tuple[str, ...] = ()


def inspect(text: str, env: Environment, reach: Reach | None = None) -> Inspection:
    """Read the managed block: which ports and slot headers it names, and whether they agree.
    `reach`: how its fixes name the upstream that reaches a slot (see Reach)."""
    start, end = find_block(text)
    parsed = _parse_block(text[start:end], _first_line(text, start), env, reach)
    known = _known(env)
    unsupported = _unseen(text, start, end) + list(parsed.unsupported)
    problems: list[str] = [u.message for u in unsupported]
    warnings: list[str] = []
    named: dict[Slot, list[str]] = {}
    if not parsed.upstreams:
        problems.append("no reverse_proxy upstream between the slot markers")
    # Another service's upstream beside the app's (a /grafana/* route) is left as it is; a
    # block with no upstream on a slot's port at all is not the app's: nothing to switch.
    app_here = any(up.slot is not None for up in parsed.upstreams)
    pools = _pooled(parsed.upstreams, parsed.firsts)
    pooled = {id(up) for up, _, fallback in pools if not fallback}  # a problem (unsupported)
    fallbacks = {id(up): beside for up, beside, fallback in pools if fallback}
    for up in parsed.upstreams:
        if up.host is None or id(up) in pooled:
            continue
        if (beside := fallbacks.get(id(up))) is not None:
            warnings.append(f"line {up.line}: upstream {_named(up)} is no slot's, the fallback "
                            f"after {beside.text} in an `lb_policy first` reverse_proxy (line "
                            f"{up.directive}): left as it is; while the slot it serves is "
                            "down, users get the fallback (verification cannot see it)")
        elif up.slot is not None:
            named.setdefault(up.slot, []).append(f"upstream {up.text} (line {up.line})")
        elif app_here:
            warnings.append(f"line {up.line}: upstream {_named(up)} is no slot's port "
                            f"(known: {known}): left as it is")
        else:
            problems.append(f"line {up.line}: upstream {up.text} targets port {up.dials}, "
                            f"which is no slot's port (known: {known})")
    for header in parsed.headers:
        if header.slot is None:
            problems.append(f"line {header.line}: {SLOT_HEADER} header says {header.value!r}, "
                            "which is not blue or green")
        else:
            named.setdefault(header.slot, []).append(
                f"{SLOT_HEADER} {header.value} (line {header.line})")
    for probe in parsed.probes:
        if probe.slot is not None:
            named.setdefault(probe.slot, []).append(f"health check {probe.text} "
                                                    f"(line {probe.line})")
    if not parsed.headers:
        warnings.append(f"no header_down {SLOT_HEADER} between the slot markers: verification "
                        "through the proxy cannot tell the slots apart unless the app sends "
                        "it; a switch asks the target first and refuses before writing if not")
    if len(named) > 1:
        problems.append("the managed block names both slots: " + "; ".join(
            f"{slot}: {', '.join(where)}" for slot, where in sorted(named.items())))
    slot = next(iter(named)) if len(named) == 1 and not problems else None
    ports = tuple(dict.fromkeys(u.port for u in parsed.upstreams if u.port is not None))
    return Inspection(
        ports=ports, header_slots=tuple(h.value for h in parsed.headers),
        consistent=slot is not None, problems=tuple(problems), slot=slot,
        upstreams=parsed.upstreams, headers=parsed.headers, warnings=tuple(warnings),
        fixes=tuple(dict.fromkeys(u.fix for u in unsupported)),
    )


def active_slot(text: str, env: Environment) -> Slot | None:
    """The slot the managed block points at, or None when it is inconsistent (see inspect)."""
    return inspect(text, env).slot


def rewrite(text: str, env: Environment, target: Slot | str,
            reach: Reach | None = None) -> str:
    """Point every upstream on a slot's port and every slot header inside the markers at
    `target`; bytes outside the markers, and everything inside but those tokens (upstreams
    on other ports: another service's), are returned unchanged. Refuses (CaddyError, exit 4:
    nothing was changed) a block it cannot switch whole; `reach`: how its fix names the
    upstream that reaches a slot (see Reach)."""
    target = Slot(target)
    port = env.slot(target).port
    start, end = find_block(text)
    block = text[start:end]
    parsed = _parse_block(block, _first_line(text, start), env, reach)
    if unsupported := _unseen(text, start, end) + list(parsed.unsupported):
        raise CaddyError("cannot rewrite the managed block: "
                         + "; ".join(u.message for u in unsupported),
                         "; ".join(dict.fromkeys(u.fix for u in unsupported)),
                         exit_code=ExitCode.PRECONDITION)
    if not parsed.upstreams:
        raise CaddyError("no reverse_proxy upstream between the slot markers: nothing to switch",
                         "put the reverse_proxy directive(s) for the app between the markers",
                         exit_code=ExitCode.PRECONDITION)
    # A block with no upstream on a slot's port at all is the app's block pointed at a wrong
    # (dead) port: the troubleshooting guide's "Caddyfile targets the wrong port", repaired by
    # `runbook switch` (health-gated, verified through the proxy), so every upstream in it is
    # repointed; beside an upstream on a slot's port, another one is another service's.
    repair = not any(up.slot is not None for up in parsed.upstreams)
    if repair:
        _one_service(parsed.upstreams)
        _on_this_host(parsed.upstreams, env, target, reach or _on_host(env))
    lines = block.split("\n")
    by_line: dict[int, list[_Edit]] = {}
    for edit in parsed.edits:
        if edit.kind not in ("other", "health-other") or repair:
            by_line.setdefault(edit.line_index, []).append(edit)
    for index, edits in by_line.items():
        line = lines[index]
        for edit in sorted(edits, key=lambda e: e.token.start, reverse=True):
            q = edit.token.quote
            value = (str(target) if edit.kind == "header"
                     else str(port) if edit.prefix is None else f"{edit.prefix}:{port}")
            line = line[:edit.token.start] + f"{q}{value}{q}" + line[edit.token.end:]
        lines[index] = line
    return text[:start] + "\n".join(lines) + text[end:]


def admin_option(text: str) -> str | None:
    """The `admin` global option of Caddyfile `text` as written: its address
    (`127.0.0.1:2999`, `unix//run/caddy/admin.sock`), `off`, "" for `admin` alone (Caddy's
    default address); None when the file gives none (the default too, or no global options
    block: it opens the file, a line `{` alone). A leading byte order mark is no token:
    Caddy's lexer skips it (found by review: the advice read "no admin address" there)."""
    depth = 0
    for line in text.removeprefix("\ufeff").split("\n"):
        tokens = [t.value for t in _tokenize(line)]
        if not tokens:
            continue
        if depth == 0:
            if tokens != ["{"]:
                return None  # the first thing in the file is a site: no global options
            depth = 1
            continue
        if tokens == ["}"]:
            depth -= 1
            if depth == 0:
                return None
            continue
        if depth == 1 and tokens[0] == "admin":
            return tokens[1] if len(tokens) > 1 and tokens[1] != "{" else ""
        depth += tokens[-1] == "{"
    return None


@dataclass(frozen=True)
class FileImport:
    """An `import` of files anywhere in the Caddyfile (not of a snippet)."""

    line: int
    pattern: str  # the path or glob, as written

    @property
    def relative(self) -> bool:
        return not self.pattern.startswith("/")


def file_imports(text: str) -> tuple[FileImport, ...]:
    """Every `import` that names files. Caddy reads the name as a snippet only when
    `(name) { ... }` came above it in the file; else it globs files, a relative pattern
    from the directory of the file name it was given (with none: its working directory).
    A leading byte order mark is skipped, as Caddy's lexer does (line numbers unchanged)."""
    snippets: set[str] = set()
    found: list[FileImport] = []
    for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        tokens = _tokenize(line)
        if not tokens:
            continue
        if (snippet := _SNIPPET_RE.match(tokens[0].value)) is not None:
            snippets.add(snippet["name"])
        elif tokens[0].value == "import" and len(tokens) > 1 \
                and tokens[1].value not in snippets:
            found.append(FileImport(number, tokens[1].value))
    return tuple(found)


def imports_from(text: str, folder: str, here: Path | None = None) -> str:
    """`text` with each relative file import made absolute from `folder` (the Caddyfile's, as
    Caddy sees it), where Caddy resolves them when it reads the file itself (`caddy reload`,
    systemd's reload): text POSTed to /adapt has no file name, and Caddy looked for them in
    its own working directory. Only the pattern tokens change.

    Left as written (found by review): a bare name with no file of that name in `here` (the
    Caddyfile's folder as this host sees it), which may be a snippet another imported file
    defines (`import snippets.caddy`, then `import common`: made a path, Caddy looked for a
    file and /adapt failed); a `{$VAR}` pattern (its value may be absolute); a line inside a
    quoted string that runs on (not an import). A leading byte order mark stays, unread."""
    bom = "\ufeff" if text.startswith("\ufeff") else ""
    body = text.removeprefix(bom)
    lines = body.split("\n")
    folder = folder.rstrip("/")
    joined = _joined_lines(body)
    for found in file_imports(body):
        if not found.relative or found.pattern.startswith("{$") \
                or joined.get(found.line - 1) == "quote":
            continue
        if here is not None and not any(c in found.pattern for c in "/*?[") \
                and not (here / found.pattern).exists():
            continue  # a snippet's name, as far as this host can tell
        line = lines[found.line - 1]
        token = _tokenize(line)[1]  # its pattern, as written (a quoted one still escaped)
        quote, pattern = token.quote, found.pattern
        if quote == "`" and "`" in folder:  # no escape inside backticks: quoted as "..."
            quote, pattern = '"', pattern.replace("\\", "\\\\").replace('"', '\\"')
        quote = quote or ('"' if any(_go_space(c) or c in "\"`" for c in folder) else "")
        head = folder.replace('"', '\\"') if quote == '"' else folder
        lines[found.line - 1] = (f"{line[:token.start]}{quote}{head}/{pattern}{quote}"
                                 f"{line[token.end:]}")
    return bom + "\n".join(lines)


def has_marker_line(text: str) -> bool:
    """Whether any line of `text` holds a slot marker (as find_block reads them)."""
    return any(_START_RE.search(line) or _END_RE.search(line) for line in text.split("\n"))


def unified_diff(old: str, new: str, path: str | Path) -> str:
    """A unified diff for --dry-run output ('' when nothing changes)."""
    def lines(text: str) -> list[str]:
        out = text.splitlines(keepends=True)
        if out and not out[-1].endswith(("\n", "\r")):
            out[-1] += "\n\\ No newline at end of file\n"
        return out

    return "".join(difflib.unified_diff(lines(old), lines(new), f"{path} (current)",
                                        f"{path} (after switch)"))


# --------------------------------------------------------------------------------------------
