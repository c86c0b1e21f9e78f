"""The fan-out Processor on the real Redis and Cassandra (no Kafka: records are handed in)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from fanout.followers import FollowerCache
from fanout.processor import Processor, RejectedRecord
from feed import keys
from feed.delivery_redis import AsyncRedisPresence
from feed.graph_cassandra import CassandraFollowGraph
from feed.graph_versions_redis import RedisGraphVersions
from feed.history_cassandra import CassandraHistory
from feed.timelines_redis import RedisTimelines
from tests.support.events import act, delete, follow
from tests.support.processor import real_processor, timeline


@pytest.fixture
def processor(redis_client: Any, cassandra: Any, settings: Any) -> Iterator[Processor]:
    p = real_processor(redis_client, cassandra, settings.cassandra_keyspace)
    yield p
    p.close()


def test_fan_out_to_followers_and_to(processor: Processor, ids: Callable[[str], str]) -> None:
    u1, u2, u3, u4, u9 = (ids(n) for n in ("u1", "u2", "u3", "u4", "u9"))
    processor.apply([(0, follow(u2, u1, 1)), (1, follow(u3, u1, 2))])
    stats = processor.apply([(0, act(ids("a"), u1, 1, to=[u9, u2]))])
    assert stats.inserted == 3 and stats.history_rows == 3
    assert len(timeline(processor, u2)) == len(timeline(processor, u3)) == 1
    assert len(timeline(processor, u9)) == 1
    assert timeline(processor, u4) == []


def test_replay_changes_nothing(processor: Processor, ids: Callable[[str], str]) -> None:
    u1, u2, a = ids("u1"), ids("u2"), ids("a")
    processor.apply([(0, follow(u2, u1, 1))])
    first = processor.apply([(0, act(a, u1, 1)), (1, act(a, u1, 1))])
    again = processor.apply([(0, act(a, u1, 1))])
    assert first.inserted == 1 and again.inserted == 0 and again.pushed == 0
    assert timeline(processor, u2) == [a]


def test_delete_removes_everywhere_and_stays_deleted(
    processor: Processor, ids: Callable[[str], str]
) -> None:
    u1, u2, u3, a = ids("u1"), ids("u2"), ids("u3"), ids("a")
    processor.apply([(0, follow(u2, u1, 1)), (1, act(a, u1, 1, to=[u3]))])
    processor.apply([(0, delete(ids("d"), u1, a))])
    assert timeline(processor, u2) == [] and timeline(processor, u3) == []
    assert processor._history.activity(a) is None
    # A replay of the create after the delete does not resurrect it.
    processor.apply([(0, act(a, u1, 1))])
    assert timeline(processor, u2) == []


def test_delete_of_someone_elses_activity_is_rejected(
    processor: Processor, ids: Callable[[str], str]
) -> None:
    u1, u2, a = ids("u1"), ids("u2"), ids("a")
    processor.apply([(0, follow(u2, u1, 1)), (1, act(a, u1, 1))])
    stats = processor.apply([(5, delete(ids("d"), u2, a))])
    assert [(i, r.code) for i, r in stats.rejected] == [(5, "forbidden")]
    assert isinstance(stats.rejected[0][1], RejectedRecord)
    assert timeline(processor, u2) == [a]


def test_follow_backfills_and_unfollow_removes(
    processor: Processor, ids: Callable[[str], str]
) -> None:
    u1, u2 = ids("u1"), ids("u2")
    posts = [ids(f"a{n}") for n in range(5)]
    processor.apply([(n, act(aid, u1, n)) for n, aid in enumerate(posts)])
    processor.apply([(0, follow(u2, u1, 10))])
    assert timeline(processor, u2) == posts[::-1][:3]  # FEED_FOLLOW_BACKFILL = 3
    processor.apply([(0, follow(u2, u1, 20, "unfollow"))])
    assert timeline(processor, u2) == []


def test_follow_events_applied_out_of_order(
    processor: Processor, ids: Callable[[str], str]
) -> None:
    u1, u2, a = ids("u1"), ids("u2"), ids("a")
    processor.apply([(0, act(a, u1, 1))])
    # The unfollow happened later but is applied first: the follow must not win.
    processor.apply([(0, follow(u2, u1, 20, "unfollow"))])
    processor.apply([(0, follow(u2, u1, 10))])
    assert timeline(processor, u2) == []
    assert not processor._graph.is_following(u2, u1)


def test_follower_cache_sees_follows_from_other_workers(
    processor: Processor,
    redis_client: Any,
    cassandra: Any,
    settings: Any,
    ids: Callable[[str], str],
) -> None:
    u1, u2, u3 = ids("u1"), ids("u2"), ids("u3")
    processor.apply([(0, follow(u2, u1, 1)), (1, act(ids("a1"), u1, 1))])
    # Another worker (its own Processor and cache) applies a follow.
    other = real_processor(
        redis_client, cassandra, settings.cassandra_keyspace, follow_backfill=0, body_ttl_s=60
    )
    other.apply([(0, follow(u3, u1, 2))])
    other.close()
    processor.apply([(0, act(ids("b1"), u1, 2))])
    assert len(timeline(processor, u3)) == 1


def test_deferred_redis_write_completes_in_order_and_deletes_wait_for_it(
    processor: Processor, ids: Callable[[str], str]
) -> None:
    """``apply(defer=True)`` returns with the Redis write possibly in flight; ``complete``
    counts it. A later delete of the same activity waits for that write, so it cannot be
    resurrected by it."""
    u1, u2, a, b = ids("u1"), ids("u2"), ids("a"), ids("b")
    processor.apply([(0, follow(u2, u1, 1))])
    first = processor.apply([(0, act(a, u1, 1)), (1, act(b, u1, 2))], defer=True)
    assert first.history_rows == 2 and len(first.deferred) == 1
    deleted = processor.apply([(0, delete(ids("d"), u1, a))], defer=True)
    assert deleted.deletes == 1 and not deleted.deferred
    assert processor.complete(first).inserted == 2 and not first.deferred
    assert timeline(processor, u2) == [b]


class _FlakyTimelines(RedisTimelines):
    """The real Redis timelines, whose first ``insert`` fails as if the connection dropped."""

    failures = 1

    def insert(self, inserts, **kwargs):  # type: ignore[no-untyped-def]
        if self.failures:
            self.failures -= 1
            raise redis.exceptions.ConnectionError("connection dropped (injected)")
        return super().insert(inserts, **kwargs)


def test_a_deferred_write_that_failed_is_run_again_by_complete(
    redis_client: Any, cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    graph = CassandraFollowGraph(cassandra, settings.cassandra_keyspace)
    timelines = _FlakyTimelines(redis_client, timeline_max=50, stream_history=100, body_ttl_s=600)
    p = Processor(
        timelines=timelines,
        history=CassandraHistory(cassandra, settings.cassandra_keyspace),
        graph=graph,
        versions=RedisGraphVersions(redis_client),
        followers=FollowerCache(graph, RedisGraphVersions(redis_client)),
    )
    try:
        u1, u2, a = ids("u1"), ids("u2"), ids("a")
        p.apply([(0, follow(u2, u1, 1))])
        timelines.failures = 2  # the background run and the first in-line retry
        stats = p.apply([(0, act(a, u1, 1))], defer=True)
        with pytest.raises(redis.exceptions.ConnectionError):
            p.complete(stats)
        assert len(stats.deferred) == 1  # still pending: the caller retries
        assert p.complete(stats).inserted == 1 and not stats.deferred
        assert timeline(p, u2) == [a]
    finally:
        p.close()


def test_without_history_rows_recipients_follow_the_redis_write_and_deletes_still_reach_all(
    redis_client: Any, cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    """With per-follower history off, the recipient list is written after the Redis write (one
    Cassandra round trip less before delivery); a delete in the next batch still finds it."""
    graph = CassandraFollowGraph(cassandra, settings.cassandra_keyspace)
    history = CassandraHistory(cassandra, settings.cassandra_keyspace)
    p = Processor(
        timelines=RedisTimelines(redis_client, timeline_max=50, stream_history=100, body_ttl_s=600),
        history=history,
        graph=graph,
        versions=RedisGraphVersions(redis_client),
        followers=FollowerCache(graph, RedisGraphVersions(redis_client)),
        history_timelines=False,
    )
    try:
        u1, u2, u3, a = ids("u1"), ids("u2"), ids("u3"), ids("a")
        p.apply([(0, follow(u2, u1, 1)), (1, follow(u3, u1, 2))])
        stats = p.apply([(0, act(a, u1, 1))], defer=True)
        assert stats.history_rows == 0
        p.complete(stats)
        assert sorted(u for users in history.recipients(a) for u in users) == sorted([u2, u3])
        assert [m.split(":", 1)[1] for m in p._timelines.page(u2, None, 10).members] == [a]
        p.apply([(0, delete(ids("d"), u1, a))])
        assert p._timelines.page(u2, None, 10).members == []
        assert p._timelines.page(u3, None, 10).members == []
    finally:
        p.close()


def _attach(settings: Any, user: str) -> None:
    async def attach() -> None:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            await AsyncRedisPresence(client, ttl_s=60).attach(user)
        finally:
            await client.aclose()

    asyncio.run(attach())


def _hybrid(redis_client: Any, cassandra: Any, settings: Any, limit: int) -> Processor:
    """A Processor whose accounts with more than ``limit`` followers are fanned out at read time."""
    return real_processor(redis_client, cassandra, settings.cassandra_keyspace, fanout_limit=limit)


def test_a_follow_of_a_big_account_removes_nothing_the_follower_has(
    redis_client: Any, cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    """u2 got the star's first activity by fan-out, before the star became big. A follow of the
    star applied again (a replay, or a second follow) must leave it in u2's timeline, with no
    ``removed`` frame; only an unfollow removes it."""
    star, fan, u3, u4 = ids("star"), ids("fan"), ids("u3"), ids("u4")
    first, later = ids("first"), ids("later")
    p = _hybrid(redis_client, cassandra, settings, limit=2)
    _attach(settings, fan)  # online: a removal would be pushed to it
    try:
        p.apply([(0, follow(fan, star, 1)), (1, act(first, star, 1))])
        assert timeline(p, fan) == [first]
        p.apply([(0, follow(u3, star, 2)), (1, follow(u4, star, 3)), (2, act(later, star, 2))])
        assert redis_client.sismember(keys.big_accounts, star)  # 3 followers > 2
        assert timeline(p, fan) == [first]  # the later one is merged at read time
        stream_before = redis_client.xlen(keys.deliveries(fan))
        assert stream_before >= 1  # the first activity was pushed
        p.apply([(0, follow(fan, star, 1))])  # the same follow again
        p.apply([(0, follow(fan, star, 4))])  # a later follow of the same pair
        assert timeline(p, fan) == [first]
        assert redis_client.xlen(keys.deliveries(fan)) == stream_before
        p.apply([(0, follow(fan, star, 5, "unfollow"))])
        assert timeline(p, fan) == []
        assert redis_client.xlen(keys.deliveries(fan)) == stream_before + 1  # `removed`
    finally:
        p.close()
