"""A full disk, for real: the runbook's own files (state file, deploy lock, journal, run
records, intent record) on a small tmpfs that fills up to the last byte at a point of a real
`runbook rollback` on the drill, through the real CLI, while a user polls through Caddy.

The disk fills where the drill's fault point stops the run (SIGSTOP), before the run goes on
(SIGCONT). Whatever the point:
- users see no failed request, and traffic stays on a healthy slot;
- the run says in one line what happened and names the full disk and the directory to free,
  never a traceback and never "check the permissions" alone;
- when journal writes were lost, the run says so: the journal is not the whole record;
- `runbook status` tells what runs, not what the interrupted run's record last said;
- once there is room again, one more `runbook rollback` finishes the job, with no hand edit.

The Caddyfile stays on the machine's disk: the proxy's directory is Caddy's, and a full
`/etc` is a different host. Needs root to mount the tmpfs (skipped, saying so, otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runbook import docker, faults, slots, snapshots
from runbook import environment as envmod
from runbook import intent as intents
from runbook import state as states
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot
from tests.drill_checks import Poller, fill, through_proxy, tmpfs, use_up_inodes, wait_stopped
from tests.matrix import sample

pytestmark = pytest.mark.docker
V2, V3 = VERSIONS["v2"], VERSIONS["v3"]

# "start": full before the run begins; otherwise the fault point at which the disk fills.
# Before the commit (the lock, the intent), at the commit (Caddy reloaded, not yet verified:
# the intent cannot be marked committed), and after it (only the journal is left to write).
# "caddyfile": the Caddyfile on that disk too, full from the moment the gate has passed: the
# switch cannot write it, so traffic never moves.
# "read-only": the filesystem remounted read-only once the standby has started, as ext4 does
# with errors=remount-ro when it finds an error, and read-write again before the next run.
# "inodes": room in bytes, but no inode left before the run (many small files): `df -h` shows
# space, so the fix must point at `df -i`.
EVERY = ["start", "before:start-slot", "switch.after-reload", "before:stop-old-slot",
         "caddyfile", "read-only", "inodes"]
# make test: before the run, at the commit point, and a remount mid-run; nightly: all seven
CELLS = sample(EVERY, ["start", "switch.after-reload", "read-only"])
POINTS = {"caddyfile": "before:switch", "read-only": "before:start-slot"}


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


def fill_up(where: Path) -> None:
    fill(where)
    with pytest.raises(OSError) as full:
        (where / "probe").write_bytes(b"x" * 4096)
    assert "No space left on device" in str(full.value)


def cramped(stack: DrillStack, data: Path, *, caddyfile: bool = False) -> Environment:
    """The drill's environment with its state, lock, journal and run records on `data` (and
    its Caddyfile, a copy of the one Caddy runs, when `caddyfile`: this drill's Caddy is
    given its config through the admin API and never reads the file back)."""
    env = stack.env
    for name in ("state", "lock", "logs", "runs", "caddy"):
        (data / name).mkdir()
    state_file = data / "state" / env.state_file.name
    state_file.write_bytes(env.state_file.read_bytes())
    moved = env.with_(state_file=state_file, lock_dir=data / "lock", log_dir=data / "logs",
                      runs_dir=data / "runs", source=None)
    if caddyfile:
        copy = data / "caddy" / env.caddy.caddyfile.name
        copy.write_bytes(env.caddy.caddyfile.read_bytes())
        moved = moved.with_(caddy=dataclasses.replace(env.caddy, caddyfile=copy))
    source = data.parent / f"{data.name}.toml"
    source.write_text(envmod.to_toml(moved))
    return moved.with_(source=source)


def runbook(env: Environment, *args: str, fault: str | None = None,
            after: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """The CLI on `env`'s file, given after `args` (and before `after`: a command's
    arguments that follow ENV)."""
    assert env.source is not None
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    if fault:
        environ[faults.VARIABLE] = fault
    return subprocess.Popen([sys.executable, "-m", "runbook.cli", *args, str(env.source),
                             *after],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=environ)


def finished(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, out, err


@pytest.mark.parametrize("cell", CELLS)
def test_a_disk_that_fills_up_never_makes_it_worse_and_the_next_run_finishes(
        drill_stack: DrillStack, tmp_path: Path, cell: str) -> None:
    stack = drill_stack
    if cell == "caddyfile" and stack.has("caddy-reload"):
        pytest.skip("a caddy-reload host's Caddy reads the Caddyfile itself (`caddy reload "
                    "--config`): a copy on another disk is not the file it runs")
    stack.arrange(scenes.PREVIOUS)
    assert through_proxy(stack.env) == ("blue", V3.tag)
    # 4 MiB: above the 1 MiB low-space mark once freed; 256 inodes for the "inodes" cell
    with tmpfs(tmp_path / "data", "4m", inodes=256 if cell == "inodes" else None) as data:
        env = cramped(stack, data, caddyfile=cell == "caddyfile")
        point = POINTS.get(cell, cell)
        before = env.state_file.read_bytes()
        with Poller(env) as user:
            if cell == "inodes":
                use_up_inodes(data)
                first = runbook(env, "rollback", "--yes")
            elif cell == "start":
                fill_up(data)
                _, preflight, _ = finished(runbook(env, "fleet", "host-check"))
                dry = finished(runbook(env, "rollback", "--dry-run"))
                first = runbook(env, "rollback", "--yes")
            else:
                first = runbook(env, "rollback", "--yes", fault=f"{point}:SIGSTOP")
                wait_stopped(first.pid)
                remount(data, "ro") if cell == "read-only" else fill_up(data)
                os.kill(first.pid, signal.SIGCONT)
            code, _, err = finished(first)
            left = env.state_file.read_bytes()
            green_running = docker.inspect(env.slot("green").container).running
            serving = through_proxy(env)
            status_code, status_out, _ = finished(runbook(env, "status", "--format", "json"))
            if cell == "read-only":
                remount(data, "rw")
            elif cell == "inodes":
                shutil.rmtree(data / "fillers")
            else:
                os.unlink(data / "filler")
            rerun = (finished(runbook(env, "rollback", "--yes")) if code != 0 else (0, "", ""))

        assert "Traceback" not in err + rerun[2]
        status = json.loads(status_out)
        assert status["traffic"]["slot"] == serving[0], (status["traffic"], serving)
        # status, asked while the disk was still full, says so before any run fails on it
        disk = [p for p in status["problems"]
                if f"KiB free where {env.state_file.parent} lives" in p["problem"]
                or f"free inodes where {env.state_file.parent} lives" in p["problem"]
                or p["problem"].startswith(f"{env.state_file.parent} is on a read-only")]
        assert len(disk) == 1, status["problems"]
        assert {"read-only": "remount it read-write", "inodes": "df -i"}.get(cell, "df -h") \
            in disk[0]["fix"]
        if cell == "start":
            # refused before any change: exit 4 (not a configuration error), the disk named
            # (by the run's first write on it: its run record, before the lock)
            assert code == 4, err
            assert "No space left on device; nothing was changed" in err, err
            assert f"free disk space where {env.runs_dir} lives" in err, err
            assert serving == ("blue", V3.tag)
            assert left == before
            assert not intents.path(env).exists() and not env.lock_path.exists()
            # the dry run's plan warns of it, as the prompt of a real run would
            assert dry[0] == 0, dry[2]
            assert f"KiB free where {env.state_file.parent} lives" in dry[1] + dry[2], dry
            # a fleet's pre-flight on this host refuses it before the rollout touches any host
            checks = [p for p in json.loads(preflight)["problems"] if p["check"] == "disk space"]
            assert len(checks) == 1 and checks[0]["exit_code"] == 4, preflight
            assert f"KiB free where {env.state_file.parent} lives" in checks[0]["message"]
        elif cell == "inodes":
            # refused before any change, the missing inodes named, not the bytes `df -h` shows
            assert code == 4, err
            assert "No space left on device; nothing was changed" in err, err
            assert "no free inodes left" in err and "df -i" in err, err
            assert serving == ("blue", V3.tag)
            assert left == before
        elif cell == "caddyfile":
            # the switch could not write the Caddyfile: nothing took effect, all undone
            assert code == 1, err
            assert "No space left on device; it was left unchanged; undone:" in err, err
            assert f"free disk space where {env.caddy.caddyfile.parent} lives" in err, err
            assert serving == ("blue", V3.tag)
            assert left == before
            assert not green_running  # the standby it started is stopped again
            assert status_code == 1 and status["problems"] == disk, status["problems"]
        elif cell == "before:stop-old-slot":
            # the state was recorded before the disk filled: the run completes; only the
            # journal lost lines, and it says so
            assert code == 0, err
            assert "runbook: note: the journal is incomplete" in err, err
            assert serving == ("green", V2.tag)
        else:
            # traffic moved (verified) and then the state could not be written: exit 6, the
            # disk and the way to finish named; status speaks of what runs, not of the record
            assert code == 6, err
            if cell == "read-only":
                assert "TOOK EFFECT" in err and "Read-only file system" in err, err
                assert f"{env.state_file.parent} is on a read-only filesystem" in err, err
                # the lock could not be released either: said, and never in place of the
                # outcome; the next run takes it over (its holder has exited) and says so
                assert f"the deploy lock {env.lock_path} could not be released" in err, err
                assert "took over a stale deploy lock" in rerun[2], rerun[2]
            else:
                assert "TOOK EFFECT" in err and "No space left on device" in err, err
                assert f"free disk space where {env.state_file.parent} lives" in err, err
            assert "runbook: warning: the journal is incomplete" in err, err
            assert serving == ("green", V2.tag)
            assert status_code == 1
            assert status["interrupted"]["phase"] == "prepare"  # the record could not say more
            assert "stopped after traffic moved" in status["interrupted"]["summary"], status
            assert "finishing an interrupted run" in rerun[2]
            assert "before traffic moved" not in rerun[2], rerun[2]

        # once there is room, the job is finished: v2 on green recorded once, blue stopped,
        # nothing left behind
        assert rerun[0] == 0, rerun[2]
        assert through_proxy(env) == ("green", V2.tag)
        st = states.read_state(env.state_file)
        assert st.current is not None
        assert (st.current.version, str(st.current.active_slot), st.current.rollback_count) == (
            V2.tag, "green", 1)
        blue = docker.inspect(env.slot("blue").container)
        if stack.has("h2c") and blue.running:
            # an h2c Caddy: the rerun finished a switch it did not watch, so it cannot tell a
            # user's kept-alive connection from one the old config holds; it leaves the old
            # slot running, says so and records it (as in the kill matrix, tests/test_h2c.py)
            assert "left running" in rerun[2], rerun[2]
            assert slots.held_record(env, Slot.BLUE, blue) is not None
        else:
            assert not blue.running
        assert not intents.path(env).exists()
        assert not env.lock_path.exists()
        assert [p.name for p in env.state_file.parent.iterdir() if p.name.endswith(".tmp")] == []
        _, after, _ = finished(runbook(env, "status", "--format", "json"))
        assert not [p for p in json.loads(after)["problems"] if "free where" in p["problem"]
                    or "read-only filesystem" in p["problem"]], after
        assert user.failures == [], user.failures[:5]


def test_a_failed_verification_on_a_full_disk_still_puts_traffic_back(
        drill_stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: Caddy reloaded onto green, the disk then filled, and green failed its
    verification. The undo wrote the previous Caddyfile first; that write failed, so it never
    reloaded, and traffic stayed on the unverified green (exit 5, "traffic may not be where
    it was"). With the admin API the previous config is loaded all the same, and the run
    says the file on disk could not be put back."""
    stack = drill_stack
    if stack.has("caddy-reload"):
        pytest.skip("a caddy-reload host's Caddy reads the Caddyfile itself: with the file "
                    "unwritable the previous config cannot be loaded (the run says so)")
    stack.arrange(scenes.PREVIOUS)  # v3 serving from blue, v2 stopped on green
    with tmpfs(tmp_path / "data", "4m") as data:
        env = cramped(stack, data, caddyfile=True)
        first = runbook(env, "rollback", "--yes", fault="switch.after-reload:SIGSTOP")
        wait_stopped(first.pid)
        fill_up(data)
        subprocess.run(["docker", "kill", env.slot(Slot.GREEN).container], check=True,
                       capture_output=True)  # green fails its verification
        os.kill(first.pid, signal.SIGCONT)
        code, _, err = finished(first)
        serving = through_proxy(env)
        os.unlink(data / "filler")
    assert "Traceback" not in err
    assert code == 5, err
    assert "traffic is back on blue through the admin API" in err, err
    assert "No space left on device" in err and "still names the new slot" in err, err
    assert serving == ("blue", V3.tag)


