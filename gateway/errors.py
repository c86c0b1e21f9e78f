"""Errors of the gateway, and the one mapping from an exception to what the client gets.

Every error of the HTTP API is produced here, by :func:`http_error`, as a :class:`GatewayError`
(status, machine-readable ``code``, message, the ``field`` concerned, headers) and rendered by
:func:`error_response` as ``{"error": {"code", "message", "field"}}``. Every refused or failed
stream connect is turned into its close code here, by :func:`close_for` (an entry of
:mod:`gateway.closecodes`). Handlers raise; they do not build error responses or pick codes.

The mapping (the product's exceptions all derive from :class:`schemas.errors.FeedError`), as
exception: HTTP answer / close code:

* :class:`GatewayError`: its own status, code, field and headers / -
* :class:`ConnectRejected`: - / its own close code (origin 4003, connect rate 4029)
* ``ValidationError``: 400, the decoder's code and field / -
* ``CursorError``: 400 ``invalid_cursor``, field ``cursor`` / -
* ``AuthError``: 401 ``unauthorized`` with ``WWW-Authenticate: Bearer`` / 4001
* ``TooManyConnections``: - / 4029, naming the limit
* ``HubUnavailable``: - / 1013
* ``KafkaUnavailable``: 503 ``kafka_unavailable`` with ``Retry-After`` / -
* a store outage: 503 ``unavailable`` with ``Retry-After`` / 1013 (any Redis error: 1013)
* Starlette's ``HTTPException``: its status, a code for it / -
* anything else: 500 ``internal`` (logged with its traceback; nothing of it in the body) / -,
  the exception propagates.

A store outage (:func:`store_outage`) is Redis or Cassandra saying "cannot serve now" (down,
loading, failing over, out of memory): the library's own exception types, which cannot derive
from ``FeedError``; ``create_app`` registers them beside ``FeedError``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Awaitable, Callable

import redis.exceptions
import structlog
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from feed.cursor import CursorError
from feed.kafka import KafkaUnavailable
from gateway import closecodes
from gateway.auth import AuthError
from gateway.closecodes import CloseCode
from gateway.hub import HubUnavailable, TooManyConnections
from gateway.responses import JSONResponse
from schemas import ErrorBody, ErrorDetail, ValidationError
from schemas.errors import FeedError

__all__ = [
    "HANDLED",
    "REDIS_ERRORS",
    "STORE_OUTAGES",
    "ConnectRejected",
    "GatewayError",
    "close_for",
    "error_response",
    "http_error",
    "outages_as_503",
    "store_outage",
]

log = structlog.get_logger("gateway")


class GatewayError(FeedError):
    """An HTTP error response: status, machine-readable code, message, the field concerned."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}


class ConnectRejected(FeedError):
    """A stream connect refused before its session starts (origin, rate limit): the close code
    and the reason sent in the close frame."""

    def __init__(self, close: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.close = close
        self.reason = reason


#: Redis errors of any kind (plus the socket's), where a Redis call may fail and the caller
#: recovers (retry, reset, close 1013).
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)

#: Redis errors that mean "cannot serve now" (down, loading, failing over, out of memory), not
#: a bug: 503 with ``Retry-After``.
_REDIS_OUTAGES: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    ReadOnlyError,
    OutOfMemoryError,
    SlotNotCoveredError,
    # redis-py >= 8.2 only; older releases raise one of the above instead.
    *(e for e in [getattr(redis.exceptions, "RedisClusterUnreachableError", None)] if e),
)
#: The store-outage types ``create_app`` registers beside :class:`FeedError` (the others are
#: subclasses of these, or reach the handler through them).
STORE_OUTAGES: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError)
#: Every exception type ``create_app`` hands to :func:`error_response`.
HANDLED: tuple[type[Exception], ...] = (FeedError, HTTPException, *STORE_OUTAGES, Exception)

_cassandra_outages: tuple[type[BaseException], ...] | None = None


