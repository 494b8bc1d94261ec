"""The reference application's versions: each is an image tag `togather-server:<7 hex>`.

Tags and commits are derived from the version's name so they are stable across machines and
look exactly like a real deployment's (7-hex short commit, 40-hex commit).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum


class Behaviour(StrEnum):
    NORMAL = "normal"
    UNHEALTHY = "unhealthy"  # starts, but /health answers 503
    CRASH = "crash"  # exits non-zero on start
    SLOW_DRIP = "slow-drip"  # /health sends its headers, then one body byte every 0.5 s


@dataclass(frozen=True)
class AppVersion:
    name: str
    schema: int  # highest migration this build ships and understands
    behaviour: Behaviour = Behaviour.NORMAL

    @property
    def git_commit(self) -> str:
        return hashlib.sha1(f"togather-drill:{self.name}".encode()).hexdigest()

    @property
    def tag(self) -> str:
        return self.git_commit[:7]

    @property
    def image(self) -> str:
        return f"{APP_REPOSITORY}:{self.tag}"


APP_REPOSITORY = "togather-server"

VERSIONS: dict[str, AppVersion] = {
    v.name: v
    for v in (
        AppVersion("v1", schema=1),
        AppVersion("v2", schema=2),
        AppVersion("v3", schema=2),
        AppVersion("unhealthy", schema=2, behaviour=Behaviour.UNHEALTHY),
        AppVersion("crash", schema=2, behaviour=Behaviour.CRASH),
        AppVersion("slow-drip", schema=2, behaviour=Behaviour.SLOW_DRIP),
    )
}


def by_name(name: str) -> AppVersion:
    try:
        return VERSIONS[name]
    except KeyError:
        known = ", ".join(VERSIONS)
        raise KeyError(f"unknown drill version {name!r}; known: {known}") from None


def by_tag(tag: str) -> AppVersion | None:
    return next((v for v in VERSIONS.values() if v.tag == tag), None)
