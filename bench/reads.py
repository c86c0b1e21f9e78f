"""``feed bench reads``: hot/cold memory and read latency (in-process, against the bench's stack).

What it measures:

* **Redis memory per active user, and the saving of hot/cold.** A graph of ``users`` users (10,000;
  2,000 with ``--quick``), each following ``follows`` others, 20% of them active. The same
  activities are fanned out twice through the real :class:`fanout.processor.Processor`: once with
  hot/cold on (Redis db 0, only active users get a Redis timeline), once with everyone hot (Redis db
  1). ``INFO memory`` deltas give bytes per active user and the saving.
* **Read latency across the Redis → Cassandra boundary.** Reader users follow prolific actors, so
  their timelines are longer than ``FEED_TIMELINE_MAX`` (800): a page of 50 starting 30 entries
  before the end of the Redis part is served 30 from Redis and 20 from Cassandra. Reported as
  p50/p99 over many reads through :class:`feed.reader.FeedReader` (the gateway's code path),
  beside the first page (Redis only).
* **Read latency with merged large accounts.** The same readers also follow accounts over the
  fan-out limit; their first page is the merge of the timeline and those accounts' outboxes.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import redis
import redis.asyncio as aioredis
from cassandra.concurrent import execute_concurrent
from cassandra.query import BatchStatement, BatchType

from fanout.followers import FollowerCache
from fanout.processor import Processor
from feed import keys
from feed.cursor import encode_position
from feed.graph_cassandra import CassandraFollowGraph
from feed.graph_versions_redis import RedisGraphVersions
from feed.history_cassandra import CassandraHistory
from feed.reader import FeedReader
from feed.timelines_redis import AsyncRedisTimelines, RedisTimelines
from schemas.activity import decode_activity

__all__ = ["run"]

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "p50_ms": pick(0.50),
        "p95_ms": pick(0.95),
        "p99_ms": pick(0.99),
        "max_ms": ordered[-1] * 1000,
        "samples": len(ordered),
    }


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _load_followers(session: Any, keyspace: str, edges: list[tuple[str, str]]) -> None:
    """(followee, follower) rows straight into the graph tables, in UNLOGGED batches."""
    add_follower = session.prepare(
        f"INSERT INTO {keyspace}.followers (user_id, follower) VALUES (?, ?)"
    )
    add_following = session.prepare(
        f"INSERT INTO {keyspace}.following (user_id, followee) VALUES (?, ?)"
    )
    statements: list[tuple[Any, Any]] = []
    for start in range(0, len(edges), 100):
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        for followee, follower in edges[start : start + 100]:
            batch.add(add_follower, (followee, follower))
            batch.add(add_following, (follower, followee))
        statements.append((batch, None))
    execute_concurrent(session, statements, concurrency=32, raise_on_first_error=True)


def run(ctx: Any) -> dict[str, Any]:
    quick = bool(ctx.plan.quick)
    rng = random.Random(7)
    ns = f"r{uuid.uuid4().hex[:6]}"
    users = [f"{ns}u{n}" for n in range(2_000 if quick else 10_000)]
    follows = 20 if quick else 50
    posts = 2_000 if quick else 10_000
    readers = [f"{ns}reader{n}" for n in range(20 if quick else 50)]
    prolific = [f"{ns}prolific{n}" for n in range(40)]
    big = [f"{ns}big{n}" for n in range(5)]
    per_prolific = 25 if quick else 30  # 40 x 30 = 1,200 entries per reader (> 800)
    fanout_limit = 200
    s = ctx.settings
    session = ctx.cassandra
    sync = ctx.redis

    # --- graph ------------------------------------------------------------------------------
    edges: list[tuple[str, str]] = []
    for user in users:
        for followee in rng.sample(users, follows + 1):
            if followee != user:
                edges.append((followee, user))
    for reader in readers:
        edges += [(actor, reader) for actor in prolific + big]
    for account in big:  # over the fan-out limit
        edges += [(account, f) for f in rng.sample(users, fanout_limit + 50)]
    with ctx.task("reads: loading the follow graph", None):
        _load_followers(session, s.cassandra_keyspace, edges)
    active = set(rng.sample(users, len(users) // 5)) | set(readers)
    pipe = sync.pipeline(transaction=False)
    for user in active:
        pipe.set(keys.active(user), "1", ex=7 * 86_400)
    pipe.execute()

    graph = CassandraFollowGraph(session, s.cassandra_keyspace)
    history = CassandraHistory(session, s.cassandra_keyspace)

    def processor(client: redis.Redis, only_active: bool, limit: int) -> Processor:
        return Processor(
            timelines=RedisTimelines(
                client,
                timeline_max=s.timeline_max,
                stream_history=100,
                body_ttl_s=86_400,
                only_active=only_active,
            ),
            history=history,
            graph=graph,
            versions=RedisGraphVersions(client),
            followers=FollowerCache(
                graph, RedisGraphVersions(client), history=history, fanout_limit=limit
            ),
            follow_backfill=0,
        )

    def activity(n: int, actor: str) -> Any:
        return decode_activity(
            msgspec.json.encode(
                {
                    "id": f"{ns}a{n}",
                    "type": "Create",
                    "actor": actor,
                    "object": f"post:{n}",
                    "published": (T0 + timedelta(seconds=n)).isoformat(),
                    "extra": {"text": "x" * 120},
                }
            )
        )

    stream = [activity(n, rng.choice(users)) for n in range(posts)]

    # --- memory: hot/cold (db 0) vs everyone hot (db 1) ---------------------------------------
    db1 = redis.Redis(
        host=sync.connection_pool.connection_kwargs["host"],
        port=sync.connection_pool.connection_kwargs["port"],
        db=1,
    )
    results: dict[str, Any] = {
        "status": "ok",
        "users": len(users),
        "active_share": 0.2,
        "activities": posts,
        "follows_per_user": follows,
    }
    for label, client, only_active in (("hot_cold", sync, True), ("all_hot", db1, False)):
        p = processor(client, only_active, 0)
        before = _used_memory(sync)
        inserted = 0
        with ctx.task(f"reads: fan-out ({label})", posts):
            for start in range(0, posts, 500):
                inserted += p.apply(list(enumerate(stream[start : start + 500]))).inserted
        results[label] = {"redis_bytes": _used_memory(sync) - before, "entries": inserted}
        p.close()
    hot, every = results["hot_cold"], results["all_hot"]
    # Bodies are stored once per activity whoever is active: measure them apart (a sample).
    sample = [a.id for a in stream[:: max(1, posts // 50)]]
    body_bytes = (
        posts * sum(int(sync.memory_usage(keys.body(aid)) or 0) for aid in sample) / len(sample)
    )
    active_count = len(active) - len(readers)
    hot_timelines = max(0.0, hot["redis_bytes"] - body_bytes)
    all_timelines = max(1.0, every["redis_bytes"] - body_bytes)
    results["redis_body_bytes"] = body_bytes
    results["redis_bytes_per_active_user"] = hot_timelines / max(1, active_count)
    results["redis_bytes_per_user_all_hot"] = all_timelines / len(users)
    results["redis_saving"] = 1 - hot_timelines / all_timelines
    results["redis_saving_total"] = 1 - hot["redis_bytes"] / max(1, every["redis_bytes"])
    results["redis_bytes_per_entry"] = all_timelines / max(1, every["entries"])
    db1.flushdb()
    db1.close()

    # --- readers' timelines: prolific actors (long timelines) and big accounts (merged) --------
    p = processor(sync, True, fanout_limit)
    n = posts
    batch: list[Any] = []
    for round_ in range(per_prolific):
        for actor in prolific + big:
            batch.append(activity(n, actor))
            n += 1
        if len(batch) >= 450 or round_ == per_prolific - 1:
            p.apply(list(enumerate(batch)))
            batch = []
    p.close()
    reads = 60 if quick else 300
    latency = asyncio.run(_measure_reads(ctx, history, graph, readers, prolific, reads))
    results.update(latency)
    return results


async def _measure_reads(
    ctx: Any,
    history: CassandraHistory,
    graph: CassandraFollowGraph,
    readers: list[str],
    prolific: list[str],
    reads: int,
) -> dict[str, Any]:
    s = ctx.settings
    client = aioredis.Redis.from_url(s.redis_url)
    try:
        plain = FeedReader(
            AsyncRedisTimelines(client),
            history,
            body_ttl_s=86_400,
            active_ttl_s=7 * 86_400,
            timeline_max=s.timeline_max,
        )
        merged = FeedReader(
            AsyncRedisTimelines(client),
            history,
            body_ttl_s=86_400,
            active_ttl_s=7 * 86_400,
            timeline_max=s.timeline_max,
            graph=graph,
        )
        # The cursor 30 entries before the end of each reader's Redis part.
        boundary: dict[str, str] = {}
        for reader in readers:
            members = await client.zrevrange(keys.timeline(reader), 0, -1)
            if len(members) > 30:
                boundary[reader] = encode_position(members[-31].decode())
        rng = random.Random(11)
        first, crossing, merged_first = [], [], []
        for _ in range(reads):
            reader = rng.choice(readers)
            started = time.perf_counter()
            await plain.page(reader, None, 50)
            first.append(time.perf_counter() - started)
            if reader in boundary:
                started = time.perf_counter()
                page = await plain.page(reader, boundary[reader], 50)
                crossing.append(time.perf_counter() - started)
                assert len(page.items) == 50, "the boundary page must be full"
            started = time.perf_counter()
            await merged.page(reader, None, 50)
            merged_first.append(time.perf_counter() - started)
        return {
            "read_first_page": _percentiles(first),
            "read_crossing_redis_to_cassandra": _percentiles(crossing) if crossing else None,
            "read_with_merged_large_accounts": _percentiles(merged_first),
            "reader_timeline_entries": len(prolific) * 0
            + int(await client.zcard(keys.timeline(readers[0]))),
        }
    finally:
        await client.aclose()
