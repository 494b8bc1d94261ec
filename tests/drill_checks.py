"""The suite's shared test helpers, in one place: what tests read back from a drill stack to
judge a run (through the proxy and Docker, not through the code under test), the fixtures
that put the session stack at its baseline, and the small arrangements many tests make.
tests/conftest.py only re-exports the fixtures."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from runbook import docker, drain, faults
from runbook.drill import http as drill_http
from runbook.drill import images, scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot, from_mapping

# --- reading back what runs --------------------------------------------------------------------


def through_proxy(env: Environment) -> tuple[str, str]:
    """(X-Togather-Slot, version) as a user sees them through Caddy."""
    response = drill_http.get(f"{env.caddy.proxy_url}/version", headers={"Connection": "close"},
                              timeout=5)
    return response.headers["X-Togather-Slot"], response.json()["version"]


def runbook_cli(env: Environment, *args: str, fault: str | None = None
                ) -> subprocess.CompletedProcess[str]:
    """The runbook command as on-call types it, with a drill fault (runbook/faults.py)."""
    assert env.source is not None
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    if fault:
        environ[faults.VARIABLE] = fault
    return subprocess.run([sys.executable, "-m", "runbook.cli", *args, str(env.source)],
                          capture_output=True, text=True, timeout=180, env=environ,
                          stdin=subprocess.DEVNULL, check=False)


def snapshot(env: Environment) -> dict[str, object]:
    """Everything a refused or dry run must leave untouched."""
    return {
        "state": env.state_file.read_bytes(),
        "caddyfile": env.caddy.caddyfile.read_bytes(),
        "containers": {s: dataclasses.astuple(docker.inspect(env.slot(s).container))[:4]
                       for s in Slot},
        "lock": env.lock_path.exists(),
        "traffic": through_proxy(env),
    }


def everything_written(tmp_path: Path, *procs: subprocess.CompletedProcess[str]) -> str:
    """What the runs printed, and every journal and run record under tmp_path's logs/ and
    runs/: where a secret must never be."""
    texts = [p.stdout + p.stderr for p in procs]
    for folder in (tmp_path / "logs", tmp_path / "runs"):
        if folder.exists():
            texts += [f.read_text(errors="replace") for f in sorted(folder.rglob("*"))
                      if f.is_file()]
    return "\n".join(texts)


# --- a user, and a run held at a fault point ----------------------------------------------------


@dataclass
class Poller:
    """A user: GET /version through Caddy every 10 ms on a kept-alive connection."""

    env: Environment
    seen: list[tuple[float, str | None, str | None]] = field(default_factory=list)
    failures: list[tuple[float, str]] = field(default_factory=list)
    resets: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _get(self, client: httpx.Client) -> httpx.Response:
        url = f"{self.env.caddy.proxy_url}/version"
        try:
            return client.get(url)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
            self.resets += 1  # a kept-alive connection closed at a reload: retry once
            return client.get(url, headers={"Connection": "close"})

    def run(self) -> None:
        with drill_http.client(timeout=3) as client:
            while not self._stop.is_set():
                now = time.time()  # when the request started
                try:
                    response = self._get(client)
                except httpx.HTTPError as exc:
                    self.failures.append((now, f"{type(exc).__name__}"))
                else:
                    if response.status_code != 200:
                        self.failures.append((now, f"HTTP {response.status_code}"))
                    else:
                        self.seen.append((now, response.headers.get("X-Togather-Slot"),
                                          response.json().get("version")))
                self._stop.wait(0.01)

    def __enter__(self) -> Poller:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=10)


def wait_stopped(pid: int, timeout: float = 60) -> None:
    """Until the process is stopped (a drill fault point's SIGSTOP reached)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        if stat[0] == "T":
            return
        if stat[0] in ("Z", "X"):
            raise AssertionError("the run ended before it reached the fault point")
        time.sleep(0.02)
    raise AssertionError("the run never reached the fault point")


# --- a real full disk ------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: str, *, inodes: int | None = None) -> Iterator[Path]:
    """A tmpfs of `size` (and at most `inodes` files) mounted at `where` (skipped, saying why,
    where mounting needs a root this run does not have)."""
    where.mkdir()
    options = f"size={size},mode=0700" + (f",nr_inodes={inodes}" if inodes else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], capture_output=True, check=False)


