"""In-memory implementations of every store protocol (``feed.interfaces``), for unit tests.

They keep the guarantees the protocols state (the shared suites in ``tests/support/suites`` run
against them and against Redis and Cassandra alike):

* timelines are sets of order keys, capped to the newest ``timeline_max``; inserts are
  idempotent; deleted markers keep an activity out; claims are first-wins;
* an online user (one with a presence, :class:`MemoryDeliveryStream`) gets, for each new entry or
  removal, the next delivery ``seq``, the frame appended to a stream bounded to
  ``stream_history`` frames and published on their channel, in the same step (under one lock);
* graph versions are ``<changes>.<random token>``, never repeated, installed when missing;
* the notifier (:class:`MemoryNotifier`) delivers each message, at most once and in publish
  order, to the links subscribed to its channel when it was published.

What they do not model: TTLs (nothing expires; :meth:`MemoryRedis.flush` loses everything at
once, as a Redis restart does), network failures other than the notifier's (a link lost:
:meth:`MemoryLink.kill`; no connection: :attr:`MemoryNotifier.refuse`; a half-open link:
:attr:`MemoryNotifier.silent`), and Cassandra's consistency levels.

One :class:`MemoryRedis` is one Redis: the sync and async timelines, the delivery stream and the
graph versions built on the same one see each other's writes, as they would on one server.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import msgspec
import redis.exceptions

from feed import keys
from feed.cursor import order_key, split_order_key
from feed.interfaces import (
    FollowerState,
    HistoryRecord,
    Insert,
    Presence,
    Removal,
    Stored,
    SubscriberLink,
    TimelinePage,
)
from feed.versions import new_token
from schemas import frames

__all__ = [
    "MemoryAsyncTimelines",
    "MemoryDeliveryStream",
    "MemoryFollowGraph",
    "MemoryGraphVersions",
    "MemoryHistory",
    "MemoryLink",
    "MemoryNotifier",
    "MemoryRedis",
    "MemoryTimelines",
]

_json = msgspec.json.Encoder()


def _aid(member: str) -> str:
    return split_order_key(member)[1]


def _newest(members: Iterable[str], before: str | None, limit: int) -> list[str]:
    ordered = sorted((m for m in members if before is None or m < before), reverse=True)
    return ordered[:limit]


# --- the notifier -------------------------------------------------------------------------------
class MemoryLink:
    """One subscriber connection of :class:`MemoryNotifier` (``feed.interfaces.SubscriberLink``).

    Confirmations, pongs and messages arrive through the loop (``call_soon_threadsafe``), in the
    order they were produced, never inside the call that caused them."""

    def __init__(
        self,
        notifier: MemoryNotifier,
        on_message: Callable[[bytes, bytes], None],
        on_subscribe: Callable[[bytes], None],
        on_pong: Callable[[], None],
    ) -> None:
        self._notifier = notifier
        self._on_message = on_message
        self._on_subscribe = on_subscribe
        self._on_pong = on_pong
        self._loop = asyncio.get_running_loop()
        self.channels: set[bytes] = set()
        self.closed: asyncio.Future[str] = self._loop.create_future()
        self.last_seen = self._loop.time()
        #: The channels :meth:`kill` said were rolled back (what the next link is asked about).
        self.killed_rolled_back: set[bytes] = set()

    def _check(self) -> None:
        if self.closed.done():
            raise redis.exceptions.ConnectionError("the link is closed")

    def _soon(self, callback: Callable[[], None]) -> None:
        def run() -> None:
            if not self.closed.done():
                self.last_seen = self._loop.time()
                callback()

        self._loop.call_soon_threadsafe(run)

    def subscribe(self, *channels: bytes) -> None:
        self._check()
        with self._notifier.lock:
            self.channels.update(channels)
        for channel in channels:
            self._soon(functools.partial(self._on_subscribe, channel))

    def unsubscribe(self, *channels: bytes) -> None:
        self._check()
        with self._notifier.lock:
            self.channels.difference_update(channels)

    def ping(self) -> None:
        self._check()
        if not self._notifier.silent:
            self._soon(self._on_pong)

    def rolled_back(self, channel: bytes, before: SubscriberLink) -> bool:
        return isinstance(before, MemoryLink) and channel in before.killed_rolled_back

    def deliver(self, channel: bytes, message: bytes) -> None:
        self._soon(functools.partial(self._on_message, channel, message))

    def kill(self, why: str = "connection lost", *, rolled_back: Iterable[bytes] = ()) -> None:
        """Lose the connection (what a Redis restart or a network failure does); the channels
        ``rolled_back`` as a Redis Cluster primary's death does (the next link's
        :meth:`rolled_back` says so)."""
        self.killed_rolled_back.update(rolled_back)
        with self._notifier.lock:
            self.channels.clear()
            if self in self._notifier.links:
                self._notifier.links.remove(self)
        if not self.closed.done():
            self.closed.set_result(why)

    async def aclose(self, timeout_s: float = 1.0) -> None:
        self.kill("closed by the gateway")


class MemoryNotifier:
    """Pub/Sub in memory: ``feed.interfaces.Subscriber`` plus :meth:`publish`.

    At-most-once, in publish order per channel: a message reaches the links subscribed to its
    channel at the moment it is published. :attr:`published` records every message (tests)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.links: list[MemoryLink] = []
        self.published: list[tuple[bytes, bytes]] = []
        #: While True, :meth:`open` fails as an unreachable server would.
        self.refuse = False
        #: While True, links answer no PING (a half-open connection).
        self.silent = False

    async def open(
        self,
        *,
        timeout_s: float,
        on_message: Callable[[bytes, bytes], None],
        on_subscribe: Callable[[bytes], None],
        on_pong: Callable[[], None],
    ) -> MemoryLink:
        if self.refuse:
            raise redis.exceptions.ConnectionError("the notifier refuses connections")
        link = MemoryLink(self, on_message, on_subscribe, on_pong)
        with self.lock:
            self.links.append(link)
        return link

    def publish(self, channel: bytes, message: bytes) -> int:
        """Hand ``message`` to every link subscribed to ``channel`` now; returns how many."""
        with self.lock:
            self.published.append((channel, message))
            receivers = [link for link in self.links if channel in link.channels]
        for link in receivers:
            link.deliver(channel, message)
        return len(receivers)

    def messages(self, channel: bytes) -> list[bytes]:
        """Every message published on ``channel`` so far (tests)."""
        with self.lock:
            return [m for c, m in self.published if c == channel]


