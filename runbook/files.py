"""Atomic file replacement and the clean-up of what a killed writer leaves behind.

Every file the runbook rewrites on a host (state file, Caddyfile, intent record, lock
files, the journal's run record) goes through `atomic_write`: a hidden temp file beside the
target, fsync, rename, fsync of the directory (the journal's run record skips the fsyncs
until its last write). Readers see the old bytes or the new ones, never half; a kill at any
point leaves at most a temp file named `TEMP_PATTERN`, which `sweep_temps` removes on the
next run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import re
import secrets
import shlex
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path

from runbook.errors import ConfigError, PreconditionError, RunbookError

TEMP_TAG = "runbook-tmp"
# .<target name>.<tag>.<12 hex>.tmp ; also the older writers' names, so their leftovers go too
_TEMP_RE = re.compile(r"^\.(?P<target>.+?)\.(?:runbook-tmp\.[0-9a-f]{12}|[0-9a-f]{12}"
                      r"|runbook-(?:write|validate|adapt)-[A-Za-z0-9_]+)\.tmp$")


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
UNLOCKED_TEMP_AGE = 60.0  # a temp file a run without the lock may be using (a dry run's)


def write_fix(exc: OSError, directory: Path, otherwise: str, *,
              target: Path | None = None) -> str:
    """The fix for a write that failed in `directory` (of the file `target`, when known): a
    full disk (or quota), a read-only filesystem, and a file or folder that no one may write
    whatever its mode says (EPERM, EBUSY: the immutable attribute, a read-only bind mount of
    the file alone) are named as such, since "check the permissions" sends on-call the wrong
    way (found by review: root was told to check them, the file `chattr +i`); anything else
    gets the caller's hint."""
    if exc.errno in NO_SPACE:
        return no_space_fix(directory)
    if exc.errno == errno.EROFS:
        return (f"{directory} is on a read-only filesystem (`findmnt -T "
                f"{shlex.quote(str(directory))}` shows its mount): {read_only_fix()}")
    if exc.errno == errno.EACCES and (denied := _denied(directory, target)) is not None:
        return f"{denied}; {otherwise}"  # the caller's own hint (its setting) kept
    if exc.errno in (errno.EPERM, errno.EBUSY):
        for path in [*([target] if target is not None else []), directory]:
            if (found := unwritable(path)) is not None:
                return f"{path} {found[0]}: {found[1]}"
        where = shlex.quote(str(target if target is not None else directory))
        return (f"{target if target is not None else directory} cannot be written although "
                f"its mode allows it: it is immutable or on a read-only mount (`lsattr -d "
                f"{where}`, `chattr -i {where}`; `findmnt -T {where}`), or, not as root, in a "
                "sticky folder (`chmod +t`) another user owns; undo that, then run again")
    return otherwise


def _denied(directory: Path, target: Path | None) -> str | None:
    """The fix for a write this user may not make (EACCES): whose the folder (or the file)
    is and its mode, and the way out, instead of "check free disk space and permissions"
    (found by review: on-call, not root, was left to find out whose files these were)."""
    for path in [directory, *([target] if target is not None else [])]:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if os.access(path, os.W_OK | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)):
            continue
        try:
            import grp  # an interpreter built without it (one test's) names the gid

            group = grp.getgrgid(st.st_gid).gr_name
        except (ImportError, KeyError):
            group = f"gid {st.st_gid}"
        return (f"{path} belongs to {owner_name(st.st_uid)}, group {group}, mode "
                f"{stat.S_IMODE(st.st_mode):o}, and {owner_name(os.geteuid())} may not write "
                f"{'in it' if stat.S_ISDIR(st.st_mode) else 'it'}: run the same command as "
                "root (`sudo runbook ...`), or give this user's group write there "
                f"(`chgrp <its group> {shlex.quote(str(path))}` and `chmod g+w`), then run again")
    return None


# FS_IOC_GETFLAGS, _IOR('f', 1, long) (the kernel reads and writes an int); the attributes
_FS_IOC_GETFLAGS = (2 << 30) | (struct.calcsize("l") << 16) | (ord("f") << 8) | 1
_IMMUTABLE_FL, _APPEND_FL = 0x10, 0x20


