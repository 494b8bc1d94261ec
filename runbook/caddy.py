"""The Caddy adapter: point the managed Caddyfile block at a slot, prove it, or put it back.

Only the text between the `# BLUE_GREEN_SLOT_START` and `# BLUE_GREEN_SLOT_END` comment lines is
ever changed; everything else (other sites, CRLF line ends, comments) survives byte for byte.
A switch refuses to touch anything while Caddy is down (the old tooling "succeeded" then), and
any failure after the write restores the previous file and reloads it.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from runbook import files
from runbook.environment import Environment, ReloadMethod, Slot, SlotConfig
from runbook.errors import ExitCode, RunbookError

if TYPE_CHECKING:
    from runbook.bounded_http import Answer

START_MARKER = "# BLUE_GREEN_SLOT_START"
END_MARKER = "# BLUE_GREEN_SLOT_END"
SLOT_HEADER = "X-Togather-Slot"

_START_RE = re.compile(r"#\s*BLUE_GREEN_SLOT_START")
_END_RE = re.compile(r"#\s*BLUE_GREEN_SLOT_END")
# [scheme://]host[:port]; a host is a name, an IPv4 address or a bracketed IPv6 address.
_UPSTREAM_RE = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?(?P<host>\[[0-9A-Fa-f:.%]+\]|[^\s:/\[\]{}]+)"
    r"(?::(?P<port>\d{1,5}))?$"
)
_MATCHER_PREFIXES = ("@", "/", "*")
_COMMAND_TIMEOUT = 60.0
_ADMIN_TIMEOUT = 10.0


class CaddyError(RunbookError):
    """A Caddy step failed. `restored` tells whether the previous config is back in place."""

    exit_code = ExitCode.FAILED_SAFELY

    def __init__(self, message: str, fix: str | None = None, *,
                 exit_code: ExitCode | None = None, stage: str | None = None,
                 restored: bool | None = None, backup: Path | None = None) -> None:
        super().__init__(message, fix, exit_code=exit_code)
        self.stage = stage
        self.restored = restored
        self.backup = backup


class CaddyNotRunningError(CaddyError):
    """Caddy (or its admin API) does not answer: nothing may be written or reloaded.

    A precondition (exit 4): it is found before anything changes.
    """

    exit_code = ExitCode.PRECONDITION


# --------------------------------------------------------------------------------------------
# Pure text functions
# --------------------------------------------------------------------------------------------

def find_block(text: str) -> tuple[int, int]:
    """Offsets (start, end) of the managed block: text[start:end] is everything between the
    marker lines, which themselves stay outside so they are never rewritten."""
    starts: list[tuple[int, int, int]] = []  # (line number, line start, line end incl. newline)
    ends: list[tuple[int, int, int]] = []
    offset = 0
    for number, line in enumerate(text.split("\n"), start=1):
        line_end = offset + len(line) + 1  # past the "\n" (one past len(text) on the last line)
        has_start, has_end = bool(_START_RE.search(line)), bool(_END_RE.search(line))
        if has_start and has_end:
            raise CaddyError(f"line {number} holds both {START_MARKER} and {END_MARKER}",
                             "put each marker on its own comment line")
        if has_start:
            starts.append((number, offset, line_end))
        if has_end:
            ends.append((number, offset, line_end))
        offset = line_end
    fix = (f"the managed block must be delimited by exactly one '{START_MARKER}' line and, "
           f"below it, exactly one '{END_MARKER}' line")
    if not starts or not ends:
        missing = " and ".join(m for m, found in ((START_MARKER, starts), (END_MARKER, ends))
                               if not found)
        raise CaddyError(f"the Caddyfile has no {missing} marker line", fix)
    if len(starts) > 1 or len(ends) > 1:
        lines = ", ".join(str(n) for n, _, _ in sorted(starts + ends))
        raise CaddyError(f"the Caddyfile has duplicated slot markers (lines {lines})", fix)
    (start_no, _, start_after), (end_no, end_at, _) = starts[0], ends[0]
    if end_no < start_no:
        raise CaddyError(f"{END_MARKER} (line {end_no}) comes before {START_MARKER} "
                         f"(line {start_no})", fix)
    return min(start_after, len(text)), end_at


@dataclass(frozen=True)
class _Token:
    start: int
    end: int
    text: str

    @property
    def quote(self) -> str:
        return self.text[0] if self.text[:1] in ('"', "`") else ""

    @property
    def value(self) -> str:
        q = self.quote
        return self.text[1:-1] if q and len(self.text) >= 2 and self.text.endswith(q) else self.text


def _tokenize(line: str) -> list[_Token]:
    """Caddyfile tokens of one line with their offsets; `#` at a token start begins a comment."""
    tokens: list[_Token] = []
    i, n = 0, len(line)
    while i < n:
        if line[i].isspace():
            i += 1
            continue
        if line[i] == "#":
            break
        start = i
        if line[i] in ('"', "`"):
            quote = line[i]
            i += 1
            while i < n and line[i] != quote:
                i += 2 if line[i] == "\\" and quote == '"' else 1
            i = min(i + 1, n)
        else:
            while i < n and not line[i].isspace():
                i += 1
        tokens.append(_Token(start, i, line[start:i]))
    return tokens


@dataclass(frozen=True)
class Upstream:
    """One reverse_proxy upstream inside the markers."""

    line: int  # 1-based line number in the whole Caddyfile
    text: str  # as written, without quotes
    host: str | None
    port: int | None
    slot: Slot | None  # the slot whose port this is, if any


@dataclass(frozen=True)
class SlotHeader:
    """One `header_down X-Togather-Slot <value>` inside the markers."""

    line: int
    value: str
    slot: Slot | None


@dataclass(frozen=True)
class _Edit:
    line_index: int
    token: _Token
    kind: str  # "upstream" | "header"
    scheme: str = ""
    host: str = ""


@dataclass(frozen=True)
class _Parsed:
    upstreams: tuple[Upstream, ...]
    headers: tuple[SlotHeader, ...]
    edits: tuple[_Edit, ...]
    unsupported: tuple[str, ...]


def _slot_by_port(env: Environment) -> dict[int, Slot]:
    return {cfg.port: slot for slot, cfg in env.slots.items()}


def _header_name(token: str) -> str:
    return token.lstrip("+>").lower()


def _parse_block(block: str, first_line: int, env: Environment) -> _Parsed:
    """Find every upstream and slot header in the block, remembering where each token sits."""
    ports = _slot_by_port(env)
    upstreams: list[Upstream] = []
    headers: list[SlotHeader] = []
    edits: list[_Edit] = []
    unsupported: list[str] = []
    stack: list[str] = []  # directive names of the open `{` blocks
    wanted = SLOT_HEADER.lower()
    for index, line in enumerate(block.split("\n")):
        number = first_line + index
        tokens = _tokenize(line)
        if not tokens:
            continue
        first = tokens[0].value
        if first == "}":
            if stack:
                stack.pop()
            continue
        opens = tokens[-1].text == "{"
        args = tokens[1:-1] if opens else tokens[1:]
        parent = stack[-1] if stack else ""
        candidates: list[_Token] = []
        if first == "reverse_proxy":
            if args and args[0].value.startswith(_MATCHER_PREFIXES):
                args = args[1:]
            candidates = args
        elif first == "to" and parent == "reverse_proxy":
            candidates = args
        elif first in ("header_down", "header"):
            if first == "header" and args and args[0].value.startswith(_MATCHER_PREFIXES):
                args = args[1:]
            if args and _header_name(args[0].value) == wanted:
                if len(args) == 2:
                    value = args[1].value
                    headers.append(SlotHeader(number, value, _as_slot(value)))
                    edits.append(_Edit(index, args[1], "header"))
                else:
                    unsupported.append(f"line {number}: unsupported {first} form "
                                       f"{' '.join(t.text for t in tokens)!r}")
        elif parent == "header" and _header_name(first) == wanted and len(tokens) == 2:
            # header { X-Togather-Slot "blue" }
            value = tokens[1].value
            headers.append(SlotHeader(number, value, _as_slot(value)))
            edits.append(_Edit(index, tokens[1], "header"))
        for token in candidates:
            match = _UPSTREAM_RE.match(token.value)
            if match is None:
                unsupported.append(f"line {number}: upstream {token.value!r} is not host:port "
                                   "(placeholders and unix sockets cannot be switched)")
                upstreams.append(Upstream(number, token.value, None, None, None))
                continue
            port = int(match["port"]) if match["port"] else None
            upstreams.append(Upstream(number, token.value, match["host"], port,
                                      ports.get(port) if port is not None else None))
            edits.append(_Edit(index, token, "upstream", match["scheme"] or "", match["host"]))
        if opens:
            stack.append(first)
    return _Parsed(tuple(upstreams), tuple(headers), tuple(edits), tuple(unsupported))


def _as_slot(value: str) -> Slot | None:
    try:
        return Slot(value)
    except ValueError:
        return None


def _first_line(text: str, start: int) -> int:
    return text.count("\n", 0, start) + 1


@dataclass(frozen=True)
class Inspection:
    """What the managed block points at, and why it cannot be trusted when it cannot."""

    ports: tuple[int, ...]  # distinct upstream ports, in order of appearance
    header_slots: tuple[str, ...]  # X-Togather-Slot values, in order of appearance
    consistent: bool
    problems: tuple[str, ...]
    slot: Slot | None  # the one slot everything names; None when inconsistent
    upstreams: tuple[Upstream, ...] = ()
    headers: tuple[SlotHeader, ...] = ()
    warnings: tuple[str, ...] = ()


def inspect(text: str, env: Environment) -> Inspection:
    """Read the managed block: which ports and slot headers it names, and whether they agree."""
    start, end = find_block(text)
    parsed = _parse_block(text[start:end], _first_line(text, start), env)
    known = ", ".join(f"{s} ({c.port})" for s, c in sorted(env.slots.items()))
    problems: list[str] = list(parsed.unsupported)
    warnings: list[str] = []
    named: dict[Slot, list[str]] = {}
    if not parsed.upstreams:
        problems.append("no reverse_proxy upstream between the slot markers")
    for up in parsed.upstreams:
        if up.host is None:
            continue
        if up.port is None:
            problems.append(f"line {up.line}: upstream {up.text!r} has no port")
        elif up.slot is None:
            problems.append(f"line {up.line}: upstream {up.text} targets port {up.port}, "
                            f"which is no slot's port (known: {known})")
        else:
            named.setdefault(up.slot, []).append(f"upstream {up.text} (line {up.line})")
    for header in parsed.headers:
        if header.slot is None:
            problems.append(f"line {header.line}: {SLOT_HEADER} header says {header.value!r}, "
                            "which is not blue or green")
        else:
            named.setdefault(header.slot, []).append(
                f"{SLOT_HEADER} {header.value} (line {header.line})")
    if not parsed.headers:
        warnings.append(f"no header_down {SLOT_HEADER} between the slot markers: verification "
                        "through the proxy cannot tell the slots apart")
    if len(named) > 1:
        problems.append("the managed block names both slots: " + "; ".join(
            f"{slot}: {', '.join(where)}" for slot, where in sorted(named.items())))
    slot = next(iter(named)) if len(named) == 1 and not problems else None
    ports = tuple(dict.fromkeys(u.port for u in parsed.upstreams if u.port is not None))
    return Inspection(
        ports=ports, header_slots=tuple(h.value for h in parsed.headers),
        consistent=slot is not None, problems=tuple(problems), slot=slot,
        upstreams=parsed.upstreams, headers=parsed.headers, warnings=tuple(warnings),
    )


def active_slot(text: str, env: Environment) -> Slot | None:
    """The slot the managed block points at, or None when it is inconsistent (see inspect)."""
    return inspect(text, env).slot


def rewrite(text: str, env: Environment, target: Slot | str) -> str:
    """Point every upstream and slot header inside the markers at `target`; bytes outside the
    markers, and everything inside but those tokens, are returned unchanged."""
    target = Slot(target)
    port = env.slot(target).port
    start, end = find_block(text)
    block = text[start:end]
    parsed = _parse_block(block, _first_line(text, start), env)
    if parsed.unsupported:
        raise CaddyError("cannot rewrite the managed block: " + "; ".join(parsed.unsupported),
                         "use plain host:port upstreams between the slot markers")
    if not parsed.upstreams:
        raise CaddyError("no reverse_proxy upstream between the slot markers: nothing to switch",
                         "put the reverse_proxy directive(s) for the app between the markers")
    lines = block.split("\n")
    by_line: dict[int, list[_Edit]] = {}
    for edit in parsed.edits:
        by_line.setdefault(edit.line_index, []).append(edit)
    for index, edits in by_line.items():
        line = lines[index]
        for edit in sorted(edits, key=lambda e: e.token.start, reverse=True):
            q = edit.token.quote
            value = (f"{edit.scheme}{edit.host}:{port}" if edit.kind == "upstream"
                     else str(target))
            line = line[:edit.token.start] + f"{q}{value}{q}" + line[edit.token.end:]
        lines[index] = line
    return text[:start] + "\n".join(lines) + text[end:]


def unified_diff(old: str, new: str, path: str | Path) -> str:
    """A unified diff for --dry-run output ('' when nothing changes)."""
    def lines(text: str) -> list[str]:
        out = text.splitlines(keepends=True)
        if out and not out[-1].endswith(("\n", "\r")):
            out[-1] += "\n\\ No newline at end of file\n"
        return out

    return "".join(difflib.unified_diff(lines(old), lines(new), f"{path} (current)",
                                        f"{path} (after switch)"))


# --------------------------------------------------------------------------------------------
# Side effects: read, validate, reload, verify
# --------------------------------------------------------------------------------------------

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


def _run(argv: list[str], what: str, stage: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False)
    except FileNotFoundError:
        raise CaddyError(f"cannot {what}: command {argv[0]!r} not found",
                         "install it or set [caddy] command in the environment file",
                         stage=stage) from None
    except subprocess.TimeoutExpired:
        raise CaddyError(f"cannot {what}: {' '.join(argv)} did not finish within "
                         f"{_COMMAND_TIMEOUT:.0f}s", "check that Caddy is responsive",
                         stage=stage) from None


def _tail(output: str, lines: int = 12) -> str:
    """The lines worth showing: Caddy's `Error:` lines if any, else the last few."""
    kept = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in kept if line.lstrip().startswith("Error")]
    kept = (errors or kept)[-lines:]
    return "\n    ".join(kept) if kept else "(no output)"


