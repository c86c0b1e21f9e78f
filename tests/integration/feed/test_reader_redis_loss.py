"""Redis losing its data (a restart): rebuilds never let reads trust a partial timeline, online
users keep being written and pushed to, lost presence is reported.

Redis "losing" a user's keys is simulated by deleting them (the session's Redis is shared, so it is
never flushed here; the fault tests restart a private Redis for real).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis

from feed.cursor import order_key
from feed.history_cassandra import CassandraHistory
from feed.interfaces import HistoryRecord
from feed.reader import FeedReader
from feed.timelines_redis import AsyncRedisTimelines


def _lose(redis_client: Any, user: str) -> None:
    redis_client.delete(f"seen:{{{user}}}", f"rb:{{{user}}}", f"tl:{{{user}}}")


async def test_a_rebuild_whose_lease_was_lost_does_not_mark_the_timeline_complete(
    redis_client: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    user = ids("u")
    client = aioredis.Redis.from_url(settings.redis_url)
    timelines = AsyncRedisTimelines(client)
    try:
        assert await timelines.touch(user, 3600, "A") == 1  # rebuild now, lease A
        assert await timelines.touch(user, 3600, "B") == 2  # someone is rebuilding
        _lose(redis_client, user)  # Redis restarted
        assert await timelines.touch(user, 3600, "C") == 1  # a new rebuild, lease C
        assert (
            await timelines.rebuild(user, [], {}, timeline_max=10, body_ttl_s=60, token="A")
            is False
        )
        assert await timelines.touch(user, 3600, "D") == 2  # still not complete
        assert (
            await timelines.rebuild(user, [], {}, timeline_max=10, body_ttl_s=60, token="C") is True
        )
        assert await timelines.touch(user, 3600, "E") == 0  # hot
        # A builder that died: once its lease expires the next touch takes over.
        redis_client.set(f"seen:{{{user}}}", "b", ex=3600)
        assert await timelines.touch(user, 3600, "F") == 1
    finally:
        await client.aclose()


async def test_reader_rebuilds_again_when_redis_lost_the_lease_of_its_rebuild(
    redis_client: Any, cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    user, actor = ids("u"), ids("actor")
    history = CassandraHistory(cassandra, settings.cassandra_keyspace)

    def write(n: int) -> str:
        aid = f"{actor}-{n}"
        record = HistoryRecord(aid, actor, 1_000 + n, msgspec.json.encode({"id": aid}), [user])
        history.put_activities([record])
        history.put_deliveries([record])
        return aid

    class Paused(CassandraHistory):
        """The first rebuild reads Cassandra, then stalls until the test lets it finish."""

        def __init__(self) -> None:
            super().__init__(cassandra, settings.cassandra_keyspace)
            self.read = threading.Event()
            self.go_on = threading.Event()

        def page_timeline(self, user: str, before: str | None, limit: int) -> list[str]:
            members = super().page_timeline(user, before, limit)
            if not self.read.is_set():
                self.read.set()
                assert self.go_on.wait(10)
            return members

    first = [write(n) for n in range(3)]
    paused = Paused()
    client = aioredis.Redis.from_url(settings.redis_url)
    reader = FeedReader(
        AsyncRedisTimelines(client), paused, body_ttl_s=60, active_ttl_s=3600, timeline_max=50
    )
    try:
        assert await reader.touch(user) is False  # a rebuild starts...
        assert await asyncio.to_thread(paused.read.wait, 10)  # ...and has read Cassandra
        _lose(redis_client, user)  # Redis restarted under it
        late = write(3)  # fan-out skipped Redis for this one: the user had no marker
        assert await reader.touch(user) is False  # a new lease: this process rebuilds again
        paused.go_on.set()
        await reader.wait_rebuilds()
        assert await reader.touch(user) is True
        members = redis_client.zrevrangebylex(f"tl:{{{user}}}", "+", "-")
        expected = [order_key(1_000 + n, aid) for n, aid in enumerate([*first, late])]
        assert [m.decode() for m in members] == expected[::-1]
        page = await reader.page(user, None, 10)
        assert [msgspec.json.decode(i.activity)["id"] for i in page.items] == [late, *first[::-1]]
    finally:
        await client.aclose()


async def test_an_online_user_without_an_active_marker_is_still_written_and_pushed(
    redis_client: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    from feed.delivery_redis import AsyncRedisPresence
    from feed.interfaces import Insert
    from feed.timelines_redis import RedisTimelines

    online, offline = ids("online"), ids("offline")
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        await AsyncRedisPresence(client, ttl_s=60).attach(online)  # connected; 'seen' was lost
        timelines = RedisTimelines(
            redis_client, timeline_max=10, stream_history=10, body_ttl_s=60, only_active=True
        )
        aid = ids("a")
        inserted, pushed = timelines.insert(
            [Insert(order_key(1, aid), aid, b'{"id":"x"}', [online, offline])]
        )
        assert (inserted, pushed) == (1, 1)
        assert redis_client.zcard(f"tl:{{{offline}}}") == 0  # Cassandra only, rebuilt on read
    finally:
        await client.aclose()


async def test_refresh_reports_users_whose_presence_redis_lost(
    redis_client: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    from feed.delivery_redis import AsyncRedisPresence

    kept, lost = ids("kept"), ids("lost")
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        presence = AsyncRedisPresence(client, ttl_s=60)
        first = await presence.attach(lost)
        await presence.attach(kept)
        redis_client.delete(f"on:{{{lost}}}", f"dl:{{{lost}}}")
        assert await presence.refresh([kept, lost]) == [lost]
        again = await presence.attach(lost)
        assert again.epoch != first.epoch and again.seq == 0
    finally:
        await client.aclose()
