"""Who may write where a run writes, judged for the user running the runbook, on a drill stack
run by real unprivileged users (useradd), as a review did on real hosts: a state file that
user may only read (the run took it from its owner), a directory it may not write (the real
run stopped where status and the dry run had passed), and a state file behind a symlink into
a missing directory (an unmounted volume: a copy was written under the empty mount point);
and the same for the commands that change the host outside a run (`unlock`, `snapshot create`
and `cleanup`) and for the snapshot folder a restore writes its safety snapshot in. Last, what
no one may write, root included, whatever its mode says (`chattr +i`, a read-only bind mount).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runbook import environment as envmod
from runbook import kept_state as kept
from runbook.drill.stack import DrillStack
from runbook.environment import Environment
from tests.drill_checks import migrated, runbook_cli, snapshot, two_deployments

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.docker

needs_root_and_useradd = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("runuser") is None,
    reason="creating users (useradd) and running the CLI as one (runuser) needs root and "
    "those tools (CI runs the tests as root on Debian)")


@dataclass(frozen=True)
class Users:
    group: str  # the deploy group
    gid: int
    owner: str  # the state file's owner, in the deploy group
    owner_uid: int
    oncall: str  # an operator in the deploy group and docker's, not root
    python: list[str]  # how `oncall` starts this Python with runbook importable


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)


def _python_for(user: str) -> list[str] | None:
    """An interpreter of this Python's version that `user` may run: this one, unless it lives
    where only root may look (pyenv under /root), else the system's python3. The repository
    and this environment's site-packages go on its path."""
    for candidate in dict.fromkeys([sys.executable, shutil.which("python3") or "",
                                    "/usr/bin/python3"]):
        if not candidate:
            continue
        probe = subprocess.run(
            ["runuser", "-u", user, "--", candidate, "-c",
             "import sys; print(sys.version_info[:2])"],
            capture_output=True, text=True, timeout=30, check=False)
        if probe.returncode == 0 and probe.stdout.strip() == str(sys.version_info[:2]):
            return [candidate]
    return None


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    tag = secrets.token_hex(3)
    group, owner, oncall = f"rbdeploy{tag}", f"rbowner{tag}", f"rboncall{tag}"
    made: list[tuple[str, str]] = []
    try:
        _run("groupadd", group)
        made.append(("groupdel", group))
        _run("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-g", group, owner)
        made.insert(0, ("userdel", owner))
        extra = group + (",docker" if _exists_group("docker") else "")
        _run("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", extra, oncall)
        made.insert(0, ("userdel", oncall))
        python = _python_for(oncall)
        if python is None:
            pytest.skip(f"no Python {sys.version_info[:2]} that {oncall} may run")
        import grp
        import pwd

        yield Users(group, grp.getgrnam(group).gr_gid, owner, pwd.getpwnam(owner).pw_uid,
                    oncall, python)
    finally:
        for command, name in made:
            subprocess.run([command, name], capture_output=True, timeout=60, check=False)


