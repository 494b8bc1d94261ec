"""Secrets in what the CLI prints that does not come from the runbook's own database URL: an
app's /health text, an argument, a password in the URL's query string (no container)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runbook import database
from runbook import environment as envmod
from runbook.environment import Slot
from runbook.errors import ConfigError
from tests.drill_checks import host_env, pytest_with_report, serving

REPO_ROOT = Path(__file__).resolve().parents[1]
DSN_PASSWORD, REDIS_PASSWORD = "S3cretPw-Kx81", "R3disPw-Lq27"
UNHEALTHY = {"status": "unhealthy", "checks": {
    "database": {"status": "fail",
                 "message": f"dial postgres://togather:{DSN_PASSWORD}@togather-db:5432/togather"},
    "cache": {"status": "fail", "message": f"redis AUTH failed with password={REDIS_PASSWORD}"},
}}


def runbook(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    return subprocess.run([sys.executable, "-m", "runbook.cli", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, env=env,
                          check=False, cwd=REPO_ROOT)


def unhealthy_app(answer: dict[str, Any]) -> Any:
    """A real HTTP server on loopback answering every GET with 503 and `answer` as JSON."""
    return serving(503, json.dumps(answer).encode())


@pytest.fixture
def leaky_app() -> Iterator[int]:
    """An app whose /health answers 503 with its secrets in the checks' messages."""
    with unhealthy_app(UNHEALTHY) as port:
        yield port


@pytest.mark.parametrize("fmt", ["table", "json", "simple"])
def test_healthcheck_masks_the_apps_secrets(tmp_path: Path, leaky_app: int, fmt: str) -> None:
    env = host_env(tmp_path)
    env = env.with_(slots={s: dataclasses.replace(c, port=leaky_app) if s is Slot.BLUE else c
                           for s, c in env.slots.items()})
    source = tmp_path / "host.toml"
    source.write_text(envmod.to_toml(env))
    done = runbook("healthcheck", str(source), "--slot", "blue", "--format", fmt)
    said = done.stdout + done.stderr
    assert done.returncode == 1, said  # unhealthy: documented exit 1
    assert "database" in said and "cache" in said  # the checks are shown, masked
    assert DSN_PASSWORD not in said and REDIS_PASSWORD not in said, said
    if fmt == "json":
        json.loads(done.stdout)


def test_an_argument_holding_a_password_is_masked_in_the_error(tmp_path: Path) -> None:
    for fmt in ("text", "json"):
        done = runbook("status", "postgresql://togather:Hunter2Secret@db/togather",
                       "--format", fmt)
        said = done.stdout + done.stderr
        assert done.returncode == 2 and "Hunter2Secret" not in said, said
        assert "Traceback" not in said


@pytest.mark.parametrize(("where", "line", "key"), [
    ("[database]", 'password = "Zq9-Tr0ub4dor-x"', "database.password"),
    ("[caddy]", 'api_token = "Zq9-Tr0ub4dor-x"', "caddy.api_token"),
    ("[rollback]", 'secret = "Zq9-Tr0ub4dor-x"', "rollback.secret"),
])
def test_an_unknown_key_named_like_a_secret_is_said_unknown_and_its_value_never(
        tmp_path: Path, where: str, line: str, key: str) -> None:
    """Found by review: `database.password = "..."` in the environment file printed
    `database.password: *** key`: the redactor took the problem's first word, after the
    key and its colon, for the password's value. The key is named with "unknown key"; its
    value, which the message never quoted, still shows nowhere."""
    source = tmp_path / "host.toml"
    source.write_text(envmod.to_toml(host_env(tmp_path)).replace(where, f"{where}\n{line}", 1))
    for fmt in ("text", "json"):
        done = runbook("status", str(source), "--format", fmt)
        said = done.stdout + done.stderr
        assert done.returncode == 2 and "Traceback" not in said, said
        assert "Tr0ub4dor" not in said and "*** key" not in said, said
        assert f"unknown key {key} (known: " in said, said


