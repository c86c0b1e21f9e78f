"""The gateway over real sockets: uvicorn on port 0, a real redis-server, websockets and httpx.

Frames are published the way the fan-out worker does it (``RedisTimelines.insert``). Ingest
produces to the session stack's real Kafka-protocol broker, on topics of this module's own; the
tests read back what the broker holds (``tests.support.live_gateway.read_records``). A broker that
is down is a port nothing listens on.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin

from feed.cursor import order_key
from feed.interfaces import Insert
from feed.kafka import AsyncProducer, create_topics, producer_config
from feed.settings import Secret, Settings
from feed.timelines_redis import RedisTimelines
from gateway.auth import mint_token
from gateway.server import GatewayServer, _RedactTokens, build_server
from gateway.timers import TICK_S
from schemas import Activity, encode_activity, published_us
from tests.support.live_gateway import read_records, read_records_with_headers
from tests.support.procs import free_port, stop_process

JWT_SECRET = "gateway-test-secret-" + "k" * 40
INGEST_TOKEN = "gateway-ingest-token-0123456789"
ALLOWED_ORIGIN = "http://allowed.example"
TIMEOUT = 10.0


# --- servers --------------------------------------------------------------------------------------
def _redis_server() -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server of the caller's own on a free port (stop it with ``stop_process``)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 15
    while True:
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    client.close()
    return proc, url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    proc, url = _redis_server()
    try:
        yield url
    finally:
        stop_process(proc)


class HookedProducer(AsyncProducer):
    """The gateway's real Kafka producer (``feed.kafka.AsyncProducer``, to the real broker), with a
    hook a test sets to act at the moment the records are handed over (e.g. stop Redis)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        #: Called as the records are taken (a test's way to make a server fail at that moment).
        self.on_send: Callable[[], None] | None = None

    async def send_many(
        self,
        topic: str,
        records: Iterable[tuple[bytes, bytes]],
        *,
        timeout: float = 30.0,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> int:
        if self.on_send is not None:
            self.on_send()
        return await super().send_many(topic, records, timeout=timeout, headers=headers)


#: The broker and the topics of this module's gateways (set by the ``_broker`` fixture).
_KAFKA: dict[str, Any] = {}


@pytest.fixture(scope="session", autouse=True)
def _broker(settings: Settings) -> Iterator[None]:
    """The session stack's broker, with topics of this module's own (so what a test reads back
    is what this module's gateways produced)."""
    tag = uuid.uuid4().hex[:8]
    topics = {
        "topic_activities": f"gw-act-{tag}",
        "topic_follows": f"gw-fol-{tag}",
        "topic_dlq": f"gw-dlq-{tag}",
    }
    create_topics(dataclasses.replace(settings, **topics))
    _KAFKA.update(kafka_bootstrap=settings.kafka_bootstrap, **topics)
    yield
    _KAFKA.clear()


@dataclass
class Running:
    server: GatewayServer
    thread: threading.Thread
    settings: Settings
    producer: HookedProducer
    base: str = ""
    ws: str = ""
    errors: list[BaseException] = field(default_factory=list)

    def stop(self, timeout: float = 15.0) -> float:
        started = time.monotonic()
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "gateway did not stop"
        self.producer.close(1.0)  # the test's, not the app's: closed here
        return time.monotonic() - started

    def records(self, topic: str) -> list[tuple[bytes, bytes]]:
        """The ``(key, value)`` records the broker holds in ``topic``."""
        return read_records(self.settings, topic)


def _settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": url,
        "jwt_secret": Secret(JWT_SECRET),
        "ingest_token": Secret(INGEST_TOKEN),
        "gateway_host": "127.0.0.1",
        "gateway_port": 0,
        "fanout_history": False,  # no Cassandra here: pages end at the hot tier
        "resume_window_s": 60,
        "allowed_origins": (ALLOWED_ORIGIN,),
        "ping_interval_s": 5.0,
        "ping_timeout_s": 5.0,
        "drain_s": 4.0,
    }
    values.update(overrides)
    return Settings(**values)


def _start(settings: Settings, *, kafka_bootstrap: str | None = None, **app_kwargs: Any) -> Running:
    """Serve ``settings`` in a thread, producing to the module's topics on the session broker (or
    on ``kafka_bootstrap``)."""
    assert _KAFKA, "the _broker fixture sets the broker"
    settings = dataclasses.replace(settings, **_KAFKA)
    if kafka_bootstrap is not None:
        settings = dataclasses.replace(settings, kafka_bootstrap=kafka_bootstrap)
    producer = HookedProducer(producer_config(settings, logger=logging.getLogger("librdkafka")))
    server = build_server(settings, producer=producer, dev_mode=True, **app_kwargs)
    running = Running(server, threading.Thread(), settings, producer)

    def serve() -> None:
        try:
            server.run()
        except BaseException as exc:  # surfaced by the fixture
            running.errors.append(exc)

    running.thread = threading.Thread(target=serve, name="gateway-under-test", daemon=True)
    running.thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not (server.started and server.port):
        if running.errors or not running.thread.is_alive() or time.monotonic() > deadline:
            pytest.fail(f"gateway did not start: {running.errors}")
        time.sleep(0.01)
    running.base = f"http://127.0.0.1:{server.port}"
    running.ws = f"ws://127.0.0.1:{server.port}/v1/stream"
    return running


@pytest.fixture(scope="session")
def gw(redis_url: str, _broker: None) -> Iterator[Running]:
    running = _start(_settings(redis_url))
    try:
        yield running
    finally:
        running.stop()
    assert not running.errors


@pytest.fixture(scope="session")
def timelines(redis_url: str) -> Iterator[RedisTimelines]:
    client = redis.Redis.from_url(redis_url)
    yield RedisTimelines(client, timeline_max=800, stream_history=1000, body_ttl_s=3600)
    client.close()