def _exists_group(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def as_user(users: Users, env: Environment, *args: str,
            after: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """The runbook command as `oncall` types it (env source last, as runbook_cli, but for
    `after`: what follows it, a SNAPSHOT)."""
    assert env.source is not None
    path = os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]])
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    environ.update(PYTHONPATH=path, HOME="/tmp", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(["runuser", "-u", users.oncall, "--", *users.python, "-m",
                           "runbook.cli", *args, str(env.source), *after],
                          capture_output=True, text=True, timeout=180, env=environ,
                          stdin=subprocess.DEVNULL, check=False, cwd="/tmp")


@contextlib.contextmanager
def shared_with_group(stack: DrillStack, users: Users) -> Iterator[None]:
    """The drill's folder (its lock, logs, run records, Caddyfile, env file, state file)
    shared with the deploy group as on a host: group-owned, group-writable; every owner and
    mode put back after, and what the operator created given back to root."""
    before: dict[str, tuple[int, int, int]] = {}
    for path in [stack.run_dir, *stack.run_dir.rglob("*")]:
        if path.is_symlink():
            continue
        st = path.stat()
        before[str(path)] = (st.st_uid, st.st_gid, st.st_mode & 0o7777)
        os.chown(path, -1, users.gid)
        os.chmod(path, st.st_mode & 0o7777 | 0o060 | (0o010 if path.is_dir() else 0))
    try:
        yield
    finally:
        for path in [stack.run_dir, *stack.run_dir.rglob("*")]:
            if path.is_symlink():
                continue
            if str(path) not in before:  # made by the operator's run: given back to root
                os.chown(path, 0, 0)
                continue
            uid, gid, mode = before[str(path)]
            os.chown(path, uid, gid)
            os.chmod(path, mode)


@needs_root_and_useradd
def test_a_state_file_the_operator_may_only_read_is_refused_before_any_change(
        scene_stack: DrillStack, users: Users) -> None:
    """Found by review: the state file deployer:deployer 0640 in a group-writable directory,
    on-call in the deploy group: the dry run passed without a word, the rollback replaced the
    file by a rename and took it from its owner ("lost its owner ... run chown as root")."""
    env = two_deployments(scene_stack)
    with shared_with_group(scene_stack, users):
        os.chown(env.state_file, users.owner_uid, users.gid)
        os.chmod(env.state_file, 0o640)
        before = snapshot(env)
        dry = as_user(users, env, "rollback", "--dry-run")
        assert dry.returncode == 4, (dry.returncode, dry.stdout, dry.stderr)
        said = dry.stderr
        assert f"{users.oncall} may only read the state file {env.state_file}" in said, said
        assert f"take it from {users.owner}" in said, said
        assert f"sudo -u {users.owner} runbook" in said and "chmod g+w" in said, said
        assert "nothing was changed" in said, said
        real = as_user(users, env, "rollback", "--yes")
        assert real.returncode == 4, (real.returncode, real.stdout, real.stderr)
        assert "may only read the state file" in real.stderr, real.stderr
        st = env.state_file.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (users.owner_uid, users.gid,
                                                              0o640)
        assert snapshot(env) == before  # traffic, containers, Caddyfile, state, lock
        status = as_user(users, env, "status")
        assert f"{users.oncall} may only read the state file" in status.stdout, status.stdout
    # root may: it keeps the file's owner when it rewrites it
    assert runbook_cli(env, "rollback", "--dry-run").returncode == 0


@needs_root_and_useradd
def test_a_state_directory_the_operator_may_not_write_is_said_by_status_and_fails_the_dry_run(
        scene_stack: DrillStack, users: Users) -> None:
    """Found by review: the state file's directory read-only for on-call passed `status` and
    the dry run (the fleet's pre-flight), and the real run refused only when it came to record
    its intent: a fleet rollout stopped part way on that host."""
    env = two_deployments(scene_stack)
    with shared_with_group(scene_stack, users):
        folder = env.state_file.parent
        os.chown(folder, users.owner_uid, users.gid)
        os.chmod(folder, 0o750)
        named = (f"{users.oncall} may not write {folder}: {folder} is "
                 f"{users.owner}:{users.group}, mode 750")
        try:
            status = as_user(users, env, "status")
            assert named in status.stdout, status.stdout
            # a note, exit 0: about the account running it, not the host (a read-only
            # watcher's status must not fail for it for good)
            assert status.returncode == 0, status.stdout
            assert status.stdout.index("Notes:") < status.stdout.index(named), status.stdout
            before = snapshot(env)
            for mode in ("--dry-run", "--yes"):
                done = as_user(users, env, "rollback", mode)
                assert done.returncode == 4, (mode, done.returncode, done.stdout, done.stderr)
                assert named in done.stderr and "nothing was changed" in done.stderr, \
                    done.stderr
            assert snapshot(env) == before
        finally:
            os.chmod(folder, 0o770)


@needs_root_and_useradd
def test_a_watcher_who_may_not_write_is_told_the_rollback_in_an_outage(
        scene_stack: DrillStack, users: Users) -> None:
    """Found by review: status plans the rollback's dry run in an outage to decide whether to
    name `runbook rollback`, and that dry run refused first where this user may not write the
    state folder. A read-only watcher's status (PREVIOUS, the serving blue container removed)
    said "a rollback is refused now (... may not write ...)" where the deploy user's rollback
    runs. What the account may not write is a note (exit 0 without an outage): status judges
    the rollback as the deploy user runs it. Oracle: the dry run, as root, plans it."""
    import re
    import shlex

    from runbook.drill import scenes
    from runbook.environment import Slot

    scene_stack.arrange(scenes.PREVIOUS)
    env = scene_stack.env
    scene_stack.docker("rm", "-f", env.slot(Slot.BLUE).container)
    dry = runbook_cli(env, "rollback", "--dry-run")  # the premise: the deploy user's plans
    assert dry.returncode == 0, dry.stdout + dry.stderr
    with shared_with_group(scene_stack, users):
        folder = env.state_file.parent
        os.chown(folder, users.owner_uid, users.gid)
        os.chmod(folder, 0o750)
        try:
            status = as_user(users, env, "status")
        finally:
            os.chmod(folder, 0o770)
    said = status.stdout
    assert f"{users.oncall} may not write {folder}" in said, said  # the note, still said
    assert status.returncode == 1 and "Problems:" in said, (status.returncode, said)
    assert "is refused now" not in said, said
    named = [shlex.split(c) for c in re.findall(r"`([^`]+)`", said)
             if c.startswith("runbook rollback")]
    assert named and all(c == ["runbook", "rollback", str(env.source)] for c in named), said


def test_a_state_file_behind_a_symlink_into_a_missing_directory_is_refused(
        scene_stack: DrillStack, tmp_path: Path) -> None:
    """Found by review: the state file a symlink into an unmounted volume was said to be
    "deleted or moved away", and `state restore-kept -y` ran `mkdir -p` under the empty mount
    point and wrote the state and the lock's guard there, a copy the volume then hides."""
    env = two_deployments(scene_stack)
    mount_point = tmp_path / "volume"  # the volume is not mounted: an empty directory
    mount_point.mkdir()
    missing = mount_point / "togather"
    real = env.state_file.with_name("state-on-the-volume.json")
    # the copy a runbook run keeps of the file it wrote (the CLI's writes keep it)
    copy = kept.copy_path(env.runs_dir, env.state_file, env.name)
    had_copy = copy.exists()
    if not had_copy:
        copy.write_bytes(env.state_file.read_bytes())
    env.state_file.rename(real)
    env.state_file.symlink_to(missing / "deployment-state.json")
    try:
        words = (f"the symlink {env.state_file} points into {missing}, which does not exist "
                 "(an unmounted volume?)")
        for argv in (["state", "restore-kept", "--yes", "--force"], ["rollback", "--dry-run"],
                     ["rollback", "--yes"]):
            done = runbook_cli(env, *argv)
            assert done.returncode == 4, (argv, done.returncode, done.stdout, done.stderr)
            assert words in done.stderr, (argv, done.stderr)
            assert "deleted or moved away" not in done.stderr, done.stderr
            assert not missing.exists(), argv  # nothing made under the mount point
        status = runbook_cli(env, "status")
        assert words in status.stdout, status.stdout
    finally:
        env.state_file.unlink()
        real.rename(env.state_file)
        if not had_copy:
            copy.unlink()


@needs_root_and_useradd
def test_a_caddyfile_the_operator_may_only_read_is_refused_before_any_change(
        scene_stack: DrillStack, users: Users) -> None:
    """As the state file (found by review): a Caddyfile its owner's 0640 in a folder the
    deploy group may write would be replaced by the switch's rename and taken from its owner.
    A rollback (it writes the Caddyfile) is refused before anything, its dry run too; never
    over a Caddyfile root owns."""
    env = two_deployments(scene_stack)
    caddyfile = Path(os.path.realpath(env.caddy.caddyfile))
    with shared_with_group(scene_stack, users):
        os.chown(caddyfile, users.owner_uid, users.gid)
        os.chmod(caddyfile, 0o640)
        before = snapshot(env)
        dry = as_user(users, env, "rollback", "--dry-run")
        assert dry.returncode == 4, (dry.returncode, dry.stdout, dry.stderr)
        assert f"{users.oncall} may only read the Caddyfile {env.caddy.caddyfile}" in \
            dry.stderr, dry.stderr
        assert f"take it from {users.owner}" in dry.stderr, dry.stderr
        assert f"sudo -u {users.owner} runbook" in dry.stderr, dry.stderr
        real = as_user(users, env, "rollback", "--yes")
        assert real.returncode == 4, (real.returncode, real.stdout, real.stderr)
        st = caddyfile.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (users.owner_uid, users.gid,
                                                              0o640)
        assert snapshot(env) == before  # traffic, containers, Caddyfile, state, lock
        status = as_user(users, env, "status")
        assert "may only read the Caddyfile" in status.stdout, status.stdout
        # root's (config management writes it so): root's tools write whatever owns it, so a
        # run takes nothing from them and is not refused (found by review: it was, with "add
        # the user to group root")
        os.chown(caddyfile, 0, 0)
        os.chmod(caddyfile, 0o644)
        dry = as_user(users, env, "rollback", "--dry-run")
        assert dry.returncode == 0, (dry.returncode, dry.stdout, dry.stderr)
        assert "Caddyfile" not in dry.stderr and "group root" not in dry.stderr, dry.stderr


@needs_root_and_useradd
def test_only_the_commands_that_write_the_caddyfile_need_its_folder(
        scene_stack: DrillStack, users: Users) -> None:
    """Found by review: every command was refused over the Caddyfile's folder (root's on most
    hosts), `state restore-kept` and `snapshot restore` too, which never write it. A rollback
    (it does) is refused there; the check those two run leaves that folder out."""
    env = two_deployments(scene_stack)
    folder = Path(os.path.realpath(env.caddy.caddyfile)).parent
    with shared_with_group(scene_stack, users):
        os.chown(folder, 0, 0)
        os.chmod(folder, 0o755)
        dry = as_user(users, env, "rollback", "--dry-run")
        assert dry.returncode == 4, (dry.returncode, dry.stdout, dry.stderr)
        assert f"{users.oncall} may not write {folder}" in dry.stderr, dry.stderr
        assert "as root:" in dry.stderr and "root or root" not in dry.stderr, dry.stderr
        assert env.source is not None
        code = ("import sys\nfrom runbook import disk, environment\n"
                f"env = environment.load({str(env.source)!r})\n"
                "for writes in (True, False):\n"
                "    found = disk.access_problems(env, caddyfile=writes)\n"
                f"    print(writes, sum({str(folder)!r} in p for p, _ in found), len(found))\n")
        path = os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]])
        probe = subprocess.run(["runuser", "-u", users.oncall, "--", *users.python, "-c", code],
                               capture_output=True, text=True, timeout=120, check=False,
                               env={"PATH": os.environ["PATH"], "PYTHONPATH": path,
                                    "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"},
                               cwd="/tmp")
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.split("\n")[:2] == ["True 1 1", "False 0 0"], probe.stdout


