"""The dead letter: data bgqueue met in its own keys and queues but could not read.

Foreign or malformed data (a record that is not bgqueue's JSON, a due-set member naming
no request, a key holding the wrong type, a message on a bgqueue queue that is not JSON,
names no task, or has the wrong shape) is moved here instead of failing a Lua script, a
beat loop or a worker again and again. The list `AppKeys.deadletter` holds one JSON entry
per item, newest first, capped at `CAP` entries:

    t    ms when it was met (Redis's clock)
    src  where: a queue ("queue bgqueue.<app>.p0"), a key ("req:default") ...
    why  what was wrong with it
    raw  the data itself, its first `RAW_BYTES` bytes

Every write is one Lua script (lua/deadletter.lua, or the include lua/include/deadletter.lua
inside the scripts that decode records), which caps the list in the same step. The log
line says where and why, never the data: a message may carry secrets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bgqueue.errors import ParameterError
from bgqueue.model import scripts
from bgqueue.model.keys import AppKeys
from bgqueue.model.requests import check_name, from_ms

if TYPE_CHECKING:
    from bgqueue.model.context import AppContext

log = logging.getLogger("bgqueue.deadletter")

CAP = 1000  # entries kept per app; DEAD_LETTER_CAP in lua/include/deadletter.lua
RAW_BYTES = 4096  # of the data kept per entry; DEAD_LETTER_RAW there


@dataclass(frozen=True)
class DeadLetter:
    """One entry of an app's dead letter."""

    at: datetime | None
    source: str
    reason: str
    raw: str

    @classmethod
    def from_json(cls, raw: bytes | str) -> DeadLetter:
        """Decode one entry (bytes that are not UTF-8 are shown replaced)."""
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        data = json.loads(text)
        return cls(from_ms(data.get("t")), str(data["src"]), str(data["why"]), str(data["raw"]))


def text_of(raw: object) -> str:
    """The data as text for an entry: bytes decoded (replacing what is not UTF-8), anything
    else as JSON where it can be, else its repr."""
    if isinstance(raw, bytes | bytearray | memoryview):
        return bytes(raw).decode(errors="replace")
    if isinstance(raw, str):
        return raw
    try:
        return json.dumps(raw, default=repr)
    except (TypeError, ValueError):
        return repr(raw)


def push(client: Any, app: AppKeys, where: str, reason: str, raw: object) -> None:
    """Record one item the app could not read, and log where and why (not the data)."""
    text = text_of(raw)[:RAW_BYTES]
    _script(client)(keys=[app.deadletter], args=["push", where, reason, text])
    log.error("dead letter of %s from %s: %s (%d bytes kept)", app.app_id, where, reason, len(text))


def _script(client: Any) -> Any:
    return client.register_script(scripts.source("deadletter"))


def read(client: Any, app: AppKeys, limit: int = 100) -> list[DeadLetter]:
    """The app's newest dead-letter entries."""
    return [DeadLetter.from_json(raw) for raw in client.lrange(app.deadletter, 0, limit - 1)]


def count(client: Any, app: AppKeys) -> int:
    """How many entries the app's dead letter holds (at most CAP)."""
    return int(client.llen(app.deadletter))


def expected_types(app: AppKeys) -> dict[str, str]:
    """The Redis type of each fixed-name key of an app (the per-scope keys are checked where
    they are met)."""
    types = {due: "zset" for due in app.due_all}
    types.update({app.leases: "zset", app.runleases: "zset", app.alive: "zset"})
    types.update({app.parked: "zset", app.classlive: "zset", app.classes: "hash"})
    types.update({app.running: "hash", app.counts: "hash", app.workers: "hash"})
    types.update({app.seq: "string", app.expire: "set", app.deadletter: "list"})
    return types


