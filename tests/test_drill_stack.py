"""The drill stack, run for real: bring-up, slots, proxy, broken builds, database, teardown."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from runbook import compose, docker
from runbook.drill import http as drill_http
from runbook.drill import images
from runbook.drill.stack import DrillError, DrillStack, resources
from runbook.drill.versions import VERSIONS
from runbook.environment import Slot

# one xdist worker runs this module (make test: --dist loadgroup): its module fixture once
pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("drill_stack")]


@pytest.fixture(scope="module")
def scratch() -> Iterator[DrillStack]:
    """A stack this module may break freely (the session stack stays pristine)."""
    with DrillStack() as stack:
        yield stack


def health(stack: DrillStack, slot: Slot) -> httpx.Response:
    return drill_http.get(f"{stack.env.slot(slot).base_url}/health", timeout=5)


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def test_both_slots_healthy_on_their_own_ports(baseline_stack: DrillStack) -> None:
    env = baseline_stack.env
    assert env.slot("blue").port != env.slot("green").port
    for slot in Slot:
        response = health(baseline_stack, slot)
        body = response.json()
        assert response.status_code == 200
        assert body["status"] == "healthy"
        assert body["slot"] == slot.value
        assert body["version"] == VERSIONS["v1"].tag
        assert body["git_commit"] == VERSIONS["v1"].git_commit
        assert body["checks"]["database"]["status"] == "pass"
        assert body["checks"]["migrations"]["details"] == {"version": 1, "dirty": False}
        info = docker.inspect(env.slot(slot).container)
        assert info.running and info.image == VERSIONS["v1"].image
        assert info.labels is not None
        assert info.labels["com.togather.deployment.slot"] == slot.value


def test_endpoints_match_the_contract(baseline_stack: DrillStack) -> None:
    base = baseline_stack.env.slot("blue").base_url
    version = drill_http.get(f"{base}/version").json()
    assert set(version) == {"version", "git_commit", "build_date"}
    assert drill_http.get(f"{base}/healthz").status_code == 200
    ready = drill_http.get(f"{base}/readyz").json()
    assert set(ready["checks"]) == {"database", "migrations"}
    assert ready["timestamp"].endswith("Z")


def test_proxy_serves_the_active_slot_with_its_header(baseline_stack: DrillStack) -> None:
    env = baseline_stack.env
    for path in ("/version", "/api/version"):
        response = drill_http.get(f"{env.caddy.proxy_url}{path}")
        assert response.headers["X-Togather-Slot"] == "blue"
    assert drill_http.get(f"{env.caddy.proxy_url}/version").json()["version"] == VERSIONS["v1"].tag
    text = env.caddy.caddyfile.read_text()
    assert "# BLUE_GREEN_SLOT_START" in text and "# BLUE_GREEN_SLOT_END" in text
    assert f"localhost:{env.slot('blue').port}" in text
    other = text.split("http://127.0.0.1:")[1].split(" ")[0]
    assert drill_http.get(f"http://127.0.0.1:{other}/ping").text == "pong"


def test_dataset_is_read_and_written_through_the_app(baseline_stack: DrillStack) -> None:
    base = baseline_stack.env.slot("green").base_url
    created = drill_http.post(f"{base}/items", json={"name": "drill-item"}).json()
    items = drill_http.get(f"{baseline_stack.env.slot('blue').base_url}/items").json()
    assert {"id": created["id"], "name": "drill-item"} in items
    with psycopg.connect(baseline_stack.env.database.url()) as conn:
        assert conn.execute("SELECT name FROM items WHERE id = %s",
                            (created["id"],)).fetchone() == ("drill-item",)


def test_database_url_password_needs_encoding_and_works(baseline_stack: DrillStack) -> None:
    """The drill's password holds @, / and %: every client must cope with it."""
    assert any(c in baseline_stack.password for c in "@/%")
    assert baseline_stack.password not in baseline_stack.env.database.url()
    with psycopg.connect(baseline_stack.env.database.url()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def recreate(stack: DrillStack, slot: Slot, version: str) -> None:
    compose.run(compose.recreate_slot(stack.env, slot, VERSIONS[version].tag))


def test_unhealthy_build_answers_503(scratch: DrillStack) -> None:
    recreate(scratch, Slot.GREEN, "unhealthy")
    response = wait_for(lambda: _try(lambda: health(scratch, Slot.GREEN)))
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["checks"]["app"]["status"] == "fail"
    assert docker.inspect(scratch.env.slot("green").container).image == VERSIONS["unhealthy"].image
    recreate(scratch, Slot.GREEN, "v1")


def test_crashing_build_exits_on_start(scratch: DrillStack) -> None:
    recreate(scratch, Slot.GREEN, "crash")
    container = scratch.env.slot("green").container
    info = wait_for(lambda: (i := docker.inspect(container)).status == "exited" and i)
    assert info and info.exit_code == 3
    assert "exits on start" in docker.logs(container)
    with pytest.raises(httpx.ConnectError):
        health(scratch, Slot.GREEN)
    recreate(scratch, Slot.GREEN, "v1")


def test_schema_ahead_of_the_build_fails_its_migrations_check(scratch: DrillStack) -> None:
    recreate(scratch, Slot.GREEN, "v2")
    wait_for(lambda: _try(lambda: health(scratch, Slot.GREEN)))
    scratch.migrate(Slot.GREEN)
    green = health(scratch, Slot.GREEN).json()
    blue = health(scratch, Slot.BLUE)
    assert green["status"] == "healthy"
    assert blue.status_code == 503
    assert blue.json()["checks"]["migrations"]["status"] == "fail"
    assert "ahead" in blue.json()["checks"]["migrations"]["message"]
    with psycopg.connect(scratch.env.database.url(), autocommit=True) as conn:
        conn.execute("DROP TABLE orders; ALTER TABLE items DROP COLUMN priority;"
                     "UPDATE schema_migrations SET version = 1")
    assert health(scratch, Slot.BLUE).json()["status"] == "healthy"


def test_database_restart_is_seen_by_health(scratch: DrillStack) -> None:
    scratch.docker("stop", scratch.db_container)
    down = health(scratch, Slot.BLUE)
    assert down.status_code == 503
    assert down.json()["checks"]["database"]["status"] == "fail"
    scratch.docker("start", scratch.db_container)
    up = wait_for(lambda: health(scratch, Slot.BLUE).status_code == 200, timeout=30)
    assert up, "blue never saw the database come back"


def networks_of(stack: DrillStack, container: str) -> str:
    each = "{{range $name, $net := .NetworkSettings.Networks}}{{$name}} {{$net.Aliases}};{{end}}"
    return stack.docker("inspect", "--format", each, container).stdout.strip()


def test_a_slot_off_the_database_network_fails_its_database_check_and_is_put_back(
        scratch: DrillStack) -> None:
    """The troubleshooting drill's fault: the stopped slot, started, answers but cannot reach
    the database (the other slot can); afterwards, even when the block fails, the container
    has its networks and aliases back, reaches the database, and no network is left."""
    green = scratch.env.slot("green").container
    docker.stop(green)
    before = networks_of(scratch, green)
    with pytest.raises(RuntimeError), scratch.off_the_database_network(Slot.GREEN):
        docker.start(green)
        answer = wait_for(lambda: _try(lambda: health(scratch, Slot.GREEN)))
        assert answer and answer.status_code == 503, answer
        assert answer.json()["checks"]["database"]["status"] == "fail", answer.text
        assert health(scratch, Slot.BLUE).json()["checks"]["database"]["status"] == "pass"
        docker.stop(green)
        raise RuntimeError("the block failed")
    assert networks_of(scratch, green) == before
    assert not [n for n in resources(scratch.run_id)["network"] if "no-database" in n]
    docker.start(green)
    back = wait_for(lambda: (r := _try(lambda: health(scratch, Slot.GREEN))) and
                    r.status_code == 200 and r)
    assert back, "green does not reach the database again"


def test_app_stops_promptly_on_sigterm(scratch: DrillStack) -> None:
    container = scratch.env.slot("green").container
    if docker.inspect(container).status != "running":
        docker.start(container)
    # the app installs its SIGTERM handler before it listens: a container still importing
    # ignores SIGTERM as PID 1 (the kernel drops default-action signals to PID 1), which is a
    # race of this test, not the app's handling
    assert wait_for(lambda: _answers(scratch, "green"), timeout=30), "green never answered"
    scratch.docker("stop", "-t", "5", container)
    info = docker.inspect(container)
    assert info.status == "exited"
    assert info.exit_code == 0, "SIGTERM was not handled (137 means it had to be killed)"
    docker.start(container)


def _answers(stack: DrillStack, slot: Slot) -> bool:
    try:
        return health(stack, slot).status_code > 0  # any answer: it listens, so it handles TERM
    except httpx.HTTPError:
        return False


def database_contents(stack: DrillStack) -> dict[str, object]:
    """Every table's columns and rows, the migrations record and the sequences, read directly
    (not through the stack's own check)."""
    with psycopg.connect(stack.env.database.url()) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
            "ORDER BY table_name").fetchall()]
        out: dict[str, object] = {"sequences": conn.execute(
            "SELECT sequencename, last_value FROM pg_sequences ORDER BY 1").fetchall()}
        for table in tables:
            out[table] = (
                conn.execute("SELECT column_name FROM information_schema.columns "
                             "WHERE table_name = %s ORDER BY ordinal_position",
                             (table,)).fetchall(),
                conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall())
    return out


