"""The fan-out Processor's domain logic on the in-memory stores (``feed.memory``): no servers.

The same processor runs on Redis and Cassandra in
``tests/integration/fanout/test_processor.py``; the stores themselves meet one shared suite on
both (``tests/support/suites``). The pure recipient rule is tested here too."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import msgspec
import pytest

from fanout.processor import RejectedRecord, _recipients
from feed import keys
from feed.memory import MemoryDeliveryStream, MemoryGraphVersions
from schemas.activity import decode_activity
from tests.support.events import act, delete, follow
from tests.support.memory_world import World, make

Ids = Callable[[str], str]


@pytest.fixture
def world() -> Iterator[World]:
    w = make()
    yield w
    w.processor.close()


def test_fan_out_reaches_followers_and_to_once(world: World, ids: Ids) -> None:
    u1, u2, u3, u9, a = ids("u1"), ids("u2"), ids("u3"), ids("u9"), ids("a")
    world.processor.apply([(0, follow(u2, u1, 1)), (1, follow(u3, u1, 2))])
    stats = world.processor.apply([(0, act(a, u1, 1, to=[u9, u2]))])
    assert (stats.activities, stats.inserted, stats.history_rows) == (1, 3, 3)
    assert world.timeline(u2) == world.timeline(u3) == world.timeline(u9) == [a]
    assert world.timeline(u1) == []
    again = world.processor.apply([(0, act(a, u1, 1, to=[u9, u2]))])
    assert (again.inserted, again.pushed, again.rejected) == (0, 0, [])


async def test_online_followers_get_frames_in_order(world: World, ids: Ids) -> None:
    star, fan, a = ids("star"), ids("fan"), ids("a")
    world.processor.apply([(0, follow(fan, star, 1))])
    presence = await _attach(world, fan)
    stats = world.processor.apply([(n, act(f"{a}-{n}", star, n)) for n in range(3)])
    assert stats.pushed == 3
    frames = world.redis.streams[fan]
    assert [seq for seq, _ in frames] == [presence + 1, presence + 2, presence + 3]
    assert [msgspec.json.decode(f)["activity"]["id"] for _, f in frames] == [
        f"{a}-{n}" for n in range(3)
    ]


def test_the_first_create_of_an_id_wins_for_good(world: World, ids: Ids) -> None:
    owner, thief, fan, a = ids("owner"), ids("thief"), ids("fan"), ids("a")
    world.processor.apply([(0, follow(fan, owner, 1)), (1, follow(fan, thief, 2))])
    first = world.processor.apply([(0, act(a, owner, 1, to=[fan]))])
    assert first.rejected == []
    stats = world.processor.apply([(7, act(a, thief, 2)), (8, act(a, owner, 3, content="edited"))])
    ((index, rejected),) = stats.rejected
    assert (index, rejected.code, rejected.field) == (7, "id_conflict", "id")
    assert stats.inserted == 0  # the owner's second create delivers nothing new
    stored = world.history.stored(a)
    assert stored is not None and stored.actor == owner
    assert b"edited" not in (stored.body or b"")
    assert world.timeline(fan) == [a]


def test_an_id_claimed_by_a_concurrent_create_is_rejected(world: World, ids: Ids) -> None:
    mine, other, a = ids("mine"), ids("other"), ids("a")
    world.timelines.claim([(a, other)], 60)  # another worker is creating it now
    stats = world.processor.apply([(3, act(a, mine, 1))])
    assert [(i, r.code) for i, r in stats.rejected] == [(3, "id_conflict")]
    assert world.history.stored(a) is None


async def test_a_delete_removes_everywhere_and_stays_deleted(world: World, ids: Ids) -> None:
    author, fan, late, a = ids("author"), ids("fan"), ids("late"), ids("a")
    world.processor.apply([(0, follow(fan, author, 1))])
    world.processor.apply([(0, act(a, author, 1))])
    world.processor.apply([(0, follow(late, author, 2))])  # backfilled
    assert world.timeline(fan) == world.timeline(late) == [a]
    online = await _attach(world, fan)
    stats = world.processor.apply([(0, delete(ids("d"), author, a))])
    assert stats.rejected == []
    assert world.timeline(fan) == world.timeline(late) == []
    ((_, frame),) = [(s, f) for s, f in world.redis.streams[fan] if s > online]
    assert msgspec.json.decode(frame)["type"] == "removed"
    assert world.redis.bodies.get(a) is None
    stored = world.history.stored(a)
    assert stored is not None and stored.deleted and stored.actor == author
    world.redis.flush()  # Redis lost its deleted markers: history still says deleted
    replay = world.processor.apply([(0, act(a, author, 1))])
    assert (replay.inserted, replay.rejected) == (0, [])
    assert world.timeline(fan) == []


@pytest.mark.parametrize("who", ["nobody's", "someone else's"])
def test_a_delete_of_what_the_actor_did_not_create_is_rejected(
    world: World, ids: Ids, who: str
) -> None:
    author, other, fan, a = ids("author"), ids("other"), ids("fan"), ids("a")
    world.processor.apply([(0, follow(fan, author, 1)), (1, act(a, author, 1))])
    target, code = (ids("missing"), "not_found") if who == "nobody's" else (a, "forbidden")
    stats = world.processor.apply([(5, delete(ids("d"), other, target))])
    ((index, rejected),) = stats.rejected
    assert isinstance(rejected, RejectedRecord)
    assert (index, rejected.code, rejected.field) == (5, code, "object")
    assert world.timeline(fan) == [a]


def test_follow_backfills_and_unfollow_removes_except_what_was_addressed(
    world: World, ids: Ids
) -> None:
    star, fan, a = ids("star"), ids("fan"), ids("a")
    world.processor.apply(
        [(n, act(f"{a}-{n}", star, n, to=[fan] if n == 0 else [])) for n in range(5)]
    )
    assert world.timeline(fan) == [f"{a}-0"]
    world.processor.apply([(0, follow(fan, star, 1))])  # backfill: the newest 3
    assert world.timeline(fan) == [f"{a}-{n}" for n in (4, 3, 2, 0)]
    world.processor.apply([(0, follow(fan, star, 2, "unfollow"))])
    assert world.timeline(fan) == [f"{a}-0"]  # addressed to the fan: stays


def test_follow_events_applied_out_of_order_end_as_the_later_one(world: World, ids: Ids) -> None:
    star, fan, a = ids("star"), ids("fan"), ids("a")
    world.processor.apply([(0, act(a, star, 1))])
    world.processor.apply([(0, follow(fan, star, 9, "unfollow"))])
    world.processor.apply([(0, follow(fan, star, 1))])  # older: the graph keeps the unfollow
    assert not world.graph.is_following(fan, star)
    assert world.timeline(fan) == []


def test_a_follow_bumps_both_versions_and_tells_the_followers_gateways(
    world: World, ids: Ids
) -> None:
    star, fan = ids("star"), ids("fan")
    versions = MemoryGraphVersions(world.redis)
    before = versions.follower_state([star], big=False).versions
    following = world.redis.version(keys.following_version(fan))
    world.processor.apply([(0, follow(fan, star, 1))])
    assert versions.follower_state([star], big=False).versions != before
    assert world.redis.version(keys.following_version(fan)) != following
    assert world.redis.notifier.messages(keys.channel(fan).encode()) == [keys.CONTROL_FOLLOWING]


def test_large_accounts_are_merged_at_read_time_not_fanned_out(ids: Ids) -> None:
    w = make(fanout_limit=2)
    star, a = ids("star"), ids("a")
    fans = [f"{ids('fan')}-{n}" for n in range(3)]
    w.processor.apply([(n, follow(f, star, n)) for n, f in enumerate(fans)])
    stats = w.processor.apply([(0, act(a, star, 1))])
    assert stats.inserted == 0 and all(w.timeline(f) == [] for f in fans)
    assert star in w.redis.big and star in w.history.big_accounts()
    assert [m.partition(":")[2] for m in w.redis.outboxes[star]] == [a]
    announced = w.redis.notifier.messages(keys.actor_channel(star).encode())
    assert len(announced) == 1 and announced[0].startswith(b"+")
    late = ids("late")
    w.processor.apply([(0, follow(late, star, 9))])  # a large account: nothing to copy
    assert w.timeline(late) == []
    w.processor.close()


def test_deferred_writes_complete_in_order(world: World, ids: Ids) -> None:
    star, fan, a = ids("star"), ids("fan"), ids("a")
    world.processor.apply([(0, follow(fan, star, 1))])
    stats = world.processor.apply([(n, act(f"{a}-{n}", star, n)) for n in range(4)], defer=True)
    world.processor.complete(stats)
    assert stats.inserted == 4 and stats.deferred == []
    assert world.timeline(fan) == [f"{a}-{n}" for n in (3, 2, 1, 0)]


def test_without_history_rows_a_delete_still_reaches_every_recipient(ids: Ids) -> None:
    w = make(history_timelines=False)
    star, fan, a = ids("star"), ids("fan"), ids("a")
    w.processor.apply([(0, follow(fan, star, 1)), (1, act(a, star, 1))])
    assert [m.partition(":")[2] for m in w.timelines.page(fan, None, 10).members] == [a]
    assert w.history.page_timeline(fan, None, 10) == []
    w.processor.apply([(0, delete(ids("d"), star, a))])
    assert w.timelines.page(fan, None, 10).members == []
    w.processor.close()


async def _attach(world: World, user: str) -> int:
    """Connect ``user`` (a presence): returns the stream's current seq."""
    return (await MemoryDeliveryStream(world.redis).attach(user)).seq


