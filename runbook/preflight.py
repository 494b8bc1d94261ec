"""Pre-flight proof of every tool and file a plan will use, before its first change.

Why: a rollback that starts the standby, passes the health gate and only then finds no
`caddy` binary (or a candidate file Caddy cannot see) fails late and blames the wrong thing.
Each check here runs the very path the plan will take, read-only, and a failure is exit 4
naming the tool and the fix, with nothing changed. The results become the pre-flight step's
details, so `--dry-run` shows each one.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from runbook import caddy, database, docker, dry, procs
from runbook.caddy_command import exec_container, runs_in_container, runs_podman
from runbook.environment import Environment, ReloadMethod, Slot
from runbook.errors import PreconditionError, RunbookError
from runbook.probes import Probe as Probe  # re-exported: the plans start probes from here


def _child(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """subprocess.run of a pre-flight probe, SIGHUP ignored in the child: the probes run
    inside a confirmed run, which a closed terminal no longer stops (plan.Signals), so a probe
    killed by the terminal's SIGHUP must not refuse it (found by review)."""
    return subprocess.run(argv, preexec_fn=procs.outlives_hangup, **kwargs)


_TIMEOUT = 15.0


def _run(argv: list[str]) -> tuple[int, str]:
    """(exit code, last output line); 127 when the program does not exist."""
    try:
        done = _child(argv, capture_output=True, text=True, timeout=_TIMEOUT,
                              check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return 127, f"{argv[0]}: command not found"
    except subprocess.TimeoutExpired:
        return 124, f"did not finish within {_TIMEOUT:g}s"
    except OSError as exc:
        return 126, f"{argv[0]}: {exc.strerror or exc}"
    lines = [line for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
    return done.returncode, (lines[-1].strip() if lines else "no output")


def validation(env: Environment, candidate: str) -> str:
    """Have Caddy validate the very config the switch will load, the way the switch will
    (whatever caddy.validate does: a local or `docker exec` binary, or the admin API). A dry
    run writes no candidate beside the Caddyfile (caddy.validate_unwritten): what it did, or
    that it could not and the real run validates before any change, is said (a plan
    warning too: never "validates" unchecked)."""
    try:
        if dry.active() and env.caddy.reload is not ReloadMethod.ADMIN_API:
            ran, unchecked = caddy.validate_unwritten(env, candidate)
            if unchecked is None:  # the switch step shows how the real run validates it
                return (f"the new Caddyfile validates (this dry run: `{ran}`, the file on "
                        "its standard input, nothing written; the real run validates a temp "
                        "copy beside the Caddyfile)")
            real = caddy.shown(env.caddy.reload, caddy.validate_command(
                env, caddy.candidate_shown(env)))
            return (f"NOT validated by this dry run (it writes no file beside the Caddyfile): "
                    f"{unchecked}; the real run validates it before any change: {real}"
                    f"{WARNING_MARK}this dry run did not validate the new Caddyfile: the real "
                    "run does, before any change, and stops there (exit 4) if Caddy rejects it")
        caddy.validate(env, candidate)
    except caddy.CaddyRejectedError as exc:  # Caddy's own words, and the line to mend
        raise PreconditionError(f"pre-flight: {exc.message}", exc.fix) from None
    except RunbookError as exc:
        raise PreconditionError(f"pre-flight: Caddy's validation path does not work: "
                                f"{exc.message}; nothing was changed",
                                exc.fix or "set [caddy] command / container_path") from None
    return "the new Caddyfile validates"


def kept_sites(env: Environment, candidate: str, loaded: Callable[[], Any]) -> str:
    """Every site Caddy serves now (`loaded()`: its running config, traffic.loaded_config)
    is in the config the switch will load. `/load` replaces Caddy's whole config: with
    [caddy] caddyfile naming a fragment (a host whose Caddyfile imports one file per site)
    or a stale copy, the switch loaded that alone, every other site vanished (the admin
    listener's setting with them), and verification, of the app's site, still passed.
    The switch asks again just before it writes (sites_dropped_now)."""
    uncompared = sites_uncompared(env, candidate)
    if uncompared is not None:
        try:
            new, running = as_caddy_reads(env, candidate), loaded()
        except RunbookError:  # unread: the load's own checks say so
            return uncompared
        # outside the suppression (found by review: inside it, its own refusal was
        # swallowed, and a systemctl or `caddy reload` switch moved the admin listener)
        refuse_admin_moved(env, new, running)
        if new is None:  # fail closed: said, never passed in silence
            uncompared += (f"{WARNING_MARK}whether loading {env.caddy.caddyfile} moves Caddy's "
                           "admin listener away from [caddy] admin_url cannot be told (Caddy "
                           "did not adapt it here)")
        # the sites are not compared, but a pending edit still goes live with the reload
        # (found by review: unsaid with systemctl, and with a relative import); fail closed:
        # what cannot be compared is said, never taken for "no pending edit"
        drift = _drift(env, running, untold=(
            f"whether Caddy runs {env.caddy.caddyfile} as it is on disk cannot be told (Caddy "
            "did not adapt it here): an edit of it not yet loaded, another site's included, "
            "goes live with the switch's reload"))
        return uncompared + (f"{WARNING_MARK}{drift}" if drift else "")
    try:
        running = loaded()
    except RunbookError as exc:
        raise PreconditionError(f"pre-flight: {exc.message}", exc.fix) from None
    new = caddy.adapt(env, candidate)
    if new is None:  # refused or unanswered: the validation says which, and stops the run
        return "not compared (Caddy did not adapt the new Caddyfile)"
    if env.caddy.reload is ReloadMethod.CADDY_RELOAD:  # {$VAR} may sit in an imported file
        _same_environment(env, candidate, new)
    drift = _drift(env, running)
    missing = caddy.dropped_sites(running, new)
    if missing:
        raise PreconditionError(
            f"pre-flight: loading {env.caddy.caddyfile} would drop what Caddy serves now "
            f"({missing}): it is not the whole config Caddy runs (a file it imports, or "
            "another copy); nothing was changed",
            "set [caddy] caddyfile to the file Caddy runs (its global options and every "
            "site), or load this one first if it is what Caddy should run")
    refuse_admin_moved(env, new, running)
    return "every site Caddy serves now is in the new Caddyfile" + (
        f"{WARNING_MARK}{drift}" if drift else "")


def sites_uncompared(env: Environment, candidate: str) -> str | None:
    """Why the sites Caddy serves cannot be compared with `candidate`'s; None when they can."""
    if env.caddy.reload is ReloadMethod.SYSTEMCTL:
        return "not compared: systemctl reloads the config file Caddy's own unit names"
    if env.caddy.reload is ReloadMethod.CADDY_RELOAD and any(
            i.relative for i in caddy.file_imports(candidate)):
        # `caddy reload` reads the file and resolves them beside it; `/adapt` has no path
        return ("not compared: relative imports, which only `caddy reload` resolves (nor are "
                "its {$VAR} placeholders compared with Caddy's own reading)")
    return None


def sites_dropped_now(env: Environment, candidate: str, running: Any) -> None:
    """The switch's own check, just before it writes: a site loaded into Caddy since the
    plan (through the admin API during the health gate, or `caddy reload` of another file)
    would be dropped by the load, and verification, of the app's site, would still pass.
    Where the sites are not compared, the admin listener still is, as pre-flight did: the
    Caddyfile and Caddy's config are the plan's (the switch checks both), but a file it
    imports, which the reload reads, may have changed since (found by review)."""
    if sites_uncompared(env, candidate) is not None:
        refuse_admin_moved(env, as_caddy_reads(env, candidate), running)
        return
    new = caddy.adapt(env, candidate)
    if new is None and env.caddy.reload is ReloadMethod.CADDY_RELOAD:
        return  # as pre-flight: `caddy reload` adapts it itself (its validation passed)
    if new is None:  # fail closed: /load adapts it the same way, and its validation may
        # have been pre-flight's. Rejected: Caddy's own error and its line (found by review:
        # "check that the admin API answers" of a typo Caddy names); else it did not answer
        caddy.validate(env, candidate)
        raise PreconditionError(
            f"Caddy did not adapt {env.caddy.caddyfile} just before the switch, so whether "
            "loading it would drop a site Caddy serves cannot be told; nothing was changed",
            f"check `curl {env.caddy.admin_url}/config/` answers, then run again")
    missing = caddy.dropped_sites(running, new)
    if missing:
        raise PreconditionError(
            f"Caddy serves what {env.caddy.caddyfile} does not ({missing}; loaded since the "
            "plan, e.g. through the admin API): the switch would drop it; nothing was changed",
            f"add it to {env.caddy.caddyfile} (or take it out of Caddy), then run again")
    refuse_admin_moved(env, new, running)


def as_caddy_reads(env: Environment, text: str) -> Any | None:
    """Caddy's JSON for Caddyfile `text` (caddy.adapt) with its relative imports resolved
    from the Caddyfile's folder, as Caddy sees it (caddy.imports_from): where `caddy reload`
    and systemd's reload resolve them. Given the text alone, /adapt looked for them in Caddy's
    working directory, rejected a file import, and the check was skipped (found by review)."""
    folder = str(PurePosixPath(caddy.seen_by_caddy(env, env.caddy.caddyfile)).parent)
    return caddy.adapt(env, caddy.imports_from(text, folder, env.caddy.caddyfile.parent))


def refuse_admin_moved(env: Environment, new: Any, running: Any) -> None:
    """Refuse (exit 4, before anything changes) a load that would take Caddy's admin API
    away from [caddy] admin_url (caddy.admin_moved): after it, every status, rollback and
    undo, this switch's own included, could not reach Caddy. `new` None: not adapted (the
    validation says why)."""
    if new is None or (moved := caddy.admin_moved(env, new, running)) is None:
        return
    raise PreconditionError(
        f"the Caddyfile the switch would load ({env.caddy.caddyfile}) {moved}: every later "
        "status, rollback or undo could not reach Caddy; nothing was changed",
        f"make the `admin` global option in {env.caddy.caddyfile} "
        f"{caddy.admin_address(env)} again, where Caddy listens now; if Caddy should listen "
        "elsewhere, move it yourself (`caddy reload` of the file) and set [caddy] admin_url "
        "to the new address; then run again")


WARNING_MARK = "\n! "  # a probe's result: the detail, then what the plan must warn about


def split_warnings(result: str) -> tuple[str, list[str]]:
    """A probe's result as (pre-flight detail, plan warnings)."""
    detail, *warnings = result.split(WARNING_MARK)
    return detail, warnings


def _drift(env: Environment, running: Any, *, untold: str | None = None) -> str | None:
    """Caddy runs a config that differs from its Caddyfile beyond the slot (a route loaded
    through the admin API during an incident, an edit to the file not yet reloaded): the
    switch loads the file, so that difference is lost or goes live with it, and verification
    of the app's site still passes (found by review). Said, not refused: the file is what
    the host says Caddy runs. None when they agree; `untold` when Caddy's adapter cannot
    tell. Relative imports are resolved from the Caddyfile's folder, as Caddy sees it (found
    by review: /adapt resolves them from Caddy's working directory, so with `caddy reload`
    or systemctl a pending edit went unsaid)."""
    from runbook import traffic

    try:
        now = traffic.from_config(env, running).slot
        if now is None:
            return None  # which slot runs is said elsewhere (and fails closed there)
        as_file = as_caddy_reads(env, caddy.rewrite(caddy.read(env), env, now))
    except RunbookError:
        return untold
    if as_file is None:
        return untold
    where = caddy.first_difference(running, as_file)
    if where is None:
        return None
    return (f"Caddy runs a config that differs from {env.caddy.caddyfile} beyond the slot "
            f"(first at {where}): the switch loads the file, so that difference is dropped "
            "(a change made through the admin API) or goes live (an edit not yet reloaded)")


def _same_environment(env: Environment, candidate: str, by_caddy: Any) -> None:
    """`caddy reload` run here expands the Caddyfile's `{$VAR}` placeholders with this
    process's environment, not with the one of the Caddy that loads the result (a systemd
    unit's EnvironmentFile, a container's env): a placeholder set only there became empty
    and the reload changed more than the slot (a site address, a header, a secret). Caddy's
    own adaptation (`/adapt`) is the oracle; any difference, or none to compare with, is
    refused before anything changes."""
    if dry.active():
        # a dry run writes no candidate for `caddy adapt` to read: the file on disk is asked
        # the same question. The candidate differs from it only in the upstream ports and
        # slot headers between the markers, literal values the switch writes, so their
        # placeholders expand alike (one in a token the switch replaces is compared here,
        # not there: refused, fail closed)
        by_caddy = caddy.adapt(env, caddy.read(env))
        if by_caddy is None:
            raise PreconditionError(
                f"pre-flight: Caddy's admin API did not adapt {env.caddy.caddyfile} as it is "
                "on disk, which a dry run (it writes no candidate) compares with `caddy "
                "adapt` run here, so what `caddy reload` would load (its {$VAR} placeholders "
                "expanded here) cannot be checked; nothing was changed",
                f"check `curl {env.caddy.admin_url}/config/` answers and the Caddyfile on "
                "disk is one Caddy adapts, then run again")
        here, ran = caddy.adapt_file_as_reload(env)
        said = f" (`{ran}`)"
    else:
        here, said = caddy.adapt_as_reload(env, candidate), ""
    if here is None:
        raise PreconditionError(
            f"pre-flight: `caddy adapt`, run by [caddy] command, could not adapt "
            f"{env.caddy.caddyfile} here{said}, so what `caddy reload` would load (its "
            "{$VAR} placeholders expanded here) cannot be checked; nothing was changed",
            "run `caddy adapt --config <file>` to see why, or set [caddy] reload = admin-api "
            "(Caddy then expands them itself)")
    where = caddy.first_difference(by_caddy, here)
    if where is not None:
        raise PreconditionError(
            "pre-flight: `caddy reload`, run by [caddy] command, would load another config "
            f"than Caddy's own reading of {env.caddy.caddyfile} (first at {where}): "
            "its {$VAR} placeholders are expanded with this shell's environment, not "
            "Caddy's (or this caddy is another version); nothing was changed",
            "set [caddy] reload = admin-api (Caddy expands them itself), or [caddy] command "
            "to run caddy where Caddy runs (e.g. `docker exec <container> caddy`), or export "
            "the same variables here")


def caddyfile_mount(env: Environment) -> str:
    """Caddy's container must see the Caddyfile the runbook writes. Every write is atomic (a
    new file renamed over the old), which a bind mount of the FILE never sees: the mount
    keeps the old inode. The switch itself loads the text through the admin API and
    succeeds, but Caddy's copy of the file still names the old slot, now stopped; its next
    restart or `caddy reload` sends every user there. A mount of the directory sees it.
    A podman-run Caddy is refused: its container cannot be read through Docker's engine
    (`runs_podman`), and one of its name there is another (found by review: its mounts were
    read as Caddy's)."""
    if runs_podman(env.caddy.command):
        raise PreconditionError(
            "pre-flight: [caddy] command runs Caddy through podman, whose containers the "
            "runbook cannot inspect (it reads Docker's engine only), so what Caddy's container "
            "mounts and which network it is on cannot be checked; nothing was changed",
            "run Caddy's container under Docker and set [caddy] command to `docker exec NAME "
            "caddy` (or `docker compose exec SERVICE caddy`), or run Caddy on the host")
    name = exec_container(env.caddy.command)
    if name is None:
        return ("not checked: Caddy is not run through `docker exec NAME` (mount the "
                "Caddyfile's directory into its container, never the file)")
    sources = docker.bind_sources(name)
    if sources is None:  # its command then reaches no Caddy here, or another engine's
        raise PreconditionError(
            f"pre-flight: Caddy's container {name} ([caddy] command) is not on the Docker "
            "engine the runbook inspects, so what it mounts cannot be checked; nothing was "
            "changed", f"start it (`docker start {name}`), or fix [caddy] command, or point "
            "the runbook at the engine that runs it (DOCKER_HOST, `docker context use`)")
    target = os.path.realpath(env.caddy.caddyfile)
    if any(os.path.realpath(src) == target for src in sources):
        raise PreconditionError(
            f"pre-flight: Caddy's container {name} bind-mounts the Caddyfile itself "
            f"({env.caddy.caddyfile}): the runbook replaces it by a rename, which a mount of "
            "the file never sees, so Caddy would keep a copy naming the old slot; nothing was "
            "changed", f"mount its directory instead (e.g. -v {Path(target).parent}:/etc/caddy"
            ") and set [caddy] container_path, then run again")
    return f"container {name} sees the Caddyfile's directory"


def reload_path(env: Environment, *, admin_answered: bool = False) -> str:
    """Prove the reload method can run: the admin API answers, the `caddy` command runs and
    sees the Caddyfile at the path it will be given, or systemctl exists. `admin_answered`:
    the planner has just read Caddy's running config (no second GET for the same answer)."""
    c = env.caddy
    if c.reload is ReloadMethod.ADMIN_API:
        problem = caddy.running_problem(env, admin_answered=admin_answered)
        if problem:
            raise PreconditionError("pre-flight: the reload path does not work: "
                                    f"{problem.problem}", problem.fix)
        return f"POST {c.admin_url}/load: the admin API answers"
    if c.reload is ReloadMethod.CADDY_RELOAD:
        seen = caddy.seen_by_caddy(env, c.caddyfile)
        argv = [*c.command, "adapt", "--config", seen, "--adapter", "caddyfile"]
        code, last = _run(argv)
        if code != 0:
            where = f" (Caddy sees the Caddyfile as {seen})" if c.container_path else ""
            raise PreconditionError(
                f"pre-flight: the reload command cannot work: `{shlex.join(argv)}` exited "
                f"{code}: {last}{where}; nothing was changed",
                "set [caddy] command to a working caddy (e.g. [\"docker\", \"exec\", "
                "\"<caddy container>\", \"caddy\"]) and [caddy] container_path to the "
                "Caddyfile's path inside that container")
        command = caddy.reload_command(env)
        return (f"{command.display()}: `{c.command[0]}` runs and reads {seen}"
                + (f"; {command.note}" if command.note else ""))
    if shutil.which("systemctl") is None:
        raise PreconditionError("pre-flight: the reload method is systemctl, but systemctl is "
                                "not installed here; nothing was changed",
                                "set [caddy] reload to admin-api or caddy-reload")
    problem = caddy.running_problem(env, admin_answered=admin_answered)
    if problem:
        raise PreconditionError("pre-flight: the reload path does not work: "
                                f"{problem.problem}", problem.fix)
    return f"systemctl reload {c.systemd_unit}: unit active"


def compose_path(env: Environment, tag: str | None = None) -> str:
    """The compose file exists, `docker compose` runs and reads the project with its env file
    (only when the plan recreates; `tag`: the IMAGE_TAG the recreate sets)."""
    file = env.compose.file
    if file is None or not file.is_file():
        raise PreconditionError(f"pre-flight: the plan recreates a slot, but the compose file "
                                f"{file or '(not set)'} does not exist; nothing was changed",
                                "set [compose] file in the environment file")
    # the recreate's very flags: `up --pull never` (never a registry) exists from Compose 2.6
    # on; an older compose (docker-compose v1) failed on the flag mid-plan
    argv = [*env.compose.command, "up", "--help"]
    try:
        done = _child(argv, capture_output=True, text=True, timeout=_TIMEOUT,
                              check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        code, said = 127, f"{argv[0]}: command not found"
    except (OSError, subprocess.TimeoutExpired) as exc:
        code, said = 126, str(exc)
    else:
        code = done.returncode
        said = ([ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
                or ["no output"])[-1]
        if code == 0 and "--pull" not in done.stdout:
            code, said = 1, "its `up` has no --pull option (Compose 2.6 or later has)"
    if code != 0:
        raise PreconditionError(f"pre-flight: `{shlex.join(argv)}` exited {code}: {said}; "
                                "nothing was changed",
                                "install Docker's Compose v2 plugin (2.6 or later) or set "
                                "[compose] command")
    compose_config(env, tag)
    return (f"{file} present; `{shlex.join([*env.compose.command, 'up', '--pull', 'never'])}` "
            "runs; "
            "`config` reads it" + (f" with {env.compose.env_file}" if env.compose.env_file
                                   else ""))


def compose_config(env: Environment, tag: str | None = None) -> dict[str, Any]:
    """Have compose read the very project the recreate will use (`-p`, `-f`, `--env-file`,
    IMAGE_TAG): `up --help` proved only the program. Why: a missing or unreadable [compose]
    env_file passed pre-flight, and the real deploy took its snapshot, then failed at the
    recreate (exit 1, a snapshot left). Also: each slot's service is in the file and, when it
    names a container_name, names that slot's container (compose recreates by service: a
    swapped or misspelt one recreated another container, or failed mid-run). The output
    (which holds the env file's secrets) is never shown; the error line is redacted.
    Returns the project's services as compose resolved them (`compose_image` reads one)."""
    from runbook import compose
    from runbook.journal import redact

    argv = [*compose.base(env), "config", "--format", "json"]
    where = (f"the compose file {env.compose.file}" + (
        f" with the env file {env.compose.env_file}" if env.compose.env_file else ""))
    extra = {"IMAGE_TAG": tag} if tag else {}
    try:
        done = _child(argv, capture_output=True, text=True, timeout=_TIMEOUT,
                              check=False, stdin=subprocess.DEVNULL,
                              env={**os.environ, **extra})
        code, out = done.returncode, done.stdout
        said = ([ln.strip() for ln in (done.stderr or "").splitlines() if ln.strip()]
                or ["no output"])[-1]
    except (OSError, subprocess.TimeoutExpired) as exc:
        code, out, said = 126, "", str(exc)
    if code != 0:
        raise PreconditionError(
            f"pre-flight: compose cannot read {where}: `{shlex.join(argv)}` exited {code}: "
            f"{redact(said)}; nothing was changed",
            "fix [compose] file / env_file in the environment file (the env file must exist "
            "and be readable by the user that runs the runbook), then run again")
    try:
        services = json.loads(out).get("services")
        if not isinstance(services, dict):
            raise ValueError("no services")
    except (ValueError, AttributeError):
        raise PreconditionError(
            f"pre-flight: `{shlex.join(argv)}` did not print the project as JSON, so which "
            "container each slot's service makes cannot be checked; nothing was changed",
            "install Docker's Compose v2 plugin (2.6 or later) or set [compose] command"
        ) from None
    for slot, config in env.slots.items():
        if not config.service:
            continue
        found = services.get(config.service)
        if not isinstance(found, dict):
            raise PreconditionError(
                f"pre-flight: [slots.{slot}] service is {config.service!r}, but {where} has "
                f"no such service (it has {', '.join(sorted(services)) or 'none'}); nothing "
                "was changed", f"set [slots.{slot}] service to the compose service of "
                f"{config.container}")
        name = found.get("container_name")
        if isinstance(name, str) and name and name != config.container:
            raise PreconditionError(
                f"pre-flight: [slots.{slot}] service {config.service!r} makes the container "
                f"{name!r} ({where}), not {config.container!r}: a recreate of the {slot} "
                "slot would replace another container; nothing was changed",
                f"set [slots.{slot}] service to the compose service whose container_name is "
                f"{config.container} (or [slots.{slot}] container to {name!r})")
    return services


def compose_image(env: Environment, slot: Slot, tag: str) -> str | None:
    """The image compose creates `slot`'s container from: its service's `image:` with the
    IMAGE_TAG the recreate sets, as `config` resolves it (None: the service names none).
    Raises as `compose_config` does (exit 4)."""
    service = env.slot(slot).service
    found = compose_config(env, tag).get(service or "")
    image = found.get("image") if isinstance(found, dict) else None
    return image if isinstance(image, str) and image else None


def image_path(image: str) -> list[str]:
    """The image's PATH entries (where a relative program name is looked up)."""
    code, _ = _run(["docker", "image", "inspect", image])
    if code != 0:
        return []
    done = _child(["docker", "image", "inspect", "--format",
                           "{{range .Config.Env}}{{println .}}{{end}}", image],
                          capture_output=True, text=True, check=False, timeout=_TIMEOUT)
    for line in done.stdout.splitlines():
        if line.startswith("PATH="):
            return [p for p in line[5:].split(":") if p]
    return ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]


CHECK_LABEL = "com.togather.runbook.check"  # on the container the migrate check creates
# who created it: a run killed past its atexit (SIGKILL) left it, and the next check removes
# it only when that process (pid and start time, on this boot) is gone, never a live run's
CREATOR_LABELS = (f"{CHECK_LABEL}.pid", f"{CHECK_LABEL}.start", f"{CHECK_LABEL}.boot")
_checking: set[str] = set()  # its containers not removed yet: at exit, Ctrl-C included
_checking_lock = threading.Lock()


def _remove_checks() -> None:
    """At exit, the check containers a probe thread was still using: a Ctrl-C while it ran
    ends the process (cli._leave: os._exit after the atexit functions), never its `finally`.
    By name, registered before `docker create`: one whose id was not read yet goes too."""
    with _checking_lock:
        left = sorted(_checking)
        _checking.clear()
    for name in left:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            _child(["docker", "rm", "-f", "-v", name], capture_output=True,
                           check=False, timeout=_TIMEOUT, stdin=subprocess.DEVNULL)


atexit.register(_remove_checks)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _creator() -> tuple[str, str, str]:
    """This process as CREATOR_LABELS record it: pid, /proc start time, boot id."""
    pid = os.getpid()
    return str(pid), str(procs.pid_start(pid) or ""), _boot_id()


def sweep_checks() -> list[str]:
    """Remove the check containers whose creator is gone (its pid with its start time not
    running on this boot); returns their names. One of another boot is kept: a Docker daemon
    shared with another host may be that host's live run; one without the labels too."""
    boot = _boot_id()
    fmt = "\t".join(["{{.Names}}", *(f'{{{{.Label "{label}"}}}}' for label in CREATOR_LABELS)])
    try:
        listed = _child(["docker", "ps", "-a", "--filter",
                                 f"label={CHECK_LABEL}=migrate-command", "--format", fmt],
                                capture_output=True, text=True, check=False, timeout=_TIMEOUT,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return []
    swept: list[str] = []
    for line in listed.stdout.splitlines() if listed.returncode == 0 else []:
        name, pid, start, made_on = [*line.split("\t"), "", "", ""][:4]
        if not boot or made_on != boot or not pid.isdigit() or not start.isdigit():
            continue
        if procs.pid_alive(int(pid), int(start)):
            continue
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            gone = _child(["docker", "rm", "-f", "-v", name], capture_output=True,
                                  check=False, timeout=_TIMEOUT, stdin=subprocess.DEVNULL)
            if gone.returncode == 0:
                swept.append(name)
    return swept


def migrate_path(env: Environment, image: str) -> str:
    """The migrate command's program exists in the image the new slot will run.

    Docker reads no file of an image without a container: one is created from it (never
    started: nothing runs), named `runbook-migrate-check-<pid>-<random>` and labelled
    CHECK_LABEL so it is recognised, removed at once, and at exit when interrupted; the plan
    says so (a dry run creates it too), without the name, which differs in every process.
    Those a killed run left are removed first (`sweep_checks`), and the detail says so."""
    program = env.migrate_command[0]
    candidates = [program] if program.startswith("/") else [
        f"{d.rstrip('/')}/{program}" for d in image_path(image)]
    swept = sweep_checks()
    name = f"runbook-migrate-check-{os.getpid()}-{secrets.token_hex(3)}"
    labels = [f"{CHECK_LABEL}=migrate-command",
              *(f"{label}={value}" for label, value in zip(CREATOR_LABELS, _creator(),
                                                            strict=True))]
    with _checking_lock:
        _checking.add(name)
    # the id is docker's stdout; its stderr may carry a warning (another platform's image,
    # DOCKER_HOST beside a context) that was taken for the id: deploy refused, and the real
    # container left behind
    try:
        made = _child(["docker", "create", "--name", name,
                               *(arg for label in labels for arg in ("--label", label)), image],
                              capture_output=True, text=True, timeout=_TIMEOUT, check=False,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _remove_checks_named(name)
        raise PreconditionError(f"pre-flight: cannot inspect {image} for the migrate command: "
                                f"{exc}", "check `docker images`") from None
    cid = made.stdout.strip().splitlines()[-1].strip() if made.stdout.strip() else ""
    if made.returncode != 0 or not cid:
        _remove_checks_named(name)
        said = [ln for ln in made.stderr.splitlines() if ln.strip()] or ["no output"]
        raise PreconditionError(f"pre-flight: cannot inspect {image} for the migrate command: "
                                f"{said[-1].strip()}", "check `docker images`")
    how = "(looked up in a temporary container created from it: never started, removed at exit)"
    left = (f"; removed the check container(s) a killed run left: {', '.join(swept)}"
            if swept else "")
    try:
        for path in candidates:
            proc = _child(["docker", "cp", f"{cid}:{path}", "-"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  check=False, timeout=60)
            if proc.returncode == 0:
                return f"{shlex.join(env.migrate_command)}: {path} is in {image} {how}{left}"
    finally:
        _child(["docker", "rm", "-f", "-v", cid], capture_output=True, check=False,
                       timeout=_TIMEOUT)
        with _checking_lock:
            _checking.discard(name)
    raise PreconditionError(f"pre-flight: the migrate command's program {program!r} is not in "
                            f"{image} {how}; nothing was changed",
                            "fix [deploy] migrate_command (or remove it when the app "
                            "migrates itself on start)")


def _remove_checks_named(name: str) -> None:
    """A failed create: removed by name all the same (Docker may have made it)."""
    with _checking_lock:
        _checking.discard(name)
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        _child(["docker", "rm", "-f", "-v", name], capture_output=True, check=False,
                       timeout=_TIMEOUT, stdin=subprocess.DEVNULL)


def database_path(env: Environment) -> str:
    """How the database is reached (host or its container), never the URL."""
    if not database.configured(env):
        return "not configured"
    return database.access_description(env)


def recreate_needed(action: str) -> bool:
    return action == "recreate"


class Checks:
    """The pre-flight checks of `start`, running; `result()` collects them."""

    def __init__(self, env: Environment, probes: dict[str, Probe[str]]) -> None:
        self._env = env
        self._probes = probes
        self.warnings: list[str] = []  # what the plan must warn about (result() fills it)

    def result(self) -> dict[str, str]:
        """The results as pre-flight details (what the plan must warn about goes to
        `warnings`). Raises the first that fails in the order of `start` (exit 4, nothing
        changed)."""
        out: dict[str, str] = {}
        self.warnings = []
        for name, probe in self._probes.items():
            out[name], said = split_warnings(probe.result())
            self.warnings += said
        with contextlib.suppress(RunbookError):  # a misencoded URL: the schema check says so
            out["database access"] = database_path(self._env)
        return out

    def settle(self, timeout: float) -> None:
        """The plan failed elsewhere: give the checks a moment to end (see Probe.settle)."""
        for probe in self._probes.values():
            probe.settle(timeout)


def start(env: Environment, *, candidate: str | None, recreate: bool,
          migrate_image: str | None = None, admin_answered: bool = False,
          loaded: Callable[[], Any] | None = None, tag: str | None = None) -> Checks:
    """Start every check the plan needs, at once (each waits on its own tool), and return:
    the planner collects them with `result()` (raising the first that fails, in the order
    below: exit 4, nothing changed), after what it still waits on (the schema guard's
    database)."""
    probes: dict[str, Probe[str]] = {}
    if candidate is not None:
        probes["validate"] = Probe(lambda: validation(env, candidate), "validate")
        if loaded is not None:
            probes["sites kept"] = Probe(lambda: kept_sites(env, candidate, loaded), "sites")
    probes["reload"] = Probe(lambda: reload_path(env, admin_answered=admin_answered), "reload")
    if candidate is not None and runs_in_container(env):
        probes["caddyfile mount"] = Probe(lambda: caddyfile_mount(env), "mount")
    if recreate:
        probes["compose"] = Probe(lambda: compose_path(env, tag), "compose")
    if migrate_image is not None and env.migrate_command:
        probes["migrate command"] = Probe(lambda: migrate_path(env, migrate_image), "migrate")
    return Checks(env, probes)
