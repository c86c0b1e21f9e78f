"""Follower-list caches across a real Redis restart: a version is never repeated, so a cache
never takes an old list for current (a private Redis, restarted for real; Cassandra is the
session's)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from fanout.followers import FollowerCache
from feed import keys
from feed.graph_cassandra import CassandraFollowGraph
from feed.graph_versions_redis import RedisGraphVersions
from infra import RedisServer
from schemas.follow import FollowEvent
from tests.support.processor import real_processor

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


def _follow(follower: str, followee: str, second: int) -> FollowEvent:
    return FollowEvent("follow", follower, followee, T0 + timedelta(seconds=second))


def test_a_cached_follower_list_is_reloaded_after_redis_lost_its_versions(
    private_redis: RedisServer, cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    """The worker under test caches two actors' follower lists; another worker applies the
    follows. After Redis restarts (empty), a follow can bring a version back to a value the
    cache already holds (the first change again), and an actor that had no version has none
    again: either way the cache must reload, not serve the list it read before."""
    client = redis.Redis.from_url(private_redis.url, socket_timeout=5)
    graph = CassandraFollowGraph(cassandra, settings.cassandra_keyspace)
    cache = FollowerCache(graph, RedisGraphVersions(client))
    other = real_processor(
        client,
        cassandra,
        settings.cassandra_keyspace,
        follow_backfill=0,
        timeline_max=10,
        stream_history=10,
        body_ttl_s=60,
    )
    a, b, f1, f2, f3 = ids("a"), ids("b"), ids("f1"), ids("f2"), ids("f3")
    try:
        other.apply([(0, _follow(f1, a, 1))])
        assert cache.get_many([a, b]) == {a: (f1,), b: ()}  # a: one change; b: none yet
        other.apply([(0, _follow(f3, b, 2))])  # b changes; the cache does not look at b now

        private_redis.kill()
        private_redis.restart()
        client.connection_pool.disconnect()  # the worker reconnects to the empty Redis
        assert client.get(keys.graph_version(a)) is None

        other.apply([(0, _follow(f2, a, 3))])  # a's first change, again
        version = client.get(keys.graph_version(a))
        assert version is not None and version.split(b".")[0] == b"1"  # <changes>.<token>
        assert cache.get_many([a, b]) == {a: tuple(sorted((f1, f2))), b: (f3,)}
    finally:
        other.close()
        client.close()
