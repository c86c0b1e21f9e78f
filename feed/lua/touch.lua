-- Mark a user active, and take the rebuild lease if their Redis timeline must be rebuilt.
-- Run by feed.timelines_redis (AsyncRedisTimelines.touch).
--
-- The active marker is '1' once the user's Redis timeline is complete and 'b' while it is being
-- rebuilt from Cassandra; the rebuild lease holds the builder's token, with a TTL. Fan-out writes
-- Redis as soon as the marker exists, so writes during a rebuild are kept; reads trust Redis only
-- when it is '1'. A builder that vanished (lease expired) is taken over by the next touch.
--
-- KEYS (built by feed.keys): 1 the user's active marker, 2 their rebuild lease.
-- ARGV: 1 active ttl (s), 2 token.
-- Returns 0 hot, 1 rebuild now (the caller holds the lease), 2 being rebuilt by someone else.
local seen, rb = KEYS[1], KEYS[2]
local state = redis.call('GET', seen)
if not state then
  redis.call('SET', seen, 'b', 'EX', ARGV[1])
  redis.call('SET', rb, ARGV[2], 'EX', 60)
  return 1
end
redis.call('EXPIRE', seen, ARGV[1])
if state == '1' then return 0 end
if redis.call('SET', rb, ARGV[2], 'EX', 60, 'NX') then return 1 end
return 2
