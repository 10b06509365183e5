"""The app that test workers run. Each handler does what its payload says and records
what happened in the Redis list `test:events`, so tests assert on real runs."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import bgqueue as bg

EVENTS = "test:events"
IDENTIFIERS = ("refresh", "process", "a", "b", "c", "health", "continued", "slow")


def _seconds(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


app = bg.BackgroundApp(
    "com.bgqueue.test",
    permitted_identifiers=["com.bgqueue.test.*"],
    limits=bg.Limits(
        refresh_time_budget=_seconds("TEST_REFRESH_BUDGET", 5),
        processing_time_budget=_seconds("TEST_PROCESSING_BUDGET", 5),
        health_research_time_budget=_seconds("TEST_PROCESSING_BUDGET", 5),
        expiration_warning=_seconds("TEST_EXPIRATION_WARNING", 1),
        continued_processing_stall=_seconds("TEST_STALL", 2),
    ),
)


def record(task: bg.BGTask, event: str, **extra: Any) -> None:
    """Append one event of this run to the test's event list."""
    entry = {
        "id": task.identifier,
        "scope": task.scope,
        "gen": task.request_id,
        "attempt": task.attempt,
        "event": event,
        "t": time.time(),
        "pid": os.getpid(),
        "worker": os.environ.get("BGQUEUE_WORKER_NAME", ""),
        **extra,
    }
    app.client.rpush(EVENTS, json.dumps(entry))


def expiration_handler(task: bg.BGTask, spec: dict[str, Any]) -> Any:
    """The payload's expiration handler: 'complete' completes unsuccessfully, 'record' only
    records, 'slow' takes `expiration_sleep` s (a handler that flushes, joins...)."""
    kind = spec.get("expiration")

    def expire() -> None:
        record(task, "expiration")
        if kind == "complete":
            task.set_task_completed(success=False)
        elif kind == "slow":
            time.sleep(spec["expiration_sleep"])
            record(task, "expiration_done")

    return expire if kind in ("complete", "record", "slow") else None


def behave(task: bg.BGTask) -> None:
    """Payload keys: sleep (s); first_sleep (s, the first attempt only); complete (bool);
    expiration ('complete', 'record' or 'slow' with expiration_sleep s); raise (message);
    progress ({"every": s, "steps": n}) for continued processing."""
    spec: dict[str, Any] = task.payload or {}
    record(task, "start", payload=spec)
    task.expiration_handler = expiration_handler(task, spec)
    if "progress" in spec and isinstance(task, bg.ContinuedProcessingTask):
        task.progress.total_unit_count = spec["progress"]["steps"]
        for step in range(spec["progress"]["steps"]):
            time.sleep(spec["progress"]["every"])
            task.progress.completed_unit_count = step + 1
    time.sleep(spec.get("sleep", 0))
    if task.attempt == 1:  # a first run that hangs, the rerun after its worker died does not
        time.sleep(spec.get("first_sleep", 0))
    if spec.get("raise"):
        raise RuntimeError(spec["raise"])
    if "complete" in spec:
        task.set_task_completed(success=bool(spec["complete"]))
    record(task, "end")


# TEST_OMIT (comma-separated identifiers) plays an older build that lacks those handlers.
for _name in IDENTIFIERS:
    if f"com.bgqueue.test.{_name}" not in os.environ.get("TEST_OMIT", "").split(","):
        app.register(f"com.bgqueue.test.{_name}")(behave)
