"""RedisTimelines and AsyncRedisPresence against the real Redis of the test session."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

import msgspec
import redis
import redis.asyncio as aioredis

from feed import keys
from feed.cursor import order_key
from feed.delivery_redis import AsyncRedisPresence
from feed.interfaces import Insert, Removal
from feed.timelines_redis import RedisTimelines
from schemas import frames as schema_frames


def _timelines(client: redis.Redis, cap: int = 5) -> RedisTimelines:
    return RedisTimelines(client, timeline_max=cap, stream_history=100, body_ttl_s=600)


def _insert(ts: int, aid: str, users: list[str]) -> Insert:
    return Insert(order_key(ts, aid), aid, msgspec.json.encode({"id": aid}), users)


def test_insert_orders_newest_first_and_stores_body_once(
    redis_client: redis.Redis, ids: Callable[[str], str]
) -> None:
    t = _timelines(redis_client, cap=100)
    u1, u2, a = ids("u1"), ids("u2"), ids("a")
    inserted, _ = t.insert([_insert(ts, f"{a}-{ts}", [u1, u2]) for ts in (3, 1, 2)])
    assert inserted == 6
    page = t.page(u1, None, 10)
    assert [m.split(":", 1)[1] for m in page.members] == [f"{a}-3", f"{a}-2", f"{a}-1"]
    assert page.bodies[page.members[0]] == msgspec.json.encode({"id": f"{a}-3"})
    assert redis_client.exists(keys.body(f"{a}-3")) == 1


def test_ties_on_published_are_broken_by_id(
    redis_client: redis.Redis, ids: Callable[[str], str]
) -> None:
    t = _timelines(redis_client, cap=100)
    user = ids("u")
    t.insert([_insert(7, aid, [user]) for aid in ("b", "c", "a")])
    assert [m.split(":", 1)[1] for m in t.page(user, None, 10).members] == ["c", "b", "a"]


def test_cap_keeps_newest(redis_client: redis.Redis, ids: Callable[[str], str]) -> None:
    t = _timelines(redis_client, cap=5)
    user, a = ids("u"), ids("a")
    t.insert([_insert(ts, f"{a}-{ts:02d}", [user]) for ts in range(12)])
    members = t.page(user, None, 100).members
    assert t.size(user) == 5
    assert [m.split(":", 1)[1] for m in members] == [f"{a}-{ts:02d}" for ts in range(11, 6, -1)]


def test_reinsert_is_idempotent(redis_client: redis.Redis, ids: Callable[[str], str]) -> None:
    t = _timelines(redis_client, cap=50)
    user, a = ids("u"), ids("a")
    first = t.insert([_insert(1, a, [user])])
    again = t.insert([_insert(1, a, [user])])
    assert first[0] == 1 and again == (0, 0)
    assert t.size(user) == 1


def test_paging_with_exclusive_cursor(redis_client: redis.Redis, ids: Callable[[str], str]) -> None:
    t = _timelines(redis_client, cap=100)
    user, a = ids("u"), ids("a")
    # Published times crossing digit boundaries (9 -> 10, 99 -> 100, ...), inserted out of order.
    stamps = [10**k + d for k in range(1, 6) for d in (0, -1)]
    t.insert([_insert(ts, f"{a}-{ts}", [user]) for ts in stamps])
    seen: list[str] = []
    before = None
    for _ in range(10):
        page = t.page(user, before, 3)
        if not page.members:
            break
        seen += page.members
        before = page.members[-1]
    assert len(seen) == len(set(seen)) == 10
    # Newest first by published time, computed without the code under test.
    assert [m.split(":", 1)[1] for m in seen] == [
        f"{a}-{ts}" for ts in sorted(stamps, reverse=True)
    ]


def test_many_recipients_are_split_across_calls(
    redis_client: redis.Redis, ids: Callable[[str], str]
) -> None:
    t = _timelines(redis_client, cap=10)
    users = [ids("f") + f"-{n}" for n in range(20_000)]
    inserted, _ = t.insert([_insert(1, ids("a"), users)])
    assert inserted == 20_000
    assert all(t.size(u) == 1 for u in users[::997])


def test_only_online_users_get_frames_in_sequence(
    redis_client: redis.Redis,
    settings,
    ids: Callable[[str], str],  # type: ignore[no-untyped-def]
) -> None:
    online, offline, a = ids("on"), ids("off"), ids("a")

    async def attach() -> tuple[str, int]:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            p = await AsyncRedisPresence(client, ttl_s=60).attach(online)
            return p.epoch, p.seq
        finally:
            await client.aclose()

    epoch, seq = asyncio.run(attach())
    assert seq == 0
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.channel(online), keys.channel(offline))
    for _ in range(2):
        pubsub.get_message(timeout=2)
    t = _timelines(redis_client, cap=10)
    inserted, pushed = t.insert([_insert(ts, f"{a}-{ts}", [online, offline]) for ts in (1, 2)])
    assert (inserted, pushed) == (4, 2)
    removed, pushed = t.remove([Removal(order_key(1, f"{a}-1"), f"{a}-1", [online, offline])])
    assert (removed, pushed) == (2, 1)
    frames = []
    for _ in range(20):
        message = pubsub.get_message(timeout=1)
        if message and message["type"] == "message":
            frames.append((message["channel"], msgspec.json.decode(message["data"])))
        if len(frames) == 3:
            break
    pubsub.close()
    assert {channel for channel, _ in frames} == {keys.channel(online).encode()}
    assert [f["cursor"] for _, f in frames] == [f"{epoch}.1", f"{epoch}.2", f"{epoch}.3"]
    assert [f["type"] for _, f in frames] == ["activity", "activity", "removed"]
    assert frames[2][1]["id"] == f"{a}-1"
    stream = redis_client.xrange(keys.deliveries(online))
    assert [eid for eid, _ in stream] == [b"1-0", b"2-0", b"3-0"]
    assert redis_client.exists(keys.deliveries(offline)) == 0


def test_the_scripts_frames_are_the_schemas_frames(
    redis_client: redis.Redis,
    settings,
    ids: Callable[[str], str],  # type: ignore[no-untyped-def]
) -> None:
    """The frames the fan-out and remove scripts splice from ``schemas.frames``' pieces are, byte
    for byte, what the frame structs encode, and ``stream_position`` reads their cursors."""
    online, a = ids("on"), ids("a")
    epoch = _attach(settings, online)
    t = _timelines(redis_client, cap=10)
    item = _insert(5, a, [online])
    assert t.insert([item]) == (1, 1)
    assert t.remove([Removal(item.member, a, [online])]) == (1, 1)
    stream = [fields[b"f"] for _, fields in redis_client.xrange(keys.deliveries(online))]
    assert stream[0] == schema_frames.encode_frame(
        schema_frames.ActivityFrame(f"{epoch}.1", msgspec.Raw(item.body))
    )
    removed = msgspec.json.decode(stream[1], type=schema_frames.Removed)
    assert (removed.id, removed.cursor) == (a, f"{epoch}.2")
    assert [schema_frames.stream_position(f) for f in stream] == [(epoch, 1), (epoch, 2)]
    # With the record's timestamp, in one call beside an insert without one: each its own tail.
    b, c = ids("b"), ids("c")
    timed = replace(_insert(6, b, [online]), ts_ms=1_765_000_000_123)
    assert t.insert([timed, _insert(7, c, [online])]) == (2, 2)
    stream = [fields[b"f"] for _, fields in redis_client.xrange(keys.deliveries(online))]
    assert stream[2:] == [
        schema_frames.encode_frame(
            schema_frames.ActivityFrame(f"{epoch}.3", msgspec.Raw(timed.body), ts=1_765_000_000_123)
        ),
        schema_frames.encode_frame(
            schema_frames.ActivityFrame(f"{epoch}.4", msgspec.Raw(_insert(7, c, [online]).body))
        ),
    ]
    assert schema_frames.frame_ts_ms(stream[2]) == 1_765_000_000_123
    assert schema_frames.frame_ts_ms(stream[3]) is None
    # A traced record's frames carry its traceparent too (feed.tracing), read back like ts.
    d, parent = ids("d"), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    traced = replace(_insert(8, d, [online]), ts_ms=1_765_000_000_124, traceparent=parent)
    assert t.insert([traced]) == (1, 1)
    stream = [fields[b"f"] for _, fields in redis_client.xrange(keys.deliveries(online))]
    assert stream[4] == schema_frames.encode_frame(
        schema_frames.ActivityFrame(
            f"{epoch}.5", msgspec.Raw(traced.body), traceparent=parent, ts=1_765_000_000_124
        )
    )
    assert schema_frames.frame_traceparent(stream[4]) == parent
    assert schema_frames.frame_ts_ms(stream[4]) == 1_765_000_000_124


def test_insert_loads_the_script_again_after_redis_lost_it(
    redis_client: redis.Redis, ids: Callable[[str], str]
) -> None:
    """The fan-out runs its script by EVALSHA on a packed pipeline: a Redis that lost its script
    cache (restart, SCRIPT FLUSH) answers NOSCRIPT, and the store loads the script and runs the
    calls again, so nothing is lost and nothing is doubled."""
    users = [ids(f"u{n}") for n in range(3)]
    a = ids("a")
    t = _timelines(redis_client, cap=10)
    redis_client.script_flush()
    assert t.insert([_insert(1, a, users)]) == (3, 0)
    assert all(t.page(u, None, 10).members == [order_key(1, a)] for u in users)
    redis_client.script_flush()
    assert t.insert([_insert(1, a, users), _insert(2, f"{a}-2", users[:1])]) == (1, 0)


def _attach(settings, user: str) -> str:  # type: ignore[no-untyped-def]
    async def attach() -> str:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            return (await AsyncRedisPresence(client, ttl_s=60).attach(user)).epoch
        finally:
            await client.aclose()

    return asyncio.run(attach())


def test_grouped_call_delivers_each_users_items_in_insert_order_once(
    redis_client: redis.Redis,
    settings,
    ids: Callable[[str], str],  # type: ignore[no-untyped-def]
) -> None:
    """One call groups every user's inserts (one ZADD per user): an online user still gets one
    frame per new item, in insert order, with consecutive seqs; an item already in the timeline
    and a member listed twice are pushed once; the other users' timelines are complete."""
    online, other, a = ids("on"), ids("other"), ids("a")
    epoch = _attach(settings, online)
    t = _timelines(redis_client, cap=100)
    assert t.insert([_insert(5, f"{a}-5", [online])]) == (1, 1)
    order = [3, 9, 5, 1, 7]  # insert order, not published order; 5 is already there
    batch = [_insert(ts, f"{a}-{ts}", [online, other]) for ts in order]
    batch.append(_insert(9, f"{a}-9", [online]))  # the same activity again, in the same call
    inserted, pushed = t.insert(batch)
    assert (inserted, pushed) == (4 + 5, 4)
    frames = [
        msgspec.json.decode(fields[b"f"])
        for _, fields in redis_client.xrange(keys.deliveries(online))
    ]
    assert [f["cursor"] for f in frames] == [f"{epoch}.{n}" for n in range(1, 6)]
    assert [f["activity"]["id"] for f in frames[1:]] == [f"{a}-{ts}" for ts in (3, 9, 1, 7)]
    assert t.size(other) == 5 and t.size(online) == 5


