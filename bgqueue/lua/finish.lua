-- Record the end of a run and drop it from the running set.
--
-- KEYS[1]  running
-- KEYS[2]  runleases
-- KEYS[3]  history:<scope>
-- KEYS[4]  expire
-- KEYS[5]  deadletter
-- ARGV[1]  generation
-- ARGV[2]  end state: completed | failed | expired
-- ARGV[3]  success, 1 or 0
-- ARGV[4]  history length cap
-- ARGV[5]  history retention, ms
-- ARGV[6]  reason (free text, may be empty)
-- ARGV[7..9]  identifier, kind and scope, for the history entry if the running record is
--          not bgqueue's (it is dead-lettered then)
-- Returns 1, or 0 if the run had already been given up as lost and requeued
-- (the request then runs twice: at-least-once).
-- Every key is read before the first write (deadletter include: read, move_foreign).

-- include: deadletter
-- include: requests
-- include: history

local RUNNING, RUNLEASES, HISTORY, EXPIRE, DL = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local gen = ARGV[1]
local raw = read('hash', 'HGET', RUNNING, gen)
read('zset', 'ZSCORE', RUNLEASES, gen)
local expiring = read('set', 'SISMEMBER', EXPIRE, gen)
local last = read('list', 'LINDEX', HISTORY, -1)
move_foreign(DL, 'finish met a key')
if not raw then return 0 end
local ok, rec = pcall(cjson.decode, raw)
if not ok or type(rec) ~= 'table' then
  dead_letter(DL, RUNNING .. ' ' .. gen, 'running record is not JSON', raw)
  rec = {i = ARGV[7], k = ARGV[8], sc = ARGV[9], a = 0}
end
redis.call('HDEL', RUNNING, gen)
redis.call('ZREM', RUNLEASES, gen)
if expiring == 1 then redis.call('SREM', EXPIRE, gen) end
remember(HISTORY, {
  i = rec['i'], sc = rec['sc'], k = rec['k'], s = ARGV[2], ok = ARGV[3] == '1',
  sa = rec['sa'], fa = now, w = rec['w'], g = rec['g'], a = rec['a'], why = ARGV[6]},
  ARGV[4], ARGV[5], last or nil)
return 1
