"""``feed.kafka.AsyncProducer`` (the gateway's ingest path) against the real broker and a closed
port: every failure is :class:`KafkaUnavailable` (the gateway's 503), within the timeout."""

from __future__ import annotations

import time
import uuid

import pytest

from feed.kafka import AsyncProducer, KafkaUnavailable, producer_config
from feed.settings import Settings
from tests.support.procs import free_port


async def test_a_record_the_producer_refuses_is_reported_as_unavailable(
    settings: Settings,
) -> None:
    """A broker that does not create topics on demand (a common production setting; Tansu
    creates them unless the client asks it not to): once the topic is known to be missing,
    ``produce`` itself refuses the record."""
    producer = AsyncProducer(
        producer_config(
            settings,
            **{
                "allow.auto.create.topics": False,
                "topic.metadata.propagation.max.ms": 1000,
                "log_level": 0,
            },
        )
    )
    topic = f"missing-{uuid.uuid4().hex[:8]}"
    try:
        for _ in range(2):  # the first is refused by the broker, the second by the producer
            with pytest.raises(KafkaUnavailable):
                await producer.send_many(topic, [(b"k", b"v")], timeout=10)
    finally:
        producer.close(1)


async def test_a_full_local_queue_counts_against_the_timeout() -> None:
    closed = f"127.0.0.1:{free_port()}"
    producer = AsyncProducer(
        producer_config(
            Settings(kafka_bootstrap=closed), **{"queue.buffering.max.messages": 1, "log_level": 0}
        )
    )
    try:
        started = time.monotonic()
        with pytest.raises(KafkaUnavailable):
            await producer.send_many(
                "feed.activities", [(b"k", b"v%d" % n) for n in range(3)], timeout=1
            )
        assert time.monotonic() - started < 3
    finally:
        producer.close(0.5)