def quarantine(client: Any, app: AppKeys) -> list[str]:
    """Move every fixed-name key of the app that holds the wrong type into the dead letter
    (a sample of it, then delete it); returns their names. Called by beat when a command
    on the app's keys failed, so that one foreign key does not stop the app for good. An
    index moved aside is rebuilt from what it indexes (`rebuild`)."""
    types = expected_types(app)
    with client.pipeline(transaction=False) as pipe:
        for name in types:
            pipe.type(name)
        found = pipe.execute()
    moved = []
    script = _script(client)
    for (name, wanted), held in zip(types.items(), found, strict=True):
        held = held.decode() if isinstance(held, bytes) else str(held)
        if held in ("none", wanted) or name == app.deadletter:
            continue
        if script(keys=[app.deadletter, name], args=["key", wanted, "wrong type"]):
            log.error("dead letter of %s: key %s held a %s; moved aside", app.app_id, name, held)
            moved.append(name)
    rebuild(client, app, moved)
    return moved


def rebuild(client: Any, app: AppKeys, moved: list[str]) -> None:
    """Rebuild the indexes among `moved` from the records and schedules they index: a due
    index from the scopes' schedules, the app's counts from the scopes' records. A repair
    after foreign data, so it may SCAN the app's keys (never on a hot path)."""
    for profile, due in enumerate(app.due_all):
        if due in moved:
            for sched in client.scan_iter(match=f"{app.base}:sched:{profile}:*", count=1000):
                scope = sched.decode().split(":", 4)[-1]
                first = client.zrange(sched, 0, 0, withscores=True)
                if first:
                    client.zadd(due, {scope: first[0][1]})
    if app.counts in moved:
        counts: dict[str, int] = {}
        for req in client.scan_iter(match=f"{app.base}:req:*", count=1000):
            for raw in client.hvals(req):
                try:
                    record = json.loads(raw)
                    place = record["r"] if record["s"] == "pending" else record["s"]
                    name = f"{record['k']}:{place}"
                except (ValueError, KeyError, TypeError):
                    continue  # a '#' counter, or not a request's
                counts[name] = counts.get(name, 0) + 1
        if counts:
            client.hset(app.counts, mapping=counts)


# -- messages on bgqueue's Celery queues ----------------------------------------------------

Check = Callable[[Any], bool]


def message_kwargs(
    args: Sequence[Any], kwargs: Mapping[str, Any], expected: Mapping[str, Check]
) -> str | None:
    """Why a task message's arguments are not what bgqueue sends, or None if they are:
    no positional arguments, exactly the expected keyword arguments, each passing its
    check."""
    if args:
        return f"positional arguments {text_of(list(args))[:200]} (bgqueue sends keywords only)"
    if not isinstance(kwargs, Mapping):
        return "keyword arguments are not a mapping"
    missing = sorted(set(expected) - set(kwargs))
    extra = sorted(str(k) for k in set(kwargs) - set(expected))
    if missing or extra:
        return f"keyword arguments missing {missing}, unexpected {extra}"
    bad = [name for name, check in expected.items() if not check(kwargs[name])]
    if bad:
        return f"keyword arguments of the wrong type or range: {bad}"
    return None


def is_count(value: object) -> bool:
    """A positive whole number (a generation or an id), not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_name(value: object) -> bool:
    """A scope, identifier or ability name as bgqueue accepts them."""
    try:
        check_name(value, "name")
    except ParameterError:
        return False
    return True


def queue_of(message: Any) -> str:
    """The queue a kombu message came from, for an entry's source."""
    info = getattr(message, "delivery_info", None) or {}
    return f"queue {info.get('routing_key') or info.get('exchange') or '?'}"


def raw_message(message: Any) -> str:
    """A kombu message as an entry keeps it: headers, properties and body."""
    body = getattr(message, "body", b"")
    whole = {
        "headers": getattr(message, "headers", None),
        "properties": getattr(message, "properties", None),
        "body": text_of(body),
    }
    return text_of(whole)


def refuse_task_message(app: AppContext, task: Any, reason: str) -> dict[str, Any]:
    """Inside a bgqueue Celery task whose message has the wrong arguments: record the
    message in the dead letter instead of running anything; returns the task's result."""
    request = task.request
    raw = {"task": task.name, "args": request.args, "kwargs": request.kwargs}
    where = f"queue {(request.delivery_info or {}).get('routing_key', '?')}"
    try:
        push(app.client, app.keys, where, f"{task.name}: {reason}", raw)
    except Exception as exc:  # never let a foreign message fail the worker
        log.warning("could not record a dead letter of %s: %s", app.app_id, type(exc).__name__)
    return {"outcome": "dead-lettered", "reason": reason}
