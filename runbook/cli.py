"""`runbook`: the rollback runbook's actions for on-call, straight from a terminal.

Heavy libraries (docker, httpx, psycopg) are imported inside commands so `--help` is instant.
"""

from __future__ import annotations

import json
import os
import sys
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from runbook.cli_options import (
    ENV_HELP,
    ConfigOpt,
    DryRunOpt,
    EnvArg,
    Format,
    FormatOpt,
    ReasonOpt,
    YesOpt,
)
from runbook.errors import ExitCode, RunbookError, exit_codes_text

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

if TYPE_CHECKING:
    from runbook.environment import Environment
    from runbook.plan import Plan, Step
    from runbook.run import RunResult

EXIT_CODES = exit_codes_text()

app = typer.Typer(
    name="runbook", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Executable rollback runbook for Togather's blue/green deployments.\n\n" + EXIT_CODES,
)


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




def fail(exc: RunbookError, fmt: Format = Format.text) -> NoReturn:
    if fmt is Format.json:
        print(json.dumps({"ok": False, "error": exc.message, "fix": exc.fix,
                          "exit_code": int(exc.exit_code)}))
    message = str(exc)
    first, *rest = message.splitlines() or [""]
    typer.echo(f"runbook: error: {first}", err=True)
    for line in rest:
        typer.echo(f"  {line.strip()}", err=True)
    log_file = getattr(exc, "log_file", None)
    if log_file:
        typer.echo(f"runbook: journal: {log_file}", err=True)
    raise typer.Exit(int(exc.exit_code))


def load_env(name: str, config: str | None) -> Environment:
    from runbook import environment

    return environment.load(name, config=config)


UNATTENDED_FIX = ("pass --yes to confirm it in advance (from cron, a pipe or `ssh host cmd`), "
                  "or --dry-run to see the plan")


def require_yes(yes: bool, what: str) -> None:
    """Refuse to change a host unattended: without a terminal nobody can answer the prompt, and
    a mutation from cron, a pipe or `ssh host cmd` must be asked for in advance with --yes."""
    from runbook.errors import UsageError

    if not yes and not sys.stdin.isatty():
        raise UsageError(f"{what} changes the host and stdin is not a terminal, so nobody can "
                         "confirm it; nothing was changed", UNATTENDED_FIX)


def confirmer(yes: bool, fmt: Format, what: str = "this command"):  # type: ignore[no-untyped-def]
    """Ask on a terminal unless --yes; without a terminal, refuse (exit 2) unless --yes."""
    require_yes(yes, what)
    if yes:
        return None

    def confirm(plan: Plan) -> bool:
        typer.echo(plan.render(), err=fmt is Format.json)
        return typer.confirm("Proceed?", default=False, err=True)

    return confirm


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
            typer.echo(f"   ... {message}", err=True)
            return
        if event == "start":
            self.started = time.monotonic()
            typer.echo(f"-> {step.title} ...", err=True)
        else:
            took = time.monotonic() - self.started
            typer.echo(f"   {'ok' if event == 'done' else 'FAILED'} ({took:.2f}s)", err=True)


def timing(switched: float | None) -> dict[str, float]:
    """Seconds from process start to now (the whole run: start-up, lock, plan, steps) and,
    when traffic moved, to the end of the switch step."""
    out = {"done_in_s": round(time.monotonic() - PROCESS_STARTED, 3)}
    if switched is not None:
        out["switched_at_s"] = round(switched - PROCESS_STARTED, 3)
    return out


def report(result: RunResult, fmt: Format, switched: float | None = None) -> None:
    if fmt is Format.json:
        print(json.dumps({"ok": True, **result.to_json(),
                          **({} if result.dry_run else {"timing": timing(switched)})},
                         default=str))
        return
    if result.dry_run:
        typer.echo(result.plan.render())
        typer.echo("Dry run: nothing was changed.")
        return
    # A plain table (no rich import: it cost the on-call ~25 ms for three columns).
    rows = [(o.title, o.status, f"{o.duration_ms / 1000:.2f}s") for o in result.outcomes]
    head = ("step", "status", "duration")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    typer.echo(f"{result.plan.action}: {result.plan.summary}")
    for title, status, took in [head, *rows]:
        typer.echo(f"  {title.ljust(widths[0])}  {status.ljust(widths[1])}  "
                   f"{took.rjust(widths[2])}")
    times = timing(switched)
    moved = (f" (traffic switched at {times['switched_at_s']:.2f}s)"
             if "switched_at_s" in times else "")
    typer.echo(f"Done in {times['done_in_s']:.2f}s{moved}. Journal: {result.log_file}")


def notice(message: str) -> None:
    """Something on-call must see even when all goes well (a stale lock taken over)."""
    typer.echo(f"runbook: note: {message}", err=True)


