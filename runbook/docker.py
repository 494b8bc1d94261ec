"""The Docker adapter: what a slot's container really runs, and starting/stopping it.

The running truth of a slot is `docker inspect <container>` -> `.Config.Image`, not the state
file. Every action is built once as a `DockerAction` (the engine request and the `docker` CLI
line it is equivalent to, derived from the same fields): `--dry-run` shows it, `run` sends it.

Why not the Docker SDK on this path: importing it (and requests/urllib3) cost the on-call
~100 ms before anything happened, and each call ~10-30 ms more than a plain request. The engine
API is a small HTTP API on a unix socket, so the adapter speaks it with the standard library
(`DOCKER_HOST` unix:// or tcp://). An engine reached through TLS falls back to the SDK's own
transport, behind the same `_Engine.request`; one over ssh is refused (`_over_ssh`).
`client()` (the SDK) stays for the drill, reports and tests that want its object model.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shlex
import socket
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from runbook.errors import ExitCode, RunbookError

if TYPE_CHECKING:
    import docker as docker_sdk

_TIMEOUT = 30.0
_SOCKET = "/var/run/docker.sock"


SLOT_LABEL = "com.togather.deployment.slot"  # the contract's label on a slot's container
# the commit a build names itself by (the upstream Dockerfile's LABEL, from GIT_COMMIT)
REVISION_LABEL = "org.opencontainers.image.revision"


class DockerError(RunbookError):
    exit_code = ExitCode.FAILED_SAFELY


@dataclass(frozen=True)
class ContainerInfo:
    name: str
    exists: bool
    status: str = "absent"  # created | running | paused | restarting | exited | dead | absent
    image: str | None = None  # .Config.Image, e.g. togather-server:abc1234
    image_id: str | None = None  # .Image: the build it runs, whatever its tag names now
    exit_code: int | None = None
    started_at: str | None = None  # State.StartedAt (RFC 3339; Docker's zero time if never)
    # inspect's top-level RestartCount: how often its restart policy started it again since
    # it was created or last started by hand (a crash loop grows it; `docker start` resets it)
    restart_count: int = 0
    labels: dict[str, str] | None = None
    # the host ports it publishes (HostConfig.PortBindings, ranges expanded, and what Docker
    # bound: NetworkSettings.Ports); None: not known (host network, or not inspected), () none
    published: tuple[int, ...] | None = None
    # the names and addresses other containers reach it by (its name, hostname, network
    # aliases and DNS names, IP addresses): what a Caddy on Docker's network dials
    addresses: frozenset[str] = frozenset()
    # (container port, host port, host IP) of each tcp port it publishes: its configuration
    # and what Docker bound (a port left to Docker shows only there); IP "" is every address
    # of the host; None on the host's network
    bindings: tuple[tuple[int, int, str], ...] | None = None
    container_id: str | None = None  # .Id: a container recreated under the name is another
    # HostConfig.NetworkMode: "host" shares this host's network (its 127.0.0.1 is the host's);
    # "bridge", "default", a network's name or "container:<id>" do not; None: not inspected
    network_mode: str | None = None
    finished_at: str | None = None  # State.FinishedAt: when it last stopped (Go's zero: never)
    oom_killed: bool = False  # State.OOMKilled: the OOM killer struck while it ran
    # State.Health.Status (starting | healthy | unhealthy) of a running container with a
    # HEALTHCHECK; None without one, or stopped (Docker keeps a stopped one's last verdict)
    docker_health: str | None = None
    # HostConfig.AutoRemove (`docker run --rm`): Docker deletes it once it stops, so a stop
    # of it is its removal (found by review: "kept, not removed" of one Docker then deleted)
    auto_remove: bool = False
    # HostConfig.RestartPolicy.Name: no | on-failure | unless-stopped | always ("": no)
    restart_policy: str = ""

    def host_ports(self, port: int) -> frozenset[int]:
        """The host ports that reach its tcp `port`: those published for it, or the port
        itself on the host's network (empty when not inspected)."""
        return frozenset(host for host, _ in self.host_binds(port))

    def host_binds(self, port: int) -> frozenset[tuple[int, str]]:
        """(host port, host IP) that reach its tcp `port`: a port published on 127.0.0.1 is
        not reached at the host's other addresses; "" is every address (also the port itself
        on the host's network)."""
        if self.bindings is None:
            return frozenset({(port, "")}) if self.exists else frozenset()
        return frozenset((host, ip) for inside, host, ip in self.bindings if inside == port)

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def up(self) -> bool:
        """It may be answering (or holding) requests: running, paused or restarting; what a
        stop must end, and what counts as serving for a recreate."""
        return self.status in ("running", "paused", "restarting")

    @property
    def tag(self) -> str | None:
        return tag_of(self.image or "")

    @property
    def crashed(self) -> bool:
        """It exited with a non-zero code or the OOM killer struck it: not a clean stop
        (found by review: a killed serving slot was said only as "stopped (exited)")."""
        return self.status == "exited" and (bool(self.exit_code) or self.oom_killed)

    @property
    def state_said(self) -> str:
        return state_said(self.status, self.exit_code, self.oom_killed)


