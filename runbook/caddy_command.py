"""Reading Caddy's `[caddy] command`: whether it runs Caddy through docker, and in which
container. Its own module: pre-flight, the switch and the traffic checks all ask, and
runbook.traffic importing runbook.preflight (which imports traffic) was a cycle."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from runbook.environment.model import SUDO_VALUED

if TYPE_CHECKING:
    from runbook.environment import Environment


# `docker exec` options that take a value (the container's name is the first other word)
_EXEC_VALUED = {"-e", "--env", "--env-file", "-u", "--user", "-w", "--workdir",
                "--detach-keys"}
# the docker CLI's global options that take a value (before its command)
_GLOBAL_VALUED = {"-c", "--context", "-H", "--host", "--config", "-l", "--log-level",
                  "--tlscacert", "--tlscert", "--tlskey"}

# `docker compose` options that take a value (before its `exec`), and `compose exec`'s own
_COMPOSE_VALUED = {"-f", "--file", "-p", "--project-name", "--project-directory", "--env-file",
                   "--profile", "--ansi", "--progress", "--parallel", "--log-level"}
_COMPOSE_EXEC_VALUED = _EXEC_VALUED | {"--index"}


# Compose's own binaries (Compose v1, podman-compose): read as `docker compose`, `podman
# compose`, whose options they take
_COMPOSE_BINARIES = {"docker-compose": "docker", "podman-compose": "podman"}


# sudo's options that start the command in another folder than sudo's own (a login shell's
# is the user's home)
_SUDO_MOVES = {"-i", "--login", "-D", "--chdir"}


def _past_sudo(command: tuple[str, ...]) -> tuple[list[str], set[str]]:
    """(the words past a leading `sudo ...`, the options sudo was given)."""
    words, options = list(command), set()
    if words and Path(words[0]).name == "sudo":
        words.pop(0)
        while words and words[0].startswith("-"):
            option = words.pop(0)
            options.add(option.split("=", 1)[0])
            if option in SUDO_VALUED and words:
                words.pop(0)
    return words, options


def _engine(command: tuple[str, ...]) -> tuple[str, str, list[str]] | None:
    """(docker or podman, the binary's name, the words after it and its global options),
    past a leading `sudo ...`; a Compose binary's words start with `compose`. None:
    `command` runs neither."""
    words = _past_sudo(command)[0]
    binary = Path(words[0]).name if words else ""
    if binary in _COMPOSE_BINARIES:
        return _COMPOSE_BINARIES[binary], binary, ["compose", *words[1:]]
    if binary not in ("docker", "podman"):
        return None
    words.pop(0)
    while words and words[0].startswith("-"):
        if words.pop(0) in _GLOBAL_VALUED and words:
            words.pop(0)
    return binary, binary, words


def docker_words(command: tuple[str, ...]) -> list[str] | None:
    """The words after the docker (or podman) binary and its global options, past a leading
    `sudo ...` (`docker-compose ...`, `podman-compose ...`: `compose ...`); None when
    `command` does not run docker or podman."""
    engine = _engine(command)
    return None if engine is None else engine[2]


def runs_podman(command: tuple[str, ...]) -> bool:
    """Whether the command runs Caddy through podman (`podman exec`, `podman compose exec`,
    `podman-compose exec`): its containers are podman's own, per user when rootless, and
    `podman` never reads DOCKER_HOST, so no container the runbook reads through Docker's
    engine can be proven to be the one it runs Caddy in."""
    engine = _engine(command)
    return engine is not None and engine[0] == "podman"


def _exec_container(command: tuple[str, ...]) -> str | None:
    """The container a `docker|podman [container] exec ... NAME caddy` command names."""
    words = docker_words(command)
    if words and words[0] == "container":
        words.pop(0)
    if not words or words[0] != "exec":
        return None
    rest = iter(words[1:])
    for word in rest:
        if word in _EXEC_VALUED:
            next(rest, None)
        elif not word.startswith("-"):
            return word
    return None


def _service_at(words: list[str]) -> int | None:
    """Where the container (`exec ... NAME`) or Compose service (`compose ... exec ...
    SERVICE`) is named in `docker_words`; None when they run no exec of either."""
    at, valued = 1, _EXEC_VALUED
    if words[:1] == ["container"]:
        at = 2
    elif words[:1] == ["compose"]:  # Compose's own options, then its command
        valued = _COMPOSE_EXEC_VALUED
        while at < len(words) and words[at].startswith("-"):
            at += 2 if words[at] in _COMPOSE_VALUED else 1
        at += 1
    if len(words) < at or words[at - 1] != "exec":
        return None
    while at < len(words) and words[at].startswith("-"):
        at += 2 if words[at] in valued else 1
    return at if at < len(words) else None


def exec_reading_stdin(command: tuple[str, ...], workdir: str) -> tuple[str, ...] | None:
    """A `docker|podman [container] exec ... NAME caddy` command made to pass its standard
    input on to Caddy (`-i`), or a `docker compose exec ... SERVICE caddy` one (also
    `docker-compose`, `podman compose`, `podman-compose`), whose stdin is passed on already,
    made to give Caddy no TTY (`-T`, which would mangle it); both start Caddy in `workdir`
    (`-w`, given last: it wins over one the command names), so it reads a config from its
    stdin and resolves its relative imports from there, in its container (starting the
    command in a folder moves only the docker client; found by review). None for any
    other command."""
    words = docker_words(command)
    if not words or (at := _service_at(words)) is None:
        return None
    stdin = "-T" if words[0] == "compose" else "-i"
    at += len(command) - len(words)  # exec's words are the command's last ones
    return (*command[:at], stdin, "-w", workdir, *command[at:])


def runs_caddy_here(command: tuple[str, ...]) -> bool:
    """Whether the command is Caddy's own binary on this host (past a `sudo ...` that keeps
    the folder it is started in): the one command that starting in a folder starts Caddy in
    it. A docker or Compose exec starts the client there, not Caddy in its container; a
    script may run Caddy anywhere, one named `caddy` too (a shim running `docker exec`)."""
    words, options = _past_sudo(command)
    if not words or Path(words[0]).name != "caddy" or options & _SUDO_MOVES:
        return False
    found = shutil.which(words[0])
    if found is None:
        return False
    try:
        with open(found, "rb") as program:
            return program.read(2) != b"#!"
    except OSError:
        return False


def exec_container(command: tuple[str, ...]) -> str | None:
    """The container a `docker [container] exec ... NAME caddy` command runs Caddy in (also
    under sudo, with global options), as the runbook inspects it through Docker's engine;
    None otherwise (not docker, a podman one: `runs_podman`, or `docker compose exec`,
    which names a service)."""
    return None if runs_podman(command) else _exec_container(command)


def compose_exec_service(command: tuple[str, ...]) -> tuple[str | None, str] | None:
    """(project or None, service) of a `docker compose [-p NAME] exec ... SERVICE caddy`
    (or `docker-compose ...`, Compose v1) command; None otherwise (a podman one too: see
    `runs_podman`). The service's container is found by Compose's labels."""
    words = docker_words(command)
    if not words or words[0] != "compose" or runs_podman(command):
        return None
    rest = iter(words[1:])
    project: str | None = None
    for word in rest:
        if word == "exec":
            break
        if word in ("-p", "--project-name"):
            project = next(rest, None)
        elif word.startswith("--project-name="):
            project = word.split("=", 1)[1]
        elif word in _COMPOSE_VALUED:
            next(rest, None)
        elif not word.startswith("-"):
            return None  # another compose command
    else:
        return None
    for word in rest:
        if word in _COMPOSE_EXEC_VALUED:
            next(rest, None)
        elif not word.startswith("-"):
            return project, word
    return None


def execs_in_caddys_container(command: tuple[str, ...]) -> bool:
    """Whether the command runs inside Caddy's own running container (`docker exec NAME`,
    `docker compose exec SERVICE`, `docker-compose exec SERVICE`, podman's as docker's): an
    address there, 127.0.0.1 above all, is the container's, not this host's."""
    if _exec_container(command) is not None:
        return True
    words = docker_words(command) or []
    return words[:1] == ["compose"] and "exec" in words[1:]


def runs_in_container(env: Environment) -> bool:
    """Whether Caddy's command goes through `docker ...` (its container's mounts matter)."""
    return docker_words(env.caddy.command) is not None


def log_command(env: Environment) -> str:
    """Where Caddy's own log is read, as the environment runs it: its container's
    (`docker logs`), else the systemd unit's journal (a Caddy started otherwise logs where
    it was started)."""
    engine = _engine(env.caddy.command)
    container = _exec_container(env.caddy.command)
    if engine is not None and container is not None:
        return f"`{engine[0]} logs --tail 100 {container}`"
    if engine is not None:  # `docker compose exec SERVICE caddy`: a service, not a name
        tool = engine[1] if engine[1] in _COMPOSE_BINARIES else f"{engine[0]} compose"
        return f"`{tool} logs --tail 100` of Caddy's service"
    return f"`journalctl -u {env.caddy.systemd_unit} -n 100`"
