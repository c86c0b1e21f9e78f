"""The gateway benchmark's writer on its own: what one activity costs the writing process and
Redis, one Redis against a 3-master Redis Cluster.

``python -m bench.writer_cost [--batch N] [--batches M] [--topology one|cluster ...]``

What runs. The publisher of ``feed bench gateway`` (:mod:`bench.ws_clients`) writes as the
fan-out worker does, through :meth:`feed.timelines_redis.RedisTimelines.insert`: batches of
activities, each to one user, every user online (so each call pushes a frame). Here the same
writes run with nothing else: fresh servers on free ports, 5,000 users marked online, a
warm-up, then ``--batches`` batches of ``--batch`` activities. The gateway bench sends about 30
activities per batch at 15,000/s (one batch per 2 ms tick); the worker's batches are hundreds.

Why. On the gateway benchmark the publisher and Redis share the machine's two cores with the
gateway under test, so what the cluster adds to them per message is taken from the gateway.
This measures that part alone, per activity: the writer's CPU (``time.process_time``), Redis
CPU over every primary (``INFO cpu``) and the commands Redis ran (``INFO commandstats``, the
scripts' own commands included). CPU seconds move with the machine's load: repeat the runs.

Prints one JSON object: per topology, ``client_us``, ``redis_us`` and ``commands`` per
activity, and the wall time per batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from bench.notify import cpu_seconds
from feed.cursor import order_key
from feed.delivery_redis import AsyncRedisPresence
from feed.interfaces import Insert
from feed.timelines_redis import RedisTimelines
from infra.servers import RedisCluster, RedisServer

__all__ = ["main", "measure"]

USERS = 5_000
WARMUP_BATCHES = 50
_BODY = b'{"id":"%s","actor":"bench","verb":"like","object":"post"}'


def measure(url: str, cluster: bool, batch: int, batches: int) -> dict[str, Any]:
    """The writes on the Redis (or cluster) at ``url``: per activity, the writer's CPU, Redis CPU
    and Redis commands; bounded by ``batches`` (plus the warm-up)."""
    users = [f"writer-cost-{n}" for n in range(USERS)]
    asyncio.run(_online(url, cluster, users))
    client: Any = (redis.RedisCluster if cluster else redis.Redis).from_url(url)
    try:
        timelines = RedisTimelines(
            client, timeline_max=100, stream_history=100, body_ttl_s=3600, wait_replicas=0
        )
        rng = random.Random(1)
        sent = 0

        def write() -> None:
            nonlocal sent
            inserts = []
            now_ms = int(time.time() * 1000)
            for _ in range(batch):
                sent += 1
                aid = f"wc-{sent}"
                user = users[rng.randrange(USERS)]
                body = _BODY % aid.encode()
                inserts.append(Insert(order_key(sent, aid), aid, body, [user], ts_ms=now_ms))
            timelines.insert(inserts)

        for _ in range(WARMUP_BATCHES):
            write()
        redis0, commands0 = _redis_totals(client, cluster)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(batches):
            write()
        cpu1, wall1 = time.process_time(), time.perf_counter()
        redis1, commands1 = _redis_totals(client, cluster)
    finally:
        client.close()
    activities = batch * batches
    return {
        "activities": activities,
        "client_us": round(1e6 * (cpu1 - cpu0) / activities, 2),
        "redis_us": round(1e6 * (redis1 - redis0) / activities, 2),
        # less the INFO commandstats and INFO cpu calls of the second reading
        "commands": round((commands1 - commands0 - 2 * _nodes(client, cluster)) / activities, 2),
        "wall_ms_per_batch": round(1e3 * (wall1 - wall0) / batches, 3),
    }


async def _online(url: str, cluster: bool, users: Sequence[str]) -> None:
    client: Any = (aioredis.RedisCluster if cluster else aioredis.Redis).from_url(url)
    try:
        presence = AsyncRedisPresence(client, ttl_s=3600)
        for user in users:
            await presence.attach(user)
    finally:
        await client.aclose()


def _connections(client: Any, cluster: bool) -> list[Any]:
    return [n.redis_connection for n in client.get_primaries()] if cluster else [client]


def _nodes(client: Any, cluster: bool) -> int:
    return len(_connections(client, cluster))


def _redis_totals(client: Any, cluster: bool) -> tuple[float, int]:
    """(CPU seconds, commands run) so far, summed over the primaries."""
    cpu, commands = 0.0, 0
    for connection in _connections(client, cluster):
        cpu += cpu_seconds(connection.info("cpu"))
        stats = connection.info("commandstats")
        commands += sum(int(s["calls"]) for s in stats.values())
    return cpu, commands


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.writer_cost", description=__doc__)
    parser.add_argument("--batch", type=int, default=30, help="activities per batch (30)")
    parser.add_argument("--batches", type=int, default=1500, help="batches measured (1500)")
    parser.add_argument(
        "--topology", choices=("one", "cluster"), action="append", help="both by default"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= 10_000 or not 1 <= args.batches <= 100_000:
        parser.error("--batch must be 1..10000 and --batches 1..100000")
    out: dict[str, Any] = {"batch": args.batch, "batches": args.batches}
    for topology in args.topology or ["one", "cluster"]:
        with tempfile.TemporaryDirectory(prefix="writer-cost-") as workdir:
            server: Any = (RedisCluster if topology == "cluster" else RedisServer)(Path(workdir))
            server.start()
            try:
                out[topology] = measure(server.url, topology == "cluster", args.batch, args.batches)
            finally:
                server.stop()
    if "one" in out and "cluster" in out:
        out["cluster_over_one"] = {
            k: round(out["cluster"][k] / out["one"][k], 2) if out["one"][k] else None
            for k in ("client_us", "redis_us", "commands")
        }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
