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
--
-- Two phases: everything is read first (each read also proves its key's type: deadletter
-- include, `read`), foreign keys are moved aside, then everything is written, each key
-- once: the records of a scope in one HSET, the counters in one HSET from the values read.
-- A schedule entry that names no pending request of this profile is dropped into the dead
-- letter (and a record that is not a request's with it).

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

-- 1. Read: each scope's due identifiers and their records.
local function due_entries(scope)
  scope.ids = read('zset', 'ZRANGEBYSCORE', scope.sched, '-inf', horizon, 'LIMIT', 0, scope.most)
  scope.raws = {}
  if scope.ids and #scope.ids > 0 then
    scope.raws = read('hash', 'HMGET', scope.req, unpack(scope.ids)) or {}
  end
end

probe('zset', DUE)
probe('zset', LEASES)
probe('zset', PARKED)
local seq = read('string', 'GET', SEQ)
local scopes, seen = {}, 0
for i = 1, n do
  local scope = {name = ARGV[5 + i], req = KEYS[5 + 2 * i], sched = KEYS[6 + 2 * i]}
  scope.most = most - seen
  due_entries(scope)
  seen = seen + #(scope.ids or {})
  scopes[i] = scope
  if seen >= most then break end
end
move_foreign(DL, 'claim met a key')
for _, scope in ipairs(scopes) do
  if not scope.ids then  -- its schedule was not a schedule: moved aside, rebuilt, read again
    rebuild_schedule(scope.req, scope.sched, DUE, scope.name, profile)
    due_entries(scope)
    move_foreign(DL, 'claim met a key')
  end
end
-- Generations must never repeat: a counter that was not one starts again above any value
-- this app can have reached (one of another type was moved aside above).
if seq == nil or (seq and not string.match(seq, '^%d+$')) then
  redis.call('SET', SEQ, now)
  if seq then dead_letter(DL, SEQ, 'generation counter is not a number; restarted above it', seq) end
end

-- 2. Decide, per entry: dispatch, park, or drop (not a pending request of this profile).
local deltas, dispatching = {}, 0
local function tally(field, by) deltas[field] = (deltas[field] or 0) + by end
for _, scope in ipairs(scopes) do
  scope.recs = {}
  for j, id in ipairs(scope.ids) do
    local raw = string.sub(id, 1, 1) ~= '#' and scope.raws[j]  -- '#': counters
    local rec, why = nil, 'schedule entry names no request record'
    if raw then rec, why = request_record(raw) end
    local delete = raw and not rec  -- not a request's: it counted for nothing, or recount
    if rec and (rec['s'] ~= 'pending' or rec['r'] ~= profile) then
      why = 'schedule entry of a request not pending in profile ' .. profile .. ' (' .. rec['s']
        .. ' in profile ' .. rec['r'] .. ')'
      rec = nil  -- the record stays: only the entry was wrong
    end
    scope.recs[j] = rec or {drop = why, raw = raw, delete = delete}
    if rec then
      rec['s'] = routes[id] and 'dispatched' or 'parked'
      if routes[id] then dispatching = dispatching + 1 end
      tally(rec['k'] .. ':' .. profile, -1)
      tally(rec['k'] .. ':' .. rec['s'], 1)
    end
  end
end
local fields = {}
for field in pairs(deltas) do fields[#fields + 1] = field end
local counted = #fields > 0 and read('hash', 'HMGET', COUNTS, unpack(fields)) or {}
move_foreign(DL, 'claim met a key')

-- 3. Write.
local gen = 0
if dispatching > 0 then gen = redis.call('INCRBY', SEQ, dispatching) - dispatching end
local out, leases, parked = {}, {}, {}
for _, scope in ipairs(scopes) do
  local records, dropped = {}, {}
  for j, id in ipairs(scope.ids) do
    local rec = scope.recs[j]
    if rec.drop then
      if rec.delete then
        redis.call('HDEL', scope.req, id)
        recount(scope.req)
      end
      dead_letter(DL, scope.sched .. ' ' .. id, rec.drop, rec.raw or id)
    elseif rec['s'] == 'parked' then
      parked[#parked + 1] = rec['e']
      parked[#parked + 1] = profile .. '\31' .. scope.name .. '\31' .. id
    else
      gen = gen + 1
      local classes = routes[id]
      rec['g'], rec['q'] = gen, classes[gen % #classes + 1]
      local date = rec['x'] and 0 or rec['e']  -- x: a simulated launch waived the date
      leases[#leases + 1] = math.max(date, now) + lease
      leases[#leases + 1] = scope.name .. '\31' .. id
      for _, value in ipairs({scope.name, id, gen, rec['q'], date, math.max(date, rec['t'] or 0)}) do
        out[#out + 1] = value
      end
    end
    if not rec.drop then
      records[#records + 1] = id
      records[#records + 1] = cjson.encode(rec)
    end
  end
  if #scope.ids > 0 then redis.call('ZREM', scope.sched, unpack(scope.ids)) end
  reindex(DUE, scope.sched, scope.name)  -- also drops an index entry with nothing behind it
  if #records > 0 then redis.call('HSET', scope.req, unpack(records)) end
end
if #leases > 0 then redis.call('ZADD', LEASES, unpack(leases)) end
if #parked > 0 then redis.call('ZADD', PARKED, unpack(parked)) end
local set, zero = {}, {}
for i, field in ipairs(fields) do
  local value = counter_value(DL, COUNTS, field, counted[i]) + deltas[field]
  if value > 0 then
    set[#set + 1], set[#set + 2] = field, value
  else
    zero[#zero + 1] = field
  end
end
if #set > 0 then redis.call('HSET', COUNTS, unpack(set)) end
if #zero > 0 then redis.call('HDEL', COUNTS, unpack(zero)) end
return out
