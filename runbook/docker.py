"""The Docker adapter: what a slot's container really runs, and starting/stopping it.

The running truth of a slot is `docker inspect <container>` -> `.Config.Image`, not the state
file. The SDK is imported lazily so `runbook --help` stays fast.
"""

from __future__ import annotations

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

    return docker.errors.NotFound


def inspect(name: str) -> ContainerInfo:
    try:
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
        client().images.get(image)
    except _not_found():
        return False
    return True


def start(name: str) -> None:
    try:
        client().containers.get(name).start()
    except _not_found():
        raise DockerError(f"container {name} does not exist", "recreate it") from None


def stop(name: str, timeout: int = 10) -> None:
    try:
        client().containers.get(name).stop(timeout=timeout)
    except _not_found():
        return


def remove(name: str) -> None:
    try:
        client().containers.get(name).remove(force=True)
    except _not_found():
        return


def exec_run(name: str, command: list[str]) -> tuple[int, str]:
    """Run a command in a running container; returns (exit code, combined output)."""
    try:
        result = client().containers.get(name).exec_run(command)
    except _not_found():
        raise DockerError(f"container {name} does not exist", "start it first") from None
    return result.exit_code, result.output.decode(errors="replace")


def logs(name: str, tail: int = 100) -> str:
    try:
        return client().containers.get(name).logs(tail=tail).decode(errors="replace")
    except _not_found():
        return ""
