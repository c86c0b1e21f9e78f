"""Fair fan-out, end to end (``docs/tenants.md``, "Fair fan-out"): one tenant floods its fan-out
far past its rate while another sends at a steady pace. The calm tenant's delivery latency stays
near what it is alone, and the flood is delayed, never dropped: every one of its activities
reaches its follower, at no more than its rate (plus its burst), none in the DLQ.

A real ``feed fanout`` and ``feed gateway`` on the session's Redis, broker and Cassandra; the
latency of a delivery is the frame's ``ts`` (the record's Kafka timestamp) to its arrival at the
test's WebSocket client, on the same clock. The figures are printed (``[fairness]``) for the
notes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import websockets

from feed.graph_cassandra import CassandraFollowGraph
from feed.kafka import create_topics
from feed.tenants import Credentials, Quotas
from feed.tenants_cassandra import CassandraTenants
from gateway.auth import mint_token
from tests.conftest import wait_for
from tests.support.pipeline import Pipeline, isolated_env, next_frame

pytestmark = pytest.mark.e2e

#: The flooding tenant's fan-out rate and burst, and how much it sends at once.
RATE, BURST, FLOOD = 100.0, 100, 1500
#: The calm tenant's pace: one activity every PACE_S, COUNT of them (alone, then beside the flood).
PACE_S, COUNT = 0.05, 60
#: How much the flood may add to the calm tenant's p99: the spill of the flood's records that
#: share its batches (a produce, no store write). Measured: see the printed figures.
BOUND_S = 0.5


@pytest.fixture(scope="module")
def pipeline(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    env = isolated_env(
        stack_env, "fair", FEED_TENANT_REFRESH_S="1", FEED_TENANT_FANOUT_BURST=str(BURST)
    )
    p = Pipeline(env, tmp_path_factory.mktemp("fair"))
    create_topics(p.settings)
    with p.running():
        yield p


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def _latencies(ws: Any, count: int, timeout: float) -> list[float]:
    """Seconds from each activity frame's ``ts`` to its arrival, for ``count`` frames."""
    out: list[float] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        frame = await next_frame(ws, max(0.1, deadline - time.monotonic()))
        if frame.get("type") == "activity":
            assert "ts" in frame, frame
            out.append(time.time() - frame["ts"] / 1000)
    return out


async def _pace(p: Pipeline, tenant: str, actor: str, tag: str) -> None:
    """COUNT activities of the calm tenant, one every PACE_S (bounded: COUNT of them)."""
    topic = p.settings.topic_activities
    for n in range(COUNT):
        p.producer.produce(
            topic,
            key=actor.encode(),
            value=p.activity(f"{tag}-{n}", actor),
            headers=[("feed.tenant", tenant.encode())],
        )
        p.producer.poll(0)
        await asyncio.sleep(PACE_S)  # the pace itself, not a wait for a condition
    p.producer.flush(10)


async def test_a_flooding_tenant_is_delayed_and_another_is_not(
    pipeline: Pipeline, cassandra: Any, ids: Callable[[str], str]
) -> None:
    p, s = pipeline, pipeline.settings
    registry = CassandraTenants(cassandra, s.cassandra_keyspace)
    tag = uuid.uuid4().hex[:6]
    flood, calm = f"flood-{tag}", f"calm-{tag}"
    flood_creds = Credentials.generate()
    calm_creds = Credentials.generate()
    registry.create(flood, flood_creds, Quotas(fanout_rate=RATE))
    registry.create(calm, calm_creds)
    fan, author = ids("fan"), ids("author")
    graph = CassandraFollowGraph(cassandra, s.cassandra_keyspace)
    for tenant in (flood, calm):
        event = {"type": "follow", "follower": fan, "followee": author}
        p.producer.produce(
            s.topic_follows,
            key=fan.encode(),
            value=json.dumps({**event, "at": datetime.now(UTC).isoformat()}).encode(),
            headers=[("feed.tenant", tenant.encode())],
        )
    assert p.producer.flush(10) == 0
    for tenant in (flood, calm):
        view = graph.for_tenant(tenant)
        wait_for(lambda v=view: v.is_following(fan, author), timeout=30, message="follows")

    def connect(tenant: str, secret: str) -> Any:
        token = mint_token(secret, fan, 600, tenant=tenant)
        return websockets.connect(p.ws_url, additional_headers={"Authorization": f"Bearer {token}"})

    async with connect(calm, calm_creds.jwt_secret) as calm_ws:
        assert (await next_frame(calm_ws, 10))["type"] == "welcome"
        # warm (the first records meet cold connections and caches), then alone
        for n in range(5):
            p.producer.produce(
                s.topic_activities,
                key=author.encode(),
                value=p.activity(f"warm-{tag}-{n}", author),
                headers=[("feed.tenant", calm.encode())],
            )
        assert p.producer.flush(10) == 0
        await _latencies(calm_ws, 5, timeout=30)
        sender = asyncio.create_task(_pace(p, calm, author, f"alone-{tag}"))
        alone = await _latencies(calm_ws, COUNT, timeout=60)
        await sender
        async with connect(flood, flood_creds.jwt_secret) as flood_ws:
            assert (await next_frame(flood_ws, 10))["type"] == "welcome"
            # the flood, all at once, then the calm tenant's pace beside it
            started = time.monotonic()
            for n in range(FLOOD):
                p.producer.produce(
                    s.topic_activities,
                    key=author.encode(),
                    value=p.activity(f"flood-{tag}-{n}", author),
                    headers=[("feed.tenant", flood.encode())],
                )
                if n % 500 == 0:
                    p.producer.poll(0)
            assert p.producer.flush(30) == 0
            sender = asyncio.create_task(_pace(p, calm, author, f"beside-{tag}"))
            beside = await _latencies(calm_ws, COUNT, timeout=60)
            await sender
            flood_frames = await _latencies(flood_ws, FLOOD, timeout=FLOOD / RATE * 3 + 30)
            flood_s = time.monotonic() - started

    figures = {
        "calm_alone_p50_ms": round(sorted(alone)[len(alone) // 2] * 1000, 1),
        "calm_alone_p99_ms": round(_p99(alone) * 1000, 1),
        "calm_beside_flood_p50_ms": round(sorted(beside)[len(beside) // 2] * 1000, 1),
        "calm_beside_flood_p99_ms": round(_p99(beside) * 1000, 1),
        "flood_records": FLOOD,
        "flood_all_delivered_s": round(flood_s, 2),
        "flood_rate_per_s": round(FLOOD / flood_s, 1),
        "flood_max_wait_s": round(max(flood_frames), 2),
        "fanout_rate": RATE,
        "fanout_burst": BURST,
    }
    print(f"\n[fairness] {figures}")
    assert _p99(beside) <= _p99(alone) + BOUND_S, figures
    # delayed, not dropped: all of it, at no more than its rate (plus the burst)
    assert len(flood_frames) == FLOOD
    assert flood_s >= (FLOOD - BURST) / (RATE * 1.1), figures
    assert p.worker_metric("feed_dlq_total") == 0
