"""The drill fleet (issue 13): several "hosts" on this one machine, reached over real SSH.

A host here is its own drill slots + Caddy (the drill stack's pieces, runbook/drill/stack.py),
its own environment file and state file, and its own `sshd` on a loopback port. The hosts
share the filesystem, so what makes `runbook` on the far side of host N act on host N is
that sshd's `SetEnv RUNBOOK_CONFIG=<host N's environment.toml>`, the way a real host has its
own /etc/togather-runbook/<env>.toml. One Postgres (the first host's) serves every host.

SSH is real and strict: generated host keys, a generated client key, a known_hosts file and
an ssh_config with StrictHostKeyChecking yes, all in the fleet's temp directory; sshd listens
on 127.0.0.1 only. Every container carries the drill's run label (cleanup by label).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from runbook.drill import images
from runbook.drill.stack import DrillError, DrillStack, _last_line, pick_ports, ports_claim, sweep
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment

FLEET_COMPOSE = Path(__file__).resolve().parent / "fleet-compose.yml"
SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def find_sshd() -> str:
    """The OpenSSH server binary, or a one-line error naming the setup script."""
    found = shutil.which("sshd") or next((p for p in SSHD_CANDIDATES if os.access(p, os.X_OK)),
                                         None)
    if not found:
        raise DrillError("sshd (OpenSSH server) is not installed: the drill fleet needs it",
                         "run scripts/ensure-sshd.sh (make setup does)")
    return found


def held_reached(gate: Path) -> Path:
    """The file a `DrillFleet.held_command` touches once its command is held at `gate`."""
    return gate.with_name(gate.name + ".reached")


@dataclass
class FleetHostStack(DrillStack):
    """A drill stack without a database of its own: its slots use `shared`'s Postgres."""

    shared: DrillStack | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        assert self.shared is not None
        self.password = self.shared.password
        self.ports.postgres = self.shared.ports.postgres

    @property
    def db_container(self) -> str:
        assert self.shared is not None
        return self.shared.db_container

    def _write_files(self, image_set: images.ImageSet) -> None:
        super()._write_files(image_set)
        assert self.shared is not None
        with self.env_file.open("a") as fh:
            fh.write(f"SHARED_NETWORK={self.shared.project}_default\n")
        self.env = self.env.with_(compose=dataclasses.replace(self.env.compose,
                                                              file=FLEET_COMPOSE))
        from runbook import environment as envmod

        assert self.env.source is not None
        self.env.source.write_text(envmod.to_toml(self.env))

    def start(self, on_up: Callable[[], object] | None = None) -> FleetHostStack:
        image_set = images.require([self.base_version])
        assert self.shared is not None
        try:
            with ports_claim():  # see there: Caddy's ports, picked again and held until bound
                self.ports = dataclasses.replace(pick_ports(),
                                                 postgres=self.shared.ports.postgres)
                self._write_files(image_set)
                proc = subprocess.run(
                    ["docker", "compose", "-f", str(FLEET_COMPOSE), "--env-file",
                     str(self.env_file), "up", "-d", "--wait"],
                    capture_output=True, text=True, check=False, timeout=120)
                if proc.returncode != 0:
                    raise DrillError(f"fleet host {self.run_id} did not start: "
                                     f"{_last_line(proc.stderr)}", "see `docker compose logs`")
                self.wait_caddy()
            if on_up is not None:  # as DrillStack.start's
                on_up()
            from runbook import health
            from runbook.environment import Slot

            health.wait_healthy(self.env, Slot.BLUE, timeout=30)  # serving, as after a deploy
            self.write_baseline_state()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        sweep(self.run_id)
        if not self.keep_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


@dataclass
class FleetHost:
    """One host of the drill fleet: its name in the inventory, its stack, its sshd port."""

    name: str
    stack: DrillStack
    port: int
    sshd: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> Environment:
        return self.stack.env


