-- Cache bodies read from Cassandra, except those of activities deleted since the read.
-- Run by feed.timelines_redis (AsyncRedisTimelines.cache_bodies).
--
-- KEYS (built by feed.keys): per activity j (j = 1..): KEYS[2j-1] its deleted marker,
--   KEYS[2j] its body.
-- ARGV: 1 ttl (s), then ARGV[1 + j] the body of activity j.
-- Returns how many were cached.
local cached = 0
for j = 1, #ARGV - 1 do
  if redis.call('EXISTS', KEYS[2 * j - 1]) == 0 then
    redis.call('SET', KEYS[2 * j], ARGV[1 + j], 'EX', ARGV[1])
    cached = cached + 1
  end
end
return cached