def store_outage(exc: BaseException) -> bool:
    """True if ``exc`` says Redis or Cassandra cannot serve now (503), rather than a bug (500).

    The Cassandra driver is imported only where history is read; its exceptions are looked up
    once it is loaded (it cannot have raised one before)."""
    global _cassandra_outages
    if isinstance(exc, _REDIS_OUTAGES):
        return True
    if _cassandra_outages is None:
        if "cassandra.cluster" not in sys.modules:
            return False
        import cassandra
        from cassandra.cluster import NoHostAvailable
        from cassandra.connection import ConnectionException
        from cassandra.pool import NoConnectionsAvailable

        _cassandra_outages = (
            NoHostAvailable,  # every node down or unreachable (or the session shut down)
            cassandra.OperationTimedOut,  # no answer in time from the node
            cassandra.Unavailable,  # too few replicas alive for the consistency level
            cassandra.Timeout,  # ReadTimeout, WriteTimeout: replicas did not answer in time
            cassandra.CoordinationFailure,  # ReadFailure, WriteFailure on the replicas
            ConnectionException,
            NoConnectionsAvailable,
        )
    return isinstance(exc, _cassandra_outages)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "throttled",
}


def http_error(exc: Exception) -> GatewayError:
    """The HTTP answer to ``exc`` (the table in this module's docstring)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, ValidationError):
        return GatewayError(400, exc.code, exc.message, field=exc.field)
    if isinstance(exc, CursorError):
        return GatewayError(400, "invalid_cursor", str(exc), field="cursor")
    if isinstance(exc, AuthError):
        return GatewayError(
            401, "unauthorized", exc.message, headers={"WWW-Authenticate": "Bearer"}
        )
    if isinstance(exc, KafkaUnavailable):
        return GatewayError(
            503,
            "kafka_unavailable",
            "the event log did not accept the records; retry later",
            headers={"Retry-After": "2"},
        )
    if store_outage(exc):
        return GatewayError(
            503, "unavailable", "a store is unreachable; retry later", headers={"Retry-After": "2"}
        )
    if isinstance(exc, HTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return GatewayError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}))
    return GatewayError(500, "internal", "internal server error")


def close_for(exc: BaseException) -> tuple[CloseCode, str] | None:
    """The close code and reason that end a stream connect which failed with ``exc``, or None
    if ``exc`` is not one a connect expects (a bug: the caller lets it propagate)."""
    if isinstance(exc, ConnectRejected):
        return exc.close, exc.reason
    if isinstance(exc, AuthError):
        return closecodes.UNAUTHORIZED, exc.message
    if isinstance(exc, TooManyConnections):
        return (
            closecodes.RATE_LIMITED,
            f"too many connections: at most {exc.limit} per user on one gateway",
        )
    if isinstance(exc, (HubUnavailable, *REDIS_ERRORS)) or store_outage(exc):
        return closecodes.TRY_AGAIN_LATER, "try again later"
    return None


_Endpoint = Callable[[Request], Awaitable[Response]]


def outages_as_503(endpoint: _Endpoint) -> _Endpoint:
    """``endpoint``, with a store outage (:func:`store_outage`) raised as a 503
    :class:`GatewayError`. Starlette hands an exception that only the catch-all ``Exception``
    handler matches to its outermost middleware, which answers and then re-raises it: the server
    logs a traceback and drops the keep-alive connection. A :class:`GatewayError` is answered
    inside, like any other error of the API."""

    @functools.wraps(endpoint)
    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except GatewayError:
            raise
        except Exception as exc:
            if not store_outage(exc):
                raise
            error = http_error(exc)
            log.warning(
                "request_unavailable",
                path=request.scope.get("path"),
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
            raise error from None

    return wrapped


async def error_response(conn: HTTPConnection, exc: Exception) -> Response:
    """The exception handler of every type in :data:`HANDLED`."""
    error = http_error(exc)
    if error.status == 503:
        # A dependency is down: expected in operation, one line each, no traceback.
        log.warning(
            "request_unavailable",
            path=conn.scope.get("path"),
            error=f"{type(exc).__name__}: {exc}"[:300],
        )
    elif error.status >= 500:
        log.error("request_failed", path=conn.scope.get("path"), exc_info=exc)
    body = ErrorBody(ErrorDetail(code=error.code, message=error.message, field=error.field))
    return JSONResponse(body, status_code=error.status, headers=error.headers)
