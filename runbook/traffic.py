"""Which slot takes traffic, as Caddy runs it: the truth every decision starts from.

The Caddyfile on disk says what Caddy should run; a run killed between writing it and
reloading Caddy makes it lie. So planning, `status`, the features and the serving-container
invariant read Caddy's loaded config from its admin API (`GET /config/`): the slot whose port
it dials serves. The proxy's `X-Togather-Slot` answer is a second witness. When the truth
cannot be read, callers fail closed.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runbook import bounded_http, drain
from runbook.environment import Environment, Slot, command_arg
from runbook.errors import ExitCode, PreconditionError, RunbookError

if TYPE_CHECKING:
    from runbook import docker

SLOT_HEADER = "X-Togather-Slot"
_TIMEOUT = 5.0
UNTRUSTED = "cannot verify Caddy's TLS certificate"  # starts ask_proxy's `unverifiable` then


class TrafficUnknownError(RunbookError):
    """What Caddy runs cannot be read: nothing that depends on it may go ahead."""

    exit_code = ExitCode.PRECONDITION


@dataclass(frozen=True)
class Traffic:
    """What Caddy runs (and, when asked, what the proxy answers)."""

    slots: frozenset[Slot]  # slots whose port Caddy's loaded config dials
    dials: tuple[str, ...]  # every upstream address in the loaded config
    proxy_slot: str | None = None  # X-Togather-Slot through the proxy (None: not asked/none)
    proxy_error: str | None = None
    h2c: Listens = ()  # where Caddy's servers accept cleartext HTTP/2 (h2c_listens)
    # slots whose port the Caddyfile's part OUTSIDE the markers dials too (another site that
    # proxies to a slot on purpose): not what the switch moves, so not what "serves" means
    pinned: frozenset[Slot] = frozenset()
    dialed: tuple[tuple[int, int], ...] = ()  # (slot port, how many dials name it)
    # where users reach the app: the listening ports of the servers that proxy to the slot(s)
    # that serve
    fronts: Listens = ()
    # the proxy answered, below 500, without SLOT_HEADER: not through the managed block's
    # upstream (another site, an HTTPS redirect), so no switch can be verified where it asks
    proxy_unverifiable: str | None = None
    # upstreams Caddy resolves only per request (`<site>: <dial>`): which slot they reach
    # cannot be told, so both slots count as pinned (the managed block refuses them)
    unresolved: tuple[str, ...] = ()
    # the listen addresses of those servers, as Caddy's loaded config has them
    # (`:8080`, `127.0.0.2:8080`): where proxy_url must point
    listens: tuple[str, ...] = ()
    # both slots dialed and the Caddyfile's slot markers cannot be read (message, fix): the
    # other sites' dials cannot be told from the managed block's, and no switch can rewrite
    # the block either, so the marker line, not a switch, is the way out
    markers: tuple[str, str] | None = None
    proxy_status: int | None = None  # the HTTP status the proxy answered (None: no answer)
    # both slots dialed, the markers read, and the Caddyfile's part outside them is not what
    # Caddy runs (an edit not loaded): the reason the dials cannot be told apart, said as
    # that, never as a blind "switch to a slot" (found by review)
    outside_differs: bool = False

    @property
    def untrusted(self) -> bool:
        """The proxy's TLS certificate did not verify: what it serves cannot be told."""
        return (self.proxy_unverifiable or "").startswith(UNTRUSTED)

    @property
    def slot(self) -> Slot | None:
        """The one slot that serves; None when Caddy dials neither or both."""
        return next(iter(self.slots)) if len(self.slots) == 1 else None

    @property
    def conflict(self) -> bool:
        """The two witnesses disagree: Caddy's loaded config dials one slot and the proxy
        answers as another (admin_url and proxy_url reach different Caddys, or the managed
        block's header names another slot than it dials). Which slot serves is not known."""
        return (self.slot is not None and self.proxy_slot is not None
                and self.proxy_slot != str(self.slot))

    def serving(self) -> frozenset[str]:
        """Every slot either witness says serves (the config's, the proxy's): none of them
        is ever offered to be stopped."""
        return frozenset({str(s) for s in self.slots}
                         | ({self.proxy_slot} if self.proxy_slot else set()))

    def problem(self, env: Environment) -> str | None:
        known = ", ".join(f"{s} ({env.slot(s).port})" for s in Slot)
        if not self.slots and self.pinned:
            only = " and ".join(str(s) for s in sorted(self.pinned))
            return (f"the managed block of Caddy's running config dials no slot port (it "
                    f"dials {', '.join(self.dials) or 'nothing'}; slots: {known}); {only} is "
                    "dialed only by a site outside the markers")
        if not self.slots:
            return (f"Caddy's running config dials no slot port (it dials "
                    f"{', '.join(self.dials) or 'nothing'}; slots: {known})")
        if len(self.slots) > 1 and self.markers is not None:
            return (f"Caddy's running config dials both slots' ports, and which of those "
                    f"dials are the managed block's cannot be told: the slot markers of "
                    f"{env.caddy.caddyfile} cannot be read ({self.markers[0]})")
        if len(self.slots) > 1 and self.outside_differs:
            return (f"Caddy's running config dials both slots' ports, and which of those "
                    f"dials are the managed block's cannot be told: {env.caddy.caddyfile} "
                    "outside the slot markers is not what Caddy runs (an edit not loaded, or "
                    "a config loaded another way)")
        if len(self.slots) > 1:
            return "Caddy's running config dials both slots' ports"
        if self.proxy_slot is not None and self.proxy_slot != str(self.slot):
            return (f"Caddy's running config dials {self.slot}, but the proxy answers with "
                    f"{SLOT_HEADER}: {self.proxy_slot}")
        return None

    def describe(self) -> str:
        if self.slot is None:
            return "unknown"
        seen = f", the proxy answers {self.proxy_slot}" if self.proxy_slot else ""
        return f"{self.slot} (as Caddy runs it{seen})"


Listens = tuple[tuple[int, int], ...]  # listening port ranges (first, last)


def h2c_listens(config: Any) -> Listens:
    """The ports (as ranges) of Caddy's HTTP servers that accept cleartext HTTP/2.

    Why it matters: Go's `http.Server.Shutdown` neither closes nor hands over the connections
    h2c took over (golang/go#26682), so on a reload Caddy 2.6's previous config goes on
    serving every h2c connection it holds: after a switch, their requests still reach the
    old slot until the client closes them."""
    servers = (((config or {}).get("apps") or {}).get("http") or {}).get("servers") or {}
    found: list[tuple[int, int]] = []
    for server in servers.values() if isinstance(servers, dict) else ():
        if not isinstance(server, dict) or "h2c" not in (server.get("protocols") or ()):
            continue
        for address in server.get("listen") or ():
            ports = str(address).rpartition(":")[2]
            first, _, last = ports.partition("-")
            if first.isdigit() and (not last or last.isdigit()):
                found.append((int(first), int(last or first)))
    return tuple(found)


def _dials_here(server: Any, wanted: set[int], here: Callable[[str], bool]) -> bool:
    """Whether a server's routes dial one of `wanted` ports on this machine (`here`, a
    ThisHost): found by review, another site's `reverse_proxy 192.0.2.10:<green's port>`
    counted as a front of green by its port alone, and on an h2c port the rollback waited
    and left the old slot running for connections that never reach this machine."""
    return any(_port(d) in wanted and here(d) for d in every_dial(server.get("routes")))


def slot_fronts(config: Any, ports: Iterable[int], here: Callable[[str], bool]) -> Listens:
    """The listening ports (as ranges) of Caddy's HTTP servers whose routes dial one of
    `ports` on this machine (`here`): every port a user may reach a slot through (`:80,
    :443`, an h2c port), not only the one verification asks, `proxy_url`'s."""
    wanted = set(ports)
    servers = (((config or {}).get("apps") or {}).get("http") or {}).get("servers") or {}
    found: list[tuple[int, int]] = []
    for server in servers.values() if isinstance(servers, dict) else ():
        if not isinstance(server, dict) or not _dials_here(server, wanted, here):
            continue
        for address in server.get("listen") or ():
            first, _, last = str(address).rpartition(":")[2].partition("-")
            if first.isdigit() and (not last or last.isdigit()):
                found.append((int(first), int(last or first)))
    return tuple(dict.fromkeys(found))


