"""Celery task messages as kombu's Redis transport keeps them on a queue's list.

Beat sends every message itself: one LPUSH each, pipelined per batch. Going through
Celery's `send_task` (routing, signals, kombu's producer) cost some 300 µs of beat's CPU per
message, `saferepr` of the arguments alone 80; an envelope written here costs a tenth, and
the workers read exactly what Celery would have sent: protocol 2 (headers, and a body of
[args, kwargs, embed] in JSON), base64-encoded as kombu encodes bodies, on the list of the
queue's priority step (keys.AppKeys.queue_lists). The tests run real Celery workers on them.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from bgqueue.model.keys import AppKeys

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"  # as Celery names a sender


def task_message(
    queue: str, task: str, kwargs: dict[str, Any], priority: int = 0, eta: datetime | None = None
) -> tuple[str, str]:
    """The list a message goes on and the message: Celery task `task` with keyword
    arguments `kwargs`, on `queue`'s list of this priority step, held until `eta`."""
    task_id = str(uuid.uuid4())
    body = json.dumps([[], kwargs, EMBED])
    headers: dict[str, Any] = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": eta.isoformat() if eta is not None else None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": repr(kwargs),
        "origin": ORIGIN,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    step = f"{AppKeys.KOMBU_SEP}{priority}" if priority else ""
    return f"{queue}{step}", json.dumps(message)


def push(client: Any, messages: Iterable[tuple[str, str]]) -> None:
    """Put messages on their lists in one round trip (LPUSH: kombu pops from the right)."""
    with client.pipeline(transaction=False) as pipe:
        for name, message in messages:
            pipe.lpush(name, message)
        pipe.execute()
