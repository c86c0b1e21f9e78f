"""Hot timelines in Redis, and the per-user delivery stream that makes resume gap-free.

Guarantees (what callers may rely on):

* **Idempotent.** A timeline is a sorted set of order keys (``feed.cursor.order_key``); inserting
  the same activity again is a no-op and does not push again. An activity that the cap trims
  straight away (older than the user's newest ``timeline_max`` entries, so it is in Cassandra
  only) is not pushed either: it is no new item of the hot timeline, and its replay would find it
  missing from Redis and push it a second time. Bodies are stored once per activity
  (``a:<id>``, with a TTL), not once per follower.
* **Capped.** Each timeline keeps the newest ``timeline_max`` entries; older ones live in Cassandra.
* **Atomic per call.** Each script call inserts (or removes) a group of entries, trims, and
  for every *online* recipient (one with a presence hash, see
  :meth:`AsyncRedisPresence.attach`) assigns the next delivery ``seq``, appends the frame
  to the user's delivery stream and publishes it on the
  user's channel — all in one step, so a frame's ``seq`` order is the order it reached the
  timeline, and a resume that reads the stream after subscribing sees no gap.
* **Deleted stays deleted.** Once a Delete has set an activity's deleted marker
  (``d:<id>``, :meth:`RedisTimelines.mark_deleted`), every script that writes timelines or bodies
  checks it atomically and leaves the activity out: a fan-out replayed by another worker, a
  timeline rebuild or a body re-cache that read the activity before the delete cannot write it
  back. The marker is a cache of the durable flag in Cassandra (kept ``FEED_BODY_TTL_DAYS``).
* **At-most-once Pub/Sub.** Publishing is fire-and-forget; a gateway that misses a message notices
  the ``seq`` gap and reads the delivery stream (bounded to ``stream_history`` frames).
* Offline users cost one HGET, one ZADD and one ZREMRANGEBYRANK per user per call, however many
  of the call's activities they receive: no publish, no stream.
* **Hot and cold** (``only_active``): users with neither an ``active`` marker (``seen:``) nor a
  presence hash are skipped (Cassandra only). An online user is always written and pushed to,
  so a Redis that lost its ``seen:`` markers (restart) does not silence connected clients once
  the gateway has re-attached their presence (:meth:`AsyncRedisPresence.refresh`, ``gateway.hub``).

Not cluster-safe as written: the scripts build per-user keys from arguments. Shard by user id on
the client side to scale Redis out (docs/operations.md).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import msgspec
import redis
import redis.asyncio as aioredis

from feed import keys, versions

__all__ = [
    "AsyncRedisPresence",
    "AsyncRedisTimelines",
    "Insert",
    "Presence",
    "RedisTimelines",
    "Removal",
    "TimelinePage",
]

# Shared Lua: deliver one frame to an online user (seq, stream, publish).
_DELIVER = """
local function deliver(uid, frame_head, frame_tail, hist)
  local on = 'on:{' .. uid .. '}'
  local ep = redis.call('HGET', on, 'e')
  if not ep then return 0 end
  local seq = redis.call('HINCRBY', on, 's', 1)
  local frame = frame_head .. ep .. '.' .. seq .. frame_tail
  redis.call('XADD', 'dl:{' .. uid .. '}', 'MAXLEN', '~', hist, seq .. '-0', 'f', frame)
  redis.call('PUBLISH', 'u:{' .. uid .. '}', frame)
  return 1
end
"""

# Grouped by user: each user's new members of the call are added with one ZADD (per 1000), trimmed
# once and delivered in call order (one HINCRBY for all their seqs); a member the trim removed at
# once is not delivered. Bodies are SET by the caller just before
# (same connection, so before this script runs) and read back only for online users' frames.
# ARGV: max, hist, only_active, n, member_1 .. member_n, then pairs of: uid, indexes into the
# members (1-based, space-separated, in the order the user must receive them)
_FANOUT = """
local max = tonumber(ARGV[1])
local hist = ARGV[2]
local only_active = ARGV[3] == '1'
local n = tonumber(ARGV[4])
local members = {}
for j = 1, n do
  local member = ARGV[4 + j]
  local aid = string.match(member, '^[^:]*:(.*)$')
  if redis.call('EXISTS', 'd:' .. aid) == 1 then
    -- deleted since the caller read it: never written back (nor its body)
    redis.call('DEL', 'a:' .. aid)
    members[j] = false
  else
    members[j] = member
  end
