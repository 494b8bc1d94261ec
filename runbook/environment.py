"""Where everything of one environment lives: the same type for a real host and a drill stack.

An environment is read from a TOML file (runbook/environments/<name>.toml, `--config PATH` or
RUNBOOK_CONFIG). A drill stack builds the same object; the only thing a drill adds is
`allows_faults`, the permission to break things on purpose.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from runbook.errors import ConfigError

ENV_NAMES = ("development", "staging", "production")
ALIASES = {"prod": "production", "stage": "staging", "dev": "development"}
REPO_ROOT = Path(__file__).resolve().parent.parent
BUILTIN_DIR = Path(__file__).resolve().parent / "environments"  # package data: found installed
SYSTEM_DIR = Path("/etc/togather-runbook")
# The contract's compose file: the default only on a host where it exists (issue 10: hosts that
# start their slots with `docker run` have none, and a default to a missing file misleads).
STANDARD_COMPOSE_FILE = Path("/opt/togather/src/deploy/docker/docker-compose.blue-green.yml")


class Slot(StrEnum):
    BLUE = "blue"
    GREEN = "green"

    @property
    def other(self) -> Slot:
        return Slot.GREEN if self is Slot.BLUE else Slot.BLUE


class ReloadMethod(StrEnum):
    ADMIN_API = "admin-api"  # POST <admin_url>/load with the Caddyfile
    CADDY_RELOAD = "caddy-reload"  # <command> reload --config <caddyfile>
    SYSTEMCTL = "systemctl"  # systemctl reload <unit>


@dataclass(frozen=True)
class SlotConfig:
    slot: Slot
    container: str
    service: str | None  # the compose service; None on hosts without compose (`docker run`)
    port: int
    host: str = "127.0.0.1"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class CaddyConfig:
    caddyfile: Path
    reload: ReloadMethod
    admin_url: str
    proxy_url: str  # where verification requests go, through Caddy
    command: tuple[str, ...] = ("caddy",)  # how to run the caddy binary (validate, reload)
    systemd_unit: str = "caddy"
    verify_path: str = "/version"
    # The Caddyfile's path as Caddy sees it, when Caddy runs in a container whose config
    # directory is bind-mounted elsewhere (host /srv/caddy -> /etc/caddy): `caddy validate`
    # and `caddy reload` run through `command` must name files by that path. None: the same.
    container_path: str | None = None


@dataclass(frozen=True)
class ComposeConfig:
    file: Path | None  # None: this host has no compose file, slots cannot be recreated by us
    project: str
    env_file: Path | None
    image_repository: str = "togather-server"
    command: tuple[str, ...] = ("docker", "compose")


@dataclass(frozen=True)
class HealthConfig:
    path: str = "/health"
    timeout: float = 60.0  # seconds the gate waits for healthy
    interval: float = 0.25  # first poll interval; doubles up to max_interval
    max_interval: float = 2.0
    request_timeout: float = 3.0


@dataclass(frozen=True)
class DatabaseConfig:
    env_file: Path | None
    url_variable: str = "DATABASE_URL"
    container: str = "togather-db"
    snapshot_dir: Path = Path("/var/lib/togather/db-snapshots")
    retention_days: int = 7
    # How the runbook reaches the database: "host" (psycopg from this machine), "container"
    # (psql inside `container` through `docker exec`), or "auto": container when the URL's
    # host does not resolve here (e.g. `togather-db`, a name on Docker's network only).
    access: str = "auto"

    def url(self) -> str:
        """The database URL from the process environment or the env file. Never log it."""
        if value := os.environ.get(self.url_variable):
            return value
        if self.env_file is None:
            raise ConfigError(f"{self.url_variable} is not set and no env file is configured",
                              f"export {self.url_variable} or set [database] env_file")
        values = read_env_file(self.env_file)
        if self.url_variable not in values:
            raise ConfigError(f"{self.url_variable} is missing from {self.env_file}",
                              f"add {self.url_variable}=postgresql://... to that file")
        return values[self.url_variable]


@dataclass(frozen=True)
class Environment:
    name: str  # development | staging | production: the state file's `environment`
    state_file: Path
    lock_dir: Path
    log_dir: Path
    runs_dir: Path
    slots: Mapping[Slot, SlotConfig]
    caddy: CaddyConfig
    compose: ComposeConfig
    health: HealthConfig
    database: DatabaseConfig
    lock_stale_after: float = 1800.0
    stop_old_slot: bool = True
    source: Path | None = None  # the TOML file it came from
    label: str = ""  # how to call it in output, e.g. "production" or "drill 3f2a"
    allows_faults: bool = False  # only drill stacks may be broken on purpose
    migrate_command: tuple[str, ...] = ()  # run inside the new slot by deploy; () = app migrates
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def lock_path(self) -> Path:
        return self.lock_dir / f"togather-deploy-{self.name}.lock"

    @property
    def display(self) -> str:
        return self.label or self.name

    def slot(self, slot: Slot | str) -> SlotConfig:
        return self.slots[Slot(slot)]

    def with_(self, **changes: Any) -> Environment:
        return replace(self, **changes)


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a docker-compose style env file (KEY=VALUE, # comments, optional quotes)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read env file {path}: {exc.strerror}",
                          "check the path and its permissions (mode 0600, owned by you)") from None
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def canonical_name(name: str) -> str:
    """`prod` -> `production`; unknown names are returned unchanged (they may be files)."""
    return ALIASES.get(name, name)


def find_config(name_or_path: str) -> Path:
    """Resolve an environment name or a path to its TOML file."""
    explicit = Path(name_or_path).expanduser()
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        if not explicit.is_file():
            raise ConfigError(f"environment file {explicit} does not exist",
                              "pass an existing TOML file or one of: " + ", ".join(ENV_NAMES))
        return explicit
    name = canonical_name(name_or_path)
    if name not in ENV_NAMES:
        raise ConfigError(f"unknown environment {name_or_path!r}",
                          "use development, staging, production (alias prod) or a .toml path")
    for directory in (SYSTEM_DIR, BUILTIN_DIR):
        candidate = directory / f"{name}.toml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no configuration for environment {name!r}",
                      f"write {SYSTEM_DIR / (name + '.toml')} (see README, 'Environment files')")


def load(name_or_path: str, *, config: str | None = None) -> Environment:
    """Load an environment: `config` (or RUNBOOK_CONFIG) wins over the name's default file."""
    chosen = config or os.environ.get("RUNBOOK_CONFIG")
    path = find_config(chosen) if chosen else find_config(name_or_path)
    env = load_file(path)
    wanted = canonical_name(name_or_path)
    if chosen and wanted in ENV_NAMES and env.name != wanted:
        raise ConfigError(f"{path} describes environment {env.name!r}, not {wanted!r}",
                          "pass the matching environment name or file")
    return env


