"""The no-op task of every system the benchmarks run, with one shared handler body.

    bgqueue worker --app apps:app          (bench/ on PYTHONPATH, see common.service_env)
    celery -A apps:celery_app worker ...
    dramatiq apps ...
    rq worker ... (enqueue apps.rq_noop)

Each system's handler calls `record(sent)` and nothing else, so every system pays exactly
the same for detecting completion: one pipelined round trip to Redis (INCR of the done
counter, SETNX of the first start's wall-clock time, and with a send time, RPUSH of the
submit-to-start lag). The broker URL comes from BGQUEUE_BROKER_URL, read at import; nothing
connects at import.
"""

from __future__ import annotations

import os
import time

import dramatiq
import redis
from celery import Celery
from dramatiq.brokers.redis import RedisBroker

import bgqueue as bg
from bgqueue.worker.celery_config import celery_config

URL = os.environ.get("BGQUEUE_BROKER_URL", "redis://127.0.0.1:6379/0")

IDENTIFIER = "bench.noop.run"  # bgqueue identifier and Celery task name
CELERY_QUEUE = "bench.celery"
DRAMATIQ_QUEUE = "bench-dramatiq"
DRAMATIQ_ACTOR = "bench_noop"

# Keys the handler writes; the benchmark reads and clears them between measurements.
DONE = "bench:done"  # runs counted
FIRST = "bench:first"  # time.time() at the first run's start
LAGS = "bench:lags"  # seconds from submit to start, one per run that carried a send time

_client: redis.Redis | None = None
_client_pid = 0


def _redis() -> redis.Redis:
    """One connection per process (made again after a fork), as each system's own is."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(URL)
        _client_pid = os.getpid()
    return _client


def record(sent: float | None = None) -> None:
    """The handler body of every system: count the run, note the first start, and the lag
    from `sent` (time.time() at submit, same machine) to now."""
    now = time.time()
    with _redis().pipeline(transaction=False) as pipe:
        pipe.incr(DONE)
        pipe.setnx(FIRST, now)
        if sent is not None:
            pipe.rpush(LAGS, now - sent)
        pipe.execute()


# -- bgqueue ---------------------------------------------------------------------------


def bgqueue_app(url: str) -> bg.BackgroundApp:
    """The benchmark's BackgroundApp on `url` (the producer side makes its own with this)."""
    return bg.BackgroundApp(
        "bench.noop",
        permitted_identifiers=["bench.noop.*"],
        broker_url=url,
        # Lifted so submit_many can put a whole batch of distinct identifiers in one scope;
        # the drain puts each request in a scope of its own instead (one handler identifier).
        limits=bg.Limits(max_pending_processing=10_000_000),
    )


app = bgqueue_app(URL)


@app.register(IDENTIFIER)
def noop(task: bg.ProcessingTask) -> None:
    """bgqueue's no-op: the shared body, then completion as every bgqueue handler reports it."""
    record(task.payload.get("t"))
    task.set_task_completed(success=True)


# -- Celery, with bgqueue's settings but Celery's own recovery ---------------------------

celery_app = Celery("bench", set_as_current=False)
celery_app.conf.update(celery_config(URL))
# Bare Celery keeps a run safe from a worker's death with kombu's ack emulation (the unacked
# hash, written on every delivery and ack, restored after the visibility timeout); bgqueue
# turns it off because its own leases recover such runs. The baseline keeps Celery's.
celery_app.conf.broker_transport_options = {"visibility_timeout": 3600}
celery_app.conf.task_default_queue = CELERY_QUEUE


@celery_app.task(name=IDENTIFIER, ignore_result=True, shared=False)
def celery_noop(t: float | None = None) -> None:
    """Celery's no-op: the shared body."""
    record(t)


# -- Dramatiq, default middleware, no result backend ------------------------------------

dramatiq_broker = RedisBroker(url=URL)
dramatiq.set_broker(dramatiq_broker)


@dramatiq.actor(actor_name=DRAMATIQ_ACTOR, queue_name=DRAMATIQ_QUEUE, max_retries=0)
def dramatiq_noop(t: float | None = None) -> None:
    """Dramatiq's no-op: the shared body."""
    record(t)


# -- RQ -----------------------------------------------------------------------------------


def rq_noop(t: float | None = None) -> None:
    """RQ's no-op (enqueued as `apps.rq_noop`): the shared body."""
    record(t)


# -- raw Redis: the floor under every Redis-list queue -------------------------------------

RAW_QUEUE = "bench:raw"


def blpop_loop() -> None:
    """Pop `RAW_QUEUE` forever; an item is "" or the send time, as text."""
    client = _redis()
    while True:
        item = client.blpop([RAW_QUEUE], timeout=1)
        if item is not None:
            record(float(item[1]) if item[1] else None)
