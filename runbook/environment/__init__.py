"""Where everything of one environment lives: the same type for a real host and a drill stack.

An environment is read from a TOML file (runbook/environments/<name>.toml, `--config PATH` or
RUNBOOK_CONFIG). A drill stack builds the same object; the only thing a drill adds is
`allows_faults`, the permission to break things on purpose.

model.py holds the values (Slot, Environment, ...); schema.py the file format, one pydantic
model (imported when a file is read or written). Every name stays importable from here.
"""

from __future__ import annotations

import os
import shlex
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runbook.environment.model import (
    ALIASES,
    ENV_NAMES,
    STANDARD_COMPOSE_FILE,
    CaddyConfig,
    ComposeConfig,
    DatabaseConfig,
    Environment,
    HealthConfig,
    ReloadMethod,
    Slot,
    SlotConfig,
    read_env_file,
)
from runbook.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "environments"  # package data
SYSTEM_DIR = Path("/etc/togather-runbook")

__all__ = [
    "ALIASES", "BUILTIN_DIR", "ENV_NAMES", "REPO_ROOT", "STANDARD_COMPOSE_FILE", "SYSTEM_DIR",
    "CaddyConfig", "ComposeConfig", "DatabaseConfig", "Environment", "HealthConfig",
    "ReloadMethod", "Slot", "SlotConfig", "canonical_name", "command_arg", "find_config",
    "from_mapping", "load", "load_file", "read_env_file", "to_toml",
]


def command_arg(env: Environment) -> str:
    """How a printed command (a fix, a resume command) names this environment, one shell
    word: its name when the bare name loads this very file, else the file's absolute path,
    quoted (a drill, `--config`, a file beside the default one): the bare name would load
    another configuration or none, and the printed fix would act on another environment."""
    if env.source is None:
        return env.name
    try:
        if find_config(env.name).resolve() == env.source.resolve():
            return env.name
    except (ConfigError, OSError):
        pass  # the name loads nothing (or a broken file): only the path names this one
    return shlex.quote(str(env.source.absolute()))


def canonical_name(name: str) -> str:
    """`prod` -> `production`; unknown names are returned unchanged (they may be files)."""
    return ALIASES.get(name, name)


def find_config(name_or_path: str) -> Path:
    """Resolve an environment name or a path to its TOML file."""
    if name_or_path.endswith(".toml") or os.sep in name_or_path or "\x00" in name_or_path:
        return config_path(name_or_path, f"environment file {name_or_path}",
                           "pass an existing TOML file or one of: " + ", ".join(ENV_NAMES))
    name = canonical_name(name_or_path)
    if name not in ENV_NAMES:
        from runbook.files import shortened

        raise ConfigError(f"unknown environment {shortened(name_or_path)!r}",
                          "use development, staging, production (alias prod) or a .toml path")
    for directory in (SYSTEM_DIR, BUILTIN_DIR):
        candidate = directory / f"{name}.toml"
        if candidate.is_file():
            return candidate
        if os.path.lexists(candidate):  # the host's own file, broken: never the defaults instead
            raise ConfigError(f"{candidate} is not a readable file (a directory, or a link to "
                              "nothing)", f"fix or remove {candidate}")
    raise ConfigError(f"no configuration for environment {name!r}",
                      f"write {SYSTEM_DIR / (name + '.toml')} (see README, 'Environment files')")


def config_path(value: str, shown: str, fix: str) -> Path:
    """`value` taken as a path (relative to the working directory), an existing file: else
    one ConfigError saying `shown` (how the user gave it) and `fix` when it does not exist."""
    if "\x00" in value:
        raise ConfigError(f"{shown.replace(value, repr(value))}: holds a NUL character",
                          "write the path without it")
    from runbook.files import name_too_long, shortened

    if (why := name_too_long(os.path.expanduser(value))) is not None:
        # every file call raised "File name too long": an unexpected failure (a bug, exit 1)
        # that echoed the whole name (found by review)
        problem, _, shorten = why.rpartition(": ")
        raise ConfigError(f"{shown.replace(value, shortened(value))}: {problem}",
                          f"{shorten}; {fix}")
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # `~nosuchuser/...`: a bare RuntimeError was exit 5
        raise ConfigError(f"{shown}: {value.split(os.sep, 1)[0]} is no user's home on this "
                          "machine", "write the path in full") from None
    if path.exists() and not path.is_file():
        raise ConfigError(f"{shown} is not a file", "pass the TOML file itself")
    if not path.is_file():
        raise ConfigError(f"{shown}: no such file", fix)
    return path


