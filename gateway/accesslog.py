"""The access log: one log line and one ``feed_gateway_http_requests_total`` sample per HTTP
request.

Guarantees: the path is logged, never the query string (it may carry a token); the route label
is the route's template (``unmatched`` otherwise), so the metric's cardinality is bounded; health,
metrics and schema requests log at debug level unless they fail. WebSocket connections pass
through untouched (each logs its own summary line, :mod:`gateway.connection`).
"""

from __future__ import annotations

import time

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from feed import tracing
from gateway.metrics import GatewayMetrics

__all__ = ["AccessLog"]

log = structlog.get_logger("gateway")

_QUIET_ROUTES = {"/healthz", "/readyz", "/metrics", "/openapi.json"}


class AccessLog:
    """ASGI middleware: the request's log line and metric sample, once it is answered."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            if tracing.ENABLED:
                _name_span(scope["method"], template)
            self.metrics.http_requests.labels(template, str(status)).inc()
            emit = log.debug if template in _QUIET_ROUTES and status < 500 else log.info
            emit(
                "http_request",
                method=scope["method"],
                path=scope["path"],
                route=template,
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )


def _name_span(method: str, template: str) -> None:
    """Name the request's server span (OpenTelemetry's ASGI middleware, which knows only the
    method when it starts it) after the route's template, as the semantic conventions ask."""
    from opentelemetry.trace import get_current_span

    span = get_current_span()
    if span.is_recording():
        span.update_name(f"{method} {template}")
        span.set_attribute("http.route", template)
