"""deployment-state.json: three dialects in, each written back in its own dialect, nothing lost,
never torn."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runbook import lock as lockmod
from runbook import state as statemod
from runbook import strict_json
from runbook.environment import Slot
from runbook.errors import ExitCode, LockedError, PreconditionError, StateError
from runbook.state import (
    Deployment,
    DeploymentState,
    after_deploy,
    after_rollback,
    format_time,
    make_deployment,
    parse_state,
    read_state,
    to_json,
    with_lock,
    write_state,
)

DATA = Path(__file__).parent / "data" / "state"


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


def copy_fixture(name: str, tmp_path: Path) -> Path:
    target = tmp_path / "deployment-state.json"
    target.write_bytes((DATA / name).read_bytes())
    return target


def sha(n: int) -> str:
    return f"{n:07x}" + "a" * 33


def dep(n: int, slot: Slot = Slot.BLUE, **changes: Any) -> Deployment:
    commit = sha(n)
    base = make_deployment(commit[:7], commit, slot, deployed_by="ops@host",
                           deployed_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=n),
                           deployment_id=f"dep_{n:04d}", status="active")
    return base.with_(**changes) if changes else base


# The documented deployment's required keys (CONTRACTS.md, "deployment-state.json").
REQUIRED = ("id", "version", "git_commit", "deployed_at", "deployed_by", "active_slot",
            "health_status")


def go_id(commit: str, version: str, utc_micro: str) -> str:
    """The id the runbook gives a Go CLI entry (which has none), per its docstring: sha256 of
    "<git_commit>|<version>|<deployed_at in UTC, RFC 3339 with microseconds>"."""
    digest = hashlib.sha256(f"{commit}|{version}|{utc_micro}".encode()).hexdigest()
    return f"dep_{digest[:16]}_{digest[16:40]}"


# --- the three dialects ---------------------------------------------------------------------


def test_documented_dialect() -> None:
    s = read_state(DATA / "documented.json")
    assert s.environment == "production"
    assert s.current is not None and s.previous is not None
    assert s.current.active_slot is Slot.BLUE and s.previous.active_slot is Slot.GREEN
    assert s.current.version == "abc1234" and s.current.migrations_run == 3
    assert s.current.deployed_at == datetime(2026, 1, 28, 10, 30, tzinfo=UTC)
    assert s.current.image == ""  # not recorded: the environment's image_repository decides
    assert s.previous.status == "superseded"
    assert [d.version for d in s.history] == ["def9876"]
    assert s.history[0].extra == {"duration_seconds": 245}
    assert s.lock == {"locked": False} and not s.locked


def test_deploy_script_dialect() -> None:
    s = read_state(DATA / "deploy_script.json")
    # the top-level key is "" but every deployment says where it ran
    assert s.environment == "production"
    assert s.current is not None and s.current.deployed_by == "deploy@togather-prod-1"
    assert s.current.id == "dep_188f1b2c3d4e5f60_4f5e6d7c8b9a0f1e2d3c4b5a"
    assert s.current.health_status == "unknown"
    assert s.current.extra == {"environment": "production"}
    assert s.lock["locked"] is True and s.lock["pid"] == 48213
    assert set(s.extra) == {"active_slot", "slots", "last_deployment"}


def test_deploy_script_first_ever_file() -> None:
    s = read_state(DATA / "deploy_script_first.json")
    assert s.environment == ""
    assert s.current is None and s.previous is None and s.history == ()
    assert s.extra["slots"] == {"blue": {"status": "inactive"}, "green": {"status": "inactive"}}
    filled = read_state(DATA / "deploy_script_first.json", environment="prod")
    assert filled.environment == "production"


def test_go_cli_dialect() -> None:
    s = read_state(DATA / "go_cli.json")
    assert s.environment == "staging"
    assert s.current is not None and s.previous is not None
    assert s.current.active_slot is Slot.BLUE  # from `slot`
    assert s.current.image == "togather-server:e4d2c1b"
    assert s.current.deployed_at == datetime(2026, 2, 10, 19, 22, 7, 482913, tzinfo=UTC)
    assert s.current.extra == {"rollback": True, "rollback_id": "rb-1739215327"}
    assert s.previous.snapshot_path is not None
    assert s.previous.snapshot_path.endswith("_pre-deploy.sql.gz")
    # no ids in this dialect: derived ones, stable across reads, equal for equal entries
    again = read_state(DATA / "go_cli.json")
    assert s.current.id == again.current.id and s.current.id.startswith("dep_")  # type: ignore[union-attr]
    assert s.history[0].id == s.previous.id
    assert s.history[1].id != s.current.id  # same commit, another deployment
    assert s.lock == {"locked": False}  # zero times mean "not set"


def test_a_file_todays_go_cli_rolled_back_is_read_and_rolled_back_again(
        tmp_path: Path) -> None:
    """Found by review: the Go CLI's rollback reads deploy.sh's or the documented records
    into a struct with `slot` only, so the deployment it moves to previous_deployment says
    `"slot": ""` (go_cli_after_rollback.json: its output for documented.json). Every runbook
    command then refused the file (previous_deployment.active_slot missing) until a hand
    edit, on exactly the host whose rollback the runbook is there to fix."""
    path = copy_fixture("go_cli_after_rollback.json", tmp_path)
    s = read_state(path)
    assert s.current is not None and s.previous is not None
    assert s.current.active_slot is Slot.BLUE and s.previous.active_slot is None
    assert (s.current.version, s.previous.version) == ("abc5678", "abc1234")
    written = statemod.dumps(after_rollback(s, slot=Slot.GREEN, run_id="rbk_1"))
    out = json.loads(written)
    assert out["current_deployment"]["version"] == "abc1234"
    assert out["current_deployment"]["slot"] == out["current_deployment"]["active_slot"] \
        == "green"
    assert out["previous_deployment"]["version"] == "abc5678"
    again = parse_state(written, "again.json")
    assert again.current is not None and again.current.active_slot is Slot.GREEN


def test_a_lone_surrogate_escape_another_tool_wrote_does_not_block_the_record(
        tmp_path: Path) -> None:
    """Found by review: a file with literal non-ASCII text ("zoë") is rewritten with literal
    non-ASCII, and a lone surrogate escape elsewhere ("\\ud83d", half an emoji, in a key
    another tool added) then could not be encoded: every rollback's record failed after
    traffic had moved, "a bug in the caller". It is now kept as the escape it was."""
    doc = json.loads((DATA / "documented.json").read_text())
    doc["current_deployment"]["deployed_by"] = "zoë@host"
    doc["note"] = "\ud83d"
    raw = json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8", "surrogatepass")
    assert b"zo\xc3\xab" in raw  # literal, as a tool writing UTF-8 leaves it
    path = tmp_path / "deployment-state.json"
    path.write_bytes(raw.replace("\ud83d".encode("utf-8", "surrogatepass"), b"\\ud83d"))
    s = read_state(path)
    assert s.previous is not None
    statemod.write_state(path, after_rollback(s, run_id="rbk_1"))
    out = json.loads(path.read_bytes())
    assert out["note"] == "\ud83d"  # the same value, escaped
    assert out["previous_deployment"]["deployed_by"] == "zoë@host"
    assert out["current_deployment"]["version"] == s.previous.version


def test_go_cli_lock_keys_are_renamed() -> None:
    s = read_state(DATA / "go_cli_locked.json")
    assert s.locked
    assert s.lock["lock_expires_at"] == "2026-02-11T08:30:00.123456789Z"
    assert "expires_at" not in s.lock and s.lock["reason"] == "deploy e4d2c1b"


def _documented_lock(**lock: Any) -> bytes:
    doc = load("documented.json")
    doc["lock"] = {"locked": True, "lock_id": "lock_1", "locked_by": "ops@here",
                   "locked_at": "2026-02-11T08:00:00Z", **lock}
    return json.dumps(doc, indent=2).encode()


def test_a_lock_with_both_expiry_names_reads_as_the_later_in_its_own_dialect() -> None:
    """The runbook writes `lock_expires_at` and `expires_at` with one time; a tool that then
    refreshes only its own name leaves them apart, and the lock ends at the later one."""
    same = parse_state(_documented_lock(lock_expires_at="2026-02-11T08:30:00Z",
                                        expires_at="2026-02-11T08:30:00Z"))
    assert same.lock["lock_expires_at"] == "2026-02-11T08:30:00Z" and "expires_at" not in same.lock
    assert same.dialect == statemod.DOCUMENTED
    for ours, go in (("2026-02-11T08:30:00Z", "2026-02-11T09:00:00Z"),
                     ("2026-02-11T09:00:00Z", "2026-02-11T08:30:00Z")):
        apart = parse_state(_documented_lock(lock_expires_at=ours, expires_at=go))
        assert apart.lock["lock_expires_at"] == "2026-02-11T09:00:00Z"
    with pytest.raises(StateError, match=r"lock\.expires_at: 'soon' is not a valid time"):
        parse_state(_documented_lock(lock_expires_at="2026-02-11T08:30:00Z", expires_at="soon"))


# --- writing: the file's own dialect, nothing lost --------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.json")))
def test_round_trip_is_stable(name: str, tmp_path: Path) -> None:
    path = copy_fixture(name, tmp_path)
    first = read_state(path)
    write_state(path, first)
    written = path.read_bytes()
    second = read_state(path)
    assert second == first.with_(source=str(path))
    write_state(path, second)
    assert path.read_bytes() == written  # a rewrite changes nothing


def _walk(value: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten JSON to path -> leaf for 'every original key survives' checks."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_walk(item, f"{prefix}/{key}"))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, item in enumerate(value):
            out.update(_walk(item, f"{prefix}/{i}"))
        return out
    return {prefix: value}


def test_documented_file_keeps_every_key_and_value(tmp_path: Path) -> None:
    original = load("documented.json")
    path = copy_fixture("documented.json", tmp_path)
    write_state(path, read_state(path))
    written = json.loads(path.read_text())
    flat = _walk(written)
    for key, value in _walk(original).items():
        assert flat[key] == value, key


def test_deploy_script_keys_survive_a_rewrite(tmp_path: Path) -> None:
    original = load("deploy_script.json")
    path = copy_fixture("deploy_script.json", tmp_path)
    write_state(path, read_state(path))
    written = json.loads(path.read_text())
    for key in ("active_slot", "slots", "last_deployment"):
        assert written[key] == original[key]
    assert written["environment"] == ""  # as the deploy script wrote it
    assert written["current_deployment"]["environment"] == "production"
    assert written["lock"] == original["lock"]
    assert written == original


def test_go_cli_file_is_rewritten_as_the_go_cli_wrote_it(tmp_path: Path) -> None:
    for name in ("go_cli.json", "go_cli_locked.json"):
        path = copy_fixture(name, tmp_path)
        before = path.read_bytes()
        write_state(path, read_state(path))
        assert path.read_bytes() == before, name
    path = copy_fixture("go_cli.json", tmp_path)
    write_state(path, with_lock(read_state(path), {"locked": False}))
    assert path.read_bytes() == (DATA / "go_cli.json").read_bytes()


def test_unknown_keys_everywhere_survive(tmp_path: Path) -> None:
    doc = load("documented.json")
    doc["operator_notes"] = {"pager": ["alice", "bob"], "weird": "line\nbreak \u2028 ✓"}
    doc["current_deployment"]["canary_percent"] = 5
    doc["deployment_history"][0]["tags"] = ["x", {"y": None}]
    doc["lock"]["owner_tool"] = "go-cli"
    path = tmp_path / "deployment-state.json"
    path.write_text(json.dumps(doc))
    write_state(path, read_state(path))
    written = json.loads(path.read_text())
    assert written["operator_notes"] == doc["operator_notes"]
    assert written["current_deployment"]["canary_percent"] == 5
    assert written["deployment_history"][0]["tags"] == ["x", {"y": None}]
    assert written["lock"]["owner_tool"] == "go-cli"


def test_migration_version_is_recorded(tmp_path: Path) -> None:
    s = read_state(DATA / "documented.json")
    assert s.current is not None and s.current.migration_version is None
    s = s.with_(current=s.current.with_(migration_version=49))
    path = tmp_path / "s.json"
    write_state(path, s)
    assert json.loads(path.read_text())["current_deployment"]["migration_version"] == 49
    assert read_state(path).current.migration_version == 49  # type: ignore[union-attr]


# --- atomic writes ---------------------------------------------------------------------------


def test_write_keeps_the_mode_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """Other tools (the Go CLI, monitoring) may read the file as another user: a rewrite
    keeps its mode; a file the runbook creates is 0600."""
    path = copy_fixture("documented.json", tmp_path)
    path.chmod(0o644)
    old_umask = os.umask(0o022)
    try:
        write_state(path, read_state(path))
        fresh = tmp_path / "new" / "deployment-state.json"
        write_state(fresh, DeploymentState(environment="staging"))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployment-state.json", "new"]


def test_write_creates_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "deploy" / "config" / "deployment-state.json"
    write_state(path, DeploymentState(environment="staging"))
    assert read_state(path).environment == "staging"


def test_failed_serialization_leaves_the_original_intact(tmp_path: Path) -> None:
    path = copy_fixture("documented.json", tmp_path)
    before = path.read_bytes()
    broken = read_state(path).with_(extra={"oops": object()})
    with pytest.raises(StateError, match="cannot be serialized"):
        write_state(path, broken)
    nan = read_state(path).with_(extra={"ratio": float("nan")})
    with pytest.raises(StateError, match="cannot be serialized"):
        write_state(path, nan)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["deployment-state.json"]


def test_failed_rename_leaves_the_original_intact(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = copy_fixture("documented.json", tmp_path)
    before = path.read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statemod.os, "replace", boom)
    with pytest.raises(StateError, match="No space left on device") as info:
        write_state(path, read_state(path).with_(environment="staging"))
    assert "old file is unchanged" in str(info.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["deployment-state.json"]


def test_symlinked_state_file_stays_a_symlink(tmp_path: Path) -> None:
    real = copy_fixture("documented.json", tmp_path)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_state(link, read_state(link).with_(environment="staging"))
    assert link.is_symlink() and read_state(real).environment == "staging"


# --- errors: one clean line, always a StateError ----------------------------------------------


def _mutate(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node: Any = doc
    for part in path[:-1]:
        node = node[part]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


_DELETE = object()

BAD_DOCUMENTS = [
    (("environment",), _DELETE, "environment: required key is missing"),
    (("environment",), 3, "environment: expected a string"),
    (("environment",), "qa", "environment: 'qa' is not an environment"),
    (("current_deployment",), [], "current_deployment: expected an object"),
    (("current_deployment", "active_slot"), "purple", "current_deployment.active_slot: 'purple'"),
    (("current_deployment", "active_slot"), _DELETE, "active_slot: required key is missing"),
    (("current_deployment", "version"), "v1.2.0", "current_deployment.version: 'v1.2.0' is not"),
    (("current_deployment", "version"), _DELETE, "current_deployment.version: required key"),
    (("current_deployment", "version"), 1234567, "current_deployment.version: expected a string"),
    (("current_deployment", "version"), None,
     "current_deployment.version: is null, where a string is needed (the 7-hex short commit"),
    (("previous_deployment", "git_commit"), None,
     "previous_deployment.git_commit: is null, where a string is needed (the 40-hex commit"),
    (("current_deployment", "active_slot"), None,
     "current_deployment.active_slot: is null, where a string is needed (the slot it runs"),
    (("previous_deployment", "git_commit"), "abc", "previous_deployment.git_commit: 'abc'"),
    (("current_deployment", "deployed_at"), "yesterday", "deployed_at: 'yesterday' is not a"),
    (("current_deployment", "deployed_at"), "2026-01-28T10:30:00", "has no timezone"),
    (("current_deployment", "deployed_at"), "0001-01-01T00:00:00Z", "is the zero time"),
    (("current_deployment", "health_status"), "fine", "health_status: 'fine'"),
    (("current_deployment", "status"), "done", "status: 'done' is not"),
    (("current_deployment", "migrations_run"), -1, "migrations_run: expected a non-negative"),
    (("current_deployment", "rollback_count"), True, "rollback_count: expected a non-negative"),
    (("current_deployment", "slot"), "green", "active_slot: says blue but slot says green"),
    (("deployment_history",), {"a": 1}, "deployment_history: expected an array"),
    # a history entry whose age cannot be told (a lone one, its time unreadable): one
    # provably older than the previous deployment is passed by (the tests at the end)
    (("deployment_history", 0, "deployed_at"), "yesterday",
     "deployment_history[0].deployed_at: 'yesterday' is not a valid time"),
    (("lock",), "yes", "lock: expected an object"),
    (("lock", "locked"), _DELETE, "lock.locked: required key is missing"),
    (("lock", "locked"), "false", "lock.locked: expected true or false"),
    (("lock", "pid"), "12a", "lock.pid: expected an integer"),
    (("lock", "pid"), "", "lock.pid: expected an integer"),
    # a string of ASCII digits is a count (jq --arg writes them so); nothing else is
    (("current_deployment", "migrations_run"), "1a", "migrations_run: expected a non-negative"),
    (("current_deployment", "migrations_run"), "-1", "migrations_run: expected a non-negative"),
    (("current_deployment", "rollback_count"), " 1", "rollback_count: expected a non-negative"),
    (("current_deployment", "rollback_count"), "1.0", "rollback_count: expected a non-negative"),
    (("current_deployment", "rollback_count"), "\u0663", "rollback_count: expected a non-negati"),
    (("current_deployment", "rollback_count"), "", "rollback_count: expected a non-negative"),
    # the schema a deployment ran with decides whether a rollback needs a restore: never
    # read from text
    (("current_deployment", "migration_version"), "49", "migration_version: expected a non-neg"),
    (("lock", "locked"), "true", "lock.locked: expected true or false"),
    (("lock", "locked_at"), "noon", "lock.locked_at: 'noon' is not a valid time"),
]


@pytest.mark.parametrize(("path", "value", "expected"), BAD_DOCUMENTS,
                         ids=[e for _, _, e in BAD_DOCUMENTS])
def test_invalid_documents_name_the_key_and_the_fix(path: tuple[str | int, ...], value: Any,
                                                    expected: str, tmp_path: Path) -> None:
    target = tmp_path / "deployment-state.json"
    target.write_text(json.dumps(_mutate(load("documented.json"), path, value)))
    with pytest.raises(StateError) as info:
        read_state(target)
    err = info.value
    assert expected in err.message
    assert err.message.startswith(f"{target}: ")
    assert err.fix and "\n" not in str(err)
    assert err.exit_code == ExitCode.PRECONDITION


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "is not valid JSON"),
    (b"{\"environment\": \"production\",", "is not valid JSON"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not UTF-8 text"),
    (b"[1, 2, 3]", "expected a JSON object at the top"),
    (b"{\"environment\": \"production\", \"x\": NaN}", "is not valid JSON"),
    (b"[" * 100_000, "is not valid JSON"),
])
def test_garbage_is_a_state_error(content: bytes, expected: str, tmp_path: Path) -> None:
    target = tmp_path / "deployment-state.json"
    target.write_bytes(content)
    with pytest.raises(StateError, match=expected) as info:
        read_state(target)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("path", "literal", "where", "shown"), [
    (("current_deployment", "canary_percent"), "1e400", "current_deployment.canary_percent",
     "1e400"),
    (("operator_notes",), '{"pager": [1, -1E999]}', "operator_notes.pager[1]", "-1E999"),
    (("deployment_history", 0, "duration_seconds"), "2.5e308",
     "deployment_history[0].duration_seconds", "2.5e308"),
    (("lock", "ttl"), "1e309", "lock.ttl", "1e309"),
])
def test_a_number_too_large_for_json_is_refused_when_read(
        path: tuple[str | int, ...], literal: str, where: str, shown: str,
        tmp_path: Path) -> None:
    """1e400 parses as infinity, which no JSON can hold: refused at read, naming the key,
    not after the commit point, when the state file is rewritten."""
    target = tmp_path / "deployment-state.json"
    marker = "__NUMBER__"
    text = json.dumps(_mutate(load("documented.json"), path, marker), indent=2)
    target.write_text(text.replace(f'"{marker}"', literal))
    before = target.read_bytes()
    with pytest.raises(StateError) as info:
        read_state(target)
    assert info.value.message.startswith(f"{target}: {where}: {shown} ")
    assert "\n" not in str(info.value) and info.value.fix
    assert target.read_bytes() == before


def written_twice(doc: dict[str, Any], path: tuple[str | int, ...], then: Any) -> str:
    """`doc` as JSON text with the key at `path` written twice: its own value, then `then`
    (as a tool that appends a key instead of replacing it leaves the file)."""
    marker, key = "__TWICE__", path[-1]
    node: Any = doc
    for part in path:
        node = node[part]
    text = json.dumps(_mutate(doc, path, marker), indent=2)
    twice = text.replace(f'"{key}": "{marker}"',
                         f'"{key}": {json.dumps(node)}, "{key}": {json.dumps(then)}')
    assert twice.count(f'"{key}": ') == text.count(f'"{key}": ') + 1
    return twice


KEYS_WRITTEN_TWICE = [  # (fixture, key path, its second value, as the reader names it)
    ("documented.json", ("current_deployment", "active_slot"), "green",
     "current_deployment.active_slot"),
    ("documented.json", ("environment",), "staging", "environment"),
    ("documented.json", ("deployment_history", 0, "version"), "abc1234",
     "deployment_history[0].version"),
    ("documented.json", ("lock", "locked"), True, "lock.locked"),
    ("deploy_script.json", ("current_deployment", "environment"), "staging",
     "current_deployment.environment"),
    ("deploy_script_first.json", ("active_slot",), "green", "active_slot"),
    ("go_cli.json", ("current_deployment", "slot"), "green", "current_deployment.slot"),
    ("go_cli.json", ("previous_deployment", "docker_image"), "togather-server:e4d2c1b",
     "previous_deployment.docker_image"),
]


@pytest.mark.parametrize(("fixture", "path", "then", "where"), KEYS_WRITTEN_TWICE,
                         ids=[f"{f}:{w}" for f, _, _, w in KEYS_WRITTEN_TWICE])
def test_a_key_written_twice_is_refused_naming_it_never_read_last_wins(
        fixture: str, path: tuple[str | int, ...], then: Any, where: str,
        tmp_path: Path) -> None:
    """A file with one key written twice says two things: grep or sed (the shell tooling)
    read the first value, Python, jq and Go the last. Read last-wins, the runbook acted on
    one of them, and its rewrite kept only that one (found by review). Refused as bad input
    wherever it sits (every dialect, any depth, the lock too), naming the file, the key's
    path and the fix, with a state file's refusal's exit code. The lock's own read of the
    file refuses it where the key is the lock's (who holds it cannot be told), and reads the
    lock, which every tool reads alike, where it is not."""
    target = tmp_path / "deployment-state.json"
    target.write_text(written_twice(load(fixture), path, then))
    before = target.read_bytes()
    in_lock = path[0] == "lock"
    for read in (read_state, statemod.read_lock) if in_lock else (read_state,):
        with pytest.raises(StateError) as info:
            read(target)
        err = info.value
        assert err.message.startswith(f"{target}: {where} is written twice ("), err.message
        holder = where.removesuffix(str(path[-1])).removesuffix(".") or "the top-level object"
        assert f'"{path[-1]}" appears once in {holder}' in (err.fix or ""), err.fix
        assert err.exit_code == ExitCode.PRECONDITION and "\n" not in str(err)
    if not in_lock:  # the lock every tool reads alike: read as it is written
        assert statemod.read_lock(target) == statemod.read_lock(DATA / fixture)
    assert target.read_bytes() == before


def test_missing_file_says_nothing_was_recorded(tmp_path: Path) -> None:
    target = tmp_path / "nope" / "deployment-state.json"
    with pytest.raises(StateError) as info:
        read_state(target)
    assert str(target) in info.value.message
    assert "no deployment has been recorded" in info.value.message
    assert info.value.fix is not None and "deploy first" in info.value.fix


def test_unreadable_path_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="cannot read the state file"):
        read_state(tmp_path)


def test_environment_mismatch_is_refused() -> None:
    with pytest.raises(StateError, match="belongs to production, not staging"):
        read_state(DATA / "documented.json", environment="staging")
    assert read_state(DATA / "documented.json", environment="prod").environment == "production"


def _renamed(doc: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """`doc` with its top-level keys renamed as `names` says, in place, order kept."""
    return {names.get(k, k): v for k, v in doc.items()}


# Deployment records under top-level keys no dialect uses (CONTRACTS.md: all three keep them
# under current_deployment, previous_deployment, deployment_history): the keys that hold them.
UNKNOWN_DIALECTS = {
    "renamed by hand": (
        {"current_deployment": "current", "previous_deployment": "previous",
         "deployment_history": "history"}, ("current", "previous", "history")),
    "a list of records": (
        {"current_deployment": "deployments", "previous_deployment": "_dropped"},
        ("deployments", "_dropped")),
}


@pytest.mark.parametrize("case", list(UNKNOWN_DIALECTS))
def test_records_under_keys_no_dialect_uses_are_refused_never_read_as_none_recorded(
        case: str, tmp_path: Path) -> None:
    """Found by review: `current`, `previous`, `history` in place of the documented keys read
    as "nothing recorded": rollback said "first deployment or cleared state", status showed
    none, and a deploy planned a first record over a file holding deployments it could not
    see. Refused like any record the reader refuses (exit 4), naming the keys and the fix."""
    names, keys = UNKNOWN_DIALECTS[case]
    doc = _renamed(load("documented.json"), names)
    if case == "a list of records":  # the current record and the history, one list
        doc["deployments"] = [doc["deployments"], *doc.pop("deployment_history")]
    target = tmp_path / "deployment-state.json"
    target.write_text(json.dumps(doc, indent=2))
    before = target.read_bytes()
    with pytest.raises(StateError) as info:
        read_state(target, environment="production")
    err = info.value
    assert err.exit_code == ExitCode.PRECONDITION and "\n" not in str(err), err
    assert err.message.startswith(f"{target}: current_deployment: "), err.message
    for key in keys:
        assert repr(key) in err.message, err.message
    assert "current_deployment" in (err.fix or "") and "dialect" in (err.fix or ""), err.fix
    assert '"current_deployment": null' in (err.fix or ""), err.fix
    assert target.read_bytes() == before


@pytest.mark.parametrize("doc", [
    {"environment": "production", "lock": {"locked": False}},
    {"environment": "production", "lock": {"locked": False}, "operator_notes": {"pager": "x"},
     "tags": ["blue", {"owner": "ops"}]},
    load("deploy_script_first.json"),
    {**load("deploy_script_first.json"),
     "slots": {"blue": {"status": "active", "version": "abc1234"}, "green": {}}},
    {**load("deploy_script_first.json"), "meta": {"version": 2}},
], ids=["cleared", "other tools' keys", "deploy script's first file", "its slots",
        "another tool's versioned object"])
def test_a_file_without_current_deployment_that_records_none_is_still_read(
        doc: dict[str, Any]) -> None:
    """What the refusal above must leave alone: a cleared state, and the deploy script's
    first-ever file (`active_slot`, `slots`, `last_deployment`), record no deployment; nor
    does an object with a `version` alone (another tool's `meta`: refused, found by review)."""
    s = parse_state(json.dumps(doc), environment="production")
    assert s.current is None and s.previous is None and s.history == ()


# --- transitions ----------------------------------------------------------------------------


def test_find_version_by_version_commit_prefix_and_id() -> None:
    s = read_state(DATA / "documented.json")
    assert s.find_version("abc5678") is s.previous
    assert s.find_version("ABC5678901") is s.previous
    assert s.find_version("def9876") is s.history[0]
    assert s.find_version("dep_01JBQR2KXYZABCDEFGHJKMNPQR") is s.current
    assert s.find_version("abc") is None and s.find_version("") is None
    assert s.find_id("dep_01JBQR0KXYZABCDEFGHJKMNPQR") is s.history[0]


def test_after_deploy_moves_current_to_previous() -> None:
    s = DeploymentState(environment="production")
    first, second = dep(1, Slot.BLUE), dep(2, Slot.GREEN)
    s1 = after_deploy(s, first)
    assert s1.current == first and s1.previous is None and s1.history == ()
    s2 = after_deploy(s1, second)
    assert s2.current == second
    assert s2.previous == first.with_(status="superseded")
    assert [d.id for d in s2.history] == [first.id]
    assert s1.current == first  # pure: the input is unchanged


def test_history_is_newest_first_unique_and_keeps_every_deployment() -> None:
    s = DeploymentState(environment="production")
    for n in range(1, 70):
        s = after_deploy(s, dep(n, Slot.BLUE if n % 2 else Slot.GREEN))
    ids = [d.id for d in s.history]
    assert len(ids) == 68 == len(set(ids))  # 69 deployments: all but the current one
    assert ids == sorted(ids, reverse=True)
    assert s.current is not None and s.current.id not in ids
    assert s.previous is not None and ids[0] == s.previous.id


def _others_history(n: int) -> list[dict[str, Any]]:
    """`n` history entries another tool wrote, newest first, each with a key of its own."""
    return [{"id": f"dep_other_{i:03d}", "version": sha(500 + i)[:7], "git_commit": sha(500 + i),
             "deployed_at": f"2025-{1 + i // 28:02d}-{1 + i % 28:02d}T08:00:00Z",
             "deployed_by": "ci@build-runner", "active_slot": "blue" if i % 2 else "green",
             "health_status": "healthy", "status": "superseded", "pipeline_run": 9000 + i}
            for i in reversed(range(n))]


def test_a_deploy_and_a_rollback_keep_every_history_entry_another_tool_wrote(
        tmp_path: Path) -> None:
    doc = load("documented.json")
    doc["deployment_history"] = _others_history(80)
    path = tmp_path / "deployment-state.json"
    path.write_text(json.dumps(doc, indent=2))
    write_state(path, after_deploy(read_state(path), dep(7, Slot.GREEN)))
    write_state(path, after_rollback(read_state(path), run_id="rbk_1"))
    history = json.loads(path.read_text())["deployment_history"]
    ids = [h["id"] for h in history]
    assert len(ids) == len(set(ids)) == 80 + 2  # theirs, the old previous, the rolled-back one
    for entry in doc["deployment_history"]:  # each as the other tool wrote it, in its order
        assert history[ids.index(entry["id"])] == entry
    assert [i for i in ids if i.startswith("dep_other_")] == [
        h["id"] for h in doc["deployment_history"]]


def test_to_json_dedupes_history() -> None:
    d = dep(1)
    s = DeploymentState(environment="staging", history=(d, d.with_(status="failed"), d))
    assert [h["status"] for h in to_json(s)["deployment_history"]] == ["active"]


def test_after_rollback_swaps_current_and_previous() -> None:
    s = after_deploy(after_deploy(DeploymentState(environment="production"), dep(1, Slot.BLUE)),
                     dep(2, Slot.GREEN))
    r = after_rollback(s, run_id="rbk_1")
    assert r.current is not None and r.previous is not None
    assert r.current.id == "dep_0001" and r.current.status == "active"
    assert r.current.rollback_count == 1 and r.current.active_slot is Slot.BLUE
    assert r.current.extra == {"rollback": True, "rollback_id": "rbk_1"}
    assert r.previous.id == "dep_0002" and r.previous.status == "rolled_back"
    assert [d.id for d in r.history] == ["dep_0002"]
    assert s.current is not None and s.current.status == "active"  # pure
    back = after_rollback(r)
    assert back.current is not None and back.current.id == "dep_0002"
    assert back.current.rollback_count == 1


def test_rollback_to_a_history_entry() -> None:
    s = DeploymentState(environment="production")
    for n in range(1, 5):
        s = after_deploy(s, dep(n, Slot.BLUE if n % 2 else Slot.GREEN))
    target = s.find_version(sha(1)[:7])
    assert target is not None
    r = after_rollback(s, target, slot=Slot.BLUE, health_status="healthy")
    assert r.current is not None and r.current.id == "dep_0001"
    assert r.current.health_status == "healthy"
    assert r.previous is not None and r.previous.id == "dep_0004"
    assert [d.id for d in r.history] == ["dep_0004", "dep_0003", "dep_0002"]


def test_rollback_preconditions() -> None:
    empty = DeploymentState(environment="production")
    with pytest.raises(StateError, match="no current deployment"):
        after_rollback(empty)
    only = after_deploy(empty, dep(1))
    with pytest.raises(StateError, match="no previous deployment"):
        after_rollback(only)
    with pytest.raises(StateError, match="already current"):
        after_rollback(only, only.current)
    unknown_slot = dep(0, active_slot=None)
    with pytest.raises(StateError, match="does not record its slot"):
        after_rollback(only, unknown_slot)


def test_with_lock_replaces_only_the_lock() -> None:
    s = read_state(DATA / "deploy_script.json")
    unlocked = with_lock(s, {"locked": False})
    assert unlocked.lock == {"locked": False} and unlocked.extra == s.extra
    assert unlocked.current == s.current


def test_a_lock_key_no_tool_here_knows_survives_a_lock_and_its_release(tmp_path: Path) -> None:
    """Found by review: CONTRACTS says a writer keeps keys it does not know, and with_lock's
    docstring says it does, but the lock mirror was rebuilt from the runbook's own keys: a
    third tool's `team` key in the lock was gone after the first run."""
    for fixture in ("documented.json", "go_cli.json"):
        path = copy_fixture(fixture, tmp_path)
        doc = json.loads(path.read_text())
        doc["lock"]["team"] = {"name": "sre", "pager": "#ops"}
        path.write_text(json.dumps(doc, indent=2) + "\n")
        written = path.read_bytes()
        held = {"locked": True, "lock_id": "lock_1", "locked_by": "ops@here",
                "locked_at": "2026-02-11T08:00:00Z", "lock_expires_at": "2026-02-11T08:30:00Z",
                "pid": 42, "reason": "rollback"}
        write_state(path, with_lock(read_state(path), held))
        locked = json.loads(path.read_text())["lock"]
        assert locked["locked"] is True and locked["team"] == {"name": "sre", "pager": "#ops"}
        write_state(path, with_lock(read_state(path), {"locked": False}))
        assert json.loads(path.read_text())["lock"]["team"] == {"name": "sre", "pager": "#ops"}
        assert json.loads(path.read_bytes()) == json.loads(written), fixture


def test_a_null_history_entry_is_named_as_what_to_remove() -> None:
    """Found by review: `[.previous_deployment] + .deployment_history` with a null previous
    writes a null entry; the refusal said "expected an object or null, got null"."""
    doc = load("documented.json")
    doc["deployment_history"].insert(0, None)
    with pytest.raises(StateError) as err:
        parse_state(json.dumps(doc).encode(), "deployment-state.json",
                    environment=doc["environment"])
    assert "deployment_history[0]: expected an object, got null" in err.value.message
    assert "or null" not in err.value.message
    assert "remove that entry from deployment_history" in (err.value.fix or "")


def test_make_deployment_validates() -> None:
    with pytest.raises(StateError, match="7-hex"):
        make_deployment("main", "a" * 40, Slot.BLUE)
    with pytest.raises(StateError, match="40 hex"):
        make_deployment("abc1234", "abc1234", "green")
    d = make_deployment("ABC1234", "ABC1234" + "0" * 33, "green", migration_version=7)
    assert d.version == "abc1234" and d.active_slot is Slot.GREEN and d.id.startswith("dep_")
    assert d.image == "" and d.status == "deploying"  # not recorded unless given


# --- properties -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)

VALID = load("documented.json")
MUTABLE_PATHS: list[tuple[str | int, ...]] = [
    ("environment",), ("current_deployment",), ("previous_deployment",), ("deployment_history",),
    ("lock",), ("lock", "locked"), ("lock", "pid"), ("lock", "locked_at"),
    ("deployment_history", 0), ("deployment_history", 0, "active_slot"),
    *[(which, key) for which in ("current_deployment", "previous_deployment")
      for key in ("id", "version", "git_commit", "deployed_at", "deployed_by", "active_slot",
                  "slot", "health_status", "status", "migrations_run", "rollback_count",
                  "docker_image", "migration_version", "extra_key")],
]


def _parses_or_state_error(text: str | bytes) -> DeploymentState | None:
    try:
        return parse_state(text, "prop.json")
    except StateError as exc:
        assert "\n" not in exc.message
        return None


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.text())
def test_any_text_parses_or_raises_state_error(text: str) -> None:
    _parses_or_state_error(text)


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_any_bytes_parse_or_raise_state_error(raw: bytes) -> None:
    _parses_or_state_error(raw)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(json_values)
