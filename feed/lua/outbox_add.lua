-- Large accounts: add activities to the actors' capped outboxes and announce each new one on the
-- actor's channel (once per activity). Run by feed.timelines_redis (RedisTimelines.add_to_outboxes).
--
-- KEYS (built by feed.keys), in one of two modes (ARGV 3):
--   'k' (keyed, one Redis): per item i (i = 1..), three keys: KEYS[3i-2] the activity's deleted
--       marker, KEYS[3i-1] its body, KEYS[3i] the actor's outbox. A deleted activity is skipped.
--   'o' (outboxes only, Redis Cluster): KEYS[i] the outbox of item i, all in one slot; the
--       caller stores the bodies and checks the deleted markers after the call
--       (feed.timelines_redis.RedisTimelines.add_to_outboxes).
-- ARGV: 1 max (outbox cap), 2 body ttl (s), 3 the mode, then per item three values: member
--   (order key), body, the actor's channel (feed.keys.actor_channel).
-- Announcements (PUBLISH in mode 'k', sharded SPUBLISH in mode 'o'): '+' .. member .. '\n' ..
-- body when added. Returns how many were added.
local max = tonumber(ARGV[1])
local ttl = ARGV[2]
local keyed = ARGV[3] == 'k'
local added = 0
local k = 0
for i = 4, #ARGV, 3 do
  local member, body, channel = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local ob
  local live = true
  if keyed then
    local dkey, bkey = KEYS[k + 1], KEYS[k + 2]
    ob = KEYS[k + 3]
    k = k + 3
    -- deleted since the caller read it: neither the body nor the outbox entry is written
    live = redis.call('EXISTS', dkey) == 0
    if live then redis.call('SET', bkey, body, 'EX', ttl) end
  else
    k = k + 1
    ob = KEYS[k]
  end
  if live then
    if redis.call('ZADD', ob, 0, member) == 1 then
      added = added + 1
      if redis.call('ZCARD', ob) > max then redis.call('ZREMRANGEBYRANK', ob, 0, -(max + 1)) end
      redis.call(keyed and 'PUBLISH' or 'SPUBLISH', channel, '+' .. member .. '\n' .. body)
    end
  end
end
return added
