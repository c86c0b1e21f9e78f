-- Mark a user online (or keep them so): a new presence starts a new epoch and an empty stream.
-- Run by feed.delivery_redis (AsyncRedisPresence.attach and renew).
--
-- KEYS (built by feed.keys): 1 the user's presence hash, 2 their delivery stream.
-- ARGV: 1 a new epoch (used only if there is no presence, or to renew), 2 ttl (s),
--   3 (renew only) the epoch the caller saw: if the presence is still at it, a new epoch and an
--   empty stream start anyway (its newest seqs may have been rolled back by a failover, so they
--   may be handed out again for other frames). Another epoch means someone renewed it already.
-- Returns {epoch, last seq}.
local on, dl = KEYS[1], KEYS[2]
local ep = redis.call('HGET', on, 'e')
if not ep or (ARGV[3] and ep == ARGV[3]) then
  redis.call('DEL', dl)
  redis.call('HSET', on, 'e', ARGV[1], 's', 0)
  ep = ARGV[1]
end
redis.call('EXPIRE', on, ARGV[2])
redis.call('EXPIRE', dl, ARGV[2])
return {ep, redis.call('HGET', on, 's')}
