"""Steps of features/fleet.feature: the fleet rollback against the drill fleet.

The drill fleet (runbook/drill/fleet.py: >= 3 hosts, each its own slots, Caddy and sshd on a
loopback port, one shared Postgres) is session-scoped and started only when a fleet scenario
asks for it. `runbook fleet rollback` runs as the operator types it (a subprocess, real
ansible-playbook over real SSH); its oracle is what each host's Caddy serves, each host's
state file and fleet lock, and the fleet journal.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pytest_bdd import given, parsers, then, when

from runbook.drill.fleet import DrillFleet
from runbook.drill.versions import VERSIONS
from runbook.environment import Slot
from runbook.fleet import hostlock, rollout
from steps.world import caddy_config, container_identity, database_in_postgres

NEW, PREVIOUS = "v3", "v2"  # the fleet's hosts start on v2; the Given deploys v3 (same schema)


@pytest.fixture(scope="session")
def drill_fleet(request: pytest.FixtureRequest) -> Iterator[DrillFleet]:
    """Three drill hosts (host1 the canary), up for the rest of the session once asked for."""
    if request.config.getoption("--env") != "drill":
        pytest.skip("the fleet scenarios need the drill fleet (drill only)")
    with DrillFleet(size=3) as fleet:
        yield fleet


@dataclass
class FleetWorld:
    fleet: DrillFleet
    journal_dir: Path
    before: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.CompletedProcess[str] | None = None
    out: dict[str, Any] = field(default_factory=dict)
    first_run: dict[str, Any] = field(default_factory=dict)
    schema_before: int | None = None  # schema_migrations before the Given's fake migration
    safety_before: set[Path] = field(default_factory=set)
    when_started: datetime = field(default_factory=lambda: datetime.now(UTC))  # last run's start

    def run(self, *args: str) -> dict[str, Any]:
        self.when_started = datetime.now(UTC)
        argv = [self.fleet.runbook_command, "fleet", "rollback", *args, "--yes",
                "--format", "json", "--journal-dir", str(self.journal_dir)]
        self.proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                                   timeout=600, stdin=subprocess.DEVNULL)
        lines = [x for x in self.proc.stdout.splitlines() if x.startswith("{")]
        assert lines, f"no JSON from the fleet rollback: {self.proc.stdout}{self.proc.stderr}"
        self.out = json.loads(lines[-1])
        return self.out

    @property
    def record(self) -> dict[str, Any]:
        return dict(self.out.get("record") or {})

    def snapshot(self) -> dict[str, Any]:
        """Per host what a refused or previewed run must leave as it was: what its proxy
        answers, its state file, Caddyfile, Caddy's running config, its slot containers (the
        docker CLI's id, state and start) and whether its deploy lock is held; and, under
        "shared database", what the hosts share (found by review: a restore before a refusal
        passed "no host changed"): schema_migrations and every table's rows read with plain
        SQL, the snapshot files, and the database container's start."""
        hosts: dict[str, Any] = {
            h.name: (self.fleet.serving(h.name), h.env.state_file.read_bytes(),
                     h.env.caddy.caddyfile.read_bytes(), caddy_config(h.env),
                     {s: container_identity(h.env.slot(s).container) for s in Slot},
                     h.env.lock_path.exists())
            for h in self.fleet.hosts}
        first = self.fleet.hosts[0]
        dirs = {h.env.database.snapshot_dir for h in self.fleet.hosts}
        hosts["shared database"] = (
            database_in_postgres(first.stack),
            sorted(str(p) for d in dirs if d.is_dir() for p in d.iterdir()),
            container_identity(first.env.database.container))
        return hosts


@pytest.fixture
def fleet_world(drill_fleet: DrillFleet, tmp_path: Path) -> FleetWorld:
    """Each scenario's inventory; its first Given arranges every host (on_new_deployment)."""
    drill_fleet.write_inventory()
    return FleetWorld(drill_fleet, tmp_path / "fleet-journal")


# -- Givens ------------------------------------------------------------------------------------


