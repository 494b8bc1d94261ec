"""`runbook fleet ...`: the fleet rollback (operator side) and its host-side helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from runbook.cli_common import ask, echo, load_env, notice, refuse_blank, stdin_is_terminal
from runbook.cli_options import ConfigOpt, DryRunOpt, EnvArg, Format, FormatOpt, ReasonOpt, YesOpt
from runbook.errors import LockedError, RunbookError, UsageError

fleet_app = typer.Typer(
    name="fleet", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Several hosts: roll back a fleet from an Ansible inventory, canary first, stop at the "
         "first failure (needs the [fleet] extra: ansible-core + ansible-runner).")


def _fail(exc: RunbookError, fmt: Format = Format.text, lines: list[str] | None = None,
          **extra: Any) -> NoReturn:
    """One error, masked as the main CLI masks it (a path argument holding a DATABASE_URL
    was printed with its password), as JSON too when asked (the fleet's own commands on a
    host always answer JSON: `extra` is their fields)."""
    from runbook.redact import redact

    echo(redact(f"runbook: error: {exc}"), err=True)
    for line in lines or []:
        echo(redact(f"  {line}"), err=True)
    if fmt is Format.json:
        echo(redact(json.dumps({"ok": False, "error": exc.message, "fix": exc.fix,
                                "exit_code": int(exc.exit_code), "hosts": lines or [],
                                **extra}, default=str)))
    raise typer.Exit(int(exc.exit_code))


# the fleet controller a fleet lock names: what tells whether the run holding it is alive
ControllerHostOpt = Annotated[str | None, typer.Option(
    "--controller-host", help="the fleet controller's host name (to take the lock)")]
PidOpt = Annotated[int | None, typer.Option(
    "--pid", min=1, help="the fleet controller's process id (to take the lock)")]


def _controller(flag: str, holder: str, host: str | None, pid: int | None) -> tuple[str, int]:
    """The controller a fleet lock is taken for, refused (exit 2) unless it can be judged:
    `--pid -1` and no host wrote a lock no one could tell dead, which blocked every fleet run
    for its 30 minutes and which `--release --force` refused (found by review). The fleet
    always passes all three."""
    refuse_blank(("--holder", holder), ("--controller-host", host), required=True)
    if host is None or pid is None:
        raise UsageError(f"{flag} needs --controller-host and --pid (the fleet controller's "
                         "host and process, which tell whether its run is alive); nothing "
                         "was changed", "this is run by `runbook fleet rollback`, which "
                         "passes them; see --help")
    return host, pid


@fleet_app.command("rollback")
def rollback_cmd(
    # str, not Path: Path("") is ".", and a blank INVENTORY read the working directory
    inventory: Annotated[str, typer.Argument(help="an Ansible inventory (a `canary` group; "
                                             "each host's `runbook_env`)", metavar="INVENTORY")],
    limit: Annotated[str | None, typer.Option("--limit", help="only these hosts or groups "
                                              "(comma-separated), e.g. the ones a stopped run "
                                              "did not do")] = None,
    batches: Annotated[str, typer.Option("--batches", help="batch sizes after the canary "
                                         "group: counts or percentages, the last one "
                                         "repeating")] = "1,25%,100%",
    canary_group: Annotated[str, typer.Option("--canary-group")] = "canary",
    resume: Annotated[str | None, typer.Option("--resume", metavar="FLEET_RUN_ID",
                                               help="continue a stopped fleet run: its "
                                               "database phase is not repeated, the hosts it "
                                               "rolled back are skipped")] = None,
    maintenance: Annotated[bool, typer.Option(
        "--maintenance", help="for a rollback that needs a snapshot restore: drain every "
        "host (THE SERVICE IS DOWN), restore the snapshot once on the fleet lock host, then "
        "roll back every host, canary first")] = False,
    end_sessions: Annotated[bool, typer.Option(
        "--end-sessions", help="with --maintenance: the restore ends other sessions "
        "connected to the database once every host is drained (default: refuse, naming "
        "them)")] = False,
    journal_dir: Annotated[str | None, typer.Option("--journal-dir", metavar="<path>",
                                                    help="where the fleet "
                                                    "journal goes (default ~/.togather/fleet, "
                                                    "or RUNBOOK_FLEET_DIR)")] = None,
    dry_run: DryRunOpt = False, yes: YesOpt = False, fmt: FormatOpt = Format.text,
    reason: ReasonOpt = None,
) -> None:
    """Roll back every host of INVENTORY: pre-flight all, canary first, then batches."""
    from runbook.fleet import rollout

    try:
        # blank: a --limit "" rolled back every host, a --resume "" started afresh, a blank
        # path is the working directory (its inventory read, the fleet journal written there)
        refuse_blank(("INVENTORY", inventory), required=True)
        refuse_blank(("--limit", limit), ("--resume", resume), ("--canary-group", canary_group),
                     ("--journal-dir", journal_dir))
        options = rollout.Options(inventory=Path(inventory), dry_run=dry_run, limit=limit,
                                  batches=batches, canary_group=canary_group,
                                  reason=reason or "fleet rollback", resume=resume,
                                  maintenance=maintenance, end_sessions=end_sessions,
                                  journal_dir=None if journal_dir is None else Path(journal_dir))
        if not dry_run and not yes and not stdin_is_terminal():
            raise UsageError("`runbook fleet rollback` changes hosts and stdin is not a "
                             "terminal, so nobody can confirm it; nothing was changed",
                             "pass --yes to confirm it in advance, or --dry-run to see the plan")

        def confirm(plan: str) -> bool:
            if not echo(plan, err=True):  # a plan nobody could read: not confirmed
                return False
            try:
                return ask("Proceed?")  # Ctrl-D: not confirmed
            except KeyboardInterrupt:
                echo("", err=True)  # the prompt's line ends
                raise  # the fleet's own Ctrl-C path: journaled

        def say(message: str) -> None:
            if fmt is Format.text:
                echo(f"runbook: fleet: {message}", err=True)

        result = rollout.rollback(options, confirm=None if (yes or dry_run) else confirm,
                                  say=say)
    except rollout.FleetError as exc:
        lines = list(exc.lines)
        if exc.journal_file:
            lines.append(f"Fleet journal: {exc.journal_file}")
        # as a finished run's: the file written, "" for none (a dry run writes none)
        _fail(exc, fmt, lines, journal_file=str(exc.journal_file or ""), **exc.fields)
        return
    except RunbookError as exc:
        _fail(exc, fmt, journal_file="")
        return
    if fmt is Format.json:
        echo(json.dumps({"ok": result.exit_code == 0, "fleet_run_id": result.fleet_run_id,
                         "exit_code": result.exit_code, "lines": result.lines,
                         # each host's plan: its steps as its own `runbook rollback --dry-run
                         # --format json` has them (null: an older host's, said by summary)
                         "plans": {h: None if p is None else
                                   {"summary": p["summary"], "steps": p["steps"]}
                                   for h, p in result.plans.items()},
                         # the maintenance path's drain and restore, as planned there
                         "maintenance": _steps_of(result.maintenance),
                         "journal_file": str(result.journal_file or ""),
                         "fleet_lock_release_failed":
                             result.journal.get("fleet_lock_release_failed"),
                         "record": result.journal}, default=str))
    else:
        for line in result.lines:
            echo(line)
    raise typer.Exit(result.exit_code)


def _steps_of(maintenance: dict[str, Any] | None) -> dict[str, Any] | None:
    """The maintenance plans for --format json: each drain's and the restore's summary and
    steps (as that host's own dry run's JSON has them), the restore's host and command."""
    if maintenance is None:
        return None

    def short(plan: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if plan is None else {"summary": plan["summary"], "steps": plan["steps"]}

    restore = maintenance["restore"]
    return {"drain": {h: short(p) for h, p in maintenance["drain"].items()},
            "restore": {"host": restore["host"], "command": restore["command"],
                        **(short(restore["plan"]) or {"summary": None, "steps": None})}}


@fleet_app.command("host-check")
def host_check_cmd(env: EnvArg, config: ConfigOpt = None,
                   to: Annotated[str | None, typer.Option("--to")] = None,
                   restore_snapshot: Annotated[bool, typer.Option(
                       "--restore-snapshot", help="dry-run the rollback with the snapshot "
                       "restore (the maintenance path's database host)")] = False,
                   schema_restored_first: Annotated[bool, typer.Option(
                       "--schema-restored-first", help="the fleet restores the database "
                       "before this host rolls back (the maintenance path's other hosts): the "
                       "schema guard's refusal is reported, every other check still runs")
                   ] = False,
                   end_sessions: Annotated[bool, typer.Option(
                       "--end-sessions", help="with --restore-snapshot: the fleet's restore "
                       "ends other sessions on the database, so its plan does too")] = False,
                   take_lock: Annotated[bool, typer.Option(
                       "--take-lock", help="take the fleet lock first (the fleet lock host: "
                       "one SSH round trip for both); needs --fleet-run")] = False,
                   fleet_run: Annotated[str | None, typer.Option("--fleet-run")] = None,
                   holder: Annotated[str, typer.Option("--holder")] = "unknown",
                   controller_host: ControllerHostOpt = None,
                   pid: PidOpt = None,
                   take_over: Annotated[str, typer.Option(
                       "--take-over", metavar="FLEET_RUN_ID", help="take over that fleet "
                       "run's lock (its controller was found dead)")] = "",
                   reason: ReasonOpt = None) -> None:
    """(Run by the fleet on each host.) Read-only pre-flight of this host, as JSON (with
    --take-lock: the fleet lock taken first)."""
    from runbook.fleet import hostcheck

    if take_lock and not fleet_run:
        _fail(UsageError("--take-lock needs --fleet-run ID", "this is run by `runbook fleet "
                         "rollback`; see --help"))
    lock = None
    if take_lock:
        try:
            host, process = _controller("--take-lock", holder, controller_host, pid)
        except RunbookError as exc:
            _fail(exc)
        lock = {"fleet_run_id": str(fleet_run), "locked_by": holder, "hostname": host,
                "pid": process, "reason": reason or "fleet rollback", "take_over": take_over}
    from runbook.redact import redact

    data = hostcheck.check(env, config, to, restore=restore_snapshot, take_lock=lock,
                           schema_restored_first=schema_restored_first,
                           end_sessions=end_sessions)
    echo(redact(json.dumps(data, default=str)))
    # the first problem's own code (a config error is 2, as its JSON says), else 0
    raise typer.Exit(int(data["problems"][0].get("exit_code", 4)) if data["problems"] else 0)


@fleet_app.command("drain")
def drain_cmd(env: EnvArg, config: ConfigOpt = None,
              undo: Annotated[str | None, typer.Option(
                  "--undo", metavar="CONTAINERS", help="start again these containers (comma-"
                  "separated NAME@ID, as the drain answered them) that a drain stopped, each "
                  "only if its name still holds that Id (a bare NAME: the Id this host's log "
                  "says its last drain stopped)")] = None,
              fleet_run: Annotated[str, typer.Option(
                  "--fleet-run", help="the fleet run draining (or undraining) this host, for "
                  "its log")] = "",
              holder: Annotated[str, typer.Option(
                  "--holder", help="who runs that fleet run, for its log")] = "") -> None:
    """(Run by the fleet's maintenance path.) Stop this host's app slots under the deploy
    lock, journaled: THE SERVICE IS DOWN (--undo: start them again, the same way)."""
    from runbook.fleet import drain

    try:
        env_ = load_env(env, config)
        out = (drain.undo(env_, drain.parse_undo(undo), fleet_run=fleet_run,
                          holder=holder, notify=notice) if undo is not None
               else drain.drain(env_, fleet_run=fleet_run, holder=holder, notify=notice))
    except drain.Answered as exc:  # refused after some changes: what it changed, as fields
        _fail(exc, Format.json, **exc.answer)
    except RunbookError as exc:
        _fail(exc, Format.json)
    echo(json.dumps(out))


@fleet_app.command("lock")
def lock_cmd(
    env: EnvArg,
    status: Annotated[bool, typer.Option("--status", help="show the fleet lock (the "
                                         "default)")] = False,
    take: Annotated[bool, typer.Option("--take")] = False,
    refresh: Annotated[bool, typer.Option("--refresh")] = False,
    release: Annotated[bool, typer.Option("--release")] = False,
    force: Annotated[bool, typer.Option("--force", help="with --release: remove a stale fleet "
                                        "lock, whoever holds it; one dated in the future (the "
                                        "clock set back) is re-dated to read stale in minutes "
                                        "unless its controller's heartbeat comes; never a live "
                                        "run's")] = False,
    fleet_run: Annotated[str | None, typer.Option("--fleet-run")] = None,
    holder: Annotated[str, typer.Option("--holder")] = "unknown",
    controller_host: ControllerHostOpt = None,
    pid: PidOpt = None,
    take_over: Annotated[str, typer.Option("--take-over", metavar="FLEET_RUN_ID")] = "",
    reason: ReasonOpt = None, config: ConfigOpt = None,
) -> None:
    """The fleet lock on this host: --status (default); --take/--refresh/--release (fleet);
    --release --force (on-call: removes a stale lock, re-dates one dated in the future)."""
    from runbook.environment import command_arg
    from runbook.fleet import hostlock

    env_ = None
    try:
        env_ = load_env(env, config)
        if status and (take or refresh or release):
            raise UsageError("--status only reads the fleet lock", "drop --status, or the "
                             "--take/--refresh/--release the fleet itself runs")
        if force and (take or refresh or not release):
            raise UsageError("--force only goes with --release", "`runbook fleet lock "
                             f"{command_arg(env_)} --release --force` removes a stale fleet "
                             "lock, and re-dates one dated in the future")
        if (take or refresh or release) and not fleet_run and not force:
            raise UsageError("--take, --refresh and --release need --fleet-run ID",
                             "these are run by `runbook fleet rollback`; on-call removes a "
                             "stale lock (and re-dates one dated in the future) with "
                             "--release --force")
        if force:
            out = hostlock.force_release(env_, fleet_run)
        elif take:
            host, process = _controller("--take", holder, controller_host, pid)
            out = hostlock.take(env_, fleet_run_id=str(fleet_run), locked_by=holder,
                                hostname=host, pid=process,
                                reason=reason or "fleet rollback", take_over=take_over)
        elif refresh:
            out = hostlock.refresh(env_, str(fleet_run))
        elif release:
            out = hostlock.release(env_, str(fleet_run))
        else:
            held = hostlock.status(env_)
            out = held.to_json() if held else {"locked": False}
        # every answer says how this host names its environment (the fixes the controller
        # prints for the lock host, which runs no host-check when --limit leaves it out)
        out.setdefault("environment_arg", command_arg(env_))
    except RunbookError as exc:
        where: dict[str, Any] = hostlock.checked(env_) if env_ is not None else {}
        _fail(exc, Format.json, holder=exc.holder if isinstance(exc, LockedError) else None,
              **where)
    echo(json.dumps(out, default=str))
