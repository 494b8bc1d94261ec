"""What every `runbook` command module shares: one-line failures, the unattended-change
guard, the confirmation prompt, step progress and the result report.

A module of its own so the sub-apps (cli_snapshot, cli_docs) use them without importing
runbook/cli.py, which imports them: no cycle, at load time or at call time.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from runbook.cli_options import Format
from runbook.errors import RunbookError

if TYPE_CHECKING:
    from runbook.environment import Environment
    from runbook.plan import Plan, Step
    from runbook.run import RunResult

_IMPORTED = time.monotonic()


def _process_started() -> float:
    """When this process started, on the time.monotonic() scale: "Done in" counts the
    interpreter's start and the imports too, as the person waiting did. Linux reads it from
    /proc (10 ms resolution); elsewhere it falls back to when this module was imported."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime: clock ticks after boot
        since = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED
    return min(time.monotonic() - since, _IMPORTED)


PROCESS_STARTED = _process_started()


def echo(message: str = "", *, err: bool = False, nl: bool = True) -> bool:
    """Write output, or pass over a stdout or stderr that is gone (`| head -0`, a dropped ssh
    session) and say so by returning False. Never raises: the CLI framework turned an EPIPE
    into a silent exit 1 ("failed safely") that replaced the run's own exit code, and a
    failed first write skipped the lines after it (the TOOK EFFECT message)."""
    try:
        typer.echo(message, err=err, nl=nl)
    except (OSError, ValueError):  # ValueError: the stream was closed
        return False
    return True


def fail(exc: RunbookError, fmt: Format = Format.text) -> NoReturn:
    """One line (plus the fix) on stderr and the error's documented exit code, never a
    traceback; with --format json also one JSON object on stdout for the caller's script."""
    from runbook.redact import redact

    lost = getattr(exc, "journal_incomplete", None)
    # the lines for on-call first (the fix of a run that TOOK EFFECT), then the JSON
    # an argument, a path or a tool's words may hold a secret
    message = redact(named_env_file(str(exc)))
    first, *rest = message.splitlines() or [""]
    echo(f"runbook: error: {first}", err=True)
    for line in rest:
        echo(f"  {line.strip()}", err=True)
    log_file = getattr(exc, "log_file", None)
    if log_file:
        echo(f"runbook: journal: {log_file}", err=True)
    if lost:
        echo(f"runbook: warning: {lost}", err=True)
    if fmt is Format.json:
        echo(json.dumps({"ok": False, "error": redact(named_env_file(exc.message)),
                         "fix": redact(named_env_file(exc.fix)) if exc.fix else exc.fix,
                         "exit_code": int(exc.exit_code)}
                        | ({"journal_incomplete": lost} if lost else {})))
    raise typer.Exit(int(exc.exit_code))


BEFORE_ANY_CHANGE = "runbook_before_any_change"  # the mark on an error only_reading() saw


@contextlib.contextmanager
def only_reading() -> Iterator[None]:
    """A stretch that changes nothing (reading the configuration, a status, a dry run): an
    unexpected error (a bug) raised in it is marked, so runbook/cli.py says it was met before
    anything changed instead of exit 5's "could not be fully undone", which sent on-call to
    undo what was never done. Errors met anywhere else stay exit 5: whether they changed
    something is not known."""
    try:
        yield
    except Exception as exc:
        setattr(exc, BEFORE_ANY_CHANGE, True)
        raise


_LOADED: list[Environment] = []  # the environment this command loaded (load_env)


def named_env_file(text: str) -> str:
    """A fix's "in the environment file" named: which file this command read, or, where
    that is the packaged defaults (rewritten by every upgrade), the host's own file that
    overrides them (found by review: on-call did not know which file to edit)."""
    marker = "in the environment file"
    if not _LOADED or marker not in text or _LOADED[-1].source is None:
        return text
    from runbook.environment import BUILTIN_DIR, SYSTEM_DIR

    env = _LOADED[-1]
    source = env.source
    assert source is not None
    if source.resolve().parent == BUILTIN_DIR:
        # the host's file replaces the packaged one whole, key by key nothing is merged: a
        # file holding the one key lost the env files and the migrate command (review)
        where = (f"in the host's own environment file: copy {source} to "
                 f"{SYSTEM_DIR / (env.name + '.toml')} and change it there (that file "
                 "replaces the packaged defaults whole)")
    else:
        where = f"{marker} {source.absolute()}"
    return text.replace(marker, where)


