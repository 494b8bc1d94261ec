"""The fleet rollback, controller side: plan, lock + pre-flight, database phase, rollout.

The whole run is ONE ansible-playbook start (`playbooks/fleet.yml`, through ansible-runner:
Ansible runs as a subprocess; its per-host events come back here as they happen): the fleet
lock and every host's pre-flight at once, then a gate where the playbook waits for this
controller's decision, the maintenance path's drain and restore and a second gate, the
rollout, the release. Only the undrain and a fallback release are runs of their own. Safety
rules, in order:

- nothing changes before every selected host passed pre-flight (a failure: exit 4, one line
  per host, the fleet lock released);
- the shared database is judged once, in its own phase, from one host's schema guard; a plan
  that needs a snapshot restore is refused for a rolling rollback (exit 4) since hosts still on
  the new version would meet the old schema;
- the rollout stops at the first failed host, or the first lost during its rollback (its
  outcome unknown: exit 5); hosts of the same batch already running finish; nothing is
  reverted fleet-wide; each host's own rollback left it on a healthy slot;
- a resume never rolls a finished host again: the hosts its run rolled back are skipped, one
  whose outcome was unknown is taken only when --limit names it, and one that no longer runs
  the deployment the run first saw is refused in pre-flight;
- the fleet lock is released on every path, Ctrl-C and SIGTERM included (during the rollout a
  first one starts no further batch, a second stops Ansible at once, each host's runbook then
  handling the hang-up as on one host; before it, either stops the run).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runbook import procs
from runbook.errors import ExitCode, RunbookError, UsageError
from runbook.fleet import FLEET_PROTOCOL, hostcheck, hostlock
from runbook.fleet import inventory as inv
from runbook.fleet import journal as fjournal
from runbook.fleet.inventory import Inventory
from runbook.times import rough_duration

PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"
SCHEMA_WORDS = ("migrations ran after the target deployment", "the database schema is dirty")
ROLLED_BACK = "rolled back"
FAILED_SERVING = "failed but serving"
FAILED_ATTENTION = "failed: needs attention"
TOOK_EFFECT = "took effect: finish it"
NOT_STARTED = "not started"
UNKNOWN = "unknown: unreachable"  # the connection was lost during its rollback
UNKNOWN_STARTED = "unknown: started, no result"  # Ansible stopped (second Ctrl-C) mid-host
UNKNOWN_NOT_RECORDED = "unknown: no outcome recorded"  # its controller died (kill -9, power)
STARTED = "started"  # journaled when a host's rollback starts; replaced by its outcome


@dataclass
class Options:
    inventory: Path
    dry_run: bool = False
    limit: str | None = None
    batches: str = inv.DEFAULT_BATCHES
    canary_group: str = "canary"
    reason: str = "fleet rollback"
    resume: str | None = None  # a fleet run id whose database phase is reused
    maintenance: bool = False
    journal_dir: Path | None = None
    end_sessions: bool = False  # the maintenance restore ends other sessions on the database


@dataclass
class HostResult:
    host: str
    status: str = NOT_STARTED
    exit_code: int | None = None
    message: str = ""
    record: dict[str, Any] | None = None  # the host's `runbook rollback --format json` output
    started: float | None = None  # wall-clock timestamps (when), never subtracted
    ended: float | None = None
    began: float | None = None  # time.monotonic() at its start and its end: its duration
    finished: float | None = None

    def timing(self, origin: float) -> dict[str, int | None]:
        """Its offset from `origin` (the fleet run's time.monotonic() start) and its duration,
        in ms, on the monotonic clock: `ended - started`, two wall-clock readings, was minus
        an hour after NTP stepped the controller's clock back during the host's rollback."""
        return {"offset_ms": None if self.began is None else round((self.began - origin) * 1000),
                "duration_ms": None if self.began is None or self.finished is None
                else round((self.finished - self.began) * 1000)}


@dataclass
class FleetResult:
    fleet_run_id: str
    exit_code: int
    lines: list[str]
    journal: dict[str, Any] = field(default_factory=dict)
    journal_file: Path | None = None
    # each host's plan after pre-flight (`host_plans`): for --format json, as the dry run's
    # text and the prompt show it
    plans: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    # the maintenance path's drain and restore as the hosts planned them (maintenance_plans)
    maintenance: dict[str, Any] | None = None


class FleetError(RunbookError):
    """A fleet run that stopped; `lines` are printed one per host."""

    def __init__(self, message: str, fix: str | None, *, exit_code: ExitCode,
                 lines: list[str] | None = None, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message, fix, exit_code=exit_code)
        self.lines = lines or []
        self.fields = fields or {}  # of its JSON answer, beside the error's own
        self.journal_file: Path | None = None
        self.lock_not_taken = False
        self.holder: dict[str, Any] | None = None  # a fleet lock's, when it refused


# ---------------------------------------------------------------------------------------------
# Ansible through ansible-runner
# ---------------------------------------------------------------------------------------------

def refresh_after() -> float:
    """Seconds into the run after which each batch first proves the fleet lock still ours
    (refreshing it): a quarter of its time to live. RUNBOOK_FLEET_REFRESH_AFTER_S sets it
    (0: before every batch), as RUNBOOK_FLEET_GATE_WAIT_S sets the gate's wait."""
    value = os.environ.get("RUNBOOK_FLEET_REFRESH_AFTER_S")
    if value is None:
        return hostlock.DEFAULT_TTL / 4
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < hostlock.DEFAULT_TTL:  # nan and inf fail this too
        raise UsageError(f"RUNBOOK_FLEET_REFRESH_AFTER_S={value!r} is not a number of seconds "
                         f"from 0 to {hostlock.DEFAULT_TTL:g}",
                         "unset it (a quarter of the lock's time), or set 0 for every batch")
    return seconds


def heartbeat_every() -> float:
    """Seconds between the controller's refreshes of the fleet lock while it holds it (see
    _lock_heartbeat): 60 by default, well inside the lock's 30 minutes.
    RUNBOOK_FLEET_HEARTBEAT_S sets it."""
    value = os.environ.get("RUNBOOK_FLEET_HEARTBEAT_S")
    if value is None:
        return 60.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    # at most what the lock host allows a re-dated lock (hostlock.REDATE_FOR); nan, inf fail
    if not 0 < seconds <= hostlock.HEARTBEAT_MAX:
        raise UsageError(f"RUNBOOK_FLEET_HEARTBEAT_S={value!r} is not a number of seconds "
                         f"above 0 and at most {hostlock.HEARTBEAT_MAX:g}",
                         "unset it (60 s), or set e.g. 30")
    return seconds


@contextlib.contextmanager
def _lock_heartbeat(refresh: Callable[[Callable[[], bool]], object],
                    every: float) -> Iterator[None]:
    """Refresh the fleet lock from a thread, every `every` seconds, while the run holds it.

    The playbook refreshes it only before a batch: a batch or a maintenance restore longer
    than the lock's 30 minutes let it expire while the run went on, and another operator's
    run took it over and rolled the same hosts (found by review). `refresh(cancelled)` is one
    refresh on the lock host, which refuses a lock that is not this run's (never replaced, so
    a failed or refused beat is only tried again). The thread dies with the controller: a
    killed run's lock expires as before. Stopped before the release, an unfinished beat cut,
    with Ctrl-C, SIGTERM and SIGHUP held as the release holds them: waiting for a beat in
    flight, a second Ctrl-C escaped the run's `finally` and the lock was never released
    (found by review). A beat that outlives the wait is refused once the lock is released."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            with contextlib.suppress(Exception):  # the lock host unreachable: the next beat
                refresh(stop.is_set)

    thread = threading.Thread(target=loop, name="runbook-fleet-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        with _signals_held(threading.current_thread() is threading.main_thread()):
            thread.join(timeout=10)


def _refresh_on_lock_host(inventory: Inventory, extravars: dict[str, Any],
                          cancelled: Callable[[], bool]) -> None:
    """One heartbeat: `runbook fleet lock ENV --refresh` on the lock host (refresh.yml)."""
    run_playbook("refresh.yml", inventory, extravars, Events(), forks=1, cancel=cancelled)


def _envvars() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_HOST_KEY_CHECKING": "True",  # never accept an unknown host key
        "ANSIBLE_PYTHON_INTERPRETER": "auto_silent",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_TIMEOUT": "10",
        # the operator's own settings must not change what a failure means: under `strategy
        # = free` max_fail_percentage is ignored (a failed host no longer stops the rollout),
        # so every play runs linear unless it names its own (the pre-flight's free)...
        "ANSIBLE_STRATEGY": "linear",
        # ... and an SSH retry re-runs a command whose connection dropped while it ran: a
        # second rollback or restore beside the first (FORCED_VARS beats inventory vars)
        "ANSIBLE_SSH_RETRIES": "0",
    }


FORCED_VARS: dict[str, Any] = {"ansible_ssh_retries": 0}  # extra vars: above host vars


@dataclass
class Events:
    """Per-host results of one playbook run, by task name, from ansible-runner's events."""

    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    started: dict[str, dict[str, float]] = field(default_factory=dict)  # time.monotonic()
    unreachable: dict[str, str] = field(default_factory=dict)
    on_start: Callable[[str, str], None] | None = None
    on_end: Callable[[str, str, dict[str, Any]], None] | None = None
    gates: dict[str, threading.Event] = field(default_factory=dict)

    def gate(self, name: str) -> threading.Event:
        return self.gates.setdefault(name, threading.Event())

    def __call__(self, event: dict[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data", {})
        host = data.get("host") or data.get("remote_addr") or ""
        task = data.get("task", "")
        if kind == "playbook_on_task_start" and task.startswith("gate "):
            self.gate(task.removeprefix("gate ")).set()  # the playbook waits there for us
        elif kind == "runner_on_start":
            self.started.setdefault(task, {})[host] = time.monotonic()
            if self.on_start:
                self.on_start(task, host)
        elif kind in ("runner_on_ok", "runner_on_failed", "runner_on_skipped"):
            res = dict(data.get("res", {}))
            res["_event"] = kind
            self.results.setdefault(task, {})[host] = res
            if self.on_end:
                self.on_end(task, host, res)
        elif kind == "runner_on_unreachable":
            msg = str(data.get("res", {}).get("msg", "unreachable")).strip().splitlines()
            self.unreachable[host] = msg[-1] if msg else "unreachable"
            self.results.setdefault(task, {})[host] = {"_event": kind,
                                                      "msg": self.unreachable[host]}
            if self.on_end:
                self.on_end(task, host, self.results[task][host])
        return False  # nothing kept on disk beyond what ansible-runner writes itself


def run_playbook(name: str, inventory: Inventory, extravars: dict[str, Any], events: Events,
                 forks: int, cancel: Callable[[], bool] | None = None) -> str:
    """One ansible-playbook run; returns ansible-runner's status (successful, failed, ...)."""
    ansible_runner = inv.runner()  # the [fleet] extra; it runs ansible-playbook as a subprocess
    inv.ansible_tool("ansible-playbook")
    with tempfile.TemporaryDirectory(prefix="togather-fleet-runner-") as pdd:
        runner = ansible_runner.run(
            private_data_dir=pdd, playbook=str(PLAYBOOKS / name),
            inventory=str(inventory.path), extravars={**extravars, **FORCED_VARS},
            forks=max(1, min(forks, inv.MAX_FORKS)), envvars=_envvars(), quiet=True,
            event_handler=events,
            cancel_callback=cancel or (lambda: False), suppress_env_files=True,
            settings={"suppress_ansible_output": True})
        return str(runner.status)





class GateExpired(Exception):
    """The playbook stopped waiting at a gate (fleet_gate's WAIT_S) before the decision."""


def _expired() -> FleetError:
    wait = float(os.environ.get("RUNBOOK_FLEET_GATE_WAIT_S", "900"))
    return FleetError(f"the run expired at the prompt: Ansible stops waiting for the answer "
                      f"after {wait / 60:g} min, so it ended before any host changed; nothing "
                      "was changed", "run the same command again and answer within that time "
                      "(or pass --yes)", exit_code=ExitCode.FAILED_SAFELY)


CLOSE_WAIT = 300.0  # seconds close() waits for the playbook before stopping it


class PlaybookRun:
    """One ansible-playbook process for the whole fleet run (fleet.yml), started at once.

    The playbook stops at named gates (a wait on a file) until the controller, which reads
    every host's result meanwhile, writes its decision: `go`, `maintenance` or `stop`. A gate
    never decided (an exception, Ctrl-C, a refusal) is decided `stop` by `close`, so no play
    after it runs. One process start instead of one per phase: the fleet's overhead.
    """

    def __init__(self, inventory: Inventory, extravars: dict[str, Any], events: Events,
                 forks: int, cancel: Callable[[], bool]) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="togather-fleet-runner-")
        self.gate_dir = Path(self.dir.name) / "gates"
        self.gate_dir.mkdir()
        self.events = events
        self.decided: set[str] = set()
        self.abandon = False  # close() gave up waiting: ansible-runner stops Ansible
        ansible_runner = inv.runner()  # the [fleet] extra: runs ansible-playbook
        inv.ansible_tool("ansible-playbook")
        self.thread, self.runner = ansible_runner.run_async(
            private_data_dir=self.dir.name,
            playbook=str(PLAYBOOKS / "fleet.yml"), inventory=str(inventory.path),
            extravars={**extravars, **FORCED_VARS, "fleet_gate_dir": str(self.gate_dir)},
            forks=max(1, min(forks, inv.MAX_FORKS)), envvars=_envvars(), quiet=True,
            event_handler=events, cancel_callback=lambda: self.abandon or cancel(),
            suppress_env_files=True,
            settings={"suppress_ansible_output": True})

    def wait_gate(self, name: str) -> bool:
        """True once the playbook waits at gate `name`; False if it ended before it."""
        gate = self.events.gate(name)
        while not gate.wait(0.05):  # short waits: signals reach the main thread
            if not self.thread.is_alive():
                return gate.is_set()
        return True

    def decide(self, name: str, decision: str, **files: str) -> None:
        """Write the decision; raises GateExpired if the gate gave up waiting first."""
        for key, value in files.items():
            files_path = self.gate_dir / key
            files_path.write_text(value)
        tmp = self.gate_dir / f".{name}.tmp"
        tmp.write_text(decision)
        try:  # a link, not a rename: atomic (never half a word) and never over the gate's own
            os.link(tmp, self.gate_dir / name)
        except FileExistsError:
            self.decided.add(name)
            if (self.gate_dir / name).read_text().strip() == "expired":
                raise GateExpired(name) from None
            raise
        finally:
            tmp.unlink(missing_ok=True)
        self.decided.add(name)

    def join(self, limit: float | None = None) -> str:
        """Wait for Ansible to end; after `limit` seconds, have ansible-runner stop it."""
        began = time.monotonic()
        while self.thread.is_alive():
            self.thread.join(0.1)
            if limit is not None and not self.abandon and time.monotonic() - began > limit:
                self.abandon = True  # its cancel callback is asked between events
        return str(self.runner.status)

    def close(self, *, release: bool = False) -> None:
        """Stop at every gate not decided yet, wait for Ansible to end, remove the files.

        `release`: a run stopped at the pre-flight gate releases the fleet lock in the same
        playbook (see `released`), not in an ansible-playbook start of its own."""
        for name in ("preflight", "rollout"):
            if name not in self.decided:
                word = "stop, release the fleet lock" if release and name == "preflight" \
                    else "stop"
                with contextlib.suppress(OSError, GateExpired):
                    self.decide(name, word)
        with contextlib.suppress(Exception):
            # every gate is decided: what is left is at most the lock's release and the
            # running hosts' ends; a playbook still going after that is stopped, never waited
            # for without end (the controller's exit must not hang on it)
            self.join(limit=CLOSE_WAIT)
        if os.environ.get("RUNBOOK_FLEET_DEBUG"):  # Ansible's own output, for a developer
            with contextlib.suppress(Exception):
                sys.stderr.write(self.runner.stdout.read())
        with contextlib.suppress(OSError):  # runs in a `finally`: never replace the outcome
            self.dir.cleanup()

    def released(self, lock_host: str) -> bool:
        """Whether the playbook released the fleet lock after a stop (exit 0 on the host)."""
        res = self.events.results.get("release the fleet lock (stopped)", {}).get(lock_host, {})
        return res.get("_event") == "runner_on_ok" and res.get("rc") == 0


# ---------------------------------------------------------------------------------------------
# Phases


def _controller_vars(fleet_run_id: str, inventory: Inventory, targets: list[str],
                     reason: str) -> dict[str, Any]:
    return {"fleet_run_id": fleet_run_id, "fleet_lock_host": inventory.lock_host,
            "fleet_targets": ",".join(targets), "fleet_holder": _who(),
            "fleet_controller_host": socket.gethostname(), "fleet_controller_pid": os.getpid(),
            # the playbook stops changing hosts once this process is gone (fleet_gate.py)
            "fleet_controller_pid_start": procs.pid_start(os.getpid()),
            "fleet_reason": reason, "fleet_ssh_alive": ssh_alive()}


def ssh_alive() -> int:
    """Seconds between the SSH keepalives of every host connection (fleet.yml: 4 unanswered
    ones and the host is unreachable). RUNBOOK_FLEET_SSH_ALIVE_S sets it; 15 by default, so a
    host that drops off the network silently is given up after about a minute."""
    value = os.environ.get("RUNBOOK_FLEET_SSH_ALIVE_S")
    if value is None:
        return 15
    if not value.isdigit() or not 1 <= int(value) <= 300:
        raise UsageError(f"RUNBOOK_FLEET_SSH_ALIVE_S={value!r} is not a whole number of "
                         "seconds from 1 to 300", "unset it (15 s), or set e.g. 5")
    return int(value)


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed((text or "").strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
    with contextlib.suppress(ValueError):
        value = json.loads(text)
        if isinstance(value, dict):
            return value
    return None


def _host_error(res: dict[str, Any] | None) -> str:
    """Why a host command failed: its own JSON error (a live deploy lock refuses the undrain,
    exit 3), else its last line of output, else Ansible's word."""
    res = res or {}
    return str((_last_json(str(res.get("stdout", ""))) or {}).get("error")
               or _one_line(str(res.get("stderr") or res.get("msg") or "no answer")))


def _host_check_failed(host: str, res: dict[str, Any]) -> str:
    """The pre-flight problem of a host whose `runbook fleet host-check` answered no JSON.
    One that does not know an option the controller passes (click's "No such option") has
    fleet support but an older protocol, refused at option parsing before it could say so:
    "install ... with fleet support" was untrue of it (found by review)."""
    stderr = str(res.get("stderr", ""))
    unknown = re.search(r"No such option: (-[-\w]+)", stderr)
    if unknown:
        return (f"{host}: its runbook is older than this controller's: it does not know option "
                f"{unknown.group(1)} (fleet protocol {FLEET_PROTOCOL} needed): install "
                f"togather-runbook {hostcheck.version()}, this controller's "
                "version, on every host")
    return (f"{host}: `runbook fleet host-check` failed (exit {res.get('rc')}): "
            f"{_one_line(stderr)}; install togather-runbook with fleet support (>= 0.1.0) there")


def _one_line(text: str) -> str:
    lines = [x.strip() for x in (text or "").strip().splitlines() if x.strip()]
    return lines[-1] if lines else "no output"


def env_args(inventory: Inventory, hosts: list[str],
             checks: dict[str, dict[str, Any]] | None = None,
             known: dict[str, str] | None = None) -> dict[str, str]:
    """Each host's environment as its own runbook names it in the commands it prints (its
    answer's `environment_arg`: environment.command_arg there, e.g. the file its
    RUNBOOK_CONFIG names; `checks`, as `_answers` reads them), else as `known` has it (a
    resumed run's journal), else as the inventory does (Inventory.env_arg: an older host, or
    one not heard from). The fixes printed for a host name it so, to run there as printed
    (found by review: `runbook status development` where the host's environment is a file
    elsewhere, which the bare name does not load)."""
    out = {}
    for host in hosts:
        said = ((checks or {}).get(host) or {}).get("environment_arg")
        out[host] = (said if isinstance(said, str) and said
                     else (known or {}).get(host) or inventory.env_arg(host))
    return out


def _recorded_args(record: dict[str, Any], known: dict[str, str]) -> dict[str, str]:
    """The hosts' environments as a fleet run's journal recorded their own runbooks name them
    (`environment_args`), over `known` (this run's, from the inventory): a journal written
    before they were recorded has none. An unrendered template (an inventory value that
    journal took as it was) is not one."""
    recorded = record.get("environment_args")
    return {**known, **({h: a for h, a in recorded.items()
                         if isinstance(a, str) and a and "{{" not in a}
                        if isinstance(recorded, dict) else {})}


def _commands(command: str, hosts: list[str], args: dict[str, str],
              where: str = "there") -> str:
    """`command` to run on `hosts`, its `{env}` each host's environment as its own runbook
    names it (`env_args`): "`runbook status X` there" when they all name it alike, else one
    command per host ("`runbook status X` on host1, `runbook status Y` on host2")."""
    by_arg: dict[str, list[str]] = {}
    for host in hosts:
        by_arg.setdefault(args.get(host) or "ENV", []).append(host)
    if len(by_arg) <= 1:
        one = f"`{command.replace('{env}', next(iter(by_arg), 'ENV'))}`"
        return f"{one} {where}" if where else one
    return ", ".join(f"`{command.replace('{env}', arg)}` on {', '.join(on)}"
                     for arg, on in by_arg.items())


def _answers(events: Events) -> dict[str, dict[str, Any]]:
    """Each host's `runbook fleet host-check` answer, as far as it gave one; for the fleet
    lock host --limit leaves out (no host-check there), its `fleet lock --take` or
    `--status` answer, which says its `environment_arg` too (found by review: its commands
    were always named from the inventory)."""
    out: dict[str, dict[str, Any]] = {}
    for task in ("take the fleet lock", "read the fleet lock", "host-check"):  # last wins
        out.update({h: answer for h, r in events.results.get(task, {}).items()
                    if (answer := _last_json(str(r.get("stdout", ""))))})
    return out


def preflight(events: Events, inventory: Inventory, targets: list[str], *,
              take_lock: bool, fleet_run_id: str = "FLEET_RUN",
              take_over: str = "", known: dict[str, str] | None = None) -> tuple[
                  dict[str, dict[str, Any]], list[str], dict[str, Any]]:
    """Read the lock and every host's pre-flight; (checks, problem lines, what the take said).

    Every target's own fleet lock (its environment's, as its host-check reads it) held live
    by another fleet run refuses the run (exit 3): only the lock host's was read, so two runs
    of one environment with different lock hosts both ran. A dry run refuses so too, and on
    the lock host's when --limit leaves it out, as the real run's take does: the dry run is
    the pre-flight people gate on, and it said 4 (fix something) where the run said 3 (wait).

    A lock host that is also a target takes the lock in its own host-check (one SSH round
    trip: `host-check --take-lock`, its answer under "fleet_lock_take"); otherwise the play's
    "take the fleet lock" task did. `known`: each host's environment as the run knows its
    runbook names it (a resumed run's journal), for a host that does not answer."""
    # the fixes below name each host's environment as its own runbook does (`env_args`)
    args = env_args(inventory, [*targets, inventory.lock_host], _answers(events), known)
    lock_arg = args[inventory.lock_host]
    if inventory.lock_host in targets:
        check = events.results.get("host-check", {}).get(inventory.lock_host, {})
        said = _last_json(str(check.get("stdout", ""))) or {}
        lock_res = dict(said.get("fleet_lock_take") or {})
        ok = bool(lock_res.get("taken"))
        answered = bool(lock_res)
        if not lock_res:
            lock_res = {"error": _one_line(str(check.get("stderr") or check.get("msg", "")))}
    else:
        task = events.results.get("take the fleet lock", {}).get(inventory.lock_host, {})
        answer = _last_json(str(task.get("stdout", "")))
        answered = answer is not None
        lock_res = answer or {"error": _one_line(str(task.get("stderr") or task.get("msg", "")))}
        ok = task.get("_event") == "runner_on_ok" and task.get("rc") == 0
    if take_lock:
        if inventory.lock_host in events.unreachable:
            error = _lock_host_unreachable(events, inventory, lock_arg, fleet_run_id)
            # the connection may have dropped after its take ran: released by this run's id
            # (a lock that is not ours is left alone), not left to refuse the retry
            error.lock_not_taken = False
            raise error
        if not ok:
            err = lock_res
            msg = err.get("error") or "no answer"
            code = err.get("exit_code", 3)
            error = FleetError(f"fleet lock on {inventory.lock_host}: {msg}; nothing was changed",
                               err.get("fix")
                               or f"see `runbook fleet lock {lock_arg} --status` there",
                               exit_code=ExitCode(code) if code in (2, 3, 4) else ExitCode.LOCKED)
            # refused in so many words: not ours. No answer (the connection dropped after the
            # command ran): it may be ours, so it is released by this run's id (someone
            # else's is left alone), never left for 30 minutes to refuse the retry
            error.lock_not_taken = answered
            holder = err.get("holder")
            error.holder = holder if isinstance(holder, dict) else None
            raise error
    checks: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    others: list[str] = []  # another fleet run's live lock on a target (or the lock host)
    undated = False  # one of them dated in the future (the clock set back): --force re-dates it
    results = events.results.get("host-check", {})

    def held_by_another(host: str, data: dict[str, Any]) -> None:
        nonlocal undated
        held = data.get("fleet_lock", {})
        holder = (held.get("holder") or {}).get("fleet_run_id")
        if (held.get("locked") and not held.get("stale")
                and holder not in (fleet_run_id, take_over or None)):
            undated = undated or bool(held.get("undated"))
            others.append(f"{host}: fleet lock: held by {held.get('summary')} (environment "
                          f"{data.get('environment')})"
                          + (f"; it is {_one_line(str(held.get('why')))}"
                             if held.get("undated") or held.get("redated") else ""))
    for host in targets:
        if host in events.unreachable:
            problems.append(f"{host}: unreachable: {events.unreachable[host]}")
            continue
        res = results.get(host)
        if res is None:
            problems.append(f"{host}: no pre-flight result (the play did not reach it)")
            continue
        data = _last_json(str(res.get("stdout", "")))
        if data is None:
            problems.append(_host_check_failed(host, res))
            continue
        checks[host] = data
        if data.get("fleet_protocol") != FLEET_PROTOCOL:
            problems.append(f"{host}: runbook {data.get('runbook_version')} speaks fleet protocol "
                            f"{data.get('fleet_protocol')}, this controller {FLEET_PROTOCOL}: "
                            "install the same togather-runbook version on every host")
        held_by_another(host, data)
        for p in data.get("problems", []):
            problems.append(Problem(f"{host}: {p.get('check')}: {p.get('message')}"
                                    + (f" ({p['fix']})" if p.get("fix") else ""),
                                    p.get("exit_code")))
    if not take_lock and inventory.lock_host not in targets:  # the real run's take refuses
        unread = _lock_unread(events, inventory.lock_host, lock_arg)
        if unread:
            problems.append(unread)
        else:
            read = events.results["read the fleet lock"][inventory.lock_host]
            held_by_another(inventory.lock_host,
                            {"fleet_lock": _last_json(str(read.get("stdout", ""))) or {},
                             "environment": inventory.env(inventory.lock_host)})
    if others:
        where = [x.split(":")[0] for x in others]
        raise FleetError(f"the fleet lock of this environment is held by another fleet run "
                         f"on {', '.join(where)}; nothing was changed",
                         "wait for that fleet run to finish ("
                         + _commands("runbook fleet lock {env} --status", where, args)
                         + " says who holds it); a stale one is taken over"
                         + ("; one dated in the future: "
                            + _commands("runbook fleet lock {env} --release --force", where,
                                        args) + " re-dates it, "
                                         "and if its controller is gone it reads stale "
                                         f"{rough_duration(hostlock.REDATE_FOR)} later"
                                         if undated else "")
                         + ("; the other problems below need fixing too" if problems else ""),
                         exit_code=ExitCode.LOCKED, lines=others + problems)
    return checks, problems, lock_res


def _lock_host_unreachable(events: Events, inventory: Inventory, lock_arg: str,
                           fleet_run_id: str) -> FleetError:
    """The real run's refusal when its take of the fleet lock cannot reach the lock host."""
    return FleetError(f"the fleet lock host {inventory.lock_host} is unreachable: "
                      f"{events.unreachable[inventory.lock_host]}; nothing was changed",
                      "make it reachable, or name another with fleet_lock_host; if "
                      "the connection dropped after the lock was taken, a retry is "
                      "refused as 'held by' this run: release it there with `runbook "
                      f"fleet lock {lock_arg} --release --fleet-run {fleet_run_id}`",
                      exit_code=ExitCode.PRECONDITION)


def _undrain_take_refused(events: Events, checks: dict[str, dict[str, Any]],
                          inventory: Inventory, targets: list[str], args: dict[str, str],
                          fleet_run_id: str) -> FleetError | None:
    """Why the undrain resume's take of the fleet lock would refuse, as its dry run reads
    the lock host (None: it can be taken, or is another run's, which pre-flight refused).
    Found by review: the dry run showed the undrain and exit 0 where the lock host was
    unreachable or its lock unread, and the resume's take refused there (nothing started)."""
    if inventory.lock_host in events.unreachable:
        return _lock_host_unreachable(events, inventory, args[inventory.lock_host],
                                      fleet_run_id)
    if inventory.lock_host in targets:
        if inventory.lock_host in checks:
            return None
        res = events.results.get("host-check", {}).get(inventory.lock_host)
        why = (_host_check_failed(inventory.lock_host, res) if res is not None else
               f"{inventory.lock_host}: no pre-flight result (the play did not reach it)")
    else:
        why = _lock_unread(events, inventory.lock_host, args[inventory.lock_host])
        if not why:
            return None
    return FleetError(f"the fleet lock on {inventory.lock_host} could not be read, and the "
                      "resume takes it before it starts any host; nothing was changed",
                      "fix the fleet lock host below, then run the same command again",
                      exit_code=_refusal_code([why]), lines=[why])


def _lock_unread(events: Events, host: str, env_arg: str) -> str:
    """Why a dry run could not read the fleet lock on the lock host --limit leaves out (its
    "read the fleet lock" task), as a problem line; "" when it did. The task never fails the
    play, so an unreachable host or a runbook there that errs read as a free lock and the dry
    run passed, where the real run's take refuses (found by review)."""
    command = f"`runbook fleet lock {env_arg} --status`"
    if host in events.unreachable:
        return (f"{host}: fleet lock: the fleet lock host is unreachable: "
                f"{events.unreachable[host]} (make it reachable, or name another with "
                "fleet_lock_host: the real run takes the fleet lock there)")
    read = events.results.get("read the fleet lock", {}).get(host)
    if read is None:
        return (f"{host}: fleet lock: no answer from the fleet lock host to {command} (the "
                "play did not reach it): the real run takes the fleet lock there")
    answer = _last_json(str(read.get("stdout", "")))
    if answer is not None and "locked" in answer:
        return ""
    if answer is not None and answer.get("error"):
        return (f"{host}: fleet lock: {command} failed on the fleet lock host: "
                f"{answer['error']}" + (f" ({answer['fix']})" if answer.get("fix") else ""))
    return (f"{host}: fleet lock: {command} failed on the fleet lock host (exit "
            f"{read.get('rc')}): {_one_line(str(read.get('stderr') or read.get('msg', '')))}; "
            "install togather-runbook with fleet support there")


class Problem(str):
    """A pre-flight problem line that keeps the exit code its host-check gave it: 3 for a
    lock a live run holds (wait), else 4 (fix something). See `_refusal_code`."""

    exit_code: ExitCode

    def __new__(cls, text: str, exit_code: object = None) -> Problem:
        line = super().__new__(cls, text)
        line.exit_code = (ExitCode.LOCKED if exit_code == ExitCode.LOCKED
                          else ExitCode.PRECONDITION)
        return line


def _refusal_code(problems: list[str]) -> ExitCode:
    """How pre-flight problems refuse the run: 3 (locked: wait) when each one is a lock a live
    run holds, as the single-host rollback and its dry run end; 4 (fix something) when any is
    not, since waiting alone would not let the run through."""
    locked = all(isinstance(p, Problem) and p.exit_code == ExitCode.LOCKED for p in problems)
    return ExitCode.LOCKED if problems and locked else ExitCode.PRECONDITION


def _limit_for(inventory: Inventory, hosts: list[str]) -> str:
    """What `--limit` selects these hosts by: a group of exactly them, else their names."""
    exact = [g for g, members in inventory.groups.items()
             if g not in ("all", "ungrouped") and set(members) == set(hosts)]
    exact.sort(key=lambda g: g == inventory.canary_group)  # the canary group last
    return exact[0] if exact else ",".join(hosts)


def _one_environment(inventory: Inventory, targets: list[str], envs: dict[str, str],
                     subject: str = "the selected hosts are of") -> tuple[str, str] | None:
    """Why these hosts cannot be one fleet run, and the fix (None: they can). One run is one
    environment: one fleet lock, one database judgement, one maintenance restore; a selection
    of two ran as one fleet, with the lock, database and restore of the lock host's one."""
    by_env: dict[str, list[str]] = {}
    for host in targets:
        by_env.setdefault(envs[host], []).append(host)
    if len(by_env) < 2:
        return None
    return (f"{subject} {len(by_env)} environments ("
            + "; ".join(f"{e} on {', '.join(hs)}" for e, hs in by_env.items())
            + "): one fleet run rolls back one environment; nothing was changed",
            "run once per environment, --limit naming one environment's hosts ("
            + " or ".join(f"--limit {_limit_for(inventory, hs)}" for hs in by_env.values())
            + ")")


def _same_environments(resumed: dict[str, Any], inventory: Inventory,
                       targets: list[str]) -> None:
    """Refuse (exit 2) a resume of another environment's fleet run: the journal folder is
    shared by every environment and inventory, and hosts are matched by name, so a staging
    run's hosts read as 'rolled back' for development (exit 0, never rolled back). A journal
    written before environments were recorded is compared by its inventory, all it says."""
    run = resumed.get("fleet_run_id", "?")
    recorded = resumed.get("environments")
    fix = "use the resume command that run printed (same inventory, same --limit)"
    if not isinstance(recorded, dict):
        theirs = str(resumed.get("inventory") or "?")
        if Path(theirs).resolve() != inventory.path.resolve():
            raise UsageError(f"--resume {run}: that fleet run was of the inventory {theirs}, "
                             f"not {inventory.path}, and its journal records no environment "
                             "(written by an older runbook); nothing was changed", fix)
        return
    other = {h: str(recorded[h]) for h in targets
             if h in recorded and str(recorded[h]) != inventory.env(h)}
    if other:
        raise UsageError(f"--resume {run}: that fleet run was of another environment ("
                         + ", ".join(f"{h} {e}" for h, e in other.items())
                         + f"), this one of {inventory.env(next(iter(other)))}; nothing was "
                         "changed", fix)


def database_phase(checks: dict[str, dict[str, Any]], db_host: str) -> dict[str, Any]:
    """The shared database, judged once from one host's schema guard (read-only)."""
    data = checks.get(db_host, {})
    dry = data.get("dry_run", {})
    if dry.get("ok"):
        pre = dry.get("preflight", {})
        return {"host": db_host, "status": "ok",
                "database schema": pre.get("database schema", "not configured"),
                "schema guard": pre.get("schema guard", "not run"),
                "snapshot restore": "not needed"}
    return {"host": db_host, "status": "refused", "error": dry.get("error", "no dry run"),
            "fix": dry.get("fix")}


def host_plans(checks: dict[str, dict[str, Any]], targets: list[str],
               rolling: bool, db_host: str | None = None) -> dict[str, dict[str, Any] | None]:
    """Each host's own rollback as its host-check's dry run planned it: its summary, and its
    steps (as `runbook rollback --dry-run --format json` has them) with the text that dry run
    prints (`rendered`), or None for both where they were not sent: an older host's
    host-check sends the summary alone (shown as before; `note` says why on its line, found
    by review: it read like a host with nothing to plan). On the maintenance path (not
    `rolling`) it is the rollback the rollout runs there, after the restore: the dry run
    past the schema guard's refusal the restore resolves, and on the database host
    (`db_host`) the one it planned without the restore (`maintenance.rollback`), never the
    dry run with it that judged the restore (found by review: the maintenance dry run showed
    no host's steps, and the database host's summary was of a rollback that never runs).
    None for a host with no plan at all. In `targets` order (the rollout's: pass it)."""
    plans: dict[str, dict[str, Any] | None] = {}
    for h in targets:
        dry = checks[h].get("dry_run", {})
        if not rolling and h == db_host:
            dry = (checks[h].get("maintenance") or {}).get("rollback") or {}
        if not (dry.get("ok") or (not rolling and dry.get("schema_refusal_only"))):
            plans[h] = None
            continue
        steps, rendered = dry.get("steps"), dry.get("rendered")
        sent = isinstance(steps, list) and isinstance(rendered, str)
        # a plan with a restore is not the rollout's `runbook rollback`, which never restores
        own = sent and not (dry.get("preflight") or {}).get("restore")
        note = None if sent else (
            f"its steps are not shown: its runbook {checks[h].get('runbook_version')}, fleet "
            f"protocol {checks[h].get('fleet_protocol')}, sends no plan; upgrade "
            f"togather-runbook there to {hostcheck.version()}, this controller's, to see them")
        plans[h] = {"summary": dry["summary"], "steps": steps if own else None,
                    "rendered": rendered if own else None, "note": note}
    return plans


def _ready_lines(plan_lines: list[str], plans: dict[str, dict[str, Any] | None],
                 database: dict[str, Any], rolling: bool) -> list[str]:
    """The plan after pre-flight, as the dry run prints it and the prompt shows it (found by
    review: the prompt showed the batches alone): each host's own rollback, from what to
    what, with its steps and every resolved value as that host's own `runbook rollback
    --dry-run` prints them, indented under it (found by review: one summary line a host,
    though each host had planned every step), and, for a rolling rollback, the database's
    judgement."""
    lines = list(plan_lines)
    for h, plan in plans.items():
        if plan is None:
            lines.append(f"{h}: ready once the database is restored")
            continue
        lines.append(f"{h}: ready: {plan['summary']}"
                     + (f" ({plan['note']})" if plan.get("note") else ""))
        lines += [f"    {line}" for line in (plan["rendered"] or "").splitlines()]
    if rolling:
        lines.append(f"database (once, on {database['host']}): "
                     f"{database.get('database schema')}, schema guard "
                     f"{database.get('schema guard')}")
    return lines


def _needs_restore(checks: dict[str, dict[str, Any]]) -> str | None:
    for data in checks.values():
        err = str(data.get("dry_run", {}).get("error", ""))
        if any(w in err for w in SCHEMA_WORDS):
            return err
    return None


# ---------------------------------------------------------------------------------------------
# The maintenance path (a restore is needed): drain every host, restore once, then the rollout


def _maintenance_plan(checks: dict[str, dict[str, Any]], problems: list[str], db_host: str,
                      inventory: Inventory, count: int) -> tuple[dict[str, Any], list[str]]:
    """The database decision of a maintenance run, and the pre-flight problems left.

    The database host dry-ran its rollback WITH the restore (its snapshot verified, read-only);
    the other hosts' schema-guard refusals are what the restore resolves, so they are dropped,
    but only from a host whose dry run ran every other check past that refusal and found
    nothing else (`schema_refusal_only`: host-check --schema-restored-first): its dry run
    stopped at the guard, and a host broken otherwise was drained and left down.
    """
    dry = checks.get(db_host, {}).get("dry_run", {})
    pre = dry.get("preflight", {})

    def resolved(problem: str) -> bool:
        host = problem.split(":")[0]
        return (host != db_host and any(w in problem for w in SCHEMA_WORDS)
                and bool(checks.get(host, {}).get("dry_run", {}).get("schema_refusal_only")))

    left = [p for p in problems if not resolved(p)]
    if not dry.get("ok") or not pre.get("restore"):
        if not any(p.startswith(f"{db_host}:") for p in left):
            left.append(f"{db_host}: the restore cannot be planned there: "
                        f"{dry.get('error') or 'no snapshot named by its dry run'}")
        return {"host": db_host, "status": "refused"}, left
    return {"host": db_host, "status": "restore planned", "snapshot": pre["restore"],
            "data-loss window": pre.get("data-loss window"),
            "database schema": pre.get("database schema"),
            "target ran with": pre.get("target ran with"), "hosts down": count,
            "lock host": inventory.lock_host}, left


def _maintenance_lines(decision: dict[str, Any], count: int) -> list[str]:
    return [f"MAINTENANCE: THE SERVICE IS DOWN on all {count} host(s): every host's app slots "
            "stop first (drain), and each host serves again only once its own rollback "
            "switched it",
            f"database (once, on {decision['host']}): restore snapshot {decision['snapshot']} "
            f"(database now {decision.get('database schema')}; "
            f"{decision.get('data-loss window')}), then every host rolls back without a "
            "restore, canary first"]


def maintenance_plans(checks: dict[str, dict[str, Any]], targets: list[str],
                      decision: dict[str, Any], command: str) -> dict[str, Any]:
    """What the maintenance path runs before the rollout, as the hosts planned it in their
    host-check (`maintenance`): each host's drain, and the restore on the database host as
    `command` (`runbook snapshot restore ENV SNAPSHOT --keep-stopped`, which the playbook
    runs there) plans it in its own dry run. A plan not sent is None (shown as such)."""
    def sent(host: str, what: str) -> dict[str, Any] | None:
        plan = ((checks.get(host) or {}).get("maintenance") or {}).get(what)
        return plan if isinstance(plan, dict) and isinstance(plan.get("rendered"), str) \
            else None

    return {"drain": {h: sent(h, "drain") for h in targets},
            "restore": {"host": decision["host"], "command": command,
                        "plan": sent(decision["host"], "restore")}}


def _maintenance_steps(plans: dict[str, Any]) -> list[str]:
    """The maintenance plan's lines before the rollout's, in the order they run: each host's
    drain, then the restore on the database host, each plan indented under its line as that
    host's own dry run prints it; then the header of the rollout's (`_ready_lines`)."""
    def block(line: str, plan: dict[str, Any] | None) -> list[str]:
        if plan is None:
            return [f"{line}: its plan was not sent (upgrade togather-runbook there)"]
        return [f"{line}: {plan['summary']}",
                *(f"    {text}" for text in plan["rendered"].splitlines())]

    restore = plans["restore"]
    lines = ["1. drain every host, all at once (`runbook fleet drain` there): THE SERVICE IS "
             "DOWN from here"]
    for host, plan in plans["drain"].items():
        lines += block(f"{host}: drain", plan)
    lines.append(f"2. restore the database once, on {restore['host']}: `{restore['command']}`")
    lines += block(f"{restore['host']}: restore", restore["plan"])
    lines.append("3. roll back every host without a restore, canary first, in the batches "
                 "above (each serves again once its own rollback switched it)")
    return lines


def _drain_and_restore(run: PlaybookRun, inventory: Inventory, targets: list[str],
                       fleet_run_id: str, options: Options, journal: fjournal.FleetJournal,
                       decision: dict[str, Any], say: Callable[[str], None],
                       interrupts: _Interrupts, args: dict[str, str]) -> None:
    """Drain every host, then restore the snapshot once on the database host.

    A first Ctrl-C (or SIGTERM) here is taken like a failed drain: no host not yet drained
    drains, the restore never starts (the playbook reads the stop file), the drained hosts
    are started again, exit 1. One that comes once the restore has started waits for it:
    restored, the run stops before the rollout (every host down, exit 5) and its resume
    rolls the hosts back on the restored database. A second one stops Ansible at once.

    Stopped before the restore (a host could not drain): the drained hosts are started again
    and nothing else changed (exit 1). A failed restore leaves the database as it was (the
    single-host restore's promise): hosts started again, exit 1. A restore whose outcome is
    unknown (exit 5, its connection lost, no answer): the hosts stay down, exit 5. The restore
    is journaled (and the journal written) at once, so a resume never repeats it. `args`:
    each host's environment as its own runbook names it, for the fixes (`env_args`).
    """
    say(f"maintenance: draining {len(targets)} host(s): THE SERVICE IS DOWN")
    journal.set(maintenance_drain_started=True)
    try:
        _journal_or_refuse(journal)  # before any host drains: a resume after a crash must know
    except FleetError:
        journal.set(maintenance_drain_started=False)
        raise
    with interrupts.installed(say, "interrupted: the restore will not start; the drained "
                              "hosts will be started again (a restore already running is "
                              "waited for)"):
        _drain_and_restore_held(run, inventory, targets, fleet_run_id, options, journal,
                                decision, say, interrupts, args)


def _drain_and_restore_held(run: PlaybookRun, inventory: Inventory, targets: list[str],
                            fleet_run_id: str, options: Options,
                            journal: fjournal.FleetJournal, decision: dict[str, Any],
                            say: Callable[[str], None], interrupts: _Interrupts,
                            args: dict[str, str]) -> None:
    events = run.events
    db_arg = args.get(decision["host"], "ENV")
    t0 = time.monotonic()
    try:
        run.decide("preflight", "maintenance", snapshot=str(decision["snapshot"]))
    except GateExpired:
        journal.set(maintenance_drain_started=False)  # the playbook ended at the gate
        raise _expired() from None
    if not run.wait_gate("rollout"):
        run.join()
    drained: dict[str, list[str]] = {}
    drained_ids: dict[str, dict[str, str]] = {}  # host -> container -> the Id its drain stopped
    failed: list[str] = []
    skipped = {host for host in targets  # after a Ctrl-C: never drained
               if events.results.get("drain", {}).get(host, {}).get("_event")
               == "runner_on_skipped"}
    for host in targets:
        res = events.results.get("drain", {}).get(host)
        data = _last_json(str((res or {}).get("stdout", ""))) or {}
        if host in skipped:
            continue
        if res is not None and res.get("_event") == "runner_on_ok":
            drained[host] = list(data.get("stopped", []))
            drained_ids[host] = _ids(data)
        elif res is not None:
            failed.append(f"{host}: drain failed: "
                          f"{data.get('error') or _one_line(str(res.get('stderr') or res.get('msg', '')))}")  # noqa: E501
            if isinstance(data.get("stopped"), list):
                # refused after its stops (a container up under a slot's name it did not
                # stop): what it stopped is started again with the other hosts', never lost
                drained[host] = [str(n) for n in data["stopped"]]
                drained_ids[host] = _ids(data)
    journal.phase("drain", t0, "failed" if failed else "ok", stopped=drained,
                  stopped_ids=drained_ids, problems=failed)
    journal.save()  # hosts drained: a failure is said, the run goes on
    res = events.results.get("restore the snapshot", {}).get(decision["host"])
    restore_skipped = res is not None and res.get("_event") == "runner_on_skipped"
    if restore_skipped:
        res = None  # never started (a Ctrl-C before it): as if the play had stopped
    t1 = (events.started.get("restore the snapshot", {}).get(decision["host"])
          or time.monotonic())
    out = _last_json(str((res or {}).get("stdout", ""))) or {}
    rc = None if res is None else res.get("rc")
    if res is not None and res.get("_event") == "runner_on_ok":
        database = {**decision, "status": "restored", "restored_at": time.time(),
                    "restore_run": out}
        journal.phase("database", t1, "restored", decision=database)
        journal.record["database"] = database
        # before any host switches: a resume must see it. Not written (said), the run goes on:
        # the hosts are down until they roll back, and a resume of the record left on disk
        # (drain started, restore not recorded) is refused as "may or may not be restored"
        journal.save(options.journal_dir)
        say(f"maintenance: database restored once on {decision['host']} from "
            f"{decision['snapshot']}")
        if interrupts.count:
            resume = _resume_command(options, fleet_run_id)
            journal.record["resume_command"] = resume
            raise FleetError(f"interrupted during the restore, which was waited for: the "
                             f"database was restored once on {decision['host']}; no host was "
                             "rolled back: THE SERVICE IS DOWN on every host (drained)",
                             f"resume now: `{resume}` rolls every host back on the restored "
                             "database (it never restores again)",
                             exit_code=ExitCode.ATTENTION)
        return
    run.close()  # the playbook stops before the rollout (already ended if the play failed)
    if res is not None:
        journal.phase("database", t1, "failed", decision={**decision, "status": "failed",
                                                          "restore_run": out})
    journal.record["database"] = {**decision, "status": "not restored"}
    why = (out.get("error") or _one_line(str((res or {}).get("stderr") or "")) if res is not None
           else "interrupted (Ctrl-C or SIGTERM) before it started" if interrupts.count
           and not failed else "not run: " + ("; ".join(failed) or "the play stopped before it"))
    started = (decision["host"] in events.started.get("restore the snapshot", {})
               and not restore_skipped)
    if (res is None and started) or (res is not None and rc not in (1, 2, 3, 4)):
        # only a restore that said it failed (exit 1-4) left the database as it was; one that
        # lost its connection (no exit code), exit 5, or no answer at all may have restored it:
        # the hosts stay down, never the new code started on an unknown database
        how = (f"exit {rc}: {why}" if rc is not None else
               f"the connection was lost: {(res or {}).get('msg') or 'no answer'}")
        journal.record["database"] = {**decision, "status": "unknown"}
        raise FleetError(f"maintenance: the outcome of the restore on {decision['host']} is "
                         f"unknown ({how}); the database may or may not be restored; THE "
                         "SERVICE IS DOWN on every host (left drained)",
                         f"on {decision['host']} run `runbook status {db_arg}` and read its "
                         "last run record (~/.togather/runs/) and `runbook snapshot list "
                         f"{db_arg}` to see whether the restore finished; do not start the "
                         "hosts on an unknown database", exit_code=ExitCode.ATTENTION, lines=failed)
    # each container with the Id its drain stopped: the undrain starts that one only, never
    # another container given the name since (a host that named none: its own log's Id)
    undo = _undo(drained, drained_ids)
    # a drain that started and did not say what it stopped (it failed, or its connection was
    # lost) may have stopped the host's slots: never reported as "started again", nor left
    # out when another host's undrain failed (it was: found by review)
    lost = [h for h in targets if h not in drained and h not in skipped
            and (h in events.started.get("drain", {}) or h in events.unreachable)]
    # a host whose drain stopped nothing was down before this run (found by review: another
    # run's drain, its controller killed): never said "started again", its undo named; said so
    # too when another host's undrain fails or its drain was lost (found by review: unnamed)
    idle = [h for h, c in drained.items() if not c]
    before = _down_before(idle, options, fleet_run_id, inventory, args) if idle else None
    undrain: dict[str, dict[str, Any]] = {}  # host -> what its undrain started and refused
    # written before the undrain: a controller killed during it leaves a record its resume
    # reads as "the restore did not run", and finishes the undrain (_unfinished)
    journal.record["undrain_planned"] = undo
    journal.save()
    if undo:
        say(f"maintenance: the database was not restored; starting again {len(undo)} "
            "drained host(s)")
        uevents = Events()
        run_playbook("undrain.yml", inventory,
                     {**_controller_vars(fleet_run_id, inventory, targets, options.reason),
                      "fleet_undo": undo}, uevents, forks=len(undo))
        results = uevents.results.get("undrain", {})
        undrain = {h: _undrained(results.get(h)) for h in undo}
        left = [h for h in undo if undrain[h]["status"] != "started again"]
        journal.set(undrained=[h for h in undo if h not in left], undrain_failed=left,
                    undrain=undrain)
        if left:
            raise _undrain_failed(why, left, undrain, undo, args, failed, lost, before)
    if lost:
        raise FleetError(f"maintenance stopped before the restore ({why}); the database was not "
                         "touched and the drained hosts were started again, but the drain of "
                         f"{', '.join(lost)} failed or was lost: THE SERVICE MAY BE DOWN there"
                         + (f"; {before[1]}" if before else ""),
                         (f"on {', '.join(idle)}: {before[2]}; " if before else "") + "run "
                         + _commands("runbook status {env}", lost, args, "on each")
                         + "; if its slots are stopped, start what its drain stopped, "
                         "by the Ids its log holds (" + _commands(
                             "runbook fleet drain {env} --undo <its app slot containers, "
                             "comma-separated>", lost, args, "") + "; never `docker start` "
                         "by name: another container may hold it), then run the same command "
                         "again", exit_code=ExitCode.ATTENTION,
                         lines=failed + (before[0] if before else []),
                         fields={"undrain": undrain})
    sessions = "--end-sessions" in str(out.get("fix") or "")  # the host's restore refused
    if before:
        lines, said, fix = before
        raise FleetError(f"maintenance stopped before the restore ({why}); the database was not "
                         f"touched and the hosts this run drained were started again, but {said}",
                         f"{fix}; then "
                         + _commands("runbook status {env}", idle, args, f"on {', '.join(idle)}")
                         + ", then run the same command again",
                         exit_code=ExitCode.ATTENTION, lines=failed + lines,
                         fields={"undrain": undrain})
    raise FleetError(f"maintenance stopped before the restore ({why}); the database was not "
                     "touched and every drained host was started again", "fix the cause, then "
                     "run the same command again" + (
                         " (other sessions on the shared database: stop what they belong to, "
                         "or add --end-sessions to end them)" if sessions else ""),
                     exit_code=ExitCode.FAILED_SAFELY, lines=failed, fields={"undrain": undrain})


def _down_before(idle: list[str], options: Options, fleet_run_id: str, inventory: Inventory,
                 args: dict[str, str]) -> tuple[list[str], str, str]:
    """Hosts whose drain found no app slot running: down before this run's drain, and left
    down by it (it started nothing there). (A line per host: the undo of the unfinished run
    that drained it, else that this run did not start it; what the error says; its fix.)"""
    earlier = _earlier_drains(options.journal_dir, idle, fleet_run_id,
                              {h: inventory.env(h) for h in idle})
    lines = [f"{h}: drained by fleet run {earlier[h][0]}: `runbook fleet drain "
             f"{args.get(h, 'ENV')} --undo {earlier[h][1]}`" if h in earlier else
             f"{h}: its drain found no app slot running: not started by this run"
             for h in idle]
    who = sorted({earlier[h][0] for h in idle if h in earlier})
    said = (f"{', '.join(idle)} had no app slot running before this run's drain"
            + (f" (drained by fleet run {', '.join(who)}, which never finished)" if who else "")
            + ": THE SERVICE IS DOWN there")
    fix = ("start each again with the undo on its line below (by Id; never `docker start` by "
           "name)" + (" or by the resume of that run" if who else ""))
    return lines, said, fix


def _ids(answer: dict[str, Any]) -> dict[str, str]:
    """A drain answer's `stopped_ids` (container -> the Id it stopped)."""
    ids = answer.get("stopped_ids")
    return {str(k): str(v) for k, v in ids.items() if v} if isinstance(ids, dict) else {}


def _undo(drained: dict[str, list[str]], ids: dict[str, dict[str, str]]) -> dict[str, str]:
    """Each host's `--undo` value: each container with the Id its drain stopped, so the
    undrain starts that one only, never another container given the name since (a host that
    named none: its own log's Id). Hosts whose drain stopped nothing are left out."""
    return {h: ",".join(f"{n}@{ids[h][n]}" if ids.get(h, {}).get(n) else n for n in c)
            for h, c in drained.items() if c}


def _drained_by(record: dict[str, Any]) -> dict[str, str]:
    """What a fleet run's journal says its drain stopped, as each host's `--undo` value: its
    drain phase, else (killed before that was written) the drain answers as they came."""
    phase = _drain_phase(record)
    if phase:
        stopped, ids = phase.get("stopped") or {}, phase.get("stopped_ids") or {}
    else:
        given = record.get("drain_answers")  # a damaged journal: nothing, never a crash
        answers = {h: a for h, a in given.items()
                   if isinstance(a, dict)} if isinstance(given, dict) else {}
        stopped = {h: a.get("stopped") or [] for h, a in answers.items()}
        ids = {h: a.get("stopped_ids") or {} for h, a in answers.items()}
    if not isinstance(stopped, dict) or not isinstance(ids, dict):
        return {}
    return _undo({str(h): [str(n) for n in c] for h, c in stopped.items() if isinstance(c, list)},
                 {str(h): {str(k): str(v) for k, v in i.items()} for h, i in ids.items()
                  if isinstance(i, dict)})


_JOURNAL_READ_MAX = 64 * 1024 * 1024  # bytes: a fleet journal larger is not another run's


def _earlier_drains(directory: Path | None, hosts: list[str], this_run: str,
                    environments: dict[str, str]) -> dict[str, tuple[str, str]]:
    """For each of `hosts`, an earlier maintenance run of this journal folder that never
    finished and whose drain stopped its app slots: (its fleet run id, the host's undo).
    Passed over (found by review): a run a later run resumed (the resume finished its
    undrain, or journaled it as its own, and is found itself), and a host its run knew under
    another environment (`environments`: this run's, host -> runbook_env): a staging run's
    Ids in the same folder are never named as a production host's undo."""
    records: list[dict[str, Any]] = []
    folder = directory or fjournal.default_dir()
    for path in sorted(folder.glob("fleet_*.json"), reverse=True):  # newest first
        try:
            if path.stat().st_size > _JOURNAL_READ_MAX:
                continue
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            records.append(record)
    resumed = {str(r.get("resumed_from")) for r in records if r.get("resumed_from")}
    found: dict[str, tuple[str, str]] = {}
    for record in records:
        run_id = str(record.get("fleet_run_id"))
        if run_id in (this_run, *resumed) or record.get("outcome") is not None \
                or record.get("dry_run") or not record.get("maintenance_drain_started"):
            continue
        known = record.get("environments")
        known = known if isinstance(known, dict) else {}
        for host, undo in _drained_by(record).items():
            if host not in hosts or host in found:
                continue
            if host in known and host in environments and known[host] != environments[host]:
                continue  # that host under another environment: not this one's containers
            found[host] = (run_id, undo)
    return found


def _undrained(res: dict[str, Any] | None) -> dict[str, Any]:
    """What a host's undrain answered, as its JSON's fields say it (`drain.undo`): the
    containers it started, found running, left as not drained, and each it refused with its
    own fix; its status is said from them only. "started" is all a start says: whether the
    host serves again was not checked. No answer (the connection lost): whether it started
    anything is unknown."""
    res = res or {}
    answer = _last_json(str(res.get("stdout", ""))) or {}
    lists = {k: [str(x) for x in v] if isinstance(v := answer.get(k), list) else []
             for k in ("started", "already_running", "not_drained")}
    refused = [r for r in answer.get("refused") or [] if isinstance(r, dict)]
    rc = res.get("rc")
    status = ("started again" if res.get("_event") == "runner_on_ok" else
              "unknown" if not answer else
              # exit 5: it started some (an older host's answer does not list them)
              "partly started again" if lists["started"] or rc == ExitCode.ATTENTION else
              "not started again")
    return {"status": status, "exit_code": rc, **lists, "refused": refused,
            "error": None if status == "started again" else _host_error(res)}


def _undrain_failed(why: str, left: list[str], undrain: dict[str, dict[str, Any]],
                    undo: dict[str, str], args: dict[str, str], failed: list[str],
                    lost: list[str],
                    before: tuple[list[str], str, str] | None = None) -> FleetError:
    """The maintenance run stopped before its restore, and `left` hosts not all started
    again: each said as its undrain answered. A host whose undrain started some containers
    and refused one was named "could not be started again: THE SERVICE IS DOWN", what it
    started only inside its error's words (found by review). Now: DOWN only where nothing was
    started nor running; else what was started (not checked serving: MAY BE DOWN) and each
    container refused, on a line of its own with the host's exact fix for it. `lost`: hosts
    whose drain failed or was lost before it said what it stopped, said MAY BE DOWN too.
    `before`: the hosts down before this run's drain (_down_before), said DOWN, each named."""
    down = [h for h in left if undrain[h]["status"] == "not started again"
            and not undrain[h]["already_running"]]
    said = [f"{', '.join(down)} could not be started again: THE SERVICE IS DOWN there"] \
        if down else []
    lines = list(failed)
    for h in left:
        u = undrain[h]
        names = ", ".join(str(r.get("container")) for r in u["refused"]) or "see below"
        if u["status"] == "unknown":
            said.append(f"{h} did not answer its start-again (whether it started anything is "
                        "unknown): THE SERVICE MAY BE DOWN there")
        elif h not in down:
            done = (f"started: {', '.join(u['started']) or 'not listed'}"
                    if u["status"] == "partly started again" else "started: nothing")
            running = (f"; already running: {', '.join(u['already_running'])}"
                       if u["already_running"] else "")
            said.append(f"{h} was not fully started again ({done}{running}; not started: "
                        f"{names}): THE SERVICE MAY BE DOWN there")
        if u["started"] or u["already_running"]:
            lines.append(f"{h}: started again: {', '.join(u['started']) or 'nothing'}"
                         + (f"; already running: {', '.join(u['already_running'])}"
                            if u["already_running"] else "")
                         + " (started, not checked serving)")
        lines += [f"{h}: {r.get('error')}; fix: {r.get('fix')}" for r in u["refused"]]
        if not u["refused"]:
            lines.append(f"{h}: start again failed: {u['error']} (to start what its drain "
                         f"stopped: `runbook fleet drain {args.get(h, 'ENV')} --undo {undo[h]}` "
                         "there)")
    if lost:
        said.append(f"the drain of {', '.join(lost)} failed or was lost: THE SERVICE MAY BE "
                    "DOWN there")
    down_before = [line.split(":")[0] for line in before[0]] if before else []
    if before:
        said.append(before[1])
        lines += before[0]
    each = [h for h in left if undrain[h]["refused"]]
    rest = [h for h in left if not undrain[h]["refused"]]
    fix = "; ".join(
        ([f"for each container not started on {', '.join(each)}: the fix on its line"]
         if each else [])
        + ([f"on {', '.join(down_before)}: {before[2]}"] if before else [])
        + ([f"start its app slots on {', '.join(rest)} ("
            + _commands("runbook fleet drain {env} --undo ...", rest, args, "") + ")"]
           if rest else [])
        + ([f"on {', '.join(lost)}, if its slots are stopped, start what its drain stopped "
            "by the Ids its log holds (" + _commands(
                "runbook fleet drain {env} --undo <its app slot containers, comma-separated>",
                lost, args, "") + ")"] if lost else [])) + "; then " + _commands(
        "runbook status {env}", left + lost + down_before, args,
        f"on {', '.join(left + lost + down_before)}") \
        + " (whether it serves)"
    return FleetError(f"maintenance stopped before the restore ({why}); the database was not "
                      "touched, but " + "; ".join(said), fix, exit_code=ExitCode.ATTENTION,
                      lines=lines, fields={"undrain": undrain})


# ---------------------------------------------------------------------------------------------
# A resume: never roll a finished host again


UNKNOWN_OUTCOMES = (UNKNOWN, FAILED_ATTENTION, UNKNOWN_STARTED, UNKNOWN_NOT_RECORDED)


def _earlier(resumed: dict[str, Any] | None) -> tuple[dict[str, dict[str, Any]],
                                                      dict[str, dict[str, Any]]]:
    """What the resumed run and the runs it resumed knew: each host's latest outcome (status,
    fleet run id), and the deployment each host ran when a run of the chain first checked it."""
    if resumed is None:
        return {}, {}
    outcomes = dict(resumed.get("earlier_outcomes") or {})
    run_id = resumed.get("fleet_run_id", "?")
    for host, entry in (resumed.get("hosts") or {}).items():
        if isinstance(entry, dict) and entry.get("status"):
            status = UNKNOWN_NOT_RECORDED if entry["status"] == STARTED else entry["status"]
            outcomes[host] = {"status": status, "fleet_run_id": run_id}
    if resumed.get("outcome") is None and resumed.get("rollout_started"):
        # its controller died during the rollout: a host whose outcome it did not record may
        # have rolled back (or be rolling back)
        hosts = resumed.get("hosts") or {}
        for host in resumed.get("hosts_selected") or []:
            status = (hosts.get(host) or {}).get("status")
            if status in (None, NOT_STARTED, STARTED):
                outcomes[host] = {"status": UNKNOWN_NOT_RECORDED, "fleet_run_id": run_id}
    return outcomes, dict(resumed.get("started_from") or {})


def _resume_targets(selected: list[str], earlier: dict[str, dict[str, Any]], named: set[str],
                    resume: str | None, args: dict[str, str]) -> tuple[list[str],
                                                                       dict[str, str]]:
    """The hosts a resume rolls back, and those it skips (rolled back in the chain, with why).

    A host whose outcome is unknown there (unreachable during its rollback, or its own exit 5)
    is taken only when `--limit` names it: the operator checked it first. `args`: each
    host's environment as its own runbook names it (`_recorded_args`)."""
    skipped = {h: f"rolled back by fleet run {earlier[h]['fleet_run_id']}" for h in selected
               if earlier.get(h, {}).get("status") == ROLLED_BACK}
    unknown = [h for h in selected if h not in named
               and earlier.get(h, {}).get("status") in UNKNOWN_OUTCOMES]
    if unknown:
        raise FleetError(f"--resume {resume}: {', '.join(unknown)} had an unknown outcome in "
                         "that run and --limit does not name it; nothing was changed",
                         "check it first ("
                         + _commands("runbook status {env}", unknown, args)
                         + "), then name it in --limit to include it (a host rolled back "
                         "since is still refused), or leave it out", exit_code=ExitCode.USAGE,
                         lines=[f"{h}: {earlier[h]['status']} in fleet run "
                                f"{earlier[h]['fleet_run_id']}" for h in unknown])
    return [h for h in selected if h not in skipped], skipped


def _unfinished(resumed: dict[str, Any], say: Callable[[str], None],
                args: dict[str, str],
                undrain: Callable[[dict[str, str]], None] | None = None) -> str:
    """A resumed run that never finished: refused while its controller still runs (here);
    otherwise say what happened (its controller died: kill -9, a crash, a power loss). Returns
    its fleet run id when its controller ran on this machine and is gone (its fleet lock is
    taken over: the lock host cannot see this machine's processes), else "". `args`: each
    host's environment as its own runbook names it (`_recorded_args`).

    A maintenance run killed after its drain: when it had journaled that its restore did not
    run (before its undrain) and its controller ran here and is gone, `undrain` is given each
    drained host's undo and its id is returned: the resume takes over its fleet lock first and
    only then starts those hosts again (_finish_undrain); otherwise (the restore may have
    begun) refused, each drained host's exact undo named (found by review: none was). Its
    dry run is decided here too (found by review: it refused where the resume went on): it
    shows the undrain (_undrain_dry_run) or refuses with these very lines."""
    ctl = resumed.get("controller") or {}
    run_id = resumed.get("fleet_run_id", "?")
    pid, here = ctl.get("pid"), ctl.get("hostname") == socket.gethostname()
    start = ctl.get("pid_start") if isinstance(ctl.get("pid_start"), int) else None
    if here and isinstance(pid, int) and pid != os.getpid() and procs.pid_alive(pid, start):
        raise FleetError(f"--resume {run_id}: that fleet run is still running (pid {pid} on "
                         "this machine); nothing was changed", "wait for it to end (or stop "
                         "it with Ctrl-C), then resume", exit_code=ExitCode.LOCKED)
    database = resumed.get("database") or {}
    if resumed.get("maintenance_drain_started") and database.get("status") != "restored":
        drained = _drained_by(resumed)
        if (undrain is not None and here and database.get("status") == "not restored"
                and "undrain_planned" in resumed):
            # started again only under its fleet lock, taken over by the resume: another run
            # that took the stale lock meanwhile may be restoring with those slots drained
            undrain(drained)
            return str(run_id)
        db_arg = args.get(str(database.get("host")), "ENV")
        lock_arg = args.get(str(resumed.get("lock_host")), "ENV")
        undo_lines = [f"{h}: drained by fleet run {run_id}: `runbook fleet drain "
                      f"{args.get(h, 'ENV')} --undo {u}`" for h, u in drained.items()]
        raise FleetError(f"--resume {run_id}: that maintenance run never finished (its "
                         f"controller, pid {pid} on {ctl.get('hostname', '?')}, stopped during "
                         "the drain or the restore): hosts may be DOWN and the database may or "
                         "may not be restored; a resume would not know whether to restore; "
                         "nothing was changed" + (
                             f"; its drain stopped the app slots of {', '.join(drained)}"
                             if drained else ""),
                         ("only if the restore did not run (no safety snapshot of it in the "
                          "snapshot list), start each drained host again with the undo on its "
                          "line below (by Id; never `docker start` by name); " if drained
                          else "") + f"on {database.get('host', 'the lock host')} "
                         f"run `runbook status {db_arg}` and `runbook snapshot list {db_arg}`; "
                         "once its controller is surely gone, release its fleet lock on the "
                         f"lock host (`runbook fleet lock {lock_arg} --release --fleet-run "
                         f"{run_id}`: the lock "
                         "host cannot see the controller's process, so the lock would hold for "
                         "its whole lifetime), then run the fleet rollback again without "
                         "--resume: its pre-flight judges the database anew (--maintenance only "
                         "if it still needs the restore)",
                         exit_code=ExitCode.ATTENTION, lines=undo_lines)
    done = [h for h, e in (resumed.get("hosts") or {}).items()
            if isinstance(e, dict) and e.get("status") == ROLLED_BACK]
    say(f"fleet run {run_id} never finished: its controller (pid {pid} on "
        f"{ctl.get('hostname', '?')}) stopped without a word (killed, crashed or a power loss); "
        + (f"it recorded {', '.join(done)} rolled back; " if done else "")
        + ("hosts without a recorded outcome are unknown" if resumed.get("rollout_started")
           else "its rollout had not started: no host changed"))
    return str(run_id) if here else ""


def _finish_undrain(resumed: dict[str, Any], undo: dict[str, str], inventory: Inventory,
                    options: Options, say: Callable[[str], None], args: dict[str, str],
                    journal: fjournal.FleetJournal) -> None:
    """The undrain of a maintenance run killed after it journaled that its restore did not
    run: each host its drain stopped started again, by Id, through the same playbook (the
    undo refuses a name another container holds); then said as that run would have (raises).
    A host selected whose drain said nothing is said MAY BE DOWN, its undo by its log's Ids."""
    run_id, lost, failed, why = _undrain_facts(resumed)
    phase = _drain_phase(resumed)
    before = _down_before_resumed(resumed, options, str(journal.record["fleet_run_id"]),
                                  inventory, args)
    undrain: dict[str, dict[str, Any]] = {}
    # this run's own journal says the same before its undrain: killed during it, its lock (now
    # held under this run's id) names this run's resume, which must finish the undrain too; it
    # read "its rollout had not started: no host changed" and left the hosts down (review)
    stopped, ids = (phase.get("stopped"), phase.get("stopped_ids")) if phase else (None, None)
    answers = ({h: {"stopped": c, "stopped_ids": (ids or {}).get(h) or {}}
                for h, c in stopped.items()} if isinstance(stopped, dict)
               else resumed.get("drain_answers") or {})
    journal.set(maintenance_drain_started=True, drain_answers=answers,
                database={**(resumed.get("database") or {}), "status": "not restored",
                          "from_fleet_run": run_id})
    journal.record["undrain_planned"] = undo
    journal.save()
    if undo:
        say(_undrain_said(run_id, undo))
        uevents = Events()
        run_playbook("undrain.yml", inventory,
                     {**_controller_vars(run_id, inventory, list(undo), options.reason),
                      "fleet_undo": undo}, uevents, forks=len(undo))
        results = uevents.results.get("undrain", {})
        undrain = {h: _undrained(results.get(h)) for h in undo}
        left = [h for h in undo if undrain[h]["status"] != "started again"]
        if left:
            raise _undrain_failed(why, left, undrain, undo, args, failed, lost, before)
    raise _undrain_ended(run_id, why, undo, lost, failed, args, undrain, before)


def _drain_phase(record: dict[str, Any]) -> dict[str, Any]:
    """A fleet run's journaled drain phase ({} when it was killed before writing it)."""
    phases = record.get("phases")  # a damaged journal: nothing, never a crash
    phase = next((p for p in phases if isinstance(p, dict) and p.get("name") == "drain"),
                 {}) if isinstance(phases, list) else {}
    return phase if isinstance(phase, dict) else {}


def _drain_stopped(resumed: dict[str, Any]) -> dict[str, Any]:
    """What each host's drain in a killed run answered it stopped (host -> its containers),
    for the hosts whose drain answered: its journaled drain phase, else (killed before that
    was written) the answers as they came."""
    phase = _drain_phase(resumed)
    if phase:
        stopped = phase.get("stopped")
        return stopped if isinstance(stopped, dict) else {}
    answers = resumed.get("drain_answers")
    return {str(h): a.get("stopped") for h, a in answers.items()
            if isinstance(a, dict)} if isinstance(answers, dict) else {}


def _undrain_facts(resumed: dict[str, Any]) -> tuple[str, list[str], list[str], str]:
    """What a resume finishing a killed maintenance run's undrain knows before it starts any
    host, the real resume and its dry run alike: (that run's id, the hosts selected whose
    drain never answered, its drain's problem lines, why it stopped before its restore)."""
    run_id = str(resumed.get("fleet_run_id", "?"))
    selected = [h for h in resumed.get("hosts_selected") or [] if isinstance(h, str)]
    phase = _drain_phase(resumed)
    # a drain that answered, even one that stopped nothing; the others may have stopped slots
    lost = [h for h in selected if h not in _drain_stopped(resumed)]
    failed = [str(x) for x in phase.get("problems") or []]
    why = f"its restore did not run (fleet run {run_id}, its controller killed before it " \
          "started its drained hosts again)"
    return run_id, lost, failed, why


def _down_before_resumed(resumed: dict[str, Any], options: Options, fleet_run_id: str,
                         inventory: Inventory, args: dict[str, str]
                         ) -> tuple[list[str], str, str] | None:
    """The hosts whose drain in that killed run stopped nothing (down before it, left down:
    its undrain starts nothing there), as that run would have named them (_down_before).
    Found by review: its resume, and that resume's dry run, ended "every host ... drained was
    started again" (exit 1), such a host down and unnamed."""
    idle = [str(h) for h, c in _drain_stopped(resumed).items() if isinstance(c, list) and not c]
    return _down_before(idle, options, fleet_run_id, inventory, args) if idle else None


def _undrain_said(run_id: str, undo: dict[str, str]) -> str:
    return (f"fleet run {run_id} never finished: its controller stopped after its restore did "
            f"not run, before it started its drained hosts again; starting again {len(undo)} "
            "drained host(s)")


def _undrain_ended(run_id: str, why: str, undo: dict[str, str], lost: list[str],
                   failed: list[str], args: dict[str, str],
                   undrain: dict[str, dict[str, Any]],
                   before: tuple[list[str], str, str] | None = None) -> FleetError:
    """How that resume ends once each host it started again said so (the error it raises;
    its dry run shows it as what the resume would report). `before`: the hosts down before
    that run's drain (_down_before_resumed), said DOWN, each named."""
    if lost:
        return FleetError(f"--resume {run_id}: maintenance stopped before the restore ({why}); "
                          "the database was not touched and the drained hosts were started "
                          f"again, but the drain of {', '.join(lost)} failed or was lost: THE "
                          "SERVICE MAY BE DOWN there" + (f"; {before[1]}" if before else ""),
                          (f"on {', '.join(line.split(':')[0] for line in before[0])}: "
                           f"{before[2]}; " if before else "") + "run " + _commands(
                              "runbook status {env}", lost, args, "on each") + "; if its slots "
                          "are stopped, start what its drain stopped, by the Ids its log holds ("
                          + _commands("runbook fleet drain {env} --undo <its app slot "
                                      "containers, comma-separated>", lost, args, "")
                          + "), then run the fleet rollback again without --resume",
                          exit_code=ExitCode.ATTENTION,
                          lines=failed + (before[0] if before else []),
                          fields={"undrain": undrain})
    if before:
        idle = [line.split(":")[0] for line in before[0]]
        return FleetError(f"--resume {run_id}: maintenance stopped before the restore ({why}); "
                          f"the database was not touched and every host fleet run {run_id} "
                          "drained was started again"
                          + (f" ({', '.join(undo)})" if undo else "") + f", but {before[1]}",
                          f"{before[2]}; then "
                          + _commands("runbook status {env}", idle, args, f"on {', '.join(idle)}")
                          + ", then run the fleet rollback again without --resume",
                          exit_code=ExitCode.ATTENTION, lines=failed + before[0],
                          fields={"undrain": undrain})
    return FleetError(f"--resume {run_id}: maintenance stopped before the restore ({why}); the "
                      "database was not touched and every host fleet run "
                      f"{run_id} drained was started again"
                      + (f" ({', '.join(undo)})" if undo else ""),
                      "fix the cause, then run the fleet rollback again without --resume",
                      exit_code=ExitCode.FAILED_SAFELY, lines=failed,
                      fields={"undrain": undrain})


def _lock_as_read(events: Events, checks: dict[str, dict[str, Any]],
                  inventory: Inventory) -> dict[str, Any]:
    """The fleet lock as a dry run's pre-flight read it on the lock host (its host-check, or
    its "read the fleet lock" task when --limit leaves it out): {} for a free one."""
    if inventory.lock_host in checks:
        held = checks[inventory.lock_host].get("fleet_lock")
    else:
        read = events.results.get("read the fleet lock", {}).get(inventory.lock_host) or {}
        held = _last_json(str(read.get("stdout", "")))
    return held if isinstance(held, dict) and held.get("locked") else {}


def _undrain_argv(inventory: Inventory, host: str, undo: str, run_id: str,
                  holder: str) -> list[str]:
    """The command undrain.yml runs on `host` (its `fleet_host_env + fleet_argv`), for the
    dry run to print what runs (found by review: it left out `--holder` and the host's
    runbook_environment, so a line copied by hand loaded another config). Inventory values
    as written: a Jinja template in one is rendered only by Ansible, on the host."""
    extra = inventory.var(host, "runbook_environment", {}) or {}
    prefix = ["env", *(f"{k}={v}" for k, v in extra.items())] \
        if isinstance(extra, dict) and extra else []
    return [*prefix, str(inventory.var(host, "runbook_command", "runbook") or "runbook"),
            "fleet", "drain", inventory.env(host), "--undo", undo, "--fleet-run", run_id,
            "--holder", holder]


def _undrain_dry_run(resumed: dict[str, Any], undo: dict[str, str], inventory: Inventory,
                     held: dict[str, Any], args: dict[str, str],
                     fleet_run_id: str, options: Options) -> FleetResult:
    """The dry run of a resume that finishes a killed maintenance run's undrain (_unfinished
    decided it, as for the real resume): the fleet lock it takes over, each drained host's
    start by Id as the undrain playbook runs it there, and how the resume ends, from the same
    functions _finish_undrain uses. Found by review: the dry run refused ("a resume would not
    know whether to restore") where the real resume went on and started the hosts."""
    run_id, lost, failed, why = _undrain_facts(resumed)
    ctl = resumed.get("controller") or {}
    holder = (held.get("holder") or {}).get("fleet_run_id")
    lines = [f"fleet {fleet_run_id}: --resume {run_id}: that maintenance run never finished: "
             f"its restore did not run and its controller (pid {ctl.get('pid', '?')} on "
             f"{ctl.get('hostname', '?')}) is gone, before it started its drained hosts again",
             f"fleet lock on {inventory.lock_host}: "
             + (f"take over the stale fleet lock of {held.get('summary')}"
                if held and (holder == run_id or held.get("stale")) else
                "free: take it") + " (before any host is started)"]
    if undo:
        lines.append(f"start again {len(undo)} drained host(s), each container by the Id its "
                     "drain stopped (the undrain playbook runs there):")
        holder = _who()  # as _finish_undrain's _controller_vars
        lines += [f"    {h}: " + shlex.join(_undrain_argv(inventory, h, u, run_id, holder))
                  for h, u in undo.items()]
    else:
        lines.append("no drained host to start again: its drain stopped none")
    end = _undrain_ended(run_id, why, undo, lost, failed, args, {},
                         _down_before_resumed(resumed, options, fleet_run_id, inventory, args))
    lines += [("then it stops" if not undo else "then, each started again, it stops")
              + f" (exit {int(end.exit_code)}): {end.message}", f"    fix: {end.fix}",
              *(f"    {line}" for line in end.lines)]
    if undo:
        lines.append("a host not started again is said DOWN (or MAY BE DOWN) with its own fix "
                     f"(exit {int(ExitCode.ATTENTION)})")
    return FleetResult(fleet_run_id, 0, [*lines, "Dry run: nothing was changed."])


def _gone_here(record: dict[str, Any]) -> bool:
    """Whether a fleet run's controller ran on this machine and is gone: its fleet lock, if
    left behind, can be taken over by its resume (the lock host cannot see this machine's
    processes, so to it the lock is live for its whole 30 minutes)."""
    ctl = record.get("controller") or {}
    pid, start = ctl.get("pid"), ctl.get("pid_start")
    return (ctl.get("hostname") == socket.gethostname() and isinstance(pid, int)
            and pid != os.getpid()
            and not procs.pid_alive(pid, start if isinstance(start, int) else None))


_RUN_ID = re.compile(r"fleet_\d{8}_\d{6}_[0-9a-f]{6}")


def _name_the_resume(refused: FleetError, options: Options, args: dict[str, str],
                     lock_host: str) -> None:
    """A fleet lock held by a run of this machine whose controller is gone (kill -9, a crash,
    or a run that recorded its outcome but could not release its lock: the lock host
    unreachable at its end, or killed before the release): the lock host cannot see this
    machine's processes, so it refuses for the lock's whole lifetime with "wait for it to
    finish". That run's journal is here: name its resume, which takes the lock over and never
    rolls a finished host back again; or, with nothing left to resume, the lock's release.
    `args`: each host's environment as its own runbook names it (`env_args`); `lock_host`:
    the host whose fleet lock refused."""
    run_id = (refused.holder or {}).get("fleet_run_id")
    if not (isinstance(run_id, str) and _RUN_ID.fullmatch(run_id)) \
            or refused.exit_code != ExitCode.LOCKED:
        return  # the id names the journal file: only the shape fjournal.new_id makes
    try:
        record = fjournal.load(run_id, options.journal_dir)
    except RunbookError:
        return  # another machine's run, or its journal elsewhere: nothing here tells
    if record.get("dry_run") or not _gone_here(record):
        return
    pid = (record.get("controller") or {}).get("pid")
    named = {**_recorded_args(record, args), lock_host: args.get(lock_host, "ENV")}
    release = f"`runbook fleet lock {named[lock_host]} --release --fleet-run {run_id}`"
    outcome = record.get("outcome")
    earlier, _ = _earlier(record)
    selected = [h for h in record.get("hosts_selected") or [] if isinstance(h, str)]
    if outcome is not None:
        refused.message += (f"; that fleet run ended ({outcome}) but left its fleet lock "
                            f"behind: its controller (pid {pid} on this machine) is gone")
        if selected and all(earlier.get(h, {}).get("status") == ROLLED_BACK for h in selected):
            # its resume would have nothing to roll back, and would end before the lock
            refused.fix = (f"every host it selected was rolled back: nothing is left to "
                           f"resume; release its lock there ({release}), then run again")
            return
    else:
        refused.message += (f"; that fleet run never finished: its controller (pid {pid} on "
                            "this machine) is gone")
        database = record.get("database") or {}
        if record.get("maintenance_drain_started") and database.get("status") != "restored":
            # its resume is refused (_unfinished): whether the database was restored is unknown
            refused.fix = (f"it stopped during its maintenance drain or restore: hosts may be "
                           "DOWN and the database may or may not be restored; check `runbook "
                           f"status {named[lock_host]}` and `runbook snapshot list "
                           f"{named[lock_host]}` on the lock host, "
                           f"release its lock there ({release}), then run the fleet rollback "
                           "again without --resume")
            return
    inventory = record.get("inventory")
    where = (shlex.quote(inventory) if isinstance(inventory, str) and Path(inventory).is_absolute()
             else _inventory_arg(options))  # the dead run's inventory, when its path says
    # its own --limit: a resume without one selects the whole inventory (found by review: a
    # run limited to two hosts was "resumed" on every host)
    limit = record.get("limit")
    resume = str(record.get("resume_command") or _resume_command(
        _recorded_options(record, options), run_id, where=where,
        limit=[limit] if isinstance(limit, str) and limit.strip() else None))
    if options.journal_dir is not None and " --journal-dir " not in resume:
        # where this run looked (a record written before resume commands named it)
        resume += f" --journal-dir {shlex.quote(str(options.journal_dir.absolute()))}"
    unknown = [h for h in selected if earlier.get(h, {}).get("status") in UNKNOWN_OUTCOMES]
    check = ("; first check each host it recorded no outcome for ("
             + _commands("runbook status {env}", selected, named) + ")"
             if outcome is None and record.get("rollout_started") else
             f"; first check {', '.join(unknown)} ("
             + _commands("runbook status {env}", unknown, named) + "): its outcome was unknown"
             if unknown else "")
    refused.fix = (f"finish it with `{resume}` (it takes that lock over and never rolls a "
                   f"host it rolled back again{check}); or, to start afresh, release the lock "
                   f"there ({release})")


def _recorded_options(record: dict[str, Any], options: Options) -> Options:
    """This run's options with the dead run's own canary group and batches, as its journal
    recorded them (a record written before they were journaled: this run's), for its resume
    command: a resume with another canary group has another canary, maybe another lock host."""
    from dataclasses import replace

    group, spec = record.get("canary_group"), record.get("batches_spec")
    return replace(options, canary_group=group if isinstance(group, str) and group
                   else options.canary_group,
                   batches=spec if isinstance(spec, str) and spec else options.batches)


def _changed_since(checks: dict[str, dict[str, Any]], targets: list[str],
                   started_from: dict[str, dict[str, Any]]) -> list[str]:
    """Pre-flight problems of a resume: a host that no longer runs the deployment its run
    first saw was rolled back (or changed) since; its rollback now would go elsewhere (back
    to the release that run rolled back from). A host finishing its own interrupted rollback
    (its dry run is a finish plan) is let through."""
    out = []
    for host in targets:
        then, now = started_from.get(host), (checks.get(host) or {}).get("deployment")
        finishing = (checks.get(host) or {}).get("dry_run", {}).get("facts", {}).get("finishing")
        if then and now and now.get("id") != then.get("id") and not finishing:
            out.append(f"{host}: changed since fleet run {then.get('fleet_run_id')} checked it "
                       f"(it ran {then.get('version')} ({then.get('id')}), now "
                       f"{now.get('version')} ({now.get('id')})): already rolled back, so a "
                       "rollback now would not be the one planned; leave it out of --limit")
    return out


def _rolled_back_already(checks: dict[str, dict[str, Any]], targets: list[str],
                         args: dict[str, str]) -> list[str]:
    """Pre-flight problems: hosts whose last change was a rollback. Their own `rollback` goes
    to their previous deployment, the release they were rolled back from: forward. With every
    selected host rolled back already (a rerun after a failed run, a --limit of the done
    ones) no majority tells them apart, and the fleet rolled them forward, "rolled back",
    exit 0. A host finishing its own interrupted rollback is let through. `args`: each host's
    environment as its own runbook names it (`env_args`)."""
    out = []
    for host in targets:
        data = checks.get(host) or {}
        if data.get("dry_run", {}).get("facts", {}).get("finishing"):
            continue
        deployment = data.get("deployment") or {}
        if left := deployment.get("rolled_back_from"):
            out.append(f"{host}: already rolled back (it runs {deployment.get('version')}, "
                       f"rolled back from {left}): its rollback would go forward to {left}; "
                       "leave it out with --limit (to go further back, roll it on its own: "
                       f"`runbook rollback {args.get(host, 'ENV')} --to VERSION` "
                       "there)")
    return out


def _mixed_releases(checks: dict[str, dict[str, Any]], targets: list[str],
                    args: dict[str, str]) -> list[str]:
    """Pre-flight problems: hosts that do not run what the others run. A host already rolled
    back (by hand, or by a run this one is not resuming) has the fleet's target as its current
    deployment, and its own `rollback` would go to ITS previous one: forward, to the release
    the fleet is leaving. Which host is odd is told by the majority; a tie names every host.
    A host finishing its own interrupted rollback is let through (as in `_changed_since`)."""
    runs = {}
    for host in targets:
        data = checks.get(host) or {}
        if data.get("dry_run", {}).get("facts", {}).get("finishing"):
            continue
        version = (data.get("deployment") or {}).get("version")
        if version:
            runs[host] = version
    counts = sorted(((list(runs.values()).count(v), v) for v in set(runs.values())),
                    reverse=True)
    if len(counts) <= 1:
        return []
    common = counts[0][1] if counts[0][0] > counts[1][0] else None
    others = f"the other host(s) run {common}" if common else (
        "the hosts run different releases: " + ", ".join(f"{h} {v}" for h, v in runs.items()))
    return [f"{host}: runs {version}, {others}: rolled back or deployed apart, so its rollback "
            "would not go where the others' go; roll it on its own (`runbook rollback "
            f"{args.get(host, 'ENV')}` there) or leave it out with --limit"
            for host, version in runs.items() if version != common]


def _pins(checks: dict[str, dict[str, Any]], targets: list[str]) -> dict[str, dict[str, str]]:
    """What each host's rollback must find and where it must go, as its pre-flight saw it:
    `--expect-from` (what its dry run rolls back from: what serves, which the host's rollback
    compares it with; the file's current may be swapped by the old tooling) and `--to` (its
    dry run's target). A host that changed in between (rolled back by hand meanwhile) then
    refuses instead of rolling on."""
    pins: dict[str, dict[str, str]] = {}
    for host in targets:
        data = checks.get(host) or {}
        facts = data.get("dry_run", {}).get("facts", {})
        pin = {}
        if version := facts.get("from") or (data.get("deployment") or {}).get("version"):
            pin["from"] = str(version)
        if to := facts.get("to"):
            pin["to"] = str(to)
        pins[host] = pin
    return pins


# ---------------------------------------------------------------------------------------------
# The command


class _Interrupts:
    """First Ctrl-C (or SIGTERM): start no further batch (the playbook checks `stop_file` before
    each); the second: stop Ansible now."""

    def __init__(self) -> None:
        self.count = 0
        self._dir = tempfile.TemporaryDirectory(prefix="togather-fleet-stop-")
        self.stop_file = Path(self._dir.name) / "stop"

    def cleanup(self) -> None:
        self._dir.cleanup()

    @contextlib.contextmanager
    def installed(self, say: Callable[[str], None], first: str = "interrupted: no further host "
                  "will start; hosts already rolling back finish") -> Iterator[None]:
        def handler(signum: int, frame: object) -> None:
            self.count += 1
            with contextlib.suppress(OSError):
                self.stop_file.touch()
            say(first if self.count == 1 else "interrupted again: stopping Ansible now")

        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM outside the rollout: stop like Ctrl-C, so the fleet lock is released."""
    raise KeyboardInterrupt


def rollback(options: Options, *, confirm: Callable[[str], bool] | None,
             say: Callable[[str], None]) -> FleetResult:
    """The whole fleet rollback. Raises FleetError (with per-host lines) when it stops.

    A fleet lock that could not be released is said, added to the result's lines (or the
    error's), and journaled (`fleet_lock_release_failed`), whatever the output format."""
    unreleased: list[str] = []
    try:
        result = _rollback(options, confirm=confirm, say=say, unreleased=unreleased)
    except FleetError as exc:
        exc.lines = [*exc.lines, *unreleased]
        raise
    result.lines = [*result.lines, *unreleased]
    return result


def _rollback(options: Options, *, confirm: Callable[[str], bool] | None,
              say: Callable[[str], None], unreleased: list[str]) -> FleetResult:
    refresh_in = refresh_after()  # a bad setting is refused before anything is written
    beat_every = heartbeat_every()  # likewise
    ssh_alive()  # likewise
    inv.runner()  # likewise: before any lock or journal
    inventory = inv.read(options.inventory, options.canary_group)
    if not inventory.canary:  # a missing or misspelled group would silently mean no canary
        raise UsageError(f"the inventory {options.inventory} has no hosts in a group "
                         f"{options.canary_group!r} (the canary hosts, rolled back first); "
                         "nothing was changed", f"add a {options.canary_group!r} group naming "
                         "the host(s) to roll back first, or name your canary group with "
                         "--canary-group (groups: "
                         + ", ".join(g for g in inventory.groups
                                     if g not in ("all", "ungrouped")) + ")")
    targets = inventory.select(options.limit)
    if not targets:
        raise UsageError("no host selected", "check --limit against the inventory")
    envs = {h: inventory.env(h) for h in targets}
    mixed = _one_environment(inventory, targets, envs)
    if mixed is not None:  # before any SSH, from the inventory's runbook_env
        raise UsageError(*mixed)
    lock_env = inventory.env(inventory.lock_host)
    if lock_env != envs[targets[0]]:
        raise UsageError(f"the fleet lock host {inventory.lock_host} is of environment "
                         f"{lock_env}, the selected hosts of {envs[targets[0]]}: their fleet "
                         "lock would not be the one taken; nothing was changed",
                         f"set fleet_lock_host to a host of {envs[targets[0]]} in these "
                         "hosts' vars (e.g. their group's)")
    # how each host's own runbook names its environment, for the fixes printed for it: the
    # inventory's word until its host-check says (refined after pre-flight, and journaled)
    args = env_args(inventory, list(dict.fromkeys([*targets, inventory.lock_host])))
    left_out = [h for h in inventory.hosts if h not in targets]
    resumed = fjournal.load(options.resume, options.journal_dir) if options.resume else None
    if resumed is not None:
        _same_environments(resumed, inventory, targets)
        # what the resumed run heard from its hosts: a host that does not answer this run
        # keeps it, in this run's fixes and journal (found by review: the inventory's word)
        args.update({h: a for h, a in _recorded_args(resumed, {}).items() if h in args})
    # a resume drains only what it names when the run it resumes has restored the database
    # (never restored again); one that stopped before its restore restores it now, so every
    # host must be drained first, as on a first run (found by review)
    restored = ((resumed or {}).get("database") or {}).get("status") in ("ok", "restored")
    if options.end_sessions and not options.maintenance:
        raise UsageError("--end-sessions only makes sense with --maintenance (the only fleet "
                         "rollback that restores the database); nothing was changed",
                         "add --maintenance, or drop --end-sessions")
    if options.maintenance and left_out and not restored:
        # the restore replaces the database every host shares: a host not drained would go on
        # serving the new code on the restored (older) schema
        raise UsageError(f"--maintenance restores the database every host of the inventory "
                         f"shares, so it drains them all, and --limit leaves out "
                         f"{', '.join(left_out)}; nothing was changed",
                         "drop --limit (or take out of the inventory the hosts that do not "
                         "use this database)")
    take_over = ""
    unfinished_undo: list[dict[str, str]] = []  # a killed maintenance run's, to finish
    if resumed is not None and not resumed.get("dry_run"):
        if resumed.get("outcome") is None:
            take_over = _unfinished(resumed, say, _recorded_args(resumed, args),
                                    # its dry run shows what it does
                                    unfinished_undo.append)
        elif _gone_here(resumed):
            # it recorded its outcome but its lock may be left behind (its release failed,
            # the lock host unreachable at its end; or killed before the release): the lock
            # host takes over only a lock held by exactly this run id
            take_over = str(resumed.get("fleet_run_id", ""))
    earlier, started_from = _earlier(resumed)
    targets, skipped = _resume_targets(targets, earlier, inventory.named(options.limit),
                                       options.resume, _recorded_args(resumed or {}, args))
    fleet_run_id = fjournal.new_id()
    skip_lines = [f"{h}: skipped: {why}" for h, why in skipped.items()]
    for line in skip_lines:
        say(line)
    if not targets:
        return FleetResult(fleet_run_id, 0, [*skip_lines, "nothing left to roll back: every "
                                             "selected host was rolled back; nothing was "
                                             "changed"])
    plan = inv.batches(targets, inventory.canary, options.batches)
    journal = fjournal.FleetJournal(fleet_run_id, options, inventory, targets, plan, _who())
    journal.on_error = say
    journal.set(earlier_outcomes=earlier, skipped=skipped, started_from=started_from,
                environment_args=dict(args))
    plan_lines = [f"fleet {fleet_run_id}: {len(targets)} host(s) from {inventory.path}",
                  *skip_lines, f"fleet lock on {inventory.lock_host}"]
    plan_lines += [f"batch {i + 1}{' (canary)' if b[0] in inventory.canary else ''}: "
                   f"{', '.join(b)}" for i, b in enumerate(plan.batches)]
    if plan.split:
        plan_lines.append(f"batches of more than {inv.MAX_FORKS} hosts were split: Ansible runs "
                          f"at most {inv.MAX_FORKS} at once, and a failure must stop the rest "
                          "of its batch")

    # -- pre-flight (and the fleet lock), read-only -------------------------------------------
    t0 = time.monotonic()
    locked = not options.dry_run  # from the moment the take is asked for: released in finally
    old_term = signal.signal(signal.SIGTERM, _interrupt)
    hosts = {h: HostResult(h) for h in targets}
    interrupts = _Interrupts()
    run: PlaybookRun | None = None
    heartbeat = contextlib.ExitStack()
    try:
        if not options.dry_run:  # from its start: a controller killed later leaves a record
            try:
                _journal_or_refuse(journal)
            except FleetError as exc:
                exc.lock_not_taken = True  # Ansible not started: no lock to release
                raise
        events = _host_events(hosts, say, None if options.dry_run else journal, args)
        extravars = {**_controller_vars(fleet_run_id, inventory, targets, options.reason),
                     "fleet_take_lock": not options.dry_run,
                     "fleet_take_over": take_over,
                     "fleet_maintenance": options.maintenance,
                     "fleet_end_sessions": options.end_sessions,
                     "fleet_preflight_hosts": ",".join(dict.fromkeys(
                         [*targets, inventory.lock_host])),
                     "fleet_serial": plan.serial,
                     "fleet_refresh_after": journal.started + refresh_in,
                     "fleet_stop_file": str(interrupts.stop_file)}
        run = PlaybookRun(inventory, extravars, events, forks=len(targets) + 1,
                          cancel=lambda: interrupts.count >= 2)
        reached = run.wait_gate("preflight")
        if not reached:
            status = run.join()
            if not events.results:
                raise FleetError(f"ansible-playbook ended before pre-flight ({status}); "
                                 "nothing was changed", "run with the same inventory "
                                 "through `ansible-inventory --list` to see why",
                                 exit_code=ExitCode.PRECONDITION)
        def heard() -> None:  # as the hosts answered, the lock host's take or read among them
            args.update(env_args(inventory, list(args), _answers(events), args))
            journal.set(environment_args=dict(args))

        try:
            checks, problems, lock_res = preflight(events, inventory, targets,
                                                   fleet_run_id=fleet_run_id,
                                                   take_lock=not options.dry_run,
                                                   take_over=take_over, known=args)
        except FleetError as exc:
            heard()
            _name_the_resume(exc, options, args, inventory.lock_host)
            raise
        heard()
        # what the hosts report (a RUNBOOK_CONFIG in runbook_environment names it): one
        # environment, as the inventory's runbook_env said
        said = {h: str(checks[h].get("environment") or envs[h]) for h in targets if h in checks}
        mixed = _one_environment(inventory, list(said), said, "the selected hosts (and the "
                                 "fleet lock host) report")
        if mixed is not None:
            raise FleetError(*mixed, exit_code=ExitCode.USAGE)
        problems += _changed_since(checks, targets, started_from)
        problems += _rolled_back_already(checks, targets, args)
        problems += _mixed_releases(checks, targets, args)
        journal.set(started_from={**{h: {**checks[h]["deployment"], "fleet_run_id": fleet_run_id}
                                     for h in targets if (checks.get(h) or {}).get("deployment")},
                                  **started_from})
        if not options.dry_run:  # the lock is ours: kept fresh until it is released
            beat_vars = _controller_vars(fleet_run_id, inventory, targets, options.reason)
            heartbeat.enter_context(_lock_heartbeat(
                lambda cancelled: _refresh_on_lock_host(inventory, beat_vars, cancelled),
                beat_every))
            taken = lock_res
            if taken.get("taken_over"):
                say(f"took over a stale fleet lock: {taken['taken_over']}")
                journal.set(stale_fleet_lock_taken_over=taken["taken_over"])
            if unfinished_undo and resumed is not None:  # under the fleet lock: raises
                _finish_undrain(resumed, unfinished_undo[0], inventory, options, say, args,
                                journal)
        if options.dry_run and unfinished_undo and resumed is not None:  # as the above runs
            refused = _undrain_take_refused(events, checks, inventory, targets, args,
                                            fleet_run_id)
            if refused is not None:  # the resume's take refuses: so does its dry run
                raise refused
            return _undrain_dry_run(resumed, unfinished_undo[0], inventory,
                                    _lock_as_read(events, checks, inventory), args,
                                    fleet_run_id, options)
        restore = _needs_restore(checks)
        db_host = inventory.lock_host if inventory.lock_host in targets else targets[0]
        maintenance = None
        if options.maintenance and restore is not None:
            maintenance, problems = _maintenance_plan(checks, problems, db_host, inventory,
                                                      len(targets))
            restore = None
        journal.phase("preflight", t0, "failed" if problems else "ok",
                      hosts={h: checks.get(h) for h in targets}, problems=problems)
        reused = (resumed or {}).get("database") or {}
        if resumed is not None and reused.get("status") in ("ok", "restored"):
            database = {**reused, "reused_from": resumed["fleet_run_id"]}
            maintenance = None  # the restore is never repeated by a resume
            if reused.get("status") == "restored" and resumed.get("maintenance_drain_started"):
                # its hosts not rolled back are still drained: one that fails again is down
                # (exit 5, "DOWN since the drain"), never "failed but serving"
                journal.set(maintenance_drain_started=True)
        elif maintenance is not None:
            database = maintenance
        else:
            database = database_phase(checks, db_host)
        if options.maintenance and maintenance is None and "reused_from" not in database:
            raise FleetError("--maintenance: this rollback needs no snapshot restore, so no "
                             "host needs to go down; nothing was changed",
                             "run the same command without --maintenance (a rolling "
                             "rollback)", exit_code=ExitCode.USAGE, lines=problems)
        if maintenance is None:
            journal.phase("database", time.monotonic(), str(database.get("status", "?")),
                          decision=database)
        journal.record["database"] = database
        if restore is not None:
            message = ("the shared database needs a snapshot restore before the code can go "
                       f"back ({restore.split(';')[0]}): a rolling rollback is refused, since "
                       "hosts still on the new version would meet the old schema; nothing was "
                       "changed")
            fix = ("take the maintenance path: drain every host, restore the snapshot once, "
                   "switch every host, canary first: the same command with --maintenance "
                   "(THE SERVICE IS DOWN meanwhile; --dry-run first shows the plan)")
            raise FleetError(message, fix, exit_code=ExitCode.PRECONDITION,
                             lines=[p for p in problems if not any(w in p for w in SCHEMA_WORDS)])
        if problems:
            code = _refusal_code(problems)
            raise FleetError(f"pre-flight failed on {len({p.split(':')[0] for p in problems})} "
                             f"of {len(targets)} host(s); nothing was changed",
                             ("wait for the run holding each lock below to finish"
                              if code == ExitCode.LOCKED else "fix each host below")
                             + ", then run the same command again",
                             exit_code=code, lines=problems)
        if not reached:
            raise FleetError(f"ansible-playbook ended before the controller's decision "
                             f"({run.join()}); nothing was changed", "run the same command "
                             "again; if it repeats, run the playbook by hand with -vvv",
                             exit_code=ExitCode.PRECONDITION)
        steps_before: dict[str, Any] | None = None
        if maintenance is not None:
            plan_lines += _maintenance_lines(maintenance, len(targets))
            command = (f"runbook snapshot restore {args[db_host]} "
                       f"{shlex.quote(str(maintenance['snapshot']))} --keep-stopped"
                       + (" --end-sessions" if options.end_sessions else ""))
            steps_before = maintenance_plans(checks, targets, maintenance, command)
            plan_lines += _maintenance_steps(steps_before)
        # in the order the rollout takes them: canary first, then batch by batch
        plans = host_plans(checks, [h for batch in plan.batches for h in batch],
                           maintenance is None, db_host)
        shown = _ready_lines(plan_lines, plans, database, maintenance is None)
        if options.dry_run:
            return FleetResult(fleet_run_id, 0, [*shown, "Dry run: nothing was changed."],
                               plans=plans, maintenance=steps_before)
        _journal_or_refuse(journal)  # pre-flight decided (and the database judged)
        if confirm is not None and not confirm("\n".join(shown)):
            raise FleetError("not confirmed at the prompt; nothing was changed",
                             "run again and answer y, or pass --yes", exit_code=ExitCode.USAGE)

        # -- the maintenance path: drain all, restore once ------------------------------------
        if maintenance is not None:
            _drain_and_restore(run, inventory, targets, fleet_run_id, options, journal,
                               maintenance, say, interrupts, args)
        gate = "rollout" if maintenance is not None else "preflight"

        # -- the rollout ---------------------------------------------------------------------
        pins = json.dumps(_pins(checks, targets))
        result = _rollout(run, inventory, plan, fleet_run_id, options, journal, hosts,
                          interrupts, say, go=lambda: run.decide(gate, "go", pins=pins),
                          args=args)
        result.plans, result.maintenance = plans, steps_before  # what the prompt showed
        return result
    except KeyboardInterrupt:
        if journal.record.get("rollout_started"):
            # after the rollout began (its own handlers ended with it): hosts did change
            error = FleetError("interrupted after the rollout started: hosts may have been "
                               "rolled back, and a host's outcome may be unknown",
                               "read the fleet journal and run "
                               + _commands("runbook status {env}", targets, args, "on each host")
                               + "; resume with the same command and --resume (it skips "
                               "the hosts this run rolled back)", exit_code=ExitCode.ATTENTION)
        elif journal.record.get("maintenance_drain_started"):
            error = FleetError("interrupted during the maintenance drain or restore: hosts may "
                               "be down and the database may be restored", "run "
                               + _commands("runbook status {env}", targets, args, "on each host")
                               + " and read the fleet journal; resume with the same command "
                               "and --resume", exit_code=ExitCode.ATTENTION)
        else:
            error = FleetError("interrupted before any host changed; nothing was changed",
                               "run the same command again when ready",
                               exit_code=ExitCode.FAILED_SAFELY)
        _journal_at_the_end(journal, options, error, "interrupted")
        raise error from None
    except FleetError as exc:
        if exc.lock_not_taken:
            locked = False  # someone else's lock (or none): nothing of ours to release
        _journal_at_the_end(journal, options, exc,
                            "refused" if exc.exit_code in (2, 3, 4) else "failed")
        raise
    finally:
        # stopped before the controller's own release; a beat that meets the playbook's (at
        # its end) is refused on the lock host, which never makes the lock again
        heartbeat.close()
        if run is not None:
            release = bool(locked and not journal.record.get("fleet_lock_released_by_rollout"))
            with _signals_held(release):  # as in _release: a Ctrl-C cannot leak the lock
                run.close(release=release)
            if release and run.released(inventory.lock_host):
                locked = False  # released by the playbook itself
        interrupts.cleanup()
        if locked and not journal.record.get("fleet_lock_released_by_rollout"):
            failed = _release(inventory, targets, fleet_run_id, options.reason,
                              args[inventory.lock_host])
            if failed:
                say(failed)
                unreleased.append(failed)
                journal.set(fleet_lock_release_failed=failed)
                with contextlib.suppress(OSError):  # in a `finally`: never replace it
                    journal.write()
        signal.signal(signal.SIGTERM, old_term)  # after the release: none is cut short


def _host_entry(r: HostResult, origin: float) -> dict[str, Any]:
    """`origin`: the fleet run's start, time.monotonic() (FleetJournal.began)."""
    return {"status": r.status, "exit_code": r.exit_code, "message": r.message,
            "started": r.started, "ended": r.ended, **r.timing(origin), "run": r.record}


def _host_events(hosts: dict[str, HostResult], say: Callable[[str], None],
                 journal: fjournal.FleetJournal | None = None,
                 args: dict[str, str] | None = None) -> Events:
    """Events whose `runbook rollback` results fill in each host's outcome as they come; each
    start and each outcome is written to the fleet journal at once (a controller killed later
    leaves it behind for the resume). `args`: each host's environment as its own runbook
    names it (`env_args`; filled in by pre-flight), for the commands its line names."""
    task = "runbook rollback"

    def record(r: HostResult, status: str | None = None) -> None:
        if journal is None:
            return
        entry = _host_entry(r, journal.began)
        if status:
            entry["status"] = status
        journal.host(r.host, entry)  # a failure is said (journal.save), never fatal

    def on_start(t: str, host: str) -> None:
        if t == task and host in hosts:
            hosts[host].started, hosts[host].began = time.time(), time.monotonic()
            record(hosts[host], STARTED)
            say(f"{host}: rolling back ...")

    def on_end(t: str, host: str, res: dict[str, Any]) -> None:
        if t == "drain" and journal is not None and host in hosts:
            answer = _last_json(str(res.get("stdout", ""))) or {}
            if isinstance(answer.get("stopped"), list):  # what it stopped, even if it refused
                journal.drain_answer(host, {"stopped": [str(n) for n in answer["stopped"]],
                                            "stopped_ids": _ids(answer)})
        if t != task or host not in hosts or res.get("_event") == "runner_on_skipped":
            return
        r = hosts[host]
        r.ended, r.finished = time.time(), time.monotonic()
        data = _last_json(str(res.get("stdout", ""))) or {}
        r.record = data or None
        if res.get("_event") == "runner_on_unreachable":
            r.exit_code, r.status = None, UNKNOWN
            r.message = (f"connection lost during its rollback, outcome unknown: "
                         f"{res.get('msg')}; run `runbook status "
                         f"{(args or {}).get(host, 'ENV')}` there")
        else:
            r.exit_code = int(res.get("rc", 1) if res.get("rc") is not None else 1)
            if r.exit_code == 0:
                r.status = ROLLED_BACK
                timing = data.get("timing", {})
                r.message = f"done in {timing.get('done_in_s', '?')}s"
            elif r.exit_code == 6:
                r.status, r.message = TOOK_EFFECT, str(data.get("error", ""))
            elif r.exit_code in (1, 2, 3, 4):
                r.status = FAILED_SERVING
                r.message = (f"exit {r.exit_code}: "
                             f"{data.get('error') or _one_line(str(res.get('stderr', '')))}")
            else:
                r.status = FAILED_ATTENTION
                r.message = (f"exit {r.exit_code}: "
                             f"{data.get('error') or _one_line(str(res.get('stderr', '')))}")
            # what the host's run said on-call must see even when it succeeded (e.g. its old
            # slot left running for Caddy's h2c connections)
            notes = [_one_line(str(n)) for n in data.get("notices") or []]
            if notes:
                r.message += "; note: " + "; ".join(notes)
        record(r)
        say(f"{host}: {r.status} ({r.message})")

    return Events(on_start=on_start, on_end=on_end)


def _rollout(run: PlaybookRun, inventory: Inventory, plan: inv.Batches, fleet_run_id: str,
             options: Options, journal: fjournal.FleetJournal, hosts: dict[str, HostResult],
             interrupts: _Interrupts, say: Callable[[str], None],
             go: Callable[[], None], args: dict[str, str] | None = None) -> FleetResult:
    """Open the gate to the rollout and follow it; Ctrl-C from here on lets hosts finish.
    `args`: each host's environment as its own runbook names it (`env_args`)."""
    args = args or {}
    events = run.events
    t0 = time.monotonic()
    with interrupts.installed(say):
        # written before the gate opens: a resume of a run whose controller died after this
        # treats every host without a recorded outcome as unknown (it may have rolled back)
        journal.set(rollout_started=True)
        if journal.record.get("maintenance_drain_started"):
            journal.save()  # hosts are down: a failure is said, the rollout brings them back
        else:
            try:
                _journal_or_refuse(journal)  # nothing changed yet
            except FleetError:
                journal.set(rollout_started=False)
                raise
        try:
            go()
        except GateExpired:
            journal.set(rollout_started=False)  # the playbook ended at the gate
            raise _expired() from None
        status = run.join()
    for r in hosts.values():  # started, but Ansible was stopped before it said how it ended
        if r.status == NOT_STARTED and r.started is not None:
            r.status = UNKNOWN_STARTED
            r.message = ("its rollback started but Ansible was stopped before it answered; "
                         f"run `runbook status {args.get(r.host, 'ENV')}` there")
    if journal.record.get("maintenance_drain_started"):
        for r in hosts.values():  # drained: no host that did not roll back serves anything
            if r.status in (NOT_STARTED, FAILED_SERVING):
                r.status = f"{r.status.removesuffix(' but serving')}: DOWN since the drain"
    released = events.results.get("release the fleet lock", {}).get(inventory.lock_host, {})
    journal.set(fleet_lock_released_by_rollout=released.get("_event") == "runner_on_ok")
    refresh = events.results.get("fleet lock still ours", {})
    lost_lock = next((r for r in refresh.values()
                      if r.get("_event") in ("runner_on_failed", "runner_on_unreachable")), None)
    journal.phase("rollout", t0, status, serial=plan.serial,
                  hosts={h: {"status": r.status, "started": r.started, "ended": r.ended,
                             **r.timing(journal.began)} for h, r in hosts.items()})
    journal.set(hosts={h: _host_entry(r, journal.began) for h, r in hosts.items()})
    codes = [r.exit_code for r in hosts.values() if r.status != ROLLED_BACK
             and r.status != NOT_STARTED]
    not_done = [h for h, r in hosts.items() if r.status != ROLLED_BACK]
    lines = [f"{h}: skipped: {why}" for h, why in (journal.record.get("skipped") or {}).items()]
    lines += [f"{h}: {r.status}" + (f" ({r.message})" if r.message else "")
              for h, r in hosts.items()]
    if any(r.status in (FAILED_ATTENTION, UNKNOWN, UNKNOWN_STARTED) or "DOWN" in r.status
           for r in hosts.values()):
        code = ExitCode.ATTENTION
    elif any(r.status == TOOK_EFFECT for r in hosts.values()):
        code = ExitCode.TOOK_EFFECT
    elif codes or not_done:
        code = ExitCode.FAILED_SAFELY
    else:
        code = ExitCode.OK
    resume = None
    unknown: list[str] = []
    if not_done:
        resume = _resume_command(options, fleet_run_id, limit=not_done)
        unknown = [h for h, r in hosts.items() if r.status in (UNKNOWN, UNKNOWN_STARTED)]
        why = ("interrupted" if interrupts.count else
               "the fleet lock was lost" if lost_lock is not None else
               f"stopped: {', '.join(unknown)} unreachable" if unknown and all(
                   hosts[h].status == UNKNOWN for h in unknown) else
               f"stopped: {', '.join(unknown)} outcome unknown" if unknown else
               "stopped at the first failed host")
        if journal.record.get("maintenance_drain_started"):
            why += " (THE SERVICE IS DOWN on the hosts not rolled back; the database was " \
                   "restored once and the resume does not restore it again)"
        lines.append(f"{why}: {len(not_done)} host(s) not rolled back; nothing was reverted "
                     "fleet-wide. Resume with:")
    journal.record["resume_command"] = resume
    journal.finish("success" if code is ExitCode.OK else "stopped", int(code))
    path = journal.save(options.journal_dir)  # what the hosts did is reported either way
    if resume is not None:
        if path is None:  # a --resume reads the journal: run again on the hosts not done
            resume = _resume_command(options, fleet_run_id, limit=not_done, journaled=False)
            journal.record["resume_command"] = resume  # as printed (the JSON output's record)
        lines.append(f"  {resume}")
        status = _commands("runbook status {env}", unknown, args)
        if unknown and path is not None:
            lines.append(f"check {', '.join(unknown)} first ({status}): the "
                         "resume refuses a host whose rollback finished after all")
        elif unknown:  # a new run: its pre-flight refuses the whole run for such a host
            lines.append(f"check {', '.join(unknown)} first ({status}) and "
                         "take out of --limit a host whose rollback finished after all: the "
                         "new run's pre-flight refuses every host for it")
    if path is None:
        lines.append(f"the fleet journal was not written ({journal.unwritten}): this output is "
                     "the run's only record" + ("; the command above is a new run of the "
                                                "hosts not rolled back, since a --resume "
                                                "would read the journal" if resume else ""))
    else:
        lines.append(f"Fleet journal: {path}")
    return FleetResult(fleet_run_id, int(code), lines, journal.record, path)


def _journal_or_refuse(journal: fjournal.FleetJournal, directory: Path | None = None) -> None:
    """Before any host changed, a fleet journal that cannot be written refuses the run (exit
    4): a controller that died later would leave no record for its resume to read."""
    try:
        journal.write(directory)
    except OSError as exc:
        journal.unwritten = f"{journal.path(directory)}: {exc.strerror or exc}"
        raise FleetError(f"the fleet journal cannot be written ({journal.unwritten}); nothing "
                         "was changed", "free space there, or name a writable directory with "
                         "--journal-dir (or RUNBOOK_FLEET_DIR)",
                         exit_code=ExitCode.PRECONDITION) from None


def _journal_at_the_end(journal: fjournal.FleetJournal, options: Options,
                        error: FleetError, outcome: str) -> None:
    """A stopped run's last write; not written, its error says so (and, once hosts may have
    changed, that a --resume cannot read this run) instead of an OSError replacing it.

    A dry run writes none, refused or not (found by review: a refused one left a journal
    nobody would read, unnamed in its JSON, where a passing one and a host's own dry run
    write nothing): it changed nothing, so there is nothing to resume or to account for."""
    if options.dry_run:
        return
    journal.finish(outcome, int(error.exit_code), error=error.message)
    error.journal_file = journal.save(options.journal_dir)
    if error.journal_file is not None or "fleet journal" in error.message:
        return
    changed = journal.record.get("rollout_started") or journal.record.get(
        "maintenance_drain_started")
    args = _recorded_args(journal.record, {})  # set from the start, refined by pre-flight
    selected = [h for h in journal.record.get("hosts_selected") or [] if isinstance(h, str)]
    error.lines.append(f"the fleet journal was not written ({journal.unwritten})" + (
        ": a --resume cannot read this run; check each host ("
        + _commands("runbook status {env}", selected, args) + "), "
        "then run the fleet rollback again with --limit naming the hosts not rolled back, "
        "without --resume" if changed else ""))


def _inventory_arg(options: Options) -> str:
    """The inventory as a resume command names it: absolute (the command may be pasted in
    another directory) and quoted (a path with a space split into two arguments)."""
    return shlex.quote(str(Path(options.inventory).absolute()))


def _resume_command(options: Options, fleet_run_id: str, *, limit: list[str] | None = None,
                    where: str | None = None, journaled: bool = True) -> str:
    """The command that finishes a stopped fleet run, as printed and journaled: its inventory
    (`where`: as the dead run named it), the hosts left, its options, and the journal
    directory it wrote (a resume looking in the default one found no journal). Not
    `journaled` (its journal could not be written): a new run of the hosts left."""
    command = f"runbook fleet rollback {where or _inventory_arg(options)}"
    if limit:
        command += f" --limit {shlex.quote(','.join(limit))}"
    if not journaled:
        return command + _same_options(options)
    command += f" --resume {fleet_run_id}{_same_options(options)}"
    if options.journal_dir is not None:
        command += f" --journal-dir {shlex.quote(str(options.journal_dir.absolute()))}"
    return command


def _same_options(options: Options) -> str:
    """The run's own --canary-group and --batches for its resume command (a resume without
    them has another canary, and maybe another lock host)."""
    return "".join(f" {flag} {shlex.quote(value)}" for flag, value, default in (
        ("--canary-group", options.canary_group, "canary"),
        ("--batches", options.batches, inv.DEFAULT_BATCHES)) if value != default)


# held off while the fleet lock is released: Ctrl-C, a CI timeout's SIGTERM, and SIGHUP (the
# operator's terminal or SSH session closed), whose default ends the controller mid-release
_RELEASE_HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _signals_held(hold: bool = True) -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP ignored meanwhile (when `hold`): what releases the fleet
    lock, or must end before it, is never cut short, so the lock cannot leak."""
    held = {s: signal.signal(s, signal.SIG_IGN) for s in _RELEASE_HELD} if hold else {}
    try:
        yield
    finally:
        for s, h in held.items():
            signal.signal(s, h)


def _release(inventory: Inventory, targets: list[str], fleet_run_id: str,
             reason: str, lock_arg: str) -> str | None:
    """Release the fleet lock; Ctrl-C, SIGTERM and SIGHUP are held off meanwhile so it cannot
    leak (a lock left by a controller on another machine than the lock host blocks every
    fleet run for its 30 minutes). Returns what went wrong, in one line with the fix, or None
    once released."""
    manual = f"`runbook fleet lock {lock_arg} --release --fleet-run {fleet_run_id}` there"
    with _signals_held():
        try:
            events = Events()
            run_playbook("unlock.yml", inventory,
                         _controller_vars(fleet_run_id, inventory, targets, reason), events,
                         forks=1)
            res = events.results.get("release the fleet lock", {}).get(inventory.lock_host, {})
            if res.get("_event") != "runner_on_ok":
                return (f"could not release the fleet lock on {inventory.lock_host}: "
                        f"{_one_line(str(res.get('stderr') or res.get('msg', '')))}; release it "
                        f"with {manual}")
        except Exception as exc:  # called from a `finally`: say it, never replace the outcome
            return (f"could not release the fleet lock on {inventory.lock_host} "
                    f"({type(exc).__name__}: {_one_line(str(exc))}); release it with {manual}")
    return None
    return None

