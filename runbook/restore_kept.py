"""`runbook state restore-kept`: put back the copy of the state file the runbook kept
(runbook/kept_state.py) when the file is empty, cut short, not JSON, deleted (or moved away)
or a JSON object whose record the reader refuses, so on-call never edits it by hand
mid-incident. A file the reader accepts, in any of the three dialects, or another
environment's file, is no broken one.

Truth comes from what runs: the copy is shown next to the slot Caddy's loaded config serves
and the version its container runs, and one that contradicts them is refused unless on-call
passes --force. A file that reads whole now (someone fixed it) is never replaced, also when
it is fixed (or created, where none was) between the plan and the write. The write is
atomic, under the deploy lock, journaled like every mutating command. The copy holds no
secret (kept_state masks them): every key it writes as `***` is named in the plan, the dry
run and the result, never another tool's setting corrupted silently.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from runbook import docker, finish, traffic
from runbook import intent as intents
from runbook import kept_state as kept
from runbook import state as states
from runbook.environment import Environment, command_arg
from runbook.errors import PreconditionError, RunbookError, StateError
from runbook.plan import Phase, Plan, Step, StepContext
from runbook.run import WARNING, RunResult, perform
from runbook.state.schema import read_by_the_runbook

FORCE_FLAG = "--force"


@dataclass(frozen=True)
class Options:
    force: bool = False
    reason: str = "restore the kept state file"


def restore_kept(env: Environment, options: Options, *, dry_run: bool = False,
                 confirm: Any = None, progress: Any = None, notify: Any = None) -> RunResult:
    return perform(env, "restore-kept", lambda run_id: plan(env, options), dry_run=dry_run,
                   reason=options.reason, confirm=confirm, progress=progress, notify=notify)


@dataclass(frozen=True)
class Broken:
    """The state file as the plan found it: its bytes (None: it does not exist) and how it
    is broken, in the plan's words."""

    raw: bytes | None
    how: str


_MISSING = "does not exist (deleted or moved away)"


def _broken(env: Environment) -> Broken:
    """The state file when it may be replaced: missing (deleted or moved away), no JSON object,
    or a JSON object whose record the reader refuses. Refused when it reads whole (in any of
    the three dialects) or is another environment's file (the configuration points there),
    or cannot be read at all (its permissions: nothing is known of it)."""
    command = f"{kept.COMMAND} {command_arg(env)}"
    try:
        states.read_state(env.state_file, environment=env.name)
    except states.NotJSON as exc:
        return Broken(exc.raw, f"{len(exc.raw)} bytes, not JSON")
    except states.Refused as exc:
        assert exc.raw is not None  # (read_state's refusals carry the bytes they judged)
        said = exc.message.removeprefix(f"{env.state_file}: ")
        return Broken(exc.raw, f"{len(exc.raw)} bytes, a record refused ({said})")
    except StateError as exc:
        if _bytes_now(env) is None:  # (created since: refused below, the rerun judges it)
            return Broken(None, _MISSING if not env.state_file.is_symlink() else
                          f"does not exist (a symlink to {os.path.realpath(env.state_file)}, "
                          "which is missing)")
        raise PreconditionError(
            f"{command} only replaces a state file that is missing, empty, cut short, not JSON "
            f"or has a record the reader refuses; this one is refused otherwise "
            f"({exc.message}); nothing was changed", exc.fix or "fix that first") from None
    raise PreconditionError(f"{env.state_file} reads whole now (someone fixed it): "
                            f"{command} never replaces it; nothing was changed",
                            f"see it next to what runs: `runbook status {command_arg(env)}`")


def _bytes_now(env: Environment) -> bytes | None:
    """The state file's bytes now; None when it does not exist. One that cannot be read (its
    permissions, a directory there) is refused: nothing is known of it (it read as a bug)."""
    try:
        return env.state_file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PreconditionError(
            f"{env.state_file} cannot be read ({exc.strerror or exc}): {kept.COMMAND} replaces "
            "only a file it has read; nothing was changed",
            "run it as a user who can read the file (the deploy user, or sudo), or fix what "
            "is at that path") from None


