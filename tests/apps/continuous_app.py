"""The app that continuous-task tests run. Its handlers do what their payload says and
record what they saw in the Redis list `test:continuous:events`, so tests assert on
real runs; `system_app` is a system app for the system-only modes."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import bgqueue as bg

EVENTS = "test:continuous:events"
APP_ID = "com.bgqueue.continuous"
PING = f"{APP_ID}.ping"
STALL = 2.0  # Limits.data_transfer_stall, seconds
GRACE = 1.0  # Limits.expiration_warning: how long a stopped handler may take to return
STEP = 0.05  # how often a handler looks at its task

app = bg.BackgroundApp(
    APP_ID,
    permitted_identifiers=[PING],
    background_modes=[
        bg.BackgroundMode.DATA_TRANSFER,
        bg.BackgroundMode.AUDIO_PLAYBACK,
        bg.BackgroundMode.LOCATION,
    ],
    limits=bg.Limits(
        data_transfer_stall=STALL,
        expiration_warning=GRACE,
        # Far shorter than the continuous runs in the tests: no request budget applies to them.
        refresh_time_budget=2,
        processing_time_budget=2,
    ),
)

system_app = bg.BackgroundApp(
    f"{APP_ID}.system",
    background_modes=[bg.BackgroundMode.WIFI_INTERACTION, bg.BackgroundMode.VOIP],
    system=True,
)


def record(task: bg.ContinuousTask, event: str, **extra: Any) -> None:
    """Append one event of this run to the test's event list."""
    entry = {
        "ability": task.ability,
        "id": task.continuous_task_id,
        "restarts": task.restarts,
        "event": event,
        "modes": [int(m) for m in task.modes],
        "worker": os.environ.get("BGQUEUE_WORKER_NAME", ""),
        "pid": os.getpid(),
        "t": time.time(),
        **extra,
    }
    app.client.rpush(EVENTS, json.dumps(entry))


def behave(task: bg.ContinuousTask) -> None:
    """Payload keys: progress (report a new count every `progress` s), seconds (return
    after that long), ignore_stop (keep going after `stopped`), raise (message)."""
    spec: dict[str, Any] = task.payload or {}
    record(task, "start", payload=spec)
    started = time.monotonic()
    modes = task.modes
    count = 0
    next_report = started
    while spec.get("ignore_stop") or not task.stopped.is_set():
        now = time.monotonic()
        if "seconds" in spec and now - started >= spec["seconds"]:
            record(task, "return")
            return
        if spec.get("raise"):
            raise RuntimeError(spec["raise"])
        if task.modes != modes:
            modes = task.modes
            record(task, "modes")
        if "progress" in spec and now >= next_report:
            count += 1
            task.report_progress(count, 1000)
            next_report = now + spec["progress"]
            record(task, "progress", count=count, elapsed=now - started)
        time.sleep(STEP)
    reason = task.cancel_reason
    record(task, "stopped", reason=int(reason) if reason is not None else None)


# TEST_OMIT (comma-separated abilities) plays an older build that lacks those handlers.
for _ability in ("download", "upload", "player", "stubborn", "finite", "crash"):
    if _ability not in os.environ.get("TEST_OMIT", "").split(","):
        app.continuous(_ability)(behave)


@app.register(PING)
def ping(task: bg.BGTask) -> None:
    """A plain request: when it has run, beat has been through a dispatch round."""
    task.set_task_completed(success=True)
