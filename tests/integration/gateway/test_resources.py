"""The gateway when its stores fail, against the session stack's real Redis and Cassandra.

Failures are produced by the real servers, for one test user only: a key of the wrong type makes
Redis answer ``WRONGTYPE`` to exactly the call under test (the read of whom a user follows, the
insert of a large account's activity into a follower's timeline), and a dedicated gateway whose
Cassandra driver is shut down meets ``NoHostAvailable`` as in an outage.

Large accounts (hybrid fan-out) are set up as the fan-out worker leaves them: the follow in the
Cassandra graph, the account in Redis's ``big-accounts`` set, and its activities announced by the
worker's own outbox script (``RedisTimelines.add_to_outboxes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis
import structlog
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fanout.followers import BIG_SENTINEL
from feed import keys, versions
from feed.cursor import order_key
from feed.graph_cassandra import CassandraFollowGraph
from feed.interfaces import Insert
from feed.settings import Settings
from feed.timelines_redis import RedisTimelines
from gateway import closecodes
from gateway.auth import mint_token
from gateway.resources import Gateway
from tests.support.live_gateway import LiveGateway, live_gateway
from tests.support.pipeline import next_frame, resumed_stream
from tests.support.procs import free_port

TIMEOUT = 15.0


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def gw(settings: Settings) -> Iterator[LiveGateway]:
    with live_gateway(settings) as live:
        yield live


def _gateway(live: LiveGateway) -> Gateway:
    gateway: Gateway = live.server.gateway
    return gateway


@pytest.fixture
def fast_retries(gw: LiveGateway) -> Iterator[Gateway]:
    gateway = _gateway(gw)
    saved = gateway.big_accounts.actor_retry_pause_s, gateway.big_accounts.actor_refresh_pause_s
    gateway.big_accounts.actor_retry_pause_s, gateway.big_accounts.actor_refresh_pause_s = 0.05, 0.2
    yield gateway
    gateway.big_accounts.actor_retry_pause_s, gateway.big_accounts.actor_refresh_pause_s = saved


def token(settings: Settings, user: str) -> str:
    assert settings.jwt_secret is not None
    return mint_token(settings.jwt_secret, user, 600)


@dataclasses.dataclass
class BigAccount:
    """A large account ``star`` followed by ``fan``."""

    star: str
    fan: str
    settings: Settings
    redis: redis.Redis

    def post(self, tag: str) -> str:
        """A new activity of the star, announced as the worker does; its id."""
        activity_id = uid(tag)
        body = json.dumps(
            {
                "id": activity_id,
                "type": "Create",
                "actor": self.star,
                "object": f"post:{tag}",
                "published": datetime.now(UTC).isoformat(),
            }
        ).encode()
        member = order_key(int(datetime.now(UTC).timestamp() * 1_000_000), activity_id)
        timelines = RedisTimelines(
            self.redis, timeline_max=800, stream_history=1000, body_ttl_s=3600
        )
        assert timelines.add_to_outboxes([(self.star, Insert(member, activity_id, body, []))]) == 1
        return activity_id

    def post_many(self, tag: str, count: int) -> list[str]:
        """``count`` new activities of the star, announced by one run of the worker's outbox
        script (one burst on the actor channel); their ids, oldest first."""
        now = int(datetime.now(UTC).timestamp() * 1_000_000)
        items = []
        for n in range(count):
            activity_id = uid(f"{tag}{n}")
            body = json.dumps(
                {
                    "id": activity_id,
                    "type": "Create",
                    "actor": self.star,
                    "object": f"post:{tag}{n}",
                    "published": datetime.now(UTC).isoformat(),
                }
            ).encode()
            member = order_key(now + n, activity_id)
            items.append((self.star, Insert(member, activity_id, body, [])))
        timelines = RedisTimelines(
            self.redis, timeline_max=800, stream_history=1000, body_ttl_s=3600
        )
        assert timelines.add_to_outboxes(items) == count
        return [item.activity_id for _, item in items]

    def subscribed(self) -> bool:
        channel = keys.actor_channel(self.star).encode()
        return channel in set(self.redis.pubsub_channels())


def bump_following(client: redis.Redis, user: str) -> None:
    """A new version of whom ``user`` follows, set as the worker sets it on a follow."""
    client.eval(versions.BUMP, 1, keys.following_version(user), versions.new_token())


@pytest.fixture
def big(settings: Settings, cassandra: Any, redis_client: redis.Redis) -> BigAccount:
    star, fan = uid("star"), uid("fan")
    CassandraFollowGraph(cassandra, settings.cassandra_keyspace).follow(
        fan, star, datetime.now(UTC)
    )
    redis_client.sadd(keys.big_accounts, BIG_SENTINEL, star)
    return BigAccount(star, fan, settings, redis_client)


async def eventually(check: Any, what: str, timeout: float = TIMEOUT) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def feed_ids(live: LiveGateway, settings: Settings, user: str) -> list[str]:
    async with httpx.AsyncClient(base_url=live.base, timeout=TIMEOUT) as client:
        response = await client.get(
            "/v1/feed", headers={"Authorization": f"Bearer {token(settings, user)}"}
        )
    assert response.status_code == 200, response.text
    return [item["activity"]["id"] for item in response.json()["items"]]


@pytest.fixture
async def stream(gw: LiveGateway, big: BigAccount) -> AsyncIterator[Any]:
    async with resumed_stream(gw.ws, token(big.settings, big.fan)) as (ws, _welcome):
        yield ws


# --- large accounts ------------------------------------------------------------------------------
async def test_failed_read_of_followed_accounts_at_connect_ends_in_reset_then_live(
    gw: LiveGateway, big: BigAccount, fast_retries: Gateway
) -> None:
    version = keys.following_version(big.fan)
    big.redis.hset(version, "not", "a counter")  # reading whom the fan follows now fails
    try:
        async with resumed_stream(gw.ws, token(big.settings, big.fan)) as (ws, _welcome):
            assert not big.subscribed()  # connected, but cut off from the star's pushes
            missed = big.post("missed")  # nobody here hears it
            big.redis.delete(version)  # Redis answers again: the gateway's retry succeeds
            assert await next_frame(ws, TIMEOUT) == {"type": "reset"}
            await eventually(big.subscribed, "the star's channel subscribed")
            live = big.post("live")
            frame = await next_frame(ws, TIMEOUT)
            assert frame["type"] == "activity" and frame["activity"]["id"] == live
            # What the reset sends the client to refetch has the missed activity.
            assert missed in await feed_ids(gw, big.settings, big.fan)
    finally:
        big.redis.delete(version)


async def test_failed_push_of_a_large_accounts_activity_ends_in_reset(
    gw: LiveGateway, big: BigAccount, stream: Any, fast_retries: Gateway
) -> None:
    await eventually(big.subscribed, "the star's channel subscribed")
    timeline = keys.timeline(big.fan)
    big.redis.set(timeline, "not a sorted set")  # the insert script now fails: WRONGTYPE
    try:
        lost = big.post("lost")
        assert await next_frame(stream, TIMEOUT) == {"type": "reset"}
    finally:
        big.redis.delete(timeline)
    assert lost in await feed_ids(gw, big.settings, big.fan)  # the refetch has it
    after = big.post("after")
    frame = await next_frame(stream, TIMEOUT)
    assert frame["type"] == "activity" and frame["activity"]["id"] == after


async def test_push_that_fails_once_is_repaired_by_its_retry(
    gw: LiveGateway, big: BigAccount, stream: Any
) -> None:
    gateway = _gateway(gw)
    saved = gateway.big_accounts.actor_retry_pause_s
    gateway.big_accounts.actor_retry_pause_s = 1.0  # room to repair Redis between two attempts
    await eventually(big.subscribed, "the star's channel subscribed")
    timeline = keys.timeline(big.fan)
    big.redis.set(timeline, "not a sorted set")
    try:
        with structlog.testing.capture_logs() as logs:
            posted = big.post("retried")

            def failed_once() -> bool:
                return any(
                    e.get("event") == "actor_delivery_failed" and e.get("actor") == big.star
                    for e in list(logs)
                )

            await eventually(failed_once, "the first attempt to fail")
            big.redis.delete(timeline)
            frame = await next_frame(stream, TIMEOUT)
    finally:
        big.redis.delete(timeline)
        gateway.big_accounts.actor_retry_pause_s = saved
    assert frame["type"] == "activity" and frame["activity"]["id"] == posted  # no reset


class Peak:
    """The largest value ``measure`` took, sampled every millisecond (from this loop, while the
    gateway runs in its own thread) until the ``with`` block ends."""

    def __init__(self, measure: Any) -> None:
        self.measure = measure
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.measure())
            await asyncio.sleep(0.001)

    async def __aenter__(self) -> Peak:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak = max(self.peak, self.measure())


async def test_a_burst_of_following_changes_is_one_read_in_flight_and_the_last_state_wins(
    gw: LiveGateway,
    big: BigAccount,
    stream: Any,
    cassandra: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every follow or unfollow publishes a control frame on the follower's channel; each one
    used to start a read of whom the user follows, in a task of its own: a burst of N follows
    meant N tasks and N reads at once. Now at most one read per user is in flight, and a change
    during it makes one more read after it, which sees the newest graph."""
    gateway = _gateway(gw)
    await eventually(big.subscribed, "the star's channel subscribed")
    reader = gateway.reader
    real = reader.big_followees
    reads = {"now": 0, "peak": 0, "total": 0}

    async def counted(user: str) -> list[str]:  # the real read, counted
        if user == big.fan:
            reads["now"] += 1
            reads["total"] += 1
            reads["peak"] = max(reads["peak"], reads["now"])
        try:
            return await real(user)
        finally:
            if user == big.fan:
                reads["now"] -= 1

    monkeypatch.setattr(reader, "big_followees", counted)
    second = uid("star2")  # followed in the graph during the burst: the last read must see it
    burst = 300
    channel = keys.channel(big.fan)
    async with Peak(lambda: gateway.tracked()["background_tasks"]) as tasks:
        pipe = big.redis.pipeline(transaction=False)
        for _ in range(burst):
            pipe.publish(channel, keys.CONTROL_FOLLOWING)
        pipe.execute()
        CassandraFollowGraph(cassandra, big.settings.cassandra_keyspace).follow(
            big.fan, second, datetime.now(UTC)
        )
        big.redis.sadd(keys.big_accounts, second)
        bump_following(big.redis, big.fan)  # as the worker does on a follow
        big.redis.publish(channel, keys.CONTROL_FOLLOWING)
        second_channel = keys.actor_channel(second).encode()
        await eventually(
            lambda: second_channel in set(big.redis.pubsub_channels()),
            "the account followed during the burst subscribed",
        )
        await eventually(lambda: not gateway.tracked()["refreshes"], "the refreshes to end")
    assert reads["peak"] == 1, reads
    assert reads["total"] < burst // 10, reads  # coalesced: a few reads, not one per change
    # One refresh task at a time (and nothing else was running).
    assert tasks.peak <= 1, f"{tasks.peak} background tasks at once for one user's follows"
    assert big.subscribed()  # the first star is still followed


