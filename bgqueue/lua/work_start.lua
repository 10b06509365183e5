-- startWork: add a work to the app's works, waiting from now for a worker that matches it.
-- Refused, writing nothing, if the id is taken or the app has its maximum of works.
--
-- KEYS[1..7]  the app's work keys, AppKeys.work_all: works, work:due, work:leases,
--              work:last, work:boot, work:stop, work:seq
-- ARGV[1]      work id
-- ARGV[2]      record JSON (state 'waiting', no runs yet; see works.py)
-- ARGV[3]      maximum works of the app
-- Returns 'ok', 'exists' or 'full'.

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

local id = ARGV[1]
if redis.call('HEXISTS', KEYS[1], id) == 1 then return 'exists' end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 'full' end
redis.call('HSET', KEYS[1], id, ARGV[2])
redis.call('ZADD', KEYS[2], now, id)
redis.call('HDEL', KEYS[4], id)  -- the last run of an earlier work with this id
return 'ok'
