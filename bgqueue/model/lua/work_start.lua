-- startWork: add a work to the app's works, waiting from now for a worker that matches it.
-- Refused, writing nothing, if the id is taken or the app has its maximum of works.
--
-- KEYS[1..7]  the app's work keys, AppKeys.work_all: works, work:due, work:leases,
--              work:last, work:boot, work:stop, work:seq
-- ARGV[1]      work id
-- ARGV[2]      record JSON (state 'waiting', no runs yet; see bgqueue/works/)
-- ARGV[3]      maximum works of the app
-- Returns 'ok', 'exists' or 'full'.

-- include: work_boot (defines `now`; forgets works that did not survive a restart)

local id = ARGV[1]
if redis.call('HEXISTS', KEYS[1], id) == 1 then return 'exists' end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 'full' end
redis.call('HSET', KEYS[1], id, ARGV[2])
redis.call('ZADD', KEYS[2], now, id)
redis.call('HDEL', KEYS[4], id)  -- the last run of an earlier work with this id
return 'ok'
