"""The apps the start-lateness benchmark (`bench/lateness.py`) runs: one handler body, three
systems. bgqueue runs it as a launch handler, Celery as a task, RQ as a job function.

The body is the same everywhere: read the wall clock first thing, then append
`start − due` (ms) to a Redis list named by the request. Every process runs on this one
machine, so the producer's and the workers' wall clocks are the same clock.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

import bgqueue as bg

APP_ID = "bench.late"
IDENTIFIER = "bench.late.tick"
CELERY_QUEUE = "bench.late.celery"
RQ_QUEUE = "bench-late-rq"

# The background of far-future requests sits in one scope, so that scope's limit is raised.
app = bg.BackgroundApp(
    APP_ID,
    permitted_identifiers=["bench.late.*"],
    limits=bg.Limits(max_pending_processing=10_000_000),
)

_clients: dict[int, redis.Redis] = {}


def broker_url() -> str:
    """The Redis the bench runs on (bench/common.service_env sets it for every process)."""
    return os.environ.get("BGQUEUE_BROKER_URL", "redis://127.0.0.1:6379/0")


def record(key: str, due_ms: float) -> None:
    """The shared handler body: note how late this start is against its due time."""
    started_ms = time.time() * 1000
    client = _clients.get(os.getpid())
    if client is None:  # one client per process: pool processes are forked
        client = _clients[os.getpid()] = redis.Redis.from_url(broker_url())
    client.rpush(key, f"{started_ms - due_ms:.3f}")


@app.register(IDENTIFIER)
def tick(task: bg.ProcessingTask) -> None:
    """bgqueue: the payload carries the result list and the earliest-begin date in ms."""
    record(task.payload["key"], task.payload["due"])
    task.set_task_completed(success=True)


def make_celery(url: str) -> Celery:
    """Bare Celery on the same Redis: JSON, no result backend, otherwise its defaults."""
    celery_app = Celery("bench-late", broker=url, set_as_current=False)
    celery_app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_default_queue=CELERY_QUEUE,
        worker_hijack_root_logger=False,
    )

    # shared=False: each Celery app made here keeps its own task (no cross-app registry).
    @celery_app.task(name=IDENTIFIER, shared=False)
    def celery_tick(key: str, due_ms: float) -> None:
        record(key, due_ms)

    return celery_app


celery = make_celery(broker_url())


def rq_tick(key: str, due_ms: float) -> Any:
    """RQ: the job function (imported by name, `lateness_app.rq_tick`, in the worker)."""
    record(key, due_ms)