def test_recipients_are_followers_then_extra_to() -> None:
    activity = decode_activity(
        msgspec.json.encode(
            {
                "id": "a",
                "type": "Create",
                "actor": "u1",
                "object": "o",
                "published": "2026-01-01T00:00:00Z",
                "to": ["u9", "u2", "u9"],
            }
        )
    )
    assert _recipients(activity.to, ("u2", "u3")) == ("u2", "u3", "u9")
    assert _recipients([], ("u2",)) == ("u2",)


async def test_pushed_frames_carry_when_their_record_entered_the_pipeline(
    world: World, ids: Ids
) -> None:
    """``origins`` (the records' Kafka timestamps, by the caller's index) become each frame's
    ``ts``; the first record of an id gives it, and a record without one gives a frame without
    it (feed.stages measures delivery latency from it)."""
    star, fan, a = ids("star"), ids("fan"), ids("a")
    world.processor.apply([(0, follow(fan, star, 1))])
    await _attach(world, fan)
    origins = [1_765_000_000_123, 1_765_000_000_456, None]
    events = [(0, act(f"{a}-0", star, 0)), (1, act(f"{a}-1", star, 1)), (2, act(f"{a}-2", star, 2))]
    world.processor.apply(events, origins=origins)
    frames = [msgspec.json.decode(f) for _, f in world.redis.streams[fan]]
    assert [(f["activity"]["id"], f.get("ts")) for f in frames] == [
        (f"{a}-0", origins[0]),
        (f"{a}-1", origins[1]),
        (f"{a}-2", None),
    ]
    assert "ts" not in frames[2]


def test_notify_reaches_each_listed_user_but_the_actor_once_and_a_delete_undoes_it(
    world: World, ids: Ids
) -> None:
    owner, ann, bob, a, b = ids("owner"), ids("ann"), ids("bob"), ids("a"), ids("b")
    like = {"type": "Like", "object": "post:1"}
    world.processor.apply(
        [
            (0, act(a, ann, 1, notify=[owner, ann, owner, bob], **like)),
            (1, act(b, bob, 2, notify=[owner], **like)),
            (2, act(a, ann, 1, notify=[owner], **like)),  # a replay
        ]
    )
    groups = world.notifications.book(owner).ordered()
    assert [sorted(g.items) for g in groups] == [sorted([a, b])]
    assert [sorted(g.items) for g in world.notifications.book(bob).ordered()] == [[a]]
    assert world.notifications.book(ann).ordered() == []  # never the actor
    world.processor.apply([(0, delete(ids("d"), ann, a))])
    assert [sorted(g.items) for g in world.notifications.book(owner).ordered()] == [[b]]
    assert world.notifications.book(bob).ordered() == []
