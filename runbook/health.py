"""Slot health: one probe, the gate that waits for it, and how `runbook healthcheck` shows it.

One rule everywhere (today's tools disagree about it): `degraded` is healthy enough to serve,
`unhealthy` (HTTP 503, a `fail` check, or a body we cannot trust) is not, and a slot that does
not answer is `unreachable`. A probe never raises for network trouble; it reports it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from runbook import strict_json
from runbook.environment import Environment, Slot, SlotConfig, command_arg
from runbook.errors import ExitCode, RunbookError

HEALTHY = "healthy"
DEGRADED = "degraded"
UNHEALTHY = "unhealthy"
UNREACHABLE = "unreachable"
OK_STATUSES = frozenset({HEALTHY, DEGRADED})
DOCKER_DISAGREES = "Docker's own healthcheck says unhealthy while /health answers ok"
_RANK = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2, UNREACHABLE: 3}


class HealthGateError(RunbookError):
    """A slot did not become healthy in time (or its container exited while we waited)."""

    exit_code = ExitCode.FAILED_SAFELY

    def __init__(self, message: str, fix: str | None = None, *,
                 report: HealthReport | None = None, attempts: int = 0,
                 elapsed: float = 0.0) -> None:
        super().__init__(message, fix)
        self.report = report
        self.attempts = attempts
        self.elapsed = elapsed


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # pass | warn | fail (as reported)
    message: str = ""
    latency_ms: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthReport:
    """One answer of a slot's /health endpoint, judged."""

    url: str
    status: str  # healthy | degraded | unhealthy | unreachable (our verdict, not just the body's)
    slot: str | None = None  # the slot probed (or, probing a bare URL, the one that answered)
    http_status: int | None = None
    reported_status: str | None = None  # the body's own `status`
    version: str | None = None
    git_commit: str | None = None
    reported_slot: str | None = None
    checks: tuple[Check, ...] = ()
    timestamp: str | None = None
    latency_ms: float | None = None
    error: str | None = None
    body: Mapping[str, Any] | None = None
    timed_out: bool = False  # no (complete) answer within the probe's timeout
    # Docker's own HEALTHCHECK verdict of the slot's container (docker.ContainerInfo's), when
    # `runbook healthcheck` asked Docker: said beside the answer, never part of the verdict
    docker_health: str | None = None

    @property
    def ok(self) -> bool:
        """Serving traffic is fine: healthy or degraded."""
        return self.status in OK_STATUSES

    @property
    def failing_checks(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks
                     if _CHECK_STATUS.get(_word(c.status), "fail") == "fail")

    @property
    def warning_checks(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if _CHECK_STATUS.get(_word(c.status)) == "warn")

    def docker_disagrees(self, docker_health: str | None = None) -> str | None:
        """The warning when Docker's own healthcheck (`docker_health`, else the report's)
        says unhealthy while /health answers ok. /health stays the truth the gate keeps (the
        contract); the disagreement is said, never refused (found by review: it was never
        said, and status found "No problems")."""
        said = docker_health or self.docker_health
        return DOCKER_DISAGREES if self.ok and said == UNHEALTHY else None

    def reason(self) -> str:
        """Why it is not ok, in one line ('' when it is)."""
        if self.ok:
            return ""
        parts = [self.error] if self.error else []
        parts += [f"{c.name}: {c.message or c.status}" for c in self.failing_checks]
        return "; ".join(parts) or f"status {self.reported_status!r}"


def _target(target: str | SlotConfig, path: str | None) -> tuple[str, str | None]:
    if isinstance(target, SlotConfig):
        return target.base_url + (path if path is not None else "/health"), target.slot.value
    if path is None:
        return target, None
    return target.rstrip("/") + path, None


