"""Admission of a ``/v1/stream`` connect: the handshake, the origin, the connect limits and the
token, in that order, before any state is kept for the connection.

Guarantees: a connect from an ``Origin`` not in ``FEED_ALLOWED_ORIGINS`` is closed with 4003;
connect attempts are limited per client IP before the token is even looked at (so floods of bad
tokens are limited too), then per user (4029, the reason says how long to wait); a missing,
malformed, expired or forged token is 4001. The token leaves this module's frame before the
connection is served (it is never kept, logged or echoed). Every refusal is one ``ws_rejected``
log line and one close, whose code comes from :func:`gateway.errors.close_for`
(:func:`gateway.transport.reject`). An admitted
connect is served by :class:`gateway.connection.StreamConnection`.
"""

from __future__ import annotations

import secrets
from urllib.parse import parse_qsl

import structlog
from starlette.types import Receive, Scope, Send

from feed.tenants import DEFAULT
from gateway import closecodes
from gateway.auth import AuthError, UserClaims, bearer_token
from gateway.connection import StreamConnection
from gateway.errors import ConnectRejected
from gateway.ratelimit import Limit, connect_ip_key, connect_user_key
from gateway.resources import Gateway
from gateway.transport import StreamSocket, reject

__all__ = ["StreamEndpoint", "handshake"]

log = structlog.get_logger("gateway")

_NO_HEADERS: tuple[tuple[bytes, bytes], ...] = ()


def handshake(scope: Scope) -> tuple[str | None, str, str]:
    """``(Origin, client IP, token)`` of a connect; the token from ``Authorization: Bearer``,
    else from ``?token=`` (the last one, as Starlette's query parameters do)."""
    origin: str | None = None
    authorization: str | None = None
    for name, value in scope.get("headers") or ():
        name = name.lower()
        if name == b"origin" and origin is None:
            origin = value.decode("latin-1")
        elif name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
    token = bearer_token({"authorization": authorization} if authorization else {})
    if token is None:
        query = scope.get("query_string") or b""
        if b"token=" in query:
            for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                if key == "token":
                    token = value
    client = scope.get("client")
    return origin, (client[0] if client else None) or "unknown", token or ""


class StreamEndpoint:
    """``GET /v1/stream`` as an ASGI app (it is served before Starlette's stack, see
    :class:`gateway.app.GatewayApp`, and also routed by Starlette for any other way in)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        # Log context of this connection. The task is the connection's own (its context is a
        # copy), so nothing needs resetting afterwards.
        structlog.contextvars.bind_contextvars(conn_id=secrets.token_hex(6))
        origin, ip, token = handshake(scope)
        websocket = StreamSocket(receive, send)
        await websocket.accept()
        # The server and this call's callers keep the scope for the connection's lifetime; its
        # headers (about 1.5 KiB) are not read again.
        scope["headers"] = _NO_HEADERS
        try:
            claims = await self._admit(origin, ip, token)
        except (ConnectRejected, AuthError) as exc:
            await reject(websocket, gateway.metrics, exc)
            return
        del token  # this frame lives as long as the connection
        await StreamConnection(websocket, claims, gateway).run()

    async def _admit(self, origin: str | None, ip: str, token: str) -> UserClaims:
        gateway = self.gateway
        settings = gateway.settings
        allowed_origins = settings.allowed_origins
        if allowed_origins and origin is not None and origin not in allowed_origins:
            log.info("ws_rejected", reason="origin", origin=origin[:200])
            raise ConnectRejected(closecodes.FORBIDDEN, "origin not allowed")
        # Attempts per IP are limited before the token is looked at (bad tokens count too).
        await _take_connect(gateway, connect_ip_key(ip), gateway.connect_ip_limit, "ip")
        try:
            claims = await gateway.tenancy.authenticate(token)
        except AuthError as exc:
            log.info("ws_rejected", reason=exc.reason)
            raise
        structlog.contextvars.bind_contextvars(user_id=claims.user)
        if claims.tenant != DEFAULT:
            structlog.contextvars.bind_contextvars(tenant=claims.tenant)
        await _take_connect(
            gateway, connect_user_key(claims.user, claims.tenant), gateway.connect_limit, "user"
        )
        return claims


async def _take_connect(gateway: Gateway, key: str, limit: Limit, per: str) -> None:
    """Take a connect token from the bucket ``key``; ConnectRejected (4029) when there is none."""
    decision = await gateway.limiter.take(key, limit)
    if decision.allowed:
        return
    log.info("ws_rejected", reason="rate_limited", per=per, retry_after_s=decision.retry_after)
    raise ConnectRejected(
        closecodes.RATE_LIMITED, f"too many connects; retry in {decision.retry_after} s"
    )
