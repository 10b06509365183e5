-- Cancel not-yet-started requests of one scope (pending or dispatched). A dispatched
-- request's message may still reach a worker; it finds no record and is skipped,
-- which is why cancel is durable where Celery's revoke is not.
--
-- KEYS[1..16]  due:<profile> sorted sets, profiles 0..15 in order
-- KEYS[17]     leases
-- KEYS[18]     req:<scope>
-- KEYS[19]     history:<scope>
-- KEYS[20]     counts: "<kind>:<profile>" pending, "<kind>:dispatched" (keys.py)
-- KEYS[21]     deadletter (bgqueue/deadletter.py)
-- ARGV[1]      scope
-- ARGV[2]      history length cap
-- ARGV[3..]    identifiers to cancel; none means every request of the scope
-- Returns the number of requests cancelled, or {'foreign', key, type} when a key it would
-- write holds another type (then nothing is written). A record that is not a request's
-- is moved to the dead letter and removed, without a history entry.

-- include: deadletter

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local scope, key = ARGV[1], KEYS[18]

local ids = {}
if #ARGV > 2 then
  for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  for _, field in ipairs(redis.call('HKEYS', key)) do
    if string.sub(field, 1, 1) ~= '#' then ids[#ids + 1] = field end
  end
end

-- Read and check everything first (wrong_type: a script that fails half-way keeps its
-- first writes).
local records, foreign = {}, {}
local wanted = {[KEYS[17]] = 'zset', [KEYS[19]] = 'list', [KEYS[20]] = 'hash'}
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', key, id)
  if raw then
    local rec, why = request_record(raw)
    if rec then
      records[#records + 1] = {id, rec}
      wanted[KEYS[rec['r'] + 1]] = 'zset'
    else
      foreign[#foreign + 1] = {id, why, raw}
    end
  end
end
local wrong, found = wrong_type(wanted)
if wrong then return {'foreign', wrong, found} end
for _, entry in ipairs(foreign) do
  redis.call('HDEL', key, entry[1])
  dead_letter(KEYS[21], key .. ' ' .. entry[1], entry[2] .. '; removed by a cancel', entry[3])
end

local cancelled = 0
for _, entry in ipairs(records) do
  local id, rec = entry[1], entry[2]
  do
    local m = scope .. '\31' .. id
    redis.call('ZREM', KEYS[rec['r'] + 1], m)
    redis.call('ZREM', KEYS[17], m)
    redis.call('HDEL', key, id)
    local was = rec['s'] == 'pending' and rec['r'] or 'dispatched'
    redis.call('HINCRBY', KEYS[20], rec['k'] .. ':' .. was, -1)
    local class = rec['k'] == 'refresh' and '#refresh' or '#processing'
    if redis.call('HINCRBY', key, class, -1) <= 0 then redis.call('HDEL', key, class) end
    redis.call('LPUSH', KEYS[19], cjson.encode({
      i = id, sc = scope, k = rec['k'], s = 'cancelled', ok = false,
      fa = now, g = rec['g'] or 0, a = rec['a'] or 0, why = 'cancelled by the producer'}))
    cancelled = cancelled + 1
  end
end
if cancelled > 0 then redis.call('LTRIM', KEYS[19], 0, tonumber(ARGV[2]) - 1) end
return cancelled
