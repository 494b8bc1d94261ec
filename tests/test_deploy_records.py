"""What a deployment records is its own: image repository, commit, pre-deploy snapshot.

- `[compose] image_repository` is honoured for targets read from a state file (which record
  no image of their own), as the build the image compose makes must be;
- a deploy records the commit of what it deployed: /health's, else the image's
  org.opencontainers.image.revision label, else "unknown" (git's null commit), never the
  current deployment's;
- the pre-deploy snapshot is taken before the new slot starts, also when the app migrates
  itself (no migrate_command), so the schema guard always has a snapshot to name.

Variants of a drill version are built locally (FROM a drill image: no registry) with no
commit in /health and a chosen revision label, and deployed for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from runbook import deploy, docker, faults, files, rollback, switch
from runbook import environment as envmod
from runbook import intent as intents
from runbook import state as states
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.errors import ExitCode, RunbookError
from tests.drill_checks import runbook_cli, snapshot, through_proxy, v3_recorded_and_checked

pytestmark = pytest.mark.docker
REPO_ROOT = Path(__file__).resolve().parents[1]
V1, V2, V3 = VERSIONS["v1"], VERSIONS["v2"], VERSIONS["v3"]
UNKNOWN = "0" * 40



def build_variant(tag: str, revision: str) -> str:
    """v3 as version `tag` whose /health reports no git_commit, labelled with `revision`."""
    image = f"togather-server:{tag}"
    dockerfile = (f"FROM {V3.image}\nENV APP_VERSION={tag} GIT_COMMIT=\n"
                  f'LABEL org.opencontainers.image.revision="{revision}"\n')
    subprocess.run(["docker", "build", "-q", "-t", image, "-"], input=dockerfile, text=True,
                   capture_output=True, check=True, timeout=300)
    return image


def started_at(container: str) -> datetime:
    info = docker.inspect(container)
    assert info.started_at is not None
    return datetime.fromisoformat(info.started_at[:26].rstrip("Z") + "+00:00")


def test_a_deploy_records_its_own_commit_and_snapshots_before_the_new_slot_starts(
        stack: DrillStack) -> None:
    env = stack.env
    deploy.deploy(env, deploy.Options(version=V2.tag, reason="arrange"))  # green, schema 2
    labelled, unlabelled = "c0ffee1", "c0ffee2"
    revision = hashlib.sha1(b"c0ffee1").hexdigest()
    images = [build_variant(labelled, revision), build_variant(unlabelled, "")]
    self_migrating = env.with_(migrate_command=())  # the app migrates itself, if at all
    try:
        result = deploy.deploy(self_migrating, deploy.Options(version=labelled))
        st = states.read_state(env.state_file)
        assert st.current is not None and st.previous is not None
        assert (st.current.version, st.current.git_commit) == (labelled, revision)
        assert st.previous.git_commit == V2.git_commit  # untouched, and not copied

        # the snapshot was taken (no migrate_command) and finished before blue started
        steps = [s["name"] for s in json.loads(Path(str(result.record_file)).read_text())
                 ["steps"]]
        assert steps.index("snapshot") < steps.index("start-slot"), steps
        snapshot = Path(st.current.extra["snapshot_path"])
        assert snapshot.is_file()
        meta = json.loads(snapshot.with_name(snapshot.name.removesuffix(".sql.gz")
                                             + ".meta.json").read_text())
        assert meta["deployment_id"] == st.current.id
        taken = datetime.fromtimestamp(snapshot.stat().st_mtime).astimezone()
        assert taken < started_at(env.slot("blue").container), "snapshot after the start"

        deploy.deploy(self_migrating, deploy.Options(version=unlabelled))
        st = states.read_state(env.state_file)
        assert st.current is not None and st.previous is not None
        assert (st.current.version, st.current.git_commit) == (unlabelled, UNKNOWN)
        assert st.previous.git_commit == revision
    finally:
        subprocess.run(["docker", "rmi", "-f", *images], capture_output=True, check=False)


def test_image_repository_is_honoured_for_targets_from_the_state_file(
        stack: DrillStack, tmp_path: Path) -> None:
    """A target that records no image is `[compose] image_repository:<version>`: the build the
    run means. Compose creates the container from its own file's `image:` (the plan showed the
    configured name, compose ran the other: found by review), so the plan shows compose's,
    checked to be the build the configured name gives, and refuses another (exit 4)."""
    env = stack.env.with_(compose=replace(stack.env.compose, image_repository="togather-custom"))
    custom = f"togather-custom:{V2.tag}"
    subprocess.run(["docker", "tag", V2.image, custom], check=True, capture_output=True)
    try:
        st = states.read_state(env.state_file)
        previous = states.make_deployment(V2.tag, V2.git_commit, "green", status="superseded",
                                          migration_version=1)  # records no image
        states.write_state(env.state_file, st.with_(previous=previous))
        written = json.loads(env.state_file.read_text())
        assert "docker_image" not in written["previous_deployment"]
        source = tmp_path / "custom.toml"
        source.write_text(envmod.to_toml(env))
        proc = subprocess.run(
            [sys.executable, "-m", "runbook.cli", "rollback", str(source), "--dry-run",
             "--format", "json"], capture_output=True, text=True, timeout=120, check=False,
            stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
            env={k: v for k, v in os.environ.items() if k != "RUNBOOK_CONFIG"})
        assert proc.returncode == 0, proc.stderr
        start = next(step for step in json.loads(proc.stdout)["plan"]["steps"]
                     if step["name"] == "start-slot")
        assert start["title"] == f"Recreate the green container with {V2.image}", start
        assert f"names it {custom}, the same build" in start["details"]["decision"], start
        subprocess.run(["docker", "tag", V3.image, custom], check=True, capture_output=True)
        proc = subprocess.run(proc.args, capture_output=True, text=True, timeout=120,
                              check=False, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
                              env={k: v for k, v in os.environ.items()
                                   if k != "RUNBOOK_CONFIG"})
        assert proc.returncode == 4, (proc.stdout, proc.stderr)
        assert custom in proc.stderr and "different builds" in proc.stderr, proc.stderr
    finally:
        subprocess.run(["docker", "rmi", custom], capture_output=True, check=False)


def test_a_deploy_with_no_database_configured_is_refused(stack: DrillStack,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """No env file and no DATABASE_URL: the pre-deploy snapshot was skipped ("no database
    configured") and the migrations ran anyway, nothing to bring the schema back."""
    from runbook.errors import ConfigError, ExitCode

    env = stack.env
    monkeypatch.delenv("DATABASE_URL", raising=False)
    bare = env.with_(database=replace(env.database, env_file=None))
    state = env.state_file.read_bytes()
    before = {s: docker.inspect(env.slot(s).container) for s in env.slots}
    with pytest.raises(ConfigError) as info:
        deploy.deploy(bare, deploy.Options(version=V2.tag))
    assert info.value.exit_code == ExitCode.USAGE
    assert "no database is configured" in info.value.message
    assert "nothing was changed" in info.value.message and "env_file" in (info.value.fix or "")
    assert env.state_file.read_bytes() == state
    assert {s: docker.inspect(env.slot(s).container) for s in env.slots} == before


def test_a_first_deploy_never_plans_to_recreate_a_slot_caddy_dials(stack: DrillStack) -> None:
    """Found by review: no deployment recorded (a new host, a lost state file) and Caddy
    dialing both slots: the deploy fell back to "blue serves" and planned to recreate green,
    which Caddy dials; the recreate was refused mid-run and the undo's stop raised a false
    alarm. Refused at planning, exit 4, nothing changed. Oracles: Docker, Caddy's config."""
    from runbook import files
    from runbook.drill import http as drill_http
    from runbook.errors import ExitCode, PreconditionError

    stack.reset()  # v1 serving from blue, green stopped
    env = stack.env
    blue, green = env.slot("blue"), env.slot("green")
    text = env.caddy.caddyfile.read_text()
    both = text.replace(f"reverse_proxy localhost:{blue.port}",
                        f"reverse_proxy localhost:{blue.port} localhost:{green.port}")
    assert both != text
    files.atomic_write(env.caddy.caddyfile, both.encode())
    drill_http.post(f"{env.caddy.admin_url}/load", content=both,
                    headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()
    env.state_file.unlink()
    loaded = drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).json()
    green_before = docker.inspect(green.container)
    with pytest.raises(PreconditionError) as err:
        deploy.deploy(env, deploy.Options(version=VERSIONS["v2"].tag))
    assert err.value.exit_code == ExitCode.PRECONDITION
    assert "no slot is known to be free" in err.value.message, err.value
    assert docker.inspect(green.container) == green_before  # never recreated
    assert drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).json() == loaded
    assert not env.state_file.exists()


