"""The environment as the runbook uses it: frozen values, the same type for a real host and a
drill stack (which builds them directly). The file format that fills them is schema.py."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from runbook.environment import envfile
from runbook.environment.envfile import EnvEntry
from runbook.errors import ConfigError

ENV_NAMES = ("development", "staging", "production")
# what users also say (CONTRACTS.md: `prod` is `production`), in a command or a file's `name`
ALIASES = {"prod": "production", "stage": "staging", "dev": "development"}
# The contract's compose file: the default only on a host where it exists (issue 10: hosts that
# start their slots with `docker run` have none, and a default to a missing file misleads).
STANDARD_COMPOSE_FILE = Path("/opt/togather/src/deploy/docker/docker-compose.blue-green.yml")
# sudo's options that take the next word as their value (`sudo -u root docker ...`): read by
# schema.py's check of a docker command and by runbook/caddy_command.py. Here, not in schema.py:
# importing that for a constant loaded pydantic with every command's modules, outside
# environment._load_schema (which turns pydantic's plugin discovery off)
SUDO_VALUED = frozenset({"-u", "--user", "-g", "--group", "-C", "--close-from", "-D", "--chdir",
                         "-p", "--prompt", "-r", "--role", "-t", "--type", "-U", "--other-user",
                         "-T", "--command-timeout", "-h", "--host"})


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
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") \
            else self.host  # an IPv6 address (`::1`) in a URL
        return f"http://{host}:{self.port}"


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
    # The app's site name when the Caddyfile serves it by name (togather.example.org {...}):
    # verification connects to proxy_url (this host's Caddy) and asks for that site (the
    # Host header, and the TLS server name for https), never through DNS to whatever answers
    # for the name (a load balancer, another host already rolled back). None: proxy_url's.
    site: str | None = None
    # A PEM bundle trusted besides the system store when proxy_url is https: a site on Caddy's
    # local CA (`tls internal`) verifies against no system store, so no switch could be
    # verified there. Checked readable (and loadable) when the environment is loaded.
    ca_file: Path | None = None


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
    # where `timeout` came from when the host's env file set it (HEALTH_WAIT_TIMEOUT), for
    # the plan to say; "" when [health] timeout_seconds (or the default) decided
    timeout_source: str = field(default="", compare=False)

    @property
    def timeout_text(self) -> str:
        """The gate's timeout as a plan shows it: `180s (HEALTH_WAIT_TIMEOUT in <file>)`."""
        return f"{self.timeout:g}s" + (f" ({self.timeout_source})" if self.timeout_source
                                        else "")


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
    # Whether Compose reads env_file (so `${VAR}` is expanded, as the app gets it); False on a
    # host without compose, where `docker run --env-file` passes `pa$word` as written. The
    # Environment sets it from its [compose] file (Environment.__post_init__).
    compose_reads: bool = True

    def url(self) -> str:
        """The database URL from the process environment or the env file. Never log it.

        The env file is what the app reads: a different URL exported in on-call's shell (a
        staging database, say) is refused rather than used, or the schema guard, snapshots
        and restores would act on a database the app does not use. An env file this process
        cannot read leaves the exported URL as the operator's own choice."""
        if value := os.environ.get(self.url_variable):
            if self.env_file is not None:
                try:
                    entry = read_env_entries(self.env_file, interpolate=self.compose_reads
                                             ).get(self.url_variable)
                except ConfigError:
                    entry = None
                # one the runbook cannot expand cannot be compared: the exported one is the
                # operator's choice, as with an env file it cannot read
                recorded = entry.value if entry is not None and entry.resolved else None
                if recorded is not None and _database_of(recorded) != _database_of(value):
                    raise ConfigError(
                        f"{self.url_variable} in this process's environment differs from the "
                        f"one in {self.env_file}, which the app reads",
                        f"unset {self.url_variable} (the env file's is used), make the two "
                        "name the same database, or set [database] url_variable to another "
                        "variable")
            return value
        if self.env_file is None:
            raise ConfigError(f"{self.url_variable} is not set and no env file is configured",
                              f"export {self.url_variable} or set [database] env_file")
        entries = read_env_entries(self.env_file, interpolate=self.compose_reads)
        entry = entries.get(self.url_variable)
        if entry is None:
            raise ConfigError(f"{self.url_variable} is missing from {self.env_file}",
                              f"add {self.url_variable}=postgresql://... to that file")
        if not entry.resolved:  # Compose would give the app a blank there, or refuse: never
            # probed as if the database were down (that sent on-call to --force)
            raise unresolved_error(self.env_file, self.url_variable, entry, entries)
        return entry.value


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
    # how long the old slot's stop waits for Caddy's previous config to finish with it
    # (runbook/drain.py): as long as `docker stop` itself waits for a graceful exit
    drain_timeout: float = 10.0
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

    def __post_init__(self) -> None:
        # Compose reads the env file only where this host has compose (a [compose] file, the
        # contract's only where it exists): elsewhere `docker run --env-file` reads it
        # literally. Set here, from the environment, so every copy (with_) agrees.
        if self.database.compose_reads != (self.compose.file is not None):
            object.__setattr__(self, "database", replace(
                self.database, compose_reads=self.compose.file is not None))

    def with_(self, **changes: Any) -> Environment:
        return replace(self, **changes)


