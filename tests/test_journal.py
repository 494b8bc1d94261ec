"""The run log and the run record: valid JSON every line, secrets never written, steps timed."""

from __future__ import annotations

import inspect
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runbook import journal
from runbook.environment import Environment
from runbook.errors import ExitCode, LockedError, PreconditionError
from runbook.journal import MASK, MIN_SECRET_LENGTH, Journal, Level, new_run_id, redact
from tests.drill_checks import (
    DEPLOY_UID,
    OWNER_UID,
    SHARED_GID,
    as_deploy_user,
    host_env,
    needs_root,
)

REPO = Path(__file__).resolve().parents[1]
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def env(tmp_path: Path) -> Environment:
    return host_env(tmp_path, name="staging")


def lines(journal: Journal) -> list[dict[str, Any]]:
    text = journal.log_path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def record(journal: Journal) -> dict[str, Any]:
    return json.loads(journal.record_path.read_text())  # type: ignore[no-any-return]


# --- the log file ----------------------------------------------------------------------------


def test_log_file_name_modes_and_line_shape(env: Environment) -> None:
    j = Journal.open(env, "rollback", why="bad release")
    assert re.fullmatch(r"staging_\d{8}_\d{6}\.log", j.log_path.name)
    assert j.log_path.parent == env.log_dir
    assert j.run_id.startswith("rbk_")
    assert re.fullmatch(r"dep_[0-9a-f]{16}_[0-9a-f]{24}", new_run_id("deploy"))
    assert new_run_id("switch").startswith("run_")
    j.log("SUCCESS", "done", step="switch", duration_ms=12)
    for path in (j.log_path, j.record_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in (env.log_dir, env.runs_dir):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    first, last = lines(j)[0], lines(j)[-1]
    assert list(first)[:4] == ["timestamp", "level", "deployment_id", "message"]
    assert TIMESTAMP.fullmatch(last["timestamp"])
    assert last == {"timestamp": last["timestamp"], "level": "SUCCESS",
                    "deployment_id": j.run_id, "message": "done", "run_id": j.run_id,
                    "step": "switch", "duration_ms": 12}
    assert "bad release" in first["message"]


def test_lines_name_the_deployment_once_the_plan_does_and_always_the_run(
        env: Environment) -> None:
    """The contract's deployment_id is the deployment's (the id the state file and the
    pre-deploy snapshot's sidecar give it) once the run's plan names it; before, and for a
    run that names none, the run's own id. run_id always says which run wrote the line."""
    j = Journal.open(env, "deploy")
    j.log("INFO", "before the plan")
    j.for_deployment(None)  # a plan that names no deployment (a switch): unchanged
    j.for_deployment("dep_0123456789abcdef_0123456789abcdef01234567")
    j.log("INFO", "after the plan", run_id="a field of that name")
    j.finish("success", ExitCode.OK)
    entries = lines(j)
    assert [e["deployment_id"] for e in entries] == [j.run_id, j.run_id] + [
        "dep_0123456789abcdef_0123456789abcdef01234567"] * 2
    assert {e["run_id"] for e in entries} == {j.run_id}
    assert entries[2]["run_id_"] == "a field of that name"
    assert record(j)["deployment_id"] == "dep_0123456789abcdef_0123456789abcdef01234567"


class SameSecond(datetime):
    """The clock of runs started in one UTC second (2026-03-01 10:15:00.250)."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
        return datetime(2026, 3, 1, 10, 15, 0, 250000, tzinfo=UTC)


SECOND_LOG = "staging_20260301_101500"


def test_runs_started_in_the_same_second_each_write_their_own_log(
        env: Environment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the log was named by the second alone and opened for appending, so
    runs started in one second wrote into one file, and their records both named it. Each
    run has its own: the next one `<env>_<second>_2.log`, which sorts after the first and
    still matches the documented `<env>_*.log`."""
    monkeypatch.setattr(journal, "datetime", SameSecond)
    runs = [Journal.open(env, action, why=action) for action in ("rollback", "deploy", "switch")]
    runs[1].finish("failed", ExitCode.LOCKED)
    runs[0].finish("succeeded", ExitCode.OK)
    names = [j.log_path.name for j in runs]
    assert names == [f"{SECOND_LOG}.log", f"{SECOND_LOG}_2.log", f"{SECOND_LOG}_3.log"]
    assert sorted(p.name for p in env.log_dir.glob("staging_*.log")) == names
    for j in runs:
        assert {e["deployment_id"] for e in lines(j)} == {j.run_id}, j.log_path
        assert record(j)["log_file"] == str(j.log_path)
        assert stat.S_IMODE(j.log_path.stat().st_mode) == 0o600


def test_a_run_refused_by_the_lock_journals_its_refusal_in_its_own_log(
        env: Environment, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the journal opens before the lock is taken, so a run refused by the
    lock (exit 3) in the same second as the holder's wrote its "failed (exit code 3)" into
    the holder's log."""
    from runbook import lock as locks
    from runbook import run

    monkeypatch.setattr(journal, "datetime", SameSecond)
    holder = Journal.open(env, "rollback", why="holder")
    held = locks.acquire(env, reason="holder", run_id=holder.run_id)
    try:
        with pytest.raises(LockedError) as refused:
            run.perform(env, "rollback", lambda run_id: pytest.fail("planned without the lock"),
                        dry_run=False, reason="refused")
    finally:
        locks.release(env, held)
    holder.finish("succeeded", ExitCode.OK)
    assert refused.value.exit_code == ExitCode.LOCKED
    assert [e["level"] for e in lines(holder)] == ["INFO", "SUCCESS"]
    own = Path(refused.value.log_file)  # type: ignore[attr-defined]
    assert own != holder.log_path and own.name == f"{SECOND_LOG}_2.log"
    said = [json.loads(line) for line in own.read_text().splitlines()]
    assert said[-1]["message"] == "rollback failed (exit code 3)", said[-1]


@needs_root
def test_another_users_log_of_the_same_second_is_left_alone(shared_dir: Path) -> None:
    """A log folder the deploying users share: another user's log of the same second (0600,
    theirs) failed the run with exit 2 ("cannot write the log file", or its chmod's EPERM)
    before it even met the lock. The run writes its own file; theirs stays as it was."""
    env = host_env(shared_dir, name="staging")
    env.log_dir.mkdir()
    os.chown(env.log_dir, OWNER_UID, SHARED_GID)
    env.log_dir.chmod(0o770)
    theirs = env.log_dir / f"{SECOND_LOG}.log"
    theirs.write_text('{"theirs": true}\n')
    os.chown(theirs, OWNER_UID, SHARED_GID)
    theirs.chmod(0o600)
    imports = ("import sys\nfrom datetime import UTC, datetime\nfrom pathlib import Path\n"
               "from datetime import tzinfo\nfrom runbook import database, journal\n"
               "from tests.drill_checks import host_env\n" + inspect.getsource(SameSecond)
               + "env = host_env(Path(sys.argv[1]), name='staging')\n")
    code = ("journal.datetime = SameSecond\n"
            "j = journal.Journal.open(env, 'rollback')\n"
            "j.finish('succeeded', 0)\nprint(j.log_path)\n")
    mine = Path(as_deploy_user([SHARED_GID], imports, code, str(shared_dir)).strip())
    assert mine == env.log_dir / f"{SECOND_LOG}_2.log"
    assert mine.stat().st_uid == DEPLOY_UID and "rollback succeeded" in mine.read_text()
    after = theirs.stat()
    assert theirs.read_text() == '{"theirs": true}\n'
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (
        OWNER_UID, SHARED_GID, 0o600)



@needs_root
@pytest.mark.parametrize("folder", ["logs", "runs"])
def test_a_journal_folder_this_user_cannot_write_stops_the_run_before_anything(
        shared_dir: Path, folder: str) -> None:
    """Found by review: a runs folder this user cannot write (`~/.togather/runs` left root's
    by a `sudo -E` run) did not stop the run, as a log folder it cannot write does: its
    first record write only joined the write errors, and the run went on with no record, so
    a killed run left nothing `status`, a rerun or `snapshot cleanup` could read. Both stop
    it in one line naming the folder and the fix, exit 2, before the lock: nothing written."""
    env = host_env(shared_dir, name="staging")
    theirs, mine = ((env.log_dir, env.runs_dir) if folder == "logs"
                    else (env.runs_dir, env.log_dir))
    theirs.mkdir(mode=0o700)  # root's
    mine.mkdir(mode=0o700)
    os.chown(mine, DEPLOY_UID, DEPLOY_UID)
    imports = ("import json, sys\nfrom pathlib import Path\nfrom runbook import database, journal\n"
               "from runbook.errors import RunbookError\nfrom tests.drill_checks import host_env\n"
               "env = host_env(Path(sys.argv[1]), name='staging')\n")
    code = ("try:\n"
            "    j = journal.Journal.open(env, 'rollback')\n"
            "    print(json.dumps(['opened', j.write_errors]))\n"
            "except RunbookError as exc:\n"
            "    print(json.dumps([int(exc.exit_code), exc.message, exc.fix]))\n")
    said = json.loads(as_deploy_user([], imports, code, str(shared_dir)))
    assert said[0] == ExitCode.USAGE, said
    _, message, fix = said
    assert message.startswith("cannot write ") and f"{theirs}" in message, message
    assert message.endswith("Permission denied; nothing was changed"), message
    assert f"[logs] {'dir' if folder == 'logs' else 'runs_dir'}" in fix, fix
    assert list(env.log_dir.iterdir()) == [] and list(env.runs_dir.iterdir()) == []


def plant_links(env: Environment, victim: Path, seconds: int) -> None:
    """What another user who can write the log folder does: symlinks named as the next
    runs' logs, pointing at a file of the runbook's user."""
    env.log_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    for ahead in range(seconds):
        name = f"{env.name}_{datetime.fromtimestamp(now.timestamp() + ahead, UTC):%Y%m%d_%H%M%S}"
        for suffix in ("", "_2"):
            (env.log_dir / f"{name}{suffix}.log").symlink_to(victim)


def test_a_log_name_planted_as_a_symlink_is_passed_over(env: Environment,
                                                        tmp_path: Path) -> None:
    """Found by review: the log was opened and chmodded through a symlink: another local user
    who can write the log folder planted links named after the next seconds' logs, and the
    runbook appended its lines to, and chmodded, the file they pointed at. A name taken is a
    name taken: the run writes a new file of its own."""
    victim = tmp_path / "victim.conf"
    victim.write_text("important=1\n")
    victim.chmod(0o644)
    plant_links(env, victim, seconds=3)
    j = Journal.open(env, "rollback", why="planted")
    j.info("a line")
    assert not j.log_path.is_symlink() and j.log_path.name.endswith("_3.log"), j.log_path
    assert victim.read_text() == "important=1\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert [e["message"] for e in lines(j)][-1] == "a line"


def test_a_log_replaced_by_a_symlink_mid_run_is_not_written_through(env: Environment,
                                                                    tmp_path: Path) -> None:
    """In a log folder others can write (no sticky bit), another user can swap the run's
    log for a symlink while the run goes on: every line was appended through it. The run
    writes only to the file it created; a line that cannot go there is a write error (the run
    goes on, and says its journal is incomplete), never a write elsewhere."""
    victim = tmp_path / "victim.conf"
    victim.write_text("important=1\n")
    j = Journal.open(env, "rollback")
    j.log_path.unlink()
    j.log_path.symlink_to(victim)
    j.info("after the swap")
    assert victim.read_text() == "important=1\n"
    assert len(j.write_errors) == 1 and str(j.log_path) in j.write_errors[0], j.write_errors
    j.log_path.unlink()
    j.log_path.write_text("")  # another file of that name (theirs): not this run's either
    j.info("after the second swap")
    assert j.log_path.read_text() == "" and len(j.write_errors) == 2, j.write_errors


@pytest.mark.parametrize(("mode", "warned"), [(0o777, True), (0o1777, False), (0o775, False)])
def test_a_log_folder_every_user_can_write_is_warned_of_never_refused(
        env: Environment, mode: int, warned: bool) -> None:
    """A log folder every user can write, without the sticky bit (as /tmp has), lets another
    user delete or replace a run's log: the run goes on (its own writes are safe, and the
    journal never stops a rollback), and warns in its log and on the terminal, naming the
    fix."""
    from runbook import run

    env.log_dir.mkdir(parents=True)
    env.log_dir.chmod(mode)
    said: list[str] = []

    def refused(run_id: str) -> NoReturn:
        raise PreconditionError("no previous deployment", "deploy first")

    with pytest.raises(PreconditionError):
        run.perform(env, "rollback", refused, dry_run=False, reason="test",
                    notify=said.append)
    (log,) = env.log_dir.glob("*.log")
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    warnings = [e["message"] for e in logged if e["level"] == "WARN"]
    if not warned:
        assert warnings == [] and said == [], (warnings, said)
        return
    assert len(warnings) == 1, warnings
    assert f"{env.log_dir} ([logs] dir) can be written by every user" in warnings[0]
    assert f"chmod o-w {env.log_dir}" in warnings[0]
    assert said == [f"warning: {warnings[0]}"]
    assert logged[-1]["message"] == "rollback failed (exit code 4)"


NASTY = [
    'he said "roll back" now',
    "line one\nline two\r\nline three",
    "tab\there\x00nul\x07bell\x1b[31mred\x1b[0m",
    "back\\slash \\\" and \u2028 separator \u2029 and ✓ emoji 🚀",
    '{"level": "SUCCESS", "message": "forged"}',
    "\ud800 lone surrogate",
]


@pytest.mark.parametrize("message", NASTY)
def test_messages_are_escaped_one_object_per_line(env: Environment, message: str) -> None:
    j = Journal.open(env, "deploy")
    j.log(Level.WARN, message, note=message)
    raw = j.log_path.read_text()
    assert raw.isascii()
    entries = lines(j)
    assert len(entries) == len(raw.splitlines()) == 2
    assert entries[-1]["message"] == message and entries[-1]["note"] == message
    assert entries[-1]["level"] == "WARN"


def test_fields_of_any_type_keep_the_line_valid(env: Environment, tmp_path: Path) -> None:
    j = Journal.open(env, "deploy")
    j.log("warning", "odd fields", path=tmp_path, when=datetime(2026, 1, 2, tzinfo=UTC),
          ratio=float("nan"), obj=object(), nested={"a": [1, (2, 3)], 4: None},
          message="shadow", level="shadow", blob=b"\xff\xfe")
    entry = lines(j)[-1]
    assert entry["level"] == "WARN" and entry["message"] == "odd fields"
    assert entry["message_"] == "shadow" and entry["level_"] == "shadow"
    assert entry["path"] == str(tmp_path) and entry["when"] == "2026-01-02T00:00:00Z"
    assert entry["ratio"] == "nan" and entry["nested"] == {"a": [1, [2, 3]], "4": None}
    with pytest.raises(ValueError):
        j.log("DEBUG", "no such level")


# --- redaction -------------------------------------------------------------------------------

SECRET_SHAPES = [
    ("postgresql://togather:hunter2@localhost:5433/togather",
     "postgresql://togather:***@localhost:5433/togather", "hunter2"),
    ("postgresql://togather:p@ss/w%rd:x@db:5432/togather?sslmode=disable",
     "postgresql://togather:***@db:5432/togather?sslmode=disable", "p@ss/w%rd:x"),
    ("DATABASE_URL=postgres://u:S3cr%40t%2Fx@127.0.0.1:5433/db",
     "DATABASE_URL=postgres://u:***@127.0.0.1:5433/db", "S3cr%40t"),
    ("redis://:onlypass@cache:6379/0", "redis://:***@cache:6379/0", "onlypass"),
    ("JWT_SECRET=abc123def and more", "JWT_SECRET=*** and more", "abc123def"),
    ("export ADMIN_API_KEY=k3y-value", "export ADMIN_API_KEY=***", "k3y-value"),
    ("POSTGRES_PASSWORD=\"p@ss w/rd%\" next", "POSTGRES_PASSWORD=\"***\" next", "p@ss w/rd%"),
    ("POSTGRES_PASSWORD=pa$$:w@rd/%41", "POSTGRES_PASSWORD=***", "pa$$"),
    ("PGPASSWORD=s3cr3t psql -h db", "PGPASSWORD=*** psql -h db", "s3cr3t"),
    ("connect password=hunter2 host=db", "connect password=*** host=db", "hunter2"),
    ("GET /health?token=abc.def-ghi&x=1", "GET /health?token=***&x=1", "abc.def-ghi"),
    ("user=bob password='a b c' dbname=x", "user=bob password='***' dbname=x", "a b c"),
    ('{"password": "x\\"y", "user": "bob"}', '{"password": "***", "user": "bob"}', 'x\\"y'),
    ("db.password = hunter2", "db.password = ***", "hunter2"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", "Authorization: Bearer ***",
     "eyJhbGciOiJIUzI1NiJ9"),
    ("pg_dump --password hunter22 -h db", "pg_dump --password *** -h db", "hunter22"),
]


@pytest.mark.parametrize(("text", "expected", "secret"), SECRET_SHAPES,
                         ids=[s[0][:30] for s in SECRET_SHAPES])
def test_redact_every_secret_shape(text: str, expected: str, secret: str) -> None:
    out = redact(text)
    assert out == expected
    assert secret not in out


def test_redact_leaves_ordinary_text_alone() -> None:
    for text in ("https://example.com:8080/health", "switched traffic to green (port 8082)",
                 "schema_migrations.version 49, dirty false", "image togather-server:abc1234",
                 "user@host rolled back"):
        assert redact(text) == text


@pytest.mark.parametrize("text", [
    "cannot read env file /opt/togather/.env.production.secret: No such file or directory",
    "/tmp/x/secrets/production-secrets.toml: not valid TOML: Invalid value (at line 28)",
    "cannot open ./token.json: Permission denied",
    "~/.config/api-key.txt: not a regular file",
    "reading /run/secrets/db_password: Is a directory",
    "production-secrets.toml: not valid TOML: Invalid value (at line 28)",
])
def test_a_path_followed_by_a_colon_is_no_secret(text: str) -> None:
    """Found by review: a path holding a secret-looking word, followed by `: ` (as every
    OSError and parse error is said), had the next word masked as its value: "... .secret:
    *** such file or directory", ".../production-secrets.toml: *** valid TOML"."""
    assert redact(text) == text


@pytest.mark.parametrize(("text", "expected"), [
    ("password: hunter2", "password: ***"),
    ("db.password: hunter2 next", "db.password: *** next"),
    ("/etc/app.conf: password: hunter2", "/etc/app.conf: password: ***"),
    ("/srv/secret: token=abc123", "/srv/secret: token=***"),
    ("/srv/app/db.password=hunter2", "/srv/app/db.password=***"),
    ("--password: hunter2", "--password: ***"),
    ('{"api_key": "abc"}', '{"api_key": "***"}'),
])
def test_a_key_and_its_secret_are_masked_beside_paths_too(text: str, expected: str) -> None:
    assert redact(text) == expected


# A password with the characters repr() and JSON escape (`\` `"` `'`, a non-ASCII letter):
# an exception's repr, a JSON body or a repr of a repr quotes it escaped, never as written
ESCAPED_PASSWORD = 'Tr0ub4dor\\&3"x'
ESCAPED_PASSWORDS = [ESCAPED_PASSWORD, "Tr0ub4dor'&3\\é", "Tr0ub4dor'&3\"x"]


def _quotings(password: str) -> list[str]:
    """Texts of the kinds the runbook writes that hold the password escaped (made here by
    repr() and json.dumps() themselves, not by redact's forms)."""
    exc = RuntimeError(f"login failed: secret {password} rejected")
    return [repr(exc), repr(str(exc)), repr(repr(exc)), repr({"pw": password, "n": "it's"}),
            json.dumps({"body": str(exc)}), json.dumps({"body": str(exc)}, ensure_ascii=False),
            json.dumps({"exception": repr(exc)}), repr(json.dumps({"body": password}))]


@pytest.mark.parametrize("password", ESCAPED_PASSWORDS)
def test_a_known_password_is_masked_in_its_repr_and_json_escaped_forms(password: str) -> None:
    """Found by review: a known value was masked as written and percent-encoded only, so
    the journal's `exception=repr(exc)` (and any JSON body quoted in an error) kept a
    password holding a backslash or a quote in clear."""
    for text in _quotings(password):
        out = redact(text, [password])
        assert "Tr0ub4dor" not in out, (text, out)
        assert MASK in out, out


@pytest.mark.parametrize("password", ESCAPED_PASSWORDS)
def test_masking_a_json_text_keeps_it_json(password: str) -> None:
    for ensure_ascii in (True, False):
        text = json.dumps({"body": f"pw {password} end", "n": 1}, ensure_ascii=ensure_ascii)
        assert json.loads(redact(text, [password])) == {"body": f"pw {MASK} end", "n": 1}


@pytest.mark.parametrize(("text", "expected"), [
    (repr("said 'ab\\cd' to psql"), repr("said '***' to psql")),
    (json.dumps({"x": "ab\\cd"}), '{"x": "***"}'),
    (repr("xab\\cdy"), repr("xab\\cdy")),
    (json.dumps({"x": "2ab\\cd"}), json.dumps({"x": "2ab\\cd"})),
])
def test_a_weak_known_value_is_masked_escaped_only_as_a_whole_token(text: str,
                                                                     expected: str) -> None:
    assert redact(text, {"ab\\cd"}) == expected


def test_a_known_password_is_masked_as_one_line_writes_it() -> None:
    """`unlock --status` prints a lock's holder through one_line() (a control character
    escaped, a backslash not), then redact(): neither the raw nor the repr form."""
    from runbook.redact import one_line

    password = "Tr0ub4dor\\&3\x1bx"
    assert redact(one_line(f"held by {password} since 10:00"), [password]) \
        == "held by *** since 10:00"


def test_a_secret_named_key_masks_any_value_under_it(env: Environment) -> None:
    """Found by review: only a string under a secret's name was masked; a list, a number or
    a nested object passed (`{"password": ["a", "b"]}`, `{"JWT_SECRET": 123456}`)."""
    from runbook.redact import scrub

    data = {"password": ["hunter22", "b"], "JWT_SECRET": 123456, "api_token": 4.5,
            "credentials": {"user": "bob", "pass": "hunter22"}, "secrets": ("tok-9z",),
            "database_url": "postgresql://u:hunter22@db/x", "token": None, "user": "bob"}
    expected = {"password": MASK, "JWT_SECRET": MASK, "api_token": MASK, "credentials": MASK,
                "secrets": MASK, "database_url": "postgresql://u:***@db/x", "token": None,
                "user": "bob"}
    assert scrub(data) == expected
    assert scrub([{"nested": data}]) == [{"nested": expected}]
    j = Journal.open(env, "deploy")
    j.log("INFO", "fields", **data)
    with j.step("s", "S") as step:
        step.detail(**data)
    entry = lines(j)[-3]
    assert {k: entry[k] for k in data} == expected
    assert record(j)["steps"][0]["detail"] == expected
    for text in (j.log_path.read_text(), j.record_path.read_text()):
        assert "hunter22" not in text and "123456" not in text and "tok-9z" not in text


def test_an_unexpected_failure_quoting_the_password_never_reaches_the_journal(
        tmp_path: Path) -> None:
    """The review's path end to end: a run's unexpected exception is journaled as
    `exception=repr(exc)`; with the env file's password (a backslash and a quote in it) in
    the exception's text, repr() escaped it past the mask into the log file."""
    import dataclasses

    from runbook.errors import RunbookError
    from runbook.run import perform

    env_file = tmp_path / ".env"
    env_file.write_text(f"POSTGRES_PASSWORD='{ESCAPED_PASSWORD}'\n")
    env = host_env(tmp_path)
    env = env.with_(database=dataclasses.replace(env.database, env_file=env_file))

    def build(run_id: str) -> Any:
        raise RuntimeError(f"psql: login failed: secret {ESCAPED_PASSWORD} rejected")

    with pytest.raises(RunbookError):
        perform(env, "switch", build, dry_run=False, reason="test", confirm=lambda plan: True)
    [log] = env.log_dir.iterdir()
    [run] = env.runs_dir.iterdir()
    entries = [json.loads(line) for line in log.read_text().splitlines()]  # still valid JSON
    [failed] = [e for e in entries if "exception" in e]
    assert failed["exception"] == "RuntimeError('psql: login failed: secret *** rejected')"
    for text in (log.read_text(), run.read_text()):
        assert "Tr0ub4dor" not in text


def test_secrets_are_redacted_in_messages_fields_and_records(env: Environment) -> None:
    j = Journal.open(env, "rollback", why="DATABASE_URL=postgresql://u:hunter2@db/x is wrong")
    j.add_secret("Sup3r-S3cret/Value")
    url = "postgresql://togather:hunter2@db:5432/togather"
    with j.step("restore", "Restore the snapshot") as step:
        step.detail(url=url, env={"POSTGRES_PASSWORD": "hunter2", "POSTGRES_DB": "togather"},
                    note="the value Sup3r-S3cret/Value and Sup3r-S3cret%2FValue")
    j.log("INFO", f"connecting to {url}", dsn="host=db password=hunter2",
          api_token="tok-123456", args=["--password", "hunter2"])
    j.set(database_url=url)
    j.finish("succeeded", 0)
    for text in (j.log_path.read_text(), j.record_path.read_text()):
        assert "hunter2" not in text and "Sup3r" not in text and "tok-123456" not in text
        assert MASK in text
    rec = record(j)
    assert rec["context"]["database_url"] == "postgresql://togather:***@db:5432/togather"
    assert rec["steps"][0]["detail"]["env"] == {"POSTGRES_PASSWORD": MASK,
                                                "POSTGRES_DB": "togather"}
    assert rec["why"].startswith("DATABASE_URL=postgresql://u:***@db/x")


def _escapes(value: str) -> list[str]:
    """A printable value inside a repr()'d string (its `'` escaped or not) and a JSON one."""
    in_repr = value.replace("\\", "\\\\")
    return [in_repr, in_repr.replace("'", "\\'"), json.dumps(value)[1:-1],
            json.dumps(value, ensure_ascii=False)[1:-1]]


def _reference_redact(text: str, known: set[str]) -> str:
    """redact() as it was before it cached the encoded forms and skipped the patterns when
    none can match, known values' rule written out value by value (the oracle for the faster
    one: the same output for every input)."""
    from runbook import redact as module

    found = {s for s in (*known, *module._REGISTERED) if s and len(s) >= MIN_SECRET_LENGTH}
    # first the strong values anywhere, then a word or a number (`togather`, `2025`) only
    # where it stands alone
    strong = {v for v in found if len(v) >= 6 and len({c.isalpha() or 2 * c.isdigit()
                                                       for c in v}) > 1}
    for anywhere in (True, False):
        for value in sorted(found & strong if anywhere else found - strong, key=len,
                            reverse=True):
            forms = [value, quote(value, safe=""), quote(value), quote_plus(value)]
            forms += _escapes(value) + [twice for once in _escapes(value)
                                        for twice in _escapes(once)]
            for form in sorted(dict.fromkeys(forms), key=len, reverse=True):
                if anywhere:
                    text = text.replace(form, MASK)
                else:
                    # an escape one_line() or repr() wrote (`\n`, `\x1b`) is no word
                    text = re.sub(r"(?:(?<![\w.-])|(?<=\\[abfnrtv])|(?<=\\x[0-9a-f]{2})"
                                  r"|(?<=\\u[0-9a-f]{4})|(?<=\\U[0-9a-f]{8}))"
                                  rf"{re.escape(form)}(?![\w.-])", MASK, text, flags=re.ASCII)
    for pattern, replace in module._PATTERNS:
        text = pattern.sub(replace, text)
    return text


REDACT_FRAGMENTS = ["togather", "2025", "-", ".", "password", "PASSWD", "Secret", "TOKEN",
                    "api-key", "API_KEY", "access_key",
                    "private-key", "credentials", "bearer ", "Basic ", "@", "://", ":", "=", "--",
                    " ", "\"", "'", "&", "/", "%40", "u:", "x", "Sup3r-S3cret/Value",
                    "Sup3r-S3cret%2FValue", "abcdefghij", "\\", "\\\\", "\\\"", "\\'",
                    ESCAPED_PASSWORD, repr(ESCAPED_PASSWORD), json.dumps(ESCAPED_PASSWORD),
                    "ab\\cd", "ab\\\\cd", "\\n", "\\x1b"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(REDACT_FRAGMENTS) | st.text(max_size=6), max_size=10).map("".join),
       st.sets(st.sampled_from(["Sup3r-S3cret/Value", "hunter2", "abc", "p@ss w", "togather",
                               "2025", ESCAPED_PASSWORD, "ab\\cd"]), max_size=3))
def test_redact_is_the_plain_reference_only_faster(text: str, known: set[str]) -> None:
    assert redact(text, known) == _reference_redact(text, known)


password_chars = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="\"'"),
    min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(password_chars)
