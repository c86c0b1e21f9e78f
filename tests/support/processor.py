"""A fan-out Processor on the real stores, and its timelines, read from both stores (the records
come from :mod:`tests.support.events`).

``real_processor`` builds a Processor on a Redis client and a Cassandra session, as the worker
does. ``timeline`` reads a user's timeline from Redis and from Cassandra and fails the test
unless the two agree.
"""

from __future__ import annotations

from typing import Any

from fanout.followers import FollowerCache
from fanout.processor import Processor
from feed.graph_cassandra import CassandraFollowGraph
from feed.graph_versions_redis import RedisGraphVersions
from feed.history_cassandra import CassandraHistory
from feed.notify import NotifyLimits
from feed.notify_cassandra import CassandraNotifyStore
from feed.notify_redis import NotifyRedis
from feed.timelines_redis import RedisTimelines

__all__ = ["real_processor", "timeline"]


def real_processor(
    redis_client: Any,
    cassandra: Any,
    keyspace: str,
    *,
    history: CassandraHistory | None = None,
    fanout_limit: int = 0,
    follow_backfill: int = 3,
    timeline_max: int = 50,
    stream_history: int = 100,
    body_ttl_s: int = 600,
) -> Processor:
    """A Processor with its own follower cache (another worker, when called twice); accounts with
    more than ``fanout_limit`` followers (0: none) are merged at read time. ``close()`` it."""
    graph = CassandraFollowGraph(cassandra, keyspace)
    history = history or CassandraHistory(cassandra, keyspace)
    return Processor(
        timelines=RedisTimelines(
            redis_client,
            timeline_max=timeline_max,
            stream_history=stream_history,
            body_ttl_s=body_ttl_s,
        ),
        history=history,
        graph=graph,
        versions=RedisGraphVersions(redis_client),
        followers=FollowerCache(
            graph, RedisGraphVersions(redis_client), history=history, fanout_limit=fanout_limit
        ),
        follow_backfill=follow_backfill,
        notifications=NotifyRedis(
            redis_client,
            CassandraNotifyStore(cassandra, keyspace),
            limits=NotifyLimits(),
            ttl_s=600,
        ),
    )


def timeline(p: Processor, user: str) -> list[str]:
    redis_ids = [m.split(":", 1)[1] for m in p._timelines.page(user, None, 1000).members]
    cassandra_ids = [m.split(":", 1)[1] for m in p._history.page_timeline(user, None, 1000)]
    assert redis_ids == cassandra_ids, "Redis and Cassandra disagree"
    return redis_ids
