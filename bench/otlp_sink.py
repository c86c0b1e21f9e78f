"""The benchmark's OTLP receiver (``FEED_BENCH_TRACING``): ``python -m bench.otlp_sink --port N``.

It answers ``POST /v1/traces`` (OTLP over HTTP, protobuf) at once and keeps nothing but counts,
so the traced processes pay for making and exporting their spans, as they would with a Collector
on the same host, and the sink's own work stays out of their processes. ``GET /healthz`` answers
when it listens; on SIGTERM it prints one JSON line of what it received and exits. Listens on
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_received = {"requests": 0, "bytes": 0}
_lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    # keeps connections open, as a collector does (HTTP/1.0 would make the exporter connect
    # for every batch)
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(200 if self.path == "/healthz" else 404)

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(size)
        with _lock:
            _received["requests"] += 1
            _received["bytes"] += size
        self._answer(200 if self.path == "/v1/traces" else 404)

    def _answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_sink")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    server.server_close()
    print(json.dumps(_received), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