def test_a_disk_that_fills_up_during_a_deploy_leaves_the_new_version_serving_and_says_so(
        drill_stack: DrillStack, tmp_path: Path) -> None:
    """`runbook deploy` (the recovery path) through the same executor: the disk fills once
    Caddy has reloaded onto the new slot. Exit 6, the new version serves, the full disk named;
    the same command, once there is room, finishes it."""
    stack = drill_stack
    if stack.has("docker-run"):
        pytest.skip("a docker-run host has no compose: `runbook deploy` refuses before any "
                    "change there (tests/test_rollback.py)")
    stack.reset()  # v1 on blue serving, schema 1
    with tmpfs(tmp_path / "data", "4m") as data:
        env = cramped(stack, data)
        with Poller(env) as user:
            first = runbook(env, "deploy", "--version", V2.tag, "--yes",
                            fault="switch.after-reload:SIGSTOP")
            wait_stopped(first.pid)
            fill_up(data)
            os.kill(first.pid, signal.SIGCONT)
            code, _, err = finished(first)
            serving = through_proxy(env)
            os.unlink(data / "filler")
            rerun = finished(runbook(env, "deploy", "--version", V2.tag, "--yes"))
        assert "Traceback" not in err + rerun[2]
        assert code == 6, err
        assert "TOOK EFFECT" in err and "No space left on device" in err, err
        assert f"free disk space where {env.state_file.parent} lives" in err, err
        assert serving == ("green", V2.tag)
        assert rerun[0] == 0, rerun[2]
        assert "finishing an interrupted run" in rerun[2], rerun[2]
        assert through_proxy(env) == ("green", V2.tag)
        st = states.read_state(env.state_file)
        assert st.current is not None and st.previous is not None
        assert (st.current.version, str(st.current.active_slot)) == (V2.tag, "green")
        assert (st.previous.version, st.previous.status) == (VERSIONS["v1"].tag, "superseded")
        assert not intents.path(env).exists() and not env.lock_path.exists()
        assert user.failures == [], user.failures[:5]


