"""The interrupted run's intent record: a record that cannot be read is one line naming the file
and the fix (exit 4), never an unexpected failure. Real files, no Docker."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from runbook import finish
from runbook import intent as intents
from runbook import state as states
from runbook.environment import Environment, Slot
from runbook.errors import ExitCode, PreconditionError
from tests.drill_checks import go_cli_takes_and_releases_the_lock, host_env


@pytest.fixture
def env(tmp_path: Path) -> Environment:
    return host_env(tmp_path)


def test_a_written_record_reads_back(env: Environment) -> None:
    intent = intents.Intent(run_id="rbk_1", action="rollback", environment=env.name,
                            from_slot="green", to_slot="blue", from_version="def5678",
                            to_version="abc1234")
    intents.write(env, intent)
    assert intents.read(env) == intent


def test_the_gated_container_reads_back_and_a_record_without_it_names_none(
        env: Environment) -> None:
    """The container a run's gate proved reads back as written; a record an older version
    wrote has none (its finish goes on as that version's did)."""
    proved = ("4f2a", "2026-12-05T16:16:32.448751005Z", 2)
    intent = intents.Intent(run_id="rbk_1", action="rollback", environment=env.name,
                            from_slot="green", to_slot="blue", from_version="def5678",
                            to_version="abc1234", record={
                                "gated": True,
                                intents.GATED_CONTAINER: intents.identity_entry(proved)})
    intents.write(env, intent)
    read = intents.read(env)
    assert read is not None and intents.gated_container(read) == proved
    older = json.loads(intents.path(env).read_text())
    del older["record"][intents.GATED_CONTAINER]
    intents.path(env).write_text(json.dumps(older))
    read = intents.read(env)
    assert read is not None and intents.gated_container(read) is None


@pytest.mark.parametrize(("content", "problem"), [
    (b"\xff\xfe{\"phase\": \"prepare\"}\n", "not UTF-8"),  # binary or a torn foreign write
    ("{\"phase\": \"préparé\"}".encode("latin-1"), "not UTF-8"),
    (b"{\"phase\": ", "unreadable"),
    (b"{\"run_id\": \"rbk_1\"}\n", "unreadable"),
    (b"[" * 100_000 + b"]" * 100_000, "unreadable"),  # nested past the parser's recursion
])
def test_an_unreadable_record_is_one_line_naming_the_file_and_the_fix(
        env: Environment, content: bytes, problem: str) -> None:
    record = intents.path(env)
    record.parent.mkdir(parents=True)
    record.write_bytes(content)
    for read in (lambda: intents.read(env), lambda: finish.interrupted(env)):
        with pytest.raises(PreconditionError) as info:
            read()
        error = info.value
        assert str(record) in error.message and problem in error.message
        assert "\n" not in str(error) and error.exit_code == ExitCode.PRECONDITION
        assert error.fix is not None and f"move {record} aside" in error.fix
    assert record.read_bytes() == content  # left for on-call to look at


def test_a_record_that_is_valid_json_but_not_an_object_is_unreadable(env: Environment) -> None:
    record = intents.path(env)
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps(["rollback"]))
    with pytest.raises(PreconditionError, match="unreadable"):
        intents.read(env)


@pytest.mark.parametrize("change", [{"to_slot": "Green"}, {"from_slot": None},
                                    {"record": []}, {"to_version": 1234567},
                                    {"from_version": ["abc1234"]},
                                    # the gated container, which a finish compares
                                    {"record": {"gated_container": ["abc", None, 0]}},
                                    {"record": {"gated_container": {
                                        "container_id": "abc", "started_at": None}}},
                                    {"record": {"gated_container": {
                                        "container_id": "abc", "started_at": None,
                                        "restart_count": "0"}}},
                                    # the ids a later "recorded since" judges by
                                    {"recorded_ids": "dep_a"},
                                    {"recorded_ids": ["dep_a", None]},
                                    {"recorded_keys": "dep_a"},
                                    {"recorded_keys": ["dep_a", 1]}])
