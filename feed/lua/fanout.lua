-- Fan-out: insert activities into users' timelines, trim, and deliver to the online ones.
-- Run by feed.timelines_redis (RedisTimelines.insert, AsyncRedisTimelines.insert_for).
--
-- KEYS (built by feed.keys; one key per user, feed.keys.fanout_user_key), in one of three modes
-- (ARGV 13+2n, or ARGV 1 for 'u'):
--   'k' (keyed, one Redis): KEYS[2j-1], KEYS[2j] the deleted marker and body of activity j
--       (j = 1..n), then KEYS[2n+k] user k's timeline (k = 1..). A deleted activity is skipped.
--   'b' (bodies, Redis Cluster): KEYS[4k-3..4k] user k's timeline, presence, active marker and
--       delivery stream (feed.keys.fanout_cluster_keys), every user in one slot; the bodies
--       of activities 1..n follow in ARGV. The caller checks the deleted markers (before and
--       after: feed.timelines_redis.RedisTimelines.insert).
--   'u' (offline, Redis Cluster): inserts only, for users none of whom is online; its own short
--       layout (below). If a user is online, returns {-1, 0} before writing anything: the caller
--       sends the call again in mode 'b'. Offline users need no body nor frame, and most calls
--       have no one online. Every argument costs Redis per call (parsed, then copied into Lua:
--       about 1,300 instructions each, counted with callgrind), and a cluster sends each
--       activity once per slot of its users, not once per batch. So this layout has no frame
--       parts, prefixes, tails nor delivery stream, and its members travel in one MessagePack
--       argument that Redis's bundled cmsgpack decodes in C: one argument per member cost the
--       cluster a fifth more Redis instructions per insert than this (docs/benchmarks.md, "Redis
--       Cluster").
--       KEYS[3k-2..3k] user k's timeline, presence and active marker; ARGV 1 'u', 2 max,
--       3 only_active, 4 MessagePack: per user k, the list of its members in delivery order.
-- In modes 'k' and 'b', a user's presence, active marker, delivery stream and channel are named
-- from the hash tag of their timeline key and the prefixes in ARGV 8..12
-- (feed.keys.FANOUT_USER_PREFIXES): the same tag, so the same slot as the timeline. On one Redis
-- one key per user is declared, not four: every argument costs the client and the server per
-- user, and declaring four cost the worker a quarter of its fan-out rate (docs/benchmarks.md).
-- On a cluster every key a call touches is declared (mode 'b' all four; mode 'u' three, read
-- from KEYS): a resharding moves keys one by one, and only declared keys make the node send the
-- call where the user's keys are (ASK, TRYAGAIN) instead of reading moved ones as missing.
-- ARGV of modes 'k' and 'b':
--   1 max (timeline cap), 2 hist (stream length), 3 only_active ('1'/'0'), 4 n,
--   5..7 the activity frame's head, middle and tail (schemas.frames.ACTIVITY_*),
--   8..12 the prefixes of the timeline, presence, active marker, delivery stream and channel,
--   13..12+n the order keys (members) of activities 1..n,
--   13+n..12+2n their frames' tails (schemas.frames.activity_tail: the tail with the activity's
--   'traceparent' and 'ts'), or '' for the plain tail of ARGV 7,
--   13+2n the mode ('k' or 'b'; 'u' has its own layout, above), in mode 'b' then
--   14+2n..13+3n the bodies,
--   then per user k one value: the indexes of its activities (1-based, in the order the user
--   must receive them), separated by spaces.
--
-- Frames are published with PUBLISH in mode 'k', with SPUBLISH (sharded Pub/Sub) on a cluster.
-- Grouped by user: each user's new members are added with one ZADD (per 1000), trimmed once and
-- delivered in call order (one HINCRBY for all their seqs); a member the trim removed at once is
-- not delivered. Bodies are SET by the caller just before (same connection, so before this
-- script runs) and read back only for online users' frames. Returns {inserted, pushed}.

