"""Applying a batch of records to the stores: the fan-out itself, with no Kafka in it.

Order of writes for activities (so a concurrent follow never misses one): the activity and its
outbox row are written to Cassandra first, then the followers are read. A follow writes the graph
first, then reads the outbox for its backfill. Whichever runs second sees the other's write.

Idempotency is by activity id (:meth:`Processor._own`): the first create of an id owns it for
good (its Cassandra row: actor, ``published``, body); a later create of the id by the same actor
delivers nothing new, whatever its other fields; a create of an id owned by another actor is
rejected (``id_conflict``, to the DLQ) and changes nothing. A Delete is applied only by the
actor that created the id (``not_found`` / ``forbidden`` otherwise, changing nothing), and the
deleted state is durable (Cassandra), so a replayed create stays deleted even after Redis lost
its data. Every write is idempotent (keys derive from the activity id, the first create's
``published`` and the user), so a batch that fails part-way is simply applied again.

Pipelining (``apply(..., defer=True)``): the Redis write of a batch's trailing run of activities is
handed to one background thread and the call returns once the Cassandra rows are written. The
worker then prepares the next batch (its Cassandra writes) while Redis applies this one, and calls
:meth:`Processor.complete` before committing. The durable-rows-first order holds for every
activity; Redis writes stay in batch order (one thread, first in first out); deletes and follows
wait for every earlier Redis write first, so they never race an insert of the same activity.

The stores are the protocols of ``feed.interfaces`` (:class:`~feed.interfaces.Timelines`,
:class:`~feed.interfaces.History`, :class:`~feed.interfaces.FollowGraph`,
:class:`~feed.interfaces.GraphVersions`): the worker passes the Redis and Cassandra ones, unit
tests the in-memory ones of ``feed.memory``.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec
from cassandra import OperationTimedOut, ReadTimeout

from fanout.followers import FollowerCache
from feed.cursor import order_key, split_order_key
from feed.history_cassandra import BODIES_CHUNK
from feed.interfaces import (
    FollowGraph,
    GraphVersions,
    History,
    HistoryRecord,
    Insert,
    Notifications,
    Notify,
    Removal,
    Timelines,
    Unnotify,
)
from feed.logging import get_logger
from feed.stages import now_ms
from feed.tracing import Phase
from schemas.activity import Activity, encode_activity, published_us
from schemas.errors import FeedError
from schemas.follow import FollowEvent

__all__ = ["BatchStats", "Processor", "RejectedRecord"]


log = get_logger("fanout")


class RejectedRecord(FeedError):
    """A well-formed record that can never be applied (e.g. deleting someone else's activity)."""

    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        #: The field the refusal concerns (the DLQ's ``feed.error.field``).
        self.field = field


@dataclass(slots=True)
class BatchStats:
    activities: int = 0
    deletes: int = 0
    follows: int = 0
    inserted: int = 0
    pushed: int = 0
    history_rows: int = 0
    #: Notification groups written (``feed.notify``; replays included).
    notified: int = 0
    redis_s: float = 0.0
    cassandra_s: float = 0.0
    rejected: list[tuple[int, RejectedRecord]] = field(default_factory=list)
    #: When the last Redis write of the batch finished (ms since the epoch; ``feed.stages``).
    published_ms: float | None = None
    #: Redis writes still in flight (``apply(..., defer=True)``); :meth:`Processor.complete`.
    deferred: list[_Deferred] = field(default_factory=list)
    #: When each step ran (``feed.tracing.Phase``: name, start and end in ns since the epoch):
    #: the worker's spans for the batch, when it traces. A few clock reads per batch.
    phases: list[Phase] = field(default_factory=list)


@dataclass(slots=True)
class _Deferred:
    """One Redis write: ``run`` returns (inserted, pushed); ``future`` is its background run, or
    ``None`` once it failed there (then :meth:`Processor.complete` runs it again, in-line)."""

    run: Callable[[], tuple[int, int]]
    future: Future[tuple[int, int]] | None
    #: When the timelines, delivery streams and Pub/Sub got the batch, in ms since the epoch
    #: (set by the thread that ran the write).
    done_ms: float | None = None


class _Writer:
    """The one thread that runs the deferred Redis writes, first in first out, and the writes
    it has not finished: shared by a worker's processors (one per tenant, :meth:`with_stores`),
    so a delete or follow of any tenant waits for every earlier write, as with one tenant."""

    def __init__(self) -> None:
        self.executor: ThreadPoolExecutor | None = None
        self.in_flight: list[Future[tuple[int, int]]] = []


class Processor:
    def __init__(
        self,
        *,
        timelines: Timelines,
        history: History,
        graph: FollowGraph,
        versions: GraphVersions,
        followers: FollowerCache,
        history_timelines: bool = True,
        follow_backfill: int = 200,
        tombstone_ttl_s: int = 14 * 86_400,
        notifications: Notifications | None = None,
    ) -> None:
        self._timelines = timelines
        self._versions = versions
        self._history = history
        self._graph = graph
        self._followers = followers
        self._history_timelines = history_timelines
        self._backfill = follow_backfill
        self._tombstone_ttl = tombstone_ttl_s
        self._notifications = notifications
        self._w = _Writer()

    def with_stores(
        self,
        *,
        timelines: Timelines,
        history: History,
        graph: FollowGraph,
        versions: GraphVersions,
        followers: FollowerCache,
        notifications: Notifications | None,
    ) -> Processor:
        """A processor with the same settings and writer thread on other stores: another
        tenant's views of them (``docs/tenants.md``)."""
        other = copy.copy(self)  # the settings, and the one writer (shared, not copied)
        other._timelines, other._history, other._graph = timelines, history, graph
        other._versions, other._followers = versions, followers
        other._notifications = notifications
        return other

    def close(self) -> None:
        """Wait for the Redis writes in flight and stop the writer thread."""
        if self._w.executor is not None:
            self._w.executor.shutdown(wait=True)
            self._w.executor = None

    # --- batches -----------------------------------------------------------------------------
    def apply(
        self,
        events: Sequence[tuple[int, Activity | FollowEvent]],
        *,
        defer: bool = False,
        origins: Sequence[int | None] = (),
        traces: Sequence[str | None] = (),
    ) -> BatchStats:
        """Apply decoded events in order; ``int`` is the caller's index, used in ``rejected``.

        With ``defer``, the Redis write of the trailing run of activities may still be in flight
        when this returns: call :meth:`complete` on the result before treating it as applied.
        ``origins``: by the caller's index, when each record entered the pipeline (its Kafka
        timestamp, in ms): the ``ts`` of the frames pushed for it. ``traces``: by the caller's
        index, the ``traceparent`` of the worker's span for the record (``feed.tracing``), which
        the frames pushed for it carry.
        """
        stats = BatchStats()
        run: list[tuple[int, Activity]] = []
        for index, event in events:
            if isinstance(event, Activity) and not event.is_delete:
                run.append((index, event))
                continue
            self._apply_activities(run, stats, origins, traces)
            self.complete(stats)
            self._wait_in_flight()  # earlier batches' writes too: never race a delete or follow
            run = []
            started = time.time_ns()
            try:
                if isinstance(event, FollowEvent):
                    self._apply_follow(event, stats)
                else:
                    self._apply_delete(event, stats)
            except RejectedRecord as rejected:
                stats.rejected.append((index, rejected))
            finally:
                _phase(stats, "follow" if isinstance(event, FollowEvent) else "delete", started)
        self._apply_activities(run, stats, origins, traces, defer=defer)
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
            stats.published_ms = deferred.done_ms or now_ms()
            stats.deferred.pop(0)
        return stats

    def _wait_in_flight(self) -> None:
        """Wait until no background write runs (their owners' ``complete`` reports errors)."""
        for future in self._w.in_flight:
            with contextlib.suppress(Exception):
                future.result()
        self._w.in_flight = []

    def _defer(self, deferred: _Deferred, stats: BatchStats) -> None:
        w = self._w
        if w.executor is None:
            w.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis-writer")
        w.in_flight = [f for f in w.in_flight if not f.done()]
        deferred.future = future = w.executor.submit(deferred.run)
        w.in_flight.append(future)
        stats.deferred.append(deferred)

    # --- activities --------------------------------------------------------------------------
    def _own(
        self, run: list[tuple[int, Activity]], stats: BatchStats
    ) -> tuple[list[HistoryRecord], dict[str, list[str]], list[str], list[str]]:
        """Decide, for each distinct id of ``run``, whether this batch delivers it and with what.

        The first create of an id wins, for good: its row in Cassandra (owner, ``published``,
        body) is written once and never overwritten. Returns (records to deliver — the stored
        version for ids already created, in first-seen order; their ``to``; ids whose activity
        row must be written; claims to release once it is). A create of an id that another
        actor owns (or is creating right now) is rejected as ``id_conflict``; a create of a
        deleted id delivers nothing; a second create by the owner delivers nothing new (the
        stored version is delivered again, which is idempotent: a batch that failed half-way is
        completed by its replay).

        Concurrent creates of one new id (two actors' records on different partitions, or two
        workers after a rebalance) are serialised by a Redis claim (``c:<id>``, one script; on a
        Redis Cluster one ``SET NX GET`` per id) taken
        *before* Cassandra is read and released only after the activity row is written: of two
        racing creates, one holds the claim and the other either sees it or reads the row.
        Cassandra stays the authority: a claim only decides between creates of an id that has
        no row yet. One Redis and one Cassandra round trip per batch.
        """
        first: dict[str, tuple[int, Activity]] = {}
        actors: dict[str, set[str]] = {}
        for index, activity in run:
            first.setdefault(activity.id, (index, activity))
            actors.setdefault(activity.id, set()).add(activity.actor)
        ids = list(first)
        at = time.time_ns()
        claimed = self._timelines.claim([(i, first[i][1].actor) for i in ids], _CLAIM_TTL_S)
        holders = dict(zip(ids, claimed, strict=True))
        started, at = time.perf_counter(), _phase(stats, "redis claim", at)
        stored = self._history.stored_many(ids)  # after the claim: see the docstring
        stats.cassandra_s += time.perf_counter() - started
        _phase(stats, "cassandra read activities", at)
        records: list[HistoryRecord] = []
        to: dict[str, list[str]] = {}
        new: list[str] = []
        release = [i for i, (_, a) in first.items() if holders[i] == a.actor]
        owners: dict[str, str] = {}
        for activity_id, (_, activity) in first.items():
            row = stored.get(activity_id)
            if row is not None:
                owners[activity_id] = row.actor
                if row.live and row.actor in actors[activity_id]:
                    assert row.body is not None
                    records.append(HistoryRecord(activity_id, row.actor, row.ts, row.body, ()))
                    to[activity_id] = _addressees(row.body)
            else:
                holder = holders[activity_id]
                owners[activity_id] = holder
                if holder == activity.actor:
                    new.append(activity_id)
                    records.append(
                        HistoryRecord(
                            activity_id,
                            activity.actor,
                            published_us(activity),
                            encode_activity(activity),
                            (),
                        )
                    )
                    to[activity_id] = activity.to
        for index, activity in run:
            owner = owners[activity.id]
            if owner != activity.actor:
                stats.rejected.append(
                    (
                        index,
                        RejectedRecord(
                            "id_conflict",
                            f"activity id {activity.id!r} belongs to another actor: "
                            f"{activity.actor!r} cannot create it",
                            "id",
                        ),
                    )
                )
        return records, to, new, release

    def _apply_activities(
        self,
        run: list[tuple[int, Activity]],
        stats: BatchStats,
        origins: Sequence[int | None],
        traces: Sequence[str | None] = (),
        *,
        defer: bool = False,
    ) -> None:
        if not run:
            return
        records, to, new, release = self._own(run, stats)
        stats.activities += len(records)
        origin: dict[str, int | None] = {}  # the first record of each id gives its frames' ts
        if origins:
            for index, activity in run:
                if activity.id not in origin and index < len(origins):
                    origin[activity.id] = origins[index]
        trace: dict[str, str] = {}  # ... and their traceparent, if it was traced
        if traces:
            for index, activity in run:
                parent = traces[index] if index < len(traces) else None
                if parent is not None:
                    trace.setdefault(activity.id, parent)
        timelines = self._timelines
        if not records:
            if release:
                timelines.insert([], release=release)
            return
        started, at = time.perf_counter(), time.time_ns()
        self._history.put_activities(records, new=new)
        stats.cassandra_s += time.perf_counter() - started
        at = _phase(stats, "cassandra write activities", at)
        followers = self._followers.get_many(list({r.actor for r in records}))
        at = _phase(stats, "followers read", at)
        records = [
            HistoryRecord(
                r.activity_id,
                r.actor,
                r.ts,
                r.body,
                _recipients(to[r.activity_id], followers[r.actor] or ()),
            )
            for r in records
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
            _phase(stats, "cassandra write timelines", at)
        inserts = [
            Insert(
                order_key(r.ts, r.activity_id),
                r.activity_id,
                r.body,
                r.users,
                origin.get(r.activity_id),
                trace.get(r.activity_id),
            )
            for r in records
        ]
        # Large accounts: no fan-out on write; their outbox is merged into feeds at read time and
        # announced on their actor channel to the gateways where followers are connected.
        big = [
            (r.actor, Insert(order_key(r.ts, r.activity_id), r.activity_id, r.body, ()))
            for r in records
            if followers[r.actor] is None
        ]

        notify = self._notify_ops(records)

        def write() -> tuple[int, int]:
            at = time.time_ns()
            result = timelines.insert(inserts, release=release)
            deferred.done_ms = now_ms()  # published: the online followers have it
            # the timelines, delivery streams and Pub/Sub: one script (feed/lua/fanout.lua)
            at = _phase(stats, "redis write and publish", at)
            if big:
                timelines.add_to_outboxes(big)
                at = _phase(stats, "redis write outboxes", at)
            if recipients_after:
                history.put_deliveries(records, timelines=False)
                at = _phase(stats, "cassandra write recipients", at)
            if notify:
                assert self._notifications is not None
                stats.notified += self._notifications.apply(notify)
                _phase(stats, "redis write notifications", at)
            return result

        deferred = _Deferred(write, None)
        if defer:
            self._defer(deferred, stats)
        else:
            stats.deferred.append(deferred)

    def _notify_ops(self, records: Sequence[HistoryRecord]) -> list[Notify]:
        """The notification feed entries of ``records`` (their stored bodies' ``notify``, the
        actor left out): written in the same Redis step as the timelines, before the commit."""
        if self._notifications is None:
            return []
        ops: list[Notify] = []
        for r in records:
            if b'"notify"' not in r.body:
                continue
            head = _notified.decode(r.body)
            for user in dict.fromkeys(head.notify):
                if user != r.actor:
                    ops.append(Notify(user, r.activity_id, r.actor, r.ts, head.type, head.object))
        return ops

    # --- deletes -----------------------------------------------------------------------------
    def _apply_delete(self, event: Activity, stats: BatchStats) -> None:
        """Delete ``event.object`` if ``event.actor`` created it; else reject, changing nothing.

        Order: the deleted marker in Redis (scripts that write timelines or bodies skip the
        activity from now on), the durable ``deleted`` flag in Cassandra (a replayed create stays
        deleted even if Redis loses the marker), then every timeline the activity reached — fan-out
        recipients and backfilled followers — with a ``removed`` frame to those connected, then the
        recipient lists. A delete that fails half-way is completed by its replay: a deleted
        activity's owner and ``published`` stay, and so do its recipients until the end.
        """
        target = event.object
        stats.deletes += 1
        stored = self._history.stored(target)
        if stored is None:
            raise RejectedRecord(
                "not_found",
                f"{event.actor!r} cannot delete {target!r}: no such activity",
                "object",
            )
        if stored.actor != event.actor:
            raise RejectedRecord(
                "forbidden",
                f"{event.actor!r} cannot delete an activity of {stored.actor!r}",
                "object",
            )
        actor, ts = stored.actor, stored.ts
        self._timelines.mark_deleted([target], self._tombstone_ttl)
        if self._notifications is not None and stored.body is not None:
            # before the durable delete, which forgets the body (and so who was notified): a
            # delete replayed after that has nothing left to remove here
            notified = _notified.decode(stored.body).notify
            unnotify = [Unnotify(u, target) for u in dict.fromkeys(notified) if u != actor]
            stats.notified += self._notifications.apply(unnotify)
        self._history.mark_deleted(target, actor, ts)
        member = order_key(ts, target)
        for users in self._history.recipients(target):
            self._timelines.remove([Removal(member, target, users)])
            self._history.remove_from_timelines((u, ts, target) for u in users)
        self._timelines.remove_from_outbox(actor, member)
        self._timelines.delete_bodies([target])
        self._history.finish_delete(target)

    # --- follows -----------------------------------------------------------------------------
    def _apply_follow(self, event: FollowEvent, stats: BatchStats) -> None:
        """Apply a follow or unfollow to the graph, then to the follower's timeline according to
        the graph (which holds the later of the pair's events): following a fanned-out account
        backfills its newest activities; following a big account changes no timeline (merged at
        read time); not following removes the followee's activities (except those addressed to
        the follower)."""
        stats.follows += 1
        if event.type == "follow":
            self._graph.follow(event.follower, event.followee, event.at)
        else:
            self._graph.unfollow(event.follower, event.followee, event.at)
        # New versions (never a value seen before): every cache of the followee's followers or
        # of the follower's followees reloads, and the follower's gateways re-read whose actor
        # channels to follow (one round trip).
        followee_is_big = self._versions.follow_changed(event.follower, event.followee)
        self._followers.invalidate([event.followee])
        # Whatever the order the two events were applied in, the graph holds the later one:
        # backfill or clean up according to the graph, not to this event alone.
        following = self._graph.is_following(event.follower, event.followee)
        if not following:
            self._remove_followee(event.follower, event.followee, stats)
        elif not followee_is_big:
            self._backfill_follow(event.follower, event.followee, stats)
        # A big account followed: its outbox is merged at read time, so there is nothing to copy,
        # and what the follower already has from it (fanned out before it became big, or
        # addressed to them) stays.

    def _backfill_follow(self, follower: str, followee: str, stats: BatchStats) -> None:
        """Copy the followee's newest ``follow_backfill`` activities into the follower's timeline.

        The follower is recorded as a recipient of each (``backfilled``) *before* the timelines
        are written, so a Delete that runs at any moment afterwards reaches them; an activity
        deleted meanwhile has no body any more (skipped) or a deleted marker (the script skips
        it). Bodies are read in chunks of ``BODIES_CHUNK`` ids.
        """
        if self._backfill <= 0:
            return
        members = self._history.outbox(followee, self._backfill)
        if not members:
            return
        # Oldest first, so the follower's stream receives them in timeline order.
        members.reverse()
        for start in range(0, len(members), BODIES_CHUNK):
            chunk = [split_order_key(m) for m in members[start : start + BODIES_CHUNK]]
            bodies = self._history.bodies([activity_id for _, activity_id in chunk])
            live = [(ts, activity_id) for ts, activity_id in chunk if activity_id in bodies]
            if not live:
                continue
            self._history.add_backfilled((activity_id, follower) for _, activity_id in live)
            inserted, pushed = self._timelines.insert(
                [Insert(order_key(ts, aid), aid, bodies[aid], (follower,)) for ts, aid in live]
            )
            stats.inserted += inserted
            stats.pushed += pushed
            if self._history_timelines:
                stats.history_rows += self._history.write_timeline_rows(
                    (follower, ts, activity_id, followee) for ts, activity_id in live
                )

    def _remove_followee(self, follower: str, followee: str, stats: BatchStats) -> None:
        """Remove the followee's activities from the follower's timeline, except the ones
        addressed to the follower directly (``to``): those stay, as they would without a follow.

        The followee's newest ``_UNFOLLOW_SCAN`` activities are read page by page (keyset paging
        on the outbox, ``_UNFOLLOW_PAGE`` ids and their bodies at a time), so memory stays bounded
        whatever the outbox holds. A read that times out is tried again with a quarter of the
        page (down to ``_UNFOLLOW_MIN_PAGE``), from the same position: a page too large to read in
        time does not stop the partition. Only a timeout of the smallest page is raised (the
        worker treats it as an outage and retries the event, which is idempotent).
        """
        before: str | None = None
        scanned = 0
        size = _UNFOLLOW_PAGE
        while scanned < _UNFOLLOW_SCAN:
            wanted = min(size, _UNFOLLOW_SCAN - scanned)
            try:
                members = self._history.outbox(followee, wanted, before)
                split = [split_order_key(m) for m in members]
                bodies = self._history.bodies([activity_id for _, activity_id in split])
            except _READ_TIMEOUTS as exc:
                if size <= _UNFOLLOW_MIN_PAGE:
                    raise
                size = max(_UNFOLLOW_MIN_PAGE, size // 4)
                log.warning(
                    "unfollow_page_read_timed_out",
                    followee=followee,
                    page=size,
                    error=type(exc).__name__,
                )
                continue
            if not members:
                return
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
            self._timelines.remove(
                [Removal(m, activity_id, (follower,)) for m, _, activity_id in gone]
            )
            self._history.remove_from_timelines(
                (follower, ts, activity_id) for _, ts, activity_id in gone
            )
            scanned += len(members)
            before = members[-1]
            if len(members) < wanted:
                return


class _Addressed(msgspec.Struct):
    to: list[str] = []


_addressed = msgspec.json.Decoder(_Addressed)


class _Notified(msgspec.Struct):
    type: str
    object: str
    notify: list[str] = []


_notified = msgspec.json.Decoder(_Notified)


def _addressees(body: bytes) -> list[str]:
    return _addressed.decode(body).to


#: How many of a followee's newest activities an unfollow removes from the follower's timeline,
#: and how many it reads at a time (a page's bodies are one ``IN`` query), and at the least.
_UNFOLLOW_SCAN = 10_000
_UNFOLLOW_PAGE = 500
_UNFOLLOW_MIN_PAGE = 20
#: Read errors after which an unfollow tries a smaller page (the query, not the store, may be the
#: problem: too many ids for the timeout).
_READ_TIMEOUTS: tuple[type[BaseException], ...] = (ReadTimeout, OperationTimedOut)
#: How long a create's claim of a new id lives at most (it is released once the activity row is
#: written; the TTL only ends claims of workers that died in between).
_CLAIM_TTL_S = 600


def _phase(stats: BatchStats, name: str, started_ns: int) -> int:
    """Record that step ``name`` ran from ``started_ns`` until now; returns now (``time_ns``)."""
    now = time.time_ns()
    stats.phases.append((name, started_ns, now))
    return now


def _recipients(to: Sequence[str], followers: tuple[str, ...]) -> tuple[str, ...]:
    """The followers, then the ``to`` users who are not followers (each once)."""
    if not to:
        return followers
    known = set(followers)
    return followers + tuple(u for u in dict.fromkeys(to) if u not in known)
