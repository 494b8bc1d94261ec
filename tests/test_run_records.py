"""How the run records are read back: the guards and messages that decide from them
(a restore that did not match its snapshot, a killed restore, `snapshot cleanup`) must see
past any number of newer runs that changed nothing, past other environments' runs in a
shared runs folder, and past odd entries there (a dangling symlink, a FIFO).

No container: real record files, written by the journal (and, for the refused retries, by
the rollback command's own code path), in a temporary folder; what is expected is spelled
out here from what was written, never computed by the code under test."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from runbook import restore_records, rollback, snapshot_restore, status
from runbook.environment import Environment
from runbook.errors import LockedError, PreconditionError
from runbook.journal import Journal, past_records
from tests.drill_checks import fifo_released_after, host_env

SAFETY = "togather_togather_20260101_030000_pre-restore.sql.gz"
TARGET = "togather_togather_20251231_120000_pre-deploy.sql.gz"
DOUBTED = "the restored database does not match the snapshot: items has 11 rows, the snapshot 10"


@pytest.fixture
def env(tmp_path: Path) -> Environment:
    base = host_env(tmp_path)
    folder = tmp_path / "db-snapshots"
    folder.mkdir()
    return base.with_(database=dataclasses.replace(base.database, snapshot_dir=folder))


def _doubted_restore(env: Environment) -> str:
    """The record a `rollback --restore-snapshot` leaves when the restored database does not
    match its snapshot (its verify-restore check failed, the app left stopped): its run id."""
    run = Journal.open(env, "rollback", why="restore then roll back")
    for name in ("lock", "plan", "stop-app-slots"):
        with run.step(name, name):
            pass
    with run.step("safety-snapshot", "Take a safety snapshot") as step:
        step.detail(safety_snapshot=str(env.database.snapshot_dir / SAFETY),
                    restore_target=str(env.database.snapshot_dir / TARGET))
    with run.step("restore-database", "Replace the database"):
        pass
    with contextlib.suppress(PreconditionError), \
            run.step("verify-restore", "Verify the restored database") as step:
        step.detail(**{restore_records.MISMATCH: DOUBTED,
                       restore_records.MISMATCH_FIX: "do not start the app on it"})
        raise PreconditionError(DOUBTED, "do not start the app on it")
    run.fail(PreconditionError(DOUBTED, "do not start the app on it"))
    run.close()
    return run.run_id


def _doubted_restore_by_an_older_runbook(env: Environment) -> str:
    """The record a runbook older than the MISMATCH detail (before 2026-12-05 00:12) left for
    the same failed check: the verify-restore step failed with only its error."""
    run = Journal.open(env, "rollback", why="restore then roll back")
    with run.step("safety-snapshot", "Take a safety snapshot") as step:
        step.detail(safety_snapshot=str(env.database.snapshot_dir / SAFETY))
    with run.step("restore-database", "Replace the database"):
        pass
    with contextlib.suppress(PreconditionError), \
            run.step("verify-restore", "Verify the restored database"):
        raise PreconditionError(DOUBTED, "do not start the app on it")
    run.fail(PreconditionError(DOUBTED, "do not start the app on it"))
    run.close()
    return run.run_id


def _killed_restore(env: Environment) -> str:
    """The record of a `snapshot restore` killed (-9) mid-replay: still "running"."""
    run = Journal.open(env, "snapshot-restore", why="restore")
    with run.step("stop-app-slots", "Stop the app slots"):
        pass
    with run.step("safety-snapshot", "Take a safety snapshot") as step:
        step.detail(safety_snapshot=str(env.database.snapshot_dir / SAFETY))
    run.step("restore-database", "Replace the database").__enter__()  # killed here
    run.close()
    return run.run_id


def _refused_at_the_lock(env: Environment) -> str:
    """The record of a run refused at the deploy lock (exit 3): it changed nothing."""
    run = Journal.open(env, "rollback", why="again")
    with contextlib.suppress(LockedError), run.step("lock", "Take the deploy lock"):
        raise LockedError("the deploy lock is held by another run", "wait for it")
    run.fail(LockedError("the deploy lock is held by another run", "wait for it"))
    run.close()
    return run.run_id


def _served(env: Environment, action: str = "deploy") -> str:
    """The record of a run that started the app and switched traffic."""
    run = Journal.open(env, action, why="release")
    for name in ("lock", "plan", "start-slot", "switch"):
        with run.step(name, name):
            pass
    run.finish("success", 0)
    run.close()
    return run.run_id


# -- 1. no window: the guard holds until a run really served or changed the data -------------

def test_a_restore_that_does_not_match_is_still_refused_after_51_refused_rollbacks(
        env: Environment) -> None:
    """Found by review: every run refused at the lock, the plan or the prompt writes a run
    record, each refusal by this guard too, and only the newest 50 records were read: the
    51st `runbook rollback` retried (a cron or CI loop, several people) planned as if no
    restore were in doubt and would start the app on that database. Each refusal here is the
    rollback command's own run (its journal, its lock, its plan)."""
    doubted = _doubted_restore(env)
    for attempt in range(1, 53):
        with pytest.raises(PreconditionError) as refused:
            rollback.rollback(env, rollback.Options(reason=f"retry {attempt}"))
        assert DOUBTED in refused.value.message, (attempt, refused.value)
        assert f"of the rollback run {doubted} failed" in refused.value.message
    assert len(list(env.runs_dir.glob("*.json"))) == 53  # each refusal left its record
    found = restore_records.doubted_restore(env)
    assert found is not None and found["run_id"] == doubted, found
    assert found["before"] == str(env.database.snapshot_dir / SAFETY), found