def front_listens(config: Any, ports: Iterable[int],
                  here: Callable[[str], bool]) -> tuple[str, ...]:
    """The listen addresses of Caddy's HTTP servers whose routes dial one of `ports` on this
    machine (`here`)."""
    wanted = set(ports)
    servers = (((config or {}).get("apps") or {}).get("http") or {}).get("servers") or {}
    found: list[str] = []
    for server in servers.values() if isinstance(servers, dict) else ():
        if isinstance(server, dict) and _dials_here(server, wanted, here):
            found += [str(a) for a in server.get("listen") or ()]
    return tuple(dict.fromkeys(found))


def _listens_at(listen: str, host: str, port: int) -> bool:
    """Whether Caddy's listen address `listen` (`:80`, `127.0.0.2:8080-8089`,
    `tcp/[::1]:80`) accepts a connection to `host`:`port` made on this host."""
    import socket

    network, slash, rest = listen.partition("/")
    if slash and network.lower() in _NETWORKS:
        listen = rest
    where, _, ports = listen.rpartition(":")
    first, _, last = ports.partition("-")
    if not first.isdigit() or not (last.isdigit() or not last) \
            or not int(first) <= port <= int(last or first):
        return False
    where = where.strip("[]").lower()
    if where in ("", "0.0.0.0", "::"):
        return True

    def addresses(name: str) -> set[str]:
        try:
            return {str(i[4][0]).split("%")[0]
                    for i in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)}
        except (OSError, UnicodeError):
            return set()

    return where == host.strip("[]").lower() or bool(addresses(where) & addresses(host))


def relay_listens_at(config: Any, host: str, port: int) -> bool:
    """Whether a site of Caddy's JSON `config` accepts a connection to `host`:`port` made on
    this host and relays it elsewhere: never a site whose own routes dial `port`, which
    would send a connection there back to itself (found by review)."""
    servers = (((config or {}).get("apps") or {}).get("http") or {}).get("servers") or {}
    return any(_listens_at(str(listen), host.strip("[]"), port)
               for server in (servers.values() if isinstance(servers, dict) else ())
               if isinstance(server, dict)
               and not any(_port(d) == port for d in every_dial(server.get("routes")))
               for listen in server.get("listen") or ())


_UNREACHED = ("connection refused", "cannot connect")
# said in a plan whose traffic moves while the proxy fails a healthy slot (proxy_side):
# warned, not refused, since a failure in the serving slot's own upstream (its address) is
# ended by the switch, and one that is not fails the verification, undone exactly
PROXY_SIDE_MOVE = "the switch will likely fail its verification and be undone"


def proxy_url_missed(env: Environment, found: Traffic) -> str | None:
    """Why verification can never see what users see, or None: proxy_url refuses
    connections (or none completes in time) while Caddy's admin API answered, the serving
    slot is healthy, and neither Caddy's loaded config nor the Caddyfile listens at any
    address proxy_url names (its site bound to another address or port). A switch would move
    users, fail its verification and its undo's the same way: a false "traffic may not be
    where it was" (exit 5), found by review. Anything else is an outage, left to roll back
    from: a loaded config moved off the Caddyfile's address refuses every user there, and a
    Caddy in a container off the host's network listens on ports Docker publishes as others
    (both found by review: "fix proxy_url" hid the outage)."""
    from urllib.parse import urlsplit

    error = found.proxy_error
    if error is None or found.slot is None or not found.listens:
        return None
    why = error.removeprefix(f"{env.caddy.proxy_url}{env.caddy.verify_path}: ")
    if not why.startswith(_UNREACHED) and not (why.startswith("timed out after")
                                               and "HTTP" not in why):
        return None
    url = urlsplit(env.caddy.proxy_url)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        return None
    host = url.hostname
    if host is None or any(_listens_at(a, host, port) for a in found.listens) \
            or not _ports_are_the_hosts(env):
        return None
    from runbook import caddy, health

    try:
        on_disk = caddy.adapt(env, caddy.read(env))
    except RunbookError:
        return None
    disk = front_listens(on_disk, [s.port for s in env.slots.values()], ThisHost(env))
    if not disk or any(_listens_at(a, host, port) for a in disk):
        return None  # not known, or the Caddyfile listens there: Caddy was moved off it
    if not health.probe(env.slot(found.slot), env.health.path,
                        env.health.request_timeout).ok:
        return None
    return (f"proxy_url {env.caddy.proxy_url} gets no answer ({why}), but Caddy runs and "
            f"sends the app to {found.slot}, which is healthy: Caddy's site listens on "
            f"{', '.join(found.listens)} (the Caddyfile: {', '.join(disk)}), not at "
            "proxy_url: either [caddy] proxy_url is wrong and no switch could be verified "
            "through it, or Caddy was moved off proxy_url's address and users there get "
            "no answer")


def _ports_are_the_hosts(env: Environment) -> bool:
    """Whether Caddy's listen addresses are this host's: not when it runs in a container
    (`[caddy] command` through docker, or `container_path` set) off the host's network,
    whose `:80` Docker may publish as `:8080`, or whose network is not known."""
    from runbook import docker
    from runbook.caddy_command import exec_container, runs_in_container

    if not runs_in_container(env) and env.caddy.container_path is None:
        return True
    name = exec_container(env.caddy.command)
    if name is None:
        return False
    try:
        info = docker.inspect(name)
    except RunbookError:
        return False
    return info.exists and info.bindings is None  # on the host's network


def proxy_side(env: Environment, found: Traffic, healthy: bool | None = None) -> str | None:
    """Why the proxy, not the slot, fails users, or None: it answers 5xx (Caddy's own, no
    slot header) while the one slot it sends to answers healthy on its own port (`healthy`:
    that slot's own answer as the caller read it; None: asked here). A switch cannot end
    that (found by review: an h2c transport to an HTTP/1.1 app got 502 for every slot; the
    switch failed, its undo's verification too, and status named the same switch again)."""
    if found.slot is None or found.proxy_error is None or found.proxy_status is None \
            or found.proxy_status < 500:
        return None
    if healthy is None:
        from runbook import health

        healthy = health.probe(env.slot(found.slot), env.health.path,
                               env.health.request_timeout).ok
    if not healthy:
        return None
    return (f"the proxy answers HTTP {found.proxy_status} for the {found.slot} slot, and the "
            f"{found.slot} slot answers healthy on its own port ({env.slot(found.slot).port}): "
            "the proxy, not the slot, fails")


def proxy_side_fix(env: Environment) -> str:
    """Where a proxy-side failure is read and mended: Caddy's log and the managed block's
    reverse_proxy settings (a transport, TLS or header its upstreams do not speak)."""
    from runbook.caddy_command import log_command

    return (f"read Caddy's log ({log_command(env)}) and check the reverse_proxy settings "
            f"between the slot markers of {env.caddy.caddyfile} (its transport: the protocol "
            "versions, TLS, timeouts it dials the app with); moving traffic to another slot "
            "cannot fix what the proxy does")


def proxy_side_warning(env: Environment, found: Traffic) -> str | None:
    """A plan's warning, when its traffic would move while the proxy fails a healthy slot:
    warned, not refused (PROXY_SIDE_MOVE says why)."""
    side = proxy_side(env, found)
    return None if side is None else f"{side}: {PROXY_SIDE_MOVE}; {proxy_side_fix(env)}"


def proxy_url_fix(env: Environment) -> str:
    return (f"if users reach the app at an address Caddy's site listens on, fix [caddy] "
            f"proxy_url in {env.source or 'the environment file'} to it; if they reach it at "
            "proxy_url, load the Caddyfile that listens there (`caddy reload`); then check "
            f"with `runbook status {command_arg(env)}`")