def state_said(status: str, exit_code: int | None, oom_killed: bool) -> str:
    """A container's status, with the exit code and the OOM kill of a crashed one: "exited
    with code 137 (killed: out of memory)"."""
    if status != "exited" or not (exit_code or oom_killed):
        return status
    return f"exited with code {exit_code}" + (" (killed: out of memory)" if oom_killed else "")


def tag_of(image: str) -> str | None:
    """The tag of `repo[:tag][@digest]` (None without one): a digest is not a tag (found by
    review: `...:abc1234@sha256:...` read as the tag `...` of 64 hex), nor a registry's port
    (`host:5000/repo`)."""
    image = image.split("@", 1)[0]
    if image and ":" in image.rsplit("/", 1)[-1]:
        return image.rsplit(":", 1)[1]
    return None


def names_for_good(image: str, version: str) -> bool:
    """Whether `image` is a name that stays on `version`'s build: its tag is the version (the
    contract's `togather-server:<7 hex>`), or it is pinned by digest (`@sha256:`). A moving
    tag (`:latest`, `:stable`, any other) names another build after the next push or
    retag, so a record of it could no longer say what ran."""
    return "@sha256:" in image or tag_of(image) == version


# --------------------------------------------------------------------------------------------
# Actions: built once, shown and run
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DockerAction:
    """One engine request. `cli` is the `docker` command line that does the same, for the
    plan and the journal; `request` is what `run` sends. Both come from these fields."""

    verb: str  # what it does, in words: "start container", "stop container", ...
    cli: tuple[str, ...]  # e.g. ("docker", "start", "togather-green")
    method: str
    path: str  # engine API path, unversioned (the engine's own API version)
    query: tuple[tuple[str, str], ...] = ()
    body: Any = None
    target: str = ""  # the container or image it is about
    ok_statuses: frozenset[int] = field(default=frozenset({200, 201, 204, 304}))
    # the full id of the container it acts on, when the run's plan resolved it: the request
    # goes to that id, so whatever holds `target`'s name by then is never the one acted on
    ident: str = ""

    def display(self) -> str:
        """The command on-call could type instead (what --dry-run prints)."""
        return shlex.join(self.cli)

    def as_planned(self) -> str:
        """`display`, saying which container it acts on when that is the plan's (by id)."""
        return self.display() + (f" (id {self.ident[:12]}, as planned)" if self.ident else "")

    def request_line(self) -> str:
        query = f"?{urlencode(self.query)}" if self.query else ""
        return f"{self.method} {self.path}{query}"


def _q(name: str) -> str:
    return quote(name, safe="/:@")


def to_container(action: DockerAction, ident: str) -> DockerAction:
    """The same action sent to the container whose full id is `ident` (found just before to
    hold its name): whatever holds the name by the time the request arrives is not it."""
    path = action.path.replace(f"/containers/{_q(action.target)}", f"/containers/{_q(ident)}", 1)
    return dataclasses.replace(action, path=path, ident=ident)


def start_action(name: str, ident: str | None = None) -> DockerAction:
    """`ident` (any action's): the container's full id, which the request goes to; the CLI
    line still names it by `name`, as on-call would type it."""
    return DockerAction("start container", ("docker", "start", name), "POST",
                        f"/containers/{_q(ident or name)}/start", target=name,
                        ident=ident or "")


def unpause_action(name: str, ident: str | None = None) -> DockerAction:
    return DockerAction("unpause container", ("docker", "unpause", name), "POST",
                        f"/containers/{_q(ident or name)}/unpause", target=name,
                        ident=ident or "")


def stop_action(name: str, timeout: int = 10, ident: str | None = None) -> DockerAction:
    return DockerAction("stop container", ("docker", "stop", "--time", str(timeout), name),
                        "POST", f"/containers/{_q(ident or name)}/stop", (("t", str(timeout)),),
                        target=name, ident=ident or "")


def inspect_action(name: str) -> DockerAction:
    return DockerAction("inspect container", ("docker", "container", "inspect", name), "GET",
                        f"/containers/{_q(name)}/json", target=name)


def image_inspect_action(image: str) -> DockerAction:
    return DockerAction("look up image", ("docker", "image", "inspect", image), "GET",
                        f"/images/{_q(image)}/json", target=image)


def remove_action(name: str, *, force: bool = True, ident: str | None = None) -> DockerAction:
    """`force=False`: `docker rm NAME`, which the engine refuses (409) for a container that
    runs, is paused or restarting: what removes only what serves nothing. Never -v: its
    anonymous volumes stay, as named ones always do."""
    path = f"/containers/{_q(ident or name)}"
    if not force:
        return DockerAction("remove container", ("docker", "rm", name), "DELETE", path,
                            target=name, ident=ident or "")
    return DockerAction("remove container", ("docker", "rm", "--force", name), "DELETE",
                        path, (("force", "1"),), target=name, ident=ident or "")


