"""The kill matrix: a rollback interrupted anywhere never makes an outage worse, and the next
`runbook rollback` finishes it. Against the real drill stack, through the real CLI.

Each cell: v2 on green (stopped) and v3 on blue (live), so the rollback goes v3 -> v2.
`runbook rollback` runs with a drill fault (runbook/faults.py) that sends the process a signal
at one point; meanwhile a client polls through Caddy every 10 ms. Then `runbook status` and one
more `runbook rollback`. For every cell:
- no request fails (one retry of an idempotent GET on a reset connection counts as served);
- once v2 has been served (the commit point), v3 is never served again;
- status names the slot the proxy really answers from;
- the rerun converges: v2 on green, recorded once (rollback_count 1), blue stopped, no
  intent, no lock, no temp file left; no hand edit anywhere.

`make test` runs a sample of 10 cells (SAMPLE: every point once, every signal); the nightly
drill (RUNBOOK_KILL_MATRIX=full) runs all 27: every point with every signal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from runbook import caddy, deploy, docker, faults, health, recording, slots, traffic
from runbook import environment as envmod
from runbook import intent as intents
from runbook import kept_state as kept
from runbook import state as states
from runbook.drill import http as drill_http
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot, command_arg
from runbook.errors import ExitCode, RunbookError
from runbook.plan import Step, StepContext
from runbook.times import parse_utc
from tests.drill_checks import (
    Poller,
    closed_port,
    go_cli_rollback,
    go_cli_takes_and_releases_the_lock,
    wait_stopped,
)
from tests.matrix import sample

pytestmark = pytest.mark.docker
V2, V3 = VERSIONS["v2"], VERSIONS["v3"]

# Step boundaries and the points inside the switch and the state write, in run order.
POINTS = [
    "before:start-slot",  # after the lock, the plan and the intent
    "before:health-gate",  # the standby was started
    "before:switch",  # the standby passed the gate
    "switch.after-write",  # the Caddyfile on disk points at green, Caddy still runs blue
    "switch.after-reload",  # Caddy runs green, not yet verified
    "switch.after-verify",  # the commit point
    "state.before-rename",  # the new state sits in a temp file
    "before:stop-old-slot",  # the state says v2 on green
    "after:stop-old-slot",  # all done but the intent and the lock
]
SIGNALS = ["SIGKILL", "SIGINT", "SIGTERM"]
# make test's sample: every point once, every signal at least three times, and each signal
# where its path differs most: SIGKILL (nothing runs after it) at the step boundaries, the
# commit point and inside the state write; SIGINT/SIGTERM (handled) in an undoable wait, inside
# the switch before its verification (held, then undone) and after the commit (nothing undone).
SAMPLE = [
    ("before:start-slot", "SIGKILL"),
    ("before:health-gate", "SIGINT"),
    ("before:switch", "SIGKILL"),
    ("switch.after-write", "SIGTERM"),
    ("switch.after-reload", "SIGKILL"),
    ("switch.after-reload", "SIGINT"),
    ("switch.after-verify", "SIGKILL"),
    ("state.before-rename", "SIGKILL"),
    ("before:stop-old-slot", "SIGTERM"),
    ("after:stop-old-slot", "SIGKILL"),
]
FULL = [(p, s) for p in POINTS for s in SIGNALS]
CELLS = sample(FULL, SAMPLE)
# A signal inside the switch is held until the switch is verified or undone; it undoes a
# switch not yet verified. From the verification on (the commit point) nothing is undone.
COMMITTED = set(POINTS[POINTS.index("switch.after-verify"):])


def cli(env: Environment, *args: str, fault: str | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert env.source is not None
    extra = {faults.VARIABLE: fault} if fault else {}
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE} | extra
    return subprocess.run([sys.executable, "-m", "runbook.cli", *args, str(env.source)],
                          capture_output=True, text=True, timeout=timeout, env=environ,
                          stdin=subprocess.DEVNULL, check=False)


def through_proxy(env: Environment) -> tuple[str | None, str | None]:
    with drill_http.client(timeout=10) as client:  # a loaded machine's Caddy may be slow
        response = client.get(f"{env.caddy.proxy_url}/version", headers={"Connection": "close"})
    return response.headers.get("X-Togather-Slot"), response.json().get("version")


def commit_time(env: Environment) -> float:
    """When a rollback's journal says the commit point was reached (the earliest saying so)."""
    times = []
    for log in env.log_dir.glob("*.log"):
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry["message"].startswith("commit point reached") \
                    and entry["run_id"].startswith("rbk"):  # not the arranging deploys
                when = datetime.strptime(entry["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
                times.append(when.replace(tzinfo=UTC).timestamp())
    assert times, "no run journaled its commit point"
    return min(times)


def leftovers(env: Environment) -> list[str]:
    found = [p.name for p in env.state_file.parent.iterdir() if p.name.endswith(".tmp")]
    found += [p.name for p in env.caddy.caddyfile.parent.iterdir() if p.name.endswith(".tmp")]
    return found


@pytest.fixture(scope="module")
def stack(drill_stack: DrillStack) -> Iterator[DrillStack]:
    yield drill_stack


def arrange(stack: DrillStack) -> Environment:
    """v3 serving from blue, v2 the previous deployment, stopped on green (the scene v1, v2,
    v3 deployed leave, arranged and proved by DrillStack.arrange)."""
    stack.arrange(scenes.PREVIOUS)
    assert through_proxy(stack.env) == ("blue", V3.tag)
    return stack.env


@pytest.mark.parametrize(("point", "signame"), CELLS, ids=[f"{p}-{s}" for p, s in CELLS])
def test_an_interrupted_rollback_never_makes_it_worse_and_the_rerun_finishes_it(
        stack: DrillStack, point: str, signame: str) -> None:
    env = arrange(stack)
    with Poller(env) as user:
        first = cli(env, "rollback", "--yes", fault=f"{point}:{signame}")
        status = cli(env, "status", "--format", "json")
        serving = through_proxy(env)
        # on-call types the command again only when it did not say it succeeded (a signal
        # after the last step changes nothing: that run is complete, exit 0)
        second = (cli(env, "rollback", "--yes") if first.returncode != 0
                  else subprocess.CompletedProcess([], 0, "", ""))
        time.sleep(0.2)
    # 1. how the interrupted run ended, as documented
    if signame == "SIGKILL":
        assert first.returncode == -9, first.stderr
    elif point == "after:stop-old-slot":
        assert first.returncode == 0, first.stderr  # nothing was left to do
    elif point in COMMITTED:
        assert first.returncode == 6, first.stderr
        assert "TOOK EFFECT" in first.stderr
    else:
        assert first.returncode == 1, first.stderr
        # inside the switch, once the Caddyfile was written: undone, never "nothing took
        # effect" (Caddy may have served from green for a moment before the undo)
        said = ("the switch was undone" if point.startswith("switch.")
                else "nothing took effect")
        assert said in first.stderr, first.stderr
    assert "Traceback" not in first.stderr + second.stderr
    # 2. status names the slot that really serves
    data = json.loads(status.stdout)
    assert data["traffic"]["slot"] == serving[0], (data["traffic"], serving)
    if signame == "SIGKILL" and point != "after:stop-old-slot":
        assert data["problems"], "a killed run left work: status must say so"
    # 3. the rerun converges on the intended end state, recording the rollback once
    assert second.returncode == 0, second.stdout + second.stderr
    assert through_proxy(env) == ("green", V2.tag)
    st = states.read_state(env.state_file)
    assert st.current is not None and st.previous is not None
    assert (st.current.version, str(st.current.active_slot), st.current.status) == (
        V2.tag, "green", "active")
    assert st.current.rollback_count == 1
    assert (st.previous.version, st.previous.status) == (V3.tag, "rolled_back")
    blue = docker.inspect(env.slot("blue").container)
    if stack.has("h2c") and blue.running:
        # an h2c Caddy: a rerun that finished a switch it did not watch cannot tell the user's
        # kept-alive connection from one the old config holds over h2c; it leaves the old slot
        # running, says so, and records it (tests/test_h2c.py)
        assert "left running" in second.stderr, second.stderr
        assert slots.held_record(env, Slot.BLUE, blue) is not None
    else:
        assert not blue.running
    assert blue.exists
    assert not intents.path(env).exists()
    assert not env.lock_path.exists()
    assert leftovers(env) == []
    # 4. users: no failed request, and v3 never again once v2 was served
    assert user.failures == [], user.failures[:5]
    committed = commit_time(env)
    after = [version for when, _, version in user.seen if when > committed]
    assert after and set(after) == {V2.tag}, "the version rolled back from was served again"


def test_a_full_disk_after_the_switch_leaves_traffic_moved_and_says_so(
        stack: DrillStack) -> None:
    """The disk fills up right after the commit (simulated with a file-size limit on the
    process, which even root cannot write past): the rollback took effect and says so in one
    line with exit 6, nothing is undone, and the rerun records it once there is room."""
    env = arrange(stack)
    with Poller(env) as user:
        first = subprocess.Popen(
            [sys.executable, "-m", "runbook.cli", "rollback", "--yes", str(env.source)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL,
            env=os.environ | {faults.VARIABLE: "switch.after-verify:SIGSTOP"})
        try:
            wait_stopped(first.pid)
            resource.prlimit(first.pid, resource.RLIMIT_FSIZE, (512, 512))
            os.kill(first.pid, signal.SIGCONT)
            _, err = first.communicate(timeout=120)
        finally:
            first.kill()
        stuck = states.read_state(env.state_file)
        second = cli(env, "rollback", "--yes")
    assert first.returncode == 6, err
    assert "TOOK EFFECT" in err and "Record the rollback" in err
    assert stuck.current is not None and stuck.current.version == V3.tag  # not recorded yet
    assert docker.inspect(env.slot("blue").container).exists
    assert second.returncode == 0, second.stderr
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.version == V2.tag
    assert st.current.rollback_count == 1
    assert through_proxy(env) == ("green", V2.tag)
    assert user.failures == []


def test_a_closed_terminal_never_aborts_the_run(stack: DrillStack) -> None:
    """stdout and stderr closed under the run (the ssh session dropped): it still completes,
    and the journal records success."""
    env = arrange(stack)
    read_out, write_out = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "runbook.cli", "rollback", "--yes", str(env.source)],
        stdout=write_out, stderr=write_out, stdin=subprocess.DEVNULL)
    os.close(write_out)
    os.close(read_out)  # nobody reads: every write of the run hits a closed pipe
    proc.wait(timeout=120)
    assert through_proxy(env) == ("green", V2.tag)
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.version == V2.tag
    records = [json.loads(p.read_text()) for p in env.runs_dir.glob("rbk_*.json")]
    assert [r["outcome"] for r in records] == ["success"]
    assert not intents.path(env).exists() and not env.lock_path.exists()
    # the exit code is the run's outcome, never "failed safely" for output nobody could read
    assert proc.returncode == 0


def test_a_closed_stdout_still_says_the_rollback_took_effect_with_exit_6(
        stack: DrillStack) -> None:
    """`--format json` with stdout gone (`| head -0`) and the run stopped after the commit: the
    JSON cannot be written, yet stderr says TOOK EFFECT and how to finish, and the exit code is
    6, as the journal records."""
    env = arrange(stack)
    read_out, write_out = os.pipe()
    os.close(read_out)  # stdout's reader already gone
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    environ[faults.VARIABLE] = "switch.after-verify:SIGTERM"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runbook.cli", "rollback", "--yes", "--format", "json",
         str(env.source)], stdout=write_out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        text=True, env=environ)
    os.close(write_out)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == int(ExitCode.TOOK_EFFECT), err
    assert "TOOK EFFECT" in err and f"runbook rollback {command_arg(env)}" in err, err
    records = [json.loads(p.read_text()) for p in env.runs_dir.glob("rbk_*.json")]
    assert [(r["outcome"], r["exit_code"]) for r in records] == [("took effect", 6)]
    assert through_proxy(env) == ("green", V2.tag)


def test_a_stale_takeover_is_said_on_the_terminal_in_the_journal_and_in_status(
        stack: DrillStack) -> None:
    env = arrange(stack)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    env.lock_path.mkdir()
    (env.lock_path / "locked_at").write_text(f"{int(time.time())}\n")
    (env.lock_path / "holder.json").write_text(json.dumps({
        "lock_id": "lock_crashed", "locked_by": "alice@host", "pid": int(dead.stdout),
        "hostname": os.uname().nodename, "reason": "rollback"}))
    run = cli(env, "rollback", "--yes")
    assert run.returncode == 0, run.stderr
    assert "took over a stale deploy lock held by alice@host" in run.stderr
    journal = "".join(p.read_text() for p in env.log_dir.glob("*.log"))
    assert "took over a stale deploy lock held by alice@host" in journal
    status = cli(env, "status")
    assert "took over a stale deploy lock held by alice@host" in status.stdout