def h2c_port(found: Traffic, front: int | None) -> int | None:
    """A port where users reach the app and Caddy takes h2c: `front` (or, unknown, any h2c
    port), else any port of a server that proxies to a slot (`slot_fronts`); None: none."""
    if accepts_h2c(found.h2c, front):
        return front if front is not None else found.h2c[0][0]
    for lo, hi in found.h2c:
        for first, last in found.fronts:
            if lo <= last and first <= hi:
                return max(lo, first)
    return None


def unwatched_h2c(found: Traffic, front: int | None) -> int | None:
    """A port of a server that proxies to a slot and takes h2c, other than `front` (the one
    the drain watches): its held connections are never seen there. A global `servers {
    protocols h1 h2c }` makes the users' port AND a load balancer's take h2c."""
    for lo, hi in found.h2c:
        for first, last in found.fronts:
            if lo <= last and first <= hi and not (front is not None and first == last == front):
                return max(lo, first) if max(lo, first) != front else min(hi, last)
    return None


def accepts_h2c(h2c: Listens, front: int | None) -> bool:
    """Does the server on Caddy's `front` port accept h2c? With the port unknown: any."""
    return any(front is None or lo <= front <= hi for lo, hi in h2c)


def every_dial(config: Any) -> Iterator[str]:
    """Every `dial` in a Caddy JSON config, however deeply routes and subroutes nest, and
    every active health check's port (`health_port`, `health_upstream`): Caddy dials those
    too, and one on a slot stopped after the switch marks the serving upstream down."""
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "dial" and isinstance(value, str):
                    yield value
                elif key == "health_checks" and isinstance(value, dict) \
                        and isinstance(active := value.get("active"), dict):
                    if isinstance(port := active.get("port"), int) and port > 0:
                        yield f":{port}"
                    if isinstance(upstream := active.get("upstream"), str):
                        yield upstream
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


def _unresolved(config: Any) -> tuple[str, ...]:
    """Each upstream Caddy resolves only per request (a placeholder it keeps in the dial, a
    handler with `dynamic_upstreams`), as `<site>: <dial>`. The managed block refuses both,
    so these are another site's; which slot they reach cannot be told from the config."""
    found: list[str] = []
    servers = (((config or {}).get("apps") or {}).get("http") or {}).get("servers") or {}
    for server in servers.values() if isinstance(servers, dict) else ():
        if not isinstance(server, dict):
            continue
        for route in server.get("routes") or ():
            hosts = [str(h) for m in ((route.get("match") if isinstance(route, dict)
                                       else None) or ()) if isinstance(m, dict)
                     for h in m.get("host") or ()]
            site = ", ".join(hosts) or ", ".join(map(str, server.get("listen") or ()))
            found += [f"{site}: {d}" for d in every_dial(route) if "{" in d and _port(d) is None]
            found += [f"{site}: dynamic upstreams ({source})" for source in _dynamic(route)]
    return tuple(dict.fromkeys(found))


def _dynamic(node: Any) -> Iterator[str]:
    """The source module (`a`, `srv`, `multi`) of every `dynamic_upstreams` in `node`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "dynamic_upstreams":
                yield str(value.get("source") if isinstance(value, dict) else value)
            else:
                yield from _dynamic(value)
    elif isinstance(node, list):
        for item in node:
            yield from _dynamic(item)


def _port(dial: str) -> int | None:
    _host, sep, port = dial.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return int(port)


def loaded_config(env: Environment) -> Any:
    """Caddy's running config (JSON), or TrafficUnknownError."""
    return loaded_config_tagged(env)[0]


def loaded_config_tagged(env: Environment) -> tuple[Any, str | None]:
    """loaded_config and the ETag Caddy sent with it (None: a Caddy that sends none): the
    switch loads If-Match it, so a change loaded after this reading is never dropped."""
    from runbook.caddy.admin import config_etag

    url = f"{env.caddy.admin_url}/config/"
    try:  # a total deadline: a hung admin API must not hold the run (and its lock)
        response = bounded_http.request("GET", url, timeout=_TIMEOUT, max_body=None)
    except bounded_http.HttpFailure as exc:
        from runbook.caddy.admin import admin_unanswered, start_advice

        if (serving := admin_unanswered(env, exc.reason)) is not None:
            raise TrafficUnknownError(
                f"{serving.problem}, so which slot serves cannot be known; nothing was "
                "touched", f"{serving.fix}, then run again") from None
        raise TrafficUnknownError(
            f"Caddy is not running: its admin API at {url} does not answer "
            f"({exc.reason}), so which slot serves cannot be known; nothing was "
            "touched", f"{start_advice(env)} (or fix [caddy] admin_url), then run "
            "again") from None
    if response.status != 200:
        raise TrafficUnknownError(f"Caddy's admin API answered HTTP {response.status} "
                                  f"at {url}", "check Caddy's admin endpoint")
    try:
        return response.json(), config_etag(response)
    except ValueError:
        raise TrafficUnknownError(f"Caddy's admin API at {url} did not answer JSON",
                                  "check [caddy] admin_url points at Caddy's admin API"
                                  ) from None


def from_config(env: Environment, config: Any,
                outside: Callable[[], Counter[str] | None] | None = None) -> Traffic:
    """What `config` dials. `outside` (the dials the Caddyfile's part outside the markers
    makes, as Caddy adapts it: outside_addresses) tells the managed block's dials from other
    sites' by subtraction. A dial is a slot's when it is on the slot's port on this machine
    (`ThisHost`): another machine's service on the same port number is not the slot. When
    both slots are dialed and that leaves none, or it cannot be told, both stay (and every
    caller fails closed). When one slot is dialed by other sites alone (the
    managed block dials a port no slot has: the guide's "Caddyfile targets the wrong port"),
    no slot serves (found by review: that slot was taken to serve while users got 502s, and
    the switch that repairs it was refused as "nothing to switch")."""
    every = list(every_dial(config))
    dials = tuple(dict.fromkeys(every))
    by_port = {cfg.port: slot for slot, cfg in env.slots.items()}
    here = ThisHost(env)
    counts = _slot_counts(env, every, here)
    slots = frozenset(by_port[p] for p in counts)
    pinned: frozenset[Slot] = frozenset()
    made = outside() if slots and outside is not None else None
    fixed = None if made is None else _slot_counts(env, made.elements(), here)
    if fixed is not None:
        managed = frozenset(by_port[p] for p in counts - fixed)
        if managed or len(slots) == 1:
            slots = managed
            pinned = frozenset(by_port[p] for p in fixed if p in by_port)
    # the subtraction not made for want of the managed block: said as that (found by review:
    # "dials both slots' ports" offered the switch, which refused on the very markers)
    markers = markers_problem(env) if len(slots) > 1 and outside is not None \
        and fixed is None else None
    differs = (len(slots) > 1 and outside is not None and fixed is None and markers is None
               and outside_differs(env, config))
    if unresolved := _unresolved(config):  # cannot tell: fail closed for both slots
        pinned = frozenset(env.slots)
    return Traffic(slots=slots, dials=dials, h2c=h2c_listens(config), pinned=pinned,
                   dialed=tuple(sorted(counts.items())), unresolved=unresolved,
                   # the serving slot's sites: a site pinned to the other slot (outside the
                   # markers) keeps dialing it whatever the drain waits for
                   fronts=slot_fronts(config, [env.slot(s).port for s in slots], here),
                   listens=front_listens(config, [env.slot(s).port for s in slots], here),
                   markers=markers, outside_differs=differs)


def markers_problem(env: Environment) -> tuple[str, str] | None:
    """(message, fix) when the Caddyfile on disk is there but its slot marker lines cannot be
    read (caddy.SlotMarkersError); None otherwise (an unreadable file is said elsewhere)."""
    from runbook.caddy import SlotMarkersError, find_block, markers_imported

    try:
        text = env.caddy.caddyfile.read_text(encoding="utf-8")
        find_block(text)
    except (OSError, UnicodeError):
        return None
    except SlotMarkersError as exc:
        markers_imported(env, text, exc)  # the block in a file it imports: named
        return exc.message, exc.fix or ""
    return None


