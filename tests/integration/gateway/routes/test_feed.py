"""Nobody reads another user's feed: every way we could think of, against a live gateway.

The gateway runs under uvicorn on a free port with the session stack's Redis, broker and
Cassandra. No fan-out worker: the victim's and the attacker's timelines are written the way the
worker writes them (``RedisTimelines.insert`` for the hot tier and the live push,
``CassandraHistory`` for durable history older than what Redis keeps).

The attacker holds a valid token of their own and tries, over HTTP: query parameters naming the
victim, path variants, a cursor minted from the victim's page, the victim's token in the query
string (refused on HTTP), forged tokens (another secret, ``alg: none``, HS512, RS-style header
games, expired beyond the leeway, no ``exp``); and over the WebSocket: resuming with cursors of
the victim's stream, query parameters, a second token in the query string. Every answer is a
401/404/400, or the attacker's own data; the victim's activities never appear.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from feed.cursor import order_key
from feed.history_cassandra import CassandraHistory
from feed.interfaces import HistoryRecord, Insert
from feed.settings import Secret, Settings
from feed.timelines_redis import RedisTimelines
from gateway.auth import mint_token
from schemas import Activity, encode_activity, published_us
from tests.conftest import TEST_JWT_SECRET
from tests.support.live_gateway import LiveGateway, live_gateway

TIMEOUT = 10.0
LEEWAY_S = 5
#: Items of each user: the newest HOT are in Redis, all of them in Cassandra.
ITEMS, HOT = 12, 4


# --- tokens -----------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(
    header: dict[str, Any], claims: dict[str, Any], key: bytes | None, digest: Any = hashlib.sha256
) -> str:
    """A JWT built by hand (no library would build most of these)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(signature)}"


def token(user: str, ttl: int = 600) -> str:
    return mint_token(Secret(TEST_JWT_SECRET), user, ttl)


def forged_tokens(victim: str) -> dict[str, str]:
    now = int(time.time())
    good = {"sub": victim, "iat": now, "exp": now + 600}
    secret = TEST_JWT_SECRET.encode()
    return {
        "another secret": forge({"alg": "HS256", "typ": "JWT"}, good, b"x" * 48),
        "alg none": forge({"alg": "none", "typ": "JWT"}, good, None),
        "alg None, signed": forge({"alg": "None", "typ": "JWT"}, good, secret),
        "HS512 with the right secret": forge(
            {"alg": "HS512", "typ": "JWT"}, good, secret, hashlib.sha512
        ),
        "HS384 with the right secret": forge(
            {"alg": "HS384", "typ": "JWT"}, good, secret, hashlib.sha384
        ),
        "RS256 header, HMAC signature": forge({"alg": "RS256", "typ": "JWT"}, good, secret),
        "expired beyond the leeway": forge(
            {"alg": "HS256"}, {**good, "exp": now - LEEWAY_S - 30}, secret
        ),
        "no exp": forge({"alg": "HS256"}, {"sub": victim, "iat": now}, secret),
        "exp as a string": forge({"alg": "HS256"}, {**good, "exp": str(now + 600)}, secret),
        "not yet valid": forge({"alg": "HS256"}, {**good, "nbf": now + 3600}, secret),
        "sub as a list": forge({"alg": "HS256"}, {**good, "sub": [victim]}, secret),
        "no sub": forge({"alg": "HS256"}, {"exp": now + 600}, secret),
        "signature stripped": forge({"alg": "HS256"}, good, secret).rpartition(".")[0] + ".",
        "payload swapped": _swap_payload(token("someone-else"), good),
        "garbage": "not.a.jwt",
    }


def _swap_payload(real: str, claims: dict[str, Any]) -> str:
    header, _, signature = real.split(".")
    return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"


# --- data -------------------------------------------------------------------------------------
@dataclasses.dataclass
class People:
    victim: str
    attacker: str
    victim_items: set[str]
    attacker_items: set[str]


