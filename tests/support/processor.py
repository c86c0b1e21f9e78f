"""Records for the fan-out Processor's tests, and a processor's timeline read from both stores.

``act``/``delete``/``follow`` build the decoded records the Processor is handed (no Kafka), with
times counted from the fixed ``T0`` so a test states its order in minutes or seconds.
``timeline`` reads a user's timeline from Redis and from Cassandra and fails the test unless the
two agree.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from fanout.processor import Processor
from schemas.activity import Activity, decode_activity
from schemas.follow import FollowEvent

__all__ = ["T0", "act", "delete", "follow", "timeline"]

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def act(aid: str, actor: str, minute: int, **extra: Any) -> Activity:
    body = {
        "id": aid,
        "type": "Create",
        "actor": actor,
        "object": f"post:{aid}",
        "published": (T0 + timedelta(minutes=minute)).isoformat(),
        **extra,
    }
    return decode_activity(msgspec.json.encode(body))


def delete(aid: str, actor: str, target: str) -> Activity:
    return act(aid, actor, 999, type="Delete", object=target)


def follow(follower: str, followee: str, second: int, kind: str = "follow") -> FollowEvent:
    return FollowEvent(kind, follower, followee, T0 + timedelta(seconds=second))  # type: ignore[arg-type]


def timeline(p: Processor, user: str) -> list[str]:
    redis_ids = [m.split(":", 1)[1] for m in p._timelines.page(user, None, 1000).members]
    cassandra_ids = [m.split(":", 1)[1] for m in p._history.page_timeline(user, None, 1000)]
    assert redis_ids == cassandra_ids, "Redis and Cassandra disagree"
    return redis_ids