@dataclass
class _HostScene:
    """What a deploy left on one host (`DrillFleet._as_deployed`): the files it wrote (state,
    Caddyfile, pre-deploy snapshot) byte for byte; the containers are found by their images."""

    state: bytes
    caddyfile: bytes
    snapshots: dict[str, bytes]

    @classmethod
    def record(cls, h: FleetHost) -> _HostScene:
        snap_dir = h.env.database.snapshot_dir
        return cls(h.env.state_file.read_bytes(), h.env.caddy.caddyfile.read_bytes(),
                   {p.name: p.read_bytes() for p in sorted(snap_dir.iterdir()) if p.is_file()})

    def put_back(self, h: FleetHost) -> None:
        """This host as right after the deploy: locks, intents, journals and leftovers gone,
        the new slot started and healthy, the recorded Caddyfile loaded, the old slot
        stopped, the recorded state and snapshot files in place."""
        from runbook import docker, files, health
        from runbook.drill import http as drill_http
        from runbook.environment import Slot
        from runbook.fleet import hostlock

        env, stack = h.env, h.stack
        for lock in (env.lock_path, hostlock.path(env)):
            shutil.rmtree(lock, ignore_errors=True)
        for sub in ("logs", "runs"):
            shutil.rmtree(stack.run_dir / sub, ignore_errors=True)
            (stack.run_dir / sub).mkdir()
        for directory, keep in ((env.state_file.parent, {env.state_file.name}),
                                (env.caddy.caddyfile.parent, {env.caddy.caddyfile.name}),
                                (env.database.snapshot_dir, set(self.snapshots))):
            for leftover in directory.iterdir():  # intents, temp files, safety snapshots
                if leftover.name not in keep:
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        for name, data in self.snapshots.items():
            target = env.database.snapshot_dir / name
            if not target.exists() or target.read_bytes() != data:
                files.atomic_write(target, data)
        if not docker.inspect(stack.caddy_container).running:
            docker.start(stack.caddy_container)
            stack.wait_caddy()
        green = env.slot(Slot.GREEN).container
        if not docker.inspect(green).running:
            docker.start(green)
        health.wait_healthy(env, Slot.GREEN, timeout=30)
        files.atomic_write(env.caddy.caddyfile, self.caddyfile)
        drill_http.post(f"{env.caddy.admin_url}/load", content=self.caddyfile,
                        headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()
        blue = env.slot(Slot.BLUE).container
        if docker.inspect(blue).running:
            docker.stop(blue)
        files.atomic_write(env.state_file, self.state)


@dataclass
class _Scene:
    version: str
    hosts: dict[str, _HostScene]
    database: str  # the shared database's content right after the scene was made


@dataclass
class DrillFleet:
    """N hosts (>= 3), the first one canary; one shared Postgres; real sshd on loopback."""

    size: int = 3
    canary: int = 1
    base: str = "v2"  # each host starts on this version (v2 and v3 share schema 2)
    run_id: str = field(default_factory=lambda: os.urandom(3).hex())
    hosts: list[FleetHost] = field(default_factory=list)
    dir: Path = field(init=False)
    _scene: _Scene | None = field(init=False, default=None)  # see on_new_deployment
    _fresh: bool = field(init=False, default=True)  # as started: every host on its baseline

    def __post_init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"togather-fleet-{self.run_id}-"))
        (self.dir / "owner").write_text(str(os.getpid()))  # for `make clean-drills`

    # -- files -----------------------------------------------------------------------------
    @property
    def ssh_dir(self) -> Path:
        return self.dir / "ssh"

    @property
    def ssh_config(self) -> Path:
        return self.ssh_dir / "ssh_config"

    @property
    def inventory(self) -> Path:
        return self.dir / "inventory.yml"

    @property
    def runbook_command(self) -> str:
        """`runbook` on every host: this venv's executable (the hosts share the filesystem)."""
        return str(Path(sys.executable).with_name("runbook"))

    def host(self, name: str) -> FleetHost:
        return next(h for h in self.hosts if h.name == name)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> DrillFleet:
        sshd = find_sshd()
        try:
            base = VERSIONS[self.base]
            first = DrillStack(run_id=f"{self.run_id}h1", base_version=base)
            started: list[Future[FleetHostStack]] = []
            with ThreadPoolExecutor(max_workers=max(self.size - 1, 1)) as pool:

                def others() -> None:
                    # host1's containers are up (its network, its Postgres's port): the other
                    # hosts (independent of each other) start while host1 waits for its
                    # database and migrates it (start 8.3 s -> 5.8 s, 3 runs each); their slots only
                    # need the database by their health gate, as host1's own slots do
                    self.hosts.append(FleetHost("host1", first, _free_port()))
                    rest = [FleetHostStack(run_id=f"{self.run_id}h{i}", shared=first,
                                           base_version=base) for i in range(2, self.size + 1)]
                    self.hosts.extend(FleetHost(f"host{i}", stack, _free_port())
                                      for i, stack in enumerate(rest, start=2))
                    started.extend(pool.submit(stack.start) for stack in rest)

                first.start(on_up=others)  # a failure: the pool's end waits for the others
                for done in started:
                    done.result()
            self._keys()
            for h in self.hosts:
                for attempt in range(3):  # a port taken meanwhile by another listener: anew
                    try:
                        self._start_sshd(sshd, h)
                        break
                    except DrillError:
                        if attempt == 2:
                            raise
                        h.port = _free_port()
            self._ssh_files()
            self.write_inventory()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # Ansible's ControlPersist masters (per fleet, in dir/cp): closing them ends their
        # sshd connection processes, which outlive the listener otherwise.
        for sock in (self.dir / "cp").glob("*"):
            subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={sock}", "drill-fleet"],
                           capture_output=True, check=False, timeout=10)
        for h in self.hosts:
            if h.sshd is not None:
                # its own session: the listener and every connection it forked (the
                # connections Ansible keeps open with ControlPersist end with it)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(h.sshd.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    h.sshd.wait(timeout=5)
        for h in reversed(self.hosts):  # the shared database's host last
            h.stack.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DrillFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Every host back to its baseline (v1 on blue, recorded); the shared schema reset once."""
        first, *rest = self.hosts
        first.stack.reset()
        for h in rest:
            h.stack.reset()
        self._fresh = True

    def on_new_deployment(self, version: str) -> str:
        """Every host serving `version`, its previous deployment the base version, exactly as
        `runbook deploy` left it; returns how: "made" or "arranged".

        The first time (and whenever a host's slots no longer hold the two images) each host
        is made so from its baseline (`_as_deployed`: the deploy's own steps, without the
        deploy process), and what that left is recorded (each state file, Caddyfile and
        snapshot directory, the database's content). Later
        scenarios get that scene back with the cheapest real operations: start the new slot,
        its health gate, the recorded Caddyfile written and loaded, the old slot stopped, the
        recorded files put back; the shared database rebuilt only when its content (schema,
        rows, sequences) differs from the recorded one. Seconds instead of a reset and a
        new scene.
        """
        if self._scene is not None and self._scene.version == version and self._arrange():
            return "arranged"
        if not self._fresh:
            self.reset()
        self._fresh = False
        with ThreadPoolExecutor(max_workers=len(self.hosts)) as pool:  # independent hosts
            for done in [pool.submit(self._as_deployed, h, version) for h in self.hosts]:
                done.result()
        self._scene = _Scene(version, {h.name: _HostScene.record(h) for h in self.hosts},
                             self._database_content())
        return "made"

    def _as_deployed(self, h: FleetHost, version: str) -> None:
        """Host `h`, on its baseline (the base version on blue, recorded), as `runbook deploy
        --version <version>` leaves it, made with the deploy's own library calls in its order:
        the standby slot recreated on the new image (`compose.recreate_slot`) and health-gated,
        the pre-deploy snapshot (`snapshots.pre_deploy_snapshot`, each host its own, as each
        host's deploy takes one), the Caddyfile switched and loaded, the old slot stopped, the
        new deployment recorded as deploy records it (the schema is unchanged: v2 and v3 share
        it, so there is nothing to migrate). Spares 3 `runbook deploy` processes (each a drain
        wait and the CLI start) on the first scene: 9-29 s on this machine; the rollbacks the
        scenarios prove stay real."""
        from runbook import compose, docker, files, health, recording, snapshots
        from runbook import state as states
        from runbook.drill import http as drill_http
        from runbook.environment import Slot

        env, stack, new = h.env, h.stack, VERSIONS[version]
        compose.run(compose.recreate_slot(env, Slot.GREEN, new.tag))
        health.wait_healthy(env, Slot.GREEN, timeout=30)
        deployment_id = states.new_id("dep")
        schema = recording.schema(env)
        snap = snapshots.pre_deploy_snapshot(env, deployment_id, new.git_commit, schema)
        text = stack.caddyfile_text(Slot.GREEN).encode()
        files.atomic_write(env.caddy.caddyfile, text)
        drill_http.post(f"{env.caddy.admin_url}/load", content=text,
                        headers={"Content-Type": "text/caddyfile"}, timeout=10).raise_for_status()
        docker.stop(env.slot(Slot.BLUE).container)
        fresh = recording.load_or_empty(env)
        dep = states.make_deployment(new.tag, new.git_commit, Slot.GREEN,
                                     migration_version=schema, image=new.image,
                                     status="active", deployment_id=deployment_id)
        dep = dep.with_(health_status="healthy", migrations_run=int(bool(env.migrate_command)),
                        extra={"snapshot_path": str(snap.path)})
        states.write_state(env.state_file, states.after_deploy(fresh, dep))

    def _database_content(self) -> str:
        """The shared database's content, as Postgres reads it: every public table's columns
        and rows (md5 of the sorted rows) and every sequence's value. Equal before and after
        a scenario proves nothing was written that the next one could see (a WAL position
        also moves on a checkpoint or an autovacuum, which would cost a rebuild each time)."""
        with self.hosts[0].stack.connect() as conn:
            tables = [str(r[0]) for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
            parts = [str(conn.execute(
                "SELECT string_agg(table_name || '.' || column_name || ' ' || data_type, ',' "
                "ORDER BY table_name, ordinal_position) FROM information_schema.columns "
                "WHERE table_schema = 'public'").fetchone())]
            for table in tables:
                ident = '"' + table.replace('"', '""') + '"'
                row = conn.execute(f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' "
                                   f"ORDER BY t::text), '')) FROM public.{ident} t").fetchone()
                parts.append(f"{table}={row}")
            row = conn.execute("SELECT string_agg(sequencename || '=' || coalesce("
                               "last_value::text, '-'), ',' ORDER BY sequencename) "
                               "FROM pg_sequences WHERE schemaname = 'public'").fetchone()
            parts.append(str(row))
            return "\n".join(parts)

    def _arrange(self) -> bool:
        """Put the recorded scene back; False (nothing arranged) when a host's slots no longer
        hold the recorded images, so the caller makes the scene again."""
        from runbook import docker
        from runbook.environment import Slot

        assert self._scene is not None
        base, new = VERSIONS[self.base].image, VERSIONS[self._scene.version].image
        for h in self.hosts:
            images = {slot: docker.inspect(h.env.slot(slot).container) for slot in Slot}
            if (images[Slot.BLUE].image != base or images[Slot.GREEN].image != new
                    or not docker.inspect(h.stack.caddy_container).exists):
                return False
        if self._database_content() != self._scene.database:
            self._rebuild_database()  # first: a slot's health reads the schema
        with ThreadPoolExecutor(max_workers=len(self.hosts)) as pool:
            for done in [pool.submit(self._scene.hosts[h.name].put_back, h)
                         for h in self.hosts]:
                done.result()
        return True

    def _rebuild_database(self) -> None:
        """The shared schema dropped and migrated again by the new version's slot on the
        database's host (v3 ships the same migrations as v2: schema 2)."""
        from runbook import docker
        from runbook.environment import Slot

        first = self.hosts[0].stack
        green = first.env.slot(Slot.GREEN).container
        if not docker.inspect(green).running:
            docker.start(green)
        with first.connect() as conn:
            conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        first.migrate(Slot.GREEN)
        assert self._scene is not None
        self._scene.database = self._database_content()

    def serving(self, name: str) -> tuple[int, str | None, str | None]:
        """(status, X-Togather-Slot, version) through that host's Caddy, as its users see it."""
        import httpx

        from runbook.drill import http as drill_http

        try:
            with drill_http.client(timeout=3) as client:
                r = client.get(f"{self.host(name).env.caddy.proxy_url}/version",
                               headers={"Connection": "close"})
        except httpx.HTTPError:
            return 0, None, None
        try:
            version = r.json().get("version")
        except ValueError:
            version = None
        return r.status_code, r.headers.get("X-Togather-Slot"), version

    # -- ssh -------------------------------------------------------------------------------
    def _keys(self) -> None:
        self.ssh_dir.mkdir(mode=0o700)
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                            f"togather-fleet-{self.run_id}", "-f", str(self.ssh_dir / name)],
                           check=True, capture_output=True)
        shutil.copy(self.ssh_dir / "client_key.pub", self.ssh_dir / "authorized_keys")

    def _ssh_files(self) -> None:
        """known_hosts and ssh_config, once every sshd listens on its final port."""
        host_pub = (self.ssh_dir / "host_key.pub").read_text().split()
        lines = [f"[127.0.0.1]:{h.port} {host_pub[0]} {host_pub[1]}" for h in self.hosts]
        (self.ssh_dir / "known_hosts").write_text("\n".join(lines) + "\n")
        blocks = [f"Host {h.name}\n  HostName 127.0.0.1\n  Port {h.port}\n" for h in self.hosts]
        self.ssh_config.write_text(
            "".join(blocks)
            + f"Host *\n  User {_user()}\n  IdentityFile {self.ssh_dir / 'client_key'}\n"
            f"  IdentitiesOnly yes\n  UserKnownHostsFile {self.ssh_dir / 'known_hosts'}\n"
            "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n"
            "  PasswordAuthentication no\n  BatchMode yes\n  ConnectTimeout 5\n")

    def _start_sshd(self, sshd: str, h: FleetHost) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
        config = self.ssh_dir / f"sshd_config.{h.name}"
        assert h.env.source is not None
        config.write_text(
            f"ListenAddress 127.0.0.1:{h.port}\n"
            f"HostKey {self.ssh_dir / 'host_key'}\n"
            f"AuthorizedKeysFile {self.ssh_dir / 'authorized_keys'}\n"
            f"PidFile {self.ssh_dir / f'sshd.{h.name}.pid'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "MaxStartups 30:30:60\nLogLevel ERROR\n"
            # SHLVL=1: bash, as the login shell sshd runs each command with, sources ~/.bashrc
            # when run by sshd as a top-level shell; with SHLVL set it is not top-level. The
            # drill hosts share this machine's account, whose interactive set-up (here `pyenv
            # init`) is not a host's: it ran for every command Ansible sent (`ssh host true`
            # 0.29 s -> 0.22 s without it). The commands name `runbook` by its path and need
            # no PATH from it.
            f"SetEnv RUNBOOK_CONFIG={h.env.source} SHLVL=1\n")
        h.sshd = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)],
                                  stdout=subprocess.DEVNULL, start_new_session=True,
                                  stderr=(self.dir / f"sshd.{h.name}.log").open("wb"))
        (self.dir / f"sshd.{h.name}.pid").write_text(str(h.sshd.pid))
        deadline = time.monotonic() + 10
        while True:
            if h.sshd.poll() is None and _ssh_banner(h.port):
                return  # our sshd answers there (not something else that took the port)
            if h.sshd.poll() is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(h.sshd.pid, signal.SIGTERM)
                h.sshd.wait(timeout=5)
                log = (self.dir / f"sshd.{h.name}.log").read_text(errors="replace")
                raise DrillError(f"sshd of {h.name} did not start: {_last_line(log)}",
                                 "see scripts/ensure-sshd.sh")
            time.sleep(0.05)

    def cut_off_command(self, name: str, *on: str, after: bool = False,
                        silent: bool = False, skip: int = 0) -> str:
        """A `runbook_command` for host `name` that makes the host unreachable at one moment.

        It runs `runbook` as given, except `runbook <on...> ...`: there the host goes dark (its
        sshd stops listening, and the SSH connection that asked is cut: every sshd process
        above this command is killed, as a host that crashes or loses its network) before that
        command runs, or, with `after`, once it ran to its end but before it could answer (the
        controller never learns how it ended). `silent`: the host drops off the network
        without a word instead (no FIN, no RST: its sshd processes, the listener and this
        command are frozen with SIGSTOP, so the TCP connection stays open and nothing answers
        on it). `skip`: the first `skip` such commands run as usual (a count kept beside the
        script). `reachable_again` brings the host's sshd back (and ends the frozen ones).
        """
        h = self.host(name)
        script = self.dir / (f"cut-off.{name}.{'-'.join(on)}.{'after' if after else 'before'}"
                             + (".silent" if silent else "") + (f".skip{skip}" if skip else ""))
        count = script.with_name(script.name + ".count")
        count.unlink(missing_ok=True)
        script.write_text(f"""#!{sys.executable}
import os, signal, subprocess, sys
RUNBOOK, ON, AFTER = {self.runbook_command!r}, {list(on)!r}, {after!r}
SKIP, COUNT = {skip!r}, {str(count)!r}
argv = sys.argv[1:]
if argv[:len(ON)] != ON:
    os.execv(RUNBOOK, [RUNBOOK, *argv])
if SKIP:
    with open(COUNT, "a+") as f:
        f.seek(0)
        seen = len(f.read())
        f.write("x")
    if seen < SKIP:
        os.execv(RUNBOOK, [RUNBOOK, *argv])
if AFTER:
    subprocess.run([RUNBOOK, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
SILENT, FROZEN = {silent!r}, {str(self._frozen_file(name))!r}
LISTENER = {h.sshd.pid if h.sshd else 0}
if not LISTENER:
    sys.exit("no sshd")
above = []
pid = os.getppid()
while pid > 1:  # the connection that asked: every sshd process above this one
    with open(f"/proc/{{pid}}/stat") as f:
        stat = f.read()
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    parent = int(stat.rsplit(")", 1)[1].split()[1])
    if comm.startswith("sshd") and pid != LISTENER:
        above.append(pid)
    pid = parent
if not SILENT:
    os.kill(LISTENER, signal.SIGTERM)  # the listener: no new connection
    for pid in [*above, LISTENER]:
        os.kill(pid, signal.SIGKILL)
    sys.exit(0)
with open(FROZEN, "a") as f:  # for reachable_again, which ends them
    f.write("".join(f"{{pid}}\\n" for pid in [*above, os.getpid()]))
os.kill(LISTENER, signal.SIGSTOP)
for pid in above:
    os.kill(pid, signal.SIGSTOP)
os.kill(os.getpid(), signal.SIGSTOP)
""")
        script.chmod(0o755)
        return str(script)

    def kill_controller_command(self, name: str, pid_file: Path, *on: str,
                                recorded: tuple[Path, str] | None = None,
                                then_run: bool = False) -> str:
        """A `runbook_command` for host `name` that kills the fleet controller (kill -9, as a
        crash or a power loss of the operator's machine would) when `runbook <on...>` is asked
        for there, and then exits 1 without running it: the host is left as it was (with
        `then_run`, runs it: the host's command, already sent, outlives the controller). The
        controller's pid is read from `pid_file` (the test writes it once it started it).
        `recorded`: (a fleet journal folder, a host): the kill waits (up to 60 s) until that
        folder's journal holds the host's outcome. ansible-runner hands the controller a
        finished host's event on its own thread, which under load came after Ansible had
        started the next batch: the kill then landed before the outcome was journaled."""
        script = self.dir / f"kill-controller.{name}.{'-'.join(on)}"
        folder, host = (str(recorded[0]), recorded[1]) if recorded else (None, None)
        script.write_text(f"""#!{sys.executable}
import json, os, signal, sys, time
from pathlib import Path
RUNBOOK, ON = {self.runbook_command!r}, {list(on)!r}
argv = sys.argv[1:]
if argv[:len(ON)] != ON:
    os.execv(RUNBOOK, [RUNBOOK, *argv])
FOLDER, HOST = {folder!r}, {host!r}
deadline = time.monotonic() + 60
while FOLDER and time.monotonic() < deadline:
    try:
        said = [json.loads(p.read_text())["hosts"].get(HOST, {{}}).get("status")
                for p in Path(FOLDER).glob("fleet_*.json")]
    except (OSError, ValueError, KeyError):
        said = []
    if any(s not in (None, "started", "not started") for s in said):
        break
    time.sleep(0.05)
pid = int(Path({str(pid_file)!r}).read_text())
os.kill(pid, signal.SIGKILL)
for _ in range(100):  # until it is gone: nothing of this host's command runs before
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    time.sleep(0.05)
print("killed the fleet controller", file=sys.stderr)
if {then_run!r}:
    os.execv(RUNBOOK, [RUNBOOK, *argv])
sys.exit(1)
""")
        script.chmod(0o755)
        return str(script)

    def held_command(self, name: str, gate: Path, *on: str) -> str:
        """A `runbook_command` for host `name` that holds `runbook <on...>` there until the
        file `gate` appears (at most 120 s): "run" runs it, anything else exits 1 without
        running it (the host left as it was). Time to interrupt the controller mid-host; and,
        since `raw` has no tty, an interrupted controller's session does not stop the command:
        the test says, once it is done, that it must never run. Once held it touches
        `held_reached(gate)`: the test waits for that, never a fixed time (a loaded CI
        machine can take seconds to get there). The gate decides once it holds a word: the
        test's write_text creates it empty before it writes, and a poll between the two read
        "" and exited without running the command the test had just released."""
        script = self.dir / f"held.{name}.{'-'.join(on)}"
        script.write_text(f"""#!{sys.executable}
import os, sys, time
from pathlib import Path
RUNBOOK, ON, GATE = {self.runbook_command!r}, {list(on)!r}, Path({str(gate)!r})
argv = sys.argv[1:]
if argv[:len(ON)] == ON:
    Path({str(held_reached(gate))!r}).touch()
    deadline = time.monotonic() + 120
    word = ""
    while time.monotonic() < deadline:
        try:
            word = GATE.read_text().strip()
        except FileNotFoundError:
            word = ""
        if word:
            break
        time.sleep(0.05)
    if word != "run":
        sys.exit(1)
os.execv(RUNBOOK, [RUNBOOK, *argv])
""")
        script.chmod(0o755)
        return str(script)

    def reachable_again(self, name: str) -> None:
        """Host `name`'s sshd listening again (after `cut_off_command` stopped it)."""
        h = self.host(name)
        frozen = self._frozen_file(name)
        if frozen.exists():  # a silent cut-off: its frozen connection ends, the listener goes on
            for pid in {int(p) for p in frozen.read_text().split()}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            frozen.unlink()
            if h.sshd is not None and h.sshd.poll() is None:
                os.kill(h.sshd.pid, signal.SIGCONT)
        if h.sshd is not None:
            if h.sshd.poll() is None:
                return
            h.sshd.wait()
        self._start_sshd(find_sshd(), h)

    def _frozen_file(self, name: str) -> Path:
        return self.dir / f"frozen.{name}"

    def ssh(self, host: str, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a command on a drill host over its sshd, as an operator would."""
        return subprocess.run(["ssh", "-F", str(self.ssh_config), host, "--", *argv],
                              capture_output=True, text=True, check=False, timeout=120)

    # -- inventory -------------------------------------------------------------------------
    def write_inventory(self, path: Path | None = None, *, extra_hosts: dict[str, int] | None
                        = None, host_vars: dict[str, dict[str, object]] | None = None) -> Path:
        """An Ansible inventory in the documented format: a canary group, each host's env."""
        path = path or self.inventory
        host_vars = host_vars or {}
        names = [h.name for h in self.hosts] + list(extra_hosts or {})

        def hv(name: str) -> str:
            values = host_vars.get(name, {})
            if not values:
                return f"        {name}:\n"
            body = "".join(f"          {k}: {_yaml(v)}\n" for k, v in values.items())
            return f"        {name}:\n{body}"

        canary = names[: self.canary]
        extra = "".join(f"Host {n}\n  HostName 127.0.0.1\n  Port {p}\n"
                        for n, p in (extra_hosts or {}).items())
        if extra:  # hosts that exist only in the inventory (e.g. an unreachable one)
            text = self.ssh_config.read_text()
            if extra not in text:
                self.ssh_config.write_text(extra + text)
        path.write_text(
            "all:\n  vars:\n"
            "    runbook_env: development\n"
            f"    runbook_command: {self.runbook_command}\n"
            f"    ansible_ssh_common_args: -F {self.ssh_config}\n"
            "    ansible_python_interpreter: /usr/bin/python3\n"
            f"    ansible_control_path_dir: {self.dir / 'cp'}\n"
            "  children:\n"
            "    canary:\n      hosts:\n" + "".join(hv(n) for n in canary)
            + "    web:\n      hosts:\n" + "".join(hv(n) for n in names[self.canary:]))
        return path


def _yaml(value: object) -> str:
    import json

    return json.dumps(value)  # JSON is YAML


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _ssh_banner(port: int) -> bool:
    """Whether an SSH server answers on the loopback port (its identification line)."""
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            return s.recv(8).startswith(b"SSH-")
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_orphans(root: Path | None = None) -> list[str]:
    """`make clean-drills`: fleets whose owner process is gone. Their containers go by label
    with the drill's; here their sshd listeners (only a process whose command line names that
    fleet's directory) are stopped and the directory removed. `root` (the temp directory by
    default) lets a test sweep a directory no other cleaner on the machine sees."""
    from runbook import procs

    removed = []
    for fleet_dir in (root or Path(tempfile.gettempdir())).glob("togather-fleet-*"):
        try:
            owner = int((fleet_dir / "owner").read_text())
        except (OSError, ValueError):
            continue  # not ours to judge
        if procs.pid_alive(owner):
            continue
        for pid_file in fleet_dir.glob("sshd.*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                if str(fleet_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGTERM)
        shutil.rmtree(fleet_dir, ignore_errors=True)
        removed.append(fleet_dir.name)
    return removed
