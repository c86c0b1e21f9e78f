"""The worker's circuit breaker, with fake Kafka and stores: back off, hold, never drop or DLQ."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

import fanout.worker as worker_module
from fanout.metrics import WorkerMetrics
from fanout.processor import BatchStats, RejectedRecord
from fanout.quota import Grant
from fanout.worker import Worker
from feed.settings import Settings
from feed.tenants import DISABLED, Credentials, MemoryTenants, Quotas, Tenant, TenantCache
from tests.support.otlp import in_memory_tracing

TOPIC = "feed.activities"


class FakeMessage:
    def __init__(self, partition: int, offset: int) -> None:
        self._partition = partition
        self._offset = offset
        body = {
            "id": f"a-{partition}-{offset}",
            "type": "Create",
            "actor": "u1",
            "object": "o",
            "published": "2026-01-01T00:00:00Z",
        }
        self._value = json.dumps(body).encode()

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return 1, 1_765_000_000_000  # TIMESTAMP_CREATE_TIME, in ms

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return b"u1"

    def headers(self) -> list[Any]:
        return []

    def error(self) -> None:
        return None


class FakeConsumer:
    """Hands out scripted batches; ``during_pause`` is what a poll returns while paused."""

    def __init__(self, batches: list[list[FakeMessage]]) -> None:
        self.batches = batches
        self.during_pause: list[FakeMessage] = []
        self.paused = False
        self.commits: list[dict[tuple[str, int], int]] = []
        self.log: list[str] = []

    def subscribe(self, topics: list[str], **_callbacks: Any) -> None:
        pass

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        if self.paused:
            out, self.during_pause = self.during_pause, []
            return out
        return self.batches.pop(0) if self.batches else []

    def poll(self, timeout: float) -> FakeMessage | None:
        if self.paused or not self.batches:
            return None
        first = self.batches[0].pop(0)
        if not self.batches[0]:
            self.batches.pop(0)
        return first

    def assignment(self) -> list[Any]:
        return [object()]

    def pause(self, _partitions: Any) -> None:
        self.paused = True

    def resume(self, _partitions: Any) -> None:
        self.paused = False

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        self.commits.append({(o.topic, o.partition): o.offset for o in offsets})
        self.log.append("commit")

    def list_topics(self, timeout: float) -> Any:
        return type("Metadata", (), {"topics": {}})()

    def close(self) -> None:
        pass


class FakeProcessor:
    """Fails with ``errors`` (one per call) before succeeding; records what it applied."""

    def __init__(self, errors: list[BaseException], log: list[str]) -> None:
        self.errors = errors
        self.applied: list[str] = []
        self.calls = 0
        self.log = log

    def apply(
        self,
        events: list[tuple[int, Any]],
        *,
        defer: bool = False,
        origins: Any = (),
        traces: Any = (),
    ) -> BatchStats:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        self.applied += [event.id for _, event in events]
        self.log.append("apply")
        return BatchStats(activities=len(events))

    def complete(self, stats: BatchStats) -> BatchStats:
        return stats

    def close(self) -> None:
        pass


class FakeDLQ:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.why: list[dict[str, Any]] = []

    def send(self, message: Any, **kw: Any) -> None:
        self.sent.append(message.value().decode())
        self.why.append(kw)

    def flush(self, timeout: float = 5.0) -> None:
        pass


def make(
    consumer: FakeConsumer,
    processor: FakeProcessor,
    dlq: FakeDLQ | None = None,
    *,
    commit_interval_ms: int = 0,
    **kw: Any,
) -> tuple[Worker, FakeDLQ]:
    """A worker on fakes; it commits after every batch unless given an interval."""
    dlq = dlq if dlq is not None else FakeDLQ()
    worker = Worker(
        Settings(commit_interval_ms=commit_interval_ms),
        consumer=consumer,
        processor=processor,  # type: ignore[arg-type]
        dead_letters=dlq,
        metrics=WorkerMetrics(),
        **kw,
    )  # type: ignore[arg-type]
    return worker, dlq


def run_until(worker: Worker, done: Callable[[], bool]) -> None:
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        deadline = 10.0
        step = 0.01
        while not done() and deadline > 0:
            threading.Event().wait(step)
            deadline -= step
    finally:
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert done(), "condition not reached"


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "_MAX_BACKOFF_S", 0.02)


def outage(n: int) -> list[BaseException]:
    return [redis.exceptions.ConnectionError("down")] * n


def test_an_outage_is_retried_past_the_attempt_budget_and_never_dead_lettered() -> None:
    consumer = FakeConsumer([[FakeMessage(0, 0), FakeMessage(0, 1)]])
    processor = FakeProcessor(outage(12), consumer.log)  # far more than fanout_attempts (5)
    worker, dlq = make(consumer, processor)
    run_until(worker, lambda: bool(consumer.commits))
    assert processor.applied == ["a-0-0", "a-0-1"] and dlq.sent == []
    assert consumer.commits == [{(TOPIC, 0): 2}]
    assert not consumer.paused


def test_records_polled_while_paused_are_held_and_applied_next() -> None:
    consumer = FakeConsumer([[FakeMessage(0, 0)]])
    consumer.during_pause = [FakeMessage(1, 0), FakeMessage(1, 1)]  # a rebalance handed these
    processor = FakeProcessor(outage(2), consumer.log)
    worker, dlq = make(consumer, processor)
    run_until(worker, lambda: len(consumer.commits) == 2)
    assert processor.applied == ["a-0-0", "a-1-0", "a-1-1"]
    assert consumer.commits == [{(TOPIC, 0): 1}, {(TOPIC, 1): 2}]
    assert dlq.sent == []


def test_stop_during_an_outage_ends_the_wait_and_commits_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "_MAX_BACKOFF_S", 60.0)  # waits of 30-60 s, cut by stop()
    consumer = FakeConsumer([[FakeMessage(0, 0)]])
    processor = FakeProcessor(outage(1000), consumer.log)
    worker, dlq = make(consumer, processor)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            worker._back_off(10, redis.exceptions.ConnectionError("down"))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    threading.Event().wait(0.2)
    started = time.monotonic()
    worker.stop()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < 1.5
    assert [type(e).__name__ for e in errors] == ["_Stopping"]
    # The whole loop: stopped while retrying, the batch stays uncommitted (it is replayed).
    worker, dlq = make(consumer, processor)
    run_until(worker, lambda: processor.calls >= 3)
    assert consumer.commits == [] and dlq.sent == []


def test_after_apply_runs_between_the_writes_and_the_commit() -> None:
    consumer = FakeConsumer([[FakeMessage(0, 0)]])
    processor = FakeProcessor([], consumer.log)
    worker, _ = make(consumer, processor, after_apply=lambda: consumer.log.append("hook"))
    run_until(worker, lambda: bool(consumer.commits))
    assert consumer.log == ["apply", "hook", "commit"]


def test_the_probe_cuts_a_long_wait_once_the_store_is_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "_MAX_BACKOFF_S", 60.0)
    monkeypatch.setattr(worker_module, "_PROBE_EVERY_S", 0.01)
    answers = iter([False, False, True])
    consumer = FakeConsumer([])
    worker, _ = make(consumer, FakeProcessor([], consumer.log), probe=lambda: next(answers, True))
    started = time.monotonic()
    worker._back_off(10, redis.exceptions.ConnectionError("down"))  # a wait of 30-60 s
    # Three probes 10 ms apart: measured 0.030-0.031 s over 90 runs on the loaded 2-core machine.
    # 0.5 s is ~16x that, yet fails if the wait ignored _PROBE_EVERY_S (1 s a probe: >= 2 s) or
    # the probe's first answer (the old bound, 5 s, passed both).
    assert time.monotonic() - started < 0.5
    assert not consumer.paused


def test_a_store_that_stays_reachable_gets_no_early_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "_MAX_BACKOFF_S", 0.3)
    monkeypatch.setattr(worker_module, "_PROBE_EVERY_S", 0.01)
    monkeypatch.setattr(random, "uniform", lambda _a, _b: 1.0)
    consumer = FakeConsumer([])
    worker, _ = make(consumer, FakeProcessor([], consumer.log), probe=lambda: True)
    started = time.monotonic()
    worker._back_off(10, redis.exceptions.ConnectionError("overloaded"))
    assert time.monotonic() - started >= 0.3


def test_a_poison_batch_is_dead_lettered_after_the_attempt_budget() -> None:
    consumer = FakeConsumer([[FakeMessage(0, 0)]])
    processor = FakeProcessor([ValueError("bad")] * 10, consumer.log)
    worker, dlq = make(consumer, processor)
    run_until(worker, lambda: bool(consumer.commits))
    assert len(dlq.sent) == 1 and processor.applied == []


class PipelinedProcessor(FakeProcessor):
    """Defers each batch's (pretend) Redis write; ``complete`` fails with ``complete_errors``."""

    def __init__(self, log: list[str], complete_errors: list[BaseException] | None = None) -> None:
        super().__init__([], log)
        self.complete_errors = complete_errors or []

    def apply(
        self,
        events: list[tuple[int, Any]],
        *,
        defer: bool = False,
        origins: Any = (),
        traces: Any = (),
    ) -> BatchStats:
        stats = super().apply([(i, e) for i, e in events if hasattr(e, "id")])
        self.log[-1] = "apply " + ",".join(getattr(e, "id", "follow") for _, e in events)
        stats.deferred.append(object())  # type: ignore[arg-type]
        if not defer:
            self.complete(stats)
        return stats

    def complete(self, stats: BatchStats) -> BatchStats:
        if self.complete_errors:
            raise self.complete_errors.pop(0)
        stats.deferred.clear()
        stats.inserted = stats.activities
        self.log.append("complete")
        return stats


