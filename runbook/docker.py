"""The Docker adapter: what a slot's container really runs, and starting/stopping it.

The running truth of a slot is `docker inspect <container>` -> `.Config.Image`, not the state
file. The SDK is imported lazily so `runbook --help` stays fast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from runbook.errors import ExitCode, RunbookError

if TYPE_CHECKING:
    import docker as docker_sdk


class DockerError(RunbookError):
    exit_code = ExitCode.FAILED_SAFELY


@dataclass(frozen=True)
class ContainerInfo:
    name: str
    exists: bool
    status: str = "absent"  # created | running | paused | restarting | exited | dead | absent
    image: str | None = None  # .Config.Image, e.g. togather-server:abc1234
    exit_code: int | None = None
    started_at: str | None = None
    labels: dict[str, str] | None = None

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def tag(self) -> str | None:
        if self.image and ":" in self.image.rsplit("/", 1)[-1]:
            return self.image.rsplit(":", 1)[1]
        return None


@cache
def client() -> docker_sdk.DockerClient:
    import docker as docker_sdk

    try:
        return docker_sdk.from_env(timeout=30)
    except docker_sdk.errors.DockerException as exc:
        raise DockerError("cannot reach the Docker engine",
                          "start it (systemctl start docker) and check `docker info`",
                          exit_code=ExitCode.PRECONDITION) from exc


def _not_found() -> type[Exception]:
    import docker.errors

    found: type[Exception] = docker.errors.NotFound
    return found


def _one_line(text: object) -> str:
    from runbook.journal import redact

    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return redact(lines[0] if lines else "no detail")


@contextlib.contextmanager
def api(what: str) -> Iterator[None]:
    """Turn whatever the SDK raises while doing `what` into one line with an exit code.

    A 4xx answer means the request itself was wrong (an invalid image reference read from the
    state file, an invalid name): nothing was changed, a precondition is not met (4). An engine
    that does not answer is a precondition too. Anything else failed safely (1); a run that
    had already changed something decides its own exit code from there.
    """
    import docker.errors
    import requests

    try:
        yield
    except docker.errors.NotFound:
        raise  # each caller knows what "absent" means for it
    except docker.errors.APIError as exc:
        detail = _one_line(exc.explanation or exc)
        if exc.is_client_error():
            raise DockerError(f"docker refused to {what}: {detail}",
                              "check the name or image reference (state file, environment "
                              "file) and `docker ps -a` / `docker images`",
                              exit_code=ExitCode.PRECONDITION) from None
        raise DockerError(f"docker failed to {what}: {detail}",
                          "read `docker info` and the container's `docker logs`") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise DockerError(f"the Docker engine did not answer while trying to {what} "
                          f"({type(exc).__name__})",
                          "start it (systemctl start docker) and check `docker info`",
                          exit_code=ExitCode.PRECONDITION) from None
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise DockerError(f"docker failed to {what}: {_one_line(exc)}",
                          "check the name or image reference and `docker info`",
                          exit_code=ExitCode.PRECONDITION) from None


def inspect(name: str) -> ContainerInfo:
    try:
        with api(f"inspect container {name!r}"):
            container = client().containers.get(name)
    except _not_found():
        return ContainerInfo(name=name, exists=False)
    attrs: dict[str, Any] = container.attrs
    state = attrs.get("State", {})
    return ContainerInfo(
        name=name, exists=True, status=state.get("Status", "unknown"),
        image=attrs.get("Config", {}).get("Image"), exit_code=state.get("ExitCode"),
        started_at=state.get("StartedAt"), labels=attrs.get("Config", {}).get("Labels") or {},
    )


def image_exists(image: str) -> bool:
    try:
        with api(f"look up image {image!r}"):
            client().images.get(image)
    except _not_found():
        return False
    return True


def start(name: str) -> None:
    try:
        with api(f"start container {name!r}"):
            client().containers.get(name).start()
    except _not_found():
        raise DockerError(f"container {name} does not exist", "recreate it") from None


def stop(name: str, timeout: int = 10) -> None:
    try:
        with api(f"stop container {name!r}"):
            client().containers.get(name).stop(timeout=timeout)
    except _not_found():
        return


def remove(name: str) -> None:
    try:
        with api(f"remove container {name!r}"):
            client().containers.get(name).remove(force=True)
    except _not_found():
        return


def exec_run(name: str, command: list[str]) -> tuple[int, str]:
    """Run a command in a running container; returns (exit code, combined output)."""
    try:
        with api(f"run a command in container {name!r}"):
            result = client().containers.get(name).exec_run(command)
    except _not_found():
        raise DockerError(f"container {name} does not exist", "start it first") from None
    return result.exit_code, result.output.decode(errors="replace")


def logs(name: str, tail: int = 100) -> str:
    try:
        with api(f"read the logs of container {name!r}"):
            raw: bytes = client().containers.get(name).logs(tail=tail)
            return raw.decode(errors="replace")
    except _not_found():
        return ""