# --- one Redis ----------------------------------------------------------------------------------
class MemoryRedis:
    """What one Redis holds, shared by the in-memory stores built on it."""

    def __init__(self, notifier: MemoryNotifier | None = None) -> None:
        self.notifier = notifier if notifier is not None else MemoryNotifier()
        self.lock = threading.RLock()  # one "script" at a time, as Redis runs them
        self.flush()

    def flush(self) -> None:
        """Lose every key (a Redis restart); the notifier's links stay."""
        with self.lock:
            self.timelines: dict[str, set[str]] = {}
            self.bodies: dict[str, bytes] = {}
            self.deleted: set[str] = set()
            self.claims: dict[str, str] = {}
            self.outboxes: dict[str, set[str]] = {}
            self.presence: dict[str, list[str | int]] = {}  # user -> [epoch, last seq]
            self.streams: dict[str, list[tuple[int, bytes]]] = {}
            self.active: dict[str, str] = {}  # user -> "1" (complete) or "b" (rebuilding)
            self.leases: dict[str, str] = {}
            self.versions: dict[str, bytes] = {}  # gv:/fv: key name -> version
            self.big: set[str] = set()

    # Everything below runs under ``lock`` (the callers take it).
    def deliver(self, user: str, head: bytes, tail: bytes, hist: int) -> bool:
        on = self.presence.get(user)
        if on is None:
            return False
        on[1] = int(on[1]) + 1
        frame = head + f"{on[0]}.{on[1]}".encode() + tail
        stream = self.streams.setdefault(user, [])
        stream.append((int(on[1]), frame))
        if len(stream) > hist:
            del stream[: len(stream) - hist]
        self.notifier.publish(keys.channel(user).encode(), frame)
        return True

    def fanout(
        self, inserts: Sequence[Insert], timeline_max: int, hist: int, only_active: bool
    ) -> tuple[int, int]:
        members: dict[str, Insert] = {}
        per_user: dict[str, list[str]] = {}
        for insert in inserts:
            if not insert.users:
                continue
            if insert.member not in members:
                members[insert.member] = insert
                self.bodies[insert.activity_id] = insert.body
            for user in insert.users:
                per_user.setdefault(user, []).append(insert.member)
        live = set()
        for member, insert in members.items():
            if insert.activity_id in self.deleted:
                self.bodies.pop(insert.activity_id, None)
            else:
                live.add(member)
        inserted = pushed = 0
        for user, mine in per_user.items():
            online = user in self.presence
            if not (online or not only_active or user in self.active):
                continue
            timeline = self.timelines.setdefault(user, set())
            fresh: list[str] = []
            added = 0
            for member in mine:
                if member not in live:
                    continue
                if member not in timeline:
                    timeline.add(member)
                    added += 1
                    if online:
                        fresh.append(member)
            if added:
                inserted += added
                self.trim(timeline, timeline_max)
            for member in fresh:
                if member not in timeline:
                    continue  # trimmed at once: not a new item of the hot timeline
                body = self.bodies.get(_aid(member), b"null")
                tail = frames.ACTIVITY_MIDDLE + body + frames.activity_tail(members[member].ts_ms)
                if self.deliver(user, frames.ACTIVITY_HEAD, tail, hist):
                    pushed += 1
            if not timeline:
                del self.timelines[user]
        return inserted, pushed

    def remove(
        self, removals: Iterable[tuple[str, str, Sequence[str]]], hist: int
    ) -> tuple[int, int]:
        removed = pushed = 0
        for member, activity_id, users in removals:
            tail = frames.REMOVED_MIDDLE + _json.encode(activity_id) + frames.REMOVED_TAIL
            for user in users:
                timeline = self.timelines.get(user)
                if timeline is not None and member in timeline:
                    timeline.discard(member)
                    removed += 1
                    pushed += self.deliver(user, frames.REMOVED_HEAD, tail, hist)
        return removed, pushed

    @staticmethod
    def trim(members: set[str], cap: int) -> None:
        if len(members) > cap:
            for member in sorted(members)[: len(members) - cap]:
                members.discard(member)

    def version(self, name: str) -> bytes:
        value = self.versions.get(name)
        if value is None:
            value = self.versions[name] = f"0.{new_token()}".encode()
        return value

    def bump(self, name: str) -> None:
        changes = int(self.version(name).partition(b".")[0]) + 1
        self.versions[name] = f"{changes}.{new_token()}".encode()

    def page(self, user: str, before: str | None, limit: int) -> TimelinePage:
        members = _newest(self.timelines.get(user, ()), before, limit)
        bodies = {m: self.bodies[_aid(m)] for m in members if _aid(m) in self.bodies}
        return TimelinePage(members, bodies)


