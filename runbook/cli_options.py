"""Option types shared by every `runbook` command module (one definition, no conversions).

Kept apart from cli.py so sub-apps can import them without importing cli.py itself, which
`python -m runbook.cli` would otherwise load twice.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

ENV_HELP = ("development, staging, production (alias: prod), or a path to an environment "
            "TOML file")


class Format(StrEnum):
    text = "text"
    json = "json"


EnvArg = Annotated[str, typer.Argument(help=ENV_HELP, metavar="ENV")]
ConfigOpt = Annotated[str | None, typer.Option(
    "--config", envvar="RUNBOOK_CONFIG", help="environment TOML file (wins over ENV's default)")]
FormatOpt = Annotated[Format, typer.Option("--format", help="text for people, json for machines")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="print the plan with every resolved "
                                         "value and change nothing")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="why, for the journal")]
AcceptRestoredDataOpt = Annotated[bool, typer.Option(
    "--accept-restored-data", help="start the app even on a restored database whose check "
    "failed (it does not match its snapshot; see `runbook status`), once you have checked that "
    "data; the plan and the journal say so (default: refuse, exit 4, nothing changed)")]
MovedFromOpt = Annotated[str | None, typer.Option(
    "--moved-from", metavar="HOST:PORT",
    help="the snapshot restored was taken from HOST:PORT (its sidecar says so), and that "
         "server is this database before it moved: accept it (default: refused as another "
         "server's)")]