@pytest.mark.parametrize("password,bare", [("hun&ter2pw", "'&'"), ("s3cr et", "' '")])
def test_a_query_string_password_is_checked_and_registered(password: str, bare: str) -> None:
    """libpq reads `?password=` too; unencoded, its error quoted the password back
    ('missing key/value separator "=" in URI query parameter: "ter2pw"')."""
    url = f"postgresql://togather@127.0.0.1:1/togather?sslmode=disable&password={password}"
    with pytest.raises(ConfigError) as info:
        database.check_url(url, "DATABASE_URL", "env file")
    assert bare in info.value.message and "percent-encode" in (info.value.fix or "")
    assert not any(part in str(info.value) for part in password.replace("&", " ").split())
    assert password in database.secrets_of(url)
    assert set(password.replace("&", " ").split()) <= database.secrets_of(url)
    fine = "postgresql://togather@127.0.0.1:1/togather?password=hun%26ter2pw&sslmode=disable"
    database.check_url(fine, "DATABASE_URL", "env file")  # encoded, then another key: fine


def test_the_health_gates_live_progress_masks_the_apps_secrets(tmp_path: Path,
                                                                leaky_app: int) -> None:
    """The gate's "attempt N: ..." lines on the terminal quote the app's failing checks: they
    went to the screen unmasked while the journal and `healthcheck` masked the same text."""
    from runbook import slots
    from runbook.errors import RunbookError
    from runbook.plan import Plan
    from runbook.run import perform

    env = host_env(tmp_path)
    env = env.with_(slots={s: dataclasses.replace(c, port=leaky_app) if s is Slot.BLUE else c
                           for s, c in env.slots.items()},
                    health=dataclasses.replace(env.health, timeout=1.0))
    shown: list[str] = []

    def progress(event: str, step: object, message: str = "") -> None:
        shown.append(message)

    with pytest.raises(RunbookError):
        perform(env, "rollback", lambda run_id: Plan("rollback", env, "test", [
            slots.gate_step(env, Slot.BLUE, force=False, expected_version=None)]),
            dry_run=False, reason="test", progress=progress)
    notes = [m for m in shown if m.startswith("attempt")]
    assert notes and any("dial postgres://" in m for m in notes), shown  # the checks are said
    assert not any(DSN_PASSWORD in m or REDIS_PASSWORD in m for m in shown), notes


# --- known secrets mask the password, not the words it is made of ------------------------------

WORDY_URL = "postgresql://togather:Winter%402025%2Fgreen@127.0.0.1:1/togather"


def host_with_wordy_password(tmp_path: Path) -> Path:
    """A host whose database password is made of ordinary words (`Winter@2025/green`, well
    encoded) and whose env file's POSTGRES_PASSWORD is the dev default `togather`, recording
    a deployment on green made on 2025-03-01."""
    from datetime import UTC, datetime

    from runbook import state as states

    env_file = tmp_path / ".env"
    env_file.write_text(f"DATABASE_URL={WORDY_URL}\nPOSTGRES_PASSWORD=togather\n")
    env_file.chmod(0o600)
    env = host_env(tmp_path)
    env = env.with_(database=dataclasses.replace(env.database, env_file=env_file))
    states.write_state(env.state_file, states.DeploymentState(
        environment=env.name, current=states.Deployment(
            id="d1", version="abc1234", git_commit="abc1234" + "0" * 33,
            deployed_at=datetime(2025, 3, 1, 10, 15, tzinfo=UTC), deployed_by="ops",
            active_slot=Slot.GREEN)))
    source = tmp_path / "host.toml"
    source.write_text(envmod.to_toml(env))
    return source


def test_status_masks_a_wordy_password_but_not_the_words_in_it(tmp_path: Path) -> None:
    """Found by review: the pieces of a decoded password (`green`, `2025`) were registered
    as secrets, so status printed `current abc1234 on *** (... ***-03-01T10:15:00Z)`,
    `togather-server-***` and JSON `"slot": "***"`."""
    source = str(host_with_wordy_password(tmp_path))
    text = runbook("status", source)
    data = runbook("status", source, "--format", "json")
    for done in (text, data):
        said = done.stdout + done.stderr
        assert "Traceback" not in said and "Winter" not in said, said
    assert "current   abc1234 on green (" in text.stdout, text.stdout
    assert "2025-03-01T10:15:00Z" in text.stdout and "togather-server-green" in text.stdout
    report = json.loads(data.stdout)
    assert report["current"]["slot"] == "green"
    assert report["current"]["deployed_at"] == "2025-03-01T10:15:00Z"
    assert report["slots"]["green"]["container"]["name"] == "togather-server-green"


def test_a_well_encoded_password_is_registered_whole_a_misencoded_one_in_pieces() -> None:
    assert database.secrets_of(WORDY_URL) == {"Winter%402025%2Fgreen", "Winter@2025/green"}
    cut = database.secrets_of("postgresql://togather:Winter@2025/green@127.0.0.1:1/togather")
    assert {"Winter@2025/green", "Winter", "2025/green", "green"} <= cut


