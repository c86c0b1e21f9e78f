"""Driving load: producing activities to Kafka, running ``feed fanout`` workers, sampling them.

* :func:`produce` writes activities keyed by actor and returns the per-partition high offsets from
  the delivery reports. Lag is computed against those (the test broker's reported high watermark
  is wrong for multi-record batches: INFRA.md), with the standard formula high - committed.
* :class:`WorkerSet` runs N ``feed fanout`` processes (one fresh consumer group, one topic) and
  reads their ``/metrics``.
* :func:`monitor` samples until every expected insert is applied (bounded in time), recording
  inserts, history rows, lag, worker RSS and batch-latency percentiles over time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from bench.context import BenchContext
from bench.processes import (
    free_port,
    histogram_buckets,
    metric_sum,
    read_metrics,
    rss_bytes,
    wait_http,
)

__all__ = [
    "Sample",
    "WorkerSet",
    "activity_bytes",
    "committed_lag",
    "monitor",
    "percentile_from_buckets",
    "produce",
    "rate_summary",
]

_encoder = msgspec.json.Encoder()
FOLLOWS_TOPIC = "bench.follows"
#: Seconds without any progress, after every record was consumed, before a drain is abandoned.
_STALL_S = 15.0
DLQ_TOPIC = "bench.dlq"


def activity_bytes(
    activity_id: str, actor: str, published: datetime, extra: dict[str, Any] | None = None
) -> bytes:
    body: dict[str, Any] = {
        "id": activity_id,
        "type": "Create",
        "actor": actor,
        "object": f"post:{activity_id}",
        "published": published.isoformat(),
    }
    if extra:
        body["extra"] = extra
    return _encoder.encode(body)


class Highs:
    """High offsets per partition, from delivery reports."""

    def __init__(self) -> None:
        self.by_partition: dict[int, int] = {}
        self.delivered = 0
        self.failed = 0

    def on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
            return
        self.delivered += 1
        p = msg.partition()
        self.by_partition[p] = max(self.by_partition.get(p, 0), msg.offset() + 1)


def new_producer(ctx: BenchContext, **overrides: Any) -> Any:
    from confluent_kafka import Producer

    config: dict[str, Any] = {
        "bootstrap.servers": ctx.settings.kafka_bootstrap,
        "linger.ms": 20,
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 500_000,
        "acks": "all",
        "enable.idempotence": True,
    }
    config.update(overrides)
    return Producer(config)


def produce(
    ctx: BenchContext,
    topic: str,
    actors: Sequence[str],
    *,
    prefix: str,
    update: Callable[..., None] | None = None,
    highs: Highs | None = None,
    timeout: float = 120.0,
) -> Highs:
    """Produce one activity per actor id (ids ``<prefix>-<i>``); wait for every delivery."""
    producer = new_producer(ctx)
    highs = highs or Highs()
    base = datetime.now(UTC) - timedelta(seconds=len(actors) / 1_000_000 + 1)
    deadline = time.monotonic() + timeout
    for i, actor in enumerate(actors):
        value = activity_bytes(f"{prefix}-{i}", actor, base + timedelta(microseconds=i))
        while True:
            try:
                producer.produce(
                    topic, value=value, key=actor.encode(), on_delivery=highs.on_delivery
                )
                break
            except BufferError:
                producer.poll(0.05)
                if time.monotonic() > deadline:
                    raise TimeoutError("producing the backlog took too long") from None
        if i % 2000 == 0:
            producer.poll(0)
            if update is not None:
                update(completed=i)
    remaining = producer.flush(max(1.0, deadline - time.monotonic()))
    if remaining or highs.failed:
        raise RuntimeError(f"{remaining} records undelivered, {highs.failed} failed")
    if update is not None:
        update(completed=len(actors))
    return highs


def committed_lag(consumer: Any, topic: str, partitions: int, highs: Highs) -> int | None:
    """Sum over partitions of (known high - committed); None if it cannot be read now."""
    from confluent_kafka import TopicPartition

    try:
        committed = consumer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=5
        )
    except Exception:
        return None
    total = 0
    for tp in committed:
        high = highs.by_partition.get(tp.partition, 0)
        offset = tp.offset if tp.offset >= 0 else 0
        total += max(0, high - offset)
    return total


def lag_consumer(ctx: BenchContext, group: str) -> Any:
    from confluent_kafka import Consumer

    return Consumer(
        {
            "bootstrap.servers": ctx.settings.kafka_bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
        }
    )


class WorkerSet:
    """``count`` ``feed fanout`` processes sharing one fresh consumer group."""

    def __init__(
        self, ctx: BenchContext, phase: str, topic: str, count: int, *, history: bool
    ) -> None:
        self.ctx = ctx
        self.phase = phase
        self.topic = topic
        self.group = f"bench-{phase}-{uuid.uuid4().hex[:8]}"
        self.history = history
        self.procs: list[Any] = []
        self.urls: list[str] = []
        self.count = count

    def start(self) -> WorkerSet:
        ctx = self.ctx
        ctx.create_topics([self.topic, FOLLOWS_TOPIC, DLQ_TOPIC])
        for n in range(self.count):
            port = free_port()
            env = dict(ctx.env)
            env.update(
                FEED_KAFKA_GROUP=self.group,
                FEED_TOPIC_ACTIVITIES=self.topic,
                FEED_TOPIC_FOLLOWS=FOLLOWS_TOPIC,
                FEED_TOPIC_DLQ=DLQ_TOPIC,
                FEED_FANOUT_HISTORY="true" if self.history else "false",
                # Every follower counts as active, so every insert reaches Redis (the default
                # skips users not seen for FEED_ACTIVE_DAYS: fewer, cheaper Redis writes).
                FEED_ACTIVE_DAYS="0",
                # Push to every follower, big accounts too (no hybrid pull at read time): the same
                # work Stream-Framework does, and the insert count the graph predicts.
                FEED_FANOUT_LIMIT="0",
                FEED_WORKER_METRICS_PORT=str(port),
                FEED_WORKER_METRICS_HOST="127.0.0.1",
            )
            log = ctx.logs_dir() / f"worker-{self.phase}-{n}.log"
            self.procs.append(ctx.children.feed(["fanout"], env=env, log=log))
            self.urls.append(f"http://127.0.0.1:{port}/metrics")
        return self

    def wait_http(self, timeout: float = 60.0) -> bool:
        return all(
            wait_http(url.replace("/metrics", "/healthz"), timeout, proc)
            for url, proc in zip(self.urls, self.procs, strict=True)
        )

    def dead(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is not None]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def scrape(self) -> list[str | None]:
        return [read_metrics(url) for url in self.urls]

    def stop(self) -> None:
        for proc in self.procs:
            self.ctx.children.stop(proc, timeout=20)


@dataclass
class Sample:
    t: float
    inserts: float
    consumed: float
    history_rows: float
    lag: int | None
    rss: list[int | None]
    assigned: float = 0.0


@dataclass
class Monitored:
    samples: list[Sample] = field(default_factory=list)
    latency: list[dict[str, float]] = field(default_factory=list)
    completed: bool = False
    error: str | None = None
    #: (inserts, history rows, CPU seconds by process) at the first insert and at the end.
    cpu_start: tuple[float, float, dict[str, float]] | None = None
    cpu_end: tuple[float, float, dict[str, float]] | None = None

    def cpu_per_unit(self) -> dict[str, Any]:
        """CPU seconds each process spent between the first insert and the end, and the
        inserts (and history rows) applied per CPU second of each."""
        if self.cpu_start is None or self.cpu_end is None:
            return {}
        inserts = self.cpu_end[0] - self.cpu_start[0]
        rows = self.cpu_end[1] - self.cpu_start[1]
        out: dict[str, Any] = {"inserts": inserts, "history_rows": rows}
        for name, end in self.cpu_end[2].items():
            start = self.cpu_start[2].get(name)
            if start is None:
                continue
            spent = end - start
            out[f"{name}_cpu_s"] = spent
            if spent > 0:
                out[f"inserts_per_{name}_cpu_s"] = inserts / spent
                if rows:
                    out[f"history_rows_per_{name}_cpu_s"] = rows / spent
        return out


def percentile_from_buckets(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Percentile ``q`` (0-1) of a cumulative histogram, interpolated inside the bucket."""
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    target = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= target:
            if bound == float("inf"):
                return lower_bound
            span = count - lower_count
            frac = (target - lower_count) / span if span > 0 else 1.0
            return lower_bound + (bound - lower_bound) * frac
        lower_bound, lower_count = bound, count
    return lower_bound