def run_action(fn: Any, fmt: Format, *, yes: bool, dry_run: bool,
               what: str = "this command") -> None:
    progress = Progress(fmt is Format.text and not dry_run)
    try:
        result = fn(confirm=None if dry_run else confirmer(yes, fmt, what), progress=progress,
                    notify=notice)
    except RunbookError as exc:
        fail(exc, fmt)
    report(result, fmt, progress.switched)


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
    dry_run: DryRunOpt = False, yes: YesOpt = False, fmt: FormatOpt = Format.text,
    config: ConfigOpt = None, reason: ReasonOpt = None,
) -> None:
    """Put the previous deployment back in front of users: start its slot, gate, switch."""
    from runbook import rollback as rb
    from runbook.errors import UsageError

    try:
        environment = load_env(env, config)
        if snapshot and not restore_snapshot:
            raise UsageError("--snapshot only makes sense with --restore-snapshot",
                             "add --restore-snapshot, or drop --snapshot")
    except RunbookError as exc:
        fail(exc, fmt)
    options = rb.Options(to=to, force=force, reason=reason or "rollback",
                         restore_snapshot=(snapshot or "auto") if restore_snapshot else None)
    run_action(lambda **kw: rb.rollback(environment, options, dry_run=dry_run, **kw), fmt,
               yes=yes, dry_run=dry_run, what="`runbook rollback`")


@app.command()
def deploy(
    env: EnvArg,
    version: Annotated[str, typer.Option("--version", help="image tag (7-hex short commit)")],
    force: Annotated[bool, typer.Option("--force", help="skip the health gate")] = False,
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
    options = dp.Options(version=version, force=force, reason=reason or "deploy")
    run_action(lambda **kw: dp.deploy(environment, options, dry_run=dry_run, **kw), fmt,
               yes=yes, dry_run=dry_run, what="`runbook deploy`")


@app.command()
def switch(
    env: EnvArg,
    slot: Annotated[SlotChoice, typer.Option("--slot", help="the slot to send traffic to")],
    force: Annotated[bool, typer.Option("--force", help="skip the health gate")] = False,
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
    options = sw.Options(slot=Slot(slot.value), force=force, reason=reason or "manual switch")
    run_action(lambda **kw: sw.switch(environment, options, dry_run=dry_run, **kw), fmt,
               yes=yes, dry_run=dry_run, what="`runbook switch`")


@app.command()
def status(env: EnvArg, fmt: FormatOpt = Format.text, config: ConfigOpt = None) -> None:
    """Confirm the deployment state: the state file next to what really runs."""
    from runbook import status as st

    try:
        data = st.gather(load_env(env, config))
    except RunbookError as exc:
        fail(exc, fmt)
    if fmt is Format.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        typer.echo(st.render(data))
    if data["problems"]:
        raise typer.Exit(int(ExitCode.FAILED_SAFELY))


@app.command()
def healthcheck(
    env: Annotated[str, typer.Argument(help=ENV_HELP, metavar="[ENV]")] = "production",
    slot: Annotated[HealthSlot, typer.Option("--slot", help="blue, green, active (the one "
                                             "taking traffic) or both")] = HealthSlot.both,
    fmt: Annotated[HealthFormat, typer.Option("--format")] = HealthFormat.table,
    config: ConfigOpt = None,
) -> None:
    """Verify health of a slot (degraded counts as healthy). Exit 1 when any is unhealthy."""
    from runbook import health, traffic
    from runbook.environment import Slot

    try:
        environment = load_env(env, config)
        if slot is HealthSlot.active:
            chosen = [traffic.serving_slot(environment)]  # as Caddy runs it
        elif slot is HealthSlot.both:
            chosen = list(Slot)
        else:
            chosen = [Slot(slot.value)]
    except RunbookError as exc:
        fail(exc)
    reports = [health.probe(environment.slot(s), environment.health.path,
                            environment.health.request_timeout) for s in chosen]
    if fmt is HealthFormat.json:
        data = [health.to_json(r) for r in reports]
        print(json.dumps(data[0] if len(data) == 1 else data, indent=2))
    elif fmt is HealthFormat.table:
        typer.echo(health.to_table(reports))
    else:
        for r in reports:
            typer.echo(health.simple(r))
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
    from runbook import lock as locks

    try:
        environment = load_env(env, config)
        if not show:
            require_yes(yes, "`runbook unlock`")
        held = locks.status(environment)
        if show:
            if fmt is Format.json:
                print(json.dumps({"locked": True, "summary": held.describe(), "stale": held.stale,
                                  "why": held.why} if held else {"locked": False}))
            else:
                typer.echo(held.describe() if held else "free")
            return
        message = locks.unlock(environment, force=force)
    except RunbookError as exc:
        fail(exc, fmt)
    typer.echo(message)


app.add_typer(__import__("runbook.cli_snapshot").cli_snapshot.snapshot_app, name="snapshot")
__import__("runbook.cli_docs").cli_docs.register(app)  # runbook docs, runbook drill
app.add_typer(__import__("runbook.fleet.cli").fleet.cli.fleet_app, name="fleet")  # issue 13


def main() -> None:
    """Every failure is one line and a documented exit code, never a traceback."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("runbook: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        from runbook.journal import redact

        typer.echo(redact(f"runbook: error: unexpected failure: {type(exc).__name__}: {exc}"),
                   err=True)
        sys.exit(int(ExitCode.ATTENTION))


if __name__ == "__main__":
    main()
