"""The gateway's ASGI app: HTTP API, the ``/v1/stream`` WebSocket and the lifespan that opens
their resources.

:func:`create_app` builds a Starlette app. Collaborators not passed in are opened by the lifespan
from the settings (Redis, the Kafka producer, Cassandra) and closed by it; collaborators passed in
are used as they are and left open. Handlers reach them through ``app.state.gateway``
(:class:`Gateway`).

The WebSocket endpoint is a thin adapter (:class:`StreamConnection`) around the sans-I/O
:class:`gateway.session.Session` and the process-wide :class:`gateway.hub.Hub`. Every HTTP error
is produced in one place, :func:`_error_response`, as ``{"error": {"code", "message", "field"}}``.

Hostile input: ingest bodies are read chunk by chunk up to a limit (``413`` as soon as a declared
``Content-Length`` or the bytes received pass it, never buffering more), must be JSON (``415``
otherwise) and are decoded by :mod:`schemas`, whose one :class:`ValidationError` becomes ``400``
naming the field. Ingest and WebSocket connects are rate limited by :mod:`gateway.ratelimit`
(``429`` with ``Retry-After``; close ``4029``). ``GET /openapi.json`` serves the OpenAPI 3.1
document built by :mod:`gateway.openapi`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import hashlib
import logging
import re
import secrets
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl

import msgspec
import redis.asyncio as aioredis
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
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from websockets.exceptions import WebSocketException

from feed import keys
from feed.cursor import CursorError, decode_position
from feed.delivery_redis import AsyncRedisPresence
from feed.kafka import AsyncProducer, KafkaUnavailable, producer_config
from feed.reader import FeedReader
from feed.settings import Settings
from feed.timelines_redis import AsyncRedisTimelines
from gateway.auth import (
    AuthError,
    UserClaims,
    bearer_token,
    ingest_authorized,
    mint_token,
    verify_user_token,
)
from gateway.hub import Hub, HubUnavailable, TooManyConnections
from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.openapi import openapi_document
from gateway.ratelimit import (
    Limit,
    RedisRateLimiter,
    connect_ip_key,
    connect_user_key,
    ingest_key,
)
from gateway.session import (
    CLOSE_FORBIDDEN,
    CLOSE_RATE_LIMITED,
    CLOSE_TOO_SLOW,
    CLOSE_UNAUTHORIZED,
    PRESENCE_PREFIX,
    RESET_CONTROL,
    Session,
    fit_close_reason,
)
from gateway.timers import timers
from schemas import (
    Accepted,
    ErrorBody,
    ErrorDetail,
    FollowEvent,
    ValidationError,
    decode_activities,
    decode_follow_request,
    encode_activity,
)
from schemas.activity import is_valid_id

__all__ = ["Gateway", "GatewayError", "Producer", "StreamConnection", "create_app"]

log = structlog.get_logger("gateway")

#: Largest HTTP ingest body (activities); follow bodies are far smaller.
MAX_INGEST_BODY = 1 << 20
MAX_FOLLOW_BODY = 4096
#: How long a request body may take to arrive (a slow trickle holds a connection and memory).
BODY_TIMEOUT_S = 30.0
#: ``limit`` of ``GET /v1/feed``.
DEFAULT_LIMIT, MAX_LIMIT = 50, 200
#: Frames per delivery-stream read while replaying or filling a gap.
HISTORY_PAGE = 100
#: How long an ``Idempotency-Key`` is remembered, and how long a request may hold it unfinished.
IDEMPOTENCY_TTL_S = 24 * 3600
IDEMPOTENCY_PENDING_TTL_S = 120
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
#: WebSocket close codes used here besides the session's.
_CLOSE_TRY_AGAIN = 1013
#: Frames kept for a connection whose session has not started yet (see
#: ``StreamConnection._deliver_early``).
_EARLY_MAX_FRAMES = 64
#: Large accounts: attempts at one actor-channel write, the backlog of an actor's messages
#: past which a write is tried only once (see ``Gateway._apply_actor_message``) and the most of
#: them kept waiting (``Gateway._on_actor_message``: past it the backlog is dropped and its
#: users are sent ``reset``); the longest pause between rounds of reads of the large accounts
#: users follow, and the failures in a row that end a round (``Gateway._retry_actors``).
_ACTOR_ATTEMPTS = 3
_ACTOR_BACKLOG_RETRY = 32
_ACTOR_QUEUE_MAX = 256
_ACTOR_REFRESH_MAX_PAUSE_S = 30.0
_ACTOR_REFRESH_FAILURES = 3
#: Large accounts' items a stream missed while its user was offline (``Gateway.catch_up``): the
#: presence hash's fields for the newest outbox member caught up with, per account; the flag
#: "this stream was caught up before"; and the seq at or before which a resume must be answered
#: with ``reset``. How long a connect waits for its accounts' channels to be confirmed.
_CAUGHT_UP_PREFIX = "b:"
_CAUGHT_UP_FLAG = "b"
_RESET_THROUGH = "r"
_CATCH_UP_SUBSCRIBE_S = 5.0
#: Writes the catch-up state into the presence hash only while it is still the stream of the
#: given epoch (a hash that expired meanwhile is not recreated without its epoch). KEYS[1] the
#: presence hash; ARGV: epoch, reset-through seq (or ""), then field/value pairs.
_CAUGHT_UP_SCRIPT = """
if redis.call('HGET', KEYS[1], 'e') ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then
  local old = tonumber(redis.call('HGET', KEYS[1], 'r') or '-1')
  if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], 'r', ARGV[2]) end
end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""
#: Bound on waiting for a close frame to be written to a client that may not be reading.
_CLOSE_TIMEOUT_S = 5.0
_QUIET_ROUTES = {"/healthz", "/readyz", "/metrics", "/openapi.json"}
_STATIC = Path(__file__).resolve().parent / "static"
_REDIS_ERRORS = (RedisError, OSError)

_json = msgspec.json.Encoder()
T = TypeVar("T")


class Producer(Protocol):
    """What ingest needs from a Kafka producer (``feed.kafka.AsyncProducer``)."""

    async def send_many(
        self, topic: str, records: Iterable[tuple[bytes, bytes]], *, timeout: float = 30.0
    ) -> int: ...


# --- errors: produced in one place ------------------------------------------------------------
class GatewayError(Exception):
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


def _as_gateway_error(exc: Exception) -> GatewayError:
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
    if _store_outage(exc):
        return GatewayError(
            503, "unavailable", "a store is unreachable; retry later", headers={"Retry-After": "2"}
        )
    if isinstance(exc, HTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return GatewayError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}))
    return GatewayError(500, "internal", "internal server error")


