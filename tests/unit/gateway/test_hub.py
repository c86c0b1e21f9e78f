"""The hub (``gateway.hub``) on the in-memory notifier and delivery stream (``feed.memory``).

Subscribe/unsubscribe accounting, delivery to local connections, control frames, large
accounts' channels, and the gap paths: a lost Pub/Sub link, a half-open one, a lost presence."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import msgspec
import pytest

from feed import keys
from feed.cursor import order_key
from feed.interfaces import Insert
from feed.memory import MemoryDeliveryStream, MemoryLink, MemoryRedis, MemoryTimelines
from gateway.hub import Hub, HubUnavailable, TooManyConnections
from gateway.session import PRESENCE_PREFIX, RESET_CONTROL
from tests.support.wait import eventually

Ids = Callable[[str], str]


class Conn:
    """A local connection that records what the hub does to it."""

    def __init__(self, user: str) -> None:
        self._user = user
        self.frames: list[bytes] = []
        self.gap_checks = 0
        self.shutdowns = 0
        #: The stream epoch its session follows (the adapter's session; set by the test).
        self.epoch: str | None = None

    @property
    def user(self) -> str:
        return self._user

    def deliver(self, frame: bytes) -> None:
        self.frames.append(frame)

    def check_gap(self) -> None:
        self.gap_checks += 1

    def shutdown(self) -> None:
        self.shutdowns += 1

    def activity_ids(self) -> list[str]:
        return [
            msgspec.json.decode(f)["activity"]["id"]
            for f in self.frames
            if f.startswith(b'{"type":"activity"')
        ]


class Stores:
    def __init__(self) -> None:
        self.redis = MemoryRedis()
        self.notifier = self.redis.notifier
        self.delivery = MemoryDeliveryStream(self.redis)
        self.timelines = MemoryTimelines(self.redis, timeline_max=100, stream_history=100)

    def link(self) -> MemoryLink:
        (link,) = self.notifier.links
        return link

    def push(self, user: str, activity_id: str, ts: int = 1) -> None:
        body = msgspec.json.encode({"id": activity_id})
        self.timelines.insert([Insert(order_key(ts, activity_id), activity_id, body, [user])])


@pytest.fixture
def stores() -> Stores:
    return Stores()


@pytest.fixture
async def hub(stores: Stores) -> AsyncIterator[Hub]:
    h = Hub(
        stores.notifier,
        stores.delivery,
        refresh_interval_s=0.05,
        subscribe_timeout_s=1.0,
        idle_ping_s=0.05,
        ping_timeout_s=0.2,
        reconnect_max_s=0.05,
    )
    await h.start()
    await eventually(lambda: h.connected, "the hub connected")
    yield h
    await h.stop()


async def connect(hub: Hub, stores: Stores, user: str) -> Conn:
    """What the gateway's adapter does: register (subscribed), then attach presence."""
    conn = Conn(user)
    await hub.register(conn)
    await stores.delivery.attach(user)
    return conn


async def test_one_subscription_per_user_while_connected(
    hub: Hub, stores: Stores, ids: Ids
) -> None:
    user = ids("u")
    channel = keys.channel(user).encode()
    first, second = Conn(user), Conn(user)
    await hub.register(first)
    assert channel in stores.link().channels  # confirmed before register returned
    await hub.register(second)
    assert hub.connections_of(user) == 2 and hub.connection_count == 2
    assert hub.channels() == [channel.decode()]
    hub.unregister(first)
    assert channel in stores.link().channels
    hub.unregister(second)
    hub.unregister(second)  # twice: no-op
    assert channel not in stores.link().channels
    await eventually(lambda: not any(hub.tracked().values()), "nothing tracked")


async def test_too_many_connections_adds_nothing(hub: Hub, ids: Ids) -> None:
    user = ids("u")
    await hub.register(Conn(user), max_per_user=1)
    with pytest.raises(TooManyConnections):
        await hub.register(Conn(user), max_per_user=1)
    assert hub.connections_of(user) == 1


