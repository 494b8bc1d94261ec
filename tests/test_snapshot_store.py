"""Snapshot files without a database: what cleanup keeps, what a restore may pick when the
target's schema is unknown, and folders holding things that are not snapshots.

Real files in a temporary folder and a real state file written by the state writer; the
expected names are spelled out here, never computed by the code under test."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from runbook import database, restore_records, snapshots
from runbook import state as states
from runbook.environment import Environment, Slot, command_arg
from runbook.errors import ConfigError
from runbook.journal import Journal
from tests.drill_checks import (
    DEPLOY_UID,
    OWNER_UID,
    SHARED_GID,
    as_deploy_user,
    fifo_released_after,
    host_env,
    needs_root,
    settled,
)

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Environment:
    # the database whose snapshots these are (cleanup touches only that database's); never
    # connected to here
    monkeypatch.setenv("DATABASE_URL", "postgresql://togather:secret@localhost:5432/togather")
    base = host_env(tmp_path)
    folder = tmp_path / "db-snapshots"
    folder.mkdir()
    return base.with_(database=dataclasses.replace(base.database, snapshot_dir=folder))


def put(env: Environment, stamp: str, reason: str, *, deployment_id: str = "",
        version: int | None = 1, age_days: float = 0.0, expires_in_days: float = 7.0,
        environment: str | None = None) -> Path:
    """A real snapshot: a gzip file and its sidecar, taken `age_days` before NOW."""
    taken = NOW - timedelta(days=age_days)
    path = env.database.snapshot_dir / f"togather_togather_{stamp}_{reason}.sql.gz"
    path.write_bytes(gzip.compress(b"-- PostgreSQL database dump complete\n"))
    meta: dict[str, object] = {
        "snapshot_name": path.name, "database": "togather", "reason": reason,
        "timestamp": taken.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expires_at": (NOW + timedelta(days=expires_in_days)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "deployment_id": deployment_id, "git_commit": "a" * 40, "retention_days": 7,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "dirty": False,
    }
    if version is not None:
        meta["migration_version"] = version
    if environment is not None:
        meta["environment"] = environment
    path.with_name(path.name.removesuffix(".sql.gz") + ".meta.json").write_text(json.dumps(meta))
    return path


def record(env: Environment, *deployment_ids: str) -> None:
    """A state file whose deployments are `deployment_ids`, oldest first (the last is current)."""
    state = states.DeploymentState(environment=env.name)
    for n, dep_id in enumerate(deployment_ids):
        dep = states.make_deployment(f"{n:07x}", f"{n:040x}", Slot.BLUE, status="active",
                                     deployment_id=dep_id,
                                     deployed_at=NOW - timedelta(days=30 - n))
        state = states.after_deploy(state, dep)
    env.state_file.parent.mkdir(parents=True, exist_ok=True)
    states.write_state(env.state_file, state)


def names(paths: list[Path]) -> set[str]:
    return {p.name for p in paths}


# -- 1. cleanup keeps what a rollback would restore -----------------------------------------

def test_cleanup_keeps_the_current_deployments_expired_pre_deploy_snapshot(
        env: Environment) -> None:
    record(env, "dep_old", "dep_current")
    pre = put(env, "20261122_120000", "pre-deploy", deployment_id="dep_current",
              age_days=10, expires_in_days=-3)
    result = snapshots.cleanup(env, now=NOW)
    assert result.removed == []
    assert pre.exists() and pre.with_name(pre.name.replace(".sql.gz", ".meta.json")).exists()
    [(held, why)] = result.held
    assert held.path == pre and "current deployment" in why and "newest usable" in why
    assert snapshots.latest_before(env, 1, deployment_id="dep_current") is not None


def test_cleanup_keeps_current_previous_and_newest_and_removes_the_rest(
        env: Environment) -> None:
    record(env, "dep_a", "dep_b", "dep_c")  # previous dep_b, current dep_c
    old = put(env, "20261101_000000", "pre-deploy", deployment_id="dep_a", age_days=31,
              expires_in_days=-24)
    prev = put(env, "20261102_000000", "pre-deploy", deployment_id="dep_b", age_days=30,
               expires_in_days=-23)
    cur = put(env, "20261103_000000", "pre-deploy", deployment_id="dep_c", age_days=29,
              expires_in_days=-22)
    unusable = put(env, "20261105_000000", "manual", version=None, age_days=27,
                   expires_in_days=-20)  # no migration version: not usable
    manual = put(env, "20261110_000000", "manual", age_days=22, expires_in_days=-15)
    newest = put(env, "20261111_000000", "manual", version=None, age_days=21,
                 expires_in_days=-14)  # not usable either, but the newest: kept
    dry = snapshots.cleanup(env, now=NOW, dry_run=True)
    assert names([s.path for s in dry.removed]) == {old.name, unusable.name}
    assert old.exists() and unusable.exists()
    why = {s.name: reason for s, reason in dry.held}
    assert set(why) == {prev.name, cur.name, manual.name, newest.name}
    assert "previous deployment" in why[prev.name] and "dep_b" in why[prev.name]
    assert "current deployment" in why[cur.name] and "dep_c" in why[cur.name]
    assert "newest usable" in why[manual.name]
    assert why[newest.name] == "the newest snapshot"
    done = snapshots.cleanup(env, now=NOW)
    assert names([s.path for s in done.removed]) == {old.name, unusable.name}
    assert not old.exists() and not unusable.exists()
    assert prev.exists() and cur.exists() and manual.exists() and newest.exists()


def test_cleanup_keeps_the_newest_shell_tooling_snapshot_and_leaves_other_files_alone(
        env: Environment) -> None:
    """Found by review: a host whose snapshots all come from the shell tooling (sidecars with
    no checksum and no schema version: never "usable") idle for a week lost every snapshot,
    the newest too; any `*.sql.gz` expired by its age alone (an operator's own backup), and
    so did another environment's snapshots in the shared default folder."""
    record(env, "dep_a", "dep_b")
    older = put(env, "20261101_000000", "manual", version=None, age_days=31,
                expires_in_days=-24)
    newest = put(env, "20261102_000000", "manual", version=None, age_days=30,
                 expires_in_days=-23)
    for p in (older, newest):  # the shell tooling's sidecar: the contract's keys only
        meta_path = p.with_name(p.name.removesuffix(".sql.gz") + ".meta.json")
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({k: v for k, v in meta.items()
                                         if k not in ("sha256", "dirty")}))
    own_backup = env.database.snapshot_dir / "backup-before-migration.sql.gz"
    own_backup.write_bytes(gzip.compress(b"-- an operator's own dump\n"))
    os.utime(own_backup, (0, 0))  # 1970: expired by any age
    other_db = put(env, "20261101_000000", "other-env", age_days=31, expires_in_days=-24)
    other = other_db.with_name(other_db.name.replace("togather_togather_", "togather_billing_"))
    other_db.rename(other)
    meta = json.loads(other_db.with_name(other_db.name.replace(".sql.gz", ".meta.json"))
                      .read_text()) | {"database": "billing"}
    other.with_name(other.name.replace(".sql.gz", ".meta.json")).write_text(json.dumps(meta))
    result = snapshots.cleanup(env, now=NOW)
    assert names([s.path for s in result.removed]) == {older.name}
    assert newest.exists() and own_backup.exists() and other.exists()
    skipped = {p.name: why for p, why in result.skipped}
    assert "another tool's file" in skipped[own_backup.name]
    assert "database billing" in skipped[other.name]


def test_cleanup_keeps_the_newest_tooling_snapshot_with_a_sidecar_behind_failed_dumps(
        env: Environment) -> None:
    """Found by review: the tooling writes a sidecar (its size_mb, duration_seconds) only once
    its dump is done; a snapshot cron that broke (`pg_dump | gzip > FILE` left a gzip of
    nothing, no sidecar, every hour) made each failed dump "the newest snapshot", the one
    kept, and once the last good dump expired, cleanup deleted it: a host whose snapshots
    are all the tooling's (never "usable") kept only failed dumps."""
    record(env, "dep_a", "dep_b")
    good = put(env, "20261127_120000", "scheduled", version=None, age_days=10,
               expires_in_days=-3)
    meta_path = good.with_name(good.name.removesuffix(".sql.gz") + ".meta.json")
    meta = json.loads(meta_path.read_text())  # the tooling's: the contract's keys only
    meta_path.write_text(json.dumps({k: v for k, v in meta.items()
                                     if k not in ("sha256", "dirty")}))
    failed = []
    for days in (8, 1):  # a gzip of nothing, named as the tooling names them; no sidecar
        taken = NOW - timedelta(days=days)
        path = (env.database.snapshot_dir
                / f"togather_togather_{taken:%Y%m%d_%H%M%S}_scheduled.sql.gz")
        path.write_bytes(gzip.compress(b""))
        failed.append(path)
    result = snapshots.cleanup(env, now=NOW)
    assert names([s.path for s in result.removed]) == {failed[0].name}
    assert good.exists() and meta_path.exists() and failed[1].exists()
    why = {s.name: reason for s, reason in result.held}
    assert "sidecar" in why[good.name], why


def test_cleanup_keeps_what_the_schema_guard_would_restore_for_the_previous_deployment(
        env: Environment) -> None:
    """The previous deployment ran at schema 1 and has no pre-deploy snapshot of its own: the
    guard restores the newest usable snapshot at schema 1, which cleanup deleted (a newer one
    at schema 2 was the "newest usable"), so the rollback was then refused."""
    state = states.DeploymentState(environment=env.name)
    for n, (dep_id, schema) in enumerate((("dep_a", 1), ("dep_b", 2)), start=1):
        dep = states.make_deployment(f"{n:07x}", f"{n:040x}", Slot.BLUE, status="active",
                                     deployment_id=dep_id, migration_version=schema,
                                     deployed_at=NOW - timedelta(days=30 - n))
        state = states.after_deploy(state, dep)
    env.state_file.parent.mkdir(parents=True, exist_ok=True)
    states.write_state(env.state_file, state)
    at_1_old = put(env, "20261101_000000", "manual", version=1, age_days=31,
                   expires_in_days=-24)
    at_1 = put(env, "20261102_000000", "manual", version=1, age_days=30, expires_in_days=-23)
    at_2 = put(env, "20261103_000000", "manual", version=2, age_days=29, expires_in_days=-22)
    result = snapshots.cleanup(env, now=NOW)
    assert names([s.path for s in result.removed]) == {at_1_old.name}
    why = {s.name: reason for s, reason in result.held}
    assert "schema 1" in why[at_1.name] and "previous" in why[at_1.name]
    assert at_2.exists() and at_1.exists()
    assert snapshots.latest_before(env, 1) is not None


def test_the_default_restore_is_never_a_safety_snapshot(env: Environment) -> None:
    """Found by review: a restore whose replay failed (or was killed once it committed)
    left its safety snapshot as the newest; the rerun its message asks for restored that one
    (the current data onto itself, or the restore undone) and said it succeeded."""
    wanted = put(env, "20261201_100000", "manual", age_days=1)
    put(env, "20261202_110000", "pre-restore", age_days=0.1)
    assert snapshots.find(env).path == wanted
    only_safety = env.database.snapshot_dir
    wanted.unlink()
    with pytest.raises(snapshots.SnapshotError) as err:
        snapshots.find(env)
    assert "only safety or dirty snapshots" in err.value.message and only_safety.name in str(
        err.value)


@pytest.mark.parametrize("broken", ["missing", "garbage"])
def test_cleanup_keeps_everything_when_the_state_file_cannot_be_read(
        env: Environment, broken: str) -> None:
    if broken == "garbage":
        env.state_file.parent.mkdir(parents=True)
        env.state_file.write_text("{not json")
    first = put(env, "20261101_000000", "pre-deploy", deployment_id="dep_a", age_days=31,
                expires_in_days=-24)
    second = put(env, "20261102_000000", "manual", age_days=30, expires_in_days=-23)
    result = snapshots.cleanup(env, now=NOW)
    assert result.removed == [] and first.exists() and second.exists()
    assert len(result.warnings) == 1 and "state file" in result.warnings[0]
    assert "kept every snapshot" in result.warnings[0]
    assert {s.name for s, _ in result.held} == {first.name, second.name}


def test_the_pick_finds_the_go_clis_snapshot_path_written_through_another_folder_name(
        env: Environment, tmp_path: Path) -> None:
    """The Go CLI recorded the pre-deploy snapshot as `snapshot_path` under the folder's
    other name (a symlink; a container's mount point). Cleanup kept it by its name; the
    restore's pick compared whole paths and passed it over (found by review): with the
    schema unknown it found none (refused), with it known it took an older snapshot, whose
    restore loses the writes between the two."""
    alias = tmp_path / "snapshots-alias"
    alias.symlink_to(env.database.snapshot_dir)
    older = put(env, "20261130_100000", "manual", version=1, age_days=2)
    tooling = put(env, "20261201_100000", "pre-deploy", version=None, age_days=1)
    recorded = str(alias / tooling.name)
    for version in (None, 1):
        picked = snapshots.latest_before(env, version, snapshot_path=recorded)
        assert picked is not None and picked.path == tooling, (version, picked)
    assert snapshots.latest_before(env, 1) is not None
    assert snapshots.latest_before(env, 1).path == older  # nothing recorded: the newest at 1


# -- 2. an unknown target schema never picks a snapshot of another schema ----------------------

def test_unknown_version_picks_only_the_deployments_own_pre_deploy_snapshot(
        env: Environment) -> None:
    own = put(env, "20261201_100000", "pre-deploy", deployment_id="dep_current", version=None,
              age_days=1)
    put(env, "20261202_115500", "manual", version=2)  # 5 minutes ago, the current schema
    assert snapshots.latest_before(env, None, deployment_id="dep_current") is not None
    assert snapshots.latest_before(env, None, deployment_id="dep_current").path == own
    own.unlink()
    assert snapshots.latest_before(env, None, deployment_id="dep_current") is None
    assert snapshots.latest_before(env, None) is None


# -- 3. cleanup never crashes half-way on things that are not files ----------------------------

