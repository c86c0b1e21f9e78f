"""Consumer lag against the real broker, computed the standard way.

INFRA.md: this broker reports exact high watermarks only for one-record batches, so the test
produces with ``linger.ms=0`` and ``batch.num.messages=1``. The lag code itself is the standard
formula (high watermark - committed offset), unchanged.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from feed.kafka import create_topics
from feed.lag import desired_replicas, measure_lag
from feed.settings import Settings


def test_lag_per_partition_total_and_uncommitted_partitions(stack_env: dict[str, str]) -> None:
    tag = uuid.uuid4().hex[:8]
    env = dict(
        stack_env,
        FEED_TOPIC_ACTIVITIES=f"lag-act-{tag}",
        FEED_TOPIC_FOLLOWS=f"lag-fol-{tag}",
        FEED_TOPIC_DLQ=f"lag-dlq-{tag}",
        FEED_KAFKA_GROUP=f"lag-{tag}",
        FEED_KAFKA_PARTITIONS="3",
    )
    settings = Settings.from_env(env)
    create_topics(settings)
    producer = Producer(
        {"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 0, "batch.num.messages": 1}
    )
    produced = {0: 12, 1: 5, 2: 3}
    for partition, count in produced.items():
        for n in range(count):
            producer.produce(settings.topic_activities, value=b"x%d" % n, partition=partition)
            producer.flush(10)  # one record per batch: exact watermarks on this broker
    committed = {0: 4, 1: 5}  # partition 2: never committed
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": settings.kafka_group,
            "enable.auto.commit": False,
        }
    )
    consumer.commit(
        offsets=[TopicPartition(settings.topic_activities, p, o) for p, o in committed.items()],
        asynchronous=False,
    )
    consumer.close()

    lag = measure_lag(
        settings.kafka_bootstrap,
        settings.kafka_group,
        [settings.topic_activities, settings.topic_follows],
    )
    rows = {(r.topic, r.partition): r for r in lag.partitions}
    for partition, count in produced.items():
        row = rows[(settings.topic_activities, partition)]
        assert row.high == count
        if partition in committed:
            assert row.committed == committed[partition]
            assert row.lag == count - committed[partition]
        else:
            assert row.committed is None and row.lag is None
    expected_total = sum(produced[p] - o for p, o in committed.items())
    assert lag.total == expected_total
    follows = [r for r in lag.partitions if r.topic == settings.topic_follows]
    assert len(follows) == 3 and all(r.lag is None for r in follows)

    # The CLI prints the same as one JSON object on stdout (logs go to stderr).
    result = subprocess.run(
        [sys.executable, "-m", "feed.cli", "lag", "--json"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data: dict[str, Any] = json.loads(result.stdout)
    assert data["group"] == settings.kafka_group and data["total"] == expected_total
    cli_rows = {(r["topic"], r["partition"]): r for r in data["partitions"]}
    assert cli_rows[(settings.topic_activities, 2)] == {
        "topic": settings.topic_activities,
        "partition": 2,
        "committed": None,
        "high": produced[2],
        "lag": None,
    }
    table = subprocess.run(
        [sys.executable, "-m", "feed.cli", "lag", "--lag-threshold", "3"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "TOTAL" in table and str(expected_total) in table
    replicas = desired_replicas(expected_total, 6, lag_threshold=3, max_replicas=16)
    assert replicas == min(16, 6, math.ceil(expected_total / 3))
    assert f"KEDA would run {replicas} worker(s)" in table