def _database_of(url: str) -> tuple[str, ...] | str:
    """Which database a URL names (user, password, database, host, port: the same database
    written another way, `postgres://` or an encoded `%2f`, a default port or an added
    `?sslmode=`, is the same); the text itself when libpq cannot read it (its own check
    names the problem later)."""
    if url.strip() == "":
        return url
    try:
        from psycopg import conninfo

        d = conninfo.conninfo_to_dict(url.strip())
    except Exception:  # any parse failure: compared as text, never a traceback here
        return url.strip()
    return (str(d.get("user") or ""), str(d.get("password") or ""),
            str(d.get("dbname") or ""), str(d.get("host") or ""), str(d.get("port") or "5432"))


class EnvFileNotText(ConfigError):
    """An env file this process can read whose bytes are not UTF-8: its content is wrong,
    not its access, and the env-file checks at load refuse it rather than pass it over."""


def read_env_entries(path: Path, *, errors: str = "strict",
                     interpolate: bool = True) -> dict[str, EnvEntry]:
    """Parse a docker-compose style env file (KEY=VALUE, # comments, quotes, `export`) as
    Compose's dotenv reads it: each key as written and as Compose expands it (envfile.py).
    `interpolate=False`: as `docker run --env-file` reads it, every value as written.
    `errors="replace"`: bytes that are not UTF-8 read as U+FFFD, not refused (Compose reads
    such a file; the load's agreement checks judge what the rest of it says)."""
    import stat

    try:
        if path.exists() and not stat.S_ISREG(path.stat().st_mode):  # a FIFO hung the run
            raise ConfigError(f"env file {path} is not a regular file",
                              "point the env_file setting at the file itself")
        text = path.read_text(encoding="utf-8-sig", errors=errors)  # a BOM is not a key
    except OSError as exc:
        raise ConfigError(f"cannot read env file {path}: {exc.strerror}",
                          "check the path and its permissions (mode 0600, owned by you)") from None
    except UnicodeDecodeError as exc:  # never its bytes: the file holds secrets
        raise EnvFileNotText(f"env file {path} is not UTF-8 text (byte {exc.start})",
                             "save it as UTF-8") from None
    return envfile.parse(text, os.environ, interpolate=interpolate)


