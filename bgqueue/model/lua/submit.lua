-- Submit a batch of requests of one scope, replacing any not-yet-started request with the
-- same identifier. All or nothing: everything that can refuse the batch (the pending
-- limits, a free slot for a continued-processing request that must start now, a key of
-- the wrong type) is checked before the first write.
--
-- Only the keys the batch needs are passed (most submits touch one profile): those of the
-- places its requests go to and of the places of the requests they replace, the dead
-- letter if it is written to, and what free slots are counted from if a request must start
-- now. The caller cannot know all of that, so when the script needs a key that was not
-- passed, it answers {'places', names} before any write, and the caller calls again with
-- those places too.
--
-- KEYS[1]       req:<scope>: records by identifier, and the scope's limit counters
-- KEYS[2]       counts
-- KEYS[3..]     the keys of each place ARGV[6] names, in its order:
--                 a profile p   due:<p>, sched:<p>:<scope>
--                 parked        parked (a replaced parked request leaves it)
--                 dispatched    leases (a replaced dispatched request leaves it)
--                 deadletter    deadletter (a foreign record or counter goes there)
--                 slots         workers, alive, running, classes, leases: read only, to find
--                               free slots for the continued-processing requests with
--                               strategy FAIL, which must start now
--                 now           routes, classlive, seq, leases, and the app's two CPU
--                               efficiency keys (efficiency.cpu_keys): to dispatch a
--                               request due now from here (pass 4; one request only)
-- ARGV[1], [2]  max pending refresh, processing requests per scope
-- ARGV[3]       scope
-- ARGV[4], [5]  beat's wake channel and the app id to publish there once accepted
-- ARGV[6]       the places whose keys are passed, space-separated
-- ARGV[7..10]   with the place 'now' only: the run message's task id (a UUID), the
--               request's requirement names as JSON and as Python's repr, the dispatch
--               lease (ms); the requests then start at ARGV[11]
-- ARGV[7..]     two values per request: identifier, record JSON as requests.py writes it:
--               it starts {"k":kind,"s":"pending","r":profile,"e":earliest-begin ms, which
--               the script reads there; a FAIL strategy holds ,"sg":"fail" (text that
--               cannot occur inside a JSON string, where every quote is escaped)
-- Returns how many stored requests it replaced, or why it wrote nothing: {'limit', index
-- (0-based, in the batch), class}, {'busy', profile, free slots}, {'places', names} (see
-- above), or {'foreign', key, type} when a key it would write holds another type.
-- A stored record that is not a request's is dead-lettered and replaced. A counter that is
-- not an integer is repaired first (see fix_counters), and the repair stands even if the
-- batch is then refused. A request given twice in the batch is the later one. A record
-- whose earliest-begin date has passed gains t, when it became pending (ms): beat's
-- dispatch lateness counts from max(e, t).
--
-- A request dispatched here goes on its worker class's queue, a list of kombu's that is
-- not among KEYS (its name is chosen here); like Celery's own queues it needs a Redis that
-- is not a cluster.
--
-- A submit is meant to cost little more than its round trip, so: every key's type is
-- proven by a read the script makes anyway or a cheap one (through redis.pcall: a key of
-- another type is an answer, not a failure), or by being the first write (a command that
-- fails changes nothing); TYPE is called only to name a foreign key's type; counters are
-- written as the values read plus the change, in HSETs; numbers go to Redis as the text
-- they came in where they can (Lua formats a number with printf); tables are made only
-- where there is something to put in them.

-- include: deadletter
-- include: requests
-- include: slots
-- include: message

local REQ, COUNTS = KEYS[1], KEYS[2]
local argv = ARGV  -- a local: read once per request field
local scope = argv[3]
local HEAD = '^{"k":"([%w_]+)","s":"pending","r":(%d+),"e":(%d+)'  -- kind, profile, date

local function foreign(key)
  return {'foreign', key, redis.call('TYPE', key)['ok']}
end

-- A command through redis.pcall: its reply, or nil if the key holds another type.
local function attempt(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply['err'] then
    if string.sub(reply['err'], 1, 9) == 'WRONGTYPE' then return nil end
    error(reply)
  end
  return reply
end

-- Calls with many arguments go in chunks: Lua's unpack has a stack limit. The first chunk
-- is a probe (nil if the key holds another type); later ones cannot fail on the type.
local CHUNK = 1000
local function in_chunks(command, key, args, width)
  local size = CHUNK * width
  if #args <= size then return attempt(command, key, unpack(args)) end
  local out = {}
  for first = 1, #args, size do
    local reply = attempt(command, key, unpack(args, first, math.min(first + size - 1, #args)))
    if not reply then return nil end
    if type(reply) == 'table' then
      for _, value in ipairs(reply) do out[#out + 1] = value end
    end
  end
  return out
end

-- The keys passed: the index in KEYS of each place's first key (see the header).
local at = {}
if tonumber(argv[6]) then  -- one profile, as most submits
  at[tonumber(argv[6])] = 3
else
  local n = 3
  for place in string.gmatch(argv[6], '%S+') do
    local p = tonumber(place)
    at[p or place] = n
    n = n + ((p and 2) or (place == 'slots' and 5) or (place == 'now' and 6) or 1)
  end
end
local FIRST = at['now'] and 11 or 7  -- ARGV index of the first request
local function due(p) return KEYS[at[p]] end
local function sched(p) return KEYS[at[p] + 1] end
local function key(place) return at[place] and KEYS[at[place]] end

-- Places whose keys are missing, by name (and in a list), asked for once each.
local wanted
local function need(place)
  if not at[place] then
    local name = tostring(place)
    wanted = wanted or {}
    if not wanted[name] then wanted[#wanted + 1], wanted[name] = name, true end
  end
end
local NONE = {}  -- for `pairs(old or NONE)`: `old` is made only when there is one

-- 1. The batch: the last request given for each identifier (its ARGV index), in batch
-- order; `fields`: the scope's limit counters and those identifiers, to read.
local last, order, fields = {}, {}, {'#refresh', '#processing'}
for a = FIRST, #argv, 2 do last[argv[a]] = a end
for a = FIRST, #argv, 2 do
  if last[argv[a]] == a then order[#order + 1], fields[#fields + 1] = a, argv[a] end
end

-- 2. What is stored under those identifiers, and the scope's limit counters: one HMGET,
-- which also proves req a hash (or nothing). `old`: the requests replaced; `strays`:
-- records that are not a request's.
local found = in_chunks('HMGET', REQ, fields, 1)
if not found then return foreign(REQ) end
local old, strays
for n = 3, #fields do
  if found[n] then
    local rec, why = request_record(found[n])
    if rec then
      old = old or {}
      old[fields[n]] = rec
      need(rec['s'] == 'pending' and rec['r'] or rec['s'])
    else
      strays = strays or {}
      strays[#strays + 1] = {fields[n], why, found[n]}
      need('deadletter')
    end
  end
end

-- 3. What the batch adds: records (with t where due already), schedule entries and the
-- earliest date by profile (`first`: one of them; `earliest` as given, `lowest` as a
-- number), requests by limit class less those replaced (`grows`), the changes to the app's
-- counts (`change`, by field), and who must start now (`starts`).
local records, entries, earliest, lowest, first, starts = {}, {}, {}, {}, nil, nil
local grows, change = {refresh = 0, processing = 0}, {}
local stamp = ',"t":' .. now .. '}'
-- Of the previous record: a batch often repeats one (same kind, date and payload for many
-- identifiers), which is then read once.
local given, stored, begin, score, p, field, class, fail
for _, a in ipairs(order) do
  local id, rec = argv[a], argv[a + 1]
  if rec ~= given then
    local k, r
    k, r, begin = string.match(rec, HEAD)
    p, score, field, class = tonumber(r), tonumber(begin), k .. ':' .. r, class_of(k)
    fail = k == 'continued_processing' and string.find(rec, ',"sg":"fail"', 1, true) ~= nil
    given, stored = rec, rec
    if score < now then stored = string.sub(rec, 1, -2) .. stamp end
  end
  if fail then
    starts = starts or {}
    starts[#starts + 1] = {p, id}
    need('slots')
  end
  local n = #records
  records[n + 1], records[n + 2] = id, stored
  local list = entries[p]
  if list then
    list[#list + 1], list[#list + 2] = begin, id
    if score < lowest[p] then earliest[p], lowest[p] = begin, score end
  else
    entries[p], earliest[p], lowest[p], first = {begin, id}, begin, score, first or p
    need(p)
  end
  if old and old[id] then old[id]['to'] = p end  -- the profile its replacement goes to
  change[field] = (change[field] or 0) + 1
  grows[class] = grows[class] + 1
end
if wanted then return {'places', table.concat(wanted, ' ')} end
for _, o in pairs(old or NONE) do
  local f = o['k'] .. ':' .. place_of(o)
  change[f] = (change[f] or 0) - 1
  if limited(o) then grows[class_of(o['k'])] = grows[class_of(o['k'])] - 1 end
end

-- 4. A single request due now is dispatched here, as beat's claim.lua would (a generation,
-- a worker class, a dispatch lease), when beat's `routes` name a live class with its
-- handler and nothing else of its profile is due ahead of it (beat serves those in date
-- order): the submit's round trip is then its only hop to a worker, as an apply_async's
-- is. Anything else, or a key that is not what it should be, leaves it to beat. Reads
-- only; `direct` says what pass 9 writes.
local direct
local function dispatch_here(id)
  local n = at['now']
  local routes, live, seq_key, leases = KEYS[n], KEYS[n + 1], KEYS[n + 2], KEYS[n + 3]
  local route = attempt('HGET', routes, p .. '\31' .. id)
  if not route then return nil end
  local heads = attempt('ZRANGEBYSCORE', due(p), '-inf', now, 'LIMIT', 0, 2)
  if not heads then return nil end
  for _, other in ipairs(heads) do
    if other ~= scope then return nil end
  end
  if #heads > 0 then  -- this scope has something due: only this request's old entry may be
    local ids = attempt('ZRANGEBYSCORE', sched(p), '-inf', now, 'LIMIT', 0, 2)
    if not ids then return nil end
    for _, other in ipairs(ids) do
      if other ~= id then return nil end
    end
  end
  local seq = attempt('GET', seq_key)
  if seq == nil or (seq and not string.match(seq, '^%d+$')) then return nil end
  if attempt('ZCARD', leases) == nil then return nil end
  local gen = (tonumber(seq) or 0) + 1
  local classes = {}
  for class in string.gmatch(route, '%S+') do classes[#classes + 1] = class end
  for i = 0, #classes - 1 do  -- from the generation's turn on, as claim.lua spreads them
    local class = classes[(gen + i) % #classes + 1]
    local lapses = attempt('ZSCORE', live, class)
    if lapses and tonumber(lapses) > now then
      local requires = {json = argv[8], repr = argv[9]}
      local queue = 'bgqueue.' .. argv[5] .. '.class.' .. class
      -- While the app holds CPU, the priority lane (efficiency.PRIORITY_LANE, NORMAL_LANE).
      local lane = redis.call('EXISTS', KEYS[n + 4], KEYS[n + 5]) > 0 and 0 or 3
      local list, message = run_message(id, argv[7], scope, gen, requires, queue, lane)
      if attempt('LLEN', list) == nil then return nil end
      return {seq = seq_key, gen = gen, class = class, leases = leases, list = list,
              message = message}
    end
  end
  return nil
end
if at['now'] and #order == 1 and not fail and score <= now then
  local id = argv[order[1]]
  direct = dispatch_here(id)
  if direct then
    records[2] = string.sub(string.gsub(stored, '"s":"pending"', '"s":"dispatched"', 1), 1, -2)
      .. ',"g":' .. direct.gen .. ',"q":"' .. direct.class .. '"}'
    entries, earliest, first = {}, {}, nil
    if old and old[id] then old[id]['to'] = 'now' end
    local k = string.match(stored, HEAD)
    change[field] = change[field] - 1
    change[k .. ':dispatched'] = (change[k .. ':dispatched'] or 0) + 1
  end
end

-- 5. The counts it changes, read (one HMGET, which also proves counts a hash). A counter
-- that is not an integer is repaired first, on this rare path only.
local names = {}
for f in pairs(change) do names[#names + 1] = f end
local counted = in_chunks('HMGET', COUNTS, names, 1)
if not counted then return foreign(COUNTS) end
local sound = is_integer(found[1]) and is_integer(found[2])
for _, value in ipairs(counted) do sound = sound and is_integer(value) end
if not sound then
  local dl = key('deadletter')
  if not dl then return {'places', 'deadletter'} end
  if wrong_type({[dl] = 'list'}) then return foreign(dl) end
  fix_counters(dl, COUNTS, names, REQ)
  counted = redis.call('HMGET', COUNTS, unpack(names))
  found = redis.call('HMGET', REQ, '#refresh', '#processing')
end
local held = {refresh = tonumber(found[1]) or 0, processing = tonumber(found[2]) or 0}

-- 6. The pending limits, as the batch would leave them: a replacement frees its old slot,
-- and only a class the batch makes fuller than it was can be refused, at the first request
-- of the batch that goes over.
local limit = {refresh = tonumber(argv[1]), processing = tonumber(argv[2])}
local over = false
for class, n in pairs(grows) do over = over or (n > 0 and held[class] + n > limit[class]) end
if over then
  -- Counting forward from what is held less what the batch replaces.
  local count = {refresh = held.refresh + grows.refresh,
                 processing = held.processing + grows.processing}
  for _, a in ipairs(order) do
    local class = class_of(string.match(argv[a + 1], HEAD))
    count[class] = count[class] - 1
  end
  for _, a in ipairs(order) do
    local class = class_of(string.match(argv[a + 1], HEAD))
    count[class] = count[class] + 1
    if count[class] > limit[class] and count[class] > held[class] then
      return {'limit', (a - FIRST) / 2, class}
    end
  end
end

-- 7. Continued-processing requests that must start now need a free slot each.
if starts then
  local needed, asked = {}, {}
  for _, start in ipairs(starts) do
    local slot = start[1] .. ' ' .. start[2]
    if not needed[slot] then asked[#asked + 1] = {start[1], start[2], slot} end
    needed[slot] = (needed[slot] or 0) + 1
  end
  local s = at['slots']
  for _, want in ipairs(asked) do
    local free = free_slots(KEYS[s], KEYS[s + 1], KEYS[s + 2], KEYS[s + 3], KEYS[s + 4],
      COUNTS, want[1], want[2])
    if free < needed[want[3]] then return {'busy', want[1], free} end
  end
end

-- 8. The sorted sets written below hold their type (or nothing): proven by a ZCARD each,
-- but the first profile's sched, proven by its ZADD, the first write. `moved`: profiles an
-- old pending request leaves, whose due entry is recomputed.
local moved = {}
for _, o in pairs(old or NONE) do
  local place = o['s'] == 'pending' and o['r'] or o['s']
  if o['s'] == 'pending' then
    moved[place] = true
    if attempt('ZCARD', due(place)) == nil then return foreign(due(place)) end
  end
  local set = o['s'] == 'pending' and sched(place) or key(place)
  if place ~= first and attempt('ZCARD', set) == nil then return foreign(set) end
end
for p in pairs(entries) do
  if p ~= first and attempt('ZCARD', sched(p)) == nil then return foreign(sched(p)) end
  if not moved[p] and attempt('ZCARD', due(p)) == nil then return foreign(due(p)) end
end
local dl = key('deadletter')
if strays and wrong_type({[dl] = 'list'}) then return foreign(dl) end

-- 9. Write.
if first and not in_chunks('ZADD', sched(first), entries[first], 2) then
  return foreign(sched(first))
end
for _, stray in ipairs(strays or NONE) do
  dead_letter(dl, REQ .. ' ' .. stray[1], stray[2] .. '; replaced by a submit', stray[3])
end
local replaced = 0
for id, o in pairs(old or NONE) do
  if o['s'] == 'pending' then
    -- One replaced by a request of its own profile was moved by that profile's ZADD.
    if o['to'] ~= o['r'] then redis.call('ZREM', sched(o['r']), id) end
  elseif o['s'] == 'parked' then
    redis.call('ZREM', key('parked'), o['r'] .. '\31' .. scope .. '\31' .. id)
  else
    redis.call('ZREM', key('dispatched'), scope .. '\31' .. id)
  end
  replaced = replaced + 1
end
for p, list in pairs(entries) do
  if p ~= first then in_chunks('ZADD', sched(p), list, 2) end
end
for p in pairs(moved) do reindex(due(p), sched(p), scope) end
for p, date in pairs(earliest) do
  if not moved[p] then redis.call('ZADD', due(p), 'LT', date, scope) end
end
-- The counters, as read plus the change (a field that reaches zero is deleted); the
-- scope's go with the records.
for class, n in pairs(grows) do
  if n ~= 0 and held[class] + n > 0 then
    records[#records + 1] = '#' .. class
    records[#records + 1] = held[class] + n
  elseif n ~= 0 then
    redis.call('HDEL', REQ, '#' .. class)
  end
end
in_chunks('HSET', REQ, records, 2)
local counts = {}
for n, f in ipairs(names) do
  local value = (tonumber(counted[n]) or 0) + change[f]
  if change[f] ~= 0 and value > 0 then
    counts[#counts + 1], counts[#counts + 2] = f, value
  elseif change[f] ~= 0 then
    redis.call('HDEL', COUNTS, f)
  end
end
if #counts > 0 then in_chunks('HSET', COUNTS, counts, 2) end
if direct then  -- beat has nothing to do for it: no wake-up
  redis.call('SET', direct.seq, direct.gen)
  redis.call('ZADD', direct.leases, now + tonumber(argv[10]), scope .. '\31' .. argv[order[1]])
  redis.call('LPUSH', direct.list, direct.message)
else
  redis.call('PUBLISH', argv[4], argv[5])
end
return replaced