# --- timelines ----------------------------------------------------------------------------------
class MemoryTimelines:
    """``feed.interfaces.Timelines`` in memory (the workers' side)."""

    def __init__(
        self,
        redis: MemoryRedis,
        *,
        timeline_max: int,
        stream_history: int,
        body_ttl_s: int = 0,
        only_active: bool = False,
    ) -> None:
        self.redis = redis
        self._max = timeline_max
        self._hist = stream_history
        self._only_active = only_active

    def insert(self, inserts: Sequence[Insert], *, release: Sequence[str] = ()) -> tuple[int, int]:
        with self.redis.lock:
            result = self.redis.fanout(inserts, self._max, self._hist, self._only_active)
            for activity_id in release:
                self.redis.claims.pop(activity_id, None)
        return result

    def claim(self, claims: Sequence[tuple[str, str]], ttl_s: int) -> list[str]:
        with self.redis.lock:
            return [self.redis.claims.setdefault(aid, actor) for aid, actor in claims]

    def mark_deleted(self, activity_ids: Sequence[str], ttl_s: int) -> None:
        with self.redis.lock:
            self.redis.deleted.update(activity_ids)

    def remove(self, removals: Sequence[Removal]) -> tuple[int, int]:
        with self.redis.lock:
            return self.redis.remove(
                ((r.member, r.activity_id, r.users) for r in removals), self._hist
            )

    def add_to_outboxes(self, items: Sequence[tuple[str, Insert]]) -> int:
        added = 0
        with self.redis.lock:
            for actor, item in items:
                if item.activity_id in self.redis.deleted:
                    continue
                self.redis.bodies[item.activity_id] = item.body
                outbox = self.redis.outboxes.setdefault(actor, set())
                if item.member in outbox:
                    continue
                outbox.add(item.member)
                added += 1
                self.redis.trim(outbox, self._max)
                message = b"+" + item.member.encode() + b"\n" + item.body
                self.redis.notifier.publish(keys.actor_channel(actor).encode(), message)
        return added

    def remove_from_outbox(self, actor: str, member: str) -> int:
        with self.redis.lock:
            outbox = self.redis.outboxes.get(actor, set())
            if member not in outbox:
                return 0
            outbox.discard(member)
            channel = keys.actor_channel(actor).encode()
            self.redis.notifier.publish(channel, b"-" + member.encode())
            return 1

    def delete_bodies(self, activity_ids: Iterable[str]) -> None:
        with self.redis.lock:
            for activity_id in activity_ids:
                self.redis.bodies.pop(activity_id, None)

    def page(self, user: str, before: str | None, limit: int) -> TimelinePage:
        with self.redis.lock:
            return self.redis.page(user, before, limit)

    def size(self, user: str) -> int:
        with self.redis.lock:
            return len(self.redis.timelines.get(user, ()))


