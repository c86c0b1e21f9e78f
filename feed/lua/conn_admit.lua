-- Admit a WebSocket connection under its tenant's connection quota, or renew or end admissions.
-- Run by gateway.tenancy (ConnectionQuota).
--
-- KEYS (built by feed.keys.Keyspace.connections): 1 the tenant's live connections (sorted set:
--   member = gateway connection id, score = when its admission lapses, ms of the server clock).
-- ARGV: 1 the command: 'admit', 'renew' or 'end'; 2 the lease (ms); 3 the quota (connections);
--   4.. connection ids ('admit': one).
-- Lapsed admissions (a gateway that died holding them) are dropped first. 'admit' adds the id if
-- fewer than the quota are live and returns 1, else 0; 'renew' extends the ids' leases (adding
-- back those that lapsed) and returns how many; 'end' removes the ids. The key lives as
-- long as the newest lease.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local cmd = ARGV[1]
local done = 0
if cmd == 'admit' then
  if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
    redis.call('ZADD', KEYS[1], now + lease, ARGV[4])
    done = 1
  end
elseif cmd == 'renew' then
  -- the gateway holds these connections: added back if their leases lapsed (Redis restarted,
  -- renewals failed for a while), so they count again
  for i = 4, #ARGV do
    redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
    done = done + 1
  end
else
  for i = 4, #ARGV do
    done = done + redis.call('ZREM', KEYS[1], ARGV[i])
  end
  return done  -- the other leases keep the key's own expiry
end
redis.call('PEXPIRE', KEYS[1], lease)
return done
