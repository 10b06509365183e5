"""The app the scaling benchmark runs: each request burns a little CPU, as real work does,
and counts itself done in Redis."""

from __future__ import annotations

import time

import bgqueue as bg

DONE = "bench:done"

app = bg.BackgroundApp(
    "bench.scale",
    permitted_identifiers=["bench.scale.*"],
    limits=bg.Limits(max_pending_processing=1_000_000),
)


@app.register("bench.scale.work")
def work(task: bg.ProcessingTask) -> None:
    """Spin for `spin` seconds of CPU, then count the run (and its generation, to spot doubles)."""
    until = time.process_time() + float(task.payload["spin"])
    while time.process_time() < until:
        pass
    with app.client.pipeline(transaction=False) as pipe:
        pipe.incr(DONE)
        pipe.sadd(f"{DONE}:ids", f"{task.scope}/{task.identifier}")
        pipe.execute()
    task.set_task_completed(success=True)
