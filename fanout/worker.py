"""The fan-out worker: a Kafka consumer group member applying batches to the stores.

Delivery guarantee: at least once, end to end. Offsets are committed only after every Redis and
Cassandra write for the batch succeeded and every DLQ record is in the broker; every write is
idempotent, so a replay after a crash changes nothing a user can see.

Failure handling:
* undecodable records go to the DLQ at once, and the worker carries on; a record of any size
  the broker accepts is copied there (truncated when too large to copy, see ``fanout.dlq``);
* a DLQ that cannot be written (topic missing, broker down or refusing, local queue full) is an
  outage like a store's: consumption pauses and the DLQ write is retried with the same backoff,
  indefinitely; offsets are never committed past a record whose DLQ copy is not in the broker;
* a store outage (connection errors, timeouts) pauses consumption and retries the batch with
  exponential backoff and jitter (capped at ``_MAX_BACKOFF_S``), indefinitely, keeping the group
  membership: the backlog stays in Kafka and drains when the store returns. Nothing is sent to the
  DLQ because a store is down. While paused the worker keeps polling (heartbeats, rebalances) and
  keeps reporting its lag; records that a rebalance hands it meanwhile are held, in order, and
  applied after the batch in hand (never dropped). SIGTERM ends the wait at once and leaves the
  batch uncommitted (it is replayed). A circuit breaker's half-open probe shortens the wait: at
  most once a second a cheap ``probe`` (Redis PING with a 1 s timeout, on a Redis Cluster to
  every primary of a freshly read slot map, so a killed master is down until its replica takes
  over; the Cassandra driver's own view of its hosts — no query) is asked; once it has seen the
  stores down and then up again, the batch is retried at once instead of at the end of a long
  back-off. A store that stays up but keeps failing (overloaded) gets no early retry;
* any other error is retried ``fanout_attempts`` times; then the batch is applied record by record
  and the records that still fail go to the DLQ with their attempt count.

``after_apply`` (tests only) is called after a batch is applied and before its offsets are
committed: the window a crash must not turn into duplicates.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from cassandra import OperationTimedOut, ReadTimeout, Unavailable, WriteTimeout
from cassandra.cluster import NoHostAvailable
from cassandra.connection import ConnectionException
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from fanout.dlq import DeadLetters, DeadLetterUnavailable, dead_letter_producer_config
from fanout.followers import FollowerCache
from fanout.metrics import WorkerMetrics
from fanout.processor import BatchStats, Processor
from fanout.quota import FanoutQuota, Grant
from feed import redis_connect, tracing
from feed.graph_versions_redis import RedisGraphVersions
from feed.kafka import KafkaUnavailable, consumer_config
from feed.lag import measure_lag
from feed.logging import get_logger
from feed.notify_cassandra import CassandraNotifyStore
from feed.notify_redis import NotifyRedis
from feed.settings import Settings
from feed.stages import now_ms, record_ts_ms
from feed.stores import CassandraFollowGraph, CassandraHistory, open_cassandra
from feed.tenants import (
    DEFAULT,
    NO_QUOTAS,
    TENANT_ID,
    Limits,
    Tenant,
    TenantCache,
    TenantError,
    UnknownTenant,
    header_tenant,
    header_value,
    resolve,
)
from feed.tenants_cassandra import CassandraTenants
from feed.timelines_redis import RedisTimelines
from schemas.activity import Activity, decode_activity
from schemas.errors import ValidationError
from schemas.follow import FollowEvent, decode_follow_event

__all__ = ["ERROR_KINDS", "STORE_ERRORS", "Worker", "build_worker", "store_of"]

log = get_logger("fanout")

#: Errors that mean "a store is unreachable right now": retry forever, never DLQ.
STORE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.OutOfMemoryError,  # a full Redis is an outage, not a poison record
    # a Redis Cluster in a failover or a resharding (CLUSTERDOWN, TRYAGAIN, a slot not covered)
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
    NoHostAvailable,
    OperationTimedOut,
    WriteTimeout,
    ReadTimeout,
    Unavailable,
    ConnectionException,  # the connection closed under a request (a node shutting down)
    ConnectionError,
    TimeoutError,
)
_MAX_BACKOFF_S = 15.0
_PROBE_EVERY_S = 1.0


def store_of(exc: BaseException) -> str:
    """Which store an error came from, by the module of its type: ``redis``, ``cassandra``,
    ``kafka`` or ``other`` (a bounded label: ``feed_store_errors_total{store}``)."""
    if isinstance(exc, (KafkaException, KafkaUnavailable)):  # confluent-kafka's live in cimpl
        return "kafka"
    module = type(exc).__module__.split(".", 1)[0]
    return {"redis": "redis", "cassandra": "cassandra"}.get(module, "other")


#: The ``kind`` label of ``feed_errors_total``: a bounded set. Any other failure of a batch is
#: ``apply`` (its type is in the log line).
ERROR_KINDS = ("kafka", "store_unavailable", "apply", "dlq_unavailable", "commit")
_LAG_EVERY_S = 5.0
_T = TypeVar("_T")
#: Most records read back from the deferral topic held in memory for their tenants' tokens.
_HOLD_MAX = 10_000
#: How long one attempt waits for the broker to acknowledge the DLQ records.
_DLQ_FLUSH_S = 5.0


@dataclass(slots=True)
class _Batch:
    """A batch applied up to its Redis write, which may still be in flight."""

    messages: Sequence[Any]
    events: list[tuple[int, Activity | FollowEvent]]
    offsets: dict[tuple[str, int], int]
    first: dict[tuple[str, int], int]
    stats: BatchStats
    dlq: int
    started: float
    #: The records' Kafka timestamps (ms; None if unknown), and when the batch was consumed and
    #: its Cassandra writes done (``feed.stages``).
    origins: list[int | None]
    consumed_ms: float
    durable_ms: float
    #: While tracing: the records' spans that are sampled (``feed.tracing``), ended with the batch.
    spans: list[Any]
    #: Each record's tenant, by index (empty: every record is the ``default`` tenant's).
    tenants: list[str] = dataclasses.field(default_factory=list)


class _Stopping(Exception):
    """SIGTERM arrived while a batch was being retried: leave it uncommitted (it is replayed)."""


class Worker:
    def __init__(
        self,
        settings: Settings,
        *,
        consumer: Consumer,
        processor: Processor,
        dead_letters: DeadLetters,
        metrics: WorkerMetrics,
        after_apply: Callable[[], None] | None = None,
        probe: Callable[[], bool] | None = None,
        tenants: TenantCache | None = None,
        processor_for: Callable[[Tenant], Processor] | None = None,
        quota: FanoutQuota | None = None,
        spill: DeadLetters | None = None,
        deferred: Consumer | None = None,
    ) -> None:
        """``tenants``: the registry a record's ``feed.tenant`` header is resolved in (None: only
        the ``default`` tenant's records are applied, the others dead-lettered as
        ``unknown_tenant``); ``processor_for``: a tenant's processor (its stores' views).
        ``quota``, ``spill``, ``deferred``: the tenants' fan-out rates (``fanout.quota``): the
        buckets, the producer to the deferral topic, and its consumer."""
        self._settings = settings
        self._consumer = consumer
        self._processor = processor
        self._tenants = tenants
        self._processor_for = processor_for
        #: Each tenant's processor, with the registry's ``updated`` it was built for.
        self._processors: dict[str, tuple[object, Processor]] = {}
        self._quota = quota
        self._spill = spill
        self._deferred = deferred
        #: Records read back from the deferral topic, held per tenant for its tokens; the
        #: offsets read and not applied yet, per partition; the end read, per partition.
        self._held_deferred: dict[str, collections.deque[tuple[Any, Activity | FollowEvent]]] = {}
        self._read_deferred: dict[tuple[str, int], set[int]] = {}
        self._deferred_end: dict[tuple[str, int], int] = {}
        self._deferred_committed: dict[tuple[str, int], int] = {}
        self._default_limits = NO_QUOTAS.effective(settings)
        #: (the registry snapshot it was computed on, whether any tenant has a fan-out rate)
        self._rated: tuple[object, bool] | None = None
        self._dlq = dead_letters
        self._metrics = metrics
        self._stop = threading.Event()
        self._assignment: set[tuple[str, int]] = set()
        self._last_lag = 0.0
        self._after_apply = after_apply
        self._probe = probe
        #: Whether the stores talk to a Redis Cluster (``feed.redis_connect``): set by
        #: :func:`build_worker`, read by the readiness checks.
        self.redis_cluster = False
        self._seen_down = False  # the probe saw a store down since the last early retry
        #: Records consumed while paused in a back-off (a rebalance assigned new partitions):
        #: the next batch, in order.
        self._held: list[Any] = []
        #: The batch whose Redis write is in flight (committed by :meth:`_finish`).
        self._pending: _Batch | None = None
        #: Offsets of applied batches not committed yet (``commit_interval_ms``).
        self._uncommitted: dict[tuple[str, int], int] = {}
        self._uncommitted_origins: list[int | None] = []  # their records' Kafka timestamps
        self._committed_at = float("-inf")  # the first batch is committed at once
        self.batches = 0
        self.healthy = True

    # --- lifecycle ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish the batch in hand, commit, and leave the group."""
        self._stop.set()

    @property
    def assignment(self) -> set[tuple[str, int]]:
        return set(self._assignment)

    def run(self) -> None:
        s = self._settings
        self._consumer.subscribe(
            [s.topic_activities, s.topic_follows],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        if self._tenants is not None:
            self._tenants.maybe_refresh()  # the first load, before any record
            threading.Thread(
                target=self._refresh_registry, name="tenant-registry", daemon=True
            ).start()
        if self._deferred is not None:
            self._deferred.subscribe(
                [s.topic_deferred],
                on_revoke=self._on_deferred_revoke,
                on_lost=self._on_deferred_revoke,
            )
        log.info(
            "worker_started", group=s.kafka_group, topics=[s.topic_activities, s.topic_follows]
        )
        try:
            while not self._stop.is_set():
                if self._held:
                    messages, self._held = self._held, []
                else:
                    messages = self._next_batch(s.fanout_batch)
                consumed_ms = now_ms()
                try:
                    if messages:
                        # Batch N+1's Cassandra writes run while batch N's Redis write is in
                        # flight; N is committed once its Redis write is done.
                        batch = self._prepare(messages, consumed_ms)
                        self._finish_pending()
                        self._pending = batch
                    else:
                        self._finish_pending()
                    self._drain_deferred()
                except _Stopping:
                    # The batch being retried stays uncommitted (replayed); one still in flight
                    # is committed below if its write succeeds.
                    log.warning("stopped_during_retries")
                    break
                self._maybe_report_lag()
            self._finish_pending_without_retry("stopping")
            self._flush_commits()
        finally:
            log.info("worker_stopping")
            try:
                self._consumer.close()
                if self._deferred is not None:
                    self._deferred.close()
            finally:
                self._processor.close()
            log.info("worker_stopped", batches=self.batches)

    def _refresh_registry(self) -> None:
        """Reload the tenant registry every ``FEED_TENANT_REFRESH_S``, off the consume loop: a
        read that waits on a dead Cassandra node (until the driver's timeout) never stalls the
        batches; they read the snapshot, swapped in whole (``TenantCache.refresh``)."""
        registry = self._tenants
        assert registry is not None
        while not self._stop.wait(min(1.0, self._settings.tenant_refresh_s)):
            registry.maybe_refresh()  # due every refresh_s; a failure is retried a second later

    def _next_batch(self, size: int) -> list[Any]:
        """Up to ``size`` records, without waiting for a full batch: what the client has already
        fetched, else the first record to arrive within 0.2 s plus whatever came with it.
        (``consume(n, timeout)`` alone waits out the whole timeout unless ``n`` records arrive,
        which would add up to the timeout to every record's latency at moderate rates.)"""
        messages: list[Any] = self._consumer.consume(num_messages=size, timeout=0)
        if messages or self._pending is not None:
            return messages  # with a batch in flight: finish it rather than wait here
        self._flush_commits()  # nothing to apply: commit what waits before waiting
        first = self._consumer.poll(0.2)
        if first is None:
            return []
        return (
            [first, *self._consumer.consume(num_messages=size - 1, timeout=0)]
            if size > 1
            else [first]
        )

    def _finish_pending(self) -> None:
        batch, self._pending = self._pending, None
        if batch is not None:
            self._finish(batch)

    def _finish_pending_without_retry(
        self, why: str, keep: set[tuple[str, int]] | None = None
    ) -> None:
        """Commit the batch whose Redis write is in flight if that write succeeds now, with no
        retry (on a stop request, or before a revoke; a batch left uncommitted is replayed by
        whoever consumes the partition next, which is idempotent).

        ``keep``: the partitions this worker goes on consuming (a revoke takes only some). If the
        write fails, the batch stays pending for those, so it is retried, and committed, before
        any later batch commits past it; the revoked ones are the new owner's to replay."""
        batch, self._pending = self._pending, None
        if batch is None:
            return
        try:
            self._processor.complete(batch.stats)
            self._finish(batch, retry=False)
        except Exception as exc:
            # The Redis write, or the DLQ write (its records are kept and sent again), failed.
            kept = {tp: o for tp, o in batch.offsets.items() if keep and tp in keep}
            log.warning(
                "batch_in_flight_not_written",
                why=why,
                error=type(exc).__name__,
                retried_later_for=len(kept),
            )
            if kept:
                batch.offsets = kept
                batch.first = {tp: batch.first[tp] for tp in kept}
                self._pending = batch

    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self._assignment |= {(p.topic, p.partition) for p in partitions}
        self._metrics.assigned.set(len(self._assignment))
        log.info("partitions_assigned", partitions=_names(partitions))

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        self._finish_pending_without_retry("partitions_revoked", keep=self._assignment - gone)
        self._flush_commits(gone)  # the next owner starts where this one got to
        self._assignment -= gone
        if self._held:  # the new owner consumes them from the committed offset
            self._held = [m for m in self._held if (m.topic(), m.partition()) not in gone]
        self._metrics.assigned.set(len(self._assignment))
        log.info("partitions_revoked", partitions=_names(partitions))

    # --- one batch ---------------------------------------------------------------------------
    def _prepare(self, messages: Sequence[Any], consumed_ms: float | None = None) -> _Batch:
        """Decode and apply ``messages``; their Redis write may still be in flight.
        ``consumed_ms``: when the consumer handed them over (now, if not given)."""
        started = time.perf_counter()
        if consumed_ms is None:
            consumed_ms = now_ms()
        s = self._settings
        events: list[tuple[int, Activity | FollowEvent]] = []
        offsets: dict[tuple[str, int], int] = {}
        first: dict[tuple[str, int], int] = {}
        origins: list[int | None] = [None] * len(messages)
        spans: list[Any] = []
        traces: list[str | None] = []
        if tracing.ENABLED:
            spans, traces = _record_spans(messages, consumed_ms)
        dlq = 0
        tenant_of: list[str] = []
        for index, message in enumerate(messages):
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    self._metrics.errors.labels(kind="kafka").inc()
                    log.warning("consume_error", error=str(error))
                continue
            origins[index] = record_ts_ms(message)
            topic = message.topic()
            offsets[(topic, message.partition())] = message.offset() + 1
            first.setdefault((topic, message.partition()), message.offset())
            self._metrics.consumed.labels(topic=topic).inc()
            try:
                tid = self._tenant_of(message)
                if tid != DEFAULT and not tenant_of:
                    tenant_of = [DEFAULT] * len(messages)
                if tenant_of:
                    tenant_of[index] = tid
                if topic == s.topic_follows:
                    event: Activity | FollowEvent = decode_follow_event(
                        message.value() or b"", max_skew_s=s.max_clock_skew_s
                    )
                else:
                    event = decode_activity(message.value() or b"", max_skew_s=s.max_clock_skew_s)
                events.append((index, event))
            except ValidationError as exc:
                dlq += 1
                self._dead_letter(message, exc.code, exc.message, exc.field, 1)
        if self._quota is not None and events and self._any_fanout_rate():
            events = self._throttle(messages, events, tenant_of)
        if self._pending is not None and not all(
            isinstance(e, Activity) and not e.is_delete for _, e in events
        ):
            # Deletes and follows wait for every earlier Redis write (and its commit).
            self._finish_pending()
        stats = self._apply(messages, events, tenant_of, defer=True, origins=origins, traces=traces)
        return _Batch(
            messages,
            events,
            offsets,
            first,
            stats,
            dlq,
            started,
            origins,
            consumed_ms,
            now_ms(),
            spans,
            tenant_of,
        )

    def _tenant_of(self, message: Any) -> str:
        """The record's tenant (``feed.tenant``; absent: ``default``). Raises
        :class:`~feed.tenants.UnknownTenant` for a tenant the registry does not hold enabled; a
        registry that cannot be read is an outage, waited out like a store's."""
        tid = header_tenant(message.headers())
        if tid is None or tid == DEFAULT:
            return DEFAULT
        if self._tenants is None:
            raise UnknownTenant(f"no tenant {tid[:40]!r}: this worker has no tenant registry")
        registry = self._tenants

        def lookup() -> str:
            assert registry is not None
            try:
                return resolve(registry, tid)
            except (TenantError, ValueError) as exc:  # a row that does not load: no tenant
                if isinstance(exc, UnknownTenant):
                    raise
                log.error("tenant_row_invalid", tenant=tid[:40], error=str(exc)[:300])
                raise UnknownTenant(f"tenant {tid[:40]!r} cannot be loaded") from None

        # any other error is the registry's store: an outage
        return self._waiting_out(lookup, Exception, "store_unavailable", "tenant lookup failed")

    def _limits(self, tid: str) -> Limits:
        """The tenant's quotas (its registry overrides over the settings)."""
        if self._tenants is None:
            return self._default_limits
        tenant = self._tenants.peek(tid)
        return self._default_limits if tenant is None else tenant.quotas.effective(self._settings)

    def _any_fanout_rate(self) -> bool:
        """Whether any tenant has a fan-out rate (else a batch needs no token): read again with
        each reload of the registry."""
        if self._tenants is None:
            return self._default_limits.fanout_rate > 0
        known = self._tenants.known_version()
        if self._rated is None or self._rated[0] is not known:
            rated = any(t.quotas.effective(self._settings).fanout_rate > 0 for t in known)
            self._rated = (known, rated)
        return self._rated[1]

    def _label(self, tid: str) -> str:
        """The tenant's metric label (bounded: ``FEED_TENANT_METRICS_MAX``)."""
        if tid == DEFAULT or self._tenants is None:
            return tid if tid == DEFAULT else "other"
        return self._tenants.label(tid, self._settings.tenant_metrics_max)

    def _take(self, tid: str, wanted: int, limits: Limits, *, deferred: bool = False) -> Grant:
        """The tenant's fan-out tokens (``fanout.quota``); Redis down is an outage, waited out."""
        quota = self._quota
        assert quota is not None
        return self._waiting_out(
            lambda: quota.take(tid, wanted, limits, deferred=deferred),
            STORE_ERRORS,
            "store_unavailable",
            "fan-out quota failed",
        )

    def _waiting_out(
        self,
        call: Callable[[], _T],
        outage: type[BaseException] | tuple[type[BaseException], ...],
        kind: str,
        what: str,
    ) -> _T:
        """``call()``, retried for as long as it fails with ``outage`` (consumption paused,
        backoff, never given up: ``_back_off``); counted in ``feed_errors_total{kind}``. Any
        other error propagates."""
        attempt = 0
        while True:
            try:
                return call()
            except UnknownTenant:
                raise
            except outage as exc:
                attempt += 1
                self._metrics.errors.labels(kind=kind).inc()
                self._back_off(attempt, exc, what=what)

    def _throttle(
        self,
        messages: Sequence[Any],
        events: list[tuple[int, Activity | FollowEvent]],
        tenant_of: Sequence[str],
    ) -> list[tuple[int, Activity | FollowEvent]]:
        """The events to apply now: each tenant with a fan-out rate gets as many as it has
        tokens, in order; the rest are copied to the deferral topic (committed with the batch
        once the broker has them) and applied later at the tenant's rate."""
        groups: dict[str, list[int]] = {}
        for position, (index, _) in enumerate(events):
            groups.setdefault(tenant_of[index] if tenant_of else DEFAULT, []).append(position)
        later: set[int] = set()
        for tid, positions in groups.items():
            limits = self._limits(tid)
            if limits.fanout_rate <= 0:
                continue
            grant = self._take(tid, len(positions), limits)
            for position in positions[grant.granted :]:
                index = events[position][0]
                assert self._spill is not None
                self._spill.send(
                    messages[index],
                    code="deferred",
                    reason="over the tenant's fan-out rate",
                    attempts=0,
                    key=tid.encode(),
                    keep_timestamp=True,
                )
                later.add(position)
            if grant.granted < len(positions):
                self._metrics.deferred.labels(tenant=self._label(tid)).inc(
                    len(positions) - grant.granted
                )
        if not later:
            return events
        return [event for position, event in enumerate(events) if position not in later]

    def _drain_deferred(self) -> None:
        """Apply the deferral topic's records as their tenants' tokens allow.

        Records read back wait in memory, per tenant, for its tokens (one take per tenant per
        call): a tenant without tokens holds back only its own records, never another tenant's
        that share its deferral partition. A partition's offset is committed up to its first
        record still held (a crash reads the rest again: idempotent). Past :data:`_HOLD_MAX`
        held records, reading pauses until they drain."""
        consumer = self._deferred
        if consumer is None:
            return
        held = self._held_deferred
        if sum(len(q) for q in held.values()) < _HOLD_MAX:
            try:
                read: list[Any] = consumer.consume(
                    num_messages=self._settings.fanout_batch, timeout=0
                )
            except KafkaException as exc:
                log.warning("deferred_consume_failed", error=str(exc))
                read = []
            for message in read:
                if message.error() is None:
                    self._hold_deferred(message)
        if not held:
            self._commit_deferred()
            return
        messages: list[Any] = []
        events: list[tuple[int, Activity | FollowEvent]] = []
        tenant_of: list[str] = []
        for tid in list(held):
            queue = held[tid]
            limits = self._limits(tid)
            if limits.fanout_rate <= 0:
                granted = len(queue)  # the tenant's rate was lifted: all of it, now
                self._release(tid, granted, limits)
            else:
                granted = self._take(tid, len(queue), limits, deferred=True).granted
            for _ in range(granted):
                message, event = queue.popleft()
                events.append((len(messages), event))
                messages.append(message)
                tenant_of.append(tid)
                self._metrics.deferred_applied.labels(tenant=self._label(tid)).inc()
            if not queue:
                del held[tid]
        if events:
            origins = [record_ts_ms(m) for m in messages]  # the originals' (kept by the copy)
            stats = self._apply(messages, events, tenant_of, origins=origins)
            stats = self._retrying(lambda: self._processor.complete(stats), lambda: stats)
            for index, rejected in stats.rejected:
                self._dead_letter(messages[index], rejected.code, str(rejected), rejected.field, 1)
            self._flush_dead_letters()
            for message in messages:
                self._read_deferred[(message.topic(), message.partition())].discard(
                    message.offset()
                )
        self._commit_deferred()

    def _hold_deferred(self, message: Any) -> None:
        """Decode a record read back from the deferral topic and hold it for its tenant's
        tokens; dead-letter it (off the waiting count) if it can no longer be applied."""
        s = self._settings
        where = (message.topic(), message.partition())
        self._read_deferred.setdefault(where, set())
        self._deferred_end[where] = max(self._deferred_end.get(where, 0), message.offset() + 1)
        tid = header_tenant(message.headers()) or DEFAULT
        try:
            resolved = self._tenant_of(message)
            origin = header_value(message.headers(), "feed.origin.topic")
            value = message.value() or b""
            if origin == s.topic_follows:
                event: Activity | FollowEvent = decode_follow_event(
                    value, max_skew_s=s.max_clock_skew_s
                )
            else:
                event = decode_activity(value, max_skew_s=s.max_clock_skew_s)
        except ValidationError as exc:
            self._dead_letter(message, exc.code, exc.message, exc.field, 1)
            if TENANT_ID.fullmatch(tid):
                self._release(tid, 1, self._limits(tid))
            return
        self._read_deferred[where].add(message.offset())
        self._held_deferred.setdefault(resolved, collections.deque()).append((message, event))

    def _commit_deferred(self) -> None:
        """Commit each deferral partition up to its first record still held (or all it read)."""
        consumer = self._deferred
        assert consumer is not None
        offsets = []
        for where, end in self._deferred_end.items():
            pending = self._read_deferred.get(where)
            at = min(pending) if pending else end
            if self._deferred_committed.get(where) != at:
                offsets.append(TopicPartition(where[0], where[1], at))
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:  # a rebalance: the new owner reads them again
            log.warning("deferred_commit_failed", error=str(exc))
            return
        for tp in offsets:
            self._deferred_committed[(tp.topic, tp.partition)] = tp.offset

    def _on_deferred_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        """Drop what is held of partitions no longer ours: their new owner reads them again."""
        gone = {(p.topic, p.partition) for p in partitions}
        for tid in list(self._held_deferred):
            queue = self._held_deferred[tid]
            kept = [(m, e) for m, e in queue if (m.topic(), m.partition()) not in gone]
            if kept:
                self._held_deferred[tid] = collections.deque(kept)
            else:
                del self._held_deferred[tid]
        for where in gone:
            self._read_deferred.pop(where, None)
            self._deferred_end.pop(where, None)
            self._deferred_committed.pop(where, None)

    def _release(self, tid: str, count: int, limits: Limits) -> None:
        assert self._quota is not None
        with contextlib.suppress(*STORE_ERRORS):  # only the ordering preference is lost
            self._quota.release(tid, count, limits)

    def _processor_of(self, tid: str) -> Processor:
        """The tenant's processor (built again when its registry row changed: its quotas). The
        default tenant's is the worker's own unless its row overrides its timeline cap."""
        if self._processor_for is None or self._tenants is None:
            return self._processor
        if tid == DEFAULT:
            row = self._tenants.peek(DEFAULT)
            if row is None or row.quotas.timeline_max is None:
                return self._processor
        tenant = self._tenants.get(tid)
        if tenant is None:  # dropped from the registry since it was resolved: still its data
            held = self._processors.get(tid)
            if held is None:
                raise UnknownTenant(f"no tenant {tid!r}")
            return held[1]
        held = self._processors.get(tid)
        if held is None or held[0] != tenant.updated:
            held = self._processors[tid] = (tenant.updated, self._processor_for(tenant))
        return held[1]

    def _finish(self, batch: _Batch, *, retry: bool = True) -> None:
        """Wait for the batch's Redis write (retrying like any store call), dead-letter its
        rejected records, wait until every DLQ record is in the broker (retrying like a store
        call), and commit.

        ``retry=False``: one attempt at the DLQ write; :class:`DeadLetterUnavailable` if it fails
        (the batch is not committed; its DLQ records are kept and sent again)."""
        stats = batch.stats = self._complete(batch)
        messages, offsets = batch.messages, batch.offsets
        self._seen_down = False
        for index, rejected in stats.rejected:
            batch.dlq += 1
            self._dead_letter(messages[index], rejected.code, str(rejected), rejected.field, 1)
        stats.rejected.clear()  # sent: a second call (after a failed DLQ write) sends no copy
        if retry:
            self._flush_dead_letters()
        else:
            self._dlq.flush(_DLQ_FLUSH_S)
        if self._spill is not None:  # the records over a tenant's rate: in the broker first
            if retry:
                self._flush_dead_letters(self._spill)
            else:
                self._spill.flush(_DLQ_FLUSH_S)
        if self._after_apply is not None:
            self._after_apply()
        self._commit(offsets, batch.origins)
        elapsed = time.perf_counter() - batch.started
        self.batches += 1
        m = self._metrics
        stages, origins = m.stages, batch.origins
        stages.observe_since("consumed", origins, batch.consumed_ms)
        stages.observe_since("durable", origins, batch.durable_ms)
        stages.observe_since("published", origins, stats.published_ms or batch.durable_ms)
        m.batch_size.observe(len(messages))
        m.batch_seconds.observe(elapsed)
        m.inserts.inc(stats.inserted)
        m.fanned_out.inc(stats.activities)
        m.history_rows.inc(stats.history_rows)
        m.pushed.inc(stats.pushed)
        m.notified.inc(stats.notified)
        m.store_seconds.labels(store="redis").observe(stats.redis_s)
        m.store_seconds.labels(store="cassandra").observe(stats.cassandra_s)
        span = _batch_span(batch, stats) if batch.spans else None
        with tracing.using(span):
            self._log_batch(batch, stats, elapsed)
        if span is not None:
            span.end()
            for record in batch.spans:
                record.end()
            batch.spans = []

    def _log_batch(self, batch: _Batch, stats: BatchStats, elapsed: float) -> None:
        messages, offsets, first = batch.messages, batch.offsets, batch.first
        log.info(
            "batch_applied",
            records=len(messages),
            activities=stats.activities,
            deletes=stats.deletes,
            follows=stats.follows,
            inserted=stats.inserted,
            pushed=stats.pushed,
            history_rows=stats.history_rows,
            notified=stats.notified,
            dlq=batch.dlq,
            ms=round(elapsed * 1000, 1),
            redis_ms=round(stats.redis_s * 1000, 1),
            cassandra_ms=round(stats.cassandra_s * 1000, 1),
            offsets={f"{t}/{p}": [first[(t, p)], o - 1] for (t, p), o in offsets.items()},
        )

    def _apply(
        self,
        messages: Sequence[Any],
        events: list[tuple[int, Activity | FollowEvent]],
        tenant_of: Sequence[str] = (),
        *,
        defer: bool = False,
        origins: Sequence[int | None] = (),
        traces: Sequence[str | None] = (),
    ) -> BatchStats:
        """Apply the batch's events: each tenant's with its processor, in record order within
        a tenant (tenants share no data, so their order between them does not matter)."""
        if not tenant_of:
            processor = self._processor_of(DEFAULT)
            return self._retrying(
                lambda: processor.apply(events, defer=defer, origins=origins, traces=traces),
                lambda: self._apply_one_by_one(messages, events),
            )
        groups: dict[str, list[tuple[int, Activity | FollowEvent]]] = {}
        for index, event in events:
            groups.setdefault(tenant_of[index], []).append((index, event))
        total = BatchStats()
        for tid, group in groups.items():
            stats = self._retrying(
                lambda tid=tid, group=group: self._processor_of(tid).apply(  # type: ignore[misc]
                    group, defer=defer, origins=origins, traces=traces
                ),
                lambda group=group: self._apply_one_by_one(  # type: ignore[misc]
                    messages, group, tenant_of
                ),
            )
            _merge(total, stats)
            total.deferred.extend(stats.deferred)
            total.phases.extend(stats.phases)
            total.redis_s += stats.redis_s
            total.cassandra_s += stats.cassandra_s
            total.published_ms = stats.published_ms or total.published_ms
        return total

    def _complete(self, batch: _Batch) -> BatchStats:
        if not batch.stats.deferred:
            return batch.stats
        return self._retrying(
            lambda: self._processor.complete(batch.stats),
            lambda: _with_rejected(
                self._apply_one_by_one(batch.messages, batch.events, batch.tenants), batch.stats
            ),
        )

    def _retrying(
        self, attempt_once: Callable[[], BatchStats], fallback: Callable[[], BatchStats]
    ) -> BatchStats:
        attempt = 0  # every failed attempt: drives the backoff
        failures = 0  # failures that are not outages: bounded by fanout_attempts
        while True:
            try:
                return attempt_once()
            except STORE_ERRORS as exc:
                attempt += 1
                self._metrics.errors.labels(kind="store_unavailable").inc()
                self._metrics.store_errors.labels(store=store_of(exc)).inc()
                self._back_off(attempt, exc)
            except Exception as exc:
                attempt += 1
                failures += 1
                self._metrics.errors.labels(kind="apply").inc()
                self._metrics.store_errors.labels(store=store_of(exc)).inc()
                if failures < self._settings.fanout_attempts:
                    self._back_off(attempt, exc)
                    continue
                log.exception("batch_failing_applying_record_by_record")
                return fallback()

    def _flush_dead_letters(self, letters: DeadLetters | None = None) -> None:
        """Wait until every DLQ record (or deferred one) is in the broker: a topic that cannot
        be written is an outage, waited out like a store's (consumption paused, backoff, never
        given up)."""
        target = letters or self._dlq
        self._waiting_out(
            lambda: target.flush(_DLQ_FLUSH_S),
            DeadLetterUnavailable,
            "dlq_unavailable",
            "dead-letter write failed",
        )

    def _apply_one_by_one(
        self,
        messages: Sequence[Any],
        events: list[tuple[int, Activity | FollowEvent]],
        tenant_of: Sequence[str] = (),
    ) -> BatchStats:
        total = BatchStats()
        for index, event in events:
            attempt = 0
            failures = 0
            processor = self._processor_of(tenant_of[index] if tenant_of else DEFAULT)
            while True:
                try:
                    stats = processor.apply([(index, event)])
                except STORE_ERRORS as exc:
                    attempt += 1
                    self._metrics.errors.labels(kind="store_unavailable").inc()
                    self._metrics.store_errors.labels(store=store_of(exc)).inc()
                    self._back_off(attempt, exc)
                    continue
                except Exception as exc:
                    attempt += 1
                    failures += 1
                    if failures < self._settings.fanout_attempts:
                        self._back_off(attempt, exc)
                        continue
                    self._dead_letter(messages[index], "processing_failed", repr(exc), "", failures)
                    break
                _merge(total, stats)
                break
        return total

    def _back_off(
        self, attempt: int, exc: BaseException, *, what: str = "store call failed"
    ) -> None:
        """Wait before the next attempt: exponential (capped) with jitter, consumption paused.

        The consumer keeps being polled (group membership, rebalances) and the lag keeps being
        reported. Records the poll returns (partitions newly assigned by a rebalance) are held
        for the next batch. A stop request ends the wait at once with :class:`_Stopping`.
        """
        if self._stop.is_set():
            raise _Stopping from exc
        delay = min(_MAX_BACKOFF_S, 0.1 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
        log.warning(
            f"{what}; pausing consumption",
            attempt=attempt,
            error=type(exc).__name__,
            detail=str(exc)[:300],
            retry_in_s=round(delay, 2),
        )
        self._pause()
        deadline = time.monotonic() + delay
        next_probe = time.monotonic() + _PROBE_EVERY_S
        try:
            # Keep polling while paused so the group membership stays alive.
            while not self._stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self._probe is not None and time.monotonic() >= next_probe:
                    next_probe = time.monotonic() + _PROBE_EVERY_S
                    if not _safe_probe(self._probe):
                        self._seen_down = True
                    elif self._seen_down:
                        self._seen_down = False
                        log.info("stores_reachable_again", attempt=attempt)
                        break
                polled = self._consumer.consume(
                    num_messages=self._settings.fanout_batch, timeout=min(0.5, remaining)
                )
                if polled:
                    # A rebalance assigned partitions that were not paused: keep their records.
                    self._held.extend(polled)
                    self._pause()
                self._maybe_report_lag()
        finally:
            assignment = self._consumer.assignment()
            if assignment:
                self._consumer.resume(assignment)
        if self._stop.is_set():
            raise _Stopping from exc

    def _pause(self) -> None:
        assignment = self._consumer.assignment()
        if assignment:
            self._consumer.pause(assignment)

    def _dead_letter(self, message: Any, code: str, reason: str, field: str, attempts: int) -> None:
        self._metrics.dlq.labels(reason=code).inc()
        log.warning(
            "record_dead_lettered",
            code=code,
            reason=reason[:300],
            field=field,
            partition=message.partition(),
            offset=message.offset(),
            topic=message.topic(),
        )
        self._dlq.send(message, code=code, reason=reason, field=field, attempts=attempts)

    def _commit(
        self, offsets: dict[tuple[str, int], int], origins: Sequence[int | None] = ()
    ) -> None:
        """``offsets``' records are applied: commit them now, or with a later batch's if the
        last commit is less than ``commit_interval_ms`` old (each commit is a broker round trip
        in the batch loop). What waits is committed at the latest when the worker goes idle,
        stops, or loses the partitions; a crash meanwhile replays it, which is idempotent."""
        self._uncommitted.update(offsets)
        self._uncommitted_origins.extend(origins)
        interval = self._settings.commit_interval_ms / 1000
        if time.monotonic() - self._committed_at >= interval:
            self._flush_commits()

    def _flush_commits(self, partitions: set[tuple[str, int]] | None = None) -> None:
        """Commit the applied offsets not committed yet (only those of ``partitions``)."""
        origins: list[int | None] = []
        if partitions is None:
            offsets, self._uncommitted = self._uncommitted, {}
            origins, self._uncommitted_origins = self._uncommitted_origins, []
        else:
            offsets = {tp: o for tp, o in self._uncommitted.items() if tp in partitions}
            for tp in offsets:
                del self._uncommitted[tp]
        if not offsets:
            return
        self._committed_at = time.monotonic()
        try:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=False,
            )
        except KafkaException as exc:
            # A rebalance took the partitions: the new owner replays, which is idempotent.
            self._metrics.errors.labels(kind="commit").inc()
            log.warning("offset_commit_failed", error=str(exc))
            return
        # feed.stages' `committed`: the records whose offsets this commit carried
        self._metrics.stages.observe_since("committed", origins, now_ms())

    def _maybe_report_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < _LAG_EVERY_S or not self._assignment:
            return
        self._last_lag = now
        s = self._settings
        try:
            lag = measure_lag(
                s.kafka_bootstrap,
                s.kafka_group,
                [s.topic_activities, s.topic_follows],
                timeout=2.0,
                consumer=self._consumer,
            )
        except (KafkaException, KafkaUnavailable) as exc:
            log.warning("lag_measurement_failed", error=str(exc))
            return
        for row in lag.partitions:
            if row.lag is not None:
                self._metrics.lag.labels(topic=row.topic, partition=str(row.partition)).set(row.lag)
        self._metrics.lag_sum.set(lag.total)


def _record_spans(
    messages: Sequence[Any], consumed_ms: float
) -> tuple[list[Any], list[str | None]]:
    """A span per record, the child of the trace context its headers carry (a new trace if none):
    the sampled ones, and by record index the ``traceparent`` its frames carry (None if not
    sampled). They start when the batch was consumed and end with it (:func:`_batch_span`)."""
    from opentelemetry.trace import SpanKind

    tracer = tracing.tracer()
    start = int(consumed_ms * 1_000_000)
    spans: list[Any] = []
    traces: list[str | None] = [None] * len(messages)
    for index, message in enumerate(messages):
        if message.error() is not None:
            continue
        topic = message.topic()
        span = tracer.start_span(
            f"{topic} process",
            context=tracing.header_context(message.headers()),
            kind=SpanKind.CONSUMER,
            start_time=start,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.destination.name": topic,
                "messaging.destination.partition.id": str(message.partition()),
                "messaging.kafka.offset": message.offset(),
            },
        )
        if span.is_recording():
            spans.append(span)
            traces[index] = tracing.span_traceparent(span)
    return spans, traces


