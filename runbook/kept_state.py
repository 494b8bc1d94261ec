"""The runbook's own copy of the last state file it wrote.

Another tool that rewrites the file in place, or a full disk under one, leaves it empty or cut
short; another deletes it, moves it away or writes a record the reader refuses; every command
then refused (or planned a first deploy) until on-call edited it by hand. The copy lets the refusal
name a way back (`runbook state restore-kept ENV`) that is checked against what runs. Only the
runbook's own writes keep it: a dry run or a read-only command writes nothing, not even this.
Outside the state package, so that registering it (every CLI command) imports nothing more.

It lives with the runbook's own files (`[logs] runs_dir`, a dot file no run-record reader
lists), is written atomically, holds no secret (each value holding one masked as the journal
masks it, every key kept: `runbook state restore-kept` names the values it writes as `***`)
and is only rewritten when it changes. Keeping it never fails a command: a copy that cannot
be written is one warning per command, with its fix, and the command goes on.
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
from typing import Any

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


def keep(state_file: Path | str, raw: bytes, render: Callable[[Any], bytes]) -> None:
    """Store `raw` (a state file the runbook just wrote) as the copy; never raises. `render`:
    the writer's own, a JSON document in that file's style (how a masked copy is written:
    the writer's module imports this one, so this one may not import it back)."""
    place = _PLACES.get(os.path.realpath(state_file))
    if place is None:
        return
    copy, _, warn = place
    try:
        payload = _masked(raw, render)
        with _WRITING:
            try:
                if files.read_regular(copy, MAX_BYTES) == payload:
                    return
            except OSError:
                pass  # none yet, or unreadable: written anew
            copy.parent.mkdir(parents=True, exist_ok=True)
            files.atomic_write(copy, payload, default_mode=0o600)
    except (OSError, ValueError, RecursionError) as exc:
        # once per command (each write's error may read differently), with the way out
        if str(copy) in _WARNED:
            return
        _WARNED.add(str(copy))
        fix = (files.write_fix(exc, copy.parent, f"make {copy.parent} ([logs] runs_dir) a "
                               "directory the deploy user can write")
               if isinstance(exc, OSError) else "a bug in runbook: please report this line")
        with contextlib.suppress(OSError, ValueError):
            warn(f"warning: cannot keep a copy of the state file in {copy} ({_why(exc)}); the "
                 "command goes on without it, and a copy kept before, if any, is of an "
                 f"earlier write; {fix}")


def _why(exc: BaseException) -> str:
    return (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)


def _masked(raw: bytes, render: Callable[[Any], bytes]) -> bytes:
    """The bytes as written, or, when a value in them holds a secret (a state file holds none,
    but another tool's extra key might), the same document with those values masked as the
    journal masks them and rendered in the file's style. By structure, not text: masking the
    text ate a closing quote ("DEPLOY_SECRET=***), no copy was kept from then on."""
    from runbook.redact import mask_document

    masked, paths = mask_document(json.loads(raw.decode("utf-8-sig")))
    return render(masked) if paths else raw


def masked_paths(raw: bytes) -> list[tuple[str | int, ...]]:
    """Where the copy holds a masked value (or key): what putting it back writes as `***`
    into the state file, for restore-kept to name (`shown`).

    Found again in the copy by the mask itself, not recorded when it was kept: no second
    file to keep in step with the copy (a kill between the two writes would leave them
    disagreeing), nothing added inside it (its bytes are what restore-kept writes). A value
    another tool wrote with `***` in it already is named as well: one look too many, never a
    masked value left unsaid."""
    from runbook.redact import MASK

    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except ValueError:
        return []
    found: list[tuple[str | int, ...]] = []

    def walk(value: Any, path: tuple[str | int, ...]) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if MASK in key:
                    found.append((*path, key))
                walk(item, (*path, key))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, (*path, i))
        elif isinstance(value, str) and MASK in value:
            found.append(path)

    walk(doc, ())
    return found


def shown(path: tuple[str | int, ...]) -> str:
    """A path as on-call reads it: `notify.db`, `deployment_history[0].deployed_by`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out


@dataclass(frozen=True)
class Kept:
    path: Path
    raw: bytes
    mtime: float

    @property
    def age(self) -> str:
        """"3 h 07 min old"; "dated 2 h 00 min in the future" where the clock was set back
        since it was written ("2 h old" would say an age nobody can tell)."""
        from runbook.times import rough_duration

        seconds = time.time() - self.mtime
        if seconds < -60:
            return f"dated {rough_duration(seconds)} in the future"
        return f"{rough_duration(seconds)} old"


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
    return (f"the runbook kept a copy of it, {kept.age} ({kept.path}): `{COMMAND} "
            f"{shown}` shows it next to what runs and puts it back; or {fix}")
