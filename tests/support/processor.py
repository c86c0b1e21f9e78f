"""A fan-out Processor's timeline, read from both stores (the records come from
:mod:`tests.support.events`).

``timeline`` reads a user's timeline from Redis and from Cassandra and fails the test unless the
two agree.
"""

from __future__ import annotations

from fanout.processor import Processor

__all__ = ["timeline"]


def timeline(p: Processor, user: str) -> list[str]:
    redis_ids = [m.split(":", 1)[1] for m in p._timelines.page(user, None, 1000).members]
    cassandra_ids = [m.split(":", 1)[1] for m in p._history.page_timeline(user, None, 1000)]
    assert redis_ids == cassandra_ids, "Redis and Cassandra disagree"
    return redis_ids
