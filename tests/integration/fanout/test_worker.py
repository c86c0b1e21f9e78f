"""The dead-letter path of a real ``feed fanout`` process against the real broker.

No record the broker accepts may stop a worker: one too large to copy goes to the DLQ truncated
(its original size in a header), and a DLQ that cannot be written (here: a missing topic) pauses
the worker, which never commits past the record and never exits, until the topic is there.

INFRA.md: this broker (Tansu) accepts records of any size (20 MB was tried) and creates a topic
that a producer names unless the producer asks it not to; the worker's DLQ producer does ask.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from fanout.dlq import (
    DLQ_MESSAGE_MAX_BYTES,
    DeadLetters,
    DeadLetterUnavailable,
    dead_letter_producer_config,
)
from feed.kafka import create_topics
from feed.settings import Settings
from tests.conftest import wait_for
from tests.support.pipeline import isolated_env
from tests.support.procs import FeedProcess, free_port, http_get, json_log_records, metric_value


class _Worker:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.settings = Settings.from_env(env)
        self.metrics_url = f"http://127.0.0.1:{env['FEED_WORKER_METRICS_PORT']}"
        self.process = FeedProcess(["fanout"], env, log)
        self.log = log

    def alive(self) -> bool:
        assert self.process.proc is not None
        if self.process.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            pytest.fail(f"the worker exited with {self.process.proc.returncode}:\n{tail}")
        return True

    def metric(self, name: str) -> float:
        status, body = http_get(f"{self.metrics_url}/metrics")
        return metric_value(body.decode(), name) if status == 200 else 0.0

    def committed(self) -> int | None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap,
                "group.id": self.settings.kafka_group,
                "log_level": 0,
            }
        )
        try:
            [tp] = consumer.committed(
                [TopicPartition(self.settings.topic_activities, 0)], timeout=10
            )
            return tp.offset if tp.offset >= 0 else None
        finally:
            consumer.close()


@pytest.fixture
def start_worker(
    request: pytest.FixtureRequest, stack_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., _Worker]]:
    """Start a ``feed fanout`` on topics and a group of its own (one partition each); with
    ``dlq_topic=False`` its DLQ topic is not created. Stopped by pid at the end."""
    started: list[_Worker] = []

    def start(*, dlq_topic: bool = True) -> _Worker:
        prefix = request.node.name[5:20].strip("_").replace("_", "-")
        env = isolated_env(stack_env, prefix, FEED_KAFKA_PARTITIONS="1")
        settings = Settings.from_env(env)
        if dlq_topic:
            create_topics(settings)
        else:
            _create(settings, settings.topic_activities, settings.topic_follows)
        w = _Worker(env, tmp_path / "fanout.log")
        w.process.start()
        started.append(w)
        w.process.wait_http(f"{w.metrics_url}/healthz", timeout=60)
        wait_for(
            lambda: w.alive() and w.metric("feed_assigned_partitions") > 0,
            timeout=60,
            message="worker partition assignment",
        )
        return w

    try:
        yield start
    finally:
        for w in started:
            w.process.stop(timeout=20)


def _create(settings: Settings, *topics: str) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "log_level": 0})
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=1, replication_factor=1) for t in topics]
    )
    for future in futures.values():
        future.result(timeout=30)


def _activity(aid: str) -> bytes:
    return json.dumps(
        {
            "id": aid,
            "type": "Create",
            "actor": "u-" + aid,
            "object": "post:1",
            "published": datetime.now(UTC).isoformat(),
        }
    ).encode()


def _produce(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    # The broker accepts records far larger than a default producer sends: allow them here.
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "message.max.bytes": 1_000_000_000,
            "linger.ms": 0,
            "log_level": 0,
        }
    )
    for key, value in records:
        producer.produce(settings.topic_activities, key=key, value=value, partition=0)
        assert producer.flush(30) == 0


def _read_topic(settings: Settings, topic: str, count: int, timeout: float) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "log_level": 0,
            "group.id": f"dlq-reader-{uuid.uuid4().hex[:8]}",
        }
    )
    metadata = consumer.list_topics(topic, timeout=10)
    consumer.assign([TopicPartition(topic, p, 0) for p in metadata.topics[topic].partitions])
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(records) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                records.append(message)
    finally:
        consumer.close()
    assert len(records) == count, f"{len(records)} of {count} DLQ records in {timeout} s"
    return sorted(records, key=lambda m: (m.partition(), m.offset()))


def _record_size(message: Any) -> int:
    headers = message.headers() or []
    return (
        len(message.key() or b"")
        + len(message.value() or b"")
        + sum(len(k) + len(v or b"") for k, v in headers)
    )


def test_records_too_large_to_copy_go_to_the_dlq_truncated_and_the_worker_goes_on(
    start_worker: Callable[..., _Worker],
) -> None:
    worker = start_worker()
    s = worker.settings
    big = bytes(range(256)) * (999_800 // 256) + b"x" * (999_800 % 256)
    huge = b"y" * 5_000_000
    long_key = b"k" * 1_200_000
    good = _activity(uuid.uuid4().hex[:12])
    assert len(big) == 999_800
    _produce(s, [(b"u-big", big), (b"u-huge", huge), (long_key, b"not json"), (b"u1", good)])

    # The worker consumes past all four and commits: the valid record after them is applied.
    wait_for(
        lambda: worker.alive() and worker.committed() == 4,
        timeout=90,
        message="offsets committed past the oversized records",
    )
    dead = _read_topic(s, s.topic_dlq, 3, timeout=30)
    first, second, third = dead
    for message, original in ((first, big), (second, huge)):
        headers = {k: (v or b"").decode() for k, v in message.headers()}
        assert headers["feed.error"] == "too_large"
        assert headers["feed.truncated"] == "true"
        assert headers["feed.original.size"] == str(len(original))
        assert headers["feed.origin.topic"] == s.topic_activities
        value = message.value()
        assert 0 < len(value) < len(original) and original.startswith(value)
        assert _record_size(message) <= DLQ_MESSAGE_MAX_BYTES
    assert first.key() == b"u-big" and second.key() == b"u-huge"
    headers = {k: (v or b"").decode() for k, v in third.headers()}
    assert headers["feed.error"] == "malformed_json"
    assert headers["feed.truncated"] == "true"
    assert headers["feed.original.key.size"] == str(len(long_key))
    assert third.value() == b"not json"  # the value fits; only the key was cut
    assert 0 < len(third.key()) < len(long_key) and long_key.startswith(third.key())
    assert _record_size(third) <= DLQ_MESSAGE_MAX_BYTES
    assert worker.alive()


def test_a_record_larger_than_the_clients_default_fetch_limit_does_not_stall_the_worker(
    start_worker: Callable[..., _Worker],
) -> None:
    """120 MB: the broker takes it; librdkafka's default receive.message.max.bytes (100 MB)
    would drop every fetch response carrying it, for ever, stalling the partition."""
    worker = start_worker()
    s = worker.settings
    huge = b"h" * 120_000_000
    _produce(s, [(b"u-huge", huge), (b"u1", _activity(uuid.uuid4().hex[:12]))])
    del huge
    wait_for(
        lambda: worker.alive() and worker.committed() == 2,
        timeout=90,
        message="offsets committed past the 120 MB record",
    )
    [dead] = _read_topic(s, s.topic_dlq, 1, timeout=30)
    headers = {k: (v or b"").decode() for k, v in dead.headers()}
    assert headers["feed.original.size"] == "120000000" and headers["feed.truncated"] == "true"


def test_a_missing_dlq_topic_pauses_the_worker_until_the_topic_exists(
    start_worker: Callable[..., _Worker],
) -> None:
    worker = start_worker(dlq_topic=False)
    s = worker.settings
    _produce(s, [(b"u1", b"{oops"), (b"u1", _activity(uuid.uuid4().hex[:12]))])

    # The DLQ write fails and is retried (paused, like a store outage), more than once.
    wait_for(
        lambda: worker.alive() and worker.metric('feed_errors_total{kind="dlq_unavailable"}') >= 2,
        timeout=60,
        message="the DLQ write retried while the topic is missing",
    )
    assert worker.committed() is None  # nothing committed past the record
    admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap, "log_level": 0})
    assert s.topic_dlq not in admin.list_topics(timeout=10).topics  # not auto-created

    _create(s, s.topic_dlq)
    wait_for(
        lambda: worker.alive() and worker.committed() == 2,
        timeout=60,
        message="offsets committed once the DLQ topic exists",
    )
    [dead] = _read_topic(s, s.topic_dlq, 1, timeout=30)
    assert dead.value() == b"{oops"
    assert dict(dead.headers())["feed.error"] == b"malformed_json"
    assert worker.alive()


class _Origin:
    header_list: list[tuple[str, bytes]] = []  # a record's headers

    """Where a dead letter came from (what the worker hands over: a consumed record)."""

    def __init__(self, offset: int, key: bytes, value: bytes) -> None:
        self._offset, self._key, self._value = offset, key, value

    def topic(self) -> str:
        return "feed.activities"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return self.header_list


def test_dead_letters_are_kept_until_the_broker_has_them_and_cut_further_when_refused(
    settings: Settings,
) -> None:
    """A producer that takes less than the DLQ was told (message.max.bytes 100,000 against
    1,000,000) refuses the first copy as too large: it is cut to half, and again, until it
    fits. A full local queue (one message) refuses the third at once: it is kept and sent by
    a later flush. No call raises but ``flush``, and nothing is lost or duplicated."""
    topic = f"dlq-letters-{uuid.uuid4().hex[:8]}"
    _create(settings, topic)
    config = dead_letter_producer_config(
        settings,
        **{
            "message.max.bytes": 100_000,
            "queue.buffering.max.messages": 1,
            "linger.ms": 0,
            "log_level": 0,
        },
    )
    letters = DeadLetters(Producer(config), topic, max_message_bytes=DLQ_MESSAGE_MAX_BYTES)
    big = b"z" * 900_000
    letters.send(_Origin(0, b"u0", big), code="too_large", reason="too large")
    letters.send(_Origin(1, b"u1", b"{oops"), code="malformed_json", reason="not JSON")
    letters.send(_Origin(2, b"u2", b"{oops2"), code="malformed_json", reason="not JSON")
    failures = 0
    for _ in range(20):
        try:
            letters.flush(5)
            break
        except DeadLetterUnavailable:
            failures += 1
    else:
        pytest.fail("the dead letters never reached the broker")
    assert failures >= 3 and letters.pending == 0  # 1 MB -> 500 KB -> 250 KB -> 125 KB -> fits
    dead = {m.key(): m for m in _read_topic(settings, topic, 3, timeout=30)}
    assert set(dead) == {b"u0", b"u1", b"u2"}
    headers = {k: (v or b"").decode() for k, v in dead[b"u0"].headers()}
    assert headers["feed.truncated"] == "true" and headers["feed.original.size"] == "900000"
    assert big.startswith(dead[b"u0"].value()) and _record_size(dead[b"u0"]) <= 100_000
    assert dead[b"u1"].value() == b"{oops" and dead[b"u2"].value() == b"{oops2"


def test_the_worker_process_writes_only_json_lines_librdkafkas_included(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """``feed fanout`` with FEED_LOG_FORMAT=json and a broker that is not there: librdkafka
    complains (it wrote ``%3|...|FAIL|rdkafka#consumer-1|...`` to stderr as plain text before the
    worker gave it a logger), and every line the process wrote is one JSON object."""
    env = isolated_env(stack_env, "jsonlog", FEED_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}")
    worker = _Worker(env, tmp_path / "fanout.log")
    worker.process.start()
    try:
        worker.process.wait_http(f"{worker.metrics_url}/healthz", timeout=60)
        wait_for(
            lambda: (
                '"logger": "librdkafka"' in worker.log.read_text(errors="replace")
                and worker.alive()
            ),
            timeout=30,
            message="librdkafka's complaint in the log",
        )
    finally:
        worker.process.stop(timeout=20)
    records = json_log_records(worker.log)
    assert any(record.get("logger") == "librdkafka" for record in records)


def test_the_cluster_probe_sees_a_killed_master_until_its_replica_takes_over(
    tmp_path: Path, settings: Settings, cassandra: Any
) -> None:
    # The worker's half-open probe (fanout.worker._stores_probe) on a Redis Cluster: a PING to
    # the seed node alone answered while another master was dead, so the worker waited out its
    # whole back-off after the promotion (CI saw 5.15 s). It must say "down" from the kill until
    # the replica takes over, then "up".
    import dataclasses

    from fanout.worker import _stores_probe
    from feed.keys import timeline
    from feed.timelines_cluster import slot_of
    from infra import RedisCluster

    cluster = RedisCluster(tmp_path / "cluster", masters=3, replicas=1).start()
    try:
        probe = _stores_probe(
            dataclasses.replace(settings, redis_url=cluster.url), cassandra.cluster, True
        )
        assert probe()
        seed = cluster.masters[0]  # cluster.url names it: the node a lone PING would reach
        victim = cluster.masters[1]
        victim_port = victim.port
        slot = next(
            s
            for s in (slot_of(timeline(f"u{n}")) for n in range(100_000))
            if cluster.master_port(s, seed) == victim_port
        )
        victim.kill()
        assert not probe()
        wait_for(
            lambda: cluster.master_port(slot, seed) not in (None, victim_port),
            timeout=30,
            interval=0.05,
            message="the replica promoted",
        )
        wait_for(probe, timeout=10, interval=0.2, message="the probe sees the cluster whole")
    finally:
        cluster.stop()