def test_any_url_password_is_masked(password: str) -> None:
    text = f"DATABASE_URL=postgresql://togather:{password}@db.internal:5433/togather"
    assert redact(text) == "DATABASE_URL=postgresql://togather:***@db.internal:5433/togather"


@settings(max_examples=300, deadline=None)
@given(password_chars, st.sampled_from(["POSTGRES_PASSWORD", "JWT_SECRET", "GITHUB_TOKEN"]))
def test_any_env_secret_is_masked(value: str, key: str) -> None:
    assert redact(f"{key}={value} tail") == f"{key}=*** tail"


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=st.text(), field=st.text())
def test_any_message_adds_exactly_one_valid_line_to_the_file(tmp_path: Path, message: str,
                                                             field: str) -> None:
    """Read back from the file on disk: one more line per call, each a JSON object, and the
    text comes back as logged whenever it holds nothing secret-shaped."""
    j = Journal.open(host_env(tmp_path / secrets_token(), name="staging"), "deploy")
    j.log("INFO", message, note=field)
    raw = j.log_path.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 2
    entry = json.loads(raw.splitlines()[-1])
    assert isinstance(entry, dict) and entry["level"] == "INFO"
    if redact(message) == message:
        assert entry["message"] == message
    if redact(field) == field:
        assert entry["note"] == field


