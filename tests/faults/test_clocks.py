"""Clocks skewed between hosts: beat and each worker run with their own wall clock (hours
off) and their own monotonic clock (as a host that booted at another time), against one
Redis and a producer on true time.

bgqueue judges due times, leases and heartbeats on Redis's clock, so skew must change
nothing: requests start on their dates (not an hour early or late), a worker killed mid-run
is recovered as fast as with true clocks, and a worker whose clock is ahead of another's by
more than kombu's visibility timeout, which therefore hands that worker's unacknowledged
messages (of runs still going) back to their queues when it starts, makes nothing run twice.

The wall clock is shifted by skewclock.c, preloaded (built here with the C compiler); the
monotonic clock by a time namespace (`unshare --time`, root).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

import bgqueue as bg
from tests.faults.probes import (
    APP_KEYS,
    HANDLED,
    HEARTBEAT_TIMEOUT,
    SLOW,
    await_completion,
    processing,
    queued,
    ran_twice,
    started_counts,
    stuck,
)
from tests.harness import SAMPLE_APP, Cluster, Proc, events, wait_for

Row = Callable[..., None]
HOUR = 3600  # also kombu's visibility timeout (celery_config's broker_transport_options)


@pytest.fixture(scope="session")
def skewclock(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """skewclock.c built into a shared library to preload."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail("the clock-skew scenario builds skewclock.c: it needs a C compiler (cc)")
    library = tmp_path_factory.mktemp("skewclock") / "skewclock.so"
    source = Path(__file__).with_name("skewclock.c")
    command = [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"]
    subprocess.run(command, check=True, capture_output=True)
    return library


def start_skewed(
    cluster: Cluster, library: Path, args: list[str], name: str, wall: float, boot: int
) -> Proc:
    """Start `bgqueue ARGS` with its wall clock `wall` seconds off true time and its
    monotonic clock `boot` seconds ahead."""
    env = {
        **cluster.env,
        "LD_PRELOAD": str(library),
        "SKEWCLOCK_OFFSET": str(wall),
        "TEST_PROCESSING_BUDGET": "20",
    }
    prefix = ["unshare", "--time", "--monotonic", str(boot), "--boottime", str(boot)]
    proc = Proc(args, env, cluster.tmp_path / f"{name}.log", prefix)
    cluster.procs.append(proc)
    return proc


def skewed_worker(
    cluster: Cluster, library: Path, name: str, wall: float, boot: int, concurrency: int
) -> Proc:
    args = ["worker", "--app", SAMPLE_APP, "--name", name, "--concurrency", str(concurrency)]
    proc = start_skewed(cluster, library, args, name, wall, boot)
    wait_for(lambda: cluster.worker_alive(name) or not proc.alive(), 30, f"worker {name}")
    assert proc.alive(), proc.log()
    return proc


STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+: ", re.MULTILINE)


def log_clock_offset(proc: Proc) -> float:
    """Seconds the process's wall clock is off true time, from the (local time) stamp of
    the last line it logged, a moment ago: proof that the skew is real."""
    stamps = STAMP.findall(proc.log())
    assert stamps, proc.log()
    return (datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S") - datetime.now()).total_seconds()


def test_clocks_skewed_between_hosts(
    cluster: Cluster,
    sample_app: bg.BackgroundApp,
    redis_client: redis.Redis,
    fault_row: Row,
    skewclock: Path,
) -> None:
    """Beat an hour ahead, worker wA an hour behind, worker wB two hours ahead, each with
    another boot time: requests due in 2-3 s, sent ahead with their date as the ETA, start
    on their dates (on Redis's clock: each worker moves the ETA by its measured offset),
    wA SIGKILLed mid-run has its runs rerun on wB within the heartbeat timeout + a few
    seconds, and nothing is lost."""
    worker_a = skewed_worker(cluster, skewclock, "wA", -HOUR, 86_400, 2)
    assert abs(log_clock_offset(worker_a) + HOUR) < 30
    beat = start_skewed(cluster, skewclock, ["beat"], "beat", HOUR, 7 * 86_400)
    wait_for(lambda: " leads" in beat.log(), 15, "beat to lead")
    assert abs(log_clock_offset(beat) - HOUR) < 30
    running = {("running", SLOW), ("running", HANDLED[0])}
    sample_app.scheduler_for("running").submit_many(
        processing(i, {"sleep": 6, "complete": True}) for _, i in running
    )
    wait_for(lambda: len(events(redis_client, "start")) == 2, 20, "both to start on wA")

    # Room for wA's two reruns and four dated requests at once: lateness is the clocks'.
    worker_b = skewed_worker(cluster, skewclock, "wB", 2 * HOUR, 30 * 86_400, 6)
    assert abs(log_clock_offset(worker_b) - 2 * HOUR) < 30
    # No message of wA's goes to wB meanwhile (kombu's ack emulation is off: a message lives
    # in the worker that took it, and bgqueue's leases recover it if that worker dies).
    assert queued(redis_client) == 0 and redis_client.hlen(APP_KEYS.running) == 2

    begin = datetime.now(UTC) + timedelta(seconds=2)
    dated = {}
    for n, scope in enumerate(("dated-0", "dated-1")):
        at = begin + timedelta(seconds=n)
        sample_app.scheduler_for(scope).submit_many(
            processing(i, {"complete": True}, at) for i in HANDLED[1:5]
        )
        dated.update({(scope, i): at for i in HANDLED[1:5]})

    os.killpg(worker_a.pid, signal.SIGKILL)
    worker_a.popen.wait(10)
    killed_at = time.monotonic()
    wait_for(
        lambda: (
            {e["id"] for e in events(redis_client, "start") if e["worker"] == "wB"}
            >= {i for _, i in running}
        ),
        HEARTBEAT_TIMEOUT + 8,
        "wA's runs to run again on wB",
    )
    recovery = time.monotonic() - killed_at

    accepted = running | set(dated)
    lost, _ = await_completion(sample_app, accepted, 30)
    records = [r for s in ("dated-0", "dated-1") for r in sample_app.scheduler_for(s).history()]
    lateness = [
        (r.started_at - dated[(r.scope, r.identifier)]).total_seconds()
        for r in records
        if r.started_at is not None
    ]
    twice = ran_twice(redis_client)
    fault_row(
        "clocks skewed: beat +1h, wA -1h, wB +2h",
        accepted=len(accepted),
        lost=len(lost),
        twice=len(twice),
        allowed=len(running),
        recovery=recovery,
        note=f"dated starts {min(lateness):+.3f}..{max(lateness):+.3f} s off their dates; "
        "wA killed -> reruns on wB",
    )
    assert not lost, stuck(redis_client)
    assert len(lateness) == len(dated)
    assert all(0 <= late < 1 for late in lateness), lateness
    per_gen, _ = started_counts(redis_client)
    assert set(per_gen.values()) == {1}  # the handed-back messages never started a run