async def test_frames_reach_every_connection_of_their_user_only(
    hub: Hub, stores: Stores, ids: Ids
) -> None:
    user, other = ids("u"), ids("other")
    mine = [await connect(hub, stores, user) for _ in range(2)]
    theirs = await connect(hub, stores, other)
    for n in range(5):
        stores.push(user, f"a{n}", ts=n)
    await eventually(lambda: all(len(c.frames) == 5 for c in mine), "5 frames each")
    assert mine[0].activity_ids() == [f"a{n}" for n in range(5)]  # in seq order
    assert all(a is b for a, b in zip(mine[0].frames, mine[1].frames, strict=True))  # one bytes
    assert theirs.frames == [] and hub.messages == 5


async def test_control_frames_stay_inside(hub: Hub, stores: Stores, ids: Ids) -> None:
    user = ids("u")
    conn = await connect(hub, stores, user)
    changed: list[str] = []
    hub.on_following_changed = changed.append
    stores.notifier.publish(keys.channel(user).encode(), keys.CONTROL_FOLLOWING)
    await eventually(lambda: changed, "the control notice")
    assert changed == [user] and conn.frames == []


async def test_large_accounts_channels_follow_their_local_followers(
    hub: Hub, stores: Stores, ids: Ids
) -> None:
    star, u1, u2 = ids("star"), ids("u1"), ids("u2")
    got: list[tuple[str, list[str], bytes]] = []
    hub.on_actor_message = lambda actor, users, m: got.append((actor, sorted(users), m))
    await connect(hub, stores, u1)
    await connect(hub, stores, u2)
    hub.follow_actors(u1, [star])
    hub.follow_actors(u2, [star])
    hub.follow_actors(ids("gone"), [star])  # no connection: ignored
    assert await hub.actors_subscribed([star], timeout_s=1.0)
    assert hub.actors_of(u1) == {star}
    channel = keys.actor_channel(star).encode()
    stores.notifier.publish(channel, b"+m")
    await eventually(lambda: got, "the announcement")
    assert got == [(star, sorted([u1, u2]), b"+m")]
    hub.follow_actors(u1, [])
    assert channel in stores.link().channels  # u2 still follows
    hub.follow_actors(u2, [])
    assert channel not in stores.link().channels
    assert not await hub.actors_subscribed([star], timeout_s=0.1)


async def test_a_lost_link_is_reopened_and_every_connection_checks_its_stream(
    hub: Hub, stores: Stores, ids: Ids
) -> None:
    user = ids("u")
    conn = await connect(hub, stores, user)
    resubscribed: list[str] = []
    hub.on_resubscribed = resubscribed.append
    stores.push(user, "before")
    await eventually(lambda: conn.activity_ids() == ["before"], "the first frame")
    stores.notifier.refuse = True
    stores.link().kill()
    await eventually(lambda: not hub.connected, "the hub noticed")
    stores.push(user, "while-down", ts=2)  # at-most-once: never delivered live...
    stores.notifier.refuse = False
    await eventually(lambda: resubscribed, "the user resubscribed", timeout_s=5)
    assert resubscribed == [user] and hub.connects == 2
    assert conn.gap_checks == 1  # ...so the connection reads its stream after the last seq
    assert conn.activity_ids() == ["before"]
    presence = conn.frames[-1]
    assert presence.startswith(PRESENCE_PREFIX)  # handed over before the gap check
    assert [s for s, _ in await stores.delivery.frames_after(user, 1, 10)] == [2]
    stores.push(user, "after", ts=3)
    await eventually(lambda: conn.activity_ids() == ["before", "after"], "live again")


async def test_a_half_open_link_is_detected_by_ping(hub: Hub, stores: Stores, ids: Ids) -> None:
    conn = await connect(hub, stores, ids("u"))
    first = stores.link()
    stores.notifier.silent = True  # PINGs go unanswered
    await eventually(lambda: first.closed.done(), "the silent link dropped", timeout_s=5)
    stores.notifier.silent = False
    await eventually(lambda: conn.gap_checks == 1, "the gap check after reconnecting", 5)
    assert hub.connects == 2


