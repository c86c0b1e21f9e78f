"""Scaling out: two workers in one group split the partitions; a clean stop hands them over.

Runs on dedicated topics and a dedicated group, so other tests' records do not interfere.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from feed import versions
from feed.kafka import create_topics
from feed.settings import Settings
from tests.conftest import wait_for
from tests.support.procs import FeedProcess, free_port, http_get, metric_value

pytestmark = pytest.mark.e2e


def _worker(env: dict[str, str], log: Path) -> tuple[FeedProcess, str]:
    port = free_port()
    proc = FeedProcess(["fanout"], {**env, "FEED_WORKER_METRICS_PORT": str(port)}, log)
    return proc.start(), f"http://127.0.0.1:{port}"


def _assigned(url: str) -> float:
    status, body = http_get(f"{url}/metrics")
    return metric_value(body.decode(), "feed_assigned_partitions") if status == 200 else -1


def _batch_ranges(log: Path) -> list[tuple[str, int, int]]:
    ranges = []
    for line in log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("event") == "batch_applied":
            for key, (first, last) in record["offsets"].items():
                ranges.append((key, first, last))
    return ranges


def test_two_workers_split_partitions_and_hand_over_on_clean_stop(
    stack_env: dict[str, str], redis_client: Any, tmp_path: Path, ids: Callable[[str], str]
) -> None:
    tag = uuid.uuid4().hex[:8]
    env = dict(
        stack_env,
        FEED_TOPIC_ACTIVITIES=f"scale-act-{tag}",
        FEED_TOPIC_FOLLOWS=f"scale-fol-{tag}",
        FEED_TOPIC_DLQ=f"scale-dlq-{tag}",
        FEED_KAFKA_GROUP=f"scale-{tag}",
        FEED_KAFKA_PARTITIONS="4",
        FEED_ACTIVE_DAYS="0",  # every follower hot: Redis shows everything
    )
    settings = Settings.from_env(env)
    create_topics(settings)
    a, a_url = _worker(env, tmp_path / "a.log")
    b, b_url = _worker(env, tmp_path / "b.log")
    try:
        # 1. The two workers split the 8 partitions (4 activities + 4 follows).
        wait_for(
            lambda: (
                _assigned(a_url) > 0
                and _assigned(b_url) > 0
                and _assigned(a_url) + _assigned(b_url) == 8
            ),
            timeout=60,
            message="partitions split between two workers",
        )

        actors = [ids(f"actor{n}") for n in range(8)]
        followers = [ids(f"fan{n}") for n in range(6)]
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 5})
        t0 = datetime.now(UTC)
        for fan in followers:
            for actor in actors:
                event = {"type": "follow", "follower": fan, "followee": actor, "at": t0.isoformat()}
                producer.produce(
                    settings.topic_follows, key=fan.encode(), value=json.dumps(event).encode()
                )
        producer.flush(10)
        wait_for(
            lambda: all(
                versions.changes(redis_client.get(f"gv:{{{actor}}}")) == len(followers)
                for actor in actors
            ),
            timeout=30,
            message="follows applied",
        )

        def publish(first: int, count: int) -> list[str]:
            sent = []
            for n in range(first, first + count):
                actor = actors[n % len(actors)]
                aid = ids(f"act{n}")
                body = {
                    "id": aid,
                    "type": "Create",
                    "actor": actor,
                    "object": f"o:{n}",
                    "published": (t0 + timedelta(milliseconds=n)).isoformat(),
                }
                producer.produce(
                    settings.topic_activities, key=actor.encode(), value=json.dumps(body).encode()
                )
                sent.append(aid)
            producer.flush(10)
            return sent

        sent = publish(0, 160)
        # 2. One worker stops cleanly: it finishes its batch, commits and leaves the group.
        assert b.stop(timeout=30) == 0
        wait_for(
            lambda: _assigned(a_url) == 8,
            timeout=30,
            message="the remaining worker takes all partitions",
        )
        sent += publish(160, 80)

        # 3. Every activity lands in every follower's timeline.
        def complete() -> bool:
            return all(redis_client.zcard(f"tl:{{{fan}}}") == len(sent) for fan in followers)

        wait_for(complete, timeout=60, message="every activity in every timeline")
        members = redis_client.zrevrangebylex(f"tl:{{{followers[0]}}}", "+", "-")
        assert sorted(m.decode().split(":", 1)[1] for m in members) == sorted(sent)

        # 4. No record was processed twice by the two workers (offset ranges never overlap).
        a.stop(timeout=30)
        ranges = _batch_ranges(tmp_path / "a.log") + _batch_ranges(tmp_path / "b.log")
        assert {key for key, _, _ in ranges}, "no batches logged"
        by_partition: dict[str, list[tuple[int, int]]] = {}
        for key, first, last in ranges:
            by_partition.setdefault(key, []).append((first, last))
        for key, spans in by_partition.items():
            spans.sort()
            for (_, last), (first, _) in itertools.pairwise(spans):
                assert first > last, f"{key}: offsets processed twice: {spans}"
        assert _batch_ranges(tmp_path / "b.log"), "worker b applied nothing before its stop"
    finally:
        a.stop()
        b.stop()