@given("every host of the fleet runs a new deployment")
def fleet_on_new(fleet_world: FleetWorld) -> None:
    # made from the baseline the first time; then that scene put back (DrillFleet docstring)
    fleet_world.fleet.on_new_deployment(NEW)
    for h in fleet_world.fleet.hosts:
        assert fleet_world.fleet.serving(h.name)[2] == VERSIONS[NEW].tag, h.name
    fleet_world.before = fleet_world.snapshot()
    fleet_world.safety_before = _safety_snapshots(fleet_world)
    fleet_world.schema_before = _schema(fleet_world)[0]


@given(parsers.parse('the rollback of "{host}" will be interrupted before its switch'))
def host_fault(fleet_world: FleetWorld, host: str) -> None:
    # the drill's fault injection (runbook/faults.py), passed by the inventory's
    # runbook_environment to that host's `runbook rollback` only
    fleet_world.fleet.write_inventory(host_vars={host: {"runbook_environment": {
        "RUNBOOK_DRILL_FAULT": "before:switch:SIGTERM"}}})


@given("the inventory also names a host that does not answer")
def unreachable_host(fleet_world: FleetWorld) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nothing listens there
    fleet_world.fleet.write_inventory(extra_hosts={"host9": port})


@given("migrations ran on the shared database after the new deployment")
def migrations_ran(fleet_world: FleetWorld) -> None:
    with fleet_world.fleet.hosts[0].stack.connect() as conn:
        row = conn.execute("SELECT version FROM schema_migrations").fetchone()
        fleet_world.schema_before = int(row[0]) if row else None
        conn.execute("UPDATE schema_migrations SET version = version + 1")
    fleet_world.before = fleet_world.snapshot()


# -- Whens -------------------------------------------------------------------------------------


@when("I roll back the fleet")
def roll_back_fleet(fleet_world: FleetWorld) -> None:
    fleet_world.run(str(fleet_world.fleet.inventory))
    fleet_world.first_run = fleet_world.out


def _schema(fw: FleetWorld) -> tuple[int | None, bool | None]:
    """schema_migrations (version, dirty), read from the shared Postgres itself."""
    with fw.fleet.hosts[0].stack.connect() as conn:
        row = conn.execute("SELECT version, dirty FROM schema_migrations").fetchone()
    return (int(row[0]), bool(row[1])) if row else (None, None)


def _restore_runs(fw: FleetWorld) -> dict[str, list[dict[str, Any]]]:
    """Per host, the run records its own runbook wrote for each snapshot restore that began
    since the last fleet run started: the host's witness, not the fleet's journal."""
    since = fw.when_started
    out: dict[str, list[dict[str, Any]]] = {}
    for h in fw.fleet.hosts:
        for path in sorted(h.env.runs_dir.glob("*.json")):
            record = json.loads(path.read_text())
            began = datetime.fromisoformat(record["started_at"])
            if record["action"] == "snapshot-restore" and began >= since:
                out.setdefault(h.name, []).append(record)
    return out


def _safety_snapshots(fw: FleetWorld) -> set[Path]:
    """Every restore takes a `pre-restore` safety snapshot first: the files count restores."""
    dirs = {h.env.database.snapshot_dir for h in fw.fleet.hosts}
    return {p for d in dirs if d.is_dir() for p in d.glob("*_pre-restore.sql.gz")}


@when("I preview the fleet rollback on the maintenance path")
def preview_maintenance(fleet_world: FleetWorld) -> None:
    fleet_world.safety_before = _safety_snapshots(fleet_world)
    fleet_world.run(str(fleet_world.fleet.inventory), "--maintenance", "--dry-run")


@when("I roll back the fleet on the maintenance path")
def roll_back_maintenance(fleet_world: FleetWorld) -> None:
    fleet_world.safety_before = _safety_snapshots(fleet_world)
    fleet_world.run(str(fleet_world.fleet.inventory), "--maintenance")
    fleet_world.first_run = fleet_world.out


@when("the fault is gone and I run the resume command")
def run_resume(fleet_world: FleetWorld) -> None:
    fleet_world.fleet.write_inventory()
    command = fleet_world.record["resume_command"]
    argv = shlex.split(command)
    assert argv[:3] == ["runbook", "fleet", "rollback"], command
    fleet_world.run(*argv[3:])


@when("the fault is gone and I resume that run without --limit")
def run_resume_all(fleet_world: FleetWorld) -> None:
    fleet_world.fleet.write_inventory()
    fleet_world.before = fleet_world.snapshot()  # each host as the first run left it
    fleet_world.run(str(fleet_world.fleet.inventory), "--resume",
                    fleet_world.first_run["fleet_run_id"])


