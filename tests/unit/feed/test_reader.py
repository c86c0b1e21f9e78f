"""The FeedReader's domain logic on the in-memory stores (``feed.memory``): no servers.

Pages cross from the hot timeline into history, cold users are rebuilt once, and large accounts
are merged at read time. The same reader runs on Redis and Cassandra in
``tests/integration/feed/test_reader.py``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import msgspec
import pytest

from feed.cursor import CursorError
from feed.memory import MemoryAsyncTimelines
from feed.reader import FeedReader
from tests.support.events import act, delete, follow
from tests.support.memory_world import World, make

Ids = Callable[[str], str]


@pytest.fixture
def small() -> Iterator[World]:
    """Hot timelines capped at 4 entries."""
    w = make(timeline_max=4)
    yield w
    w.processor.close()


def reader_of(w: World, **kwargs: object) -> FeedReader:
    return FeedReader(
        MemoryAsyncTimelines(w.redis),
        w.history,
        body_ttl_s=60,
        timeline_max=4,
        graph=w.graph,
        **kwargs,  # type: ignore[arg-type]
    )


async def read_all(reader: FeedReader, user: str, limit: int) -> list[str]:
    """Every page until ``next`` is None (bounded): the activity ids in order."""
    seen: list[str] = []
    cursor = None
    for _ in range(100):
        page = await reader.page(user, cursor, limit)
        seen += [msgspec.json.decode(item.activity)["id"] for item in page.items]
        cursor = page.next
        if cursor is None:
            return seen
    raise AssertionError("paging did not end")


async def test_pages_cross_from_the_hot_timeline_into_history(small: World, ids: Ids) -> None:
    star, fan, a = ids("star"), ids("fan"), ids("a")
    small.processor.apply([(0, follow(fan, star, 1))])
    small.processor.apply([(n, act(f"{a}-{n:02d}", star, n)) for n in range(11)])
    assert small.timelines.size(fan) == 4  # the rest is in history only
    expected = [f"{a}-{n:02d}" for n in range(10, -1, -1)]
    for limit in (1, 3, 4, 5, 20):
        assert await read_all(reader_of(small), fan, limit) == expected
    with pytest.raises(CursorError):
        await reader_of(small).page(fan, "not-a-cursor", 5)


async def test_expired_bodies_come_from_history_and_deleted_entries_are_skipped(
    small: World, ids: Ids
) -> None:
    star, fan, a = ids("star"), ids("fan"), ids("a")
    small.processor.apply([(0, follow(fan, star, 1))])
    small.processor.apply([(n, act(f"{a}-{n}", star, n)) for n in range(3)])
    small.timelines.delete_bodies([f"{a}-1"])  # expired from the cache
    assert await read_all(reader_of(small), fan, 10) == [f"{a}-2", f"{a}-1", f"{a}-0"]
    assert f"{a}-1" in small.redis.bodies  # cached again
    stale = small.timelines.page(fan, None, 1).members[0]  # the entry of a-2
    small.processor.apply([(0, delete(ids("d"), star, f"{a}-2"))])
    small.redis.timelines[fan].add(stale)  # an entry the delete did not reach: no body anywhere
    assert await read_all(reader_of(small), fan, 10) == [f"{a}-1", f"{a}-0"]


async def test_a_cold_user_is_served_from_history_and_rebuilt_once(ids: Ids) -> None:
    w = make(timeline_max=4, only_active=True)
    star, fan, a = ids("star"), ids("fan"), ids("a")
    w.processor.apply([(0, follow(fan, star, 1))])
    w.processor.apply([(n, act(f"{a}-{n}", star, n)) for n in range(6)])
    assert w.timelines.size(fan) == 0  # inactive: history only
    reader = reader_of(w, active_ttl_s=3600)
    expected = [f"{a}-{n}" for n in range(5, -1, -1)]
    assert await read_all(reader, fan, 4) == expected  # while the rebuild may still run
    await reader.wait_rebuilds()
    assert w.redis.active[fan] == "1" and w.timelines.size(fan) == 4
    assert await reader.touch(fan)
    assert await read_all(reader, fan, 4) == expected
    w.processor.apply([(0, act(f"{a}-new", star, 9))])  # active now: written to Redis too
    assert w.timelines.page(fan, None, 1).members[0].endswith(f"{a}-new")
    w.processor.close()


async def test_large_accounts_are_merged_at_read_time_without_gaps(ids: Ids) -> None:
    w = make(fanout_limit=2, timeline_max=4)
    star, small_one, fan, a = ids("star"), ids("small"), ids("fan"), ids("a")
    fans = [fan, *(f"{ids('other')}-{n}" for n in range(2))]
    w.processor.apply([(n, follow(f, star, n)) for n, f in enumerate(fans)])
    w.processor.apply([(10, follow(fan, small_one, 10))])
    events = [(n, act(f"{a}-{n:02d}", star if n % 2 else small_one, n)) for n in range(12)]
    w.processor.apply(events)
    assert star in w.redis.big
    reader = reader_of(w)
    assert await reader.big_followees(fan) == [star]
    expected = [f"{a}-{n:02d}" for n in range(11, -1, -1)]
    for limit in (1, 5, 20):
        assert await read_all(reader, fan, limit) == expected
    w.processor.apply([(0, follow(fan, star, 99, "unfollow"))])  # a new following version
    assert await reader.big_followees(fan) == []
    assert await read_all(reader, fan, 20) == [f"{a}-{n:02d}" for n in range(10, -1, -2)]
    w.processor.close()