def test_one_user_with_more_items_than_one_command_takes(
    redis_client: redis.Redis,
    settings,
    ids: Callable[[str], str],  # type: ignore[no-untyped-def]
) -> None:
    """A user receiving thousands of items in one call (the script adds them 1,000 at a time)."""
    online, a = ids("on"), ids("a")
    _attach(settings, online)
    t = _timelines(redis_client, cap=3000)
    inserted, pushed = t.insert([_insert(ts, f"{a}-{ts}", [online]) for ts in range(2500)])
    assert (inserted, pushed) == (2500, 2500)
    assert t.size(online) == 2500
    seqs = [int(eid.split(b"-")[0]) for eid, _ in redis_client.xrange(keys.deliveries(online))]
    assert seqs[-1] == 2500 and seqs == sorted(seqs)


def test_only_active_skips_inactive_offline_users_per_group(
    redis_client: redis.Redis,
    settings,
    ids: Callable[[str], str],  # type: ignore[no-untyped-def]
) -> None:
    active, inactive, online, a = ids("act"), ids("inact"), ids("on"), ids("a")
    redis_client.set(keys.active(active), "1")
    _attach(settings, online)
    t = RedisTimelines(
        redis_client, timeline_max=10, stream_history=100, body_ttl_s=600, only_active=True
    )
    inserted, pushed = t.insert(
        [_insert(ts, f"{a}-{ts}", [active, inactive, online]) for ts in (1, 2, 3)]
    )
    assert (inserted, pushed) == (6, 3)
    assert (t.size(active), t.size(inactive), t.size(online)) == (3, 0, 3)