def test_the_next_batch_is_prepared_while_the_last_ones_redis_write_is_in_flight() -> None:
    """Batch 2 is applied (its Cassandra part) before batch 1 is completed and committed, and
    every commit follows the completion of its own batch."""
    consumer = FakeConsumer([[FakeMessage(0, 0)], [FakeMessage(0, 1)]])
    processor = PipelinedProcessor(consumer.log)
    worker, _ = make(consumer, processor)
    run_until(worker, lambda: len(consumer.commits) == 2)
    assert consumer.log == [
        "apply a-0-0",
        "apply a-0-1",
        "complete",
        "commit",
        "complete",
        "commit",
    ]
    assert consumer.commits == [{(TOPIC, 0): 1}, {(TOPIC, 0): 2}]


def test_a_failed_redis_write_is_retried_before_its_batch_is_committed() -> None:
    consumer = FakeConsumer([[FakeMessage(0, 0)]])
    processor = PipelinedProcessor(consumer.log, complete_errors=outage(3))
    worker, dlq = make(consumer, processor)
    run_until(worker, lambda: bool(consumer.commits))
    assert consumer.log == ["apply a-0-0", "complete", "commit"]
    assert dlq.sent == []


class FollowMessage(FakeMessage):
    def __init__(self, partition: int, offset: int) -> None:
        super().__init__(partition, offset)
        self._value = json.dumps(
            {"type": "follow", "follower": "u2", "followee": "u1", "at": "2026-01-01T00:00:00Z"}
        ).encode()

    def topic(self) -> str:
        return "feed.follows"