def test_a_first_ever_deploy_holds_its_lock_in_the_state_file_it_creates(
        stack: DrillStack) -> None:
    """Found by review: on a host with no state file yet the deploy lock was never mirrored
    (the mirror skipped a missing file, silently), so the Go CLI, which reads only the state
    file's `lock`, saw no lock for the whole first deploy. The run now creates the file with
    its lock from its first change on, records itself in it, and leaves it unlocked. Oracles:
    the file's own JSON at each step, Caddy (through the proxy)."""
    stack.reset()  # v1 serving from blue, green stopped
    env = stack.env
    env.state_file.unlink()  # a host that has never recorded a deployment
    locks: list[dict[str, object] | None] = []

    def progress(event: str, *_: object) -> None:
        raw = env.state_file.read_bytes() if env.state_file.exists() else None
        locks.append(json.loads(raw)["lock"] if raw is not None else None)

    deploy.deploy(env, deploy.Options(version=V2.tag), progress=progress)
    assert locks and all(lock is not None and lock["locked"] is True for lock in locks), locks
    after = json.loads(env.state_file.read_text())
    assert after["lock"] == {"locked": False}
    assert after["current_deployment"]["version"] == V2.tag
    assert after["current_deployment"]["active_slot"] == "green"
    assert through_proxy(env) == ("green", V2.tag)