def secrets_token() -> str:
    return secrets.token_hex(6)


# --- the files' guarantees under concurrency and kill -9 --------------------------------------


def test_a_reader_never_sees_half_a_run_record(env: Environment) -> None:
    """The record is rewritten at every step; a reader polling it meanwhile always parses a
    whole JSON object (atomic replace), never a truncated one."""
    j = Journal.open(env, "rollback")
    done = threading.Event()
    reads: list[int] = []
    broken: list[str] = []

    def reader() -> None:
        while not done.is_set():
            try:
                text = j.record_path.read_text()
            except FileNotFoundError:
                broken.append("the record vanished")
                continue
            try:
                reads.append(len(json.loads(text)["steps"]))
            except ValueError:
                broken.append(text[-80:])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for index in range(40):
            with j.step(f"step-{index}", f"Step {index}") as step:
                step.detail(padding="x" * 1000)  # a record of ~50 kB by the end
    finally:
        done.set()
        thread.join()
    assert not broken, broken[:3]
    assert len(reads) > 10 and reads == sorted(reads), "the reader saw steps go backwards"
    assert len(record(j)["steps"]) == 40


KILLED_WRITER = """
import sys, time
from pathlib import Path
from runbook.journal import Journal
from tests.drill_checks import host_env
env = host_env(Path(sys.argv[1]), name="staging")
j = Journal.open(env, "rollback", run_id="rbk_killed")
j.add_secret(sys.argv[2])
print("open", flush=True)
index = 0
while True:
    with j.step(f"step-{index}", f"Step {index}") as step:
        step.detail(url=f"postgresql://togather:{sys.argv[2]}@db/togather", n=index)
        j.log("INFO", f"connecting with password={sys.argv[2]}", padding="y" * 500)
    index += 1
"""


