-- Take tokens from a rate-limit token bucket, atomically (gateway.ratelimit).
-- Run by gateway.ratelimit (RedisRateLimiter.take).
--
-- KEYS (built by feed.keys.rate_*): 1 the bucket (hash: t = tokens, ts = last update, µs of the
--   server clock).
-- ARGV: 1 rate (tokens per second, > 0), 2 burst (tokens, >= 1), 3 cost.
-- Returns {1 if taken else 0, µs until `cost` tokens are available (0 if taken)}.
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
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
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  taken = 1
else
  wait = math.ceil((cost - tokens) * 1000000 / rate)
end
redis.call('HSET', KEYS[1], 't', string.format('%.6f', tokens), 'ts', string.format('%.0f', ts))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) * 1000 / rate) + 1000)
return {taken, wait}
