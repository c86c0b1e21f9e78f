-- Notification feeds: users' groups, their items and actors, seen/read and the counts.
-- Run by feed.notify_redis (the worker's NotifyRedis.apply, the gateway's AsyncNotifyRedis).
-- The rules are those of feed.notify (the pure-Python reference, NotifyBook): keep them equal;
-- tests/integration/feed/test_notify_redis.py checks this script against it step by step.
--
-- KEYS, 5 per user (feed.keys.notify_keys; one user's keys share a slot): data, groups, items,
-- pending, presence.
--   data     hash: 'i'US<aid> -> gid US actor US ts16 (the user's items);
--            'g'US<gid> -> the group's header: gkey US opened US first16 US last16 US items
--              US actors US seen(0/1) read(0/1) US type US object;
--            'o'US<gkey> -> the key's open group; 'c'US<gid>US<actor> -> the actor's items in it;
--            'us', 'ur' -> the unseen and unread counts; 'l' -> loaded; 'v' -> last version;
--            't' -> when the TTL was last renewed (s)
--   groups   sorted set: gid, scored by its last activity's time (µs; exact in a double), so
--            a new activity moves its group with one ZADD; ties ordered by gid. A group's
--            position (cursors) is <last ts16>:<gid>
--   pending  list: the mutations not yet confirmed written to Cassandra (see below)
--   items    sorted set (lex): <gid> US <ts16> US <aid> US <actor>. A group's actors, newest
--            first, are the first occurrences of each actor in its items read newest first:
--            ordered by each actor's newest (ts, aid). No set of actors is kept: a group's
--            actor count is kept in its header, each actor's item count in 'c' (both exact).
--   presence hash (field 'e' while the user is online)
-- The two sorted sets hold a sentinel member '' (score -1) from the load on, so they never
-- vanish when emptied: a user's keys live and expire together (one TTL, renewed at most once
-- per refresh period: ARGV 2 ttl_s, 0 for none; ARGV 3 the refresh period).
-- ARGV: 1 command ('s:<command>' on a Redis Cluster: see below), 2 ttl_s, 3 refresh_s, then per
-- command (below).
--
-- A user whose keys are gone (no 'l') is answered 'L' and left unchanged: the caller loads the
-- user's rows from Cassandra ('load') and asks again. Writes answer the mutations the caller
-- writes to Cassandra, one string each, fields joined by US, with a version (µs from this
-- Redis's clock, increasing per user) second:
--   G v gid gkey type opened open seen read object | I v gid aid actor ts | X v gid aid |
--   D v gid | C v gid (no longer its key's open group) | S v gid seen read
-- When the caller keeps them (a durable store is configured), they also go to the user's
-- pending list, and every write answers the whole list, not only its own: a Cassandra write
-- that failed is made again by the next call (a retry changes nothing in Redis, but still
-- answers what is pending). The caller drops what it wrote with 'confirm' (many users at once:
-- below).
local US = '\31'
local cmd, ttl, refresh = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
-- 's:<command>' on a Redis Cluster: frames go out by sharded Pub/Sub (the user's channel is in
-- the user's slot); else by classic PUBLISH
local publish = 'PUBLISH'
if string.sub(cmd, 1, 2) == 's:' then
  cmd, publish = string.sub(cmd, 3), 'SPUBLISH'
end

if cmd == 'confirm' then
  -- The callers wrote the pending mutations up to a version to Cassandra: drop them. KEYS: the
  -- users' pending lists; ARGV 4..: a version per list. The lists are in version order (each
  -- write appends its own, with versions above the list's). Runs before the definitions below:
  -- one call per batch, not per user.
  local dropped = 0
  for k = 1, #KEYS do
    local upto = tonumber(ARGV[3 + k])
    local entries = redis.call('LRANGE', KEYS[k], 0, -1)
    local n = 0
    for _, entry in ipairs(entries) do
      local from = string.find(entry, '\31', 1, true) + 1
      local to = string.find(entry, '\31', from, true)
      if tonumber(string.sub(entry, from, to and to - 1 or #entry)) > upto then break end
      n = n + 1
    end
    if n == #entries then
      redis.call('DEL', KEYS[k])
    elseif n > 0 then
      redis.call('LTRIM', KEYS[k], n, -1)
    end
    dropped = dropped + n
  end
  return dropped
end

if cmd == 'counts' then
  -- the badge's read, first: it needs none of the definitions below (measured: their set-up
  -- was most of a count's cost)
  local state = redis.call('HMGET', KEYS[1], 'l', 'us', 'ur', 't')
  if not state[1] then return {'L'} end
  if ttl > 0 then
    local now = tonumber(redis.call('TIME')[1])
    if now - tonumber(state[4] or '0') >= refresh then
      redis.call('HSET', KEYS[1], 't', now)
      for k = 1, 3 do redis.call('EXPIRE', KEYS[k], ttl) end
    end
  end
  return {'C', tonumber(state[2] or '0'), tonumber(state[3] or '0')}
end

local function pad(n) return string.format('%016d', n) end
-- a < b byte by byte, as sorted sets order members (Lua's own < on strings is strcoll, which
-- follows the locale Redis was started with)
local function before(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local function int(n) return string.format('%d', n) end
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

local now_us
local function clock()
  if not now_us then
    local t = redis.call('TIME')
    now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return now_us
end

-- One user's state for the length of a command: their keys, and the headers read or changed.
local U = {}
U.__index = U

local function user(base, channel)
  local me = setmetatable({}, U)
  me.KD, me.KG, me.KI, me.KN, me.KP = KEYS[base], KEYS[base + 1], KEYS[base + 2],
    KEYS[base + 3], KEYS[base + 4]
  me.channel = channel
  me.headers = {}
  me.out = {}
  me.fresh = {}
  return me
end

function U:open()
  local state = redis.call('HMGET', self.KD, 'l', 'v', 'us', 'ur', 't')
  if not state[1] then return false end
  self.version = tonumber(state[2] or '0')
  self.unseen, self.unread = tonumber(state[3] or '0'), tonumber(state[4] or '0')
  self.renewed = tonumber(state[5] or '0')
  self.counts_changed = false
  self.open_now = {}
  return true
end

function U:next_version()
  self.version = math.max(clock(), self.version + 1)
  return int(self.version)
end

function U:emit(...)
  self.out[#self.out + 1] = table.concat({...}, US)
end

-- What the caller writes to Cassandra: this call's mutations, and the ones still pending.
function U:settle(keep)
  if not keep then return self.out end
  local out = self.out
  if #out == 0 then return redis.call('LRANGE', self.KN, 0, -1) end
  local length = 0
  for first = 1, #out, 1000 do
    length = redis.call('RPUSH', self.KN, unpack(out, first, math.min(#out, first + 999)))
  end
  if ttl > 0 then redis.call('EXPIRE', self.KN, ttl) end
  if length > #out then return redis.call('LRANGE', self.KN, 0, -1) end
  return out
end

function U:parse(gid, raw)
  if not raw then
    self.headers[gid] = false
    return nil
  end
  local f = split(raw, 9)
  local h = {gkey = f[1], opened = tonumber(f[2]), first = tonumber(f[3]),
    last = tonumber(f[4]), count = tonumber(f[5]), actors = tonumber(f[6]),
    seen = string.sub(f[7], 1, 1) == '1', read = string.sub(f[7], 2, 2) == '1', type = f[8],
    object = f[9], dirty = false}
  self.headers[gid] = h
  return h
end

function U:header(gid)
  local h = self.headers[gid]
  if h == nil then return self:parse(gid, redis.call('HGET', self.KD, 'g' .. US .. gid)) end
  return h or nil
end

function U:encode(h)
  return h.gkey .. US .. int(h.opened) .. US .. pad(h.first) .. US .. pad(h.last) .. US
    .. h.count .. US .. h.actors .. US .. (h.seen and '1' or '0') .. (h.read and '1' or '0')
    .. US .. h.type .. US .. h.object
end

-- Set a group's flags, keeping the counts.
function U:flag(h, seen, read)
  if h.seen ~= seen or h.read ~= read then h.flagged = true end
  if h.seen ~= seen then
    self.unseen = self.unseen + (seen and -1 or 1)
    h.seen = seen
    self.counts_changed = true
  end
  if h.read ~= read then
    self.unread = self.unread + (read and -1 or 1)
    h.read = read
    self.counts_changed = true
  end
  h.dirty = true
end

-- Write the changed headers and the counts back (one HSET).
function U:flush()
  local args = {}
  for gid, h in pairs(self.headers) do
    if h and h.dirty then
      args[#args + 1] = 'g' .. US .. gid
      args[#args + 1] = self:encode(h)
      h.dirty = false
    end
  end
  if self.counts_changed then
    args[#args + 1] = 'us'
    args[#args + 1] = int(self.unseen)
    args[#args + 1] = 'ur'
    args[#args + 1] = int(self.unread)
  end
  args[#args + 1] = 'v'
  args[#args + 1] = int(self.version)
  redis.call('HSET', self.KD, unpack(args))
end

-- Renew the TTL of the user's keys if it was last renewed more than a refresh period ago.
function U:touch()
  local now = math.floor(clock() / 1000000)
  if ttl > 0 and now - self.renewed >= refresh then
    redis.call('HSET', self.KD, 't', int(now))
    for _, k in ipairs({self.KD, self.KG, self.KI}) do redis.call('EXPIRE', k, ttl) end
  end
end

function U:online() return redis.call('HEXISTS', self.KP, 'e') == 1 end

-- The group as the API shows it (schemas: feed.notify.group_json), JSON.
-- A group's distinct actors, newest first, as (actor, its newest item's ts16 US aid), strictly
-- after position 'after' (nil: from the newest), at most 'most' of them. The scan of the items
-- stops once every actor of the group was seen (the header counts them).
function U:actors(gid, after, most)
  local out, seen = {}, {}
  local known, all = 0, self:header(gid).actors
  local top = hi(gid)
  local batch = 16
  while #out < most do
    local items = redis.call('ZREVRANGEBYLEX', self.KI, top, lo(gid), 'LIMIT', 0, batch)
    for _, member in ipairs(items) do
      local f = split(member, 4)
      if not seen[f[4]] then
        seen[f[4]] = true
        known = known + 1
        local at = f[2] .. US .. f[3]
        if not after or before(at, after) then
          out[#out + 1] = {f[4], at}
          if #out == most then break end
        end
      end
    end
    if #items < batch or known == all then break end
    top = '(' .. items[#items]
    batch = math.min(batch * 4, 1024)
  end
  return out
end

function U:view(gid)
  local h = self:header(gid)
  local names = {}
  for i, a in ipairs(self:actors(gid, nil, math.min(10, h.actors))) do
    names[i] = cjson.encode(a[1])
  end
  return '{"id":' .. cjson.encode(gid) .. ',"type":' .. cjson.encode(h.type)
    .. ',"object":' .. cjson.encode(h.object) .. ',"actors":[' .. table.concat(names, ',')
    .. '],"actor_count":' .. h.actors .. ',"activity_count":' .. h.count
    .. ',"first":"' .. iso(h.first) .. '","last":"' .. iso(h.last)
    .. '","seen":' .. tostring(h.seen) .. ',"read":' .. tostring(h.read) .. '}'
end

function U:emit_group(gid, h)
  local open = self.open_now[h.gkey]
  if open == nil then open = redis.call('HGET', self.KD, 'o' .. US .. h.gkey) end
  open = open == gid
  self:emit('G', self:next_version(), gid, h.gkey, h.type, int(h.opened), open and '1' or '0',
    h.seen and '1' or '0', h.read and '1' or '0', h.object)
end

-- Remove every trace of a group: its items, actors, header, open pointer, flags.
function U:drop(gid)
  local h = self:header(gid)
  local fields = {}
  local actors = {}
  for _, member in ipairs(redis.call('ZRANGEBYLEX', self.KI, lo(gid), hi(gid))) do
    local f = split(member, 4)
    fields[#fields + 1] = 'i' .. US .. f[3]
    if not actors[f[4]] then
      actors[f[4]] = true
      fields[#fields + 1] = 'c' .. US .. gid .. US .. f[4]
    end
  end
  fields[#fields + 1] = 'g' .. US .. gid
  local open = self.open_now[h.gkey]
  if open == nil then open = redis.call('HGET', self.KD, 'o' .. US .. h.gkey) end
  if open == gid then
    fields[#fields + 1] = 'o' .. US .. h.gkey
    self.open_now[h.gkey] = false
  end
  for first = 1, #fields, 1000 do
    redis.call('HDEL', self.KD, unpack(fields, first, math.min(#fields, first + 999)))
  end
  redis.call('ZREMRANGEBYLEX', self.KI, lo(gid), hi(gid))
  redis.call('ZREM', self.KG, gid)
  if not h.seen then self.unseen = self.unseen - 1 end
  if not h.read then self.unread = self.unread - 1 end
  self.counts_changed = true
  self.headers[gid] = false
  self:emit('D', self:next_version(), gid)
end

function U:move(gid, h, last)
  if last ~= h.last then
    h.last = last
    redis.call('ZADD', self.KG, last, gid)
  end
end

-- Notify: add activity aid to the group of its key. Returns the group id, and whether the
-- group existed before (nil for a replay: nothing changed).
function U:add(aid, actor, ts, gkey, type_, object, window, group_max)
  local base = gkey .. '-' .. int(ts)  -- the id of a group this activity would open
  local got = redis.call('HMGET', self.KD, 'i' .. US .. aid, 'o' .. US .. gkey, 'g' .. US .. base)
  if got[1] then
    -- a replay: nothing changes; the durable copy of its group is written again
    local f = split(got[1], 3)
    self:emit_group(f[1], self:header(f[1]))
    self:emit('I', self:next_version(), f[1], aid, f[2], int(tonumber(f[3])))
    return nil
  end
  if self.headers[base] == nil then self:parse(base, got[3] or nil) end
  local gid = got[2]
  self.open_now[gkey] = gid or false
  local h, c
  local ckey
  if gid then
    ckey = 'c' .. US .. gid .. US .. actor
    if self.headers[gid] == nil then
      local r = redis.call('HMGET', self.KD, 'g' .. US .. gid, ckey)
      h, c = self:parse(gid, r[1]), r[2]
    else
      h, c = self.headers[gid] or nil, redis.call('HGET', self.KD, ckey)
    end
  end
  local existed = true
  local fields = {}
  if not (h and ts - h.opened < window and h.count < group_max) then
    if gid then self:emit('C', self:next_version(), gid) end
    gid = base
    local suffix = 1
    while self:header(gid) do
      suffix = suffix + 1
      gid = base .. '-' .. suffix
    end
    h = {gkey = gkey, opened = ts, first = ts, last = ts, count = 0, actors = 0, seen = true,
      read = true, type = type_, object = object}
    self.headers[gid] = h
    redis.call('ZADD', self.KG, ts, gid)
    fields = {'o' .. US .. gkey, gid}
    self.open_now[gkey] = gid
    self.created = true
    self.fresh[gid] = true  -- its whole row goes to Cassandra (it may reuse a dropped id)
    existed = false
    ckey, c = 'c' .. US .. gid .. US .. actor, nil
  end
  if not c then h.actors = h.actors + 1 end
  local tsp = pad(ts)
  redis.call('HSET', self.KD, 'i' .. US .. aid, gid .. US .. actor .. US .. tsp, ckey,
    (tonumber(c) or 0) + 1, unpack(fields))
  redis.call('ZADD', self.KI, 0, gid .. US .. tsp .. US .. aid .. US .. actor)
  h.count = h.count + 1
  if ts < h.first then h.first = ts end
  if ts > h.last then self:move(gid, h, ts) end
  self:flag(h, false, false)
  self:emit('I', self:next_version(), gid, aid, actor, int(ts))
  return gid, existed
end

-- Unnotify: take activity aid out of its group. Returns the group id and true (it existed),
-- or nil if the user does not have the activity.
function U:remove(aid)
  local item = redis.call('HGET', self.KD, 'i' .. US .. aid)
  if not item then return nil end
  local f = split(item, 3)
  local gid, actor, ts = f[1], f[2], tonumber(f[3])
  local h = self:header(gid)
  redis.call('HDEL', self.KD, 'i' .. US .. aid)
  redis.call('ZREM', self.KI, gid .. US .. pad(ts) .. US .. aid .. US .. actor)
  self:emit('X', self:next_version(), gid, aid)
  h.count = h.count - 1
  if h.count == 0 then
    -- drop finds the actors' counters through the items left: this one's goes first
    redis.call('HDEL', self.KD, 'c' .. US .. gid .. US .. actor)
    self:drop(gid)
    return gid, true
  end
  local ckey = 'c' .. US .. gid .. US .. actor
  local left = tonumber(redis.call('HGET', self.KD, ckey)) - 1
  if left == 0 then
    redis.call('HDEL', self.KD, ckey)
    h.actors = h.actors - 1
  else
    redis.call('HSET', self.KD, ckey, left)
  end
  if ts == h.first then
    local first = redis.call('ZRANGEBYLEX', self.KI, lo(gid), hi(gid), 'LIMIT', 0, 1)[1]
    h.first = tonumber(split(first, 4)[2])
  end
  if ts == h.last then
    local last = redis.call('ZREVRANGEBYLEX', self.KI, hi(gid), lo(gid), 'LIMIT', 0, 1)[1]
    self:move(gid, h, tonumber(split(last, 4)[2]))
  end
  h.dirty = true
  return gid, true
end

-- Publish the frames of the groups that changed (the user is online).
function U:publish(order, existed)
  local tail = ',"unseen":' .. self.unseen .. ',"unread":' .. self.unread .. '}'
  for _, gid in ipairs(order) do
    if self:header(gid) then
      redis.call(publish, self.channel,
        '{"type":"notification","group":' .. self:view(gid) .. tail)
    elseif existed[gid] then
      redis.call(publish, self.channel,
        '{"type":"notification_removed","group":' .. cjson.encode(gid) .. tail)
    end
  end
end

if cmd == 'apply' then
  -- ARGV 4 window (µs), 5 most items per group, 6 most groups, 7 keep ('1': a durable store
  -- takes the mutations: keep them pending until confirmed), 8 users, then per user: its
  -- channel, its count of operations, and 7 values per operation:
  -- 'a' aid actor ts gkey type object (notify) | 'd' aid '' '' '' '' '' (the activity is gone)
  -- Answers one array per user: {'L'} (not loaded: nothing changed), or {'K', mutations...}.
  local window, group_max, max_groups = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local replies = {}
  local keep = ARGV[7] == '1'
  local b = 9
  for k = 1, tonumber(ARGV[8]) do
    local me = user(5 * k - 4, ARGV[b])
    local n = tonumber(ARGV[b + 1])
    local first_op = b + 2
    b = first_op + 7 * n
    if not me:open() then
      replies[k] = {'L'}
    else
      local changed, order, existed = {}, {}, {}
      local function note(gid, was)
        if existed[gid] == nil then existed[gid] = was end
        if not changed[gid] then
          changed[gid] = true
          order[#order + 1] = gid
        end
      end
      for o = first_op, b - 1, 7 do
        local gid, was
        if ARGV[o] == 'a' then
          gid, was = me:add(ARGV[o + 1], ARGV[o + 2], tonumber(ARGV[o + 3]), ARGV[o + 4],
            ARGV[o + 5], ARGV[o + 6], window, group_max)
        else
          gid, was = me:remove(ARGV[o + 1])
        end
        if gid then note(gid, was) end
        -- the bound holds after every operation, as in the reference (feed.notify)
        while me.created and redis.call('ZCARD', me.KG) - 1 > max_groups do
          local oldest = redis.call('ZRANGEBYSCORE', me.KG, 0, '+inf', 'LIMIT', 0, 1)[1]
          note(oldest, true)
          me:drop(oldest)
        end
        me.created = false
      end
      for _, gid in ipairs(order) do
        local h = me:header(gid)
        if h and me.fresh[gid] then
          me:emit_group(gid, h)  -- opened in this call: the whole row
        elseif h and h.flagged then
          me:emit('S', me:next_version(), gid, h.seen and '1' or '0', h.read and '1' or '0')
        end
      end
      me:flush()
      if #order > 0 and me:online() then me:publish(order, existed) end
      me:touch()
      local out = me:settle(keep)
      table.insert(out, 1, 'K')
      replies[k] = out
    end
  end
  return replies
end

local me = user(1, ARGV[4])

if cmd == 'load' then
  -- ARGV 4 the channel, 5 n groups, then 8 per group: gid gkey type object opened open seen
  -- read, then 4 per item: gid aid actor ts (any order)
  if me:open() then  -- loaded already (by a concurrent caller): only renew
    me:touch()
    return 0
  end
  for _, k in ipairs({me.KD, me.KG, me.KI}) do redis.call('DEL', k) end
  local n = tonumber(ARGV[5])
  local groups = {}
  for j = 0, n - 1 do
    local b = 6 + 8 * j
    groups[ARGV[b]] = {gkey = ARGV[b + 1], type = ARGV[b + 2], object = ARGV[b + 3],
      opened = tonumber(ARGV[b + 4]), open = ARGV[b + 5] == '1', seen = ARGV[b + 6] == '1',
      read = ARGV[b + 7] == '1', count = 0, actors = 0, first = math.huge, last = -1}
  end
  local actor_ts = {}
  for b = 6 + 8 * n, #ARGV, 4 do
    local gid, aid, actor, ts = ARGV[b], ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 3])
    local g = groups[gid]
    if g then
      redis.call('HSET', me.KD, 'i' .. US .. aid, gid .. US .. actor .. US .. pad(ts))
      redis.call('ZADD', me.KI, 0, gid .. US .. pad(ts) .. US .. aid .. US .. actor)
      g.count = g.count + 1
      if ts > g.last then g.last = ts end
      if ts < g.first then g.first = ts end
      local key = gid .. US .. actor
      if not actor_ts[key] then
        actor_ts[key] = 1
        g.actors = g.actors + 1
      else
        actor_ts[key] = actor_ts[key] + 1
      end
    end
  end
  for key, n_items in pairs(actor_ts) do redis.call('HSET', me.KD, 'c' .. US .. key, n_items) end
  local unseen, unread = 0, 0
  for gid, g in pairs(groups) do
    if g.count > 0 then  -- a group row without items is the rest of a drop: left out
      redis.call('HSET', me.KD, 'g' .. US .. gid, me:encode(g))
      redis.call('ZADD', me.KG, g.last, gid)
      if g.open then redis.call('HSET', me.KD, 'o' .. US .. g.gkey, gid) end
      if not g.seen then unseen = unseen + 1 end
      if not g.read then unread = unread + 1 end
    end
  end
  for _, k in ipairs({me.KG, me.KI}) do redis.call('ZADD', k, -1, '') end  -- sentinels
  redis.call('HSET', me.KD, 'l', '1', 'v', int(clock()), 'us', int(unseen), 'ur', int(unread),
    't', int(math.floor(clock() / 1000000)))
  if ttl > 0 then
    for _, k in ipairs({me.KD, me.KG, me.KI}) do redis.call('EXPIRE', k, ttl) end
  end
  return 1
end

if not me:open() then return {'L'} end
me:touch()

-- Groups in position order (newest first) strictly below position p ('' for the top), or, with
-- at_or_above, every group at or above it: ties on the score are ordered by gid.
local function below(p, limit)
  local out = {}
  local top = '+inf'
  if p ~= '' then
    local last, gid = string.sub(p, 1, 16), string.sub(p, 18)
    for _, g in ipairs(redis.call('ZREVRANGEBYSCORE', me.KG, last, last)) do
      if before(g, gid) and #out <= limit then out[#out + 1] = {g, tonumber(last)} end
    end
    top = '(' .. last
  end
  local rest = redis.call('ZREVRANGEBYSCORE', me.KG, top, 0, 'WITHSCORES', 'LIMIT', 0,
    limit + 1 - #out)
  for i = 1, #rest, 2 do out[#out + 1] = {rest[i], tonumber(rest[i + 1])} end
  return out
end

local function at_or_above(p)
  local last, gid = string.sub(p, 1, 16), string.sub(p, 18)
  local out = {}
  for _, g in ipairs(redis.call('ZRANGEBYSCORE', me.KG, last, last)) do
    if not before(g, gid) then out[#out + 1] = g end
  end
  for _, g in ipairs(redis.call('ZRANGEBYSCORE', me.KG, '(' .. last, '+inf')) do
    out[#out + 1] = g
  end
  return out
end

if cmd == 'page' then
  -- ARGV 5 before (a position; '' for the newest), 6 limit
  local limit = tonumber(ARGV[6])
  local groups = below(ARGV[5], limit)
  local nxt = ''
  if #groups > limit then
    groups[#groups] = nil
    nxt = pad(groups[#groups][2]) .. ':' .. groups[#groups][1]
  end
  local out = {'P', me.unseen, me.unread, nxt}
  for _, g in ipairs(groups) do out[#out + 1] = me:view(g[1]) end
  return out
end

if cmd == 'actors' then
  -- ARGV 5 gid, 6 after ('' or <ts16> US <aid>: a page's next), 7 limit
  local gid, after, limit = ARGV[5], ARGV[6], tonumber(ARGV[7])
  if not me:header(gid) then return {'N'} end
  local actors = me:actors(gid, after ~= '' and after or nil, limit + 1)
  local nxt = ''
  if #actors > limit then
    actors[#actors] = nil
    nxt = actors[#actors][2]
  end
  local out = {'A', nxt}
  for _, a in ipairs(actors) do out[#out + 1] = a[1] end
  return out
end

if cmd == 'mark' then
  -- ARGV 5 keep (as for 'apply'), 6 'seen' | 'read', 7 'all' | 'groups' | 'through', then
  -- the gids, or one position: every group at or above it (newer or equal) is marked
  local keep, read, mode = ARGV[5] == '1', ARGV[6] == 'read', ARGV[7]
  local gids = {}
  if mode == 'all' then
    gids = redis.call('ZRANGEBYSCORE', me.KG, 0, '+inf')
  elseif mode == 'through' then
    gids = at_or_above(ARGV[8])
  else
    for b = 8, #ARGV do gids[#gids + 1] = ARGV[b] end
  end
  for _, gid in ipairs(gids) do
    local h = me:header(gid)
    if h and (not h.seen or (read and not h.read)) then
      me:flag(h, true, read or h.read)
      me:emit('S', me:next_version(), gid, '1', h.read and '1' or '0')
    end
  end
  me:flush()
  if me:online() then
    redis.call(publish, me.channel, '{"type":"notification_counts","unseen":' .. me.unseen
      .. ',"unread":' .. me.unread .. '}')
  end
  local out = {'M', me.unseen, me.unread}
  for _, v in ipairs(me:settle(keep)) do out[#out + 1] = v end
  return out
end

return redis.error_reply('unknown command ' .. tostring(cmd))