@pytest.mark.parametrize("after", [0.05, 0.2, 0.5])
def test_a_run_killed_mid_write_leaves_a_whole_log_and_record_and_no_secret(
        tmp_path: Path, after: float) -> None:
    """kill -9 at an arbitrary moment: every log line on disk is whole JSON, the record
    parses and says the run never finished, every step it calls done was logged as ended,
    and the password the run used is in neither file."""
    password = "Sup3r@" + secrets_token()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path), password],
                            stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "open\n"
        time.sleep(after)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    (log,) = (tmp_path / "logs").glob("staging_*.log")
    raw = log.read_text()
    lines = raw.splitlines()
    assert raw.endswith("\n") and len(lines) > 3, raw[-200:]
    entries = [json.loads(line) for line in lines]  # a torn line would raise here
    assert entries[0]["message"].startswith("rollback started")
    rec = json.loads((tmp_path / "runs" / "rbk_killed.json").read_text())
    assert rec["outcome"] == "running" and rec["exit_code"] is None
    ended = [e["step"] for e in entries if e.get("event") == "end"]
    done = [s["name"] for s in rec["steps"] if s["status"] == "ok"]
    assert done == ended[:len(done)] and len(ended) - len(done) <= 1, (done[-3:], ended[-3:])
    assert all(s["status"] == "running" for s in rec["steps"][len(done):]), rec["steps"][-2:]
    for path in (log, *(tmp_path / "runs").iterdir()):
        text = path.read_text()
        assert password not in text and quote(password, safe="") not in text, path


