"""`runbook`: the rollback runbook's actions for on-call, straight from a terminal.

Heavy libraries (docker, httpx, psycopg) are imported inside commands so `--help` is instant.
"""

from __future__ import annotations

from runbook import startup  # first: a Ctrl-C while importing is one line, not a traceback

# isort: split
import contextlib
import copy
import dataclasses
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, NoReturn

import typer
from typer._click import Command
from typer.core import TyperGroup
from typer.main import get_command, get_command_name

from runbook.cli_common import (
    BEFORE_ANY_CHANGE,
    ask_first,
    echo,
    fail,
    load_env,
    only_reading,
    refuse_bad_moved_from,
    refuse_blank,
    require_yes,
    run_action,
)
from runbook.cli_common import PROCESS_STARTED as PROCESS_STARTED
from runbook.cli_common import UNATTENDED_FIX as UNATTENDED_FIX
from runbook.cli_common import Progress as Progress
from runbook.cli_common import confirmer as confirmer
from runbook.cli_common import notice as notice
from runbook.cli_common import report as report
from runbook.cli_common import timing as timing
from runbook.cli_options import (
    ENV_HELP,
    AcceptRestoredDataOpt,
    ConfigOpt,
    DryRunOpt,
    EnvArg,
    Format,
    FormatOpt,
    MovedFromOpt,
    ReasonOpt,
    YesOpt,
)
from runbook.errors import ExitCode, RunbookError, exit_codes_text
from runbook.method_cache import install as install_method_cache

EXIT_CODES = exit_codes_text()

app = typer.Typer(
    name="runbook", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Executable rollback runbook for Togather's blue/green deployments.\n\n" + EXIT_CODES,
)


def _show_version(shown: bool) -> None:
    """`runbook --version`: which togather-runbook this is, and the fleet protocol it speaks
    (found by review: nothing told two versions apart, and an upgrade by `pip install` of a
    wheel with the same version number installed nothing)."""
    if not shown:
        return
    from runbook.fleet import FLEET_PROTOCOL
    from runbook.fleet.hostcheck import version

    echo(f"togather-runbook {version()} (fleet protocol {FLEET_PROTOCOL})")
    raise typer.Exit(0)


@app.callback()
def _main(
    show_version: Annotated[bool, typer.Option(
        "--version", callback=_show_version, is_eager=True,
        help="print this runbook's version and fleet protocol, and exit")] = False,
) -> None:
    """Executable rollback runbook for Togather's blue/green deployments."""


class HealthFormat(StrEnum):
    simple = "simple"
    json = "json"
    table = "table"


class SlotChoice(StrEnum):
    blue = "blue"
    green = "green"


class HealthSlot(StrEnum):
    blue = "blue"
    green = "green"
    active = "active"
    both = "both"


@app.command()
def rollback(
    env: EnvArg,
    to: Annotated[str | None, typer.Option("--to", help="version, commit or deployment id from "
                                           "the history (default: the previous deployment)"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="skip the health gate and the schema "
                                        "guard (never takes someone else's lock)")] = False,
    restore_snapshot: Annotated[bool, typer.Option(
        "--restore-snapshot", help="when migrations ran after the target deployment: restore "
        "the snapshot the schema guard names (or --snapshot FILE) first, then roll back")] = False,
    snapshot: Annotated[str | None, typer.Option(
        "--snapshot", metavar="FILE", help="the snapshot to restore with --restore-snapshot "
        "(name or path; default: the newest taken at the target's schema)")] = None,
    end_sessions: Annotated[bool, typer.Option(
        "--end-sessions", help="with --restore-snapshot: end other sessions connected to the "
        "database once the app slots are stopped (default: refuse, naming them)")] = False,
    moved_from: MovedFromOpt = None,
    expect_from: Annotated[str | None, typer.Option(
        "--expect-from", metavar="VERSION", help="refuse (exit 4, nothing changed) unless "
        "VERSION is the current deployment: what `runbook fleet rollback` passes, so a host "
        "rolled back since its pre-flight is never rolled again")] = None,
    dry_run: DryRunOpt = False, yes: YesOpt = False, fmt: FormatOpt = Format.text,
    config: ConfigOpt = None, reason: ReasonOpt = None,
) -> None:
    """Put the previous deployment back in front of users: start its slot, gate, switch."""
    from runbook import rollback as rb
    from runbook.errors import UsageError

    try:
        environment = load_env(env, config)
        refuse_blank(("--to", to), ("--expect-from", expect_from), ("--snapshot", snapshot))
        refuse_bad_moved_from(moved_from)
        for flag, given in (("--snapshot", snapshot), ("--end-sessions", end_sessions),
                            ("--moved-from", moved_from)):
            if given and not restore_snapshot:
                raise UsageError(f"{flag} only makes sense with --restore-snapshot",
                                 f"add --restore-snapshot, or drop {flag}")
    except RunbookError as exc:
        fail(exc, fmt)
    options = rb.Options(to=to, force=force, reason=reason or "rollback",
                         restore_snapshot=(snapshot or "auto") if restore_snapshot else None,
                         expect_from=expect_from, end_sessions=end_sessions,
                         moved_from=moved_from)
    run_action(lambda **kw: rb.rollback(environment, options, dry_run=dry_run, **kw), fmt,
               yes=yes, dry_run=dry_run, what="`runbook rollback`")


