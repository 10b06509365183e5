"""The demo's background app: a news reader's server-side background work.

`make demo` runs it; you can also run its workers yourself:
    bgqueue worker --app workers/example_app.py:app --name mains --condition external_power=true
"""

from __future__ import annotations

import random
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
    ],
    background_modes=[bg.BackgroundMode.DATA_TRANSFER],
    # Short budgets so the demo shows expirations within seconds.
    limits=bg.Limits(
        refresh_time_budget=5,
        processing_time_budget=8,
        health_research_time_budget=8,
        expiration_warning=2,
        continued_processing_stall=3,
    ),
)


@app.register("com.example.news.refresh")
def refresh(task: bg.AppRefreshTask) -> None:
    """Fetch the latest headlines: quick, always completes."""
    time.sleep(random.uniform(0.1, 0.5))
    task.set_task_completed(success=True)


@app.register("com.example.news.cleanup")
def cleanup(task: bg.ProcessingTask) -> None:
    """Prune old articles: minutes of work on a real server, a few seconds here."""
    stop = False

    def expire() -> None:
        nonlocal stop
        stop = True

    task.expiration_handler = expire
    for _ in range(int(task.payload.get("seconds", 2) * 10)):
        if stop:
            task.set_task_completed(success=False)
            return
        time.sleep(0.1)
    task.set_task_completed(success=True)


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
