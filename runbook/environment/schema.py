"""The environment file's format (TOML) as one pydantic model: each key, its type, its default
and its constraint written once. Reading reports every problem at once, one line each naming
the file and the key; writing dumps the same model, so reader, known keys and writer agree.

Imported only when a file is read or written: `import runbook.environment` stays light for
the many modules that only need Slot or Environment.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, NoReturn

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from runbook.environment.model import (
    ALIASES,
    ENV_NAMES,
    STANDARD_COMPOSE_FILE,
    SUDO_VALUED,
    CaddyConfig,
    ComposeConfig,
    DatabaseConfig,
    Environment,
    HealthConfig,
    ReloadMethod,
    Slot,
    SlotConfig,
)
from runbook.errors import ConfigError
from runbook.redact import redact


def _fail(text: str) -> NoReturn:
    """A constraint's own words, shown as they are (the context keeps braces in values safe)."""
    raise PydanticCustomError("runbook", "{message}", {"message": text})


def _choice(*options: str) -> AfterValidator:
    def check(value: str) -> str:
        if value not in options:
            _fail(f"{value!r} is not one of {', '.join(options)}")
        return value
    return AfterValidator(check)


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        _fail(f"port {value} is outside 1-65535")
    return value


MAX_SECONDS = 7 * 86400.0  # a week: longer is a typo (1e12 overflowed the lock's dates)


def _positive(value: float) -> float:
    # TOML has nan and inf; nan <= 0 is False, and neither is a duration
    if not math.isfinite(value) or value <= 0:
        _fail(f"must be a finite number greater than 0, got {value}")
    if value > MAX_SECONDS:
        _fail(f"{value:g} s is over a week ({MAX_SECONDS:g} s): surely a typo")
    return value


MAX_RETENTION_DAYS = 3650


def _retention(days: int) -> int:
    """Non-positive retention has always meant the default (a week), not an error; beyond
    ten years the expiry date overflowed (a traceback, after the dump)."""
    if days > MAX_RETENTION_DAYS:
        _fail(f"{days} days is over {MAX_RETENTION_DAYS} (ten years): surely a typo")
    return days if days > 0 else 7


def _command(value: Any) -> tuple[str, ...]:
    """argv, never a shell string: a non-empty list of non-empty strings."""
    if (not isinstance(value, list | tuple) or not value
            or not all(isinstance(v, str) and v for v in value)):
        _fail("expected a non-empty list of strings")
    return tuple(value)


def _not_blank(value: str) -> str:
    if not value.strip():
        _fail("is empty (remove it on a host without compose)")
    return value


def _filled(value: str) -> str:
    """A name Docker, compose or systemd is asked for: "" passed, and status then named the
    wrong problem (a container "not recorded"), compose picked a project itself."""
    if not value.strip():
        _fail("is empty: give the name, or remove the key to use its default")
    return value


Filled = Annotated[str, AfterValidator(_filled)]


def _container_name(value: str) -> str:
    """A container's name as Docker takes it: `docker inspect` prints it with a leading `/`,
    which the engine API cannot take in a path (found by review: every call failed with
    "no detail"), and `/x` and `x` passed as different containers."""
    _filled(value)
    if value.startswith("/"):
        _fail(f"{value!r} starts with '/' (as `docker inspect` prints .Name): write "
              f"{value.lstrip('/')!r}")
    # Docker's own grammar for a name: `../x` or `.` passed, and the engine's router cleaned
    # them out of /containers/../x/json (a 301: "no detail", exit 1); a newline was "is it a
    # Docker engine?"; one character passed, and the engine refuses it ("Invalid container
    # name"; found by review)
    if not _CONTAINER.fullmatch(value):
        _fail(f"{value!r} is not a container name Docker takes (at least 2 characters: "
              "letters, digits, '_', '.' and '-', starting with a letter or digit): write the "
              "name `docker ps -a` shows")
    return value


# the engine's validContainerNamePattern: `+`, so at least 2 characters (compose's own names,
# <project>_<service>_1 (v1) and <project>-<service>-1 (v2), always are)
_CONTAINER = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
ContainerName = Annotated[str, AfterValidator(_container_name)]

# the image reference grammar (distribution/reference): an optional registry host[:port]/,
# then lowercase path components joined by `/`, each alphanumerics joined by `.`, `_`, `__`
# or dashes. A first part is a registry host only with a `.` or a port, or as `localhost`,
# as the engine reads it (`Togather/server` is a path, refused for its capital)
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
# ...or an IPv6 address in brackets, with its port or not ([fd00::1]:5000/togather-server)
_DOMAIN = (rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})+(?::[0-9]+)?|{_DOMAIN_PART}:[0-9]+"
           r"|localhost|\[[0-9a-fA-F:]+\](?::[0-9]+)?)")
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"(?:{_DOMAIN}/)?{_PATH_PART}(?:/{_PATH_PART})*")
_NAME_TOTAL_MAX = 255  # the grammar's limit on a repository name


