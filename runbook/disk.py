"""Room on the filesystems the runbook writes to, checked before a run needs it.

A run writes its lock, its intent record, the state file (a temp copy, then a rename), the
Caddyfile, the journal and its run record: tens of KiB. A full or read-only filesystem
there fails the run at its lock, or after the commit at the state file; saying so first
(`runbook status`, the fleet's pre-flight, the plan's warnings) lets on-call free space first.
The snapshot folder is judged by what a snapshot needs there (`Space.need`), only where a
snapshot will be taken (snapshots/room.py).
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runbook import files
from runbook.environment import Environment, command_arg
from runbook.errors import PreconditionError

LOW = 1 << 20  # bytes: well above what one run writes
LOW_INODES = 64  # a run creates a dozen files (temp copies, lock, intent, records)
RESERVE_FRACTION = 0.05  # of the filesystem, kept free while a dump grows ...
RESERVE_MAX = 256 * 1024 * 1024  # ... but never more than this
MIN_DUMP = 64 * 1024  # bytes: a dump of a nearly empty database, when no snapshot tells more

SNAPSHOT_INODES = 4  # a dump writes its partial and its sidecar (a temp copy, then a rename)


@dataclass(frozen=True)
class Space:
    """Room on the filesystem a directory lives on (statvfs of it, or of its nearest existing
    parent: a directory a run would create counts where it would be created)."""

    directory: Path
    device: int
    free: int  # bytes an unprivileged writer may still use
    read_only: bool
    free_inodes: int | None = None  # None: the filesystem counts no inodes (btrfs, some NFS)
    total: int = 0  # the filesystem's size
    # the snapshot folder's: the size of the dump to expect (`dump_estimate`; 0: no
    # snapshot of this database yet); None for the folders of the runbook's own files
    dump_estimate: int | None = None

    @property
    def reserve(self) -> int:
        """What a dump leaves free on this filesystem (snapshots/dump.py stops there)."""
        return reserve(self.total)

    @property
    def need(self) -> int:
        """Bytes that must be free here: LOW for the runbook's own files; in the snapshot
        folder, the dump's reserve plus an estimate of the dump. The estimate is the largest
        of this database's last snapshots there (dumped and compressed the same way, a few
        days ago at most: a good guess of the next one, with MIN_DUMP as its floor), not
        pg_database_size, which counts indexes, bloat and free pages the compressed dump
        never holds (several times its size: a folder with room would be refused). A dump
        that outgrows it is still stopped at the reserve, its app slots started again."""
        if self.dump_estimate is None:
            return LOW
        return self.reserve + max(self.dump_estimate, MIN_DUMP)


def reserve(total: int) -> int:
    """The room a dump leaves free on a filesystem of `total` bytes: the database (WAL), the
    app's logs and the runbook's own records usually share it, and a dump that filled it
    could stop Postgres, an outage the snapshot was taken to prevent."""
    return int(min(RESERVE_MAX, total * RESERVE_FRACTION))


def space(directory: Path) -> Space | None:
    """None when nothing on the path can be read (the run would say why in its own words)."""
    probe = Path(directory)
    while True:
        try:
            vfs = os.statvfs(probe)
            device = os.stat(probe).st_dev
        except FileNotFoundError:
            if probe.parent == probe:
                return None
            probe = probe.parent
            continue
        except OSError:
            return None
        return Space(Path(directory), device, vfs.f_bavail * vfs.f_frsize,
                     bool(vfs.f_flag & os.ST_RDONLY), vfs.f_favail if vfs.f_files else None,
                     vfs.f_blocks * vfs.f_frsize)


def rooms(env: Environment) -> list[Space]:
    """The state file's, the lock's, the journal's, the run records' and the Caddyfile's: what
    every run writes. Not the snapshot folder, which only a run taking a snapshot needs
    (`snapshot_problems`, `refuse_without_snapshot_room`): a full one blocked a fleet rollback
    that takes none, during an incident (found by review)."""
    found = (space(directory) for directory in (
        env.state_file.parent, env.lock_dir, env.log_dir, env.runs_dir,
        env.caddy.caddyfile.parent))
    return [room for room in found if room is not None]


def free_or_move(where: Path, cleanup: str) -> str:
    return (f"free space in {where} (`df -h {shlex.quote(str(where))}`; {cleanup}) or point "
            "[database] snapshot_dir in the environment file at a bigger disk, then run again")


def problems(found: list[Space],
             snapshot_fix: Callable[[], str] | None = None) -> list[tuple[str, str]]:
    """(problem, fix) once per filesystem a run could not write to (read-only, under LOW
    bytes or LOW_INODES inodes free), named by the first directory on it; the snapshot
    folder's (`dump_estimate` set) by what a snapshot needs, `snapshot_fix` its fix."""
    out: list[tuple[str, str]] = []
    seen: set[int] = set()
    for room in found:
        if room.device in seen:
            continue
        where = room.directory
        snapshots = room.dump_estimate is not None
        if room.read_only:
            seen.add(room.device)
            out.append((f"{where} is on a read-only filesystem: " + (
                "a restore or a deploy cannot take its snapshot there" if snapshots else
                "the next run cannot write its lock, its intent or the state"),
                files.read_only_fix()))
        elif room.free < room.need:
            seen.add(room.device)
            out.append((f"{room.free // 1024} KiB free where {where} lives: " + (
                f"a snapshot needs about {room.need // 1024} KiB there ({room.reserve // 1024} "
                "KiB kept free, and this database's last snapshots' size), so a restore or a "
                "deploy would be refused at its pre-flight" if snapshots else
                "the next run may fail to take the lock or to record the state"),
                (snapshot_fix() if snapshot_fix else free_or_move(
                    where, "`runbook snapshot cleanup ENV` removes the expired snapshots"))
                if snapshots else files.no_space_fix(where)))
        elif room.free_inodes is not None \
                and room.free_inodes < (SNAPSHOT_INODES if snapshots else LOW_INODES):
            # bytes to spare but no inode left: every new file fails with "No space left"
            seen.add(room.device)
            out.append((f"{room.free_inodes} free inodes where {where} lives: " + (
                "a restore or a deploy cannot write its snapshot" if snapshots else
                "the next run may fail to create its lock or to record the state"),
                files.no_inodes_fix(where)))
    return out