# --- the commands that change the host outside a run: unlock, snapshot create and cleanup ----

DEAD_HOLDER = """
import os, sys
from runbook import environment, lock
lock.acquire(environment.load(sys.argv[1]), reason="a run killed holding the lock")
os._exit(0)  # killed: never released
"""


def _refused(done: subprocess.CompletedProcess[str], users: Users, folder: Path, *,
             journaled: bool = False) -> None:
    """Exit 4 in one line that names `folder`, who owns it, and the fix; nothing else said
    (no journal warning, no traceback), but for a run refused while planning under its lock
    (`journaled`) the line naming its journal, as every such refusal."""
    named = (f"{users.oncall} may not write {folder}: {folder} is "
             f"{users.owner}:{users.group}, mode 750")
    assert done.returncode == 4, (folder, done.returncode, done.stdout, done.stderr)
    first, *rest = done.stderr.splitlines()
    assert first.startswith("runbook: error: ") and len(rest) == int(journaled), done.stderr
    assert all(line.startswith("runbook: journal: ") for line in rest), done.stderr
    assert named in done.stderr and "nothing was changed" in done.stderr, done.stderr
    assert f"chmod g+w {folder}" in done.stderr and f"sudo -u {users.owner} runbook" in \
        done.stderr, done.stderr


@contextlib.contextmanager
def kept_from_the_group(folder: Path, users: Users) -> Iterator[None]:
    """`folder` its owner's, the deploy group's to read only (750): what oncall may not write."""
    os.chown(folder, users.owner_uid, users.gid)
    os.chmod(folder, 0o750)
    try:
        yield
    finally:
        os.chmod(folder, 0o770)


def _listing(*folders: Path) -> dict[str, list[str]]:
    return {str(f): sorted(p.name for p in f.iterdir()) for f in folders}


@needs_root_and_useradd
def test_unlock_as_a_user_who_may_not_write_the_lock_folder_is_refused_before_any_change(
        scene_stack: DrillStack, users: Users) -> None:
    """`runbook unlock` skipped the check every run makes (disk.refuse_unwritable): as a user
    who may not write the lock folder it journaled its start, then failed renaming the lock
    away. Refused now before anything, in one line naming the folder and the fix; the lock
    stays. A log folder it may not write is not in its way (journaled warns), nor is a lock
    folder when no lock is held (nothing to do)."""
    env = two_deployments(scene_stack)
    assert env.source is not None
    subprocess.run([sys.executable, "-c", DEAD_HOLDER, str(env.source)], check=True,
                   timeout=60)
    holder = (env.lock_path / "holder.json").read_bytes()
    with shared_with_group(scene_stack, users):
        before = _listing(env.lock_dir, env.log_dir, env.runs_dir)
        with kept_from_the_group(env.lock_dir, users):
            done = as_user(users, env, "unlock", "--force", "--yes")
        _refused(done, users, env.lock_dir)
        assert (env.lock_path / "holder.json").read_bytes() == holder
        assert _listing(env.lock_dir, env.log_dir, env.runs_dir) == before
        # a log folder it may not write is not in its way (journaled warns): the lock goes
        with kept_from_the_group(env.log_dir, users):
            done = as_user(users, env, "unlock", "--force", "--yes")
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert "may not write" not in done.stderr and "journal" in done.stderr, done.stderr
        assert not env.lock_path.exists()
        # no lock held: nothing to remove, nothing refused (found by review: exit 4)
        with kept_from_the_group(env.lock_dir, users):
            free = as_user(users, env, "unlock", "--yes")
        assert free.returncode == 0 and "may not write" not in free.stderr, (
            free.stdout, free.stderr)


