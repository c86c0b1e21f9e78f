"""Hot timelines in Redis: the fan-out workers' writer and the gateway's reader.

Guarantees (what callers may rely on):

* **Idempotent.** A timeline is a sorted set of order keys (``feed.cursor.order_key``); inserting
  the same activity again is a no-op and does not push again. An activity that the cap trims
  straight away (older than the user's newest ``timeline_max`` entries, so it is in Cassandra
  only) is not pushed either: it is no new item of the hot timeline, and its replay would find it
  missing from Redis and push it a second time. Bodies are stored once per activity
  (``keys.body``, with a TTL), not once per follower.
* **Capped.** Each timeline keeps the newest ``timeline_max`` entries; older ones live in Cassandra.
* **Atomic per call.** Each script call inserts (or removes) a group of entries, trims, and
  for every *online* recipient (one with a presence hash, see ``feed.delivery_redis``) assigns
  the next delivery ``seq``, appends the frame to the user's delivery stream and publishes it on
  the user's channel — all in one step, so a frame's ``seq`` order is the order it reached the
  timeline, and a resume that reads the stream after subscribing sees no gap. A call carries at
  most ``_MAX_USERS`` users' inserts (one pipeline of calls per batch).
* **Deleted stays deleted.** Once a Delete has set an activity's deleted marker
  (``keys.deleted``, :meth:`RedisTimelines.mark_deleted`), every script that writes timelines or
  bodies checks it atomically and leaves the activity out: a fan-out replayed by another worker,
  a timeline rebuild or a body re-cache that read the activity before the delete cannot write it
  back. The marker is a cache of the durable flag in Cassandra (kept ``FEED_BODY_TTL_DAYS``).
* Offline users cost one HGET, one ZADD and one ZREMRANGEBYRANK per user per call, however many
  of the call's activities they receive: no publish, no stream.
* **Hot and cold** (``only_active``): users with neither an ``active`` marker (``keys.active``)
  nor a presence hash are skipped (Cassandra only). An online user is always written and pushed
  to, so a Redis that lost its active markers (restart) does not silence connected clients once
  the gateway has re-attached their presence (``AsyncRedisPresence.refresh``, ``gateway.hub``).

The scripts live in ``feed/lua/`` (one file each, its ``KEYS``/``ARGV`` layout at its top) and
are registered once per store. The scripts take their keys in ``KEYS`` (built by ``feed.keys``);
channel names and frame pieces (``schemas.frames``) travel in ``ARGV``. One measured exception:
the fan-out declares one key per user (the timeline) and names the user's other keys and channel
from its hash tag (``feed.keys.FANOUT_USER_PREFIXES``), which keeps them in the declared key's
slot. A
multi-user call still touches many users' keys, which live in different Redis Cluster slots:
declaring them makes the scripts cluster-ready in form, but running them on a cluster needs the
calls grouped by slot (issue 14). Today, shard by user id on the client side to scale Redis out
(docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Self, TypeVar, cast

import hiredis
import msgspec
import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from feed import keys, scripts, timelines_cluster, versions
from feed.cursor import split_order_key
from feed.interfaces import Insert, Removal, TimelinePage
from schemas import frames

__all__ = [
    "AsyncRedisTimelines",
    "RedisTimelines",
]

#: Most users one script call handles (keeps each call's Redis pause short).
_MAX_USERS = 8192
#: The smallest fan-out call (``_inserts_per_call``): a few ms of Redis at 5-10 µs an insert.
_MIN_CALL_INSERTS = 256
#: Inserts per call per activity of the batch (the activity keys each call repeats).
_INSERTS_PER_ACTIVITY = 16
#: Most members one set command names or returns (SMISMEMBER, SSCAN COUNT).
_SET_ARGS = 1000
_json = msgspec.json.Encoder()
_ACTIVITY_FRAME = [frames.ACTIVITY_HEAD, frames.ACTIVITY_MIDDLE, frames.ACTIVITY_TAIL]
_REMOVED_FRAME = [frames.REMOVED_HEAD, frames.REMOVED_MIDDLE, frames.REMOVED_TAIL]
_G = TypeVar("_G")
_Args = list[str | int | bytes]
#: One script call: its KEYS and its ARGV.
_Call = tuple[list[str | bytes], _Args]


def _chunks(groups: Iterable[tuple[_G, Sequence[str]]]) -> list[list[tuple[_G, Sequence[str]]]]:
    """``groups`` (a fixed part and its users) split into calls of at most ``_MAX_USERS`` users
    each, in order, so each script run stays short; a group larger than that is split across
    calls (each part with the group's fixed part). No part is empty."""
    calls: list[list[tuple[_G, Sequence[str]]]] = []
    current: list[tuple[_G, Sequence[str]]] = []
    in_call = 0
    for fixed, users in groups:
        start = 0
        while start < len(users):
            part = users[start : start + max(1, _MAX_USERS - in_call)]
            current.append((fixed, part))
            in_call += len(part)
            start += len(part)
            if in_call >= _MAX_USERS:
                calls.append(current)
                current, in_call = [], 0
    if current:
        calls.append(current)
    return calls


def _remove_calls(
    k: keys.Keyspace,
    hist: int,
    removals: Iterable[tuple[str, str, Sequence[str]]],
    publish: str = "PUBLISH",
) -> list[_Call]:
    """The ``remove.lua`` calls for (member, activity id, users) removals: per user three KEYS
    (:func:`feed.keys.remove_user_keys`) and its channel in ARGV, ``_MAX_USERS`` users a call;
    frames go out by ``publish`` (``SPUBLISH`` on a Redis Cluster)."""
    calls: list[_Call] = []
    groups = (((member, _id_json(aid)), users) for member, aid, users in removals if users)
    for chunk in _chunks(groups):
        call_keys: list[str | bytes] = []
        args: _Args = [hist, *_REMOVED_FRAME, publish]
        for (member, id_json), users in chunk:
            args += [member, id_json, len(users)]
            for user in users:
                call_keys.extend(k.remove_user_keys(user))
                args.append(k.channel(user))
        calls.append((call_keys, args))
    return calls


def _fanout_calls(
    k: keys.Keyspace, inserts: Sequence[Insert], head: _Args
) -> tuple[list[tuple[str, bytes]], list[_Call]]:
    """The bodies to SET and the ``fanout.lua`` calls for ``inserts``: every user's inserts
    grouped into one call (in insert order), at most ``_MAX_USERS`` inserts per call. KEYS: the
    activities' (deleted marker, body), then per user :func:`feed.keys.fanout_user_key`."""
    members: list[str] = []
    tails: list[bytes] = []
    activity_keys: list[str] = []
    bodies: list[tuple[str, bytes]] = []
    per_user: dict[str, list[bytes]] = {}
    get = per_user.get
    indexes: dict[str, bytes] = {}  # member -> its 1-based index, as the script reads it
    for insert in inserts:
        if not insert.users:
            continue
        index = indexes.get(insert.member)
        if index is None:
            deleted, body = k.activity_keys(insert.activity_id)
            bodies.append((body, insert.body))
            activity_keys += (deleted, body)
            members.append(insert.member)
            tails.append(timelines_cluster.frame_tail(insert))
            index = indexes[insert.member] = b"%d" % len(members)
        for user in insert.users:
            mine = get(user)
            if mine is None:
                per_user[user] = [index]
            else:
                mine.append(index)
    head = [*head, len(members), *_ACTIVITY_FRAME, *k.fanout_prefixes, *members, *tails, b"k"]
    cap = _inserts_per_call(len(members))
    user_key = k.fanout_user_key
    calls: list[_Call] = []
    call_keys: list[str | bytes] = list(activity_keys)
    args = list(head)
    in_call = 0
    for user, mine in per_user.items():
        call_keys.append(user_key(user))
        args.append(b" ".join(mine))
        in_call += len(mine)
        if in_call >= cap:
            calls.append((call_keys, args))
            call_keys, args, in_call = list(activity_keys), list(head), 0
    if in_call:
        calls.append((call_keys, args))
    return bodies, calls


def _inserts_per_call(activities: int) -> int:
    """Inserts per ``fanout.lua`` call for a batch of ``activities``: small calls for small
    batches, so that other clients wait at most one short call (each is its own round trip, see
    :func:`_execute_packed`); a large batch gets calls large enough that repeating the batch's
    activity keys and members in each (every call needs them) stays a few percent of its
    arguments."""
    return min(_MAX_USERS, max(_MIN_CALL_INSERTS, _INSERTS_PER_ACTIVITY * activities))


def _id_json(activity_id: str) -> bytes:
    return _json.encode(activity_id)


def _totals(results: Sequence[Sequence[int | bytes]]) -> tuple[int, int]:
    return sum(int(r[0]) for r in results), sum(int(r[1]) for r in results)


def _execute_packed(
    client: redis.Redis,
    commands: list[tuple[str | int | bytes, ...]],
    rounds: Sequence[int] = (),
) -> list[Any]:
    """The replies to ``commands``, sent as one pipeline on one connection of ``client``'s pool,
    with error replies in place (as ``pipeline.execute(raise_on_error=False)`` returns them).

    ``rounds``: split the pipeline into round trips of that many commands each (the rest in a
    last one): the next is sent once the replies to the last are read. Redis reads a client's
    whole pipeline and runs every command in it before it serves another client, so a long
    fan-out sent at once makes every other client wait for all of it; sent call by call, the
    others wait for one call at most (the worker's own claims and follower versions for the next
    batch, the gateways' reads).

    The fan-out's hot path: it packs with ``hiredis.pack_command`` directly, which costs a
    fraction of ``redis-py``'s own packing per argument (the fan-out sends five per user). A
    connection error is retried with the connection's own policy, like ``redis-py``'s pipelines
    (the commands are idempotent: SET, the idempotent scripts, DEL).
    """
    # hiredis' stub types its argument as a 1-tuple; it takes a tuple of any length.
    pack = cast("Callable[[tuple[str | int | bytes, ...]], bytes]", hiredis.pack_command)
    sizes = list(rounds)
    sizes.append(len(commands) - sum(sizes))
    packets: list[tuple[list[bytes], int]] = []
    start = 0
    for size in sizes:
        if size > 0:
            chunk = commands[start : start + size]
            packets.append(([b"".join([pack(command) for command in chunk])], size))
            start += size
    pool = client.connection_pool
    connection = pool.get_connection()

    def run() -> list[Any]:
        replies: list[Any] = []
        for packed, count in packets:
            connection.send_packed_command(packed)  # type: ignore[no-untyped-call]  # redis-py
            for _ in range(count):
                try:
                    replies.append(connection.read_response())
                except ResponseError as error:
                    replies.append(error)
        return replies

    def fail(_error: Exception) -> None:
        connection.disconnect()  # type: ignore[no-untyped-call]  # redis-py

    try:
        return connection.retry.call_with_retry(run, fail)
    finally:
        pool.release(connection)


#: Weight of one batch in :attr:`RedisTimelines._online_share` (a batch's calls vote as one).
_ONLINE_SHARE_WEIGHT = 0.2


class RedisTimelines(keys.KeyspaceView):
    """Synchronous writer and reader (the fan-out worker's side)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        timeline_max: int,
        stream_history: int,
        body_ttl_s: int,
        only_active: bool = False,
        wait_replicas: int = 1,
        wait_timeout_ms: int = 1000,
    ) -> None:
        """``wait_replicas``/``wait_timeout_ms``: on a Redis Cluster, writes count once that many
        replicas acknowledged them (``feed.timelines_cluster.ClusterScripts``)."""
        self._redis = client
        self._max = timeline_max
        self._hist = stream_history
        self._ttl = body_ttl_s
        self._only_active = "1" if only_active else "0"
        self._fanout = client.register_script(scripts.source("fanout"))
        self._remove = client.register_script(scripts.source("remove"))
        self._outbox_add = client.register_script(scripts.source("outbox_add"))
        self._outbox_remove = client.register_script(scripts.source("outbox_remove"))
        self._claim = client.register_script(scripts.source("claim"))
        #: On a Redis Cluster: every call in one slot (``feed.timelines_cluster``).
        self._cluster: timelines_cluster.ClusterScripts | None = None
        #: On a cluster, the share of recent fan-out calls that found a user online (a moving
        #: average over batches; one list, shared by the tenant views): from one half up, the
        #: calls go out with their bodies at once (mode ``b``) instead of offline-first. In mode
        #: ``b`` a call counts as online if it pushed a frame: one that found its users online
        #: but pushed nothing new (a replayed batch) counts as offline, and at worst the next
        #: calls go offline-first again (each then runs twice if someone is online).
        self._online_share = [0.0]
        if isinstance(client, redis.RedisCluster):
            self._cluster = timelines_cluster.ClusterScripts(
                client,
                [
                    scripts.source(name)  # claims are plain commands on a cluster
                    for name in ("fanout", "remove", "outbox_add", "outbox_remove")
                ],
                wait_replicas=wait_replicas,
                wait_timeout_ms=wait_timeout_ms,
            )

    def for_tenant(self, tenant: str, *, timeline_max: int | None = None) -> Self:
        """The same store for ``tenant``'s keys (and its timeline cap)."""
        view = super().for_tenant(tenant)
        if timeline_max is not None:
            view._max = timeline_max
        return view

    @property
    def client(self) -> redis.Redis:
        return self._redis

    def insert(self, inserts: Sequence[Insert], *, release: Sequence[str] = ()) -> tuple[int, int]:
        """Insert each activity into its users' timelines. Returns (inserted, pushed).

        With ``only_active``, users without an ``active`` marker are skipped (Cassandra only).
        One pipeline: the bodies, then script calls of at most ``_MAX_USERS`` inserts each, every
        user's inserts grouped into one call (one ZADD per user rather than one per insert), then
        the deletion of the ``release`` ids' claims (:meth:`claim`). An activity deleted
        meanwhile (:meth:`mark_deleted`) is skipped, atomically, and its body is not kept.
        """
        if self._cluster is not None:
            return self._insert_cluster(self._cluster, inserts, release)
        bodies, calls = _fanout_calls(self._k, inserts, [self._max, self._hist, self._only_active])
        if not calls:
            if release:
                self._redis.delete(*[self._k.claim(a) for a in release])
            return 0, 0
        commands: list[tuple[str | int | bytes, ...]] = [
            ("SET", key, body, "EX", self._ttl) for key, body in bodies
        ]
        sha = self._fanout.sha
        commands += [("EVALSHA", sha, len(k), *k, *a) for k, a in calls]
        if release:
            commands.append(("DEL", *[self._k.claim(a) for a in release]))
        # One round trip per script call (the bodies go with the first, the claims' release with
        # the last): see _execute_packed.
        rounds = [len(bodies) + 1, *([1] * (len(calls) - 1))]
        replies = _execute_packed(self._redis, commands, rounds)
        results = replies[len(bodies) : len(bodies) + len(calls)]
        if any(isinstance(r, NoScriptError) for r in results):
            # Redis lost its script cache (restart, SCRIPT FLUSH): load it and run the calls that
            # did not run (a call runs whole or not at all, and the script is idempotent).
            self._redis.script_load(self._fanout.script)
            again = [c for c, r in zip(calls, results, strict=True) if isinstance(r, NoScriptError)]
            rerun = iter(
                _execute_packed(self._redis, [("EVALSHA", sha, len(k), *k, *a) for k, a in again])
            )
            results = [next(rerun) if isinstance(r, NoScriptError) else r for r in results]
        # As pipeline.execute() does: the first error, once every command ran.
        errors = [
            r for r in replies if isinstance(r, Exception) and not isinstance(r, NoScriptError)
        ]
        errors += [r for r in results if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        return _totals(results)

    def _insert_cluster(
        self,
        cluster: timelines_cluster.ClusterScripts,
        inserts: Sequence[Insert],
        release: Sequence[str],
    ) -> tuple[int, int]:
        """:meth:`insert` on a Redis Cluster (``feed.timelines_cluster``): the deleted markers
        (a deleted activity is left out, its body not kept); the bodies and the calls without
        bodies in one pipeline; calls with someone online again with bodies (or, while most
        calls find someone online, every call with its bodies at once); then the markers
        again, and what was written of an activity deleted meanwhile is taken back; then the
        claims' release."""
        live = [i for i in inserts if i.users]
        before = timelines_cluster.deleted_now(cluster, [i.activity_id for i in live], self._k)
        if before:
            live = [i for i in live if i.activity_id not in before]
            self.delete_bodies(before)
        calls = timelines_cluster.fanout_calls(
            live, [self._max, self._hist, self._only_active], self._k
        )
        bodies = {self._k.body(i.activity_id): i.body for i in live}
        sha = self._fanout.sha
        commands: list[tuple[Any, ...]] = [
            ("SET", key, body, "EX", self._ttl) for key, body in bodies.items()
        ]
        # Offline-first, unless most recent calls found someone online: such a call would run
        # twice (mode u finds the user, mode b writes), with a round trip more.
        online_first = self._online_share[0] >= 0.5

        def evalsha(keys_args: tuple[list[bytes], timelines_cluster.Args]) -> tuple[Any, ...]:
            return ("EVALSHA", sha, len(keys_args[0]), *keys_args[0], *keys_args[1])

        full = timelines_cluster.with_bodies
        commands += [evalsha(full(c) if online_first else (c.keys, c.args)) for c in calls]
        slots: list[int | None] = [None] * len(bodies)
        slots += [c.slot for c in calls]
        replies = cluster.run(commands, slots=slots)
        timelines_cluster.raise_first(replies)
        results = replies[len(bodies) :]
        if online_first:  # a call with someone online pushed a frame
            online = [i for i, r in enumerate(results) if int(r[1]) > 0]
        else:  # a call that found someone online wrote nothing: again, with the bodies
            online = [i for i, r in enumerate(results) if int(r[0]) < 0]
            if online:
                again = cluster.run(
                    [evalsha(full(calls[i])) for i in online],
                    slots=[calls[i].slot for i in online],
                )
                timelines_cluster.raise_first(again)
                for i, reply in zip(online, again, strict=True):
                    results[i] = reply
        if calls:
            share = len(online) / len(calls)
            self._online_share[0] += (share - self._online_share[0]) * _ONLINE_SHARE_WEIGHT
        gone = timelines_cluster.deleted_now(cluster, [i.activity_id for i in live], self._k)
        if gone:
            # Deleted while this write ran: take it back (see feed.timelines_cluster).
            self.remove(
                [Removal(i.member, i.activity_id, i.users) for i in live if i.activity_id in gone]
            )
            self.delete_bodies(gone)
        if release:
            timelines_cluster.raise_first(cluster.run([("DEL", self._k.claim(a)) for a in release]))
        return _totals(results)

    def claim(self, claims: Sequence[tuple[str, str]], ttl_s: int) -> list[str]:
        """Claim each (activity id, actor) for ``ttl_s`` unless already claimed: one script
        call (on a Redis Cluster, one ``SET NX GET`` per id). Returns, per id, the actor
        holding the claim now (this one, or whoever claimed first). The script (or command)
        runs alone, so of concurrent claims of one id exactly one gets it.
        Actors travel newline-joined and only the ids held by someone else come back
        (measured with 500 ids: a tenth of the client time of a SET NX + GET pipeline)."""
        if not claims:
            return []
        holders = [actor for _, actor in claims]
        if self._cluster is not None:  # one SET NX GET per id (feed.timelines_cluster)
            replies = self._cluster.run(
                [("SET", self._k.claim(a), actor, "NX", "GET", "EX", ttl_s) for a, actor in claims]
            )
            timelines_cluster.raise_first(replies)
            return [
                actor if held is None else _text(held)
                for actor, held in zip(holders, replies, strict=True)
            ]
        others = self._claim(
            keys=[self._k.claim(a) for a, _ in claims], args=[ttl_s, "\n".join(holders)]
        )
        for position, holder in zip(others[0::2], others[1::2], strict=True):
            holders[int(position) - 1] = _text(holder)
        return holders

    def mark_deleted(self, activity_ids: Sequence[str], ttl_s: int) -> None:
        """Set the deleted markers: from now on the scripts never write these activities back."""
        if not activity_ids:
            return
        if self._cluster is not None:  # acknowledged by a replica too, as every worker write
            timelines_cluster.raise_first(
                self._cluster.run(
                    [
                        ("SET", name, 1, "EX", ttl_s)
                        for a in activity_ids
                        for name in self._k.deleted_copies(a)  # a reader reads any one
                    ]
                )
            )
            return
        pipe = self._redis.pipeline(transaction=False)
        for activity_id in activity_ids:
            pipe.set(self._k.deleted(activity_id), 1, ex=ttl_s)
        pipe.execute()

    def remove(self, removals: Sequence[Removal]) -> tuple[int, int]:
        """Remove activities from users' timelines. Returns (removed, pushed)."""
        if self._cluster is not None:
            sha = self._remove.sha
            replies = self._cluster.run(
                [
                    ("EVALSHA", sha, len(k), *k, *a)
                    for group in timelines_cluster.by_slot(removals)
                    for k, a in _remove_calls(self._k, self._hist, group, "SPUBLISH")
                ]
            )
            timelines_cluster.raise_first(replies)
            return _totals(replies)
        calls = _remove_calls(
            self._k, self._hist, ((r.member, r.activity_id, r.users) for r in removals)
        )
        if not calls:
            return 0, 0
        if len(calls) == 1:
            return _totals([self._remove(keys=calls[0][0], args=calls[0][1])])
        pipe = self._redis.pipeline(transaction=False)
        for call_keys, args in calls:
            self._remove(keys=call_keys, args=args, client=pipe)
        return _totals(pipe.execute())

    def add_to_outboxes(self, items: Sequence[tuple[str, Insert]]) -> int:
        """Large accounts' (actor, activity): capped outbox + actor-channel announcement."""
        if not items:
            return 0
        if self._cluster is not None:
            return self._outboxes_cluster(self._cluster, items)
        call_keys: list[str] = []
        args: _Args = [self._max, self._ttl, "k"]
        for actor, item in items:
            call_keys += (*self._k.activity_keys(item.activity_id), self._k.outbox(actor))
            args += [item.member, item.body, self._k.actor_channel(actor)]
        return int(self._outbox_add(keys=call_keys, args=args))

    def _outboxes_cluster(
        self, cluster: timelines_cluster.ClusterScripts, items: Sequence[tuple[str, Insert]]
    ) -> int:
        """:meth:`add_to_outboxes` on a Redis Cluster: the bodies, then one call per slot of
        the outboxes (mode ``o``); then what was added of an activity deleted meanwhile is
        taken back, as :meth:`insert` does (and a deleted one left out before)."""
        before = timelines_cluster.deleted_now(
            cluster, [item.activity_id for _, item in items], self._k
        )
        items = [(actor, item) for actor, item in items if item.activity_id not in before]
        if before:
            self.delete_bodies(before)
        if not items:
            return 0
        groups: dict[int, tuple[list[str], _Args]] = {}
        for actor, item in items:
            outbox = self._k.outbox(actor)
            names, args = groups.setdefault(
                timelines_cluster.slot_of(outbox), ([], [self._max, self._ttl, "o"])
            )
            names.append(outbox)
            args += [item.member, item.body, self._k.actor_channel(actor)]
        bodies = {self._k.body(item.activity_id): item.body for _, item in items}
        sha = self._outbox_add.sha
        commands: list[tuple[Any, ...]] = [
            ("SET", key, body, "EX", self._ttl) for key, body in bodies.items()
        ]
        commands += [("EVALSHA", sha, len(n), *n, *a) for n, a in groups.values()]
        replies = cluster.run(commands)
        timelines_cluster.raise_first(replies)
        added = sum(int(r) for r in replies[len(bodies) :])
        gone = timelines_cluster.deleted_now(
            cluster, [item.activity_id for _, item in items], self._k
        )
        for actor, item in items:
            if item.activity_id in gone:
                added -= self.remove_from_outbox(actor, item.member)
        if gone:
            self.delete_bodies(gone)
        return added

    def remove_from_outbox(self, actor: str, member: str) -> int:
        args: _Args = [member, self._k.actor_channel(actor)]
        if self._cluster is not None:
            args.append("SPUBLISH")  # sharded Pub/Sub: the channel is in the actor's slot
        return int(self._outbox_remove(keys=[self._k.outbox(actor)], args=args))

    def delete_bodies(self, activity_ids: Iterable[str]) -> None:
        names = [self._k.body(a) for a in activity_ids]
        if names:
            self._redis.delete(*names)

    def page(self, user: str, before: str | None, limit: int) -> TimelinePage:
        members = _decode_all(
            self._redis.zrevrangebylex(
                self._k.timeline(user), f"({before}" if before else "+", "-", start=0, num=limit
            )
        )
        names = _body_keys(self._k, members)
        if self._cluster is not None:
            return TimelinePage(members, _bodies(members, self._cluster.mget(names)))
        return TimelinePage(members, _bodies(members, self._redis.mget(names)))

    def size(self, user: str) -> int:
        return int(self._redis.zcard(self._k.timeline(user)))


class AsyncRedisTimelines(keys.KeyspaceView):
    """Asynchronous reader (the gateway's side)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._touch = client.register_script(scripts.source("touch"))
        self._rebuild = client.register_script(scripts.source("rebuild"))
        self._cache_bodies = client.register_script(scripts.source("cache_bodies"))
        self._fanout = client.register_script(scripts.source("fanout"))
        self._remove = client.register_script(scripts.source("remove"))
        #: On a Redis Cluster: every call in one slot (``feed.timelines_cluster``).
        self._cluster: timelines_cluster.AsyncClusterScripts | None = None
        if isinstance(client, aioredis.RedisCluster):
            self._cluster = timelines_cluster.AsyncClusterScripts(
                client, [scripts.source(n) for n in ("rebuild", "fanout", "remove")]
            )

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
        """The fan-out script for one activity and ``users`` (a gateway delivering a large
        account's activity to its connected followers). Idempotent: the first insert wins and
        assigns the one delivery ``seq``, however many gateways try."""
        if self._cluster is not None:
            return await self._insert_for_cluster(
                self._cluster,
                users,
                member,
                body,
                [timeline_max, stream_history, "0"],
                body_ttl_s,
            )
        bodies, calls = _fanout_calls(
            self._k,
            [Insert(member, split_order_key(member)[1], body, users)],
            [timeline_max, stream_history, "0"],
        )
        for key, value in bodies:
            await self._redis.set(key, value, ex=body_ttl_s)
        return _totals([await self._fanout(keys=k, args=a) for k, a in calls])

    async def _insert_for_cluster(
        self,
        cluster: timelines_cluster.AsyncClusterScripts,
        users: Sequence[str],
        member: str,
        body: bytes,
        head: _Args,
        body_ttl_s: int,
    ) -> tuple[int, int]:
        """:meth:`insert_for` on a Redis Cluster: the followers are connected here, so every
        call carries the body (mode ``b``); the deleted marker is read before and after, as the
        workers do (``feed.timelines_cluster``)."""
        activity_id = split_order_key(member)[1]
        if await cluster.deleted_now([activity_id], self._k):
            return 0, 0
        calls = timelines_cluster.fanout_calls(
            [Insert(member, activity_id, body, users)], head, self._k
        )
        sha = self._fanout.sha
        commands: list[tuple[Any, ...]] = [
            ("SET", self._k.body(activity_id), body, "EX", body_ttl_s)
        ]
        full = [timelines_cluster.with_bodies(c) for c in calls]
        commands += [("EVALSHA", sha, len(k), *k, *a) for k, a in full]
        replies = await cluster.run(commands)
        timelines_cluster.raise_first(replies)
        if await cluster.deleted_now([activity_id], self._k):
            await self.remove_for(users, member, stream_history=int(head[1]))
            await self._redis.delete(self._k.body(activity_id))
        return _totals(replies[1:])

    async def remove_for(
        self, users: Sequence[str], member: str, *, stream_history: int
    ) -> tuple[int, int]:
        removal = (member, split_order_key(member)[1], users)
        if self._cluster is not None:
            sha = self._remove.sha
            replies = await self._cluster.run(
                [
                    ("EVALSHA", sha, len(k), *k, *a)
                    for group in timelines_cluster.by_slot([Removal(*removal)])
                    for k, a in _remove_calls(self._k, stream_history, group, "SPUBLISH")
                ]
            )
            timelines_cluster.raise_first(replies)
            return _totals(replies)
        calls = _remove_calls(self._k, stream_history, [removal])
        return _totals([await self._remove(keys=k, args=a) for k, a in calls])

    async def _mget(self, names: list[str]) -> list[Any]:
        if self._cluster is not None:
            return await self._cluster.mget(names)
        return list(await self._redis.mget(names))

    async def page(self, user: str, before: str | None, limit: int) -> TimelinePage:
        members = _decode_all(
            await self._redis.zrevrangebylex(
                self._k.timeline(user), f"({before}" if before else "+", "-", start=0, num=limit
            )
        )
        if not members:
            return TimelinePage([], {})
        return TimelinePage(
            members, _bodies(members, await self._mget(_body_keys(self._k, members)))
        )

    async def touch(self, user: str, active_ttl_s: int, token: str = "1") -> int:
        """Mark the user active. 0: hot (Redis is complete); 1: rebuild now — the caller holds
        the rebuild lease ``token`` and must call :meth:`rebuild` with it; 2: being rebuilt
        (read Cassandra)."""
        touch_keys = [self._k.active(user), self._k.rebuilding(user)]
        return int(await self._touch(keys=touch_keys, args=[active_ttl_s, token]))

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
        """Load a timeline read from Cassandra into Redis and end the rebuild, in one script.

        ``bodies`` maps activity ids to bodies; a member without a body (deleted) is left out,
        and so is one whose activity was deleted after the Cassandra read (its deleted marker is
        checked atomically), so a rebuild that races a Delete never writes it back. The timeline
        is marked complete only if the lease ``token`` still holds (False if not: Redis restarted
        or the lease expired meanwhile; a newer rebuild finishes the job).
        """
        call_keys = [self._k.timeline(user), self._k.active(user), self._k.rebuilding(user)]
        args: _Args = [token, timeline_max, body_ttl_s]
        if self._cluster is not None:
            return await self._rebuild_cluster(self._cluster, call_keys, args, members, bodies)
        for member in members:
            activity_id = split_order_key(member)[1]
            body = bodies.get(activity_id)
            if body is not None:
                call_keys += self._k.activity_keys(activity_id)
                args += [member, body]
        return bool(await self._rebuild(keys=call_keys, args=args))

    async def _rebuild_cluster(
        self,
        cluster: timelines_cluster.AsyncClusterScripts,
        call_keys: list[str],
        args: _Args,
        members: list[str],
        bodies: dict[str, bytes],
    ) -> bool:
        """:meth:`rebuild` on a Redis Cluster: the deleted markers read first (those activities
        left out), the bodies stored, the script given the user's keys and the members only;
        then the markers again, and an entry deleted meanwhile is taken back out."""
        ids = {member: split_order_key(member)[1] for member in members}
        before = await cluster.deleted_now((a for a in ids.values() if a in bodies), self._k)
        entries = {m: a for m, a in ids.items() if a in bodies and a not in before}
        ttl = args[2]
        sets = [
            ("SET", self._k.body(a), bodies[a], "EX", ttl) for a in dict.fromkeys(entries.values())
        ]
        sha = self._rebuild.sha
        command = ("EVALSHA", sha, len(call_keys), *call_keys, *args, *entries)
        replies = await cluster.run([*sets, command])
        timelines_cluster.raise_first(replies)
        gone = await cluster.deleted_now(entries.values(), self._k)
        if gone:
            # no frame: a rebuild pushes none either
            timeline = call_keys[0]
            await self._redis.zrem(timeline, *[m for m, a in entries.items() if a in gone])
            await self._redis.delete(*[self._k.body(a) for a in gone])
        return bool(replies[-1])

    async def big_state(self, user: str) -> tuple[bytes, int]:
        """(version of whom ``user`` follows, size of the big-accounts set): one round trip, and
        one more to install a version if ``user`` has none (``feed.versions.current``)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self._k.following_version(user))
        pipe.scard(self._k.big_accounts)
        version, size = await pipe.execute()
        version = await versions.current_async(
            self._redis, self._k.following_version(user), version
        )
        return version, int(size)

    async def big_accounts(self) -> list[str]:
        """The members of the big-accounts set, sentinel left out (``SSCAN``: each command
        returns about ``_SET_ARGS`` members)."""
        members = [m async for m in self._redis.sscan_iter(self._k.big_accounts, count=_SET_ARGS)]
        return [_text(m) for m in dict.fromkeys(members) if m]  # SSCAN may repeat a member

    async def big_among(self, users: Sequence[str]) -> list[str]:
        """Which of ``users`` are big accounts: ``SMISMEMBER`` commands of at most ``_SET_ARGS``
        users each (one pipeline), so no single command grows with ``users``."""
        if not users:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for start in range(0, len(users), _SET_ARGS):
            pipe.smismember(self._k.big_accounts, list(users[start : start + _SET_ARGS]))
        flags = [flag for chunk in await pipe.execute() for flag in chunk]
        return [u for u, flag in zip(users, flags, strict=True) if flag]

    async def outbox_pages(
        self, actors: Sequence[str], before: str | None, limit: int
    ) -> dict[str, list[str]]:
        """Each large account's newest order keys older than ``before`` (Redis part only)."""
        pipe = self._redis.pipeline(transaction=False)
        for actor in actors:
            pipe.zrevrangebylex(
                self._k.outbox(actor), f"({before}" if before else "+", "-", start=0, num=limit
            )
        results = await pipe.execute()
        return {a: _decode_all(r) for a, r in zip(actors, results, strict=True)}

    async def bodies(self, members: list[str]) -> dict[str, bytes]:
        if not members:
            return {}
        return _bodies(members, await self._mget(_body_keys(self._k, members)))

    async def cache_bodies(self, bodies: dict[str, bytes], ttl_s: int) -> int:
        """Cache bodies read from Cassandra, except those of activities deleted since the read
        (checked atomically). Returns how many were cached."""
        if not bodies:
            return 0
        if self._cluster is not None:
            # An activity's marker and body live in different slots: the markers are read
            # before and after instead (feed.timelines_cluster).
            before = await self._cluster.deleted_now(bodies, self._k)
            fresh = {a: b for a, b in bodies.items() if a not in before}
            sets = [("SET", self._k.body(a), b, "EX", ttl_s) for a, b in fresh.items()]
            timelines_cluster.raise_first(await self._cluster.run(sets))
            gone = await self._cluster.deleted_now(fresh, self._k)
            if gone:
                await self._redis.delete(*[self._k.body(a) for a in gone])
            return len(fresh) - len(gone)
        call_keys: list[str] = []
        args: _Args = [ttl_s]
        for activity_id, body in bodies.items():
            call_keys += self._k.activity_keys(activity_id)
            args.append(body)
        return int(await self._cache_bodies(keys=call_keys, args=args))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _raw(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _decode_all(values: Sequence[bytes | str]) -> list[str]:
    return [_text(v) for v in values]


def _body_keys(k: keys.Keyspace, members: list[str]) -> list[str]:
    return [k.body(split_order_key(m)[1]) for m in members]


def _bodies(members: list[str], raw: Sequence[bytes | str | None]) -> dict[str, bytes]:
    return {m: _raw(b) for m, b in zip(members, raw, strict=True) if b is not None}