class MemoryAsyncTimelines:
    """``feed.interfaces.AsyncTimelines`` in memory (the gateway's side)."""

    def __init__(self, redis: MemoryRedis) -> None:
        self.redis = redis

    async def insert_for(
        self,
        users: Sequence[str],
        member: str,
        body: bytes,
        *,
        timeline_max: int,
        stream_history: int,
        body_ttl_s: int,
    ) -> tuple[int, int]:
        with self.redis.lock:
            return self.redis.fanout(
                [Insert(member, _aid(member), body, users)], timeline_max, stream_history, False
            )

    async def remove_for(
        self, users: Sequence[str], member: str, *, stream_history: int
    ) -> tuple[int, int]:
        with self.redis.lock:
            return self.redis.remove([(member, _aid(member), users)], stream_history)

    async def page(self, user: str, before: str | None, limit: int) -> TimelinePage:
        with self.redis.lock:
            return self.redis.page(user, before, limit)

    async def touch(self, user: str, active_ttl_s: int, token: str = "1") -> int:
        r = self.redis
        with r.lock:
            state = r.active.get(user)
            if state is None:
                r.active[user] = "b"
                r.leases[user] = token
                return 1
            if state == "1":
                return 0
            if user not in r.leases:
                r.leases[user] = token
                return 1
            return 2

    async def rebuild(
        self,
        user: str,
        members: list[str],
        bodies: dict[str, bytes],
        *,
        timeline_max: int,
        body_ttl_s: int,
        token: str = "1",
    ) -> bool:
        r = self.redis
        with r.lock:
            added = False
            for member in members:
                activity_id = _aid(member)
                body = bodies.get(activity_id)
                if body is None or activity_id in r.deleted:
                    continue
                r.bodies[activity_id] = body
                r.timelines.setdefault(user, set()).add(member)
                added = True
            if added:
                r.trim(r.timelines[user], timeline_max)
            if r.leases.get(user) != token:
                return False
            del r.leases[user]
            if user in r.active:
                r.active[user] = "1"
            return True

    async def big_state(self, user: str) -> tuple[bytes, int]:
        with self.redis.lock:
            return self.redis.version(keys.following_version(user)), len(self.redis.big)

    async def big_accounts(self) -> list[str]:
        with self.redis.lock:
            return sorted(u for u in self.redis.big if u)

    async def big_among(self, users: Sequence[str]) -> list[str]:
        with self.redis.lock:
            return [u for u in users if u in self.redis.big]

    async def outbox_pages(
        self, actors: Sequence[str], before: str | None, limit: int
    ) -> dict[str, list[str]]:
        with self.redis.lock:
            return {a: _newest(self.redis.outboxes.get(a, ()), before, limit) for a in actors}

    async def bodies(self, members: list[str]) -> dict[str, bytes]:
        with self.redis.lock:
            found = self.redis.bodies
            return {m: found[_aid(m)] for m in members if _aid(m) in found}

    async def cache_bodies(self, bodies: dict[str, bytes], ttl_s: int) -> int:
        cached = 0
        with self.redis.lock:
            for activity_id, body in bodies.items():
                if activity_id not in self.redis.deleted:
                    self.redis.bodies[activity_id] = body
                    cached += 1
        return cached


