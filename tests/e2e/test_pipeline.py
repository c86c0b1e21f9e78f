"""End to end: Kafka -> `feed fanout` -> Redis + Cassandra -> `feed gateway` -> WebSocket/HTTP.

The stack's real servers, a fan-out worker and a gateway run as separate processes, exactly as an
operator runs them. Events are produced straight to Kafka with confluent-kafka.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import websockets
from confluent_kafka import Consumer

from feed.settings import Settings
from tests.conftest import wait_for
from tests.e2e.harness import Pipeline, frames_until, next_frame
from tests.procs import free_port, http_get, metric_value

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pipeline(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    env = dict(
        stack_env,
        FEED_KAFKA_GROUP=f"e2e-{uuid.uuid4().hex[:8]}",
        FEED_WORKER_METRICS_PORT=str(free_port()),
        FEED_GATEWAY_PORT=str(free_port()),
    )
    with Pipeline(env, tmp_path_factory.mktemp("e2e")).running() as p:
        yield p


def _has_history_row(pipeline: Pipeline, cassandra: Any, user: str, aid: str) -> bool:
    ks = pipeline.settings.cassandra_keyspace
    rows = cassandra.execute(f"SELECT id FROM {ks}.timeline WHERE user_id = %s", (user,))
    return aid in [row.id for row in rows]


async def test_publish_reaches_followers_socket_feed_and_history(
    pipeline: Pipeline, cassandra: Any, ids: Callable[[str], str]
) -> None:
    u1, u2, u3, u4 = (ids(n) for n in ("u1", "u2", "u3", "u4"))
    s = pipeline.settings
    pipeline.follow(u2, u1)
    pipeline.follow(u3, u1)
    ks = s.cassandra_keyspace
    wait_for(
        lambda: (
            len(
                list(
                    cassandra.execute(
                        f"SELECT follower FROM {ks}.followers WHERE user_id = %s", (u1,)
                    )
                )
            )
            == 2
        ),
        timeout=30,
        message="follows applied",
    )
    ws_url = pipeline.gateway_url.replace("http", "ws") + "/v1/stream"
    async with websockets.connect(
        ws_url, additional_headers={"Authorization": f"Bearer {pipeline.token(u2)}"}
    ) as ws:
        welcome = await next_frame(ws, 5)
        assert welcome["type"] == "welcome" and welcome["user"] == u2

        # 1. An activity by u1 reaches u2's socket within 5 s.
        a1 = ids("a1")
        event = pipeline.activity(a1, u1)
        sent = time.monotonic()
        pipeline.produce(s.topic_activities, u1, event)
        frames = await frames_until(ws, lambda f: f.get("type") == "activity", timeout=5)
        assert frames[-1]["activity"]["id"] == a1
        assert time.monotonic() - sent < 5

        # 2. The HTTP feed shows it for u2 and u3 and not for u4.
        assert [a["id"] for a in pipeline.feed(u2)] == [a1]
        assert [a["id"] for a in pipeline.feed(u3)] == [a1]
        assert pipeline.feed(u4) == []

        # 3. Durable history rows exist for u2 and u3.
        wait_for(
            lambda: (
                _has_history_row(pipeline, cassandra, u2, a1)
                and _has_history_row(pipeline, cassandra, u3, a1)
            ),
            timeout=10,
            message="history rows",
        )

        # 4. The same event again changes nothing: no second frame, no second entry.
        pipeline.produce(s.topic_activities, u1, event)
        marker = ids("marker")
        pipeline.produce(s.topic_activities, u1, pipeline.activity(marker, u1))
        frames = await frames_until(
            ws, lambda f: f.get("activity", {}).get("id") == marker, timeout=10
        )
        assert [f["activity"]["id"] for f in frames if f["type"] == "activity"] == [marker]
        assert [a["id"] for a in pipeline.feed(u2)] == [marker, a1]
        assert [a["id"] for a in pipeline.feed(u3)] == [marker, a1]

        # 5. A malformed event lands in the DLQ and the next good event still arrives.
        bad = b'{"id": "' + ids("bad").encode() + b'", "type": "Create"'
        pipeline.produce(s.topic_activities, u1, bad)
        after = ids("after")
        pipeline.produce(s.topic_activities, u1, pipeline.activity(after, u1))
        frames = await frames_until(
            ws, lambda f: f.get("activity", {}).get("id") == after, timeout=10
        )
        assert [f["activity"]["id"] for f in frames if f["type"] == "activity"] == [after]

    dead = _find_dlq_record(s, bad, timeout=20)
    headers = dict(dead.headers())
    assert headers["feed.error"] == b"malformed_json"
    assert headers["feed.origin.topic"] == s.topic_activities.encode()
    assert int(headers["feed.origin.offset"]) >= 0
    assert pipeline.worker.alive()


def _find_dlq_record(settings: Settings, value: bytes, timeout: float) -> Any:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"dlq-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
        }
    )
    consumer.subscribe([settings.topic_dlq])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and not message.error() and message.value() == value:
                return message
        pytest.fail("malformed record not found in the DLQ")
    finally:
        consumer.close()


async def test_no_secret_ever_reaches_the_logs(
    pipeline: Pipeline, ids: Callable[[str], str]
) -> None:
    """Use every secret the processes know, accepted and rejected, then read their logs."""
    s = pipeline.settings
    assert s.jwt_secret is not None and s.ingest_token is not None
    user = ids("u")
    token = pipeline.token(user)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for bearer in (token, forged):
        http_get(f"{pipeline.gateway_url}/v1/feed", headers={"Authorization": f"Bearer {bearer}"})
    http_get(f"{pipeline.gateway_url}/v1/feed?token={token}")
    for bearer in (s.ingest_token.reveal(), "wrong-ingest-token-xxxxxxxx"):
        request = urllib.request.Request(
            f"{pipeline.gateway_url}/v1/activities", data=b"{}", method="POST",
            headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except urllib.error.HTTPError as exc:
            assert exc.code in (400, 401)
    for query in (token, forged):
        try:
            async with websockets.connect(f"{pipeline.ws_url}?token={query}") as ws:
                await next_frame(ws, 5)
        except (websockets.ConnectionClosed, TimeoutError):
            pass
    secrets = [s.jwt_secret.reveal(), s.ingest_token.reveal(), token, forged,
               token.split(".")[2], "wrong-ingest-token-xxxxxxxx"]
    deadline = time.monotonic() + 2  # let the processes flush their summary lines
    while time.monotonic() < deadline and "ws_connection" not in pipeline.gateway.log.read_text():
        await asyncio.sleep(0.05)
    for proc in (pipeline.worker, pipeline.gateway):
        text = proc.log.read_text(errors="replace")
        assert text, f"{proc.command} wrote no log"
        for secret in secrets:
            assert secret not in text, f"a secret reached the {proc.command} log"


def test_both_processes_export_their_metrics(pipeline: Pipeline) -> None:
    """Runs after the pipeline test in this module: the counters reflect that traffic."""
    status, body = http_get(f"{pipeline.metrics_url}/metrics")
    assert status == 200
    worker = body.decode()
    for name in ("feed_activities_consumed_total", "feed_timeline_inserts_total",
                 "feed_history_rows_total", "feed_batch_size_count", "feed_batch_seconds_count"):
        assert metric_value(worker, name) > 0, name
    assert 'feed_store_call_seconds_count{store="redis"}' in worker
    assert 'feed_store_call_seconds_count{store="cassandra"}' in worker
    assert 'feed_dlq_total{reason="malformed_json"}' in worker
    assert "feed_consumer_lag_sum" in worker and "feed_errors_total" in worker
    status, body = http_get(f"{pipeline.gateway_url}/metrics")
    assert status == 200
    gateway = body.decode()
    assert metric_value(gateway, "feed_gateway_messages_pushed_total") > 0
    for name in ("feed_gateway_connections", "feed_gateway_push_latency_seconds_count",
                 "feed_gateway_slow_client_closes_total", "feed_gateway_http_requests_total"):
        assert name in gateway, name
    ready = http_get(f"{pipeline.metrics_url}/readyz")
    assert ready[0] == 200 and json.loads(ready[1])["checks"] == {
        "redis": True, "cassandra": True, "kafka": True}
    status, body = http_get(f"{pipeline.gateway_url}/readyz")
    assert status == 200, body


def test_dlq_command_lists_and_replays_once(pipeline: Pipeline) -> None:
    """Runs after the pipeline test in this module, which left a malformed record in the DLQ."""
    import os
    import subprocess
    import sys

    env = {**os.environ, **pipeline.env}

    def feed(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "feed.cli", "dlq", *args], env=env,
                              capture_output=True, text=True, timeout=90, check=True).stdout

    records = [json.loads(line) for line in feed("list", "--json").splitlines() if line]
    malformed = [r for r in records if r["headers"].get("feed.error") == "malformed_json"]
    assert malformed, records
    headers = malformed[0]["headers"]
    assert headers["feed.origin.topic"] == pipeline.settings.topic_activities
    assert int(headers["feed.attempts"]) >= 1 and headers["feed.failed.at"]
    before = len(malformed)
    first = feed("replay", "--code", "malformed_json")
    assert first.startswith(f"replayed {before} "), first
    # The replayed bytes are still malformed: the worker dead-letters them again (a new record).
    wait_for(
        lambda: sum(
            1 for line in feed("list", "--json").splitlines()
            if line and json.loads(line)["headers"].get("feed.error") == "malformed_json"
        ) == 2 * before,
        timeout=60, message="the replayed record dead-lettered again",
    )
    # The replay group's position was committed: only the new record is replayed, not the old.
    assert feed("replay", "--code", "malformed_json").startswith(f"replayed {before} ")
