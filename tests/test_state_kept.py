"""The state file's kept copy: an empty, cut-short, deleted or refused state file (another
tool writing in place or removing it, a full disk) is refused naming the copy the runbook
kept and the one command that puts it back; that command checks the copy against what runs,
writes atomically, and never replaces a file that reads whole (in any of the three dialects)
nor one created meanwhile. Against the real drill stack, through the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runbook import faults, switch
from runbook import kept_state as kept
from runbook import state as states
from runbook.drill import scenes
from runbook.drill.stack import DrillStack
from runbook.drill.versions import VERSIONS
from runbook.environment import Environment, Slot
from tests.drill_checks import runbook_cli as cli
from tests.drill_checks import through_proxy, wait_stopped

V2, V3 = VERSIONS["v2"], VERSIONS["v3"]


@pytest.fixture(autouse=True)
def _no_copy_kept_by_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the CLI processes keep copies: this process's arranging writes must not."""
    monkeypatch.setattr(kept, "_PLACES", {})


def copy_of(env: Environment) -> Path:
    return kept.copy_path(env.runs_dir, env.state_file, env.name)


def arranged_and_kept(stack: DrillStack) -> tuple[Environment, bytes]:
    """v3 serving from blue, v2 stopped on green, and the runbook's copy of that state file
    (kept as a CLI run's write keeps it: `test_only_the_runbooks_own_writes_keep_the_copy`)."""
    stack.arrange(scenes.PREVIOUS)
    env = stack.env
    copy_of(env).unlink(missing_ok=True)
    kept.register(env.state_file, env.runs_dir, env.name, lambda _: None)
    states.write_state(env.state_file, states.read_state(env.state_file, environment=env.name))
    kept._PLACES.clear()  # this process is "another tool" from here on: it keeps no copy
    whole = env.state_file.read_bytes()
    assert copy_of(env).read_bytes() == whole
    return env, whole


@pytest.mark.docker
def test_only_the_runbooks_own_writes_keep_the_copy(drill_stack: DrillStack) -> None:
    """A dry run and a read-only command write nothing, this copy included; a rollback's
    state write keeps it, byte for byte."""
    drill_stack.arrange(scenes.PREVIOUS)
    env = drill_stack.env
    copy_of(env).unlink(missing_ok=True)
    for argv in (("status",), ("rollback", "--dry-run")):
        looked = cli(env, *argv)
        assert looked.returncode in (0, 1), looked.stderr
        assert not copy_of(env).exists(), argv
    rolled = cli(env, "rollback", "--yes")
    assert rolled.returncode == 0, rolled.stderr
    assert copy_of(env).read_bytes() == env.state_file.read_bytes()


def names_the_copy(env: Environment, said: str) -> None:
    """The refusal names the copy, its age and the command that puts it back, as typed."""
    assert str(copy_of(env)) in said, said
    assert " old (" in said, said
    assert f"runbook state restore-kept {env.source}" in said, said


def restored_and_rolled_back(env: Environment, whole: bytes) -> None:
    """restore-kept puts the copy back byte for byte, and the rollback it was refused runs."""
    done = cli(env, "state", "restore-kept", "--yes")
    assert done.returncode == 0, done.stderr
    assert env.state_file.read_bytes() == whole
    logs = "".join(p.read_text() for p in env.log_dir.glob("*.log"))
    assert "restore-kept finished" in logs  # journaled as every mutating command
    rolled = cli(env, "rollback", "--yes")
    assert rolled.returncode == 0, rolled.stderr
    assert through_proxy(env) == ("green", V2.tag)
    state = states.read_state(env.state_file, environment=env.name)
    assert state.current is not None and state.current.version == V2.tag


