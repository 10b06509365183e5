"""Every key bgqueue writes is bounded in size and lifetime: a soak of real processes.

Ten thousand scopes get a request each, which runs; fifty workers start under their
default names (hostname-pid, as a restarted container's would) and are killed. Once the
retention (shortened by settings, as every timing is in tests) has passed, Redis holds as
many keys and as much memory as it did before the soak, within 5 %: histories expire with
their idle scopes, dead workers' queues and bindings are deleted, forgotten workers and
classes leave nothing behind.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

import bgqueue as bg
from bgqueue.broker.embedded import RedisServer
from bgqueue.model import scripts
from tests.apps.sample import EVENTS
from tests.harness import APP_ID, SAMPLE_APP, Cluster, wait_for

RETENTION = 3.0  # seconds: history retention, and how long the gone are remembered
SCOPES = 10_000
BURST = 4 * SCOPES  # keys of settle_redis's burst: more than the soak ever holds at once
RESTARTS = 50


def footprint(client: redis.Redis) -> tuple[int, int]:
    """Redis's key count and used_memory. Redis 7 keeps a latency histogram (some 30 KB)
    per command it has served since its stats were last reset, so a command first used in
    the soak would count as bgqueue's: the stats are reset first."""
    client.config_resetstat()
    return int(client.dbsize()), int(client.info("memory")["used_memory"])