def test_any_json_value_parses_or_raises_state_error(value: Any) -> None:
    _parses_or_state_error(json.dumps(value))


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.tuples(st.sampled_from(MUTABLE_PATHS), json_values | st.just(_DELETE)),
                min_size=1, max_size=3))
def test_mutated_valid_documents_parse_or_raise_and_round_trip(
        edits: list[tuple[tuple[str | int, ...], Any]]) -> None:
    doc: Any = copy.deepcopy(VALID)
    for path, value in edits:
        node = doc
        try:
            for part in path[:-1]:
                node = node[part]
            if value is _DELETE:
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    parsed = _parses_or_state_error(json.dumps(doc))
    if parsed is not None:  # whatever parses survives its own rewrite unchanged
        again = parse_state(json.dumps(to_json(parsed)), "prop.json")
        assert again == parsed


# --- other tools' state survives a round trip (issue 10) ------------------------------------
#
# The oracle is the document the test itself generated: JSON as the other tool wrote it, compared
# key by key with what we wrote. Nothing from runbook.state decides what "unchanged" means here.

HEX = "0123456789abcdef"
hex_text = st.text(HEX, min_size=1, max_size=1)


def _hex(n: int) -> st.SearchStrategy[str]:
    return st.text(HEX, min_size=n, max_size=n)