def truncate(env: Environment, whole: bytes) -> bytes:
    cut = whole[: len(whole) // 2]
    env.state_file.write_bytes(cut)
    return cut


@pytest.mark.docker
def test_a_truncated_state_file_names_the_copy_and_the_command_that_restores_it(
        drill_stack: DrillStack) -> None:
    env, whole = arranged_and_kept(drill_stack)
    cut = truncate(env, whole)

    refused = cli(env, "rollback", "--yes")
    assert refused.returncode == 4, refused.stderr  # the refusal's exit code, as before
    names_the_copy(env, refused.stderr)
    assert env.state_file.read_bytes() == cut

    dry = cli(env, "state", "restore-kept", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert hashlib.sha256(whole).hexdigest()[:16] in dry.stdout  # exactly what it writes
    assert f"{V3.tag} on blue" in dry.stdout
    assert env.state_file.read_bytes() == cut

    restored_and_rolled_back(env, whole)


@pytest.mark.docker
def test_a_copy_dated_in_the_future_is_said_so_never_given_an_age(
        drill_stack: DrillStack) -> None:
    """Found by review: a clock set back since the copy was kept made it "2 h 00 min old"."""
    env, whole = arranged_and_kept(drill_stack)
    truncate(env, whole)
    ahead = copy_of(env).stat().st_mtime + 2 * 3600 + 30
    os.utime(copy_of(env), (ahead, ahead))
    refused = cli(env, "rollback", "--yes")
    assert refused.returncode == 4, refused.stderr
    assert f"a copy of it, dated 2 h 00 min in the future ({copy_of(env)})" in refused.stderr, \
        refused.stderr
    assert " old (" not in refused.stderr, refused.stderr
    dry = cli(env, "state", "restore-kept", "--dry-run")
    assert "dated 2 h 00 min in the future" in dry.stdout + dry.stderr, (dry.stdout, dry.stderr)


@pytest.mark.docker
def test_a_valid_state_file_is_never_replaced_by_the_copy(drill_stack: DrillStack) -> None:
    env, whole = arranged_and_kept(drill_stack)
    copy_of(env).write_bytes(whole.replace(b'"locked": false', b'"locked": false ',
                                           1))  # a copy that differs from the file
    refused = cli(env, "state", "restore-kept", "--yes", "--force")
    assert refused.returncode == 4, refused.stderr
    assert "reads whole now" in refused.stderr
    assert env.state_file.read_bytes() == whole


@pytest.mark.docker
def test_a_copy_that_contradicts_what_runs_is_refused_unless_forced(
        drill_stack: DrillStack) -> None:
    env, whole = arranged_and_kept(drill_stack)  # the copy: v3 on blue
    # another tool moves traffic to v2 on green, then leaves the file cut short
    switch.switch(env, switch.Options(slot=Slot.GREEN, reason="test: another tool"))
    assert through_proxy(env) == ("green", V2.tag)
    cut = truncate(env, env.state_file.read_bytes())

    refused = cli(env, "state", "restore-kept", "--yes")
    assert refused.returncode == 4, refused.stderr
    assert f"copy says {V3.tag} on blue, but Caddy serves {V2.tag} on green" in refused.stderr
    assert "--force" in refused.stderr
    assert env.state_file.read_bytes() == cut

    # both ways out are commands that run, naming the environment as it was given (a file)
    assert f"runbook switch {env.source} --slot blue" in refused.stderr  # the copy is right
    record = f"runbook switch {env.source} --slot green"  # what runs is right
    assert record in refused.stderr

    forced = cli(env, "state", "restore-kept", "--yes", "--force")
    assert forced.returncode == 0, forced.stderr
    assert env.state_file.read_bytes() == whole

    recorded = cli(env, "switch", "--slot", "green", "--yes")  # as printed: records, moves nothing
    assert recorded.returncode == 0, recorded.stderr
    assert through_proxy(env) == ("green", V2.tag)
    state = states.read_state(env.state_file, environment=env.name)
    assert state.current is not None and (state.current.version, str(state.current.active_slot)) \
        == (V2.tag, "green")


@pytest.mark.docker
def test_a_kill_during_the_restore_leaves_the_old_file_and_the_rerun_restores(
        drill_stack: DrillStack) -> None:
    env, whole = arranged_and_kept(drill_stack)
    cut = truncate(env, whole)
    killed = cli(env, "state", "restore-kept", "--yes", fault="state.before-rename:SIGKILL")
    assert killed.returncode == -9, killed.stderr
    assert env.state_file.read_bytes() == cut  # the old file, never a mix
    again = cli(env, "state", "restore-kept", "--yes")
    assert again.returncode == 0, again.stderr
    assert env.state_file.read_bytes() == whole


def test_a_copy_that_cannot_be_kept_is_a_warning_and_the_write_goes_on(tmp_path: Path) -> None:
    """One warning per command however many writes (each its own content), naming a fix."""
    state_file = tmp_path / "deployment-state.json"
    state_file.write_text('{"environment": "staging", "current_deployment": null, '
                          '"lock": {"locked": false}}')
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be")
    said: list[str] = []
    kept.register(state_file, blocker, "staging", said.append)
    for locked in (True, False, True):
        state = states.read_state(state_file, environment="staging")
        states.write_state(state_file, states.with_lock(state, {"locked": locked,
                                                                "reason": f"write {locked}"}))
    assert states.read_state(state_file, environment="staging").lock.get("locked") is True
    assert len(said) == 1 and said[0].startswith("warning: cannot keep a copy"), said
    assert str(blocker) in said[0] and "make " in said[0], said  # the fix: what to make of it


# Another tool's keys in the state file (CONTRACTS: unknown keys ride along), secrets in them
SECRETS = ("hunter2", "S3cr3tPw", "abcd1234efgh", "zyxw9876")


def with_other_tools_secrets(data: dict[str, object]) -> dict[str, object]:
    current = data["current_deployment"]
    assert isinstance(current, dict)
    current["deploy_env"] = "DEPLOY_SECRET=hunter2"
    current["deployed_by"] = "ci token=zyxw9876"  # a field the runbook itself reads
    data["notify"] = {"db": "postgres://app:S3cr3tPw@db:5432/togather",
                      "auth": "token=abcd1234efgh", "channel": "#deploys"}
    return data


def secret_paths(value: object, path: str = "") -> list[str]:
    """Where the document holds one of SECRETS, as `a.b[0].c` (the test's own walk)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in secret_paths(v, f"{path}.{k}" if path
                                                                   else k)]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in secret_paths(v, f"{path}[{i}]")]
    return [path] if isinstance(value, str) and any(s in value for s in SECRETS) else []


def masked_by_hand(raw: bytes) -> bytes:
    """The oracle: the file's own bytes with each secret replaced by the mask, nothing else."""
    for secret in SECRETS:
        raw = raw.replace(secret.encode(), b"***")
    return raw


def test_a_secret_in_another_tools_key_is_masked_and_the_copy_still_kept(
        tmp_path: Path) -> None:
    """Found by review: text masking ate the closing quote of "DEPLOY_SECRET=hunter2" (no
    JSON left), so no copy was kept from then on, a warning at every write. The copy is the
    same document, its secret values masked, in the file's own style, with no secret byte."""
    state_file = tmp_path / "deployment-state.json"
    data = with_other_tools_secrets({
        "environment": "staging", "current_deployment": {
            "id": "d1", "version": "abc1234", "git_commit": "a" * 40,
            "deployed_at": "2025-01-01T00:00:00Z", "deployed_by": "ci", "active_slot": "blue"},
        "lock": {"locked": False}})
    data["password"] = "plain-word-5"  # a secret's name masks any value (the journal's rule)
    state_file.write_text(json.dumps(data, indent=4) + "\n")
    said: list[str] = []
    kept.register(state_file, tmp_path / "runs", "staging", said.append)
    for locked in (True, False):
        state = states.read_state(state_file, environment="staging")
        states.write_state(state_file, states.with_lock(state, {"locked": locked}))
        assert said == []
        copy = kept.copy_path(tmp_path / "runs", state_file, "staging").read_bytes()
        assert copy == masked_by_hand(state_file.read_bytes()).replace(
            b'"plain-word-5"', b'"***"')
        assert not any(s.encode() in copy for s in (*SECRETS, "plain-word-5")), copy


@pytest.mark.docker
def test_restore_kept_names_every_value_it_writes_masked(drill_stack: DrillStack) -> None:
    """Found by review: a rollback with a secret in another tool's key kept no copy (a warning
    printed twice, the copy left at the state before it); and restore-kept wrote another
    tool's masked values (`postgres://app:***@db`) back without a word. Now the copy is kept,
    holds no secret, and restore-kept names every masked key (and the ones the runbook
    itself reads) in its plan, its dry run and its result."""
    env, _ = arranged_and_kept(drill_stack)
    data = with_other_tools_secrets(json.loads(env.state_file.read_bytes()))
    env.state_file.write_text(json.dumps(data, indent=2) + "\n")
    rolled = cli(env, "rollback", "--yes")
    assert rolled.returncode == 0, rolled.stderr
    assert "cannot keep a copy" not in rolled.stderr, rolled.stderr
    whole = env.state_file.read_bytes()
    copied = copy_of(env).read_bytes()
    assert copied == masked_by_hand(whole)  # every key, the file's style, no secret
    assert not any(s.encode() in copied for s in SECRETS)
    masked = secret_paths(json.loads(whole))
    assert {"notify.db", "notify.auth"} <= set(masked) and len(masked) >= 4, masked
    ours = [p for p in masked if p.endswith(".deployed_by")]
    assert ours, masked

    env.state_file.write_bytes(b"")
    dry = cli(env, "state", "restore-kept", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    listed = dry.stdout.split("as *** ")[1].split("\n")[0]  # the plan's warning
    assert all(p in listed for p in masked), (masked, dry.stdout)
    clause = listed[listed.index("put the real values back"):]
    assert "runbook itself reads" in clause, listed
    assert [p for p in masked if p in clause] == ours, listed  # only the runbook's fields
    assert env.state_file.read_bytes() == b""

    done = cli(env, "state", "restore-kept", "--yes")
    assert done.returncode == 0, done.stderr
    assert env.state_file.read_bytes() == copied
    result = done.stderr.split("written as ***: ")[-1].split("\n")[0]
    assert done.stderr.count("written as ***: ") == 1 and all(p in result for p in masked), \
        done.stderr
    assert "put the real values back" in result and "runbook itself reads" in result, result


def test_no_secret_is_kept(tmp_path: Path) -> None:
    state_file = tmp_path / "deployment-state.json"
    state_file.write_text('{"environment": "staging", "current_deployment": null, '
                          '"lock": {"locked": false}, '
                          '"note": "postgresql://app:Sup3rSecret@db/app"}')
    kept.register(state_file, tmp_path / "runs", "staging", lambda _: None)
    states.write_state(state_file, states.read_state(state_file, environment="staging"))
    copy = kept.copy_path(tmp_path / "runs", state_file, "staging").read_text()
    assert "Sup3rSecret" not in copy and '"environment": "staging"' in copy



def test_the_copys_size_limit_is_the_state_files() -> None:
    assert kept.MAX_BYTES == states.MAX_STATE_BYTES


@pytest.mark.docker
def test_a_copy_naming_the_serving_slot_with_another_version_names_no_switch(
        drill_stack: DrillStack) -> None:
    """Found by review: the copy's slot is the one that serves, its version another; both
    commands the refusal printed were a switch to that slot, refused as "nothing to switch".
    Oracle: the refusal's text, and the switch it used to name, run."""
    env, whole = arranged_and_kept(drill_stack)  # the copy: v3 on blue, blue runs v3
    copy_of(env).write_bytes(whole.replace(V3.tag.encode(), V2.tag.encode()))
    truncate(env, whole)
    refused = cli(env, "state", "restore-kept", "--yes")
    assert refused.returncode == 4, refused.stderr
    assert f"copy says {V2.tag} on blue, but Caddy serves {V3.tag} on blue" in refused.stderr
    assert "runbook switch" not in refused.stderr, refused.stderr
    assert f"`runbook status {env.source}`" in refused.stderr, refused.stderr
    forced = cli(env, "state", "restore-kept", "--yes", "--force")
    assert forced.returncode == 0, forced.stderr
    named = cli(env, "switch", "--slot", "blue", "--dry-run")  # what it used to name
    assert (named.returncode, "nothing to switch" in named.stderr) == (4, True), named.stderr


@pytest.mark.docker
def test_a_deleted_state_file_names_the_copy_and_restore_kept_puts_it_back(
        drill_stack: DrillStack) -> None:
    """Another tool deleted (or moved away) the state file: rollback said "no deployment has
    been recorded ... deploy first", and a switch planned a first-ever record, the history
    lost. Every command names the copy instead; restore-kept recreates the file from it."""
    env, whole = arranged_and_kept(drill_stack)
    env.state_file.unlink()

    status = cli(env, "status")
    assert status.returncode == 1, status.stderr
    names_the_copy(env, status.stdout)
    for argv in (("rollback", "--yes"), ("rollback", "--dry-run"),
                 ("switch", "--slot", "green", "--dry-run"),
                 ("switch", "--slot", "green", "--yes")):
        refused = cli(env, *argv)
        assert refused.returncode == 4, (argv, refused.stdout, refused.stderr)
        names_the_copy(env, refused.stderr)
        assert "deploy first" not in refused.stderr, refused.stderr
        assert not env.state_file.exists(), argv
    assert through_proxy(env) == ("blue", V3.tag)  # the refused switch moved nothing

    dry = cli(env, "state", "restore-kept", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert hashlib.sha256(whole).hexdigest()[:16] in dry.stdout
    assert "does not exist" in dry.stdout
    assert not env.state_file.exists()

    restored_and_rolled_back(env, whole)


def refused_record(whole: bytes) -> bytes:
    """The state file as JSON, its current deployment's version a number (wrong type)."""
    data = json.loads(whole)
    data["current_deployment"]["version"] = 5
    return json.dumps(data, indent=2).encode()


@pytest.mark.docker
def test_a_state_file_with_a_refused_record_names_the_copy_and_restore_kept_replaces_it(
        drill_stack: DrillStack) -> None:
    env, whole = arranged_and_kept(drill_stack)
    bad = refused_record(whole)
    env.state_file.write_bytes(bad)

    status = cli(env, "status")
    assert status.returncode == 1, status.stderr
    assert "current_deployment.version: expected a string" in status.stdout
    names_the_copy(env, status.stdout)
    refused = cli(env, "rollback", "--yes")
    assert refused.returncode == 4, refused.stderr
    assert "current_deployment.version: expected a string" in refused.stderr
    names_the_copy(env, refused.stderr)
    assert env.state_file.read_bytes() == bad

    dry = cli(env, "state", "restore-kept", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert hashlib.sha256(whole).hexdigest()[:16] in dry.stdout
    assert env.state_file.read_bytes() == bad

    restored_and_rolled_back(env, whole)


def in_this_environment(sample: str, env: Environment) -> bytes:
    raw = (Path(__file__).parent / "data" / "state" / sample).read_bytes()
    for name in (b"production", b"staging"):
        raw = raw.replace(b'"' + name + b'"', b'"' + env.name.encode() + b'"')
    return raw


@pytest.mark.docker
def test_a_state_file_that_reads_whole_in_any_dialect_is_never_replaced(
        drill_stack: DrillStack) -> None:
    """CONTRACTS: three dialects, all valid (the deploy script's first-ever file too), and
    another environment's file is no broken one: none is replaced, even with --force, and
    none of their refusals points at the copy."""
    env, _ = arranged_and_kept(drill_stack)
    other = "staging" if env.name != "staging" else "production"
    files = {sample: in_this_environment(sample, env) for sample in (
        "documented.json", "deploy_script.json", "deploy_script_first.json", "go_cli.json",
        "go_cli_after_rollback.json")}
    files["another environment's"] = (Path(__file__).parent / "data" / "state" /
                                      "documented.json").read_bytes().replace(
        b'"production"', f'"{other}"'.encode())
    for name, raw in files.items():
        env.state_file.write_bytes(raw)
        if name != "another environment's":
            states.read_state(env.state_file, environment=env.name)  # reads whole (oracle)
        refused = cli(env, "state", "restore-kept", "--yes", "--force")
        assert refused.returncode == 4, (name, refused.stderr)
        assert env.state_file.read_bytes() == raw, name
        assert str(copy_of(env)) not in refused.stderr.split(";")[0], (name, refused.stderr)
        if name == "another environment's":
            assert f"belongs to {other}" in refused.stderr, refused.stderr
            looked = cli(env, "status")
            assert str(copy_of(env)) not in looked.stdout, looked.stdout
        else:
            assert "reads whole now" in refused.stderr, (name, refused.stderr)


def held_before_its_rename(env: Environment) -> subprocess.Popen[str]:
    """`runbook state restore-kept --yes`, stopped (SIGSTOP) right before its rename."""
    environ = os.environ | {faults.VARIABLE: "state.before-rename:SIGSTOP"}
    run = subprocess.Popen([sys.executable, "-m", "runbook.cli", "state", "restore-kept",
                            "--yes", str(env.source)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                           env=environ)
    wait_stopped(run.pid)
    return run


@pytest.mark.docker
@pytest.mark.parametrize("broken", ["deleted", "refused record"])
def test_a_file_written_while_the_restore_waits_is_never_written_over(
        drill_stack: DrillStack, broken: str) -> None:
    """Another tool writes a whole state file between restore-kept's plan and its rename
    (created where none was, or the refused record fixed): that file stays."""
    env, whole = arranged_and_kept(drill_stack)
    if broken == "deleted":
        env.state_file.unlink()
    else:
        env.state_file.write_bytes(refused_record(whole))
    theirs = in_this_environment("go_cli.json", env)
    run = held_before_its_rename(env)
    try:
        env.state_file.write_bytes(theirs)
        os.kill(run.pid, signal.SIGCONT)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode != 0, err
    assert "was not written over it" in err or "nothing was written over it" in err, err
    assert env.state_file.read_bytes() == theirs


@pytest.mark.docker
def test_a_deleted_state_file_under_an_interrupted_rollback_keeps_its_history(
        drill_stack: DrillStack) -> None:
    """Found by review: a rollback killed (-9) once traffic moved, then the state file
    deleted. Its finish recorded onto nothing: a file without any history, the copy replaced
    by it, and restore-kept then refused ("reads whole now"). The finish refuses naming the
    copy (nothing changed); restore-kept's refusal names --force then that finish; followed
    literally, the state holds the rollback on top of the copy's history."""
    env, whole = arranged_and_kept(drill_stack)
    killed = cli(env, "rollback", "--yes", fault="switch.after-verify:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    copied = copy_of(env).read_bytes()  # (as the killed run's lock left it)
    env.state_file.unlink()
    finish = cli(env, "rollback", "--yes")
    assert finish.returncode != 0, finish.stdout + finish.stderr
    names_the_copy(env, finish.stderr)
    assert not env.state_file.exists() and copy_of(env).read_bytes() == copied
    refused = cli(env, "state", "restore-kept", "--yes")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    fixes = re.findall(r"`(runbook [^`]*)`", refused.stderr.split("fix:")[-1])
    assert [f.split()[1] for f in fixes] == ["state", "rollback"], fixes
    for fix in fixes:  # as printed, the environment's word as cli() gives it (its file)
        words = [w for w in shlex.split(fix)[1:] if w not in (env.name, str(env.source))]
        done = cli(env, *words, "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
    st = states.read_state(env.state_file, environment=env.name)
    assert st.current is not None and st.current.version == V2.tag
    assert st.rolled_back_from is not None and st.rolled_back_from.version == V3.tag
    assert len(st.history) >= len(json.loads(whole)["deployment_history"])  # kept, not lost
    assert through_proxy(env) == ("green", V2.tag)


@pytest.mark.docker
def test_restore_kept_under_a_run_killed_before_its_commit_mark_says_traffic_moved(
        drill_stack: DrillStack) -> None:
    """Found by the merged-diff review: a rollback killed between Caddy's reload and its
    commit mark (its record still says "prepare"), then the state file deleted: restore-kept's
    refusal named the run "(..., stopped before traffic moved), which moved traffic to
    green". Caddy serves its target: what the proxy answers is the oracle."""
    env, _ = arranged_and_kept(drill_stack)
    killed = cli(env, "rollback", "--yes", fault="switch.after-reload:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert through_proxy(env) == ("green", V2.tag)
    env.state_file.unlink()
    refused = cli(env, "state", "restore-kept", "--yes")
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert "before traffic moved" not in refused.stderr, refused.stderr
    assert "after traffic moved" in refused.stderr, refused.stderr


@pytest.mark.docker
def test_restore_kept_of_a_state_path_it_cannot_read_is_refused_not_a_bug(
        drill_stack: DrillStack) -> None:
    """Found by review: a directory (or an unreadable file) at the state file's path read as
    "unexpected failure (a bug in runbook)". It is a refusal naming the path (the deploy
    lock's, exit 3, which reads the file first; restore-kept's own, exit 4, otherwise)."""
    env, whole = arranged_and_kept(drill_stack)
    env.state_file.unlink()
    env.state_file.mkdir()
    try:
        done = cli(env, "state", "restore-kept", "--yes")
        assert done.returncode in (3, 4), done.stdout + done.stderr
        assert "bug" not in done.stderr and str(env.state_file) in done.stderr, done.stderr
        assert env.state_file.is_dir() and copy_of(env).read_bytes() == whole
    finally:
        env.state_file.rmdir()
        env.state_file.write_bytes(whole)


@pytest.mark.docker
def test_a_deleted_state_file_whose_copy_records_nothing_is_a_first_deploy_again(
        drill_stack: DrillStack) -> None:
    """Found by review: a copy recording no deployment (the lock-only file a failed first
    deploy leaves) then a deliberate `rm` of the state file: every deploy refused naming that
    copy, which holds nothing to lose. The file's absence is a first deploy again."""
    env, whole = arranged_and_kept(drill_stack)
    copy_of(env).write_bytes(json.dumps({"environment": env.name}).encode())
    env.state_file.unlink()
    try:
        looked = cli(env, "switch", "--slot", "green", "--dry-run")
        assert looked.returncode == 0, looked.stdout + looked.stderr
        assert "restore-kept" not in looked.stdout + looked.stderr
    finally:
        env.state_file.write_bytes(whole)