@pytest.mark.parametrize(("text", "expected"), [
    ("togather-server-blue", "togather-server-blue"),
    ("docker compose -p togather_prod up", "docker compose -p togather_prod up"),
    ("snapshot togather.2026-03-01.sql.gz", "snapshot togather.2026-03-01.sql.gz"),
    ("xtogathery", "xtogathery"),
    ("said 'togather' to psql", "said '***' to psql"),
    ("user togather logged in", "user *** logged in"),
    ("connect as togather:togather@db", "connect as ***:***@db"),
    ("key\ttogather\n", "key\t***\n"),
])
def test_a_weak_known_value_is_masked_only_as_a_whole_token(text: str, expected: str) -> None:
    """A known value that is also a word (the dev POSTGRES_PASSWORD `togather`) masked every
    container, network and snapshot name; where it stands alone it is still masked."""
    from runbook.redact import redact

    assert redact(text, {"togather"}) == expected


def test_a_strong_known_value_is_masked_even_inside_a_word() -> None:
    from runbook.redact import redact

    assert redact("xWinter@2025/greeny and Winter%402025%2Fgreen",
                  {"Winter@2025/green"}) == "x***y and ***"


# --- every command registers the environment's known secrets -----------------------------------

ENV_SECRET = "Winter,2025;Kx&91"  # the patterns' `password=` value stops at `,` `;` `&`


@pytest.fixture
def app_quoting_the_env_secret() -> Iterator[int]:
    """An app whose /health answers 503 quoting the env file's secret after `password=`."""
    with unhealthy_app({"status": "unhealthy", "checks": {"cache": {
            "status": "fail", "message": f"AUTH failed: password={ENV_SECRET} rejected"}}},
    ) as port:
        yield port


def host_with_env_secret(tmp_path: Path, port: int) -> Path:
    """A host whose app env file holds REDIS_PASSWORD=ENV_SECRET and a deployment recorded by
    someone whose name quotes it (a tool's words in the state file, as status prints them)."""
    from datetime import UTC, datetime

    from runbook import state as states

    env_file = tmp_path / ".env"
    env_file.write_text("DATABASE_URL=postgresql://togather:Db-Pw-9x2@127.0.0.1:1/togather\n"
                        f"REDIS_PASSWORD='{ENV_SECRET}'\n")
    env_file.chmod(0o600)
    env = host_env(tmp_path)
    env = env.with_(database=dataclasses.replace(env.database, env_file=env_file),
                    slots={s: dataclasses.replace(c, port=port) if s is Slot.BLUE else c
                           for s, c in env.slots.items()})
    states.write_state(env.state_file, states.DeploymentState(
        environment=env.name, current=states.Deployment(
            id="d1", version="abc1234", git_commit="abc1234" + "0" * 33,
            deployed_at=datetime(2025, 3, 1, 10, 15, tzinfo=UTC),
            deployed_by=f"ci password={ENV_SECRET}", active_slot=Slot.BLUE)))
    source = tmp_path / "host.toml"
    source.write_text(envmod.to_toml(env))
    return source


@pytest.mark.parametrize("command", [
    ("healthcheck", "--slot", "blue", "--format", "table"),
    ("healthcheck", "--slot", "blue", "--format", "json"),
    ("status",), ("status", "--format", "json"),
])
def test_status_and_healthcheck_mask_the_env_files_secrets_whole(
        tmp_path: Path, app_quoting_the_env_secret: int, command: tuple[str, ...]) -> None:
    """Found by review: only Journal.open registered the env file's secrets, so status and
    healthcheck masked by pattern alone, up to the first `,`: `password=***,2025;Kx&91`."""
    source = str(host_with_env_secret(tmp_path, app_quoting_the_env_secret))
    done = runbook(command[0], source, *command[1:])
    said = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in said, said
    assert "password=***" in said, said  # the text is shown, masked
    assert "2025;Kx" not in said and "Kx&91" not in said and "Winter" not in said, said