def _batch_span(batch: _Batch, stats: BatchStats) -> Any:
    """The span of a batch with sampled records, and its steps' spans (``stats.phases``) under it.

    It is the child of the first sampled record's span; a batch that carries more traces links to
    their record spans, and each of them links back to it, so every trace leads to the batch's
    store writes. Not ended here (the caller logs inside it first)."""
    from opentelemetry.trace import Link, set_span_in_context

    tracer = tracing.tracer()
    first, *others = batch.spans
    span = tracer.start_span(
        "fanout batch",
        context=set_span_in_context(first),
        links=[Link(other.get_span_context()) for other in others],
        start_time=int(batch.consumed_ms * 1_000_000),
        attributes={
            "feed.records": len(batch.messages),
            "feed.activities": stats.activities,
            "feed.inserted": stats.inserted,
            "feed.pushed": stats.pushed,
            "feed.dlq": batch.dlq,
        },
    )
    for other in others:
        other.add_link(span.get_span_context())
    parent = set_span_in_context(span)
    for name, started, ended in stats.phases:
        tracer.start_span(name, context=parent, start_time=started).end(end_time=ended)
    return span


def _safe_probe(probe: Callable[[], bool]) -> bool:
    try:
        return bool(probe())
    except Exception:
        return False


def _stores_probe(
    settings: Settings, cluster: Any, redis_cluster: bool = False
) -> Callable[[], bool]:
    """Cheap reachability check of both stores (see the module doc: the half-open probe)."""
    client = redis_connect.sync_client(
        settings, cluster=redis_cluster, socket_timeout=1, socket_connect_timeout=1
    )

    def probe() -> bool:
        try:
            if redis_cluster:
                # A PING reaches one node, which answers while another master is down. So: the
                # slot map read again (a promoted replica replaces its master there), then every
                # primary in it. Down from the kill of a master until its replica is promoted, so
                # the retry comes within a probe of the promotion, not a whole back-off later.
                client.nodes_manager.initialize()
                for node in client.get_primaries():
                    client.get_redis_connection(node).ping()
            else:
                client.ping()
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException):
            return False
        return any(host.is_up for host in cluster.metadata.all_hosts())

    return probe