def load_env(name: str, config: str | None) -> Environment:
    """The environment, imported when a command needs it (`--help` stays instant), with its
    known secrets registered for every command."""
    from runbook import environment

    with only_reading():
        env = environment.load(name, config=config)
        register_known_secrets(env)
    _LOADED.append(env)
    from runbook import kept_state as kept

    # the copy an empty or cut-short state file's refusal names (runbook state restore-kept)
    kept.register(env.state_file, env.runs_dir, env.name, notice,
                  environment.command_arg(env))
    return env


def register_known_secrets(env: Environment) -> None:
    """Register the environment's known secrets (the database password, the env file's
    values redact.holds_secret names: *PASSWORD, *_PASS, *_TOKEN, ...) before anything
    prints. Only Journal.open did: `status` and `healthcheck` masked by patterns alone,
    which stop at `,` `;` `&` or a space (`password=Winter,2025` was printed
    `password=***,2025`). A broken configuration registers what it can and is reported,
    with its own error, by whoever uses it."""
    from runbook import database
    from runbook.redact import register_secrets

    with contextlib.suppress(RunbookError, OSError, ValueError):
        register_secrets(*database.known_secrets(env))


def refuse_blank(*given: tuple[str, str | None], required: bool = False) -> None:
    """An option or argument given but blank (`--to "$TARGET"` with TARGET unset) is refused,
    never taken for its default: a blank SNAPSHOT restored the newest one, a blank --limit
    rolled back every host of the inventory, and a blank path is Path(""), the working
    directory (`fleet rollback ""` read its inventory). `required`: they cannot be left out."""
    from runbook.errors import UsageError

    for flag, value in given:
        if value is not None and not value.strip():
            raise UsageError(f"{flag} is empty; nothing was changed",
                             f"give {flag} a value (an unset shell variable?)"
                             + ("" if required else ", or leave it out"))


def refuse_bad_moved_from(moved_from: str | None) -> None:
    """`--moved-from` (snapshot restore, rollback) given but not HOST:PORT: refused (exit 2)
    before anything is read or changed; blank is refuse_blank's. Whether it names the server
    the snapshot's sidecar names is verify()'s question."""
    import re

    from runbook.errors import UsageError

    refuse_blank(("--moved-from", moved_from))
    if moved_from is not None and not re.fullmatch(r"\S+:\d+", moved_from.strip()):
        raise UsageError(f"--moved-from {moved_from!r} is not HOST:PORT",
                         "give the server the snapshot's sidecar names, e.g. "
                         "--moved-from localhost:5434")


UNATTENDED_FIX = ("pass --yes to confirm it in advance (from cron, a pipe or `ssh host cmd`), "
                  "or --dry-run to see the plan")


def stdin_is_terminal() -> bool:
    """A closed stdin (`<&-`, a daemon) is no terminal either: Python sets sys.stdin to None,
    and asking it crashed with exit 5 ("could not be fully undone") before anything ran."""
    return sys.stdin is not None and sys.stdin.isatty()


def require_yes(yes: bool, what: str, fix: str = UNATTENDED_FIX) -> None:
    """Refuse to change a host unattended: without a terminal nobody can answer the prompt, and
    a mutation from cron, a pipe or `ssh host cmd` must be asked for in advance with --yes.
    `fix`: for a command without --dry-run, one that does not name it."""
    from runbook.errors import UsageError

    if not yes and not stdin_is_terminal():
        raise UsageError(f"{what} changes the host and stdin is not a terminal, so nobody can "
                         "confirm it; nothing was changed", fix)


def ask(question: str) -> bool:
    """A y/N question on the terminal that Ctrl-C always interrupts.

    typer.confirm blocks in a read of stdin; a SIGINT the kernel hands to another thread (the
    fleet's Ansible runner, a health probe) then never interrupts it, since Python runs signal
    handlers in the main thread only, and the prompt hung (seen in about one run in 15 under
    load). Waiting for the answer in short select() slices lets the main thread act on it.
    Ctrl-D (end of input), or a question that cannot be shown, is a no."""
    import select

    if not echo(f"{question} [y/N]: ", nl=False, err=True):
        return False
    while True:
        try:
            ready, _, _ = select.select([sys.stdin], [], [], 0.2)
        except (OSError, ValueError):  # not selectable (a test's stdin): read it plainly
            ready = [sys.stdin]
        if ready:
            break
    line = sys.stdin.readline()
    if not line:
        echo("", err=True)
        return False
    return line.strip().lower() in ("y", "yes")


def confirmer(yes: bool, fmt: Format,
              what: str = "this command") -> Callable[[Plan], bool] | None:
    """Ask on a terminal unless --yes; without a terminal, refuse (exit 2) unless --yes."""
    require_yes(yes, what)
    if yes:
        return None

    def confirm(plan: Plan) -> bool:
        # a plan nobody could read is never confirmed
        return echo(plan.render(), err=fmt is Format.json) and ask("Proceed?")

    return confirm


