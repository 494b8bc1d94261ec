"""A closed terminal (an ssh session with a pty that drops) mid-run, on a real pty.

Found by review: SIGHUP was handled exactly as SIGTERM, so a dropped session undid a rollback
the on-call had confirmed (users moved back onto the bad release mid-incident), or stopped it
after its commit with both slots running (exit 6), while the same drop without a pty (`ssh
host runbook rollback --yes`: no SIGHUP) completed it. Once the run executes its plan, a
hangup is journaled and the run goes on to its own end. Judged from what runs: the proxy's
answer, Caddy's loaded config, Docker, the state file, the lock, the exit code.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from runbook import docker, faults
from runbook import intent as intents
from runbook import state as states
from runbook.drill import http as drill_http
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot
from runbook.errors import ExitCode
from runbook.plan import Signals
from tests.drill_checks import runbook_cli, through_proxy

pytestmark = pytest.mark.docker
V1, V2, V3 = VERSIONS["v1"], VERSIONS["v2"], VERSIONS["v3"]
HUNG_UP = "terminal closed (SIGHUP): the run goes on; its output is in the journal "

# An interactive shell on the pty, as sshd starts one: it runs the command as a foreground
# job in a process group of its own and, on the hangup, sends SIGHUP (and SIGCONT) to that
# whole group, as bash does; then the kernel's, as the session leader exits.
SHELL = textwrap.dedent("""
    import os, signal, sys, time
    argv, pidfile, codefile = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        signal.signal(signal.SIGTTOU, signal.SIG_DFL)
        os.execv(argv[0], argv)
    try:
        os.setpgid(pid, pid)
    except PermissionError:
        pass  # EACCES: the child has already run setpgid(0, 0) and exec'd (a shell's race too)
    os.tcsetpgrp(0, pid)
    with open(pidfile, "w") as f:
        f.write(str(pid))
    def hup(signum, frame):
        for _ in range(2):
            try:
                os.killpg(pid, signal.SIGHUP)
                os.killpg(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            time.sleep(0.05)
    signal.signal(signal.SIGHUP, hup)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    with open(codefile, "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
    os._exit(0)
""")


@dataclass
class Hung:
    code: int
    seen: str  # what the terminal showed before it closed


def _stopped(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return raw.rpartition(")")[2].split()[0] in ("T", "t")


def _child_running(pid: int, program: str) -> bool:
    """Whether a live child of `pid` runs `program` (its command line names it)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) != pid or fields[0] in ("Z", "X"):
                continue
            if program.encode() in (stat.parent / "cmdline").read_bytes():
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def hang_up(env: Environment, tmp: Path, *args: str, fault: str | None = None,
            answer_at: str | None = None, hang_up_at: str | None = None,
            child: str | None = None) -> Hung:
    """`runbook ARGS ENV` in a shell on a pty. `fault`: the run stops itself there (SIGSTOP,
    runbook/faults.py); it is resumed and the terminal closes at once, or, given `child`,
    once a child of the run runs that program. `answer_at`: type y when the terminal shows
    it (the prompt). `hang_up_at`: close the terminal when it shows that instead. Returns
    the run's exit code, as the shell saw it."""
    assert env.source is not None
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    if fault:
        environ[faults.VARIABLE] = f"{fault}:SIGSTOP"
    pidfile, codefile = tmp / "pid", tmp / "code"
    runbook = [sys.executable, "-m", "runbook.cli", *args, str(env.source)]
    shell, master = pty.fork()
    if shell == 0:
        os.execve(sys.executable, [sys.executable, "-c", SHELL, *runbook, str(pidfile),
                                   str(codefile)], environ)
    seen, answered, run = b"", False, 0
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline, seen.decode(errors="replace")
        if os.waitpid(shell, os.WNOHANG)[0]:  # the shell died: say so now, not in 240 s
            raise AssertionError("the test's shell ended early: " + seen.decode(errors="replace"))
        if not run and pidfile.exists() and pidfile.read_text():
            run = int(pidfile.read_text())
        if select.select([master], [], [], 0.05)[0]:
            try:
                seen += os.read(master, 65536)
            except OSError:
                raise AssertionError("the run ended before the hangup: "
                                     + seen.decode(errors="replace")) from None
        if answer_at and not answered and answer_at.encode() in seen:
            os.write(master, b"y\n")
            answered = True
        if fault and run and _stopped(run):
            os.kill(run, signal.SIGCONT)
            break
        if hang_up_at and hang_up_at.encode() in seen:
            break
    while child and not _child_running(run, child):
        assert time.monotonic() < deadline and _alive(run), f"no {child} ran"
        time.sleep(0.005)
    os.close(master)  # the connection drops: the kernel hangs the terminal up
    os.waitpid(shell, 0)
    return Hung(int(codefile.read_text()), seen.decode(errors="replace"))


def caddy_dials(env: Environment) -> set[str]:
    """The upstreams Caddy's loaded config dials (its admin API)."""
    config = drill_http.get(f"{env.caddy.admin_url}/config/", timeout=5).text
    return set(re.findall(r'"dial":\s*"([^"]+)"', config))


def journaled(env: Environment, run_prefix: str, since: float) -> list[tuple[Path, dict]]:
    """Every line the runs whose id starts `run_prefix` journaled since `since`."""
    lines = []
    for log in sorted(env.log_dir.glob("*.log")):
        if log.stat().st_mtime < since:
            continue
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if str(entry.get("run_id", "")).startswith(run_prefix):
                lines.append((log, entry))
    return lines


def story(env: Environment, run_prefix: str, since: float) -> str:
    """The last journal messages of those runs, for an assertion's message."""
    return "\n".join(e["message"][:400] for _, e in journaled(env, run_prefix, since)[-8:])


def assert_hangup_journaled(env: Environment, run_prefix: str, since: float) -> None:
    said = [(log, e) for log, e in journaled(env, run_prefix, since)
            if e["message"].startswith(HUNG_UP)]
    assert len(said) == 1, said  # once, though the shell and the kernel each sent one
    log, entry = said[0]
    assert entry["message"] == HUNG_UP + str(log), entry
    finished = journaled(env, run_prefix, since)[-1][1]
    assert finished.get("exit_code") == 0 and finished.get("outcome") == "success", finished


def assert_rolled_back_to_v2(env: Environment) -> None:
    """The rollback's own end, from what runs: green (v2) serves, blue is stopped, the state
    file records the rollback, no lock and no intent record left."""
    assert through_proxy(env) == ("green", V2.tag)
    green, blue = env.slot(Slot.GREEN), env.slot(Slot.BLUE)
    dials = caddy_dials(env)
    assert any(d.endswith(f":{green.port}") for d in dials), dials
    assert not any(d.endswith(f":{blue.port}") for d in dials), dials
    assert docker.inspect(blue.container).status == "exited"
    assert docker.inspect(green.container).status == "running"
    st = states.read_state(env.state_file)
    assert st.current is not None and st.previous is not None
    assert (st.current.version, st.current.active_slot, st.current.rollback_count) == \
        (V2.tag, Slot.GREEN, 1)
    assert st.previous.status == "rolled_back", st.previous
    assert not env.lock_path.exists()
    assert not intents.path(env).exists()


@pytest.mark.parametrize(("point", "confirm"), [
    ("switch.after-reload", True),  # Caddy runs green, not yet verified: it used to be undone
    ("switch.after-verify", False),  # the commit point: it used to stop there, exit 6
])
def test_a_rollback_whose_terminal_hangs_up_goes_on_to_its_end(
        scene_stack: DrillStack, tmp_path: Path, point: str, confirm: bool) -> None:
    """Found by review: a dropped ssh session (a pty) undid a confirmed rollback at
    switch.after-reload (exit 1, users back on v3) and stopped it at switch.after-verify
    (exit 6, both slots running, the state file not recorded). It goes on: exit 0, v2
    serving from green, blue stopped, the rollback recorded, the lock free, the hangup
    journaled once. Confirmed at the prompt, or with --yes: the same."""
    scene_stack.arrange(scenes.PREVIOUS)  # v3 serving from blue, v2 stopped on green
    env = scene_stack.env
    since = time.time()
    args = ("rollback",) if confirm else ("rollback", "--yes")
    hung = hang_up(env, tmp_path, *args, fault=point,
                   answer_at="Proceed?" if confirm else None)
    assert hung.code == 0, (hung.code, hung.seen[-2000:], story(env, "rbk", since))
    assert_rolled_back_to_v2(env)
    assert_hangup_journaled(env, "rbk", since)


def test_a_hangup_at_the_prompt_stops_and_changes_nothing(
        scene_stack: DrillStack, tmp_path: Path) -> None:
    """Nobody confirmed: the run stops as before (exit 1, "nothing was changed"), v3 still
    serving from blue, green still stopped, the state file as it was, the lock free."""
    scene_stack.arrange(scenes.PREVIOUS)
    env = scene_stack.env
    state = env.state_file.read_bytes()
    since = time.time()
    hung = hang_up(env, tmp_path, "rollback", hang_up_at="Proceed?")
    # which comes first is the kernel's: the SIGHUP (interrupted, exit 1) or the prompt's
    # read of the closed terminal (no answer: not confirmed, exit 2); nothing changed either way
    assert hung.code in (int(ExitCode.FAILED_SAFELY), int(ExitCode.USAGE)), hung.seen[-1000:]
    assert through_proxy(env) == ("blue", V3.tag)
    assert docker.inspect(env.slot(Slot.GREEN).container).status == "exited"
    assert env.state_file.read_bytes() == state
    assert not env.lock_path.exists() and not intents.path(env).exists()
    said = [e["message"] for _, e in journaled(env, "rbk", since)]
    if hung.code == int(ExitCode.FAILED_SAFELY):
        assert any("interrupted by SIGHUP before any change; nothing was changed" in m
                   for m in said), said
    assert not any(m.startswith(HUNG_UP) for m in said), said


def test_a_restoring_rollback_whose_terminal_hangs_up_goes_on_to_its_end(
        scene_stack: DrillStack, tmp_path: Path) -> None:
    """`rollback --restore-snapshot` runs through the same executor: a hangup while it takes
    its safety snapshot used to undo it (exit 1); and the shell's SIGHUP to the job's whole
    process group killed its `docker exec ... pg_dump` child, which failed the step and
    undid it too ("pg_dump failed ... (exit -1)"). It goes on: the database restored
    (schema 1), v1 serving from blue, green stopped, exit 0, the hangup journaled."""
    scene_stack.arrange(scenes.MIGRATED)  # v2 serving from green on schema 2; v1 stopped
    env = scene_stack.env
    since = time.time()
    hung = hang_up(env, tmp_path, "rollback", "--restore-snapshot", "--yes",
                   fault="before:safety-snapshot", child="pg_dump")
    assert hung.code == 0, (hung.code, hung.seen[-2000:], story(env, "rbk", since))
    assert through_proxy(env) == ("blue", V1.tag)
    assert docker.inspect(env.slot(Slot.GREEN).container).status == "exited"
    with scene_stack.connect() as conn:
        assert conn.execute("SELECT version FROM schema_migrations").fetchone() == (1,)
    st = states.read_state(env.state_file)
    assert st.current is not None and (st.current.version, st.current.active_slot) == \
        (V1.tag, Slot.BLUE)
    assert not env.lock_path.exists() and not intents.path(env).exists()
    assert_hangup_journaled(env, "rbk", since)


def test_a_deploy_whose_terminal_hangs_up_goes_on_to_its_end(
        scene_stack: DrillStack, tmp_path: Path) -> None:
    """`runbook deploy` runs through the same executor: a hangup once Caddy runs the new
    slot used to undo the deploy (exit 1). It goes on: v2 serving, exit 0, journaled."""
    scene_stack.reset()  # v1 serving from blue
    env = scene_stack.env
    since = time.time()
    hung = hang_up(env, tmp_path, "deploy", "--version", V2.tag, "--yes",
                   fault="switch.after-reload")
    assert hung.code == 0, (hung.code, hung.seen[-2000:], story(env, "dep", since))
    assert through_proxy(env) == ("green", V2.tag)
    assert docker.inspect(env.slot(Slot.BLUE).container).status == "exited"
    st = states.read_state(env.state_file)
    assert st.current is not None and st.current.version == V2.tag
    assert not env.lock_path.exists() and not intents.path(env).exists()
    assert_hangup_journaled(env, "dep", since)


def test_a_hangup_as_the_finished_run_is_reported_keeps_the_run_s_exit(
        scene_stack: DrillStack) -> None:
    """The closed terminal's next SIGHUP (the shell's second, the kernel's as the shell
    exits) may come once the run has ended, as the CLI reports it: that was the CLI's own
    "runbook: interrupted by SIGHUP", exit 129, for a rollback that had finished (its
    journal: exit 0). The run's exit stands."""
    from tests.test_cli import _interrupted_at

    scene_stack.arrange(scenes.PREVIOUS)
    env = scene_stack.env
    assert env.source is not None
    done = _interrupted_at("module", "runbook.cli_common:report", "rollback", "--yes",
                           str(env.source), signame="SIGHUP")
    assert done.returncode == 0, done.stderr
    assert "interrupted" not in done.stderr, done.stderr
    assert_rolled_back_to_v2(env)


def test_after_a_hangup_nothing_waits_on_the_terminal(scene_stack: DrillStack) -> None:
    """Nothing the run goes on to do may wait on a terminal nobody is at: from the hangup
    (here at the commit), its stdin is /dev/null, as the run's file descriptor 0 shows
    while it is held at a later step; it then ends, exit 0."""
    from tests.test_cli import _INTERRUPTED_AT

    scene_stack.arrange(scenes.PREVIOUS)
    env = scene_stack.env
    assert env.source is not None
    environ = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    environ |= {"RUNBOOK_TEST_SIGNAL": "SIGHUP",
                faults.VARIABLE: "before:stop-old-slot:SIGSTOP"}
    with subprocess.Popen(
            [sys.executable, "-c", _INTERRUPTED_AT, "module", "runbook.plan:_Execution._commit",
             "rollback", "--yes", str(env.source)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ) as run:
        deadline = time.monotonic() + 120
        while not _stopped(run.pid):
            assert run.poll() is None, run.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        stdin = os.readlink(f"/proc/{run.pid}/fd/0")
        os.kill(run.pid, signal.SIGCONT)
        _, err = run.communicate(timeout=120)
    assert stdin == os.devnull, stdin
    assert run.returncode == 0, err.decode()[-2000:]
    assert_rolled_back_to_v2(env)


def test_hangups_once_the_run_executes_are_journaled_once_and_never_counted() -> None:
    """Real SIGHUPs to this process while a run's handlers are installed and it executes:
    neither a signal the run acts on (`received`) nor a Ctrl-C counted towards a second
    one (which cuts a held compose off); the run's hangup hook is called once. A SIGTERM
    after them is acted on as ever."""
    told: list[str] = []
    signals = Signals()
    with signals.installed():
        signals.on_hangup = lambda: told.append("hung up")
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0)
        assert (signals.received, signals.count, told) == (None, 0, ["hung up"])
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0)
        assert (signals.received, signals.count) == (signal.SIGTERM, 1)


