-- Put parked requests back on their scope's schedule: a live worker class now has their
-- handler (beat calls this when its view of the live classes gains one).
--
-- KEYS[1]   parked
-- KEYS[2]   counts
-- KEYS[3]   deadletter
-- KEYS[4..] req:<scope>, sched:<profile>:<scope>, due:<profile> of each member, in order
-- ARGV[1..] parked members "<profile>\31<scope>\31<identifier>"
-- Returns how many were put back. A member whose record is gone or no longer parked is
-- dropped; foreign data met is dead-lettered first.

-- include: deadletter
-- include: requests

local PARKED, COUNTS, DL = KEYS[1], KEYS[2], KEYS[3]
local wanted = {[PARKED] = 'zset', [COUNTS] = 'hash'}
for i = 1, #ARGV do wanted[KEYS[1 + 3 * i]], wanted[KEYS[3 + 3 * i]] = 'hash', 'zset' end
for key, kind in pairs(wanted) do dead_letter_key(DL, key, kind, 'unpark met a key') end
for i, m in ipairs(ARGV) do
  local profile, scope = string.match(m, '^(%d+)\31([^\31]+)\31')
  if profile then
    sound_schedule(DL, KEYS[1 + 3 * i], KEYS[2 + 3 * i], KEYS[3 + 3 * i], scope,
      tonumber(profile), 'unpark met a key')
  end
end
local fields = {}
for kind in pairs(REQUEST_KINDS) do
  fields[#fields + 1] = kind .. ':parked'
  for profile = 0, 15 do fields[#fields + 1] = kind .. ':' .. profile end
end
fix_counters(DL, COUNTS, fields, nil)

local moved = 0
for i, m in ipairs(ARGV) do
  local req, sched, due = KEYS[1 + 3 * i], KEYS[2 + 3 * i], KEYS[3 + 3 * i]
  local at = redis.call('ZSCORE', PARKED, m)
  local profile, scope, id = string.match(m, '^(%d+)\31([^\31]+)\31(.+)$')
  local rec = nil
  if at and id then
    local raw = redis.call('HGET', req, id)
    rec = raw and request_record(raw)
  end
  redis.call('ZREM', PARKED, m)
  if rec and rec['s'] == 'parked' and tostring(rec['r']) == profile then
    rec['s'] = 'pending'
    redis.call('HSET', req, id, cjson.encode(rec))
    schedule(due, sched, scope, id, at)
    count(COUNTS, rec, 'parked', -1)
    count(COUNTS, rec, rec['r'], 1)
    moved = moved + 1
  elseif at then
    dead_letter(DL, PARKED, 'parked member of no parked request', m)
  end
end
return moved
