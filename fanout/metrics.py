"""Prometheus metrics of the fan-out worker (its own registry, served on its own port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from feed.metrics import process_collectors
from feed.stages import WORKER_STAGES, StageHistogram

__all__ = ["WorkerMetrics"]

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "feed_activities_consumed_total", "Records consumed, by topic", ["topic"], registry=r
        )
        self.fanned_out = Counter(
            "feed_activities_fanned_out_total",
            "Activities whose fan-out (timelines, history, notifications) a batch completed",
            registry=r,
        )
        self.store_errors = Counter(
            "feed_store_errors_total",
            "Failed store calls of the batch loop, by store (redis, cassandra, kafka, other)",
            ["store"],
            registry=r,
        )
        self.inserts = Counter(
            "feed_timeline_inserts_total", "Entries added to Redis timelines", registry=r
        )
        self.history_rows = Counter(
            "feed_history_rows_total", "Timeline rows written to Cassandra", registry=r
        )
        self.pushed = Counter(
            "feed_notifications_published_total", "Frames published to online users", registry=r
        )
        self.notified = Counter(
            "feed_notify_groups_written_total",
            "Notification groups written (created, changed or written again by a replay)",
            registry=r,
        )
        self.batch_size = Histogram(
            "feed_batch_size",
            "Records per consumed batch",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "feed_batch_seconds", "Time to apply one batch", buckets=_LATENCY, registry=r
        )
        self.store_seconds = Histogram(
            "feed_store_call_seconds",
            "Time spent in Redis and in Cassandra per batch",
            ["store"],
            buckets=_LATENCY,
            registry=r,
        )
        self.dlq = Counter(
            "feed_dlq_total",
            "Records sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        self.deferred = Counter(
            "feed_tenant_deferred_total",
            "Records copied to the deferral topic, over their tenant's fan-out rate",
            ["tenant"],
            registry=r,
        )
        self.deferred_applied = Counter(
            "feed_tenant_deferred_applied_total",
            "Records of the deferral topic applied, at their tenant's fan-out rate",
            ["tenant"],
            registry=r,
        )
        self.errors = Counter(
            "feed_errors_total", "Errors while applying batches, by kind", ["kind"], registry=r
        )
        self.lag = Gauge(
            "feed_consumer_lag",
            "Consumer lag per partition (high watermark - committed offset)",
            ["topic", "partition"],
            registry=r,
        )
        self.lag_sum = Gauge("feed_consumer_lag_sum", "Total consumer lag", registry=r)
        self.stages = StageHistogram(
            "feed_stage_latency_seconds",
            "Time from a record's Kafka timestamp to each stage of its batch "
            "(consumed, durable, published, committed; see feed.stages)",
            label="stage",
            values=WORKER_STAGES,
            registry=r,
        )
        self.assigned = Gauge(
            "feed_assigned_partitions", "Partitions assigned to this worker", registry=r
        )
        process_collectors(r)