@needs_root_and_useradd
def test_snapshot_create_as_a_user_who_may_not_write_the_snapshot_folder_is_refused(
        scene_stack: DrillStack, users: Users) -> None:
    """`runbook snapshot create` skipped the check every run makes: as a user who may not
    write the snapshot folder it journaled its start and dumped nothing only once it had
    connected to the database ("snapshot folder ... is not writable", no owner, no fix to
    type). Refused now before anything, in one line naming the folder and the fix; no
    snapshot is made. A log folder it may not write is not in its way (a cron's backups).
    The premise: with the folders writable, the same user takes one."""
    env = two_deployments(scene_stack)
    snaps = env.database.snapshot_dir
    with shared_with_group(scene_stack, users):
        before = _listing(snaps, env.log_dir, env.runs_dir)
        with kept_from_the_group(snaps, users):
            done = as_user(users, env, "snapshot", "create", "--reason", "access")
            status = as_user(users, env, "status")  # which a refusal's "N more" names
        _refused(done, users, snaps)
        assert f"{users.oncall} may not write {snaps}" in status.stdout, status.stdout
        assert _listing(snaps, env.log_dir, env.runs_dir) == before
        # a log folder it may not write is not in its way: an hourly cron's backup is taken,
        # the journal's gap warned (found by review: refused, exit 4, no backups)
        with kept_from_the_group(env.log_dir, users):
            done = as_user(users, env, "snapshot", "create", "--reason", "nolog")
        assert done.returncode == 0 and "journal" in done.stderr, (done.stdout, done.stderr)
        assert len(list(snaps.glob("*_nolog.sql.gz"))) == 1, _listing(snaps)
        done = as_user(users, env, "snapshot", "create", "--reason", "access")
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert len(list(snaps.glob("*_access.sql.gz"))) == 1, _listing(snaps)


@needs_root_and_useradd
def test_snapshot_cleanup_as_a_user_who_may_not_write_its_folders_is_refused_dry_run_too(
        scene_stack: DrillStack, users: Users) -> None:
    """`runbook snapshot cleanup` (and its dry run) skipped the check every run makes: as a
    user who may not write the snapshot folder it took the deploy lock and journaled, then
    could not delete the expired snapshot; one who may not write the lock folder failed
    taking the lock after journaling its start. Refused now before anything, in one line
    naming the folder and the fix; no snapshot deleted. The premise: with the folders
    writable, the same user deletes the expired one."""
    from runbook import lock as locks
    from runbook import snapshots

    env = two_deployments(scene_stack)
    snaps = env.database.snapshot_dir
    older = snapshots.create(env, "access-older")
    time.sleep(1.1)  # named by the second it was taken
    newer = snapshots.create(env, "access-newer")  # the newest usable: always kept
    for snap in (older, newer):
        meta = json.loads(snap.meta_path.read_text())
        snap.meta_path.write_text(json.dumps(meta | {"expires_at": "2000-01-01T00:00:00Z"}))
    with shared_with_group(scene_stack, users):
        for folder in (snaps, env.lock_dir):
            before = _listing(snaps, env.lock_dir, env.log_dir, env.runs_dir)
            with kept_from_the_group(folder, users):
                dry = as_user(users, env, "snapshot", "cleanup", "--dry-run")
                done = as_user(users, env, "snapshot", "cleanup", "--yes")
            _refused(dry, users, folder)
            _refused(done, users, folder)
            assert _listing(snaps, env.lock_dir, env.log_dir, env.runs_dir) == before
        with kept_from_the_group(env.log_dir, users):  # not in its way: journaled warns
            dry = as_user(users, env, "snapshot", "cleanup", "--dry-run")
        assert dry.returncode == 0 and f"Would remove {older.name}" in dry.stdout, dry.stderr
        # the state file's folder: it writes nothing there once the lock's guard is made
        locks.release(env, locks.acquire(env, reason="the guard made, as by any run"))
        # a snapshot folder not made yet holds nothing to delete: a daily cleanup as a user
        # who may not create it is not refused (found by review: exit 4 every day)
        elsewhere = Path(f"/tmp/test-nosnap-{secrets.token_hex(4)}")
        elsewhere.mkdir(mode=0o755)  # root's: oncall may not create the folder in it
        unmade = env.with_(database=dataclasses.replace(
            env.database, snapshot_dir=elsewhere / "db-snapshots"))
        source = env.source.with_name("unmade-snapshots.toml")
        source.write_text(envmod.to_toml(unmade))
        os.chmod(source, 0o644)
        try:
            nothing = as_user(users, envmod.load_file(source), "snapshot", "cleanup",
                              "--dry-run")
        finally:
            shutil.rmtree(elsewhere)
            source.unlink()
        assert nothing.returncode == 0 and "may not write" not in nothing.stderr, (
            nothing.stdout, nothing.stderr)
        done = as_user(users, env, "snapshot", "cleanup", "--yes")
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert not older.path.exists() and newer.path.exists(), _listing(snaps)


