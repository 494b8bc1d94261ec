"""Atomic writes keep what other tools rely on (mode, owner, group) and leave nothing behind;
the next run removes what a killed writer left. Real files, no Docker."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runbook import caddy, files
from runbook import state as states
from runbook.environment import Slot
from tests.drill_checks import (
    DEPLOY_UID,
    OWNER_UID,
    SHARED_GID,
    as_deploy_user,
    needs_root,
)

DATA = Path(__file__).parent / "data" / "state"


def test_atomic_write_keeps_mode_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "Caddyfile"
    target.write_text("old\n")
    target.chmod(0o640)
    files.atomic_write(target, b"new\n")
    assert target.read_bytes() == b"new\n"
    assert target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["Caddyfile"]


def test_a_write_without_fsync_is_still_atomic_and_keeps_the_mode(tmp_path: Path) -> None:
    """durable=False (the journal's intermediate run records) drops only the fsyncs."""
    target = tmp_path / "run.json"
    target.write_text("old\n")
    target.chmod(0o600)
    files.atomic_write(target, b"new\n", durable=False)
    assert target.read_bytes() == b"new\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_atomic_write_keeps_owner_and_group_when_root_rewrites(tmp_path: Path) -> None:
    target = tmp_path / "deployment-state.json"
    target.write_text("{}")
    if os.geteuid() == 0:
        os.chown(target, 1234, 5678)
    before = target.stat()
    files.atomic_write(target, b'{"a": 1}')
    after = target.stat()
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)


def owned_file(directory: Path) -> Path:
    target = directory / "deployment-state.json"
    target.write_bytes((DATA / "documented.json").read_bytes())
    os.chown(target, OWNER_UID, SHARED_GID)
    target.chmod(0o660)
    return target


IMPORTS = "import json, sys\nfrom pathlib import Path\nfrom runbook import files\n"
WRITE = "print(json.dumps(files.atomic_write(Path(sys.argv[1]), b'new\\n')))\n"


@needs_root
def test_a_group_member_keeps_the_group_and_is_told_the_owner_was_lost(
        shared_dir: Path) -> None:
    target = owned_file(shared_dir)
    out = as_deploy_user([SHARED_GID], IMPORTS, WRITE, str(target))
    after = target.stat()
    assert target.read_bytes() == b"new\n"
    assert (after.st_uid, after.st_gid, after.st_mode & 0o7777) == (DEPLOY_UID, SHARED_GID, 0o660)
    note = json.loads(out)
    assert isinstance(note, str) and "\n" not in note
    assert note.startswith(f"{target} lost its owner (uid {OWNER_UID}) when rewritten")
    assert "group" not in note.split("when")[0]
    assert f"`chown {OWNER_UID} {target}`" in note


@needs_root
def test_a_writer_outside_the_group_is_told_both_were_lost(shared_dir: Path) -> None:
    target = owned_file(shared_dir)
    note = json.loads(as_deploy_user([], IMPORTS, WRITE, str(target)))
    after = target.stat()
    assert (after.st_uid, after.st_gid) == (DEPLOY_UID, DEPLOY_UID)
    assert f"lost its owner (uid {OWNER_UID}) and group (gid {SHARED_GID})" in note
    assert f"`chown {OWNER_UID}:{SHARED_GID} {target}`" in note


def test_a_rewrite_that_keeps_owner_and_group_says_nothing(tmp_path: Path) -> None:
    target = tmp_path / "Caddyfile"
    target.write_text("old\n")
    assert files.atomic_write(target, b"new\n") is None
    assert files.atomic_write(tmp_path / "new-file", b"x") is None


def test_a_symlinked_target_stays_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("1")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    files.atomic_write(link, b"2")
    assert link.is_symlink() and real.read_text() == "2"


