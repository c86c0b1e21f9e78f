"""The fan-out phase ``redis_work``: Redis instructions per timeline insert, one Redis against a
3-master Redis Cluster, counted by callgrind.

Why instructions. The drains measure Redis CPU seconds per insert (``INFO cpu``), and on this
2-core machine that figure moves with whatever shares the cores: on a cluster, three Redis
processes, the worker, the broker and the bench take turns on two cores, and the same ``ZADD``
takes up to half as long again inside Redis (``INFO commandstats``) when they do. So the
cluster's CPU per insert came out at 1.08 to 1.60 times one server's over six runs of the same
code. ``valgrind --tool=callgrind`` counts the instructions each Redis process executes: the
same count for the same work however busy the machine is, so one run gives the cost the
cluster adds, which is what a shard with its own core pays.

What runs. No Kafka, no Cassandra: the timeline writes of ``feed fanout``, as
:mod:`fanout.processor` calls them per batch (``RedisTimelines.claim``, then ``insert`` with the
claims' ``release``), with the worker's default settings, on the bench's uniform graph. Each
topology gets fresh servers under callgrind with instrumentation off; a warm-up fills the
timelines (as a drain's midpoint finds them), then instrumentation is switched on, the counters
zeroed, the measured batches run, and each process dumps its count. The same activities go to
both topologies.

Reported: instructions per insert on one Redis and on the cluster (all shards, and each shard:
the spread is max / mean), and their ratio.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from bench.context import BenchContext
from bench.graphs import FollowGraph
from bench.load import activity_bytes
from feed.cursor import order_key
from feed.interfaces import Insert
from feed.settings import Settings
from feed.timelines_redis import RedisTimelines
from infra.servers import RedisCluster, RedisServer

__all__ = ["Work", "measure", "run"]

#: Inserts counted per topology, and written before counting (uninstrumented, so faster).
COUNTED_INSERTS = 100_000
WARMUP_INSERTS = 200_000
#: A node under instrumentation answers its cluster bus late: no failover for that.
_NODE_ARGS = ("--cluster-node-timeout", "120000")
_STARTUP_S = 120.0


class Work:
    """Instructions per insert of one topology: ``shards`` per process (one for one Redis)."""

    def __init__(self, inserts: int, shards: Sequence[int]) -> None:
        self.inserts = inserts
        self.shards = list(shards)

    @property
    def per_insert(self) -> float:
        return sum(self.shards) / self.inserts

    @property
    def spread(self) -> float:
        """The busiest shard's instructions over the mean (1.0: even)."""
        return max(self.shards) / (sum(self.shards) / len(self.shards))

    def summary(self) -> dict[str, Any]:
        return {
            "inserts": self.inserts,
            "instructions_per_insert": round(self.per_insert, 1),
            "shard_instructions_per_insert": [round(s / self.inserts, 1) for s in self.shards],
            "spread_max_over_mean": round(self.spread, 4),
        }


