"""(a) and (b): requests accepted per second by the producer, nothing consuming.

(a) One call per request, one request at a time, for each system's own single-message call
on the same no-op task and the same Redis: bgqueue `submit`, a bare EVALSHA of a script
that returns at once (the round trip a submit cannot go below), Celery `apply_async` with
Celery's defaults (JSON; the ratio's baseline), Celery `apply_async` with the settings
bgqueue itself uses (bgqueue/worker/celery_config.py, which also publishes a `task-sent` event per
message, for Flower), Dramatiq `Actor.send` (default middleware) and RQ `Queue.enqueue`. Each
system's connection is warmed by one call before timing, as a long-lived producer's would be.
The systems take turns, round after round, and each reports its median round, so a slow
spell of the machine does not land on one system only.

(b) bgqueue `submit_many`: batches of distinct identifiers in one scope (one Lua call per
batch, atomic), the batch's request objects built before the clock starts, as for (a).

Async: bgqueue `asubmit` from 100 submitters (tasks) on one event loop, as an asyncio web
service's handlers would call it, each awaiting its submits one after the other until a fixed
number are in; one scope per request as in (a), objects built before the clock, the loop's
connection pool warmed by one round of concurrent submits. Reported with its ratio to (a)'s
single `submit` of the same run.

Every bgqueue request is due now, so it stays pending: no beat runs to release it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

import dramatiq
import redis
from apps import CELERY_QUEUE, DRAMATIQ_ACTOR, DRAMATIQ_QUEUE, IDENTIFIER, bgqueue_app, rq_noop
from celery import Celery
from common import rate
from dramatiq.brokers.redis import RedisBroker
from rq import Queue

import bgqueue as bg
from bgqueue.broker import connect
from bgqueue.worker.celery_config import celery_config

SYSTEMS = ("bgqueue", "evalsha", "celery", "celery_events", "dramatiq", "rq")
NAMES = {  # figure names of (a), per system
    "bgqueue": "submit_per_s",
    "evalsha": "evalsha_roundtrip_per_s",
    "celery": "celery_apply_async_per_s",
    "celery_events": "celery_events_apply_async_per_s",
    "dramatiq": "dramatiq_send_per_s",
    "rq": "rq_enqueue_per_s",
}


# Makes n calls of one system's single-message API; returns the seconds they took.
Sender = Callable[[], float]


def _noop(t: float | None = None) -> None:
    """The task body the producers name; it never runs here."""


def bgqueue_sender(url: str, n: int) -> Sender:
    """n single submits, one scope each (a scope holds one request per identifier; a new
    scope keeps every request pending instead of replacing the previous one). The request
    objects are built before the clock starts."""
    app = bgqueue_app(url)
    app.scheduler_for("warm").submit(bg.ProcessingTaskRequest(IDENTIFIER))
    counter = iter(range(1_000_000_000))

    def send() -> float:
        start = next(counter) * n
        calls = [
            (app.scheduler_for(f"p{start + i}"), bg.ProcessingTaskRequest(IDENTIFIER))
            for i in range(n)
        ]
        began = time.perf_counter()
        for scheduler, request in calls:
            scheduler.submit(request)
        return time.perf_counter() - began

    return send


def evalsha_sender(url: str, n: int) -> Sender:
    """n EVALSHAs of a script that returns at once, on the kind of connection bgqueue's
    producer uses (bgqueue.broker.connect): the bare round trip a submit is measured
    against, since a submit is one such call."""
    client = connect(url)
    sha = client.script_load("return 1")
    client.evalsha(sha, 0)
    return _timed(lambda: client.evalsha(sha, 0), n)


def celery_sender(url: str, n: int, events: bool = False) -> Sender:
    """n `apply_async` calls of the no-op task; Celery's defaults, or with `events`,
    bgqueue's Celery settings."""
    celery = Celery("bench-producer", set_as_current=False)
    config = celery_config(url) if events else {"broker_url": url, "task_ignore_result": True}
    celery.conf.update(config)
    celery.conf.task_default_queue = CELERY_QUEUE
    task = celery.task(name=IDENTIFIER, ignore_result=True, shared=False)(_noop)
    task.apply_async()
    return _timed(lambda: task.apply_async(), n)


def dramatiq_sender(url: str, n: int) -> Sender:
    """n `send` calls of the no-op actor."""
    broker = RedisBroker(url=url)
    actor = dramatiq.actor(
        _noop, actor_name=DRAMATIQ_ACTOR, queue_name=DRAMATIQ_QUEUE, broker=broker
    )
    actor.send()
    return _timed(lambda: actor.send(), n)


def rq_sender(url: str, n: int) -> Sender:
    """n `enqueue` calls of the no-op function."""
    queue = Queue("bench-rq", connection=redis.Redis.from_url(url))
    queue.enqueue(rq_noop)
    return _timed(lambda: queue.enqueue(rq_noop), n)


def _timed(call: Callable[[], object], n: int) -> Sender:
    def send() -> float:
        began = time.perf_counter()
        for _ in range(n):
            call()
        return time.perf_counter() - began

    return send


