"""Mutating commands refuse to run unattended without --yes (cron, a pipe, `ssh host cmd`).

Against the real drill stack, addressed through its environment file as a host would be:
without a terminal on stdin and without --yes, each mutating command exits 2 with one line
saying why and what to pass, and nothing changed (state file, Caddyfile, containers, lock,
snapshots, no journal). Dry runs and read-only commands need no --yes. On a terminal the
prompt still asks, and "n" changes nothing.
"""

from __future__ import annotations

import os
import pty
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runbook import docker, snapshots
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS

pytestmark = pytest.mark.docker
REPO_ROOT = Path(__file__).resolve().parents[1]



def runbook(*args: str, stdin: int | None = subprocess.DEVNULL,
            input_text: str | None = None, closed: bool = False,
            ) -> subprocess.CompletedProcess[str]:
    """`closed`: with no stdin at all (`<&-`, a daemon), where Python's sys.stdin is None."""
    env = {k: v for k, v in os.environ.items() if k != "RUNBOOK_CONFIG"}
    return subprocess.run([sys.executable, "-m", "runbook.cli", *args], capture_output=True,
                          text=True, timeout=180, stdin=None if closed else stdin,
                          input=input_text, env=env, check=False, cwd=REPO_ROOT,
                          preexec_fn=(lambda: os.close(0)) if closed else None)


def leave_crashed_lock(stack: DrillStack) -> None:
    """A lock whose holder died: what `runbook unlock` exists to remove."""
    code = ("import sys; from runbook import environment, lock; "
            "lock.acquire(environment.load_file(__import__('pathlib').Path(sys.argv[1])), "
            "reason='a run that crashed')")
    subprocess.run([sys.executable, "-c", code, str(stack.env.source)], check=True,
                   cwd=REPO_ROOT, timeout=60)
    assert stack.env.lock_path.is_dir()


def world(stack: DrillStack) -> dict[str, object]:
    env = stack.env
    return {
        "state": env.state_file.read_bytes(),
        "caddyfile": env.caddy.caddyfile.read_bytes(),
        "containers": {s: (i.status, i.image) for s in ("blue", "green")
                       for i in [docker.inspect(env.slot(s).container)]},
        "lock": sorted(p.name for p in env.lock_path.iterdir())
        if env.lock_path.exists() else None,
        "snapshots": sorted(p.name for p in env.database.snapshot_dir.iterdir()),
        "journal": sorted(p.name for p in env.log_dir.iterdir())
        + sorted(p.name for p in env.runs_dir.iterdir()),
    }


MUTATING = [
    ("rollback",),
    ("deploy", "--version", VERSIONS["v2"].tag),
    ("switch", "--slot", "green"),
    ("unlock",),
    ("unlock", "--force"),
    ("snapshot", "restore"),
    ("snapshot", "cleanup"),
]


