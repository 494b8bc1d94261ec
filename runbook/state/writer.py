"""The file's bytes: a rewrite with no change is byte-identical, a changed one keeps the
file's formatting (indent, separators, escapes, newline, BOM); the write is atomic."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runbook import files
from runbook import kept_state as kept
from runbook.errors import StateError
from runbook.state.dialects import _check_finite, _same, to_json
from runbook.state.model import DeploymentState
from runbook.state.schema import GO_CLI


@dataclass(frozen=True)
class _Style:
    """How the file's writer formatted it, so our rewrite looks like theirs."""

    indent: str | None = "  "
    item_sep: str = ","  # json.dumps' own choice with an indent: no trailing spaces
    key_sep: str = ": "
    ensure_ascii: bool = False
    html_escape: bool = False  # Go's encoder writes <, >, & as \u003c, \u003e, \u0026
    newline_at_end: bool = True
    crlf: bool = False
    bom: bool = False


_NON_ASCII_ESCAPE = re.compile(r"\\u(?:00[89a-fA-F][0-9a-fA-F]|0[1-9a-fA-F][0-9a-fA-F]{2}|"
                               r"[1-9a-fA-F][0-9a-fA-F]{3})")
_HTML_ESCAPE = re.compile(r"\\u00(?:3[cCeE]|26)")
_SEPARATORS = re.compile(r'"(\s*):(\s*)["\[{0-9tfn-]')


def _style_of(raw: bytes, dialect: str) -> _Style:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return _Style()
    bom = text.startswith("\ufeff")
    text = text.removeprefix("\ufeff")
    body = text.strip()
    indent: str | None = None
    if "\n" in body:
        for line in body.splitlines()[1:]:
            lead = line[:len(line) - len(line.lstrip(" \t"))]
            if lead and line.strip():
                indent = lead
                break
        else:
            indent = ""
    key_sep, item_sep = ": ", ","
    match = _SEPARATORS.search(body)
    if match:
        key_sep = f"{match.group(1)}:{match.group(2)}" if indent is not None or match.group(2) \
            else ":"
    if indent is None:
        item_sep = ", " if re.search(r'[\]}"0-9el], "', body) else ","
    elif re.search(r", \r?\n", body):  # old Python json.dumps: trailing spaces after commas
        item_sep = ", "
    has_non_ascii = any(ord(c) > 127 for c in text)
    return _Style(
        indent=indent, item_sep=item_sep, key_sep=key_sep,
        ensure_ascii=not has_non_ascii and bool(_NON_ASCII_ESCAPE.search(text)),
        html_escape=bool(_HTML_ESCAPE.search(text)) or dialect == GO_CLI,
        newline_at_end=text.endswith("\n"), crlf="\r\n" in text, bom=bom,
    )


def _render(data: Mapping[str, Any], style: _Style) -> bytes:
    try:
        return _text(data, style).encode()
    except UnicodeEncodeError:  # a lone surrogate escape ("\ud83d") another tool wrote,
        # in a file with literal non-ASCII text: only an escape can keep it (a rollback's
        # record failed here after traffic had moved, and on every rerun)
        return _text(data, replace(style, ensure_ascii=True)).encode()


def _text(data: Mapping[str, Any], style: _Style) -> str:
    text = json.dumps(data, indent=style.indent, separators=(style.item_sep, style.key_sep),
                      ensure_ascii=style.ensure_ascii, allow_nan=False)
    if style.html_escape:  # these characters only ever occur inside JSON strings
        text = (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
                .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    if style.newline_at_end:
        text += "\n"
    if style.crlf:
        text = text.replace("\n", "\r\n")
    return ("\ufeff" if style.bom else "") + text


def dumps(state: DeploymentState) -> bytes:
    """The exact bytes write_state stores: the file's own bytes when nothing changed."""
    data = to_json(state)
    _check_finite(data)
    was = state.origin
    if was is None or was.raw is None:
        return _render(data, _Style())
    if was.raw_bytes is not None and _same(data, was.raw):
        return was.raw_bytes
    return _render(data, _style_of(was.raw_bytes or b"", state.dialect))


# Held by this process's read-modify-writes of the state file (the recorders, the lock's
# mirror): the lock heartbeat's thread refreshes the mirror during a long step only when it
# can take it at once, so it never lands inside the main thread's write (whose last-moment
# check would then refuse the run's own record).
WRITING = threading.RLock()


class StateChangedError(StateError):
    """The state file is no longer the one the state was read from: nothing was written."""


class StateWriteError(StateError):
    """The file system refused the write (`cause`: its OSError); the old file is unchanged.
    Told apart from a file that cannot be read, or another tool's change: the lock's first
    mirror refuses the run on it (lock.holding.Lock.publish)."""

    def __init__(self, message: str, fix: str, cause: OSError) -> None:
        super().__init__(message, fix)
        self.cause = cause


def write_state(path: Path, state: DeploymentState, *,
                before_rename: Callable[[], None] | None = None,
                new_only: bool = False) -> str | None:
    """Replace the file atomically: readers see the old file or the new one, never a mix.

    The file keeps its mode, owner and group (a new one is 0600); a writer that may not keep
    the owner (not root) keeps the group when it can, and the one line saying what was lost
    is returned (files.atomic_write), else None. `before_rename` is the drill's fault point
    between the fsynced temp file and the rename (the kill matrix's "during the state write").
    """
    target = Path(os.path.realpath(path))  # keep a symlinked state file a symlink
    try:
        payload = dumps(state)
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
        raise StateError(f"{target}: refusing to write, the state cannot be serialized ({exc})",
                         "this is a bug in the caller; the file was not changed") from None
    was = state.origin
    read_from = was.source if was is not None else state.source
    read_here = bool(read_from) and os.path.realpath(read_from) == str(target)
    expected = was.raw_bytes if was is not None and read_here else None
    # read where no file was (states.absent): the write creates the file, and replaces none
    # another tool created since (the Go CLI locking a new host's first deploy)
    new_only = new_only or (was is None and read_here)

    def unchanged_since_read() -> None:
        """Just before the rename: the file must still be the one this state was read
        from. Another tool's write in between (the Go CLI taking its lock, the deploy
        script recording a deployment) was replaced without a trace; now nothing is
        written and the caller is told (the window left is the rename's microseconds)."""
        if before_rename is not None:
            before_rename()
        if expected is None:
            return
        try:
            now: bytes | None = target.read_bytes()
        except FileNotFoundError:
            now = None
        if now != expected:
            raise StateChangedError(
                f"{target}: another tool changed the state file while this run updated it; "
                "nothing was written over its change",
                "run the command again: it reads the file as it is now")

    if (refused := files.link_refusal(Path(path), "the state file", "[state] file")):
        raise StateError(*refused)  # never `mkdir -p` under an empty mount point
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            lost = files.atomic_write(target, payload, default_mode=0o600,
                                      before_rename=unchanged_since_read, new_only=new_only)
            kept.keep(target, payload,  # a masked copy in this file's style
                      lambda doc: _render(doc, _style_of(payload, state.dialect)))
            return lost
        except FileExistsError:
            if not new_only:
                raise
            raise StateChangedError(
                f"{target}: another tool created the state file after this run found none; "
                "nothing was written over it",
                "run the command again: it reads the file as it is now") from None
    except OSError as exc:
        raise StateWriteError(f"{target}: cannot write the state file ({exc.strerror or exc}); "
                              "the old file is unchanged",
                              files.write_fix(exc, target.parent,
                                              "check free disk space and permissions",
                                              target=target), exc) from None