def test_cleanup_skips_directories_dangling_links_and_vanished_partials(
        env: Environment, monkeypatch: pytest.MonkeyPatch) -> None:
    record(env, "dep_current")
    folder = env.database.snapshot_dir
    expired = put(env, "20261101_000000", "manual", age_days=31, expires_in_days=-24)
    put(env, "20261202_000000", "manual")  # the newest, kept
    as_dir = folder / "togather_togather_20261001_000000_manual.sql.gz"
    as_dir.mkdir()
    (folder / "togather_togather_20261001_000000_manual.meta.json").write_text(
        json.dumps({"expires_at": "2026-10-08T00:00:00Z"}))
    (folder / "togather_togather_20261002_000000_x.sql.gz.partial").symlink_to(
        folder / "nowhere")
    vanishing = folder / "togather_togather_20261003_000000_y.sql.gz.partial"
    vanishing.write_bytes(b"half")
    old = (NOW - timedelta(days=3)).timestamp()
    os.utime(vanishing, (old, old))
    real_lstat = Path.lstat

    def lstat_after_removal(self: Path) -> os.stat_result:
        if self.name == vanishing.name and self.exists():
            self.unlink()  # a concurrent dump renamed its .partial away just now
        return real_lstat(self)

    monkeypatch.setattr(Path, "lstat", lstat_after_removal)
    result = snapshots.cleanup(env, now=NOW)
    assert [s.path for s in result.removed] == [expired] and not expired.exists()
    skipped = {p.name: why for p, why in result.skipped}
    assert as_dir.name in skipped and "directory" in skipped[as_dir.name]
    assert "togather_togather_20261002_000000_x.sql.gz.partial" in skipped
    assert vanishing.name in skipped and "vanished" in skipped[vanishing.name]
    assert as_dir.is_dir()


# -- 4. a convenience link is not a snapshot ------------------------------------------------------

def test_a_latest_symlink_is_not_listed_nor_the_default(env: Environment) -> None:
    folder = env.database.snapshot_dir
    older = put(env, "20261201_000000", "manual", age_days=1)
    newest = put(env, "20261202_000000", "manual")
    link = folder / "latest.sql.gz"
    link.symlink_to(newest.name)
    later = (NOW + timedelta(days=1)).timestamp()
    os.utime(newest, (later, later))
    listed = [s.name for s in snapshots.list_snapshots(env)]
    assert listed == [newest.name, older.name]
    assert snapshots.find(env).path == newest



def test_cleanup_keeps_what_a_symlink_it_keeps_leads_to(env: Environment) -> None:
    """Found by review: a protected snapshot that is a symlink (the current deployment's
    pre-deploy snapshot, linked to the dump it shares) did not protect its target in the
    folder, which cleanup deleted once expired, leaving the link to nothing. A link that
    stays (protected, or not expired) keeps what it leads to, each hop of a chain."""
    record(env, "dep_old", "dep_current")
    folder = env.database.snapshot_dir

    def as_link(path: Path, to: Path) -> Path:
        path.unlink()
        path.symlink_to(to.name if to.parent == folder else to)
        return path

    shared = put(env, "20261101_000000", "manual", age_days=30, expires_in_days=-23)
    as_link(put(env, "20261102_000000", "pre-deploy", deployment_id="dep_current",
                age_days=29, expires_in_days=-22), shared)
    # a fresh link, through a second link named by its path through `..`
    far = put(env, "20261103_000000", "manual", age_days=28, expires_in_days=-21)
    hop = as_link(put(env, "20261104_000000", "manual", age_days=27, expires_in_days=-20),
                  folder / ".." / folder.name / far.name)
    as_link(put(env, "20261128_000000", "manual", age_days=2), hop)
    gone = put(env, "20261105_000000", "manual", age_days=26, expires_in_days=-19)
    put(env, "20261129_000000", "manual", age_days=1)  # the newest
    result = snapshots.cleanup(env, now=NOW)
    assert [s.path for s in result.removed] == [gone] and not gone.exists()
    assert shared.exists() and far.exists() and hop.is_symlink() and hop.exists()
    why = {s.name: reason for s, reason in result.held}
    assert why[shared.name] == ("the symlink togather_togather_20261102_000000_pre-deploy"
                                ".sql.gz, kept, leads to it"), why
    assert "togather_togather_20261128_000000_manual.sql.gz, kept" in why[far.name], why


def test_the_default_pick_passes_over_a_dump_still_being_written_and_naming_it_refuses(
        env: Environment) -> None:
    """Found by review: the host's tooling writes its dump in place (`pg_dump | gzip >
    FILE`, its sidecar once done); the default restore picked it half-written, the newest,
    and refused it as incomplete, where a complete snapshot was there to restore. One a
    process holds open for writing is passed over (and said); named, it is refused; once its
    writer is done it is the pick again, as before."""
    import subprocess

    older = put(env, "20261201_000000", "manual", age_days=1)
    writing = (env.database.snapshot_dir  # begun a minute ago
               / f"togather_togather_{NOW - timedelta(minutes=1):%Y%m%d_%H%M%S}_scheduled.sql.gz")
    with writing.open("wb") as out:
        writer = subprocess.Popen(["gzip", "-c"], stdin=subprocess.PIPE, stdout=out)
    assert writer.stdin is not None
    try:
        writer.stdin.write(b"-- PostgreSQL database dump\n" * 1000)
        writer.stdin.flush()
        assert snapshots.find(env).path == older
        pick, passed = snapshots.default_pick(env)
        assert pick.path == older
        assert [(s.path, why) for s, why in passed] == [
            (writing, f"process {writer.pid} has it open for writing")]
        with pytest.raises(snapshots.SnapshotError) as err:
            snapshots.find(env, writing.name)
        said = str(err.value)
        assert err.value.exit_code == 4 and "\n" not in said, said
        assert said.startswith(f"snapshot {writing.name} is still being written (process "
                               f"{writer.pid} has it open for writing); nothing was changed"), said
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)
    assert snapshots.find(env).path == writing  # done: the newest, as before
    assert snapshots.find(env, writing.name).path == writing


def test_a_fifo_named_like_a_sidecar_is_never_waited_on(env: Environment) -> None:
    """Found by review: a FIFO named like a snapshot's sidecar hung every command that lists
    the snapshots (status, cleanup, a restore's pick) for ever; cleanup also read one whose
    dump is gone (a lone sidecar). It is that snapshot's problem, said at once, and left
    alone; a sidecar that is a symlink to a file is still read."""
    import time

    record(env, "dep_current")
    # both within the retention, whatever the day the test runs (fixed dates expired on
    # 2026-12-08 and cleanup removed the first: a time bomb in the test, not the code)
    day_one, day_two = ((NOW - timedelta(hours=h)).strftime("%Y%m%d_%H%M%S") for h in (48, 24))
    fifo_one = put(env, day_one, "manual")
    sidecar = fifo_one.with_name(fifo_one.name.removesuffix(".sql.gz") + ".meta.json")
    sidecar.unlink()
    os.mkfifo(sidecar)
    linked = put(env, day_two, "manual")
    moved = env.database.snapshot_dir.parent / "elsewhere.meta.json"
    meta = linked.with_name(linked.name.removesuffix(".sql.gz") + ".meta.json")
    meta.rename(moved)
    meta.symlink_to(moved)
    lone = env.database.snapshot_dir / "togather_togather_20261101_000000_manual.meta.json"
    os.mkfifo(lone)
    began = time.monotonic()
    with fifo_released_after(sidecar, 5.0), fifo_released_after(lone, 5.0):
        listed = {s.name: s for s in snapshots.list_snapshots(env)}
        result = snapshots.cleanup(env, now=NOW)
    assert time.monotonic() - began < 4.0, "waited on a FIFO"
    assert sidecar.exists() and lone.exists() and not result.orphans, result
    said = " ".join(listed[fifo_one.name].problems)
    assert f"cannot read {sidecar.name}" in said and "FIFO" in said, said
    assert listed[linked.name].problems == () and listed[linked.name].database == "togather"

# -- 5. a query string with '@' is not the password -----------------------------------------------

def test_an_at_sign_in_the_query_string_is_not_part_of_the_password() -> None:
    url = ("postgresql://togather:secretpw@localhost:5433/togather"
           "?application_name=a@b")
    database.check_url(url, "DATABASE_URL", "environment")  # no refusal
    assert database.password_of(url) == "secretpw"
    assert "secretpw" in database.secrets_of(url)


@pytest.mark.parametrize("url", [
    "postgresql://togather:p@ss/word@127.0.0.1:1/togather",
    "postgresql://togather:p@ss/word@127.0.0.1:1/togather?application_name=a@b",
    "postgresql://togather:pa?ss@127.0.0.1:1/togather",
    "postgresql://togather:p/w?application_name=x@127.0.0.1:1/togather",
])
def test_a_bare_delimiter_in_the_password_is_still_refused_without_printing_it(
        url: str) -> None:
    with pytest.raises(ConfigError) as err:
        database.check_url(url, "DATABASE_URL", "environment")
    password = url.split("togather:", 1)[1].rsplit("@127.0.0.1", 1)[0]
    assert password not in str(err.value) and "percent-encode" in str(err.value)
    assert "\n" not in err.value.message


# -- the command line says what it kept and why ---------------------------------------------------

def host_toml(env: Environment, tmp_path: Path) -> Path:
    """`env` as a host's environment file, for the command line."""
    toml = tmp_path / "production.toml"
    toml.write_text(f"""name = "production"
[state]
file = "{env.state_file}"
[lock]
dir = "{tmp_path / 'locks'}"
[logs]
dir = "{tmp_path / 'logs'}"
runs_dir = "{tmp_path / 'runs'}"
[slots.blue]
container = "togather-server-blue"
service = "togather-blue"
port = 8081
[slots.green]
container = "togather-server-green"
service = "togather-green"
port = 8082
[database]
snapshot_dir = "{env.database.snapshot_dir}"
""")
    return toml