def test_status_says_why_the_last_run_failed(scene_stack: DrillStack) -> None:
    """Found by review: after a failed run, `runbook status` said only "last run rollback
    rbk_...: failed (exit 1)", though the run record holds its message and fix. It says
    them, and the journal's path, as the run printed them; `--format json` too."""
    scene_stack.arrange(scenes.PREVIOUS)
    env = scene_stack.env
    failed = runbook_cli(env, "rollback", "--yes", fault="before:health-gate:SIGTERM")
    assert failed.returncode == int(ExitCode.FAILED_SAFELY), failed.stderr
    [printed] = re.findall(r"^runbook: error: (.+)$", failed.stderr, re.MULTILINE)
    [journal] = re.findall(r"^runbook: journal: (\S+)$", failed.stderr, re.MULTILINE)
    assert "interrupted by SIGTERM" in printed, printed
    text = runbook_cli(env, "status").stdout
    [line] = [x for x in text.splitlines() if x.strip().startswith("last run")]
    assert "failed (exit 1)" in line, text
    after = text.split(line, 1)[1]
    assert printed.split("; run `")[0] in after, text  # the message, as printed
    assert journal in after, text
    data = json.loads(runbook_cli(env, "status", "--format", "json").stdout)["last_run"]
    assert f"{data['error']['message']}; {data['error']['fix']}" == printed, (data, printed)
    assert data["log_file"] == journal, data