def test_another_environments_runs_in_a_shared_runs_folder_never_hide_a_doubted_restore(
        env: Environment) -> None:
    """The packaged environment files share runs_dir = "~/.togather/runs": 50 staging
    deploys (which started staging's app) hid production's doubted restore. They neither
    decide for production nor count towards anything."""
    doubted = _doubted_restore(env)
    staging = env.with_(name="staging")
    for _ in range(60):
        _served(staging)
    found = restore_records.doubted_restore(env)
    assert found is not None and found["run_id"] == doubted, found
    assert restore_records.doubted_restore(staging) is None  # staging's own runs served


def test_the_restore_doubt_ends_with_a_run_that_served_not_with_the_number_of_runs(
        env: Environment) -> None:
    """The guard lifts when a run started the app or changed the data (a switch with
    --accept-restored-data, a restore), not before: refused runs before and after it count
    for nothing."""
    _doubted_restore(env)
    for _ in range(5):
        _refused_at_the_lock(env)
    _served(env, "switch")
    for _ in range(60):
        _refused_at_the_lock(env)
    assert restore_records.doubted_restore(env) is None


def test_a_killed_restore_is_still_named_after_60_runs_refused_at_the_lock(
        env: Environment) -> None:
    """killed_restore (a rollback's and status's pointer to the data from before) and
    restored_by (status's, beside the run's unfinished record) read the same records, once
    limited to the newest 50."""
    killed = _killed_restore(env)
    for _ in range(60):
        _refused_at_the_lock(env)
    safety = str(env.database.snapshot_dir / SAFETY)
    found = snapshot_restore.killed_restore(env, None)
    assert found is not None and (found["run_id"], found["safety"]) == (killed, safety), found
    assert snapshot_restore.restored_by(env, killed) == (safety, False)


# -- 2. one odd entry is passed over, never the whole listing --------------------------------

def test_a_dangling_symlink_among_the_records_hides_none_of_them(env: Environment) -> None:
    """Found by review: a `latest.json` link whose record was pruned (or a record deleted
    while the folder was listed) made the listing fail whole: no restore in doubt, no last
    run in `runbook status`."""
    doubted = _doubted_restore(env)
    (env.runs_dir / "latest.json").symlink_to("rbk_0000000000000000_pruned.json")
    found = restore_records.doubted_restore(env)
    assert found is not None and found["run_id"] == doubted, found
    last = status._last_run(env)
    assert last is not None and last["run_id"] == doubted, last