def _serving(env: Environment) -> tuple[str | None, str | None, str | None]:
    """(slot Caddy's loaded config serves, the version its container runs, why not known)."""
    try:
        now = traffic.read(env)
    except RunbookError as exc:
        return None, None, exc.message
    if now.slot is None:
        return None, None, now.problem(env) or "Caddy serves no single slot"
    info = docker.inspect(env.slot(now.slot).container)
    if not info.exists or info.status != "running":
        return str(now.slot), None, f"{env.slot(now.slot).container} is {info.status}"
    return str(now.slot), info.tag, None


def _contradiction_fix(env: Environment, current: states.Deployment | None,
                       serving: str | None, running: str | None) -> str:
    """Both ways out, each a command that runs: restore with --force, then either put traffic
    back on the copy's slot or record the slot that serves (a switch to the slot Caddy
    already serves only records it: traffic does not move). Only when the copy names the
    other slot than the one serving, and that one runs (`running`: its version): a switch to
    the slot that serves is refused otherwise ("nothing to switch"), and a stopped one is
    started by `docker start`, not a switch (found by review); status then names the fix."""
    arg = command_arg(env)
    restore = f"`{kept.COMMAND} {arg} {FORCE_FLAG}`"
    try:
        pending = intents.read(env)
    except RunbookError:  # an unreadable record: status says so and how to move it aside
        pending = None
    if pending is not None and serving == str(pending.target):
        # an interrupted run moved traffic and never recorded it: the copy is from before it,
        # and that run's finish records it onto the copy's history (found by review: the
        # finish of a run whose state file was deleted wrote one without any history)
        return (f"{restore} restores it as it was before the interrupted {pending.action} "
                f"({pending.describe(moved=True)}), which moved traffic to {serving}; then "
                f"`{finish.resume_command(env, pending)}` finishes that run and records it")
    if current is None or current.active_slot is None or serving is None or running is None \
            or str(current.active_slot) == serving:
        return (f"{restore} restores it anyway; then `runbook status {arg}` names what "
                "reconciles it with what runs")
    return (f"{restore} restores it; then, if the copy is right, `runbook switch {arg} --slot "
            f"{current.active_slot}` puts traffic back on it (health-gated), or, if what runs "
            f"is right, `runbook switch {arg} --slot {serving}` records {serving} as serving "
            "(traffic does not move)")


