"""The ``fanout`` scenario: timeline inserts/s of ``feed fanout`` beside its references.

Steps (sizes from :class:`bench.context.Plan`):

1. Graphs: uniform and skewed (:mod:`bench.graphs`); the follower lists of every user who
   posts are loaded straight into Cassandra's ``followers`` table. Meanwhile the
   Stream-Framework venv is installed (unless FEED_BENCH_SKIP_PEERS=1).
2. Ceilings on the same servers, measured while nothing else runs: ``redis-benchmark -P 64 -t
   zadd`` and the raw UNLOGGED-batch insert rate into Cassandra (:mod:`bench.ceilings`).
3. The Python peer, Stream-Framework 1.4.0, on the same graphs (:mod:`bench.peers`).
4. Backlog drains: N activities are produced to a fresh topic BEFORE the worker starts, then
   ``feed fanout`` runs as a subprocess with a fresh consumer group, and its ``/metrics`` are
   sampled until every insert is applied:
   * ``redis_only`` — uniform graph, history writes off (FEED_FANOUT_HISTORY=false), 1 worker:
     inserts/s vs the ZADD ceiling and vs Stream-Framework; Redis bytes per entry; worker RSS.
   * ``drain_2_workers`` — the same backlog with 2 workers (drain rate 1 vs 2).
   * ``skewed`` — the skewed graph, history off, 1 worker (vs Stream-Framework on it).
   * ``history`` — uniform graph with Cassandra history on: follower rows/s vs the raw
     batch-insert ceiling.
5. ``sweep`` — one worker on an empty topic, activities offered at fixed rates (fractions of the
   measured drain rate): achieved throughput versus offered rate.

Rates are "steady" (from 10% to 90% of the expected total, so the group join and the first
follower-cache misses are left out); the overall start-to-end rate is recorded beside it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import redis_work
from bench.ceilings import CeilingError, cassandra_batch_ceiling, redis_zadd_ceiling
from bench.context import BenchContext, Plan
from bench.graphs import FollowGraph, load_followers, skewed_graph, uniform_graph
from bench.load import (
    Highs,
    Monitored,
    WorkerSet,
    committed_lag,
    lag_consumer,
    monitor,
    new_producer,
    produce,
    rate_summary,
    series,
)
from bench.load import activity_bytes as _activity_bytes
from bench.options import FANOUT_PHASES
from bench.peers import PeerError, ensure_stream_framework_venv, run_stream_framework
from bench.processes import cpu_seconds, metric_sum, rss_bytes
from feed import keys

__all__ = ["PHASES", "build_graphs", "default_phases", "ensure_graph_loaded", "run"]

#: The scenario's phases, in order; ``FEED_BENCH_PHASES=redis_only,history`` runs a subset.
PHASES = FANOUT_PHASES


def default_phases(quick: bool) -> tuple[str, ...]:
    """The phases run when ``FEED_BENCH_PHASES`` names none: all, but ``redis_work`` (Redis
    under callgrind, a minute or more) only in a full run."""
    return tuple(p for p in PHASES if not (quick and p == "redis_work"))


#: Targets from the issue (checked and shown in the report; never enforced by the harness).
TARGET_ZADD_RATIO = 0.4
TARGET_INSERTS = 200_000.0
TARGET_SOAK_GROWTH = 0.10
TARGET_PEER_RATIO = 10.0
TARGET_HISTORY_ROWS = 40_000.0
TARGET_CASSANDRA_RATIO = 0.6
#: Issue 14: a Redis Cluster adds at most 15% Redis work per insert over one server.
TARGET_CLUSTER_WORK = 1.15


def build_graphs(plan: Plan) -> dict[str, FollowGraph]:
    return {
        "uniform": uniform_graph(plan.uniform_users, plan.uniform_followers, seed=11),
        "skewed": skewed_graph(
            plan.skewed_users,
            plan.skewed_top,
            plan.skewed_exponent,
            min_followers=plan.skewed_min,
            hot_threshold=plan.skewed_hot_threshold,
            hot_posts=plan.skewed_hot_posts,
            seed=12,
        ),
    }


def run(ctx: BenchContext) -> dict[str, Any]:
    plan = ctx.plan
    out: dict[str, Any] = {"status": "ok"}
    ctx.results["fanout"] = out
    graphs = build_graphs(plan)
    uniform, skewed = graphs["uniform"], graphs["skewed"]
    actors = {
        "redis_only": uniform.actors(plan.backlog, seed=101),
        "drain_2_workers": uniform.actors(plan.backlog, seed=102),
        "skewed": skewed.actors(plan.backlog_skewed, seed=103),
        "history": uniform.actors(plan.backlog_history, seed=104),
    }
    out["graphs"] = {name: g.stats() for name, g in graphs.items()}

    # 1. ceilings first, on fresh servers with nothing else running
    _ceilings(ctx)
    # 2. peer install (background) while the graphs load
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peer-install")
    install: Future[Path] | None = None
    if not ctx.skip_peers:
        install = pool.submit(
            ensure_stream_framework_venv,
            ctx.children,
            ctx.workdir,
            timeout=plan.peer_install_timeout_s,
            env=ctx.options.install_env(),
        )
    wanted = set(ctx.options.phases or default_phases(plan.quick))
    try:
        if ctx.options.phases and wanted != set(PHASES):
            ctx.log(f"FEED_BENCH_PHASES: only {', '.join(sorted(wanted))}")
            graphs = {
                name: g
                for name, g in graphs.items()
                if name == "uniform" or (name == "skewed" and "skewed" in wanted)
            }
        if wanted - {"redis_work"}:  # redis_work alone needs no graph in Cassandra nor peer
            _load_graphs(ctx, graphs, actors, out)
            _wait_install(ctx, install)
            # 3. the peer
            _peers(ctx, graphs, actors, install)
        # 4. drains
        phases: dict[str, Any] = {}
        out["phases"] = phases
        if "redis_only" in wanted:
            phases["redis_only"] = _drain(
                ctx,
                "redis_only",
                uniform,
                actors["redis_only"],
                workers=1,
                history=False,
                memory=True,
                profile=ctx.profile,
            )
        if "drain_2_workers" in wanted:
            phases["drain_2_workers"] = _drain(
                ctx, "drain_2_workers", uniform, actors["drain_2_workers"], workers=2, history=False
            )
        if "skewed" in wanted:
            phases["skewed"] = _drain(
                ctx, "skewed", skewed, actors["skewed"], workers=1, history=False
            )
        if "history" in wanted:
            # the same raw-insert reference again, in the state the history phase finds Cassandra
            _cassandra_ceiling(ctx, "cassandra_batch_before_history")
            phases["history"] = _drain(
                ctx, "history", uniform, actors["history"], workers=1, history=True
            )
        # 5. offered-rate sweep
        capacity = (phases.get("redis_only") or {}).get("activities_per_s") or 0.0
        if "sweep" in wanted:
            out["sweep"] = _sweep(ctx, uniform, capacity)
        # 6. memory soak at half the drain rate
        if "soak" in wanted:
            out["soak"] = _soak(ctx, uniform, capacity)
        # 7. Redis instructions per insert, one Redis against a cluster (its own servers)
        if "redis_work" in wanted:
            out["redis_work"] = redis_work.run(ctx, uniform)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    _figures(ctx, out)
    if ctx.errors:
        out["status"] = "partial"
    return out


# --- 1. graphs ------------------------------------------------------------------------------
def _load_graphs(
    ctx: BenchContext,
    graphs: dict[str, FollowGraph],
    actors: dict[str, list[int]],
    out: dict[str, Any],
) -> None:
    for name, graph in graphs.items():
        # every uniform user may post (the sweep and e2e draw actors at random)
        users = list(range(graph.users)) if name == "uniform" else sorted(set(actors[name]))
        out["graphs"][name]["loaded"] = _load_graph(ctx, graph, users)


def _load_graph(ctx: BenchContext, graph: FollowGraph, users: list[int]) -> dict[str, Any]:
    total = sum(graph.counts[u] for u in users)
    with ctx.task(f"graph {graph.name}: load {total:,} follower rows", total) as update:
        loaded = load_followers(
            ctx.cassandra,
            ctx.settings.cassandra_keyspace,
            graph,
            users,
            progress=lambda n: update(advance=n),
        )
    ctx.log(f"graph {graph.name}: {loaded['rows']:,} rows in {loaded['seconds']:.1f}s")
    ctx.state[f"graph:{graph.name}"] = graph
    return loaded


def ensure_graph_loaded(ctx: BenchContext, name: str) -> FollowGraph:
    """The named graph, loaded into Cassandra (all users) unless a scenario already did."""
    graph: FollowGraph | None = ctx.state.get(f"graph:{name}")
    if graph is None:
        graph = build_graphs(ctx.plan)[name]
        _load_graph(ctx, graph, list(range(graph.users)))
    return graph


def _wait_install(ctx: BenchContext, install: Future[Path] | None) -> None:
    if install is None:
        return
    with ctx.task("peer: Stream-Framework venv", None):
        try:
            install.result(timeout=ctx.plan.peer_install_timeout_s + 30)
        except Exception as exc:
            ctx.log(f"[yellow]peer install failed: {exc}")


# --- 2. ceilings ----------------------------------------------------------------------------
def _ceilings(ctx: BenchContext) -> None:
    ceilings: dict[str, Any] = ctx.results.setdefault("ceilings", {})
    if ctx.options.redis_cluster:
        ceilings["redis_zadd"] = {"error": "not measured on a Redis Cluster"}
    with ctx.task("ceiling: redis-benchmark -P 64 -t zadd", None):
        try:
            if ctx.options.redis_cluster:
                raise CeilingError("not measured on a Redis Cluster")
            ceilings["redis_zadd"] = redis_zadd_ceiling(
                ctx.stack.redis.port,
                ctx.plan.redis_benchmark_requests,
                redis_server=getattr(ctx.stack.redis, "binary", None),
            )
            ctx.redis.delete("myzset")
        except CeilingError as exc:
            ctx.error("ceiling redis_zadd", exc)
            ceilings["redis_zadd"] = {"error": str(exc)}
    _cassandra_ceiling(ctx, "cassandra_batch")
    zadd = ceilings["redis_zadd"].get("ops_per_s")
    rows = ceilings["cassandra_batch"].get("rows_per_s")
    ctx.log(f"ceilings: ZADD {zadd or 0:,.0f}/s, Cassandra batch rows {rows or 0:,.0f}/s")


def _cassandra_ceiling(ctx: BenchContext, key: str) -> None:
    ceilings: dict[str, Any] = ctx.results.setdefault("ceilings", {})
    with ctx.task(f"ceiling ({key}): Cassandra UNLOGGED batches of 100", None):
        try:
            ceilings[key] = cassandra_batch_ceiling(
                ctx.cassandra, ctx.settings.cassandra_keyspace, ctx.plan.cassandra_ceiling_rows
            )
        except Exception as exc:
            ctx.error(f"ceiling {key}", exc)
            ceilings[key] = {"error": str(exc)}
    ctx.log(f"{key}: {ceilings[key].get('rows_per_s') or 0:,.0f} rows/s")


# --- 3. peers -------------------------------------------------------------------------------
def _peers(
    ctx: BenchContext,
    graphs: dict[str, FollowGraph],
    actors: dict[str, list[int]],
    install: Future[Path] | None,
) -> None:
    peers: dict[str, Any] = ctx.results.setdefault("peers", {})
    entry: dict[str, Any] = {"name": "Stream-Framework 1.4.0 (Redis feeds, Celery eager)"}
    peers["stream_framework"] = entry
    if install is None:
        entry["status"] = "skipped"
        entry["reason"] = "FEED_BENCH_SKIP_PEERS=1"
        return
    try:
        python = install.result(timeout=1)
    except Exception as exc:
        entry["status"] = "failed"
        entry["error"] = f"install: {exc}"
        ctx.error("peer stream-framework install", exc)
        return
    entry["status"] = "ok"
    runs = {
        "uniform": (graphs["uniform"], actors["redis_only"], ctx.plan.peer_activities_uniform),
    }
    if "skewed" in graphs:
        runs["skewed"] = (graphs["skewed"], actors["skewed"], ctx.plan.peer_activities_skewed)
    for name, (graph, sequence, count) in runs.items():
        prefix = sequence[:count]
        graph_file = ctx.workdir / f"peer-graph-{name}.json"
        graph.write_peer_file(graph_file, prefix)
        inserts = graph.fanout_of(prefix)
        with ctx.task(f"peer: Stream-Framework on {name} ({count:,} activities)", None):
            try:
                entry[name] = run_stream_framework(
                    ctx.children,
                    python,
                    graph_file=graph_file,
                    activities=count,
                    redis_port=ctx.stack.redis.port,
                    redis_db=1,
                    log=ctx.logs_dir() / f"peer-stream-framework-{name}.log",
                    timeout=ctx.plan.peer_timeout_s,
                    env=ctx.options.install_env(),
                )
            except (PeerError, ValueError) as exc:
                entry[name] = {"error": str(exc)}
                entry["status"] = "failed"
                ctx.error(f"peer stream-framework {name}", exc)
                continue
        got = entry[name]
        if got.get("follower_inserts") != inserts:
            ctx.log(
                f"[yellow]peer {name}: {got.get('follower_inserts')} inserts, expected {inserts}"
            )
        ctx.log(
            f"peer {name}: {got['inserts_per_s']:,.0f} inserts/s, "
            f"correct={got['correctness']['ok']}"
        )


# --- 4. drains ------------------------------------------------------------------------------
def _used_memory(ctx: BenchContext) -> int:
    return sum(int(info["used_memory"]) for info in ctx.redis_info("memory"))


def _drain(
    ctx: BenchContext,
    phase: str,
    graph: FollowGraph,
    actors: list[int],
    *,
    workers: int,
    history: bool,
    memory: bool = False,
    profile: bool = False,
) -> dict[str, Any]:
    plan = ctx.plan
    topic = f"bench.{phase}.activities"
    expected = graph.fanout_of(actors)
    result: dict[str, Any] = {
        "graph": graph.name,
        "workers": workers,
        "history": history,
        "activities": len(actors),
        "expected_inserts": expected,
        "mean_fanout": expected / len(actors) if actors else 0.0,
    }
    try:
        ctx.create_topics([topic])
        with ctx.task(
            f"{phase}: produce {len(actors):,} activities (backlog)", len(actors)
        ) as update:
            highs = produce(
                ctx, topic, [graph.user(a) for a in actors], prefix=phase, update=update
            )
        ctx.redis.flushdb()
        memory_before = _used_memory(ctx)
        worker_set = WorkerSet(ctx, phase, topic, workers, history=history).start()
        profilers: list[Any] = []
        try:
            with ctx.task(
                f"{phase}: drain with {workers} worker(s), {expected:,} inserts", expected
            ) as update:
                monitored = monitor(
                    ctx,
                    worker_set,
                    highs=highs,
                    expected_inserts=expected,
                    expected_consumed=len(actors),
                    timeout=plan.drain_timeout_s,
                    update=update,
                    on_first_insert=(lambda: profilers.extend(_start_profilers(ctx, worker_set)))
                    if profile
                    else None,
                    cpu_probe=lambda: _cpu_probe(ctx, worker_set),
                )
        finally:
            worker_set.stop()
            for proc in profilers:
                ctx.children.stop(proc, timeout=30)
        result.update(_drain_summary(monitored, expected, len(actors), history))
        result["load_average_1m"] = os.getloadavg()[0]
        result["cpu"] = monitored.cpu_per_unit()
        if monitored.error:
            ctx.error(f"fanout {phase}", monitored.error)
        if memory:
            result["memory"] = _redis_memory(ctx, graph, memory_before)
            inserted = monitored.samples[-1].inserts if monitored.samples else 0
            result["memory"]["inserted"] = inserted
            result["memory"]["bytes_per_inserted"] = (
                result["memory"]["used_memory_delta"] / inserted if inserted else None
            )
        if profilers:
            result["profile"] = _profile_summary(ctx)
    except Exception as exc:
        ctx.error(f"fanout {phase}", exc)
        result["error"] = f"{type(exc).__name__}: {exc}"
    rate = result.get("inserts_per_s")
    ctx.log(
        f"{phase}: {rate or 0:,.0f} inserts/s with {workers} worker(s)"
        + (f", {result.get('history_rows_per_s') or 0:,.0f} history rows/s" if history else "")
    )
    return result


def _drain_summary(m: Monitored, expected: int, activities: int, history: bool) -> dict[str, Any]:
    inserts = rate_summary(m.samples, "inserts", expected)
    out: dict[str, Any] = {
        "completed": m.completed,
        "error": m.error,
        "inserts_per_s": inserts["steady_per_s"],
        "inserts_per_s_overall": inserts["overall_per_s"],
        "drain_seconds": inserts["seconds"],
        "time_to_first_insert_s": inserts["start_s"],
    }
    fanout = expected / activities if activities else 0.0
    if inserts["steady_per_s"] and fanout:
        out["activities_per_s"] = inserts["steady_per_s"] / fanout
    if inserts["overall_per_s"] and fanout:
        out["activities_per_s_overall"] = inserts["overall_per_s"] / fanout
    if history:
        rows = rate_summary(m.samples, "history_rows", expected)
        out["history_rows_per_s"] = rows["steady_per_s"]
        out["history_rows_per_s_overall"] = rows["overall_per_s"]
        out["history_rows"] = m.samples[-1].history_rows if m.samples else 0
    rss_values = [r for s in m.samples for r in s.rss if r]
    if rss_values:
        last = [r for r in m.samples[-1].rss if r] or rss_values[-1:]
        out["worker_rss_mb"] = {
            "max": max(rss_values) / 2**20,
            "last": sum(last) / len(last) / 2**20,
            "first": rss_values[0] / 2**20,
        }
    lags = [s.lag for s in m.samples if s.lag is not None]
    out["max_lag"] = max(lags) if lags else None
    out["series"] = series(m.samples)
    out["batch_latency"] = m.latency
    return out


def _cpu_probe(ctx: BenchContext, workers: WorkerSet) -> dict[str, float]:
    """CPU seconds so far of the workers (summed), Redis (INFO cpu) and Cassandra (its JVM)."""
    probe: dict[str, float] = {}
    worker_cpu = [cpu_seconds(pid) for pid in workers.pids()]
    if all(c is not None for c in worker_cpu):
        probe["worker"] = sum(c for c in worker_cpu if c is not None)
    try:
        shards = ctx.redis_cpu()
        probe["redis"] = sum(shards)
        if len(shards) > 1:  # a cluster: each primary's own (the spread across shards)
            for n, shard_cpu in enumerate(shards, 1):
                probe[f"redis_shard{n}"] = shard_cpu
    except Exception:
        pass
    cassandra_pid = getattr(ctx.stack.cassandra, "pid", None)
    if cassandra_pid:
        cpu = cpu_seconds(cassandra_pid)
        if cpu is not None:
            probe["cassandra"] = cpu
    return probe


def _redis_memory(ctx: BenchContext, graph: FollowGraph, before: int) -> dict[str, Any]:
    client = ctx.redis
    after = _used_memory(ctx)
    entries = 0
    users = list(range(graph.users))
    for start in range(0, len(users), 2000):
        pipe = client.pipeline(transaction=False)
        for u in users[start : start + 2000]:
            pipe.zcard(keys.timeline(graph.user(u)))
        entries += sum(int(n) for n in pipe.execute())
    sample = users[:: max(1, len(users) // 200)]
    pipe = client.pipeline(transaction=False)
    for u in sample:
        pipe.memory_usage(keys.timeline(graph.user(u)), samples=0)
        pipe.zcard(keys.timeline(graph.user(u)))
    values = pipe.execute()
    sampled_bytes = sum(int(v or 0) for v in values[0::2])
    sampled_entries = sum(int(v or 0) for v in values[1::2])
    body_keys = []
    cursor = 0
    for _ in range(20):
        cursor, found = client.scan(cursor, match=keys.body_pattern(), count=1000)
        body_keys.extend(found)
        if cursor == 0 or len(body_keys) >= 200:
            break
    body_sizes = [int(client.memory_usage(k, samples=0) or 0) for k in body_keys[:200]]
    delta = after - before
    return {
        "used_memory_before": before,
        "used_memory_after": after,
        "used_memory_delta": delta,
        "timeline_entries": entries,
        "bytes_per_entry": delta / entries if entries else None,
        "timeline_bytes_per_entry": sampled_bytes / sampled_entries if sampled_entries else None,
        "body_bytes_avg": sum(body_sizes) / len(body_sizes) if body_sizes else None,
        "note": "bytes_per_entry = INFO used_memory delta / entries held (bodies amortised in); "
        "timeline_bytes_per_entry = MEMORY USAGE of sampled timeline sets / their entries",
    }


# --- profiling (optional: FEED_BENCH_PROFILE=1 and py-spy on PATH) ---------------------------
def _start_profilers(ctx: BenchContext, workers: WorkerSet) -> list[Any]:
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        ctx.log("[yellow]FEED_BENCH_PROFILE=1 but py-spy is not on PATH (pip install py-spy)")
        return []
    seconds = "5" if ctx.plan.quick else "20"
    pid = str(workers.pids()[0])
    procs = []
    for fmt, name in (("raw", "profile-worker.txt"), ("flamegraph", "profile-worker.svg")):
        argv = [
            py_spy,
            "record",
            "--nonblocking",
            "--pid",
            pid,
            "--duration",
            seconds,
            "--rate",
            "100",
            "--format",
            fmt,
            "--output",
            str(ctx.outdir / name),
        ]
        procs.append(
            ctx.children.spawn(argv, env=dict(ctx.env), log=ctx.logs_dir() / f"py-spy-{fmt}.log")
        )
    return procs


def _profile_summary(ctx: BenchContext, top: int = 15) -> dict[str, Any]:
    path = ctx.outdir / "profile-worker.txt"
    if not path.exists():
        return {"error": "py-spy wrote no profile (see logs/py-spy-raw.log)"}
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r":\d+\)$", ")", f.strip()) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def ranked(table: dict[str, int]) -> list[dict[str, Any]]:
        rows = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [{"frame": f, "share": c / total if total else 0.0} for f, c in rows]

    return {
        "samples": total,
        "self": ranked(own),
        "inclusive": ranked(inclusive),
        "flamegraph": "profile-worker.svg",
        "raw": "profile-worker.txt",
    }


# --- 5. offered-rate sweep -------------------------------------------------------------------
def _sweep(ctx: BenchContext, graph: FollowGraph, capacity_aps: float) -> dict[str, Any]:
    result: dict[str, Any] = {"capacity_activities_per_s": capacity_aps, "steps": []}
    if capacity_aps <= 0:
        result["error"] = "no drain rate measured: sweep skipped"
        return result
    fanout = graph.counts[0]  # uniform graph: every actor has the same follower count
    try:
        with _paced_worker(ctx, "sweep", graph, 105) as paced:
            _sweep_steps(ctx, paced, capacity_aps, fanout, result)
    except Exception as exc:
        ctx.error("fanout sweep", exc)
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def _sweep_steps(
    ctx: BenchContext, paced: _Paced, capacity_aps: float, fanout: int, result: dict[str, Any]
) -> None:
    plan = ctx.plan
    worker_set, producer, offer = paced.worker_set, paced.producer, paced.offer
    steps = [f * capacity_aps for f in plan.sweep_fractions]
    with ctx.task(
        f"sweep: {len(steps)} offered rates x {plan.sweep_step_s:.0f}s", len(steps)
    ) as update:
        for index, rate in enumerate(steps):
            start_inserts = _inserts(worker_set)
            t0 = time.monotonic()
            step_sent = offer.run(rate, plan.sweep_step_s)
            elapsed = time.monotonic() - t0
            producer.flush(10)
            end_inserts = _inserts(worker_set)
            lag = paced.lag(ctx)
            achieved = (end_inserts - start_inserts) / elapsed
            result["steps"].append(
                {
                    "offered_activities_per_s": step_sent / elapsed,
                    "offered_inserts_per_s": step_sent * fanout / elapsed,
                    "achieved_inserts_per_s": achieved,
                    "achieved_activities_per_s": achieved / fanout,
                    "lag_at_end": lag,
                    "seconds": elapsed,
                }
            )
            update(completed=index + 1)


@dataclass
class _Paced:
    """One fan-out worker on a topic of its own, and an offer of activities at a steady rate."""

    topic: str
    worker_set: WorkerSet
    consumer: Any
    producer: Any
    highs: Highs
    offer: _Offer

    def lag(self, ctx: BenchContext) -> int | None:
        return committed_lag(self.consumer, self.topic, ctx.settings.kafka_partitions, self.highs)


@contextlib.contextmanager
def _paced_worker(ctx: BenchContext, phase: str, graph: FollowGraph, seed: int) -> Iterator[_Paced]:
    """Start a worker on ``bench.<phase>.activities`` and wait until it has joined; on the way
    out (also on an error, also when set-up fails halfway) flush the producer and stop it all."""
    topic = f"bench.{phase}.activities"
    ctx.create_topics([topic])
    worker_set = WorkerSet(ctx, phase, topic, 1, history=False).start()
    consumer = producer = None
    try:
        consumer = lag_consumer(ctx, worker_set.group)
        producer = new_producer(ctx)
        highs = Highs()
        offer = _Offer(producer, topic, graph, highs, random.Random(seed), phase)
        _wait_joined(ctx, worker_set, phase)
        yield _Paced(topic, worker_set, consumer, producer, highs, offer)
    finally:
        if producer is not None:
            producer.flush(5)
        if consumer is not None:
            consumer.close()
        worker_set.stop()


class _Offer:
    """Activities from random actors of ``graph``, produced at a steady rate."""

    def __init__(
        self, producer: Any, topic: str, graph: FollowGraph, highs: Highs, rng: Any, prefix: str
    ) -> None:
        self.producer, self.topic, self.graph, self.highs = producer, topic, graph, highs
        self.rng, self.prefix = rng, prefix
        self.sent = 0

    def run(self, rate: float, seconds: float, tick: Any = None, tick_every_s: float = 1.0) -> int:
        """Produce at ``rate``/s for ``seconds`` (bounded by both); ``tick()`` every
        ``tick_every_s``. Returns how many were produced."""
        t0 = time.monotonic()
        next_tick = t0 + tick_every_s
        step_sent = 0
        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            if tick is not None and now >= next_tick:
                next_tick += tick_every_s
                tick()
            due = int((now - t0) * rate) - step_sent
            for _ in range(max(0, due)):
                actor = self.graph.user(self.rng.randrange(self.graph.users))
                value = _activity_bytes(f"{self.prefix}-{self.sent}", actor, datetime.now(UTC))
                try:
                    self.producer.produce(
                        self.topic,
                        value=value,
                        key=actor.encode(),
                        on_delivery=self.highs.on_delivery,
                    )
                except BufferError:
                    self.producer.poll(0.01)
                    continue
                self.sent += 1
                step_sent += 1
            self.producer.poll(0)
            time.sleep(0.005)
        return step_sent


def _wait_joined(ctx: BenchContext, worker_set: WorkerSet, phase: str) -> None:
    with ctx.task(f"{phase}: waiting for the worker to join", None):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            texts = worker_set.scrape()
            if sum(_assigned(t) for t in texts) >= ctx.settings.kafka_partitions:
                return
            if worker_set.dead():
                raise RuntimeError(f"{phase} worker exited early (see logs/)")
            time.sleep(0.2)
        raise TimeoutError(f"{phase} worker did not join the group within 60s")


def _soak(ctx: BenchContext, graph: FollowGraph, capacity_aps: float) -> dict[str, Any]:
    """One worker at half its measured drain rate for ``plan.soak_s``: is its RSS flat?

    Flat means the mean RSS of the last tenth of the run is within 10% of the mean over the
    tenth that follows the warm-up (the first fifth: caches fill, the follower cache loads)."""
    plan = ctx.plan
    rate = 0.5 * capacity_aps
    result: dict[str, Any] = {"offered_activities_per_s": rate, "seconds": plan.soak_s}
    if rate <= 0:
        result["error"] = "no drain rate measured: soak skipped"
        return result
    ctx.redis.flushdb()  # what the earlier phases left would only slow Redis down
    samples: list[dict[str, float]] = []
    try:
        with _paced_worker(ctx, "soak", graph, 106) as paced:
            worker_set = paced.worker_set
            pid = worker_set.pids()[0]
            t0 = time.monotonic()

            def sample() -> None:
                rss = rss_bytes(pid)
                if rss:
                    samples.append(
                        {
                            "t": time.monotonic() - t0,
                            "rss_mb": rss / 2**20,
                            "inserts": _inserts(worker_set),
                        }
                    )

            with ctx.task(f"soak: {rate:,.0f} activities/s for {plan.soak_s:.0f}s", None):
                paced.offer.run(rate, plan.soak_s, tick=sample, tick_every_s=plan.soak_sample_s)
            paced.producer.flush(10)
            result["lag_at_end"] = paced.lag(ctx)
            result["sent"] = paced.offer.sent
    except Exception as exc:
        ctx.error("fanout soak", exc)
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["samples"] = samples
    result.update(_flatness(samples, plan.soak_s))
    ctx.log(
        f"soak: worker RSS {result.get('rss_after_warmup_mb') or 0:.0f} -> "
        f"{result.get('rss_end_mb') or 0:.0f} MB ({(result.get('rss_growth') or 0) * 100:+.1f}%)"
    )
    return result


def _flatness(samples: list[dict[str, float]], seconds: float) -> dict[str, Any]:
    def mean_rss(lo: float, hi: float) -> float | None:
        values = [s["rss_mb"] for s in samples if lo <= s["t"] < hi]
        return sum(values) / len(values) if values else None

    after_warmup = mean_rss(0.2 * seconds, 0.3 * seconds)
    end = mean_rss(0.9 * seconds, seconds + 60)
    out: dict[str, Any] = {"rss_after_warmup_mb": after_warmup, "rss_end_mb": end}
    if samples:
        out["rss_max_mb"] = max(s["rss_mb"] for s in samples)
        span = samples[-1]["t"] - samples[0]["t"]
        if span > 0:
            out["inserts_per_s"] = (samples[-1]["inserts"] - samples[0]["inserts"]) / span
    if after_warmup and end:
        out["rss_growth"] = end / after_warmup - 1
    return out


def _assigned(text: str | None) -> float:
    return metric_sum(text, "feed_assigned_partitions")


def _inserts(workers: WorkerSet) -> float:
    return sum(metric_sum(t, "feed_timeline_inserts_total") for t in workers.scrape())


# --- ratios and targets ----------------------------------------------------------------------
def _ratio(value: Any, reference: Any) -> float | None:
    if isinstance(value, (int, float)) and isinstance(reference, (int, float)) and reference > 0:
        return float(value) / float(reference)
    return None


def _figures(ctx: BenchContext, out: dict[str, Any]) -> None:
    phases = out.get("phases", {})
    ceilings = ctx.results.get("ceilings", {})
    peer = ctx.results.get("peers", {}).get("stream_framework", {})
    zadd = ceilings.get("redis_zadd", {}).get("ops_per_s")
    # The history rate is compared with the raw rate measured just before it (same data, same
    # compaction state); the fresh-server figure is kept beside it in the report.
    reference = "cassandra_batch_before_history"
    raw_rows = ceilings.get(reference, {}).get("rows_per_s")
    if raw_rows is None:
        reference = "cassandra_batch"
        raw_rows = ceilings.get(reference, {}).get("rows_per_s")
    redis_only = phases.get("redis_only", {})
    skewed = phases.get("skewed", {})
    history = phases.get("history", {})
    two = phases.get("drain_2_workers", {})
    redis_only["ratio_to_redis_zadd"] = _ratio(redis_only.get("inserts_per_s"), zadd)
    redis_only["ratio_to_stream_framework"] = _ratio(
        redis_only.get("inserts_per_s"), peer.get("uniform", {}).get("inserts_per_s")
    )
    skewed["ratio_to_redis_zadd"] = _ratio(skewed.get("inserts_per_s"), zadd)
    skewed["ratio_to_stream_framework"] = _ratio(
        skewed.get("inserts_per_s"), peer.get("skewed", {}).get("inserts_per_s")
    )
    history["ratio_to_cassandra_batch"] = _ratio(history.get("history_rows_per_s"), raw_rows)
    history["cassandra_reference"] = reference
    history["ratio_to_cassandra_batch_fresh"] = _ratio(
        history.get("history_rows_per_s"), ceilings.get("cassandra_batch", {}).get("rows_per_s")
    )
    out["drain"] = {
        "activities": redis_only.get("activities"),
        "workers_1_activities_per_s": redis_only.get("activities_per_s"),
        "workers_2_activities_per_s": two.get("activities_per_s"),
        "workers_1_seconds": redis_only.get("drain_seconds"),
        "workers_2_seconds": two.get("drain_seconds"),
        "speedup_2_vs_1": _ratio(two.get("activities_per_s"), redis_only.get("activities_per_s")),
    }
    memory = redis_only.get("memory", {})
    out["memory"] = {
        "redis_bytes_per_entry": memory.get("bytes_per_entry"),
        "redis_timeline_bytes_per_entry": memory.get("timeline_bytes_per_entry"),
        "worker_rss_mb_max": max(
            (p.get("worker_rss_mb", {}).get("max", 0.0) for p in phases.values()), default=None
        ),
    }
    targets = ctx.results.setdefault("targets", [])
    work = out.get("redis_work", {})
    if "cluster_over_one" in work:
        targets.append(
            _target(
                "Redis instructions per insert, 3-master cluster ÷ one Redis (callgrind)",
                work["cluster_over_one"],
                TARGET_CLUSTER_WORK,
                "ratio",
                at_most=True,
            )
        )
    soak = out.get("soak", {})
    growth = soak.get("rss_growth")
    targets.extend(
        [
            _target(
                "fan-out timeline inserts/s, 1 worker, history off",
                redis_only.get("inserts_per_s"),
                TARGET_INSERTS,
                "inserts/s",
            ),
            _target(
                "worker RSS growth over the soak (50% of the drain rate), end vs after warm-up",
                None if growth is None else abs(growth),
                TARGET_SOAK_GROWTH,
                "ratio",
                at_most=True,
            ),
            _target(
                "fan-out inserts/s ÷ redis-benchmark ZADD ceiling",
                redis_only.get("ratio_to_redis_zadd"),
                TARGET_ZADD_RATIO,
                "ratio",
            ),
            _target(
                "fan-out inserts/s ÷ Stream-Framework, same uniform graph",
                redis_only.get("ratio_to_stream_framework"),
                TARGET_PEER_RATIO,
                "ratio",
            ),
            _target(
                "Cassandra history rows/s (history on, 1 worker)",
                history.get("history_rows_per_s"),
                TARGET_HISTORY_ROWS,
                "rows/s",
            ),
            _target(
                "history rows/s ÷ raw UNLOGGED-batch insert ceiling",
                history.get("ratio_to_cassandra_batch"),
                TARGET_CASSANDRA_RATIO,
                "ratio",
            ),
        ]
    )


def _target(
    name: str, value: float | None, target: float, unit: str, *, at_most: bool = False
) -> dict[str, Any]:
    met = None if value is None else (value <= target if at_most else value >= target)
    return {
        "name": name,
        "value": value,
        "target": target,
        "unit": unit,
        "met": met,
        "at_most": at_most,
    }