# --- steps and the run record ----------------------------------------------------------------


def test_run_record_is_written_at_open(env: Environment) -> None:
    j = Journal.open(env, "switch", run_id="run_test_1", who="alice@laptop", why="drill")
    rec = record(j)
    assert j.record_path == env.runs_dir / "run_test_1.json"
    assert rec["run_id"] == "run_test_1" and rec["action"] == "switch"
    assert rec["environment"] == "staging" and rec["who"] == "alice@laptop"
    assert rec["why"] == "drill" and rec["outcome"] == "running" and rec["exit_code"] is None
    assert rec["log_file"] == str(j.log_path) and rec["steps"] == []


def test_steps_are_timed_and_recorded(env: Environment) -> None:
    j = Journal.open(env, "rollback")
    with j.step("start-slot", "Start the blue slot") as step:
        time.sleep(0.05)
        step.detail(container="togather-server-blue", image="togather-server:abc1234")
    with j.step("snapshot", "Restore the database") as step:
        step.skip("no migrations ran after abc1234")
    j.plan("stop-old", "Stop the green slot", container="togather-server-green")
    j.finish("succeeded", ExitCode.OK)
    rec = record(j)
    first, second, third = rec["steps"]
    assert first["name"] == "start-slot" and first["status"] == "ok"
    assert first["duration_ms"] >= 50 and TIMESTAMP.fullmatch(first["started_at"])
    assert first["detail"] == {"container": "togather-server-blue",
                               "image": "togather-server:abc1234"}
    assert second["status"] == "skipped"
    assert second["detail"]["skipped_because"] == "no migrations ran after abc1234"
    assert third["status"] == "planned" and third["started_at"] is None
    assert rec["outcome"] == "succeeded" and rec["exit_code"] == 0
    assert TIMESTAMP.fullmatch(rec["finished_at"])
    logged = [(e["level"], e.get("step"), e.get("event")) for e in lines(j)]
    assert ("INFO", "start-slot", "start") in logged
    assert ("SUCCESS", "start-slot", "end") in logged
    assert logged[-1][0] == "SUCCESS"
    assert [p.name for p in env.runs_dir.iterdir()] == [j.record_path.name]


