"""The gates that decide a switch compare the schema the slot's app reports with the one the
runbook read itself, against the real drill stack.

A slot whose DATABASE_URL names another database than the runbook's passed its health gate
(its own database answered), traffic moved to it, and the run said done while users were
served from a database the runbook never checked or restored (a standing gap of earlier
reviews). Each test puts a slot on a second database created in the drill's Postgres, at
another schema version, and proves the run refuses before traffic moves; an app whose
/health reports no migrations version goes ahead, the run saying it could not compare."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runbook import deploy, docker, health, rollback, snapshot_restore, snapshots
from runbook.drill import http as drill_http
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS, AppVersion
from runbook.environment import Slot
from runbook.errors import ExitCode, RunbookError
from tests.drill_checks import snapshot, through_proxy, two_deployments

pytestmark = pytest.mark.docker
V1, V2, V3 = VERSIONS["v1"], VERSIONS["v2"], VERSIONS["v3"]

# the drill's own app with its migrations check's `details` left out: an app that reports
# no schema version (its /health otherwise as the build's)
NO_DETAILS = ("import sys; sys.path.insert(0, '/app'); import server; "
              "c = server.check_migrations; "
              "server.check_migrations = lambda: {k: v for k, v in c().items() if k != 'details'}; "
              "sys.exit(server.serve())")


@dataclasses.dataclass
class OtherDb:
    name: str
    app_url: str  # as the slots reach it (the app's URL, another database name)


@pytest.fixture
def other_db(scene_stack: DrillStack) -> Iterator[OtherDb]:
    """A second database in the drill's Postgres, holding only schema_migrations (filled by
    each test): what a slot whose DATABASE_URL names another database reads."""
    name = f"othergate{secrets.token_hex(4)}"
    with scene_stack.connect() as conn:
        conn.execute(f"CREATE DATABASE {name}")
    with scene_stack.connect(name) as conn:
        conn.execute("CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, "
                     "dirty boolean NOT NULL)")
    try:
        yield OtherDb(name, scene_stack.app_database_url.rsplit("/", 1)[0] + f"/{name}")
    finally:
        with scene_stack.connect() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def at_schema(stack: DrillStack, db: OtherDb, version: int) -> None:
    with stack.connect(db.name) as conn:
        conn.execute("DELETE FROM schema_migrations")
        conn.execute("INSERT INTO schema_migrations VALUES (%s, false)", (version,))


@pytest.fixture
def replaced() -> Iterator[list[str]]:
    """Containers a test made by hand: removed after it, so the next arrangement makes the
    scene's own again (it keeps a container on the scene's image, whatever its env)."""
    made: list[str] = []
    yield made
    for name in made:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)


def make_slot(stack: DrillStack, made: list[str], slot: Slot, version: AppVersion,
              database_url: str, *, start: bool, code: str | None = None) -> None:
    """`slot`'s container made anew as a docker-run host makes it (the contract's name,
    labels, port, network), from `version`'s image, reading `database_url`; created only
    (stopped: a rollback starts it) unless `start`. `code`: the app run as `python3 -c`."""
    name = stack.env.slot(slot).container
    stack.docker("rm", "-f", name, check=False)
    made.append(name)
    argv = stack.docker_run_argv(slot, version.image)
    if not start:
        argv = ["docker", "create", *argv[3:]]  # `docker run -d ...` without run -d
    if code is not None:
        argv = [*argv[:-1], "--entrypoint", "python3", argv[-1], "-c", code]
    subprocess.run(argv, check=True, capture_output=True, timeout=60,
                   env={**os.environ, "DATABASE_URL": database_url})


def answering(stack: DrillStack, slot: Slot, timeout: float = 30.0) -> None:
    import time

    url = f"{stack.env.slot(slot).base_url}/health"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if drill_http.get(url, timeout=2).status_code == 200:
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer 200"
        time.sleep(0.05)


def gate_detail(record_file: str | None) -> dict[str, Any]:
    record = json.loads(Path(str(record_file)).read_text())
    return next(s for s in record["steps"] if s["name"] == "health-gate")["detail"]


def test_a_rollback_whose_target_reads_another_database_is_refused_at_its_gate(
        scene_stack: DrillStack, other_db: OtherDb, replaced: list[str]) -> None:
    """v3 serves from blue; green, the rollback's target v2, was made with a DATABASE_URL
    naming another database, at schema 1 (the runbook's is at 2). Its /health answers
    degraded (pending migrations), which the gate passed: the rollback switched and exited 0.
    Refused now at the gate, naming both numbers and the runbook's database, password never
    shown; traffic, state and Caddyfile stay; with green on the right database the same
    rollback goes ahead and says the schema was compared."""
    stack = scene_stack
    env = two_deployments(stack)  # v3 serving blue, v2 stopped on green, schema 2
    at_schema(stack, other_db, 1)
    make_slot(stack, replaced, Slot.GREEN, V2, other_db.app_url, start=False)
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env)
    text = str(err.value)
    assert err.value.exit_code == ExitCode.FAILED_SAFELY, text
    assert "reports schema 1" in text and "is at 2" in text, text
    assert f"127.0.0.1:{stack.ports.postgres}/" in text or "togather-db:5432/" in text, text
    assert "another database" in text and "DATABASE_URL" in text, text
    assert stack.password not in text and "\n" not in err.value.message
    after = snapshot(env)
    assert after["traffic"] == ("blue", V3.tag)
    assert after["state"] == before["state"] and after["caddyfile"] == before["caddyfile"]
    assert not after["lock"]
    assert not docker.inspect(env.slot("green").container).running  # undone: stopped again
    # green on the runbook's database: the same rollback goes ahead, the schema compared
    make_slot(stack, replaced, Slot.GREEN, V2, stack.app_database_url, start=False)
    done = rollback.rollback(env)
    assert through_proxy(env) == ("green", V2.tag)
    said = gate_detail(done.record_file)["schema"]
    assert said.startswith("2,") and "the database the runbook checked" in said, said


def test_a_rollback_whose_target_reports_no_schema_version_goes_ahead_saying_so(
        scene_stack: DrillStack, replaced: list[str]) -> None:
    """An app whose /health names no migrations version (fewer fields, as on the
    minimal-health host shape) cannot be compared: nothing is refused, and the plan and the
    journal say the check could not be made."""
    stack = scene_stack
    env = two_deployments(stack)
    make_slot(stack, replaced, Slot.GREEN, V2, stack.app_database_url, start=False,
              code=NO_DETAILS)
    done = rollback.rollback(env)
    assert through_proxy(env) == ("green", V2.tag)
    report = health.probe(env.slot(Slot.GREEN))
    assert report.ok and all(not c.details for c in report.checks), report.body
    said = gate_detail(done.record_file)["schema"]
    assert said.startswith("not compared") and "reports no migrations version" in said, said
    planned = next(s for s in done.plan.steps if s.name == "health-gate").details["schema"]
    assert "must be 2" in planned and "not compared when it reports none" in planned, planned


def _restore_refused(stack: DrillStack, other_db: OtherDb, replaced: list[str],
                     slot: Slot) -> tuple[str, str]:
    """The baseline with `slot` (v1, running) reading the other database; a snapshot of the
    runbook's taken and restored: (its restart gate's refusal (exit 5) as text, the
    snapshot's name)."""
    stack.reset()
    make_slot(stack, replaced, slot, V1, other_db.app_url, start=True)
    answering(stack, slot)
    assert through_proxy(stack.env) == ("blue", V1.tag)
    snap = snapshots.create(stack.env, "manual")
    with pytest.raises(RunbookError) as err:
        snapshot_restore.restore(stack.env, snap.name)
    text = str(err.value)
    assert err.value.exit_code == ExitCode.ATTENTION, text
    return text, snap.name


def test_a_snapshot_restore_restart_gate_refuses_a_slot_reading_another_database(
        scene_stack: DrillStack, other_db: OtherDb, replaced: list[str]) -> None:
    """The baseline (v1 serving blue, schema 1), but blue was made reading another database
    that no migration ever ran on (version 0). `runbook snapshot restore` restarted it on the
    restored schema 1 and said done (exit 0): the restore never reached what users are served
    from. Its restart gate now compares and says so (exit 5, as its failed gate), naming
    both numbers."""
    stack = scene_stack
    env = stack.env
    text, _ = _restore_refused(stack, other_db, replaced, Slot.BLUE)
    assert "the database was restored" in text and "reports schema 0" in text, text
    assert "restored" in text and "is at 1" in text and "another database" in text, text
    # said as it is: blue runs and serves (never "the app slots are stopped"), and where the
    # data from before the restore is
    assert "left running: it serves, Caddy points at it" in text, text
    assert "slots are stopped" not in text, text
    assert "_pre-restore.sql.gz" in text and stack.password not in text, text
    # found by review: "run the same command again" restored again once blue was fixed,
    # over every write since; a blue started after the restore kept no older version
    assert "already restored (schema 1)" in text and "do NOT run the restore again" in text
    assert "run the same command again" not in text and "read at start-up and kept" not in text
    assert docker.inspect(env.slot("blue").container).running  # the serving slot: left as is
    assert through_proxy(env) == ("blue", V1.tag)


def test_a_deploy_whose_new_slot_reads_another_database_is_refused_after_its_migrations(
        scene_stack: DrillStack, other_db: OtherDb, replaced: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The compose file gives the slots another database than the runbook's env file names
    (APP_DATABASE_URL, here another database at schema 2). Deploying v2 over the baseline
    (schema 1): its migrations ran there, its gate passed, and v2 served while the runbook's
    database stayed at 1 (exit 0). Refused now after the migrations: traffic stays on v1."""
    stack = scene_stack
    if stack.has("docker-run"):
        pytest.skip("runbook deploy needs compose")
    stack.reset()
    env = stack.env
    at_schema(stack, other_db, 2)
    monkeypatch.setenv("APP_DATABASE_URL", other_db.app_url)
    replaced.append(env.slot(Slot.GREEN).container)
    with pytest.raises(RunbookError) as err:
        deploy.deploy(env, deploy.Options(version=V2.tag))
    text = str(err.value)
    assert err.value.exit_code == ExitCode.FAILED_SAFELY, text
    assert "reports schema 2" in text and "is at 1" in text, text
    assert through_proxy(env) == ("blue", V1.tag)
    assert not docker.inspect(env.slot("green").container).running


def test_a_snapshot_restore_names_a_standby_reading_another_database_as_a_standby(
        scene_stack: DrillStack, other_db: OtherDb, replaced: list[str]) -> None:
    """Found by review: the restart gate's words said "(left running: it serves)" of every
    slot, and nothing of the slots started beside it. Blue serves v1 on the runbook's
    database; green, a running standby v1, reads another database (schema 0). The restore
    stops and starts both: green is said to run as a standby (Caddy points at blue), blue
    named as started again, and the fix never asks for the restore to be run again."""
    stack = scene_stack
    env = stack.env
    text, snap_name = _restore_refused(stack, other_db, replaced, Slot.GREEN)
    assert "slot green reports schema 0" in text, text
    green, blue = env.slot("green").container, env.slot("blue").container
    assert f"{green} runs again (left running as a standby: Caddy points at blue)" in text, text
    assert "it serves" not in text, text
    assert f"{blue} started again" in text, text
    assert "do NOT run the restore again" in text and f"make {green} read" in text, text
    assert docker.inspect(green).running and docker.inspect(blue).running
    assert through_proxy(env) == ("blue", V1.tag)
    # the run records read this run as one that left the database restored (its safety
    # snapshot the data from before it): kept, but never said to have been killed
    rerun = snapshot_restore.restore(env, snap_name, dry_run=True)
    [said] = [w for w in rerun.plan.warnings if "the last run was" in w]
    assert "killed during or after its restore, or failed after it" in said, said
    assert "as it is now" in said and "as it left it" not in said, said


def test_a_rollback_restore_whose_target_reads_another_database_never_asks_to_restore_again(
        scene_stack: DrillStack, other_db: OtherDb, replaced: list[str]) -> None:
    """v2 serves from green on schema 2; blue, the rollback's target v1, was made reading
    another database at schema 0. `rollback --restore-snapshot` restores schema 1, then
    blue's gate differs: the run stops after its restore committed. What it says must be
    true, and never send on-call to restore again over the writes since."""
    stack = scene_stack
    stack.arrange(scenes.MIGRATED)
    env = stack.env
    make_slot(stack, replaced, Slot.BLUE, V1, other_db.app_url, start=False)
    with pytest.raises(RunbookError) as err:
        rollback.rollback(env, rollback.Options(restore_snapshot="auto"))
    text = str(err.value)
    assert err.value.exit_code == ExitCode.ATTENTION, text
    assert "reports schema 0" in text and "the database WAS restored" in text, text
    # started after the restore, blue kept no older version; rerunning the restore is never
    # asked (its gate's fix said "run the same command again" beside "runbook switch")
    assert "already restored (schema 1)" in text and "do NOT run the restore again" in text
    assert "run the same command again" not in text and "read at start-up and kept" not in text
    assert f"--slot {Slot.BLUE}" in text and "the service is down" in text, text
    assert not docker.inspect(env.slot("blue").container).running  # undone: stopped again
