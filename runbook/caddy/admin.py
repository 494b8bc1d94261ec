"""Talking to Caddy: read the Caddyfile, have Caddy validate and load a config, ask whether it
runs, and verify through the proxy who answers. Every call is bounded in time."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import glob
import os
import re
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from runbook import caddy_command, drain, files, health, procs
from runbook.caddy.errors import (
    CaddyConflictError,
    CaddyError,
    CaddyNotRunningError,
    CaddyRejectedError,
    SlotMarkersError,
)
from runbook.caddy.text import (
    SLOT_HEADER,
    FileImport,
    file_imports,
    has_marker_line,
    in_managed_block,
    rewrite,
)
from runbook.environment import Environment, ReloadMethod, Slot, SlotConfig
from runbook.errors import ExitCode

if TYPE_CHECKING:
    from runbook.bounded_http import Answer

_COMMAND_TIMEOUT = 60.0
_ADMIN_TIMEOUT = 10.0


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CaddyError(f"cannot read the Caddyfile {path}: {exc.strerror}",
                         "check [caddy] caddyfile in the environment file and its permissions",
                         stage="read") from None


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CaddyError(f"{path} is not UTF-8 (byte {exc.start})",
                         "Caddy reads UTF-8; fix the file's encoding", stage="read") from None


def read_bytes(env: Environment) -> bytes:
    """The Caddyfile's bytes; also proves they are UTF-8 (Caddy reads nothing else)."""
    data = _read_bytes(env.caddy.caddyfile)
    _decode(data, env.caddy.caddyfile)
    return data


def read(env: Environment) -> str:
    """The Caddyfile's text, exactly as stored (CRLF and all)."""
    path = env.caddy.caddyfile
    return _decode(_read_bytes(path), path)


_IMPORTED_MAX = 1024 * 1024  # bytes read of one imported file: a Caddyfile is a few KiB
_IMPORTED_FILES = 64  # files read across the imports: a glob over a big folder stops there


def _import_on_host(env: Environment, pattern: str) -> str:
    """An import's path or glob as this host names it: a relative one from the Caddyfile's
    folder (Caddy's `caddy reload` and systemd resolve it so), one under the folder where a
    containerised Caddy sees the Caddyfile (`[caddy] container_path`) from the host's
    folder that is mounted there (seen_by_caddy's inverse); any other as written."""
    folder = env.caddy.caddyfile.parent
    path = PurePosixPath(pattern)
    if not path.is_absolute():
        return str(folder / pattern)
    inside = PurePosixPath(env.caddy.container_path).parent if env.caddy.container_path \
        else None
    if inside is not None and inside != PurePosixPath("/") and path.is_relative_to(inside):
        return str(folder / path.relative_to(inside))
    return pattern


def markers_imported(env: Environment, text: str,
                     refused: SlotMarkersError) -> SlotMarkersError:
    """`refused`, find_block's refusal of `text` (the [caddy] caddyfile's), naming the files
    its imports bring in that hold the marker lines, when it has none itself: "has no ...
    marker line" alone sent on-call to a file whose markers were in plain sight, in the site
    the Caddyfile imports (found by review). The switch rewrites, validates and has Caddy
    load that one file, so the block must be in it; and [caddy] caddyfile cannot name the
    imported file instead: a load of it alone drops every other site (preflight.kept_sites
    refuses that). Reads only regular files, a bounded number and size."""
    if not refused.none_found:
        return refused
    holders: dict[str, FileImport] = {}
    looked = 0
    for found in file_imports(text):
        for name in sorted(glob.glob(_import_on_host(env, found.pattern))):
            looked += 1
            if looked > _IMPORTED_FILES:
                break
            try:
                data = files.read_regular(Path(name), _IMPORTED_MAX, follow=True)
            except OSError:  # a folder, a FIFO, unreadable, too large: no Caddyfile of ours
                continue
            if has_marker_line(data.decode("utf-8", "replace")):
                holders.setdefault(name, found)
    if not holders:
        return refused
    path = env.caddy.caddyfile
    names = " and ".join(holders)
    imports = ", ".join(f"line {i.line}: import {i.pattern}"
                        for i in dict.fromkeys(holders.values()))
    first = next(iter(holders))
    refused.message = f"{refused.message}; they are in {names}, which it imports ({imports})"
    refused.args = (refused.message,)
    refused.fix = (
        f"the marker lines must be in the [caddy] caddyfile file itself ({path}), the one file "
        f"the switch rewrites: move what holds them (the app's site block, marker lines and "
        f"all) from {names} into {path}, beside the import (line {holders[first].line}); "
        f"[caddy] caddyfile cannot name {first} instead: it must be the whole config Caddy "
        "runs (its global options and every site)")
    return refused


def _run(argv: list[str], what: str, stage: str, *, stdin: str | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`argv`, bounded in time; `stdin`: the text it reads there (else it inherits ours)."""
    try:
        # its own session: a terminal's Ctrl-C goes to the whole foreground process group,
        # and the runbook holds it off until the step ends, but a `caddy reload` (or
        # `systemctl reload`) in that group died mid-commit, its job possibly still landing
        # after the undo (found by review)
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False,
            start_new_session=True, input=stdin, cwd=cwd)
    except FileNotFoundError:
        raise CaddyError(f"cannot {what}: command {argv[0]!r} not found",
                         "install it or set [caddy] command in the environment file",
                         stage=stage) from None
    except subprocess.TimeoutExpired:
        raise CaddyError(f"cannot {what}: {shlex.join(argv)} did not finish within "
                         f"{_COMMAND_TIMEOUT:.0f}s", "check that Caddy is responsive",
                         stage=stage) from None


def _tail(output: str, lines: int = 12) -> str:
    """The lines worth showing: Caddy's `Error:` lines if any, else the last few."""
    kept = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in kept if line.lstrip().startswith("Error")]
    kept = (errors or kept)[-lines:]
    return "\n    ".join(kept) if kept else "(no output)"


_temps: set[Path] = set()  # the sibling temp files not removed yet: at exit, a signal's too
_temps_lock = threading.Lock()


def _remove_temps() -> None:
    """At exit, the temp files a probe thread was still using: a signal while it ran ends the
    process (cli._leave: os._exit after the atexit functions), never its `finally`."""
    with _temps_lock:
        left = sorted(_temps)
        _temps.clear()
    for tmp in left:
        with contextlib.suppress(OSError):
            tmp.unlink()


atexit.register(_remove_temps)


@contextlib.contextmanager
def _sibling_temp(path: Path, tag: str) -> Iterator[tuple[int, Path]]:
    """A hidden temp file beside `path` (Caddy's `import` globs skip dot files), always removed:
    here, or at exit when the process ends first."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.runbook-{tag}-",
                                suffix=".tmp")
    tmp = Path(name)
    with _temps_lock:
        _temps.add(tmp)
    try:
        yield fd, tmp
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        with _temps_lock:
            _temps.discard(tmp)


def _write_fd(fd: int, tmp: Path, data: bytes, like: Path) -> None:
    """Write, fsync and copy mode/owner of `like` so the result reads as the original did."""
    with os.fdopen(os.dup(fd), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        st = like.stat()
    except FileNotFoundError:
        os.chmod(tmp, 0o644)
        return
    os.chmod(tmp, st.st_mode & 0o7777)
    if hasattr(os, "chown"):
        with contextlib.suppress(OSError):
            os.chown(tmp, st.st_uid, st.st_gid)


def seen_by_caddy(env: Environment, path: Path | str) -> str:
    """A file beside the Caddyfile, named as Caddy sees it: a containerised Caddy whose config
    directory is bind-mounted at another path (`[caddy] container_path`) cannot read the host
    path, and an error about the unreadable file would wrongly blame the managed block."""
    seen = env.caddy.container_path
    path = Path(path)
    if not seen:
        return str(path)
    if path == env.caddy.caddyfile:
        return seen
    if path.parent == env.caddy.caddyfile.parent:
        return str(PurePosixPath(seen).parent / path.name)
    return str(path)


def candidate_shown(env: Environment) -> Path:
    """The temp copy beside the Caddyfile that a real run's `caddy validate` reads, as plans
    name it (its random part shown as XXXX)."""
    path = env.caddy.caddyfile
    return path.parent / f".{path.name}.runbook-validate-XXXX.tmp"


def validate_command(env: Environment, config: Path | str) -> list[str]:
    """What validation runs, for the plan: the same request or argv validate() uses.

    With the admin-api reload method the candidate is adapted by the running Caddy itself
    (POST /adapt: same adapter, same process and environment as the /load that follows, and
    no process to spawn); a reload through `caddy reload` or systemd reads the file on disk,
    so `caddy validate` checks it the same way (relative imports, environment placeholders),
    naming the file as Caddy sees it (`[caddy] container_path`).
    """
    if env.caddy.reload is ReloadMethod.ADMIN_API:
        return ["POST", f"{env.caddy.admin_url}/adapt", "Content-Type: text/caddyfile"]
    return [*env.caddy.command, "validate", "--config", seen_by_caddy(env, config),
            "--adapter", "caddyfile"]


def shown(method: ReloadMethod, words: Iterable[str]) -> str:
    """What validate_command or ReloadCommand.words names, as the plan shows it: an argv
    quoted as a shell reads it (found by a plan-fidelity review: joined by spaces, an
    argument holding one read as two), the admin API's request words as they are."""
    return " ".join(words) if method is ReloadMethod.ADMIN_API else shlex.join(words)