@pytest.mark.parametrize(("command", "left_free"), [("snapshot restore", 0),
                                                   ("rollback --restore-snapshot", 64 * 1024),
                                                   ("deploy", 0)])
def test_a_full_snapshot_folder_is_refused_before_a_restore_stops_anything(
        drill_stack: DrillStack, tmp_path: Path, command: str, left_free: int) -> None:
    """Found by a disk-full fuzz: `snapshot restore` and `rollback --restore-snapshot` stopped
    the app slots, then found no room for the safety snapshot (users got 502s, exit 1), and
    neither `runbook status` nor the dry run had said a word. The snapshot folder on a full
    4 MiB tmpfs (0 B or 64 KiB left, under the 0.2 MiB a dump keeps free): refused in the
    pre-flight, exit 4, no container stopped, users served throughout; status, the dry run
    and the fleet's pre-flight name the folder. A deploy's pre-deploy snapshot likewise.
    """
    stack = drill_stack
    if command == "deploy" and stack.has("docker-run"):
        pytest.skip("a docker-run host has no compose: `runbook deploy` refuses before any "
                    "change there (tests/test_rollback.py)")
    what = "the pre-deploy snapshot" if command == "deploy" else "the safety snapshot"
    if command != "rollback --restore-snapshot":
        stack.reset()  # v1 on blue serving, schema 1
    else:
        stack.arrange(scenes.MIGRATED)  # v2 on green, schema 2; its pre-deploy snapshot
    with tmpfs(tmp_path / "snap", "4m") as folder:
        moved = stack.env.with_(database=dataclasses.replace(stack.env.database,
                                                             snapshot_dir=folder), source=None)
        if command == "snapshot restore":
            args, after = ["snapshot", "restore"], (snapshots.create(moved, "good").name,)
        elif command == "deploy":
            snapshots.create(moved, "good")
            args, after = ["deploy"], ("--version", V2.tag)
        else:
            for old in stack.env.database.snapshot_dir.glob("togather_*"):
                shutil.copy2(old, folder / old.name)
            args, after = ["rollback", "--restore-snapshot"], ()
        source = tmp_path / "moved.toml"
        source.write_text(envmod.to_toml(moved))
        env = moved.with_(source=source)
        fill_up(folder)
        if left_free:
            os.truncate(folder / "filler", (folder / "filler").stat().st_size - left_free)
        containers = [env.slot(s).container for s in Slot]
        started = {name: docker.inspect(name).started_at for name in containers}
        serving = through_proxy(env)
        with Poller(env) as user:
            _, status_out, _ = finished(runbook(env, "status", "--format", "json"))
            _, preflight, _ = finished(runbook(
                env, "fleet", "host-check",
                *(["--restore-snapshot"] if command == "rollback --restore-snapshot" else [])))
            dry = finished(runbook(env, *args, "--dry-run", after=after))
            code, out, err = finished(runbook(env, *args, "--yes", after=after))
        assert "Traceback" not in err + dry[2]
        # refused before anything stopped: exit 4, one line naming the folder, its room,
        # what a snapshot needs there and the fix
        assert code == 4, out + err
        [line] = [ln for ln in err.splitlines() if f"no room for {what}" in ln]
        assert f"no room for {what} in {folder}: " \
               f"{left_free / 1048576:.1f} MiB free, under the" in line, line
        assert "MiB kept free for the database and the host" in line, line
        assert "nothing was changed" in line and "undone" not in line, line
        assert f"free space in {folder}" in line and "snapshot_dir" in line, line
        assert {name: docker.inspect(name).started_at for name in containers} == started
        assert through_proxy(env) == serving
        assert user.failures == [], user.failures[:5]
        assert user.seen and {v for _, _, v in user.seen} == {serving[1]}
        # the dry run refuses as the real run would, in the same words
        assert dry[0] == 4 and f"no room for {what} in {folder}" in dry[2], dry
        # `runbook status` names the full folder once, as a note: nothing needs on-call now
        # (a rollback that takes no snapshot goes ahead; a restore or deploy is refused, as
        # here, with nothing changed), never a problem (exit 1) of its own
        said = json.loads(status_out)
        assert not [p for p in said["problems"] if str(folder) in p["problem"] + p["fix"]]
        named = [n["note"] for n in said["notes"] if f"KiB free where {folder} lives" in n["note"]]
        assert len(named) == 1 and "a snapshot needs about" in named[0], status_out
        assert f"free space in {folder}" in named[0], named
        assert f"`runbook snapshot cleanup {env.source}`" in named[0], named
        # the fleet's pre-flight judges the folder only on the host whose dry run restores
        checks = json.loads(preflight)["problems"]
        if command == "rollback --restore-snapshot":
            assert [p["check"] for p in checks] == ["rollback dry run"], preflight
            assert f"no room for {what} in {folder}" in checks[0]["message"], preflight
        else:
            assert not [p for p in checks if str(folder) in json.dumps(p)], preflight
        assert [p.name for p in folder.iterdir() if p.name.endswith(".partial")] == []


