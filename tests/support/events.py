"""Building the records the fan-out applies (activities, deletes, follows) in tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from schemas.activity import Activity, decode_activity
from schemas.follow import FollowEvent

__all__ = ["T0", "act", "delete", "follow"]

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def act(aid: str, actor: str, minute: int, **extra: Any) -> Activity:
    """A Create of ``aid`` by ``actor``, published ``minute`` minutes after :data:`T0`."""
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
    """A Delete (its own id ``aid``) of ``target`` by ``actor``."""
    return act(aid, actor, 999, type="Delete", object=target)


def follow(follower: str, followee: str, second: int, kind: str = "follow") -> FollowEvent:
    """A follow (or ``kind="unfollow"``) at ``second`` seconds after :data:`T0`."""
    return FollowEvent(kind, follower, followee, T0 + timedelta(seconds=second))  # type: ignore[arg-type]