def check_imports(env: Environment, text: str) -> None:
    """Refuse (exit 4, before anything changes) a Caddyfile the admin API would load without
    what it imports. /adapt and /load get the text with no file name, so Caddy resolves a
    relative `import` from its own working directory: a glob matching nothing there is only
    a warning, validation passes and the reload drops every imported site. `caddy reload`
    and systemd's reload read the file itself, and import from its directory."""
    if env.caddy.reload is not ReloadMethod.ADMIN_API:
        return
    relative = [i for i in file_imports(text) if i.relative]
    if not relative:
        return
    path = env.caddy.caddyfile
    where = ", ".join(f"line {i.line}: import {i.pattern}" for i in relative)
    absolute = PurePosixPath(seen_by_caddy(env, path)).parent / relative[0].pattern
    raise CaddyError(
        f"{path} has a relative file import ({where}): with reload = \"admin-api\" Caddy is "
        "sent the text without its path and looks for the files in its own working directory, "
        "so the reload would drop what they hold; nothing was changed",
        f"make the import path absolute (import {absolute}), or set reload = \"caddy-reload\" "
        f"or \"systemctl\" under [caddy] in {env.source or 'the environment file'}, so Caddy "
        "reads the Caddyfile itself", exit_code=ExitCode.PRECONDITION, stage="plan")


def validate(env: Environment, text: str) -> str:
    """Have Caddy itself check a candidate config; returns its warnings/output, raises when
    rejected. Nothing is loaded or written (for `caddy validate`, the candidate sits in a
    temp file beside the Caddyfile so relative imports resolve the same way and a
    containerised Caddy, the directory bind-mounted at the same path, can read it; a dry
    run, which writes nothing there, uses validate_unwritten)."""
    path = env.caddy.caddyfile
    if env.caddy.reload is ReloadMethod.ADMIN_API:
        return _validate_by_api(env, text)
    try:
        with _sibling_temp(path, "validate") as (fd, tmp):
            _write_fd(fd, tmp, text.encode("utf-8"), path)
            argv = validate_command(env, tmp)
            done = _run(argv, "validate the new Caddyfile", "validate")
    except OSError as exc:
        raise CaddyError(f"cannot write a candidate Caddyfile beside {path}: {exc.strerror}",
                         "check the directory's permissions", stage="validate") from None
    output = (done.stdout or "") + (done.stderr or "")
    if done.returncode != 0:
        said = _tail(output)
        raise CaddyRejectedError(f"Caddy rejected the new Caddyfile (caddy validate exited "
                                 f"{done.returncode}):\n    {said}",
                                 rejected_fix(env, text, said, seen_by_caddy(env, tmp))
                                 + _UNCHANGED,
                                 stage="validate")
    return output


_STDIN = "-"  # `--config -`: Caddy reads the config from its stdin, and names it so


def _stdin_command(env: Environment) -> tuple[tuple[str, ...], Path | None, str | None]:
    """[caddy] command made to run Caddy on a Caddyfile given on its standard input, in the
    Caddyfile's folder as Caddy sees it, where Caddy resolves the relative imports of a
    config read from stdin, as `caddy reload` resolves the file's: (the command, the folder
    to start it in, only for Caddy's own binary on this host (found by review: started
    there, `docker compose exec` moved its client, not Caddy, and no -p then made Compose
    look for its project there, not where the real run starts it), and None; or, when it
    cannot be placed so (a wrapper script, another shape), that folder, as Caddy sees it)."""
    folder = str(PurePosixPath(seen_by_caddy(env, env.caddy.caddyfile)).parent)
    command = env.caddy.command
    if (placed := caddy_command.exec_reading_stdin(command, folder)) is not None:
        return placed, None, None  # `docker exec -i -w`, `docker compose exec -T -w`
    if caddy_command.runs_caddy_here(command):
        return command, env.caddy.caddyfile.parent, None
    return command, None, folder


def validate_unwritten(env: Environment, text: str) -> tuple[str, str | None]:
    """A dry run's `validate` (reload = caddy-reload or systemctl), which writes no file: the
    real run's candidate beside the Caddyfile changed that folder (found by review: its mtime
    moved), and a copy anywhere else is out of sight of a Caddy in a container and resolves
    relative imports from the wrong folder. Caddy gets `text` on its standard input
    (`caddy validate --config -`, Caddy 2.3 on) instead. Returns that command (as shown)
    and None when Caddy validated `text`, or why it was not validated: that the command
    reads its stdin is proved first, by a config Caddy must reject naming a word of this
    run's (a wrapper that does not pass stdin on hands Caddy an empty config, which a Caddy
    may pass; an older Caddy reads a file named "-"): fail closed, never "validates" unread;
    nor is `text` with relative imports validated by a command Caddy cannot be started in
    the Caddyfile's folder through (it would look for them elsewhere: a false refusal, or a
    pass on other files). Raises CaddyRejectedError when Caddy rejects `text`, CaddyError
    as validate does when the command cannot run at all."""
    import secrets

    command, cwd, unplaced = _stdin_command(env)
    argv = [*command, "validate", "--config", _STDIN, "--adapter", "caddyfile"]
    shown_argv = shlex.join(argv)

    def check(config: str) -> subprocess.CompletedProcess[str]:
        """Raises as validate does where the command cannot run at all (not found, hung)."""
        try:
            return _run(argv, "validate the new Caddyfile", "validate", stdin=config, cwd=cwd)
        except OSError as exc:  # the folder cannot be entered (the real run writes there)
            raise CaddyError(f"cannot validate the new Caddyfile: `{shown_argv}` cannot start "
                             f"in {cwd}: {exc.strerror or exc}",
                             "check the directory's permissions", stage="validate") from None

    word = f"runbook_stdin_check_{secrets.token_hex(4)}"
    said = _tail((probe := check(f"localhost {{\n\t{word}\n}}\n")).stdout + probe.stderr)
    if probe.returncode in (126, 127):  # no caddy to run (the shell's, docker exec's codes)
        raise CaddyError(f"cannot validate the new Caddyfile: `{shown_argv}` exited "
                         f"{probe.returncode}: {said.splitlines()[-1].strip()}",
                         "install it or set [caddy] command in the environment file",
                         stage="validate")
    if f"{_STDIN}:2: unrecognized directive: {word}" not in said:
        return shown_argv, (f"`{shown_argv}` does not read a Caddyfile from its standard "
                            f"input (it said: {said.splitlines()[-1].strip()})")
    relative = [i for i in file_imports(text) if i.relative]
    if relative and unplaced is not None:
        where = ", ".join(f"line {i.line}: import {i.pattern}" for i in relative)
        return shown_argv, (f"the new Caddyfile has relative imports ({where}), which Caddy "
                            f"resolves from the folder it starts in, and `{shown_argv}` cannot "
                            f"be started in {unplaced} (only `caddy` on this host, `docker exec "
                            "NAME caddy` and `docker compose exec SERVICE caddy` can)")
    done = check(text)
    if done.returncode == 0:
        return shown_argv, None
    said = _tail(done.stdout + done.stderr)
    raise CaddyRejectedError(f"Caddy rejected the new Caddyfile (caddy validate exited "
                             f"{done.returncode}):\n    {said}",
                             rejected_fix(env, text, said, _STDIN) + _UNCHANGED,
                             stage="validate")


# `<file>:<line>: <error>` or `<file>:<line> - Error during parsing: ...`, as Caddy's
# Caddyfile adapter names where it stopped
_AT_LINE = re.compile(r"(?P<file>[^\s:\"']+):(?P<line>\d+)(?::| -) ")
_ADAPTED_AS = "Caddyfile"  # the file name Caddy gives text POSTed to /adapt or /load
_UNCHANGED = "; nothing was changed"


