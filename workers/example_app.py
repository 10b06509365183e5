"""The demo's background app: a news reader's server-side background work.

It uses Apple's requests (refresh, processing, health research, continued processing) and
the four parts of HarmonyOS's Background Tasks Kit: a transient suspend delay (the digest),
a continuous DATA_TRANSFER task (the download), efficiency resources (it is a system app;
the demo applies CPU), and a repeating work (sync).

`make demo` runs it; you can also run its workers yourself:
    bgqueue worker --app workers/example_app.py:app --name mains --continuous \
        --condition external_power=true --condition network=ethernet
"""

from __future__ import annotations

import contextlib
import random
import threading
import time

import bgqueue as bg

app = bg.BackgroundApp(
    "com.example.news",
    permitted_identifiers=[
        "com.example.news.refresh",
        "com.example.news.cleanup",
        "com.example.news.export.*",
        "com.example.news.study",
        "com.example.news.upload",
        "com.example.news.digest",
    ],
    background_modes=[bg.BackgroundMode.DATA_TRANSFER],
    system=True,  # a system app may apply for efficiency resources
    # Short budgets so the demo shows expirations, delays and repeats within seconds.
    limits=bg.Limits(
        refresh_time_budget=5,
        processing_time_budget=8,
        health_research_time_budget=8,
        expiration_warning=2,
        continued_processing_stall=3,
        transient_max_delay=10,
        transient_daily_quota=120,
        min_repeat_interval=5,
    ),
)


@app.register("com.example.news.refresh")
def refresh(task: bg.AppRefreshTask) -> None:
    """Fetch the latest headlines: quick, always completes."""
    time.sleep(random.uniform(0.1, 0.5))
    task.set_task_completed(success=True)


def expiry_event(task: bg.BGTask) -> threading.Event:
    """An event the task's expiration handler sets: work checks it to stop in time."""
    expiring = threading.Event()
    task.expiration_handler = expiring.set
    return expiring


def work_until(task: bg.BGTask, expiring: threading.Event, seconds: float) -> None:
    """Work for `seconds`; completed unsuccessfully if told to expire before then."""
    task.set_task_completed(success=not expiring.wait(seconds))


@app.register("com.example.news.cleanup")
def cleanup(task: bg.ProcessingTask) -> None:
    """Prune old articles: minutes of work on a real server, a few seconds here."""
    work_until(task, expiry_event(task), float(task.payload.get("seconds", 2)))


@app.register("com.example.news.export.pdf")
def export(task: bg.ProcessingTask) -> None:
    """An export that takes longer than its budget and ignores its expiration handler:
    the watchdog terminates it and records it expired."""
    task.expiration_handler = lambda: None
    time.sleep(60)


@app.register("com.example.news.study")
def study(task: bg.HealthResearchTask) -> None:
    """Health-research processing: needs a worker that can open protected data."""
    time.sleep(0.5)
    task.set_task_completed(success=True)


@app.register("com.example.news.upload")
def upload(task: bg.ContinuedProcessingTask) -> None:
    """User-visible upload that reports progress as it goes."""
    task.progress.total_unit_count = 5
    for step in range(5):
        time.sleep(0.4)
        task.progress.completed_unit_count = step + 1
    task.set_task_completed(success=True)


@app.register("com.example.news.digest")
def digest(task: bg.ProcessingTask) -> None:
    """The daily digest needs 10 s, 2 s past its 8 s budget. Halfway through it asks for a
    transient suspend delay (HarmonyOS requestSuspendDelay): up to 10 s more, paid from the
    scope's daily quota for only the time it actually runs past its budget."""
    expiring = expiry_event(task)
    time.sleep(4)
    # Refused when the quota is used up (or 3 delays are live): finish what fits the budget.
    with contextlib.suppress(bg.TransientTaskVerificationFailed):
        task.request_suspend_delay("finish the daily digest", expiring.set)
    work_until(task, expiring, 6)


@app.continuous("download")
def download(task: bg.ContinuousTask) -> None:
    """A DATA_TRANSFER continuous task: downloads the offline edition a file a second,
    reporting progress, until it is stopped (or has everything)."""
    total = int((task.payload or {}).get("files", 100))
    done = 0
    task.report_progress(done, total)
    while done < total and not task.stopped.wait(1):
        done += 1
        task.report_progress(done, total)


@app.work("sync")
class Sync(bg.WorkSchedulerExtension):
    """A WorkSchedulerExtension: syncs subscriptions whenever a worker on mains power with a
    network is free, every few seconds (the app's min_repeat_interval is 5 s here)."""

    def on_work_start(self, work: bg.WorkInfo) -> None:
        time.sleep(random.uniform(0.3, 1.0))

    def on_work_stop(self, work: bg.WorkInfo) -> None:
        pass  # a run over its run limit would be told here