async def test_a_lost_presence_is_reattached_with_a_new_epoch(
    hub: Hub, stores: Stores, ids: Ids
) -> None:
    user = ids("u")
    conn = await connect(hub, stores, user)
    old = await stores.delivery.attach(user)
    with stores.redis.lock:
        del stores.redis.presence[user]  # Redis lost it (a restart, an eviction)
    await eventually(lambda: conn.gap_checks, "the refresh noticed", timeout_s=5)
    new = await stores.delivery.attach(user)
    assert new.epoch != old.epoch
    assert conn.frames[-1] == (
        PRESENCE_PREFIX + b',"cursor":"' + f"{new.epoch}.{new.seq}".encode() + b'"}'
    )


async def test_a_rolled_back_server_renews_the_stream_of_its_users_only(
    hub: Hub, stores: Stores, ids: Ids
) -> None:
    """A Redis Cluster primary lost with its connection may come back as a replica that lacks its
    newest writes: the stream's pushed seqs could be handed out again, so the stream is renewed
    (a new epoch) rather than re-attached; the session resets on the presence frame."""
    user, other = ids("u"), ids("v")
    conn = await connect(hub, stores, user)
    bystander = await connect(hub, stores, other)
    stores.push(user, "pushed")
    await eventually(lambda: conn.activity_ids() == ["pushed"], "the first frame")
    before = await stores.delivery.attach(user)
    conn.epoch = before.epoch  # what the sessions follow
    bystander.epoch = (await stores.delivery.attach(other)).epoch
    with stores.redis.lock:  # the promoted replica never got the push: seq 1 is free again
        stores.redis.presence[user][1] = 0
    stores.link().kill(rolled_back=[keys.channel(user).encode()])
    await eventually(lambda: conn.gap_checks == 1, "the reattach after reconnecting", 5)
    await eventually(lambda: bystander.gap_checks == 1, "the bystander's reattach", 5)
    renewed = await stores.delivery.attach(user)
    assert renewed.epoch != before.epoch and renewed.seq == 0
    assert (await stores.delivery.attach(other)).epoch == bystander.epoch  # not on that server
    assert conn.frames[-1] == (
        PRESENCE_PREFIX + b',"cursor":"' + f"{renewed.epoch}.0".encode() + b'"}'
    )
    # a second gateway that saw the old epoch renews nothing: it gets the new one
    again = await stores.delivery.renew(user, before.epoch)
    assert again == renewed


async def test_a_lost_connection_keeps_the_stream(hub: Hub, stores: Stores, ids: Ids) -> None:
    """Without a rollback (one Redis, a network fault) the epoch is trusted: re-attached."""
    user = ids("u")
    conn = await connect(hub, stores, user)
    conn.epoch = (await stores.delivery.attach(user)).epoch
    stores.link().kill()
    await eventually(lambda: conn.gap_checks == 1, "the reattach after reconnecting", 5)
    assert (await stores.delivery.attach(user)).epoch == conn.epoch


async def test_register_fails_cleanly_without_a_link(stores: Stores, ids: Ids) -> None:
    stores.notifier.refuse = True
    hub = Hub(stores.notifier, stores.delivery, refresh_interval_s=1, subscribe_timeout_s=0.2)
    await hub.start()
    try:
        with pytest.raises(HubUnavailable):
            await hub.register(Conn(ids("u")))
        assert hub.connection_count == 0 and not any(hub.tracked().values())
    finally:
        await hub.stop()


async def test_go_away_and_reset(hub: Hub, stores: Stores, ids: Ids) -> None:
    conns = [await connect(hub, stores, ids(f"u{n}")) for n in range(3)]
    hub.reset_users([conns[0].user])
    assert conns[0].frames == [RESET_CONTROL] and conns[1].frames == []
    assert not await hub.go_away(0.05)  # nobody left yet
    assert all(c.shutdowns == 1 for c in conns)
    for c in conns:
        hub.unregister(c)
    assert await hub.go_away(0.5)
