"""`runbook docs` and `runbook drill`: the living runbook and the drill report from a terminal.

Registered on the main app by runbook/cli.py. Everything heavy (gherkin, the report renderer,
pytest in a subprocess) is imported or started inside the commands, so `runbook --help` stays
fast.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPORT = Path("reports/drill")


def docs(
    features: Annotated[Path, typer.Option("--features", help="directory of .feature files")
                        ] = REPO_ROOT / "features",
    out: Annotated[Path, typer.Option("--out", help="the Markdown runbook (committed)")
                   ] = REPO_ROOT / "docs" / "runbook.md",
    html: Annotated[Path | None, typer.Option(
        "--html", help="the self-contained HTML runbook [default: reports/runbook.html]")
    ] = None,
    report: Annotated[Path | None, typer.Option(
        "--report", help="a drill report directory (or its report.json): fills in "
                         "'last verified' for each scenario")] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="write nothing; exit 1 when OUT differs from a fresh render")] = False,
) -> None:
    """Render the runbook from features/: docs/runbook.md and an HTML page, in on-call order."""
    from runbook import docs as docmod
    from runbook import report as reports

    if not features.is_dir():
        typer.echo(f"runbook: error: {features} is not a directory of .feature files", err=True)
        raise typer.Exit(2)
    data = None
    note = ""
    if report is not None:
        try:
            data = reports.load(report)
        except (OSError, ValueError) as exc:
            typer.echo(f"runbook: error: cannot read the drill report {report}: {exc}",
                       err=True)
            raise typer.Exit(2) from None
        note = (f"drill report of {data.get('finished_at') or data.get('started_at')} "
                f"({data.get('environment')})")
    try:
        markdown, page = docmod.render(features, docmod.STEPS_DIR, data, note)
    except ImportError as exc:
        typer.echo(f"runbook: error: {exc}; install the test extras: pip install -e '.[test]'",
                   err=True)
        raise typer.Exit(2) from None
    if check:
        current = out.read_text(encoding="utf-8") if out.is_file() else ""
        if current != markdown:
            typer.echo(f"{out} is stale: run `runbook docs` and commit it", err=True)
            raise typer.Exit(1)
        typer.echo(f"{out} is up to date")
        return
    html_path = html or REPO_ROOT / "reports" / "runbook.html"
    for path, text in ((out, markdown), (html_path, page)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {path}")


def _absolute(arg: str) -> str:
    """A path argument made absolute, since pytest runs from the repository."""
    path, sep, rest = arg.partition("::")
    if arg.startswith("-") or not path or not Path(path).exists():
        return arg
    return str(Path(path).resolve()) + sep + rest


def _has_target(args: list[str]) -> bool:
    """Did the user name what to run (a .feature, a node id, a directory)?"""
    return any(not a.startswith("-") and (a.endswith(".feature") or "::" in a
                                          or Path(a).is_dir()) for a in args)


def drill(
    ctx: typer.Context,
    report: Annotated[Path, typer.Option("--report", help="where the drill report goes")
                      ] = DEFAULT_REPORT,
) -> None:
    """Run the runbook's features (a drill by default) and write a drill report.

    Extra arguments go to pytest, e.g. `runbook drill -k rollback` or `runbook drill --env
    prod --dry-run`. Runs `python -m pytest features/ --report DIR ...` from the repository.
    """
    args = [_absolute(a) for a in ctx.args]
    target = report.expanduser().resolve()
    argv = [sys.executable, "-m", "pytest"]
    if not _has_target(args):
        argv.append("features/")
    argv += ["--report", str(target), *args]
    typer.echo("+ " + " ".join(argv), err=True)
    code = subprocess.run(argv, cwd=REPO_ROOT, check=False).returncode
    if (target / "report.html").is_file():
        typer.echo(f"drill report: {target / 'report.html'}")
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("docs")(docs)
    app.command("drill", context_settings={"allow_extra_args": True,
                                           "ignore_unknown_options": True})(drill)
