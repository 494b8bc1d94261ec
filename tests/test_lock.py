"""The deploy lock: atomic, shared with the shell tooling, stale only when truly stale."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from runbook import files, procs
from runbook import lock as lockmod
from runbook import state as states
from runbook.environment import Environment, command_arg
from runbook.errors import ConfigError, ExitCode, LockedError, RunbookError
from runbook.lock import Lock, acquire, guard_path, holding, release, status, unlock
from runbook.state import format_time, read_state
from tests.drill_checks import (
    ATTEMPT,
    DEPLOY_UID,
    OWNER_UID,
    ROOT,
    SHARED_GID,
    as_deploy_user,
    fill,
    host_env,
    needs_root,
    tmpfs,
    wait_stopped,
)

DATA = Path(__file__).parent / "data" / "state"
HOST = socket.gethostname()


@pytest.fixture
def env(tmp_path: Path) -> Environment:
    return host_env(tmp_path)


@pytest.fixture
def with_state(env: Environment) -> Path:
    env.state_file.parent.mkdir(parents=True)
    env.state_file.write_bytes((DATA / "documented.json").read_bytes())
    return env.state_file


@pytest.fixture
def live_pid() -> Iterator[int]:
    """A process that is running on this host and is not us."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def plant(env: Environment, *, age: float = 0.0, pid: int | None = None,
          hostname: str | None = HOST, legacy: bool = False, locked_by: str = "bob@ops-laptop",
          reason: str = "deploy 1234abc", pid_start: int | None = None) -> Path:
    """A lock made by someone else: another process, another host, or the shell tooling."""
    path = env.lock_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()
    epoch = time.time() - age
    (path / "locked_at").write_text(f"{int(epoch)}\n")
    if not legacy:
        at = datetime.fromtimestamp(epoch, UTC)
        holder = {"lock_id": "lock_foreign", "locked_by": locked_by, "pid": pid,
                  "hostname": hostname, "reason": reason, "deployment_id": "dep_foreign",
                  "locked_at": format_time(at),
                  "expires_at": format_time(at + timedelta(seconds=env.lock_stale_after))}
        if pid_start is not None:
            holder["pid_start"] = pid_start
        (path / "holder.json").write_text(json.dumps(holder))
    return path


# --- acquire / release ----------------------------------------------------------------------


def test_acquire_writes_the_contract_files_and_release_removes_them(env: Environment) -> None:
    before = time.time()
    lock = acquire(env, "rollback to abc1234", "rbk_1")
    path = env.lock_path
    assert path == env.lock_dir / "togather-deploy-production.lock" and path.is_dir()
    assert before - 1 <= int((path / "locked_at").read_text()) <= time.time()
    holder = json.loads((path / "holder.json").read_text())
    assert holder["lock_id"] == lock.lock_id and holder["lock_id"].startswith("lock_")
    assert holder["pid"] == os.getpid() and holder["hostname"] == HOST
    assert holder["locked_by"].endswith(f"@{HOST}") and holder["reason"] == "rollback to abc1234"
    assert holder["deployment_id"] == "rbk_1"
    assert holder["locked_at"].endswith("Z") and holder["expires_at"].endswith("Z")
    seen = status(env)
    assert seen is not None and not seen.stale and seen.holder_alive is True and seen.is_ours
    assert release(env, lock) is True
    assert not path.exists() and status(env) is None
    assert list(env.lock_dir.iterdir()) == []  # the guard file lives beside the state file
    assert guard_path(env).parent == env.state_file.parent


def test_context_manager_releases_on_error(env: Environment) -> None:
    with pytest.raises(RuntimeError), acquire(env, "deploy", None):
        assert env.lock_path.exists()
        raise RuntimeError("boom")
    assert not env.lock_path.exists()


def test_second_acquire_names_the_holder_and_the_fix(env: Environment) -> None:
    with acquire(env, "rollback to abc1234", "rbk_9"), pytest.raises(LockedError) as info:
        acquire(env, "deploy", None)
    err = info.value
    assert err.exit_code == ExitCode.LOCKED
    for part in (f"pid {os.getpid()}", f"on {HOST}", "'rollback to abc1234'", "rbk_9", "since"):
        assert part in err.message
    assert err.fix is not None and f"runbook unlock {command_arg(env)}" in err.fix
    assert "\n" not in str(err)


def test_release_twice_is_harmless(env: Environment) -> None:
    lock = acquire(env, "x", None)
    assert lock.release() and lock.release()


# --- the state-file mirror -------------------------------------------------------------------


def test_lock_is_mirrored_into_the_state_file_once_published(env: Environment,
                                                             with_state: Path) -> None:
    before = read_state(with_state)
    untouched = with_state.read_bytes()
    lock = acquire(env, "rollback", "rbk_2")
    assert with_state.read_bytes() == untouched  # a run refused while planning changes nothing
    lock.publish()
    during = read_state(with_state)
    assert during.lock == lock.state_json()
    assert during.lock["locked"] is True and during.lock["deployment_id"] == "rbk_2"
    assert during.lock["lock_expires_at"] == format_time(lock.expires_at)
    assert during.current == before.current and during.history == before.history
    assert lock.mirror_error is None
    lock.release()
    assert read_state(with_state).lock == {"locked": False}


@needs_root
def test_publishing_as_a_group_member_keeps_the_group_and_reports_the_lost_owner(
        shared_dir: Path) -> None:
    """The publish is a run's first rewrite of the state file: a deploy user who is not its
    owner changes the owner there, keeps the group, and the lock says so for the run to tell."""
    env = host_env(shared_dir)
    state = env.state_file
    state.parent.mkdir()
    state.parent.chmod(0o777)
    state.write_bytes((DATA / "documented.json").read_bytes())
    os.chown(state, OWNER_UID, SHARED_GID)
    state.chmod(0o660)
    imports = ("import json, sys\nfrom pathlib import Path\nfrom runbook import lock\n"
               "import encodings.utf_8_sig\nfrom tests.drill_checks import host_env\n"
               "env = host_env(Path(sys.argv[1]))\n")
    code = ("held = lock.acquire(env, 'rollback', 'rbk_owner')\n"
            "held.publish()\n"
            "print(json.dumps([held.owner_lost, held.mirror_error]))\n"
            "held.release()\n")
    owner_lost, mirror_error = json.loads(as_deploy_user([SHARED_GID], imports, code,
                                                         str(shared_dir)))
    assert mirror_error is None
    assert owner_lost is not None and f"lost its owner (uid {OWNER_UID})" in owner_lost
    assert str(state) in owner_lost and "group" not in owner_lost.split("when")[0]
    after = state.stat()
    assert (after.st_uid, after.st_gid, after.st_mode & 0o777) == (DEPLOY_UID, SHARED_GID, 0o660)
    assert json.loads(state.read_text())["lock"] == {"locked": False}


def _go_cli_expiry(lock: dict[str, Any]) -> datetime | None:
    """When the Go CLI sees this lock expire: its `expires_at`; missing or zero, never."""
    value = lock.get("expires_at")
    if not value or value.startswith("0001-01-01"):
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@pytest.mark.parametrize("fixture", ["documented.json", "go_cli.json"])
def test_a_killed_runs_mirror_expires_for_every_tool_and_release_clears_it(
        env: Environment, fixture: str) -> None:
    """A run killed holding the lock leaves its mirror: the Go CLI reads `expires_at` (never
    expiring without one), the deploy script `lock_expires_at`; both must say when it ends."""
    env.state_file.parent.mkdir(parents=True)
    doc = json.loads((DATA / fixture).read_text())
    env.state_file.write_text(json.dumps({**doc, "environment": env.name}, indent=2))
    lock = acquire(env, "rollback", "rbk_3")
    lock.publish()  # the run is killed here: nothing releases it
    assert lock.mirror_error is None
    left = json.loads(env.state_file.read_text())["lock"]
    expiry = _go_cli_expiry(left)
    assert expiry is not None and abs((expiry - lock.expires_at).total_seconds()) < 1
    assert left["lock_expires_at"] == left["expires_at"]
    assert timedelta(0) < expiry - datetime.now(UTC) <= timedelta(seconds=env.lock_stale_after)
    lock.release()
    after = json.loads(env.state_file.read_text())["lock"]
    assert after["locked"] is False and _go_cli_expiry(after) is None
    assert "lock_expires_at" not in after
    if fixture == "documented.json":
        assert after == {"locked": False}


def test_no_state_file_is_not_created(env: Environment) -> None:
    with acquire(env, "x", None):
        assert not env.state_file.exists()