-- Adds `mine` (order keys) to timeline `tl`, at most 1000 per command (Lua's unpack limit),
-- then trims it to `max`. With `online`, returns the members that were not in the timeline before
-- and are still there after the trim, once each: the new items to deliver. A member the cap
-- trimmed straight away (older than the newest `max`) is not a new item of the hot timeline: not
-- pushed, so a replay of it cannot be pushed again.
local function insert(tl, mine, max, online)
  local added = 0
  local fresh = {}
  local taken = {}
  for first = 1, #mine, 1000 do
    local last = math.min(#mine, first + 999)
    if online then
      local scores = redis.call('ZMSCORE', tl, unpack(mine, first, last))
      for m = first, last do
        if not scores[m - first + 1] and not taken[mine[m]] then
          taken[mine[m]] = true
          fresh[#fresh + 1] = mine[m]
        end
      end
    end
    local args = {}
    for m = first, last do
      args[#args + 1] = 0
      args[#args + 1] = mine[m]
    end
    added = added + redis.call('ZADD', tl, unpack(args))
  end
  if added > 0 then
    local trimmed = redis.call('ZREMRANGEBYRANK', tl, 0, -(max + 1))
    if trimmed > 0 and #fresh > 0 then
      local kept = {}
      for first = 1, #fresh, 1000 do
        local last = math.min(#fresh, first + 999)
        local scores = redis.call('ZMSCORE', tl, unpack(fresh, first, last))
        for m = first, last do
          if scores[m - first + 1] then kept[#kept + 1] = fresh[m] end
        end
      end
      fresh = kept
    end
  end
  return added, fresh
end

if ARGV[1] == 'u' then
  local max = tonumber(ARGV[2])
  local only_active = ARGV[3] == '1'
  local lists = cmsgpack.unpack(ARGV[4])
  for u = 1, #lists do
    if redis.call('HEXISTS', KEYS[3 * u - 1], 'e') == 1 then return {-1, 0} end
  end
  local inserted = 0
  for u = 1, #lists do
    -- inactive (and offline): Cassandra only, as below
    if not only_active or redis.call('EXISTS', KEYS[3 * u]) == 1 then
      inserted = inserted + insert(KEYS[3 * u - 2], lists[u], max, false)
    end
  end
  return {inserted, 0}
end

local max = tonumber(ARGV[1])
local hist = ARGV[2]
local only_active = ARGV[3] == '1'
local n = tonumber(ARGV[4])
local head, middle, tail = ARGV[5], ARGV[6], ARGV[7]
local tl_prefix_len = #ARGV[8]
local on_prefix, seen_prefix, dl_prefix, channel_prefix = ARGV[9], ARGV[10], ARGV[11], ARGV[12]
local mode = ARGV[13 + 2 * n]
-- one Redis: classic Pub/Sub; a cluster: sharded (the channel is in the user's slot)
local publish = mode == 'k' and 'PUBLISH' or 'SPUBLISH'
local members = {}
local body_key = {}
local tail_of = {}
local bodies = {}
for j = 1, n do
  local member = ARGV[12 + j]
  if mode == 'k' and redis.call('EXISTS', KEYS[2 * j - 1]) == 1 then
    -- deleted since the caller read it: never written back (nor its body)
    redis.call('DEL', KEYS[2 * j])
    members[j] = false
  else
    members[j] = member
    if mode == 'k' then
      body_key[member] = KEYS[2 * j]
    elseif mode == 'b' then
      bodies[member] = ARGV[13 + 2 * n + j]
    end
    local own = ARGV[12 + n + j]
    tail_of[member] = own ~= '' and own or tail
  end
end
local first_user = mode == 'b' and 14 + 3 * n or 14 + 2 * n
-- user k's timeline is KEYS[k * stride + base]
local stride = mode == 'k' and 1 or 4
local base = mode == 'k' and 2 * n or -3
local inserted, pushed = 0, 0
local k = 0
for i = first_user, #ARGV do
  k = k + 1
  local tl = KEYS[k * stride + base]
  local tag = string.sub(tl, tl_prefix_len + 1)
  local on = on_prefix .. tag
  local ep = redis.call('HGET', on, 'e')
  -- inactive and offline: Cassandra only; the timeline is rebuilt on the next read or connect
  -- (an online user is always written and pushed to, even if Redis lost their active marker)
  if ep or not only_active or redis.call('EXISTS', seen_prefix .. tag) == 1 then
    local mine = {}
    for j in string.gmatch(ARGV[i], '%d+') do
      local member = members[tonumber(j)]
      if member then mine[#mine + 1] = member end
    end
    local added, fresh = insert(tl, mine, max, ep)
    inserted = inserted + added
    if #fresh > 0 then
      local seq = redis.call('HINCRBY', on, 's', #fresh) - #fresh
      local dl = dl_prefix .. tag
      local channel = channel_prefix .. tag
      for _, member in ipairs(fresh) do
        local body = bodies[member]
        if not body then
          body = redis.call('GET', body_key[member]) or 'null'
          bodies[member] = body
        end
        seq = seq + 1
        -- the cursor is the stream cursor <epoch>.<seq> (feed.cursor.StreamCursor)
        local frame = head .. ep .. '.' .. seq .. middle .. body .. tail_of[member]
        redis.call('XADD', dl, 'MAXLEN', '~', hist, seq .. '-0', 'f', frame)
        redis.call(publish, channel, frame)
        pushed = pushed + 1
      end
    end
  end
end
return {inserted, pushed}
