"""Kafka plumbing: topic creation, consumer/producer configuration, an asyncio-friendly producer.

Guarantees: producers use ``acks=all`` with idempotence, so a produce that reports success is
durable in the broker; the fan-out group commits offsets only after applying records (see
``fanout.worker``). A group with no committed offsets starts from the earliest record.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # where confluent_kafka.admin imports it from

from feed import tracing
from feed.settings import Settings
from schemas.errors import FeedError

__all__ = [
    "AsyncProducer",
    "KafkaUnavailable",
    "consumer_config",
    "create_topics",
    "is_unreachable",
    "producer_config",
    "quiet",
]


class KafkaUnavailable(FeedError, RuntimeError):
    """The broker did not answer, or did not accept a record, in time. The message is one line
    that names the broker (``bootstrap.servers``: no credentials)."""


#: Error codes that mean "the broker did not answer" rather than "the broker said no".
_UNREACHABLE = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
        KafkaError._TIMED_OUT_QUEUE,
        KafkaError._MSG_TIMED_OUT,
        KafkaError._RESOLVE,
        KafkaError._WAIT_COORD,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.NETWORK_EXCEPTION,
    }
)


def is_unreachable(exc: KafkaException) -> bool:
    """Whether ``exc`` says that Kafka did not answer (in time)."""
    error = exc.args[0] if exc.args else None
    return not isinstance(error, KafkaError) or error.code() in _UNREACHABLE


def quiet(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` for a client of a one-shot command: librdkafka logs nothing of its own (its
    errors reach the caller as exceptions and timeouts, reported as one line)."""
    return {**config, "log_level": 0}


def producer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 2,
        "compression.type": "none",
        "message.timeout.ms": 30_000,
        # A produce request larger than one segment would otherwise wait for a delayed ACK.
        "socket.nagle.disable": True,
    }
    config.update(extra)
    return config


def consumer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": settings.kafka_group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": settings.kafka_heartbeat_ms,
        "partition.assignment.strategy": "cooperative-sticky",
        "socket.nagle.disable": True,
        # How long the broker may hold an empty fetch. Brokers that do not answer a held fetch
        # when data arrives (the local test broker, INFRA.md) add up to this to every record's
        # latency at low rates: 10 ms measured p50 3 ms publish->consume there, against 10 ms
        # at 50 ms. Kafka itself answers as soon as data arrives, so this only sets idle polling.
        "fetch.wait.max.ms": 10,
        # A record the broker accepted must be fetchable, whatever its size: a fetch response
        # over this limit (default 100 MB) is dropped and asked for again forever, stalling
        # every partition fetched over that connection. librdkafka's maximum.
        "receive.message.max.bytes": 2_147_483_647,
    }
    config.update(extra)
    return config


def create_topics(settings: Settings, *, timeout: float = 30.0) -> list[str]:
    """Create the contract's topics if missing. Returns the names created now. Idempotent.

    Each request waits at most ``timeout`` s (``KafkaException`` / ``TimeoutError`` past it)."""
    admin = AdminClient(quiet({"bootstrap.servers": settings.kafka_bootstrap}))
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        settings.topic_activities,
        settings.topic_follows,
        settings.topic_dlq,
        settings.topic_deferred,
    ]
    new = [
        NewTopic(
            name,
            num_partitions=settings.kafka_partitions,
            replication_factor=settings.kafka_replication_factor,
        )
        for name in wanted
        if name not in existing
    ]
    if not new:
        return []
    created = []
    for name, future in admin.create_topics(new, operation_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
            created.append(name)
        except KafkaException as exc:
            error = exc.args[0]
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise
    return created


class AsyncProducer:
    """A confluent-kafka producer whose deliveries are awaited from asyncio.

    One background thread polls for delivery reports and resolves the futures on their loop.
    While the process traces (``feed.tracing``), records are produced through OpenTelemetry's
    confluent-kafka instrumentation: a ``send`` span per record, the child of the caller's current
    span, whose ``traceparent`` (and ``tracestate``) the record carries as headers.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self._producer = Producer(config)
        self._produce = self._producer.produce
        if tracing.ENABLED:
            from opentelemetry.instrumentation.confluent_kafka import ConfluentKafkaInstrumentor

            self._produce = ConfluentKafkaInstrumentor.instrument_producer(self._producer).produce
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="kafka-producer-poll", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    async def send_many(
        self,
        topic: str,
        records: Iterable[tuple[bytes, bytes]],
        *,
        timeout: float = 30.0,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> int:
        """Produce (key, value) records and wait until the broker has all of them. ``headers``
        go on every record (while tracing, the instrumentation adds the trace context's).

        Raises :class:`KafkaUnavailable` when the broker has not taken them all within
        ``timeout`` s (a full local queue counts against it) or when the producer refuses a
        record (e.g. a topic the broker reported missing); records produced before that may
        still be delivered (delivery is idempotent by activity id)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        futures: list[asyncio.Future[None]] = []

        def report(future: asyncio.Future[None]) -> Any:
            def on_delivery(err: KafkaError | None, _msg: Any) -> None:
                def settle() -> None:
                    if future.done():
                        return
                    if err is None:
                        future.set_result(None)
                    else:
                        future.set_exception(KafkaUnavailable(str(err)))

                loop.call_soon_threadsafe(settle)

            return on_delivery

        def abandon() -> None:
            for future in futures:  # settled later by their delivery reports, unread
                future.add_done_callback(_consume_result)

        for key, value in records:
            future: asyncio.Future[None] = loop.create_future()
            while True:
                try:
                    if headers:
                        self._produce(
                            topic,
                            value=value,
                            key=key,
                            on_delivery=report(future),
                            headers=list(headers),
                        )
                    else:
                        self._produce(topic, value=value, key=key, on_delivery=report(future))
                    break
                except BufferError:
                    if loop.time() >= deadline:
                        abandon()
                        raise KafkaUnavailable(
                            f"the producer's queue stayed full for {timeout:g} s"
                        ) from None
                    await asyncio.sleep(0.01)
                except KafkaException as exc:
                    abandon()
                    error = exc.args[0] if exc.args else exc
                    text = error.str() if isinstance(error, KafkaError) else str(error)
                    raise KafkaUnavailable(f"the producer refused a record: {text}") from None
            futures.append(future)
        try:
            await asyncio.wait_for(asyncio.gather(*futures), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise KafkaUnavailable("timed out waiting for the broker") from None
        return len(futures)

    def list_topics(self, *, timeout: float = 2.0) -> Any:
        """The cluster's metadata (blocking, at most ``timeout`` s): the gateway's readiness
        probe of Kafka. Raises ``KafkaException`` when the broker does not answer."""
        return self._producer.list_topics(timeout=timeout)

    def close(self, timeout: float = 10.0) -> None:
        self._producer.flush(timeout)
        self._stop.set()
        self._thread.join(timeout=2)


def _consume_result(future: asyncio.Future[None]) -> None:
    """Mark an abandoned delivery's outcome as read (no "exception never retrieved" log)."""
    if not future.cancelled():
        future.exception()