def test_cli_cleanup_dry_run_names_what_it_keeps_and_why(env: Environment,
                                                         tmp_path: Path) -> None:
    import subprocess
    import sys

    record(env, "dep_old", "dep_current")
    pre = put(env, "20261122_120000", "pre-deploy", deployment_id="dep_current",
              age_days=10, expires_in_days=-3)
    gone = put(env, "20261121_120000", "manual", age_days=11, expires_in_days=-4)
    toml = host_toml(env, tmp_path)
    run = [sys.executable, "-m", "runbook.cli", "snapshot", "cleanup", str(toml), "--dry-run"]
    text = subprocess.run(run, capture_output=True, text=True, check=False, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert text.returncode == 0, text.stderr
    assert f"Would remove {gone.name}" in text.stdout
    assert f"Would keep {pre.name}" in text.stdout
    assert "the pre-deploy snapshot of the current deployment" in text.stdout
    as_json = subprocess.run([*run, "--format", "json"], capture_output=True, text=True,
                             check=False, timeout=120, stdin=subprocess.DEVNULL)
    data = json.loads(as_json.stdout)
    assert data["removed"] == [gone.name] and [h["name"] for h in data["held"]] == [pre.name]
    assert pre.exists() and gone.exists()


def test_cli_cleanup_waits_for_no_one_and_deletes_nothing_under_a_held_deploy_lock(
        env: Environment, tmp_path: Path) -> None:
    """Found by review: a cron cleanup deleted the expired snapshot a restore waiting at its
    prompt was about to replay. Under a held deploy lock it refuses (exit 3), deleting
    nothing; once the lock is free it cleans up."""
    import subprocess
    import sys

    from runbook import environment as envmod
    from runbook import lock as locks

    record(env, "dep_old", "dep_current")
    gone = put(env, "20261121_120000", "manual", age_days=11, expires_in_days=-4)
    put(env, "20261122_120000", "manual", age_days=10, expires_in_days=-3)  # the newest
    toml = host_toml(env, tmp_path)
    run = [sys.executable, "-m", "runbook.cli", "snapshot", "cleanup", str(toml), "--yes"]
    host = envmod.load(str(toml))
    held = locks.acquire(host, reason="snapshot restore")  # a restore at its prompt
    try:
        refused = subprocess.run(run, capture_output=True, text=True, check=False,
                                 timeout=120, stdin=subprocess.DEVNULL)
    finally:
        locks.release(host, held)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "deploy lock" in refused.stderr and gone.exists(), refused.stderr
    done = subprocess.run(run, capture_output=True, text=True, check=False, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert not gone.exists() and f"Removed {gone.name}" in done.stdout
    assert not host.lock_path.exists()  # released


def test_cli_cleanup_journals_what_it_deleted_and_a_refusal(env: Environment,
                                                            tmp_path: Path) -> None:
    """Found by review: `runbook snapshot cleanup --yes` deleted snapshots (under the deploy
    lock) outside run.perform, so no log line said what went, or who ran it. It writes the
    contract's lines now, for a lock refusal too; a dry run, which deletes nothing, writes
    none. Its output and exit codes are what they were."""
    import subprocess
    import sys

    from runbook import environment as envmod
    from runbook import lock as locks

    def log_lines() -> dict[str, list[dict[str, object]]]:
        return {p.name: [json.loads(line) for line in p.read_text().splitlines()]
                for p in (tmp_path / "logs").glob("*.log")}

    record(env, "dep_old", "dep_current")
    gone = put(env, "20261121_120000", "manual", age_days=11, expires_in_days=-4)
    put(env, "20261122_120000", "manual", age_days=10, expires_in_days=-3)  # the newest
    toml = host_toml(env, tmp_path)
    run = [sys.executable, "-m", "runbook.cli", "snapshot", "cleanup", str(toml)]
    dry = subprocess.run([*run, "--dry-run"], capture_output=True, text=True, check=False,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert dry.returncode == 0 and log_lines() == {}, dry.stderr
    host = envmod.load(str(toml))
    held = locks.acquire(host, reason="snapshot restore")
    try:
        refused = subprocess.run([*run, "--yes"], capture_output=True, text=True,
                                 check=False, timeout=120, stdin=subprocess.DEVNULL)
    finally:
        locks.release(host, held)
    assert refused.returncode == 3 and gone.exists(), refused.stderr
    (first,) = log_lines().values()
    assert first[-1]["message"] == "snapshot-cleanup failed (exit code 3)", first[-1]
    assert any(e["level"] == "ERROR" and "deploy lock" in str(e["message"]) for e in first)
    done = subprocess.run([*run, "--yes"], capture_output=True, text=True, check=False,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and not gone.exists(), done.stderr
    assert done.stdout.splitlines()[0].startswith(f"Removed {gone.name} (expired ")
    assert done.stderr == ""
    (second,) = [lines for lines in log_lines().values() if lines != first]
    assert str(second[0]["message"]).startswith("snapshot-cleanup started on production by ")
    removed = [e for e in second if e.get("snapshot")]
    assert [e["snapshot"] for e in removed] == [str(gone)], second
    assert second[-1]["message"] == "snapshot-cleanup success (exit code 0)"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_cleanup_goes_on_when_its_log_cannot_be_written_and_says_so(
        env: Environment, tmp_path: Path) -> None:
    """The journal never stands in a command's way: with the log folder unusable (a file
    where it should be), the cleanup deletes what it did before, exit 0, and says on stderr
    that this output is all there is of it."""
    import subprocess
    import sys

    record(env, "dep_old", "dep_current")
    gone = put(env, "20261121_120000", "manual", age_days=11, expires_in_days=-4)
    put(env, "20261122_120000", "manual", age_days=10, expires_in_days=-3)  # the newest
    toml = host_toml(env, tmp_path)
    (tmp_path / "logs").write_text("not a folder\n")
    done = subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", "cleanup",
                           str(toml), "--yes"], capture_output=True, text=True, check=False,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and not gone.exists(), done.stderr
    assert f"Removed {gone.name}" in done.stdout
    (warning,) = done.stderr.splitlines()
    assert warning.startswith("runbook: warning: the journal is incomplete: [logs] dir "
                              f"{tmp_path / 'logs'} is not a folder"), warning


def test_the_full_disk_hint_names_the_setting_that_is_read() -> None:
    from runbook.snapshots import store

    error = store.no_space(Path("/var/lib/togather/db-snapshots"), "the snapshot")
    assert error.fix and "[database] snapshot_dir" in error.fix
    assert "SNAPSHOT_DIR" not in error.fix  # the TOML's is read (SNAPSHOT_DIR must agree)


def test_cleanup_with_no_database_configured_deletes_nothing(
        env: Environment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing then tells this environment's snapshots from another's in a shared folder:
    fail closed, saying why."""
    expired = put(env, "20261101_000000", "manual", age_days=31, expires_in_days=-24)
    put(env, "20261102_000000", "manual", age_days=30, expires_in_days=-23)
    monkeypatch.delenv("DATABASE_URL")
    result = snapshots.cleanup(env, now=NOW)
    assert result.removed == [] and expired.exists()
    assert {why for _, why in result.skipped} == {
        "no database is configured, so nothing tells whose snapshot it is: left alone"}


def test_a_go_zero_time_in_a_sidecar_means_not_set_not_expired(env: Environment) -> None:
    """Found by review: a sidecar whose `expires_at` is Go's zero time (a Go tool's "not
    set") read as the year 1, so cleanup deleted a fresh snapshot at once."""
    record(env, "dep_a", "dep_b")
    older = put(env, "20261201_000000", "manual", age_days=1)
    put(env, "20261202_000000", "manual", age_days=0.5)  # the newest: kept whatever it says
    meta_path = older.with_name(older.name.replace(".sql.gz", ".meta.json"))
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text())
                                    | {"expires_at": "0001-01-01T00:00:00Z"}))
    result = snapshots.cleanup(env, now=NOW)
    assert result.removed == [] and older.exists()


@pytest.mark.parametrize("written", ["expires_at", "timestamp only"])
def test_a_sidecar_time_without_an_offset_never_expires_a_snapshot_early_west_of_utc(
        env: Environment, tmp_path: Path, written: str) -> None:
    """Found by review: a tool writing sidecar times in the host's local time without an
    offset (`2026-12-07T10:00:00`) had them read as UTC, so on a host west of UTC (here
    UTC-5) a snapshot expired hours early and `snapshot cleanup` deleted it. Such a time never
    expires one sooner than either reading (UTC, local) would; the name carries UTC."""
    import subprocess
    import sys

    record(env, "dep_old", "dep_current")
    put(env, "20261129_120000", "manual", age_days=0.5)  # the newest, kept whatever it says
    taken = NOW - timedelta(days=7, hours=-2)  # with 7 days' retention: expires in 2 h
    snap = put(env, f"{taken:%Y%m%d_%H%M%S}", "scheduled",
               age_days=(NOW - taken) / timedelta(days=1))
    local = timezone(timedelta(hours=-5))  # the host's zone: TZ=EST5 below

    def naive(when: datetime) -> str:
        return when.astimezone(local).strftime("%Y-%m-%dT%H:%M:%S")

    meta_path = snap.with_name(snap.name.replace(".sql.gz", ".meta.json"))
    meta = json.loads(meta_path.read_text()) | {"timestamp": naive(taken)}
    if written == "expires_at":
        meta["expires_at"] = naive(taken + timedelta(days=7))
    else:
        del meta["expires_at"]  # retention_days 7 stays
    meta_path.write_text(json.dumps(meta))
    toml = host_toml(env, tmp_path)
    west = os.environ | {"TZ": "EST5"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", *args,
                               str(toml)], capture_output=True, text=True, check=False,
                              timeout=120, stdin=subprocess.DEVNULL, env=west)

    done = cli("cleanup", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert snap.exists() and snap.name not in done.stdout, done.stdout
    listed = cli("list", "--format", "json")
    [row] = [r for r in json.loads(listed.stdout) if r["name"] == snap.name]
    assert row["timestamp"] == f"{taken:%Y-%m-%dT%H:%M:%SZ}", row
    assert row["expires_at"] == f"{taken + timedelta(days=7):%Y-%m-%dT%H:%M:%SZ}", row


def test_an_unfinished_dump_is_reported_not_silently_passed_over(env: Environment) -> None:
    """Found by review: a dump killed an hour ago leaves a database-sized hidden `.partial`
    (what may be filling the disk when the next snapshot fails for space); cleanup, which that
    error names, skipped it without a word. It is left (it may still be written) and said."""
    record(env, "dep_a", "dep_b")
    partial = env.database.snapshot_dir / ".togather_togather_20261202_100000_pre-deploy.partial"
    partial.write_bytes(b"\0" * (3 * 1024 * 1024))
    result = snapshots.cleanup(env, now=NOW)
    said = {p.name: why for p, why in result.skipped}
    assert partial.exists() and "unfinished dump (3 MiB)" in said[partial.name], said


def test_cleanup_removes_only_its_own_leftovers(env: Environment) -> None:
    """Found by review: every `*.meta.json` without a dump counted as an orphan (an operator's
    `fresh-notes.meta.json`, created a moment ago, read as expired since 1970), and so did
    another database's lone sidecar and any `*.partial` a day old. Only this database's
    contract-named sidecars and this tool's own partial dumps are its leftovers."""
    record(env, "dep_a", "dep_b")
    folder = env.database.snapshot_dir
    ours = put(env, "20261001_000000", "manual", age_days=60, expires_in_days=-53)
    ours_meta = ours.with_name(ours.name.removesuffix(".sql.gz") + ".meta.json")
    ours.unlink()  # a lone sidecar of this database's, expired: an orphan
    notes = folder / "fresh-notes.meta.json"
    notes.write_text('{"note": "an operator\'s own"}')
    other = folder / "togather_billing_20190101_000000_x.meta.json"
    other.write_text(json.dumps({"database": "billing", "expires_at": "2019-01-08T00:00:00Z"}))
    partial = folder / "weird name.partial"
    partial.write_bytes(b"an operator's download")
    os.utime(partial, (0, 0))
    result = snapshots.cleanup(env, now=NOW)
    assert [p.name for p in result.orphans] == [ours_meta.name], result.orphans
    assert notes.exists() and other.exists() and partial.exists()
    assert not ours_meta.exists()
    skipped = {p.name for p, why in result.skipped if "left alone" in why}
    assert {notes.name, other.name, partial.name} <= skipped, result.skipped  # and said


@needs_root
def test_a_snapshot_folder_this_user_cannot_list_is_said_never_read_as_empty() -> None:
    """Found by review: a 0700 folder (the mode the runbook creates it with) read by another
    user listed as "No snapshots" (exit 0), and a rollback then said "no snapshot at schema N
    exists: ... or pass --force". Now every reader says it cannot read the folder (exit 4);
    the schema guard's evidence says so too. The reader is a real unprivileged user."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="togather-perm-", dir="/tmp"))  # searchable by all
    base.chmod(0o755)
    folder = base / "db-snapshots"
    folder.mkdir()
    (folder / "togather_togather_20261101_000000_manual.sql.gz").write_bytes(
        gzip.compress(b"-- dump\n"))
    folder.chmod(0o700)  # root's
    imports = ("import dataclasses, json, sys\nfrom pathlib import Path\n"
               "from runbook import snapshots\nfrom runbook.errors import RunbookError\n"
               "from tests.drill_checks import host_env\n"
               "base = host_env(Path(sys.argv[1]))\n"
               "env = base.with_(database=dataclasses.replace(base.database, "
               "snapshot_dir=Path(sys.argv[1]) / 'db-snapshots'))\n")
    code = ("out = []\n"
            "for call in (lambda: snapshots.list_snapshots(env),\n"
            "             lambda: snapshots.find(env, 'togather_togather_20261101_000000_"
            "manual')):\n"
            "    try:\n"
            "        out.append(['listed', len(call())])\n"
            "    except RunbookError as exc:\n"
            "        out.append([int(exc.exit_code), exc.message])\n"
            "print(json.dumps(out))\n")
    try:
        said = json.loads(as_deploy_user([DEPLOY_UID], imports, code, str(base)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for code_, message in said:
        assert code_ == 4 and "cannot read the snapshot folder" in message, said


def test_cleanup_keeps_the_sidecar_the_schema_guard_reads_the_targets_schema_from(
        env: Environment) -> None:
    """Found by review: deployments recorded by the tooling name no migration version, so
    the schema guard reads the rollback target's from a sidecar taken while it was live.
    Cleanup kept only "the newest usable" and deleted that witness once expired: the guard
    then said "not checked (version not known)" and the restore point was gone."""
    record(env, "dep_a", "dep_b")  # no migration_version: the previous one is dep_a
    witness = put(env, "20261103_120000", "manual", version=1, age_days=29.5,
                  expires_in_days=-22)  # taken while dep_a was live, at schema 1
    newest = put(env, "20261202_000000", "manual", version=2, age_days=1, expires_in_days=-1)
    from runbook import migration_source

    state = states.read_state(env.state_file, environment=env.name)
    assert state.previous is not None and state.current is not None
    found = migration_source.from_sidecars(env, state.previous, state.current)
    assert found is not None and found.version == 1  # the premise: the guard's witness
    result = snapshots.cleanup(env, now=NOW)
    assert witness.exists() and newest.exists(), [s.name for s in result.removed]
    held = {s.path.name: why for s, why in result.held}
    assert "schema guard" in held[witness.name], held


def test_another_environments_snapshots_in_a_shared_folder_are_never_ours(
        env: Environment) -> None:
    """Found by review: two environments with the same database name share the default
    folder. Only the database name was compared, so cleanup deleted staging's expired
    pre-deploy snapshot of its current deployment (which production's state file does not
    protect), and the default restore and the schema witnesses used staging's snapshots."""
    record(env, "dep_old", "dep_current")
    theirs = put(env, "20261128_120000", "pre-deploy", deployment_id="dep_staging_current",
                 age_days=5, expires_in_days=-1, environment="staging")
    ours = put(env, "20261120_120000", "manual", age_days=13, environment=env.name)
    assert [s.path for s in snapshots.own_snapshots(env)] == [ours]
    assert snapshots.find(env).path == ours  # the default restore: ours, though older
    result = snapshots.cleanup(env, now=NOW)
    assert theirs.exists() and theirs.with_name(
        theirs.name.replace(".sql.gz", ".meta.json")).exists()
    assert any(p == theirs and "taken in staging" in why for p, why in result.skipped), \
        result.skipped


def on_server(snapshot: Path, host: str | None, port: object) -> Path:
    """`snapshot`'s sidecar naming the server it was dumped from, as the tooling writes it
    (None: the key left out, as an older sidecar does)."""
    meta_path = snapshot.with_name(snapshot.name.removesuffix(".sql.gz") + ".meta.json")
    meta = json.loads(meta_path.read_text()) | {"host": host, "port": port}
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    return snapshot


def test_another_servers_snapshot_of_the_same_database_name_is_never_picked_nor_listed(
        env: Environment) -> None:
    """Found by review: two environments on one host, each with its own Postgres server, the
    same database name and the default folder; the tooling's sidecars name the database, host
    and port, never the environment. The newest snapshot, the other server's (port 5434),
    was the default restore, the rollback's pick and a schema witness of this one
    (localhost:5432)."""
    record(env, "dep_old", "dep_current")
    ours = put(env, "20261120_120000", "manual", age_days=13)
    theirs = on_server(put(env, "20261128_120000", "manual", age_days=5), "localhost", 5434)
    assert [s.path for s in snapshots.own_snapshots(env)] == [ours]
    assert snapshots.find(env).path == ours
    assert snapshots.latest_before(env, 1) == snapshots.load(ours)
    assert snapshots.whose(env, snapshots.load(theirs)) == (  # what `snapshot list` says
        "a snapshot of database togather on port 5434, not 5432")


def test_a_moved_databases_older_snapshot_is_refused_saying_where_each_is_and_how_to_accept(
        env: Environment) -> None:
    """The database moved (from localhost:5434 to the URL's localhost:5432): its older
    snapshots were refused as "of database 'togather' on port 5434, not 5432", with the fix
    "if this server moved, correct host and port in the snapshot's .meta.json" - the wrong
    fix: the sidecar is right, it says where the dump came from. The refusal says where the
    snapshot was taken from and where the database is now, and the restore accepts it when
    on-call says that server is this database, moved (`--moved-from HOST:PORT`); another
    address given is still refused."""
    from runbook.snapshots.verify import verify

    record(env, "dep_a", "dep_b")
    dump = tooling_dump(env, "dep_b", 7)
    on_server(dump, "localhost", 5434)
    snap = snapshots.load(dump)
    with pytest.raises(snapshots.SnapshotError) as err:
        verify(env, snap)
    message, fix = err.value.message, str(err.value.fix)
    assert "\n" not in message and message.endswith("nothing was changed"), message
    assert "was taken from localhost:5434" in message, message
    assert "is now on localhost:5432" in message, message
    assert ".meta.json" not in fix and "correct" not in fix, fix
    assert "--moved-from localhost:5434" in fix, fix
    assert verify(env, snap, moved_from="localhost:5434").migration_version == 7
    assert verify(env, snap, moved_from="127.0.0.1:5434").migration_version == 7  # one host
    for other in ("localhost:5435", "db2:5434"):
        with pytest.raises(snapshots.SnapshotError, match="was taken from localhost:5434"):
            verify(env, snap, moved_from=other)


def test_a_sidecar_naming_this_server_another_way_or_none_is_ours(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loopback names are one server, a URL without a port is on 5432, and a sidecar
    naming no server (written before the tooling recorded one) is matched by its database
    name, as before; a port written as text is the same port."""
    for n, (url, host, port) in enumerate((
            ("postgresql://togather:secret@localhost/togather", "127.0.0.1", 5432),
            ("postgresql://togather:secret@127.0.0.1:5433/togather", "localhost", "5433"),
            ("postgresql://togather:secret@[::1]:5433/togather", "localhost", 5433),
            ("postgresql://togather:secret@togather-db:5432/togather", None, None),
            ("postgresql://togather:secret@TOGATHER-DB:5432/togather", "togather-db", 5432))):
        monkeypatch.setenv("DATABASE_URL", url)
        (tmp_path / f"host{n}").mkdir()
        base = host_env(tmp_path / f"host{n}")
        folder = tmp_path / f"host{n}" / "db-snapshots"
        folder.mkdir()
        env = base.with_(database=dataclasses.replace(base.database, snapshot_dir=folder))
        snap = on_server(put(env, "20261120_120000", "manual", age_days=1), host, port)
        assert [s.path for s in snapshots.own_snapshots(env)] == [snap], (url, host, port)


@pytest.mark.parametrize(("host", "port"), [("localhost", 5434), ("db2.internal", 5432),
                                            ("localhost", "not-a-port")])
def test_cleanup_leaves_another_servers_expired_pre_deploy_snapshot_alone(
        env: Environment, host: str, port: object) -> None:
    """Found by review: this environment's cleanup deleted the other server's expired
    pre-deploy snapshot of its current deployment (the one its rollback restores): only this
    environment's state file decided what to keep. One whose port cannot be read may be
    anyone's: left alone too."""
    record(env, "dep_old", "dep_current")
    put(env, "20261204_120000", "manual", age_days=1)
    theirs = on_server(put(env, "20261120_095900", "pre-deploy", deployment_id="dep_theirs",
                           age_days=15, expires_in_days=-8), host, port)
    result = snapshots.cleanup(env, now=NOW)
    assert result.removed == [] and theirs.exists(), [s.name for s in result.removed]
    skipped = {p.name: why for p, why in result.skipped}
    assert "left alone" in skipped[theirs.name] and str(port) in skipped[theirs.name], skipped


def test_cleanup_leaves_another_servers_lone_sidecar_alone(env: Environment) -> None:
    """Found by review: an expired sidecar whose dump is gone was removed when its database
    name was this one's, whatever server or environment it names; ours still goes."""
    theirs = on_server(put(env, "20261101_000000", "pre-deploy", age_days=31,
                           expires_in_days=-24), "localhost", 5434)
    staging = put(env, "20261101_000001", "pre-deploy", age_days=31, expires_in_days=-24,
                  environment="staging")
    ours = on_server(put(env, "20261101_000002", "pre-deploy", age_days=31,
                         expires_in_days=-24), "127.0.0.1", 5432)
    for dump in (theirs, staging, ours):
        dump.unlink()
    sidecars = {p: p.with_name(p.name.removesuffix(".sql.gz") + ".meta.json")
                for p in (theirs, staging, ours)}
    result = snapshots.cleanup(env, now=NOW)
    assert sidecars[theirs].exists() and sidecars[staging].exists()
    assert not sidecars[ours].exists()
    assert names(result.orphans) == {sidecars[ours].name}


def test_cleanup_keeps_a_killed_restores_safety_snapshot_the_only_copy_of_the_data_before_it(
        env: Environment, tmp_path: Path) -> None:
    """A restore killed after its replay began leaves the data from before it only in its
    safety snapshot, until a run finishes the job. Expired and no longer the newest, it was
    deleted by the next cron cleanup. Kept now, with why; once a run has ended after it, the
    ordinary retention applies again. The killed run's record is written by the journal, as
    a real run writes it, and left "running" as a kill leaves it."""
    import subprocess
    import sys

    from runbook import environment as envmod
    from runbook import journal

    record(env, "dep_old", "dep_current")
    safety = put(env, "20261120_120000", "pre-restore", age_days=12, expires_in_days=-5)
    put(env, "20261122_120000", "manual", age_days=10, expires_in_days=-3)  # the newest
    toml = host_toml(env, tmp_path)
    host = envmod.load(str(toml))
    killed = journal.Journal.open(host, "snapshot-restore", run_id="restore_killed_1")
    with killed.step("stop-app-slots", "Stop the app slots"):
        pass
    with killed.step("safety-snapshot", "Take a safety snapshot") as step:
        step.detail(safety_snapshot=str(safety))
    replaying = killed.step("restore-database", "Replace the database")
    replaying.__enter__()  # killed here: the record says "running", this step started
    run = [sys.executable, "-m", "runbook.cli", "snapshot", "cleanup", str(toml)]
    dry = subprocess.run([*run, "--dry-run"], capture_output=True, text=True, check=False,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert dry.returncode == 0, dry.stderr
    assert f"Would keep {safety.name}" in dry.stdout, dry.stdout
    assert "restore_killed_1" in dry.stdout and "the only copy of the data" in dry.stdout
    done = subprocess.run([*run, "--yes"], capture_output=True, text=True, check=False,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert safety.exists() and safety.with_name(
        "togather_togather_20261120_120000_pre-restore.meta.json").exists(), done.stdout
    # a rerun refused before its own restore (other sessions connected; found by review:
    # it ended the protection) changes nothing of it
    refused = journal.Journal.open(host, "snapshot-restore", run_id="restore_refused_2")
    with refused.step("stop-app-slots", "Stop the app slots"):
        pass
    with contextlib.suppress(RuntimeError), refused.step("safety-snapshot", "Take a safety "
                                                         "snapshot"):
        raise RuntimeError("other sessions are connected")
    refused.finish("failed", 1)
    os.utime(refused.record_path, (newest := killed.record_path.stat().st_mtime + 30, newest))
    kept = subprocess.run([*run, "--yes"], capture_output=True, text=True, check=False,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert kept.returncode == 0 and safety.exists(), kept.stdout + kept.stderr
    # a later run finished the job (its own record ended): the killed one no longer tells
    later = journal.Journal.open(host, "snapshot-restore", run_id="restore_later_3")
    with later.step("stop-app-slots", "Stop the app slots"):
        pass
    with later.step("restore-database", "Replace the database"):
        pass
    later.finish("succeeded", 0)
    newer = killed.record_path.stat().st_mtime + 60  # listed after it (NOW is import time)
    os.utime(later.record_path, (newer, newer))
    again = subprocess.run([*run, "--yes"], capture_output=True, text=True, check=False,
                           timeout=120, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr
    assert not safety.exists() and f"Removed {safety.name}" in again.stdout, again.stdout


def killed_restore_host(env: Environment, tmp_path: Path, action: str, run_id: str,
                        **safety: str) -> tuple[Path, Environment, Journal]:
    """A host's environment file (host_toml), its Environment, and the run record of a
    restore run `run_id` killed once its safety snapshot (`safety`: the step's details) was
    taken: the caller adds the steps it reached."""
    from runbook import environment as envmod
    from runbook import journal

    toml = host_toml(env, tmp_path)
    host = envmod.load(str(toml))
    killed = journal.Journal.open(host, action, run_id=run_id)
    with killed.step("safety-snapshot", "Take a safety snapshot") as step:
        step.detail(**safety)
    return toml, host, killed


def test_a_run_record_with_wrongly_typed_step_names_is_another_tools_and_passed_over(
        env: Environment, tmp_path: Path) -> None:
    """Found by review: a JSON file of another tool's in the runs folder, whose step `name` is
    a list, crashed the reading of the records (TypeError: unhashable list): `snapshot
    cleanup --dry-run` exited 5, a restore's planning failed. It is passed over as the other
    files of others are, and the killed restore's record behind it still tells."""
    import subprocess
    import sys

    from runbook.snapshot_restore import kept_for_killed_restore, killed_restore

    record(env, "dep_old", "dep_current")
    safety = put(env, "20261120_120000", "pre-restore", age_days=12, expires_in_days=-5)
    put(env, "20261122_120000", "manual", age_days=10, expires_in_days=-3)  # the newest
    toml, host, killed = killed_restore_host(env, tmp_path, "snapshot-restore",
                                             "restore_killed_1", safety_snapshot=str(safety))
    killed.step("restore-database", "Replace the database").__enter__()  # killed here
    foreign = host.runs_dir / "other-tool.json"
    foreign.write_text(json.dumps({"outcome": "running", "steps": [
        {"name": ["restore-database"], "status": "ok"}, {"name": {"a": 1}}]}))
    newer = killed.record_path.stat().st_mtime + 30  # read first
    os.utime(foreign, (newer, newer))
    found = killed_restore(host, None)
    assert found is not None and found["run_id"] == "restore_killed_1", found
    assert safety.name in kept_for_killed_restore(host)
    dry = subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", "cleanup",
                          str(toml), "--dry-run"], capture_output=True, text=True,
                         check=False, timeout=120, stdin=subprocess.DEVNULL)
    assert dry.returncode == 0, dry.stderr
    assert f"Would keep {safety.name}" in dry.stdout, dry.stdout


def test_cleanup_on_a_terminal_shows_what_would_go_and_asks(
        env: Environment, tmp_path: Path) -> None:
    """Found by review: `snapshot cleanup` deleted at once on a terminal, though README says
    it asks and --yes is "do not ask for confirmation". It shows the dry run's list and asks;
    "n" deletes nothing (exit 2, as every declined prompt), "y" deletes what it listed."""
    import pty
    import subprocess
    import sys

    record(env, "dep_old", "dep_current")
    old = put(env, "20261110_120000", "manual", age_days=20, expires_in_days=-13)
    put(env, "20261129_120000", "manual", age_days=1)  # the newest, kept
    toml = host_toml(env, tmp_path)

    def on_terminal(answer: bytes) -> subprocess.CompletedProcess[str]:
        primary, replica = pty.openpty()
        try:
            os.write(primary, answer)
            return subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", "cleanup",
                                   str(toml)], capture_output=True, text=True, check=False,
                                  timeout=120, stdin=replica)
        finally:
            os.close(primary)
            os.close(replica)

    declined = on_terminal(b"n\n")
    assert declined.returncode == 2 and "not confirmed" in declined.stderr, declined.stderr
    assert f"Would remove {old.name}" in declined.stdout, declined.stdout
    assert "Proceed?" in declined.stderr and old.exists()
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").iterdir())
    done = on_terminal(b"y\n")
    assert done.returncode == 0, done.stderr
    assert f"Removed {old.name}" in done.stdout and not old.exists(), done.stdout


def test_cleanup_after_the_prompt_removes_only_what_the_prompt_showed(
        env: Environment) -> None:
    """Found by review: after the "y", the cleanup decided again under the lock, so a
    snapshot that expired while the prompt waited was deleted without being shown. Only the
    names shown go; the other is kept, said, and left to the next cleanup."""
    record(env, "dep_old", "dep_current")
    shown = put(env, "20261110_120000", "manual", age_days=20, expires_in_days=-13)
    since = put(env, "20261111_120000", "manual", age_days=19, expires_in_days=-12)
    put(env, "20261129_120000", "manual", age_days=1)  # the newest, kept
    result = snapshots.cleanup(env, only={shown.name})
    assert not shown.exists() and since.exists()
    assert [s.name for s in result.removed] == [shown.name]
    assert any(s.name == since.name and "shown at the prompt" in why for s, why in result.held)


def leftovers(env: Environment, stamp: str) -> tuple[Path, Path]:
    """(a lone expired sidecar of this database's, a killed dump's partial an hour old):
    what cleanup removes besides snapshots."""
    snap = put(env, stamp, "manual", age_days=30, expires_in_days=-23)
    snap.unlink()
    partial = env.database.snapshot_dir / f".{snap.name}.0a1b2c3d.partial"
    partial.write_bytes(b"\0" * 4096)  # nobody flocks it: its writer was killed
    past = (NOW - timedelta(hours=1)).timestamp()
    os.utime(partial, (past, past))
    return snap.with_name(snap.name.replace(".sql.gz", ".meta.json")), partial


def test_cleanup_after_the_prompt_removes_no_leftover_the_prompt_did_not_show(
        env: Environment) -> None:
    """Found by review: the prompt's list is kept to, for snapshots; a leftover (a killed
    dump's partial, a lone sidecar) found after it was shown was removed unshown. Only the
    leftovers shown go; the others are said, and left to the next cleanup."""
    record(env, "dep_old", "dep_current")
    put(env, "20261129_120000", "manual", age_days=1)  # the newest, kept
    shown_meta, shown_partial = leftovers(env, "20261101_120000")
    late_meta, late_partial = leftovers(env, "20261102_120000")
    result = snapshots.cleanup(env, only={shown_meta.name, shown_partial.name})
    assert names(result.orphans) == {shown_meta.name, shown_partial.name}, result.orphans
    assert not shown_meta.exists() and not shown_partial.exists()
    assert late_meta.exists() and late_partial.exists()
    said = {p.name: why for p, why in result.skipped}
    for late in (late_meta, late_partial):
        assert said[late.name] == ("a leftover since the list was shown at the prompt: the "
                                   "next cleanup removes it"), said


def test_cli_cleanup_at_the_prompt_removes_the_leftovers_it_listed_and_no_other(
        env: Environment, tmp_path: Path) -> None:
    """The prompt lists the leftovers it would remove; a "y" removes those, and one that
    appeared while the prompt waited (a dump killed meanwhile) is kept and said."""
    import pty
    import select
    import subprocess
    import sys

    record(env, "dep_old", "dep_current")
    put(env, "20261129_120000", "manual", age_days=1)  # the newest, kept
    shown_meta, shown_partial = leftovers(env, "20261101_120000")
    toml = host_toml(env, tmp_path)
    primary, replica = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "runbook.cli", "snapshot", "cleanup",
                                 str(toml)], stdin=replica, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proc.stderr is not None
        asked = b""
        while b"Proceed?" not in asked:  # waiting at the prompt
            ready, _, _ = select.select([proc.stderr], [], [], 120)
            chunk = os.read(proc.stderr.fileno(), 4096) if ready else b""
            assert chunk, (asked, proc.poll())
            asked += chunk
        late_meta, late_partial = leftovers(env, "20261102_120000")
        os.write(primary, b"y\n")
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(primary)
        os.close(replica)
    text = out.decode()
    assert proc.returncode == 0, text + err.decode()
    for shown in (shown_meta, shown_partial):
        assert f"Would remove leftover {shown.name}" in text, text
        assert f"Removed leftover {shown.name}" in text and not shown.exists(), text
    for late in (late_meta, late_partial):
        assert late.exists() and f"Skipped {late.name}: a leftover since the list was shown" \
            in text, text


def test_cleanup_dry_run_meets_the_deploy_lock_as_the_real_run_does(
        env: Environment, tmp_path: Path) -> None:
    """Found by review: with a live holder of the deploy lock the dry run said "Would remove
    ..." (exit 0) while the real run refuses (exit 3): a dry run says what the run would meet."""
    import subprocess
    import sys

    from runbook import environment as envmod
    from runbook import lock as locks

    record(env, "dep_old", "dep_current")
    old = put(env, "20261110_120000", "manual", age_days=20, expires_in_days=-13)
    put(env, "20261129_120000", "manual", age_days=1)
    toml = host_toml(env, tmp_path)
    held = locks.acquire(envmod.load(str(toml)), reason="a deploy under way")  # alive: us
    try:
        run = [sys.executable, "-m", "runbook.cli", "snapshot", "cleanup", str(toml)]
        dry, real = (subprocess.run([*run, flag], capture_output=True, text=True, check=False,
                                    timeout=120, stdin=subprocess.DEVNULL)
                     for flag in ("--dry-run", "--yes"))
        assert real.returncode == 3, real.stderr
        assert dry.returncode == 3 and "a deploy under way" in dry.stderr, dry.stdout + dry.stderr
        assert "Would remove" not in dry.stdout and old.exists()
    finally:
        held.release()


def test_cleanup_keeps_what_the_hosts_snapshot_retention_days_keeps(
        env: Environment, tmp_path: Path) -> None:
    """Found by review: the host's SNAPSHOT_RETENTION_DAYS=30 was ignored, so `snapshot
    cleanup` (cron) expired after 7 days a sidecar without expires_at, even one whose own
    retention_days says 60. The env file's value is the retention when the TOML sets none,
    and a sidecar's own retention_days comes first."""
    import subprocess
    import sys

    record(env, "dep_a", "dep_b")
    env_file = tmp_path / ".env.production"
    env_file.write_text("DATABASE_URL=postgresql://togather:secret@localhost:5432/togather\n"
                        "SNAPSHOT_RETENTION_DAYS=30\n")
    env_file.chmod(0o600)

    def without(path: Path, *keys: str, **changes: object) -> Path:
        meta_path = path.with_name(path.name.replace(".sql.gz", ".meta.json"))
        meta = {k: v for k, v in json.loads(meta_path.read_text()).items() if k not in keys}
        meta_path.write_text(json.dumps(meta | changes))
        return path

    # neither expires_at nor retention_days (a partial sidecar): the host's 30 days apply
    bare = without(put(env, "20261120_000000", "manual", age_days=10),
                   "expires_at", "retention_days")
    # taken to be kept 60 days, by its own word (not the environment's 30); no expires_at
    own = without(put(env, "20261021_000000", "manual", age_days=40), "expires_at",
                  retention_days=60)
    old = without(put(env, "20261020_000000", "manual", age_days=40), "expires_at",
                  retention_days=30)  # past its 30 days: goes
    put(env, "20261129_000000", "manual", age_days=1)  # the newest
    toml = host_toml(env, tmp_path)
    toml.write_text(toml.read_text() + f'env_file = "{env_file}"\n')
    done = subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", "cleanup",
                           str(toml), "--yes"], capture_output=True, text=True, check=False,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    assert bare.exists() and own.exists(), done.stdout
    assert not old.exists() and f"Removed {old.name}" in done.stdout, done.stdout