def probe(target: str | SlotConfig, path: str | None = None, timeout: float = 3.0) -> HealthReport:
    """GET a slot's health endpoint and judge the answer. Never raises for network errors.

    `target` is a SlotConfig (path defaults to /health, and the answer must come from that
    slot) or a URL (used as is, or as a base when `path` is given). `timeout` bounds the whole
    probe, body included: a server dripping its answer cannot hold it longer.
    """
    from runbook import bounded_http

    url, expected_slot = _target(target, path)
    began = time.monotonic()
    try:
        # Connection: close (bounded_http's default), so every probe sees the server as it is
        # now; never through an HTTP(S)_PROXY.
        answer = bounded_http.request("GET", url, timeout=timeout,
                                      headers={"Accept": "application/json"})
    except bounded_http.HttpFailure as exc:
        return HealthReport(url=url, status=UNREACHABLE, slot=expected_slot,
                            latency_ms=_ms(began), error=exc.reason, timed_out=exc.timed_out)
    return parse(url, answer.status, answer.content, slot=expected_slot, latency_ms=_ms(began))


VERSION_PATH = "/version"  # the app's own (CONTRACTS): {"version", "git_commit", "build_date"}


def build_key(value: object) -> str | None:
    """A version or commit as compared: an app may say it in upper case or with a trailing
    newline (a version read from a file into the build), never otherwise; "" names nothing
    (a Go build without -ldflags reports "")."""
    text = "" if value is None else str(value).strip().lower()
    return text or None


def names_build(expected: str, version: str | None, commit: str | None) -> bool | None:
    """Does an answer name the `expected` build (the contract's version: the first 7 hex of
    its git_commit)? None when it names neither. The gate and the switch's verification both
    ask this, so a build one accepts is never one the other refuses."""
    want, version, commit = build_key(expected), build_key(version), build_key(commit)
    if not version and not commit:
        return None
    if want is not None and want in (version, commit):
        return True
    if commit is None or want is None or not commit.startswith(want):
        return False
    if not version:
        return True
    # A placeholder or a release label (the upstream Dockerfile's default `dev`, a `v1.2`)
    # names no commit, so the full commit decides. Anything else may name another build or
    # qualify this one (a hex version, `-dirty`, git describe's `-g<hex>`): found by review,
    # those passed on the commit alone.
    return _LABEL.fullmatch(version) is not None and _FULL_COMMIT.fullmatch(commit) is not None


_LABEL = re.compile(r"dev|unknown|none|latest|v?\d+(\.\d+){0,3}")  # build_key lower-cased it
_FULL_COMMIT = re.compile(r"[0-9a-f]{40}")
_COMMIT = re.compile(r"[0-9a-f]{7,40}")


def named_commit(value: object) -> str | None:
    """A commit as compared (7 to 40 hex, lower case), or None when `value` names none: a
    missing field, `unknown` (the upstream Dockerfile's default) or git's null commit (the
    state file's "unknown", recording.full_commit)."""
    key = build_key(value)
    if key is None or not _COMMIT.fullmatch(key) or not key.strip("0"):
        return None
    return key


def commits_differ(recorded: object, said: object) -> bool | None:
    """Do two commits name different builds? A full one is compared with a full one, a short
    one as a prefix of the other. None when either names no commit (`named_commit`): a host
    with fewer fields is never refused for what it does not say."""
    a, b = named_commit(recorded), named_commit(said)
    if a is None or b is None:
        return None
    short, long = sorted((a, b), key=len)
    return not long.startswith(short)


class CommitMismatchError(HealthGateError):
    """The gated slot names another commit than the state file records for the deployment
    it should run (its image tag rebuilt or retagged since): a failed gate (exit 1), decided
    at once, as waiting never changes the build."""


@dataclass(frozen=True)
class ExpectedCommit:
    """The commit a gated slot must name when it names one: `commit` as the state file
    records it, `recorded` says whose record (for messages), `fix` what to do when the slot
    runs another build, `outcome` what a refusal says of the run so far (a run that
    restored the database before its gate changed that, and its undo says so)."""

    commit: str
    recorded: str
    fix: str
    outcome: str = "nothing took effect"


