-- Load a timeline read from Cassandra and end the rebuild, in one step. An entry whose activity
-- was deleted meanwhile (the delete ran after the Cassandra read) is left out, with its body; a
-- rebuild whose lease was lost (Redis restarted, lease expired) does not mark the timeline built.
-- Run by feed.timelines_redis (AsyncRedisTimelines.rebuild).
--
-- KEYS (built by feed.keys): 1 the user's timeline, 2 their active marker, 3 their rebuild
--   lease, then (one Redis) per entry j (j = 1..): KEYS[2 + 2j] the activity's deleted marker,
--   KEYS[3 + 2j] its body.
-- ARGV: 1 token, 2 max (timeline cap), 3 body ttl (s), then per entry j: ARGV[2 + 2j] member
--   (order key), ARGV[3 + 2j] body. On a Redis Cluster (no KEYS past the third: the activities'
--   keys are in other slots) just the members, ARGV[3 + j]: the caller stores the bodies and
--   checks the deleted markers before and after (AsyncRedisTimelines.rebuild).
-- Returns 1 if the timeline was marked complete, 0 if the lease was lost (nothing marked).
local tl, seen, rb = KEYS[1], KEYS[2], KEYS[3]
local token, max, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local keyed = #KEYS > 3
local args = {}
local added = false
for i = 4, #ARGV, keyed and 2 or 1 do
  local live = true
  if keyed then
    live = redis.call('EXISTS', KEYS[i]) == 0
    if live then redis.call('SET', KEYS[i + 1], ARGV[i + 1], 'EX', ttl) end
  end
  if live then
    args[#args + 1] = 0
    args[#args + 1] = ARGV[i]
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
if redis.call('GET', rb) ~= token then return 0 end
redis.call('DEL', rb)
if redis.call('EXISTS', seen) == 1 then redis.call('SET', seen, '1', 'KEEPTTL') end
return 1