def use_up_inodes(where: Path) -> None:
    """Create empty files in `where/fillers` until the filesystem has no inode left."""
    (where / "fillers").mkdir()
    with contextlib.suppress(OSError):
        for n in range(1_000_000):
            (where / "fillers" / str(n)).touch()


def fill(where: Path) -> None:
    """Write `where/filler` until the filesystem refuses: whole pages, then single bytes."""
    fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


# --- the session drill stack -------------------------------------------------------------------


@pytest.fixture
def stack(drill_stack: DrillStack) -> Iterator[DrillStack]:
    """The session stack, reset to its baseline first (v1 on blue serving, green running v1,
    schema 1). Nothing resets after: every user of the stack resets before it."""
    drill_stack.reset()
    yield drill_stack


@pytest.fixture(scope="module")
def baseline_stack(drill_stack: DrillStack) -> Iterator[DrillStack]:
    """For a module of read-only checks of the baseline: one reset for the whole module."""
    drill_stack.reset()
    yield drill_stack


@pytest.fixture
def scene_stack(drill_stack: DrillStack) -> DrillStack:
    """The session stack as the last test left it, for tests that begin by arranging their
    own scene (`two_deployments`, `migrated`, `DrillStack.arrange`, or `reset()`): a reset
    first would be undone straight away."""
    return drill_stack


def two_deployments(stack: DrillStack, **env_changes: object) -> Environment:
    """What v1 -> v2 (green, schema 2) -> v3 (blue, no new migration) leave: v3 serves and v2
    is the previous deployment, so rolling back v3 -> v2 is schema-safe. Arranged as a drill
    scene (scenes.PREVIOUS, proved from Docker, Caddy, the proxy and Postgres), not by
    deploying: tests/test_rollback.py proves the deploys themselves. Returns the environment
    to use (with `env_changes`; stop_old_slot=False leaves v2 running, as such a deploy
    would)."""
    running = env_changes.get("stop_old_slot") is False
    stack.arrange(scenes.PREVIOUS_RUNNING if running else scenes.PREVIOUS)
    return stack.env.with_(**env_changes) if env_changes else stack.env


def caddy_reload_through(env: Environment, folder: Path, first: str) -> Path:
    """An environment file (in `folder`, returned) for `env` with reload = caddy-reload and
    [caddy] command a stand-in script that runs the shell line `first` (Caddy's arguments are
    its $1, $2, ...), then Caddy's own command: to see, or hold, each `caddy` a run starts."""
    from runbook import environment as envmod

    wrapper = folder / "caddy"
    wrapper.write_text(f'#!/bin/sh\n{first}\nexec {" ".join(env.caddy.command)} "$@"\n')
    wrapper.chmod(0o755)
    source = folder / "environment.toml"
    source.write_text(envmod.to_toml(env.with_(caddy=dataclasses.replace(
        env.caddy, reload=envmod.ReloadMethod.CADDY_RELOAD, command=(str(wrapper),)),
        source=source)))
    return source


def migrated(stack: DrillStack) -> Environment:
    """What deploying v2 over the baseline leaves (a pre-deploy snapshot at schema 1, then
    its migration to 2): v2 serves from green, v1 is the previous, stopped on blue."""
    stack.arrange(scenes.MIGRATED)
    return stack.env


# --- a database owned by a role that is no superuser ----------------------------------------


@contextlib.contextmanager
def owned_by_a_role(stack: DrillStack, monkeypatch: pytest.MonkeyPatch, role: str,
                    ) -> Iterator[Environment]:
    """The drill database, its public schema and tables owned by `role`, a login role that is
    no superuser, and the environment's DATABASE_URL naming it (the process's, from the
    same host as the stack's own): a host whose app user owns its schema. The stack's owner
    (a superuser) gets everything back after, and the role is dropped."""
    import re
    import secrets

    from psycopg import sql

    from runbook import database
    from runbook.drill.stack import DB_NAME, DB_USER

    password = f"Own3r{secrets.token_hex(6)}"
    who = sql.Identifier(role)
    with stack.connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER PASSWORD {}").format(
            who, sql.Literal(password)))
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            sql.Identifier(DB_NAME), who))
        conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(who))
        for (table,) in conn.execute("SELECT tablename FROM pg_tables "
                                     "WHERE schemaname = 'public'").fetchall():
            conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                sql.Identifier("public", table), who))  # its serial sequences follow
    url = re.sub(r"//[^@/]*@", f"//{role}:{password}@", database.url(stack.env), count=1)
    monkeypatch.setenv(stack.env.database.url_variable, url)
    try:
        yield stack.env.with_(database=dataclasses.replace(stack.env.database, env_file=None))
    finally:
        monkeypatch.delenv(stack.env.database.url_variable)
        with stack.connect() as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(DB_NAME), sql.Identifier(DB_USER)))
            conn.execute(sql.SQL("REASSIGN OWNED BY {} TO {}").format(
                who, sql.Identifier(DB_USER)))
            conn.execute(sql.SQL("DROP OWNED BY {}").format(who))
            conn.execute(sql.SQL("DROP ROLE {}").format(who))


