"""The switch as a transaction's pieces: its plan (for --dry-run), the backup of the previous
Caddyfile, the write, and the undo that puts the previous file back and proves it serves.

A switch refuses to touch anything while Caddy is down (the old tooling "succeeded" then), and
any failure after the write restores the previous file and reloads it (runbook/slots.py's
switch step registers that undo).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runbook import files
from runbook.caddy.admin import (
    ReloadCommand,
    VerifyResult,
    candidate_shown,
    check_imports,
    check_running,
    config_etag,
    first_difference,
    load_running,
    markers_imported,
    read,
    reload,
    reload_command,
    shown,
    validate_command,
    verify,
    write_atomically,
)
from runbook.caddy.errors import CaddyConflictError, CaddyError, SlotMarkersError
from runbook.caddy.text import (
    SLOT_HEADER,
    Inspection,
    Reach,
    inspect,
    rewrite,
    unified_diff,
)
from runbook.environment import Environment, ReloadMethod, Slot, command_arg
from runbook.errors import ExitCode


def apply(env: Environment, text: str) -> None:
    """Write the Caddyfile and reload Caddy. Refuses, before writing, when Caddy is down.

    It does not undo a failed reload: switch() does, because it holds the previous text.
    """
    check_running(env)
    write_config(env, text)
    reload(env, text)


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
    # Caddy's running config as the plan read it (None: unreadable): the switch refuses to
    # load over a change made since (caddy_changed_since)
    running: Any = None
    etag: str | None = None  # the ETag Caddy sent with `running` (None: none sent, unread)
    # how Caddy is made to load the new config, built from `running`: the switch runs it
    command: ReloadCommand | None = None

    def _reload_words(self) -> str:
        words = shown(self.reload, self.reload_action)
        if self.reload is not ReloadMethod.ADMIN_API or self.etag is not None \
                or self.running is None:
            return words
        return (f"POST {self.admin_url}/load (Content-Type: text/caddyfile): this Caddy "
                "sends no ETag with its config, so its load cannot be made conditional")

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
            f"  validate:  {shown(self.reload, self.validate_command)}",
            f"  write:     {self.caddyfile} atomically (previous copy kept beside it)",
            f"  reload:    {self.reload} -> {self._reload_words()}",
            *([f"             ({self.command.note})"] if self.command and self.command.note
              else []),
            f"  verify:    GET {self.verify_url}: {SLOT_HEADER} == {self.target} and version;"
            f" no /health answer's body names another slot",
            "  on failure: restore the previous Caddyfile byte for byte and reload it",
        ]
        lines += [f"  warning:   {w}" for w in self.current.warnings]
        lines.append(self.diff.rstrip("\n") if self.changed
                     else "  (the managed block already points at the target: no change)")
        return "\n".join(lines)


def plan_switch(env: Environment, target: Slot | str, reach: Reach | None = None) -> SwitchPlan:
    """Compute a switch without touching the file or Caddy; refuses (CaddyError) a Caddyfile
    the switch cannot rewrite whole or Caddy would not load whole (check_imports). Planning
    changes nothing, so its refusals of the file's text (exit 4) name the file and say so:
    the parser's own words are facts of the text (`line 1 holds both ...`), said as they are
    by whoever meets them later (a step after a change: runbook/plan.py says what it did).
    `reach`: how those refusals name the upstream that reaches a slot from where Caddy runs
    (slots.reach: this module cannot see Caddy's network)."""
    target = Slot(target)
    path = env.caddy.caddyfile
    old = read(env)
    try:
        current = inspect(old, env, reach)
        new = rewrite(old, env, target, reach)
    except CaddyError as exc:
        if isinstance(exc, SlotMarkersError):
            markers_imported(env, old, exc)  # the block in a file it imports: named
        if exc.exit_code == ExitCode.PRECONDITION:
            exc.message = f"{path}: {exc.message}; nothing was changed"
            exc.args = (exc.message,)
        raise
    check_imports(env, new)
    running, etag = running_config_tagged(env)
    # a `caddy reload` in Caddy's container dials the admin address Caddy listens on in
    # there, as this reading says (unread: read again, else refused here, exit 4)
    command = reload_command(env, running)
    return SwitchPlan(
        environment=env.display, caddyfile=path, target=target,
        target_port=env.slot(target).port, current=current, old_text=old, new_text=new,
        diff=unified_diff(old, new, path), reload=env.caddy.reload,
        reload_action=tuple(command.words()),
        validate_command=tuple(validate_command(env, candidate_shown(env))),
        admin_url=env.caddy.admin_url,
        verify_url=f"{env.caddy.proxy_url}{env.caddy.verify_path}"
        + (f" (Host: {env.caddy.site})" if env.caddy.site else ""),
        running=running, etag=etag, command=command,
    )


def running_config(env: Environment) -> Any:
    """Caddy's running config as GET /config/ answers it (what traffic.loaded_config reads,
    read here without it: runbook.traffic imports this package). None when it cannot be
    read: said (and refused) by the plan's own reading of Caddy."""
    return running_config_tagged(env)[0]


def running_config_tagged(env: Environment) -> tuple[Any, str | None]:
    """running_config and the ETag Caddy sent with it (None: none sent, or unread): a load
    If-Match it is refused when Caddy's config changed since this reading."""
    from runbook import bounded_http

    try:
        answer = bounded_http.request("GET", f"{env.caddy.admin_url}/config/", timeout=5.0,
                                      max_body=None)
        if answer.status != 200:
            return None, None
        return answer.json(), config_etag(answer)
    except (bounded_http.HttpFailure, ValueError):
        return None, None


def caddy_changed_since(plan: SwitchPlan, running: Any) -> str | None:
    """Where Caddy's running config now first differs from the plan's reading (None: the
    same). Why: `/load` replaces Caddy's whole config, so a route, handler or TLS setting
    loaded through the admin API after the plan (an emergency block during the health
    gate) would be dropped silently: the sites compared (served_sites) do not see it."""
    if plan.running is None:
        return None if running is None else "(top): it could not be read when planning"
    return first_difference(plan.running, running)


def backup_path(env: Environment) -> Path:
    path = env.caddy.caddyfile
    return path.parent / f".{path.name}.runbook-previous"


def in_temp_dir(prefix: str, data: bytes, mode: int) -> Path:
    """A new file of our own in the temp directory (O_EXCL, a random name, created with its
    mode): a fixed name there could be another local user's symlink, and writing through it
    replaced the file it points at (found by review)."""
    fd, name = tempfile.mkstemp(prefix=prefix)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    os.close(fd)
    return Path(name)


def _caddyfile_mode(env: Environment) -> int:
    try:
        return env.caddy.caddyfile.stat().st_mode & 0o777
    except OSError:
        return 0o600


def write_backup(env: Environment, data: bytes) -> Path | None:
    """Keep the previous Caddyfile where a human finds it; fall back to the temp dir. Either
    has the Caddyfile's mode before a byte is in it: a 0600 Caddyfile holds secrets."""
    mode = _caddyfile_mode(env)
    try:
        write_atomically(backup_path(env), data, mode, like=env.caddy.caddyfile)
    except OSError:
        pass
    else:
        return backup_path(env)
    try:
        return in_temp_dir(f"togather-runbook-{env.name}-Caddyfile.previous-", data, mode)
    except OSError:
        return None


def write_config(env: Environment, text: str) -> str | None:
    """Write the Caddyfile (atomically); a CaddyError says the file was left unchanged.
    Returns None, or the line saying its owner or group could not be kept."""
    path = env.caddy.caddyfile
    try:
        return write_atomically(path, text.encode("utf-8"))
    except OSError as exc:
        raise CaddyError(f"cannot write {path}: {exc.strerror}; it was left unchanged",
                         files.write_fix(exc, path.parent,
                                         "check the directory's permissions (run as root?)",
                                         target=Path(os.path.realpath(path))),
                         stage="write") from None


def edited_path(env: Environment, stamp: str) -> Path:
    path = env.caddy.caddyfile
    return path.parent / f".{path.name}.runbook-edited-{stamp}"


def keep_an_edit(env: Environment, written: bytes, data: bytes) -> str | None:
    """Before an undo writes `data` over the Caddyfile the switch wrote (`written`): when
    someone edited it meanwhile (the seconds of the verification), copy their edit aside, so
    traffic goes back and the edit is not lost. Returns what to say, or None (no edit)."""
    path = env.caddy.caddyfile
    try:
        now = path.read_bytes()
    except OSError:
        return None  # nothing readable to keep; the write below says what it finds
    if now in (written, data):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    candidate = edited_path(env, stamp)
    mode = _caddyfile_mode(env)  # the copy's from its first byte, as write_backup's
    try:
        write_atomically(candidate, now, mode, like=path)
    except OSError:
        try:
            candidate = in_temp_dir(f"togather-runbook-{env.name}-Caddyfile.edited-{stamp}-",
                                    now, mode)
        except OSError as exc:
            return (f"{path} was edited during the switch and the edit could not be copied "
                    f"aside ({exc.strerror or exc})")
    return (f"{path} was edited during the switch: that edit was kept at {candidate} "
            "(not loaded)")


def restore(env: Environment, data: bytes, previous: Slot | None,
            running: Any | None = None, *, written: bytes | None = None,
            said: str | None = None, etag: str | None = None,
            load: bool = True, failing: str | None = None,
            ran: Any | None = None) -> str | None:
    """Put a previous Caddyfile back, load what Caddy ran before and, when it named one slot,
    prove the proxy answers from that slot again. The undo of a switch; raises when any part
    fails. `running`: Caddy's config JSON read before the switch, loaded back as it was (a
    route loaded through the admin API is not in the file); without it the file is reloaded.
    `said`: what to say of `running` (traffic.undo_config: Caddy's config as it is now with
    only this environment's upstreams pointed back). `written`: what the switch wrote; an
    edit made since is kept aside (keep_an_edit). What to say of either is returned.
    `etag`: the ETag of the config `running` was decided from (load_running loads it If-Match
    that: CaddyConflictError when Caddy's config changed again since). `load=False`: only the
    file goes back (the switch's own load was refused: Caddy still runs what it ran).
    `failing`: what the proxy answered for `previous` just before the switch, when it failed
    already (answer_words: "HTTP 502"); `ran`: Caddy's config then. An undo whose own
    verification fails while Caddy runs `ran` again, JSON for JSON, is clean: what users get
    is what they got (said, not raised: `_as_before`)."""
    text = data.decode("utf-8")
    kept = keep_an_edit(env, written, data) if written is not None else None

    def put_back(file_back: bool = True) -> None:
        try:
            if running is not None:
                load_running(env, running, etag)
            else:
                reload(env, text)
        except CaddyConflictError as exc:  # the undo decides again: what was done goes with it
            exc.kept, exc.file_back = kept, file_back
            raise

    try:
        write_config(env, text)
    except CaddyError as exc:
        if not load or (env.caddy.reload is not ReloadMethod.ADMIN_API and running is None):
            if kept:  # caddy reload and systemctl read the file: it still names the new slot
                exc.message = f"{exc.message}; {kept}"
                exc.args = (exc.message,)
            raise
        # the admin API loads the config itself: traffic goes back even when the file cannot
        # (a disk that filled up since the switch's own write), then the file is named
        put_back(file_back=False)
        back = verify(env, previous, None, attempts=5, interval=0.2) if previous else None
        where = (f"traffic is back on {previous}" if back is not None and back.ok
                 else "the previous config was loaded")
        raise CaddyError(
            f"{where} through the admin API, but the previous Caddyfile could not be written "
            f"back ({exc.message}): {env.caddy.caddyfile} on disk "
            + (f"is still as edited during the switch, and a Caddy restart or reload would "
               f"load it; {kept}" if kept else
               "still names the new slot, and a Caddy restart or reload would load it")
            + (f"; {said}" if said else ""),
            f"{exc.fix}; then run `runbook "
            f"status {command_arg(env)}` and put the file back", stage="restore",
            exit_code=ExitCode.ATTENTION) from None
    if kept:  # written over only once it was kept, and said so only once it was
        kept += (", and the previous Caddyfile put back" if "kept at" in kept
                 else ": the previous Caddyfile was put back over it")
    if not load:
        return "; ".join(s for s in (said, kept) if s) or None
    put_back()
    if previous is not None:
        check = verify(env, previous, None, attempts=5, interval=0.2)
        if not check.ok and (same := _as_before(env, previous, check, failing, ran)):
            return "; ".join(s for s in (same, said, kept) if s)
        if not check.ok:
            raise CaddyError(f"the previous Caddyfile was restored and reloaded, but the proxy "
                             f"does not answer as {previous}: {check.describe()}"
                             + "".join(f"; {s}" for s in (said, kept) if s),
                             f"check Caddy and the {previous} container now", stage="restore",
                             exit_code=ExitCode.ATTENTION)
    return "; ".join(s for s in (said, kept) if s) or None  # said with the run's outcome


def answer_words(status: int | None) -> str:
    """What a user got from the proxy, in a few words."""
    return "no answer" if status is None else f"HTTP {status}"


def _as_before(env: Environment, previous: Slot, check: VerifyResult,
               failing: str | None, ran: Any | None) -> str | None:
    """What to say when the undo's verification fails as the proxy did before the switch
    and Caddy runs exactly the config it ran then; None otherwise (the undo failed). Found
    by review: an h2c transport to an HTTP/1.1 app got 502 for every slot, the undo put
    everything back, and its verification's 502, the one users had before, was said as
    "undoing failed ... traffic may not be where it was" (exit 5)."""
    if failing is None or ran is None:
        return None
    now = running_config(env)
    if now is None or first_difference(ran, now) is not None:
        return None
    from runbook import health

    report = health.probe(env.slot(previous), env.health.path, env.health.request_timeout)
    why = (f"the proxy, not the slot: the {previous} slot answers healthy directly"
           if report.ok else f"the {previous} slot does not answer healthy directly either: "
           f"{report.status}")
    now_seen = answer_words(check.http_status)
    again = "" if now_seen == failing else f"; the proxy now answers {now_seen}"
    return (f"the previous Caddyfile was restored and Caddy runs exactly what it ran before the "
            f"switch; users were already getting {failing} before it ({why}){again}")