def test_a_run_killed_holding_the_lock_whose_copy_the_go_cli_stripped_is_finished(
        stack: DrillStack) -> None:
    """Found by review: a rollback SIGKILLed holding the lock, then the Go CLI's rewrite of
    the state file (its lock struct: no lock_id, pid, hostname). The next run took that copy
    for the Go CLI's live lock and refused for up to 30 minutes; status said the Go CLI held
    it. It is the killed run's own copy: status says so, the next run takes it over and
    finishes the rollback, with no hand edit."""
    env = arrange(stack)
    first = cli(env, "rollback", "--yes", fault="before:start-slot:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    doc = json.loads(env.state_file.read_text())
    assert doc["lock"]["locked"] is True and doc["lock"]["lock_id"], doc["lock"]
    doc["lock"] = {k: doc["lock"][k] for k in ("locked", "locked_at", "locked_by", "reason",
                                              "expires_at") if k in doc["lock"]}
    env.state_file.write_text(json.dumps(doc, indent=2))  # the Go CLI's rewrite
    status = cli(env, "status")
    assert "[stale]" in status.stdout and "its copy" in status.stdout, status.stdout
    again = cli(env, "rollback", "--yes")
    assert again.returncode == 0, again.stderr
    assert "took over a stale deploy lock" in again.stderr, again.stderr
    assert through_proxy(env) == ("green", V2.tag)
    assert not env.lock_path.exists()
    assert states.read_state(env.state_file).lock == {"locked": False}


@pytest.mark.parametrize("older_record", [False, True], ids=["record", "older-record"])
def test_a_killed_rollback_finished_after_the_go_clis_rollback_never_rolls_forward(
        stack: DrillStack, older_record: bool) -> None:
    """Found by review (HIGH): v2 then v3 deployed by the runbook, a rollback to v2 killed
    once Caddy served green, then the Go CLI's `rollback` (it swaps current and previous,
    rewriting the file through its structs: every id and `status` dropped). The finish
    found its target by id only: recorded "as a switch", "already recorded", v3 left
    unmarked, status found no problem, and the next `runbook rollback` put v3 back in front
    of users, exit 0. The finish knows from its own record that it rolled back from v3 to
    v2: it records that (v3 `rolled_back`, v2 carrying the rollback's Go keys), and the
    next rollback is refused (exit 4, naming --to). `older_record`: the killed run's record
    as the version before this one wrote it (no content keys: found by version). The
    oracle: the proxy's answers (a user polling throughout), the file's own JSON."""
    stack.reset()  # v1 serving from blue
    env = stack.env
    for version in (V2, V3):
        done = cli(env, "deploy", "--version", version.tag, "--yes", timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("blue", V3.tag)
    with Poller(env) as user:
        killed = cli(env, "rollback", "--yes", fault="switch.after-reload:SIGKILL")
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert through_proxy(env) == ("green", V2.tag)
        moved_at = time.time()
        if older_record:
            kept_intent = json.loads(intents.path(env).read_text())
            for key in ("target_key", "from_key"):
                kept_intent["record"].pop(key, None)
            intents.path(env).write_text(json.dumps(kept_intent))
        go_cli_rollback(env.state_file)
        doc = json.loads(env.state_file.read_text())  # the premise: the Go CLI's rewrite
        assert doc["current_deployment"]["version"] == V2.tag, doc
        assert doc["previous_deployment"]["version"] == V3.tag, doc
        assert not any("id" in d or "status" in d for d in (doc["current_deployment"],
                                                            doc["previous_deployment"])), doc
        unfinished = cli(env, "status")
        assert "unfinished" in unfinished.stdout + unfinished.stderr, unfinished.stdout
        finished = cli(env, "rollback", "--yes")
        said = finished.stdout + finished.stderr
        assert finished.returncode == 0, said
        assert through_proxy(env) == ("green", V2.tag)
        doc = json.loads(env.state_file.read_text())
        cur, prev = doc["current_deployment"], doc["previous_deployment"]
        assert (cur["version"], cur.get("active_slot", cur.get("slot")), cur.get("status")) == (
            V2.tag, "green", "active"), doc
        assert cur["rollback"] is True and str(cur["rollback_id"]).startswith("rbk_"), doc
        assert (prev["version"], prev.get("status")) == (V3.tag, "rolled_back"), doc
        status = cli(env, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        previous = [line for line in status.stdout.splitlines()
                    if line.strip().startswith("previous")]
        assert len(previous) == 1 and V3.tag in previous[0], status.stdout
        assert "rolled_back" in previous[0] or "rolled back from" in previous[0], status.stdout
        written = env.state_file.read_bytes()
        again = cli(env, "rollback", "--yes")
        said = again.stdout + again.stderr
        assert again.returncode == 4, said
        assert f"--to {V3.tag}" in said, said
        assert through_proxy(env) == ("green", V2.tag)
        assert env.state_file.read_bytes() == written
        time.sleep(0.2)
    assert not user.failures, user.failures
    assert not [s for s in user.seen if s[0] >= moved_at and s[2] == V3.tag], user.seen[-5:]


def test_a_switch_records_its_new_deployment_under_the_id_its_log_lines_carry(
        stack: DrillStack) -> None:
    """Found by review: a switch to a version the state file names neither current nor
    previous writes a new deployment record, whose id none of the switch's log lines (nor
    its lock) carried: the journal and the state file could not be joined."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    before = states.read_state(env.state_file, environment=env.name)
    assert before.current is not None
    # v2's records gone (another tool's rewrite): the switch to it writes a new record
    states.write_state(env.state_file, before.with_(previous=None, history=(before.current,)))
    done = cli(env, "switch", "--slot", "green", "--yes")
    assert done.returncode == 0, done.stderr
    current = states.read_state(env.state_file).current
    assert current is not None and current.version == V2.tag and current.active_slot == "green"
    assert current.id != before.current.id
    lines = [json.loads(line) for log in env.log_dir.glob("*.log")
             for line in log.read_text().splitlines()]
    run = [e["run_id"] for e in lines if e["message"].startswith("switch finished")][-1]
    ours = [e for e in lines if e["run_id"] == run]
    assert ours and {e["deployment_id"] for e in ours} == {current.id}, (current.id, ours[:2])


def test_a_switch_finished_by_a_later_run_records_the_id_of_the_run_that_moved_traffic(
        stack: DrillStack) -> None:
    """Found by review: killed after its commit, a switch was finished by the next run, and
    the new record took the finishing run's id while the log lines of the run that moved
    traffic carried its own: the two could not be joined."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    before = states.read_state(env.state_file, environment=env.name)
    assert before.current is not None
    states.write_state(env.state_file, before.with_(previous=None, history=(before.current,)))
    killed = cli(env, "switch", "--slot", "green", "--yes", fault="switch.after-verify:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    lines = [json.loads(line) for log in env.log_dir.glob("*.log")
             for line in log.read_text().splitlines()]
    moved = {e["run_id"] for e in lines if e["message"].startswith("switch started")}
    assert len(moved) == 1, moved
    finished = cli(env, "switch", "--slot", "green", "--yes")
    assert finished.returncode == 0, finished.stderr
    current = states.read_state(env.state_file).current
    assert current is not None and current.version == V2.tag and current.active_slot == "green"
    assert {current.id} == moved, (current.id, moved)


def test_unlock_force_never_removes_a_live_holders_lock(stack: DrillStack) -> None:
    """Even expired: the holder's process (known by its start time too) still runs, so it is
    a hung run to stop, not a lock to delete under it."""
    from runbook import procs

    env = stack.env.with_(lock_stale_after=1)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        env.lock_path.mkdir()
        (env.lock_path / "locked_at").write_text(f"{int(time.time()) - 3600}\n")
        (env.lock_path / "holder.json").write_text(json.dumps({
            "lock_id": "lock_live", "locked_by": "bob@host", "pid": holder.pid,
            "hostname": os.uname().nodename, "reason": "deploy",
            "pid_start": procs.pid_start(holder.pid)}))
        run = cli(stack.env, "unlock", "--force", "--yes")
        assert run.returncode == 3, run.stderr
        assert "not even with --force" in run.stderr and f"kill {holder.pid}" in run.stderr
        assert env.lock_path.is_dir()
    finally:
        holder.kill()
        holder.wait()
        import shutil

        shutil.rmtree(env.lock_path, ignore_errors=True)


def test_a_restore_killed_once_the_serving_slot_is_stopped_is_said_and_finished(
        stack: DrillStack) -> None:
    """`rollback --restore-snapshot` killed (-9) right after its maintenance stop of the
    serving slot: the rerun must not say the interrupted run "changed nothing users see"
    (users get errors), and it finishes the job: the database restored, v1 served."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2; v1 stopped on blue
    env = stack.env
    assert through_proxy(env) == ("green", VERSIONS["v2"].tag)
    first = cli(env, "rollback", "--restore-snapshot", "--yes",
                fault="after:stop-app-slots:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert not docker.inspect(env.slot(Slot.GREEN).container).running
    # status says the interrupted run, never `docker start` of the slot it stopped (the app
    # on the database its restore is about to replace)
    said_first = json.loads(cli(env, "status", "--format", "json").stdout)["problems"]
    assert any("an interrupted run is unfinished" in p["problem"] for p in said_first)
    assert not [p for p in said_first if "docker start" in p["fix"]], said_first
    again = cli(env, "rollback", "--restore-snapshot", "--yes")
    said = again.stdout + again.stderr
    assert again.returncode == 0, said
    assert "left the serving slot green STOPPED" in said
    assert "changed nothing users see" not in said
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    assert intents.read(env) is None


@pytest.mark.parametrize(("point", "rerun"), [
    ("switch.after-reload", ("--restore-snapshot",)),  # as the kill left it: the same command
    ("before:state", ("--to", VERSIONS["v1"].tag)),  # the command status prints
])
def test_a_restore_finished_by_its_rerun_is_no_longer_called_unfinished(
        stack: DrillStack, point: str, rerun: tuple[str, ...]) -> None:
    """Found by a disk-full fuzz: `rollback --restore-snapshot` killed (-9) once its restore
    was verified and traffic moved, then finished by its rerun (exit 0), left its entry in
    the record of unfinished restores beside the state file: status said for good "a restore
    of the database was begun and not finished" (exit 1), and its fix, `runbook snapshot
    restore`, stopped the serving app and replayed the old snapshot over every write since.
    The finish ends the restore the killed run began and verified: status is clean.
    Found by review since: the killed run's own record still read as "killed during or after
    its restore", so the next restore named its safety snapshot (from before the FINISHED
    restore: following it loses every write since) as the data from before it, and every
    cleanup kept that snapshot and its target. The finish ends it there too."""
    from runbook.restore_records import unfinished_marker, unfinished_restores
    from runbook.snapshot_restore import kept_for_killed_restore

    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2; v1 stopped on blue
    env = stack.env
    first = cli(env, "rollback", "--restore-snapshot", "--yes", fault=f"{point}:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    killed = intents.read(env)
    assert killed is not None
    [entry] = unfinished_restores(env)
    assert entry["run_id"] == killed.run_id
    safety = Path(entry["safety_snapshot"]).name  # its pre-restore snapshot
    replayed = Path(entry["restore_target"]).name  # schema 1's, what v1 (serving after) runs on
    assert safety in kept_for_killed_restore(env)  # the oracle's own premise, before the finish
    again = cli(env, "rollback", *rerun, "--yes")
    said = again.stdout + again.stderr
    assert again.returncode == 0, said
    assert "finishing an interrupted run" in said, said
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    assert intents.read(env) is None
    status = cli(env, "status")
    assert "restore of the database was begun" not in status.stdout + status.stderr
    assert status.returncode == 0, status.stdout + status.stderr
    assert unfinished_restores(env) == [], unfinished_marker(env).read_text()
    # the next restore names no killed restore, nor that snapshot as the data from before it
    dry = subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", "restore",
                          str(env.source), replayed, "--dry-run"], capture_output=True,
                         text=True, timeout=180, stdin=subprocess.DEVNULL, check=False)
    said = dry.stdout + dry.stderr
    assert dry.returncode == 0, said
    assert "killed during or after" not in said, said
    assert killed.run_id not in said and safety not in said, said
    # and no cleanup keeps it (or what it replayed) for that restore: ordinary retention again
    assert not any(killed.run_id in why for why in kept_for_killed_restore(env).values()), \
        kept_for_killed_restore(env)


def test_a_restore_killed_before_its_check_stays_unfinished(stack: DrillStack) -> None:
    """The other side: killed (-9) after its replay and before its check, the restore is not
    known to have left the snapshot's data: its entry beside the state file stays, status
    says the run is unfinished, and so does the record every operator reads."""
    from runbook.restore_records import unfinished_restores

    stack.arrange(scenes.MIGRATED)
    env = stack.env
    first = cli(env, "rollback", "--restore-snapshot", "--yes",
                fault="before:verify-restore:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    killed = intents.read(env)
    assert killed is not None
    assert [r["run_id"] for r in unfinished_restores(env)] == [killed.run_id]
    status = cli(env, "status")
    assert status.returncode == 1, status.stdout + status.stderr
    assert "an interrupted run is unfinished" in status.stdout, status.stdout
    assert [r["run_id"] for r in unfinished_restores(env)] == [killed.run_id]


def test_a_ctrl_c_inside_a_step_that_cannot_stop_is_answered_at_once(
        stack: DrillStack) -> None:
    """Found by review: a signal that arrived inside a step that cannot stop half-way (the
    switch, a migration, a restore) was only recorded: on-call saw nothing for as long as
    the step ran, a second Ctrl-C too. It is answered on the terminal when it arrives."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    done = cli(env, "rollback", "--yes", fault="switch.after-write:SIGINT")
    assert done.returncode == 1, done.stderr  # before the commit: undone
    heard = [line for line in done.stderr.splitlines() if "SIGINT received while" in line]
    assert len(heard) == 1 and "Switch Caddy to the green slot" in heard[0], done.stderr
    said = done.stderr.index(heard[0])
    assert said < done.stderr.index("interrupted by SIGINT"), done.stderr  # before the end
    assert through_proxy(env) == ("blue", V3.tag)


def test_status_judges_a_committed_record_by_what_caddy_serves(stack: DrillStack) -> None:
    """Found by review: a record marked committed made `runbook status` say "it took effect:
    traffic is on green" and "`runbook rollback` finishes it (... stops the old slot)"
    whatever Caddy served: after a hand switch back to blue (the old slot would be the one
    serving) and when Caddy could not be read. The next run decides by what runs."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    first = cli(env, "rollback", "--yes", fault="switch.after-verify:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    record = intents.read(env)
    assert record is not None and record.phase is intents.Phase.COMMITTED
    back = caddy.rewrite(env.caddy.caddyfile.read_text(), env, Slot.BLUE)
    drill_http.post(f"{env.caddy.admin_url}/load", content=back,
                    headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()
    assert through_proxy(env) == ("blue", V3.tag)  # a colleague switched users back

    def interrupted_problem() -> dict[str, str]:
        out = cli(env, "status", "--format", "json")
        found = [p for p in json.loads(out.stdout)["problems"]
                 if p["check"] == "interrupted_run"]
        assert len(found) == 1, out.stdout
        return found[0]

    said = interrupted_problem()
    assert "took effect" not in said["problem"], said
    assert "does not serve green" in said["problem"] and "runs it again" in said["fix"], said
    stack.docker("stop", "-t", "2", stack.caddy_container)
    try:
        said = interrupted_problem()
    finally:
        stack.docker("start", stack.caddy_container)
        stack.wait_caddy()
    assert "took effect" not in said["problem"] and "unknown" in said["problem"], said


def test_status_after_a_rollback_killed_before_its_state_write_names_only_the_finish(
        stack: DrillStack) -> None:
    """Found by review: a rollback killed (-9) after its switch, before its state write. Beside
    the right problem (the interrupted run, and the command that finishes it), status said
    "state says blue is active" with a switch "to the right one" (blue undoes the rollback)
    and "someone changed the container outside the runbook" (the runbook's own run did).
    Only the interrupted run (and the lock it left) is said, and its fix, run as printed,
    leaves nothing to say. Oracle: the proxy says green serves v2."""
    import shlex

    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    first = cli(env, "rollback", "--yes", fault="before:state:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert through_proxy(env) == ("green", V2.tag)
    out = cli(env, "status", "--format", "json")
    problems = json.loads(out.stdout)["problems"]
    checks = [p["check"] for p in problems]
    assert "state_disagrees_with_caddy" not in checks and "image_differs" not in checks, \
        problems
    assert not [p for p in problems if "outside the runbook" in p["fix"]], problems
    [finish] = [p for p in problems if p["check"] == "interrupted_run"]
    [command] = re.findall(r"`runbook (rollback [^`]*)` finishes it", finish["fix"])
    assert command.split()[1] == str(env.source), command
    done = cli(env, *[a for a in shlex.split(command) if a != str(env.source)], "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("green", V2.tag)
    after = json.loads(cli(env, "status", "--format", "json").stdout)
    assert after["problems"] == [], after["problems"]


def test_the_switch_an_unfinishable_run_prescribes_repairs_it(stack: DrillStack) -> None:
    """Killed once Caddy serves the target, which then crashes: the next rollback cannot
    finish the run and names `runbook switch --slot blue`. That command must do it (not
    refuse with the same error, leaving only a hand edit of the intent record)."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    first = cli(env, "rollback", "--yes", fault="switch.after-reload:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert through_proxy(env) == ("green", V2.tag)
    subprocess.run(["docker", "kill", env.slot(Slot.GREEN).container], check=True,
                   capture_output=True)  # the target crashes
    blocked = cli(env, "rollback", "--yes")
    assert blocked.returncode == 4, blocked.stderr
    fix = f"runbook switch {command_arg(env)} --slot blue"
    assert "does not answer as" in blocked.stderr and fix in blocked.stderr
    interrupted = intents.read(env)
    assert interrupted is not None
    failed = cli(env, "switch", "--slot", "blue", "--yes", fault="before:switch:SIGINT")
    # Ctrl-C before the commit: undone; Caddy still points at the crashed green, so exit 5
    # and THE SERVICE IS DOWN, never exit 1's "traffic stayed on a healthy slot"
    assert failed.returncode == int(ExitCode.ATTENTION), failed.stderr
    assert "THE SERVICE IS DOWN: green" in failed.stderr, failed.stderr
    assert intents.read(env) == interrupted  # its record put back: the next run still knows
    repaired = cli(env, "switch", "--slot", "blue", "--yes")
    said = repaired.stdout + repaired.stderr
    assert repaired.returncode == 0, said
    assert "runbook: warning: repairing: an interrupted run moved traffic to green" in said
    assert through_proxy(env) == ("blue", V3.tag)
    assert intents.read(env) is None
    status = cli(env, "status", "--format", "json")
    assert "interrupted" not in status.stdout.lower(), status.stdout


def _killed_once_verified_with_the_file_behind(stack: DrillStack
                                               ) -> tuple[Environment, str, str]:
    """A rollback to green killed once verified (Caddy runs green), and the Caddyfile text
    an undo's write would leave (naming blue): (env, the file as written, that text)."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    first = cli(env, "rollback", "--yes", fault="switch.after-verify:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert through_proxy(env) == ("green", V2.tag)
    text = env.caddy.caddyfile.read_text()
    behind = text.replace(f"localhost:{env.slot(Slot.GREEN).port}",
                          f"localhost:{env.slot(Slot.BLUE).port}").replace(
        'X-Togather-Slot "green"', 'X-Togather-Slot "blue"')
    assert behind != text
    return env, text, behind


def test_finishing_a_run_makes_the_caddyfile_on_disk_name_the_slot_caddy_runs(
        stack: DrillStack) -> None:
    """Found by review: an undo that wrote the old Caddyfile back and could not reload it (or
    was killed between the two) leaves the file naming blue while Caddy runs green. The
    finish stopped blue and left the file so: the next Caddy restart or reload sent every
    user to a stopped container."""
    env, text, behind = _killed_once_verified_with_the_file_behind(stack)
    env.caddy.caddyfile.write_text(behind)  # what the undo's write left
    done = cli(env, "rollback", "--yes")
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    assert not docker.inspect(env.slot(Slot.BLUE).container).running
    on_disk = env.caddy.caddyfile.read_text()
    assert on_disk == text, on_disk
    # what a restart of Caddy would load: the file, serving green
    drill_http.post(f"{env.caddy.admin_url}/load", content=on_disk,
                    headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()
    assert through_proxy(env) == ("green", V2.tag)


def test_slot_markers_met_after_the_commit_say_it_took_effect_never_nothing_changed(
        stack: DrillStack) -> None:
    """Slot marker lines the switch cannot read are a precondition (exit 4, "nothing was
    changed") when planning. Met after the commit (a rollback killed once verified, its
    Caddyfile then given a comment naming both markers, its finish asked to make the file
    name the slot Caddy runs), the finish says what took effect (exit 6) and the marker line
    to fix, never "nothing was changed"; typed again once it is fixed, it finishes."""
    from tests.test_rollback import MARKERS_IN_A_COMMENT

    env, text, behind = _killed_once_verified_with_the_file_behind(stack)
    env.caddy.caddyfile.write_text(MARKERS_IN_A_COMMENT + behind)
    done = cli(env, "rollback", "--yes")
    said = done.stdout + done.stderr
    assert done.returncode == 6, said
    assert "TOOK EFFECT" in said and "line 1 holds both" in said, said
    assert "split line 1" in said, said
    assert "nothing was changed" not in said and "nothing changed" not in said, said
    assert through_proxy(env) == ("green", V2.tag)
    env.caddy.caddyfile.write_text(behind)  # line 1 fixed as said
    again = cli(env, "rollback", "--yes")
    assert again.returncode == 0, again.stdout + again.stderr
    assert env.caddy.caddyfile.read_text() == text
    assert not docker.inspect(env.slot(Slot.BLUE).container).running
    assert through_proxy(env) == ("green", V2.tag)


def test_a_run_started_under_nohup_outlives_the_hangup(stack: DrillStack) -> None:
    """Found by review: the runbook's SIGHUP handler replaced the SIG_IGN that `nohup`
    started it with, so a dropped ssh session undid a rollback meant to outlive it. Since
    found by review too: without nohup, the same hangup (the gate waiting) undid it, where
    the same drop without a pty (no SIGHUP) completed it. A hangup once the run executes
    its plan is journaled and the run goes on, nohup or not (tests/test_hangup.py on a real
    pty); under nohup it stays ignored."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    hung = cli(env, "rollback", "--yes", fault="before:health-gate:SIGHUP")
    assert hung.returncode == 0, hung.stderr
    assert through_proxy(env) == ("green", V2.tag)
    [log] = re.findall(r"Journal: (\S+)$", hung.stdout, re.MULTILINE)
    said = [json.loads(line)["message"] for line in Path(log).read_text().splitlines()]
    assert any(m.startswith("terminal closed (SIGHUP): the run goes on") for m in said), said
    env = arrange(stack)
    assert env.source is not None
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    nohup = subprocess.run(
        [sys.executable, "-m", "runbook.cli", "rollback", "--yes", str(env.source)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
        env=environ | {faults.VARIABLE: "before:health-gate:SIGHUP"},
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert nohup.returncode == 0, nohup.stderr
    assert through_proxy(env) == ("green", V2.tag)
    # Ctrl-C stays on-call's way to stop a run, even in a background job that inherited
    # SIGINT ignored (as a shell's `cmd &` does, and CI runs this suite so)
    env = arrange(stack)
    background = subprocess.run(
        [sys.executable, "-m", "runbook.cli", "rollback", "--yes", str(env.source)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
        env=environ | {faults.VARIABLE: "before:health-gate:SIGINT"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert background.returncode == 1 and "SIGINT" in background.stderr, background.stderr
    assert through_proxy(env) == ("blue", V3.tag)


def test_a_switch_back_after_a_killed_run_that_took_effect_switches_back(
        stack: DrillStack) -> None:
    """The review's case: killed after its commit (green serves v2, healthy), then on-call
    asks `runbook switch --slot blue`: the switch finished the interrupted run instead,
    which stopped blue, the slot asked for, and said done (exit 0)."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    first = cli(env, "rollback", "--yes", fault="switch.after-verify:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert through_proxy(env) == ("green", V2.tag)
    back = cli(env, "switch", "--slot", "blue", "--yes")
    said = back.stdout + back.stderr
    assert back.returncode == 0, said
    assert "runbook: warning: repairing: an interrupted run moved traffic to green" in said
    assert through_proxy(env) == ("blue", V3.tag)
    assert docker.inspect(env.slot(Slot.BLUE).container).running
    assert intents.read(env) is None
    status = cli(env, "status", "--format", "json")
    assert "interrupted" not in status.stdout.lower(), status.stdout


def test_a_rerun_of_a_deploy_killed_before_it_migrated_takes_a_new_snapshot(
        stack: DrillStack) -> None:
    """Found by review: a rerun of a killed deploy kept the killed run's pre-deploy snapshot
    whenever one existed, saying it was "taken before the interrupted run of this deploy
    migrated". Killed before any migration (the schema where it was), that snapshot, maybe a
    day old, became what a restore of this deploy would lose every write since to. Kept
    only when the schema moved since; here a new one is taken and holds the later write."""
    stack.reset()  # v1 serving from blue on schema 1
    env = stack.env
    first = cli(env, "deploy", "--version", V2.tag, "--yes",
                fault="before:start-slot:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    old = sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))
    assert len(old) == 1
    with stack.connect() as conn:
        conn.execute("INSERT INTO items (name) VALUES ('written-after-the-kill')")
    time.sleep(1.1)  # a new snapshot's name (to the second) differs from the first's
    dry = cli(env, "deploy", "--version", V2.tag, "--dry-run")
    assert "not reused" in dry.stdout and "nothing migrated since" in dry.stdout, dry.stdout
    again = cli(env, "deploy", "--version", V2.tag, "--yes")
    assert again.returncode == 0, again.stderr
    assert through_proxy(env) == ("green", V2.tag)
    new = [p for p in sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))
           if p not in old]
    assert len(new) == 1, new
    assert b"written-after-the-kill" in gzip.decompress(new[0].read_bytes())
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.snapshot_path == str(new[0])


def test_status_after_a_deploy_killed_between_write_and_reload_names_the_deploy(
        stack: DrillStack) -> None:
    """Found by review: killed between writing the Caddyfile and reloading Caddy, a deploy
    left the file naming green while Caddy ran blue; `runbook status` said `runbook rollback`
    finishes or redoes it. That rolls back to the previous (older) version instead. It names
    the interrupted deploy's own command now, and with Caddy's config unreadable, it no
    longer says traffic "did not move"."""
    from runbook import status

    stack.reset()  # v1 serving from blue
    env = stack.env
    first = cli(env, "deploy", "--version", V2.tag, "--yes",
                fault="switch.after-write:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    found = status.problems(status.collect(env))
    differs = [p for p in found if "the Caddyfile on disk points at green" in p.problem]
    assert len(differs) == 1, found
    assert f"if that run was killed, `runbook deploy {env.source} --version {V2.tag}` " \
        "redoes it" in differs[0].fix, differs[0].fix
    # blue (v1) answers 503 on the migrated schema: the switch that writes the file back
    # to it is refused there (exit 4), so it is not named (found by review)
    refused = cli(env, "switch", "--slot", "blue", "--dry-run")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert f"runbook switch {env.source} --slot blue" not in differs[0].fix, differs[0].fix
    assert ("if it failed and was undone (its journal says so), put the block between the "
            "markers back to blue") in differs[0].fix, differs[0].fix
    assert "runbook rollback" not in differs[0].fix
    blind = env.with_(caddy=dataclasses.replace(
        env.caddy, admin_url=f"http://127.0.0.1:{closed_port()}"))
    said = " | ".join(f"{p.problem} -> {p.fix}"
                      for p in status.problems(status.collect(blind)))
    assert "whether it moved traffic is unknown" in said, said
    assert "did not move" not in said, said
    again = cli(env, "deploy", "--version", V2.tag, "--yes")
    assert again.returncode == 0, again.stderr
    assert through_proxy(env) == ("green", V2.tag)


def deploy_finishes_as_the_same_deployment(env: Environment, pre_deploy: list[Path]) -> None:
    """`runbook deploy --version v2` again finishes the interrupted deployment: v2 serves,
    and its snapshot is the one from before its migrations, not a new "pre-deploy" one at the
    migrated schema (the guard, a restore and the cleanup would trust it)."""
    again = cli(env, "deploy", "--version", V2.tag, "--yes")
    assert again.returncode == 0, again.stderr
    assert through_proxy(env) == ("green", V2.tag)
    assert sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz")) == pre_deploy
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.snapshot_path == str(pre_deploy[0])


def test_a_rerun_stopped_before_its_first_change_keeps_a_migrated_deploys_record(
        stack: DrillStack) -> None:
    """Found by review: a deploy killed after its migrations (schema 1 -> 2), rerun, and the
    rerun stopped (Ctrl-C) before its first change: the rerun's record had replaced the
    killed run's and was cleared ("nothing took effect"), so nothing remembered the migrated
    schema, and the next deploy took a new "pre-deploy" snapshot at schema 2. The killed
    run's record is put back; the next run finishes the same deployment."""
    stack.reset()  # v1 serving from blue on schema 1
    env = stack.env
    first = cli(env, "deploy", "--version", V2.tag, "--yes", fault="after:migrate:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    killed = intents.read(env)
    assert killed is not None
    pre_deploy = sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))
    assert len(pre_deploy) == 1
    stopped = cli(env, "deploy", "--version", V2.tag, "--yes",
                  fault="before:start-slot:SIGINT")
    assert stopped.returncode == 1, stopped.stderr
    kept = intents.read(env)
    assert kept is not None and kept.run_id == killed.run_id, kept
    assert kept.record.get("deployment_id") == killed.record.get("deployment_id")
    deploy_finishes_as_the_same_deployment(env, pre_deploy)


def test_a_deploy_rerun_that_cannot_read_the_schema_never_guesses_about_its_snapshot(
        stack: DrillStack) -> None:
    """Found by review: a deploy killed after its snapshot, rerun while the schema could not
    be read: "unknown" was taken for "moved" and the killed run's snapshot kept as this
    deploy's without knowing whether its migrations ran. Refused (exit 4), nothing changed."""
    stack.reset()  # v1 serving from blue on schema 1
    env = stack.env
    first = cli(env, "deploy", "--version", V2.tag, "--yes", fault="after:migrate:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    with stack.connect() as conn:  # a row no reader can take for a version
        row = conn.execute("SELECT version FROM schema_migrations").fetchone()
        conn.execute("ALTER TABLE schema_migrations ALTER COLUMN version TYPE text")
        conn.execute("UPDATE schema_migrations SET version = 'unreadable'")
    try:
        before = env.state_file.read_bytes(), through_proxy(env)
        again = cli(env, "deploy", "--version", V2.tag, "--yes")
        after = env.state_file.read_bytes(), through_proxy(env)
    finally:
        with stack.connect() as conn:
            conn.execute("UPDATE schema_migrations SET version = %s", (str(row[0]),))
            conn.execute("ALTER TABLE schema_migrations ALTER COLUMN version TYPE bigint "
                         "USING version::bigint")
    assert again.returncode == 4, again.stdout + again.stderr
    assert "cannot be read now" in again.stderr, again.stderr
    assert after == before


def host_deploys_v3_to_green(env: Environment, version: str = "v3",
                             deployed_at: datetime | None = None) -> None:
    """What the host's own deploy script does: v3 (or `version`) onto green (compose),
    Caddy switched to it, its deploy recorded in the state file (`deployed_at`: the time
    its clock stamps, now by default)."""
    v = VERSIONS[version]
    slots.recreate(env, Slot.GREEN, v.tag)
    health.wait_healthy(env, Slot.GREEN, timeout=30)
    caddy.apply(env, caddy.rewrite(caddy.read(env), env, Slot.GREEN))
    before = states.read_state(env.state_file, environment=env.name)
    states.write_state(env.state_file, states.after_deploy(before, states.make_deployment(
        v.tag, v.git_commit, Slot.GREEN, status="active", deployed_by="deploy.sh@host",
        migration_version=v.schema, image=v.image, deployed_at=deployed_at)))
    assert through_proxy(env) == ("green", v.tag)


def stepped_back(intent: intents.Intent) -> datetime:
    """A deploy script's stamp from a wall clock stepped back 3 h since `intent`'s run
    began (an NTP correction, a VM restored): the machine's clock is never touched."""
    started = parse_utc(intent.started_at)
    assert started is not None
    return started - timedelta(hours=3)


def test_another_tools_deploy_stamped_by_a_clock_stepped_back_still_supersedes_the_record(
        stack: DrillStack) -> None:
    """Found by review: "another tool recorded a deployment since the interrupted run
    started" was judged by comparing the deploy script's `deployed_at` with the record's
    `started_at`, two wall-clock stamps from different runs. A deploy of v2 killed before
    its switch, then the host's deploy script put v3 on green (the same slot) with a clock
    stepped back 3 h: the record was taken for traffic moved by it, every command refused
    (green "does not answer as v2"), and the repair named was `switch --slot blue`,
    reverting the fresh deploy. Judged by the ids the state file held when the run began,
    the record is out of date whatever the clocks say."""
    stack.reset()  # v1 serving from blue
    env = stack.env
    first = cli(env, "deploy", "--version", V2.tag, "--yes", fault="before:switch:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    killed = intents.read(env)
    assert killed is not None and killed.target == Slot.GREEN
    host_deploys_v3_to_green(env, deployed_at=(at := stepped_back(killed)))
    theirs = states.read_state(env.state_file)
    assert theirs.current is not None and theirs.current.version == V3.tag
    assert theirs.current.deployed_at == at  # 3 h before the killed run began
    status = cli(env, "status")
    said = status.stdout + status.stderr
    assert "record is out of date" in said and "took effect" not in said, said
    assert "--slot blue" not in said, said
    planned = cli(env, "rollback", "--dry-run", "--force")  # v1 runs on schema 1, v2 at 2
    said = planned.stdout + planned.stderr
    assert planned.returncode == 0, said
    assert "does not answer as" not in said and "--slot blue" not in said, said
    assert through_proxy(env) == ("green", V3.tag)


def deploy_killed_after_its_migrations(
        stack: DrillStack) -> tuple[Environment, intents.Intent, list[Path]]:
    """v1 serving from blue on schema 1, then `runbook deploy --version v2` killed (-9) after
    its migrations: the environment, the killed run's record and its pre-deploy snapshot
    (taken at schema 1)."""
    stack.reset()
    env = stack.env
    first = cli(env, "deploy", "--version", V2.tag, "--yes", fault="after:migrate:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    killed = intents.read(env)
    assert killed is not None and killed.target == Slot.GREEN
    pre_deploy = sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))
    assert len(pre_deploy) == 1
    return env, killed, pre_deploy


def deploy_reruns_as_a_new_deployment(env: Environment, killed: intents.Intent,
                                      pre_deploy: list[Path], slot: Slot) -> None:
    """`runbook deploy --version v2` after another tool's deployment since the killed one:
    v2 serves from `slot`, a new deployment (not the killed run's id) with a snapshot taken
    now, never the killed run's from before the other deployment."""
    again = cli(env, "deploy", "--version", V2.tag, "--yes")
    assert again.returncode == 0, again.stdout + again.stderr
    assert through_proxy(env) == (str(slot), V2.tag)
    taken = [p for p in sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))
             if p not in pre_deploy]
    assert len(taken) == 1, "no snapshot was taken before this deploy"
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.version == V2.tag
    assert st.current.id != killed.record["deployment_id"]
    assert st.current.snapshot_path == str(taken[0]), st.current.snapshot_path


def test_a_deploy_rerun_after_another_tools_deploy_and_rollback_with_a_clock_stepped_back(
        stack: DrillStack) -> None:
    """Found by review: a deploy of v2 killed after its migrations (its snapshot at schema
    1); then the host's tooling deployed v3 to green and rolled back to v1 on blue, its
    clock stepped back 3 h. Judged by `deployed_at` nothing was recorded since, and the
    rerun took itself for the killed run: its deployment id and its snapshot from before
    another deployment, recorded as the data from before this one. Judged by the ids the
    state file held when the killed run began, v3's record is new: a new deployment, a
    new snapshot."""
    env, killed, pre_deploy = deploy_killed_after_its_migrations(stack)
    host_deploys_v3_to_green(env, deployed_at=stepped_back(killed))
    # its rollback: Caddy back to blue (v1 still runs there), the file's records swapped
    caddy.apply(env, caddy.rewrite(caddy.read(env), env, Slot.BLUE))
    theirs = states.read_state(env.state_file, environment=env.name)
    states.write_state(env.state_file, states.after_rollback(theirs, slot=Slot.BLUE))
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    deploy_reruns_as_a_new_deployment(env, killed, pre_deploy, Slot.GREEN)


def test_a_deploy_rerun_after_another_tools_deploy_took_its_slot_takes_a_new_snapshot(
        stack: DrillStack) -> None:
    """Found by review: a deploy of v2 killed after its migrations (its pre-deploy snapshot
    at schema 1); then the host's deploy script put v3 on that same slot and switched to it.
    `runbook deploy --version v2` (now onto the other slot) took itself for the killed run:
    it reused that run's deployment id and its schema-1 snapshot, took none, and recorded a
    snapshot from before v3 as the data from before this deploy; a restore of it loses v3's
    schema and every write since. Only the same run on the same slots is that deployment."""
    env, killed, pre_deploy = deploy_killed_after_its_migrations(stack)
    host_deploys_v3_to_green(env)
    deploy_reruns_as_a_new_deployment(env, killed, pre_deploy, Slot.BLUE)


def test_a_deploy_rerun_after_the_go_cli_rewrote_the_state_file_is_the_same_deployment(
        stack: DrillStack) -> None:
    """Found by review: a deploy of v2 killed after its migrations (its pre-deploy snapshot
    at schema 1), then the Go CLI took the state file's lock and released it, changing no
    deployment: its struct has no `id`, so every `dep_...` id was gone and the reader
    derived others, none among the ids the killed run's record kept. The rerun took v1 for
    a deployment recorded since: a new deployment id and a new "pre-deploy" snapshot at the
    migrated schema 2 (what the guard, a restore and the cleanup trust). The record also
    keeps each deployment's content: the rerun is the killed run's deployment, with its
    snapshot."""
    env, killed, pre_deploy = deploy_killed_after_its_migrations(stack)
    go_cli_takes_and_releases_the_lock(env.state_file)
    rewritten = json.loads(env.state_file.read_text())
    assert "id" not in rewritten["current_deployment"], rewritten
    assert rewritten["lock"]["locked"] is False
    deploy_finishes_as_the_same_deployment(env, pre_deploy)
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.id == killed.record["deployment_id"]


def test_ctrl_c_during_migrations_waits_for_them_then_carries_on_off_the_build_they_broke(
        stack: DrillStack) -> None:
    """A signal while the new version migrates is acted on once the migrations end (never a
    migration cut in half). Found by a kill fuzz: acted on there, the undo stopped v2 (the
    build that fits schema 2) and left users on v1, whose /health fails on schema 2, with
    "v1 serves on schema 2" and nothing of its failing. With the serving slot failing its
    health check on the migrated schema, the run carries on until traffic has moved, then
    stops (exit 6); the same command afterwards finishes the deploy."""
    stack.reset()  # v1 serving from blue on schema 1
    env = stack.env
    first = cli(env, "deploy", "--version", V2.tag, "--yes",
                fault="migrate.before-exec:SIGINT")
    with stack.connect() as conn:
        assert conn.execute("SELECT version, dirty FROM schema_migrations").fetchone() == (2,
                                                                                          False)
    # v1 on schema 2 fails its own health check: the premise, asked of the app itself
    blue = drill_http.get(f"{env.slot(Slot.BLUE).base_url}/health", timeout=5)
    assert blue.status_code == 503 and "ahead of this build" in blue.text, blue.text
    assert first.returncode == 6, first.stderr
    assert "on which v" not in first.stderr  # the version is the tag, never a drill name
    assert (f"the migrations moved the database schema to 2, on which {VERSIONS['v1'].tag} on "
            "the blue slot fails its health check") in first.stderr, first.stderr
    assert "carries on until traffic has moved" in first.stderr, first.stderr
    assert through_proxy(env) == ("green", V2.tag)
    pre_deploy = sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))
    assert len(pre_deploy) == 1  # taken at schema 1, before the migrations
    deploy_finishes_as_the_same_deployment(env, pre_deploy)
    meta = json.loads(pre_deploy[0].with_name(
        pre_deploy[0].name.removesuffix(".sql.gz") + ".meta.json").read_text())
    st = states.read_state(env.state_file)
    assert st.current is not None
    assert meta["deployment_id"] == st.current.id and meta["migration_version"] == 1, meta


def self_migrating_deploy_held_at_its_gate(env: Environment,
                                           tmp_path: Path) -> subprocess.Popen[str]:
    """`runbook deploy` of a build that never turns healthy, on a host with no
    migrate_command (the app migrates itself at start-up) and a 3 s gate, stopped (SIGSTOP)
    before its gate: the test then does what such an app's start-up would, and SIGCONTs."""
    toml = tmp_path / "self-migrating.toml"
    toml.write_text(envmod.to_toml(dataclasses.replace(
        env, migrate_command=(), health=dataclasses.replace(env.health, timeout=3.0))))
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    return subprocess.Popen(
        [sys.executable, "-m", "runbook.cli", "deploy", "--version", VERSIONS["unhealthy"].tag,
         "--yes", str(toml)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL, env=environ | {faults.VARIABLE: "before:health-gate:SIGSTOP"})


def test_an_app_that_migrates_itself_then_fails_its_gate_says_the_schema_changed(
        stack: DrillStack, tmp_path: Path) -> None:
    """No migrate_command (the app migrates when it starts): a failed gate was reported as
    "undone; traffic stays where it was" whatever the new version did to the schema. The
    drill app does not migrate itself, so the test does it while the run waits at its gate
    (the fault point), as such an app would at start-up."""
    stack.reset()  # v1 serving from blue on schema 1
    env = stack.env
    proc = self_migrating_deploy_held_at_its_gate(env, tmp_path)
    wait_stopped(proc.pid)
    with stack.connect() as conn:  # what the new version's own start-up migration does
        conn.execute("UPDATE schema_migrations SET version = 2")
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, err
    assert "failed health gate" in err and "was 1 before" in err and "is at 2" in err, err
    assert "nothing took effect" not in err
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)  # traffic never moved


def test_the_restore_of_a_failed_deploys_pre_deploy_snapshot_closes_its_record(
        stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: a deploy whose gate failed once its migrations had run (exit 5, the
    schema moved, its record kept) was still "an interrupted run is unfinished" after the
    documented restore of its pre-deploy snapshot, status naming `runbook deploy` to finish
    it, though nothing of that deploy was left. The restore of that very snapshot closes the
    record (its plan says so); the schema, the proxy and the record file are the oracle."""
    stack.reset()  # v1 serving from blue on schema 1
    env = stack.env
    toml = tmp_path / "short-gate.toml"
    toml.write_text(envmod.to_toml(dataclasses.replace(
        env, health=dataclasses.replace(env.health, timeout=3.0))))
    failed = subprocess.run(
        [sys.executable, "-m", "runbook.cli", "deploy", "--version",
         VERSIONS["unhealthy"].tag, "--yes", str(toml)], capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=180, check=False)
    assert failed.returncode == 5, failed.stderr
    pending = intents.read(env)
    assert pending is not None and pending.action == "deploy", failed.stderr
    with stack.connect() as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchone()[0] == 2
    before = json.loads(cli(env, "status", "--format", "json").stdout)
    assert [p for p in before["problems"] if p["check"] == "interrupted_run"], before
    from runbook.snapshots.store import list_snapshots

    # its pre-deploy snapshot, as its sidecar names the deployment (what its message names)
    [snap] = [s for s in list_snapshots(env) if s.deployment_id == pending.deployment_id]
    taken = str(snap.path)
    assert taken in failed.stderr, failed.stderr
    planned = subprocess.run(
        [sys.executable, "-m", "runbook.cli", "snapshot", "restore", str(toml), Path(taken).name,
         "--dry-run"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=180,
        check=False)
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "Close the interrupted deploy's record" in planned.stdout, planned.stdout
    done = subprocess.run(
        [sys.executable, "-m", "runbook.cli", "snapshot", "restore", str(toml), Path(taken).name,
         "--yes"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
        check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is closed" in done.stdout + done.stderr, done.stdout + done.stderr
    with stack.connect() as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchone()[0] == 1
    assert intents.read(env) is None
    after = json.loads(cli(env, "status", "--format", "json").stdout)
    assert not [p for p in after["problems"] if p["check"] == "interrupted_run"], after
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)


def test_an_app_still_migrating_itself_when_its_gate_fails_is_left_running(
        stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: the undo of a failed deploy stopped the new container whatever it was
    doing. An app that migrates itself at start-up and is still at it when its gate gives up
    (golang-migrate's `dirty` set while a migration runs) was cut off half-way: the shared
    schema left dirty under the serving version, which then answers unhealthy. The container
    is left running, and the run says why and what to do (exit 5)."""
    stack.reset()  # v1 serving from blue on schema 1
    env = stack.env
    green = env.slot(Slot.GREEN).container
    proc = self_migrating_deploy_held_at_its_gate(env, tmp_path)
    migrating = stack.connect()  # golang-migrate's session: its advisory lock, held
    try:
        wait_stopped(proc.pid)
        migrating.execute("SELECT pg_advisory_lock(4242)")
        migrating.execute("UPDATE schema_migrations SET version = 2, dirty = true")
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 5, err
        assert docker.inspect(green).running, "the migrating container was stopped"
        assert f"{green} is left running" in err and "migration is under way" in err, err
        assert f"docker stop {green}" in err, err
        assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)  # traffic never moved
    finally:
        migrating.execute("UPDATE schema_migrations SET dirty = false")
        migrating.close()


def test_a_dirty_schema_no_migration_holds_does_not_keep_a_failed_container_running(
        stack: DrillStack, tmp_path: Path) -> None:
    """Found by review of the test above's fix: `dirty` stays set after a migration that
    failed (until `migrate force`), and the undo took that for one under way: the failed
    container was left running with "wait until the schema is not dirty", which never comes.
    With no session holding a migration's lock, the container is stopped as before."""
    stack.reset()  # v1 serving from blue on schema 1
    env = stack.env
    green = env.slot(Slot.GREEN).container
    proc = self_migrating_deploy_held_at_its_gate(env, tmp_path)
    try:
        wait_stopped(proc.pid)
        with stack.connect() as conn:  # a start-up migration that failed half-way
            conn.execute("UPDATE schema_migrations SET version = 2, dirty = true")
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 5, err  # the schema changed: said, as before
        assert not docker.inspect(green).running, err
        assert "left running" not in err, err
    finally:
        with stack.connect() as conn:
            conn.execute("UPDATE schema_migrations SET dirty = false")


def deploy_migrated_at_start_then_interrupted(stack: DrillStack, env_file: Path,
                                              step: str) -> tuple[int, str]:
    """`runbook deploy` of v2 stopped (SIGSTOP) before `step`, the schema moved to 2 meanwhile
    as the new version's own start-up migration would, then Ctrl-C (acted on at the next step
    boundary): (exit code, stderr)."""
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runbook.cli", "deploy", "--version", V2.tag, "--yes",
         str(env_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL, env=environ | {faults.VARIABLE: f"before:{step}:SIGSTOP"})
    wait_stopped(proc.pid)
    with stack.connect() as conn:
        conn.execute("UPDATE schema_migrations SET version = 2")
    proc.send_signal(signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_an_app_that_migrates_itself_then_is_interrupted_before_the_commit_says_so(
        stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: a self-migrating app's schema change was noticed only when its gate
    failed. Stopped any other way once it had started (here Ctrl-C, acted on before its gate;
    or a failed switch after a passed gate), the run said "nothing took effect", cleared the
    intent record, and the next deploy's "pre-deploy" snapshot was of the migrated schema.
    The test migrates while the run waits at its gate, as such an app would at start-up."""
    stack.reset()  # v1 serving from blue on schema 1
    env = stack.env
    toml = tmp_path / "self-migrating.toml"
    toml.write_text(envmod.to_toml(dataclasses.replace(env, migrate_command=())))
    code, err = deploy_migrated_at_start_then_interrupted(stack, toml, "health-gate")
    assert code == 5, err
    assert "was 1 before" in err and "is at 2" in err, err
    assert "nothing took effect" not in err
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)  # traffic never moved
    assert intents.read(env) is not None  # kept: the next run knows the schema moved


def test_an_image_that_migrates_on_start_beside_a_migrate_command_is_measured_from_the_snapshot(
        stack: DrillStack) -> None:
    """Found by review: with a migrate_command, the schema "before" was read at the migrate
    step, after the new container had started; an image that also migrates on start had
    moved it by then, so before == after and a later interruption said "nothing took
    effect". The schema at the pre-deploy snapshot is the baseline. The test migrates while
    the run waits before its migrate step, as such an image would at start-up."""
    stack.reset()  # v1 serving from blue on schema 1
    env = stack.env
    assert env.migrate_command and env.source is not None
    code, err = deploy_migrated_at_start_then_interrupted(stack, env.source, "migrate")
    assert code == 5, err
    assert "was 1 before" in err and "is at 2" in err, err
    assert "nothing took effect" not in err
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)  # traffic never moved
    assert intents.read(env) is not None


def deploy_whose_migrations_fail_halfway(stack: DrillStack) -> tuple[Environment,
                                                                      RunbookError]:
    """v1 serving from blue on schema 1, then a deploy of v2 whose migrate command exits 3
    after applying migration 2 (golang-migrate failing on a later file): exit 5, record kept.
    Returns the environment it ran with and its error."""
    stack.reset()
    half = dataclasses.replace(stack.env, migrate_command=(
        "sh", "-c", "python3 /app/server.py migrate up && exit 3"))
    with pytest.raises(RunbookError) as err:
        deploy.deploy(half, deploy.Options(version=V2.tag))
    assert err.value.exit_code == ExitCode.ATTENTION, err.value
    return half, err.value


def test_migrations_that_fail_after_changing_the_schema_say_so_and_keep_the_record(
        stack: DrillStack) -> None:
    """The review's case: a migrate command that exits non-zero after golang-migrate applied
    some files was reported as exit 4, "nothing changed", the intent record cleared, while
    the old version served on a changed schema."""
    half, err = deploy_whose_migrations_fail_halfway(stack)
    text = str(err)
    assert "migrations failed" in text and "was 1 before" in text and "is at 2" in text, text
    assert "nothing took effect" not in text and "pre-deploy snapshot" in (err.fix or "")
    assert intents.read(half) is not None  # kept: the next run sees what happened
    assert through_proxy(half) == ("blue", VERSIONS["v1"].tag)  # traffic never moved


def test_a_record_kept_on_purpose_outlives_the_next_runs_that_fail(stack: DrillStack) -> None:
    """Found by review: a deploy whose migrations moved the schema keeps its record (exit 5),
    so the next run knows. The next `runbook switch` or `deploy` (traffic where it was) wrote
    its own record over it without a word, and cleared that when it failed in turn before
    traffic moved: the migrated schema and its pre-deploy snapshot were forgotten."""
    half, _ = deploy_whose_migrations_fail_halfway(stack)
    kept = intents.read(half)
    assert kept is not None
    env = stack.env
    taken = [meta.name.removesuffix(".meta.json")
             for meta in env.database.snapshot_dir.glob("*.meta.json")
             if json.loads(meta.read_text()).get("deployment_id")
             == kept.record["deployment_id"]]
    assert len(taken) == 1, taken  # its pre-deploy snapshot
    for args, fault in ((("switch", "--slot", "green"), "before:switch:SIGINT"),
                        (("deploy", "--version", V3.tag), "before:start-slot:SIGINT")):
        failed = cli(env, *args, "--yes", fault=fault)
        said = failed.stdout + failed.stderr
        assert failed.returncode == 1, said  # Ctrl-C before the commit: undone
        assert f"an interrupted run stopped before traffic moved: deploy {kept.run_id}" in said
        assert f"its pre-deploy snapshot {env.database.snapshot_dir / taken[0]}" in said, said
        assert intents.read(env) == kept, args  # put back: the next run still knows
        assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    # found by review: killed (SIGKILL, power loss) before traffic moved, the replacing run
    # never put the kept record back; it keeps a copy, which the next run goes on from
    killed = cli(env, "switch", "--slot", "green", "--yes", fault="before:switch:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    on_disk = intents.read(env)
    assert on_disk is not None and on_disk.run_id != kept.run_id  # the switch's own record
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    planned = cli(env, "switch", "--slot", "green", "--dry-run")
    assert f"an interrupted run stopped before traffic moved: deploy {kept.run_id}" \
        in planned.stdout + planned.stderr, planned.stdout + planned.stderr
    status = cli(env, "status")
    assert f"an interrupted run is unfinished: deploy {kept.run_id}" in status.stdout


def test_a_rollback_after_a_kept_deploy_record_says_it_replaces_it(stack: DrillStack) -> None:
    """A deploy that stopped before traffic moved and kept its record (its schema moved):
    a rollback's plan said "an interrupted run changed nothing users see; continuing:
    deploy ...", though the rollback continues no deploy and its record will replace that
    one. It now says so, as a deploy's or a switch's plan does. The record is written as a
    deploy leaves it (runbook/intent.py's file)."""
    stack.arrange(scenes.PREVIOUS)  # v3 serving from blue, v2 stopped on green
    env = stack.env
    kept = intents.Intent(run_id="dep_kept", action="deploy", environment=env.name,
                          from_slot="blue", to_slot="green", from_version=V3.tag,
                          to_version=VERSIONS["v1"].tag,
                          record={"deployment_id": "dep_kept_deployment"})
    intents.write(env, kept)
    try:
        planned = cli(env, "rollback", "--dry-run")
    finally:
        intents.clear(env, kept.run_id)
    said = planned.stdout + planned.stderr
    assert planned.returncode == 0, said
    assert "an interrupted run stopped before traffic moved: deploy dep_kept" in said, said
    assert "this rollback replaces its record" in said, said
    assert "continuing" not in said, said


def half_applied_migration(version: int) -> tuple[str, ...]:
    """A migrate command doing what golang-migrate does with a file of two statements run
    outside a transaction that fails on its second: `version` marked dirty, the first
    statement (a new table) applied, the second an SQL error (exit 1)."""
    return ("python3", "-c", "import os, psycopg; "
            "c = psycopg.connect(os.environ['DATABASE_URL'], autocommit=True); "
            "c.execute('DELETE FROM schema_migrations'); "
            f"c.execute('INSERT INTO schema_migrations VALUES ({version}, true)'); "
            f"c.execute('CREATE TABLE half_{version} (id int)'); "
            "c.execute('SELECT 1/0')")


def _schema(stack: DrillStack) -> tuple[object, ...]:
    """(version, dirty) of schema_migrations, and the half-applied tables that exist."""
    with stack.connect() as conn:
        row = conn.execute("SELECT version, dirty FROM schema_migrations").fetchone()
        half = conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'half%' "
                            "ORDER BY 1").fetchall()
    return (*(row or ()), tuple(r[0] for r in half))


def deploy_left_dirty(stack: DrillStack, tmp_path: Path, version: int = 2, tag: str = V2.tag,
                      ) -> tuple[Environment, subprocess.CompletedProcess[str], Path]:
    """The stack as it is, then `runbook deploy --version TAG` whose migration `version` fails
    half-way (half_applied_migration): exit 5, traffic where it was, the schema dirty at
    `version`. Returns that deploy's environment (its own file), its result and its
    pre-deploy snapshot."""
    env = stack.env
    toml = tmp_path / "half-migration.toml"
    toml.write_text(envmod.to_toml(dataclasses.replace(
        env, migrate_command=half_applied_migration(version))))
    half = envmod.load(str(toml))
    taken = set(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))
    first = cli(half, "deploy", "--version", tag, "--yes")
    assert first.returncode == 5, first.stdout + first.stderr
    assert _schema(stack) == (version, True, (f"half_{version}",))
    pre_deploy = [p for p in env.database.snapshot_dir.glob("*_pre-deploy.sql.gz")
                  if p not in taken]
    assert len(pre_deploy) == 1, pre_deploy
    return half, first, pre_deploy[0]


def test_a_migration_that_fails_half_way_says_the_schema_is_left_dirty(
        stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: a migration that failed half-way was reported as "the database schema
    was 1 ... and is at 2 after the failed migrations: it may have changed", never saying
    it is dirty (golang-migrate runs nothing more on it, the serving version's migrations
    check fails on it), and the fix named `runbook snapshot restore ENV FILE` though the
    run knew the file. It says "dirty" and gives the exact command now."""
    stack.reset()  # v1 serving from blue on schema 1
    half, first, pre_deploy = deploy_left_dirty(stack, tmp_path)
    env = stack.env
    assert "is at 2 (dirty)" in first.stderr, first.stderr
    # named as that deploy was given its environment: its own file
    restore = f"`runbook snapshot restore {command_arg(half)} {pre_deploy}`"
    assert restore in first.stderr, first.stderr
    assert "FILE" not in first.stderr, first.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)


def test_a_deploy_rerun_on_a_schema_its_failed_migration_left_dirty_refuses_with_the_restore(
        stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: after a migration failed half-way (SQL error, no transaction: the
    schema dirty at 2, its first statement applied), the rerun, as `runbook status` prints
    it or the same command again, recreated the new slot and ran the migrations again on the
    dirty schema: the half-applied file re-applied ("relation already exists"), or
    golang-migrate refusing, exit 5 each time with no repair named. It refuses before any
    change now (exit 4), naming the exact restore of the failed deploy's pre-deploy
    snapshot, after which the same deploy finishes."""
    stack.reset()  # v1 serving from blue on schema 1
    half, _, pre_deploy = deploy_left_dirty(stack, tmp_path)
    env = stack.env
    green = env.slot(Slot.GREEN).container

    def facts() -> tuple[object, ...]:
        return (_schema(stack), stack.docker("inspect", "-f", "{{.Id}} {{.State.Status}}",
                                             green).stdout, env.state_file.read_bytes(),
                intents.read(env), sorted(env.database.snapshot_dir.iterdir()),
                through_proxy(env))

    before = facts()
    for rerun_env in (env, half):  # the command status prints, and the same one again
        again = cli(rerun_env, "deploy", "--version", V2.tag, "--yes")
        said = again.stdout + again.stderr
        assert again.returncode == 4, said
        assert "the database schema is dirty at version 2" in said, said
        assert f"`runbook snapshot restore {command_arg(rerun_env)} {pre_deploy}`" in said, said
        assert facts() == before  # nothing changed: no recreate, no migration, no snapshot
    restore = subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", "restore",
                              str(env.source), str(pre_deploy), "--yes"], capture_output=True,
                             text=True, timeout=180, stdin=subprocess.DEVNULL, check=False)
    assert restore.returncode == 0, restore.stdout + restore.stderr
    assert _schema(stack) == (1, False, ())
    done = cli(env, "deploy", "--version", V2.tag, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("green", V2.tag)
    assert pre_deploy.exists()  # the failed deploy's snapshot is kept


def test_status_names_a_schema_a_failed_migration_left_dirty_and_its_restore(
        stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: after a migration failed half-way, `runbook status` showed "schema 2
    (dirty)" but listed no problem for it, and its fix for the interrupted deploy was "runs
    it again", which re-runs migrations on the dirty schema. The dirty schema is a problem
    now, with the exact restore of that deploy's pre-deploy snapshot; the rerun comes after."""
    stack.reset()  # v1 serving from blue on schema 1
    _, _, pre_deploy = deploy_left_dirty(stack, tmp_path)
    env = stack.env
    status = cli(env, "status", "--format", "json")
    found = json.loads(status.stdout)["problems"]
    dirty = [p for p in found if p["check"] == "schema_dirty"]
    assert len(dirty) == 1, found
    assert "the database schema is dirty at version 2" in dirty[0]["problem"], dirty
    assert f"`runbook snapshot restore {env.source} {pre_deploy}`" in dirty[0]["fix"], dirty
    rerun = [p for p in found if p["check"] == "interrupted_run"]
    assert len(rerun) == 1 and "once the database schema is repaired" in rerun[0]["fix"], rerun


# migration 2 as v2 ships it, run golang-migrate's way (its advisory lock held, the schema
# dirty while it runs; nothing to do at 2), held before its SQL until /tmp/go exists in the
# container: a migration that runs for a while
HELD_MIGRATION = ("python3", "-c", "import os, sys, time, psycopg; "
                  "c = psycopg.connect(os.environ['DATABASE_URL'], autocommit=True); "
                  "c.execute('SELECT pg_advisory_lock(4242)'); "
                  "q = 'SELECT version, dirty FROM schema_migrations'; "
                  "c.execute(q).fetchone() == (2, False) and sys.exit(0); "
                  "c.execute('DELETE FROM schema_migrations'); "
                  "c.execute('INSERT INTO schema_migrations VALUES (2, true)'); "
                  "[time.sleep(0.1) for _ in iter(lambda: os.path.exists('/tmp/go'), True)]; "
                  "c.execute(open('/app/migrations/000002_create_orders.up.sql').read()); "
                  "c.execute('UPDATE schema_migrations SET dirty = false')")


def deploy_killed_mid_migration(stack: DrillStack, tmp_path: Path) -> tuple[Environment, Path]:
    """v1 serving from blue on schema 1, then `runbook deploy --version v2` killed (SIGKILL)
    while its migration runs in green (HELD_MIGRATION, the schema dirty at 2): Docker goes
    on with an exec whose client died. Returns the deploy's environment (its own file) and
    its pre-deploy snapshot."""
    stack.reset()
    env = stack.env
    green = env.slot(Slot.GREEN).container
    toml = tmp_path / "held-migration.toml"
    toml.write_text(envmod.to_toml(dataclasses.replace(env, migrate_command=HELD_MIGRATION)))
    proc = subprocess.Popen([sys.executable, "-m", "runbook.cli", "deploy", "--version",
                             V2.tag, "--yes", str(toml)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={k: v for k, v in os.environ.items() if k != faults.VARIABLE})
    try:
        deadline = time.monotonic() + 90
        while _schema(stack)[:2] != (2, True) or not docker.running_execs(green):
            assert proc.poll() is None and time.monotonic() < deadline, "no migration ran"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    assert docker.running_execs(green), "the migration ended with the run"
    pre_deploy = sorted(env.database.snapshot_dir.glob("*_pre-deploy.sql.gz"))
    assert len(pre_deploy) == 1, pre_deploy
    return envmod.load(str(toml)), pre_deploy[0]


def test_a_deploy_killed_while_its_migration_runs_is_waited_for_then_finished(
        stack: DrillStack, tmp_path: Path) -> None:
    """SIGKILL of a deploy while its migration runs: the migration goes on in the new slot.
    Meanwhile status says a migration is under way (wait), never "runs it again", and the
    rerun refuses, changing nothing; once the migration has ended, the same command
    finishes the deployment with the snapshot taken before it."""
    env, pre_deploy = deploy_killed_mid_migration(stack, tmp_path)
    green = env.slot(Slot.GREEN).container
    found = json.loads(cli(env, "status", "--format", "json").stdout)["problems"]
    under_way = [p for p in found if p["check"] == "schema_dirty"]
    assert len(under_way) == 1 and "a migration is under way" in under_way[0]["problem"], found
    assert "dirty at version 2" in under_way[0]["problem"] and "wait" in under_way[0]["fix"]
    rerun = [p for p in found if p["check"] == "interrupted_run"]
    assert len(rerun) == 1 and "once the migration under way has ended" in rerun[0]["fix"]
    early = cli(env, "deploy", "--version", V2.tag, "--yes")
    assert early.returncode == 4, early.stdout + early.stderr
    assert "migrations still run inside it" in early.stderr, early.stderr
    assert _schema(stack)[:2] == (2, True) and docker.running_execs(green)
    stack.docker("exec", green, "touch", "/tmp/go")  # the migration goes on to its end
    deadline = time.monotonic() + 30
    while docker.running_execs(green):
        assert time.monotonic() < deadline, "the migration never ended"
        time.sleep(0.2)
    assert _schema(stack)[:2] == (2, False)
    deploy_finishes_as_the_same_deployment(env, [pre_deploy])


def test_a_deploy_killed_while_its_migration_runs_then_cut_off_refuses_with_its_snapshot(
        stack: DrillStack, tmp_path: Path) -> None:
    """SIGKILL of a deploy while its migration runs, then the migration cut off with its
    container (OOM, a host restart): the schema stays dirty at 2 with no migration under
    way. Status and the rerun name the restore of the killed run's pre-deploy snapshot; the
    rerun changes nothing: no new "pre-deploy" snapshot (at the dirty schema), no migration
    run again."""
    _, pre_deploy = deploy_killed_mid_migration(stack, tmp_path)
    env = stack.env
    stack.docker("kill", env.slot(Slot.GREEN).container)
    assert _schema(stack) == (2, True, ())
    found = json.loads(cli(env, "status", "--format", "json").stdout)["problems"]
    dirty = [p for p in found if p["check"] == "schema_dirty"]
    assert len(dirty) == 1 and "dirty at version 2" in dirty[0]["problem"], found
    assert f"`runbook snapshot restore {env.source} {pre_deploy}`" in dirty[0]["fix"], dirty
    before = sorted(env.database.snapshot_dir.iterdir()), env.state_file.read_bytes()
    again = cli(env, "deploy", "--version", V2.tag, "--yes")
    assert again.returncode == 4, again.stdout + again.stderr
    restore = f"`runbook snapshot restore {command_arg(env)} {pre_deploy}`"
    assert restore in again.stderr, again.stderr
    assert (sorted(env.database.snapshot_dir.iterdir()), env.state_file.read_bytes()) == before
    assert _schema(stack) == (2, True, ())
    assert not docker.inspect(env.slot(Slot.GREEN).container).running
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)


def test_a_rollback_after_a_migration_left_the_schema_dirty_restores_the_targets_schema(
        stack: DrillStack, tmp_path: Path) -> None:
    """v2 serving on schema 2, then a deploy of v3 whose migration 3 fails half-way (dirty
    at 3). `runbook rollback` refuses (exit 4) naming the snapshot at v1's schema; with
    --restore-snapshot it puts v1 back on schema 1, clean, and the failed deploy's own
    pre-deploy snapshot is kept."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2; v1 stopped on blue
    env = stack.env
    _, _, failed_snapshot = deploy_left_dirty(stack, tmp_path, version=3, tag=V3.tag)
    assert through_proxy(env) == ("green", V2.tag)
    st = states.read_state(env.state_file)
    assert st.current is not None
    v1_snapshot = [meta for meta in env.database.snapshot_dir.glob("*.meta.json")
                   if json.loads(meta.read_text()).get("deployment_id") == st.current.id]
    assert len(v1_snapshot) == 1, v1_snapshot  # v2's pre-deploy snapshot, at schema 1
    refused = cli(env, "rollback", "--dry-run")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert "the database schema is dirty at version 3" in refused.stderr, refused.stderr
    assert v1_snapshot[0].name.removesuffix(".meta.json") in refused.stderr, refused.stderr
    assert "--restore-snapshot" in refused.stderr
    done = cli(env, "rollback", "--restore-snapshot", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    assert _schema(stack) == (1, False, ())
    assert failed_snapshot.exists()


@contextlib.contextmanager
def caddy_dialing_no_slot(env: Environment) -> Iterator[None]:
    """Caddy's running config (and its file) dial a dead port in place of either slot's,
    as on a host whose upstream is wrong; put back after."""
    from steps.givens import dead_loopback_port

    text = caddy.read(env)
    start, end = caddy.find_block(text)
    block = text[start:end]
    dead = dead_loopback_port()
    for config in env.slots.values():
        block = block.replace(f"localhost:{config.port}", f"localhost:{dead}")
    broken = text[:start] + block + text[end:]
    try:
        env.caddy.caddyfile.write_text(broken)
        drill_http.post(f"{env.caddy.admin_url}/load", content=broken,
                        headers={"Content-Type": "text/caddyfile"}, timeout=10)
        assert traffic.read(env).slots == set()  # Caddy dials neither slot: the premise
        yield
    finally:
        env.caddy.caddyfile.write_text(text)
        drill_http.post(f"{env.caddy.admin_url}/load", content=text,
                        headers={"Content-Type": "text/caddyfile"}, timeout=10)


def test_a_run_stopped_before_the_switch_on_a_caddy_that_dials_no_slot_can_be_run_again(
        stack: DrillStack) -> None:
    """A first deploy on a host whose Caddy dials neither slot (a wrong port), stopped before
    its switch (a failed gate keeping its record, or a kill): every later run was refused
    ("Caddy's running config names no single slot"), and the switch it prescribed could not
    work either, until the record was removed by hand. Traffic never moved (the record is
    before its commit), so the next run goes on, under its own checks."""
    from runbook import finish

    stack.reset()  # v1 serving from blue
    env = stack.env
    record = intents.Intent(run_id="dep_first", action="deploy", environment=env.name,
                            from_slot="blue", to_slot="green", from_version=None,
                            to_version=V2.tag)
    try:
        with caddy_dialing_no_slot(env):
            intents.write(env, record)
            found = finish.interrupted(env)
            assert found is not None and found[1] == "continue", found
    finally:
        intents.clear(env, record.run_id)


def test_a_first_deploy_beside_a_caddy_that_dials_no_slot_never_names_a_slot_as_serving(
        stack: DrillStack) -> None:
    """Found by review: with no deployment recorded and Caddy dialing neither slot, the
    first deploy's plan said "(traffic now on blue)", which nothing served."""
    stack.reset()
    env = stack.env
    saved = env.state_file.read_bytes()
    try:
        env.state_file.unlink()  # a host that has never recorded a deployment
        with caddy_dialing_no_slot(env):
            result = deploy.deploy(env, deploy.Options(version=V2.tag), dry_run=True)
    finally:
        env.state_file.write_bytes(saved)
    summary = result.plan.render().splitlines()[0]
    assert "Caddy dials neither slot when planned" in summary, summary
    assert "traffic now on" not in summary, summary


def test_a_failed_rerun_of_a_killed_deploy_leaves_no_record_behind(
        stack: DrillStack, tmp_path: Path) -> None:
    """`kill -9` of a deploy of a broken build during its gate, then the same deploy again,
    which fails its gate too (nothing took effect either time): the rerun put the dead run's
    record back as "the record it replaced", so status said "an interrupted run is
    unfinished" for good, and only a hand edit cleared it. The rerun is that deployment again:
    its record supersedes the dead one's."""
    stack.reset()  # v1 serving from blue
    env = stack.env
    broken = VERSIONS["unhealthy"]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that no longer runs: the killed deploy's
    intents.write(env, intents.Intent(
        run_id="dep_killed", action="deploy", environment=env.name, from_slot="blue",
        to_slot="green", from_version=VERSIONS["v1"].tag, to_version=broken.tag,
        pid=child.pid, record={"deployment_id": "dep_killed_deployment"}))
    toml = tmp_path / "short-gate.toml"  # no migrations: the failed gate changes nothing
    toml.write_text(envmod.to_toml(dataclasses.replace(
        env, migrate_command=(), health=dataclasses.replace(env.health, timeout=3.0))))
    rerun = subprocess.run([sys.executable, "-m", "runbook.cli", "deploy", "--version",
                            broken.tag, "--yes", str(toml)], capture_output=True, text=True,
                           check=False, timeout=180, stdin=subprocess.DEVNULL,
                           env={k: v for k, v in os.environ.items() if k != faults.VARIABLE})
    assert rerun.returncode == 1, rerun.stdout + rerun.stderr  # its gate failed, undone
    assert intents.read(env) is None, intents.read(env)  # no record left to "finish"
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)


def _database(stack: DrillStack) -> tuple[object, ...]:
    """What the database holds: its schema version and every table's row count."""
    with stack.connect() as conn:
        version = conn.execute("SELECT version FROM schema_migrations").fetchone()
        tables = [r[0] for r in conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_tables WHERE schemaname NOT IN "
            "('pg_catalog', 'information_schema') ORDER BY 1").fetchall()]
        counts = tuple((t, conn.execute(f"SELECT count(*) FROM {t}").fetchone()) for t in tables)
    return version, counts


def test_a_restore_killed_mid_stream_commits_nothing(stack: DrillStack) -> None:
    """SIGKILL while the dump streams into psql (the DROP SCHEMA already sent): psql's input
    ends early. The database must be exactly as it was (`--single-transaction` committed the
    DROP and half a dump here), and the next run restores it whole."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2; v1 stopped on blue
    env = stack.env
    before = _database(stack)
    first = cli(env, "rollback", "--restore-snapshot", "--yes",
                fault="restore.mid-stream:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    deadline = time.monotonic() + 20  # psql reads what was sent, then ends at EOF
    while time.monotonic() < deadline and subprocess.run(
            ["docker", "exec", env.database.container, "pgrep", "-x", "psql"],
            capture_output=True, check=False).returncode == 0:
        time.sleep(0.2)
    assert _database(stack) == before
    again = cli(env, "rollback", "--restore-snapshot", "--yes")
    assert again.returncode == 0, again.stdout + again.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    assert _database(stack)[0] != before[0]  # restored to v1's schema this time


def test_the_safety_snapshot_is_taken_once_the_app_no_longer_writes(stack: DrillStack) -> None:
    """Taken while the serving slot still wrote, a write after the snapshot's export and
    before the stop would be in neither the safety snapshot nor the restored database. Held
    (SIGSTOP) right before the safety snapshot, Docker says the serving slot is stopped."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green
    env = stack.env
    assert env.source is not None
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    environ[faults.VARIABLE] = "before:safety-snapshot:SIGSTOP"
    proc = subprocess.Popen([sys.executable, "-m", "runbook.cli", "rollback", "--restore-snapshot",
                             "--yes", str(env.source)], env=environ, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if Path(f"/proc/{proc.pid}/stat").read_text().split()[2] == "T":
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        serving = docker.inspect(env.slot(Slot.GREEN).container)
        assert not serving.running, serving.status
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)


def test_another_command_after_a_committed_interruption_is_refused_not_turned_into_its_finish(
        stack: DrillStack) -> None:
    """A rollback killed after its commit (v2 serving from green, v3 still running on blue):
    `deploy --version <v3>` or `rollback --to <other>` used to finish that rollback and exit
    0, never doing what was asked. Refused, nothing changed; the rollback's own rerun
    finishes it."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    first = cli(env, "rollback", "--yes", fault="switch.after-verify:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert through_proxy(env) == ("green", V2.tag)
    record = intents.read(env)
    state = env.state_file.read_bytes()
    for args in (("deploy", "--version", V3.tag), ("rollback", "--to", VERSIONS["v1"].tag)):
        refused = cli(env, *args, "--yes")
        said = refused.stderr
        assert refused.returncode == 4, refused.stdout + said
        assert "is not what it did, so nothing was changed" in said, said
        assert f"runbook rollback {command_arg(env)}" in said  # what finishes it
        assert intents.read(env) == record and env.state_file.read_bytes() == state
        assert docker.inspect(env.slot(Slot.BLUE).container).running  # not finished by it
        assert through_proxy(env) == ("green", V2.tag)
    done = cli(env, "rollback", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert intents.read(env) is None
    assert not docker.inspect(env.slot(Slot.BLUE).container).running


def test_a_standalone_restore_killed_after_its_stop_is_finished_with_the_service_up(
        stack: DrillStack) -> None:
    """`runbook snapshot restore` killed (-9) right after its maintenance stop of the serving
    slot: the rerun finds both slots stopped, stops nothing, and used to end "started: none
    (none were running)", exit 0, users getting errors. It must start the serving slot."""
    from runbook import snapshots

    env = arrange(stack)  # v3 serving from blue
    snap = snapshots.create(env, "manual")
    assert env.source is not None

    def restore(fault: str | None = None) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
        return subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", "restore",
                               str(env.source), snap.name, "--yes"], capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
                              env=environ | ({faults.VARIABLE: fault} if fault else {}))

    first = restore("after:stop-app-slots:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert not docker.inspect(env.slot(Slot.BLUE).container).running
    again = restore()
    said = again.stdout + again.stderr
    assert again.returncode == 0, said
    assert "is STOPPED" in said and "starts it again" in said
    assert docker.inspect(env.slot(Slot.BLUE).container).running
    assert through_proxy(env) == ("blue", V3.tag)


def _snapshot_restore_held(env: Environment, name: str, fault: str) -> subprocess.Popen[str]:
    """`runbook snapshot restore ENV NAME --yes` held (SIGSTOP) at `fault`, once it is."""
    assert env.source is not None
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    proc = subprocess.Popen([sys.executable, "-m", "runbook.cli", "snapshot", "restore",
                             str(env.source), name, "--yes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            env=environ | {faults.VARIABLE: fault})
    wait_stopped(proc.pid)
    return proc


def test_a_standalone_restore_stopped_after_its_restore_names_a_fix_that_works(
        stack: DrillStack) -> None:
    """Found by review: `runbook snapshot restore` stopped once the database was restored
    told on-call to `runbook switch --slot <target slot>`, which a standalone restore has
    none of (and a switch to the slot Caddy serves is refused): it names the containers to
    start again. A signal there no longer stops it (it goes on to start them); a failure
    there still does: here its deploy lock, removed while it ran."""
    import shutil

    from runbook import snapshots

    env = arrange(stack)  # v3 serving from blue
    snap = snapshots.create(env, "manual")
    proc = _snapshot_restore_held(env, snap.name, "after:restore-database:SIGSTOP")
    shutil.rmtree(env.lock_path)  # e.g. a `runbook unlock --force` meanwhile
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    said = out + err
    assert proc.returncode == int(ExitCode.ATTENTION), said
    blue = env.slot(Slot.BLUE).container
    assert "the database WAS restored" in said and f"docker start {blue}" in said, said
    assert "--slot <target slot>" not in said, said
    assert not docker.inspect(blue).running  # what the message says to start
    subprocess.run(["docker", "start", blue], check=True, capture_output=True)  # as it says
    health.wait_healthy(env, Slot.BLUE)
    assert through_proxy(env) == ("blue", V3.tag)


def test_a_signal_once_a_standalone_restore_has_restored_starts_the_app_again(
        stack: DrillStack) -> None:
    """The standalone counterpart of the rollback's: `runbook snapshot restore` interrupted
    once the database was restored stopped with the app slots stopped (exit 5), the service
    down, where its next step starts them again. It says why and goes on to its end."""
    from runbook import snapshots

    env = arrange(stack)  # v3 serving from blue
    snap = snapshots.create(env, "manual")
    assert env.source is not None
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    done = subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", "restore",
                           str(env.source), snap.name, "--yes"], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
                          env=environ | {faults.VARIABLE: "before:verify-restore:SIGINT"})
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    assert "SIGINT received after the database was restored" in said, said
    assert docker.inspect(env.slot(Slot.BLUE).container).running
    assert through_proxy(env) == ("blue", V3.tag)
    assert intents.read(env) is None


def test_a_restore_rerun_after_one_killed_past_its_restore_names_the_first_safety_snapshot(
        stack: DrillStack) -> None:
    """`runbook snapshot restore` killed (-9) once its restore committed; on-call types it
    again (killed the same way once more), then again. Each rerun's safety snapshot is of the
    database as the killed run left it (already restored), and it was the only one a rerun
    named: the data from before the restore (here a row written after the snapshot) is in the
    FIRST run's safety snapshot, which the last run's plan, warnings and JSON must name."""
    import gzip

    from runbook import snapshots

    env = arrange(stack)  # v3 serving from blue
    snap = snapshots.create(env, "manual")
    with stack.connect() as conn:
        conn.execute("INSERT INTO items (name) VALUES ('written-after-the-snapshot')")
    assert env.source is not None

    def restore(fault: str | None = None, *extra: str) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
        return subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", "restore",
                               str(env.source), snap.name, "--yes", "--format", "json",
                               *extra],
                              capture_output=True, text=True, timeout=120, check=False,
                              stdin=subprocess.DEVNULL,
                              env=environ | ({faults.VARIABLE: fault} if fault else {}))

    def safety_files() -> list[Path]:  # oldest first (names within a second get "-2")
        return sorted(env.database.snapshot_dir.glob("*pre-restore*.sql.gz"),
                      key=lambda p: p.stat().st_mtime_ns)

    first = restore("after:restore-database:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    [before] = safety_files()  # the killed run's: the data from before the restore
    assert b"written-after-the-snapshot" in gzip.decompress(before.read_bytes())
    second = restore("after:restore-database:SIGKILL")  # killed the same way: carried on
    assert second.returncode == -signal.SIGKILL, second.stderr
    # runs that end without changing data in between (found by review: they hid it)
    looked = restore(None, "--dry-run")
    assert looked.returncode == 0, looked.stdout + looked.stderr
    assert json.loads(looked.stdout)["plan"]["facts"]["earlier_safety_snapshot"] == str(before)
    refused = restore("before:stop-app-slots:SIGINT")  # Ctrl-C before any data changed
    # nothing changed, but the killed runs left blue, which Caddy points at, stopped: exit 5
    # and THE SERVICE IS DOWN, never exit 1's "traffic stayed on a healthy slot"
    assert refused.returncode == int(ExitCode.ATTENTION), refused.stdout + refused.stderr
    assert "THE SERVICE IS DOWN: blue" in refused.stdout + refused.stderr, refused.stderr
    again = restore()
    assert again.returncode == 0, again.stdout + again.stderr
    [_, _, mine] = safety_files()  # the last run's: the database as the killed ones left it
    assert b"written-after-the-snapshot" not in gzip.decompress(mine.read_bytes())
    out = json.loads(again.stdout)
    assert out["plan"]["facts"]["earlier_safety_snapshot"] == str(before), out["plan"]["facts"]
    assert out["plan"]["facts"]["safety_snapshot"] == str(mine)
    assert any(str(before) in w and "killed" in w for w in out["plan"]["warnings"]), out
    assert docker.inspect(env.slot(Slot.BLUE).container).running
    assert through_proxy(env) == ("blue", V3.tag)


@pytest.mark.parametrize("point", ["switch.after-verify", "before:stop-old-slot"])
def test_the_dry_run_of_a_finish_shows_what_the_finishing_run_records(
        stack: DrillStack, point: str) -> None:
    """Found by review: the finish plan's state step promised only "current: v2 on green"
    while the finishing run wrote more (previous, statuses, rollback_count): what the plan
    shows is exactly what runs. Killed before its state write, and after it (then the plan
    says it is already recorded)."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    first = cli(env, "rollback", "--yes", fault=f"{point}:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    looked = cli(env, "rollback", "--dry-run", "--format", "json")
    assert looked.returncode == 0, looked.stdout + looked.stderr
    [step] = [s for s in json.loads(looked.stdout)["plan"]["steps"] if s["name"] == "state"]
    done = cli(env, "rollback", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    written = recording.state_lines(states.read_state(env.state_file, environment=env.name))
    assert written["current"].startswith(f"{V2.tag} on green") and "rollback_count 1" in \
        written["current"], written
    already = " (already recorded: left as it is)" if point == "before:stop-old-slot" else ""
    shown = {k: step["details"].get(k) for k in written}
    assert shown == {"current": written["current"] + already,
                     "previous": written["previous"]}, step


# A finish plan's state step, read field by field: "<version> on <slot>, status <status>[,
# rollback_count N][ (already recorded: left as it is)]" and "<version>, status <status>".
_PLANNED_CURRENT = re.compile(
    r"(?P<version>[0-9a-f]{7}) on (?P<active_slot>blue|green), status (?P<status>[a-z_]+)"
    r"(?:, rollback_count (?P<rollback_count>\d+))?(?P<already> \(already recorded: left as it "
    r"is\))?")
_PLANNED_PREVIOUS = re.compile(r"(?P<version>[0-9a-f]{7}), status (?P<status>[a-z_]+)")


def _planned(plan: dict[str, Any]) -> tuple[dict[str, Any], bool, str | None]:
    """What a finish plan's state step says the file will hold (current and previous, field by
    field), whether it says the file already holds it, and its "recorded as" line."""
    assert plan["finishing"], plan["summary"]  # the plan of a finish, not of a new run
    [step] = [s for s in plan["steps"] if s["name"] == "state"]
    details = step["details"]
    current = _PLANNED_CURRENT.fullmatch(details["current"])
    assert current is not None, details
    previous = (None if details["previous"] == "none"
                else _PLANNED_PREVIOUS.fullmatch(details["previous"]))
    assert previous is not None or details["previous"] == "none", details
    fields = {"current": {"version": current["version"], "active_slot": current["active_slot"],
                          "status": current["status"],
                          "rollback_count": int(current["rollback_count"] or 0)},
              "previous": previous and {"version": previous["version"],
                                        "status": previous["status"]}}
    return fields, current["already"] is not None, details.get("recorded as")


def _on_disk(env: Environment) -> dict[str, Any] | None:
    """The same fields as the state file holds them (its raw JSON, not the runbook's reader);
    None when there is no file."""
    if not env.state_file.exists():
        return None
    data = json.loads(env.state_file.read_text())
    cur, prev = data["current_deployment"], data.get("previous_deployment")
    return {"current": cur and {"version": cur["version"], "active_slot": cur["active_slot"],
                                "status": cur.get("status"),
                                "rollback_count": cur.get("rollback_count", 0)},
            "previous": prev and {"version": prev["version"], "status": prev.get("status")}}


def _finished_as_planned(env: Environment, *command: str) -> tuple[bool, str | None]:
    """Dry-runs then runs `command`, which finishes an interrupted run, and checks that the
    state file read back holds, field by field, what both plans (the dry run's and the
    finishing run's own) said the state step would write, or is left as it was when they said
    "already recorded". Returns (already recorded, recorded as), one answer from both plans."""
    before = _on_disk(env)
    dry = cli(env, *command, "--dry-run", "--format", "json")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    done = cli(env, *command, "--yes", "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "finishing an interrupted run" in done.stderr, done.stderr
    written = _on_disk(env)
    said = [_planned(json.loads(out)["plan"]) for out in (dry.stdout, done.stdout)]
    for fields, already, _ in said:
        assert fields == written, (fields, written)
        if already:
            assert written == before, (before, written)
    assert said[0][1:] == said[1][1:], said
    assert intents.read(env) is None
    return said[0][1:]


@pytest.mark.parametrize(("scene", "point"), [
    ("previous", "switch.after-verify"),  # to the previous version: recorded as a rollback
    ("baseline", "switch.after-verify"),  # the same version on the other slot: the slot only
    ("previous", "after:state"),  # its state written, killed before it cleared its record
])
def test_a_killed_switch_is_finished_writing_exactly_what_its_plan_says(
        stack: DrillStack, scene: str, point: str) -> None:
    """`runbook switch` killed (-9) after its commit point: the next `runbook switch` to the
    same slot finishes it, and the state file read back holds, field by field, what its
    finish plan (dry run and real run) said it would write, or "already recorded"."""
    if scene == "previous":
        env = arrange(stack)  # v3 serving from blue, v2 the previous, stopped on green
    else:
        stack.reset()  # v1 serving from blue, v1 on green too, no previous
        env = stack.env
    first = cli(env, "switch", "--slot", "green", "--yes", fault=f"{point}:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    already, _ = _finished_as_planned(env, "switch", "--slot", "green")
    assert already is (point == "after:state")
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.active_slot == Slot.GREEN
    assert st.current.version == (V2.tag if scene == "previous" else VERSIONS["v1"].tag)
    assert through_proxy(env)[0] == "green"


@pytest.mark.parametrize("point", ["switch.after-verify", "before:stop-old-slot"])
def test_a_killed_deploy_is_finished_writing_exactly_what_its_plan_says(
        stack: DrillStack, point: str) -> None:
    """`runbook deploy` killed (-9) after its commit point, before its state write and after
    it: the next `runbook deploy` of that version finishes it, and the state file read back
    holds, field by field, what its finish plan said it would write."""
    env = arrange(stack)  # v3 serving from blue, v2 the previous, stopped on green (schema 2)
    first = cli(env, "deploy", "--version", V2.tag, "--yes", fault=f"{point}:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    killed = intents.read(env)
    assert killed is not None and killed.action == "deploy"
    already, _ = _finished_as_planned(env, "deploy", "--version", V2.tag)
    assert already is (point == "before:stop-old-slot")
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.id == killed.record["deployment_id"]
    assert st.previous is not None and st.previous.version == V3.tag
    assert through_proxy(env) == ("green", V2.tag)


@pytest.mark.parametrize("rewrite", ["removed", "renamed", "deleted", "no-current"])
def test_a_killed_rollback_whose_target_is_gone_from_the_state_file_writes_what_its_plan_says(
        stack: DrillStack, rewrite: str) -> None:
    """A rollback killed (-9) at its commit point, then another tool rewrote the state file
    without the target's record: every v2 record removed, or the whole file deleted (v2
    recorded as the previous under another id is found by its content key: recorded as the
    rollback it was); or without what it rolled back from (no current,
    v3's record removed, v2 kept as the previous). The next `runbook rollback` records what
    runs as a switch does, and the state file read back holds, field by field, what its
    finish plan said it would write; the plan says it is recorded as a switch. Found by this
    test: with the file deleted, the plan said "unreadable now" and every rerun, and the
    `runbook switch` that finishes it too, failed at the state step (exit 6) naming itself as
    the fix, for ever
    (with no current too: "no current deployment to roll back from")."""
    env = arrange(stack)  # v3 serving from blue, v2 the previous, stopped on green
    first = cli(env, "rollback", "--yes", fault="switch.after-verify:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    st = states.read_state(env.state_file)
    assert st.previous is not None and st.previous.version == V2.tag
    others = tuple(d for d in st.history if d.version != V2.tag)
    if rewrite == "no-current":
        states.write_state(env.state_file, dataclasses.replace(
            st, current=None, history=tuple(d for d in st.history if d.version != V3.tag)))
    elif rewrite == "deleted":  # and no copy kept (an older runbook's host): with one, the
        env.state_file.unlink()  # finish refuses naming it (tests/test_state_kept.py)
        kept.copy_path(env.runs_dir, env.state_file, env.name).unlink(missing_ok=True)
    elif rewrite == "removed":
        states.write_state(env.state_file,
                           dataclasses.replace(st, previous=None, history=others))
    else:
        states.write_state(env.state_file, dataclasses.replace(
            st, previous=st.previous.with_(id="dep_rewritten"), history=others))
    already, recorded_as = _finished_as_planned(env, "rollback")
    assert not already
    if rewrite == "renamed":  # found by its content key (version, commit, time): a rollback
        assert recorded_as is None
        done = states.read_state(env.state_file)
        assert done.current is not None and done.current.version == V2.tag
        assert done.previous is not None and (done.previous.version, done.previous.status) == (
            V3.tag, "rolled_back")
    else:
        assert recorded_as is not None and recorded_as.startswith(f"a switch to {V2.tag}")
    assert through_proxy(env) == ("green", V2.tag)


def test_status_with_the_state_file_deleted_after_a_killed_rollback_names_its_finish(
        stack: DrillStack) -> None:
    """Found by review: with the state file deleted after a rollback killed (-9) at its
    commit point, status's "the state file does not exist" said "deploy first", which is
    refused while that run is unfinished. It names the command that finishes the run (which
    records the state again), and that command does."""
    env = arrange(stack)  # v3 serving from blue, v2 the previous, stopped on green
    first = cli(env, "rollback", "--yes", fault="switch.after-verify:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    env.state_file.unlink()  # no copy kept (with one: tests/test_state_kept.py)
    kept.copy_path(env.runs_dir, env.state_file, env.name).unlink(missing_ok=True)
    out = cli(env, "status", "--format", "json")
    [found] = [p for p in json.loads(out.stdout)["problems"] if p["check"] == "state_unreadable"]
    assert "deploy first" not in found["fix"], found
    [command] = re.findall(r"`(runbook rollback [^`]*)`", found["fix"])
    assert command == f"runbook rollback {env.source} --to {V2.tag}", found
    done = cli(env, *command.split()[1:2], *command.split()[3:], "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert states.read_state(env.state_file).current.version == V2.tag
    assert through_proxy(env) == ("green", V2.tag)


def test_finishing_an_interrupted_switch_keeps_the_old_slot_running(stack: DrillStack) -> None:
    """A switch keeps the slot it left running (switching back is then immediate). Killed
    after its commit and finished by the same command, it stopped that slot: what the
    uninterrupted switch never does."""
    stack.reset()  # blue serves v1, green runs v1 too
    env = stack.env
    first = cli(env, "switch", "--slot", "green", "--yes", fault="switch.after-verify:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    done = cli(env, "switch", "--slot", "green", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env)[0] == "green" and intents.read(env) is None
    assert docker.inspect(env.slot(Slot.BLUE).container).running


def test_a_deploy_rerun_after_its_migrations_measures_the_schema_from_before_them(
        stack: DrillStack, tmp_path: Path) -> None:
    """A deploy of a version whose gate fails, killed (-9) once its migrations ran (1 -> 2),
    then run again: the rerun measured the change from the migrated schema (2 -> 2: none),
    failed its gate, and said "undone", exit 1, with v1 serving on schema 2."""
    stack.reset()  # v1 serving from blue on schema 1
    env = stack.env
    toml = tmp_path / "quick-gate.toml"
    toml.write_text(envmod.to_toml(dataclasses.replace(
        env, health=dataclasses.replace(env.health, timeout=3.0))))
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    argv = [sys.executable, "-m", "runbook.cli", "deploy", "--version",
            VERSIONS["unhealthy"].tag, "--yes", str(toml)]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                           stdin=subprocess.DEVNULL,
                           env=environ | {faults.VARIABLE: "after:migrate:SIGKILL"})
    assert first.returncode == -signal.SIGKILL, first.stderr
    again = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                           stdin=subprocess.DEVNULL, env=environ)
    assert again.returncode == 5, again.stderr
    assert "changed the database schema (1 -> 2)" in again.stderr, again.stderr
    assert "nothing took effect" not in again.stderr
    assert intents.read(env) is not None  # kept: the next run still knows
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)


@pytest.mark.long
def test_a_signal_as_the_standby_starts_stops_it_again(stack: DrillStack) -> None:
    """Ctrl-C while `docker start` (or compose's recreate) runs: Docker finishes what it was
    asked, the step does not return. The undo was registered only after the call, so the
    standby stayed running and the run said "nothing took effect"."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    failed = cli(env, "rollback", "--yes", fault="start-slot.acted:SIGINT")
    assert failed.returncode == 1, failed.stderr
    assert "nothing took effect" in failed.stderr, failed.stderr
    assert not docker.inspect(env.slot(Slot.GREEN).container).running
    assert through_proxy(env) == ("blue", V3.tag) and intents.read(env) is None


def test_a_repairing_switch_stopped_at_its_first_step_keeps_the_interrupted_runs_record(
        stack: DrillStack) -> None:
    """The repairing switch writes its record over the interrupted run's before its first
    step; a Ctrl-C right then (before the step that registered the put-back) deleted both:
    the next run no longer knew traffic was left on a crashed slot."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    first = cli(env, "rollback", "--yes", fault="switch.after-reload:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    subprocess.run(["docker", "kill", env.slot(Slot.GREEN).container], check=True,
                   capture_output=True)  # the target crashes: the run cannot be finished
    interrupted = intents.read(env)
    assert interrupted is not None
    stopped = cli(env, "switch", "--slot", "blue", "--yes", fault="before:replace-record:SIGINT")
    # Caddy points at the crashed green: never exit 1's "traffic stayed on a healthy slot"
    # (tests/test_down_after_restore.py)
    assert stopped.returncode == int(ExitCode.ATTENTION), stopped.stderr
    assert "THE SERVICE IS DOWN: green" in stopped.stderr, stopped.stderr
    assert intents.read(env) == interrupted  # put back: the next run still knows
    repaired = cli(env, "switch", "--slot", "blue", "--yes")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert through_proxy(env) == ("blue", V3.tag) and intents.read(env) is None


def test_a_rollback_resumed_without_its_restore_flag_says_the_database_was_restored(
        stack: DrillStack) -> None:
    """Found by review: `rollback --restore-snapshot` killed once its restore had replaced
    the database is resumed by the command it names, `runbook rollback` (no flag). That
    plan said the interrupted run "changed nothing users see" and never named the safety
    snapshot: the data from before the restore, which nothing else pointed to."""
    env = _restore_killed_after_its_commit(stack)
    [safety] = env.database.snapshot_dir.glob("*pre-restore*.sql.gz")
    again = cli(env, "rollback", "--yes")
    said = again.stdout + again.stderr
    assert again.returncode == 0, said
    assert "restored the database before it stopped" in said and str(safety) in said, said
    assert "changed nothing users see" not in said
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    # the app has served since: a later restore's "data from before" is its own safety
    # snapshot, never that old one (found by review: it was named, weeks of writes later)
    later = subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", "restore",
                            str(env.source), safety.name, "--keep-stopped", "--dry-run",
                            "--format", "json"],  # at schema 2 under v1: --keep-stopped's
                           capture_output=True, text=True, timeout=120, check=False,
                           stdin=subprocess.DEVNULL)
    assert later.returncode == 0, later.stdout + later.stderr
    assert json.loads(later.stdout)["plan"]["facts"]["earlier_safety_snapshot"] is None


def test_a_restore_continued_then_interrupted_starts_the_slot_the_first_run_stopped(
        stack: DrillStack) -> None:
    """`rollback --restore-snapshot` killed once its maintenance stop left the serving slot
    down; its rerun is interrupted (Ctrl-C) before the restore: the undo started only what
    the rerun itself stopped (nothing) and said "traffic stays where it was", the service
    down. The slot that served is started again and serves."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2
    env = stack.env
    first = cli(env, "rollback", "--restore-snapshot", "--yes",
                fault="after:stop-app-slots:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert not docker.inspect(env.slot(Slot.GREEN).container).running
    again = cli(env, "rollback", "--restore-snapshot", "--yes",
                fault="before:safety-snapshot:SIGINT")
    assert again.returncode == 1, again.stderr
    assert docker.inspect(env.slot(Slot.GREEN).container).running
    assert through_proxy(env) == ("green", VERSIONS["v2"].tag)


def test_a_ctrl_c_before_a_rollbacks_restore_names_the_restoring_rerun_that_runs(
        stack: DrillStack) -> None:
    """Found by review: Ctrl-C during `rollback --restore-snapshot`'s safety snapshot was
    undone (exit 1), and the run said "run `runbook rollback ENV --to v1` again when ready":
    typed as printed, the schema guard refused it (exit 4), a wasted step. The command it
    names carries the restore's flags, and typed as printed it rolls back."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2
    env = stack.env
    stopped = cli(env, "rollback", "--restore-snapshot", "--yes",
                  fault="before:safety-snapshot:SIGINT")
    assert stopped.returncode == 1, stopped.stderr
    assert through_proxy(env) == ("green", VERSIONS["v2"].tag)
    named = re.findall(r"run `(runbook rollback [^`]+)` again when ready", stopped.stderr)
    assert len(named) == 1 and "--restore-snapshot --snapshot" in named[0], stopped.stderr
    argv = shlex.split(named[0])[1:]
    assert str(env.source) in argv
    argv.remove(str(env.source))
    again = cli(env, *argv, "--yes")
    assert again.returncode == 0, again.stdout + again.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)


def test_a_rerun_stopped_before_its_restore_never_starts_the_code_a_committed_restore_unfits(
        stack: DrillStack) -> None:
    """The counterpart of the test above, found by review: `rollback --restore-snapshot`
    killed once its restore had committed (schema 1 now, v2's slot stopped); its rerun is
    stopped before its own restore (here a Ctrl-C; a refusal of other sessions is the same
    undo). Its undo started the serving slot again: v2 on schema 1, which it never ran on.
    It stays stopped, as the killed run left it, and the message says why; the same
    command then finishes the rollback."""
    env = _restore_killed_after_its_commit(stack)
    assert _database(stack)[0] == (1,)  # the restore committed
    again = cli(env, "rollback", "--restore-snapshot", "--yes",
                fault="before:safety-snapshot:SIGINT")
    # the service stays down: exit 5 (read the message), never 1 ("traffic stayed on a
    # healthy slot")
    assert again.returncode == int(ExitCode.ATTENTION), again.stderr
    assert "THE SERVICE IS DOWN" in again.stderr, again.stderr
    assert not docker.inspect(env.slot(Slot.GREEN).container).running, again.stderr
    assert "was left stopped as the killed run left it" in again.stderr, again.stderr
    assert "schema 1" in again.stderr, again.stderr
    # a second rerun stopped the same way (found by review: the first rerun's record ended
    # the look back, and the second one started v2 on schema 1)
    third = cli(env, "rollback", "--restore-snapshot", "--yes",
                fault="before:safety-snapshot:SIGINT")
    assert third.returncode == int(ExitCode.ATTENTION), third.stderr
    assert not docker.inspect(env.slot(Slot.GREEN).container).running, third.stderr
    assert "was left stopped as the killed run left it" in third.stderr, third.stderr
    done = cli(env, "rollback", "--restore-snapshot", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    assert _database(stack)[0] == (1,)


def _restore_killed_after_its_commit(stack: DrillStack) -> Environment:
    """On MIGRATED (v2 serving from green on schema 2; v1 ran on schema 1),
    `rollback --restore-snapshot` killed (-9) once its restore committed: schema 1 now, v2's
    slot stopped. The stack's environment."""
    stack.arrange(scenes.MIGRATED)
    env = stack.env
    first = cli(env, "rollback", "--restore-snapshot", "--yes",
                fault="after:restore-database:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    return env


def _safety_snapshots(env: Environment) -> list[Path]:
    """The restores' safety snapshots, oldest first (names within a second get "-2")."""
    return sorted(env.database.snapshot_dir.glob("*pre-restore*.sql.gz"),
                  key=lambda p: p.stat().st_mtime_ns)


@pytest.mark.parametrize("point", [
    "after:restore-database",  # before the switch: the rerun goes on from the gate
    "before:state",  # after the commit: the rerun finishes it
])
def test_the_finish_of_a_killed_restoring_rollback_plans_only_what_it_runs(
        stack: DrillStack, point: str) -> None:
    """Found by a plan-fidelity review (15d87cc's rule, for the run that finishes): after
    `rollback --restore-snapshot` was killed (-9) once its restore had stopped the old
    serving slot, the command status names (its dry run too) planned a drain and a `docker
    stop` of that exited container, and the journal said "container: already exited". The
    finishing plan shows as actions exactly the steps the finishing run journals, and the
    old slot's step says it is already down, with no drain or stop of its own."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2; v1 stopped on blue
    env = stack.env
    green = env.slot(Slot.GREEN).container
    first = cli(env, "rollback", "--restore-snapshot", "--yes", fault=f"{point}:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert docker.inspect(green).status == "exited"  # the restore's maintenance stop
    # the command `runbook status` names for the interrupted run, as on-call would type it
    said = json.loads(cli(env, "status", "--format", "json").stdout)["problems"]
    [fix] = [p["fix"] for p in said if p["check"] == "interrupted_run"]
    if point == "before:state":  # traffic moved: the fix says what the finish does to green
        assert "already, so it stops nothing" in fix and "stops the old slot" not in fix, fix
    typed = shlex.split(fix.split("`")[1])
    assert typed[:2] == ["runbook", "rollback"] and str(env.source) in typed, fix
    args = [w for w in typed[1:] if w != str(env.source)]
    looked = cli(env, *args, "--dry-run", "--format", "json")
    assert looked.returncode == 0, looked.stdout + looked.stderr
    plan = json.loads(looked.stdout)["plan"]
    assert bool(plan["finishing"]) is (point == "before:state"), plan["summary"]
    old = next(s for s in plan["steps"] if s["name"] == "stop-old-slot")
    assert old["skip"] is None, old
    details = old["details"]
    assert "drain" not in details and "command" not in details, details  # neither runs
    assert details["container"].startswith(f"{green}: already exited"), details
    # what the plan shows as actions: neither checked while planning nor skipped
    acted = [s["name"] for s in plan["steps"]
             if s["name"] != "lock" and s["phase"] != "preflight" and s["skip"] is None]
    runs = sorted(env.runs_dir.glob("rbk_*.json"), key=lambda p: p.stat().st_mtime_ns)
    done = cli(env, *args, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    [ran] = [p for p in env.runs_dir.glob("rbk_*.json") if p not in runs]
    journal = json.loads(ran.read_text())["steps"]
    assert [s["name"] for s in journal if s["name"] not in ("lock", "plan", "unlock")] \
        == acted, (acted, journal)
    [ended] = [s for s in journal if s["name"] == "stop-old-slot"]
    assert ended["detail"]["container"] == "already exited", ended  # never drained or stopped
    assert not {"drain", "drained", "command"} & set(ended["detail"]), ended
    # every other value the dry run resolved is the one the run planned with
    assert {k: v for k, v in details.items() if k != "container"} \
        == {k: ended["detail"][k] for k in details if k != "container"}, (details, ended)
    assert docker.inspect(green).status == "exited"


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_once_the_database_is_restored_carries_the_rollback_to_its_commit(
        stack: DrillStack, signame: str) -> None:
    """Found by review: a handled signal (Ctrl-C, a SIGTERM; a SIGHUP then too) once
    `rollback --restore-snapshot` had restored the database stopped the run there: the undo
    cannot start the slots on the restored data, so both stayed stopped and the proxy
    answered 502 (exit 5) where going on would have ended the outage; status then said only
    "traffic did not move", and the rerun restored again and never named the first safety
    snapshot. The run says at once why it goes on, and goes on to the commit point: v1
    serves, exit 6 with the intent committed, and the next plain run finishes the rest."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2; v1 stopped on blue
    env = stack.env
    with stack.connect() as conn:
        conn.execute("INSERT INTO items (name) VALUES ('written-after-the-snapshot')")
    # the plan says so before it happens (found by review: it said a Ctrl-C is "acted on
    # once the transaction has ended", which on-call read as "stops the run there")
    looked = cli(env, "rollback", "--restore-snapshot", "--dry-run", "--format", "json")
    assert looked.returncode == 0, looked.stdout + looked.stderr
    steps = {s["name"]: s for s in json.loads(looked.stdout)["plan"]["steps"]}
    said = steps["restore-database"]["details"]["Ctrl-C"]
    assert "carries on until traffic has moved, then stops (exit 6)" in said, said
    first = cli(env, "rollback", "--restore-snapshot", "--yes",
                fault=f"after:restore-database:{signame}")
    assert first.returncode == int(ExitCode.TOOK_EFFECT), first.stderr
    assert f"{signame} received after the database was restored" in first.stderr
    assert "TOOK EFFECT" in first.stderr, first.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    assert _database(stack)[0] == (1,)
    pending = intents.read(env)
    assert pending is not None and pending.phase is intents.Phase.COMMITTED
    [safety] = _safety_snapshots(env)  # the data from before the restore
    assert b"written-after-the-snapshot" in gzip.decompress(safety.read_bytes())
    status = cli(env, "status")
    said = status.stdout + status.stderr
    assert "(it took effect); traffic is on blue" in said, said
    assert "restored the database first" in said and str(safety) in said, said
    again = cli(env, "rollback", "--yes")
    assert again.returncode == 0, again.stdout + again.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    assert intents.read(env) is None
    assert _safety_snapshots(env) == [safety]  # never restored a second time
    assert not docker.inspect(env.slot(Slot.GREEN).container).running  # the finish's stop
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.version == VERSIONS["v1"].tag


def _restore_then_fail_the_gate(stack: DrillStack) -> pytest.ExceptionInfo[RunbookError]:
    """On MIGRATED, `rollback --restore-snapshot` whose target (blue) fails its gate once the
    database is restored: exit 5, both slots stopped, Caddy still pointing at green."""
    from runbook import rollback

    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2; v1 stopped on blue
    env = stack.env
    # the previous deployment's build turns out broken (its container was pruned)
    st = states.read_state(env.state_file)
    assert st.previous is not None
    # recorded as that build names itself (its revision label: a record naming another
    # commit is refused before the gate, tests/test_rollback.py)
    broken = st.previous.with_(version=VERSIONS["unhealthy"].tag,
                               git_commit=VERSIONS["unhealthy"].git_commit,
                               image=VERSIONS["unhealthy"].image, migration_version=1)
    states.write_state(env.state_file, st.with_(previous=broken))
    docker.remove(env.slot(Slot.BLUE).container)
    if stack.has("docker-run"):  # the host's script made it; the rollback starts it
        stack.docker_run(Slot.BLUE, VERSIONS["unhealthy"].image)
        docker.stop(env.slot(Slot.BLUE).container)
    fast = env.with_(health=dataclasses.replace(env.health, timeout=5.0))
    with pytest.raises(RunbookError) as err:
        rollback.rollback(fast, rollback.Options(restore_snapshot="auto"))
    assert err.value.exit_code == ExitCode.ATTENTION, err.value
    return err


def test_a_gate_failing_after_the_restore_leaves_the_first_safety_snapshot_named(
        stack: DrillStack) -> None:
    """A rollback whose restore ran, then whose target failed its gate, ends as before:
    exit 5, the database WAS restored, nothing serves. Found by review: such an ended run
    was taken for one whose restore finished, unlike a killed one: status never named its
    safety snapshot (the data from before the restore), the rerun's plan did not either,
    and the cleanup kept it no longer than any other."""
    from runbook import snapshot_restore

    env = stack.env
    err = _restore_then_fail_the_gate(stack)
    assert "did not become healthy" in str(err.value), err.value
    assert "the database WAS restored" in str(err.value), err.value
    assert f"--slot {Slot.BLUE}`" in (err.value.fix or ""), err.value.fix  # not a placeholder
    assert _database(stack)[0] == (1,)
    assert not any(docker.inspect(env.slot(s).container).running for s in Slot)
    [safety] = _safety_snapshots(env)
    status = cli(env, "status")
    said = status.stdout + status.stderr
    assert "restored the database first" in said and str(safety) in said, said
    looked = cli(env, "rollback", "--dry-run", "--format", "json")
    assert looked.returncode == 0, looked.stdout + looked.stderr
    warnings = json.loads(looked.stdout)["plan"]["warnings"]
    assert any("restored the database before it stopped" in w and str(safety) in w
               for w in warnings), warnings
    looked = cli(env, "rollback", "--restore-snapshot", "--dry-run", "--format", "json")
    assert looked.returncode == 0, looked.stdout + looked.stderr
    [step] = [s for s in json.loads(looked.stdout)["plan"]["steps"]
              if s["name"] == "safety-snapshot"]
    assert str(safety) in step["details"].get("the data from before", ""), step
    assert safety.name in snapshot_restore.kept_for_killed_restore(env)


def _journal_lines(said: str) -> list[dict[str, Any]]:
    """The run's journal lines, from the path its output names (`runbook: journal: PATH`)."""
    [path] = re.findall(r"^runbook: journal: (\S+)$", said, re.MULTILINE)
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def restoring_rollback(env: Environment, fault: str) -> subprocess.Popen[str]:
    """`runbook rollback --restore-snapshot --yes` started with the drill `fault`(s)."""
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    return subprocess.Popen([sys.executable, "-m", "runbook.cli", "rollback",
                             "--restore-snapshot", "--yes", str(env.source)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=environ | {faults.VARIABLE: fault})


def _stopped_after_the_restore(stack: DrillStack,
                               meanwhile: Callable[[], None]) -> tuple[int, str]:
    """On MIGRATED, `rollback --restore-snapshot` held (SIGSTOP) once its restore committed;
    `meanwhile` runs, then the run goes on: its exit code and output."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2; v1 stopped on blue
    env = stack.env
    assert env.source is not None
    proc = restoring_rollback(env, "after:restore-database:SIGSTOP")
    wait_stopped(proc.pid)
    meanwhile()
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


def test_a_restoring_rollback_stopped_after_its_commit_names_its_safety_snapshot(
        stack: DrillStack) -> None:
    """Found by review: a SIGTERM once the database was restored carries the run to its
    commit, then stops it (exit 6); its "TOOK EFFECT" message, all a terminal shows, never
    said the database was restored nor where the data from before it is (only `runbook
    status` did). The message, and the journal's final ERROR line, name the safety snapshot."""
    env = stack.env
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2; v1 stopped on blue
    first = cli(env, "rollback", "--restore-snapshot", "--yes",
                fault="after:restore-database:SIGTERM")
    assert first.returncode == int(ExitCode.TOOK_EFFECT), first.stderr
    [safety] = _safety_snapshots(env)  # the data from before the restore
    [error] = [line for line in first.stderr.splitlines() if line.startswith("runbook: error:")]
    assert "TOOK EFFECT" in error and str(safety) in error, error
    last = [e for e in _journal_lines(first.stderr) if e["level"] == "ERROR"][-2]
    assert last.get("exit_code") == 6 and "TOOK EFFECT" in last["message"], last
    assert str(safety) in last["message"], last
    # what the run records keep for every operator's cleanup (a run that failed once its
    # restore replaced the database) the record beside the state file keeps too (found by
    # review: it was removed at the commit's failure)
    from runbook import restore_records

    kept = restore_records.unfinished_restores(env)
    assert any(r.get("safety_snapshot") == str(safety) for r in kept), kept


def test_status_after_a_restoring_rollback_stopped_after_its_commit_says_it_once(
        stack: DrillStack) -> None:
    """Found by review: status read "stopped after traffic moved (it took effect); it took
    effect: traffic is on blue", the same thing twice."""
    env = stack.env
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2; v1 stopped on blue
    first = cli(env, "rollback", "--restore-snapshot", "--yes",
                fault="after:restore-database:SIGTERM")
    assert first.returncode == int(ExitCode.TOOK_EFFECT), first.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)  # the oracle: what serves
    out = cli(env, "status", "--format", "json")
    [said] = [p["problem"] for p in json.loads(out.stdout)["problems"]
              if p["check"] == "interrupted_run"]
    assert said.count("took effect") == 1, said
    assert "traffic is on blue" in said, said


def test_status_after_a_gate_failing_past_the_restore_says_nothing_serves(
        stack: DrillStack) -> None:
    """Found by review: after a gate that failed once the database was restored, status
    said "traffic did not move (green serves)": Caddy points at green, but green is
    stopped and the proxy answers 502. It says what Docker and the proxy say."""
    env = stack.env
    _restore_then_fail_the_gate(stack)
    green = env.slot(Slot.GREEN).container
    assert docker.inspect(green).status == "exited"
    with drill_http.client(timeout=3) as client:
        assert client.get(f"{env.caddy.proxy_url}/version").status_code == 502
    out = cli(env, "status", "--format", "json")
    [said] = [p["problem"] for p in json.loads(out.stdout)["problems"]
              if p["check"] == "interrupted_run"]
    assert "green serves" not in said, said
    assert "traffic did not move; green, the slot Caddy points at, is stopped: nothing " \
        "serves" in said, said


def test_a_restore_that_does_not_match_its_snapshot_ends_with_the_checks_own_fix(
        stack: DrillStack) -> None:
    """Found by review: when the row counts after the replay differ from the snapshot's,
    the check says "do not start the app on it", and the run's final fix then said to
    `runbook switch` to the target, which starts the app on it. A table another session
    makes right after the restore makes the database differ (a row it only adds is a live
    writer's, said as that: review H2)."""
    def write_one() -> None:
        with stack.connect() as conn:
            conn.execute("INSERT INTO items (name) VALUES ('written-after-the-restore')")
            # a row that only adds is a live writer's, never a failed check (review H2): a
            # table the snapshot does not hold is
            conn.execute("CREATE TABLE written_after_the_restore (id int)")

    code, said = _stopped_after_the_restore(stack, write_one)
    env = stack.env
    assert code == int(ExitCode.ATTENTION), said
    assert "does not match the snapshot" in said, said
    [safety] = _safety_snapshots(env)
    [error] = [line for line in said.splitlines() if line.startswith("runbook: error:")]
    [*_, logged] = [e["message"] for e in _journal_lines(said)
                    if e["level"] == "ERROR" and "WAS restored" in e["message"]]
    for text in (error, logged):  # what follows the run's own words: its final fix
        final = text.rpartition("the service is down")[2]
        assert "do not start the app on it" in final and str(safety) in final, text
        assert "runbook switch" not in final and "docker start" not in final, text
    assert not any(docker.inspect(env.slot(s).container).running for s in Slot)


def test_the_switch_a_failure_past_the_restore_names_starts_the_stopped_target(
        stack: DrillStack) -> None:
    """After a rollback that failed once the database was restored (its deploy lock removed
    meanwhile, as by `runbook unlock --force`), both slots are stopped; its fix names
    `runbook switch ENV --slot blue`. That command starts the stopped blue container (the
    switch's start step), gates it and moves traffic there: v1 serves on schema 1."""
    import shutil

    env = stack.env
    code, said = _stopped_after_the_restore(stack, lambda: shutil.rmtree(env.lock_path))
    assert code == int(ExitCode.ATTENTION), said
    assert not any(docker.inspect(env.slot(s).container).running for s in Slot)
    named = re.findall(r"`runbook switch (\S+) --slot (\w+)`", said)
    assert named == [(envmod.command_arg(env), "blue")], said
    switched = cli(env, "switch", "--slot", "blue", "--yes")  # the same, on the drill's path
    assert switched.returncode == 0, switched.stdout + switched.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    assert _database(stack)[0] == (1,)
    assert intents.read(env) is None


def _restored_but_not_matching(stack: DrillStack) -> str:
    """A rollback whose restore is followed by another session's table (the database then
    differs from the snapshot): exit 5, both slots stopped, Caddy on green."""
    def write_one() -> None:
        with stack.connect() as conn:
            conn.execute("INSERT INTO items (name) VALUES ('written-after-the-restore')")
            # a row that only adds is a live writer's, never a failed check (review H2): a
            # table the snapshot does not hold is
            conn.execute("CREATE TABLE written_after_the_restore (id int)")

    code, said = _stopped_after_the_restore(stack, write_one)
    assert code == int(ExitCode.ATTENTION), said
    assert "does not match the snapshot" in said, said
    return said


def test_an_exit_5_after_the_restore_names_no_undo_that_did_nothing(
        stack: DrillStack) -> None:
    """Found by review: every exit 5 once the database was restored said "undone: start the
    stopped app containers again (only when the database was not restored)": that undo
    started nothing (the database was restored), and Docker says both slots are stopped."""
    env = stack.env
    err = _restore_then_fail_the_gate(stack)
    assert not any(docker.inspect(env.slot(s).container).running for s in Slot)
    assert "start the stopped app containers" not in str(err.value), err.value
    assert "the database WAS restored" in str(err.value), err.value


def test_status_after_a_restore_that_does_not_match_its_snapshot_gives_the_checks_advice(
        stack: DrillStack) -> None:
    """Found by review: after a restore whose row counts did not match the snapshot (the run
    said "do not start the app on it"), status said `runbook rollback ENV --to <version>`
    "runs it again", and `runbook switch ... --slot blue` or a rollback for the stopped
    green: each starts the app on that database. Status says the run's own advice, naming
    the safety snapshot, and no fix starts the app."""
    env = stack.env
    _restored_but_not_matching(stack)
    [safety] = _safety_snapshots(env)
    out = cli(env, "status", "--format", "json")
    found = json.loads(out.stdout)["problems"]
    [doubted] = [p for p in found if "does not match the snapshot" in p["problem"]]
    assert "do not start the app on it" in doubted["fix"], doubted
    assert str(safety) in doubted["fix"], doubted
    for problem in found:
        fix = problem["fix"]
        assert "runs it again" not in fix and "runbook switch" not in fix, problem
        assert "docker start" not in fix, problem
        for command in re.findall(r"`(runbook rollback [^`]*)`", fix):
            assert "--restore-snapshot" in command, problem


def test_a_rollback_rerun_after_a_restore_that_does_not_match_its_snapshot_is_refused(
        stack: DrillStack) -> None:
    """Found by review: after a restore whose row counts did not match the snapshot, the
    same `runbook rollback` typed again (or with --to, as status advised) started v1 on that
    database and switched to it, exit 0. Refused, exit 4, nothing changed, naming the check
    that failed and the safety snapshot; the restore again it names then goes on."""
    import shlex

    env = stack.env
    _restored_but_not_matching(stack)
    [safety] = _safety_snapshots(env)
    before = _database(stack), intents.read(env)
    for extra in ([], ["--to", VERSIONS["v1"].tag]):
        again = cli(env, "rollback", *extra, "--yes")
        said = again.stdout + again.stderr
        assert again.returncode == int(ExitCode.PRECONDITION), said
        assert "does not match the snapshot" in said and str(safety) in said, said
        assert not any(docker.inspect(env.slot(s).container).running for s in Slot)
        assert traffic.read(env, proxy=False).slot == Slot.GREEN
        assert (_database(stack), intents.read(env)) == before
    [command] = re.findall(r"`runbook rollback \S+ (--to [^`]*--restore-snapshot[^`]*)`", said)
    restored = cli(env, "rollback", *shlex.split(command), "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    with stack.connect() as conn:
        assert conn.execute("SELECT count(*) FROM items WHERE name = "
                            "'written-after-the-restore'").fetchone() == (0,)


def _as_it_was(stack: DrillStack) -> dict[str, object]:
    """What a refused run must leave as it found it after a restore that did not match its
    snapshot: both slots are stopped then, so the proxy answers what Caddy's slot (green)
    answers, a 502; that answer counts, with the slot Caddy runs."""
    env = stack.env
    with drill_http.client(timeout=3) as client:
        seen = client.get(f"{env.caddy.proxy_url}/version", headers={"Connection": "close"})
    return {"state": env.state_file.read_bytes(), "caddyfile": env.caddy.caddyfile.read_bytes(),
            "caddy runs": traffic.read(env, proxy=False).slot,
            "proxy": (seen.status_code, seen.headers.get("X-Togather-Slot"), seen.text),
            # name, exists, status, image, image id, exit code, started at
            "containers": {s: dataclasses.astuple(docker.inspect(env.slot(s).container))[:7]
                           for s in Slot},
            "database": _database(stack), "intent": intents.read(env),
            "lock": env.lock_path.exists()}


@pytest.mark.parametrize("command", [["switch", "--slot", "blue"],
                                     ["deploy", "--version", VERSIONS["v1"].tag]],
                         ids=["switch", "deploy"])
def test_a_switch_or_deploy_after_a_restore_that_does_not_match_is_refused_unless_accepted(
        stack: DrillStack, command: list[str]) -> None:
    """Found by review: after a restore whose row counts did not match the snapshot (its
    check: "do not start the app on it"), a rollback was refused but `runbook switch` and
    `runbook deploy` started v1 on that database and sent users to it, exit 0. Both are
    refused, exit 4, in a dry run too, nothing changed (Caddy, the proxy's answer, the
    containers, the state file's bytes, the database), naming the failed check, the safety
    snapshot and --accept-restored-data; with that flag they go on, and the plan, the
    terminal and the journal say the check was overridden and by which flag."""
    env = stack.env
    _restored_but_not_matching(stack)
    [safety] = _safety_snapshots(env)
    before = _as_it_was(stack)
    assert before["caddy runs"] == Slot.GREEN and before["proxy"][0] == 502, before
    for extra in (["--dry-run"], ["--yes"]):
        refused = cli(env, *command, *extra)
        said = refused.stdout + refused.stderr
        assert refused.returncode == int(ExitCode.PRECONDITION), said
        [error] = [line for line in said.splitlines() if line.startswith("runbook: error:")]
        assert "does not match the snapshot" in error, error
        assert f"this {command[0]} would start the app on it; nothing was changed" in error
        assert safety.name in error and "--accept-restored-data" in error, error
        assert _as_it_was(stack) == before
    overridden = "overridden with --accept-restored-data"
    looked = cli(env, *command, "--accept-restored-data", "--dry-run", "--format", "json")
    assert looked.returncode == 0, looked.stdout + looked.stderr
    assert any(overridden in w for w in json.loads(looked.stdout)["plan"]["warnings"]), looked
    assert _as_it_was(stack) == before
    ran = cli(env, *command, "--accept-restored-data", "--yes", "--format", "json")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)  # the oracle: what serves
    assert "runbook: warning: " in ran.stderr and overridden in ran.stderr, ran.stderr
    out = json.loads(ran.stdout)
    [warning] = [w for w in out["plan"]["warnings"] if overridden in w]
    assert "does not match the snapshot" in warning, warning
    [preflight] = [s for s in out["plan"]["steps"] if s["name"] == "preflight"]
    assert overridden in preflight["details"]["restored data"], preflight
    journal = [json.loads(line) for line in Path(out["log_file"]).read_text().splitlines()]
    [planned] = [e for e in journal if e["message"].startswith("plan: ")]
    assert warning in planned["plan"]["warnings"], planned


def _operator(env: Environment, folder: Path) -> Environment:
    """The same host as another operator sees it: another user's runs and logs folders (the
    packaged files' `~/.togather/runs` is per user, its records mode 0600), the same state
    file, Caddy and containers; written to its own environment file."""
    other = dataclasses.replace(env, runs_dir=folder / "runs", log_dir=folder / "logs",
                                source=folder / "other-operator.toml")
    assert other.source is not None
    other.source.write_text(envmod.to_toml(other))
    return other


def _doubt_marker(env: Environment) -> Path:
    """Where the doubt is recorded beside the state file (the oracle: that folder's new
    hidden file, found by listing it, never by the code's own path function)."""
    folder = env.state_file.resolve().parent
    return next(p for p in folder.iterdir() if p.name.startswith(".") and "doubt" in p.name)


@pytest.mark.parametrize("command", [["switch", "--slot", "blue"],
                                     ["deploy", "--version", VERSIONS["v1"].tag],
                                     ["rollback", "--to", VERSIONS["v1"].tag]],
                         ids=["switch", "deploy", "rollback"])
def test_a_restore_that_does_not_match_is_refused_to_an_operator_with_another_runs_folder(
        stack: DrillStack, tmp_path: Path, command: list[str]) -> None:
    """Found by review: the guard read only the run records the operator running the next
    command can read, in their own runs folder: after `sudo runbook rollback
    --restore-snapshot` failed its check, another operator's plain switch, deploy or
    rollback started the app on that database, exit 0. The doubt is recorded beside the
    state file, readable by every operator: refused, exit 4, nothing changed; status says it
    too. Accepted by that operator (--accept-restored-data), or the snapshot restored again
    (a rollback has no such flag), the doubt is cleared (the journal says so), and the first
    operator's status, whose records still hold the failed check, no longer says it."""
    env = stack.env
    _restored_but_not_matching(stack)
    other = _operator(env, tmp_path)
    before = _as_it_was(stack)
    refused = cli(other, *command, "--yes")
    said = refused.stdout + refused.stderr
    assert refused.returncode == int(ExitCode.PRECONDITION), said
    [error] = [line for line in said.splitlines() if line.startswith("runbook: error:")]
    assert "does not match the snapshot" in error, error
    assert f"this {command[0]} would start the app on it; nothing was changed" in error
    assert _as_it_was(stack) == before
    marker = _doubt_marker(env)
    assert marker.stat().st_mode & 0o044 == 0o044, oct(marker.stat().st_mode)  # others read it
    out = cli(other, "status", "--format", "json")
    assert any("does not match the snapshot" in p["problem"]
               for p in json.loads(out.stdout)["problems"]), out.stdout
    if command[0] == "rollback":  # it has no flag: a restore again, its check passing, lifts it
        import shlex

        [again] = re.findall(r"`runbook rollback \S+ (--to [^`]*--restore-snapshot[^`]*)`",
                             said)
        ran = cli(other, "rollback", *shlex.split(again), "--yes")
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
        assert not marker.exists()
        mine = cli(env, "status", "--format", "json")
        assert not any("does not match the snapshot" in p["problem"]
                       for p in json.loads(mine.stdout)["problems"]), mine.stdout
        return
    ran = cli(other, *command, "--accept-restored-data", "--yes", "--format", "json")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    assert not marker.exists()
    journal = [json.loads(line)["message"]
               for line in Path(json.loads(ran.stdout)["log_file"]).read_text().splitlines()]
    assert any(str(marker) in m and "cleared" in m and "--accept-restored-data" in m
               for m in journal), journal
    mine = cli(env, "status", "--format", "json")
    assert not any("does not match the snapshot" in p["problem"]
                   for p in json.loads(mine.stdout)["problems"]), mine.stdout


def test_a_restore_doubt_that_cannot_be_read_refuses_and_says_why(
        stack: DrillStack, tmp_path: Path) -> None:
    """Fail closed: a doubt recorded beside the state file that cannot be read (here not
    JSON: a torn or hand-edited file) refuses another operator's switch, exit 4, nothing
    changed, naming the file and the way out; status says the same, never "no problems"."""
    env = stack.env
    _restored_but_not_matching(stack)
    marker = _doubt_marker(env)
    marker.write_text("{not json")
    other = _operator(env, tmp_path)
    before = _as_it_was(stack)
    refused = cli(other, "switch", "--slot", "blue", "--yes")
    said = refused.stdout + refused.stderr
    assert refused.returncode == int(ExitCode.PRECONDITION), said
    [error] = [line for line in said.splitlines() if line.startswith("runbook: error:")]
    assert str(marker) in error and "cannot be read" in error, error
    assert "--restore-snapshot" in said or "snapshot restore" in said, said
    assert _as_it_was(stack) == before
    out = cli(other, "status", "--format", "json")
    [found] = [p for p in json.loads(out.stdout)["problems"] if str(marker) in p["problem"]]
    assert found["fix"], found


def test_a_restore_killed_before_its_doubt_is_recorded_is_still_refused(
        stack: DrillStack) -> None:
    """Crash safety: a rollback whose restored database differs from the snapshot once it
    committed (another session's DELETE of schema_migrations, made during the replay, waits
    on its locks and runs right after its COMMIT; a sidecar that records other counts now
    rolls the restore back in its own transaction), killed (-9) after its check failed and
    before the doubt is written beside the state file, still leaves the failed check in its
    run record: the next switch of the same operator is refused, exit 4."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2; v1 stopped on blue
    env = stack.env

    assert env.source is not None
    proc = restoring_rollback(env, "restore.before-commit:SIGSTOP,"
                                   "restore.before-doubt-marker:SIGKILL")
    wait_stopped(proc.pid)  # its transaction holds every table, past its own checks

    def delete() -> None:  # waits on the restore's locks, then runs after its COMMIT
        with stack.connect() as conn:
            conn.execute("DELETE FROM schema_migrations")

    deleting = threading.Thread(target=delete, daemon=True)
    deleting.start()
    time.sleep(1)  # the DELETE is waiting on the lock
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    deleting.join(timeout=30)
    first = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    folder = env.state_file.resolve().parent
    assert not [p for p in folder.iterdir() if "doubt" in p.name]
    refused = cli(env, "switch", "--slot", "blue", "--yes")
    said = refused.stdout + refused.stderr
    assert refused.returncode == int(ExitCode.PRECONDITION), said
    assert "does not match the snapshot" in said, said
    assert not any(docker.inspect(env.slot(s).container).running for s in Slot)


# -- a killed restore seen by every operator (its record beside the state file) ---------------

def _psql_ended(env: Environment) -> None:
    """Wait until the killed run's psql, which reads what was sent, has ended at EOF."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and subprocess.run(
            ["docker", "exec", env.database.container, "pgrep", "-x", "psql"],
            capture_output=True, check=False).returncode == 0:
        time.sleep(0.2)


def _snapshot_restore(env: Environment, name: str, *extra: str,
                      fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """`runbook snapshot restore ENV NAME --yes` as the operator `env` (its own runs folder)."""
    assert env.source is not None
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    return subprocess.run([sys.executable, "-m", "runbook.cli", "snapshot", "restore",
                           str(env.source), name, "--yes", *extra],
                          capture_output=True, text=True, timeout=180, check=False,
                          stdin=subprocess.DEVNULL,
                          env=environ | ({faults.VARIABLE: fault} if fault else {}))


def _unfinished_record(env: Environment) -> Path:
    """The record of unfinished restores beside the state file (the oracle: that folder's
    hidden file, found by listing it, never by the code's own path function)."""
    folder = env.state_file.resolve().parent
    return next(p for p in folder.iterdir() if p.name.startswith(".") and "unfinished" in p.name)


def test_another_operators_rerun_names_the_safety_snapshot_of_a_restore_killed_mid_replay(
        stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: a `snapshot restore` killed (-9) mid-replay was known to a rerun only
    through the run records of whoever ran it (per user): another operator's rerun (or
    sudo's) named its own safety snapshot as the data from before the restore, never the
    killed run's, which holds it (here a row written after the snapshot). That operator has
    records of their own (a restore that finished earlier): what came after them still
    counts. Their dry run, then their rerun, name it (plan warnings and JSON)."""
    from runbook import snapshots

    env = arrange(stack)  # v3 serving from blue
    other = _operator(env, tmp_path)
    snap = snapshots.create(env, "manual")
    earlier = _snapshot_restore(other, snap.name)
    assert earlier.returncode == 0, earlier.stdout + earlier.stderr
    with stack.connect() as conn:
        conn.execute("INSERT INTO items (name) VALUES ('written-after-the-snapshot')")
    first = _snapshot_restore(env, snap.name, fault="restore.mid-stream:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    _psql_ended(env)
    [killed] = [p for p in _safety_snapshots(env)
                if b"written-after-the-snapshot" in gzip.decompress(p.read_bytes())]
    looked = _snapshot_restore(other, snap.name, "--dry-run", "--format", "json")
    assert looked.returncode == 0, looked.stdout + looked.stderr
    assert json.loads(looked.stdout)["plan"]["facts"]["earlier_safety_snapshot"] == str(killed)
    again = _snapshot_restore(other, snap.name, "--format", "json")
    assert again.returncode == 0, again.stdout + again.stderr
    out = json.loads(again.stdout)
    assert out["plan"]["facts"]["earlier_safety_snapshot"] == str(killed), out["plan"]["facts"]
    assert any(str(killed) in w and "killed" in w for w in out["plan"]["warnings"]), out
    assert through_proxy(env) == ("blue", V3.tag)
    with stack.connect() as conn:
        assert conn.execute("SELECT count(*) FROM items WHERE name = "
                            "'written-after-the-snapshot'").fetchone() == (0,)


def test_another_operators_status_names_a_restoring_rollback_killed_mid_replay(
        stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: after `rollback --restore-snapshot` killed (-9) mid-replay, only the
    operator whose run records hold it was told by `runbook status` that it began restoring
    the database and where the data from before is; another operator's status said neither,
    and named the restore again (`--restore-snapshot`) instead of the command that resumes
    a run whose restore began. Both operators' status say the same."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2, v1 (schema 1) before
    env = stack.env
    first = cli(env, "rollback", "--restore-snapshot", "--yes",
                fault="restore.mid-stream:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    _psql_ended(env)
    [safety] = _safety_snapshots(env)
    other = _operator(env, tmp_path)
    v1 = VERSIONS["v1"].tag
    for who in (env, other):
        out = cli(who, "status", "--format", "json")
        [found] = [p for p in json.loads(out.stdout)["problems"]
                   if "an interrupted run is unfinished" in p["problem"]]
        assert "began restoring the database first" in found["problem"], found
        assert str(safety) in found["problem"], found
        assert f"`runbook rollback {who.source} --to {v1}` runs it again" in found["fix"], found


def test_every_operators_status_names_a_standalone_restore_killed_mid_replay(
        stack: DrillStack, tmp_path: Path) -> None:
    """`runbook snapshot restore` killed (-9) mid-replay leaves the app stopped and the
    database as it was or restored (one transaction, its COMMIT's outcome unknown). Every
    operator's `runbook status` said only that users were not served (a standalone restore
    writes no record of an interrupted run): not that a restore was begun, which snapshot it
    replays and which holds the data from before it, nor that running the restore again
    finishes it. Both operators' status say so, from the record beside the state file."""
    from runbook import snapshots

    env = arrange(stack)  # v3 serving from blue
    snap = snapshots.create(env, "manual")
    first = _snapshot_restore(env, snap.name, fault="restore.mid-stream:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    _psql_ended(env)
    [safety] = _safety_snapshots(env)
    other = _operator(env, tmp_path)
    for who in (env, other):
        out = cli(who, "status", "--format", "json")
        problems = json.loads(out.stdout)["problems"]
        [found] = [p for p in problems if "was begun and not finished" in p["problem"]]
        assert snap.name in found["problem"] and str(safety) in found["problem"], found
        assert f"`runbook snapshot restore {who.source} {snap.name}`" in found["fix"], found
        # and no other problem sends on-call to a rollback first (it starts code on it)
        assert not [p for p in problems if "runbook rollback" in p["fix"]], problems
        assert not [p for p in problems if "docker start" in p["fix"]], problems
    # the killed run's own record says "running" for good: the summary says it did not end
    text = cli(env, "status").stdout
    [line] = [x for x in text.splitlines() if x.strip().startswith("last run")]
    assert "did not end" in line and "running (exit" not in line, line
    again = _snapshot_restore(other, snap.name)  # as the fix says
    assert again.returncode == 0, again.stdout + again.stderr
    assert through_proxy(env) == ("blue", V3.tag)
    out = cli(env, "status", "--format", "json")
    assert not [p for p in json.loads(out.stdout)["problems"]
                if "begun and not finished" in p["problem"]], out.stdout


def test_status_during_a_suspended_standalone_restore_says_wait_and_how_to_resume(
        stack: DrillStack) -> None:
    """Found by review: a `snapshot restore` suspended mid-replay (Ctrl-Z, SIGSTOP) holds the
    lock with the app stopped. Status's outage problems said "finish the restore that was
    begun first (see that problem)", a problem it never printed, which the lock refuses, or
    "roll back" / "switch" beside "wait". Every fix now says to wait for the run holding the
    lock, and how to resume or stop it; resumed as said, the restore ends and users are
    served."""
    from runbook import snapshots

    env = arrange(stack)  # v3 serving from blue
    snap = snapshots.create(env, "manual")
    proc = _snapshot_restore_held(env, snap.name, "restore.mid-stream:SIGSTOP")
    try:
        out = cli(env, "status", "--format", "json")
        problems = json.loads(out.stdout)["problems"]
        assert problems, out.stdout
        for problem in problems:
            fix = problem["fix"]
            assert "see that problem" not in fix, problems
            assert "runbook rollback" not in fix and "runbook switch" not in fix, problems
            assert "docker start" not in fix, problems
        said = [p for p in problems if "holds the deploy lock" in p["fix"]]
        assert said and all(f"kill -CONT {proc.pid}" in p["fix"] for p in said), problems
    finally:
        os.kill(proc.pid, signal.SIGCONT)  # as the fix says
    done, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, done + err
    assert through_proxy(env) == ("blue", V3.tag)


def test_another_operators_rerun_stopped_before_its_restore_leaves_unfit_code_stopped(
        stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: `rollback --restore-snapshot` killed (-9) once its restore committed
    (schema 1 now, v2's slot stopped); another operator's rerun, stopped before its own
    restore (a Ctrl-C), did not know of the killed run (not in its run records), so its undo
    started v2 again on schema 1, which it never ran on. It stays stopped, exit 5, saying
    why and naming the killed run's safety snapshot; the same command then finishes the
    rollback."""
    env = _restore_killed_after_its_commit(stack)
    assert _database(stack)[0] == (1,)  # the restore committed
    [safety] = _safety_snapshots(env)
    other = _operator(env, tmp_path)
    again = cli(other, "rollback", "--restore-snapshot", "--yes",
                fault="before:safety-snapshot:SIGINT")
    assert again.returncode == int(ExitCode.ATTENTION), again.stdout + again.stderr
    assert "THE SERVICE IS DOWN" in again.stderr, again.stderr
    assert not docker.inspect(env.slot(Slot.GREEN).container).running, again.stderr
    assert "schema 1" in again.stderr and str(safety) in again.stderr, again.stderr
    done = cli(other, "rollback", "--restore-snapshot", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    assert _database(stack)[0] == (1,)


def test_a_killed_restore_another_operator_resumed_is_no_longer_named_as_the_data_before(
        stack: DrillStack, tmp_path: Path) -> None:
    """`rollback --restore-snapshot` killed (-9) once its restore committed is resumed by
    another operator's `runbook rollback` (no flag), which must say the database was
    restored and where the data from before is (found by review: it said "changed nothing
    users see"). The app has served since: a later restore by the first operator, whose
    records still end at the killed run, must not name that old safety snapshot as the data
    from before it (weeks of writes later, restoring it would lose them)."""
    env = _restore_killed_after_its_commit(stack)
    [safety] = _safety_snapshots(env)
    other = _operator(env, tmp_path)
    again = cli(other, "rollback", "--yes")
    said = again.stdout + again.stderr
    assert again.returncode == 0, said
    assert "restored the database before it stopped" in said and str(safety) in said, said
    assert "changed nothing users see" not in said
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    later = _snapshot_restore(env, safety.name, "--keep-stopped", "--dry-run", "--format",
                              "json")  # at schema 2 under v1: --keep-stopped's
    assert later.returncode == 0, later.stdout + later.stderr
    assert json.loads(later.stdout)["plan"]["facts"]["earlier_safety_snapshot"] is None


def test_an_unreadable_record_of_unfinished_restores_keeps_the_serving_slot_stopped(
        stack: DrillStack, tmp_path: Path) -> None:
    """Fail closed: `rollback --restore-snapshot` killed (-9) once its restore committed
    (schema 1, v2's slot stopped), the record of unfinished restores beside the state file
    then unreadable (not JSON: torn or hand-edited). Another operator's rerun stopped before
    its restore cannot tell whether the database still fits the code that served: it leaves
    that slot stopped (exit 5), naming the file; their status names it with a fix."""
    env = _restore_killed_after_its_commit(stack)
    marker = _unfinished_record(env)
    marker.write_text("{not json")
    other = _operator(env, tmp_path)
    again = cli(other, "rollback", "--restore-snapshot", "--yes",
                fault="before:safety-snapshot:SIGINT")
    said = again.stdout + again.stderr
    assert again.returncode == int(ExitCode.ATTENTION), said
    assert not docker.inspect(env.slot(Slot.GREEN).container).running, said
    assert str(marker) in said and "cannot be read" in said, said
    out = cli(other, "status", "--format", "json")
    [found] = [p for p in json.loads(out.stdout)["problems"] if str(marker) in p["problem"]]
    assert "cannot be read" in found["problem"] and found["fix"], found


def test_ctrl_c_at_the_terminal_during_the_replay_is_held_until_the_restore_ends(
        stack: DrillStack) -> None:
    """A terminal's Ctrl-C goes to the whole process group: it reached `docker exec psql`
    too, which died mid-stream (the step's "acted on once the transaction has ended" broken,
    and a COMMIT already sent could land while the run said the restore failed). The replay
    runs in a session of its own: the restore ends whole; then, the database restored, the
    run carries on to its commit point (stopped there, the service stays down) and stops
    after it (exit 6: it took effect, its finish is left)."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2
    env = stack.env
    assert env.source is not None
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    proc = subprocess.Popen([sys.executable, "-m", "runbook.cli", "rollback",
                             "--restore-snapshot", "--yes", str(env.source)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            env=environ | {faults.VARIABLE: "restore.mid-stream:SIGSTOP"})
    wait_stopped(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: every process of the group
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == int(ExitCode.TOOK_EFFECT), err
    assert "SIGINT received after the database was restored" in err, err
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    with stack.connect() as conn:
        row = conn.execute("SELECT version FROM schema_migrations").fetchone()
    assert row is not None and int(row[0]) == 1  # the whole snapshot, committed


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_switch_only_reads_never_moves_the_users(
        stack: DrillStack, signame: str) -> None:
    """Found by review: the switch step holds signals, and one that came while it still only
    read (Caddy's config, the Caddyfile, its validation) was acted on at the commit: the
    users were moved to the target, verified there, and moved back by the undo. It stops
    before the write now: the Caddyfile and Caddy are never touched."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    caddyfile = env.caddy.caddyfile.read_bytes()
    with Poller(env) as user:
        first = cli(env, "rollback", "--yes", fault=f"switch.before-write:{signame}")
        time.sleep(0.2)
    assert first.returncode == ExitCode.FAILED_SAFELY, first.stdout + first.stderr
    assert "nothing took effect" in first.stderr, first.stderr
    assert "previous Caddyfile" not in first.stderr, first.stderr  # no undo of the switch
    assert env.caddy.caddyfile.read_bytes() == caddyfile
    assert through_proxy(env) == ("blue", V3.tag)
    assert {slot for _, slot, _ in user.seen} == {"blue"} and user.failures == []
    assert not docker.inspect(env.slot(Slot.GREEN).container).running  # started, stopped again


def _children(pid: int, name: str) -> list[int]:
    """The pids of `pid`'s child processes whose command line contains `name`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ppid = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
            if ppid == pid and name.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
    return found


def _restore_psql(stack: DrillStack) -> list[int]:
    """Host pids of the restore's psql (`--file -`) inside the database container."""
    top = subprocess.run(["docker", "top", stack.db_container, "-eo", "pid,args"],
                         capture_output=True, text=True, check=True).stdout.splitlines()[1:]
    return [int(line.split()[0]) for line in top if "psql" in line and "--file" in line]


def _restore_held(env: Environment, point: str = "restore.before-commit",
                  ) -> subprocess.Popen[str]:
    """`rollback --restore-snapshot`, stopped (SIGSTOP) at `point`: by default right before
    it sends COMMIT."""
    assert env.source is not None
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    proc = subprocess.Popen([sys.executable, "-m", "runbook.cli", "rollback",
                             "--restore-snapshot", "--yes", str(env.source)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL,
                            env=environ | {faults.VARIABLE: f"{point}:SIGSTOP"})
    wait_stopped(proc.pid)
    return proc


def _exec_and_psql(stack: DrillStack, pid: int) -> tuple[list[int], list[int]]:
    """The run's `docker exec psql` (here) and that psql (in the database container)."""
    execs = _children(pid, "psql")
    deadline = time.monotonic() + 10  # the exec may still be starting psql
    while not (found := _restore_psql(stack)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert execs and found, "no docker exec psql under the run"
    return execs, found


def _input_writers(pid: int) -> list[tuple[Path, str]]:
    """The open write ends of `pid`'s input pipe, each as its /proc fd link and the pipe: for
    the restore's psql in the container, containerd-shim's (fed by the Docker CLI)."""
    pipe = os.readlink(f"/proc/{pid}/fd/0")
    found = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):  # a process or fd gone meanwhile
            if os.readlink(fd) == pipe and os.lstat(fd).st_mode & 0o200:  # open for writing
                found.append((fd, pipe))
    return found


def _until_input_ended(writers: list[tuple[Path, str]]) -> None:
    """Until every write end in `writers` (`_input_writers`, read while the run was held) is
    closed: the Docker CLI passed on the run's whole input and its end, which the run closes
    right after COMMIT. COMMIT is then in psql's input, whatever becomes of the CLI. Never a
    fixed sleep: a resumed run can be starved for seconds on a loaded CI machine."""
    assert writers, "psql's input has no writer: the test cannot tell when COMMIT is in it"

    def still_open(fd: Path, pipe: str) -> bool:
        try:
            return os.readlink(fd) == pipe
        except OSError:
            return False

    deadline = time.monotonic() + 60
    while any(still_open(fd, pipe) for fd, pipe in writers):
        assert time.monotonic() < deadline, "psql's input was not ended within 60 s"
        time.sleep(0.01)


def test_a_restore_whose_docker_exec_dies_after_its_commit_is_finished_not_called_rolled_back(
        stack: DrillStack) -> None:
    """Found by review: once COMMIT was sent, a `docker exec` that failed (the Docker CLI
    killed, the daemon restarted) was read as psql's own failure: "restore failed and was
    rolled back", and the undo started the newer code again on the restored, older schema.
    Here psql is held (SIGSTOP) as COMMIT goes out, the Docker CLI is killed, then psql goes
    on and commits. Postgres knows what became of the transaction: the run finishes the
    rollback on the restored database and says so."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2, v1 (schema 1) before
    env = stack.env
    proc = _restore_held(env)
    held: list[int] = []
    try:
        execs, held = _exec_and_psql(stack, proc.pid)
        for pid in held:
            os.kill(pid, signal.SIGSTOP)
        writers = [w for pid in held for w in _input_writers(pid)]
        os.kill(proc.pid, signal.SIGCONT)  # COMMIT goes into psql's input, unread
        _until_input_ended(writers)
        for pid in execs:  # the Docker CLI dies; psql in the container lives on
            os.kill(pid, signal.SIGKILL)
        for pid in execs:  # dead before psql goes on
            _wait_dead(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        for pid in held:  # psql reads COMMIT: the restore commits
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert "rolled back" not in err, err
    assert proc.returncode == 0, out + err
    assert "committed" in out + err, out + err  # the exec's failure and Postgres's answer
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    assert not docker.inspect(env.slot(Slot.GREEN).container).running  # v2 never on schema 1
    assert _database(stack)[0] == (1,)


def _wait_dead(pid: int) -> None:
    """Until `pid` has closed its files: a Go program's main thread is a zombie ("Z") while
    its other threads, which share its files (the pipe), may still be exiting."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            if state in ("Z", "X") and os.listdir(f"/proc/{pid}/task") == [str(pid)]:
                return  # only the zombie leader is left: every thread has exited
        except OSError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not die")


def _dropped_and_held(stack: DrillStack) -> None:
    """Wait until another session holds a table's ACCESS EXCLUSIVE lock (the restore's DROP
    SCHEMA ran, its transaction open)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with stack.connect() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'relation' AND granted AND "
                "mode = 'AccessExclusiveLock' AND pid <> pg_backend_pid()").fetchone()
        if row and row[0]:
            return
        time.sleep(0.1)
    raise AssertionError("the restore's DROP SCHEMA never held its locks")


@pytest.mark.parametrize("point", ["restore.mid-stream", "restore.before-commit"])
def test_a_restore_whose_docker_exec_dies_before_its_commit_ends_its_session_first(
        stack: DrillStack, point: str) -> None:
    """Found by review: when the Docker CLI died mid-stream (killed, or the daemon dropping
    the exec), psql in the container lived on, its transaction open with the DROP SCHEMA's
    locks held: the undo started the app slots again at once, their /health (which reads the
    database) waited on those locks, and "traffic stays where it was" ended as exit 5 with an
    unhealthy slot. No COMMIT was sent, so the run now ends that session (Postgres rolls it
    back) before it starts the slots. Here psql is held (SIGSTOP) for the whole run. At the
    COMMIT, the pipe says the exec is gone (EPIPE): COMMIT never reached psql, which the run
    took for "sent" and then waited 10 minutes on a transaction "in progress"."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2, v1 (schema 1) before
    env = stack.env
    before = _database(stack)
    proc = _restore_held(env, point)
    held: list[int] = []
    try:
        execs, held = _exec_and_psql(stack, proc.pid)
        _dropped_and_held(stack)
        for pid in held:
            os.kill(pid, signal.SIGSTOP)
        for pid in execs:  # the Docker CLI dies; psql in the container lives on, held
            os.kill(pid, signal.SIGKILL)
        for pid in execs:  # dead (a zombie of the held run) before the run goes on
            _wait_dead(pid)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        for pid in held:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert proc.returncode == ExitCode.FAILED_SAFELY, out + err
    assert "rolled back" in err and "not healthy" not in err, err
    assert through_proxy(env) == ("green", V2.tag)
    assert _database(stack) == before


def _postmaster(stack: DrillStack) -> int:
    """The host pid of the database container's main Postgres process (its init process:
    never an exec'd psql, whose parent is outside the container too)."""
    pid = int(subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", stack.db_container],
                             capture_output=True, text=True, check=True).stdout)
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"postgres")
    return pid


@pytest.mark.long
def test_a_restore_whose_commit_postgres_cannot_place_leaves_the_app_stopped_and_is_finished(
        stack: DrillStack) -> None:
    """The same exec failure, but Postgres does not answer while the run asks it (here: its
    main process held, so no new session starts). Restored or not is unknown: old code on a
    restored schema, or new code on the old one, is worse than the service down, so the app
    slots stay stopped (exit 5), the message names the safety snapshot with the data from
    before, and the same command finishes it once Postgres answers, naming that snapshot."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2, v1 (schema 1) before
    env = stack.env
    proc = _restore_held(env)
    held: list[int] = []
    try:
        execs, found = _exec_and_psql(stack, proc.pid)
        held = [*found, _postmaster(stack)]
        for pid in held:
            os.kill(pid, signal.SIGSTOP)
        writers = [w for pid in found for w in _input_writers(pid)]
        os.kill(proc.pid, signal.SIGCONT)
        _until_input_ended(writers)  # COMMIT is in psql's input
        for pid in execs:
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        for pid in reversed(held):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert proc.returncode == ExitCode.ATTENTION, out + err
    assert "outcome is unknown" in err and "left stopped" in err, err
    assert "undone" not in err, err
    first_safety = re.search(r"the data from before the restore is in (\S+\.sql\.gz)", err)
    assert first_safety, err
    assert not docker.inspect(env.slot(Slot.GREEN).container).running  # left stopped
    assert not docker.inspect(env.slot(Slot.BLUE).container).running
    looked = cli(env, "rollback", "--restore-snapshot", "--dry-run", "--format", "json")
    assert looked.returncode == 0, looked.stdout + looked.stderr
    steps = {s["name"]: s for s in json.loads(looked.stdout)["plan"]["steps"]}
    # the data from before, not this run's own safety snapshot (of the database as it is)
    assert steps["safety-snapshot"]["details"]["the data from before"].startswith(
        f"{first_safety.group(1)}: "), steps["safety-snapshot"]
    again = cli(env, "rollback", "--restore-snapshot", "--yes")
    assert again.returncode == 0, again.stdout + again.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)
    assert _database(stack)[0] == (1,)


def test_a_finishing_run_is_called_in_progress_while_it_runs(stack: DrillStack) -> None:
    """Found by review: the run finishing a killed rollback wrote the killed run's record
    back with the dead run's pid, so while it ran (its old slot's drain and stop) `runbook
    status` said "an interrupted run is unfinished; `runbook rollback` finishes it", and a
    dry run planned a second finish instead of being refused (exit 3). The record names the
    process that carries the run now."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    assert env.source is not None
    first = cli(env, "rollback", "--yes", fault="switch.after-verify:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    finishing = subprocess.Popen([sys.executable, "-m", "runbook.cli", "rollback", "--yes",
                                  str(env.source)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                                 env=environ | {faults.VARIABLE: "before:stop-old-slot:SIGSTOP"})
    try:
        wait_stopped(finishing.pid)
        status = cli(env, "status")
        assert "a run is in progress" in status.stdout + status.stderr, status.stdout
        assert "interrupted run is unfinished" not in status.stdout + status.stderr
        planned = cli(env, "rollback", "--dry-run")
        assert planned.returncode == ExitCode.LOCKED, planned.stdout + planned.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(finishing.pid, signal.SIGCONT)
    out, err = finishing.communicate(timeout=120)
    assert finishing.returncode == 0, out + err
    assert through_proxy(env) == ("green", V2.tag) and intents.read(env) is None


@pytest.mark.parametrize(("point", "serving", "where"), [
    ("switch.after-reload", ("green", V2.tag), "it has moved traffic to green"),
    ("before:health-gate", ("blue", V3.tag), "it has not moved traffic yet")])
def test_status_of_a_suspended_run_says_where_it_is_and_names_it_the_last_run(
        stack: DrillStack, point: str, serving: tuple[str, str], where: str) -> None:
    """Found by review: a rollback suspended (SIGSTOP) just after Caddy reloaded onto green.
    `runbook status` said the run in progress "stopped before traffic moved" while its own
    traffic line said green and its JSON summary "stopped after traffic moved"; and a second
    rollback, refused at the lock (exit 3, nothing changed), became its "last run: failed
    (exit 3)", hiding the run that holds the lock. A run still running has stopped nowhere,
    before its health gate either. What the proxy answers is the oracle for where traffic
    is; the run records on disk for which run is which."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    assert env.source is not None
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    first = subprocess.Popen([sys.executable, "-m", "runbook.cli", "rollback", "--yes",
                              str(env.source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, stdin=subprocess.DEVNULL,
                             env=environ | {faults.VARIABLE: f"{point}:SIGSTOP"})
    try:
        wait_stopped(first.pid)
        assert through_proxy(env) == serving  # after the reload, Caddy serves the target
        [running] = [json.loads(p.read_text())["run_id"] for p in env.runs_dir.glob("*.json")
                     if json.loads(p.read_text())["outcome"] == "running"]
        refused = cli(env, "rollback", "--yes")
        assert refused.returncode == ExitCode.LOCKED, refused.stdout + refused.stderr
        data = json.loads(cli(env, "status", "--format", "json").stdout)
        text = cli(env, "status").stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, out + err
    assert data["traffic"]["slot"] == serving[0], data["traffic"]
    [live] = [p["problem"] for p in data["problems"] if "a run is in progress" in p["problem"]]
    for said in (live, data["interrupted"]["summary"]):
        # a run that still runs has not "stopped" anywhere, and it has moved traffic
        assert "before traffic moved" not in said and "stopped" not in said.split(";")[0], said
        assert where in said, said
    assert data["last_run"]["run_id"] == running, (data["last_run"], running)
    assert data["last_run"]["outcome"] == "running" and data["last_run"]["alive"] is True
    [line] = [x for x in text.splitlines() if x.strip().startswith("last run")]
    assert running in line and "in progress" in line and "failed" not in line, line
    # ended, it is the last run (the refused one is older and changed nothing anyway)
    after = json.loads(cli(env, "status", "--format", "json").stdout)["last_run"]
    assert (after["run_id"], after["outcome"]) == (running, "success"), after


def test_a_run_killed_after_caddy_moved_is_not_said_to_stop_before_it_when_caddy_is_unreadable(
        stack: DrillStack) -> None:
    """Found by the merged-diff review: a rollback killed between Caddy's reload and its
    commit mark leaves a record saying "prepare", and with Caddy's admin API unreadable
    `runbook status` said it "stopped before traffic moved; whether it moved traffic is
    unknown" (its JSON summary the first half alone), and the next run's refusal "stopped
    before traffic moved" while green served. What the proxy answers is the oracle."""
    from runbook import finish, status

    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    killed = cli(env, "rollback", "--yes", fault="switch.after-reload:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert through_proxy(env) == ("green", V2.tag)  # traffic moved
    pending = intents.read(env)
    assert pending is not None and pending.phase is intents.Phase.PREPARE  # never marked
    blind = env.with_(caddy=dataclasses.replace(
        env.caddy, admin_url=f"http://127.0.0.1:{closed_port()}"))
    facts = status.collect(blind)
    [problem] = [p.problem for p in status.problems(facts) if "interrupted run" in p.problem]
    with pytest.raises(RunbookError) as refused:
        finish.interrupted(blind)
    for said in (status.to_json(facts)["interrupted"]["summary"], problem,
                 refused.value.message):
        assert "before traffic moved" not in said, said
        assert "whether it moved traffic is unknown" in said, said
    # Caddy readable again: where traffic is is said, and the rerun finishes the run
    seen = status.to_json(status.collect(env))["interrupted"]["summary"]
    assert "stopped after traffic moved" in seen, seen
    again = cli(env, "rollback", "--yes")
    assert again.returncode == 0, again.stdout + again.stderr
    assert through_proxy(env) == ("green", V2.tag) and intents.read(env) is None


def test_a_record_older_than_another_tools_deploy_to_its_slot_blocks_nothing(
        stack: DrillStack) -> None:
    """Found by review: a rollback killed before its switch (v3 on blue -> v2 on green) left
    its record; then the host's deploy script deployed v3 to green, the same standby slot,
    and switched Caddy to it. The record was read as having moved traffic to a green that
    "does not answer as v2": every command was refused, and the one repair offered switched
    back, undoing the fresh deploy. The state file says what happened since: the record is
    old, status says so, and the next rollback goes on from what serves."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    first = cli(env, "rollback", "--yes", fault="before:health-gate:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert intents.read(env) is not None
    host_deploys_v3_to_green(env)
    status = cli(env, "status")
    said = status.stdout + status.stderr
    assert "record is out of date" in said and "took effect" not in said, said
    # the JSON summary says what the problem says: green serves another tool's deploy, not
    # this run's (it said "stopped after traffic moved (its record was not updated)")
    summary = json.loads(cli(env, "status", "--format", "json").stdout)["interrupted"]["summary"]
    assert "stopped before traffic moved" in summary and "after" not in summary, summary
    planned = cli(env, "rollback", "--dry-run", "--to", V2.tag)  # previous is v3 too now
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "does not answer as" not in planned.stdout + planned.stderr


def test_a_rollback_whose_target_another_tool_removed_from_the_state_file_is_finished(
        stack: DrillStack) -> None:
    """Killed after its commit; then the shell tooling rewrote the state file without the
    target deployment. Every rerun failed at its state step (exit 6), and the `runbook
    switch` it prescribed finished this very run, failing the same way: a loop only a hand
    edit of the intent record broke. What runs is recorded, as a switch records it."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    first = cli(env, "rollback", "--yes", fault="switch.after-verify:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    st = states.read_state(env.state_file)
    assert st.previous is not None and st.previous.version == V2.tag
    states.write_state(env.state_file, dataclasses.replace(
        st, previous=None, history=tuple(d for d in st.history if d.version != V2.tag)))
    done = cli(env, "rollback", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    st = states.read_state(env.state_file)
    assert st.current is not None and (st.current.version, st.current.active_slot) == (
        V2.tag, Slot.GREEN)
    assert intents.read(env) is None and through_proxy(env) == ("green", V2.tag)


@pytest.mark.long
def test_a_target_that_fails_after_its_gate_never_has_the_old_slot_stopped_under_it(
        stack: DrillStack) -> None:
    """Found by review: one healthy answer passed the gate, and nothing asked the new slot
    again before the old one was stopped. A build that fails seconds after it starts (here:
    its database stops answering, so /health fails while /version still answers) had the
    last good slot stopped under it: an outage reported as a success. Now the old slot is
    kept, the run says the change took effect and how to switch back, and the finish it
    names checks again (it stopped the old slot regardless, the self-review found): only
    once the new slot is healthy does the old one stop."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    assert env.source is not None
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    environ[faults.VARIABLE] = "before:stop-old-slot:SIGSTOP"
    run = subprocess.Popen([sys.executable, "-m", "runbook.cli", "rollback", "--yes",
                            str(env.source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, stdin=subprocess.DEVNULL, env=environ)
    paused = False
    try:
        wait_stopped(run.pid)
        stack.docker("pause", stack.db_container)  # tried again if the freezer gives up
        paused = True
        os.kill(run.pid, signal.SIGCONT)
        _, err = run.communicate(timeout=120)
        assert "Traceback" not in err
        assert run.returncode == ExitCode.TOOK_EFFECT, err
        assert "no longer answers healthy" in err and \
            f"`runbook switch {command_arg(env)} --slot blue`" in err, err
        # the switch back comes first, the finish only after it (found by review: the two
        # were said side by side, and a rerun while the new slot flaps stops the old one)
        assert f"first switch back now: `runbook switch {command_arg(env)} --slot blue`" in err, err
        assert err.index("first switch back now") < err.index("only after that, run"), err
        assert docker.inspect(env.slot(Slot.BLUE).container).running
        finish = cli(env, "rollback", "--yes")  # the command the message names
        assert finish.returncode == ExitCode.TOOK_EFFECT, finish.stderr
        assert "no longer answers healthy" in finish.stderr, finish.stderr
        assert docker.inspect(env.slot(Slot.BLUE).container).running
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(run.pid, signal.SIGCONT)
        if paused:
            stack.docker("unpause", stack.db_container)
    done = cli(env, "rollback", "--yes")
    assert done.returncode == 0, done.stderr
    assert not docker.inspect(env.slot(Slot.BLUE).container).running
    assert through_proxy(env) == ("green", V2.tag)


def test_a_rerun_without_the_restore_flag_says_the_service_is_down_and_names_the_finish(
        stack: DrillStack) -> None:
    """Found by review: `rollback --restore-snapshot` killed once its maintenance stop had
    stopped the serving slot, before its restore committed. status advised `runbook rollback`
    (no flag); that rerun was refused by the schema guard ("or pass --force", which puts the
    old code on the newer schema) and never said users were getting errors. Now both name
    the stopped slot's state and the command that finishes the run as it was started."""
    stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2, v1 (schema 1) before
    env = stack.env
    first = cli(env, "rollback", "--restore-snapshot", "--yes",
                fault="after:stop-app-slots:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    again = cli(env, "rollback", "--yes")
    assert again.returncode == ExitCode.PRECONDITION, again.stderr
    assert "left the serving slot green" in again.stderr and "STOPPED: users get errors" \
        in again.stderr, again.stderr
    v1 = VERSIONS["v1"].tag  # the command names its target too (found by review)
    assert f"runbook rollback {command_arg(env)} --to {v1} --restore-snapshot --snapshot " \
        in again.stderr, again.stderr
    status = cli(env, "status")
    assert "--restore-snapshot --snapshot " in status.stdout + status.stderr, status.stdout
    command = again.stderr.split("`runbook rollback ", 1)[1].split("`", 1)[0].split()
    assert command[0] == command_arg(env), command
    done = cli(env, "rollback", *command[1:], "--yes")
    assert done.returncode == 0, done.stderr
    assert through_proxy(env) == ("blue", VERSIONS["v1"].tag)


def test_an_interrupted_rollback_to_a_named_version_is_never_rerun_to_another(
        stack: DrillStack) -> None:
    """Found by review: `rollback --to v1` killed before its switch said "run `runbook
    rollback ENV` again", and status the same: that command went to the previous deployment
    (v2), the version on-call had chosen to skip. The commands name v1 now, and a rerun
    without --to is refused (exit 4) until on-call names the one meant."""
    env = arrange(stack)  # v3 serves, v2 the previous, v1 before it (schema 1: --force)
    v1 = VERSIONS["v1"].tag
    first = cli(env, "rollback", "--to", v1, "--force", "--yes",
                fault="before:switch:SIGKILL")
    assert first.returncode == -9, first.stderr
    assert through_proxy(env) == ("blue", V3.tag)  # killed before the switch
    status = json.loads(cli(env, "status", "--format", "json").stdout)
    said = " ".join(p["problem"] + " " + p["fix"] for p in status["problems"])
    assert f"--to {v1}" in said, status["problems"]
    state_before = env.state_file.read_bytes()
    again = cli(env, "rollback", "--yes")
    assert again.returncode == 4, again.stderr
    assert f"an interrupted rollback was going to {v1}" in again.stderr, again.stderr
    assert f"--to {v1}" in again.stderr and "nothing was changed" in again.stderr
    assert through_proxy(env) == ("blue", V3.tag)
    assert env.state_file.read_bytes() == state_before


def test_an_interrupted_rollback_is_judged_by_what_serves_when_the_file_was_swapped(
        stack: DrillStack) -> None:
    """The "an interrupted rollback was going elsewhere" check compared the interrupted run's
    from-version (what served) with the state file's current: once the old tooling's rollback
    swapped current and previous there (Caddy untouched, v3 still serving), a rerun without
    --to was refused as "the file is out of date" with no word of the interrupted `--to v1`
    or the command that finishes it. Judged by what serves, it is named."""
    env = arrange(stack)  # v3 serves, v2 the previous, v1 before it (schema 1: --force)
    v1 = VERSIONS["v1"].tag
    first = cli(env, "rollback", "--to", v1, "--force", "--yes",
                fault="before:switch:SIGKILL")
    assert first.returncode == -9, first.stderr
    lying = states.read_state(env.state_file, environment=env.name)
    assert lying.current is not None and lying.previous is not None
    states.write_state(env.state_file, lying.with_(current=lying.previous,
                                                   previous=lying.current))
    assert through_proxy(env) == ("blue", V3.tag)  # the oracle: what users get
    state_before = env.state_file.read_bytes()
    again = cli(env, "rollback", "--yes")
    assert again.returncode == 4, again.stderr
    assert f"an interrupted rollback was going to {v1}" in again.stderr, again.stderr
    assert f"`runbook rollback {command_arg(env)} --to {v1}`" in again.stderr, again.stderr
    assert f"--to {V3.tag}`" not in again.stderr, again.stderr  # v3 serves already
    assert "nothing was changed" in again.stderr, again.stderr
    assert through_proxy(env) == ("blue", V3.tag)
    assert env.state_file.read_bytes() == state_before


def test_a_failed_rerun_of_a_killed_rollback_leaves_no_record_behind(stack: DrillStack) -> None:
    """Found by review: `kill -9` of a rollback before its gate, then the same rollback
    again, stopped before traffic moved too: the rerun put the dead run's own record back
    as "the interrupted run's record it replaced", so status said "an interrupted run is
    unfinished" for good. The rerun is that rollback again: its record supersedes the dead
    one's (as a deploy's rerun does)."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    first = cli(env, "rollback", "--yes", fault="before:health-gate:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert intents.read(env) is not None
    failed = cli(env, "rollback", "--yes", fault="before:switch:SIGINT")
    assert failed.returncode == 1, failed.stderr  # stopped before traffic moved: undone
    assert "put back the interrupted run's record" not in failed.stderr, failed.stderr
    assert intents.read(env) is None, intents.read(env)
    assert through_proxy(env) == ("blue", V3.tag)
    status = cli(env, "status")
    # the last run's own failure ("interrupted by SIGINT ...") is said under it; no
    # problem names an interrupted run left to finish
    problems = status.stdout.partition("Problems:")[2]
    assert "interrupted" not in problems + status.stderr, status.stdout
    assert "last run" in status.stdout and "interrupted by SIGINT" in status.stdout
    done = cli(env, "rollback", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("green", V2.tag) and intents.read(env) is None


def test_a_failed_rerun_of_a_killed_switch_leaves_no_record_behind(stack: DrillStack) -> None:
    """As for a rollback: a switch killed before its gate, then the same switch stopped
    before traffic moved, put the dead switch's record back, and status called it
    unfinished for good."""
    stack.reset()  # blue serves v1, green runs v1 too
    env = stack.env
    first = cli(env, "switch", "--slot", "green", "--yes", fault="before:health-gate:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert intents.read(env) is not None
    failed = cli(env, "switch", "--slot", "green", "--yes", fault="before:switch:SIGINT")
    assert failed.returncode == 1, failed.stderr
    assert "put back the interrupted run's record" not in failed.stderr, failed.stderr
    assert intents.read(env) is None, intents.read(env)
    assert through_proxy(env)[0] == "blue"
    status = cli(env, "status")
    # the last run's own failure ("interrupted by SIGINT ...") is said under it; no
    # problem names an interrupted run left to finish
    problems = status.stdout.partition("Problems:")[2]
    assert "interrupted" not in problems + status.stderr, status.stdout
    assert "last run" in status.stdout and "interrupted by SIGINT" in status.stdout


def test_a_killed_deploy_is_not_finished_over_another_tools_deploy_of_the_same_version(
        stack: DrillStack) -> None:
    """Found by review: `runbook deploy --version v2` killed before its switch; then the
    host's deploy script deployed v2 to green, switched and recorded it. The killed run's
    record was read as having moved traffic (same slot, same version): `runbook rollback`
    was refused, and the deploy it prescribed recorded a second v2 (current and previous
    both v2), after which a rollback said "already the current deployment". A deployment
    recorded on the target slot since the record started, with another id, supersedes it;
    finishing the old record over it records nothing."""
    stack.reset()  # v1 serving from blue
    env = stack.env
    v1, v2 = VERSIONS["v1"], VERSIONS["v2"]
    first = cli(env, "deploy", "--version", v2.tag, "--yes", fault="before:switch:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    killed = intents.read(env)
    assert killed is not None and killed.target == Slot.GREEN
    host_deploys_v3_to_green(env, "v2")
    theirs = states.read_state(env.state_file)
    assert theirs.current is not None and theirs.current.version == v2.tag
    status = cli(env, "status")
    said = status.stdout + status.stderr
    assert "record is out of date" in said and "took effect" not in said, said
    planned = cli(env, "rollback", "--dry-run", "--force")  # v2 migrated: schema 2
    said = planned.stdout + planned.stderr
    assert planned.returncode == 0, said
    assert "took effect and is not finished" not in said, said
    assert f"from {v2.tag} (green) to {v1.tag} (blue)" in said, said
    again = cli(env, "deploy", "--version", v2.tag, "--yes")
    assert again.returncode == 4 and "already serves" in again.stderr, again.stderr
    after = states.read_state(env.state_file)
    assert after.current is not None and after.current.id == theirs.current.id
    assert after.previous is not None and after.previous.version == v1.tag, after.previous
    # the killed run's finish, had it been reached, records nothing over theirs
    ctx = StepContext(Step("state", "Record the deployment"), env=env)
    recording.deploy(env, killed, slots.Observed(), "dep_finish", ctx)
    assert states.read_state(env.state_file) == after, ctx.notes
    assert "already recorded" in str(ctx.notes), ctx.notes
    assert through_proxy(env) == ("green", v2.tag)


HOLD_LOCK = """
import os, sys
from runbook import environment, lock
env = environment.load_file(__import__('pathlib').Path(sys.argv[1]))
held = lock.acquire(env, reason='deploy.sh', run_id='dep_other')
print('held', flush=True)
if sys.stdin.readline().strip() == 'release':
    lock.release(held)
os._exit(0)  # else it dies holding it, as a killed run would
"""


def test_a_dry_run_meets_the_deploy_lock_as_the_real_run_does(stack: DrillStack) -> None:
    """Found by review: while a live process held the deploy lock, `--dry-run` printed a
    normal plan (exit 0, the holder only named) and the real run was refused (exit 3). The
    dry run judges the lock as taking it would: refused while its holder runs, and a dead
    holder's lock said to be taken over. Oracle: the real run against the same lock."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    assert env.source is not None
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(env.source)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        real = cli(env, "rollback", "--yes")
        assert real.returncode == ExitCode.LOCKED, real.stdout + real.stderr
        planned = cli(env, "rollback", "--dry-run")
        said = planned.stdout + planned.stderr
        assert planned.returncode == ExitCode.LOCKED, said
        assert f"pid {holder.pid}" in planned.stderr, said
    finally:
        assert holder.stdin is not None
        holder.stdin.write("die\n")  # killed holding it: the lock is stale now
        holder.stdin.close()
        holder.wait(30)
    assert through_proxy(env) == ("blue", V3.tag)
    planned = cli(env, "rollback", "--dry-run")
    said = planned.stdout + planned.stderr
    assert planned.returncode == 0, said
    assert "would be taken over" in planned.stdout and f"pid {holder.pid}" in said, said


def test_the_intent_record_is_created_with_the_state_files_mode_and_group(
        stack: DrillStack) -> None:
    """Found by review: the intent record was always created 0600, owned by whoever ran: on a
    host whose state file is shared by a deploy group (0660, group deploy), another on-call
    user could not read a killed run's record, and every command then refused (exit 4,
    "cannot read the interrupted run's record"). It takes the state file's mode and group,
    as a rewrite of the state file keeps them. Oracle: os.stat of both files."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    state = Path(os.path.realpath(env.state_file))
    before = state.stat()
    shared_gid = 4242  # a deploy group (root may give a file to any gid)
    try:
        os.chown(state, -1, shared_gid)
        os.chmod(state, 0o660)
        first = cli(env, "rollback", "--yes", fault="before:health-gate:SIGKILL")
        assert first.returncode == -signal.SIGKILL, first.stderr
        record = intents.path(env).stat()
        assert (record.st_mode & 0o777, record.st_gid) == (0o660, shared_gid), (
            oct(record.st_mode), record.st_gid)
        done = cli(env, "rollback", "--yes")  # finishes it as before
        assert done.returncode == 0, done.stdout + done.stderr
        assert intents.read(env) is None and through_proxy(env) == ("green", V2.tag)
    finally:
        os.chown(state, before.st_uid, before.st_gid)
        os.chmod(state, before.st_mode & 0o7777)


def test_status_after_a_committed_run_whose_target_crashed_names_the_switch_back(
        stack: DrillStack) -> None:
    """Found by review: a rollback killed after its commit, then its target (green) crashed.
    Status judged the record only by which slot Caddy runs: "it took effect ... `runbook
    rollback --to v2` finishes it" (which refuses, exit 4) and "stop the standby blue (it
    takes no traffic)", blue being the only healthy slot. It now decides as the next run
    does (the target must answer as its version through the proxy) and names the switch
    back; the standby is never called spare while a record points at it or the serving slot
    does not answer. Oracles: the rollback's own refusal, then the switch it names."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    first = cli(env, "rollback", "--yes", fault="switch.after-verify:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    subprocess.run(["docker", "kill", env.slot(Slot.GREEN).container], check=True,
                   capture_output=True)  # the target crashes
    refused = cli(env, "rollback", "--yes", "--to", V2.tag)
    assert refused.returncode == 4 and "does not answer as" in refused.stderr, refused.stderr
    out = cli(env, "status", "--format", "json")
    found = json.loads(out.stdout)["problems"]
    said = [p for p in found if p["check"] == "interrupted_run"]
    assert len(said) == 1, out.stdout
    fix = f"runbook switch {command_arg(env)} --slot blue"
    assert "it took effect: traffic is on" not in said[0]["problem"], said
    assert "finishes it" not in said[0]["fix"], said
    assert "does not answer as" in said[0]["problem"] and fix in said[0]["fix"], said
    blue = env.slot(Slot.BLUE).container
    assert not any(f"docker stop {blue}" in (p["fix"] or "") for p in found), found
    repaired = cli(env, "switch", "--slot", "blue", "--yes")  # the command status names
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert through_proxy(env) == ("blue", V3.tag) and intents.read(env) is None


def test_the_file_is_written_back_in_line_beside_a_record_that_never_moved_traffic(
        stack: DrillStack) -> None:
    """Found by review: a rollback killed between its Caddyfile write and its reload left the
    file naming green while Caddy runs blue, and its "traffic did not move" record. The
    switch that only writes the file back in line with what runs was refused while that
    record was open; status offered a rerun (users sent to green) or a hand edit. It now
    writes the file back and keeps that record as it is. Oracles: the file on disk, the
    proxy's answer, the record's bytes."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    first = cli(env, "rollback", "--yes", fault="switch.after-write:SIGKILL")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert caddy.inspect(caddy.read(env), env).slot == Slot.GREEN
    assert through_proxy(env) == ("blue", V3.tag)
    kept = intents.path(env).read_bytes()
    status = cli(env, "status", "--format", "json")
    fixes = [p["fix"] for p in json.loads(status.stdout)["problems"]
             if p["check"] == "caddyfile_differs_from_what_runs"]
    assert len(fixes) == 1 and f"runbook switch {env.source} --slot blue" in fixes[0], fixes
    back = cli(env, "switch", "--slot", "blue", "--yes")
    assert back.returncode == 0, back.stdout + back.stderr
    assert caddy.inspect(caddy.read(env), env).slot == Slot.BLUE
    assert through_proxy(env) == ("blue", V3.tag)
    assert intents.path(env).read_bytes() == kept  # the record kept as it was
    done = cli(env, "rollback", "--yes")  # which the next rollback goes on from
    assert done.returncode == 0, done.stdout + done.stderr
    assert through_proxy(env) == ("green", V2.tag) and intents.read(env) is None


_KILLED_ONCE_THE_INTENT_IS_CLEARED = """
import os, signal
import runbook.startup
from runbook import intent
cleared = intent.clear
def clear(*args, **kwargs):
    out = cleared(*args, **kwargs)
    if out:  # the run's last step is done and its intent gone: lock and journal left
        os.kill(os.getpid(), signal.SIGKILL)
    return out
intent.clear = clear
from runbook import cli
cli.main()
"""


def test_a_rollback_killed_after_its_last_step_leaves_no_lock_once_rerun(
        stack: DrillStack) -> None:
    """Found by a kill fuzz: a rollback SIGKILLed once its intent record was cleared (every
    step done; the lock and the journal's finish left). The rerun took the stale lock over,
    was refused while planning (nothing left to do), and left the state file's copy of the
    dead run's lock: status then asked for `runbook unlock`, and the Go CLI, which reads only
    that copy, was blocked for 30 minutes after a rollback that had fully succeeded."""
    env = arrange(stack)
    assert env.source is not None
    first = subprocess.run([sys.executable, "-c", _KILLED_ONCE_THE_INTENT_IS_CLEARED,
                            "rollback", "--yes", str(env.source)], capture_output=True,
                           text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert through_proxy(env) == ("green", V2.tag)
    assert json.loads(env.state_file.read_text())["lock"]["locked"] is True
    again = cli(env, "rollback", "--yes")
    assert "took over a stale deploy lock" in again.stderr, again.stderr
    assert "cleared the state file's copy of the stale lock" in again.stderr, again.stderr
    assert states.read_state(env.state_file).lock == {"locked": False}
    assert not env.lock_path.exists()
    status = cli(env, "status")
    assert "unlock" not in status.stdout + status.stderr, status.stdout
    assert through_proxy(env) == ("green", V2.tag)


def test_a_rerun_after_a_rollback_killed_holding_its_lock_says_that_run_completed(
        stack: DrillStack) -> None:
    """Found by a kill fuzz: a rollback SIGKILLed after its last step (traffic moved, the
    rollback recorded, its intent record cleared; the lock left). The rerun took the stale
    lock over and refused, exit 4, "rolled back from", never saying that the run it took the
    lock from had finished: on-call read a failure. The refusal now says the killed run
    completed, where traffic is, and that nothing is left to do; it still changes nothing.
    Oracles: the proxy's answer, the killed process's pid, the files' bytes, status."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    _killed_then_typed_again(env, ("rollback",), ("rollback",), "rollback", "rolled back from")
    # and status confirms it, as the line says
    status = json.loads(cli(env, "status", "--format", "json").stdout)
    assert status["traffic"]["slot"] == "green", status["traffic"]
    assert status["problems"] == [], status["problems"]
    # typed again with no lock taken over: the refusal alone, naming no killed run
    plain = cli(env, "rollback", "--yes")
    assert plain.returncode == ExitCode.PRECONDITION, plain.stderr
    assert "rolled back from" in plain.stderr and "killed run" not in plain.stderr, plain.stderr


# (the command killed after its last step, the command typed next, what the killed run was,
# the refusal the rerun still gives after saying so)
KILLED_THEN_TYPED = [
    (("deploy", "--version", V2.tag), ("deploy", "--version", V2.tag), "deploy",
     f"{V2.tag} already serves, from the green slot"),
    (("switch", "--slot", "green"), ("switch", "--slot", "green"), "switch",
     "the green slot already takes traffic"),
    (("rollback",), ("rollback", "--to", V2.tag), "rollback",
     f"{V2.tag} already serves, from the green slot"),
    # the switch back to the previous version is recorded as a rollback (its run id as the
    # rollback's): the line names what the killed run was, a switch, not the rerun's action
    (("switch", "--slot", "green"), ("rollback",), "switch", "rolled back from"),
]


@pytest.mark.parametrize(("killed_as", "typed", "was", "refused_as"), KILLED_THEN_TYPED,
                         ids=["deploy", "switch", "rollback-to", "switch-then-rollback"])
def test_a_rerun_after_a_deploy_or_switch_killed_holding_its_lock_says_that_run_completed(
        stack: DrillStack, killed_as: tuple[str, ...], typed: tuple[str, ...], was: str,
        refused_as: str) -> None:
    """Found by review of the rollback's case above: a deploy or a switch SIGKILLed after its
    last step (traffic moved, recorded, its intent record cleared; the lock left), then the
    same command typed again (or a rollback named `--to` the version that now serves): the
    rerun took the stale lock over and refused, exit 4, "already serves" / "already takes
    traffic", never saying that the run it took the lock from had finished. Each now says
    it first, naming what that run was, and still changes nothing. Oracles: the proxy's
    answer, the killed process's pid, the files' bytes."""
    env = arrange(stack)  # v3 serving from blue, v2 stopped on green
    _killed_then_typed_again(env, killed_as, typed, was, refused_as)
    # typed again with no lock taken over: the refusal alone, naming no killed run
    plain = cli(env, *typed, "--yes")
    assert plain.returncode == ExitCode.PRECONDITION, plain.stderr
    assert refused_as in plain.stderr and "killed run" not in plain.stderr, plain.stderr


def _killed_then_typed_again(env: Environment, killed_as: tuple[str, ...],
                             typed: tuple[str, ...], was: str, refused_as: str, *,
                             serving: tuple[str, str] = ("green", V2.tag),
                             fault: str | None = None) -> tuple[str, str]:
    """`killed_as` SIGKILLed once its intent record is cleared (traffic on `serving`, the
    lock left), or at `fault`, then `typed`: the rerun takes the lock over, says the killed
    run (its pid, what it `was`) completed, where traffic is and that nothing is left,
    refuses as `refused_as` (exit 4), and changes nothing but the dead run's lock. Returns
    the killed run's id (the run record it left) and the line saying so."""
    killed, run_id = _kill(env, killed_as, fault)
    assert intents.read(env) is None and env.lock_path.exists()
    assert through_proxy(env) == serving
    recorded = states.read_state(env.state_file).with_(lock={})
    caddyfile = env.caddy.caddyfile.read_bytes()
    again = cli(env, *typed, "--yes")
    assert again.returncode == ExitCode.PRECONDITION, again.stdout + again.stderr
    lines = again.stderr.splitlines()
    took = [i for i, line in enumerate(lines) if "took over a stale deploy lock" in line]
    refused = [i for i, line in enumerate(lines) if line.startswith("runbook: error:")]
    assert took and refused, again.stderr
    said = [line for line in lines[took[0] + 1:refused[0] + 1]
            if f"pid {killed}" in line and f"had completed its {was} before" in line]
    assert said, again.stderr
    assert f"traffic is on {serving[0]} {serving[1]}" in said[0], said[0]
    assert "nothing is left to do" in said[0], said[0]
    assert f"`runbook status {command_arg(env)}`" in said[0], said[0]
    assert refused_as in lines[refused[0]], lines[refused[0]]
    # it changed nothing (but the dead run's lock, taken over and released)
    assert states.read_state(env.state_file).with_(lock={}) == recorded
    assert env.caddy.caddyfile.read_bytes() == caddyfile
    assert through_proxy(env) == serving and not env.lock_path.exists()
    return run_id, said[0]


def _kill(env: Environment, command: tuple[str, ...], fault: str | None = None,
          harness: str = _KILLED_ONCE_THE_INTENT_IS_CLEARED) -> tuple[int, str]:
    """`command --yes` run through the real CLI and SIGKILLed: at `fault`, or else where
    `harness` kills it. Returns its pid and its run id (the one run record it left)."""
    assert env.source is not None
    before = set(env.runs_dir.glob("*.json"))
    argv = ["-m", "runbook.cli"] if fault else ["-c", harness]
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE} | (
        {faults.VARIABLE: f"{fault}:SIGKILL"} if fault else {})
    killed = subprocess.Popen([sys.executable, *argv, *command, "--yes", str(env.source)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ,
                              stdin=subprocess.DEVNULL, text=True)
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err
    left = set(env.runs_dir.glob("*.json")) - before
    assert len(left) == 1, left
    return killed.pid, left.pop().stem


# Found by ba6f3c1's own note: a switch between two slots running the same version keeps
# the state file's record (its id) and only moves its slot, so the file names no run that
# did it, and the rerun gave the refusal alone. The killed run's own record says it then.
V1 = VERSIONS["v1"]
SAME_VERSION = [
    # the same switch typed again; a deploy of the version that serves
    (("switch", "--slot", "green"), None, ("switch", "--slot", "green"),
     "the green slot already takes traffic"),
    (("switch", "--slot", "green"), None, ("deploy", "--version", V1.tag),
     f"{V1.tag} already serves, from the green slot"),
    # the switch that only records what serves (the file said blue, Caddy ran green; no
    # intent record of its own), killed after its state step
    (("switch", "--slot", "green"), "after:state", ("switch", "--slot", "green"),
     "the green slot already takes traffic"),
]


@pytest.mark.parametrize(("killed_as", "fault", "typed", "refused_as"), SAME_VERSION,
                         ids=["switch", "then-deploy", "record-only"])
def test_a_rerun_after_a_same_version_switch_killed_holding_its_lock_says_it_completed(
        stack: DrillStack, killed_as: tuple[str, ...], fault: str | None,
        typed: tuple[str, ...], refused_as: str) -> None:
    """A switch between two slots running the same version, SIGKILLed after its last step
    (the lock left): the rerun took the stale lock over and refused, exit 4, saying nothing
    of the killed run, as the state file names no run that did it. It now says that run
    completed, naming it (its pid and its run id, as its run record has them), and still
    changes nothing. Oracles: the proxy's answer, the killed process's pid, the run record
    it left, the files' bytes."""
    stack.reset()  # v1 on both slots, blue serving and recorded
    env = stack.env
    assert through_proxy(env) == ("blue", V1.tag)
    if fault == "after:state":  # another tool recorded blue while Caddy runs green
        moved = cli(env, "switch", "--slot", "green", "--yes")
        assert moved.returncode == 0, moved.stdout + moved.stderr
        st = states.read_state(env.state_file)
        assert st.current is not None
        states.write_state(env.state_file,
                           st.with_(current=st.current.with_(active_slot=Slot.BLUE)))
    run_id, said = _killed_then_typed_again(env, killed_as, typed, "switch", refused_as,
                                            serving=("green", V1.tag), fault=fault)
    assert f"run {run_id}" in said, said
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.active_slot == Slot.GREEN
    # typed again with no lock taken over: the refusal alone, naming no killed run
    plain = cli(env, *typed, "--yes")
    assert plain.returncode == ExitCode.PRECONDITION, plain.stderr
    assert refused_as in plain.stderr and "killed run" not in plain.stderr, plain.stderr


_KILLED_BEFORE_ITS_FIRST_STEP = """
import os, signal
import runbook.startup
from runbook import run
def execute(*args, **kwargs):  # planned, the lock held, nothing changed, no intent record
    os.kill(os.getpid(), signal.SIGKILL)
run.execute = execute
from runbook import cli
cli.main()
"""


@pytest.mark.parametrize("how", ["record-lost-its-last-write", "switch-back-before-any-change",
                                 "switch-back-before-its-commit"])
def test_a_rerun_says_no_killed_run_completed_that_its_run_record_does_not_show(
        stack: DrillStack, how: str) -> None:
    """The other side of the test above: with the same version on both slots, green serving
    and recorded, the run whose stale lock a rerun of `runbook switch --slot green` takes
    over is not said to have completed unless its own run record shows a switch to green
    whose every step ended, the state step included: a record that lost its last write (a
    power loss keeps only what was fsynced: the state step still running), a switch back to
    blue SIGKILLed before its first step (no intent record: its plan alone), or one killed
    before its commit (its intent record waits). The refusal is given alone, exit 4, and
    nothing changes."""
    stack.reset()  # v1 on both slots, blue serving and recorded
    env = stack.env
    if how == "record-lost-its-last-write":
        _, run_id = _kill(env, ("switch", "--slot", "green"))
        path = env.runs_dir / f"{run_id}.json"
        record = json.loads(path.read_text())
        state = [s for s in record["steps"] if s["name"] == "state"]
        assert state and state[0]["status"] == "ok", record["steps"]
        state[0]["status"], state[0]["duration_ms"] = "running", None
        path.write_text(json.dumps(record, indent=2))
    else:
        moved = cli(env, "switch", "--slot", "green", "--yes")
        assert moved.returncode == 0, moved.stdout + moved.stderr
        if how == "switch-back-before-any-change":
            _kill(env, ("switch", "--slot", "blue"), harness=_KILLED_BEFORE_ITS_FIRST_STEP)
            assert intents.read(env) is None
        else:
            _kill(env, ("switch", "--slot", "blue"), fault="before:switch")
            assert intents.read(env) is not None
    assert env.lock_path.exists() and through_proxy(env) == ("green", V1.tag)
    recorded = states.read_state(env.state_file).with_(lock={})
    caddyfile = env.caddy.caddyfile.read_bytes()
    again = cli(env, "switch", "--slot", "green", "--yes")
    assert again.returncode == ExitCode.PRECONDITION, again.stdout + again.stderr
    assert "took over a stale deploy lock" in again.stderr, again.stderr
    assert "the green slot already takes traffic" in again.stderr, again.stderr
    assert "completed" not in again.stderr and "killed run" not in again.stderr, again.stderr
    assert states.read_state(env.state_file).with_(lock={}) == recorded
    assert env.caddy.caddyfile.read_bytes() == caddyfile
    assert through_proxy(env) == ("green", V1.tag) and not env.lock_path.exists()