def test_a_state_file_that_keeps_changing_unreadable_refuses_the_lock(
        env: Environment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review (2026-12-04): it read as "no lock in the state file", so the lock was
    taken beside whatever lock another tool (the Go CLI, which locks only there and rewrites
    the file in place) may have recorded in it: mid-write, the file is not JSON. While the
    file cannot be read and keeps changing, nothing is taken, and the refusal names the file
    and the fix."""
    env.state_file.parent.mkdir(parents=True)
    env.state_file.write_text("{not json")
    stop, wrote = threading.Event(), threading.Event()

    def writing() -> None:  # the Go CLI rewriting it in place, never whole when read
        n = 0
        while not stop.is_set():
            n += 1
            # in place and growing, never truncated: two reads 0.5 s apart never both catch
            # an emptied file (under load they did, and read as one unchanged corrupt file)
            with env.state_file.open("r+") as fh:
                fh.write('{"environment": "production", "lock": {"loc' + "k" * n)
            wrote.set()
            time.sleep(0.02)

    # each read of the file comes after two of the writer's writes: it changes between any
    # two reads, as a file the Go CLI keeps rewriting does, whatever the machine's load (a
    # writer thread starved for the runbook's 0.5 s pause made it read as one unchanged
    # corrupt file: CI, a loaded 2-core machine)
    from runbook import state as statemod

    real_read = statemod.read_lock

    def read_after_writes(path: Path) -> Any:
        if not stop.is_set():
            for _ in range(2):
                wrote.clear()
                assert wrote.wait(10), "the writer wrote nothing in 10 s"
        return real_read(path)

    monkeypatch.setattr(statemod, "read_lock", read_after_writes)
    writer = threading.Thread(target=writing)
    writer.start()
    try:
        with pytest.raises(LockedError) as refused:
            acquire(env, "x", None)
        err = refused.value
        assert err.exit_code == ExitCode.LOCKED and "\n" not in str(err)
        assert str(env.state_file) in err.message and "not valid JSON" in err.message, err
        assert "restore it from a backup" in (err.fix or ""), err.fix
        assert not env.lock_path.exists()
        seen = status(env)  # never "free"
        assert seen is not None and seen.broken and not seen.stealable, seen
        assert str(env.state_file) in seen.describe()
        assert lockmod.refusal(env) is not None
        for force in (False, True):
            with pytest.raises(LockedError, match="not valid JSON"):
                unlock(env, force=force)
        # our lock taken, the file rewritten (broken) before the first change: the run stops
        stop.set()
        writer.join()
        env.state_file.write_bytes((DATA / "documented.json").read_bytes())
        lock = acquire(env, "x", None)
        stop.clear()
        wrote.clear()
        writer = threading.Thread(target=writing)
        writer.start()
        assert wrote.wait(10)
        with pytest.raises(LockedError, match="not valid JSON") as stopped:
            lock.publish()
        assert "nothing was changed" in stopped.value.message and not lock.published
        assert lock.release()
    finally:
        stop.set()
        writer.join()


def test_a_stable_corrupt_state_file_is_no_lock_and_is_said(env: Environment) -> None:
    """Found by review: a file left corrupt for good (the Go CLI's in-place write cut short
    by a full disk) refused every acquire, for ever, as "locked by another run" (exit 3,
    "run again in a minute"): snapshot restore, which does not need the file, cleanup and
    unlock with it. A file that does not change is no write under way: the lock is judged
    by its directory alone (as with no state file), the corruption is said once, with the
    fix, and the file is left as it is (the plans that need it still refuse)."""
    from runbook.plan import Plan, Step
    from runbook.run import perform

    env.state_file.parent.mkdir(parents=True)
    broken = b'{"environment": "production", "current_deployment": {"id": "dep_1", "ver'
    env.state_file.write_bytes(broken)
    assert status(env) is None and lockmod.refusal(env) is None
    lock = acquire(env, "snapshot restore", None)
    warning = lock.state_warning or ""
    assert str(env.state_file) in warning and "not valid JSON" in warning, warning
    assert "restore it from a backup" in warning and "\n" not in warning, warning
    assert lock.release()
    said = unlock(env)
    assert "no deploy lock is held" in said and "not valid JSON" in said, said
    notices: list[str] = []
    perform(env, "snapshot-restore", lambda run_id: Plan("snapshot-restore", env, "test", [
        Step("noop", "Nothing", run=lambda ctx: None)]), dry_run=False, reason="test",
        notify=notices.append)
    assert len([n for n in notices if "not valid JSON" in n]) == 1, notices
    assert env.state_file.read_bytes() == broken and not env.lock_path.exists()
    with pytest.raises(RunbookError, match="not valid JSON"):
        read_state(env.state_file)  # what rollback's and deploy's plans read: refused


def test_release_does_not_clear_someone_elses_mirror(env: Environment, with_state: Path) -> None:
    lock = acquire(env, "x", None)
    lock.publish()
    state = json.loads(with_state.read_text())
    state["lock"] = {"locked": True, "lock_id": "lock_other", "locked_by": "go@cli"}
    with_state.write_text(json.dumps(state))
    lock.release()
    assert read_state(with_state).lock["lock_id"] == "lock_other"


# --- races -----------------------------------------------------------------------------------


def _race(env: Environment, barrier: Any, tried: Any, results: Any) -> None:
    barrier.wait()
    try:
        lock = acquire(env, "race", None)
    except LockedError:
        results.put("locked")
        tried.wait()
        return
    results.put("won")
    # held until every racer has tried: a fixed hold (0.5 s) ended, on a loaded machine,
    # before the last of the racers queued on the guard had its turn, which then took the
    # lock released meanwhile (CI review: two "won")
    tried.wait()
    lock.release()


def _run_race(env: Environment, n: int = 8) -> list[str]:
    ctx = multiprocessing.get_context("fork")
    barrier, tried = ctx.Barrier(n), ctx.Barrier(n, timeout=60)
    results = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(env, barrier, tried, results)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return outcomes


def test_racing_processes_exactly_one_wins(env: Environment) -> None:
    outcomes = _run_race(env)
    assert outcomes.count("won") == 1 and outcomes.count("locked") == 7
    assert status(env) is None


def test_racing_to_steal_a_stale_lock_exactly_one_wins(env: Environment) -> None:
    plant(env, age=7200, legacy=True)
    outcomes = _run_race(env)
    assert outcomes.count("won") == 1 and outcomes.count("locked") == 7


def test_a_lock_recreated_under_our_feet_is_put_back(env: Environment) -> None:
    path = plant(env, legacy=True)
    st = os.stat(path)
    with pytest.raises(LockedError, match="re-created by another process"):
        lockmod._entomb(path, (st.st_dev, st.st_ino + 1))
    assert path.is_dir() and (path / "locked_at").exists()
    assert [p.name for p in env.lock_dir.iterdir()] == [path.name]


# --- staleness -------------------------------------------------------------------------------


def test_stale_by_age_is_taken_over(env: Environment) -> None:
    plant(env, age=3600, pid=4242, hostname="another-host")
    seen = status(env)
    assert seen is not None and seen.stale and seen.holder_alive is None
    assert seen.why.startswith("expired 30 min ago")
    with acquire(env, "rollback", None) as lock:
        assert lock.stolen_from is not None and lock.stolen_from.holder is not None
        assert lock.stolen_from.holder.lock_id == "lock_foreign"
        holder = json.loads((env.lock_path / "holder.json").read_text())
        assert holder["lock_id"] == lock.lock_id
    assert list(env.lock_dir.iterdir()) == []


def test_fresh_lock_from_another_host_is_live(env: Environment) -> None:
    plant(env, age=60, pid=4242, hostname="another-host")
    seen = status(env)
    assert seen is not None and not seen.stale and "another host" in seen.why
    with pytest.raises(LockedError, match="another-host"):
        acquire(env, "x", None)


def test_stale_by_dead_pid_is_taken_over(env: Environment, dead_pid: int) -> None:
    plant(env, age=5, pid=dead_pid)
    seen = status(env)
    assert seen is not None and seen.stale and seen.holder_alive is False
    assert f"its process {dead_pid} is no longer running" in seen.why
    with acquire(env, "x", None) as lock:
        assert lock.stolen_from is not None


def test_reused_pid_is_not_taken_for_the_holder(env: Environment, live_pid: int) -> None:
    path = plant(env, age=5, pid=live_pid)
    holder = json.loads((path / "holder.json").read_text())
    holder["pid_start"] = 1  # the process with this pid started at another time
    (path / "holder.json").write_text(json.dumps(holder))
    seen = status(env)
    assert seen is not None and seen.holder_alive is False and seen.stale


def test_live_foreign_lock_is_never_removed(env: Environment, live_pid: int) -> None:
    path = plant(env, age=5, pid=live_pid)
    for force in (False, True):
        with pytest.raises(LockedError) as info:
            unlock(env, force=force)
        assert "never removed, not even with --force" in (info.value.fix or "")
    with pytest.raises(LockedError, match=f"pid {live_pid}"):
        acquire(env, "x", None)
    assert path.is_dir() and json.loads((path / "holder.json").read_text())["pid"] == live_pid


def test_expired_lock_of_a_running_process_is_never_removed(env: Environment,
                                                            live_pid: int) -> None:
    """Runs refresh their lock, so an expired lock whose process (known by its start time
    too) still runs is a hung run: the fix is to stop that process, never to remove the lock
    under it. Known by its pid alone, the pid may have been reused: --force, once checked."""
    from runbook import procs

    path = plant(env, age=3600, pid=live_pid, pid_start=procs.pid_start(live_pid))
    seen = status(env)
    assert seen is not None and seen.stale and seen.holder_alive is True
    assert not seen.stealable and "still running" in seen.why
    with pytest.raises(LockedError) as info:
        acquire(env, "x", None)
    assert f"kill {live_pid}" in (info.value.fix or "")
    for force in (False, True):
        with pytest.raises(LockedError) as info:
            unlock(env, force=force)
        assert "not even with --force" in (info.value.fix or "")
    assert path.is_dir()


def test_an_expired_lock_whose_pid_proc_cannot_show_is_removed_with_force(
        env: Environment, live_pid: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: with its start time recorded but /proc unreadable for that pid
    (hidepid; a pid another user got after a reboot), the holder looked alive for ever and
    even --force refused: only a hand edit cleared it. Unreadable /proc is stood in for
    (this suite runs as root, which hidepid does not hide from)."""
    from runbook import procs

    path = plant(env, age=3600, pid=live_pid, pid_start=procs.pid_start(live_pid))
    real = procs._proc_stat
    monkeypatch.setattr(procs, "_proc_stat",
                        lambda pid: None if pid == live_pid else real(pid))
    seen = status(env)
    assert seen is not None and seen.stale and seen.pid_unverified, seen
    with pytest.raises(LockedError):
        unlock(env)  # never without --force: it may be alive
    assert "removed" in unlock(env, force=True)
    assert not path.exists()


def test_a_guard_file_another_user_holds_cannot_block_runs(env: Environment) -> None:
    """The old guard sat in the shared lock directory (/tmp): anyone could create it and
    hold its flock. A file of that name there now means nothing to the runbook."""
    import fcntl

    env.lock_dir.mkdir(parents=True, exist_ok=True)
    squatter = env.lock_dir / f".{env.lock_path.name}.guard"
    with squatter.open("w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with acquire(env, "x", None):
            assert env.lock_path.is_dir()


def _guard_holder(env: Environment, *, suspend: bool) -> subprocess.Popen[bytes]:
    """Another process holding the guard's flock, as a run's heartbeat does for an instant
    (suspended there, when `suspend`: as Ctrl-Z or SIGSTOP can catch it)."""
    guard = guard_path(env)
    guard.parent.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, signal, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY | "
            "os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
            + ("os.kill(os.getpid(), signal.SIGSTOP)" if suspend else "time.sleep(60)"))
    holder = subprocess.Popen([sys.executable, "-c", code, str(guard)], stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    if suspend:
        wait_stopped(holder.pid)
    return holder


@pytest.mark.parametrize("suspended", [True, False])
def test_a_run_blocked_on_the_guard_names_its_holder_and_a_suspended_one_s_ways_out(
        env: Environment, monkeypatch: pytest.MonkeyPatch, suspended: bool) -> None:
    """Found by a drill test that stopped a run (SIGSTOP) at the instant its heartbeat held
    the guard: every other run then waited 10 s and said "find it with `fuser ...` and try
    again", which never works, as the holder never lets go. Now the holder is named (from
    /proc/locks), and a suspended one with `kill -CONT` and the way to stop it."""
    monkeypatch.setattr(holding, "GUARD_TIMEOUT", 0.5)
    holder = _guard_holder(env, suspend=suspended)
    try:
        with pytest.raises(LockedError) as refused, acquire(env, "rollback", None):
            pass
        said = f"{refused.value} | {refused.value.fix}"
        assert f"runbook process {holder.pid} " in said, said
        if suspended:
            assert "is suspended (Ctrl-Z or SIGSTOP)" in said, said
            assert f"`kill -CONT {holder.pid}`" in said and f"`kill {holder.pid}`" in said, said
            assert "fuser" not in said, said
        else:
            assert "suspended" not in said and "`fuser " in said, said
        assert not env.lock_path.exists()  # refused: nothing taken
        holder.kill()
        if suspended:
            os.kill(holder.pid, signal.SIGCONT)
        holder.wait(10)
        with acquire(env, "rollback", None):  # its holder gone, the guard is free again
            assert env.lock_path.is_dir()
    finally:
        if holder.poll() is None:
            holder.kill()
            os.kill(holder.pid, signal.SIGCONT)
            holder.wait(10)


def test_unlock_removes_stale_and_refuses_live(env: Environment) -> None:
    assert "nothing to do" in unlock(env)
    plant(env, age=30, legacy=True)
    with pytest.raises(LockedError, match="held by the shell tooling"):
        unlock(env)
    assert env.lock_path.is_dir()


def test_unlock_our_own_lock(env: Environment, with_state: Path) -> None:
    acquire(env, "x", None)
    assert "our own lock" in unlock(env)
    assert status(env) is None and read_state(with_state).lock == {"locked": False}


# --- the shell tooling's locks ---------------------------------------------------------------


def test_legacy_lock_is_judged_by_locked_at(env: Environment) -> None:
    plant(env, age=120, legacy=True)
    seen = status(env)
    assert seen is not None and seen.legacy and not seen.stale
    assert seen.why == "expires in 28 min (by locked_at)"
    with pytest.raises(LockedError, match="shell tooling"):
        acquire(env, "x", None)


def test_a_live_legacy_lock_names_how_to_tell_its_run_is_gone(env: Environment) -> None:
    """Found by review: the shell tooling's lock (only `locked_at`) refused every run and
    unlock --force for up to 30 minutes, and no message said how to tell whether its deploy
    still ran, or the way out when it does not. Both refusals name the check and the removal
    by hand; the lock itself is never removed by the runbook."""
    path = plant(env, age=120, legacy=True)
    for refused in (lambda: acquire(env, "x", None), lambda: unlock(env, force=True)):
        with pytest.raises(LockedError) as err:
            refused()
        fix = err.value.fix or ""
        assert "pgrep -af deploy" in fix and f"rm -r {path}" in fix, fix
        assert "expires in 28 min" in fix, fix
    assert path.is_dir()


def test_stale_legacy_lock_is_removed_and_its_mirror_cleared(env: Environment,
                                                             with_state: Path) -> None:
    state = json.loads(with_state.read_text())
    state["lock"] = {"locked": True, "lock_id": "lock_sh", "locked_by": "deploy@prod-1",
                     "pid": 48213, "hostname": "prod-1", "deployment_id": "dep_sh",
                     "locked_at": "2026-01-01T00:00:00Z", "lock_expires_at": "2026-01-01T00:30:00Z"}
    with_state.write_text(json.dumps(state))
    plant(env, age=1900, legacy=True)
    seen = status(env)
    assert seen is not None and seen.stale and "deploy@prod-1" in seen.describe()
    assert "removed a stale lock" in unlock(env)
    assert read_state(with_state).lock == {"locked": False}


def test_legacy_lock_with_garbage_timestamp_uses_the_directory_age(env: Environment) -> None:
    path = plant(env, legacy=True)
    (path / "locked_at").write_text("garbage\n")
    seen = status(env)
    assert seen is not None and not seen.stale and "mtime" in seen.why
    old = time.time() - 7200
    os.utime(path, (old, old))
    seen = status(env)
    assert seen is not None and seen.stale


def test_lock_dir_being_created_counts_as_held(env: Environment) -> None:
    env.lock_path.parent.mkdir(parents=True)
    env.lock_path.mkdir()  # mkdir done, locked_at not written yet
    with pytest.raises(LockedError):
        acquire(env, "x", None)


# --- locks recorded only in the state file (the Go CLI) -------------------------------------


def _state_lock(env: Environment, with_state: Path, *, expires_in: float) -> None:
    now = datetime.now(UTC)
    state = json.loads(with_state.read_text())
    state["lock"] = {"locked": True, "locked_by": "ci@build-runner", "reason": "deploy e4d2c1b",
                     "locked_at": format_time(now - timedelta(minutes=5)),
                     "expires_at": format_time(now + timedelta(seconds=expires_in))}
    with_state.write_text(json.dumps(state))


def test_live_state_file_lock_is_respected(env: Environment, with_state: Path) -> None:
    _state_lock(env, with_state, expires_in=600)
    seen = status(env)
    assert seen is not None and seen.source == "state file" and not seen.stale
    with pytest.raises(LockedError, match="recorded only in the state file") as info:
        acquire(env, "x", None)
    assert "ci@build-runner" in info.value.message and "'deploy e4d2c1b'" in info.value.message
    with pytest.raises(LockedError):
        unlock(env, force=True)


def test_expired_state_file_lock_is_replaced(env: Environment, with_state: Path) -> None:
    _state_lock(env, with_state, expires_in=-60)
    with acquire(env, "x", None) as lock:
        lock.publish()
        assert read_state(with_state).lock["lock_id"] == lock.lock_id
    _state_lock(env, with_state, expires_in=-60)
    assert "cleared the state file's lock" in unlock(env)
    assert read_state(with_state).lock == {"locked": False}


@pytest.mark.parametrize(("key", "first", "last"), [
    ("locked", True, False),  # read last-wins: unlocked
    ("expires_at", 600, -60),  # read last-wins: expired, so stale
], ids=["locked", "expires_at"])
def test_a_state_file_lock_with_a_key_written_twice_is_never_taken_over(
        env: Environment, with_state: Path, key: str, first: Any, last: Any) -> None:
    """The Go CLI's lock with one key written twice: grep or sed (the shell tooling) read
    the first value, held; Python, jq and Go the last, free or expired. Read last-wins, the
    lock was taken over and the mirror written over it kept only our lock (found by review).
    An ambiguous holder is refused as an unreadable one is: nothing taken or removed (not
    even with --force), the refusal naming the file and the key, exit 4."""
    now = datetime.now(UTC)

    def value(v: Any) -> Any:
        return format_time(now + timedelta(seconds=v)) if key == "expires_at" else v

    state = json.loads(with_state.read_text())
    state["lock"] = {"locked": True, "locked_by": "ci@build-runner", "reason": "deploy e4d2c1b",
                     "locked_at": format_time(now - timedelta(minutes=5)),
                     "expires_at": format_time(now + timedelta(seconds=600))}
    state["lock"][key] = value(first)
    marker = f'"{key}": {json.dumps(value(first))}'
    text = json.dumps(state, indent=2)
    assert text.count(marker) == 1
    with_state.write_text(text.replace(marker, f'{marker}, "{key}": {json.dumps(value(last))}'))
    assert json.loads(with_state.read_text())["lock"][key] == value(last)  # what Python reads
    before = with_state.read_bytes()

    def refused(err: RunbookError) -> None:
        assert err.exit_code == ExitCode.PRECONDITION, err
        assert str(with_state) in err.message and f"lock.{key}" in err.message, err.message
        assert "written twice" in err.message and "\n" not in str(err), err
        assert "nothing was changed" in err.message, err.message

    with pytest.raises(RunbookError) as taking:
        acquire(env, "x", None)
    refused(taking.value)
    seen = status(env)  # never free, never stale
    assert seen is not None and seen.broken and not seen.stale and not seen.stealable, seen
    said = lockmod.refusal(env)  # what a dry run says
    assert said is not None
    refused(said)
    for force in (False, True):
        with pytest.raises(RunbookError) as unlocking:
            unlock(env, force=force)
        refused(unlocking.value)
    assert not env.lock_path.exists() and with_state.read_bytes() == before


# --- keeping a lock ------------------------------------------------------------------------


def test_refresh_restarts_the_expiry_clock(tmp_path: Path) -> None:
    env = host_env(tmp_path, stale=2)
    lock = acquire(env, "long restore", None)
    time.sleep(2.2)
    seen = status(env)
    assert seen is not None and seen.stale and seen.holder_alive  # expired, still running
    lock.refresh()
    seen = status(env)
    assert seen is not None and not seen.stale
    lock.release()


def test_a_run_longer_than_the_lock_lifetime_keeps_its_lock_fresh(tmp_path: Path) -> None:
    """The heartbeat thread of a run refreshes the lock directory, so the shell tooling
    (which only reads `locked_at`) never sees a live run's lock expire."""
    from runbook.run import _heartbeat

    env = host_env(tmp_path, stale=4)  # refreshed every second
    lock = acquire(env, "long restore", None)
    ages = []
    with _heartbeat(lock, env):
        for _ in range(12):
            time.sleep(0.5)
            ages.append(time.time() - int((env.lock_path / "locked_at").read_text()))
    lock.release()
    assert max(ages) < 4, ages  # never as old as the lifetime, over 6 s


@pytest.mark.long
def test_a_step_longer_than_the_lock_lifetime_keeps_the_state_files_copy_fresh(
        tmp_path: Path) -> None:
    """Found by review: the state file's copy of the lock was refreshed between steps only,
    so during a step longer than the lock's lifetime (a big restore, migrations) it expired,
    and a tool that locks only there (the Go CLI) could take the lock beside the run. The
    heartbeat's thread refreshes it; never while this process writes the state file (a run's
    own record would then be refused as changed by another tool)."""
    from runbook.run import _heartbeat

    env = host_env(tmp_path, stale=4)  # refreshed every second
    env.state_file.parent.mkdir(parents=True)
    env.state_file.write_bytes((DATA / "documented.json").read_bytes())
    lock = acquire(env, "long restore", None)
    lock.publish()
    left: list[float] = []
    with _heartbeat(lock, env):
        for _ in range(14):  # 7 s of one step, no beat between steps
            time.sleep(0.5)
            expiry = read_state(env.state_file).lock or {}
            left.append(datetime.fromisoformat(
                str(expiry["lock_expires_at"]).replace("Z", "+00:00")).timestamp()
                - time.time())
        assert min(left) > 0, left  # never expired
        with states.WRITING:  # this process writing the state file: the copy waits
            before = env.state_file.read_bytes()
            time.sleep(3)
            assert env.state_file.read_bytes() == before
    lock.release()


@contextlib.contextmanager
def published_on_a_tmpfs(tmp_path: Path) -> Iterator[tuple[Environment, Lock]]:
    """A host whose lock folder is a 256 KiB tmpfs of its own (to fill or remount), holding
    a lock taken and published into a documented state file."""
    env = host_env(tmp_path, stale=60)
    env.state_file.parent.mkdir(parents=True)
    env.state_file.write_bytes((DATA / "documented.json").read_bytes())
    with tmpfs(env.lock_dir, "256k"):
        lock = acquire(env, "long restore", None)
        lock.publish()
        yield env, lock


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_a_refresh_in_a_full_lock_folder_rewrites_the_times_in_place_and_the_copy_always(
        tmp_path: Path, how: str) -> None:
    """Found by review: a full lock folder failed the refresh's first write, which raised
    before the state file's copy was refreshed (the run swallowed it: every copy aged
    silently). The times are now rewritten in place (no block allocated), the files staying
    what the shell tooling and other runbooks read; a folder that takes no write at all is
    kept in lock_error (the run says it) and the copy refreshed all the same."""
    with published_on_a_tmpfs(tmp_path) as (env, lock):
        files_before = {p.name: p.read_bytes() for p in env.lock_path.iterdir()}
        copy_before = read_state(env.state_file).lock or {}
        if how == "full":
            fill(env.lock_dir)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(env.lock_dir)], check=True)
        time.sleep(1.1)  # a new second: locked_at must change
        lock.refresh()
        copy = read_state(env.state_file).lock or {}
        holder = json.loads((env.lock_path / "holder.json").read_text())
        shell = (env.lock_path / "locked_at").read_text()
        if how == "read-only":
            subprocess.run(["mount", "-o", "remount,rw", str(env.lock_dir)], check=True)
        assert copy["lock_expires_at"] == format_time(lock.expires_at)
        assert copy["lock_expires_at"] != copy_before["lock_expires_at"]
        if how == "full":
            assert lock.lock_error is None, lock.lock_error
            assert shell == f"{int(lock.locked_at.timestamp())}\n"
            for key, value in (("locked_at", lock.locked_at), ("expires_at", lock.expires_at)):
                assert states.parse_time(holder[key]) == value.replace(
                    microsecond=value.microsecond if "." in holder[key] else 0)
            old = json.loads(files_before["holder.json"])
            assert {k: v for k, v in holder.items() if k not in ("locked_at", "expires_at")} \
                == {k: v for k, v in old.items() if k not in ("locked_at", "expires_at")}
        else:
            assert {p.name: p.read_bytes() for p in env.lock_path.iterdir()} == files_before
            said = lock.lock_error or ""
            for part in (str(env.lock_path), "Read-only file system", "shell tooling",
                         "remount it read-write"):
                assert part in said, (part, said)
        assert lock.release()
        assert not env.lock_path.exists()


