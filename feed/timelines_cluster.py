"""The fan-out worker's timeline writes on a Redis Cluster: every script call in one slot.

On one Redis, a fan-out call carries many users and the activities' deleted markers and bodies
(``feed.timelines_redis``). On a cluster each call may only touch one hash slot, so:

* **Calls are grouped by slot.** Every key of one user carries the user's hash tag (``{uid}``,
  ``feed.keys``), so a call holds the users whose timeline keys share a slot, with just the
  activities those users receive. The calls go out as one pipeline, which redis-py's
  ``ClusterPipeline`` sends as one round trip per node, not one per user or per slot.
* **Bodies only where someone is online.** A call goes out first without bodies (``fanout.lua``
  mode ``u``). If one of its users is online, the script writes nothing and says so, and the call
  is sent again with the bodies of its activities (mode ``b``): an offline user's insert needs no
  body, and the bodies are stored once per activity (``SET a:<id>``) for the readers as on one
  Redis.
* **Deleted stays deleted, without the marker in the call's slot.** The deleted marker of an
  activity (``d:<id>``) lives in the activity's slot, not the users'. So the writer reads the
  markers *after* its writes and takes back what it wrote of an activity deleted meanwhile
  (``remove.lua``, which also tells online users). With the processor's order (Cassandra rows and
  recipients first, then Redis), a delete that set its marker after that read reads the
  recipients after the write, so it removes the activity itself: either way no timeline keeps it.
* **Claims** (``claim.lua``) are grouped by the slot of each claim key the same way.
* **Scripts** are loaded on every primary when a store opens; a ``NOSCRIPT`` (a failover to a
  replica that never had them, a restart) loads them again and reruns just the calls that did
  not run (each call runs whole or not at all, and the scripts are idempotent).

The cost, stated in docs/operations.md ("Redis Cluster"): one round trip per node per batch for
the bodies and calls, one more for calls whose users are online, and one for the deleted
markers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from feed import keys
from feed.interfaces import Insert, Removal
from schemas import frames

__all__ = [
    "AsyncClusterScripts",
    "ClusterScripts",
    "by_slot",
    "claim_calls",
    "deleted_now",
    "fanout_calls",
    "frame_tail",
    "raise_first",
    "slot_of",
    "with_bodies",
]

_ACTIVITY_FRAME = [frames.ACTIVITY_HEAD, frames.ACTIVITY_MIDDLE, frames.ACTIVITY_TAIL]
_USER_PREFIXES = list(keys.FANOUT_USER_PREFIXES)
#: Most users one call carries (as on one Redis: each script run stays short).
MAX_USERS = 8192

Args = list[str | int | bytes]


def slot_of(key: str | bytes) -> int:
    """The hash slot of a key (its hash tag's, if it has one)."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))


class FanoutCall:
    """One ``fanout.lua`` call: one slot's users and the activities they receive."""

    __slots__ = ("args", "bodies", "keys")

    def __init__(self, call_keys: list[bytes], args: Args, bodies: list[bytes]) -> None:
        self.keys = call_keys
        self.args = args
        #: The bodies of the call's activities, in their order: sent only in mode 'b'.
        self.bodies = bodies


def frame_tail(insert: Insert) -> bytes:
    """The activity frame's own tail as ``fanout.lua`` takes it: '' for the plain tail, else
    :func:`schemas.frames.activity_tail` (with ``traceparent`` and ``ts``)."""
    if insert.ts_ms is None and insert.traceparent is None:
        return b""
    return frames.activity_tail(insert.ts_ms, insert.traceparent)


def fanout_calls(inserts: Sequence[Insert], head: Args) -> list[FanoutCall]:
    """The mode-``u`` ``fanout.lua`` calls for ``inserts``: the users grouped by the slot of
    their keys, each call with only its users' activities (re-indexed from 1), every user's
    activities in insert order."""
    per_user: dict[str, list[int]] = {}
    for position, insert in enumerate(inserts):
        for user in insert.users:
            per_user.setdefault(user, []).append(position)
    by_slot: dict[int, list[str]] = {}
    user_key = keys.fanout_user_key
    for user in per_user:
        by_slot.setdefault(slot_of(user_key(user)), []).append(user)
    calls: list[FanoutCall] = []
    for users in by_slot.values():
        for start in range(0, len(users), MAX_USERS):
            calls.append(_call(inserts, head, users[start : start + MAX_USERS], per_user))
    return calls


def _call(
    inserts: Sequence[Insert], head: Args, users: list[str], per_user: dict[str, list[int]]
) -> FanoutCall:
    local: dict[str, bytes] = {}  # member -> its index in this call, as the script reads it
    members: list[str] = []
    tails: list[bytes] = []
    bodies: list[bytes] = []
    values: list[bytes] = []
    for user in users:
        mine: list[bytes] = []
        for position in per_user[user]:
            insert = inserts[position]
            index = local.get(insert.member)
            if index is None:
                members.append(insert.member)
                bodies.append(insert.body)
                tails.append(frame_tail(insert))
                index = local[insert.member] = b"%d" % len(members)
            mine.append(index)
        values.append(b" ".join(mine))
    args: Args = [*head, len(members), *_ACTIVITY_FRAME, *_USER_PREFIXES, *members, *tails, b"u"]
    return FanoutCall([keys.fanout_user_key(u) for u in users], [*args, *values], bodies)


def with_bodies(call: FanoutCall) -> Args:
    """The call's ARGV in mode ``b``: the bodies after the mode."""
    n = len(call.bodies)
    mode = 12 + 2 * n  # 0-based position of the mode in ARGV
    return [*call.args[:mode], b"b", *call.bodies, *call.args[mode + 1 :]]


def claim_calls(claims: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[str]]]:
    """``claim.lua`` calls, one per slot of the claim keys: (positions in ``claims``, keys)."""
    by_slot: dict[int, tuple[list[int], list[str]]] = {}
    for position, (activity_id, _) in enumerate(claims):
        key = keys.claim(activity_id)
        positions, names = by_slot.setdefault(slot_of(key), ([], []))
        positions.append(position)
        names.append(key)
    return list(by_slot.values())


