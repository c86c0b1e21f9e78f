"""The store implementations a suite runs against, behind one shape (:class:`Backend`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from cassandra.cluster import Session

from feed import keys
from feed.delivery_redis import AsyncRedisPresence
from feed.graph_cassandra import CassandraFollowGraph
from feed.graph_versions_redis import RedisGraphVersions
from feed.history_cassandra import CassandraHistory
from feed.interfaces import (
    AsyncTimelines,
    DeliveryStream,
    FollowGraph,
    GraphVersions,
    History,
    Subscriber,
    Timelines,
)
from feed.memory import (
    MemoryAsyncTimelines,
    MemoryDeliveryStream,
    MemoryFollowGraph,
    MemoryGraphVersions,
    MemoryHistory,
    MemoryRedis,
    MemoryTimelines,
)
from feed.timelines_redis import AsyncRedisTimelines, RedisTimelines
from gateway.pubsub import RedisSubscriber

__all__ = ["Backend", "memory_backend", "real_backend"]


@dataclass
class Backend:
    """Factories of one implementation's stores, all on the same data (one Redis, one
    Cassandra), and the few hooks the suites need to simulate what servers do on their own."""

    name: str
    timelines: Callable[[int, int, bool], Timelines]  # (timeline_max, stream_history, only_active)
    async_timelines: Callable[[], AsyncTimelines]
    delivery: Callable[[], DeliveryStream]
    versions: Callable[[], GraphVersions]
    subscriber: Callable[[], Subscriber]
    #: Publish a message as any publisher would (the timelines' scripts, the processor).
    publish: Callable[[bytes, bytes], Awaitable[None]]
    #: The store lost a user's presence and delivery stream (a restart, an eviction).
    lose_presence: Callable[[str], None]
    #: The store lost a key (a restart): used for graph versions.
    lose_key: Callable[[str], None]
    history: Callable[[], History]
    graph: Callable[[int], FollowGraph]  # (page_size): one graph per test
    #: The tenant whose names the stores use (``feed.keys.Keyspace``).
    keyspace: keys.Keyspace = keys.DEFAULT


def memory_backend() -> Backend:
    """Fresh in-memory stores (one :class:`feed.memory.MemoryRedis`, one history, one graph)."""
    redis = MemoryRedis()
    history = MemoryHistory()

    async def publish(channel: bytes, message: bytes) -> None:
        redis.notifier.publish(channel, message)

    def lose_presence(user: str) -> None:
        with redis.lock:
            redis.presence.pop(user, None)
            redis.streams.pop(user, None)

    def lose_key(name: str) -> None:
        with redis.lock:
            redis.versions.pop(name, None)

    return Backend(
        name="memory",
        timelines=lambda cap, hist, only_active: MemoryTimelines(
            redis, timeline_max=cap, stream_history=hist, only_active=only_active
        ),
        async_timelines=lambda: MemoryAsyncTimelines(redis),
        delivery=lambda: MemoryDeliveryStream(redis),
        versions=lambda: MemoryGraphVersions(redis),
        subscriber=lambda: redis.notifier,
        publish=publish,
        lose_presence=lose_presence,
        lose_key=lose_key,
        history=lambda: history,
        graph=lambda page_size: MemoryFollowGraph(page_size=page_size),
    )


def real_backend(
    client: redis.Redis,
    async_client: aioredis.Redis,
    session: Session,
    keyspace: str,
    tenant: str = keys.DEFAULT_TENANT,
) -> Backend:
    """The production stores on the test session's Redis and Cassandra, for ``tenant``."""
    history = CassandraHistory(session, keyspace).for_tenant(tenant)
    names = keys.Keyspace.for_tenant(tenant)

    async def publish(channel: bytes, message: bytes) -> None:
        if isinstance(async_client, aioredis.RedisCluster):
            await async_client.spublish(channel, message)  # sharded, as the stores publish
        else:
            await async_client.publish(channel, message)

    def lose_presence(user: str) -> None:
        client.delete(names.presence(user), names.deliveries(user))

    def lose_key(name: str) -> None:
        client.delete(name)

    return Backend(
        name="redis+cassandra",
        timelines=lambda cap, hist, only_active: RedisTimelines(
            client,
            timeline_max=cap,
            stream_history=hist,
            body_ttl_s=600,
            only_active=only_active,
        ).for_tenant(tenant),
        async_timelines=lambda: AsyncRedisTimelines(async_client).for_tenant(tenant),
        delivery=lambda: AsyncRedisPresence(async_client, ttl_s=600).for_tenant(tenant),
        versions=lambda: RedisGraphVersions(client).for_tenant(tenant),
        subscriber=lambda: RedisSubscriber(async_client),
        publish=publish,
        lose_presence=lose_presence,
        lose_key=lose_key,
        history=lambda: history,
        graph=lambda page_size: CassandraFollowGraph(
            session, keyspace, page_size=page_size
        ).for_tenant(tenant),
        keyspace=names,
    )