def rejected_fix(env: Environment, text: str, said: str, name: str = _ADAPTED_AS) -> str:
    """Where to mend a Caddyfile (`text`) Caddy rejected, from the line its error (`said`)
    names in `name` (the file as Caddy was given it): the managed block, another line of
    the file (found by review: "fix the managed block" of a typo on another site), or a file
    it imports."""
    path = env.caddy.caddyfile
    found = next((m for m in _AT_LINE.finditer(said) if m["file"] == name), None) \
        or _AT_LINE.search(said)
    if found is None:
        return f"fix what Caddy's error names in {path}"
    line = int(found["line"])
    if found["file"] != name:
        return f"fix line {line} of {found['file']} (a file {path} imports)"
    if in_managed_block(text, line):
        return f"fix the managed block (line {line}) in {path}"
    return (f"fix line {line} of {path}, outside the slot markers (Caddy rejects the file as "
            "it stands: a reload or restart of Caddy would fail on it too)")


def rejection(env: Environment, text: str) -> tuple[str, str] | None:
    """(Caddy's error, where to mend it) when Caddy's adapter rejects Caddyfile `text` as a
    reload or restart would read it (`POST /adapt`, nothing loaded); None when it adapts it,
    does not answer, or cannot be asked the same question (a relative import, which /adapt
    resolves from Caddy's working directory, not the file's)."""
    from runbook import bounded_http

    if any(i.relative for i in file_imports(text)):
        return None
    try:
        answer = _post_caddyfile(env, "adapt", text, _ADMIN_TIMEOUT)
    except bounded_http.HttpFailure:
        return None
    if answer.status != 400:  # Caddy's answer to a file its adapter rejects
        return None
    said = _admin_error(answer)
    return said, rejected_fix(env, text, said)


def _post_caddyfile(env: Environment, endpoint: str, text: str,
                    timeout: float) -> Answer:
    """POST Caddyfile text to the admin API (`/adapt` or `/load`); raises HttpFailure."""
    from runbook import bounded_http

    return bounded_http.request("POST", f"{env.caddy.admin_url}/{endpoint}", timeout=timeout,
                                content=text.encode("utf-8"),
                                headers={"Content-Type": "text/caddyfile"}, max_body=None)


def adapt(env: Environment, text: str) -> Any | None:
    """Caddy's JSON for Caddyfile `text` (`POST /adapt`: nothing is loaded); None when Caddy
    does not answer or rejects it."""
    from runbook import bounded_http

    try:
        answer = _post_caddyfile(env, "adapt", text, _ADMIN_TIMEOUT)
        body = answer.json() if answer.status < 400 else None
    except (bounded_http.HttpFailure, ValueError):
        return None
    return body.get("result") if isinstance(body, dict) else None


def adapt_as_reload(env: Environment, text: str) -> Any | None:
    """Caddy's JSON for `text` as `caddy reload` run here adapts it: by [caddy] command, in
    the environment that command gets (Caddyfile `{$VAR}` placeholders are expanded by the
    process that adapts, not by the Caddy that loads the result). None when it cannot be
    run or rejects the file (the validation says why)."""
    import json

    path = env.caddy.caddyfile
    try:
        with _sibling_temp(path, "adapt") as (fd, tmp):
            _write_fd(fd, tmp, text.encode("utf-8"), path)
            done = _run([*env.caddy.command, "adapt", "--config", seen_by_caddy(env, tmp),
                         "--adapter", "caddyfile"], "adapt the new Caddyfile", "validate")
    except (OSError, CaddyError):
        return None
    if done.returncode != 0:
        return None
    try:
        return json.loads(done.stdout)
    except ValueError:
        return None


def adapt_file_as_reload(env: Environment) -> tuple[Any | None, str]:
    """adapt_as_reload of the Caddyfile on disk, read by Caddy itself (`caddy adapt --config
    <the Caddyfile as Caddy sees it>`): what a dry run, which writes no candidate, can ask
    (`caddy adapt` reads no stdin before Caddy 2.10). (Caddy's JSON or None, as
    adapt_as_reload; the command and, when it failed, its last words)."""
    import json

    argv = [*env.caddy.command, "adapt", "--config", seen_by_caddy(env, env.caddy.caddyfile),
            "--adapter", "caddyfile"]
    ran = shlex.join(argv)
    try:
        done = _run(argv, "adapt the Caddyfile", "validate")
    except CaddyError as exc:
        return None, f"{ran}: {exc.message}"
    said = _tail(done.stderr or done.stdout).splitlines()[-1].strip()
    if done.returncode != 0:
        return None, f"{ran} exited {done.returncode}: {said}"
    try:
        return json.loads(done.stdout), ran
    except ValueError:
        return None, f"{ran} printed no JSON"


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The JSON path of the first value two configs disagree on (never the values: an
    expanded placeholder may be a secret); None when they are equal."""
    return next((path for path, _, _ in differences(a, b, where)), None)


def differences(a: Any, b: Any, where: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Every (JSON path, a's value, b's value) two configs disagree on, in first_difference's
    order. Lists of another length are one difference (their items are not paired: a route
    added before another shifts every index after it)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                yield f"{where}.{key}".lstrip("."), a.get(key), b.get(key)
            else:
                yield from differences(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield where.lstrip(".") or "(top)", a, b
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from differences(x, y, f"{where}[{i}]")
    elif a != b:
        yield where.lstrip(".") or "(top)", a, b


@dataclass(frozen=True)
class BlockDrift:
    """Where Caddy's running config differs from the Caddyfile's block between the markers."""

    # (what Caddy dials, what the file's block dials) at each upstream address that differs
    dials: tuple[tuple[str, str], ...]
    where: str | None  # the first JSON path that differs otherwise (None: only those)


def block_drift(env: Environment, running: Any, text: str, slot: Slot) -> BlockDrift | None:
    """How the block between the markers of `text`, pointed at `slot` (the slot Caddy serves),
    differs from what Caddy runs; None when it does not, or when that cannot be told (Caddy
    does not adapt the file, a block the switch cannot rewrite). Caddy's next restart, or a
    reload by anyone, loads the file: found by review, after a failed rollback's undo the
    block on disk named an upstream edited by hand to 127.0.0.1 while Caddy ran what it had
    loaded. Judged between the markers only (outside them, an edit not yet loaded is the
    operator's own): the handlers the block makes are those whose config changes when it is
    pointed at the other slot, and only differences inside them count, in the server that
    listens where the file's does (a site added elsewhere renumbers the servers)."""
    try:
        ours = adapt(env, rewrite(text, env, slot))
        theirs = adapt(env, rewrite(text, env, slot.other))
    except CaddyError:
        return None
    if not isinstance(ours, dict) or not isinstance(theirs, dict) \
            or not isinstance(running, dict):
        return None
    handlers = {h for path, _, _ in differences(ours, theirs)
                if (h := _handler(path)) is not None}
    found = [(path, now, filed) for path, now, filed in differences(running, ours)
             if any(path == h or path.startswith((f"{h}.", f"{h}[")) for h in handlers)
             and _same_listen(running, ours, path)]
    if not found:
        return None
    def address(path: str, now: Any, filed: Any) -> bool:
        return path.endswith(".dial") and isinstance(now, str) and isinstance(filed, str)

    dials = [(now, filed) for path, now, filed in found if address(path, now, filed)]
    other = [path for path, now, filed in found if not address(path, now, filed)]
    return BlockDrift(tuple(dict.fromkeys(dials)), other[0] if other else None)


def _handler(path: str) -> str | None:
    """The JSON path of the innermost handler `path` lies in (`...handle[2]`)."""
    at = path.rfind(".handle[")
    return None if at < 0 else path[:path.index("]", at) + 1]


def _same_listen(a: Any, b: Any, path: str) -> bool:
    """Whether the HTTP server `path` lies in listens at the same addresses in both configs."""
    prefix = "apps.http.servers."
    if not path.startswith(prefix):
        return False
    name = path[len(prefix):].split(".", 1)[0].split("[", 1)[0]

    def listen(config: Any) -> Any:
        servers = ((config.get("apps") or {}).get("http") or {}).get("servers") or {}
        server = servers.get(name) if isinstance(servers, dict) else None
        return server.get("listen") if isinstance(server, dict) else None

    return listen(a) is not None and listen(a) == listen(b)


def served_sites(config: object) -> set[str]:
    """What a config serves, as `<hosts> on <listen address>` and `app <name>`; comparable
    across two adaptations (server names such as srv0 are not)."""
    apps = (config.get("apps") if isinstance(config, dict) else None) or {}
    found = {f"app {name}" for name in apps if name != "http"} if isinstance(apps, dict) \
        else set()
    http = apps.get("http") if isinstance(apps, dict) else None
    servers = (http.get("servers") if isinstance(http, dict) else None) or {}
    for server in servers.values() if isinstance(servers, dict) else ():
        if not isinstance(server, dict):
            continue
        hosts: set[str] = set()
        for route in server.get("routes") or ():
            for match in (route.get("match") if isinstance(route, dict) else None) or ():
                if isinstance(match, dict):
                    hosts.update(str(h) for h in match.get("host") or ())
        for listen in server.get("listen") or ():
            found.update(f"{host} on {listen}" for host in (hosts or {"*"}))
    return found


def dropped_sites(running: Any, new: Any) -> str | None:
    """What `running` serves and `new` does not, as the refusals name it (the first four);
    None when nothing would be dropped. `/load` replaces Caddy's whole config."""
    missing = sorted(served_sites(running) - served_sites(new))
    if not missing:
        return None
    return ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4
                                     else "")