def read_env_file(path: Path, *, errors: str = "strict",
                  interpolate: bool = True) -> dict[str, str]:
    """An env file's values as Compose reads them (`${VAR}` expanded; one it cannot resolve
    empty, as Compose makes it: DatabaseConfig.url() refuses that one instead), or with
    `interpolate=False` as `docker run --env-file` reads them (as written)."""
    return {key: entry.value for key, entry
            in read_env_entries(path, errors=errors, interpolate=interpolate).items()}


# `$$` is no reference; `${NAME...}` (group 1) is a variable written as one, a bare `$NAME`
# (group 2) as often a password's own `$`
_REFERENCE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))")


def credential_variables(key: str, entries: Mapping[str, EnvEntry]) -> dict[str, str]:
    """The bare `$name`s in a URL's password (after the first `:` past `://`, up to the last
    `@`) as written, directly or through the file's keys it uses as `${DB_PW}`
    (DB_PW=pa$word), each with the key whose value holds it. Compose reads such a `$` as a
    variable, which makes the rest of the password that variable's name: never to be
    printed. A braced `${NAME}` is a variable meant (`${APP_DB_USER}` in the user,
    `${POSTGRES_PASSWORD}`): followed into the file, never returned (found by review: taken
    for a password's `$`, the refusal told to write `$$` and the name was masked)."""
    found: dict[str, str] = {}
    seen = {key}
    todo = [key]
    while todo:
        holder = todo.pop()
        entry = entries.get(holder)
        if entry is None:
            continue
        text = entry.written
        if holder == key:  # the URL itself: its password only
            rest = text.partition("://")[2]
            userinfo = rest[:rest.rfind("@")] if "@" in rest else ""
            text = userinfo.partition(":")[2]
        for match in _REFERENCE.finditer(text):
            braced, bare = match.group(1), match.group(2)
            if braced and braced not in seen:
                seen.add(braced)
                todo.append(braced)
            elif bare and bare not in found:
                found[bare] = holder
                if bare not in seen:  # a key of the file used bare ($DB_PW): its value too
                    seen.add(bare)
                    todo.append(bare)
    return found


def unresolved_error(path: Path, key: str, entry: EnvEntry,
                     entries: Mapping[str, EnvEntry] | None = None) -> ConfigError:
    """The one-line refusal of a value the runbook must use that Compose's reading leaves
    unresolved: the file, the key and the variable, never the value (it holds secrets). Only
    reached where Compose reads the file (DatabaseConfig.compose_reads): its words say so.
    A bare `$name` in the URL's password (`entries`: the file's keys) is not named: most
    often it is the password's own `$`, and its name the rest of the password (found by
    review: `Xy$Tr0ub4dor...` printed "uses ${Tr0ub4dor...}" on every command)."""
    name, form = entry.unresolved
    holder = credential_variables(key, entries or {key: entry}).get(name) if name else None
    if holder is not None:
        does = "would make it empty" if form == "" else "refuses it"
        return ConfigError(f"the user:password in {key} in {path} holds a $ that Compose reads "
                           f"as a variable, set nowhere here (Compose {does})",
                           f"write $$ for each literal $ of the password in {holder} in {path}"
                           f" (a variable meant there: write it above {key}, or export it)")
    if form == "invalid":
        return ConfigError(f"{key} in {path} holds a ${{...}} that Compose cannot read (a name "
                           "that is not a variable name, or an unknown form)",
                           f"write it as ${{NAME}}, ${{NAME:-default}} or $NAME in {key} in "
                           f"{path}, or $$ for a literal $")
    nowhere = "set neither earlier in that file nor in this process's environment"
    said = {"": f"uses ${{{name}}}, which is {nowhere} (Compose would make it empty)",
            ":?": f"requires ${{{name}:?...}}, which is empty or unset here (Compose refuses it)",
            "?": f"requires ${{{name}?...}}, which is {nowhere} (Compose refuses it)"}[form]
    return ConfigError(f"{key} in {path} {said}",
                       f"write {name}=... above {key} in {path} (or the value itself in "
                       f"{key}, with $$ for a literal $), or export {name}")