def test_a_follow_waits_for_the_batch_in_flight_to_be_completed_and_committed() -> None:
    consumer = FakeConsumer([[FakeMessage(0, 0)], [FollowMessage(0, 0)]])
    processor = PipelinedProcessor(consumer.log)
    worker, dlq = make(consumer, processor)
    run_until(worker, lambda: len(consumer.commits) == 2)
    assert consumer.log[:3] == ["apply a-0-0", "complete", "commit"]
    assert dlq.sent == []


def test_a_revoke_keeps_a_failed_write_pending_for_the_partitions_still_owned() -> None:
    """A revoke (cooperative: only some partitions) while batch N's Redis write fails: N must
    stay pending for the partitions the worker keeps, so it is retried and committed before any
    later batch commits past it; the revoked partition is the new owner's to replay."""
    from confluent_kafka import TopicPartition

    consumer = FakeConsumer([])
    processor = PipelinedProcessor(consumer.log, complete_errors=outage(1))
    worker, dlq = make(consumer, processor)
    worker._on_assign(consumer, [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)])
    worker._pending = worker._prepare([FakeMessage(0, 0), FakeMessage(1, 5)])
    worker._on_revoke(consumer, [TopicPartition(TOPIC, 1)])
    assert consumer.commits == []  # the write failed: nothing committed yet
    worker._finish_pending()  # what the run loop does before it commits the next batch
    assert consumer.commits == [{(TOPIC, 0): 1}]
    assert consumer.log == ["apply a-0-0,a-1-5", "complete", "commit"]
    assert dlq.sent == []


