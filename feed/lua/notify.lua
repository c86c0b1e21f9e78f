-- Notification feeds: one user's groups, their items and actors, seen/read, in one atomic step.
-- Run by feed.notify_redis (the worker's NotifyRedis.apply, the gateway's AsyncNotifyRedis).
-- The rules are those of feed.notify (the pure-Python reference, NotifyBook): keep them equal.
--
-- KEYS (feed.keys.notify_keys, all of one user, one slot):
--   1 data     hash: 'i'US<aid> -> gid US actor US ts; 'g'US<gid> -> gkey US opened US position
--              US type US object; 'o'US<gkey> -> the open group; 'c'US<gid>US<actor> -> newest
--              ts US items; 'l' -> loaded marker; 'v' -> last write version (µs)
--   2 groups   sorted set (lex, scores 0): position = order key <last ts 16 digits>:<gid>
--   3 items    sorted set (lex): <gid> US <ts 16> US <aid> US <actor>
--   4 actors   sorted set (lex): <gid> US <10^16-1-ts, 16 digits> US <actor> (newest first)
--   5 unseen   set of gids;  6 unread  set of gids;  7 presence hash (field 'e': online)
-- ARGV: 1 command, 2 ttl_s (0: no expiry), 3 the user's channel, then per command (below).
--
-- Every command but 'load' answers {'L'} and changes nothing when the user's state is not in
-- Redis (no 'l' marker): the caller loads it from Cassandra ('load') and asks again.
-- Writes answer the mutations the caller applies to Cassandra, each with a write version (µs,
-- from this Redis's clock, increasing per user): the durable copy converges to this one
-- whatever order the callers' Cassandra writes land in.
--   G gid gkey type object opened open seen read v | I gid aid actor ts v | X gid aid v |
--   D gid v | C gid v (closed: no longer the open group of its key) | S gid seen read v
local KD, KG, KI, KA, KS, KR, KP = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local US = '\31'
local cmd, ttl, channel = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local MAXTS = 9999999999999999

local function pad(n) return string.format('%016d', n) end
local function lo(gid) return '[' .. gid .. US end
local function hi(gid) return '(' .. gid .. ' ' end  -- ' ' is the byte after US
local function split(s, n)
  -- the first n-1 fields separated by US, then the rest (which may hold US: an object)
  local out, start = {}, 1
  for _ = 1, n - 1 do
    local at = string.find(s, US, start, true)
    out[#out + 1] = string.sub(s, start, at - 1)
    start = at + 1
  end
  out[#out + 1] = string.sub(s, start)
  return out
end

local function touch()
  if ttl > 0 then
    for _, k in ipairs({KD, KG, KI, KA, KS, KR}) do redis.call('EXPIRE', k, ttl) end
  end
end

local version
local function next_version()
  if not version then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    local last = tonumber(redis.call('HGET', KD, 'v') or '0')
    version = math.max(now, last + 1)
  else
    version = version + 1
  end
  return string.format('%d', version)
end

local function iso(us)
  local s = math.floor(us / 1000000)
  local frac = us - s * 1000000
  local days = math.floor(s / 86400)
  local rem = s - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  local out = string.format('%04d-%02d-%02dT%02d:%02d:%02d', y, m, d, math.floor(rem / 3600),
    math.floor(rem % 3600 / 60), rem % 60)
  if frac > 0 then out = out .. string.format('.%06d', frac) end
  return out .. 'Z'
end

local function header(gid)
  local h = redis.call('HGET', KD, 'g' .. US .. gid)
  if not h then return nil end
  local f = split(h, 5)
  return {gkey = f[1], opened = tonumber(f[2]), position = f[3], type = f[4], object = f[5]}
end

local function put_header(gid, h)
  redis.call('HSET', KD, 'g' .. US .. gid,
    h.gkey .. US .. string.format('%d', h.opened) .. US .. h.position .. US .. h.type .. US
    .. h.object)
end

local function item_ts(member)  -- <gid> US <ts> US <aid> US <actor>
  local f = split(member, 4)
  return tonumber(f[2]), f[3], f[4]
end

-- The group as the API shows it (schemas.notifications.Group), JSON.
local function view(gid)
  local h = header(gid)
  local first = redis.call('ZRANGEBYLEX', KI, lo(gid), hi(gid), 'LIMIT', 0, 1)[1]
  local last = redis.call('ZREVRANGEBYLEX', KI, hi(gid), lo(gid), 'LIMIT', 0, 1)[1]
  local count = redis.call('ZLEXCOUNT', KI, lo(gid), hi(gid))
  local top = redis.call('ZRANGEBYLEX', KA, lo(gid), hi(gid), 'LIMIT', 0, 10)
  local names = {}
  for i, member in ipairs(top) do names[i] = cjson.encode(split(member, 3)[3]) end
  local actors = redis.call('ZLEXCOUNT', KA, lo(gid), hi(gid))
  local seen = redis.call('SISMEMBER', KS, gid) == 0
  local read = redis.call('SISMEMBER', KR, gid) == 0
  return '{"id":' .. cjson.encode(gid) .. ',"type":' .. cjson.encode(h.type)
    .. ',"object":' .. cjson.encode(h.object) .. ',"actors":[' .. table.concat(names, ',')
    .. '],"actor_count":' .. actors .. ',"activity_count":' .. count
    .. ',"first":"' .. iso(item_ts(first)) .. '","last":"' .. iso(item_ts(last))
    .. '","seen":' .. tostring(seen) .. ',"read":' .. tostring(read) .. '}'
end

local function counts()
  return redis.call('SCARD', KS), redis.call('SCARD', KR)
end

local function online() return redis.call('HEXISTS', KP, 'e') == 1 end

if redis.call('HEXISTS', KD, 'l') == 0 then
  if cmd ~= 'load' then return {'L'} end
  -- ARGV 4 n groups, then 8 per group: gid gkey type object opened open seen read,
  -- then 4 per item: gid aid actor ts (each group's items, any order)
  for _, k in ipairs({KD, KG, KI, KA, KS, KR}) do redis.call('DEL', k) end
  local n = tonumber(ARGV[4])
  local groups = {}
  for j = 0, n - 1 do
    local b = 5 + 8 * j
    local gid = ARGV[b]
    groups[gid] = {gkey = ARGV[b + 1], type = ARGV[b + 2], object = ARGV[b + 3],
      opened = tonumber(ARGV[b + 4]), open = ARGV[b + 5] == '1', seen = ARGV[b + 6] == '1',
      read = ARGV[b + 7] == '1', last = -1}
  end
  local actor_ts = {}
  for b = 5 + 8 * n, #ARGV, 4 do
    local gid, aid, actor, ts = ARGV[b], ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 3])
    local g = groups[gid]
    if g then
      redis.call('HSET', KD, 'i' .. US .. aid, gid .. US .. actor .. US .. pad(ts))
      redis.call('ZADD', KI, 0, gid .. US .. pad(ts) .. US .. aid .. US .. actor)
      if ts > g.last then g.last = ts end
      local key = gid .. US .. actor
      local a = actor_ts[key]
      if not a then actor_ts[key] = {ts, 1} else
        a[2] = a[2] + 1
        if ts > a[1] then a[1] = ts end
      end
    end
  end
  for key, a in pairs(actor_ts) do
    local f = split(key, 2)
    redis.call('HSET', KD, 'c' .. US .. key, pad(a[1]) .. US .. a[2])
    redis.call('ZADD', KA, 0, f[1] .. US .. pad(MAXTS - a[1]) .. US .. f[2])
  end
  for gid, g in pairs(groups) do
    if g.last >= 0 then  -- a group row without items is the rest of a drop: left out
      g.position = pad(g.last) .. ':' .. gid
      put_header(gid, g)
      redis.call('ZADD', KG, 0, g.position)
      if g.open then redis.call('HSET', KD, 'o' .. US .. g.gkey, gid) end
      if not g.seen then redis.call('SADD', KS, gid) end
      if not g.read then redis.call('SADD', KR, gid) end
    end
  end
  redis.call('HSET', KD, 'l', '1')
  next_version()
  redis.call('HSET', KD, 'v', string.format('%d', version))
  touch()
  return 1
end

if cmd == 'load' then
  touch()
  return 0
end

local out = {}
local function emit(...)
  for _, v in ipairs({...}) do out[#out + 1] = v end
end

-- Remove every trace of a group (its items, actors, header, open pointer, flags).
local function drop(gid)
  local h = header(gid)
  for _, member in ipairs(redis.call('ZRANGEBYLEX', KI, lo(gid), hi(gid))) do
    local _, aid = item_ts(member)
    redis.call('HDEL', KD, 'i' .. US .. aid)
  end
  redis.call('ZREMRANGEBYLEX', KI, lo(gid), hi(gid))
  for _, member in ipairs(redis.call('ZRANGEBYLEX', KA, lo(gid), hi(gid))) do
    redis.call('HDEL', KD, 'c' .. US .. gid .. US .. split(member, 3)[3])
  end
  redis.call('ZREMRANGEBYLEX', KA, lo(gid), hi(gid))
  redis.call('HDEL', KD, 'g' .. US .. gid)
  if redis.call('HGET', KD, 'o' .. US .. h.gkey) == gid then
    redis.call('HDEL', KD, 'o' .. US .. h.gkey)
  end
  redis.call('ZREM', KG, h.position)
  redis.call('SREM', KS, gid)
  redis.call('SREM', KR, gid)
  emit('D', gid, next_version())
end

local function reposition(gid, h)
  local last = redis.call('ZREVRANGEBYLEX', KI, hi(gid), lo(gid), 'LIMIT', 0, 1)[1]
  local position = pad(item_ts(last)) .. ':' .. gid
  if position ~= h.position then
    redis.call('ZREM', KG, h.position)
    h.position = position
    redis.call('ZADD', KG, 0, position)
    put_header(gid, h)
  end
end

local function emit_group(gid, h)
  emit('G', gid, h.gkey, h.type, h.object, string.format('%d', h.opened),
    redis.call('HGET', KD, 'o' .. US .. h.gkey) == gid and '1' or '0',
    redis.call('SISMEMBER', KS, gid) == 0 and '1' or '0',
    redis.call('SISMEMBER', KR, gid) == 0 and '1' or '0', next_version())
end

if cmd == 'apply' then
  -- ARGV 4 window (µs), 5 most items per group, 6 most groups, then 7 per operation:
  -- 'a' aid actor ts gkey type object (notify) | 'd' aid '' '' '' '' '' (the activity is gone)
  local window, group_max, max_groups = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local changed, order, existed = {}, {}, {}
  local function mark_changed(gid)
    if not changed[gid] then
      changed[gid] = true
      order[#order + 1] = gid
    end
  end
  for b = 7, #ARGV, 7 do
    local kind, aid = ARGV[b], ARGV[b + 1]
    local item = redis.call('HGET', KD, 'i' .. US .. aid)
    if kind == 'a' and item then
      -- a replay: nothing changes; the durable copy of its group is written again
      local f = split(item, 3)
      emit_group(f[1], header(f[1]))
      emit('I', f[1], aid, f[2], string.format('%d', tonumber(f[3])), next_version())
    elseif kind == 'a' then
      local actor, ts, gkey = ARGV[b + 2], tonumber(ARGV[b + 3]), ARGV[b + 4]
      local gid = redis.call('HGET', KD, 'o' .. US .. gkey)
      local h = gid and header(gid)
      if not (h and ts - h.opened < window
          and redis.call('ZLEXCOUNT', KI, lo(gid), hi(gid)) < group_max) then
        if gid then emit('C', gid, next_version()) end
        local base = gkey .. '-' .. string.format('%d', ts)
        gid = base
        local suffix = 1
        while redis.call('HEXISTS', KD, 'g' .. US .. gid) == 1 do
          suffix = suffix + 1
          gid = base .. '-' .. suffix
        end
        h = {gkey = gkey, opened = ts, position = pad(ts) .. ':' .. gid, type = ARGV[b + 5],
          object = ARGV[b + 6]}
        put_header(gid, h)
        redis.call('ZADD', KG, 0, h.position)
        redis.call('HSET', KD, 'o' .. US .. gkey, gid)
        if existed[gid] == nil then existed[gid] = false end
      elseif existed[gid] == nil then
        existed[gid] = true
      end
      redis.call('HSET', KD, 'i' .. US .. aid, gid .. US .. actor .. US .. pad(ts))
      redis.call('ZADD', KI, 0, gid .. US .. pad(ts) .. US .. aid .. US .. actor)
      local ckey = 'c' .. US .. gid .. US .. actor
      local c = redis.call('HGET', KD, ckey)
      if not c then
        redis.call('HSET', KD, ckey, pad(ts) .. US .. '1')
        redis.call('ZADD', KA, 0, gid .. US .. pad(MAXTS - ts) .. US .. actor)
      else
        local f = split(c, 2)
        local newest = tonumber(f[1])
        if ts > newest then
          redis.call('ZREM', KA, gid .. US .. pad(MAXTS - newest) .. US .. actor)
          redis.call('ZADD', KA, 0, gid .. US .. pad(MAXTS - ts) .. US .. actor)
          newest = ts
        end
        redis.call('HSET', KD, ckey, pad(newest) .. US .. (tonumber(f[2]) + 1))
      end
      reposition(gid, h)
      redis.call('SADD', KS, gid)
      redis.call('SADD', KR, gid)
      emit('I', gid, aid, actor, string.format('%d', ts), next_version())
      mark_changed(gid)
    elseif item then  -- 'd'
      local f = split(item, 3)
      local gid, actor, ts = f[1], f[2], tonumber(f[3])
      if existed[gid] == nil then existed[gid] = true end
      redis.call('HDEL', KD, 'i' .. US .. aid)
      redis.call('ZREM', KI, gid .. US .. pad(ts) .. US .. aid .. US .. actor)
      emit('X', gid, aid, next_version())
      if redis.call('ZLEXCOUNT', KI, lo(gid), hi(gid)) == 0 then
        drop(gid)
      else
        local ckey = 'c' .. US .. gid .. US .. actor
        local c = split(redis.call('HGET', KD, ckey), 2)
        local newest, left = tonumber(c[1]), tonumber(c[2]) - 1
        redis.call('ZREM', KA, gid .. US .. pad(MAXTS - newest) .. US .. actor)
        if left == 0 then
          redis.call('HDEL', KD, ckey)
        else
          if ts == newest then  -- their newest item went: find the next one
            newest = -1
            for _, member in ipairs(redis.call('ZRANGEBYLEX', KI, lo(gid), hi(gid))) do
              local its, _, who = item_ts(member)
              if who == actor and its > newest then newest = its end
            end
          end
          redis.call('ZADD', KA, 0, gid .. US .. pad(MAXTS - newest) .. US .. actor)
          redis.call('HSET', KD, ckey, pad(newest) .. US .. left)
        end
        reposition(gid, header(gid))
      end
      mark_changed(gid)
    end
  end
  while redis.call('ZCARD', KG) > max_groups do
    local oldest = redis.call('ZRANGE', KG, 0, 0)[1]
    local gid = string.sub(oldest, 18)
    if existed[gid] == nil then existed[gid] = true end
    mark_changed(gid)
    drop(gid)
  end
  local live = online()
  local frames = {}
  for _, gid in ipairs(order) do
    local h = header(gid)
    if h then
      emit_group(gid, h)
      if live then frames[#frames + 1] = {true, gid} end
    elseif existed[gid] and live then
      frames[#frames + 1] = {false, gid}
    end
  end
  if #frames > 0 then
    local unseen, unread = counts()
    local tail = ',"unseen":' .. unseen .. ',"unread":' .. unread .. '}'
    for _, f in ipairs(frames) do
      if f[1] then
        redis.call('PUBLISH', channel, '{"type":"notification","group":' .. view(f[2]) .. tail)
      else
        redis.call('PUBLISH', channel,
          '{"type":"notification_removed","group":' .. cjson.encode(f[2]) .. tail)
      end
    end
  end
  if version then redis.call('HSET', KD, 'v', string.format('%d', version)) end
  touch()
  return out
end

if cmd == 'counts' then
  touch()
  local unseen, unread = counts()
  return {'C', unseen, unread}
end

if cmd == 'page' then
  -- ARGV 4 before (a position; '' for the newest), 5 limit
  local before = ARGV[4] ~= '' and '(' .. ARGV[4] or '+'
  local limit = tonumber(ARGV[5])
  local positions = redis.call('ZREVRANGEBYLEX', KG, before, '-', 'LIMIT', 0, limit + 1)
  local unseen, unread = counts()
  local nxt = ''
  if #positions > limit then
    positions[#positions] = nil
    nxt = positions[#positions]
  end
  out = {'P', unseen, unread, nxt}
  for _, position in ipairs(positions) do out[#out + 1] = view(string.sub(position, 18)) end
  touch()
  return out
end

if cmd == 'actors' then
  -- ARGV 4 gid, 5 after ('' or <10^16-1-ts> US <actor>, as a page's next), 6 limit
  local gid, after, limit = ARGV[4], ARGV[5], tonumber(ARGV[6])
  touch()
  if redis.call('HEXISTS', KD, 'g' .. US .. gid) == 0 then return {'N'} end
  local start = after ~= '' and '(' .. gid .. US .. after or lo(gid)
  local members = redis.call('ZRANGEBYLEX', KA, start, hi(gid), 'LIMIT', 0, limit + 1)
  local nxt = ''
  if #members > limit then
    members[#members] = nil
    nxt = string.sub(members[#members], #gid + 2)
  end
  out = {'A', nxt}
  for _, member in ipairs(members) do out[#out + 1] = split(member, 3)[3] end
  return out
end

if cmd == 'mark' then
  -- ARGV 4 'seen' | 'read', 5 'all' | 'groups' | 'through', then the gids, or one position:
  -- every group at or above it (newer or equal) is marked
  local read, mode = ARGV[4] == 'read', ARGV[5]
  local gids = {}
  if mode == 'all' then
    gids = redis.call('SMEMBERS', KS)
    if read then
      local more = redis.call('SDIFF', KR, KS)
      for _, gid in ipairs(more) do gids[#gids + 1] = gid end
    end
  elseif mode == 'through' then
    for _, position in ipairs(redis.call('ZRANGEBYLEX', KG, '[' .. ARGV[6], '+')) do
      gids[#gids + 1] = string.sub(position, 18)
    end
  else
    for b = 6, #ARGV do gids[#gids + 1] = ARGV[b] end
  end
  out = {'M', 0, 0}
  for _, gid in ipairs(gids) do
    local was = redis.call('SREM', KS, gid) + (read and redis.call('SREM', KR, gid) or 0)
    if was > 0 then
      emit('S', gid, '1', redis.call('SISMEMBER', KR, gid) == 0 and '1' or '0', next_version())
    end
  end
  if version then redis.call('HSET', KD, 'v', string.format('%d', version)) end
  out[2], out[3] = counts()
  if online() then
    redis.call('PUBLISH', channel, '{"type":"notification_counts","unseen":' .. out[2]
      .. ',"unread":' .. out[3] .. '}')
  end
  touch()
  return out
end

return redis.error_reply('unknown command ' .. tostring(cmd))
