"""Notification feeds in Redis: the hot copy that decides, with Cassandra as the durable copy.

Every change of a user's notification feed is one call of ``feed/lua/notify.lua`` on that
user's keys (one slot; a call carries many users, so a Redis Cluster needs the calls grouped by
slot: the cluster work, not done yet). The script applies the rules of
``feed.notify`` atomically, publishes the ``notification`` frames to the user's channel when
they are online, and returns the mutations that the caller then writes to Cassandra
(``feed.notify_cassandra``), each with a version that orders it.

Hot and cold. A user's keys exist while they are in use: every call renews their TTL
(``FEED_ACTIVE_DAYS``; 0 keeps them). A call on a user whose keys are gone (never loaded, expired,
or lost with Redis) answers ``L``: the caller reads the user's rows from Cassandra, loads them
(``load``, which does nothing if another caller loaded first) and calls again. Nothing a worker
wrote is lost that way: it writes Cassandra before it commits its Kafka offsets, and a batch
that Redis lost before that is replayed (a replay of an activity the feed already has writes
its group's rows again). A Cassandra write that fails is made again by the retry: the script
keeps every change in the user's pending list until the caller confirms it wrote it, and
answers the whole list on every write. Without Cassandra (``durable`` None) a user with no keys
starts empty and nothing is kept pending.

Costs (one user per script call, calls pipelined): the worker sends one round trip per batch,
then one more for the users it had to load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Self, TypeAlias

import redis
import redis.asyncio as aioredis

from feed import keys, scripts, timelines_cluster
from feed.interfaces import ActorPage, Mark, Notify, NotifyOp, NotifyPage
from feed.notify import NotifyLimits, NotifyRows, group_key
from schemas.errors import FeedError

if TYPE_CHECKING:  # the Cassandra driver is slow to import: the gateway imports it when needed
    from feed.notify_cassandra import CassandraNotifyStore

__all__ = ["AsyncNotifyRedis", "NotifyRedis", "NotifyUnavailable"]


#: One argument of a script call, as redis-py takes it.
Arg: TypeAlias = str | int


class NotifyUnavailable(FeedError):
    """The user's feed must be loaded from Cassandra, and Cassandra is not connected yet."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _op_args(ops: Sequence[NotifyOp]) -> list[Arg]:
    args: list[Arg] = []
    for op in ops:
        if isinstance(op, Notify):
            args += [
                "a",
                op.activity_id,
                op.actor,
                op.ts,
                group_key(op.type, op.object),
                op.type,
                op.object,
            ]
        else:
            args += ["d", op.activity_id, "", "", "", "", ""]
    return args


def _load_args(rows: NotifyRows) -> list[Arg]:
    args: list[Arg] = [len(rows.groups)]
    for gid, gkey, type_, object_, opened, open_, seen, read in rows.groups:
        args += [gid, gkey, type_, object_, opened, int(open_), int(seen), int(read)]
    for gid, aid, actor, ts in rows.items:
        args += [gid, aid, actor, ts]
    return args