def _activities(owner: str, tag: str) -> list[Activity]:
    start = datetime(2026, 3, 1, tzinfo=UTC)
    return [
        Activity(
            id=f"{tag}-{n:02d}",
            type="Create",
            actor=f"{owner}-friend",
            object=f"secret:{tag}:{n}",
            published=start + timedelta(minutes=n),
        )
        for n in range(ITEMS)
    ]


def _store(
    settings: Settings, cassandra: Any, rclient: redis.Redis, user: str, activities: list[Activity]
) -> None:
    history = CassandraHistory(cassandra, settings.cassandra_keyspace)
    records = [
        HistoryRecord(a.id, a.actor, published_us(a), encode_activity(a), [user])
        for a in activities
    ]
    history.put_activities(records)
    history.put_deliveries(records)
    RedisTimelines(rclient, timeline_max=HOT, stream_history=100, body_ttl_s=600).insert(
        [Insert(order_key(r.ts, r.activity_id), r.activity_id, r.body, r.users) for r in records]
    )


@pytest.fixture(scope="module")
def people(settings: Settings, cassandra: Any, redis_client: redis.Redis) -> People:
    run = uuid.uuid4().hex[:8]
    victim, attacker = f"victim-{run}", f"attacker-{run}"
    victim_acts, attacker_acts = _activities(victim, f"v{run}"), _activities(attacker, f"x{run}")
    _store(settings, cassandra, redis_client, victim, victim_acts)
    _store(settings, cassandra, redis_client, attacker, attacker_acts)
    return People(victim, attacker, {a.id for a in victim_acts}, {a.id for a in attacker_acts})


@pytest.fixture(scope="module")
def gw(settings: Settings) -> Iterator[LiveGateway]:
    with live_gateway(dataclasses.replace(settings, jwt_leeway_s=LEEWAY_S)) as live:
        yield live


@pytest.fixture
async def http(gw: LiveGateway) -> Any:
    async with httpx.AsyncClient(base_url=gw.base, timeout=TIMEOUT) as client:
        yield client


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


async def all_pages(
    http: httpx.AsyncClient, headers: dict[str, str], path: str = "/v1/feed", limit: int = 5
) -> tuple[list[str], list[str]]:
    """Every item id of a feed, page by page; and the cursors seen."""
    ids: list[str] = []
    cursors: list[str] = []
    params: dict[str, Any] = {"limit": limit}
    for _ in range(50):
        response = await http.get(path, params=params, headers=headers)
        assert response.status_code == 200, response.text
        page = response.json()
        ids += [item["activity"]["id"] for item in page["items"]]
        if page["next"] is None:
            return ids, cursors
        cursors.append(page["next"])
        params = {"limit": limit, "cursor": page["next"]}
    pytest.fail("the feed never ended")


def leaked(people: People, text: str) -> list[str]:
    return sorted(i for i in people.victim_items if i in text)


# --- HTTP -------------------------------------------------------------------------------------
async def test_each_user_reads_exactly_their_own_feed(
    http: httpx.AsyncClient, people: People
) -> None:
    """The baseline: hot tier and history, all of each user's items, nobody else's."""
    mine, _ = await all_pages(http, bearer(token(people.attacker)))
    theirs, _ = await all_pages(http, bearer(token(people.victim)))
    assert set(mine) == people.attacker_items and len(mine) == ITEMS
    assert set(theirs) == people.victim_items and len(theirs) == ITEMS


@pytest.mark.parametrize(
    "query",
    [
        "user={v}",
        "sub={v}",
        "user_id={v}",
        "uid={v}",
        "for={v}",
        "actor={v}",
        "owner={v}",
        "user={v}&user={v}",
        "sub={v}&limit=200",
        "user[]={v}",
        "filter=user:{v}",
        "as={v}",
    ],
)
async def test_query_parameters_naming_the_victim_are_ignored(
    http: httpx.AsyncClient, people: People, query: str
) -> None:
    response = await http.get(
        f"/v1/feed?{query.format(v=people.victim)}", headers=bearer(token(people.attacker))
    )
    assert not leaked(people, response.text), response.text[:300]
    if response.status_code == 200:
        assert {i["activity"]["id"] for i in response.json()["items"]} <= people.attacker_items


