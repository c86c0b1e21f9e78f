"""End to end: Kafka -> `feed fanout` -> Redis + Cassandra -> `feed gateway` -> WebSocket/HTTP.

The stack's real servers, a fan-out worker and a gateway run as separate processes, exactly as an
operator runs them. Events are produced straight to Kafka with confluent-kafka.
"""

from __future__ import annotations

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
from tests.support.pipeline import Pipeline, frames_until, log_events, next_frame, shared_env
from tests.support.procs import http_get, metric_value

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["one-redis", "redis-cluster"])
def pipeline(
    request: pytest.FixtureRequest,
    stack_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pipeline]:
    """The worker and the gateway on the session's Redis, then on a Redis Cluster of 3 masters
    (``FEED_REDIS_CLUSTER`` left at ``auto``: both processes ask)."""
    extra = {}
    if request.param == "redis-cluster":
        extra["FEED_REDIS_URL"] = request.getfixturevalue("redis_cluster").url
    env = shared_env(stack_env, "e2e", **extra)
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
        dlq_before = pipeline.worker_metric("feed_dlq_total")
        origin: list[tuple[int, int]] = []  # where the broker stored the bad record

        def delivered(error: Any, message: Any) -> None:
            assert error is None, error
            origin.append((message.partition(), message.offset()))

        pipeline.producer.produce(
            s.topic_activities, key=u1.encode(), value=bad, on_delivery=delivered
        )
        assert pipeline.producer.flush(10) == 0 and len(origin) == 1
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
    assert (int(headers["feed.origin.partition"]), int(headers["feed.origin.offset"])) == origin[0]
    # One record dead-lettered, counted once.
    wait_for(
        lambda: pipeline.worker_metric("feed_dlq_total") >= dlq_before + 1,
        timeout=10,
        message="the dead letter counted",
    )
    assert pipeline.worker_metric("feed_dlq_total") == dlq_before + 1
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
    statuses = [
        http_get(f"{pipeline.gateway_url}/v1/feed", headers={"Authorization": f"Bearer {bearer}"})[
            0
        ]
        for bearer in (token, forged)
    ]
    statuses.append(http_get(f"{pipeline.gateway_url}/v1/feed?token={token}")[0])
    # The JWT is accepted, the forged one is not; HTTP reads take the token only as a header.
    assert statuses == [200, 401, 401]
    ingest: dict[str, int] = {}
    for name, bearer in (
        ("valid", s.ingest_token.reveal()),
        ("wrong", "wrong-ingest-token-xxxxxxxx"),
    ):
        request = urllib.request.Request(
            f"{pipeline.gateway_url}/v1/activities",
            data=b"{}",
            method="POST",
            headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5).close()
        ingest[name] = refused.value.code
        refused.value.close()  # the error holds the response and its socket
    # The ingest token passes authentication (``{}`` then fails validation); the wrong one not.
    assert ingest == {"valid": 400, "wrong": 401}
    connections = len(log_events(pipeline.gateway.log, "ws_connection"))
    rejections = len(log_events(pipeline.gateway.log, "ws_rejected"))
    async with websockets.connect(f"{pipeline.ws_url}?token={token}") as ws:
        welcome = await next_frame(ws, 5)
        assert welcome["type"] == "welcome" and welcome["user"] == user, welcome
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with websockets.connect(f"{pipeline.ws_url}?token={forged}") as ws:
            await next_frame(ws, 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001, closed.value
    secrets = [
        s.jwt_secret.reveal(),
        s.ingest_token.reveal(),
        token,
        forged,
        token.split(".")[2],
        "wrong-ingest-token-xxxxxxxx",
    ]
    # The accepted connection's summary line is written when it ends (after the client's close):
    # the scan below reads the logs only once both connections are logged.
    wait_for(
        lambda: (
            len(log_events(pipeline.gateway.log, "ws_connection")) == connections + 1
            and len(log_events(pipeline.gateway.log, "ws_rejected")) == rejections + 1
        ),
        timeout=10,
        message="both WebSocket connections logged",
    )
    for proc in (pipeline.worker, pipeline.gateway):
        text = proc.log.read_text(errors="replace")
        assert text, f"{proc.command} wrote no log"
        for secret in secrets:
            assert secret not in text, f"a secret reached the {proc.command} log"


def _settled_worker_metrics(pipeline: Pipeline) -> str | None:
    """The worker's metrics once every record it consumed is in a finished batch (a batch's
    counters are updated after it is applied) and its offset committed (when the worker goes
    idle, FEED_COMMIT_INTERVAL_MS), else None."""
    status, body = http_get(f"{pipeline.metrics_url}/metrics")
    if status != 200:
        return None
    text = body.decode()
    consumed = metric_value(text, "feed_activities_consumed_total")
    committed = metric_value(text, 'feed_stage_latency_seconds_count{stage="committed"}')
    settled = metric_value(text, "feed_batch_size_sum") == consumed == committed
    return text if settled else None


def _gateway_metrics(pipeline: Pipeline) -> str:
    status, body = http_get(f"{pipeline.gateway_url}/metrics")
    assert status == 200
    return body.decode()


async def test_both_processes_export_their_metrics(
    pipeline: Pipeline, ids: Callable[[str], str]
) -> None:
    """Known traffic moves each counter by exactly its size: ``n`` activities by an actor with
    two followers, both active (they read or connect), one of them connected."""
    s = pipeline.settings
    n = 3
    actor, online, reader = ids("m-actor"), ids("m-online"), ids("m-reader")
    consumed_follows = f'feed_activities_consumed_total{{topic="{s.topic_follows}"}}'
    consumed_activities = f'feed_activities_consumed_total{{topic="{s.topic_activities}"}}'
    feed_ok = 'feed_gateway_http_requests_total{route="/v1/feed",status="200"}'
    pushed = "feed_gateway_messages_pushed_total"
    start = wait_for(
        lambda: _settled_worker_metrics(pipeline), timeout=20, message="the worker idle"
    )
    pipeline.follow(online, actor)
    pipeline.follow(reader, actor)
    assert pipeline.feed(reader) == []  # a read marks the reader active
    gateway_start = _gateway_metrics(pipeline)
    ws_url = pipeline.gateway_url.replace("http", "ws") + "/v1/stream"
    async with websockets.connect(
        ws_url, additional_headers={"Authorization": f"Bearer {pipeline.token(online)}"}
    ) as ws:
        assert (await next_frame(ws, 5))["type"] == "welcome"
        worker_before = wait_for(
            lambda: (
                (text := _settled_worker_metrics(pipeline)) is not None
                and metric_value(text, consumed_follows)
                == metric_value(start, consumed_follows) + 2
                and text
            ),
            timeout=20,
            message="both follows applied",
        )
        gateway_before = wait_for(
            lambda: (
                (text := _gateway_metrics(pipeline))
                and metric_value(text, pushed) == metric_value(gateway_start, pushed) + 1
                and text
            ),
            timeout=10,
            message="the welcome counted",
        )
        aids = [ids(f"m-a{i}") for i in range(n)]
        produced_ms = []
        for aid in aids:
            produced_ms.append(time.time() * 1000)
            pipeline.produce(s.topic_activities, actor, pipeline.activity(aid, actor))
        frames = await frames_until(
            ws, lambda f: f.get("activity", {}).get("id") == aids[-1], timeout=10
        )
        received_ms = time.time() * 1000
        assert [f["activity"]["id"] for f in frames] == aids
        # Each frame carries when its activity entered the pipeline: its record's timestamp.
        for frame, produced in zip(frames, produced_ms, strict=True):
            assert isinstance(frame["ts"], int)
            assert produced - 1 <= frame["ts"] <= received_ms
        worker_after = wait_for(
            lambda: (
                (text := _settled_worker_metrics(pipeline)) is not None
                and metric_value(text, consumed_activities)
                == metric_value(worker_before, consumed_activities) + n
                and text
            ),
            timeout=20,
            message="the activities applied",
        )
    assert [a["id"] for a in pipeline.feed(online)] == aids[::-1]
    assert [a["id"] for a in pipeline.feed(reader)] == aids[::-1]
    gateway_after = wait_for(
        lambda: (
            (text := _gateway_metrics(pipeline))
            and metric_value(text, pushed) == metric_value(gateway_before, pushed) + n
            and text
        ),
        timeout=10,
        message="the frames counted",
    )

    def worker_delta(name: str) -> float:
        return metric_value(worker_after, name) - metric_value(worker_before, name)

    def gateway_delta(name: str) -> float:
        return metric_value(gateway_after, name) - metric_value(gateway_before, name)

    assert worker_delta(consumed_follows) == 0
    assert worker_delta("feed_batch_size_sum") == n
    batches = worker_delta("feed_batch_size_count")
    assert 1 <= batches <= n
    for name in (
        "feed_batch_seconds_count",
        'feed_store_call_seconds_count{store="redis"}',
        'feed_store_call_seconds_count{store="cassandra"}',
    ):
        assert worker_delta(name) == batches, name
    # Every follower is active: n entries in each Redis timeline and n history rows each.
    assert worker_delta("feed_timeline_inserts_total") == 2 * n
    assert worker_delta("feed_activities_fanned_out_total") == n
    assert worker_delta("feed_history_rows_total") == 2 * n
    assert worker_delta("feed_notifications_published_total") == n  # the one online follower
    assert worker_delta("feed_dlq_total") == 0 and worker_delta("feed_errors_total") == 0
    # One latency per write of queued frames (frames queued together are written at once).
    assert 1 <= gateway_delta("feed_gateway_push_latency_seconds_count") <= n
    assert gateway_delta(feed_ok) == 2
    assert gateway_delta("feed_gateway_slow_client_closes_total") == 0
    assert metric_value(gateway_after, "feed_gateway_connections") == 0
    # Stage latencies (feed.stages): each activity passed each stage once, in pipeline order,
    # and the one live delivery of each was measured from record to socket.
    stage_sums = []
    for stage in ("consumed", "durable", "published", "committed"):
        labels = f'{{stage="{stage}"}}'
        assert worker_delta(f"feed_stage_latency_seconds_count{labels}") == n, stage
        stage_sums.append(worker_delta(f"feed_stage_latency_seconds_sum{labels}"))
    assert 0 < stage_sums[0] <= stage_sums[1] <= stage_sums[2] <= stage_sums[3], stage_sums
    received = 'feed_stage_latency_seconds_count{stage="received"}'
    assert gateway_delta(received) == n
    assert gateway_delta("feed_delivery_latency_seconds_count") == n
    assert gateway_delta("feed_activities_delivered_total") == n
    delivered_s = gateway_delta("feed_delivery_latency_seconds_sum")
    # (a record's timestamp is in whole ms, so each latency may read up to 1 ms long)
    assert stage_sums[0] <= delivered_s <= n * (received_ms - min(produced_ms) + 1) / 1000
    # A resume replays frames of activities that entered the pipeline before the connection:
    # pushed, but not counted as deliveries (their wait was the client's absence).
    async with websockets.connect(
        ws_url, additional_headers={"Authorization": f"Bearer {pipeline.token(online)}"}
    ) as ws:
        assert (await next_frame(ws, 5))["type"] == "welcome"
        await ws.send(json.dumps({"type": "resume", "cursor": frames[0]["cursor"]}))
        replayed = await frames_until(
            ws, lambda f: f.get("activity", {}).get("id") == aids[-1], timeout=10
        )
        assert [f["activity"]["id"] for f in replayed] == aids[1:]
    replay_after = wait_for(
        lambda: (
            (text := _gateway_metrics(pipeline))
            and metric_value(text, pushed) == metric_value(gateway_after, pushed) + n
            and text
        ),
        timeout=10,
        message="the welcome and the replayed frames counted as pushed",
    )
    assert metric_value(replay_after, "feed_delivery_latency_seconds_count") == metric_value(
        gateway_after, "feed_delivery_latency_seconds_count"
    )
    replayed_delivered = metric_value(replay_after, "feed_activities_delivered_total")
    assert replayed_delivered == metric_value(gateway_after, "feed_activities_delivered_total") + (
        n - 1
    )
    for name in (
        'feed_dlq_total{reason="malformed_json"}',
        "feed_consumer_lag_sum",
        "feed_errors_total",
    ):
        assert name in worker_after, name
    # Process metrics in both processes, the event loop's lag in the gateway's.
    for text in (worker_after, gateway_after):
        assert metric_value(text, "process_resident_memory_bytes") > 0
        assert metric_value(text, "process_cpu_seconds_total") > 0
    assert metric_value(gateway_after, "feed_event_loop_lag_seconds_count") > 0
    ready = http_get(f"{pipeline.metrics_url}/readyz")
    assert ready[0] == 200 and json.loads(ready[1])["checks"] == {
        "redis": True,
        "cassandra": True,
        "kafka": True,
    }
    status, body = http_get(f"{pipeline.gateway_url}/readyz")
    assert status == 200, body


def test_dlq_command_lists_and_replays_once(pipeline: Pipeline) -> None:
    """Runs after the pipeline test in this module, which left a malformed record in the DLQ."""
    import os
    import subprocess
    import sys

    env = {**os.environ, **pipeline.env}

    def feed(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "feed.cli", "dlq", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=True,
        ).stdout

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
        lambda: (
            sum(
                1
                for line in feed("list", "--json").splitlines()
                if line and json.loads(line)["headers"].get("feed.error") == "malformed_json"
            )
            == 2 * before
        ),
        timeout=60,
        message="the replayed record dead-lettered again",
    )
    # The replay group's position was committed: only the new record is replayed, not the old.
    assert feed("replay", "--code", "malformed_json").startswith(f"replayed {before} ")