def test_runs_refused_at_the_lock_never_hide_the_last_run_that_did_something(
        env: Environment) -> None:
    """Found by review: a second command refused at the lock (exit 3, it changed nothing)
    became status's "last run: failed (exit 3)", as the newest record, and hid the run that
    did the work. A record whose one started step is the lock it never took is passed over;
    any other refusal (a plan's exit 4, say) is still the last run."""
    served = _served(env)
    refused = [_refused_at_the_lock(env) for _ in range(3)]
    for age, run in enumerate([served, *reversed(refused)]):  # the refused ones newer
        when = time.time() - 60 + age
        os.utime(env.runs_dir / f"{run}.json", (when, when))
    last = status._last_run(env)
    assert last is not None and (last["run_id"], last["outcome"]) == (served, "success"), last
    planned = Journal.open(env, "rollback", why="again")  # took the lock, refused at its plan
    with contextlib.suppress(PreconditionError), planned.step("lock", "Take the deploy lock"):
        pass
    with contextlib.suppress(PreconditionError), planned.step("plan", "Load state and plan"):
        raise PreconditionError("no previous deployment", "deploy first")
    planned.fail(PreconditionError("no previous deployment", "deploy first"))
    planned.close()
    last = status._last_run(env)
    assert last is not None and (last["run_id"], last["exit_code"]) == (planned.run_id, 4)


def test_a_record_deleted_while_the_records_are_read_is_passed_over(env: Environment) -> None:
    older = _refused_at_the_lock(env)
    newer = _refused_at_the_lock(env)
    os.utime(env.runs_dir / f"{older}.json", (time.time() - 60, time.time() - 60))
    reading = past_records(env)
    assert next(reading)["run_id"] == newer
    (env.runs_dir / f"{older}.json").unlink()
    assert list(reading) == []


# -- 3. nothing named like a record is waited on ---------------------------------------------

def test_a_fifo_named_like_a_run_record_is_never_waited_on(env: Environment) -> None:
    """Found by review: a FIFO `*.json` in the runs folder hung `runbook status`, every
    rollback's plan and `snapshot cleanup` for ever. It is no record: the guard reads past
    it at once; the cleanup, which keeps every snapshot when a record cannot be read, says
    so and keeps them."""
    doubted = _doubted_restore(env)
    snapshot = env.database.snapshot_dir / SAFETY
    snapshot.write_bytes(b"x")
    fifo = env.runs_dir / "zz-pipe.json"
    os.mkfifo(fifo)
    newest = time.time() + 60
    os.utime(fifo, (newest, newest))  # listed first
    began = time.monotonic()
    with fifo_released_after(fifo, 5.0):
        found = restore_records.doubted_restore(env)
        kept = snapshot_restore.kept_for_killed_restore(env)
    assert time.monotonic() - began < 4.0, "waited on the FIFO"
    assert found is not None and found["run_id"] == doubted, found
    assert set(kept) == {SAFETY}, kept
    assert "cannot be read" in kept[SAFETY] and str(fifo) in kept[SAFETY], kept


# -- 4. snapshot cleanup reads one record at a time ------------------------------------------

def test_snapshot_cleanup_holds_one_run_record_at_a_time(env: Environment) -> None:
    """Found by review: `snapshot cleanup` read every run record into memory, twice, once
    under the deploy lock (20,000 records: 784 MiB). 300 records of 40 KB each, none a
    restore (so every one is read): the records held at once stay far below their sum."""
    template = json.loads((env.runs_dir / f"{_refused_at_the_lock(env)}.json").read_text())
    template["context"] = {"note": "x" * 40_000}
    for n in range(300):
        path = env.runs_dir / f"rbk_{n:016x}_{'0' * 24}.json"
        path.write_text(json.dumps(template | {"run_id": path.stem}))
    tracemalloc.start()
    try:
        kept = snapshot_restore.kept_for_killed_restore(env)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert kept == {}
    assert peak < 3_000_000, f"{peak} bytes at the peak for 12 MB of records"


