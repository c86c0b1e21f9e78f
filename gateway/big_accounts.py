"""Large accounts (hybrid fan-out): their actor channels, and the catch-up of a delivery stream.

A large account's activities are not fanned out to each follower's timeline by the workers; the
account announces each on its actor channel, and a gateway holding connections of its followers
inserts it into their timelines (:meth:`BigAccounts.on_actor_message`), which pushes it through
each user's own channel like any other item. What an account announced while a follower was
offline (or while the Pub/Sub link was down) is caught up at the next connect (or re-subscribe)
from the account's outbox (:meth:`BigAccounts.catch_up`), with marks kept in the presence hash.

Guarantees:

* one actor's messages are applied in order (one task per actor), so a delete never overtakes
  the insert it undoes; inserts are idempotent (the first gateway wins, one delivery seq);
* nothing is lost silently: a message that cannot be applied (Redis down, or too many waiting)
  sends ``reset`` to the users it was for (they refetch over HTTP, where outboxes are merged);
* the state kept is bounded whatever the rate of messages (:meth:`BigAccounts.tracked`): at most
  ``ACTOR_QUEUE_MAX`` messages per actor, one worker per actor, one refresh and one catch-up in
  flight per user, one retry task for the users whose large accounts could not be read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import TYPE_CHECKING, Any

import structlog

from feed import keys, scripts
from feed.cursor import split_order_key
from gateway.errors import REDIS_ERRORS

if TYPE_CHECKING:
    from gateway.resources import Gateway

__all__ = ["ACTOR_QUEUE_MAX", "BigAccounts"]

log = structlog.get_logger("gateway")

#: Attempts at one actor-channel write, the backlog of an actor's messages past which a write
#: is tried only once (see ``BigAccounts._apply_actor_message``) and the most of them kept
#: waiting (``BigAccounts.on_actor_message``: past it the backlog is dropped and its users are
#: sent ``reset``); the longest pause between rounds of reads of the large accounts users
#: follow, and the failures in a row that end a round (``BigAccounts._retry_actors``).
_ACTOR_ATTEMPTS = 3
_ACTOR_BACKLOG_RETRY = 32
ACTOR_QUEUE_MAX = 256
_ACTOR_REFRESH_MAX_PAUSE_S = 30.0
_ACTOR_REFRESH_FAILURES = 3
#: Large accounts' items a stream missed while its user was offline (``BigAccounts.catch_up``):
#: the presence hash's fields for the newest outbox member caught up with, per account; the flag
#: "this stream was caught up before"; and the seq at or before which a resume must be answered
#: with ``reset`` (the Lua of ``feed/lua/caught_up.lua`` writes it). How long a connect waits
#: for its accounts' channels to be confirmed.
_CAUGHT_UP_PREFIX = "b:"
_CAUGHT_UP_FLAG = "b"
_RESET_THROUGH = "r"
_CATCH_UP_SUBSCRIBE_S = 5.0


def _text(value: bytes | str | None) -> Any:
    """A Redis reply as ``str`` (None stays None)."""
    return value.decode() if isinstance(value, bytes) else value


class BigAccounts:
    """The large-account state of one gateway (``Gateway.big_accounts``), fed by the hub's
    callbacks (:meth:`on_actor_message`, :meth:`on_following_changed`, :meth:`on_resubscribed`)
    and by each connect (:meth:`request_refresh`, :meth:`catch_up`)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._background: set[asyncio.Task[None]] = set()
        #: Each actor's messages waiting to be applied (at most ``ACTOR_QUEUE_MAX``) and the one
        #: task applying them, in order; the refresh of whom a user follows in flight (one per
        #: user) and the users whose followings changed again meanwhile; the connected users
        #: whose large accounts could not be read (and the one task that retries them).
        self._actor_queues: dict[str, collections.deque[tuple[list[str], bytes]]] = {}
        self._actor_workers: dict[str, asyncio.Task[None]] = {}
        self._refreshes: dict[str, asyncio.Task[None]] = {}
        self._refresh_again: set[str] = set()
        #: Catch-ups of connected users after a Pub/Sub reconnect (one in flight per user).
        self._catch_ups: dict[str, asyncio.Task[None]] = {}
        self._catch_up_again: set[str] = set()
        self._actors_unknown: dict[str, None] = {}  # ordered: retried first come, first served
        self._actor_retry: asyncio.Task[None] | None = None
        self._caught_up_script: Any = None
        #: First pause before retrying an actor-channel write, and a failed read of the large
        #: accounts a user follows (both double each time).
        self.actor_retry_pause_s = 0.2
        self.actor_refresh_pause_s = 0.5
        self.closing = False

    def open(self) -> None:
        """Register the catch-up script (the gateway's Redis client is open)."""
        self._caught_up_script = self._gateway.redis.register_script(scripts.source("caught_up"))

    async def stop(self) -> None:
        """Cancel every background task and wait until they have ended."""
        self.closing = True
        background = list(self._background)
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def tracked(self) -> dict[str, int]:
        """Sizes of the large-account state (tests and operators: each stays bounded, whatever
        the rate of messages): background tasks, actors with a queue, messages queued over all
        actors, refreshes of whom a user follows in flight, and users waiting for a retry."""
        return {
            "background_tasks": len(self._background),
            "actor_queues": len(self._actor_queues),
            "actor_messages_queued": sum(len(queue) for queue in self._actor_queues.values()),
            "actor_workers": len(self._actor_workers),
            "refreshes": len(self._refreshes),
            "catch_ups": len(self._catch_ups),
            "actors_unknown": len(self._actors_unknown),
        }

    def on_actor_message(self, actor: str, users: list[str], message: bytes) -> None:
        """Queue a large account's message for its one worker task (applied in order).

        At most ``ACTOR_QUEUE_MAX`` wait (Redis slow or down and the account busy): past that
        the queue is dropped, this message with it, and every user it was for is sent ``reset``
        (:meth:`Hub.reset_users`): the items are in the account's outbox, which a refetch over
        HTTP merges in, so nothing is lost, and the memory held stays bounded."""
        queue = self._actor_queues.get(actor)
        if queue is None:
            queue = self._actor_queues[actor] = collections.deque()
        if len(queue) >= ACTOR_QUEUE_MAX:
            dropped = set(users)
            for waiting, _message in queue:
                dropped.update(waiting)
            log.error(
                "actor_backlog_dropped",
                actor=actor,
                messages=len(queue) + 1,
                users=len(dropped),
                action="reset",
            )
            queue.clear()
            self._gateway.hub.reset_users(dropped)
        else:
            queue.append((users, message))
        if actor not in self._actor_workers and queue:
            self._actor_workers[actor] = self._spawn(self._apply_actor_messages(actor, queue))

    async def _apply_actor_messages(
        self, actor: str, queue: collections.deque[tuple[list[str], bytes]]
    ) -> None:
        """Apply ``actor``'s queued messages one at a time, in order, until none is left."""
        try:
            while queue:
                users, message = queue.popleft()
                await self._apply_actor_message(
                    actor, users, message, retry=len(queue) < _ACTOR_BACKLOG_RETRY
                )
        finally:
            self._actor_workers.pop(actor, None)
            if not queue and self._actor_queues.get(actor) is queue:
                del self._actor_queues[actor]

    async def _apply_actor_message(
        self,
        actor: str,
        users: list[str],
        message: bytes,
        *,
        retry: bool = True,
    ) -> None:
        """A large account's new (``+member\\nbody``) or deleted (``-member``) activity: insert
        it into (or remove it from) the connected followers' timelines. The script is
        idempotent, so when several gateways hold followers the first insert wins and the user's
        own channel delivers it once, with one delivery seq, to all of their connections.

        One actor's messages are applied in the order they came (one task per actor, see
        :meth:`on_actor_message`), so a delete never overtakes the insert it undoes. A write
        that fails is tried again (``_ACTOR_ATTEMPTS`` in all, with backoff; once only while
        ``_ACTOR_BACKLOG_RETRY`` or more of the actor's messages wait); if it still fails, each
        of the users' connections sends ``reset`` (:meth:`Hub.reset_users`): the item did not
        reach their delivery stream, so no resume could bring it, and the client refetches over
        HTTP, where the account's outbox is merged in. Never a silent loss."""
        s = self._gateway.settings
        # Principals (gateway.tenancy): the account's tenant is its followers' (its channel is
        # in its tenant's keyspace), and its stores take the ids.
        tenant, _ = keys.principal_parts(actor)
        timelines = self._gateway.timelines_for(tenant)
        ids = [keys.principal_parts(user)[1] for user in users]
        timeline_max = self._gateway.tenancy.limits(tenant).timeline_max
        attempts = _ACTOR_ATTEMPTS if retry else 1
        pause = self.actor_retry_pause_s
        for attempt in range(1, attempts + 1):
            try:
                if message.startswith(b"+"):
                    member, _, body = message[1:].partition(b"\n")
                    await timelines.insert_for(
                        ids,
                        member.decode(),
                        body,
                        timeline_max=timeline_max,
                        stream_history=s.stream_history,
                        body_ttl_s=s.body_ttl_days * 86_400,
                    )
                elif message.startswith(b"-"):
                    await timelines.remove_for(
                        ids, message[1:].decode(), stream_history=s.stream_history
                    )
                return
            except UnicodeDecodeError:
                log.warning("actor_message_malformed", actor=actor)
                return
            except REDIS_ERRORS as exc:
                log.warning(
                    "actor_delivery_failed",
                    actor=actor,
                    users=len(users),
                    attempt=attempt,
                    attempts=attempts,
                    error=str(exc)[:200],
                )
            if attempt < attempts:
                await asyncio.sleep(pause)
                pause *= 2
        log.error("actor_delivery_abandoned", actor=actor, users=len(users), action="reset")
        self._gateway.hub.reset_users(users)

    def on_following_changed(self, user: str) -> None:
        self.request_refresh(user)

    def request_refresh(self, user: str) -> asyncio.Task[None]:
        """Re-read the large accounts ``user`` follows (:meth:`refresh_actors`), coalesced: at
        most one read per user is in flight; a change that comes meanwhile marks the user to be
        read once more when it ends (however many came), so the newest state is applied last
        and a burst of follows costs two reads, not one task each. The task returned ends once
        the user's state is read and applied."""
        task = self._refreshes.get(user)
        if task is not None and not task.done():
            self._refresh_again.add(user)
            return task
        task = self._spawn(self._refresh_until_current(user))
        self._refreshes[user] = task
        return task

    async def _refresh_until_current(self, user: str) -> None:
        try:
            while True:
                self._refresh_again.discard(user)
                await self.refresh_actors(user)
                if user not in self._refresh_again or self.closing:
                    return
        finally:
            self._refresh_again.discard(user)
            if self._refreshes.get(user) is asyncio.current_task():
                del self._refreshes[user]

    async def refresh_actors(self, user: str) -> None:
        """Subscribe the actor channels of the large accounts ``user`` follows. Never raises.

        If they cannot be read now (Redis or Cassandra failing, or Cassandra not connected yet),
        the user is retried in the background, with backoff, for as long as they have a
        connection here. When that succeeds and the user follows a large account, the user's
        connections are sent ``reset``: pushes from those accounts may have been missed
        meanwhile, and the client refetches over HTTP.
        """
        if user in self._actors_unknown:
            return  # the retry reads the newest state (and resets if needed)
        actors = await self._read_actors(user)
        if actors is not None:
            self._gateway.hub.follow_actors(user, actors)
        elif not self.closing:
            self._actors_unknown[user] = None
            if self._actor_retry is None or self._actor_retry.done():
                self._actor_retry = self._spawn(self._retry_actors())

    async def _read_actors(self, user: str) -> list[str] | None:
        """The large accounts ``user`` follows, or None if that cannot be known now."""
        if self._gateway.uses_cassandra and self._gateway.cassandra is None:
            return None  # the follow graph is in Cassandra, which is still being connected
        tenant, uid = keys.principal_parts(user)
        try:
            followees = await self._gateway.reader_for(tenant).big_followees(uid)
            return [keys.principal_of(tenant, actor) for actor in followees]
        except Exception as exc:
            log.warning(
                "actor_channels_failed",
                user_id=user,
                error=type(exc).__name__,
                detail=str(exc)[:200],
            )
            return None

    async def _retry_actors(self) -> None:
        """One task for every user whose large accounts could not be read: each round (after a
        pause that doubles up to ``_ACTOR_REFRESH_MAX_PAUSE_S``) reads them again, one user at a
        time, and ends after ``_ACTOR_REFRESH_FAILURES`` failures in a row (the store is likely
        still down). A user whose read failed goes to the back of the line, so one that keeps
        failing does not hold up the others."""
        pause = self.actor_refresh_pause_s
        unknown = self._actors_unknown
        while unknown and not self.closing:
            await asyncio.sleep(pause)
            pause = min(pause * 2, _ACTOR_REFRESH_MAX_PAUSE_S)
            failures = 0
            for user in list(unknown):
                if not self._gateway.hub.connections_of(user):
                    unknown.pop(user, None)  # gone: a later connect reads afresh
                    continue
                actors = await self._read_actors(user)
                if actors is None:
                    if user in unknown:  # to the back of the line
                        del unknown[user]
                        unknown[user] = None
                    failures += 1
                    if failures >= _ACTOR_REFRESH_FAILURES:
                        break
                    continue
                failures = 0
                unknown.pop(user, None)
                self._gateway.hub.follow_actors(user, actors)
                log.info("actor_channels_recovered", user_id=user, actors=len(actors))
                if actors:
                    self._gateway.hub.reset_users([user])

    async def catch_up(self, user: str, epoch: str) -> tuple[int | None, int | None]:
        """Bring the large accounts' items that ``user``'s delivery stream missed into it, before
        a connection of theirs starts: ``(reset_through, seq)``, the seq at or before which a
        resume must be answered with ``reset`` (None: no such seq) and the stream's last seq
        afterwards (None if the stream of ``epoch`` is gone). Raises on Redis errors.

        A large account's items reach a follower's stream only while a gateway holding one of
        their connections is subscribed to its channel; what it announces while they are
        offline (within the resume window, when the stream lives on) would never be in it, and
        a resume would skip it silently. So the presence hash (which lives and dies with the
        stream) records, per account, the newest outbox member the stream has been caught up
        with (``b:<actor>``). At each connect, once the accounts' channels are confirmed (so
        anything newer comes live), the outbox members after that mark are offered to the
        stream, oldest first, with the same idempotent script as live pushes: those already in
        the timeline (pushed live) are skipped, the others get the next seqs, and the resume
        replays them. Then the marks move to the outbox's newest member.

        An account the user follows with no mark in a stream that has been caught up before
        was followed while offline (or its mark could not be written): what it announced since
        is unknown, so every resume at or before the stream's current seq is answered with
        ``reset`` (``r``, kept in the hash for later connections too). A stream never caught up
        (just created by this connect: no resume into it is possible) only gets its marks.
        Members the timeline's cap would drop at once are not offered (they would arrive as new
        frames and be trimmed right after). Items an account backdates before its mark are not
        seen as new (the outbox is ordered by ``published``); the HTTP feed has them.
        """
        redis_client = self._gateway.redis
        k, _ = keys.of_principal(user)  # the user's tenant's names; ids, not principals
        presence_key = k.presence(keys.principal_parts(user)[1])
        actors = sorted(self._gateway.hub.actors_of(user))
        subscribed = not actors or await self._gateway.hub.actors_subscribed(
            actors, _CATCH_UP_SUBSCRIBE_S
        )
        ids = {actor: keys.principal_parts(actor)[1] for actor in actors}
        pipe = redis_client.pipeline(transaction=False)
        fields = ["e", "s", _CAUGHT_UP_FLAG, _RESET_THROUGH]
        fields += [_CAUGHT_UP_PREFIX + ids[actor] for actor in actors]
        pipe.hmget(presence_key, fields)
        for actor in actors:
            pipe.zrevrangebylex(k.outbox(ids[actor]), "+", "-", start=0, num=1)
        results = await pipe.execute()
        state = [_text(value) for value in results[0]]
        heads = {
            actor: _text(head[0]) if head else ""
            for actor, head in zip(actors, results[1:], strict=True)
        }
        current_epoch, seq_text, flag, reset_text = state[:4]
        if current_epoch != epoch or seq_text is None:
            return None, None  # the stream was recreated meanwhile: the session resets anyway
        seq = int(seq_text)
        reset_through = int(reset_text) if reset_text else None
        marks = dict(zip(actors, state[4:], strict=True))
        unknown = [a for a in actors if marks[a] is None or not subscribed]
        new_reset: int | None = None
        if unknown and flag is not None:
            new_reset = seq  # what those accounts announced meanwhile is not in the stream
            reset_through = max(reset_through or -1, seq)
        offered = 0
        if subscribed:
            caught = {a: marks[a] for a in actors if marks[a] is not None and marks[a] != heads[a]}
            offered = await self._offer_missed(user, caught)
        updates: list[str] = [] if flag is not None else [_CAUGHT_UP_FLAG, "1"]
        if subscribed:
            for actor in actors:
                if marks[actor] != heads[actor]:
                    updates += [_CAUGHT_UP_PREFIX + ids[actor], heads[actor]]
        written = 0
        if updates or new_reset is not None:
            written = await self._caught_up_script(
                keys=[presence_key],
                args=[epoch, "" if new_reset is None else str(new_reset), *updates],
            )
        if offered or new_reset is not None:
            log.info(
                "stream_caught_up",
                user_id=user,
                offered=offered,
                reset_through=new_reset,
                accounts=len(actors),
                written=bool(written),
            )
        if offered:
            now = await redis_client.hget(presence_key, "s")
            if now is not None:
                seq = int(now)
        return reset_through, seq

    def on_resubscribed(self, user: str) -> None:
        """``user``'s channels were subscribed again after the Pub/Sub connection was lost:
        their large accounts' announcements meanwhile were lost with it (their channels have no
        stream to re-read). Catch the stream up as at a connect (:meth:`catch_up`); what it adds
        reaches the connected sessions live. One catch-up per user in flight, plus one more if
        the link was lost again meanwhile."""
        if not self._gateway.hub.actors_of(user):
            return
        task = self._catch_ups.get(user)
        if task is not None and not task.done():
            self._catch_up_again.add(user)
            return
        self._catch_ups[user] = self._spawn(self._catch_up_connected(user))

    async def _catch_up_connected(self, user: str) -> None:
        try:
            while not self.closing and self._gateway.hub.connections_of(user):
                self._catch_up_again.discard(user)
                try:
                    k, uid = keys.of_principal(user)
                    epoch = _text(await self._gateway.redis.hget(k.presence(uid), "e"))
                    if epoch is not None:
                        await self.catch_up(user, epoch)
                except REDIS_ERRORS as exc:
                    # The items are in the outbox: the connections refetch.
                    log.warning("catch_up_failed", user_id=user, error=str(exc)[:200])
                    self._gateway.hub.reset_users([user])
                if user not in self._catch_up_again:
                    return
        finally:
            self._catch_up_again.discard(user)
            if self._catch_ups.get(user) is asyncio.current_task():
                del self._catch_ups[user]

    async def _offer_missed(self, user: str, marks: dict[str, str]) -> int:
        """Offer each account's outbox members after its mark (``""``: all) to ``user``'s
        stream, oldest first; skip those in the timeline already, those whose body is gone (a
        delete) and those older than a full timeline's oldest. The number offered."""
        if not marks:
            return 0
        redis_client = self._gateway.redis
        s = self._gateway.settings
        tenant, uid = keys.principal_parts(user)
        k = keys.Keyspace.for_tenant(tenant)
        timeline_max = self._gateway.tenancy.limits(tenant).timeline_max
        pipe = redis_client.pipeline(transaction=False)
        for actor, mark in marks.items():
            outbox = k.outbox(keys.principal_parts(actor)[1])
            pipe.zrangebylex(outbox, f"({mark}" if mark else "-", "+")
        pipe.zcard(k.timeline(uid))
        pipe.zrange(k.timeline(uid), 0, 0)
        *ranges, size, oldest = await pipe.execute()
        members = sorted({_text(m) for found in ranges for m in found})
        if size >= timeline_max and oldest:
            floor = _text(oldest[0])
            members = [m for m in members if m > floor]
        if not members:
            return 0
        pipe = redis_client.pipeline(transaction=False)
        pipe.zmscore(k.timeline(uid), members)
        pipe.mget([k.body(split_order_key(m)[1]) for m in members])
        scores, bodies = await pipe.execute()
        timelines = self._gateway.timelines_for(tenant)
        offered = 0
        for member, score, body in zip(members, scores, bodies, strict=True):
            if score is not None or body is None:
                continue
            await timelines.insert_for(
                [uid],
                member,
                body,
                timeline_max=timeline_max,
                stream_history=s.stream_history,
                body_ttl_s=s.body_ttl_days * 86_400,
            )
            offered += 1
        return offered