@st.composite
def rfc3339(draw: st.DrawFn) -> str:
    """Times as the tools write them: Z or an offset, no fraction up to nanoseconds."""
    moment = draw(st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1)))
    digits = draw(st.sampled_from(["", "3", "5", "6", "9"]))
    frac = "." + draw(st.text("0123456789", min_size=int(digits), max_size=int(digits))) \
        if digits else ""
    zone = draw(st.sampled_from(["Z", "-05:00", "+01:00", "+05:30"]))
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + frac + zone


extra_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12)
    | st.floats(allow_nan=False, allow_infinity=False, width=32).filter(lambda f: f == int(f))
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text("abcxyz_", min_size=1, max_size=6), children, max_size=3),
    max_leaves=6,
)
extra_keys = st.text("abcdefghijklmnopqrstuvwxyz_<>&é", min_size=1, max_size=10).map(
    lambda k: "x_" + k)


@st.composite
def deployment_doc(draw: st.DrawFn, dialect: str, env: str) -> dict[str, Any]:
    commit = draw(_hex(40))
    version = commit[:7] if draw(st.booleans()) else draw(_hex(7))
    if draw(st.integers(0, 9)) == 0:
        version = version.upper()  # odd, still valid: must stay as written
    slot = draw(st.sampled_from(["blue", "green"]))
    who = draw(st.sampled_from(["ci@build-runner", "deploy@host-1", "operator@example.com"]))
    doc: dict[str, Any]
    if dialect == "go":
        doc = {"version": version, "deployed_at": draw(rfc3339()), "git_commit": commit,
               "docker_image": f"togather-server:{version}", "slot": slot}
        if draw(st.booleans()):
            doc["deployed_by"] = who
        if draw(st.booleans()):
            doc["snapshot_path"] = "/var/lib/togather/db-snapshots/x.sql.gz"
        if draw(st.booleans()):
            doc.update(rollback=True, rollback_id=f"rb-{draw(st.integers(1, 10**10))}")
    elif dialect == "script":
        doc = {"id": f"dep_{draw(_hex(16))}_{draw(_hex(24))}", "version": version,
               "git_commit": commit, "deployed_at": draw(rfc3339()), "deployed_by": who,
               "active_slot": slot, "health_status": "unknown",
               "status": draw(st.sampled_from(["active", "superseded"])), "environment": env}
    else:
        doc = {"id": f"dep_{draw(_hex(26))}", "version": version, "git_commit": commit,
               "deployed_at": draw(rfc3339()), "deployed_by": who, "active_slot": slot,
               "health_status": draw(st.sampled_from(["healthy", "degraded", "unknown"]))}
        for key, values in (("status", st.sampled_from(["active", "superseded"])),
                            ("migrations_run", st.integers(0, 9)),
                            ("rollback_count", st.integers(0, 3)),
                            ("migration_version", st.integers(0, 500))):
            if draw(st.booleans()):
                doc[key] = draw(values)
    for key, value in draw(st.dictionaries(extra_keys, extra_values, max_size=2)).items():
        doc[key] = value
    keys = draw(st.permutations(list(doc)))
    return {k: doc[k] for k in keys}