@pytest.fixture(scope="session")
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def http(gw: Running) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gw.base, timeout=TIMEOUT) as client:
        yield client


# --- helpers --------------------------------------------------------------------------------------
def uid(name: str = "u") -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}"


def token(user: str, ttl: int = 600) -> str:
    return mint_token(Secret(JWT_SECRET), user, ttl)


def make_activity(actor: str, n: int = 0, **extra: Any) -> Activity:
    return Activity(
        id=f"a-{uuid.uuid4().hex[:12]}",
        type="Create",
        actor=actor,
        object=f"post:{n}",
        published=datetime(2026, 1, 1, 12, 0, n % 60, tzinfo=UTC),
        **extra,
    )


def publish(timelines: RedisTimelines, users: list[str], activity: Activity) -> None:
    """Insert into the users' timelines exactly like the fan-out worker (push included)."""
    timelines.insert(
        [
            Insert(
                member=order_key(published_us(activity), activity.id),
                activity_id=activity.id,
                body=encode_activity(activity),
                users=users,
            )
        ]
    )


async def recv(ws: ClientConnection, timeout: float = TIMEOUT) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(raw, str), "frames are JSON text"
    frame: dict[str, Any] = json.loads(raw)
    return frame


async def close_code(ws: ClientConnection, timeout: float = TIMEOUT) -> int | None:
    """Read until the server closes; return its close code."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    return info.value.rcvd.code if info.value.rcvd else None


async def eventually(
    check: Callable[[], Any | Awaitable[Any]], what: str, timeout: float = TIMEOUT
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def seq_of(frame: dict[str, Any]) -> int:
    return int(frame["cursor"].rpartition(".")[2])


def epoch_of(frame: dict[str, Any]) -> str:
    return str(frame["cursor"].rpartition(".")[0])


def channels(client: redis.Redis) -> set[str]:
    return {c.decode() if isinstance(c, bytes) else c for c in client.pubsub_channels()}


async def welcomed(
    gw: Running, user: str, **kwargs: Any
) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(f"{gw.ws}?token={token(user)}", **kwargs)
    frame = await recv(ws)
    assert frame["type"] == "welcome"
    return ws, frame


# --- WebSocket: auth ------------------------------------------------------------------------------
async def test_bad_token_closes_4001(gw: Running) -> None:
    async with connect(f"{gw.ws}?token=not-a-jwt") as ws:
        assert await close_code(ws) == 4001


async def test_missing_token_closes_4001(gw: Running) -> None:
    async with connect(gw.ws) as ws:
        assert await close_code(ws) == 4001


async def test_expired_token_closes_4001(gw: Running) -> None:
    expired = mint_token(Secret(JWT_SECRET), "alice", 1, now=time.time() - 3600)
    async with connect(f"{gw.ws}?token={expired}") as ws:
        assert await close_code(ws) == 4001


async def test_token_signed_with_another_secret_closes_4001(gw: Running) -> None:
    forged = mint_token(Secret("x" * 48), "alice", 600)
    async with connect(f"{gw.ws}?token={forged}") as ws:
        assert await close_code(ws) == 4001


async def test_rejected_token_is_never_logged(gw: Running) -> None:
    forged = mint_token(Secret("y" * 48), "alice", 600)
    with structlog.testing.capture_logs() as logs:
        async with connect(f"{gw.ws}?token={forged}") as ws:
            assert await close_code(ws) == 4001
        await eventually(lambda: any(e.get("event") == "ws_rejected" for e in logs), "log")
    assert forged not in repr(logs)
    assert JWT_SECRET not in repr(logs)


async def test_bearer_header_is_accepted(gw: Running) -> None:
    user = uid()
    headers = {"Authorization": f"Bearer {token(user)}"}
    async with connect(gw.ws, additional_headers=headers) as ws:
        assert (await recv(ws))["user"] == user


async def test_foreign_origin_closes_4003(gw: Running) -> None:
    async with connect(f"{gw.ws}?token={token(uid())}", origin=Origin("http://evil.example")) as ws:
        assert await close_code(ws) == 4003


async def test_allowed_origin_is_welcome(gw: Running) -> None:
    async with connect(f"{gw.ws}?token={token(uid())}", origin=Origin(ALLOWED_ORIGIN)) as ws:
        assert (await recv(ws))["type"] == "welcome"


# --- WebSocket: delivery --------------------------------------------------------------------------
async def test_welcome_comes_first_with_a_stream_cursor(gw: Running) -> None:
    user = uid()
    ws, welcome = await welcomed(gw, user)
    await ws.close()
    assert welcome["user"] == user
    assert re.fullmatch(r"[a-z0-9]+\.\d+", welcome["cursor"])


async def test_published_frame_reaches_the_socket(gw: Running, timelines: RedisTimelines) -> None:
    user = uid()
    ws, welcome = await welcomed(gw, user)
    activity = make_activity("someone")
    publish(timelines, [user], activity)
    frame = await recv(ws)
    await ws.close()
    assert frame["type"] == "activity"
    assert frame["activity"]["id"] == activity.id
    assert epoch_of(frame) == epoch_of(welcome)
    assert seq_of(frame) == seq_of(welcome) + 1


async def test_removed_frame_reaches_the_socket(gw: Running, timelines: RedisTimelines) -> None:
    from feed.interfaces import Removal

    user = uid()
    ws, _ = await welcomed(gw, user)
    activity = make_activity("someone")
    publish(timelines, [user], activity)
    assert (await recv(ws))["type"] == "activity"
    member = order_key(published_us(activity), activity.id)
    timelines.remove([Removal(member=member, activity_id=activity.id, users=[user])])
    frame = await recv(ws)
    await ws.close()
    assert frame["type"] == "removed"
    assert frame["id"] == activity.id


async def test_both_connections_of_a_user_receive_and_others_do_not(
    gw: Running, timelines: RedisTimelines
) -> None:
    alice, bob = uid("alice"), uid("bob")
    a1, _ = await welcomed(gw, alice)
    a2, _ = await welcomed(gw, alice)
    b1, _ = await welcomed(gw, bob)
    for_alice = make_activity("carol", 1)
    publish(timelines, [alice], for_alice)
    assert (await recv(a1))["activity"]["id"] == for_alice.id
    assert (await recv(a2))["activity"]["id"] == for_alice.id
    marker = make_activity("carol", 2)
    publish(timelines, [bob], marker)
    # Pub/Sub is ordered: had bob's socket been sent alice's frame, it would come first.
    assert (await recv(b1))["activity"]["id"] == marker.id
    for ws in (a1, a2, b1):
        await ws.close()


async def test_subscribes_only_connected_users_and_unsubscribes_after_the_last(
    gw: Running, rclient: redis.Redis, timelines: RedisTimelines
) -> None:
    user = uid()
    channel = f"u:{{{user}}}"
    assert channel not in channels(rclient)
    first, _ = await welcomed(gw, user)
    assert channel in channels(rclient)  # confirmed before the welcome
    second, _ = await welcomed(gw, user)
    hub = gw.server.gateway.hub
    assert hub.connections_of(user) == 2
    await first.close()
    # The server has unregistered the first socket (not merely been sent its close) ...
    await eventually(lambda: hub.connections_of(user) == 1, "the server to see the first close")
    # ... and the user's channel is still subscribed, and still delivers to the second socket.
    assert channel in channels(rclient)
    activity = make_activity("x")
    publish(timelines, [user], activity)
    assert (await recv(second))["activity"]["id"] == activity.id
    await second.close()
    await eventually(lambda: channel not in channels(rclient), "UNSUBSCRIBE after the last")
    assert rclient.pubsub_numpat() == 0
    assert all(c.startswith("u:{") for c in channels(rclient))


async def test_resume_after_disconnect_replays_missed_frames(
    gw: Running, timelines: RedisTimelines
) -> None:
    user = uid()
    ws, welcome = await welcomed(gw, user)
    seen = []
    for n in range(2):
        publish(timelines, [user], make_activity("x", n))
        seen.append(await recv(ws))
    await ws.close()
    missed = [make_activity("x", 10 + n) for n in range(3)]
    for activity in missed:
        publish(timelines, [user], activity)
    ws, welcome2 = await welcomed(gw, user)
    assert epoch_of(welcome2) == epoch_of(welcome)
    # A frame published after the welcome and before the resume must come after the replay.
    newer = make_activity("x", 20)
    publish(timelines, [user], newer)
    await ws.send(json.dumps({"type": "resume", "cursor": seen[-1]["cursor"]}))
    replay = [await recv(ws) for _ in range(4)]
    later = make_activity("x", 30)
    publish(timelines, [user], later)
    last = await recv(ws)
    await ws.close()
    ids = [f["activity"]["id"] for f in [*replay, last]]
    assert ids == [a.id for a in [*missed, newer, later]]
    numbers = [seq_of(f) for f in [*seen, *replay, last]]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))


async def test_resume_with_a_foreign_epoch_gets_reset(
    gw: Running, timelines: RedisTimelines
) -> None:
    user = uid()
    ws, _ = await welcomed(gw, user)
    await ws.send(json.dumps({"type": "resume", "cursor": "00000000.5"}))
    assert (await recv(ws)) == {"type": "reset"}
    activity = make_activity("x")
    publish(timelines, [user], activity)
    assert (await recv(ws))["activity"]["id"] == activity.id
    await ws.close()


RECOVERY_BOUND_S = 2 * 0.065 + 0.25


async def test_frames_lost_while_pubsub_reconnects_are_recovered(
    gw: Running, timelines: RedisTimelines, rclient: redis.Redis
) -> None:
    user = uid()
    ws, welcome = await welcomed(gw, user)
    await ws.send(json.dumps({"type": "resume", "cursor": welcome["cursor"]}))  # end the hold
    killed = time.monotonic()
    rclient.client_kill_filter(_type="pubsub")
    sent = [make_activity("x", n) for n in range(3)]
    for activity in sent:
        publish(timelines, [user], activity)  # some may be published while unsubscribed
    got = [await recv(ws) for _ in sent]
    recovered_s = time.monotonic() - killed
    assert [f["activity"]["id"] for f in got] == [a.id for a in sent]
    # Kill -> reconnect (first backoff 50 ms) -> re-subscribe -> gap check -> stream read ->
    # frames: measured 0.052-0.059 s in 5 runs (load average 2-3 on 2 cores) and 0.059-0.065 s
    # in 4 runs beside two busy loops (load average 4.6). Bound: 2 x the worst + 0.25 s for a
    # scheduler's noise (it was 15 s per frame).
    assert recovered_s <= RECOVERY_BOUND_S, f"recovered after {recovered_s:.3f} s"
    after = make_activity("x", 9)
    publish(timelines, [user], after)
    assert (await recv(ws))["activity"]["id"] == after.id
    await ws.close()


# --- WebSocket: bad frames ------------------------------------------------------------------------
async def test_invalid_json_closes_1007(gw: Running) -> None:
    ws, _ = await welcomed(gw, uid())
    await ws.send("{not json")
    assert await close_code(ws) == 1007


async def test_unknown_frame_type_closes_1003(gw: Running) -> None:
    ws, _ = await welcomed(gw, uid())
    await ws.send(json.dumps({"type": "subscribe", "user": "someone-else"}))
    assert await close_code(ws) == 1003


async def test_frame_over_64k_closes_1009(gw: Running) -> None:
    ws, _ = await welcomed(gw, uid())
    await ws.send(json.dumps({"type": "resume", "cursor": "x" * 70_000}))
    assert await close_code(ws) == 1009


# --- HTTP: feed -----------------------------------------------------------------------------------
async def test_feed_pages_newest_first(http: httpx.AsyncClient, timelines: RedisTimelines) -> None:
    user = uid()
    activities = [make_activity("x", n) for n in range(5)]
    for activity in activities:
        publish(timelines, [user], activity)
    auth = {"Authorization": f"Bearer {token(user)}"}
    first = (await http.get("/v1/feed", params={"limit": 3}, headers=auth)).json()
    assert len(first["items"]) == 3 and first["next"]
    rest = (
        await http.get("/v1/feed", params={"limit": 3, "cursor": first["next"]}, headers=auth)
    ).json()
    ids = [i["activity"]["id"] for i in first["items"] + rest["items"]]
    assert ids == [a.id for a in reversed(activities)]
    assert rest["next"] is None


async def test_feed_default_page(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/feed", headers={"Authorization": f"Bearer {token(uid())}"})
    assert response.status_code == 200
    assert response.json() == {"items": [], "next": None}


async def test_feed_without_token_is_401(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/feed")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


async def test_feed_ignores_query_token(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/feed", params={"token": token(uid())})
    assert response.status_code == 401


async def test_feed_with_expired_token_is_401(http: httpx.AsyncClient) -> None:
    expired = mint_token(Secret(JWT_SECRET), "alice", 1, now=time.time() - 3600)
    response = await http.get("/v1/feed", headers={"Authorization": f"Bearer {expired}"})
    assert response.status_code == 401


@pytest.mark.parametrize("limit", ["0", "201", "abc", "-1", "1.5"])
async def test_feed_bad_limit_is_400_naming_limit(http: httpx.AsyncClient, limit: str) -> None:
    response = await http.get(
        "/v1/feed", params={"limit": limit}, headers={"Authorization": f"Bearer {token(uid())}"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "limit"


@pytest.mark.parametrize(
    "limit",
    [
        "\u00b2",  # superscript two: str.isdigit() says yes, int() refuses it
        "\u0663",  # Arabic-Indic three: int() takes it as 3
        "5" * 5000,  # int() refuses more than 4300 digits
        "0" * 4999 + "5",
        "\uff15",  # fullwidth five
        " 5",
        "5\n",
    ],
    ids=[
        "superscript",
        "arabic-indic",
        "5000-digits",
        "5000-digits-leading-zeros",
        "fullwidth",
        "space",
        "newline",
    ],
)
async def test_feed_limit_in_unicode_or_too_many_digits_is_400(
    http: httpx.AsyncClient, limit: str
) -> None:
    response = await http.get(
        "/v1/feed", params={"limit": limit}, headers={"Authorization": f"Bearer {token(uid())}"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["field"] == "limit"
    assert "200" in error["message"]  # names the limit


def _position(key: str) -> str:
    """A position cursor holding ``key`` (the format ``feed.cursor`` issues)."""
    return "p" + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        _position("\u00b2" * 16 + ":a-1"),  # int() refuses superscripts: was a 500
        _position("\u0663" * 16 + ":a-1"),  # Arabic-Indic digits: not a key this API issues
        _position("0" * 15 + "\u00b9:a-1"),
        _position("0" * 16 + ":"),
        "p" + "A" * 5000,
        "\u00b2",
        "p\u00b2\u00b2",
    ],
    ids=[
        "superscript",
        "arabic-indic",
        "one-superscript",
        "no-id",
        "5000-chars",
        "bare-digit",
        "non-base64",
    ],
)
async def test_feed_cursor_with_unicode_digits_or_garbage_is_400(
    http: httpx.AsyncClient, cursor: str
) -> None:
    response = await http.get(
        "/v1/feed", params={"cursor": cursor}, headers={"Authorization": f"Bearer {token(uid())}"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "cursor"


async def test_feed_bad_cursor_is_400_naming_cursor(http: httpx.AsyncClient) -> None:
    response = await http.get(
        "/v1/feed",
        params={"cursor": "garbage"},
        headers={"Authorization": f"Bearer {token(uid())}"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "cursor"


# --- HTTP: ingest ---------------------------------------------------------------------------------
INGEST = {"Authorization": f"Bearer {INGEST_TOKEN}"}


def body_of(*activities: Activity) -> bytes:
    encoded = [json.loads(encode_activity(a)) for a in activities]
    return json.dumps(encoded[0] if len(encoded) == 1 else encoded).encode()


async def test_ingest_one_activity(http: httpx.AsyncClient, gw: Running) -> None:
    activity = make_activity(uid("actor"))
    response = await http.post("/v1/activities", content=body_of(activity), headers=INGEST)
    assert response.status_code == 202
    assert response.json() == {"accepted": 1}
    records = gw.records(gw.settings.topic_activities)
    assert (activity.actor.encode(), encode_activity(activity)) in records


async def test_ingest_carries_a_traceparent_onto_its_records_when_not_tracing(
    http: httpx.AsyncClient, gw: Running
) -> None:
    """This gateway does not trace (no OTEL endpoint): the caller's context still reaches the
    records, for a worker that does; a malformed one is not forwarded."""
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    traced, malformed = make_activity(uid("actor")), make_activity(uid("actor"))
    for activity, headers in (
        (traced, {"traceparent": parent, "tracestate": "vendor=1"}),
        (malformed, {"traceparent": "00-not-a-context", "tracestate": "vendor=1"}),
    ):
        response = await http.post(
            "/v1/activities", content=body_of(activity), headers={**INGEST, **headers}
        )
        assert response.status_code == 202
    found = {
        value: headers
        for _, value, headers in read_records_with_headers(gw.settings)
        if value in (encode_activity(traced), encode_activity(malformed))
    }
    assert found == {
        encode_activity(traced): [("traceparent", parent.encode()), ("tracestate", b"vendor=1")],
        encode_activity(malformed): [],
    }


async def test_ingest_a_batch(http: httpx.AsyncClient, gw: Running) -> None:
    batch = [make_activity(uid("actor"), n) for n in range(3)]
    response = await http.post("/v1/activities", content=body_of(*batch), headers=INGEST)
    assert response.status_code == 202
    assert response.json() == {"accepted": 3}
    keys = [k for k, _ in gw.records(gw.settings.topic_activities)]
    assert all(a.actor.encode() in keys for a in batch)


async def test_ingest_without_token_is_401(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/activities", content=body_of(make_activity("a")))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


async def test_ingest_with_wrong_token_is_401(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/activities",
        content=body_of(make_activity("a")),
        headers={"Authorization": "Bearer wrong-token-0000000000"},
    )
    assert response.status_code == 401


async def test_ingest_with_a_user_jwt_is_401(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/activities",
        content=body_of(make_activity("a")),
        headers={"Authorization": f"Bearer {token('alice')}"},
    )
    assert response.status_code == 401


async def test_ingest_missing_field_is_400_naming_it(http: httpx.AsyncClient) -> None:
    body = json.loads(body_of(make_activity("a")))
    del body["actor"]
    response = await http.post("/v1/activities", json=body, headers=INGEST)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "actor"


async def test_ingest_bad_item_in_batch_names_its_index(http: httpx.AsyncClient) -> None:
    items = json.loads(body_of(make_activity("a", 1), make_activity("a", 2)))
    items[1]["published"] = "yesterday"
    response = await http.post("/v1/activities", json=items, headers=INGEST)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "[1].published"


async def test_ingest_malformed_json_is_400(http: httpx.AsyncClient, gw: Running) -> None:
    before = len(gw.records(gw.settings.topic_activities))
    response = await http.post("/v1/activities", content=b"{nope", headers=INGEST)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_json"
    assert len(gw.records(gw.settings.topic_activities)) == before


async def test_ingest_body_over_1mib_is_413(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/activities", content=b"[" + b" " * (1 << 20) + b"]", headers=INGEST
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


async def test_ingest_streamed_body_over_1mib_is_413(http: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 65536

    response = await http.post("/v1/activities", content=chunks(), headers=INGEST)
    assert response.status_code == 413


async def test_idempotency_key_makes_a_retry_a_no_op(http: httpx.AsyncClient, gw: Running) -> None:
    activity = make_activity(uid("actor"))
    headers = {**INGEST, "Idempotency-Key": uid("key")}
    first = await http.post("/v1/activities", content=body_of(activity), headers=headers)
    count = len(gw.records(gw.settings.topic_activities))
    again = await http.post("/v1/activities", content=body_of(activity), headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json() == {"accepted": 1}
    assert len(gw.records(gw.settings.topic_activities)) == count


async def test_idempotency_key_with_another_body_is_422(http: httpx.AsyncClient) -> None:
    headers = {**INGEST, "Idempotency-Key": uid("key")}
    first = await http.post("/v1/activities", content=body_of(make_activity("a")), headers=headers)
    other = await http.post("/v1/activities", content=body_of(make_activity("b")), headers=headers)
    assert first.status_code == 202
    assert other.status_code == 422
    assert other.json()["error"]["field"] == "Idempotency-Key"


async def test_failed_produce_is_503_and_frees_the_idempotency_key(
    http: httpx.AsyncClient, gw: Running, redis_url: str
) -> None:
    activity = make_activity(uid("actor"))
    headers = {**INGEST, "Idempotency-Key": uid("key")}
    # A gateway on the same Redis whose broker is down: nothing listens on its port.
    down = _start(_settings(redis_url), kafka_bootstrap=f"127.0.0.1:{free_port()}")
    try:
        async with httpx.AsyncClient(base_url=down.base, timeout=60) as client:
            failed = await client.post("/v1/activities", content=body_of(activity), headers=headers)
    finally:
        down.stop()
    assert failed.status_code == 503
    assert "retry-after" in failed.headers
    # The key was freed: the retry, through a gateway whose broker is up, is accepted.
    retried = await http.post("/v1/activities", content=body_of(activity), headers=headers)
    assert retried.status_code == 202
    records = gw.records(gw.settings.topic_activities)
    assert records.count((activity.actor.encode(), encode_activity(activity))) == 1


async def test_follow_and_unfollow_produce_follow_events(
    http: httpx.AsyncClient, gw: Running
) -> None:
    follower, followee = uid("f"), uid("g")
    body = {"follower": follower, "followee": followee}
    assert (await http.post("/v1/follows", json=body, headers=INGEST)).status_code == 202
    response = await http.request("DELETE", "/v1/follows", json=body, headers=INGEST)
    assert response.status_code == 202
    events = [
        (key, json.loads(value))
        for key, value in gw.records(gw.settings.topic_follows)
        if key == follower.encode()
    ]
    assert [e["type"] for _, e in events] == ["follow", "unfollow"]
    assert all(e["followee"] == followee for _, e in events)
    assert datetime.fromisoformat(events[0][1]["at"]).tzinfo is not None


async def test_follow_self_is_400_naming_followee(http: httpx.AsyncClient) -> None:
    body = {"follower": "same", "followee": "same"}
    response = await http.post("/v1/follows", json=body, headers=INGEST)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "followee"


async def test_follow_missing_field_is_400(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/follows", json={"follower": "a"}, headers=INGEST)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "followee"


async def test_follow_without_token_is_401(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/follows", json={"follower": "a", "followee": "b"})
    assert response.status_code == 401


async def test_follow_body_too_large_is_413(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/follows", content=b" " * 10_000, headers=INGEST)
    assert response.status_code == 413


# --- HTTP: operations -----------------------------------------------------------------------------
async def test_healthz(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz")
    assert response.status_code == 200


async def test_readyz_reports_each_dependency(http: httpx.AsyncClient) -> None:
    response = await http.get("/readyz")
    body = response.json()
    assert response.status_code == 200, body
    assert body["ready"] is True
    assert body["dependencies"]["redis"]["ok"] is True
    assert body["dependencies"]["kafka"]["ok"] is True
    assert "cassandra" not in body["dependencies"]  # not used by this instance


async def test_metrics_exposition(redis_url: str, timelines: RedisTimelines) -> None:
    """A gateway of its own, so every value is known: one socket open, its welcome and two
    frames pushed, one activity ingested, one /healthz before the scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    running = _start(_settings(redis_url), hold_live_s=0)
    try:
        user = uid()
        ws, _ = await welcomed(running, user)
        for n in range(2):
            publish(timelines, [user], make_activity("x", n))
            await recv(ws)
        async with httpx.AsyncClient(base_url=running.base, timeout=TIMEOUT) as client:
            assert (await client.get("/healthz")).status_code == 200
            ingest = await client.post(
                "/v1/activities", content=body_of(make_activity(uid("actor"))), headers=INGEST
            )
            assert ingest.status_code == 202
            text = (await client.get("/metrics")).text
        await ws.close()
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

        def value(name: str, **labels: str) -> float | None:
            return samples.get((name, tuple(sorted(labels.items()))))

        assert value("feed_gateway_connections") == 1
        assert value("feed_gateway_messages_pushed_total") == 3  # welcome + 2 activities
        assert value("feed_gateway_slow_client_closes_total") == 0
        assert value("feed_ingest_activities_total") == 1
        assert value("feed_gateway_pubsub_connected") == 1
        assert value("feed_gateway_http_requests_total", route="/healthz", status="200") == 1
        assert value("feed_gateway_http_requests_total", route="/v1/activities", status="202") == 1
        assert value("feed_gateway_push_latency_seconds_count") == 2  # the two live frames
    finally:
        running.stop()


