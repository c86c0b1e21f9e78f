-- Remove activities from users' timelines, and deliver a 'removed' frame to the online ones.
-- Run by feed.timelines_redis (RedisTimelines.remove, AsyncRedisTimelines.remove_for).
--
-- KEYS (built by feed.keys): per user of every group, in ARGV order, three keys
--   (feed.keys.remove_user_keys): the user's timeline, presence, delivery stream.
-- ARGV:
--   1 hist (stream length), 2..4 the removed frame's head, middle and tail
--   (schemas.frames.REMOVED_*), 5 'PUBLISH' (one Redis) or 'SPUBLISH' (a cluster: sharded
--   Pub/Sub, the channel in the user's slot), then groups of:
--   member (order key), id_json (the activity id as a JSON string), count of users c,
--   then the c users' channels (feed.keys.channel).
-- Returns {removed, pushed}.
local hist = ARGV[1]
local head, middle, tail = ARGV[2], ARGV[3], ARGV[4]
local publish = ARGV[5]
local i = 6
local k = 0
local removed, pushed = 0, 0
while i <= #ARGV do
  local member, id_json, count = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local rest = middle .. id_json .. tail
  for c = i + 3, i + 2 + count do
    local tl, on, dl = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
    k = k + 3
    if redis.call('ZREM', tl, member) == 1 then
      removed = removed + 1
      local ep = redis.call('HGET', on, 'e')
      if ep then
        local seq = redis.call('HINCRBY', on, 's', 1)
        -- the cursor is the stream cursor <epoch>.<seq> (feed.cursor.StreamCursor)
        local frame = head .. ep .. '.' .. seq .. rest
        redis.call('XADD', dl, 'MAXLEN', '~', hist, seq .. '-0', 'f', frame)
        redis.call(publish, ARGV[c], frame)
        pushed = pushed + 1
      end
    end
  end
  i = i + 3 + count
end
return {removed, pushed}
