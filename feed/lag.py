"""Consumer lag of the fan-out group, computed the standard way.

Per partition: ``lag = high watermark - committed offset``. A partition with no committed offset
has ``committed = None, lag = None`` and is left out of the total (as kafka_exporter does).
KEDA's Kafka scaler asks for ``min(max_replicas, partitions, ceil(total_lag / lag_threshold))``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import msgspec
from confluent_kafka import Consumer, KafkaException, TopicPartition

from feed.kafka import KafkaUnavailable, is_unreachable, quiet

__all__ = ["GroupLag", "PartitionLag", "desired_replicas", "measure_lag", "partition_lag"]


class PartitionLag(msgspec.Struct):
    topic: str
    partition: int
    committed: int | None
    high: int
    lag: int | None


class GroupLag(msgspec.Struct):
    group: str
    total: int
    partitions: list[PartitionLag]


def partition_lag(committed: int | None, high: int) -> int | None:
    """Standard lag formula; ``None`` when the group never committed on the partition."""
    if committed is None or committed < 0:
        return None
    return max(0, high - committed)


def desired_replicas(
    total_lag: int, partitions: int, *, lag_threshold: int, max_replicas: int, min_replicas: int = 0
) -> int:
    """The replica count a KEDA Kafka scaler would ask for."""
    if lag_threshold <= 0:
        raise ValueError("lag_threshold must be positive")
    wanted = math.ceil(total_lag / lag_threshold) if total_lag > 0 else 0
    return max(min_replicas, min(max_replicas, partitions, wanted))


def measure_lag(
    bootstrap: str,
    group: str,
    topics: Sequence[str],
    *,
    timeout: float = 10.0,
    consumer: Any | None = None,
) -> GroupLag:
    """Read committed offsets of ``group`` and the high watermarks of every partition.

    ``timeout`` bounds the whole measurement (every request shares it). Raises
    :class:`~feed.kafka.KafkaUnavailable` (one line naming the broker) when Kafka does not answer
    within it, ``KafkaException`` for any other error the broker reports.
    """
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise KafkaUnavailable(f"cannot reach Kafka at {bootstrap} within {timeout:g} s")
        return remaining

    own = consumer is None
    client = consumer or Consumer(
        quiet(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "session.timeout.ms": 6000,
            }
        )
    )
    try:
        metadata = client.list_topics(timeout=left())
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            if topic in metadata.topics
            for p in sorted(metadata.topics[topic].partitions)
        ]
        committed = client.committed(partitions, timeout=left()) if partitions else []
        rows: list[PartitionLag] = []
        for tp in committed:
            _low, high = client.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), timeout=left(), cached=False
            )
            offset = tp.offset if tp.offset >= 0 else None
            rows.append(
                PartitionLag(tp.topic, tp.partition, offset, high, partition_lag(offset, high))
            )
        total = sum(r.lag for r in rows if r.lag is not None)
        return GroupLag(group=group, total=total, partitions=rows)
    except KafkaException as exc:
        if is_unreachable(exc):
            raise KafkaUnavailable(
                f"cannot reach Kafka at {bootstrap} within {timeout:g} s"
            ) from None
        raise
    finally:
        if own:
            client.close()
