"""Slot health against real HTTP: a stdlib server on 127.0.0.1 serves canned /health bodies."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from runbook import health, slots
from runbook.environment import Environment, HealthConfig, Slot, from_mapping
from runbook.errors import ExitCode, PreconditionError
from runbook.health import HealthGateError
from runbook.plan import Step, StepContext
from tests.drill_checks import closed_port

COMMIT = "3f2a1b9" + "0" * 33
SLACK = 0.6  # scheduling on a busy 2-core machine


def body(status: str, checks: dict[str, dict[str, object]],
         slot: str = "blue") -> dict[str, object]:
    return {"status": status, "version": "3f2a1b9", "git_commit": COMMIT, "slot": slot,
            "checks": checks, "timestamp": "2026-11-27T11:00:00.123Z"}


PASS = {"status": "pass", "message": "database reachable", "latency_ms": 2}
MIGRATIONS_WARN = {"status": "warn", "message": "pending migrations: database at 1, build knows 2",
                   "latency_ms": 3, "details": {"version": 1, "dirty": False}}
MIGRATIONS_FAIL = {"status": "fail", "message": "database schema 3 is ahead of this build",
                   "latency_ms": 4, "details": {"version": 3, "dirty": False}}

ROUTES: dict[str, tuple[int, bytes]] = {
    "/healthy": (200, json.dumps(body("healthy", {"database": PASS})).encode()),
    "/degraded": (200, json.dumps(body("degraded", {"database": PASS,
                                                    "migrations": MIGRATIONS_WARN})).encode()),
    "/unhealthy": (503, json.dumps(body("unhealthy", {"database": PASS,
                                                      "migrations": MIGRATIONS_FAIL})).encode()),
    "/lying-503": (503, json.dumps(body("healthy", {"database": PASS})).encode()),
    "/fail-check-says-healthy": (200, json.dumps(body("healthy", {"a": MIGRATIONS_FAIL})).encode()),
    "/warn-check-says-healthy": (200, json.dumps(body("healthy", {"m": MIGRATIONS_WARN})).encode()),
    "/garbage": (200, b"<html>502 Bad Gateway</html>"),
    "/list": (200, b"[1, 2]"),
    "/no-status": (200, b'{"version": "3f2a1b9"}'),
    "/green": (200, json.dumps(body("healthy", {"database": PASS}, slot="green")).encode()),
    "/not-found": (404, b'{"error": "not found"}'),
    "/short-commit": (200, json.dumps(body("healthy", {"database": PASS}) | {
        "git_commit": "3f2a1b9"}).encode()),
    "/unknown-commit": (200, json.dumps(body("healthy", {"database": PASS}) | {
        "git_commit": "unknown"}).encode()),
    # the key written twice: a shell check (grep) reads "unhealthy", Python, jq and Go the
    # last, "healthy"
    "/status-twice": (200, b'{"status": "unhealthy", ' + json.dumps(
        body("healthy", {"database": PASS})).encode()[1:]),
    "/check-status-twice": (200, json.dumps(body("healthy", {"database": PASS})).encode().replace(
        b'"status": "pass"', b'"status": "fail", "status": "pass"')),
}


@dataclass
class Server:
    url: str
    port: int
    flip_after: int = 3  # /flip answers 503 this many times, then healthy
    hits: dict[str, int] = field(default_factory=dict)


@pytest.fixture
def server() -> Iterator[Server]:
    srv_state = Server(url="", port=0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path
            srv_state.hits[path] = srv_state.hits.get(path, 0) + 1
            if path == "/slow":
                time.sleep(1.0)
                code, data = ROUTES["/healthy"]
            elif path == "/flip":
                code, data = ROUTES["/unhealthy" if srv_state.hits[path] <= srv_state.flip_after
                                    else "/degraded"]
            elif path == "/settling":  # ok at once, the schema read only from its 3rd answer
                read = srv_state.hits[path] > 2
                code, data = 200, json.dumps(body("healthy", {"database": PASS, "migrations": {
                    "status": "pass", "details": {"version": 2 if read else 0}}})).encode()
            else:
                code, data = ROUTES.get(path, (404, b"{}"))
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Togather-Slot", "blue")  # read by verification only
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (the slow route)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    srv_state.port = int(httpd.server_address[1])
    srv_state.url = f"http://127.0.0.1:{srv_state.port}"
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield srv_state
    httpd.shutdown()
    httpd.server_close()


def make_env(blue_port: int, path: str = "/flip", timeout: float = 5.0) -> Environment:
    env = from_mapping({
        "name": "staging",
        "slots": {"blue": {"container": "togather-server-blue", "service": "togather-blue",
                           "port": blue_port},
                  "green": {"container": "togather-server-green", "service": "togather-green",
                            "port": closed_port()}},
    }, Path("/tmp/test-env.toml"))
    return env.with_(health=HealthConfig(path=path, timeout=timeout, interval=0.02,
                                         max_interval=0.1, request_timeout=0.5))


# --- probe and parse -----------------------------------------------------------------------

def test_healthy(server: Server) -> None:
    report = health.probe(server.url + "/healthy")
    assert report.ok and report.status == "healthy" and report.http_status == 200
    assert report.version == "3f2a1b9" and report.git_commit == COMMIT
    assert report.reported_slot == "blue" and report.slot == "blue"
    assert report.timestamp == "2026-11-27T11:00:00.123Z"
    (check,) = report.checks
    assert (check.name, check.status, check.message, check.latency_ms) == (
        "database", "pass", "database reachable", 2.0)
    assert report.error is None and report.latency_ms is not None and report.latency_ms >= 0


def test_degraded_counts_as_ok(server: Server) -> None:
    report = health.probe(server.url, "/degraded")
    assert report.status == "degraded" and report.ok
    assert [c.name for c in report.warning_checks] == ["migrations"]
    assert report.checks[1].details == {"version": 1, "dirty": False}
    assert report.reason() == ""


def test_unhealthy_503_with_a_failing_check(server: Server) -> None:
    report = health.probe(server.url + "/unhealthy")
    assert report.status == "unhealthy" and not report.ok and report.http_status == 503
    assert [c.name for c in report.failing_checks] == ["migrations"]
    assert "database schema 3 is ahead of this build" in report.reason()


@pytest.mark.parametrize(("path", "error"), [
    ("/lying-503", "HTTP 503"),
    ("/fail-check-says-healthy", None),
    ("/garbage", "not JSON"),
    ("/list", "not an object"),
    ("/no-status", "no status"),
    ("/not-found", "HTTP 404"),
])
def test_anything_untrustworthy_is_unhealthy(server: Server, path: str, error: str | None) -> None:
    report = health.probe(server.url + path)
    assert report.status == "unhealthy" and not report.ok
    if error:
        assert report.error is not None and error in report.error
    assert health.simple(report)  # formatting never fails on partial reports


@pytest.mark.parametrize(("path", "where", "values"), [
    ("/status-twice", "status", "'unhealthy', then 'healthy'"),
    ("/check-status-twice", "checks.database.status", "'fail', then 'pass'"),
])
def test_a_key_written_twice_is_unhealthy_naming_it(server: Server, path: str, where: str,
                                                   values: str) -> None:
    """A /health answer with one key written twice says two things: a shell check (grep)
    reads the first, Python, jq and Go the last. Read last-wins, "unhealthy" then "healthy"
    passed the gate (found by review). Never a pass; the reason names the key and both
    values; the gate fails saying it."""
    assert json.loads(ROUTES[path][1])["status"] == "healthy"  # what last-wins reads
    report = health.probe(server.url + path)
    assert report.status == "unhealthy" and not report.ok
    assert f"{where} is written twice ({values})" in report.reason(), report.reason()
    env = make_env(server.port, path=path, timeout=0.3)
    with pytest.raises(HealthGateError) as gate:
        health.wait_healthy(env, "blue")
    assert f"{where} is written twice" in gate.value.message, gate.value.message


def test_a_warn_check_makes_a_healthy_body_degraded(server: Server) -> None:
    report = health.probe(server.url + "/warn-check-says-healthy")
    assert report.status == "degraded" and report.ok and report.reported_status == "healthy"


def test_unreachable_and_timeouts_are_reported_not_raised(server: Server) -> None:
    refused = health.probe(f"http://127.0.0.1:{closed_port()}/health", timeout=1)
    assert refused.status == "unreachable" and not refused.ok
    assert refused.http_status is None and refused.error == "connection refused"

    began = time.monotonic()
    slow = health.probe(server.url + "/slow", timeout=0.2)
    assert time.monotonic() - began < 0.9
    assert slow.status == "unreachable" and slow.error == "timed out after 0.2s"

    bad = health.probe("not a url at all")
    assert bad.status == "unreachable" and bad.error


def test_probing_a_slot_checks_who_answers(server: Server) -> None:
    env = make_env(server.port, "/green")
    report = health.probe(env.slot(Slot.BLUE), "/green")
    assert report.url == f"{server.url}/green"
    assert report.slot == "blue" and report.reported_slot == "green"
    assert report.status == "unhealthy"
    assert report.error and "answered as slot green, expected blue" in report.error
    # by URL nothing is expected, so the answer names the slot
    assert health.probe(server.url + "/green").slot == "green"
    assert health.probe(server.url + "/green").ok


def test_parse_without_a_network() -> None:
    report = health.parse("http://x/health", 200, json.dumps(body("degraded", {})))
    assert report.ok and report.status == "degraded"
    report = health.parse("http://x/health", 200, json.dumps(body("sunny", {})))
    assert not report.ok and report.error == "unknown status 'sunny'"


@pytest.mark.parametrize(("checks", "status", "error"), [
    # the review's cases: a failing check the parser did not see passed as healthy
    ([{"name": "database", "status": "fail"}], "unhealthy", None),
    ({"database": {"status": "down"}}, "unhealthy", None),
    ({"database": [{"status": "fail", "componentType": "datastore"}]}, "unhealthy", None),
    ({"database": {"status": "purple"}}, "unhealthy", "not pass, warn or fail: database"),
    ("all good", "unhealthy", "checks is a str"),
    # other apps' words for the contract's pass and warn; no checks at all (fewer fields)
    ({"database": {"status": "ok"}, "cache": {"status": "UP"}}, "healthy", None),
    ([{"name": "cache", "status": "degraded"}], "degraded", None),
    (None, "healthy", None),
])
def test_every_form_of_checks_is_judged(checks: object, status: str, error: str | None) -> None:
    answer = {"status": "healthy", "version": "3f2a1b9"}
    if checks is not None:
        answer["checks"] = checks  # type: ignore[assignment]
    report = health.parse("http://x/health", 200, json.dumps(answer))
    assert report.status == status, report
    if error:
        assert report.error is not None and error in report.error
    if status == "unhealthy" and error is None:
        assert report.failing_checks and report.reason()


def test_a_body_that_would_crash_a_parser_is_unhealthy_not_an_error() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    assert health.parse("http://x/health", 200, deep).status == "unhealthy"
    huge = '{"status": "healthy", "checks": {"db": {"status": "pass", "latency_ms": 1%s}}}' % (
        "0" * 400)
    report = health.parse("http://x/health", 200, huge)
    assert report.status == "healthy" and report.checks[0].latency_ms is None


# --- wait_healthy --------------------------------------------------------------------------

def test_wait_healthy_backs_off_until_the_slot_turns_healthy(server: Server) -> None:
    server.flip_after = 4
    env = make_env(server.port)
    seen: list[tuple[int, str]] = []
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    report = health.wait_healthy(env, Slot.BLUE, on_attempt=lambda n, r: seen.append((n, r.status)),
                                 sleep=sleep, fast_window=0)
    assert report.ok and report.status == "degraded"
    assert seen == [(1, "unhealthy"), (2, "unhealthy"), (3, "unhealthy"), (4, "unhealthy"),
                    (5, "degraded")]
    assert sleeps == pytest.approx([0.02, 0.04, 0.08, 0.1])  # doubling, capped at max_interval


def test_wait_healthy_polls_fast_first_so_a_quick_slot_is_seen_at_once(server: Server) -> None:
    """The production backoff (0.25 s doubling) would see a slot ready after 4 failed probes
    at ~1.75 s; the fast first window sees it ~50 ms after it turns healthy."""
    server.flip_after = 4
    env = make_env(server.port)
    env = env.with_(health=HealthConfig(path="/flip", timeout=5.0, interval=0.25,
                                        max_interval=2.0, request_timeout=0.5))
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    began = time.monotonic()
    report = health.wait_healthy(env, Slot.BLUE, sleep=sleep)
    assert report.ok
    assert sleeps == pytest.approx([health.FAST_INTERVAL] * 4)
    assert time.monotonic() - began < 1.0


def test_wait_healthy_times_out_with_the_reason_and_the_fix(server: Server) -> None:
    server.flip_after = 10_000
    env = make_env(server.port, timeout=0.4)
    began = time.monotonic()
    with pytest.raises(HealthGateError) as err:
        health.wait_healthy(env, "blue")
    assert 0.35 < time.monotonic() - began < 2.0
    message = str(err.value)
    assert err.value.exit_code is ExitCode.FAILED_SAFELY
    for part in ("slot blue", f"{server.url}/flip", "within 0.4s", "status unhealthy",
                 "HTTP 503", "migrations: database schema 3 is ahead of this build",
                 "docker logs --tail 100 togather-server-blue"):
        assert part in message, part
    assert err.value.report is not None and err.value.attempts >= 3
    # its migrations check failed: the fix says what that means and what changes it (found
    # by review: it said only `docker logs`, after a whole gate of "schema ahead")
    fix = err.value.fix or ""
    for part in ("migrations check fails (database schema 3 is ahead of this build)",
                 "does not run on the database's schema", "--restore-snapshot",
                 "`docker logs --tail 100 togather-server-blue`"):
        assert part in fix, (part, fix)


def test_a_gate_on_a_dirty_schema_never_names_a_restore(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the fix named `--restore-snapshot` whatever the migrations check said;
    for a schema behind the build or dirty, the restore makes it worse: it names the
    migrations instead."""
    dirty = {"status": "fail", "message": "migration 3 is dirty",
             "details": {"version": 3, "dirty": True}}
    monkeypatch.setitem(ROUTES, "/dirty", (503, json.dumps(body("unhealthy", {
        "database": PASS, "migrations": dirty})).encode()))
    with pytest.raises(HealthGateError) as err:
        health.wait_healthy(make_env(server.port, path="/dirty", timeout=0.3), "blue")
    fix = err.value.fix or ""
    assert "migration 3 is dirty" in fix and "its migrations, run to their end" in fix, fix
    assert "--restore-snapshot" not in fix, fix