def run(ctx: BenchContext, graph: FollowGraph) -> dict[str, Any]:
    """The phase in the bench: both topologies, and the ratio (``status`` says if skipped)."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        return {"status": "skipped: valgrind not found (Debian package valgrind)"}
    out: dict[str, Any] = {"status": "ok", "graph": graph.name}
    works: dict[str, Work] = {}
    for topology in ("one", "cluster"):
        ctx.log(f"redis_work: {topology}, Redis under callgrind")
        started = time.monotonic()
        try:
            works[topology] = measure(ctx.workdir / "redis_work" / topology, topology, graph)
        except Exception as exc:  # the report says so; the other phases stand
            ctx.error(f"redis_work ({topology})", exc)
            out["status"] = "error"
            return out
        out[topology] = works[topology].summary() | {
            "seconds": round(time.monotonic() - started, 1)
        }
    out["cluster_over_one"] = round(works["cluster"].per_insert / works["one"].per_insert, 4)
    return out


def measure(
    workdir: Path,
    topology: str,
    graph: FollowGraph,
    *,
    counted: int = COUNTED_INSERTS,
    warmup: int = WARMUP_INSERTS,
    seed: int = 105,
) -> Work:
    """Instructions per insert on ``topology`` (``one`` or ``cluster``: 3 masters) for the
    worker's timeline writes of ``graph``'s activities (``seed``: which): ``warmup`` inserts
    uncounted, then at least ``counted`` inserts counted."""
    settings = Settings()
    batch = settings.fanout_batch
    per_batch = batch * max(1, round(sum(graph.counts) / graph.users))
    warm_batches, counted_batches = math.ceil(warmup / per_batch), math.ceil(counted / per_batch)
    actors = graph.actors((warm_batches + counted_batches) * batch, seed=seed)
    workdir = workdir.resolve()  # callgrind's output path must not depend on a server's cwd
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    with _servers(workdir, topology) as (client, pids):
        timelines = RedisTimelines(
            client,
            timeline_max=settings.timeline_max,
            stream_history=settings.stream_history,
            body_ttl_s=settings.body_ttl_days * 86_400,
            wait_replicas=0,  # no replicas here
        )
        batches = [actors[i : i + batch] for i in range(0, len(actors), batch)]
        for number, chunk in enumerate(batches[:warm_batches]):
            _write(timelines, graph, chunk, number * batch)
        _control(pids, "--instr=on")
        _control(pids, "--zero")
        inserts = 0
        for number, chunk in enumerate(batches[warm_batches:], start=warm_batches):
            inserts += _write(timelines, graph, chunk, number * batch)
        _control(pids, "--dump")
        _control(pids, "--instr=off")
        return Work(inserts, [_dumped(workdir, pid) for pid in pids])


def _write(timelines: RedisTimelines, graph: FollowGraph, actors: list[int], first: int) -> int:
    """One batch as the worker writes it: claim each id, insert, release the claims."""
    now = datetime.now(UTC)
    inserts = []
    for n, actor in enumerate(actors, start=first):
        activity_id = f"w{n}"
        ts_us = 1_700_000_000_000_000 + n
        inserts.append(
            Insert(
                order_key(ts_us, activity_id),
                activity_id,
                activity_bytes(activity_id, graph.user(actor), now),
                [graph.user(f) for f in graph.followers(actor)],
                ts_us // 1000,
            )
        )
    ids = [(i.activity_id, i.activity_id) for i in inserts]
    timelines.claim(ids, 60)
    inserted, _ = timelines.insert(inserts, release=[a for a, _ in ids])
    return inserted


@contextlib.contextmanager
def _servers(workdir: Path, topology: str) -> Iterator[tuple[Any, list[int]]]:
    """Fresh servers under callgrind, instrumentation off (its own output file per process):
    a client, and the pids to count."""
    wrapper = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={workdir}/callgrind.%p",
    ]
    servers: RedisServer | RedisCluster
    if topology == "one":
        servers = RedisServer(workdir / "one", wrapper=wrapper, startup_timeout=_STARTUP_S)
    elif topology == "cluster":
        servers = RedisCluster(
            workdir / "cluster", wrapper=wrapper, args=_NODE_ARGS, startup_timeout=_STARTUP_S
        )
    else:
        raise ValueError(f"topology must be one or cluster, got {topology!r}")
    try:
        servers.start()
        if isinstance(servers, RedisServer):
            client: Any = redis.Redis(host=servers.host, port=servers.port, socket_timeout=120)
            nodes = [servers]
        else:
            first = servers.masters[0]
            client = redis.RedisCluster(host=first.host, port=first.port, socket_timeout=120)
            nodes = servers.masters
        pids = [node.pid for node in nodes]
        if None in pids:
            raise RuntimeError("a Redis process is not running")
        try:
            yield client, [pid for pid in pids if pid is not None]
        finally:
            client.close()
    finally:
        servers.stop()


def _control(pids: list[int], option: str) -> None:
    """``callgrind_control OPTION PID`` for each process (it waits for the process to act)."""
    for pid in pids:
        subprocess.run(
            ["callgrind_control", option, str(pid)],
            check=True,
            capture_output=True,
            timeout=120,
        )


def _dumped(workdir: Path, pid: int) -> int:
    """The instructions in ``pid``'s first dump (``callgrind.<pid>.1``: since the zeroing)."""
    path = workdir / f"callgrind.{pid}.1"
    for line in path.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"{path}: no instruction total")
