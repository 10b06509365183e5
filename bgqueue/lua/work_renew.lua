-- A running work's watchdog proves the run alive and collects a stop_work request.
--
-- KEYS[1..7]  the app's work keys, AppKeys.work_all: works, work:due, work:leases,
--              work:last, work:boot, work:stop, work:seq
-- ARGV[1]      work id
-- ARGV[2]      generation of the run
-- ARGV[3]      run lease, ms
-- Returns {alive, stop}: alive 0 if the run was given up as lost or its work removed;
-- stop 1 if stop_work asked this run to stop (collected once).

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
local stop = redis.call('SREM', KEYS[6], id .. ':' .. ARGV[2])
local raw = redis.call('HGET', KEYS[1], id)
local rec = raw and cjson.decode(raw)
if not rec or rec['s'] ~= 'running' or tostring(rec['g']) ~= ARGV[2] then return {0, stop} end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), id)
return {1, stop}
