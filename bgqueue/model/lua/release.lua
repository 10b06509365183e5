-- Hand a dispatched request back to pending, unharmed: the worker that got it can no
-- longer satisfy its requirements, has no handler for it (an old build during a rolling
-- deploy), or beat found its class gone. Its next claim routes it again (or parks it).
--
-- KEYS[1]  req:<scope>
-- KEYS[2]  leases
-- KEYS[3]  sched:<profile>:<scope> of the request
-- KEYS[4]  due:<profile> of the request
-- KEYS[5]  counts
-- KEYS[6]  deadletter
-- ARGV[1]  scope
-- ARGV[2]  identifier
-- ARGV[3]  generation from the message
-- Returns 1 if released, 0 if the message was stale.

-- include: deadletter
-- include: requests

local REQ, LEASES, SCHED, DUE, COUNTS, DL = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local scope, id, gen = ARGV[1], ARGV[2], ARGV[3]
local wanted = {[REQ] = 'hash', [LEASES] = 'zset', [DUE] = 'zset', [COUNTS] = 'hash'}
for key, kind in pairs(wanted) do dead_letter_key(DL, key, kind, 'release met a key') end
local raw = redis.call('HGET', REQ, id)
local rec = raw and request_record(raw)
if rec then sound_schedule(DL, REQ, SCHED, DUE, scope, rec['r'], 'release met a key') end
if not rec or rec['s'] ~= 'dispatched' or tostring(rec['g']) ~= gen then return 0 end
fix_counters(DL, COUNTS, {rec['k'] .. ':dispatched', rec['k'] .. ':' .. rec['r']}, nil)
rec['s'], rec['g'], rec['q'], rec['t'] = 'pending', nil, nil, now  -- t: pending again since now
redis.call('HSET', REQ, id, cjson.encode(rec))
redis.call('ZREM', LEASES, scope .. '\31' .. id)
schedule(DUE, SCHED, scope, id, rec['x'] and 0 or rec['e'])  -- x: launched by simulation
count(COUNTS, rec, 'dispatched', -1)
count(COUNTS, rec, rec['r'], 1)
return 1
