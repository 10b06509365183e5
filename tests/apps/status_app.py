"""A system app using all four HarmonyOS parts, for the `bgqueue status` test: a continuous
DATA_TRANSFER task, a request that holds a transient delay, and a work; the test applies
efficiency resources. Handlers that should stay put wait for the Redis key `GATE`."""

from __future__ import annotations

import time

import bgqueue as bg

APP_ID = "com.bgqueue.status"
HOLD = f"{APP_ID}.hold"
GATE = "test:status:gate"  # handlers holding on return once a test sets this key
LIMITS = bg.Limits(
    # A 2 s budget: the 20 s delay asked at the start holds the task 18 s past it, so the
    # grant reserves 18 s of the 50 s daily quota and status shows 32 s left.
    processing_time_budget=2,
    expiration_warning=1,
    transient_max_delay=20,
    transient_daily_quota=50,
    min_repeat_interval=1,
)

app = bg.BackgroundApp(
    APP_ID,
    permitted_identifiers=[HOLD],
    background_modes=[bg.BackgroundMode.DATA_TRANSFER],
    system=True,
    limits=LIMITS,
)


def producer(broker_url: str) -> bg.BackgroundApp:
    """A producer-side app with this app's id and limits, on its own connection."""
    return bg.BackgroundApp(
        APP_ID,
        permitted_identifiers=[HOLD],
        background_modes=[bg.BackgroundMode.DATA_TRANSFER],
        system=True,
        broker_url=broker_url,
        limits=LIMITS,
    )


def gate_open() -> bool:
    return bool(app.client.exists(GATE))


@app.continuous("download")
def download(task: bg.ContinuousTask) -> None:
    """Reports one more file every 0.2 s until stopped."""
    done = 0
    while not task.stopped.wait(0.2):
        done += 1
        task.report_progress(done, 1000)


@app.register(HOLD)
def hold(task: bg.ProcessingTask) -> None:
    """Asks for a suspend delay at once, then holds it until the gate opens."""
    task.request_suspend_delay("hold for status", lambda: None)
    deadline = time.monotonic() + 18
    while not gate_open() and time.monotonic() < deadline:
        time.sleep(0.05)
    task.set_task_completed(success=True)


@app.work("sync")
class Sync(bg.WorkSchedulerExtension):
    """A quick run."""

    def on_work_start(self, work: bg.WorkInfo) -> None:
        time.sleep(0.1)
