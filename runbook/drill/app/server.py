"""Reference togather-server for drills: the contract's endpoints over real Postgres.

Runs inside the drill images on Debian's python3 and python3-psycopg (stdlib HTTP server, no
other dependency). `server.py migrate up` applies this build's migrations golang-migrate style.
"""

from __future__ import annotations

import os
import signal
import sys

# First, before the imports below (psycopg's takes ~0.2 s): as PID 1 the server ignores
# SIGTERM until it has a handler, so a `docker stop` in that window waited out Docker's whole
# grace period (10 s): an undo right after a start, a drill scene stopping a slot it just
# started. `migrate up` keeps the default: it must never exit 0 half-way.
if sys.argv[1:] != ["migrate", "up"]:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg

VERSION = os.environ.get("APP_VERSION", "0000000")
GIT_COMMIT = os.environ.get("GIT_COMMIT", "0" * 40)
BUILD_DATE = os.environ.get("BUILD_DATE", "1970-01-01T00:00:00Z")
BEHAVIOUR = os.environ.get("APP_BEHAVIOUR", "normal")
KNOWN_SCHEMA = int(os.environ.get("KNOWN_SCHEMA", "0"))
SLOT = os.environ.get("SLOT", "")
DATABASE_URL = os.environ.get("DATABASE_URL", "")
MIGRATIONS = Path(os.environ.get("MIGRATIONS_DIR", "/app/migrations"))
PORT = int(os.environ.get("PORT", "8080"))
# "minimal": /health without `slot` and `git_commit`, like apps that predate the contract
HEALTH_FIELDS = os.environ.get("HEALTH_FIELDS", "full")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def connect() -> psycopg.Connection:
    return psycopg.connect(DATABASE_URL, connect_timeout=2, autocommit=True)


def check_database() -> dict:
    start = time.monotonic()
    try:
        with connect() as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # any failure is a failed check, never a crash
        return {"status": "fail", "message": f"database unreachable: {type(exc).__name__}",
                "latency_ms": round((time.monotonic() - start) * 1000)}
    return {"status": "pass", "message": "database reachable",
            "latency_ms": round((time.monotonic() - start) * 1000)}


def check_migrations() -> dict:
    start = time.monotonic()

    def result(status: str, message: str, details: dict | None = None) -> dict:
        out = {"status": status, "message": message,
               "latency_ms": round((time.monotonic() - start) * 1000)}
        if details is not None:
            out["details"] = details
        return out

    try:
        with connect() as conn:
            row = conn.execute(
                "SELECT version, dirty FROM schema_migrations LIMIT 1"
            ).fetchone()
    except psycopg.errors.UndefinedTable:
        return result("warn", "no migrations applied", {"version": 0, "dirty": False})
    except Exception as exc:
        return result("fail", f"cannot read schema_migrations: {type(exc).__name__}")
    if row is None:
        return result("warn", "no migrations applied", {"version": 0, "dirty": False})
    version, dirty = int(row[0]), bool(row[1])
    details = {"version": version, "dirty": dirty}
    if dirty:
        return result("fail", f"migration {version} is dirty", details)
    if version > KNOWN_SCHEMA:
        return result("fail", f"database schema {version} is ahead of this build "
                      f"(knows up to {KNOWN_SCHEMA})", details)
    if version < KNOWN_SCHEMA:
        return result("warn", f"pending migrations: database at {version}, "
                      f"build knows {KNOWN_SCHEMA}", details)
    return result("pass", f"schema at version {version}", details)


def overall(checks: dict) -> str:
    statuses = {c["status"] for c in checks.values()}
    if "fail" in statuses:
        return "unhealthy"
    if "warn" in statuses:
        return "degraded"
    return "healthy"


def health(names: tuple[str, ...]) -> tuple[int, dict]:
    checks = {}
    if "database" in names:
        checks["database"] = check_database()
    if "migrations" in names:
        checks["migrations"] = check_migrations()
    if "app" in names:
        checks["app"] = ({"status": "fail", "message": "drill build: always unhealthy"}
                         if BEHAVIOUR == "unhealthy"
                         else {"status": "pass", "message": "serving"})
    status = overall(checks)
    body = {"status": status, "version": VERSION, "git_commit": GIT_COMMIT, "slot": SLOT,
            "checks": checks, "timestamp": now()}
    if HEALTH_FIELDS == "minimal":
        del body["git_commit"], body["slot"]
    return (503 if status == "unhealthy" else 200), body


# connect_timeout bounds only the connection: a query on a connection made just before the
# database froze waited for it without end, so a page that reads data answered 200 late
# instead of failing. The read runs here and the page gives up after READ_TIMEOUT.
READ_TIMEOUT = 2.0
_READS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="read")