async def test_a_large_accounts_backlog_is_bounded_and_past_it_ends_in_reset(
    gw: LiveGateway, big: BigAccount, stream: Any
) -> None:
    """Redis refuses the fan's timeline while the star posts a burst: the messages wait for the
    one in flight (retried for ~3 s). They used to wait as one task each, without a bound; now
    at most ``ACTOR_QUEUE_MAX`` wait, past it the backlog is dropped and the fan gets ``reset``
    (the items are in the outbox, so the refetch has them all), and the star's later posts come
    live again once Redis answers."""
    from gateway.big_accounts import ACTOR_QUEUE_MAX

    gateway = _gateway(gw)
    saved = gateway.big_accounts.actor_retry_pause_s
    gateway.big_accounts.actor_retry_pause_s = 1.0  # the first message holds the line for 1 + 2 s
    await eventually(big.subscribed, "the star's channel subscribed")
    timeline = keys.timeline(big.fan)
    big.redis.set(timeline, "not a sorted set")  # every insert for the fan fails: WRONGTYPE
    burst = 2 * ACTOR_QUEUE_MAX + 100
    posted: list[str] = []
    try:
        async with Peak(lambda: gateway.tracked()["background_tasks"]) as tasks:
            with structlog.testing.capture_logs() as logs:
                posted = big.post_many("burst", burst)
                frame = await next_frame(stream, TIMEOUT)
                assert frame == {"type": "reset"}, frame
            big.redis.delete(timeline)  # Redis answers again
            marker = big.post("marker")
            for _ in range(burst + 10):  # what was still queued arrives, then the marker
                frame = await next_frame(stream, 30)
                if frame.get("type") == "activity" and frame["activity"]["id"] == marker:
                    break
            else:
                pytest.fail("the marker never came")
    finally:
        big.redis.delete(timeline)
        gateway.big_accounts.actor_retry_pause_s = saved
    assert tasks.peak <= 2, f"{tasks.peak} tasks held for one actor's backlog"
    dropped = [e for e in logs if e.get("event") == "actor_backlog_dropped"]
    assert dropped and all(e["messages"] == ACTOR_QUEUE_MAX + 1 for e in dropped), dropped
    assert not gateway.tracked()["actor_messages_queued"]
    assert set(posted) <= set(await all_feed_ids(gw, big.settings, big.fan))  # nothing lost