def _validate_by_api(env: Environment, text: str) -> str:
    from runbook import bounded_http

    url = f"{env.caddy.admin_url}/adapt"
    try:
        answer = _post_caddyfile(env, "adapt", text, _ADMIN_TIMEOUT)
    except bounded_http.HttpFailure as exc:
        raise CaddyError(f"cannot validate the new Caddyfile: {url} did not answer "
                         f"({exc.reason}); nothing was changed", "check that Caddy is running",
                         stage="validate") from None
    if answer.status >= 400:
        said = _admin_error(answer)
        raise CaddyRejectedError(f"Caddy rejected the new Caddyfile (HTTP {answer.status} from "
                                 f"{url}): {said}", rejected_fix(env, text, said) + _UNCHANGED,
                                 stage="validate")
    try:
        body = answer.json()
    except ValueError:
        return ""
    warnings = body.get("warnings") if isinstance(body, dict) else None
    if not isinstance(warnings, list):
        return ""
    return "\n".join(str(w.get("message", w)) if isinstance(w, dict) else str(w)
                     for w in warnings)


def admin_address(env: Environment) -> str:
    """host:port of the admin API, as `caddy reload --address` wants it."""
    parts = urlsplit(env.caddy.admin_url)
    if not parts.hostname:
        return env.caddy.admin_url
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port or 2019}"


DEFAULT_ADMIN = "localhost:2019"  # Caddy's admin listener when its config names none
_WILDCARD = frozenset({"", "0.0.0.0", "::"})


def admin_moved(env: Environment, new: Any, running: Any) -> str | None:
    """Why loading `new` (Caddy's JSON) would take Caddy's admin API away from [caddy]
    admin_url, or None. Found by review: a Caddyfile whose `admin` line was edited and not
    reloaded was loaded by a switch (exit 0, a drift warning only); Caddy's admin listener
    moved, so every later status and rollback, and an undo, could not reach Caddy. Where
    `running` listens the same (both naming none: Caddy's default, or its CADDY_ADMIN), the
    listener does not move."""
    def settings(config: Any) -> dict[str, Any]:
        admin = config.get("admin") if isinstance(config, dict) else None
        return admin if isinstance(admin, dict) else {}

    admin, now = settings(new), settings(running)
    where = f"not [caddy] admin_url {env.caddy.admin_url}, where it answers now"
    if admin.get("disabled") is True:
        return f"would turn Caddy's admin API off (`admin off`), {where}"
    listen = admin.get("listen") or None
    if listen == (now.get("listen") or None):
        return None
    listen = listen if isinstance(listen, str) else DEFAULT_ADMIN
    if _same_listener(listen, admin_address(env)):
        return None
    return f"would put Caddy's admin listener at {listen}, {where}"


def _same_listener(listen: str, address: str) -> bool:
    """Whether a Caddy admin listener at `listen` (`[tcp/]host:port`) answers at `address`
    (admin_address's host:port). Go listens on one address for a name: `localhost` is
    127.0.0.1; an empty host, 0.0.0.0 or :: every address."""
    network, _, rest = listen.partition("/") if "/" in listen else ("tcp", "", listen)
    if network not in ("tcp", "tcp4", "tcp6"):
        return False  # a unix socket: the runbook only reaches a TCP admin API
    host, _, port = rest.rpartition(":")
    want_host, _, want_port = address.rpartition(":")
    host, want_host = host.strip("[]").lower(), want_host.strip("[]").lower()
    if port != want_port:
        return False
    loopback = {"localhost", "127.0.0.1"}
    return (host == want_host or host in _WILDCARD or {host, want_host} <= loopback
            or (want_host == "localhost" and host == "::1"))


def container_admin_address(listen: object) -> str | None:
    """Where a `caddy reload` run inside Caddy's own container reaches an admin listener at
    `listen` (Caddy's `admin.listen`, `[network/]host:port`; empty: Caddy's default): a
    wildcard host is dialed at the container's loopback, a unix socket as it is. None when
    it cannot be told (a port range, a placeholder, another network)."""
    listen = listen or DEFAULT_ADMIN
    if not isinstance(listen, str) or "{" in listen or any(c.isspace() for c in listen):
        return None
    network, slash, rest = listen.partition("/")
    if not slash:
        network, rest = "tcp", listen
    network = network.lower()
    if network == "unix":
        return listen if rest else None
    if network not in ("tcp", "tcp4", "tcp6"):
        return None
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = host.strip("[]").lower()
    if host in _WILDCARD:
        host = "::1" if network == "tcp6" else "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _no_reload_address(env: Environment, why: str, planning: bool) -> CaddyError:
    """The refusal of a `caddy reload` whose in-container address is not known: when
    planning, exit 4 (nothing changed); in an undo, a failed step as any other."""
    c = env.caddy
    return CaddyError(
        f"`caddy reload` runs inside Caddy's container ([caddy] command "
        f"{shlex.join(c.command)}), where [caddy] admin_url {c.admin_url} is this host's "
        f"address, not the container's, and where Caddy's admin API listens in there cannot be "
        f"told: {why}" + ("; nothing was changed" if planning else ""),
        f"set reload = \"admin-api\" under [caddy] in {env.source or 'the environment file'} "
        "(the runbook then loads through [caddy] admin_url itself), or give Caddy a plain "
        f"TCP `admin` address in {c.caddyfile}'s global options (e.g. `admin 0.0.0.0:2019`, "
        "published to this host at [caddy] admin_url)",
        exit_code=ExitCode.PRECONDITION if planning else None,
        stage="plan" if planning else "reload")


def _running_for_address(env: Environment, planning: bool) -> Any:
    """Caddy's running config, read for reload_address (which cannot import runbook.traffic):
    its refusal when unread names the way out (reload = "admin-api")."""
    from runbook import bounded_http

    url = f"{env.caddy.admin_url}/config/"
    try:
        answer = bounded_http.request("GET", url, timeout=_ADMIN_TIMEOUT, max_body=None)
    except bounded_http.HttpFailure as exc:
        raise _no_reload_address(env, f"its running config could not be read (GET {url}: "
                                      f"{exc.reason})", planning) from None
    if answer.status != 200:
        raise _no_reload_address(env, f"its running config could not be read (GET {url}: "
                                      f"HTTP {answer.status})", planning)
    try:
        return answer.json()
    except ValueError:
        raise _no_reload_address(env, f"GET {url} did not answer JSON", planning) from None


def reload_address(env: Environment, running: Any = None, *,
                   planning: bool = True) -> tuple[str, str]:
    """The address `caddy reload --address` dials, and what the plan says of it ("": nothing
    more). Found by review: [caddy] admin_url is this host's view, and a `caddy reload` run
    in Caddy's container (`docker exec`), whose admin port Docker publishes under another
    (`-p 127.0.0.1:22019:2019`), dialed 127.0.0.1:22019 in there: every real switch failed
    and was undone, while its dry run passed. In Caddy's container the address is the one
    Caddy listens on as its running config says (`running`, read here when None); when
    that cannot be told, refused (exit 4) before anything changes (`planning`; else, in an
    undo, the step fails). On this host: admin_url."""
    c = env.caddy
    if not caddy_command.execs_in_caddys_container(c.command):
        return admin_address(env), ""
    if running is None:
        running = _running_for_address(env, planning)
    settings = running.get("admin") if isinstance(running, dict) else None
    settings = settings if isinstance(settings, dict) else {}
    listen = settings.get("listen")
    address = None if settings.get("disabled") is True else container_admin_address(listen)
    said = (f"`admin {listen}`" if listen else
            f"no admin address, so Caddy's default {DEFAULT_ADMIN}")
    if address is None:
        raise _no_reload_address(env, f"its running config has {said}"
                                 + (" (admin off)" if settings.get("disabled") is True
                                    else ", which the runbook cannot translate"), planning)
    if address == admin_address(env):  # as on this host: nothing more to say
        return address, ""
    return address, (f"--address {address} is Caddy's admin API as its container reaches it "
                     f"({said} in Caddy's running config; [caddy] admin_url {c.admin_url} is "
                     "this host's view)")