# --------------------------------------------------------------------------------------------
# The engine transport: one method, every failure mapped here
# --------------------------------------------------------------------------------------------

class _NotFound(Exception):
    """The engine answered 404: each caller knows what "absent" means for it."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class _Engine:
    """Where the engine listens: a unix socket or plain tcp host:port; else the SDK."""

    unix: str | None = None
    host: str | None = None
    port: int | None = None
    sdk: bool = False

    def describe(self) -> str:
        """Where it is, for a message: on-call must see which engine did not answer."""
        if self.sdk:
            return os.environ.get("DOCKER_HOST", "").strip() or "the docker CLI's context"
        if self.unix is not None:
            return f"unix://{self.unix}"
        return f"tcp://{self.host}:{self.port}"

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.unix is not None:
            return _UnixConnection(self.unix, timeout)
        return http.client.HTTPConnection(self.host or "localhost", self.port or 2375,
                                          timeout=timeout)

    def request(self, method: str, path: str, *, body: Any = None,
                timeout: float = _TIMEOUT) -> tuple[int, bytes]:
        """(status, body). Raises OSError/TimeoutError when the engine does not answer."""
        if self.sdk:
            return _sdk_request(method, path, body, timeout)
        conn = self.connection(timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            answer = conn.getresponse()
            return answer.status, answer.read()
        except http.client.HTTPException as exc:
            raise ConnectionError(f"bad answer from the engine: {type(exc).__name__}") from None
        finally:
            conn.close()


class _ContextError(OSError):
    """The docker CLI's context names an engine this adapter cannot reach the same way."""


def _over_ssh(where: str, *, context: bool = False) -> DockerError:
    """An engine over ssh (DOCKER_HOST=ssh://..., or a context's): refused as configuration.
    Why: the runbook acts on the host it runs on (that host's Caddyfile, state file, lock and
    slot ports), so another host's engine would be checked and acted on beside them (and the
    SDK cannot reach it without paramiko: it said "start the Docker engine", wrongly)."""
    from runbook.redact import redact

    point = ("the docker context at its own engine (`docker context use default`)" if context
             else "DOCKER_HOST unset or at its own socket")
    return DockerError(
        f"{redact(where)} is a Docker engine over ssh, which the runbook does not use: it acts "
        "on the host it runs on (its Caddyfile, state file and slot ports); nothing was changed",
        f"run the runbook on the host itself (the fleet runs it on each host through Ansible), "
        f"with {point}", exit_code=ExitCode.USAGE)


def _context_host() -> str:
    """The engine the docker CLI uses when DOCKER_HOST is unset: its current context's (as
    `docker context use` left it in the CLI config, or DOCKER_CONTEXT). Compose and the CLI
    calls follow it; this adapter read only the default socket, so on a host with a rootless
    engine in a context it read "what runs" from the other engine. '' for the default."""
    import hashlib
    from pathlib import Path

    config_dir = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    name = os.environ.get("DOCKER_CONTEXT", "").strip()
    if not name:
        try:
            name = str(json.loads((config_dir / "config.json").read_text())
                       .get("currentContext") or "")
        except (OSError, ValueError, AttributeError):
            name = ""
    if not name or name == "default":
        return ""
    digest = hashlib.sha256(name.encode()).hexdigest()
    try:
        meta = json.loads((config_dir / "contexts" / "meta" / digest / "meta.json").read_text())
        host = str(meta["Endpoints"]["docker"]["Host"])
    except (OSError, ValueError, KeyError, TypeError):
        raise _ContextError(f"the docker CLI's context {name!r} cannot be read") from None
    if host.startswith("ssh://"):
        raise _over_ssh(f"the docker CLI's context {name!r} ({host})", context=True)
    if (config_dir / "contexts" / "tls" / digest).exists() or not host.startswith(
            ("unix://", "tcp://")):
        raise _ContextError(f"the docker CLI's context {name!r} ({host}) needs TLS or ssh")
    return host


def _default_socket(host: str) -> bool:
    return host.startswith("unix://") and (
        os.path.realpath(host[len("unix://"):] or _SOCKET) == os.path.realpath(_SOCKET))


def engine_elsewhere() -> str | None:
    """What names the runbook's engine when it is not the default socket ("DOCKER_HOST=..."
    or "the docker CLI's context (...)"); None on the default socket. Why: `sudo` drops both
    (it resets the environment and HOME), so `sudo docker ...` reaches the default socket
    (the environment's command check refuses such a command when this is not None)."""
    variable = os.environ.get("DOCKER_HOST", "").strip()
    if variable:
        return None if _default_socket(variable) else f"DOCKER_HOST={variable}"
    try:
        host = _context_host()
    except (_ContextError, DockerError):  # its own error is said at the first engine call
        return "the docker CLI's context"
    return None if not host or _default_socket(host) else f"the docker CLI's context ({host})"


