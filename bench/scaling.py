"""Horizontal scaling: requests completed per second with 1, 2 and 4 worker processes
(each `bgqueue worker --concurrency 1`) sharing one Redis and one beat.

    .venv/bin/python bench/scaling.py [--requests 600] [--spin 0.01]

Each request burns `spin` seconds of CPU, so throughput should grow with workers until the
machine's cores are busy (2 here), then flatten. Also checks that no request ran twice.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

import bgqueue as bg
from bgqueue.broker.embedded import RedisServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_app import DONE, app  # noqa: E402

APP_SPEC = f"{Path(__file__).resolve().parent / 'scale_app.py'}:app"


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bgqueue", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait(check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.01)


def run(url: str, workers: int, requests: int, spin: float) -> tuple[float, int]:
    client = redis.Redis.from_url(url)
    client.flushall()
    env = {**os.environ, "BGQUEUE_BROKER_URL": url}
    procs = [start(["beat"], env)]
    for i in range(workers):
        args = ["worker", "--app", APP_SPEC, "--name", f"w{i}", "--concurrency", "1"]
        procs.append(start([*args, "--loglevel", "WARNING"], env))
    try:
        app._client = None
        app.use_broker(url)
        wait(lambda: len(app.live_workers()) == workers, 60)
        # One identifier per scope (replacing is per scope); submitting is timed too.
        began = time.perf_counter()
        for i in range(requests):
            request = bg.ProcessingTaskRequest("bench.scale.work", payload={"spin": spin})
            app.scheduler_for(f"s{i}").submit(request)
        wait(lambda: int(client.get(DONE) or 0) >= requests, 600)
        elapsed = time.perf_counter() - began
        twice = int(client.get(DONE) or 0) - client.scard(f"{DONE}:ids")
        return requests / elapsed, twice
    finally:
        stop(procs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--spin", type=float, default=0.01)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            results = {n: run(server.url, n, args.requests, args.spin) for n in (1, 2, 4)}
        finally:
            server.stop()
    base = results[1][0]
    for n, (rate, twice) in results.items():
        print(f"workers_{n}_per_s: {rate:,.1f}  (x{rate / base:.2f}, ran twice: {twice})")


if __name__ == "__main__":
    main()