def submit_many_rate(url: str, total: int, batch: int) -> float:
    """Requests per second through `submit_many`, batches of distinct identifiers."""
    scheduler = bgqueue_app(url).scheduler_for("many")
    scheduler.submit_many([bg.ProcessingTaskRequest(f"{IDENTIFIER}.warm")])
    batches = [
        [bg.ProcessingTaskRequest(f"{IDENTIFIER}.{b}.{i}") for i in range(batch)]
        for b in range(total // batch)
    ]
    began = time.perf_counter()
    for requests in batches:
        scheduler.submit_many(requests)
    return rate(len(batches) * batch, time.perf_counter() - began)


ASYNC_SUBMITTERS = 100


def async_submit_rates(url: str, n: int, rounds: int) -> list[float]:
    """`asubmit`s per second, round by round: n requests per round from ASYNC_SUBMITTERS
    tasks on one event loop, which lives as long as all the rounds (a long-lived service)."""
    app = bgqueue_app(url)
    counter = iter(range(1_000_000_000))

    async def one_round(count: int) -> float:
        start = next(counter) * count
        queue = iter(
            [
                (app.scheduler_for(f"a{start + i}"), bg.ProcessingTaskRequest(IDENTIFIER))
                for i in range(count)
            ]
        )

        async def submitter() -> None:
            for scheduler, request in queue:  # one iterator shared: each request taken once
                await scheduler.asubmit(request)

        began = time.perf_counter()
        await asyncio.gather(*(submitter() for _ in range(ASYNC_SUBMITTERS)))
        return time.perf_counter() - began

    async def all_rounds() -> list[float]:
        try:
            await one_round(ASYNC_SUBMITTERS)  # opens the pool's connections
            return [rate(n, await one_round(n)) for _ in range(rounds)]
        finally:
            await app.aclose()

    return asyncio.run(all_rounds())


def run(url: str, quick: bool) -> dict[str, float]:
    """Measure (a) and (b) on the Redis at `url`; print a table; return the figures."""
    # Short rounds, many of them: a burst of load from elsewhere hits every system alike.
    n, rounds = (500, 4) if quick else (1000, 12)
    many, batch = (50_000, 5000) if quick else (200_000, 5000)
    async_n, async_rounds = (2000, 3) if quick else (5000, 8)
    makers = {
        "bgqueue": bgqueue_sender,
        "evalsha": evalsha_sender,
        "celery": celery_sender,
        "celery_events": lambda url, n: celery_sender(url, n, events=True),
        "dramatiq": dramatiq_sender,
        "rq": rq_sender,
    }
    senders = {system: makers[system](url, n) for system in SYSTEMS}
    rates: dict[str, list[float]] = {system: [] for system in SYSTEMS}
    print(f"(a) single calls: {rounds} round(s) of {n:,} per system, median round")
    for _ in range(rounds):
        for system, send in senders.items():
            rates[system].append(rate(n, send()))
    figures = {NAMES[s]: statistics.median(rates[s]) for s in SYSTEMS}
    celery = figures["celery_apply_async_per_s"]
    for system in SYSTEMS:
        per_s = figures[NAMES[system]]
        rounds_text = ", ".join(f"{r:,.0f}" for r in rates[system])
        print(f"  {system:13} {per_s:9,.0f}/s  x{per_s / celery:5.2f} Celery   ({rounds_text})")
    figures["submit_ratio_vs_celery"] = figures["submit_per_s"] / celery
    figures["submit_ratio_vs_roundtrip"] = (
        figures["submit_per_s"] / figures["evalsha_roundtrip_per_s"]
    )
    print(f"  submit ÷ a bare EVALSHA round trip: {figures['submit_ratio_vs_roundtrip']:.2f}")
    figures["dramatiq_send_ratio_vs_celery"] = figures["dramatiq_send_per_s"] / celery
    figures["rq_enqueue_ratio_vs_celery"] = figures["rq_enqueue_per_s"] / celery
    print(f"(b) submit_many: {many:,} requests in batches of {batch:,}")
    figures["submit_many_per_s"] = submit_many_rate(url, many, batch)
    print(f"  bgqueue       {figures['submit_many_per_s']:9,.0f}/s")
    tasks = f"{ASYNC_SUBMITTERS} tasks on one loop"
    print(f"async: {async_rounds} round(s) of {async_n:,} asubmits from {tasks}, median round")
    async_rates = async_submit_rates(url, async_n, async_rounds)
    figures["async_submit_per_s"] = statistics.median(async_rates)
    figures["async_submit_ratio_vs_submit"] = (
        figures["async_submit_per_s"] / figures["submit_per_s"]
    )
    rounds_text = ", ".join(f"{r:,.0f}" for r in async_rates)
    print(
        f"  bgqueue       {figures['async_submit_per_s']:9,.0f}/s  "
        f"x{figures['async_submit_ratio_vs_submit']:5.2f} submit  ({rounds_text})"
    )
    return figures