@pytest.mark.parametrize(
    "path",
    [
        "/v1/feed/{v}",
        "/v1/feeds/{v}",
        "/v1/users/{v}/feed",
        "/v1/feed;user={v}",
        "/v1/feed%2F{v}",
        "/v1/feed/..%2F{v}",
        "/v1//feed?user={v}",
        "/V1/FEED?user={v}",
        "/v1/feed/?user={v}",
        "/v1/feed/../feed?user={v}",
        "/v1/feed#{v}",
        "/v1/stream?user={v}",
        "/v1/timeline/{v}",
        "/dev/token?user={v}",
    ],
)
async def test_path_variants_never_reach_the_victim(
    http: httpx.AsyncClient, people: People, path: str
) -> None:
    response = await http.get(path.format(v=people.victim), headers=bearer(token(people.attacker)))
    assert not leaked(people, response.text), response.text[:300]
    assert response.status_code in (200, 307, 400, 401, 404, 405), response.status_code
    if response.status_code == 200:
        assert "token" not in response.json()  # no dev-token minting outside dev mode
        assert {i["activity"]["id"] for i in response.json()["items"]} <= people.attacker_items


async def test_a_cursor_from_the_victims_page_reads_only_the_attackers_feed(
    http: httpx.AsyncClient, people: People
) -> None:
    _, victim_cursors = await all_pages(http, bearer(token(people.victim)), limit=3)
    assert len(victim_cursors) >= 3  # some in the hot tier, some past it into history
    for cursor in victim_cursors:
        response = await http.get(
            "/v1/feed",
            params={"cursor": cursor, "limit": 200},
            headers=bearer(token(people.attacker)),
        )
        assert response.status_code in (200, 400)
        assert not leaked(people, response.text), response.text[:300]
        if response.status_code == 200:
            ids = {i["activity"]["id"] for i in response.json()["items"]}
            assert ids <= people.attacker_items


async def test_query_tokens_are_refused_on_http(http: httpx.AsyncClient, people: People) -> None:
    alone = await http.get("/v1/feed", params={"token": token(people.victim)})
    assert alone.status_code == 401
    beside = await http.get(
        "/v1/feed",
        params={"token": token(people.victim), "access_token": token(people.victim)},
        headers=bearer(token(people.attacker)),
    )
    assert beside.status_code == 200
    assert {i["activity"]["id"] for i in beside.json()["items"]} <= people.attacker_items
    cookie = await http.get("/v1/feed", headers={"Cookie": f"token={token(people.victim)}"})
    assert cookie.status_code == 401


async def test_forged_tokens_are_401(http: httpx.AsyncClient, people: People) -> None:
    outcomes = {}
    for name, forged in forged_tokens(people.victim).items():
        response = await http.get("/v1/feed", headers=bearer(forged))
        outcomes[name] = response.status_code
        assert not leaked(people, response.text), name
    assert outcomes == dict.fromkeys(outcomes, 401)


@pytest.mark.parametrize(
    "authorization",
    ["Basic {t}", "Token {t}", "Bearer", "{t}", "Bearer {t} {t}", "Bearer {t}x"],
)
async def test_malformed_authorization_headers_are_401(
    http: httpx.AsyncClient, people: People, authorization: str
) -> None:
    value = authorization.format(t=token(people.victim))
    response = await http.get("/v1/feed", headers={"Authorization": value})
    assert response.status_code == 401
    assert not leaked(people, response.text)


async def test_clock_skew_is_bounded_by_the_leeway(http: httpx.AsyncClient, people: People) -> None:
    secret = TEST_JWT_SECRET.encode()
    now = int(time.time())
    within = forge({"alg": "HS256"}, {"sub": people.attacker, "exp": now - LEEWAY_S + 3}, secret)
    beyond = forge({"alg": "HS256"}, {"sub": people.attacker, "exp": now - LEEWAY_S - 3}, secret)
    assert (await http.get("/v1/feed", headers=bearer(within))).status_code == 200
    assert (await http.get("/v1/feed", headers=bearer(beyond))).status_code == 401


