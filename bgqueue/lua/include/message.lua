-- A run's Celery task message, as kombu's Redis transport keeps it on a queue's list (spliced
-- in by bgqueue/scripts.py where a script says `-- include: message`): the Lua twin of
-- bgqueue/messages.py, for a request a script releases itself (submit.lua, due at once).
-- Protocol 2, the body [args, kwargs, embed] as JSON text with no body_encoding (kombu then
-- hands it to Celery as is); tests/test_messages.py checks that both twins agree.
--
-- run_message(task, id, scope, gen, requires, queue, priority) -> the list, the message.
-- `requires` holds the requirement names in JSON and in Python's repr (Flower shows the
-- kwargs as Python would print them), `id` names the task (a UUID from the producer).

local KOMBU_SEP = '\6\22'  -- keys.AppKeys.KOMBU_SEP: a queue's list of a priority step

-- Python's repr of a str, as Celery's kwargsrepr shows it.
local function py_repr(text)
  local quote = "'"
  if string.find(text, "'", 1, true) and not string.find(text, '"', 1, true) then quote = '"' end
  text = string.gsub(text, '\\', '\\\\')
  if quote == "'" then text = string.gsub(text, "'", "\\'") end
  return quote .. text .. quote
end

local function run_message(task, id, scope, gen, requires, queue, priority)
  local body = '[[], {"scope": ' .. cjson.encode(scope) .. ', "gen": ' .. gen
    .. ', "requires": ' .. requires.json
    .. '}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
  local kwargsrepr = "{'scope': " .. py_repr(scope) .. ", 'gen': " .. gen
    .. ", 'requires': " .. requires.repr .. '}'
  local quoted_id = '"' .. id .. '"'
  local message = '{"body": ' .. cjson.encode(body)
    .. ', "content-encoding": "utf-8", "content-type": "application/json", "headers": '
    .. '{"lang": "py", "task": ' .. cjson.encode(task) .. ', "id": ' .. quoted_id
    .. ', "shadow": null, "eta": null, "expires": null, "group": null, "group_index": null'
    .. ', "retries": 0, "timelimit": [null, null], "root_id": ' .. quoted_id
    .. ', "parent_id": null, "argsrepr": "()", "kwargsrepr": ' .. cjson.encode(kwargsrepr)
    .. ', "origin": "bgqueue-submit", "ignore_result": true, "replaced_task_nesting": 0'
    .. ', "stamped_headers": null, "stamps": {}}, "properties": {"correlation_id": '
    .. quoted_id .. ', "reply_to": "", "delivery_mode": 2, "delivery_info": {"exchange": ""'
    .. ', "routing_key": ' .. cjson.encode(queue) .. '}, "priority": ' .. priority
    .. ', "delivery_tag": ' .. quoted_id .. '}}'
  local list = queue
  if tonumber(priority) ~= 0 then list = queue .. KOMBU_SEP .. priority end
  return list, message
end
