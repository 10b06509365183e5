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
local raw = redis.call('HGET', KEYS[1], id)
if not raw then return false end
local rec = cjson.decode(raw)
if rec['s'] ~= 'dispatched' or tostring(rec['g']) ~= ARGV[2] then return false end
rec['s'], rec['w'], rec['sa'] = 'running', ARGV[3], now
raw = cjson.encode(rec)
redis.call('HSET', KEYS[1], id, raw)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), id)
return raw