def test_keys_and_memory_return_to_where_they_started_after_a_soak(
    make_redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = make_redis_server()
    env = {"BGQUEUE_HISTORY_RETENTION": str(RETENTION), "BGQUEUE_FORGET_AFTER": str(RETENTION)}
    cluster = Cluster(server.url, tmp_path, env=env)
    client = cluster.client
    app = bg.BackgroundApp(APP_ID, permitted_identifiers=[f"{APP_ID}.*"], broker_url=server.url)
    keys = app.keys
    try:
        cluster.beat()
        cluster.worker("steady", concurrency=4)
        # A steady state: one request run and its history gone, every script loaded.
        app.scheduler_for("warm-up").submit(bg.ProcessingTaskRequest(f"{APP_ID}.a"))
        wait_for(lambda: app.scheduler_for("warm-up").history(), 15, "the warm-up run")
        wait_for(lambda: not client.exists(keys.history("warm-up")), 15, "its history to go")
        client.delete(EVENTS)  # the sample app's record of its runs: the test's, not bgqueue's
        # Redis's slow log keeps the arguments of its last 128 slow commands: bounded, not
        # bgqueue's, and fuller the busier the machine (up to some 300 KB seen). Off here.
        client.config_set("slowlog-max-len", 0)
        client.slowlog_reset()
        # Every script loaded (each costs Redis some 8 KB), not only those the warm-up ran:
        # which ones the soak loads (recover.lua after a lease lapsed...) depends on timing.
        for name in scripts.NAMES:
            client.script_load(scripts.source(name))
        settle_redis(client)
        start_keys, start_memory = footprint(client)
        start_names = set(client.scan_iter(count=1000))
        start_info = client.info("memory")
        start_sizes = key_sizes(client)
        start_stats = client.memory_stats()

        began = time.monotonic()
        peak = []
        for n in range(SCOPES):
            app.scheduler_for(f"device-{n}").submit(bg.ProcessingTaskRequest(f"{APP_ID}.a"))
            if n % 1000 == 999:  # the workers run them meanwhile: the peak is during the soak
                peak.append(footprint(client))
        restart_workers(cluster, client, keys.alive)

        def all_ran() -> bool:
            peak.append(footprint(client))
            return not client.exists(keys.counts) and not client.hlen(keys.running)

        wait_for(all_ran, 120, "every request to have run")
        client.delete(EVENTS)
        peak_keys, peak_memory = max(peak)
        ran = time.monotonic() - began

        def settled() -> tuple[int, int] | None:
            keys_now, memory_now = footprint(client)
            if keys_now <= start_keys * 1.05 and memory_now <= start_memory * 1.05:
                return keys_now, memory_now
            return None

        try:
            end_keys, end_memory = wait_for(settled, RETENTION * 6, "keys and memory to settle")
        except AssertionError:
            left = sorted(set(client.scan_iter(count=1000)) - start_names)
            info = client.info("memory")
            stats = client.memory_stats()
            parts = {
                k: (start_info[k], v)
                for k, v in info.items()
                if k.startswith(("used_memory_", "mem_"))
                and isinstance(v, int)
                and v != start_info[k]
            }
            raise AssertionError(
                f"start {start_keys} keys {start_memory} B, now {footprint(client)}; "
                f"{len(left)} new keys, e.g. {left[:15]}; memory {parts}; keys (start, now): "
                f"{key_sizes(client, start_sizes)}; MEMORY STATS (start, now): "
                f"{ {k: (start_stats.get(k), v) for k, v in stats.items() if v != start_stats[k]} }"
            ) from None
        print(
            f"\nstart {start_keys} keys, {start_memory} B; after {SCOPES} runs and "
            f"{RESTARTS} worker restarts ({ran:.0f} s): {peak_keys} keys, {peak_memory} B; "
            f"then {end_keys} keys, {end_memory} B"
        )
        assert peak_keys > start_keys + SCOPES / 2, "the soak did leave keys behind at first"
        assert client.zcard(keys.alive) == 1  # the steady worker; the killed are forgotten
        # Of the per-worker queues and kombu's bindings of them, only the steady worker's.
        per_worker = {k.decode() for k in client.scan_iter(match=f"*bgqueue.{APP_ID}.worker.*")}
        assert per_worker <= {
            f"_kombu.binding{kind}.bgqueue.{APP_ID}.worker.steady" for kind in ("", "_permanent")
        }, per_worker
    finally:
        cluster.kill_all()
        cluster.stop_all()


def key_sizes(
    client: redis.Redis, before: dict[bytes, tuple[Any, ...]] | None = None
) -> dict[bytes, tuple[Any, ...]]:
    """Each key's MEMORY USAGE (every element counted) and encoding; with `before`, each
    key whose size changed, as (before, now)."""
    sizes = {
        name: (client.memory_usage(name, samples=0), client.object("encoding", name))
        for name in client.scan_iter(count=1000)
    }
    if before is None:
        return sizes
    return {
        name: (before.get(name), size) for name, size in sizes.items() if before.get(name) != size
    }


def settle_redis(client: redis.Redis) -> None:
    """Bring Redis's own structures to the size a burst of BURST keys leaves them at: after
    such a burst, however its keys go, Redis keeps some 170 KB it had not before (seen with
    plain SETs and EXPIREs, no bgqueue involved), and more the larger the burst (its key
    tables double in size as they fill). BURST is above any peak of the soak (one to three
    keys a scope while it waits or has run), so measuring from there, what remains after
    the soak is what bgqueue left, however slowly the machine lets the workers drain it."""
    with client.pipeline(transaction=False) as pipe:
        for n in range(BURST):
            pipe.rpush(f"test:burst:{n}", "x" * 100)
            pipe.pexpire(f"test:burst:{n}", 200)
        pipe.execute()
    wait_for(lambda: not any(client.scan_iter(match="test:burst:*", count=1000)), 30, "expiry")


def restart_workers(cluster: Cluster, client: redis.Redis, alive: str) -> None:
    """Start RESTARTS workers under their default names, five at a time, and SIGKILL each
    once its heartbeat is live."""
    for batch in range(0, RESTARTS, 5):
        before = set(client.zrange(alive, 0, -1))
        procs: list[Any] = [
            cluster.start(["worker", "--app", SAMPLE_APP, "--concurrency", "1"], f"r{n}")
            for n in range(batch, batch + 5)
        ]
        wait_for(
            lambda before=before: len(set(client.zrange(alive, 0, -1)) - before) == 5,
            60,
            "five restarted workers to be live",
        )
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait(10)
