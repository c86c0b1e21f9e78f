"""The store interfaces: one protocol per concept, each stating what it guarantees.

The fan-out worker (``fanout.processor``), the reader (``feed.reader``) and the gateway's hub
(``gateway.hub``) are written against these protocols, never against a backend. Each has a
real implementation and an in-memory one (for unit tests):

* :class:`Timelines` (the workers' side): ``feed.timelines_redis.RedisTimelines``;
  ``feed.memory.MemoryTimelines``.
* :class:`AsyncTimelines` (the gateway's side): ``feed.timelines_redis.AsyncRedisTimelines``;
  ``feed.memory.MemoryAsyncTimelines``.
* :class:`DeliveryStream`: ``feed.delivery_redis.AsyncRedisPresence``;
  ``feed.memory.MemoryDeliveryStream``.
* :class:`History`: ``feed.history_cassandra.CassandraHistory``; ``feed.memory.MemoryHistory``.
* :class:`FollowGraph`: ``feed.graph_cassandra.CassandraFollowGraph``;
  ``feed.memory.MemoryFollowGraph``.
* :class:`GraphVersions`: ``feed.graph_versions_redis.RedisGraphVersions``;
  ``feed.memory.MemoryGraphVersions``.
* :class:`Subscriber` (the notifier, as the hub reads it): ``gateway.pubsub.RedisSubscriber``;
  ``feed.memory.MemoryNotifier``.

Every protocol's docstring answers the same five questions: is a repeated call idempotent; what
is atomic; in which order things happen or are returned; is delivery at-most-once or
at-least-once; and how a consumer detects a gap. One shared test suite per protocol
(``tests/support/suites``) runs against both implementations.

The notifier is not one object: activity and ``removed`` frames are published by the timelines
(in the same atomic step that assigns their delivery ``seq``), large accounts' announcements by
:meth:`Timelines.add_to_outboxes`, and the follow-changed control message by
:meth:`GraphVersions.follow_changed`. What every publisher shares is stated once, here:

* **At-most-once.** A message reaches the subscribers of its channel at the moment it is
  published, in publish order per channel, or never (no subscriber, a connection down). Nothing
  is stored for later.
* **Gaps are detected elsewhere, never by the notifier.** Every frame for a client also went
  into the user's :class:`DeliveryStream` with a ``seq``: a subscriber that was (or may have
  been) disconnected reads the stream after the last ``seq`` it delivered. A large account's
  announcement lost with a link is caught up by the gateway once it has subscribed again
  (``gateway.hub``'s ``on_resubscribed``); a lost follow-changed notice shows as a new
  version (:class:`GraphVersions`) on the next read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

__all__ = [
    "ActorPage",
    "AsyncNotifications",
    "AsyncTimelines",
    "DeliveryStream",
    "FollowGraph",
    "FollowerState",
    "GraphVersions",
    "History",
    "HistoryRecord",
    "Insert",
    "Mark",
    "Notifications",
    "Notify",
    "NotifyOp",
    "NotifyPage",
    "Presence",
    "Removal",
    "Stored",
    "Subscriber",
    "SubscriberLink",
    "TimelinePage",
    "Timelines",
    "Unnotify",
]


# The values the stores take and return (owned here, with the protocols; every implementation
# imports them from this module).


@dataclass(frozen=True, slots=True)
class Insert:
    """One activity to insert into the timelines of ``users``."""

    member: str
    activity_id: str
    body: bytes
    users: Sequence[str]
    #: When the activity entered the pipeline (its Kafka record's timestamp), in ms since the
    #: epoch: the ``ts`` of the frames pushed for it (``schemas.frames.activity_tail``).
    ts_ms: int | None = None
    #: The fan-out worker's span for its record, when that trace is sampled: the frames'
    #: ``traceparent`` (``feed.tracing``).
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class Removal:
    """One activity to remove from the timelines of ``users``."""

    member: str
    activity_id: str
    users: Sequence[str]


@dataclass(frozen=True, slots=True)
class TimelinePage:
    members: list[str]
    bodies: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class Presence:
    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """One activity and the users whose timelines it reaches."""

    activity_id: str
    actor: str
    ts: int
    body: bytes
    users: Sequence[str]


@dataclass(frozen=True, slots=True)
class Stored:
    """What Cassandra holds for an activity id: its owner and order time (kept after a delete),
    its body (``None`` once deleted) and whether it was deleted."""

    actor: str
    ts: int
    body: bytes | None
    deleted: bool

    @property
    def live(self) -> bool:
        return not self.deleted and self.body is not None


@dataclass(frozen=True, slots=True)
class Notify:
    """Activity ``activity_id`` (by ``actor``, ``published`` µs ``ts``) reaches ``user``'s
    notification feed, in the group of its ``type`` + ``object`` (``feed.notify``)."""

    user: str
    activity_id: str
    actor: str
    ts: int
    type: str
    object: str


@dataclass(frozen=True, slots=True)
class Unnotify:
    """Activity ``activity_id`` was deleted: out of ``user``'s notification feed."""

    user: str
    activity_id: str