@contextlib.contextmanager
def _sibling_temp(path: Path, tag: str) -> Iterator[tuple[int, Path]]:
    """A hidden temp file beside `path` (Caddy's `import` globs skip dot files), always removed."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.runbook-{tag}-",
                                suffix=".tmp")
    tmp = Path(name)
    try:
        yield fd, tmp
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


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


def validate(env: Environment, text: str) -> str:
    """Have Caddy itself check a candidate config; returns its warnings/output, raises when
    rejected. Nothing is loaded or written (for `caddy validate`, the candidate sits in a
    temp file beside the Caddyfile so relative imports resolve the same way and a
    containerised Caddy, the directory bind-mounted at the same path, can read it)."""
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
        raise CaddyError(f"Caddy rejected the new Caddyfile (caddy validate exited "
                         f"{done.returncode}):\n    {_tail(output)}",
                         f"fix the managed block in {path}; nothing was changed",
                         stage="validate")
    return output


def _post_caddyfile(env: Environment, endpoint: str, text: str,
                    timeout: float) -> Answer:
    """POST Caddyfile text to the admin API (`/adapt` or `/load`); raises HttpFailure."""
    from runbook import bounded_http

    return bounded_http.request("POST", f"{env.caddy.admin_url}/{endpoint}", timeout=timeout,
                                content=text.encode("utf-8"),
                                headers={"Content-Type": "text/caddyfile"}, max_body=None)


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
        raise CaddyError(f"Caddy rejected the new Caddyfile (HTTP {answer.status} from {url}): "
                         f"{_admin_error(answer)}",
                         f"fix the managed block in {env.caddy.caddyfile}; nothing was changed",
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


def running_problem(env: Environment, *, admin_answered: bool = False) -> str | None:
    """Why Caddy cannot take a reload right now, or None when it can. Each question is
    bounded by _ADMIN_TIMEOUT in total: a stuck admin API cannot hold the run.

    `admin_answered`: the caller has just read Caddy's running config from this very admin
    API (HTTP 200, JSON), so the same GET is not sent again; the systemd question still is.
    """
    from runbook import bounded_http

    url = f"{env.caddy.admin_url}/config/"
    if not admin_answered:
        try:
            answer = bounded_http.request("GET", url, timeout=_ADMIN_TIMEOUT, max_body=None)
        except bounded_http.HttpFailure as exc:
            return f"Caddy's admin API at {url} does not answer ({exc.reason})"
        if answer.status != 200:
            return f"Caddy's admin API at {url} answered HTTP {answer.status}"
    if env.caddy.reload is ReloadMethod.SYSTEMCTL:
        unit = env.caddy.systemd_unit
        try:
            done = subprocess.run(
                ["systemctl", "is-active", unit], capture_output=True, text=True,
                timeout=_ADMIN_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"cannot ask systemd about {unit}: {exc}"
        if done.returncode != 0:
            state = (done.stdout.strip() or done.stderr.strip() or "unknown").splitlines()[0]
            return f"systemd unit {unit} is not active ({state})"
    return None


def is_running(env: Environment) -> bool:
    """Caddy answers on its admin API (and, for the systemctl method, its unit is active)."""
    return running_problem(env) is None


def check_running(env: Environment, *, admin_answered: bool = False) -> None:
    """Raise CaddyNotRunningError unless Caddy can take a reload (see running_problem)."""
    problem = running_problem(env, admin_answered=admin_answered)
    if problem is not None:
        start = (f"systemctl start {env.caddy.systemd_unit}"
                 if env.caddy.reload is ReloadMethod.SYSTEMCTL else "start Caddy")
        raise CaddyNotRunningError(
            f"Caddy is not running: {problem}; the Caddyfile was not touched",
            f"{start} (or fix [caddy] admin_url), then run again", stage="running")


@dataclass(frozen=True)
class ReloadCommand:
    """How Caddy is made to load the new config, built once from the environment: the plan
    shows `display()`, `reload()` runs the very same request or argv."""

    method: ReloadMethod
    argv: tuple[str, ...] = ()  # `caddy reload ...` or `systemctl reload <unit>`
    url: str = ""  # the admin API's /load (the new Caddyfile is the body)

    def words(self) -> list[str]:
        if self.method is ReloadMethod.ADMIN_API:
            return ["POST", self.url, "Content-Type: text/caddyfile"]
        return list(self.argv)

    def display(self) -> str:
        if self.method is ReloadMethod.ADMIN_API:
            return f"POST {self.url} (Content-Type: text/caddyfile; body: the new Caddyfile)"
        import shlex

        return shlex.join(self.argv)


def reload_command(env: Environment) -> ReloadCommand:
    c = env.caddy
    if c.reload is ReloadMethod.ADMIN_API:
        return ReloadCommand(c.reload, url=f"{c.admin_url}/load")
    if c.reload is ReloadMethod.CADDY_RELOAD:
        return ReloadCommand(c.reload, argv=(
            *c.command, "reload", "--config", seen_by_caddy(env, c.caddyfile),
            "--adapter", "caddyfile", "--address", admin_address(env)))
    return ReloadCommand(c.reload, argv=("systemctl", "reload", c.systemd_unit))


def reload_action(env: Environment) -> list[str]:
    """What a reload runs, for --dry-run: an argv, or the admin API request."""
    return reload_command(env).words()


def reload(env: Environment, text: str, command: ReloadCommand | None = None) -> None:
    """Make Caddy load `text` (already written to the Caddyfile) the way the environment says
    (`command`: the one the plan showed; built here when not given)."""
    command = command or reload_command(env)
    if command.method is ReloadMethod.ADMIN_API:
        from runbook import bounded_http

        url = command.url
        try:
            answer = bounded_http.request("POST", url, timeout=_COMMAND_TIMEOUT,
                                          content=text.encode("utf-8"),
                                          headers={"Content-Type": "text/caddyfile"},
                                          max_body=None)
        except bounded_http.HttpFailure as exc:
            raise CaddyError(f"reload through {url} failed ({exc.reason})",
                             "check that Caddy is running", stage="reload") from None
        if answer.status >= 400:
            raise CaddyError(f"Caddy rejected the config (HTTP {answer.status} from "
                             f"{url}): {_admin_error(answer)}",
                             "Caddy keeps its old config on a rejected load", stage="reload")
        return
    argv = list(command.argv)
    done = _run(argv, "reload Caddy", "reload")
    if done.returncode != 0:
        raise CaddyError(f"{' '.join(argv)} exited {done.returncode}:\n    "
                         f"{_tail((done.stdout or '') + (done.stderr or ''))}",
                         "check `journalctl -u caddy` or Caddy's log", stage="reload")


def _admin_error(answer: Answer) -> str:
    try:
        body: Any = answer.json()
    except ValueError:
        return answer.text.strip()[:500] or "(empty body)"
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])[:500]
    return str(body)[:500]


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old or the new file, never half; mode and owner are kept."""
    files.atomic_write(path, data)