def no_single_slot_fix(env: Environment, found: Traffic) -> str:
    """The way out when Caddy serves no single slot, one that works: marker lines that
    cannot be read are fixed in the file (a switch refuses them too: on-call went round in a
    circle); otherwise a switch to the healthy slot repoints Caddy."""
    if found.markers is not None:
        return f"in {env.caddy.caddyfile}: {found.markers[1]}, then run again"
    if found.outside_differs:  # a switch would load that edit too, blind to which slot
        return (f"make {env.caddy.caddyfile} outside the slot markers what Caddy runs: undo "
                f"the edit not loaded (`curl -s {env.caddy.admin_url}/config/` shows what "
                "runs), or, if it is meant, load it the way this host reloads Caddy, with the "
                "managed block naming the slot that serves now; then `runbook status "
                f"{command_arg(env)}` again (a `runbook switch` would load that edit too)")
    if found.conflict:  # a switch is refused too: never offered (found by review)
        return (f"check that [caddy] admin_url ({env.caddy.admin_url}) and proxy_url "
                f"({env.caddy.proxy_url}) in {env.source or 'the environment file'} reach "
                f"the same Caddy (`curl -s {env.caddy.admin_url}/config/` shows what it "
                f"dials), and that the header_down {SLOT_HEADER} between the slot markers of "
                f"{env.caddy.caddyfile} names the slot whose port it dials; then check with "
                f"`runbook status {command_arg(env)}`: no rollback, deploy or switch runs "
                "until they agree")
    return ("see `runbook status`; repoint Caddy at the healthy slot with "
            f"`runbook switch {command_arg(env)} --slot <blue|green>`")


def cannot_tell(env: Environment, found: Traffic) -> PreconditionError:
    """The refusal, when planning, of a command that needs the one slot that serves."""
    return PreconditionError(f"cannot tell which slot takes traffic: {found.problem(env)}"
                             f"{NOTHING_CHANGED}", no_single_slot_fix(env, found))


NOTHING_CHANGED = "; nothing was changed"


def undo_config(env: Environment, running: Any, previous: Slot | None, target: Slot,
                loaded: Any, now: Any = None) -> tuple[Any, str | None]:
    """What the undo of a switch to `target` loads, and what to say of it. `running` (read
    before the switch) while Caddy runs what the switch loaded (`loaded`, read right after
    its reload; None: not read) or still what it ran before. Changed since by someone else
    (another environment's switch on the same Caddy, under its own lock), `running` would
    undo that too: Caddy's config as it is now with only our upstreams pointed back
    (pointed_back), or, those not told apart for sure, nothing (CaddyError, exit 5: the
    Caddyfile is then left as the switch wrote it, naming what runs). `now`: Caddy's config
    as the caller just read it (its ETag guards the load); read here when not given."""
    from runbook.caddy import CaddyError, first_difference, running_config

    now = running_config(env) if now is None else now
    if now is None or first_difference(now, running) is None \
            or (loaded is not None and first_difference(now, loaded) is None):
        return running, None  # unreadable: loading it says why, as before
    where = first_difference(running if loaded is None else loaded, now)
    since = ("since the switch loaded it" if loaded is not None else
             "from what it ran before the switch, whose own load could not be read")
    moved, why = pointed_back(env, now, target, previous, loaded)
    if moved is not None and first_difference(moved, running) is None:
        # only our own switch differed (its load went unread: a reload that raised after
        # Caddy applied it, a signal): nothing of anyone else's to keep or to say (review)
        return running, None
    if moved is None:
        found = from_config(env, now, lambda: outside_addresses(env))
        serving = (f"{env.display}'s traffic is on {found.slot}" if found.slot is not None
                   else f"which slot takes {env.display}'s traffic cannot be told")
        raise CaddyError(
            f"Caddy's config had changed {since} (first at {where}), and {why}: loading the "
            "config it ran before would undo that change too, so nothing was loaded and "
            f"{env.caddy.caddyfile} was left as the switch wrote it; {serving}",
            f"see who changed Caddy (`curl {env.caddy.admin_url}/config/`), then check "
            f"`runbook status {command_arg(env)}` and, to put it back on {previous or 'its slot'}, "
            f"run `runbook switch {command_arg(env)} --slot {previous or '<blue|green>'}`",
            stage="restore", exit_code=ExitCode.ATTENTION)
    return moved, (f"Caddy's config had changed {since} (first at {where}): that change was "
                   f"kept, and only {env.display}'s upstreams were pointed back at {previous}")


def pointed_back(env: Environment, config: Any, target: Slot, source: Slot | None,
                 loaded: Any = None) -> tuple[Any | None, str | None]:
    """`config` (Caddy's running config) with this environment's upstreams moved from
    `target` back to `source`: each dial, active health check and slot header on `target`'s
    port, in the routes that dial it, and nothing else. Why: the undo of a switch must not
    load the whole config read before it over a change made since (another environment's
    switch on the same Caddy). Which dials are ours is told as `from_config` tells them:
    by the slot's port, less those the Caddyfile's part outside the markers makes. `loaded`:
    the config the switch loaded, when read. Returns (config, None), or (None, why) when our
    dials cannot be told apart for sure (the caller then loads nothing)."""
    import copy

    if source is None or source == target:
        return None, f"which slot served {env.display} before the switch is not known"
    port, back = env.slot(target).port, env.slot(source).port
    here = ThisHost(env)
    found = _slot_counts(env, every_dial(config), here)[port]
    if not found:
        return None, (f"it dials nothing on {target}'s port {port}: the switch's routes are "
                      "gone")
    if loaded is not None and (had := _slot_counts(env, every_dial(loaded), here)[port]) != found:
        return None, (f"it dials {target}'s port {port} {found} time(s), the config the switch "
                      f"loaded {had}")
    outside = outside_addresses(env)
    if outside is None:
        return None, (f"which of its dials of port {port} are the slot markers' cannot be told "
                      "(Caddy did not adapt the Caddyfile's part outside them)")
    if _slot_counts(env, outside.elements(), here)[port]:
        return None, (f"a site outside the slot markers of {env.caddy.caddyfile} dials "
                      f"{target}'s port {port} too")
    moved = copy.deepcopy(config)
    servers = (((moved or {}).get("apps") or {}).get("http") or {}).get("servers") or {}
    for server in servers.values() if isinstance(servers, dict) else ():
        for route in (server.get("routes") or ()) if isinstance(server, dict) else ():
            if any(_port(d) == port and here(d) for d in every_dial(route)):
                _repoint(route, port, back, str(target), str(source), here)
    if _slot_counts(env, every_dial(moved), here)[port]:
        return None, f"it dials {target}'s port {port} outside an HTTP server's routes"
    return moved, None


def _repoint(node: Any, port: int, back: int, target: str, source: str,
             here: Callable[[str], bool]) -> None:
    """In place: every dial on `port` of this machine (`here`: another machine's service on
    that port number is left alone) and active health check on `port` to `back`, and every
    SLOT_HEADER value `target` to `source` (the managed block's header_down)."""
    if isinstance(node, list):
        for item in node:
            _repoint(item, port, back, target, source, here)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "dial" and isinstance(value, str) and _port(value) == port and here(value):
            node[key] = f"{value.rpartition(':')[0]}:{back}"
        elif key.lower() == SLOT_HEADER.lower() and isinstance(value, list):
            node[key] = [source if v == target else v for v in value]
        else:
            if key == "health_checks" and isinstance(value, dict) \
                    and isinstance(active := value.get("active"), dict):  # as every_dial reads
                if active.get("port") == port:
                    active["port"] = back
                if isinstance(up := active.get("upstream"), str) and _port(up) == port:
                    active["upstream"] = f"{up.rpartition(':')[0]}:{back}"
            _repoint(value, port, back, target, source, here)