def test_failed_step_is_recorded_and_reraised(env: Environment) -> None:
    j = Journal.open(env, "rollback")
    with pytest.raises(PreconditionError), j.step("image", "Check the image") as step:
        step.detail(image="togather-server:abc1234")
        raise PreconditionError("image togather-server:abc1234 is gone",
                                "rebuild it from commit abc1234")
    rec = record(j)  # written at once, before anyone calls finish
    failed = rec["steps"][0]
    assert failed["status"] == "failed" and failed["duration_ms"] >= 0
    assert failed["error"] == ("image togather-server:abc1234 is gone; "
                               "rebuild it from commit abc1234")
    assert failed["detail"] == {"image": "togather-server:abc1234"}
    entry = lines(j)[-1]
    assert entry["level"] == "ERROR" and entry["status"] == "failed"
    assert rec["outcome"] == "running"


def test_context_manager_records_failure_with_its_exit_code(env: Environment) -> None:
    with pytest.raises(PreconditionError), Journal.open(env, "rollback") as j, \
            j.step("check", "Check preconditions"):
        raise PreconditionError("no previous deployment", "deploy first")
    rec = record(j)
    assert rec["outcome"] == "failed" and rec["exit_code"] == ExitCode.PRECONDITION
    assert rec["error"] == {"type": "PreconditionError", "message": "no previous deployment",
                            "fix": "deploy first"}
    assert lines(j)[-1]["level"] == "ERROR"