@st.composite
def lock_doc(draw: st.DrawFn, dialect: str) -> dict[str, Any]:
    locked = draw(st.booleans())
    if dialect == "go":
        if not locked:
            return {"locked": False, "locked_at": "0001-01-01T00:00:00Z",
                    "expires_at": "0001-01-01T00:00:00Z"}
        return {"locked": True, "locked_at": draw(rfc3339()), "locked_by": "ci@build-runner",
                "reason": draw(st.text(max_size=15)), "expires_at": draw(rfc3339())}
    if not locked:
        return {"locked": False}
    return {"locked": True, "lock_id": f"lock_{draw(_hex(16))}_{draw(_hex(24))}",
            "deployment_id": f"dep_{draw(_hex(16))}_{draw(_hex(24))}",
            "locked_by": "deploy@host-1", "locked_at": draw(rfc3339()),
            "lock_expires_at": draw(rfc3339()), "pid": draw(st.integers(1, 4_000_000)),
            "hostname": "host-1"}


GENERATED_DIALECTS = {"documented": statemod.DOCUMENTED, "script": statemod.DEPLOY_SCRIPT,
                      "go": statemod.GO_CLI}


@st.composite
def state_doc(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    dialect = draw(st.sampled_from(["documented", "script", "go"]))
    env = draw(st.sampled_from(["production", "staging", "development"]))
    deps = draw(st.lists(deployment_doc(dialect, env), min_size=2, max_size=5,
                         unique_by=lambda d: (d["git_commit"], d["deployed_at"])))
    doc: dict[str, Any] = {
        "environment": "" if dialect == "script" and draw(st.booleans()) else env,
        "current_deployment": deps[0], "previous_deployment": deps[1],
    }
    if len(deps) > 2 or draw(st.booleans()):
        doc["deployment_history"] = deps[1:] if dialect == "go" else deps[2:]
    doc["lock"] = draw(lock_doc(dialect))
    if dialect == "script":
        doc.update(active_slot=deps[0].get("active_slot"),
                   slots={"blue": {"status": "inactive"}, "green": {"status": "inactive"}},
                   last_deployment=None)
    for key, value in draw(st.dictionaries(extra_keys, extra_values, max_size=2)).items():
        doc[key] = value
    keys = draw(st.permutations(list(doc)))
    return dialect, {k: doc[k] for k in keys}


@st.composite
def written(draw: st.DrawFn) -> tuple[str, dict[str, Any], bytes]:
    """A generated state file, formatted the way some tool formats it."""
    dialect, doc = draw(state_doc())
    indent = draw(st.sampled_from([2, 4, "\t", None]))
    text = json.dumps(doc, indent=indent, ensure_ascii=draw(st.booleans()),
                      separators=(",", ":") if indent is None and draw(st.booleans()) else None)
    if dialect == "go" and draw(st.booleans()):
        text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    if draw(st.booleans()):
        text += "\n"
    return dialect, doc, text.encode()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(written())
def test_any_dialect_round_trips_byte_identical(case: tuple[str, dict[str, Any], bytes]) -> None:
    _, doc, raw = case
    assert statemod.dumps(parse_state(raw, "prop.json")) == raw
    assert statemod.dumps(parse_state(raw.decode(), "prop.json",
                                      environment=_env_of(doc))) == raw


def _env_of(doc: dict[str, Any]) -> str:
    return str(doc["environment"] or doc["current_deployment"]["environment"])


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.json")))
def test_fixture_round_trip_is_byte_identical(name: str, tmp_path: Path) -> None:
    path = copy_fixture(name, tmp_path)
    write_state(path, read_state(path, environment="production" if "script" in name else None))
    assert path.read_bytes() == (DATA / name).read_bytes()


ROLLBACK_CHANGES = {"status", "rollback_count", "health_status", "active_slot", "slot",
                    "rollback", "rollback_id", "live_since"}  # live since the rollback
# what a record the runbook rewrites gains when its file lacked them (the required keys)
COMPLETED = {"id", "deployed_by", "active_slot", "health_status"}


def _differs_only_in(new: dict[str, Any], old: dict[str, Any], allowed: set[str]) -> set[str]:
    """Which keys changed; fails when one outside `allowed` moved, vanished or appeared."""
    changed = set()
    assert [k for k in old if k in new] == [k for k in new if k in old]  # order kept
    for key in old.keys() | new.keys():
        if key not in new or key not in old or not _json_same(new[key], old[key]):
            assert key in allowed, f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            changed.add(key)
    return changed


def _json_same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=False) == json.dumps(b, sort_keys=False)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(written(), st.sampled_from(["healthy", "degraded", None]), st.booleans(),
       st.booleans())
def test_rollback_changes_only_what_a_rollback_changes(
        case: tuple[str, dict[str, Any], bytes], health: str | None, other_slot: bool,
        to_history: bool) -> None:
    dialect, doc, raw = case
    s = parse_state(raw, "prop.json", environment=_env_of(doc))
    target = s.history[-1] if to_history and s.history else s.previous
    assert target is not None and s.current is not None
    if target.id == s.current.id or target.version == s.current.version:
        return
    slot = (target.slot.other if other_slot else None)
    written = statemod.dumps(after_rollback(s, target, slot=slot, health_status=health,
                                            run_id="rbk_1"))
    assert parse_state(written).dialect == GENERATED_DIALECTS[dialect]  # still that tool's file
    out = json.loads(written)
    originals = [doc["current_deployment"], doc["previous_deployment"],
                 *doc.get("deployment_history", [])]
    target_raw = next(o for o in originals[1:] if o["git_commit"] == target.git_commit
                      and o["deployed_at"] == target.raw["deployed_at"])  # type: ignore[index]
    # top level: only the three deployment keys may change (and a blank environment is
    # filled: the deploy script refuses its own ""); lock and extras stay as written
    filled = set() if doc.get("environment") else {"environment"}
    _differs_only_in(out, doc, {"current_deployment", "previous_deployment",
                                "deployment_history"} | filled)
    if filled:
        assert out["environment"] == s.environment != ""
    cur, prev = out["current_deployment"], out["previous_deployment"]
    changed = _differs_only_in(cur, target_raw, ROLLBACK_CHANGES | COMPLETED)
    assert cur.get("rollback") is True and cur.get("rollback_id") == "rbk_1"
    assert cur["status"] == "active" and "rollback_count" in changed
    new_slot = str(slot or target.slot)
    assert cur["active_slot"] == new_slot and cur.get("slot", new_slot) == new_slot
    assert ("slot" in cur) == ("slot" in target_raw)  # the Go CLI's key stays, and only there
    assert "status" in _differs_only_in(prev, doc["current_deployment"], {"status"} | COMPLETED)
    assert prev["status"] == "rolled_back"
    for record, was in ((cur, target_raw), (prev, doc["current_deployment"])):
        assert [k for k in REQUIRED if k not in record] == []
        assert record["id"] == was.get("id", record["id"])
        assert record["deployed_by"] == was.get("deployed_by", "unknown")
    for entry in out.get("deployment_history", []):
        if any(_json_same(entry, o) for o in originals):
            continue  # as some tool wrote it
        # one the runbook rewrote: an original with its status moved and the required keys
        assert [k for k in REQUIRED if k not in entry] == [], entry
        assert any(set(entry) ^ set(o) <= {"status"} | COMPLETED and all(
            _json_same(entry[k], o[k]) for k in o if k != "status") for o in originals), entry
    moved = {(o["git_commit"], o["deployed_at"]) for o in (target_raw, doc["previous_deployment"])}
    for o in doc.get("deployment_history", []):  # the others' history entries all stay as is
        if (o["git_commit"], o["deployed_at"]) not in moved:
            assert any(_json_same(o, entry) for entry in out["deployment_history"]), o


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(written())
def test_lock_mirror_keeps_the_dialects_lock_fields(
        case: tuple[str, dict[str, Any], bytes]) -> None:
    dialect, doc, raw = case
    s = parse_state(raw, "prop.json", environment=_env_of(doc))
    held = {"locked": True, "lock_id": "lock_1", "locked_by": "ops@here",
            "locked_at": "2026-02-11T08:00:00Z", "lock_expires_at": "2026-02-11T08:30:00Z",
            "deployment_id": "rbk_1", "pid": 42, "hostname": "here", "reason": "rollback"}
    locked_raw = statemod.dumps(with_lock(s, held))
    locked = json.loads(locked_raw)
    _differs_only_in(locked, doc, {"lock"})
    # both names, one time: the Go CLI reads `expires_at`, the others `lock_expires_at`
    assert locked["lock"]["expires_at"] == locked["lock"]["lock_expires_at"] \
        == "2026-02-11T08:30:00Z"
    keys = list(locked["lock"])
    if dialect == "go":
        assert keys[:5] == ["locked", "locked_at", "locked_by", "reason", "expires_at"]
    else:
        assert keys.index("lock_expires_at") < keys.index("expires_at")
    again = parse_state(locked_raw, "prop.json", environment=s.environment)
    assert again.dialect == GENERATED_DIALECTS[dialect]  # still the other tool's file
    assert again.lock["lock_expires_at"] == "2026-02-11T08:30:00Z" and again.locked
    unlocked = json.loads(statemod.dumps(with_lock(again, {"locked": False})))
    if not doc["lock"]["locked"]:  # lock then release: the file is as the other tool wrote it
        assert _json_same(unlocked, doc)
    else:
        _differs_only_in(unlocked, doc, {"lock"})
        assert unlocked["lock"]["locked"] is False


def test_go_cli_lock_then_release_is_byte_identical(tmp_path: Path) -> None:
    path = copy_fixture("go_cli.json", tmp_path)
    held = {"locked": True, "lock_id": "lock_1", "locked_by": "ops@here",
            "locked_at": "2026-02-11T08:00:00Z", "lock_expires_at": "2026-02-11T08:30:00Z",
            "pid": 42, "reason": "rollback"}
    write_state(path, with_lock(read_state(path), held))
    lock = json.loads(path.read_text())["lock"]
    assert lock == {"locked": True, "locked_at": "2026-02-11T08:00:00Z", "locked_by": "ops@here",
                    "reason": "rollback", "expires_at": "2026-02-11T08:30:00Z",
                    "lock_expires_at": "2026-02-11T08:30:00Z", "lock_id": "lock_1", "pid": 42}
    write_state(path, with_lock(read_state(path), {"locked": False}))
    assert path.read_bytes() == (DATA / "go_cli.json").read_bytes()


def test_go_cli_rollback_keeps_the_go_cli_dialect(tmp_path: Path) -> None:
    """The issue's report: slot and lock fields dropped, nanoseconds cut, deployed_by invented
    (the rollback's operator is not who deployed it: a deployment with none says "unknown")."""
    path = copy_fixture("go_cli_locked.json", tmp_path)
    doc = load("go_cli.json")
    doc["lock"] = load("go_cli_locked.json")["lock"]
    del doc["previous_deployment"]["deployed_by"]
    doc["previous_deployment"]["deployed_at"] = "2026-02-09T10:01:55.123456789Z"
    path.write_text(json.dumps(doc, indent=2))
    write_state(path, after_rollback(read_state(path), run_id="rbk_9", health_status="healthy"))
    out = json.loads(path.read_text())
    cur = out["current_deployment"]
    assert cur["slot"] == cur["active_slot"] == "green"
    assert cur["deployed_at"] == "2026-02-09T10:01:55.123456789Z"
    assert cur["deployed_by"] == "unknown"
    assert cur["id"] == go_id("9a8b7c6d5e4f30211a2b3c4d5e6f708192a3b4c5", "9a8b7c6",
                              "2026-02-09T10:01:55.123456Z")
    assert cur["rollback"] is True and cur["rollback_id"] == "rbk_9"
    assert out["lock"] == doc["lock"]
    assert out["previous_deployment"]["status"] == "rolled_back"
    assert out["previous_deployment"]["deployed_at"] == "2026-02-10T14:22:07.482913577-05:00"


