"""(c) End-to-end drain of no-op requests, and idle submit-to-start latency, for bgqueue,
bare Celery, Dramatiq and a raw Redis LPUSH/BLPOP loop, one after the other on one Redis.

Drain. The backlog is queued before any consumer runs; then the consumers start, and the
clock runs from the first handler's start to the moment the last run has completed by the
system's own account. So every system is timed on the same span: worker start-up is outside
it (it ends before the first start), queueing is outside it (measured by producer.py).

- bgqueue: N requests due now, each in its own scope, pending in Redis; then `bgqueue beat`
  and `bgqueue worker --concurrency 2` (prefork). Inside the clock: beat claims and publishes,
  the worker's start.lua and finish.lua, its watchdog thread: submit → beat → worker →
  completed. Done: every handler ran and nothing is running or dispatched (bgqueue records
  `completed` inside the handler, before the ack).
- Celery: N `apply_async` messages; then `celery worker --pool prefork --concurrency 2`
  with the settings bgqueue's workers use (bgqueue/worker/celery_config.py: JSON, acks late,
  prefetch 1, task events on; without mingle and gossip, as `bgqueue worker` runs), except
  that it keeps kombu's ack emulation: bare Celery's way to recover a dead worker's runs,
  where bgqueue's leases do that (apps.celery_app). Done: every handler ran and the unacked
  hash is empty.
- Dramatiq: N `send` messages; then `dramatiq --processes 2 --threads 1` (two processes
  each running one message at a time, as the prefork pools do; Dramatiq's default
  prefetch of 2 per process). Done: every handler ran and no message waits to be acked.
- raw: N LPUSHes; two processes looping on BLPOP. The ceiling of any Redis-list queue.

Every handler is `apps.record`: one pipelined round trip (INCR, SETNX, RPUSH), the same in
each system. bgqueue runs with its default settings (no test-speed intervals: they only
shorten failure detection, and would add heartbeats and sweeps to the measured span).

CPU. Between the first start and the end of a drain, the CPU time of every consumer process
(psutil: the main process, its pool children apart) and of Redis (INFO cpu) is divided by
the runs: where each system's time goes, process by process. On this 2-core machine that
sum bounds the drain rate.

Latency. With the same consumers idle and warm, one message at a time carries
`time.time()` taken just before the submit call; its handler records now − then. The next
is sent once the previous has started and a short random pause has passed (the same
seeded pauses for every system). Dramatiq polls an idle queue with a back-off of up to a
second, so it gets fewer samples.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis
from apps import (
    CELERY_QUEUE,
    DONE,
    DRAMATIQ_ACTOR,
    DRAMATIQ_QUEUE,
    FIRST,
    IDENTIFIER,
    LAGS,
    RAW_QUEUE,
    bgqueue_app,
)
from celery import Celery
from common import (
    percentile,
    processes,
    python_argv,
    rate,
    service_env,
    start_process,
    wait_until,
)
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker

import bgqueue as bg
from bgqueue.worker.celery_config import celery_config

SYSTEMS = ("bgqueue", "celery", "dramatiq", "raw")
CONCURRENCY = 2  # the machine's cores; the same in every system


@dataclass
class System:
    """How one system is fed, started and judged done."""

    name: str
    send: Callable[[float | None], None]  # queue one no-op, with a send time or none
    commands: list[list[str]]  # the consumer processes, started after the backlog
    settled: Callable[[redis.Redis], bool]  # nothing of it in flight any more


def _noop(t: float | None = None) -> None:
    """The task as the producer names it; it runs in the workers (apps.celery_noop)."""


def _unacked_empty(client: redis.Redis) -> bool:
    # kombu's Redis transport (with its ack emulation, bare Celery's) keeps delivered,
    # unacknowledged messages in this hash.
    return client.hlen("unacked") == 0


def _nothing_running(client: redis.Redis) -> bool:
    # bgqueue records a run's end before the handler's task returns; nothing is in flight.
    app = bgqueue_app("redis://unused").keys
    return not client.hlen(app.running) and not client.zcard(app.leases)


def _dramatiq_acked(client: redis.Redis) -> bool:
    # A Dramatiq consumer holds each fetched message id in a set of its own until the ack;
    # Redis deletes a set when its last member goes. Read only once all handlers ran.
    return not client.keys("dramatiq:__acks__.*")


def bgqueue_system(url: str) -> System:
    app = bgqueue_app(url)
    counter = iter(range(10**9))

    def send(sent: float | None) -> None:
        payload = {} if sent is None else {"t": sent}
        request = bg.ProcessingTaskRequest(IDENTIFIER, payload=payload)
        app.scheduler_for(f"d{next(counter)}").submit(request)

    worker = ["worker", "--app", "apps:app", "--name", "bench", "--loglevel", "WARNING"]
    commands = [
        python_argv("-m", "bgqueue", "beat", "--loglevel", "WARNING"),
        python_argv("-m", "bgqueue", *worker, "--concurrency", str(CONCURRENCY)),
    ]
    return System("bgqueue", send, commands, _nothing_running)


def celery_system(url: str) -> System:
    celery = Celery("bench-drain", set_as_current=False)
    celery.conf.update(celery_config(url))
    task = celery.task(name=IDENTIFIER, ignore_result=True, shared=False)(_noop)

    def send(sent: float | None) -> None:
        task.apply_async(kwargs={} if sent is None else {"t": sent}, queue=CELERY_QUEUE)

    command = python_argv("-m", "celery", "-A", "apps:celery_app", "worker", "--pool=prefork")
    command += [f"--concurrency={CONCURRENCY}", "--without-mingle", "--without-gossip"]
    command += ["-Q", CELERY_QUEUE, "--loglevel=WARNING"]
    return System("celery", send, [command], _unacked_empty)


def dramatiq_system(url: str) -> System:
    broker = RedisBroker(url=url)

    def send(sent: float | None) -> None:
        kwargs: dict[str, Any] = {} if sent is None else {"t": sent}
        # What Actor.send does, without declaring the actor in this process.
        message = Message(DRAMATIQ_QUEUE, DRAMATIQ_ACTOR, (), kwargs, {})
        broker.enqueue(message)

    dramatiq = str(Path(python_argv()[0]).parent / "dramatiq")
    command = [dramatiq, "apps", "--processes", str(CONCURRENCY), "--threads", "1"]
    return System("dramatiq", send, [[*command, "--queues", DRAMATIQ_QUEUE]], _dramatiq_acked)


def raw_system(url: str) -> System:
    client = redis.Redis.from_url(url)

    def send(sent: float | None) -> None:
        client.lpush(RAW_QUEUE, "" if sent is None else repr(sent))

    consume = "import apps; apps.blpop_loop()"
    commands = [python_argv("-c", consume) for _ in range(CONCURRENCY)]
    return System("raw", send, commands, lambda client: True)


MAKERS = {
    "bgqueue": bgqueue_system,
    "celery": celery_system,
    "dramatiq": dramatiq_system,
    "raw": raw_system,
}


def latency(system: System, client: redis.Redis, samples: int) -> list[float]:
    """Submit-to-start lags in ms of `samples` no-ops sent one at a time to idle consumers."""
    pauses = random.Random(5).choices(range(5, 25), k=samples)  # ms; the same for every system
    client.delete(LAGS)
    for i, pause in enumerate(pauses):
        system.send(time.time())
        wait_until(lambda i=i: client.llen(LAGS) > i, 30, f"{system.name} to start a no-op")
        time.sleep(pause / 1000)
    return [float(lag) * 1000 for lag in client.lrange(LAGS, 0, -1)]


def cpu_seconds(procs: list[subprocess.Popen[bytes]], client: redis.Redis) -> dict[str, float]:
    """CPU seconds used so far by each consumer (its pool children apart) and by Redis."""
    used: dict[str, float] = {}
    for i, proc in enumerate(procs):
        main = psutil.Process(proc.pid)
        for role, members in ((f"{i}", [main]), (f"{i}.pool", main.children(recursive=True))):
            for member in members:
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = member.cpu_times()
                    used[role] = used.get(role, 0.0) + times.user + times.system
    info = client.info("cpu")
    used["redis"] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return used


def measure(
    url: str, name: str, n: int, samples: int
) -> tuple[float, list[float], dict[str, float]]:
    """Drain rate, idle latencies and CPU ms per run by process of one system, on a flushed
    Redis, consumers stopped at the end."""
    client = redis.Redis.from_url(url)
    client.flushall()
    system = MAKERS[name](url)
    env = service_env(url)
    with processes() as procs:
        # The backlog goes in first; the consumers start on a full queue.
        for _ in range(n):
            system.send(None)
        for i, command in enumerate(system.commands):
            procs.append(start_process(command, env, name=f"drain-{name}-{i}"))

        def finished() -> bool:
            _check_alive(procs)
            return int(client.get(DONE) or 0) >= n and system.settled(client)

        wait_until(lambda: client.exists(FIRST), 120, f"{name} to start", interval=0.002)
        before, done_before = cpu_seconds(procs, client), int(client.get(DONE) or 0)
        wait_until(finished, 300, f"{name} to drain {n} no-ops", interval=0.002)
        ended = time.time()
        after = cpu_seconds(procs, client)
        per_s = rate(n, ended - float(client.get(FIRST) or ended))
        runs = max(1, n - done_before)
        cpu = {role: (after[role] - before.get(role, 0.0)) * 1000 / runs for role in after}
        lags = latency(system, client, samples)
    client.close()
    return per_s, lags, {_role_name(name, role): ms for role, ms in cpu.items() if ms > 0}


def _role_name(system: str, role: str) -> str:
    """'0' → the first command's main process, '0.pool' → its children, by system."""
    names = {"bgqueue": ("beat", "worker"), "celery": ("worker",)}.get(system, ())
    first, _, pool = role.partition(".")
    if not first.isdigit():
        return role
    base = names[int(first)] if int(first) < len(names) else f"consumer{first}"
    return f"{base} pool" if pool else base


