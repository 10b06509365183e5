-- A continuous worker is shutting down (warm shutdown): mark its running tasks for
-- handover. Each run's watchdog sets task.stopped at its next renewal; when the handler
-- returns, continuous_end.lua puts the task back to wait for another continuous worker.
--
-- KEYS[1]  ct
-- ARGV[1]  worker name
-- Returns how many tasks were marked.

local marked = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local rec = cjson.decode(all[i + 1])
  if rec['s'] == 'running' and rec['w'] == ARGV[1] and rec['ho'] ~= 1 then
    rec['ho'] = 1
    redis.call('HSET', KEYS[1], all[i], cjson.encode(rec))
    marked = marked + 1
  end
end
return marked
