"""`runbook state ...`: the deployment state file's own commands (restore-kept)."""

from __future__ import annotations

from typing import Annotated

import typer

from runbook.cli_common import fail, load_env, run_action
from runbook.cli_options import ConfigOpt, DryRunOpt, EnvArg, Format, FormatOpt, ReasonOpt, YesOpt
from runbook.errors import RunbookError

state_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="The deployment state file: put back the copy the runbook kept.")


@state_app.command("restore-kept")
def restore_kept(
    env: EnvArg,
    force: Annotated[bool, typer.Option("--force", help="restore the copy even though it "
                                        "contradicts what runs (Caddy's slot, its version)")
                     ] = False,
    dry_run: DryRunOpt = False, yes: YesOpt = False, fmt: FormatOpt = Format.text,
    config: ConfigOpt = None, reason: ReasonOpt = None,
) -> None:
    """Put back the copy of the state file the runbook kept, when the file is empty, cut
    short, not JSON, deleted or has a record the reader refuses (never over a file that
    reads whole, nor one created meanwhile), checked against what runs."""
    from runbook import restore_kept as rk

    try:
        environment = load_env(env, config)
    except RunbookError as exc:
        fail(exc, fmt)
    options = rk.Options(force=force, reason=reason or "restore the kept state file")
    run_action(lambda **kw: rk.restore_kept(environment, options, dry_run=dry_run, **kw), fmt,
               yes=yes, dry_run=dry_run, what="`runbook state restore-kept`")