@cache
def _engine() -> _Engine:
    variable = os.environ.get("DOCKER_HOST", "").strip()
    if variable.startswith("ssh://"):
        raise _over_ssh(f"DOCKER_HOST={variable}")
    host = variable or _context_host()
    if os.environ.get("DOCKER_TLS_VERIFY") or host.startswith("npipe://"):
        return _Engine(sdk=True)
    if not host:
        return _Engine(unix=_SOCKET)
    if host.startswith("unix://"):
        return _Engine(unix=host[len("unix://"):] or _SOCKET)
    parts = urlsplit(host if "://" in host else f"tcp://{host}")
    if parts.scheme in ("tcp", "http") and parts.hostname:
        return _Engine(host=parts.hostname, port=parts.port or 2375)
    return _Engine(sdk=True)


def _sdk_request(method: str, path: str, body: Any, timeout: float) -> tuple[int, bytes]:
    """The same request through the SDK's transport (TLS); its errors become OSError."""
    import requests

    api = client().api
    try:
        # never followed: a redirect is the engine refusing the name (`send`), and followed
        # it would answer for another container (`/containers/../x` cleaned to `/x`)
        answer = api.request(method, f"{api.base_url}{path}", json=body, timeout=timeout,
                             allow_redirects=False)
    except requests.exceptions.RequestException as exc:
        raise ConnectionError(type(exc).__name__) from None
    return answer.status_code, answer.content


def _one_line(text: object) -> str:
    from runbook.redact import redact

    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return redact(lines[0] if lines else "no detail")


def _message(content: bytes) -> str:
    try:
        body = json.loads(content)
    except ValueError:
        return _one_line(content.decode(errors="replace"))
    if isinstance(body, dict) and "message" in body:
        return _one_line(body["message"])
    return _one_line(body)


def send(action: DockerAction, timeout: float = _TIMEOUT) -> bytes:
    """Run an action; returns the answer's body. 404 raises _NotFound (the caller decides).

    A 4xx answer means the request itself was wrong (an invalid image reference read from the
    state file, an invalid name): nothing was changed, a precondition is not met (4). An engine
    that does not answer is a precondition too. Anything else failed safely (1); a run that
    had already changed something decides its own exit code from there.
    """
    what = f"{action.verb} {action.target!r}"
    if not action.target:
        raise DockerError(f"docker refused to {what}: an empty name",
                          "check the name or image reference (state file, environment file)",
                          exit_code=ExitCode.PRECONDITION)
    path = action.path + (f"?{urlencode(action.query)}" if action.query else "")
    try:
        status, content = _engine().request(action.method, path, body=action.body,
                                            timeout=timeout)
    except _ContextError as exc:
        raise DockerError(f"{exc}; nothing was changed", "set DOCKER_HOST to that context's "
                          "engine (`docker context inspect`), as the docker CLI would use it",
                          exit_code=ExitCode.PRECONDITION) from None
    except (OSError, TimeoutError) as exc:
        where = _engine().describe()
        if isinstance(exc, PermissionError):
            fix = (f"this user may not use {where}: run as root, or as a member of the "
                   "docker group")
        elif isinstance(exc, FileNotFoundError):
            fix = (f"no engine listens at {where}: start it (`systemctl start docker`, or "
                   "`systemctl --user start docker` for a rootless one), or set DOCKER_HOST")
        elif isinstance(exc, TimeoutError):
            fix = f"the engine at {where} does not respond: check `docker info` and dockerd"
        else:
            fix = "start it (systemctl start docker) and check `docker info`"
        raise DockerError(f"the Docker engine at {where} did not answer while trying to "
                          f"{what} ({type(exc).__name__})", fix,
                          exit_code=ExitCode.PRECONDITION) from None
    if status == 404:
        message = _message(content)
        if "no such" not in message.lower():  # not the engine's "No such container: x"
            raise DockerError(f"{_engine().describe()} answered HTTP 404 to {what} without "
                              f"naming what is missing ({message}): is it a Docker engine?",
                              "point DOCKER_HOST (or the docker context) at the engine",
                              exit_code=ExitCode.PRECONDITION)
        raise _NotFound(message)
    if status in action.ok_statuses:
        return content
    if 300 <= status < 400:
        # the engine's router cleans `..` and `.` out of a path and redirects (301): the
        # name was never looked up. Said as "no detail", exit 1 (found by review)
        raise DockerError(f"docker refused to {what}: {action.target!r} is not a name the "
                          f"Docker engine takes (it answered HTTP {status}, a redirect: `.` "
                          "and `..` are path steps, never a name)",
                          "check the name or image reference (state file, environment file) "
                          "and `docker ps -a` / `docker images`",
                          exit_code=ExitCode.PRECONDITION)
    detail = _message(content)
    if 400 <= status < 500:
        raise DockerError(f"docker refused to {what}: {detail}",
                          "check the name or image reference (state file, environment "
                          "file) and `docker ps -a` / `docker images`",
                          exit_code=ExitCode.PRECONDITION)
    raise DockerError(f"docker failed to {what}: {detail}",
                      "read `docker info` and the container's `docker logs`")