def test_a_rerun_never_recreates_the_slot_under_migrations_a_killed_run_left_running(
        stack: DrillStack) -> None:
    """Found by review: Docker does not stop a `docker exec` whose client died, so a deploy
    killed (SIGKILL, OOM, a lost session) while its migrations ran leaves them running in the
    new slot. The rerun recreated that container, cutting them off halfway (golang-migrate's
    dirty flag set, the rerun's own `migrate up` refused on it). It is refused now (exit 4,
    nothing changed) until they end; then the same command deploys."""
    env = stack.env.with_(migrate_command=(  # slow (an index build) where /tmp/slow exists
        "sh", "-c", "if [ -e /tmp/slow ]; then sleep 25; fi; exec python3 /app/server.py "
        "migrate up"))
    green = env.slot("green").container  # the standby the deploy targets
    stack.docker("exec", green, "touch", "/tmp/slow")  # gone with the container's recreate
    # what the killed run left: its migrate command still running inside the new slot
    stack.docker("exec", "-d", green, *env.migrate_command)
    deadline = time.monotonic() + 10
    while not any(argv == list(env.migrate_command) for _, argv in docker.running_execs(green)):
        assert time.monotonic() < deadline, "the exec never showed up"
        time.sleep(0.1)
    before = snapshot(env)
    with pytest.raises(RunbookError) as err:
        deploy.deploy(env, deploy.Options(version=V2.tag))
    assert err.value.exit_code == ExitCode.PRECONDITION, err.value
    assert f"refusing to recreate {green}: migrations still run inside it" in str(err.value)
    assert f"docker top {green}" in (err.value.fix or "")
    assert snapshot(env) == before  # green not recreated: same container, same start time
    for pid, _ in docker.running_execs(green):  # "they ended" (host pids: the test is root)
        os.kill(pid, signal.SIGKILL)
    while docker.running_execs(green):
        assert time.monotonic() < deadline + 30, "the exec never ended"
        time.sleep(0.1)
    deploy.deploy(env, deploy.Options(version=V2.tag))
    assert through_proxy(env) == ("green", V2.tag)


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sidecar(snapshot: Path) -> dict[str, Any]:
    meta = snapshot.with_name(snapshot.name.removesuffix(".sql.gz") + ".meta.json")
    return json.loads(meta.read_text())  # type: ignore[no-any-return]