def test_a_gate_whose_slot_cannot_reach_the_database_says_to_check_that(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the troubleshooting drill of the guide's "infra issue; check logs and DB
    connectivity": a slot that cannot reach the database fails its migrations check too (it
    cannot read schema_migrations), and the fix sent on-call to give the build the schema it
    runs on (its migrations run, a restore). The database check comes first: check the slot's
    logs, that the database answers and the URL the slot was given; no schema repair."""
    down = {"status": "fail", "message": "database unreachable: OperationalError"}
    unread = {"status": "fail", "message": "cannot read schema_migrations: OperationalError"}
    monkeypatch.setitem(ROUTES, "/no-db", (503, json.dumps(body("unhealthy", {
        "database": down, "migrations": unread})).encode()))
    with pytest.raises(HealthGateError) as err:
        health.wait_healthy(make_env(server.port, path="/no-db", timeout=0.3), "blue")
    assert "database: database unreachable: OperationalError" in str(err.value), err.value
    fix = err.value.fix or ""
    for part in ("its database check fails (database unreachable: OperationalError)",
                 "the slot does not reach the database",
                 "`docker logs --tail 100 togather-server-blue`",
                 "`docker exec togather-db pg_isready`", "DATABASE_URL"):
        assert part in fix, (part, fix)
    for wrong in ("schema it runs on", "--restore-snapshot", "run to their end"):
        assert wrong not in fix, (wrong, fix)


def test_wait_healthy_on_an_unreachable_slot_names_it(server: Server) -> None:
    env = make_env(server.port, timeout=0.2)
    with pytest.raises(HealthGateError) as err:
        health.wait_healthy(env, Slot.GREEN)
    assert "status unreachable" in str(err.value) and "connection refused" in str(err.value)
    assert "togather-server-green" in str(err.value)


def test_wait_healthy_stops_early_when_the_container_exited(server: Server) -> None:
    server.flip_after = 10_000
    env = make_env(server.port, timeout=30)
    began = time.monotonic()
    with pytest.raises(HealthGateError) as err:
        health.wait_healthy(env, Slot.BLUE, is_running=lambda: False)
    assert time.monotonic() - began < 2
    assert err.value.attempts == 1
    assert "container togather-server-blue is not running" in str(err.value)


def test_a_fresh_answer_asked_while_planning_is_the_gates_first_attempt(server: Server) -> None:
    """A running standby's /health, asked while the planner waited on other probes, is not
    asked again by the gate right after (one request, not two, before traffic moves)."""
    env = make_env(server.port, path="/healthy")
    early = slots.EarlyHealth(env, Slot.BLUE)
    step = slots.gate_step(env, Slot.BLUE, force=False, expected_version="3f2a1b9", early=early)
    assert step.run is not None
    ctx = StepContext(step)
    step.run(ctx)
    assert server.hits == {"/healthy": 1}
    assert ctx.notes["health"] == "healthy, version 3f2a1b9"


BARE = {"status": "healthy", "checks": {"database": PASS}}  # no version, no git_commit


def _gate(server: Server, path: str) -> tuple[StepContext, str]:
    """The gate for version 3f2a1b9 on the slot whose /health is `path`: its context, and
    the refusal it raised ("" when it passed)."""
    import dataclasses

    env = make_env(server.port, path=path)
    # a whole answer's time on a loaded machine (CI beside other work): a first probe cut
    # off at 0.5 s had the gate ask Docker whether the slot's container runs, which here
    # none does, and fail "not running" (seen in a fresh-clone run under load)
    env = env.with_(health=dataclasses.replace(env.health, request_timeout=5.0))
    step = slots.gate_step(env, Slot.BLUE, force=False, expected_version="3f2a1b9")
    assert step.run is not None
    ctx = StepContext(step)
    try:
        step.run(ctx)
    except PreconditionError as exc:
        return ctx, str(exc)
    return ctx, ""


@pytest.mark.parametrize(("answer", "refused"), [
    ({"version": "1a2b3c4", "git_commit": "1a2b3c4" + "0" * 33}, True),
    ({"version": "3f2a1b9", "git_commit": COMMIT}, False),
    (None, False),  # no /version at all: left to the switch's verification
])
def test_a_health_without_a_version_is_checked_against_the_slots_own_version(
        server: Server, monkeypatch: pytest.MonkeyPatch, answer: dict[str, str] | None,
        refused: bool) -> None:
    """Found by review: an app whose /health names no version passed the gate whatever build
    it ran; a wrong one was caught only through the proxy, after users had reached it. The
    gate asks the slot's own /version (CONTRACTS) then, and refuses a wrong build before
    traffic moves."""
    monkeypatch.setitem(ROUTES, "/bare", (200, json.dumps(BARE).encode()))
    if answer is not None:
        monkeypatch.setitem(ROUTES, "/version", (200, json.dumps(answer).encode()))
    ctx, refusal = _gate(server, "/bare")
    if refused:
        assert "answers version 1a2b3c4" in refusal and "expected 3f2a1b9" in refusal, refusal
    else:
        assert refusal == ""
        assert ("from /version" if answer else "not checked here") in ctx.notes["health"]
    assert server.hits.get("/version") == 1


@pytest.mark.parametrize(("commit", "refused"), [("1a2b3c4" + "0" * 33, True), (COMMIT, False)])
def test_a_health_naming_only_its_commit_is_checked_against_it(
        server: Server, monkeypatch: pytest.MonkeyPatch, commit: str, refused: bool) -> None:
    """Found by review: a /health with a git_commit and no version compared nothing (the
    version check needs `version`, the /version fallback was asked only when both were
    missing): a wrong build passed the gate. Its commit must begin with the version (CONTRACTS:
    7 hex of the 40)."""
    answer = {"status": "healthy", "git_commit": commit, "checks": {"database": PASS}}
    monkeypatch.setitem(ROUTES, "/commit", (200, json.dumps(answer).encode()))
    ctx, refusal = _gate(server, "/commit")
    if refused:
        assert f"git_commit {commit}" in refusal and "expected version 3f2a1b9" in refusal
    else:
        assert refusal == ""
        assert ctx.notes["health"] == f"healthy, version {COMMIT} (git_commit)"


@pytest.mark.parametrize(("recorded", "said", "differ"), [
    (COMMIT, COMMIT, False),
    (COMMIT, COMMIT.upper() + "\n", False),  # case and a trailing newline do not count
    (COMMIT, "3f2a1b9", False),  # a short one: a prefix of the full one
    (COMMIT, "3f2a1b9" + "1" * 33, True),  # the same version's 7 hex, another commit
    (COMMIT, "1a2b3c4", True),
    ("0" * 40, COMMIT, None),  # git's null commit: the state file records none
    (COMMIT, "unknown", None),  # the upstream Dockerfile's default names none
    (COMMIT, None, None),  # a /health without git_commit
    (COMMIT, "3f2a1b", None),  # under 7 hex: no commit
])
def test_commits_are_compared_only_when_both_name_one(recorded: str, said: str | None,
                                                      differ: bool | None) -> None:
    assert health.commits_differ(recorded, said) is differ


def _commit_gate(server: Server, path: str) -> Step:
    """The gate for version 3f2a1b9 whose recorded commit is COMMIT, on `path`."""
    import dataclasses

    env = make_env(server.port, path=path)
    env = env.with_(health=dataclasses.replace(env.health, request_timeout=5.0))
    return slots.gate_step(env, Slot.BLUE, force=False, expected_version="3f2a1b9",
                           commit=health.ExpectedCommit(COMMIT, "the target (d1)", "rebuild"))


def test_a_gate_refuses_a_slot_naming_another_commit_than_the_recorded_one(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: a tag rebuilt from other code under the same version passed the
    gate on its version alone. The commit /health names must be the recorded one: exit 1,
    decided on the first answer (waiting never changes the build)."""
    other = "3f2a1b9" + "1" * 33
    answer = body("healthy", {"database": PASS}) | {"git_commit": other}
    monkeypatch.setitem(ROUTES, "/rebuilt", (200, json.dumps(answer).encode()))
    step = _commit_gate(server, "/rebuilt")
    assert step.run is not None
    assert "the target (d1)" in step.details["expected commit"]
    with pytest.raises(HealthGateError) as err:
        step.run(StepContext(step))
    assert err.value.exit_code == ExitCode.FAILED_SAFELY
    # the same 7 hex (its version): said whole, never as two alike commits
    assert f"blue runs commit {other} but the target (d1) recorded {COMMIT}" in \
        err.value.message, err.value.message
    assert err.value.fix is not None and err.value.fix.startswith("rebuild")
    assert server.hits == {"/rebuilt": 1}


