"""Environment fixtures: a drill stack by default, a real host with `--env NAME|FILE`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from runbook.drill.stack import DrillStack
from runbook.environment import Environment


@pytest.fixture(scope="session")
def drill_stack(request: pytest.FixtureRequest) -> Iterator[DrillStack]:
    """One ephemeral blue/green stack for the whole session, in the `--shape` asked for."""
    with DrillStack(shape=str(request.config.getoption("--shape"))) as stack:
        yield stack


@pytest.fixture(scope="session")
def environment(request: pytest.FixtureRequest) -> Environment:
    name = request.config.getoption("--env")
    if name == "drill":
        return request.getfixturevalue("drill_stack").env
    from runbook import environment as envmod

    return envmod.load(name)