@contextlib.contextmanager
def reporting_schema(stack: DrillStack, role: str) -> Iterator[None]:
    """A DBA's schema beside the app's, owned by the stack's superuser, readable by `role`
    (so its snapshots can dump it); dropped after (the stack's reset drops only public)."""
    with stack.connect() as conn:
        conn.execute("CREATE SCHEMA reporting; CREATE TABLE reporting.daily (d date)")
        conn.execute(f"GRANT USAGE ON SCHEMA reporting TO {role}; "
                     f"GRANT SELECT ON reporting.daily TO {role}")
    try:
        yield
    finally:
        with stack.connect() as conn:
            conn.execute("DROP SCHEMA IF EXISTS reporting CASCADE")


# --- a build under another name (a moving tag) -------------------------------------------


def retag(stack: DrillStack, request: pytest.FixtureRequest, image: str, repo: str,
          tag: str | None = None) -> str:
    """`image`'s build under another name (`<repo>-<random>:<its tag>`, as `docker tag` or the
    Go CLI's docker_image give it one; `tag`: another tag, e.g. `latest`), untagged at the
    test's end. The repository is the test's own: other runs on this Docker never see it."""
    import secrets

    name = f"{repo}-{secrets.token_hex(3)}:{tag or image.rsplit(':', 1)[1]}"
    stack.docker("tag", image, name)
    request.addfinalizer(lambda: stack.docker("image", "rm", name, check=False))
    return name


def compose_naming(env: Environment, tmp_path: Path, image: str, *,
                   literal: bool = False) -> Environment:
    """The environment with a copy of the drill's compose file whose slots' `image:` is
    `<image's repository>:${IMAGE_TAG}` (a host whose compose file names another repository
    than [compose] image_repository or the state file's docker_image); `literal`: `image`
    itself, whatever IMAGE_TAG says (a file naming `:latest`)."""
    from runbook.drill.stack import COMPOSE_FILE

    text = COMPOSE_FILE.read_text()
    assert "image: togather-server:${IMAGE_TAG}" in text
    copy = tmp_path / "docker-compose.blue-green.yml"
    named = image if literal else f"{image.rsplit(':', 1)[0]}:${{IMAGE_TAG}}"
    copy.write_text(text.replace("image: togather-server:${IMAGE_TAG}", f"image: {named}"))
    return env.with_(compose=dataclasses.replace(env.compose, file=copy))



def running_from(env: Environment, tmp_path: Path, slot: Slot, image: str, *,
                 healthy: bool = True) -> None:
    """The slot's container made anew through compose from `image` (a name whose tag is no
    version, e.g. `:latest`), running, as another tool's deploy leaves it: answering healthy
    on /health (a check right after `up` saw "health unreachable" and Caddy's 502 while the
    app still started). `healthy` False: a build that rejects the schema (503) is not waited
    for (the caller waits for its answer)."""
    from runbook import compose, health

    where = tmp_path / f"made-{slot}"
    where.mkdir(parents=True)
    compose.run(compose.recreate_slot(compose_naming(env, where, image, literal=True), slot,
                                      "latest"))
    info = docker.inspect(env.slot(slot).container)
    assert (info.image, info.running) == (image, True), info
    if healthy:
        health.wait_healthy(env, slot, timeout=30)

# --- hosts without Docker ---------------------------------------------------------------------