def test_mutating_commands_refuse_without_yes_when_stdin_is_not_a_terminal(
        stack: DrillStack) -> None:
    source = str(stack.env.source)
    snapshots.create(stack.env, "kept")  # something restore and cleanup could act on
    leave_crashed_lock(stack)
    before = world(stack)
    # every command with stdin not a terminal; two of them with stdin closed too (found by
    # review: sys.stdin is None there, and asking it crashed with exit 5)
    cases = [(command, False) for command in MUTATING] + [(("rollback",), True),
                                                          (("unlock",), True)]
    for command, closed in cases:
        argv = [*command[:2], source, *command[2:]] if command[0] == "snapshot" \
            else [command[0], source, *command[1:]]
        proc = runbook(*argv, closed=closed)
        where = " ".join(command) + (" <&-" if closed else "")
        assert proc.returncode == 2, (where, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, (where, proc.stderr)
        assert lines[0].startswith("runbook: error: ") and "stdin is not a terminal" in lines[0]
        assert "--yes" in lines[0] and "nothing was changed" in lines[0], lines[0]
        assert "Traceback" not in proc.stderr and proc.stdout == "", (where, proc.stdout)
        assert world(stack) == before, f"{where} changed something"


def test_dry_runs_and_read_only_commands_need_no_yes(stack: DrillStack) -> None:
    source = str(stack.env.source)
    before = world(stack)
    for argv in (["switch", source, "--slot", "green", "--dry-run"],
                 ["deploy", source, "--version", VERSIONS["v2"].tag, "--dry-run"],
                 ["snapshot", "cleanup", source, "--dry-run"],
                 ["unlock", source, "--status"],
                 ["status", source]):
        proc = runbook(*argv)
        assert proc.returncode == 0, (argv, proc.stderr)
    assert world(stack) == before


def test_yes_runs_unattended_and_a_terminal_is_asked(stack: DrillStack) -> None:
    source = str(stack.env.source)
    leave_crashed_lock(stack)
    done = runbook("unlock", source, "--yes")
    assert done.returncode == 0, done.stderr
    assert not stack.env.lock_path.exists()

    # on a terminal the prompt asks; "n" is a refusal that changes nothing (exit 2)
    primary, replica = pty.openpty()
    try:
        os.write(primary, b"n\n")
        asked = runbook("switch", source, "--slot", "green", stdin=replica)
    finally:
        os.close(primary)
        os.close(replica)
    assert "Proceed?" in asked.stderr, asked.stderr
    assert asked.returncode == 2 and "not confirmed" in asked.stderr, asked.stderr
    # Ctrl-D (end of input) at the prompt is a "no" too, not an unexpected failure (exit 5)
    primary, replica = pty.openpty()
    try:
        os.write(primary, b"\x04")
        ended = runbook("switch", source, "--slot", "green", stdin=replica)
    finally:
        os.close(primary)
        os.close(replica)
    assert ended.returncode == 2 and "not confirmed" in ended.stderr, ended.stderr
    assert docker.inspect(stack.env.slot("green").container).running  # untouched baseline
    from runbook import caddy

    assert caddy.active_slot(caddy.read(stack.env), stack.env) == "blue"


def test_a_plan_that_cannot_be_shown_is_never_confirmed(stack: DrillStack) -> None:
    """stdout gone (`| head -0`) on a terminal: the plan the prompt asks about cannot be
    written, so even a "y" typed ahead is no confirmation: declined (exit 2), nothing changed."""
    source = str(stack.env.source)
    before = world(stack)
    primary, replica = pty.openpty()
    read_out, write_out = os.pipe()
    os.close(read_out)  # stdout's reader already gone
    try:
        os.write(primary, b"y\n")
        env = {k: v for k, v in os.environ.items() if k != "RUNBOOK_CONFIG"}
        proc = subprocess.run([sys.executable, "-m", "runbook.cli", "switch", source, "--slot",
                               "green"], stdin=replica, stdout=write_out,
                              stderr=subprocess.PIPE, text=True, timeout=180, env=env,
                              cwd=REPO_ROOT, check=False)
    finally:
        for fd in (primary, replica, write_out):
            os.close(fd)
    assert proc.returncode == 2 and "not confirmed" in proc.stderr, proc.stderr
    assert "Proceed?" not in proc.stderr, proc.stderr
    after = world(stack)
    after["journal"] = before["journal"]  # the refused run is journaled, as any decline
    assert after == before


def on_terminal(*args: str, answer: bytes) -> subprocess.CompletedProcess[str]:
    """`runbook ARGS` with a terminal on stdin (a pty) where `answer` is typed ahead."""
    primary, replica = pty.openpty()
    try:
        os.write(primary, answer)
        return runbook(*args, stdin=replica)
    finally:
        os.close(primary)
        os.close(replica)


def test_unlock_on_a_terminal_shows_the_holder_and_asks(stack: DrillStack) -> None:
    """Found by review: `runbook unlock` removed the lock at once on a terminal, with no word
    of whose it was, though README says it asks and --yes is "do not ask for confirmation".
    It shows the holder and what removing it means, and asks; "n" changes nothing (exit 2,
    as every declined prompt), "y" removes it."""
    source = str(stack.env.source)
    leave_crashed_lock(stack)
    before = world(stack)
    declined = on_terminal("unlock", source, answer=b"n\n")
    assert declined.returncode == 2 and "not confirmed" in declined.stderr, declined.stderr
    shown = declined.stdout + declined.stderr
    assert "a run that crashed" in shown and "Remove it?" in shown, shown
    assert world(stack) == before  # the lock is still there, nothing journaled
    done = on_terminal("unlock", source, answer=b"y\n")
    assert done.returncode == 0, done.stderr
    assert "removed" in done.stdout and not stack.env.lock_path.exists(), done.stdout


def test_a_refusals_printed_fix_runs_as_printed_on_the_same_environment(
        stack: DrillStack) -> None:
    """Found by review: the commands a refusal prints for on-call named the environment by
    its bare name (`runbook unlock development --force`). An environment read from a file
    outside the default places (the drill's, as `--config FILE` or a path given as ENV on a
    host) is not found by that name: the printed fix loaded another configuration or none
    ("no configuration for environment 'development'"). Typed exactly as printed, on a
    terminal, with nothing added, it removes this environment's lock."""
    env = stack.env
    # a shell deploy's lock written before the clock was stepped back: its age cannot be
    # told, so only `unlock --force` removes it, and every run's refusal says so
    env.lock_path.mkdir(parents=True)
    future = time.time() + 6 * 3600
    (env.lock_path / "locked_at").write_text(f"{int(future)}\n")
    for path in (env.lock_path / "locked_at", env.lock_path):
        os.utime(path, (future, future))
    refused = runbook("switch", str(env.source), "--slot", "green", "--yes")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    printed = re.search(r"`(runbook unlock [^`]+ --force)`", refused.stderr)
    assert printed is not None, refused.stderr
    argv = shlex.split(printed[1])
    assert env.lock_path.is_dir() and "--config" not in argv, argv
    journals = set(env.log_dir.iterdir())
    done = on_terminal(*argv[1:], answer=b"y\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "removed" in done.stdout and not env.lock_path.exists(), done.stdout
    # and it was this environment's run: its journal is in this environment's log directory
    assert any("unlock" in p.read_text() for p in set(env.log_dir.iterdir()) - journals)
