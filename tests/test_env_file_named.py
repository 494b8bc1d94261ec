"""A fix that says "in the environment file" names the file: the one this command read, or,
for the packaged defaults (rewritten by every upgrade), the host's own file that overrides
them (found by the hand-built host review: on-call did not know which file to edit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer

from runbook import cli_common, environment
from runbook.cli_options import Format
from runbook.errors import PreconditionError
from tests.drill_checks import closed_port

pytestmark = pytest.mark.any_shape


@pytest.fixture(autouse=True)
def _fresh() -> None:
    cli_common._LOADED.clear()


def _fail(fmt: Format = Format.text) -> None:
    with pytest.raises(typer.Exit) as done:
        cli_common.fail(PreconditionError("Compose cannot recreate green; nothing was changed",
                                          "set [compose] file in the environment file"), fmt)
    assert done.value.exit_code == 4


def test_the_fix_names_the_environment_file_this_command_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "production.toml"
    source.write_text(environment.to_toml(environment.from_mapping({
        "name": "production",
        "slots": {"blue": {"container": "blue", "service": "b", "port": closed_port()},
                  "green": {"container": "green", "service": "g", "port": closed_port()}},
    }, source)))
    cli_common.load_env("production", str(source))
    _fail(Format.json)
    out = capsys.readouterr()
    assert f"set [compose] file in the environment file {source}" in out.err, out.err
    assert json.loads(out.out)["fix"] == f"set [compose] file in the environment file {source}"


def test_for_the_packaged_defaults_it_names_the_hosts_own_file(
        capsys: pytest.CaptureFixture[str]) -> None:
    if (environment.SYSTEM_DIR / "staging.toml").exists():
        pytest.skip("this machine has its own /etc/togather-runbook/staging.toml")
    env = cli_common.load_env("staging", None)
    assert env.source is not None and env.source.parent == environment.BUILTIN_DIR
    _fail()
    err = capsys.readouterr().err
    assert f"set [compose] file in the host's own environment file: copy {env.source} to " \
        "/etc/togather-runbook/staging.toml and change it there (that file replaces the " \
        "packaged defaults whole)" in err, err


def test_without_a_loaded_environment_the_words_stay(capsys: pytest.CaptureFixture[str]) -> None:
    _fail()
    assert "set [compose] file in the environment file\n" in capsys.readouterr().err + "\n"
