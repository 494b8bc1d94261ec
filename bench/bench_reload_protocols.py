"""What a Caddy config reload does to clients, by protocol (issue 14 item 4: what Caddy needs
for zero resets).

One Caddy (the drill's image, host network, loopback only) proxies to one of two tiny
upstreams that answer their own name; RELOADS times, POST /load points it at the other one.
CLIENTS threads keep one connection each and GET every 2 ms. Per protocol it prints raw
errors per reload, failures after one retry, and "stale": answers from the previous upstream
more than 0.2 s after a reload (a connection the new config never took over).

Protocols: HTTP/1.1 and cleartext HTTP/2 (h2c) on plain HTTP, HTTP/1.1 and HTTP/2 over TLS
(`tls internal`). Not the runbook: the bare reload, so the figures are Caddy's and the
client's (httpx).
"""

from __future__ import annotations

import argparse
import http.server
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine

from runbook.drill import images

SETTLE = 0.2  # seconds after /load before an old upstream's answer counts as stale


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def upstream(name: str) -> tuple[http.server.ThreadingHTTPServer, int]:
    body = name.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # Caddy closing a pooled upstream connection mid-write, at a reload

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


def caddyfile(admin: int, site: int, up: int, *, tls: bool, h2c: bool) -> str:
    servers = "\n\tservers {\n\t\tprotocols h1 h2c\n\t}" if h2c else ""
    scheme, tls_line = ("https", "\n\ttls internal") if tls else ("http", "")
    return (f"{{\n\tadmin 127.0.0.1:{admin}\n\tauto_https disable_redirects\n"
            f"\tskip_install_trust{servers}\n}}\n"
            f"{scheme}://127.0.0.1:{site} {{\n\tbind 127.0.0.1{tls_line}\n"
            f"\treverse_proxy 127.0.0.1:{up}\n}}\n")


def run(kind: str, clients: int, reloads: int, caddy_image: str) -> str:
    tls, h2 = kind.endswith("tls"), kind.startswith("h2")
    h2c = h2 and not tls
    servers = [upstream("blue"), upstream("green")]
    admin, site = free_port(), free_port()
    workdir = Path(tempfile.mkdtemp(prefix="togather-bench-reload-"))
    name = f"togather-bench-reload-{site}"
    (workdir / "Caddyfile").write_text(caddyfile(admin, site, servers[0][1], tls=tls, h2c=h2c))
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "--network", "host",
                    "-v", f"{workdir}:/etc/caddy", caddy_image, "caddy", "run", "--config",
                    "/etc/caddy/Caddyfile"], check=True, capture_output=True)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{site}/"
    stop = threading.Event()
    answers: list[tuple[float, str]] = []
    errors: Counter[str] = Counter()
    failed = [0]
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(http1=not h2c, http2=h2, verify=False, timeout=5, trust_env=False,
                          limits=httpx.Limits(max_connections=1, max_keepalive_connections=1,
                                              keepalive_expiry=None)) as http:
            while not stop.is_set():
                for attempt in (1, 2):
                    try:
                        text = http.get(url).text
                    except httpx.TransportError as exc:
                        with lock:
                            errors[f"{type(exc).__name__}: {exc}"[:70]] += 1
                            failed[0] += attempt == 2
                        continue
                    with lock:
                        answers.append((time.monotonic(), text))
                    break
                time.sleep(0.002)

    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # Caddy up (and its internal certificate made)
            try:
                if httpx.get(url, verify=False, trust_env=False).text == "blue":
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        switched: list[tuple[float, str]] = []
        for i in range(reloads):
            target = servers[(i + 1) % 2][1]
            text = caddyfile(admin, site, target, tls=tls, h2c=h2c)
            httpx.post(f"http://127.0.0.1:{admin}/load", content=text, trust_env=False,
                       headers={"Content-Type": "text/caddyfile"}).raise_for_status()
            switched.append((time.monotonic(), "green" if i % 2 == 0 else "blue"))
            time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join()
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        shutil.rmtree(workdir, ignore_errors=True)
        for server, _port in servers:
            server.shutdown()
    stale = total = 0
    for (at, now), following in zip(switched, [*switched[1:], (float("inf"), "")], strict=True):
        window = [a for t, a in answers if at + SETTLE <= t < following[0]]
        total += len(window)
        stale += sum(a != now for a in window)
    raw = sum(errors.values())
    kinds = "; ".join(f"{n}x {k}" for k, n in errors.most_common(2)) or "none"
    return (f"{kind:8} {len(answers):>7} {raw / reloads:>11.2f} {failed[0]:>14} "
            f"{stale:>6}/{total:<6} ({100 * stale / max(total, 1):.0f} %)  {kinds}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--reloads", type=int, default=10)
    args = parser.parse_args()
    caddy_image = images.require([]).caddy
    print(f"machine: {machine()}; {args.clients} clients, {args.reloads} reloads each")
    print(f"{'protocol':8} {'answers':>7} {'raw/reload':>11} {'failed/retry':>14} "
          "stale after 0.2 s  raw errors as the client saw them")
    for kind in ("h1", "h2c", "h1-tls", "h2-tls"):
        print(run(kind, args.clients, args.reloads, caddy_image), flush=True)


if __name__ == "__main__":
    main()
