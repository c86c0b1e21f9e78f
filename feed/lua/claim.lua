-- First creates of new activity ids (fanout.processor): claim each id for its actor unless
-- someone holds it already. Run by feed.timelines_redis (RedisTimelines.claim).
--
-- KEYS (built by feed.keys.claim): KEYS[i] the claim of id i.
-- ARGV: 1 ttl (s), 2 the ids' actors joined by newlines (in KEYS order; ids hold no whitespace).
-- Returns the positions (1-based) of the ids held by someone else, each followed by the holder.
local ttl = ARGV[1]
local out = {}
local i = 0
for actor in string.gmatch(ARGV[2], '[^\n]+') do
  i = i + 1
  local holder = redis.call('GET', KEYS[i])
  if not holder then
    redis.call('SET', KEYS[i], actor, 'EX', ttl)
  elseif holder ~= actor then
    out[#out + 1] = i
    out[#out + 1] = holder
  end
end
return out
