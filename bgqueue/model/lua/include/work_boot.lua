-- Shared opening of the work_*.lua scripts (spliced in by bgqueue/model/scripts.py where a
-- script says `-- include: work_boot`). Expects the work keys in KEYS as AppKeys.work_all.
--
-- Defines `now` (ms, server clock). Works that are not persisted live as long as the Redis
-- process that accepted them: the first work script after a restart (a new run_id) forgets
-- them and their last runs.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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