def _acl(uid: int, perm: int) -> bytes:
    """A POSIX access ACL as the kernel stores it (system.posix_acl_access): the owner rw,
    user `uid` `perm`, the group and others nothing, mask `perm`."""
    undefined = 0xFFFFFFFF
    entries = [(0x01, 6, undefined), (0x02, perm, uid), (0x04, 0, undefined),
               (0x10, perm, undefined), (0x20, 0, undefined)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


@needs_root
def test_a_file_read_through_an_acl_stays_readable_after_a_rewrite(shared_dir: Path) -> None:
    """Found by review: a Caddyfile 0640 root:root that Caddy's own user reads through a
    POSIX ACL lost the ACL with the switch's write (a new file renamed into place has only
    what its directory gives it), so the next `systemctl reload` or restart of Caddy could
    not read its config. Judged by the kernel: uid 1000, named by the ACL, reads it."""
    target = shared_dir / "Caddyfile"
    target.write_text("old\n")
    os.chown(target, 0, 0)
    target.chmod(0o640)
    try:
        os.setxattr(target, "system.posix_acl_access", _acl(DEPLOY_UID, 4))
    except OSError as exc:
        pytest.skip(f"this filesystem takes no POSIX ACL ({exc.strerror})")
    read = "print(open(sys.argv[1]).read(), end='')\n"
    assert as_deploy_user([], "import sys\n", read, str(target)) == "old\n"
    caddy.write_atomically(target, b"new\n")
    assert as_deploy_user([], "import sys\n", read, str(target)) == "new\n"
    assert target.stat().st_mode & 0o777 == 0o640


def test_the_state_file_keeps_its_mode_across_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "deployment-state.json"
    path.write_bytes((DATA / "documented.json").read_bytes())
    path.chmod(0o644)  # the Go CLI reads it as another user
    st = states.read_state(path)
    assert st.current is not None
    states.write_state(path, st.with_(current=st.current.with_(active_slot=Slot.GREEN)))
    assert path.stat().st_mode & 0o777 == 0o644


def _refuse_hard_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without hard links (vfat answers EPERM): none can be mounted here."""
    def refuse(source: Path, target: Path) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(target))

    monkeypatch.setattr(files.os, "link", refuse)


@pytest.mark.parametrize("links", ["hard links", "no hard links", "no renameat2 either"])
def test_a_new_only_write_creates_the_file_and_never_replaces_one_made_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, links: str) -> None:
    """new_only: a file that appears up to the move into place (here from the fault point
    just before it) is left whole, FileExistsError, no temp file; with nothing there the
    file is created with the new file's mode (`like`'s, as atomic_write gives it)."""
    if links != "hard links":
        _refuse_hard_links(monkeypatch)
    if links == "no renameat2 either":
        monkeypatch.setattr(files, "rename_noreplace", lambda source, target: False)
    target = tmp_path / "deployment-state.json"
    model = tmp_path / "model"
    model.write_text("")
    model.chmod(0o640)
    files.atomic_write(target, b"ours\n", like=model, new_only=True)
    assert target.read_bytes() == b"ours\n" and target.stat().st_mode & 0o777 == 0o640
    assert target.stat().st_nlink == 1  # the hard-linked temp name is gone
    with pytest.raises(FileExistsError):  # there already
        files.atomic_write(target, b"again\n", new_only=True)
    target.unlink()

    def before() -> None:  # (without renameat2 too: the check then the rename comes after)
        target.write_text("theirs\n")

    with pytest.raises(FileExistsError):
        files.atomic_write(target, b"ours\n", new_only=True, before_rename=before)
    assert target.read_text() == "theirs\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployment-state.json", "model"]


def test_a_killed_writer_leaves_a_temp_file_the_next_run_sweeps(tmp_path: Path) -> None:
    """SIGKILL between the fsynced temp file and the rename: the target is intact, the temp
    file is ours by name and goes; other files, including other tools' temp files, stay."""
    target = tmp_path / "deployment-state.json"
    target.write_text("intact")
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from runbook import state\n"
        "p = Path(sys.argv[1])\n"
        "st = state.DeploymentState(environment='production')\n"
        "state.write_state(p, st, before_rename=lambda: os.kill(os.getpid(), 9))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(target)], check=False)
    assert proc.returncode == -9
    assert target.read_text() == "intact"
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1
    other = tmp_path / ".deployment-state.json.goclisave.tmp"
    other.write_text("not ours")
    assert files.sweep_temps(target) == left
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".deployment-state.json.goclisave.tmp", "deployment-state.json"]


def test_a_dry_runs_fresh_validation_copy_is_not_swept(tmp_path: Path) -> None:
    """Found by review: a dry run (no lock) validates its candidate Caddyfile through a copy
    beside it; a locked run starting then swept every such file whatever its age, and the dry
    run said "Caddy rejected the new Caddyfile". A fresh one stays, an old one goes, and a
    killed writer's own temp file still goes at once."""
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text("x")
    fresh = tmp_path / ".Caddyfile.runbook-validate-abc123.tmp"
    old = tmp_path / ".Caddyfile.runbook-validate-def456.tmp"
    killed = tmp_path / ".Caddyfile.runbook-tmp.0123456789ab.tmp"
    for path in (fresh, old, killed):
        path.write_text("candidate")
    past = time.time() - 2 * files.UNLOCKED_TEMP_AGE
    os.utime(old, (past, past))
    assert sorted(files.sweep_temps(caddyfile)) == sorted([old, killed])
    assert fresh.exists()


def test_every_rename_into_place_is_the_one_atomic_write() -> None:
    """Read from the source (ast): os.replace/os.rename appear only in runbook/files.py, the
    snapshot dump (a stream to a .partial file, too big for bytes in memory) and the lock's
    entombing of a stale lock directory (a directory, renamed so no one else takes it)."""
    import ast

    allowed = {"runbook/files.py", "runbook/snapshots/dump.py", "runbook/lock/holding.py"}
    root = Path(__file__).resolve().parent.parent
    found: set[str] = set()
    for path in sorted((root / "runbook").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("replace", "rename")
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "os"):
                found.add(str(path.relative_to(root)))
    assert "runbook/files.py" in found
    assert found <= allowed, f"a rename outside files.atomic_write: {sorted(found - allowed)}"
    for lock_module in (root / "runbook" / "lock").glob("*.py"):
        assert "os.replace" not in lock_module.read_text()  # lock files: files.atomic_write