def test_unexpected_exception_is_attention(env: Environment) -> None:
    with pytest.raises(ZeroDivisionError), Journal.open(env, "deploy") as j:
        _ = 1 / 0
    rec = record(j)
    assert rec["exit_code"] == ExitCode.ATTENTION
    assert rec["error"]["message"] == "ZeroDivisionError: division by zero"


def test_finish_counts_once(env: Environment) -> None:
    with Journal.open(env, "deploy") as j:
        j.finish("rolled_back", ExitCode.FAILED_SAFELY)
    rec = record(j)
    assert rec["outcome"] == "rolled_back" and rec["exit_code"] == 1


def test_bad_run_id_and_unwritable_dirs_are_config_errors(env: Environment,
                                                          tmp_path: Path) -> None:
    from runbook.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot name a file"):
        Journal.open(env, "deploy", run_id="../../etc/passwd")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"\[logs\] dir .* is not a folder"):
        Journal.open(env.with_(log_dir=blocker / "logs"), "deploy")


def test_echo_sees_redacted_entries(env: Environment) -> None:
    seen: list[tuple[Level, str, dict[str, Any]]] = []
    j = Journal.open(env, "deploy", echo=lambda lvl, msg, fields: seen.append(
        (lvl, msg, dict(fields))))
    j.log("INFO", "password=hunter2", url="postgresql://a:hunter2@b/c")
    assert seen[-1] == (Level.INFO, "password=***", {"url": "postgresql://a:***@b/c"})