def test_a_go_cli_file_after_a_rollback_has_every_required_key_and_its_own(
        tmp_path: Path) -> None:
    """deploy.sh reads `.current_deployment.active_slot // "blue"` and refuses a deployment
    without an id; the Go CLI reads `slot`. After a rollback to green both must say green."""
    original = load("go_cli.json")
    path = copy_fixture("go_cli.json", tmp_path)
    write_state(path, after_rollback(read_state(path), run_id="rbk_9", health_status="healthy"))
    out = json.loads(path.read_text())
    cur, prev = out["current_deployment"], out["previous_deployment"]
    for entry in (cur, prev, out["deployment_history"][0]):
        assert [k for k in REQUIRED if k not in entry] == []
        assert entry["active_slot"] == entry["slot"]
    assert cur["active_slot"] == "green" and prev["active_slot"] == "blue"
    assert cur["id"] == go_id("9a8b7c6d5e4f30211a2b3c4d5e6f708192a3b4c5", "9a8b7c6",
                              "2026-02-09T15:01:55.102930Z")
    assert prev["id"] == go_id("e4d2c1b0a9f8e7d6c5b4a3928170f6e5d4c3b2a1", "e4d2c1b",
                               "2026-02-10T19:22:07.482913Z")
    assert cur["health_status"] == "healthy" and cur["deployed_by"] == "ci@build-runner"
    assert prev["health_status"] == "unknown" and prev["status"] == "rolled_back"
    # the Go CLI's own keys and values stay as it wrote them
    for key, value in original["previous_deployment"].items():
        assert cur[key] == value, key
    for key, value in original["current_deployment"].items():
        assert prev[key] == value, key
    assert out["deployment_history"][0] == prev
    assert out["deployment_history"][1] == original["deployment_history"][1]  # not ours: as is
    assert read_state(path).dialect == statemod.GO_CLI


def test_a_go_cli_file_after_a_deploy_has_every_required_key(tmp_path: Path) -> None:
    path = copy_fixture("go_cli.json", tmp_path)
    write_state(path, after_deploy(read_state(path), dep(7, Slot.GREEN)))
    out = json.loads(path.read_text())
    for entry in (out["current_deployment"], out["previous_deployment"]):
        assert [k for k in REQUIRED if k not in entry] == []
        assert entry["active_slot"] == entry["slot"]
    assert out["current_deployment"]["active_slot"] == "green"
    assert out["current_deployment"]["id"] == "dep_0007"
    assert read_state(path).dialect == statemod.GO_CLI


def test_new_deployment_is_written_in_the_files_dialect(tmp_path: Path) -> None:
    path = copy_fixture("go_cli.json", tmp_path)
    new = dep(7, Slot.GREEN).with_(deployed_at=datetime(2026, 3, 1, 12, 0, 0, 500000,
                                                        tzinfo=UTC))
    write_state(path, after_deploy(read_state(path), new))
    cur = json.loads(path.read_text())["current_deployment"]
    assert cur["slot"] == cur["active_slot"] == "green"
    assert cur["deployed_at"] == "2026-03-01T12:00:00.5Z"
    assert read_state(path).current.id == new.id  # type: ignore[union-attr]
    path = copy_fixture("deploy_script.json", tmp_path)
    write_state(path, after_deploy(read_state(path), new))
    out = json.loads(path.read_text())
    assert out["current_deployment"]["environment"] == "production"
    assert out["current_deployment"]["active_slot"] == "green"
    # the blank top-level environment is filled (the script's own validation refuses "");
    # the keys of its first-ever file are kept
    assert out["environment"] == "production"
    assert out["slots"] == load("deploy_script.json")["slots"]
    assert out["previous_deployment"] == {**load("deploy_script.json")["current_deployment"],
                                          "status": "superseded"}


def test_dialect_detection() -> None:
    assert read_state(DATA / "documented.json").dialect == statemod.DOCUMENTED
    assert read_state(DATA / "deploy_script.json").dialect == statemod.DEPLOY_SCRIPT
    assert read_state(DATA / "deploy_script_first.json").dialect == statemod.DEPLOY_SCRIPT
    assert read_state(DATA / "go_cli.json").dialect == statemod.GO_CLI
    assert read_state(DATA / "go_cli_locked.json").dialect == statemod.GO_CLI
    assert DeploymentState(environment="staging").dialect == statemod.DOCUMENTED


ODD_VALUES = [
    ("go_cli.json", ("current_deployment", "slot"), "purple",
     "current_deployment.slot: 'purple' is not a slot"),
    ("go_cli.json", ("current_deployment", "deployed_at"), "2026-02-10 14:22",
     "current_deployment.deployed_at: '2026-02-10 14:22' is not a valid time"),
    ("go_cli.json", ("lock", "expires_at"), "soon", "lock.expires_at: 'soon' is not a valid time"),
    ("go_cli_locked.json", ("lock", "locked_at"), 1739260800,
     "lock.locked_at: expected a time string"),
    ("go_cli_locked.json", ("lock", "reason"), ["deploy"], "lock.reason: expected a string"),
    ("deploy_script.json", ("current_deployment", "environment"), "qa", None),
    ("deploy_script.json", ("lock", "pid"), "48213", None),  # jq --arg's pid
    ("deploy_script.json", ("lock", "pid"), "48213x", "lock.pid: expected an integer"),
    ("deploy_script.json", ("lock", "locked_at"), "", None),  # jq's unset time
    ("deploy_script.json", ("lock", "locked"), "false", "lock.locked: expected true or false"),
    ("deploy_script.json", ("previous_deployment", "health_status"), "", None),
]


@pytest.mark.parametrize(("name", "path", "value", "expected"), ODD_VALUES,
                         ids=[f"{n}:{'.'.join(map(str, p))}" for n, p, _, _ in ODD_VALUES])
def test_odd_values_in_each_dialect(name: str, path: tuple[str | int, ...], value: Any,
                                    expected: str | None, tmp_path: Path) -> None:
    """Either a one-line error naming the key the file has, or it reads and rewrites as is."""
    target = tmp_path / "deployment-state.json"
    target.write_text(json.dumps(_mutate(load(name), path, value), indent=2))
    before = target.read_bytes()
    if expected is None:
        write_state(target, read_state(target, environment="production"))
    else:
        with pytest.raises(StateError) as info:
            read_state(target)
        assert expected in info.value.message and "\n" not in str(info.value)
        assert info.value.fix and info.value.exit_code == ExitCode.PRECONDITION
    assert target.read_bytes() == before


# --- a file a deploy script builds with `jq --arg` ------------------------------------------
#
# `jq --arg` makes every value a string: counters and pids come out as "1", an unset time as
# "". The oracle is jq itself: it writes the file, and reads what the runbook wrote back.

JQ = shutil.which("jq")
needs_jq = pytest.mark.skipif(JQ is None, reason="jq is not installed")


def jq(path: Path, *args: str) -> str:
    """jq's output for `args` (its options and filter) run on `path`."""
    assert JQ is not None
    return subprocess.run([JQ, *args, str(path)], capture_output=True, text=True, check=True,
                          timeout=30).stdout


def jq_built(target: Path, *, locked: bool | str = False,
             name: str = "deploy_script.json") -> Path:
    """The fixture as a deploy script that builds it with `jq --arg` leaves it at `target`:
    its counters and the lock's pid strings of digits, the lock's unset times "", and
    `locked` a bool (`--argjson`) or, given a string, that string (`--arg`)."""
    locked_arg = ["--arg", "locked", locked] if isinstance(locked, str) \
        else ["--argjson", "locked", json.dumps(locked)]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(jq(DATA / name, "--arg", "ran", "1", "--arg", "none", "0",
                         "--arg", "pid", "48213", "--arg", "unset", "", *locked_arg,
                         ".current_deployment.migrations_run = $ran"
                         " | .current_deployment.rollback_count = $none"
                         " | .previous_deployment.migrations_run = $ran"
                         " | .previous_deployment.rollback_count = $none"
                         " | .lock = {locked: $locked, pid: $pid, locked_at: $unset,"
                         " lock_expires_at: $unset}"))
    return target


@needs_jq
def test_a_file_built_with_jq_arg_reads_its_digit_strings_as_counts_and_unset_times(
        tmp_path: Path) -> None:
    """Found by review on a drill stack: `"migrations_run": "1"` made status exit 1 and the
    rollback exit 4 ("expected a non-negative integer, got '1'"), a lock's `"pid": "48213"`
    and `"locked_at": ""` did too: an emergency rollback blocked until someone hand-edited
    the file. A string of ASCII digits is the count; "" is no time (as Go's zero time)."""
    path = jq_built(tmp_path / "deployment-state.json")
    doc = json.loads(path.read_text())
    assert doc["current_deployment"]["rollback_count"] == "0"  # the premise: jq wrote text
    assert doc["lock"] == {"locked": False, "pid": "48213", "locked_at": "",
                           "lock_expires_at": ""}
    before = path.read_bytes()
    state = read_state(path, environment="production")
    assert state.current is not None and state.previous is not None
    assert (state.current.migrations_run, state.current.rollback_count) == (1, 0)
    assert (state.previous.migrations_run, state.previous.rollback_count) == (1, 0)
    assert not state.locked and state.lock == {"locked": False, "pid": "48213"}
    write_state(path, state)
    assert path.read_bytes() == before  # nothing changed: every string kept as written


@needs_jq
def test_a_rollback_writes_a_counter_read_as_text_back_as_text_the_script_still_reads(
        tmp_path: Path) -> None:
    """The counter a rollback increments is written in the type the file had: a script
    that wrote it with `jq --arg` treats it as text (`"n=" + .rollback_count`, `== "0"`),
    which a number breaks ("string and number cannot be added"); jq -r and tonumber read
    either. A counter the file wrote as a number stays a number."""
    path = jq_built(tmp_path / "deployment-state.json")
    write_state(path, after_rollback(read_state(path, environment="production")))
    assert jq(path, "-r", ".current_deployment.rollback_count | type") == "string\n"
    assert jq(path, "-r", '"rollbacks=" + .current_deployment.rollback_count') == "rollbacks=1\n"
    assert jq(path, "-r", "(.current_deployment.rollback_count | tonumber) + 1") == "2\n"
    # what the rollback did not change stays as jq wrote it
    assert jq(path, "-c", ".current_deployment.migrations_run,"
              " .previous_deployment.migrations_run") == '"1"\n"1"\n'
    assert jq(path, "-c", ".previous_deployment.rollback_count") == '"0"\n'
    again = read_state(path)
    assert again.current is not None and again.current.rollback_count == 1
    (tmp_path / "numbers").mkdir()
    documented = copy_fixture("documented.json", tmp_path / "numbers")
    write_state(documented, after_rollback(read_state(documented)))
    assert jq(documented, "-r", ".current_deployment.rollback_count | type") == "number\n"


@needs_jq
@pytest.mark.parametrize("locked", ["false", "true", "0"])
def test_a_lock_whose_locked_is_a_string_is_held_whatever_it_says(
        tmp_path: Path, locked: str) -> None:
    """What decides safety is never read from text: `"locked": "false"` (`jq --arg`) is no
    bool, so the lock is held by whoever wrote it (exit 3) and nothing is changed, while
    the counters and the pid beside it are read as numbers."""
    from tests.drill_checks import host_env

    env = host_env(tmp_path)
    jq_built(env.state_file, locked=locked)
    before = env.state_file.read_bytes()
    assert json.loads(before)["lock"]["locked"] == locked  # the premise: a string
    with pytest.raises(StateError, match=r"lock\.locked: expected true or false"):
        read_state(env.state_file)
    with pytest.raises(LockedError) as held:
        lockmod.acquire(env, "rollback", None)
    assert held.value.exit_code == ExitCode.LOCKED == 3
    assert "an unknown user" in held.value.message, held.value.message
    assert lockmod.refusal(env) is not None  # a dry run says the same
    assert env.state_file.read_bytes() == before and not env.lock_path.exists()


