"""The process-wide registry of local WebSocket connections and their one Pub/Sub connection.

Guarantees (what ``gateway.connection`` and ``gateway.big_accounts`` rely on):

* **Subscribed only where needed.** One Redis Pub/Sub connection per gateway process. A user's
  channel (``feed.keys.channel``) is SUBSCRIBEd when their first local connection registers and
  UNSUBSCRIBEd when the last one leaves; there is no pattern subscription.
* **Confirmed before use.** :meth:`Hub.register` returns only once Redis has confirmed the
  subscription, so anything published after it returns reaches the connection. The adapter attaches
  presence (which fixes the welcome cursor) after that: no frame can fall between the two.
* **Encoded once.** A published message is handed, as the same ``bytes`` object, to every local
  connection of its user.
* **At-most-once, with gap detection.** Pub/Sub may lose messages while its connection is down.
  When the connection is re-established (only ever by this hub), every affected connection is
  told to :meth:`~LocalConnection.check_gap`: it re-reads its delivery stream after the last frame
  it delivered. A half-open connection is detected by PINGs on an idle connection.
* **No await per message.** The connection (``feed.interfaces.Subscriber``; in production a
  :class:`gateway.pubsub.PubSubLink` from ``gateway.pubsub.RedisSubscriber``): each chunk
  read from Redis is parsed at once and its messages dispatched synchronously to the local
  connections (which write to their sockets right there when they can).
* **Large accounts' channels, only while needed.** :meth:`Hub.follow_actors` records which large
  accounts (merged at read time, not fanned out on write) each local user follows; an actor's
  channel (``feed.keys.actor_channel``) is subscribed while at least one local user follows it,
  and each message on it is handed once, with the list of local followers, to
  ``on_actor_message`` (the app inserts it into those users' timelines, which delivers it).
  :meth:`Hub.actors_subscribed` waits until Redis confirmed given actor channels. After a
  Pub/Sub reconnect, once a user's presence is re-attached, ``on_resubscribed`` tells the app
  (what their large accounts announced meanwhile was lost with the connection).
* **Control frames stay inside.** A frame on a user's channel that starts with ``{"type":"_`` is
  for the gateway (``feed.keys.CONTROL_FOLLOWING``: whom the user follows changed) and goes to
  ``on_following_changed``, never to a client.
* **Presence kept alive.** Every ``refresh_interval_s`` the presence and delivery stream of every
  locally connected user get their TTL renewed (``DeliveryStream.refresh``).
* **Rolled-back streams left.** On a Redis Cluster, a primary whose connection was lost, or whose
  replica has taken its slots over (``SubscriberLink.rolled_back``, asked of each new link about
  the one it replaces), may have lost its newest writes: seqs already pushed could be handed out
  again for other frames, and the sessions would drop those as repeats. So the users on it get
  their stream *renewed* (``DeliveryStream.renew``: a new epoch unless someone renewed it
  already) instead of re-attached, and their sessions send ``reset`` and follow the new epoch.
* **Presence restored.** Redis may lose presence hashes and delivery streams (a restart empties
  it). After every Pub/Sub re-subscription, and for every user whose presence a refresh found
  gone, the hub re-attaches the user's presence (``DeliveryStream.attach``: the same epoch
  if it survived, a new one if not) *before* telling the connections to check for gaps, and
  hands each connection a presence frame (``gateway.session.presence_frame``) through
  :meth:`LocalConnection.deliver`: a session on a lost epoch sends ``reset`` and follows the
  new one. An online user is written and pushed to again as soon as presence is back (the
  fan-out script treats presence as activity), even before they read their feed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import Protocol

import redis.exceptions
import structlog

from feed import keys
from feed.interfaces import DeliveryStream, Subscriber, SubscriberLink
from feed.stages import StageHistogram, now_ms
from gateway.session import RESET_CONTROL, presence_frame
from schemas.errors import FeedError
from schemas.frames import frame_ts_ms

__all__ = ["Hub", "HubUnavailable", "LocalConnection", "TooManyConnections"]

log = structlog.get_logger("gateway.hub")

#: Users per presence-refresh pipeline (two EXPIREs each).
_REFRESH_BATCH = 1000
_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
_CONTROL_PREFIX = b'{"type":"_'
#: Attempts (and the first pause between them) to re-attach a user's presence.
_REATTACH_ATTEMPTS = 5
_REATTACH_PAUSE_S = 0.2


class HubUnavailable(FeedError, RuntimeError):
    """The Pub/Sub connection could not confirm a subscription in time."""


class TooManyConnections(FeedError):
    """The user already holds the most local connections allowed."""

    def __init__(self, user: str, limit: int) -> None:
        super().__init__(f"{limit} connections of this user already")
        self.user = user
        self.limit = limit


class LocalConnection(Protocol):
    """What the hub needs from one local WebSocket connection. Every method is synchronous."""

    @property
    def user(self) -> str: ...

    def deliver(self, frame: bytes) -> None:
        """A frame published on the user's channel, or the hub's presence frame (for the
        session only, never for the client)."""

    def check_gap(self) -> None:
        """Live frames may have been lost: compare with the delivery stream."""

    @property
    def epoch(self) -> str | None:
        """The delivery stream epoch the session follows (None before it starts)."""
        ...

    def shutdown(self) -> None:
        """The process is going away: close with 1001."""


class Hub:
    def __init__(
        self,
        subscriber: Subscriber,
        presence: DeliveryStream,
        *,
        refresh_interval_s: float,
        subscribe_timeout_s: float = 5.0,
        idle_ping_s: float = 5.0,
        ping_timeout_s: float = 5.0,
        reconnect_max_s: float = 1.0,
        received: StageHistogram | None = None,
    ) -> None:
        self._subscriber = subscriber
        self._received = received
        self._presence = presence
        self._refresh_interval = refresh_interval_s
        self._subscribe_timeout = subscribe_timeout_s
        self._idle_ping = idle_ping_s
        self._ping_timeout = ping_timeout_s
        self._reconnect_max = reconnect_max_s
        self._conns: dict[str, set[LocalConnection]] = {}
        self._channels: dict[bytes, str] = {}  # subscribed (wanted) channel -> user
        self._pending: dict[bytes, int] = {}  # SUBSCRIBEs sent and not yet confirmed
        self._confirmed: set[bytes] = set()
        self._resync: set[bytes] = set()  # confirm -> tell the user's connections to check gaps
        #: Channels whose server may have rolled back acknowledged writes (a cluster failover):
        #: their users' delivery streams are renewed, not trusted (``_reattach_once``).
        self._renew: set[bytes] = set()
        self._before: SubscriberLink | None = None  # the last link lost, until the next opens
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._pubsub: SubscriberLink | None = None
        self._ping_sent: float | None = None
        self._connected = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._reattaching: dict[str, asyncio.Task[None]] = {}
        self._reattach_again: set[str] = set()
        self._stopping = False
        self._actor_channels: dict[bytes, str] = {}  # subscribed actor channel -> actor
        self._actor_users: dict[str, set[str]] = {}  # actor -> local users following it
        self._user_actors: dict[str, set[str]] = {}  # local user -> large accounts followed
        #: Set by the app: (actor, local followers, message) for actor-channel messages.
        self.on_actor_message: Callable[[str, list[str], bytes], None] | None = None
        #: Set by the app: the user's followings changed (re-resolve their actor channels).
        self.on_following_changed: Callable[[str], None] | None = None
        #: Set by the app: the user's channels were subscribed again after the Pub/Sub
        #: connection was lost, and their presence re-attached (what their large accounts
        #: announced meanwhile was lost: the app catches their stream up).
        self.on_resubscribed: Callable[[str], None] | None = None
        #: Counters (metrics read them).
        self.messages = 0
        self.connects = 0

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the Pub/Sub reader and the presence refresher (returns at once)."""
        self._tasks = [
            asyncio.create_task(self._run_pubsub(), name="hub-pubsub"),
            asyncio.create_task(self._refresh_presence(), name="hub-presence"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        reattaching = list(self._reattaching.values())
        for task in reattaching:
            task.cancel()
        for task in reattaching:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._drop_pubsub()
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(HubUnavailable("the hub stopped"))
        self._waiters.clear()

    @property
    def connected(self) -> bool:
        """True while the Pub/Sub connection is up."""
        return self._connected.is_set()

    # --- registry --------------------------------------------------------------------------------
    @property
    def connection_count(self) -> int:
        return sum(len(conns) for conns in self._conns.values())

    def connections_of(self, user: str) -> int:
        """Local connections of ``user``."""
        conns = self._conns.get(user)
        return len(conns) if conns else 0

    def tracked(self) -> dict[str, int]:
        """Entries of each per-user and per-channel structure (all 0 once every connection has
        left and every SUBSCRIBE is answered: nothing is kept for users who were here once)."""
        return {
            "connections": len(self._conns),
            "channels": len(self._channels),
            "pending": len(self._pending),
            "confirmed": len(self._confirmed),
            "resync": len(self._resync),
            "waiters": len(self._waiters),
            "actor_channels": len(self._actor_channels),
            "actor_users": len(self._actor_users),
            "user_actors": len(self._user_actors),
            "reattaching": len(self._reattaching),
        }

    def users(self) -> list[str]:
        return list(self._conns)

    def channels(self) -> list[str]:
        """Channels this hub wants subscribed (one per locally connected user, one per large
        account followed by a locally connected user)."""
        return [c.decode() for c in self._channels] + [c.decode() for c in self._actor_channels]

    def actors_of(self, user: str) -> set[str]:
        """The large accounts ``user`` follows, as last set by :meth:`follow_actors`."""
        return set(self._user_actors.get(user, ()))

    async def actors_subscribed(self, actors: Iterable[str], timeout_s: float) -> bool:
        """Wait until Redis has confirmed the channels of ``actors`` (each wanted by a local
        follower): anything announced on them from then on reaches this hub. False if that did
        not happen within ``timeout_s`` (Pub/Sub down, or an account no longer followed)."""
        waiters: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for actor in actors:
            channel = keys.principal_actor_channel(actor).encode()
            if channel not in self._actor_channels:
                return False
            if channel in self._confirmed:
                continue
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(channel, []).append(waiter)
            waiters.append(waiter)
        if not waiters:
            return True
        try:
            done, pending = await asyncio.wait(waiters, timeout=timeout_s)
        finally:
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()  # dropped from the lists at the channel's next event
        return not pending and all(
            not waiter.cancelled() and waiter.exception() is None for waiter in done
        )

    def follow_actors(self, user: str, actors: Iterable[str]) -> None:
        """Set the large accounts ``user`` follows (no-op once the user has no connection)."""
        if user not in self._conns:
            return
        self._set_actors(user, set(actors))

    def _set_actors(self, user: str, wanted: set[str]) -> None:
        current = self._user_actors.pop(user, set())
        if wanted:
            self._user_actors[user] = wanted
        subscribe: list[bytes] = []
        unsubscribe: list[bytes] = []
        for actor in wanted - current:
            followers = self._actor_users.setdefault(actor, set())
            if not followers:
                channel = keys.principal_actor_channel(actor).encode()
                self._actor_channels[channel] = actor
                subscribe.append(channel)
            followers.add(user)
        for actor in current - wanted:
            followers = self._actor_users.get(actor, set())
            followers.discard(user)
            if not followers:
                self._actor_users.pop(actor, None)
                channel = keys.principal_actor_channel(actor).encode()
                self._actor_channels.pop(channel, None)
                self._confirmed.discard(channel)
                for waiter in self._waiters.pop(channel, []):
                    waiter.cancel()
                unsubscribe.append(channel)
        if subscribe:
            self._subscribe(subscribe)
        if unsubscribe:
            self._unsubscribe(unsubscribe)

    async def register(self, conn: LocalConnection, *, max_per_user: int | None = None) -> None:
        """Add a connection; returns once its user's channel is confirmed subscribed.

        Raises :class:`TooManyConnections`, having added nothing, if the user already has
        ``max_per_user`` local connections (checked and added in one step: concurrent connects
        cannot overshoot). Raises :class:`HubUnavailable` if Redis does not confirm within
        ``subscribe_timeout_s`` (the connection is then unregistered).
        """
        user = conn.user
        channel = keys.principal_channel(user).encode()
        conns = self._conns.get(user)
        if conns is None:
            conns = self._conns[user] = set()
        elif max_per_user is not None and len(conns) >= max_per_user:
            raise TooManyConnections(user, max_per_user)
        first = not conns
        conns.add(conn)
        self._empty.clear()
        if first:
            self._channels[channel] = user
            self._subscribe([channel])
        if channel in self._confirmed:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, self._subscribe_timeout)
        except (TimeoutError, HubUnavailable):
            self.unregister(conn)
            raise HubUnavailable(f"no subscription confirmed for {user!r}") from None

    def unregister(self, conn: LocalConnection) -> None:
        """Remove a connection; the last one of a user unsubscribes its channel."""
        user = conn.user
        conns = self._conns.get(user)
        if conns is None or conn not in conns:
            return
        conns.discard(conn)
        if conns:
            return
        del self._conns[user]
        if not self._conns:
            self._empty.set()
        self._set_actors(user, set())
        channel = keys.principal_channel(user).encode()
        self._channels.pop(channel, None)
        self._confirmed.discard(channel)
        self._resync.discard(channel)
        self._renew.discard(channel)
        for waiter in self._waiters.pop(channel, []):
            waiter.cancel()
        self._unsubscribe([channel])

    async def go_away(self, timeout_s: float) -> bool:
        """Ask every connection to close with 1001; wait (bounded) until all have left."""
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.shutdown()
        try:
            await asyncio.wait_for(self._empty.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    # --- Pub/Sub ---------------------------------------------------------------------------------
    def _subscribe(self, channels: Iterable[bytes]) -> bool:
        """Send SUBSCRIBE (confirmations arrive through the link). False if it could not be
        sent."""
        pubsub = self._pubsub
        batch = list(channels)
        if pubsub is None or not self._connected.is_set() or not batch:
            return True  # the reader subscribes every wanted channel when it (re)connects
        pending = self._pending
        for channel in batch:
            pending[channel] = pending.get(channel, 0) + 1
        try:
            pubsub.subscribe(*batch)
        except _REDIS_ERRORS as exc:
            for channel in batch:
                self._unpend(channel)
            log.warning("pubsub_subscribe_failed", error=str(exc))
            return False
        return True

    def _unpend(self, channel: bytes) -> int:
        """One SUBSCRIBE of ``channel`` is answered (or was never sent): the count still in
        flight. A channel with none left has no entry (the map holds only SUBSCRIBEs in
        flight, however many users come and go)."""
        left = self._pending.pop(channel, 0) - 1
        if left > 0:
            self._pending[channel] = left
        return max(0, left)

    async def _run_pubsub(self) -> None:
        backoff = 0.05
        while not self._stopping:
            try:
                await self._connect()
                backoff = 0.05
                await self._read()
            except asyncio.CancelledError:
                raise
            except (*_REDIS_ERRORS, redis.exceptions.RedisError) as exc:
                log.warning("pubsub_connection_lost", error=str(exc), retry_in_s=backoff)
            self._connected.clear()
            await self._drop_pubsub()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._reconnect_max)

    def _unsubscribe(self, channels: list[bytes]) -> None:
        pubsub = self._pubsub
        if pubsub is None or not self._connected.is_set():
            return  # the reader subscribes only wanted channels when it (re)connects
        try:
            pubsub.unsubscribe(*channels)
        except _REDIS_ERRORS as exc:
            log.warning("pubsub_unsubscribe_failed", error=str(exc))

    async def _connect(self) -> None:
        self._pending.clear()
        self._confirmed.clear()
        self._ping_sent = None
        self._pubsub = link = await self._subscriber.open(
            timeout_s=self._subscribe_timeout,
            on_message=self._dispatch,
            on_subscribe=self._confirm,
            on_pong=self._pong,
        )
        before, self._before = self._before, None
        if before is not None:
            renew = [channel for channel in self._channels if link.rolled_back(channel, before)]
            if renew:
                log.warning("pubsub_server_may_have_rolled_back", users=len(renew))
                self._renew.update(renew)
        self._connected.set()
        wanted = list(self._channels) + list(self._actor_channels)
        # Whatever was published while we were not subscribed is only in the delivery streams.
        # (Users' channels only: a large account's channel has no stream of its own to check.)
        self._resync.update(self._channels)
        self.connects += 1
        if not self._subscribe(wanted):
            raise redis.exceptions.ConnectionError("could not re-subscribe")
        log.info("pubsub_connected", channels=len(wanted))

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._connected.clear()
        if pubsub is not None:
            self._before = pubsub  # the next link says what may have rolled back since
            await pubsub.aclose()

    async def _read(self) -> None:
        """Watch the connection (its messages arrive through the callbacks): return never;
        raise when it is lost, or when an idle connection does not answer a PING in time."""
        pubsub = self._pubsub
        assert pubsub is not None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.wait({pubsub.closed}, timeout=1.0)
            if pubsub.closed.done():
                raise redis.exceptions.ConnectionError(pubsub.closed.result())
            now = loop.time()
            if self._ping_sent is not None:
                if now - self._ping_sent > self._ping_timeout:
                    raise redis.exceptions.TimeoutError("no PONG on the Pub/Sub connection")
            elif now - pubsub.last_seen > self._idle_ping:
                pubsub.ping()
                self._ping_sent = now

    def _pong(self) -> None:
        self._ping_sent = None

    def _dispatch(self, channel: bytes, frame: bytes) -> None:
        actor = self._actor_channels.get(channel)
        if actor is not None:
            followers = list(self._actor_users.get(actor, ()))
            if followers and self.on_actor_message is not None:
                self.on_actor_message(actor, followers, frame)
            return
        user = self._channels.get(channel)
        if user is None:
            return
        if frame.startswith(_CONTROL_PREFIX):
            if self.on_following_changed is not None:
                self.on_following_changed(user)
            return
        self.messages += 1
        if self._received is not None:
            ts = frame_ts_ms(frame)
            if ts is not None:
                self._received.observe_ms("received", now_ms() - ts)
        for conn in list(self._conns.get(user, ())):
            try:
                conn.deliver(frame)
            except Exception:
                log.exception("deliver_failed", user_id=user)

    def _confirm(self, channel: bytes) -> None:
        if channel in self._pending:
            if self._unpend(channel):
                return  # a later SUBSCRIBE of it is still in flight: wait for that one
        elif channel in self._channels:
            # Not asked for (a confirmation this connection did not expect): whatever it means,
            # the user's connections check the stream for gaps rather than trust Pub/Sub.
            self._resync.add(channel)
        if channel in self._actor_channels:
            self._confirmed.add(channel)
            for waiter in self._waiters.pop(channel, []):
                if not waiter.done():
                    waiter.set_result(None)
            return
        if channel not in self._channels:
            return
        self._confirmed.add(channel)
        for waiter in self._waiters.pop(channel, []):
            if not waiter.done():
                waiter.set_result(None)
        if channel in self._resync:
            self._resync.discard(channel)
            self._reattach(self._channels[channel])

    # --- presence restore ------------------------------------------------------------------------
    def _reattach(self, user: str) -> None:
        """Re-attach ``user``'s presence, then tell their connections (see the module doc)."""
        if self._stopping:
            return
        if user in self._reattaching:
            self._reattach_again.add(user)  # the loss may postdate the attach in flight
            return
        task = asyncio.create_task(self._reattach_user(user), name="hub-reattach")
        self._reattaching[user] = task
        task.add_done_callback(lambda _t: self._reattaching.pop(user, None))

    async def _reattach_user(self, user: str) -> None:
        while True:
            self._reattach_again.discard(user)
            await self._reattach_once(user)
            if user not in self._reattach_again:
                return

    async def _reattach_once(self, user: str) -> None:
        pause = _REATTACH_PAUSE_S
        for attempt in range(1, _REATTACH_ATTEMPTS + 1):
            if user not in self._conns:
                return
            channel = keys.principal_channel(user).encode()
            # Taken before the await: a loss noticed meanwhile sets it again for the next run.
            renewing = channel in self._renew
            self._renew.discard(channel)
            try:
                if renewing:
                    # The stream's newest seqs may be gone and handed out again: leave it. With no
                    # session started yet, the epoch it will start from is the current one.
                    epoch = self._epoch_of(user)
                    if epoch is None:
                        epoch = (await self._presence.attach(user)).epoch
                    presence = await self._presence.renew(user, epoch)
                else:
                    presence = await self._presence.attach(user)
            except (*_REDIS_ERRORS, redis.exceptions.RedisError) as exc:
                if renewing:
                    self._renew.add(channel)
                log.warning(
                    "presence_reattach_failed", user_id=user, attempt=attempt, error=str(exc)
                )
                await asyncio.sleep(pause)
                pause *= 2
                continue
            frame = presence_frame(presence.epoch, presence.seq)
            for conn in list(self._conns.get(user, ())):
                try:
                    conn.deliver(frame)
                except Exception:
                    log.exception("deliver_failed", user_id=user)
            break
        self._check_gaps(user)
        if self.on_resubscribed is not None and user in self._conns:
            try:
                self.on_resubscribed(user)
            except Exception:
                log.exception("resubscribed_callback_failed", user_id=user)

    def _epoch_of(self, user: str) -> str | None:
        """The stream epoch the user's local sessions follow (None if none has started)."""
        for conn in self._conns.get(user, ()):
            epoch = conn.epoch
            if epoch is not None:
                return epoch
        return None

    def reset_users(self, users: Iterable[str]) -> None:
        """Items may have missed the delivery streams of ``users`` (a large account's push that
        could not be written): every local connection of theirs sends its client ``reset``
        (:data:`gateway.session.RESET_CONTROL`), so the client refetches over HTTP."""
        for user in users:
            for conn in list(self._conns.get(user, ())):
                try:
                    conn.deliver(RESET_CONTROL)
                except Exception:
                    log.exception("deliver_failed", user_id=user)

    def _check_gaps(self, user: str) -> None:
        for conn in list(self._conns.get(user, ())):
            conn.check_gap()

    # --- presence --------------------------------------------------------------------------------
    async def _refresh_presence(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval)
            users = self.users()
            for start in range(0, len(users), _REFRESH_BATCH):
                batch = users[start : start + _REFRESH_BATCH]
                try:
                    lost = await self._presence.refresh(batch)
                except (*_REDIS_ERRORS, redis.exceptions.RedisError) as exc:
                    log.warning("presence_refresh_failed", users=len(batch), error=str(exc))
                    continue
                for user in lost:
                    if user in self._conns:
                        log.warning("presence_lost", user_id=user)
                        self._reattach(user)
