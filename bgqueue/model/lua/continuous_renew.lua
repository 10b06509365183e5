-- A continuous run's watchdog proves it alive, records its progress, and reads what
-- changed: a stop or cancel ('stopping'), new modes, a handover ('ho': its worker is
-- shutting down).
--
-- KEYS[1]  ct
-- KEYS[2]  ct:leases
-- ARGV[1]  ability
-- ARGV[2]  generation of the run
-- ARGV[3]  run lease, ms
-- ARGV[4]  progress as JSON text, or '' if unchanged since the last renewal
-- Returns the record JSON, or false if this run was given up (its lease lapsed and the
-- task was restarted elsewhere, or it is gone).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return false end
local rec = cjson.decode(raw)
if tostring(rec['g']) ~= ARGV[2] or (rec['s'] ~= 'running' and rec['s'] ~= 'stopping') then
  return false
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
if ARGV[4] ~= '' then
  rec['pg'] = ARGV[4]
  raw = cjson.encode(rec)
  redis.call('HSET', KEYS[1], ARGV[1], raw)
end
return raw
