"""Hosts the drill does not look like (issue 10): no compose, an unreadable schema, and
deployments recorded by older tooling without a migration version. Against the real drill stack;
every refusal is exit 4 with one line, before anything changes."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from runbook import deploy, docker, rollback, snapshots
from runbook import environment as envmod
from runbook import state as states
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot, command_arg
from runbook.errors import ExitCode, RunbookError
from tests.drill_checks import (
    needs_root,
    retag,
    running_from,
    snapshot,
    through_proxy,
    two_deployments,
)

pytestmark = pytest.mark.docker
V1, V2, V3 = VERSIONS["v1"], VERSIONS["v2"], VERSIONS["v3"]
UNREACHABLE = "RUNBOOK_TEST_UNREACHABLE_DB_URL"
SECRET = "s3cret-never-shown"



def without_compose(env: Environment, file: Path | None = None) -> Environment:
    """The same host, described as one whose slots were started with `docker run`."""
    slots = {s: dataclasses.replace(c, service=None) for s, c in env.slots.items()}
    return env.with_(slots=slots, compose=dataclasses.replace(env.compose, file=file))


def forget_migration_version(env: Environment, version: str) -> None:
    """Make the target look recorded by older tooling (the deploy script, the Go CLI)."""
    st = states.read_state(env.state_file)
    target = st.find_version(version)
    assert target is not None and target.migration_version is not None
    old = target.with_(migration_version=None)
    st = st.with_(previous=old if st.previous and st.previous.id == old.id else st.previous,
                  history=tuple(old if d.id == old.id else d for d in st.history))
    states.write_state(env.state_file, st)
    assert "migration_version" not in json.loads(env.state_file.read_text())[
        "previous_deployment"]


def unreachable_db(env: Environment, monkeypatch: pytest.MonkeyPatch) -> Environment:
    """DATABASE_URL as a host has it when Postgres answers only on Docker's network."""
    monkeypatch.setenv(UNREACHABLE, f"postgresql://togather:{SECRET}@127.0.0.1:9/togather")
    return env.with_(database=dataclasses.replace(env.database, url_variable=UNREACHABLE))


# --- hosts without compose --------------------------------------------------------------------


def test_no_compose_host_starts_a_stopped_slot(scene_stack: DrillStack) -> None:
    two_deployments(scene_stack)
    env = without_compose(scene_stack.env)
    assert docker.inspect(env.slot("green").container).status == "exited"
    result = rollback.rollback(env)
    assert result.plan.facts["container_action"] == "start"
    assert through_proxy(env) == ("green", V2.tag)


@pytest.mark.parametrize("compose_file", [None, "missing"])
def test_no_compose_host_refuses_to_recreate_a_removed_slot(
        scene_stack: DrillStack, compose_file: str | None, tmp_path: Path) -> None:
    two_deployments(scene_stack)
    file = None if compose_file is None else tmp_path / "docker-compose.blue-green.yml"
    env = without_compose(scene_stack.env, file)
    container = env.slot("green").container
    docker.remove(container)
    before = snapshot(env)
    for dry_run in (True, False):
        with pytest.raises(RunbookError) as err:
            rollback.rollback(env, dry_run=dry_run)
        text = str(err.value)
        assert err.value.exit_code == ExitCode.PRECONDITION and "\n" not in text
        assert f"{container} must be recreated with {V2.image}" in text
        assert "the way it was created" in text and "docker run" in text
        # never `runbook deploy`: it needs compose and refuses on this host
        assert f"runbook deploy {command_arg(env)} --version" not in text
        assert ("[compose] file is not set" if file is None
                else f"the compose file {file} does not exist") in text
        assert snapshot(env) == before


