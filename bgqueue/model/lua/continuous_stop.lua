-- Stop a continuous task: the app's stop_background_running (reason 0), or a cancel by
-- the system (a ContinuousTaskCancelReason, from the run's watchdog or beat). A task not
-- running yet is removed at once (a message already on its way finds no record). A
-- running one is marked 'stopping': its watchdog sets task.stopped at its next renewal,
-- and the record goes when the handler returns (continuous_end.lua). Only a cancel the
-- app did not ask for is announced on the app's cancel channel: as on HarmonyOS, the
-- app's own stop does not call its continuousTaskCancel callbacks.
--
-- KEYS[1]  ct
-- KEYS[2]  ct:pending
-- KEYS[3]  ct:leases
-- ARGV[1]  ability
-- ARGV[2]  generation of the run to cancel, or '' for whichever the task has
-- ARGV[3]  cancel reason (0: the app's own stop)
-- ARGV[4]  cancel pub/sub channel
-- ARGV[5]  message for the cancel event
-- Returns 0 if there was nothing to stop (no task, already stopping, another
-- generation), 1 if the task was removed, 2 if it is now stopping.

local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
if rec['s'] == 'stopping' then return 0 end
if ARGV[2] ~= '' and tostring(rec['g']) ~= ARGV[2] then return 0 end
local reason = tonumber(ARGV[3])
if reason > 0 then
  redis.call('PUBLISH', ARGV[4], cjson.encode({
    reason = reason, id = rec['id'], ab = rec['ab'], msg = ARGV[5]}))
end
if rec['s'] ~= 'running' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 1
end
rec['s'], rec['why'] = 'stopping', reason
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
return 2