def version_of(config: SlotConfig, timeout: float = 3.0) -> tuple[str | None, str | None] | None:
    """(version, git_commit) as the slot's own /version says them, asked directly (never
    through Caddy); None when it does not answer 200 with a JSON object naming either. For
    the gate, when /health names neither: an app with fewer /health fields."""
    from runbook import bounded_http

    try:
        answer = bounded_http.request("GET", f"{config.base_url}{VERSION_PATH}",
                                      timeout=timeout, headers={"Accept": "application/json"})
        body = answer.json() if answer.status == 200 else None
    except (bounded_http.HttpFailure, ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    version, commit = _str(body.get("version")), _str(body.get("git_commit"))
    return (version, commit) if version or commit else None


def _ms(began: float) -> float:
    return round((time.monotonic() - began) * 1000, 1)


def _worst(*statuses: str) -> str:
    return max(statuses, key=lambda s: _RANK.get(s, _RANK[UNHEALTHY]))


def parse(url: str, http_status: int, content: bytes | str, *, slot: str | None = None,
          latency_ms: float | None = None) -> HealthReport:
    """Judge one /health response. The verdict is the worst of the body's status, its checks
    and the HTTP status, so a 503 saying "healthy" or a fail check saying "ok" is unhealthy."""
    base: dict[str, Any] = {"url": url, "slot": slot, "http_status": http_status,
                            "latency_ms": latency_ms}
    try:
        body = strict_json.loads(content)
    except strict_json.DuplicateKeyError as exc:
        # two answers in one (a shell check reads the first, Python the last): never a pass
        return HealthReport(status=UNHEALTHY, error=f"HTTP {http_status} with a body whose "
                            f"{exc.found[0].said()}: which one the app means cannot be told",
                            **base)
    except (ValueError, UnicodeDecodeError, RecursionError):
        from runbook.redact import redact

        # masked whole, then cut: cut first, half a URL's password matched no pattern and
        # no known value, and printed (found by review)
        snippet = redact((content.decode("utf-8", "replace") if isinstance(content, bytes)
                          else content).strip())[:80]
        return HealthReport(status=UNHEALTHY, error=f"HTTP {http_status} with a body that is "
                            f"not JSON: {snippet!r}", **base)
    if not isinstance(body, dict):
        return HealthReport(status=UNHEALTHY, error=f"HTTP {http_status} with a JSON body that "
                            "is not an object", **base)
    checks, unreadable = _checks(body.get("checks"))
    reported = body.get("status")
    reported_status = reported if isinstance(reported, str) else None
    reported_slot = build_key(body.get("slot"))  # "BLUE" or "blue\n" is blue
    errors: list[str] = []
    verdicts = [HEALTHY]
    said = _BODY_STATUS.get(_CHECK_STATUS.get(reported_status.strip().lower(), "")
                            if reported_status is not None else "")
    if said is not None:  # the contract's words, or the ones checks use ("ok", "Healthy")
        verdicts.append(said)
    else:
        verdicts.append(UNHEALTHY)
        errors.append(f"unknown status {reported!r}" if reported is not None
                      else "the body has no status")
    if unreadable:  # a check we cannot judge is never taken for a pass
        verdicts.append(UNHEALTHY)
        errors.append(unreadable)
    if any(_CHECK_STATUS.get(_word(c.status)) == "fail" for c in checks):
        verdicts.append(UNHEALTHY)
    elif any(_CHECK_STATUS.get(_word(c.status)) == "warn" for c in checks):
        verdicts.append(DEGRADED)
    strange = [f"{c.name}: {c.status!r}" for c in checks if _word(c.status) not in _CHECK_STATUS]
    if strange:
        verdicts.append(UNHEALTHY)
        errors.append(f"check status(es) not pass, warn or fail: {', '.join(strange)}")
    if http_status == 503:
        verdicts.append(UNHEALTHY)
        errors.append("HTTP 503")
    elif not 200 <= http_status < 300:
        verdicts.append(UNHEALTHY)
        errors.append(f"HTTP {http_status}")
    if slot and reported_slot and reported_slot != slot:
        # The wrong container answers on this slot's port: never let that pass a gate.
        verdicts.append(UNHEALTHY)
        errors.append(f"answered as slot {reported_slot}, expected {slot}")
    return HealthReport(
        status=_worst(*verdicts), reported_status=reported_status,
        version=_str(body.get("version")), git_commit=_str(body.get("git_commit")),
        reported_slot=reported_slot, checks=checks, timestamp=_str(body.get("timestamp")),
        error="; ".join(errors) or None, body=body,
        **{**base, "slot": slot or reported_slot},
    )


def _str(value: object) -> str | None:
    return None if value is None else str(value)


def _word(status: str) -> str:
    """A check's status as compared: "PASS " is pass (as build_key reads a version)."""
    return status.strip().lower()


# A check's status as the contract says it (pass|warn|fail), and the words other apps use for
# the same: anything else is unknown, which the verdict never takes for a pass.
_CHECK_STATUS = {"pass": "pass", "ok": "pass", "up": "pass", "healthy": "pass",
                 "warn": "warn", "degraded": "warn",
                 "fail": "fail", "error": "fail", "down": "fail", "unhealthy": "fail",
                 "critical": "fail"}


_BODY_STATUS = {"pass": HEALTHY, "warn": DEGRADED, "fail": UNHEALTHY}


def _checks(raw: object) -> tuple[tuple[Check, ...], str | None]:
    """The checks, and why some could not be read (None: all could). The contract's form is
    {name: {status, ...}}; also read: {name: [{status, ...}, ...]} (the IETF health-check
    draft) and [{name, status, ...}, ...]."""
    if raw is None:
        return (), None  # an app with fewer /health fields: the body's status decides
    items: list[tuple[str, object]] = []
    if isinstance(raw, dict):
        for name, value in raw.items():
            entries = value if isinstance(value, list) else [value]
            items += [(str(name), entry) for entry in entries]
    elif isinstance(raw, list):
        items = [(str(v.get("name", f"check {i + 1}")) if isinstance(v, dict)
                  else f"check {i + 1}", v) for i, v in enumerate(raw)]
    else:
        return (), f"checks is a {type(raw).__name__}, not an object or a list"
    out: list[Check] = []
    for name, value in items:
        if not isinstance(value, dict):
            out.append(Check(name, str(value)))
            continue
        details = value.get("details")
        out.append(Check(
            name=name, status=str(value.get("status", "unknown")),
            message=str(value.get("message", "")), latency_ms=_ms_value(value.get("latency_ms")),
            details=details if isinstance(details, dict) else {},
        ))
    return tuple(out), None


def _ms_value(value: object) -> float | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int of 400 digits: not a latency, never a crash
        return None
    return number if math.isfinite(number) else None


FAST_INTERVAL = 0.02  # seconds between probes while a starting slot is likely to come up
# (a refused connect on loopback costs well under a millisecond: polling as often as the bare
# minimum does sees a slot ready at 0.30 s at ~0.31 s, not at ~0.35 s)
FAST_WINDOW = 3.0  # how long the fast cadence lasts before the configured backoff takes over
RUNNING_CHECK_EVERY = 0.25  # at most this often ask Docker whether the container still runs


def wait_healthy(env: Environment, slot: Slot | str, timeout: float | None = None, *,
                 on_attempt: Callable[[int, HealthReport], None] | None = None,
                 is_running: Callable[[], bool] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 fast_window: float = FAST_WINDOW,
                 first: HealthReport | None = None,
                 began: float | None = None) -> HealthReport:
    """Poll the slot until it is healthy or degraded, within `timeout` (the gate's deadline).

    The first probe goes out at once, then every FAST_INTERVAL for `fast_window` seconds (a
    slot ready at 0.3 s is seen at ~0.3 s, not at the next doubling), then the configured
    interval doubling up to max_interval. Every probe gets only what is left of the deadline,
    body included, so a slow-drip /health cannot hold the gate past it.
    `is_running`, when given, lets a container that exited end the wait at once instead of
    after the whole timeout. `first`: a probe of this slot the caller made a moment ago
    (while planning, concurrently with other checks), counted as the first attempt; `began`:
    when the gate began waiting (time.monotonic(); default now), the deadline's start.
    """
    config = env.slot(slot)
    limit = env.health.timeout if timeout is None else timeout
    interval = env.health.interval
    fast = min(FAST_INTERVAL, interval)
    began = time.monotonic() if began is None else began
    deadline = began + limit
    attempt = 0
    checked_running = float("-inf")
    answered: HealthReport | None = None  # the last probe the slot answered
    said_why: HealthReport | None = None  # the last one that did not time out
    while True:
        remaining = deadline - time.monotonic()
        request_timeout = max(0.05, min(env.health.request_timeout, remaining))
        if first is not None and attempt == 0:
            report = first
        else:
            report = probe(config, env.health.path, request_timeout)
        attempt += 1
        if report.http_status is not None:
            answered = report
        if not report.timed_out:
            said_why = report
        if on_attempt is not None:
            on_attempt(attempt, report)
        if report.ok:
            return report
        now = time.monotonic()
        elapsed = now - began
        if is_running is not None and now - checked_running >= RUNNING_CHECK_EVERY:
            checked_running = now
            if not is_running():
                raise HealthGateError(
                    f"slot {config.slot}: container {config.container} is not running (it "
                    f"exited or was stopped) while waiting for {report.url} to become "
                    f"healthy; last: {_last(report)}", _fix(config), report=report,
                    attempts=attempt, elapsed=elapsed)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            # The final probe only gets what is left of the timeout; when it did not get an
            # answer, the last answer is what says why the slot is not healthy, and when it
            # was cut short, the last probe that was not (found by review: a body over 1 MiB
            # was reported as "the body did not finish").
            shown, tail = report, ""
            earlier = said_why if report.timed_out else answered
            between = None
            if earlier is not None and earlier.http_status is None and answered is not None:
                # an answer says more than a refused or broken connection after it (Docker's
                # port proxy closing on a starting container: found when a loaded drill's
                # broken build was said as "unreachable", its failing check unnamed); what
                # came after it is still said (an app that stopped answering)
                between, earlier = earlier, answered
            if report.http_status is None and earlier is not None:
                then = [r.error for r in (between, report) if r is not None and r.error]
                shown, tail = earlier, f" (then: {'; then: '.join(then)})"
            raise HealthGateError(
                f"slot {config.slot} ({report.url}) did not become healthy within {limit:g}s "
                f"({attempt} attempts): last {_last(shown)}{tail}", _fix(config, shown, env),
                report=shown, attempts=attempt, elapsed=time.monotonic() - began)
        if time.monotonic() - began < fast_window:
            sleep(min(fast, remaining))
        else:
            sleep(min(interval, remaining))
            interval = min(interval * 2, env.health.max_interval)


def _last(report: HealthReport) -> str:
    http = f" (HTTP {report.http_status})" if report.http_status is not None else ""
    reason = report.reason()
    return f"status {report.status}{http}" + (f": {reason}" if reason else "")


def _fix(config: SlotConfig, report: HealthReport | None = None,
         env: Environment | None = None) -> str:
    logs = f"check `docker logs --tail 100 {config.container}`"
    if env is None or report is None:
        return logs
    unreached = next((c for c in report.failing_checks if _word(c.name) in DATABASE_CHECKS),
                     None)
    if unreached is not None:
        # the slot does not reach its database, so its schema check fails too (it cannot read
        # schema_migrations): the schema repair below sent on-call to migrate or restore a
        # database that was fine (found by the troubleshooting drill of the guide's "infra
        # issue; check logs and DB connectivity")
        return (f"its {unreached.name} check fails ({unreached.message or unreached.status}): "
                f"the slot does not reach the database, whatever its code; {logs} for why, "
                f"that the database answers (`docker exec {env.database.container} "
                f"pg_isready`; one outside Docker: `pg_isready -d \"${env.database.url_variable}"
                f"\"`), and that the {env.database.url_variable} the slot was given "
                f"({url_of(config.container)}) names a host its container reaches (for a "
                "database in Docker: a container on the same Docker network); then run the "
                "same command again")
    failing = [c for c in report.failing_checks if _word(c.name) in SCHEMA_CHECKS]
    if not failing:
        return logs
    # the slot said why, and waiting longer never changes it (found by review: a rollback
    # onto code older than the schema, with nothing recording its schema, polled "schema
    # ahead" for the whole gate, then its fix said only `docker logs`)
    said = failing[0].message or failing[0].status
    # a schema ahead of the build wants the data from before the migrations; one behind it
    # (or dirty) wants its migrations run, and a restore would make it worse (found by review)
    give = ("a rollback with --restore-snapshot restores the data from before the migrations"
            if "ahead" in said.lower() else
            "its migrations, run to their end (`runbook status` says a dirty one)")
    return (f"its {failing[0].name} check fails ({said}): this build does not run on the "
            f"database's schema as it is now (`runbook status {command_arg(env)}` shows it); "
            f"give it the schema it runs on ({give}), or choose a build that runs on this "
            f"one; then {logs}")


# --------------------------------------------------------------------------------------------
# The schema the app reports, compared with the one the runbook read
# --------------------------------------------------------------------------------------------

SCHEMA_CHECKS = frozenset({"migrations", "migration", "schema"})  # the app's schema check
# the app's check that it reaches its database (the contract's `database`)
DATABASE_CHECKS = frozenset({"database", "db", "postgres", "postgresql"})
SCHEMA_SETTLE = 2.0  # seconds a differing version is asked again before it is decided
SCHEMA_RECHECK = 0.25  # seconds between those answers


class SchemaMismatchError(HealthGateError):
    """The slot reports another schema version than the database the runbook read: it reads
    another database, or kept a version read at start-up. A failed gate (exit 1), decided at
    once: waiting never changes it."""


@dataclass(frozen=True)
class ExpectedSchema:
    """The schema_migrations version the runbook itself read for this run (checked,
    migrated or restored), which a gated slot's /health must report when it reports one.
    `version` is asked when the gate decides (None: the runbook has none: `unknown` says
    why); `planned` says it for the plan; `database` names it (database.where: host, port,
    database, never a password); `how`: what the runbook did with it ("checked" or
    "restored")."""

    version: Callable[[], int | None]
    planned: str
    database: str
    how: str = "checked"
    unknown: str = "the runbook could not read the database's schema for this run"

    def plan_line(self, path: str) -> str:
        return (f"the migrations version its {path} reports (details.version of its "
                f"migrations check) must be {self.planned}: the schema of the database the "
                f"runbook {self.how} ({self.database}); not compared when it reports none")


def reported_schema(report: HealthReport) -> int | None:
    """The schema_migrations version the app says it reads: details.version (an int) of its
    schema check (the contract's `migrations`, or `migration`, `schema`); None when none."""
    for check in report.checks:
        if _word(check.name) in SCHEMA_CHECKS:
            value = check.details.get("version")
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def check_schema(env: Environment, slot: Slot | str, report: HealthReport,
                 want: ExpectedSchema, *, refuse: bool = True,
                 sleep: Callable[[float], None] = time.sleep) -> tuple[HealthReport, str]:
    """Compare the schema an ok `report` of the slot names with the one the runbook read:
    (the report decided on, a note for the journal). An app that reports none, or a run
    that read none, is noted as not compared, never refused (an app with fewer /health
    fields). A differing version is asked again for SCHEMA_SETTLE seconds, deciding only on
    ok answers (an app's first answer may come before it has read the schema); still
    differing, it raises SchemaMismatchError (`refuse`; --force: it is only noted)."""
    config = env.slot(slot)
    said = reported_schema(report)
    if said is None:
        return report, (f"not compared: {env.health.path} reports no migrations version "
                        "(details.version of its migrations check), so whether the slot "
                        f"reads the database the runbook {want.how} ({want.database}) cannot "
                        "be told")
    expected = want.version()
    if expected is None:
        return report, f"not compared: the slot reports {said}, but {want.unknown}"
    began = time.monotonic()
    while said != expected and time.monotonic() - began < SCHEMA_SETTLE:
        sleep(SCHEMA_RECHECK)
        again = probe(config, env.health.path, env.health.request_timeout)
        if again.ok and (now := reported_schema(again)) is not None:
            report, said = again, now
    if said == expected:
        return report, f"{said}, as the database the runbook {want.how} ({want.database})"
    # a schema the run restored: every app slot was stopped for the restore and started
    # after it, so none kept an older version, and a rerun would restore again over every
    # write made once the slot is fixed (found by review)
    restored = want.how == "restored"
    name = next((c.name for c in report.checks if _word(c.name) in SCHEMA_CHECKS), "migrations")
    problem = (f"slot {config.slot} reports schema {said} ({name} details.version at "
               f"{report.url}), while the database the runbook {want.how} ({want.database}) "
               f"is at {expected}: the slot reads another database (its DATABASE_URL names "
               "another one than the runbook's)"
               + ("" if restored else ", or reports a version it read at start-up and kept (it "
                  "ran before the schema changed)") + ", and waiting does not change that")
    # an app that caches its schema version (a standby left running across a migration, a
    # slot started before migrate_command) differs too: "reads another database" as a
    # certainty sent on-call to recreate a slot that was right (found by review)
    if not refuse:
        return report, f"DIFFERS (not refused: --force): {problem}"
    if restored:
        raise SchemaMismatchError(problem, (
            f"the database is already restored (schema {expected}): do NOT run the restore "
            f"again; make {config.container} read {want.database} (compare the DATABASE_URL "
            f"it was given, {url_of(config.container)}, and recreate it from the env file); "
            f"only if the slot's is the right one did the runbook's "
            f"{env.database.url_variable} name the wrong database, which the restore "
            "replaced: correct it before anything else"), report=report)
    raise SchemaMismatchError(problem, (
        f"compare the database the slot's DATABASE_URL names ({url_of(config.container)}) "
        f"with {want.database}: if it names that one, the slot kept what it read at start-up: "
        f"restart it (`docker restart {config.container}`) and run the same command again; "
        f"if not, make the slot read that one (recreate it from the env file), or, if the "
        f"slot's is the right one, correct the runbook's {env.database.url_variable}; then "
        "run the same command again"), report=report)


def url_of(container: str) -> str:
    """The command that shows the DATABASE_URL a container was given (with its password)."""
    return (f"`docker inspect --format '{{{{range .Config.Env}}}}{{{{println .}}}}{{{{end}}}}' "
            f"{container} | grep DATABASE_URL`, which shows its password")


# --------------------------------------------------------------------------------------------
# Presentation for `runbook healthcheck`
# --------------------------------------------------------------------------------------------

def to_json(report: HealthReport) -> dict[str, Any]:
    """The /health body, plus where it came from and our verdict (`status` is the verdict)."""
    out: dict[str, Any] = dict(report.body or {})
    if report.reported_slot is not None and report.reported_slot != report.slot:
        out["reported_slot"] = report.reported_slot
    if report.reported_status is not None and report.reported_status != report.status:
        out["reported_status"] = report.reported_status
    out.update(slot=report.slot, url=report.url, http_status=report.http_status, ok=report.ok,
               status=report.status, latency_ms=report.latency_ms)
    if report.error:
        out["error"] = report.error
    out["docker_health"] = report.docker_health
    if (disagrees := report.docker_disagrees()) is not None:
        out["docker_warning"] = disagrees
    return out


def _checks_text(report: HealthReport) -> str:
    return " ".join(f"{c.name}:{c.status}" for c in report.checks) or "-"


def _latency(report: HealthReport) -> str:
    return f"{report.latency_ms:.0f} ms" if report.latency_ms is not None else "-"


def to_table(reports: Sequence[HealthReport]) -> str:
    """A plain-text table, one slot a row, with the reason under any row that is not ok."""
    header = ("SLOT", "URL", "STATUS", "VERSION", "CHECKS", "LATENCY")
    rows = [(r.slot or "-", r.url, r.status, r.version or "-", _checks_text(r), _latency(r))
            for r in reports]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(header)]
    for report, row in zip(reports, rows, strict=True):
        out.append(line(row))
        if not report.ok:
            out.append(f"  ! {report.reason()}")
        out += _docker_lines(report)
    return "\n".join(out)


def _docker_lines(report: HealthReport) -> list[str]:
    """Docker's own healthcheck verdict under a row, when the container has one."""
    if report.docker_health is None:
        return []
    disagrees = report.docker_disagrees()
    return [f"  ! {disagrees} (the gate asks /health, the contract)" if disagrees
            else f"  - Docker healthcheck {report.docker_health}"]


def simple(report: HealthReport) -> str:
    """One line: `blue healthy 3f2a1b9 http://... (database:pass ...) 12 ms`."""
    text = (f"{report.slot or '?'} {report.status} {report.version or '-'} {report.url} "
            f"({_checks_text(report)}) {_latency(report)}")
    if not report.ok:
        text += f": {report.reason()}"
    if report.docker_health is not None:
        text += f"; {report.docker_disagrees() or f'Docker healthcheck {report.docker_health}'}"
    return text