async def test_unknown_route_is_a_json_404(http: httpx.AsyncClient) -> None:
    response = await http.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_wrong_method_is_a_json_405(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/activities")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_page_is_served(http: httpx.AsyncClient) -> None:
    response = await http.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/v1/stream" in response.text


async def test_dev_token_route(http: httpx.AsyncClient, gw: Running) -> None:
    response = await http.get("/dev/token", params={"user": "alice"})
    assert response.status_code == 200
    async with connect(f"{gw.ws}?token={response.json()['token']}") as ws:
        assert (await recv(ws))["user"] == "alice"
    bad = await http.get("/dev/token", params={"user": "has space"})
    assert bad.status_code == 400
    assert bad.json()["error"]["field"] == "user"


def test_uvicorn_log_lines_lose_their_tokens() -> None:
    record = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5", "/v1/stream?token=abc.def.ghi&x=1"),
        None,
    )
    _RedactTokens().filter(record)
    assert "abc.def.ghi" not in record.getMessage()
    assert "token=**********" in record.getMessage()


# --- servers of their own: slow clients, shutdown ------------------------------------------------
async def test_slow_client_is_closed_4008(redis_url: str, timelines: RedisTimelines) -> None:
    running = _start(_settings(redis_url, send_queue_bytes=256 * 1024), hold_live_s=0)
    try:
        user = uid("slow")
        # max_queue=1: the client stops reading its socket after one unread message.
        ws, _ = await welcomed(running, user, max_queue=1)
        registry = running.server.gateway.metrics.registry
        big = {"blob": "z" * 3000}
        deadline = time.monotonic() + 30
        while not registry.get_sample_value("feed_gateway_slow_client_closes_total"):
            publish(timelines, [user], make_activity("x", extra=big))
            if time.monotonic() > deadline:
                pytest.fail("the slow client was never closed")
            await asyncio.sleep(0)
        assert await close_code(ws, timeout=15) == 4008
    finally:
        running.stop()