@needs_root_and_useradd
def test_a_restore_as_a_user_who_may_not_write_the_snapshot_folder_is_refused_before_the_stop(
        scene_stack: DrillStack, users: Users) -> None:
    """A restore takes its safety snapshot in the snapshot folder, which perform's check left
    out (it is not every run's): as a user who may not write it, the restore and its dry run
    are refused before anything (the app slots keep running), in the words `snapshot create`
    uses; so is a deploy's pre-deploy snapshot (the same check, snapshots/room.py)."""
    from runbook import snapshots

    env = two_deployments(scene_stack)
    snaps = env.database.snapshot_dir
    snapshots.create(env, "access-restore")
    with shared_with_group(scene_stack, users):
        before = snapshot(env)
        listed = _listing(snaps, env.log_dir, env.runs_dir)
        with kept_from_the_group(snaps, users):
            # the newest: `taken` (as_user names the environment last, where SNAPSHOT goes)
            dry = as_user(users, env, "snapshot", "restore", "--dry-run")
            done = as_user(users, env, "snapshot", "restore", "--yes")
        _refused(dry, users, snaps)
        _refused(done, users, snaps, journaled=True)  # refused while planning, as a full one
        assert snapshot(env) == before  # traffic, containers (running), state, lock
        after = _listing(snaps, env.log_dir, env.runs_dir)
        assert after[str(snaps)] == listed[str(snaps)], after


@needs_root_and_useradd
def test_status_with_a_snapshot_folder_behind_a_folder_the_user_may_not_search_is_no_crash(
        scene_stack: DrillStack, users: Users) -> None:
    """A snapshot folder under a parent the operator may not search (a 0750 home, a 0700
    /var/lib/togather): the access check's own `exists()` raised PermissionError, and
    `runbook status` ended in "unexpected failure ... a bug in runbook", exit 5 (found by
    review). It cannot tell there, so it says nothing of that folder; status reports the rest."""
    env = two_deployments(scene_stack)
    snaps = env.database.snapshot_dir
    hidden = Path(f"/tmp/test-hidden-{secrets.token_hex(4)}")
    (hidden / "secret").mkdir(parents=True)
    os.chmod(hidden / "secret", 0o700)  # root's: nobody else may search it
    away = snaps.with_name(snaps.name + ".away")
    snaps.rename(away)
    try:
        snaps.symlink_to(hidden / "secret" / "snaps")
        with shared_with_group(scene_stack, users):
            done = as_user(users, env, "status")
    finally:
        snaps.unlink()
        away.rename(snaps)
        shutil.rmtree(hidden)
    assert done.returncode in (0, 1), (done.returncode, done.stdout, done.stderr)
    assert "bug in runbook" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert env.name in done.stdout or "blue" in done.stdout, done.stdout


# --- a place no one may write, root included, whatever its mode says --------------------------


def _quiet(*argv: str) -> bool:
    return subprocess.run(argv, capture_output=True, check=False, timeout=30).returncode == 0


@contextlib.contextmanager
def nobody_writes(path: Path, how: str) -> Iterator[str]:
    """`path` that no one may write, root included, as a review did on a host: its immutable
    attribute (`chattr +i`), or a read-only bind mount of it alone (`how`); "immutable" falls
    back to the mount where the filesystem has no attributes. Yields which was used; put back
    after. Skipped, saying why, where this machine can do neither."""
    path = Path(os.path.realpath(path))
    if how == "immutable" and shutil.which("chattr") and _quiet("chattr", "+i", str(path)):
        try:
            yield "immutable"
        finally:
            _quiet("chattr", "-i", str(path))
        return
    if os.geteuid() != 0 or not _quiet("mount", "--bind", str(path), str(path)):
        pytest.skip(f"neither `chattr +i` nor a bind mount works on {path} here (root, a "
                    "filesystem with attributes or a mount namespace of its own)")
    try:
        if not _quiet("mount", "-o", "remount,ro,bind", str(path)):
            pytest.skip(f"a bind mount of {path} cannot be made read-only here")
        yield "read-only mount"
    finally:
        _quiet("umount", str(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="`chattr +i` and `mount` need root")
@pytest.mark.parametrize("how", ["immutable", "read-only mount"])
def test_a_state_file_no_one_may_write_is_said_first_and_refused_before_any_change(
        scene_stack: DrillStack, how: str) -> None:
    """Found by review: `chattr +i` on the state file (or a read-only bind mount of it), as
    root. `status` said "No problems found" and the dry run passed; the rollback moved traffic,
    then could not record it: exit 6 "TOOK EFFECT ... check free disk space and permissions",
    and every rerun the same. os.access, and the check that skipped root, could not tell.
    Now status names it, and the dry run and the run refuse it first: exit 4, the cause and
    the command that shows it named, nothing changed."""
    env = two_deployments(scene_stack)
    state = env.state_file
    with nobody_writes(state, how) as used:
        before = snapshot(env)
        status = runbook_cli(env, "status")
        dry = runbook_cli(env, "rollback", "--dry-run")
        real = runbook_cli(env, "rollback", "--yes")
        after = snapshot(env)
    # a bind-mounted file: remounting it read-write would not do (a rename over it is EBUSY)
    cause = ({"immutable": "has the immutable attribute",
              "read-only mount": "is a mount point of its own, read-only"}[used])
    command = f"chattr -i {state}" if used == "immutable" else f"findmnt -T {state}"
    named = f"the state file {state} cannot be written although its mode allows it"
    assert status.returncode == 1 and "Problems:" in status.stdout, status.stdout
    assert named in status.stdout and cause in status.stdout, status.stdout
    for done in (dry, real):
        assert done.returncode == 4, (done.returncode, done.stdout, done.stderr)
        assert named in done.stderr and cause in done.stderr, done.stderr
        assert command in done.stderr and "nothing was changed" in done.stderr, done.stderr
        assert "TOOK EFFECT" not in done.stderr and "disk space" not in done.stderr, done.stderr
    assert after == before  # traffic, containers, Caddyfile, state, no lock left


@pytest.mark.skipif(os.geteuid() != 0, reason="`chattr +i` and `mount` need root")
def test_a_state_file_that_cannot_be_written_when_the_run_begins_is_refused_before_any_change(
        scene_stack: DrillStack) -> None:
    """The run's first write of the state file (the lock's copy for other tools, just before
    the first change) failed, and the run went on, only to fail recording the rollback once
    traffic had moved (exit 6, found by review). Made unwritable at the prompt, after every
    pre-flight passed, the file is now refused there: exit 4, nothing changed, the lock
    released, the cause named with the way to undo it."""
    from runbook import rollback
    from runbook.errors import ExitCode, RunbookError

    env = two_deployments(scene_stack)
    before = snapshot(env)
    with contextlib.ExitStack() as later:
        used: list[str] = []

        def freeze(plan: object) -> bool:  # at the prompt: config management freezes it
            used.append(later.enter_context(nobody_writes(env.state_file, "immutable")))
            return True

        with pytest.raises(RunbookError) as err:
            rollback.rollback(env, confirm=freeze)
        after = snapshot(env)
    said = str(err.value)
    assert err.value.exit_code == ExitCode.PRECONDITION, said
    assert f"cannot write the state file {env.state_file}" in said, said
    assert "nothing was changed" in said and "TOOK EFFECT" not in said, said
    assert (f"chattr -i {env.state_file}" if used == ["immutable"]
            else f"findmnt -T {env.state_file}") in said, said
    assert after == before  # traffic, containers (green never started), state, no lock


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chattr") is None,
                    reason="`chattr +i` needs root and e2fsprogs")
