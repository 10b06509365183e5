-- A running work's watchdog proves the run alive and collects a stop_work request.
--
-- KEYS[1..7]  the app's work keys, AppKeys.work_all: works, work:due, work:leases,
--              work:last, work:boot, work:stop, work:seq
-- ARGV[1]      work id
-- ARGV[2]      generation of the run
-- ARGV[3]      run lease, ms
-- Returns {alive, stop}: alive 0 if the run was given up as lost or its work removed;
-- stop 1 if stop_work asked this run to stop (collected once).

-- include: work_boot (defines `now`; forgets works that did not survive a restart)

local id = ARGV[1]
local stop = redis.call('SREM', KEYS[6], id .. ':' .. ARGV[2])
local raw = redis.call('HGET', KEYS[1], id)
local rec = raw and cjson.decode(raw)
if not rec or rec['s'] ~= 'running' or tostring(rec['g']) ~= ARGV[2] then return {0, stop} end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), id)
return {1, stop}