_UNDER_HANGUP = textwrap.dedent("""
    import dataclasses, signal, sys
    from runbook import environment as envmod, preflight
    from runbook.caddy import admin
    signal.signal(signal.SIGHUP, lambda *_: None)  # the run's own: it goes on (plan.Signals)
    print("ready", flush=True)
    if sys.argv[1] == "systemctl":
        env = envmod.load("production")
        env = env.with_(caddy=dataclasses.replace(env.caddy,
                                                  reload=envmod.ReloadMethod.SYSTEMCTL))
        print(admin.running_problem(env, admin_answered=True))
    else:
        done = preflight._child(["sh", "-c", "sleep 1; echo answered"], capture_output=True,
                                text=True, timeout=10, check=False)
        print(done.returncode, done.stdout.strip())
""")


@pytest.mark.parametrize(("asked", "said"), [
    ("systemctl", "None"),  # the switch's `systemctl is-active` of a systemctl-reload host
    ("preflight", "0 answered"),  # a pre-flight probe's child
])
def test_a_child_asked_inside_a_confirmed_run_outlives_the_terminals_hangup(
        asked: str, said: str, tmp_path: Path) -> None:
    """The closed terminal's SIGHUP goes to the whole foreground process group: the
    runbook goes on (plan.Signals), but a `systemctl is-active` asked inside the switch died
    of it, read as "unit not active", and the switch was undone, users back on the bad
    release; a pre-flight probe's child likewise refused the confirmed run (found by review).
    Real processes: a `systemctl` on PATH answering after 1 s, a SIGHUP to the group at
    0.3 s."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text("#!/bin/sh\nsleep 1\necho active\n")
    (bin_dir / "systemctl").chmod(0o755)
    proc = subprocess.Popen(
        [sys.executable, "-c", _UNDER_HANGUP, asked], stdout=subprocess.PIPE, text=True,
        start_new_session=True, stdin=subprocess.DEVNULL,
        env=os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGHUP)
    out, _ = proc.communicate(timeout=30)
    assert (proc.returncode, out.strip()) == (0, said)
