"""Idempotency by activity id, ownership of ids and durable deletes, on the real Redis and
Cassandra (the fan-out Processor, no Kafka: records are handed in).

The contract (CONTRACT.md, ``feed.activities``): the same ``id`` delivered twice leaves every
timeline as if it was delivered once, whatever the second copy's ``published`` or other fields —
the first create of an id wins; a create of an id that another actor owns goes to the DLQ
(``id_conflict``) and changes nothing; a Delete of an id that its actor never created changes
nothing, now or later (DLQ), and a later create of that id by its real actor is delivered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from cassandra import ReadTimeout

from fanout.processor import Processor
from feed.cursor import order_key
from feed.history_cassandra import CassandraHistory
from feed.interfaces import HistoryRecord, Insert
from feed.reader import FeedReader
from feed.timelines_redis import AsyncRedisTimelines
from tests.support.events import T0, act, delete, follow
from tests.support.processor import real_processor, timeline


@pytest.fixture
def processor(redis_client: Any, cassandra: Any, settings: Any) -> Iterator[Processor]:
    p = real_processor(redis_client, cassandra, settings.cassandra_keyspace)
    yield p
    p.close()


def first_us(minute: int) -> int:
    """``published`` (µs) of ``act(..., minute)``."""
    return int((T0.timestamp() + 60 * minute) * 1_000_000)


def _online(redis_client: Any, user: str) -> None:
    """The user is connected (a presence hash, as the gateway's attach makes it)."""
    redis_client.hset(f"on:{{{user}}}", mapping={"e": "ep", "s": 0})


def _frames(redis_client: Any, user: str) -> list[dict[str, Any]]:
    return [json.loads(f[b"f"]) for _, f in redis_client.xrange(f"dl:{{{user}}}")]


def _body(redis_client: Any, processor: Processor, aid: str) -> tuple[Any, Any]:
    """The activity's body as every reader gets it: (Redis body cache, Cassandra)."""
    cached = redis_client.get(f"a:{aid}")
    stored = processor._history.bodies([aid]).get(aid)
    return (
        None if cached is None else json.loads(cached),
        None if stored is None else json.loads(stored),
    )


def _lose_everything_about(redis_client: Any, aid: str) -> None:
    """Redis loses every key naming the activity (a restart without persistence)."""
    for key in list(redis_client.scan_iter(match=f"*{aid}*", count=1000)):
        redis_client.delete(key)


# --- 1. idempotency by id --------------------------------------------------------------------
def test_a_second_create_with_another_published_changes_nothing(
    processor: Processor, redis_client: Any, ids: Callable[[str], str]
) -> None:
    """A producer retry that re-stamps ``published`` (and changes other fields) is the same
    activity: one entry, one push, the first version's body everywhere."""
    u1, u2, a = ids("u1"), ids("u2"), ids("a")
    processor.apply([(0, follow(u2, u1, 1))])
    _online(redis_client, u2)
    first = act(a, u1, 1)
    processor.apply([(0, first)])
    again = processor.apply([(0, act(a, u1, 7, object="post:other", to=[ids("u9")]))])
    assert again.rejected == [] and again.inserted == 0 and again.pushed == 0
    # In one batch too, whichever order the copies come in: the first one wins.
    b = ids("b")
    processor.apply([(0, act(b, u1, 2)), (1, act(b, u1, 9, object="post:later"))])
    assert timeline(processor, u2) == [b, a]
    assert processor._timelines.page(u2, None, 10).members == [
        order_key(first_us(2), b),
        order_key(first_us(1), a),
    ]
    assert [f["activity"]["id"] for f in _frames(redis_client, u2)] == [a, b]
    assert _body(redis_client, processor, a) == (json.loads(msgspec.json.encode(first)),) * 2
    assert timeline(processor, ids("u9")) == []
    assert processor._history.outbox(u1, 10) == [
        order_key(first_us(2), b),
        order_key(first_us(1), a),
    ]


def test_a_create_of_an_id_owned_by_another_actor_is_rejected_and_changes_nothing(
    processor: Processor, redis_client: Any, ids: Callable[[str], str]
) -> None:
    owner, thief, fan, thief_fan, a = (ids(n) for n in ("owner", "thief", "fan", "tf", "a"))
    processor.apply([(0, follow(fan, owner, 1)), (1, follow(thief_fan, thief, 2))])
    original = act(a, owner, 1)
    processor.apply([(0, original)])
    stolen = processor.apply([(4, act(a, thief, 2, object="post:evil", to=[fan]))])
    assert [(i, r.code) for i, r in stolen.rejected] == [(4, "id_conflict")]
    # In one batch with the owner's replay: only the thief's copy is rejected.
    both = processor.apply([(0, act(a, owner, 1)), (1, act(a, thief, 3))])
    assert [(i, r.code) for i, r in both.rejected] == [(1, "id_conflict")]
    assert timeline(processor, fan) == [a] and timeline(processor, thief_fan) == []
    assert _body(redis_client, processor, a) == (json.loads(msgspec.json.encode(original)),) * 2
    assert processor._history.outbox(thief, 10) == []
    # Deleted ids stay owned: the thief cannot take a deleted id over either.
    processor.apply([(0, delete(ids("d"), owner, a))])
    again = processor.apply([(0, act(a, thief, 4))])
    assert [r.code for _, r in again.rejected] == ["id_conflict"]
    assert timeline(processor, thief_fan) == [] and timeline(processor, fan) == []


def test_two_actors_creating_one_new_id_at_once_one_wins(
    processor: Processor, redis_client: Any, ids: Callable[[str], str]
) -> None:
    """Another worker is creating the id right now (its claim is held, no row yet): this create
    is rejected, and the claim holder's create then goes through."""
    other, mine, fan, a = ids("other"), ids("mine"), ids("fan"), ids("a")
    processor.apply([(0, follow(fan, other, 1))])
    redis_client.set(f"c:{a}", other, ex=60)  # the other worker's claim, taken first
    lost = processor.apply([(0, act(a, mine, 1))])
    assert [r.code for _, r in lost.rejected] == ["id_conflict"]
    won = processor.apply([(0, act(a, other, 2))])
    assert won.rejected == [] and timeline(processor, fan) == [a]
    assert redis_client.exists(f"c:{a}") == 0  # released once the activity row was written
    assert processor._history.activity(a) is not None
    assert processor._history.activity(a)[0] == other  # type: ignore[index]


def test_nothing_overwrites_another_activitys_body_through_the_outbox_path(
    redis_client: Any, cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    """A large account (fanned out at read time: outbox, actor channel) can neither take over
    another actor's id nor change its own activity's body by creating the id again."""
    p = real_processor(redis_client, cassandra, settings.cassandra_keyspace, fanout_limit=1)
    try:
        star, small, f1, f2, fan = (ids(n) for n in ("star", "small", "f1", "f2", "fan"))
        victim, own = ids("victim"), ids("own")
        p.apply([(0, follow(f1, star, 1)), (1, follow(f2, star, 2)), (2, follow(fan, small, 3))])
        original = act(victim, small, 1)
        p.apply([(0, original)])
        channel = redis_client.pubsub()
        channel.subscribe(f"ac:{{{star}}}")
        confirmed = channel.get_message(timeout=5)
        assert confirmed is not None and confirmed["type"] == "subscribe"
        stolen = p.apply([(0, act(victim, star, 2, object="post:evil"))])
        assert [r.code for _, r in stolen.rejected] == ["id_conflict"]
        assert _body(redis_client, p, victim) == (json.loads(msgspec.json.encode(original)),) * 2
        assert redis_client.zrange(f"ob:{{{star}}}", 0, -1) == []
        assert p._history.outbox(star, 10) == []
        first = act(own, star, 3)
        p.apply([(0, first)])
        p.apply([(0, act(own, star, 4, object="post:edited"))])
        assert _body(redis_client, p, own) == (json.loads(msgspec.json.encode(first)),) * 2
        assert [m.decode() for m in redis_client.zrange(f"ob:{{{star}}}", 0, -1)] == [
            order_key(first_us(3), own)
        ]
        announced = []
        while (message := channel.get_message(timeout=0.2)) is not None:
            if message["type"] == "message":
                announced.append(message["data"].split(b"\n", 1)[0])
        assert announced == [b"+" + order_key(first_us(3), own).encode()]
        channel.close()
        assert timeline(p, fan) == [victim]
    finally:
        p.close()


# --- 2. deletes of ids their actor never created --------------------------------------------
def test_a_delete_before_the_create_goes_to_the_dlq_and_the_create_is_delivered(
    processor: Processor, redis_client: Any, ids: Callable[[str], str]
) -> None:
    u1, u2, a = ids("u1"), ids("u2"), ids("a")
    processor.apply([(0, follow(u2, u1, 1))])
    early = processor.apply([(3, delete(ids("d"), u1, a))])
    assert [(i, r.code) for i, r in early.rejected] == [(3, "not_found")]
    # Someone else's delete of the id, before it exists, changes nothing either.
    assert [r.code for _, r in processor.apply([(0, delete(ids("d2"), u2, a))]).rejected] == [
        "not_found"
    ]
    created = processor.apply([(0, act(a, u1, 1))])
    assert created.rejected == [] and created.inserted == 1
    assert timeline(processor, u2) == [a]


def test_a_cross_actor_delete_touches_nothing_of_the_owner(
    processor: Processor, redis_client: Any, ids: Callable[[str], str]
) -> None:
    u1, u2, u3, a, b = ids("u1"), ids("u2"), ids("u3"), ids("a"), ids("b")
    processor.apply([(0, follow(u2, u1, 1)), (1, act(a, u1, 1)), (2, act(b, u1, 2))])
    live = processor.apply([(0, delete(ids("d1"), u3, a))])
    assert [r.code for _, r in live.rejected] == ["forbidden"]
    assert timeline(processor, u2) == [b, a]
    processor.apply([(0, delete(ids("d2"), u1, b))])
    marker, ttl = redis_client.get(f"d:{b}"), redis_client.ttl(f"d:{b}")
    dead = processor.apply([(0, delete(ids("d3"), u3, b))])
    assert [r.code for _, r in dead.rejected] == ["forbidden"]
    assert redis_client.get(f"d:{b}") == marker and 0 < redis_client.ttl(f"d:{b}") <= ttl
    processor.apply([(0, act(b, u1, 2))])  # a replay of the owner's create: still deleted
    assert timeline(processor, u2) == [a]


# --- 3. deletes are durable ----------------------------------------------------------------------
def test_a_deleted_activity_stays_deleted_after_redis_lost_everything_about_it(
    processor: Processor, redis_client: Any, ids: Callable[[str], str]
) -> None:
    u1, u2, a = ids("u1"), ids("u2"), ids("a")
    processor.apply([(0, follow(u2, u1, 1)), (1, act(a, u1, 1))])
    processor.apply([(0, delete(ids("d"), u1, a))])
    _lose_everything_about(redis_client, a)
    replay = processor.apply([(0, act(a, u1, 1))])
    assert replay.rejected == [] and replay.inserted == 0
    assert timeline(processor, u2) == []
    assert processor._history.activity(a) is None
    assert redis_client.get(f"a:{a}") is None
    # The delete's replay is harmless too (no error, nothing to do).
    assert processor.apply([(0, delete(ids("d"), u1, a))]).rejected == []


# --- 4. backfilled followers --------------------------------------------------------------------
def test_a_delete_reaches_followers_who_got_the_activity_from_a_backfill(
    processor: Processor, redis_client: Any, ids: Callable[[str], str]
) -> None:
    u1, early, late, a = ids("u1"), ids("early"), ids("late"), ids("a")
    processor.apply([(0, follow(early, u1, 1)), (1, act(a, u1, 1))])
    _online(redis_client, late)
    processor.apply([(0, follow(late, u1, 2))])  # backfill copies a
    assert timeline(processor, late) == [a]
    processor.apply([(0, follow(late, u1, 3))])  # a second backfill: idempotent
    processor.apply([(0, delete(ids("d"), u1, a))])
    assert timeline(processor, late) == [] and timeline(processor, early) == []
    frames = _frames(redis_client, late)
    assert [f["type"] for f in frames] == ["activity", "removed"]
    assert frames[-1]["id"] == a


# --- 5. rebuilds and body re-caches that race a delete ---------------------------------------
async def test_a_rebuild_that_read_cassandra_before_a_delete_does_not_write_it_back(
    redis_client: Any, cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    """The steps of a cold user's rebuild (feed.reader) in the order that loses: the rebuild
    reads Cassandra, then the Delete is applied, then the rebuild writes Redis."""
    p = real_processor(redis_client, cassandra, settings.cassandra_keyspace)
    client = aioredis.Redis.from_url(settings.redis_url)
    timelines = AsyncRedisTimelines(client)
    history = CassandraHistory(cassandra, settings.cassandra_keyspace)
    try:
        u1, cold, a, b = ids("u1"), ids("cold"), ids("a"), ids("b")
        p.apply([(0, follow(cold, u1, 1)), (1, act(a, u1, 1)), (2, act(b, u1, 2))])
        redis_client.delete(f"tl:{{{cold}}}", f"a:{a}", f"a:{b}")  # cold: Cassandra only
        assert await timelines.touch(cold, 3600, "lease") == 1  # the reader starts a rebuild
        members = history.page_timeline(cold, None, 50)  # ... reads Cassandra ...
        bodies = history.bodies([m.partition(":")[2] for m in members])
        assert sorted(bodies) == sorted([a, b])
        p.apply([(0, delete(ids("d"), u1, a))])  # ... the delete is applied ...
        assert await timelines.rebuild(  # ... and the rebuild writes Redis
            cold, members, bodies, timeline_max=50, body_ttl_s=60, token="lease"
        )
        assert [m.decode() for m in redis_client.zrange(f"tl:{{{cold}}}", 0, -1)] == [
            order_key(first_us(2), b)
        ]
        assert redis_client.get(f"a:{a}") is None
        reader = FeedReader(timelines, history, body_ttl_s=60, active_ttl_s=3600, timeline_max=50)
        page = await reader.page(cold, None, 10)
        assert [msgspec.json.decode(i.activity)["id"] for i in page.items] == [b]
    finally:
        await client.aclose()
        p.close()


async def test_a_body_recache_or_a_late_fan_out_after_a_delete_writes_nothing_back(
    redis_client: Any, cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    """A reader that read a body from Cassandra before the delete, and a fan-out of the same
    activity by another worker (a rebalance) that read it before the delete, both write Redis
    after it: neither brings the activity back."""
    p = real_processor(redis_client, cassandra, settings.cassandra_keyspace)
    client = aioredis.Redis.from_url(settings.redis_url)
    timelines = AsyncRedisTimelines(client)
    history = CassandraHistory(cassandra, settings.cassandra_keyspace)
    try:
        u1, u2, a = ids("u1"), ids("u2"), ids("a")
        p.apply([(0, follow(u2, u1, 1)), (1, act(a, u1, 1))])
        redis_client.delete(f"a:{a}")  # the cached body expired
        fetched = history.bodies([a])  # a reader fetches it from Cassandra ...
        body = fetched[a]
        p.apply([(0, delete(ids("d"), u1, a))])  # ... the delete is applied ...
        assert await timelines.cache_bodies(fetched, 60) == 0  # ... the reader caches it
        assert redis_client.get(f"a:{a}") is None
        _online(redis_client, u2)
        member = order_key(first_us(1), a)
        late = p._timelines.insert([Insert(member, a, body, [u2])])  # the other worker's write
        assert late == (0, 0)
        assert redis_client.get(f"a:{a}") is None
        assert redis_client.zscore(f"tl:{{{u2}}}", member) is None
        inserted, pushed = await timelines.insert_for(  # a gateway's late big-account delivery
            [u2], member, body, timeline_max=50, stream_history=10, body_ttl_s=60
        )
        assert (inserted, pushed) == (0, 0) and redis_client.get(f"a:{a}") is None
        assert _frames(redis_client, u2) == []
    finally:
        await client.aclose()
        p.close()


# --- 6. unfollow of a large outbox ----------------------------------------------------------
class _TimingOutHistory(CassandraHistory):
    """The real history, whose reads of more than ``limit`` bodies time out (as an ``IN`` of
    thousands of ids does on a loaded cluster); records the largest reads asked for."""

    limit = 100

    def __init__(self, session: Any, keyspace: str) -> None:
        super().__init__(session, keyspace)
        self.largest_bodies = 0
        self.largest_outbox = 0

    def bodies(self, activity_ids: Any) -> dict[str, bytes]:
        self.largest_bodies = max(self.largest_bodies, len(activity_ids))
        if len(activity_ids) > self.limit:
            raise ReadTimeout("Operation timed out - received only 0 responses (injected)")
        return super().bodies(activity_ids)

    def outbox(self, actor: str, limit: int, before: str | None = None) -> list[str]:
        self.largest_outbox = max(self.largest_outbox, limit)
        return super().outbox(actor, limit, before)


def test_an_unfollow_of_a_large_outbox_reads_bounded_pages_and_outlives_a_timeout(
    redis_client: Any, cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    history = _TimingOutHistory(cassandra, settings.cassandra_keyspace)
    p = real_processor(redis_client, cassandra, settings.cassandra_keyspace, history=history)
    try:
        star, fan = ids("star"), ids("fan")
        count = 1200
        records = [
            HistoryRecord(f"{star}-{n:04d}", star, 1_000 + n, b'{"id":"%d"}' % n, [fan])
            for n in range(count)
        ]
        history.put_activities(records)
        history.put_deliveries(records)
        p.apply([(0, follow(fan, star, 1))])  # the graph; the backfill adds the newest 3
        assert len(history.page_timeline(fan, None, 2 * count)) == count
        history.largest_bodies = history.largest_outbox = 0
        stats = p.apply([(0, follow(fan, star, 2, "unfollow"))])
        assert stats.rejected == []
        assert history.page_timeline(fan, None, 10) == []
        assert redis_client.zcard(f"tl:{{{fan}}}") == 0
        assert 0 < history.largest_outbox <= 500 and history.largest_bodies <= 500
    finally:
        p.close()


def test_claims_of_a_batch_are_released_and_rejected_ones_left_alone(
    processor: Processor, redis_client: Any, ids: Callable[[str], str]
) -> None:
    u1, u9, a, b = ids("u1"), ids("u9"), ids("a"), ids("b")
    redis_client.set(f"c:{b}", u9, ex=60)
    stats = processor.apply([(0, act(a, u1, 1)), (1, act(b, u1, 2))])
    assert [(i, r.code) for i, r in stats.rejected] == [(1, "id_conflict")]
    assert redis_client.exists(f"c:{a}") == 0
    assert redis_client.get(f"c:{b}") == u9.encode()


def test_concurrent_batches_of_two_actors_creating_the_same_ids(
    redis_client: Any, cassandra: Any, settings: Any, ids: Callable[[str], str]
) -> None:
    """Two workers apply, at the same moment, batches of two actors that both create the same
    new ids (different partitions): every id ends with exactly one owner, and only that owner's
    version is anywhere."""
    first = real_processor(redis_client, cassandra, settings.cassandra_keyspace)
    second = real_processor(redis_client, cassandra, settings.cassandra_keyspace)
    try:
        u1, u2, f1, f2 = ids("u1"), ids("u2"), ids("f1"), ids("f2")
        first.apply([(0, follow(f1, u1, 1)), (1, follow(f2, u2, 2))])
        shared = [ids("s") + f"-{n}" for n in range(40)]  # within timeline_max

        async def race() -> list[Any]:
            return await asyncio.gather(
                asyncio.to_thread(first.apply, [(n, act(s, u1, 1)) for n, s in enumerate(shared)]),
                asyncio.to_thread(second.apply, [(n, act(s, u2, 2)) for n, s in enumerate(shared)]),
            )

        one, two = asyncio.run(race())
        lost_one = {shared[i] for i, r in one.rejected if r.code == "id_conflict"}
        lost_two = {shared[i] for i, r in two.rejected if r.code == "id_conflict"}
        assert lost_one | lost_two == set(shared) and not lost_one & lost_two
        assert sorted(timeline(first, f1)) == sorted(set(shared) - lost_one)
        assert sorted(timeline(first, f2)) == sorted(set(shared) - lost_two)
        for s in shared:
            owner = u2 if s in lost_one else u1
            assert first._history.activity(s)[0] == owner  # type: ignore[index]
            assert json.loads(redis_client.get(f"a:{s}"))["actor"] == owner
    finally:
        first.close()
        second.close()