def _with_rejected(total: BatchStats, prepared: BatchStats) -> BatchStats:
    """The record-by-record result, keeping what the first pass counted in Cassandra."""
    total.history_rows = max(total.history_rows, prepared.history_rows)
    return total


def _merge(total: BatchStats, stats: BatchStats) -> None:
    for name in (
        "activities",
        "deletes",
        "follows",
        "inserted",
        "pushed",
        "history_rows",
        "notified",
    ):
        setattr(total, name, getattr(total, name) + getattr(stats, name))
    total.rejected.extend(stats.rejected)


def _names(partitions: list[TopicPartition]) -> list[str]:
    return [f"{p.topic}/{p.partition}" for p in partitions]


def build_worker(
    settings: Settings,
    metrics: WorkerMetrics | None = None,
    *,
    after_apply: Callable[[], None] | None = None,
) -> Worker:
    """Open the stores and the Kafka clients named by ``settings``."""
    session = open_cassandra(settings)  # reconnects every <= 5 s for as long as an outage lasts
    # One Redis or a Redis Cluster (FEED_REDIS_CLUSTER): the stores cut their calls by slot.
    cluster = redis_connect.cluster_at_start(settings)
    client = redis_connect.sync_client(
        settings,
        cluster=cluster,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
    )
    graph = CassandraFollowGraph(session, settings.cassandra_keyspace)
    history = CassandraHistory(session, settings.cassandra_keyspace)
    # On a cluster: a batch counts once a replica has its writes (FEED_REDIS_WAIT_REPLICAS)
    wait = {
        "wait_replicas": settings.redis_wait_replicas,
        "wait_timeout_ms": settings.redis_wait_timeout_ms,
    }
    timelines = RedisTimelines(
        client,
        timeline_max=settings.timeline_max,
        stream_history=settings.stream_history,
        body_ttl_s=settings.body_ttl_days * 86_400,
        only_active=settings.active_days > 0,
        **wait,
    )
    versions = RedisGraphVersions(client, **wait)
    notifications = NotifyRedis(
        client,
        CassandraNotifyStore(session, settings.cassandra_keyspace),
        limits=settings.notify_limits(),
        ttl_s=settings.notify_ttl_s,
        **wait,
    )
    processor = Processor(
        timelines=timelines,
        history=history,
        graph=graph,
        versions=versions,
        followers=FollowerCache(
            graph, versions, history=history, fanout_limit=settings.fanout_limit
        ),
        history_timelines=settings.fanout_history,
        follow_backfill=settings.follow_backfill,
        tombstone_ttl_s=settings.body_ttl_days * 86_400,
        notifications=notifications,
    )

    def processor_for(tenant: Tenant) -> Processor:
        """A tenant's processor: its views of the same stores, its timeline cap, its own
        follower cache (another tenant's: a tenth of the default's bound, most are small)."""
        tid = tenant.id
        limits = tenant.quotas.effective(settings)
        t_graph, t_versions = graph.for_tenant(tid), versions.for_tenant(tid)
        t_history = history.for_tenant(tid)
        return processor.with_stores(
            timelines=timelines.for_tenant(tid, timeline_max=limits.timeline_max),
            history=t_history,
            graph=t_graph,
            versions=t_versions,
            followers=FollowerCache(
                t_graph,
                t_versions,
                history=t_history,
                fanout_limit=settings.fanout_limit,
                max_entries=2_000_000 if tid == DEFAULT else 200_000,
            ),
            notifications=notifications.for_tenant(tid),
        )

    registry = TenantCache(
        CassandraTenants(
            session, settings.cassandra_keyspace, rotate_grace_s=settings.tenant_rotate_grace_s
        ),
        settings.tenant_refresh_s,
        settings=settings,
    )
    # librdkafka's own lines through stdlib logging: JSON like every other line (feed.logging)
    librdkafka = logging.getLogger("librdkafka")
    consumer = Consumer(consumer_config(settings, logger=librdkafka))
    dead_letters = DeadLetters.from_config(
        dead_letter_producer_config(settings, logger=librdkafka), settings.topic_dlq
    )
    worker = Worker(
        settings,
        consumer=consumer,
        processor=processor,
        dead_letters=dead_letters,
        metrics=metrics or WorkerMetrics(),
        after_apply=after_apply,
        probe=_stores_probe(settings, session.cluster, cluster),
        tenants=registry,
        processor_for=processor_for,
        quota=FanoutQuota(client),
        spill=DeadLetters.from_config(
            dead_letter_producer_config(settings, logger=librdkafka), settings.topic_deferred
        ),
        deferred=Consumer(
            consumer_config(
                settings,
                logger=librdkafka,
                **{
                    "group.id": settings.kafka_group + ".deferred",
                    # Idle most of the time: a fetch held for up to 1 s instead of every 10 ms
                    # (the main consumer's) keeps it from costing the worker CPU; its records
                    # wait for their tenant's tokens anyway. Measured with the 10 ms of the
                    # main consumer: the worker's inserts per CPU second fell 14 % (feed bench
                    # fanout, redis_only).
                    "fetch.wait.max.ms": 1000,
                },
            )
        ),
    )
    worker.redis_cluster = cluster
    return worker


def install_signal_handlers(stop: Callable[[], None]) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())