def test_a_full_lock_folder_that_keeps_an_old_deployment_id_or_copy_list_says_so(
        tmp_path: Path) -> None:
    """Found by the merged-diff review: on a full lock folder the refresh rewrites only the
    times in place, and lock_error was cleared as if all was written. for_deployment()
    names the plan's deployment then refreshes: holder.json kept the run's id, which status
    shows, without a word; and a heartbeat refresh (the directory only) left the state
    file's copy unlisted in holder.json's `mirrored` (a killed run's copy, once the Go CLI
    stripped its lock_id, is then taken for another tool's live lock). The files on the
    full tmpfs are the oracle; freed, the next refresh writes holder.json whole."""
    with published_on_a_tmpfs(tmp_path) as (env, lock):
        first = lock.deployment_id
        fill(env.lock_dir)
        time.sleep(1.1)  # a new second: locked_at must change
        lock.for_deployment("dep_from_the_plan")
        holder = json.loads((env.lock_path / "holder.json").read_text())
        assert holder["locked_at"] == format_time(lock.locked_at)  # rewritten in place
        assert holder["deployment_id"] == first  # the old id stays on a full disk
        assert status(env).holder.deployment_id == first  # what status shows
        said = lock.lock_error or ""
        for part in ("holder.json", first, "dep_from_the_plan", "free disk space"):
            assert part in said, (part, said)
        (env.lock_dir / "filler").unlink()
        lock.refresh()
        holder = json.loads((env.lock_path / "holder.json").read_text())
        assert holder["deployment_id"] == "dep_from_the_plan" and lock.lock_error is None
        fill(env.lock_dir)
        time.sleep(1.1)
        lock.refresh()  # the copy's times are holder.json's own: it still tells the copy
        assert lock.lock_error is None, lock.lock_error
        copy = read_state(env.state_file).lock or {}
        time.sleep(1.1)
        lock.refresh(mirror=False)  # the heartbeat's: holder.json's times move on
        holder = json.loads((env.lock_path / "holder.json").read_text())
        listed = [*holder["mirrored"], [holder["locked_at"], holder["expires_at"]]]
        assert [copy["locked_at"], copy["lock_expires_at"]] not in listed, (copy, holder)
        said = lock.lock_error or ""
        for part in ("holder.json", "the state file's copy", "free disk space"):
            assert part in said, (part, said)
        (env.lock_dir / "filler").unlink()
        assert lock.release()


def test_a_stolen_lock_is_not_released_by_its_old_owner(tmp_path: Path) -> None:
    env = host_env(tmp_path, stale=1)
    old = acquire(env, "hung", None)
    time.sleep(1.2)
    unlock(env, force=True)  # expired, its owner (us) still running: force takes it
    new = acquire(env, "fresh", None)
    assert old.release() is False
    with pytest.raises(LockedError, match="no longer held by this run"):
        old.refresh()
    seen = status(env)
    assert seen is not None and seen.holder is not None
    assert seen.holder.lock_id == new.lock_id
    new.release()


def test_unusable_lock_dir_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "locks").write_text("a file, not a directory")
    env = host_env(tmp_path)
    with pytest.raises(ConfigError, match="lock directory") as info:
        acquire(env, "x", None)
    assert info.value.exit_code == ExitCode.USAGE


# --- another tool acting while a run holds the lock (review of 2026-12-02) ------------------


def _go_cli_lock(with_state: Path, *, expires_in: float = 600) -> None:
    """The Go CLI's lock: only in the state file, no lock_id, `expires_at`."""
    now = datetime.now(UTC)
    state = json.loads(with_state.read_text())
    state["lock"] = {"locked": True, "locked_by": "ci@build-runner", "reason": "deploy e4d2c1b",
                     "locked_at": format_time(now),
                     "expires_at": format_time(now + timedelta(seconds=expires_in))}
    with_state.write_text(json.dumps(state))


def test_a_stale_lock_directory_never_hides_the_go_clis_live_lock(
        env: Environment, with_state: Path) -> None:
    """Found by review: a crashed deploy.sh's stale directory beside the Go CLI's live lock
    in the state file: status said the lock was stale ("release it"), and status's standby
    check then advised stopping the slot that deploy was about to switch to."""
    plant(env, age=4000, legacy=True)
    _go_cli_lock(with_state)
    seen = status(env)
    assert seen is not None and not seen.stale and seen.source == "state file", seen
    assert "ci@build-runner" in seen.describe()
    with pytest.raises(LockedError):
        acquire(env, "x", None)


def test_a_refresh_puts_back_the_copy_another_tool_cleared(
        env: Environment, with_state: Path) -> None:
    """Found by review: the Go CLI saves the whole state file it read before this run
    published its copy, `locked: false` included; every refresh then saw a lock not its own
    and skipped it, silently: that CLI saw no lock for the rest of the run. The copy is put
    back; a live lock of another tool found there is said."""
    lock = acquire(env, "rollback", None)
    lock.publish()
    state = json.loads(with_state.read_text())
    state["lock"] = {"locked": False, "locked_at": "0001-01-01T00:00:00Z",
                     "expires_at": "0001-01-01T00:00:00Z"}
    with_state.write_text(json.dumps(state))
    lock.refresh()
    copy = json.loads(with_state.read_text())["lock"]
    assert copy["locked"] is True and copy["lock_id"] == lock.lock_id, copy
    assert lock.mirror_error is None
    _go_cli_lock(with_state)  # another tool's live lock, taken beside this run
    lock.refresh()
    assert "another tool's lock" in (lock.mirror_error or ""), lock.mirror_error
    assert json.loads(with_state.read_text())["lock"]["locked_by"] == "ci@build-runner"
    lock.release()


def test_publish_refuses_when_the_go_cli_locked_the_state_file_meanwhile(
        env: Environment, with_state: Path) -> None:
    """The mirror is published only once the plan is confirmed; the Go CLI, which locks only
    in the state file, may have taken its lock in between. Both must never act."""
    lock = acquire(env, "rollback", None)
    _go_cli_lock(with_state)
    before = with_state.read_bytes()
    with pytest.raises(LockedError, match="recorded only in the state file") as info:
        lock.publish()
    assert "ci@build-runner" in info.value.message
    assert with_state.read_bytes() == before  # its lock is still there, untouched
    lock.release()
    assert with_state.read_bytes() == before


