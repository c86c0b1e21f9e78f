-- Large accounts: remove activities from the actors' outboxes and announce each removal on the
-- actor's channel. Run by feed.timelines_redis (RedisTimelines.remove_from_outbox).
--
-- KEYS (built by feed.keys): KEYS[i] the outbox of item i's actor.
-- ARGV: per item i two values: ARGV[2i-1] member (order key), ARGV[2i] the actor's channel
--   (feed.keys.actor_channel); then, on a Redis Cluster, 'SPUBLISH' (sharded Pub/Sub; else
--   PUBLISH).
-- Announcement: '-' .. member when removed. Returns how many were removed.
local publish = ARGV[2 * #KEYS + 1] or 'PUBLISH'
local removed = 0
for i = 1, #KEYS do
  local member, channel = ARGV[2 * i - 1], ARGV[2 * i]
  if redis.call('ZREM', KEYS[i], member) == 1 then
    removed = removed + 1
    redis.call(publish, channel, '-' .. member)
  end
end
return removed