@dataclass(frozen=True)
class Unreloadable:
    """Why Caddy cannot take a reload now, and what fixes it. `answering`: its admin API
    answers (Caddy runs; systemd just does not hold it)."""

    problem: str
    fix: str
    answering: bool = False


def admin_unanswered(env: Environment, reason: str) -> Unreloadable | None:
    """Said when the admin API does not answer but the proxy does (`admin off`, another
    address, a unix socket): "Caddy is not running, start it" was untrue and fixed nothing.
    None: the proxy does not answer either (Caddy is down)."""
    from runbook import bounded_http

    c = env.caddy
    serving: Slot | None = None
    try:
        answer = bounded_http.request("GET", f"{c.proxy_url}{c.verify_path}",
                                      timeout=VERIFY_TIMEOUT, site=c.site,
                                      ca_file=_ca_file(env))
    except bounded_http.HttpFailure as exc:
        if not exc.untrusted:  # a certificate that does not verify: something serves TLS
            return None
    else:
        header = answer.header(SLOT_HEADER)
        serving = Slot(header) if header in {s.value for s in Slot} else None
    return Unreloadable(
        f"Caddy serves at {c.proxy_url} but its admin API does not answer at {c.admin_url} "
        f"({reason}: admin off, another address or a unix socket, which the runbook cannot "
        f"use: see the `admin` global option in {c.caddyfile})", admin_back_fix(env, serving),
        answering=True)


def block_first(env: Environment, text: str, serving: Slot | None, witness: str) -> str | None:
    """What must be done to the file's managed block before a fix loads (or a restart reads)
    the Caddyfile on disk, when the block names the slot other than `serving` (the one that
    serves, as `witness` tells it); None when it names `serving`, no one slot (said as the
    block's own problem, with its fix), or nothing known serves. Found by review (HIGH):
    the admin-moved fix said "write the admin line and load it" of a file whose block named
    the stopped green while blue served; followed, it moved every user to green (503/502
    until a switch back). The lines to write are the ones rewrite makes (the switch's own
    words for `serving`), each with its line number."""
    from runbook.caddy.text import inspect

    if serving is None:
        return None
    try:
        named = inspect(text, env).slot
    except CaddyError:  # no markers: the block's checks say so, and nothing is switched
        return None
    if named is None or named is serving:  # a block naming no one slot: its own problem
        return None
    said = (f"{env.caddy.caddyfile}'s managed block names {named} while {serving} serves "
            f"({witness}): loading the file as it is moves users to {named}")
    try:
        back = rewrite(text, env, serving)
    except CaddyError:
        return (f"{said}; first make every upstream and slot header between the slot markers "
                f"name {serving} again, then")
    old, new = text.split("\n"), back.split("\n")
    lines = "; ".join(f"line {n}: `{after.strip()}`" for n, (before, after)
                      in enumerate(zip(old, new, strict=True), start=1) if before != after)
    return (f"{said}; first put the block back to {serving}, writing these lines between "
            f"the slot markers as they are: {lines}; then")


def admin_back_fix(env: Environment, serving: Slot | None = None) -> str:
    """How Caddy's admin API is brought back to [caddy] admin_url while Caddy serves: the
    `admin` line admin_url names in the Caddyfile, loaded through where Caddy's admin API
    listens now, as the file's own `admin` line says (its config moved it there). Found by
    review (caddytruth LOW 5): the fix named Caddy's default `admin localhost:2019`, not the
    address the environment file names, and no way to load it once the admin API had moved
    (a plain `caddy reload` dials the new file's address, where nothing listens yet). Where
    it listens cannot be told (the file already names admin_url's address, or cannot be
    read): what to check, and the restart that reads the file. `serving`: the slot the
    proxy's answer names; a block naming another is put back first (block_first)."""
    from runbook.caddy.text import admin_option
    from runbook.environment import command_arg

    c = env.caddy
    want = admin_address(env)
    line, why = (f"`admin {want}`", "the address [caddy] admin_url names; the runbook reaches "
                 "Caddy's admin API over TCP only")
    reload = [*c.command, "reload", "--config", seen_by_caddy(env, c.caddyfile), "--adapter",
              "caddyfile", "--address"]
    then = f"then `runbook status {command_arg(env)}` again"
    first = ""
    try:
        text = c.caddyfile.read_text(encoding="utf-8")
        option = admin_option(text)
    except (OSError, UnicodeError):
        option, listen = None, None
        said = f"{c.caddyfile} could not be read"
    else:
        block = block_first(env, text, serving, f"the proxy answers {SLOT_HEADER}: {serving}")
        first = f"{block} " if block else ""
        listen = option or DEFAULT_ADMIN  # none, or `admin` alone: Caddy's default
        said = (f"{c.caddyfile} names {f'`admin {option}`' if option else 'no admin address'}"
                + ("" if listen != DEFAULT_ADMIN else f", so Caddy's default {DEFAULT_ADMIN}"))
    if option == "off":  # no admin API to load through: only a restart reads the file
        resumed = _resumed(env)
        if resumed is not None:  # a restart would load autosave.json: admin off again
            name, autosave = resumed
            aside = shlex.join(["docker", "exec", name, "mv", autosave, f"{autosave}.bak"])
            return (f"{first}write {line} in place of `admin off` in {c.caddyfile}'s global "
                    f"options ({why}); Caddy's container {name} runs `caddy run --resume`, so "
                    f"a restart loads its last config, {autosave} (admin off again), not "
                    f"{c.caddyfile}: move it aside (`{aside}`; with none, --resume reads "
                    f"--config), then restart Caddy, whose admin API is off (connections to it "
                    f"drop once): `docker restart {name}`; {then}")
        return (f"{first}write {line} in place of `admin off` in {c.caddyfile}'s global "
                f"options ({why}), then restart Caddy, whose admin API is off (connections to "
                f"it drop once): {restart_advice(env)}; {then}")
    if listen is not None and not _same_listener(listen, want):
        address = container_admin_address(listen)
        how = (f"`{shlex.join([*reload, address])}`" if address is not None else
               f"`{shlex.join(reload)} <that address>`, or restart Caddy: "
               f"{restart_advice(env)}")
        edit = (f"write {line} in place of `admin {option}`" if option else f"add {line} to")
        return (f"{first}{edit} in {c.caddyfile}'s global options ({why}) and load it through "
                f"the admin address Caddy listens on now, as {said}: {how}; {then}")
    # the file names admin_url's address already (or was not read): Caddy runs another
    # config, whose admin address the runbook cannot know
    elsewhere = ", where [caddy] admin_url points: Caddy runs another config"
    return (f"{first}{said}" + (elsewhere if listen is not None else "")
            + "; find where Caddy's admin API listens (`ss -ltnxp | grep caddy`, Caddy's log: "
            f"{caddy_command.log_command(env)}) and load {c.caddyfile} through it "
            f"(`{shlex.join(reload)} <that address>`), or restart Caddy: "
            f"{restart_advice(env)}; make sure it has {line} ({why}); {then}")


def _resumed(env: Environment) -> tuple[str, str] | None:
    """(container, its autosave.json) when Caddy runs in a container started with `caddy
    run --resume`. Found by review (MEDIUM): the `admin off` fix (write the admin line,
    restart) looped forever there: the restart loads autosave.json, not --config."""
    from runbook import docker
    from runbook.errors import RunbookError

    name = caddy_command.exec_container(env.caddy.command)
    if name is None:
        return None
    try:
        autosave = docker.resume_autosave(name)
    except RunbookError:
        return None
    return None if autosave is None else (name, autosave)