def _attributes(path: Path) -> int:
    """The file's attributes as `lsattr` reads them; 0 where they cannot be read (another
    system, a filesystem without them, a file this user may not open)."""
    import fcntl

    try:
        if not stat.S_ISREG(mode := os.stat(path).st_mode) and not stat.S_ISDIR(mode):
            return 0  # a device is never opened to ask (a tape rewinds on open)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        flags: int = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8))[:4])[0]
        return flags
    except OSError:
        return 0
    finally:
        os.close(fd)


def _mount_point(path: Path) -> bool:
    """`path` is itself a mount point (a bind-mounted file): /proc/self/mountinfo's fifth
    field, its spaces and tabs written as octal escapes. False where there is no such file."""
    try:
        text = Path("/proc/self/mountinfo").read_text(errors="replace")
    except OSError:
        return False
    fields = (line.split(" ") for line in text.splitlines())
    mounted = {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), f[4])
               for f in fields if len(f) > 4}
    return str(path) in mounted


def unwritable(path: Path, *, appends_only: bool = False) -> tuple[str, str] | None:
    """(what `path` is, the fix) when no one may replace it, or create files in it (a folder),
    root included, whatever its mode says; None when none of these is found. Read-only, so a
    dry run and `status` may ask: the immutable and append-only attributes (FS_IOC_GETFLAGS,
    as `lsattr`; a rename over such a file or in such a folder is EPERM), a file that is a
    mount point of its own (/proc/self/mountinfo: a rename over it is EBUSY, read-only or
    not), and a read-only mount (statvfs's ST_RDONLY; os.access cannot tell any of these
    from a permission, and root was never asked). Not: SELinux or AppArmor, nor a full disk
    (disk.problems). `appends_only`: a folder the run only creates files in and appends to
    (the log folder: O_CREAT|O_EXCL|O_APPEND), which the append-only attribute allows (audit
    hardening sets it there; found by review: every run was refused)."""
    try:
        return _unwritable(Path(os.path.realpath(path)), appends_only)
    except (OSError, ValueError):
        # never raises: a folder this user may not search (Path.is_dir raised EACCES) made
        # `status` and every dry run "unexpected failure", and write_fix, which asks this on
        # a recorder's failed write after the commit, must say that failure, not its own
        return None


def _unwritable(path: Path, appends_only: bool) -> tuple[str, str] | None:
    quoted = shlex.quote(str(path))
    folder = "-d " if os.path.isdir(path) else ""
    flags = _attributes(path) & ~(_APPEND_FL if appends_only else 0)
    for flag, name, letter in ((_IMMUTABLE_FL, "immutable", "i"), (_APPEND_FL, "append-only",
                                                                   "a")):
        if flags & flag:
            return (f"has the {name} attribute (`lsattr {folder}{quoted}` shows `{letter}`)",
                    f"as root, `chattr -{letter} {quoted}` (and stop whatever set it, config "
                    "management or a hand, from setting it again), then run again")
    read_only = False
    with contextlib.suppress(OSError):
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    if not folder and _mount_point(path):  # remounted read-write, still EBUSY: said first
        return (f"is a mount point of its own{', read-only' if read_only else ''} (a "
                f"bind-mounted file: `findmnt -T {quoted}`), which a write by rename cannot "
                "replace",
                "mount the folder it is in instead of the file alone, or point the "
                "environment file at a file in a writable folder, then run again")
    if read_only:
        return (f"is on a read-only mount (`findmnt -T {quoted}` shows it)",
                "remount it read-write, or point the environment file at a writable place, "
                "then run again")
    return None


def write_error(message: str, exc: OSError, directory: Path, otherwise: str) -> RunbookError:
    """A setup write (lock, journal) that failed before any change: a full disk (or no inode
    left) is a precondition, exit 4, not a configuration error, exit 2; anything else points at
    the setting (`otherwise`), unless the filesystem is read-only."""
    if exc.errno in NO_SPACE:
        return PreconditionError(message, write_fix(exc, directory, ""))
    return ConfigError(message, write_fix(exc, directory, otherwise))