def _check_alive(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}; see its log")


def run(url: str, quick: bool) -> dict[str, float]:
    """Measure (c) and idle latency on the Redis at `url`; print a table; return the figures."""
    n, rounds = (1000, 1) if quick else (3000, 3)
    samples = {"dramatiq": 15 if quick else 50}
    default_samples = 60 if quick else 300
    rates: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    lags: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    cpus: dict[str, list[dict[str, float]]] = {name: [] for name in SYSTEMS}
    print(f"(c) drain of {n:,} queued no-ops, {CONCURRENCY} processes, {rounds} round(s)")
    for _ in range(rounds):
        for name in SYSTEMS:
            per_s, found, cpu = measure(url, name, n, samples.get(name, default_samples))
            rates[name].append(per_s)
            cpus[name].append(cpu)
            lags[name] += found
    figures: dict[str, float] = {}
    names = {"bgqueue": "drain_per_s"}
    celery = statistics.median(rates["celery"])
    for name in SYSTEMS:
        per_s = statistics.median(rates[name])
        figures[names.get(name, f"{name}_drain_per_s")] = per_s
        rounds_text = ", ".join(f"{r:,.0f}" for r in rates[name])
        print(f"  {name:9} {per_s:9,.0f}/s  x{per_s / celery:5.2f} Celery   ({rounds_text})")
    figures["drain_ratio_vs_celery"] = figures["drain_per_s"] / celery
    figures["dramatiq_drain_ratio_vs_celery"] = figures["dramatiq_drain_per_s"] / celery
    print("CPU ms per run during the drain, by process (last round)")
    for name in ("bgqueue", "celery"):
        cpu = cpus[name][-1]
        parts = ", ".join(f"{role} {ms:.2f}" for role, ms in cpu.items())
        print(f"  {name:9} {sum(cpu.values()):5.2f} = {parts}")
        prefix = "drain" if name == "bgqueue" else f"{name}_drain"
        figures[f"{prefix}_cpu_ms_per_run"] = sum(cpu.values())
        figures[f"{prefix}_redis_cpu_ms_per_run"] = cpu.get("redis", 0.0)
    figures["drain_redis_cpu_ratio_vs_celery"] = (
        figures["drain_redis_cpu_ms_per_run"] / figures["celery_drain_redis_cpu_ms_per_run"]
    )
    print("idle submit-to-start latency, ms")
    for name in SYSTEMS:
        values = lags[name]
        prefix = "latency" if name == "bgqueue" else f"{name}_latency"
        figures[f"{prefix}_p50_ms"] = percentile(values, 50)
        figures[f"{prefix}_p99_ms"] = percentile(values, 99)
        print(
            f"  {name:9} p50 {percentile(values, 50):7.2f}  p99 {percentile(values, 99):7.2f}"
            f"  max {max(values):7.2f}  ({len(values)} samples)"
        )
    figures["latency_p50_ratio_vs_celery"] = (
        figures["latency_p50_ms"] / figures["celery_latency_p50_ms"]
    )
    return figures