def ask_first(yes: bool, preview: str, fmt: Format, question: str = "Proceed?") -> None:
    """For a command that changes the host outside run.perform (unlock, snapshot cleanup): on
    a terminal without --yes, show what it will change and ask, as every other command's
    plan does. A no, or a preview that cannot be shown, changes nothing: exit 2, as any
    declined prompt (run.NotConfirmed). Without a terminal require_yes refused already."""
    if yes or (echo(preview, err=fmt is Format.json) and ask(question)):
        return
    from runbook.run import NotConfirmed

    raise NotConfirmed("not confirmed at the prompt; nothing was changed",
                       "run again and answer y, or pass --yes")


class Progress:
    """One line per step while it runs, so a 60-second health gate never looks hung."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = 0.0
        self.switched: float | None = None  # when the switch step ended: traffic moved

    def __call__(self, event: str, step: Step, message: str = "") -> None:
        if event == "done" and step.name == "switch":
            self.switched = time.monotonic()
        if not self.enabled:
            return
        if event == "note":
            from runbook.redact import redact

            echo(redact(f"   ... {message}"), err=True)
            return
        if event == "start":
            self.started = time.monotonic()
            echo(f"-> {step.title} ...", err=True)
        else:
            took = time.monotonic() - self.started
            echo(f"   {'ok' if event == 'done' else 'FAILED'} ({took:.2f}s)", err=True)


def timing(switched: float | None) -> dict[str, float]:
    """Seconds from process start to now (the whole run: start-up, lock, plan, steps) and,
    when traffic moved, to the end of the switch step."""
    out = {"done_in_s": round(time.monotonic() - PROCESS_STARTED, 3)}
    if switched is not None:
        out["switched_at_s"] = round(switched - PROCESS_STARTED, 3)
    return out


def report(result: RunResult, fmt: Format, switched: float | None = None) -> None:
    if fmt is Format.json:
        from runbook.redact import scrub

        echo(json.dumps(scrub({"ok": True, **result.to_json(),
                               **({} if result.dry_run else {"timing": timing(switched)})})))
        return
    if result.dry_run:
        echo(result.plan.render())
        echo("Dry run: nothing was changed.")
        return
    # A plain table (no rich import: it cost the on-call ~25 ms for three columns).
    rows = [(o.title, f"{o.status}, {o.result}" if o.result else o.status,
             f"{o.duration_ms / 1000:.2f}s") for o in result.outcomes]
    head = ("step", "status", "duration")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    from runbook.redact import redact

    echo(redact(f"{result.plan.action}: {result.plan.summary}"))
    for title, status, took in [head, *rows]:
        echo(redact(f"  {title.ljust(widths[0])}  {status.ljust(widths[1])}  "
                          f"{took.rjust(widths[2])}"))
    times = timing(switched)
    moved = (f" (traffic switched at {times['switched_at_s']:.2f}s)"
             if "switched_at_s" in times else "")
    echo(f"Done in {times['done_in_s']:.2f}s{moved}. Journal: {result.log_file}")
    facts = result.plan.facts
    if facts.get("restored") and (safety := facts.get("safety_snapshot")):
        # the last thing on-call reads after a restore (a rollback's too): where the data
        # from before it is, as a killed restore's messages name it
        earlier = facts.get("earlier_safety_snapshot")
        echo(redact(
            f"The data from before the restore is in {earlier} (the safety snapshot of the "
            f"killed run; {safety} is the database as that run left it): keep it."
            if earlier else f"The data from before the restore is in {safety}, its safety "
            "snapshot: keep it."))


def notice(message: str) -> None:
    """Something on-call must see even when all goes well (a stale lock taken over, a plan
    warning no prompt showed under --yes)."""
    from runbook.redact import redact
    from runbook.run import WARNING

    message = redact(message)
    if message.startswith(WARNING):
        echo(f"runbook: warning: {message.removeprefix(WARNING)}", err=True)
        return
    echo(f"runbook: note: {message}", err=True)


def run_action(fn: Any, fmt: Format, *, yes: bool, dry_run: bool,
               what: str = "this command") -> None:
    """Run a verb the same way for every command: confirm, show progress, report, fail."""
    progress = Progress(fmt is Format.text and not dry_run)
    try:
        with only_reading() if dry_run else contextlib.nullcontext():
            result = fn(confirm=None if dry_run else confirmer(yes, fmt, what),
                        progress=progress, notify=notice)
    except RunbookError as exc:
        fail(exc, fmt)
    report(result, fmt, progress.switched)
