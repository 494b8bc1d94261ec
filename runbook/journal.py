"""What a run did, for the operator now and for the post-mortem later.

Two outputs: the contract's log file (`<log_dir>/<env>_<YYYYMMDD_HHMMSS>.log`, one JSON object
a line, which the existing tooling and `jq` read; one file per run, `..._2.log` for the second
run started in that second) and a run record (`<runs_dir>/<run_id>.json`)
that reports are built from. Every line goes through json.dumps (the old tooling printed
unescaped strings into JSON) and through redact(), because logs get pasted into tickets.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

from runbook import files, times
from runbook import state as statemod
from runbook.environment import Environment
from runbook.errors import ConfigError, ExitCode, RunbookError

# Secret masking lives in runbook/redact.py; its names stay importable from here.
from runbook.redact import MASK as MASK
from runbook.redact import MIN_SECRET_LENGTH as MIN_SECRET_LENGTH
from runbook.redact import _clean
from runbook.redact import redact as redact
from runbook.redact import register_secrets as register_secrets
from runbook.redact import scrub as scrub

RESERVED = ("timestamp", "level", "deployment_id", "message", "run_id")
RUN_ID_PREFIX = {"rollback": "rbk", "deploy": "dep"}
LOG_NAMES = 100  # runs started in one second, each with its log: <env>_<second>[_<n>].log
MAX_RECORD = 16 * 1024 * 1024  # a run record is a few KiB; a larger file is not one


class Level(StrEnum):
    INFO = "INFO"
    WARN = "WARN"
    ERROR = "ERROR"
    SUCCESS = "SUCCESS"

    @classmethod
    def of(cls, value: str | Level) -> Level:
        text = str(value).upper()
        return cls("WARN" if text == "WARNING" else text)


class StepStatus(StrEnum):
    RUNNING = "running"  # only seen in the record of a run that died mid-step
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"
    PLANNED = "planned"


def new_run_id(action: str) -> str:
    """A run id shaped like the deploy script's ids, prefixed by what the run does."""
    return statemod.new_id(RUN_ID_PREFIX.get(action, "run"))


def _timestamp(when: datetime | None = None) -> str:
    return times.format_ms_utc(when)


# --- steps -----------------------------------------------------------------------------------


@dataclass
class Step:
    """One step of a run, as it appears in the run record."""

    name: str
    title: str
    status: StepStatus = StepStatus.PLANNED
    started_at: datetime | None = None
    duration_ms: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    _skip_reason: str | None = field(default=None, repr=False)

    def detail(self, **values: Any) -> None:
        """Attach resolved values (target image, ports, versions) for the record."""
        self.details.update(values)

    def skip(self, reason: str) -> None:
        """Mark the step skipped; leave the `with` block normally afterwards."""
        self._skip_reason = reason
        self.details.setdefault("skipped_because", reason)

    def to_json(self, known: Iterable[str] = ()) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "title": self.title,
            "status": self.status.value,
            "started_at": _timestamp(self.started_at) if self.started_at else None,
            "duration_ms": self.duration_ms,
            "detail": _clean(self.details, known),
        }
        if self.error is not None:
            data["error"] = redact(self.error, known)
        return data


# --- the journal -----------------------------------------------------------------------------

Echo = Callable[[Level, str, Mapping[str, Any]], None]


