"""The app that transient-delay tests run on workers. Each handler plays the steps its
payload lists (request, cancel, query delays, sleep, wait for a signal...) and records
what happened in the Redis list `test:transient:events`, so tests assert on real runs.

Budgets are short and fixed here, so producer and workers agree on the quota:
a 2 s task budget (expiration handler 0.4 s before the deadline), delays of at most 4 s
(callback 0.8 s before a delay ends), 3 delays at once and 5 s of delay a day per scope.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import bgqueue as bg

APP_ID = "com.bgqueue.transient"
EVENTS = "test:transient:events"
IDS = "test:transient:ids"  # alias → request id, so one task can name another's delay
SIGNALS = "test:transient:signal:"  # + name: a counter tasks and tests wait on
IDENTIFIERS = ("a", "b", "c", "d")

app = bg.BackgroundApp(
    APP_ID,
    permitted_identifiers=[f"{APP_ID}.*"],
    limits=bg.Limits(
        refresh_time_budget=2,
        processing_time_budget=2,
        health_research_time_budget=2,
        expiration_warning=1,
        transient_max_concurrent=3,
        transient_max_delay=4,
        transient_daily_quota=5,
    ),
)


def record(task: bg.BGTask, event: str, **extra: Any) -> None:
    """Append one event of this run to the test's event list."""
    entry = {
        "id": task.identifier,
        "scope": task.scope,
        "gen": task.request_id,
        "event": event,
        "t": time.time(),
        "pid": os.getpid(),
        "worker": os.environ.get("BGQUEUE_WORKER_NAME", ""),
        **extra,
    }
    app.client.rpush(EVENTS, json.dumps(entry))


class Player:
    """Plays one task's steps; request ids are kept under the aliases the steps give."""

    def __init__(self, task: bg.BGTask) -> None:
        self.task = task
        self.started = time.monotonic()
        self.ids: dict[str, int] = {}

    def request_id(self, step: dict[str, Any]) -> Any:
        if "id" in step:
            return step["id"]
        alias = step["of"]
        if alias not in self.ids:
            return int(app.client.hget(IDS, alias))  # another task's delay
        return self.ids[alias]

    def callback(self, alias: str, slow: float = 0) -> Callable[[], None]:
        def warned() -> None:
            record(self.task, "delay_warning", alias=alias)
            time.sleep(slow)  # a callback that takes its time

        return warned

    def play(self, step: dict[str, Any]) -> None:
        op, task = step["do"], self.task
        if op == "request":
            alias = step["as"]
            reason = step.get("reason", f"finish {alias}")
            callback: Any = (
                step["callback"]
                if "callback" in step
                else self.callback(alias, step.get("slow", 0))
            )
            asked = time.time()
            info = task.request_suspend_delay(reason, callback)
            self.ids[alias] = info.request_id
            app.client.hset(IDS, alias, info.request_id)
            record(
                task,
                "granted",
                alias=alias,
                asked=asked,
                request_id=info.request_id,
                actual=info.actual_delay_time,
            )
        elif op == "remaining":
            left = task.get_remaining_delay_time(self.request_id(step))
            record(task, "remaining", alias=step.get("of"), left=left)
        elif op == "cancel":
            task.cancel_suspend_delay(self.request_id(step))
            record(task, "cancelled", alias=step.get("of"))
        elif op == "until":
            time.sleep(max(0.0, self.started + step["t"] - time.monotonic()))
        elif op == "complete":
            task.set_task_completed(success=step.get("success", True))
        else:
            self.play_signal(op, step)

    def play_signal(self, op: str, step: dict[str, Any]) -> None:
        if op == "signal":
            app.client.incr(SIGNALS + step["name"])
        elif op == "await":
            deadline = time.monotonic() + step.get("timeout", 15)
            while int(app.client.get(SIGNALS + step["name"]) or 0) < step.get("count", 1):
                if time.monotonic() > deadline:
                    record(self.task, "await_timeout", name=step["name"])
                    return
                time.sleep(0.005)
        else:
            raise ValueError(f"unknown step {op!r}")


def play(task: bg.BGTask) -> None:
    """Payload: {"expiration": "record"|"complete", "steps": [{"do": ...}, ...]}; a step that
    raises a bgqueue error records an "error" event with its code and the game goes on."""
    spec: dict[str, Any] = task.payload or {}
    record(task, "start")
    if spec.get("expiration"):
        complete = spec["expiration"] == "complete"

        def expire() -> None:
            record(task, "expiration")
            if complete:
                task.set_task_completed(success=False)

        task.expiration_handler = expire
    player = Player(task)
    for index, step in enumerate(spec.get("steps", [])):
        try:
            player.play(step)
        except bg.BackgroundTaskError as exc:
            record(task, "error", step=index, do=step["do"], alias=step.get("as"), code=exc.code)
    record(task, "end")


for _name in IDENTIFIERS:
    app.register(f"{APP_ID}.{_name}")(play)
