-- getWorkStatus / isLastWorkTimeOut / obtainAllWorks: read works, after forgetting those
-- a Redis restart ended (so a reader never sees a work that is gone).
--
-- KEYS[1..7]  the app's work keys, AppKeys.work_all: works, work:due, work:leases,
--              work:last, work:boot, work:stop, work:seq
-- ARGV[1]      a work id, or '' for every work
-- Returns for one id: {record JSON or false, last run JSON or false};
-- for every work: a flat list of work id, record JSON.

-- include: work_boot (defines `now`; forgets works that did not survive a restart)

if ARGV[1] == '' then return redis.call('HGETALL', KEYS[1]) end
return {redis.call('HGET', KEYS[1], ARGV[1]), redis.call('HGET', KEYS[4], ARGV[1])}