def test_no_compose_host_cli_exit_4_one_line(scene_stack: DrillStack, tmp_path: Path) -> None:
    two_deployments(scene_stack)
    env = without_compose(scene_stack.env)
    toml = tmp_path / "docker-run-host.toml"
    toml.write_text(envmod.to_toml(env))
    assert "service" not in toml.read_text()
    docker.remove(env.slot("green").container)
    state_before = env.state_file.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "runbook.cli", "rollback", str(toml), "--yes"],
                          capture_output=True, text=True, check=False, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "RUNBOOK_CONFIG"})
    assert proc.returncode == 4, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "must be recreated" in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert env.state_file.read_bytes() == state_before


# --- the schema guard fails closed ------------------------------------------------------------


def test_unreadable_schema_stops_the_rollback(scene_stack: DrillStack,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    env = unreachable_db(two_deployments(scene_stack), monkeypatch)
    before = snapshot(env)
    for dry_run in (True, False):
        with pytest.raises(RunbookError) as err:
            rollback.rollback(env, dry_run=dry_run)
        text = str(err.value)
        assert err.value.exit_code == ExitCode.PRECONDITION and "\n" not in text
        assert "schema guard: the database schema cannot be read (database unreachable" in text
        assert "--force" in text and SECRET not in text
        assert snapshot(env) == before


def test_unreadable_schema_with_force_says_what_was_skipped(
        scene_stack: DrillStack, monkeypatch: pytest.MonkeyPatch) -> None:
    env = unreachable_db(two_deployments(scene_stack), monkeypatch)
    forced = rollback.Options(force=True)
    dry = rollback.rollback(env, forced, dry_run=True)
    text = dry.plan.render()
    assert "schema guard skipped (--force): the database schema cannot be read" in text
    assert SECRET not in text
    result = rollback.rollback(env, forced)
    assert any("schema guard skipped" in w for w in result.plan.warnings)
    assert through_proxy(env) == ("green", V2.tag)


def test_unreadable_schema_cli_dry_run_prints_the_skip(
        scene_stack: DrillStack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = unreachable_db(two_deployments(scene_stack), monkeypatch)
    toml = tmp_path / "env.toml"
    toml.write_text(envmod.to_toml(env))
    base = [sys.executable, "-m", "runbook.cli", "rollback", str(toml)]
    refused = subprocess.run([*base, "--yes"], capture_output=True, text=True, check=False,
                             timeout=120)
    assert refused.returncode == 4 and "schema cannot be read" in refused.stderr
    assert SECRET not in refused.stderr + refused.stdout
    forced = subprocess.run([*base, "--force", "--dry-run"], capture_output=True, text=True,
                            check=False, timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert "schema guard skipped (--force)" in forced.stdout


# --- deployments recorded without a migration version -------------------------------------------


def test_missing_version_comes_from_the_pre_deploy_sidecar(stack: DrillStack) -> None:
    env = stack.env
    deploy.deploy(env, deploy.Options(version=V2.tag))  # v1 (schema 1) -> v2 migrates to 2
    forget_migration_version(env, V1.tag)
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env)
    assert err.value.exit_code == ExitCode.PRECONDITION
    assert f"schema is at 2 but {V1.tag} ran with 1" in str(err.value)
    assert snapshot(env) == before
    dry = rollback.rollback(env, rollback.Options(force=True), dry_run=True)
    details = dry.plan.steps[1].details  # after the lock step: pre-flight
    assert details["target ran with"].startswith("1 (from sidecar ")
    assert "pre-deploy snapshot of" in details["target ran with"]


def test_another_databases_snapshot_in_a_shared_folder_is_no_witness(stack: DrillStack) -> None:
    """Found by review: the folder may be shared (the default one is). Another database's
    sidecar, taken while the target was live, said which schema the target "ran with" (here
    the current one: "compatible", on a target that ran with 1)."""
    env = stack.env
    deploy.deploy(env, deploy.Options(version=V2.tag))  # v1 (schema 1) -> v2 migrates to 2
    forget_migration_version(env, V1.tag)
    for sidecar in env.database.snapshot_dir.glob("*.meta.json"):
        sidecar.unlink()
    target = states.read_state(env.state_file).find_version(V1.tag)
    assert target is not None
    stem = "togather_staging_20200101_000000_manual"
    (env.database.snapshot_dir / f"{stem}.sql.gz").write_bytes(gzip.compress(b"-- staging\n"))
    (env.database.snapshot_dir / f"{stem}.meta.json").write_text(json.dumps({
        "snapshot_name": f"{stem}.sql.gz", "database": "staging", "environment": "staging",
        "timestamp": states.format_time(target.deployed_at), "reason": "manual",
        "migration_version": 2, "dirty": False}))
    dry = rollback.rollback(env, rollback.Options(force=True), dry_run=True)
    details = dry.plan.steps[1].details
    assert stem not in details["target ran with"], details
    assert details["schema guard"] != "compatible", details


def test_a_running_targets_health_is_no_witness_of_the_schema_it_ran_with(
        scene_stack: DrillStack) -> None:
    """Found by review: the plan took a running target's /health migrations version for the
    schema it ran with. The real app reports there whatever `schema_migrations` holds (the
    database's version, passing), so the guard said "compatible" on any schema. (The drill
    app fails its check on a schema ahead of its build, which the real app does not, so the
    drill cannot show the false "compatible" on a newer schema: it shows the witness taken.)"""
    env = two_deployments(scene_stack, stop_old_slot=False)  # v2 stays running on green
    forget_migration_version(env, V2.tag)
    for sidecar in env.database.snapshot_dir.glob("*.meta.json"):
        sidecar.unlink()
    dry = rollback.rollback(env, dry_run=True)
    details = dry.plan.steps[1].details
    assert details["schema guard"] == "not checked (version not known)", details
    assert "migrations check" not in details["target ran with"], details
    assert f"the migration version {V2.tag} ran with is unknown" in dry.plan.render()


def rejects_the_schema(env: Environment, slot: Slot, timeout: float = 30) -> bool:
    """Whether the slot's app answers /health with its migrations check failing, once it
    answers at all (a container just made takes a moment)."""
    from runbook.drill import http as drill_http

    deadline = time.monotonic() + timeout
    while True:
        try:
            body = drill_http.get(f"{env.slot(slot).base_url}/health", timeout=3).json()
        except (httpx.HTTPError, ValueError):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
            continue
        return bool(body["checks"]["migrations"]["status"] == "fail")


def test_a_running_target_made_from_a_moving_tag_that_rejects_the_schema_is_refused(
        scene_stack: DrillStack, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The target's running container is its witness when its migrations check fails (the
    build rejects the schema), but it was found by name (`== target.image`): one made from
    `<repo>:latest`, whose record holds the versioned name, was no witness, and the guard said
    "not checked" and let the rollback put that build on a schema it rejects. The build
    (image id) is compared. Oracle: the drill's v1 knows schema 1 and the database is at 2
    (scenes.MIGRATED); nothing changes (the state file, Caddy, the containers, the proxy)."""
    if scene_stack.has("docker-run"):
        pytest.skip("the container is made through compose; a docker-run host has none")
    scene_stack.arrange(scenes.MIGRATED)  # v2 serves from green on schema 2; v1 ran with 1
    env = scene_stack.env
    forget_migration_version(env, V1.tag)
    for found in env.database.snapshot_dir.glob("togather_*"):
        found.unlink()  # no sidecar, no pre-deploy dump: only the app can say it
    target = states.read_state(env.state_file).find_version(V1.tag)
    assert target is not None and target.image == V1.image, target
    latest = retag(scene_stack, request, V1.image, "togather-moving", tag="latest")
    running_from(env, tmp_path, Slot.BLUE, latest, healthy=False)  # v1's build (another tool)
    assert rejects_the_schema(env, Slot.BLUE)  # the premise, asked of the app itself
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env, dry_run=True)
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert f"{V1.tag} in {env.slot(Slot.BLUE).container} rejects the database schema" \
        in str(err.value), err.value
    assert snapshot(env) == before


def test_a_tooling_pre_deploy_snapshot_without_a_version_is_read_for_the_targets_schema(
        scene_stack: DrillStack) -> None:
    """Found by review: on a host whose history the tooling recorded (no migration version
    in the state file, none in its snapshot sidecars), the guard said "not checked" and the
    rollback went ahead onto the newer schema. The pre-deploy snapshot of the deployment
    that replaced the target holds the target's schema in its own schema_migrations: read
    from the dump, the guard refuses as it does with a recorded version."""
    scene_stack.arrange(scenes.MIGRATED)  # v1 (schema 1) then v2 migrated to 2, snapshot
    env = scene_stack.env
    forget_migration_version(env, V1.tag)
    for sidecar in env.database.snapshot_dir.glob("*.meta.json"):
        meta = json.loads(sidecar.read_text())
        meta.pop("migration_version", None)  # as the tooling's sidecars: no version
        sidecar.write_text(json.dumps(meta))
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env, dry_run=True)
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert f"the database schema is at 2 but {V1.tag} ran with 1" in str(err.value), err.value
    forced = rollback.rollback(env, rollback.Options(force=True), dry_run=True)
    details = forced.plan.steps[1].details
    assert details["target ran with"].startswith("1 (from the dump of "), details


def test_missing_version_with_no_witness_the_plan_says_so(scene_stack: DrillStack) -> None:
    env = two_deployments(scene_stack)  # v2 stopped on green
    forget_migration_version(env, V2.tag)
    for sidecar in env.database.snapshot_dir.glob("*.meta.json"):
        sidecar.unlink()
    dry = rollback.rollback(env, dry_run=True)
    text = dry.plan.render()
    assert f"the migration version {V2.tag} ran with is unknown" in text
    assert "no snapshot sidecar" in text and "/health reports the database's version" in text
    assert dry.plan.steps[1].details["schema guard"] == "not checked (version not known)"


def redated(snap: Path, when: datetime) -> Path:
    """The snapshot as if taken at `when`: renamed and its sidecar's times moved (the dump,
    and so its sha256, unchanged)."""
    stamp = f"{when:%Y%m%d_%H%M%S}"
    old_meta = snap.with_name(snap.name.removesuffix(".sql.gz") + ".meta.json")
    new = snap.with_name(re.sub(r"_\d{8}_\d{6}_", f"_{stamp}_", snap.name, count=1))
    meta = json.loads(old_meta.read_text())
    meta.update(snapshot_name=new.name, timestamp=when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                expires_at=(when + timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    snap.rename(new)
    old_meta.unlink()
    new.with_name(new.name.removesuffix(".sql.gz") + ".meta.json").write_text(json.dumps(meta))
    return new


def own_pre_deploy_snapshots_removed(env: Environment, dep: states.Deployment) -> None:
    """What the deploy script leaves: no pre-deploy snapshot of `dep` the runbook can find
    (its snapshot call aborts, CONTRACTS), so no snapshot says the schema before it."""
    for sidecar in env.database.snapshot_dir.glob("*.meta.json"):
        if json.loads(sidecar.read_text()).get("deployment_id") == dep.id:
            sidecar.with_name(sidecar.name.replace(".meta.json", ".sql.gz")).unlink()
            sidecar.unlink()


def test_a_release_restored_once_is_never_judged_by_the_restores_safety_snapshot(
        stack: DrillStack) -> None:
    """Found by review: v1 (schema 1), v2 migrated to 2, `rollback --restore-snapshot` back
    to v1 (its safety snapshot holds v2's database, at 2), then the deploy script's v3
    (migrated to 2 again, no pre-deploy snapshot). v1's record kept its first deployed_at and
    no schema, so "taken while v1 was live" reached over v2's hours and the restore: the
    safety snapshot said v1 ran with 2, the guard called v1 on schema 2 "compatible", and
    `--restore-snapshot` would have restored that safety snapshot (the first restore undone).
    The rollback now records the schema it checked and when v1 went live again; a file the
    Go CLI rewrote since (dropping both) is judged without the safety snapshot."""
    env = stack.env
    deploy.deploy(env, deploy.Options(version=V2.tag))  # pre-deploy snapshot at 1, then 2
    forget_migration_version(env, V1.tag)  # v1 as the tooling recorded it
    rollback.rollback(env, rollback.Options(restore_snapshot="auto"))  # v1 again, schema 1
    [safety] = env.database.snapshot_dir.glob("*_pre-restore.sql.gz")
    deploy.deploy(env, deploy.Options(version=V3.tag))  # migrates 1 -> 2
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.version == V3.tag
    own_pre_deploy_snapshots_removed(env, st.current)
    [v2_pre_deploy] = [p for p in env.database.snapshot_dir.glob("*_pre-deploy.sql.gz")]
    with stack.connect() as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (2,)
    as_recorded = env.state_file.read_bytes()
    doc = json.loads(as_recorded)  # a Go CLI rewrite drops the keys it does not know
    for key in ("migration_version", "live_since"):
        doc["previous_deployment"].pop(key, None)
        for entry in doc["deployment_history"]:
            if entry["version"] == V1.tag:
                entry.pop(key, None)
    env.state_file.write_text(json.dumps(doc))
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env, dry_run=True)
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert f"the database schema is at 2 but {V1.tag} ran with 1" in str(err.value), err.value
    assert safety.name not in str(err.value), err.value
    restore = rollback.rollback(env, rollback.Options(restore_snapshot="auto"), dry_run=True)
    details = restore.plan.steps[1].details
    assert details["restore"] == v2_pre_deploy.name, details
    assert safety.name not in details["target ran with"], details
    assert snapshot(env) == before
    env.state_file.write_bytes(as_recorded)  # as the rollback recorded v1
    recorded = json.loads(as_recorded)["previous_deployment"]
    assert recorded["version"] == V1.tag and recorded["migration_version"] == 1, recorded
    assert "live_since" in recorded, recorded
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env, dry_run=True)
    assert f"the database schema is at 2 but {V1.tag} ran with 1" in str(err.value), err.value


def test_a_snapshot_taken_while_the_next_deploy_migrated_is_no_witness_of_the_previous(
        stack: DrillStack) -> None:
    """Found by review: the deploy script records `deployed_at` only after its migrations,
    slot start, health gate and switch. An hourly `runbook snapshot create` landing in
    between is at the new schema but dated before the new deployment: taken as "taken while"
    the previous one "was live", the guard called v1 on schema 2 "compatible", and
    `--restore-snapshot` picked that snapshot (schema 2) for v1. The witnesses in v1's window
    disagree: the guard now says it cannot tell, and the restore asks for a file."""
    env = stack.env
    hourly = snapshots.create(env, "hourly").path  # while v1 serves, at schema 1
    deploy.deploy(env, deploy.Options(version=V2.tag))  # migrates to 2
    forget_migration_version(env, V1.tag)
    st = states.read_state(env.state_file)
    assert st.current is not None and st.previous is not None
    v1, v2 = st.previous, st.current
    own_pre_deploy_snapshots_removed(env, v2)
    served_from = v2.deployed_at - timedelta(days=1)  # v1 served for a day
    st = st.with_(previous=v1.with_(deployed_at=served_from),
                  history=tuple(d.with_(deployed_at=served_from) if d.id == v1.id else d
                                for d in st.history))
    states.write_state(env.state_file, st)
    hourly = redated(hourly, served_from + timedelta(hours=1))
    mid = redated(snapshots.create(env, "hourly").path, v2.deployed_at - timedelta(seconds=1))
    for snap, schema in ((hourly, 1), (mid, 2)):  # the premise: what each one's sidecar says
        meta = json.loads(snap.with_name(snap.name.replace(".sql.gz", ".meta.json")).read_text())
        assert meta["migration_version"] == schema, meta
    before = snapshot(env)
    dry = rollback.rollback(env, dry_run=True)
    details = dry.plan.steps[1].details
    assert details["schema guard"] == "not checked (version not known)", details
    assert "disagree" in details["target ran with"], details
    for snap in (hourly, mid):
        assert snap.name.removesuffix(".sql.gz") in details["target ran with"], details
    assert f"the migration version {V1.tag} ran with is unknown" in dry.plan.render()
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env, rollback.Options(restore_snapshot="auto"), dry_run=True)
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert f"the schema {V1.tag} ran with is unknown" in str(err.value), err.value
    assert snapshot(env) == before


@pytest.mark.parametrize("mount", ["file", "directory"])
def test_a_caddy_container_that_mounts_the_caddyfile_itself_is_refused_in_preflight(
        tmp_path: Path, mount: str) -> None:
    """`-v ./Caddyfile:/etc/caddy/Caddyfile` (the Caddy image's own example): the runbook's
    atomic write (a rename) never reaches such a mount, so Caddy's copy would keep naming the
    old slot, stopped after the switch, for its next restart. Refused before anything
    changes; a mount of the directory is fine. The premise is shown first: after a rename
    the container still reads the old bytes through a file mount."""
    from runbook import files, preflight
    from runbook.drill import images
    from runbook.errors import PreconditionError
    from tests.drill_checks import host_env

    folder = tmp_path / "caddy"
    folder.mkdir()
    caddyfile = folder / "Caddyfile"
    caddyfile.write_text(":80 {\n\trespond old\n}\n")
    name = f"togather-mount-test-{os.getpid()}-{mount}"
    source, target = ((caddyfile, "/etc/caddy/Caddyfile") if mount == "file"
                      else (folder, "/etc/caddy"))
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "--label",
                    "togather.drill=mount-test", "-v", f"{source}:{target}", "--entrypoint",
                    "sleep", images.LOCAL_CADDY, "120"], check=True, capture_output=True)
    try:
        files.atomic_write(caddyfile, b":80 {\n\trespond new\n}\n")
        seen = subprocess.run(["docker", "exec", name, "cat", "/etc/caddy/Caddyfile"],
                              capture_output=True, text=True, check=True).stdout
        assert ("respond old" in seen) == (mount == "file"), seen  # the premise
        base = host_env(tmp_path)
        env = base.with_(caddy=dataclasses.replace(
            base.caddy, caddyfile=caddyfile, command=("docker", "exec", "-i", name, "caddy"),
            container_path="/etc/caddy/Caddyfile"))
        if mount == "file":
            with pytest.raises(PreconditionError) as err:
                preflight.caddyfile_mount(env)
            assert "bind-mounts the Caddyfile itself" in err.value.message
            assert "mount its directory" in (err.value.fix or "")
        else:
            assert "sees the Caddyfile's directory" in preflight.caddyfile_mount(env)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)


def test_a_switch_beside_a_caddy_container_that_mounts_the_caddyfile_itself_is_refused(
        stack: DrillStack) -> None:
    """Found by review: rollback and deploy refuse a Caddy container that bind-mounts the
    Caddyfile itself (above), but `runbook switch` never asked: it loaded the new text through
    the admin API and exited 0, while the container's copy of the file kept naming the old
    slot for its next `caddy reload`. Refused the same way now, nothing changed."""
    from runbook import switch
    from runbook.drill import images
    from runbook.environment import Slot

    env = two_deployments(stack)  # v3 serving from blue, v2 stopped on green
    name = f"togather-mount-test-{os.getpid()}-switch"
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "--label",
                    "togather.drill=mount-test", "-v",
                    f"{env.caddy.caddyfile}:/etc/caddy/Caddyfile", "--entrypoint", "sleep",
                    images.LOCAL_CADDY, "120"], check=True, capture_output=True)
    try:
        mounted = env.with_(caddy=dataclasses.replace(
            env.caddy, command=("docker", "exec", "-i", name, "caddy"),
            container_path="/etc/caddy/Caddyfile"))
        before = snapshot(env)
        with pytest.raises(RunbookError) as err:
            switch.switch(mounted, switch.Options(slot=Slot.GREEN))
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert "bind-mounts the Caddyfile itself" in err.value.message, err.value
    assert snapshot(env) == before


@needs_root
def test_a_compose_file_this_user_cannot_reach_is_said_never_a_crash(tmp_path: Path) -> None:
    """A rollback's recovery text asks whether compose can recreate a slot: a compose file
    in a directory the runbook's user cannot search made `Path.is_file()` raise, and every
    rollback, even one that only starts a stopped slot, ended as an unexpected failure. The
    user is a real unprivileged one (uid 1000)."""
    from tests.drill_checks import DEPLOY_UID, as_deploy_user

    private = tmp_path / "private"
    private.mkdir()
    (private / "docker-compose.blue-green.yml").write_text("services: {}\n")
    private.chmod(0o700)  # root's: uid 1000 cannot search it
    tmp_path.chmod(0o755)
    imports = ("import dataclasses, sys\nfrom pathlib import Path\nfrom runbook import compose\n"
               "from runbook.environment import Slot\nfrom tests.drill_checks import host_env\n"
               "base = host_env(Path(sys.argv[1]))\n"
               "env = base.with_(compose=dataclasses.replace(base.compose, "
               "file=Path(sys.argv[1]) / 'private' / 'docker-compose.blue-green.yml'))\n")
    code = "print(compose.deploy_hint(env))\n"
    said = as_deploy_user([DEPLOY_UID], imports, code, str(tmp_path))
    assert "runbook switch" in said and "cannot be read" not in said, said  # no crash: a hint


@pytest.mark.parametrize("command,container", [
    (("docker", "exec", "caddy", "caddy"), "caddy"),
    (("docker", "container", "exec", "-i", "edge", "caddy"), "edge"),
    (("sudo", "docker", "exec", "edge", "caddy"), "edge"),
    (("sudo", "-u", "ops", "docker", "--context", "prod", "exec", "-u", "root", "edge",
      "caddy"), "edge"),
    # podman's containers are not on the engine the runbook inspects: never read as Docker's
    (("/usr/bin/podman", "exec", "edge", "caddy"), None),
    (("docker", "compose", "exec", "caddy", "caddy"), None),  # a service, not a container
    (("docker-compose", "exec", "caddy", "caddy"), None),
    (("caddy",), None),
])
def test_the_caddy_container_is_read_from_every_usual_command_form(
        command: tuple[str, ...], container: str | None) -> None:
    """The mount check found the container only in `docker exec NAME ...`: `docker container
    exec`, `sudo docker exec` or a `--context` skipped it without a word. Every docker form
    now gets the check, or says it could not make it."""
    from runbook import caddy_command

    assert caddy_command.exec_container(command) == container


@pytest.mark.parametrize("command,expected", [
    (("docker", "exec", "edge", "caddy"),
     ("docker", "exec", "-i", "-w", "/etc/caddy", "edge", "caddy")),
    # its own -w (an option with a value) stays, and ours, given after it, wins
    (("sudo", "-u", "ops", "docker", "--context", "prod", "container", "exec", "-w", "/srv",
      "--user=root", "edge", "caddy"),
     ("sudo", "-u", "ops", "docker", "--context", "prod", "container", "exec", "-w", "/srv",
      "--user=root", "-i", "-w", "/etc/caddy", "edge", "caddy")),
    # Compose's exec passes stdin on already; -T: no TTY, which would mangle it (found by
    # review: started in the folder, only the docker client moved there, not Caddy)
    (("docker", "compose", "exec", "caddy", "caddy"),
     ("docker", "compose", "exec", "-T", "-w", "/etc/caddy", "caddy", "caddy")),
    (("sudo", "docker", "compose", "-f", "/srv/edge.yml", "-p", "edge", "exec", "--index", "1",
      "-u", "root", "caddy", "caddy"),
     ("sudo", "docker", "compose", "-f", "/srv/edge.yml", "-p", "edge", "exec", "--index", "1",
      "-u", "root", "-T", "-w", "/etc/caddy", "caddy", "caddy")),
    (("/usr/local/bin/docker-compose", "exec", "edge", "caddy"),
     ("/usr/local/bin/docker-compose", "exec", "-T", "-w", "/etc/caddy", "edge", "caddy")),
    (("podman-compose", "--project-name", "edge", "exec", "edge", "caddy"),
     ("podman-compose", "--project-name", "edge", "exec", "-T", "-w", "/etc/caddy", "edge",
      "caddy")),
    (("podman", "exec", "edge", "caddy"),
     ("podman", "exec", "-i", "-w", "/etc/caddy", "edge", "caddy")),
    (("docker", "compose", "run", "caddy", "caddy"), None),  # a new container, not Caddy's
    (("docker", "run", "--rm", "caddy:2", "caddy"), None),
    (("docker", "compose", "exec", "-T"), None),  # no service named
    (("docker", "exec", "-u"), None),  # no container named
    (("caddy",), None),
    (("/opt/bin/caddy-wrapper",), None),
])
def test_a_caddy_in_a_container_is_given_its_stdin_in_the_caddyfiles_folder(
        command: tuple[str, ...], expected: tuple[str, ...] | None) -> None:
    """A dry run gives Caddy the candidate Caddyfile on its stdin (it writes no file beside
    the Caddyfile): `docker exec` passes stdin on only with -i, and Caddy resolves the
    relative imports of a config read from stdin from its working directory, which only
    the exec's -w sets inside a container."""
    from runbook import caddy_command

    assert caddy_command.exec_reading_stdin(command, "/etc/caddy") == expected


@pytest.mark.parametrize("command,here", [
    (("{binary}",), True),
    (("sudo", "-u", "ops", "{binary}"), True),
    (("sudo", "-i", "{binary}"), False),  # a login shell: starts in the user's home
    (("sudo", "--chdir", "/", "{binary}"), False),
    (("docker", "exec", "edge", "caddy"), False),
    (("ssh", "edge", "caddy"), False),
    (("{shim}",), False),  # a script named caddy (here one running `docker exec`)
    (("sudo", "-u", "ops", "{shim}"), False),
    (("{tmp}/not-installed/caddy",), False),
])
def test_only_a_caddy_on_this_host_is_started_in_the_caddyfiles_folder(
        command: tuple[str, ...], here: bool, tmp_path: Path) -> None:
    """Starting the command in the Caddyfile's folder places Caddy there only when it is a
    program named caddy on this host, not a script (found by review: `docker compose exec`
    started there moved the docker client, not Caddy in its container; a script may run
    Caddy anywhere). Here a copy of a real program (true) named caddy stands for Caddy's
    binary; test_rollback's local-caddy dry run starts Caddy's own there."""
    from runbook import caddy_command

    (tmp_path / "bin").mkdir()
    binary = tmp_path / "bin" / "caddy"
    shutil.copy(shutil.which("true") or "/bin/true", binary)
    shim = tmp_path / "caddy"
    shim.write_text('#!/bin/sh\nexec docker exec -i edge caddy "$@"\n')
    shim.chmod(0o755)
    words = tuple(w.format(binary=binary, shim=shim, tmp=tmp_path) for w in command)
    assert caddy_command.runs_caddy_here(words) is here
