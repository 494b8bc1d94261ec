"""A switch onto a slot whose build is not the one the state file records for the deployment
the switch records there (found by review, HIGH): the previous deployment's tag was rebuilt
from other code, its standby made again from it through compose and stopped; `runbook status`
said a rollback to it is refused, yet `runbook switch --slot green --yes` moved users onto
that build (exit 0, "Done") and the state file recorded the old commit for it. The switch
compares the build as the rollback does: the revision label before anything changes, and
the commit /health names at its gate, before traffic moves."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from runbook import compose, deploy, docker
from runbook import state as states
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Slot
from runbook.errors import ExitCode
from tests.drill_checks import rebuilt_as, runbook_cli, snapshot, through_proxy

pytestmark = pytest.mark.docker
V2, V3 = VERSIONS["v2"], VERSIONS["v3"]


@pytest.fixture
def stack(drill_stack: DrillStack) -> DrillStack:
    """The session stack as the last test left it: every test here arranges its scene first."""
    return drill_stack


@pytest.fixture
def rebuilt(stack: DrillStack, request: pytest.FixtureRequest) -> Iterator[str]:
    """v3 serves from blue; the previous deployment, `tag` (v2's build, commit V2's, as the
    state file records it), had its tag rebuilt from v3's code with the revision label the
    test's parameter names (None: v3's own), and green was made again from it through
    compose, then stopped. Yields the tag."""
    if stack.has("docker-run"):
        pytest.skip("the scene recreates the standby through compose; a docker-run host has none")
    stack.reset()  # v1 on blue, serving
    env = stack.env
    tag = secrets.token_hex(4)[:7]
    moved = f"{env.compose.image_repository}:{tag}"
    builds = [rebuilt_as(stack, tag, V2.image)]
    try:
        deploy.deploy(env, deploy.Options(version=tag))  # green runs the tag (v2's build)
        deploy.deploy(env, deploy.Options(version=V3.tag))  # blue serves v3
        recorded = states.read_state(env.state_file).previous
        assert recorded is not None and recorded.version == tag
        builds.append(rebuilt_as(stack, tag, V3.image, revision=getattr(request, "param", None)))
        compose.run(compose.recreate_slot(env, Slot.GREEN, tag))
        stack.docker("stop", env.slot(Slot.GREEN).container)
        green = docker.inspect(env.slot(Slot.GREEN).container)
        assert green.image_id == builds[-1] and not green.running, green
        yield tag
    finally:
        stack.docker("rm", "-f", env.slot(Slot.GREEN).container, check=False)
        stack.docker("rmi", "-f", "--no-prune", moved, check=False)
        for build in builds:
            stack.docker("rmi", "-f", build, check=False)


@pytest.mark.shape_specific
def test_a_switch_to_a_standby_made_from_a_rebuilt_tag_is_refused_before_any_change(
        stack: DrillStack, rebuilt: str) -> None:
    """Its build's revision label names v3's commit, the state file records v2's for the
    deployment the switch would record on green: the dry run, the run and a forced run are
    refused (exit 4) naming the tag, both commits and the fix; users stay on blue (through
    the proxy) and nothing changed, the state file included."""
    env = stack.env
    before = snapshot(env)
    assert before["traffic"] == ("blue", V3.tag)
    for args in (("--dry-run",), ("--yes",), ("--yes", "--force")):
        run = runbook_cli(env, "switch", "--slot", "green", *args)
        said = run.stdout + run.stderr
        assert run.returncode == ExitCode.PRECONDITION, (args, said)
        assert (f"made from {env.compose.image_repository}:{rebuilt}) holds commit {V3.tag}"
                in said and f"records commit {V2.git_commit[:7]} for {rebuilt}" in said), said
        assert "rebuild it" in said and V2.git_commit in said, said  # the fix
        assert "--force-recreate" in said, said  # how to make green again from it
        assert "runbook deploy" in said, said  # or record what runs
        assert through_proxy(env) == ("blue", V3.tag)
        assert snapshot(env) == before  # state file, Caddyfile, containers, lock, traffic


@pytest.mark.shape_specific
@pytest.mark.parametrize("rebuilt", ["unknown"], indirect=True)
def test_a_switch_to_a_rebuilt_build_naming_no_commit_fails_at_its_gate(
        stack: DrillStack, rebuilt: str) -> None:
    """Its build names no commit (label `unknown`): planned, and the gate compares the commit
    green's /health names (v3's) with the one the state file records (v2's) and fails
    before traffic moves: users stay on blue, green is stopped again, the state file is
    untouched."""
    if stack.has("minimal-health"):
        pytest.skip("/health names no commit on this shape: the gate has none to compare")
    env = stack.env
    state_before = env.state_file.read_bytes()
    run = runbook_cli(env, "switch", "--slot", "green", "--yes")
    said = run.stdout + run.stderr
    assert run.returncode == ExitCode.FAILED_SAFELY, said
    assert f"green runs commit {V3.tag}" in said and V2.git_commit[:7] in said, said
    assert through_proxy(env) == ("blue", V3.tag)  # traffic never moved
    assert not docker.inspect(env.slot(Slot.GREEN).container).running
    assert env.state_file.read_bytes() == state_before