class Journal:
    """The log and the run record of one run. Open with Journal.open()."""

    def __init__(self, env: Environment, action: str, run_id: str, who: str, why: str,
                 log_path: Path, record_path: Path, started_at: datetime,
                 echo: Echo | None = None) -> None:
        self.env = env
        self.action = action
        self.run_id = run_id
        self.deployment_id = run_id  # until the plan names the deployment (for_deployment)
        self.who = who
        self.why = why
        self.log_path = log_path
        self.record_path = record_path
        self.started_at = started_at  # timestamps (when), never subtracted for a duration
        self.finished_at: datetime | None = None
        self.began = time.monotonic()  # the run's duration is measured from here
        self.outcome = "running"
        self.exit_code: int | None = None
        self.steps: list[Step] = []
        self.context: dict[str, Any] = {}
        self.failure: dict[str, Any] | None = None  # the exception that ended the run
        self.write_errors: list[str] = []
        self.warnings: list[str] = []  # said in the log and, by run.perform, on the terminal
        # the log file it created: held open read-only while the journal lives, so its inode
        # is never reused (no other file passes for it); written through a descriptor opened
        # for each line (one held for writing would block a remount read-only)
        self._pin: int | None = None
        self._file: tuple[int, int] | None = None  # its (st_dev, st_ino)
        self._recorded = True  # False: no run record (Journal.open's record=False)
        self._secrets: set[str] = set()
        self._echo = echo
        self._mutex = threading.RLock()

    @classmethod
    def open(cls, env: Environment, action: str, run_id: str | None = None,
             who: str | None = None, why: str | None = None, *,
             echo: Echo | None = None, record: bool = True) -> Journal:
        """Create the log file and a first run record ("running"), so even a killed run
        leaves a trace. `record=False`: the log alone (run.journaled says why)."""
        started, began = datetime.now(UTC), time.monotonic()
        run_id = run_id or new_run_id(action)
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", run_id):
            raise ConfigError(f"run id {run_id!r} cannot name a file",
                              "use letters, digits, '.', '_' and '-' only")
        warnings: list[str] = []
        folders = [(env.log_dir, "[logs] dir")] + ([(env.runs_dir, "[logs] runs_dir")]
                                                   if record else [])
        for directory, what in folders:
            if (refused := folder_refusal(env, directory, what)) is not None:
                raise ConfigError(f"{refused[0]}; nothing was changed", refused[1])
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise files.write_error(
                    f"cannot create {directory}: {exc.strerror or exc}; nothing was changed",
                    exc, directory.parent,
                    f"fix {what} in the environment file or its permissions") from None
            if (warning := _open_to_all(directory, what)) is not None:
                warnings.append(warning)
        log_path = env.log_dir / f"{env.name}_{started:%Y%m%d_%H%M%S}.log"
        try:
            log_path, pin, identity = _new_log(log_path)
        except OSError as exc:
            raise files.write_error(
                f"cannot write the log file {log_path}: {exc.strerror or exc}; nothing was "
                "changed", exc, env.log_dir,
                "fix [logs] dir in the environment file or its permissions") from None
        journal = cls(env, action, run_id, who or statemod.current_operator(), why or "",
                      log_path, env.runs_dir / f"{run_id}.json", started, echo)
        journal._pin, journal._file = pin, identity
        journal.began = began  # with `started`, before the folders and the log were made
        journal.warnings = warnings
        journal._recorded = record
        from runbook import database

        journal.add_secret(*database.known_secrets(env))  # before the first line is written
        try:
            journal._write_record(strict=True)
        except OSError as exc:
            # as a log file that cannot be written: a run that went on without its record
            # (a runs folder left root's by `sudo -E`) left nothing `status`, a rerun or
            # `snapshot cleanup` could read once killed (found by review)
            journal._discard()
            raise files.write_error(
                f"cannot write the run record in {env.runs_dir}: {exc.strerror or exc}; "
                "nothing was changed", exc, env.runs_dir,
                "fix [logs] runs_dir in the environment file or its permissions (one left "
                f"root's by `sudo -E`: `sudo chown -R \"$USER\" {env.runs_dir}`)") from None
        journal.log(Level.INFO, f"{action} started on {env.display} by {journal.who}"
                    + (f": {journal.why}" if journal.why else ""), action=action,
                    environment=env.name)
        for warning in warnings:
            journal.log(Level.WARN, warning)
        return journal

    # -- logging --

    def add_secret(self, *values: str) -> None:
        """Values masked wherever they appear, e.g. the database password read from .env;
        also registered for the whole process, so errors printed outside the journal mask them."""
        self._secrets.update(v for v in values if v)
        register_secrets(*values)

    def set(self, **context: Any) -> None:
        """Facts about the run for the record (target version, slots, snapshot path)."""
        self.context.update(context)

    def for_deployment(self, deployment_id: str | None) -> None:
        """Name the deployment the run makes current, once its plan knows it (a deploy's,
        the interrupted one's for a rerun that finishes it; a rollback's target, whose record
        it reactivates): the contract's deployment_id of every line from here on, as the state
        file's current_deployment.id and the pre-deploy snapshot's sidecar name it. A run
        that names none (a switch, a restore, one refused before its plan) keeps its own id
        there; every line carries the run's id in run_id."""
        if deployment_id:
            self.deployment_id = deployment_id

    def log(self, level: Level | str, message: str, /, **fields: Any) -> None:
        lvl = Level.of(level)
        known = self._secrets
        entry: dict[str, Any] = {
            "timestamp": _timestamp(),
            "level": lvl.value,
            "deployment_id": self.deployment_id,
            "message": redact(str(message), known),
            "run_id": self.run_id,
        }
        extra = _clean(fields, known)
        for key, value in extra.items():
            entry[f"{key}_" if key in RESERVED else key] = value
        line = json.dumps(entry, ensure_ascii=True, allow_nan=False) + "\n"
        with self._mutex:
            try:
                fd = self._own_log()
                try:
                    data = line.encode()
                    written = os.write(fd, data)
                    if written < len(data):  # a nearly full disk: the rest would fail, and
                        # a half line glued to the next one breaks every reader after it
                        # (the file is this run's alone: O_EXCL)
                        os.ftruncate(fd, os.fstat(fd).st_size - written)
                        raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} "
                                                    "bytes, taken back)")
                finally:
                    os.close(fd)
            except OSError as exc:
                # Losing a log line must not abort a rollback half-way; the record says so.
                self.write_errors.append(f"{self.log_path}: {exc.strerror or exc}")
        if self._echo is not None:
            self._echo(lvl, entry["message"], extra)

    def _own_log(self) -> int:
        """The log file this run created, opened for appending, or OSError: in a log folder
        others can write, its name may be a symlink or another file by now, and every line
        was appended through it (to someone else's file)."""
        if self._pin is None or self._file is None:
            raise OSError(errno.EBADF, "the log file is closed")
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        found = os.fstat(fd)
        if (found.st_dev, found.st_ino) != self._file:
            os.close(fd)
            raise OSError(errno.ESTALE, "no longer the log file this run created (replaced "
                                        "since): nothing written to it")
        return fd

    def close(self) -> None:
        """Let go of the log file (a line logged after it is a write error)."""
        pin, self._pin = self._pin, None
        if pin is not None:
            os.close(pin)

    def _discard(self) -> None:
        """Close, and remove the log file this run created (still empty): a run stopped
        before it began leaves no log for `ls -t` to take for the newest run's."""
        identity = self._file
        self.close()
        with contextlib.suppress(OSError):
            found = os.lstat(self.log_path)
            if (found.st_dev, found.st_ino) == identity and found.st_size == 0:
                os.unlink(self.log_path)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def info(self, message: str, /, **fields: Any) -> None:
        self.log(Level.INFO, message, **fields)

    def warn(self, message: str, /, **fields: Any) -> None:
        self.log(Level.WARN, message, **fields)

    def error(self, message: str, /, **fields: Any) -> None:
        self.log(Level.ERROR, message, **fields)

    def success(self, message: str, /, **fields: Any) -> None:
        self.log(Level.SUCCESS, message, **fields)

    # -- steps --

    @contextlib.contextmanager
    def step(self, name: str, title: str) -> Iterator[Step]:
        """Time a step, log its start and end, and record it; a failure is recorded and
        re-raised, so the caller decides what happens next."""
        step = Step(name=name, title=title, status=StepStatus.RUNNING,
                    started_at=datetime.now(UTC))
        self.steps.append(step)
        self._write_record()
        self.log(Level.INFO, f"{title} ...", step=name, event="start")
        began = time.monotonic()
        try:
            yield step
        except BaseException as exc:
            step.duration_ms = round((time.monotonic() - began) * 1000)
            step.status = StepStatus.FAILED
            step.error = _describe(exc)
            self.log(Level.ERROR, f"{title}: failed: {step.error}", step=name, event="end",
                     status=step.status.value, duration_ms=step.duration_ms)
            self._write_record()
            raise
        step.duration_ms = round((time.monotonic() - began) * 1000)
        if step._skip_reason is not None:
            step.status = StepStatus.SKIPPED
            self.log(Level.INFO, f"{title}: skipped ({step._skip_reason})", step=name,
                     event="end", status=step.status.value, duration_ms=step.duration_ms)
        else:
            step.status = StepStatus.OK
            self.log(Level.SUCCESS, f"{title}: ok", step=name, event="end",
                     status=step.status.value, duration_ms=step.duration_ms,
                     **({"detail": step.details} if step.details else {}))
        self._write_record()

    def plan(self, name: str, title: str, **detail: Any) -> Step:
        """A step a dry run would take, recorded as planned."""
        step = Step(name=name, title=title, status=StepStatus.PLANNED, details=dict(detail))
        self.steps.append(step)
        self.log(Level.INFO, f"would: {title}", step=name, event="plan",
                 **({"detail": step.details} if detail else {}))
        self._write_record()
        return step

    def save(self) -> None:
        """Write the record now, durably: what a step noted that a kill must not lose."""
        self._write_record(durable=True)

    # -- the end --

    def finish(self, outcome: str, exit_code: int | ExitCode) -> Path:
        """Close the run: final log line and record. Only the first call counts."""
        with self._mutex:
            if self.finished_at is not None:
                return self.record_path
            self.finished_at = datetime.now(UTC)
            self.outcome = outcome
            self.exit_code = int(exit_code)
        level = Level.SUCCESS if self.exit_code == 0 else Level.ERROR
        self.log(level, f"{self.action} {outcome} (exit code {self.exit_code})",
                 outcome=outcome, exit_code=self.exit_code,
                 # the monotonic clock: finished_at - started_at, two wall-clock readings, was
                 # minus an hour after NTP stepped the clock back during the run
                 duration_ms=round((time.monotonic() - self.began) * 1000))
        self._write_record(durable=True)
        return self.record_path

    def fail(self, exc: BaseException) -> Path:
        """Finish after an exception, with the exit code its error carries."""
        if isinstance(exc, RunbookError):
            self.failure = {"type": type(exc).__name__, "message": exc.message, "fix": exc.fix}
            return self.finish("failed", exc.exit_code)
        self.failure = {"type": type(exc).__name__, "message": _describe(exc)}
        if isinstance(exc, KeyboardInterrupt):
            return self.finish("interrupted", 130)
        return self.finish("failed", ExitCode.ATTENTION)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self.fail(exc)
        elif self.finished_at is None:
            self.finish("succeeded", ExitCode.OK)

    def to_json(self) -> dict[str, Any]:
        known = self._secrets
        data: dict[str, Any] = {
            "run_id": self.run_id,
            "deployment_id": self.deployment_id,
            "action": self.action,
            "environment": self.env.name,
            "label": self.env.display,
            "who": self.who,
            "why": self.why,
            "started_at": _timestamp(self.started_at),
            "finished_at": _timestamp(self.finished_at) if self.finished_at else None,
            "outcome": self.outcome,
            "exit_code": self.exit_code,
            "log_file": str(self.log_path),
            "steps": [s.to_json(known) for s in self.steps],
            "context": self.context,
        }
        if self.failure is not None:
            data["error"] = self.failure
        if self.write_errors:
            data["log_write_errors"] = self.write_errors[:10]
        return _clean(data, known)  # type: ignore[no-any-return]

    def _write_record(self, *, durable: bool = False, strict: bool = False) -> None:
        """Atomic, so a report never reads half a record. Only the final record is fsynced:
        the record is rewritten at every step's start and end, and those fsyncs sat between
        the operator and the traffic switch; a killed process still leaves the last one (the
        kernel has it), and what survives a power loss mid-run is the intent record's job
        (runbook/intent.py), as for the log lines, which are never fsynced either.
        `strict`: a failed write raises OSError (Journal.open's first record)."""
        if not self._recorded:
            return
        with self._mutex:
            payload = json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n"
            try:
                files.atomic_write(self.record_path, payload.encode("utf-8", "replace"),
                                   default_mode=0o600, durable=durable)
            except OSError as exc:
                if strict:
                    raise
                self.write_errors.append(f"{self.record_path}: {exc.strerror or exc}")


