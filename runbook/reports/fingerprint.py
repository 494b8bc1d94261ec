"""The environment fingerprint: what ran a drill, asked of the live tools.

The one part of reports that runs commands (git, caddy, docker) and queries Postgres: the
caller (the pytest plugin, while the environment is up) calls it and stores the result in the
report's data; models and renderers never import it.
"""

from __future__ import annotations

import platform
import shlex
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runbook.times import format_ms_utc as now_iso

if TYPE_CHECKING:
    from runbook.environment import Environment

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def _short(text: str, limit: int = 200) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:limit]


def _command(argv: list[str], timeout: float = 20) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({shlex.join(argv[:3])}: {type(exc).__name__})"
    if proc.returncode != 0:
        return f"unknown ({shlex.join(argv)} exited {proc.returncode}: {_short(proc.stderr)})"
    return _short(proc.stdout or proc.stderr)


def tool_fingerprint() -> dict[str, Any]:
    """What ran the drill: this tool's version and commit, python, the machine."""
    from importlib import metadata

    try:
        version = metadata.version("togather-runbook")
    except metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    commit = "unknown"
    if (REPO_ROOT / ".git").exists():
        commit = _command(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"], 5)
    return {"tool": f"togather-runbook {version}", "tool_commit": commit,
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "platform": platform.platform(terse=True), "timestamp": now_iso()}


def caddy_version(env: Environment) -> str:
    """`caddy version` the way this environment runs caddy (a drill: docker exec)."""
    return _command([*env.caddy.command, "version"])


def postgres_version(env: Environment) -> str:
    """SELECT version() on the shared database; else `postgres --version` in its container."""
    try:
        from runbook import database

        with database.connect(env) as conn:
            row = conn.execute("SELECT version()").fetchone()
        if row:
            return str(row[0])
    except Exception:  # the fallback below says what it can
        pass
    try:
        from runbook import docker

        code, out = docker.exec_run(env.database.container, ["postgres", "--version"])
        if code == 0:
            return _short(out)
        return f"unknown (postgres --version exited {code})"
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def slot_images(env: Environment) -> dict[str, str | None]:
    """The image each slot's container runs right now."""
    from runbook import docker

    out: dict[str, str | None] = {}
    for slot, config in env.slots.items():
        try:
            out[str(slot)] = docker.inspect(config.container).image
        except Exception:
            out[str(slot)] = None
    return out


def image_ids(images: Iterable[str]) -> dict[str, str]:
    """Image name -> content id, so two reports can tell whether the same build ran."""
    out: dict[str, str] = {}
    try:
        from runbook import docker

        client = docker.client()
    except Exception:
        return out
    for name in sorted(set(images)):
        try:
            out[name] = str(client.images.get(name).id)[:19]
        except Exception:
            out[name] = "absent"
    return out


def docker_engine() -> str:
    try:
        from runbook import docker

        return str(docker.client().version().get("Version", "unknown"))
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def environment_fingerprint(env: Environment) -> dict[str, Any]:
    """Caddy and Postgres versions and the slots' images of a live environment."""
    return {"environment": env.display, "caddy": caddy_version(env),
            "postgres": postgres_version(env), "slot_images": slot_images(env),
            "docker_engine": docker_engine()}