def restart_advice(env: Environment) -> str:
    """How this host's Caddy is restarted, as its environment says it runs (start_advice's
    counterpart): its systemd unit, or the container `docker exec NAME caddy` names."""
    c = env.caddy
    if c.reload is ReloadMethod.SYSTEMCTL:
        return f"`systemctl restart {c.systemd_unit}`"
    words = list(c.command)
    if words[:2] == ["docker", "exec"] and len(words) >= 4 and not words[2].startswith("-"):
        return f"`docker restart {words[2]}`"
    return "restart it as it was started (`systemctl status caddy`, or its container's `docker ps`)"


def load_advice(env: Environment, running: Any = None) -> str:
    """How on-call makes this host's Caddy load its Caddyfile after an edit, as a command to
    type: its systemd unit's reload; on an admin-api host the POST /load a run makes (found
    by review: [caddy] command is never checked there, and may not run); else `caddy
    reload` through [caddy] command at the admin address Caddy listens on where that command
    runs (reload_address: in Caddy's container, as its running config `running` says); that
    address unknown, the restart that reads the file."""
    c = env.caddy
    if c.reload is ReloadMethod.SYSTEMCTL:
        return f"`systemctl reload {c.systemd_unit}`"
    if c.reload is ReloadMethod.ADMIN_API:  # the load a run makes; nothing checks `command`
        return "`" + shlex.join(["curl", "-fsS", "-X", "POST", "-H", "Content-Type: "
                                 "text/caddyfile", "--data-binary", f"@{c.caddyfile}",
                                 f"{c.admin_url}/load"]) + "`"
    try:
        address, _ = reload_address(env, running, planning=False)
    except CaddyError:
        return f"restart Caddy, which reads the file: {restart_advice(env)}"
    return "`" + shlex.join([*c.command, "reload", "--config", seen_by_caddy(env, c.caddyfile),
                             "--adapter", "caddyfile", "--address", address]) + "`"


def start_advice(env: Environment) -> str:
    """How to start this host's Caddy, as its environment says it runs: the guide's
    `systemctl status caddy` tells why a system Caddy stopped; a Caddy in a container
    (`command = ["docker", "exec", NAME, "caddy"]`) is started with docker."""
    c = env.caddy
    if c.reload is ReloadMethod.SYSTEMCTL:
        return f"start it: `systemctl start {c.systemd_unit}` (`systemctl status " \
               f"{c.systemd_unit}` says why it stopped)"
    words = list(c.command)
    # exactly `docker exec NAME CMD...`: with options (-u root) the name is not told apart
    # from an option's value by position, and a wrong name is worse than none
    if words[:2] == ["docker", "exec"] and len(words) >= 4 and not words[2].startswith("-"):
        return (f"start its container: `docker start {words[2]}` (`docker logs --tail 100 "
                f"{words[2]}` says why it stopped)")
    return ("start Caddy (`systemctl status caddy`, or its container's `docker ps -a`, says "
            "why it stopped)")


def running_problem(env: Environment, *, admin_answered: bool = False) -> Unreloadable | None:
    """Why Caddy cannot take a reload right now, or None when it can. Each question is
    bounded by _ADMIN_TIMEOUT in total: a stuck admin API cannot hold the run.

    `admin_answered`: the caller has just read Caddy's running config from this very admin
    API (HTTP 200, JSON), so the same GET is not sent again; the systemd question still is.
    """
    from runbook import bounded_http

    c = env.caddy
    start = start_advice(env)
    url = f"{c.admin_url}/config/"
    if not admin_answered:
        try:
            answer = bounded_http.request("GET", url, timeout=_ADMIN_TIMEOUT, max_body=None)
        except bounded_http.HttpFailure as exc:
            return admin_unanswered(env, exc.reason) or Unreloadable(
                f"Caddy's admin API at {url} does not answer ({exc.reason})",
                f"{start} (or fix [caddy] admin_url)")
        if answer.status != 200:
            return Unreloadable(f"Caddy's admin API at {url} answered HTTP {answer.status}",
                                f"{start} (or fix [caddy] admin_url)")
    if c.reload is ReloadMethod.SYSTEMCTL:
        unit = c.systemd_unit
        try:
            # SIGHUP ignored: asked inside the switch of a confirmed run, which a closed
            # terminal no longer stops; killed by it, it read as "unit not active" and the
            # switch was undone (found by review)
            done = subprocess.run(
                ["systemctl", "is-active", unit], capture_output=True, text=True,
                timeout=_ADMIN_TIMEOUT, check=False, preexec_fn=procs.outlives_hangup)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Unreloadable(f"cannot ask systemd about {unit}: {exc}",
                                f"check `systemctl status {unit}`", answering=True)
        if done.returncode != 0:
            # the admin API answered: a Caddy runs, started by hand or another supervisor,
            # which `systemctl reload` cannot reach (and `systemctl start` would not replace)
            state = (done.stdout.strip() or done.stderr.strip() or "unknown").splitlines()[0]
            return Unreloadable(
                f"Caddy answers at {c.admin_url}, but systemd unit {unit} is not active "
                f"({state}): `systemctl reload {unit}` cannot reach the Caddy that answers "
                "(started outside that unit, or [caddy] systemd_unit names another one)",
                f"set [caddy] systemd_unit to the unit that runs Caddy (`systemctl status "
                f"caddy`), or reload = \"admin-api\" under [caddy] in "
                f"{env.source or 'the environment file'}", answering=True)
    return None


def is_running(env: Environment) -> bool:
    """Caddy answers on its admin API (and, for the systemctl method, its unit is active)."""
    return running_problem(env) is None


def check_running(env: Environment, *, admin_answered: bool = False) -> None:
    """Raise CaddyNotRunningError unless Caddy can take a reload (see running_problem)."""
    problem = running_problem(env, admin_answered=admin_answered)
    if problem is not None:
        down = "" if problem.answering else "Caddy is not running: "
        raise CaddyNotRunningError(f"{down}{problem.problem}; the Caddyfile was not touched",
                                   f"{problem.fix}, then run again", stage="running")


@dataclass(frozen=True)
class ReloadCommand:
    """How Caddy is made to load the new config, built once from the environment: the plan
    shows `display()`, `reload()` runs the very same request or argv."""

    method: ReloadMethod
    argv: tuple[str, ...] = ()  # `caddy reload ...` or `systemctl reload <unit>`
    url: str = ""  # the admin API's /load (the new Caddyfile is the body): without an ETag
    config_url: str = ""  # the admin API's /config/: the adapted JSON, on If-Match
    note: str = ""  # what the plan says of `--address` when it is not [caddy] admin_url's

    def words(self) -> list[str]:
        if self.method is ReloadMethod.ADMIN_API:
            return ["POST", self.config_url, "If-Match: <ETag of the config checked>"]
        return list(self.argv)

    def display(self, tagged: bool | None = None) -> str:
        """`tagged`: whether Caddy sent an ETag with its config when the plan read it (None:
        not known): with one the load is a compare-and-swap, without it plain /load."""
        if self.method is ReloadMethod.ADMIN_API:
            base = self.config_url.removesuffix("/config/")
            cas = (f"POST {self.config_url} (If-Match: the ETag of the running config the "
                   f"switch checked; body: the new Caddyfile as POST {base}/adapt adapts it; "
                   "Caddy refuses it, 412, when its config changed since)")
            load = (f"POST {self.url} (Content-Type: text/caddyfile; body: the new "
                    "Caddyfile)")
            if tagged is None:
                return f"{cas}, or, from a Caddy that sends no ETag, {load}"
            return cas if tagged else (f"{load}: this Caddy sends no ETag with its config, so "
                                       "a change loaded after the check would be replaced")
        return shlex.join(self.argv)


def reload_command(env: Environment, running: Any = None, *,
                   planning: bool = True) -> ReloadCommand:
    """How the environment makes Caddy load a config. `running`: Caddy's running config as
    the caller read it (None: read here when needed): a `caddy reload` in Caddy's container
    dials the admin address Caddy listens on in there (reload_address). `planning`: False
    in an undo (a refusal then is no "nothing was changed")."""
    c = env.caddy
    if c.reload is ReloadMethod.ADMIN_API:
        return ReloadCommand(c.reload, url=f"{c.admin_url}/load",
                             config_url=f"{c.admin_url}/config/")
    # `caddy reload` and `systemctl reload` POST /load themselves, with no If-Match: they stay
    # as they are (the check before the write is all they get against a change made since)
    if c.reload is ReloadMethod.CADDY_RELOAD:
        address, note = reload_address(env, running, planning=planning)
        return ReloadCommand(c.reload, argv=(
            *c.command, "reload", "--config", seen_by_caddy(env, c.caddyfile),
            "--adapter", "caddyfile", "--address", address), note=note)
    return ReloadCommand(c.reload, argv=("systemctl", "reload", c.systemd_unit))


