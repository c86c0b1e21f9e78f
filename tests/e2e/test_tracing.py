"""One activity's trace, end to end: a real ``feed gateway`` (exporting over OTLP/gRPC) and a real
``feed fanout`` (OTLP/HTTP) export to the test's OTLP receiver (``tests.support.otlp``), on the test
session's Kafka, Redis and Cassandra.

An activity posted over HTTP with a ``traceparent`` to a user who is connected yields, in the
caller's trace: the gateway's ingest span (the child of that ``traceparent``), its Kafka send span,
the worker's record span, the batch span with the store writes under it, and the gateway's push
span, each the child of the one before; the frame carries the record span's ``traceparent``.
Records that a producer wrote with their own ``traceparent`` headers are traced as their children,
and a batch that carries several traces links to them; a record whose parent is not sampled is not
traced. Reads and WebSocket sessions have spans, and log lines written inside a span carry its ids.
"""

from __future__ import annotations

import json
import secrets
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from feed.kafka import create_topics
from tests.conftest import wait_for
from tests.support.otlp import OtlpReceiver, ReceivedSpan, otlp_receiver
from tests.support.pipeline import Pipeline, frames_until, isolated_env, log_events, resumed_stream
from tests.support.procs import FeedProcess, http_get

pytestmark = pytest.mark.e2e

#: Records written straight to Kafka with traceparent headers before the worker starts, so that
#: its first batches carry several traces.
_PRODUCED = 12


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as r:
        yield r


def _traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


@pytest.fixture(scope="module")
def traced(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver
) -> Iterator[tuple[Pipeline, list[str], str]]:
    """The pipeline, and the trace ids of the records produced before it started: the sampled
    ones, and one whose parent is not sampled."""
    env = isolated_env(
        stack_env,
        "trace",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.http_endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_BSP_SCHEDULE_DELAY="100",
        FEED_LOG_FORMAT="json",
    )
    logs = tmp_path_factory.mktemp("tracing")
    p = Pipeline(env, logs)
    p.gateway = FeedProcess(
        ["gateway"],
        {
            **env,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        },
        logs / "gateway.log",
    )
    create_topics(p.settings)
    sampled = []
    for n in range(_PRODUCED):
        parent, trace_id, _ = _traceparent()
        sampled.append(trace_id)
        p.producer.produce(
            p.settings.topic_activities,
            key=b"producer",
            value=p.activity(f"pre-{n}-{trace_id[:8]}", "producer"),
            headers=[("traceparent", parent.encode())],
        )
    parent, unsampled, _ = _traceparent(sampled=False)
    p.producer.produce(
        p.settings.topic_activities,
        key=b"producer",
        value=p.activity(f"pre-unsampled-{unsampled[:8]}", "producer"),
        headers=[("traceparent", parent.encode())],
    )
    assert p.producer.flush(10) == 0
    with p.running():
        # Applied before the tests post anything: a posted activity then has a batch of its own.
        wait_for(
            lambda: p.worker_metric("feed_batch_size_sum") >= _PRODUCED + 1,
            timeout=60,
            message="the produced records applied",
        )
        yield p, sampled, unsampled


