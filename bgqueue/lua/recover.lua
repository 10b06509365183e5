-- Give up a run whose lease lapsed (its worker or pool process died): record the
-- attempt as failed and put the request back to pending, unless a newer request
-- with the same identifier is already waiting or the attempts are used up.
--
-- KEYS[1]  running
-- KEYS[2]  runleases
-- KEYS[3]  history:<scope>
-- KEYS[4]  req:<scope>
-- KEYS[5]  due:<profile> of the request
-- KEYS[6]  expire
-- KEYS[7]  counts: "<kind>:<profile>" pending (keys.py)
-- ARGV[1]  generation
-- ARGV[2]  history length cap
-- ARGV[3]  maximum attempts
-- Returns 0 if the lease is live (nothing done), 1 requeued, 2 dropped.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gen = ARGV[1]
local score = redis.call('ZSCORE', KEYS[2], gen)
if not score or tonumber(score) > now then return 0 end
local raw = redis.call('HGET', KEYS[1], gen)
redis.call('ZREM', KEYS[2], gen)
redis.call('SREM', KEYS[6], gen)
if not raw then return 2 end
redis.call('HDEL', KEYS[1], gen)
local rec = cjson.decode(raw)
local id, scope = rec['i'], rec['sc']
local attempts = rec['a'] + 1
redis.call('LPUSH', KEYS[3], cjson.encode({
  i = id, sc = scope, k = rec['k'], s = 'failed', ok = false, sa = rec['sa'], fa = now,
  w = rec['w'], g = rec['g'], a = rec['a'], why = 'worker lost (heartbeat lapsed)'}))
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[2]) - 1)
if attempts >= tonumber(ARGV[3]) or redis.call('HEXISTS', KEYS[4], id) == 1 then
  return 2
end
for _, field in ipairs({'g', 'sc', 'i', 'w', 'sa'}) do rec[field] = nil end
rec['s'], rec['a'], rec['t'] = 'pending', attempts, now  -- t: pending again since now
redis.call('HSET', KEYS[4], id, cjson.encode(rec))
redis.call('HINCRBY', KEYS[4], rec['k'] == 'refresh' and '#refresh' or '#processing', 1)
redis.call('ZADD', KEYS[5], rec['e'], scope .. '\31' .. id)
redis.call('HINCRBY', KEYS[7], rec['k'] .. ':' .. rec['r'], 1)
return 1