def test_a_revoke_of_every_partition_leaves_a_failed_write_to_the_new_owner() -> None:
    from confluent_kafka import TopicPartition

    consumer = FakeConsumer([])
    processor = PipelinedProcessor(consumer.log, complete_errors=outage(1))
    worker, _ = make(consumer, processor)
    worker._on_assign(consumer, [TopicPartition(TOPIC, 0)])
    worker._pending = worker._prepare([FakeMessage(0, 0)])
    worker._on_revoke(consumer, [TopicPartition(TOPIC, 0)])
    worker._finish_pending()
    assert consumer.commits == []
    assert worker._pending is None


class MalformedMessage(FakeMessage):
    def __init__(self, partition: int, offset: int) -> None:
        super().__init__(partition, offset)
        self._value = b"{oops"


class FlakyDLQ(FakeDLQ):
    """A dead-letter topic that cannot be written for the first ``failures`` flushes."""

    def __init__(self, failures: int, log: list[str]) -> None:
        super().__init__()
        self.failures = failures
        self.flushes = 0
        self.log = log

    def flush(self, timeout: float = 5.0) -> None:
        from fanout.dlq import DeadLetterUnavailable

        self.flushes += 1
        if self.flushes <= self.failures:
            self.log.append("dlq down")
            raise DeadLetterUnavailable("1 record(s) not in 'feed.activities.dlq': Unknown topic")
        self.log.append("dlq flushed")


def test_a_dlq_that_cannot_be_written_pauses_the_worker_and_commits_nothing_until_it_can() -> None:
    consumer = FakeConsumer([[MalformedMessage(0, 0), FakeMessage(0, 1)]])
    processor = FakeProcessor([], consumer.log)
    dlq = FlakyDLQ(4, consumer.log)
    paused: list[bool] = []
    pause = consumer.pause

    def record_pause(partitions: Any) -> None:
        paused.append(True)
        pause(partitions)

    consumer.pause = record_pause  # type: ignore[method-assign]
    worker, _ = make(consumer, processor, dlq)
    run_until(worker, lambda: bool(consumer.commits))
    assert consumer.log == ["apply", *["dlq down"] * 4, "dlq flushed", "commit"]
    assert consumer.commits == [{(TOPIC, 0): 2}]
    assert dlq.sent == ["{oops"]  # one copy, however many attempts
    assert len(paused) == 4 and not consumer.paused
    text = worker._metrics.registry.get_sample_value(
        "feed_errors_total", {"kind": "dlq_unavailable"}
    )
    assert text == 4


def test_a_revoke_while_the_dlq_is_down_keeps_the_batch_pending_and_copies_once() -> None:
    """The revoke path tries the DLQ write once, without retry: on failure the batch stays
    pending for the partitions still owned (never committed past), and is finished later
    without a second copy of its dead letters."""
    from confluent_kafka import TopicPartition

    consumer = FakeConsumer([])
    processor = PipelinedProcessor(consumer.log)
    dlq = FlakyDLQ(1, consumer.log)
    worker, _ = make(consumer, processor, dlq)
    worker._on_assign(consumer, [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)])
    worker._pending = worker._prepare([MalformedMessage(0, 0), FakeMessage(1, 5)])
    worker._on_revoke(consumer, [TopicPartition(TOPIC, 1)])  # must not raise
    assert consumer.commits == [] and worker._pending is not None
    worker._finish_pending()
    assert consumer.commits == [{(TOPIC, 0): 1}]
    assert dlq.sent == ["{oops"]


