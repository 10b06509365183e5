-- A run ends on its worker.
--   done:    the run returned, reached its run limit or was stopped: it counts. It becomes
--            the work's last run; the work waits for its next cycle (start + repeat cycle)
--            or, with no runs left (one-shot, or repeat_count reached), is removed.
--   release: the worker's conditions no longer match the work: back to waiting, due now,
--            nothing counted.
--
-- KEYS[1..7]  the app's work keys, AppKeys.work_all: works, work:due, work:leases,
--              work:last, work:boot, work:stop, work:seq
-- ARGV[1]      work id
-- ARGV[2]      generation of the run
-- ARGV[3]      'done' or 'release'
-- ARGV[4]      1 if the run reached its run limit (isLastWorkTimeOut), else 0
-- ARGV[5]      reason (free text, may be empty)
-- Returns 1, or 0 if the run was no longer current (given up as lost, or work removed).

-- include: work_boot (defines `now`; forgets works that did not survive a restart)

local id, gen = ARGV[1], ARGV[2]
redis.call('SREM', KEYS[6], id .. ':' .. gen)
local raw = redis.call('HGET', KEYS[1], id)
if not raw then return 0 end
local rec = cjson.decode(raw)
if rec['s'] ~= 'running' or tostring(rec['g']) ~= gen then return 0 end
redis.call('ZREM', KEYS[3], id)
local started, worker = rec['sa'], rec['w']
rec['s'], rec['g'], rec['w'], rec['sa'] = 'waiting', nil, nil, nil
if ARGV[3] == 'release' then
  redis.call('HSET', KEYS[1], id, cjson.encode(rec))
  redis.call('ZADD', KEYS[2], now, id)
  return 1
end
rec['n'], rec['a'] = rec['n'] + 1, 0
redis.call('HSET', KEYS[4], id, cjson.encode({
  to = ARGV[4] == '1', sa = started, fa = now, w = worker, n = rec['n'], p = rec['p'],
  why = ARGV[5]}))
if rec['cnt'] > 0 and rec['n'] >= rec['cnt'] then
  redis.call('HDEL', KEYS[1], id)
  return 1
end
redis.call('HSET', KEYS[1], id, cjson.encode(rec))
redis.call('ZADD', KEYS[2], math.max(started + rec['cy'], now), id)
return 1