@pytest.mark.parametrize("target", ["state folder", "Caddyfile"])
def test_a_folder_or_caddyfile_with_the_immutable_attribute_is_named_not_its_mode(
        scene_stack: DrillStack, target: str) -> None:
    """Found by review, as root: `chattr +i` on the state folder was refused (exit 4, right)
    with "root may not write ...: root:root, mode 755 ... run as a user who may write it",
    which mode 755 root:root already allows; on the Caddyfile the dry run passed and the run
    started green, failed to write the Caddyfile ("run as root?", as root), and stopped it
    again (exit 1). Both are refused now before anything, naming the attribute."""
    env = two_deployments(scene_stack)
    path = (env.state_file.parent if target == "state folder"
            else Path(os.path.realpath(env.caddy.caddyfile)))
    if not _quiet("chattr", "+i", str(path)):
        pytest.skip(f"the filesystem of {path} has no immutable attribute")
    try:
        before = snapshot(env)
        dry = runbook_cli(env, "rollback", "--dry-run")
        real = runbook_cli(env, "rollback", "--yes")
        after = snapshot(env)
    finally:
        _quiet("chattr", "-i", str(path))
    flag = "-d " if path.is_dir() else ""
    for done in (dry, real):
        said = done.stderr
        assert done.returncode == 4, (done.returncode, done.stdout, said)
        assert "cannot be written although its mode allows it" in said, said
        assert "has the immutable attribute" in said and f"lsattr {flag}{path}" in said, said
        assert f"chattr -i {path}" in said and "nothing was changed" in said, said
        assert "may not write" not in said and "run as root" not in said, said
    assert after == before  # traffic, containers (green never started), state, no lock


@needs_root_and_useradd
def test_status_and_dry_run_with_the_state_file_behind_a_folder_the_user_may_not_search(
        scene_stack: DrillStack, users: Users) -> None:
    """Found by review: the state file behind a root-only 0700 folder, run as the operator.
    The check of what no one may write asked `Path.is_dir()`, which raises PermissionError
    there (Python 3.11): `status` and the dry run ended in "unexpected failure ... a bug in
    runbook". Status reports as before, and the dry run refuses the folder, naming its mode."""
    env = two_deployments(scene_stack)
    state = env.state_file
    hidden = Path(f"/tmp/test-hidden-{secrets.token_hex(4)}")
    (hidden / "secret").mkdir(parents=True)
    os.chmod(hidden / "secret", 0o700)  # root's: nobody else may search it
    away = state.with_name(state.name + ".away")
    state.rename(away)
    shutil.copy2(away, hidden / "secret" / state.name)
    try:
        state.symlink_to(hidden / "secret" / state.name)
        with shared_with_group(scene_stack, users):
            done = as_user(users, env, "status")
            dry = as_user(users, env, "rollback", "--dry-run")
    finally:
        state.unlink()
        away.rename(state)
        shutil.rmtree(hidden)
    for run in (done, dry):
        assert "bug in runbook" not in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert done.returncode in (0, 1) and "blue" in done.stdout, (done.returncode, done.stdout)
    assert dry.returncode == 4, (dry.returncode, dry.stdout, dry.stderr)
    assert f"{users.oncall} may not write {hidden / 'secret'}" in dry.stderr, dry.stderr
    assert "root:root, mode 700" in dry.stderr, dry.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chattr") is None,
                    reason="`chattr +i` needs root and e2fsprogs")
def test_a_finish_that_does_not_write_the_caddyfile_is_not_refused_over_it(
        scene_stack: DrillStack) -> None:
    """Found by review: the rollback killed after its commit (at the start of its `state`
    step), then the Caddyfile made immutable (config management freezes it): the rerun, whose
    finish plan skips the Caddyfile (it names the target already), was refused, exit 4, "the
    Caddyfile ... has the immutable attribute". A finish is never blocked by a file it does
    not write: it records the rollback, exit 0, the Caddyfile untouched."""
    from runbook.state import read_state

    env = two_deployments(scene_stack)
    wanted = read_state(env.state_file).previous
    assert wanted is not None
    first = runbook_cli(env, "rollback", "--yes", fault="before:state:SIGKILL")
    assert first.returncode == -9, (first.returncode, first.stderr)
    caddyfile = Path(os.path.realpath(env.caddy.caddyfile))
    before = caddyfile.read_bytes()
    if not _quiet("chattr", "+i", str(caddyfile)):
        pytest.skip(f"the filesystem of {caddyfile} has no immutable attribute")
    try:
        dry = runbook_cli(env, "rollback", "--dry-run")
        rerun = runbook_cli(env, "rollback", "--yes")
    finally:
        _quiet("chattr", "-i", str(caddyfile))
    for done in (dry, rerun):
        assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
        assert "finishing" in done.stdout + done.stderr, done.stdout
    current = read_state(env.state_file).current
    assert current is not None and current.version == wanted.version, current
    assert caddyfile.read_bytes() == before


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chattr") is None,
                    reason="`chattr +a` needs root and e2fsprogs")