def test_the_store_probe_gives_up_within_its_second_when_redis_does_not_answer() -> None:
    """A host that takes no connection (a listener whose backlog is full drops the SYN): the
    half-open probe must answer within its 1 s, not after the Redis client's own retries."""
    import socket

    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())  # the one backlog slot: later SYNs are dropped
        port = listener.getsockname()[1]
        settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0")
        probe = worker_module._stores_probe(settings, cluster=None)
        started = time.monotonic()
        assert probe() is False
        assert time.monotonic() - started < 3


class RejectingProcessor(FakeProcessor):
    """Applies every record but rejects the second one of each batch, as the real processor does
    with an id owned by another actor."""

    def apply(
        self,
        events: list[tuple[int, Any]],
        *,
        defer: bool = False,
        origins: Any = (),
        traces: Any = (),
    ) -> BatchStats:
        stats = super().apply(events, defer=defer)
        index = events[1][0]
        stats.rejected.append(
            (index, RejectedRecord("id_conflict", "activity id belongs to another actor", "id"))
        )
        return stats


def test_a_rejected_record_is_dead_lettered_with_its_code_and_field() -> None:
    # The DLQ's feed.error.field was always empty for records the processor refused
    # (id_conflict, not_found, forbidden): the worker passed "" instead of the field.
    consumer = FakeConsumer([[FakeMessage(0, 0), FakeMessage(0, 1)]])
    worker, dlq = make(consumer, RejectingProcessor([], []))
    run_until(worker, lambda: bool(consumer.commits))
    assert [json.loads(v)["id"] for v in dlq.sent] == ["a-0-1"]
    assert (dlq.why[0]["code"], dlq.why[0]["field"]) == ("id_conflict", "id")


def test_applied_batches_within_the_commit_interval_are_committed_together_when_idle() -> None:
    """``commit_interval_ms``: batches applied back to back share one commit (a broker round trip
    less in the loop for each), made as soon as the worker has nothing to apply."""
    consumer = FakeConsumer([[FakeMessage(0, 0)], [FakeMessage(0, 1)], [FakeMessage(1, 7)]])
    processor = PipelinedProcessor(consumer.log)
    worker, dlq = make(consumer, processor, commit_interval_ms=60_000)
    run_until(worker, lambda: len(consumer.commits) == 2)
    # the first batch at once (no commit for a minute before it), the next two together
    assert consumer.commits == [{(TOPIC, 0): 1}, {(TOPIC, 0): 2, (TOPIC, 1): 8}]
    last_complete = max(i for i, entry in enumerate(consumer.log) if entry == "complete")
    assert consumer.log[last_complete + 1 :] == ["commit"]
    assert dlq.sent == []


def test_a_revoke_commits_what_waits_for_the_revoked_partitions_only() -> None:
    from confluent_kafka import TopicPartition

    consumer = FakeConsumer([])
    processor = PipelinedProcessor(consumer.log)
    worker, _dlq = make(consumer, processor, commit_interval_ms=60_000)
    worker._on_assign(consumer, [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)])
    worker._commit({(TOPIC, 0): 3})  # the first commit: made at once
    worker._commit({(TOPIC, 0): 5, (TOPIC, 1): 9})  # within the interval: waits
    assert consumer.commits == [{(TOPIC, 0): 3}]
    worker._on_revoke(consumer, [TopicPartition(TOPIC, 1)])
    assert consumer.commits == [{(TOPIC, 0): 3}, {(TOPIC, 1): 9}]
    worker._flush_commits()  # what stopping (or going idle) does
    assert consumer.commits == [{(TOPIC, 0): 3}, {(TOPIC, 1): 9}, {(TOPIC, 0): 5}]