def load(name_or_path: str, *, config: str | None = None) -> Environment:
    """Load an environment: `config` (or RUNBOOK_CONFIG) wins over the name's default file."""
    for what, value in (("--config (or RUNBOOK_CONFIG)", config), ("ENV", name_or_path)):
        if value is not None and not value.strip():  # `--config "$CFG"` with CFG unset: never
            raise ConfigError(f"{what} is empty; nothing was changed",  # the default file
                              f"give {what.split()[0]} a value (an unset shell variable?)")
    chosen = config or os.environ.get("RUNBOOK_CONFIG")
    from_env = bool(chosen) and chosen == os.environ.get("RUNBOOK_CONFIG")  # the CLI passes it
    try:
        # --config and RUNBOOK_CONFIG always name a file, never an environment: `--config
        # host.conf` was "unknown environment 'host.conf'", `--config staging` read the
        # packaged staging file (found by review)
        path = (config_path(chosen, f"environment file {chosen}" if from_env else
                            f"--config {chosen}", "pass the path of an existing environment "
                            "file (the environment's name goes in ENV)")
                if chosen else find_config(name_or_path))
    except ConfigError as exc:  # a stale RUNBOOK_CONFIG: say where the path came from
        if from_env:
            exc.message = f"{exc.message} (from RUNBOOK_CONFIG)"
            exc.fix = f"{exc.fix}; or unset RUNBOOK_CONFIG"
            exc.args = (exc.message,)
        raise
    env = load_file(path)
    wanted = canonical_name(name_or_path)
    if chosen and wanted in ENV_NAMES and env.name != wanted:
        raise ConfigError(f"{path} describes environment {env.name!r}, not {wanted!r}",
                          "pass the matching environment name or file")
    if chosen and wanted not in ENV_NAMES and name_or_path != chosen:  # healthcheck's own
        # ENV is a file, or a typo: never let --config quietly stand in for what was typed
        # ("prodution" must not become whatever environment the config file describes)
        named = find_config(name_or_path)
        if named.resolve() != path.resolve():
            raise ConfigError(f"the environment argument {name_or_path!r} is {named}, but "
                              f"--config/RUNBOOK_CONFIG is {path}: they disagree",
                              "pass one of them, or the environment's name with --config")
    return env


def load_file(path: Path) -> Environment:
    """Parse and validate one environment file; every problem is reported in one error."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is no statement
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", "check the path") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})",
                          "save the file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", "fix the syntax at that line") from None
    except RecursionError:  # tomllib recurses per nested array or table (found by review)
        raise ConfigError(f"{path}: not valid TOML: values nested too deeply",
                          "flatten the nested arrays or inline tables") from None
    except ValueError as exc:  # an integer past Python's digit limit (found by review)
        raise ConfigError(f"{path}: not valid TOML: {str(exc).split(';')[0]}",
                          "fix that value") from None
    return from_mapping(data, path)


def from_mapping(data: Mapping[str, Any], path: Path) -> Environment:
    """A parsed TOML document as an Environment (relative paths: from the file's folder)."""
    _load_schema()
    from runbook.environment import schema

    return schema.parse(data, path)


def to_toml(env: Environment) -> str:
    """Write an environment back as TOML (what a drill hands to `--env <file>`)."""
    _load_schema()
    from runbook.environment import schema

    return schema.dump(env)


def _load_schema() -> None:
    """Import schema.py (the first time) with pydantic's plugin discovery off: building its
    models would otherwise read the entry points of every installed distribution (a pydantic
    plugin has nothing to add to validating our own file format), on every command's
    start-up. The variable is restored at once; typer builds its adapters the same way."""
    if "runbook.environment.schema" in sys.modules:
        return
    previous = os.environ.get("PYDANTIC_DISABLE_PLUGINS")
    os.environ["PYDANTIC_DISABLE_PLUGINS"] = "1"
    try:
        from runbook.environment import schema  # noqa: F401
    finally:
        if previous is None:
            del os.environ["PYDANTIC_DISABLE_PLUGINS"]
        else:
            os.environ["PYDANTIC_DISABLE_PLUGINS"] = previous


def __getattr__(name: str) -> Any:
    """KNOWN_TABLES / KNOWN_KEYS, the old hand-written lists, now read off the model."""
    if name in ("KNOWN_TABLES", "KNOWN_KEYS"):
        _load_schema()
        from runbook.environment import schema

        keys = schema.known_keys()
        return keys[""] if name == "KNOWN_TABLES" else {k: v for k, v in keys.items() if k}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