@app.command()
def deploy(
    env: EnvArg,
    version: Annotated[str, typer.Option("--version", help="image tag (7-hex short commit)")],
    force: Annotated[bool, typer.Option("--force", help="skip the health gate")] = False,
    accept_restored_data: AcceptRestoredDataOpt = False,
    dry_run: DryRunOpt = False, yes: YesOpt = False, fmt: FormatOpt = Format.text,
    config: ConfigOpt = None, reason: ReasonOpt = None,
) -> None:
    """Deploy a version to the standby slot: recreate, migrate, gate, switch, record."""
    from runbook import deploy as dp

    try:
        environment = load_env(env, config)
        dp.check_version(version)  # bad input: refused before the lock or the journal
    except RunbookError as exc:
        fail(exc, fmt)
    options = dp.Options(version=version, force=force, reason=reason or "deploy",
                         accept_restored_data=accept_restored_data)
    run_action(lambda **kw: dp.deploy(environment, options, dry_run=dry_run, **kw), fmt,
               yes=yes, dry_run=dry_run, what="`runbook deploy`")


@app.command()
def switch(
    env: EnvArg,
    slot: Annotated[SlotChoice, typer.Option("--slot", help="the slot to send traffic to")],
    force: Annotated[bool, typer.Option("--force", help="skip the health gate")] = False,
    accept_restored_data: AcceptRestoredDataOpt = False,
    dry_run: DryRunOpt = False, yes: YesOpt = False, fmt: FormatOpt = Format.text,
    config: ConfigOpt = None, reason: ReasonOpt = None,
) -> None:
    """Manual slot switch: send traffic to a slot you know is healthy (health-gated)."""
    from runbook import switch as sw
    from runbook.environment import Slot

    try:
        environment = load_env(env, config)
    except RunbookError as exc:
        fail(exc, fmt)
    options = sw.Options(slot=Slot(slot.value), force=force, reason=reason or "manual switch",
                         accept_restored_data=accept_restored_data)
    run_action(lambda **kw: sw.switch(environment, options, dry_run=dry_run, **kw), fmt,
               yes=yes, dry_run=dry_run, what="`runbook switch`")


@app.command()
def status(env: EnvArg, fmt: FormatOpt = Format.text, config: ConfigOpt = None) -> None:
    """Confirm the deployment state: the state file next to what really runs."""
    from runbook import status as st

    with only_reading():
        try:
            data = st.gather(load_env(env, config))
        except RunbookError as exc:
            fail(exc, fmt)
        if fmt is Format.json:
            echo(json.dumps(data, indent=2, default=str))
        else:
            echo(st.render(data))
    if data["problems"]:
        raise typer.Exit(int(ExitCode.FAILED_SAFELY))


def _docker_health(container: str) -> str | None:
    """Docker's own healthcheck verdict of the slot's container, said beside /health's
    answer (found by review: never said); None without one, or when Docker cannot be
    asked: /health alone needs no Docker."""
    from runbook import docker

    try:
        return docker.inspect(container).docker_health
    except RunbookError:
        return None


@app.command()
def healthcheck(
    env: Annotated[str | None, typer.Argument(
        help=ENV_HELP + " (default: the --config/RUNBOOK_CONFIG file's, else production)",
        metavar="[ENV]")] = None,
    slot: Annotated[HealthSlot, typer.Option("--slot", help="blue, green, active (the one "
                                             "taking traffic) or both")] = HealthSlot.both,
    fmt: Annotated[HealthFormat, typer.Option("--format")] = HealthFormat.table,
    config: ConfigOpt = None,
) -> None:
    """Verify health of a slot (degraded counts as healthy). Exit 1 when any is unhealthy."""
    from runbook import health, traffic
    from runbook.environment import Slot

    with only_reading():  # probes only
        try:
            # no ENV: the environment the config file describes (found by review: it was always
            # production, so with RUNBOOK_CONFIG naming a staging file it refused every call)
            environment = load_env(env or config or os.environ.get("RUNBOOK_CONFIG")
                                   or "production", config)
            if slot is HealthSlot.active:
                chosen = [traffic.serving_slot(environment)]  # as Caddy runs it
            elif slot is HealthSlot.both:
                chosen = list(Slot)
            else:
                chosen = [Slot(slot.value)]
        except RunbookError as exc:
            fail(exc, Format.json if fmt is HealthFormat.json else Format.text)
        reports = [dataclasses.replace(
            health.probe(environment.slot(s), environment.health.path,
                         environment.health.request_timeout),
            docker_health=_docker_health(environment.slot(s).container)) for s in chosen]
        from runbook.redact import redact, scrub

        # the app's own words (a check's message may quote a DSN or a password): masked, as
        # everything the runbook prints
        if fmt is HealthFormat.json:
            data = scrub([health.to_json(r) for r in reports])
            echo(json.dumps(data[0] if len(data) == 1 else data, indent=2))
        elif fmt is HealthFormat.table:
            echo(redact(health.to_table(reports)))
        else:
            for r in reports:
                echo(redact(health.simple(r)))
    if not all(r.ok for r in reports):
        raise typer.Exit(int(ExitCode.FAILED_SAFELY))


