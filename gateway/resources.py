"""The resources of one gateway app (:class:`Gateway`, ``app.state.gateway``): Redis, the Kafka
producer, Cassandra, the hub, the rate limiter and the large-account state, opened once by the
lifespan and handed to every handler.

Guarantees: collaborators passed in (a Redis client, a reader, a producer, a Cassandra session)
are used as they are and left open; those not passed in are opened by :meth:`Gateway.open` from
the settings and closed by :meth:`Gateway.close`. Start-up never waits for Cassandra: it is
connected in the background, retried until it works (``/readyz`` says ``connecting`` meanwhile,
pages stop at the hot tier). :meth:`Gateway.readiness` checks each dependency within a bound and
answers in one word, never with hosts or ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import HTTPConnection

from feed import keys, redis_connect
from feed.delivery_redis import AsyncRedisPresence
from feed.kafka import AsyncProducer, producer_config
from feed.notify_redis import AsyncNotifyRedis
from feed.reader import FeedReader
from feed.settings import Settings
from feed.tenants import DEFAULT
from feed.timelines_redis import AsyncRedisTimelines
from gateway.big_accounts import BigAccounts
from gateway.hub import Hub
from gateway.metrics import GatewayMetrics
from gateway.pubsub import RedisSubscriber
from gateway.ratelimit import Limit, RedisRateLimiter
from gateway.tenancy import PrincipalPresence, Tenancy, TenantConnections
from schemas.errors import FeedError

__all__ = ["Gateway", "NotConnectedYet", "Producer", "gateway_of", "in_daemon_thread"]

log = structlog.get_logger("gateway")

T = TypeVar("T")


class Producer(Protocol):
    """What ingest needs from a Kafka producer (``feed.kafka.AsyncProducer``)."""

    async def send_many(
        self,
        topic: str,
        records: Iterable[tuple[bytes, bytes]],
        *,
        timeout: float = 30.0,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> int: ...


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
        self._presence: PrincipalPresence | None = None
        #: The tenant registry's snapshot (``gateway.tenancy``): open once Cassandra is.
        self.tenancy = Tenancy(settings)
        #: Each tenant's reader and notifications (views of the default's), by tenant.
        self._tenant_readers: dict[str, tuple[FeedReader, FeedReader]] = {}
        self._tenant_notifications: dict[str, AsyncNotifyRedis] = {}
        self._tenant_timelines: dict[str, AsyncRedisTimelines] = {}
        self._timelines: AsyncRedisTimelines | None = None
        self._notifications: AsyncNotifyRedis | None = None
        #: The durable notification feeds, once Cassandra is connected.
        self.notify_store: Any = None
        self._limiter: RedisRateLimiter | None = None
        self.connect_limit = Limit(settings.connect_rate, settings.connect_burst)
        self.connect_ip_limit = Limit(settings.connect_ip_rate, settings.connect_ip_burst)
        self._tasks: list[asyncio.Task[None]] = []
        #: Large accounts: actor channels and stream catch-up (gateway.big_accounts).
        self.big_accounts = BigAccounts(self)
        self._closing = False

    # Handlers only run between open() and close(), so these are always set there.
    @property
    def redis(self) -> aioredis.Redis:
        return _opened(self._redis)

    @property
    def hub(self) -> Hub:
        return _opened(self._hub)

    @property
    def presence(self) -> PrincipalPresence:
        """The delivery streams, by principal (``gateway.tenancy``)."""
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

    @property
    def timelines(self) -> AsyncRedisTimelines:
        return _opened(self._timelines)

    @property
    def notifications(self) -> AsyncNotifyRedis:
        return _opened(self._notifications)

    def reader_for(self, tenant: str) -> FeedReader:
        """The tenant's feed reader: the default one's views, with the tenant's timeline cap."""
        reader = self.reader
        known = self.tenancy.peek(tenant)
        if tenant == DEFAULT and (known is None or known.quotas.timeline_max is None):
            return reader  # the default tenant's own cap: the setting
        cap = reader.timeline_max
        if known is not None:
            cap = known.quotas.effective(self.settings).timeline_max
        held = self._tenant_readers.get(tenant)
        if held is None or held[0] is not reader or held[1].timeline_max != cap:
            # built again once Cassandra connected, or when the tenant's cap changed
            held = self._tenant_readers[tenant] = (reader, reader.for_tenant(tenant, cap))
        return held[1]

    def timelines_for(self, tenant: str) -> AsyncRedisTimelines:
        """The tenant's view of the gateway's timelines (large accounts' pushes)."""
        return _tenant_view(self._tenant_timelines, self.timelines, tenant)

    def notifications_for(self, tenant: str) -> AsyncNotifyRedis:
        return _tenant_view(self._tenant_notifications, self.notifications, tenant)

    def tracked(self) -> dict[str, int]:
        """Sizes of the large-account state (:meth:`BigAccounts.tracked`)."""
        return self.big_accounts.tracked()

    async def open(self) -> None:
        s = self.settings
        # One quick question (the gateway serves /healthz and a 503 /readyz while Redis is down,
        # so it does not wait for Redis to start; a cluster deployment sets FEED_REDIS_CLUSTER).
        if self._redis is None and await asyncio.to_thread(
            redis_connect.cluster_at_start, s, wait_s=0
        ):
            # A Redis Cluster (FEED_REDIS_CLUSTER): the stores cut their calls by slot.
            self._redis = redis_connect.async_client(
                s,
                cluster=True,
                max_connections=512,  # per node
                socket_connect_timeout=5,
                socket_timeout=10,
                socket_keepalive=True,
            )
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
        self.tenancy.connections = TenantConnections(self._redis)
        self._timelines = AsyncRedisTimelines(self._redis)
        self._limiter = RedisRateLimiter(self._redis)
        self._notifications = AsyncNotifyRedis(
            self._redis,
            lambda: self.notify_store,
            needs_durable=self.uses_cassandra,
            ttl_s=s.notify_ttl_s,
        )
        self._presence = PrincipalPresence(AsyncRedisPresence(self._redis, ttl_s=s.resume_window_s))
        self._hub = Hub(
            RedisSubscriber(self._redis),
            self._presence,
            refresh_interval_s=max(1.0, s.resume_window_s / 3),
            received=self.metrics.stages,
        )
        big = self.big_accounts
        big.open()
        self._hub.on_actor_message = big.on_actor_message
        self._hub.on_following_changed = big.on_following_changed
        self._hub.on_resubscribed = big.on_resubscribed
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
                self.notify_store = await asyncio.to_thread(
                    _notify_store, self.cassandra, s.cassandra_keyspace
                )
            self._reader = self._make_reader(history)
            if self.uses_cassandra and self.cassandra is None:
                self._tasks.append(asyncio.create_task(self._connect_cassandra()))
        if self.cassandra is not None:
            self._start_tenancy()
        self._tasks.append(asyncio.create_task(self.tenancy.renew_leases(), name="leases"))
        self.metrics.watch_gc()
        self._tasks.append(asyncio.create_task(self.metrics.watch_loop(), name="loop-lag"))
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
        for task in self._tasks:
            task.cancel()
        await self.big_accounts.stop()
        await self.tenancy.stop()
        for task in self._tasks:
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

    def _make_reader(self, history: Any) -> FeedReader:
        from feed.graph_cassandra import CassandraFollowGraph

        s = self.settings
        graph = None
        if history is not None:
            graph = CassandraFollowGraph(history.session, s.cassandra_keyspace)
        return FeedReader(
            self.timelines,
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
                session, history, notify_store = await in_daemon_thread(
                    self._open_cassandra, on_orphan=lambda opened: opened[0].cluster.shutdown()
                )
            except Exception as exc:
                log.warning("cassandra_unavailable", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self.cassandra = session
            self._owns_cassandra = True
            self.notify_store = notify_store
            self._reader = self._make_reader(history)
            self._start_tenancy()
            log.info("cassandra_connected")
            return

    def _start_tenancy(self) -> None:
        session, s = self.cassandra, self.settings

        def open_store() -> Any:
            from feed.tenants_cassandra import CassandraTenants  # the driver: only when needed

            return CassandraTenants(
                session, s.cassandra_keyspace, rotate_grace_s=s.tenant_rotate_grace_s
            )

        self.tenancy.start(open_store)

    def _open_cassandra(self) -> tuple[Any, Any, Any]:
        from feed.stores import open_cassandra  # the driver is slow to import; only when needed

        session = open_cassandra(self.settings)
        keyspace = self.settings.cassandra_keyspace
        try:
            return session, _history(session, keyspace), _notify_store(session, keyspace)
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
            raise NotConnectedYet("not connected yet")
        await asyncio.to_thread(session.execute, "SELECT now() FROM system.local", timeout=2.0)


_View = TypeVar("_View", bound=keys.KeyspaceView)


def _tenant_view(views: dict[str, _View], store: _View, tenant: str) -> _View:
    """``store`` for ``tenant``: itself for the default tenant, else its view, built once."""
    if tenant == DEFAULT:
        return store
    view = views.get(tenant)
    if view is None:
        view = views[tenant] = store.for_tenant(tenant)
    return view


def _opened(value: T | None) -> T:
    if value is None:
        raise RuntimeError("the gateway's resources are not open (lifespan not running)")
    return value


def _history(session: Any, keyspace: str) -> Any:
    from feed.history_cassandra import CassandraHistory

    return CassandraHistory(session, keyspace)


def _notify_store(session: Any, keyspace: str) -> Any:
    from feed.notify_cassandra import CassandraNotifyStore

    return CassandraNotifyStore(session, keyspace)


def _kafka_probe(producer: Any) -> Callable[..., Any] | None:
    """The producer's ``list_topics`` (``feed.kafka.AsyncProducer`` has one, as has a
    confluent-kafka ``Producer``), or None for a producer that cannot answer metadata."""
    probe = getattr(producer, "list_topics", None)
    return probe if callable(probe) else None


class NotConnectedYet(FeedError, RuntimeError):
    """A dependency this process connects to in the background is not connected yet."""


async def _timed(name: str, check: Callable[[], Any]) -> dict[str, Any]:
    """Run one readiness check. What failed is answered in one word (``unreachable``,
    ``timeout`` or ``connecting``): the exception's text, which names hosts and ports, goes to
    the log only (``/readyz`` needs no authentication)."""
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(), 3.0)
    except Exception as exc:
        if isinstance(exc, NotConnectedYet):
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


async def in_daemon_thread(
    fn: Callable[[], T], *, on_orphan: Callable[[T], Any] | None = None
) -> T:
    """Run blocking ``fn`` in a daemon thread (it must not hold the process open at exit).

    If the caller was cancelled or the loop is gone when ``fn`` returns, ``on_orphan`` releases
    the result (off the event loop).

    Why not ``asyncio.to_thread`` / ``loop.run_in_executor``: their pool's threads are not
    daemons. A connect to an unreachable Cassandra can block for the driver's whole timeout;
    in the default executor it would hold ``asyncio.run``'s shutdown (which waits for the
    executor's threads) and the interpreter's exit (which joins them), so a gateway told to stop
    while Cassandra is down would not stop within ``FEED_DRAIN_S``. And a future of theirs that
    the caller gave up on (the lifespan cancelled the connect) drops its result: a session
    connected just then would never be shut down. Here the thread is a daemon and an orphaned
    result is released by ``on_orphan``.
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


def gateway_of(conn: HTTPConnection) -> Gateway:
    """The resources of the app serving ``conn``."""
    gateway: Gateway = conn.app.state.gateway
    return gateway
