"""Requests accepted per second: bgqueue `submit` and `submit_many` beside Celery's
`apply_async`, on one freshly started Redis, in one run.

    .venv/bin/python bench/submit.py [--n 5000]

Nothing consumes the messages: this measures the producer side only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from celery import Celery

import bgqueue as bg
from bgqueue.celery_config import celery_config
from bgqueue.embedded import RedisServer


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds else float("inf")


def bench_submit(app: bg.BackgroundApp, n: int) -> float:
    # One identifier per scope keeps every request pending (no replacement, no limit hit).
    later = datetime.now(UTC) + timedelta(days=1)
    requests = [
        (
            app.scheduler_for(f"s{i}"),
            bg.ProcessingTaskRequest("bench.noop", earliest_begin_date=later),
        )
        for i in range(n)
    ]
    start = time.perf_counter()
    for scheduler, request in requests:
        scheduler.submit(request)
    return rate(n, time.perf_counter() - start)


def bench_submit_many(app: bg.BackgroundApp, n: int, batch: int) -> float:
    later = datetime.now(UTC) + timedelta(days=1)
    scheduler = app.scheduler_for("many")
    # Distinct identifiers in one scope would hit the 10-pending limit; lift it for the bench.
    batches = [
        [
            bg.ProcessingTaskRequest(f"bench.many.{b}.{i}", earliest_begin_date=later)
            for i in range(batch)
        ]
        for b in range(n // batch)
    ]
    start = time.perf_counter()
    for requests in batches:
        scheduler.submit_many(requests)
    return rate(n // batch * batch, time.perf_counter() - start)


def bench_celery(url: str, n: int) -> float:
    celery = Celery("bench", set_as_current=False)
    celery.conf.update(celery_config(url))

    @celery.task(name="bench.noop")
    def noop() -> None: ...

    noop.apply_async(queue="bench")  # warm the connection pool, as submit's first call does
    start = time.perf_counter()
    for _ in range(n):
        noop.apply_async(queue="bench")
    return rate(n, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--many", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            limits = bg.Limits(max_pending_processing=args.many)
            app = bg.BackgroundApp(
                "bench", permitted_identifiers=["bench.*"], broker_url=server.url, limits=limits
            )
            app.scheduler.pending_task_requests()  # connect and load scripts before timing
            celery_rate = bench_celery(server.url, args.n)
            submit_rate = bench_submit(app, args.n)
            many_rate = bench_submit_many(app, args.many, args.batch)
        finally:
            server.stop()
    print(f"celery_apply_async_per_s: {celery_rate:,.0f}")
    print(f"submit_per_s: {submit_rate:,.0f}")
    print(f"submit_many_per_s: {many_rate:,.0f}")
    print(f"submit_ratio_vs_celery: {submit_rate / celery_rate:.2f}")


if __name__ == "__main__":
    main()
