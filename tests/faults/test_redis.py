"""Redis failing under load: SIGKILLed and restarted from its AOF, paused (SIGSTOP) past
the heartbeat timeout, and not there at all."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

import bgqueue as bg
from bgqueue.broker.embedded import HOST, RedisServer, free_port
from tests.faults.probes import (
    APP_KEYS,
    HANDLED,
    HEARTBEAT_TIMEOUT,
    Key,
    await_completion,
    beat_holder,
    ended,
    processing,
    producer,
    ran_twice,
    stuck,
)
from tests.harness import Cluster, events, wait_for

Row = Callable[..., None]


@contextmanager
def cluster_on(server: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    group = Cluster(server.url, tmp_path)
    try:
        yield group
    finally:
        group.kill_all()
        group.stop_all()


class SteadyProducer:
    """Submits one request every `every` seconds from its own thread and connection, each
    in a scope of its own, until stopped; keeps what was accepted and what was refused."""

    def __init__(self, url: str, every: float = 0.05, limit: int = 400) -> None:
        self.app = producer(url)
        self.every, self.limit = every, limit
        self.accepted: set[Key] = set()
        self.refused: list[str] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for n in range(self.limit):
            if self.stopped.wait(self.every):
                return
            scope, identifier = f"stream-{n:03d}", HANDLED[n % len(HANDLED)]
            try:
                self.app.scheduler_for(scope).submit(processing(identifier, {"complete": True}))
            except bg.ServiceError as exc:  # not accepted: the caller was told
                self.refused.append(str(exc))
            else:
                self.accepted.add((scope, identifier))

    def __enter__(self) -> SteadyProducer:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stopped.set()
        self.thread.join(30)


def test_redis_sigkill_and_aof_restart_loses_nothing_and_processes_reconnect(
    make_redis_server: Callable[..., RedisServer], tmp_path: Path, fault_row: Row
) -> None:
    """Redis SIGKILLed and restarted from its AOF (appendfsync always) while requests run
    and a producer submits: 50 future, 8 immediate and every streamed request accepted
    before or after the outage complete as submitted, and the running worker and beat
    (never restarted) serve new requests within 10 s of the restart."""
    server = make_redis_server(appendfsync="always")
    with cluster_on(server, tmp_path) as group:
        worker = group.worker("w1", concurrency=4)
        beat = group.beat()
        client = group.client
        wait_for(lambda: beat_holder(client), 15, "beat to lead")
        app = producer(server.url)
        begin = datetime.now(UTC) + timedelta(seconds=3)
        future_scopes = [f"later-{i}" for i in range(10)]
        submitted: dict[Key, tuple[dict[str, Any], datetime | None]] = {}
        for n, scope in enumerate(future_scopes):
            batch = []
            for k, identifier in enumerate(HANDLED[:5]):
                at = begin + timedelta(milliseconds=40 * (5 * n + k))
                payload = {"complete": True, "n": 5 * n + k}
                submitted[(scope, identifier)] = (payload, at)
                batch.append(processing(identifier, payload, at))
            app.scheduler_for(scope).submit_many(batch)
        now_batch = []
        for k, identifier in enumerate(HANDLED):
            payload = {"complete": True, "sleep": 1, "now": k}
            submitted[("now", identifier)] = (payload, None)
            now_batch.append(processing(identifier, payload))
        app.scheduler_for("now").submit_many(now_batch)
        # Kill Redis while immediate requests run (their workers' connections then break).
        wait_for(lambda: len(events(client, "start")) >= 4, 15, "immediate requests to start")

        with SteadyProducer(server.url) as stream:
            wait_for(lambda: len(stream.accepted) >= 5, 10, "the stream to be accepted")
            server.kill()
            server.restart()
            restarted_at = time.monotonic()
            fresh = redis.Redis.from_url(server.url)
            # Every accepted future request survived the SIGKILL (they cannot have run yet).
            assert all(fresh.hexists(APP_KEYS.requests(s), i) for s, i in submitted if s != "now")

            # The same worker process beats again, the same beat leads again.
            wait_for(lambda: group.worker_alive("w1"), 10, "the worker's heartbeat")
            # The producer connected before the outage submits again without being rebuilt.
            app.scheduler_for("after").submit(processing(HANDLED[0], {"complete": True}))
            wait_for(lambda: ("after", HANDLED[0]) in ended(fresh), 10, "service within 10 s")
            recovery = time.monotonic() - restarted_at
            wait_for(lambda: len(stream.accepted) >= 40, 10, "the stream to go on")
        assert worker.alive(), worker.log()[-3000:]
        assert beat.alive(), beat.log()[-3000:]

        after = producer(server.url)
        accepted = set(submitted) | stream.accepted | {("after", HANDLED[0])}
        lost, _ = await_completion(after, accepted, 30)
        twice = ran_twice(fresh)
        running_then = {("now", i) for i in HANDLED}
        fault_row(
            "Redis SIGKILL + AOF restart under load",
            accepted=len(accepted),
            lost=len(lost),
            twice=len(twice),
            allowed=len(running_then),
            recovery=recovery,
            note=f"{len(stream.refused)} submits refused (ServiceError) during the outage; "
            "restart -> a new request done",
        )
        starts = events(fresh, "start")
        for (scope, identifier), (payload, at) in submitted.items():
            runs = [e for e in starts if (e["scope"], e["id"]) == (scope, identifier)]
            assert runs and all(e["payload"] == payload for e in runs), (scope, identifier)
            if at is not None:
                assert min(e["t"] for e in runs) >= at.timestamp() - 0.01, "ran before its date"
        scopes = sorted({s for s, _ in accepted})
        records = [r for scope in scopes for r in after.scheduler_for(scope).history()]
        # Anything not completed is a run lost to the outage and retried (at-least-once).
        assert all("worker lost" in r.reason for r in records if r.state != "completed")
        # Only an immediate request caught running by the restart may have run twice.
        assert set(twice) <= running_then
        fresh.close()


def test_redis_paused_past_the_heartbeat_timeout(
    make_redis_server: Callable[..., RedisServer], tmp_path: Path, fault_row: Row
) -> None:
    """Redis paused (SIGSTOP) for twice the heartbeat timeout under load, then resumed: on
    Redis's clock every heartbeat and run lease lapsed meanwhile, though no process died.
    Submits made during the pause wait and are accepted; every accepted request completes;
    the paused runs are not given up as lost when their workers can renew them, and the
    system serves new requests at once after the pause."""
    server = make_redis_server()
    pause = 2 * HEARTBEAT_TIMEOUT
    with cluster_on(server, tmp_path) as group:
        group.worker("wA", concurrency=2, env={"TEST_PROCESSING_BUDGET": "20"})
        group.worker("wB", concurrency=2, env={"TEST_PROCESSING_BUDGET": "20"})
        group.beat()
        client = group.client
        wait_for(lambda: beat_holder(client), 15, "beat to lead")
        app = producer(server.url)
        running = {("running", i) for i in HANDLED[:4]}
        app.scheduler_for("running").submit_many(
            processing(i, {"sleep": pause + 2, "complete": True}) for _, i in running
        )
        # Due while Redis is paused.
        begin = datetime.now(UTC) + timedelta(seconds=2.5)
        due_in_pause = {(f"due-{n}", i) for n in range(4) for i in HANDLED[:4]}
        for n in range(4):
            app.scheduler_for(f"due-{n}").submit_many(
                processing(i, {"complete": True}, begin) for i in HANDLED[:4]
            )
        wait_for(lambda: len(events(client, "start")) == 4, 15, "4 runs to start")
        server_process = psutil.Process(int(client.info("server")["process_id"]))

        with SteadyProducer(server.url) as stream:
            wait_for(lambda: len(stream.accepted) >= 5, 10, "the stream to be accepted")
            server_process.suspend()
            try:
                time.sleep(pause)  # the fault itself lasts this long; nothing is awaited
            finally:
                server_process.resume()
            resumed_at = time.monotonic()
            app.scheduler_for("after").submit(processing(HANDLED[0], {"complete": True}))
            wait_for(lambda: ("after", HANDLED[0]) in ended(client), 10, "service after pause")
            recovery = time.monotonic() - resumed_at
            wait_for(lambda: len(stream.accepted) >= 60, 15, "the stream to go on")

        accepted = running | due_in_pause | stream.accepted | {("after", HANDLED[0])}
        lost, _ = await_completion(app, accepted, 30)
        twice = ran_twice(client)
        fault_row(
            f"Redis paused (SIGSTOP) {pause:.1f} s under load",
            accepted=len(accepted),
            lost=len(lost),
            twice=len(twice),
            allowed=len(running),
            recovery=recovery,
            note=f"{len(stream.refused)} submits refused; resume -> a new request done; "
            f"{len(twice)} runs given up and rerun",
        )
        assert not lost, stuck(client)
        assert not stream.refused  # a pause shorter than the socket timeout only delays


def test_unreachable_broker_is_a_service_error_without_the_password(fault_row: Row) -> None:
    """Submitting to a closed port raises ServiceError 9800004 within 5 s, naming
    127.0.0.1:<port> and never the password: nothing is accepted, so nothing can be lost."""
    port = free_port()  # nothing listens there
    app = bg.BackgroundApp(
        "com.bgqueue.unreachable",
        permitted_identifiers=["com.bgqueue.unreachable.*"],
        broker_url=f"redis://:secret@{HOST}:{port}/0",
    )
    started = time.monotonic()
    with pytest.raises(bg.ServiceError) as caught:
        app.scheduler.submit(bg.ProcessingTaskRequest("com.bgqueue.unreachable.job"))
    refused_in = time.monotonic() - started
    fault_row(
        "broker unreachable (nothing listening)",
        accepted=0,
        lost=0,
        twice=0,
        allowed=0,
        recovery=None,
        note=f"submit refused with ServiceError 9800004 in {refused_in:.2f} s",
    )
    assert refused_in < 5
    assert caught.value.code == 9800004
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "secret" not in str(caught.value) and "secret" not in repr(caught.value.args)
