-- A worker starts a dispatched request: only if the message's generation is still the
-- record's, so duplicate or stale messages (replaced, cancelled, published again) never run
-- twice; and never before its earliest-begin date on Redis's clock, whatever the worker's.
--
-- KEYS[1]  req:<scope>
-- KEYS[2]  leases
-- KEYS[3]  running
-- KEYS[4]  runleases
-- KEYS[5]  counts
-- KEYS[6]  deadletter
-- ARGV[1]  scope
-- ARGV[2]  identifier
-- ARGV[3]  generation from the message
-- ARGV[4]  worker name
-- ARGV[5]  run lease, ms (renewed by the task's watchdog)
-- Returns the running record's JSON; false if the message is stale; or the number of ms
-- until the request's date, if the worker came early (its clock is ahead of Redis's).
-- A record whose payload is not JSON cannot run: it is dead-lettered and dropped.

-- include: deadletter
-- include: requests

local REQ, LEASES, RUNNING, RUNLEASES, COUNTS, DL = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local scope, id, gen = ARGV[1], ARGV[2], ARGV[3]
local wanted = {[REQ] = 'hash', [LEASES] = 'zset', [RUNNING] = 'hash', [RUNLEASES] = 'zset',
                [COUNTS] = 'hash'}
for key, kind in pairs(wanted) do dead_letter_key(DL, key, kind, 'start met a key') end
local raw = redis.call('HGET', REQ, id)
if not raw then return false end
local rec, why = request_record(raw, true)
if not rec then
  redis.call('HDEL', REQ, id)
  redis.call('ZREM', LEASES, scope .. '\31' .. id)
  recount(REQ)
  dead_letter(DL, REQ .. ' ' .. id, why .. '; not run', raw)
  return false
end
if rec['s'] ~= 'dispatched' or tostring(rec['g']) ~= gen then return false end
if rec['e'] > now and not rec['x'] then return rec['e'] - now end
fix_counters(DL, COUNTS, {rec['k'] .. ':dispatched'}, REQ)

redis.call('HDEL', REQ, id)
hold(REQ, rec, -1)
redis.call('ZREM', LEASES, scope .. '\31' .. id)
count(COUNTS, rec, 'dispatched', -1)
rec['s'], rec['sc'], rec['i'], rec['w'], rec['sa'] = 'running', scope, id, ARGV[4], now
rec['q'] = nil
raw = cjson.encode(rec)
redis.call('HSET', RUNNING, gen, raw)
redis.call('ZADD', RUNLEASES, now + tonumber(ARGV[5]), gen)
return raw