def test_a_record_with_a_field_of_the_wrong_kind_is_unreadable_not_a_crash_later(
        env: Environment, change: dict[str, object]) -> None:
    """Found by review: `"to_slot": "Green"` (or a list for `record`) read fine and then
    failed where it was used: `runbook status` lost every other fact to one "unexpected
    failure: ValueError". It is the one-line unreadable record, naming the fix."""
    intent = intents.Intent(run_id="rbk_1", action="rollback", environment=env.name,
                            from_slot="green", to_slot="blue", from_version="def5678",
                            to_version="abc1234")
    intents.write(env, intent)
    record = intents.path(env)
    record.write_text(json.dumps(json.loads(record.read_text()) | change))
    with pytest.raises(PreconditionError, match="unreadable") as info:
        intents.read(env)
    assert f"move {record} aside" in str(info.value.fix)


def test_a_record_of_an_action_this_version_does_not_know_is_left_for_the_version_that_wrote_it(
        env: Environment) -> None:
    """Found by review (version skew): a newer runbook's record of a run this version has no
    verb for was finished as a rollback (the fallback recorder, and `rollback --to` as the
    resume command); "move it aside" would lose that run's record. Refused, exit 4, the
    record left as it was, the fix naming the version that wrote it."""
    from runbook import rollback

    intent = intents.Intent(run_id="rst_1", action="rollback", environment=env.name,
                            from_slot="green", to_slot="blue", from_version="def5678",
                            to_version="abc1234")
    intents.write(env, intent)
    record = intents.path(env)
    record.write_text(json.dumps(json.loads(record.read_text()) | {"action": "restore"}))
    content = record.read_bytes()
    for read in (lambda: intents.read(env), lambda: finish.interrupted(env),
                 lambda: rollback.rollback(env, rollback.Options(reason="after the upgrade"))):
        with pytest.raises(PreconditionError) as info:
            read()
        error = info.value
        assert "`restore` run" in error.message and "does not know" in error.message, error
        assert "nothing was changed" in error.message and "\n" not in str(error)
        assert error.exit_code == ExitCode.PRECONDITION
        assert "aside" not in str(error.fix) and "version that started it" in str(error.fix)
    assert record.read_bytes() == content


def test_an_interrupted_run_says_its_last_recorded_step(env: Environment) -> None:
    """A run killed inside a step: its intent names the step its own run record shows."""
    from runbook import journal

    intent = intents.Intent(run_id="rbk_2", action="rollback", environment=env.name,
                            from_slot="green", to_slot="blue", from_version="def5678",
                            to_version="abc1234")
    intents.write(env, intent)
    assert "last recorded step" not in intents.read(env).describe()  # no run record yet
    run = journal.Journal.open(env, "rollback", run_id="rbk_2", why="test")
    with run.step("preflight", "Pre-flight checks"):
        pass
    with run.step("start-slot", "Start the stopped blue container"):
        # killed here (SIGKILL): the step never ends, the run is never finished
        said = intents.read(env).describe(moved=False)  # Caddy read: it serves green
        unread = intents.read(env).describe()  # what Caddy serves not read
    assert said.endswith("stopped before traffic moved; its last recorded step: Start the "
                         "stopped blue container (running)"), said
    # its record lags a kill between Caddy's reload and its commit mark: never "before"
    assert unread.endswith("stopped; whether it moved traffic is unknown (its record says it "
                           "had not); its last recorded step: Start the stopped blue "
                           "container (running)"), unread
    (env.runs_dir / "rbk_2.json").write_text("{torn")  # unreadable: nothing is claimed
    assert "last recorded step" not in intents.read(env).describe()
    # a FIFO (or a symlink to /dev/zero) in its place is no record: never read, never waited on
    (env.runs_dir / "rbk_2.json").unlink()
    os.mkfifo(env.runs_dir / "rbk_2.json")
    assert "last recorded step" not in intents.read(env).describe()
    (env.runs_dir / "rbk_2.json").unlink()
    (env.runs_dir / "rbk_2.json").symlink_to("/dev/zero")
    assert "last recorded step" not in intents.read(env).describe()