async def _raw_frames_until_close(
    reader: asyncio.StreamReader, deadline_s: float
) -> tuple[list[tuple[int, float]], int]:
    """Read server frames (unmasked) until a close frame: their (opcode, seconds since the
    call), and the close code. Answers nothing: not even a pong."""
    started = time.monotonic()
    frames: list[tuple[int, float]] = []
    while True:
        remaining = deadline_s - (time.monotonic() - started)
        head = await asyncio.wait_for(reader.readexactly(2), max(0.01, remaining))
        size = head[1] & 0x7F
        if size == 126:
            size = int.from_bytes(await reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await reader.readexactly(8), "big")
        payload = await reader.readexactly(size)
        opcode = head[0] & 0x0F
        frames.append((opcode, time.monotonic() - started))
        if opcode == 0x8:
            return frames, int.from_bytes(payload[:2], "big")


async def test_keepalive_pings_and_closes_a_client_that_never_answers_1011(
    redis_url: str, timelines: RedisTimelines
) -> None:
    interval = timeout = 0.5
    running = _start(_settings(redis_url, ping_interval_s=interval, ping_timeout_s=timeout))
    try:
        answering_user = uid("pong")
        answering, welcome = await welcomed(running, answering_user)  # websockets answers pings
        await answering.send(json.dumps({"type": "resume", "cursor": welcome["cursor"]}))
        reader, writer = await asyncio.open_connection("127.0.0.1", running.server.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /v1/stream?token={token(uid('silent'))} HTTP/1.1\r\n"
                "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert response.startswith(b"HTTP/1.1 101")
        frames, code = await _raw_frames_until_close(reader, deadline_s=TIMEOUT)
        writer.close()
        opcodes = [opcode for opcode, _ in frames]
        assert opcodes[0] == 0x1  # the welcome
        pings = [at for opcode, at in frames if opcode == 0x9]
        assert len(pings) == 1, frames  # pinged once, and never answered
        # The first ping is due in the second half of the interval, run by a timer at most one
        # tick late; the close comes ping_timeout after the ping (an event-loop timer). Measured
        # in 9 runs (4 beside two busy loops, load average 4.6): first ping 0.29-0.72 s, close
        # 0.5006-0.5016 s after it. Bounds: + 0.25 s of slack for a loaded machine on each (it
        # was only a lower bound for the close).
        tick = TICK_S
        assert pings[0] <= interval + tick + 0.25, frames
        assert code == 1011  # keepalive ping timeout
        closed_after = frames[-1][1] - pings[0]
        assert timeout - 0.05 <= closed_after <= timeout + 0.25, frames
        # Meanwhile the client that answers has been pinged several times over and is still live.
        activity = make_activity("x")
        publish(timelines, [answering_user], activity)
        assert (await recv(answering))["activity"]["id"] == activity.id
        await answering.close()
    finally:
        running.stop()


async def test_shutdown_closes_sockets_with_1001_within_drain(redis_url: str) -> None:
    running = _start(_settings(redis_url, drain_s=3.0))
    sockets = [(await welcomed(running, uid()))[0] for _ in range(3)]
    stopping = asyncio.get_running_loop().run_in_executor(None, running.stop)
    codes = [await close_code(ws) for ws in sockets]
    took = await stopping
    assert codes == [1001, 1001, 1001]
    # Idle sockets close at once: measured 0.168-0.183 s in 5 runs (load average 2-3) and
    # 0.174-0.194 s in 4 runs beside two busy loops (load average 4.6), most of it uvicorn's
    # 0.1 s main-loop tick. Bound: 2 x the worst + 0.25 s (it was the 3 s drain budget + 2 s).
    assert took <= 2 * 0.194 + 0.25, f"shutdown took {took:.3f} s"


async def test_redis_down_gateway_stays_up_and_says_so() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    running = _start(_settings(dead))
    try:
        async with httpx.AsyncClient(base_url=running.base, timeout=TIMEOUT) as client:
            assert (await client.get("/healthz")).status_code == 200
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["dependencies"]["redis"]["ok"] is False
            feed = await client.get("/v1/feed", headers={"Authorization": f"Bearer {token(uid())}"})
            assert feed.status_code == 503
            assert feed.json()["error"]["code"] == "unavailable"
            assert "retry-after" in feed.headers
    finally:
        running.stop()


# --- the hub keeps nothing for users who left ---------------------------------------------------
class _Conn:
    """A local connection as the hub sees it (the hub's own callback interface)."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.frames: list[bytes] = []

    def deliver(self, frame: bytes) -> None:
        self.frames.append(frame)

    def check_gap(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


async def test_hub_keeps_nothing_for_users_who_left(redis_url: str, rclient: redis.Redis) -> None:
    import redis.asyncio as aioredis

    from feed.delivery_redis import AsyncRedisPresence
    from gateway.hub import Hub
    from gateway.pubsub import RedisSubscriber

    client = aioredis.Redis.from_url(redis_url)
    hub = Hub(RedisSubscriber(client), AsyncRedisPresence(client, ttl_s=60), refresh_interval_s=30)
    await hub.start()
    try:
        await eventually(lambda: hub.connected, "Pub/Sub connected")
        star = uid("star")
        for _ in range(3):  # users come and go: the hub's state must not grow with them
            conns = [_Conn(uid("churn")) for _ in range(200)]
            await asyncio.gather(*(hub.register(conn) for conn in conns))
            hub.follow_actors(conns[0].user, [star, uid("star")])
            for conn in conns:
                hub.unregister(conn)
        # A Pub/Sub reconnect re-subscribes a large account's channel too.
        keeper = _Conn(uid("keeper"))
        await hub.register(keeper)
        hub.follow_actors(keeper.user, [star])
        rclient.client_kill_filter(_type="pubsub")
        await eventually(lambda: hub.connects >= 2 and hub.connected, "Pub/Sub reconnected")
        await eventually(lambda: not hub.tracked()["pending"], "re-subscriptions confirmed")
        hub.unregister(keeper)
        empty = dict.fromkeys(hub.tracked(), 0)
        await eventually(lambda: hub.tracked() == empty, f"empty hub state: {hub.tracked()}")
    finally:
        await hub.stop()
        await client.aclose()


# --- concurrent connections per user --------------------------------------------------------------
async def test_connections_past_the_per_user_cap_close_4029(redis_url: str) -> None:
    cap = 3
    running = _start(
        _settings(redis_url, max_connections_per_user=cap, connect_rate=0.0, connect_burst=1)
    )
    try:
        user = uid("many")
        held = [(await welcomed(running, user))[0] for _ in range(cap)]
        async with connect(f"{running.ws}?token={token(user)}") as extra:
            with pytest.raises(ConnectionClosed) as info:
                await recv(extra)
            assert info.value.rcvd is not None
            assert info.value.rcvd.code == 4029
            assert str(cap) in info.value.rcvd.reason
        other, _ = await welcomed(running, uid("other"))  # the cap is per user
        await held[0].close()

        async def place_free() -> ClientConnection | None:
            """A connection that left frees its place (once the server has seen it leave)."""
            ws = await connect(f"{running.ws}?token={token(user)}")
            try:
                if (await recv(ws))["type"] == "welcome":
                    return ws
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 4029
            await ws.close()
            return None

        again = await eventually(place_free, "a place freed by a closed connection")
        for ws in (*held[1:], again, other):
            await ws.close()
    finally:
        running.stop()


# --- outages and exposure ------------------------------------------------------------------------
async def test_readyz_names_the_failed_dependency_but_no_address() -> None:
    port = free_port()  # nothing listens there
    running = _start(_settings(f"redis://127.0.0.1:{port}/0"))
    try:
        async with httpx.AsyncClient(base_url=running.base, timeout=TIMEOUT) as client:
            ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["dependencies"]["redis"] == {"ok": False, "error": "unreachable"}
        assert str(port) not in ready.text and "127.0.0.1" not in ready.text, ready.text
    finally:
        running.stop()


async def test_redis_going_away_mid_run_is_503_with_retry_after() -> None:
    proc, url = _redis_server()
    running = _start(_settings(url))
    try:
        user = uid("reader")
        auth = {"Authorization": f"Bearer {token(user)}"}
        async with httpx.AsyncClient(base_url=running.base, timeout=TIMEOUT) as client:
            assert (await client.get("/v1/feed", headers=auth)).status_code == 200
            stop_process(proc)
            feed = await client.get("/v1/feed", headers=auth)
            assert feed.status_code == 503, feed.text
            assert feed.json()["error"]["code"] == "unavailable"
            assert int(feed.headers["retry-after"]) >= 1
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["dependencies"]["redis"]["ok"] is False
            assert url.rsplit(":", 1)[1].split("/")[0] not in ready.text  # no port
    finally:
        running.stop()
        stop_process(proc)


async def test_accepted_ingest_is_202_even_if_its_idempotency_key_cannot_be_recorded() -> None:
    proc, url = _redis_server()
    running = _start(_settings(url))
    try:
        # Redis goes away after the key was claimed, while Kafka takes the records.
        running.producer.on_send = lambda: stop_process(proc)
        activity = make_activity(uid("actor"))
        headers = {**INGEST, "Idempotency-Key": uid("key")}
        async with httpx.AsyncClient(base_url=running.base, timeout=TIMEOUT) as client:
            response = await client.post(
                "/v1/activities", content=body_of(activity), headers=headers
            )
        assert response.status_code == 202, response.text  # accepted: no retry asked for
        records = running.records(running.settings.topic_activities)
        assert (activity.actor.encode(), encode_activity(activity)) in records
    finally:
        running.producer.on_send = None
        running.stop()
        stop_process(proc)


async def test_odd_host_header_on_an_error_path_is_still_a_json_error() -> None:
    running = _start(_settings(f"redis://127.0.0.1:{free_port()}/0"))  # Redis down: a 503 path
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.server.port)
        writer.write(
            (
                "GET /v1/feed HTTP/1.1\r\nHost: [\r\n"
                f"Authorization: Bearer {token(uid())}\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        response = await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), response
        assert json.loads(body)["error"]["code"] == "unavailable"
    finally:
        running.stop()


async def test_unknown_non_ascii_frame_type_closes_1003_with_a_reason_that_fits(
    gw: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """A type of 64 three-byte characters passed a cut at 120 characters, but its echo in the
    close reason was ~213 bytes: the close frame could not be built (websockets raised "control
    frame too long"), the handler died with a traceback and the client saw 1006."""
    ws, _ = await welcomed(gw, uid())
    with caplog.at_level(logging.ERROR):
        await ws.send(json.dumps({"type": "\u20ac" * 64}, ensure_ascii=False))
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
    assert info.value.rcvd is not None, "no close frame: the connection was dropped (1006)"
    assert info.value.rcvd.code == 1003
    assert len(info.value.rcvd.reason.encode()) <= 123
    assert "unknown frame type" in info.value.rcvd.reason
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# --- the process's output -------------------------------------------------------------------------
async def test_gateway_process_writes_only_json_lines_third_party_included(
    redis_url: str, tmp_path: Any
) -> None:
    """``feed gateway`` with FEED_LOG_FORMAT=json and stdout/stderr a file: a malformed HTTP
    request makes uvicorn log a warning, a broker that is not there makes librdkafka complain,
    a bad frame closes a WebSocket. Every line the process wrote must be one JSON object
    (stdlib logging wrote uvicorn's warning as plain ``WARNING:uvicorn.error:...``)."""
    from tests.support.procs import FeedProcess, json_log_records

    port = free_port()
    env = {
        "FEED_REDIS_URL": redis_url,
        "FEED_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",  # nothing listens there
        "FEED_JWT_SECRET": JWT_SECRET,
        "FEED_INGEST_TOKEN": INGEST_TOKEN,
        "FEED_GATEWAY_HOST": "127.0.0.1",
        "FEED_GATEWAY_PORT": str(port),
        "FEED_FANOUT_HISTORY": "false",
        "FEED_LOG_FORMAT": "json",
        "FEED_DRAIN_S": "2",
    }
    log_path = tmp_path / "gateway.log"
    proc = FeedProcess(["gateway"], env, log_path).start()
    try:
        await asyncio.to_thread(proc.wait_http, f"http://127.0.0.1:{port}/healthz", timeout=30)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), TIMEOUT)
        writer.close()
        assert status.startswith(b"HTTP/1.1 400"), status
        async with connect(f"ws://127.0.0.1:{port}/v1/stream?token={token(uid())}") as ws:
            assert (await recv(ws))["type"] == "welcome"
            await ws.send(json.dumps({"type": "\u20ac" * 64}, ensure_ascii=False))
            assert await close_code(ws) == 1003

        await eventually(
            lambda: "Invalid HTTP request received" in log_path.read_text(errors="replace"),
            "uvicorn's warning in the log",
        )
    finally:
        await asyncio.to_thread(proc.stop, 15)
    loggers = {record.get("logger") for record in json_log_records(log_path)}
    assert {"uvicorn.error", "librdkafka"} <= loggers, loggers
