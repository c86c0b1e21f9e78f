"""FeedReader: paging crosses from the capped Redis tier into Cassandra with no gap or repeat."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from feed.cursor import CursorError, order_key
from feed.history_cassandra import CassandraHistory
from feed.interfaces import HistoryRecord, Insert
from feed.reader import FeedReader
from feed.timelines_redis import AsyncRedisTimelines, RedisTimelines


async def test_paging_crosses_into_history(
    redis_client: Any, cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    cap, total = 8, 30
    user, actor, a = ids("u"), ids("actor"), ids("a")
    history = CassandraHistory(cassandra, settings.cassandra_keyspace)
    # Published times crossing digit boundaries (9 -> 10, 99 -> 100, ...), two activities each
    # (ties broken by id): an order that compared unpadded numbers as text would differ.
    stamps = [10**k + d for k in range(1, 9) for d in (-1, 0)][: total // 2]
    records = [
        HistoryRecord(f"{a}-{n:03d}", actor, stamps[n // 2], msgspec.json.encode({"n": n}), [user])
        for n in range(total)
    ]
    history.put_activities(records)
    history.put_deliveries(records)
    RedisTimelines(redis_client, timeline_max=cap, stream_history=10, body_ttl_s=60).insert(
        [Insert(order_key(r.ts, r.activity_id), r.activity_id, r.body, r.users) for r in records]
    )
    client = aioredis.Redis.from_url(settings.redis_url)
    reader = FeedReader(AsyncRedisTimelines(client), history, body_ttl_s=60)
    try:
        seen: list[int] = []
        cursor = None
        for _ in range(total):
            page = await reader.page(user, cursor, 7)
            seen += [msgspec.json.decode(item.activity)["n"] for item in page.items]
            cursor = page.next
            if cursor is None:
                break
        # Newest first by (published, id), computed without the code under test.
        expected = [
            msgspec.json.decode(r.body)["n"]
            for r in sorted(records, key=lambda r: (r.ts, r.activity_id), reverse=True)
        ]
        assert seen == expected
        with pytest.raises(CursorError):
            await reader.page(user, "not-a-cursor", 5)
    finally:
        await client.aclose()


async def test_cold_user_is_written_to_history_only_and_rebuilt_on_read(
    redis_client: Any, cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    from fanout.followers import FollowerCache
    from fanout.processor import Processor
    from feed.graph_cassandra import CassandraFollowGraph
    from feed.graph_versions_redis import RedisGraphVersions
    from tests.support.events import act, follow

    hot, cold, actor = ids("hot"), ids("cold"), ids("actor")
    graph = CassandraFollowGraph(cassandra, settings.cassandra_keyspace)
    history = CassandraHistory(cassandra, settings.cassandra_keyspace)
    processor = Processor(
        timelines=RedisTimelines(
            redis_client, timeline_max=50, stream_history=10, body_ttl_s=60, only_active=True
        ),
        history=history,
        graph=graph,
        versions=RedisGraphVersions(redis_client),
        followers=FollowerCache(graph, RedisGraphVersions(redis_client)),
        follow_backfill=0,
    )
    client = aioredis.Redis.from_url(settings.redis_url)
    reader = FeedReader(
        AsyncRedisTimelines(client), history, body_ttl_s=60, active_ttl_s=3600, timeline_max=50
    )
    try:
        assert await reader.touch(hot) is False  # first sight: rebuild (of nothing) starts
        await reader.wait_rebuilds()
        assert await reader.touch(hot) is True
        processor.apply([(0, follow(hot, actor, 1)), (1, follow(cold, actor, 2))])
        posts = [ids(f"p{n}") for n in range(5)]
        stats = processor.apply([(n, act(aid, actor, n)) for n, aid in enumerate(posts)])
        assert stats.inserted == 5 and stats.history_rows == 10  # the cold user: Cassandra only
        assert redis_client.zcard(f"tl:{{{cold}}}") == 0
        # The cold user's first read is served from Cassandra while the rebuild runs.
        page = await reader.page(cold, None, 3)
        assert [msgspec.json.decode(i.activity)["id"] for i in page.items] == posts[::-1][:3]
        await reader.wait_rebuilds()
        assert redis_client.zcard(f"tl:{{{cold}}}") == 5
        page = await reader.page(cold, None, 10)
        assert [msgspec.json.decode(i.activity)["id"] for i in page.items] == posts[::-1]
    finally:
        await client.aclose()


async def test_2000_items_with_a_cap_of_800_page_without_gap_or_repeat(
    redis_client: Any, cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    """The issue's numbers: 2,000 items, Redis holds the newest 800, pages of 50 cross over."""
    from fanout.followers import FollowerCache
    from fanout.processor import Processor
    from feed.graph_cassandra import CassandraFollowGraph
    from feed.graph_versions_redis import RedisGraphVersions
    from tests.support.events import act, follow

    reader_user, actor = ids("reader"), ids("actor")
    graph = CassandraFollowGraph(cassandra, settings.cassandra_keyspace)
    history = CassandraHistory(cassandra, settings.cassandra_keyspace)
    processor = Processor(
        timelines=RedisTimelines(redis_client, timeline_max=800, stream_history=10, body_ttl_s=600),
        history=history,
        graph=graph,
        versions=RedisGraphVersions(redis_client),
        followers=FollowerCache(graph, RedisGraphVersions(redis_client)),
        follow_backfill=0,
    )
    processor.apply([(0, follow(reader_user, actor, 1))])
    posts = [ids(f"p{n:04d}") for n in range(2000)]
    # Batches of 250, published a minute apart per 3 items (ties broken by id), shuffled order.
    order = list(range(2000))
    order = order[1::2] + order[::2]
    for start in range(0, 2000, 250):
        processor.apply([(n, act(posts[n], actor, n // 3)) for n in order[start : start + 250]])
    assert redis_client.zcard(f"tl:{{{reader_user}}}") == 800
    client = aioredis.Redis.from_url(settings.redis_url)
    reader = FeedReader(AsyncRedisTimelines(client), history, body_ttl_s=600, timeline_max=800)
    try:
        seen: list[str] = []
        cursor = None
        for _ in range(100):
            page = await reader.page(reader_user, cursor, 50)
            seen += [msgspec.json.decode(item.activity)["id"] for item in page.items]
            cursor = page.next
            if cursor is None:
                break
        expected = [
            posts[n] for n in sorted(range(2000), key=lambda n: (n // 3, posts[n]), reverse=True)
        ]
        assert len(seen) == len(set(seen)) == 2000
        assert seen == expected
    finally:
        await client.aclose()


def _follow_rows(cassandra: Any, keyspace: str, user: str, followees: list[str]) -> None:
    """``user`` follows ``followees``: the graph's rows, written in batches of one partition."""
    from cassandra.concurrent import execute_concurrent
    from cassandra.query import BatchStatement, BatchType

    insert = cassandra.prepare(
        f"INSERT INTO {keyspace}.following (user_id, followee) VALUES (?, ?)"
    )
    batches = []
    for start in range(0, len(followees), 500):
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        for followee in followees[start : start + 500]:
            batch.add(insert, (user, followee))
        batches.append((batch, None))
    execute_concurrent(cassandra, batches, concurrency=8, raise_on_first_error=True)


def _slowlog_args(redis_client: Any, name: str) -> list[tuple[str, int]]:
    """(command, number of arguments) of every command client ``name`` sent since the reset.
    The slowlog keeps the first 32 arguments and says how many more there were."""
    entries = redis_client.execute_command("SLOWLOG", "GET", "100000")
    out = []
    for entry in entries:
        args, client = entry[3], entry[5] if len(entry) > 5 else b""
        if client != name.encode():
            continue
        count = len(args)
        more = re.fullmatch(rb"\.\.\. \((\d+) more arguments\)", args[-1])
        if more:
            count += int(more[1]) - 1
        out.append((args[0].decode().upper(), count))
    return out


@pytest.mark.parametrize("check_max", [1000, 0], ids=["big-accounts-checked", "followees-paged"])
async def test_large_followees_of_a_user_following_50000_accounts_use_bounded_commands(
    redis_client: Any,
    cassandra: Any,
    settings: Any,
    ids: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
    check_max: int,
) -> None:
    """A user following 50,000 accounts, three of them large: the reader finds exactly the
    large ones it follows, and no Redis command it sends names more than ~1,000 members (the
    whole following list in one SMISMEMBER would block Redis for everyone)."""
    from feed import keys
    from feed import reader as reader_module
    from feed.graph_cassandra import CassandraFollowGraph

    monkeypatch.setattr(reader_module, "_BIG_CHECK_MAX", check_max, raising=False)
    user, tag = ids("reader"), ids("f")
    followees = [f"{tag}-{n:05d}" for n in range(50_000)]
    _follow_rows(cassandra, settings.cassandra_keyspace, user, followees)
    stars = [followees[7], followees[25_000], followees[-1], f"{tag}-not-followed"]
    redis_client.sadd(keys.big_accounts, "", *stars)
    big = {m.decode() for m in redis_client.smembers(keys.big_accounts)}
    expected = sorted(set(followees) & big)
    assert len(expected) == 3

    name = f"reader-{tag}"
    client = aioredis.Redis.from_url(settings.redis_url, client_name=name)
    graph = CassandraFollowGraph(cassandra, settings.cassandra_keyspace)
    reader = FeedReader(AsyncRedisTimelines(client), None, body_ttl_s=60, graph=graph)
    old = redis_client.config_get("slowlog-*")
    redis_client.config_set("slowlog-log-slower-than", 0)
    redis_client.config_set("slowlog-max-len", 100_000)
    redis_client.slowlog_reset()
    try:
        assert await reader.big_followees(user) == expected
        assert await reader.big_followees(user) == expected  # cached
        sent = _slowlog_args(redis_client, name)
    finally:
        for key, value in old.items():
            redis_client.config_set(key, value)
        await client.aclose()
    assert sent, "the reader's commands were not seen"
    assert max(count for _, count in sent) <= 1002, sorted(sent, key=lambda c: -c[1])[:3]
