-- A continuous run ends: its handler returned or raised, the worker had no handler for
-- it, or it was terminated after ignoring a stop. The task is removed, except when its
-- worker is shutting down (a handover) and the handler returned: then it waits again,
-- restarts + 1, for another continuous worker. A run that ends on its own with a cancel
-- reason (raised, no handler) announces the cancel.
--
-- KEYS[1]  ct
-- KEYS[2]  ct:pending
-- KEYS[3]  ct:leases
-- ARGV[1]  ability
-- ARGV[2]  generation of the run
-- ARGV[3]  cancel reason if the run failed (0: it ended normally or as asked; -1: the
--          worker has no handler for it: it waits again, unharmed, for one that has)
-- ARGV[4]  cancel pub/sub channel
-- ARGV[5]  message for the cancel event
-- Returns 0 if the run had been given up already, 1 if the task was removed, 2 if it
-- waits to restart on another worker, 3 if it was handed back.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
if tostring(rec['g']) ~= ARGV[2] or (rec['s'] ~= 'running' and rec['s'] ~= 'stopping') then
  return 0
end
local reason = tonumber(ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[1])
if reason < 0 and rec['s'] == 'running' then
  for _, field in ipairs({'w', 'pid', 'sa', 'g'}) do rec[field] = nil end
  rec['s'] = 'pending'
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  return 3
end
if rec['s'] == 'running' and rec['ho'] == 1 and reason == 0 then
  for _, field in ipairs({'w', 'pid', 'sa'}) do rec[field] = nil end
  rec['s'], rec['r'], rec['ho'] = 'pending', rec['r'] + 1, 0
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  return 2
end
if rec['s'] == 'running' and reason > 0 then
  redis.call('PUBLISH', ARGV[4], cjson.encode({
    reason = reason, id = rec['id'], ab = rec['ab'], msg = ARGV[5]}))
end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