def test_publish_refuses_when_the_go_cli_locks_the_state_file_as_the_mirror_is_written(
        env: Environment, with_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the Go CLI's lock written between the mirror's read and its rename
    made the state write refuse (the file changed), and publish took that for a mirror that
    merely failed: the run went on beside the Go CLI's lock."""
    lock = acquire(env, "rollback", None)
    real = files.atomic_write
    raced: list[bool] = []

    def racing(target: Path, data: bytes, **kwargs: Any) -> str | None:
        if Path(target).name == with_state.name and not raced:
            raced.append(True)
            _go_cli_lock(with_state)  # the other tool's write, just before ours lands
        return real(target, data, **kwargs)

    monkeypatch.setattr(files, "atomic_write", racing)
    with pytest.raises(LockedError, match="recorded only in the state file") as info:
        lock.publish(create=True)
    assert raced and "nothing was changed" in info.value.message
    assert json.loads(with_state.read_text())["lock"]["locked_by"] == "ci@build-runner"
    assert not lock.published
    lock.release()
    assert json.loads(with_state.read_text())["lock"]["locked_by"] == "ci@build-runner"


def test_a_first_ever_runs_lock_is_mirrored_in_the_state_file_it_creates(
        env: Environment) -> None:
    """Found by review: on a host with no state file yet (a first deploy through the
    runbook) publish returned without a word and the lock was never mirrored: the Go CLI,
    which reads only the state file's `lock`, saw no lock for the whole run. The contract
    mirrors the lock in the state file: publish creates the file (documented shape, no
    deployment yet) with the lock in it."""
    lock = acquire(env, "deploy", None)
    lock.publish(create=True)
    assert lock.published and lock.mirror_error is None
    data = json.loads(env.state_file.read_text())
    assert data["lock"]["locked"] is True and data["lock"]["lock_id"] == lock.lock_id
    expiry = _go_cli_expiry(data["lock"])  # what the Go CLI reads
    assert expiry is not None and abs((expiry - lock.expires_at).total_seconds()) < 1
    assert data["environment"] == env.name and data["current_deployment"] is None
    assert read_state(env.state_file, environment=env.name).current is None
    assert env.state_file.stat().st_mode & 0o777 == 0o600
    lock.release()
    assert json.loads(env.state_file.read_text())["lock"] == {"locked": False}


def test_a_first_publish_refuses_the_lock_of_a_tool_that_created_the_file_meanwhile(
        env: Environment, monkeypatch: pytest.MonkeyPatch) -> None:
    """No state file when publish looked, the Go CLI's (with its live lock) the instant
    after: the copy never replaces that file, and the run is refused as it is when the Go
    CLI's lock was there first; nothing of ours is left in it."""
    lock = acquire(env, "deploy", None)
    real = files.atomic_write
    raced: list[bool] = []

    def racing(target: Path, data: bytes, **kwargs: Any) -> str | None:
        if Path(target).name == env.state_file.name and not raced:
            raced.append(True)
            env.state_file.write_bytes((DATA / "go_cli_locked.json").read_bytes())
            _go_cli_lock(env.state_file)  # live: taken now, for ten minutes
        return real(target, data, **kwargs)

    monkeypatch.setattr(files, "atomic_write", racing)
    with pytest.raises(LockedError, match="recorded only in the state file") as info:
        lock.publish(create=True)
    assert raced and "nothing was changed" in info.value.message
    theirs = env.state_file.read_bytes()
    assert json.loads(theirs)["lock"]["locked_by"] == "ci@build-runner"
    assert not lock.published
    lock.release()
    assert env.state_file.read_bytes() == theirs


def test_only_a_deploy_creates_a_missing_state_file(env: Environment) -> None:
    """Found by review: every run's publish created a missing state file, so a refused or
    failed first `switch` or `snapshot restore` on a host whose [state] file points at the
    wrong path left a lock-only file behind: the rollback then said "no current deployment
    is recorded" instead of "the state file does not exist ... check [state] file". Only a
    deploy, which creates the file's first record anyway, creates it for its lock; the
    others leave a missing file missing, as before, and the refresh does too."""
    lock = acquire(env, "switch", None)
    lock.publish()
    lock.refresh()
    assert lock.published and not env.state_file.exists()
    lock.release()
    assert not env.state_file.exists()


def test_releasing_a_lock_never_creates_a_state_file(env: Environment) -> None:
    """Only a held lock is worth a new file: a release (or unlock) with no file writes none."""
    lock = acquire(env, "deploy", None)
    lock.publish(create=True)
    env.state_file.unlink()  # removed by hand during the run
    lock.release()
    assert not env.state_file.exists()


def test_a_mirror_whose_pid_was_reused_after_a_power_loss_is_taken_over(
        env: Environment, with_state: Path, live_pid: int) -> None:
    """Found by review: a power loss leaves the state file's copy of the lock and empties
    /tmp (the lock directory). After boot its pid belonged to another process, so the lock
    looked live: every run refused for 30 minutes, and `unlock --force` refused ("a live lock
    is never removed"). The mirror now carries the holder's /proc start time."""
    lock = acquire(env, "rollback", None)
    lock.publish()
    mirrored = json.loads(with_state.read_text())["lock"]
    assert isinstance(mirrored.get("pid_start"), int)
    shutil.rmtree(lock.path)  # the directory went with /tmp
    mirrored["pid"] = live_pid  # the number now belongs to another process
    state = json.loads(with_state.read_text())
    state["lock"] = mirrored
    with_state.write_text(json.dumps(state))
    judged = status(env)
    assert judged is not None and judged.stale, judged
    taken = acquire(env, "rollback", None)
    taken.release()


def test_unlock_never_says_cleared_when_the_state_files_lock_is_still_there(
        env: Environment, with_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: `unlock` said "cleared the state file's lock" when the Go CLI had
    written a fresh lock between the judgement and the write (left alone, rightly), and when
    the write failed: on-call believed the lock gone while every tool still saw it."""
    _go_cli_lock(with_state, expires_in=-60)  # expired: unlock may clear it
    judged = holding._state_lock_mapping

    def judged_then_relocked(e: Environment, corrupt: list[str] | None = None) -> Any:
        seen = judged(e, corrupt)
        monkeypatch.setattr(holding, "_state_lock_mapping", judged)
        _go_cli_lock(with_state)  # the Go CLI takes the lock anew, live
        return seen

    monkeypatch.setattr(holding, "_state_lock_mapping", judged_then_relocked)
    with pytest.raises(LockedError, match="left as it is"):
        unlock(env)
    assert json.loads(with_state.read_text())["lock"]["locked"] is True


def test_publish_refuses_when_the_lock_was_taken_away(env: Environment, with_state: Path) -> None:
    lock = acquire(env, "rollback", None)
    unlock(env)  # our own lock, removed by hand (or by a tool that judged it stale)
    plant(env, legacy=True)  # the shell tooling then takes it
    before = with_state.read_bytes()
    with pytest.raises(LockedError, match="no longer held by this run"):
        lock.publish()
    assert with_state.read_bytes() == before
    assert lock.release() is False


def test_a_stale_lock_directory_does_not_hide_a_live_go_cli_lock(env: Environment,
                                                                 with_state: Path) -> None:
    plant(env, age=4000, legacy=True)  # a crashed shell run's directory
    _go_cli_lock(with_state)
    with pytest.raises(LockedError, match="recorded only in the state file"):
        acquire(env, "x", None)
    assert env.lock_path.is_dir()  # the stale directory is left as it was


def test_unlock_of_a_stale_directory_keeps_a_live_go_cli_lock(env: Environment,
                                                              with_state: Path) -> None:
    plant(env, age=4000, legacy=True)
    _go_cli_lock(with_state)
    before = read_state(with_state).lock
    unlock(env)
    assert not env.lock_path.exists()
    assert read_state(with_state).lock == before  # the Go CLI's lock is not ours to clear


def test_a_shell_deploy_still_running_keeps_its_expired_lock(env: Environment, with_state: Path,
                                                            live_pid: int) -> None:
    """The shell tooling's directory has only `locked_at`; its state-file mirror names the
    pid. A deploy running past 1800 s is still running: its lock is not taken over."""
    plant(env, age=2000, legacy=True)
    state = json.loads(with_state.read_text())
    at = datetime.now(UTC) - timedelta(seconds=2000)
    state["lock"] = {"locked": True, "locked_by": "deploy@" + HOST, "pid": live_pid,
                     "hostname": HOST, "locked_at": format_time(at),
                     "lock_expires_at": format_time(at + timedelta(seconds=1800))}
    with_state.write_text(json.dumps(state))
    seen = status(env)
    assert seen is not None and seen.holder_alive is True and not seen.stealable
    with pytest.raises(LockedError, match=f"process {live_pid} is still running") as info:
        acquire(env, "x", None)
    assert f"ps -o pid,lstart,args -p {live_pid}" in (info.value.fix or "")
    with pytest.raises(LockedError):
        unlock(env)
    assert env.lock_path.is_dir()
    # a pid the mirror names may have been reused: once on-call checked it, --force removes it
    assert "removed" in unlock(env, force=True)
    # a mirror of another run (another locked_at) is no evidence for this directory
    plant(env, age=2000, legacy=True)
    state["lock"]["locked_at"] = format_time(at - timedelta(seconds=600))
    with_state.write_text(json.dumps(state))
    seen = status(env)
    assert seen is not None and seen.stealable, seen


def test_force_clears_a_shell_deploys_copy_whose_pid_was_reused(
        env: Environment, with_state: Path, live_pid: int) -> None:
    """Found by review: a shell deploy killed (OOM, power loss) leaves its directory and its
    state-file copy naming `pid: $$`, with no start time; the pid is reused by a long-lived
    process. `unlock --force` removed the directory and kept the copy, then every run, and
    --force too, refused for as long as that process lived, advising to kill it (it may be
    dockerd). After a reboot that emptied /tmp, the copy alone did the same."""
    at = datetime.now(UTC) - timedelta(seconds=4000)
    copy = {"locked": True, "locked_by": "deploy@" + HOST, "pid": live_pid, "hostname": HOST,
            "locked_at": format_time(at), "lock_expires_at": format_time(at + timedelta(
                seconds=1800))}
    for with_directory in (True, False):
        if with_directory:
            plant(env, age=4000, legacy=True)
        state = json.loads(with_state.read_text())
        state["lock"] = dict(copy)
        with_state.write_text(json.dumps(state))
        with pytest.raises(LockedError) as refused:
            acquire(env, "x", None)
        fix = refused.value.fix or ""
        assert f"runbook unlock {command_arg(env)} --force" in fix and "kill" not in fix, fix
        said = unlock(env, force=True)
        assert "removed" in said or "cleared" in said, said
        assert not env.lock_path.exists()
        assert json.loads(with_state.read_text())["lock"].get("locked") is False, with_directory
        acquire(env, "x", None).release()


def test_a_run_killed_between_its_two_lock_files_never_blocks_the_next(
        env: Environment) -> None:
    """Found by review: `locked_at` was written before holder.json; a run killed between
    the two (kill -9 while it waited on fsync, the OOM killer) left what reads as the shell
    tooling's lock, naming nobody: every run refused for 30 minutes, and --force too. The
    holder is now written first, so the next run sees a dead pid and takes the lock over."""
    real = files.atomic_write
    child = os.fork()
    if child == 0:  # pragma: no cover - the child exits inside the second write
        written: list[Path] = []

        def dies_on_second(target: Path, data: bytes, **kw: Any) -> str | None:
            if target.parent == env.lock_path:
                written.append(target)
                if len(written) == 2:
                    os._exit(9)
            return real(target, data, **kw)

        files.atomic_write = dies_on_second  # type: ignore[assignment]
        try:
            acquire(env, "killed", None)
        finally:
            os._exit(1)
    _, code = os.waitpid(child, 0)
    assert os.WIFEXITED(code) and os.WEXITSTATUS(code) == 9, code
    seen = status(env)
    assert seen is not None and seen.stealable, seen
    acquire(env, "next", None).release()


def test_a_guard_that_cannot_be_opened_names_where_it_is(tmp_path: Path) -> None:
    """Found by review: the guard sits beside the state file, but its errors named [lock]
    dir (a read-only /opt was "/tmp is on a read-only filesystem")."""
    blocked = tmp_path / "config"
    blocked.write_text("a file where the state file's directory should be")
    env = host_env(tmp_path).with_(state_file=blocked / "deployment-state.json")
    with pytest.raises(RunbookError) as err:
        acquire(env, "x", None)
    said = str(err.value)
    assert f"guard {blocked}/" in said and "beside the state file" in said, said
    assert "lock directory" not in said and str(blocked) in (err.value.fix or ""), said


def test_unlock_removes_a_lock_directory_a_killed_run_left_empty_once_it_is_not_new(
        env: Environment) -> None:
    """A run killed between its mkdir and its holder files leaves a directory naming nobody.
    Younger than EMPTY_DIR_GRACE it may be a lock being taken at this instant: kept, even
    with --force. Older, the next run takes it over by itself, so `runbook unlock` removes
    it as it is, without --force (found by review: it asked for --force, and status offered
    that, for a lock the next run took over unasked)."""
    env.lock_path.parent.mkdir(parents=True)
    env.lock_path.mkdir()
    with pytest.raises(LockedError, match="being taken") as young:
        unlock(env, force=True)  # it may be a lock being taken at this instant
    assert "--force" not in str(young.value) + (young.value.fix or ""), young.value
    seen = status(env)
    assert seen is not None and seen.empty and not seen.stale, seen
    old = time.time() - 60
    os.utime(env.lock_path, (old, old))
    seen = status(env)
    assert seen is not None and seen.empty and seen.stealable, seen
    assert "empty" in seen.describe() and "shell tooling" not in seen.describe(), seen
    assert lockmod.removal_refusal(env, seen, force=False) is None
    assert "removed" in unlock(env)
    assert not env.lock_path.exists()


def test_an_empty_lock_directory_filled_while_unlock_takes_it_is_put_back(
        env: Environment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: a shell deploy.sh stalled (Ctrl-Z) between its mkdir and its
    `locked_at` made an empty directory; `runbook unlock` (no --force since it is judged
    stale) renamed it away just as the script wrote its locked_at: its live lock was removed.
    The rename is the moment: here the other writer's file lands right before it."""
    env.lock_path.parent.mkdir(parents=True)
    env.lock_path.mkdir()
    old = time.time() - 30
    os.utime(env.lock_path, (old, old))
    rename = os.rename

    def the_shell_writes_first(src: Any, dst: Any) -> None:
        if Path(src) == env.lock_path:
            (env.lock_path / "locked_at").write_text(f"{int(time.time())}\n")
        rename(src, dst)

    monkeypatch.setattr(holding.os, "rename", the_shell_writes_first)
    with pytest.raises(LockedError, match="wrote its lock file into it"):
        unlock(env)
    monkeypatch.setattr(holding.os, "rename", rename)
    assert (env.lock_path / "locked_at").is_file()  # its lock, where it wrote it
    assert [p.name for p in env.lock_path.parent.iterdir() if ".stale-" in p.name] == []
    seen = status(env)
    assert seen is not None and not seen.empty and not seen.stale, seen


def test_an_empty_lock_directory_dated_in_the_future_is_not_said_as_being_taken(
        env: Environment) -> None:
    """Found by review: an empty directory whose mtime is 2 min ahead (the clock set back
    since its mkdir) was "2 min old ... wait a few seconds", and refused for up to 310 s
    with --force too. Its age cannot be told: said so, and --force removes it."""
    env.lock_path.parent.mkdir(parents=True)
    env.lock_path.mkdir()
    ahead = time.time() + 120
    os.utime(env.lock_path, (ahead, ahead))
    seen = status(env)
    assert seen is not None and seen.undated and "in the future" in seen.why, seen
    with pytest.raises(LockedError) as refused:
        unlock(env)
    assert "being taken" not in str(refused.value), refused.value
    assert "removed" in unlock(env, force=True)
    assert not env.lock_path.exists()


def test_the_guard_s_holder_is_named_only_while_it_still_holds_the_file(
        env: Environment) -> None:
    """Found by review: /proc/locks keeps the pid that took a flock after that process
    exited and a child it forked kept the lock; a `kill -CONT`/`kill` printed for that pid
    (reused by then) hits another process. A pid is named only when its open files show
    the guard."""
    guard = guard_path(env)
    guard.parent.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "if os.fork() == 0:\n    time.sleep(60)\nelse:\n"
            "    print(os.getpid(), flush=True); os._exit(0)")
    taker = subprocess.Popen([sys.executable, "-c", code, str(guard)], stdout=subprocess.PIPE,
                             start_new_session=True)
    try:
        assert taker.stdout is not None
        gone = int(taker.stdout.readline())
        taker.wait(10)
        fd = os.open(guard, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            listed = [line for line in Path("/proc/locks").read_text().splitlines()
                      if line.endswith(f":{st.st_ino} 0 EOF") and f" {gone} " in line]
            assert listed, "the kernel no longer lists the dead taker: nothing to show"
            assert not procs.pid_alive(gone)
            assert gone not in procs.flock_holders(st)
        finally:
            os.close(fd)
    finally:
        os.killpg(taker.pid, signal.SIGKILL)


def test_an_empty_lock_directory_never_hides_the_go_clis_live_lock(
        env: Environment, with_state: Path) -> None:
    """An empty directory a killed run left is no holder, but the Go CLI's live lock in the
    state file beside it is: status names that one, as the run refused by it does (it named
    the directory, which "the next run takes over by itself", while every run was refused)."""
    env.lock_path.parent.mkdir(parents=True, exist_ok=True)
    env.lock_path.mkdir()
    old = time.time() - 60
    os.utime(env.lock_path, (old, old))
    _go_cli_lock(with_state)
    seen = status(env)
    assert seen is not None and seen.source == "state file" and not seen.stale, seen
    assert "ci@build-runner" in seen.describe()
    with pytest.raises(LockedError, match="ci@build-runner"):
        acquire(env, "x", None)


def test_a_lock_left_holding_only_a_killed_writers_temp_file_is_taken_at_once(
        env: Environment) -> None:
    """Found by review: a run SIGKILLed inside its holder.json write (the fsync) left the lock
    directory holding only that write's temp file; it read as the shell tooling's lock and
    refused every run for 30 minutes, and `runbook unlock` asked for --force. Under the guard
    no runbook is writing one, and the shell tooling never does: the next run takes it, and
    says so."""
    env.lock_path.parent.mkdir(parents=True, exist_ok=True)
    env.lock_path.mkdir()
    files.temp_path(env.lock_path / holding.HOLDER).write_text('{"pid": 1')
    lock = acquire(env, "next", None)
    assert lock.stolen_from is not None and "half-written" in lock.stolen_from.why
    assert (env.lock_path / holding.HOLDER).is_file()
    lock.release()
    assert not env.lock_path.exists()


# --- a run whose lock is taken away stops (runbook/run.py, runbook/plan.py) ----------------


def _fake_run(env: Environment, with_state: Path, *, during: str) -> tuple[list[str], Any]:
    """`perform` with a plan of two steps (prepare, then the commit) that only record
    themselves; the lock is taken away `during` the prompt or the prepare step, the way a
    tool that judged it stale (or `rm -rf` by hand) would. Returns the calls and the error."""
    from runbook.plan import Phase, Plan, Step, StepContext
    from runbook.run import perform

    calls: list[str] = []

    def steal() -> None:
        shutil.rmtree(env.lock_path)
        plant(env, legacy=True)  # the shell tooling's lock now

    def prepare(ctx: StepContext) -> None:
        calls.append("prepare")
        ctx.on_failure("stop the standby", lambda: calls.append("undo prepare"))
        if during == "prepare":
            steal()

    def switch(ctx: StepContext) -> None:
        calls.append("switch")

    def build(run_id: str) -> Plan:
        return Plan("rollback", env, "test", [
            Step("start-slot", "Start the standby", run=prepare, phase=Phase.PREPARE),
            Step("switch", "Switch Caddy", run=switch, phase=Phase.COMMIT)])

    def confirm(plan: Plan) -> bool:
        if during == "prompt":
            steal()
        return True

    with pytest.raises(LockedError) as info:
        perform(env, "rollback", build, dry_run=False, reason="test", confirm=confirm)
    return calls, info.value


def test_the_lock_names_the_deployment_its_plan_names_and_keeps_the_run_id(
        env: Environment, with_state: Path) -> None:
    """Found by review: the lock's deployment_id (the state file's copy, holder.json) was the
    run id, which status printed as "run ...", while the run's log lines name the deployment
    its plan names (a rollback's target): the files disagreed on what is being deployed.
    Once the plan names it, the lock names it too; the run id stays, as run_id."""
    from runbook.intent import Intent
    from runbook.plan import Phase, Plan, Step, StepContext
    from runbook.run import perform

    seen: dict[str, Any] = {}

    def look(ctx: StepContext) -> None:
        seen["state"] = json.loads(with_state.read_text())["lock"]
        seen["holder"] = json.loads((env.lock_path / holding.HOLDER).read_text())
        held = status(env)
        seen["status"] = held.describe() if held is not None else None

    def build(run_id: str) -> Plan:
        intent = Intent(run_id=run_id, action="rollback", environment=env.name,
                        from_slot="blue", to_slot="green", from_version="a7f3fbb",
                        to_version="5db0fdf", record={"target_id": "dep_target"})
        return Plan("rollback", env, "test", [
            Step("start-slot", "Start the standby", run=look, phase=Phase.PREPARE)],
            intent=intent)

    result = perform(env, "rollback", build, dry_run=False, reason="rollback to 5db0fdf")
    for copy in (seen["state"], seen["holder"]):
        assert copy["deployment_id"] == "dep_target", copy
        assert copy["run_id"] == result.run_id, copy
    assert f"run {result.run_id}" in seen["status"] and "dep_target" in seen["status"], seen
    logged = {json.loads(line)["deployment_id"] for log in env.log_dir.glob("*.log")
              for line in log.read_text().splitlines()}
    assert "dep_target" in logged, logged


def test_a_lock_taken_away_at_the_prompt_stops_the_run_before_any_change(
        env: Environment, with_state: Path) -> None:
    before = with_state.read_bytes()
    calls, error = _fake_run(env, with_state, during="prompt")
    assert calls == []
    assert error.exit_code == ExitCode.LOCKED and "nothing was changed" in error.message
    assert with_state.read_bytes() == before  # not mirrored over the new holder's view
    assert env.lock_path.is_dir() and not (env.lock_path / "holder.json").exists()  # theirs


def test_a_lock_taken_away_before_the_switch_undoes_and_never_switches(
        env: Environment, with_state: Path) -> None:
    calls, error = _fake_run(env, with_state, during="prepare")
    assert calls == ["prepare", "undo prepare"]  # the switch never ran
    assert error.exit_code == ExitCode.LOCKED and "no longer held by this run" in error.message
    assert env.lock_path.is_dir() and not (env.lock_path / "holder.json").exists()


def test_a_signal_pending_when_a_commit_step_returns_without_committing_undoes_it(
        env: Environment, with_state: Path) -> None:
    """Found by review: the executor's fallback commit (a COMMIT step that returned without
    `ctx.commit()`) ran outside the step's handler; a signal pending then escaped as "before
    any change; nothing was changed", no undo run."""
    import signal as signals

    from runbook.errors import RunbookError
    from runbook.plan import Phase, Plan, Step, StepContext
    from runbook.run import perform

    calls: list[str] = []

    def switch(ctx: StepContext) -> None:
        calls.append("switch")
        ctx.on_failure("put Caddy back", lambda: calls.append("undo switch"))
        os.kill(os.getpid(), signals.SIGTERM)  # held: the switch is not interruptible
        time.sleep(0.1)  # the handler runs; the step returns without ctx.commit()

    with pytest.raises(RunbookError) as info:
        perform(env, "switch", lambda run_id: Plan("switch", env, "test", [
            Step("switch", "Switch Caddy", run=switch, phase=Phase.COMMIT)]), dry_run=False,
            reason="test", confirm=lambda plan: True)
    assert calls == ["switch", "undo switch"], calls
    assert "before any change" not in info.value.message, info.value.message
    assert info.value.exit_code == ExitCode.FAILED_SAFELY


def test_a_refusal_after_undos_never_says_nothing_was_changed(
        env: Environment, with_state: Path) -> None:
    """A refusal raised mid-run (exit 4's words: "...; nothing was changed") after this run
    had started a standby is exit 1 once that start is undone (the executor's rule); its
    text still said "nothing was changed", next to "undone: stop the standby"."""
    from runbook.errors import PreconditionError, RunbookError
    from runbook.plan import Phase, Plan, Step, StepContext
    from runbook.run import perform

    calls: list[str] = []

    def start(ctx: StepContext) -> None:
        calls.append("start")
        ctx.on_failure("stop the standby", lambda: calls.append("undo start"))

    def gate(ctx: StepContext) -> None:
        raise PreconditionError("the standby runs another build; nothing was changed",
                                "rebuild it")

    with pytest.raises(RunbookError) as info:
        perform(env, "rollback", lambda run_id: Plan("rollback", env, "test", [
            Step("start-slot", "Start the standby", run=start, phase=Phase.PREPARE),
            Step("health-gate", "Gate", run=gate, phase=Phase.PREPARE)]), dry_run=False,
            reason="test", confirm=lambda plan: True)
    assert calls == ["start", "undo start"], calls
    said = str(info.value)
    assert info.value.exit_code == ExitCode.FAILED_SAFELY, said
    assert "nothing was changed" not in said, said
    assert "undone: stop the standby" in said, said


def test_a_replaced_record_is_not_put_back_over_a_run_whose_undo_failed(
        env: Environment, with_state: Path) -> None:
    """Found by review: the put-back of the interrupted run's record (Plan.replaces) ran
    even after another undo failed; the run then kept "its" record, which was the other
    run's, and status and the next run reasoned from a deploy that never moved traffic."""
    from runbook import intent as intents
    from runbook.errors import RunbookError
    from runbook.plan import Phase, Plan, Step, StepContext
    from runbook.run import perform

    old = intents.Intent(run_id="dep_old", action="deploy", environment=env.name,
                         from_slot="blue", to_slot="green", from_version="aaaaaaa",
                         to_version="bbbbbbb")
    intents.write(env, old)
    mine: list[str] = []

    def prepare(ctx: StepContext) -> None:
        def cannot() -> None:
            raise OSError("the engine is gone")

        ctx.on_failure("stop the standby", cannot)

    def switch(ctx: StepContext) -> None:
        raise RunbookError("verification failed", "check the proxy")

    def build(run_id: str) -> Plan:
        mine.append(run_id)
        return Plan("switch", env, "test", [
            Step("start-slot", "Start the standby", run=prepare, phase=Phase.PREPARE),
            Step("switch", "Switch Caddy", run=switch, phase=Phase.COMMIT)],
            intent=intents.Intent(run_id=run_id, action="switch", environment=env.name,
                                  from_slot="blue", to_slot="green", from_version=None,
                                  to_version="ccccccc"),
            replaces=old)

    with pytest.raises(RunbookError) as info:
        perform(env, "switch", build, dry_run=False, reason="test", confirm=lambda plan: True)
    assert "undoing failed" in info.value.message, info.value.message
    kept = intents.read(env)
    assert kept is not None and kept.run_id == mine[0], kept  # this run's, not dep_old's
    # found by review: it kept its copy of the record it replaced, so the next run, with
    # traffic still on the source, went on from dep_old's record (intents.standing), not
    # from this one's, which says what stays
    from runbook.environment import Slot

    assert intents.REPLACES not in kept.record, kept.record
    assert intents.standing(kept, Slot.BLUE).run_id == mine[0]
    # found by review: the message said "undone: put back the interrupted run's record"
    said = str(info.value)
    assert "undone: put back" not in said, said
    assert "the interrupted run's record (" in said and "was not put back" in said, said


def test_a_failed_undo_is_said_even_when_something_irreversible_stays(
        tmp_path: Path) -> None:
    """A deploy whose migrations moved the schema (it stays), then a verification that fails
    and an undo that fails too (Caddy could not be put back): the run said only "the schema
    changed and stays" and "restore the pre-deploy snapshot", while the new version may still
    serve: restoring then would lose data. Both are said, the failed undo first."""
    from runbook.plan import Phase, Plan, Stays, Step, StepContext
    from runbook.run import perform

    env = host_env(tmp_path)

    def migrate(ctx: StepContext) -> None:
        ctx.on_failure("check the schema", lambda: Stays(
            "the migrations changed the schema (1 -> 2) and stay", "restore the snapshot"))

    def switch(ctx: StepContext) -> None:
        def cannot() -> None:
            raise OSError("the Caddyfile cannot be written")

        ctx.on_failure("put back the previous Caddyfile", cannot)
        raise RunbookError("verification failed", "check the proxy")

    with pytest.raises(RunbookError) as info:
        perform(env, "deploy", lambda run_id: Plan("deploy", env, "test", [
            Step("migrate", "Migrate", run=migrate, phase=Phase.PREPARE),
            # the switch is a COMMIT step, as slots.switch_step makes it: its failed undo is
            # what leaves traffic in doubt (a PREPARE step's cannot move it)
            Step("switch", "Switch Caddy", run=switch, phase=Phase.COMMIT)]),
            dry_run=False, reason="test", confirm=lambda plan: True)
    err = info.value
    assert err.exit_code == ExitCode.ATTENTION
    assert "undoing failed: put back the previous Caddyfile" in err.message, err.message
    assert "changed the schema (1 -> 2) and stay" in err.message, err.message
    assert (err.fix or "").startswith("check `runbook status` now"), err.fix
    assert "restore the snapshot" in (err.fix or ""), err.fix


def test_a_record_that_cannot_be_put_back_is_not_said_to_have_moved_traffic(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Putting back the interrupted run's record moves no traffic: its write failing (a full
    disk, here injected into that one write) made the run say "ATTENTION ... traffic may not
    be where it was" (exit 5) after a health gate that failed before any switch."""
    from runbook import intent as intents
    from runbook.plan import Phase, Plan, Step, StepContext
    from runbook.run import perform

    env = host_env(tmp_path)
    old = intents.Intent(run_id="dep_old", action="deploy", environment=env.name,
                         from_slot="blue", to_slot="green", from_version="aaaaaaa",
                         to_version="bbbbbbb")
    intents.write(env, old)
    real_write = intents.write

    def full_disk_for_the_put_back(e: Environment, intent: intents.Intent) -> None:
        if intent.run_id == old.run_id:
            raise OSError(28, "No space left on device")
        real_write(e, intent)

    monkeypatch.setattr(intents, "write", full_disk_for_the_put_back)

    def gate(ctx: StepContext) -> None:
        raise RunbookError("health gate: the standby did not become healthy", "read its logs")

    with pytest.raises(RunbookError) as info:
        perform(env, "switch", lambda run_id: Plan("switch", env, "test", [
            Step("health-gate", "Health gate", run=gate, phase=Phase.PREPARE)],
            intent=intents.Intent(run_id=run_id, action="switch", environment=env.name,
                                  from_slot="blue", to_slot="green", from_version=None,
                                  to_version="ccccccc"), replaces=old),
            dry_run=False, reason="test", confirm=lambda plan: True)
    err = info.value
    assert err.exit_code == ExitCode.FAILED_SAFELY, (err.exit_code, err.message)
    assert "traffic may not be where it was" not in f"{err.message} {err.fix}", err
    assert "the interrupted run's record could not be put back" in err.message, err.message
    assert "No space left on device" in err.message


def test_a_prompt_open_longer_than_the_lock_lifetime_keeps_the_lock_fresh(
        tmp_path: Path) -> None:
    from runbook.plan import Plan, Step
    from runbook.run import perform

    env = host_env(tmp_path, stale=4)  # refreshed every second
    seen: list[bool] = []

    def confirm(plan: Plan) -> bool:
        for _ in range(12):  # 6 s at the prompt, longer than the lock's 4 s lifetime
            time.sleep(0.5)
            lock = status(env)
            seen.append(lock is not None and not lock.stale)
        return True

    perform(env, "rollback", lambda run_id: Plan("rollback", env, "test", [
        Step("noop", "Nothing", run=lambda ctx: None)]), dry_run=False, reason="test",
        confirm=confirm)
    assert all(seen), seen


def _hold_lock_and_record(env: Environment, ready: Any, done: Any) -> None:
    """A run in progress: it holds the deploy lock and has written its intent record."""
    from runbook import intent as intents

    lock = acquire(env, "a long restore", "rbk_live")
    intents.write(env, intents.Intent(run_id="rbk_live", action="rollback",
                                      environment=env.name, from_slot="green",
                                      to_slot="blue", from_version="bbbbbbb",
                                      to_version="aaaaaaa"))
    ready.set()
    done.wait(30)
    assert lock is not None
    os._exit(0)  # dies holding both, as a killed run would


def test_a_run_in_progress_is_not_called_interrupted(tmp_path: Path) -> None:
    """While a rollback runs (a long restore), `runbook status` and a dry run called its
    record "an interrupted run is unfinished; `runbook rollback` finishes it", pushing on-call
    towards `unlock --force` mid-run. The same record is a run in progress while its process
    holds the lock, and an interrupted run once that process is gone."""
    from runbook import finish
    from runbook import intent as intents
    from runbook import status as statusmod

    env = host_env(tmp_path)
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_lock_and_record, args=(env, ready, done))
    child.start()
    try:
        assert ready.wait(30)
        facts = statusmod.Facts(env)
        facts.intent, facts.lock = intents.read(env), status(env)
        said = [p.problem for p in statusmod.interrupted_run(facts)]
        assert len(said) == 1 and said[0].startswith("a run is in progress"), said
        with pytest.raises(LockedError) as err:
            finish.interrupted(env)
        assert "in progress, not interrupted" in err.value.message
    finally:
        done.set()
        child.join(30)
    facts = statusmod.Facts(env)
    facts.intent, facts.lock = intents.read(env), status(env)
    said = [p.problem for p in statusmod.interrupted_run(facts)]
    assert len(said) == 1 and said[0].startswith("an interrupted run is unfinished"), said


def test_a_takeover_that_cannot_finish_leaves_the_stale_lock_as_it_was(tmp_path: Path) -> None:
    """A full /tmp: the stale lock was removed, the new one could not be written, and the
    error said "nothing was changed" (found by review). The stale lock is now only renamed
    aside until the new one stands, and put back when it cannot."""
    env = host_env(tmp_path)
    with tmpfs(env.lock_dir, "256k"):
        path = plant(env, age=env.lock_stale_after + 600, legacy=True)  # the shell tooling's
        before = (path / "locked_at").read_bytes()
        fill(env.lock_dir)
        with pytest.raises(RunbookError) as refused:
            acquire(env, "rollback")
        assert refused.value.exit_code == ExitCode.PRECONDITION, refused.value
        assert "nothing was changed" in refused.value.message
        assert "free disk space" in (refused.value.fix or "")
        assert sorted(p.name for p in path.iterdir()) == ["locked_at"]
        assert (path / "locked_at").read_bytes() == before
        assert sorted(p.name for p in env.lock_dir.iterdir()) == ["filler", path.name]
        seen = status(env)
        assert seen is not None and seen.stale and seen.locked_at is not None


@needs_root
def test_another_users_stale_lock_in_a_sticky_directory_is_named_with_the_way_out(
        shared_dir: Path, dead_pid: int) -> None:
    """The contract's lock lives in /tmp, which is sticky: a lock another user's crashed run
    left there cannot be renamed or removed by this user. It was exit 2, "check [lock] dir in
    the environment file"; it is the lock's owner, and who may remove it, that matter."""
    env = host_env(shared_dir)
    env.state_file.parent.mkdir()
    env.state_file.parent.chmod(0o777)
    env.state_file.write_bytes((DATA / "documented.json").read_bytes())
    env.state_file.chmod(0o666)
    env.lock_dir.mkdir()
    env.lock_dir.chmod(0o1777)
    path = plant(env, age=env.lock_stale_after + 600, pid=dead_pid)
    for made in (path, *path.iterdir()):
        os.chown(made, OWNER_UID, OWNER_UID)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    imports = ("import json, sys\nfrom pathlib import Path\nfrom runbook import lock\n"
               "from runbook.errors import RunbookError\n"
               "import encodings.utf_8_sig\nfrom tests.drill_checks import host_env\n"
               "env = host_env(Path(sys.argv[1]))\n")
    code = ("said = []\n"
            "for act in (lambda: lock.acquire(env, 'rollback'), lambda: lock.unlock(env),\n"
            "            lambda: lock.unlock(env, force=True)):\n"
            "    try:\n"
            "        said.append(['done', str(act())])\n"
            "    except RunbookError as exc:\n"
            "        said.append([int(exc.exit_code), exc.message, exc.fix])\n"
            "print(json.dumps(said))\n")
    said = json.loads(as_deploy_user([], imports, code, str(shared_dir)))
    for answer in said:
        assert answer[0] == ExitCode.LOCKED, answer
        _, message, fix = answer
        assert f"{path}" in message and f"uid {OWNER_UID}" in message, message
        assert "sticky" in message and "stale" in message, message
        assert f"sudo rm -r {path}" in fix, fix
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in env.lock_dir.iterdir()) == [path.name]