def host_env(tmp_path: Path, *, name: str = "production", stale: float = 1800.0) -> Environment:
    """A host's environment whose files (state, lock, logs, run records) all live under
    `tmp_path`, for tests of the file formats and the lock that need no container."""
    return from_mapping({
        "name": name,
        "state": {"file": str(tmp_path / "state" / "deployment-state.json")},
        "lock": {"dir": str(tmp_path / "locks"), "stale_after_seconds": stale},
        "logs": {"dir": str(tmp_path / "logs"), "runs_dir": str(tmp_path / "runs")},
        "slots": {
            "blue": {"container": "togather-server-blue", "service": "togather-blue", "port": 8081},
            "green": {"container": "togather-server-green", "service": "togather-green",
                      "port": 8082},
        },
    }, tmp_path / "env.toml")


# the keys of the Go CLI's state structs: a rewrite by it keeps only these (CONTRACTS.md)
GO_CLI_DEPLOYMENT_KEYS = ("version", "deployed_at", "git_commit", "docker_image", "slot",
                          "deployed_by", "snapshot_path", "rollback", "rollback_id")


def _through_go_struct(dep: Any) -> Any:
    """One deployment as the Go CLI writes it back: only its struct's keys (no `id`, no
    `status`, `slot` for `active_slot`), its times in RFC3339Nano (trailing zeros trimmed)."""
    if not isinstance(dep, dict):
        return dep
    out = {k: v for k, v in dep.items() if k in GO_CLI_DEPLOYMENT_KEYS}
    out.setdefault("slot", dep.get("active_slot", ""))
    # RFC3339Nano: the fraction's trailing zeros trimmed, the offset kept as read (found
    # by review: an offset time became `...10293-05:Z`)
    when = re.fullmatch(r"(?P<head>[^.]+?)(?:\.(?P<frac>\d+))?(?P<zone>Z|[+-]\d\d:\d\d)",
                        str(dep["deployed_at"]))
    assert when is not None, dep["deployed_at"]
    frac = (when["frac"] or "").rstrip("0")
    out["deployed_at"] = f"{when['head']}{'.' + frac if frac else ''}{when['zone']}"
    return out


def _go_rewrite(doc: dict[str, Any]) -> None:
    for key in ("current_deployment", "previous_deployment"):
        doc[key] = _through_go_struct(doc.get(key))
    doc["deployment_history"] = [_through_go_struct(d) for d in doc.get("deployment_history")
                                 or []]


_GO_LOCK_RELEASED = {"locked": False, "locked_at": "0001-01-01T00:00:00Z",
                     "expires_at": "0001-01-01T00:00:00Z"}


def go_cli_takes_and_releases_the_lock(state_file: Path) -> None:
    """What the Go CLI leaves after a run that changes no deployment (it takes the state
    file's lock and releases it): two rewrites through its structs, which have no `id`, no
    `active_slot`, none of another tool's keys, its times in RFC3339Nano (trailing zeros
    trimmed), its lock zeroed when released."""
    doc = json.loads(state_file.read_text())
    _go_rewrite(doc)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 600))
    doc["lock"] = {"locked": True, "locked_by": "ci@build-runner", "locked_at": now,
                   "expires_at": later, "reason": "status check"}
    state_file.write_text(json.dumps(doc, indent=2))
    doc["lock"] = dict(_GO_LOCK_RELEASED)
    state_file.write_text(json.dumps(doc, indent=2))


def go_cli_rollback(state_file: Path) -> None:
    """The Go CLI's `rollback` (CONTRACTS.md): it swaps current and previous in the state
    file and does nothing else (no container, no Caddy, no lock taken), the file rewritten
    through its structs (as go_cli_takes_and_releases_the_lock), its lock zeroed."""
    doc = json.loads(state_file.read_text())
    doc["current_deployment"], doc["previous_deployment"] = (doc.get("previous_deployment"),
                                                             doc.get("current_deployment"))
    _go_rewrite(doc)
    doc["lock"] = dict(_GO_LOCK_RELEASED)
    state_file.write_text(json.dumps(doc, indent=2))


def v3_recorded_and_checked(env: Environment, served_on: int) -> None:
    """v3, moved off, holds the schema it served on (the current's record none), and a
    dry run of `rollback --to v3` finds the schema guard compatible from the file, never
    "NOT checked", changing nothing."""
    doc = json.loads(env.state_file.read_text())
    v3 = doc["previous_deployment"]
    assert (v3["version"], v3["status"]) == (VERSIONS["v3"].tag, "rolled_back"), v3
    assert v3["migration_version"] == served_on, v3
    assert "migration_version" not in doc["current_deployment"], doc["current_deployment"]
    before = snapshot(env)
    again = runbook_cli(env, "rollback", "--to", VERSIONS["v3"].tag, "--dry-run")
    said = again.stdout + again.stderr
    assert again.returncode == 0, said
    assert "NOT checked" not in said and "--restore-snapshot" not in said, said
    assert "compatible" in said and f"{served_on} (from the state file)" in said, said
    assert snapshot(env) == before


