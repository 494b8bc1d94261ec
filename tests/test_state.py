"""deployment-state.json: three dialects in, the documented one out, nothing lost, never torn."""

from __future__ import annotations

import copy
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runbook import state as statemod
from runbook.environment import Slot
from runbook.errors import ExitCode, StateError
from runbook.state import (
    HISTORY_LIMIT,
    Deployment,
    DeploymentState,
    after_deploy,
    after_rollback,
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


def test_go_cli_lock_keys_are_renamed() -> None:
    s = read_state(DATA / "go_cli_locked.json")
    assert s.locked
    assert s.lock["lock_expires_at"] == "2026-02-11T08:30:00.123456789Z"
    assert "expires_at" not in s.lock and s.lock["reason"] == "deploy e4d2c1b"


# --- writing: documented dialect, nothing lost ------------------------------------------------


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
    assert written["environment"] == "production"
    assert written["current_deployment"]["environment"] == "production"
    assert written["lock"] == original["lock"]
    flat = _walk(written)
    for key, value in _walk(original).items():
        if key != "/environment":
            assert flat[key] == value, key


def test_go_cli_file_is_rewritten_in_documented_dialect(tmp_path: Path) -> None:
    path = copy_fixture("go_cli.json", tmp_path)
    write_state(path, read_state(path))
    written = json.loads(path.read_text())
    cur = written["current_deployment"]
    assert "slot" not in cur and cur["active_slot"] == "blue"
    assert cur["docker_image"] == "togather-server:e4d2c1b"
    assert cur["rollback"] is True and cur["rollback_id"] == "rb-1739215327"
    assert cur["id"].startswith("dep_") and cur["health_status"] == "unknown"
    assert cur["deployed_at"] == "2026-02-10T19:22:07.482913Z"
    assert written["previous_deployment"]["snapshot_path"].endswith(".sql.gz")
    assert written["lock"] == {"locked": False}
    assert [h["version"] for h in written["deployment_history"]] == ["9a8b7c6", "e4d2c1b"]


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


def test_write_is_mode_0600_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = copy_fixture("documented.json", tmp_path)
    path.chmod(0o644)
    old_umask = os.umask(0o022)
    try:
        write_state(path, read_state(path))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployment-state.json"]


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
    (("deployment_history", 0, "git_commit"), None, "deployment_history[0].git_commit: required"),
    (("lock",), "yes", "lock: expected an object"),
    (("lock", "locked"), _DELETE, "lock.locked: required key is missing"),
    (("lock", "locked"), "false", "lock.locked: expected true or false"),
    (("lock", "pid"), "123", "lock.pid: expected an integer"),
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


def test_history_is_newest_first_unique_and_bounded() -> None:
    s = DeploymentState(environment="production")
    for n in range(1, HISTORY_LIMIT + 20):
        s = after_deploy(s, dep(n, Slot.BLUE if n % 2 else Slot.GREEN))
    ids = [d.id for d in s.history]
    assert len(ids) == HISTORY_LIMIT == len(set(ids))
    assert ids == sorted(ids, reverse=True)
    assert s.current is not None and s.current.id not in ids
    assert s.previous is not None and ids[0] == s.previous.id


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


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_any_text_parses_or_raises_state_error(text: str) -> None:
    _parses_or_state_error(text)


@settings(max_examples=200)
@given(st.binary())
def test_any_bytes_parse_or_raise_state_error(raw: bytes) -> None:
    _parses_or_state_error(raw)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_value_parses_or_raises_state_error(value: Any) -> None:
    _parses_or_state_error(json.dumps(value))


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
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