@pytest.mark.parametrize("garbage", ["nested", "expires_at", "timestamp", "lone nested"])
def test_a_garbage_sidecar_is_a_named_problem_not_a_crash(
        env: Environment, tmp_path: Path, garbage: str) -> None:
    """Found by review: a sidecar of 100,000 nested `[` (RecursionError) or a time beyond
    year 9999 once in UTC (`9999-12-31T23:00:00-05:00`: OverflowError) ended `snapshot list`
    and `snapshot cleanup` (a cron job) in exit 5. Listed now with the problem named, and
    nothing lost: the far-future expiry is kept; a dump whose sidecar cannot be read expires
    by its name's date, as any unreadable sidecar's does."""
    import subprocess
    import sys

    record(env, "dep_a", "dep_b")

    def stamp(days: float) -> str:  # named as taken `days` ago (an unreadable sidecar's age)
        return (NOW - timedelta(days=days)).strftime("%Y%m%d_%H%M%S")

    bad = put(env, stamp(2), "manual", age_days=2)
    meta_path = bad.with_name(bad.name.replace(".sql.gz", ".meta.json"))
    meta = json.loads(meta_path.read_text())
    far = "9999-12-31T23:00:00-05:00"
    if garbage in ("nested", "lone nested"):
        meta_path.write_text("[" * 100_000)
    else:
        meta_path.write_text(json.dumps(meta | {garbage: far}))
    if garbage == "lone nested":
        bad.unlink()  # a sidecar whose dump is gone
    put(env, stamp(0.5), "manual", age_days=0.5)
    toml = host_toml(env, tmp_path)
    for command in (["list"], ["list", "--format", "json"], ["cleanup", "--dry-run"],
                    ["cleanup", "--yes"]):
        done = subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", *command,
                               str(toml)], capture_output=True, text=True, check=False,
                              timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, (command, done.stdout + done.stderr)
        assert "Traceback" not in done.stderr
        if command == ["list", "--format", "json"] and garbage != "lone nested":
            [listed] = [s for s in json.loads(done.stdout)
                        if s["name"] == bad.name]
            said = " ".join(listed["problems"])
            assert ("nested too deeply" in said if garbage == "nested"
                    else f"{garbage} {far!r} is out of range" in said), listed
    assert meta_path.exists()
    assert garbage == "lone nested" or bad.exists()


