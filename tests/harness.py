"""Real processes for tests: bgqueue workers and beats against the test Redis.

Intervals are shortened through the environment so that recovery takes about a
second; every wait polls a condition with a deadline, never a bare sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

import bgqueue as bg
from tests.apps.sample import EVENTS

REPO = Path(__file__).resolve().parents[1]
SAMPLE_APP = "tests.apps.sample:app"
APP_ID = "com.bgqueue.test"

FAST = {
    "BGQUEUE_HEARTBEAT_INTERVAL": "0.2",
    "BGQUEUE_HEARTBEAT_TIMEOUT": "1.5",
    "BGQUEUE_BEAT_LEASE": "1.5",
    "BGQUEUE_DISPATCH_LEASE": "1.5",
    "BGQUEUE_SWEEP_INTERVAL": "0.3",
}

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float = 15, message: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.02)


def events(
    client: redis.Redis, event: str | None = None, identifier: str | None = None
) -> list[dict[str, Any]]:
    """Events recorded by the sample app's handlers, oldest first, optionally filtered."""
    found = [json.loads(raw) for raw in client.lrange(EVENTS, 0, -1)]
    return [
        e
        for e in found
        if (event is None or e["event"] == event) and (identifier is None or e["id"] == identifier)
    ]


class Proc:
    """A bgqueue process started by a test, with its output in a log file."""

    def __init__(
        self, args: list[str], env: dict[str, str], log_path: Path, prefix: Sequence[str] = ()
    ) -> None:
        self.args = args
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [*prefix, sys.executable, "-m", "bgqueue", *args],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so kill() reaches the whole process group (pool too)
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send a signal to the main process only."""
        if self.alive():
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and pool children), and reap it."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (a graceful stop), then SIGKILL whatever is left."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        if self.alive():
            self.kill()
        else:
            # Pool children of a killed main process may linger in the group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Cluster:
    """Starts workers and beats for one test and stops them all at its end."""

    def __init__(self, redis_url: str, tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.redis_url = redis_url
        self.tmp_path = tmp_path
        self.env = {**os.environ, **FAST, "BGQUEUE_BROKER_URL": redis_url, **(env or {})}
        self.env.pop("PYTEST_CURRENT_TEST", None)
        self.procs: list[Proc] = []
        self.client = redis.Redis.from_url(redis_url)

    def start(
        self,
        args: list[str],
        name: str,
        env: dict[str, str] | None = None,
        netns: str | None = None,
    ) -> Proc:
        """Start `bgqueue ARGS`, on this machine or inside a test host's network namespace."""
        prefix = ["ip", "netns", "exec", netns] if netns else []
        proc = Proc(args, {**self.env, **(env or {})}, self.tmp_path / f"{name}.log", prefix)
        self.procs.append(proc)
        return proc

    def worker(
        self,
        name: str = "w1",
        conditions: Iterable[str] = (),
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        wait: bool = True,
        continuous: bool = False,
        app: str = SAMPLE_APP,
        app_id: str = APP_ID,
        netns: str | None = None,
    ) -> Proc:
        """Start `bgqueue worker` (on the sample app unless told) and wait until its
        heartbeat is live."""
        args = ["worker", "--app", app, "--name", name, "--concurrency", str(concurrency)]
        if continuous:
            args.append("--continuous")
        for condition in conditions:
            args += ["--condition", condition]
        proc = self.start(args, name, env, netns)
        if wait:
            wait_for(
                lambda: self.worker_alive(name, app_id) or self._died(proc), 30, f"worker {name}"
            )
            assert proc.alive(), proc.log()
        return proc

    def beat(self, name: str = "beat", env: dict[str, str] | None = None) -> Proc:
        """Start `bgqueue beat`."""
        return self.start(["beat"], name, env)

    def worker_alive(self, name: str, app_id: str = APP_ID) -> bool:
        """Whether the worker's heartbeat is live now (server clock)."""
        score = self.client.zscore(f"bgqueue:{{{app_id}}}:alive", name)
        if score is None:
            return False
        seconds, micros = self.client.time()
        return score > seconds * 1000 + micros / 1000

    @staticmethod
    def _died(proc: Proc) -> bool:
        return not proc.alive()

    def kill_all(self) -> None:
        """SIGKILL every process group this test started: a graceful Celery shutdown takes
        about 1.5 s per worker, and most tests are not about shutting down."""
        for proc in self.procs:
            if proc.alive():
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.popen.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop(timeout=5)
        self.client.close()


# --- fixtures (imported by conftest.py) --------------------------------------------


@pytest.fixture
def cluster(redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """A process manager for this test's workers and beats, on the emptied test Redis."""
    manager = Cluster(redis_url, tmp_path)
    yield manager
    manager.stop_all()


@pytest.fixture
def sample_app(redis_url: str) -> bg.BackgroundApp:
    """The sample app as a producer sees it, connected to the test Redis."""
    from tests.apps import sample

    sample.app._client = None  # a previous test's connection points at the same server: drop it
    sample.app._announced = False  # and the server was emptied since it made itself known
    sample.app.use_broker(redis_url)
    return sample.app


def run_everywhere(
    app: bg.BackgroundApp, client: redis.Redis, scopes: list[str], identifiers: list[str]
) -> list[dict[str, Any]]:
    """Submit a short processing request per scope and identifier, wait until every one has
    ended, and return the start events (to count runs per request and per worker)."""
    for scope in scopes:
        app.scheduler_for(scope).submit_many(
            bg.ProcessingTaskRequest(i, payload={"sleep": 0.05, "complete": True})
            for i in identifiers
        )
    expected = {(s, i) for s in scopes for i in identifiers}
    wait_for(
        lambda: {(e["scope"], e["id"]) for e in events(client, "end")} == expected,
        90,
        f"all {len(expected)} requests to complete",
    )
    return events(client, "start")
