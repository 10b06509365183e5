-- A scope's history (spliced in by bgqueue/scripts.py where a script says
-- `-- include: history`, after the requests include, which defines `now`).
--
-- remember(key, entry, cap, retention, last): push one TaskRecord entry (a table) onto the
-- scope's history list, newest first, and keep the list bounded in size and lifetime: at
-- most `cap` entries, none finished more than `retention` ms ago, and the whole key gone
-- `retention` ms after its newest entry (an idle scope leaves nothing behind). `last` is
-- the list's oldest entry if the caller read it already (LINDEX key -1), else nil.

local HISTORY_TRIM_STEP = 10  -- old entries dropped per push at most: bounded work per call

local function remember(key, entry, cap, retention, last)
  local length = redis.call('LPUSH', key, cjson.encode(entry))
  if length > tonumber(cap) then
    redis.call('LTRIM', key, 0, tonumber(cap) - 1)
    last = nil  -- the oldest entry went
  end
  local oldest = now - tonumber(retention)
  for _ = 1, HISTORY_TRIM_STEP do
    last = last or redis.call('LINDEX', key, -1)
    -- Entries are cjson's encoding of a table, so "fa" reads without decoding the entry;
    -- one without it (not ours) stops the trim rather than being guessed at.
    local finished = last and tonumber(string.match(last, '"fa":(%d+)'))
    if not finished or finished >= oldest then break end
    redis.call('RPOP', key)
    last = nil
  end
  redis.call('PEXPIRE', key, retention)
end