def test_an_item_the_cap_trims_at_once_is_not_pushed_so_a_replay_never_repeats_it(
    redis_client: redis.Redis,
    settings,
    ids: Callable[[str], str],  # type: ignore[no-untyped-def]
) -> None:
    """An online user's timeline is full; an older activity arrives (a late or replayed create):
    the cap trims it straight back out, so it is not pushed, and delivering it again pushes
    nothing either — the client never sees one item twice. The same holds within one call that
    brings more items than the cap: only the ones the timeline keeps are pushed."""
    online, a = ids("on"), ids("a")
    epoch = _attach(settings, online)
    t = _timelines(redis_client, cap=5)
    assert t.insert([_insert(ts, f"{a}-{ts}", [online]) for ts in range(10, 15)]) == (5, 5)
    old = _insert(1, f"{a}-1", [online])
    pushes = [t.insert([old])[1] for _ in range(2)]  # delivered, then delivered again
    assert pushes == [0, 0]
    assert t.size(online) == 5
    # One call: three newer items and two older than everything kept.
    batch = [_insert(ts, f"{a}-{ts}", [online]) for ts in (20, 2, 21, 3, 22)]
    inserted, pushed = t.insert(batch)
    assert (inserted, pushed) == (5, 3)
    assert t.insert(batch)[1] == 0  # the replay of the call
    frames = [
        msgspec.json.decode(fields[b"f"])
        for _, fields in redis_client.xrange(keys.deliveries(online))
    ]
    pushed_ids = [f["activity"]["id"] for f in frames]
    assert len(pushed_ids) == len(set(pushed_ids)), pushed_ids
    assert pushed_ids == [f"{a}-{ts}" for ts in (10, 11, 12, 13, 14, 20, 21, 22)]
    assert [f["cursor"] for f in frames] == [f"{epoch}.{n}" for n in range(1, 9)]
    kept = [m.split(":", 1)[1] for m in t.page(online, None, 10).members]
    assert kept == [f"{a}-{ts}" for ts in (22, 21, 20, 14, 13)]