# --- WebSocket --------------------------------------------------------------------------------
async def _recv(ws: ClientConnection, timeout: float = TIMEOUT) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    frame: dict[str, Any] = json.loads(raw)
    return frame


async def _close_code(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    return info.value.rcvd.code if info.value.rcvd else None


def _publish(rclient: redis.Redis, user: str, activity_id: str, minute: int) -> None:
    activity = Activity(
        id=activity_id,
        type="Create",
        actor=f"{user}-friend",
        object="live",
        published=datetime(2026, 4, 1, tzinfo=UTC) + timedelta(minutes=minute),
    )
    RedisTimelines(rclient, timeline_max=100, stream_history=100, body_ttl_s=600).insert(
        [
            Insert(
                order_key(published_us(activity), activity.id),
                activity.id,
                encode_activity(activity),
                [user],
            )
        ]
    )


async def test_resume_with_the_victims_cursors_gives_reset_or_own_items_only(
    gw: LiveGateway, people: People, redis_client: redis.Redis
) -> None:
    run = uuid.uuid4().hex[:6]
    victim_ws = await connect(f"{gw.ws}?token={token(people.victim)}")
    welcome = await _recv(victim_ws)
    assert welcome["user"] == people.victim
    victim_cursors = [welcome["cursor"]]
    await victim_ws.send(json.dumps({"type": "resume", "cursor": welcome["cursor"]}))
    for n in range(3):
        live_id = f"v-live-{run}-{n}"
        people.victim_items.add(live_id)
        _publish(redis_client, people.victim, live_id, n)
        frame = await _recv(victim_ws)
        assert frame["activity"]["id"] == live_id
        victim_cursors.append(frame["cursor"])
    await victim_ws.close()

    epoch, _, seq = victim_cursors[-1].rpartition(".")
    guesses = [*victim_cursors, f"{epoch}.0", f"{epoch}.{int(seq) + 5}", f"{epoch}.1"]
    attacker_ws = await connect(
        f"{gw.ws}?token={token(people.attacker)}&user={people.victim}&sub={people.victim}"
    )
    try:
        welcome = await _recv(attacker_ws)
        assert welcome["user"] == people.attacker
        frames: list[dict[str, Any]] = []
        for cursor in guesses:
            await attacker_ws.send(json.dumps({"type": "resume", "cursor": cursor}))
            await asyncio.sleep(0.3)  # within the session's client-frame rate (burst 10)
        marker = f"x-live-{run}"
        people.attacker_items.add(marker)
        _publish(redis_client, people.attacker, marker, 50)
        while True:
            frame = await _recv(attacker_ws)
            frames.append(frame)
            if frame.get("type") == "activity" and frame["activity"]["id"] == marker:
                break
    finally:
        await attacker_ws.close()
    assert not leaked(people, json.dumps(frames))
    kinds = {f["type"] for f in frames}
    assert kinds <= {"reset", "activity"}, kinds
    assert "reset" in kinds  # a foreign cursor cannot be served: the client is told to refetch
    for frame in frames:
        if frame["type"] == "activity":
            assert frame["activity"]["id"] in people.attacker_items


async def test_stream_header_token_wins_over_query_token(gw: LiveGateway, people: People) -> None:
    async with connect(
        f"{gw.ws}?token={token(people.victim)}",
        additional_headers=bearer(token(people.attacker)),
    ) as ws:
        assert (await _recv(ws))["user"] == people.attacker


async def test_stream_refuses_forged_tokens_with_4001(gw: LiveGateway, people: People) -> None:
    codes = {}
    for name, forged in forged_tokens(people.victim).items():
        async with connect(f"{gw.ws}?token={forged}") as ws:
            codes[name] = await _close_code(ws)
    assert codes == dict.fromkeys(codes, 4001)
