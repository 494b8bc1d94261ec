"""The scenario's world: the environment, what the last action did, and a 'before' snapshot.

One `World` per scenario (function scope). On a drill (`--env drill`, whose environment
allows faults) it also holds the session's DrillStack, and the scenario's first Given (or its
first step, when no Given arranges) brings the stack into the scene the scenario starts from
(`World.arrange`, proved from what runs), so every drill scenario starts from a known place
without a reset it would then undo. On a real host there is no
stack: Givens only check, and nothing here ever changes the host by itself.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from runbook import caddy, database, docker
from runbook import lock as locks
from runbook import state as states
from runbook.drill import http as drill_http
from runbook.drill import scenes
from runbook.drill.load import Load
from runbook.drill.stack import DrillStack
from runbook.environment import Environment, Slot, command_arg
from runbook.errors import PreconditionError, RunbookError
from runbook.plan import Plan
from runbook.run import RunResult

DRY_RUN_SKIP = "dry run: plan printed above"
FAULT_ONLY = "injects faults: drill only"
LOAD_SECONDS = 120.0  # a scenario's load stops by itself after this, whatever happens
DATA_CLIENTS = 2  # of the load's 16: they ask /items, which reads the database


def is_feature_item(node: pytest.Item | pytest.Collector) -> bool:
    return node.path is not None and node.path.suffix == ".feature"


# ---------------------------------------------------------------------------------------------
# What a refused or dry run must leave untouched


# how long a reader of what runs waits for Caddy: a slow answer on a loaded machine read as "no
# answer" (config changed, proxy down) in the before/after comparisons (found by review)
READ_TIMEOUT = 10.0


def caddy_config(env: Environment) -> bytes | None:
    """Caddy's running config as its admin API gives it (None: no answer)."""
    try:
        with drill_http.client(timeout=READ_TIMEOUT) as client:
            response = client.get(f"{env.caddy.admin_url}/config/",
                                  headers={"Connection": "close"})
    except httpx.HTTPError:
        return None
    return response.content if response.status_code == 200 else None


def dialed_slots(env: Environment) -> set[Slot] | None:
    """The slots whose port Caddy's running config dials, read here from its admin API (not
    by runbook.traffic, which the scenarios judge); None when it cannot be read."""
    raw = caddy_config(env)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    ports: set[int] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "dial" and isinstance(value, str) and value.rpartition(":")[2].isdigit():
                    ports.add(int(value.rpartition(":")[2]))
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return {slot for slot in Slot if env.slot(slot).port in ports}


def through_proxy(env: Environment, path: str = "/version") -> tuple[int, str | None, str | None]:
    """(HTTP status, slot, version) as a user sees it through Caddy; 0 = no answer. The slot is
    the answer's X-Togather-Slot only when Caddy's running config dials that slot's port and no
    other (the header is written by the block the runbook rewrites: alone it could lie)."""
    try:
        with drill_http.client(timeout=READ_TIMEOUT) as client:
            response = client.get(f"{env.caddy.proxy_url}{path}",
                                  headers={"Connection": "close"})
    except httpx.HTTPError:
        return 0, None, None
    version = None
    with contextlib.suppress(ValueError, AttributeError):
        version = response.json().get("version")
    header = response.headers.get(caddy.SLOT_HEADER)
    if header is not None:
        dialed = dialed_slots(env)
        if dialed is None or {str(s) for s in dialed} != {header}:
            dials = "?" if dialed is None else ", ".join(sorted(map(str, dialed))) or "no slot"
            header = f"{header} (but Caddy dials {dials})"
    return response.status_code, header, version


