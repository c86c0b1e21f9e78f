"""The worker's HTTP port: ``/metrics``, ``/healthz`` (alive), ``/readyz`` (stores reachable)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["serve_worker_http"]

Check = Callable[[], bool]


def serve_worker_http(
    host: str, port: int, registry: CollectorRegistry, checks: dict[str, Check]
) -> ThreadingHTTPServer:
    """Start the server in a daemon thread; ``server.server_address`` has the bound port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                self._send(200, b'{"status":"ok"}', "application/json")
            elif self.path == "/readyz":
                results = {name: _safe(check) for name, check in checks.items()}
                status = 200 if all(results.values()) else 503
                body = json.dumps({"ready": status == 200, "checks": results}).encode()
                self._send(status, body, "application/json")
            else:
                self._send(
                    404,
                    b'{"error":{"code":"not_found","message":"no such path"}}',
                    "application/json",
                )

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:  # quiet: metrics are scraped often
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="worker-http", daemon=True)
    thread.start()
    return server


def _safe(check: Check) -> bool:
    try:
        return bool(check())
    except Exception:
        return False