@pytest.mark.parametrize("args", [
    ("status", "production", "postgresql://u:hunter22@h/db"),  # an extra argument
    ("healthcheck", "--format", "password=hunter22"),  # a bad choice
    ("snapshot", "create", "production", "postgresql://u:hunter22@h/db"),  # a sub-app
])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_usage_error_masks_the_argument_it_quotes(args: tuple[str, ...], fmt: str) -> None:
    """Found by review: click's message (`Got unexpected extra argument(s) (...)`, `Invalid
    value for '--format': '...'`) was printed as is, on stderr and in the JSON."""
    extra = ("--format", "json") if fmt == "json" and "--format" not in args else ()
    done = runbook(*args, *extra)
    said = done.stdout + done.stderr
    assert done.returncode == 2 and "hunter22" not in said, said
    assert "runbook: error: " in done.stderr and "***" in done.stderr, said
    if extra:
        assert "***" in json.loads(done.stdout)["error"], done.stdout


# --- another tool's lock is printed masked and on one line ---------------------------------------

FORGED = "No problems found: the lock is free"


def host_with_a_forged_lock(tmp_path: Path, live: bool = False) -> Path:
    """A host whose state file records a lock (as the Go CLI writes one) by a holder whose
    name holds a newline and a forged line, for a reason quoting a password; expired, by a
    dead process of this host, so `unlock` may clear it (live: held by this test's process
    for an hour, so `unlock` refuses, naming it)."""
    import socket
    from datetime import UTC, datetime, timedelta

    from runbook import state as states

    env = host_env(tmp_path)
    now = datetime.now(UTC)
    since, until = (now, now + timedelta(hours=1)) if live else (
        datetime(2020, 1, 1, tzinfo=UTC), datetime(2020, 1, 1, 0, 30, tzinfo=UTC))
    states.write_state(env.state_file, states.DeploymentState(environment=env.name, lock={
        "locked": True, "locked_by": f"eve\n{FORGED}\x1b[2K", "hostname": socket.gethostname(),
        "pid": os.getpid() if live else 2 ** 22 + 1, "reason": "deploy with password=hunter22",
        "deployment_id": "dep_1\nforged too", "locked_at": states.format_time(since),
        "lock_expires_at": states.format_time(until)}))
    source = tmp_path / "host.toml"
    source.write_text(envmod.to_toml(env))
    return source


@pytest.mark.parametrize("args", [("--status",), ("--status", "--format", "json"), ("--yes",),
                                  ("--yes", "--format", "json")])
def test_unlock_prints_another_tools_lock_masked_on_one_line(tmp_path: Path,
                                                             args: tuple[str, ...]) -> None:
    """Found by review: `unlock --status` and `unlock` printed the lock's fields as written:
    a `locked_by` with a newline printed a line of its own, a reason its password."""
    done = runbook("unlock", str(host_with_a_forged_lock(tmp_path)), *args)
    said = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in said, said
    assert "hunter22" not in said and "\x1b" not in said, said
    assert not any(line.startswith(FORGED) for line in said.splitlines()), said
    text = json.dumps(json.loads(done.stdout)) if "json" in args else done.stdout
    assert "eve\\\\n" + FORGED in text or "eve\\n" + FORGED in text, text  # shown, escaped
    assert "password=***" in text, text


def test_unlock_refusing_another_tools_live_lock_names_it_on_one_line(tmp_path: Path) -> None:
    """The refusal (LockedError, said by fail(), which prints each line of a message) names
    the holder: its fields are escaped where the lock describes itself."""
    done = runbook("unlock", str(host_with_a_forged_lock(tmp_path, live=True)), "--yes")
    said = done.stdout + done.stderr
    assert done.returncode == 3 and "eve\\n" + FORGED in done.stderr, said
    assert "hunter22" not in said and "\x1b" not in said, said
    assert not any(FORGED in line and "eve" not in line for line in said.splitlines()), said


# --- the drill report masks what failed steps say ------------------------------------------------

REPORT_PASSWORD = "Drill-Pw-5mQz8"  # no pattern finds it bare: only its registration masks it

LEAKY_FEATURE = """\
Feature: Leaky
  Scenario: A step's assertion quotes the password
    Given the environment
    Then the check fails

  Scenario: A step's exception quotes it
    Given the environment
    Then the tool breaks

  Scenario: A step skips, quoting it
    Given the environment
    Then the tool skips
"""