def test_a_finished_run_that_kept_its_record_names_the_step_that_failed(
        env: Environment) -> None:
    from runbook import journal

    intent = intents.Intent(run_id="dep_3", action="deploy", environment=env.name,
                            from_slot="blue", to_slot="green", from_version="def5678",
                            to_version="abc1234")
    intents.write(env, intent)
    run = journal.Journal.open(env, "deploy", run_id="dep_3", why="test")
    with pytest.raises(RuntimeError), run.step("migrate", "Run the migrations"):
        raise RuntimeError("migration 3 failed")
    with run.step("unlock", "Release the deploy lock"):
        pass
    run.finish("failed", ExitCode.ATTENTION)
    said = intents.read(env).describe()
    assert said.endswith("; its last recorded step: Run the migrations (failed)"), said


def test_a_run_id_that_is_no_name_reads_no_file_outside_the_runs_folder(
        env: Environment) -> None:
    """Found by review: the run id names the run record to read; `../x` read outside it."""
    env.runs_dir.mkdir(parents=True, exist_ok=True)
    outside = env.runs_dir.parent / "x.json"
    outside.write_text(json.dumps({"steps": [{"title": "Elsewhere", "status": "running",
                                              "started_at": "2026-12-03T00:00:00.000Z"}]}))
    intents.write(env, intents.Intent(run_id="../x", action="rollback", environment=env.name,
                                      from_slot="green", to_slot="blue", from_version=None,
                                      to_version="abc1234"))
    assert "Elsewhere" not in intents.read(env).describe()


def test_clearing_a_record_that_became_unreadable_says_false_never_raises(
        env: Environment) -> None:
    """Found by review: a record unreadable when the run clears it (after its commit) raised
    out of the clear, and a rollback that worked was journaled as exit 4. The clear says it
    could not (the run warns) and leaves the file for the next run, which says why."""
    record = intents.path(env)
    record.parent.mkdir(parents=True)
    record.write_bytes(b"{\"phase\": ")
    assert intents.clear(env, "rbk_1") is False
    assert record.read_bytes() == b"{\"phase\": "


STARTED = "2026-12-05T14:00:00Z"  # when the killed deploy began, by its machine's clock
V1, V2, V3 = "1111111", "2222222", "3333333"


def a_deploy_killed_before_its_switch(
        env: Environment, v1_at: datetime = datetime(2026, 12, 5, 10, 0, tzinfo=UTC),
) -> intents.Intent:
    """The state file as a killed `runbook deploy --version V2` (blue -> green) planned from
    (V1 on blue, deployed `v1_at`), and its record, as the deploy writes it: real files."""
    return run_killed_planned_from(env, states.DeploymentState(
        environment=env.name, current=states.make_deployment(
            V1, "1" * 40, Slot.BLUE, status="active", deployment_id="dep_v1",
            deployed_at=v1_at)),
        run_id="dep_killed", action="deploy", from_slot="blue", to_slot="green",
        from_version=V1, to_version=V2, record={"deployment_id": "dep_killed"})


def run_killed_planned_from(env: Environment, state: states.DeploymentState,
                            **fields: Any) -> intents.Intent:
    """`state` written as the state file, and the record of a run (`fields`) planned from it
    as a read of that file gives it, as the run writes it (started at STARTED), read back."""
    states.write_state(env.state_file, state)
    planned = states.read_state(env.state_file, environment=env.name)
    intents.write(env, intents.Intent(environment=env.name, started_at=STARTED, **fields,
                                      **intents.recorded(planned)))
    killed = intents.read(env)
    assert killed is not None
    return killed


def as_an_older_version_wrote_it(env: Environment, *fields: str) -> intents.Intent:
    """The interrupted run's record without `fields` (an older runbook never wrote them),
    read back."""
    older = json.loads(intents.path(env).read_text())
    for name in fields:
        del older[name]
    intents.path(env).write_text(json.dumps(older))
    killed = intents.read(env)
    assert killed is not None
    return killed