class _Reader:
    """Reads typed values from nested TOML tables, collecting every error at once."""

    def __init__(self, data: Mapping[str, Any], path: Path) -> None:
        self.data = data
        self.path = path
        self.errors: list[str] = []

    def _lookup(self, key: str) -> tuple[bool, Any]:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return False, None
            node = node[part]
        return True, node

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        found, value = self._lookup(key)
        if not found:
            if default is ...:
                self.errors.append(f"{self.path}: {key}: required key is missing")
            return None if default is ... else default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            self.errors.append(f"{self.path}: {key}: expected {names}, got {value!r}")
            return None if default is ... else default
        return value

    def path_(self, key: str, default: Any = ..., base: Path | None = None) -> Path | None:
        value = self.get(key, str, default)
        if value is None:
            return None
        p = Path(os.path.expandvars(str(value))).expanduser()
        if not p.is_absolute() and base is not None:
            p = base / p
        return p

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> Any:
        value = self.get(key, str, default)
        if value is not None and value not in choices:
            self.errors.append(f"{self.path}: {key}: {value!r} is not one of {', '.join(choices)}")
            return None
        return value

    def port(self, key: str, default: Any = ...) -> int | None:
        value = self.get(key, int, default)
        if value is not None and not 1 <= value <= 65535:
            self.errors.append(f"{self.path}: {key}: port {value} is outside 1-65535")
            return None
        return None if value is None else int(value)

    def positive(self, key: str, default: Any = ...) -> float | None:
        value = self.get(key, float, default)
        if value is not None and value <= 0:
            self.errors.append(f"{self.path}: {key}: must be greater than 0, got {value}")
            return None
        return None if value is None else float(value)

    def command(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(key, list, list(default))
        if not value or not all(isinstance(v, str) and v for v in value):
            self.errors.append(f"{self.path}: {key}: expected a non-empty list of strings")
            return default
        return tuple(value)


KNOWN_TABLES = {"name", "label", "state", "lock", "logs", "slots", "caddy", "compose", "health",
                "database", "rollback", "deploy", "drill"}


def load_file(path: Path) -> Environment:
    """Parse and validate one environment file; every problem is reported in one error."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", "check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", "fix the syntax at that line") from None
    return from_mapping(data, path)


KNOWN_KEYS: dict[str, set[str]] = {
    "state": {"file"},
    "lock": {"dir", "stale_after_seconds"},
    "logs": {"dir", "runs_dir"},
    "slots.blue": {"container", "service", "port", "host"},
    "slots.green": {"container", "service", "port", "host"},
    "caddy": {"caddyfile", "reload", "admin_url", "proxy_url", "command", "systemd_unit",
              "verify_path", "container_path"},
    "compose": {"file", "project", "env_file", "image_repository", "command"},
    "health": {"path", "timeout_seconds", "interval_seconds", "max_interval_seconds",
               "request_timeout_seconds"},
    "database": {"env_file", "url_variable", "container", "snapshot_dir", "retention_days",
                 "access"},
    "rollback": {"stop_old_slot"},
    "deploy": {"migrate_command"},
    "drill": {"allows_faults"},
    "slots": {"blue", "green"},
}


def _unknown_keys(data: Mapping[str, Any], path: Path) -> list[str]:
    """Typos must not pass silently: a misspelt key would otherwise fall back to a default."""
    errors = []
    for key in data:
        if key not in KNOWN_TABLES:
            known = ", ".join(sorted(KNOWN_TABLES))
            errors.append(f"{path}: {key}: unknown key (known: {known})")
    for table, keys in KNOWN_KEYS.items():
        node: Any = data
        for part in table.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is None:
            continue
        if not isinstance(node, Mapping):
            errors.append(f"{path}: {table}: expected a table")
            continue
        errors += [f"{path}: {table}.{key}: unknown key (known: {', '.join(sorted(keys))})"
                   for key in node if key not in keys]
    return errors


def from_mapping(data: Mapping[str, Any], path: Path) -> Environment:
    r = _Reader(data, path)
    base = path.parent
    r.errors += _unknown_keys(data, path)
    name = r.choice("name", ENV_NAMES)
    slots: dict[Slot, SlotConfig] = {}
    for slot in Slot:
        port = r.port(f"slots.{slot}.port")
        container = r.get(f"slots.{slot}.container", str)
        service = r.get(f"slots.{slot}.service", str, None)
        if service is not None and not service.strip():
            r.errors.append(f"{path}: slots.{slot}.service: is empty (remove it on a host "
                            "without compose)")
        host = r.get(f"slots.{slot}.host", str, "127.0.0.1")
        if port is not None and container:
            slots[slot] = SlotConfig(slot, container, service, port, host)
    if len({s.port for s in slots.values()}) < len(slots):
        r.errors.append(f"{path}: slots: blue and green must use different ports")
    reload = r.choice("caddy.reload", tuple(m.value for m in ReloadMethod), "admin-api")
    caddy = CaddyConfig(
        caddyfile=r.path_("caddy.caddyfile", "/etc/caddy/Caddyfile", base) or Path(),
        reload=ReloadMethod(reload or "admin-api"),
        admin_url=r.get("caddy.admin_url", str, "http://localhost:2019").rstrip("/"),
        proxy_url=r.get("caddy.proxy_url", str, "http://localhost").rstrip("/"),
        command=r.command("caddy.command", ("caddy",)),
        systemd_unit=r.get("caddy.systemd_unit", str, "caddy"),
        verify_path=r.get("caddy.verify_path", str, "/version"),
        container_path=r.get("caddy.container_path", str, None),
    )
    if caddy.container_path is not None and not caddy.container_path.startswith("/"):
        r.errors.append(f"{path}: caddy.container_path: {caddy.container_path!r} is not an "
                        "absolute path (the Caddyfile's path inside Caddy's container)")
    compose_env = r.path_("compose.env_file", None, base)
    compose = ComposeConfig(
        file=r.path_("compose.file", None, base)
        or (STANDARD_COMPOSE_FILE if STANDARD_COMPOSE_FILE.is_file() else None),
        project=r.get("compose.project", str, f"togather-{name}"),
        env_file=compose_env,
        image_repository=r.get("compose.image_repository", str, "togather-server"),
        command=r.command("compose.command", ("docker", "compose")),
    )
    health = HealthConfig(
        path=r.get("health.path", str, "/health"),
        timeout=r.positive("health.timeout_seconds", 60.0) or 60.0,
        interval=r.positive("health.interval_seconds", 0.25) or 0.25,
        max_interval=r.positive("health.max_interval_seconds", 2.0) or 2.0,
        request_timeout=r.positive("health.request_timeout_seconds", 3.0) or 3.0,
    )
    retention = r.get("database.retention_days", int, 7)
    database = DatabaseConfig(
        env_file=r.path_("database.env_file", None, base) or compose_env,
        url_variable=r.get("database.url_variable", str, "DATABASE_URL"),
        container=r.get("database.container", str, "togather-db"),
        snapshot_dir=r.path_("database.snapshot_dir", "/var/lib/togather/db-snapshots", base)
        or Path(),
        retention_days=retention if retention and retention > 0 else 7,
        access=r.choice("database.access", ("auto", "host", "container"), "auto") or "auto",
    )
    stale = r.positive("lock.stale_after_seconds", 1800.0)
    env = None
    state_file = r.path_("state.file",
                         "/opt/togather/src/deploy/config/deployment-state.json", base)
    lock_dir = r.path_("lock.dir", "/tmp", base)
    log_dir = r.path_("logs.dir", "~/.togather/logs/deployments", base)
    runs_dir = r.path_("logs.runs_dir", "~/.togather/runs", base)
    stop_old = r.get("rollback.stop_old_slot", bool, True)
    allows_faults = r.get("drill.allows_faults", bool, False)
    label = r.get("label", str, "")
    has_migrate = r._lookup("deploy.migrate_command")[0]
    migrate = r.command("deploy.migrate_command", ("-",)) if has_migrate else ()
    if r.errors:
        raise ConfigError(f"{len(r.errors)} problem(s) in {path}:\n  " + "\n  ".join(r.errors),
                          "fix them and run again")
    env = Environment(
        name=name, state_file=state_file, lock_dir=lock_dir, log_dir=log_dir,  # type: ignore[arg-type]
        runs_dir=runs_dir, slots=slots, caddy=caddy, compose=compose,  # type: ignore[arg-type]
        health=health, database=database, lock_stale_after=stale or 1800.0,
        stop_old_slot=bool(stop_old), source=path, label=label or name,
        allows_faults=bool(allows_faults),
        migrate_command=tuple(migrate),
    )
    return env


def to_toml(env: Environment) -> str:
    """Write an environment back as TOML (what a drill hands to `--env <file>`)."""
    def q(value: object) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, tuple | list):
            return "[" + ", ".join(q(v) for v in value) + "]"
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'

    lines = [f"name = {q(env.name)}", f"label = {q(env.display)}", "",
             "[state]", f"file = {q(env.state_file)}", "",
             "[lock]", f"dir = {q(env.lock_dir)}",
             f"stale_after_seconds = {q(env.lock_stale_after)}", "",
             "[logs]", f"dir = {q(env.log_dir)}", f"runs_dir = {q(env.runs_dir)}", ""]
    for slot in Slot:
        s = env.slot(slot)
        lines += [f"[slots.{slot}]", f"container = {q(s.container)}",
                  *([f"service = {q(s.service)}"] if s.service else []),
                  f"port = {s.port}", f"host = {q(s.host)}", ""]
    c = env.caddy
    lines += ["[caddy]", f"caddyfile = {q(c.caddyfile)}", f"reload = {q(c.reload.value)}",
              f"admin_url = {q(c.admin_url)}", f"proxy_url = {q(c.proxy_url)}",
              f"command = {q(c.command)}", f"systemd_unit = {q(c.systemd_unit)}",
              f"verify_path = {q(c.verify_path)}",
              *([f"container_path = {q(c.container_path)}"] if c.container_path else []), ""]
    m = env.compose
    lines += ["[compose]", *([f"file = {q(m.file)}"] if m.file else []),
              f"project = {q(m.project)}",
              *([f"env_file = {q(m.env_file)}"] if m.env_file else []),
              f"image_repository = {q(m.image_repository)}", f"command = {q(m.command)}", ""]
    h = env.health
    lines += ["[health]", f"path = {q(h.path)}", f"timeout_seconds = {q(h.timeout)}",
              f"interval_seconds = {q(h.interval)}", f"max_interval_seconds = {q(h.max_interval)}",
              f"request_timeout_seconds = {q(h.request_timeout)}", ""]
    d = env.database
    lines += ["[database]", *([f"env_file = {q(d.env_file)}"] if d.env_file else []),
              f"url_variable = {q(d.url_variable)}", f"container = {q(d.container)}",
              f"snapshot_dir = {q(d.snapshot_dir)}", f"retention_days = {d.retention_days}",
              f"access = {q(d.access)}", "",
              "[rollback]", f"stop_old_slot = {q(env.stop_old_slot)}", ""]
    if env.migrate_command:
        lines += ["[deploy]", f"migrate_command = {q(env.migrate_command)}", ""]
    if env.allows_faults:
        lines += ["[drill]", "allows_faults = true", ""]
    return "\n".join(lines)