# --- review of 2026-12-04: the state file's lock judged alone, our stripped copy, FIFOs ----


@pytest.fixture
def go_state(env: Environment) -> Path:
    """The Go CLI's state file for this environment, unlocked."""
    env.state_file.parent.mkdir(parents=True)
    doc = json.loads((DATA / "go_cli.json").read_text())
    env.state_file.write_text(json.dumps({**doc, "environment": env.name}, indent=2))
    return env.state_file


_GO_LOCK_FIELDS = ("locked", "locked_at", "locked_by", "reason", "expires_at")  # its struct


@pytest.mark.parametrize("where, bad", [
    ("history", {"deployed_at": "0001-01-01T00:00:00Z"}),  # the Go zero time
    ("history", {"health_status": "starting"}),
    ("lock", {"pid": "42a2"}),  # the lock's own field our reader refuses ("4242" it reads)
])
def test_a_bad_record_in_the_state_file_never_hides_the_go_clis_live_lock(
        env: Environment, go_state: Path, where: str, bad: dict[str, Any]) -> None:
    """Found by review: one record our reader refuses anywhere in the file made the whole
    file read as "no lock": status said free, acquire took the lock beside the Go CLI's
    live one (snapshot-restore then restored the database during its deploy). The lock is
    judged from the file's `lock` object alone, leniently."""
    _go_cli_lock(go_state)
    doc = json.loads(go_state.read_text())
    if where == "history":
        doc["deployment_history"].insert(0, {**doc["deployment_history"][0], **bad})
    else:
        doc["lock"].update(bad)
    go_state.write_text(json.dumps(doc, indent=2))
    with pytest.raises(RunbookError):
        read_state(go_state)  # the premise: our reader refuses this file
    before = go_state.read_bytes()
    seen = status(env)
    assert seen is not None and seen.source == "state file" and not seen.stale, seen
    assert "ci@build-runner" in seen.describe()
    refused = lockmod.refusal(env)
    assert refused is not None and "ci@build-runner" in refused.message
    with pytest.raises(LockedError, match="recorded only in the state file"):
        acquire(env, "snapshot restore", None)
    for force in (False, True):
        with pytest.raises(LockedError):
            unlock(env, force=force)
    assert not env.lock_path.exists() and go_state.read_bytes() == before


