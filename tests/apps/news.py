"""A news app for the Flower tests: one identifier per outcome Flower must tell apart, and
one whose body will not stop, with budgets short enough that an expiry takes two seconds."""

from __future__ import annotations

import contextlib
import os
import time

import bgqueue as bg

APP_ID = "com.example.news"
NEWS = APP_ID + "."
REFRESH = NEWS + "refresh"  # completes successfully
CLEANUP = NEWS + "cleanup"  # completes unsuccessfully
FEEDS = NEWS + "feeds"  # raises
EXPORT = NEWS + "export.pdf"  # overruns its budget and is terminated
STUBBORN = NEWS + "stubborn"  # overruns, and swallows the interruption at its deadline
PIDS = "test:news:pids"  # the pool process of each stubborn run

app = bg.BackgroundApp(
    APP_ID,
    permitted_identifiers=[NEWS + "*"],
    limits=bg.Limits(processing_time_budget=2, expiration_warning=0.5),
)


@app.register(REFRESH)
def refresh(task: bg.AppRefreshTask) -> None:
    time.sleep(0.2)
    task.set_task_completed(success=True)


@app.register(CLEANUP)
def cleanup(task: bg.ProcessingTask) -> None:
    task.set_task_completed(success=False)


@app.register(FEEDS)
def feeds(task: bg.ProcessingTask) -> None:
    raise ConnectionError("feed server unreachable")


@app.register(EXPORT)
def export(task: bg.ProcessingTask) -> None:
    task.expiration_handler = lambda: None  # ignores the warning: expired at the deadline
    time.sleep(60)


@app.register(STUBBORN)
def stubborn(task: bg.ProcessingTask) -> None:
    app.client.rpush(PIDS, os.getpid())
    task.expiration_handler = lambda: None
    while True:
        with contextlib.suppress(BaseException):  # swallows TaskTerminated: it gets killed
            time.sleep(60)