def folder_refusal(env: Environment, directory: Path, key: str) -> tuple[str, str] | None:
    """(problem, fix) when the journal's folder `directory` (the setting `key`), or a folder
    on its way, is a file: mkdir said "File exists" and named the key only in its fix, and
    `status` said nothing of it (found by review). A run refuses with it, `status` lists it."""
    found = files.not_a_folder(directory)
    if found is None:
        return None
    where = "" if found == Path(os.path.abspath(directory)) else f" ({found} on its way is a file)"
    return (f"{key} {directory} is not a folder{where}",
            f"point {key} in {env.source or 'the environment file'} at a folder, or move "
            f"{found} aside")


def folder_problems(env: Environment) -> list[tuple[str, str]]:
    """`folder_refusal` of [logs] dir and [logs] runs_dir, for `status`."""
    found = (folder_refusal(env, env.log_dir, "[logs] dir"),
             folder_refusal(env, env.runs_dir, "[logs] runs_dir"))
    return [refused for refused in found if refused is not None]


def _open_to_all(directory: Path, what: str) -> str | None:
    """What to warn of when every user may write `directory` and it has no sticky bit: any
    of them can delete or replace a run's log or record there. Warned, never refused: the
    run's own writes stay safe (its log is created O_EXCL and written only while its name
    still names the file it created), and the journal never stops a rollback."""
    try:
        mode = directory.stat().st_mode
    except OSError:
        return None
    if not mode & stat.S_IWOTH or mode & stat.S_ISVTX:
        return None
    return (f"{directory} ({what}) can be written by every user and has no sticky bit (mode "
            f"{stat.S_IMODE(mode):o}): another user can delete or replace this run's journal; "
            f"`chmod o-w {directory}` (or `chmod +t` to keep it shared)")


