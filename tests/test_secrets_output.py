"""Secrets in what the CLI prints that does not come from the runbook's own database URL: an
app's /health text, an argument, a password in the URL's query string (no container)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from runbook import database
from runbook import environment as envmod
from runbook.environment import Slot
from runbook.errors import ConfigError
from tests.drill_checks import host_env

REPO_ROOT = Path(__file__).resolve().parents[1]
DSN_PASSWORD, REDIS_PASSWORD = "S3cretPw-Kx81", "R3disPw-Lq27"
UNHEALTHY = {"status": "unhealthy", "checks": {
    "database": {"status": "fail",
                 "message": f"dial postgres://togather:{DSN_PASSWORD}@togather-db:5432/togather"},
    "cache": {"status": "fail", "message": f"redis AUTH failed with password={REDIS_PASSWORD}"},
}}


def runbook(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RUNBOOK_CONFIG", "DATABASE_URL")}
    return subprocess.run([sys.executable, "-m", "runbook.cli", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, env=env,
                          check=False, cwd=REPO_ROOT)


@pytest.fixture
def leaky_app() -> Iterator[int]:
    """An app whose /health answers 503 with its secrets in the checks' messages."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(UNHEALTHY).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
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


@pytest.mark.parametrize("fmt", ["table", "json", "simple"])
def test_healthcheck_masks_the_apps_secrets(tmp_path: Path, leaky_app: int, fmt: str) -> None:
    env = host_env(tmp_path)
    env = env.with_(slots={s: dataclasses.replace(c, port=leaky_app) if s is Slot.BLUE else c
                           for s, c in env.slots.items()})
    source = tmp_path / "host.toml"
    source.write_text(envmod.to_toml(env))
    done = runbook("healthcheck", str(source), "--slot", "blue", "--format", fmt)
    said = done.stdout + done.stderr
    assert done.returncode == 1, said  # unhealthy: documented exit 1
    assert "database" in said and "cache" in said  # the checks are shown, masked
    assert DSN_PASSWORD not in said and REDIS_PASSWORD not in said, said
    if fmt == "json":
        json.loads(done.stdout)


def test_an_argument_holding_a_password_is_masked_in_the_error(tmp_path: Path) -> None:
    for fmt in ("text", "json"):
        done = runbook("status", "postgresql://togather:Hunter2Secret@db/togather",
                       "--format", fmt)
        said = done.stdout + done.stderr
        assert done.returncode == 2 and "Hunter2Secret" not in said, said
        assert "Traceback" not in said


@pytest.mark.parametrize("password,bare", [("hun&ter2pw", "'&'"), ("s3cr et", "' '")])
def test_a_query_string_password_is_checked_and_registered(password: str, bare: str) -> None:
    """libpq reads `?password=` too; unencoded, its error quoted the password back
    ('missing key/value separator "=" in URI query parameter: "ter2pw"')."""
    url = f"postgresql://togather@127.0.0.1:1/togather?sslmode=disable&password={password}"
    with pytest.raises(ConfigError) as info:
        database.check_url(url, "DATABASE_URL", "env file")
    assert bare in info.value.message and "percent-encode" in (info.value.fix or "")
    assert not any(part in str(info.value) for part in password.replace("&", " ").split())
    assert password in database.secrets_of(url)
    assert set(password.replace("&", " ").split()) <= database.secrets_of(url)
    fine = "postgresql://togather@127.0.0.1:1/togather?password=hun%26ter2pw&sslmode=disable"
    database.check_url(fine, "DATABASE_URL", "env file")  # encoded, then another key: fine


def test_the_health_gates_live_progress_masks_the_apps_secrets(tmp_path: Path,
                                                                leaky_app: int) -> None:
    """The gate's "attempt N: ..." lines on the terminal quote the app's failing checks: they
    went to the screen unmasked while the journal and `healthcheck` masked the same text."""
    from runbook import slots
    from runbook.errors import RunbookError
    from runbook.plan import Plan
    from runbook.run import perform

    env = host_env(tmp_path)
    env = env.with_(slots={s: dataclasses.replace(c, port=leaky_app) if s is Slot.BLUE else c
                           for s, c in env.slots.items()},
                    health=dataclasses.replace(env.health, timeout=1.0))
    shown: list[str] = []

    def progress(event: str, step: object, message: str = "") -> None:
        shown.append(message)

    with pytest.raises(RunbookError):
        perform(env, "rollback", lambda run_id: Plan("rollback", env, "test", [
            slots.gate_step(env, Slot.BLUE, force=False, expected_version=None)]),
            dry_run=False, reason="test", progress=progress)
    notes = [m for m in shown if m.startswith("attempt")]
    assert notes and any("dial postgres://" in m for m in notes), shown  # the checks are said
    assert not any(DSN_PASSWORD in m or REDIS_PASSWORD in m for m in shown), notes