def _json(content: bytes, what: str) -> Any:
    """The engine's JSON answer; an endpoint that is not an engine answers something else,
    which is said (found by review: a JSONDecodeError was "unexpected failure", exit 5)."""
    try:
        return json.loads(content)
    except ValueError:
        raise DockerError(f"{_engine().describe()} answered {what} with something that is not "
                          "the Docker engine's JSON: is it a Docker engine?",
                          "point DOCKER_HOST (or the docker context) at the engine",
                          exit_code=ExitCode.PRECONDITION) from None


def run(action: DockerAction) -> None:
    """Run a start/stop/remove action: a missing container is an error for a start, and
    nothing to do for a stop or a remove. A name no container has is not found, though the
    engine would act on a container whose id starts with it (found by review). One sent to
    the planned container's id (`ident`) acts on that container whatever its name is now:
    the caller has compared the name's container with it just before (slots.same_container)."""
    try:
        if action.ident:
            if inspect_id(action.ident) is None:
                raise _NotFound(f"No such container: {action.ident}")
        elif action.target and _inspected(action.target) is None:
            raise _NotFound(f"No such container: {action.target}")
        send(action)
    except _NotFound:
        if action.cli[1] in ("start", "unpause"):
            which = f" (id {action.ident[:12]})" if action.ident else ""
            raise DockerError(f"container {action.target}{which} does not exist",
                              "run the command again: its plan then says what it does with "
                              "the slot as it is now") from None


# --------------------------------------------------------------------------------------------
# The SDK, for the drill, reports and tests only
# --------------------------------------------------------------------------------------------

@cache
def client() -> docker_sdk.DockerClient:
    import docker as docker_sdk

    variable = os.environ.get("DOCKER_HOST", "").strip()
    if variable.startswith("ssh://"):  # what from_env would use; it needs paramiko
        raise _over_ssh(f"DOCKER_HOST={variable}")

    try:
        return docker_sdk.from_env(timeout=30)
    except docker_sdk.errors.DockerException as exc:
        raise DockerError("cannot reach the Docker engine",
                          "start it (systemctl start docker) and check `docker info`",
                          exit_code=ExitCode.PRECONDITION) from exc


RECENT_RESTART = 300.0  # seconds: a container its restart policy started since is looping


def crash_loop(info: ContainerInfo | None) -> str | None:
    """How the container crash-loops, as Docker says it: `restarting`, or up (running or
    paused) with its restart policy having started it again within RECENT_RESTART (up at
    the instant it is looked at, it is the same loop: found by review, whether status said
    it, and whether a rollback took it for a way back, depended on that instant). None when
    it does not."""
    from datetime import UTC, datetime

    from runbook.times import parse_utc

    if info is None or not info.exists or not info.up:
        return None
    times = f"{info.restart_count} time{'s' if info.restart_count != 1 else ''}"
    if info.status == "restarting":
        return f"restarting (its restart policy has started it again {times})"
    started = parse_utc(info.started_at)
    if info.restart_count < 1 or started is None \
            or (datetime.now(UTC) - started).total_seconds() > RECENT_RESTART:
        return None
    return (f"{info.status}, but its restart policy has started it again {times}, the last "
            f"at {info.started_at}")


def inspect(name: str) -> ContainerInfo:
    try:
        content = send(inspect_action(name))
    except _NotFound:
        return ContainerInfo(name=name, exists=False)
    attrs: dict[str, Any] = _json(content, f"inspect container {name!r}")
    if str(attrs.get("Name") or "").lstrip("/") != name.lstrip("/"):
        # the engine takes an unknown name as a unique id prefix ("db", "cafe"): another
        # container's, answered as this one (found by review); it is not this container
        return ContainerInfo(name=name, exists=False)
    return _info(name, attrs)


def inspect_id(ident: str) -> ContainerInfo | None:
    """The container whose full id is `ident`, under whatever name it has now (None: there
    is none, never one whose id merely starts with it)."""
    try:
        content = send(inspect_action(ident))
    except _NotFound:
        return None
    attrs: dict[str, Any] = _json(content, f"inspect container {ident!r}")
    if attrs.get("Id") != ident:
        return None
    return _info(str(attrs.get("Name") or "").lstrip("/"), attrs)


def _info(name: str, attrs: dict[str, Any]) -> ContainerInfo:
    state = attrs.get("State") or {}
    config = attrs.get("Config") or {}
    return ContainerInfo(
        name=name, exists=True, status=state.get("Status", "unknown"),
        image=config.get("Image"), image_id=attrs.get("Image"),
        exit_code=state.get("ExitCode"),
        started_at=state.get("StartedAt"), finished_at=state.get("FinishedAt"),
        restart_count=int(attrs.get("RestartCount") or 0),
        labels=config.get("Labels") or {},
        published=_published(attrs),
        addresses=_addresses(attrs),
        bindings=_bindings(attrs),
        container_id=attrs.get("Id"),
        network_mode=str((attrs.get("HostConfig") or {}).get("NetworkMode") or ""),
        oom_killed=bool(state.get("OOMKilled")),
        docker_health=(state.get("Health") or {}).get("Status")
        if state.get("Status") == "running" else None,
        auto_remove=bool((attrs.get("HostConfig") or {}).get("AutoRemove")),
        restart_policy=str(((attrs.get("HostConfig") or {}).get("RestartPolicy") or {})
                           .get("Name") or ""),
    )