def _new_log(first: Path) -> tuple[Path, int, tuple[int, int]]:
    """A log file of this run's own: its path, a read-only descriptor that holds it (its
    inode is never reused while the journal lives) and its (st_dev, st_ino). Created O_EXCL
    (never through a symlink): `first`, or when a run started in the same second has it,
    `<env>_<second>_2.log` and so on, which sort after it (by name up to _9, by time always:
    the documented `ls -t <env>_*.log`). Appending to a file of that second put a run's lines
    (a lock refusal's "failed (exit code 3)") into another run's log, both records named it,
    another user's file failed the run with exit 2, and a short write's undo could cut the
    other run's line; a symlink planted under the name had the run append to, and chmod,
    the file it pointed at."""
    for number in range(1, LOG_NAMES + 1):
        path = first if number == 1 else first.with_name(f"{first.stem}_{number}.log")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, 0o600)
            created = os.fstat(fd)
            pin = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        finally:
            os.close(fd)
        held = os.fstat(pin)
        if (held.st_dev, held.st_ino) != (created.st_dev, created.st_ino):
            os.close(pin)
            raise OSError(errno.ESTALE, "replaced as soon as it was created")
        return path, pin, (created.st_dev, created.st_ino)
    raise OSError(errno.EEXIST, f"{first.name} and its {LOG_NAMES - 1} numbered variants "
                  "all exist")