def _bucket_delta(
    now: list[tuple[float, float]], before: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    old = dict(before)
    return [(b, c - old.get(b, 0.0)) for b, c in now]


def monitor(
    ctx: BenchContext,
    workers: WorkerSet,
    *,
    highs: Highs,
    expected_inserts: int,
    expected_consumed: int,
    timeout: float,
    update: Callable[..., None] | None = None,
    on_first_insert: Callable[[], None] | None = None,
    cpu_probe: Callable[[], dict[str, float]] | None = None,
) -> Monitored:
    """Sample the workers until ``expected_inserts`` are applied and the lag is 0 (or timeout)."""
    result = Monitored()
    consumer = lag_consumer(ctx, workers.group)
    partitions = ctx.settings.kafka_partitions
    interval = ctx.plan.sample_interval_s
    t0 = time.monotonic()
    deadline = t0 + timeout
    last_lag_at = 0.0
    lag: int | None = None
    last_buckets: list[tuple[float, float]] = []
    last_bucket_t = t0
    fired = False
    progress_mark = (-1.0, -1.0)
    progress_at = t0
    try:
        while True:
            now = time.monotonic()
            texts = workers.scrape()
            inserts = sum(metric_sum(t, "feed_timeline_inserts_total") for t in texts)
            consumed = sum(
                metric_sum(t, "feed_activities_consumed_total", {"topic": workers.topic})
                for t in texts
            )
            history = sum(metric_sum(t, "feed_history_rows_total") for t in texts)
            assigned = sum(metric_sum(t, "feed_assigned_partitions") for t in texts)
            if now - last_lag_at >= max(interval, 0.5):
                lag = committed_lag(consumer, workers.topic, partitions, highs)
                last_lag_at = now
            rss = [rss_bytes(pid) for pid in workers.pids()]
            result.samples.append(Sample(now - t0, inserts, consumed, history, lag, rss, assigned))
            if inserts > 0 and not fired:
                fired = True
                if cpu_probe is not None:
                    result.cpu_start = (inserts, history, cpu_probe())
                if on_first_insert is not None:
                    on_first_insert()
            if now - last_bucket_t >= 1.0:
                buckets: list[tuple[float, float]] = []
                merged: dict[float, float] = {}
                for text in texts:
                    for bound, count in histogram_buckets(text, "feed_batch_seconds"):
                        merged[bound] = merged.get(bound, 0.0) + count
                buckets = sorted(merged.items())
                delta = _bucket_delta(buckets, last_buckets)
                if delta and delta[-1][1] > 0:
                    result.latency.append(
                        {
                            "t": now - t0,
                            "batches": delta[-1][1],
                            "p50_ms": 1000 * (percentile_from_buckets(delta, 0.50) or 0.0),
                            "p95_ms": 1000 * (percentile_from_buckets(delta, 0.95) or 0.0),
                            "p99_ms": 1000 * (percentile_from_buckets(delta, 0.99) or 0.0),
                        }
                    )
                last_buckets, last_bucket_t = buckets, now
            if update is not None:
                update(completed=inserts)
            if inserts >= expected_inserts and consumed >= expected_consumed:
                if cpu_probe is not None and result.cpu_end is None:
                    result.cpu_end = (inserts, history, cpu_probe())
                final = committed_lag(consumer, workers.topic, partitions, highs)
                if final == 0 or time.monotonic() > deadline:
                    result.samples[-1].lag = final
                    result.completed = final == 0
                    break
            if (inserts, consumed) != progress_mark:
                progress_mark, progress_at = (inserts, consumed), now
            elif consumed >= expected_consumed and now - progress_at > _STALL_S:
                result.error = (
                    f"stalled: every record consumed but {inserts:.0f}/{expected_inserts} "
                    f"inserts after {_STALL_S:.0f}s without progress"
                )
                break
            dead = workers.dead()
            if dead:
                result.error = f"worker process(es) {dead} exited early (see logs/)"
                break
            if now > deadline:
                result.error = (
                    f"timed out after {timeout:.0f}s with {inserts:.0f}/{expected_inserts} inserts"
                )
                break
            time.sleep(interval)
    finally:
        consumer.close()
    return result


def _crossing(samples: Sequence[Sample], attr: str, level: float) -> float | None:
    previous: Sample | None = None
    for s in samples:
        value = getattr(s, attr)
        if value >= level:
            if previous is None:
                return s.t
            before = getattr(previous, attr)
            span = value - before
            frac = (level - before) / span if span > 0 else 1.0
            return previous.t + (s.t - previous.t) * frac
        previous = s
    return None


def rate_summary(samples: Sequence[Sample], attr: str, expected: float) -> dict[str, float | None]:
    """Rates of counter ``attr``: overall (first to last unit) and steady (10% to 90%)."""
    if expected <= 0 or not samples:
        return {"overall_per_s": None, "steady_per_s": None, "seconds": None, "start_s": None}
    start = None
    for i, s in enumerate(samples):
        if getattr(s, attr) > 0:
            start = samples[i - 1].t if i > 0 else s.t
            break
    end = _crossing(samples, attr, expected)
    t10 = _crossing(samples, attr, 0.1 * expected)
    t90 = _crossing(samples, attr, 0.9 * expected)
    overall = expected / (end - start) if start is not None and end and end > start else None
    steady = 0.8 * expected / (t90 - t10) if t10 is not None and t90 and t90 > t10 else None
    return {
        "overall_per_s": overall,
        "steady_per_s": steady,
        "seconds": (end - start) if start is not None and end else None,
        "start_s": start,
    }


def series(samples: Iterable[Sample]) -> dict[str, list[Any]]:
    """Samples as columns (for results.json and the plots)."""
    rows = list(samples)
    return {
        "t": [round(s.t, 3) for s in rows],
        "inserts": [s.inserts for s in rows],
        "consumed": [s.consumed for s in rows],
        "history_rows": [s.history_rows for s in rows],
        "lag": [s.lag for s in rows],
        "rss_mb": [[round(r / 2**20, 1) if r else None for r in s.rss] for s in rows],
    }
