"""Applying a batch of records to the stores: the fan-out itself, with no Kafka in it.

Order of writes for activities (so a concurrent follow never misses one): the activity and its
outbox row are written to Cassandra first, then the followers are read. A follow writes the graph
first, then reads the outbox for its backfill. Whichever runs second sees the other's write.

Every write is idempotent (keys derive from the activity id, ``published`` and the user), so a
batch that fails part-way is simply applied again.

Pipelining (``apply(..., defer=True)``): the Redis write of a batch's trailing run of activities is
handed to one background thread and the call returns once the Cassandra rows are written. The
worker then prepares the next batch (its Cassandra writes) while Redis applies this one, and calls
:meth:`Processor.complete` before committing. The durable-rows-first order holds for every
activity; Redis writes stay in batch order (one thread, first in first out); deletes and follows
wait for every earlier Redis write first, so they never race an insert of the same activity.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec
import redis

from fanout.followers import FollowerCache
from feed import keys
from feed.cursor import order_key, split_order_key
from feed.graph_cassandra import CassandraFollowGraph
from feed.history_cassandra import CassandraHistory, HistoryRecord
from feed.timeline_redis import Insert, RedisTimelines, Removal
from schemas.activity import Activity, encode_activity, published_us
from schemas.follow import FollowEvent

__all__ = ["BatchStats", "Processor", "RejectedRecord"]


class RejectedRecord(Exception):
    """A well-formed record that can never be applied (e.g. deleting someone else's activity)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class BatchStats:
    activities: int = 0
    deletes: int = 0
    follows: int = 0
    inserted: int = 0
    pushed: int = 0
    history_rows: int = 0
    redis_s: float = 0.0
    cassandra_s: float = 0.0
    rejected: list[tuple[int, RejectedRecord]] = field(default_factory=list)
    #: Redis writes still in flight (``apply(..., defer=True)``); :meth:`Processor.complete`.
    deferred: list[_Deferred] = field(default_factory=list)


@dataclass(slots=True)
class _Deferred:
    """One Redis write: ``run`` returns (inserted, pushed); ``future`` is its background run, or
    ``None`` once it failed there (then :meth:`Processor.complete` runs it again, in-line)."""

    run: Callable[[], tuple[int, int]]
    future: Future[tuple[int, int]] | None


class Processor:
    def __init__(
        self,
        *,
        timelines: RedisTimelines,
        history: CassandraHistory,
        graph: CassandraFollowGraph,
        followers: FollowerCache,
        history_timelines: bool = True,
        follow_backfill: int = 200,
        tombstone_ttl_s: int = 14 * 86_400,
    ) -> None:
        self._timelines = timelines
        self._redis: redis.Redis = timelines.client
        self._history = history
        self._graph = graph
        self._followers = followers
        self._history_timelines = history_timelines
        self._backfill = follow_backfill
        self._tombstone_ttl = tombstone_ttl_s
        self._writer: ThreadPoolExecutor | None = None
        self._in_flight: list[Future[tuple[int, int]]] = []

    def close(self) -> None:
        """Wait for the Redis writes in flight and stop the writer thread."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    # --- batches -----------------------------------------------------------------------------
    def apply(
        self, events: Sequence[tuple[int, Activity | FollowEvent]], *, defer: bool = False
    ) -> BatchStats:
        """Apply decoded events in order; ``int`` is the caller's index, used in ``rejected``.

        With ``defer``, the Redis write of the trailing run of activities may still be in flight
        when this returns: call :meth:`complete` on the result before treating it as applied.
        """
        stats = BatchStats()
        run: list[Activity] = []
        for index, event in events:
            if isinstance(event, Activity) and not event.is_delete:
                run.append(event)
                continue
            self._apply_activities(run, stats)
            self.complete(stats)
            self._wait_in_flight()  # earlier batches' writes too: never race a delete or follow
            run = []
            try:
                if isinstance(event, FollowEvent):
                    self._apply_follow(event, stats)
                else:
                    self._apply_delete(event, stats)
            except RejectedRecord as rejected:
                stats.rejected.append((index, rejected))
        self._apply_activities(run, stats, defer=defer)
        if not defer:
            self.complete(stats)
        return stats

    def complete(self, stats: BatchStats) -> BatchStats:
        """Wait for ``stats``' deferred Redis writes, in order, and count them into ``stats``.

        A write that failed in the background is run again here; if it fails again the error is
        raised and the write stays pending, so calling ``complete`` again retries it (every write
        is idempotent). Returns ``stats``.
        """
        while stats.deferred:
            deferred = stats.deferred[0]
            started = time.perf_counter()
            if deferred.future is not None:
                future, deferred.future = deferred.future, None
                try:
                    inserted, pushed = future.result()
                except Exception:
                    inserted, pushed = deferred.run()  # again, in-line: raises if still failing
            else:
                inserted, pushed = deferred.run()
            stats.redis_s += time.perf_counter() - started
            stats.inserted += inserted
            stats.pushed += pushed
            stats.deferred.pop(0)
        return stats

    def _wait_in_flight(self) -> None:
        """Wait until no background write runs (their owners' ``complete`` reports errors)."""
        for future in self._in_flight:
            with contextlib.suppress(Exception):
                future.result()
        self._in_flight = []

    def _defer(self, run: Callable[[], tuple[int, int]], stats: BatchStats) -> None:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis-writer")
        self._in_flight = [f for f in self._in_flight if not f.done()]
        future = self._writer.submit(run)
        self._in_flight.append(future)
        stats.deferred.append(_Deferred(run, future))

    # --- activities --------------------------------------------------------------------------
    def _apply_activities(
        self, activities: list[Activity], stats: BatchStats, *, defer: bool = False
    ) -> None:
        if not activities:
            return
        unique: dict[str, Activity] = {}
        for activity in activities:
            unique.setdefault(activity.id, activity)
        ids = list(unique)
        tombstones = self._redis.mget([_tombstone(i) for i in ids])
        live = [unique[i] for i, dead in zip(ids, tombstones, strict=True) if dead is None]
        stats.activities += len(live)
        if not live:
            return
        records = [
            HistoryRecord(a.id, a.actor, published_us(a), encode_activity(a), ()) for a in live
        ]
        started = time.perf_counter()
        self._history.put_activities(records)
        stats.cassandra_s += time.perf_counter() - started
        followers = self._followers.get_many(list({a.actor for a in live}))
        records = [
            HistoryRecord(
                r.activity_id, r.actor, r.ts, r.body, _recipients(a, followers[a.actor] or ())
            )
            for r, a in zip(records, live, strict=True)
        ]
        # Durable rows first, then Redis: a timeline rebuilt from Cassandra at any moment misses
        # nothing that the Redis script skipped (it skips users who were inactive when it ran).
        # Without per-follower rows, only the recipient lists are left; deletes are their only
        # reader and wait for every earlier write, so they follow the Redis write instead of
        # adding a Cassandra round trip before delivery.
        history = self._history
        recipients_after = not self._history_timelines
        if not recipients_after:
            started = time.perf_counter()
            stats.history_rows += history.put_deliveries(records, timelines=True)
            stats.cassandra_s += time.perf_counter() - started
        inserts = [
            Insert(order_key(r.ts, r.activity_id), r.activity_id, r.body, r.users) for r in records
        ]
        # Large accounts: no fan-out on write; their outbox is merged into feeds at read time and
        # announced on their actor channel to the gateways where followers are connected.
        big = [
            (r.actor, Insert(order_key(r.ts, r.activity_id), r.activity_id, r.body, ()))
            for r in records
            if followers[r.actor] is None
        ]
        timelines = self._timelines

        def write() -> tuple[int, int]:
            result = timelines.insert(inserts)
            if big:
                timelines.add_to_outboxes(big)
            if recipients_after:
                history.put_deliveries(records, timelines=False)
            return result

        if defer:
            self._defer(write, stats)
        else:
            stats.deferred.append(_Deferred(write, None))

    # --- deletes -----------------------------------------------------------------------------
    def _apply_delete(self, event: Activity, stats: BatchStats) -> None:
        target = event.object
        stats.deletes += 1
        stored = self._history.activity(target)
        # Remember the deletion so a late or replayed create of the same id stays deleted.
        self._redis.set(_tombstone(target), event.actor, ex=self._tombstone_ttl)
        if stored is None:
            return
        actor, ts, _body = stored
        if actor != event.actor:
            self._redis.delete(_tombstone(target))
            raise RejectedRecord("forbidden", f"{event.actor} cannot delete an activity of {actor}")
        member = order_key(ts, target)
        for users in self._history.recipients(target):
            self._timelines.remove([Removal(member, target, users)])
            self._history.remove_from_timelines((u, ts, target) for u in users)
        self._timelines.remove_from_outbox(actor, member)
        self._history.delete_activity(target, actor, ts)
        self._timelines.delete_bodies([target])

    # --- follows -----------------------------------------------------------------------------
    def _apply_follow(self, event: FollowEvent, stats: BatchStats) -> None:
        stats.follows += 1
        if event.type == "follow":
            self._graph.follow(event.follower, event.followee, event.at)
        else:
            self._graph.unfollow(event.follower, event.followee, event.at)
        pipe = self._redis.pipeline(transaction=False)
        pipe.incr(keys.graph_version(event.followee))
        pipe.incr(keys.following_version(event.follower))
        pipe.sismember(keys.big_accounts, event.followee)
        # Gateways holding the follower re-read whose actor channels to follow (never forwarded).
        pipe.publish(keys.channel(event.follower), keys.CONTROL_FOLLOWING)
        followee_is_big = bool(pipe.execute()[2])
        self._followers.invalidate([event.followee])
        # Whatever the order the two events were applied in, the graph holds the later one:
        # backfill or clean up according to the graph, not to this event alone.
        following = self._graph.is_following(event.follower, event.followee)
        if following and not followee_is_big:  # a big account's outbox is merged at read time
            self._backfill_follow(event.follower, event.followee, stats)
        else:
            self._remove_followee(event.follower, event.followee, stats)

    def _backfill_follow(self, follower: str, followee: str, stats: BatchStats) -> None:
        if self._backfill <= 0:
            return
        members = self._history.outbox(followee, self._backfill)
        if not members:
            return
        split = [split_order_key(m) for m in members]
        bodies = self._history.bodies([activity_id for _, activity_id in split])
        inserts = [
            Insert(m, activity_id, bodies[activity_id], (follower,))
            for m, (_, activity_id) in zip(members, split, strict=True)
            if activity_id in bodies
        ]
        # Oldest first, so the follower's stream receives them in timeline order.
        inserted, pushed = self._timelines.insert(inserts[::-1])
        stats.inserted += inserted
        stats.pushed += pushed
        if self._history_timelines:
            stats.history_rows += self._history.write_timeline_rows(
                (follower, ts, activity_id, followee)
                for (ts, activity_id) in split
                if activity_id in bodies
            )

    def _remove_followee(self, follower: str, followee: str, stats: BatchStats) -> None:
        """Remove the followee's activities from the follower's timeline, except the ones
        addressed to the follower directly (``to``): those stay, as they would without a follow."""
        members = self._history.outbox(followee, _UNFOLLOW_SCAN)
        if not members:
            return
        split = [split_order_key(m) for m in members]
        bodies = self._history.bodies([activity_id for _, activity_id in split])
        keep = {
            activity_id
            for activity_id, body in bodies.items()
            if follower.encode() in body and follower in _addressees(body)
        }
        gone = [
            (m, ts, activity_id)
            for m, (ts, activity_id) in zip(members, split, strict=True)
            if activity_id not in keep
        ]
        self._timelines.remove([Removal(m, activity_id, (follower,)) for m, _, activity_id in gone])
        self._history.remove_from_timelines(
            (follower, ts, activity_id) for _, ts, activity_id in gone
        )


class _Addressed(msgspec.Struct):
    to: list[str] = []


_addressed = msgspec.json.Decoder(_Addressed)


def _addressees(body: bytes) -> list[str]:
    return _addressed.decode(body).to


#: How many of a followee's newest activities an unfollow removes from the follower's timeline.
_UNFOLLOW_SCAN = 10_000


def _tombstone(activity_id: str) -> str:
    return f"x:{activity_id}"


def _recipients(activity: Activity, followers: tuple[str, ...]) -> tuple[str, ...]:
    if not activity.to:
        return followers
    known = set(followers)
    return followers + tuple(u for u in dict.fromkeys(activity.to) if u not in known)
