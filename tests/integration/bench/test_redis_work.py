"""The bench's ``redis_work`` phase: Redis instructions per timeline insert under callgrind, one
real Redis and a real 3-master Redis Cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import redis_work
from bench.graphs import uniform_graph

pytestmark = pytest.mark.timeout(600)

# The quick bench's uniform graph: ten inserts per user per batch of 500, so one script call per
# user and batch on the cluster carries ten members.
GRAPH = uniform_graph(1_000, 20, seed=11)
COUNTED = 20_000
WARMUP = 200_000


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> redis_work.Work:
    return redis_work.measure(
        tmp_path_factory.mktemp("one"), "one", GRAPH, counted=COUNTED, warmup=WARMUP
    )


def test_the_count_is_the_same_for_the_same_work(one: redis_work.Work, tmp_path: Path) -> None:
    again = redis_work.measure(tmp_path, "one", GRAPH, counted=COUNTED, warmup=WARMUP)
    assert again.inserts == one.inserts >= COUNTED
    assert again.per_insert == pytest.approx(one.per_insert, rel=0.01)


def test_a_cluster_adds_at_most_15_percent_redis_work_per_insert_spread_evenly(
    one: redis_work.Work, tmp_path: Path
) -> None:
    cluster = redis_work.measure(tmp_path, "cluster", GRAPH, counted=COUNTED, warmup=WARMUP)
    assert cluster.inserts == one.inserts
    assert len(cluster.shards) == 3 and len(one.shards) == 1
    assert all(shard > 0 for shard in cluster.shards)
    # The goals (callgrind's counts do not move with the machine's load). One argument
    # per member in the cluster's offline calls made this 1.24.
    assert cluster.per_insert / one.per_insert <= 1.15
    assert cluster.spread <= 1.2