def test_a_sidecar_dated_near_year_9999_is_listed_and_kept(env: Environment,
                                                           tmp_path: Path) -> None:
    """Found by review: a sidecar taken "9999-12-31" with no expires_at overflowed the
    expiry's date: `snapshot list` and `snapshot cleanup` (a cron job) ended in exit 5."""
    import subprocess
    import sys

    record(env, "dep_a", "dep_b")
    far = put(env, "20261201_000000", "manual", age_days=1)
    meta_path = far.with_name(far.name.replace(".sql.gz", ".meta.json"))
    meta = json.loads(meta_path.read_text())
    meta.pop("expires_at")
    meta_path.write_text(json.dumps(meta | {"timestamp": "9999-12-31T23:59:59Z"}))
    put(env, "20261202_000000", "manual", age_days=0.5)
    toml = host_toml(env, tmp_path)
    for command in (["list"], ["cleanup", "--dry-run"]):
        done = subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", *command,
                               str(toml)], capture_output=True, text=True, check=False,
                              timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        said = far.name if command == ["list"] else "Would remove 0 snapshot(s)"
        assert said in done.stdout, done.stdout
    assert snapshots.cleanup(env, now=NOW).removed == [] and far.exists()


# -- a snapshot dated in the future is never "the newest" silently ---------------------------------
# The host clock ran 2 h fast (an RTC kept in local time before NTP synced) while one snapshot
# was taken; NTP set it back; another was taken an hour later. The older one's name, sidecar
# and mtime all carry the fast clock, so it sorted first: both default picks restored it and
# dropped the newer writes, and the plan said it was "taken 0s ago".

def future_pair(env: Environment, *, reason: str = "manual",
                deployment_id: str = "") -> tuple[Path, Path]:
    """(taken an hour ago under a clock 2 h fast: dated 1 h ahead, taken 5 minutes ago)."""
    ahead = put(env, "20261205_022954", reason, age_days=-1 / 24,
                deployment_id=deployment_id)
    os.utime(ahead, ((NOW + timedelta(hours=1)).timestamp(),) * 2)  # the fast clock's too
    recent = put(env, "20261205_012454", reason, age_days=5 / 1440,
                 deployment_id=deployment_id)
    return ahead, recent


def future_re() -> str:
    """How far future_pair's first snapshot is dated ahead of the clock now (NOW + 1 h: NOW
    is this module's import time, minutes before on a busy suite), give or take a minute."""
    minutes = int(((NOW + timedelta(hours=1)) - datetime.now(UTC)).total_seconds() // 60)
    return rf"dated ({minutes - 1}|{minutes}|{minutes + 1}) min in the future"


def test_the_default_restore_refuses_the_newest_when_it_is_dated_in_the_future(
        env: Environment) -> None:
    import re

    ahead, recent = future_pair(env)
    with pytest.raises(snapshots.SnapshotError) as err:
        snapshots.find(env)
    said = str(err.value)
    assert err.value.exit_code == 4 and "\n" not in said, said
    assert f"snapshot {ahead.name} is " in said and re.search(future_re(), said), said
    assert "the clock was likely set back" in said and "newest cannot be told" in said, said
    assert f"`runbook snapshot restore {command_arg(env)} SNAPSHOT`" in said, said
    assert "nothing was changed" in said, said
    # named, either one restores as before
    assert snapshots.find(env, recent.name).path == recent
    assert snapshots.find(env, ahead.name).path == ahead


def test_a_snapshot_a_little_ahead_of_the_clock_is_still_the_default(env: Environment) -> None:
    """Clocks of a few seconds apart (a dump's sidecar written on another host's clock) are
    within the same slack the deploy lock allows: no refusal for those."""
    put(env, "20261205_012454", "manual", age_days=5 / 1440)
    close = put(env, "20261205_013000", "manual", age_days=-60 / 86400)
    assert snapshots.find(env).path == close


def test_rollbacks_pick_refuses_a_snapshot_dated_in_the_future(env: Environment) -> None:
    import re

    ahead, recent = future_pair(env)
    for deployment_id in (None, "dep_other"):
        with pytest.raises(snapshots.SnapshotError) as err:
            snapshots.latest_before(env, 1, deployment_id=deployment_id)
        said = str(err.value)
        assert err.value.exit_code == 4 and "\n" not in said, said
        assert f"snapshot {ahead.name} is " in said and re.search(future_re(), said), said
        assert "the clock was likely set back" in said, said
        assert (f"`runbook rollback {command_arg(env)} --restore-snapshot --snapshot FILE`"
                in said), said
    # the one dated in the future is at another schema: it is not the pick, so no refusal
    meta_path = ahead.with_name(ahead.name.replace(".sql.gz", ".meta.json"))
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text())
                                    | {"migration_version": 2}))
    picked = snapshots.latest_before(env, 1)
    assert picked is not None and picked.path == recent


def test_rollbacks_pick_of_a_pre_deploy_snapshot_dated_in_the_future_is_refused(
        env: Environment) -> None:
    ahead, _ = future_pair(env, reason="pre-deploy", deployment_id="dep_current")
    for version in (1, None):
        with pytest.raises(snapshots.SnapshotError) as err:
            snapshots.latest_before(env, version, deployment_id="dep_current")
        assert ahead.name in str(err.value) and "in the future" in str(err.value)


def test_cleanup_never_takes_a_snapshot_dated_in_the_future_for_the_newest(
        env: Environment) -> None:
    """Found by review: with the clock run fast by more than the retention, a snapshot taken
    then (dated 10 days ahead once NTP set the clock back) held "the newest snapshot", so the
    real newest, expired, was deleted. One dated in the future is kept, its age unknown
    (whatever its expires_at says), and "the newest" is picked among the others."""
    record(env, "dep_old", "dep_current")
    when = NOW + timedelta(days=10)
    ahead = put(env, f"{when:%Y%m%d_%H%M%S}", "scheduled", age_days=-10, expires_in_days=17)
    when = NOW + timedelta(days=9)
    # its expires_at counted on another clock than its time: past, yet it is not expired
    odd = put(env, f"{when:%Y%m%d_%H%M%S}", "scheduled", age_days=-9, expires_in_days=-1)
    when = NOW - timedelta(days=8)
    real = put(env, f"{when:%Y%m%d_%H%M%S}", "scheduled", age_days=8, expires_in_days=-1)
    when = NOW - timedelta(days=9)
    old = put(env, f"{when:%Y%m%d_%H%M%S}", "scheduled", age_days=9, expires_in_days=-2)
    result = snapshots.cleanup(env, now=NOW)
    assert [s.path for s in result.removed] == [old] and not old.exists()
    assert ahead.exists() and odd.exists() and real.exists()
    why = {s.name: reason for s, reason in result.held}
    assert set(why) == {odd.name, real.name}, why
    assert why[real.name] == "the newest usable snapshot", why
    assert why[odd.name] == ("dated 9 d 0 h in the future (taken while the clock ran fast), "
                             "so its age cannot be told"), why


def test_the_loss_window_of_a_snapshot_dated_in_the_future_is_not_0s(env: Environment) -> None:
    from runbook.snapshots.stats import LossWindow, TableLoss

    ahead, _ = future_pair(env)
    said = snapshots.loss_window(env, snapshots.find(env, ahead.name)).describe()
    assert said.startswith(f"{ahead.name} is dated "), said
    assert "in the future: how many writes a restore undoes cannot be told" in said, said
    assert "0s" not in said and " ago" not in said, said
    counted = LossWindow(ahead.name, NOW + timedelta(hours=1), -3600.0,
                         (TableLoss("events", 10, 14, 4, True),)).describe()
    assert counted.startswith(f"{ahead.name} is dated 60 min in the future: how many "
                              "writes a restore undoes cannot be told"), counted
    # its created_at values carry the fast clock too: counted by them, a lower bound only
    assert "events: at least 4 new rows" in counted and "0s" not in counted, counted