def container_identity(name: str) -> str | None:
    """Which container it is, as the docker CLI says: a recreate changes its id even when
    image and state end up the same, and a running one's start time shows a restart. A
    stopped one's start time is left out: an undo may start it and stop it again."""
    done = subprocess.run(["docker", "inspect", "--format",
                           "{{.Id}} {{.State.Status}} {{.Config.Image}} {{.State.StartedAt}}",
                           name], capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        return None
    fields = done.stdout.split()
    return " ".join(fields if fields[1:2] == ["running"] else fields[:3])


_SITE = re.compile(r"^(?:https?://)?(?:127\.0\.0\.1|localhost|\[::1\]):(\d+)\s*\{", re.M)


def other_sites(env: Environment, text: str) -> list[str]:
    """Loopback sites the Caddyfile serves besides the proxied app (e.g. the drill's other site)."""
    proxied = env.caddy.proxy_url.rstrip("/").rsplit(":", 1)[-1]
    return [f"http://127.0.0.1:{port}" for port in _SITE.findall(text) if port != proxied]


def site_answer(url: str) -> int:
    try:
        with drill_http.client(timeout=READ_TIMEOUT) as client:
            return client.get(f"{url}/ping", headers={"Connection": "close"}).status_code
    except httpx.HTTPError:
        return 0


def outside_block(text: str) -> str:
    """The Caddyfile without the lines between the slot markers, found by plain line search
    (not by runbook.caddy, whose rewrite this judges)."""
    lines = text.splitlines(keepends=True)
    start = [i for i, line in enumerate(lines) if "BLUE_GREEN_SLOT_START" in line]
    end = [i for i, line in enumerate(lines) if "BLUE_GREEN_SLOT_END" in line]
    assert len(start) == len(end) == 1 and start[0] < end[0], "not one pair of slot markers"
    return "".join(lines[:start[0] + 1] + lines[end[0]:])


@dataclass(frozen=True)
class Snapshot:
    state: bytes | None
    caddyfile: bytes
    containers: dict[Slot, str | None]  # the image each slot runs; None when not running
    lock: bool
    traffic: tuple[int, str | None, str | None]
    schema: int | None
    env_file: bytes | None
    database_started: str | None
    sites: dict[str, int]
    logs: frozenset[str]
    caddy_config: bytes | None = None  # what Caddy runs (admin API)
    identities: dict[Slot, str | None] = field(default_factory=dict)  # docker CLI
    # on a drill, read straight from Postgres (not through the runbook's reader): the schema
    # row with its dirty flag, and each user table's rows; and the snapshot folder's names
    database: tuple[Any, ...] | None = None
    snapshots: frozenset[str] = frozenset()

    def unchanged(self) -> dict[str, Any]:
        """The parts a refused run or a preview must leave exactly as they were."""
        return {"state file": self.state, "Caddyfile": self.caddyfile,
                "running slots": self.containers, "deploy lock held": self.lock,
                "traffic through Caddy": self.traffic, "database schema": self.schema,
                "Caddy's running config": self.caddy_config,
                "slot containers (id, state, start)": self.identities,
                "env file": self.env_file, "database started": self.database_started,
                "other sites' answers": self.sites,
                "database (schema_migrations, rows per table)": self.database,
                "snapshot files": self.snapshots}


def running_image(container: str) -> str | None:
    """What a slot serves: the image of its running container (a stopped one serves nothing)."""
    info = docker.inspect(container)
    return info.image if info.running else None


def database_in_postgres(stack: DrillStack) -> tuple[Any, ...]:
    """(schema_migrations rows, (table, row count, digest of its rows) per table) read with
    plain SQL on the drill's Postgres: a restore that kept the counts still shows."""
    with stack.connect() as conn:
        schema = tuple(conn.execute("SELECT version, dirty FROM schema_migrations").fetchall())
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").fetchall()]
        rows = tuple((t, *conn.execute(
            f'SELECT count(*), md5(coalesce(string_agg(r::text, chr(10) ORDER BY r::text), \'\')) '
            f'FROM "{t}" r').fetchone()) for t in tables)
    return schema, rows


def take_snapshot(env: Environment, stack: DrillStack | None = None) -> Snapshot:
    """`stack`: on a drill, the database is also read straight from Postgres."""
    def read(path: Path | None) -> bytes | None:
        try:
            return path.read_bytes() if path else None
        except OSError:
            return None

    text = caddy.read(env)
    try:
        schema: int | None = database.schema_version(env).version
    except RunbookError:
        schema = None
    db = docker.inspect(env.database.container)
    return Snapshot(
        state=read(env.state_file),
        caddyfile=env.caddy.caddyfile.read_bytes(),
        containers={s: running_image(env.slot(s).container) for s in Slot},
        lock=env.lock_path.exists(),
        traffic=through_proxy(env),
        schema=schema,
        env_file=read(env.compose.env_file or env.database.env_file),
        database_started=db.started_at if db.exists else None,
        sites={url: site_answer(url) for url in other_sites(env, text)},
        logs=frozenset(p.name for p in env.log_dir.glob("*")) if env.log_dir.is_dir()
        else frozenset(),
        caddy_config=caddy_config(env),
        identities={s: container_identity(env.slot(s).container) for s in Slot},
        database=database_in_postgres(stack) if stack is not None else None,
        snapshots=frozenset(p.name for p in env.database.snapshot_dir.iterdir())
        if env.database.snapshot_dir.is_dir() else frozenset(),
    )


# ---------------------------------------------------------------------------------------------
# The world


@dataclass
class World:
    env: Environment
    config: pytest.Config
    stack: DrillStack | None = None
    dry_run: bool = False
    result: RunResult | None = None
    error: RunbookError | None = None
    before: Snapshot | None = None  # taken right before the last action
    planned: bool = False  # a mutating step printed its plan instead of acting
    status: dict[str, Any] | None = None
    live_before: Slot | None = None  # the slot taking traffic before the last action
    notes: dict[str, Any] = field(default_factory=dict)  # scenario facts between steps
    # simulated users (a @mutating scenario on a drill): prepared with the world, sending
    # during each action (paused between them), stopped when the scenario ends
    load: Load | None = None
    acted_at: float | None = None  # time.time() when the last action began
    acted_until: float | None = None  # and when it ended
    shown: list[str] = field(default_factory=list)  # everything the steps printed
    scene: scenes.Scene | None = None  # the drill scene this scenario arranged, once
    # what a step opened for the rest of the scenario (a client's connection): closed at its end
    closing: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    # -- where we are --------------------------------------------------------------------------
    @property
    def on_drill(self) -> bool:
        """Givens arrange only on a drill stack this session owns; elsewhere they check."""
        return self.stack is not None and self.env.allows_faults

    def drill(self) -> DrillStack:
        """For steps that cause a fault: the stack (in the baseline scene when no Given has
        arranged one yet), or a failure on anything but a drill."""
        if not self.on_drill or self.stack is None:
            pytest.fail(f"this step {FAULT_ONLY}: run it with --env drill", pytrace=False)
        if self.scene is None:
            self.arrange(scenes.baseline(self.stack.base_version.name))
        return self.stack

    def drill_base(self) -> str:
        """The drill's base version (v1 unless the stack was made with another)."""
        return self.stack.base_version.name if self.stack is not None else "v1"

    def arrange(self, scene: scenes.Scene) -> None:
        """On a drill: bring the stack into `scene` (only what differs is changed, then proved
        from what runs); once per scenario, by its first Given or its first step."""
        if not self.on_drill or self.stack is None:
            pytest.fail(f"this step {FAULT_ONLY}: run it with --env drill", pytrace=False)
        assert self.scene is None, f"the scene is already {self.scene.name!r}"
        self.stack.arrange(scene)
        self.scene = scene

    def check(self, condition: object, message: str) -> None:
        """A real host's precondition: fail with the runbook's advice when it does not hold."""
        if not condition:
            pytest.fail(message, pytrace=False)

    # -- state -------------------------------------------------------------------------------
    def state(self) -> states.DeploymentState:
        return states.read_state(self.env.state_file, environment=self.env.name)

    def live_slot(self) -> Slot | None:
        """The slot users are served by, as the proxy answers (its X-Togather-Slot), not as
        any file says; None when the proxy answers from no slot."""
        status, header, _ = through_proxy(self.env)
        try:
            return Slot(header) if status == 200 and header else None
        except ValueError:
            return None

    def routed_slot(self) -> Slot | None:
        """The slot Caddy sends users to: as the proxy answers, or, when the proxy answers
        from no slot because that slot is down (the outage a rollback is for: 502), the one
        slot whose port Caddy's running config dials (read here, not by runbook.traffic)."""
        live = self.live_slot()
        if live is None:
            dialed = dialed_slots(self.env)
            live = next(iter(dialed)) if dialed is not None and len(dialed) == 1 else None
        return live

    # -- acting ------------------------------------------------------------------------------
    def act(self, what: str, run: Callable[..., RunResult], *, mutating: bool = True,
            cli: str = "") -> None:
        """Run a runbook action, keeping its result or its error and a snapshot from before.

        With --dry-run a mutating action prints its plan instead (a refusal at planning time
        is the same refusal either way, so it is kept as the error). On a real host `run`
        also gets the action's `confirm` and `notify` (on_host); `cli` is the same action as
        `runbook` arguments after ENV, for its refusal's fix."""
        if self.load is not None:  # the users send while the snapshot is taken and the action runs
            self.load.start()
        self.before = take_snapshot(self.env, self.stack if self.on_drill else None)
        self.live_before = self.routed_slot()  # down or not: what the action moves from
        self.result = None
        self.error = None
        dry = self.dry_run and mutating
        self.planned = self.planned or dry
        self.acted_at = time.time()
        try:
            self.result = run(dry, **(self.on_host(what, cli) if mutating and not dry else {}))
        except RunbookError as exc:
            self.error = exc
            if dry:
                self.show(f"--dry-run: {what} is refused", str(exc))
            return
        finally:
            self.acted_until = time.time()
            if self.load is not None:  # paused, and every request sent during it recorded
                self.load.settle()
        if dry:
            refusal = self.dry_refusal(self.result.plan)
            self.show(f"--dry-run: {what} would " + (f"be refused: {refusal}" if refusal
                                                     else "do"), self.result.plan.render())

    def dry_refusal(self, plan: Plan) -> str | None:
        """Why the same step without --dry-run would not run this plan (found by review: a
        plan printed as "would do" that the real run refuses): a deploy lock a live run
        holds (exit 3), or, on a real host, plan warnings nobody is at a prompt to answer."""
        try:
            held = locks.refusing_holder(self.env)
        except RunbookError as exc:  # the real run would stop on it as well
            return str(exc)
        if held is not None:
            return f"the deploy lock is held ({held.describe()})"
        if not self.on_drill and plan.warnings:
            return ("its plan warns (nobody is at a prompt to answer): "
                    + "; ".join(plan.warnings))
        return None

    def on_host(self, what: str, cli: str) -> dict[str, Callable[..., Any]]:
        """On a real host, what the CLI's prompt gives on-call: the plan on screen before
        anything changes, and every notice the run gives (a stale lock taken over, the old
        slot left running). A plan with warnings ("the schema guard was NOT checked ...
        answer no") is not run: nobody is at a prompt to answer them (found by review: a
        pytest rollback on a host printed nothing and went ahead). On the drill: nothing."""
        if self.on_drill:
            return {}

        def confirm(plan: Plan) -> bool:
            self.show(f"{what}: the plan on {self.env.display}", plan.render())
            if plan.warnings:
                command = (f"runbook {what.split()[0]} {command_arg(self.env)}"
                           + (f" {cli}" if cli else ""))
                raise PreconditionError(
                    f"{what}: not run, its plan warns (nobody is at a prompt to answer): "
                    + "; ".join(plan.warnings) + "; nothing was changed",
                    f"read the plan above, then run `{command}`, whose prompt asks")
            return True

        return {"confirm": confirm,
                "notify": lambda message: self.show(f"{what}: notice", str(message))}

    def would(self, what: str, detail: str) -> bool:
        """For a mutating step the runbook library does not plan itself: under --dry-run,
        print what it would do and return True (the caller then does nothing)."""
        if not self.dry_run:
            return False
        self.planned = True
        self.show(f"--dry-run: {what} would do", detail)
        return True

    def show(self, title: str, text: str) -> None:
        """Write to the terminal even while pytest captures output (and keep it: a Then
        may judge what the on-call saw)."""
        self.shown.append(f"{title}\n{text}")
        capman = self.config.pluginmanager.getplugin("capturemanager")
        ctx = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
        with ctx:
            print(f"\n----- {title} -----\n{text}\n-----", flush=True)

    # -- outcomes ----------------------------------------------------------------------------
    def outcome(self) -> None:
        """Then-steps about an outcome have nothing to check after a printed plan."""
        if self.planned:
            pytest.skip(DRY_RUN_SKIP)

    def succeeded(self) -> RunResult:
        self.outcome()
        if self.error is not None:
            pytest.fail(f"the action failed (exit code {int(self.error.exit_code)}): "
                        f"{self.error}", pytrace=False)
        assert self.result is not None, "no action was run in this scenario"
        return self.result

    def refused(self) -> RunbookError:
        if self.error is None:
            self.outcome()  # a dry run that planned fine may still fail when executed
            pytest.fail("expected the action to be refused, but it went through",
                        pytrace=False)
        return self.error


@pytest.fixture
def world(request: pytest.FixtureRequest, environment: Environment) -> Iterator[World]:
    """A fresh world; on a drill its first Given (or first step) arranges the stack's scene.

    In a @mutating scenario on a drill (never on a real host, never under --dry-run) a bounded
    user load through Caddy is prepared here, starts with the first action and stops when the
    scenario ends."""
    config = request.config
    stack = None
    if config.getoption("--env") == "drill":
        stack = request.getfixturevalue("drill_stack")
    dry_run = bool(config.getoption("--dry-run"))
    world = World(env=environment, config=config, stack=stack, dry_run=dry_run)
    if (world.on_drill and not dry_run and is_feature_item(request.node)
            and request.node.get_closest_marker("mutating") is not None):
        proxy = environment.caddy.proxy_url
        world.load = Load(f"{proxy}/version", data_url=f"{proxy}/items",
                          data_clients=DATA_CLIENTS, max_seconds=LOAD_SECONDS).prepare()
    try:
        yield world
    finally:
        try:
            world.closing.close()
        finally:
            if world.load is not None:
                world.load.stop()


@pytest.fixture(autouse=True)
def _scenario_world(request: pytest.FixtureRequest) -> None:
    """Every scenario gets its world before its first step; a fleet scenario has its own
    (steps/fleet.py) and never needs the single-host drill stack."""
    if is_feature_item(request.node) and request.node.get_closest_marker("fleet") is None:
        request.getfixturevalue("world")


def pytest_bdd_before_step(request: pytest.FixtureRequest, feature: Any, scenario: Any,
                           step: Any, step_func: Callable[..., Any]) -> None:
    """On a drill, a scenario whose Givens arranged no scene starts from the baseline before
    its first When (a When marked `stackless`, e.g. reading the help, needs none; its Thens
    read only what it found). A fleet scenario never touches the single-host stack: asking
    for `world` here started one (15 s loaded) and arranged its baseline before every When."""
    if step.type != "when" or getattr(step_func, "stackless", False):
        return
    if request.node.get_closest_marker("fleet") is not None:
        return  # the fleet has its own hosts (steps/fleet.py): no single-host stack to start
    world: World = request.getfixturevalue("world")
    if world.on_drill and world.scene is None:
        world.drill()


# ---------------------------------------------------------------------------------------------
# The order scenarios run in on a drill: consecutive ones share their scene

# The scene each first Given arranges, in the order the scenes are visited (each a cheap step
# from the one before: few slot recreations, the database kept where Postgres allows) and the
# pytest-xdist group that keeps the scenarios of a scene (or neighbouring ones) on one
# worker's stack; five small groups, so two workers (one busy with the fleet) stay balanced.
# A scenario without a Given (it needs no stack) goes first; scenarios with other Givens
# (e.g. the fleet's) keep their places. Only execution changes: the report and the docs keep
# the feature files' order.
SCENE_ORDER: dict[str | None, tuple[int, str]] = {
    None: (0, "scenes-baseline"),
    "a deployment is live": (1, "scenes-baseline"),
    "no previous deployment is recorded": (2, "scenes-first-deploy"),
    "customer data was recorded before the migration": (3, "scenes-first-deploy"),
    "migrations ran after the previous deployment": (4, "scenes-migrated"),
    "a broken version went live after a migration": (5, "scenes-broken"),
    "a previous deployment exists whose build is broken": (6, "scenes-broken"),
    "a previous deployment exists": (7, "scenes-previous"),
    "a previous deployment exists that cannot reach the database": (7, "scenes-previous"),
}


def first_given(item: pytest.Item) -> str | None:
    """The text of the scenario's first Given step (None: it has none)."""
    from pytest_bdd.scenario import scenario_wrapper_template_registry

    template = scenario_wrapper_template_registry.get(getattr(item, "obj", None))  # type: ignore[arg-type]
    if template is None:
        return None
    return next((step.name for step in template.steps if step.type == "given"), None)


@pytest.hookimpl(trylast=True)  # after every hook that adds an xdist_group (conftest: fleet)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a drill, run the scenarios scene by scene (non-mutating ones first within a
    scene), each scene group on one xdist worker; other items keep their place. Under
    --dist loadgroup every item with an xdist_group keeps its group (the fleet's, the shapes
    stack's, the wheel build's), not only the features."""
    if config.getoption("--env") != "drill":
        return
    chosen = [(index, item, SCENE_ORDER[given]) for index, item in enumerate(items)
              if is_feature_item(item) and not item.get_closest_marker("fleet")
              and not item.get_closest_marker("xdist_group")
              and (given := first_given(item)) in SCENE_ORDER]
    ordered = sorted(chosen, key=lambda c: (c[2][0], c[1].get_closest_marker("mutating")
                                            is not None, c[0]))
    for (index, _, _), (_, item, (_, group)) in zip(chosen, ordered, strict=True):
        items[index] = item
        item.add_marker(pytest.mark.xdist_group(group))
    if getattr(config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        for item in items:
            group_nodeid(item)


def group_nodeid(item: pytest.Item) -> None:
    """Give an item its xdist group as the `@group` nodeid suffix loadgroup schedules
    by. pytest-xdist 3.8 sets it as `item._nodeid`, which pytest 9 no longer reads (its
    nodeid is `item._id`), so without this no group is kept together on one worker."""
    names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                    for m in item.iter_markers("xdist_group")})
    if not names or "@" in item.nodeid:
        return
    current = getattr(item, "_id", None)
    parse = getattr(type(current), "parse", None)
    if parse is not None:
        item._id = parse(f"{item.nodeid}@{'_'.join(names)}")