@pytest.mark.parametrize("write", [
    "an item through the app", "DDL", "the migrations record", "a bare nextval()"])
def test_reset_rebuilds_the_database_after_any_write_and_only_then(scratch: DrillStack,
                                                                   write: str) -> None:
    """A reset keeps the database only when Postgres proves nothing was written since the
    last one (its WAL position and sequences); any write makes it rebuild to the baseline."""
    scratch.reset()
    baseline = database_contents(scratch)
    assert baseline["schema_migrations"] == ([("version",), ("dirty",)], [(1, False)])
    kept = scratch.resets["kept"]
    scratch.reset()  # nothing written in between
    assert scratch.resets["kept"] == kept + 1, scratch.arranged
    assert database_contents(scratch) == baseline
    rebuilt = scratch.resets["rebuilt"]
    url = scratch.env.database.url()
    if write == "an item through the app":
        drill_http.post(f"{scratch.env.slot('blue').base_url}/items", json={"name": "left"})
    else:
        sql = {"DDL": "CREATE TABLE left_behind (id int)",
               "the migrations record": "UPDATE schema_migrations SET dirty = true",
               "a bare nextval()": "SELECT nextval('items_id_seq')"}[write]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql)
    assert database_contents(scratch) != baseline
    scratch.reset()
    assert scratch.resets["rebuilt"] == rebuilt + 1
    assert database_contents(scratch) == baseline