def _pinned(env: Environment) -> frozenset[Slot]:
    """Slots the part of the Caddyfile outside the markers proxies to (empty: none, or it
    cannot be told)."""
    by_port = {cfg.port: slot for slot, cfg in env.slots.items()}
    made = outside_addresses(env) or Counter()
    return frozenset(by_port[p] for p in _slot_counts(env, made.elements(), ThisHost(env)))


def outside_dials(env: Environment, running: Any = None) -> Counter[int] | None:
    """The ports of outside_addresses: what the Caddyfile's part outside the slot markers
    dials, by port, whatever the host."""
    made = outside_addresses(env, running)
    return None if made is None else Counter(
        p for d in made.elements() if (p := _port(d)) is not None)


def outside_addresses(env: Environment, running: Any = None) -> Counter[str] | None:
    """The dials (`host:port`) the Caddyfile's part outside the slot markers makes, as
    Caddy's own adapter (`POST /adapt`, nothing loaded) reads it; None when the file or
    Caddy cannot say.

    With `running` (Caddy's loaded config), only when the file's part outside the markers is
    what runs: the file with its managed block pointed at one slot or the other must adapt
    to the very config Caddy runs (its `apps`). A pinned site edited on disk but not loaded
    (moved from green to blue) would otherwise tell the managed block's dials wrong, and the
    serving slot pass for the standby. Either slot is tried because the managed block on disk may be
    ahead of Caddy (a run killed between writing the file and reloading Caddy), which the
    next run must still read, to finish it."""
    import hashlib
    import json

    try:
        raw = env.caddy.caddyfile.read_text(encoding="utf-8")
    except (OSError, UnicodeError):
        return None
    # one answer per file and running config in a process: a rollback reads traffic several
    # times (plan, switch, stop) and each reading was up to four `POST /adapt` round trips
    key = (f"{env.caddy.caddyfile} {sorted((str(s), c.port) for s, c in env.slots.items())}",
           raw, None if running is None else hashlib.sha1(
        json.dumps(running, sort_keys=True, default=str).encode()).hexdigest())
    found = _OUTSIDE.get(key)
    if found is None:
        found = _outside_dials(env, raw, running)
        if found is None:
            return None  # not kept: a Caddy that could not say now may say next time
        if len(_OUTSIDE) > 16:
            _OUTSIDE.clear()
        _OUTSIDE[key] = found
    return Counter(found)


_OUTSIDE: dict[tuple[str, str, str | None], Counter[str]] = {}


def _outside_dials(env: Environment, raw: str, running: Any) -> Counter[str] | None:
    from runbook.caddy import admin
    from runbook.caddy import text as caddytext

    try:
        start, end = caddytext.find_block(raw)
        if not _may_dial_a_slot(env, raw[:start] + raw[end:]):
            return Counter()  # said by the text itself: no Caddy round trip (most hosts)
        answer = admin.adapt(env, raw[:start] + raw[end:])
        if answer is None:
            return None
        if running is not None:
            # the whole apps tree, not the dial counts: a pinned site moved from green to
            # blue while the block moved from blue to green dials the same ports as before
            want = running.get("apps") if isinstance(running, dict) else None
            # the file as it is first (its block may dial no slot: a wrong port), then with
            # its block on either slot
            def candidates() -> Iterator[str]:  # adapted one at a time, until one matches
                yield raw
                for slot in env.slots:
                    yield caddytext.rewrite(raw, env, slot)

            if want is None or not any(
                    isinstance(whole := admin.adapt(env, text), dict)
                    and whole.get("apps") == want for text in candidates()):
                return None  # the part outside the markers is not what runs: cannot tell
    except (OSError, UnicodeError, RunbookError):
        return None
    return Counter(every_dial(answer))


def outside_differs(env: Environment, running: Any) -> bool:
    """Whether the Caddyfile's part outside the slot markers is surely not what Caddy runs
    (`running`, its loaded config): the file, with its managed block as written or pointed
    at either slot, adapts to none of Caddy's `apps`. False when that cannot be told (the
    file or the adapter did not answer). Asked only once the dials could not be told apart."""
    from runbook.caddy import admin
    from runbook.caddy import text as caddytext

    want = running.get("apps") if isinstance(running, dict) else None
    if want is None:
        return False
    try:
        raw = env.caddy.caddyfile.read_text(encoding="utf-8")
        texts = [raw, *(caddytext.rewrite(raw, env, slot) for slot in env.slots)]
        adapted = [admin.adapt(env, text) for text in texts]
    except (OSError, UnicodeError, RunbookError):
        return False
    if any(not isinstance(whole, dict) for whole in adapted):
        return False
    return all(whole.get("apps") != want for whole in adapted if isinstance(whole, dict))


def _may_dial_a_slot(env: Environment, outside: str) -> bool:
    """Whether the Caddyfile's part outside the markers may dial a slot's port: it names one
    (`:8081`), or it imports a file or reads a placeholder, which the text cannot tell.
    False only when surely not (then nothing outside is subtracted, as Caddy would say)."""
    import re

    if re.search(r"(?m)^\s*import\b|\{\$|\{env\.", outside):
        return True
    # the port as a number anywhere (`:8081`, `:08081`, `health_port 8081`, `to 8081`)
    return any(re.search(rf"(?<![\w.])0*{cfg.port}(?!\d)", outside)
               for cfg in env.slots.values())


def managed_dials(env: Environment, running: Any) -> tuple[str, ...]:
    """The upstreams the managed block of Caddy's loaded config (`running`) dials, as far as
    can be told: every dial but those the Caddyfile's part outside the markers makes
    (outside_dials, by port); when that cannot be told, every dial of the servers that dial
    a slot (every route to a slot). Why: which slot serves is counted on slot ports alone,
    so a route of the block sent to a third port (users get 502 there) went unseen."""
    outside = outside_dials(env, running)
    if outside is None:
        ports = {cfg.port for cfg in env.slots.values()}
        servers = (((running or {}).get("apps") or {}).get("http") or {}).get("servers") or {}
        routes = [s.get("routes") for s in (servers.values() if isinstance(servers, dict)
                                            else ()) if isinstance(s, dict)]
        routes = [r for r in routes if any(_port(d) in ports for d in every_dial(r))]
        return tuple(dict.fromkeys(d for r in routes for d in every_dial(r)))
    left, found = Counter(outside), []
    for dial in every_dial(running):
        if (port := _port(dial)) is not None and left[port] > 0:
            left[port] -= 1
            continue
        found.append(dial)
    return tuple(dict.fromkeys(found))


def _port_counts(config: Any) -> Counter[int]:
    return Counter(p for d in every_dial(config) if (p := _port(d)) is not None)


def _slot_counts(env: Environment, dials: Iterable[str],
                 here: Callable[[str], bool]) -> Counter[int]:
    """How many of `dials` reach each slot's port on this machine (`here`), by port."""
    ports = {cfg.port for cfg in env.slots.values()}
    return Counter(p for d in dials if (p := _port(d)) in ports and here(d))


