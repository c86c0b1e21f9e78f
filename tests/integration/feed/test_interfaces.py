"""The Redis and Cassandra stores meet the shared suite of every store protocol: the same checks
the in-memory stores (``feed.memory``) meet in ``tests/unit/feed/test_memory.py``, for the
default tenant and for another (``for_tenant``). Two tenants' stores given the same user and
activity ids share nothing: not a key, not a partition, not a frame."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
import redis
import redis.asyncio as aioredis

from feed import keys
from feed.cursor import order_key
from feed.interfaces import HistoryRecord, Insert
from feed.settings import Settings
from feed.timelines_redis import RedisTimelines
from tests.support.backends import Backend, real_backend
from tests.support.suites.async_timelines import AsyncTimelinesSuite
from tests.support.suites.delivery import DeliveryStreamSuite
from tests.support.suites.follow_graph import FollowGraphSuite
from tests.support.suites.graph_versions import GraphVersionsSuite
from tests.support.suites.history import HistorySuite
from tests.support.suites.subscriber import SubscriberSuite
from tests.support.suites.timelines import TimelinesSuite

#: The default tenant, and another (``for_tenant``: its keys prefixed, its partitions scoped).
TENANTS = ["default", "acme"]


@contextlib.asynccontextmanager
async def _stores(
    redis_client: redis.Redis, cassandra: Any, settings: Settings, tenant: str
) -> AsyncIterator[Backend]:
    async_client = aioredis.Redis.from_url(settings.redis_url)
    keyspace = settings.cassandra_keyspace
    try:
        yield real_backend(redis_client, async_client, cassandra, keyspace, tenant)
    finally:
        await async_client.aclose()


@pytest.fixture(params=TENANTS)
async def backend(
    request: pytest.FixtureRequest, redis_client: redis.Redis, cassandra: Any, settings: Settings
) -> AsyncIterator[Backend]:
    async with _stores(redis_client, cassandra, settings, request.param) as stores:
        yield stores


class TestTimelines(TimelinesSuite):
    pass


class TestAsyncTimelines(AsyncTimelinesSuite):
    pass


class TestDeliveryStream(DeliveryStreamSuite):
    pass


class TestHistory(HistorySuite):
    pass


class TestFollowGraph(FollowGraphSuite):
    pass


class TestGraphVersions(GraphVersionsSuite):
    pass


class TestSubscriber(SubscriberSuite):
    pass


TENANT = TENANTS[1]


def _body(activity_id: str, who: str) -> bytes:
    return msgspec.json.encode({"id": activity_id, "who": who})


async def test_two_tenants_with_the_same_ids_share_nothing(
    redis_client: redis.Redis, cassandra: Any, settings: Settings, ids: Callable[[str], str]
) -> None:
    """Every store, written by both tenants with the same user and activity ids: each reads
    back its own writes only, and the tenant's Redis keys all carry its prefix."""
    async with (
        _stores(redis_client, cassandra, settings, TENANT) as mine,
        _stores(redis_client, cassandra, settings, "default") as theirs,
    ):
        await _share_nothing(mine, theirs, redis_client, ids)


async def _share_nothing(
    mine: Backend, theirs: Backend, redis_client: redis.Redis, ids: Callable[[str], str]
) -> None:
    u1, u2, a, actor = ids("u1"), ids("u2"), ids("a"), ids("actor")
    sides = {"acme": mine, "default": theirs}

    # online in both tenants: each gets its own delivery stream and frames
    presence = {name: await side.delivery().attach(u1) for name, side in sides.items()}
    for name, side in sides.items():
        t = side.timelines(100, 100, False)
        assert t.insert([Insert(order_key(5, a), a, _body(a, name), [u1, u2])]) == (2, 1)
        h = side.history()
        h.put_activities([HistoryRecord(a, actor, 5, _body(a, name), [u1])], new=[a])
        h.put_deliveries([HistoryRecord(a, actor, 5, _body(a, name), [u1])])
    only_mine = ids("only-mine")
    mine.history().mark_big(only_mine)
    mine.graph(100).follow(u1, u2, datetime.now(UTC))

    for name, side in sides.items():
        page = side.timelines(100, 100, False).page(u1, None, 10)
        assert list(page.bodies.values()) == [_body(a, name)], name
        frames = await side.delivery().frames_after(u1, presence[name].seq, 10)
        assert [msgspec.json.decode(f)["activity"] for _, f in frames] == [
            msgspec.json.decode(_body(a, name))
        ], name
        h = side.history()
        stored = h.stored(a)
        assert stored is not None and stored.body == _body(a, name), name
        assert h.bodies([a]) == {a: _body(a, name)}, name
        assert h.page_timeline(u1, None, 10) == [order_key(5, a)], name
        assert h.outbox(actor, 10) == [order_key(5, a)], name
        assert [u for p in h.recipients(a) for u in p] == [u1], name
    assert presence["acme"].epoch != presence["default"].epoch
    assert only_mine in mine.history().big_accounts()
    assert only_mine not in theirs.history().big_accounts()
    assert mine.graph(100).is_following(u1, u2)
    assert not theirs.graph(100).is_following(u1, u2)
    assert [f for p in mine.graph(100).followers(u2) for f in p] == [u1]
    assert [f for p in theirs.graph(100).followers(u2) for f in p] == []

    # a delete in one tenant leaves the other's activity whole
    mine.timelines(100, 100, False).mark_deleted([a], 60)
    mine.history().mark_deleted(a, actor, 5)
    assert mine.history().activity(a) is None
    assert theirs.history().activity(a) == (actor, 5, _body(a, "default"))

    # every key of the tenant that names these ids carries its prefix; none of the default's do
    for name in (u1, u2, a):
        found = {k.decode() for k in redis_client.scan_iter(match=f"*{name}*", count=1000)}
        acme = {k for k in found if k.startswith(keys.Keyspace.for_tenant(TENANT).prefix)}
        assert acme, name
        assert all(not k.startswith("t:") for k in found - acme), name


def test_a_tenants_timeline_cap_is_its_own(
    redis_client: redis.Redis, ids: Callable[[str], str]
) -> None:
    """``for_tenant(timeline_max=)``: the tenant's hot timelines keep its cap; the default's
    keep the store's."""
    store = RedisTimelines(redis_client, timeline_max=8, stream_history=10, body_ttl_s=60)
    capped = store.for_tenant(TENANT, timeline_max=5)
    user = ids("u")
    for t in (store, capped):
        t.insert(
            [Insert(order_key(n, f"{user}-{n}"), f"{user}-{n}", b"{}", [user]) for n in range(10)]
        )
    assert capped.size(user) == 5
    assert store.size(user) == 8
    assert capped.page(user, None, 10).members == [
        order_key(n, f"{user}-{n}") for n in range(9, 4, -1)
    ]