def moved_snapshots(stack: DrillStack, folder: Path, tmp_path: Path) -> Environment:
    """The drill's environment with its snapshot folder at `folder`, written to a file."""
    moved = stack.env.with_(database=dataclasses.replace(stack.env.database,
                                                         snapshot_dir=folder), source=None)
    source = tmp_path / "moved.toml"
    source.write_text(envmod.to_toml(moved))
    return moved.with_(source=source)


def test_a_full_snapshot_folder_never_blocks_a_rollback_that_takes_no_snapshot(
        drill_stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: the snapshot folder, judged on every host, made a full one refuse a
    fleet rollback that takes no snapshot (host-check exit 4 "disk space") while `runbook
    rollback --yes` on that host worked, and `runbook status` exit 1 for it alone. v3 on
    blue, v2 on green, the same schema: the rollback takes no snapshot."""
    stack = drill_stack
    stack.arrange(scenes.PREVIOUS)
    with tmpfs(tmp_path / "snap", "4m") as folder:
        env = moved_snapshots(stack, folder, tmp_path)
        fill_up(folder)
        code, out, err = finished(runbook(env, "fleet", "host-check"))
        assert code == 0 and json.loads(out)["problems"] == [], out + err
        code, out, err = finished(runbook(env, "status", "--format", "json"))
        said = json.loads(out)
        assert code == 0 and said["problems"] == [], out + err
        [note] = [n["note"] for n in said["notes"] if str(folder) in n["note"]]
        assert "a restore or a deploy would be refused" in note, note
        code, out, err = finished(runbook(env, "rollback", "--yes"))
        assert code == 0, out + err
        assert through_proxy(env) == ("green", VERSIONS["v2"].tag)


@pytest.mark.parametrize("how", ["read-only", "no inodes"])
def test_a_read_only_or_inodeless_snapshot_folder_is_refused_before_a_restore_stops_anything(
        drill_stack: DrillStack, tmp_path: Path, how: str) -> None:
    """Found by review: the pre-flight let a read-only folder through ("the dump's own refusal
    words it") and never counted inodes; the dump refused only after the app slots were
    stopped (users got 502s). Refused first: exit 4, nothing stopped, users served."""
    stack = drill_stack
    stack.reset()
    with tmpfs(tmp_path / "snap", "8m", inodes=64 if how == "no inodes" else None) as folder:
        env = moved_snapshots(stack, folder, tmp_path)
        good = snapshots.create(env, "good")
        if how == "read-only":
            remount(folder, "ro")
        else:
            use_up_inodes(folder)
        containers = [env.slot(s).container for s in Slot]
        started = {name: docker.inspect(name).started_at for name in containers}
        with Poller(env) as user:
            dry = finished(runbook(env, "snapshot", "restore", "--dry-run", after=(good.name,)))
            code, out, err = finished(runbook(env, "snapshot", "restore", "--yes",
                                              after=(good.name,)))
        assert code == 4 and dry[0] == 4, (out + err, dry)
        [line] = [ln for ln in err.splitlines() if "the safety snapshot" in ln]
        assert str(folder) in line and "nothing was changed" in line, line
        if how == "read-only":
            assert "read-only filesystem" in line and "remount it read-write" in line, line
        else:
            assert "free inodes" in line and f"`df -i {folder}`" in line, line
        assert line in dry[2], dry
        assert {name: docker.inspect(name).started_at for name in containers} == started
        assert user.failures == [], user.failures[:5]


def test_the_snapshot_folder_is_judged_by_this_databases_snapshots_and_dead_partials(
        drill_stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: the estimate was the newest `togather_*.sql.gz` of any database (the
    default folder is shared), and a killed dump's `.partial`, which the dump removes before
    it begins, counted as used: both refused restores that fit. The fix named `runbook
    snapshot cleanup` without its ENV, though cleanup frees only expired snapshots."""
    stack = drill_stack
    stack.reset()
    with tmpfs(tmp_path / "snap", "8m") as folder:
        env = moved_snapshots(stack, folder, tmp_path)
        good = snapshots.create(env, "good")
        other = folder / "togather_otherdb_20250101_000000_manual.sql.gz"  # newest, 5 MiB
        other.write_bytes(os.urandom(5 * 1024 * 1024))
        code, _, err = finished(runbook(env, "snapshot", "restore", "--dry-run",
                                        after=(good.name,)))
        assert code == 0, err
        fill(folder)  # then the filler left as a killed dump's partial, its writer gone
        dead = folder / f".{good.path.name.removesuffix('.sql.gz')}x.sql.gz.0123abcd.partial"
        (folder / "filler").rename(dead)
        os.utime(dead, (1, 1))
        code, _, err = finished(runbook(env, "snapshot", "restore", "--dry-run",
                                        after=(good.name,)))
        assert code == 0, err
        dead.rename(folder / "filler")  # not ours: refused, nothing expired to clean up
        code, _, err = finished(runbook(env, "snapshot", "restore", "--dry-run",
                                        after=(good.name,)))
        assert code == 4, err
        [line] = [ln for ln in err.splitlines() if "no room for the safety snapshot" in ln]
        assert f"`runbook snapshot cleanup {env.source}`" in line, line
        # this database's snapshots, never another's, and no file offered to `rm`
        assert "this database's 1 snapshot(s) there take" in line, line
        assert other.name not in line and not re.search(r"\brm\b", line), line


def _lock_times(env: Environment) -> dict[str, float]:
    """Where each tool reads the live lock's age: the shell tooling `locked_at` (epoch
    seconds, CONTRACTS), a runbook holder.json, the Go CLI the state file's copy."""
    shell = (env.lock_path / "locked_at").read_text()
    assert re.fullmatch(r"\d{10}\n", shell), shell  # still what the shell tooling reads
    holder = json.loads((env.lock_path / "holder.json").read_text())
    copy = json.loads(env.state_file.read_text())["lock"]
    return {"locked_at": float(shell),
            "holder.json": states.parse_time(holder["locked_at"]).timestamp(),
            "state file": states.parse_time(copy["lock_expires_at"]).timestamp()
            - env.lock_stale_after}


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_a_lock_folder_that_fills_up_mid_run_keeps_the_lock_fresh_or_says_it_cannot(
        drill_stack: DrillStack, tmp_path: Path, how: str) -> None:
    """Found by review: with the lock's folder full once the lock was taken, every refresh
    failed on its first write, before the state file's copy (on a disk with room) was
    refreshed, and the failure was swallowed: all three copies aged while the run went on,
    `runbook status` called the live run's lock stale, and nothing was said; on a real host
    the shell tooling (and the Go CLI by the copy) would take the lock of a long restore after
    its 30 minutes. Now a full folder is refreshed in place (no block allocated), the copy is
    refreshed whatever the folder does, and a folder that cannot be written at all (remounted
    read-only) is said once, with when other tools will see the lock expire."""
    stack = drill_stack
    stack.arrange(scenes.BROKEN_PREVIOUS)  # the gate waits its whole timeout on green
    base = stack.env
    with tmpfs(tmp_path / "lock", "1m") as lockdir:
        env = base.with_(lock_dir=lockdir, lock_stale_after=8.0, source=None,
                         health=dataclasses.replace(base.health, timeout=24.0))
        source = tmp_path / "env.toml"
        source.write_text(envmod.to_toml(env))
        env = env.with_(source=source)
        logs = set(env.log_dir.glob("*.log"))
        first = runbook(env, "rollback", "--yes", fault="before:health-gate:SIGSTOP")
        try:
            wait_stopped(first.pid)
            taken = _lock_times(env)
            if how == "full":
                fill_up(lockdir)
            else:
                remount(lockdir, "ro")
            os.kill(first.pid, signal.SIGCONT)
            time.sleep(env.lock_stale_after + 4)  # refreshed every 2 s meanwhile
            now, later = time.time(), _lock_times(env)
            _, seen, _ = finished(runbook(env, "status", "--format", "json"))
            if how == "read-only":
                remount(lockdir, "rw")
        finally:
            if first.poll() is None:
                os.kill(first.pid, signal.SIGCONT)
            code, _, err = finished(first)
        assert "Traceback" not in err, err
        assert code == 1, err  # the gate failed on green: traffic stayed on blue, as always
        # the state file's copy is on a disk with room: always refreshed (the Go CLI's lock)
        assert later["state file"] > now - env.lock_stale_after / 2, (taken, later, now)
        said = [ln for ln in err.splitlines() if "deploy lock: cannot refresh" in ln]
        if how == "full":
            assert said == [], said
            for where in ("locked_at", "holder.json"):  # rewritten in place, still fresh
                assert later[where] > now - env.lock_stale_after / 2, (where, taken, later)
            assert json.loads(seen)["lock"]["stale"] is False, seen
            assert not env.lock_path.exists()  # released all the same
        else:
            assert later["locked_at"] == taken["locked_at"], (taken, later)
            assert len(said) == 1, err  # once, not at every refresh
            [line] = said
            # by the times the files hold: holder.json for runbooks (this environment's
            # lifetime), locked_at for the shell tooling (its fixed 1800 s, CONTRACTS)
            runbooks, shell = (time.strftime("%H:%M:%S", time.gmtime(at)) for at in (
                taken["holder.json"] + env.lock_stale_after, taken["locked_at"] + 1800))
            for part in (str(env.lock_path), "Read-only file system", runbooks, shell,
                         "remount it read-write"):
                assert part in line, (part, line)
            [log] = set(env.log_dir.glob("*.log")) - logs  # this run's journal
            logged = [json.loads(row) for row in log.read_text().splitlines()]
            assert sum("deploy lock: cannot refresh" in row.get("message", "")
                       for row in logged) == 1