# --- who may write there (the same places, judged for the user running the runbook) -------


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _as(uid: int) -> str:
    """`sudo` as the user `uid` (by number when it has no name, as sudo spells that)."""
    if uid == 0:
        return "sudo"
    name = _user(uid)
    return f"sudo -u {name}" if name != str(uid) else f"sudo -u '#{uid}'"


def _nearest(directory: Path) -> Path | None:
    """`directory`, or its nearest existing parent (where a run would create it)."""
    probe = directory
    try:
        while not probe.exists():
            if probe.parent == probe:
                return None
            probe = probe.parent
        return probe if probe.is_dir() else None
    except OSError:  # a parent this user may not search (a 0750 home), a stale mount:
        return None  # cannot tell here; a run says it with its own error (was exit 5, a
        # "bug" in `runbook status`: found by review)


def _may_write(path: Path, mode: int) -> bool:
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _directories(env: Environment, *, caddyfile: bool, records: bool, state: bool, lock: bool,
                 log: bool, snapshot_dir: bool) -> list[Path]:
    """The folders a command writes in (`access_problems`' keywords), absolute."""
    state_file = Path(os.path.realpath(env.state_file))
    behind = files.missing_link_target(env.state_file) is not None
    guard = lock and not state and not behind and not _guard_made(env)
    return [Path(os.path.abspath(d)) for d in (
        [state_file.parent] if (state or guard) and not behind else []) + [
            *([env.lock_dir] if lock else []), *([env.log_dir] if log else []),
            *([env.runs_dir] if records else []),
            *([Path(os.path.realpath(env.caddy.caddyfile)).parent] if caddyfile else []),
            *([env.database.snapshot_dir] if snapshot_dir else [])]]