def no_space_fix(directory: Path) -> str:
    """"No space left on device" is also what a filesystem out of inodes says, while `df -h`
    shows room: name the one that is short."""
    with contextlib.suppress(OSError):
        vfs = os.statvfs(directory)
        if vfs.f_files and vfs.f_favail == 0 and vfs.f_bavail * vfs.f_frsize >= 1 << 20:
            return f"the filesystem where {directory} lives has no free inodes left: " \
                   + no_inodes_fix(directory)
    return (f"free disk space where {directory} lives (`df -h {shlex.quote(str(directory))}`), "
            "then run again")


def no_inodes_fix(directory: Path) -> str:
    return (f"remove files there (`df -i {shlex.quote(str(directory))}` shows the inodes; many "
            "small files, such as old logs, use them up), then run again")


def read_only_fix() -> str:
    return "remount it read-write, or point the environment file at a writable directory"


def flock_within(fd: int, timeout: float, poll: float) -> bool:
    """Take an exclusive flock on `fd`, waiting at most `timeout` seconds; False if not.

    Polled rather than blocking so that a signal (Ctrl-C) is handled while waiting; the
    kernel drops the lock with its holder, so a killed process never leaves it taken."""
    import fcntl

    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(poll)


GUARD_MODE = 0o644  # every user who runs the runbook flocks it (a read-only descriptor
# suffices for flock); it holds no data, so no other user needs to write it


def open_guard(guard: Path) -> int:
    """A descriptor of the flock guard file `guard`, created when missing. Its mode is set
    whatever the umask (best effort, by its owner): made under umask 077 (root's cron,
    Ansible) it was 0600, and every other operator was refused (found by review). A guard
    this user may not write is opened read-only: flock needs no more."""
    try:
        fd = os.open(guard, os.O_RDWR | os.O_CREAT, GUARD_MODE)
    except PermissionError:
        return os.open(guard, os.O_RDONLY)
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and st.st_mode & GUARD_MODE != GUARD_MODE:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | GUARD_MODE)
    return fd


def guard_error(message: str, exc: OSError, guard: Path, otherwise: str) -> RunbookError:
    """Why `guard` cannot be opened, and the way out. A guard that is there but that this
    user may not even read (another user's, made under a restrictive umask by an older run)
    is a precondition, exit 4, as a state file that cannot be read: only its owner or root
    can `chmod` it ("create it with touch" did not help, found by review). Anything else:
    write_error."""
    if isinstance(exc, PermissionError):
        try:
            st = os.stat(guard)
        except OSError:
            st = None
        if st is not None:
            who = owner_name(st.st_uid)
            by = "root" if st.st_uid == 0 else f"{who} or root"
            return PreconditionError(
                f"{message} (mode {stat.S_IMODE(st.st_mode):o}, owned by {who})",
                f"as {by}, run `chmod a+r {shlex.quote(str(guard))}` once (runs of this "
                "version keep it so), then run again")
    return write_error(message, exc, guard.parent, otherwise)


