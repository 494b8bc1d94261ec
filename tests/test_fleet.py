"""The fleet rollback's parts (issue 13): plan, inventory, fleet lock, refusals, Ctrl-C.

The inventory is read by the real `ansible-inventory`; the lock tests use the real host-side
code on a real directory; the end-to-end ones run `runbook fleet rollback` against the drill
fleet (real sshd, real ansible-playbook), whose oracle is what each host's Caddy serves.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from runbook import environment as envmod
from runbook.drill.fleet import DrillFleet, held_reached
from runbook.drill.stack import RUN_LABEL, DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot
from runbook.errors import ExitCode, LockedError, RunbookError, UsageError
from runbook.fleet import hostlock
from runbook.fleet import inventory as inv
from tests.drill_checks import (
    ATTEMPT,
    OWNER_UID,
    as_deploy_user,
    needs_root,
    runbook_cli,
)
from tests.matrix import nightly
from tests.test_container_identity import NEVER, create_under, docker_says, held, put_back

ROOT = Path(__file__).resolve().parent.parent

RUNBOOK = str(Path(sys.executable).with_name("runbook"))

INVENTORY = """\
all:
  vars:
    runbook_env: production
  children:
    canary:
      hosts:
        web3:
    web:
      hosts:
        web1:
          runbook_env: staging
        web2:
        web3:
        web4:
    db_side:
      hosts:
        web5:
