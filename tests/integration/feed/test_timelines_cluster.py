"""The workers' timeline writes on a real Redis Cluster (3 masters): the same outcome as on one
Redis, a delete that lands mid-write taken back, and a lost script cache."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import redis
import redis.asyncio as aioredis

from feed import keys, timelines_cluster
from feed.cursor import order_key
from feed.delivery_redis import AsyncRedisPresence
from feed.interfaces import Insert
from feed.timelines_redis import RedisTimelines


@pytest.fixture
def cluster_client(redis_cluster: Any) -> Iterator[redis.RedisCluster]:
    client = redis.RedisCluster.from_url(redis_cluster.url)
    yield client
    client.close()


def _timelines(client: Any) -> RedisTimelines:
    return RedisTimelines(client, timeline_max=50, stream_history=100, body_ttl_s=600)


def _insert(ts: int, aid: str, users: list[str]) -> Insert:
    return Insert(order_key(ts, aid), aid, msgspec.json.encode({"id": aid, "n": ts}), users)


def _attach(url: str, cluster: bool, users: list[str]) -> None:
    """Mark ``users`` online through the gateway's presence store."""

    async def run() -> None:
        client: Any = (aioredis.RedisCluster if cluster else aioredis.Redis).from_url(url)
        try:
            presence = AsyncRedisPresence(client, ttl_s=600)
            for user in users:
                await presence.attach(user)
        finally:
            await client.aclose()

    asyncio.run(run())


def _flush_scripts(client: redis.RedisCluster) -> None:
    for node in client.get_nodes():
        client.execute_command("SCRIPT", "FLUSH", target_nodes=node)


async def _read_frames(url: str, cluster: bool, users: list[str]) -> dict[str, list[Any]]:
    """Each user's delivery stream, decoded, cursors left out (they hold a random epoch)."""
    client: Any = (aioredis.RedisCluster if cluster else aioredis.Redis).from_url(url)
    try:
        presence = AsyncRedisPresence(client, ttl_s=600)
        out = {}
        for user in users:
            frames = await presence.frames_after(user, 0, 100)
            decoded = [msgspec.json.decode(f) for _, f in frames]
            for frame in decoded:
                frame.pop("cursor")
            out[user] = decoded
        return out
    finally:
        await client.aclose()


def test_fanout_across_slots_is_what_one_redis_does(
    cluster_client: redis.RedisCluster,
    redis_client: redis.Redis,
    redis_cluster: Any,
    settings: Any,
    ids: Callable[[str], str],
) -> None:
    users = [ids(f"f{n}") for n in range(300)]
    online = users[::15]
    inserts = [
        _insert(10, ids("a"), users[:200]),
        _insert(12, ids("b"), users[50:]),
        _insert(11, ids("c"), online),
    ]
    outcome = {}
    for name, client, url, cluster in (
        ("one", redis_client, settings.redis_url, False),
        ("cluster", cluster_client, redis_cluster.url, True),
    ):
        _attach(url, cluster, online)
        totals = _timelines(client).insert(inserts)
        pages = {u: _timelines(client).page(u, None, 10) for u in users}
        frames = asyncio.run(_read_frames(url, cluster, online))
        outcome[name] = (totals, pages, frames)
    assert outcome["cluster"] == outcome["one"]
    totals, pages, frames = outcome["cluster"]
    assert totals == (200 + 250 + len(online), sum(len(f) for f in frames.values()))
    assert all(len(f) >= 1 for f in frames.values())


def test_a_delete_landing_mid_write_is_taken_back(
    cluster_client: redis.RedisCluster,
    redis_cluster: Any,
    ids: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The delete sets its marker after the writer's first look and before its second: the
    writer takes back what it wrote (and tells the online user), and drops the body."""
    t = _timelines(cluster_client)
    online, offline, aid = ids("on"), ids("off"), ids("a")
    _attach(redis_cluster.url, True, [online])
    real = timelines_cluster.deleted_now
    looks: list[set[str]] = []

    def deleted_now(cluster: Any, activity_ids: Any) -> set[str]:
        if looks:  # the second look: the delete has landed meanwhile
            t.mark_deleted([aid], 600)
        looks.append(real(cluster, activity_ids))
        return looks[-1]

    monkeypatch.setattr(timelines_cluster, "deleted_now", deleted_now)
    t.insert([_insert(5, aid, [online, offline])])
    assert looks == [set(), {aid}]
    assert t.page(online, None, 10).members == [] and t.page(offline, None, 10).members == []
    assert cluster_client.exists(keys.body(aid)) == 0
    frames = asyncio.run(_read_frames(redis_cluster.url, True, [online]))[online]
    assert [f["type"] for f in frames] == ["activity", "removed"]


def test_a_lost_script_cache_is_loaded_again(
    cluster_client: redis.RedisCluster, ids: Callable[[str], str]
) -> None:
    t = _timelines(cluster_client)
    users = [ids(f"u{n}") for n in range(40)]
    _flush_scripts(cluster_client)
    assert t.insert([_insert(3, ids("a"), users)]) == (40, 0)
    _flush_scripts(cluster_client)
    claims = [(ids(f"x{n}"), "actor") for n in range(30)]
    assert t.claim(claims, 60) == ["actor"] * 30
    assert t.claim([(claims[0][0], "other")], 60) == ["actor"]