class ThisHost:
    """Whether a dial reaches this machine: only such a dial on a slot's port is the slot's.
    Found by review: a site proxying to another machine's service that happens to use a
    slot's port number (`192.0.2.10:<green's port>`) counted as pinning green, so rollback
    and deploy refused to recreate green and told on-call to repoint an unrelated service.
    This machine: no host (a health check's port), localhost, host.docker.internal, a
    loopback address or one of this host's, its name, a slot's `host`, or a slot
    container's names and addresses (a Caddy on Docker's network). A name that does not
    resolve here within `_resolved`'s deadline, or a host when Docker cannot be asked,
    counts as this machine's: what cannot be told is not taken for another machine (fail
    closed: the slot stays pinned)."""

    def __init__(self, env: Environment) -> None:
        self._env = env
        self._judged: dict[str, bool] = {}
        self._containers: frozenset[str] | None = None

    def __call__(self, dial: str) -> bool:
        host = _dial(dial)[0].split("%")[0]
        if host not in self._judged:
            self._judged[host] = self._judge(host)
        return self._judged[host]

    def _judge(self, host: str) -> bool:
        import ipaddress
        import socket  # gethostname only: no lookup

        from runbook.caddy.text import THIS_HOST_NAMES, local_address

        if not host or "{" in host or host in THIS_HOST_NAMES or local_address(host) \
                or host in {cfg.host.strip("[]").lower() for cfg in self._env.slots.values()} \
                or host == socket.gethostname().lower():
            return True
        containers = self.containers()
        if containers is None or host in containers:
            return True
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return False  # an address neither of this host nor of a slot's container
        # its own name (fully qualified too) is told by the addresses it resolves to here
        if (found := _resolved(host)) is None:
            return True  # not resolvable here in time: where Caddy leads it cannot be told
        return any(local_address(a) or a in containers for a in found)

    def containers(self) -> frozenset[str] | None:
        """The names and addresses of the slots' containers (None: Docker cannot say)."""
        from runbook import docker

        if self._containers is None:
            try:
                self._containers = frozenset().union(*(
                    docker.inspect(cfg.container).addresses for cfg in self._env.slots.values()))
            except RunbookError:
                return None
        return self._containers


_RESOLVE_DEADLINE = 1.0  # seconds one name's lookup may take, once per process
_RESOLVED: dict[str, frozenset[str] | None] = {}


def _resolved(host: str) -> frozenset[str] | None:
    """The addresses `host` resolves to here; None when it does not resolve, or not within
    _RESOLVE_DEADLINE (callers count that as this machine: fail closed). Found by review:
    ThisHost's lookups had no deadline, so with DNS unreachable every traffic read, plan,
    status, the check before stopping a container and the undo of a failed verify waited the
    resolver's own timeouts (glibc: 5 s, twice, per nameserver and search domain), with
    Ctrl-C held until the C call returned. So the lookup runs in a daemon thread this one
    stops waiting for, and each name's answer (or its timeout) is kept for the process:
    every ThisHost, and each command's several reads, would ask again."""
    import socket

    from runbook.probes import Probe

    if host in _RESOLVED:
        return _RESOLVED[host]
    lookup = Probe(lambda: socket.getaddrinfo(host, None, type=socket.SOCK_STREAM), "resolve")
    lookup.settle(_RESOLVE_DEADLINE)
    found: frozenset[str] | None = None
    if lookup.done:
        try:
            found = frozenset(str(i[4][0]).split("%")[0].lower() for i in lookup.result())
        except (OSError, UnicodeError):
            found = None
    if len(_RESOLVED) > 64:
        _RESOLVED.clear()
    _RESOLVED[host] = found
    return found


def slot_peers(dials: Iterable[str], port: int,
               here: Callable[[str], bool]) -> frozenset[str] | None:
    """The addresses Caddy reaches the slot on `port` at, from upstreams it ran (`dials`):
    the drain counts only Caddy's sockets with one of them as peer (runbook/drain.py), not
    this host's connection to another service on that port number. A dial `here` says is
    another machine's is not the slot. None where they cannot be told, and the drain counts
    every socket on the port (fail closed): no dial on that port, a host left empty (a health
    check's `:8081`), a placeholder, the unspecified address, a name other than localhost
    (a container's name, dialed from Caddy's own network namespace; a DNS name, which Caddy's
    resolver may have answered otherwise)."""
    import ipaddress

    found: set[str] = set()
    for dial in dials:
        host, dialed = _dial(dial)
        if dialed != port or not here(dial):
            continue
        host = drain.normal_host(host)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            # a name: only localhost is told (loopback, RFC 6761, whatever either resolver
            # picks); another name's answers are this host's resolver's at this moment, and
            # Caddy's may have dialed another address (DNS round robin, a changed record): not
            # told, every socket counts (fail closed)
            if host != "localhost" and not host.endswith(".localhost"):
                return None
            resolved = _resolved(host)
            found |= {"127.0.0.1", "::1"} | {drain.normal_host(a) for a in resolved or ()}
            continue
        if address.is_unspecified:
            return None
        found.add(str(address))
    return frozenset(found) or None


def ask_proxy(env: Environment) -> tuple[str | None, str | None, str | None, int | None]:
    """(X-Togather-Slot, error, unverifiable, HTTP status) as the proxy answers right now, on
    a fresh connection. `unverifiable` describes an answer below 500 without the header, or a TLS
    certificate that does not verify (Caddy's local CA: users are served, nothing here can
    tell by whom); `error` no answer, or a 5xx without it (Caddy's own, an upstream down: an
    outage to roll back from, not a fault of the URL)."""
    c = env.caddy
    url = f"{c.proxy_url}{c.verify_path}"
    try:
        response = bounded_http.request("GET", url, timeout=_TIMEOUT, site=c.site,
                                        ca_file=None if c.ca_file is None else str(c.ca_file))
    except bounded_http.HttpFailure as exc:
        if exc.untrusted:
            return None, None, (f"{UNTRUSTED} for {c.site or url} at {url} ({exc.reason})"), None
        return None, f"{url}: {exc.reason}", None, None
    header, status = response.header(SLOT_HEADER), response.status
    if header is None and status >= 500:  # Caddy's own: users get this too
        return None, f"{url} answers HTTP {status} without {SLOT_HEADER}", None, status
    if header is None and status < 500:
        where = response.header("Location")
        return None, None, (f"GET {url}" + (f" (Host: {env.caddy.site})" if env.caddy.site
                                            else "") + f" answers HTTP {status}"
                            + (f" (to {where})" if where else "")), status
    return header, None, None, status


def read(env: Environment, *, proxy: bool = True) -> Traffic:
    """Where traffic goes now. Raises TrafficUnknownError when Caddy cannot be asked.

    The proxy is asked at the same moment as the admin API (two independent witnesses, each
    a loopback round trip through Caddy: asked one after the other they were most of the
    planner's wait for a running standby)."""
    if not proxy:
        running = loaded_config(env)
        return from_config(env, running, lambda: outside_addresses(env, running))
    from runbook.probes import Probe

    witness = Probe(lambda: ask_proxy(env), "ask-proxy")
    try:
        running = loaded_config(env)
        found = from_config(env, running, lambda: outside_addresses(env, running))
    except BaseException:
        witness.settle(1.0)  # a refused read is not held up by the other witness
        raise
    header, error, unverifiable, status = witness.result()
    return dataclasses.replace(found, proxy_slot=header, proxy_error=error,
                               proxy_unverifiable=unverifiable, proxy_status=status)


def serving_now(env: Environment) -> Slot | None:
    """The slot Caddy's loaded config sends users to; None when Caddy cannot be read or
    sends to no single slot (callers then claim nothing)."""
    try:
        return read(env, proxy=False).slot
    except RunbookError:
        return None


def serving_stopped(env: Environment) -> tuple[Slot, docker.ContainerInfo] | None:
    """(slot, its container as Docker has it) when the slot Caddy's loaded config sends
    users to is not running: the outage the restore, the executor's undo and `status` must
    name. None when it runs or Caddy cannot tell; Docker's own errors are the caller's."""
    from runbook import docker

    slot = serving_now(env)
    if slot is None:
        return None
    info = docker.inspect(env.slot(slot).container)
    return None if info.running else (slot, info)


