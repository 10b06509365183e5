"""The app that work-scheduler test workers run. Its extension does what the work's
parameters say and records every call in the Redis list `test:works:events`, so tests
assert on real runs. Limits are short: a 1 s minimum repeat interval, a 2 s run limit."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import bgqueue as bg

APP_ID = "com.bgqueue.works"
EVENTS = "test:works:events"
LIMITS = bg.Limits(min_repeat_interval=1, work_run_limit=2)

# A system app, so tests can apply the TIMER and WORK_SCHEDULER efficiency resources.
app = bg.BackgroundApp(APP_ID, limits=LIMITS, system=True)


def producer(broker_url: str) -> bg.BackgroundApp:
    """A producer-side app with this app's id and limits, on its own connection."""
    return bg.BackgroundApp(APP_ID, broker_url=broker_url, limits=LIMITS, system=True)


def record(work: bg.WorkInfo, event: str, **extra: Any) -> None:
    """Append one event of a run to the test's event list."""
    entry = {
        "id": work.work_id,
        "event": event,
        "t": time.time(),
        "worker": os.environ.get("BGQUEUE_WORKER_NAME", ""),
        "pid": os.getpid(),
        **extra,
    }
    app.client.rpush(EVENTS, json.dumps(entry))


class Record(bg.WorkSchedulerExtension):
    """Parameters: sleep (s); cooperative (bool): on_work_stop ends the sleep early (after
    stop_sleep s); raise (message): on_work_start raises after its sleep."""

    def __init__(self) -> None:
        self.stopped = threading.Event()

    def on_work_start(self, work: bg.WorkInfo) -> None:
        params = work.parameters
        record(work, "start", parameters=params, bundle=work.bundle_name)
        sleep = float(params.get("sleep", 0))
        if params.get("cooperative"):
            self.stopped.wait(sleep)
        else:
            time.sleep(sleep)
        if params.get("raise"):
            raise RuntimeError(str(params["raise"]))
        record(work, "end")

    def on_work_stop(self, work: bg.WorkInfo) -> None:
        record(work, "stop")
        time.sleep(float(work.parameters.get("stop_sleep", 0)))  # a slow wrap-up
        self.stopped.set()


# TEST_OMIT=record plays an older build that lacks the extension.
if "record" not in os.environ.get("TEST_OMIT", "").split(","):
    app.work("record")(Record)