def owner_name(uid: int) -> str:
    """`name (uid N)` for a message that says whose a file is; `uid N` with no account."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def missing_link_target(path: Path) -> tuple[Path, Path] | None:
    """(the symlink, the directory that does not exist) when a symlink on `path` (the file
    itself, or a directory on the way) leads into a directory that is missing: an unmounted
    volume, most likely. A `mkdir -p` there would make an empty tree under the mount point,
    and a write into it a second copy of the file that the mounted volume hides again
    (split-brain, found by review). None when no symlink is involved, or its directory is
    there."""
    path = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    if real.parent.exists():
        return None
    link = next((p for p in [*reversed(path.parents), path] if p.is_symlink()), None)
    if link is None:
        return None  # a plain directory not made yet (a host's first deploy makes it)
    missing = real.parent
    while not missing.parent.exists() and missing.parent != missing:
        missing = missing.parent
    return link, missing


def link_refusal(path: Path, what: str, setting: str) -> tuple[str, str] | None:
    """(problem, fix) naming a symlink on `path` that leads into a missing directory
    (`missing_link_target`); None when there is none. Nothing is created there."""
    found = missing_link_target(path)
    if found is None:
        return None
    link, missing = found
    return (f"{what} {path} is not there: the symlink {link} points into {missing}, which "
            "does not exist (an unmounted volume?)",
            f"mount the volume {missing} is on, or point the symlink {link} or {setting} in "
            "the environment file where the file is, then run again")


def shortened(name: str, keep: int = 40) -> str:
    """`name` cut in the middle past `keep` characters, for a message that quotes it."""
    return name if len(name) <= keep else f"{name[:keep - 12]}...{name[-9:]}"


def _limit(path: Path, name: str, default: int) -> int:
    """pathconf's `name` (PC_NAME_MAX, PC_PATH_MAX) of the filesystem `path` is on, asked of
    its nearest existing folder; `default` (Linux's) when none can be asked."""
    for folder in (path, *path.parents):
        try:
            if os.path.isdir(folder):
                return os.pathconf(folder, name)
        except (OSError, ValueError):
            break
    return default


def name_too_long(value: str, *, whole: bool = True) -> str | None:
    """Why `value`, a path, cannot name a file here, or None: a component longer than the
    filesystem's NAME_MAX (or, `whole`, the path from the working directory past PATH_MAX).
    Every file call on it raised "File name too long", which reached the user as an
    unexpected failure (a bug, found by review) echoing the whole name; shortened here."""
    path = Path(os.path.abspath(value))
    name_max = _limit(path, "PC_NAME_MAX", 255)
    for part in path.parts:
        if (size := len(os.fsencode(part))) > name_max:
            return (f"{shortened(part)!r} ({size} bytes) is longer than a file or folder "
                    f"name may be here ({name_max} bytes): shorten it")
    path_max = _limit(path, "PC_PATH_MAX", 4096)
    if whole and (size := len(os.fsencode(str(path)))) >= path_max:  # PATH_MAX counts the final NUL
        return (f"{shortened(str(path))!r} ({size} bytes) is longer than a path may be here "
                f"({path_max} bytes): shorten it")
    return None


def not_a_folder(directory: Path) -> Path | None:
    """What stands where `directory` (a setting's folder, to be made by `mkdir -p`) or a
    folder on its way should be, when that is not a folder: a file (or a link to nothing).
    None when every existing part is a folder, or it cannot be told (then the act says)."""
    probe = Path(os.path.abspath(directory))
    while True:
        try:
            if stat.S_ISDIR(os.stat(probe).st_mode):
                return None
            return probe
        except FileNotFoundError:
            if os.path.islink(probe):
                return probe  # a link to nothing: mkdir says "File exists"
        except NotADirectoryError:
            pass  # a file further up: found there
        except OSError:
            return None
        if probe.parent == probe:
            return None
        probe = probe.parent


def set_dir_mode(path: Path, mode: int) -> os.stat_result:
    """Give the directory just made at `path` its `mode` whatever the umask, and return what
    it is (for its identity). Through a descriptor opened without following a symlink: in a
    shared folder, `chmod` by name could change whatever was swapped in under that name."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)
        return os.fstat(fd)
    finally:
        os.close(fd)


class NotAFile(OSError):
    """What sits where a small file is read is not one: a FIFO, a device, a symlink, or a
    file too large to be what is expected."""


READ_CHUNK = 1 << 16  # os.read allocates what it is asked for: never the whole limit at once


def _kind(mode: int) -> str:
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device")


def read_regular(path: Path, limit: int, *, follow: bool = False) -> bytes:
    """The bytes of the regular file at `path`, at most `limit` of them, or NotAFile. In a
    world-writable directory (the lock's, /tmp) anyone may plant a FIFO or a symlink to
    /dev/zero where a file is read: a plain read hung every command, the deploy lock's guard
    held (found by review). Opened without following a symlink and without blocking, then
    checked by fstat: no swap between a check and the open. Other OSErrors as open(2).
    `follow`: a symlink that leads to a regular file is read too (a snapshot and its sidecar
    may be links); one that leads elsewhere is NotAFile, a device never opened."""
    if follow and not stat.S_ISREG(mode := os.stat(path).st_mode):
        raise NotAFile(errno.EINVAL, f"{_kind(mode)}, not a regular file", str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
                     | (0 if follow else os.O_NOFOLLOW))
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise NotAFile(errno.ELOOP, "a symbolic link, not a regular file",
                           str(path)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotAFile(errno.EINVAL, f"{_kind(mode)}, not a regular file", str(path))
        chunks: list[bytes] = []
        size = 0
        while size <= limit and (chunk := os.read(fd, min(limit + 1 - size, READ_CHUNK))):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise NotAFile(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return b"".join(chunks)


def temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{TEMP_TAG}.{secrets.token_hex(6)}.tmp")


def temp_target(name: str) -> str | None:
    """The target's name when `name` is a temp file of one of our writers, else None."""
    match = _TEMP_RE.match(name)
    return match["target"] if match else None


def atomic_write(target: Path, data: bytes, *, default_mode: int = 0o644,
                 before_rename: Callable[[], None] | None = None,
                 durable: bool = True, like: Path | None = None,
                 new_only: bool = False, mode: int | None = None) -> str | None:
    """Replace `target` with `data` atomically, keeping the existing file's mode, owner, group.

    A new file gets `default_mode`, or `like`'s mode (read and write bits), owner and group
    when that file exists: a record beside the state file must be readable by whoever may
    read the state file (a shared deploy group). A symlinked target stays a symlink (its
    destination is replaced). `before_rename` runs between the fsynced temp file and the
    rename (the drill's fault point). Raises OSError; the target is then unchanged and no
    temp file is left.
    `durable=False` skips both fsyncs: readers still see the old bytes or the new ones, but a
    power loss may lose the write (for a record rewritten many times a run and made durable
    by its last write; two fsyncs each were most of a fast rollback's journaling time).
    Returns None, or one line saying which of the owner and group could not be kept (only
    root may give a file away): the write itself succeeded, the caller decides who is told.
    `new_only=True` creates `target` and replaces nothing: a file there, even one another
    process created the instant before the move into place, raises FileExistsError with
    nothing written and no temp file left (`place_new`). For a writer that read "no file":
    its rename replaced, without a trace, the file another tool created since.
    `mode`: the file's mode whatever an old file's, set before its first byte is written: a
    copy of another file (the Caddyfile's backup) takes its source's, never the more open
    mode of an earlier copy or of `default_mode` (a 0600 Caddyfile's secrets were readable
    by anyone in a 0644 backup until a chmod after the write, for ever when killed between).
    """
    target = Path(os.path.realpath(target))
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    if new_only and (st is not None or os.path.lexists(target)):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    model: os.stat_result | None = None  # a new file's model
    if st is None and like is not None:
        with contextlib.suppress(OSError):
            model = os.stat(like)
    tmp = temp_path(target)
    kept: tuple[int, int] | None = None  # the (uid, gid) the new file got, when it had an old
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            # mode and owner first: the one fsync below makes them durable with the bytes
            os.fchmod(fd, mode if mode is not None else (st.st_mode & 0o7777) if st
                      else (model.st_mode & 0o666) if model else default_mode)
            if st is not None and hasattr(os, "fchown"):
                kept = _keep_owner(fd, st)
            elif model is not None and hasattr(os, "fchown"):
                _keep_owner(fd, model)  # best effort: not root, it keeps the group if it may
            if st is not None:
                _keep_xattrs(fd, target)
            if mode is not None and st is not None:  # an old file's ACL, just copied, sets
                os.fchmod(fd, mode)  # the mode's bits too: chmod narrows it to `mode`
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if before_rename is not None:
            before_rename()
        if new_only:
            place_new(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(target.parent)
    return None if st is None or kept is None else _ownership_lost(target, st, kept)


# link(2)'s answers where the filesystem has no hard links (vfat: EPERM; some FUSE: ENOSYS)
_NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS)


def place_new(source: Path, target: Path) -> None:
    """Move `source` (a file in `target`'s directory) to `target`, which must not exist:
    FileExistsError when it does, however late it was created (a check then a rename would
    replace a file made in between). A hard link, then `source` removed; where the
    filesystem refuses hard links, renameat2(RENAME_NOREPLACE); where the kernel lacks that
    too, a check then a rename: the microseconds' window a rewrite's own last check has."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise  # EEXIST: FileExistsError
    else:
        with contextlib.suppress(OSError):  # (left, it is a temp file: sweep_temps takes it)
            source.unlink()
        return
    if rename_noreplace(source, target):
        return
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.replace(source, target)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_noreplace(source: Path, target: Path) -> bool:
    """rename(2) that raises FileExistsError when `target` exists; False when this kernel,
    libc or filesystem cannot rename so (nothing was renamed)."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                 _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def _keep_xattrs(fd: int, target: Path) -> None:
    """Give the temp file the old file's extended attributes, best effort: its POSIX ACL
    (`system.posix_acl_access`) and SELinux label are xattrs, and a file renamed into place
    has only what its directory gives a new one. Found by review: a Caddyfile that Caddy's
    own user reads through an ACL (mode 0640 root:root) lost it with the switch's write, so
    the next `systemctl reload` or Caddy's restart could not read its config."""
    if not hasattr(os, "listxattr"):
        return
    try:
        names = os.listxattr(target)
    except OSError:
        return
    for name in names:
        with contextlib.suppress(OSError):  # e.g. a label or capability only root may set
            os.setxattr(fd, name, os.getxattr(target, name))


def _keep_owner(fd: int, st: os.stat_result) -> tuple[int, int]:
    """Give the temp file `st`'s owner and group; returns the (uid, gid) it ended up with.

    Only root may give a file away, but a member of the file's group may still keep the group:
    a deploy user rewriting a 1001:deploy 0660 file must not lock the deploy group out of it."""
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
    except PermissionError:
        with contextlib.suppress(PermissionError):
            os.fchown(fd, -1, st.st_gid)
    now = os.fstat(fd)
    return now.st_uid, now.st_gid


def _ownership_lost(target: Path, st: os.stat_result, kept: tuple[int, int]) -> str | None:
    """One line for on-call when the rewrite changed who owns `target`; None when it did not."""
    uid, gid = kept
    lost = [f"owner (uid {st.st_uid})"] if uid != st.st_uid else []
    lost += [f"group (gid {st.st_gid})"] if gid != st.st_gid else []
    if not lost:
        return None
    spec = (f"{st.st_uid}" if uid != st.st_uid else "") + (f":{st.st_gid}" if gid != st.st_gid
                                                            else "")
    return (f"{target} lost its {' and '.join(lost)} when rewritten and is now {uid}:{gid} "
            "(only root may give a file to another user, or to a group its writer is not in): "
            f"run `chown {spec} {shlex.quote(str(target))}` "
            "as root, or run the runbook as the file's owner")


def fsync_dir(directory: Path) -> None:
    """Make a rename durable; best effort where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def sweep_temps(target: Path, *, older_than: float = 0.0) -> list[Path]:
    """Remove the temp files a killed writer of `target` left beside it; returns them.

    Only our own naming patterns are touched, and only while the caller holds the deploy lock
    (no other runbook writer can be mid-write then), except a Caddyfile validation's copy: a
    dry run (no lock) makes one while planning, and sweeping it made that dry run report
    "Caddy rejected the new Caddyfile"; those are removed once a minute old.
    """
    target = Path(os.path.realpath(target))
    removed: list[Path] = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if match is None or match["target"] != target.name:
            continue
        wait = max(older_than, UNLOCKED_TEMP_AGE if ".runbook-validate-" in entry.name
                                       or ".runbook-adapt-" in entry.name else 0.0)
        try:
            if now - entry.lstat().st_mtime < wait or not entry.is_file():
                continue
            entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed
