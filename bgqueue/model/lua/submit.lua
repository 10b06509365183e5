-- Submit a batch of requests of one scope, replacing any not-yet-started request with the
-- same identifier. All or nothing: everything that can refuse the batch (the pending
-- limits, a free slot for a continued-processing request that must start now, a key of
-- the wrong type) is checked before the first write.
--
-- KEYS[1..16]   due:<profile>, profiles 0..15: the app's index of scopes by earliest date
-- KEYS[17..32]  sched:<profile>:<scope>, profiles 0..15: the scope's pending requests
-- KEYS[33]      req:<scope>: records by identifier, and the scope's limit counters
-- KEYS[34]      leases (a replaced dispatched request leaves it)
-- KEYS[35]      parked (a replaced parked request leaves it)
-- KEYS[36]      counts
-- KEYS[37]      deadletter
-- KEYS[38..41]  workers, alive, running, classes: read only to find free slots (ARGV[6])
-- ARGV[1], [2]  max pending refresh, processing requests per scope
-- ARGV[3]       scope
-- ARGV[4], [5]  beat's wake channel and the app id to publish there once accepted
-- ARGV[6]       each continued-processing request that must start now (strategy FAIL) as
--               'profile identifier', space-separated, or '': each needs a free slot
-- ARGV[7..]     five values per request: identifier, record JSON (requests.py: ending in
--               '}'), profile, earliest-begin ms (the score, as given), kind
-- Returns {'ok', replaced}, {'limit', index (0-based, in the batch), class},
-- {'busy', profile, free slots}, or {'foreign', key, type} when a key it would write holds
-- another type. A stored record that is not a request's is dead-lettered and replaced.
-- A request given twice in the batch is the later one. A record whose earliest-begin date
-- has passed gains t, when it became pending (ms): beat's dispatch lateness counts from
-- max(e, t).

-- include: deadletter
-- include: requests
-- include: slots

local DUE, SCHED, REQ, LEASES, PARKED, COUNTS, DL = 0, 16, 33, 34, 35, 36, 37
local scope = ARGV[3]
local limit = {refresh = tonumber(ARGV[1]), processing = tonumber(ARGV[2])}

