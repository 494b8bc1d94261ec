"""The interrupted run's intent record: a record that cannot be read is one line naming the file
and the fix (exit 4), never an unexpected failure. Real files, no Docker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runbook import finish
from runbook import intent as intents
from runbook.environment import Environment
from runbook.errors import ExitCode, PreconditionError
from tests.drill_checks import host_env


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
                                        "restart_count": "0"}}}])
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
        said = intents.read(env).describe()
    assert said.endswith("stopped before traffic moved; its last recorded step: Start the "
                         "stopped blue container (running)"), said
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
