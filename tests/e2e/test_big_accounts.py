"""Hybrid fan-out end to end: an account over FEED_FANOUT_LIMIT is merged at read time, and its
connected followers still get its activities live, once, through a per-actor channel that a
gateway subscribes only while such a follower is connected to it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import websockets

from feed import versions
from feed.kafka import create_topics
from feed.keys import Keyspace
from feed.tenants import Credentials
from feed.tenants_cassandra import CassandraTenants
from gateway.auth import mint_token
from tests.conftest import wait_for
from tests.support.pipeline import Pipeline, frames_until, isolated_env, next_frame
from tests.support.procs import FeedProcess, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hybrid(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Pipeline, str]]:
    env = isolated_env(stack_env, "big", FEED_FANOUT_LIMIT="2")
    logs = tmp_path_factory.mktemp("hybrid")
    p = Pipeline(env, logs)
    create_topics(p.settings)
    second_port = free_port()
    second = FeedProcess(
        ["gateway"], {**env, "FEED_GATEWAY_PORT": str(second_port)}, logs / "gateway-2.log"
    )
    second.start()
    try:
        with p.running():
            second.wait_http(f"http://127.0.0.1:{second_port}/healthz", timeout=60)
            yield p, f"ws://127.0.0.1:{second_port}/v1/stream"
    finally:
        second.stop()


def _channels(redis_client: Any) -> set[str]:
    return {c.decode() for c in redis_client.pubsub_channels()}


async def test_big_account_is_merged_at_read_time_and_pushed_live_once(
    hybrid: tuple[Pipeline, str], redis_client: Any, cassandra: Any, ids: Callable[[str], str]
) -> None:
    pipeline, second_ws = hybrid
    s = pipeline.settings
    star, online, offline, late = ids("star"), ids("online"), ids("offline"), ids("late")
    for fan in (online, offline, ids("third")):
        pipeline.follow(fan, star)
    wait_for(
        lambda: versions.changes(redis_client.get(f"gv:{{{star}}}")) == 3,
        timeout=30,
        message="follows applied",
    )
    # The star's first activity makes the worker classify it (3 followers > limit 2).
    first = ids("first")
    pipeline.produce(s.topic_activities, star, pipeline.activity(first, star))
    wait_for(
        lambda: redis_client.sismember("big-accounts", star), timeout=30, message="star marked big"
    )
    assert [a["id"] for a in pipeline.feed(offline)] == [first]

    headers = {"Authorization": f"Bearer {pipeline.token(online)}"}
    async with (
        websockets.connect(pipeline.ws_url, additional_headers=headers) as ws1,
        websockets.connect(second_ws, additional_headers=headers) as ws2,
    ):
        w1, w2 = await next_frame(ws1, 5), await next_frame(ws2, 5)
        assert w1["type"] == w2["type"] == "welcome"
        wait_for(
            lambda: f"ac:{{{star}}}" in _channels(redis_client),
            timeout=10,
            message="actor channel subscribed",
        )

        # A new activity by the big account: live on both sockets, one delivery (same cursor).
        live = ids("live")
        pipeline.produce(s.topic_activities, star, pipeline.activity(live, star))
        f1 = await frames_until(ws1, lambda f: f.get("type") == "activity", timeout=10)
        f2 = await frames_until(ws2, lambda f: f.get("type") == "activity", timeout=10)
        assert f1[-1]["activity"]["id"] == f2[-1]["activity"]["id"] == live
        assert f1[-1]["cursor"] == f2[-1]["cursor"]
        # Once: a second copy (from the other gateway's insert, say) would come before a later
        # activity of the star, so each socket is read up to that marker and must hold the
        # item exactly once, and nothing but activities, in delivery-seq order.
        marker = ids("marker")
        pipeline.produce(s.topic_activities, star, pipeline.activity(marker, star))
        for ws, before in ((ws1, f1), (ws2, f2)):
            rest = await frames_until(
                ws,
                lambda f: f.get("type") == "activity" and f["activity"]["id"] == marker,
                timeout=10,
            )
            seen = [f for f in [*before, *rest] if f.get("type") != "welcome"]
            assert [f.get("activity", {}).get("id", f["type"]) for f in seen] == [live, marker]
            seqs = [int(f["cursor"].rpartition(".")[2]) for f in seen]
            assert seqs[1] == seqs[0] + 1, seen

        # Not fanned out on write: no timeline rows for the offline follower, yet it is in
        # their feed (merged from the star's outbox), newest first.
        rows = cassandra.execute(
            f"SELECT id FROM {s.cassandra_keyspace}.timeline WHERE user_id = %s", (offline,)
        )
        assert [r.id for r in rows] == []
        assert [a["id"] for a in pipeline.feed(offline)] == [marker, live, first]

        # Deleting it: connected followers get `removed`, and it leaves every feed.
        delete = json.dumps(
            {
                "id": ids("del"),
                "type": "Delete",
                "actor": star,
                "object": live,
                "published": datetime.now(UTC).isoformat(),
            }
        ).encode()
        pipeline.produce(s.topic_activities, star, delete)
        removed = await frames_until(ws1, lambda f: f.get("type") == "removed", timeout=10)
        assert removed[-1]["id"] == live
        wait_for(
            lambda: [a["id"] for a in pipeline.feed(offline)] == [marker, first],
            timeout=10,
            message="deleted activity gone from the merged feed",
        )

        # A user who follows the star while connected starts receiving it live.
        async with websockets.connect(
            pipeline.ws_url, additional_headers={"Authorization": f"Bearer {pipeline.token(late)}"}
        ) as ws3:
            assert (await next_frame(ws3, 5))["type"] == "welcome"
            pipeline.follow(late, star)
            wait_for(
                lambda: versions.changes(redis_client.get(f"gv:{{{star}}}")) == 4,
                timeout=30,
                message="late follow applied",
            )
            later = ids("later")
            wait_for(
                lambda: f"ac:{{{star}}}" in _channels(redis_client),
                timeout=10,
                message="actor channel still subscribed",
            )
            pipeline.produce(s.topic_activities, star, pipeline.activity(later, star))
            got = await frames_until(ws3, lambda f: f.get("type") == "activity", timeout=10)
            assert got[-1]["activity"]["id"] == later

    # Nobody following the star is connected any more: its channel is dropped.
    wait_for(
        lambda: f"ac:{{{star}}}" not in _channels(redis_client),
        timeout=10,
        message="actor channel unsubscribed",
    )


async def test_a_tenants_big_account_is_pushed_live_on_its_own_channel(
    hybrid: tuple[Pipeline, str], redis_client: Any, cassandra: Any, ids: Callable[[str], str]
) -> None:
    """The same for a tenant other than ``default``: its large account's channel is in its
    keyspace, and its connected followers get its activities live, once; a default-tenant user
    of the same id follows nothing."""
    pipeline, second_ws = hybrid
    s = pipeline.settings
    tid = f"big-{uuid.uuid4().hex[:8]}"
    creds = Credentials.generate()
    CassandraTenants(cassandra, s.cassandra_keyspace).create(tid, creds)
    header = [("feed.tenant", tid.encode())]
    star, online = ids("star"), ids("online")
    for fan in (online, ids("f2"), ids("f3")):
        event = {"type": "follow", "follower": fan, "followee": star}
        pipeline.producer.produce(
            s.topic_follows,
            key=fan.encode(),
            value=json.dumps({**event, "at": datetime.now(UTC).isoformat()}).encode(),
            headers=header,
        )
    pipeline.producer.flush(10)
    k = Keyspace.for_tenant(tid)
    wait_for(
        lambda: versions.changes(redis_client.get(k.graph_version(star))) == 3,
        timeout=30,
        message="follows applied",
    )

    def post(aid: str) -> None:
        value = pipeline.activity(aid, star)
        pipeline.producer.produce(
            s.topic_activities, key=star.encode(), value=value, headers=header
        )
        assert pipeline.producer.flush(10) == 0

    post(ids("first"))
    wait_for(lambda: redis_client.sismember(k.big_accounts, star), timeout=30, message="star big")
    assert not redis_client.sismember("big-accounts", star)  # not the default tenant's
    token = mint_token(creds.jwt_secret, online, 600, tenant=tid)
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        websockets.connect(pipeline.ws_url, additional_headers=headers) as ws1,
        websockets.connect(second_ws, additional_headers=headers) as ws2,
    ):
        assert (await next_frame(ws1, 5))["type"] == (await next_frame(ws2, 5))["type"]
        wait_for(
            lambda: k.actor_channel(star) in _channels(redis_client),
            timeout=10,
            message="the tenant's actor channel subscribed",
        )
        assert f"ac:{{{star}}}" not in _channels(redis_client)
        live = ids("live")
        post(live)
        f1 = await frames_until(ws1, lambda f: f.get("type") == "activity", timeout=10)
        f2 = await frames_until(ws2, lambda f: f.get("type") == "activity", timeout=10)
        assert f1[-1]["activity"]["id"] == f2[-1]["activity"]["id"] == live
        assert f1[-1]["cursor"] == f2[-1]["cursor"]  # one delivery, both sockets
