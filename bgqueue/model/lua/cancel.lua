-- Cancel not-yet-started requests of one scope (pending, parked or dispatched). A dispatched
-- request's message may still reach a worker; it finds no record and is skipped, which is
-- why cancel is durable where Celery's revoke is not.
--
-- KEYS[1..16]   due:<profile>, profiles 0..15
-- KEYS[17..32]  sched:<profile>:<scope>, profiles 0..15
-- KEYS[33]      req:<scope>
-- KEYS[34]      leases
-- KEYS[35]      parked
-- KEYS[36]      history:<scope>
-- KEYS[37]      counts
-- KEYS[38]      deadletter
-- ARGV[1]       scope
-- ARGV[2], [3]  history: length cap, retention ms (bgqueue/model/settings.py)
-- ARGV[4..]     identifiers to cancel; none means every request of the scope
-- Returns the number of requests cancelled, or {'foreign', key, type} when a key it would
-- write holds another type (then nothing is written). A record that is not a request's is
-- moved to the dead letter and removed, without a history entry.

-- include: deadletter
-- include: requests
-- include: history

local DUE, SCHED, REQ, LEASES, PARKED, HISTORY, COUNTS, DL = 0, 16, 33, 34, 35, 36, 37, 38
local scope = ARGV[1]

local req_type = redis.call('TYPE', KEYS[REQ])['ok']
if req_type ~= 'none' and req_type ~= 'hash' then return {'foreign', KEYS[REQ], req_type} end
local ids = {}
if #ARGV > 3 then
  for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  for _, field in ipairs(redis.call('HKEYS', KEYS[REQ])) do
    if string.sub(field, 1, 1) ~= '#' then ids[#ids + 1] = field end
  end
end

-- Read and check everything before the first write.
local records, foreign, fields = {}, {}, {}
local wanted = {[KEYS[LEASES]] = 'zset', [KEYS[PARKED]] = 'zset', [KEYS[HISTORY]] = 'list',
                [KEYS[COUNTS]] = 'hash'}
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', KEYS[REQ], id)
  if raw then
    local rec, why = request_record(raw)
    if rec then
      records[#records + 1] = {id, rec}
      wanted[KEYS[DUE + rec['r'] + 1]], wanted[KEYS[SCHED + rec['r'] + 1]] = 'zset', 'zset'
      fields[#fields + 1] = rec['k'] .. ':' .. place_of(rec)
    else
      foreign[#foreign + 1] = {id, why, raw}
    end
  end
end
local wrong, found = wrong_type(wanted)
if wrong then return {'foreign', wrong, found} end

fix_counters(KEYS[DL], KEYS[COUNTS], fields, KEYS[REQ])
for _, entry in ipairs(foreign) do
  redis.call('HDEL', KEYS[REQ], entry[1])
  dead_letter(KEYS[DL], KEYS[REQ] .. ' ' .. entry[1], entry[2] .. '; removed by a cancel', entry[3])
end
for _, entry in ipairs(records) do
  local id, rec = entry[1], entry[2]
  if rec['s'] == 'pending' then
    unschedule(KEYS[DUE + rec['r'] + 1], KEYS[SCHED + rec['r'] + 1], scope, id)
  elseif rec['s'] == 'parked' then
    redis.call('ZREM', KEYS[PARKED], rec['r'] .. '\31' .. scope .. '\31' .. id)
  else
    redis.call('ZREM', KEYS[LEASES], scope .. '\31' .. id)
  end
  redis.call('HDEL', KEYS[REQ], id)
  count(KEYS[COUNTS], rec, place_of(rec), -1)
  hold(KEYS[REQ], rec, -1)
  remember(KEYS[HISTORY], {
    i = id, sc = scope, k = rec['k'], s = 'cancelled', ok = false,
    fa = now, g = rec['g'] or 0, a = rec['a'], why = 'cancelled by the producer'},
    ARGV[2], ARGV[3])
end
return #records