@app.command()
def unlock(
    env: EnvArg,
    show: Annotated[bool, typer.Option("--status", help="only show who holds the lock")] = False,
    force: Annotated[bool, typer.Option("--force", help="also remove a lock whose holder is "
                                        "gone (never a live holder's)")] = False,
    yes: YesOpt = False, fmt: FormatOpt = Format.text, config: ConfigOpt = None,
) -> None:
    """Show or release the deploy lock. A live holder's lock is never removed."""
    from runbook import disk
    from runbook import lock as locks
    from runbook.redact import one_line, redact, scrub

    try:
        environment = load_env(env, config)
        if not show:
            require_yes(yes, "`runbook unlock`", "pass --yes to confirm it in advance, or "
                        "--status to see who holds the lock")
        with only_reading():
            held = locks.status(environment)
            # another tool's lock fields: masked and one line, as status prints them
            if show:
                if fmt is Format.json:
                    echo(json.dumps(scrub({"locked": True, "summary": held.describe(),
                                           "stale": held.stale, "why": one_line(held.why)}
                                          if held else {"locked": False})))
                else:
                    echo(redact(one_line(held.describe())) if held else "free")
                return
            # before the question and the journal: as a user who may not write the lock
            # folder it journaled, then failed renaming the lock away (a traceback, exit 5);
            # with no lock held there is nothing to remove, and nothing to refuse (found by
            # review). Its log is not required: journaled warns and never stands in the way
            if held is not None:
                disk.refuse_unwritable(environment, caddyfile=False, records=False, log=False)
        if held is not None:  # nothing held: nothing to remove, nothing to ask
            ask_first(yes, redact(
                f"{environment.display}: the deploy lock {environment.lock_path} is held by "
                f"{one_line(held.describe())} ({one_line(held.why)}).\nRemoving it lets the "
                "next run take the lock at once; a holder still running is never removed (the "
                "command refuses, naming the process to stop)."), fmt, "Remove it?")
        from runbook import run

        # journaled (which lock went, who removed it), outside run.perform: it removes the lock
        with run.journaled(environment, "unlock", "runbook unlock" + (" --force" if force else ""),
                           notice) as log:
            # only the lock shown, when the prompt asked: another may have replaced it since
            message = one_line(locks.unlock(environment, force=force,
                                            shown=None if yes else held))
            log("SUCCESS", message, lock=str(environment.lock_path), force=force)
    except RunbookError as exc:
        fail(exc, fmt)
    if fmt is Format.json:
        echo(json.dumps(scrub({"ok": True, "message": message})))
        return
    echo(redact(message))


# Sub-apps: they share runbook/cli_common.py with this module, never import it.
from runbook.cli_docs import register as _register_docs  # noqa: E402
from runbook.cli_snapshot import snapshot_app  # noqa: E402
from runbook.cli_state import state_app  # noqa: E402
from runbook.fleet.cli import fleet_app  # noqa: E402

app.add_typer(snapshot_app, name="snapshot")
app.add_typer(state_app, name="state")
_register_docs(app)  # runbook docs, runbook drill
app.add_typer(fleet_app, name="fleet")  # issue 13: several hosts


def _begins(callback: Callable[..., Any]) -> Callable[..., Any]:
    """A command's function, from which a Ctrl-C is its own to answer (a run's handlers, a
    dry run's clean-up), and one that escapes it is said: typer turned it into a silent
    exit 130 (found by review: on-call could not tell whether anything ran)."""
    @functools.wraps(callback)
    def command(*args: Any, **kwargs: Any) -> Any:
        try:
            startup.begin()  # inside the try: no KeyboardInterrupt slips past it to typer
            return callback(*args, **kwargs)
        except startup.Terminated as stopped:  # SIGTERM, SIGHUP: Ctrl-C's path, its own exit
            echo(f"runbook: interrupted by {signal.Signals(stopped.signum).name}", err=True)
            raise typer.Exit(stopped.exit_code) from None
        except KeyboardInterrupt:
            echo("runbook: interrupted", err=True)
            raise typer.Exit(130) from None
    return command