class MemoryDeliveryStream:
    """``feed.interfaces.DeliveryStream`` in memory (frames come from the timelines' steps)."""

    def __init__(self, redis: MemoryRedis) -> None:
        self.redis = redis

    async def attach(self, user: str) -> Presence:
        r = self.redis
        with r.lock:
            on = r.presence.get(user)
            if on is None:
                r.streams.pop(user, None)
                on = r.presence[user] = [secrets.token_hex(4), 0]
            return Presence(str(on[0]), int(on[1]))

    async def renew(self, user: str, epoch: str) -> Presence:
        r = self.redis
        with r.lock:
            on = r.presence.get(user)
            if on is None or on[0] == epoch:
                r.streams.pop(user, None)
                on = r.presence[user] = [secrets.token_hex(4), 0]
            return Presence(str(on[0]), int(on[1]))

    async def refresh(self, users: Iterable[str]) -> list[str]:
        with self.redis.lock:
            return [u for u in users if u not in self.redis.presence]

    async def frames_after(self, user: str, seq: int, limit: int) -> list[tuple[int, bytes]]:
        with self.redis.lock:
            return [(s, f) for s, f in self.redis.streams.get(user, ()) if s > seq][:limit]

    async def oldest_seq(self, user: str) -> int | None:
        with self.redis.lock:
            stream = self.redis.streams.get(user)
            return stream[0][0] if stream else None


# --- graph versions -----------------------------------------------------------------------------
class MemoryGraphVersions:
    """``feed.interfaces.GraphVersions`` in memory."""

    def __init__(self, redis: MemoryRedis) -> None:
        self.redis = redis

    def follower_state(self, users: Sequence[str], *, big: bool) -> FollowerState:
        r = self.redis
        with r.lock:
            versions = [r.version(keys.graph_version(u)) for u in users]
            if not big:
                return FollowerState(versions, [False] * len(users), False)
            return FollowerState(versions, [u in r.big for u in users], not r.big)

    def add_big(self, users: Iterable[str]) -> None:
        with self.redis.lock:
            self.redis.big.update(["", *users])

    def follow_changed(self, follower: str, followee: str) -> bool:
        r = self.redis
        with r.lock:
            r.bump(keys.graph_version(followee))
            r.bump(keys.following_version(follower))
            big = followee in r.big
            r.notifier.publish(keys.channel(follower).encode(), keys.CONTROL_FOLLOWING)
        return big