def test_stopping_commits_what_waits() -> None:
    consumer = FakeConsumer([[FakeMessage(0, 0)], [FakeMessage(0, 1)]])
    processor = PipelinedProcessor(consumer.log)
    worker, _dlq = make(consumer, processor, commit_interval_ms=60_000)
    worker._committed_at = time.monotonic()  # so the first batch's commit waits as well
    run_until(worker, lambda: processor.applied[-1:] == ["a-0-1"])
    assert consumer.commits[-1] == {(TOPIC, 0): 2}


def test_store_errors_are_labelled_by_a_bounded_set_of_stores() -> None:
    import redis as redis_lib
    from cassandra import OperationTimedOut
    from confluent_kafka import KafkaException

    from fanout.worker import store_of

    assert store_of(redis_lib.exceptions.ConnectionError()) == "redis"
    assert store_of(OperationTimedOut()) == "cassandra"
    assert store_of(KafkaException()) == "kafka"
    assert store_of(ValueError()) == "other"


class TracedMessage(FakeMessage):
    """A record whose producer put a trace context on it (``traceparent`` header)."""

    def __init__(self, partition: int, offset: int, traceparent: str | None) -> None:
        super().__init__(partition, offset)
        self._headers = [] if traceparent is None else [("traceparent", traceparent.encode())]

    def headers(self) -> list[Any]:
        return self._headers


class PhasedProcessor(FakeProcessor):
    """Records the traceparents it is handed, and reports two steps per batch."""

    def __init__(self, log: list[str]) -> None:
        super().__init__([], log)
        self.traces: list[Any] = []

    def apply(
        self,
        events: list[tuple[int, Any]],
        *,
        defer: bool = False,
        origins: Any = (),
        traces: Any = (),
    ) -> BatchStats:
        stats = super().apply(events, defer=defer, origins=origins)
        self.traces.append(list(traces))
        now = time.time_ns()
        stats.phases += [
            ("followers read", now - 2000, now - 1000),
            ("redis write", now - 900, now),
        ]
        return stats


def _parent(n: int, sampled: bool = True) -> str:
    return f"00-{n:032x}-{n:016x}-{'01' if sampled else '00'}"


def test_each_traced_record_gets_a_span_under_its_context_and_its_frames_carry_it() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    messages = [
        TracedMessage(0, 0, _parent(1)),
        TracedMessage(0, 1, _parent(2, sampled=False)),  # the producer's trace is not sampled
        TracedMessage(0, 2, None),  # no context: a new trace, which this sampler drops
    ]
    consumer = FakeConsumer([messages])
    processor = PhasedProcessor(consumer.log)
    worker, _ = make(consumer, processor)
    with in_memory_tracing(ParentBased(ALWAYS_OFF)) as exporter:
        run_until(worker, lambda: bool(consumer.commits))
        spans = {s.name: s for s in exporter.get_finished_spans()}
    record = spans[f"{TOPIC} process"]
    assert len(exporter.get_finished_spans()) == 4  # the record, the batch and its 2 steps
    assert (record.context.trace_id, record.parent.span_id) == (1, 1)
    assert record.attributes["messaging.kafka.offset"] == 0
    # what the processor put in the frames: the record span, for the sampled record only
    assert processor.traces == [[f"00-{1:032x}-{record.context.span_id:016x}-01", None, None]]
    batch = spans["fanout batch"]
    assert batch.parent.span_id == record.context.span_id and not batch.links
    assert spans["followers read"].parent.span_id == batch.context.span_id
    assert spans["redis write"].parent.span_id == batch.context.span_id
    assert spans["redis write"].end_time - spans["redis write"].start_time == 900


