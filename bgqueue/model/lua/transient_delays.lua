-- The transient-delay ledger of one scope (HarmonyOS requestSuspendDelay): grant, cancel
-- and settle suspend delays against the scope's rolling 24-hour quota, and read what is
-- left. One script for every operation (as dramatiq's dispatch.lua), so the charging rule
-- is written once and two workers racing for the last seconds of a quota cannot both win.
--
-- What each key holds:
--   KEYS[1] DELAYS   transient:delays:<scope>  HASH request id -> JSON {g: run generation
--                    (string), s: granted ms, e: ends ms, r: reason}: every delay of the
--                    scope's runs not yet cancelled or settled, live or run out
--   KEYS[2] RUNS     transient:runs:<scope>    HASH generation -> JSON {b: base deadline ms}
--                    of each run holding delays, and the mark '#t' -> ms up to which the
--                    scope has been charged (present while some run holds delays)
--   KEYS[3] LEDGER   transient:ledger:<scope>  ZSET "<ms>:<charged ms>" scored by the ms it
--                    was charged: what the scope paid, the last 24 hours of it
--   KEYS[4] RUNNING  running                   HASH generation -> running record (read only:
--                    a run missing from it has ended)
--   KEYS[5] SEQ      transient:seq             STRING request id counter (per app)
--   KEYS[6] SCOPES   transient:scopes          ZSET scope -> ms of its latest grant: the
--                    index of scopes with delays or charges (`bgqueue status` and metrics
--                    read it); trimmed of entries over 2 days old, gone 2 days after the
--                    app's last grant
-- The scope's three keys expire a day after their last write: a scope that stops using
-- delays leaves nothing behind.
--
-- What is charged. A run's delays keep it alive until the latest of their ends: it *holds*
-- the span from its base deadline b (start + budget, or last progress + stall window) to
-- that end. The quota pays for the union of the holds of the scope's runs: time several
-- runs hold at once is charged once, as HarmonyOS counts the time an app's transient tasks
-- hold together. The union is charged to the ledger up to the mark; what the runs hold
-- after now is reserved. Quota left = quota - the ledger's last 24 hours - the union of
-- what is reserved. A grant reserves at most how far it moves its run's deadline past the
-- holds already reserved (never more than the quota left); a cancel, or the run's end,
-- charges up to now and drops the rest of its reservation. A run missing from RUNNING
-- ended without settling (its worker died): it is charged up to now and released by the
-- next operation on its scope.
--
-- The clocks. Only Redis's clock charges. The worker (bgqueue/transient/delays.py) sends
-- durations, never times of its own clock: how far its run's base deadline is from now.
-- It times its deadline and the delays' callbacks on its own monotonic clock, from before
-- it asked, so that its deadline never outlasts what Redis reserved.
--
-- ARGV[1] is the operation, then its arguments (times in ms):
--   grant   generation, ms to the run's base deadline (negative if past), max concurrent,
--           max delay ms, daily quota ms, reason, scope name
--           -> {'ok', request id, actual delay ms} | {'gone'} (run not running)
--             | {'limit', live delays} | {'quota', 0}; a refusal writes nothing
--   cancel  generation, ms to the run's base deadline, request id
--           -> 1, or 0 if the run holds no such delay
--   settle  generation -> ms charged to the scope by this call (its delays are released)
--   info    daily quota ms -> {quota left ms, request id, ms left, ...} for live delays
--
-- Each operation goes in passes, each doing one thing: read the scope (`load`), decide
-- from what was read (a refusal returns here, having written nothing), settle up to now
-- (`housekeep`: charge from the mark, release lost runs, forget charges over a day old),
-- then write its own change.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local DAY = 86400000
local DELAYS, RUNS, LEDGER = KEYS[1], KEYS[2], KEYS[3]
local RUNNING, SEQ, SCOPES = KEYS[4], KEYS[5], KEYS[6]
local MARK = '#t'

-- Pass 1, read. The scope's runs holding delays, by generation: the run record, its delays
-- (id -> end), the latest end, how many have not ended, and whether it ended unsettled.
local function load()
  local all = {}
  local flat = redis.call('HGETALL', RUNS)
  for i = 1, #flat, 2 do
    if flat[i] ~= MARK then
      all[flat[i]] = {rec = cjson.decode(flat[i + 1]), delays = {}, last = 0, live = 0,
                      lost = redis.call('HEXISTS', RUNNING, flat[i]) == 0}
    end
  end
  flat = redis.call('HGETALL', DELAYS)
  for i = 1, #flat, 2 do
    local d = cjson.decode(flat[i + 1])
    local run = all[d['g']]
    if run then
      run.delays[flat[i]] = d['e']
      run.last = math.max(run.last, d['e'])
      if d['e'] > now then run.live = run.live + 1 end
    end
  end
  return all
end

-- The measure of the union of the runs' holds inside [from, to] (lost runs hold nothing
-- after now).
local function union(all, from, to)
  local spans = {}
  for _, run in pairs(all) do
    local last = run.lost and math.min(run.last, now) or run.last
    local a, b = math.max(from, run.rec['b']), math.min(to, last)
    if b > a then spans[#spans + 1] = {a, b} end
  end
  table.sort(spans, function(x, y) return x[1] < y[1] end)
  local total, reach = 0, from
  for _, span in ipairs(spans) do
    local a, b = math.max(span[1], reach), span[2]
    if b > a then total, reach = total + b - a, b end
  end
  return total
end

-- Live delays of the runs still running (what max concurrent limits).
local function live_delays(all)
  local live = 0
  for _, run in pairs(all) do
    if not run.lost then live = live + run.live end
  end
  return live
end

-- Quota left for new grants: the quota less the ledger's last 24 hours less the union of
-- what the runs hold from now on.
local function left(all, quota)
  local spent = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', LEDGER, '(' .. (now - DAY), '+inf')) do
    spent = spent + tonumber(string.match(m, ':(%d+)$'))
  end
  return math.max(0, quota - spent - union(all, now, math.huge))
end

local function touch(key)
  if redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, DAY) end
end

-- Charge the union of the holds from the scope's mark to now (the mark moves in housekeep).
local function charge(all)
  local mark = tonumber(redis.call('HGET', RUNS, MARK)) or now
  local amount = union(all, mark, now)
  if amount > 0 then
    redis.call('ZADD', LEDGER, now, string.format('%d:%d', now, amount))
    touch(LEDGER)
  end
  return amount
end

-- Forget a run's delays and its record.
local function release(gen, run, all)
  for id in pairs(run.delays) do redis.call('HDEL', DELAYS, id) end
  redis.call('HDEL', RUNS, gen)
  all[gen] = nil
end

-- Forget a run that is done holding delays; the mark goes with the scope's last run.
local function release_done(gen, run, all)
  release(gen, run, all)
  if not next(all) then redis.call('HDEL', RUNS, MARK) end
end

-- Pass 3, settle up to now: charge up to now, release the runs that ended unsettled,
-- forget charges older than 24 hours. Returns what it charged.
local function housekeep(all)
  local charged = charge(all)
  for gen, run in pairs(all) do
    if run.lost then release(gen, run, all) end
  end
  if next(all) then
    redis.call('HSET', RUNS, MARK, now)
  else
    redis.call('HDEL', RUNS, MARK)
  end
  redis.call('ZREMRANGEBYSCORE', LEDGER, '-inf', now - DAY)
  return charged
end

-- Write a granted delay: its run's new base deadline, the mark if the scope had none, and
-- the delay under a new request id.
local function reserve(gen, run, base, actual, reason)
  run.rec['b'] = base
  redis.call('HSET', RUNS, gen, cjson.encode(run.rec))
  redis.call('HSETNX', RUNS, MARK, now)
  local id = redis.call('INCR', SEQ)
  redis.call('HSET', DELAYS, id, cjson.encode({g = gen, s = now, e = now + actual, r = reason}))
  touch(RUNS)
  touch(DELAYS)
  return id
end

-- A scope's charges fall out of the ledger a day after its last grant at the latest (a
-- delay lasts at most the max delay): two days keeps every scope that has any.
local function index_scope(scope)
  redis.call('ZADD', SCOPES, now, scope)
  redis.call('ZREMRANGEBYSCORE', SCOPES, '-inf', now - 2 * DAY)
  redis.call('PEXPIRE', SCOPES, 2 * DAY)