def reload_action(env: Environment, running: Any = None) -> list[str]:
    """What a reload runs, for --dry-run: an argv, or the admin API request."""
    return reload_command(env, running).words()


def config_etag(answer: Answer) -> str | None:
    """The ETag Caddy sent with its config (GET /config/: in the chunked body's trailer, as
    Caddy 2.6+ sends it; a header too is taken). None from a Caddy that sends none."""
    return answer.header("etag") or answer.trailers.get("etag") or None


def reload(env: Environment, text: str, command: ReloadCommand | None = None, *,
           switch: drain.Switch | None = None, etag: str | None = None,
           seal_wait: float = drain.SEAL_WAIT) -> None:
    """Make Caddy load `text` (already written to the Caddyfile) the way the environment says
    (`command`: the one the plan showed; built here when not given). `switch`: the reading of
    Caddy's port the caller started before (one is started here otherwise). `etag`: the
    ETag of the running config the caller checked: through the admin API the load is then a
    compare-and-swap (CaddyConflictError when Caddy's config changed since); without one,
    `/load`, which replaces whatever runs. `seal_wait`: how long the reload waits for the
    reading of Caddy's port to complete (drain.sending_reload)."""
    command = command or reload_command(env, planning=False)
    # who is on Caddy's port before, and when its old listener leaves after: the drain of
    # the old slot sorts the old config's connections from the new one's (runbook/drain.py)
    switch = switch or drain.before_reload(env.caddy.proxy_url)
    if command.method is ReloadMethod.ADMIN_API and etag is not None:
        body = _adapted(env, text)  # asked before the reload is sent: nothing loads here
        drain.sending_reload(switch, seal_wait)
        _post_load(command.config_url, body, "application/json", if_match=etag)
    else:
        drain.sending_reload(switch, seal_wait)
        _reload(env, text, command)
    drain.after_reload(switch)


def load_running(env: Environment, config: Any, etag: str | None = None) -> None:
    """Load a config Caddy ran (its JSON, as GET /config/ gave it) through the admin API,
    whatever the reload method: the undo of a switch puts back exactly what ran, a route
    loaded through the API during an incident included, not the previous Caddyfile adapted
    again (which never had it). `caddy reload` and systemd's reload POST /load the same way.
    `etag`: the ETag of the config the caller decided on (POST /config/ If-Match it:
    CaddyConflictError when Caddy's config changed since); None: POST /load."""
    import json

    body = json.dumps(config).encode("utf-8")
    switch = drain.before_reload(env.caddy.proxy_url)
    drain.sending_reload(switch)
    if etag is not None:
        _post_load(f"{env.caddy.admin_url}/config/", body, "application/json", if_match=etag)
    else:
        _post_load(f"{env.caddy.admin_url}/load", body, "application/json")
    drain.after_reload(switch)


def _adapted(env: Environment, text: str) -> bytes:
    """Caddyfile `text` as the JSON Caddy would load (POST /adapt, nothing loaded): what
    POST /config/ takes, so the load can carry If-Match (Caddy's /load ignores it)."""
    from runbook import bounded_http

    url = f"{env.caddy.admin_url}/adapt"
    try:
        answer = _post_caddyfile(env, "adapt", text, _COMMAND_TIMEOUT)
    except bounded_http.HttpFailure as exc:
        raise CaddyError(f"reload through {url} failed ({exc.reason})",
                         "check that Caddy is running", stage="reload") from None
    if answer.status >= 400:
        raise CaddyError(f"Caddy rejected the config (HTTP {answer.status} from {url}): "
                         f"{_admin_error(answer)}", "Caddy keeps its old config on a "
                         "rejected load", stage="reload")
    try:
        body = answer.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or "result" not in body:
        raise CaddyError(f"Caddy's {url} did not answer the adapted config (JSON with a "
                         "result)", "check [caddy] admin_url points at Caddy's admin API",
                         stage="reload")
    import json

    return json.dumps(body["result"]).encode("utf-8")


def _post_load(url: str, body: bytes, content_type: str, *,
               if_match: str | None = None) -> None:
    from runbook import bounded_http

    headers = {"Content-Type": content_type}
    if if_match is not None:
        headers["If-Match"] = if_match
    try:
        answer = bounded_http.request("POST", url, timeout=_COMMAND_TIMEOUT, content=body,
                                      headers=headers, max_body=None)
    except bounded_http.HttpFailure as exc:
        raise CaddyError(f"reload through {url} failed ({exc.reason})",
                         "check that Caddy is running", stage="reload") from None
    if answer.status == 412 and if_match is not None:
        parts = urlsplit(url)
        raise CaddyConflictError(
            f"Caddy's config changed after it was checked (HTTP 412 from {url}: If-Match "
            f"{if_match} no longer matches): another change was loaded into Caddy in "
            "between (another environment sharing it, or its admin API), which this load "
            "would have dropped; Caddy refused it, so nothing was loaded",
            f"see who changed Caddy (`curl {parts.scheme}://{parts.netloc}/config/`), then "
            "run the command again: its plan shows the change", stage="reload")
    if answer.status >= 400:
        raise CaddyError(f"Caddy rejected the config (HTTP {answer.status} from "
                         f"{url}): {_admin_error(answer)}",
                         "Caddy keeps its old config on a rejected load", stage="reload")


def _reload(env: Environment, text: str, command: ReloadCommand) -> None:
    if command.method is ReloadMethod.ADMIN_API:
        _post_load(command.url, text.encode("utf-8"), "text/caddyfile")
        return
    argv = list(command.argv)
    done = _run(argv, "reload Caddy", "reload")
    if done.returncode != 0:
        # Caddy in a container logs there, not in a systemd unit's journal (found by review)
        fix = (f"check {caddy_command.log_command(env)} (Caddy's log)"
               if caddy_command.runs_in_container(env)
               else "check `journalctl -u caddy` or Caddy's log")
        raise CaddyError(f"{shlex.join(argv)} exited {done.returncode}:\n    "
                         f"{_tail((done.stdout or '') + (done.stderr or ''))}", fix,
                         stage="reload")


def _admin_error(answer: Answer) -> str:
    """Caddy's error, masked before it is cut (a cut secret matches nothing that masks it)."""
    from runbook.redact import redact

    try:
        body: Any = answer.json()
    except ValueError:
        return redact(answer.text.strip())[:500] or "(empty body)"
    if isinstance(body, dict) and "error" in body:
        return redact(str(body["error"]))[:500]
    return redact(str(body))[:500]


def write_atomically(path: Path, data: bytes, mode: int | None = None,
                     like: Path | None = None) -> str | None:
    """Readers see the old or the new file, never half; mode and owner are kept (or the line
    saying which of owner and group could not be: only root may give a file away). `mode`:
    a copy's, from its first byte (files.atomic_write); `like`: a new copy's owner and group
    (its source's, where this user may give them)."""
    return files.atomic_write(path, data, mode=mode, like=like)




@dataclass(frozen=True)
class VerifyResult:
    """What the proxy answered on the last attempt."""

    ok: bool
    url: str
    target: Slot
    expected_version: str | None
    attempts: int
    http_status: int | None = None
    slot_header: str | None = None
    version: str | None = None
    error: str | None = None
    elapsed: float = 0.0

    def describe(self) -> str:
        if self.ok:
            return (f"{self.url} answered from slot {self.slot_header}, version {self.version} "
                    f"(attempt {self.attempts}, {self.elapsed:.2f}s)")
        seen = (f"HTTP {self.http_status}, {SLOT_HEADER}={self.slot_header or '(none)'}, "
                f"version={self.version or '(none)'}" if self.http_status is not None
                else "no answer")
        want = f"slot {self.target}" + (f" version {self.expected_version}"
                                        if self.expected_version else "")
        detail = f"; {self.error}" if self.error else ""
        return (f"{self.url} did not answer as {want} after {self.attempts} attempt(s) "
                f"in {self.elapsed:.1f}s: last saw {seen}{detail}")


QUICK_RETRIES = (0.02, 0.05, 0.1)  # pauses before the regular cadence, for `quick=True`


VERIFY_TIMEOUT = 3.0  # seconds per attempt at least; [health] request_timeout_seconds if more


