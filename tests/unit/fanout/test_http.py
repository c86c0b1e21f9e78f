"""The worker's HTTP port (``fanout.http``): bounded against clients that send nothing."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from fanout.http import REQUEST_TIMEOUT_S, serve_worker_http


def test_an_idle_connection_is_closed_and_the_port_keeps_answering() -> None:
    registry = CollectorRegistry()
    Counter("feed_probe_total", "a metric", registry=registry).inc()
    server = serve_worker_http("127.0.0.1", 0, registry, {"redis": lambda: True})
    port = server.server_address[1]
    try:
        with socket.create_connection(("127.0.0.1", port)) as idle:
            idle.sendall(b"GET /metr")  # and nothing more: it holds a server thread
            idle.settimeout(REQUEST_TIMEOUT_S + 5)
            started = time.monotonic()
            try:
                data = idle.recv(1024)
            except TimeoutError:
                data = None
            assert data == b"", "the server kept an idle connection open"
            assert time.monotonic() - started < REQUEST_TIMEOUT_S + 3
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            assert b"feed_probe_total 1.0" in response.read()
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            assert json.loads(response.read()) == {"ready": True, "checks": {"redis": True}}
    finally:
        server.shutdown()
        server.server_close()