def refuse_if_unverifiable(env: Environment, found: Traffic) -> None:
    """Refuse a switch that could never be verified: where verification asks, the proxy
    answers without the slot header, so the switch would move users, fail its verification,
    and its undo's own verification would fail the same way (a false "could not be undone"
    after stopping the slot that had passed its gate). Said before anything changes. An
    untrusted TLS certificate is refused whatever the slots' health: no answer through the
    proxy could be verified."""
    if (missed := proxy_url_missed(env, found)) is not None:
        raise PreconditionError(f"{missed}; nothing was changed", proxy_url_fix(env))
    if found.slot is None or found.proxy_slot is not None or not found.proxy_unverifiable:
        return
    if found.untrusted:
        raise PreconditionError(
            f"{found.proxy_unverifiable}: what the proxy serves cannot be verified, so a "
            "switch would move users, fail its verification and be undone; nothing was "
            "changed", untrusted_fix(env))
    from runbook import health

    # the serving slot down: Caddy's own error handling (`handle_errors` redirecting to a
    # status page, a maintenance route) may answer without the header, and the healthy
    # target's answers would carry it: an outage to roll back from, not a wrong URL
    serving = health.probe(env.slot(found.slot), env.health.path, env.health.request_timeout)
    if not serving.ok:
        return  # a block with no slot header: the switch asks the target itself
    if _block_without_header(env):  # does the app itself send it? asked of it directly
        from runbook import caddy

        problem = caddy.slot_header_problem(env, found.slot, attempts=1)
        if problem is not None:
            raise caddy.no_slot_header(env, found.slot, problem)
    raise PreconditionError(
        f"{found.proxy_unverifiable} without {SLOT_HEADER}, although Caddy's running config "
        f"sends the app to {found.slot}, which is healthy: that answer does not come through "
        "the slot markers' upstream, so no switch could be verified there; nothing was "
        "changed",
        "set [caddy] site to the host name Caddy serves the app at (and proxy_url to "
        "https://127.0.0.1 when it serves HTTPS only) or fix [caddy] proxy_url and "
        f"verify_path, then check with `runbook status {command_arg(env)}`")


def untrusted_fix(env: Environment) -> str:
    return (f"set [caddy] ca_file in {env.source or 'the environment file'} to the PEM file "
            "of the CA that signs the site (for `tls internal`, Caddy's local root: <caddy "
            "data dir>/pki/authorities/local/root.crt), or fix [caddy] site and proxy_url; "
            f"then check with `runbook status {command_arg(env)}`")


def _block_without_header(env: Environment) -> bool:
    from runbook import caddy

    try:
        return not caddy.inspect(caddy.read(env), env).headers
    except RunbookError:
        return False  # a file that cannot be read or parsed is refused on its own


def serving_slot(env: Environment) -> Slot:
    """The one slot Caddy sends traffic to, or PreconditionError (fail closed)."""
    found = read(env)
    problem = found.problem(env)
    if found.slot is None or problem is not None:
        raise cannot_tell(env, found)
    return found.slot


class ServingContainerError(RunbookError):
    """A step tried to stop, recreate or remove the container that serves traffic."""

    exit_code = ExitCode.ATTENTION


_NETWORKS = frozenset({"tcp", "tcp4", "tcp6", "udp", "udp4", "udp6"})


def _dial(address: str) -> tuple[str, int | None]:
    """(host, port) of a dial address (`name:8080`, `[fd00::2]:8080`, with Caddy's network
    first: `tcp/name:8080`), the host lower-cased."""
    network, slash, rest = address.partition("/")
    if slash and network.lower() in _NETWORKS:
        address = rest
    head, _, tail = address.rpartition(":")
    if head and tail.isdigit():
        return head.strip("[]").lower(), int(tail)
    return address.strip("[]").lower(), None


def _dial_port(address: str) -> int | None:
    return _dial(address)[1]


def dial_host(address: str) -> str:
    """The host of a dial address, lower-cased, without brackets or network."""
    return _dial(address)[0]


def dial_port(address: str) -> int | None:
    """The port of a dial address (None: none written)."""
    return _dial(address)[1]


def check_slot_ports(env: Environment) -> None:
    """Each slot's container publishes the port the environment names for it. Which slot
    serves is read from the ports Caddy dials: with the ports swapped (a `-p` typo, a
    swapped compose file, a wrong [slots] entry) the serving container was taken for the
    standby, recreated and then stopped. Refused (exit 4) before anything changes; a
    container whose ports cannot be read (host network) is not judged here."""
    from runbook import docker

    found = {slot: docker.inspect(env.slot(slot).container) for slot in Slot}
    for slot, info in found.items():
        # a stopped one is judged when it runs (a recreate may change its ports)
        if info.running and (said := port_mismatch(env, slot, info, found[slot.other])
                             ) is not None:
            raise PreconditionError(f"{said[0]}: which slot serves cannot be told from the "
                                    "ports Caddy dials; nothing was changed", said[1])


def port_mismatch(env: Environment, slot: Slot, info: docker.ContainerInfo,
                  other_info: docker.ContainerInfo | None) -> tuple[str, str] | None:
    """(problem, fix) when the slot's container publishes host ports, none of them the port
    the environment names for the slot: the file pairs a container and a port that are not
    one slot's. None when they match, or what it publishes is not known (host network) or
    nothing (it is judged by the port alone then). The fix says which entry to mend: the
    container's slot label naming the other slot is a swapped container; both ports when
    the other slot's container (`other_info`) publishes this slot's port; the container
    itself when it publishes the other slot's port (the file cannot pair both slots with
    one port) or is stopped (`docker port` and `docker ps --filter publish` show nothing
    then: found by review, the fix pointed at them); else the port."""
    config = env.slot(slot)
    if not info.exists or not info.published or config.port in info.published:
        return None
    shown = _port_list(info.published)
    other = env.slot(slot.other)
    whose = f" (and {other.port} for the {slot.other} slot)" if other.port in info.published \
        else ""
    where = env.source or "the environment file"
    from runbook.docker import SLOT_LABEL

    labelled = (info.labels or {}).get(SLOT_LABEL)
    name = config.container
    asked = f"`docker inspect -f '{{{{json .HostConfig.PortBindings}}}}' {name}`"
    if labelled == str(slot.other):
        fix = (f"{name} carries {SLOT_LABEL}={labelled}: set [slots.{slot}] "
               f"container (and service) in {where} to the {slot} slot's own (are "
               f"[slots.{slot}] and [slots.{slot.other}] swapped?)")
    elif whose and other_info is not None and other_info.published is not None \
            and config.port in other_info.published and other.port not in other_info.published:
        fix = (f"swap the ports of [slots.{slot}] and [slots.{slot.other}] in {where}: each "
               "slot's container publishes the port the file names for the other")
    elif whose:
        wrong = sorted({(ip, inside) for inside, host, ip in info.bindings or ()
                        if host == other.port})
        publish = " ".join(f"-p {ip + ':' if ip else ''}{config.port}:{inside}"
                           for ip, inside in wrong) or f"port {config.port}"
        fix = (f"re-create {name} publishing its own slot's port ({publish}) in place of "
               f"the {slot.other} slot's {other.port} ({asked} shows what it publishes); "
               "the environment file cannot name one port for both slots"
               + _unless_labelled(labelled, slot, f" (or, if [slots.{slot}] and "
                                  f"[slots.{slot.other}] name each other's container, swap "
                                  f"them in {where})"))
    elif not info.running:  # `docker port` shows nothing for it
        fix = (f"{asked} shows the port it publishes when started: re-create {name} "
               f"publishing port {config.port}, or set [slots.{slot}] port in {where} to "
               "the one it publishes"
               + _unless_labelled(labelled, slot, f", or [slots.{slot}] container to the "
                                  f"one that publishes port {config.port}"))
    elif labelled == str(slot):
        fix = (f"set [slots.{slot}] port in {where} to the one `docker port "
               f"{name}` shows (or fix the container's published port)")
    else:  # which of the two is wrong cannot be told from the container
        fix = (f"make [slots.{slot}] in {where} name one slot's container and port: the "
               f"port `docker port {name}` shows, or the container that "
               f"publishes port {config.port} (`docker ps -a --filter "
               f"publish={config.port}`)")
    return (f"{name} publishes port {shown}, but the environment names port "
            f"{config.port} for the {slot} slot{whose}", fix)


def _unless_labelled(labelled: str | None, slot: Slot, alternative: str) -> str:
    """`alternative` (another entry that may be the wrong one) unless the container's slot
    label says it is this slot's."""
    return "" if labelled == str(slot) else alternative


def _port_list(ports: Iterable[int]) -> str:
    """Ports as said to on-call: consecutive ones as `a-b` (a published range)."""
    runs: list[list[int]] = []
    for port in sorted(ports):
        if runs and port == runs[-1][-1] + 1:
            runs[-1].append(port)
        else:
            runs.append([port])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