# -- Thens -------------------------------------------------------------------------------------


def _explain(fw: FleetWorld) -> str:
    assert fw.proc is not None
    return f"exit {fw.proc.returncode}: {fw.proc.stdout[-3000:]} {fw.proc.stderr[-3000:]}"


@then("the fleet rollback succeeds")
def fleet_ok(fleet_world: FleetWorld) -> None:
    assert fleet_world.proc is not None
    assert fleet_world.proc.returncode == 0, _explain(fleet_world)
    assert all(h["status"] == rollout.ROLLED_BACK
               for h in fleet_world.record["hosts"].values()), fleet_world.record["hosts"]


@then(parsers.parse("the fleet rollback stops with exit code {code:d}"))
def fleet_stops(fleet_world: FleetWorld, code: int) -> None:
    assert fleet_world.proc is not None
    assert fleet_world.proc.returncode == code, _explain(fleet_world)


@then("every host of the fleet serves the previous version")
def all_previous(fleet_world: FleetWorld) -> None:
    for h in fleet_world.fleet.hosts:
        status, slot, version = fleet_world.fleet.serving(h.name)
        assert (status, slot, version) == (200, "blue", VERSIONS[PREVIOUS].tag), h.name
        state = json.loads(h.env.state_file.read_text())
        assert state["current_deployment"]["version"] == VERSIONS[PREVIOUS].tag, h.name


def _docker_time(fleet_world: FleetWorld, host: str, slot: Slot, field_name: str) -> datetime:
    """A slot container's State.StartedAt or State.FinishedAt, as the docker CLI says: the
    order the hosts really changed in, not what the fleet's own journal says it was."""
    name = fleet_world.fleet.host(host).env.slot(slot).container
    done = subprocess.run(["docker", "inspect", "--format", f"{{{{.State.{field_name}}}}}", name],
                          capture_output=True, text=True, check=True, timeout=30)
    stamp = done.stdout.strip()  # 2026-12-02T15:17:49.073778169Z: to microseconds
    head, _, frac = stamp.removesuffix("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00")


def _file_time(path: Path) -> datetime:
    """A file's last write, by the filesystem's clock (the same clock as Docker's here)."""
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


def _rollback_done(fleet_world: FleetWorld, host: str) -> datetime:
    """When `host`'s rollback in this run last changed anything, by Docker's and the
    filesystem's clocks, never by what a journal says: its target (blue) started, its old slot
    (green) stopped, its state file written, and its own run record of that rollback written
    (`runbook rollback` finishes that record last, after its lock is released). Each one, not
    the old slot alone: on the maintenance path the fleet's drain stopped every host's old
    slot before any rollback began (found by review: that stop proved no order there)."""
    env = fleet_world.fleet.host(host).env
    records = [p for p in env.runs_dir.glob("*.json")
               if _file_time(p) >= fleet_world.when_started
               and json.loads(p.read_text())["action"] == "rollback"]
    assert len(records) == 1, (host, records)
    return max(_docker_time(fleet_world, host, Slot.BLUE, "StartedAt"),
               _docker_time(fleet_world, host, Slot.GREEN, "FinishedAt"),
               _file_time(env.state_file), _file_time(records[0]))


def _rolled_back_before(fleet_world: FleetWorld, first: str, later: str) -> None:
    """`first`'s target slot started during this run, and its rollback was done
    (`_rollback_done`) before `later`'s target slot started: the order the hosts really
    changed in."""
    began = fleet_world.when_started
    first_started = _docker_time(fleet_world, first, Slot.BLUE, "StartedAt")
    done = _rollback_done(fleet_world, first)
    later_started = _docker_time(fleet_world, later, Slot.BLUE, "StartedAt")
    assert began <= first_started <= done <= later_started, (
        f"{first} started {first_started}, done {done}; {later} started {later_started}; "
        f"run began {began}")


@then("the canary host was rolled back before any other host started")
def canary_first(fleet_world: FleetWorld) -> None:
    """By Docker's and the filesystem's clocks: the canary's target slot started, and the last
    thing its rollback changed was done, before any other host's target slot started; and the
    fleet journal says the same."""
    for later in ("host2", "host3"):  # the hosts themselves first, then the fleet's journal
        _rolled_back_before(fleet_world, "host1", later)
    hosts = fleet_world.record["hosts"]
    assert fleet_world.record["batches"][0] == ["host1"]
    assert all(hosts["host1"]["ended"] <= hosts[h]["started"] for h in ("host2", "host3")), hosts