def _one(spans: list[ReceivedSpan], **match: Any) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def _post(pipeline: Pipeline, body: dict[str, Any], traceparent: str) -> int:
    token = pipeline.settings.ingest_token
    assert token is not None
    request = urllib.request.Request(
        f"{pipeline.gateway_url}/v1/activities",
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "Authorization": f"Bearer {token.reveal()}",
            "Content-Type": "application/json",
            "traceparent": traceparent,
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


async def test_an_activity_posted_with_a_traceparent_is_one_trace_from_ingest_to_push(
    traced: tuple[Pipeline, list[str], str], receiver: OtlpReceiver
) -> None:
    pipeline, _, _ = traced
    user = f"traced-{secrets.token_hex(4)}"
    parent, trace_id, caller_span = _traceparent()
    activity = json.loads(pipeline.activity(f"t-{trace_id[:12]}", "author", to=[user]))
    async with resumed_stream(pipeline.ws_url, pipeline.token(user)) as (ws, _):
        assert _post(pipeline, activity, parent) == 202
        frames = await frames_until(ws, lambda f: f["type"] == "activity", timeout=20)
    frame = frames[-1]
    assert frame["activity"]["id"] == activity["id"]
    status, _ = http_get(
        f"{pipeline.gateway_url}/v1/feed",
        headers={"Authorization": f"Bearer {pipeline.token(user)}"},
    )
    assert status == 200

    def complete(spans: list[ReceivedSpan]) -> bool:
        names = {(s.service, s.name) for s in spans if s.trace_id == trace_id}
        # Every span asserted below, the read's included: each is exported when it ends, the
        # read's and the session's after their responses, so none can be taken as already there.
        expected = {
            ("feed-gateway", "POST /v1/activities"),
            ("feed-fanout", "fanout batch"),
            ("feed-gateway", "push"),
        }
        return (
            expected <= names
            and any(s.name == "ws session" and s.attributes.get("feed.user") == user for s in spans)
            and any(s.name == "GET /v1/feed" and s.kind == "SERVER" for s in spans)
        )

    spans = receiver.wait_for(complete, timeout=30, message="the activity's spans")
    print(receiver.render(trace_id))  # shown with -s, or when an assertion below fails
    mine = [s for s in spans if s.trace_id == trace_id]
    ingest = _one(mine, name="POST /v1/activities")
    assert (ingest.service, ingest.kind, ingest.parent_span_id) == (
        "feed-gateway",
        "SERVER",
        caller_span,
    )
    assert ingest.protocol == "grpc"  # the gateway's OTEL_EXPORTER_OTLP_PROTOCOL
    send = _one(mine, parent_span_id=ingest.span_id, kind="PRODUCER")
    record = _one(mine, service="feed-fanout", kind="CONSUMER")
    assert record.parent_span_id == send.span_id
    assert record.name == f"{pipeline.settings.topic_activities} process"
    assert record.protocol == "http"
    batch = _one(mine, name="fanout batch")
    assert batch.parent_span_id == record.span_id
    steps = {s.name for s in mine if s.parent_span_id == batch.span_id}
    assert {
        "redis claim",
        "cassandra read activities",
        "cassandra write activities",
        "followers read",
        "redis write and publish",
    } <= steps, steps
    push = _one(mine, name="push")
    assert (push.service, push.parent_span_id) == ("feed-gateway", record.span_id)
    assert push.attributes["feed.user"] == user
    # The frame's optional field names the record span: the push span's parent.
    assert frame["traceparent"] == f"00-{trace_id}-{record.span_id}-01"
    # Each span starts no earlier than its parent (same host clock).
    for child, parent_span in ((send, ingest), (record, send), (batch, record), (push, record)):
        assert child.start_ns >= parent_span.start_ns, (child.name, parent_span.name)
    # Reads and sessions are traced too.
    sessions = [s for s in spans if s.name == "ws session" and s.attributes["feed.user"] == user]
    assert len(sessions) == 1 and sessions[0].service == "feed-gateway"
    assert sessions[0].attributes["pushed"] >= 1
    assert any(s.name == "GET /v1/feed" and s.kind == "SERVER" for s in spans)
    # The delivery latency keeps the push as its bucket's exemplar, for a scraper that reads
    # OpenMetrics (a dashboard's link from the latency panel to the trace).
    scrape = urllib.request.Request(
        f"{pipeline.gateway_url}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"},
    )
    with urllib.request.urlopen(scrape, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        exposition = response.read().decode()
    assert any(
        line.startswith("feed_delivery_latency_seconds_bucket")
        and f'trace_id="{trace_id}"' in line
        and f'span_id="{push.span_id}"' in line
        for line in exposition.splitlines()
    ), "no exemplar of the trace on the delivery latency"
    # Log lines written inside a span carry its ids.
    applied = [
        e for e in log_events(pipeline.worker.log, "batch_applied") if e.get("trace_id") == trace_id
    ]
    assert applied and applied[0]["span_id"] == batch.span_id
    requests = log_events(pipeline.gateway.log, "http_request")
    assert any(
        e.get("trace_id") == trace_id and e.get("span_id") == ingest.span_id for e in requests
    )


def test_records_produced_with_traceparents_are_traced_and_a_batch_links_their_traces(
    traced: tuple[Pipeline, list[str], str], receiver: OtlpReceiver
) -> None:
    _, sampled, unsampled = traced
    wanted = set(sampled)

    def complete(spans: list[ReceivedSpan]) -> bool:
        batched = {s.trace_id for s in spans if s.name == "fanout batch"}
        linked = {t for s in spans if s.name == "fanout batch" for t, _ in s.links}
        return wanted <= batched | linked

    spans = receiver.wait_for(complete, timeout=30, message="the produced records' spans")
    batches = {s.span_id: s for s in spans if s.name == "fanout batch"}
    for trace_id in sampled:
        record = _one(spans, trace_id=trace_id, kind="CONSUMER")
        assert record.parent_span_id  # the producer's span (from its header), not a new root
        own = [b for b in batches.values() if b.parent_span_id == record.span_id]
        if own:
            continue
        # Not its batch's parent: the record's span links to the batch, which links back.
        targets = [batches[span_id] for _, span_id in record.links if span_id in batches]
        assert targets, record
        assert (record.trace_id, record.span_id) in targets[0].links
    assert any(batch.links for batch in batches.values()), "no batch carried several traces"
    # A record whose parent is not sampled is not traced (the default parent-based sampler).
    assert not [s for s in spans if s.trace_id == unsampled]