def deploy_script_deploys_v3_to_green(env: Environment, at: datetime) -> states.Deployment:
    """The host's deploy script records V3 on green, stamped `at` by its own clock."""
    before = states.read_state(env.state_file, environment=env.name)
    theirs = states.make_deployment(V3, "3" * 40, Slot.GREEN, status="active",
                                    deployed_by="deploy.sh@host", deployed_at=at,
                                    deployment_id="dep_script")
    states.write_state(env.state_file, states.after_deploy(before, theirs))
    return theirs


@pytest.mark.parametrize("at", [datetime(2026, 12, 5, 14, 30, tzinfo=UTC),
                                # the clock stepped back 3 h between the two runs
                                datetime(2026, 12, 5, 11, 30, tzinfo=UTC)])
def test_another_tools_deploy_is_recorded_since_the_run_began_whatever_its_clock_says(
        env: Environment, at: datetime) -> None:
    """Found by review: "another tool recorded a deployment since the killed run began" was
    `deployed_at > started_at`, two wall clocks: a deploy script stamping 11:30 after a run
    that began at 14:00 (the clock stepped back) was "not since", so its traffic on green
    was taken for the killed run's (the repair named reverted it), and a deploy rerun
    reused the killed run's id and older snapshot. The record keeps the ids the state file
    held when the run began: a deployment not among them was recorded since."""
    from runbook import deploy

    killed = a_deploy_killed_before_its_switch(env)
    assert killed.recorded_ids == ("dep_v1",)
    deploy_script_deploys_v3_to_green(env, at)
    now = states.read_state(env.state_file, environment=env.name)
    later = finish.superseded(killed, now)
    assert later is not None and later.id == "dep_script", later
    assert deploy._recorded_since(now, killed)


def test_a_deployment_the_file_held_when_the_run_began_is_never_since_whatever_its_stamp(
        env: Environment) -> None:
    """The other way round: a deploy script's clock ahead of this host's stamped a
    deployment already in the file when the run began "after" it; by time, the rerun of
    the killed deploy took a new "pre-deploy" snapshot at the schema the killed run had
    migrated (the guard, a restore and the cleanup trust it). By id it was there before."""
    from runbook import deploy

    ahead = datetime(2026, 12, 5, 17, 0, tzinfo=UTC)  # 3 h after the run began
    killed = a_deploy_killed_before_its_switch(env, v1_at=ahead)
    assert not deploy._recorded_since(states.read_state(env.state_file), killed)


@pytest.mark.parametrize(("at", "since"), [(datetime(2026, 12, 5, 14, 30, tzinfo=UTC), True),
                                           (datetime(2026, 12, 5, 11, 30, tzinfo=UTC), False)])
def test_a_record_written_before_the_ids_were_kept_is_still_read_and_judged_by_time(
        env: Environment, at: datetime, since: bool) -> None:
    """A record an older runbook wrote (no `recorded_ids`) is read as before and judged by
    its start time, the only thing it holds: a clock stepped back still hides a deploy
    from it, as it did from the version that wrote it."""
    from runbook import deploy

    a_deploy_killed_before_its_switch(env)
    killed = as_an_older_version_wrote_it(env, "recorded_ids", "recorded_keys")
    assert killed.recorded_ids is None and killed.recorded_keys is None
    deploy_script_deploys_v3_to_green(env, at)
    now = states.read_state(env.state_file, environment=env.name)
    assert (finish.superseded(killed, now) is not None) is since
    assert deploy._recorded_since(now, killed) is since