def _image_repository(value: str) -> str:
    """`[compose] image_repository`, to which the runbook appends `:<version>`: a name the
    engine takes. `../x` passed and every look-up of a build failed as "no detail" (the
    engine answered 301), `UPPER` as an invalid reference mid-run (found by review)."""
    _filled(value)
    if "@" in value or ":" in value.rsplit("/", 1)[-1]:
        _fail(f"{value!r} holds a tag or digest: give the repository alone (the runbook "
              "appends :<version>), e.g. togather-server")
    if len(value) > _NAME_TOTAL_MAX or not _REPOSITORY.fullmatch(value):
        _fail(f"{value!r} is not an image repository Docker takes: lowercase letters, "
              "digits and '.', '_', '-' between them, in parts joined by '/', after an "
              "optional registry host[:port]/ (e.g. togather-server, "
              "registry.example.org:5000/togather/server)")
    return value


def _host_name(value: str) -> str:
    """A host name or address as a URL holds it: a space or control character in it (a
    trailing space from a copy) made every probe fail with an uncaught InvalidURL."""
    if not value or any(c.isspace() or not c.isprintable() or c in "/?#@" for c in value):
        _fail(f"{value!r} is not a host name or address (e.g. localhost, 127.0.0.1)")
    _no_port(value)
    return value


def _no_port(value: str) -> None:
    """A host with a port (`127.0.0.1:18081`, `[::1]:8081`) made base_url
    `http://[127.0.0.1:18081]:18081`: every probe failed for the whole gate, and its advice
    pointed at `docker logs` (found by review). A `:` belongs to an IPv6 address only."""
    import ipaddress

    bracketed = value.startswith("[")
    if bracketed:  # `[::1]`, as a URL writes an IPv6 address
        address, closed, after = value[1:].partition("]")
        if not closed:
            after = "]"
    elif value.count(":") == 1:
        address, colon, port = value.partition(":")
        after = colon + port
    else:
        address, after = value, ""
    if after[:1] == ":" and after[1:].isdigit():
        _fail(f"{value!r} holds a port: put it in `port` (host = \"{address}\", "
              f"port = {after[1:]})")
    if after:
        _fail(f"{value!r} is not a host name or address (e.g. localhost, 127.0.0.1, ::1)")
    if bracketed or ":" in address:
        try:
            ipaddress.IPv6Address(address)  # `::1`, `fe80::1%eth0`
        except ValueError:
            _fail(f"{value!r} is not an IPv6 address (e.g. ::1), nor a host name")


def _absolute(value: str) -> str:
    if not value.startswith("/"):
        _fail(f"{value!r} is not an absolute path (the Caddyfile's path inside Caddy's "
              "container)")
    return value


_SITE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def _site(value: str) -> str:
    if not _SITE.fullmatch(value):
        _fail(f"{value!r} is not a host name (the app's site in the Caddyfile, e.g. "
              "togather.example.org: no scheme, port or path)")
    return value.lower()


def _url_path(value: str) -> str:
    if not value.startswith("/"):
        _fail(f"{value!r} must start with '/' (it is appended to the slot's address)")
    if any(c.isspace() or not c.isprintable() for c in value):
        # a trailing space from a copy: every probe failed with InvalidURL, after the start
        _fail(f"{value!r} holds a space or control character")
    return value


