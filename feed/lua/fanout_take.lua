-- Take up to `wanted` fan-out tokens of a tenant (its activities fanned out per second), atomically.
-- Run by fanout.quota (FanoutQuota.take).
--
-- KEYS (built by feed.keys.Keyspace): 1 the tenant's fan-out bucket (hash: t = tokens, ts = last
--   update, µs of the server clock: the layout of token_bucket.lua), 2 how many of the tenant's
--   records wait in the deferral topic (string, a count).
-- ARGV: 1 rate (tokens per second, > 0), 2 burst (tokens, >= 1), 3 wanted, 4 the mode:
--   'batch' (a batch of new records): nothing is taken while records of the tenant wait (they go
--     after them, in order), and the records not granted are added to the waiting count (the
--     caller copies them to the deferral topic);
--   'deferred' (records read back from the deferral topic): taken whatever waits, and the
--     records granted are taken off the waiting count.
-- Returns {tokens taken (0..wanted), µs until one more is available}.
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
local deferred = ARGV[4] == 'deferred'
local waiting = tonumber(redis.call('GET', KEYS[2]) or '0')
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local state = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000000)
  ts = now
end
local taken = 0
if wanted > 0 and (waiting == 0 or deferred) then
  taken = math.min(wanted, math.floor(tokens))
  tokens = tokens - taken
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
if deferred then
  waiting = math.max(0, waiting - taken)
else
  waiting = waiting + wanted - taken
end
if waiting > 0 then
  -- a count left too high (records lost between the count and the deferral topic: a crash) only
  -- sends the tenant's records through the deferral topic for as long as it lives
  redis.call('SET', KEYS[2], waiting, 'EX', 3600)
else
  redis.call('DEL', KEYS[2])
end
local wait = 0
if tokens < 1 then
  wait = math.ceil((1 - tokens) * 1000000 / rate)
end
return {taken, wait}
