"""The two writers of a run's Celery message agree: bgqueue/messages.py (beat) and its Lua
twin lua/include/message.lua (a request a submit releases itself). Both are read by real
Celery workers elsewhere (tests/test_dispatch.py); here they are compared field by field."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import redis

from bgqueue import messages
from bgqueue.requests import requirement_names
from bgqueue.scripts import splice

LUA = splice(
    """-- include: message
local requires = {json = ARGV[5], repr = ARGV[6]}
local list, message = run_message(ARGV[1], ARGV[2], ARGV[3], ARGV[4], requires, ARGV[7], ARGV[8])
return {list, message}
"""
)
SCOPES = ["kiosk-7", "it's", 'say "hi"', "both'\"", "back\\slash", "üñí/cødé", "a:b.c"]


def lua_message(
    client: redis.Redis, task: str, scope: str, gen: int, profile: int, queue: str, priority: int
) -> tuple[str, dict[str, Any]]:
    names = requirement_names(profile)
    args = [task, "0f0e", scope, gen, json.dumps(names), repr(names), queue, priority]
    found = client.eval(LUA, 0, *args)
    return found[0].decode(), json.loads(found[1])


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize(("profile", "priority"), [(0, 0), (3, 3), (13, 0)])
def test_the_lua_message_is_the_message_beat_sends(
    redis_client: redis.Redis, scope: str, profile: int, priority: int
) -> None:
    task, gen, queue = "com.example.app.refresh", 41, "bgqueue.com.example.app.class.0001-ab"
    kwargs = {"scope": scope, "gen": gen, "requires": requirement_names(profile)}
    py_list, py_raw = messages.task_message(queue, task, kwargs, priority)
    py = json.loads(py_raw)
    lua_list, lua = lua_message(redis_client, task, scope, gen, profile, queue, priority)

    assert lua_list == py_list
    # The body: base64 of the JSON from Python, the JSON itself from Lua (no body_encoding).
    assert json.loads(lua["body"]) == json.loads(base64.b64decode(py["body"]))
    assert py["properties"].pop("body_encoding") == "base64"
    assert "body_encoding" not in lua["properties"]
    # The ids differ by nature (a UUID each), everything else is the same.
    for message in (py, lua):
        headers, properties = message["headers"], message["properties"]
        assert headers["id"] == headers["root_id"] == properties["correlation_id"]
        for field in ("id", "root_id", "origin"):
            headers.pop(field)
        for field in ("correlation_id", "delivery_tag"):
            properties.pop(field)
        message.pop("body")
    assert lua == py
    assert lua["headers"]["kwargsrepr"] == repr(kwargs)