def plan(env: Environment, options: Options) -> Plan:
    broken = _broken(env)
    copy = kept.found(kept.copy_path(env.runs_dir, env.state_file, env.name))
    if copy is None:
        raise PreconditionError(
            f"{env.state_file} {broken.how}, and the runbook kept no copy of it "
            f"({kept.copy_path(env.runs_dir, env.state_file, env.name)} is missing); "
            "nothing was changed", "restore the file from a backup")
    masked = kept.masked_paths(copy.raw)
    try:
        saved = states.parse_state(copy.raw, str(copy.path), environment=env.name)
    except StateError as exc:
        if (said := _masked_said(masked, "holds")) is not None:
            exc.fix = f"{said}; {exc.fix}" if exc.fix else said
        raise
    current = saved.current
    says = (f"{current.version} on {current.active_slot}" if current is not None
            else "no current deployment")
    slot, version, unknown = _serving(env)
    runs = (f"{version or 'no running container'} on {slot}" if slot else
            f"not known ({unknown})")
    warnings: list[str] = []
    contradiction = None
    if unknown is not None:
        contradiction = f"what runs cannot be read ({unknown})"
    elif current is None or str(current.active_slot) != slot or current.version != version:
        contradiction = f"the copy says {says}, but Caddy serves {runs}"
    if contradiction is not None:
        if not options.force:
            raise PreconditionError(
                f"{contradiction}; the kept copy ({copy.path}, {copy.age}) is not "
                "restored; nothing was changed", _contradiction_fix(env, current, slot, version))
        warnings.append(f"{FORCE_FLAG}: {contradiction}")
    if (said := _masked_said(masked, "restores")) is not None:
        warnings.append(said)
    written = saved
    if saved.lock.get("locked"):  # the mirror of a run that ended (this one holds the lock)
        written = states.with_lock(saved, {"locked": False})
    payload = states.dumps(written)

    def run(ctx: StepContext) -> None:
        def still_broken() -> None:
            ctx.fault("state.before-rename")
            if _bytes_now(env) != broken.raw:  # fixed, rewritten or created since the plan:
                raise states.StateChangedError(  # never written over
                    f"{env.state_file}: changed since this run read it; the kept copy was not "
                    "written over it", f"run `runbook status {command_arg(env)}` to see it")

        # where none was, created and nothing replaced: a file another tool creates after
        # the check above, in the rename's instant, is kept too (StateChangedError)
        states.write_state(env.state_file, written, before_rename=still_broken,
                           new_only=broken.raw is None)
        if (said := _masked_said(masked, "wrote")) is not None:
            ctx.notice(f"{WARNING}{said}")  # the last word: nothing corrupted silently

    def line(dep: states.Deployment | None) -> str:
        return "none" if dep is None else f"{dep.version} on {dep.active_slot or '?'} ({dep.id})"

    details = {
        "file": str(os.path.realpath(env.state_file)),
        "now": broken.how,
        "from": f"{copy.path} ({copy.age})",
        "writes": f"{len(payload)} bytes, sha256 {hashlib.sha256(payload).hexdigest()[:16]}"
                  + (" (the copy as kept)" if payload == copy.raw else ""),
        "current": line(current),
        "previous": line(saved.previous),
        "history": f"{len(saved.history)} deployment(s)",
        **({"masked": ", ".join(map(kept.shown, masked))} if masked else {}),
        "lock": "unlocked" + (" (the copy's lock mirror was of a run that ended)"
                              if written is not saved else ""),
    }
    steps = [
        Step("preflight", "Pre-flight checks (read-only, done)",
             {"copy says": says, "what runs": runs}, phase=Phase.PREFLIGHT),
        Step("state", "Write the kept copy as the state file (atomic)", details, run=run),
    ]
    return Plan("restore-kept", env, f"restore {env.display}'s state file from the copy the "
                f"runbook kept ({says})", steps, warnings,
                facts={"copy": str(copy.path), "content": payload.decode("utf-8-sig"),
                       "masked": [kept.shown(p) for p in masked]})


def _masked_said(paths: list[tuple[str | int, ...]], how: str) -> str | None:
    """What the copy's masked values mean for the state file (`how`: the copy holds them, the
    restore restores them, or wrote them), each path named: another tool's setting written
    as `***` is broken until someone puts the real value back, and one the runbook reads as
    well (the copy holds no secret: kept_state masks them). No path is followed by a colon:
    the CLI masks what follows `token: ` in what it prints."""
    if not paths:
        return None
    names = ", ".join(map(kept.shown, paths))
    said = {"holds": f"the copy holds values masked as *** when it was kept: {names}",
            "restores": f"restores values as *** (masked when the copy was kept; it holds no "
                        f"secret): {names}; put the real values back after it",
            "wrote": f"written as ***: {names}; put the real values back (the copy held no "
                     "secret)"}[how]
    ours = [kept.shown(p) for p in paths if read_by_the_runbook(p)]
    if ours:
        said += (f"; {', '.join(ours)} {'is a field' if len(ours) == 1 else 'are fields'} "
                 "the runbook itself reads: put the real values there before the next deploy, "
                 "switch or rollback")
    return said