def network_mode_of(ref: str) -> str | None:
    """The network mode of the container `ref` names exactly, by its full id or its name
    (what Docker writes after `container:` when one shares another's network), or None when
    there is none (never a container whose id merely starts with it)."""
    try:
        attrs: dict[str, Any] = _json(send(inspect_action(ref)), f"inspect {ref!r}")
    except _NotFound:
        return None
    if ref not in (attrs.get("Id"), str(attrs.get("Name") or "").lstrip("/")):
        return None
    return str((attrs.get("HostConfig") or {}).get("NetworkMode") or "")


def _inspected(name: str) -> dict[str, Any] | None:
    """Container `name`'s inspect data, or None when no container has that name (the engine
    alone would answer for another container whose id starts with it: see inspect)."""
    try:
        attrs: dict[str, Any] = _json(send(inspect_action(name)), f"inspect {name!r}")
    except _NotFound:
        return None
    return attrs if str(attrs.get("Name") or "").lstrip("/") == name.lstrip("/") else None


def resume_autosave(name: str) -> str | None:
    """Where Caddy's autosave.json is in container `name` when its Caddy was started with
    `--resume` (its Path and Args: a restart then loads that file, never --config, unless it
    is missing); None otherwise. Caddy's own default: $XDG_CONFIG_HOME/caddy (the official
    image sets /config), else $HOME/.config/caddy."""
    attrs = _inspected(name)
    if attrs is None:
        return None
    argv = [str(attrs.get("Path") or ""), *map(str, attrs.get("Args") or ())]
    if not any(a == "--resume" or (a.startswith("--resume=") and a != "--resume=false")
               for a in argv):
        return None
    environ = dict(e.partition("=")[::2] for e in ((attrs.get("Config") or {}).get("Env") or ()))
    base = environ.get("XDG_CONFIG_HOME") or f"{environ.get('HOME') or '/root'}/.config"
    return f"{base.rstrip('/')}/caddy/autosave.json"


def _addresses(attrs: dict[str, Any]) -> frozenset[str]:
    if str((attrs.get("HostConfig") or {}).get("NetworkMode") or "") == "host":
        # it shares the host's network and hostname: reached on its port (judged by port),
        # and the machine's name in a dial is not this container (both slots carry it)
        return frozenset()
    found = {str(attrs.get("Name") or "").lstrip("/"), str(attrs.get("Id") or "")[:12],
             str((attrs.get("Config") or {}).get("Hostname") or "")}
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    for network in networks.values() if isinstance(networks, dict) else ():
        if not isinstance(network, dict):
            continue
        found.update(str(a) for a in (network.get("Aliases") or ()))
        found.update(str(a) for a in (network.get("DNSNames") or ()))
        found.update(str(network.get(k) or "") for k in ("IPAddress", "GlobalIPv6Address"))
    # a hostname set to "localhost" names the host's loopback to a Caddy on the host: not it
    return frozenset(a.lower() for a in found if a) - {"localhost", "127.0.0.1", "::1"}


def _published(attrs: dict[str, Any]) -> tuple[int, ...] | None:
    """The host ports a container publishes: configured (HostConfig.PortBindings, known
    stopped too; a range `a-b` is each of its ports, "" or "0" is one Docker picks when it
    starts) and bound (NetworkSettings.Ports, where such a port shows). Found by review: a
    range was dropped and "0" kept as port 0, so the port a slot names was "not published"."""
    host_config = attrs.get("HostConfig") or {}
    if str(host_config.get("NetworkMode") or "") == "host":
        return None  # it listens on the host's ports itself: nothing to read here
    ports: set[int] = set()
    for table in (host_config.get("PortBindings"),
                  (attrs.get("NetworkSettings") or {}).get("Ports")):
        for bindings in (table or {}).values() if isinstance(table, dict) else ():
            for binding in bindings or ():
                ports.update(_host_ports((binding or {}).get("HostPort")))
    return tuple(sorted(ports))


def _host_ports(value: object) -> range:
    """The host ports of a binding's HostPort: `n`, or each of `a-b`; none for "" or "0"
    (left to Docker: what it bound is read from NetworkSettings) or what is not a port."""
    low, _, high = str(value or "").strip().partition("-")
    if not low.isdigit() or not (high or low).isdigit() or int(low) == 0:
        return range(0)
    return range(int(low), min(int(high or low), 65535) + 1)


def _bindings(attrs: dict[str, Any]) -> tuple[tuple[int, int, str], ...] | None:
    """(container port, host port, host IP) of its published tcp ports: configured
    (HostConfig.PortBindings, known stopped too) and bound (NetworkSettings.Ports)."""
    host_config = attrs.get("HostConfig") or {}
    if str(host_config.get("NetworkMode") or "") == "host":
        return None
    found: set[tuple[int, int, str]] = set()
    for table in (host_config.get("PortBindings"),
                  (attrs.get("NetworkSettings") or {}).get("Ports")):
        for key, bindings in (table or {}).items() if isinstance(table, dict) else ():
            inside, _, proto = str(key).partition("/")
            if not inside.isdigit() or proto not in ("", "tcp"):
                continue
            for binding in bindings or ():
                ip = str((binding or {}).get("HostIp") or "").strip("[]")
                found.update((int(inside), port, ip)
                             for port in _host_ports((binding or {}).get("HostPort")))
    return tuple(sorted(found))