def closed_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    return closed_ports(1)[0]


def closed_ports(count: int) -> list[int]:
    """`count` different loopback ports where nothing listens (bound together, released)."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]



@dataclass
class TimedReadings:
    """The drain's real `ss` readings (drain.read_sockets, passed as its `read`), each timed
    by the test's clock, so that a test can say "the drain ended with the first reading that
    could see X" in readings, not in seconds: one `ss` took 0.01-2.2 s on a loaded 2-core
    host, and a bound in seconds failed there with the drain right. `first` is set once a
    good reading was taken: a peer that must be seen by the drain acts only after it."""

    spans: list[tuple[float, float]] = field(default_factory=list)  # (began, ended)
    first: threading.Event = field(default_factory=threading.Event)
    last: drain.Look | drain.Unread | None = None  # for a failure's message

    def read(self, port: int, front: int | None) -> drain.Look | drain.Unread:
        began = time.monotonic()
        seen = self.last = drain.read_sockets(port, front)
        self.spans.append((began, time.monotonic()))
        if isinstance(seen, drain.Look):
            self.first.set()
        return seen

    def begun_after(self, moment: float) -> int:
        """How many readings began at or after `moment`."""
        return sum(1 for began, _ in self.spans if began >= moment)

    def first_ended_after(self, moment: float) -> float | None:
        """When the first reading begun at or after `moment` ended (it saw all that happened
        before `moment`); None if the drain took none."""
        return next((ended for began, ended in self.spans if began >= moment), None)


@contextlib.contextmanager
def fifo_released_after(fifo: Path, seconds: float) -> Iterator[None]:
    """A reader that opened `fifo` and waits there for a writer gets its end of file after
    `seconds`: a test of a reader that would hang on it fails instead of hanging the suite."""
    done = threading.Event()

    def release() -> None:
        while not done.wait(seconds):
            with contextlib.suppress(OSError):  # ENXIO: nobody reads it (yet)
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    helper = threading.Thread(target=release, daemon=True)
    helper.start()
    try:
        yield
    finally:
        done.set()
        helper.join()

# --- another user writes a file (real uids; needs root) ---------------------------------------

# A state file on a host: owned by one user, shared with the deploy group (1001:1002, 0660),
# rewritten by another member of that group who is not root (uid 1000).
DEPLOY_UID, OWNER_UID, SHARED_GID = 1000, 1001, 1002
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving a file to uid 1001 and writing it as uid 1000 needs root "
    "(CI runs the tests as root)")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory uid 1000 can reach and write (pytest's tmp_path is under a 0700 root one),
    without the setgid bit, so a new file there gets its writer's own group."""
    base = Path(tempfile.mkdtemp(prefix="runbook-owner-"))
    try:
        base.chmod(0o777)
        yield base
    finally:
        shutil.rmtree(base)


# for as_deploy_user's `imports`: `attempt(act)` gives ['done', what act returned] or
# [exit code, message, fix] for a RunbookError, as JSON prints it
ATTEMPT = ("from runbook.errors import RunbookError\n"
           "def attempt(act):\n"
           "    try:\n"
           "        return ['done', act()]\n"
           "    except RunbookError as exc:\n"
           "        return [int(exc.exit_code), exc.message, exc.fix]\n")


