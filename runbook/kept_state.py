"""The runbook's own copy of the last state file it wrote.

Another tool that rewrites the file in place, or a full disk under one, leaves it empty or cut
short; another deletes it, moves it away or writes a record the reader refuses; every command
then refused (or planned a first deploy) until on-call edited it by hand. The copy lets the refusal
name a way back (`runbook state restore-kept ENV`) that is checked against what runs. Only the
runbook's own writes keep it: a dry run or a read-only command writes nothing, not even this.
Outside the state package, so that registering it (every CLI command) imports nothing more.

It lives with the runbook's own files (`[logs] runs_dir`, a dot file no run-record reader
lists), is written atomically, holds no secret (masked as the journal masks them) and is
only rewritten when it changes. Keeping it never fails a command: a copy that cannot be
written is one warning, and the command goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runbook import files

COMMAND = "runbook state restore-kept"
# runbook.state.schema.MAX_STATE_BYTES: importing it here would import the state package,
# whose reader imports this module (tests/test_state_kept.py checks they agree)
MAX_BYTES = 8 * 1024 * 1024
_PLACES: dict[str, tuple[Path, str, Callable[[str], None]]] = {}  # state file -> copy, env, warn
_WARNED: set[str] = set()
_WRITING = threading.Lock()  # the lock heartbeat's thread writes the state file too


def copy_path(runs_dir: Path, state_file: Path, env_name: str) -> Path:
    return runs_dir / f".{state_file.name}.{env_name}.kept"


def register(state_file: Path, runs_dir: Path, env_name: str,
             warn: Callable[[str], None], shown: str | None = None) -> Path:
    """Keep a copy of `state_file` from now on in this process (the CLI's environment);
    `shown`: how the refusal's command names the environment (environment.command_arg)."""
    copy = copy_path(runs_dir, state_file, env_name)
    _PLACES[os.path.realpath(state_file)] = (copy, shown or env_name, warn)
    return copy


def keep(state_file: Path | str, raw: bytes) -> None:
    """Store `raw` (a state file the runbook just wrote) as the copy; never raises."""
    place = _PLACES.get(os.path.realpath(state_file))
    if place is None:
        return
    copy, _, warn = place
    try:
        payload = _masked(raw)
        with _WRITING:
            try:
                if files.read_regular(copy, MAX_BYTES) == payload:
                    return
            except OSError:
                pass  # none yet, or unreadable: written anew
            copy.parent.mkdir(parents=True, exist_ok=True)
            files.atomic_write(copy, payload, default_mode=0o600)
    except (OSError, ValueError) as exc:
        problem = f"cannot keep a copy of the state file in {copy} ({_why(exc)}); the command " \
                  "goes on without it"
        if problem not in _WARNED:
            _WARNED.add(problem)
            with contextlib.suppress(OSError, ValueError):
                warn(f"warning: {problem}")


def _why(exc: BaseException) -> str:
    return (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)


def _masked(raw: bytes) -> bytes:
    """The bytes as read, or with any secret in them masked (the journal's rules): a state
    file holds none, but another tool's extra key might."""
    from runbook.redact import redact

    text = raw.decode("utf-8-sig")
    shown = redact(text)
    if shown == text:
        return raw
    json.loads(shown)  # still a state file, or no copy (ValueError: warned)
    return shown.encode()


@dataclass(frozen=True)
class Kept:
    path: Path
    raw: bytes
    mtime: float

    @property
    def age(self) -> str:
        from runbook.times import rough_duration

        return rough_duration(time.time() - self.mtime)


def found(copy: Path) -> Kept | None:
    """The copy, or None when there is none (or it cannot be read)."""
    try:
        raw = files.read_regular(copy, MAX_BYTES)
        return Kept(copy, raw, copy.stat().st_mtime)
    except OSError:
        return None


def kept_for(state_file: Path | str) -> tuple[Kept, str] | None:
    """(the copy kept for `state_file`, how the command names its environment), or None
    when this process keeps none for it or none is there."""
    place = _PLACES.get(os.path.realpath(state_file))
    kept = found(place[0]) if place is not None else None
    return None if place is None or kept is None else (kept, place[1])


def refusal_fix(state_file: Path | str, fix: str | None) -> str | None:
    """The fix of a broken state file (empty, cut short, deleted, a record refused): the kept
    copy, its age and the command, when one is kept for it; else `fix` as it was."""
    named = kept_for(state_file)
    if named is None:
        return fix
    kept, shown = named
    return (f"the runbook kept a copy of it, {kept.age} old ({kept.path}): `{COMMAND} "
            f"{shown}` shows it next to what runs and puts it back; or {fix}")