def test_a_bad_record_elsewhere_does_not_block_a_free_lock(env: Environment,
                                                           go_state: Path) -> None:
    """The other half: a file our reader refuses for a record, its lock readable and free,
    must not stop a rollback that can still run (its mirror is said to have failed)."""
    doc = json.loads(go_state.read_text())
    doc["deployment_history"][1]["deployed_at"] = "0001-01-01T00:00:00Z"
    go_state.write_text(json.dumps(doc, indent=2))
    before = go_state.read_bytes()
    assert status(env) is None and lockmod.refusal(env) is None
    with acquire(env, "rollback", None) as lock:
        lock.publish()
        assert lock.mirror_error is not None and "zero time" in lock.mirror_error
    assert go_state.read_bytes() == before


def _strip_like_the_go_cli(state: Path) -> dict[str, Any]:
    """The Go CLI's rewrite of the whole file (its lock-less rollback): its lock struct keeps
    only its own fields, so our lock_id, pid and hostname are dropped."""
    doc = json.loads(state.read_text())
    doc["lock"] = {k: doc["lock"][k] for k in _GO_LOCK_FIELDS if k in doc["lock"]}
    state.write_text(json.dumps(doc, indent=2))
    return dict(doc["lock"])


def test_our_copy_stripped_by_a_go_cli_rewrite_is_still_ours(env: Environment,
                                                             go_state: Path) -> None:
    """Found by review: our copy without its lock_id was taken for another tool's lock: the
    refresh warned falsely, the release left `locked: true`, unlock (and --force) refused,
    and the next run was refused for up to 30 minutes."""
    lock = acquire(env, "rollback", None)
    lock.publish()
    stripped = _strip_like_the_go_cli(go_state)
    assert stripped["locked"] is True and "lock_id" not in stripped
    lock.refresh()
    assert lock.mirror_error is None, lock.mirror_error
    copy = json.loads(go_state.read_text())["lock"]
    assert copy["locked"] is True and copy["lock_id"] == lock.lock_id, copy  # whole again
    _strip_like_the_go_cli(go_state)
    assert lock.release() is True
    assert json.loads(go_state.read_text())["lock"]["locked"] is False
    assert status(env) is None
    acquire(env, "rollback", None).release()


def test_a_go_cli_lock_by_the_same_operator_is_not_taken_for_our_copy(
        env: Environment, go_state: Path) -> None:
    """Recognising our stripped copy by who, why and when must not take another lock of the
    same operator for the same reason for ours: only the times we wrote are ours."""
    lock = acquire(env, "deploy e4d2c1b", None)
    lock.publish()
    doc = json.loads(go_state.read_text())
    now = datetime.now(UTC)
    doc["lock"] = {"locked": True, "locked_at": format_time(now), "locked_by": lock.locked_by,
                   "reason": lock.reason,
                   "expires_at": format_time(now + timedelta(seconds=env.lock_stale_after))}
    go_state.write_text(json.dumps(doc, indent=2))
    lock.refresh()
    assert "another tool's lock" in (lock.mirror_error or ""), lock.mirror_error
    lock.release()
    left = json.loads(go_state.read_text())["lock"]
    assert left["locked"] is True and left["locked_at"] == format_time(now), left


_KILLED_HOLDING = ("import os, signal, sys, time\nfrom pathlib import Path\n"
                   "from runbook import lock\nfrom tests.drill_checks import host_env\n"
                   "env = host_env(Path(sys.argv[1]))\n"
                   "held = lock.acquire(env, 'rollback to 2b3c4d5', None)\n"
                   "held.publish()\n"
                   "if sys.argv[2] == 'heartbeat':\n"
                   "    time.sleep(0.05)\n"
                   "    held.refresh(mirror=False)  # holder.json moves on, the copy not\n"
                   "os.kill(os.getpid(), signal.SIGKILL)\n")