@pytest.mark.parametrize(("path", "note"), [
    ("/healthy", "commit 3f2a1b9 as recorded"),
    ("/nocommit", "commit not checked (/nocommit names none)"),
])
def test_a_gate_passes_the_recorded_commit_and_a_slot_naming_none(
        server: Server, monkeypatch: pytest.MonkeyPatch, path: str, note: str) -> None:
    """A /health without git_commit (an app with fewer fields) is never refused for it: the
    gate's note says the commit was not checked."""
    answer = {k: v for k, v in body("healthy", {"database": PASS}).items() if k != "git_commit"}
    monkeypatch.setitem(ROUTES, "/nocommit", (200, json.dumps(answer).encode()))
    step = _commit_gate(server, path)
    assert step.run is not None
    ctx = StepContext(step)
    step.run(ctx)
    assert ctx.notes["health"] == f"healthy, version 3f2a1b9, {note}", ctx.notes


BUILD_ANSWERS = [  # (what /health and /version say of the build, is it 3f2a1b9)
    ({"version": "", "git_commit": "1a2b3c4" + "0" * 33}, False),  # a Go build without ldflags
    ({"version": "", "git_commit": COMMIT}, True),
    ({"version": "3F2A1B9", "git_commit": COMMIT.upper()}, True),
    ({"version": "3f2a1b9\n"}, True),  # read from a file into the build
    ({"version": "3f2a1b"}, False),  # a prefix of the version is another build's too
    ({"git_commit": COMMIT}, True),  # the commit alone: its first 7 hex (CONTRACTS)
    # the upstream Dockerfile's defaults (ARG VERSION=dev, ARG GIT_COMMIT=unknown): a label
    # names no commit, so the full commit decides; a hex version is another build's
    ({"version": "dev", "git_commit": COMMIT}, True),
    ({"version": "v1.4.0", "git_commit": COMMIT.upper() + "\n"}, True),
    ({"version": "dev", "git_commit": "1a2b3c4" + "0" * 33}, False),
    ({"version": "dev", "git_commit": "unknown"}, False),
    ({"version": "dev", "git_commit": "3f2a1b90"}, False),  # not a whole commit
    ({"version": "1a2b3c4", "git_commit": COMMIT}, False),
    # found by review: a label that qualifies or names another build passed on the commit
    ({"version": "3f2a1b9-dirty", "git_commit": COMMIT}, False),
    ({"version": "v1.2-3-g1a2b3c4", "git_commit": COMMIT}, False),
    ({"version": "1a2b3c", "git_commit": COMMIT}, False),
    ({"version": "sha256:" + "a" * 64, "git_commit": COMMIT}, False),
]