_LEFT_RUNNING = ("it is left running; see `runbook status` (an earlier step that could not put "
                 "Caddy back, said above, a concurrent change, or a bug)")


def refuse_if_serving(env: Environment, slot: Slot, action: str) -> Traffic:
    """The invariant, checked at the moment of acting (not when planning): never stop,
    recreate, restart or remove the container Caddy sends traffic to. Fails closed when
    Caddy's running config cannot be read. Returns what it read. The container is judged
    by the port the environment names for it and by the ports Docker says it publishes."""
    from runbook import docker

    container = env.slot(slot).container
    try:
        found = read(env, proxy=False)
    except TrafficUnknownError as exc:
        raise ServingContainerError(
            f"refusing to {action} {container}: cannot tell whether it serves traffic "
            f"({exc.message})", "check Caddy, then run again", exit_code=ExitCode.FAILED_SAFELY
        ) from None
    if slot in found.slots:
        raise ServingContainerError(
            f"refusing to {action} {container}: it is serving traffic (Caddy's running config "
            f"dials port {env.slot(slot).port})",
            _LEFT_RUNNING)
    info = docker.inspect(container)
    if action == "recreate" and slot in found.pinned and info.up:
        raise ServingContainerError(
            f"refusing to {action} {container}: {pinned_by(env, found, slot)}",
            UNRESOLVED_FIX if found.unresolved else _PINNED_FIX,
            exit_code=ExitCode.FAILED_SAFELY)  # refused before the act
    # Caddy on Docker's network dials the container itself (its name, an alias, its IP and
    # the app's port inside it), not the host port the environment names: by port alone the
    # container that serves passed for one Caddy does not dial
    by_name = sorted(d for d in found.dials if _dial(d)[0] in info.addresses)
    if by_name:
        raise ServingContainerError(
            f"refusing to {action} {container}: Caddy's running config dials it by name or "
            f"address ({', '.join(by_name)})",
            _LEFT_RUNNING)
    # the OTHER slot's port, published by this container (ports swapped against the
    # environment) and dialed by Caddy; its own port is judged above (a site outside the
    # markers may pin it), and another port it publishes (metrics) is not the app's
    here, other = ThisHost(env), env.slot(Slot(slot).other).port
    # another machine's service on that port number is not this container
    dialed = {other} if any(_dial_port(d) == other and here(d) for d in found.dials) else set()
    published = set(info.published or ()) & dialed
    if published:
        raise ServingContainerError(
            f"refusing to {action} {container}: it publishes port "
            f"{', '.join(map(str, sorted(published)))}, which Caddy's running config dials",
            f"compare `docker port {container}` with [slots] in the environment file; see "
            "`runbook status`")
    return found


def pinned_by(env: Environment, found: Traffic, slot: Slot) -> str:
    """Says which dials of a site outside the slot markers reach `slot` (one in
    `found.pinned`)."""
    if found.unresolved:
        return unresolved_site(env, found)
    port, here = env.slot(slot).port, ThisHost(env)
    dials = ", ".join(d for d in found.dials if _dial_port(d) == port and here(d)) \
        or f":{port}"
    return (f"a site outside the slot markers of {env.caddy.caddyfile} proxies to it "
            f"({dials}), so it serves that site")


def unresolved_site(env: Environment, found: Traffic) -> str:
    """Says which upstreams, outside the slot markers, Caddy resolves only per request."""
    return (f"a site outside the slot markers of {env.caddy.caddyfile} proxies to an upstream "
            f"Caddy resolves only per request ({'; '.join(found.unresolved)}), so whether it "
            "reaches this slot cannot be told")


UNRESOLVED_FIX = ("give that site's reverse_proxy a literal address (host:port), reload Caddy, "
                  "then run again")


def refuse_recreate_if_pinned(env: Environment, slot: Slot) -> None:
    """Refuse, when planning, to recreate a slot that a site outside the slot markers proxies
    to (`Traffic.pinned`) while its container runs: for a recreate it counts as serving.

    Why: a deploy force-recreated such a standby, so the other site was served by the
    unverified build during the gate, and when the gate failed the undo stopped it: that site
    answered 502 while the run said traffic stayed where it was. Reads Caddy's running config
    (unreadable: exit 4, nothing changed)."""
    from runbook import docker

    found = read(env, proxy=False)
    container = env.slot(slot).container
    if slot not in found.pinned or not docker.inspect(container).up:
        return  # a stopped or removed one serves that site nothing: no outage to make worse
    raise PreconditionError(
        f"refusing to recreate {container}: {pinned_by(env, found, slot)}; recreating it would "
        "hand that site an unverified build, and a failed health gate would stop it; nothing "
        "was changed",
        UNRESOLVED_FIX if found.unresolved else _PINNED_FIX)


def pinned_left_fix(env: Environment, slot: Slot, container: str) -> str:
    """What to do about an old slot left running for a site outside the slot markers."""
    other = env.slot(slot.other)
    return (f"point that site's reverse_proxy at {slot.other}'s port {other.port} (or "
            "move it between the slot markers, so it follows every switch), reload Caddy, "
            f"then `docker stop {container}`")


_PINNED_FIX = ("point that site's reverse_proxy at another upstream (or move it between the "
               "slot markers, so it follows the switch), reload Caddy, then run again")


def live_slot(env: Environment, recorded: Slot | None) -> tuple[Slot, list[str]]:
    """The slot that serves, as Caddy runs it, with warnings where files disagree with it.

    `recorded` is what the state file says. Fails closed (PreconditionError) when Caddy's
    running config names no single slot.
    """
    from runbook import caddy

    check_slot_ports(env)
    found = read(env)
    problem = found.problem(env)
    if found.slot is None or (problem and found.proxy_slot is not None):
        raise cannot_tell(env, found)
    refuse_if_unverifiable(env, found)
    warnings: list[str] = []
    if problem:
        warnings.append(problem)
    if (side := proxy_side_warning(env, found)) is not None:
        warnings.append(side)
    if (h2c := h2c_port(found, drain.front_port(env.caddy.proxy_url))) is not None:
        warnings.append(
            f"Caddy accepts cleartext HTTP/2 (h2c) on port {h2c}: a reload does "
            "not move the h2c connections it already holds (golang/go#26682), so their "
            "requests still reach the old slot after the switch. The old slot is stopped only "
            "once they have closed, else left running for them (the run says so); one "
            "already down answers them 502 until their clients reconnect (said at the end)")
    if recorded is not None and recorded != found.slot:
        warnings.append(f"the state file says {recorded} is active but Caddy sends traffic to "
                        f"{found.slot}; trusting Caddy")
    try:
        inspection = caddy.inspect(caddy.read(env), env)
    except RunbookError as exc:
        warnings.append(f"cannot read the Caddyfile: {exc.message}")
    else:
        on_disk = inspection.slot
        # Caddy dials the serving port more often than the managed block names it: ask
        # Caddy's adapter whether another site, outside the markers, proxies to it for good
        port = env.slot(found.slot).port
        named = sum(1 for u in inspection.upstreams if u.port == port)
        if env.stop_old_slot and dict(found.dialed).get(port, 0) > named \
                and found.slot in (found.pinned or _pinned(env)):
            warnings.append(f"another site (or route) outside the slot markers proxies to "
                            f"{found.slot}'s port {port}: the switch does not move it, so the "
                            f"old {found.slot} slot is left running after the switch, not "
                            "stopped, and that site's users still reach its build")
        if env.stop_old_slot and found.unresolved:
            warnings.append(f"{unresolved_site(env, found)}: the old slot is left running "
                            "after the switch, not stopped")
        if on_disk != found.slot:
            warnings.append(f"the Caddyfile on disk points at {on_disk or 'no single slot'} "
                            f"but Caddy runs {found.slot} (a run stopped between writing it "
                            "and reloading?); the switch rewrites it")
    return found.slot, warnings
