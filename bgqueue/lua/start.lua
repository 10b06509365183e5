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
-- Every key is read before the first write (deadletter include: read, move_foreign).

-- include: deadletter
-- include: requests

local REQ, LEASES, RUNNING, RUNLEASES, COUNTS, DL = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local scope, id, gen = ARGV[1], ARGV[2], ARGV[3]
local member = scope .. '\31' .. id

local found = read('hash', 'HMGET', REQ, id, '#refresh', '#processing') or {}
read('zset', 'ZSCORE', LEASES, member)
read('hash', 'HEXISTS', RUNNING, gen)
read('zset', 'ZSCORE', RUNLEASES, gen)
local raw = found[1]
if not raw then
  move_foreign(DL, 'start met a key')
  return false
end
local rec, why = request_record(raw, true)
if not rec then
  move_foreign(DL, 'start met a key')
  redis.call('HDEL', REQ, id)
  redis.call('ZREM', LEASES, member)
  recount(REQ)
  dead_letter(DL, REQ .. ' ' .. id, why .. '; not run', raw)
  return false
end
if rec['s'] ~= 'dispatched' or tostring(rec['g']) ~= gen then
  move_foreign(DL, 'start met a key')
  return false
end
if rec['e'] > now and not rec['x'] then return rec['e'] - now end
local field = rec['k'] .. ':dispatched'
local dispatched = read('hash', 'HGET', COUNTS, field)
move_foreign(DL, 'start met a key')

-- The request leaves the scope: its record, its pending-limit slot, its dispatch lease.
redis.call('HDEL', REQ, id)
if limited(rec) then
  local class = class_of(rec['k'])
  local held = found[class == 'refresh' and 2 or 3]
  if is_integer(held or false) then
    set_counter(REQ, '#' .. class, (tonumber(held) or 0) - 1)
  else
    dead_letter(DL, REQ, 'pending-limit counter is not an integer; recounted', held)
    recount(REQ)
  end
end
redis.call('ZREM', LEASES, member)
set_counter(COUNTS, field, counter_value(DL, COUNTS, field, dispatched) - 1)

rec['s'], rec['sc'], rec['i'], rec['w'], rec['sa'] = 'running', scope, id, ARGV[4], now
rec['q'] = nil
raw = cjson.encode(rec)
redis.call('HSET', RUNNING, gen, raw)
redis.call('ZADD', RUNLEASES, now + tonumber(ARGV[5]), gen)
return raw
