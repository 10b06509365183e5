"""A system app for the efficiency-resource tests. Its handlers record what they saw in
the Redis list `test:efficiency:events`, so tests assert on real runs in real workers."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import bgqueue as bg

APP_ID = "com.bgqueue.efficient"
EVENTS = "test:efficiency:events"
GATE = "test:efficiency:gate"  # the "hold" job runs until a test sets this key

app = bg.BackgroundApp(
    APP_ID,
    permitted_identifiers=[f"{APP_ID}.*"],
    system=True,
    limits=bg.Limits(
        # Processing: long enough for any test; the cap (budget/5 = 6 s) never binds.
        processing_time_budget=30,
        # Refresh: 4 s with a 3 s warning, so the budget/5 cap binds (0.8 s) unless CPU lifts it.
        refresh_time_budget=4,
        expiration_warning=3,
    ),
)


def record(task: bg.BGTask, event: str, **extra: Any) -> None:
    """Append one event of this run, with the time on this host."""
    entry = {"scope": task.scope, "id": task.identifier, "event": event, "t": time.time()}
    app.client.rpush(EVENTS, json.dumps({**entry, "pid": os.getpid(), **extra}))


@app.register(f"{APP_ID}.job")
def job(task: bg.ProcessingTask) -> None:
    """Runs at once, or with payload {"hold": true} until the test opens the gate."""
    record(task, "start")
    if (task.payload or {}).get("hold"):
        deadline = time.monotonic() + 25
        while not app.client.exists(GATE) and time.monotonic() < deadline:
            time.sleep(0.02)
    task.set_task_completed(success=True)
    record(task, "end")


@app.register(f"{APP_ID}.probe")
def probe(task: bg.ProcessingTask) -> None:
    """Records which efficiency resources the app holds, as the handler sees them."""
    held = [resource.name for resource in bg.ResourceType if task.has_resource(resource)]
    record(task, "probe", held=held)
    task.set_task_completed(success=True)


@app.register(f"{APP_ID}.warned")
def warned(task: bg.AppRefreshTask) -> None:
    """Waits for its expiration handler, which records when it ran and completes the task."""
    record(task, "start")

    def expire() -> None:
        record(task, "expiration")
        task.set_task_completed(success=False)

    task.expiration_handler = expire
    task.completed.wait(10)