LEAKY_STEPS = '''\
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from pytest_bdd import given, scenarios, then

from tests.drill_checks import host_env

scenarios("leaky.feature")
PASSWORD = {password!r}


@pytest.fixture
def environment(tmp_path):
    from urllib.parse import quote

    env_file = tmp_path / ".env"
    env_file.write_text(f"DATABASE_URL=postgresql://togather:{{quote(PASSWORD, safe='')}}"
                        f"@127.0.0.1:1/db\\\\nPOSTGRES_PASSWORD='{{PASSWORD}}'\\\\n")
    env = host_env(tmp_path)
    return env.with_(database=dataclasses.replace(env.database, env_file=env_file))


@given("the environment")
def given_env(environment):
    pass


@then("the check fails")
def check_fails():
    assert False, "it leaked " + PASSWORD + " here"


@then("the tool breaks")
def tool_breaks():
    raise RuntimeError("pg said: bad login " + PASSWORD + " (POSTGRES_PASSWORD=" + PASSWORD + ")"
                       + " args " + repr(["psql", PASSWORD]))


@then("the tool skips")
def tool_skips():
    pytest.skip("cannot reach " + PASSWORD)
'''


@pytest.mark.parametrize(("password", "workers"), [
    (REPORT_PASSWORD, 0), ('Tr0ub&dor<3"x', 0), ('Tr0ub4dor\\&3"x', 0), (REPORT_PASSWORD, 2)],
    ids=["one process", "characters XML and JSON escape", "a backslash repr escapes", "xdist"])
def test_the_drill_report_masks_the_password_in_step_errors_and_tracebacks(
        tmp_path: Path, password: str, workers: int) -> None:
    """Found by review: the report plugin stored step errors, scenario failures and their
    tracebacks as pytest gave them; a step that quoted the password put it in report.json
    and report.html. The plugin now registers the environment fixture's known secrets. Then
    junit.xml and cucumber.json (pytest's and pytest-bdd's own): masked as text they were
    left malformed (`PASSWORD=...` ate a closing quote), escaped forms passed, and under
    xdist the controller, which writes them, knew no secret. A step's error quoting it by
    repr() (a list of arguments) escaped its `\\`, and that form passed."""
    import re
    from xml.etree import ElementTree

    work = tmp_path / "leaky"
    work.mkdir()
    (work / "leaky.feature").write_text(LEAKY_FEATURE)
    (work / "test_leaky.py").write_text(LEAKY_STEPS.format(password=password))
    extra = ("-n", str(workers)) if workers else ()
    proc, out = pytest_with_report(work, "test_leaky.py", *extra)
    junit = ElementTree.parse(out / "junit.xml")  # still well-formed
    said = " ".join(e.text or "" for e in junit.iter()) + " ".join(
        v for e in junit.iter() for v in e.attrib.values())
    assert password not in said and "***" in said, said[:2000]
    cucumber = json.loads((out / "cucumber.json").read_text())
    assert password not in json.dumps(cucumber, ensure_ascii=False), "cucumber.json"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads((out / "report.json").read_text())
    scenarios = [s for f in data["features"] for s in f["scenarios"]]
    assert [s["status"] for s in scenarios] == ["failed", "failed", "skipped"], scenarios
    errors = [st["error"] for s in scenarios for st in s["steps"] if st["error"]]
    assert len(errors) == 3 and all("***" in e for e in errors), errors  # said, masked
    assert "it leaked *** here" in scenarios[0]["message"], scenarios[0]["message"]
    unescaped = re.split(r'[&<"\\]', password)[0]  # the start no format escapes
    for name in ("report.json", "report.html", "junit.xml", "cucumber.json"):
        assert unescaped not in (out / name).read_text(), name