def _head(ttl_s: int, command: str, sharded: bool = False) -> list[Arg]:
    """ARGV 1-3 of every command: the command (``s:`` before it on a Redis Cluster: frames go
    out by sharded Pub/Sub), the TTL, how often the TTL is renewed."""
    return [f"s:{command}" if sharded else command, ttl_s, min(86_400, ttl_s // 10)]


#: Most operations in one ``apply`` script call (the call runs alone in Redis: a bound on how
#: long any other client waits) and most users (5 ``KEYS`` each).
_CALL_OPS = 2000
_CALL_USERS = 500


class NotifyRedis(keys.KeyspaceView):
    """The workers' side (:class:`feed.interfaces.Notifications`), synchronous.

    The users of a batch go in few script calls (each one holds many users, one ``KEYS`` group
    per user), pipelined in one round trip; the users that turn out to be cold are loaded and
    called again in a second one.
    """

    def __init__(
        self,
        client: redis.Redis,
        durable: CassandraNotifyStore | None,
        *,
        limits: NotifyLimits,
        ttl_s: int,
        wait_replicas: int = 1,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self._redis = client
        self._durable = durable
        self._limits = limits
        self._ttl = ttl_s
        self._script = client.register_script(scripts.source("notify"))
        #: On a Redis Cluster: each call holds one slot's users (``feed.timelines_cluster``).
        self._cluster: timelines_cluster.ClusterScripts | None = None
        if isinstance(client, redis.RedisCluster):
            self._cluster = timelines_cluster.ClusterScripts(
                client,
                [scripts.source("notify")],
                wait_replicas=wait_replicas,
                wait_timeout_ms=wait_timeout_ms,
            )
        self._sharded = self._cluster is not None

    def for_tenant(self, tenant: str) -> Self:
        """The same store for ``tenant``: its keys, and its rows in Cassandra."""
        view = super().for_tenant(tenant)
        if self._durable is not None:
            view._durable = self._durable.for_tenant(tenant)
        return view

    def _execute(self, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]]) -> list[Any]:
        """Run ``notify.lua`` calls (KEYS, ARGV): one pipeline, one round trip (per node)."""
        if self._cluster is not None:
            sha = self._script.sha
            replies = self._cluster.run([("EVALSHA", sha, len(k), *k, *a) for k, a in calls])
            timelines_cluster.raise_first(replies)
            return replies
        pipe = self._redis.pipeline(transaction=False)
        for call_keys, args in calls:
            self._script(keys=call_keys, args=args, client=pipe)
        return list(pipe.execute())

    def _slot(self, user: str) -> int:
        """The user's slot on a Redis Cluster (0 on one Redis: one group)."""
        return 0 if self._cluster is None else timelines_cluster.slot_of(self._k.channel(user))

    def apply(self, ops: Sequence[NotifyOp]) -> int:
        if not ops:
            return 0
        by_user: dict[str, list[NotifyOp]] = {}
        for op in ops:
            by_user.setdefault(op.user, []).append(op)
        replies = self._run(by_user)
        cold = [u for u, reply in replies.items() if _is_cold(reply)]
        if cold:
            self._load(cold)
            replies.update(self._run({u: by_user[u] for u in cold}))
        changes = []
        for user, reply in replies.items():
            if _is_cold(reply):
                raise RuntimeError(f"notification feed of {user!r} could not be loaded")
            changes.append((user, [_text(v) for v in reply[1:]]))
        if self._durable is not None:
            self._durable.write(changes)
            self._confirm(changes)
        return sum(_groups_written(entries) for _, entries in changes)

    def _confirm(self, changes: Sequence[tuple[str, Sequence[str]]]) -> None:
        """Drop the mutations just written from the users' pending lists: one script call."""
        by_slot: dict[int, list[tuple[str, int]]] = {}
        for user, entries in changes:
            if entries:
                by_slot.setdefault(self._slot(user), []).append((user, _newest(entries)))
        self._execute(
            [
                (
                    [self._k.notify_pending(user) for user, _ in written],
                    [
                        *_head(self._ttl, "confirm", self._sharded),
                        *(version for _, version in written),
                    ],
                )
                for written in by_slot.values()
            ]
        )

    def _run(self, by_user: dict[str, list[NotifyOp]]) -> dict[str, list[Any]]:
        calls: list[tuple[list[str], list[Arg]]] = []
        users_of: list[list[str]] = []
        users: list[str] = []
        args: list[Arg] = []
        keys_: list[str] = []
        ops = 0

        def call() -> None:
            head = _head(self._ttl, "apply", self._sharded)
            limits = self._limits
            keep = int(self._durable is not None)
            head += [limits.window_us, limits.group_max, limits.max_groups, keep, len(users)]
            calls.append((keys_, head + args))
            users_of.append(list(users))

        slot = None
        for user in sorted(by_user, key=self._slot) if self._cluster else by_user:
            user_ops = by_user[user]
            full = ops + len(user_ops) > _CALL_OPS or len(users) >= _CALL_USERS
            if users and (full or self._slot(user) != slot):
                call()
                users, args, keys_, ops = [], [], [], 0
            slot = self._slot(user)
            users.append(user)
            keys_ += self._k.notify_keys(user)
            args += [self._k.channel(user), len(user_ops), *_op_args(user_ops)]
            ops += len(user_ops)
        call()
        replies: dict[str, list[Any]] = {}
        for users_of_call, reply in zip(users_of, self._execute(calls), strict=True):
            replies.update(zip(users_of_call, reply, strict=True))
        return replies

    def _load(self, users: list[str]) -> None:
        loaded = self._durable.load_many(users) if self._durable else {}
        self._execute(
            [
                (
                    self._k.notify_keys(user),
                    [
                        *_head(self._ttl, "load", self._sharded),
                        self._k.channel(user),
                        *_load_args(loaded.get(user) or NotifyRows([], [])),
                    ],
                )
                for user in users
            ]
        )


def _newest(entries: Sequence[str]) -> int:
    """The highest version among mutations (the second field of each)."""
    return max(int(entry.split(_US, 2)[1]) for entry in entries)


def _groups_written(entries: Sequence[str]) -> int:
    """Group rows among mutations (``G``: created, or written again by a replay)."""
    return sum(entry.startswith("G" + _US) for entry in entries)


_US = "\x1f"


def _is_cold(reply: Any) -> bool:
    return isinstance(reply, list) and len(reply) == 1 and _text(reply[0]) == "L"


class AsyncNotifyRedis(keys.KeyspaceView):
    """The gateway's side (:class:`feed.interfaces.AsyncNotifications`), asyncio.

    ``durable`` returns the Cassandra store, or None while it is not connected; ``needs_durable``
    says whether a cold user must wait for it (:class:`NotifyUnavailable`) or starts empty.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        durable: Callable[[], CassandraNotifyStore | None],
        *,
        needs_durable: bool,
        ttl_s: int,
    ) -> None:
        self._redis = client
        self._durable = durable
        self._needs_durable = needs_durable
        self._ttl = ttl_s
        self._script = client.register_script(scripts.source("notify"))
        #: On a Redis Cluster the frames go out by sharded Pub/Sub.
        self._sharded = isinstance(client, aioredis.RedisCluster)

    def for_tenant(self, tenant: str) -> Self:
        """The same store for ``tenant``: its keys, and its rows in Cassandra."""
        view = super().for_tenant(tenant)
        durable = self._durable

        def tenant_durable() -> CassandraNotifyStore | None:
            store = durable()
            return None if store is None else store.for_tenant(tenant)

        view._durable = tenant_durable
        return view

    async def _call(self, user: str, command: str, *args: Arg) -> list[Any]:
        head = [*_head(self._ttl, command, self._sharded), self._k.channel(user)]
        for _ in range(3):
            reply = await self._script(keys=self._k.notify_keys(user), args=head + list(args))
            if not _is_cold(reply):
                return list(reply)
            await self._load(user)
        raise NotifyUnavailable(f"the notification feed of {user!r} could not be loaded")

    async def _load(self, user: str) -> None:
        store = self._durable()
        if store is None and self._needs_durable:
            raise NotifyUnavailable("Cassandra is not connected yet")
        rows = await asyncio.to_thread(store.load, user) if store else NotifyRows([], [])
        await self._script(
            keys=self._k.notify_keys(user),
            args=[
                *_head(self._ttl, "load", self._sharded),
                self._k.channel(user),
                *_load_args(rows),
            ],
        )

    async def page(self, user: str, before: str | None, limit: int) -> NotifyPage:
        reply = await self._call(user, "page", before or "", limit)
        nxt = _text(reply[3])
        return NotifyPage(
            [bytes(g) if isinstance(g, bytes) else g.encode() for g in reply[4:]],
            nxt or None,
            int(reply[1]),
            int(reply[2]),
        )

    async def actors(self, user: str, gid: str, after: str | None, limit: int) -> ActorPage | None:
        reply = await self._call(user, "actors", gid, after or "", limit)
        if _text(reply[0]) == "N":
            return None
        nxt = _text(reply[1])
        return ActorPage([_text(a) for a in reply[2:]], nxt or None)

    async def counts(self, user: str) -> tuple[int, int]:
        reply = await self._call(user, "counts")
        return int(reply[1]), int(reply[2])

    async def mark(self, user: str, mark: Mark) -> tuple[int, int]:
        store = self._durable()
        if store is None and self._needs_durable:
            raise NotifyUnavailable("Cassandra is not connected yet")
        kind = "read" if mark.read else "seen"
        keep = int(store is not None)
        if mark.all:
            args: list[Arg] = [keep, kind, "all"]
        elif mark.through is not None:
            args = [keep, kind, "through", mark.through]
        else:
            args = [keep, kind, "groups", *mark.groups]
        reply = await self._call(user, "mark", *args)
        mutations = [_text(v) for v in reply[3:]]
        if mutations and store is not None:
            await asyncio.to_thread(store.write, [(user, mutations)])
            await self._script(
                keys=[self._k.notify_pending(user)],
                args=[*_head(self._ttl, "confirm", self._sharded), _newest(mutations)],
            )
        return int(reply[1]), int(reply[2])
