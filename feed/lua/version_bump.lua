-- Set a follow-graph version anew: <changes + 1>.<fresh token> (feed.versions).
-- Run by fanout.processor (registered once, feed.versions.BUMP).
--
-- KEYS (built by feed.keys): 1 the version key (graph_version or following_version).
-- ARGV: 1 a fresh token.
-- Returns the new number of changes.
local v = redis.call('GET', KEYS[1])
local n = 0
if v then n = tonumber(string.match(v, '^(%d+)')) or 0 end
redis.call('SET', KEYS[1], (n + 1) .. '.' .. ARGV[1])
return n + 1
