"""The ``e2e`` scenario: Kafka → ``feed fanout`` → Redis → ``feed gateway`` → WebSocket, swept
over offered rates, with the latency of every stage on the way.

Followers of the uniform graph (the first ``e2e_clients`` users) connect to ``/v1/stream`` of a
``feed gateway`` subprocess with JWTs minted by :func:`gateway.auth.mint_token`. For each offered
rate of ``plan.e2e_rates`` (activities/s), a paced producer thread produces straight to Kafka for
a warm-up and then ``e2e_seconds``; the connections stay open from one rate to the next. The
sweep runs with per-follower Cassandra rows off and then on (``FEED_BENCH_E2E_HISTORY`` picks
one), each with a fresh worker, gateway and topic.

Before the clients connect, one activity per user warms the worker's follower cache (see
:func:`_warm_follower_cache`). Each activity carries ``extra.bench_sent`` (wall clock at produce
time, same machine) and its Kafka record the same instant as its timestamp (whole ms). Per rate
the report gives:

* the publish→read latency of every delivery (p50/p95/p99/max, from ``bench_sent``), and the
  deliveries expected from the graph (connected followers of each actor), so loss and
  duplicates are counted;
* the latency of each stage (``feed.stages``), all from the record timestamp: ``consumed``,
  ``durable``, ``published`` (the worker's ``feed_stage_latency_seconds``), ``received`` and
  ``written`` (the gateway's, ``written`` being ``feed_delivery_latency_seconds``), and ``read``
  (the client, from the frame's ``ts``). The servers' stages come from their histograms (the
  difference between a scrape at the end of the warm-up and one at the end, interpolated inside
  1 ms buckets below 20 ms); the client's are exact;
* each process's CPU over the measured window, in cores: the Kafka-protocol test broker, Redis,
  Cassandra, the worker, the gateway and the bench itself (the load generator: the producer and
  the WebSocket clients), so the share of the test rig is plain.

The scenario ends with the highest rate whose p99 stayed under 100 ms with nothing lost or
repeated, per history mode. If the gateway cannot be started or connected to, that sweep ends
with status ``failed`` and the error (and the tail of the gateway's log) in the report; the rest
of the bench goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from bench.context import BenchContext
from bench.graphs import FollowGraph
from bench.load import WorkerSet, activity_bytes, new_producer, percentile_from_buckets
from bench.processes import (
    cpu_seconds,
    free_port,
    histogram_buckets,
    read_metrics,
    rss_bytes,
    wait_http,
)

__all__ = ["STAGES", "run"]

_decoder = msgspec.json.Decoder()
_CONNECT_CONCURRENCY = 50
_GRACE_S = 10.0
#: The p99 bound of the sweep's headline figure.
P99_BOUND_MS = 100.0
#: The stages of one delivery, in order: (name, where it is measured, metric, stage label).
STAGES: tuple[tuple[str, str, str, str | None], ...] = (
    ("consumed", "worker", "feed_stage_latency_seconds", "consumed"),
    ("durable", "worker", "feed_stage_latency_seconds", "durable"),
    ("published", "worker", "feed_stage_latency_seconds", "published"),
    ("received", "gateway", "feed_stage_latency_seconds", "received"),
    ("written", "gateway", "feed_delivery_latency_seconds", None),
    ("read", "client", "", None),
)


def run(ctx: BenchContext) -> dict[str, Any]:
    from bench.fanout import ensure_graph_loaded

    plan = ctx.plan
    modes = (False, True) if ctx.options.e2e_history is None else (ctx.options.e2e_history,)
    result: dict[str, Any] = {
        "status": "ok",
        "rates": list(plan.e2e_rates),
        "clients": plan.e2e_clients,
        "seconds": plan.e2e_seconds,
        "warmup_s": plan.e2e_warmup_s,
        "config": "gateway: uvicorn, one process, websockets defaults (no compression "
        "negotiated by the bench client); one worker; every follower active; per-follower "
        "history rows " + ("off, then on" if len(modes) == 2 else ("on" if modes[0] else "off")),
        "runs": [],
        "errors": [],
    }
    try:
        from gateway.auth import mint_token
    except ImportError as exc:
        result.update(status="failed", error=f"gateway.auth is not importable: {exc}")
        ctx.error("e2e", result["error"])
        return result
    graph = ensure_graph_loaded(ctx, "uniform")
    secret = ctx.settings.require_jwt()
    users = list(range(min(plan.e2e_clients, graph.users)))
    tokens = {u: mint_token(secret, graph.user(u), 3600) for u in users}
    for history in modes:
        try:
            result["runs"] += _sweep(ctx, graph, tokens, history)
        except Exception as exc:
            message = f"history {'on' if history else 'off'}: {type(exc).__name__}: {exc}"
            result["errors"].append(message)
            result["status"] = "failed"
            ctx.error("e2e", message)
    runs: list[dict[str, Any]] = result["runs"]
    short = [r for r in runs if not r.get("skipped") and r.get("connected", 0) < len(users)]
    if short and result["status"] == "ok":
        result["status"] = "partial"
    result["max_rate_p99_under_100ms"] = {
        ("on" if history else "off"): _max_rate_within(runs, history) for history in modes
    }
    headline = _headline(runs)
    if headline is not None:
        # The figures other parts of the report read (the capacity model, the latency plot).
        for key in (
            "latency_ms",
            "latency_series",
            "deliveries_per_gateway_cpu_s",
            "gateway_rss_mb",
            "offered_activities_per_s",
            "delivered",
            "expected_deliveries",
            "loss_ratio",
            "history",
        ):
            result[key] = headline.get(key)
    return result


def _max_rate_within(runs: list[dict[str, Any]], history: bool) -> float | None:
    """The highest offered rate whose p99 stayed under the bound with nothing lost or repeated
    (rates above a failing one do not count: the figure is where the sweep first breaks)."""
    best = None
    for row in sorted((r for r in runs if r["history"] == history), key=lambda r: r["rate"]):
        if row.get("skipped"):
            break
        p99 = (row.get("latency_ms") or {}).get("p99")
        if p99 is None or p99 >= P99_BOUND_MS or row.get("lost") or row.get("duplicates"):
            break
        best = row["rate"]
    return best


def _headline(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    measured = [r for r in runs if not r.get("skipped")]
    off = [r for r in measured if not r["history"]] or measured
    if not off:
        return None
    at_250 = [r for r in off if r["rate"] == 250.0]
    return at_250[0] if at_250 else off[-1]


def _sweep(
    ctx: BenchContext, graph: FollowGraph, tokens: dict[int, str], history: bool
) -> list[dict[str, Any]]:
    mode = "history" if history else "redis"
    topic = f"bench.e2e.{mode}.activities"
    ctx.create_topics([topic])
    workers = WorkerSet(ctx, f"e2e-{mode}", topic, 1, history=history).start()
    port = free_port()
    env = dict(ctx.env)
    env.update(
        FEED_GATEWAY_PORT=str(port),
        FEED_TOPIC_ACTIVITIES=topic,
        FEED_ACTIVE_DAYS="0",
        FEED_GATEWAY_HOST="127.0.0.1",
    )
    log = ctx.logs_dir() / f"gateway-e2e-{mode}.log"
    gateway = ctx.children.feed(["gateway"], env=env, log=log)
    try:
        with ctx.task(f"e2e ({mode}): start the gateway and a worker", None):
            if not wait_http(f"http://127.0.0.1:{port}/healthz", 60, gateway):
                raise RuntimeError(
                    f"the gateway did not answer /healthz within 60s "
                    f"(exit code {gateway.poll()}); log tail: {_tail(log)}"
                )
            if not workers.wait_http(60):
                raise RuntimeError("the fan-out worker did not start (see logs/)")
            _wait_assigned(ctx, workers)
        _warm_follower_cache(ctx, graph, topic, workers)
        rig = _Rig(ctx, graph, topic, port, workers, gateway.pid, history)
        return asyncio.run(rig.sweep(tokens))
    finally:
        ctx.children.stop(gateway, timeout=20)
        workers.stop()


def _wait_assigned(ctx: BenchContext, workers: WorkerSet, timeout: float = 60.0) -> None:
    from bench.processes import metric_sum

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(metric_sum(t, "feed_assigned_partitions") for t in workers.scrape()) >= (
            ctx.settings.kafka_partitions
        ):
            return
        time.sleep(0.2)
    raise TimeoutError("the fan-out worker did not join its group within 60s")


def _warm_follower_cache(
    ctx: BenchContext, graph: FollowGraph, topic: str, workers: WorkerSet
) -> None:
    """One activity per user of the graph, before any client connects, applied in full: the
    worker's follower cache then holds every actor's followers, as a running worker's holds
    those of the actors who post. (A fresh worker reads each actor's followers from Cassandra on
    its first activity: with uniformly random actors over 10,000 users, most of a 25 s step
    would measure that cold start, not the steady state the sweep is about.)"""
    from bench.load import produce
    from bench.processes import metric_sum

    actors = [graph.user(u) for u in range(graph.users)]
    inserts = sum(len(graph.followers(u)) for u in range(graph.users))
    with ctx.task(f"e2e: warm the worker's follower cache ({len(actors):,} actors)", None):
        before = sum(metric_sum(t, "feed_timeline_inserts_total") for t in workers.scrape())
        produce(ctx, topic, actors, prefix=f"{topic}-warm")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            done = sum(metric_sum(t, "feed_timeline_inserts_total") for t in workers.scrape())
            if done - before >= inserts:  # every follower has it: the backlog is drained
                return
            time.sleep(0.2)
    raise TimeoutError("the worker did not apply the cache warm-up within 180s")


def _tail(path: Any, chars: int = 800) -> str:
    try:
        return str(path.read_text(errors="replace")[-chars:])
    except OSError:
        return "<no log>"


@dataclass
class _Delivery:
    recv: float  # wall clock at the client's read
    latency_s: float  # from bench_sent
    read_ms: float | None  # from the frame's ts (the servers' origin)
    activity: str
    user: int


@dataclass
class _Step:
    """What the readers collect during one offered rate."""

    prefix: str
    received: list[_Delivery] = field(default_factory=list)


class _Rig:
    """One gateway and one worker, the connected clients, and the steps of the sweep."""

    def __init__(
        self,
        ctx: BenchContext,
        graph: FollowGraph,
        topic: str,
        port: int,
        workers: WorkerSet,
        gateway_pid: int,
        history: bool,
    ) -> None:
        self.ctx = ctx
        self.graph = graph
        self.topic = topic
        self.port = port
        self.workers = workers
        self.gateway_pid = gateway_pid
        self.history = history
        self.step: _Step | None = None
        self.connections: dict[int, Any] = {}
        self.errors: list[str] = []
        stack = ctx.stack
        self.pids: dict[str, list[int]] = {
            "broker": _pid_of(getattr(stack, "kafka", None)),
            "redis": _pid_of(getattr(stack, "redis", None)),
            "cassandra": _pid_of(getattr(stack, "cassandra", None)),
            "worker": workers.pids(),
            "gateway": [gateway_pid],
            "bench": [os.getpid()],
        }

    async def sweep(self, tokens: dict[int, str]) -> list[dict[str, Any]]:
        await self._connect(tokens)
        readers = [asyncio.create_task(self._reader(u, ws)) for u, ws in self.connections.items()]
        rows: list[dict[str, Any]] = []
        try:
            for rate in self.ctx.plan.e2e_rates:
                if rows and _overwhelmed(rows[-1]):
                    # A higher rate can only do worse, and would start behind the backlog.
                    rows.append({"history": self.history, "rate": rate, "skipped": True})
                    continue
                rows.append(await self._run_rate(rate))
        finally:
            for ws in self.connections.values():
                with contextlib.suppress(Exception):  # closing is best effort
                    await asyncio.wait_for(ws.close(), 5)
            for t in readers:
                t.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        return rows

    async def _connect(self, tokens: dict[int, str]) -> None:
        from websockets.asyncio.client import connect

        url = f"ws://127.0.0.1:{self.port}/v1/stream"
        semaphore = asyncio.Semaphore(_CONNECT_CONCURRENCY)

        async def open_one(user: int) -> None:
            async with semaphore:
                try:
                    ws = await asyncio.wait_for(
                        connect(
                            url,
                            additional_headers={"Authorization": f"Bearer {tokens[user]}"},
                            compression=None,
                            max_size=2**20,
                            open_timeout=20,
                        ),
                        30,
                    )
                    first = _decoder.decode(await asyncio.wait_for(ws.recv(), 20))
                    if not isinstance(first, dict) or first.get("type") != "welcome":
                        raise RuntimeError(f"first frame was {str(first)[:100]}")
                    self.connections[user] = ws
                except Exception as exc:
                    self.errors.append(f"{self.graph.user(user)}: {type(exc).__name__}: {exc}")

        with self.ctx.task(f"e2e: connect {len(tokens):,} WebSocket clients", len(tokens)) as up:
            openers = [asyncio.create_task(open_one(u)) for u in tokens]
            deadline = time.monotonic() + 120
            while any(not t.done() for t in openers) and time.monotonic() < deadline:
                up(completed=len(self.connections))
                await asyncio.sleep(0.2)
            for t in openers:
                t.cancel()
            up(completed=len(self.connections))
        if not self.connections:
            raise RuntimeError(f"no client could connect: {self.errors[:3]}")

    async def _reader(self, user: int, ws: Any) -> None:
        try:
            async for raw in ws:
                now = time.time()
                frame = _decoder.decode(raw)
                if frame.get("type") != "activity":
                    continue
                activity = frame.get("activity") or {}
                sent = (activity.get("extra") or {}).get("bench_sent")
                step = self.step
                if step is None or not isinstance(sent, (int, float)):
                    continue
                ts = frame.get("ts")
                step.received.append(
                    _Delivery(
                        now,
                        now - sent,
                        now * 1000 - ts if isinstance(ts, int) else None,
                        str(activity.get("id")),
                        user,
                    )
                )
        except Exception:
            return

    def _snapshot(self) -> dict[str, Any]:
        cpu: dict[str, float | None] = {}
        for name, pids in self.pids.items():
            values = [cpu_seconds(pid) for pid in pids]
            cpu[name] = (
                sum(v for v in values if v is not None)
                if values and all(v is not None for v in values)
                else None
            )
        return {
            "wall": time.monotonic(),
            "cpu": cpu,
            "worker": self.workers.scrape(),
            "gateway": read_metrics(f"http://127.0.0.1:{self.port}/metrics"),
        }

    async def _run_rate(self, rate: float) -> dict[str, Any]:
        ctx, plan, graph = self.ctx, self.ctx.plan, self.graph
        mode = "history" if self.history else "redis"
        prefix = f"e2e-{mode}-{rate:g}-"
        warm_prefix = f"{prefix}warmup-"
        step = self.step = _Step(prefix)
        connected = set(self.connections)
        expected: dict[str, int] = {}
        sent_count = [0]
        stop = threading.Event()
        rng = random.Random(201)
        warmup_s = plan.e2e_warmup_s
        total_s = warmup_s + plan.e2e_seconds

        def producer_thread() -> None:
            producer = new_producer(ctx, **{"linger.ms": 1})
            t0 = time.monotonic()
            i = 0
            while not stop.is_set():
                elapsed = time.monotonic() - t0
                if elapsed >= total_s:
                    break
                due = int(elapsed * rate) - i
                for _ in range(max(0, due)):
                    actor = rng.randrange(graph.users)
                    # the warm-up's activities count for loss, not for the latency figures
                    activity_id = f"{warm_prefix}{i}" if elapsed < warmup_s else f"{prefix}{i}"
                    expected[activity_id] = sum(1 for f in graph.followers(actor) if f in connected)
                    sent = time.time()
                    value = activity_bytes(
                        activity_id, graph.user(actor), datetime.now(UTC), {"bench_sent": sent}
                    )
                    for _attempt in range(100):  # bounded: ~1 s of a full local queue
                        try:
                            producer.produce(
                                self.topic,
                                value=value,
                                key=graph.user(actor).encode(),
                                timestamp=int(sent * 1000),
                            )
                            break
                        except BufferError:
                            producer.poll(0.01)
                    else:
                        expected[activity_id] = 0  # never sent: expect nothing
                    i += 1
                producer.poll(0)
                time.sleep(0.002)
            producer.flush(15)
            sent_count[0] = i

        rss_samples: list[int] = []
        with ctx.task(
            f"e2e ({mode}): {rate:g} activities/s for {warmup_s:g}s (warm-up) + "
            f"{plan.e2e_seconds:g}s",
            total_s,
        ) as update:
            thread = threading.Thread(target=producer_thread, name="e2e-producer", daemon=True)
            started_wall = time.time()
            t0 = time.monotonic()
            thread.start()
            before: dict[str, Any] | None = None
            while thread.is_alive() and time.monotonic() - t0 < total_s + 30:
                await asyncio.sleep(0.25)
                if before is None and time.monotonic() - t0 >= warmup_s:
                    before = self._snapshot()
                update(completed=min(total_s, time.monotonic() - t0))
                rss = rss_bytes(self.gateway_pid)
                if rss:
                    rss_samples.append(rss)
            stop.set()
            thread.join(timeout=20)
            if before is None:
                before = self._snapshot()
            total_expected = sum(expected.values())
            grace_end = time.monotonic() + _GRACE_S
            while len(step.received) < total_expected and time.monotonic() < grace_end:
                await asyncio.sleep(0.1)
            after = self._snapshot()
        self.step = None
        return self._row(
            rate, step, expected, sent_count[0], before, after, rss_samples, started_wall
        )

    def _row(
        self,
        rate: float,
        step: _Step,
        expected: dict[str, int],
        sent: int,
        before: dict[str, Any],
        after: dict[str, Any],
        rss_samples: list[int],
        started_wall: float,
    ) -> dict[str, Any]:
        plan = self.ctx.plan
        received = [d for d in step.received if d.activity.startswith(step.prefix)]
        unique = {(d.activity, d.user) for d in received}
        measured = [d for d in received if "warmup-" not in d.activity]
        latencies = sorted(d.latency_s * 1000 for d in measured)
        total_expected = sum(expected.values())
        lost = max(0, total_expected - len(unique))
        wall = after["wall"] - before["wall"]
        cores: dict[str, float | None] = {}
        for name in self.pids:
            start, end = before["cpu"].get(name), after["cpu"].get(name)
            cores[name] = (end - start) / wall if start is not None and end is not None else None
        gateway_cpu = (cores.get("gateway") or 0.0) * wall
        return {
            "history": self.history,
            "rate": rate,
            "connected": len(self.connections),
            "connect_errors": self.errors[:10],
            "activities_sent": sent,
            "expected_deliveries": total_expected,
            "delivered": len(unique),
            "duplicates": len(received) - len(unique),
            "lost": lost,
            "loss_ratio": lost / total_expected if total_expected else None,
            "offered_activities_per_s": rate,
            "delivered_per_s": len(measured) / plan.e2e_seconds if plan.e2e_seconds else None,
            "latency_ms": _percentiles(latencies),
            "stages_ms": self._stages(before, after, measured),
            "cores": cores,
            "window_s": wall,
            "latency_series": _series(received, started_wall),
            "gateway_rss_mb": max(rss_samples) / 2**20 if rss_samples else None,
            "deliveries_per_gateway_cpu_s": len(measured) / gateway_cpu if gateway_cpu else None,
        }

    @staticmethod
    def _stages(
        before: dict[str, Any], after: dict[str, Any], measured: list[_Delivery]
    ) -> list[dict[str, Any]]:
        rows = []
        for name, where, metric, label in STAGES:
            if where == "client":
                values = sorted(d.read_ms for d in measured if d.read_ms is not None)
                p = _percentiles(values)
                rows.append({"stage": name, "where": where, "count": len(values), **p})
                continue
            delta = _histogram_delta(before[where], after[where], metric, label)
            count = delta[-1][1] if delta else 0.0
            rows.append(
                {
                    "stage": name,
                    "where": where,
                    "count": count,
                    "p50": _ms(percentile_from_buckets(delta, 0.50)),
                    "p99": _ms(percentile_from_buckets(delta, 0.99)),
                }
            )
        return rows


#: A rate whose p99 passed this (or that lost deliveries) ends the sweep of its history mode.
_OVERWHELMED_P99_MS = 2_000.0


def _overwhelmed(row: dict[str, Any]) -> bool:
    p99 = (row.get("latency_ms") or {}).get("p99")
    return bool(row.get("lost")) or p99 is None or p99 > _OVERWHELMED_P99_MS


def _histogram_delta(
    before: Any, after: Any, metric: str, label: str | None
) -> list[tuple[float, float]]:
    """Cumulative ``(le, count)`` of ``metric`` (its ``stage`` ``label``, if given) observed between
    two scrapes, each one text or a list of texts (several workers), summed."""
    old = _summed_buckets(before, metric, label)
    new = _summed_buckets(after, metric, label)
    return [(bound, count - old.get(bound, 0.0)) for bound, count in sorted(new.items())]


def _summed_buckets(texts: Any, metric: str, label: str | None) -> dict[float, float]:
    labels = {"stage": label} if label else None
    summed: dict[float, float] = {}
    for text in texts if isinstance(texts, list) else [texts]:
        for bound, count in histogram_buckets(text, metric, labels):
            summed[bound] = summed.get(bound, 0.0) + count
    return summed


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _pid_of(server: Any) -> list[int]:
    pid = getattr(server, "pid", None)
    return [pid] if isinstance(pid, int) else []


def _percentiles(ordered: list[float]) -> dict[str, float | None]:
    return {
        "p50": _pct(ordered, 0.50),
        "p95": _pct(ordered, 0.95),
        "p99": _pct(ordered, 0.99),
        "p999": _pct(ordered, 0.999),
        "max": ordered[-1] if ordered else None,
    }


def _pct(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _series(received: list[_Delivery], start: float) -> list[dict[str, float]]:
    """p50/p95/p99/max latency per second of receive time."""
    buckets: dict[int, list[float]] = {}
    for d in received:
        buckets.setdefault(int(d.recv - start), []).append(d.latency_s * 1000)
    rows = []
    for second in sorted(buckets):
        values = sorted(buckets[second])
        rows.append(
            {
                "t": float(second),
                "count": float(len(values)),
                "p50_ms": _pct(values, 0.50) or 0.0,
                "p95_ms": _pct(values, 0.95) or 0.0,
                "p99_ms": _pct(values, 0.99) or 0.0,
                "max_ms": values[-1],
            }
        )
    return rows