def apply(env: Environment, text: str) -> None:
    """Write the Caddyfile and reload Caddy. Refuses, before writing, when Caddy is down.

    It does not undo a failed reload: switch() does, because it holds the previous text.
    """
    check_running(env)
    path = env.caddy.caddyfile
    try:
        write_atomically(path, text.encode("utf-8"))
    except OSError as exc:
        raise CaddyError(f"cannot write {path}: {exc.strerror}; it was left unchanged",
                         "check the file's directory permissions (run as root?)",
                         stage="write") from None
    reload(env, text)


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


def verify(env: Environment, target: Slot | SlotConfig | str, expected_version: str | None,
           *, attempts: int = 10, interval: float = 0.3, timeout: float = 3.0,
           quick: bool = False) -> VerifyResult:
    """Ask through Caddy who answers. A fresh connection per attempt, because a kept-alive one
    can still reach the old upstream or be reset exactly at a reload. `timeout` bounds each
    attempt in total (body included), so the whole check ends within
    attempts x (timeout + interval) whatever the proxy does.

    `quick` (the switch, before the commit): a first answer from the old config right after a
    reload is retried after 20, 50 and 100 ms before the regular `interval`; those retries
    are extra attempts, so the window the proxy gets only grows.
    """
    slot = target.slot if isinstance(target, SlotConfig) else Slot(target)
    url = f"{env.caddy.proxy_url}{env.caddy.verify_path}"
    began = time.monotonic()
    result = VerifyResult(False, url, slot, expected_version, 0)
    pauses = [p for p in QUICK_RETRIES if p < interval] if quick else []
    pauses += [interval] * (max(1, attempts) - 1)
    for attempt in range(1, len(pauses) + 2):
        result = _verify_once(url, slot, expected_version, attempt, timeout, began)
        if result.ok:
            return result
        if attempt <= len(pauses):
            time.sleep(pauses[attempt - 1])
    return result


