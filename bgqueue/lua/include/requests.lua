-- How every script moves a request between the places it can be (spliced in by
-- bgqueue/scripts.py where a script says `-- include: requests`, after the deadletter
-- include). One convention, written once:
--
-- The clock: `now`, ms on Redis's clock, read once per script.
--
-- The schedule, two levels, so that a million waiting requests cost little memory and
-- beat never looks past what is due:
--   sched:<profile>:<scope>  ZSET identifier -> earliest-begin ms of the scope's pending
--                            requests of that profile (a handful, kept compact by Redis)
--   due:<profile>            ZSET scope -> the earliest date in its sched:<profile>:<scope>
--   schedule(due, sched, scope, id, at) and unschedule(due, sched, scope, id) keep both.
--
-- The counters, one system kept by the scripts that change state:
--   the app's counts  HASH '<kind>:<place>' -> requests of that kind there, where place is
--                     a profile number (pending, scheduled), 'parked' (pending, no live
--                     worker has its handler) or 'dispatched'; read by metrics and status
--   the scope's req:<scope> fields '#refresh' and '#processing' -> not-started requests
--                     that count against the scope's pending limit (a requeued run does
--                     not: see recover.lua)
--   count(counts, rec, place, by) and hold(req, rec, by) change them; a field that reaches
--   zero is deleted, so an idle app or scope keeps no counter at all.
--   A counter that is not an integer (foreign data) would make HINCRBY fail half-way, so
--   scripts call fix_counters first: the app's fields are dead-lettered and reset, the
--   scope's are recounted from its records.

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function class_of(kind)
  if kind == 'refresh' then return 'refresh' end
  return 'processing'
end

-- A requeued run (attempt > 0) waits outside the pending limit (recover.lua).
local function limited(rec)
  return rec['a'] == 0
end

local function bump(hash, field, by)
  if redis.call('HINCRBY', hash, field, by) <= 0 then redis.call('HDEL', hash, field) end
end

local function count(counts, rec, place, by)
  bump(counts, rec['k'] .. ':' .. place, by)
end

local function hold(req, rec, by)
  if limited(rec) then bump(req, '#' .. class_of(rec['k']), by) end
end

-- Where a not-started request is, as its counter names it.
local function place_of(rec)
  if rec['s'] == 'pending' then return rec['r'] end
  return rec['s']
end

local function reindex(due, sched, scope)
  local first = redis.call('ZRANGE', sched, 0, 0, 'WITHSCORES')
  if first[1] then
    redis.call('ZADD', due, first[2], scope)
  else
    redis.call('ZREM', due, scope)
  end
end

local function schedule(due, sched, scope, id, at)
  redis.call('ZADD', sched, at, id)
  redis.call('ZADD', due, 'LT', at, scope)
end

local function unschedule(due, sched, scope, id)
  if redis.call('ZREM', sched, id) == 1 then reindex(due, sched, scope) end
end

local function is_integer(value)
  return value == false or string.match(value, '^%-?%d+$') ~= nil
end

-- The scope's limit counters recounted from its records (foreign records are skipped:
-- whoever meets them dead-letters them).
-- A counter as read (with `read`: nil when missing or foreign), as a number to write back
-- whole: one that is not an integer is dead-lettered and taken as 0. Scripts on the hot
-- path read their counters and write the new values (set_counter) instead of HINCRBY, so
-- that foreign data found in a counter can never make a write fail half-way.
local function counter_value(dl, hash, field, raw)
  if is_integer(raw or false) then return tonumber(raw) or 0 end
  dead_letter(dl, hash .. ' ' .. field, 'counter is not an integer; reset', raw)
  return 0
end

local function set_counter(hash, field, n)
  if n > 0 then redis.call('HSET', hash, field, n) else redis.call('HDEL', hash, field) end
end

local function recount(req)
  local held = {refresh = 0, processing = 0}
  local all = redis.call('HGETALL', req)
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 1) ~= '#' then
      local rec = request_record(all[i + 1])
      if rec and limited(rec) then
        held[class_of(rec['k'])] = held[class_of(rec['k'])] + 1
      end
    end
  end
  for class, n in pairs(held) do
    if n > 0 then redis.call('HSET', req, '#' .. class, n) else redis.call('HDEL', req, '#' .. class) end
  end
  return held
end

-- Make every counter the script will change an integer (see above). `req` may be nil.
local function fix_counters(dl, counts, fields, req)
  if redis.call('TYPE', counts)['ok'] == 'hash' then
    for _, field in ipairs(fields) do
      local value = redis.call('HGET', counts, field)
      if not is_integer(value) then
        redis.call('HDEL', counts, field)
        dead_letter(dl, counts .. ' ' .. field, 'counter is not an integer; reset', value)
      end
    end
  end
  if req and redis.call('TYPE', req)['ok'] == 'hash' then
    local found = redis.call('HMGET', req, '#refresh', '#processing')
    if not is_integer(found[1]) or not is_integer(found[2]) then
      dead_letter(dl, req, 'pending-limit counter is not an integer; recounted',
        tostring(found[1]) .. ' ' .. tostring(found[2]))
      recount(req)
    end
  end
end

-- rebuild_schedule puts the scope's pending requests of a profile back on its (fresh)
-- schedule from their records: the records are what a request is; the schedule only orders
-- them. sound_schedule moves a schedule key of another type to the dead letter and rebuilds
-- it; it returns whether it had to.
local function rebuild_schedule(req, sched, due, scope, profile)
  if redis.call('TYPE', req)['ok'] ~= 'hash' then return end
  local all = redis.call('HGETALL', req)
  for i = 1, #all, 2 do
    local rec = string.sub(all[i], 1, 1) ~= '#' and request_record(all[i + 1])
    if rec and rec['s'] == 'pending' and rec['r'] == profile then
      schedule(due, sched, scope, all[i], rec['x'] and 0 or rec['e'])
    end
  end
end

local function sound_schedule(dl, req, sched, due, scope, profile, why)
  if not dead_letter_key(dl, sched, 'zset', why) then return false end
  rebuild_schedule(req, sched, due, scope, profile)
  return true
end