# --- history ------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Row:
    actor: str | None = None
    ts: int = 0
    body: bytes | None = None
    recipients: list[str] = field(default_factory=list)
    deleted: bool = False


class MemoryHistory:
    """``feed.interfaces.History`` in memory (Cassandra's rows as dicts)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.activities: dict[str, _Row] = {}
        self.backfilled: dict[str, set[str]] = {}
        self.outboxes: dict[str, set[tuple[int, str]]] = {}
        self.timelines: dict[str, dict[tuple[int, str], str]] = {}
        self.big: set[str] = set()

    def put_activities(
        self, records: Sequence[HistoryRecord], *, new: Iterable[str] | None = None
    ) -> None:
        fresh = None if new is None else set(new)
        with self.lock:
            for r in records:
                if fresh is None or r.activity_id in fresh:
                    row = self.activities.setdefault(r.activity_id, _Row())
                    row.actor, row.ts, row.body = r.actor, r.ts, r.body
                self.outboxes.setdefault(r.actor, set()).add((r.ts, r.activity_id))

    def put_deliveries(self, records: Sequence[HistoryRecord], *, timelines: bool = True) -> int:
        count = 0
        with self.lock:
            for r in records:
                if r.users:
                    self.activities.setdefault(r.activity_id, _Row()).recipients = list(r.users)
                if timelines:
                    for user in r.users:
                        self.timelines.setdefault(user, {})[(r.ts, r.activity_id)] = r.actor
                    count += len(r.users)
        return count

    def write_timeline_rows(self, rows: Iterable[tuple[str, int, str, str]]) -> int:
        count = 0
        with self.lock:
            for user, ts, activity_id, actor in rows:
                self.timelines.setdefault(user, {})[(ts, activity_id)] = actor
                count += 1
        return count

    def remove_from_timelines(self, rows: Iterable[tuple[str, int, str]]) -> None:
        with self.lock:
            for user, ts, activity_id in rows:
                self.timelines.get(user, {}).pop((ts, activity_id), None)

    def add_backfilled(self, rows: Iterable[tuple[str, str]]) -> None:
        with self.lock:
            for activity_id, user in rows:
                self.backfilled.setdefault(activity_id, set()).add(user)

    def mark_deleted(self, activity_id: str, actor: str, ts: int) -> None:
        with self.lock:
            row = self.activities.setdefault(activity_id, _Row())
            row.deleted, row.body = True, None
            self.outboxes.get(actor, set()).discard((ts, activity_id))

    def finish_delete(self, activity_id: str) -> None:
        with self.lock:
            row = self.activities.get(activity_id)
            if row is not None:
                row.recipients = []
            self.backfilled.pop(activity_id, None)

    def stored(self, activity_id: str) -> Stored | None:
        return self.stored_many([activity_id]).get(activity_id)

    def stored_many(self, activity_ids: Sequence[str]) -> dict[str, Stored]:
        with self.lock:
            out: dict[str, Stored] = {}
            for activity_id in activity_ids:
                row = self.activities.get(activity_id)
                if row is not None and row.actor is not None:
                    out[activity_id] = Stored(row.actor, row.ts, row.body, row.deleted)
            return out

    def activity(self, activity_id: str) -> tuple[str, int, bytes] | None:
        stored = self.stored(activity_id)
        if stored is None or not stored.live or stored.body is None:
            return None
        return (stored.actor, stored.ts, stored.body)

    def recipients(self, activity_id: str, page_size: int = 5000) -> Iterator[list[str]]:
        with self.lock:
            row = self.activities.get(activity_id)
            direct = list(row.recipients) if row is not None else []
            later = sorted(self.backfilled.get(activity_id, ()))
        for users in (direct, later):
            for start in range(0, len(users), page_size):
                yield users[start : start + page_size]

    def page_timeline(self, user: str, before: str | None, limit: int) -> list[str]:
        with self.lock:
            rows = list(self.timelines.get(user, {}))
        return _history_page(rows, before, limit)

    def outbox(self, actor: str, limit: int, before: str | None = None) -> list[str]:
        with self.lock:
            rows = list(self.outboxes.get(actor, ()))
        return _history_page(rows, before, limit)

    def mark_big(self, user: str) -> None:
        with self.lock:
            self.big.add(user)

    def big_accounts(self) -> set[str]:
        with self.lock:
            return set(self.big)

    def bodies(self, activity_ids: Sequence[str]) -> dict[str, bytes]:
        with self.lock:
            out: dict[str, bytes] = {}
            for activity_id in activity_ids:
                row = self.activities.get(activity_id)
                if row is not None and row.body and not row.deleted:
                    out[activity_id] = row.body
            return out


def _history_page(rows: list[tuple[int, str]], before: str | None, limit: int) -> list[str]:
    after = split_order_key(before) if before is not None else None
    wanted = sorted((r for r in rows if after is None or r < after), reverse=True)
    return [order_key(ts, activity_id) for ts, activity_id in wanted[:limit]]


# --- follow graph -------------------------------------------------------------------------------
class MemoryFollowGraph:
    """``feed.interfaces.FollowGraph`` in memory: each pair keeps the write with the latest event
    time (at equal times a removal wins, as a Cassandra tombstone does)."""

    def __init__(self, *, page_size: int = 5000) -> None:
        self._page_size = page_size
        self.lock = threading.RLock()
        self._edges: dict[tuple[str, str], tuple[int, bool]] = {}  # (follower, followee)

    def _write(self, follower: str, followee: str, at: datetime, present: bool) -> None:
        ts = int(at.timestamp() * 1_000_000)
        with self.lock:
            old = self._edges.get((follower, followee))
            if old is None or ts > old[0] or (ts == old[0] and not present):
                self._edges[(follower, followee)] = (ts, present)

    def follow(self, follower: str, followee: str, at: datetime) -> None:
        self._write(follower, followee, at, True)

    def unfollow(self, follower: str, followee: str, at: datetime) -> None:
        self._write(follower, followee, at, False)

    def is_following(self, follower: str, followee: str) -> bool:
        with self.lock:
            edge = self._edges.get((follower, followee))
            return edge is not None and edge[1]

    def _sorted(self, user: str, side: int) -> list[str]:
        with self.lock:
            return sorted(
                pair[1 - side]
                for pair, (_, present) in self._edges.items()
                if present and pair[side] == user
            )

    def _pages(self, users: list[str]) -> Iterator[list[str]]:
        for start in range(0, len(users), self._page_size):
            yield users[start : start + self._page_size]

    def following_among(self, user: str, candidates: Sequence[str]) -> list[str]:
        wanted = set(candidates)
        return [u for u in self._sorted(user, 0) if u in wanted]

    def followers(self, user: str) -> Iterator[list[str]]:
        return self._pages(self._sorted(user, 1))

    def following(self, user: str) -> Iterator[list[str]]:
        return self._pages(self._sorted(user, 0))

    def followers_many(self, users: Sequence[str]) -> Iterator[tuple[str, Iterator[list[str]]]]:
        for user in users:
            yield user, self.followers(user)


if TYPE_CHECKING:  # every in-memory store conforms to its protocol (mypy checks this body)

    def _conforms(redis: MemoryRedis) -> None:
        from feed import interfaces

        _t: interfaces.Timelines = MemoryTimelines(redis, timeline_max=1, stream_history=1)
        _a: interfaces.AsyncTimelines = MemoryAsyncTimelines(redis)
        _d: interfaces.DeliveryStream = MemoryDeliveryStream(redis)
        _v: interfaces.GraphVersions = MemoryGraphVersions(redis)
        _s: interfaces.Subscriber = redis.notifier
        _h: interfaces.History = MemoryHistory()
        _g: interfaces.FollowGraph = MemoryFollowGraph()