def test_a_port_held_by_a_foreign_process_is_avoided_and_teardown_leaves_nothing_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One bring-up for both (each costs a whole stack)."""
    foreign = socket.socket()
    foreign.bind(("127.0.0.1", 0))
    foreign.listen()
    taken = foreign.getsockname()[1]
    monkeypatch.setenv("RUNBOOK_DRILL_PROXY_PORT", str(taken))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # honoured on gw0 only
    try:
        stack = DrillStack().start()
        try:
            run_id = stack.run_id
            assert resources(run_id)["container"], "the stack should be up"
            assert stack.ports.proxy != taken
            assert drill_http.get(f"{stack.env.caddy.proxy_url}/version").status_code == 200
        finally:
            stack.stop()
        assert resources(run_id) == {"container": [], "network": [], "volume": []}
        assert not stack.run_dir.exists()
        probe = socket.create_connection(("127.0.0.1", taken), timeout=2)
        probe.close()  # the foreign listener is untouched
    finally:
        foreign.close()


def test_missing_image_is_one_clear_error_and_nothing_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "LOCAL_POSTGRES", "togather-drill-postgres:absent")
    stack = DrillStack()
    with pytest.raises(images.ImageError) as err:
        stack.start()
    message = str(err.value)
    assert "togather-drill-postgres:absent" in message and "make images" in message
    assert "\n" not in message
    assert resources(stack.run_id) == {"container": [], "network": [], "volume": []}
    stack.stop()


def test_pull_mode_must_be_an_explicit_known_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOK_IMAGES", "sometimes")
    with pytest.raises(images.ImageError, match="RUNBOOK_IMAGES"):
        images.selected()


def test_drill_error_is_raised_for_a_failing_bring_up(monkeypatch: pytest.MonkeyPatch) -> None:
    stack = DrillStack()
    monkeypatch.setattr(stack, "base_version", VERSIONS["crash"])
    # a crashing build can never become healthy, but compose --wait only needs it started;
    # the migration step then fails with a clear DrillError and everything is removed.
    with pytest.raises(DrillError):
        stack.start()
    assert resources(stack.run_id) == {"container": [], "network": [], "volume": []}


def _try(fn):  # type: ignore[no-untyped-def]
    try:
        return fn()
    except httpx.HTTPError:
        return None