def test_a_go_cli_rewrite_that_drops_every_id_records_nothing_since(env: Environment) -> None:
    """Found by review: the Go CLI's state struct has no `id`, so any rewrite by it (a lock
    taken and released, no deployment changed) drops every `dep_...` id, and the reader
    derives others. None of them was among the ids the record kept: the rerun of a deploy
    killed after its migrations took v1 for a deployment recorded since, and left the
    killed run's id and pre-migration snapshot for a new "pre-deploy" one at the migrated
    schema. The record also keeps each deployment's content (version, commit, deployment
    time): v1 is the same deployment, whatever its id says now."""
    from runbook import deploy

    killed = a_deploy_killed_before_its_switch(
        env, v1_at=datetime(2026, 12, 5, 10, 0, 0, 120000, tzinfo=UTC))
    go_cli_takes_and_releases_the_lock(env.state_file)
    written = json.loads(env.state_file.read_text())
    assert "id" not in written["current_deployment"], written  # the Go CLI's rewrite
    assert written["current_deployment"]["deployed_at"] == "2026-12-05T10:00:00.12Z"
    now = states.read_state(env.state_file, environment=env.name)
    assert now.current is not None and now.current.id != "dep_v1"  # derived: another id
    assert not deploy._recorded_since(now, killed)


def test_another_tools_deploy_is_still_recorded_since_after_a_go_cli_rewrite(
        env: Environment) -> None:
    """The other way round: the script's deploy of v3 after the run began, then the Go
    CLI's rewrite (every id gone): neither v3's id nor its content was in the file when
    the run began, so it was recorded since, as before the rewrite."""
    from runbook import deploy

    killed = a_deploy_killed_before_its_switch(env)
    deploy_script_deploys_v3_to_green(env, datetime(2026, 12, 5, 14, 30, tzinfo=UTC))
    go_cli_takes_and_releases_the_lock(env.state_file)
    now = states.read_state(env.state_file, environment=env.name)
    later = finish.superseded(killed, now)
    assert later is not None and later.version == V3 and later.id != "dep_script", later
    assert deploy._recorded_since(now, killed)


def test_a_rollback_whose_target_the_go_cli_rewrote_is_not_superseded(env: Environment) -> None:
    """Found by review, the same drop of every id: a rollback to v1 on blue killed once
    Caddy served blue, before its record said so, on a file that already named v1 current
    (the old rollback command swaps only the file). After the Go CLI's rewrite, v1's
    derived id was neither the rollback's target id nor among those kept: the record was
    called out of date ("another tool's deploy serves") instead of finished. v1's content
    was in the file when the rollback began: not recorded since, and it is the target."""
    v1 = states.make_deployment(V1, "1" * 40, Slot.BLUE, status="active",
                                deployment_id="dep_v1",
                                deployed_at=datetime(2026, 12, 5, 10, 0, tzinfo=UTC))
    v2 = states.make_deployment(V2, "2" * 40, Slot.GREEN, status="rolled_back",
                                deployment_id="dep_v2",
                                deployed_at=datetime(2026, 12, 5, 12, 0, tzinfo=UTC))
    killed = run_killed_planned_from(
        env, states.DeploymentState(environment=env.name, current=v1, previous=v2,
                                    history=(v1, v2)),
        run_id="rbk_killed", action="rollback", from_slot="green", to_slot="blue",
        from_version=V2, to_version=V1, record={"target_id": "dep_v1"})
    assert finish.superseded(killed, states.read_state(env.state_file)) is None
    go_cli_takes_and_releases_the_lock(env.state_file)
    now = states.read_state(env.state_file, environment=env.name)
    assert now.current is not None and now.current.id != "dep_v1"
    assert finish.superseded(killed, now) is None


def test_a_record_written_before_the_content_keys_were_kept_is_judged_by_its_ids(
        env: Environment) -> None:
    """A record the previous runbook wrote (ids, no content keys) is read as before and
    judged by its ids alone: a deployment whose id the file held is not since."""
    from runbook import deploy

    a_deploy_killed_before_its_switch(env)
    killed = as_an_older_version_wrote_it(env, "recorded_keys")
    assert killed.recorded_keys is None and killed.recorded_ids == ("dep_v1",)
    assert not deploy._recorded_since(states.read_state(env.state_file), killed)
    deploy_script_deploys_v3_to_green(env, datetime(2026, 12, 5, 11, 30, tzinfo=UTC))
    assert deploy._recorded_since(states.read_state(env.state_file), killed)