def _files(env: Environment, *, caddyfile: bool, state: bool) -> list[tuple[Path, str]]:
    """The files a command replaces (by a rename), and what to call them."""
    behind = files.missing_link_target(env.state_file) is not None
    return [*([(Path(os.path.realpath(env.state_file)), f"the state file {env.state_file}")]
              if state and not behind else []),
            *([(Path(os.path.realpath(env.caddy.caddyfile)),
                f"the Caddyfile {env.caddy.caddyfile}")] if caddyfile else [])]


def _where(directory: Path, probe: Path) -> str:
    return str(directory) + (f" (to be created in {probe})" if probe != directory else "")


def _mode_allows(st: os.stat_result, bits: int) -> bool:
    """The mode bits alone let this user `bits` (os.W_OK | os.X_OK): its owner's, its
    group's or the others' bits, as the kernel picks them (not root: `_blocked`)."""
    shift = 6 if st.st_uid == os.geteuid() else 3 if st.st_gid in (
        os.getegid(), *os.getgroups()) else 0
    return (st.st_mode >> shift) & bits == bits


def _blocked(path: Path, bits: int, *, appends_only: bool = False) -> tuple[str, str] | None:
    """(what `path` is, the fix) when no one may write it whatever its mode says
    (files.unwritable), or when this user may not though the mode bits allow it and the
    cause cannot be read (a filesystem without attributes, an ACL): said as that. Not for
    root where unwritable finds nothing: root refused (in a user namespace, a rootless
    container, on NFS with root_squash) is `access_problems`' "root may not write ..." (it
    was told of an immutable attribute that is not there, found by review)."""
    if (found := files.unwritable(path, appends_only=appends_only)) is not None:
        return found
    if os.geteuid() == 0:
        return None
    try:
        st = os.stat(path)
        if _may_write(path, bits) or not _mode_allows(st, bits):
            return None
    except OSError:
        return None
    quoted = shlex.quote(str(path))
    flag = "-d " if stat.S_ISDIR(st.st_mode) else ""
    return (f"is {_user(st.st_uid)}:{_group(st.st_gid)}, mode {stat.S_IMODE(st.st_mode):o}: an "
            f"immutable attribute or a read-only mount (`lsattr {flag}{quoted}`, `findmnt -T "
            f"{quoted}`), or an ACL (`getfacl {quoted}`)",
            f"undo what those show (as root: `chattr -i {quoted}`, or remount it read-write), "
            "then run again")


def _renamed_in(env: Environment, directories: list[Path]) -> set[Path | None]:
    """The folders (as `_nearest` finds them) where a run renames or removes files. Not the
    log folder's: it is only created in and appended to (journal._new_log), which its
    append-only attribute allows, unless another of `directories` is that same folder."""
    logs = Path(os.path.abspath(env.log_dir))
    return {_nearest(d) for d in directories if d != logs}


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def blocked_problems(env: Environment, *, caddyfile: bool = True, records: bool = True,
                     state: bool = True, lock: bool = True, log: bool = True,
                     snapshot_dir: bool = False,
                     state_file: bool = True) -> list[tuple[str, str]]:
    """(problem, fix) for each place a run writes (`access_problems`' keywords) that no one
    may write, root included, whatever its mode says (`_blocked`): a problem of the host, not
    of the account. Found by review, as root: a state file `chattr +i` (or bind-mounted
    read-only) passed `status` and the dry run, and the rollback moved traffic, then failed
    to record it (exit 6, every rerun too); the state folder `chattr +i` was refused as
    "root may not write ...: root:root, mode 755", and a Caddyfile so failed the switch with
    "run as root?". A folder on a read-only filesystem is `problems`' to say, and a file in
    one."""
    out: list[tuple[str, str]] = []
    seen: set[Path] = set()
    directories = _directories(env, caddyfile=caddyfile, records=records, state=state,
                               lock=lock, log=log, snapshot_dir=snapshot_dir)
    renamed = _renamed_in(env, directories)
    for directory in directories:
        probe = _nearest(directory)
        if probe is None or probe in seen or _read_only(probe):
            continue
        seen.add(probe)
        if (found := _blocked(probe, os.W_OK | os.X_OK,
                              appends_only=probe not in renamed)) is not None:
            out.append((f"{_where(directory, probe)} cannot be written although its mode "
                        f"allows it: {probe} {found[0]}", found[1]))
    for path, what in _files(env, caddyfile=caddyfile, state=state and state_file):
        if os.path.isfile(path) and not _read_only(path.parent) \
                and (found := _blocked(path, os.W_OK)) is not None:
            out.append((f"{what} cannot be written although its mode allows it: it {found[0]}",
                        found[1]))
    return out