def _verify_once(url: str, slot: Slot, expected: str | None, attempt: int, timeout: float,
                 began: float) -> VerifyResult:
    def done(ok: bool, **seen: Any) -> VerifyResult:
        return VerifyResult(ok, url, slot, expected, attempt,
                            elapsed=time.monotonic() - began, **seen)

    from runbook import bounded_http

    try:
        response = bounded_http.request("GET", url, timeout=timeout,
                                        headers={"Cache-Control": "no-cache"})
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
    except (ValueError, UnicodeDecodeError):
        error = "the body is not JSON"
    seen: dict[str, Any] = {"http_status": response.status, "slot_header": header,
                            "version": version}
    if response.status != 200:
        return done(False, error=error or f"HTTP {response.status}", **seen)
    if header != slot.value:
        return done(False, error=error or f"{SLOT_HEADER} is {header!r}, not {slot.value!r}",
                    **seen)
    if expected is not None and expected not in (version, commit):
        return done(False, error=error or f"version is {version!r}, not {expected!r}", **seen)
    return done(True, **seen)


# --------------------------------------------------------------------------------------------
# The switch
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SwitchPlan:
    """Everything a switch would do, computed without changing anything (for --dry-run)."""

    environment: str
    caddyfile: Path
    target: Slot
    target_port: int
    current: Inspection
    old_text: str
    new_text: str
    diff: str
    reload: ReloadMethod
    reload_action: tuple[str, ...]
    validate_command: tuple[str, ...]
    admin_url: str
    verify_url: str

    @property
    def changed(self) -> bool:
        return self.old_text != self.new_text

    def describe(self) -> str:
        now = self.current.slot or "inconsistent (" + "; ".join(self.current.problems) + ")"
        lines = [
            f"Caddy switch for {self.environment}: {now} -> {self.target} "
            f"(port {self.target_port})",
            f"  Caddyfile: {self.caddyfile}",
            f"  check:     GET {self.admin_url}/config/ answers 200 (else stop, untouched)",
            f"  validate:  {' '.join(self.validate_command)}",
            f"  write:     {self.caddyfile} atomically (previous copy kept beside it)",
            f"  reload:    {self.reload} -> {' '.join(self.reload_action)}",
            f"  verify:    GET {self.verify_url}: {SLOT_HEADER} == {self.target} and version",
            "  on failure: restore the previous Caddyfile byte for byte and reload it",
        ]
        lines += [f"  warning:   {w}" for w in self.current.warnings]
        lines.append(self.diff.rstrip("\n") if self.changed
                     else "  (the managed block already points at the target: no change)")
        return "\n".join(lines)


