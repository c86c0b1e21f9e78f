"""``feed dlq list|replay`` against the real broker: every record read, truncated copies never
replayed, a missing topic reported in one line.

INFRA.md: this broker reports a multi-record batch's high watermark as its base offset + 1; the
records here are produced in batches on purpose, so reading "up to the watermark" alone would
miss some.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from fanout.dlq import DeadLetters, dead_letter_producer_config
from feed.kafka import create_topics
from feed.settings import Settings


class _Origin:
    header_list: list[tuple[str, bytes]] = []  # a record's headers

    def __init__(self, topic: str, offset: int, value: bytes) -> None:
        self._topic, self._offset, self._value = topic, offset, value

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"u%d" % self._offset

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return self.header_list


def _feed(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "feed.cli", "dlq", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _read_all(settings: Settings, topic: str, count: int) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "log_level": 0,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
        }
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    out: list[Any] = []
    deadline = time.monotonic() + 20
    try:
        while len(out) < count and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                out.append(message)
    finally:
        consumer.close()
    return out


def test_list_reads_every_record_and_replay_passes_over_truncated_copies(
    stack_env: dict[str, str],
) -> None:
    tag = uuid.uuid4().hex[:8]
    env = dict(
        stack_env,
        FEED_TOPIC_ACTIVITIES=f"dlqcli-act-{tag}",
        FEED_TOPIC_FOLLOWS=f"dlqcli-fol-{tag}",
        FEED_TOPIC_DLQ=f"dlqcli-dlq-{tag}",
        FEED_KAFKA_GROUP=f"dlqcli-{tag}",
        FEED_KAFKA_PARTITIONS="1",
    )
    settings = Settings.from_env(env)
    create_topics(settings)
    # Batched on purpose (linger): the broker's watermark then under-reports (INFRA.md).
    letters = DeadLetters.from_config(
        dead_letter_producer_config(settings, **{"linger.ms": 50}), settings.topic_dlq
    )
    origin = settings.topic_activities
    for offset in range(6):
        letters.send(
            _Origin(origin, offset, b"{oops%d" % offset), code="malformed_json", reason="not JSON"
        )
    letters.send(_Origin(origin, 6, b"x" * 2_000_000), code="too_large", reason="too large")
    tenants = _Origin(origin, 7, b'{"type":"Delete"}')
    tenants.header_list = [("traceparent", b"00-x"), ("feed.tenant", b"acme")]
    letters.send(tenants, code="forbidden", reason="not yours")
    letters.flush(10)

    listed = _feed(env, "list", "--json")
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [int(r["headers"]["feed.origin.offset"]) for r in records] == list(range(8))
    big = records[6]
    assert big["headers"]["feed.truncated"] == "true"
    assert big["headers"]["feed.original.size"] == "2000000"

    replay = _feed(env, "replay")
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.startswith("replayed 7 record(s)"), replay.stdout
    assert "passed over 1 truncated record(s)" in replay.stdout
    replayed = _read_all(settings, origin, 7)  # the truncated copy would be among them
    assert sorted(m.value() for m in replayed) == sorted(
        [b"{oops%d" % n for n in range(6)] + [b'{"type":"Delete"}']
    )
    assert all(dict(m.headers())["feed.replayed.from"] for m in replayed)
    # a tenant's record keeps its tenant through the DLQ and back (and nothing else of its own)
    assert records[7]["headers"]["feed.tenant"] == "acme"
    assert "traceparent" not in records[7]["headers"]
    tenants_of = {m.value(): dict(m.headers()).get("feed.tenant") for m in replayed}
    assert tenants_of.pop(b'{"type":"Delete"}') == b"acme"
    assert set(tenants_of.values()) == {None}
    again = _feed(env, "replay")
    assert again.returncode == 0 and again.stdout.startswith("replayed 0 record(s)")
    table = _feed(env, "list", "--code", "too_large")
    assert table.returncode == 0
    assert table.stdout.count("\n") == 1 and "[truncated from 2000000 bytes]" in table.stdout


def test_a_missing_dlq_topic_is_reported_in_one_line_and_not_created(
    stack_env: dict[str, str],
) -> None:
    topic = f"dlqcli-missing-{uuid.uuid4().hex[:8]}"
    env = dict(stack_env, FEED_TOPIC_DLQ=topic)
    started = time.monotonic()
    for action in ("list", "replay"):
        result = _feed(env, action)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr == (
            f"feed dlq {action}: topic {topic!r} does not exist at "
            f"{stack_env['FEED_KAFKA_BOOTSTRAP']} (feed migrate creates it)\n"
        )
    assert time.monotonic() - started < 20
    admin = AdminClient({"bootstrap.servers": stack_env["FEED_KAFKA_BOOTSTRAP"], "log_level": 0})
    assert topic not in admin.list_topics(timeout=10).topics
