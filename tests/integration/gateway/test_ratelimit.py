"""Rate limits on the real Redis of the session stack: the token-bucket script itself, HTTP
ingest (429 + ``Retry-After``) and WebSocket connects per user and per IP (close 4029), through a
live gateway (uvicorn on port 0, the stack's broker and Redis).

Limits here are a high rate with a low burst, so a refill takes milliseconds; waits are polls
bounded by deadlines. Each test uses its own ingest token, users and client IP (127.0.0.x, all
loopback) so that buckets, which live in the shared Redis, never carry over between tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import secrets
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from feed.settings import Secret, Settings
from gateway.auth import mint_token
from gateway.ratelimit import Limit, RedisRateLimiter, ingest_key
from gateway.session import CLOSE_RATE_LIMITED
from tests.conftest import TEST_JWT_SECRET
from tests.support.live_gateway import LiveGateway, activity, live_gateway

TIMEOUT = 10.0
_ips = itertools.count(20)


def client_ip() -> str:
    """A loopback address of its own (127.0.0.0/8 all reaches the gateway on 127.0.0.1)."""
    return f"127.0.0.{next(_ips)}"


def jwt(user: str) -> str:
    return mint_token(Secret(TEST_JWT_SECRET), user, 600)


async def eventually(check: Any, what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


# --- the script, on the real Redis ------------------------------------------------------------
@pytest.fixture
async def limiter(settings: Settings) -> Any:
    client = aioredis.Redis.from_url(settings.redis_url)
    yield RedisRateLimiter(client)
    await client.aclose()


async def test_burst_then_denied_then_refilled(limiter: RedisRateLimiter) -> None:
    key, limit = f"rl:test:{uuid.uuid4().hex}", Limit(rate=20.0, burst=3)
    assert [(await limiter.take(key, limit)).allowed for _ in range(3)] == [True] * 3
    denied = await limiter.take(key, limit)
    assert not denied.allowed
    assert 0 < denied.retry_after_s <= 1 / 20.0 + 0.01
    assert denied.retry_after == 1  # whole seconds for Retry-After, at least 1
    await asyncio.sleep(denied.retry_after_s)
    assert (await eventually(lambda: limiter.take(key, limit), "a refilled token", 2.0)).allowed


async def test_refill_never_exceeds_the_burst(limiter: RedisRateLimiter) -> None:
    key, limit = f"rl:test:{uuid.uuid4().hex}", Limit(rate=1000.0, burst=2)
    await limiter.take(key, limit)
    await asyncio.sleep(0.1)  # 100 tokens' worth of time: the bucket refills to 2, not 100
    results = [(await limiter.take(key, limit)).allowed]
    slow = Limit(rate=0.001, burst=2)  # from here on, practically no refill
    results += [(await limiter.take(key, slow)).allowed for _ in range(3)]
    assert results == [True, True, False, False]


async def test_concurrent_takes_are_atomic(settings: Settings) -> None:
    """Many clients (separate connections) racing for 10 tokens get exactly 10."""
    key, limit = f"rl:test:{uuid.uuid4().hex}", Limit(rate=0.001, burst=10)
    clients = [aioredis.Redis.from_url(settings.redis_url) for _ in range(8)]
    try:
        limiters = [RedisRateLimiter(c) for c in clients]
        decisions = await asyncio.gather(
            *(limiters[i % len(limiters)].take(key, limit) for i in range(200))
        )
    finally:
        for c in clients:
            await c.aclose()
    assert sum(d.allowed for d in decisions) == 10
    assert all(d.retry_after >= 1 for d in decisions if not d.allowed)


async def test_bucket_keys_expire(limiter: RedisRateLimiter, redis_client: redis.Redis) -> None:
    key = f"rl:test:{uuid.uuid4().hex}"
    await limiter.take(key, Limit(rate=10.0, burst=5))
    ttl_ms = redis_client.pttl(key)
    assert 0 < ttl_ms <= 1000 + 100 + 50  # refilled after 0.1 s, plus a second of margin


async def test_unlimited_touches_nothing(
    limiter: RedisRateLimiter, redis_client: redis.Redis
) -> None:
    key = f"rl:test:{uuid.uuid4().hex}"
    assert all([(await limiter.take(key, Limit(rate=0, burst=1))).allowed for _ in range(50)])
    assert not redis_client.exists(key)


async def test_redis_down_fails_open() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = aioredis.Redis(port=port, socket_connect_timeout=0.5)
    limiter = RedisRateLimiter(client)
    try:
        assert (await limiter.take("rl:test:x", Limit(rate=1, burst=1))).allowed
        assert limiter.failed_open == 1
    finally:
        await client.aclose()


# --- through the gateway ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ingest_token() -> str:
    return "ratelimit-ingest-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def gw(settings: Settings, ingest_token: str) -> Iterator[LiveGateway]:
    limited = dataclasses.replace(
        settings,
        ingest_token=Secret(ingest_token),
        ingest_rate=10.0,
        ingest_burst=3,
        connect_rate=1.0,
        connect_burst=2,
        connect_ip_rate=1.0,
        connect_ip_burst=4,
        fanout_history=False,
    )
    with live_gateway(limited) as live:
        yield live


async def test_ingest_burst_then_429_with_retry_after_then_allowed(
    gw: LiveGateway, ingest_token: str, redis_client: redis.Redis
) -> None:
    headers = {"Authorization": f"Bearer {ingest_token}"}
    run = uuid.uuid4().hex[:10]
    bodies = [activity(f"rl-{run}-{i}", f"rl-{run}") for i in range(10)]
    async with httpx.AsyncClient(base_url=gw.base, timeout=TIMEOUT) as http:
        # The first produce connects to the broker (about a second): warm up, then start the
        # measurement with a full bucket.
        warm = await http.post("/v1/activities", json=bodies[9], headers=headers)
        assert warm.status_code == 202
        redis_client.delete(ingest_key(ingest_token))
        first_sent = time.monotonic()  # the first take is at or after this
        statuses = [
            (await http.post("/v1/activities", json=bodies[i], headers=headers)).status_code
            for i in range(3)
        ]
        assert statuses == [202, 202, 202]
        throttled = await http.post("/v1/activities", json=bodies[3], headers=headers)
        assert throttled.status_code == 429
        retry_after = throttled.headers["retry-after"]
        assert retry_after.isdigit() and int(retry_after) >= 1
        error = throttled.json()["error"]
        assert error["code"] == "throttled" and "10 requests/s" in error["message"]
        # Follows share the token's bucket.
        follow = await http.post(
            "/v1/follows", json={"follower": "a", "followee": "b"}, headers=headers
        )
        assert follow.status_code == 429

        async def accepted() -> bool:
            response = await http.post("/v1/activities", json=bodies[4], headers=headers)
            return response.status_code == 202

        await eventually(accepted, "ingest allowed again after the refill", timeout=2.0)
        refilled_s = time.monotonic() - first_sent
        # The bucket starts full at the first take: its fourth token exists 1/rate (0.1 s) after
        # it, never sooner. Measured: 0.112-0.131 s over 6 runs with the 2-core machine at load
        # 5.7 (the excess is HTTP round trips and the 20 ms poll). Bound: 1/rate plus 0.1 s, 3x
        # the worst excess: a refill at half the rate, or one held to the whole-second
        # Retry-After, fails, and so does a doubled rate (the old bound, 2 s from the last 429,
        # passed all three).
        period = 1 / gw.settings.ingest_rate
        assert period - 0.005 <= refilled_s < period + 0.1, refilled_s
    # Keyed by the token's hash, never by the token.
    assert redis_client.exists(ingest_key(ingest_token))
    names = [k.decode() for k in redis_client.scan_iter(match="rl:*", count=1000)]
    assert not [n for n in names if ingest_token in n]


async def test_wrong_token_is_401_not_throttled(gw: LiveGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.base, timeout=TIMEOUT) as http:
        for _ in range(6):
            response = await http.post(
                "/v1/activities", json={}, headers={"Authorization": "Bearer nope-" + "x" * 20}
            )
            assert response.status_code == 401


async def _connect(gw: LiveGateway, token: str | None, ip: str) -> ClientConnection:
    url = gw.ws if token is None else f"{gw.ws}?token={token}"
    return await connect(url, local_addr=(ip, 0), open_timeout=TIMEOUT)


async def _outcome(ws: ClientConnection) -> str | int:
    """``welcome`` or the close code the server sent."""
    try:
        frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else -1
    assert '"welcome"' in str(frame)
    return "welcome"


async def test_connects_per_user_over_the_burst_close_4029(gw: LiveGateway) -> None:
    user = f"rl-user-{uuid.uuid4().hex[:8]}"
    opened: list[ClientConnection] = []
    try:
        outcomes = []
        for _ in range(3):
            ws = await _connect(gw, jwt(user), client_ip())  # another IP each time
            opened.append(ws)
            outcomes.append(await _outcome(ws))
        assert outcomes == ["welcome", "welcome", CLOSE_RATE_LIMITED]
        # Another user is not affected.
        other = await _connect(gw, jwt(user + "-other"), client_ip())
        opened.append(other)
        assert await _outcome(other) == "welcome"

        async def welcomed_again() -> bool:
            ws = await _connect(gw, jwt(user), client_ip())
            opened.append(ws)
            return await _outcome(ws) == "welcome"

        await eventually(welcomed_again, "a connect allowed again after the refill", 2.0)
    finally:
        for ws in opened:
            await ws.close()


async def test_connects_per_ip_over_the_burst_close_4029(gw: LiveGateway) -> None:
    """Attempts count per IP before the token is checked: bad tokens use up the IP's burst."""
    ip = client_ip()
    opened: list[ClientConnection] = []
    try:
        outcomes: list[str | int] = []
        for i in range(5):
            token = "not-a-jwt" if i < 2 else jwt(f"rl-ip-{uuid.uuid4().hex[:8]}")
            ws = await _connect(gw, token, ip)
            opened.append(ws)
            outcomes.append(await _outcome(ws))
        assert outcomes == [4001, 4001, "welcome", "welcome", CLOSE_RATE_LIMITED]
        # Another IP is not affected.
        ws = await _connect(gw, jwt(f"rl-ip-{uuid.uuid4().hex[:8]}"), client_ip())
        opened.append(ws)
        assert await _outcome(ws) == "welcome"

        async def welcomed_again() -> bool:
            ws = await _connect(gw, jwt(f"rl-ip-{uuid.uuid4().hex[:8]}"), ip)
            opened.append(ws)
            return await _outcome(ws) == "welcome"

        await eventually(welcomed_again, "the IP allowed again after the refill", 2.0)
    finally:
        for ws in opened:
            await ws.close()