def test_cli_refuses_the_default_restore_and_lists_a_snapshot_dated_in_the_future(
        env: Environment, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.drill_checks import closed_port

    ahead, recent = future_pair(env)
    toml = host_toml(env, tmp_path)
    children = os.environ | {"DOCKER_HOST": f"tcp://127.0.0.1:{closed_port()}"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", *args],
                              capture_output=True, text=True, check=False, timeout=120,
                              stdin=subprocess.DEVNULL, env=children)

    for extra in (["--dry-run"], ["--yes"]):
        done = cli("restore", str(toml), *extra)
        assert done.returncode == 4, (extra, done.stdout + done.stderr)
        assert f"snapshot {ahead.name} is dated" in done.stderr, done.stderr
        # the environment as it was given: the file, which `production` alone is not
        assert f"`runbook snapshot restore {toml} SNAPSHOT`" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
    assert ahead.exists() and recent.exists()
    listed = cli("list", str(toml))
    assert listed.returncode == 0, listed.stderr
    [line] = [row for row in listed.stdout.splitlines() if row.startswith(ahead.name)]
    assert "dated in the future" in line, listed.stdout
    [line] = [row for row in listed.stdout.splitlines() if row.startswith(recent.name)]
    assert "future" not in line, listed.stdout
    as_json = json.loads(cli("list", str(toml), "--format", "json").stdout)
    assert [s["dated_in_future"] for s in as_json] == [True, False], as_json


# -- which schema a rollback target ran with: only what it served says -------------------------
# A (schema 48) deployed by deploy.sh, B migrated to 49, `runbook rollback --restore-snapshot`
# back to A at 03:00 (its safety snapshot holds B's data, at 49), deploy.sh deployed C at 03:40
# (migrated to 50). A's record keeps its first deployed_at, and the tooling records no schema.

T_A = datetime(2026, 2, 1, 10, 0, tzinfo=UTC)
T_B = datetime(2026, 2, 2, 10, 0, tzinfo=UTC)
T_BACK = datetime(2026, 2, 3, 3, 0, tzinfo=UTC)
T_C = datetime(2026, 2, 3, 3, 40, tzinfo=UTC)
DUMP_END = b"-- PostgreSQL database dump complete\n"


def taken_at(env: Environment, when: datetime, reason: str, version: int | None, *,
             body: bytes = DUMP_END) -> Path:
    """A snapshot taken at `when`: its gzip file and a sidecar (`version` None: as the
    tooling writes one, naming no schema)."""
    path = env.database.snapshot_dir / f"togather_togather_{when:%Y%m%d_%H%M%S}_{reason}.sql.gz"
    path.write_bytes(gzip.compress(body))
    meta: dict[str, object] = {
        "snapshot_name": path.name, "database": "togather", "reason": reason,
        "timestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ"), "deployment_id": "",
        "retention_days": 7, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if version is not None:
        meta.update(migration_version=version, dirty=False)
    path.with_name(path.name.removesuffix(".sql.gz") + ".meta.json").write_text(json.dumps(meta))
    return path


def tooling_deployment(n: int, when: datetime, slot: str, status: str,
                       **extra: object) -> dict[str, object]:
    """One deployment as deploy.sh records it (no migration version)."""
    version = f"{n:07x}"
    return {"id": f"dep_{n:016x}_{'a' * 24}", "version": version,
            "git_commit": version + "0" * 33, "deployed_at": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "deployed_by": "deploy@prod-1", "active_slot": slot, "health_status": "unknown",
            "status": status, "environment": "production", **extra}


def restored_then_redeployed(env: Environment, *, c_snapshot: Path | None = None,
                             ) -> tuple[states.Deployment, states.Deployment]:
    """The state file after A, B, the rollback to A (recorded without the time it went live
    again: by an older runbook, or rewritten by the Go CLI since) and deploy.sh's C; returns
    (C, A). `c_snapshot`: C's pre-deploy snapshot, recorded as the Go CLI records it."""
    a = tooling_deployment(0xA, T_A, "blue", "superseded", rollback_count=1, rollback=True,
                           rollback_id="rbk_1")
    b = tooling_deployment(0xB, T_B, "green", "rolled_back")
    c = tooling_deployment(0xC, T_C, "green", "active",
                           **({"snapshot_path": str(c_snapshot)} if c_snapshot else {}))
    env.state_file.parent.mkdir(parents=True, exist_ok=True)
    env.state_file.write_text(json.dumps({
        "environment": "production", "current_deployment": c, "previous_deployment": a,
        "deployment_history": [b], "lock": {"locked": False}}))
    state = states.read_state(env.state_file, environment=env.name)
    assert state.current is not None and state.previous is not None
    return state.current, state.previous


def test_a_restores_safety_snapshot_never_witnesses_the_schema_a_rollback_target_ran_with(
        env: Environment) -> None:
    """Found by review: the safety snapshot of the restore that took A back to 48 holds B's
    database, at 49, and was taken inside A's recorded window (its first deployed_at to C's):
    the guard said A ran with 49, and `--restore-snapshot` restored that safety snapshot,
    undoing the first restore and every write since. A snapshot from B's own hours, inside
    the same window, disagrees with one from A's: then nothing is inferred, never a pick."""
    from runbook import migration_source

    current, target = restored_then_redeployed(env)
    first = taken_at(env, T_A + timedelta(hours=6), "manual", 48)  # while A served, first time
    safety = taken_at(env, T_BACK - timedelta(minutes=1), "pre-restore", 49)
    found = migration_source.infer(env, current, target)
    assert found.version == 48, found
    assert first.name.removesuffix(".sql.gz") in found.source, found
    assert safety.name.removesuffix(".sql.gz") not in found.source, found
    during_b = taken_at(env, T_B + timedelta(hours=6), "manual", 49)  # B served then
    found = migration_source.infer(env, current, target)
    assert found.version is None, found
    assert "disagree" in found.source, found
    assert first.name.removesuffix(".sql.gz") in found.source, found
    assert during_b.name.removesuffix(".sql.gz") in found.source, found


def test_the_replacing_deployments_own_pre_deploy_dump_says_the_schema_before_any_window(
        env: Environment) -> None:
    """Found by review: C's own pre-deploy snapshot (the Go CLI's `snapshot_path`; its
    sidecar names no schema, its dump holds schema_migrations 48) was read only when no
    sidecar in the live window answered, and the window answered 49."""
    from runbook import migration_source

    dump = (b"-- Dumped by pg_dump version 16.4\n"
            b"COPY public.schema_migrations (version, dirty) FROM stdin;\n48\tf\n\\.\n"
            + DUMP_END)
    own = taken_at(env, T_C - timedelta(minutes=3), "pre-deploy-production", None, body=dump)
    current, target = restored_then_redeployed(env, c_snapshot=own)
    taken_at(env, T_B + timedelta(hours=6), "manual", 49)  # while B served, in A's window
    taken_at(env, T_BACK - timedelta(minutes=1), "pre-restore", 49)
    found = migration_source.infer(env, current, target)
    assert found.version == 48, found
    assert found.source.startswith(f"the dump of {own.name}"), found
    assert found.witness == own


def test_a_snapshot_taken_during_the_next_deploys_migrations_is_no_witness_of_the_target(
        env: Environment) -> None:
    """Found by review: deploy.sh records `deployed_at` only after its migrations, start,
    health gate and switch. An hourly `runbook snapshot create` that lands in between is at
    the new schema but dated before the new deployment: taken as the previous deployment's
    witness, the guard said "compatible" and old code went onto the new schema. Witnesses in
    the window that disagree are never chosen between: the guard is told it cannot tell."""
    from runbook import migration_source

    doc = json.loads((Path(__file__).parent / "data" / "state" / "deploy_script.json")
                     .read_text())
    doc.update(lock={"locked": False}, environment="production")
    env.state_file.parent.mkdir(parents=True, exist_ok=True)
    env.state_file.write_text(json.dumps(doc))
    state = states.read_state(env.state_file, environment=env.name)
    current, target = state.current, state.previous
    assert current is not None and target is not None
    while_live = taken_at(env, current.deployed_at - timedelta(days=1), "hourly", 48)
    mid_deploy = taken_at(env, current.deployed_at - timedelta(seconds=90), "hourly", 49)
    found = migration_source.infer(env, current, target)
    assert found.version is None, found
    assert "disagree" in found.source, found
    for snap in (while_live, mid_deploy):
        assert snap.name.removesuffix(".sql.gz") in found.source, found
    mid_deploy.unlink()  # alone, the one taken while the target served says it
    found = migration_source.infer(env, current, target)
    assert found.version == 48 and while_live.name.removesuffix(".sql.gz") in found.source


def test_the_live_window_starts_when_a_rollback_made_the_target_serve_again(
        env: Environment) -> None:
    """The rollback to A records when A went live again: the window starts there, so neither
    B's hours nor the restore's safety snapshot reach into it, and a snapshot taken since
    says A's schema without any disagreement (the same history recorded without that time
    cannot tell: above)."""
    from runbook import migration_source

    a = states.make_deployment("000000a", "a" * 40, Slot.BLUE, status="active",
                               deployment_id="dep_a", deployed_at=T_A)
    b = states.make_deployment("000000b", "b" * 40, Slot.GREEN, status="active",
                               deployment_id="dep_b", deployed_at=T_B)
    c = states.make_deployment("000000c", "c" * 40, Slot.GREEN, status="active",
                               deployment_id="dep_c", deployed_at=T_C)
    state = states.after_deploy(states.after_deploy(states.DeploymentState(env.name), a), b)
    state = states.after_deploy(states.after_rollback(state, live_since=T_BACK), c)
    env.state_file.parent.mkdir(parents=True, exist_ok=True)
    states.write_state(env.state_file, state)
    state = states.read_state(env.state_file, environment=env.name)
    assert state.current is not None and state.previous is not None
    assert state.previous.id == "dep_a" and state.previous.deployed_at == T_A
    taken_at(env, T_A + timedelta(hours=6), "manual", 48)
    taken_at(env, T_B + timedelta(hours=6), "manual", 49)
    taken_at(env, T_BACK - timedelta(minutes=1), "pre-restore", 49)
    since = taken_at(env, T_BACK + timedelta(minutes=20), "hourly", 48)
    found = migration_source.infer(env, state.current, state.previous)
    assert found.version == 48 and found.witness == since, found


def test_cleanup_keeps_the_snapshots_that_disagree_about_the_previous_deployments_schema(
        env: Environment) -> None:
    """Found by review: the schema guard cannot tell the previous deployment's schema while
    one snapshot taken while it served says 1 and one taken during the next deploy's
    migrations says 2. Cleanup kept only the newest of that window: the one taken while it
    served, expired first, was deleted, and the guard then read 2 from the other alone."""
    from runbook import migration_source

    record(env, "dep_a", "dep_b")  # no migration version; dep_a served from 30 days ago
    while_live = put(env, "20261102_020000", "hourly", version=1, age_days=29.9,
                     expires_in_days=-22)
    mid_deploy = put(env, "20261102_235000", "hourly", version=2, age_days=29.01,
                     expires_in_days=-21)  # minutes before dep_b was recorded
    put(env, "20261201_000000", "hourly", version=2, age_days=1)  # the newest
    result = snapshots.cleanup(env, now=NOW)
    assert while_live.exists() and mid_deploy.exists(), [s.name for s in result.removed]
    held = {s.path.name: why for s, why in result.held}
    assert "disagree" in held[while_live.name] and "disagree" in held[mid_deploy.name], held
    state = states.read_state(env.state_file, environment=env.name)
    assert state.previous is not None and state.current is not None
    found = migration_source.infer(env, state.current, state.previous)
    assert found.version is None and "disagree" in found.source, found


# -- the tooling's dumps are read once, and only as far as the question needs ---------------

AFTER_ROWS = 200_000  # users' rows after schema_migrations: 8 of the dump's 8 MB (level 0)


def tooling_sql(version: int, rows: int = AFTER_ROWS) -> bytes:
    """pg_dump's plain format: table data in name order (schema_migrations after events,
    before users), then the post-data section and the trailer."""
    users = b"".join(b"%d\t%s\n" % (i, os.urandom(16).hex().encode()) for i in range(rows))
    return (b"--\n-- PostgreSQL database dump\n--\n\n-- Dumped by pg_dump version 15.8\n\n"
            b"CREATE TABLE public.events (id integer, name text);\n"
            b"CREATE TABLE public.schema_migrations (version bigint NOT NULL, "
            b"dirty boolean NOT NULL);\nCREATE TABLE public.users (id integer, key text);\n\n"
            b"COPY public.events (id, name) FROM stdin;\n1\tmeetup\n\\.\n\n\n"
            b"--\n-- Data for Name: schema_migrations; Type: TABLE DATA; Schema: public; "
            b"Owner: -\n--\n\n"
            b"COPY public.schema_migrations (version, dirty) FROM stdin;\n"
            + b"%d\tf\n\\.\n\n\n" % version
            + b"COPY public.users (id, key) FROM stdin;\n" + users + b"\\.\n\n\n"
            b"ALTER TABLE ONLY public.events ADD CONSTRAINT events_pkey PRIMARY KEY (id);\n\n"
            b"--\n-- PostgreSQL database dump complete\n--\n\n")


def tooling_dump(env: Environment, deployment_id: str, version: int,
                 rows: int = AFTER_ROWS) -> Path:
    """The current deployment's pre-deploy snapshot as the deploy script takes it: a gzipped
    plain dump and a sidecar of the contract's keys only (no migration version, no sha256).
    Stored uncompressed inside gzip (level 0): a dump of the same length is the same size."""
    stamp = (NOW - timedelta(days=2)).strftime("%Y%m%d_%H%M%S")
    path = env.database.snapshot_dir / f"togather_togather_{stamp}_pre-deploy.sql.gz"
    path.write_bytes(gzip.compress(tooling_sql(version, rows), compresslevel=0, mtime=0))
    # the server the env fixture's URL names (localhost:5432): the tooling records its own
    meta = {"snapshot_name": path.name, "database": "togather", "host": "localhost",
            "port": 5432, "timestamp": (NOW - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "reason": "pre-deploy", "git_commit": "b" * 40, "deployment_id": deployment_id,
            "retention_days": 7, "expires_at": (NOW + timedelta(days=5)).strftime(
                "%Y-%m-%dT%H:%M:%SZ"), "size_mb": 1.0, "duration_seconds": 3}
    path.with_name(path.name.removesuffix(".sql.gz") + ".meta.json").write_text(
        json.dumps(meta))
    return path


def test_the_schema_guard_reads_a_tooling_dump_only_as_far_as_its_schema_migrations(
        env: Environment, read_bytes: dict[Path, list[int]]) -> None:
    """Found by review: on a host the deploy script deployed, every rollback plan (a dry run
    too) gunzipped and hashed the whole pre-deploy dump to learn the target's schema: 27 s
    for a 955 MiB dump, paid again by the real run. pg_dump writes table data in name order
    and the guard's question is answered by schema_migrations' rows: the tables after it
    (users here) are not read."""
    from runbook import migration_source

    record(env, "dep_a", "dep_b")  # the deploy script's records: no migration_version
    dump = tooling_dump(env, "dep_b", 7)
    state = states.read_state(env.state_file, environment=env.name)
    assert state.previous is not None and state.current is not None
    found = migration_source.infer(env, state.current, state.previous)
    assert found.version == 7 and found.witness == dump, found
    size = dump.stat().st_size
    [read] = read_bytes[dump]
    assert read < size // 4, (read, size)


def test_one_process_reads_a_tooling_dump_whole_once_for_the_guard_the_pick_and_the_restore(
        env: Environment, read_bytes: dict[Path, list[int]]) -> None:
    """Found by review: `rollback --restore-snapshot` read the whole dump three times before
    its prompt (the guard, the snapshot pick, the restore's prepare): 54 s for 955 MiB. One
    full read serves the pick and prepare (the replay still streams it and checks the
    checksum it found), and the guard reads only up to schema_migrations."""
    from runbook import migration_source, snapshot_restore
    from runbook.snapshots.verify import verify

    record(env, "dep_a", "dep_b")
    dump = tooling_dump(env, "dep_b", 7)
    settled(dump)
    state = states.read_state(env.state_file, environment=env.name)
    assert state.previous is not None and state.current is not None
    assert migration_source.infer(env, state.current, state.previous).version == 7
    [snap] = [s for s in snapshots.own_snapshots(env) if s.path == dump]
    picked = verify(env, snap)  # rollback.schema_guard: the pick's schema, from the dump
    prepared = snapshot_restore.prepare(env, snap)  # before the prompt, as the plan does
    digest = hashlib.sha256(dump.read_bytes()).hexdigest()
    assert picked.sha256 == prepared.verified.sha256 == digest
    assert picked.migration_version == prepared.verified.migration_version == 7
    size = dump.stat().st_size
    guard, *whole = read_bytes[dump]
    assert guard < size // 4 and whole == [size], (read_bytes[dump], size)  # was 3 x size


def migrations_in(env: Environment, tables: dict[str, int], named: str | None) -> Path:
    """A dump holding schema_migrations in each schema of `tables` (pg_dump's order: schemas
    by name) at its version, with a sidecar naming `named` as the table the guard read."""
    blocks = b"".join(b"COPY %s.schema_migrations (version, dirty) FROM stdin;\n%d\tf\n\\.\n\n"
                      % (schema.encode(), version) for schema, version in sorted(tables.items()))
    sql = (b"-- Dumped by pg_dump version 15.8\n\n" + blocks
           + b"COPY public.users (id, key) FROM stdin;\n1\tx\n\\.\n\n"
           b"--\n-- PostgreSQL database dump complete\n--\n\n")
    path = env.database.snapshot_dir / "togather_togather_20261201_000000_manual.sql.gz"
    path.write_bytes(gzip.compress(sql, mtime=0))
    meta = {"database": "togather", "reason": "manual", "timestamp": "2026-12-01T00:00:00Z",
            **({"migrations_table": named} if named else {})}
    path.with_name(path.name.removesuffix(".sql.gz") + ".meta.json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize(("tables", "named", "version"), [
    ({"app": 42, "public": 7}, "app.schema_migrations", 42),  # what the guard read
    ({"app": 42, "public": 7}, "public.schema_migrations", 7),
    ({'"My App"': 42, "public": 7}, '"My App".schema_migrations', 42),  # quoted as pg_dump
    ({"app": 42, "public": 7}, None, 7),  # the tooling's sidecar: public's, as before
    ({"app": 42}, None, 42),  # the tooling's, one table elsewhere: that one (was 0)
    ({}, None, 0),
])
def test_the_dump_is_read_at_the_schema_migrations_its_sidecar_names(
        env: Environment, monkeypatch: pytest.MonkeyPatch, tables: dict[str, int],
        named: str | None, version: int) -> None:
    from runbook.snapshots import verify as verify_module

    monkeypatch.setattr(verify_module, "CHUNK", 7)  # blocks cut at every boundary
    path = migrations_in(env, tables, named)
    [snap] = [s for s in snapshots.own_snapshots(env) if s.path == path]
    assert verify_module.schema_version(env, snap) == version  # read as far as it
    assert verify_module.verify(env, snap).migration_version == version  # read whole


def test_a_tooling_dump_with_schema_migrations_in_two_other_schemas_is_refused(
        env: Environment) -> None:
    """Which one the app's migrate uses cannot be told from the dump: neither is guessed."""
    from runbook.snapshots import verify as verify_module

    path = migrations_in(env, {"app": 42, "billing": 3}, None)
    [snap] = [s for s in snapshots.own_snapshots(env) if s.path == path]
    for read in (verify_module.schema_version, verify_module.verify):
        with pytest.raises(snapshots.SnapshotError) as err:
            read(env, snap)
        assert "app.schema_migrations, billing.schema_migrations" in str(err.value)


@pytest.mark.parametrize("age", [2.2, 0.0], ids=["settled", "just-written"])
def test_a_dump_rewritten_in_place_after_it_was_read_is_read_again(
        env: Environment, read_bytes: dict[Path, list[int]], age: float) -> None:
    """What a process learnt of a file is never served for a file that changed since: the
    same path, inode and size, even its mtime put back (`cp -p`, rsync), leave the change
    time, which no user can set; and a file changed within verify.RACY is not remembered at
    all (a second write in the same clock tick would leave every time as it was)."""
    from runbook import migration_source
    from runbook.snapshots.verify import verify

    record(env, "dep_a", "dep_b")
    dump = tooling_dump(env, "dep_b", 7, rows=2000)
    settled(dump, age)
    state = states.read_state(env.state_file, environment=env.name)
    assert state.previous is not None and state.current is not None
    [snap] = [s for s in snapshots.own_snapshots(env) if s.path == dump]
    assert migration_source.infer(env, state.current, state.previous).version == 7
    assert verify(env, snap).migration_version == 7
    reads = len(read_bytes[dump])
    assert verify(env, snap).migration_version == 7
    assert (len(read_bytes[dump]) > reads) is (age == 0.0)  # remembered only once settled
    before = dump.stat()
    rewritten = gzip.compress(tooling_sql(8, rows=2000), compresslevel=0, mtime=0)
    assert len(rewritten) == before.st_size
    with dump.open("r+b") as raw:  # in place: the same inode
        raw.write(rewritten)
    os.utime(dump, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = dump.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns)
    assert migration_source.infer(env, state.current, state.previous).version == 8
    again = verify(env, snap)
    assert again.migration_version == 8
    assert again.sha256 == hashlib.sha256(rewritten).hexdigest()


def test_a_dump_is_read_as_gzip_reads_it_whole_cut_short_or_damaged(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """verify, the schema guard and the replay read a dump through verify.chunks, which
    inflates with zlib directly (GzipFile fed zlib 8 KiB at a time: a third slower on a
    955 MiB dump). Python's GzipFile, what they used before, is the oracle: two members
    with zeros between and after them, read 7 bytes at a time, cut at every length and with
    every byte damaged, give exactly what GzipFile gives, or are refused whenever GzipFile
    refuses them; every byte of the file is hashed."""
    import io
    import zlib

    from runbook.snapshots import verify as verify_module

    monkeypatch.setattr(verify_module, "CHUNK", 7)  # every boundary, header and trailer
    sql = b"--\n-- PostgreSQL database dump\n--\n" + b"COPY public.items FROM stdin;\n1\tx\n"
    end = b"-- PostgreSQL database dump complete\n"
    first, second = gzip.compress(sql * 3, mtime=0), gzip.compress(end, mtime=0)
    data = first + b"\0\0\0" + second + b"\0"
    flags = {3, len(first) + 3 + 3}  # each member's FLG byte

    path = tmp_path / "x.sql.gz"

    def ours(raw: bytes) -> tuple[bytes | None, str]:
        path.write_bytes(raw)
        sha = hashlib.sha256()
        try:
            out = b"".join(verify_module.chunks(path, sha))
        except (EOFError, zlib.error, gzip.BadGzipFile):
            return None, ""
        return out, sha.hexdigest()

    def gzips(raw: bytes) -> bytes | None:
        try:
            return gzip.GzipFile(fileobj=io.BytesIO(raw), mode="rb").read()
        except (EOFError, zlib.error, gzip.BadGzipFile):
            return None

    assert ours(data) == (sql * 3 + end, hashlib.sha256(data).hexdigest())
    for cut in range(len(data)):
        assert ours(data[:cut])[0] == gzips(data[:cut]), cut
    looser = []
    for at in range(len(data)):
        for flip in (0x01, 0x80, 0xff):
            damaged = data[:at] + bytes([data[at] ^ flip]) + data[at + 1:]
            read, want = ours(damaged)[0], gzips(damaged)
            assert read is None or read == want, (at, flip)  # never more than gzip reads
            if read is None and want is not None:
                looser.append((at, flip))
    # only in a header's flags: zlib checks the header CRC GzipFile skips, and refuses
    # reserved flag bits GzipFile ignores
    assert {at for at, _ in looser} <= flags, looser


# -- what another operator cannot read is never read as "nothing there" ----------------------

NOBODY_READS = ("import dataclasses, json, sys\nfrom datetime import datetime\n"
                "from pathlib import Path\nfrom runbook import migration_source, snapshots\n"
                "from runbook import state as states\nfrom runbook.errors import RunbookError\n"
                "from tests.drill_checks import host_env\n"
                "base = host_env(Path(sys.argv[1]))\n"
                "env = base.with_(database=dataclasses.replace(base.database, "
                "snapshot_dir=Path(sys.argv[1]) / 'db-snapshots'))\n"
                "NOW = datetime.fromisoformat(sys.argv[2])\n"
                # loaded while root: the venv is not the deploy user's to read
                "import _strptime, encodings.utf_8_sig\nfrom psycopg import conninfo\n")


def shared_folder(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Environment:
    """A host's files in `shared_dir` as a deploy group shares them: a state file every
    operator reads, and a snapshot folder (root's, setgid) the group may write."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://togather:secret@localhost:5432/togather")
    base = host_env(shared_dir)
    folder = shared_dir / "db-snapshots"
    folder.mkdir()
    os.chown(folder, 0, SHARED_GID)
    folder.chmod(0o2770)
    return base.with_(database=dataclasses.replace(base.database, snapshot_dir=folder))


def roots_own(*dumps: Path) -> None:
    """Each snapshot as root's deploy or cron leaves it: the dump and its sidecar 0600, of
    another user than the deploy user."""
    for dump in dumps:
        for path in (dump, dump.with_name(dump.name.removesuffix(".sql.gz") + ".meta.json")):
            os.chown(path, OWNER_UID, SHARED_GID)
            path.chmod(0o600)


@needs_root
def test_another_operators_cleanup_keeps_a_snapshot_whose_sidecar_it_cannot_read(
        shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: root's snapshots (sidecars 0600) in a folder a deploy group shares.
    Another operator's cleanup could not read the sidecar of the current deployment's expired
    pre-deploy snapshot, took it for a snapshot without one, and deleted the only copy of the
    data from before that deployment's migrations (exit 0, no word). Kept now, saying why;
    an expired snapshot whose sidecar it reads still goes. The reader is a real other user."""
    env = shared_folder(shared_dir, monkeypatch)
    record(env, "dep_old", "dep_current")
    env.state_file.chmod(0o644)  # every operator reads it
    pre = put(env, "20261122_120000", "pre-deploy", deployment_id="dep_current",
              age_days=10, expires_in_days=-3)
    expired = put(env, "20261120_120000", "manual", age_days=12, expires_in_days=-5)
    newest = put(env, "20261201_120000", "manual", age_days=1)
    roots_own(pre)
    for path in (expired, newest):
        os.chown(path, OWNER_UID, SHARED_GID)
    code = ("result = snapshots.cleanup(env, now=NOW)\n"
            "print(json.dumps({'removed': [s.name for s in result.removed],\n"
            "                  'held': {s.name: why for s, why in result.held}}))\n")
    said = json.loads(as_deploy_user([SHARED_GID], NOBODY_READS, code, str(shared_dir),
                                     NOW.isoformat()))
    assert said["removed"] == [expired.name], said
    assert pre.exists() and pre.with_name(pre.name.replace(".sql.gz", ".meta.json")).exists()
    assert said["held"][pre.name] == (
        "its sidecar cannot be read (Permission denied), so nothing tells whether a rollback "
        "needs it: kept; run the cleanup as its owner or root"), said


@needs_root
def test_the_schema_guard_and_the_pick_say_a_sidecar_they_cannot_read(
        shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The previous deployment's schema is told by the current one's pre-deploy snapshot,
    whose sidecar (root's, 0600) another operator cannot read. Read as "no sidecar", the
    snapshot dumped during the current deployment's migrations (at the new schema, inside
    the window that pre-deploy snapshot bounds) became the witness: the guard said the
    target ran with 2, the schema now, and let old code onto it; and the pick for
    `--restore-snapshot` said there was no snapshot at schema 1. Each now says which sidecar
    cannot be read, and the guard checks nothing it cannot tell."""
    env = shared_folder(shared_dir, monkeypatch)
    record(env, "dep_a", "dep_b")  # no migration versions: dep_b went live 29 days ago
    env.state_file.chmod(0o644)
    def stamp(age_days: float) -> str:  # named when taken: the name is all it says to them
        return (NOW - timedelta(days=age_days)).strftime("%Y%m%d_%H%M%S")

    pre = put(env, stamp(29.1), "pre-deploy", deployment_id="dep_b", version=1, age_days=29.1)
    during = put(env, stamp(29.05), "hourly", version=2, age_days=29.05)
    roots_own(pre)
    os.chown(during, OWNER_UID, SHARED_GID)
    code = ("state = states.read_state(env.state_file, environment=env.name)\n"
            "found = migration_source.from_sidecars(env, state.previous, state.current)\n"
            "try:\n"
            "    pick = snapshots.latest_before(env, 1, deployment_id='dep_b')\n"
            "    picked = None if pick is None else pick.name\n"
            "except RunbookError as exc:\n"
            "    picked = [int(exc.exit_code), exc.message, exc.fix]\n"
            "print(json.dumps({'version': found.version, 'source': found.source,\n"
            "                  'picked': picked}))\n")
    said = json.loads(as_deploy_user([SHARED_GID], NOBODY_READS, code, str(shared_dir),
                                     NOW.isoformat()))
    sidecar = pre.name.replace(".sql.gz", ".meta.json")
    assert said["version"] is None, said
    assert f"the sidecar {sidecar} cannot be read (Permission denied)" in said["source"], said
    code_, message, fix = said["picked"]
    assert code_ == 4 and f"the sidecar of snapshot {pre.name} cannot be read" in message, said
    assert "owner or root" in fix and "--snapshot FILE" in fix, said
    assert during.exists()


def test_a_finished_restore_ends_its_own_and_earlier_entries_never_a_later_one(
        env: Environment) -> None:
    """The run that finishes a rollback killed after its restore's check passed ends that
    restore beside the state file (restore_records.forget_finished): its entry and every
    earlier one go, as the killed run's own end would have taken them; another operator's
    restore begun since stays named; a run the record does not name only is said ended. Each
    stays said ended (`finished_restores`): the killed runs' own records, per user, still
    say "killed"."""
    from runbook import restore_records

    for run_id in ("restore_earlier_0", "rbk_killed_1", "restore_later_2"):
        assert restore_records.record_unfinished(
            env, run_id, target=f"/x/{run_id}.sql.gz", safety=f"/x/{run_id}_s.sql.gz") is None
    assert restore_records.forget_finished(env, "rbk_other_9", "rbk_finish_8") is None
    assert len(restore_records.unfinished_restores(env)) == 3  # not named: only said ended
    assert restore_records.forget_finished(env, "rbk_killed_1", "rbk_finish_3") is None
    assert [r["run_id"] for r in restore_records.unfinished_restores(env)] \
        == ["restore_later_2"]
    assert restore_records.finished_restores(env) == {
        "rbk_other_9": "rbk_finish_8", "restore_earlier_0": "rbk_finish_3",
        "rbk_killed_1": "rbk_finish_3"}
    assert restore_records.forget_finished(env, "restore_later_2", "rbk_finish_4") is None
    assert restore_records.unfinished_restores(env) == []
    assert set(restore_records.finished_restores(env)) \
        == {"rbk_other_9", "restore_earlier_0", "rbk_killed_1", "restore_later_2"}


def test_a_restore_finished_by_another_operators_run_is_killed_no_more_in_the_records(
        env: Environment, tmp_path: Path) -> None:
    """Found by review: the finish of a rollback killed after its restore's check passed
    took its entry out of the record beside the state file, but the killed run's own record
    (per user: the operator who was killed, not the one who finished it) still said "killed
    during or after its restore": the next restore named its safety snapshot, from before
    the finished restore, as the data from before it, and every cleanup kept it. The finish
    says so beside the state file (every operator's readers honour it), and keeps saying it
    when a later restore finishes; a finish that never wrote it leaves it killed (safe),
    unless its own run record, read here, says it finished."""
    import subprocess
    import sys

    from runbook import journal, restore_records
    from runbook.snapshot_restore import kept_for_killed_restore, killed_restore

    record(env, "dep_old", "dep_current")
    target = put(env, "20261110_120000", "manual", age_days=20, expires_in_days=-13)
    safety = put(env, "20261120_120000", "pre-restore", age_days=12, expires_in_days=-5)
    put(env, "20261122_120000", "manual", age_days=10, expires_in_days=-3)  # the newest
    toml, host, killed = killed_restore_host(env, tmp_path, "rollback", "rbk_killed_1",
                                             safety_snapshot=str(safety),
                                             restore_target=str(target))
    with killed.step("restore-database", "Replace the database"):
        pass
    with killed.step("verify-restore", "Check the restored database"):
        pass  # killed after it: its record says "running"
    assert restore_records.record_unfinished(
        host, "rbk_killed_1", target=str(target), safety=str(safety)) is None
    run = [sys.executable, "-m", "runbook.cli", "snapshot", "cleanup", str(toml), "--dry-run"]

    def kept() -> dict[str, str]:
        dry = subprocess.run(run, capture_output=True, text=True, check=False, timeout=120,
                             stdin=subprocess.DEVNULL)
        assert dry.returncode == 0, dry.stderr
        return {line.split()[2]: line for line in dry.stdout.splitlines()
                if line.startswith("Would keep")}

    assert (killed_restore(host, None) or {}).get("run_id") == "rbk_killed_1"
    assert "rbk_killed_1" in kept()[safety.name] and "rbk_killed_1" in kept()[target.name]
    # the finish, another operator's run (its record is in their runs folder, not here)
    assert restore_records.forget_finished(host, "rbk_killed_1", "rbk_finish_2") is None
    assert restore_records.unfinished_restores(host) == []
    assert killed_restore(host, None) is None
    assert kept_for_killed_restore(host) == {}
    assert safety.name not in kept() and target.name not in kept()
    # a later restore that finishes keeps what the finish said
    assert restore_records.forget_unfinished(host) is None
    assert killed_restore(host, None) is None and kept_for_killed_restore(host) == {}
    # the finish killed before it wrote (or its write lost): the restore is still killed
    restore_records.unfinished_marker(host).unlink()
    assert (killed_restore(host, None) or {}).get("run_id") == "rbk_killed_1"
    assert safety.name in kept_for_killed_restore(host)
    # this operator's finish, whose write beside the state file failed: its record says it
    with journal.Journal.open(host, "rollback", run_id="rbk_finish_3") as finish:
        finish.set(**{restore_records.FINISHED_RESTORE: "rbk_killed_1"})
    newer = killed.record_path.stat().st_mtime + 30  # read first
    os.utime(finish.record_path, (newer, newer))
    assert killed_restore(host, None) is None
    assert kept_for_killed_restore(host) == {}


def test_cleanup_keeps_what_an_unfinished_restore_recorded_beside_the_state_file(
        env: Environment, tmp_path: Path) -> None:
    """Found by review: what a killed restore still needs (the snapshot it replays, its
    safety snapshot) was known to cleanup only from the run records of whoever ran it
    (`~/.togather/runs`, per user): root's cron or a sudo cleanup deleted them. The restore
    names them beside the state file before it replaces the database; every operator's
    cleanup keeps them; a replay that rolled back takes back only its own; a finished
    restore ends them all; a file there that cannot be read keeps every snapshot."""
    import subprocess
    import sys

    from runbook import restore_records

    record(env, "dep_old", "dep_current")
    target = put(env, "20261110_120000", "manual", age_days=20, expires_in_days=-13)
    safety = put(env, "20261120_120000", "pre-restore", age_days=12, expires_in_days=-5)
    rolled_back = put(env, "20261121_120000", "pre-restore", age_days=11, expires_in_days=-4)
    put(env, "20261201_120000", "manual", age_days=1)  # the newest
    toml = host_toml(env, tmp_path)  # its runs folder holds no record of those runs
    assert restore_records.record_unfinished(
        env, "restore_killed_1", target=str(target), safety=str(safety)) is None
    assert restore_records.record_unfinished(
        env, "restore_failed_2", target=str(target), safety=str(rolled_back),
        earlier=str(safety)) is None
    marker = restore_records.unfinished_marker(env)
    assert marker.parent == env.state_file.parent and marker.stat().st_mode & 0o777 == 0o644
    assert restore_records.forget_unfinished(env, "restore_failed_2") is None  # rolled back
    run = [sys.executable, "-m", "runbook.cli", "snapshot", "cleanup", str(toml)]
    dry = subprocess.run([*run, "--dry-run"], capture_output=True, text=True, check=False,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert dry.returncode == 0, dry.stderr
    kept = {line.split()[2]: line for line in dry.stdout.splitlines()
            if line.startswith("Would keep")}
    assert set(kept) == {target.name, safety.name}, dry.stdout
    assert "restore_killed_1" in kept[target.name] and str(marker) in kept[target.name]
    assert "the only copy of the data from before it" in kept[safety.name], dry.stdout
    assert f"Would remove {rolled_back.name}" in dry.stdout, dry.stdout
    marker.write_text("{not json")  # a torn or foreign file: nothing tells what it kept
    dry = subprocess.run([*run, "--dry-run"], capture_output=True, text=True, check=False,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert dry.returncode == 0 and "Would remove 0 snapshot(s)" in dry.stdout, dry.stdout
    assert f"{marker} cannot be read" in dry.stdout, dry.stdout
    assert restore_records.forget_unfinished(env) is None  # a restore that finished
    assert not marker.exists()
    done = subprocess.run([*run, "--yes"], capture_output=True, text=True, check=False,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert not target.exists() and not safety.exists() and not rolled_back.exists(), done.stdout


@pytest.mark.parametrize("pending", ["deploy", "deploy-killed-before-its-record-said",
                                     "rollback"])
def test_cleanup_keeps_the_snapshot_an_interrupted_runs_record_names(
        env: Environment, tmp_path: Path, pending: str) -> None:
    """Found by review: cleanup read the run records and the restore marker, never the
    interrupted run's record beside the state file. A deploy killed after its migrations
    (the record names its pre-deploy snapshot, or only its deployment id when killed as the
    dump was named) lost that snapshot to the cron cleanup once it expired, the hourly ones
    at the migrated schema being newer and the state file naming no schema (the tooling's):
    its rerun, which takes it as that deployment's, dumped a new one at the migrated schema
    and recorded it as the state before the deploy. An interrupted `rollback
    --restore-snapshot` killed before its restore began lost the snapshot its rerun
    (`--snapshot FILE`) replays."""
    import subprocess
    import sys

    from runbook import intent as intents

    record(env, "dep_old", "dep_current")  # no schema recorded for either
    taken = put(env, "20261127_120000", "pre-deploy", deployment_id="dep_killed", version=1,
                age_days=10, expires_in_days=-3)
    put(env, "20261206_120000", "hourly", version=2, age_days=1)  # the newest, migrated
    record_of = ({"deployment_id": "dep_killed", "snapshot_path": str(taken)}
                 if pending == "deploy" else {"deployment_id": "dep_killed"}
                 if pending.startswith("deploy") else {"restore_snapshot": str(taken)})
    intents.write(env, intents.Intent(
        run_id="run_killed_1", action=pending.split("-")[0], environment=env.name,
        from_slot="blue", to_slot="green", from_version="0000001", to_version="v2",
        record=record_of))
    toml = host_toml(env, tmp_path)
    run = [sys.executable, "-m", "runbook.cli", "snapshot", "cleanup", str(toml)]
    dry = subprocess.run([*run, "--dry-run"], capture_output=True, text=True, check=False,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert dry.returncode == 0, dry.stderr
    assert f"Would keep {taken.name}" in dry.stdout and "run_killed_1" in dry.stdout, dry.stdout
    assert "Would remove 0 snapshot(s)" in dry.stdout, dry.stdout
    done = subprocess.run([*run, "--yes"], capture_output=True, text=True, check=False,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert taken.exists() and taken.with_name(
        "togather_togather_20261127_120000_pre-deploy.meta.json").exists(), done.stdout
    intents.path(env).write_text("{not json")  # torn: nothing tells what it names
    torn = subprocess.run([*run, "--dry-run"], capture_output=True, text=True, check=False,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert torn.returncode == 0 and "Would remove 0 snapshot(s)" in torn.stdout, torn.stdout
    assert "record" in torn.stdout and "is unreadable" in torn.stdout, torn.stdout
    intents.path(env).unlink()  # the run was finished: ordinary retention again
    again = subprocess.run([*run, "--yes"], capture_output=True, text=True, check=False,
                           timeout=120, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr
    assert not taken.exists() and f"Removed {taken.name}" in again.stdout, again.stdout


def test_the_snapshot_folders_fix_offers_no_file_to_remove_and_no_count_cleanup_would_not_free(
        env: Environment) -> None:
    """Found by review: the fix said "`snapshot cleanup` removes 2 expired snapshot(s)" of two
    that cleanup keeps for an unfinished restore, and, with none expired, listed the biggest
    snapshots "to remove with rm": an unfinished restore's safety snapshot (the only copy of
    the data from before it) and another environment's in the shared folder."""
    from runbook.snapshots import room

    record(env, "dep_old", "dep_current")
    target = put(env, "20261110_120000", "manual", age_days=20, expires_in_days=-13)
    safety = put(env, "20261120_120000", "pre-restore", age_days=12, expires_in_days=-5)
    safety.write_bytes(b"x" * 3_000_000)
    other = env.database.snapshot_dir / "togather_prod_20261201_120000_pre-deploy.sql.gz"
    other.write_bytes(b"y" * 2_000_000)
    assert restore_records.record_unfinished(
        env, "restore_killed_1", target=str(target), safety=str(safety)) is None
    fix = room.snapshot_fix(env)
    assert not re.search(r"\brm\b", fix), fix
    assert not re.search(r"removes \d+", fix), fix
    assert safety.name not in fix and other.name not in fix, fix
    assert "snapshot cleanup" in fix and "removes the expired snapshots that no rollback" in fix
    assert "this database's 2 snapshot(s) there take" in fix, fix


def test_a_writer_is_seen_through_a_snapshot_symlink(tmp_path: Path) -> None:
    """Found by review: the writer check matched the open file's name with the path's, and
    a process's descriptor names the file, never the link to it: a dump being written
    through a snapshot symlink's target went unseen. A real process holds the target open."""
    import subprocess

    from runbook import procs

    target = tmp_path / "togather_togather_20261201_000000_scheduled.sql.gz.target"
    link = tmp_path / "togather_togather_20261201_000000_scheduled.sql.gz"
    with target.open("wb") as out:
        writer = subprocess.Popen(["gzip", "-c"], stdin=subprocess.PIPE, stdout=out)
    link.symlink_to(target.name)
    assert writer.stdin is not None
    try:
        assert procs.writers(target) == [writer.pid]
        assert procs.writers(link) == [writer.pid]
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)
    assert procs.writers(link) == []
