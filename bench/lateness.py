"""(d) Start lateness: how late a timed request starts after its due time, at 100 and 500
requests falling due per second, for bgqueue, Celery and RQ fed the same schedule.

    .venv/bin/python bench/lateness.py [--quick]     (starts its own Redis)

Lateness = the handler's first wall-clock reading − the request's due time. Each system
gets the same schedule (request i due at T0 + i/rate, for `window` seconds), submitted
entirely before T0, and the same handler body (bench/lateness_app.py) on a pool of 2
processes on this 2-core machine:

* bgqueue: `submit` with `earliest_begin_date`, one request per scope (one scope per
  device is the model's shape), with `bgqueue beat` and `bgqueue worker --concurrency 2`
  running. Behind the schedule sits a background of far-future pending requests in the same
  due set — 1,000,000 (100,000 with --quick) — as DESIGN.md §6 asks. A worker is live
  throughout, so eligibility is immediate and lateness is start − earliest_begin.
* Celery: `apply_async(eta=...)`, the way one-off timed tasks are run with Celery (beat
  itself only runs periodic entries); a prefork worker with `-c 2`. The worker holds every
  ETA message in its own memory until due, which is why it can be punctual; it gets no
  background (a million ETA messages would have to sit in the worker's RAM).
* RQ: `Queue.enqueue_at`, two `rq worker --with-scheduler` processes (one holds the
  scheduler lock). `SimpleWorker` runs jobs without forking a process per job, so the figure
  is the scheduler's lateness, not fork overhead. RQ's scheduler polls once a second and
  scores jobs in whole seconds, so it starts jobs up to a second early as well as late:
  the minimum (most negative) lateness is reported too.

If a system cannot keep up with the rate, its lateness grows over the window; the
`started` count and the maximum show it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis
from rq import Queue

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import lateness_app  # noqa: E402

import bgqueue as bg  # noqa: E402

RATES = (100, 500)
BATCH = 5000  # background requests per submit_many call
WARM_UP = 8  # requests run before measuring: pool processes forked, scripts loaded


def schedule(rate: int, window: float, submit_rate: float) -> list[int]:
    """Due times in ms: `rate` per second over `window` seconds, starting once the whole
    schedule can have been submitted at `submit_rate` per second, plus a second of margin.
    The submit rates passed are about half of what each producer reaches on a busy 2-core
    machine, so that the schedule is in place before it starts (a warning says otherwise)."""
    count = int(rate * window)
    first = time.time() + 1.0 + count / submit_rate
    return [math.ceil(first * 1000 + i * 1000 / rate) for i in range(count)]


def summary(samples: list[float], expected: int) -> dict[str, float]:
    """p50, p99, max and min lateness in ms, early starts and how many started at all."""
    return {
        "p50": common.percentile(samples, 50),
        "p99": common.percentile(samples, 99),
        "max": max(samples, default=math.nan),
        "min": min(samples, default=math.nan),
        "early": float(sum(1 for s in samples if s < 0)),
        "started": float(len(samples)),
        "expected": float(expected),
    }


def collect(client: redis.Redis, key: str, due: list[int]) -> dict[str, float]:
    """Wait until every request of the schedule has started (or a generous deadline past
    the window passes), then summarise the lateness samples."""
    deadline = (due[-1] / 1000 - time.time()) + 30
    with contextlib.suppress(TimeoutError):  # reported as started < expected
        common.wait_until(lambda: client.llen(key) >= len(due), deadline, key, interval=0.05)
    samples = [float(raw) for raw in client.lrange(key, 0, -1)]
    return summary(samples, len(due))


def warm_up(client: redis.Redis, key: str, send: Callable[[int], None]) -> None:
    """Run a few requests due now and wait until they have started."""
    for _ in range(WARM_UP):
        send(int(time.time() * 1000))
    common.wait_until(lambda: client.llen(key) >= WARM_UP, 60, f"warm-up runs ({key})")


def feed(
    client: redis.Redis, system: str, send: Callable[[str, int], None], window: float, rate_in: int
) -> dict[int, dict[str, float]]:
    """Warm `system` up, then feed it each rate's schedule (`send(key, due_ms)` submits one
    request whose handler records its lateness under `key`, `rate_in` submits a second) and
    collect the lateness, by rate."""
    warm = f"bench:late:{system}:warm"
    warm_up(client, warm, lambda due_ms: send(warm, due_ms))
    results: dict[int, dict[str, float]] = {}
    for rate in RATES:
        key = f"bench:late:{system}:{rate}"
        due = schedule(rate, window, submit_rate=rate_in)
        for due_ms in due:
            send(key, due_ms)
        submitted_in_time(due, system, rate)
        results[rate] = collect(client, key, due)
    return results


def submitted_in_time(due: list[int], system: str, rate: int) -> None:
    """Say so if submitting overran the schedule's start: the early dues were then late
    before they reached the system."""
    late = time.time() * 1000 - due[0]
    if late > 0:
        print(f"   warning: {system} {rate}/s: submitting ended {late:.0f} ms after T0")


# -- bgqueue -------------------------------------------------------------------------


def submit_background(app: bg.BackgroundApp, count: int) -> float:
    """`count` pending requests due in a day or more, in one scope; returns submits/s."""
    scheduler = app.scheduler_for("background")
    later = datetime.now(UTC) + timedelta(days=1)
    began = time.perf_counter()
    for start in range(0, count, BATCH):
        scheduler.submit_many(
            bg.ProcessingTaskRequest(
                f"bench.late.bg.{i}", earliest_begin_date=later + timedelta(milliseconds=i)
            )
            for i in range(start, min(start + BATCH, count))
        )
    return common.rate(count, time.perf_counter() - began)


def bgqueue_submit(app: bg.BackgroundApp, key: str, due_ms: int, scope: str) -> None:
    """One timed request, alone in its scope (a device with one pending request)."""
    when = datetime.fromtimestamp(due_ms / 1000, UTC)
    payload = {"key": key, "due": due_ms}
    request = bg.ProcessingTaskRequest(
        lateness_app.IDENTIFIER, earliest_begin_date=when, payload=payload
    )
    app.scheduler_for(scope).submit(request)


def run_bgqueue(url: str, window: float, background: int) -> dict[int, dict[str, float]]:
    client = redis.Redis.from_url(url)
    app = bg.BackgroundApp(
        lateness_app.APP_ID,
        permitted_identifiers=["bench.late.*"],
        broker_url=url,
        limits=lateness_app.app.limits,
    )
    per_s = submit_background(app, background)
    print(f"   bgqueue background: {background:,} pending, submitted at {per_s:,.0f}/s")
    # A large background triggers an AOF rewrite, whose child takes a core for seconds:
    # a one-off of loading the background, not of serving the schedule.
    common.wait_until(
        lambda: not int(client.info("persistence")["aof_rewrite_in_progress"]),
        300,
        "the AOF rewrite to finish",
        interval=0.1,
    )
    env = common.service_env(url)
    with common.processes() as procs:
        procs.append(common.start_process(common.python_argv("-m", "bgqueue", "beat"), env, "beat"))
        worker = ["worker", "--app", "lateness_app:app", "--name", "late", "--concurrency", "2"]
        worker += ["--loglevel", "WARNING"]
        procs.append(common.start_process(common.python_argv("-m", "bgqueue", *worker), env))
        common.wait_until(app.live_workers, 60, "a live bgqueue worker")
        scopes = (f"s{i}" for i in range(10**9))
        return feed(
            client,
            "bgqueue",
            lambda key, due_ms: bgqueue_submit(app, key, due_ms, next(scopes)),
            window,
            rate_in=400,
        )


# -- Celery --------------------------------------------------------------------------


def run_celery(url: str, window: float) -> dict[int, dict[str, float]]:
    client = redis.Redis.from_url(url)
    producer = lateness_app.make_celery(url)
    tick = producer.tasks[lateness_app.IDENTIFIER]
    argv = ["celery", "-A", "lateness_app:celery", "worker", "-c", "2", "-P", "prefork"]
    argv += ["-Q", lateness_app.CELERY_QUEUE, "--without-mingle", "--without-gossip"]
    argv += ["--loglevel", "WARNING"]
    with common.processes() as procs:
        procs.append(common.start_process(common.python_argv("-m", *argv), common.service_env(url)))

        def send(key: str, due_ms: int) -> None:
            eta = datetime.fromtimestamp(due_ms / 1000, UTC)
            tick.apply_async(args=[key, due_ms], eta=eta)

        return feed(client, "celery", send, window, rate_in=200)


# -- RQ ------------------------------------------------------------------------------


def run_rq(url: str, window: float) -> dict[int, dict[str, float]]:
    client = redis.Redis.from_url(url)
    queue = Queue(lateness_app.RQ_QUEUE, connection=client)
    rq = str(Path(sys.executable).with_name("rq"))  # rq has no `python -m rq`
    argv = [rq, "worker", "--with-scheduler", "-w", "rq.worker.SimpleWorker", "-u", url]
    argv += ["-q", lateness_app.RQ_QUEUE]
    with common.processes() as procs:
        env = common.service_env(url)
        for i in range(2):  # concurrency 2, as the others
            procs.append(common.start_process(argv, env, f"rq-{i}"))

        def send(key: str, due_ms: int) -> None:
            when = datetime.fromtimestamp(due_ms / 1000, UTC)
            queue.enqueue_at(when, lateness_app.rq_tick, key, due_ms)

        return feed(client, "rq", send, window, rate_in=200)


# -- the section ---------------------------------------------------------------------


def report(system: str, rate: int, stats: dict[str, float], note: str = "") -> None:
    print(
        f"   {system:8} {rate:3}/s{note}: p50 {stats['p50']:8.1f} ms  p99 {stats['p99']:8.1f} ms"
        f"  max {stats['max']:8.1f} ms  min {stats['min']:8.1f} ms"
        f"  early {stats['early']:.0f}  started {stats['started']:.0f}/{stats['expected']:.0f}"
    )


def run(url: str, quick: bool) -> dict[str, float]:
    """Start lateness of bgqueue (with a background of pending requests), Celery and RQ."""
    window = 2.0 if quick else 10.0
    background = 100_000 if quick else 1_000_000
    if quick:
        print(f"   quick: {window:.0f} s windows, background of {background:,} pending (full: 1M)")
    return measure(url, window, background, ("bgqueue", "celery", "rq"))


def measure(url: str, window: float, background: int, which: tuple[str, ...]) -> dict[str, float]:
    """Run the named systems over the schedule and turn their lateness into figures."""
    runners: dict[str, Callable[[], dict[int, dict[str, float]]]] = {
        "bgqueue": lambda: run_bgqueue(url, window, background),
        "celery": lambda: run_celery(url, window),
        "rq": lambda: run_rq(url, window),
    }
    systems = {name: runners[name]() for name in which}
    figures: dict[str, float] = {}
    for system, results in systems.items():
        prefix = "" if system == "bgqueue" else f"{system}_"
        for rate, stats in results.items():
            note = f" ({background:,} pending behind)" if system == "bgqueue" else ""
            report(system, rate, stats, note)
            for stat in ("p50", "p99", "max", "min"):
                figures[f"{prefix}lateness_{stat}_ms_{rate}"] = stats[stat]
            if stats["started"] < stats["expected"]:
                print(f"   {system} {rate}/s: only {stats['started']:.0f} started in time")
    if "bgqueue" in systems:
        headline = systems["bgqueue"][max(RATES)]
        figures.update({f"lateness_{s}_ms": headline[s] for s in ("p50", "p99", "max")})
        figures["lateness_background_pending"] = float(background)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--window", type=float, help="seconds of schedule per rate")
    parser.add_argument("--background", type=int, help="pending requests behind bgqueue's")
    parser.add_argument("--systems", nargs="+", choices=("bgqueue", "celery", "rq"))
    args = parser.parse_args()
    with common.redis_server() as url:
        if args.window or args.background is not None or args.systems:
            window = args.window or (3.0 if args.quick else 10.0)
            background = args.background if args.background is not None else 1_000_000
            figures = measure(url, window, background, tuple(args.systems or ("bgqueue",)))
        else:
            figures = run(url, args.quick)
    for name, value in figures.items():
        print(f"{name}: {value:.2f}")


if __name__ == "__main__":
    main()