@pytest.mark.parametrize(("build", "matches"), BUILD_ANSWERS)
def test_the_gate_and_verification_judge_a_build_alike(
        server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        build: dict[str, str], matches: bool) -> None:
    """Found by review: an empty version skipped every check of the gate (a wrong build went
    on to take traffic until verification undid it); the gate took a commit alone that
    verification, comparing exactly, then refused on every attempt (such an app could never
    be rolled back to); both refused the right build said in upper case or with a newline."""
    import dataclasses

    from runbook import caddy
    from tests.drill_checks import host_env

    answer = {"status": "healthy", "checks": {"database": PASS}} | build
    monkeypatch.setitem(ROUTES, "/build", (200, json.dumps(answer).encode()))
    _ctx, refusal = _gate(server, "/build")
    assert (refusal == "") is matches, refusal
    if not matches:
        assert "expected" in refusal and "3f2a1b9" in refusal, refusal
    base = host_env(tmp_path)
    env = base.with_(caddy=dataclasses.replace(base.caddy, proxy_url=server.url,
                                               verify_path="/build"))
    verified = caddy.verify(env, "blue", "3f2a1b9", attempts=1)
    assert verified.ok is matches, verified


@pytest.mark.parametrize(("build", "matches"), BUILD_ANSWERS)
def test_force_skips_the_health_verdict_never_the_build(
        server: Server, monkeypatch: pytest.MonkeyPatch, build: dict[str, str],
        matches: bool) -> None:
    """Found by review: --force waited until the slot answered and checked nothing else, so
    a wrong build took users until the switch's verification undid it. The build it names
    is checked as the gate checks it (an unhealthy answer still passes: that is --force)."""
    answer = {"status": "unhealthy", "checks": {"database": MIGRATIONS_FAIL}} | build
    monkeypatch.setitem(ROUTES, "/forced", (503, json.dumps(answer).encode()))
    step = slots.gate_step(make_env(server.port, path="/forced"), Slot.BLUE, force=True,
                           expected_version="3f2a1b9")
    assert step.run is not None
    ctx = StepContext(step)
    if matches:
        step.run(ctx)
        assert ctx.notes["health"].startswith("unhealthy (not gated: --force"), ctx.notes
    else:
        with pytest.raises(PreconditionError, match="expected"):
            step.run(ctx)


