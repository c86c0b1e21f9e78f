"""Prometheus metrics of one gateway process, in a registry of their own.

Each :class:`GatewayMetrics` owns a ``CollectorRegistry`` (not the global one), so several apps in
one process (tests) do not collide and ``GET /metrics`` shows exactly the gateway's series.

``feed_delivery_latency_seconds`` is the product's headline figure: from the activity's Kafka
record timestamp (HTTP ingest: the time it accepted the request) to the socket write of each live
delivery, read from the ``ts`` the worker puts at the end of every activity frame
(``schemas.frames.frame_ts_ms``). ``feed_stage_latency_seconds{stage="received"}`` is the same
origin to the Pub/Sub message's arrival (``feed.stages`` lists every stage of both processes).
Frames replayed to a connection that was not open yet when the activity entered the pipeline (a
resume) are not counted: their wait is the client's absence, not the pipeline's.

``feed_gateway_push_latency_seconds`` measures *queue-to-socket*: from the moment a frame is handed
to a connection (Pub/Sub message received, or history read answered) until the socket accepted it.

``feed_event_loop_lag_seconds`` is how late the event loop wakes a task that slept a fixed
interval (:meth:`GatewayMetrics.watch_loop`): every frame, ping and request of the process waits at
least that long. The registry also holds the process and platform collectors of
``prometheus_client`` (``process_*``: RSS, CPU, open fds; ``python_gc_*``; ``python_info``).

``feed_gateway_gc_pause_seconds`` times the process's garbage collections (once
:meth:`GatewayMetrics.watch_gc` is called; the app does it while it is open): a full collection
walks every object the process tracks, so its pause grows with the number of connections.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from feed import tracing
from feed.metrics import process_collectors
from feed.stages import StageHistogram

__all__ = ["LOOP_LAG_INTERVAL_S", "GatewayMetrics"]

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_GC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: How often the loop-lag probe sleeps and measures how late it woke.
LOOP_LAG_INTERVAL_S = 0.25


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "feed_gateway_connections", "Open WebSocket connections.", registry=r
        )
        self.messages_pushed = Counter(
            "feed_gateway_messages_pushed",
            "Frames written to WebSocket clients (welcome, activity, removed, reset).",
            registry=r,
        )
        self.push_latency = Histogram(
            "feed_gateway_push_latency_seconds",
            "Queue-to-socket latency of pushed frames.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_latency = StageHistogram(
            "feed_delivery_latency_seconds",
            "Time from an activity's Kafka record timestamp (or ingest time) to the socket write "
            "of each live delivery.",
            registry=r,
        )
        self.stages = StageHistogram(
            "feed_stage_latency_seconds",
            "Time from an activity's Kafka record timestamp to a stage of its delivery in the "
            "gateway (received: the Pub/Sub message arrived).",
            label="stage",
            values=("received",),
            registry=r,
        )
        self.activities_delivered = Counter(
            "feed_activities_delivered",
            "Activity frames written to WebSocket clients (live and replayed by a resume).",
            registry=r,
        )
        self.slow_client_closes = Counter(
            "feed_gateway_slow_client_closes",
            "Connections closed with 4008 because their send queue exceeded its bound.",
            registry=r,
        )
        self.closes = Counter(
            "feed_gateway_closes",
            "WebSocket connections closed by the server, by close code.",
            ["code"],
            registry=r,
        )
        self.resets = Counter(
            "feed_gateway_resets",
            "Reset frames sent (a resume or gap that could not be served gap-free).",
            registry=r,
        )
        self.http_requests = Counter(
            "feed_gateway_http_requests",
            "HTTP requests by route template and status.",
            ["route", "status"],
            registry=r,
        )
        self.ingest_activities = Counter(
            "feed_ingest_activities",
            "Activities accepted over HTTP and produced to Kafka.",
            registry=r,
        )
        self.pubsub_connected = Gauge(
            "feed_gateway_pubsub_connected",
            "1 while the Redis Pub/Sub connection is up.",
            registry=r,
        )

        self.gc_pauses = Histogram(
            "feed_gateway_gc_pause_seconds",
            "Garbage collections of the gateway process and how long each stopped it, by "
            "generation (2 = full collection).",
            ["generation"],
            buckets=_GC_BUCKETS,
            registry=r,
        )
        self.gc_longest_pause = Gauge(
            "feed_gateway_gc_longest_pause_seconds",
            "Longest garbage collection since the gateway started, by generation.",
            ["generation"],
            registry=r,
        )
        self._gc_callback: Callable[[str, dict[str, Any]], None] | None = None
        self.loop_lag = Histogram(
            "feed_event_loop_lag_seconds",
            "How late the event loop woke a task that slept a fixed interval "
            f"({LOOP_LAG_INTERVAL_S} s): what every frame, ping and request waits at least.",
            buckets=_LOOP_LAG_BUCKETS,
            registry=r,
        )
        process_collectors(r)

    async def watch_loop(self, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
        """Measure the event loop's lag until cancelled (the app runs it while it is open)."""
        loop = asyncio.get_running_loop()
        observe = self.loop_lag.observe
        while True:
            started = loop.time()
            await asyncio.sleep(interval_s)
            observe(max(0.0, loop.time() - started - interval_s))

    def watch_gc(self) -> None:
        """Time every garbage collection of the process (until :meth:`unwatch_gc`)."""
        if self._gc_callback is not None:
            return
        pauses = [self.gc_pauses.labels(str(g)) for g in range(3)]
        longest = [self.gc_longest_pause.labels(str(g)) for g in range(3)]
        maxima = [0.0, 0.0, 0.0]
        started = 0.0

        def callback(phase: str, info: dict[str, Any]) -> None:
            # Collections do not nest (they hold the GIL), so one start time is enough.
            nonlocal started
            if phase == "start":
                started = time.perf_counter()
                return
            seconds = time.perf_counter() - started
            generation = int(info.get("generation", 2))
            pauses[generation].observe(seconds)
            if seconds > maxima[generation]:
                maxima[generation] = seconds
                longest[generation].set(seconds)

        self._gc_callback = callback
        gc.callbacks.append(callback)

    def unwatch_gc(self) -> None:
        callback, self._gc_callback = self._gc_callback, None
        if callback is not None and callback in gc.callbacks:
            gc.callbacks.remove(callback)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The registry's exposition and its content type. While the gateway traces, a scraper
        that accepts OpenMetrics (Prometheus does) gets it, with the delivery latency's exemplars
        (trace ids); otherwise the classic text format."""
        if tracing.ENABLED and "application/openmetrics-text" in accept:
            from prometheus_client.openmetrics.exposition import (
                CONTENT_TYPE_LATEST as OPENMETRICS,
            )
            from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

            body: bytes = openmetrics(self.registry)  # type: ignore[no-untyped-call]
            return body, OPENMETRICS
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