class ClusterScripts:
    """Runs script calls (and plain commands) through one ``ClusterPipeline``: one round trip
    per node. Loads the scripts on every primary first; on ``NOSCRIPT`` loads them again and
    reruns the calls that did not run."""

    def __init__(self, client: redis.RedisCluster, sources: Iterable[str]) -> None:
        self._redis = client
        self._sources = list(sources)
        self.load()

    def load(self) -> None:
        for source in self._sources:
            self._redis.script_load(source)  # every primary (redis-py's SCRIPT LOAD target)

    def mget(self, names: Sequence[str]) -> list[Any]:
        """GET of each name, one round trip per node (``MGET`` takes one slot's keys)."""
        return list(self._redis.mget_nonatomic(names))

    def run(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """The replies to ``commands`` (each a command's arguments), with error replies in place
        (``NOSCRIPT`` ones retried once after :meth:`load`)."""
        replies = self._send(commands)
        failed = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if failed:
            self.load()
            for i, reply in zip(failed, self._send([commands[i] for i in failed]), strict=True):
                replies[i] = reply
        return replies

    def _send(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        if not commands:
            return []
        pipe = self._redis.pipeline(transaction=False)  # type: ignore[no-untyped-call]
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute(raise_on_error=False))


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

    async def deleted_now(self, activity_ids: Iterable[str]) -> set[str]:
        """:func:`deleted_now` on this client."""
        ids = list(dict.fromkeys(activity_ids))
        flags = await self.run([("EXISTS", keys.deleted(a)) for a in ids])
        raise_first(flags)
        return {a for a, flag in zip(ids, flags, strict=True) if int(flag)}


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


def deleted_now(cluster: ClusterScripts, activity_ids: Iterable[str]) -> set[str]:
    """Which of the activities have their deleted marker set now (one round trip per node)."""
    ids = list(dict.fromkeys(activity_ids))
    flags = cluster.run([("EXISTS", keys.deleted(a)) for a in ids])
    raise_first(flags)
    return {a for a, flag in zip(ids, flags, strict=True) if int(flag)}
