-- The catch-up state of a delivery stream (gateway.big_accounts.BigAccounts.catch_up): written
-- into the presence hash only while it is still the stream of the given epoch (a hash that
-- expired meanwhile is not recreated without its epoch).
-- KEYS[1] the presence hash (feed.keys.presence)
-- ARGV[1] the epoch; ARGV[2] the reset-through seq, or ""; then field/value pairs
-- Returns 1 if written, 0 if the stream is another epoch's (or gone).
if redis.call('HGET', KEYS[1], 'e') ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then
  local old = tonumber(redis.call('HGET', KEYS[1], 'r') or '-1')
  if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], 'r', ARGV[2]) end
end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