def access_problems(env: Environment, *, caddyfile: bool = True, records: bool = True,
                    state: bool = True, lock: bool = True, log: bool = True,
                    snapshot_dir: bool = False,
                    state_file: bool = True) -> list[tuple[str, str]]:
    """(problem, fix) for what the user running this may not write where a run writes, as
    `rooms` names it: a directory (the run stopped at its lock, its journal or its intent,
    after `status` and the dry run had passed, and so part way through a fleet rollout whose
    pre-flight is that dry run), and a state file it may only read, when not root: replaced by
    a rename in its group-writable directory, it was taken from its owner, whose tools that
    write it in place could no longer update it (both found by review). A read-only
    filesystem is `problems`' to say, what no one may write `blocked_problems`', a state file
    behind a symlink into a missing directory the state reader's (state.missing_link).

    What the command writes: `log` the log folder (a run journals before its first change;
    `unlock` and `snapshot create/cleanup` only warn when they cannot); `caddyfile` the
    Caddyfile (a restore does not: its folder, root's on most
    hosts, refused it for nothing); `records` a run record (`run.journaled`'s commands write
    the log alone); `state` the state file and its folder (`state_file`
    False: the folder alone, as a snapshot restore, which records nothing in the file, writes
    its markers there); `lock` the deploy lock, taken or removed (its
    folder, and the state file's, where the lock's guard is made when missing);
    `snapshot_dir` a snapshot written or deleted there (`snapshot create` and `cleanup`
    skipped this check: they failed part way, after journaling, or deleted nothing with
    exit 0)."""
    me = os.geteuid()
    user = _user(me)
    out: list[tuple[str, str]] = []
    seen: set[Path] = set()
    snapshots = Path(os.path.abspath(env.database.snapshot_dir))
    directories = _directories(env, caddyfile=caddyfile, records=records, state=state,
                               lock=lock, log=log, snapshot_dir=snapshot_dir)
    renamed = _renamed_in(env, directories)
    for directory in directories:
        probe = _nearest(directory)
        if probe is None or probe in seen:
            continue
        seen.add(probe)
        try:
            st = os.stat(probe)
            if _read_only(probe) or _may_write(probe, os.W_OK | os.X_OK) \
                    or _blocked(probe, os.W_OK | os.X_OK,
                                appends_only=probe not in renamed) is not None:
                continue
        except OSError:
            continue
        out.append((f"{user} may not write {_where(directory, probe)}: {probe} is "
                    f"{_user(st.st_uid)}:{_group(st.st_gid)}, mode "
                    f"{stat.S_IMODE(st.st_mode):o}; a run as {user} "
                    + ("that takes or deletes a snapshot " if directory == snapshots else "")
                    + "would stop before its first change",
                    f"run the same command as a user who may write it (`{_as(st.st_uid)} "
                    f"runbook ...`), or let {user} write it (as root: `chmod g+w "
                    f"{shlex.quote(str(probe))}`, {user} in group {_group(st.st_gid)})"))
    if me == 0:
        return out  # root keeps a file's owner when it rewrites it
    for path, what in _files(env, caddyfile=caddyfile, state=state and state_file):
        if _blocked(path, os.W_OK) is None:
            out += _read_only_file(path, what, user)
    return out


