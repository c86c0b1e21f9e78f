-- Fan-out: insert activities into users' timelines, trim, and deliver to the online ones.
-- Run by feed.timelines_redis (RedisTimelines.insert, AsyncRedisTimelines.insert_for).
--
-- KEYS (built by feed.keys; n activities, then per user four keys, feed.keys.fanout_user_keys):
--   KEYS[2j-1], KEYS[2j]    deleted marker and body of activity j (j = 1..n)
--   KEYS[2n+4k+1 .. +4]     user k's presence, active marker, timeline, delivery stream (k = 0..)
-- ARGV:
--   1 max (timeline cap), 2 hist (stream length), 3 only_active ('1'/'0'), 4 n,
--   5..7 the activity frame's head, middle and tail (schemas.frames.ACTIVITY_*),
--   8..7+n the order keys (members) of activities 1..n,
--   then per user k one value: the indexes of its activities (1-based, in the order the user
--   must receive them), each followed by a space, then its channel (feed.keys.channel; no
--   whitespace, as no id has any). One value, not two: every argument costs the client and the
--   server a little, per user, and the channel is read only for an online user.
--
-- Grouped by user: each user's new members are added with one ZADD (per 1000), trimmed once and
-- delivered in call order (one HINCRBY for all their seqs); a member the trim removed at once is
-- not delivered. Bodies are SET by the caller just before (same connection, so before this
-- script runs) and read back only for online users' frames. Returns {inserted, pushed}.
local max = tonumber(ARGV[1])
local hist = ARGV[2]
local only_active = ARGV[3] == '1'
local n = tonumber(ARGV[4])
local head, middle, tail = ARGV[5], ARGV[6], ARGV[7]
local members = {}
local body_key = {}
for j = 1, n do
  local member = ARGV[7 + j]
  if redis.call('EXISTS', KEYS[2 * j - 1]) == 1 then
    -- deleted since the caller read it: never written back (nor its body)
    redis.call('DEL', KEYS[2 * j])
    members[j] = false
  else
    members[j] = member
    body_key[member] = KEYS[2 * j]
  end
end
local bodies = {}
local inserted, pushed = 0, 0
local k = 2 * n
for i = 8 + n, #ARGV do
  local on, seen, tl, dl = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  k = k + 4
  local ep = redis.call('HGET', on, 'e')
  -- inactive and offline: Cassandra only; the timeline is rebuilt on the next read or connect
  -- (an online user is always written and pushed to, even if Redis lost their active marker)
  if ep or not only_active or redis.call('EXISTS', seen) == 1 then
    local mine = {}
    for j in string.gmatch(ARGV[i], '(%d+) ') do
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
      inserted = inserted + added
      local trimmed = redis.call('ZREMRANGEBYRANK', tl, 0, -(max + 1))
      if trimmed > 0 and #fresh > 0 then
        -- A member the cap trimmed straight away (older than the newest 'max') is not a new
        -- item of the hot timeline: not pushed, so a replay of it cannot be pushed again.
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
    if #fresh > 0 then
      local seq = redis.call('HINCRBY', on, 's', #fresh) - #fresh
      local channel = string.match(ARGV[i], '(%S+)$')
      for _, member in ipairs(fresh) do
        local body = bodies[member]
        if not body then
          body = redis.call('GET', body_key[member]) or 'null'
          bodies[member] = body
        end
        seq = seq + 1
        -- the cursor is the stream cursor <epoch>.<seq> (feed.cursor.StreamCursor)
        local frame = head .. ep .. '.' .. seq .. middle .. body .. tail
        redis.call('XADD', dl, 'MAXLEN', '~', hist, seq .. '-0', 'f', frame)
        redis.call('PUBLISH', channel, frame)
        pushed = pushed + 1
      end
    end
  end
end
return {inserted, pushed}
