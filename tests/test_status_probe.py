"""`bgqueue status --check-worker NAME`, the workers' health check and readiness probe, run
as a real subprocess against real worker processes on the test Redis."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import bgqueue as bg
from bgqueue.broker.embedded import free_port
from tests.harness import APP_ID, FAST, Cluster, wait_for

ROOT = Path(__file__).resolve().parents[1]


def check_worker(redis_url: str, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **FAST, "BGQUEUE_BROKER_URL": redis_url}
    env.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.run(
        [sys.executable, "-m", "bgqueue", "status", "--check-worker", name, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def answer(done: subprocess.CompletedProcess[str]) -> str:
    """The probe's one line of output (nothing on stderr, no traceback)."""
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and not done.stderr, (done.stdout, done.stderr)
    return lines[0]


def test_check_worker_passes_only_while_the_named_worker_beats(
    cluster: Cluster, redis_url: str
) -> None:
    """Live worker: exit 0. Unknown name: exit 1. Killed worker: exit 1 once its heartbeat
    has lapsed (by Redis's clock), saying how long ago. A worker that stops cleanly leaves,
    so it is unknown again."""
    # Both start at once: a Celery worker's start-up is most of this test's time.
    killed = cluster.worker("probe-killed", concurrency=1, wait=False)
    stopped = cluster.worker("probe-stopped", concurrency=1, wait=False)
    for name in ("probe-killed", "probe-stopped"):
        wait_for(functools.partial(cluster.worker_alive, name), 30, f"worker {name}")

    done = check_worker(redis_url, "probe-killed")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.fullmatch(
        rf"worker probe-killed: live \(app {re.escape(APP_ID)}, heartbeat good for \d+\.\d s\)",
        answer(done),
    )

    done = check_worker(redis_url, "probe-nobody")
    assert done.returncode == 1
    assert answer(done).startswith("worker probe-nobody: not live: unknown (")

    killed.kill()  # SIGKILL: no goodbye, its entry stays until it lapses
    stopped.signal(signal.SIGTERM)  # a warm shutdown: the worker announces it is leaving
    wait_for(lambda: not cluster.worker_alive("probe-killed"), 10, "the heartbeat to lapse")
    done = check_worker(redis_url, "probe-killed")
    assert done.returncode == 1
    lapsed = r"worker probe-killed: not live: heartbeat lapsed \d+\.\d s ago"
    assert re.fullmatch(rf"{lapsed} \(app {re.escape(APP_ID)}\)", answer(done))

    stopped.popen.wait(30)
    done = check_worker(redis_url, "probe-stopped")
    assert done.returncode == 1
    assert answer(done).startswith("worker probe-stopped: not live: unknown (")


def test_check_worker_counts_a_worker_of_any_app(redis_url: str) -> None:
    """The name is looked up in every app: live in one app is live, even where another app
    has a lapsed entry under the same name. Heartbeats are written as the worker's own
    heartbeat script writes them."""
    fresh = bg.BackgroundApp("com.bgqueue.probe.fresh", broker_url=redis_url)
    stale = bg.BackgroundApp("com.bgqueue.probe.stale", broker_url=redis_url)

    def beat(app: bg.BackgroundApp, timeout_ms: int) -> None:
        k = app.keys
        script_keys = [k.workers, k.alive, k.classes, k.classlive]
        beat_json = '{"token": "t"}'
        app.call("heartbeat", script_keys, ["shared", beat_json, timeout_ms, "t", "c", "{}"])

    for app, timeout_ms in ((stale, 1), (fresh, 60_000)):
        app.announce()
        beat(app, timeout_ms)
    wait_for(lambda: check_worker(redis_url, "shared").returncode == 0, 10, "live in one app")
    assert "(app com.bgqueue.probe.fresh," in answer(check_worker(redis_url, "shared"))
    beat(fresh, 0)
    done = check_worker(redis_url, "shared")
    assert done.returncode == 1
    assert "heartbeat lapsed" in answer(done) and "(app com.bgqueue.probe.stale)" in answer(done)


def test_check_worker_errors_are_one_line_and_exit_2(redis_url: str) -> None:
    """A probe that cannot ask (no broker, no name) fails too, but says why, without a
    traceback, and with the exit status of every bgqueue error."""
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    for done in (
        check_worker(redis_url, "w1", "--broker", unreachable),
        check_worker(redis_url, " "),
    ):
        assert done.returncode == 2, done.stdout + done.stderr
        assert not done.stdout and len(done.stderr.splitlines()) == 1, done.stderr
        assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