"""
# the same hosts, all of one environment: a fleet run is refused on INVENTORY (web1 staging)
ONE_ENV_INVENTORY = INVENTORY.replace("          runbook_env: staging\n", "")


# -- plan --------------------------------------------------------------------------------------


def test_a_hosts_notice_is_on_its_line_of_the_fleet_summary() -> None:
    """A host whose rollback succeeded but left its old slot running (Caddy holds h2c
    connections) says so on its fleet line, from its `--format json` notices; a host without
    notices gets the plain line."""
    from runbook.fleet.rollout import ROLLED_BACK, HostResult, _host_events

    said: list[str] = []
    hosts = {"host1": HostResult("host1"), "host2": HostResult("host2")}
    events = _host_events(hosts, said.append)
    note = "the old blue container is left running: 3 connection(s) of Caddy's previous config"
    for host, notices in (("host1", [note]), ("host2", [])):
        out = json.dumps({"ok": True, "notices": notices, "timing": {"done_in_s": 0.9}})
        events.on_end("runbook rollback", host, {"_event": "runner_on_ok", "rc": 0,
                                                 "stdout": f"progress\n{out}\n"})
    assert hosts["host1"].status == hosts["host2"].status == ROLLED_BACK
    assert hosts["host1"].message == f"done in 0.9s; note: {note}"
    assert hosts["host2"].message == "done in 0.9s"
    assert said == [f"host1: {ROLLED_BACK} (done in 0.9s; note: {note})",
                    f"host2: {ROLLED_BACK} (done in 0.9s)"]


def test_an_older_hosts_check_without_its_plan_passes_and_is_shown_by_its_summary() -> None:
    """A host whose runbook speaks the same fleet protocol but predates the plan in host-check's
    answer (its dry run's steps and text: the controller does not require them, so the
    protocol was not bumped) passes pre-flight and is shown by its one summary line, as
    before, with no steps in --format json; the host beside it that sends its plan is shown
    with it, indented under its line. The oracle is the line this controller printed before,
    which now says on that line why no plan is under it (found by review: the older host's
    line looked like a host with nothing to plan): that host's runbook version and protocol,
    and the upgrade that shows it."""
    from importlib import metadata

    from runbook.fleet import FLEET_PROTOCOL
    from runbook.fleet.rollout import Events, _ready_lines, host_plans, preflight

    def answer(summary: str, **plan: object) -> dict[str, Any]:
        return {"_event": "runner_on_ok", "rc": 0, "stdout": json.dumps({
            "runbook_version": "0.1.0", "fleet_protocol": FLEET_PROTOCOL, "hostname": "h",
            "problems": [], "environment": "development",
            "deployment": {"id": "dep_1", "version": "v3", "rolled_back_from": None},
            "deploy_lock": {"locked": False}, "fleet_lock": {"locked": False},
            "dry_run": {"ok": True, "summary": summary, "warnings": [], "preflight": {},
                        "facts": {}, **plan}})}

    steps = [{"name": "start-slot", "title": "Start the stopped blue container",
              "phase": "prepare", "details": {"container": "web2-blue"}, "skip": None}]
    rendered = ("Plan: roll back web2\n 1. Start the stopped blue container\n"
                "      container  web2-blue")
    events = Events(results={"host-check": {
        "web1": answer("roll back web1"),  # an older runbook: no steps, no text
        "web2": answer("roll back web2", steps=steps, rendered=rendered)}})
    inventory = inv.Inventory(Path("inventory.yml"), ["web1", "web2"],
                              {"canary": ["web1"]}, {})
    checks, problems, _ = preflight(events, inventory, ["web1", "web2"], take_lock=False)
    assert problems == []
    plans = host_plans(checks, ["web1", "web2"], rolling=True)
    assert plans["web1"] is not None and plans["web2"] is not None
    assert {k: plans["web1"][k] for k in ("summary", "steps", "rendered")} == {
        "summary": "roll back web1", "steps": None, "rendered": None}
    assert {k: plans["web2"][k] for k in ("summary", "steps", "rendered")} == {
        "summary": "roll back web2", "steps": steps, "rendered": rendered}
    database = {"host": "web1", "database schema": "2", "schema guard": "passed"}
    assert _ready_lines(["batch 1 (canary): web1"], plans, database, True) == [
        "batch 1 (canary): web1",
        f"web1: ready: roll back web1 (its steps are not shown: its runbook 0.1.0, fleet "
        f"protocol {FLEET_PROTOCOL}, sends no plan; upgrade togather-runbook there to "
        f"{metadata.version('togather-runbook')}, this controller's, to see them)",
        "web2: ready: roll back web2",
        "    Plan: roll back web2",
        "     1. Start the stopped blue container",
        "          container  web2-blue",
        "database (once, on web1): 2, schema guard passed"]


def test_a_host_whose_runbook_does_not_know_an_option_is_told_to_upgrade_not_to_install_fleet(
        ) -> None:
    """A host on an older fleet protocol fails the controller's host-check at option parsing
    (protocol 7 added `--end-sessions`), before it can answer with its protocol, so the
    protocol-mismatch line never came: its pre-flight problem said "install togather-runbook
    with fleet support (>= 0.1.0) there", untrue of a host that has fleet support (found by
    review). The oracle for the host's answer is click's own wording, from the real CLI
    asked for an option it does not know; the line must name that option, the protocol this
    controller needs and the same version as the controller's on every host."""
    from importlib import metadata

    from runbook.fleet import FLEET_PROTOCOL
    from runbook.fleet.rollout import Events, preflight

    told = subprocess.run([sys.executable, "-m", "runbook.cli", "fleet", "host-check",
                           "development", "--bogus"], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert told.returncode == 2 and "No such option: --bogus" in told.stderr, told.stderr
    events = Events(results={"host-check": {"web1": {
        "_event": "runner_on_failed", "rc": told.returncode, "stdout": told.stdout,
        "stderr": told.stderr}}})
    inventory = inv.Inventory(Path("inventory.yml"), ["web1"], {"canary": ["web1"]}, {})
    _, problems, _ = preflight(events, inventory, ["web1"], take_lock=False)
    assert [str(p) for p in problems] == [
        f"web1: its runbook is older than this controller's: it does not know option --bogus "
        f"(fleet protocol {FLEET_PROTOCOL} needed): install togather-runbook "
        f"{metadata.version('togather-runbook')}, this controller's version, on every host"]


class _SteppedClock:
    """The controller's wall clock (time.time) as NTP or a VM's resume leaves it: real time
    until `step` moves it by `by` seconds. A real clock step cannot be made in a test, so
    time.time is replaced in this process; time.monotonic, the tests' oracle, is untouched."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = 0.0
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + self.offset)

    def step(self, by: float) -> None:
        self.offset += by


def test_fleet_journal_times_are_right_when_the_controllers_clock_steps_back_mid_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fleet journal's durations (the run's, each phase's, each host's) were wall-clock
    differences: NTP stepping the controller's clock back an hour during a host's rollback
    journaled that host as taking minus an hour, the rollout phase and the run likewise, and
    the drill report drew and listed them so. Oracle: time.monotonic() read by this test
    around each part (elapsed time no clock step changes); every duration is at least what
    the test saw elapse inside it and at most what elapsed around it."""
    from types import SimpleNamespace

    from runbook.fleet import journal as fjournal
    from runbook.fleet.rollout import (
        ROLLED_BACK,
        HostResult,
        Options,
        _host_events,
        _Interrupts,
        _rollout,
    )
    from runbook.reports import fleet as fleet_report

    clock = _SteppedClock(monkeypatch)
    outer = time.monotonic()
    inventory = inv.Inventory(path=tmp_path / "hosts.yml", hosts=["web1", "web2"],
                              groups={"canary": ["web1"]}, hostvars={})
    plan = inv.batches(["web1", "web2"], ["web1"], "100%")
    options = Options(inventory=inventory.path, journal_dir=tmp_path / "journal")
    journal = fjournal.FleetJournal("fleet_20261206_000000_abcdef", options, inventory,
                                    ["web1", "web2"], plan, "ops@laptop")
    hosts = {h: HostResult(h) for h in ("web1", "web2")}
    events = _host_events(hosts, lambda line: None, journal)
    inside: dict[str, float] = {}

    def rollback(host: str, *, step_at_half: float = 0.0) -> None:
        task = {"host": host, "task": "runbook rollback"}
        events({"event": "runner_on_start", "event_data": task})
        began = time.monotonic()
        time.sleep(0.15)
        clock.step(step_at_half)  # NTP steps the controller's clock during the rollback
        time.sleep(0.15)
        out = json.dumps({"ok": True, "timing": {"done_in_s": 0.3}})
        inside[host] = time.monotonic() - began
        events({"event": "runner_on_ok", "event_data": {
            **task, "res": {"rc": 0, "stdout": f"{out}\n"}}})

    def go() -> None:
        began = time.monotonic()
        rollback("web1")
        rollback("web2", step_at_half=-3600.0)
        inside["rollout"] = time.monotonic() - began

    run = SimpleNamespace(events=events, join=lambda: "successful")
    interrupts = _Interrupts()
    try:
        result = _rollout(run, inventory, plan, journal.record["fleet_run_id"],  # type: ignore[arg-type]
                          options, journal, hosts, interrupts, lambda line: None, go)
    finally:
        interrupts.cleanup()
    around = (time.monotonic() - outer) * 1000
    assert result.exit_code == 0 and all(r.status == ROLLED_BACK for r in hosts.values())
    record = json.loads(Path(str(result.journal_file)).read_text())

    assert inside["rollout"] * 1000 <= record["duration_ms"] <= around, record["duration_ms"]
    rollout = next(p for p in record["phases"] if p["name"] == "rollout")
    assert 0 <= rollout["offset_ms"] <= around, rollout
    assert inside["rollout"] * 1000 <= rollout["duration_ms"] <= around, rollout
    for host in ("web1", "web2"):
        entry = record["hosts"][host]
        assert inside[host] * 1000 <= entry["duration_ms"] <= around, entry
        assert 0 <= entry["offset_ms"] <= around, entry
    assert record["hosts"]["web1"]["offset_ms"] + record["hosts"]["web1"]["duration_ms"] \
        <= record["hosts"]["web2"]["offset_ms"], record["hosts"]  # web1 ended first

    # the drill report's fleet section, drawn from that record alone
    steps = {s["name"]: s for s in fleet_report.as_run(record)["steps"]}
    drawn = [steps["web1 (canary)"], steps["web2 (batch 2)"]]
    for step, host in zip(drawn, ("web1", "web2"), strict=True):
        assert inside[host] * 1000 <= step["duration_ms"] <= around, step
    assert drawn[0]["started_at"] < drawn[1]["started_at"], drawn  # the canary drawn first
    listed = {h["host"]: h["took"] for h in fleet_report.section(record)["hosts"]}
    assert all(took.endswith(" ms") and not took.startswith("-") for took in listed.values()), \
        listed


def test_the_run_records_duration_is_right_when_the_clock_steps_back_mid_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The single-host journal's last line gave the run's duration as finished_at minus
    started_at, two wall-clock readings: a clock stepped back an hour mid-run logged minus an
    hour. Oracle: time.monotonic() read by this test around the run."""
    from datetime import UTC, datetime, timedelta

    from runbook import journal as journalmod
    from tests.drill_checks import host_env

    offset = [timedelta(0)]

    class SteppedDatetime(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:  # the wall clock, stepped as NTP would
            return datetime.now(tz) + offset[0]

    monkeypatch.setattr(journalmod, "datetime", SteppedDatetime)
    outer = time.monotonic()
    j = journalmod.Journal.open(host_env(tmp_path, name="staging"), "rollback")
    time.sleep(0.15)
    offset[0] = timedelta(hours=-1)
    time.sleep(0.15)
    j.finish("succeeded", ExitCode.OK)
    around = (time.monotonic() - outer) * 1000
    last = json.loads(j.log_path.read_text().splitlines()[-1])
    assert 300 <= last["duration_ms"] <= around, last
    assert datetime.fromisoformat(json.loads(j.record_path.read_text())["started_at"]) \
        .astimezone(UTC) is not None  # still a timestamp


def test_default_batches_are_canary_then_one_then_a_quarter_then_the_rest() -> None:
    hosts = [f"h{i}" for i in range(10)]
    plan = inv.batches(hosts, ["h0"], inv.DEFAULT_BATCHES)
    assert plan.batches == [["h0"], ["h1"], ["h2", "h3"], ["h4", "h5", "h6", "h7", "h8", "h9"]]
    assert plan.serial == [1, 1, 2, 6]


def test_batches_of_three_hosts_with_a_canary_and_a_batch_of_two() -> None:
    assert inv.batches(["a", "b", "c"], ["a"], "100%").batches == [["a"], ["b", "c"]]
    assert inv.batches(["a", "b", "c"], [], "1").batches == [["a"], ["b"], ["c"]]


def test_no_batch_is_larger_than_the_fork_count() -> None:
    """Ansible starts at most MAX_FORKS hosts at once and judges a batch's failures only when
    all its hosts ran: a batch of 20 would start its last 12 after a failure among the first
    8. Every batch, the canary group's too, is split to at most MAX_FORKS hosts."""
    assert inv.MAX_FORKS == 8
    hosts = [f"h{i:02}" for i in range(30)]
    plan = inv.batches(hosts, hosts[:10], "100%")
    assert plan.serial == [8, 2, 8, 8, 4] and plan.split
    assert [h for b in plan.batches for h in b] == hosts  # the order kept
    assert not inv.batches(hosts[:9], [], "8").split


@pytest.mark.parametrize("spec", ["", "x", "0", "1,abc%", "inf%", "1e999%", "nan%", "0%",
                                  "-5%"])
def test_a_bad_batch_spec_is_a_usage_error(spec: str) -> None:
    with pytest.raises(UsageError):
        inv.batches(["a", "b", "c"], ["a"], spec)
    with pytest.raises(UsageError):  # judged even when no batch would use it
        inv.batches(["a"], ["a"], f"1,{spec}" if spec else spec)


def test_a_bad_batch_spec_is_one_line_exit_2_before_any_host(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yml"
    path.write_text(ONE_ENV_INVENTORY)
    proc = subprocess.run([RUNBOOK, "fleet", "rollback", str(path), "--dry-run", "--batches",
                           "1,inf%"], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "'inf%'" in proc.stderr, proc.stderr


@pytest.mark.parametrize("spec", ["1,,2", "1,25%,", ",1", "1, ,2"])
def test_batches_with_an_empty_item_are_refused(spec: str, tmp_path: Path) -> None:
    """Found by review: `--batches 1,,2` was taken as `1,2` (the empty item dropped), while
    README says every item must be a positive count or percentage: refused, exit 2, one
    line naming the spec, before any host."""
    with pytest.raises(UsageError, match="empty item"):
        inv.batches(["a", "b", "c"], ["a"], spec)
    path = tmp_path / "inventory.yml"
    path.write_text(ONE_ENV_INVENTORY)
    proc = subprocess.run([RUNBOOK, "fleet", "rollback", str(path), "--dry-run", "--batches",
                           spec], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and repr(spec) in proc.stderr, proc.stderr


# -- inventory (real ansible-inventory) --------------------------------------------------------


def test_inventory_order_canary_and_vars(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yml"
    path.write_text(INVENTORY)
    inventory = inv.read(path)
    assert inventory.hosts == ["web3", "web1", "web2", "web4", "web5"]
    assert inventory.canary == ["web3"]
    assert inventory.lock_host == "web3"  # the first canary host by default
    assert inventory.select(None) == ["web3", "web1", "web2", "web4", "web5"]
    assert inventory.select("web,web5") == ["web3", "web1", "web2", "web4", "web5"]
    assert inventory.select("web4,web1") == ["web1", "web4"]  # declared order, not --limit's
    assert inventory.var("web1", "runbook_env") == "staging"
    assert inventory.var("web2", "runbook_env") == "production"
    with pytest.raises(UsageError, match="neither a host nor a group"):
        inventory.select("web9")


PLAIN_INVENTORIES = {
    "documented": INVENTORY,
    "readme": """\
all:
  hosts:
    lonely:
      x: 1
  vars:
    runbook_env: production
    runbook_command: /usr/local/bin/runbook
    fleet_lock_host: web1
  children:
    canary:
      hosts:
        web1:
    web:
      vars: {runbook_env: web-env, fleet_lock_host: web2}
      hosts:
        web2:
        web3:
          runbook_environment: {RUNBOOK_X: "1"}
      children:
        inner:
          vars: {runbook_env: inner-env}
          hosts: {web9: null, web1: null}
        aaa:
          vars: {runbook_env: aaa-env}
          hosts: {web9: null}
    empty:
""",
    "top-level groups": """\
canary:
  hosts:
    h1:
      n: [1, 2, {a: b}]
web:
  hosts: {h2: null, h1: null}
  vars: {n: web}
ungrouped:
  hosts: {u1: null}
""",
    "same depth, by name": """\
all:
  children:
    zeta:
      hosts: {h1: {v: z}}
    alpha:
      hosts: {h1: null}
      vars: {v: a, w: a}
    mid:
      children: {zeta: null}
      vars: {v: m, w: m}
""",
}


@pytest.mark.parametrize("name", sorted(PLAIN_INVENTORIES))
def test_a_plain_yaml_inventory_is_read_here_exactly_as_ansible_inventory_reads_it(
        name: str, tmp_path: Path) -> None:
    """The in-process reading (no 0.8 s `ansible-inventory` process) against its oracle, the
    real `ansible-inventory --list` on the same file: hosts, groups, order, merged vars."""
    path = tmp_path / "inventory.yml"
    path.write_text(PLAIN_INVENTORIES[name])
    here = inv.plain_yaml(path)
    real, _warnings = inv._ansible_inventory(path)
    real.get("_meta", {}).pop("profile", None)
    assert here == real


@pytest.mark.parametrize("case", ["ini", "group_vars", "range", "vault", "plugin", "priority"])
def test_an_inventory_that_needs_ansible_is_read_by_ansible(case: str, tmp_path: Path) -> None:
    path = tmp_path / ("inventory.ini" if case == "ini" else "inventory.yml")
    text = {"ini": "[canary]\nweb1\n[web]\nweb2\n",
            "range": "all:\n  children:\n    web:\n      hosts:\n        web[1:3]:\n",
            "vault": "all:\n  vars:\n    secret: !vault |\n      $ANSIBLE_VAULT;1.1;AES256\n"
                     "      3133\n  hosts:\n    web1:\n",
            "plugin": "plugin: ansible.builtin.constructed\n",
            "priority": "all:\n  children:\n    web:\n      vars:\n"
                        "        ansible_group_priority: 5\n      hosts:\n        web1:\n",
            }.get(case, INVENTORY)
    path.write_text(text)
    if case == "group_vars":
        (tmp_path / "group_vars").mkdir()
        (tmp_path / "group_vars" / "web.yml").write_text("runbook_env: from-group-vars\n")
    assert inv.plain_yaml(path) is None
    if case in ("ini", "group_vars", "range"):
        inventory = inv.read(path)  # through ansible-inventory, as before
        expected = {"ini": ["web1", "web2"], "range": ["web1", "web2", "web3"],
                    "group_vars": ["web3", "web1", "web2", "web4", "web5"]}[case]
        assert inventory.hosts == expected
        if case == "group_vars":
            assert inventory.var("web2", "runbook_env") == "from-group-vars"


SHARED_GROUPS = {  # `front` under east and canary; `canary` at top level and under west
    "inventory.yml": """\
all:
  children:
    east:
      hosts:
        web2:
      children:
        front:
          hosts:
            web1:
    canary:
      children:
        front:
    west:
      hosts:
        web3:
      children:
        canary:
""",
    "inventory.ini": "[east]\nweb2\n[front]\nweb1\n[east:children]\nfront\n"
                     "[canary:children]\nfront\n[west]\nweb3\n[west:children]\ncanary\n",
}


@pytest.mark.parametrize("name", sorted(SHARED_GROUPS))
def test_a_group_under_two_parents_counts_in_both_as_ansible_says(
        name: str, tmp_path: Path) -> None:
    """Found by review: a group reached a second time (a child of two groups) added no hosts
    to its second parent, so `--limit west` and the canary group silently left hosts out.
    Oracle: the hosts the real `ansible GROUP --list-hosts` names for each group."""
    path = tmp_path / name
    path.write_text(SHARED_GROUPS[name])
    inventory = inv.read(path)
    ansible = str(Path(sys.executable).with_name("ansible"))
    for group in ("east", "front", "canary", "west"):
        out = subprocess.run([ansible, "-i", str(path), group, "--list-hosts"],
                             capture_output=True, text=True, check=True, timeout=120,
                             env={**os.environ, "ANSIBLE_NOCOLOR": "1"}).stdout
        listed = {line.strip() for line in out.splitlines()[1:] if line.strip()}
        assert set(inventory.select(group)) == listed, (group, out)
    assert inventory.canary == ["web1"]


def test_fleet_lock_host_var_and_a_wrong_one(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yml"
    path.write_text(INVENTORY.replace("runbook_env: production",
                                      "runbook_env: production\n    fleet_lock_host: web5"))
    assert inv.read(path).lock_host == "web5"
    path.write_text(INVENTORY.replace("runbook_env: production",
                                      "runbook_env: production\n    fleet_lock_host: nope"))
    with pytest.raises(RunbookError, match="not a host of the inventory"):
        _ = inv.read(path).lock_host


def test_an_unreadable_inventory_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("all: [unbalanced\n")
    proc = subprocess.run([RUNBOOK, "fleet", "rollback", str(bad), "--dry-run"],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "inventory" in proc.stderr
    missing = subprocess.run([RUNBOOK, "fleet", "rollback", str(tmp_path / "no.yml"),
                              "--dry-run"], capture_output=True, text=True, check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.parametrize(("name", "text", "said"), [
    ("hosts.yml", "all:\n  hosts: [\n", "line 3"),
    ("hosts.yaml", "all:\n  children:\n    canary: {hosts: {web1: }\n", "line 4"),
    ("hosts.ini", "[canary\nweb1\n", "ini"),
])
def test_an_inventory_that_does_not_parse_is_said_so_not_that_it_has_no_hosts(
        name: str, text: str, said: str, tmp_path: Path) -> None:
    """Found by review: a YAML inventory with a syntax error said "inventory ... has no
    hosts; add hosts", sending on-call to add hosts the file holds. It says the file does not
    parse, with the YAML error's line (or ansible-inventory's own words for another format);
    a file that parses but holds no hosts still says so."""
    path = tmp_path / name
    path.write_text(text)
    proc = subprocess.run([RUNBOOK, "fleet", "rollback", str(path), "--dry-run"],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"inventory {path} does not parse" in proc.stderr, proc.stderr
    assert said in proc.stderr and "has no hosts" not in proc.stderr, proc.stderr
    empty = tmp_path / "empty.yml"
    empty.write_text("all:\n  hosts: {}\n")
    proc = subprocess.run([RUNBOOK, "fleet", "rollback", str(empty), "--dry-run"],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2 and "has no hosts" in proc.stderr, proc.stderr


def test_without_ansible_runner_the_fleet_is_one_line_exit_2_before_any_lock(
        tmp_path: Path) -> None:
    """Found by review: with a system Ansible on PATH and the package installed without the
    [fleet] extra, the inventory was read, then `import ansible_runner` failed: a traceback,
    exit 1, and "could not release the fleet lock" for a lock never taken. Here the import
    fails for real (a module of that name that raises ImportError, first on the path)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "ansible_runner.py").write_text("raise ImportError('not installed here')\n")
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(INVENTORY)
    env = {**os.environ, "PYTHONPATH": str(shadow)}
    proc = subprocess.run([RUNBOOK, "fleet", "rollback", str(inventory), "--yes"],
                          capture_output=True, text=True, check=False, timeout=120, env=env,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "ansible-runner is not installed" in proc.stderr
    assert "pip install 'togather-runbook[fleet]'" in proc.stderr
    assert "Traceback" not in proc.stderr and "release" not in proc.stderr


@pytest.mark.parametrize("case", ["missing", "misspelled", "empty"])
def test_no_canary_group_is_refused_in_one_line_naming_it(case: str, tmp_path: Path) -> None:
    """A missing or misspelled canary group would silently mean no canary: refused, exit 2,
    one line naming the group, before any host is asked anything."""
    path = tmp_path / "inventory.yml"
    text = {"missing": INVENTORY.replace("    canary:\n      hosts:\n        web3:\n", ""),
            "misspelled": INVENTORY, "empty": INVENTORY.replace(
                "    canary:\n      hosts:\n        web3:\n", "    canary:\n")}[case]
    assert text != INVENTORY or case == "misspelled"
    path.write_text(text)
    group = "canray" if case == "misspelled" else "canary"
    proc = subprocess.run([RUNBOOK, "fleet", "rollback", str(path), "--dry-run",
                           "--canary-group", group], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and f"group '{group}'" in proc.stderr, proc.stderr
    assert "nothing was changed" in proc.stderr and "--canary-group" in proc.stderr


def test_unattended_without_yes_is_refused_before_anything(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yml"
    path.write_text(INVENTORY)
    proc = subprocess.run([RUNBOOK, "fleet", "rollback", str(path)], capture_output=True,
                          text=True, check=False, stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 2
    assert "stdin is not a terminal" in proc.stderr and "--yes" in proc.stderr


# -- the fleet lock (host side) ----------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> Environment:
    # its guard beside the state file (as the deploy lock's): never the packaged /opt path
    return envmod.load("staging").with_(lock_dir=tmp_path,
                                        state_file=tmp_path / "state" / "deployment-state.json")


def _take(env: Environment, run: str, **kw: object) -> dict[str, object]:
    args: dict[str, object] = {"locked_by": "ops@laptop", "hostname": "laptop", "pid": 1,
                               "reason": "test"}
    args.update(kw)
    return hostlock.take(env, fleet_run_id=run, **args)  # type: ignore[arg-type]


def test_fleet_lock_take_refuse_refresh_release(env: Environment) -> None:
    out = _take(env, "fleet_a")
    assert out["taken"] and "taken_over" not in out
    held = hostlock.status(env)
    assert held is not None and not held.stale
    assert "ops@laptop" in held.describe() and "fleet_a" in held.describe()
    with pytest.raises(LockedError, match="held by ops@laptop"):
        _take(env, "fleet_b")
    assert _take(env, "fleet_a")["taken"]  # a retried take by the same run
    with pytest.raises(LockedError):
        hostlock.refresh(env, "fleet_b")
    assert hostlock.refresh(env, "fleet_a")["refreshed"]
    with pytest.raises(RunbookError, match="left alone"):
        hostlock.release(env, "fleet_b")
    assert hostlock.path(env).exists()
    assert hostlock.release(env, "fleet_a")["released"]
    assert hostlock.status(env) is None


def _lock_cli(env: Environment, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`runbook fleet lock ENV ...` as the fleet runs it on a host, with env's own file."""
    config = tmp_path / f"{env.name}.toml"
    config.write_text(envmod.to_toml(env))
    return subprocess.run([RUNBOOK, "fleet", "lock", env.name, "--config", str(config), *args],
                          capture_output=True, text=True, check=False, timeout=60)


@pytest.mark.parametrize("bad", [
    ["--pid", "-1"], ["--pid", "0"], ["--controller-host", ""], ["--holder", ""],
    ["--controller-host", " "], ["--drop", "--controller-host"], ["--drop", "--pid"],
])
def test_a_fleet_lock_take_without_a_judgeable_controller_is_refused(
        env: Environment, tmp_path: Path, bad: list[str]) -> None:
    """Found by review: `fleet lock ENV --take --fleet-run x --pid -1` wrote a lock with pid
    -1 and hostname "" that no one could judge: it blocked every fleet run for 30 minutes and
    `--release --force` refused it. The controller's pid (1 or more), host and holder are
    required to take it (the fleet always passes them); refused with exit 2, no lock left."""
    given = {"--fleet-run": "fleet_x", "--holder": "ops@desk", "--controller-host": "desk",
             "--pid": "4242"}
    if bad[0] == "--drop":
        del given[bad[1]]
    else:
        given[bad[0]] = bad[1]
    args = [x for pair in given.items() for x in pair]
    for command in (["--take"], None):
        if command is None:  # the lock host's host-check takes it the same way
            config = tmp_path / f"{env.name}.toml"
            config.write_text(envmod.to_toml(env))
            proc = subprocess.run([RUNBOOK, "fleet", "host-check", env.name, "--config",
                                   str(config), "--take-lock", *args], capture_output=True,
                                  text=True, check=False, timeout=60)
        else:
            proc = _lock_cli(env, tmp_path, *command, *args)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert hostlock.status(env) is None and not hostlock.path(env).exists()


def test_a_fleet_lock_release_names_the_environment_and_host_it_checked(
        env: Environment, tmp_path: Path) -> None:
    """A host carrying two environments (development beside staging, one lock folder):
    `fleet lock staging --release` answered "already free" while development's lock was held,
    naming neither: on-call could not tell which lock it had looked at. Every answer (freed,
    already free, refused) names the environment, the host and the lock it checked.
    Oracles: socket.gethostname() of this host, the lock directories on disk."""
    import socket

    host = socket.gethostname()
    dev = env.with_(name="development")
    staging_lock, dev_lock = hostlock.path(env), hostlock.path(dev)
    _take(dev, "fleet_dev")

    free = _lock_cli(env, tmp_path, "--release", "--fleet-run", "fleet_dev")
    assert free.returncode == 0, free.stderr
    out = json.loads(free.stdout)
    assert out["released"] is False
    assert (out["environment"], out["host"], out["lock"]) == ("staging", host, str(staging_lock))
    assert f"the staging fleet lock on {host} ({staging_lock}) is already free" in out["why"]
    assert dev_lock.exists()  # development's, held, is another lock: left alone

    _take(env, "fleet_stg")
    refused = _lock_cli(env, tmp_path, "--release", "--fleet-run", "fleet_dev")
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"the staging fleet lock on {host} ({staging_lock}) is held by" in refused.stderr
    said = json.loads(refused.stdout)
    assert (said["environment"], said["host"], said["lock"]) == ("staging", host,
                                                                str(staging_lock))
    assert staging_lock.exists()

    freed = _lock_cli(env, tmp_path, "--release", "--fleet-run", "fleet_stg")
    assert freed.returncode == 0, freed.stderr
    out = json.loads(freed.stdout)
    assert out["released"] is True and not staging_lock.exists()
    assert (out["environment"], out["host"], out["lock"]) == ("staging", host, str(staging_lock))
    assert f"released the staging fleet lock on {host} ({staging_lock})" in out["why"]
    assert dev_lock.exists()


def test_an_expired_fleet_lock_is_taken_over_and_said(env: Environment) -> None:
    _take(env, "fleet_old", ttl=0.01)
    time.sleep(0.05)
    held = hostlock.status(env)
    assert held is not None and held.stale and held.why == "expired"
    out = _take(env, "fleet_new")
    assert out["taken_over"]["holder"]["fleet_run_id"] == "fleet_old"  # type: ignore[index]


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_a_fifo_in_the_fleet_lock_never_hangs_its_status(env: Environment, kind: str) -> None:
    """Found by review: the fleet lock's holder.json under /tmp (world-writable) was read
    with read_text, so a planted FIFO (or a link to /dev/zero) hung every fleet command. It
    is a holder that cannot be read: held until the directory's age expires it."""
    _take(env, "fleet_a")
    holder = hostlock.path(env) / "holder.json"
    holder.unlink()
    if kind == "fifo":
        os.mkfifo(holder)
    else:
        holder.symlink_to(kind)
    code = ("import sys, json; from pathlib import Path; from runbook import environment; "
            "from runbook.fleet import hostlock; "
            "env = environment.load('staging').with_(lock_dir=Path(sys.argv[1]), "
            "state_file=Path(sys.argv[1]) / 'state' / 'deployment-state.json'); "
            "held = hostlock.status(env); print(json.dumps([held.stale, held.holder]))")
    proc = subprocess.run([sys.executable, "-c", code, str(env.lock_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [False, {}]  # held (a young directory), by nobody named


def test_a_take_that_cannot_write_its_holder_leaves_no_lock_behind(env: Environment) -> None:
    """A full disk (here: a file size limit of 0, so the write fails for real) between the
    lock's mkdir and its holder file left an empty lock naming nobody: every fleet run was
    refused with exit 3 for 30 minutes, and no release could clear it."""
    script = ("import resource, signal, sys\n"
              "from pathlib import Path\n"
              "from runbook import environment as envmod\n"
              "from runbook.fleet import hostlock\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "env = envmod.load('staging').with_(lock_dir=Path(sys.argv[1]), "
              "state_file=Path(sys.argv[1]) / 'state' / 'deployment-state.json')\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))\n"
              "try:\n"
              "    hostlock.take(env, fleet_run_id='fleet_full', locked_by='ops', "
              "hostname='laptop', pid=1, reason='test')\n"
              "except Exception as exc:\n"
              "    print('refused', int(exc.exit_code), exc)\n")
    done = subprocess.run([sys.executable, "-c", script, str(env.lock_dir)],
                          capture_output=True, text=True, timeout=60, check=False)
    # one line naming the write (EFBIG here is exit 2; ENOSPC the precondition, exit 4)
    assert done.stdout.startswith("refused 2 cannot write the fleet lock's holder"), \
        done.stdout + done.stderr
    assert "nothing changed" in done.stdout and done.stdout.count("\n") == 1, done.stdout
    assert not hostlock.path(env).exists()  # no lock naming nobody
    assert hostlock.status(env) is None
    out = _take(env, "fleet_next")
    assert out["taken"] is True


def _shared_fleet_host(shared_dir: Path) -> Environment:
    """The fleet lock host as several operators share it: the lock folder sticky and open to
    all (as /tmp), the state folder writable by every deploying user."""
    env = envmod.load("staging").with_(lock_dir=shared_dir / "locks",
                                       state_file=shared_dir / "state" / "state.json")
    for folder, mode in ((env.lock_dir, 0o1777), (env.state_file.parent, 0o777)):
        folder.mkdir()
        folder.chmod(mode)
    return env


def _fleet_as_deploy(shared_dir: Path, code: str) -> Any:
    """`code` run as uid 1000 (another operator) on _shared_fleet_host's files; its JSON
    answer. `attempt(act)` gives ['done', what act returned] or [exit code, message, fix]."""
    imports = ("import json, sys\nfrom pathlib import Path\n"
               "from runbook import environment as envmod\nfrom runbook.fleet import hostlock\n"
               "import encodings.utf_8_sig, fcntl\n"
               "env = envmod.load('staging').with_(lock_dir=Path(sys.argv[1]) / 'locks', "
               "state_file=Path(sys.argv[1]) / 'state' / 'state.json')\n" + ATTEMPT)
    return json.loads(as_deploy_user([], imports, code, str(shared_dir)))


@needs_root
def test_a_fleet_lock_taken_under_umask_077_is_read_and_taken_by_every_other_operator(
        shared_dir: Path) -> None:
    """Found by review: the fleet lock's guard was made in the lock folder (/tmp) with the
    umask's mode: once root (umask 077) had taken the lock, every other operator's
    `fleet lock --take` crashed with PermissionError, "unexpected failure", exit 5. And the
    lock itself (directory, holder file) was 0700/0600: others read a holder naming nobody.
    The guard sits beside the state file, as the deploy lock's, 0644 whatever the umask; the
    lock and its holder are readable by all."""
    env = _shared_fleet_host(shared_dir)
    old = os.umask(0o077)
    try:
        _take(env, "fleet_root")
    finally:
        os.umask(old)
    seen = _fleet_as_deploy(shared_dir, "print(json.dumps(hostlock.status(env).holder))\n")
    assert hostlock.release(env, "fleet_root")["released"]
    code = ("print(json.dumps([attempt(lambda: hostlock.take(env, fleet_run_id='fleet_alice', "
            "locked_by='alice', hostname='laptop', pid=1, reason='test')['taken']),\n"
            "                  attempt(lambda: hostlock.release(env, 'fleet_alice')['released'])"
            "]))\n")
    assert _fleet_as_deploy(shared_dir, code) == [["done", True], ["done", True]]
    assert seen.get("fleet_run_id") == "fleet_root", seen
    guard = env.state_file.parent / ".togather-fleet-staging.lock.guard"
    assert guard.stat().st_uid == 0 and stat.S_IMODE(guard.stat().st_mode) == 0o644
    assert list(env.lock_dir.iterdir()) == []  # nothing of the fleet lock left in /tmp


@needs_root
def test_a_fleet_guard_no_other_operator_can_open_is_said_with_the_chmod_that_fixes_it(
        shared_dir: Path) -> None:
    """A fleet guard another user owns and left 0600: the take is refused in one line naming
    the file, its owner and `chmod a+r` (exit 4, as the deploy lock's guard), nothing
    taken; it was an uncaught PermissionError, exit 5."""
    env = _shared_fleet_host(shared_dir)
    guard = env.state_file.parent / ".togather-fleet-staging.lock.guard"
    guard.write_bytes(b"")
    os.chown(guard, OWNER_UID, OWNER_UID)
    guard.chmod(0o600)
    said = _fleet_as_deploy(shared_dir, (
        "print(json.dumps(attempt(lambda: hostlock.take(env, fleet_run_id='fleet_alice', "
        "locked_by='alice', hostname='laptop', pid=1, reason='test'))))\n"))
    assert said[0] == ExitCode.PRECONDITION, said
    _, message, fix = said
    assert f"fleet lock's guard {guard}" in message and f"uid {OWNER_UID}" in message, message
    assert f"chmod a+r {guard}" in fix and "root" in fix, fix
    assert list(env.lock_dir.iterdir()) == []


def test_an_empty_lock_left_by_a_killed_take_is_taken_over(env: Environment) -> None:
    """A take killed between its mkdir and its holder file (takes are serialised under the
    guard, so no live take is ever half done when another judges it) is stale, not live."""
    hostlock.path(env).mkdir(parents=True)
    out = _take(env, "fleet_next")
    assert out["taken"] is True and "taken_over" in out, out
    held = hostlock.status(env)
    assert held is not None and held.holder["fleet_run_id"] == "fleet_next"


def test_the_guard_an_older_runbook_flocks_in_the_lock_folder_is_taken_too(
        env: Environment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review (version skew): the guard moved beside the state file, so a runbook
    from before the move (another operator's install, an upgrade mid-run) and this one took
    different guards, and both took the fleet lock in the moment between a take's mkdir and
    its holder file. While the old guard exists it is flocked too; none is ever made."""
    import fcntl

    monkeypatch.setattr(hostlock, "GUARD_TIMEOUT", 0.3)
    old_guard = env.lock_dir / ".togather-fleet-staging.lock.guard"
    assert _take(env, "fleet_a")["taken"] is True
    assert not old_guard.exists()  # never made in the lock folder
    assert hostlock.release(env, "fleet_a")["released"]
    old_guard.write_bytes(b"")
    held = os.open(old_guard, os.O_RDONLY)  # an older runbook mid-take
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LockedError, match="changing the fleet lock"):
            _take(env, "fleet_b")
        assert hostlock.status(env) is None
    finally:
        os.close(held)
    assert _take(env, "fleet_b")["taken"] is True


def test_what_another_user_puts_where_the_old_guard_was_never_hangs_or_blocks_a_take(
        env: Environment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the old guard's name is in the world-writable lock folder, so any
    local user can put a FIFO there (its open hung the take for ever) or a file of their own
    and hold its flock (every take refused). Only a regular file of root, this user or the
    state file's owner is taken."""
    import fcntl

    monkeypatch.setattr(hostlock, "GUARD_TIMEOUT", 0.3)
    old_guard = env.lock_dir / ".togather-fleet-staging.lock.guard"
    os.mkfifo(old_guard)
    assert _take(env, "fleet_a")["taken"] is True  # returns: the FIFO is not opened blocking
    assert hostlock.release(env, "fleet_a")["released"]
    old_guard.unlink()
    old_guard.write_bytes(b"")
    os.chown(old_guard, 65534, 65534)  # nobody's
    held = os.open(old_guard, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert _take(env, "fleet_b")["taken"] is True
    finally:
        os.close(held)


def test_a_dead_controller_on_this_host_makes_its_lock_stale(env: Environment) -> None:
    import socket

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    _take(env, "fleet_dead", hostname=socket.gethostname(), pid=child.pid)
    held = hostlock.status(env)
    assert held is not None and held.stale and "gone" in held.why
    _take(env, "fleet_live", hostname=socket.gethostname(), pid=os.getpid())
    live = hostlock.status(env)
    assert live is not None and not live.stale  # a live holder is never stale


def _date_ahead(env: Environment, ahead: float, *, refreshed: bool = False) -> float:
    """Rewrite the fleet lock's holder.json as a take made while this host's clock ran `ahead`
    seconds fast wrote it (locked_at, and its expiry 30 minutes after that); never the
    machine's clock. Returns that locked_at."""
    holder_file = hostlock.path(env) / "holder.json"
    holder = json.loads(holder_file.read_text())
    at = time.time() + ahead
    holder["locked_at_epoch"] = at
    if not refreshed:
        holder["expires_at_epoch"] = at + 1800
    holder_file.write_text(json.dumps(holder))
    return at


def test_a_fleet_lock_dated_in_the_future_is_undated_and_on_call_may_force_it_out(
        env: Environment, tmp_path: Path) -> None:
    """Found by review: a dead controller's lock, taken while the lock host's clock ran 6 h
    fast, read as "held by a live fleet run" for hours once NTP set the clock back, and no
    command removed it (`fleet lock` had no --force; --take-over works only from the dead
    controller's own machine). Like the deploy lock dated in the future, it is now undated,
    saying the clock was set back and when it is dated; a new run's refusal names
    `--release --force`, which removes it. Oracles: the holder file as written, the lock
    directory on disk, the exit codes."""
    from datetime import UTC, datetime

    _take(env, "fleet_dead", hostname="laptop", pid=4242, reason="rollback")
    at = _date_ahead(env, 6 * 3600)
    dated = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    held = hostlock.status(env)
    assert held is not None and not held.stale and held.undated, held
    assert "live" not in held.why and "clock was set back" in held.why, held.why
    assert dated in held.why and "in the future" in held.why, held.why
    with pytest.raises(LockedError) as refused:
        _take(env, "fleet_new", hostname="desk", pid=1)
    assert "clock was set back" in refused.value.message, refused.value.message
    assert "wait for that fleet run to finish" not in (refused.value.fix or "")
    assert "runbook fleet lock" in (refused.value.fix or "") \
        and "--release --force" in (refused.value.fix or ""), refused.value.fix
    said = _lock_cli(env, tmp_path, "--status")
    assert said.returncode == 0, said.stderr
    shown = json.loads(said.stdout)
    assert shown["undated"] is True and shown["stale"] is False and "live" not in shown["why"]

    forced = _lock_cli(env, tmp_path, "--release", "--force")  # re-dated, not removed
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["redated"] is True and hostlock.path(env).exists()
    _expire_redated(env)  # its controller is dead: no heartbeat came in those minutes
    forced = _lock_cli(env, tmp_path, "--release", "--force")
    assert forced.returncode == 0, forced.stderr
    out = json.loads(forced.stdout)
    assert out["released"] is True and out["holder"]["fleet_run_id"] == "fleet_dead", out
    assert not hostlock.path(env).exists()
    assert _take(env, "fleet_new", hostname="desk", pid=1)["taken"] is True


def _expire_redated(env: Environment) -> None:
    """The minutes after an on-call re-dating pass with no heartbeat: its expiry (as the
    re-dating wrote it, and as its note records it) now lies in the past; never the clock."""
    holder_file = hostlock.path(env) / "holder.json"
    holder = json.loads(holder_file.read_text())
    past = time.time() - 1
    for value in holder.values():
        if isinstance(value, dict) and "expires_at_epoch" in value:
            value["expires_at_epoch"] = past
    holder["expires_at_epoch"] = past
    holder_file.write_text(json.dumps(holder))


def test_force_re_dates_an_undated_fleet_lock_whose_controller_may_still_run(
        env: Environment, tmp_path: Path) -> None:
    """Found by review: a live controller's lock, refreshed by its heartbeat 60 s ago, then
    the lock host's clock stepped back 10 min by NTP, reads undated until its next heartbeat;
    `--release --force` removed it, the controller's next refresh failed ("no longer held"),
    its rollout stopped between batches and a second run could start in the gap. On an
    undated lock --force now only re-dates its expiry (one heartbeat interval plus slack,
    every holder field kept, a note of who re-dated it and when): a live controller's
    heartbeat re-dates it as live; a dead one's reads stale after those minutes and is then
    removed at once. Oracles: the holder file on disk, the lock directory, the exit codes."""
    _take(env, "fleet_live", hostname="controller-1", pid=4242, reason="rollback")
    holder_file = hostlock.path(env) / "holder.json"
    holder = json.loads(holder_file.read_text())
    now = time.time()
    holder["locked_at_epoch"] = now - 3600 + 600  # taken an hour ago, by the clock before
    holder["expires_at_epoch"] = now - 60 + 1800 + 600  # its heartbeat 60 s ago, likewise
    holder_file.write_text(json.dumps(holder))
    held = hostlock.status(env)
    assert held is not None and held.undated and not held.stale, held

    forced = _lock_cli(env, tmp_path, "--release", "--force")
    assert forced.returncode == 0, forced.stderr
    out = json.loads(forced.stdout)
    assert out["released"] is False and out["redated"] is True, out
    assert hostlock.path(env).exists()
    after = json.loads(holder_file.read_text())
    kept = {k: v for k, v in after.items() if k != "expires_at_epoch" and k in holder}
    assert kept == {k: v for k, v in holder.items() if k != "expires_at_epoch"}, after
    assert now + 450 < after["expires_at_epoch"] < now + 1800, after  # a heartbeat's time
    note = [v for k, v in after.items() if k not in holder]
    assert len(note) == 1 and isinstance(note[0], dict), after
    assert abs(note[0]["at_epoch"] - time.time()) < 60, note  # when on-call re-dated it
    assert "heartbeat" in out["why"] and "stale" in out["why"], out["why"]
    assert "--release --force" in out["why"], out["why"]
    held = hostlock.status(env)
    assert held is not None and not held.stale and not held.undated, held
    assert "re-dated" in held.why and "live" not in held.why, held.why
    assert hostlock.status(env, now=after["expires_at_epoch"] + 1).stale  # type: ignore[union-attr]

    refused = _lock_cli(env, tmp_path, "--release", "--force")  # again, within those minutes
    assert refused.returncode == ExitCode.LOCKED, refused.stderr
    assert "re-dated" in refused.stderr and hostlock.path(env).exists(), refused.stderr
    with pytest.raises(LockedError) as taken:
        _take(env, "fleet_new", hostname="desk", pid=1)
    assert "stale" in (taken.value.fix or ""), taken.value.fix

    assert hostlock.refresh(env, "fleet_live")["refreshed"]  # the live controller's heartbeat
    held = hostlock.status(env)
    assert held is not None and not held.stale and not held.undated, held
    assert "live" in held.why and "re-dated" not in held.why, held.why

    holder = json.loads(holder_file.read_text())
    holder["expires_at_epoch"] = time.time() + 3 * 3600  # its controller died; the clock
    holder_file.write_text(json.dumps(holder))  # stepped back again before: undated again
    assert _lock_cli(env, tmp_path, "--release", "--force").returncode == 0
    _expire_redated(env)
    forced = _lock_cli(env, tmp_path, "--release", "--force")  # stale: removed at once
    assert forced.returncode == 0 and json.loads(forced.stdout)["released"] is True, forced
    assert not hostlock.path(env).exists()


def test_force_never_removes_a_fleet_lock_whose_heartbeat_is_fresh(
        env: Environment, tmp_path: Path) -> None:
    """`--release --force` is on-call's way out of a stale or undated fleet lock, never a live
    run's: refused (exit 3, the lock left) for a fresh lock, for one dated in the future that
    its controller's heartbeat refreshed since the clock was set back (a real refresh), and
    for one whose controller runs on this very host. Oracle: the lock directory on disk."""
    import socket

    _take(env, "fleet_live")
    refused = _lock_cli(env, tmp_path, "--release", "--force")
    assert refused.returncode == ExitCode.LOCKED and refused.stderr.count("\n") == 1, \
        refused.stderr
    assert "never removed" in refused.stderr and hostlock.path(env).exists()

    _date_ahead(env, 6 * 3600)
    hostlock.refresh(env, "fleet_live")  # its heartbeat, after the clock was set back
    held = hostlock.status(env)
    assert held is not None and not held.stale and not held.undated, held
    assert "set back" in held.why, held.why
    refused = _lock_cli(env, tmp_path, "--release", "--force")
    assert refused.returncode == ExitCode.LOCKED, refused.stderr
    assert hostlock.path(env).exists()
    assert hostlock.release(env, "fleet_live")["released"]

    _take(env, "fleet_here", hostname=socket.gethostname(), pid=os.getpid())
    _date_ahead(env, 6 * 3600)
    held = hostlock.status(env)
    assert held is not None and not held.stale and not held.undated, held
    refused = _lock_cli(env, tmp_path, "--release", "--force")
    assert refused.returncode == ExitCode.LOCKED, refused.stderr
    assert hostlock.path(env).exists()

    usage = _lock_cli(env, tmp_path, "--force")
    assert usage.returncode == ExitCode.USAGE and "--release" in usage.stderr, usage.stderr
    assert hostlock.path(env).exists()


def test_a_new_fleet_runs_refusal_over_a_lock_dated_in_the_future_names_the_way_out(
        env: Environment, tmp_path: Path) -> None:
    """What the on-call engineer reads: the lock host's real `runbook fleet lock --take`
    answer over a dead controller's lock dated 6 h in the future, as the controller's
    pre-flight gets it from the playbook's task, is exit 3 saying the clock was set back and
    naming `--release --force`, not "wait for that fleet run to finish" (for 6 h)."""
    from runbook.fleet.rollout import Events, FleetError, preflight

    _take(env, "fleet_dead", hostname="laptop", pid=4242, reason="rollback")
    _date_ahead(env, 6 * 3600)
    took = _lock_cli(env, tmp_path, "--take", "--fleet-run", "fleet_new", "--holder", "oncall",
                     "--controller-host", "desk", "--pid", "1")
    assert took.returncode == ExitCode.LOCKED, took.stderr
    events = Events(results={"take the fleet lock": {"web1": {
        "_event": "runner_on_failed", "rc": took.returncode, "stdout": took.stdout}}})
    inventory = inv.Inventory(path=tmp_path / "hosts.yml", hosts=["web1", "web2"],
                              groups={"canary": ["web2"]},
                              hostvars={"web2": {"fleet_lock_host": "web1"}})
    with pytest.raises(FleetError) as refused:
        preflight(events, inventory, ["web2"], take_lock=True, fleet_run_id="fleet_new")
    assert refused.value.exit_code == ExitCode.LOCKED
    assert "clock was set back" in refused.value.message, refused.value.message
    assert refused.value.fix and "--release --force" in refused.value.fix, refused.value.fix
    assert "wait for that fleet run" not in refused.value.fix


def test_pre_flight_refuses_with_exit_3_only_when_each_problem_is_a_live_lock(
        tmp_path: Path) -> None:
    """The code a refused pre-flight ends with, dry run or not, from the host-checks' problems
    (their shape as `runbook fleet host-check` reports a live deploy lock, a full disk): 3
    (wait) when each is a lock a live run holds, 4 (fix something) when any other is beside
    it, since waiting alone would not let the run through."""
    from runbook.fleet import FLEET_PROTOCOL
    from runbook.fleet.rollout import Events, _refusal_code, preflight

    locked = [{"check": "deploy lock", "exit_code": 3,
               "message": "the deploy lock is held by bob@web2 (pid 7 on web2)"},
              {"check": "rollback dry run", "exit_code": 3,
               "message": "web2: the deploy lock is held by bob@web2 (pid 7 on web2)"}]
    full = {"check": "disk space", "exit_code": 4, "message": "/var/lib is full"}

    def code(problems: dict[str, list[dict[str, object]]]) -> ExitCode:
        events = Events(results={"host-check": {h: {"stdout": json.dumps(
            {"fleet_protocol": FLEET_PROTOCOL, "environment": "staging",
             "fleet_lock": {"locked": False}, "problems": p})} for h, p in problems.items()}})
        inventory = inv.Inventory(path=tmp_path / "hosts.yml", hosts=["web1", "web2"],
                                  groups={"canary": ["web1"]}, hostvars={})
        _checks, lines, _ = preflight(events, inventory, list(problems), take_lock=False)
        assert len(lines) == sum(len(p) for p in problems.values())
        return _refusal_code(lines)

    assert code({"web1": [], "web2": locked}) == ExitCode.LOCKED
    assert code({"web1": [full], "web2": locked}) == ExitCode.PRECONDITION
    assert code({"web1": [], "web2": [*locked, full]}) == ExitCode.PRECONDITION


def test_a_dry_run_that_cannot_read_the_lock_hosts_fleet_lock_is_refused(
        env: Environment, tmp_path: Path) -> None:
    """Found by review: a dry run whose --limit leaves the lock host out reads its fleet lock
    (the play's "read the fleet lock" task, failed_when false); an unreachable lock host, or
    a runbook there that errs or answers nothing readable, read as a free lock and the dry run
    passed, where the real run's take would refuse. Each is now a pre-flight problem (4)
    naming the lock host and why. The error answer is the real CLI's (a broken config)."""
    from runbook.fleet import FLEET_PROTOCOL
    from runbook.fleet.rollout import Events, _refusal_code, preflight

    inventory = inv.Inventory(path=tmp_path / "hosts.yml", hosts=["web1", "web2"],
                              groups={"canary": ["web2"]},
                              hostvars={"web2": {"fleet_lock_host": "web1"}})
    target = {"host-check": {"web2": {"stdout": json.dumps(
        {"fleet_protocol": FLEET_PROTOCOL, "environment": "staging",
         "fleet_lock": {"locked": False}, "problems": []})}}}
    broken = tmp_path / "broken.toml"
    broken.write_text("[lock\n")
    erred = subprocess.run([RUNBOOK, "fleet", "lock", "staging", "--config", str(broken),
                            "--status"], capture_output=True, text=True, check=False,
                           timeout=60)
    assert erred.returncode == ExitCode.USAGE, erred
    said = json.loads(erred.stdout)["error"]  # "...: not valid TOML: ..."
    free = _lock_cli(env, tmp_path, "--status")
    assert free.returncode == 0 and json.loads(free.stdout)["locked"] is False, free

    def lines(read: dict[str, object] | None, unreachable: str = "") -> list[str]:
        events = Events(results={**target, **({"read the fleet lock": {"web1": read}}
                                              if read is not None else {})},
                        unreachable={"web1": unreachable} if unreachable else {})
        _checks, problems, _ = preflight(events, inventory, ["web2"], take_lock=False)
        return problems

    assert lines({"_event": "runner_on_ok", "rc": 0, "stdout": free.stdout}) == []
    for read, unreachable, why in (
            (None, "ssh: connect to host web1 port 22: No route to host", "No route to host"),
            (None, "", "no answer"),
            ({"_event": "runner_on_ok", "rc": erred.returncode, "stdout": erred.stdout,
              "stderr": erred.stderr}, "", said),
            ({"_event": "runner_on_ok", "rc": 127, "stdout": "",
              "stderr": "sh: 1: runbook: not found"}, "", "runbook: not found")):
        problems = lines(read, unreachable)
        assert len(problems) == 1 and problems[0].startswith("web1: fleet lock"), problems
        assert why in problems[0], problems
        assert _refusal_code(problems) == ExitCode.PRECONDITION


def test_a_resume_takes_over_only_the_lock_of_the_run_whose_controller_it_found_dead(
        env: Environment) -> None:
    """The lock host cannot see the controller's machine: a live-looking lock (another
    machine's pid) is taken over only when the resuming controller names its fleet run."""
    _take(env, "fleet_dead", hostname="laptop", pid=1)
    with pytest.raises(LockedError):
        _take(env, "fleet_new", take_over="fleet_other")
    out = _take(env, "fleet_new", take_over="fleet_dead")
    assert out["taken_over"]["holder"]["fleet_run_id"] == "fleet_dead"  # type: ignore[index]
    assert "found dead by the resume" in out["taken_over"]["why"]  # type: ignore[index]
    held = hostlock.status(env)
    assert held is not None and held.holder["fleet_run_id"] == "fleet_new"


def test_a_batch_longer_than_the_fleet_locks_lifetime_keeps_it_and_a_takeover_is_refused(
        env: Environment) -> None:
    """Found by review: the fleet lock was refreshed only between batches, so a batch (or the
    maintenance restore) longer than its 30 minutes let it look stale while the run went on,
    and another operator's run took it over and acted on the same hosts. The controller's
    heartbeat keeps it fresh while the run holds it (here a 1 s lifetime, a 3 s batch), and
    stops with the run: nothing refreshes it after that, so it expires as before."""
    from runbook.fleet.rollout import _lock_heartbeat

    beats: list[float] = []

    def refresh(cancel: object) -> None:
        beats.append(time.monotonic())
        hostlock.refresh(env, "fleet_long", ttl=1.0)

    _take(env, "fleet_long", ttl=1.0)
    with _lock_heartbeat(refresh, every=0.2):
        time.sleep(3.0)  # the batch: three lifetimes of the lock
        held = hostlock.status(env)
        assert held is not None and not held.stale, held
        with pytest.raises(LockedError, match="held by ops@laptop"):
            _take(env, "fleet_other")
    stopped = len(beats)
    time.sleep(1.5)
    assert len(beats) == stopped  # no heartbeat outlives the run
    held = hostlock.status(env)
    assert held is not None and held.stale and held.why == "expired"
    assert _take(env, "fleet_other")["taken_over"]


def test_a_second_ctrl_c_while_the_heartbeat_stops_never_skips_the_release() -> None:
    """Found by review: the run's `finally` stopped the heartbeat (waiting for a beat in
    flight: ansible-runner sees its cancel only at its next poll) before it held the signals
    for the release, so a second Ctrl-C then escaped the `finally` and the fleet lock was
    never released (a colleague's fleet rollback refused for 30 minutes). The stop holds
    them as the release does: the code after it always runs."""
    import threading

    from runbook.fleet.rollout import _lock_heartbeat

    def slow_beat(cancelled: object) -> None:  # a refresh still running when the run ends
        time.sleep(2.0)

    reached = False
    stack = contextlib.ExitStack()
    stack.enter_context(_lock_heartbeat(slow_beat, every=0.1))
    time.sleep(0.4)  # a beat is in flight
    second = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    try:
        try:
            second.start()
            raise KeyboardInterrupt  # the first Ctrl-C
        finally:
            stack.close()  # the run's finally: the heartbeat stops, then the release
            reached = True
    except KeyboardInterrupt:
        pass
    finally:
        second.cancel()
    assert reached, "a Ctrl-C during the heartbeat's stop skipped the lock's release"


def test_the_heartbeat_never_replaces_a_fleet_lock_another_run_took_over(
        env: Environment) -> None:
    """Each beat refreshes the lock only while it names this fleet run (under the guard): a
    lock a resume took over (its controller found dead) stays the new run's, untouched."""
    from runbook.fleet.rollout import _lock_heartbeat

    refused: list[str] = []

    def refresh(cancel: object) -> None:
        try:
            hostlock.refresh(env, "fleet_old", ttl=1.0)
        except LockedError as exc:
            refused.append(exc.message)
            raise

    _take(env, "fleet_old", ttl=1.0)
    with _lock_heartbeat(refresh, every=0.1):
        _take(env, "fleet_new", take_over="fleet_old", ttl=600.0)
        before = (hostlock.path(env) / "holder.json").read_text()
        time.sleep(0.8)
        assert (hostlock.path(env) / "holder.json").read_text() == before
    assert refused and "no longer held by fleet run fleet_old" in refused[0], refused
    held = hostlock.status(env)
    assert held is not None and held.holder["fleet_run_id"] == "fleet_new" and not held.stale


def test_a_killed_controllers_fleet_lock_still_goes_stale(env: Environment) -> None:
    """Crash safety: the heartbeat is a thread of the controller, so `kill -9` of the
    controller ends it; its lock (held from another machine: no pid to check here) expires
    after its lifetime, as before, and the next run takes it over."""
    script = ("import sys, time\n"
              "from pathlib import Path\n"
              "from runbook import environment as envmod\n"
              "from runbook.fleet import hostlock\n"
              "from runbook.fleet.rollout import _lock_heartbeat\n"
              "env = envmod.load('staging').with_(lock_dir=Path(sys.argv[1]), "
              "state_file=Path(sys.argv[1]) / 'state' / 'deployment-state.json')\n"
              "hostlock.take(env, fleet_run_id='fleet_killed', locked_by='ops', "
              "hostname='laptop', pid=1, reason='test', ttl=1.0)\n"
              "with _lock_heartbeat(lambda cancel: hostlock.refresh(env, 'fleet_killed', "
              "ttl=1.0), every=0.2):\n"
              "    print('holding', flush=True)\n"
              "    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(env.lock_dir)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        time.sleep(2.0)  # two lifetimes: kept fresh by the live controller
        with pytest.raises(LockedError):
            _take(env, "fleet_next")
    finally:
        proc.kill()
        proc.wait()
    time.sleep(1.5)
    held = hostlock.status(env)
    assert held is not None and held.stale and held.why == "expired"
    out = _take(env, "fleet_next")
    assert out["taken_over"]["holder"]["fleet_run_id"] == "fleet_killed"  # type: ignore[index]


def test_a_live_fleet_lock_is_never_taken_over_after_the_lock_hosts_clock_jumped_forward(
        env: Environment, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Found by review: the lock host's clock stepped forward more than the lock's 30 minutes
    (NTP after a drift, a VM resumed) made a live controller's lock read "expired" until its
    next heartbeat (a minute, up to 7.5), and a new run took it over in that window while the
    old controller went on rolling hosts; `--release --force` removed it too. A lock whose
    last take or heartbeat is younger than its lifetime by the lock host's monotonic clock is
    live whatever the wall clock says; a dead holder's still goes stale after its lifetime.
    The jump is the wall clock (time.time) of this process, which runs the lock host's code:
    a real clock step cannot be made in a test. Oracles: the holder file on disk (whose lock,
    which fleet run), the lock directory, the exceptions raised."""
    import threading

    from runbook.fleet.rollout import _lock_heartbeat

    clock = _SteppedClock(monkeypatch)
    holder_file = hostlock.path(env) / "holder.json"
    _take(env, "fleet_live", hostname="controller-1", pid=4242)
    beats: list[float] = []
    window = threading.Lock()  # held by the test from the jump to its last check

    def beat(cancelled: object) -> None:
        with window:
            hostlock.refresh(env, "fleet_live")
            beats.append(time.monotonic())

    beat(None)
    with _lock_heartbeat(beat, every=0.3):  # its controller keeps beating
        for _ in range(3):
            with window:  # between two beats
                clock.step(31 * 60)  # the lock host's clock jumps 31 minutes ahead
                before = json.loads(holder_file.read_text())
                assert before["expires_at_epoch"] < time.time(), before  # its beat reads old
                held = hostlock.status(env)
                assert held is not None and not held.stale, held
                with pytest.raises(LockedError, match="held by ops@laptop"):
                    _take(env, "fleet_new", hostname="desk", pid=1)
                with pytest.raises(LockedError, match="never removed"):
                    hostlock.force_release(env)
                assert json.loads(holder_file.read_text()) == before  # untouched
                seen = len(beats)
            deadline = time.monotonic() + 5
            while len(beats) == seen and time.monotonic() < deadline:  # its next beat
                time.sleep(0.05)
            assert len(beats) > seen, "the live controller's heartbeat was refused"
    assert hostlock.status(env).holder["fleet_run_id"] == "fleet_live"  # type: ignore[union-attr]

    # a dead controller's lock, its last beat noted, still goes stale after its lifetime
    assert hostlock.release(env, "fleet_live")["released"]
    _take(env, "fleet_dead", hostname="controller-1", pid=4242, ttl=0.5)
    clock.step(31 * 60)
    with pytest.raises(LockedError):  # within its 0.5 s by the monotonic clock: live
        _take(env, "fleet_new", hostname="desk", pid=1)
    time.sleep(0.6)
    out = _take(env, "fleet_new", hostname="desk", pid=1)
    assert out["taken_over"]["holder"]["fleet_run_id"] == "fleet_dead"  # type: ignore[index]


def test_a_resume_of_a_maintenance_run_killed_before_its_restore_was_recorded_is_refused(
) -> None:
    """A maintenance run whose controller died after the drain began and before the restore's
    outcome was journaled: the database may or may not be restored, so a resume (which never
    restores again, and would otherwise plan a restore anew) refuses, exit 5, saying what to
    check and how to finish."""
    from runbook.errors import ExitCode
    from runbook.fleet.rollout import FleetError, _unfinished

    journal = {"fleet_run_id": "fleet_x", "outcome": None, "maintenance_drain_started": True,
               "controller": {"hostname": "elsewhere", "pid": 1},
               "database": {"host": "web1", "status": "restore planned"}, "hosts": {}}
    with pytest.raises(FleetError) as caught:
        _unfinished(journal, print, {})
    assert caught.value.exit_code == ExitCode.ATTENTION
    assert "may or may not be restored" in caught.value.message
    assert caught.value.fix and "without --resume" in caught.value.fix
    # found by review: that fresh run met the dead controller's live fleet lock (the lock
    # host cannot see a controller elsewhere), exit 3, for up to 30 minutes, all hosts down;
    # the fix now names the release of that lock
    assert "runbook fleet lock ENV --release --fleet-run fleet_x" in caught.value.fix
    restored = {**journal, "database": {"host": "web1", "status": "restored"}}
    assert _unfinished(restored, print, {}) == ""  # its restore recorded: resumable (elsewhere)



def lock_refusal_named(holder_id: str, options: Any) -> Any:
    """The lock host's refusal of a run whose fleet lock `holder_id` holds, as the
    controller gets it, after `_name_the_resume` has read that run's journal."""
    from runbook.fleet.rollout import FleetError, _name_the_resume

    error = FleetError(f"fleet lock on web1: held by fleet run {holder_id}; nothing was "
                       "changed", "wait for that fleet run to finish",
                       exit_code=ExitCode.LOCKED)
    error.holder = {"fleet_run_id": holder_id}
    _name_the_resume(error, options, {}, "web1")
    return error

def test_a_lock_held_by_a_dead_maintenance_run_names_the_release_not_a_refused_resume(
        tmp_path: Path) -> None:
    """The refusal of a fleet lock held by a run of this machine whose controller is gone
    names that run's resume (end to end: the controller-killed test below). Found by
    review: for a maintenance run stopped before its restore was recorded, that resume is
    refused (exit 5, the database may or may not be restored): the refusal names what that
    refusal names instead, the checks and the release. A holder id that is not a fleet run
    id is never read as a journal's file name."""
    import socket

    from runbook.fleet.rollout import FleetError, Options

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that is no longer alive
    run_id = "fleet_20261204_101010_abc123"
    record = {"fleet_run_id": run_id, "outcome": None, "dry_run": False,
              "inventory": str(tmp_path / "hosts.yml"), "maintenance_drain_started": True,
              "controller": {"hostname": socket.gethostname(), "pid": gone.pid},
              "database": {"host": "web1", "status": "restore planned"}, "hosts": {}}
    journal = tmp_path / "journal"
    journal.mkdir()
    options = Options(inventory=tmp_path / "hosts.yml", journal_dir=journal)

    def refused(holder_id: str) -> FleetError:
        return lock_refusal_named(holder_id, options)

    (journal / f"{run_id}.json").write_text(json.dumps(record))
    maintenance = refused(run_id)
    assert "never finished" in maintenance.message, maintenance.message
    assert maintenance.fix and f"--resume {run_id}" not in maintenance.fix, maintenance.fix
    assert f"--release --fleet-run {run_id}" in maintenance.fix, maintenance.fix
    assert "without --resume" in maintenance.fix, maintenance.fix
    (journal / f"{run_id}.json").write_text(json.dumps(
        {**record, "maintenance_drain_started": False}))
    plain = refused(run_id)
    assert plain.fix and f"--resume {run_id}" in plain.fix, plain.fix
    assert f"--journal-dir {journal}" in plain.fix and str(tmp_path / "hosts.yml") in plain.fix
    (journal / "evil.json").write_text(json.dumps({**record, "fleet_run_id": "../evil"}))
    odd = refused("../evil")
    assert odd.fix == "wait for that fleet run to finish" and "never" not in odd.message


def test_a_lock_left_by_a_finished_run_names_its_resume_or_its_release(tmp_path: Path) -> None:
    """A run that recorded its outcome but left its fleet lock behind (its release failed:
    the lock host unreachable at its end; or its controller killed before the release): a
    rerun refused by that lock named nothing but "wait for that fleet run to finish" (for
    30 minutes), since only a run that never finished was looked into. Now: its resume, or,
    with every host it selected rolled back (a resume would end before the lock), the
    release; a controller still running (releasing it) is waited for."""
    import socket

    from runbook.fleet.rollout import FleetError, Options

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that is no longer alive
    run_id = "fleet_20261204_111111_def456"
    resume = f"runbook fleet rollback /x/hosts.yml --limit web1,web2 --resume {run_id}"
    record = {"fleet_run_id": run_id, "outcome": "stopped", "exit_code": 5, "dry_run": False,
              "inventory": str(tmp_path / "hosts.yml"), "rollout_started": True,
              "controller": {"hostname": socket.gethostname(), "pid": gone.pid},
              "hosts_selected": ["web1", "web2"], "resume_command": resume,
              "hosts": {"web1": {"status": "unknown: unreachable"},
                        "web2": {"status": "not started"}}}
    journal = tmp_path / "journal"
    journal.mkdir()
    options = Options(inventory=tmp_path / "hosts.yml", journal_dir=journal)

    def refused() -> FleetError:
        return lock_refusal_named(run_id, options)

    (journal / f"{run_id}.json").write_text(json.dumps(record))
    stopped = refused()
    assert "ended (stopped) but left its fleet lock behind" in stopped.message, stopped.message
    assert stopped.fix and f"`{resume} --journal-dir {journal}`" in stopped.fix, stopped.fix
    assert "first check web1" in stopped.fix, stopped.fix
    (journal / f"{run_id}.json").write_text(json.dumps(
        {**record, "outcome": "success", "exit_code": 0, "resume_command": None,
         "hosts": {"web1": {"status": "rolled back"}, "web2": {"status": "rolled back"}}}))
    done = refused()
    assert done.fix and "--resume" not in done.fix, done.fix
    assert f"runbook fleet lock ENV --release --fleet-run {run_id}" in done.fix, done.fix
    with subprocess.Popen(["sleep", "30"]) as live:  # its controller still releasing it
        try:
            (journal / f"{run_id}.json").write_text(json.dumps(
                {**record, "controller": {"hostname": socket.gethostname(), "pid": live.pid}}))
            waiting = refused()
        finally:
            live.kill()
    assert waiting.fix == "wait for that fleet run to finish", waiting.fix


# -- the maintenance drain on one host (a drill stack) -----------------------------------------


def _drain_logs(env: Environment, before: set[Path]) -> list[dict[str, Any]]:
    """The lines of the host's log files written since `before` (the journal's own files,
    read as on-call reads them: one JSON object a line)."""
    return [json.loads(line) for log in sorted(set(env.log_dir.glob("*.log")) - before)
            for line in log.read_text().splitlines() if line.strip()]


def _running(name: str) -> str:
    """The container's state as the docker CLI sees it (not the code under test)."""
    done = subprocess.run(["docker", "inspect", "--format", "{{.State.Status}}", name],
                          capture_output=True, text=True, check=False, timeout=30)
    return done.stdout.strip()


@pytest.mark.docker
def test_the_maintenance_drain_holds_the_deploy_lock_and_journals_what_it_stopped(
        stack: DrillStack) -> None:
    """Found by review: `fleet drain` checked the deploy lock, then stopped every app slot
    without taking it (a deploy started just after the check raced the stops) and wrote no
    record on the host: a maintenance run stopped after the drain left the service down
    with nothing on the host saying who stopped it, or why. Now the drain holds the lock
    while it stops, releases it at its end (the restore and rollback that follow take it),
    and the host's log names each container it stopped, the fleet run and who ran it."""
    env = stack.env
    containers = [env.slot(s).container for s in Slot]
    assert [_running(c) for c in containers] == ["running", "running"]
    before = set(env.log_dir.glob("*.log"))
    done = runbook_cli(env, "fleet", "drain", "--fleet-run", "fleet_drill1",
                       "--holder", "alice@controller")
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(json.loads(done.stdout)["stopped"]) == sorted(containers)
    assert [_running(c) for c in containers] == ["exited", "exited"]
    lines = _drain_logs(env, before)
    text = json.dumps(lines)
    assert "fleet_drill1" in text and "alice@controller" in text, text
    stopped = [e for e in lines if e.get("container") in containers and "stopped" in e["message"]]
    assert sorted(e["container"] for e in stopped) == sorted(containers), text
    assert all(e.get("fleet_run_id") == "fleet_drill1" for e in stopped), stopped
    assert any("deploy lock" in e["message"] for e in lines), text  # taken and said
    assert lines[-1]["level"] == "SUCCESS", lines[-1]
    assert not env.lock_path.exists()  # released: the restore and rollback take it next


@pytest.mark.docker
def test_the_maintenance_drain_refuses_under_a_live_deploy_lock_and_stops_nothing(
        stack: DrillStack) -> None:
    """A deploy holds the lock (a live process: this one): the drain refuses, exit 3, as
    JSON the fleet reads, stops nothing, and the host's log says it was refused."""
    from runbook import lock as locks

    env = stack.env
    containers = [env.slot(s).container for s in Slot]
    before = set(env.log_dir.glob("*.log"))
    held = locks.acquire(env, reason="a deploy")
    try:
        done = runbook_cli(env, "fleet", "drain", "--fleet-run", "fleet_drill2")
    finally:
        locks.release(env, held)
    assert done.returncode == ExitCode.LOCKED, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert answer["ok"] is False and "nothing was stopped" in answer["error"], answer
    assert "a deploy" in answer["error"] or "held by" in answer["error"], answer
    assert [_running(c) for c in containers] == ["running", "running"]
    lines = _drain_logs(env, before)
    assert lines and lines[-1]["level"] == "ERROR" and "fleet_drill2" in json.dumps(lines), lines


@pytest.mark.docker
def test_a_drain_killed_half_way_leaves_a_lock_the_next_run_takes_over_and_says_so(
        stack: DrillStack) -> None:
    """SIGKILL once the first slot is stopped (the drill fault point): the host's log already
    names that container and the fleet run; the lock it leaves names a dead process, so the
    next run (here the rollback's own acquire) takes it over at once."""
    from runbook import lock as locks

    env = stack.env
    before = set(env.log_dir.glob("*.log"))
    done = runbook_cli(env, "fleet", "drain", "--fleet-run", "fleet_drill3",
                       fault="fleet-drain.after-stop:SIGKILL")
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    first = env.slot(Slot.BLUE).container
    assert _running(first) == "exited"
    assert _running(env.slot(Slot.GREEN).container) == "running"  # never reached
    stopped = [e for e in _drain_logs(env, before) if e.get("container") == first]
    assert stopped and stopped[-1].get("fleet_run_id") == "fleet_drill3", stopped
    left = locks.status(env)
    assert left is not None and left.stealable, left  # held by the drain until it was killed
    taken = locks.acquire(env, reason="the maintenance rollback")
    try:
        assert taken.stolen_from is not None
    finally:
        locks.release(env, taken)


def _docker_stop(*names: str) -> None:
    """Stopped as a drain leaves them, by the docker CLI (not the code under test)."""
    subprocess.run(["docker", "stop", "--time", "5", *names], capture_output=True, check=True,
                   timeout=60)


def _with_ids(*names: str) -> str:
    """`--undo` as the controller passes it: each container with the Id its drain stopped
    (here the docker CLI's own)."""
    return ",".join(f"{n}@{docker_says(n)['id']}" for n in names)


@pytest.mark.docker
def test_the_undrain_holds_the_deploy_lock_and_journals_each_container_it_starts(
        stack: DrillStack) -> None:
    """Found by review: `fleet drain --undo` (the fleet's start-again of a maintenance run
    stopped before the restore) started the containers with no deploy lock (a deploy
    running then raced the starts) and wrote nothing on the host: its slots came back with
    no record of who started them, or why. Now it holds the lock as the drain does,
    releases it at its end, and the host's log names each container it started, each it
    found running and left so, the fleet run and who ran it."""
    env = stack.env
    blue, green = (env.slot(s).container for s in (Slot.BLUE, Slot.GREEN))
    _docker_stop(blue)
    assert [_running(blue), _running(green)] == ["exited", "running"]
    before = set(env.log_dir.glob("*.log"))
    done = runbook_cli(env, "fleet", "drain", "--undo", _with_ids(blue, green),
                       "--fleet-run", "fleet_undo1", "--holder", "alice@controller")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [_running(blue), _running(green)] == ["running", "running"]
    lines = _drain_logs(env, before)
    text = json.dumps(lines)
    assert "fleet_undo1" in text and "alice@controller" in text, text
    (started,) = [e for e in lines if e.get("container") == blue]
    assert started["message"].startswith(f"started {blue} again"), started
    (left,) = [e for e in lines if e.get("container") == green]
    assert "already running" in left["message"], left
    assert all(e.get("fleet_run_id") == "fleet_undo1" for e in (started, left)), text
    assert any(e["message"] == "took the deploy lock" for e in lines), text
    assert lines[-1]["level"] == "SUCCESS", lines[-1]
    assert not env.lock_path.exists()  # released: the next run on this host takes it
    answer = json.loads(done.stdout)
    assert answer["started"] == [blue] and answer["already_running"] == [green], answer


@pytest.mark.docker
def test_the_undrain_refuses_under_a_live_deploy_lock_and_starts_nothing(
        stack: DrillStack) -> None:
    """A deploy holds the lock (a live process: this one): the undrain refuses, exit 3, as
    JSON the fleet reads, starts nothing, and the host's log says it was refused."""
    from runbook import lock as locks

    env = stack.env
    containers = [env.slot(s).container for s in Slot]
    _docker_stop(*containers)
    before = set(env.log_dir.glob("*.log"))
    held = locks.acquire(env, reason="a deploy")
    try:
        done = runbook_cli(env, "fleet", "drain", "--undo", _with_ids(*containers),
                           "--fleet-run", "fleet_undo2")
        still = locks.status(env)
    finally:
        locks.release(env, held)
    assert done.returncode == ExitCode.LOCKED, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert answer["ok"] is False and "nothing was started" in answer["error"], answer
    assert "waited 20s for it" in answer["error"], answer  # a short holder is waited out
    assert [_running(c) for c in containers] == ["exited", "exited"]
    assert still is not None and still.holder is not None, still
    assert still.holder.reason == "a deploy", still  # never taken from it
    lines = _drain_logs(env, before)
    assert lines and lines[-1]["level"] == "ERROR" and "fleet_undo2" in json.dumps(lines), lines
    assert not [e for e in lines if "container" in e], lines


@pytest.mark.docker
def test_the_undrain_waits_out_a_short_deploy_lock_holder_then_starts(
        stack: DrillStack) -> None:
    """A holder of a few seconds (a cron's `snapshot cleanup`) refused the undrain at once,
    and the fleet left the host DOWN for it (found by review): it is waited out (up to 20 s),
    said in the host's log, and the slots are started once it lets go."""
    from runbook import lock as locks

    env = stack.env
    containers = [env.slot(s).container for s in Slot]
    _docker_stop(*containers)
    before = set(env.log_dir.glob("*.log"))
    held = locks.acquire(env, reason="a snapshot cleanup")
    letting_go = threading.Timer(3.0, locks.release, (env, held))
    letting_go.start()
    try:
        done = runbook_cli(env, "fleet", "drain", "--undo", _with_ids(*containers),
                           "--fleet-run", "fleet_undo4")
    finally:
        letting_go.join()
    assert done.returncode == 0, done.stdout + done.stderr
    assert [_running(c) for c in containers] == ["running", "running"]
    lines = _drain_logs(env, before)
    assert any(e["level"] == "WARN" and "waiting up to 20s" in e["message"] for e in lines), lines
    assert lines[-1]["level"] == "SUCCESS", lines[-1]
    assert not env.lock_path.exists()


@pytest.mark.docker
def test_the_undrain_takes_over_a_stale_deploy_lock_and_says_so(stack: DrillStack) -> None:
    """A drain killed once it stopped blue leaves blue down and a lock naming a dead
    process; on-call's `fleet drain --undo` (as the fleet's message says) takes that lock
    over, says so on its output and in the host's log, starts blue, and releases it."""
    from runbook import lock as locks

    env = stack.env
    blue = env.slot(Slot.BLUE).container
    killed = runbook_cli(env, "fleet", "drain", "--fleet-run", "fleet_undo3",
                         fault="fleet-drain.after-stop:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    left = locks.status(env)
    assert left is not None and left.stealable, left
    assert _running(blue) == "exited"
    before = set(env.log_dir.glob("*.log"))
    done = runbook_cli(env, "fleet", "drain", "--undo", blue, "--fleet-run", "fleet_undo3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "took over a stale deploy lock" in done.stderr, done.stderr
    assert _running(blue) == "running"
    lines = _drain_logs(env, before)
    taken = [e for e in lines if e["message"].startswith("took over a stale deploy lock")]
    assert taken and taken[0]["level"] == "WARN", lines
    assert [e["container"] for e in lines if "container" in e] == [blue], lines
    assert not env.lock_path.exists()


@pytest.mark.docker
def test_an_undrain_naming_a_container_not_this_hosts_app_slot_starts_nothing(
        stack: DrillStack) -> None:
    """Bad input is refused whole, exit 2, before the lock: it started the app slots named
    before the wrong one, then refused."""
    env = stack.env
    blue = env.slot(Slot.BLUE).container
    _docker_stop(blue)
    before = set(env.log_dir.glob("*.log"))
    done = runbook_cli(env, "fleet", "drain", "--undo", f"{blue},caddy")
    assert done.returncode == ExitCode.USAGE, done.stdout + done.stderr
    assert _running(blue) == "exited"
    assert set(env.log_dir.glob("*.log")) == before and not env.lock_path.exists()
    answer = json.loads(done.stdout)
    assert "caddy is not an app slot" in answer["error"], answer
    assert "nothing was started" in answer["error"], answer


@pytest.mark.docker
def test_an_undrain_given_a_short_id_is_refused_as_bad_input_and_starts_nothing(
        stack: DrillStack) -> None:
    """Found by review: `--undo green@<12 hex>` for the very container the drain stopped was
    refused, exit 4, as "id X gone; green now holds id X", and its fix repeated the same
    command. A short id is bad input: exit 2 before the lock, nothing started, the fix
    asking for the full id the drain answered."""
    env = stack.env
    blue = env.slot(Slot.BLUE).container
    ident = docker_says(blue)["id"]
    _docker_stop(blue)
    before = set(env.log_dir.glob("*.log"))
    done = runbook_cli(env, "fleet", "drain", "--undo", f"{blue}@{ident[:12]}")
    assert done.returncode == ExitCode.USAGE, done.stdout + done.stderr
    assert _running(blue) == "exited"
    assert set(env.log_dir.glob("*.log")) == before and not env.lock_path.exists()
    answer = json.loads(done.stdout)
    assert f"{ident[:12]} after '@' is not a full container id" in answer["error"], answer
    assert "nothing was started" in answer["error"], answer


def _swapped_drain_answer(env: Environment) -> dict[str, str]:
    """`fleet drain` on the host, as the fleet runs it: what it answered stopped, checked
    against the docker CLI's own ids (the Ids the undrain must start)."""
    names = [env.slot(s).container for s in Slot]
    ids = {n: docker_says(n)["id"] for n in names}
    done = runbook_cli(env, "fleet", "drain", "--fleet-run", "fleet_swap")
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert sorted(answer["stopped"]) == sorted(names), answer
    assert answer["stopped_ids"] == ids, answer  # what was stopped, by Docker's own word
    assert [docker_says(n)["status"] for n in names] == ["exited", "exited"]
    return ids


@pytest.mark.docker
def test_an_undrain_never_starts_another_container_given_a_drained_slots_name(
        stack: DrillStack) -> None:
    """Found by review: the undrain got only names and `docker start`ed whatever held them,
    so a container `docker create`d under green's name after the drain, with another image,
    was started against the shared database. Green is renamed away and another container
    made under its name between drain and undrain; the undrain is called with bare names (an
    older controller's call, or on-call's by hand): it takes the Id the drain logged on this
    host, starts blue (still the drained container), refuses green with both ids and images
    and the fix, never starts the other container, and exits 5 (the host is not as before
    the drain). Oracles: the docker CLI."""
    env = stack.env
    blue, green = (env.slot(s).container for s in (Slot.BLUE, Slot.GREEN))
    ids = _swapped_drain_answer(env)
    drained = docker_says(green)
    other = VERSIONS["v2"].image
    assert other != drained["image"]
    with put_back(stack, Slot.GREEN) as aside:
        stack.docker("rename", green, aside)
        create_under(stack, Slot.GREEN, other)
        impostor = docker_says(green)
        before = set(env.log_dir.glob("*.log"))
        done = runbook_cli(env, "fleet", "drain", "--undo", f"{blue},{green}",
                           "--fleet-run", "fleet_swap")
        now, kept = docker_says(green), docker_says(aside)
        blue_now = docker_says(blue)
    assert done.returncode == ExitCode.ATTENTION, done.stdout + done.stderr
    assert now["id"] == impostor["id"] and now["status"] == "created", now
    assert now["started"] == NEVER, now  # never started
    assert kept["status"] == "exited" and kept["started"] == drained["started"], kept
    assert blue_now["status"] == "running" and blue_now["id"] == ids[blue], blue_now
    answer = json.loads(done.stdout)
    error = answer["error"]
    assert (f"{green} was not started: it is not the container the drain stopped (id "
            f"{ids[green][:12]} image {drained['image']}, now named {aside}; {green} now "
            f"holds id {impostor['id'][:12]} image {other})") in error, error
    assert f"started again: {blue}" in error, error
    assert "docker events" in answer["fix"], answer
    assert f"--undo {green}@{ids[green]}" in answer["fix"], answer
    # what it started and what it refused, as fields: the fleet read "started again" only
    # from the error's words (found by review)
    assert answer["started"] == [blue] and answer["already_running"] == [], answer
    (refusal,) = answer["refused"]
    assert (refusal["container"], refusal["container_id"], refusal["now_id"]) == (
        green, ids[green], impostor["id"]), refusal
    assert f"--undo {green}@{ids[green]}" in refusal["fix"], refusal
    lines = _drain_logs(env, before)
    refused = [e for e in lines if e.get("container") == green]
    assert refused and refused[0]["level"] == "ERROR", lines
    assert not env.lock_path.exists()


@pytest.mark.docker
def test_an_undrain_whose_names_hold_no_drained_container_starts_nothing_then_starts_them(
        stack: DrillStack) -> None:
    """The controller's call (NAME@ID, as the drain answered): both drained containers
    renamed away, so the names hold none: nothing started, exit 4, each named with its Id.
    Given their names back, the same undrain starts exactly those Ids. Oracles: the docker
    CLI."""
    env = stack.env
    names = [env.slot(s).container for s in Slot]
    ids = _swapped_drain_answer(env)
    undo = ",".join(f"{n}@{ids[n]}" for n in names)
    with put_back(stack, Slot.BLUE) as blue_aside, put_back(stack, Slot.GREEN) as green_aside:
        for name, aside in zip(names, (blue_aside, green_aside), strict=True):
            stack.docker("rename", name, aside)
        done = runbook_cli(env, "fleet", "drain", "--undo", undo)
        left = [docker_says(a)["status"] for a in (blue_aside, green_aside)]
        for name, aside in zip(names, (blue_aside, green_aside), strict=True):
            stack.docker("rename", aside, name)
    assert done.returncode == ExitCode.PRECONDITION, done.stdout + done.stderr
    assert left == ["exited", "exited"], left
    answer = json.loads(done.stdout)
    error = answer["error"]
    for name in names:
        assert f"{name} now holds none" in error and ids[name][:12] in error, error
    assert error.endswith("nothing was started"), error
    assert answer["started"] == [] and answer["already_running"] == [], answer
    assert [(r["container"], r["container_id"], r["now_id"]) for r in answer["refused"]] == [
        (n, ids[n], None) for n in names], answer
    again = runbook_cli(env, "fleet", "drain", "--undo", undo)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {n: (docker_says(n)["id"], docker_says(n)["status"]) for n in names} == {
        n: (ids[n], "running") for n in names}


@pytest.mark.docker
def test_an_undrain_whose_second_start_fails_answers_what_it_started(stack: DrillStack) -> None:
    """Found by review: the undrain started blue, then green's `docker start` failed (its
    published port taken meanwhile by another process): the error came out as it was, exit
    1, its answer listing nothing started, and the fleet named the host "could not be started
    again: THE SERVICE IS DOWN" with `started: []` in its journal, blue running. Now green's
    failed start is answered as a refusal is: exit 5, `started` lists blue, green is refused
    with Docker's own error and the undo to run again; once the port is free that undo starts
    green (blue already running). Oracles: the docker CLI, a socket the test binds itself."""
    env = stack.env
    blue, green = (env.slot(s).container for s in (Slot.BLUE, Slot.GREEN))
    ids = _swapped_drain_answer(env)
    undo = f"{blue}@{ids[blue]},{green}@{ids[green]}"
    bindings = json.loads(subprocess.run(
        ["docker", "inspect", "--format", "{{json .HostConfig.PortBindings}}", green],
        capture_output=True, text=True, check=True).stdout)
    (bound,) = [b for bs in bindings.values() for b in bs]
    taken = socket.socket()
    # SO_REUSEADDR: a client socket of another test may use the port as its own local one (CI:
    # EADDRINUSE); a listener still refuses docker-proxy's bind. Retried: the stopped green's
    # docker-proxy may let the port go a moment after `docker stop` returned
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        for _ in range(100):
            try:
                taken.bind((bound["HostIp"] or "0.0.0.0", int(bound["HostPort"])))
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                time.sleep(0.1)
        else:
            pytest.fail(f"green's port {bound} is still listened on by another process")
        taken.listen()
        done = runbook_cli(env, "fleet", "drain", "--undo", undo)
        states = [_running(blue), _running(green)]
    finally:
        taken.close()
    assert states == ["running", "exited"], (states, done.stdout + done.stderr)
    assert done.returncode == ExitCode.ATTENTION, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert answer["started"] == [blue] and answer["already_running"] == [], answer
    (refusal,) = answer["refused"]
    assert (refusal["container"], refusal["container_id"]) == (green, ids[green]), refusal
    assert refusal["error"].startswith(f"{green}: starting it again failed: "), refusal
    assert f"--undo {green}@{ids[green]}" in refusal["fix"], refusal
    assert answer["error"].endswith(f"started again: {blue}"), answer
    again = runbook_cli(env, "fleet", "drain", "--undo", undo)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout)["started"] == [green], again.stdout
    assert {n: (docker_says(n)["id"], docker_says(n)["status"]) for n in ids} == {
        n: (i, "running") for n, i in ids.items()}


@pytest.mark.docker
def test_the_drain_stops_the_container_it_inspected_and_refuses_when_another_runs_under_its_name(
        stack: DrillStack) -> None:
    """The drain inspects blue, then stops it: stopped by name, a container renamed in under
    blue's name in between was stopped and the inspected one, still connected to the shared
    database, kept running through the restore. Stopped by its Id, the drain then answered
    "drained" with the other one running under blue's name: on a host that is not the lock
    host nothing stopped it, and it wrote into the restored database (found by review: an app
    that connects per request holds no session for the restore's check to see, and one
    --end-sessions ends connects again after it). The drain held (SIGSTOP) right before its
    stop while blue is renamed away and another container runs under its name: the drain
    stops the one it inspected (its Id), not the other, and then refuses, exit 5, naming the
    container up under blue's name and the fix, with what it stopped in its answer (the
    fleet starts those again). Oracles: the docker CLI, the host's log files."""
    env = stack.env
    blue, green = (env.slot(s).container for s in Slot)
    inspected = docker_says(blue)
    before = set(env.log_dir.glob("*.log"))
    with put_back(stack, Slot.BLUE) as aside:
        def renamed_in() -> None:
            stack.docker("rename", blue, aside)
            stack.docker("run", "-d", "--name", blue, "--label",
                         f"{RUN_LABEL}={stack.run_id}", "--entrypoint", "sleep",
                         inspected["image"], "300")

        # held again before green's stop: let go there too
        done = held(env, "fleet-drain.before-stop", renamed_in, command=("fleet", "drain"),
                    stops=2)
        other, kept = docker_says(blue), docker_says(aside)
        green_now = _running(green)
    assert done.returncode == ExitCode.ATTENTION, done.stdout + done.stderr
    assert kept["id"] == inspected["id"] and kept["status"] == "exited", kept
    assert other["status"] == "running", other  # never the drain's: not stopped
    assert green_now == "exited"
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["ok"] is False and answer["exit_code"] == ExitCode.ATTENTION, answer
    assert answer["stopped_ids"][blue] == inspected["id"], answer
    assert sorted(answer["stopped"]) == sorted([blue, green]), answer
    assert answer["left_up"] == [blue], answer
    error = answer["error"]
    assert error.startswith(f"not drained: {blue} is running once its stops are done (id "
                            f"{other['id'][:12]} image {inspected['image']})"), error
    assert "the restore must not begin" in error and "THE SERVICE IS DOWN" in error, error
    assert f"docker stop {other['id'][:12]}" in answer["fix"], answer
    assert f"--undo {blue}@{inspected['id']}," in answer["fix"], answer
    assert "\n" not in error and "\n" not in answer["fix"], answer
    lines = _drain_logs(env, before)
    assert any(e["level"] == "ERROR" and e.get("container") == blue
               and e.get("container_id") == other["id"] for e in lines), lines
    assert lines[-1]["level"] != "SUCCESS", lines[-1]
    assert not env.lock_path.exists()  # released on the refusal too


@pytest.mark.docker
def test_the_drain_stops_a_paused_app_slot_as_the_restore_does(stack: DrillStack) -> None:
    """The drain stopped only running slots: a paused (or restarting) one was left as it was,
    to run again against the restored database once unpaused (or restarted by its policy).
    It is stopped as the restore's own stop stops it (`docker stop` ends a paused
    container), and answered. Oracle: the docker CLI."""
    env = stack.env
    blue, green = (env.slot(s).container for s in Slot)
    stack.docker("pause", green)
    try:
        done = runbook_cli(env, "fleet", "drain")
        states = [_running(blue), _running(green)]
    finally:
        stack.docker("unpause", green, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert states == ["exited", "exited"], states
    assert sorted(json.loads(done.stdout)["stopped"]) == sorted([blue, green]), done.stdout


# -- end to end against the drill fleet --------------------------------------------------------


def _fleet_rollback(fleet: DrillFleet, journal: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([fleet.runbook_command, "fleet", "rollback", str(fleet.inventory),
                             "--yes", "--journal-dir", str(journal), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def _fleet_rollback_run(fleet: DrillFleet, journal: Path,
                        *args: str) -> subprocess.CompletedProcess[str]:
    """`runbook fleet rollback` on the drill fleet's inventory, run to its end."""
    return subprocess.run([fleet.runbook_command, "fleet", "rollback", str(fleet.inventory),
                           "--yes", "--journal-dir", str(journal), *args], capture_output=True,
                          text=True, timeout=600, check=False, stdin=subprocess.DEVNULL)


def _read_until(proc: subprocess.Popen[str], marker: str) -> list[str]:
    """The controller's stderr lines up to the first that contains `marker` (all of them if
    none does): the moment a test acts on the running controller."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            break
    return seen


def _until_held(proc: subprocess.Popen[str], gate: Path) -> None:
    """Until the `held_command` at `gate` is held on its host (it touches `held_reached`),
    deadline 120 s: the moment a test signals the controller mid-host. Never a fixed sleep:
    on a loaded CI machine Ansible can take seconds to get there."""
    reached, deadline = held_reached(gate), time.monotonic() + 120
    while not reached.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the controller ended (exit {proc.returncode}) before the command "
                        f"held at {gate.name} was reached: {err}{out}")
        assert time.monotonic() < deadline, f"the command held at {gate.name} not reached in 120 s"
        time.sleep(0.02)


def test_a_held_command_decides_on_the_gates_word_never_on_the_empty_file_before_it(
        tmp_path: Path) -> None:
    """The drill's held command (the harness of the tests below): the test opens its gate
    with write_text, which creates the file empty and only then writes "run"; a poll in
    between read "" and exited 1 without running the command the test had released (a lock
    release, a drain), failing the test on its own race. Here the gate stays empty for a
    while (the writer preempted on a loaded machine): the command still runs once "run" is
    written. Oracle: the command's own output (`runbook fleet lock --help`)."""
    import shutil

    fleet = DrillFleet()  # its directory only: no host is started
    try:
        gate = tmp_path / "gate"
        script = fleet.held_command("host1", gate, "fleet", "lock")
        proc = subprocess.Popen([script, "fleet", "lock", "--help"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not held_reached(gate).exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        with gate.open("w") as opened:  # created, still empty: as write_text leaves it
            opened.flush()
            time.sleep(0.5)  # the window, widened: the command polls it (every 0.05 s)
            opened.write("run")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Usage: runbook fleet lock" in out, out
    finally:
        shutil.rmtree(fleet.dir, ignore_errors=True)


def _said(proc: subprocess.Popen[str], seen: list[str], marker: str) -> None:
    """Read the controller's stderr on into `seen` until a line contains `marker` (its
    signal handler ran: it says so), failing if it ended first."""
    seen += _read_until(proc, marker)
    assert marker in seen[-1], "".join(seen)


@pytest.fixture
def fleet_on_v3(drill_fleet: DrillFleet) -> DrillFleet:
    drill_fleet.write_inventory()
    drill_fleet.on_new_deployment("v3")
    return drill_fleet


def _refused(fleet: DrillFleet, journal: Path, *args: str) -> tuple[int, str, str]:
    """A fleet rollback expected to refuse: (exit code, stdout, stderr)."""
    proc = _fleet_rollback(fleet, journal, *args)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


@pytest.mark.docker
def test_a_live_lock_refuses_with_exit_3_in_the_dry_run_as_in_the_real_run(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """Exit 3 (locked: wait) from the dry run, the fleet's pre-flight people gate on, exactly
    when the real run ends 3 (found by review: the dry run said 4, fix something): a host's
    deploy lock held by a live run, then also the fleet lock on the lock host, read by a dry
    run whose --limit leaves the lock host out too. A refused dry run writes no fleet journal
    and its JSON names none; the real run's refusal writes one."""
    import socket

    from runbook import lock as locks

    journal = tmp_path / "fleet"  # a dry run must not even make it
    before = [fleet_on_v3.serving(h.name) for h in fleet_on_v3.hosts]
    lock_env = fleet_on_v3.hosts[0].env
    deploy = locks.acquire(fleet_on_v3.hosts[1].env, "a deploy by hand")  # held while we live
    try:
        code, out, err = _refused(fleet_on_v3, journal, "--dry-run", "--format", "json")
        answer = json.loads(out)
        assert not journal.exists(), f"a refused dry run wrote a fleet journal: {answer}"
        assert answer.get("journal_file") == "", answer
        assert not any("Fleet journal" in line for line in answer["hosts"]), answer
        assert code == 3 and answer["exit_code"] == 3, err + out
        assert any(line.startswith("host2: deploy lock: the deploy lock is held by")
                   for line in answer["hosts"]), answer
        code, _out, err = _refused(fleet_on_v3, journal)
        assert code == 3 and "host2: deploy lock: the deploy lock is held by" in err, err
        assert len(list(journal.glob("fleet_*.json"))) == 1  # the real run's record

        hostlock.take(lock_env, fleet_run_id="fleet_other", locked_by="alice@ops",
                      hostname=socket.gethostname(), pid=os.getpid(), reason="another rollout")
        try:
            for dry in (("--dry-run",), ("--dry-run", "--limit", "host2,host3")):
                code, _out, err = _refused(fleet_on_v3, journal, *dry)
                assert code == 3 and "host1: fleet lock: held by alice@ops" in err, (dry, err)
                assert "Fleet journal" not in err, err
                # named as host1's runbook names its environment (the file its sshd's
                # RUNBOOK_CONFIG names), from its `fleet lock --status` answer when --limit
                # leaves it out (it runs no host-check): the inventory says `development`
                assert f"`runbook fleet lock {shlex.quote(str(lock_env.source))} --status`" \
                    in err, (dry, err)
            code, _out, err = _refused(fleet_on_v3, journal)
            assert code == 3, err
            assert "alice@ops" in err and "nothing was changed" in err
            assert len(list(journal.glob("fleet_*.json"))) == 2  # dry runs wrote none
            assert [fleet_on_v3.serving(h.name) for h in fleet_on_v3.hosts] == before
            held = hostlock.status(lock_env)
            assert held is not None and held.holder["fleet_run_id"] == "fleet_other"
        finally:
            hostlock.release(lock_env, "fleet_other")
    finally:
        locks.release(fleet_on_v3.hosts[1].env, deploy)


def _own_dry_run(fleet: DrillFleet, name: str, *args: str) -> str:
    """Host `name`'s own single-host `runbook rollback --dry-run`, typed there (over its sshd,
    whose RUNBOOK_CONFIG is that host's environment, as a real host's config is its own): the
    oracle of the plan a fleet run shows for it."""
    proc = subprocess.run(["ssh", "-F", str(fleet.ssh_config), name, shlex.join(
        [fleet.runbook_command, "rollback", "development", "--dry-run", *args])],
        capture_output=True, text=True, timeout=180, check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


def _block(lines: list[str], head: str) -> list[str]:
    """The lines indented under the first line starting with `head`, unindented."""
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    block = []
    for line in lines[start + 1:]:
        if not line.startswith("    "):
            break
        block.append(line[4:])
    return block


def _under(text: str, host: str) -> list[str]:
    """The lines indented under `host`'s "ready" line of a fleet plan, unindented."""
    return _block([line.rstrip("\r") for line in text.splitlines()], f"{host}: ready: ")


@pytest.mark.docker
def test_the_fleet_dry_run_shows_each_hosts_plan_as_its_own_dry_run_prints_it(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """Plan, then act, across the fleet: the dry run shows under each host every step of that
    host's own rollback with its resolved values, exactly as that host's own `runbook
    rollback --dry-run` prints them, and its --format json has each host's steps as that dry
    run's JSON has them (found by review: one summary line a host, though each host had
    planned every step). Oracle: each host's own single-host dry run, typed on it over SSH;
    each host's own containers (a value no other host has) are checked to be in its part."""
    fleet = fleet_on_v3
    before = [fleet.serving(h.name) for h in fleet.hosts]
    argv = [fleet.runbook_command, "fleet", "rollback", str(fleet.inventory), "--dry-run",
            "--journal-dir", str(tmp_path)]
    text = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False,
                          stdin=subprocess.DEVNULL)
    assert text.returncode == 0, text.stderr + text.stdout
    answer = subprocess.run([*argv, "--format", "json"], capture_output=True, text=True,
                            timeout=600, check=False, stdin=subprocess.DEVNULL)
    assert answer.returncode == 0, answer.stderr + answer.stdout
    plans = json.loads(answer.stdout).get("plans") or {}
    for h in fleet.hosts:
        own = _own_dry_run(fleet, h.name).splitlines()
        assert own[-1] == "Dry run: nothing was changed.", own
        own_steps = json.loads(_own_dry_run(fleet, h.name, "--format", "json"))["plan"]["steps"]
        mine = {h.env.slot(s).container for s in Slot}
        others = {o.env.slot(s).container for o in fleet.hosts if o is not h for s in Slot}
        assert any(c in line for line in own for c in mine), own  # the oracle names them
        shown = _under(text.stdout, h.name)
        assert shown == own[:-1], (h.name, text.stdout)
        assert not any(c in line for line in shown for c in others), (h.name, shown)
        assert (plans.get(h.name) or {}).get("steps") == own_steps, (h.name, plans)
    assert [fleet.serving(h.name) for h in fleet.hosts] == before
    assert not list(tmp_path.glob("fleet_*.json"))  # a dry run writes no fleet journal


@pytest.mark.docker
def test_ctrl_c_lets_the_running_host_finish_starts_no_other_and_releases_the_lock(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    proc = _fleet_rollback(fleet_on_v3, tmp_path)
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # the progress lines, as on a terminal
        seen.append(line)
        if "host1: rolling back" in line:
            proc.send_signal(signal.SIGINT)  # Ctrl-C while the canary rolls back
            break
        assert time.monotonic() < deadline, seen
    out, err = proc.communicate(timeout=600)
    text = "".join(seen) + err
    assert proc.returncode == 1, text + out
    assert "interrupted" in text
    v2, v3 = VERSIONS["v2"].tag, VERSIONS["v3"].tag
    assert fleet_on_v3.serving("host1") == (200, "blue", v2)  # the in-flight host finished
    assert fleet_on_v3.serving("host2")[2] == v3 and fleet_on_v3.serving("host3")[2] == v3
    assert "--limit host2,host3 --resume fleet_" in out
    assert hostlock.status(fleet_on_v3.hosts[0].env) is None  # released on Ctrl-C too
    record = json.loads(next(tmp_path.glob("fleet_*.json")).read_text())
    assert record["hosts"]["host1"]["status"] == "rolled back"
    assert record["hosts"]["host2"]["status"] == "not started"


@pytest.mark.docker
@nightly
def test_a_second_ctrl_c_leaves_the_started_host_unknown_not_not_started(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """The canary (host1) is held before its rollback; two Ctrl-C while it runs stop
    Ansible before it answered: it started, so it is 'unknown: started, no result' (exit 5,
    check it), never 'not started'; its resume needs --limit naming it. Oracles: what each
    host's Caddy serves, the exit code."""
    fleet = fleet_on_v3
    v3 = VERSIONS["v3"].tag
    gate = tmp_path / "host1.gate"
    fleet.write_inventory(host_vars={"host1": {"runbook_command": fleet.held_command(
        "host1", gate, "rollback")}})
    try:
        proc = _fleet_rollback(fleet, tmp_path)
        seen = _read_until(proc, "host1: rolling back")
        _until_held(proc, gate)  # host1's rollback started there, and held
        proc.send_signal(signal.SIGINT)
        _said(proc, seen, "interrupted: no further host will start")
        proc.send_signal(signal.SIGINT)  # the second: Ansible stopped at once
        out, err = proc.communicate(timeout=600)
    finally:
        gate.write_text("never")  # host1's held rollback, cut off from its controller
        fleet.write_inventory()
    text = "".join(seen) + err + out
    assert proc.returncode == 5, text
    assert "host1: unknown: started, no result" in out, text
    assert "host2: not started" in out and "check host1 first" in out, text
    record = json.loads(next(tmp_path.glob("fleet_*.json")).read_text())
    assert record["hosts"]["host1"]["status"] == "unknown: started, no result"
    assert [fleet.serving(h.name)[2] for h in fleet.hosts] == [v3, v3, v3]
    resume = subprocess.run([fleet.runbook_command, "fleet", "rollback", str(fleet.inventory),
                             "--resume", record["fleet_run_id"], "--yes", "--journal-dir",
                             str(tmp_path)], capture_output=True, text=True, check=False,
                            timeout=600)
    assert resume.returncode == 2 and "host1 had an unknown outcome" in resume.stderr, resume
    assert hostlock.status(fleet.hosts[0].env) is None


@pytest.mark.docker
def test_ctrl_c_at_the_prompt_is_the_documented_interruption_journaled(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """On a terminal the fleet asks before any host changes; Ctrl-C there is the README's
    "interrupted before any host changed; nothing was changed" (exit 1, journaled, the fleet
    lock released), not click's bare "Aborted!". A real pty (pexpect). Oracles: what each
    host's Caddy serves, the fleet lock's directory; for the prompt's plans, each host's own
    `runbook rollback --dry-run`."""
    import pexpect

    v3 = VERSIONS["v3"].tag
    own = {h.name: _own_dry_run(fleet_on_v3, h.name).splitlines()[:-1] for h in fleet_on_v3.hosts}
    # an on-call's shell delivers Ctrl-C: SIGINT as the terminal gives it, even where this
    # test runs in the background of a non-interactive shell (which ignores it, inherited)
    child = pexpect.spawn(fleet_on_v3.runbook_command, ["fleet", "rollback",
                          str(fleet_on_v3.inventory), "--journal-dir", str(tmp_path)],
                          encoding="utf-8", timeout=120,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect(r"Proceed\? \[y/N\]")
    # the prompt shows what the dry run shows (found by review: only batches and the lock
    # host): each host's own rollback, from what to what, and the database's judgement; and
    # (found by review: a summary line a host) every step of it, as its own dry run prints it
    shown = child.before or ""
    for host in fleet_on_v3.hosts:
        assert f"{host.name}: ready: " in shown and f"to {VERSIONS['v2'].tag}" in shown, shown
        assert _under(shown, host.name) == own[host.name], (host.name, shown)
    assert "database (once, on " in shown and "schema guard" in shown, shown
    assert "Dry run" not in shown, shown
    child.sendintr()
    if child.expect([pexpect.EOF, pexpect.TIMEOUT]) == 1:  # hung: show where (faulthandler)
        child.kill(signal.SIGABRT)
        child.expect(pexpect.EOF, timeout=10)
        pytest.fail(f"no exit 120 s after Ctrl-C at the prompt; its threads:\n{child.before}")
    child.close()
    text = (child.before or "")
    assert child.exitstatus == 1, text
    assert "interrupted before any host changed; nothing was changed" in text, text
    assert "Aborted!" not in text, text
    record = json.loads(next(tmp_path.glob("fleet_*.json")).read_text())
    assert record["outcome"] == "interrupted" and record["exit_code"] == 1, record
    assert [fleet_on_v3.serving(h.name)[2] for h in fleet_on_v3.hosts] == [v3, v3, v3]
    assert hostlock.status(fleet_on_v3.hosts[0].env) is None


@pytest.mark.docker
@nightly
def test_a_prompt_answered_after_the_gate_expired_says_so_and_changed_nothing(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """The playbook waits at its gate for a bounded time (RUNBOOK_FLEET_GATE_WAIT_S, 15 min by
    default; 2 s here). A y typed after that is told, in one line, that the run expired at the
    prompt and nothing changed (exit 1), not 'stopped at the first failed host ... Resume
    with'. Oracles: what each host's Caddy serves, the fleet lock's directory."""
    import pexpect

    v3 = VERSIONS["v3"].tag
    child = pexpect.spawn(fleet_on_v3.runbook_command, ["fleet", "rollback",
                          str(fleet_on_v3.inventory), "--journal-dir", str(tmp_path)],
                          encoding="utf-8", timeout=300,
                          env={**os.environ, "RUNBOOK_FLEET_GATE_WAIT_S": "2"})
    child.expect(r"Proceed\? \[y/N\]")
    time.sleep(5)
    child.sendline("y")
    child.expect(pexpect.EOF)
    child.close()
    text = child.before or ""
    assert child.exitstatus == 1, text
    errors = [line for line in text.splitlines() if line.startswith("runbook: error:")]
    assert len(errors) == 1 and "expired at the prompt" in errors[0], text
    assert "nothing was changed" in errors[0] and "Resume with" not in text, text
    assert [fleet_on_v3.serving(h.name)[2] for h in fleet_on_v3.hosts] == [v3, v3, v3]
    assert hostlock.status(fleet_on_v3.hosts[0].env) is None
    record = json.loads(next(tmp_path.glob("fleet_*.json")).read_text())
    assert record["exit_code"] == 1 and not record["rollout_started"], record


@pytest.mark.docker
@nightly
def test_a_fleet_lock_not_released_is_in_the_json_output_and_the_journal(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """The lock host (host1) goes dark when the fleet lock's release is asked for, after every
    host rolled back: with --format json the failure is in the output (with the command that
    releases it by hand) and in the fleet journal, not only in a text-mode line."""
    fleet = fleet_on_v3
    v2 = VERSIONS["v2"].tag
    fleet.write_inventory(host_vars={"host1": {"runbook_command": fleet.cut_off_command(
        "host1", "fleet", "lock")}})
    try:
        proc = _fleet_rollback(fleet, tmp_path, "--format", "json")
        out, err = proc.communicate(timeout=600)
        assert out.strip(), err
        data = json.loads(out.splitlines()[-1])
        for name in ("host1", "host2", "host3"):
            assert fleet.serving(name) == (200, "blue", v2), (name, data)
        failed = data["fleet_lock_release_failed"]
        assert failed and "could not release the fleet lock on host1" in failed, data
        assert "--release --fleet-run " + data["fleet_run_id"] in failed, failed
        assert failed in data["lines"], data["lines"]
        record = json.loads(Path(data["journal_file"]).read_text())
        assert record["fleet_lock_release_failed"] == failed, record
        held = hostlock.status(fleet.host("host1").env)
        assert held is not None and held.holder["fleet_run_id"] == data["fleet_run_id"]
    finally:
        fleet.reachable_again("host1")
        fleet.write_inventory()
        for path in tmp_path.glob("fleet_*.json"):
            with contextlib.suppress(RunbookError):
                hostlock.release(fleet.host("host1").env, path.stem)


@pytest.mark.docker
def test_the_resume_of_a_run_that_lost_its_lock_host_takes_the_lock_it_left_over(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """host1, the canary and the fleet lock's host, goes dark when its rollback is asked
    for: the rollout stops (exit 5, host1 unknown), and the lock's release at the end fails
    (the lock stays, journaled). The operator brings host1 back and follows the resume
    command. Found by review: the lock host refused it (exit 3, "wait for that fleet run to
    finish", for 30 minutes: it cannot see the controller's process), since only a run that
    never recorded its outcome was taken over by its resume; a plain rerun's refusal named
    nothing either. Now the rerun names the resume, and the resume takes over that run's
    lock and finishes. Oracles: what each host's Caddy serves, the lock's directory."""
    fleet = fleet_on_v3
    v2, v3 = VERSIONS["v2"].tag, VERSIONS["v3"].tag
    journal = tmp_path / "journal"
    lock_env = fleet.host("host1").env
    fleet.write_inventory(host_vars={"host1": {"runbook_command": fleet.cut_off_command(
        "host1", "rollback")}})
    try:
        proc = _fleet_rollback(fleet, journal, "--format", "json")
        out, err = proc.communicate(timeout=600)
    finally:
        fleet.reachable_again("host1")
        fleet.write_inventory()
    assert proc.returncode == 5, out + err
    data = json.loads(out.splitlines()[-1])
    run_id, record = data["fleet_run_id"], data["record"]
    assert record["outcome"] == "stopped", record
    assert record["hosts"]["host1"]["status"] == "unknown: unreachable", record["hosts"]
    assert "could not release the fleet lock on host1" in data["fleet_lock_release_failed"]
    assert [fleet.serving(h.name)[2] for h in fleet.hosts] == [v3, v3, v3]
    try:
        # as seen from a lock host on another machine than the controller: live
        holder_file = hostlock.path(lock_env) / "holder.json"
        holder = json.loads(holder_file.read_text())
        assert holder["fleet_run_id"] == run_id, holder
        holder_file.write_text(json.dumps({**holder, "hostname": "controller-elsewhere"}))
        assert not hostlock.status(lock_env).stale  # type: ignore[union-attr]
        plain = subprocess.run([fleet.runbook_command, "fleet", "rollback", str(fleet.inventory),
                                "--yes", "--journal-dir", str(journal)], capture_output=True,
                               text=True, stdin=subprocess.DEVNULL, timeout=600, check=False)
        assert plain.returncode == ExitCode.LOCKED, plain.stdout + plain.stderr
        assert "left its fleet lock behind" in plain.stderr, plain.stderr
        named = plain.stderr.split("finish it with `", 1)[1].split("`", 1)[0]
        assert named == f"{record['resume_command']}", (named, record["resume_command"])
        assert [fleet.serving(h.name)[2] for h in fleet.hosts] == [v3, v3, v3]
        argv = shlex.split(named)  # host1 checked: still on v3, its rollback never ran
        resumed = subprocess.run([fleet.runbook_command, *argv[1:], "--yes", "--format",
                                  "json"], capture_output=True, text=True,
                                 stdin=subprocess.DEVNULL, timeout=600, check=False)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        for name in ("host1", "host2", "host3"):
            assert fleet.serving(name) == (200, "blue", v2), name
        second = json.loads(resumed.stdout.splitlines()[-1])["record"]
        taken_over = second["stale_fleet_lock_taken_over"]
        assert taken_over["holder"]["fleet_run_id"] == run_id, taken_over
        assert hostlock.status(lock_env) is None
    finally:
        with contextlib.suppress(RunbookError):
            hostlock.release(lock_env, run_id)


def test_ensure_sshd_is_quick_and_changes_nothing_when_sshd_is_there() -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "ensure-sshd.sh"
    began = time.monotonic()
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("ensure-sshd: ok: ") and "OpenSSH" in proc.stderr
    assert time.monotonic() - began < 5


@pytest.mark.docker
def test_a_host_without_a_working_runbook_is_refused_in_preflight(
        drill_fleet: DrillFleet, tmp_path: Path) -> None:
    """`runbook_command` pointing at a program that is not runbook: that host's line says to
    install togather-runbook; exit 4; no host changed, the fleet lock released."""
    drill_fleet.write_inventory(host_vars={"host3": {"runbook_command": "/bin/false"}})
    try:
        before = [drill_fleet.serving(h.name) for h in drill_fleet.hosts]
        proc = _fleet_rollback(drill_fleet, tmp_path)
        _out, err = proc.communicate(timeout=600)
        assert proc.returncode == 4, err
        host3 = [line for line in err.splitlines() if line.strip().startswith("host3:")]
        assert len(host3) == 1 and "install togather-runbook" in host3[0], err
        assert [drill_fleet.serving(h.name) for h in drill_fleet.hosts] == before
        assert hostlock.status(drill_fleet.hosts[0].env) is None
    finally:
        drill_fleet.write_inventory()


@pytest.mark.docker
def test_sigterm_during_preflight_releases_the_fleet_lock_and_changes_nothing(
        drill_fleet: DrillFleet, tmp_path: Path) -> None:
    drill_fleet.write_inventory()
    lock_env = drill_fleet.hosts[0].env
    before = [drill_fleet.serving(h.name) for h in drill_fleet.hosts]
    proc = _fleet_rollback(drill_fleet, tmp_path)
    deadline = time.monotonic() + 120
    while not hostlock.path(lock_env).exists():  # the fleet lock taken: pre-flight under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "interrupted before any host changed; nothing was changed" in err, (_out, err)
    assert "Traceback" not in err
    assert hostlock.status(lock_env) is None
    assert [drill_fleet.serving(h.name) for h in drill_fleet.hosts] == before


def test_clean_drills_stops_a_dead_fleets_sshd_and_removes_its_directory(tmp_path: Path) -> None:
    """A killed test leaves a fleet directory and its sshd listeners: `make clean-drills`
    stops only processes whose command line names that directory, then removes it."""
    from runbook.drill.fleet import clean_orphans

    # Swept under the test's own root: no other cleaner on the machine (`make clean-drills`,
    # tests/test_cleanup.py) sweeps this half-made orphan, and this one sweeps nobody else's.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fleet_dir = tmp_path / "togather-fleet-test-dead"
    fleet_dir.mkdir()
    (fleet_dir / "owner").write_text(str(dead.pid))
    # a stand-in listener (sshd itself cannot be told apart from a real one here): a process
    # whose command line names the fleet's directory, as the drill's sshd -f <dir>/... does.
    # Each says "up" once running: Popen returns when exec has begun, and until the kernel has
    # set up the new program's arguments /proc/<pid>/cmdline reads empty (1 start in 5 here
    # under load), which the cleaner rightly takes for "not that fleet's".
    up = "import time; print('up', flush=True); time.sleep(60)"
    listener = subprocess.Popen([sys.executable, "-c", up,
                                 str(fleet_dir / "ssh" / "sshd_config.host1")],
                                stdout=subprocess.PIPE, text=True)
    bystander = subprocess.Popen([sys.executable, "-c", up], stdout=subprocess.PIPE, text=True)
    assert listener.stdout is not None and bystander.stdout is not None
    assert listener.stdout.readline() == bystander.stdout.readline() == "up\n"
    (fleet_dir / "sshd.host1.pid").write_text(str(listener.pid))
    (fleet_dir / "sshd.host2.pid").write_text(str(bystander.pid))  # not naming the dir
    live_dir = tmp_path / "togather-fleet-test-live"
    live_dir.mkdir()
    (live_dir / "owner").write_text(str(os.getpid()))
    try:
        removed = clean_orphans(tmp_path)
        assert removed == [fleet_dir.name] and not fleet_dir.exists()
        assert listener.wait(timeout=10) == -signal.SIGTERM
        assert bystander.poll() is None  # never a process that is not that fleet's
        assert live_dir.exists()  # a live owner's fleet
    finally:
        bystander.kill()
        listener.kill()
        for proc in (bystander, listener):
            proc.communicate()


@pytest.mark.docker
def test_maintenance_without_a_needed_restore_is_refused_and_changes_nothing(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    before = [fleet_on_v3.serving(h.name) for h in fleet_on_v3.hosts]
    proc = _fleet_rollback(fleet_on_v3, tmp_path / "refused", "--maintenance")
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "needs no snapshot restore" in err, err
    assert [fleet_on_v3.serving(h.name) for h in fleet_on_v3.hosts] == before
    assert hostlock.status(fleet_on_v3.hosts[0].env) is None


@pytest.mark.docker
def test_maintenance_preflight_refuses_a_host_broken_past_its_schema_guard(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """The maintenance path: every host but the database host refuses at its schema guard in
    pre-flight (the restore resolves that). Found by review: their dry run stopped there, so
    a host whose Caddy validation did not work passed pre-flight; every host was drained, the
    database restored, and that host's own rollback failed: it stayed DOWN. Its pre-flight
    now runs every other check past that refusal: the run is refused, exit 4, and nothing
    changed. Oracles: what each host's Caddy serves, schema_migrations in Postgres."""
    import dataclasses

    from runbook.environment import ReloadMethod

    fleet = fleet_on_v3
    before = [fleet.serving(h.name) for h in fleet.hosts]
    assert {b[2] for b in before} == {VERSIONS["v3"].tag}, before
    host2 = fleet.host("host2")
    broken = tmp_path / "host2-no-caddy.toml"  # `caddy validate` through a missing binary
    broken.write_text(envmod.to_toml(host2.env.with_(caddy=dataclasses.replace(
        host2.env.caddy, reload=ReloadMethod.CADDY_RELOAD, command=(str(tmp_path / "nope"),)))))
    lock = fleet.hosts[0]
    with lock.stack.connect() as conn:
        row = conn.execute("SELECT version FROM schema_migrations").fetchone()
        assert row is not None
        conn.execute("UPDATE schema_migrations SET version = version + 1")
    fleet.write_inventory(host_vars={"host2": {"runbook_environment": {
        "RUNBOOK_CONFIG": str(broken)}}})
    try:
        proc = _fleet_rollback(fleet, tmp_path / "journal", "--maintenance")
        out, err = proc.communicate(timeout=600)
    finally:
        fleet.write_inventory()
    assert proc.returncode == ExitCode.PRECONDITION, out + err
    assert "host2: rollback dry run: pre-flight: Caddy's validation path does not work" in err, err
    assert "nothing was changed" in err, err
    assert not any(line.startswith(("  host1:", "  host3:")) for line in err.splitlines()), err
    with lock.stack.connect() as conn:  # never restored
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (row[0] + 1,)
    assert [fleet.serving(h.name) for h in fleet.hosts] == before  # never drained
    assert hostlock.status(lock.env) is None


def _aged(lines: list[str]) -> list[str]:
    """Plan lines with the ages in them ("taken 3s ago") masked: two dry runs seconds apart."""
    return [re.sub(r"\b\d+(\.\d+)?\s*(s|min|h|d|seconds?|minutes?|hours?|days?)\b", "<age>",
                   line) for line in lines]


@pytest.mark.docker
def test_the_maintenance_dry_run_shows_every_step_the_real_run_takes(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """Found by review: `fleet rollback --maintenance --dry-run` (and the real run's prompt)
    showed the restore's snapshot and one line a host: no drain, none of the restore's own
    steps, no step (nor from/to) of any host's rollback but a summary of the database host's
    rollback WITH a restore, which never runs. Plan, then act: the dry run now shows, in
    the order they run, each host's drain (the containers it stops), the restore on the lock
    host exactly as `runbook snapshot restore ENV SNAPSHOT --keep-stopped --dry-run` prints
    it there, then each host's rollback, from what to what, canary first. Then the real
    run: its journals (the fleet journal, each host's run records and logs) hold no step
    the dry run did not show. Oracles: the versions the drill deployed, the containers
    docker says run, the lock host's own restore dry run typed over SSH, the snapshot its
    state file recorded for the deployment, and the hosts' own journals."""
    from runbook import state as states

    fleet = fleet_on_v3
    lock = fleet.hosts[0]
    v2, v3 = VERSIONS["v2"].tag, VERSIONS["v3"].tag
    with lock.stack.connect() as conn:
        conn.execute("UPDATE schema_migrations SET version = version + 1")
    argv = [fleet.runbook_command, "fleet", "rollback", str(fleet.inventory), "--maintenance",
            "--journal-dir", str(tmp_path)]
    dry = subprocess.run([*argv, "--dry-run", "--format", "json"], capture_output=True,
                         text=True, timeout=600, check=False, stdin=subprocess.DEVNULL)
    assert dry.returncode == 0, dry.stderr + dry.stdout
    answer = json.loads(dry.stdout)
    lines: list[str] = answer["lines"]
    text = "\n".join(lines)

    # each host's rollback, from the deployed v3 to v2, canary (host1) first, with its steps
    ready = [i for i, line in enumerate(lines) if re.match(
        rf"host\d: ready: roll back .* from {v3} \(green\) to {v2} \(blue\)$", line)]
    assert [lines[i].split(":")[0] for i in ready] == ["host1", "host2", "host3"], text
    for h in fleet.hosts:
        shown = _block(lines, f"{h.name}: ready: ")
        assert any("Switch" in line or "switch" in line for line in shown), (h.name, text)
        assert (answer["plans"].get(h.name) or {}).get("steps"), (h.name, answer["plans"])

    # each host's drain names what runs there now, and nothing of another host
    running = {h.name: [c for c in (h.env.slot(s).container for s in Slot)
                        if _running(c) == "running"] for h in fleet.hosts}
    drains = [i for i, line in enumerate(lines) if re.match(r"host\d: drain: ", line)]
    assert [lines[i].split(":")[0] for i in drains] == ["host1", "host2", "host3"], text
    for h in fleet.hosts:
        shown = "\n".join(_block(lines, f"{h.name}: drain: "))
        assert running[h.name] and all(c in shown for c in running[h.name]), (h.name, text)
        others = {o.env.slot(s).container for o in fleet.hosts if o is not h for s in Slot}
        assert not any(c in shown for c in others), (h.name, shown)

    # the restore, as the lock host's own `snapshot restore --keep-stopped --dry-run` plans it
    snap = Path(str(states.read_state(lock.env.state_file).current.snapshot_path)).name
    own = fleet.ssh("host1", fleet.runbook_command, "snapshot", "restore", "development", snap,
                    "--keep-stopped", "--dry-run")
    assert own.returncode == 0, own.stderr + own.stdout
    own_plan = own.stdout.splitlines()
    assert own_plan[-1] == "Dry run: nothing was changed.", own_plan
    restore_at = next(i for i, line in enumerate(lines) if line.startswith("host1: restore: "))
    assert _aged(_block(lines, "host1: restore: ")) == _aged(own_plan[:-1]), text
    assert f"runbook snapshot restore {shlex.quote(str(lock.env.source))} {snap} " \
           "--keep-stopped" in text, text
    assert max(drains) < restore_at < min(ready), text  # in the order they run

    # the real run: every step its journals hold, the dry run showed
    records = {h.name: set(h.env.runs_dir.glob("*.json")) for h in fleet.hosts}
    logs = {h.name: set(h.env.log_dir.glob("*.log")) for h in fleet.hosts}
    real = subprocess.run([*argv, "--yes", "--format", "json"], capture_output=True, text=True,
                          timeout=600, check=False, stdin=subprocess.DEVNULL)
    assert real.returncode == 0, real.stderr + real.stdout
    record = json.loads(real.stdout)["record"]
    assert [p["name"] for p in record["phases"]] == ["preflight", "drain", "database",
                                                     "rollout"], record["phases"]
    planned = answer["maintenance"]
    restore_steps = {s["name"] for s in planned["restore"]["steps"]}
    assert planned["restore"]["host"] == "host1", planned["restore"]
    ran = {s["name"] for s in record["database"]["restore_run"]["steps"]}
    assert ran and ran <= restore_steps, (ran, restore_steps)
    for h in fleet.hosts:
        rollback_steps = {s["name"] for s in answer["plans"][h.name]["steps"]}
        done = [json.loads(p.read_text())
                for p in sorted(set(h.env.runs_dir.glob("*.json")) - records[h.name])]
        assert sorted(d["action"] for d in done) == (
            ["rollback", "snapshot-restore"] if h is lock else ["rollback"]), (h.name, done)
        for d in done:
            # the run's own bookkeeping, as in a single host's dry run: "plan" is the
            # planning the dry run is, "unlock" the release of the lock its "lock" step takes
            names = {s["name"] for s in d["steps"]} - {"plan", "unlock"}
            shown = rollback_steps if d["action"] == "rollback" else restore_steps
            assert names <= shown, (h.name, d["action"], names - shown)
        drained = [e["container"] for e in _drain_logs(h.env, logs[h.name])
                   if e.get("fleet_run_id") == record["fleet_run_id"] and e.get("container")
                   and e["message"].startswith("stopped ")]
        stop_steps = [s for s in planned["drain"][h.name]["steps"]
                      if s["name"] == "stop-slot" and not s["skip"]]
        assert drained == [s["details"]["container"] for s in stop_steps] == running[h.name], \
            (h.name, drained, stop_steps)
        assert fleet.serving(h.name) == (200, "blue", v2), h.name


@pytest.mark.docker
def test_maintenance_whose_snapshot_predates_a_database_move_is_refused_saying_so(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """The shared database moved (another host port) since its snapshots were taken, so
    their sidecars name where it was. `runbook rollback --moved-from` accepts such a one
    (tests/test_rollback.py); the fleet has no --moved-from (left out). Its maintenance
    pre-flight refused naming `--snapshot FILE`, which it does not take either; its refusal
    now says the fleet cannot restore that snapshot and why, and names neither the fleet's
    missing options nor a single host's rollback (which would restore the database every
    host shares under the others). Nothing changed. Oracles: what each host's Caddy serves,
    schema_migrations in Postgres."""
    fleet = fleet_on_v3
    lock = fleet.hosts[0]
    before = [fleet.serving(h.name) for h in fleet.hosts]
    with lock.stack.connect() as conn:
        row = conn.execute("SELECT version FROM schema_migrations").fetchone()
        assert row is not None
        conn.execute("UPDATE schema_migrations SET version = version + 1")
    kept = {p: p.read_bytes() for p in lock.env.database.snapshot_dir.glob("*.meta.json")}
    moved = set()
    for sidecar, text in kept.items():
        meta = json.loads(text)
        if meta.get("port") not in (None, ""):
            moved.add(f"localhost:{int(meta['port']) + 1}")
            sidecar.write_text(json.dumps(meta | {"host": "localhost",
                                                  "port": int(meta["port"]) + 1}))
    assert moved, kept
    try:
        proc = _fleet_rollback(fleet, tmp_path / "journal", "--maintenance")
        out, err = proc.communicate(timeout=600)
    finally:
        for sidecar, text in kept.items():
            sidecar.write_bytes(text)
    assert proc.returncode == ExitCode.PRECONDITION, out + err
    assert "nothing was changed" in err, err
    assert "the fleet cannot restore it (`runbook fleet rollback` has no --moved-from)" in err
    assert any(f"was taken from {m}" in err for m in moved), err
    assert "--snapshot FILE" not in err and "runbook rollback" not in err, err
    with lock.stack.connect() as conn:  # never restored
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (row[0] + 1,)
    assert [fleet.serving(h.name) for h in fleet.hosts] == before  # never drained
    assert hostlock.status(lock.env) is None


@pytest.mark.docker
def test_a_fleet_journal_that_cannot_be_written_after_the_drain_is_said_and_the_run_goes_on(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """A maintenance run whose fleet journal stops being writable once the hosts drain (a
    full disk on the controller; here the journal's file replaced by a directory, so every
    write of it fails with a real OSError). Found by review: the run ended "unexpected
    failure" (exit 5) after the restore, every host left drained, the hosts' results lost.
    Now each failed write is said and the run goes on: the hosts roll back on the restored
    database, exit 0, and the final lines say the journal was not written. Oracles: what each
    host's Caddy serves, schema_migrations in Postgres."""
    fleet = fleet_on_v3
    v2 = VERSIONS["v2"].tag
    journal = tmp_path / "journal"
    lock = fleet.hosts[0]
    with lock.stack.connect() as conn:
        row = conn.execute("SELECT version FROM schema_migrations").fetchone()
        assert row is not None
        conn.execute("UPDATE schema_migrations SET version = version + 1")
    sabotage = tmp_path / "drain-fills-the-journal"
    sabotage.write_text(f"""#!{sys.executable}
import os, sys
from pathlib import Path
RUNBOOK = {fleet.runbook_command!r}
argv = sys.argv[1:]
if argv[:2] == ["fleet", "drain"]:
    for record in Path({str(journal)!r}).glob("fleet_*.json"):
        record.unlink()
        record.mkdir()  # every later write of it fails (IsADirectoryError)
os.execv(RUNBOOK, [RUNBOOK, *argv])
""")
    sabotage.chmod(0o755)
    fleet.write_inventory(host_vars={"host1": {"runbook_command": str(sabotage)}})
    try:
        proc = _fleet_rollback(fleet, journal, "--maintenance")
        out, err = proc.communicate(timeout=600)
    finally:
        fleet.write_inventory()
    assert [p.is_dir() for p in journal.glob("fleet_*.json")] == [True], out + err
    assert "could not write the fleet journal" in err, err
    assert proc.returncode == 0, out + err
    for name in ("host1", "host2", "host3"):
        assert f"{name}: rolled back" in out, out
        assert fleet.serving(name) == (200, "blue", v2), name
    assert "fleet journal was not written" in out, out
    with lock.stack.connect() as conn:  # restored once
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (row[0],)
    assert hostlock.status(lock.env) is None


@pytest.mark.docker
def test_end_sessions_reaches_the_maintenance_restore_which_ends_another_writer(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """A writer on the shared database that is no host's app slot (a worker, a cron job) is
    still connected once every host is drained; the single-host restore refuses it (its own
    tests). `fleet rollback --maintenance --end-sessions` passes the flag to the lock
    host's restore, which ends that session and restores once. (Without the flag the run
    stops before the restore; in the drill that leaves v3 unhealthy on the schema bumped
    below, so only the flag's way through is tested here.)"""
    import psycopg

    refused = _fleet_rollback(fleet_on_v3, tmp_path / "usage", "--end-sessions")
    _out, err = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "only makes sense with --maintenance" in err, err
    lock = fleet_on_v3.hosts[0]
    with lock.stack.connect() as conn:
        row = conn.execute("SELECT version FROM schema_migrations").fetchone()
        assert row is not None
        conn.execute("UPDATE schema_migrations SET version = version + 1")
    worker = psycopg.connect(lock.stack.database_url, autocommit=True, connect_timeout=3,
                             application_name="nightly-report")
    try:
        proc = _fleet_rollback(fleet_on_v3, tmp_path / "ended", "--maintenance",
                               "--end-sessions")
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out + err
        with lock.stack.connect() as conn:
            assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (row[0],)
        with pytest.raises(psycopg.OperationalError):  # its session was ended
            worker.execute("SELECT 1")
        for h in fleet_on_v3.hosts:
            assert fleet_on_v3.serving(h.name)[0] == 200, h.name
    finally:
        worker.close()


# an app that connects per request (the drill app does): between two writes it holds no
# session for the restore's check of other sessions to see
WRITER = ("import os, time, psycopg\n"
          "while True:\n"
          "    try:\n"
          "        with psycopg.connect(os.environ['DATABASE_URL'], autocommit=True) as c:\n"
          "            c.execute(\"INSERT INTO items (name) VALUES ('renamed-in')\")\n"
          "    except Exception as e:\n"
          "        print(e, flush=True)\n"
          "    time.sleep(1)\n")


def _held_by_mark(mark: str, timeout: float = 120) -> int:
    """The pid of the host-side process whose environment holds `mark` (set through the
    host's runbook_environment), once it is stopped (SIGSTOP) at its drill fault point."""
    deadline = time.monotonic() + timeout
    want = mark.encode()
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if want not in (proc / "environ").read_bytes().split(b"\0"):
                    continue
                state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if state == "T":
                return int(proc.name)
        time.sleep(0.05)
    raise AssertionError(f"no process marked {mark} reached its fault point in {timeout} s")


@pytest.mark.docker
def test_a_container_renamed_in_during_a_hosts_drain_stops_the_maintenance_before_the_restore(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """host2's drain held right before its stop (the drill fault point) while its serving
    slot is renamed away and another app container, writing to the shared database, is run
    under its name. The drain stopped the one it inspected and answered "drained", and the
    lock host restored the database with the other still running: its writes landed in the
    restored data (it connects per request, so the restore's check of other sessions saw
    nothing; one that holds a session, --end-sessions ends and it may connect again after
    the restore). Now host2's drain refuses, the restore never runs, the drained hosts are
    started again, and host2, whose slot name another container holds, is named DOWN, exit
    5. Oracles: Postgres (plain SQL), the snapshot folder, the docker CLI, each host's Caddy."""
    fleet = fleet_on_v3
    v3 = VERSIONS["v3"].tag
    lock, host2 = fleet.hosts[0], fleet.hosts[1]
    with lock.stack.connect() as conn:
        row = conn.execute("SELECT version FROM schema_migrations").fetchone()
        assert row is not None
        conn.execute("UPDATE schema_migrations SET version = version + 1")  # needs a restore
    snapshots = set(lock.env.database.snapshot_dir.iterdir())
    slot = next(s for s in Slot if _running(host2.env.slot(s).container) == "running")
    name = host2.env.slot(slot).container
    inspected = docker_says(name)
    mark = f"DRILL_HELD_RUN={os.getpid()}-{time.monotonic_ns()}"
    fleet.write_inventory(host_vars={"host2": {"runbook_environment": {
        "RUNBOOK_DRILL_FAULT": "fleet-drain.before-stop:SIGSTOP",
        mark.partition("=")[0]: mark.partition("=")[2]}}})
    pid = None
    try:
        with put_back(host2.stack, slot) as aside:
            proc = _fleet_rollback(fleet, tmp_path, "--maintenance")
            pid = _held_by_mark(mark)  # host2's drain, inspected, before its stop
            host2.stack.docker("rename", name, aside)
            subprocess.run(["docker", "run", "-d", "--name", name, "--network",
                            f"{lock.stack.project}_default", "-e", "DATABASE_URL", "--label",
                            f"{RUN_LABEL}={host2.stack.run_id}", "--entrypoint", "python3",
                            inspected["image"], "-c", WRITER], check=True, capture_output=True,
                           text=True, env={**os.environ,
                                           "DATABASE_URL": lock.stack.app_database_url})
            os.kill(pid, signal.SIGCONT)
            out, err = proc.communicate(timeout=600)
            other, kept = docker_says(name), docker_says(aside)
            with lock.stack.connect() as conn:
                version = conn.execute("SELECT version FROM schema_migrations").fetchone()
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        fleet.write_inventory()
    text = out + err
    assert proc.returncode == ExitCode.ATTENTION, text
    assert f"host2: drain failed: not drained: {name} is running once its stops are done" \
        in err, text
    assert "host2 could not be started again: THE SERVICE IS DOWN there" in err, text
    assert version == (row[0] + 1,), version  # never restored
    assert not [p for p in set(lock.env.database.snapshot_dir.iterdir()) - snapshots
                if "pre-restore" in p.name], "a restore began"
    assert other["status"] == "running", other  # not the runbook's: left as it is
    assert kept["id"] == inspected["id"] and kept["status"] == "exited", kept
    for h in (fleet.hosts[0], fleet.hosts[2]):  # drained, then started again
        assert fleet.serving(h.name)[:3:2] == (200, v3), (h.name, text)


@pytest.mark.docker
def test_a_drain_lost_while_another_hosts_undrain_fails_is_still_said_may_be_down(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """Found by review: host3 went dark once its drain had stopped its slots, before it
    answered, and host2's undrain was refused (a container up under its slot's name since
    its drain): the run's error named host2 only, its fix host2 only, and host3, left down,
    was only "host3: drain failed" on a line, never "MAY BE DOWN" nor its undo (said when no
    undrain fails). Now both are said. host1, its app slots stopped before the run (its drain
    stops nothing), was not named either (found by review): now it is said DOWN, not started
    by this run. Oracles: each host's Caddy, the docker CLI."""
    fleet = fleet_on_v3
    lock, host2, host3 = fleet.hosts
    with lock.stack.connect() as conn:
        conn.execute("UPDATE schema_migrations SET version = version + 1")  # needs a restore
    slots1 = [lock.env.slot(s).container for s in Slot]
    _docker_stop(*[c for c in slots1 if _running(c) == "running"])
    down1 = {c: docker_says(c) for c in slots1}
    slot = next(s for s in Slot if _running(host2.env.slot(s).container) == "running")
    name = host2.env.slot(slot).container
    inspected = docker_says(name)
    mark = f"DRILL_HELD_RUN={os.getpid()}-{time.monotonic_ns()}"
    fleet.write_inventory(host_vars={
        "host2": {"runbook_environment": {
            "RUNBOOK_DRILL_FAULT": "fleet-drain.before-stop:SIGSTOP",
            mark.partition("=")[0]: mark.partition("=")[2]}},
        "host3": {"runbook_command": fleet.cut_off_command("host3", "fleet", "drain",
                                                           after=True)}})
    pid = None
    try:
        with put_back(host2.stack, slot) as aside:
            proc = _fleet_rollback(fleet, tmp_path, "--maintenance")
            pid = _held_by_mark(mark)  # host2's drain, inspected, before its stop
            host2.stack.docker("rename", name, aside)
            subprocess.run(["docker", "run", "-d", "--name", name, "--label",
                            f"{RUN_LABEL}={host2.stack.run_id}", "--entrypoint", "sleep",
                            inspected["image"], "600"], check=True, capture_output=True)
            os.kill(pid, signal.SIGCONT)
            _out, err = proc.communicate(timeout=600)
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        fleet.reachable_again("host3")
        fleet.write_inventory()
    assert proc.returncode == ExitCode.ATTENTION, err
    assert "host2 could not be started again: THE SERVICE IS DOWN there" in err, err
    assert "the drain of host3 failed or was lost: THE SERVICE MAY BE DOWN there" in err, err
    assert "--undo <its app slot containers, comma-separated>" in err, err
    assert "host1 had no app slot running before this run's drain: THE SERVICE IS DOWN " \
           "there" in err, err
    assert "  host1: its drain found no app slot running: not started by this run" in err, err
    assert {c: docker_says(c) for c in slots1} == down1, err  # left as it was: down
    assert fleet.serving("host3")[0] >= 500, err  # down indeed
    names = ",".join(host3.env.slot(s).container for s in Slot)
    done = runbook_cli(host3.env, "fleet", "drain", "--undo", names)  # as the fix says
    assert done.returncode == 0 and json.loads(done.stdout)["started"], done.stdout + done.stderr


@pytest.mark.docker
def test_a_host_down_before_the_drain_is_named_when_another_hosts_drain_is_lost(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """host2's app slots stopped before the run (its drain stops nothing), host3 gone dark
    once its drain stopped its slots: the run stops before its restore and starts host1
    again. Found by review: the error named host3 only ("MAY BE DOWN") and said "the drained
    hosts were started again", host2, down before and left down, unnamed (it is named when
    no drain is lost). Now host2 is said DOWN, on a line of its own: not started by this run.
    Oracles: the docker CLI (host2's containers as the test stopped them), each host's Caddy."""
    fleet = fleet_on_v3
    v3 = VERSIONS["v3"].tag
    lock, host2 = fleet.hosts[0], fleet.hosts[1]
    with lock.stack.connect() as conn:
        conn.execute("UPDATE schema_migrations SET version = version + 1")  # needs a restore
    slots = [host2.env.slot(s).container for s in Slot]
    _docker_stop(*[c for c in slots if _running(c) == "running"])
    down = {c: docker_says(c) for c in slots}
    returncode, err = _maintenance_with_host3_lost_after_its_drain(fleet, tmp_path)
    assert returncode == ExitCode.ATTENTION, err
    assert "the drain of host3 failed or was lost: THE SERVICE MAY BE DOWN there" in err, err
    assert "host2 had no app slot running before this run's drain: THE SERVICE IS DOWN " \
           "there" in err, err
    assert "  host2: its drain found no app slot running: not started by this run" in err, err
    assert {c: docker_says(c) for c in slots} == down, err  # left as it was: down
    assert _until_serving(fleet, "host1")[:3:2] == (200, v3), err  # drained, started again


def _fleet_run_killed(fleet: DrillFleet, journal: Path, pid_file: Path,
                      host_vars: dict[str, dict[str, str]], *args: str) -> dict[str, Any]:
    """A `fleet rollback ARGS` with `host_vars` (a scripted command that kills the controller,
    kill -9, by the pid written to `pid_file`), the inventory put back after. The run's
    fleet journal record."""
    fleet.write_inventory(host_vars=host_vars)
    try:
        proc = _fleet_rollback(fleet, journal, *args)
        pid_file.write_text(str(proc.pid))
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == -signal.SIGKILL, out + err
    finally:
        fleet.write_inventory()
    (record,) = [json.loads(p.read_text()) for p in journal.glob("fleet_*.json")]
    _playbook_ended(str(record["fleet_run_id"]), within=60)  # nothing of it outlives it
    return dict(record)


def _maintenance_killed_at_an_undrain(fleet: DrillFleet, journal: Path, host: str,
                                      pid_file: Path) -> dict[str, Any]:
    """`fleet rollback --maintenance` (_fleet_run_killed): the lock host (host1) refuses the
    restore, and the controller is killed as it starts `host` again (its undrain never runs)."""
    return _fleet_run_killed(fleet, journal, pid_file, {
        "host1": {"runbook_command": _scripted_command(fleet, "host1", refuse_restore=True)},
        host: {"runbook_command": _scripted_command(fleet, host, kill_on="undo",
                                                    pid_file=pid_file)}}, "--maintenance")


def _maintenance_with_host3_lost_after_its_drain(fleet: DrillFleet,
                                                 journal: Path) -> tuple[int, str]:
    """A `fleet rollback --maintenance` whose host3 goes dark once its drain ran (its slots
    stopped) but before it answered; host3 reachable again after. (exit code, stderr)"""
    fleet.write_inventory(host_vars={"host3": {
        "runbook_command": fleet.cut_off_command("host3", "fleet", "drain", after=True)}})
    try:
        proc = _fleet_rollback(fleet, journal, "--maintenance")
        _out, err = proc.communicate(timeout=600)
    finally:
        fleet.reachable_again("host3")
        fleet.write_inventory()
    return proc.returncode, err


def _report_section(record: dict[str, object]) -> str:
    """The drill report's section for one fleet run, rendered from its fleet journal record."""
    from runbook.reports import fleet as fleet_report
    from runbook.reports.page import render_html

    scenario = {"name": "fleet", "status": "passed", "steps": [], "runs": [],
                "fleet_runs": [fleet_report.reduce(record)]}
    html = render_html({"environment": "drill", "features": [
        {"file": "features/fleet.feature", "name": "Fleet", "scenarios": [scenario]}]})
    section = html[html.index(f'data-fleet-run="{record["fleet_run_id"]}"'):]
    return section[:section.index("</section>")]


@pytest.mark.docker
@nightly
def test_a_stopped_maintenance_run_says_down_and_its_resume_never_restores_again(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """The restore is journaled once; the resume reuses it (oracles: the safety snapshots a
    restore takes first, schema_migrations in Postgres, what each host's Caddy serves). The
    stopped run's record also renders in the drill report (one real run serves both: a run
    of its own only for the report cost a whole fleet rollback)."""
    lock = fleet_on_v3.hosts[0]
    dirs = {h.env.database.snapshot_dir for h in fleet_on_v3.hosts}

    def safety() -> set[Path]:
        return {p for d in dirs if d.is_dir() for p in d.glob("*_pre-restore.sql.gz")}

    with lock.stack.connect() as conn:
        row = conn.execute("SELECT version FROM schema_migrations").fetchone()
        assert row is not None
        conn.execute("UPDATE schema_migrations SET version = version + 1")
    before = safety()
    fleet_on_v3.write_inventory(host_vars={"host2": {"runbook_environment": {
        "RUNBOOK_DRILL_FAULT": "before:switch:SIGTERM"}}})
    proc = _fleet_rollback(fleet_on_v3, tmp_path, "--maintenance", "--format", "json")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 5, out + err  # hosts are down: needs attention
    first = json.loads(out.splitlines()[-1])
    hosts = first["record"]["hosts"]
    assert hosts["host1"]["status"] == "rolled back"
    assert hosts["host2"]["status"] == "failed: DOWN since the drain", hosts["host2"]
    assert hosts["host3"]["status"] == "not started: DOWN since the drain", hosts["host3"]
    assert fleet_on_v3.serving("host1") == (200, "blue", VERSIONS["v2"].tag)
    assert fleet_on_v3.serving("host3")[0] >= 500  # drained: its Caddy has no slot to reach
    assert len(safety() - before) == 1
    resume = first["record"]["resume_command"]
    assert "--limit host2,host3 --resume fleet_" in resume, resume
    # the real run renders in the drill report: the fleet's phases, then one bar per host that
    # started, by batch, canary first; one row per host with its outcome
    section = _report_section(first["record"])
    for name in ("preflight", "drain", "database", "host1 (canary)", "host2 (batch 2)"):
        assert f">{name}<" in section, name
    assert ">host3 (batch 3)<" not in section  # not started: no bar
    assert section.index(">host1 (canary)<") < section.index(">host2 (batch 2)<")
    rows = [line for line in section.splitlines() if line.startswith("<tr><td>host")]
    assert [r.split("</td>")[0] for r in rows] == ["<tr><td>host1", "<tr><td>host2",
                                                    "<tr><td>host3"], rows
    assert "<td>rolled back</td>" in rows[0], rows
    assert "<td>failed: DOWN since the drain</td>" in rows[1], rows
    assert "<td>not started: DOWN since the drain</td>" in rows[2], rows
    assert "database: host: host1, status: restored" in section

    # resumed while host2 still fails: the hosts it resumes are still drained, so host2 is
    # down (exit 5), never "failed but serving" with exit 1 as a rolling rollback's would be
    assert f"--journal-dir {tmp_path}" in resume, resume  # the journal is found as printed
    argv = shlex.split(resume)[3:]
    again = subprocess.run([fleet_on_v3.runbook_command, "fleet", "rollback", *argv, "--yes",
                            "--format", "json"],
                           capture_output=True, text=True, timeout=600, check=False,
                           stdin=subprocess.DEVNULL)
    assert again.returncode == 5, again.stdout + again.stderr
    middle = json.loads(again.stdout.splitlines()[-1])["record"]
    assert middle["hosts"]["host2"]["status"] == "failed: DOWN since the drain", middle["hosts"]
    assert middle["hosts"]["host3"]["status"] == "not started: DOWN since the drain"
    assert fleet_on_v3.serving("host2")[0] >= 500 and fleet_on_v3.serving("host3")[0] >= 500
    resume = middle["resume_command"]

    fleet_on_v3.write_inventory()
    argv = shlex.split(resume)[3:]
    proc = subprocess.Popen([fleet_on_v3.runbook_command, "fleet", "rollback", *argv, "--yes",
                             "--format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    second = json.loads(out.splitlines()[-1])["record"]
    assert second["database"]["reused_from"] == middle["fleet_run_id"], second["database"]
    assert [p["name"] for p in second["phases"]].count("drain") == 0, second["phases"]
    assert len(safety() - before) == 1  # restored once in all
    with lock.stack.connect() as conn:
        row2 = conn.execute("SELECT version FROM schema_migrations").fetchone()
    assert row2 is not None and row2[0] == row[0]
    for h in fleet_on_v3.hosts:
        assert fleet_on_v3.serving(h.name) == (200, "blue", VERSIONS["v2"].tag), h.name


@pytest.mark.docker
@pytest.mark.parametrize("settings", ["ansible defaults", "operator's strategy free"])
def test_a_host_unreachable_in_its_batch_stops_the_rollout_like_a_failed_host(
        fleet_on_v3: DrillFleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        settings: str) -> None:
    """Batches [host2, host3] then [host1] (`--canary-group web`): host3 goes dark when its
    rollback is asked for (its sshd stops, its connection is cut), after a pre-flight that
    passed. Ansible's max_fail_percentage does not count an unreachable host; the rollout must
    stop all the same: host2 (same batch) finishes, host1 (next batch) never starts, host3 is
    reported unknown (exit 5: needs attention) and the resume command names it. Oracles: what
    each host's Caddy serves, the fleet lock's directory. The same with the operator's own
    Ansible settings of `strategy = free` (which ignores max_fail_percentage) and SSH retries
    (which re-run a command whose connection dropped): found by review."""
    fleet = fleet_on_v3
    v2, v3 = VERSIONS["v2"].tag, VERSIONS["v3"].tag
    theirs: dict[str, object] = {}
    if settings != "ansible defaults":
        monkeypatch.setenv("ANSIBLE_STRATEGY", "free")
        monkeypatch.setenv("ANSIBLE_SSH_RETRIES", "3")
        theirs = {"ansible_ssh_retries": 3}
    fleet.write_inventory(host_vars={"host3": {
        "runbook_command": fleet.cut_off_command("host3", "rollback"), **theirs}})
    try:
        proc = _fleet_rollback(fleet, tmp_path, "--canary-group", "web", "--format", "json")
        out, err = proc.communicate(timeout=600)
        record = json.loads(out.splitlines()[-1])["record"]
        assert record["batches"] == [["host2", "host3"], ["host1"]], record["batches"]
        assert proc.returncode == 5, out + err
        assert fleet.serving("host1")[2] == v3  # the next batch never started
        assert fleet.serving("host2") == (200, "blue", v2)  # its batch's other host finished
        assert fleet.serving("host3")[2] == v3
        hosts = record["hosts"]
        assert hosts["host1"]["status"] == "not started", hosts["host1"]
        assert hosts["host1"]["started"] is None, hosts["host1"]
        assert hosts["host2"]["status"] == "rolled back", hosts["host2"]
        assert hosts["host3"]["status"] == "unknown: unreachable", hosts["host3"]
        assert "runbook status" in hosts["host3"]["message"], hosts["host3"]
        assert "--limit host3,host1 --resume fleet_" in record["resume_command"], record
        assert record["resume_command"].endswith(f" --canary-group web --journal-dir {tmp_path}"), \
            record
        assert hostlock.status(fleet.host("host2").env) is None  # released (lock host: host2)
    finally:
        fleet.reachable_again("host3")
        fleet.write_inventory()


@pytest.mark.docker
def test_a_host_that_goes_silent_during_its_rollback_is_given_up_not_waited_on_for_ever(
        fleet_on_v3: DrillFleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """host3 drops off the network without a word while its rollback runs: its sshd and the
    command freeze (SIGSTOP), so the TCP connection stays open and nothing answers on it.
    The controller waited on that connection for ever (no FIN, no RST: TCP never gives up on
    a connection that only reads). SSH keepalives (1 s apart here, 4 unanswered) give it up
    as unreachable: outcome unknown, exit 5, the next batch never starts. The operator's own
    ssh_extra_args still apply (theirs run a LocalCommand that leaves a file)."""
    fleet = fleet_on_v3
    v2, v3 = VERSIONS["v2"].tag, VERSIONS["v3"].tag
    monkeypatch.setenv("RUNBOOK_FLEET_SSH_ALIVE_S", "1")
    theirs = tmp_path / "their-ssh-extra-args-ran"
    fleet.write_inventory(host_vars={"host3": {
        "runbook_command": fleet.cut_off_command("host3", "rollback", silent=True),
        "ansible_ssh_extra_args": f"-o PermitLocalCommand=yes -o 'LocalCommand=touch {theirs}'"}})
    try:
        proc = _fleet_rollback(fleet, tmp_path, "--canary-group", "web", "--format", "json")
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("the controller still waited on the silent host after 120 s")
        record = json.loads(out.splitlines()[-1])["record"]
        assert record["batches"] == [["host2", "host3"], ["host1"]], record["batches"]
        assert proc.returncode == 5, out + err
        hosts = record["hosts"]
        assert hosts["host3"]["status"] == "unknown: unreachable", hosts["host3"]
        assert hosts["host1"]["status"] == "not started", hosts["host1"]
        assert fleet.serving("host1")[2] == v3  # the next batch never started
        assert fleet.serving("host2") == (200, "blue", v2)  # its batch's other host finished
        assert theirs.exists()  # the operator's own ssh_extra_args were kept
    finally:
        fleet.reachable_again("host3")
        fleet.write_inventory()
    assert fleet.serving("host3")[2] == v3  # frozen before its rollback ran: unchanged


@pytest.mark.docker
@nightly
def test_a_lock_host_unreachable_when_a_batch_proves_the_lock_stops_the_rollout(
        fleet_on_v3: DrillFleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches [host1] (the canary, also the fleet lock's host) then [host2, host3]; the lock
    is proved before every batch (RUNBOOK_FLEET_REFRESH_AFTER_S=0). host1 goes dark when
    host2's batch asks it to refresh the lock. No host of that batch may start: none would
    roll back under a lock anyone can prove (a review feared Ansible dropped only the host
    whose turn ran the delegated refresh; it does not). Oracles: what each host's Caddy
    serves, the lock's directory."""
    fleet = fleet_on_v3
    v2, v3 = VERSIONS["v2"].tag, VERSIONS["v3"].tag
    monkeypatch.setenv("RUNBOOK_FLEET_REFRESH_AFTER_S", "0")
    # the refresh runs host1's own command, on host1: its second one (host2's batch) cuts
    # host1 off; the first (the canary's batch) goes through
    fleet.write_inventory(host_vars={"host1": {"runbook_command": fleet.cut_off_command(
        "host1", "fleet", "lock", "development", "--refresh", skip=1)}})
    record: dict[str, Any] = {}
    try:
        proc = _fleet_rollback(fleet, tmp_path, "--batches", "100%", "--format", "json")
        out, err = proc.communicate(timeout=600)
        record = json.loads(out.splitlines()[-1])["record"]
        assert record["batches"] == [["host1"], ["host2", "host3"]], record["batches"]
        assert proc.returncode != 0, out + err
        assert fleet.serving("host1") == (200, "blue", v2)  # the canary, before the cut
        assert fleet.serving("host2")[2] == v3 and fleet.serving("host3")[2] == v3
        hosts = record["hosts"]
        assert hosts["host2"]["status"] == hosts["host3"]["status"] == "not started", hosts
        assert "fleet lock was lost" in out + err, out + err
    finally:
        fleet.reachable_again("host1")
        fleet.write_inventory()
        if record.get("fleet_run_id"):
            hostlock.release(fleet.host("host1").env, record["fleet_run_id"])
        assert hostlock.status(fleet.host("host1").env) is None


@pytest.mark.docker
def test_the_lock_refresh_runs_the_lock_hosts_own_runbook_not_the_batch_hosts(
        fleet_on_v3: DrillFleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refresh is delegated to the lock host, where Ansible still reads the batch host's
    variables: a `runbook_command` or `runbook_env` set per host ran the batch host's runbook
    on the lock host (command not found there, or another environment's lock), and the run
    said "the fleet lock was lost". Oracle: which host's command logged the refreshes."""
    fleet = fleet_on_v3
    monkeypatch.setenv("RUNBOOK_FLEET_REFRESH_AFTER_S", "0")  # proved before every batch
    monkeypatch.setenv("RUNBOOK_FLEET_HEARTBEAT_S", "450")  # no heartbeat's refresh counted
    logs = {name: tmp_path / f"{name}.argv" for name in ("lock-host", "others")}
    commands = {}
    for name, log in logs.items():
        script = tmp_path / f"runbook-{name}"
        script.write_text(f"#!{sys.executable}\nimport os, sys\n"
                          f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                          f"os.execv({fleet.runbook_command!r}, "
                          f"[{fleet.runbook_command!r}, *sys.argv[1:]])\n")
        script.chmod(0o755)
        commands[name] = str(script)
    fleet.write_inventory(host_vars={
        "host1": {"runbook_command": commands["lock-host"]},
        **{h: {"runbook_command": commands["others"]} for h in ("host2", "host3")}})
    try:
        proc = _fleet_rollback(fleet, tmp_path / "journal", "--batches", "100%")
        _out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        by = {name: log.read_text() if log.exists() else "" for name, log in logs.items()}
        assert by["lock-host"].count(" --refresh ") == 2, by  # before each of the 2 batches
        assert "--refresh" not in by["others"], by
        assert "rollback" in by["others"]  # the batch hosts' own commands ran their rollbacks
        v2 = VERSIONS["v2"].tag
        assert all(fleet.serving(h.name)[2] == v2 for h in fleet.hosts)
    finally:
        fleet.write_inventory()


@pytest.mark.docker
def test_a_fleet_lock_outlived_by_a_running_batch_is_refreshed_and_not_taken_over(
        fleet_on_v3: DrillFleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the lock was refreshed only before a batch, so a batch longer than its
    30 minutes (a slow host) let it expire while the run went on, and another operator's run
    took it over. Batches [host1] (the lock host) then [host2, host3]; host2's rollback is held
    while the lock is aged to 10 s before its expiry (as if the batch had run 29 min 50 s);
    once that moment has passed, another run's take is still refused, the lock refreshed by
    the live run. Oracles: the lock's holder file, a take by the host-side code, and what
    each host's Caddy serves."""
    import socket

    from runbook import files

    fleet = fleet_on_v3
    lock_env = fleet.host("host1").env
    monkeypatch.setenv("RUNBOOK_FLEET_HEARTBEAT_S", "1")
    gate = tmp_path / "gate"
    fleet.write_inventory(host_vars={"host2": {"runbook_command": fleet.held_command(
        "host2", gate, "rollback")}})
    holder_file = hostlock.path(lock_env) / "holder.json"
    taken: dict[str, object] = {}
    proc = _fleet_rollback(fleet, tmp_path / "journal", "--batches", "100%")
    try:
        seen = _read_until(proc, "host2: rolling back")
        assert "host2: rolling back" in seen[-1], "".join(seen)
        holder = json.loads(holder_file.read_text())
        aged = time.time() + 10
        files.atomic_write(holder_file, json.dumps({**holder, "expires_at_epoch": aged})
                           .encode())
        time.sleep(max(0.0, aged + 2 - time.time()))  # its (aged) expiry has passed
        now = json.loads(holder_file.read_text())
        with pytest.raises(LockedError, match="held by"):
            taken = hostlock.take(lock_env, fleet_run_id="fleet_other", locked_by="bob@ops",
                                  hostname=socket.gethostname(), pid=os.getpid(),
                                  reason="another rollout")
        assert now["fleet_run_id"] == holder["fleet_run_id"], now
        assert now["expires_at_epoch"] > time.time() + 60, now  # refreshed while host2 ran
        gate.write_text("run")
        _out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        v2 = VERSIONS["v2"].tag
        assert all(fleet.serving(h.name)[2] == v2 for h in fleet.hosts), err
        assert hostlock.status(lock_env) is None  # released by the run at its end
    finally:
        if not gate.exists():
            gate.write_text("stop")  # host2's rollback never runs
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=300)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if taken:
            hostlock.release(lock_env, "fleet_other")
        fleet.write_inventory()


@pytest.mark.docker
def test_a_sigterm_while_the_fleet_lock_is_released_never_leaves_it_held(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """A run stopped at a failed host releases the fleet lock in a playbook start of its own,
    after its journal is finished; SIGTERM there (a CI timeout, a closed session) killed the
    controller with the release half done: the lock stayed held, for 30 minutes when the
    controller ran on another machine than the lock host. Now the release is finished first.
    Oracles: the lock's directory, the controller's exit code."""
    fleet = fleet_on_v3
    gate = tmp_path / "release.gate"
    fleet.write_inventory(host_vars={
        "host1": {"runbook_command": fleet.held_command(
            "host1", gate, "fleet", "lock", "development", "--release")},
        "host2": {"runbook_environment": {"RUNBOOK_DRILL_FAULT": "before:switch:SIGTERM"}}})
    try:
        proc = _fleet_rollback(fleet, tmp_path)
        seen = _read_until(proc, "host2: failed")
        _until_held(proc, gate)  # the release asked for on host1, and held there
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        gate.write_text("run")
        out, err = proc.communicate(timeout=600)
    finally:
        gate.write_text("run")
        fleet.write_inventory()
    text = "".join(seen) + err + out
    assert proc.returncode == 1, text  # the stopped run's own exit, not killed by SIGTERM
    assert hostlock.status(fleet.hosts[0].env) is None, text
    assert "could not release" not in text, text


@pytest.mark.docker
@nightly
def test_a_sighup_while_a_refused_run_releases_the_fleet_lock_never_leaves_it_held(
        drill_fleet: DrillFleet, tmp_path: Path) -> None:
    """A run refused in pre-flight (host3 has no working runbook) releases the fleet lock;
    SIGHUP meanwhile (the operator's terminal or SSH session closed) ended the controller
    mid-release: only Ctrl-C and SIGTERM were held off. Now the release finishes and the
    refusal is the exit. Oracles: the controller's exit code, the lock's directory."""
    fleet = drill_fleet
    gate = tmp_path / "release.gate"
    held = fleet.held_command("host1", gate, "fleet", "lock", "development", "--release")
    fleet.write_inventory(host_vars={"host1": {"runbook_command": held},
                                     "host3": {"runbook_command": "/bin/false"}})
    try:
        before = [fleet.serving(h.name) for h in fleet.hosts]
        proc = _fleet_rollback(fleet, tmp_path)
        _until_held(proc, gate)  # the release asked for on host1: time for the SIGHUP
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        gate.write_text("run")
        out, err = proc.communicate(timeout=600)
    finally:
        gate.write_text("run")
        fleet.write_inventory()
    assert proc.returncode == 4, out + err  # the refusal's own exit, not killed by SIGHUP
    assert hostlock.status(fleet.hosts[0].env) is None, err
    assert "could not release" not in err, err
    assert [fleet.serving(h.name) for h in fleet.hosts] == before


@pytest.mark.docker
def test_ctrl_c_during_the_maintenance_drain_never_starts_the_restore(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """Ctrl-C while the hosts drain: the restore that follows the drain ran anyway (Ansible
    runs in its own session and the stop was only asked at the rollout's gate), replacing the
    database after on-call asked to stop, and the journal still said "restore planned". Now
    the restore never starts, the drained hosts are started again and the run says so, exit 1.
    Oracles: schema_migrations in Postgres, what each host's Caddy serves, the lock's dir."""
    fleet = fleet_on_v3
    v3 = VERSIONS["v3"].tag
    with fleet.hosts[0].stack.connect() as conn:
        conn.execute("UPDATE schema_migrations SET version = version + 1")  # needs a restore
        row = conn.execute("SELECT version FROM schema_migrations").fetchone()
    assert row is not None
    gate = tmp_path / "host2.gate"
    fleet.write_inventory(host_vars={"host2": {"runbook_command": fleet.held_command(
        "host2", gate, "fleet", "drain")}})
    try:
        proc = _fleet_rollback(fleet, tmp_path, "--maintenance")
        seen = _read_until(proc, "maintenance: draining")
        _until_held(proc, gate)  # host2's drain held (host1's and host3's run on)
        proc.send_signal(signal.SIGINT)
        _said(proc, seen, "interrupted: the restore will not start")
        gate.write_text("run")  # host2's drain goes on: it stops its slots
        out, err = proc.communicate(timeout=600)
    finally:
        gate.write_text("run")
        fleet.write_inventory()
    text = "".join(seen) + err + out
    with fleet.hosts[0].stack.connect() as conn:
        after = conn.execute("SELECT version FROM schema_migrations").fetchone()
    assert after == row, (after, row, text)  # the restore never ran
    assert proc.returncode == 1, text
    assert "interrupted" in err and "the database was not touched" in err, text
    assert "every drained host was started again" in err, text
    assert [fleet.serving(h.name)[:3:2] for h in fleet.hosts] == [(200, v3)] * 3, text
    record = json.loads(next(tmp_path.glob("fleet_*.json")).read_text())
    assert record["database"]["status"] == "not restored", record["database"]
    assert hostlock.status(fleet.hosts[0].env) is None
    # each host's own log says what its drain stopped, for this fleet run, and the deploy
    # lock the drain held is free again (found by review: only the controller knew)
    # ... and what the undrain started again, under that lock too
    (drain,) = [p for p in record["phases"] if p["name"] == "drain"]
    for h in fleet.hosts:
        ours = [e for e in _drain_logs(h.env, set())
                if e.get("fleet_run_id") == record["fleet_run_id"] and "container" in e]
        logged = sorted(e["container"] for e in ours if e["message"].startswith("stopped "))
        assert logged == sorted(drain["stopped"][h.name]), (h.name, logged, drain)
        again = sorted(e["container"] for e in ours if e["message"].startswith("started "))
        assert again == logged, (h.name, again, ours)
        assert logged and not h.env.lock_path.exists(), h.name


@pytest.mark.docker
def test_an_undrain_refused_by_a_live_deploy_lock_is_said_with_the_hosts_own_reason(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """The undrain now holds each host's deploy lock: a deploy that took host3's lock once
    its drain ended refuses host3's start-again (exit 3 there, nothing started). The run
    says host3 is DOWN, exit 5, with host3's own reason (the deploy lock), not only "could
    not be started again"; the other drained host is started again. Oracles: what each
    host's Caddy serves, the docker CLI."""
    from runbook import lock as locks

    fleet = fleet_on_v3
    v3 = VERSIONS["v3"].tag
    host3 = fleet.hosts[2]
    apps = [host3.env.slot(s).container for s in Slot]
    with fleet.hosts[0].stack.connect() as conn:
        conn.execute("UPDATE schema_migrations SET version = version + 1")  # needs a restore
    gate = tmp_path / "host2.gate"
    fleet.write_inventory(host_vars={"host2": {"runbook_command": fleet.held_command(
        "host2", gate, "fleet", "drain")}})
    held = None
    try:
        proc = _fleet_rollback(fleet, tmp_path, "--maintenance")
        seen = _read_until(proc, "maintenance: draining")
        _until_held(proc, gate)  # host2's drain held (host1's and host3's run on)
        deadline = time.monotonic() + 120
        while any(_running(c) == "running" for c in apps) or host3.env.lock_path.exists():
            assert time.monotonic() < deadline, "host3's drain did not end in 120 s"
            time.sleep(0.05)
        held = locks.acquire(host3.env, reason="a deploy")  # a live process: this one
        proc.send_signal(signal.SIGINT)
        _said(proc, seen, "interrupted: the restore will not start")
        gate.write_text("run")
        out, err = proc.communicate(timeout=600)
        down = [_running(c) for c in apps]
    finally:
        gate.write_text("run")
        fleet.write_inventory()
        if held is not None:
            locks.release(host3.env, held)
    text = "".join(seen) + err + out
    assert proc.returncode == ExitCode.ATTENTION, text
    assert "host3 could not be started again: THE SERVICE IS DOWN there" in err, text
    (why,) = [line for line in err.splitlines() if "host3: start again failed:" in line]
    assert "deploy lock" in why and "nothing was started" in why, why
    assert "running" not in down, down  # nothing started under the deploy's lock
    assert fleet.serving("host3")[0] >= 500, text
    assert [fleet.serving(h.name)[:3:2] for h in fleet.hosts[:2]] == [(200, v3)] * 2, text


@pytest.mark.docker
def test_an_undrain_that_starts_some_containers_and_refuses_one_is_reported_as_it_answered(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """Found by review: host3's undrain started blue and refused green (its name now held by
    another container), exit 5, and the run said "host3 could not be started again: THE
    SERVICE IS DOWN there", what it had started only inside the error's words. Both slots
    of host3 run (the old one kept) and are drained; while host1's restore is held, green is
    renamed away on host3 and another container made under its name; the restore then fails
    before it begins (exit 1). The run now says what was started (started,
    not "serving": nothing checked that), that green was not started with the host's exact
    fix for it, and answers both as fields per host. Oracles: the docker CLI."""
    fleet = fleet_on_v3
    host3 = fleet.hosts[2]
    blue, green = (host3.env.slot(s).container for s in (Slot.BLUE, Slot.GREEN))
    lock = fleet.hosts[0]
    with lock.stack.connect() as conn:
        conn.execute("UPDATE schema_migrations SET version = version + 1")  # needs a restore
    gate = tmp_path / "restore.gate"
    fleet.write_inventory(host_vars={"host1": {"runbook_command": fleet.held_command(
        "host1", gate, "snapshot", "restore")}})
    host3.stack.docker("start", blue)  # the old slot kept running: the drain stops both
    try:
        with put_back(host3.stack, Slot.GREEN) as aside:
            proc = _fleet_rollback(fleet, tmp_path, "--maintenance", "--format", "json")
            _until_held(proc, gate)  # every host drained, host1's restore held
            drained = {n: docker_says(n) for n in (blue, green)}
            other = next(v.image for v in VERSIONS.values()
                         if v.image != drained[green]["image"])
            host3.stack.docker("rename", green, aside)
            create_under(host3.stack, Slot.GREEN, other)
            impostor = docker_says(green)
            gate.write_text("fail")  # the restore exits 1 before it begins
            out, err = proc.communicate(timeout=600)
            now = {n: docker_says(n) for n in (blue, green, aside)}
    finally:
        gate.write_text("fail")  # never the restore, whatever failed
        fleet.write_inventory()
    assert proc.returncode == ExitCode.ATTENTION, out + err
    # started since the drain (its start time, the docker CLI's): whether it then serves,
    # nothing checked (here the old slot, on the bumped schema)
    assert [now[blue]["id"], now[blue]["status"]] == [drained[blue]["id"], "running"], now
    assert now[blue]["started"] != drained[blue]["started"], now
    assert now[green]["id"] == impostor["id"] and now[green]["started"] == NEVER, now
    assert now[aside]["status"] == "exited", now  # the drained green: not started
    answer = json.loads(out)
    assert f"host3 was not fully started again (started: {blue}; not started: {green}): " \
        "THE SERVICE MAY BE DOWN there" in answer["error"], answer["error"]
    assert "host3 could not be started again" not in answer["error"], answer["error"]
    assert "serving" not in answer["error"].replace("not checked serving", ""), answer
    undrain = answer["undrain"]
    assert {h: undrain[h]["status"] for h in undrain} == {
        "host1": "started again", "host2": "started again",
        "host3": "partly started again"}, undrain
    assert undrain["host3"]["started"] == [blue] and undrain["host3"]["exit_code"] == 5, undrain
    (refusal,) = undrain["host3"]["refused"]
    assert refusal["container"] == green and refusal["container_id"] == drained[green]["id"]
    assert refusal["now_id"] == impostor["id"], refusal
    fix = f"--undo {green}@{drained[green]['id']}"
    assert fix in refusal["fix"], refusal
    assert f"host3: started again: {blue} (started, not checked serving)" in err, err
    (line,) = [x for x in err.splitlines() if x.strip().startswith(f"host3: {green} was not")]
    assert fix in line and "docker events" in line, line
    assert "for each container not started on host3: the fix on its line" in answer["fix"]
    record = json.loads(next(tmp_path.glob("fleet_*.json")).read_text())
    assert record["undrain"]["host3"]["refused"] == [refusal], record["undrain"]


@pytest.mark.docker
@nightly
def test_ctrl_c_during_the_maintenance_restore_waits_for_it_and_stops_before_the_rollout(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """Ctrl-C once the restore has started: it is waited for (never cut in half), journaled
    as restored, and the run stops before any host rolls back: every host down, exit 5, and
    the resume named with the run's own options (here --batches). Oracles: schema_migrations
    in Postgres, what each host's Caddy serves, the journal."""
    fleet = fleet_on_v3
    with fleet.hosts[0].stack.connect() as conn:
        row = conn.execute("SELECT version FROM schema_migrations").fetchone()
        assert row is not None
        conn.execute("UPDATE schema_migrations SET version = version + 1")
    gate = tmp_path / "restore.gate"
    fleet.write_inventory(host_vars={"host1": {"runbook_command": fleet.held_command(
        "host1", gate, "snapshot", "restore")}})
    try:
        proc = _fleet_rollback(fleet, tmp_path, "--maintenance", "--batches", "100%")
        seen = _read_until(proc, "maintenance: draining")
        _until_held(proc, gate)  # every host drained, the restore asked for on host1, held
        proc.send_signal(signal.SIGINT)
        _said(proc, seen, "interrupted: the restore will not start")
        gate.write_text("run")  # the restore goes on, and is waited for
        out, err = proc.communicate(timeout=600)
    finally:
        gate.write_text("run")
        fleet.write_inventory()
    text = "".join(seen) + err + out
    assert proc.returncode == 5, text
    with fleet.hosts[0].stack.connect() as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == row, text
    assert all(fleet.serving(h.name)[0] >= 500 for h in fleet.hosts), text  # all still down
    record = json.loads(next(tmp_path.glob("fleet_*.json")).read_text())
    assert record["database"]["status"] == "restored", record["database"]
    assert "--batches 100%" in record["resume_command"], record["resume_command"]
    assert "interrupted during the restore" in err and record["resume_command"] in err, err
    resume = subprocess.run([fleet.runbook_command, "fleet", "rollback",
                             *record["resume_command"].split()[3:], "--yes", "--journal-dir",
                             str(tmp_path)], capture_output=True, text=True, check=False,
                            timeout=600, stdin=subprocess.DEVNULL)
    assert resume.returncode == 0, resume.stdout + resume.stderr
    v2 = VERSIONS["v2"].tag
    assert [fleet.serving(h.name)[2] for h in fleet.hosts] == [v2, v2, v2]


@pytest.mark.docker
@nightly
def test_a_restore_whose_outcome_is_unknown_keeps_every_host_down(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """The maintenance path; the restore host (host1) goes dark once its restore ran to the
    end but before it could answer: the controller cannot know whether the database was
    restored (here it was: the oracle is schema_migrations in Postgres). Starting the drained
    hosts again would put the new code on the old schema: every host stays down, exit 5, and
    the message says what to check instead of 'the database was not touched'."""
    fleet = fleet_on_v3
    lock = fleet.host("host1")
    with lock.stack.connect() as conn:
        row = conn.execute("SELECT version FROM schema_migrations").fetchone()
        assert row is not None
        conn.execute("UPDATE schema_migrations SET version = version + 1")
    fleet.write_inventory(host_vars={"host1": {"runbook_command": fleet.cut_off_command(
        "host1", "snapshot", "restore", after=True)}})
    try:
        proc = _fleet_rollback(fleet, tmp_path, "--maintenance")
        _out, err = proc.communicate(timeout=600)
        assert proc.returncode == 5, err
        with lock.stack.connect() as conn:
            restored = conn.execute("SELECT version FROM schema_migrations").fetchone()
        assert restored is not None and restored[0] == row[0]  # it did restore
        for name in ("host2", "host3"):  # drained, and left so: never the new code on it
            assert fleet.serving(name)[0] >= 500, (name, fleet.serving(name))
        first = next(line for line in err.splitlines() if line.startswith("runbook: error:"))
        assert "the outcome of the restore on host1 is unknown" in first, err
        assert "THE SERVICE IS DOWN" in first, err
        assert "not touched" not in err and "started again" not in err, err
        assert "runbook status" in first, err
    finally:
        fleet.reachable_again("host1")
        fleet.write_inventory()
        for record in tmp_path.glob("fleet_*.json"):  # its lock host was dark at the release
            with contextlib.suppress(RunbookError):
                hostlock.release(lock.env, record.stem)
        fleet.on_new_deployment("v3")  # the hosts serving again for the next test


@pytest.mark.docker
@nightly
def test_a_resume_takes_an_unknown_host_only_when_named_and_never_once_it_rolled_back(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """host3 goes dark right after its rollback ran to the end: it did roll back, but the
    controller cannot know (unknown, exit 5). A resume that does not name it is refused
    (exit 2); the printed resume command names it, and its pre-flight finds host3 no longer on
    the deployment the run started from: refused (exit 4), never rolled 'back' to the release
    it left. Left out, the rest finishes. Oracle: what each host's Caddy serves."""
    fleet = fleet_on_v3
    v2, v3 = VERSIONS["v2"].tag, VERSIONS["v3"].tag
    fleet.write_inventory(host_vars={"host3": {"runbook_command": fleet.cut_off_command(
        "host3", "rollback", after=True)}})
    try:
        proc = _fleet_rollback(fleet, tmp_path, "--canary-group", "web", "--format", "json")
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 5, out + err
        first = json.loads(out.splitlines()[-1])["record"]
        assert first["hosts"]["host3"]["status"] == "unknown: unreachable", first["hosts"]
    finally:
        fleet.reachable_again("host3")
        fleet.write_inventory()
    assert fleet.serving("host3") == (200, "blue", v2)  # it did roll back
    assert fleet.serving("host1")[2] == v3

    def resume(*args: str) -> tuple[int, str]:
        proc = subprocess.Popen([fleet.runbook_command, "fleet", "rollback", *args, "--yes",
                                 "--journal-dir", str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        out, err = proc.communicate(timeout=600)
        return proc.returncode, out + err

    code, text = resume(str(fleet.inventory), "--resume", first["fleet_run_id"])
    assert code == 2 and "host3 had an unknown outcome" in text, text
    assert "nothing was changed" in text, text
    printed = first["resume_command"].split()[3:]
    assert printed[1:3] == ["--limit", "host3,host1"], printed
    code, text = resume(*printed)
    assert code == 4, text
    assert "host3: changed since fleet run" in text and "leave it out" in text, text
    assert fleet.serving("host3") == (200, "blue", v2)  # never flipped forward
    assert fleet.serving("host1")[2] == v3  # nothing changed
    code, text = resume(str(fleet.inventory), "--limit", "host1", "--resume",
                        first["fleet_run_id"])
    assert code == 0, text
    for name in ("host1", "host2", "host3"):
        assert fleet.serving(name) == (200, "blue", v2), name


def _playbook_ended(run_id: str, within: float = 120.0) -> None:
    """Every ansible-playbook process of fleet run `run_id` has ended (waited for, up to
    `within` s: a playbook that outlived its killed controller waited at a gate for 900 s)."""
    deadline = time.monotonic() + within
    while True:
        left = []
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
            except OSError:
                continue
            if b"ansible-playbook" in argv and run_id.encode() in argv:
                left.append(proc.name)
        if not left:
            return
        assert time.monotonic() < deadline, f"fleet run {run_id}'s playbook still runs: {left}"
        time.sleep(0.2)


@pytest.mark.docker
def test_a_killed_controllers_playbook_starts_no_further_batch_and_ends(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """kill -9 of the controller as host2's rollback is asked for; host2's command, already
    sent, runs on (it rolls host2 back). No batch may start once the controller is gone:
    nobody would journal it, judge it or be able to stop it (an operator who killed the
    controller to stop the rollout would see it go on). The code before this test already
    held, only by accident: the orphaned ansible-playbook died at its next output, its
    terminal (ansible-runner's pty) gone with the controller; waiting at a gate, it printed
    nothing and lived on for up to 900 s. Now each play that changes a host first checks
    that the controller is there (fleet_gate.py). Oracles: each host's Caddy, the process
    table."""
    fleet = fleet_on_v3
    v2, v3 = VERSIONS["v2"].tag, VERSIONS["v3"].tag
    journal = tmp_path / "journal"
    pid_file = tmp_path / "controller.pid"
    _fleet_run_killed(fleet, journal, pid_file, {"host2": {
        "runbook_command": fleet.kill_controller_command(
            "host2", pid_file, "rollback", recorded=(journal, "host1"), then_run=True)}})
    assert fleet.serving("host1") == (200, "blue", v2)
    assert fleet.serving("host2") == (200, "blue", v2)  # its command, already sent, ran on
    assert fleet.serving("host3")[2] == v3  # no batch started after the kill


@pytest.mark.docker
def test_a_controller_killed_during_the_drain_leaves_no_restore_behind_it(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """kill -9 of the controller as host3's maintenance drain is asked for; that drain runs
    on. Once the controller is gone nothing may be restored: the restore writes over every
    write since the snapshot, with nobody to journal it. As above, the code before held only
    by the orphaned playbook dying at its next output; now the restore's play checks first.
    Oracles: schema_migrations in Postgres, the process table."""
    fleet = fleet_on_v3
    journal = tmp_path / "journal"
    pid_file = tmp_path / "controller.pid"
    with fleet.hosts[0].stack.connect() as conn:
        row = conn.execute("SELECT version FROM schema_migrations").fetchone()
        assert row is not None
        conn.execute("UPDATE schema_migrations SET version = version + 1")  # needs a restore
    _fleet_run_killed(fleet, journal, pid_file, {"host3": {
        "runbook_command": fleet.kill_controller_command(
            "host3", pid_file, "fleet", "drain", then_run=True)}}, "--maintenance")
    with fleet.hosts[0].stack.connect() as conn:  # never restored
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (row[0] + 1,)


@pytest.mark.docker
def test_a_controller_killed_mid_rollout_leaves_a_journal_its_resume_finishes(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """kill -9 of the controller while the second batch starts (host2's rollback is asked for;
    the drill's command there kills the controller first and leaves host2 as it was). The
    fleet journal written as the run went says host1 rolled back and nothing of host2 and
    host3: the resume skips host1 (never rolled twice), takes host2 and host3 only when
    --limit names them (their outcome was not recorded), takes over the fleet lock of the
    dead controller, and finishes: every host serves the previous version. Oracles: what
    each host's Caddy serves, the fleet lock's directory."""
    fleet = fleet_on_v3
    v2, v3 = VERSIONS["v2"].tag, VERSIONS["v3"].tag
    journal = tmp_path / "journal"
    pid_file = tmp_path / "controller.pid"
    fleet.write_inventory(host_vars={"host2": {"runbook_command": fleet.kill_controller_command(
        "host2", pid_file, "rollback", recorded=(journal, "host1"))}})
    try:
        proc = _fleet_rollback(fleet, journal)
        pid_file.write_text(str(proc.pid))
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == -signal.SIGKILL, out + err
    finally:
        fleet.write_inventory()
    assert fleet.serving("host1") == (200, "blue", v2)
    assert fleet.serving("host2")[2] == v3 and fleet.serving("host3")[2] == v3
    records = list(journal.glob("fleet_*.json"))
    assert len(records) == 1, records
    first = json.loads(records[0].read_text())
    assert first["outcome"] is None and first["rollout_started"], first
    assert first["hosts"]["host1"]["status"] == "rolled back", first["hosts"]
    run_id = first["fleet_run_id"]
    held = hostlock.status(fleet.hosts[0].env)
    assert held is not None and held.stale, held  # the dead controller's lock, left behind
    # A lock host on another machine than the controller cannot see its pid: to it the lock
    # is live until it expires. A plain rerun was refused "wait for that fleet run to finish"
    # (exit 3) for 30 minutes; the controller's own journal says that run's controller is
    # gone, so the refusal names the resume that finishes it.
    holder_file = hostlock.path(fleet.hosts[0].env) / "holder.json"
    holder = json.loads(holder_file.read_text())
    holder_file.write_text(json.dumps({**holder, "hostname": "controller-elsewhere"}))
    assert not hostlock.status(fleet.hosts[0].env).stale  # type: ignore[union-attr]
    plain = subprocess.run([fleet.runbook_command, "fleet", "rollback", str(fleet.inventory),
                            "--yes", "--journal-dir", str(journal)], capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=600, check=False)
    assert plain.returncode == ExitCode.LOCKED, plain.stdout + plain.stderr
    assert "never finished" in plain.stderr and "controller" in plain.stderr, plain.stderr
    assert f"--resume {run_id}" in plain.stderr, plain.stderr
    assert f"--journal-dir {journal}" in plain.stderr, plain.stderr
    assert [fleet.serving(h.name)[2] for h in fleet.hosts] == [v2, v3, v3]
    refused_runs = {p.stem for p in journal.glob("fleet_*.json")} - {run_id}

    def resume(*args: str) -> tuple[int, str, str]:
        p = subprocess.Popen([fleet.runbook_command, "fleet", "rollback", str(fleet.inventory),
                              *args, "--resume", run_id, "--yes", "--journal-dir",
                              str(journal)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, stdin=subprocess.DEVNULL)
        o, e = p.communicate(timeout=600)
        return p.returncode, o, e

    code, out, err = resume()
    assert code == 2, out + err
    assert "never finished" in err and "host2, host3 had an unknown outcome" in err, err
    assert [fleet.serving(h.name)[2] for h in fleet.hosts] == [v2, v3, v3]
    code, out, err = resume("--limit", "host1,host2,host3")  # host1 named: still never again
    assert code == 0, out + err
    assert "host1: skipped: rolled back by fleet run " + run_id in out, out
    for name in ("host1", "host2", "host3"):
        assert fleet.serving(name) == (200, "blue", v2), name
    second = json.loads(next(p for p in journal.glob("fleet_*.json")
                             if p.stem not in {run_id, *refused_runs}).read_text())
    assert second["hosts_selected"] == ["host2", "host3"], second
    assert set(second["hosts"]) == {"host2", "host3"}  # host1 never rolled again
    taken_over = second["stale_fleet_lock_taken_over"]  # the lock the dead controller left
    assert taken_over["holder"]["fleet_run_id"] == run_id, taken_over
    assert hostlock.status(fleet.hosts[0].env) is None


@pytest.mark.docker
def test_the_resume_named_for_a_run_killed_before_its_rollout_keeps_its_limit(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """`--limit host1,host2`, its controller killed (kill -9) in pre-flight once it holds the
    fleet lock. A rerun is refused by that lock and names the dead run's resume; found by
    review: that command had no --limit, and following it rolled back host3 too, a host the
    operator had left out. Followed as printed, it now rolls back host1 and host2 only.
    Oracle: what each host's Caddy serves."""
    fleet = fleet_on_v3
    v2, v3 = VERSIONS["v2"].tag, VERSIONS["v3"].tag
    journal = tmp_path / "journal"
    pid_file = tmp_path / "controller.pid"
    holder_file = hostlock.path(fleet.hosts[0].env) / "holder.json"
    kill = fleet.kill_controller_command("host2", pid_file, "fleet", "host-check")
    after_lock = tmp_path / "kill-once-locked"  # host1's own host-check takes the lock
    after_lock.write_text(f"""#!{sys.executable}
import os, sys, time
from pathlib import Path
argv = sys.argv[1:]
for _ in range(1200):
    if argv[:2] != ["fleet", "host-check"] or Path({str(holder_file)!r}).exists():
        break
    time.sleep(0.05)
os.execv({kill!r}, [{kill!r}, *argv])
""")
    after_lock.chmod(0o755)
    record = _fleet_run_killed(fleet, journal, pid_file,
                               {"host2": {"runbook_command": str(after_lock)}},
                               "--limit", "host1,host2")
    run_id = record["fleet_run_id"]
    assert record["outcome"] is None and not record.get("rollout_started"), record
    assert [fleet.serving(h.name)[2] for h in fleet.hosts] == [v3, v3, v3]
    # as seen from a lock host on another machine: live, so the rerun is refused
    holder = json.loads(holder_file.read_text())
    holder_file.write_text(json.dumps({**holder, "hostname": "controller-elsewhere"}))
    plain = subprocess.run([fleet.runbook_command, "fleet", "rollback", str(fleet.inventory),
                            "--yes", "--journal-dir", str(journal)], capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=600, check=False)
    assert plain.returncode == ExitCode.LOCKED, plain.stdout + plain.stderr
    named = plain.stderr.split("finish it with `", 1)[1].split("`", 1)[0]
    argv = shlex.split(named)
    assert argv[:3] == ["runbook", "fleet", "rollback"] and f"--resume {run_id}" in named, named
    resumed = subprocess.run([fleet.runbook_command, *argv[1:], "--yes"], capture_output=True,
                             text=True, stdin=subprocess.DEVNULL, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert fleet.serving("host1") == (200, "blue", v2)
    assert fleet.serving("host2") == (200, "blue", v2)
    assert fleet.serving("host3")[2] == v3, named  # left out by the run's --limit: untouched
    assert hostlock.status(fleet.hosts[0].env) is None


def test_a_fleet_journal_that_cannot_be_written_at_the_start_refuses_before_any_host(
        tmp_path: Path) -> None:
    """Nothing changed yet: a fleet journal that cannot be written (here its directory is
    under a file) refuses the run in one line, exit 4, before any host or lock is asked (a
    run without one leaves nothing for its resume). It was "unexpected failure", exit 5."""
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(ONE_ENV_INVENTORY)
    (tmp_path / "file").write_text("")
    journal = tmp_path / "file" / "journal"
    proc = subprocess.run([RUNBOOK, "fleet", "rollback", str(inventory), "--yes",
                           "--journal-dir", str(journal)], capture_output=True, text=True,
                          check=False, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == ExitCode.PRECONDITION, proc.stdout + proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("runbook: error: the fleet journal cannot be written ("), first
    assert "nothing was changed" in first and "--journal-dir" in first, first
    assert "could not release" not in proc.stderr, proc.stderr  # no lock was asked for


@pytest.mark.parametrize(("name", "value"), [
    *(("RUNBOOK_FLEET_REFRESH_AFTER_S", v) for v in ["soon", "-1", "nan", "inf", "1800"]),
    *(("RUNBOOK_FLEET_SSH_ALIVE_S", v) for v in ["0", "1.5", "-3", "301", "often"]),
    *(("RUNBOOK_FLEET_HEARTBEAT_S", v) for v in ["0", "nan", "451", "often"])])
def test_a_bad_refresh_or_keepalive_setting_is_one_line_exit_2_before_any_host(
        name: str, value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(INVENTORY)
    monkeypatch.setenv(name, value)
    journal = tmp_path / "journal"
    proc = subprocess.run([RUNBOOK, "fleet", "rollback", str(inventory), "--yes",
                           "--journal-dir", str(journal)], capture_output=True, text=True,
                          check=False, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert name in proc.stderr and "Traceback" not in proc.stderr
    assert not journal.exists()  # nothing written, no host asked


@pytest.mark.docker
def test_a_host_already_rolled_back_is_refused_in_preflight_not_rolled_forward(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """host3 was rolled back by hand (it runs v2, its previous deployment is v3): its own
    `runbook rollback` would go to v3, forward, to the release the fleet is leaving, and the
    fleet reported it "rolled back", exit 0. Refused in pre-flight, nothing changed.
    Found by review: the first refusal tells the odd host by the majority; with every
    selected host rolled back already (a rerun with --limit of the hosts a failed run rolled
    back, as that refusal suggests), no majority told them, and they were rolled forward,
    exit 0. Each is refused as "already rolled back" now, alone or not.
    The commands these refusals print name host3's environment as host3's own runbook names
    it in its own refusal (found by review: `runbook rollback development`, the bare name,
    which on a host whose environment is a file elsewhere loads another configuration or
    none); the oracle is host3's own `runbook rollback` typed there over SSH."""
    host3 = fleet_on_v3.host("host3")
    assert host3.env.source is not None
    by_hand = subprocess.run([fleet_on_v3.runbook_command, "rollback", str(host3.env.source),
                              "--yes"], capture_output=True, text=True, check=False,
                             timeout=300, stdin=subprocess.DEVNULL)
    assert by_hand.returncode == 0, by_hand.stderr
    own = subprocess.run(["ssh", "-F", str(fleet_on_v3.ssh_config), "host3", shlex.join(
        [fleet_on_v3.runbook_command, "rollback", "development", "--dry-run"])],
        capture_output=True, text=True, timeout=180, check=False, stdin=subprocess.DEVNULL)
    assert own.returncode == 4, own.stderr + own.stdout
    found = re.search(r"`runbook status (\S+)` lists the deployments", own.stderr)
    assert found is not None, own.stderr
    named = found.group(1)  # how host3's own runbook names its environment
    assert named != "development", own.stderr  # its file is not the default one
    before = [fleet_on_v3.serving(h.name) for h in fleet_on_v3.hosts]
    assert before[2][2] != before[0][2]  # host3 now runs another release than host1
    proc = _fleet_rollback(fleet_on_v3, tmp_path)
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 4, err
    assert f"host3: runs {VERSIONS['v2'].tag}, the other host(s) run {VERSIONS['v3'].tag}" \
        in err, err
    assert f"(`runbook rollback {named}` there)" in err, err
    already = (f"host3: already rolled back (it runs {VERSIONS['v2'].tag}, rolled back from "
               f"{VERSIONS['v3'].tag})")
    assert already in err and "nothing was changed" in err, err
    assert f"`runbook rollback {named} --to VERSION` there" in err, err
    assert [fleet_on_v3.serving(h.name) for h in fleet_on_v3.hosts] == before
    alone = _fleet_rollback(fleet_on_v3, tmp_path / "alone", "--limit", "host3")
    _out, err = alone.communicate(timeout=600)
    assert alone.returncode == 4, err
    assert already in err and "nothing was changed" in err, err
    assert [fleet_on_v3.serving(h.name) for h in fleet_on_v3.hosts] == before


@pytest.mark.docker
def test_a_hosts_rollback_refuses_when_its_deployment_is_not_the_one_expected(
        fleet_on_v3: DrillFleet) -> None:
    """What each host's rollback gets from the fleet: `--expect-from` what its pre-flight
    saw. A host rolled back in between refuses (exit 4) instead of rolling on."""
    host1 = fleet_on_v3.host("host1")
    assert host1.env.source is not None
    before = fleet_on_v3.serving("host1")
    refused = subprocess.run([fleet_on_v3.runbook_command, "rollback", str(host1.env.source),
                              "--yes", "--expect-from", VERSIONS["v2"].tag],
                             capture_output=True, text=True, check=False, timeout=300,
                             stdin=subprocess.DEVNULL)
    assert refused.returncode == 4, refused.stderr
    assert f"the current deployment is {VERSIONS['v3'].tag}, not {VERSIONS['v2'].tag}" \
        in refused.stderr and "nothing was changed" in refused.stderr
    assert fleet_on_v3.serving("host1") == before


def test_two_controllers_racing_for_a_stale_fleet_lock_never_both_hold_it(
        env: Environment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Y judges an expired fleet lock stale; before Y renames it away, X takes the same stale
    lock over and writes its own. Y then renamed X's FRESH lock away: both said "taken",
    and both controllers rolled hosts. Judging and taking are one guarded step now."""
    import threading

    hostlock.take(env, fleet_run_id="fleet_old", locked_by="old@ops", hostname="elsewhere",
                  pid=1, reason="old", ttl=-1)  # expired at once
    real_status = hostlock.status
    judged, go_on = threading.Event(), threading.Event()

    def slow_status(e: Environment, now: float | None = None) -> hostlock.Held | None:
        held = real_status(e, now)
        if threading.current_thread().name == "Y" and not judged.is_set():
            judged.set()
            go_on.wait(5)
        return held

    monkeypatch.setattr(hostlock, "status", slow_status)
    results: dict[str, object] = {}

    def contender(name: str) -> None:
        try:
            results[name] = hostlock.take(env, fleet_run_id=f"fleet_{name}", locked_by=name,
                                          hostname="elsewhere", pid=1, reason=name)
        except LockedError as exc:
            results[name] = exc

    y = threading.Thread(target=contender, args=("Y",), name="Y")
    y.start()
    assert judged.wait(5)
    x = threading.Thread(target=contender, args=("X",), name="X")
    x.start()
    x.join(1.0)  # unguarded, X takes the stale lock over now
    go_on.set()
    y.join(10)
    x.join(15)
    taken = [n for n, r in results.items() if isinstance(r, dict) and r.get("taken")]
    held = real_status(env)
    assert held is not None
    assert len(taken) == 1 and held.holder["fleet_run_id"] == f"fleet_{taken[0]}", results


@pytest.mark.docker
@nightly  # its kind (a host unreachable in pre-flight) runs in make test: features/
def test_a_fleet_lock_taken_by_a_host_check_whose_answer_was_lost_is_released(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """The lock host's host-check took the fleet lock, then the connection dropped before it
    answered: the run is refused (exit 4, nothing changed). The host being dark, its lock
    cannot be released then; the error names the command that does (it used to name none,
    and the retry was refused for 30 minutes as 'held by' this very operator's run)."""
    fleet = fleet_on_v3
    fleet.write_inventory(host_vars={"host1": {
        "runbook_command": fleet.cut_off_command("host1", "fleet", "host-check", after=True)}})
    try:
        proc = _fleet_rollback(fleet, tmp_path)
        _out, err = proc.communicate(timeout=600)
        assert proc.returncode == 4 and "unreachable" in err, err
    finally:
        fleet.reachable_again("host1")
        fleet.write_inventory()
    held = hostlock.status(fleet.host("host1").env)
    assert held is not None  # taken before the answer was lost: the host stayed dark
    run_id = held.holder["fleet_run_id"]
    release = f"runbook fleet lock development --release --fleet-run {run_id}"
    assert release in err, err  # the error names the very command that releases it
    done = fleet.ssh("host1", fleet.runbook_command, *release.split()[1:])
    assert done.returncode == 0, done.stderr
    again = _fleet_rollback(fleet, tmp_path)
    _out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err


@pytest.mark.parametrize(("name", "value", "secret"), [
    ("DATABASE_URL", "postgresql://app:hunter22@db/togather", True),
    ("PGPASSWORD", "hunter22", True),
    ("RUNBOOK_X", "postgresql://app:hunter22@db/togather", True),
    ("DATABASE_URL", "postgresql://app@db/togather?password=hunter22", True),  # libpq reads it
    ("DATABASE_URL", "postgresql://app@db/togather?sslmode=require&password=hunter22", True),
    ("DATABASE_URL", "host=db user=app password=hunter22 dbname=togather", True),  # key=value
    ("PGSERVICE_DSN", "host=db password = 'hunter22'", True),
    ("DATABASE_URL", "postgresql://app@db/togather", False),  # peer auth: no password
    ("DATABASE_URL", "postgresql://app@db/togather?sslmode=require", False),
    ("DATABASE_URL", "host=db user=app dbname=togather", False),
    ("GOOGLE_APPLICATION_CREDENTIALS", "/etc/gcp/key.json", False),  # a path to one
    ("RUNBOOK_NOTE", "basic maintenance", False),
    # found by review: names holds_secret missed, let through onto the command line
    ("DB_PASS", "hunter22", True),
    ("PGPASS", "hunter22", True),
    ("APP_KEY", "base64:hunter22", True),
    ("BYPASS_CACHE", "1", False),  # `pass` inside a word names no secret
])
def test_a_secret_in_runbook_environment_is_refused_before_any_host(
        tmp_path: Path, name: str, value: str, secret: bool) -> None:
    """Found by review: a host's runbook_environment is sent as `env NAME=VALUE runbook ...`,
    the SSH command line, which every user of the controller (and of the host) reads in `ps`
    for the whole rollback. A secret there is refused, exit 2, never shown, before any host
    is asked anything; a value that holds none (a URL without a password, a path to a key
    file) is not (a false refusal stops a rollback during an outage)."""
    path = tmp_path / "inventory.yml"
    line = f'          runbook_environment: {{{name}: "{value}"}}\n'
    with_secret = INVENTORY.replace("        web3:\n", "        web3:\n" + line, 1)
    assert with_secret != INVENTORY
    path.write_text(with_secret)
    proc = subprocess.run([RUNBOOK, "fleet", "rollback", str(path), "--dry-run"],
                          capture_output=True, text=True, check=False, timeout=120)
    refused = f"web3's runbook_environment sets {name}, a secret" in proc.stderr
    assert refused == secret, proc.stderr
    assert "hunter22" not in proc.stdout + proc.stderr
    if secret:
        assert proc.returncode == 2, proc.stderr
        assert "unreachable" not in proc.stderr  # no host was asked


def test_maintenance_with_a_limit_that_leaves_hosts_out_is_refused(tmp_path: Path) -> None:
    """The restore replaces the database every host shares; a host --limit leaves out is not
    drained and goes on serving the new code on the restored schema. Refused first."""
    path = tmp_path / "inventory.yml"
    path.write_text(ONE_ENV_INVENTORY)
    proc = subprocess.run([RUNBOOK, "fleet", "rollback", str(path), "--maintenance",
                           "--limit", "web3,web1", "--dry-run"], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--limit leaves out web2, web4, web5" in proc.stderr, proc.stderr
    assert "nothing was changed" in proc.stderr


@pytest.mark.parametrize("database", ["not restored", "restored"])
def test_a_maintenance_resume_leaves_hosts_out_only_once_the_database_is_restored(
        tmp_path: Path, database: str) -> None:
    """Found by review: a resume was exempt from the check above. A maintenance run stopped
    before its restore (the database "not restored") is restored again by its resume, and
    `--limit web1,web2` then drained those two only: the others went on serving the new code
    on the restored schema. Exempt only when the resumed run restored it (never again)."""
    path = tmp_path / "inventory.yml"
    path.write_text(ONE_ENV_INVENTORY)
    journal = {"fleet_run_id": "fleet_stopped", "outcome": "stopped", "inventory": str(path),
               "maintenance_drain_started": True, "hosts": {},
               "database": {"host": "web1", "status": database}}
    (tmp_path / "fleet_stopped.json").write_text(json.dumps(journal))
    proc = subprocess.run([RUNBOOK, "fleet", "rollback", str(path), "--maintenance",
                           "--limit", "web3,web1", "--resume", "fleet_stopped",
                           "--journal-dir", str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, check=False, timeout=120)
    refused = "--limit leaves out web2, web4, web5" in proc.stderr
    assert refused == (database == "not restored"), proc.stderr
    if refused:
        assert proc.returncode == 2 and "nothing was changed" in proc.stderr, proc.stderr


@pytest.mark.docker
def test_a_drain_lost_on_the_maintenance_path_is_not_reported_as_started_again(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """host3 goes dark once its drain ran (its slots stopped) but before it answered: the
    restore never starts, the other drained hosts are started again, and the run said
    "every drained host was started again", exit 1, with host3 down."""
    fleet = fleet_on_v3
    with fleet.hosts[0].stack.connect() as conn:
        conn.execute("UPDATE schema_migrations SET version = version + 1")  # needs a restore
    returncode, err = _maintenance_with_host3_lost_after_its_drain(fleet, tmp_path)
    assert returncode == 5, err
    assert "host3 failed or was lost: THE SERVICE MAY BE DOWN there" in err, err
    assert "every drained host was started again" not in err
    assert fleet.serving("host3")[0] >= 500  # it is down indeed (the oracle: its Caddy)
    assert fleet.serving("host1")[0] == 200 and fleet.serving("host2")[0] == 200
    # the fix said: the undrain with the bare names, which starts what the host's own log
    # says its drain stopped, by Id (it said `docker start <container>`: by name, whatever
    # holds it)
    assert "--undo <its app slot containers, comma-separated>" in err, err
    assert "docker start <container>" not in err, err
    host3 = fleet.hosts[2].stack.env
    names = ",".join(host3.slot(s).container for s in Slot)
    done = runbook_cli(host3, "fleet", "drain", "--undo", names)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["started"], done.stdout
    deadline = time.monotonic() + 60  # the started app needs its own start-up to answer
    while fleet.serving("host3")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fleet.serving("host3")[0] == 200, done.stdout


def _scripted_command(fleet: DrillFleet, name: str, *, refuse_restore: bool = False,
                      kill_on: str | None = None, pid_file: Path | None = None,
                      journal: Path | None = None) -> str:
    """A `runbook_command` for host `name`: its maintenance restore refused without running
    (exit 4 and a JSON error: the database untouched, as a restore refused by another session
    is), and/or the fleet controller killed (kill -9, read from `pid_file`) when `kill_on`
    ("undo": the undrain; "restore") is asked there, that command then exiting 1 without
    running. A kill on "restore" first waits (up to 60 s) for a fleet journal in `journal`
    holding every selected host's drain answer."""
    script = fleet.dir / f"scripted.{name}.{int(refuse_restore)}.{kill_on}"
    script.write_text(f"""#!{sys.executable}
import json, os, signal, sys, time
from pathlib import Path
RUNBOOK, KILL_ON, REFUSE = {fleet.runbook_command!r}, {kill_on!r}, {refuse_restore!r}
PID_FILE, JOURNAL = {str(pid_file)!r}, {str(journal)!r}
argv = sys.argv[1:]
asked = ("restore" if argv[:2] == ["snapshot", "restore"] else
         "undo" if argv[:2] == ["fleet", "drain"] and "--undo" in argv else None)
if asked is not None and asked == KILL_ON:
    deadline = time.monotonic() + 60
    while asked == "restore" and time.monotonic() < deadline:
        try:
            records = [json.loads(p.read_text()) for p in Path(JOURNAL).glob("fleet_*.json")]
        except (OSError, ValueError):
            records = []
        if any(set(r.get("drain_answers") or {{}}) >= set(r.get("hosts_selected") or [0])
               for r in records):
            break
        time.sleep(0.05)
    pid = int(Path(PID_FILE).read_text())
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    print("killed the fleet controller", file=sys.stderr)
    sys.exit(1)
if asked == "restore" and REFUSE:
    print(json.dumps({{"ok": False, "error": "drill: the restore refused before it began",
                      "fix": "none"}}))
    sys.exit(4)
os.execv(RUNBOOK, [RUNBOOK, *argv])
""")
    script.chmod(0o755)
    return str(script)


def _assert_started_again_never_restored(fleet: DrillFleet, schema: int, text: str) -> None:
    """Every host serves v3 again (its Caddy), and the database still has `schema` (Postgres):
    the drained hosts were started again and the restore never ran."""
    for h in fleet.hosts:
        assert _until_serving(fleet, h.name)[:3:2] == (200, VERSIONS["v3"].tag), (h.name, text)
    with fleet.hosts[0].stack.connect() as conn:
        after = conn.execute("SELECT version FROM schema_migrations").fetchone()
    assert after == (schema,), after  # never restored


def _until_serving(fleet: DrillFleet, name: str) -> tuple[int, str | None, str | None]:
    """What host `name`'s Caddy serves once its started app answers (at most 60 s)."""
    deadline = time.monotonic() + 60
    while fleet.serving(name)[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    return fleet.serving(name)


def _drained_ids(fleet: DrillFleet) -> dict[str, list[str]]:
    """Each host's running app slots as NAME@ID, as the docker CLI says (what a drain stops)."""
    return {h.name: [f"{c}@{docker_says(c)['id']}" for c in
                     (h.env.slot(s).container for s in Slot) if _running(c) == "running"]
            for h in fleet.hosts}


@pytest.mark.docker
def test_a_controller_killed_during_the_maintenance_undrain_is_finished_by_its_resume(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """The lock host's restore refused (the database untouched), the controller killed (kill
    -9) as it starts the drained hosts again. Found by review: its resume refused ("hosts may
    be DOWN", exit 5) naming no host's undo, the hosts left down. The run journals that its
    restore did not run before its undrain, so the resume finishes the job itself: it starts
    each drained host again by the Id its drain stopped, and says so as the run would have
    (exit 1). Its dry run, found by review, still refused so ("a resume would not know
    whether to restore"): now it shows the lock it takes over, each host's undo by Id and how
    the resume ends, changing nothing; under another run's live lock it refuses as the resume
    does. Oracles: each host's Caddy, the docker CLI, Postgres, the lock and journal files."""
    fleet = fleet_on_v3
    journal = tmp_path / "journal"
    pid_file = tmp_path / "controller.pid"
    with fleet.hosts[0].stack.connect() as conn:
        row = conn.execute("SELECT version FROM schema_migrations").fetchone()
        conn.execute("UPDATE schema_migrations SET version = version + 1")  # needs a restore
    assert row is not None
    ids = _drained_ids(fleet)  # what the drain will stop, as the docker CLI says
    record = _maintenance_killed_at_an_undrain(fleet, journal, "host2", pid_file)
    run_id = record["fleet_run_id"]
    assert record["outcome"] is None and record["maintenance_drain_started"], record
    assert fleet.serving("host2")[0] >= 500  # its undrain never ran: down

    def resume(*more: str) -> subprocess.CompletedProcess[str]:
        return _fleet_rollback_run(fleet, journal, "--maintenance", "--resume", run_id, *more)

    # its dry run: the plan of the resume below, nothing changed
    lock_env = fleet.hosts[0].env
    # host2's slots: its undo killed the controller without running. host1's and host3's
    # undos, asked beside it, may still land after the kill (their commands outlive it)
    containers = [fleet.hosts[1].env.slot(s).container for s in Slot]

    def untouched() -> tuple[dict[str, bytes], dict[str, bytes], dict[str, dict[str, str]]]:
        held = hostlock.path(lock_env)  # a directory: its holder file(s)
        return ({str(f.relative_to(held)): f.read_bytes() for f in held.rglob("*")
                 if f.is_file()},
                {p.name: p.read_bytes() for p in journal.iterdir()},
                {c: docker_says(c) for c in containers})

    before = untouched()
    dry = resume("--dry-run")
    text = dry.stdout + dry.stderr
    assert dry.returncode == 0, text
    assert untouched() == before, text  # no lock taken, no journal written, nothing started
    assert fleet.serving("host2")[0] >= 500, text
    (taken,) = [line for line in dry.stdout.splitlines()
                if line.startswith("fleet lock on host1: take over the stale fleet lock of ")]
    assert f"fleet run {run_id} " in taken, text  # the dead run's lock, named
    for host, pairs in ids.items():
        assert pairs, ids
        # as undrain.yml runs it: the inventory's runbook_command, --holder (found by
        # review: the line named `runbook` and left out --holder)
        said = shlex.join([fleet.runbook_command, "fleet", "drain", "development", "--undo",
                           ",".join(pairs), "--fleet-run", run_id, "--holder",
                           f"{getpass.getuser()}@{socket.gethostname()}"])
        assert f"    {host}: {said}\n" in dry.stdout, (host, said, text)
    (ends,) = [line for line in dry.stdout.splitlines()
               if line.startswith("then, each started again, it stops (exit 1): ")]
    assert "Dry run: nothing was changed." in dry.stdout, text

    # another run took the dead run's fleet lock (a live one: this process): it may be
    # restoring with those slots drained, so the resume starts nothing before it holds the lock
    hostlock.release(lock_env, run_id)
    hostlock.take(lock_env, fleet_run_id="fleet_other", locked_by="alice@ops",
                  hostname=socket.gethostname(), pid=os.getpid(), reason="another maintenance")
    try:
        refused_dry = resume("--dry-run")
        refused = resume()
    finally:
        hostlock.release(lock_env, "fleet_other")
    for no in (refused_dry, refused):  # the dry run refuses as the resume does
        assert no.returncode == ExitCode.LOCKED, no.stdout + no.stderr
        assert "alice@ops" in no.stderr, no.stderr
    assert fleet.serving("host2")[0] >= 500  # nothing started under another run's lock
    resumed = resume()
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == ExitCode.FAILED_SAFELY, text
    # as its dry run said: the same words, and the very containers it named started again
    assert ends.split("(exit 1): ", 1)[1] in resumed.stderr.replace("\n", " "), (ends, text)
    for pairs in ids.values():
        for pair in pairs:
            name, cid = pair.split("@")
            assert docker_says(name)["id"] == cid and _running(name) == "running", (pair, text)
    assert f"fleet run {run_id}" in resumed.stderr and "started again" in resumed.stderr, text
    assert "the database was not touched" in resumed.stderr, text
    _assert_started_again_never_restored(fleet, row[0] + 1, text)


@pytest.mark.docker
def test_a_resume_killed_during_its_undrain_is_finished_by_its_own_resume(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """A maintenance run killed (kill -9) during its undrain, then its resume killed during
    the undrain it finishes. The dead resume holds the fleet lock under its own id (a lock host
    elsewhere refuses the first run's resume and names this one's), so this one's resume must
    finish the undrain. Found by review: it read "its rollout had not started: no host
    changed" and ran a new maintenance, whose drain found host2 already stopped: host2 left
    down (exit 5). Oracles: each host's Caddy, Postgres."""
    fleet = fleet_on_v3
    journal = tmp_path / "journal"
    pid_file = tmp_path / "controller.pid"
    with fleet.hosts[0].stack.connect() as conn:
        row = conn.execute("SELECT version FROM schema_migrations").fetchone()
        conn.execute("UPDATE schema_migrations SET version = version + 1")  # needs a restore
    assert row is not None
    refuse = {"runbook_command": _scripted_command(fleet, "host1", refuse_restore=True)}
    fleet.write_inventory(host_vars={"host1": refuse, "host2": {
        "runbook_command": _scripted_command(fleet, "host2", kill_on="undo",
                                             pid_file=pid_file)}})
    try:
        first = _fleet_rollback(fleet, journal, "--maintenance")
        pid_file.write_text(str(first.pid))
        out, err = first.communicate(timeout=600)
        assert first.returncode == -signal.SIGKILL, out + err
        (record,) = [json.loads(p.read_text()) for p in journal.glob("fleet_*.json")]
        second = _fleet_rollback(fleet, journal, "--maintenance", "--resume",
                                 record["fleet_run_id"])
        pid_file.write_text(str(second.pid))
        out, err = second.communicate(timeout=600)
        assert second.returncode == -signal.SIGKILL, out + err
    finally:
        fleet.write_inventory(host_vars={"host1": refuse})
    try:
        (resume_id,) = [r["fleet_run_id"] for r in
                        (json.loads(p.read_text()) for p in journal.glob("fleet_*.json"))
                        if r.get("resumed_from") == record["fleet_run_id"]]
        # the dead resume's own playbook, started at once, waited at its pre-flight gate: it
        # ends once its controller is gone (it waited there 900 s, the gate's bound)
        _playbook_ended(resume_id, within=60)
        assert fleet.serving("host2")[0] >= 500  # neither undrain reached it: down
        third = _fleet_rollback_run(fleet, journal, "--maintenance", "--resume", resume_id)
    finally:
        fleet.write_inventory()
    text = third.stdout + third.stderr
    assert third.returncode == ExitCode.FAILED_SAFELY, text
    assert "the database was not touched" in third.stderr, text
    _assert_started_again_never_restored(fleet, row[0] + 1, text)


@pytest.mark.docker
def test_a_controller_killed_at_the_maintenance_restore_leaves_each_hosts_undo_named(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """The controller killed (kill -9) as the lock host's restore is asked for, every host
    drained. Whether the restore began is not known: the resume refuses (exit 5) and, found
    by review, named no host's undo; now each host's exact `fleet drain --undo NAME@ID`, from
    the drain answers the run journaled as they came. A fresh run (not --resume) whose drain
    then finds nothing running and whose restore is refused said "every drained host was
    started again", every host down; now it names the earlier run's drained hosts and their
    undo, which, followed, starts them. Oracles: the docker CLI (the Ids), each host's Caddy."""
    fleet = fleet_on_v3
    v3 = VERSIONS["v3"].tag
    journal = tmp_path / "journal"
    pid_file = tmp_path / "controller.pid"
    with fleet.hosts[0].stack.connect() as conn:
        conn.execute("UPDATE schema_migrations SET version = version + 1")  # needs a restore
    ids = _drained_ids(fleet)
    args = {h.name: str(h.env.source) for h in fleet.hosts}  # how each host's runbook names it
    record = _fleet_run_killed(fleet, journal, pid_file, {"host1": {
        "runbook_command": _scripted_command(fleet, "host1", kill_on="restore",
                                             pid_file=pid_file, journal=journal)}},
                               "--maintenance")
    run_id = record["fleet_run_id"]
    assert all(fleet.serving(h.name)[0] >= 500 for h in fleet.hosts)  # all drained
    resumed = _fleet_rollback_run(fleet, journal, "--maintenance", "--resume", run_id)
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == ExitCode.ATTENTION, text
    assert "may or may not be restored" in resumed.stderr, text
    for host, pairs in ids.items():
        assert pairs, ids
        assert f"{host}: drained by fleet run {run_id}: `runbook fleet drain {args[host]} " \
               f"--undo {','.join(pairs)}`" in resumed.stderr, (host, text)
    assert all(fleet.serving(h.name)[0] >= 500 for h in fleet.hosts)  # nothing guessed
    # its dry run is decided by the same function: refused as it is, in the same words
    dry = _fleet_rollback_run(fleet, journal, "--maintenance", "--resume", run_id, "--dry-run")
    assert (dry.returncode, dry.stderr) == (resumed.returncode, resumed.stderr), dry.stderr

    fleet.write_inventory(host_vars={"host1": {"runbook_command": _scripted_command(
        fleet, "host1", refuse_restore=True)}})
    try:
        fresh = _fleet_rollback_run(fleet, journal, "--maintenance")
    finally:
        fleet.write_inventory()
    text = fresh.stdout + fresh.stderr
    assert "every drained host was started again" not in text, text
    assert fresh.returncode == ExitCode.ATTENTION, text
    for host, pairs in ids.items():
        line = (f"{host}: drained by fleet run {run_id}: `runbook fleet drain {args[host]} "
                f"--undo {','.join(pairs)}`")
        assert line in fresh.stderr, (host, text)
    for h in fleet.hosts:  # as the fix says
        done = runbook_cli(h.env, "fleet", "drain", "--undo", ",".join(ids[h.name]))
        assert done.returncode == 0, done.stdout + done.stderr
        assert _until_serving(fleet, h.name)[:3:2] == (200, v3), h.name


# -- two environments on the same hosts (review twoenvfleet) -----------------------------------

TWO_ENVS = """\
all:
  vars:
    ansible_host: 127.0.0.1
    ansible_port: 1
  children:
    dev:
      vars: {runbook_env: development, fleet_lock_host: host1}
      children:
        canary:
          hosts: {host1: null}
    stg:
      vars: {runbook_env: staging, fleet_lock_host: host2}
      children:
        stg_canary:
          hosts: {host2: null}
        stg_web:
          hosts: {host3: null}
"""


def test_the_fleet_lock_host_is_the_selected_hosts_own(tmp_path: Path) -> None:
    """`fleet_lock_host` is read from the hosts the run selected: a staging run (`--limit stg`)
    took development's lock on host1 (blocked by a development run, blind to staging's)."""
    path = tmp_path / "inventory.yml"
    path.write_text(TWO_ENVS)
    inventory = inv.read(path)
    assert inventory.select("stg") == ["host2", "host3"]
    assert inventory.lock_host == "host2"
    assert inventory.select("dev") == ["host1"]
    assert inventory.lock_host == "host1"


def _refused_before_any_host(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A fleet run on hosts that do not exist (port 1): a refusal before any SSH is the only
    way it can end in exit 2 with a one-line error."""
    return subprocess.run([RUNBOOK, "fleet", "rollback", str(path), "--yes", *args],
                          capture_output=True, text=True, check=False, timeout=300)


def test_a_selection_of_two_environments_is_refused_before_any_host(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yml"
    path.write_text(TWO_ENVS)
    proc = _refused_before_any_host(path, "--dry-run", "--journal-dir", str(tmp_path / "j"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "development on host1" in proc.stderr and "staging on host2, host3" in proc.stderr
    assert "--limit" in proc.stderr and "nothing was changed" in proc.stderr


def test_a_fleet_lock_host_of_another_environment_is_refused_before_any_host(
        tmp_path: Path) -> None:
    path = tmp_path / "inventory.yml"
    path.write_text(TWO_ENVS.replace("{runbook_env: staging, fleet_lock_host: host2}",
                                     "{runbook_env: staging, fleet_lock_host: host1}"))
    proc = _refused_before_any_host(path, "--limit", "stg", "--canary-group", "stg_canary",
                                    "--dry-run", "--journal-dir", str(tmp_path / "j"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "host1" in proc.stderr and "development" in proc.stderr and "staging" in proc.stderr


def _staging_run_journal(journal: Path, inventory: Path, **extra: object) -> str:
    """A finished staging fleet run that rolled back host2 and host3 (as written by one)."""
    run_id = "fleet_20261205_113116_ef2134"
    journal.mkdir(exist_ok=True)
    record = {"fleet_run_id": run_id, "inventory": str(inventory), "dry_run": False,
              "limit": "stg", "resumed_from": None, "lock_host": "host2",
              "hosts_selected": ["host2", "host3"], "outcome": "rolled back", "exit_code": 0,
              "database": {"host": "host2", "status": "ok"},
              "hosts": {h: {"status": "rolled back"} for h in ("host2", "host3")},
              "controller": {"hostname": "elsewhere", "pid": 1, "pid_start": None}, **extra}
    (journal / f"{run_id}.json").write_text(json.dumps(record))
    return run_id


def test_a_resume_of_another_environments_fleet_run_is_refused_and_changes_nothing(
        tmp_path: Path) -> None:
    """The journal folder is shared by environments: a development run resuming a staging
    run's id skipped every host as 'rolled back' and said so with exit 0."""
    mixed, dev = tmp_path / "mixed.yml", tmp_path / "dev.yml"
    mixed.write_text(TWO_ENVS)
    dev.write_text(TWO_ENVS.replace("runbook_env: staging", "runbook_env: development")
                   .replace("fleet_lock_host: host2", "fleet_lock_host: host1"))
    run_id = _staging_run_journal(tmp_path / "j", mixed,
                                  environments={"host2": "staging", "host3": "staging"})
    proc = _refused_before_any_host(dev, "--limit", "host2,host3", "--resume", run_id,
                                    "--journal-dir", str(tmp_path / "j"))
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "host2 staging" in proc.stderr and "development" in proc.stderr
    assert "resume command that run printed" in proc.stderr


def test_a_resume_of_an_older_journal_without_environments_of_another_inventory_is_refused(
        tmp_path: Path) -> None:
    """A journal written before environments were recorded: its inventory is compared (the
    only thing it says); another inventory's run is refused, exit 2."""
    mixed, dev = tmp_path / "mixed.yml", tmp_path / "dev.yml"
    mixed.write_text(TWO_ENVS)
    dev.write_text(TWO_ENVS.replace("runbook_env: staging", "runbook_env: development")
                   .replace("fleet_lock_host: host2", "fleet_lock_host: host1"))
    run_id = _staging_run_journal(tmp_path / "j", mixed)
    proc = _refused_before_any_host(dev, "--limit", "host2,host3", "--resume", run_id,
                                    "--journal-dir", str(tmp_path / "j"))
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert str(mixed) in proc.stderr and "records no environment" in proc.stderr


def _staging_on(fleet: DrillFleet, names: list[str]) -> dict[str, Environment]:
    """A second environment, staging, on these drill hosts (the review's set-up): its own
    environment file, state file, runs and logs, the lock folder shared with development."""
    envs = {}
    for name in names:
        h = fleet.host(name)
        d = h.stack.run_dir / "stg"
        (d / "runs").mkdir(parents=True, exist_ok=True)
        (d / "logs").mkdir(exist_ok=True)
        text = h.env.state_file.read_text().replace('"development"', '"staging"')
        (d / "deployment-state.json").write_text(text)
        src = h.stack.run_dir / "stg.toml"
        e = h.env.with_(name="staging", state_file=d / "deployment-state.json",
                        runs_dir=d / "runs", log_dir=d / "logs", source=src)
        src.write_text(envmod.to_toml(e))
        envs[name] = e
    return envs


def _mixed_inventory(fleet: DrillFleet, path: Path, envs: dict[str, Environment]) -> Path:
    common = (f"    runbook_command: {fleet.runbook_command}\n"
              f"    ansible_ssh_common_args: -F {fleet.ssh_config}\n"
              "    ansible_python_interpreter: /usr/bin/python3\n"
              f"    ansible_control_path_dir: {fleet.dir / 'cp'}\n")
    path.write_text(
        "all:\n  vars:\n" + common + "  children:\n"
        "    dev:\n      vars: {runbook_env: development, fleet_lock_host: host1}\n"
        "      children:\n        canary:\n          hosts: {host1: null}\n"
        "    stg:\n      vars: {runbook_env: staging, fleet_lock_host: host2}\n"
        "      children:\n"
        "        stg_canary:\n          hosts:\n            host2:\n"
        f"              runbook_environment: {{RUNBOOK_CONFIG: {envs['host2'].source}}}\n"
        "        stg_web:\n          hosts:\n            host3:\n"
        f"              runbook_environment: {{RUNBOOK_CONFIG: {envs['host3'].source}}}\n")
    return path


@pytest.mark.docker
def test_a_live_fleet_lock_of_the_targets_environment_on_a_target_refuses_with_exit_3(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """Another staging fleet run holds staging's fleet lock on host2: a staging run is refused
    (exit 3) and changes nothing. It ran past it (exit 0, both hosts rolled back)."""
    import socket

    envs = _staging_on(fleet_on_v3, ["host2", "host3"])
    mixed = _mixed_inventory(fleet_on_v3, tmp_path / "mixed.yml", envs)
    hostlock.take(envs["host2"], fleet_run_id="fleet_20261205_090000_bbbbbb",
                  locked_by="bob@ctl3", hostname=socket.gethostname(), pid=os.getpid(),
                  reason="staging-fleet-rollback")
    try:
        before = [fleet_on_v3.serving(h.name) for h in fleet_on_v3.hosts]
        proc = subprocess.run([RUNBOOK, "fleet", "rollback", str(mixed), "--limit", "stg",
                               "--canary-group", "stg_canary", "--yes", "--journal-dir",
                               str(tmp_path / "j")], capture_output=True, text=True,
                              check=False, timeout=600)
        assert proc.returncode == 3, proc.stderr + proc.stdout
        assert "bob@ctl3" in proc.stderr and "nothing was changed" in proc.stderr
        assert [fleet_on_v3.serving(h.name) for h in fleet_on_v3.hosts] == before
        held = hostlock.status(envs["host2"])
        assert held is not None and held.holder["fleet_run_id"] == "fleet_20261205_090000_bbbbbb"
    finally:
        hostlock.release(envs["host2"], "fleet_20261205_090000_bbbbbb")


def test_fix_texts_name_the_hosts_environment_not_a_literal_env() -> None:
    """On hosts carrying two environments, `runbook status ENV` left on-call to guess which;
    the environment is known. Each host's is named as its own runbook names it, which its
    host-check says (`environment_arg`: the drill test of an already rolled back host checks
    it against that host's own refusal); a host whose runbook does not say (older) is named
    as the inventory has it: the RUNBOOK_CONFIG its runbook_environment sets (the bare name
    would load another file there, or none), else its runbook_env."""
    from runbook.fleet.rollout import (
        UNKNOWN_NOT_RECORDED,
        _resume_targets,
        _rolled_back_already,
        env_args,
    )

    hosts = ["host1", "host2", "host3"]
    inventory = inv.Inventory(Path("hosts.yml"), hosts, {"canary": ["host1"]}, {
        "host1": {"runbook_env": "staging",
                  "runbook_environment": {"RUNBOOK_CONFIG": "/srv/stg env/host1.toml"}},
        "host2": {"runbook_env": "staging"}, "host3": {"runbook_env": "staging"}})
    rolled_back = {"version": "v2", "rolled_back_from": "v3"}
    checks = {"host1": {"environment": "staging", "deployment": rolled_back},  # older runbooks
              "host2": {"environment": "staging", "deployment": rolled_back,
                        "environment_arg": "/etc/togather-runbook/stg-b.toml"},
              "host3": {"environment": "staging", "deployment": rolled_back}}
    args = env_args(inventory, hosts, checks)
    lines = _rolled_back_already(checks, hosts, args)
    assert "`runbook rollback '/srv/stg env/host1.toml' --to VERSION`" in lines[0], lines
    assert "`runbook rollback /etc/togather-runbook/stg-b.toml --to VERSION`" in lines[1], lines
    assert "`runbook rollback staging --to VERSION`" in lines[2], lines
    assert not any("ENV" in line for line in lines), lines
    earlier = {h: {"status": UNKNOWN_NOT_RECORDED, "fleet_run_id": "fleet_x"} for h in hosts}
    with pytest.raises(RunbookError) as refused:
        _resume_targets(["host2", "host3"], earlier, set(), "fleet_x", args)
    assert ("`runbook status /etc/togather-runbook/stg-b.toml` on host2, `runbook status "
            "staging` on host3") in str(refused.value.fix), refused.value.fix


TEMPLATED_CONFIG = {"RUNBOOK_CONFIG": "/etc/togather/{{ inventory_hostname }}.toml"}


def test_the_lock_host_limit_leaves_out_is_named_as_its_fleet_lock_answer_names_it(
        env: Environment, tmp_path: Path) -> None:
    """Found by review: a lock host that --limit leaves out runs no host-check (only `fleet
    lock --take`, or `--status` in a dry run), so its commands were always named from the
    inventory, whose runbook_environment is not rendered: a group's `RUNBOOK_CONFIG:
    "/etc/togather/{{ inventory_hostname }}.toml"` printed `runbook fleet lock
    '/etc/togather/{{ inventory_hostname }}.toml' --status`, which fails there. Its `fleet
    lock` answers (taken, refused, read) now say how its own runbook names its environment,
    and the controller names it so. The answers are the real CLI's; the oracle is the file
    the lock host's runbook loads (not the default one of its environment: the path)."""
    from runbook.fleet import FLEET_PROTOCOL
    from runbook.fleet.rollout import Events, FleetError, _answers, env_args, preflight

    own = shlex.quote(str((tmp_path / f"{env.name}.toml").absolute()))
    inventory = inv.Inventory(path=tmp_path / "hosts.yml", hosts=["web1", "web2"],
                              groups={"canary": ["web2"]}, hostvars={
                                  h: {"runbook_env": "staging", "fleet_lock_host": "web1",
                                      "runbook_environment": TEMPLATED_CONFIG}
                                  for h in ("web1", "web2")})
    target = {"host-check": {"web2": {"stdout": json.dumps(
        {"fleet_protocol": FLEET_PROTOCOL, "environment": "staging",
         "fleet_lock": {"locked": False}, "problems": []})}}}

    def ran(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
        return {"_event": "runner_on_ok", "rc": proc.returncode, "stdout": proc.stdout,
                "stderr": proc.stderr}

    controller = ("--holder", "ops@desk", "--controller-host", "desk", "--pid", "4242")
    taken = _lock_cli(env, tmp_path, "--take", "--fleet-run", "fleet_new", *controller)
    assert taken.returncode == 0, taken.stderr
    assert _lock_cli(env, tmp_path, "--release", "--fleet-run", "fleet_new").returncode == 0
    _take(env, "fleet_other", hostname="elsewhere", pid=1)  # a live run's, elsewhere
    refused = _lock_cli(env, tmp_path, "--take", "--fleet-run", "fleet_new", *controller)
    assert refused.returncode == ExitCode.LOCKED, refused.stderr
    read = _lock_cli(env, tmp_path, "--status")
    assert read.returncode == 0 and json.loads(read.stdout)["locked"] is True, read
    for task, answer in (("take the fleet lock", taken), ("take the fleet lock", refused),
                         ("read the fleet lock", read)):
        events = Events(results={**target, task: {"web1": ran(answer)}})
        assert env_args(inventory, ["web2", "web1"], _answers(events))["web1"] == own, answer

    # the dry run's refusal over that live lock names the lock host's own command
    events = Events(results={**target, "read the fleet lock": {"web1": ran(read)}})
    with pytest.raises(FleetError) as caught:
        preflight(events, inventory, ["web2"], take_lock=False)
    assert caught.value.exit_code == ExitCode.LOCKED, caught.value
    assert f"`runbook fleet lock {own} --status` there" in str(caught.value.fix), caught.value
    # no answer: named from the inventory, never by a template Ansible did not render
    events = Events(results=target, unreachable={"web1": "ssh: connect to host web1: refused"})
    with pytest.raises(FleetError) as caught:
        preflight(events, inventory, ["web2"], take_lock=True, fleet_run_id="fleet_new")
    assert "`runbook fleet lock staging --release --fleet-run fleet_new`" in str(
        caught.value.fix), caught.value.fix
    assert "{{" not in str(caught.value.fix), caught.value.fix


def test_a_resume_names_a_host_that_does_not_answer_as_the_resumed_run_recorded_it(
        tmp_path: Path) -> None:
    """Found by review: a resume named each host from the inventory (here a template Ansible
    renders only on the host) and used the resumed run's journaled `environment_args` in a
    few messages only: a host that does not answer this run lost how its own runbook names
    its environment, in this run's fixes and in its journal, which the next resume reads.
    The oracle is the journal the resumed run wrote; the hosts are unreachable (port 1)."""
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(TWO_ENVS.replace("vars: {runbook_env: development, fleet_lock_host: "
                                          "host1}", "vars: {runbook_env: development, "
                                          "fleet_lock_host: host1, runbook_environment: "
                                          "{RUNBOOK_CONFIG: \"/etc/togather/{{ "
                                          "inventory_hostname }}.toml\"}}"))
    recorded = {"host1": "/etc/togather/host1.toml"}
    journal = tmp_path / "j"
    journal.mkdir()
    run_id = "fleet_20261206_101010_abcdef"
    (journal / f"{run_id}.json").write_text(json.dumps({
        "fleet_run_id": run_id, "inventory": str(inventory), "dry_run": False, "limit": "dev",
        "resumed_from": None, "lock_host": "host1", "hosts_selected": ["host1"],
        "outcome": "failed", "exit_code": 4, "environments": {"host1": "development"},
        "environment_args": recorded, "database": {"host": "host1", "status": "ok"},
        "hosts": {"host1": {"status": "failed but serving"}},
        "controller": {"hostname": "elsewhere", "pid": 1, "pid_start": None}}))
    proc = subprocess.run([RUNBOOK, "fleet", "rollback", str(inventory), "--limit", "dev",
                           "--resume", run_id, "--journal-dir", str(journal), "--yes"],
                          capture_output=True, text=True, check=False, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == ExitCode.PRECONDITION, proc.stdout + proc.stderr
    assert "the fleet lock host host1 is unreachable" in proc.stderr, proc.stderr
    assert "`runbook fleet lock /etc/togather/host1.toml --release --fleet-run fleet_" \
        in proc.stderr, proc.stderr
    [written] = [p for p in journal.glob("fleet_*.json") if p.stem != run_id]
    assert json.loads(written.read_text())["environment_args"] == recorded


@pytest.mark.docker
def test_a_bare_name_its_last_drain_did_not_stop_is_left_not_started_by_an_older_drains_id(
        stack: DrillStack) -> None:
    """Found by review: a bare NAME took the Id of the newest drain that had ever stopped that
    name, not the last drain's: blue, stopped since by hand (as a deploy stops the standby)
    and not stopped by the last drain, was started again by `--undo blue,green`. The last
    drain stopped green only: green is started, blue is left stopped (not the drain's to
    start), exit 0. Oracles: the docker CLI."""
    env = stack.env
    blue, green = (env.slot(s).container for s in (Slot.BLUE, Slot.GREEN))
    first = runbook_cli(env, "fleet", "drain", "--fleet-run", "fleet_last1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert sorted(json.loads(first.stdout)["stopped"]) == sorted([blue, green])
    again = runbook_cli(env, "fleet", "drain", "--undo", _with_ids(blue, green))
    assert again.returncode == 0, again.stdout + again.stderr
    _docker_stop(blue)
    last = runbook_cli(env, "fleet", "drain", "--fleet-run", "fleet_last2")
    assert last.returncode == 0, last.stdout + last.stderr
    assert json.loads(last.stdout)["stopped"] == [green], last.stdout
    done = runbook_cli(env, "fleet", "drain", "--undo", f"{blue},{green}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [docker_says(blue)["status"], docker_says(green)["status"]] == [
        "exited", "running"]
    assert json.loads(done.stdout)["not_drained"] == [blue], done.stdout


@pytest.mark.docker
def test_a_bare_name_undo_after_a_drain_that_stopped_nothing_undoes_the_drain_before_it(
        stack: DrillStack) -> None:
    """A maintenance run tried again after its undrain was lost drains nothing (the slots are
    already stopped): the bare-name undo starts what the drain before it stopped. Once an
    undrain has started those Ids, a later bare-name undo leaves them: stopped by hand
    since, they are not a drain's to start. Oracles: the docker CLI."""
    env = stack.env
    blue, green = (env.slot(s).container for s in (Slot.BLUE, Slot.GREEN))
    first = runbook_cli(env, "fleet", "drain", "--fleet-run", "fleet_lost1")
    assert sorted(json.loads(first.stdout)["stopped"]) == sorted([blue, green]), first.stdout
    retry = runbook_cli(env, "fleet", "drain", "--fleet-run", "fleet_lost2")
    assert json.loads(retry.stdout)["stopped"] == [], retry.stdout
    done = runbook_cli(env, "fleet", "drain", "--undo", f"{blue},{green}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(json.loads(done.stdout)["started"]) == sorted([blue, green]), done.stdout
    assert [docker_says(blue)["status"], docker_says(green)["status"]] == ["running"] * 2
    _docker_stop(blue)
    _docker_stop(green)
    late = runbook_cli(env, "fleet", "drain", "--undo", f"{blue},{green}")
    assert late.returncode == 0, late.stdout + late.stderr
    assert json.loads(late.stdout)["started"] == [], late.stdout
    assert [docker_says(blue)["status"], docker_says(green)["status"]] == ["exited"] * 2


def _bytes_read() -> int:
    """What this process has read from the OS so far (Linux's own count, /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


_OPENED: list[str] | None = None  # the files opened while a test watches, else None


def _audit_opens(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, Path)):
        _OPENED.append(str(args[0]))


def _other_commands_log(path: Path, env: Environment, blue: str, size: int) -> int:
    """A log of another command (a deploy's, an hourly snapshot's) of about `size` bytes, as
    the journal writes one: its first line names its action; its lines name containers it
    stopped, with Ids that are no drain's. Returns the bytes written."""
    def line(message: str, **fields: str) -> str:
        return json.dumps({"timestamp": "2026-01-01T00:00:00Z", "level": "INFO",
                           "deployment_id": "deploy-x", "message": message,
                           "run_id": "deploy-x", **fields}) + "\n"

    head = line(f"deploy started on {env.name} by on-call", action="deploy",
                environment=env.name)
    body = line(f"stopped {blue} (the old slot)", container=blue, container_id="d" * 64) \
        + line("health check passed " + "x" * 200)
    text = head + body * (size // len(body))
    path.write_text(text)
    return len(text)


@pytest.mark.docker
def test_a_bare_name_undo_reads_a_large_log_folder_only_as_far_as_its_answer(
        stack: DrillStack) -> None:
    """Found by review: a bare NAME's undo read the host's logs newest first, each whole (all
    its lines in memory), until a drain turned up: slow and memory-hungry on a host with a
    large log folder. Between the drain and the undo here: 32 logs of other commands, 1 MB
    each (their lines naming the slots, with other Ids), an empty one, one cut in its first
    line, a drain that stopped nothing; the drain's own last line is cut (its writer killed
    mid-write), and an older drain's log names other Ids. The lookup answers the Ids the
    drain stopped (the docker CLI's), opens no log older than that drain, and reads from the
    OS a small part of the folder (Linux's count, /proc/self/io: each other command's log
    read as far as its first line); the undo starts exactly those Ids."""
    global _OPENED
    from runbook.fleet import drain

    env = stack.env
    blue, green = (env.slot(s).container for s in (Slot.BLUE, Slot.GREEN))
    ids = {n: docker_says(n)["id"] for n in (blue, green)}
    older = env.log_dir / f"{env.name}_20000101_000000.log"  # a drain before this one
    ours = [older]
    try:
        older.write_text("".join(json.dumps(e) + "\n" for e in [
            {"message": f"fleet-drain started on {env.name}", "action": "fleet-drain"},
            {"message": f"stopped {blue}", "container": blue, "container_id": "e" * 64},
            {"message": f"stopped {green}", "container": green, "container_id": "f" * 64}]))
        before = set(env.log_dir.glob("*.log"))
        first = runbook_cli(env, "fleet", "drain", "--fleet-run", "fleet_big1")
        assert json.loads(first.stdout)["stopped_ids"] == ids, first.stdout + first.stderr
        (drained,) = set(env.log_dir.glob("*.log")) - before
        with drained.open("a") as cut:
            cut.write('{"timestamp": "2026-01-01T00:0')  # the writer killed mid-write
        # logs sorted after the drain's: `<its name>_NNNN.log` (newer by name, as the
        # journal names a second run of the same second)
        written = 0
        for n in range(32):
            ours.append(drained.with_name(f"{drained.stem}_{n + 1:04d}.log"))
            written += _other_commands_log(ours[-1], env, blue, 1 << 20)
        ours.append(drained.with_name(f"{drained.stem}_0033.log"))
        ours[-1].write_text("")
        ours.append(drained.with_name(f"{drained.stem}_0034.log"))
        ours[-1].write_text('{"timestamp": "2026-01-01T00:00:00Z", "level": "IN')
        retry = runbook_cli(env, "fleet", "drain", "--fleet-run", "fleet_big2")
        assert json.loads(retry.stdout)["stopped"] == [], retry.stdout + retry.stderr
        newer = {str(p) for p in env.log_dir.glob("*.log") if p.name >= drained.name}
        sys.addaudithook(_audit_opens)
        _OPENED, read = [], _bytes_read()
        try:
            found = drain.journaled_ids(env, [blue, green])
            read = _bytes_read() - read
            opened = {p for p in _OPENED if Path(p).parent == env.log_dir}
        finally:
            _OPENED = None
        assert found == (ids, True), (found, ids)
        assert opened == newer, sorted(opened ^ newer)  # none older than the drain
        assert read < written // 20, (read, written)  # each other log: its first line only
        done = runbook_cli(env, "fleet", "drain", "--undo", f"{blue},{green}")
        assert done.returncode == 0, done.stdout + done.stderr
        assert sorted(json.loads(done.stdout)["started"]) == sorted([blue, green]), done.stdout
        assert {n: (docker_says(n)["id"], docker_says(n)["status"]) for n in ids} == {
            n: (i, "running") for n, i in ids.items()}
    finally:
        for path in ours:
            path.unlink(missing_ok=True)


def test_an_earlier_runs_drain_is_named_only_if_nobody_resumed_it_and_for_its_environment(
        tmp_path: Path) -> None:
    """A fresh maintenance run that finds a host's slots already stopped names the unfinished
    run whose drain stopped them, and that host's undo. Found by review: it named a run whose
    resume had since finished its undrain (that undo could start an old container), and a
    staging run's host of the same name in the same journal folder. Damaged journals that
    still parse (a list where a mapping belongs) are passed over, never a crash."""
    from runbook.fleet.rollout import _earlier_drains

    def record(run: str, env: str, ident: str, **more: object) -> None:
        (tmp_path / f"fleet_{run}.json").write_text(json.dumps({
            "fleet_run_id": f"fleet_{run}", "outcome": None, "maintenance_drain_started": True,
            "environments": {"host2": env},
            "drain_answers": {"host2": {"stopped": ["app-blue"],
                                        "stopped_ids": {"app-blue": ident}}}, **more}))

    staging = {"host2": "staging"}
    record("20261201_100000_aaaaaa", "staging", "a" * 64)
    assert _earlier_drains(tmp_path, ["host2"], "fleet_now", staging) == {
        "host2": ("fleet_20261201_100000_aaaaaa", f"app-blue@{'a' * 64}")}
    # another environment's run, newer, in the same folder: not this host's containers
    record("20261201_110000_bbbbbb", "development", "b" * 64)
    assert _earlier_drains(tmp_path, ["host2"], "fleet_now", staging)["host2"][0] \
        == "fleet_20261201_100000_aaaaaa"
    # damaged, newest: passed over
    (tmp_path / "fleet_20261201_120000_cccccc.json").write_text(json.dumps({
        "fleet_run_id": "fleet_20261201_120000_cccccc", "outcome": None,
        "maintenance_drain_started": True, "phases": 7, "drain_answers": ["host2"]}))
    assert _earlier_drains(tmp_path, ["host2"], "fleet_now", staging)["host2"][0] \
        == "fleet_20261201_100000_aaaaaa"
    # resumed since (its resume finished the undrain and recorded its own outcome)
    (tmp_path / "fleet_20261201_130000_dddddd.json").write_text(json.dumps({
        "fleet_run_id": "fleet_20261201_130000_dddddd", "outcome": "failed",
        "resumed_from": "fleet_20261201_100000_aaaaaa"}))
    assert _earlier_drains(tmp_path, ["host2"], "fleet_now", staging) == {}


def test_a_killed_runs_damaged_drain_record_reads_as_every_drain_lost_never_a_crash() -> None:
    """What a resume (and its dry run) reads of a killed maintenance run's drain, from a
    journal that parses but is damaged (phases not a list, answers not mappings): every
    selected host's drain is lost (said MAY BE DOWN, by its log's Ids), nothing is started by
    Id, no host is called down before the drain. Found while folding the three readers of the
    drain record into one: `phases: 7` raised TypeError in the resume, and with no phases an
    answer that was not a mapping counted as a drain that answered (none said MAY BE DOWN)."""
    from runbook.fleet.rollout import _drain_stopped, _drained_by, _undrain_facts

    damaged = {"fleet_run_id": "fleet_20261201_120000_cccccc", "hosts_selected": ["h1", "h2"],
               "phases": 7, "drain_answers": {"h1": ["app-blue"], "h2": "stopped"}}
    run_id, lost, failed, _ = _undrain_facts(damaged)
    assert (run_id, lost, failed) == ("fleet_20261201_120000_cccccc", ["h1", "h2"], [])
    assert _drained_by(damaged) == {} and _drain_stopped(damaged) == {}
    # the same answers well formed: h1's drain stopped app-blue (by that Id), h2's nothing
    answered = {**damaged, "phases": [], "drain_answers": {
        "h1": {"stopped": ["app-blue"], "stopped_ids": {"app-blue": "a" * 64}},
        "h2": {"stopped": [], "stopped_ids": {}}}}
    assert _undrain_facts(answered)[1] == []
    assert _drained_by(answered) == {"h1": f"app-blue@{'a' * 64}"}
    assert _drain_stopped(answered) == {"h1": ["app-blue"], "h2": []}


@pytest.mark.docker
def test_the_undrain_resumes_dry_run_refuses_as_the_resume_does_when_the_lock_host_is_unreachable(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """A maintenance run killed (kill -9) as it starts its drained hosts again; then its lock
    host (host1) unreachable. Found by review: the resume's take of the fleet lock refuses
    (exit 4, nothing started), but its dry run, which only reads the lock, showed the undrain
    ("fleet lock on host1: free: take it", each host's undo) and "Dry run: nothing was
    changed", exit 0: the plan of a resume that never runs. Now the dry run refuses in the
    same way. Oracles: the exit codes of the real resume, each host's Caddy, the docker CLI."""
    fleet = fleet_on_v3
    journal = tmp_path / "journal"
    pid_file = tmp_path / "controller.pid"
    with fleet.hosts[0].stack.connect() as conn:
        conn.execute("UPDATE schema_migrations SET version = version + 1")  # needs a restore
    record = _maintenance_killed_at_an_undrain(fleet, journal, "host2", pid_file)
    run_id = record["fleet_run_id"]
    assert record["outcome"] is None and "undrain_planned" in record, record
    containers = [fleet.hosts[1].env.slot(s).container for s in Slot]
    down = {c: docker_says(c) for c in containers}

    def resume(*more: str) -> subprocess.CompletedProcess[str]:
        return _fleet_rollback_run(fleet, journal, "--maintenance", "--resume", run_id, *more)

    fleet.write_inventory(host_vars={"host1": {"ansible_port": 1}})  # nothing listens there
    try:
        files = {f.name: f.read_bytes() for f in journal.iterdir()}
        dry = resume("--dry-run")
        assert {f.name: f.read_bytes() for f in journal.iterdir()} == files  # no record
        real = resume()
    finally:
        fleet.write_inventory()
    assert real.returncode == ExitCode.PRECONDITION, real.stdout + real.stderr
    assert "the fleet lock host host1 is unreachable" in real.stderr, real.stderr
    assert {c: docker_says(c) for c in containers} == down, real.stderr  # nothing started
    assert fleet.serving("host2")[0] >= 500, real.stderr
    assert dry.returncode == real.returncode, dry.stdout + dry.stderr
    assert "the fleet lock host host1 is unreachable" in dry.stderr, dry.stdout + dry.stderr
    assert "Dry run: nothing was changed." not in dry.stdout, dry.stdout
    finished = resume()  # reachable again: the resume finishes the undrain
    assert finished.returncode == ExitCode.FAILED_SAFELY, finished.stdout + finished.stderr
    assert fleet.serving("host2")[0] == 200, finished.stderr


@pytest.mark.docker
def test_the_resume_finishing_an_undrain_names_a_host_down_before_that_runs_drain(
        fleet_on_v3: DrillFleet, tmp_path: Path) -> None:
    """host2's app slots stopped before the maintenance run (its drain stops nothing); the
    lock host's restore refused; the controller killed (kill -9) as it starts host3 again.
    The run itself, had it lived, said host2 DOWN ("had no app slot running before this
    run's drain", exit 5). Found by review: its resume started host1 and host3 again and
    ended "every host fleet run ... drained was started again", exit 1 ("fix the cause, then
    run again"), host2 down and unnamed, and its dry run said the same. Now both name host2
    DOWN (exit 5). Oracles: the docker CLI (host2's containers as the test stopped them),
    each host's Caddy."""
    fleet = fleet_on_v3
    journal = tmp_path / "journal"
    pid_file = tmp_path / "controller.pid"
    with fleet.hosts[0].stack.connect() as conn:
        conn.execute("UPDATE schema_migrations SET version = version + 1")  # needs a restore
    host2 = fleet.hosts[1]
    slots = [host2.env.slot(s).container for s in Slot]
    _docker_stop(*[c for c in slots if _running(c) == "running"])
    down = {c: docker_says(c) for c in slots}
    record = _maintenance_killed_at_an_undrain(fleet, journal, "host3", pid_file)
    run_id = record["fleet_run_id"]
    assert record["outcome"] is None and "undrain_planned" in record, record

    def resume(*more: str) -> subprocess.CompletedProcess[str]:
        return _fleet_rollback_run(fleet, journal, "--maintenance", "--resume", run_id, *more)

    said = "host2 had no app slot running before this run's drain: THE SERVICE IS DOWN there"
    dry = resume("--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    (ends,) = [line for line in dry.stdout.splitlines() if line.startswith("then, each ")]
    assert f"(exit {int(ExitCode.ATTENTION)})" in ends and said in ends, dry.stdout
    resumed = resume()
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == ExitCode.ATTENTION, text
    assert said in resumed.stderr.replace("\n", " "), text
    assert "  host2: its drain found no app slot running: not started by this run" in text, text
    assert {c: docker_says(c) for c in slots} == down, text  # left as it was: down
    assert fleet.serving("host3")[0] == 200, text  # drained, started again by the resume