def test_a_short_write_on_a_nearly_full_disk_is_taken_back_and_said(tmp_path: Path) -> None:
    """The file size limit (RLIMIT_FSIZE, as a nearly full disk would) cuts a log line short:
    the half line was left in the log, the next line glued onto it (every JSON-lines reader
    stops there), and the run record said nothing was lost. Run in a child process: the limit
    is the process's."""
    script = f"""
import json, os, resource, signal, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from tests.drill_checks import host_env
from runbook.journal import Journal
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG / a short write instead of a kill
env = host_env(Path({str(tmp_path)!r}))
journal = Journal.open(env, "rollback", why="test")
size = journal.log_path.stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, resource.RLIM_INFINITY))
journal.info("a line much longer than the forty bytes the disk has left " * 3)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
journal.info("the next line")
print(json.dumps({{"log": str(journal.log_path), "errors": journal.write_errors}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # every line whole JSON
    logged = [json.loads(line) for line in Path(out["log"]).read_text().splitlines()]
    assert [e["message"] for e in logged][-1] == "the next line"
    assert not any("forty bytes" in e["message"] for e in logged)
    assert len(out["errors"]) == 1 and "short write" in out["errors"][0], out["errors"]


def test_the_documented_newest_log_recipe_skips_snapshot_and_unlock_logs(
        tmp_path: Path, env: Environment) -> None:
    """Found by review: `snapshot create`, `snapshot cleanup` and `unlock` write the log too,
    so the by-hand recipe `ls -t ..._*.log | head -n 1` read an hourly cron snapshot's log,
    not the rollback's. The documented recipe, run by a real shell on real journals, finds
    the rollback's log although a snapshot's and an unlock's are newer."""
    from runbook import run
    from runbook.livedocs import phrases

    home = tmp_path / "home"
    env = env.with_(log_dir=home / ".togather" / "logs" / "deployments")
    rollback = Journal.open(env, "rollback", why="bad release")
    rollback.finish("success", ExitCode.OK)
    for action in ("snapshot-create", "unlock"):
        time.sleep(1.05)  # ls -t: a newer file
        with run.journaled(env, action, f"runbook {action}", lambda _: None) as log:
            log("SUCCESS", f"{action} done")
    [recipe] = [p.commands[0] for p in phrases.CHECKS if p.pattern == "deployment log"]
    shown = subprocess.run(["bash", "-c", recipe.replace("<env>", env.name)],
                           env={**os.environ, "HOME": str(home)}, capture_output=True,
                           text=True, timeout=30, check=True).stdout
    assert f'"rollback started on {env.display}' in shown, shown
    assert "snapshot-create" not in shown and "unlock started" not in shown, shown