def verify(env: Environment, target: Slot | SlotConfig | str, expected_version: str | None,
           *, attempts: int = 10, interval: float = 0.3, timeout: float | None = None,
           quick: bool = False) -> VerifyResult:
    """Ask through Caddy who answers. A fresh connection per attempt, because a kept-alive one
    can still reach the old upstream or be reset exactly at a reload. `timeout` bounds each
    attempt's answer in total (body included; by default the larger of VERIFY_TIMEOUT and
    the environment's health request timeout), and as much again its /health samples
    (`slot_elsewhere`), so the whole check ends within attempts x (2 x timeout + interval)
    whatever the proxy does.

    `quick` (the switch, before the commit): a first answer from the old config right after a
    reload is retried after 20, 50 and 100 ms before the regular `interval`; those retries
    are extra attempts, so the window the proxy gets only grows.
    """
    slot = target.slot if isinstance(target, SlotConfig) else Slot(target)
    # an app that answers slowly (a cold start) was undone after ~40 s whatever
    # request_timeout_seconds said, and the undo's own verify then failed the same way
    timeout = timeout if timeout is not None else max(VERIFY_TIMEOUT,
                                                      env.health.request_timeout)
    url = f"{env.caddy.proxy_url}{env.caddy.verify_path}"
    began = time.monotonic()
    result = VerifyResult(False, _shown(env, url), slot, expected_version, 0)
    pauses = [p for p in QUICK_RETRIES if p < interval] if quick else []
    pauses += [interval] * (max(1, attempts) - 1)
    for attempt in range(1, len(pauses) + 2):
        result = _verify_once(url, slot, expected_version, attempt, timeout, began,
                              env.caddy.site, _ca_file(env))
        result = dataclasses.replace(result, url=_shown(env, url))
        if result.ok and (elsewhere := slot_elsewhere(env, slot, timeout)) is not None:
            result = dataclasses.replace(result, ok=False, error=elsewhere,
                                         elapsed=time.monotonic() - began)
        if result.ok:
            return result
        if attempt <= len(pauses):
            time.sleep(pauses[attempt - 1])
    return result


HEALTH_SAMPLES = 4  # /health answers through the proxy whose body's slot verify compares


def slot_elsewhere(env: Environment, slot: Slot, budget: float) -> str | None:
    """Why not every answer through the proxy comes from `slot`, as the /health body's own
    `slot` says (when it says one): None when none names another. Why: the slot header is
    the managed block's header_down, which stamps every answer with the slot the switch
    wrote, whoever answered; a reverse_proxy pool with an upstream the switch does not move
    (a slot's container address beside localhost:<port>) sent every other request to the
    old slot while the header said the new one (found by review). Several fresh requests at
    once (a round-robin pool shows both; one slow /health costs its time once), each within
    `budget` seconds. An answer that cannot be read, or names no slot (a minimal /health),
    says nothing either way."""
    from concurrent.futures import ThreadPoolExecutor

    from runbook import bounded_http

    url = f"{env.caddy.proxy_url}{env.health.path}"

    def ask(_: int) -> str | None:
        try:
            answer = bounded_http.request("GET", url, timeout=budget,
                                          headers={"Cache-Control": "no-cache"},
                                          site=env.caddy.site, ca_file=_ca_file(env))
            body = answer.json()
        except (bounded_http.HttpFailure, ValueError, UnicodeDecodeError, RecursionError):
            return None
        # as the gate reads it ("BLUE", "blue\n" are blue: a raw compare failed every verify
        # of such an app, and so its undo: found by review); another word names no slot
        said = health.build_key(body.get("slot")) if isinstance(body, dict) else None
        return said if said in {str(s) for s in Slot} else None

    with ThreadPoolExecutor(HEALTH_SAMPLES, thread_name_prefix="slot-elsewhere") as pool:
        seen = [s for s in pool.map(ask, range(HEALTH_SAMPLES)) if s is not None]
    other = sorted({s for s in seen if s != slot.value})
    if not other:
        return None
    return (f"GET {_shown(env, url)} answered from {' and '.join(other)} (the /health body's "
            f"slot) in {sum(s != slot.value for s in seen)} of {len(seen)} answers: Caddy "
            f"sends part of the traffic elsewhere while every answer's {SLOT_HEADER} says "
            f"{slot} (a reverse_proxy pool with an upstream the switch does not move?)")


def slot_header_problem(env: Environment, target: Slot, *, attempts: int = 5,
                        interval: float = 0.3) -> str | None:
    """Why verification could not tell `target` from the other slot when the managed block
    sets no slot header: then only the app's own answer can carry it, so the slot is asked
    directly, on the path verification asks, as verification asks it (the site's name, the
    same time per attempt, a few attempts: a slot just started may be slow). None when it
    sends `X-Togather-Slot: <target>`; anything else is a reason, so the switch fails closed."""
    from runbook import bounded_http

    url = f"{env.slot(target).base_url}{env.caddy.verify_path}"
    timeout = max(VERIFY_TIMEOUT, env.health.request_timeout)
    problem = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(interval)
        try:
            answer = bounded_http.request("GET", url, timeout=timeout, site=env.caddy.site)
        except bounded_http.HttpFailure as exc:
            problem = f"the {target} slot did not answer GET {url} ({exc.reason})"
            continue
        header = answer.header(SLOT_HEADER)
        if header == target.value:
            return None
        sent = f"{SLOT_HEADER}: {header}" if header else f"carries no {SLOT_HEADER}"
        problem = f"the {target} slot's own answer to GET {url} {sent}"
        if answer.status < 500:
            break  # an answer, not a slot still starting: asking again changes nothing
    return problem


def no_slot_header(env: Environment, serving: Slot | None, why: str) -> CaddyError:
    """The refusal of a switch no verification could see, before anything moves: written,
    it would fail to verify and be undone, the users moved to the target and back (and the
    undo's own verification failing the same way)."""
    return CaddyError(
        f"no header_down {SLOT_HEADER} between the slot markers of {env.caddy.caddyfile}, and "
        f"{why}: verification through the proxy could not tell the slots apart, so a switch "
        "would be undone; traffic was not moved",
        f"add header_down {SLOT_HEADER} \"{serving or '<serving slot>'}\" inside each "
        "reverse_proxy between the markers (the switch rewrites it), reload Caddy, then run "
        "again", exit_code=ExitCode.PRECONDITION, stage="verify")


def _ca_file(env: Environment) -> str | None:
    return None if env.caddy.ca_file is None else str(env.caddy.ca_file)


def _shown(env: Environment, url: str) -> str:
    """The verification URL as messages name it: with the site asked for, when one is."""
    return f"{url} (Host: {env.caddy.site})" if env.caddy.site else url


def _verify_once(url: str, slot: Slot, expected: str | None, attempt: int, timeout: float,
                 began: float, site: str | None = None,
                 ca_file: str | None = None) -> VerifyResult:
    def done(ok: bool, **seen: Any) -> VerifyResult:
        return VerifyResult(ok, url, slot, expected, attempt,
                            elapsed=time.monotonic() - began, **seen)

    from runbook import bounded_http

    try:
        response = bounded_http.request("GET", url, timeout=timeout,
                                        headers={"Cache-Control": "no-cache"}, site=site,
                                        ca_file=ca_file)
    except bounded_http.HttpFailure as exc:
        return done(False, error=exc.reason)
    header = response.header(SLOT_HEADER)
    version: str | None = None
    commit: str | None = None
    error: str | None = None
    try:
        body = response.json()
        if isinstance(body, dict):
            version = None if body.get("version") is None else str(body["version"])
            commit = None if body.get("git_commit") is None else str(body["git_commit"])
        else:
            error = "the body is not a JSON object"
    except (ValueError, UnicodeDecodeError, RecursionError):
        error = "the body is not JSON"
    seen: dict[str, Any] = {"http_status": response.status, "slot_header": header,
                            "version": version}
    if 300 <= response.status < 400:
        location = response.header("location") or "?"
        hint = ("; Caddy sends the site to https: set [caddy] proxy_url = "
                "\"https://localhost\"" if location.startswith("https://") else "")
        return done(False, error=f"HTTP {response.status} redirect to {location}{hint}", **seen)
    if response.status != 200:
        return done(False, error=error or f"HTTP {response.status}", **seen)
    if header != slot.value:
        return done(False, error=error or f"{SLOT_HEADER} is {header!r}, not {slot.value!r}",
                    **seen)
    if expected is not None and health.names_build(expected, version, commit) is not True:
        return done(False, error=error or f"version is {version!r}, not {expected!r}", **seen)
    return done(True, **seen)


# --------------------------------------------------------------------------------------------
