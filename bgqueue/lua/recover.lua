-- Give up a run whose lease lapsed (its worker or pool process died): record the attempt
-- as failed and put the request back to pending, unless a newer request with the same
-- identifier is already waiting or the attempts are used up. A requeued run does not count
-- against the scope's pending limit (it was accepted once already): it waits as 'retrying',
-- so a scope may hold one pending refresh and one retrying (docs/architecture.md).
--
-- KEYS[1]  running
-- KEYS[2]  runleases
-- KEYS[3]  expire
-- KEYS[4]  deadletter
-- KEYS[5]  history:<scope>         (absent when beat could not read the running record:
-- KEYS[6]  req:<scope>              the record is then dead-lettered and the run dropped)
-- KEYS[7]  sched:<profile>:<scope>
-- KEYS[8]  due:<profile>
-- KEYS[9]  counts
-- ARGV[1]  generation
-- ARGV[2]  maximum attempts
-- ARGV[3], [4]  history: length cap, retention ms
-- Returns 0 if the lease is live (nothing done), 1 requeued, 2 dropped.

-- include: deadletter
-- include: requests
-- include: history

local RUNNING, RUNLEASES, EXPIRE, DL = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local HISTORY, REQ, SCHED, DUE, COUNTS = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local gen = ARGV[1]
local wanted = {[RUNNING] = 'hash', [RUNLEASES] = 'zset', [EXPIRE] = 'set'}
if HISTORY then
  wanted[HISTORY], wanted[REQ], wanted[DUE], wanted[COUNTS] = 'list', 'hash', 'zset', 'hash'
end
for key, kind in pairs(wanted) do dead_letter_key(DL, key, kind, 'recover met a key') end

local score = redis.call('ZSCORE', RUNLEASES, gen)
if not score or tonumber(score) > now then return 0 end
local raw = redis.call('HGET', RUNNING, gen)
local ok, rec = pcall(cjson.decode, raw or 'null')
local sound = ok and type(rec) == 'table' and type(rec['i']) == 'string'
  and type(rec['sc']) == 'string' and whole(rec['r']) and whole(rec['e'])
  and whole(rec['a']) and REQUEST_KINDS[rec['k']]
if raw and (not sound or not HISTORY) then
  dead_letter(DL, RUNNING .. ' ' .. gen, 'running record unreadable; its run was dropped', raw)
end
redis.call('ZREM', RUNLEASES, gen)
redis.call('SREM', EXPIRE, gen)
redis.call('HDEL', RUNNING, gen)
if not raw or not sound or not HISTORY then return 2 end

local id, scope = rec['i'], rec['sc']
sound_schedule(DL, REQ, SCHED, DUE, scope, rec['r'], 'recover met a key')
remember(HISTORY, {
  i = id, sc = scope, k = rec['k'], s = 'failed', ok = false, sa = rec['sa'], fa = now,
  w = rec['w'], g = rec['g'], a = rec['a'], why = 'worker lost (heartbeat lapsed)'},
  ARGV[3], ARGV[4])
local newer = redis.call('HGET', REQ, id)
if newer and not request_record(newer) then  -- not a request's: it does not stop the requeue
  redis.call('HDEL', REQ, id)
  recount(REQ)
  dead_letter(DL, REQ .. ' ' .. id, 'record of no request; replaced by a requeued run', newer)
  newer = nil
end
if rec['a'] + 1 >= tonumber(ARGV[2]) or newer then
  return 2
end
fix_counters(DL, COUNTS, {rec['k'] .. ':' .. rec['r']}, nil)
local pending = {k = rec['k'], s = 'pending', r = rec['r'], e = rec['e'], a = rec['a'] + 1,
                 pl = rec['pl'], t = now, ti = rec['ti'], su = rec['su'], sg = rec['sg'],
                 x = rec['x'], tp = rec['tp']}  -- tp: the producer's span (bgqueue/tracing.py)
redis.call('HSET', REQ, id, cjson.encode(pending))
schedule(DUE, SCHED, scope, id, rec['x'] and 0 or rec['e'])  -- x: launched by simulation
count(COUNTS, pending, rec['r'], 1)
return 1