def _killed_holding_the_lock(tmp_path: Path, env: Environment, go_state: Path,
                             how: str) -> dict[str, Any]:
    """A real process SIGKILLed holding the published lock, then the Go CLI's rewrite of the
    state file (its lock struct): our lock directory names the dead pid, the state file's
    copy names nobody. `how`: "heartbeat" (the directory refreshed after the copy was
    written, as the heartbeat thread does), or "old record" (a holder.json written before
    it listed its mirrored copies: the copy is its last locked_at/expires_at)."""
    proc = subprocess.run([sys.executable, "-c", _KILLED_HOLDING, str(tmp_path), how],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    holder = json.loads((env.lock_path / holding.HOLDER).read_text())
    assert procs.pid_alive(holder["pid"], holder["pid_start"]) is False  # it names the dead
    if how == "old record":
        holder.pop("mirrored", None)
        (env.lock_path / holding.HOLDER).write_text(json.dumps(holder))
    stripped = _strip_like_the_go_cli(go_state)
    assert stripped["locked"] is True and "lock_id" not in stripped and "pid" not in stripped
    assert stripped["locked_by"] == holder["locked_by"]
    return stripped


@pytest.mark.parametrize("how", ["heartbeat", "old record"])
def test_a_killed_runs_copy_stripped_by_the_go_cli_does_not_block_the_next_run(
        tmp_path: Path, env: Environment, go_state: Path, how: str) -> None:
    """Found by review: a run SIGKILLed holding the lock left its directory naming its dead
    pid (stale: the next run takes it over), but the Go CLI had rewritten the state file's
    copy without our lock_id, pid and hostname; the next run took that for the Go CLI's
    live lock and refused for up to 30 minutes. It is the dead run's copy (its holder.json
    says it wrote those times): the next run says so and takes the lock over."""
    _killed_holding_the_lock(tmp_path, env, go_state, how)
    seen = status(env)
    assert seen is not None and seen.source == "directory" and seen.stealable, seen
    assert "the state file's lock is its copy" in seen.why, seen.why
    assert lockmod.refusal(env) is None
    lock = acquire(env, "rollback", None)
    assert lock.stolen_from is not None and "its copy" in lock.stolen_from.why
    lock.publish()
    copy = json.loads(go_state.read_text())["lock"]
    assert copy["locked"] is True and copy["lock_id"] == lock.lock_id, copy
    assert lock.release() is True
    assert json.loads(go_state.read_text())["lock"]["locked"] is False
    assert status(env) is None


def test_unlock_removes_a_killed_runs_lock_and_its_stripped_copy(
        tmp_path: Path, env: Environment, go_state: Path) -> None:
    """The same left-overs through `runbook unlock` (no --force: its holder is dead): the
    directory and its copy both go; the copy left behind refused the next run."""
    _killed_holding_the_lock(tmp_path, env, go_state, "heartbeat")
    said = unlock(env)
    assert "removed a stale lock" in said and "the state file's lock is its copy" in said, said
    assert json.loads(go_state.read_text())["lock"]["locked"] is False
    assert status(env) is None
    acquire(env, "rollback", None).release()


def test_a_go_cli_lock_taken_after_a_killed_run_is_still_refused(
        tmp_path: Path, env: Environment, go_state: Path) -> None:
    """The other half: a live Go CLI lock of the same operator and reason, at times the dead
    run's holder never wrote, is the Go CLI's: status names it, runs and unlock refuse."""
    copy = _killed_holding_the_lock(tmp_path, env, go_state, "heartbeat")
    doc = json.loads(go_state.read_text())
    now = datetime.now(UTC)
    doc["lock"] = {**copy, "locked_at": format_time(now),
                   "expires_at": format_time(now + timedelta(seconds=env.lock_stale_after))}
    go_state.write_text(json.dumps(doc, indent=2))
    before = go_state.read_bytes()
    seen = status(env)
    assert seen is not None and seen.source == "state file" and not seen.stale, seen
    assert lockmod.refusal(env) is not None
    with pytest.raises(LockedError, match="recorded only in the state file"):
        acquire(env, "rollback", None)
    unlock(env)  # the dead run's directory goes; the Go CLI's lock stays
    assert not env.lock_path.exists() and go_state.read_bytes() == before
    with pytest.raises(LockedError):
        unlock(env, force=True)
    with pytest.raises(LockedError, match="recorded only in the state file"):
        acquire(env, "rollback", None)
    assert go_state.read_bytes() == before


_PROBE = ("import json, sys\nfrom pathlib import Path\nfrom runbook import lock\n"
          "from runbook.errors import LockedError\nfrom tests.drill_checks import host_env\n"
          "env = host_env(Path(sys.argv[1]))\n"
          "seen = lock.status(env)\n"
          "out = {'status': seen and [seen.broken, seen.describe()]}\n"
          "for name, act in (('acquire', lambda: lock.acquire(env, 'x', None)),\n"
          "                  ('unlock', lambda: lock.unlock(env, force=True))):\n"
          "    try:\n"
          "        out[name] = 'done: ' + str(act())\n"
          "    except LockedError as exc:\n"
          "        out[name] = str(exc)\n"
          "print(json.dumps(out))\n")


@pytest.mark.parametrize("name, kind", [
    ("holder.json", "fifo"), ("locked_at", "fifo"),
    ("holder.json", "/dev/zero"), ("locked_at", "/dev/zero"),
    ("holder.json", "large"),
])
def test_a_fifo_or_a_device_in_the_lock_directory_never_hangs_a_command(
        tmp_path: Path, name: str, kind: str) -> None:
    """Found by review: a FIFO, or a symlink to /dev/zero, in a lock directory under /tmp
    (world-writable) hung status, acquire (holding the guard: every other run too) and
    unlock. Only a regular file of a lock's size is read; anything else is a broken lock,
    said, and left for a person to remove."""
    env = host_env(tmp_path)
    env.lock_path.mkdir(parents=True)
    (env.lock_path / "locked_at").write_text(f"{int(time.time())}\n")
    target = env.lock_path / name
    target.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "large":
        target.write_text(json.dumps({"locked_by": "x" * (1 << 20)}))
    else:
        target.symlink_to(kind)
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    broken, said = out["status"]
    assert broken is True and str(target) in said, said
    assert ("larger than" if kind == "large" else "not a regular file") in said, said
    for act in ("acquire", "unlock"):
        assert not out[act].startswith("done") and str(target) in out[act], out
        assert "by hand" in out[act], out
    assert os.path.lexists(target)


def test_a_crashed_shell_lock_dated_in_the_future_is_removed_with_force(env: Environment) -> None:
    """Found by review: the shell tooling's lock written before the clock was stepped back
    (NTP, 6 h) reads as fresh for 6 h, and a lock that has not expired is never removed,
    not even with --force. Its age cannot be told: on-call, having checked that no deploy
    runs, may remove it with --force; without it, it is still refused."""
    path = plant(env, legacy=True)
    future = time.time() + 6 * 3600
    (path / "locked_at").write_text(f"{int(future)}\n")
    os.utime(path / "locked_at", (future, future))
    os.utime(path, (future, future))
    seen = status(env)
    assert seen is not None and not seen.stealable and "in the future" in seen.why, seen
    with pytest.raises(LockedError) as refused:
        acquire(env, "x", None)
    assert f"runbook unlock {command_arg(env)} --force" in (refused.value.fix or ""), refused.value
    with pytest.raises(LockedError, match="--force"):
        unlock(env)
    assert path.is_dir()
    assert "removed" in unlock(env, force=True)
    assert not path.exists()


def _go_cli_lock_in(with_state: Path, **times: object) -> bytes:
    """The Go CLI's lock (state file only, no lock_id) with these times, as written; the
    file's bytes."""
    state = json.loads(with_state.read_text())
    state["lock"] = {"locked": True, "locked_by": "ci@build-runner", "reason": "deploy e4d2c1b",
                     "hostname": "build-runner", **times}
    with_state.write_text(json.dumps(state, indent=2))
    return with_state.read_bytes()


@pytest.mark.parametrize("recorded", ["locked_at and expires_at", "locked_at alone"])
def test_a_crashed_go_cli_lock_dated_in_the_future_is_removed_with_force(
        env: Environment, with_state: Path, recorded: str) -> None:
    """Found by review: the Go CLI's lock (in the state file only) taken while the clock was
    6 h ahead (the RTC kept local time until NTP synced), the Go CLI then crashed and NTP set
    the clock back: it read as taken "0 s ago", expiring in 6 h 29 min, and every run,
    `unlock` and `unlock --force` refused it for those hours. Judged as the shell tooling's
    directory dated in the future is: never taken over by a run, said to be dated in the
    future, removed with --force (on-call having checked that no deploy runs). Only a
    recorded `locked_at` dates it: a lock with `expires_at` alone tells no start (below)."""
    then = datetime.now(UTC) + timedelta(hours=6)
    times = {"locked_at": format_time(then)}
    if recorded == "locked_at and expires_at":
        times["expires_at"] = format_time(then + timedelta(minutes=30))
    before = _go_cli_lock_in(with_state, **times)
    seen = status(env)
    assert seen is not None and seen.source == "state file" and seen.undated, seen
    assert not seen.stealable and "in the future" in seen.why, seen.why
    assert "clock was set back" in seen.why and "cannot be told" in seen.why, seen.why
    said = seen.describe()
    assert "0 s ago" not in said and "in the future" in said, said
    with pytest.raises(LockedError) as refused:
        acquire(env, "rollback", None)
    assert "in the future" in refused.value.message, refused.value.message
    assert f"runbook unlock {command_arg(env)} --force" in (refused.value.fix or ""), refused.value
    with pytest.raises(LockedError) as kept:
        unlock(env)
    assert f"runbook unlock {command_arg(env)} --force" in (kept.value.fix or ""), kept.value
    assert "not even with --force" not in (kept.value.fix or ""), kept.value
    assert with_state.read_bytes() == before and not env.lock_path.exists()
    assert "cleared the state file's lock" in unlock(env, force=True)
    assert read_state(with_state).lock == {"locked": False}


def test_force_removes_a_shell_lock_dated_in_the_future_with_its_copy(
        env: Environment, with_state: Path) -> None:
    """The shell tooling's lock taken while the clock was ahead is dated in the future in its
    directory and in its state-file copy alike: `unlock --force` removed the directory and
    left the copy (dated in the future too), which blocked every run until a second --force.
    The copy goes with its directory; a lock of the Go CLI dated otherwise stays."""
    path = plant(env, legacy=True)
    future = time.time() + 6 * 3600
    (path / "locked_at").write_text(f"{int(future)}\n")
    os.utime(path, (future, future))
    at = datetime.fromtimestamp(int(future), UTC)
    state = json.loads(with_state.read_text())
    state["lock"] = {"locked": True, "lock_id": "lock_sh", "locked_by": "deploy@" + HOST,
                     "hostname": HOST, "locked_at": format_time(at),
                     "lock_expires_at": format_time(at + timedelta(minutes=30))}
    with_state.write_text(json.dumps(state))
    seen = status(env)
    assert seen is not None and seen.source == "directory" and seen.undated, seen
    assert "removed" in unlock(env, force=True)
    assert not path.exists() and read_state(with_state).lock == {"locked": False}

    path = plant(env, legacy=True)  # again, beside a Go CLI lock taken 2 h later
    (path / "locked_at").write_text(f"{int(future)}\n")
    os.utime(path, (future, future))
    before = _go_cli_lock_in(with_state, locked_at=format_time(at + timedelta(hours=2)),
                             expires_at=format_time(at + timedelta(hours=2, minutes=30)))
    assert "removed" in unlock(env, force=True)
    assert not path.exists() and with_state.read_bytes() == before
    with pytest.raises(LockedError, match="in the future"):  # shown now, for its own --force
        acquire(env, "rollback", None)


@pytest.mark.parametrize("times", [
    # an ISO time without its UTC offset: no tool writes one (CONTRACTS: RFC 3339)
    {"locked_at": "NAIVE", "lock_expires_at": "NAIVE+30"},
    {"locked_at": "EPOCH", "lock_expires_at": "EPOCH+30"},  # epoch seconds, a number
    {"locked_at": "0001-01-01T00:00:00Z", "expires_at": "0001-01-01T00:00:00Z"},  # Go: unset
    {},  # no time at all
], ids=["naive-iso", "epoch-number", "go-zero-time", "no-time"])
def test_a_live_state_file_lock_whose_times_cannot_be_read_is_never_taken_over(
        env: Environment, with_state: Path, times: dict[str, str]) -> None:
    """Found by review: a held lock in the state file whose times the judge could not read
    was dated at the epoch: "expired 20792 d 0 h ago", and the next run took it over without
    a word (no takeover said or journaled), beside a deploy that may still run. Its age
    cannot be told: refused, said why, removable with --force once on-call has checked."""
    now = datetime.now(UTC)
    real = {"NAIVE": now.strftime("%Y-%m-%dT%H:%M:%S"),
            "NAIVE+30": (now + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%S"),
            "EPOCH": int(now.timestamp()), "EPOCH+30": int(now.timestamp()) + 1800}
    before = _go_cli_lock_in(with_state, **{k: real.get(v, v) for k, v in times.items()})
    seen = status(env)
    assert seen is not None and seen.source == "state file", seen
    assert seen.undated and not seen.stale and not seen.stealable, seen
    assert "cannot be read" in seen.why and "its age cannot be told" in seen.why, seen.why
    assert "1970" not in seen.describe() and "ago" not in seen.describe(), seen.describe()
    with pytest.raises(LockedError) as refused:
        acquire(env, "rollback", None)
    assert "ci@build-runner" in refused.value.message and "cannot be read" in \
        refused.value.message, refused.value.message
    assert f"runbook unlock {command_arg(env)} --force" in (refused.value.fix or ""), refused.value
    assert lockmod.refusal(env) is not None  # a dry run says the same
    with pytest.raises(LockedError):
        unlock(env)
    assert with_state.read_bytes() == before and not env.lock_path.exists()
    assert "cleared the state file's lock" in unlock(env, force=True)
    assert read_state(with_state).lock == {"locked": False}


@pytest.mark.parametrize("verified", [True, False], ids=["pid-start-verified", "pid-only"])
def test_a_state_file_lock_whose_times_cannot_be_read_held_by_a_live_process(
        env: Environment, with_state: Path, live_pid: int, verified: bool) -> None:
    """The other half: such a lock whose process runs on this host. With its process's start
    time recorded and matching, it is that process's: never removed, not even with --force,
    and no expiry is made up for it ("in never"). By its pid alone (no start time: a pid
    reused after a crash or a reboot looks the same) it is refused too, but --force removes
    it once on-call has checked the process: found by review, it was kept even with --force
    and blocked every run until a hand edit of the state file."""
    extra = {"pid_start": procs.pid_start(live_pid)} if verified else {}
    before = _go_cli_lock_in(with_state, locked_at=int(time.time()), pid=live_pid,
                             hostname=HOST, **extra)
    seen = status(env)
    assert seen is not None and not seen.stale and not seen.stealable, seen
    assert seen.undated is not verified and seen.pid_unverified is not verified, seen
    assert "cannot be read" in seen.why and f"process {live_pid} is running" in seen.why
    refusals = [lambda: acquire(env, "rollback", None), lambda: unlock(env)]
    for act in refusals + ([lambda: unlock(env, force=True)] if verified else []):
        with pytest.raises(LockedError) as refused:
            act()
        fix = refused.value.fix or ""
        assert f"process {live_pid}" in fix or f"-p {live_pid}" in fix, fix
        assert "never\"" not in fix and "in never" not in fix, fix
        if not verified:  # the way out: check the process, then --force
            assert f"runbook unlock {command_arg(env)} --force" in fix, fix
            assert "not even with --force" not in fix, fix
    assert with_state.read_bytes() == before
    if not verified:
        assert "cleared the state file's lock" in unlock(env, force=True)
        assert read_state(with_state).lock == {"locked": False}


@pytest.mark.parametrize("verified", [True, False], ids=["pid-start-verified", "pid-only"])
def test_a_state_file_lock_dated_in_the_future_held_by_a_live_pid(
        env: Environment, with_state: Path, live_pid: int, verified: bool) -> None:
    """A lock dated 6 h in the future (the clock set back since) whose pid runs on this host:
    by its pid alone (no start time: reused after a crash or a reboot looks the same) it was
    kept even with --force until it expired, hours later (found by review, the undated
    lock's twin); with its start time recorded and matching, it is that process's: kept."""
    then = datetime.now(UTC) + timedelta(hours=6)
    extra = {"pid_start": procs.pid_start(live_pid)} if verified else {}
    before = _go_cli_lock_in(with_state, locked_at=format_time(then),
                             expires_at=format_time(then + timedelta(minutes=30)),
                             pid=live_pid, hostname=HOST, **extra)
    seen = status(env)
    assert seen is not None and not seen.stealable, seen
    assert seen.undated is not verified, seen
    with pytest.raises(LockedError):
        acquire(env, "rollback", None)
    if verified:
        with pytest.raises(LockedError):
            unlock(env, force=True)
        assert with_state.read_bytes() == before
    else:
        assert "in the future" in seen.why, seen.why
        assert "cleared the state file's lock" in unlock(env, force=True)
        assert read_state(with_state).lock == {"locked": False}


@pytest.mark.parametrize("ahead", [timedelta(hours=2), timedelta(hours=6, minutes=30)],
                         ids=["2h", "6h30"])
def test_a_go_cli_lock_with_only_a_far_expiry_is_live_not_dated_in_the_future(
        env: Environment, with_state: Path, ahead: timedelta) -> None:
    """Found by review: a lock recording only `expires_at`, with a time-to-live longer than
    [lock] stale_after (another tool's, whose TTL CONTRACTS.md does not bound), was dated at
    `expires_at - stale_after`, "in the future": "the clock was set back", and unlock --force
    removed a lock that had not expired. No start was recorded, so none is judged: it is live
    until its expiry, refused even with --force, and no start is shown for it."""
    before = _go_cli_lock_in(with_state, expires_at=format_time(datetime.now(UTC) + ahead))
    seen = status(env)
    assert seen is not None and seen.source == "state file", seen
    assert not seen.undated and not seen.stale and not seen.stealable, seen
    assert "in the future" not in seen.why and "clock" not in seen.why, seen.why
    assert "build-runner" in seen.why and "expires in" in seen.why, seen.why
    assert "in the future" not in seen.describe(), seen.describe()
    with pytest.raises(LockedError) as refused:
        acquire(env, "rollback", None)
    assert "in the future" not in refused.value.message, refused.value.message
    with pytest.raises(LockedError) as kept:
        unlock(env, force=True)
    assert "not even with --force" in (kept.value.fix or ""), kept.value
    assert with_state.read_bytes() == before


def test_taking_over_an_expired_state_file_lock_is_said_and_journaled(
        env: Environment, with_state: Path) -> None:
    """Found by review: a run took over the Go CLI's expired lock (state file only) without
    a word: the takeover of a stale lock directory is said on the terminal, in the journal
    and in `runbook status` (README), this one was not."""
    from runbook.plan import Plan, Step
    from runbook.run import perform

    _state_lock(env, with_state, expires_in=-60)
    with acquire(env, "x", None) as lock:
        assert lock.stolen_from is not None and lock.stolen_from.source == "state file"
        assert "ci@build-runner" in lock.stolen_from.describe()
    _state_lock(env, with_state, expires_in=-60)
    notices: list[str] = []
    result = perform(env, "snapshot-restore", lambda run_id: Plan(
        "snapshot-restore", env, "test", [Step("noop", "Nothing", run=lambda ctx: None)]),
        dry_run=False, reason="test", notify=notices.append)
    taken = [n for n in notices if n.startswith("took over a stale deploy lock held by")]
    assert len(taken) == 1 and "ci@build-runner" in taken[0] and "expired" in taken[0], notices
    assert result.log_file is not None and taken[0] in Path(result.log_file).read_text()


def test_status_says_since_when_the_lock_is_held_not_its_last_refresh(env: Environment) -> None:
    """Found by review: "held since" showed the last heartbeat (the refresh rewrote
    locked_at), so a run holding the lock for an hour read as taken a minute ago."""
    lock = acquire(env, "long restore", None)
    taken = lock.locked_at
    time.sleep(1.1)
    lock.refresh()
    seen = status(env)
    assert seen is not None and seen.is_ours
    assert f"since {format_time(taken)}" in seen.describe(), seen.describe()
    assert not seen.stale and seen.expires_in > env.lock_stale_after - 1  # still refreshed
    lock.release()


def test_unlock_of_a_shown_lock_refuses_another_found_instead(env: Environment,
                                                              dead_pid: int) -> None:
    """Found by review: `runbook unlock` on a terminal removed whatever stale lock was there
    after the "y", not the one its prompt showed. Given the lock shown, another (a new
    directory, another holder) is refused, exit 3, nothing changed; the one shown goes."""
    plant(env, age=3600, pid=dead_pid)
    shown = status(env)
    assert shown is not None and shown.stealable
    shutil.rmtree(env.lock_path)
    path = plant(env, age=3600, pid=dead_pid, locked_by="carol@ops-laptop")
    holder = json.loads((path / "holder.json").read_text())
    (path / "holder.json").write_text(json.dumps({**holder, "lock_id": "lock_another"}))
    with pytest.raises(LockedError, match="the lock changed while the prompt waited") as info:
        unlock(env, shown=shown)
    assert info.value.exit_code is ExitCode.LOCKED and "nothing was removed" in info.value.message
    assert "carol@ops-laptop" in info.value.message and "again" in (info.value.fix or "")
    assert path.is_dir() and json.loads((path / "holder.json").read_text())["lock_id"] \
        == "lock_another"
    assert "removed a stale lock" in unlock(env, shown=status(env))
    assert not path.exists()


def test_unlock_of_a_shown_state_file_lock_refuses_another(env: Environment,
                                                           with_state: Path) -> None:
    """The same for a lock recorded only in the state file (the Go CLI's, no lock_id): told
    apart by when it was taken."""
    _state_lock(env, with_state, expires_in=-60)
    shown = status(env)
    assert shown is not None and shown.source == "state file" and shown.stale
    state = json.loads(with_state.read_text())
    state["lock"]["locked_at"] = format_time(datetime.now(UTC) - timedelta(minutes=40))
    with_state.write_text(json.dumps(state))
    with pytest.raises(LockedError, match="changed while the prompt waited"):
        unlock(env, shown=shown)
    assert json.loads(with_state.read_text())["lock"]["locked"] is True
    assert "cleared the state file's lock" in unlock(env, shown=status(env))
    _state_lock(env, with_state, expires_in=-60)
    shown = status(env)
    path = plant(env, age=3600)  # a stale directory taken while the prompt waited
    with pytest.raises(LockedError, match="changed while the prompt waited"):
        unlock(env, shown=shown)
    assert path.is_dir()


# --- review of 2026-12-05 (perms): a lock and its guard made under umask 077 ----------------


def _shared_host(shared_dir: Path) -> Environment:
    """A host whose lock folder is sticky and open to all (as /tmp) and whose state folder
    every deploying user may write, as on a host where several operators deploy."""
    env = host_env(shared_dir)
    env.state_file.parent.mkdir()
    env.state_file.parent.chmod(0o777)
    env.state_file.write_bytes((DATA / "documented.json").read_bytes())
    env.state_file.chmod(0o666)
    env.lock_dir.mkdir()
    env.lock_dir.chmod(0o1777)
    return env


def _as_deploy(shared_dir: Path, code: str) -> Any:
    """`code` run as uid 1000 (another operator) on _shared_host's files; its JSON answer.
    `attempt(act)` gives ['done', what act returned] or [exit code, message, fix]."""
    imports = ("import json, sys\nfrom pathlib import Path\nfrom runbook import lock\n"
               "import encodings.utf_8_sig\nfrom tests.drill_checks import host_env\n"
               "env = host_env(Path(sys.argv[1]))\n" + ATTEMPT)
    return json.loads(as_deploy_user([], imports, code, str(shared_dir)))


@needs_root
def test_a_lock_taken_under_umask_077_names_its_holder_to_every_other_operator(
        shared_dir: Path) -> None:
    """Found by review: under umask 077 (root's cron, Ansible) the lock directory was 0700:
    no other operator could read its holder.json, and each was told the lock was held by
    "the shell tooling (no holder recorded)", dated by the directory's mtime, its holder's
    pid never checked. The directory's mode no longer depends on the umask."""
    env = _shared_host(shared_dir)
    old = os.umask(0o077)
    try:
        held = acquire(env, "umask test")
    finally:
        os.umask(old)
    try:
        mode = stat.S_IMODE(env.lock_path.stat().st_mode)
        seen = _as_deploy(shared_dir, "print(json.dumps(lock.status(env).describe()))\n")
    finally:
        release(env, held)
    assert mode == 0o755
    assert "shell tooling" not in seen, seen
    assert seen.startswith(f"{held.locked_by} (pid {os.getpid()} on {HOST}) for 'umask test'")


@needs_root
def test_a_lock_another_operator_cannot_read_is_said_so_and_left_alone(
        shared_dir: Path, dead_pid: int) -> None:
    """A lock directory another user already made 0700 (a runbook before this fix, or the
    shell tooling, under umask 077): who holds it, and whether that run lives, cannot be
    read. It was "the shell tooling (no holder recorded)", judged by its mtime; it is said
    for what it is (whose it is, who can judge it) and never taken or removed, as a lock
    that cannot be checked."""
    env = _shared_host(shared_dir)
    path = plant(env, age=env.lock_stale_after + 600, pid=dead_pid)
    for made in (path, *path.iterdir()):
        os.chown(made, OWNER_UID, OWNER_UID)
    path.chmod(0o700)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    said = _as_deploy(shared_dir, (
        "print(json.dumps([lock.status(env).describe(),\n"
        "                  attempt(lambda: lock.acquire(env, 'rollback')),\n"
        "                  attempt(lambda: lock.unlock(env)),\n"
        "                  attempt(lambda: lock.unlock(env, force=True))]))\n"))
    described, *refusals = said
    assert "shell tooling" not in described and "no holder recorded" not in described
    assert f"{path / 'holder.json'} cannot be read (Permission denied)" in described, described
    assert f"uid {OWNER_UID}" in described, described
    for code, message, fix in refusals:
        assert code == ExitCode.LOCKED, message
        assert described in message and "shell tooling" not in message, message
        assert f"uid {OWNER_UID}" in fix and "root" in fix, fix
        assert f"runbook unlock {command_arg(env)} --status" in fix, fix
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in env.lock_dir.iterdir()) == [path.name]


@needs_root
def test_the_guard_made_under_umask_077_lets_every_other_operator_take_the_lock(
        shared_dir: Path) -> None:
    """Found by review: the guard beside the state file took its mode from the umask; made
    by root under umask 077 it was 0600, and every other operator's rollback, deploy,
    switch and unlock was refused (exit 2, with `touch` as the fix, which did not help). It
    is 0644 whatever the umask; one an older run left 0600 is given that mode by its owner's
    next run."""
    env = _shared_host(shared_dir)
    old = os.umask(0o077)
    try:
        release(env, acquire(env, "root's cron"))
    finally:
        os.umask(old)
    guard = guard_path(env)
    assert guard.stat().st_uid == 0 and stat.S_IMODE(guard.stat().st_mode) == 0o644
    code = ("held = lock.acquire(env, 'alice')\n"
            "print(json.dumps(attempt(lambda: lock.release(env, held))))\n")
    assert _as_deploy(shared_dir, code) == ["done", True]
    guard.chmod(0o600)  # as an older run left it
    release(env, acquire(env, "root again"))
    assert stat.S_IMODE(guard.stat().st_mode) == 0o644
    assert _as_deploy(shared_dir, code) == ["done", True]


@needs_root
def test_a_guard_no_other_operator_can_open_names_the_chmod_that_fixes_it(
        shared_dir: Path) -> None:
    """A guard another user owns and left 0600: only its owner or root can change that. The
    refusal names the file, its owner and `chmod a+r`, exit 4 (a host file this user cannot
    use, as a state file it cannot read), nothing changed; not `touch`, not exit 2."""
    env = _shared_host(shared_dir)
    guard = guard_path(env)
    guard.write_bytes(b"")
    os.chown(guard, OWNER_UID, OWNER_UID)
    guard.chmod(0o600)
    state_before = env.state_file.read_bytes()
    code, message, fix = _as_deploy(
        shared_dir, "print(json.dumps(attempt(lambda: lock.acquire(env, 'rollback'))))\n")
    assert code == ExitCode.PRECONDITION, message
    assert f"deploy lock's guard {guard}" in message and "Permission denied" in message
    assert f"uid {OWNER_UID}" in message and "600" in message, message
    assert f"chmod a+r {guard}" in fix and f"uid {OWNER_UID}" in fix and "root" in fix, fix
    assert "touch" not in fix, fix
    assert not env.lock_path.exists() and env.state_file.read_bytes() == state_before
    assert stat.S_IMODE(guard.stat().st_mode) == 0o600 and guard.stat().st_uid == OWNER_UID


def _stale_lock_fix(env: Environment) -> str:
    from runbook import status as statusmod

    facts = statusmod.Facts(env)
    facts.lock = status(env)
    [found] = list(statusmod.stale_lock(facts))
    return found.fix


@pytest.mark.parametrize("suspended", [False, True])
def test_status_names_for_a_stale_lock_only_what_unlock_accepts(
        env: Environment, live_pid: int, suspended: bool) -> None:
    """Found by review: a stale lock whose process (known by its start time) still runs got
    "`runbook unlock ENV --yes` (add --force: its process still runs)", and unlock refuses
    both (exit 3). Status now says what unlock would: stop the run (the lock module's own
    words), or, suspended (Ctrl-Z, SIGSTOP), resume it or stop it, where `kill` alone waits
    for a SIGCONT; the same words as the run it refuses."""
    plant(env, age=env.lock_stale_after + 600, pid=live_pid)
    holder = json.loads((env.lock_path / "holder.json").read_text())
    holder["pid_start"] = procs.pid_start(live_pid)  # known by its start time: verified
    (env.lock_path / "holder.json").write_text(json.dumps(holder))
    if suspended:
        os.kill(live_pid, signal.SIGSTOP)
        wait_stopped(live_pid)  # the signal is delivered asynchronously
    try:
        fix = _stale_lock_fix(env)
        with pytest.raises(LockedError) as refused:
            acquire(env, "x", None)
        for force in (False, True):
            with pytest.raises(LockedError):
                unlock(env, force=force)
    finally:
        os.kill(live_pid, signal.SIGCONT)
    assert "--force" not in fix.replace("not even with --force", ""), fix
    assert "runbook unlock" not in fix, fix
    if suspended:
        assert f"`kill -CONT {live_pid}`" in fix and f"`kill {live_pid}`" in fix, fix
        assert f"kill -CONT {live_pid}" in (refused.value.fix or ""), refused.value
        assert "suspended" in refused.value.message, refused.value
    else:
        assert f"kill {live_pid}" in fix and "kill -CONT" not in fix, fix
    subprocess.run(["kill", str(live_pid)], check=True)  # the fix, typed: then it goes
    deadline = time.monotonic() + 10
    while procs.pid_alive(live_pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # (reaped by the fixture: a zombie counts as dead)
    assert "runbook unlock" in _stale_lock_fix(env) and unlock(env)


def test_status_offers_force_for_a_stale_lock_known_by_its_pid_alone(
        env: Environment, live_pid: int) -> None:
    """No start time recorded: the pid may be reused, and unlock --force removes it once
    on-call has checked; status names --force there, and only there."""
    plant(env, age=env.lock_stale_after + 600, pid=live_pid)
    assert status(env) is not None and status(env).pid_unverified  # type: ignore[union-attr]
    fix = _stale_lock_fix(env)
    assert "--yes --force`" in fix and str(live_pid) in fix, fix
    unlock(env, force=True)
    assert not env.lock_path.exists()


# --- a run killed after its last step (found by a kill fuzz) --------------------------------

_KILLED_AT_THE_END = ("import os, signal, sys\nfrom pathlib import Path\n"
                      "from runbook import lock\nfrom runbook.lock import holding\n"
                      "from tests.drill_checks import host_env\n"
                      "env = host_env(Path(sys.argv[1]))\n"
                      "held = lock.acquire(env, 'rollback to 2b3c4d5', None)\n"
                      "held.publish()\n"
                      "if sys.argv[2] == 'lock-dir-removed':  # inside release: the copy next\n"
                      "    holding._remove_dir(held.path, held.ident)\n"
                      "os.kill(os.getpid(), signal.SIGKILL)\n")


@pytest.mark.parametrize("where", ["intent-cleared", "lock-dir-removed"])
def test_a_takeover_that_publishes_nothing_still_clears_the_dead_runs_copy(
        tmp_path: Path, env: Environment, with_state: Path, where: str) -> None:
    """Found by a kill fuzz: a rollback SIGKILLed after its last step (its intent cleared, or
    its lock directory removed) left its lock's copy in the state file; the rerun took the
    stale lock over, was refused while planning (nothing to do), and released without
    touching the state file, so the copy named the dead pid for 30 more minutes: status said
    "stale, run unlock", and the Go CLI, which reads only that copy, was blocked. The release
    of a run that took the lock over clears the copy the dead holder left, and says so."""
    proc = subprocess.run([sys.executable, "-c", _KILLED_AT_THE_END, str(tmp_path), where],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = json.loads(with_state.read_text())["lock"]
    assert left["locked"] is True and left["pid"] != os.getpid()
    lock = acquire(env, "rollback", None)
    assert lock.stolen_from is not None  # refused while planning: never published
    holding.release(env, lock, clear_stolen_copy=True)  # no intent record left (run._release)
    assert json.loads(with_state.read_text())["lock"] == {"locked": False}
    assert lock.cleared_copy is not None and str(left["pid"]) in lock.cleared_copy
    assert status(env) is None


def test_a_takeover_never_clears_a_lock_another_tool_took_in_the_state_file_since(
        tmp_path: Path, env: Environment, with_state: Path) -> None:
    """The dead run's copy only: the Go CLI's live lock taken after the takeover stays."""
    proc = subprocess.run([sys.executable, "-c", _KILLED_AT_THE_END, str(tmp_path),
                           "lock-dir-removed"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    lock = acquire(env, "rollback", None)
    _go_cli_lock(with_state)
    go_lock = json.loads(with_state.read_text())["lock"]
    holding.release(env, lock, clear_stolen_copy=True)
    assert json.loads(with_state.read_text())["lock"] == go_lock
    assert lock.cleared_copy is None


def test_an_empty_lock_directory_older_than_a_lock_being_taken_is_taken_over(
        env: Environment) -> None:
    """Found by a kill fuzz: a run SIGKILLed between its mkdir and its holder file left the
    lock directory empty; every run refused it for 30 minutes as the shell tooling's lock
    "(no holder recorded)", while `runbook unlock` knew it for what it is. Older than the
    gap between the shell tooling's mkdir and its locked_at (EMPTY_DIR_GRACE), no one is
    filling it: the next run takes it over and says so; younger, it is still refused."""
    env.lock_path.parent.mkdir(parents=True)
    env.lock_path.mkdir()
    with pytest.raises(LockedError):
        acquire(env, "x", None)  # it may be a lock being taken at this instant
    old = time.time() - 60
    os.utime(env.lock_path, (old, old))
    assert lockmod.refusal(env) is None  # status and a dry run judge it as the run does
    lock = acquire(env, "next", None)
    assert lock.stolen_from is not None and "empty" in lock.stolen_from.why
    assert (env.lock_path / holding.HOLDER).is_file()
    lock.release()
    assert not env.lock_path.exists()


@pytest.mark.parametrize("where", ["state file", "shell directory"])
@pytest.mark.parametrize("written", ["number", "text"])
def test_a_live_deploys_expired_lock_is_held_whatever_way_its_pid_is_written(
        env: Environment, with_state: Path, live_pid: int, where: str, written: str) -> None:
    """Found by review: a deploy script that builds its lock with `jq --arg` writes its pid
    as text ("48213"). Read as no pid, a lock whose locked_at is older than stale_after was
    judged by its age alone and taken over while that deploy still ran (the same lock with a
    numeric pid: exit 3, "its process ... is still running"). Text is evidence the holder is
    alive, never that it died. Oracle: the process this test runs."""
    if where == "shell directory":
        plant(env, age=2000, legacy=True)  # the shell tooling's: its mirror names the pid
    at = datetime.now(UTC) - timedelta(seconds=2000)
    state = json.loads(with_state.read_text())
    state["lock"] = {"locked": True, "locked_by": "deploy@" + HOST,
                     "pid": str(live_pid) if written == "text" else live_pid,
                     "hostname": HOST, "locked_at": format_time(at),
                     "lock_expires_at": format_time(at + timedelta(seconds=1800))}
    with_state.write_text(json.dumps(state))
    before = with_state.read_bytes()
    seen = status(env)
    assert seen is not None and seen.holder_alive is True and not seen.stealable, seen
    with pytest.raises(LockedError, match=f"process {live_pid} is still running") as held:
        acquire(env, "rollback", None)
    assert held.value.exit_code == ExitCode.LOCKED
    with pytest.raises(LockedError):
        unlock(env)
    assert with_state.read_bytes() == before
    assert env.lock_path.is_dir() == (where == "shell directory")


def test_a_state_file_path_that_is_a_directory_refuses_with_exit_4_not_as_locked(
        env: Environment) -> None:
    """Found by review: a [state] file that is a directory was "the deploy lock cannot be
    used ... run again in a minute", exit 3 (a live holder's code), for good. A file being
    rewritten in place is never a directory: refused as the state file's problem, exit 4,
    naming [state] file; nothing is taken (the dry run's judgement says the same)."""
    env.state_file.mkdir(parents=True)
    errors: list[RunbookError | None] = [lockmod.refusal(env)]  # the dry run's judgement
    for attempt in (lambda: acquire(env, "x", None), lambda: unlock(env)):
        with pytest.raises(RunbookError) as refused:
            attempt()
        errors.append(refused.value)
    for error in errors:
        assert error is not None and not isinstance(error, LockedError), error
        assert error.exit_code == ExitCode.PRECONDITION, error
        assert "[state] file" in str(error) and "run again in a minute" not in str(error)
    assert not env.lock_path.exists()
    held = status(env)  # status still shows it, with the same fix
    assert held is not None and held.broken and "[state] file" in (held.fix or ""), held