def test_a_batch_that_carries_several_traces_links_them_and_each_links_back() -> None:
    messages = [TracedMessage(0, n, _parent(n + 1)) for n in range(3)]
    consumer = FakeConsumer([messages])
    worker, _ = make(consumer, PhasedProcessor(consumer.log))
    with in_memory_tracing() as exporter:
        run_until(worker, lambda: bool(consumer.commits))
        spans = exporter.get_finished_spans()
    records = sorted(
        (s for s in spans if s.name.endswith(" process")), key=lambda s: s.context.trace_id
    )
    (batch,) = [s for s in spans if s.name == "fanout batch"]
    assert [r.context.trace_id for r in records] == [1, 2, 3]
    assert batch.context.trace_id == 1 and batch.parent.span_id == records[0].context.span_id
    assert [link.context.span_id for link in batch.links] == [
        r.context.span_id for r in records[1:]
    ]
    for other in records[1:]:
        assert [link.context.span_id for link in other.links] == [batch.context.span_id]


def test_without_tracing_no_record_is_read_for_a_context() -> None:
    """The headers are read once, for the tenant only: no trace context is taken from them."""
    reads: list[int] = []

    class Counted(TracedMessage):
        def headers(self) -> list[Any]:
            reads.append(self.offset())
            return super().headers()

    consumer = FakeConsumer([[Counted(0, 0, "00-" + "1" * 32 + "-" + "2" * 16 + "-01")]])
    processor = PhasedProcessor(consumer.log)
    worker, _ = make(consumer, processor)
    run_until(worker, lambda: bool(consumer.commits))
    assert processor.traces == [[]]
    assert reads == [0]


class TenantMessage(FakeMessage):
    """A record naming its tenant in ``feed.tenant`` (None: no header)."""

    def __init__(self, partition: int, offset: int, tenant: str | bytes | None) -> None:
        super().__init__(partition, offset)
        value = tenant.encode() if isinstance(tenant, str) else tenant
        self._headers = [] if tenant is None else [("feed.tenant", value)]

    def headers(self) -> list[Any]:
        return self._headers


def _registry(*tids: str, disabled: tuple[str, ...] = ()) -> TenantCache:
    store = MemoryTenants()
    for tid in (*tids, *disabled):
        store.create(tid, Credentials.generate())
    for tid in disabled:
        store.set_state(tid, DISABLED)
    return TenantCache(store, refresh_s=10)


def test_each_tenants_records_go_to_its_processor_in_order_and_unknown_ones_to_the_dlq() -> None:
    consumer = FakeConsumer(
        [
            [
                TenantMessage(0, 0, None),
                TenantMessage(0, 1, "acme"),
                TenantMessage(0, 2, "default"),
                TenantMessage(0, 3, "nobody"),
                TenantMessage(0, 4, "acme"),
                TenantMessage(0, 5, "off"),
                TenantMessage(0, 6, "Not A Tenant\n"),
                TenantMessage(0, 7, b"\xff\xfe"),
            ]
        ]
    )
    default = FakeProcessor([], consumer.log)
    built: dict[str, FakeProcessor] = {}

    def processor_for(tenant: Tenant) -> Any:
        built[tenant.id] = FakeProcessor([], consumer.log)
        return built[tenant.id]

    worker, dlq = make(
        consumer,
        default,
        tenants=_registry("acme", disabled=("off",)),
        processor_for=processor_for,
    )
    run_until(worker, lambda: bool(consumer.commits))
    assert default.applied == ["a-0-0", "a-0-2"]
    assert list(built) == ["acme"] and built["acme"].applied == ["a-0-1", "a-0-4"]
    assert [w["code"] for w in dlq.why] == ["unknown_tenant"] * 4
    assert {w["field"] for w in dlq.why} == {"feed.tenant"}
    assert [json.loads(v)["id"] for v in dlq.sent] == ["a-0-3", "a-0-5", "a-0-6", "a-0-7"]
    assert consumer.commits == [{(TOPIC, 0): 8}]


def test_without_a_registry_every_other_tenants_record_is_dead_lettered() -> None:
    consumer = FakeConsumer([[TenantMessage(0, 0, "acme"), TenantMessage(0, 1, None)]])
    processor = FakeProcessor([], consumer.log)
    worker, dlq = make(consumer, processor)
    run_until(worker, lambda: bool(consumer.commits))
    assert processor.applied == ["a-0-1"]
    assert [w["code"] for w in dlq.why] == ["unknown_tenant"]


