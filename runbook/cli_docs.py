"""`runbook docs` and `runbook drill`: the living runbook and the drill report from a terminal.

Registered on the main app by runbook/cli.py. Everything heavy (gherkin, the report renderer,
pytest in a subprocess) is imported or started inside the commands, so `runbook --help` stays
fast.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPORT = Path("reports/drill")


def _refuse(problem: str) -> NoReturn:
    """A bad option: one line, exit 2 (usage), before anything is rendered or written."""
    typer.echo(f"runbook: error: {problem}", err=True)
    raise typer.Exit(2)


def _paths(*given: tuple[str, str | None]) -> None:
    """Path options arrive as text: a blank one (an unset shell variable) was Path(""), the
    working directory: `--features ""` rendered it, `--html ""` failed writing to it after
    docs/runbook.md was written (found by review). Refused, exit 2, before anything."""
    from runbook.cli_common import fail, refuse_blank
    from runbook.errors import RunbookError

    try:
        refuse_blank(*given)
    except RunbookError as exc:
        fail(exc)


def _output_problem(option: str, value: str, *, folder: bool = False) -> str | None:
    """Why `value` (an output path, a file or with `folder` a folder to write into) cannot be
    written, or None. A blank one was the working directory (Path("") is "."), a folder or a
    path under a file an unexpected failure (exit 5) after the first file was already
    written (found by review)."""
    from runbook import files

    if not value.strip():
        return f"{option} is empty: give the path to write (an unset shell variable?)"
    path = Path(value).expanduser()
    if (long := files.name_too_long(str(path))) is not None:
        return f"{option} {files.shortened(value)}: {long}"
    if not folder and path.is_dir():
        return f"{option} {path} is a directory: give the file's path (e.g. {path / 'x'})"
    blocking = files.not_a_folder(path if folder else path.parent)
    if blocking is not None:
        return (f"{option} {path}: {blocking} is a file, not a directory: give a path in a "
                "directory")
    return None


def docs(
    features: Annotated[str, typer.Option("--features", metavar="<path>",
                                          help="directory of .feature files")
                        ] = str(REPO_ROOT / "features"),
    out: Annotated[str, typer.Option("--out", metavar="<path>",
                                     help="the Markdown runbook (committed)")
                   ] = str(REPO_ROOT / "docs" / "runbook.md"),
    html: Annotated[str | None, typer.Option(
        "--html", metavar="<path>",
        help="the self-contained HTML runbook [default: reports/runbook.html]")
    ] = None,
    report: Annotated[str | None, typer.Option(
        "--report", metavar="<path>", help="a drill report directory (or its report.json): "
                                           "fills in 'last verified' for each scenario")] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="write nothing; exit 1 when OUT differs from a fresh render")] = False,
) -> None:
    """Render the runbook from features/: docs/runbook.md and an HTML page, in on-call order."""
    from runbook import docs as docmod
    from runbook import report as reports

    _paths(("--features", features), ("--out", out), ("--html", html), ("--report", report))
    html_path = Path(html).expanduser() if html else REPO_ROOT / "reports" / "runbook.html"
    # every output checked before anything is rendered or written: a refusal writes nothing
    for option, value in (("--out", out), *((("--html", html),) if not check else ())):
        if value is not None and (problem := _output_problem(option, value)):
            _refuse(problem)
    folder = Path(features).expanduser()
    if not features.strip() or not folder.is_dir():
        _refuse(f"--features {features!r} is not a directory of .feature files")
    if not any(folder.glob("*.feature")):  # a runbook of no scenario written over the real one
        _refuse(f"--features: {folder} holds no .feature file: give the folder of the "
                "runbook's features (features/)")
    out_path = Path(out).expanduser()
    data = None
    note = ""
    if report is not None:
        try:
            data = reports.load(Path(report).expanduser())
        except (OSError, ValueError) as exc:
            typer.echo(f"runbook: error: cannot read the drill report {report}: {exc}",
                       err=True)
            raise typer.Exit(2) from None
        note = (f"drill report of {data.get('finished_at') or data.get('started_at')} "
                f"({data.get('environment')})")
    try:
        markdown, page = docmod.render(folder, docmod.STEPS_DIR, data, note)
    except ImportError as exc:
        typer.echo(f"runbook: error: {exc}; install the test extras: pip install -e '.[test]'",
                   err=True)
        raise typer.Exit(2) from None
    if check:
        current = out_path.read_text(encoding="utf-8") if out_path.is_file() else ""
        if current != markdown:
            typer.echo(f"{out_path} is stale: run `runbook docs` and commit it", err=True)
            raise typer.Exit(1)
        typer.echo(f"{out_path} is up to date")
        return
    for path, text in ((out_path, markdown), (html_path, page)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as exc:  # what the checks cannot see (permissions, a full disk)
            _refuse(f"cannot write {path}: {exc.strerror or exc}")
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
    report: Annotated[str, typer.Option("--report", metavar="<path>",
                                        help="where the drill report goes")
                      ] = str(DEFAULT_REPORT),
) -> None:
    """Run the runbook's features (a drill by default) and write a drill report.

    Extra arguments go to pytest, e.g. `runbook drill -k rollback` or `runbook drill --env
    prod --dry-run`. Runs `python -m pytest features/ --report DIR ...` from the repository.
    """
    # a blank --report was the working directory, a file a pytest INTERNALERROR (found by
    # review): refused before pytest starts
    _paths(("--report", report))
    if (problem := _output_problem("--report", report, folder=True)) is not None:
        _refuse(problem)
    args = [_absolute(a) for a in ctx.args]
    target = Path(report).expanduser().resolve()
    argv = [sys.executable, "-m", "pytest"]
    if not _has_target(args):
        argv.append("features/")
    argv += ["--report", str(target), *args]
    typer.echo("+ " + shlex.join(argv), err=True)
    code = subprocess.run(argv, cwd=REPO_ROOT, check=False).returncode
    if (target / "report.html").is_file():
        typer.echo(f"drill report: {target / 'report.html'}")
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("docs")(docs)
    app.command("drill", context_settings={"allow_extra_args": True,
                                           "ignore_unknown_options": True})(drill)