@pytest.mark.parametrize(("said", "status"), [
    ("ok", "healthy"), ("Healthy", "healthy"), ("UP", "healthy"), ("warn", "degraded"),
    ("down", "unhealthy"), ("starting", "unhealthy"), ("", "unhealthy")])
def test_a_body_status_in_the_words_checks_use_is_understood(said: str, status: str) -> None:
    """Found by review: a check saying "ok" passed, but a body saying "ok" or "Healthy" was
    unhealthy, so a minimal app could never pass a gate. A word nobody uses stays unhealthy."""
    report = health.parse("http://x/health", 200, json.dumps({"status": said}).encode())
    assert report.status == status, report


@pytest.mark.parametrize(("said_slot", "check", "status"), [
    ("BLUE", "pass", "healthy"), ("blue\n", "PASS ", "healthy"), (" Blue", "Warn\n", "degraded"),
    ("blue", " FAIL", "unhealthy"), ("GREEN", "pass", "unhealthy")])
def test_a_slot_and_check_statuses_are_read_as_build_key_reads_a_version(
        said_slot: str, check: str, status: str) -> None:
    """Found by review: "BLUE" or "blue\\n" was "answered as slot BLUE, expected blue" and a
    check saying "PASS " unhealthy: case and surrounding space do not count (a version's do
    not, build_key), another slot still does."""
    body = {"status": "healthy", "slot": said_slot, "checks": {"database": {"status": check}}}
    report = health.parse("http://x/health", 200, json.dumps(body).encode(), slot="blue")
    assert report.status == status, report
    assert (report.error is not None and "expected blue" in report.error) is (
        said_slot == "GREEN"), report


