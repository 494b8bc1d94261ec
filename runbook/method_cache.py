"""The methods `@dataclass` writes and the annotations typing reads from strings, compiled
once per source text, not once per process.

Python 3.11's dataclasses builds __init__, __repr__, __eq__, __hash__, __setattr__ and
__delattr__ of every class as source text and `exec`s each: the parser and the compiler ran
~540 times on each `runbook rollback` (runbook's 65 dataclasses, pydantic's and the standard
library's), about a fifth of the instructions of its start-up (issue 14 item 2, counted with
cachegrind). The CLI's main() installs this before the command imports them (`import
runbook.cli` makes no dataclass): the `exec` dataclasses calls takes the code object compiled
from the very same text, kept beside the package's bytecode (__pycache__, as Python keeps a
.pyc), and compiles what it has not seen. typing.ForwardRef likewise compiles each annotation
written as a string (pydantic-core's TypedDicts: another ~4 % of the instructions).

Nothing else changes: the same text compiled the same way (no __future__ flags inherited, as
dataclasses' `exec` and typing's `compile` inherit none from their modules, file name
"<string>", the same mode) gives the same code; the key is the mode and the whole text, so a
changed class simply misses. The file carries the interpreter's bytecode magic number and a
CRC-32 of what follows, and is ignored when it is not this interpreter's, unreadable or
damaged. It is written, atomically, no wider open than the package's own files, only when
something was compiled and only where Python itself may write bytecode (not under
PYTHONDONTWRITEBYTECODE or -B; a read-only install just compiles, as before). Whoever imports
runbook without running the CLI (tests, the bench) is left as is.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import marshal
import os
import sys
import time
import types
import zlib
from pathlib import Path
from typing import Any

# what dataclasses looks `exec` up as, and typing `compile`: a module global shadows the builtin
_REAL_EXEC = builtins.exec
_REAL_COMPILE = builtins.compile
_MAX_ENTRIES = 4000  # a file grown past this (many code changes) starts again from this run's
_MAX_BYTES = 32 << 20  # a file this large is not one this module wrote (about 0.7 MB): ignored
_FILE = Path(__file__).resolve().parent / "__pycache__" / (
    f"generated-code.{sys.implementation.cache_tag}.marshal")


class _Cache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.codes: dict[str, types.CodeType] = _read(path)
        self.used: dict[str, types.CodeType] = {}
        self.compiled = 0

    def code(self, source: str, mode: str) -> types.CodeType:
        """`source` compiled in `mode` as a module without __future__ imports compiles it."""
        key = f"{mode}:{source}"
        code = self.codes.get(key)
        if code is None:
            code = _REAL_COMPILE(source, "<string>", mode, dont_inherit=True)
            self.codes[key] = code
            self.compiled += 1
        self.used[key] = code
        return code

    def exec(self, source: Any, globals: Any = None, locals: Any = None, /) -> None:
        """`exec` as dataclasses calls it; anything but source text goes straight through."""
        _REAL_EXEC(self.code(source, "exec") if isinstance(source, str) else source, globals,
                   locals)

    def compile(self, source: Any, filename: Any, mode: Any, *args: Any, **kwargs: Any) -> Any:
        """`compile` as typing.ForwardRef calls it for each annotation written as a string
        (`compile(text, "<string>", "eval")`: 876 times, 256 texts, in a rollback, most of
        them pydantic-core's); any other call goes straight through, a SyntaxError too."""
        if (isinstance(source, str) and filename == "<string>" and mode == "eval" and not args
                and not kwargs):
            return self.code(source, "eval")
        return _REAL_COMPILE(source, filename, mode, *args, **kwargs)

    def save(self) -> None:
        """Write what was compiled (once, at exit); never fails the command."""
        if not self.compiled or sys.dont_write_bytecode:
            return
        # another CLI may have kept other texts since this one read the file (a `status`
        # beside a `rollback`): keep them too, so the last one to exit drops nothing
        codes = {**_read(self.path), **self.codes}
        if len(codes) > _MAX_ENTRIES:
            codes = self.used
        try:
            from runbook import files

            payload = marshal.dumps(codes)
            # the one atomic write; no wider open than the package's own files, as Python
            # writes a .pyc (never 0666 under umask 0: code another user could change, run
            # by root's rollback); not fsynced: a lost write only compiles again
            files.atomic_write(self.path, _magic() + zlib.crc32(payload).to_bytes(4, "big")
                               + payload, default_mode=_mode(), durable=False)
            _sweep(self.path)
        except Exception:  # at exit: never a traceback, never the exit code
            pass
        self.compiled = 0


def _mode() -> int:
    try:
        return (os.stat(__file__).st_mode & 0o666) | 0o200
    except OSError:
        return 0o644


def _sweep(path: Path) -> None:
    """Temp files of CLIs killed while they wrote (an hour old or more): removed."""
    old = time.time() - 3600
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # files.temp_path's names
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < old:
                stale.unlink()


def _magic() -> bytes:
    from importlib.util import MAGIC_NUMBER

    return MAGIC_NUMBER


def _read(path: Path) -> dict[str, types.CodeType]:
    """The kept code objects; empty when absent, another interpreter's or damaged."""
    try:
        if path.stat().st_size > _MAX_BYTES:
            return {}
        data = path.read_bytes()
    except OSError:
        return {}
    magic = _magic()
    head = len(magic) + 4
    if not data.startswith(magic):
        return {}
    payload = data[head:]
    if len(data) < head or zlib.crc32(payload) != int.from_bytes(data[len(magic):head], "big"):
        # a damaged byte that still unmarshals (a third of single-bit flips do) would be run
        # as another method: only the bytes this module wrote are read (found by review)
        return {}
    try:
        codes = marshal.loads(payload)
    except Exception:
        # not only EOFError/ValueError/TypeError: one damaged byte in a code object raises
        # SystemError ("non-string found in code slot"), a damaged size MemoryError; escaping
        # main() before its try, either failed every command, `rollback` too, until the file
        # was removed (found by review)
        return {}
    if not isinstance(codes, dict):
        return {}
    return {k: v for k, v in codes.items()
            if isinstance(k, str) and isinstance(v, types.CodeType)}


def install(path: Path = _FILE) -> None:
    """Give dataclasses the caching `exec` and typing the caching `compile` (once per
    process), and save at exit."""
    import dataclasses
    import typing

    if isinstance(getattr(getattr(dataclasses, "exec", None), "__self__", None), _Cache):
        return
    cache = _Cache(path)
    dataclasses.exec = cache.exec  # type: ignore[attr-defined]
    typing.compile = cache.compile  # type: ignore[attr-defined]
    atexit.register(cache.save)