@pytest.mark.parametrize("pid", ["text", "number"])
def test_a_held_locks_pid_written_as_text_never_makes_it_stale(tmp_path: Path,
                                                               pid: str) -> None:
    """The other half of reading a pid written as text: a held lock whose pid is dead on
    this host is stale at once, and the next run takes it over. Read from text, that would
    be a takeover no file made before (its lock was judged by its times alone): a live
    lock whose pid is "<dead pid>" stays held (exit 3), one whose pid is that number is
    stale (the premise: the pid is judged). Oracle: the process the test ran and reaped."""
    from tests.drill_checks import host_env

    env = host_env(tmp_path)
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()  # a pid no process has now (reaped)
    now = datetime.now(UTC)
    doc = load("deploy_script.json")
    doc["lock"] = {"locked": True, "locked_by": "deploy@ci", "locked_at": format_time(now),
                   "lock_expires_at": format_time(now + timedelta(minutes=30)),
                   "pid": str(done.pid) if pid == "text" else done.pid,
                   "hostname": socket.gethostname()}
    env.state_file.parent.mkdir(parents=True)
    env.state_file.write_text(json.dumps(doc, indent=2))
    before = env.state_file.read_bytes()
    assert read_state(env.state_file, environment="production").locked
    seen = lockmod.status(env)
    assert seen is not None and seen.source == "state file", seen
    if pid == "number":
        assert seen.stale and f"its process {done.pid} is no longer running" in seen.why
        return
    assert not seen.stale, seen.why
    with pytest.raises(LockedError) as held:
        lockmod.acquire(env, "rollback", None)
    assert held.value.exit_code == ExitCode.LOCKED and "deploy@ci" in held.value.message
    assert env.state_file.read_bytes() == before and not env.lock_path.exists()


def test_a_new_file_and_its_lock_cycle_keep_one_format(tmp_path: Path) -> None:
    """Our own new file: indent 2, no trailing spaces; a lock and release leave it as it was."""
    path = tmp_path / "deployment-state.json"
    write_state(path, after_deploy(DeploymentState(environment="staging"), dep(1)))
    first = path.read_bytes()
    assert first == (json.dumps(json.loads(first), indent=2) + "\n").encode()
    held = {"locked": True, "lock_id": "lock_1", "locked_by": "ops@here", "pid": 42,
            "locked_at": "2026-02-11T08:00:00Z", "lock_expires_at": "2026-02-11T08:30:00Z"}
    write_state(path, with_lock(read_state(path), held))
    assert b", \n" not in path.read_bytes()
    write_state(path, with_lock(read_state(path), {"locked": False}))
    assert path.read_bytes() == first


def test_the_deployment_that_replaced_the_previous_one_is_the_current_one(
        tmp_path: Path) -> None:
    """A (schema 49), B, a rollback to A (which keeps A's deployed_at), days on A, then C:
    C replaced A, not B. Taking "the earliest deployment after A" picked B, so an automatic
    restore chose B's pre-deploy snapshot and dropped everything written since."""
    from runbook import migration_source
    from tests.drill_checks import host_env

    env = host_env(tmp_path)
    a, b, c = dep(1), dep(2, Slot.GREEN), dep(3, Slot.GREEN)
    env.state_file.parent.mkdir(parents=True)
    write_state(env.state_file, DeploymentState("production", current=c, previous=a,
                                                history=(c, a, b)))
    assert migration_source.successor(env, a, c).id == c.id
    older = dep(0)  # further back (--to): the earliest recorded after it, as before
    write_state(env.state_file, DeploymentState("production", current=c, previous=b,
                                                history=(c, b, older)))
    assert migration_source.successor(env, older, c).id == b.id


@pytest.mark.parametrize("fixture", ["documented.json", "deploy_script.json", "go_cli.json"])
def test_a_rollback_records_when_its_target_went_live_again_and_the_schema_it_runs_with(
        tmp_path: Path, fixture: str) -> None:
    """Found by review: a rollback kept the target's first deployed_at and recorded no schema
    for it, so after the next deploy "the target was live" reached back over the release it
    was rolled back from, and the schema guard took that release's snapshots for the
    target's. It now records when the target went live again and the schema the guard
    checked it runs with, in every dialect, beside the keys each tool reads (deployed_at
    stays the first deployment's)."""
    path = copy_fixture(fixture, tmp_path)
    doc = load(fixture)
    s = read_state(path)
    assert s.previous is not None and s.previous.migration_version is None
    back = datetime(2026, 2, 12, 3, 0, 5, tzinfo=UTC)
    write_state(path, after_rollback(s, run_id="rbk_1", live_since=back, migration_version=48))
    out = json.loads(path.read_text())["current_deployment"]
    assert out["live_since"] == "2026-02-12T03:00:05Z" and out["migration_version"] == 48
    assert out["deployed_at"] == doc["previous_deployment"]["deployed_at"]
    again = read_state(path)
    assert again.current is not None and again.current.id == s.previous.id
    assert again.current.live_since == back and again.current.migration_version == 48
    assert again.current.deployed_at == s.previous.deployed_at
    # a schema recorded already is the one its deploy ran with: kept
    known = after_deploy(after_deploy(DeploymentState("production"),
                                      dep(1, migration_version=47)), dep(2, Slot.GREEN))
    kept = after_rollback(known, live_since=back, migration_version=48)
    assert kept.current is not None and kept.current.migration_version == 47
    # the one rolled back from: the schema it served on when its record names none, in
    # every dialect; one recorded is its deploy's, kept
    (tmp_path / "served").mkdir()
    fresh = copy_fixture(fixture, tmp_path / "served")
    s = read_state(fresh)
    assert s.current is not None and s.current.migration_version is None  # the premise
    write_state(fresh, after_rollback(s, run_id="rbk_1", served_schema=49))
    assert json.loads(fresh.read_text())["previous_deployment"]["migration_version"] == 49
    assert read_state(fresh).previous.migration_version == 49  # type: ignore[union-attr]
    served = after_deploy(after_deploy(DeploymentState("production"), dep(1)),
                          dep(2, Slot.GREEN, migration_version=47))
    left = after_rollback(served, served_schema=48)
    assert left.previous is not None and left.previous.migration_version == 47


@pytest.mark.parametrize("fixture", ["documented.json", "deploy_script.json", "go_cli.json"])
def test_a_deploy_records_the_schema_the_deployment_it_replaces_served_on(
        tmp_path: Path, fixture: str) -> None:
    """Found by review: a deploy left the deployment it replaced without the schema it served
    on when the tool that deployed it recorded none, so a rollback back to it went
    unchecked. `after_deploy` records it (`served_schema`) in every dialect, only when the
    record names none; `recording.deployed` passes the run's read (`from_schema`) only onto
    the record the plan saw serve (`from_id`), never onto another the file calls current."""
    from runbook import intent as intents
    from runbook import recording

    path = copy_fixture(fixture, tmp_path)
    s = read_state(path)
    assert s.current is not None and s.current.migration_version is None  # the premise
    other = Slot.GREEN if s.current.active_slot is Slot.BLUE else Slot.BLUE
    write_state(path, after_deploy(s, dep(9, other), served_schema=49))
    assert json.loads(path.read_text())["previous_deployment"]["migration_version"] == 49
    again = read_state(path)
    assert again.previous is not None and again.previous.id == s.current.id
    assert again.previous.migration_version == 49
    # a schema recorded already is the one its deploy ran with: kept
    known = after_deploy(DeploymentState("production"), dep(1, migration_version=47))
    kept = after_deploy(known, dep(2, Slot.GREEN), served_schema=48)
    assert kept.previous is not None and kept.previous.migration_version == 47

    def run(**record: Any) -> intents.Intent:
        return intents.Intent(run_id="dep_9", action="deploy", environment="production",
                              from_slot="blue", to_slot="green", from_version=None,
                              to_version=dep(9).version, record={"deployment_id": "dep_0009",
                                                                 **record})

    served = after_deploy(DeploymentState("production"), dep(1))
    new = dep(9, Slot.GREEN)
    onto = recording.deployed(served, new, run(from_id="dep_0001", from_schema=48))
    assert onto.previous is not None and onto.previous.migration_version == 48
    assert recording.schema_line(served, onto, run(from_id="dep_0001", from_schema=48)) \
        == {"previous schema": f"48, recorded for {dep(1).version}: the database schema it "
                               "served on, as this deploy read it before its migrations"}
    # the file's current is another since the plan (another tool rewrote it): nothing
    # recorded, nothing said
    elsewhere = recording.deployed(served, new, run(from_id="dep_0005", from_schema=48))
    assert elsewhere.previous is not None and elsewhere.previous.migration_version is None
    assert recording.schema_line(served, elsewhere,
                                 run(from_id="dep_0005", from_schema=48)) == {}
    # no read (a dirty schema, another run's interrupted record): none
    unread = recording.deployed(served, new, run(from_id="dep_0001"))
    assert unread.previous is not None and unread.previous.migration_version is None


def test_the_deployment_that_replaced_a_target_rolled_back_to_is_the_one_after_it_went_live(
        tmp_path: Path) -> None:
    """A, B, a rollback to A (recorded with when it went live again), C, D: rolling back
    from D --to A, the deployment that replaced A is C, whose pre-deploy snapshot holds A's
    schema; the earliest deployed after A's first deployment is B (days older, B's schema)."""
    from runbook import migration_source
    from tests.drill_checks import host_env

    env = host_env(tmp_path)
    a, b, c, d = dep(1), dep(2, Slot.GREEN), dep(4, Slot.GREEN), dep(5)
    state = after_deploy(after_deploy(DeploymentState("production"), a), b)
    state = after_rollback(state, live_since=a.deployed_at + timedelta(hours=2))
    state = after_deploy(after_deploy(state, c), d)
    env.state_file.parent.mkdir(parents=True)
    write_state(env.state_file, state)
    back = read_state(env.state_file).find_id(a.id)
    assert back is not None and back.live_since == a.deployed_at + timedelta(hours=2)
    assert migration_source.successor(env, back, d).id == c.id


def test_a_write_over_another_tools_change_made_since_the_read_is_refused(
        tmp_path: Path) -> None:
    """Found by review: between our read and our write (a health probe sits there when a run
    records itself) the Go CLI takes its lock in the state file; our write put the old file
    back with our change, and its lock was gone: both tools then believed they held the lock.
    Now nothing is written over the change, and the error says to run again."""
    path = copy_fixture("go_cli.json", tmp_path)
    ours = read_state(path)
    theirs = load("go_cli_locked.json")  # the Go CLI took its lock meanwhile
    path.write_text(json.dumps(theirs, indent=2))
    written_by_them = path.read_bytes()
    with pytest.raises(statemod.StateChangedError) as err:
        write_state(path, with_lock(ours, {"locked": True, "locked_by": "runbook@host"}))
    assert "another tool changed the state file" in err.value.message
    assert "run the command again" in str(err.value.fix)
    assert path.read_bytes() == written_by_them  # their lock stands
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    write_state(path, read_state(path))  # read again: the write goes through


def test_a_first_write_never_replaces_a_file_another_tool_created_since_the_read(
        tmp_path: Path) -> None:
    """Found by review: on a host with no state file yet our recorder read "no file", then
    probed health and read the schema; the Go CLI created the file with its lock meanwhile,
    and our rename replaced it whole: its lock and its record gone, no error. A state read
    where no file was now only creates the file; one that appeared since is left as it is."""
    import shutil

    from runbook import recording
    from tests.drill_checks import host_env

    env = host_env(tmp_path)
    env.state_file.parent.mkdir(parents=True)
    ours = recording.load_or_empty(env)  # a first-ever deploy: nothing recorded yet
    shutil.copy(DATA / "go_cli_locked.json", env.state_file)  # the Go CLI's, since
    theirs = env.state_file.read_bytes()
    with pytest.raises(statemod.StateChangedError) as err:
        write_state(env.state_file, after_deploy(ours, dep(1)))
    assert "created the state file" in err.value.message, err.value.message
    assert "run the command again" in str(err.value.fix)
    assert env.state_file.read_bytes() == theirs  # its lock and record stand
    assert [p.name for p in env.state_file.parent.iterdir()] == [env.state_file.name]
    write_state(env.state_file, after_deploy(recording.load_or_empty(env), dep(1)))  # rerun
    after = json.loads(env.state_file.read_text())
    assert after["lock"] == load("go_cli_locked.json")["lock"]
    assert after["current_deployment"]["version"] == dep(1).version


def test_a_first_write_never_replaces_a_file_created_at_its_last_moment(tmp_path: Path) -> None:
    """The same race in the write's last microseconds (between the fsynced temp file and its
    move into place: the drill's fault point): a check then a rename would still replace the
    new file, so the file is created by a call that fails when the name exists."""
    import shutil

    from runbook import recording
    from tests.drill_checks import host_env

    env = host_env(tmp_path)
    env.state_file.parent.mkdir(parents=True)
    ours = after_deploy(recording.load_or_empty(env), dep(1))
    with pytest.raises(statemod.StateChangedError):
        write_state(env.state_file, ours, before_rename=lambda: shutil.copy(
            DATA / "go_cli_locked.json", env.state_file))
    assert env.state_file.read_bytes() == (DATA / "go_cli_locked.json").read_bytes()
    assert [p.name for p in env.state_file.parent.iterdir()] == [env.state_file.name]


