"""The dead-letter topic: records that cannot be applied, with why and where they came from.

Each DLQ record is the original key and value bytes, with headers: ``feed.error`` (code),
``feed.error.message``, ``feed.error.field``, ``feed.attempts``, ``feed.origin.topic``,
``feed.origin.partition``, ``feed.origin.offset``, ``feed.failed.at`` (RFC 3339).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Producer

__all__ = ["DeadLetter", "DeadLetters", "read_dead_letters", "replay_dead_letters"]


class DeadLetters:
    def __init__(self, producer: Producer, topic: str) -> None:
        self._producer = producer
        self._topic = topic
        self._errors: list[str] = []

    def send(
        self,
        message: Any,
        *,
        code: str,
        reason: str,
        field: str = "",
        attempts: int = 1,
    ) -> None:
        headers = [
            ("feed.error", code.encode()),
            ("feed.error.message", reason.encode()[:1024]),
            ("feed.error.field", field.encode()),
            ("feed.attempts", str(attempts).encode()),
            ("feed.origin.topic", message.topic().encode()),
            ("feed.origin.partition", str(message.partition()).encode()),
            ("feed.origin.offset", str(message.offset()).encode()),
            ("feed.failed.at", datetime.now(UTC).isoformat().encode()),
        ]
        self._producer.produce(
            self._topic,
            key=message.key(),
            value=message.value(),
            headers=headers,
            on_delivery=self._on_delivery,
        )

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every DLQ record is in the broker; raise if any was refused."""
        remaining = self._producer.flush(timeout)
        if remaining or self._errors:
            errors, self._errors = self._errors, []
            raise RuntimeError(f"dead-letter produce failed: {remaining} pending, errors={errors}")


class DeadLetter:
    """One record read back from the dead-letter topic."""

    __slots__ = ("headers", "key", "offset", "partition", "value")

    def __init__(self, message: Any) -> None:
        self.key: bytes | None = message.key()
        self.value: bytes | None = message.value()
        self.partition: int = message.partition()
        self.offset: int = message.offset()
        self.headers = {k: (v or b"").decode(errors="replace") for k, v in message.headers() or []}

    def as_dict(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "offset": self.offset,
            "key": (self.key or b"").decode(errors="replace"),
            "value": (self.value or b"").decode(errors="replace")[:2000],
            "headers": self.headers,
        }


def read_dead_letters(
    bootstrap: str, topic: str, *, group: str | None, limit: int, idle_s: float = 3.0
) -> tuple[list[DeadLetter], Any]:
    """Read up to ``limit`` DLQ records. With ``group``, from that group's committed position
    (the caller commits with the returned consumer); without, everything from the start."""
    import uuid

    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group or f"feed-dlq-list-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
        }
    )
    quiet_since: list[float] = []
    consumer.subscribe([topic], on_assign=lambda *_: quiet_since.append(time.monotonic()))
    records: list[DeadLetter] = []
    deadline = time.monotonic() + 60
    while len(records) < limit and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None or message.error():
            # Done once the topic has been quiet for idle_s after the partitions were assigned.
            if quiet_since and time.monotonic() - quiet_since[-1] > idle_s:
                break
            continue
        quiet_since.append(time.monotonic())
        records.append(DeadLetter(message))
    return records, consumer


def replay_dead_letters(
    bootstrap: str, topic: str, *, group: str, limit: int, code: str | None = None
) -> list[DeadLetter]:
    """Produce DLQ records back to their origin topic, then commit the replay group's position so
    no record is replayed twice. Records whose ``feed.error`` differs from ``code`` are skipped
    (and also passed over for good)."""
    from confluent_kafka import TopicPartition

    records, consumer = read_dead_letters(bootstrap, topic, group=group, limit=limit)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    replayed = []
    try:
        for record in records:
            if code is not None and record.headers.get("feed.error") != code:
                continue
            origin = record.headers.get("feed.origin.topic")
            if not origin:
                continue
            producer.produce(
                origin,
                key=record.key,
                value=record.value,
                headers=[
                    ("feed.replayed.from", f"{topic}/{record.partition}/{record.offset}".encode())
                ],
            )
            replayed.append(record)
        if producer.flush(30):
            raise RuntimeError("replay: the broker did not accept every record")
        if records:
            last: dict[int, int] = {}
            for record in records:
                last[record.partition] = max(last.get(record.partition, -1), record.offset)
            consumer.commit(
                offsets=[TopicPartition(topic, p, o + 1) for p, o in last.items()],
                asynchronous=False,
            )
    finally:
        consumer.close()
    return replayed
