"""The gateway's ASGI app: the route table, the lifespan that opens the resources, and the one
exception handler.

:func:`create_app` builds a Starlette app. Collaborators not passed in are opened by the lifespan
from the settings (Redis, the Kafka producer, Cassandra) and closed by it; collaborators passed in
are used as they are and left open. Handlers reach them through ``app.state.gateway``
(:class:`gateway.resources.Gateway`).

Where each concept lives:

* :mod:`gateway.resources` — the resources (:class:`Gateway`) and readiness;
* :mod:`gateway.errors` — the product's exceptions → HTTP responses and close codes;
* :mod:`gateway.closecodes` — the close-code table, and the docs rendered from it;
* :mod:`gateway.routes` — the ingest, feed and ops routes; :mod:`gateway.idempotency`;
* :mod:`gateway.admission` — ``/v1/stream``: handshake, origin, connect limits, token;
* :mod:`gateway.connection` — one admitted connection (the pump);
* :mod:`gateway.transport` — the ASGI socket and closing it;
* :mod:`gateway.big_accounts` — large accounts' channels and stream catch-up;
* :mod:`gateway.accesslog` — one line and one metric sample per HTTP request.

``GET /openapi.json`` serves the OpenAPI 3.1 document built by :mod:`gateway.openapi`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from feed import tracing
from feed.reader import FeedReader
from feed.settings import Settings
from gateway.accesslog import AccessLog
from gateway.admission import StreamEndpoint
from gateway.errors import HANDLED, GatewayError, error_response, outages_as_503
from gateway.metrics import GatewayMetrics
from gateway.resources import Gateway, Producer
from gateway.routes.feed import feed_page
from gateway.routes.ingest import follow, ingest_activities
from gateway.routes.notifications import (
    notification_actors,
    notification_counts,
    notification_page,
    notifications_read,
    notifications_seen,
)
from gateway.routes.ops import dev_token, healthz, metrics_endpoint, openapi_json, page, readyz

__all__ = ["STREAM_PATH", "Gateway", "GatewayApp", "GatewayError", "Producer", "create_app"]

#: The stream's path; :class:`GatewayApp` sends WebSocket connects to it straight to
#: :class:`gateway.admission.StreamEndpoint`.
STREAM_PATH = "/v1/stream"


def create_app(
    settings: Settings,
    *,
    redis: aioredis.Redis | None = None,
    reader: FeedReader | None = None,
    producer: Producer | None = None,
    cassandra_session: Any = None,
    dev_mode: bool = False,
    metrics: GatewayMetrics | None = None,
    hold_live_s: float = 1.0,
) -> Starlette:
    """Build the gateway app.

    ``redis`` must be a ``redis.asyncio.Redis`` with ``decode_responses=False``. A ``reader``
    passed in is used as is; without one the lifespan builds a :class:`FeedReader` over Redis and,
    when ``settings.fanout_history`` is on (or ``cassandra_session`` is given), Cassandra.
    ``dev_mode`` adds ``GET /dev/token``, and is refused (:class:`SettingsError`) unless the
    gateway listens on a loopback address (``Settings.require_loopback_for_dev``).
    ``hold_live_s`` is how long after the welcome live frames
    wait for a resume before being pushed (see :mod:`gateway.session`); 0 disables the hold.
    """
    settings.require_jwt()
    if dev_mode:
        settings.require_loopback_for_dev()
    gateway = Gateway(
        settings,
        redis_client=redis,
        reader=reader,
        producer=producer,
        cassandra_session=cassandra_session,
        metrics=metrics or GatewayMetrics(),
        dev_mode=dev_mode,
        hold_live_s=hold_live_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await gateway.open()
        try:
            yield
        finally:
            await gateway.close()

    stream = StreamEndpoint(gateway)
    routes = [
        Route("/", page, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/v1/feed", outages_as_503(feed_page), methods=["GET"]),
        Route("/v1/activities", outages_as_503(ingest_activities), methods=["POST"]),
        Route("/v1/follows", outages_as_503(follow), methods=["POST", "DELETE"]),
        Route("/v1/notifications", outages_as_503(notification_page), methods=["GET"]),
        Route("/v1/notifications/counts", outages_as_503(notification_counts), methods=["GET"]),
        Route(
            "/v1/notifications/{group}/actors",
            outages_as_503(notification_actors),
            methods=["GET"],
        ),
        Route("/v1/notifications/seen", outages_as_503(notifications_seen), methods=["POST"]),
        Route("/v1/notifications/read", outages_as_503(notifications_read), methods=["POST"]),
        WebSocketRoute(STREAM_PATH, stream),
    ]
    if dev_mode:
        routes.append(Route("/dev/token", dev_token, methods=["GET"]))
    app = GatewayApp(
        routes=routes,
        lifespan=lifespan,
        # The product's errors (FeedError and below), Starlette's HTTPException, the store
        # outages (library types) and, as the last resort, anything else: one handler.
        exception_handlers=dict.fromkeys(HANDLED, error_response),
        middleware=[*_tracing_middleware(), Middleware(AccessLog, metrics=gateway.metrics)],
    )
    app.state.gateway = gateway
    app.stream = stream
    return app


#: Requests that are not traced: probes and scrapes (a root trace each, sampled like any other).
_UNTRACED = ",".join(["/healthz$", "/readyz$", "/metrics$", "/openapi.json$"])


def _tracing_middleware() -> list[Middleware]:
    """OpenTelemetry's ASGI middleware, while this process traces (``feed.tracing``): a server
    span per HTTP request, the child of the request's ``traceparent``. Its send and receive
    spans are left out (one per body chunk); the access log names the span after the route.
    WebSocket connects to ``/v1/stream`` do not pass through it (:class:`GatewayApp`): their
    session spans are written in :mod:`gateway.connection`."""
    if not tracing.ENABLED:
        return []
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return [
        Middleware(
            OpenTelemetryMiddleware,
            excluded_urls=_UNTRACED,
            exclude_spans=["receive", "send"],
        )
    ]


class GatewayApp(Starlette):
    """Starlette, except that WebSocket connects to ``/v1/stream`` go straight to their handler.

    Every layer a request passes through (the error and exception middleware, the access log,
    the router, the route's wrappers) is a coroutine frame, some with closures, that stays on a
    WebSocket connection's stack for as long as it is open; thousands of idle connections pay
    for them in memory and in garbage-collection work. None of them does anything for this
    route: the access log and the error handlers are for HTTP, and the handler closes its own
    socket. Any other way in (a ``root_path``) still reaches the same handler through the router.
    """

    stream: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == STREAM_PATH:
            direct = not scope.get("root_path")
        else:
            direct = False
        if direct:
            await self.stream(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
