"""A live gateway on the session stack, and reading back what it produced.

``live_gateway`` serves the real app (uvicorn on port 0, in a thread) for the session stack's
settings: its own Kafka producer to the real broker, the real Redis and Cassandra. It waits with
deadlines (start: 60 s; ``/readyz``: until every dependency is reachable) and on exit stops the
server and fails the test if it raised. ``read_activities`` reads a topic from the beginning up
to markers it produces now, so it sees every record produced before the call (the broker's
high watermark is not trusted, INFRA.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from feed.settings import Settings
from gateway.server import GatewayServer, build_server

__all__ = [
    "MARKER_PREFIX",
    "LiveGateway",
    "activity",
    "activity_json",
    "live_gateway",
    "read_activities",
    "read_records",
    "read_records_with_headers",
]

#: Key prefix of the marker records :func:`read_records` produces (never returned by it).
MARKER_PREFIX = "marker-"


@dataclasses.dataclass
class LiveGateway:
    server: GatewayServer
    thread: threading.Thread
    settings: Settings
    base: str = ""
    ws: str = ""
    port: int = 0
    errors: list[BaseException] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def live_gateway(
    settings: Settings, *, wait_ready: bool = True, **app_kwargs: Any
) -> Iterator[LiveGateway]:
    """Serve the gateway for ``settings`` (the stack's Redis, broker, Cassandra) on a free port.

    The app opens its own clients from the settings: a real Kafka producer, Redis, Cassandra.
    With ``wait_ready``, until ``/readyz`` says every dependency is reachable; without, as soon as
    it listens.
    """
    settings = dataclasses.replace(
        settings, gateway_host="127.0.0.1", gateway_port=0, drain_s=3.0, allowed_origins=()
    )
    server = build_server(settings, **app_kwargs)
    live = LiveGateway(server, threading.Thread(), settings)

    def serve() -> None:
        try:
            server.run()
        except BaseException as exc:  # surfaced below
            live.errors.append(exc)

    live.thread = threading.Thread(target=serve, name="live-gateway", daemon=True)
    live.thread.start()
    deadline = time.monotonic() + 60
    while not (server.started and server.port):
        if live.errors or not live.thread.is_alive() or time.monotonic() > deadline:
            pytest.fail(f"gateway did not start: {live.errors}")
        time.sleep(0.01)
    live.port = server.port
    live.base = f"http://127.0.0.1:{server.port}"
    live.ws = f"ws://127.0.0.1:{server.port}/v1/stream"
    try:
        if wait_ready:
            _wait_ready(live, deadline)
        yield live
    finally:
        server.should_exit = True
        live.thread.join(20)
        assert not live.thread.is_alive(), "gateway did not stop"
    assert not live.errors, live.errors


def _wait_ready(live: LiveGateway, deadline: float) -> None:
    """Until ``/readyz`` says every dependency is reachable (Cassandra connects in the
    background: before that, pages stop at the hot tier)."""
    body = ""
    while time.monotonic() < deadline:
        response = httpx.get(f"{live.base}/readyz", timeout=5)
        if response.status_code == 200:
            return
        body = response.text
        time.sleep(0.1)
    pytest.fail(f"gateway not ready: {body}")


def read_records(settings: Settings, topic: str | None = None) -> list[tuple[bytes, bytes]]:
    """Every ``(key, value)`` record in ``topic`` (default: the activities topic), read from the
    beginning with a fresh consumer group up to a marker produced to each partition now, in
    offset order per partition. Markers (keys starting with ``MARKER_PREFIX``, of this read or an
    earlier one) are left out."""
    return [(key, value) for key, value, _ in read_records_with_headers(settings, topic)]


def read_records_with_headers(
    settings: Settings, topic: str | None = None
) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """:func:`read_records`, with each record's headers."""
    topic = topic or settings.topic_activities
    marker_actor = f"{MARKER_PREFIX}{uuid.uuid4().hex[:12]}"
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    partitions = sorted(producer.list_topics(topic, timeout=10).topics[topic].partitions)
    for partition in partitions:
        value = activity_json(f"{marker_actor}-p{partition}", marker_actor)
        producer.produce(topic, key=marker_actor.encode(), value=value, partition=partition)
    assert producer.flush(15) == 0, "markers were not delivered"
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"hostile-check-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []
    pending = set(partitions)
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + 60
        while pending:
            if time.monotonic() > deadline:
                pytest.fail(f"markers of partitions {sorted(pending)} never arrived")
            for message in consumer.consume(500, timeout=0.5):
                if message.error():
                    continue
                key, value = message.key() or b"", message.value() or b""
                if key == marker_actor.encode():
                    pending.discard(message.partition())
                elif not key.startswith(MARKER_PREFIX.encode()):
                    records.append((key, value, list(message.headers() or [])))
    finally:
        consumer.close()
    return records


def read_activities(settings: Settings, topic: str | None = None) -> Counter[str]:
    """Every activity id in ``topic`` (default: the activities topic), counted (records read as
    by :func:`read_records`; values that are not activities are left out)."""
    counts: Counter[str] = Counter()
    for _key, value in read_records(settings, topic):
        try:
            activity_id = json.loads(value)["id"]
        except (ValueError, KeyError, TypeError):
            continue
        counts[activity_id] += 1
    return counts


def activity(activity_id: str, actor: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": activity_id,
        "type": "Create",
        "actor": actor,
        "object": f"post:{activity_id}",
        "published": datetime.now(UTC).isoformat(),
        **extra,
    }


def activity_json(activity_id: str, actor: str, **extra: Any) -> bytes:
    return json.dumps(activity(activity_id, actor, **extra)).encode()
