-- A worker begins a dispatched work, only if the message's generation is still the
-- record's: a stale or duplicate message (re-dispatched, removed work) never runs.
--
-- KEYS[1..7]  the app's work keys, AppKeys.work_all: works, work:due, work:leases,
--              work:last, work:boot, work:stop, work:seq
-- ARGV[1]      work id
-- ARGV[2]      generation from the message
-- ARGV[3]      worker name
-- ARGV[4]      run lease, ms (renewed by the run's watchdog, work_renew.lua)
-- Returns the record JSON, now running, or false if the message is stale.

-- include: work_boot (defines `now`; forgets works that did not survive a restart)

local id = ARGV[1]
local raw = redis.call('HGET', KEYS[1], id)
if not raw then return false end
local rec = cjson.decode(raw)
if rec['s'] ~= 'dispatched' or tostring(rec['g']) ~= ARGV[2] then return false end
rec['s'], rec['w'], rec['sa'] = 'running', ARGV[3], now
raw = cjson.encode(rec)
redis.call('HSET', KEYS[1], id, raw)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), id)
return raw
