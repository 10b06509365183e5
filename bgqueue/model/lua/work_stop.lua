-- stopWork / stopAndClearWorks: ask the running runs of works to stop (their watchdog
-- calls onWorkStop), and with cancel also remove the works and their last runs. A
-- removed work's message still on a queue then finds no record and is skipped.
--
-- KEYS[1..7]  the app's work keys, AppKeys.work_all: works, work:due, work:leases,
--              work:last, work:boot, work:stop, work:seq
-- ARGV[1]      1 to remove the works as well, 0 to stop their runs only
-- ARGV[2..]    work ids; none means every work of the app
-- Returns the number of the given works that exist.

-- include: work_boot (defines `now`; forgets works that did not survive a restart)

local cancel = ARGV[1] == '1'
local ids = {}
if #ARGV > 1 then
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('HKEYS', KEYS[1])
  if cancel then redis.call('DEL', KEYS[4]) end
end
local found = 0
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', KEYS[1], id)
  if raw then
    found = found + 1
    local rec = cjson.decode(raw)
    if rec['s'] == 'running' then redis.call('SADD', KEYS[6], id .. ':' .. rec['g']) end
    if cancel then
      redis.call('HDEL', KEYS[1], id)
      redis.call('ZREM', KEYS[2], id)
      redis.call('ZREM', KEYS[3], id)
      redis.call('HDEL', KEYS[4], id)
    end
  end
end
return found