NotifyOp = Notify | Unnotify


@dataclass(frozen=True, slots=True)
class NotifyPage:
    """A page of groups, newest-updated first: each group's JSON (``feed.notify.group_json``),
    the position of the last one if there are more (a group position is the order key
    ``<last µs>:<group id>``), and the user's counts."""

    groups: list[bytes]
    next: str | None
    unseen: int
    unread: int


@dataclass(frozen=True, slots=True)
class ActorPage:
    """A page of a group's actors, newest first, and where the next page starts."""

    actors: list[str]
    next: str | None


@dataclass(frozen=True, slots=True)
class Mark:
    """Mark groups seen (``read=False``) or read (and seen): every group (``all``), every group
    at or above position ``through``, or the groups listed (unknown ids are ignored)."""

    read: bool
    all: bool = False
    groups: Sequence[str] = ()
    through: str | None = None


class Timelines(Protocol):
    """Hot timelines, written by the fan-out workers (synchronous).

    * **Idempotent.** A timeline is a set of order keys (``feed.cursor.order_key``): inserting an
      activity a user already has changes nothing and pushes nothing. Removing one they do not
      have pushes nothing. Bodies are stored once per activity, not per user.
    * **Atomic per user and call.** For each user, an :meth:`insert` or :meth:`remove` adds (or
      removes) the entries, trims to the cap (the newest ``timeline_max`` entries stay) and, for
      an *online* user (a :class:`DeliveryStream` presence), assigns each new entry the next
      delivery ``seq``, appends its frame to the user's delivery stream and publishes it, in one
      step. An entry the cap trims at once (older than the user's newest ``timeline_max``) is not
      pushed. Across users a call is not atomic; a failed call is simply made again.
    * **Deleted stays deleted.** After :meth:`mark_deleted`, no insert (of any caller, whatever
      it read before) writes the activity or its body back: checked in the same atomic step.
    * **Ordered.** :meth:`page` returns order keys newest first; a user's frames get ``seq`` in
      the order their entries reached the timeline (within a call, in insert order).
    * **Claims** (:meth:`claim`): of concurrent claims of one id, exactly one gets it; a claim
      lives until released (:meth:`insert`'s ``release``) or until its TTL.
    * **At-most-once push**; a subscriber detects a gap by the delivery ``seq``
      (:class:`DeliveryStream`). Offline users get no frame, only the timeline entry.
    """

    def insert(self, inserts: Sequence[Insert], *, release: Sequence[str] = ()) -> tuple[int, int]:
        """Insert each activity into its users' timelines, then release the claims of the ids in
        ``release``. Returns (entries inserted, frames pushed)."""
        ...

    def claim(self, claims: Sequence[tuple[str, str]], ttl_s: int) -> list[str]:
        """Claim each (activity id, actor) unless claimed already; returns, per id, the actor
        holding the claim now (this one, or the one who claimed first)."""
        ...

    def mark_deleted(self, activity_ids: Sequence[str], ttl_s: int) -> None:
        """Set the deleted markers (kept ``ttl_s``): these activities are never written again."""
        ...

    def remove(self, removals: Sequence[Removal]) -> tuple[int, int]:
        """Remove activities from users' timelines, pushing a ``removed`` frame to each online
        user who had the entry. Returns (entries removed, frames pushed)."""
        ...

    def add_to_outboxes(self, items: Sequence[tuple[str, Insert]]) -> int:
        """Large accounts' (actor, activity): add to the actor's capped outbox (unless deleted)
        and announce a new entry on the actor channel, once. Returns entries added."""
        ...

    def remove_from_outbox(self, actor: str, member: str) -> int:
        """Remove an entry from the actor's outbox (announced on the actor channel if it was
        there). Returns 1 if it was there, else 0."""
        ...

    def delete_bodies(self, activity_ids: Iterable[str]) -> None:
        """Forget the cached bodies of these activities."""
        ...

    def page(self, user: str, before: str | None, limit: int) -> TimelinePage:
        """Up to ``limit`` order keys strictly older than ``before``, newest first, with the
        bodies still cached (by order key)."""
        ...

    def size(self, user: str) -> int:
        """How many entries the user's hot timeline holds."""
        ...