def bridge_gateways() -> frozenset[str] | None:
    """The gateway addresses of Docker's default bridge network (docker0): where a
    container's `host.docker.internal:host-gateway` leads (unless the daemon sets
    `host-gateway-ip`); None when the engine does not say."""
    action = DockerAction("inspect network", ("docker", "network", "inspect", "bridge"),
                          "GET", "/networks/bridge", target="bridge")
    try:
        found = _json(send(action), action.verb)
    except (_NotFound, DockerError):
        return None
    ipam = (found.get("IPAM") or {}) if isinstance(found, dict) else {}
    gateways = frozenset(str(c["Gateway"]).split("/")[0].lower()
                         for c in ipam.get("Config") or () if isinstance(c, dict)
                         and c.get("Gateway"))
    if gateways or not isinstance(found, dict):
        return gateways or None
    # an engine that adopted a docker0 already up names no Gateway (seen on a fresh VM):
    # the bridge's own address is where host-gateway leads, as this (local) kernel says
    name = (found.get("Options") or {}).get("com.docker.network.bridge.name", "docker0")
    address = _interface_ipv4(str(name))
    return frozenset({address}) if address else None


def _interface_ipv4(name: str) -> str | None:
    """The IPv4 address of network interface `name` on this host (SIOCGIFADDR), or None."""
    import fcntl
    import struct
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            packed = fcntl.ioctl(sock.fileno(), 0x8915,  # SIOCGIFADDR
                                 struct.pack("256s", name[:15].encode()))
    except (OSError, UnicodeError):
        return None
    return socket.inet_ntoa(packed[20:24])


def publishing(port: int) -> list[tuple[str, dict[str, str]]]:
    """(name, labels) of each running container that publishes host port `port`, as `docker
    ps --filter publish=PORT` lists them: what answers on a slot's port when the slot's own
    container is gone (renamed, or another tool's)."""
    action = DockerAction("list the containers publishing port",
                          ("docker", "ps", "--filter", f"publish={port}"), "GET",
                          "/containers/json",
                          (("filters", json.dumps({"publish": [str(port)]})),),
                          target=str(port))
    found: list[tuple[str, dict[str, str]]] = []
    for item in _json(send(action), action.verb) or ():
        if isinstance(item, dict):
            names = [str(n).lstrip("/") for n in item.get("Names") or ()]
            found.append((names[0] if names else str(item.get("Id") or "")[:12],
                          dict(item.get("Labels") or {})))
    return found


@dataclass(frozen=True)
class Neighbour:
    """A running container as `docker ps` lists it: what tells whose a database session
    is by its client address (snapshots/sessions.py)."""

    name: str
    network_mode: str  # a network's name, "default", "host" or "container:<id>"
    ips: frozenset[str]  # its addresses on Docker's networks
    mounts: frozenset[str]  # the host paths it mounts (binds, volumes' data folders)


def running_containers() -> list[Neighbour]:
    """Every running container, as `docker ps --no-trunc` lists them (one engine request)."""
    action = DockerAction("list the running containers", ("docker", "ps", "--no-trunc"),
                          "GET", "/containers/json", target="running")
    found: list[Neighbour] = []
    for item in _json(send(action), action.verb) or ():
        if not isinstance(item, dict):
            continue
        names = [str(n).lstrip("/") for n in item.get("Names") or ()]
        networks = (item.get("NetworkSettings") or {}).get("Networks") or {}
        ips = {str(n.get(k) or "") for n in networks.values() if isinstance(n, dict)
               for k in ("IPAddress", "GlobalIPv6Address")} if isinstance(networks, dict) else set()
        mounts = {str(m.get("Source") or "") for m in item.get("Mounts") or ()
                  if isinstance(m, dict)}
        found.append(Neighbour(names[0] if names else str(item.get("Id") or "")[:12],
                               str((item.get("HostConfig") or {}).get("NetworkMode") or ""),
                               frozenset(ips - {""}), frozenset(mounts - {""})))
    return found


def labelled(labels: dict[str, str]) -> list[tuple[str, str, str]]:
    """(short id, name, state) of every container, running or not, carrying all `labels`, as
    `docker ps -a --filter label=K=V` lists them: a compose service's containers, its
    half-recreated `<id>_<name>` one included."""
    wanted = [f"{key}={value}" for key, value in labels.items()]
    action = DockerAction("list the containers labelled",
                          ("docker", "ps", "-a", *(f"--filter=label={w}" for w in wanted)),
                          "GET", "/containers/json",
                          (("all", "1"), ("filters", json.dumps({"label": wanted}))),
                          target=",".join(wanted))
    found: list[tuple[str, str, str]] = []
    for item in _json(send(action), action.verb) or ():
        if isinstance(item, dict):
            names = [str(n).lstrip("/") for n in item.get("Names") or ()]
            ident = str(item.get("Id") or "")[:12]
            found.append((ident, names[0] if names else ident, str(item.get("State") or "")))
    return found


