-- Claim the due requests of one requirement profile in a batch of scopes, for dispatch.
-- Each claimed request gets a new generation (request id), the worker class whose queue
-- beat publishes it to, and a lease: if it has not started by then (its message was never
-- published, or lost), beat's sweep sends it again. A request no live worker class has the
-- handler for is parked instead, until one arrives (unpark.lua).
--
-- KEYS[1]       due:<profile>
-- KEYS[2]       leases
-- KEYS[3]       seq (generation counter)
-- KEYS[4]       counts
-- KEYS[5]       parked
-- KEYS[6]       deadletter
-- KEYS[7..]     req:<scope>, sched:<profile>:<scope> of each scope, in ARGV order
-- ARGV[1]       profile
-- ARGV[2]       horizon, ms: claim what is due by then (beat's dispatch window)
-- ARGV[3]       lease, ms past the later of now and the request's date
-- ARGV[4]       most requests to claim (the rest wait for beat's next pass)
-- ARGV[5]       n, the number of scopes; ARGV[6..5+n] the scopes
-- ARGV[6+n..]   routes: identifier, then the live classes with its handler that serve the
--               profile (space-separated), for each identifier with any
-- Returns a flat list, six values per claimed request: scope, identifier, generation,
-- class, earliest-begin ms, ms it has been due since (max(e, t): when it became pending).
-- Foreign data met (a record that is not a request's, a key of the wrong type, a counter
-- that is not a number) is moved to the dead letter first, before any other write.

-- include: deadletter
-- include: requests

local DUE, LEASES, SEQ, COUNTS, PARKED, DL = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local profile, horizon, lease = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local most, n = tonumber(ARGV[4]), tonumber(ARGV[5])
local routes = {}
for a = 6 + n, #ARGV, 2 do
  local classes = {}
  for class in string.gmatch(ARGV[a + 1], '%S+') do classes[#classes + 1] = class end
  routes[ARGV[a]] = classes
end

-- Make every key and counter sound before the first real write.
local wanted = {[DUE] = 'zset', [LEASES] = 'zset', [SEQ] = 'string', [COUNTS] = 'hash',
                [PARKED] = 'zset'}
for i = 1, n do wanted[KEYS[5 + 2 * i]] = 'hash' end
for key, kind in pairs(wanted) do dead_letter_key(DL, key, kind, 'claim met a key') end
for i = 1, n do
  sound_schedule(DL, KEYS[5 + 2 * i], KEYS[6 + 2 * i], DUE, ARGV[5 + i], profile, 'claim met a key')
end
local seq = redis.call('GET', SEQ)
if seq and not string.match(seq, '^%d+$') then
  -- Generations must never repeat: start again above any counter this app can have reached.
  redis.call('SET', SEQ, now)
  dead_letter(DL, SEQ, 'generation counter is not a number; restarted above it', seq)
end
local fields = {}
for kind in pairs(REQUEST_KINDS) do
  for _, place in ipairs({profile, 'parked', 'dispatched'}) do
    fields[#fields + 1] = kind .. ':' .. place
  end
end
fix_counters(DL, COUNTS, fields, nil)

-- The pending record of a scheduled identifier, or nil: a schedule entry naming no record,
-- or a record that is not a pending request's of this profile, is dropped and kept in the
-- dead letter.
local function pending_record(req, sched, id)
  local raw = string.sub(id, 1, 1) ~= '#' and redis.call('HGET', req, id)  -- '#': counters
  local rec, why = nil, 'schedule entry names no request record'
  if raw then rec, why = request_record(raw) end
  if rec and (rec['s'] ~= 'pending' or rec['r'] ~= profile) then
    why = 'schedule entry of a request not pending in profile ' .. profile .. ' (' .. rec['s']
      .. ' in profile ' .. rec['r'] .. ')'
    rec = nil
  elseif raw and not rec then
    redis.call('HDEL', req, id)  -- not a request's: it counted for nothing, or recount
    recount(req)
  end
  if not rec then
    redis.call('ZREM', sched, id)
    dead_letter(DL, sched .. ' ' .. id, why, raw or id)
  end
  return rec
end

local out, claimed = {}, 0
for i = 1, n do
  local scope, req, sched = ARGV[5 + i], KEYS[5 + 2 * i], KEYS[6 + 2 * i]
  local due = redis.call('ZRANGEBYSCORE', sched, '-inf', horizon, 'LIMIT', 0, most - claimed)
  for _, id in ipairs(due) do
    local rec = pending_record(req, sched, id)
    if rec then
      redis.call('ZREM', sched, id)
      count(COUNTS, rec, profile, -1)
      local classes = routes[id]
      if not classes then
        rec['s'] = 'parked'
        redis.call('ZADD', PARKED, rec['e'], profile .. '\31' .. scope .. '\31' .. id)
      else
        rec['s'], rec['g'] = 'dispatched', redis.call('INCR', SEQ)
        rec['q'] = classes[rec['g'] % #classes + 1]
        local date = rec['x'] and 0 or rec['e']  -- x: a simulated launch waived the date
        redis.call('ZADD', LEASES, math.max(date, now) + lease, scope .. '\31' .. id)
        local since = math.max(date, rec['t'] or 0)
        for _, value in ipairs({scope, id, rec['g'], rec['q'], date, since}) do
          out[#out + 1] = value
        end
        claimed = claimed + 1
      end
      count(COUNTS, rec, rec['s'], 1)
      redis.call('HSET', req, id, cjson.encode(rec))
    end
  end
  reindex(DUE, sched, scope)
  if claimed >= most then break end
end
return out