def _mark_beginnings(command: Command) -> None:
    """Wrap every command's function (not the groups': their callbacks only parse) in
    _begins; until one begins a Ctrl-C is startup's "nothing was changed"."""
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            _mark_beginnings(sub)
    elif command.callback is not None:
        command.callback = _begins(command.callback)


def _command_for(argv: list[str]) -> Command:
    """What app() runs. Typer builds a click command for every function it knows, reading
    each one's signature and options: ~20 ms of a rollback's start-up went on the commands it
    never runs (issue 14 item 2). So when the first argument names a command or a command
    group exactly, only that one is built, and `--version` first needs none (its eager
    callback exits before a command is looked up). Anything else (no argument, --help, a
    typo, whose suggestions name every command) gets the whole tree, as before."""
    first = argv[0] if argv else ""
    commands = [c for c in app.registered_commands if c.callback is not None and (
        c.name or get_command_name(c.callback.__name__)) == first]
    groups = [g for g in app.registered_groups if g.name == first]
    if not (commands or groups or first == "--version"):
        return get_command(app)
    only = copy.copy(app)  # the same app, callback (--version) and settings; fewer commands
    only.registered_commands, only.registered_groups = commands, groups
    return get_command(only)


def main() -> None:
    """Every failure is one line and a documented exit code, never a traceback."""
    startup.hold()  # a caller that imported this module first (a test harness) had it released
    install_method_cache()  # before the command imports what makes dataclasses (ours, pydantic's)
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

    try:
        command = _command_for(sys.argv[1:])  # what app() runs, with its beginnings marked
        _mark_beginnings(command)
        # not standalone: a usage error (an unknown flag, a bad choice) comes back here to be
        # said in one line; click printed four (usage, hint, blank, error; found by review)
        code = command.main(prog_name="runbook", standalone_mode=False)
    except NoArgsIsHelpError as asked:  # `runbook` alone: the help and exit 2, as before
        asked.show()
        _leave(asked.exit_code)
    except (UsageError, ClickException) as bad:
        where = (bad.ctx.command_path if isinstance(bad, UsageError) and bad.ctx is not None
                 else "runbook")
        from runbook.redact import redact

        # the message quotes the arguments, and one may be a URL with its password
        message, fix = redact(bad.format_message()).rstrip("."), f"see `{where} --help`"
        if _asked_for_json(sys.argv[1:]):
            echo(json.dumps({"ok": False, "error": message, "fix": fix,
                             "exit_code": int(ExitCode.USAGE)}))
        echo(f"runbook: error: {message}; {fix}", err=True)
        _leave(int(ExitCode.USAGE))
    except SystemExit as done:  # a command that ends with sys.exit
        _leave(done.code)
    except KeyboardInterrupt:
        echo("runbook: interrupted", err=True)
        _leave(130)
    except Exception as exc:
        from runbook.journal import redact

        if getattr(exc, BEFORE_ANY_CHANGE, False):  # a bug met while only reading
            echo(redact(f"runbook: error: unexpected failure before anything was "
                        f"changed (a bug in runbook: please report this line): "
                        f"{type(exc).__name__}: {exc}"), err=True)
            _leave(int(ExitCode.FAILED_SAFELY))
        echo(redact(f"runbook: error: unexpected failure: {type(exc).__name__}: {exc}"),
             err=True)
        _leave(int(ExitCode.ATTENTION))
    _leave(code if isinstance(code, int) else 0)  # typer.Exit's code, or 0


def _asked_for_json(argv: list[str]) -> bool:
    """`--format json` or `--format=json` on the command line, as click would read it."""
    return any(arg == "--format=json" or (arg == "--format" and following == "json")
               for arg, following in zip(argv, [*argv[1:], ""], strict=True))


def _leave(code: object) -> NoReturn:
    """Exit without the interpreter's teardown: freeing every module (pydantic, psycopg) took
    70-120 ms after the on-call's command had finished. Safe because the work is done: the
    journal and state are written with os-level calls and closed, atexit handlers (temporary
    directories) still run, and the output is flushed here."""
    import atexit
    import os

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): as the interpreter would, print it and exit 1
        echo(str(code), err=True)
        status = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed pipe: nothing left to say
                stream.flush()
        os._exit(status)


# imported by a process that is not the CLI (pytest): a Ctrl-C there is KeyboardInterrupt
# again. The CLI itself (`python -m runbook.cli`, pip's `runbook` script, which calls main()
# right after this import) keeps startup's line until the command begins (_begins).
if __name__ != "__main__" and os.path.basename(sys.argv[0]) != "runbook":
    startup.release()

if __name__ == "__main__":
    main()