class AsyncTimelines(Protocol):
    """Hot timelines as the gateway reads them (asyncio): pages, rebuilds, large accounts.

    * **Idempotent.** :meth:`insert_for` and :meth:`remove_for` are the same atomic steps as
      :meth:`Timelines.insert` / :meth:`Timelines.remove` (first insert wins and assigns the one
      ``seq``, however many gateways try). :meth:`rebuild` and :meth:`cache_bodies` may be
      repeated.
    * **Atomic.** :meth:`touch` decides hot / rebuild / rebuilding and takes the rebuild lease in
      one step (of concurrent touches of a cold user exactly one gets the lease); :meth:`rebuild`
      loads the entries and marks the timeline complete in one step, only if its lease still
      holds. :meth:`rebuild` and :meth:`cache_bodies` skip deleted activities in the same step.
    * **Ordered.** Pages and outbox pages are newest first, by order key, cut strictly before
      ``before``.
    * **Complete only when marked.** A timeline is trusted (``touch`` returns 0) only after a
      rebuild completed under a lease that still held; until then the caller reads history.
    * **Large accounts** (:meth:`big_state`): the follow version is never repeated
      (:class:`GraphVersions`), and the set of large accounts only grows, so (version, size) is
      a cache key that changes with every relevant change.
    * **At-most-once push, gaps by ``seq``**, as :class:`Timelines`: :meth:`insert_for` and
      :meth:`remove_for` push through the same step.
    """

    async def insert_for(
        self,
        users: Sequence[str],
        member: str,
        body: bytes,
        *,
        timeline_max: int,
        stream_history: int,
        body_ttl_s: int,
    ) -> tuple[int, int]: ...

    async def remove_for(
        self, users: Sequence[str], member: str, *, stream_history: int
    ) -> tuple[int, int]: ...

    async def page(self, user: str, before: str | None, limit: int) -> TimelinePage: ...

    async def touch(self, user: str, active_ttl_s: int, token: str = "1") -> int:
        """0: hot (complete); 1: rebuild now (the caller holds lease ``token``); 2: being
        rebuilt by someone else (read history)."""
        ...

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
        """Load entries read from history (``bodies`` by activity id; one without a body is left
        out) and mark the timeline complete if lease ``token`` still holds (True)."""
        ...

    async def big_state(self, user: str) -> tuple[bytes, int]:
        """(version of whom ``user`` follows, size of the large-account set with its sentinel)."""
        ...

    async def big_accounts(self) -> list[str]:
        """The large accounts (sentinel left out)."""
        ...

    async def big_among(self, users: Sequence[str]) -> list[str]:
        """Which of ``users`` are large accounts, in the order given."""
        ...

    async def outbox_pages(
        self, actors: Sequence[str], before: str | None, limit: int
    ) -> dict[str, list[str]]:
        """Each large account's newest outbox order keys strictly older than ``before``."""
        ...

    async def bodies(self, members: list[str]) -> dict[str, bytes]:
        """Cached bodies by order key (members without one are left out)."""
        ...

    async def cache_bodies(self, bodies: dict[str, bytes], ttl_s: int) -> int:
        """Cache bodies (by activity id) read from history, except deleted ones; returns how
        many were cached."""
        ...