def _http_url(value: str) -> str:
    """Caddy's admin API or proxy address: an http(s) URL with a host and nothing after it
    (the runbook appends /config/, /load, verify_path). `localhost:2019` or a URL with a
    path was accepted and failed mid-run as "Caddy is not running"."""
    from urllib.parse import urlsplit

    shown = redact(repr(value))
    if any(c.isspace() or not c.isprintable() for c in value):
        _fail(f"{shown} holds a space or control character")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises on a port that is no number)
    except ValueError:
        _fail(f"{shown} is not a valid URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        _fail(f"{shown} is not an http(s) URL with a host (e.g. http://localhost:2019)")
    if parts.username is not None or parts.password is not None:
        _fail("holds a user and password, which the runbook never sends: give the address only")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        _fail(f"{shown} has a path, query or fragment: give the address only (the runbook "
              "appends the paths it asks)")
    return value.rstrip("/")


HttpUrl = Annotated[str, AfterValidator(_http_url)]
LOOPBACK = "loopback"  # what _host calls every name of this machine's loopback


def _host(name: str) -> str:
    """A host as compared here: every loopback name and address (localhost, 127.0.0.2, ::1)
    is one host; any other name lowercase."""
    import ipaddress

    name = name.lower().strip("[]")
    if name == "localhost":
        return LOOPBACK
    try:
        return LOOPBACK if ipaddress.ip_address(name).is_loopback else name
    except ValueError:
        return name


def _address(url: str) -> tuple[str, int]:
    """An http(s) URL's host (_host) and port (the scheme's when none is given)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return (_host(parts.hostname or ""),
            parts.port or (443 if parts.scheme == "https" else 80))


UrlPath = Annotated[str, AfterValidator(_url_path)]


def _file_path(value: str) -> str:
    """A path key: never empty (`""` became the config file's own folder: dumps of the whole
    database written to /etc/togather-runbook/), and a `~user` that exists here (expanding
    an unknown one raised a bare RuntimeError, exit 5)."""
    if not value.strip():
        _fail("is empty: remove the key to use its default, or give a path")
    if "\x00" in value:  # every file call raised a bare ValueError (exit 5), naming no key
        _fail("holds a NUL character: write the path without it")
    try:
        expanded = os.path.expandvars(value)
        Path(expanded).expanduser()
    except RuntimeError:
        _fail(f"{value!r} names a home directory of a user this machine does not have; "
              "write the path in full")
    if "$" in expanded:  # an unset variable (under sudo, cron): a folder named "$VAR"
        _fail(f"{value!r} names an environment variable that is not set here (it would be a "
              "folder literally named after it, beside the environment file); set it, or "
              "write the path in full")
    from runbook.files import name_too_long

    # every file call on it was "unexpected failure" (a bug); a relative path's length
    # counts from the environment file's folder, unknown here: its names alone are judged
    path = Path(expanded).expanduser()
    if (why := name_too_long(str(path), whole=path.is_absolute())) is not None:
        _fail(why)
    return value


FilePath = Annotated[str, AfterValidator(_file_path)]


def _variable_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        # never echoed: a URL put here by mistake holds the password
        _fail("must be the NAME of the variable that holds the URL (like DATABASE_URL), "
              "never the URL itself")
    return value


Port = Annotated[int, AfterValidator(_port)]
Positive = Annotated[float, AfterValidator(_positive)]
Command = Annotated[tuple[str, ...], PlainValidator(_command)]
_ENGINE_OPTIONS = ("-H", "--host", "-c", "--context", "--config")
_VALUED_GLOBALS = ("-l", "--log-level", "--tlscacert", "--tlscert", "--tlskey")
# docker-compose's own valued options, before its command (`-p NAME`, `-f FILE`)
_COMPOSE_VALUED = ("-f", "--file", "-p", "--project-name", "--project-directory",
                   "--env-file", "--profile", "--ansi")
_ENGINE_VARIABLES = ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_CONFIG")


def _sudo_keeps(word: str) -> bool | set[str]:
    """What a sudo option keeps of the caller's environment: all of it (-E, a bare
    --preserve-env), the variables it lists (--preserve-env=A,B), or nothing (False)."""
    if word == "--preserve-env" or (word[:1] == "-" and word[1:2] != "-" and "E" in word):
        return True
    if word.startswith("--preserve-env="):
        return set(word.split("=", 1)[1].split(","))
    return False


def _docker_command(value: Any) -> tuple[str, ...]:
    """A command that runs `docker` (Caddy's, compose's) must reach the engine the runbook
    inspects: one naming its own (`docker -H ...`, `--context`, another `--config`, an
    `env DOCKER_HOST=...` before it) made every check of containers and mounts look at
    another engine than the one acted on (found by review: the Caddyfile-mount check passed
    as "not checked", compose recreated elsewhere). So did `sudo docker ...` when the
    runbook's engine is not the default socket: sudo resets the environment (and HOME, so
    the docker CLI's context too), and the command then reaches the default socket."""
    words = list(_command(value))
    sudo = False
    kept: set[str] = set()
    unset: set[str] = set()  # what an `env -u`/`-i` before docker takes from the command
    while words and Path(words[0]).name in ("env", "sudo"):  # the wrappers before docker
        wrapper = Path(words.pop(0)).name
        sudo = sudo or wrapper == "sudo"
        while words and (words[0].startswith("-") or "=" in words[0]):  # options, VAR=value
            word = words.pop(0)
            if word.split("=", 1)[0] in _ENGINE_VARIABLES:
                _fail(f"sets {word.split('=', 1)[0]} for the command, which the runbook does "
                      "not inspect: point the runbook and the command at one engine instead")
            if wrapper == "sudo":
                keeps = _sudo_keeps(word)
                kept |= set(_ENGINE_VARIABLES) if keeps is True else keeps or set()
                if word in SUDO_VALUED and words:
                    words.pop(0)  # its value, not the command
            elif word in ("-i", "--ignore-environment", "-"):
                unset |= set(_ENGINE_VARIABLES)
            elif word in ("-u", "--unset") and words:
                unset.add(words.pop(0))
            elif word.startswith(("--unset=", "-u")):
                unset.add(word.split("=", 1)[1] if "=" in word else word[2:])
            elif word in ("-C", "--chdir") and words:
                words.pop(0)  # its value, not the command (found by review: it hid docker)
    # docker-compose (Compose v1) reaches the engine as docker does, and takes -H and
    # --context among its own options (found by review: it was not read as docker at all)
    engine = Path(words[0]).name if words else ""
    if engine in ("docker", "podman", "docker-compose") and (sudo or unset):
        _refuse_dropping_the_engine(sudo, kept, unset)
    if engine in ("docker", "podman", "docker-compose"):
        valued = _VALUED_GLOBALS + (_COMPOSE_VALUED if engine == "docker-compose" else ())
        rest = iter(words[1:])
        for word in rest:
            if not word.startswith("-"):
                break  # the subcommand: options after it are its own
            name = word.split("=", 1)[0]
            attached = word[:2] in ("-H", "-c") and len(word) > 2  # -Htcp://..., -cother
            if name in _ENGINE_OPTIONS or attached:
                _fail(f"names its own Docker engine ({word[:2] if attached else name}), "
                      "which the runbook does not inspect: remove it and point the runbook "
                      "and the command at one engine (DOCKER_HOST, or `docker context use`)")
            if name in valued and "=" not in word:
                next(rest, None)  # its value, not the subcommand
    return tuple(_command(value))


def _refuse_dropping_the_engine(sudo: bool, kept: set[str], unset: set[str]) -> None:
    """A `sudo docker` command whose sudo does not keep what names the runbook's engine, or
    an `env -u DOCKER_HOST`/`env -i` one: it would act on the default socket while the
    runbook inspects another engine. Only DOCKER_HOST can be handed over through sudo (a
    context lives in the caller's HOME, which sudo resets); on the default socket, neither
    changes anything and both stay allowed."""
    from runbook import docker

    where = docker.engine_elsewhere()
    if where is None:
        return
    by_variable = where.startswith("DOCKER_HOST=")
    dropped = unset & ({"DOCKER_HOST"} if by_variable else {"DOCKER_CONTEXT", "DOCKER_CONFIG"})
    if dropped:
        _fail(f"unsets {', '.join(sorted(dropped))} for the command (env -u/-i), so it would "
              f"reach the default Docker socket while the runbook inspects the engine of "
              f"{where}: remove that env option")
    if not sudo or (by_variable and "DOCKER_HOST" in kept):
        return
    point = "" if by_variable else "set DOCKER_HOST to that engine and "
    _fail(f"runs sudo, which resets the environment, so the command would reach the default "
          f"Docker socket while the runbook inspects the engine of {where}: {point}use "
          "`sudo --preserve-env=DOCKER_HOST docker ...`, or drop sudo (run the runbook as a "
          "member of the docker group)")


DockerCommand = Annotated[tuple[str, ...], PlainValidator(_docker_command)]
Retention = Annotated[int, AfterValidator(_retention)]


class _Table(BaseModel):
    """Strict (TOML types as written: no "8081" for 8081), unknown keys refused, frozen."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _table() -> Any:
    """A table that may be left out: its keys then take their defaults, or are reported
    missing one by one (slots.green.port, not just slots.green)."""
    return Field(default_factory=dict, validate_default=True)


class StateFile(_Table):
    file: FilePath = "/opt/togather/src/deploy/config/deployment-state.json"


class LockFile(_Table):
    dir: FilePath = "/tmp"
    stale_after_seconds: Positive = Environment.lock_stale_after


class LogsFile(_Table):
    dir: FilePath = "~/.togather/logs/deployments"
    runs_dir: FilePath = "~/.togather/runs"


class SlotFile(_Table):
    container: ContainerName
    # the compose service; left out on hosts without compose (`docker run`)
    service: Annotated[str, AfterValidator(_not_blank)] | None = None
    port: Port
    host: Annotated[str, AfterValidator(_host_name)] = SlotConfig.host


class SlotsFile(_Table):
    blue: SlotFile = _table()
    green: SlotFile = _table()

    @model_validator(mode="after")
    def _distinct_ports(self) -> SlotsFile:
        # a shared container or service would make every act on the standby (recreate, stop)
        # an act on the serving slot, which the serving-port check cannot see
        if self.blue.port == self.green.port:
            _fail("blue and green must use different ports")
        if self.blue.container == self.green.container:
            _fail(f"blue and green must use different containers (both are "
                  f"{self.blue.container!r})")
        if self.blue.service is not None and self.blue.service == self.green.service:
            _fail(f"blue and green must use different compose services (both are "
                  f"{self.blue.service!r})")
        return self


class CaddyFile(_Table):
    caddyfile: FilePath = "/etc/caddy/Caddyfile"
    reload: Annotated[str, _choice(*(m.value for m in ReloadMethod))] = "admin-api"
    admin_url: HttpUrl = "http://localhost:2019"
    proxy_url: HttpUrl = "http://localhost"
    command: DockerCommand = CaddyConfig.command
    systemd_unit: Filled = CaddyConfig.systemd_unit
    verify_path: UrlPath = CaddyConfig.verify_path
    container_path: Annotated[str, AfterValidator(_absolute)] | None = None
    site: Annotated[str, AfterValidator(_site)] | None = None
    ca_file: FilePath | None = None

    @model_validator(mode="after")
    def _admin_api_is_not_the_site(self) -> CaddyFile:
        # verification asked the admin API for the site's page: no slot header, so every
        # switch was refused as unverifiable, or undone
        if _address(self.admin_url) == _address(self.proxy_url):
            _fail(f"admin_url and proxy_url are the same address ({self.proxy_url}): "
                  "proxy_url is where users' requests go, admin_url Caddy's admin API")
        return self


class ComposeFile(_Table):
    file: FilePath | None = None  # default: STANDARD_COMPOSE_FILE where it exists
    project: Filled | None = None  # default: togather-<name>
    env_file: FilePath | None = None
    image_repository: Annotated[str, AfterValidator(_image_repository)] = \
        ComposeConfig.image_repository
    command: DockerCommand = ComposeConfig.command


class HealthFile(_Table):
    path: UrlPath = HealthConfig.path
    timeout_seconds: Positive = HealthConfig.timeout
    interval_seconds: Positive = HealthConfig.interval
    max_interval_seconds: Positive = HealthConfig.max_interval
    request_timeout_seconds: Positive = HealthConfig.request_timeout


class DatabaseFile(_Table):
    env_file: FilePath | None = None  # default: compose.env_file
    url_variable: Annotated[str, AfterValidator(_variable_name)] = DatabaseConfig.url_variable
    container: ContainerName = DatabaseConfig.container
    snapshot_dir: FilePath = str(DatabaseConfig.snapshot_dir)
    retention_days: Retention = DatabaseConfig.retention_days
    access: Annotated[str, _choice("auto", "host", "container")] = DatabaseConfig.access


class RollbackFile(_Table):
    stop_old_slot: bool = Environment.stop_old_slot
    drain_timeout_seconds: Positive = Environment.drain_timeout


class DeployFile(_Table):
    # run inside the new slot by deploy; left out: the app migrates by itself
    migrate_command: Command | None = None


class DrillFile(_Table):
    allows_faults: bool = Environment.allows_faults


class EnvironmentFile(_Table):
    """One environment file: every key the format knows, and nothing else."""

    @model_validator(mode="after")
    def _slots_are_not_the_database(self) -> EnvironmentFile:
        # a slot naming the database's container or service: a rollback's stop of the old
        # slot stopped Postgres, a deploy's recreate recreated it, a restore stopped it
        db = self.database.container
        for slot in ("blue", "green"):
            config = getattr(self.slots, slot)
            if db in (config.container, config.service):
                _fail(f"slots.{slot} names the database's container {db!r} ([database] "
                      "container): every stop and recreate of that slot would hit Postgres")
        # a slot port that is Caddy's own on this machine: the Caddyfile would send users
        # to Caddy itself, and a health probe of that slot would ask Caddy
        for key in ("proxy_url", "admin_url"):
            host, port = _address(getattr(self.caddy, key))
            for slot in ("blue", "green"):
                config = getattr(self.slots, slot)
                if host == LOOPBACK == _host(config.host) and config.port == port:
                    _fail(f"slots.{slot} port {port} is Caddy's own (caddy.{key} "
                          f"{getattr(self.caddy, key)}): give the port the {slot} container "
                          "publishes")
        return self

    name: Annotated[str, BeforeValidator(lambda v: ALIASES.get(v, v) if isinstance(v, str)
                                         else v), _choice(*ENV_NAMES)]
    label: str = ""
    state: StateFile = _table()
    lock: LockFile = _table()
    logs: LogsFile = _table()
    slots: SlotsFile = _table()
    caddy: CaddyFile = _table()
    compose: ComposeFile = _table()
    health: HealthFile = _table()
    database: DatabaseFile = _table()
    rollback: RollbackFile = _table()
    deploy: DeployFile = _table()
    drill: DrillFile = _table()


def known_keys(model: type[BaseModel] = EnvironmentFile) -> dict[str, set[str]]:
    """{"": top-level keys, "caddy": its keys, "slots.blue": ...}, from the model."""
    out: dict[str, set[str]] = {"": set(model.model_fields)}
    for key, info in model.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            for table, keys in known_keys(sub).items():
                out[f"{key}.{table}" if table else key] = keys
    return out


# -- reading ---------------------------------------------------------------------------------

_KINDS = {"string_type": "str", "int_type": "int", "float_type": "float", "bool_type": "bool",
          "list_type": "list", "tuple_type": "list"}


def _describe(error: Mapping[str, Any], keys: Mapping[str, set[str]]) -> tuple[str, str]:
    """(dotted key, problem) in the words the old reader used."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    kind = error["type"]
    if kind == "missing":
        return key, "required key is missing"
    if kind == "extra_forbidden":
        # the key after "unknown key", never before a colon: `database.password: unknown key`
        # read to the redactor as a password's value, and printed `database.password: ***
        # key` (found by review); the value itself is never quoted
        parent = ".".join(loc[:-1])
        return "", f"unknown key {key} (known: {', '.join(sorted(keys.get(parent, ())))})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return key, "expected a table"
    if kind in _KINDS:  # masked: a value typed in the wrong place may be a DATABASE_URL
        return key, redact(f"expected {_KINDS[kind]}, got {error['input']!r}")
    return key, redact(str(error["msg"]))


def _path(value: str | None, base: Path) -> Path | None:
    if value is None:
        return None
    path = Path(os.path.expandvars(value)).expanduser()
    return path if path.is_absolute() else base / path


def parse(data: Mapping[str, Any], path: Path) -> Environment:
    """Validate a parsed TOML document and build the Environment; every problem in one
    ConfigError (exit 2), one line each: `<file>: <key>: <problem>` (an unknown key:
    `<file>: unknown key <key> (known: ...)`)."""
    try:
        f = EnvironmentFile.model_validate(data)
    except ValidationError as exc:
        keys = known_keys()
        lines = []
        for error in exc.errors(include_url=False):
            key, problem = _describe(error, keys)
            lines.append(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")
        raise ConfigError(f"{len(lines)} problem(s) in {path}:\n  " + "\n  ".join(lines),
                          "fix them and run again") from None
    env = _build(f, path)
    _check_ca_file(env, path)
    return _agree_with_env_files(env,
                                 retention_set="retention_days" in f.database.model_fields_set,
                                 timeout_set="timeout_seconds" in f.health.model_fields_set)


def _check_ca_file(env: Environment, path: Path) -> None:
    """[caddy] ca_file must load as certificates now: found missing in the middle of a
    switch, its verification would fail after users were moved."""
    ca_file = env.caddy.ca_file
    if ca_file is None:
        return
    import ssl

    try:
        ssl.create_default_context().load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError, ValueError) as exc:
        why = (exc.strerror if isinstance(exc, OSError) and exc.strerror
               else "not a PEM certificate bundle")
        raise ConfigError(
            f"{path}: caddy.ca_file: cannot load {ca_file} ({why})",
            "set it to a readable PEM file, such as Caddy's local root "
            "<caddy data dir>/pki/authorities/local/root.crt, or remove the key") from None


def _agree_with_env_files(env: Environment, *, retention_set: bool = True,
                          timeout_set: bool = True) -> Environment:
    """Refuse an environment whose host env file says otherwise about where things are.

    Why: the host's own tooling reads COMPOSE_PROJECT_NAME, HEALTH_CHECK_PATH, SNAPSHOT_DIR,
    SNAPSHOT_RETENTION_DAYS and HEALTH_WAIT_TIMEOUT from that file (CONTRACTS); a runbook
    looking elsewhere would not find the deploy's snapshots, ask another path for health,
    expire (and clean up) after 7 days what the host keeps 30, or fail at 60 s a slot the
    host waits 180 s for. The last two are taken, never compared (`_retention_from_env_files`,
    `_timeout_from_env_files`). An env file this process cannot open is not judged here:
    whatever needs it (the database URL, compose) reports it. A SNAPSHOT_DIR under a home
    (`~/...`, `$HOME/...`) is not judged: it is the home of whoever runs the tooling, which
    sudo makes another than the runbook's (found by review: judged against the runbook's own
    home, `sudo runbook ...` refused every command and offered `/root/...` as the fix)."""
    read = _env_files(env)
    env = _retention_from_env_files(env, read, retention_set)
    env = _timeout_from_env_files(env, read, timeout_set)
    ours = {"COMPOSE_PROJECT_NAME": ("[compose] project", env.compose.project),
            "HEALTH_CHECK_PATH": ("[health] path", env.health.path),
            "SNAPSHOT_DIR": ("[database] snapshot_dir", str(env.database.snapshot_dir))}
    for file, values in read.items():
        for variable, (key, mine) in ours.items():
            theirs = said = values.get(variable, "")
            if not theirs or "$" in theirs:  # interpolated by the host's tooling: not judged
                continue
            if variable == "SNAPSHOT_DIR" and (theirs == "~" or theirs.startswith("~/")):
                continue  # the home of whoever runs the tooling: not judged (see below)
            if variable == "COMPOSE_PROJECT_NAME" and env.compose.file is None:
                continue  # no compose here (`docker run` slots): no project to agree on
            if variable == "SNAPSHOT_DIR":
                try:
                    folder = Path(theirs).expanduser()
                except RuntimeError:  # `~user` of a user this machine does not have
                    continue
                if not folder.is_absolute():  # relative to a directory only its tool knows
                    continue
                theirs = str(folder)  # a trailing slash is the same folder
            url = variable == "HEALTH_CHECK_PATH" and "://" in theirs
            if variable == "HEALTH_CHECK_PATH":
                theirs = _health_check_path(theirs)
                if not theirs:
                    raise ConfigError(
                        redact(f"{file} sets {variable}={said}, which is neither a path nor "
                               "a URL"),
                        f"write the path the host's tooling probes, e.g. {variable}="
                        f"{mine}, in {file}")
            if theirs != mine:
                section, _, name = key.partition(" ")
                raise ConfigError(
                    redact(f"{file} sets {variable}={said}"
                           + (f" (a URL: its path is {theirs})" if url else "")
                           + f", but {key} is {mine!r} in {env.source}: the host's tooling "
                           "and the runbook would disagree"),
                    f"set {name} = \"{theirs}\" under {section} in {env.source}, or make "
                    f"{variable} in {file} agree"
                    + (f" (a path such as {theirs}, not a URL)" if url else ""))
    return env


def _health_check_path(value: str) -> str:
    """HEALTH_CHECK_PATH as the path it names: `healthz` is `/healthz` (the fix offered
    "healthz", refused), and a URL its path and query (found by review: the fix offered
    `/http://localhost:8080/health`, which passed validation and broke every probe)."""
    if "://" in value:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
        except ValueError:  # `http://[x/health`: "" names no path
            return ""
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return value if value.startswith("/") else f"/{value}"


def _env_files(env: Environment) -> dict[Path, dict[str, str]]:
    """The host env files' values ([compose] then [database] env_file), each read once. One
    this process cannot open is left out. One whose bytes are not all UTF-8 (a Latin-1 byte
    in a comment or a password: Compose reads it) is read with those bytes replaced: its
    checks were silently off (the gate probed another path than the host's tooling), and
    refusing it stopped every command, the rollback's too (both found by review).
    Each value as written (quotes and escapes read), never expanded: Compose looks a `${X}`
    up in the environment of whoever runs it first, and the host's tooling is not this
    process (`sudo runbook ...`: another HOME, another user's exports), so a value holding
    `$` stays "not judged" by the checks below, as before the runbook expanded any."""
    from runbook.environment.model import read_env_entries

    read: dict[Path, dict[str, str]] = {}
    for file in dict.fromkeys(f for f in (env.compose.env_file, env.database.env_file) if f):
        try:
            entries = read_env_entries(file, errors="replace")
        except ConfigError:
            continue
        read[file] = {key: entry.written for key, entry in entries.items()}
    return read


def _retention_from_env_files(env: Environment, read: Mapping[Path, Mapping[str, str]],
                              retention_set: bool) -> Environment:
    """The env files' SNAPSHOT_RETENTION_DAYS as the retention when the TOML sets none; when
    both say, the longer (a snapshot is never expired before either keeps it). Never a
    refusal: a rollback at 3 a.m. must not stop on when snapshots expire (found by review of
    a first version that refused a disagreement at every command, the rollback's too). A
    value that is no whole number of days from 1 to MAX_RETENTION_DAYS, or one holding `$`
    (the host's tooling expands it), is not taken."""
    days = env.database.retention_days
    for values in read.values():
        said = values.get("SNAPSHOT_RETENTION_DAYS", "").strip()
        theirs = int(said) if said.isdigit() and len(said) < 6 else 0  # no 5000-digit int()
        if not 1 <= theirs <= MAX_RETENTION_DAYS:
            continue
        days = max(days, theirs) if retention_set else theirs
        retention_set = True  # a second env file: the longer again
    if days == env.database.retention_days:
        return env
    return env.with_(database=replace(env.database, retention_days=days))


_SECONDS = re.compile(r"\d{1,9}(\.\d{0,9})?")


def _timeout_from_env_files(env: Environment, read: Mapping[Path, Mapping[str, str]],
                            timeout_set: bool) -> Environment:
    """The env files' HEALTH_WAIT_TIMEOUT (the host's deploy.sh waits that long for a slot's
    health) as the gate's timeout when [health] timeout_seconds is not set; when both say,
    the longer: a gate that waits longer never makes an outage worse (traffic stays where it
    is while it waits), and one shorter than the host's failed (and undid) a slot its
    tooling would have waited for (found by review). A value that is no number of seconds
    above 0 and at most a week (`3min`) is not taken, and the plan's gate step says so: it
    only ever lengthens the gate, so a refusal stopped every command, the rollback's too,
    over nothing (found by review). One holding `$` (the host's tooling expands it) or empty
    (`${HEALTH_WAIT_TIMEOUT:-60}` reads it as unset) is not taken either."""
    ours = env.health.timeout
    timeout, source, unread = ours, "", ""
    for file, values in read.items():
        said = values.get("HEALTH_WAIT_TIMEOUT", "").strip()
        if not said or "$" in said:
            continue
        seconds = float(said) if _SECONDS.fullmatch(said) else 0.0
        if not 0 < seconds <= MAX_SECONDS:
            shown = redact(said)  # masked before it is cut, as every cut text is
            shown = shown if len(shown) <= 24 else f"{shown[:24]}..."
            unread = redact(f"HEALTH_WAIT_TIMEOUT={shown} in {file} is not a number of seconds "
                            "above 0 and at most a week: not taken")
            continue
        if not timeout_set or seconds > timeout:
            timeout, source = seconds, f"HEALTH_WAIT_TIMEOUT in {file}"
            if timeout_set and seconds > ours:
                source += f", longer than [health] timeout_seconds {ours:g}s"
        timeout_set = True  # a second env file: the longer again
    source = "; ".join(x for x in (source, unread) if x)
    if not source:
        return env
    return env.with_(health=replace(env.health, timeout=timeout, timeout_source=source))


def _build(f: EnvironmentFile, path: Path) -> Environment:
    base = path.parent
    p: Callable[[str], Path] = lambda value: _path(value, base) or Path()  # noqa: E731
    compose_env = _path(f.compose.env_file, base)
    slots = {slot: SlotConfig(slot, s.container, s.service, s.port, s.host)
             for slot, s in ((Slot.BLUE, f.slots.blue), (Slot.GREEN, f.slots.green))}
    return Environment(
        name=f.name, state_file=p(f.state.file), lock_dir=p(f.lock.dir),
        log_dir=p(f.logs.dir), runs_dir=p(f.logs.runs_dir), slots=slots,
        caddy=CaddyConfig(
            caddyfile=p(f.caddy.caddyfile), reload=ReloadMethod(f.caddy.reload),
            admin_url=f.caddy.admin_url.rstrip("/"), proxy_url=f.caddy.proxy_url.rstrip("/"),
            command=f.caddy.command, systemd_unit=f.caddy.systemd_unit,
            verify_path=f.caddy.verify_path, container_path=f.caddy.container_path,
            site=f.caddy.site, ca_file=_path(f.caddy.ca_file, base)),
        compose=ComposeConfig(
            file=_path(f.compose.file, base)
            or (STANDARD_COMPOSE_FILE if STANDARD_COMPOSE_FILE.is_file() else None),
            project=f.compose.project if f.compose.project is not None else f"togather-{f.name}",
            env_file=compose_env, image_repository=f.compose.image_repository,
            command=f.compose.command),
        health=HealthConfig(
            path=f.health.path, timeout=f.health.timeout_seconds,
            interval=f.health.interval_seconds, max_interval=f.health.max_interval_seconds,
            request_timeout=f.health.request_timeout_seconds),
        database=DatabaseConfig(
            env_file=_path(f.database.env_file, base) or compose_env,
            url_variable=f.database.url_variable, container=f.database.container,
            snapshot_dir=p(f.database.snapshot_dir), retention_days=f.database.retention_days,
            access=f.database.access),
        lock_stale_after=f.lock.stale_after_seconds, stop_old_slot=f.rollback.stop_old_slot,
        drain_timeout=f.rollback.drain_timeout_seconds,
        # absolute: a printed fix names this file (command_arg), run from wherever on-call is
        source=path.absolute(), label=f.label or f.name, allows_faults=f.drill.allows_faults,
        migrate_command=f.deploy.migrate_command or (),
    )


# -- writing ---------------------------------------------------------------------------------

def _file_of(env: Environment) -> EnvironmentFile:
    """The file that loads back as `env` (its label: what it is called in output)."""
    c, m, h, d = env.caddy, env.compose, env.health, env.database

    def text(value: Path | None) -> str | None:
        return None if value is None else str(value)

    def slot(s: SlotConfig) -> SlotFile:
        return SlotFile(container=s.container, service=s.service, port=s.port, host=s.host)

    # [deploy] and [drill] only when they say something (dump leaves out what is not set)
    optional: dict[str, Any] = {}
    if env.migrate_command:
        optional["deploy"] = DeployFile(migrate_command=env.migrate_command)
    if env.allows_faults:
        optional["drill"] = DrillFile(allows_faults=True)
    return EnvironmentFile(
        name=env.name, label=env.display,
        state=StateFile(file=str(env.state_file)),
        lock=LockFile(dir=str(env.lock_dir), stale_after_seconds=env.lock_stale_after),
        logs=LogsFile(dir=str(env.log_dir), runs_dir=str(env.runs_dir)),
        slots=SlotsFile(blue=slot(env.slot(Slot.BLUE)), green=slot(env.slot(Slot.GREEN))),
        caddy=CaddyFile(caddyfile=str(c.caddyfile), reload=c.reload.value,
                        admin_url=c.admin_url, proxy_url=c.proxy_url, command=c.command,
                        systemd_unit=c.systemd_unit, verify_path=c.verify_path,
                        container_path=c.container_path, site=c.site,
                        ca_file=text(c.ca_file)),
        compose=ComposeFile(file=text(m.file), project=m.project, env_file=text(m.env_file),
                            image_repository=m.image_repository, command=m.command),
        health=HealthFile(path=h.path, timeout_seconds=h.timeout,
                          interval_seconds=h.interval, max_interval_seconds=h.max_interval,
                          request_timeout_seconds=h.request_timeout),
        database=DatabaseFile(env_file=text(d.env_file), url_variable=d.url_variable,
                              container=d.container, snapshot_dir=str(d.snapshot_dir),
                              retention_days=d.retention_days, access=d.access),
        rollback=RollbackFile(stop_old_slot=env.stop_old_slot,
                              drain_timeout_seconds=env.drain_timeout), **optional,
    )


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _toml_table(data: Mapping[str, Any], prefix: str, lines: list[str]) -> None:
    """Keys first, then sub-tables; absent (None) keys and empty tables are left out."""
    scalars = [(k, v) for k, v in data.items() if v is not None and not isinstance(v, dict)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, dict)]
    if prefix and scalars:
        lines.append(f"[{prefix}]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in scalars]
    if scalars:
        lines.append("")
    for key, sub in tables:
        _toml_table(sub, f"{prefix}.{key}" if prefix else key, lines)


def dump(env: Environment) -> str:
    """The environment as a TOML file (what a drill hands to `--env <file>`)."""
    lines: list[str] = []
    _toml_table(_file_of(env).model_dump(exclude_unset=True), "", lines)
    return "\n".join(lines)