-- Calls with many arguments go in chunks: Lua's unpack has a stack limit.
local CHUNK = 1000
local function in_chunks(command, target, args, width)
  local out = {}
  for first = 1, #args, CHUNK * width do
    local last = math.min(first + CHUNK * width - 1, #args)
    local reply = redis.call(command, target, unpack(args, first, last))
    if type(reply) == 'table' then
      for _, value in ipairs(reply) do out[#out + 1] = value end
    end
  end
  return out
end

-- 1. The batch: the last request given for each identifier, in batch order.
local last, ids = {}, {}
for a = 7, #ARGV, 5 do
  local id = ARGV[a]
  if not last[id] then ids[#ids + 1] = id end
  last[id] = {index = (a - 7) / 5, id = id, record = ARGV[a + 1], r = tonumber(ARGV[a + 2]),
              at = ARGV[a + 3], k = ARGV[a + 4]}
end
local batch = {}
for _, id in ipairs(ids) do batch[#batch + 1] = last[id] end
table.sort(batch, function(x, y) return x.index < y.index end)

-- 2. What is stored under those identifiers (one HMGET), and the scope's counters.
local req_type = redis.call('TYPE', KEYS[REQ])['ok']
if req_type ~= 'none' and req_type ~= 'hash' then return {'foreign', KEYS[REQ], req_type} end
local found = in_chunks('HMGET', KEYS[REQ], ids, 1)
local old, foreign = {}, {}
for n, id in ipairs(ids) do
  if found[n] then
    local rec, why = request_record(found[n])
    if rec then old[id] = rec else foreign[#foreign + 1] = {id, why, found[n]} end
  end
end
local counters = redis.call('HMGET', KEYS[REQ], '#refresh', '#processing')

-- 3. The pending limits, as the batch would leave them: a replacement frees its old slot,
-- and only a class the batch makes fuller than it was can be refused.
local held = {refresh = tonumber(counters[1]) or 0, processing = tonumber(counters[2]) or 0}
local after = {refresh = held.refresh, processing = held.processing}
for _, new in ipairs(batch) do
  local o = old[new.id]
  if o and limited(o) then after[class_of(o['k'])] = after[class_of(o['k'])] - 1 end
end
for _, new in ipairs(batch) do
  local class = class_of(new.k)
  after[class] = after[class] + 1
  if after[class] > limit[class] and after[class] > held[class] then
    return {'limit', new.index, class}
  end
end

-- 4. Continued-processing requests that must start now need a free slot each.
local needed, order = {}, {}
for profile, id in string.gmatch(ARGV[6], '(%d+) (%S+)') do
  local key = profile .. ' ' .. id
  if not needed[key] then order[#order + 1] = {tonumber(profile), id, key} end
  needed[key] = (needed[key] or 0) + 1
end
for _, want in ipairs(order) do
  local free = free_slots(KEYS[38], KEYS[39], KEYS[40], KEYS[41], KEYS[LEASES], KEYS[COUNTS],
    want[1], want[2])
  if free < needed[want[3]] then return {'busy', want[1], free} end
end

-- 5. Every key written below must hold its type (or nothing).
local wanted = {[KEYS[COUNTS]] = 'hash', [KEYS[LEASES]] = 'zset', [KEYS[PARKED]] = 'zset'}
for _, new in ipairs(batch) do
  wanted[KEYS[DUE + new.r + 1]], wanted[KEYS[SCHED + new.r + 1]] = 'zset', 'zset'
end
for _, o in pairs(old) do
  wanted[KEYS[DUE + o['r'] + 1]], wanted[KEYS[SCHED + o['r'] + 1]] = 'zset', 'zset'
end
local wrong, found_type = wrong_type(wanted)
if wrong then return {'foreign', wrong, found_type} end

-- 6. Write. Counters first made sound; foreign records kept in the dead letter.
local fields = {}
for _, new in ipairs(batch) do fields[#fields + 1] = new.k .. ':' .. new.r end
for _, o in pairs(old) do fields[#fields + 1] = o['k'] .. ':' .. place_of(o) end
fix_counters(KEYS[DL], KEYS[COUNTS], fields, KEYS[REQ])
for _, entry in ipairs(foreign) do
  dead_letter(KEYS[DL], KEYS[REQ] .. ' ' .. entry[1], entry[2] .. '; replaced by a submit', entry[3])
end

local replaced = 0
for id, o in pairs(old) do
  if o['s'] == 'pending' then
    unschedule(KEYS[DUE + o['r'] + 1], KEYS[SCHED + o['r'] + 1], scope, id)
  elseif o['s'] == 'parked' then
    redis.call('ZREM', KEYS[PARKED], o['r'] .. '\31' .. scope .. '\31' .. id)
  else
    redis.call('ZREM', KEYS[LEASES], scope .. '\31' .. id)
  end
  count(KEYS[COUNTS], o, place_of(o), -1)
  hold(KEYS[REQ], o, -1)
  replaced = replaced + 1
end

local records, by_profile, tally = {}, {}, {}
for _, new in ipairs(batch) do
  local rec = new.record
  if tonumber(new.at) < now then rec = string.sub(rec, 1, -2) .. ',"t":' .. now .. '}' end
  records[#records + 1] = new.id
  records[#records + 1] = rec
  local list = by_profile[new.r] or {}
  list[#list + 1] = new.at
  list[#list + 1] = new.id
  by_profile[new.r] = list
  local field = new.k .. ':' .. new.r
  tally[field] = (tally[field] or 0) + 1
  local class = '#' .. class_of(new.k)
  tally[class] = (tally[class] or 0) + 1
end
in_chunks('HSET', KEYS[REQ], records, 2)
for profile, list in pairs(by_profile) do
  in_chunks('ZADD', KEYS[SCHED + profile + 1], list, 2)
  reindex(KEYS[DUE + profile + 1], KEYS[SCHED + profile + 1], scope)
end
for field, n in pairs(tally) do
  if string.sub(field, 1, 1) == '#' then
    redis.call('HINCRBY', KEYS[REQ], field, n)
  else
    redis.call('HINCRBY', KEYS[COUNTS], field, n)
  end
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {'ok', replaced}