class DeliveryStream(Protocol):
    """Presence and the per-user delivery stream: what makes resume gap-free.

    * **Idempotent.** :meth:`attach` of a user already online keeps their epoch and ``seq``; it
      starts a new epoch (``seq`` 0, empty stream) only when there is none.
    * **Atomic.** ``seq`` is assigned, the frame appended and published in the timelines' one
      step, so ``seq`` order is stream order is publish order, with no hole.
    * **Ordered.** :meth:`frames_after` returns frames by ascending ``seq``.
    * **Bounded.** The stream keeps at least the newest ``stream_history`` frames (Redis trims
      approximately: it may keep more); :meth:`oldest_seq` says where it starts.
    * **Read, not pushed: repeatable.** A frame can be read any number of times until it is
      trimmed; a consumer that resumes after the last ``seq`` it delivered delivers each frame
      once (the live push, by contrast, is at-most-once).
    * **Gap detection.** A consumer that delivered up to ``seq`` reads :meth:`frames_after`; if
      :meth:`oldest_seq` is above ``seq + 1`` the frames between are gone (resume is impossible:
      reset). A lost presence (Redis restart) shows as a new epoch on :meth:`attach`, and as the
      user being returned by :meth:`refresh`.
    """

    async def attach(self, user: str) -> Presence:
        """Mark the user online (or keep them so): the stream's epoch and last ``seq``."""
        ...

    async def renew(self, user: str, epoch: str) -> Presence:
        """:meth:`attach`, but if the stream is still at ``epoch``, start a new epoch (``seq``
        0, empty stream) anyway: its newest seqs may have been rolled back (a Redis Cluster
        failover promoted a replica that lacked them) and would be handed out again for other
        frames. Compare-and-set: of several callers that saw ``epoch``, one renews it and the
        others get the new epoch."""
        ...

    async def refresh(self, users: Iterable[str]) -> list[str]:
        """Extend presence of connected users; returns those whose presence was gone."""
        ...

    async def frames_after(self, user: str, seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Frames with ``seq`` above ``seq``, oldest first, at most ``limit``."""
        ...

    async def oldest_seq(self, user: str) -> int | None:
        """The oldest ``seq`` the stream still holds (None if empty)."""
        ...


class History(Protocol):
    """Durable history (Cassandra): activities, outboxes, per-user timelines, recipients.

    * **Idempotent.** Every row's key derives from the activity (id, published µs) and the user:
      a replayed write overwrites the same row. An id's activity row is written once, by its
      first create (``new`` of :meth:`put_activities`), and never overwritten.
    * **Atomic: nothing across rows.** Writes go in unlogged batches; a failed call is made again
      as a whole (safe because idempotent).
    * **Deletes are durable.** :meth:`mark_deleted` keeps owner and ``published`` with
      ``deleted`` set and no body: :meth:`stored` still names the owner, :meth:`bodies` and
      :meth:`activity` leave it out. Recipients stay until :meth:`finish_delete`.
    * **Ordered like the hot timelines.** :meth:`page_timeline` and :meth:`outbox` return order
      keys newest first, strictly older than ``before``, so a page continues from Redis into
      history at the same position with no gap and no repeat.
    * **Bounded reads.** :meth:`recipients` yields pages; body reads are chunked.
    * **Durable, applied at-least-once.** A write that returned is kept (ownership rows at
      ``LOCAL_QUORUM``); callers retry failed writes, which idempotency makes safe. No push.
    * **No gap to detect in a read:** pages continue at a cursor; an entry whose activity was
      deleted has no body (:meth:`bodies` leaves it out), so readers skip it.
    """

    def put_activities(
        self, records: Sequence[HistoryRecord], *, new: Iterable[str] | None = None
    ) -> None: ...

    def put_deliveries(
        self, records: Sequence[HistoryRecord], *, timelines: bool = True
    ) -> int: ...

    def write_timeline_rows(self, rows: Iterable[tuple[str, int, str, str]]) -> int: ...

    def remove_from_timelines(self, rows: Iterable[tuple[str, int, str]]) -> None: ...

    def add_backfilled(self, rows: Iterable[tuple[str, str]]) -> None: ...

    def mark_deleted(self, activity_id: str, actor: str, ts: int) -> None: ...

    def finish_delete(self, activity_id: str) -> None: ...

    def stored(self, activity_id: str) -> Stored | None: ...

    def stored_many(self, activity_ids: Sequence[str]) -> dict[str, Stored]: ...

    def activity(self, activity_id: str) -> tuple[str, int, bytes] | None: ...

    def recipients(self, activity_id: str, page_size: int = ...) -> Iterator[list[str]]: ...

    def page_timeline(self, user: str, before: str | None, limit: int) -> list[str]: ...

    def outbox(self, actor: str, limit: int, before: str | None = None) -> list[str]: ...

    def mark_big(self, user: str) -> None: ...

    def big_accounts(self) -> set[str]: ...

    def bodies(self, activity_ids: Sequence[str]) -> dict[str, bytes]: ...


class FollowGraph(Protocol):
    """The follow graph, both directions.

    * **Idempotent, ordered by event time.** A follow and an unfollow of one pair carry the
      event's time: the later event wins whatever order they are applied in, and a replay
      changes nothing.
    * **Atomic: no.** The two directions are two writes; a failed call is made again.
    * **Ordered reads.** :meth:`following_among` returns followees ascending.
    * **Bounded memory.** :meth:`followers` and :meth:`following` yield pages.
    * **Applied at-least-once** (the fan-out replays events after a failure): safe, since the
      event time decides.
    * **Changes are detected through** :class:`GraphVersions` (a new version per change), not
      by the graph itself.
    """

    def follow(self, follower: str, followee: str, at: datetime) -> None: ...

    def unfollow(self, follower: str, followee: str, at: datetime) -> None: ...

    def is_following(self, follower: str, followee: str) -> bool: ...

    def following_among(self, user: str, candidates: Sequence[str]) -> list[str]: ...

    def followers(self, user: str) -> Iterator[list[str]]: ...

    def following(self, user: str) -> Iterator[list[str]]: ...

    def followers_many(self, users: Sequence[str]) -> Iterator[tuple[str, Iterator[list[str]]]]: ...


@dataclass(frozen=True, slots=True)
class FollowerState:
    """What :meth:`GraphVersions.follower_state` read in one step."""

    #: Per user, the version of their followers (never empty, never repeated).
    versions: list[bytes]
    #: Per user, whether they are a large account (all False when not asked).
    big: list[bool]
    #: The large-account set was lost (not even its sentinel): reload it from history.
    big_lost: bool


class GraphVersions(Protocol):
    """Versions of the follow graph (``feed.versions``), the large-account set, and the
    follow-changed notice: what the caches built on the graph rely on.

    * **Never repeated.** Every change sets a version no one saw before, even after the store
      lost its data; a missing version is replaced by a fresh one before it is returned. A cache
      entry read under version V is current exactly while the version is V.
    * **Idempotent:** no. Every :meth:`follow_changed` is a new version (a replay costs a cache
      reload, never a stale entry). :meth:`add_big` is idempotent (the set only grows).
    * **Atomic: one round trip, not one step.** :meth:`follow_changed` bumps both versions, reads
      whether the followee is large and publishes the control notice together; each part is
      atomic on its own.
    * **Ordered: only by equality.** A version counts changes since the store last lost it,
      but caches compare versions for equality only, never for order.
    * **At-most-once notice.** The follower's gateways get ``feed.keys.CONTROL_FOLLOWING`` on the
      user's channel if they are subscribed then; one that missed it still sees the new version
      (:meth:`AsyncTimelines.big_state`) on its next read: the version, not the notice, is the
      gap detector.
    """

    def follower_state(self, users: Sequence[str], *, big: bool) -> FollowerState:
        """The current follower versions of ``users`` (installing fresh ones where missing) and,
        if ``big``, which of them are large accounts."""
        ...

    def add_big(self, users: Iterable[str]) -> None:
        """Add ``users`` (and the set's sentinel) to the large-account set."""
        ...

    def follow_changed(self, follower: str, followee: str) -> bool:
        """A follow or unfollow was written to the graph: new versions of the followee's
        followers and of whom the follower follows, and the notice to the follower's gateways.
        Returns whether the followee is a large account."""
        ...


class SubscriberLink(Protocol):
    """One subscriber connection (the hub holds one per process). Callbacks given at open."""

    #: Done when the connection is lost; its result says why.
    closed: asyncio.Future[str]

    @property
    def last_seen(self) -> float:
        """Loop time of the last data received (the hub pings an idle connection)."""
        ...

    def subscribe(self, *channels: bytes) -> None:
        """Ask for ``channels``; each confirmation arrives through ``on_subscribe``. Raises
        ``redis.exceptions.ConnectionError`` once closed."""
        ...

    def unsubscribe(self, *channels: bytes) -> None: ...

    def ping(self) -> None:
        """The answer arrives through ``on_pong``."""
        ...

    def rolled_back(self, channel: bytes, before: SubscriberLink) -> bool:
        """Asked of a new link about the link it replaces: True if the server now behind
        ``channel`` may lack writes that the one behind it in ``before`` acknowledged (a Redis
        Cluster primary's connection was lost, or its replica has taken its slot over: Redis
        replicates asynchronously). The hub then renews the user's delivery stream
        (``DeliveryStream.renew``) instead of trusting its seqs."""
        ...

    async def aclose(self, timeout_s: float = 1.0) -> None: ...


class Subscriber(Protocol):
    """Opens subscriber connections to the notifier (see the module doc for its guarantees).

    * **Confirmed subscriptions.** A message published after ``on_subscribe(channel)`` was called
      reaches ``on_message`` (while the link is open); one published before may not.
    * **Ordered.** Messages of one channel arrive in publish order.
    * **At-most-once.** Nothing published while a link is down or unsubscribed is delivered later.
    * **Idempotent subscribe.** Subscribing a channel twice is one subscription (each request
      is confirmed); one unsubscribe ends it. **Atomic:** each request on its own.
    * **Gap detection** is the subscriber's: when a link is lost (``closed``), the hub opens a new
      one, subscribes again and has every connection check its delivery stream.
    """

    async def open(
        self,
        *,
        timeout_s: float,
        on_message: Callable[[bytes, bytes], None],
        on_subscribe: Callable[[bytes], None],
        on_pong: Callable[[], None],
    ) -> SubscriberLink:
        """Connect; raises ``redis.exceptions.ConnectionError`` (or ``TimeoutError``) if not."""
        ...


class Notifications(Protocol):
    """Notification feeds as the fan-out workers write them (synchronous).

    * **Idempotent.** An activity a user already has in their notification feed changes nothing
      (a replay); removing one they do not have changes nothing.
    * **Atomic per user and call.** Each user's operations of a call are applied in one step:
      grouping, counts and the live frames of the groups that changed.
    * **Ordered.** Operations apply in the order given; groups are paged by position.
    * **Durable before it returns**, applied at-least-once: a failed call is simply made again.
    * **At-most-once push** of ``notification`` frames to the user's online connections; the
      client's gap detector is ``GET /v1/notifications`` (read again after a reconnect).
    """

    def apply(self, ops: Sequence[NotifyOp]) -> int:
        """Apply the operations; returns how many groups changed (or were written again)."""
        ...


class AsyncNotifications(Protocol):
    """Notification feeds as the gateway reads and marks them (asyncio): same state and rules
    as :class:`Notifications`. A mark is atomic, returns the new (unseen, unread) and tells the
    user's online connections (``notification_counts``, at-most-once)."""

    async def page(self, user: str, before: str | None, limit: int) -> NotifyPage: ...

    async def actors(self, user: str, gid: str, after: str | None, limit: int) -> ActorPage | None:
        """A page of the group's actors (None if the user has no such group)."""
        ...

    async def counts(self, user: str) -> tuple[int, int]: ...

    async def mark(self, user: str, mark: Mark) -> tuple[int, int]: ...


if TYPE_CHECKING:  # the Redis and Cassandra stores conform (mypy checks this body)

    def _conforms() -> None:
        from typing import Any

        from feed.delivery_redis import AsyncRedisPresence
        from feed.graph_cassandra import CassandraFollowGraph
        from feed.graph_versions_redis import RedisGraphVersions
        from feed.history_cassandra import CassandraHistory
        from feed.timelines_redis import AsyncRedisTimelines, RedisTimelines

        c: Any = None
        _t: Timelines = RedisTimelines(c, timeline_max=1, stream_history=1, body_ttl_s=1)
        _a: AsyncTimelines = AsyncRedisTimelines(c)
        _d: DeliveryStream = AsyncRedisPresence(c, ttl_s=1)
        _v: GraphVersions = RedisGraphVersions(c)
        _h: History = CassandraHistory(c, "ks")
        _g: FollowGraph = CassandraFollowGraph(c, "ks")