def test_a_first_write_creates_the_file_with_mode_0600(tmp_path: Path) -> None:
    """Nothing there and nothing appearing: the file is created, whole, 0600 (as before)."""
    from runbook import recording
    from tests.drill_checks import host_env

    env = host_env(tmp_path)
    env.state_file.parent.mkdir(parents=True)
    assert write_state(env.state_file, after_deploy(recording.load_or_empty(env), dep(1))) \
        is None
    assert read_state(env.state_file).current == dep(1)
    assert stat.S_IMODE(env.state_file.stat().st_mode) == 0o600
    assert [p.name for p in env.state_file.parent.iterdir()] == [env.state_file.name]


def test_a_switch_recorded_over_a_file_with_no_current_deployment_is_written(
        tmp_path: Path) -> None:
    """`current_deployment: null` with a previous deployment recorded is a valid file; a
    switch to the previous deployment's version wrote it as a rollback "from" nothing, which
    raised after traffic had moved: exit 6 on every rerun, the host stuck until a hand edit."""
    from runbook import intent as intents
    from runbook import recording, slots
    from runbook.plan import Step, StepContext
    from tests.drill_checks import host_env

    env = host_env(tmp_path)
    data = json.loads((DATA / "documented.json").read_text())
    data["current_deployment"] = None
    env.state_file.parent.mkdir(parents=True, exist_ok=True)
    env.state_file.write_text(json.dumps(data, indent=2) + "\n")
    previous = data["previous_deployment"]
    intent = intents.Intent("switch-1", "switch", env.name, "blue", "green", None,
                            previous["version"])
    ctx = StepContext(Step("state", "Record the switch"), env=env)
    recording.switch(env, intent, slots.Observed(health_status="healthy"), "switch-1", ctx)
    after = json.loads(env.state_file.read_text())
    assert after["current_deployment"]["version"] == previous["version"]
    assert after["current_deployment"]["active_slot"] == "green"
    assert after["current_deployment"]["git_commit"] == previous["git_commit"]
    assert after["lock"] == data["lock"]


# --- histories written oldest first, ids written as null (found by review) -----------------


def _record(n: int, at: str, **keys: Any) -> dict[str, Any]:
    """A documented record of deployment `n` deployed at `at`."""
    return {"id": f"dep_{n:04d}", "version": sha(n)[:7], "git_commit": sha(n), "deployed_at": at,
            "deployed_by": "ci@build-runner", "active_slot": "blue" if n % 2 else "green",
            "health_status": "healthy", "status": "superseded", **keys}


def _redeployed_doc(oldest_first: bool) -> dict[str, Any]:
    """v3 current; v2's commit deployed twice (an older record at schema 1 under another id,
    and the real one at schema 2); no previous_deployment names it."""
    v1 = _record(1, "2025-12-01T08:00:00Z", migration_version=1)
    v2_old = {**_record(2, "2026-01-01T08:00:00Z", migration_version=1), "id": "dep_old_0002"}
    v2 = _record(2, "2026-02-01T08:00:00Z", migration_version=2)
    v3 = {**_record(3, "2026-03-01T08:00:00Z", migration_version=2), "status": "active"}
    history = [v1, v2_old, v2]
    return {"environment": "production", "current_deployment": v3,
            "previous_deployment": None,
            "deployment_history": history if oldest_first else history[::-1],
            "lock": {"locked": False}}


@pytest.mark.parametrize("oldest_first", [True, False])
def test_a_version_deployed_twice_is_found_as_its_newest_record_whatever_the_files_order(
        oldest_first: bool) -> None:
    """Found by review: with the history written oldest first, `rollback --to` took the
    oldest record of a redeployed commit, and the schema guard judged the wrong schema."""
    s = parse_state(json.dumps(_redeployed_doc(oldest_first), indent=2))
    found = s.find_version(sha(2)[:7])
    assert found is not None and found.id == "dep_0002" and found.migration_version == 2
    assert s.find_version("dep_old_0002") is not None  # still named by its own id


def test_a_record_added_to_an_oldest_first_history_is_appended_and_nothing_else_moves(
        tmp_path: Path) -> None:
    """The file's own order is kept: a deploy appends to a history written oldest first
    (it prepended, leaving the file in no order at all), every entry another tool wrote
    stays as written, and a write that changes nothing is byte-identical."""
    doc = _redeployed_doc(oldest_first=True)
    doc["deployment_history"][0]["pipeline_run"] = 9001  # a key only the other tool knows
    path = tmp_path / "deployment-state.json"
    path.write_text(json.dumps(doc, indent=2))
    raw = path.read_bytes()
    write_state(path, read_state(path))
    assert path.read_bytes() == raw
    write_state(path, after_deploy(read_state(path), dep(4, Slot.GREEN)))
    history = json.loads(path.read_text())["deployment_history"]
    assert [h["id"] for h in history] == ["dep_0001", "dep_old_0002", "dep_0002", "dep_0003"]
    assert history[:3] == doc["deployment_history"]
    assert history[3]["status"] == "superseded"
    again = read_state(path)
    assert again.history[0].id == "dep_0003"  # newest first in the model, as documented
    found = again.find_version(sha(2)[:7])
    assert found is not None and found.id == "dep_0002"


def test_a_newest_first_history_whose_older_entry_served_again_is_not_read_as_oldest_first(
        tmp_path: Path) -> None:
    """Found by review: the order was judged by when each record went live alone, so in a
    two-entry newest-first history whose older deployment a rollback made serve again later
    (live_since), the one pair read as rising: the file was taken for oldest first and the
    next entry appended at its end. A pair counts only where both times agree."""
    newer = _record(3, "2026-03-01T08:00:00Z")
    older = _record(2, "2026-02-01T08:00:00Z", live_since="2026-03-05T08:00:00Z")
    doc = {"environment": "production",
           "current_deployment": {**_record(4, "2026-04-01T08:00:00Z"), "status": "active"},
           "previous_deployment": None, "deployment_history": [newer, older],
           "lock": {"locked": False}}
    path = tmp_path / "deployment-state.json"
    path.write_text(json.dumps(doc, indent=2))
    s = read_state(path)
    assert [h.id for h in s.history] == ["dep_0003", "dep_0002"]  # as written: newest first
    write_state(path, after_deploy(s, dep(5, Slot.GREEN)))
    history = json.loads(path.read_text())["deployment_history"]
    assert [h["id"] for h in history] == ["dep_0004", "dep_0003", "dep_0002"]


def test_a_previous_deployment_with_a_null_id_becomes_current_under_its_real_id(
        tmp_path: Path) -> None:
    """Found by review: `"id": null` counted as an id: the rollback wrote the current
    deployment with `"id": null`, and the deployment was recorded twice, once under the id
    derived for it and once under the real id its history entry holds."""
    doc = _redeployed_doc(oldest_first=False)
    doc["deployment_history"] = [_record(2, "2026-02-01T08:00:00Z", migration_version=2)]
    doc["previous_deployment"] = {**doc["deployment_history"][0], "id": None,
                                  "deployed_by": None}
    path = tmp_path / "deployment-state.json"
    path.write_text(json.dumps(doc, indent=2))
    write_state(path, after_rollback(read_state(path), run_id="rbk_1"))
    written = json.loads(path.read_text())
    assert written["current_deployment"]["id"] == "dep_0002", written["current_deployment"]
    assert written["current_deployment"]["deployed_by"] is not None
    assert [h["id"] for h in written["deployment_history"]] == ["dep_0003"]
    write_state(path, after_deploy(read_state(path), dep(4, Slot.GREEN)))
    history = json.loads(path.read_text())["deployment_history"]
    assert [h["version"] for h in history].count(sha(2)[:7]) == 1, history


def test_a_rollback_keeps_the_history_entrys_own_keys_of_the_deployment_it_makes_current(
        tmp_path: Path) -> None:
    """Found by review: the previous deployment's copy replaced the history entry of the same
    deployment, and the keys only that entry held were lost; the previous one's win."""
    doc = _redeployed_doc(oldest_first=False)
    entry = {**_record(2, "2026-02-01T08:00:00Z"), "snapshot_path": "/var/snap.sql.gz",
             "pipeline_run": 9002, "note": "history's"}
    doc["deployment_history"] = [entry]
    doc["previous_deployment"] = {**_record(2, "2026-02-01T08:00:00Z"), "note": "previous's"}
    path = tmp_path / "deployment-state.json"
    path.write_text(json.dumps(doc, indent=2))
    write_state(path, after_rollback(read_state(path), run_id="rbk_1"))
    current = json.loads(path.read_text())["current_deployment"]
    assert current["id"] == "dep_0002"
    assert current["snapshot_path"] == "/var/snap.sql.gz" and current["pipeline_run"] == 9002
    assert current["note"] == "previous's" and current["rollback_id"] == "rbk_1"


# --- a history entry another tool wrote badly -----------------------------------------------
#
# The oracle is the document written here: where each entry sits and what it holds. An entry
# the reader cannot read that is provably older than the rollback target (it is not current
# nor previous, and it sits past the target's own entry in a history whose order the times
# show) is passed by with a warning, and every rewrite keeps it, the same JSON value, in its
# place; one that may be the target or newer than it is refused as before.

_MALFORMED: dict[str, tuple[Any, str]] = {  # (what the other tool wrote, what is wrong)
    "bad version": ({"version": "v0.9.0"}, "version: 'v0.9.0' is not a 7-hex short commit"),
    "bad commit": ({"git_commit": "abc"}, "git_commit: 'abc' is not a 40-hex commit"),
    "unknown status": ({"status": "done"}, "status: 'done' is not a deployment status"),
    "bad slot": ({"active_slot": "purple"}, "active_slot: 'purple' is not a slot"),
    "no version": ({"version": None}, "version: required key is missing"),
    "not an object": (["v0.9.0", 3, {"x": True}], "expected an object, got"),
    "null": (None, "expected an object, got null"),
}


def _malformed(kind: str, like: dict[str, Any]) -> Any:
    """The bad entry: `like` (an older entry) changed as the other tool got it wrong, dated
    before it; or a value that is no object at all."""
    change, _ = _MALFORMED[kind]
    if not isinstance(change, dict):
        return copy.deepcopy(change)
    out = {**like, "deployed_at": "2026-01-02T03:04:05Z", "x_tool": {"n": 1.5, "ok": False}}
    if "id" in out:
        out["id"] = "dep_bad_one"
    for key, value in change.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _three_dialects() -> dict[str, dict[str, Any]]:
    """A file of each dialect whose history is [previous's entry, an older one], newest first."""
    documented = load("documented.json")
    documented["deployment_history"].insert(0, copy.deepcopy(documented["previous_deployment"]))
    go = load("go_cli.json")  # its history already is [previous's entry, an older one]
    go["environment"] = "production"
    script = load("deploy_script.json")
    older = {**script["previous_deployment"], "id": "dep_188e0000000000a0_aa11bb22cc33dd44ee55ff00",
             "version": "1d2e3f4", "git_commit": "1d2e3f4" + "0" * 33,
             "deployed_at": "2026-01-20T09:00:00Z", "status": "superseded"}
    script["deployment_history"] = [copy.deepcopy(script["previous_deployment"]), older]
    script["environment"] = "production"
    return {"documented": documented, "go-cli": go, "deploy-script": script}


@pytest.mark.parametrize("oldest_first", [False, True], ids=["newest first", "oldest first"])
@pytest.mark.parametrize("kind", list(_MALFORMED))
@pytest.mark.parametrize("dialect", ["documented", "go-cli", "deploy-script"])
def test_a_malformed_entry_older_than_the_target_is_passed_by_and_kept_in_its_place(
        dialect: str, kind: str, oldest_first: bool, tmp_path: Path) -> None:
    """Found open: one entry another tool wrote badly anywhere in deployment_history refused
    every rollback, status said the state file could not be read. One older than the target
    is passed by, named (index, what is wrong, the fix), and every rewrite keeps it."""
    doc = _three_dialects()[dialect]
    history = doc["deployment_history"]
    bad = _malformed(kind, history[-1])
    history.append(bad)
    if oldest_first:
        history.reverse()
    where = 0 if oldest_first else 2
    path = tmp_path / "deployment-state.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    state = read_state(path, environment="production")
    assert state.previous is not None and state.previous.version == \
        doc["previous_deployment"]["version"]
    [warning] = state.passed_by(state.previous)
    assert f"deployment_history[{where}]" in warning and _MALFORMED[kind][1] in warning, warning
    assert "fix: " in warning and "\n" not in warning, warning
    # a downgrade mid-incident: the version before this one refuses the file (review)
    assert "before 0.2.0 refuses this file: finish an interrupted run with this version" \
        in warning, warning
    write_state(path, after_rollback(state, run_id="rbk_1"))
    written = json.loads(path.read_text())
    assert written["current_deployment"]["version"] == doc["previous_deployment"]["version"]
    after = written["deployment_history"]
    newest_first = after[::-1] if oldest_first else after
    found = [i for i, entry in enumerate(newest_first) if _json_same(entry, bad)]
    assert found == [len(after) - 1], after  # kept once, the same JSON value, still the oldest
    older = history[1]  # the entry the other tool wrote it next to: it stays beside it
    assert newest_first[-2]["version"] == older["version"], after
    again = read_state(path, environment="production")  # and passed by again
    assert again.previous is not None and len(again.passed_by(again.previous)) == 1


