-- getWorkStatus / isLastWorkTimeOut / obtainAllWorks: read works, after forgetting those
-- a Redis restart ended (so a reader never sees a work that is gone).
--
-- KEYS[1..7]  the app's work keys, AppKeys.work_all: works, work:due, work:leases,
--              work:last, work:boot, work:stop, work:seq
-- ARGV[1]      a work id, or '' for every work
-- Returns for one id: {record JSON or false, last run JSON or false};
-- for every work: a flat list of work id, record JSON.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Works that are not persisted live as long as the Redis process that accepted them:
-- the first work script after a restart (a new run_id) forgets them and their last runs.
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if redis.call('GET', KEYS[5]) ~= run_id then
  for _, hash in ipairs({KEYS[1], KEYS[4]}) do
    local all = redis.call('HGETALL', hash)
    for i = 1, #all, 2 do
      if not cjson.decode(all[i + 1])['p'] then
        redis.call('HDEL', hash, all[i])
        if hash == KEYS[1] then
          redis.call('ZREM', KEYS[2], all[i])
          redis.call('ZREM', KEYS[3], all[i])
        end
      end
    end
  end
  redis.call('SET', KEYS[5], run_id)
end

if ARGV[1] == '' then return redis.call('HGETALL', KEYS[1]) end
return {redis.call('HGET', KEYS[1], ARGV[1]), redis.call('HGET', KEYS[4], ARGV[1])}
