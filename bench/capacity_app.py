"""The apps of the capacity benchmark (`bench/capacity.py`): two tenants of one news service,
whose users each have a few pending maintenance requests. `small` gets 1,000 pending
requests and `large` a million, on the same Redis and beat, so that beat's dispatch rate
can be measured in turns at both sizes. Their workers only have to be live, so that beat
has somewhere to dispatch to; the benchmark pauses them, and the handlers never run."""

from __future__ import annotations

import bgqueue as bg

SMALL_ID = "com.example.news"
LARGE_ID = "com.example.mail"
# Ten distinct identifiers per user: Apple's limit of pending processing requests per scope.
PER_SCOPE = 10


def identifiers(app_id: str, kind: str) -> list[str]:
    """The app's ten identifiers of a kind: `sync` for pending work, `burst` for the bursts."""
    return [f"{app_id}.{kind}.{j}" for j in range(PER_SCOPE)]


def make_app(app_id: str, broker_url: str | None = None) -> bg.BackgroundApp:
    """One tenant, its burst identifiers registered (as a worker needs them)."""
    app = bg.BackgroundApp(app_id, permitted_identifiers=[f"{app_id}.*"], broker_url=broker_url)
    for identifier in identifiers(app_id, "burst"):
        app.register(identifier)(lambda task: task.set_task_completed(success=True))
    return app


small = make_app(SMALL_ID)
large = make_app(LARGE_ID)
