-- Put what bgqueue met but could not read into the app's dead-letter list
-- (bgqueue/broker/deadletter.py).
--
-- KEYS[1]  deadletter (LIST of JSON entries, newest first, capped)
-- KEYS[2]  op 'key' only: a key of the app that may hold the wrong type
-- ARGV[1]  op: 'push' (record an entry) or 'key' (move KEYS[2] aside if its type is wrong)
-- ARGV[2]  op 'push': source, where the data was met (a queue, a key);
--          op 'key': the type KEYS[2] should have
-- ARGV[3]  reason
-- ARGV[4]  op 'push': the raw data
-- Returns 1 if an entry was written, else 0.

-- include: deadletter

if ARGV[1] == 'push' then
  dead_letter(KEYS[1], ARGV[2], ARGV[3], ARGV[4])
  return 1
end
return dead_letter_key(KEYS[1], KEYS[2], ARGV[2], ARGV[3]) and 1 or 0
