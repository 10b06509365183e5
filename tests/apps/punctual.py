"""A second app for the dispatch tests: its one handler records when it started (the
worker's clock) in the Redis list `test:punctual:starts`, to measure how late a request
started against its earliest-begin date while another app or profile keeps beat busy."""

from __future__ import annotations

import json
import os
import time

import bgqueue as bg

APP_ID = "com.bgqueue.punctual"
JOB = f"{APP_ID}.job"
STARTS = "test:punctual:starts"

app = bg.BackgroundApp(APP_ID, permitted_identifiers=[f"{APP_ID}.*"])


@app.register(JOB)
def job(task: bg.ProcessingTask) -> None:
    """Record the start and complete."""
    entry = {"scope": task.scope, "gen": task.request_id, "t": time.time(), "pid": os.getpid()}
    app.client.rpush(STARTS, json.dumps(entry))
    task.set_task_completed(success=True)