def test_a_deploys_log_names_its_deployment_as_the_state_file_and_its_snapshot_do(
        stack: DrillStack) -> None:
    """Found by review: the log's deployment_id was the run's id, the deployment the run
    recorded had another (the state file's current_deployment.id, the pre-deploy snapshot's
    sidecar), so no log line named the deployment. A deploy's lines name its deployment from
    the first; a killed deploy's rerun finishes that same deployment and logs under its id
    from its plan on. Each line keeps its own run's id in run_id."""
    stack.reset()  # v1 serving from blue on schema 1
    env = stack.env
    assert env.source is not None
    killed = subprocess.run(
        [sys.executable, "-m", "runbook.cli", "deploy", "--version", V2.tag, "--yes",
         str(env.source)], capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL, check=False,
        env={k: v for k, v in os.environ.items() if k != faults.VARIABLE}
        | {faults.VARIABLE: "after:migrate:SIGKILL"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    record = intents.read(env)
    assert record is not None
    deployment = str(record.record["deployment_id"])
    first = [e for log in env.log_dir.glob("*.log") for e in log_lines(log)
             if record.run_id in (e.get("run_id"), e["deployment_id"])]
    assert first and {e["deployment_id"] for e in first} == {deployment}, first[0]

    result = deploy.deploy(env, deploy.Options(version=V2.tag))  # finishes it
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.id == deployment
    assert st.current.snapshot_path is not None
    assert sidecar(Path(st.current.snapshot_path))["deployment_id"] == deployment
    rerun = log_lines(Path(str(result.log_file)))
    assert {e.get("run_id") for e in rerun} == {result.run_id} != {deployment}
    planned = next(i for i, e in enumerate(rerun)
                   if e.get("step") == "plan" and e.get("event") == "end")
    assert {e["deployment_id"] for e in rerun[planned:]} == {deployment}, rerun[planned]
    assert any(e["message"].startswith("commit point reached") for e in rerun[planned:])


def test_a_deploys_dry_run_never_names_an_id_the_real_run_does_not_use(
        stack: DrillStack) -> None:
    """Found by review: the dry run's snapshot step named deployment dep_18ee830dde5..., its
    JSON dry run another, the real run and the state file a third: a new deployment's id is
    the run's own, given when it starts, and the dry run says that instead of an id."""
    stack.reset()
    env = stack.env
    dry = deploy.deploy(env, deploy.Options(version=V2.tag), dry_run=True)
    shown = {k: v for s in dry.plan.steps for k, v in s.details.items()}
    assert dry.run_id not in json.dumps(dry.to_json()), shown  # --format json prints it
    assert shown["deployment"].startswith("<new"), shown["deployment"]
    real = deploy.deploy(env, deploy.Options(version=V2.tag))
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.id == real.run_id
    assert any(s.details.get("deployment") == real.run_id for s in real.plan.steps)


def test_a_rollbacks_log_names_the_deployment_it_makes_current(stack: DrillStack) -> None:
    """A rollback creates no deployment: it makes its target's record current again. The
    log's deployment_id is that record's id from the plan on (the state file's
    current_deployment.id after it), and run_id the run's, which the state file records as
    the target's rollback_id."""
    stack.arrange(scenes.PREVIOUS_RUNNING)  # v3 serving from blue, v2 running on green
    env = stack.env
    target = states.read_state(env.state_file).previous
    assert target is not None
    result = rollback.rollback(env)
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.id == target.id
    assert st.current.extra.get("rollback_id") == result.run_id
    logged = log_lines(Path(str(result.log_file)))
    assert {e.get("run_id") for e in logged} == {result.run_id}
    assert logged[0]["deployment_id"] == result.run_id  # before its plan named the target
    planned = next(i for i, e in enumerate(logged)
                   if e.get("step") == "plan" and e.get("event") == "end")
    assert {e["deployment_id"] for e in logged[planned:]} == {target.id}, logged[planned]


def test_the_migrate_command_the_plan_shows_is_the_argv_that_runs(stack: DrillStack) -> None:
    """Found by a plan-fidelity review (every Docker API call logged through a proxy): the
    plan, the journal and the pre-flight showed the migrate command as its words joined by
    spaces, so `sh -c "... && echo migrated-ok"` read `docker exec C sh -c python3 ... &&
    echo migrated-ok`, which typed by hand runs something else. Each is quoted as a shell
    reads it now: the line splits back to the argv the exec runs, and typed by hand it runs
    the same migrations."""
    argv = ("sh", "-c", "python3 /app/server.py migrate up && echo migrated-ok")
    env = stack.env.with_(migrate_command=argv)
    green = env.slot("green").container  # the standby the deploy targets
    wanted = ["docker", "exec", green, *argv]
    dry = deploy.deploy(env, deploy.Options(version=V2.tag), dry_run=True)
    planned = {s.name: s.details for s in dry.plan.steps}
    assert shlex.split(planned["migrate"]["command"]) == wanted, planned["migrate"]
    checked = planned["preflight"]["migrate command"]
    assert checked.startswith(f"{shlex.join(argv)}: "), checked
    real = deploy.deploy(env, deploy.Options(version=V2.tag))
    with stack.connect() as conn:  # the exec ran the whole command: migrated to 2
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (2,)
    ran = {s.name: s.details for s in real.plan.steps}["migrate"]["command"]
    [logged] = [e["plan"] for e in log_lines(Path(str(real.log_file))) if "plan" in e
                and isinstance(e["plan"], dict)]
    journaled = {s["name"]: s["details"] for s in logged["steps"]}["migrate"]["command"]
    assert shlex.split(ran) == shlex.split(journaled) == wanted, (ran, journaled)
    by_hand = subprocess.run(shlex.split(ran), capture_output=True, text=True, check=False,
                             timeout=60, stdin=subprocess.DEVNULL)  # as on-call would type it
    assert by_hand.returncode == 0 and "migrated-ok" in by_hand.stdout, by_hand


def unrecorded_schemas(env: envmod.Environment) -> None:
    """The state file as the Go CLI and the host scripts write it: no migration_version."""
    doc = json.loads(env.state_file.read_text())
    for record in (doc.get("current_deployment"), doc.get("previous_deployment"),
                   *(doc.get("deployment_history") or [])):
        if record is not None:
            record.pop("migration_version", None)
    files.atomic_write(env.state_file, json.dumps(doc, indent=2).encode())


def schema_now(stack: DrillStack) -> int:
    """Postgres's own schema_migrations (clean): the oracle, not the runbook's read."""
    with stack.connect() as conn:
        row = conn.execute("SELECT version, dirty FROM schema_migrations").fetchone()
    assert row is not None and row[1] is False, row
    return int(row[0])


def state_detail(record_file: str | None) -> dict[str, Any]:
    """The state step's details in a run's record (its journal)."""
    record = json.loads(Path(str(record_file)).read_text())
    [step] = [s for s in record["steps"] if s["name"] == "state"]
    return step["detail"]  # type: ignore[no-any-return]


def test_a_deploy_records_the_schema_the_deployment_it_replaces_served_on(
        stack: DrillStack) -> None:
    """Found by review (a host whose deployments the Go CLI or the deploy script recorded:
    no migration_version anywhere): a deploy of v2 over v1 left v1 "schema not recorded",
    and once v2's pre-deploy snapshot was cleaned up `rollback --dry-run` (to v1) said
    "schema guard NOT checked" and told on-call to restore a snapshot. The deploy records on
    v1's record the schema it served on, read before the deploy's migrations (not after
    them), in its one state write, as its dry run and its journal say. Oracle: Postgres's
    own schema_migrations before and after, the file, the dry run's words."""
    stack.reset()  # v1 serving from blue on schema 1
    env = stack.env
    unrecorded_schemas(env)
    served_on = schema_now(stack)
    assert served_on == V1.schema  # the premise: v1 serves on its own schema
    said = f"{served_on}, recorded for {V1.tag}: the database schema it served on"
    dry = deploy.deploy(env, deploy.Options(version=V2.tag), dry_run=True)
    [planned] = [step for step in dry.plan.steps if step.name == "state"]
    assert planned.details["previous schema"].startswith(said), planned.details
    done = deploy.deploy(env, deploy.Options(version=V2.tag))
    migrated = schema_now(stack)
    assert migrated == V2.schema != served_on  # the premise: its migrations moved it
    assert state_detail(done.record_file)["previous schema"].startswith(said)
    doc = json.loads(env.state_file.read_text())
    v1 = doc["previous_deployment"]
    assert (v1["version"], v1["status"]) == (V1.tag, "superseded"), v1
    assert v1["migration_version"] == served_on, v1
    assert doc["current_deployment"]["migration_version"] == migrated  # its own, as before
    # its pre-deploy snapshot cleaned up (as `snapshot cleanup` does once it expires): no
    # sidecar says v1's schema any more, only its record
    dump = Path(doc["current_deployment"]["snapshot_path"])
    dump.unlink()
    dump.with_name(dump.name.removesuffix(".sql.gz") + ".meta.json").unlink()
    before = snapshot(env)
    again = runbook_cli(env, "rollback", "--dry-run")
    said = again.stdout + again.stderr
    assert "NOT checked" not in said, said
    assert f"{V1.tag} ran with {served_on}" in said, said  # checked: migrations ran since
    assert snapshot(env) == before


def test_a_deploy_finished_by_a_rerun_records_the_schema_its_interrupted_run_read(
        stack: DrillStack) -> None:
    """The schema recorded for the deployment a deploy replaces is the interrupted run's own
    read before its migrations, carried by the reruns that finish it: killed after its
    migrations (the database at v2's schema since), rerun and killed again after traffic
    moved, then finished by a third run, v1 is recorded at the schema before them, never
    the one read by a rerun. Oracle: Postgres's schema_migrations, the file."""
    stack.reset()  # v1 serving from blue on schema 1
    env = stack.env
    unrecorded_schemas(env)
    served_on = schema_now(stack)
    assert served_on == V1.schema
    killed = runbook_cli(env, "deploy", "--version", V2.tag, "--yes",
                         fault="after:migrate:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert schema_now(stack) == V2.schema != served_on  # migrated, traffic still on v1
    moved = runbook_cli(env, "deploy", "--version", V2.tag, "--yes",
                        fault="before:state:SIGKILL")
    assert moved.returncode == -signal.SIGKILL, moved.stderr
    assert through_proxy(env) == ("green", V2.tag)  # after the commit
    record = intents.read(env)
    assert record is not None and record.record.get("from_schema") == served_on, record
    assert "migration_version" not in json.loads(env.state_file.read_text())[
        "current_deployment"]  # nothing recorded yet
    dry = deploy.deploy(env, deploy.Options(version=V2.tag), dry_run=True)
    [planned] = [step for step in dry.plan.steps if step.name == "state"]
    said = f"{served_on}, recorded for {V1.tag}: the database schema it served on"
    assert planned.details["previous schema"].startswith(said), planned.details
    done = deploy.deploy(env, deploy.Options(version=V2.tag))  # finishes it
    assert state_detail(done.record_file)["previous schema"].startswith(said)
    doc = json.loads(env.state_file.read_text())
    assert doc["current_deployment"]["id"] == record.record["deployment_id"]
    v1 = doc["previous_deployment"]
    assert (v1["version"], v1["migration_version"]) == (V1.tag, served_on), v1


def test_a_switch_records_the_schema_the_deployment_it_moves_users_off_served_on(
        stack: DrillStack) -> None:
    """As a deploy: on a host whose tools record no migration_version, `runbook switch` back
    to v2 (recorded as a rollback) left v3 "schema not recorded", and `rollback --dry-run
    --to v3` said "schema guard NOT checked" and told on-call to restore a snapshot. The
    switch records on v3's record the schema its plan read while v3 served, before anything
    changed; v2's, never read for it, is not guessed. Oracle: Postgres's schema_migrations,
    the file, the dry run's words."""
    stack.arrange(scenes.PREVIOUS_RUNNING)  # v3 serves from blue, v2 running on green
    env = stack.env
    unrecorded_schemas(env)
    served_on = schema_now(stack)
    assert served_on == V3.schema
    said = (f"{served_on}, recorded for {V3.tag}: the database schema it served on, as this "
            "switch read it")
    dry = switch.switch(env, switch.Options(slot=envmod.Slot.GREEN), dry_run=True)
    [planned] = [step for step in dry.plan.steps if step.name == "state"]
    assert planned.details["previous schema"].startswith(said), planned.details
    done = switch.switch(env, switch.Options(slot=envmod.Slot.GREEN))
    assert through_proxy(env) == ("green", V2.tag)
    assert state_detail(done.record_file)["previous schema"].startswith(said)
    v3_recorded_and_checked(env, served_on)