def _read_items() -> list[dict]:
    with connect() as conn:
        rows = conn.execute("SELECT id, name FROM items ORDER BY id").fetchall()
    return [{"id": r[0], "name": r[1]} for r in rows]


def list_items() -> list[dict]:
    return _READS.submit(_read_items).result(timeout=READ_TIMEOUT)


def add_item(name: str) -> dict:
    with connect() as conn:
        row = conn.execute("INSERT INTO items (name) VALUES (%s) RETURNING id", (name,)).fetchone()
    if row is None:  # INSERT ... RETURNING always returns the row; psycopg types it optional
        raise RuntimeError("INSERT returned no id")
    return {"id": row[0], "name": name}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "togather-server"
    # TCP_NODELAY, as Go's net/http (the real server) sets it: the headers and the body are two
    # writes, and on a kept-alive connection (Caddy's to this slot) Nagle held the body until
    # the proxy's delayed ACK, 40 ms later: every request through Caddy took 44 ms, not 1 ms
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_json(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Togather-Version", VERSION)
        self.end_headers()
        self.wfile.write(data)

    def send_drip(self, code: int, body: object) -> None:
        """The slow-drip build: headers at once, then the body one byte every 0.5 s (a
        stuck dependency, a proxy trickling): only a total deadline ends the wait."""
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.flush()
        try:
            for byte in data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:
            self.close_connection = True  # the client gave up, as it should

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            if BEHAVIOUR == "slow-drip":
                self.send_drip(*health(("database", "migrations", "app")))
                return
            self.send_json(*health(("database", "migrations", "app")))
        elif path == "/readyz":
            self.send_json(*health(("database", "migrations")))
        elif path == "/healthz":
            self.send_json(200, {"status": "alive", "version": VERSION})
        elif path == "/version":
            self.send_json(200, {"version": VERSION, "git_commit": GIT_COMMIT,
                                 "build_date": BUILD_DATE})
        elif path == "/items":
            try:
                self.send_json(200, list_items())
            except Exception as exc:
                self.send_json(500, {"error": type(exc).__name__})
        else:
            self.send_json(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path != "/items":
            self.send_json(404, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        try:
            name = json.loads(self.rfile.read(length) or b"{}").get("name", "item")
            self.send_json(201, add_item(str(name)))
        except Exception as exc:
            self.send_json(500, {"error": type(exc).__name__})


MIGRATION_FILE = re.compile(r"^(\d+)_(.+)\.up\.sql$")


def migrate_up() -> int:
    """Apply this build's pending migrations, recording them as golang-migrate does."""
    files = sorted((int(m.group(1)), p) for p in MIGRATIONS.glob("*.up.sql")
                   if (m := MIGRATION_FILE.match(p.name)))
    with connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                     "(version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL)")
        row = conn.execute("SELECT version, dirty FROM schema_migrations LIMIT 1").fetchone()
        current, dirty = (int(row[0]), bool(row[1])) if row else (0, False)
        if dirty:
            print(f"error: database is dirty at version {current}; fix it by hand", file=sys.stderr)
            return 1
        applied = 0
        for version, path in files:
            if version <= current:
                continue
            with conn.transaction():
                conn.execute("DELETE FROM schema_migrations")
                conn.execute("INSERT INTO schema_migrations VALUES (%s, true)", (version,))
            with conn.transaction():
                conn.execute(path.read_text())
                conn.execute("UPDATE schema_migrations SET dirty = false")
            applied += 1
            current = version
    print(json.dumps({"applied": applied, "version": current}))
    return 0


class Server(ThreadingHTTPServer):
    # The listen backlog of the real server (Go's net/http listens with the kernel's somaxconn,
    # which caps this), not socketserver's 5: right after a reload Caddy's new config dials
    # this slot once per user at once, and on a busy host the accept thread falls behind; the
    # kernel dropped every SYN beyond 5, each retried 1, 3, 7 s later, and users waited past
    # their timeout (bench/bench_drain.py: read timeouts, a failure after one retry)
    request_queue_size = 4096
    daemon_threads = True


def serve() -> int:
    if BEHAVIOUR == "crash":
        print(f"togather-server {VERSION}: fatal: drill build exits on start", file=sys.stderr)
        return 3
    server = Server(("0.0.0.0", PORT), Handler)
    print(f"togather-server {VERSION} slot={SLOT} listening on :{PORT}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["migrate", "up"]:
        sys.exit(migrate_up())
    sys.exit(serve())
