"""Notification feeds on a real Redis Cluster (3 masters) and Cassandra: a worker batch that
reaches users in many slots is cut into one-slot calls, and every user's feed (read by the
gateway's side, then again from Cassandra alone) equals the reference model's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from feed import keys
from feed.interfaces import Notify, Unnotify
from feed.notify import MemoryNotifications
from feed.notify_cassandra import CassandraNotifyStore
from feed.notify_redis import AsyncNotifyRedis, NotifyRedis
from feed.settings import Settings
from feed.timelines_cluster import slot_of
from tests.support.notify import LIMITS, S, read_all


def test_a_batch_across_slots_matches_the_model(
    redis_cluster: Any, cassandra: Any, settings: Settings, ids: Callable[[str], str]
) -> None:
    client = redis.RedisCluster.from_url(redis_cluster.url)
    durable = CassandraNotifyStore(cassandra, settings.cassandra_keyspace)
    worker = NotifyRedis(client, durable, limits=LIMITS, ttl_s=600)
    model = MemoryNotifications(LIMITS)
    users = [ids(f"n{u}") for u in range(40)]
    assert len({slot_of(keys.channel(u)) for u in users}) > 10
    base = 1_700_000_000 * S
    ops: list[Any] = []
    for n, user in enumerate(users):
        for k in range(n % 4 + 1):
            actor = ("ann", "bob", "cy")[k % 3]
            ops.append(Notify(user, ids(f"a{k}"), actor, base + k * S, "Like", "post:1"))
    ops.append(Unnotify(users[3], ops[7].activity_id))
    worker.apply(ops)
    model.apply(ops)
    worker.apply(ops[:20])  # a replay of part of the batch, as a retried batch would
    model.apply(ops[:20])
    pending = [client.llen(keys.notify_pending(u)) for u in users]
    assert pending == [0] * len(users)  # every mutation confirmed written to Cassandra

    async def read() -> None:
        aclient = aioredis.RedisCluster.from_url(redis_cluster.url)
        gateway = AsyncNotifyRedis(aclient, lambda: durable, needs_durable=True, ttl_s=600)
        try:
            for user in users:
                assert await read_all(gateway, user) == await read_all(model, user), user
            for user in users[::2]:  # Redis lost them: loaded from Cassandra
                await aclient.delete(*keys.notify_keys(user)[:4])
                assert await read_all(gateway, user) == await read_all(model, user), user
        finally:
            await aclient.aclose()

    try:
        asyncio.run(read())
    finally:
        client.close()
