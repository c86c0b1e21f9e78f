"""Notification feeds: the grouping rules, as plain Python (the reference), and the in-memory store.

An activity with ``notify`` reaches the notification feed of each listed user except its actor.
In one user's feed (a :class:`NotifyBook`):

* **Grouping.** An activity joins the *open* group of its key, ``type`` + ``object``
  (:func:`group_key`), if that group opened less than ``window`` before the activity's
  ``published`` (``published - opened < window``; ``opened`` is the ``published`` of the group's
  first activity and never changes) and holds fewer than ``group_max`` activities. Otherwise the
  activity opens a new group, which becomes the key's open group. Group ids are
  ``<key>-<opened µs>`` (``-2``, ``-3``... if that id is taken).
* **A group** shows its distinct actors newest first (by each actor's newest activity in it:
  its ``published``, then its id), their count, its activity count, ``first`` and ``last`` (the
  oldest and newest ``published`` of its activities), and whether it is seen and read.
* **New activity.** Adding an activity to a group makes it unseen and unread and moves it by its
  ``last``: groups are ordered newest ``last`` first (ties by id), so a new activity brings its
  group to the top. Adding an activity id the user already has changes nothing (replays).
* **Delete.** Removing an activity takes it out of its group; the group's actors, counts,
  ``first``/``last`` and position follow; its seen/read flags stay. A group left empty is dropped
  (and is no longer its key's open group). Removing an id the user does not have does nothing.
* **Bound.** At most ``max_groups`` groups: past it the groups with the oldest position are
  dropped, with their activities (an activity older than all of them is dropped at once).
* **Marks.** Seen: the groups become seen. Read: the groups become read *and* seen. For every
  group, a list of ids (unknown ones ignored), or every group at or above a position (what a
  client has shown when it received that page). ``unseen`` and ``unread`` count groups.

``feed/lua/notify.lua`` implements the same rules in Redis (``feed.notify_redis``);
``tests/integration/feed/test_notify_redis.py`` checks it against this module step by step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec

from feed.cursor import order_key
from feed.interfaces import ActorPage, Mark, Notify, NotifyOp, NotifyPage

__all__ = [
    "MemoryNotifications",
    "NotifyBook",
    "NotifyLimits",
    "NotifyRows",
    "group_json",
    "group_key",
    "iso_us",
]

#: Most actors a group shows inline; the rest are paged (``GET .../actors``).
INLINE_ACTORS = 10
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_encode = msgspec.json.Encoder().encode


def group_key(type_: str, object_: str) -> str:
    """The grouping key of an activity: 16 hex digits of a hash of ``type`` and ``object``
    (part of group ids, so those stay short and URL-safe whatever the object)."""
    return hashlib.blake2b(f"{type_}\x00{object_}".encode(), digest_size=8).hexdigest()


def iso_us(us: int) -> str:
    """RFC 3339 UTC time of µs since the epoch, as msgspec writes datetimes (and as
    ``notify.lua`` does): fraction only when not zero, then ``Z``."""
    return msgspec.json.decode(_encode(_EPOCH + timedelta(microseconds=us)))  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class NotifyRows:
    """One user's durable notification feed (``feed.notify_cassandra``): group rows (gid, gkey,
    type, object, opened, open, seen, read) and item rows (gid, aid, actor, ts)."""

    groups: list[tuple[str, str, str, str, int, bool, bool, bool]]
    items: list[tuple[str, str, str, int]]


@dataclass(frozen=True, slots=True)
class NotifyLimits:
    """The bounds of a notification feed (settings ``FEED_NOTIFY_*``)."""

    window_s: int = 86_400
    group_max: int = 1000
    max_groups: int = 200

    @property
    def window_us(self) -> int:
        return self.window_s * 1_000_000


@dataclass(slots=True)
class _Group:
    gid: str
    gkey: str
    type: str
    object: str
    opened: int
    items: dict[str, tuple[str, int]] = field(default_factory=dict)  # aid -> (actor, ts)
    seen: bool = False
    read: bool = False

    @property
    def position(self) -> str:
        return order_key(max(ts for _, ts in self.items.values()), self.gid)

    def newest(self) -> list[tuple[str, str]]:
        """Each actor with the position ``<ts16>\x1f<aid>`` of their newest activity here,
        newest first."""
        newest: dict[str, str] = {}
        for aid, (actor, ts) in self.items.items():
            at = f"{ts:016d}\x1f{aid}"
            if at > newest.get(actor, ""):
                newest[actor] = at
        return sorted(newest.items(), key=lambda kv: kv[1], reverse=True)

    def actors(self) -> list[str]:
        return [actor for actor, _ in self.newest()]


def group_json(group: _Group) -> bytes:
    """The group as the API shows it (``GET /v1/notifications``, ``notification`` frames)."""
    actors = group.actors()
    times = [ts for _, ts in group.items.values()]
    return _encode(
        {
            "id": group.gid,
            "type": group.type,
            "object": group.object,
            "actors": actors[:INLINE_ACTORS],
            "actor_count": len(actors),
            "activity_count": len(group.items),
            "first": iso_us(min(times)),
            "last": iso_us(max(times)),
            "seen": group.seen,
            "read": group.read,
        }
    )


class NotifyBook:
    """One user's notification feed, by the rules of the module doc."""

    def __init__(self, limits: NotifyLimits) -> None:
        self._limits = limits
        self.groups: dict[str, _Group] = {}
        self._open: dict[str, str] = {}
        self._where: dict[str, str] = {}

    def add(self, aid: str, actor: str, ts: int, type_: str, object_: str) -> None:
        if aid in self._where:
            return
        gkey = group_key(type_, object_)
        limits = self._limits
        group = self.groups.get(self._open.get(gkey, ""))
        if (
            group is None
            or ts - group.opened >= limits.window_us
            or len(group.items) >= limits.group_max
        ):
            base = gid = f"{gkey}-{ts}"
            suffix = 1
            while gid in self.groups:
                suffix += 1
                gid = f"{base}-{suffix}"
            group = self.groups[gid] = _Group(gid, gkey, type_, object_, ts)
            self._open[gkey] = gid
        group.items[aid] = (actor, ts)
        group.seen = group.read = False
        self._where[aid] = group.gid
        while len(self.groups) > limits.max_groups:
            self._drop(min(self.groups.values(), key=lambda g: g.position))

    def remove(self, aid: str) -> None:
        gid = self._where.pop(aid, None)
        if gid is None:
            return
        group = self.groups[gid]
        del group.items[aid]
        if not group.items:
            self._drop(group)

    def _drop(self, group: _Group) -> None:
        del self.groups[group.gid]
        for aid in group.items:
            del self._where[aid]
        if self._open.get(group.gkey) == group.gid:
            del self._open[group.gkey]

    def counts(self) -> tuple[int, int]:
        groups = self.groups.values()
        return sum(not g.seen for g in groups), sum(not g.read for g in groups)

    def mark(self, mark: Mark) -> tuple[int, int]:
        if mark.all:
            targets = list(self.groups.values())
        elif mark.through is not None:
            targets = [g for g in self.groups.values() if g.position >= mark.through]
        else:
            targets = [self.groups[g] for g in mark.groups if g in self.groups]
        for group in targets:
            group.seen = True
            if mark.read:
                group.read = True
        return self.counts()

    def ordered(self) -> list[_Group]:
        return sorted(self.groups.values(), key=lambda g: g.position, reverse=True)

    def page(self, before: str | None, limit: int) -> NotifyPage:
        groups = [g for g in self.ordered() if before is None or g.position < before]
        more = len(groups) > limit
        groups = groups[:limit]
        unseen, unread = self.counts()
        return NotifyPage(
            [group_json(g) for g in groups],
            groups[-1].position if more else None,
            unseen,
            unread,
        )

    def actors(self, gid: str, after: str | None, limit: int) -> ActorPage | None:
        group = self.groups.get(gid)
        if group is None:
            return None
        newest = [(a, at) for a, at in group.newest() if after is None or at < after]
        more = len(newest) > limit
        newest = newest[:limit]
        return ActorPage([a for a, _ in newest], newest[-1][1] if more else None)