def as_deploy_user(groups: list[int], imports: str, code: str, *args: str) -> str:
    """Run `imports` as root, then `code` as uid/gid 1000 with these supplementary groups, in
    a child process; its stdout. Python itself may not be readable by uid 1000 (CI's lives
    under /root), so `imports` loads everything `code` needs, lazily loaded codecs too."""
    drop = (f"import os\nos.setgroups({groups!r}); os.setgid({DEPLOY_UID}); "
            f"os.setuid({DEPLOY_UID})\n")
    proc = subprocess.run([sys.executable, "-c", imports + drop + code, *args], cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def pytest_with_report(work: Path, test_file: str, *extra: str
                       ) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run a small pytest-bdd project in `work` with the drill report plugin (`--report`),
    as its own process, this repository importable: (the process, the report directory)."""
    out = work / "report"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "steps.report_plugin", "-p", "no:cacheprovider",
         "--rootdir", str(work), "-q", "--report", str(out), *extra, test_file],
        cwd=work, env=env, capture_output=True, text=True, timeout=120, check=False)
    return proc, out


@contextlib.contextmanager
def serving(code: int, body: bytes, content_type: str = "application/json"
            ) -> Iterator[int]:
    """A real HTTP server on loopback answering every GET with `code` and `body`: an app, or
    something that is not the engine or app it is taken for. Yields its port."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def docker_context(config_dir: Path, name: str, host: str, *, tls: bool = False) -> None:
    """A docker CLI context in `config_dir` (DOCKER_CONFIG) as `docker context create` leaves
    it, made current as `docker context use` does."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    meta = config_dir / "contexts" / "meta" / digest
    meta.mkdir(parents=True)
    (meta / "meta.json").write_text(json.dumps(
        {"Name": name, "Endpoints": {"docker": {"Host": host, "SkipTLSVerify": False}}}))
    if tls:
        (config_dir / "contexts" / "tls" / digest / "docker").mkdir(parents=True)
    (config_dir / "config.json").write_text(json.dumps({"currentContext": name}))


class _Counted:
    """A file opened by the code under test, adding what it reads to its entry."""

    def __init__(self, raw: Any, reads: list[int]) -> None:
        self.raw, self.reads, self.index = raw, reads, len(reads)
        reads.append(0)

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.raw.read(n)
        self.reads[self.index] += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    def __enter__(self) -> _Counted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.close()


@pytest.fixture
def read_bytes(monkeypatch: pytest.MonkeyPatch) -> dict[Path, list[int]]:
    """For each `.sql.gz` opened for reading (builtins.open: gzip's own too), the bytes read
    through each opening, in order."""
    import builtins

    real = builtins.open
    read: dict[Path, list[int]] = {}

    def counting(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        opened = real(file, mode, *args, **kwargs)
        if isinstance(file, str | Path) and str(file).endswith(".sql.gz") and mode in ("r",
                                                                                       "rb"):
            return _Counted(opened, read.setdefault(Path(file), []))
        return opened

    monkeypatch.setattr(builtins, "open", counting)
    return read


def settled(path: Path, age: float = 2.2) -> None:
    """Wait until the file last changed `age` seconds ago, as a host's pre-deploy dump did
    (minutes or days): what a read of a file changed within runbook.snapshots.verify.RACY
    (2 s) found is never remembered, so it is read again on every call."""
    st = path.stat()
    last = max(st.st_mtime_ns, st.st_ctime_ns) / 1e9
    time.sleep(max(0.0, last + age - time.time()))


@functools.cache
def bridge_gateway() -> str:
    """Where `host.docker.internal:host-gateway` leads (Docker's bridge gateway), as a
    container Docker starts with it resolves the name: the engine's own answer, not its
    network's IPAM record (which names no Gateway where the engine adopted a docker0
    already up, as on a fresh VM)."""
    done = subprocess.run(["docker", "run", "--rm", "--network", "bridge", "--add-host",
                           "gw.test:host-gateway", "--entrypoint", "getent", images.LOCAL_POSTGRES,
                           "ahostsv4", "gw.test"], check=True, capture_output=True, text=True)
    return done.stdout.split()[0]


def rebuilt_as(stack: DrillStack, tag: str, base: str, revision: str | None = None) -> str:
    """A build of `base` that answers as version `tag` (`togather-server:<tag>`), as a
    rebuild from other code under the same APP_VERSION leaves it; returns its image id. It
    keeps `base`'s org.opencontainers.image.revision label, unless `revision` names another
    (`unknown`: a build that names no commit, as the upstream Dockerfile's default)."""
    moved = f"{stack.env.compose.image_repository}:{tag}"
    label = (f"LABEL {docker.REVISION_LABEL}={revision}\n" if revision is not None else "")
    subprocess.run(["docker", "build", "-q", "-t", moved, "-"], text=True,
                   input=f"FROM {base}\nENV APP_VERSION={tag}\n{label}", capture_output=True,
                   check=True, timeout=300)
    return docker.image_id(moved) or ""
