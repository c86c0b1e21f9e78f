"""``FEED_REDIS_CLUSTER``: the clients it opens, and the per-user stores on a real Redis Cluster
(3 masters, ``infra.RedisCluster``): each of their calls stays in one user's slot."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from feed import keys
from feed.delivery_redis import AsyncRedisPresence
from feed.redis_connect import async_client, is_cluster, sync_client
from feed.settings import Settings, SettingsError
from gateway.idempotency import Idempotency
from gateway.ratelimit import Limit, RedisRateLimiter
from tests.support.procs import free_port


def test_auto_asks_the_server(settings: Settings, redis_cluster: Any) -> None:
    assert is_cluster(settings) is False
    on_cluster = dataclasses.replace(settings, redis_url=redis_cluster.url)
    assert is_cluster(on_cluster) is True
    client = sync_client(on_cluster)
    try:
        assert isinstance(client, redis.RedisCluster)
        assert len(client.get_primaries()) == 3
    finally:
        client.close()
    plain = sync_client(settings)
    try:
        assert isinstance(plain, redis.Redis) and plain.ping()
    finally:
        plain.close()


def test_auto_that_cannot_ask_names_the_setting_and_hides_the_password() -> None:
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    unreachable = Settings.from_env({"FEED_REDIS_URL": url})
    with pytest.raises(SettingsError) as info:
        is_cluster(unreachable, timeout_s=0.5)
    assert str(info.value).startswith("FEED_REDIS_CLUSTER: auto could not ask")
    assert "hunter2-secret" not in str(info.value)
    # true and false do not ask
    assert is_cluster(dataclasses.replace(unreachable, redis_cluster="true")) is True
    assert is_cluster(dataclasses.replace(unreachable, redis_cluster="false")) is False


async def test_presence_limits_and_idempotency_on_a_cluster(
    settings: Settings, redis_cluster: Any, ids: Callable[[str], str]
) -> None:
    client = async_client(dataclasses.replace(settings, redis_url=redis_cluster.url))
    try:
        assert isinstance(client, aioredis.RedisCluster)
        users = [ids(f"u{n}") for n in range(12)]
        slots = {redis_cluster_slot(keys.presence(u)) for u in users}
        assert len(slots) > 3  # the users spread over the cluster
        presence = AsyncRedisPresence(client, ttl_s=60)
        attached = {u: await presence.attach(u) for u in users}
        assert all(p.seq == 0 for p in attached.values())
        again = await presence.attach(users[0])
        assert again.epoch == attached[users[0]].epoch  # still online: same stream
        assert await presence.refresh(users) == []
        await client.delete(keys.presence(users[1]))
        assert await presence.refresh(users) == [users[1]]
        assert await presence.frames_after(users[2], 0, 10) == []

        limiter = RedisRateLimiter(client)
        limit = Limit(rate=0.001, burst=2)
        bucket = keys.rate_connect_user(users[3])
        taken = [(await limiter.take(bucket, limit)).allowed for _ in range(3)]
        assert taken == [True, True, False] and limiter.failed_open == 0

        key = ids("key")
        first = Idempotency(client, key, b"{}")
        assert await first.begin() is None
        await first.finish(202, b'{"ok":1}')
        assert await Idempotency(client, key, b"{}").begin() == (202, b'{"ok":1}')
    finally:
        await client.aclose()


def redis_cluster_slot(key: str) -> int:
    from redis.crc import key_slot

    return int(key_slot(key.encode()))