def test_snapshot_cleanup_reads_no_record_older_than_the_last_finished_restore(
        env: Environment) -> None:
    """What cleanup keeps is decided by the records since the last restore that finished:
    an older entry that cannot be read (here a directory named like a record, which the OS
    refuses to read as a file) no longer keeps every snapshot; a newer one still does."""
    stray = env.runs_dir / "unreadable-record.json"
    _served(env)  # creates runs_dir
    stray.mkdir()
    os.utime(stray, (time.time() - 600, time.time() - 600))
    done = Journal.open(env, "snapshot-restore", why="restore")
    with done.step("restore-database", "Replace the database"):
        pass
    done.finish("success", 0)
    done.close()
    (env.database.snapshot_dir / SAFETY).write_bytes(b"x")
    assert snapshot_restore.kept_for_killed_restore(env) == {}
    newest = time.time() + 60
    os.utime(stray, (newest, newest))
    kept = snapshot_restore.kept_for_killed_restore(env)
    assert set(kept) == {SAFETY} and "cannot be read" in kept[SAFETY], kept



# -- 5. status's pointer to a killed restore's safety snapshot reads that run's record only ----

def test_restored_by_reads_the_interrupted_runs_own_record_and_no_other(
        env: Environment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: `restored_by` (what `runbook status` names beside an interrupted
    run) read every record when that run's was not among them (another operator's runs
    folder): every status read all of them. It reads `<run_id>.json` alone: one file when
    it is there, none when it is not, whatever else the folder holds."""
    from runbook import files

    killed = _killed_restore(env)
    template = json.loads((env.runs_dir / f"{_refused_at_the_lock(env)}.json").read_text())
    for n in range(300):  # newer than the killed run's: read first by a scan
        path = env.runs_dir / f"rbk_{n:016x}_{'1' * 24}.json"
        path.write_text(json.dumps(template | {"run_id": path.stem}))
    reads: list[Path] = []
    real = files.read_regular

    def counted(path: Path, limit: int, **kwargs: bool) -> bytes:
        reads.append(Path(path))
        return real(path, limit, **kwargs)

    monkeypatch.setattr(files, "read_regular", counted)
    safety = str(env.database.snapshot_dir / SAFETY)
    assert snapshot_restore.restored_by(env, killed) == (safety, False)
    assert reads == [env.runs_dir / f"{killed}.json"], reads[:3]
    reads.clear()
    assert snapshot_restore.restored_by(env, "rbk_0123456789abcdef_0123456789abcdef01234567") \
        is None
    # its record (not there), then the restores recorded beside the state file (another
    # operator's run): never the runs folder scanned
    assert len([p for p in reads if p.parent == env.runs_dir]) <= 1, reads[:3]
    beside = env.state_file.resolve().parent
    assert len(reads) <= 2 and all(p.parent in (env.runs_dir, beside) for p in reads), reads


def test_a_doubt_recorded_beside_the_state_file_that_cannot_be_read_refuses_a_rollback(
        env: Environment) -> None:
    """Fail closed: the file beside the state file that records a restore's failed check,
    when it cannot be read (not JSON), refuses a rollback (exit 4, naming the file), even
    with no run record of that restore in this operator's runs folder."""
    folder = env.state_file.parent
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".{env.state_file.name}.{env.name}.restore-doubted.json"
    marker.write_text("{torn")
    with pytest.raises(PreconditionError) as refused:
        rollback.rollback(env, rollback.Options(reason="after the failed check"))
    assert str(marker) in refused.value.message, refused.value
    assert "cannot be read" in refused.value.message, refused.value
    assert refused.value.fix, refused.value


def test_a_failed_restore_check_an_older_runbook_recorded_still_refuses_the_rollback(
        env: Environment) -> None:
    """Found by review (version skew): an older runbook recorded a failed restore check as
    the failed verify-restore step and its error only; after an upgrade mid-incident the
    guard knew only the newer detail, read the restore step after it as "restored", and a
    switch, deploy or rollback started the app on the database its check had rejected."""
    doubted = _doubted_restore_by_an_older_runbook(env)
    found = restore_records.doubted_restore(env)
    assert found is not None and found["run_id"] == doubted and DOUBTED in found["problem"], \
        found
    with pytest.raises(PreconditionError) as refused:
        rollback.rollback(env, rollback.Options(reason="after the upgrade"))
    assert DOUBTED in refused.value.message, refused.value
