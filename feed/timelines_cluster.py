"""The fan-out worker's timeline writes on a Redis Cluster: every script call in one slot.

On one Redis, a fan-out call carries many users and the activities' deleted markers and bodies
(``feed.timelines_redis``). On a cluster each call may only touch one hash slot, so:

* **Calls are grouped by slot.** Every key of one user carries the user's hash tag (``{uid}``,
  ``feed.keys``), so a call holds the users whose timeline keys share a slot, with just the
  activities those users receive. Each user's keys that the call touches are declared
  (``feed.keys.fanout_cluster_keys``: four, or three in mode ``u``): a resharding moves a
  slot's keys one by one, and the cluster routes a call by its declared keys only. The calls go
  out as one pipeline per node (:class:`ClusterScripts`), all sent before any reply is read: one
  round trip per node, not one per user or per slot.
* **Bodies only where someone is online.** A call goes out first without bodies (``fanout.lua``
  mode ``u``: three keys per user and each user's members, in one MessagePack argument; no
  frame). If one of its users is online, the
  script writes nothing and says so, and the call is sent again with the bodies of its
  activities (mode ``b``): an offline user's insert needs no body, and the bodies are stored once
  per activity (``SET a:<id>``) for the readers as on one Redis. While most calls find someone
  online (a moving average over batches: ``RedisTimelines``), every call goes in mode ``b`` at
  once instead of running twice.
* **Deleted stays deleted, without the marker in the call's slot.** The deleted marker of an
  activity (``d:{<bucket>}<id>``, ``feed.keys.deleted_on_cluster``) cannot live in its
  readers' slot: a delete sets a copy in each of 24 buckets' slots, spread over the slot
  space, and a reader reads one bucket (the next in turn), so a batch's markers are one
  ``MGET`` on one node. The writer reads them before its writes, leaving a deleted activity
  out, and again *after* its writes, and takes back what it wrote of an activity deleted
  meanwhile (``remove.lua``, which also tells online users). A delete sets every copy before it
  reads the recipients; with the processor's order (Cassandra rows and recipients first, then
  Redis), a delete whose copy that second read missed reads the recipients after the write, so
  it removes the activity itself: either way no timeline keeps it.
* **Claims** are one ``SET <claim> <actor> NX GET EX <ttl>`` per id (the claim keys of a
  batch's ids lie in as many slots as there are ids): the reply is the holder, or nothing when
  this call took it, as ``claim.lua`` answers on one Redis, at the cost of a plain command
  instead of a script call per id.
* **Acknowledged means replicated**: each node's pipeline ends with ``WAIT`` for a replica
  (:class:`ClusterScripts`), so a failover never loses what the worker committed.
* **Scripts** are loaded on every primary when a store opens; a ``NOSCRIPT`` (a failover to a
  replica that never had them, a restart) loads them again and reruns just the calls that did
  not run (each call runs whole or not at all, and the scripts are idempotent).

The cost, stated in docs/operations.md ("Redis Cluster"): one round trip per node per batch for
the bodies and calls, one more for calls whose users are online, and two to one node for the
deleted markers.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import hiredis
import msgspec
import redis
import redis.asyncio as aioredis
from redis._parsers import BaseParser
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from feed import keys
from feed.interfaces import Insert, Removal
from schemas import frames
from schemas.errors import FeedError

__all__ = [
    "AsyncClusterScripts",
    "ClusterScripts",
    "ClusterUnavailable",
    "by_slot",
    "deleted_now",
    "fanout_calls",
    "frame_tail",
    "marker_reads",
    "markers_set",
    "raise_first",
    "slot_of",
    "with_bodies",
]

_ACTIVITY_FRAME = [frames.ACTIVITY_HEAD, frames.ACTIVITY_MIDDLE, frames.ACTIVITY_TAIL]
_msgpack = msgspec.msgpack.Encoder()
#: Most users one call carries (as on one Redis: each script run stays short).
MAX_USERS = 8192

Args = list[str | int | bytes]
#: Times a command is sent again after MOVED, ASK or TRYAGAIN before the batch is retried whole.
REDIRECTS = 5
TRYAGAIN_PAUSE_S = 0.05
_ASKING = b"*1\r\n$6\r\nASKING\r\n"


def _slot(command: tuple[Any, ...]) -> int:
    """The slot of a command's first key (an ``EVALSHA``'s fourth argument, else its second)."""
    return slot_of(command[3] if command[0] == "EVALSHA" else command[1])


def slot_of(key: str | bytes) -> int:
    """The hash slot of a key (its hash tag's, if it has one)."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))


class FanoutCall:
    """One ``fanout.lua`` call: one slot's users and the activities they receive. ``keys`` and
    ``args`` are mode ``u``'s (offline users only: three keys per user, no frame parts nor
    bodies); :func:`with_bodies` gives mode ``b``'s, for when a user is online. Each is built
    when asked for: a writer that goes online-first never needs mode ``u``'s."""

    __slots__ = ("activities", "head", "keyspace", "lists", "slot", "users")

    def __init__(
        self,
        users: list[str],
        slot: int,
        activities: list[Insert],
        lists: list[list[str]],
        head: Args,
        k: keys.Keyspace,
    ) -> None:
        self.users = users
        #: The hash slot of every key of the call (its users share it).
        self.slot = slot
        #: The call's activities, each once, in the order its users first receive them.
        self.activities = activities
        #: Per user, the members of its activities in delivery order (mode ``u``'s payload).
        self.lists = lists
        #: ``fanout.lua``'s head: max, stream length, only_active.
        self.head = head
        #: The names of the call's tenant.
        self.keyspace = k

    @property
    def keys(self) -> list[bytes]:
        """Mode ``u``'s ``KEYS``: each user's timeline, presence and active marker."""
        cluster_keys = self.keyspace.fanout_cluster_keys
        return [name for u in self.users for name in cluster_keys(u)[:3]]

    @property
    def args(self) -> Args:
        """Mode ``u``'s ``ARGV``: max and only_active of the head (no frame, so no stream
        length), then every user's members in one MessagePack argument (see fanout.lua: one
        argument per member cost Redis a fifth more per insert)."""
        return [b"u", self.head[0], self.head[2], _msgpack.encode(self.lists)]


def frame_tail(insert: Insert) -> bytes:
    """The activity frame's own tail as ``fanout.lua`` takes it: '' for the plain tail, else
    :func:`schemas.frames.activity_tail` (with ``traceparent`` and ``ts``)."""
    if insert.ts_ms is None and insert.traceparent is None:
        return b""
    return frames.activity_tail(insert.ts_ms, insert.traceparent)


def fanout_calls(
    inserts: Sequence[Insert], head: Args, k: keys.Keyspace = keys.DEFAULT
) -> list[FanoutCall]:
    """The mode-``u`` ``fanout.lua`` calls for ``inserts``: the users grouped by the slot of
    their keys, each call with only its users' activities (re-indexed from 1), every user's
    activities in insert order. ``k``: the tenant's names."""
    per_user: dict[str, list[int]] = {}
    for position, insert in enumerate(inserts):
        for user in insert.users:
            per_user.setdefault(user, []).append(position)
    by_slot: dict[int, list[str]] = {}
    user_key = k.fanout_user_key
    for user in per_user:
        by_slot.setdefault(slot_of(user_key(user)), []).append(user)
    calls: list[FanoutCall] = []
    for slot, users in by_slot.items():
        for start in range(0, len(users), MAX_USERS):
            calls.append(_call(inserts, head, users[start : start + MAX_USERS], slot, per_user, k))
    return calls


def _call(
    inserts: Sequence[Insert],
    head: Args,
    users: list[str],
    slot: int,
    per_user: dict[str, list[int]],
    k: keys.Keyspace,
) -> FanoutCall:
    activities: dict[str, Insert] = {}  # member -> its activity, each once
    lists: list[list[str]] = []  # each user's members, as mode u reads them
    for user in users:
        members: list[str] = []
        for position in per_user[user]:
            insert = inserts[position]
            activities.setdefault(insert.member, insert)
            members.append(insert.member)
        lists.append(members)
    return FanoutCall(users, slot, list(activities.values()), lists, head, k)


def with_bodies(call: FanoutCall) -> tuple[list[bytes], Args]:
    """The call's (KEYS, ARGV) in mode ``b``: each user's four keys; the head, the frame's
    parts, the prefixes, the members, their frames' tails, the mode and the bodies, then the
    users' indexes into the members (the same order as mode ``u``'s lists: built here, as
    most calls never need them), with the names of the call's tenant."""
    k = call.keyspace
    acts = call.activities
    index = {a.member: b"%d" % n for n, a in enumerate(acts, 1)}
    cluster_keys = k.fanout_cluster_keys
    names = [name for u in call.users for name in cluster_keys(u)]
    return names, [
        *call.head,
        len(acts),
        *_ACTIVITY_FRAME,
        *k.fanout_prefixes,
        *[i.member for i in acts],
        *[frame_tail(i) for i in acts],
        b"b",
        *[i.body for i in acts],
        *[b" ".join([index[m] for m in mine]) for mine in call.lists],
    ]


class ClusterUnavailable(FeedError, redis.exceptions.ConnectionError):
    """The cluster cannot take the writes right now (a node down, a failover or a resharding in
    progress, a replica that did not acknowledge): the caller retries the whole batch later (the
    worker's store-outage path), which is safe because every call is idempotent."""


class ClusterScripts:
    """Runs script calls (and one-key commands) on a Redis Cluster: one pipeline per primary,
    all sent before any reply is read, so one round trip per node. Loads the scripts on every
    primary first; on ``NOSCRIPT`` loads them again and reruns the calls that did not run.

    **Acknowledged means replicated.** Redis replicates asynchronously: a master killed right
    after a write may lose it when its replica takes over. So each node's pipeline ends with
    ``WAIT <n> <timeout>``, where ``n`` is ``wait_replicas`` capped at the replicas the slot map
    lists for that master (none: no ``WAIT``). A reply below ``n`` raises
    :class:`ClusterUnavailable`: the worker does not commit the batch's offsets and runs it
    again, on the promoted replica if there was a failover. What a master had acknowledged
    before is on a replica, so a failover loses nothing the worker committed.

    Redirections: a ``MOVED`` reply refreshes the slot map and sends the command again to the
    new owner; an ``ASK`` reply (a slot being migrated) sends it again to the target after
    ``ASKING``; ``TRYAGAIN`` (keys split by a migration in progress) after a short pause; each
    at most :data:`REDIRECTS` times, then :class:`ClusterUnavailable`. A lost connection or a
    ``CLUSTERDOWN`` refreshes the slot map at the next call and raises
    :class:`ClusterUnavailable`.

    Hand-written rather than redis-py's ``ClusterPipeline``: that pipeline has no per-node
    ``WAIT`` (a keyless command goes to one random node), and it spent three times the client
    CPU per insert of one server's packed pipeline (docs/benchmarks.md, "Redis Cluster"); this
    packs with ``hiredis.pack_command`` as ``feed.timelines_redis`` does on one server, and
    keeps a connection per primary read with its own hiredis reader (:class:`_Link`)."""

    def __init__(
        self,
        client: redis.RedisCluster,
        sources: Iterable[str],
        *,
        wait_replicas: int = 1,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self._redis = client
        self._sources = list(sources)
        self._wait_replicas = wait_replicas
        self._wait_timeout_ms = wait_timeout_ms
        self._stale = False
        self._replica_counts: dict[str, int] | None = None
        #: Per primary (by name), the links no round uses now.
        self._idle: dict[str, list[_Link]] = {}
        self.load()

    def load(self) -> None:
        for source in self._sources:
            self._redis.script_load(source)  # every primary (redis-py's SCRIPT LOAD target)

    def mget(self, names: Sequence[str]) -> list[Any]:
        """GET of each name, one round trip per node (``MGET`` takes one slot's keys)."""
        return list(self._redis.mget_nonatomic(names))

    def run(
        self,
        commands: Sequence[tuple[Any, ...]],
        *,
        wait: bool = True,
        slots: Sequence[int | None] | None = None,
    ) -> list[Any]:
        """The replies to ``commands`` (each a command's arguments; the first key is the
        command's second argument, or an ``EVALSHA``'s fourth), with error replies in place
        (``NOSCRIPT`` ones retried once after :meth:`load`). ``wait``: acknowledged by the
        replicas (see the class doc); reads pass False. ``slots``: per command, its slot if the
        caller knows it already (:attr:`FanoutCall.slot`), else None."""
        replies = self._send(commands, wait, slots)
        failed = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if failed:
            self.load()
            again = self._send(
                [commands[i] for i in failed], wait, slots and [slots[i] for i in failed]
            )
            for i, reply in zip(failed, again, strict=True):
                replies[i] = reply
        return replies

    def _send(
        self,
        commands: Sequence[tuple[Any, ...]],
        wait: bool,
        slots: Sequence[int | None] | None = None,
    ) -> list[Any]:
        if not commands:
            return []
        nodes = self._redis.nodes_manager
        self._refresh()
        replies: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        asking: dict[int, Any] = {}  # command index -> the node an ASK named
        for attempt in range(REDIRECTS + 1):
            groups: dict[str, tuple[Any, list[int], int]] = {}
            for i in todo:
                node = asking.get(i)
                if node is None:
                    slot = slots[i] if slots is not None else None
                    owners = nodes.slots_cache.get(_slot(commands[i]) if slot is None else slot)
                    if not owners:
                        self._stale = True
                        raise ClusterUnavailable("a slot has no owner in the Redis Cluster map")
                    node = owners[0]
                if node.name not in groups:
                    # the replicas of the node (an ASK target's too): what its WAIT waits for
                    groups[node.name] = (node, [], self._replicas().get(node.name, 0))
                groups[node.name][1].append(i)
            redirect: list[int] = []
            pause = False
            for i, reply in self._round(commands, groups, asking, wait):
                replies[i] = reply
                if isinstance(reply, redis.exceptions.AskError):  # MOVED is an AskError too
                    redirect.append(i)
                    target = (
                        None
                        if isinstance(reply, redis.exceptions.MovedError)
                        else nodes.get_node(host=reply.host, port=reply.port)
                    )
                    if target is None:  # MOVED, or an ASK to a node the map lacks: a fresh map
                        asking.pop(i, None)
                        self._stale = True
                    else:
                        asking[i] = target
                elif isinstance(reply, redis.exceptions.TryAgainError):
                    redirect.append(i)
                    pause = True
                elif isinstance(reply, redis.exceptions.ClusterDownError):
                    self._stale = True
                    raise ClusterUnavailable(f"Redis Cluster down: {reply}")
                else:
                    asking.pop(i, None)
            if not redirect:
                return replies
            if attempt == REDIRECTS:
                break
            self._refresh()  # asking now holds only the commands an ASK or TRYAGAIN sends again
            if pause:
                time.sleep(TRYAGAIN_PAUSE_S)  # keys split by a migration: it ends shortly
            todo = redirect
        raise ClusterUnavailable(
            f"Redis Cluster still redirecting after {REDIRECTS} attempts: {replies[todo[0]]}"
        )

    def _refresh(self) -> None:
        """Read the slot map again if something said it is out of date."""
        if not self._stale:
            return
        self._replica_counts = None
        self.close()  # links to nodes that may be gone or replicas now
        try:
            self._redis.nodes_manager.initialize()
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise ClusterUnavailable(f"Redis Cluster slot map unavailable: {exc}") from None
        self._stale = False

    def _replicas(self) -> dict[str, int]:
        """Each primary's replica count in the slot map (read once per map)."""
        counts = self._replica_counts
        if counts is None:
            counts = {}
            for owners in self._redis.nodes_manager.slots_cache.values():
                if owners:
                    counts[owners[0].name] = max(counts.get(owners[0].name, 0), len(owners) - 1)
            self._replica_counts = counts
        return counts

    def _round(
        self,
        commands: Sequence[tuple[Any, ...]],
        groups: dict[str, tuple[Any, list[int], int]],
        asking: dict[int, Any],
        wait: bool,
    ) -> list[tuple[int, Any]]:
        """Each node's commands (then its ``WAIT``) as one packed pipeline, every pipeline sent
        before the first reply is read; the replies with their command indexes."""
        pack = cast("Callable[[tuple[Any, ...]], bytes]", hiredis.pack_command)
        sent: list[tuple[Any, _Link, list[int], int, int]] = []
        out: list[tuple[int, Any]] = []
        try:
            for node, mine, replicas in groups.values():
                acks = min(self._wait_replicas, replicas) if wait else 0
                parts: list[bytes] = []  # one command each, so one reply each
                for i in mine:
                    if i in asking:
                        parts.append(_ASKING)
                    parts.append(pack(commands[i]))
                if acks:
                    parts.append(pack(("WAIT", acks, self._wait_timeout_ms)))
                link = self._take(node)
                sent.append((node, link, mine, acks, len(parts)))
                link.sock.sendall(b"".join(parts))
            for node, link, mine, acks, due in sent:
                replies = iter(link.read(due))
                for i in mine:
                    if i in asking:
                        next(replies)  # ASKING's OK
                    out.append((i, next(replies)))
                if acks:
                    self._acknowledged(node, next(replies), acks)
        except BaseException as exc:
            # Replies may be left unread on any of the links: none is used again.
            self._stale = True
            for _, link, *_ in sent:
                link.close()
            if isinstance(exc, ClusterUnavailable) or not isinstance(
                exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
            ):
                raise
            raise ClusterUnavailable(f"Redis Cluster node unreachable: {exc}") from exc
        else:
            for node, link, *_ in sent:
                self._idle.setdefault(node.name, []).append(link)
        return out

    def _acknowledged(self, node: Any, reply: Any, acks: int) -> None:
        """Raise :class:`ClusterUnavailable` unless ``WAIT``'s reply counts ``acks`` replicas."""
        if isinstance(reply, redis.exceptions.ResponseError):
            # e.g. the map named a primary that is a replica now
            self._stale = True
            raise ClusterUnavailable(f"{node.name}: WAIT failed: {reply}")
        if int(reply) < acks:
            self._stale = True  # the replica may be gone from the map
            raise ClusterUnavailable(
                f"{node.name}: {reply} of {acks} replicas acknowledged the writes "
                f"within {self._wait_timeout_ms} ms"
            )

    def _take(self, node: Any) -> _Link:
        """An idle link to ``node``, or a new one."""
        idle = self._idle.get(node.name)
        if idle:
            with contextlib.suppress(IndexError):  # another thread took the last one
                return idle.pop()
        pool = self._redis.get_redis_connection(node).connection_pool
        return _Link(pool)

    def close(self) -> None:
        """Close the idle links (a link in use is closed by its round)."""
        idle, self._idle = self._idle, {}
        for links in idle.values():
            for link in links:
                link.close()


#: hiredis's reply while the bytes read so far hold no whole reply.
_MORE = object()


class _Link:
    """A connection to one primary that :class:`ClusterScripts` keeps checked out of the node's
    pool (so the client's ``close`` closes it too) and reads with its own hiredis reader: every
    reply of a round from one buffer.

    Hand-written, for a measurement: at the gateway benchmark's batches of 30 activities,
    redis-py's pool checkout and its ``read_response`` per reply cost the cluster writer about
    4 of its 33 µs of CPU per activity (docs/benchmarks.md, "Redis Cluster"). The connection is
    redis-py's, from the node's pool, so TLS, AUTH and timeouts are the client's."""

    __slots__ = ("buffer", "connection", "pool", "reader", "sock")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.connection = connection = pool.get_connection()
        #: redis-py keeps no public handle on it.
        self.sock = connection._sock
        encoder = connection.encoder
        options = {"encoding": encoder.encoding} if encoder.decode_responses else {}
        self.reader = hiredis.Reader(
            notEnoughData=_MORE,
            replyError=BaseParser.parse_error,  # MOVED, ASK, NOSCRIPT... as redis-py raises them
            protocolError=redis.exceptions.InvalidResponse,
            errors=encoder.encoding_errors,
            **options,
        )
        self.buffer = bytearray(65536)

    def read(self, count: int) -> list[Any]:
        """The next ``count`` replies, an error reply as its exception, in place."""
        replies: list[Any] = []
        reader, sock, buffer = self.reader, self.sock, self.buffer
        while len(replies) < count:
            reply = reader.gets()
            if reply is _MORE:
                got = sock.recv_into(buffer)
                if not got:
                    raise redis.exceptions.ConnectionError("Redis closed the connection")
                reader.feed(buffer, 0, got)  # type: ignore[arg-type]  # any buffer, as redis-py feeds it
            else:
                replies.append(reply)
        return replies

    def close(self) -> None:
        """Disconnect, and give the connection back to its pool (which connects it again when
        it next lends it)."""
        self.connection.disconnect()
        self.pool.release(self.connection)


class AsyncClusterScripts:
    """:class:`ClusterScripts` on an asyncio ``RedisCluster`` (the gateway's)."""

    def __init__(self, client: aioredis.RedisCluster, sources: Iterable[str]) -> None:
        self._redis = client
        self._sources = list(sources)

    async def load(self) -> None:
        for source in self._sources:
            await self._redis.script_load(source)

    async def mget(self, names: Sequence[str]) -> list[Any]:
        return list(await self._redis.mget_nonatomic(names))

    async def run(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        replies = await self._send(commands)
        failed = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if failed:
            await self.load()
            again = await self._send([commands[i] for i in failed])
            for i, reply in zip(failed, again, strict=True):
                replies[i] = reply
        return replies

    async def _send(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        if not commands:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))

    async def deleted_now(
        self, activity_ids: Iterable[str], k: keys.Keyspace = keys.DEFAULT
    ) -> set[str]:
        """:func:`deleted_now` on this client."""
        groups, reads = marker_reads(activity_ids, k)
        return markers_set(groups, await self.run(reads))


def raise_first(replies: Iterable[Any]) -> None:
    """As ``pipeline.execute()`` does: the first error, once every command ran."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


def by_slot(removals: Iterable[Removal]) -> list[list[tuple[str, str, list[str]]]]:
    """Removals as ``(member, activity id, users)`` groups, one list per slot of the users'
    keys (``remove.lua`` calls built from one list stay in one slot)."""
    slots: dict[int, dict[tuple[str, str], list[str]]] = {}
    for removal in removals:
        for user in removal.users:
            group = slots.setdefault(slot_of(keys.timeline(user)), {})
            group.setdefault((removal.member, removal.activity_id), []).append(user)
    return [[(m, a, users) for (m, a), users in group.items()] for group in slots.values()]


def deleted_now(
    cluster: ClusterScripts, activity_ids: Iterable[str], k: keys.Keyspace = keys.DEFAULT
) -> set[str]:
    """Which of the activities have their deleted marker set now: one bucket's copies of the
    markers (:func:`marker_reads`), one round trip to one node."""
    groups, reads = marker_reads(activity_ids, k)
    return markers_set(groups, cluster.run(reads, wait=False))


#: Most markers one ``MGET`` reads (a read of a huge batch stays many short commands).
MARKERS_PER_READ = 512
#: The reads of this process so far: each reads the next bucket in turn.
_reads = itertools.count()


def marker_reads(
    activity_ids: Iterable[str], k: keys.Keyspace, bucket: int | None = None
) -> tuple[list[list[str]], list[tuple[str, ...]]]:
    """The activities (each once) in chunks of at most :data:`MARKERS_PER_READ`, and per chunk
    one ``MGET`` of the markers' copies in one bucket (:func:`feed.keys.deleted_on_cluster`;
    a delete sets every copy): ``bucket``, else the next in turn, so the nodes share the reads.
    Measured against one ``EXISTS`` per activity and one ``MGET`` per bucket:
    docs/benchmarks.md."""
    if bucket is None:
        bucket = next(_reads) % keys.DELETED_BUCKETS
    ids = list(dict.fromkeys(activity_ids))
    groups = [
        ids[start : start + MARKERS_PER_READ] for start in range(0, len(ids), MARKERS_PER_READ)
    ]
    reads = [("MGET", *[k.deleted_on_cluster(a, bucket) for a in group]) for group in groups]
    return groups, reads


def markers_set(groups: list[list[str]], replies: list[Any]) -> set[str]:
    """The activities whose marker the replies of :func:`marker_reads`'s ``MGET`` found."""
    raise_first(replies)
    return {
        activity_id
        for ids, values in zip(groups, replies, strict=True)
        for activity_id, value in zip(ids, values, strict=True)
        if value is not None
    }