class FakeQuota:
    """Grants from a script of numbers (then everything), recording what was asked."""

    def __init__(self, grants: list[int], retry_after_s: float = 0.05) -> None:
        self.grants = grants
        self.asked: list[tuple[str, int, bool]] = []
        self.released: list[tuple[str, int]] = []
        self.retry_after_s = retry_after_s

    def take(self, tenant: str, wanted: int, limits: Any, *, deferred: bool = False) -> Grant:
        self.asked.append((tenant, wanted, deferred))
        granted = min(wanted, self.grants.pop(0)) if self.grants else wanted
        return Grant(granted, self.retry_after_s)

    def release(self, tenant: str, count: int, limits: Any) -> None:
        self.released.append((tenant, count))


class SpillDLQ(FakeDLQ):
    """The deferral topic's producer: keeps the copies as the deferred consumer reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[TenantMessage] = []

    def send(self, message: Any, **kw: Any) -> None:
        super().send(message, **kw)
        copy = TenantMessage(0, len(self.copies), None)
        copy._value = message.value()
        copy._headers = [*message.headers(), ("feed.origin.topic", TOPIC.encode())]
        self.copies.append(copy)


def test_a_tenant_over_its_fanout_rate_is_deferred_then_applied_at_its_rate() -> None:
    """Records past the tenant's tokens are copied to the deferral topic keyed by the tenant
    (committed with the batch) and applied from it as tokens come: none dropped, none twice,
    the tenant's order kept, the deferral committed only past what was applied; another
    tenant's records in the same batch are applied at once."""
    batch = [TenantMessage(0, n, "flood" if n % 4 else "calm") for n in range(8)]
    consumer = FakeConsumer([batch])
    default = FakeProcessor([], consumer.log)
    built: dict[str, FakeProcessor] = {}

    def processor_for(tenant: Tenant) -> Any:
        return built.setdefault(tenant.id, FakeProcessor([], consumer.log))

    store = MemoryTenants()
    store.create("flood", Credentials.generate(), Quotas(fanout_rate=1.0))
    store.create("calm", Credentials.generate())
    spill = SpillDLQ()
    deferred = FakeConsumer([])
    quota = FakeQuota([2, 1, 0, 0])  # the batch: 2 of flood's 6; the deferral: 1, none, none, all
    worker, dlq = make(
        consumer,
        default,
        tenants=TenantCache(store, refresh_s=10),
        processor_for=processor_for,
        quota=quota,
        spill=spill,
        deferred=deferred,
    )
    real_consume = deferred.consume

    def consume(num_messages: int, timeout: float) -> list[FakeMessage]:
        if spill.copies:
            deferred.batches.append(list(spill.copies))
            spill.copies = []
        return real_consume(num_messages, timeout)

    deferred.consume = consume  # type: ignore[method-assign]
    run_until(worker, lambda: len(built.get("flood", FakeProcessor([], [])).applied) == 6)
    assert built["calm"].applied == ["a-0-0", "a-0-4"]  # at once, in the first batch
    flood_ids = [f"a-0-{n}" for n in range(8) if n % 4]
    assert built["flood"].applied == flood_ids  # two at once, then the deferred four, in order
    assert [kw["key"] for kw in spill.why] == [b"flood"] * 4
    assert {kw["code"] for kw in spill.why} == {"deferred"}
    assert all(kw["keep_timestamp"] for kw in spill.why)
    assert consumer.commits == [{(TOPIC, 0): 8}]  # the source batch, once its copies were in
    # the deferral: committed past the first applied record, then past all of them
    assert deferred.commits == [{(TOPIC, 0): 1}, {(TOPIC, 0): 4}]
    assert quota.asked[:3] == [("flood", 6, False), ("flood", 4, True), ("flood", 3, True)]
    assert not dlq.sent and default.applied == []