def running_execs(name: str) -> list[tuple[int, list[str]]]:
    """(pid, argv) of each command `docker exec` runs in container `name` now. A run killed
    while it waited on one (its migrations) leaves it running: Docker does not stop an exec
    whose client died."""
    attrs = _inspected(name)
    if attrs is None:
        return []
    found: list[tuple[int, list[str]]] = []
    for exec_id in attrs.get("ExecIDs") or ():
        action = DockerAction("inspect a command running in container",
                              ("docker", "top", name), "GET", f"/exec/{_q(str(exec_id))}/json",
                              target=name)
        try:
            info: dict[str, Any] = _json(send(action), action.verb)
        except _NotFound:
            continue  # ended between the two reads
        if not info.get("Running"):
            continue
        process = info.get("ProcessConfig") or {}
        argv = [str(process.get("entrypoint") or ""),
                *(str(a) for a in process.get("arguments") or ())]
        found.append((int(info.get("Pid") or 0), argv))
    return found


def bind_sources(name: str) -> list[str] | None:
    """The host paths bind-mounted into container `name`; None when it does not exist."""
    attrs = _inspected(name)
    if attrs is None:
        return None
    return [str(m.get("Source")) for m in attrs.get("Mounts") or ()
            if isinstance(m, dict) and m.get("Type") == "bind" and m.get("Source")]


def image_labels(image: str) -> dict[str, str] | None:
    """The image's labels; None when the image does not exist."""
    try:
        content = send(image_inspect_action(image))
    except _NotFound:
        return None
    attrs: dict[str, Any] = _json(content, "an inspect")
    return dict((attrs.get("Config") or {}).get("Labels") or {})


def image_exists(image: str) -> bool:
    return image_labels(image) is not None


def short_id(build: str) -> str:
    """An image id as a plan or a message says it: its algorithm and 12 hex, as `docker
    images` abbreviates it (`sha256:cba5ad5e02b5`)."""
    return build[:19]


def image_id(image: str) -> str | None:
    """The id of the build `image` (a tag) names now; None when there is no such image."""
    try:
        content = send(image_inspect_action(image))
    except _NotFound:
        return None
    found = _json(content, "an inspect").get("Id")
    return found if isinstance(found, str) else None


def start(name: str) -> None:
    run(start_action(name))


def stop(name: str, timeout: int = 10) -> None:
    run(stop_action(name, timeout))


def remove(name: str) -> None:
    run(remove_action(name))


def _demux(raw: bytes) -> bytes:
    """The payload of Docker's multiplexed stream (8-byte frame headers); raw when it is not
    one (a container with a TTY)."""
    out: list[bytes] = []
    at = 0
    while at + 8 <= len(raw):
        kind, size = raw[at], int.from_bytes(raw[at + 4:at + 8], "big")
        if kind not in (0, 1, 2) or raw[at + 1:at + 4] != b"\0\0\0":
            return raw
        out.append(raw[at + 8:at + 8 + size])
        at += 8 + size
    return b"".join(out) if at == len(raw) else raw


def exec_run(name: str, command: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run a command in a running container; returns (exit code, combined output)."""
    create = DockerAction("run a command in container", ("docker", "exec", name, *command),
                          "POST", f"/containers/{_q(name)}/exec",
                          body={"Cmd": list(command), "AttachStdout": True,
                                "AttachStderr": True}, target=name)
    if _inspected(name) is None:  # never another container's, by an id prefix
        raise DockerError(f"container {name} does not exist", "start it first")
    try:
        exec_id = str(_json(send(create), create.verb)["Id"])
    except _NotFound:
        raise DockerError(f"container {name} does not exist", "start it first") from None
    started = DockerAction("run a command in container", create.cli, "POST",
                           f"/exec/{exec_id}/start", body={"Detach": False, "Tty": False},
                           target=name)
    try:
        output = _demux(send(started, timeout=timeout))
        found = _json(send(DockerAction("run a command in container", create.cli, "GET",
                                        f"/exec/{exec_id}/json", target=name)),
                      "an exec inspect")
    except _NotFound:
        raise DockerError(f"container {name} went away while running a command",
                          "start it first") from None
    code = found.get("ExitCode")
    return (int(code) if code is not None else -1), output.decode(errors="replace")


def logs(name: str, tail: int = 100) -> str:
    action = DockerAction("read the logs of container",
                          ("docker", "logs", "--tail", str(tail), name), "GET",
                          f"/containers/{_q(name)}/logs",
                          (("stdout", "1"), ("stderr", "1"), ("tail", str(tail))), target=name)
    try:
        return _demux(send(action)).decode(errors="replace")
    except _NotFound:
        return ""
