"""End to end: two tenants and ``default`` on one deployment (a real ``feed fanout`` and ``feed
gateway`` on the session's Redis, broker and Cassandra), with the same user ids, the same
activity ids and the same Idempotency-Key, over Kafka, HTTP ingest and WebSocket. Nothing
crosses: not a frame, a feed item, an idempotent answer, a delete, a resume cursor or a position
cursor. Tenants are created with ``feed tenant create`` as an operator would; a record for an
unknown tenant is dead-lettered with its header; a disabled tenant's ingest and connects stop
within the refresh bound."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import websockets

from fanout.dlq import read_dead_letters
from feed.graph_cassandra import CassandraFollowGraph
from feed.kafka import create_topics
from feed.keys import Keyspace
from gateway import closecodes
from gateway.auth import mint_token
from tests.conftest import wait_for
from tests.support.pipeline import Pipeline, frames_until, isolated_env, next_frame
from tests.support.procs import feed_cli

pytestmark = pytest.mark.e2e

REFRESH_S = 1


@pytest.fixture(scope="module")
def pipeline(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    env = isolated_env(stack_env, "tenants", FEED_TENANT_REFRESH_S=str(REFRESH_S))
    p = Pipeline(env, tmp_path_factory.mktemp("tenants"))
    create_topics(p.settings)
    with p.running():
        yield p


def _tenant_cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    result = feed_cli(env, "tenant", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    out: dict[str, Any] = json.loads(result.stdout)
    return out


class Side:
    """One tenant's credentials, as its users and upstream services hold them."""

    def __init__(self, tenant: str, ingest_token: str, jwt_secret: str) -> None:
        self.tenant = tenant
        self.ingest_token = ingest_token
        self.jwt_secret = jwt_secret

    def token(self, user: str) -> str:
        return mint_token(self.jwt_secret, user, 600, tenant=self.tenant)

    def headers(self) -> list[tuple[str, bytes]]:
        return [] if self.tenant == "default" else [("feed.tenant", self.tenant.encode())]


def _activity(aid: str, actor: str, obj: str, type_: str = "Create") -> dict[str, Any]:
    return {
        "id": aid,
        "type": type_,
        "actor": actor,
        "object": obj,
        "published": datetime.now(UTC).isoformat(),
    }


def _produce(p: Pipeline, side: Side, topic: str, key: str, value: dict[str, Any]) -> None:
    p.producer.produce(
        topic, key=key.encode(), value=json.dumps(value).encode(), headers=side.headers()
    )
    assert p.producer.flush(10) == 0