def past_records(env: Environment, *, but: str | None = None,
                 strict: bool = False) -> Iterator[dict[str, Any]]:
    """The environment's run records, newest first (`but` that run id's left out), each
    read only when the caller asks for it: the callers stop at the first record that decides.
    Every one, never the newest N: each run refused at the lock, the plan or the prompt
    writes a record, and the runs folder may be shared by environments (the packaged files
    share one), so 50 refused retries or 50 staging runs lifted the guard on production's
    restore that did not match its snapshot (found by review). Passed over: another
    environment's record, another tool's file, a symlink (a `latest.json`, dangling or
    not), an entry removed since the listing; a FIFO or a device is never waited on.
    `strict` (for a reader that fails closed): an entry named like a record that cannot be
    read (another user's, mode 0600; a directory; a FIFO) raises OSError instead, and so
    does a folder that cannot be listed."""
    for path in _newest_first(env.runs_dir, but, strict=strict):
        try:
            data = json.loads(files.read_regular(path, MAX_RECORD))
        except FileNotFoundError:
            continue  # removed since the listing
        except OSError as exc:
            if strict and exc.errno != errno.ELOOP:  # a symlink swapped in: not ours
                raise
            continue
        except (ValueError, RecursionError):
            continue
        if is_record(data, env):
            yield data


def record_of(env: Environment, run_id: str) -> dict[str, Any] | None:
    """The run record of `run_id` (`<runs_dir>/<run_id>.json`, the one place the journal
    writes it), or None when it is not there, cannot be read (another operator's, a FIFO, a
    symlink) or is not that run's record of `env`."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", run_id) or run_id.strip(".") == "":
        return None  # a name, never a path out of runs_dir
    try:
        data = json.loads(files.read_regular(env.runs_dir / f"{run_id}.json", MAX_RECORD))
    except (OSError, ValueError, RecursionError):
        return None
    return data if is_record(data, env) and data.get("run_id") == run_id else None


def _newest_first(folder: Path, but: str | None, *, strict: bool) -> list[Path]:
    """The `*.json` entries of `folder` but symlinks, newest first: by mtime, then by name
    (run ids sort by their start, and a coarse file clock gives quick runs the same mtime).
    Stat'ed one by one: one that vanished while listed is left out, never the whole list."""
    found: list[tuple[int, str]] = []
    left_out = None if but is None else f"{but}.json"
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.endswith(".json") or entry.name == left_out:
                    continue
                try:
                    if not entry.is_symlink():
                        found.append((entry.stat(follow_symlinks=False).st_mtime_ns,
                                      entry.name))
                except OSError:
                    continue  # removed while listed
    except FileNotFoundError:
        return []
    except OSError:
        if strict:
            raise
        return []
    found.sort(reverse=True)
    return [folder / name for _, name in found]


def is_record(data: object, env: Environment) -> bool:
    """A run record of `env` as this tool writes them. Another environment's, or another
    tool's file with wrongly typed fields, is passed over: a step `name` that was a list
    crashed the readers (unhashable) while a restore planned, and `snapshot cleanup`."""
    if not isinstance(data, dict) or data.get("environment") not in (None, env.name):
        return False
    steps = data.get("steps", [])
    return isinstance(steps, list) and all(
        isinstance(s, dict) and isinstance(s.get("name", ""), str) for s in steps)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RunbookError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
