"""The worker's HTTP port: ``/metrics``, ``/healthz`` (alive), ``/readyz`` (stores reachable).

Bounded: a connection that sends no complete request within ``REQUEST_TIMEOUT_S`` is closed (it
holds a thread until then), and each ``/readyz`` check makes one attempt of at most
``CHECK_TIMEOUT_S`` (no client retries), so the reply comes within a few seconds whatever the
stores do.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from feed.logging import get_logger

__all__ = ["CHECK_TIMEOUT_S", "REQUEST_TIMEOUT_S", "serve_worker_http", "worker_checks"]

Check = Callable[[], bool]

#: Seconds a connection may take to send its request (and to read the reply).
REQUEST_TIMEOUT_S = 5.0
#: Seconds one readiness check may take.
CHECK_TIMEOUT_S = 2.0

log = get_logger("fanout.http")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away mid-reply: one log line, not a traceback on stderr.
        log.info("worker_http_connection_dropped", client=str(client_address[0]))


def serve_worker_http(
    host: str, port: int, registry: CollectorRegistry, checks: dict[str, Check]
) -> ThreadingHTTPServer:
    """Start the server in a daemon thread; ``server.server_address`` has the bound port."""

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S

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

    server = _Server((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="worker-http", daemon=True)
    thread.start()
    return server


def worker_checks(
    redis_url: str, kafka_bootstrap: str, session: Any, *, redis_cluster: bool = False
) -> dict[str, Check]:
    """The worker's readiness checks: Redis PING (on a Redis Cluster, through the cluster
    client: a node it knows answers), a Cassandra ``system.local`` read and a Kafka metadata
    request, each one attempt of at most :data:`CHECK_TIMEOUT_S`."""
    import redis
    from confluent_kafka.admin import AdminClient
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options: dict[str, Any] = {
        "socket_timeout": CHECK_TIMEOUT_S,
        "socket_connect_timeout": CHECK_TIMEOUT_S,
    }
    client: Any
    if redis_cluster:
        client = redis.RedisCluster.from_url(redis_url, **options)
    else:
        client = redis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 0), **options)
    # librdkafka's lines through stdlib logging, as JSON (feed.logging)
    config: dict[str, Any] = {
        "bootstrap.servers": kafka_bootstrap,
        "logger": logging.getLogger("librdkafka"),
    }
    admin = AdminClient(config)
    return {
        "redis": lambda: bool(client.ping()),
        "cassandra": lambda: (
            session.execute("SELECT now() FROM system.local", timeout=CHECK_TIMEOUT_S) is not None
        ),
        "kafka": lambda: bool(admin.list_topics(timeout=CHECK_TIMEOUT_S).topics),
    }


def _safe(check: Check) -> bool:
    try:
        return bool(check())
    except Exception:
        return False