#: Redis errors that mean "cannot serve now" (down, loading, failing over, out of memory), not
#: a bug: 503 with ``Retry-After``.
_REDIS_OUTAGES = (
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
_cassandra_outages: tuple[type[BaseException], ...] | None = None


def _store_outage(exc: BaseException) -> bool:
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


_Endpoint = Callable[[Request], Awaitable[Response]]


def _outages_as_503(endpoint: _Endpoint) -> _Endpoint:
    """``endpoint``, with a store outage (:func:`_store_outage`) raised as a 503
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
            if not _store_outage(exc):
                raise
            error = _as_gateway_error(exc)
            log.warning(
                "request_unavailable",
                path=request.scope.get("path"),
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
            raise error from None

    return wrapped


async def _error_response(conn: HTTPConnection, exc: Exception) -> Response:
    error = _as_gateway_error(exc)
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
    return _JSONResponse(body, status_code=error.status, headers=error.headers)


class _JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _json.encode(content)


# --- resources ---------------------------------------------------------------------------------
class Gateway:
    """The resources of one gateway app, opened by the lifespan (``app.state.gateway``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        redis_client: aioredis.Redis | None,
        reader: FeedReader | None,
        producer: Producer | None,
        cassandra_session: Any,
        metrics: GatewayMetrics,
        dev_mode: bool,
        hold_live_s: float,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.dev_mode = dev_mode
        self.hold_live_s = hold_live_s
        self._redis = redis_client
        self._reader = reader
        self._producer = producer
        self.cassandra = cassandra_session
        self._owns_redis = redis_client is None
        self._owns_producer = producer is None
        self._owns_cassandra = False
        #: Cassandra is a dependency when this app reads history itself or was given a session.
        self.uses_cassandra = cassandra_session is not None or (
            reader is None and settings.fanout_history
        )
        self._hub: Hub | None = None
        self._presence: AsyncRedisPresence | None = None
        self._timelines: AsyncRedisTimelines | None = None
        self._limiter: RedisRateLimiter | None = None
        self.ingest_limit = Limit(settings.ingest_rate, settings.ingest_burst)
        self.connect_limit = Limit(settings.connect_rate, settings.connect_burst)
        self.connect_ip_limit = Limit(settings.connect_ip_rate, settings.connect_ip_burst)
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        #: Large accounts: each actor's messages waiting to be applied (at most
        #: ``_ACTOR_QUEUE_MAX``) and the one task applying them, in order; the refresh of whom a
        #: user follows in flight (one per user) and the users whose followings changed again
        #: meanwhile; the connected users whose large accounts could not be read (and the one
        #: task that retries them).
        self._actor_queues: dict[str, collections.deque[tuple[list[str], bytes]]] = {}
        self._actor_workers: dict[str, asyncio.Task[None]] = {}
        self._refreshes: dict[str, asyncio.Task[None]] = {}
        self._refresh_again: set[str] = set()
        #: Catch-ups of connected users after a Pub/Sub reconnect (one in flight per user).
        self._catch_ups: dict[str, asyncio.Task[None]] = {}
        self._catch_up_again: set[str] = set()
        self._actors_unknown: dict[str, None] = {}  # ordered: retried first come, first served
        self._actor_retry: asyncio.Task[None] | None = None
        #: First pause before retrying an actor-channel write, and a failed read of the large
        #: accounts a user follows (both double each time).
        self.actor_retry_pause_s = 0.2
        self.actor_refresh_pause_s = 0.5
        self._closing = False

    # Handlers only run between open() and close(), so these are always set there.
    @property
    def redis(self) -> aioredis.Redis:
        return _opened(self._redis)

    @property
    def hub(self) -> Hub:
        return _opened(self._hub)

    @property
    def presence(self) -> AsyncRedisPresence:
        return _opened(self._presence)

    @property
    def reader(self) -> FeedReader:
        return _opened(self._reader)

    @property
    def producer(self) -> Producer:
        return _opened(self._producer)

    @property
    def limiter(self) -> RedisRateLimiter:
        return _opened(self._limiter)

    async def open(self) -> None:
        s = self.settings
        if self._redis is None:
            # A blocking pool: a burst of connects waits for a free connection (up to 10 s)
            # instead of failing past redis-py's default of 100 connections.
            pool = aioredis.BlockingConnectionPool.from_url(
                s.redis_url,
                max_connections=512,
                timeout=10,
                socket_connect_timeout=5,
                socket_timeout=10,
                socket_keepalive=True,
            )
            self._redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        self._timelines = AsyncRedisTimelines(self._redis)
        self._limiter = RedisRateLimiter(self._redis)
        self._caught_up_script = self._redis.register_script(_CAUGHT_UP_SCRIPT)
        self._presence = AsyncRedisPresence(self._redis, ttl_s=s.resume_window_s)
        self._hub = Hub(
            self._redis, self._presence, refresh_interval_s=max(1.0, s.resume_window_s / 3)
        )
        self._hub.on_actor_message = self._on_actor_message
        self._hub.on_following_changed = self._on_following_changed
        self._hub.on_resubscribed = self._on_resubscribed
        await self._hub.start()
        if self._producer is None:
            # librdkafka writes its own lines to stderr unless given a logger: through
            # logging they are JSON lines like every other (feed.logging).
            self._producer = AsyncProducer(
                producer_config(s, logger=logging.getLogger("librdkafka"))
            )
        if self._reader is None:
            history = None
            if self.cassandra is not None:
                history = await asyncio.to_thread(_history, self.cassandra, s.cassandra_keyspace)
            self._reader = self._make_reader(history)
            if self.uses_cassandra and self.cassandra is None:
                self._tasks.append(asyncio.create_task(self._connect_cassandra()))
        self.metrics.watch_gc()
        log.info(
            "gateway_started",
            redis_owned=self._owns_redis,
            producer_owned=self._owns_producer,
            cassandra=self.uses_cassandra,
            dev_mode=self.dev_mode,
        )

    async def close(self) -> None:
        self._closing = True
        self.metrics.unwatch_gc()
        background = list(self._background)
        for task in (*self._tasks, *background):
            task.cancel()
        for task in (*self._tasks, *background):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._hub is not None:
            await self._hub.stop()
        if self._owns_producer and isinstance(self._producer, AsyncProducer):
            await asyncio.to_thread(self._producer.close, min(5.0, self.settings.drain_s))
        if self._owns_cassandra and self.cassandra is not None:
            await asyncio.to_thread(self.cassandra.cluster.shutdown)
        if self._owns_redis and self._redis is not None:
            await self._redis.aclose()
        log.info("gateway_stopped")

    # --- large accounts (hybrid fan-out) -------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def tracked(self) -> dict[str, int]:
        """Sizes of the large-account state (tests and operators: each stays bounded, whatever
        the rate of messages): background tasks, actors with a queue, messages queued over all
        actors, refreshes of whom a user follows in flight, and users waiting for a retry."""
        return {
            "background_tasks": len(self._background),
            "actor_queues": len(self._actor_queues),
            "actor_messages_queued": sum(len(queue) for queue in self._actor_queues.values()),
            "actor_workers": len(self._actor_workers),
            "refreshes": len(self._refreshes),
            "catch_ups": len(self._catch_ups),
            "actors_unknown": len(self._actors_unknown),
        }

    def _on_actor_message(self, actor: str, users: list[str], message: bytes) -> None:
        """Queue a large account's message for its one worker task (applied in order).

        At most ``_ACTOR_QUEUE_MAX`` wait (Redis slow or down and the account busy): past that
        the queue is dropped, this message with it, and every user it was for is sent ``reset``
        (:meth:`Hub.reset_users`): the items are in the account's outbox, which a refetch over
        HTTP merges in, so nothing is lost, and the memory held stays bounded."""
        queue = self._actor_queues.get(actor)
        if queue is None:
            queue = self._actor_queues[actor] = collections.deque()
        if len(queue) >= _ACTOR_QUEUE_MAX:
            dropped = set(users)
            for waiting, _message in queue:
                dropped.update(waiting)
            log.error(
                "actor_backlog_dropped",
                actor=actor,
                messages=len(queue) + 1,
                users=len(dropped),
                action="reset",
            )
            queue.clear()
            self.hub.reset_users(dropped)
        else:
            queue.append((users, message))
        if actor not in self._actor_workers and queue:
            self._actor_workers[actor] = self._spawn(self._apply_actor_messages(actor, queue))

    async def _apply_actor_messages(
        self, actor: str, queue: collections.deque[tuple[list[str], bytes]]
    ) -> None:
        """Apply ``actor``'s queued messages one at a time, in order, until none is left."""
        try:
            while queue:
                users, message = queue.popleft()
                await self._apply_actor_message(
                    actor, users, message, retry=len(queue) < _ACTOR_BACKLOG_RETRY
                )
        finally:
            self._actor_workers.pop(actor, None)
            if not queue and self._actor_queues.get(actor) is queue:
                del self._actor_queues[actor]

    async def _apply_actor_message(
        self,
        actor: str,
        users: list[str],
        message: bytes,
        *,
        retry: bool = True,
    ) -> None:
        """A large account's new (``+member\\nbody``) or deleted (``-member``) activity: insert
        it into (or remove it from) the connected followers' timelines. The script is
        idempotent, so when several gateways hold followers the first insert wins and the user's
        own channel delivers it once, with one delivery seq, to all of their connections.

        One actor's messages are applied in the order they came (one task per actor, see
        :meth:`_on_actor_message`), so a delete never overtakes the insert it undoes. A write
        that fails is tried again (``_ACTOR_ATTEMPTS`` in all, with backoff; once only while
        ``_ACTOR_BACKLOG_RETRY`` or more of the actor's messages wait); if it still fails, each
        of the users' connections sends ``reset`` (:meth:`Hub.reset_users`): the item did not
        reach their delivery stream, so no resume could bring it, and the client refetches over
        HTTP, where the account's outbox is merged in. Never a silent loss."""
        s = self.settings
        timelines = _opened(self._timelines)
        attempts = _ACTOR_ATTEMPTS if retry else 1
        pause = self.actor_retry_pause_s
        for attempt in range(1, attempts + 1):
            try:
                if message.startswith(b"+"):
                    member, _, body = message[1:].partition(b"\n")
                    await timelines.insert_for(
                        users,
                        member.decode(),
                        body,
                        timeline_max=s.timeline_max,
                        stream_history=s.stream_history,
                        body_ttl_s=s.body_ttl_days * 86_400,
                    )
                elif message.startswith(b"-"):
                    await timelines.remove_for(
                        users, message[1:].decode(), stream_history=s.stream_history
                    )
                return
            except UnicodeDecodeError:
                log.warning("actor_message_malformed", actor=actor)
                return
            except _REDIS_ERRORS as exc:
                log.warning(
                    "actor_delivery_failed",
                    actor=actor,
                    users=len(users),
                    attempt=attempt,
                    attempts=attempts,
                    error=str(exc)[:200],
                )
            if attempt < attempts:
                await asyncio.sleep(pause)
                pause *= 2
        log.error("actor_delivery_abandoned", actor=actor, users=len(users), action="reset")
        self.hub.reset_users(users)

    def _on_following_changed(self, user: str) -> None:
        self.request_refresh(user)

    def request_refresh(self, user: str) -> asyncio.Task[None]:
        """Re-read the large accounts ``user`` follows (:meth:`refresh_actors`), coalesced: at
        most one read per user is in flight; a change that comes meanwhile marks the user to be
        read once more when it ends (however many came), so the newest state is applied last
        and a burst of follows costs two reads, not one task each. The task returned ends once
        the user's state is read and applied."""
        task = self._refreshes.get(user)
        if task is not None and not task.done():
            self._refresh_again.add(user)
            return task
        task = self._spawn(self._refresh_until_current(user))
        self._refreshes[user] = task
        return task

    async def _refresh_until_current(self, user: str) -> None:
        try:
            while True:
                self._refresh_again.discard(user)
                await self.refresh_actors(user)
                if user not in self._refresh_again or self._closing:
                    return
        finally:
            self._refresh_again.discard(user)
            if self._refreshes.get(user) is asyncio.current_task():
                del self._refreshes[user]

    async def refresh_actors(self, user: str) -> None:
        """Subscribe the actor channels of the large accounts ``user`` follows. Never raises.

        If they cannot be read now (Redis or Cassandra failing, or Cassandra not connected yet),
        the user is retried in the background, with backoff, for as long as they have a
        connection here. When that succeeds and the user follows a large account, the user's
        connections are sent ``reset``: pushes from those accounts may have been missed
        meanwhile, and the client refetches over HTTP.
        """
        if user in self._actors_unknown:
            return  # the retry reads the newest state (and resets if needed)
        actors = await self._read_actors(user)
        if actors is not None:
            self.hub.follow_actors(user, actors)
        elif not self._closing:
            self._actors_unknown[user] = None
            if self._actor_retry is None or self._actor_retry.done():
                self._actor_retry = self._spawn(self._retry_actors())

    async def _read_actors(self, user: str) -> list[str] | None:
        """The large accounts ``user`` follows, or None if that cannot be known now."""
        if self.uses_cassandra and self.cassandra is None:
            return None  # the follow graph is in Cassandra, which is still being connected
        try:
            return await self.reader.big_followees(user)
        except Exception as exc:
            log.warning(
                "actor_channels_failed",
                user_id=user,
                error=type(exc).__name__,
                detail=str(exc)[:200],
            )
            return None

    async def _retry_actors(self) -> None:
        """One task for every user whose large accounts could not be read: each round (after a
        pause that doubles up to ``_ACTOR_REFRESH_MAX_PAUSE_S``) reads them again, one user at a
        time, and ends after ``_ACTOR_REFRESH_FAILURES`` failures in a row (the store is likely
        still down). A user whose read failed goes to the back of the line, so one that keeps
        failing does not hold up the others."""
        pause = self.actor_refresh_pause_s
        unknown = self._actors_unknown
        while unknown and not self._closing:
            await asyncio.sleep(pause)
            pause = min(pause * 2, _ACTOR_REFRESH_MAX_PAUSE_S)
            failures = 0
            for user in list(unknown):
                if not self.hub.connections_of(user):
                    unknown.pop(user, None)  # gone: a later connect reads afresh
                    continue
                actors = await self._read_actors(user)
                if actors is None:
                    if user in unknown:  # to the back of the line
                        del unknown[user]
                        unknown[user] = None
                    failures += 1
                    if failures >= _ACTOR_REFRESH_FAILURES:
                        break
                    continue
                failures = 0
                unknown.pop(user, None)
                self.hub.follow_actors(user, actors)
                log.info("actor_channels_recovered", user_id=user, actors=len(actors))
                if actors:
                    self.hub.reset_users([user])

    async def catch_up(self, user: str, epoch: str) -> tuple[int | None, int | None]:
        """Bring the large accounts' items that ``user``'s delivery stream missed into it, before
        a connection of theirs starts: ``(reset_through, seq)``, the seq at or before which a
        resume must be answered with ``reset`` (None: no such seq) and the stream's last seq
        afterwards (None if the stream of ``epoch`` is gone). Raises on Redis errors.

        A large account's items reach a follower's stream only while a gateway holding one of
        their connections is subscribed to its channel; what it announces while they are
        offline (within the resume window, when the stream lives on) would never be in it, and
        a resume would skip it silently. So the presence hash (which lives and dies with the
        stream) records, per account, the newest outbox member the stream has been caught up
        with (``b:<actor>``). At each connect, once the accounts' channels are confirmed (so
        anything newer comes live), the outbox members after that mark are offered to the
        stream, oldest first, with the same idempotent script as live pushes: those already in
        the timeline (pushed live) are skipped, the others get the next seqs, and the resume
        replays them. Then the marks move to the outbox's newest member.

        An account the user follows with no mark in a stream that has been caught up before
        was followed while offline (or its mark could not be written): what it announced since
        is unknown, so every resume at or before the stream's current seq is answered with
        ``reset`` (``r``, kept in the hash for later connections too). A stream never caught up
        (just created by this connect: no resume into it is possible) only gets its marks.
        Members the timeline's cap would drop at once are not offered (they would arrive as new
        frames and be trimmed right after). Items an account backdates before its mark are not
        seen as new (the outbox is ordered by ``published``); the HTTP feed has them.
        """
        redis_client = self.redis
        presence_key = keys.presence(user)
        actors = sorted(self.hub.actors_of(user))
        subscribed = not actors or await self.hub.actors_subscribed(actors, _CATCH_UP_SUBSCRIBE_S)
        pipe = redis_client.pipeline(transaction=False)
        fields = ["e", "s", _CAUGHT_UP_FLAG, _RESET_THROUGH]
        fields += [_CAUGHT_UP_PREFIX + actor for actor in actors]
        pipe.hmget(presence_key, fields)
        for actor in actors:
            pipe.zrevrangebylex(keys.outbox(actor), "+", "-", start=0, num=1)
        results = await pipe.execute()
        state = [_text(value) for value in results[0]]
        heads = {
            actor: _text(head[0]) if head else ""
            for actor, head in zip(actors, results[1:], strict=True)
        }
        current_epoch, seq_text, flag, reset_text = state[:4]
        if current_epoch != epoch or seq_text is None:
            return None, None  # the stream was recreated meanwhile: the session resets anyway
        seq = int(seq_text)
        reset_through = int(reset_text) if reset_text else None
        marks = dict(zip(actors, state[4:], strict=True))
        unknown = [a for a in actors if marks[a] is None or not subscribed]
        new_reset: int | None = None
        if unknown and flag is not None:
            new_reset = seq  # what those accounts announced meanwhile is not in the stream
            reset_through = max(reset_through or -1, seq)
        offered = 0
        if subscribed:
            caught = {a: marks[a] for a in actors if marks[a] is not None and marks[a] != heads[a]}
            offered = await self._offer_missed(user, caught)
        updates: list[str] = [] if flag is not None else [_CAUGHT_UP_FLAG, "1"]
        if subscribed:
            for actor in actors:
                if marks[actor] != heads[actor]:
                    updates += [_CAUGHT_UP_PREFIX + actor, heads[actor]]
        written = 0
        if updates or new_reset is not None:
            written = await self._caught_up_script(
                keys=[presence_key],
                args=[epoch, "" if new_reset is None else str(new_reset), *updates],
            )
        if offered or new_reset is not None:
            log.info(
                "stream_caught_up",
                user_id=user,
                offered=offered,
                reset_through=new_reset,
                accounts=len(actors),
                written=bool(written),
            )
        if offered:
            now = await redis_client.hget(presence_key, "s")
            if now is not None:
                seq = int(now)
        return reset_through, seq

    def _on_resubscribed(self, user: str) -> None:
        """``user``'s channels were subscribed again after the Pub/Sub connection was lost:
        their large accounts' announcements meanwhile were lost with it (their channels have no
        stream to re-read). Catch the stream up as at a connect (:meth:`catch_up`); what it adds
        reaches the connected sessions live. One catch-up per user in flight, plus one more if
        the link was lost again meanwhile."""
        if not self.hub.actors_of(user):
            return
        task = self._catch_ups.get(user)
        if task is not None and not task.done():
            self._catch_up_again.add(user)
            return
        self._catch_ups[user] = self._spawn(self._catch_up_connected(user))

    async def _catch_up_connected(self, user: str) -> None:
        try:
            while not self._closing and self.hub.connections_of(user):
                self._catch_up_again.discard(user)
                try:
                    epoch = _text(await self.redis.hget(keys.presence(user), "e"))
                    if epoch is not None:
                        await self.catch_up(user, epoch)
                except _REDIS_ERRORS as exc:
                    # The items are in the outbox: the connections refetch.
                    log.warning("catch_up_failed", user_id=user, error=str(exc)[:200])
                    self.hub.reset_users([user])
                if user not in self._catch_up_again:
                    return
        finally:
            self._catch_up_again.discard(user)
            if self._catch_ups.get(user) is asyncio.current_task():
                del self._catch_ups[user]

    async def _offer_missed(self, user: str, marks: dict[str, str]) -> int:
        """Offer each account's outbox members after its mark (``""``: all) to ``user``'s
        stream, oldest first; skip those in the timeline already, those whose body is gone (a
        delete) and those older than a full timeline's oldest. The number offered."""
        if not marks:
            return 0
        redis_client = self.redis
        s = self.settings
        pipe = redis_client.pipeline(transaction=False)
        for actor, mark in marks.items():
            pipe.zrangebylex(keys.outbox(actor), f"({mark}" if mark else "-", "+")
        pipe.zcard(keys.timeline(user))
        pipe.zrange(keys.timeline(user), 0, 0)
        *ranges, size, oldest = await pipe.execute()
        members = sorted({_text(m) for found in ranges for m in found})
        if size >= s.timeline_max and oldest:
            floor = _text(oldest[0])
            members = [m for m in members if m > floor]
        if not members:
            return 0
        pipe = redis_client.pipeline(transaction=False)
        pipe.zmscore(keys.timeline(user), members)
        pipe.mget([keys.body(m.partition(":")[2]) for m in members])
        scores, bodies = await pipe.execute()
        timelines = _opened(self._timelines)
        offered = 0
        for member, score, body in zip(members, scores, bodies, strict=True):
            if score is not None or body is None:
                continue
            await timelines.insert_for(
                [user],
                member,
                body,
                timeline_max=s.timeline_max,
                stream_history=s.stream_history,
                body_ttl_s=s.body_ttl_days * 86_400,
            )
            offered += 1
        return offered

    def _make_reader(self, history: Any) -> FeedReader:
        from feed.graph_cassandra import CassandraFollowGraph

        s = self.settings
        graph = None
        if history is not None:
            graph = CassandraFollowGraph(history.session, s.cassandra_keyspace)
        return FeedReader(
            _opened(self._timelines),
            history,
            body_ttl_s=s.body_ttl_days * 86_400,
            active_ttl_s=s.active_days * 86_400,
            timeline_max=s.timeline_max,
            graph=graph,
        )

    async def _connect_cassandra(self) -> None:
        """Connect in the background (start-up does not wait for Cassandra); retry until it works.

        Until then ``GET /readyz`` reports Cassandra down and pages stop at the hot tier.
        """
        delay = 1.0
        while not self._closing:
            try:
                session, history = await _in_daemon_thread(
                    self._open_cassandra, on_orphan=lambda opened: opened[0].cluster.shutdown()
                )
            except Exception as exc:
                log.warning("cassandra_unavailable", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self.cassandra = session
            self._owns_cassandra = True
            self._reader = self._make_reader(history)
            log.info("cassandra_connected")
            return

    def _open_cassandra(self) -> tuple[Any, Any]:
        from feed.stores import open_cassandra  # the driver is slow to import; only when needed

        session = open_cassandra(self.settings)
        try:
            return session, _history(session, self.settings.cassandra_keyspace)
        except BaseException:
            session.cluster.shutdown()
            raise

    async def readiness(self) -> dict[str, dict[str, Any]]:
        """Check every dependency (bounded in time); one entry per dependency."""
        checks: dict[str, Callable[[], Any]] = {"redis": self._check_redis}
        probe = _kafka_probe(self._producer)
        if probe is not None:
            checks["kafka"] = lambda: asyncio.to_thread(probe, timeout=2.0)
        if self.uses_cassandra:
            checks["cassandra"] = self._check_cassandra
        names = list(checks)
        results = await asyncio.gather(
            *(_timed(name, checks[name]) for name in names), return_exceptions=False
        )
        out = dict(zip(names, results, strict=True))
        out["pubsub"] = {"ok": self.hub.connected}
        return out

    async def _check_redis(self) -> None:
        await self.redis.ping()

    async def _check_cassandra(self) -> None:
        session = self.cassandra
        if session is None:
            raise _NotConnectedYet("not connected yet")
        await asyncio.to_thread(session.execute, "SELECT now() FROM system.local", timeout=2.0)


def _text(value: bytes | str | None) -> Any:
    """A Redis reply as ``str`` (None stays None)."""
    return value.decode() if isinstance(value, bytes) else value


def _opened(value: T | None) -> T:
    if value is None:
        raise RuntimeError("the gateway's resources are not open (lifespan not running)")
    return value


def _history(session: Any, keyspace: str) -> Any:
    from feed.history_cassandra import CassandraHistory

    return CassandraHistory(session, keyspace)


def _kafka_probe(producer: Any) -> Callable[..., Any] | None:
    probe = getattr(producer, "list_topics", None)
    if probe is None:
        # feed.kafka.AsyncProducer wraps a confluent-kafka Producer, which answers metadata.
        probe = getattr(getattr(producer, "_producer", None), "list_topics", None)
    return probe if callable(probe) else None


class _NotConnectedYet(RuntimeError):
    """A dependency this process connects to in the background is not connected yet."""


async def _timed(name: str, check: Callable[[], Any]) -> dict[str, Any]:
    """Run one readiness check. What failed is answered in one word (``unreachable``,
    ``timeout`` or ``connecting``): the exception's text, which names hosts and ports, goes to
    the log only (``/readyz`` needs no authentication)."""
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(), 3.0)
    except Exception as exc:
        if isinstance(exc, _NotConnectedYet):
            error = "connecting"
        elif isinstance(exc, TimeoutError | RedisTimeoutError) or "Timeout" in type(exc).__name__:
            error = "timeout"
        else:
            error = "unreachable"
        log.warning(
            "dependency_unready",
            dependency=name,
            error=error,
            detail=f"{type(exc).__name__}: {exc}"[:300],
        )
        return {"ok": False, "error": error}
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


async def _in_daemon_thread(
    fn: Callable[[], T], *, on_orphan: Callable[[T], Any] | None = None
) -> T:
    """Run blocking ``fn`` in a daemon thread (it must not hold the process open at exit).

    If the caller was cancelled or the loop is gone when ``fn`` returns, ``on_orphan`` releases
    the result (off the event loop).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # the caller gave up (cancelled): release what it would have used
            if error is None and on_orphan is not None:
                threading.Thread(target=on_orphan, args=(result,), daemon=True).start()
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is gone: nobody will use the result
            if error is None and on_orphan is not None:
                on_orphan(result)

    threading.Thread(target=target, name="gateway-open-cassandra", daemon=True).start()
    return await future


# --- HTTP handlers ------------------------------------------------------------------------------
def _gateway(conn: HTTPConnection) -> Gateway:
    gateway: Gateway = conn.app.state.gateway
    return gateway


def _user(request: Request) -> UserClaims:
    gateway = _gateway(request)
    token = bearer_token(request.headers)
    if token is None:
        raise AuthError("missing", "an `Authorization: Bearer <token>` header is required")
    return verify_user_token(
        token, gateway.settings.require_jwt(), leeway_s=gateway.settings.jwt_leeway_s
    )


async def _require_ingest(request: Request) -> None:
    """The ingest token is right, and its rate limit not exceeded (429 otherwise)."""
    gateway = _gateway(request)
    token = gateway.settings.ingest_token
    if token is None or not ingest_authorized(request.headers, token):
        raise AuthError("ingest", "the ingest token is missing or wrong")
    decision = await gateway.limiter.take(ingest_key(token.reveal()), gateway.ingest_limit)
    if not decision.allowed:
        wait = decision.retry_after
        raise GatewayError(
            429,
            "throttled",
            f"over the ingest rate limit of {gateway.ingest_limit.rate:g} requests/s "
            f"(burst {gateway.ingest_limit.burst}); retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )


_JSON_MEDIA = re.compile(r"^application/(?:[a-z0-9.+-]+\+)?json$")


def _require_json(request: Request) -> None:
    """The body is declared JSON (``application/json`` or ``+json``, UTF-8), or not declared."""
    declared = request.headers.get("content-type", "").strip()
    if not declared:
        return  # tolerated: the body is parsed as JSON and rejected with 400 if it is not
    media, _, params = declared.partition(";")
    media = media.strip().lower()
    charset = ""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    if not _JSON_MEDIA.match(media) or charset not in ("", "utf-8", "utf8"):
        raise GatewayError(
            415,
            "unsupported_media_type",
            f"the body must be application/json in UTF-8, not {declared[:100]!r}",
            field="Content-Type",
        )


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read chunk by chunk and never more than ``limit`` bytes of it: a declared
    ``Content-Length`` over the limit is refused before reading anything, a chunked body as soon
    as the bytes received pass it; a body still incomplete after ``BODY_TIMEOUT_S`` is 408. An
    empty body is refused here (400), not by the decoders."""
    declared = request.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise GatewayError(
            413, "too_large", f"body of {declared} bytes exceeds the limit of {limit} bytes"
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise GatewayError(413, "too_large", f"body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise GatewayError(
            408, "body_timeout", f"the body did not arrive within {BODY_TIMEOUT_S:g} s"
        ) from None
    except ClientDisconnect:
        # The client went away mid-body: nobody reads the answer, but it must not count (or
        # log) as a server error.
        raise GatewayError(
            400, "incomplete_body", f"the client disconnected after {size} bytes of the body"
        ) from None
    body = b"".join(chunks)
    if not body.strip():
        raise GatewayError(400, "empty", "the body is empty; send JSON")
    return body


#: ``limit``: ASCII digits only (``str.isdigit`` and ``int`` also take "²", "٣" and other
#: Unicode digits, and ``int`` refuses more than 4300 of them), a few at most.
_LIMIT = re.compile(r"[0-9]{1,9}")
#: The order key inside a position cursor starts with 16 ASCII digits (``feed.cursor``).
_POSITION_KEY = re.compile(r"[0-9]{16}:")
_MAX_CURSOR_CHARS = 400


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not _LIMIT.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIMIT:
        raise GatewayError(
            400,
            "out_of_range",
            f"must be a whole number from 1 to {MAX_LIMIT} in ASCII digits",
            field="limit",
        )
    return int(raw)


def _position_cursor(raw: str | None) -> str | None:
    """A paging cursor checked at the boundary: one this API issued, or 400 naming ``cursor``
    (never an exception from deeper down for a cursor it could not have issued)."""
    if not raw:
        return None
    key: str | None = None
    if len(raw) <= _MAX_CURSOR_CHARS:
        try:
            key = decode_position(raw)
        except ValueError:  # CursorError, or int() refusing a digit that is not ASCII
            key = None
    if key is None or not _POSITION_KEY.match(key):
        raise GatewayError(
            400,
            "invalid_cursor",
            "not a cursor of this feed: use `next` of a page as it was returned "
            f"(at most {_MAX_CURSOR_CHARS} characters)",
            field="cursor",
        )
    return raw


async def healthz(_request: Request) -> Response:
    return _JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    checks = await _gateway(request).readiness()
    ready = all(check["ok"] for check in checks.values())
    return _JSONResponse(
        {"ready": ready, "dependencies": checks}, status_code=200 if ready else 503
    )


async def metrics_endpoint(request: Request) -> Response:
    gateway = _gateway(request)
    gateway.metrics.pubsub_connected.set(1 if gateway.hub.connected else 0)
    return Response(gateway.metrics.render(), media_type=CONTENT_TYPE)


async def feed_page(request: Request) -> Response:
    claims = _user(request)
    limit = _limit(request.query_params.get("limit"))
    cursor = _position_cursor(request.query_params.get("cursor"))
    page = await _gateway(request).reader.page(claims.user, cursor, limit)
    return _JSONResponse(page)


async def ingest_activities(request: Request) -> Response:
    await _require_ingest(request)
    _require_json(request)
    gateway = _gateway(request)
    body = await _read_body(request, MAX_INGEST_BODY)
    activities = decode_activities(body, max_skew_s=gateway.settings.max_clock_skew_s)
    key = request.headers.get("idempotency-key")
    idempotency = None
    if key is not None:
        idempotency = _Idempotency(gateway.redis, key, body)
        stored = await idempotency.begin()
        if stored is not None:
            status, content = stored
            return Response(
                content,
                status_code=status,
                media_type="application/json",
                headers={"Idempotent-Replayed": "true"},
            )
    records = [(a.actor.encode(), encode_activity(a)) for a in activities]
    try:
        await _produce(gateway, gateway.settings.topic_activities, records)
    except GatewayError:
        if idempotency is not None:
            await idempotency.abandon()
        raise
    content = _json.encode(Accepted(accepted=len(activities)))
    if idempotency is not None:
        await idempotency.finish(202, content)
    gateway.metrics.ingest_activities.inc(len(activities))
    return Response(content, status_code=202, media_type="application/json")


async def follow(request: Request) -> Response:
    await _require_ingest(request)
    _require_json(request)
    gateway = _gateway(request)
    body = await _read_body(request, MAX_FOLLOW_BODY)
    wanted = decode_follow_request(body)
    event = FollowEvent(
        type="follow" if request.method == "POST" else "unfollow",
        follower=wanted.follower,
        followee=wanted.followee,
        at=datetime.now(UTC),
    )
    await _produce(
        gateway, gateway.settings.topic_follows, [(wanted.follower.encode(), _json.encode(event))]
    )
    return _JSONResponse(Accepted(accepted=1), status_code=202)


async def _produce(gateway: Gateway, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    try:
        await gateway.producer.send_many(topic, records, timeout=15.0)
    except (KafkaUnavailable, TimeoutError, OSError) as exc:
        log.warning("produce_failed", topic=topic, records=len(records), error=str(exc))
        raise GatewayError(
            503,
            "kafka_unavailable",
            "the event log did not accept the records; retry later",
            headers={"Retry-After": "2"},
        ) from None


_OPENAPI: bytes | None = None


async def openapi_json(_request: Request) -> Response:
    global _OPENAPI
    if _OPENAPI is None:
        _OPENAPI = _json.encode(
            openapi_document(
                ingest_body_limit=MAX_INGEST_BODY,
                follow_body_limit=MAX_FOLLOW_BODY,
                max_limit=MAX_LIMIT,
                default_limit=DEFAULT_LIMIT,
            )
        )
    return Response(_OPENAPI, media_type="application/json")


async def dev_token(request: Request) -> Response:
    user = request.query_params.get("user", "")
    if not is_valid_id(user):
        raise GatewayError(400, "invalid", "a user id (1-128 printable characters)", field="user")
    ttl = 86_400
    token = mint_token(_gateway(request).settings.require_jwt(), user, ttl)
    return _JSONResponse({"user": user, "token": token, "expires_in": ttl})


_PAGE: bytes | None = None


async def page(_request: Request) -> Response:
    global _PAGE
    if _PAGE is None:
        _PAGE = await asyncio.to_thread((_STATIC / "index.html").read_bytes)
    return Response(_PAGE, media_type="text/html; charset=utf-8")


class _Idempotency:
    """``Idempotency-Key`` for ingest: key -> (sha256 of body, response), kept 24 h in Redis.

    ``begin`` claims the key with SET NX (a pending marker with a short TTL, so a crashed request
    does not block its retries for a day); a later request with the same key and body gets the
    stored response and produces nothing; with another body it gets 422; while the first request
    is still producing, 409.
    """

    def __init__(self, client: aioredis.Redis, key: str, body: bytes) -> None:
        if not _IDEMPOTENCY_KEY.fullmatch(key):
            raise GatewayError(
                400,
                "invalid",
                "must be 1-255 printable ASCII characters without spaces",
                field="Idempotency-Key",
            )
        self._redis = client
        self._name = keys.idempotency(hashlib.sha256(key.encode()).hexdigest())
        self._digest = hashlib.sha256(body).hexdigest()

    async def begin(self) -> tuple[int, bytes] | None:
        pending = _json.encode({"h": self._digest, "s": 0, "b": ""})
        for _ in range(3):
            if await self._redis.set(self._name, pending, nx=True, ex=IDEMPOTENCY_PENDING_TTL_S):
                return None
            raw = await self._redis.get(self._name)
            if raw is None:
                continue  # expired between the two calls: claim it again
            stored = msgspec.json.decode(raw)
            if stored.get("h") != self._digest:
                raise GatewayError(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different body",
                    field="Idempotency-Key",
                )
            if not stored.get("s"):
                raise GatewayError(
                    409,
                    "idempotency_in_progress",
                    "a request with this Idempotency-Key is still being processed",
                    field="Idempotency-Key",
                    headers={"Retry-After": "1"},
                )
            return int(stored["s"]), str(stored["b"]).encode()
        raise GatewayError(409, "idempotency_in_progress", "retry", field="Idempotency-Key")

    async def finish(self, status: int, content: bytes) -> None:
        """Remember the response. The records are in Kafka already: if Redis fails now, the
        request still succeeded (answering 503 would make the client send them again); the
        pending marker expires and a retry after that produces again, which the activities'
        ids make harmless downstream."""
        value = _json.encode({"h": self._digest, "s": status, "b": content.decode()})
        try:
            await self._redis.set(self._name, value, ex=IDEMPOTENCY_TTL_S)
        except _REDIS_ERRORS as exc:
            log.warning("idempotency_not_recorded", error=f"{type(exc).__name__}: {exc}"[:300])

    async def abandon(self) -> None:
        with contextlib.suppress(*_REDIS_ERRORS):
            await self._redis.delete(self._name)


# --- WebSocket ---------------------------------------------------------------------------------
#: The stream's path; :class:`_GatewayApp` sends WebSocket connects to it straight to
#: :class:`_StreamEndpoint`.
STREAM_PATH = "/v1/stream"
_NO_HEADERS: tuple[tuple[bytes, bytes], ...] = ()


class _StreamSocket:
    """The ASGI side of one ``/v1/stream`` connection, with only what the adapter uses.

    Starlette's ``WebSocket`` would do the same, as one more object per connection (with its
    own state, header and query caches) and one more coroutine frame under every receive; a
    gateway holds thousands of these connections, mostly idle, so the raw ASGI callables are used.
    """

    __slots__ = ("_closed", "_send", "receive")

    def __init__(self, receive: Receive, send: Send) -> None:
        self.receive = receive
        self._send = send
        self._closed = False

    async def accept(self) -> None:
        message = await self.receive()
        if message["type"] != "websocket.connect":
            raise RuntimeError(f"expected websocket.connect, got {message['type']!r}")
        await self._send({"type": "websocket.accept"})

    async def send_text(self, text: str) -> None:
        if self._closed:
            raise RuntimeError("the WebSocket is closed")
        await self._send({"type": "websocket.send", "text": text})

    def _protocol(self) -> Any:
        """The server's protocol object behind ``send`` (uvicorn's ``send`` is a method of it),
        or None under a server where it is not."""
        return getattr(self._send, "__self__", None)

    def write_now(self, frames: list[bytes]) -> int | None:
        """Write ``frames`` as text messages at once if the server can (uvicorn under
        :mod:`gateway.websocket`, socket open and writable): the bytes written, or None, having
        written nothing (use :meth:`send_text`)."""
        if self._closed:
            return None
        write = getattr(self._protocol(), "write_text_now", None)
        if write is None:
            return None
        written: int | None = write(frames)
        return written

    async def close(self, code: int, reason: str) -> None:
        if self._closed:
            raise RuntimeError("the WebSocket is closed")
        self._closed = True
        await self._send({"type": "websocket.close", "code": code, "reason": reason})

    def abort(self, *, only_if_stuck: bool = False) -> None:
        """Drop the TCP connection now, unsent data and all. For a client that stopped reading:
        its close frame never gets out, and the server's graceful transport close waits for a
        buffer that never drains, keeping the socket and its buffers for as long as the client
        keeps the connection open. With ``only_if_stuck``, only if data is still unsent.
        (uvicorn's ``send`` is a method of its protocol, which holds the transport; under
        another server this does nothing.)"""
        transport = getattr(self._protocol(), "transport", None)
        if transport is None:
            return
        if only_if_stuck:
            with contextlib.suppress(Exception):
                if not transport.get_write_buffer_size():
                    return
        # Linger 0: the kernel resets the connection and frees its send buffer at once, rather
        # than keep the unsent bytes in an orphaned socket that retries a zero window.
        with contextlib.suppress(Exception):
            transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        transport.abort()


def _handshake(scope: Scope) -> tuple[str | None, str, str]:
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


class _StreamEndpoint:
    """``GET /v1/stream`` as an ASGI app (it is served before Starlette's stack, see
    :class:`_GatewayApp`, and also routed by Starlette for any other way in)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        settings = gateway.settings
        # Log context of this connection. The task is the connection's own (its context is a
        # copy), so nothing needs resetting afterwards.
        structlog.contextvars.bind_contextvars(conn_id=secrets.token_hex(6))
        origin, ip, token = _handshake(scope)
        websocket = _StreamSocket(receive, send)
        await websocket.accept()
        # The server and this call's callers keep the scope for the connection's lifetime; its
        # headers (about 1.5 KiB) are not read again.
        scope["headers"] = _NO_HEADERS
        allowed_origins = settings.allowed_origins
        if allowed_origins and origin is not None and origin not in allowed_origins:
            log.info("ws_rejected", reason="origin", origin=origin[:200])
            await _close_quietly(websocket, CLOSE_FORBIDDEN, "origin not allowed")
            gateway.metrics.closes.labels(str(CLOSE_FORBIDDEN)).inc()
            return
        # Attempts per IP are limited before the token is looked at (bad tokens count too).
        if not await _connect_allowed(
            gateway, websocket, connect_ip_key(ip), gateway.connect_ip_limit, "ip"
        ):
            return
        try:
            claims = verify_user_token(
                token, settings.require_jwt(), leeway_s=settings.jwt_leeway_s
            )
        except AuthError as exc:
            log.info("ws_rejected", reason=exc.reason)
            await _close_quietly(websocket, CLOSE_UNAUTHORIZED, exc.message)
            gateway.metrics.closes.labels(str(CLOSE_UNAUTHORIZED)).inc()
            return
        del token  # this frame lives as long as the connection
        structlog.contextvars.bind_contextvars(user_id=claims.user)
        user_key = connect_user_key(claims.user)
        if not await _connect_allowed(gateway, websocket, user_key, gateway.connect_limit, "user"):
            return
        await StreamConnection(websocket, claims, gateway).run()


async def _connect_allowed(
    gateway: Gateway, websocket: _StreamSocket, key: str, limit: Limit, per: str
) -> bool:
    """Take a connect token from the bucket ``key``; close with 4029 when there is none."""
    decision = await gateway.limiter.take(key, limit)
    if decision.allowed:
        return True
    log.info("ws_rejected", reason="rate_limited", per=per, retry_after_s=decision.retry_after)
    await _close_quietly(
        websocket, CLOSE_RATE_LIMITED, f"too many connects; retry in {decision.retry_after} s"
    )
    gateway.metrics.closes.labels(str(CLOSE_RATE_LIMITED)).inc()
    return False


async def _close_quietly(websocket: _StreamSocket, code: int, reason: str) -> None:
    """Close with ``code`` and ``reason`` (cut to what a close frame holds); never raises for
    the client's sake: a close that cannot be written ends in dropping the connection."""
    try:
        await asyncio.wait_for(websocket.close(code, fit_close_reason(reason)), _CLOSE_TIMEOUT_S)
    except TimeoutError:
        websocket.abort()  # the client is not reading: the close frame cannot get out
        return
    except (RuntimeError, OSError):
        return
    except WebSocketException as exc:
        # The protocol refused the close frame (a reason this code let through, or a state
        # it did not expect): drop the connection rather than let the handler die with it.
        log.warning("ws_close_failed", code=code, error=f"{type(exc).__name__}: {exc}"[:200])
        websocket.abort()
        return
    # The close frame may only be buffered: a client that does not read within the close
    # timeout has its connection reset rather than held open by the unsent bytes.
    asyncio.get_running_loop().call_later(
        _CLOSE_TIMEOUT_S, functools.partial(websocket.abort, only_if_stuck=True)
    )


class StreamConnection:
    """Adapter between one WebSocket, its :class:`Session` and the :class:`Hub`.

    The connection's own task (the server's, running :meth:`run`) reads client frames and feeds
    them to the session. The hub's callbacks (:meth:`deliver`, :meth:`check_gap`,
    :meth:`shutdown`, synchronous) and the timers feed it too. A *pump* task performs the
    session's history reads and writes its frames; it exists only while there is something to
    do (an idle connection has no task but its own, which is most of its memory). Whoever
    notices that the session closed stops the pump and gets the reader out of its wait;
    :meth:`run` then writes the close frame.
    """

    __slots__ = (
        "_claims",
        "_client_code",
        "_context",
        "_early",
        "_early_gap",
        "_gateway",
        "_going_away",
        "_hold",
        "_interrupted",
        "_main",
        "_pending_since",
        "_pump_again",
        "_pump_task",
        "_pushed",
        "_reading",
        "_session",
        "_ws",
    )

    def __init__(self, websocket: _StreamSocket, claims: UserClaims, gateway: Gateway) -> None:
        self._ws = websocket
        self._claims = claims
        self._gateway = gateway
        self._session: Session | None = None
        self._early: list[bytes] | None = None  # frames delivered before the session started
        self._early_gap = False
        self._going_away = False
        self._hold: asyncio.TimerHandle | None = None  # the live hold after the welcome
        self._context: contextvars.Context | None = None
        self._main: asyncio.Task[Any] | None = None  # the task running run() (the reader)
        self._reading = False  # the reader waits for a client frame
        self._interrupted = False  # ... and was cancelled out of that wait by us
        self._pump_task: asyncio.Task[None] | None = None
        self._pump_again = False  # an event came while the pump was busy
        self._pending_since: float | None = None
        self._client_code: int | None = None
        self._pushed = 0

    @property
    def user(self) -> str:
        return self._claims.user

    # --- hub callbacks ---------------------------------------------------------------------------
    def deliver(self, frame: bytes) -> None:
        session = self._session
        if session is None:
            self._deliver_early(frame)
            return
        session.receive_live(frame)
        self._mark_pending()
        self._after_event()

    def _deliver_early(self, frame: bytes) -> None:
        """Keep a frame that came before the session started (while presence is attached).

        At most ``_EARLY_MAX_FRAMES`` are kept: a flood for a user who is still connecting does
        not grow the list without bound. Past it the list shrinks to what the session cannot
        get again (the newest stream frame, which tells it how far the stream goes, and the
        hub's control frames) and the session starts by reading the stream: every pushed frame
        is in it, so nothing is lost.
        """
        early = self._early
        if early is None:
            early = self._early = []
        elif len(early) >= _EARLY_MAX_FRAMES:
            early[:] = _essential_early(early)
            self._early_gap = True
        early.append(frame)

    def check_gap(self) -> None:
        if self._session is None:
            self._early_gap = True
            return
        self._session.check_gap()
        self._after_event()

    def shutdown(self) -> None:
        self._going_away = True
        if self._session is not None:
            self._session.shutdown()
            self._after_event()

    # --- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        gateway = self._gateway
        started = time.monotonic()
        try:
            await gateway.hub.register(self, max_per_user=gateway.settings.max_connections_per_user)
        except TooManyConnections as exc:
            log.info("ws_rejected", reason="too_many_connections", limit=exc.limit)
            await _close_quietly(
                self._ws,
                CLOSE_RATE_LIMITED,
                f"too many connections: at most {exc.limit} per user on one gateway",
            )
            gateway.metrics.closes.labels(str(CLOSE_RATE_LIMITED)).inc()
            return
        except HubUnavailable:
            log.warning("ws_rejected", reason="pubsub_unavailable")
            await _close_quietly(self._ws, _CLOSE_TRY_AGAIN, "try again later")
            return
        session: Session | None = None
        gateway.metrics.connections.inc()
        try:
            try:
                presence = await gateway.presence.attach(self.user)
                # A connected user is active: fan-out writes their Redis timeline (and a user
                # back from a quiet period gets it rebuilt from history, single-flight).
                await gateway.reader.touch(self.user)
                # Shared with a refresh in flight for this user (a follow just changed): the
                # connection must not be cancelled out of it, nor cancel it for others.
                await asyncio.shield(gateway.request_refresh(self.user))
                reset_through, caught_up_seq = await gateway.catch_up(self.user, presence.epoch)
            except _REDIS_ERRORS as exc:
                log.warning("ws_rejected", reason="redis_unavailable", error=str(exc))
                await _close_quietly(self._ws, _CLOSE_TRY_AGAIN, "try again later")
                return
            session = self._start_session(presence.epoch, presence.seq, reset_through)
            if caught_up_seq is not None:
                session.rebase(presence.epoch, caught_up_seq)  # frames the catch-up added
            await self._serve(session)
        finally:
            gateway.metrics.connections.dec()
            gateway.hub.unregister(self)
            self._log_summary(session, time.monotonic() - started)

    def _start_session(self, epoch: str, seq: int, reset_through: int | None = None) -> Session:
        settings = self._gateway.settings
        hold = self._gateway.hold_live_s
        session = Session(
            self.user,
            epoch,
            seq,
            max_queue_bytes=settings.send_queue_bytes,
            hold_live=hold > 0,
            reset_through=reset_through,
        )
        self._session = session
        if self._early is not None:
            for frame in self._early:
                session.receive_live(frame)
            self._early = None
        if self._early_gap:
            session.check_gap()
        if self._going_away:
            session.shutdown()
        return session

    async def _serve(self, session: Session) -> None:
        """Read client frames until the session closes or the client leaves, then close.

        The reading happens here, in the connection's own task, rather than in a task of its
        own: an idle connection then costs one task.
        """
        loop = asyncio.get_running_loop()
        self._main = main = asyncio.current_task()
        self._context = contextvars.copy_context()  # the pump logs with this connection's context
        if self._gateway.hold_live_s > 0:
            self._hold = loop.call_later(self._gateway.hold_live_s, self._end_hold)
        expires_in = self._claims.expires_at + self._gateway.settings.jwt_leeway_s - time.time()
        expiry = timers().call_later(expires_in, StreamConnection._expire, self)
        self._after_event()  # the welcome (or the close, if the session closed already)
        receive = self._ws.receive
        try:
            while not session.closed:
                self._reading = True
                try:
                    message = await receive()
                except asyncio.CancelledError:
                    if self._interrupted and main is not None and main.uncancel() == 0:
                        break  # our own interruption (the session closed), nobody else's
                    raise
                finally:
                    self._reading = False
                if not self._client_message(session, message):
                    break
        except OSError:
            pass
        except Exception:
            log.exception("ws_task_failed", task="ws-read")
        finally:
            expiry.cancel()
            if self._hold is not None:
                self._hold.cancel()
                self._hold = None
            self._main = None
            pump = self._pump_task
            if pump is not None:
                pump.cancel()
                try:
                    await pump  # ends at once; it logs its own failures
                except asyncio.CancelledError:
                    # The pump's own cancellation, or this task's: only the latter goes on.
                    if main is not None and main.cancelling():
                        raise
        close = session.close_code()
        if close is not None and self._client_code is None:
            code, reason = close
            if code == CLOSE_TOO_SLOW:
                self._gateway.metrics.slow_client_closes.inc()
            self._gateway.metrics.closes.labels(str(code)).inc()
            await _close_quietly(self._ws, code, reason)

    def _client_message(self, session: Session, message: Message) -> bool:
        """Feed one ASGI message to the session; False once the client has gone."""
        kind = message["type"]
        if kind == "websocket.disconnect":
            self._client_code = int(message.get("code") or 1005)
            return False
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                session.receive_text(text, now=time.monotonic())
            else:
                session.receive_bytes(message.get("bytes") or b"")
            self._after_event()
        return True

    def _end_hold(self) -> None:
        self._hold = None  # fired: not kept for the connection's lifetime
        if self._session is not None:
            self._session.start_live()
            self._after_event()

    def _expire(self) -> None:
        if self._session is not None:
            self._session.token_expired()
            self._after_event()

    def _after_event(self) -> None:
        """The session may have output or have closed: start the pump, or stop everything."""
        session = self._session
        if session is None or self._main is None:
            return  # not serving yet (run() calls this again when it starts) or any more
        if session.closed:
            pump = self._pump_task
            if pump is not None and not pump.done():
                # A pump blocked on a slow socket must not delay the close.
                pump.cancel()
            self._interrupt_reader()
            return
        pump = self._pump_task
        if pump is not None and not pump.done():
            self._pump_again = True
            return
        self._pump_again = False
        frames: list[bytes] | None = None
        if not session.wants_history:
            # The hot path: live frames for a socket that takes them are written right here,
            # with no task (the pump is for history reads and for sockets that push back).
            frames = session.frames_to_send()
            if not frames or self._write_now(session, frames):
                return
        self._pump_task = asyncio.get_running_loop().create_task(
            self._pump(session, frames), context=self._context
        )

    def _write_now(self, session: Session, frames: list[bytes]) -> bool:
        written = self._ws.write_now(frames)
        if written is None:
            return False
        session.frame_sent(written)
        self._sent(len(frames))
        return True

    def _sent(self, count: int) -> None:
        metrics = self._gateway.metrics
        self._pushed += count
        metrics.messages_pushed.inc(count)
        since = self._pending_since
        if since is not None:
            self._pending_since = None
            metrics.push_latency.observe(time.perf_counter() - since)

    def _interrupt_reader(self) -> None:
        """Get the reader out of its wait for a client frame (the session closed)."""
        main = self._main
        if main is not None and self._reading and not self._interrupted:
            self._interrupted = True
            main.cancel()

    def _mark_pending(self) -> None:
        if self._pending_since is None:
            self._pending_since = time.perf_counter()

    async def _pump(self, session: Session, frames: list[bytes] | None = None) -> None:
        """Write ``frames`` (handed out by the session already), then read history and write
        frames until there is nothing left to do, then end."""
        try:
            if frames:
                await self._send_frames(session, frames)
            await self._pump_loop(session)
        except asyncio.CancelledError:
            self._interrupt_reader()
            raise
        except OSError:
            pass  # the client is gone (its disconnect reaches the reader too)
        except Exception:
            log.exception("ws_task_failed", task="ws-pump")
        else:
            if not session.closed:
                self._pump_task = None  # done: an idle connection keeps no task of it
                return
        # The session closed or the pump failed: the connection ends.
        self._interrupt_reader()

    async def _send_frames(self, session: Session, frames: list[bytes]) -> None:
        if self._write_now(session, frames):
            return
        websocket = self._ws
        for frame in frames:
            await websocket.send_text(frame.decode())
            session.frame_sent(len(frame))
            self._sent(1)

    async def _pump_loop(self, session: Session) -> None:
        presence = self._gateway.presence
        while not session.closed:
            self._pump_again = False
            busy = False
            after = session.history_request()
            if after is not None:
                busy = True
                try:
                    oldest = await presence.oldest_seq(self.user)
                    frames = await presence.frames_after(self.user, after, HISTORY_PAGE)
                except _REDIS_ERRORS as exc:
                    log.warning("history_read_failed", error=str(exc))
                    session.history_failed()
                    await asyncio.sleep(0.5)  # back off before the next attempt
                    continue
                session.receive_history(frames, oldest)
                self._mark_pending()
            frames_out = session.frames_to_send()
            if frames_out:
                busy = True  # a withheld history request may be due once these are written
                await self._send_frames(session, frames_out)
            if not busy and not self._pump_again:
                return

    def _log_summary(self, session: Session | None, duration_s: float) -> None:
        fields: dict[str, Any] = {
            "duration_s": round(duration_s, 3),
            "pushed": self._pushed,
            "client_close_code": self._client_code,
        }
        if session is not None:
            close = session.close_code()
            fields.update(
                close_code=close[0] if close else None,
                close_reason=close[1] if close else None,
                replayed=session.replayed,
                duplicates=session.duplicates,
                gaps=session.gaps,
                resets=session.resets,
            )
            if session.resets:
                self._gateway.metrics.resets.inc(session.resets)
        log.info("ws_connection", **fields)


def _essential_early(frames: list[bytes]) -> list[bytes]:
    """Of the frames kept before a session started, those it cannot read again from the stream:
    the newest stream frame (its seq says how far the stream goes), the newest presence frame
    and a reset request, in their order."""
    keep: set[int] = set()
    found_live = found_presence = found_reset = False
    for index in range(len(frames) - 1, -1, -1):
        frame = frames[index]
        if frame.startswith(PRESENCE_PREFIX):
            if not found_presence:
                found_presence = True
                keep.add(index)
        elif frame == RESET_CONTROL:
            if not found_reset:
                found_reset = True
                keep.add(index)
        elif not found_live:
            found_live = True
            keep.add(index)
    return [frames[index] for index in sorted(keep)]


# --- middleware -------------------------------------------------------------------------------
class _AccessLog:
    """One log line and one ``feed_gateway_http_requests_total`` sample per HTTP request.

    Logs the path only: query strings may carry tokens.
    """

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


# --- the app ----------------------------------------------------------------------------------
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

    stream = _StreamEndpoint(gateway)
    routes = [
        Route("/", page, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/v1/feed", _outages_as_503(feed_page), methods=["GET"]),
        Route("/v1/activities", _outages_as_503(ingest_activities), methods=["POST"]),
        Route("/v1/follows", _outages_as_503(follow), methods=["POST", "DELETE"]),
        WebSocketRoute(STREAM_PATH, stream),
    ]
    if dev_mode:
        routes.append(Route("/dev/token", dev_token, methods=["GET"]))
    handlers: dict[Any, Any] = {
        Exception: _error_response,
        HTTPException: _error_response,
        GatewayError: _error_response,
        ValidationError: _error_response,
        CursorError: _error_response,
        AuthError: _error_response,
        RedisConnectionError: _error_response,
        RedisTimeoutError: _error_response,
    }
    app = _GatewayApp(
        routes=routes,
        lifespan=lifespan,
        exception_handlers=handlers,
        middleware=[Middleware(_AccessLog, metrics=gateway.metrics)],
    )
    app.state.gateway = gateway
    app.stream = stream
    return app


class _GatewayApp(Starlette):
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