def plan_switch(env: Environment, target: Slot | str) -> SwitchPlan:
    """Compute a switch without touching the file or Caddy."""
    target = Slot(target)
    old = read(env)
    current = inspect(old, env)
    new = rewrite(old, env, target)
    path = env.caddy.caddyfile
    return SwitchPlan(
        environment=env.display, caddyfile=path, target=target,
        target_port=env.slot(target).port, current=current, old_text=old, new_text=new,
        diff=unified_diff(old, new, path), reload=env.caddy.reload,
        reload_action=tuple(reload_action(env)),
        validate_command=tuple(validate_command(
            env, path.parent / f".{path.name}.runbook-validate-XXXX.tmp")),
        admin_url=env.caddy.admin_url,
        verify_url=f"{env.caddy.proxy_url}{env.caddy.verify_path}",
    )


def backup_path(env: Environment) -> Path:
    path = env.caddy.caddyfile
    return path.parent / f".{path.name}.runbook-previous"


def write_backup(env: Environment, data: bytes) -> Path | None:
    """Keep the previous Caddyfile where a human finds it; fall back to the temp dir."""
    candidates = [backup_path(env),
                  Path(tempfile.gettempdir()) / f"togather-runbook-{env.name}-Caddyfile.previous"]
    for candidate in candidates:
        try:
            write_atomically(candidate, data)
        except OSError:
            continue
        with contextlib.suppress(OSError):
            os.chmod(candidate, env.caddy.caddyfile.stat().st_mode & 0o7777)
        return candidate
    return None


def write_config(env: Environment, text: str) -> None:
    """Write the Caddyfile (atomically); a CaddyError says the file was left unchanged."""
    path = env.caddy.caddyfile
    try:
        write_atomically(path, text.encode("utf-8"))
    except OSError as exc:
        raise CaddyError(f"cannot write {path}: {exc.strerror}; it was left unchanged",
                         "check the directory's permissions (run as root?)",
                         stage="write") from None


def restore(env: Environment, data: bytes, previous: Slot | None) -> None:
    """Put a previous Caddyfile back, reload it and, when it named one slot, prove the proxy
    answers from that slot again. The undo of a switch; raises when any part fails."""
    write_config(env, data.decode("utf-8"))
    reload(env, data.decode("utf-8"))
    if previous is not None:
        check = verify(env, previous, None, attempts=5, interval=0.2)
        if not check.ok:
            raise CaddyError(f"the previous Caddyfile was restored and reloaded, but the proxy "
                             f"does not answer as {previous}: {check.describe()}",
                             f"check Caddy and the {previous} container now", stage="restore",
                             exit_code=ExitCode.ATTENTION)