def test_a_deeply_nested_body_is_an_answer_that_names_nothing(
        server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Found by review: /health's parser took a body nested past Python's recursion limit for
    unhealthy, but /version's and verification's raised RecursionError (after the reload)."""
    import dataclasses

    from runbook import caddy
    from tests.drill_checks import host_env

    monkeypatch.setitem(ROUTES, "/version", (200, b"[" * 200_000 + b"]" * 200_000))
    blue = make_env(server.port).slot(Slot.BLUE)
    assert health.version_of(blue, 2.0) is None
    base = host_env(tmp_path)
    env = base.with_(caddy=dataclasses.replace(base.caddy, proxy_url=server.url,
                                               verify_path="/version"))
    verified = caddy.verify(env, "blue", "3f2a1b9", attempts=1)
    assert not verified.ok and "not JSON" in verified.describe(), verified


def test_force_never_sends_traffic_to_a_slot_that_never_answered(server: Server) -> None:
    """Found by review: --force skips the health verdict, and its step waits "until the slot
    answers", but at the deadline it went on all the same: the switch then sent every user to
    a slot that did not answer, until verification gave up. It fails (exit 1) instead."""
    env = make_env(closed_port(), timeout=0.3)
    step = slots.gate_step(env, Slot.BLUE, force=True, expected_version="3f2a1b9")
    assert step.run is not None
    began = time.monotonic()
    with pytest.raises(HealthGateError) as err:
        step.run(StepContext(step))
    assert time.monotonic() - began < 0.3 + 2.0
    assert err.value.exit_code is ExitCode.FAILED_SAFELY
    assert "did not answer" in str(err.value) and "--force" in str(err.value), err.value


def test_a_stale_answer_from_planning_is_asked_again(server: Server,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """After a long confirmation prompt the planner's answer is old news: the gate asks."""
    monkeypatch.setattr(slots.EarlyHealth, "FRESH", 0.05)
    env = make_env(server.port, path="/healthy")
    early = slots.EarlyHealth(env, Slot.BLUE)
    time.sleep(0.3)
    step = slots.gate_step(env, Slot.BLUE, force=False, expected_version=None, early=early)
    assert step.run is not None
    step.run(StepContext(step))
    assert server.hits == {"/healthy": 2}


def test_an_early_answer_that_is_not_ok_is_only_the_first_attempt(server: Server) -> None:
    server.flip_after = 1
    env = make_env(server.port)
    first = health.probe(env.slot(Slot.BLUE), "/flip", 0.5)
    assert first.status == "unhealthy"
    seen: list[tuple[int, str]] = []
    report = health.wait_healthy(env, Slot.BLUE, first=first,
                                 on_attempt=lambda n, r: seen.append((n, r.status)))
    assert report.ok and seen == [(1, "unhealthy"), (2, "degraded")]
    assert server.hits == {"/flip": 2}


def test_the_gates_deadline_counts_the_wait_for_the_early_answer(server: Server) -> None:
    """An early probe still on its way when the gate begins is waited for within the gate's
    timeout, not on top of it."""
    env = make_env(server.port, path="/slow", timeout=0.4)
    early = slots.EarlyHealth(env, Slot.BLUE)  # /slow answers after 1 s, past the timeout
    step = slots.gate_step(env, Slot.BLUE, force=False, expected_version=None, early=early)
    assert step.run is not None
    began = time.monotonic()
    with pytest.raises(HealthGateError) as err:  # no container here: ends as "not running"
        step.run(StepContext(step))
    assert time.monotonic() - began < 0.4 + SLACK
    # the gate's own probe got only what was left of the 0.4 s (its floor, 0.05 s), not 0.4 s
    assert "timed out after 0.05s" in str(err.value)


# --- presentation --------------------------------------------------------------------------

def test_to_json_adds_where_and_the_verdict(server: Server) -> None:
    env = make_env(server.port)
    report = health.probe(env.slot(Slot.BLUE), "/lying-503")
    data = health.to_json(report)
    assert data["status"] == "unhealthy" and data["reported_status"] == "healthy"
    assert data["ok"] is False and data["http_status"] == 503 and data["slot"] == "blue"
    assert data["url"] == f"{server.url}/lying-503" and data["version"] == "3f2a1b9"
    assert data["checks"]["database"]["status"] == "pass"
    json.dumps(data)  # serialisable as is
    down = health.to_json(health.probe(env.slot(Slot.GREEN)))
    assert down["status"] == "unreachable" and down["ok"] is False and down["error"]


def test_table_and_simple_lines(server: Server) -> None:
    env = make_env(server.port)
    reports = [health.probe(env.slot(Slot.BLUE), "/degraded"), health.probe(env.slot(Slot.GREEN))]
    table = health.to_table(reports).splitlines()
    assert table[0].split() == ["SLOT", "URL", "STATUS", "VERSION", "CHECKS", "LATENCY"]
    assert table[1].split()[:4] == ["blue", f"{server.url}/degraded", "degraded", "3f2a1b9"]
    assert "database:pass migrations:warn" in table[1]
    assert table[2].split()[:3] == ["green", reports[1].url, "unreachable"]
    assert table[3].strip() == "! connection refused"
    line = health.simple(reports[0])
    assert line.startswith("blue degraded 3f2a1b9 ") and "\n" not in line


@pytest.mark.parametrize("path", ["/short-commit", "/unknown-commit"])
def test_a_health_commit_that_is_no_full_commit_never_fails_the_record_after_the_commit(
        server: Server, tmp_path: Path, path: str) -> None:
    """Found by review: an app whose /health says `git_commit: "3f2a1b9"` (or "unknown")
    made the state write after the commit point raise, and every rerun that would finish the
    run raised the same way (exit 6 for ever, the old slot never stopped). The record takes
    the commit only when it is a full one; here, with none known, git's null commit."""
    from runbook import intent as intents
    from runbook import recording
    from runbook import state as states
    from runbook.plan import Step

    env = make_env(server.port, path).with_(
        state_file=tmp_path / "deployment-state.json")
    intent = intents.Intent(run_id="run_1", action="switch", environment=env.name,
                            from_slot="green", to_slot="blue", from_version=None,
                            to_version="3f2a1b9")
    ctx = StepContext(Step("state", "Record the switch"), env=env)
    recording.switch(env, intent, slots.Observed(health_status="healthy"), "run_1", ctx)
    current = states.read_state(env.state_file).current
    assert current is not None and current.version == "3f2a1b9"
    assert current.git_commit == "0" * 40


def test_verification_waits_as_long_as_the_health_request_timeout_says(tmp_path: Path) -> None:
    """Found by review: verification gave each attempt 3 s whatever [health]
    request_timeout_seconds said, so an app answering in 3.3 s (a cold start) had every
    switch undone, and the undo's own verification failed the same way. A real HTTP server
    on loopback stands in for the proxy."""
    import dataclasses

    from runbook import caddy
    from tests.drill_checks import host_env

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            time.sleep(3.3)
            data = b'{"version": "abc1234"}'
            try:
                self.send_response(200)
                self.send_header("X-Togather-Slot", "green")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = host_env(tmp_path)
        env = base.with_(caddy=dataclasses.replace(
            base.caddy, proxy_url=f"http://127.0.0.1:{httpd.server_address[1]}"))
        patient = env.with_(health=dataclasses.replace(env.health, request_timeout=5.0))
        assert caddy.verify(patient, "green", "abc1234", attempts=1).ok
        short = caddy.verify(env, "green", "abc1234", attempts=1)  # the default 3 s
        assert not short.ok and env.health.request_timeout <= 3.0, short
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_gate_waits_as_long_as_the_hosts_health_wait_timeout(server: Server,
                                                                   tmp_path: Path) -> None:
    """Found by review: the host's HEALTH_WAIT_TIMEOUT (deploy.sh waits that long) was never
    read, so a slot its tooling gives longer was failed at [health] timeout_seconds and its
    start undone. Here [health] says 0.3 s and the host's env file 20 s; the slot needs 60
    probes (at least 1.2 s at the fastest cadence) to turn healthy: the gate waits for it,
    and the plan shows where its timeout came from."""
    env_file = tmp_path / ".env.staging"
    env_file.write_text("HEALTH_WAIT_TIMEOUT=20\n")
    env = from_mapping({
        "name": "staging",
        "slots": {"blue": {"container": "togather-server-blue", "port": server.port},
                  "green": {"container": "togather-server-green", "port": closed_port()}},
        "compose": {"env_file": str(env_file)},
        "health": {"path": "/flip", "timeout_seconds": 0.3, "interval_seconds": 0.02,
                   "max_interval_seconds": 0.1, "request_timeout_seconds": 0.5},
    }, tmp_path / "staging.toml")
    server.flip_after = 60
    assert health.wait_healthy(env, Slot.BLUE).ok
    assert server.hits["/flip"] == 61
    shown = slots.gate_step(env, Slot.BLUE, force=False, expected_version=None).details
    assert shown["timeout"].startswith("20s (HEALTH_WAIT_TIMEOUT in "), shown
    assert str(env_file) in shown["timeout"], shown


def test_a_gate_that_only_ever_got_an_oversized_body_says_so_at_its_deadline() -> None:
    """Found by review: a /health answering more than 1 MiB failed the gate with "timed out
    ... the body did not finish" (the last probe, cut short by the deadline) instead of the
    reason every earlier probe gave. The body here takes ~0.16 s to pass 1 MiB, so the last
    probe, given what is left of the deadline, always times out."""
    from runbook import bounded_http

    chunk = b" " * 65536

    class Huge(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            try:
                self.send_response(200)
                self.send_header("Content-Length", str(2 * bounded_http.MAX_BODY))
                self.end_headers()
                for _ in range(2 * bounded_http.MAX_BODY // len(chunk)):
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    time.sleep(0.01)
            except OSError:
                pass  # the client gave up

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Huge)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        env = make_env(int(httpd.server_address[1]), path="/health", timeout=1.0)
        with pytest.raises(HealthGateError) as err:
            health.wait_healthy(env, Slot.BLUE)
    finally:
        httpd.shutdown()
        httpd.server_close()
    message = str(err.value)
    said, cut, then = message.partition("(then:")
    assert f"a body larger than {bounded_http.MAX_BODY} bytes" in said, message
    # the last probe's own failure, after it, when the deadline cut it short (nearly always;
    # on a loaded machine the last probe may read past 1 MiB in time, and then says the same)
    assert ("did not finish" in then) if cut else \
        message.count(f"larger than {bounded_http.MAX_BODY}") == 1, message


# --- the schema the slot reports, compared with the runbook's -----------------------------------

def _schema_gate(server: Server, path: str, database: int | None, *, force: bool = False,
                 timeout: float = 30.0) -> tuple[slots.Step, StepContext]:
    env = make_env(server.port, path=path, timeout=timeout)
    want = health.ExpectedSchema(lambda: database, str(database), "db.example:5432/app")
    step = slots.gate_step(env, Slot.BLUE, force=force, expected_version="3f2a1b9",
                           schema=want)
    assert step.run is not None
    return step, StepContext(step)


def test_a_slot_reporting_another_schema_fails_its_gate_soon_not_at_its_timeout(
        server: Server) -> None:
    """/degraded reports schema 1 (pending migrations: degraded, which passes a gate); the
    runbook's database is at 2. Waiting never changes which database a slot reads: refused
    within SCHEMA_SETTLE, not after the gate's 30 s, as a failed gate (exit 1)."""
    step, ctx = _schema_gate(server, "/degraded", 2)
    began = time.monotonic()
    with pytest.raises(health.SchemaMismatchError) as err:
        step.run(ctx)  # type: ignore[misc]
    took = time.monotonic() - began
    assert health.SCHEMA_SETTLE <= took < health.SCHEMA_SETTLE + 2 * SLACK + 1.0, took
    assert err.value.exit_code is ExitCode.FAILED_SAFELY
    text = str(err.value)
    assert "reports schema 1" in text and "db.example:5432/app) is at 2" in text, text
    assert "another database" in text and "docker inspect" in text, text
    # found by review: an app that keeps the version it read at start-up (a standby left
    # running across a migration) differs too, so both causes are named, and how to tell
    # them apart: its DATABASE_URL is the runbook's -> restart it and run again
    assert "or reports a version it read at start-up and kept" in err.value.message, text
    fix = err.value.fix or ""
    assert "if it names that one" in fix and "docker restart togather-server-blue" in fix, fix
    assert step.details["schema"].startswith("the migrations version its /degraded reports")


def test_an_answer_given_before_the_app_read_its_schema_is_asked_again(server: Server) -> None:
    """An app may answer ok before it has read the schema (0 here): asked again, it
    reports 2, the runbook's, and the gate passes on that answer."""
    step, ctx = _schema_gate(server, "/settling", 2)
    step.run(ctx)  # type: ignore[misc]
    assert ctx.notes["schema"] == "2, as the database the runbook checked (db.example:5432/app)"
    assert server.hits["/settling"] >= 3


@pytest.mark.parametrize(("path", "database", "said"), [
    ("/degraded", 1, "1, as the database"),
    ("/healthy", 2, "not compared: /healthy reports no migrations version"),  # no details
    ("/degraded", None, "not compared: the slot reports 1, but the runbook could not read"),
])
def test_a_schema_that_matches_or_cannot_be_compared_passes_saying_so(
        server: Server, path: str, database: int | None, said: str) -> None:
    step, ctx = _schema_gate(server, path, database)
    step.run(ctx)  # type: ignore[misc]
    assert ctx.notes["schema"].startswith(said), ctx.notes


def test_force_says_a_differing_schema_and_goes_on(server: Server) -> None:
    step, _ = _schema_gate(server, "/degraded", 2, force=True)
    told: list[str] = []
    ctx = StepContext(step, notice=told.append)
    step.run(ctx)  # type: ignore[misc]
    assert ctx.notes["schema"].startswith("DIFFERS (not refused: --force)"), ctx.notes
    assert told and "reports schema 1" in told[0], told


@pytest.mark.parametrize(("checks", "version"), [
    ({"migrations": {"status": "pass", "details": {"version": 49, "dirty": False}}}, 49),
    ({"Schema": {"status": "pass", "details": {"version": 7}}}, 7),
    ([{"name": "migration", "status": "ok", "details": {"version": 3}}], 3),
    ({"migrations": {"status": "pass", "details": {"version": "49"}}}, None),  # not an int
    ({"migrations": {"status": "pass", "details": {"version": True}}}, None),
    ({"database": {"status": "pass", "details": {"version": 16}}}, None),  # not the schema's
    ({"migrations": {"status": "pass"}}, None),
])
def test_the_reported_schema_is_an_int_in_the_schema_checks_details(
        checks: object, version: int | None) -> None:
    report = health.parse("http://x/health", 200, json.dumps(body("healthy", {}) | {
        "checks": checks}))
    assert health.reported_schema(report) == version


@pytest.mark.parametrize(("health_path", "answer", "named"), [
    ("/healthy", (200, b'{"version": "1a2b3c4", "git_commit": "1a2b3c4"}'), "/healthy"),
    ("/bare", (200, json.dumps({"version": "1a2b3c4", "git_commit": "1a2b3c4" + "0" * 33,
                                "build_date": "2026-11-27"}).encode()), "/version"),
    ("/bare", None, None),  # no /version: 404
    ("/bare", (200, b"<html>not json</html>"), None),
    ("/bare", (200, b'{"build_date": "2026-11-27"}'), None),
    ("/bare", (500, b'{"version": "1a2b3c4"}'), None),
])
def test_status_asks_the_slots_own_version_only_where_health_names_no_commit(
        server: Server, monkeypatch: pytest.MonkeyPatch, health_path: str,
        answer: tuple[int, bytes] | None, named: str | None) -> None:
    """Found by review (MEDIUM): a /health naming no commit named no build to status, which
    said "No problems found" of a slot recreated from a retagged tag. Status asks the slot's
    own /version then (never where /health names a commit), and takes the build it names;
    one absent, unreadable or naming neither names nothing, as before."""
    from runbook import status

    monkeypatch.setitem(ROUTES, "/bare", (200, json.dumps(BARE).encode()))
    if answer is not None:
        monkeypatch.setitem(ROUTES, "/version", answer)
    env = make_env(server.port, path=health_path)
    env = env.with_(health=dataclasses.replace(env.health, request_timeout=5.0))
    report = health.probe(env.slot(Slot.BLUE), env.health.path, env.health.request_timeout)
    facts = status.Facts(env, reports={Slot.BLUE: report})
    facts.versions[Slot.BLUE] = status.version_beside(env, Slot.BLUE, report)
    assert server.hits.get("/version") == (None if health_path == "/healthy" else 1)
    version, commit, where = status.said_build(facts, Slot.BLUE)
    if named == "/version":
        assert (version, commit, where) == ("1a2b3c4", "1a2b3c4" + "0" * 33, "/version")
    elif named == "/healthy":
        assert (version, commit, where) == ("3f2a1b9", COMMIT, "/healthy")
    else:  # nothing named: as a /health naming nothing
        assert (version, commit, where) == (None, None, "/bare")
