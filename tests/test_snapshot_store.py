"""Snapshot files without a database: what cleanup keeps, what a restore may pick when the
target's schema is unknown, and folders holding things that are not snapshots.

Real files in a temporary folder and a real state file written by the state writer; the
expected names are spelled out here, never computed by the code under test."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from runbook import database, snapshots
from runbook import state as states
from runbook.environment import Environment, Slot
from runbook.errors import ConfigError
from tests.drill_checks import host_env

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def env(tmp_path: Path) -> Environment:
    base = host_env(tmp_path)
    folder = tmp_path / "db-snapshots"
    folder.mkdir()
    return base.with_(database=dataclasses.replace(base.database, snapshot_dir=folder))


def put(env: Environment, stamp: str, reason: str, *, deployment_id: str = "",
        version: int | None = 1, age_days: float = 0.0, expires_in_days: float = 7.0,
        ) -> Path:
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
    manual = put(env, "20261110_000000", "manual", age_days=22, expires_in_days=-15)
    dirty_newer = put(env, "20261111_000000", "manual", version=None, age_days=21,
                      expires_in_days=-14)  # no migration version: not usable
    dry = snapshots.cleanup(env, now=NOW, dry_run=True)
    assert names([s.path for s in dry.removed]) == {old.name, dirty_newer.name}
    assert old.exists() and dirty_newer.exists()
    why = {s.name: reason for s, reason in dry.held}
    assert set(why) == {prev.name, cur.name, manual.name}
    assert "previous deployment" in why[prev.name] and "dep_b" in why[prev.name]
    assert "current deployment" in why[cur.name] and "dep_c" in why[cur.name]
    assert "newest usable" in why[manual.name]
    done = snapshots.cleanup(env, now=NOW)
    assert names([s.path for s in done.removed]) == {old.name, dirty_newer.name}
    assert not old.exists() and not dirty_newer.exists()
    assert prev.exists() and cur.exists() and manual.exists()


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

def test_cli_cleanup_dry_run_names_what_it_keeps_and_why(env: Environment,
                                                         tmp_path: Path) -> None:
    import subprocess
    import sys

    record(env, "dep_old", "dep_current")
    pre = put(env, "20261122_120000", "pre-deploy", deployment_id="dep_current",
              age_days=10, expires_in_days=-3)
    gone = put(env, "20261121_120000", "manual", age_days=11, expires_in_days=-4)
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


def test_the_full_disk_hint_names_the_setting_that_is_read() -> None:
    from runbook.snapshots import store

    error = store.no_space(Path("/var/lib/togather/db-snapshots"), "the snapshot")
    assert error.fix and "[database] snapshot_dir" in error.fix
    assert "SNAPSHOT_DIR" not in error.fix  # the TOML's is read (SNAPSHOT_DIR must agree)