class MemoryNotifications:
    """Notification feeds in memory (unit tests; the reference model of the property test):
    both the worker's :class:`~feed.interfaces.Notifications` and the gateway's
    :class:`~feed.interfaces.AsyncNotifications`. Frames are kept in :attr:`frames` (user,
    frame) instead of being published."""

    def __init__(self, limits: NotifyLimits | None = None) -> None:
        self.limits = limits or NotifyLimits()
        self.books: dict[str, NotifyBook] = {}
        self.frames: list[tuple[str, bytes]] = []

    def book(self, user: str) -> NotifyBook:
        book = self.books.get(user)
        if book is None:
            book = self.books[user] = NotifyBook(self.limits)
        return book

    def apply(self, ops: Sequence[NotifyOp]) -> int:
        for op in ops:
            book = self.book(op.user)
            if isinstance(op, Notify):
                book.add(op.activity_id, op.actor, op.ts, op.type, op.object)
            else:
                book.remove(op.activity_id)
        return len(ops)

    async def page(self, user: str, before: str | None, limit: int) -> NotifyPage:
        return self.book(user).page(before, limit)

    async def actors(self, user: str, gid: str, after: str | None, limit: int) -> ActorPage | None:
        return self.book(user).actors(gid, after, limit)

    async def counts(self, user: str) -> tuple[int, int]:
        return self.book(user).counts()

    async def mark(self, user: str, mark: Mark) -> tuple[int, int]:
        counts = self.book(user).mark(mark)
        self.frames.append(
            (
                user,
                _encode({"type": "notification_counts", "unseen": counts[0], "unread": counts[1]}),
            )
        )
        return counts