@pytest.mark.parametrize(("code", "expected"), [
    (errno.ENOSPC, "free disk space where /var/lib/togather lives (`df -h /var/lib/togather`)"),
    (errno.EDQUOT, "free disk space where /var/lib/togather lives"),
    (errno.EROFS, "/var/lib/togather is on a read-only filesystem"),
    (errno.EACCES, "check the permissions"),
])
def test_a_failed_write_names_a_full_disk_or_a_read_only_one_not_permissions(
        code: int, expected: str) -> None:
    fix = files.write_fix(OSError(code, os.strerror(code)), Path("/var/lib/togather"),
                          "check the permissions")
    assert expected in fix
    assert (code == errno.EACCES) == (fix == "check the permissions")


@pytest.mark.skipif(os.geteuid() != 0, reason="`chattr +i` needs root")
def test_a_write_refused_by_the_immutable_attribute_names_it_not_permissions(
        tmp_path: Path) -> None:
    """Found by review: a folder (or file) `chattr +i` refused the write with EPERM, and the
    fix said "check free disk space and permissions" (or "run as root?", to root). The
    attribute is read (as `lsattr` does) and named with the command that removes it; where
    no cause can be read, EPERM and EBUSY still name what they may be, never permissions."""
    folder = tmp_path / "state"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip(f"no `chattr`, or no attributes on the filesystem of {tmp_path}")
    try:
        with pytest.raises(PermissionError) as refused:
            files.atomic_write(folder / "deployment-state.json", b"{}")
        fix = files.write_fix(refused.value, folder, "check the permissions")
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert refused.value.errno == errno.EPERM
    assert f"{folder} has the immutable attribute (`lsattr -d {folder}`" in fix, fix
    assert f"`chattr -i {folder}`" in fix and "permissions" not in fix, fix
    busy = files.write_fix(OSError(errno.EBUSY, os.strerror(errno.EBUSY)), folder, "check",
                           target=folder / "deployment-state.json")
    assert "cannot be written although its mode allows it" in busy, busy
    assert f"findmnt -T {folder}/deployment-state.json" in busy, busy


def test_the_df_command_in_a_full_disk_fix_can_be_pasted_as_it_is() -> None:
    fix = files.write_fix(OSError(errno.ENOSPC, "No space left on device"),
                          Path("/srv/my state"), "")
    assert "(`df -h '/srv/my state'`)" in fix


def test_every_temp_file_the_runbook_makes_beside_the_caddyfile_is_its_own() -> None:
    """Found by the self-review: the pre-flight's `caddy adapt` copy was not recognised as
    the runbook's, so one left by a killed dry run stayed in /etc/caddy for good."""
    from runbook import files

    for tag in ("write", "validate", "adapt"):
        assert files.temp_target(f".Caddyfile.runbook-{tag}-k2j4h5.tmp") == "Caddyfile", tag
    assert files.temp_target(".Caddyfile.someone-else.tmp") is None


def test_a_run_sweeps_the_temp_files_killed_writes_of_its_records_left(tmp_path: Path) -> None:
    """Found by a kill fuzz: a run killed inside the Caddyfile backup's write left
    `..Caddyfile.runbook-previous.runbook-tmp.<hex>.tmp` for ever; the sweep at the start of
    each run took only the state file's, the Caddyfile's and the intent record's. Every
    record a run writes beside them (the backup, the slot markers, the restore markers, the
    kept state copy) has its killed writer's temp file swept too."""
    import dataclasses

    from runbook import kept_state, restore_records, run, slots
    from runbook.caddy import switch
    from tests.drill_checks import host_env

    env = host_env(tmp_path)  # its Caddyfile is the host's path: one under tmp_path here
    env = dataclasses.replace(env, caddy=dataclasses.replace(
        env.caddy, caddyfile=tmp_path / "caddy" / "Caddyfile"))
    targets = [switch.backup_path(env), restore_records.doubt_marker(env),
               restore_records.unfinished_marker(env),
               kept_state.copy_path(env.runs_dir, env.state_file, env.name),
               *(marker(env, slot) for marker in (slots.held_marker, slots.switch_marker)
                 for slot in ("blue", "green"))]
    left = []
    assert all(t.is_relative_to(tmp_path) for t in targets), targets
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = files.temp_path(target)
        temp.write_text("half")
        left.append(str(temp))
    swept = run._sweep(env)
    assert sorted(set(left) - set(swept)) == []
    assert not any(Path(p).exists() for p in left)