@then("the other hosts went one batch after another: one host, then the rest")
def batches_in_order(fleet_world: FleetWorld) -> None:
    """host2's rollback was done before host3's target slot started (the clocks, as for the
    canary), and the fleet journal's batches are [host1], [host2], [host3]."""
    _rolled_back_before(fleet_world, "host2", "host3")
    record = fleet_world.record
    assert record["batches"] == [["host1"], ["host2"], ["host3"]], record["batches"]
    hosts = record["hosts"]
    assert hosts["host2"]["ended"] <= hosts["host3"]["started"], hosts


@then("the shared database was left as it was: no host restored a snapshot")
def database_untouched(fleet_world: FleetWorld) -> None:
    """No new `pre-restore` safety snapshot (every restore takes one first, the fleet's or a
    host rollback's own), no host's run record of a snapshot restore, and the schema and
    every table's rows as before the rollback, read with plain SQL."""
    # what the hosts and Postgres show, not the fleet's journal (found by review: this Then
    # read "the database step ran exactly once" and counted only the journal's phases)
    assert _safety_snapshots(fleet_world) == fleet_world.safety_before
    assert not _restore_runs(fleet_world), _restore_runs(fleet_world)
    assert _schema(fleet_world) == (fleet_world.schema_before, False)
    first = fleet_world.fleet.hosts[0]
    assert database_in_postgres(first.stack) == fleet_world.before["shared database"][0]
    # and the fleet journal on-call reads says the same: judged on the lock host, no restore
    decision = fleet_world.record["database"]
    assert decision["status"] == "ok" and decision["host"] == "host1", decision
    assert decision["snapshot restore"] == "not needed", decision


@then(parsers.parse("the plan says THE SERVICE IS DOWN on all {count:d} hosts, and no host "
                    "of the fleet changed"))
def plan_says_down(fleet_world: FleetWorld, count: int) -> None:
    assert fleet_world.proc is not None
    assert fleet_world.proc.returncode == 0, _explain(fleet_world)
    text = "\n".join(fleet_world.out["lines"])
    assert f"THE SERVICE IS DOWN on all {count} host(s)" in text, text
    assert "restore snapshot togather_" in text and "Dry run: nothing was changed." in text, text
    assert fleet_world.snapshot() == fleet_world.before
    assert _safety_snapshots(fleet_world) == fleet_world.safety_before


@then("the snapshot was restored exactly once, on the fleet lock host, before any host rolled "
      "back")
def restored_once(fleet_world: FleetWorld) -> None:
    # the oracles: the safety snapshots on disk and schema_migrations in Postgres
    new = _safety_snapshots(fleet_world) - fleet_world.safety_before
    lock_dir = fleet_world.fleet.hosts[0].env.database.snapshot_dir
    assert len(new) == 1 and next(iter(new)).parent == lock_dir, new
    assert _schema(fleet_world) == (fleet_world.schema_before, False)
    # the lock host's own run record of its restore ended before any host's target started
    # (Docker's clock): the order the database and the hosts really changed in
    runs = _restore_runs(fleet_world)
    assert list(runs) == ["host1"] and len(runs["host1"]) == 1, runs
    restore = runs["host1"][0]
    assert restore["outcome"] == "success" and restore["finished_at"], restore
    finished = datetime.fromisoformat(restore["finished_at"])
    for h in fleet_world.fleet.hosts:
        assert finished <= _docker_time(fleet_world, h.name, Slot.BLUE, "StartedAt"), h.name
    record = fleet_world.record
    restores = [p for p in record["phases"] if p["name"] == "database"]
    assert [p["status"] for p in restores] == ["restored"], record["phases"]
    assert record["database"]["host"] == "host1", record["database"]
    restored_at = record["database"]["restored_at"]
    assert all(restored_at <= h["started"] for h in record["hosts"].values()), record["hosts"]