async def all_feed_ids(live: LiveGateway, settings: Settings, user: str) -> list[str]:
    """Every id of ``user``'s feed, page after page (bounded)."""
    ids: list[str] = []
    cursor: str | None = None
    async with httpx.AsyncClient(base_url=live.base, timeout=TIMEOUT) as client:
        for _ in range(50):
            params = {"limit": "200", **({"cursor": cursor} if cursor else {})}
            response = await client.get(
                "/v1/feed",
                params=params,
                headers={"Authorization": f"Bearer {token(settings, user)}"},
            )
            assert response.status_code == 200, response.text
            body = response.json()
            ids += [item["activity"]["id"] for item in body["items"]]
            cursor = body["next"]
            if cursor is None:
                return ids
    pytest.fail("the feed did not end within 50 pages")


class Forwarder:
    """A TCP path 127.0.0.1:``port`` -> 127.0.0.1:``target`` that the test opens when it wants
    the server behind it reachable (its own event loop, in a thread; stopped by the test)."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), self._loop
        ).result(10)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            writers = list(self._pipes)
            for writer in writers:
                writer.close()
            # Let the transports close their sockets before the loop stops (a closed writer's
            # socket is released on a later loop iteration; stopping first leaked it).
            for writer in writers:
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._pipes.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()
                self._pipes.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def serving(settings: Settings) -> contextlib.AbstractContextManager[LiveGateway]:
    """The gateway for ``settings`` on a free port, without waiting for its dependencies."""
    return live_gateway(settings, wait_ready=False)


async def test_followed_accounts_are_read_once_cassandra_connects_then_reset_and_live(
    settings: Settings, big: BigAccount
) -> None:
    forwarder = Forwarder(free_port(), settings.cassandra_port)
    # The gateway's Cassandra is behind the forwarder, which is not open yet: it starts without
    # its follow graph and connects in the background.
    offline = dataclasses.replace(settings, cassandra_port=forwarder.port)
    try:
        with serving(offline) as live:
            async with resumed_stream(live.ws, token(settings, big.fan)) as (ws, _welcome):
                assert not big.subscribed()
                missed = big.post("before-cassandra")
                forwarder.start()
                assert await next_frame(ws, 60) == {"type": "reset"}
                await eventually(big.subscribed, "the star's channel subscribed")
                posted = big.post("after-cassandra")
                frame = await next_frame(ws, TIMEOUT)
                assert frame["type"] == "activity" and frame["activity"]["id"] == posted
                assert missed in await feed_ids(live, settings, big.fan)
    finally:
        forwarder.stop()


# --- Redis outage --------------------------------------------------------------------------------
async def test_a_connect_without_redis_is_closed_1013_and_counted(settings: Settings) -> None:
    """A gateway whose Redis does not answer cannot subscribe a user's channel: the connect is
    closed with 1013 (try again later), and, like every close the gateway decides, counted in
    ``feed_gateway_closes_total{code}`` (this one was not: it was closed apart from the others)."""
    unreachable = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with serving(unreachable) as live:
        async with connect(f"{live.ws}?token={token(settings, uid('early'))}") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 30)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == closecodes.TRY_AGAIN_LATER.code
        async with httpx.AsyncClient(base_url=live.base, timeout=TIMEOUT) as client:
            metrics = (await client.get("/metrics")).text
        assert 'feed_gateway_closes_total{code="1013"} 1.0' in metrics, metrics[-2000:]


# --- Cassandra outage ----------------------------------------------------------------------------
async def test_cassandra_outage_on_a_page_read_is_503_with_retry_after(settings: Settings) -> None:
    with live_gateway(settings) as live:
        gateway = _gateway(live)
        async with httpx.AsyncClient(base_url=live.base, timeout=TIMEOUT) as client:
            auth = {"Authorization": f"Bearer {token(settings, uid('cold'))}"}
            assert (await client.get("/v1/feed", headers=auth)).status_code == 200
            await asyncio.to_thread(gateway.cassandra.cluster.shutdown)  # every node gone
            # A user with no hot timeline is read from Cassandra.
            auth = {"Authorization": f"Bearer {token(settings, uid('cold'))}"}
            response = await client.get("/v1/feed", headers=auth)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "unavailable"
            assert int(response.headers["retry-after"]) >= 1
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["dependencies"]["cassandra"]["ok"] is False
            assert str(settings.cassandra_port) not in ready.text


# --- large accounts' items announced while the follower was offline ------------------------------
async def _activity(ws: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
    frame = await next_frame(ws, timeout)
    assert frame.get("type") == "activity", frame
    return frame


async def test_items_a_large_account_posted_while_the_follower_was_offline_are_resumed(
    gw: LiveGateway, big: BigAccount
) -> None:
    """The contract's resume: every item after the cursor, in order, no gap. A large account's
    items reach a follower's delivery stream only while a gateway holding the follower is
    subscribed to the account's channel; those it posted while the follower was offline (the
    stream alive, within the resume window) were skipped by the resume without a word."""
    fan_token = token(big.settings, big.fan)
    async with resumed_stream(gw.ws, fan_token) as (ws, _welcome):
        await eventually(big.subscribed, "the star's channel subscribed")
        seen = big.post("seen")
        frame = await _activity(ws)
        assert frame["activity"]["id"] == seen
        cursor = frame["cursor"]
    await eventually(lambda: not big.subscribed(), "the star's channel dropped (fan offline)")
    missed = [big.post("missed-1"), big.post("missed-2")]
    async with resumed_stream(gw.ws, fan_token, cursor) as (ws, welcome):
        assert welcome["cursor"].partition(".")[0] == cursor.partition(".")[0]  # same stream
        replayed = [await _activity(ws), await _activity(ws)]
        assert [f["activity"]["id"] for f in replayed] == missed
        live = big.post("live")
        after = await _activity(ws)
        assert after["activity"]["id"] == live
    seqs = [int(f["cursor"].rpartition(".")[2]) for f in [frame, *replayed, after]]
    assert seqs == list(range(seqs[0], seqs[0] + 4)), seqs  # no gap, no repeat


async def test_a_large_account_followed_while_offline_makes_an_older_resume_reset(
    gw: LiveGateway, big: BigAccount, cassandra: Any
) -> None:
    """What an account followed while the user was offline announced meanwhile is not in the
    stream, and which of its items came after the cursor cannot be known: the resume is
    answered with ``reset`` (the refetch has them), then live frames follow."""
    fan_token = token(big.settings, big.fan)
    async with resumed_stream(gw.ws, fan_token) as (ws, welcome):
        await eventually(big.subscribed, "the star's channel subscribed")
        cursor = welcome["cursor"]
    await eventually(lambda: not big.subscribed(), "the star's channel dropped (fan offline)")
    other = BigAccount(uid("star3"), big.fan, big.settings, big.redis)
    CassandraFollowGraph(cassandra, big.settings.cassandra_keyspace).follow(
        big.fan, other.star, datetime.now(UTC)
    )
    big.redis.sadd(keys.big_accounts, other.star)
    bump_following(big.redis, big.fan)  # as the worker does on a follow
    posted = other.post("while-offline")
    async with resumed_stream(gw.ws, fan_token, cursor) as (ws, _welcome):
        assert await next_frame(ws, TIMEOUT) == {"type": "reset"}
        assert posted in await feed_ids(gw, big.settings, big.fan)  # what the refetch shows
        await eventually(other.subscribed, "the new star's channel subscribed")
        live = other.post("live")
        assert (await _activity(ws))["activity"]["id"] == live
    # The next connect resumes from a cursor after that point without a reset.
    async with resumed_stream(gw.ws, fan_token) as (ws, _welcome):
        await eventually(other.subscribed, "the new star's channel subscribed")
        again = other.post("again")
        assert (await _activity(ws))["activity"]["id"] == again


async def test_an_item_announced_while_pubsub_was_down_reaches_the_connected_follower(
    gw: LiveGateway, big: BigAccount, stream: Any
) -> None:
    """A user's own frames lost while the Pub/Sub connection was down are re-read from their
    stream; a large account's announcement lost meanwhile was in no stream: the follower, still
    connected, never got the item. The reconnect now catches their stream up."""
    await eventually(big.subscribed, "the star's channel subscribed")
    big.redis.client_kill_filter(_type="pubsub")  # every gateway's Pub/Sub connection drops
    lost = big.post("during-outage")  # announced while nobody is subscribed
    frame = await _activity(stream)
    assert frame["activity"]["id"] == lost
    after = big.post("after")
    assert (await _activity(stream))["activity"]["id"] == after
