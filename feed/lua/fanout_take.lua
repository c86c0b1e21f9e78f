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
--     records granted are taken off the waiting count;
--   'release' (records read back that will not be applied: dead-lettered, or the tenant has no
--     rate any more): only taken off the waiting count, all "granted".
-- A rate of 0 (no limit) grants everything and waits for nothing.
-- Returns {tokens taken (0..wanted), µs until one more is available}.
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
local mode = ARGV[4]
local deferred = mode == 'deferred'
local waiting = tonumber(redis.call('GET', KEYS[2]) or '0')
if mode == 'release' or rate <= 0 then
  if mode ~= 'batch' and waiting > 0 then
    if waiting > wanted then
      redis.call('DECRBY', KEYS[2], wanted)
    else
      redis.call('DEL', KEYS[2])
    end
  end
  return {wanted, 0}
end
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
  -- The expiry is set once, when records start waiting: a count left too high (copies lost
  -- between the count and the topic: a crash) sends the tenant's records through the deferral
  -- topic for an hour at most, never for good.
  redis.call('SET', KEYS[2], waiting, 'KEEPTTL')
  if redis.call('TTL', KEYS[2]) < 0 then
    redis.call('EXPIRE', KEYS[2], 3600)
  end
else
  redis.call('DEL', KEYS[2])
end
local wait = 0
if tokens < 1 then
  wait = math.ceil((1 - tokens) * 1000000 / rate)
end
return {taken, wait}