end
local bodies = {}
local head = '{"type":"activity","cursor":"'
local inserted, pushed = 0, 0
for i = 5 + n, #ARGV, 2 do
  local uid = ARGV[i]
  local on = 'on:{' .. uid .. '}'
  local ep = redis.call('HGET', on, 'e')
  -- inactive and offline: Cassandra only; the timeline is rebuilt on the next read or connect
  -- (an online user is always written and pushed to, even if Redis lost their 'seen' marker)
  if ep or not only_active or redis.call('EXISTS', 'seen:{' .. uid .. '}') == 1 then
    local tl = 'tl:{' .. uid .. '}'
    local mine = {}
    for j in string.gmatch(ARGV[i + 1], '%d+') do
      local member = members[tonumber(j)]
      if member then mine[#mine + 1] = member end
    end
    local added = 0
    local fresh = {}  -- online only: members not in the timeline before this call, once each
    local taken = {}
    -- at most 1000 members per command (Lua's unpack limit)
    for first = 1, #mine, 1000 do
      local last = math.min(#mine, first + 999)
      if ep then
        local scores = redis.call('ZMSCORE', tl, unpack(mine, first, last))
        for k = first, last do
          if not scores[k - first + 1] and not taken[mine[k]] then
            taken[mine[k]] = true
            fresh[#fresh + 1] = mine[k]
          end
        end
      end
      local args = {}
      for k = first, last do
        args[#args + 1] = 0
        args[#args + 1] = mine[k]
      end
      added = added + redis.call('ZADD', tl, unpack(args))
    end
    if added > 0 then
      inserted = inserted + added
      local trimmed = redis.call('ZREMRANGEBYRANK', tl, 0, -(max + 1))
      if trimmed > 0 and #fresh > 0 then
        -- A member the cap trimmed straight away (older than the newest 'max') is not a new
        -- item of the hot timeline: not pushed, so a replay of it cannot be pushed again.
        local kept = {}
        for first = 1, #fresh, 1000 do
          local last = math.min(#fresh, first + 999)
          local scores = redis.call('ZMSCORE', tl, unpack(fresh, first, last))
          for k = first, last do
            if scores[k - first + 1] then kept[#kept + 1] = fresh[k] end
          end
        end
        fresh = kept
      end
    end
    if #fresh > 0 then
      local seq = redis.call('HINCRBY', on, 's', #fresh) - #fresh
      local dl = 'dl:{' .. uid .. '}'
      local channel = 'u:{' .. uid .. '}'
      for _, member in ipairs(fresh) do
        local body = bodies[member]
        if not body then
          body = redis.call('GET', 'a:' .. string.match(member, '^[^:]*:(.*)$')) or 'null'
          bodies[member] = body
        end
        seq = seq + 1
        local frame = head .. ep .. '.' .. seq .. '","activity":' .. body .. '}'
        redis.call('XADD', dl, 'MAXLEN', '~', hist, seq .. '-0', 'f', frame)
        redis.call('PUBLISH', channel, frame)
        pushed = pushed + 1
      end
    end
  end
end
return {inserted, pushed}
"""

# ARGV: hist, then groups of: member, id_json, users (joined by newlines)
_REMOVE = (
    _DELIVER
    + """
local hist = ARGV[1]
local head = '{"type":"removed","cursor":"'
local i = 2
local removed, pushed = 0, 0
while i <= #ARGV do
  local member, id_json, users = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local tail = '","id":' .. id_json .. '}'
  for uid in string.gmatch(users, '[^\\n]+') do
    if redis.call('ZREM', 'tl:{' .. uid .. '}', member) == 1 then
      removed = removed + 1
      pushed = pushed + deliver(uid, head, tail, hist)
    end
  end
  i = i + 3
end
return {removed, pushed}
"""
)

# Large accounts: their own capped outbox, announced on the actor channel (once per activity).
# ARGV: max, ttl, then groups of: actor, member, body_key, body
_OUTBOX_ADD = """
local max = tonumber(ARGV[1])
local ttl = ARGV[2]
local added = 0
for i = 3, #ARGV, 4 do
  local actor, member, bkey, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local ob = 'ob:{' .. actor .. '}'
  if redis.call('EXISTS', 'd:' .. string.match(member, '^[^:]*:(.*)$')) == 1 then
    ob = nil  -- deleted since the caller read it
  else
    redis.call('SET', bkey, body, 'EX', ttl)
  end
  if ob and redis.call('ZADD', ob, 0, member) == 1 then
    added = added + 1
    if redis.call('ZCARD', ob) > max then redis.call('ZREMRANGEBYRANK', ob, 0, -(max + 1)) end
    redis.call('PUBLISH', 'ac:{' .. actor .. '}', '+' .. member .. '\\n' .. body)
  end
end
return added
"""

# ARGV: groups of: actor, member
_OUTBOX_REMOVE = """
local removed = 0
for i = 1, #ARGV, 2 do
  local actor, member = ARGV[i], ARGV[i + 1]
  if redis.call('ZREM', 'ob:{' .. actor .. '}', member) == 1 then
    removed = removed + 1
    redis.call('PUBLISH', 'ac:{' .. actor .. '}', '-' .. member)
  end
end
return removed
"""

# First creates of new activity ids (fanout.processor): claim each id for its actor unless someone
# holds it already; returns the ids (1-based positions) held by someone else, with the holder.
# ARGV: ttl, the ids joined by newlines, their actors joined by newlines (ids hold no whitespace)
_CLAIM = """
local ttl = ARGV[1]
local actors = {}
for actor in string.gmatch(ARGV[3], '[^\\n]+') do actors[#actors + 1] = actor end
local out = {}
local i = 0
for aid in string.gmatch(ARGV[2], '[^\\n]+') do
  i = i + 1
  local key = 'c:' .. aid
  local holder = redis.call('GET', key)
  if not holder then
    redis.call('SET', key, actors[i], 'EX', ttl)
  elseif holder ~= actors[i] then
    out[#out + 1] = i
    out[#out + 1] = holder
  end
end
return out
"""

# The active marker 'seen:{uid}' is '1' once the user's Redis timeline is complete and 'b' while
# it is being rebuilt from Cassandra; 'rb:{uid}' is the builder's lease (its token, with a TTL).
# Fan-out writes Redis as soon as 'seen' exists, so writes during a rebuild are kept; reads trust
# Redis only when 'seen' is '1'. A builder that vanished (lease expired) is taken over by the next
# touch; a rebuild whose lease was lost (Redis restarted, lease expired) does not mark the timeline
# built.
# ARGV: uid, active_ttl, token -> 0 hot, 1 rebuild now (the caller holds the lease), 2 rebuilding
_TOUCH = """
local seen = 'seen:{' .. ARGV[1] .. '}'
local rb = 'rb:{' .. ARGV[1] .. '}'
local state = redis.call('GET', seen)
if not state then
  redis.call('SET', seen, 'b', 'EX', ARGV[2])
  redis.call('SET', rb, ARGV[3], 'EX', 60)
  return 1
end
redis.call('EXPIRE', seen, ARGV[2])
if state == '1' then return 0 end
if redis.call('SET', rb, ARGV[3], 'EX', 60, 'NX') then return 1 end
return 2
"""

# Loads a timeline read from Cassandra and ends the rebuild, in one step. An entry whose activity
# was deleted meanwhile (the delete ran after the Cassandra read) is left out, with its body.
# ARGV: uid, token, max, body_ttl, then pairs of: member, body
# -> 1 the timeline is marked complete, 0 the lease was lost (nothing marked)
_REBUILD = """
local uid, token, max, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local tl = 'tl:{' .. uid .. '}'
local args = {}
local added = false
for i = 5, #ARGV, 2 do
  local member = ARGV[i]
  local aid = string.match(member, '^[^:]*:(.*)$')
  if redis.call('EXISTS', 'd:' .. aid) == 0 then
    redis.call('SET', 'a:' .. aid, ARGV[i + 1], 'EX', ttl)
    args[#args + 1] = 0
    args[#args + 1] = member
    if #args >= 1000 then
      redis.call('ZADD', tl, unpack(args))
      args, added = {}, true
    end
  end
end
if #args > 0 then
  redis.call('ZADD', tl, unpack(args))
  added = true
end
if added then redis.call('ZREMRANGEBYRANK', tl, 0, -(max + 1)) end
local seen = 'seen:{' .. uid .. '}'
local rb = 'rb:{' .. uid .. '}'
if redis.call('GET', rb) ~= token then return 0 end
redis.call('DEL', rb)
if redis.call('EXISTS', seen) == 1 then redis.call('SET', seen, '1', 'KEEPTTL') end
return 1
"""

# Bodies read from Cassandra, cached again unless the activity was deleted meanwhile.
# ARGV: ttl, then pairs of: activity id, body
_CACHE_BODIES = """
local cached = 0
for i = 2, #ARGV, 2 do
  if redis.call('EXISTS', 'd:' .. ARGV[i]) == 0 then
    redis.call('SET', 'a:' .. ARGV[i], ARGV[i + 1], 'EX', ARGV[1])
    cached = cached + 1
  end
end
return cached
"""

# ARGV: uid, new_epoch, ttl -> {epoch, seq}
_ATTACH = """
local on = 'on:{' .. ARGV[1] .. '}'
local dl = 'dl:{' .. ARGV[1] .. '}'
local ep = redis.call('HGET', on, 'e')
if not ep then
  redis.call('DEL', dl)
  redis.call('HSET', on, 'e', ARGV[2], 's', 0)
  ep = ARGV[2]
end
redis.call('EXPIRE', on, ARGV[3])
redis.call('EXPIRE', dl, ARGV[3])
return {ep, redis.call('HGET', on, 's')}
"""

#: Most users one script call handles (keeps each call's Redis pause short).
_MAX_USERS = 8192
#: Most members one set command names or returns (SMISMEMBER, SSCAN COUNT).
_SET_ARGS = 1000
_json = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Insert:
    """One activity to insert into the timelines of ``users``."""

    member: str
    activity_id: str
    body: bytes
    users: Sequence[str]


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


def _chunks(
    head: list[str | int | bytes], groups: Iterable[tuple[list[str | int | bytes], Sequence[str]]]
) -> list[list[str | int | bytes]]:
    """Argument lists: ``head``, then per group its fixed part and its users joined by newlines
    (user ids never contain whitespace). A call carries at most ``_MAX_USERS`` users, so each
    script run stays short; a group larger than that is split across calls."""
    calls: list[list[str | int | bytes]] = []
    current = list(head)
    in_call = 0
    for fixed, users in groups:
        start = 0
        while start < len(users):
            part = users[start : start + max(1, _MAX_USERS - in_call)]
            current.extend(fixed)
            current.append("\n".join(part))
            in_call += len(part)
            start += len(part)
            if in_call >= _MAX_USERS:
                calls.append(current)
                current, in_call = list(head), 0
    if len(current) > len(head):
        calls.append(current)
    return calls


def _fanout_calls(
    inserts: Sequence[Insert], head: list[str | int | bytes]
) -> tuple[list[tuple[str, bytes]], list[list[str | int | bytes]]]:
    """The bodies to SET and the ``_FANOUT`` argument lists for ``inserts``: every user's inserts
    grouped into one call (in insert order), at most ``_MAX_USERS`` inserts per call."""
    members: list[str] = []
    bodies: list[tuple[str, bytes]] = []
    per_user: dict[str, list[str]] = {}
    get = per_user.get
    indexes: dict[str, str] = {}  # member -> its 1-based index, as the script reads it
    for insert in inserts:
        if not insert.users:
            continue
        index = indexes.get(insert.member)
        if index is None:
            bodies.append((keys.body(insert.activity_id), insert.body))
            members.append(insert.member)
            index = indexes[insert.member] = str(len(members))
        for user in insert.users:
            mine = get(user)
            if mine is None:
                per_user[user] = [index]
            else:
                mine.append(index)
    head = [*head, len(members), *members]
    calls: list[list[str | int | bytes]] = []
    args = list(head)
    in_call = 0
    for user, mine in per_user.items():
        args.append(user)
        args.append(" ".join(mine))
        in_call += len(mine)
        if in_call >= _MAX_USERS:
            calls.append(args)
            args, in_call = list(head), 0
    if in_call:
        calls.append(args)
    return bodies, calls


def _id_json(activity_id: str) -> bytes:
    return _json.encode(activity_id)


class RedisTimelines:
    """Synchronous writer and reader (the fan-out worker's side)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        timeline_max: int,
        stream_history: int,
        body_ttl_s: int,
        only_active: bool = False,
    ) -> None:
        self._redis = client
        self._max = timeline_max
        self._hist = stream_history
        self._ttl = body_ttl_s
        self._only_active = "1" if only_active else "0"
        self._fanout = client.register_script(_FANOUT)
        self._remove = client.register_script(_REMOVE)
        self._outbox_add = client.register_script(_OUTBOX_ADD)
        self._outbox_remove = client.register_script(_OUTBOX_REMOVE)
        self._claim = client.register_script(_CLAIM)

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
        bodies, calls = _fanout_calls(inserts, [self._max, self._hist, self._only_active])
        if not calls:
            if release:
                self._redis.delete(*[keys.claim(a) for a in release])
            return 0, 0
        pipe = self._redis.pipeline(transaction=False)
        for key, body in bodies:
            pipe.set(key, body, ex=self._ttl)
        for args in calls:
            self._fanout(args=args, client=pipe)
        if release:
            pipe.delete(*[keys.claim(a) for a in release])
        results = pipe.execute()
        results = results[len(bodies) : len(bodies) + len(calls)]
        return sum(int(r[0]) for r in results), sum(int(r[1]) for r in results)

    def claim(self, claims: Sequence[tuple[str, str]], ttl_s: int) -> list[str]:
        """Claim each (activity id, actor) for ``ttl_s`` unless already claimed: one script
        call. Returns, per id, the actor holding the claim now (this one, or whoever claimed
        first). The script runs alone, so of concurrent claims of one id exactly one gets it.
        Ids and actors travel newline-joined and only the ids held by someone else come back
        (measured with 500 ids: a tenth of the client time of a SET NX + GET pipeline)."""
        if not claims:
            return []
        holders = [actor for _, actor in claims]
        others = self._claim(args=[ttl_s, "\n".join(a for a, _ in claims), "\n".join(holders)])
        for position, holder in zip(others[0::2], others[1::2], strict=True):
            holders[int(position) - 1] = _text(holder)
        return holders

    def mark_deleted(self, activity_ids: Sequence[str], ttl_s: int) -> None:
        """Set the deleted markers: from now on the scripts never write these activities back."""
        if not activity_ids:
            return
        pipe = self._redis.pipeline(transaction=False)
        for activity_id in activity_ids:
            pipe.set(keys.deleted(activity_id), 1, ex=ttl_s)
        pipe.execute()

    def remove(self, removals: Sequence[Removal]) -> tuple[int, int]:
        """Remove activities from users' timelines. Returns (removed, pushed)."""
        calls = _chunks(
            [self._hist],
            (([r.member, _id_json(r.activity_id)], r.users) for r in removals if r.users),
        )
        return self._run(self._remove, calls)

    def _run(
        self, script: redis.commands.core.Script, calls: list[list[str | int | bytes]]
    ) -> tuple[int, int]:
        if not calls:
            return 0, 0
        if len(calls) == 1:
            results = [script(args=calls[0])]
        else:
            pipe = self._redis.pipeline(transaction=False)
            for args in calls:
                script(args=args, client=pipe)
            results = pipe.execute()
        return sum(int(r[0]) for r in results), sum(int(r[1]) for r in results)

    def add_to_outboxes(self, items: Sequence[tuple[str, Insert]]) -> int:
        """Large accounts' (actor, activity): capped outbox + actor-channel announcement."""
        if not items:
            return 0
        args: list[str | int | bytes] = [self._max, self._ttl]
        for actor, item in items:
            args += [actor, item.member, keys.body(item.activity_id), item.body]
        return int(self._outbox_add(args=args))

    def remove_from_outbox(self, actor: str, member: str) -> int:
        return int(self._outbox_remove(args=[actor, member]))

    def delete_bodies(self, activity_ids: Iterable[str]) -> None:
        names = [keys.body(a) for a in activity_ids]
        if names:
            self._redis.delete(*names)

    def page(self, user: str, before: str | None, limit: int) -> TimelinePage:
        members = _decode_all(
            self._redis.zrevrangebylex(
                keys.timeline(user), f"({before}" if before else "+", "-", start=0, num=limit
            )
        )
        return TimelinePage(members, _bodies(members, self._redis.mget(_body_keys(members))))

    def size(self, user: str) -> int:
        return int(self._redis.zcard(keys.timeline(user)))


class AsyncRedisTimelines:
    """Asynchronous reader (the gateway's side)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._touch = client.register_script(_TOUCH)
        self._rebuild = client.register_script(_REBUILD)
        self._cache_bodies = client.register_script(_CACHE_BODIES)
        self._fanout = client.register_script(_FANOUT)
        self._remove = client.register_script(_REMOVE)

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
        bodies, calls = _fanout_calls(
            [Insert(member, member.partition(":")[2], body, users)],
            [timeline_max, stream_history, "0"],
        )
        for key, value in bodies:
            await self._redis.set(key, value, ex=body_ttl_s)
        results = [await self._fanout(args=args) for args in calls]
        return sum(int(r[0]) for r in results), sum(int(r[1]) for r in results)

    async def remove_for(
        self, users: Sequence[str], member: str, *, stream_history: int
    ) -> tuple[int, int]:
        calls = _chunks([stream_history], [([member, _id_json(member.partition(":")[2])], users)])
        results = [await self._remove(args=args) for args in calls]
        return sum(int(r[0]) for r in results), sum(int(r[1]) for r in results)

    async def page(self, user: str, before: str | None, limit: int) -> TimelinePage:
        members = _decode_all(
            await self._redis.zrevrangebylex(
                keys.timeline(user), f"({before}" if before else "+", "-", start=0, num=limit
            )
        )
        if not members:
            return TimelinePage([], {})
        return TimelinePage(members, _bodies(members, await self._redis.mget(_body_keys(members))))

    async def touch(self, user: str, active_ttl_s: int, token: str = "1") -> int:
        """Mark the user active. 0: hot (Redis is complete); 1: rebuild now — the caller holds
        the rebuild lease ``token`` and must call :meth:`rebuild` with it; 2: being rebuilt
        (read Cassandra)."""
        return int(await self._touch(args=[user, active_ttl_s, token]))

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
        args: list[str | int | bytes] = [user, token, timeline_max, body_ttl_s]
        for member in members:
            body = bodies.get(member.partition(":")[2])
            if body is not None:
                args += [member, body]
        return bool(await self._rebuild(args=args))

    async def big_state(self, user: str) -> tuple[bytes, int]:
        """(version of whom ``user`` follows, size of the big-accounts set): one round trip, and
        one more to install a version if ``user`` has none (``feed.versions.current``)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(keys.following_version(user))
        pipe.scard(keys.big_accounts)
        version, size = await pipe.execute()
        version = await versions.current_async(self._redis, keys.following_version(user), version)
        return version, int(size)

    async def big_accounts(self) -> list[str]:
        """The members of the big-accounts set, sentinel left out (``SSCAN``: each command
        returns about ``_SET_ARGS`` members)."""
        members = [m async for m in self._redis.sscan_iter(keys.big_accounts, count=_SET_ARGS)]
        return [_text(m) for m in dict.fromkeys(members) if m]  # SSCAN may repeat a member

    async def big_among(self, users: Sequence[str]) -> list[str]:
        """Which of ``users`` are big accounts: ``SMISMEMBER`` commands of at most ``_SET_ARGS``
        users each (one pipeline), so no single command grows with ``users``."""
        if not users:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for start in range(0, len(users), _SET_ARGS):
            pipe.smismember(keys.big_accounts, list(users[start : start + _SET_ARGS]))
        flags = [flag for chunk in await pipe.execute() for flag in chunk]
        return [u for u, flag in zip(users, flags, strict=True) if flag]

    async def outbox_pages(
        self, actors: Sequence[str], before: str | None, limit: int
    ) -> dict[str, list[str]]:
        """Each large account's newest order keys older than ``before`` (Redis part only)."""
        pipe = self._redis.pipeline(transaction=False)
        for actor in actors:
            pipe.zrevrangebylex(
                keys.outbox(actor), f"({before}" if before else "+", "-", start=0, num=limit
            )
        results = await pipe.execute()
        return {a: _decode_all(r) for a, r in zip(actors, results, strict=True)}

    async def bodies(self, members: list[str]) -> dict[str, bytes]:
        if not members:
            return {}
        return _bodies(members, await self._redis.mget(_body_keys(members)))

    async def cache_bodies(self, bodies: dict[str, bytes], ttl_s: int) -> int:
        """Cache bodies read from Cassandra, except those of activities deleted since the read
        (checked atomically). Returns how many were cached."""
        if not bodies:
            return 0
        args: list[str | int | bytes] = [ttl_s]
        for activity_id, body in bodies.items():
            args += [activity_id, body]
        return int(await self._cache_bodies(args=args))


@dataclass(frozen=True, slots=True)
class Presence:
    epoch: str
    seq: int


class AsyncRedisPresence:
    """Presence and delivery stream of connected users (the gateway's side)."""

    def __init__(self, client: aioredis.Redis, *, ttl_s: int) -> None:
        self._redis = client
        self._ttl = ttl_s
        self._attach = client.register_script(_ATTACH)

    async def attach(self, user: str) -> Presence:
        """Mark the user online (or keep them so) and return the stream's epoch and last seq."""
        epoch, seq = await self._attach(args=[user, _new_epoch(), self._ttl])
        return Presence(_text(epoch), int(seq))

    async def refresh(self, users: Iterable[str]) -> list[str]:
        """Extend presence of locally connected users (called periodically).

        Returns the users whose presence hash was gone (Redis lost it: restart, eviction): the
        caller re-attaches them (a new epoch) and tells their connections.
        """
        pipe = self._redis.pipeline(transaction=False)
        names: list[str] = []
        for user in users:
            pipe.expire(keys.presence(user), self._ttl)
            pipe.expire(keys.deliveries(user), self._ttl)
            names.append(user)
        if not names:
            return []
        results = await pipe.execute()
        return [user for user, kept in zip(names, results[0::2], strict=True) if not kept]

    async def frames_after(self, user: str, seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Frames with delivery seq > ``seq``, oldest first, at most ``limit``."""
        entries = await self._redis.xrange(
            keys.deliveries(user), min=f"({seq}-0", max="+", count=limit
        )
        # redis-py types stream entries loosely (``bytes | str | None``); this client decodes
        # nothing, so each is an (id, {b"f": frame}) pair of bytes.
        return [
            (int(_text(eid).split("-", 1)[0]), _raw(fields[b"f"]))
            for eid, fields in cast("list[tuple[bytes, dict[bytes, bytes]]]", entries or [])
        ]

    async def oldest_seq(self, user: str) -> int | None:
        entries = await self._redis.xrange(keys.deliveries(user), count=1)
        if not entries:
            return None
        return int(_text(cast("bytes", entries[0][0])).split("-", 1)[0])


def _new_epoch() -> str:
    return secrets.token_hex(4)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _raw(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _decode_all(values: Sequence[bytes | str]) -> list[str]:
    return [_text(v) for v in values]


def _body_keys(members: list[str]) -> list[str]:
    return [keys.body(m.partition(":")[2]) for m in members]


def _bodies(members: list[str], raw: Sequence[bytes | str | None]) -> dict[str, bytes]:
    return {m: _raw(b) for m, b in zip(members, raw, strict=True) if b is not None}