end

-- -- the operations ------------------------------------------------------------------

local function grant(gen, to_base, max_live, max_delay, quota, reason, scope)
  if redis.call('HEXISTS', RUNNING, gen) == 0 then return {'gone'} end
  local all = load()
  -- Decide from the scope as read, before the time since the mark is charged.
  local live = live_delays(all)
  if live >= max_live then return {'limit', live} end
  local available = left(all, quota)
  if available <= 0 then return {'quota', 0} end
  -- Time up to the run's current deadline costs nothing: only the extension is reserved.
  local base = now + to_base
  local run = all[gen] or {rec = {b = base}, delays = {}, last = 0}
  local deadline = math.max(base, run.last, now)
  local actual = math.min(max_delay, deadline - now + available)
  housekeep(all)
  local id = reserve(gen, run, base, actual, reason)
  index_scope(scope)
  return {'ok', id, actual}
end

local function cancel(gen, to_base, id)
  local raw = redis.call('HGET', DELAYS, id)
  if not raw or cjson.decode(raw)['g'] ~= gen then return 0 end
  local all = load()
  local run = all[gen]
  housekeep(all)  -- charged up to now with the delay still counted
  redis.call('HDEL', DELAYS, id)
  if not run or not all[gen] then return 1 end  -- its run record is gone: nothing to charge
  -- From now on it holds nothing; the run's deadline falls back to its base.
  run.rec['b'] = now + to_base
  run.delays[id] = nil
  if next(run.delays) == nil then
    release_done(gen, run, all)
  else
    redis.call('HSET', RUNS, gen, cjson.encode(run.rec))
  end
  return 1
end

local function settle(gen)
  local all = load()
  local charged = housekeep(all)
  if all[gen] then release_done(gen, all[gen], all) end
  return charged
end

local function info(quota)
  local all = load()
  housekeep(all)
  local out = {left(all, quota)}
  for _, run in pairs(all) do
    for id, ends in pairs(run.delays) do
      if ends > now then
        out[#out + 1] = id
        out[#out + 1] = ends - now
      end
    end
  end
  return out
end

local op = ARGV[1]
if op == 'grant' then
  return grant(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
               tonumber(ARGV[6]), ARGV[7], ARGV[8])
end
if op == 'cancel' then return cancel(ARGV[2], tonumber(ARGV[3]), ARGV[4]) end
if op == 'settle' then return settle(ARGV[2]) end
if op == 'info' then return info(tonumber(ARGV[2])) end
return redis.error_reply('transient_delays.lua: unknown operation ' .. tostring(op))