def test_a_log_folder_with_the_append_only_attribute_is_no_problem(
        scene_stack: DrillStack) -> None:
    """Found by review: `chattr +a` on the log folder (audit hardening) refused every run,
    status and dry run included, as a folder no one may write. The journal only creates its
    log there (O_CREAT|O_EXCL) and appends to it, which the attribute allows: the rollback
    runs and its log is there."""
    env = two_deployments(scene_stack)
    logs = env.log_dir
    logs.mkdir(parents=True, exist_ok=True)
    if not _quiet("chattr", "+a", str(logs)):
        pytest.skip(f"the filesystem of {logs} has no append-only attribute")
    try:
        listed = set(logs.iterdir())
        status = runbook_cli(env, "status")
        real = runbook_cli(env, "rollback", "--yes")
        made = set(logs.iterdir()) - listed
    finally:
        _quiet("chattr", "-a", str(logs))
    assert "append-only" not in status.stdout, status.stdout
    assert real.returncode == 0, (real.returncode, real.stdout, real.stderr)
    assert [p.suffix for p in made] == [".log"] and any(p.stat().st_size for p in made), made


@pytest.mark.skipif(os.geteuid() != 0, reason="`chattr +i` and `mount` need root")
def test_a_snapshot_restore_goes_on_with_a_state_file_no_one_may_write(
        scene_stack: DrillStack) -> None:
    """README: a snapshot restore does not read the state file and records nothing in it,
    so one that cannot be written (`chattr +i`) does not stop it (found by review: it was
    refused, exit 4, as a rollback that records there is). Its lock's copy there is only
    said."""
    from runbook import snapshots

    env = two_deployments(scene_stack)
    snapshots.create(env, "frozen-state")
    with nobody_writes(env.state_file, "immutable"):
        before = env.state_file.read_bytes()
        dry = runbook_cli(env, "snapshot", "restore", "--dry-run")
        real = runbook_cli(env, "snapshot", "restore", "--yes")
        after = env.state_file.read_bytes()
    for done in (dry, real):
        assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert after == before


@needs_root_and_useradd
def test_root_refused_in_a_user_namespace_is_told_it_may_not_write_not_of_an_attribute(
        scene_stack: DrillStack, users: Users) -> None:
    """Root inside a user namespace (a rootless container; NFS's root_squash alike) may not
    write a folder whose owner is not mapped there. Found by review: told "an immutable
    attribute or a read-only mount ... chattr -i", which is not there; it is told, as before,
    that root may not write it, and to run as a user who may."""
    probe = subprocess.run(["runuser", "-u", users.oncall, "--", "unshare", "--user",
                            "--map-root-user", "true"], capture_output=True, check=False,
                           timeout=30)
    if probe.returncode != 0:
        pytest.skip("no unprivileged user namespaces here")
    env = two_deployments(scene_stack)
    assert env.source is not None
    path = os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]])
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    environ.update(PYTHONPATH=path, HOME="/tmp", PYTHONDONTWRITEBYTECODE="1")
    before = snapshot(env)
    # readable by all (the drill's folder is 0700, its environment file 0600), writable by
    # root alone: root in the namespace may read it all and write none of it
    opened = [scene_stack.run_dir, env.source]
    modes = [p.stat().st_mode & 0o7777 for p in opened]
    try:
        for p, mode in zip(opened, modes, strict=True):
            p.chmod(mode | (0o005 if p.is_dir() else 0o004))
        dry = subprocess.run(["runuser", "-u", users.oncall, "--", "unshare", "--user",
                              "--map-root-user", *users.python, "-m", "runbook.cli",
                              "rollback", "--dry-run", str(env.source)],
                             capture_output=True, text=True, timeout=180, env=environ,
                             stdin=subprocess.DEVNULL, check=False, cwd="/tmp")
    finally:
        for p, mode in zip(opened, modes, strict=True):
            p.chmod(mode)
    assert dry.returncode == 4, (dry.returncode, dry.stdout, dry.stderr)
    assert "root may not write" in dry.stderr, dry.stderr
    assert "immutable" not in dry.stderr and "chattr" not in dry.stderr, dry.stderr
    assert snapshot(env) == before


@needs_root_and_useradd
def test_a_snapshot_the_operator_may_not_read_is_refused_as_access_never_as_a_bad_file(
        scene_stack: DrillStack, users: Users) -> None:
    """Found by review: root's deploy wrote the newest pre-deploy dump root 0600 in the
    group's snapshot folder; as on-call, `rollback --restore-snapshot --dry-run` and `snapshot
    restore --dry-run` exited 2 "cannot be read (Permission denied) ... pick another one":
    an older dump, every write since lost. The file is fine: exit 4, nothing changed, whose
    it is and the fix (run as a user who may read it), never another snapshot; the listing
    marks it. The premise: root restores it (its dry run passes)."""
    env = migrated(scene_stack)
    snaps = sorted(env.database.snapshot_dir.glob("*.sql.gz"))
    assert snaps, "the scene's pre-deploy snapshot"
    newest = max(snaps, key=lambda p: p.name)
    assert runbook_cli(env, "rollback", "--restore-snapshot", "--dry-run").returncode == 0
    with shared_with_group(scene_stack, users):
        os.chown(newest, 0, 0)
        os.chmod(newest, 0o600)  # as root's deploy writes it
        before = snapshot(env)
        listed = _listing(env.database.snapshot_dir)
        for argv, after in ((["rollback", "--restore-snapshot", "--dry-run"], ()),
                            # the default pick (the newest), then named
                            (["snapshot", "restore", "--dry-run"], ()),
                            (["snapshot", "restore", "--dry-run"], (newest.name,))):
            done = as_user(users, env, *argv, after=after)
            said = done.stderr
            assert done.returncode == 4, (argv, done.returncode, done.stdout, said)
            assert len(said.splitlines()) == 1, (argv, said)
            assert (f"snapshot {newest.name} belongs to root mode 600 and {users.oncall} "
                    "may not read it; nothing was changed") in said, (argv, said)
            assert "run the same command as a user who may read it (`sudo runbook" in said, \
                (argv, said)
            assert "pick another" not in said, (argv, said)
        assert snapshot(env) == before
        assert _listing(env.database.snapshot_dir) == listed
        shown = as_user(users, env, "snapshot", "list")
        assert shown.returncode == 0, (shown.stdout, shown.stderr)
        row = next(line for line in shown.stdout.splitlines() if line.startswith(newest.name))
        assert " x " in row, shown.stdout
        assert f"x = {users.oncall} may not read it" in shown.stdout, shown.stdout
        as_json = json.loads(as_user(users, env, "snapshot", "list", "--format",
                                     "json").stdout)
        assert [s["readable"] for s in as_json if s["name"] == newest.name] == [False]