def _http(p: Pipeline, token: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
    return p.call("", path, body, token=token, headers=headers)


def _feed(p: Pipeline, side: Side, user: str, query: str = "limit=50") -> dict[str, Any]:
    status, page = _http(p, side.token(user), f"/v1/feed?{query}")
    assert status == 200, page
    return page


def _objects(page: dict[str, Any]) -> list[str]:
    return [item["activity"]["object"] for item in page["items"]]


async def test_two_tenants_and_default_with_the_same_ids_share_nothing(
    pipeline: Pipeline, cassandra: Any, ids: Callable[[str], str]
) -> None:
    p, s = pipeline, pipeline.settings
    tag = uuid.uuid4().hex[:6]
    acme_creds = _tenant_cli(p.env, "create", f"acme-{tag}")
    globex_creds = _tenant_cli(p.env, "create", f"globex-{tag}")
    assert s.jwt_secret is not None and s.ingest_token is not None
    default = Side("default", s.ingest_token.reveal(), s.jwt_secret.reveal())
    acme = Side(acme_creds["tenant"], acme_creds["ingest_token"], acme_creds["jwt_secret"])
    globex = Side(globex_creds["tenant"], globex_creds["ingest_token"], globex_creds["jwt_secret"])
    sides = [default, acme, globex]
    fan, author, aid = ids("fan"), ids("author"), ids("x")

    # follows: default and acme over Kafka (acme's with its header), globex over HTTP
    for side in (default, acme):
        event = {"type": "follow", "follower": fan, "followee": author}
        _produce(p, side, s.topic_follows, fan, {**event, "at": datetime.now(UTC).isoformat()})
    status, body = _http(
        p, globex.ingest_token, "/v1/follows", {"follower": fan, "followee": author}
    )
    assert status == 202, body
    graph = CassandraFollowGraph(cassandra, s.cassandra_keyspace)
    for side in sides:
        view = graph.for_tenant(side.tenant)
        wait_for(lambda v=view: v.is_following(fan, author), timeout=30, message="follows")

    sockets = {}
    welcomes = {}
    try:
        for side in sides:
            ws = await websockets.connect(
                p.ws_url, additional_headers={"Authorization": f"Bearer {side.token(fan)}"}
            )
            sockets[side.tenant] = ws
            welcomes[side.tenant] = await next_frame(ws, 10)
            assert welcomes[side.tenant]["type"] == "welcome"
            assert welcomes[side.tenant]["user"] == fan  # the user id, never a principal

        # the same activity id in all three, the same Idempotency-Key on both HTTP requests
        key = f"key-{tag}"
        for side in (default, globex):
            status, body = _http(
                p,
                side.ingest_token,
                "/v1/activities",
                _activity(aid, author, f"post:{side.tenant}"),
                **{"Idempotency-Key": key},
            )
            assert status == 202, (side.tenant, body)  # not a replay of the other's answer
        _produce(p, acme, s.topic_activities, author, _activity(aid, author, f"post:{acme.tenant}"))
        # then a marker per tenant: everything a socket receives before its marker is its own
        marker = ids("marker")
        for side in sides:
            _produce(p, side, s.topic_activities, author, _activity(marker, author, "marker"))
        for side in sides:
            frames = await frames_until(
                sockets[side.tenant],
                lambda f: f.get("type") == "activity" and f["activity"]["id"] == marker,
                timeout=30,
            )
            got = [f["activity"]["object"] for f in frames if f.get("type") == "activity"]
            assert got == [f"post:{side.tenant}", "marker"], (side.tenant, frames)
            assert _objects(_feed(p, side, fan)) == ["marker", f"post:{side.tenant}"]

        # a position cursor of one tenant, in another: positions in the caller's own feed only
        first = _feed(p, acme, fan, "limit=1")
        assert first["next"]
        assert _objects(_feed(p, globex, fan, f"limit=50&cursor={first['next']}")) == [
            f"post:{globex.tenant}"
        ]

        # a resume cursor of one tenant, in another: never the other's frames
        async with websockets.connect(
            p.ws_url, additional_headers={"Authorization": f"Bearer {globex.token(fan)}"}
        ) as ws:
            assert (await next_frame(ws, 10))["type"] == "welcome"
            await ws.send(json.dumps({"type": "resume", "cursor": welcomes[acme.tenant]["cursor"]}))
            frames = await frames_until(ws, lambda f: f.get("type") == "reset", timeout=10)
            assert not [f for f in frames if f.get("type") == "activity"], frames

        # a delete in acme leaves default's and globex's activity of the same id whole
        _produce(p, acme, s.topic_activities, author, _activity(ids("d"), author, aid, "Delete"))
        removed = await frames_until(
            sockets[acme.tenant], lambda f: f.get("type") == "removed", timeout=30
        )
        assert removed[-1]["id"] == aid
        assert _objects(_feed(p, acme, fan)) == ["marker"]
        for side in (default, globex):
            assert _objects(_feed(p, side, fan)) == ["marker", f"post:{side.tenant}"]
    finally:
        for ws in sockets.values():
            await ws.close()

    # every Redis key naming these ids is in its tenant's keyspace
    for name in (fan, author, aid):
        found = {k.decode() for k in p.redis.scan_iter(match=f"*{name}*", count=1000)}
        for side in (acme, globex):
            prefix = Keyspace.for_tenant(side.tenant).prefix
            assert any(k.startswith(prefix) for k in found), (name, side.tenant)
        assert all(
            k.startswith("t:" + acme.tenant)
            or k.startswith("t:" + globex.tenant)
            or not k.startswith("t:")
            for k in found
        )


async def test_unknown_and_disabled_tenants_are_refused_at_every_door(
    pipeline: Pipeline, ids: Callable[[str], str]
) -> None:
    p, s = pipeline, pipeline.settings
    tag = uuid.uuid4().hex[:6]
    creds = _tenant_cli(p.env, "create", f"initech-{tag}")
    side = Side(creds["tenant"], creds["ingest_token"], creds["jwt_secret"])
    user, aid = ids("u"), ids("a")

    # a record naming no tenant the registry holds: dead-lettered, its header kept
    nobody = Side(f"nobody-{tag}", "", "")
    _produce(p, nobody, s.topic_activities, user, _activity(aid, user, "o"))

    def dead() -> list[Any]:
        records, consumer = read_dead_letters(
            s.kafka_bootstrap, s.topic_dlq, group=None, limit=100, timeout=10
        )
        consumer.close()
        return [r for r in records if r.headers.get("feed.tenant") == nobody.tenant]

    letters = wait_for(dead, timeout=30, message="the unknown tenant's record in the DLQ")
    assert letters[0].headers["feed.error"] == "unknown_tenant"
    assert letters[0].headers["feed.error.field"] == "feed.tenant"

    # working, then disabled: ingest 403 and connects refused within the refresh bound
    status, _ = _http(p, side.ingest_token, "/v1/activities", _activity(aid, user, "o"))
    assert status == 202
    async with websockets.connect(
        p.ws_url, additional_headers={"Authorization": f"Bearer {side.token(user)}"}
    ) as ws:
        assert (await next_frame(ws, 10))["type"] == "welcome"
    assert _tenant_cli(p.env, "disable", side.tenant)["state"] == "disabled"

    def ingest_refused() -> bool:
        code, _ = _http(p, side.ingest_token, "/v1/activities", _activity(ids("b"), user, "o"))
        return code == 403

    wait_for(ingest_refused, timeout=REFRESH_S * 3 + 5, message="ingest refused once disabled")
    status, body = _http(p, side.token(user), "/v1/feed")
    assert status == 401, body
    async with websockets.connect(
        p.ws_url, additional_headers={"Authorization": f"Bearer {side.token(user)}"}
    ) as ws:
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await next_frame(ws, 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == closecodes.UNAUTHORIZED.code
