"""The ``e2e`` scenario: Kafka → ``feed fanout`` → Redis → ``feed gateway`` → WebSocket.

Followers of the uniform graph (the first ``e2e_clients`` users) connect to ``/v1/stream`` of a
``feed gateway`` subprocess with JWTs minted by :func:`gateway.auth.mint_token`. Activities are
produced straight to Kafka at a steady offered rate (a paced producer thread) for
``e2e_seconds``; each carries ``extra.bench_sent`` (wall clock at produce time, same machine).
Every ``activity`` frame received gives one publish→receive latency; the deliveries expected are
computed from the graph (connected followers of each actor), so loss and duplicates are counted.

If the gateway cannot be started or connected to, the scenario ends with status ``failed`` and
the error (and the tail of the gateway's log) in the report; the rest of the bench goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from datetime import UTC, datetime
from typing import Any

import msgspec

from bench.context import BenchContext
from bench.graphs import FollowGraph
from bench.load import WorkerSet, activity_bytes, new_producer
from bench.processes import cpu_seconds, free_port, rss_bytes, wait_http

__all__ = ["run"]

_decoder = msgspec.json.Decoder()
_CONNECT_CONCURRENCY = 50
_GRACE_S = 10.0
#: Id prefix of the activities of the warm-up (the worker's caches filling, the first batches).
_WARMUP = "e2e-warmup-"


def run(ctx: BenchContext) -> dict[str, Any]:
    from bench.fanout import ensure_graph_loaded

    plan = ctx.plan
    # Per-follower Cassandra rows are off by default, as in the fan-out scenario's Redis-tier
    # figure: at 500 activities/s they are 50,000 rows/s, twice the raw insert ceiling of the
    # single Cassandra 2.1 node on this machine, and would measure Cassandra, not delivery.
    history = ctx.options.e2e_history
    result: dict[str, Any] = {
        "status": "ok",
        "history": history,
        "offered_activities_per_s": plan.e2e_rate,
        "clients": plan.e2e_clients,
        "seconds": plan.e2e_seconds,
        "config": "gateway: uvicorn, one process, websockets defaults (no compression "
        "negotiated by the bench client); worker: per-follower history rows "
        + ("on" if history else "off (FEED_BENCH_E2E_HISTORY=1 turns them on)")
        + "; every follower active",
    }
    try:
        from gateway.auth import mint_token
    except ImportError as exc:
        result.update(status="failed", error=f"gateway.auth is not importable: {exc}")
        ctx.error("e2e", result["error"])
        return result
    graph = ensure_graph_loaded(ctx, "uniform")
    topic = "bench.e2e.activities"
    ctx.create_topics([topic])
    workers = WorkerSet(ctx, "e2e", topic, 1, history=history).start()
    port = free_port()
    env = dict(ctx.env)
    env.update(
        FEED_GATEWAY_PORT=str(port),
        FEED_TOPIC_ACTIVITIES=topic,
        FEED_ACTIVE_DAYS="0",
        FEED_GATEWAY_HOST="127.0.0.1",
    )
    log = ctx.logs_dir() / "gateway-e2e.log"
    gateway = ctx.children.feed(["gateway"], env=env, log=log)
    try:
        with ctx.task("e2e: start the gateway and a worker", None):
            if not wait_http(f"http://127.0.0.1:{port}/healthz", 60, gateway):
                raise RuntimeError(
                    f"the gateway did not answer /healthz within 60s "
                    f"(exit code {gateway.poll()}); log tail: {_tail(log)}"
                )
            if not workers.wait_http(60):
                raise RuntimeError("the fan-out worker did not start (see logs/)")
            _wait_assigned(ctx, workers)
        secret = ctx.settings.require_jwt()
        users = list(range(min(plan.e2e_clients, graph.users)))
        tokens = {u: mint_token(secret, graph.user(u), 3600) for u in users}
        measured = asyncio.run(_drive(ctx, graph, topic, port, tokens, gateway.pid))
        result.update(measured)
        if measured.get("connected", 0) < len(users):
            result["status"] = "partial"
    except Exception as exc:
        result["status"] = "failed"
        result["error"] = f"{type(exc).__name__}: {exc}"
        ctx.error("e2e", result["error"])
    finally:
        ctx.children.stop(gateway, timeout=20)
        workers.stop()
    return result


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


def _tail(path: Any, chars: int = 800) -> str:
    try:
        return str(path.read_text(errors="replace")[-chars:])
    except OSError:
        return "<no log>"


async def _drive(
    ctx: BenchContext,
    graph: FollowGraph,
    topic: str,
    port: int,
    tokens: dict[int, str],
    gateway_pid: int,
) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    plan = ctx.plan
    url = f"ws://127.0.0.1:{port}/v1/stream"
    received: list[tuple[float, float, str, int]] = []  # (recv wall, latency s, activity, user)
    connections: dict[int, Any] = {}
    errors: list[str] = []
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
                connections[user] = ws
            except Exception as exc:
                errors.append(f"{graph.user(user)}: {type(exc).__name__}: {exc}")

    async def reader(user: int, ws: Any) -> None:
        try:
            async for raw in ws:
                now = time.time()
                frame = _decoder.decode(raw)
                if frame.get("type") != "activity":
                    continue
                activity = frame.get("activity") or {}
                sent = (activity.get("extra") or {}).get("bench_sent")
                if isinstance(sent, (int, float)):
                    received.append((now, now - sent, str(activity.get("id")), user))
        except Exception:
            return

    with ctx.task(f"e2e: connect {len(tokens):,} WebSocket clients", len(tokens)) as update:
        openers = [asyncio.create_task(open_one(u)) for u in tokens]
        deadline = time.monotonic() + 120
        while any(not t.done() for t in openers) and time.monotonic() < deadline:
            update(completed=len(connections))
            await asyncio.sleep(0.2)
        for t in openers:
            t.cancel()
        update(completed=len(connections))
    if not connections:
        raise RuntimeError(f"no client could connect: {errors[:3]}")
    readers = [asyncio.create_task(reader(u, ws)) for u, ws in connections.items()]

    connected = set(connections)
    expected: dict[str, int] = {}
    sent_count = [0]
    stop = threading.Event()
    rng = random.Random(201)

    def producer_thread() -> None:
        producer = new_producer(ctx, **{"linger.ms": 1})
        t0 = time.monotonic()
        i = 0
        while not stop.is_set():
            elapsed = time.monotonic() - t0
            if elapsed >= warmup_s + plan.e2e_seconds:
                break
            due = int(elapsed * plan.e2e_rate) - i
            for _ in range(max(0, due)):
                actor = rng.randrange(graph.users)
                # the warm-up's activities count for loss, not for the latency figures
                activity_id = f"{_WARMUP}{i}" if elapsed < warmup_s else f"e2e-{i}"
                reach = sum(1 for f in graph.followers(actor) if f in connected)
                expected[activity_id] = reach
                value = activity_bytes(
                    activity_id,
                    graph.user(actor),
                    datetime.now(UTC),
                    extra={"bench_sent": time.time()},
                )
                for _attempt in range(100):  # bounded: ~1 s of a full local queue
                    try:
                        producer.produce(topic, value=value, key=graph.user(actor).encode())
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
    warmup_s = plan.e2e_warmup_s
    total_s = warmup_s + plan.e2e_seconds
    with ctx.task(
        f"e2e: {plan.e2e_rate:g} activities/s for {warmup_s:g}s (warm-up) + {plan.e2e_seconds:g}s",
        total_s,
    ) as update:
        started_wall = time.time()
        cpu_start = cpu_seconds(gateway_pid)
        thread = threading.Thread(target=producer_thread, name="e2e-producer", daemon=True)
        thread.start()
        t0 = time.monotonic()
        while thread.is_alive() and time.monotonic() - t0 < total_s + 30:
            await asyncio.sleep(0.5)
            update(completed=min(total_s, time.monotonic() - t0))
            rss = rss_bytes(gateway_pid)
            if rss:
                rss_samples.append(rss)
        stop.set()
        thread.join(timeout=20)
        total_expected = sum(expected.values())
        grace_end = time.monotonic() + _GRACE_S
        while len(received) < total_expected and time.monotonic() < grace_end:
            await asyncio.sleep(0.2)
        cpu_end = cpu_seconds(gateway_pid)
    gateway_cpu = (cpu_end - cpu_start) if cpu_start is not None and cpu_end is not None else None
    for ws in connections.values():
        with contextlib.suppress(Exception):  # closing is best effort
            await asyncio.wait_for(ws.close(), 5)
    for t in readers:
        t.cancel()
    await asyncio.gather(*readers, return_exceptions=True)

    unique = {(activity, user) for _, _, activity, user in received}
    latencies = sorted(
        latency * 1000 for _, latency, activity, _ in received if not activity.startswith(_WARMUP)
    )
    warmup = sorted(
        latency * 1000 for _, latency, activity, _ in received if activity.startswith(_WARMUP)
    )
    total_expected = sum(expected.values())
    span = (max((r[0] for r in received), default=started_wall) - started_wall) or 1.0
    return {
        "connected": len(connections),
        "connect_errors": errors[:10],
        "activities_sent": sent_count[0],
        "expected_deliveries": total_expected,
        "delivered": len(unique),
        "duplicates": len(received) - len(unique),
        "lost": max(0, total_expected - len(unique)),
        "loss_ratio": (max(0, total_expected - len(unique)) / total_expected)
        if total_expected
        else None,
        "delivered_per_s": len(received) / span,
        "expected_per_s": total_expected / total_s if total_s else None,
        "latency_ms": {
            "p50": _pct(latencies, 0.50),
            "p95": _pct(latencies, 0.95),
            "p99": _pct(latencies, 0.99),
            "p999": _pct(latencies, 0.999),
            "max": latencies[-1] if latencies else None,
        },
        "latency_series": _series(received, started_wall),
        "warmup_s": warmup_s,
        "warmup_latency_ms": {
            "p50": _pct(warmup, 0.50),
            "p99": _pct(warmup, 0.99),
            "max": warmup[-1] if warmup else None,
        },
        "gateway_rss_mb": max(rss_samples) / 2**20 if rss_samples else None,
        "gateway_cpu_s": gateway_cpu,
        "deliveries_per_gateway_cpu_s": len(received) / gateway_cpu if gateway_cpu else None,
    }


def _pct(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _series(received: list[tuple[float, float, str, int]], start: float) -> list[dict[str, float]]:
    """p50/p95/p99/max latency per second of receive time."""
    buckets: dict[int, list[float]] = {}
    for recv, latency, _, _ in received:
        buckets.setdefault(int(recv - start), []).append(latency * 1000)
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