def test_a_malformed_entry_survives_a_deploy_and_a_lock_byte_for_byte(tmp_path: Path) -> None:
    """A rewrite that does not touch the history (the lock mirror) leaves the file's bytes; a
    deploy puts a new entry in front and the other tool's entry stays as written."""
    doc = _three_dialects()["go-cli"]
    bad = _malformed("unknown status", doc["deployment_history"][-1])
    doc["deployment_history"].append(bad)
    path = tmp_path / "deployment-state.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    write_state(path, with_lock(read_state(path), {"locked": False}))
    assert json.loads(path.read_bytes()) == doc
    write_state(path, after_deploy(read_state(path), dep(9, Slot.GREEN)))
    after = json.loads(path.read_text())["deployment_history"]
    assert _json_same(after[-1], bad) and after[-2]["version"] == doc["deployment_history"][1][
        "version"], after


@pytest.mark.parametrize("case", [
    "before the target's entry", "order not shown", "its own time newer", "previous itself",
    "current itself"])
def test_a_malformed_entry_that_may_be_the_target_or_newer_is_still_refused(
        case: str, tmp_path: Path) -> None:
    """Where the bad entry may be the rollback target, or newer than it, nothing is passed by:
    the one-line problem and fix, exit 4, nothing written."""
    doc = _three_dialects()["documented"]
    history = doc["deployment_history"]
    where = "deployment_history[0]"
    if case == "before the target's entry":
        history.insert(0, _malformed("bad commit", history[0]))
    elif case == "order not shown":  # one readable entry: which end is newest is not shown
        doc["deployment_history"] = [history[0], None]
        where = "deployment_history[1]"
    elif case == "its own time newer":
        doc["deployment_history"] = [history[0], {**_malformed("bad slot", history[1]),
                                                  "deployed_at": "2026-01-27T20:00:00Z"}]
        where = "deployment_history[1]"
    elif case == "previous itself":
        doc["previous_deployment"]["status"] = "done"
        where = "previous_deployment.status"
    else:
        doc["current_deployment"]["git_commit"] = "abc"
        where = "current_deployment.git_commit"
    path = tmp_path / "deployment-state.json"
    path.write_text(json.dumps(doc, indent=2))
    before = path.read_bytes()
    with pytest.raises(StateError) as refused:
        read_state(path, environment="production")
    assert refused.value.exit_code == ExitCode.PRECONDITION
    assert f"{path}: {where}" in refused.value.message, refused.value.message
    assert refused.value.fix and "\n" not in str(refused.value)
    assert path.read_bytes() == before


def test_a_malformed_entry_newer_than_a_named_target_refuses_that_rollback(
        tmp_path: Path) -> None:
    """Between the previous deployment's entry and an older one named with `--to`: passed by
    for the previous one, refused for the older one (it may be newer than it)."""
    doc = _three_dialects()["documented"]
    history = doc["deployment_history"]
    history.insert(1, _malformed("bad version", history[1]) | {
        "deployed_at": "2026-01-26T20:00:00Z"})
    path = tmp_path / "deployment-state.json"
    path.write_text(json.dumps(doc, indent=2))
    state = read_state(path, environment="production")
    assert state.previous is not None and len(state.passed_by(state.previous)) == 1
    older = state.find_version(history[2]["version"])
    assert older is not None
    with pytest.raises(StateError) as refused:
        state.passed_by(older)
    assert refused.value.exit_code == ExitCode.PRECONDITION
    assert "deployment_history[1].version: 'v0.9.0'" in refused.value.message
    assert older.version in refused.value.message and refused.value.fix
    with pytest.raises(StateError, match=r"deployment_history\[1\]"):
        state.passed_by(None)  # a version no readable entry holds: it may be that one


# --- found by review of the malformed-history change ------------------------------------------

def _go(n: int, version: str, slot: str) -> dict[str, Any]:
    return {"version": version, "git_commit": version + "0" * 33,
            "deployed_at": f"2026-01-{n:02d}T10:00:00Z", "deployed_by": "ops", "slot": slot,
            "health_status": "healthy", "status": "active",
            "docker_image": f"togather-server:{version}"}


def test_a_rollback_whose_write_would_leave_the_file_unreadable_is_refused_while_planning(
        tmp_path: Path) -> None:
    """The Go CLI's layout (oldest first, the current listed too) with a bad entry whose own
    time cannot be read: it is passed by only because it sits behind the target's own entry,
    which the rollback's write removes (the target becomes current). The file the rollback
    wrote was then refused by the next read, `runbook status` included. The plan now refuses
    first, exit 4, naming the entry; the file itself (the oracle: read it back after the
    simulated write, as the next run would) is what proves the refusal right."""
    from runbook import rollback

    b, c = _go(2, "bbbbbbb", "green"), _go(3, "ccccccc", "blue")
    x = {**_go(1, "aaaaaaa", "blue"), "deployed_at": "2026-01-01 10:00:00"}  # not RFC 3339
    doc = {"environment": "production", "current_deployment": c, "previous_deployment": b,
           "deployment_history": [x, b, c], "lock": {"locked": False}}
    path = tmp_path / "deployment-state.json"
    path.write_text(json.dumps(doc, indent=2))
    state = statemod.read_state(path, environment="production")
    assert state.previous is not None and len(state.passed_by(state.previous)) == 1
    # the premise: written as the rollback writes it, the next read refuses the file
    written = tmp_path / "written.json"
    written.write_bytes(statemod.dumps(statemod.after_rollback(state, state.previous)))
    with pytest.raises(StateError):
        statemod.read_state(written, environment="production")
    with pytest.raises(PreconditionError) as err:
        rollback.readable_after(state, state.previous, slot=Slot.GREEN)
    assert err.value.exit_code == ExitCode.PRECONDITION
    assert "would not be readable" in err.value.message and "deployed_at" in err.value.message
    assert "nothing was changed" in err.value.message


def test_a_readable_write_after_passing_a_bad_entry_is_let_through() -> None:
    """The same bad entry among enough readable ones: the file stays readable after the
    rollback, which goes ahead (the plan's check refuses nothing)."""
    from runbook import rollback

    a, b, c = _go(1, "aaaaaaa", "blue"), _go(2, "bbbbbbb", "green"), _go(4, "ccccccc", "blue")
    x = {**_go(1, "v0.9.0", "blue")}  # a bad version, its own time readable and older
    doc = {"environment": "production", "current_deployment": c, "previous_deployment": b,
           "deployment_history": [x, a, b, c], "lock": {"locked": False}}
    state = statemod.parse_state(json.dumps(doc))
    assert state.previous is not None and len(state.passed_by(state.previous)) == 1
    rollback.readable_after(state, state.previous, slot=Slot.GREEN)  # raises nothing


@pytest.mark.parametrize("order", ["newest-first-appended", "oldest-first-prepended"])
def test_a_bad_entry_whose_own_times_say_newer_is_refused_whatever_its_place(order: str) -> None:
    """Another tool appended (or, oldest first, prepended) an entry whose own deployed_at is
    newer than the current deployment: its place said "older" and the rollback passed it by
    (found by review). Its own readable times win over its place."""
    def d(n: int, v: str, slot: str = "blue", status: str = "superseded") -> dict[str, Any]:
        return {"id": f"dep_{n:04d}", "version": v, "git_commit": v[0] * 40,
                "deployed_at": f"2026-01-{n:02d}T10:00:00Z", "deployed_by": "ops",
                "active_slot": slot, "health_status": "healthy", "status": status}
    a, b, c = d(1, "aaaaaaa"), d(2, "bbbbbbb", "green"), d(3, "ccccccc", status="active")
    x = d(9, "v9.9.9")  # a bad version, deployed on Jan 9: newer than everything
    history = [c, b, a, x] if order == "newest-first-appended" else [x, a, b, c]
    with pytest.raises(StateError) as err:  # refused as any bad record may be: as before
        statemod.parse_state(json.dumps({
            "environment": "production", "current_deployment": c, "previous_deployment": b,
            "deployment_history": history, "lock": {"locked": False}}))
    assert "v9.9.9" in str(err.value), err.value


def test_a_to_typo_beside_a_badly_written_entry_is_a_usage_error_naming_both(
        tmp_path: Path) -> None:
    """`--to` a version no readable entry holds, with an entry another tool wrote badly in
    the history: refused as before, but as the typo it most likely is (exit 2, the known
    versions), with the bad entry named as what it may be; its refusal alone (exit 4) hid the
    typo (found by review)."""
    from runbook import environment, rollback
    from runbook.errors import UsageError

    a, b, c = _go(1, "aaaaaaa", "blue"), _go(2, "bbbbbbb", "green"), _go(4, "ccccccc", "blue")
    x = {**_go(1, "v0.9.0", "blue")}
    state = statemod.parse_state(json.dumps({
        "environment": "production", "current_deployment": c, "previous_deployment": b,
        "deployment_history": [x, a, b, c], "lock": {"locked": False}}))
    env = environment.from_mapping({
        "name": "production",
        "slots": {"blue": {"container": "blue", "service": "b", "port": 18081},
                  "green": {"container": "green", "service": "g", "port": 18082}},
    }, tmp_path / "production.toml")
    with pytest.raises(UsageError) as err:
        rollback.named_target(env, state, "aaaaaab")
    assert err.value.exit_code == ExitCode.USAGE
    message = err.value.message
    assert "--to aaaaaab is not in the deployment history (known:" in message, message
    assert "aaaaaaa" in message and "'v0.9.0'" in message and "may be the one meant" in message
    assert err.value.fix is not None and "mend it first" in err.value.fix, err.value.fix
    # two such entries: both are named, either may be the one meant (only the first was)
    y = {**_go(1, "v0.8.0", "blue")}
    state = statemod.parse_state(json.dumps({
        "environment": "production", "current_deployment": c, "previous_deployment": b,
        "deployment_history": [y, x, a, b, c], "lock": {"locked": False}}))
    with pytest.raises(UsageError) as err:
        rollback.named_target(env, state, "aaaaaab")
    message = err.value.message
    assert "'v0.9.0'" in message and "'v0.8.0'" in message, message
    assert "those entries" in message and "\n" not in message, message
    assert err.value.fix is not None and "mend it first" in err.value.fix, err.value.fix


def test_the_write_check_simulates_the_commits_own_write_and_never_refuses_a_fine_one() -> None:
    """Found by review of the check itself: it simulated the write without the slot and
    without what serves, so a Go CLI previous deployment with `"slot": ""` (its own rollback
    writes it so) was refused ("does not record its slot", fix: "pass the slot") and a
    swapped file's `--to <the file's current>` was refused ("already current"), though
    their files would have read fine. It now simulates with the slot the target will run in
    and what serves, and a simulation it cannot make refuses nothing."""
    from runbook import rollback

    a, c = _go(1, "aaaaaaa", "blue"), _go(4, "ccccccc", "blue")
    b = {**_go(2, "bbbbbbb", "green"), "slot": ""}  # the Go CLI's previous, slot unwritten
    x = {**_go(1, "v0.9.0", "blue")}
    state = statemod.parse_state(json.dumps({
        "environment": "production", "current_deployment": c, "previous_deployment": b,
        "deployment_history": [x, a, b, c], "lock": {"locked": False}}))
    assert state.previous is not None and len(state.passed_by(state.previous)) == 1
    rollback.readable_after(state, state.previous, slot=Slot.GREEN)  # raises nothing
    rollback.readable_after(state, state.previous)  # no slot: not simulated, nothing refused
    # the old tooling's swap: the file's current is what the rollback goes to, the previous
    # one serves
    assert state.current is not None
    rollback.readable_after(state, state.current, served=state.previous, slot=Slot.GREEN)


@pytest.mark.parametrize(("then", "refused"), [
    ('"blue"', False),  # the same value twice: one thing, whichever tool reads
    ('"green"', True),  # two values: refused
])
def test_a_key_written_twice_with_one_value_is_read_as_written(
        then: str, refused: bool, tmp_path: Path) -> None:
    """Only a key whose two values differ is ambiguous: a tool that wrote one value twice
    said one thing, and refusing it would stop a 3 a.m. rollback for nothing (the rewrite
    that keeps one of two equal values loses nothing)."""
    text = (DATA / "documented.json").read_text()
    assert text.count('"active_slot": "blue",') == 1  # current_deployment's
    target = tmp_path / "deployment-state.json"
    target.write_text(text.replace('"active_slot": "blue",',
                                   f'"active_slot": "blue", "active_slot": {then},'))
    if refused:
        with pytest.raises(StateError) as info:
            read_state(target)
        assert "current_deployment.active_slot is written twice" in info.value.message
    else:
        state = read_state(target)
        assert state.current is not None and state.current.active_slot is Slot.BLUE
        assert state.previous is not None and state.previous.active_slot is Slot.GREEN


def test_true_and_one_are_two_values() -> None:
    """`true` and `1` are equal in Python but two values to jq and to a shell's grep."""
    with pytest.raises(strict_json.DuplicateKeyError):
        strict_json.loads('{"locked": true, "locked": 1}')
    assert strict_json.loads('{"locked": true, "locked": true}') == {"locked": True}