@then("the fleet lock is free")
def fleet_lock_free(fleet_world: FleetWorld) -> None:
    lock_host = fleet_world.fleet.hosts[0]
    assert hostlock.status(lock_host.env) is None
    assert not hostlock.path(lock_host.env).exists()


@then(parsers.parse('"{host}" is rolled back'))
def host_rolled_back(fleet_world: FleetWorld, host: str) -> None:
    assert fleet_world.record["hosts"][host]["status"] == rollout.ROLLED_BACK
    assert fleet_world.fleet.serving(host) == (200, "blue", VERSIONS[PREVIOUS].tag)


@then(parsers.parse('"{host}" failed but still serves the new version from its old slot'))
def host_failed_serving(fleet_world: FleetWorld, host: str) -> None:
    entry = fleet_world.record["hosts"][host]
    assert entry["status"] == rollout.FAILED_SERVING and entry["exit_code"] == 1, entry
    assert fleet_world.fleet.serving(host) == (200, "green", VERSIONS[NEW].tag)
    state = json.loads(fleet_world.fleet.host(host).env.state_file.read_text())
    assert state["current_deployment"]["version"] == VERSIONS[NEW].tag


@then(parsers.parse('"{host}" was not started and still serves the new version'))
def host_not_started(fleet_world: FleetWorld, host: str) -> None:
    entry = fleet_world.record["hosts"][host]
    assert entry["status"] == rollout.NOT_STARTED and entry["started"] is None, entry
    assert fleet_world.snapshot()[host] == fleet_world.before[host], "changed"


@then(parsers.parse('the fleet rollback printed the command that resumes with "{hosts}"'))
def printed_resume(fleet_world: FleetWorld, hosts: str) -> None:
    command = fleet_world.record["resume_command"]
    assert f"--limit {hosts}" in command and "--resume fleet_" in command, command
    assert any(command in line for line in fleet_world.out["lines"]), fleet_world.out["lines"]


@then("the resumed run did not repeat the database step")
def resume_reused_db(fleet_world: FleetWorld) -> None:
    decision = fleet_world.record["database"]
    assert decision["reused_from"] == fleet_world.first_run["fleet_run_id"], decision
    assert fleet_world.record["resumed_from"] == fleet_world.first_run["fleet_run_id"]
    # and the database itself: no host restored anything, the schema is as it was
    assert not _restore_runs(fleet_world), _restore_runs(fleet_world)
    assert _schema(fleet_world) == (fleet_world.schema_before, False)


@then(parsers.parse('the fleet rollback is refused with exit code {code:d}, one line per '
                    'failing host naming "{words}"'))
def refused_per_host(fleet_world: FleetWorld, code: int, words: str) -> None:
    assert fleet_world.proc is not None
    assert fleet_world.proc.returncode == code, _explain(fleet_world)
    hosts = [line for line in fleet_world.out["hosts"] if not line.startswith("Fleet journal")]
    assert len(hosts) == 1 and hosts[0].startswith("host9:") and words in hosts[0], hosts
    assert "nothing was changed" in fleet_world.out["error"]


@then(parsers.parse('the fleet rollback is refused with exit code {code:d} naming "{words}"'))
def refused_naming(fleet_world: FleetWorld, code: int, words: str) -> None:
    assert fleet_world.proc is not None
    assert fleet_world.proc.returncode == code, _explain(fleet_world)
    text = f"{fleet_world.out['error']}; {fleet_world.out['fix']}"
    assert words in text and "nothing was changed" in text, text


@then("no host of the fleet changed")
def nothing_changed(fleet_world: FleetWorld) -> None:
    assert fleet_world.snapshot() == fleet_world.before


@then(parsers.parse('the resumed run skipped "{host}", saying it was rolled back by the first '
                    'run'))
def resume_skipped(fleet_world: FleetWorld, host: str) -> None:
    """The run says so, and the host itself shows it: what its proxy answers, its state
    file, Caddyfile, Caddy's running config, its slot containers (the docker CLI's id and
    state) and its deploy lock are as the first run left them."""
    first = fleet_world.first_run["fleet_run_id"]
    line = f"{host}: skipped: rolled back by fleet run {first}"
    assert line in fleet_world.out["lines"], fleet_world.out["lines"]
    assert host not in fleet_world.record["hosts_selected"], fleet_world.record
    assert fleet_world.snapshot()[host] == fleet_world.before[host], f"{host} changed"
