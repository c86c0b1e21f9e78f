"""Serving the gateway with uvicorn, and its graceful shutdown.

On SIGTERM/SIGINT (uvicorn captures them) the server, within ``settings.drain_s``:

1. stops accepting connections;
2. closes every WebSocket with ``1001`` (going away) and waits, bounded, until they are gone —
   before uvicorn's own connection shutdown, which would use ``1012``;
3. lets in-flight HTTP requests finish (uvicorn's graceful timeout: what is left of the budget);
4. runs the lifespan shutdown (Pub/Sub, Kafka producer flush, Redis, Cassandra).

A watchdog ends the process if all of that has not happened two seconds past the budget.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import socket
import threading
from typing import Any

import structlog
import uvicorn
from starlette.applications import Starlette

from feed.settings import Settings
from gateway.app import create_app
from gateway.resources import Gateway
from gateway.websocket import protocol_class
from schemas.frames import MAX_INBOUND_FRAME

__all__ = ["GatewayServer", "build_server", "run", "tune_gc"]

log = structlog.get_logger("gateway.server")

_TOKEN_IN_QUERY = re.compile(r"(?i)(token=)[^&\s\"']+")


class _RedactTokens(logging.Filter):
    """uvicorn logs request paths with their query string; ``?token=`` must never reach a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message.lower():
            record.msg = _TOKEN_IN_QUERY.sub(r"\1**********", message)
            record.args = ()
        return True


def _install_redaction() -> None:
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactTokens) for f in logger.filters):
            logger.addFilter(_RedactTokens())


class GatewayServer(uvicorn.Server):
    """uvicorn's server with the gateway's shutdown order (1001 first, bounded by drain_s)."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway, *, drain_s: float) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.drain_s = drain_s
        self.port: int | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return  # the lifespan failed; uvicorn stops
        for server in getattr(self, "servers", []):
            for sock in server.sockets or ():
                name = sock.getsockname()
                if self.port is None:
                    self.port = int(name[1])
                log.info("gateway_listening", host=name[0], port=int(name[1]))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_s
        watchdog = threading.Timer(self.drain_s + 2.0, _force_exit)
        watchdog.daemon = True
        watchdog.start()
        try:
            for server in getattr(self, "servers", []):
                server.close()  # stop accepting before anything else
            connections = 0
            try:
                connections = self.gateway.hub.connection_count
                drained = await self.gateway.hub.go_away(timeout_s=self.drain_s * 0.5)
            except RuntimeError:  # the lifespan never opened the hub
                drained = True
            log.info("gateway_draining", websockets=connections, all_closed=drained)
            # What is left of the budget goes to in-flight HTTP requests, keeping a share for
            # the lifespan shutdown that follows.
            remaining = max(0.1, (deadline - loop.time()) * 0.6)
            self.config.timeout_graceful_shutdown = remaining  # type: ignore[assignment]
            await super().shutdown(sockets)
        finally:
            watchdog.cancel()


def _force_exit() -> None:
    log.error("gateway_shutdown_overran", action="exit")
    os._exit(1)


def build_server(
    settings: Settings,
    *,
    app: Starlette | None = None,
    dev_mode: bool | None = None,
    **app_kwargs: Any,
) -> GatewayServer:
    """The configured server for ``settings`` (``run`` uses it; tests serve it on port 0)."""
    if dev_mode is None:
        dev_mode = bool(getattr(settings, "dev_mode", False))
    if app is None:
        app = create_app(settings, dev_mode=dev_mode, **app_kwargs)
    config = uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        lifespan="on",
        ws=protocol_class(),  # uvicorn's websockets-sansio, with lean per-connection state
        ws_max_size=MAX_INBOUND_FRAME,
        ws_ping_interval=settings.ping_interval_s,
        ws_ping_timeout=settings.ping_timeout_s,
        # Each frame is encoded once for all of a user's connections; per-connection compression
        # would redo the work per socket.
        ws_per_message_deflate=False,
        log_config=None,
        access_log=False,  # the app logs one line per request, without query strings
        server_header=False,
        timeout_graceful_shutdown=max(1, int(settings.drain_s)),
    )
    _install_redaction()
    gateway: Gateway = app.state.gateway
    return GatewayServer(config, gateway, drain_s=settings.drain_s)


def run(settings: Settings, *, dev_mode: bool | None = None) -> None:
    """Serve the gateway until SIGTERM/SIGINT (blocking). Logging is configured by the caller.

    ``dev_mode`` (default: ``settings.dev_mode`` if the settings have it) adds ``GET /dev/token``.
    """
    settings.require_gateway()
    server = build_server(settings, dev_mode=dev_mode)
    tune_gc()
    server.run()


#: Full collections wait for this many younger ones (CPython's default: 10).
GC_FULL_AFTER = 100


def tune_gc() -> None:
    """Garbage collection for a process that holds thousands of long-lived connections.

    A full collection walks every object the process tracks, and stops it meanwhile. Two things
    make those pauses shorter and rarer (``feed_gateway_gc_pause_seconds`` shows them):

    * ``gc.freeze()`` once everything is imported and the app is built: the ~70,000 objects of
      the code itself (modules, functions, classes) are never walked again;
    * full collections are rarer (after ``GC_FULL_AFTER`` younger ones instead of 10). CPython
      also waits until the objects surviving the younger collections are a quarter of those in
      the oldest generation; with the default, a burst of connects (a deploy, a reconnect
      storm) ran a full collection at every 25 % of growth, each longer than the last.

    Young collections (the first two generations) are unchanged: they are short, and they free
    the cycles that die young. Called by :func:`run` (``feed gateway``) only: the tests' servers,
    which share a process, keep CPython's defaults.
    """
    gc.collect()
    gc.freeze()
    young, middle, _full = gc.get_threshold()
    gc.set_threshold(young, middle, GC_FULL_AFTER)
