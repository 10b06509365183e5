-- A worker hands a dispatched request back to pending because its requirements no
-- longer hold on this worker (its conditions changed after the dispatch).
--
-- KEYS[1]  req:<scope>
-- KEYS[2]  leases
-- KEYS[3]  due:<profile> of the request
-- ARGV[1]  scope
-- ARGV[2]  identifier
-- ARGV[3]  generation from the message
-- Returns 1 if released, 0 if the message was stale.

local id, gen = ARGV[2], ARGV[3]
local raw = redis.call('HGET', KEYS[1], id)
if not raw then return 0 end
local rec = cjson.decode(raw)
if rec['s'] ~= 'dispatched' or tostring(rec['g']) ~= gen then return 0 end
local m = ARGV[1] .. '\31' .. id
rec['s'], rec['g'] = 'pending', nil
redis.call('HSET', KEYS[1], id, cjson.encode(rec))
redis.call('ZREM', KEYS[2], m)
redis.call('ZADD', KEYS[3], rec['e'], m)
return 1