@needs_root_and_useradd
def test_another_users_stale_lock_in_a_sticky_folder_fails_the_dry_run_as_the_real_run(
        scene_stack: DrillStack, users: Users) -> None:
    """Found by review: the deploy user's crashed run left its lock directory (0755, an old
    locked_at) in the sticky lock folder. As on-call, `rollback --dry-run` exited 0 ("would be
    taken over (expired 37 min ago)") and `rollback --yes` exited 3 (only its owner or root
    may remove it); status offered `runbook unlock`, refused the same way. The dry run and
    status judge it as the take-over does, in its words. The premise: root takes it over."""
    env = two_deployments(scene_stack)
    with shared_with_group(scene_stack, users):
        mode = env.lock_dir.stat().st_mode & 0o7777
        os.chmod(env.lock_dir, 0o1777)
        env.lock_path.mkdir(mode=0o755)
        (env.lock_path / "locked_at").write_text(
            f"{int(time.time() - env.lock_stale_after - 600)}\n")
        for made in (env.lock_path, env.lock_path / "locked_at"):
            os.chown(made, users.owner_uid, users.gid)
        try:
            before = snapshot(env)
            dry = as_user(users, env, "rollback", "--dry-run")
            real = as_user(users, env, "rollback", "--yes")
            status = as_user(users, env, "status")
            assert snapshot(env) == before
            assert real.returncode == 3, (real.returncode, real.stdout, real.stderr)
            assert dry.returncode == 3, (dry.returncode, dry.stdout, dry.stderr)
            said = dry.stderr.splitlines()[0]
            assert said == real.stderr.splitlines()[0], (dry.stderr, real.stderr)
            assert (f"belongs to {users.owner} (uid {users.owner_uid}) and {env.lock_dir} is "
                    "sticky") in said, said
            assert f"sudo rm -r {env.lock_path}" in said, said
            assert "would be taken over" not in dry.stdout, dry.stdout
            assert f"sudo rm -r {env.lock_path}" in status.stdout, status.stdout
            assert "runbook unlock" not in status.stdout, status.stdout
            # root may: its dry run takes it over
            root = runbook_cli(env, "rollback", "--dry-run")
            assert root.returncode == 0 and "would be taken over" in root.stdout, (
                root.stdout, root.stderr)
        finally:
            shutil.rmtree(env.lock_path, ignore_errors=True)
            os.chmod(env.lock_dir, mode)


def _stopped_child(parent: int, timeout: float = 60) -> int:
    """The pid of the process under `parent` (runuser's child: the runbook) once it has
    stopped itself (its fault point's SIGSTOP)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [parent]
        for pid in list(pids):
            with contextlib.suppress(OSError):
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                pids += [int(k) for k in kids]
        for pid in pids:
            with contextlib.suppress(OSError):
                stat_line = Path(f"/proc/{pid}/stat").read_text()
                if stat_line[stat_line.rindex(")") + 2] == "T":
                    return pid
        time.sleep(0.05)
    raise AssertionError("the run never reached its fault point")


@needs_root_and_useradd
def test_a_state_folder_taken_away_after_traffic_moved_names_its_owner_and_the_lock_left(
        scene_stack: DrillStack, users: Users) -> None:
    """Found by review: on-call (not root) rolled back, and config management took the
    state folder back (owner and mode) while the run switched. The run said TOOK EFFECT (exit
    6) with "check free disk space and permissions", and the state file went on saying
    "locked" by that run for 30 minutes, which the Go CLI obeys, unsaid. Now the folder's
    owner, group and mode and the way out are named, and so is the lock the state file still
    holds, with until when. Root's rerun finishes it. Oracle: the files and the proxy."""
    from runbook import faults
    from runbook.environment import Slot
    from tests.drill_checks import through_proxy

    env = two_deployments(scene_stack)  # v3 serving from blue, v2 stopped on green
    assert env.source is not None
    with shared_with_group(scene_stack, users):
        folder = env.state_file.parent
        path = os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]])
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
        environ.update(PYTHONPATH=path, HOME="/tmp", PYTHONDONTWRITEBYTECODE="1",
                       **{faults.VARIABLE: "switch.after-verify:SIGSTOP"})
        run = subprocess.Popen(["runuser", "-u", users.oncall, "--", *users.python, "-m",
                                "runbook.cli", "rollback", "--yes", str(env.source)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environ, stdin=subprocess.DEVNULL, cwd="/tmp")
        try:
            stopped = _stopped_child(run.pid)
            os.chown(folder, users.owner_uid, users.gid)
            os.chmod(folder, 0o755)
            os.kill(stopped, signal.SIGCONT)
            _, err = run.communicate(timeout=180)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
            os.chmod(folder, 0o770)
    assert run.returncode == 6, err
    assert "TOOK EFFECT" in err, err
    assert (f"{folder} belongs to {users.owner} (uid {users.owner_uid}), group "
            f"{users.group}, mode 755, and {users.oncall}") in err, err
    assert "`sudo runbook ...`" in err, err
    assert f"the state file {env.state_file} still says this run holds the lock" in err, err
    assert json.loads(env.state_file.read_text())["lock"]["locked"] is True  # as said
    assert through_proxy(env)[0] == Slot.GREEN.value
    done = runbook_cli(env, "rollback", "--yes")  # root finishes it and frees the lock
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(env.state_file.read_text())["lock"]["locked"] is False