def _guard_made(env: Environment) -> bool:
    """The lock's guard is there beside the state file: taking the lock opens it (read-only
    where this user may not write it) and writes nothing in that folder."""
    from runbook.lock import guard_path

    return os.path.isfile(guard_path(env))


def _read_only_file(path: Path, what: str, user: str) -> list[tuple[str, str]]:
    """A file `user` may only read, in a directory it may write: a run would replace it by a
    rename (files.atomic_write) and take it from its owner, whose tools that write it in place
    could no longer update it (the state file: found by review; the Caddyfile the same way)."""
    try:
        st = os.stat(path)
    except OSError:
        return []  # no file yet (or none to read): a run creates it, as this user
    if not stat.S_ISREG(st.st_mode) or _may_write(path, os.W_OK) \
            or not _may_write(path.parent, os.W_OK | os.X_OK):
        return []  # its folder's own problem is said, with its own fix
    if st.st_uid == 0:  # root's tools write whatever owns it: nothing is taken from them
        return []  # (found by review: a Caddyfile config management writes as root:root 644
        # in a deploy-group folder refused every switch, with "add the user to group root")
    owner = _user(st.st_uid)
    member = st.st_gid in (os.getegid(), *os.getgroups())
    group_fix = "" if st.st_gid == 0 and not member else (  # never "join group root"
        f", or let its group write it (as {owner} or root: `chmod g+w "
        f"{shlex.quote(str(path))}`" + ("" if member else
                                        f", and add {user} to group {_group(st.st_gid)}") + ")")
    return [(f"{user} may only read {what} ({owner}:{_group(st.st_gid)}, mode "
             f"{stat.S_IMODE(st.st_mode):o}): a run as {user} would replace it by a rename and "
             f"take it from {owner}, whose tools that write it in place could no longer "
             "update it",
             f"run the same command as its owner (`{_as(st.st_uid)} runbook ...`){group_fix}")]


def refuse_unwritable(env: Environment, *, caddyfile: bool = True, records: bool = True,
                      state: bool = True, lock: bool = True, log: bool = True,
                      snapshot_dir: bool = False, state_file: bool = True) -> None:
    """Every mutating command (and its dry run, which the fleet's pre-flight is) refuses,
    before anything, where `blocked_problems` or `access_problems` finds one (what it writes:
    the same keywords), or, where it writes the state file or takes the lock, where the state
    file is behind a symlink into a missing directory (its lock's guard would be made there):
    exit 4, nothing changed. Where it takes the lock, a [lock] dir that is a file (or under
    one) is exit 2 first: a configuration error (lock.lock_dir_problem), before the journal."""
    if lock:
        from runbook.lock import lock_dir_refusal

        if (refused := lock_dir_refusal(env)) is not None:
            raise refused
    if (state or lock) and (behind := files.link_refusal(env.state_file, "the state file",
                                                         "[state] file")):
        raise PreconditionError(f"{behind[0]}; nothing was changed", behind[1])
    keywords = dict(caddyfile=caddyfile, records=records, state=state, lock=lock, log=log,
                    snapshot_dir=snapshot_dir, state_file=state_file)
    found = blocked_problems(env, **keywords) + access_problems(env, **keywords)
    if found:
        problem, fix = found[0]
        more = (f" (and {len(found) - 1} more: `runbook status {command_arg(env)}` lists them)"
                if len(found) > 1 else "")
        raise PreconditionError(f"{problem}{more}; nothing was changed", fix)
