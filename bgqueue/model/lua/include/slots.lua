-- Free pool processes for a request that must start now (spliced in by bgqueue/model/scripts.py
-- where a script says `-- include: slots`, after the requests include).
--
-- free_slots(workers, alive, running, classes, leases, counts, profile, identifier): over
-- the live workers whose class satisfies the profile and has the identifier's handler,
-- their concurrency less max(runs recorded on them, busy in their heartbeat); less every
-- request dispatched and not started, and every continued-processing request pending in a
-- profile they serve (those are due now, so they will take a slot first). Reads heartbeats
-- and running records: O(workers + runs), for the rare request that must start now.

local function has_bit(mask, bit)
  return math.floor(mask / 2 ^ bit) % 2 == 1
end

local function decoded(raw)
  if not raw then return nil end
  local ok, value = pcall(cjson.decode, raw)
  if ok and type(value) == 'table' then return value end
  return nil
end

local function free_slots(workers, alive, running, classes, leases, counts, profile, identifier)
  local runs = {}
  for _, raw in ipairs(redis.call('HVALS', running)) do
    local rec = decoded(raw)
    if rec and type(rec['w']) == 'string' then runs[rec['w']] = (runs[rec['w']] or 0) + 1 end
  end
  local capable, served, free = {}, {}, 0
  for _, name in ipairs(redis.call('ZRANGEBYSCORE', alive, '(' .. now, '+inf')) do
    local beat = decoded(redis.call('HGET', workers, name))
    local class = beat and beat['class']
    if type(class) == 'string' and capable[class] == nil then
      local def = decoded(redis.call('HGET', classes, class)) or {}
      local mask, handles = tonumber(def['m']) or 0, false
      for _, id in ipairs(type(def['h']) == 'table' and def['h'] or {}) do
        if id == identifier then handles = true end
      end
      capable[class] = handles and has_bit(mask, profile) and mask or false
    end
    if type(class) == 'string' and capable[class] then
      local busy = math.max(runs[name] or 0, tonumber(beat['busy']) or 0)
      free = free + math.max(0, (tonumber(beat['concurrency']) or 0) - busy)
      for p = 0, 15 do
        if has_bit(capable[class], p) then served[p] = true end
      end
    end
  end
  if free == 0 then return 0 end
  free = free - redis.call('ZCARD', leases)
  for p in pairs(served) do
    free = free - (tonumber(redis.call('HGET', counts, 'continued_processing:' .. p)) or 0)
  end
  return free
end