def test_the_password_step_says_where_it_leaked_never_what(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: "the deployment log does not show the database password" listed every
    form of the real password it found in its assertion message, which the drill report and
    the terminal show. It names the place and the kind of form instead."""
    from types import SimpleNamespace
    from urllib.parse import quote

    from runbook.errors import PreconditionError
    from steps import outcomes

    password = "Dr1ll@0123456789ab/%x"  # the drill's shape: Dr1ll@<12 hex>/%x
    env_file = tmp_path / ".env"
    env_file.write_text(f"DATABASE_URL=postgresql://togather:{quote(password, safe='')}"
                        "@127.0.0.1:1/togather\n")
    env = host_env(tmp_path)
    env = env.with_(database=dataclasses.replace(env.database, env_file=env_file))
    env.log_dir.mkdir(parents=True)
    log = env.log_dir / "production_20260301_101500.log"
    log.write_text(f'{{"message": "connecting with {password}"}}\n')
    refusal = PreconditionError("the database schema is at 3, the build needs 4", "migrate")
    world = SimpleNamespace(env=env, refused=lambda: refusal, on_drill=True,
                            shown=[f"psql {quote(password, safe='')}", "core 0123456789ab"])
    monkeypatch.setattr(outcomes, "schema_in_postgres", lambda world: 3)
    with pytest.raises(AssertionError) as failed:
        outcomes.log_hides_password(world)  # type: ignore[arg-type]
    said = str(failed.value)
    assert str(log) in said and "the terminal" in said, said  # where
    assert "as written" in said and "percent-encoded" in said and "core" in said, said
    assert "0123456789ab" not in said and "Dr1ll" not in said, said  # never what


# --- what the app's /health says, cut or escaped, and the env file's other secrets -------------

def host_with_app(tmp_path: Path, port: int, env_text: str) -> Path:
    """A host whose blue slot is the loopback app on `port` and whose env file is
    `env_text`."""
    env_file = tmp_path / ".env"
    env_file.write_text(env_text)
    env_file.chmod(0o600)
    env = host_env(tmp_path)
    env = env.with_(database=dataclasses.replace(env.database, env_file=env_file),
                    slots={s: dataclasses.replace(c, port=port) if s is Slot.BLUE else c
                           for s, c in env.slots.items()})
    source = tmp_path / "host.toml"
    source.write_text(envmod.to_toml(env))
    return source


CUT_PASSWORD = "Dr1ll@7f3a9c2e41bd/%x"  # the drill's shape
CUT_PREFIX = "panic: runtime error: cannot open the database: postgres://togather:"


@pytest.mark.parametrize("command", [
    ("healthcheck", "--slot", "blue"), ("healthcheck", "--slot", "blue", "--format", "json")])
def test_a_plain_text_health_body_is_masked_before_it_is_cut(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    """Found by review: a /health body that is not JSON was cut to 80 characters, then
    masked: cut inside the URL, neither its pattern (no `@` left) nor the known password
    (only half of it left) matched, and that half printed in clear."""
    from urllib.parse import quote

    encoded = quote(CUT_PASSWORD, safe="")
    assert 6 < 80 - len(CUT_PREFIX) < len(encoded)  # the cut falls inside the password
    body = f"{CUT_PREFIX}{encoded}@togather-db:5432/togather (dial tcp: i/o timeout)\n"
    with serving(503, body.encode(), "text/plain") as port:
        source = host_with_app(tmp_path, port, f"DATABASE_URL=postgresql://togather:{encoded}"
                                               "@127.0.0.1:1/togather\n")
        done = runbook(command[0], str(source), *command[1:])
    said = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in said, said
    assert "not JSON" in said and "cannot open the database" in said, said  # shown, masked
    assert encoded[:6] not in said and CUT_PASSWORD[:6] not in said, said


WEAK_PASSWORD = "Sesameopensesame"  # all letters: masked only where it stands alone


@pytest.mark.parametrize("command", [
    ("healthcheck", "--slot", "blue"), ("healthcheck", "--slot", "blue", "--format", "json")])
def test_a_weak_password_after_an_escaped_newline_is_masked(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    """Found by review: a weak password is masked only as a whole word, and the health
    error quotes the body by repr(): `using\\nSesameopensesame`, the `n` of the escape glued
    to the password, which then printed in clear."""
    body = f"pq: login rejected for role togather using\n{WEAK_PASSWORD}\n".encode()
    with serving(503, body, "text/plain") as port:
        source = host_with_app(tmp_path, port, "DATABASE_URL=postgresql://togather:"
                                               f"{WEAK_PASSWORD}@127.0.0.1:1/togather\n")
        done = runbook(command[0], str(source), *command[1:])
    said = done.stdout + done.stderr
    assert done.returncode == 1 and "login rejected" in said, said
    assert WEAK_PASSWORD not in said, said


@pytest.mark.parametrize(("text", "expected"), [
    ("using\\nSesameopensesame", "using\\n***"),  # one_line()'s and repr()'s escapes
    ("a\\tSesameopensesame\\r", "a\\t***\\r"),
    ("x\\x1bSesameopensesame", "x\\x1b***"),
    ("\\u202eSesameopensesame", "\\u202e***"),
    ("xSesameopensesame", "xSesameopensesame"),  # inside a word: that word, as before
])
def test_an_escape_before_a_weak_known_value_is_a_boundary(text: str, expected: str) -> None:
    from runbook.redact import redact

    assert redact(text, {WEAK_PASSWORD}) == expected


def test_a_weak_known_value_one_line_escaped_is_masked() -> None:
    """one_line() (a lock's holder, a tool's words) escapes a newline into `\\n`."""
    from runbook.redact import one_line, redact

    assert redact(one_line(f"holder\n{WEAK_PASSWORD}"), {WEAK_PASSWORD}) == "holder\\n***"


# every name a secret goes by in an env file, and its value as the app quotes it, bare
ENV_SECRETS = {"DB_PASS": "Db-Pass-7Hq2", "PGPASS": "Pg-Pass-4Rt8", "SMTP_PASS": "Smtp-P-2Wq9",
               "API_TOKEN": "tok-A1b2C3d4", "JWT_SECRET_KEY": "Jwt-K3y-Zz9",
               "SMTP_PASSWD": "Smtp-Pw-5t", "APP_KEY": "base64:Qm9vLk3y"}


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_every_secret_the_env_file_names_is_masked_where_the_app_quotes_it(
        tmp_path: Path, fmt: str) -> None:
    """Found by review: only keys ending in PASSWORD or _SECRET were registered, so an app's
    /health quoting its DB_PASS, API_TOKEN, JWT_SECRET_KEY or SMTP_PASSWD (bare, no `key=`
    for a pattern to find) printed them in clear."""
    body = json.dumps({"status": "unhealthy", "checks": {"mail": {
        "status": "fail", "message": "rejected: " + " / ".join(ENV_SECRETS.values())}}})
    with serving(503, body.encode()) as port:
        source = host_with_app(tmp_path, port, "DATABASE_URL=postgresql://togather:Db-Pw-9x2Kq"
                               "@127.0.0.1:1/togather\n" + "".join(
                                   f"{k}={v}\n" for k, v in ENV_SECRETS.items())
                               + "SMTP_HOST=mail.example.com\n")
        done = runbook("healthcheck", str(source), "--slot", "blue", "--format", fmt)
    said = done.stdout + done.stderr
    assert done.returncode == 1 and "rejected: ***" in said, said
    assert not [v for v in ENV_SECRETS.values() if v in said], said


@pytest.mark.parametrize(("text", "expected"), [
    ("DB_PASS=hunter22x", "DB_PASS=***"),
    ("PGPASS=hunter22x SMTP_PASS='a b'", "PGPASS=*** SMTP_PASS='***'"),
    ("db_pass: hunter22x", "db_pass: ***"),
    ("--pass hunter22x", "--pass ***"),
    ("APP_KEY=base64:Qm9v", "APP_KEY=***"),
    # `pass` a part of a key's name only: never a word that holds it
    ("tests passed=12 bypass=on compass: north", "tests passed=12 bypass=on compass: north"),
    ("checks pass: 3 of 3; passes=2", "checks pass: 3 of 3; passes=2"),
])
def test_pass_is_a_secrets_name_only_as_a_part_of_a_key(text: str, expected: str) -> None:
    from runbook.redact import redact

    assert redact(text) == expected


@pytest.mark.parametrize(("name", "secret"), [
    ("DB_PASS", True), ("PGPASS", True), ("SMTP_PASS", True), ("APP_KEY", True),
    ("PASS", True), ("BYPASS_CACHE", False), ("TESTS_PASSED", False), ("PGPASSFILE", False)])
def test_pass_names_a_secret_in_an_environment_variable(name: str, secret: bool) -> None:
    from runbook.redact import holds_secret

    assert holds_secret(name, "hunter22x") is secret


@pytest.mark.parametrize(("url", "command"), [
    ("postgresql://togather:Pw-Kq81x@[::1:5432/togather", ("status",)),
    ("mysql://togather:Pw-Kq81x@127.0.0.1/togather", ("status",)),
    ("postgresql://127.0.0.1:1/togather", ("snapshot", "create")),
], ids=["libpq cannot read", "not postgresql", "no user"])
def test_a_fix_naming_the_urls_form_keeps_its_password_placeholder(
        tmp_path: Path, url: str, command: tuple[str, ...]) -> None:
    """The fix said `postgresql://USER:PASSWORD@HOST...`, which the URL pattern masked into
    `USER:***@HOST`: a placeholder on-call had to guess. `<password>` survives."""
    env_file = tmp_path / ".env"
    env_file.write_text(f"DATABASE_URL={url}\n")
    env_file.chmod(0o600)
    env = host_env(tmp_path)
    env = env.with_(database=dataclasses.replace(env.database, env_file=env_file))
    source = tmp_path / "host.toml"
    source.write_text(envmod.to_toml(env))
    done = runbook(*command, str(source), "--format", "json")
    said = done.stdout + done.stderr
    assert "Pw-Kq81x" not in said, said
    assert "postgresql://USER:<password>@HOST:PORT/DB" in said, said
    assert "USER:***@" not in said, said


# keys whose names hold a secret word without naming a secret, and ordinary values
ORDINARY_ENV = {"SECRETS_BACKEND": "production", "API_TOKEN_ISSUER": "togather",
                "ACCESS_TOKEN_TTL": "3600"}


def test_an_env_key_merely_holding_a_secret_word_is_no_known_secret(tmp_path: Path) -> None:
    """Found by review: every key redact.holds_secret names was registered, so
    SECRETS_BACKEND=production made status print `Environment ***` and
    API_TOKEN_ISSUER=togather the database's name `***`. Only keys whose name ends in a
    secret word are registered; a weak value only under a password's name."""
    source = host_with_app(tmp_path, 1, "DATABASE_URL=postgresql://togather:Db-Pw-9x2Kq"
                           "@127.0.0.1:1/togather\n" + "".join(
                               f"{k}={v}\n" for k, v in ORDINARY_ENV.items())
                           + "API_TOKEN=tok-A1b2C3d4\nJWT_KEY=shortk\nDB_PASS=hunter\n")
    env = envmod.load_file(source)
    known = database.known_secrets(env)
    assert not set(ORDINARY_ENV.values()) & known, known
    assert {"Db-Pw-9x2Kq", "tok-A1b2C3d4", "hunter"} <= known, known  # a password, even weak
    assert "shortk" not in known, known  # a weak value under a key's name: a word
    said = runbook("status", str(source))
    assert "production" in said.stdout and "Environment ***" not in said.stdout, said.stdout


@pytest.mark.parametrize(("url", "named"), [
    ("postgresql://${APP_DB_USER}:S3cr3t-pw@127.0.0.1:1/togather", "APP_DB_USER"),
    ("postgresql://togather:${POSTGRES_PASSWORD}@127.0.0.1:1/togather", "POSTGRES_PASSWORD"),
])
def test_a_braced_variable_in_the_url_is_named_never_a_secret(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, named: str) -> None:
    """Found by review: a `${NAME}` in the URL's user (or a deliberate `${POSTGRES_PASSWORD}`)
    was taken for a password's own `$`: the refusal told to write `$$`, and the name was
    registered, so redact("set POSTGRES_PASSWORD in ...") printed `set *** in ...`. A braced
    variable is meant: the refusal names it (export it), and it is never a secret."""
    from runbook.environment.model import read_env_entries, unresolved_error
    from runbook.redact import redact

    monkeypatch.delenv(named, raising=False)
    source = host_with_app(tmp_path, 1, f"DATABASE_URL={url}\n")
    entries = read_env_entries(tmp_path / ".env")
    error = str(unresolved_error(tmp_path / ".env", "DATABASE_URL", entries["DATABASE_URL"],
                                 entries))
    assert f"uses ${{{named}}}" in error and f"export {named}" in error, error
    assert "$$ for each literal" not in error, error
    known = database.known_secrets(envmod.load_file(source))
    assert not [k for k in known if named in k], known
    assert redact(f"set {named} in /opt/togather/.env.production") \
        == f"set {named} in /opt/togather/.env.production"


def test_a_defaulted_password_variable_is_no_secret_its_default_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POSTGRES_PASSWORD", raising=False)
    source = host_with_app(tmp_path, 1, "DATABASE_URL=postgresql://togather:"
                           "${POSTGRES_PASSWORD:-Ch4nge-me}@127.0.0.1:1/togather\n")
    known = database.known_secrets(envmod.load_file(source))
    assert "Ch4nge-me" in known and not [k for k in known if "POSTGRES_PASSWORD" in k], known


@pytest.mark.parametrize(("text", "expected"), [
    ("host mail-pass.example.org: unreachable", "host mail-pass.example.org: unreachable"),
    ("snapshot togather_app_20261206_pre-pass.sql.gz: restored",
     "snapshot togather_app_20261206_pre-pass.sql.gz: restored"),
    ("PASS=hunter22x", "PASS=***"),
    ("DB_PASS=hunter22x smtp_pass: hunter22x", "DB_PASS=*** smtp_pass: ***"),
])
def test_pass_names_a_secret_after_an_underscore_or_alone(text: str, expected: str) -> None:
    """Found by review: `-pass`/`.pass` counted as a key's name (a host, a snapshot's file
    had the next word masked), while a bare `PASS=` was not."""
    from runbook.redact import redact

    assert redact(text) == expected
