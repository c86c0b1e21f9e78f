-- Large accounts: add activities to the actors' capped outboxes and announce each new one on the
-- actor's channel (once per activity). Run by feed.timelines_redis (RedisTimelines.add_to_outboxes).
--
-- KEYS (built by feed.keys): per item i (i = 1..), three keys: KEYS[3i-2] the activity's deleted
--   marker, KEYS[3i-1] its body, KEYS[3i] the actor's outbox.
-- ARGV: 1 max (outbox cap), 2 body ttl (s), then per item three values: member (order key),
--   body, the actor's channel (feed.keys.actor_channel).
-- Announcements: '+' .. member .. '\n' .. body when added. Returns how many were added.
local max = tonumber(ARGV[1])
local ttl = ARGV[2]
local added = 0
local k = 0
for i = 3, #ARGV, 3 do
  local member, body, channel = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local dkey, bkey, ob = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  k = k + 3
  -- deleted since the caller read it: neither the body nor the outbox entry is written
  if redis.call('EXISTS', dkey) == 0 then
    redis.call('SET', bkey, body, 'EX', ttl)
    if redis.call('ZADD', ob, 0, member) == 1 then
      added = added + 1
      if redis.call('ZCARD', ob) > max then redis.call('ZREMRANGEBYRANK', ob, 0, -(max + 1)) end
      redis.call('PUBLISH', channel, '+' .. member .. '\n' .. body)
    end
  end
end
return added
