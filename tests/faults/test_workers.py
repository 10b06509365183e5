"""Workers that die or stall: SIGKILL mid-task, with many requests in flight, between
receiving a message and starting it, with a heartbeat in flight, and a whole worker
frozen (SIGSTOP) past its heartbeat timeout that then comes back."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
import redis

import bgqueue as bg
from tests.faults.probes import (
    APP_KEYS,
    HANDLED,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    SLOW,
    await_completion,
    completed_runs,
    dispatched,
    nothing_in_flight,
    processing,
    published,
    ran_twice,
    server_ms,
    started_counts,
    stuck,
)
from tests.harness import Cluster, events, wait_for

Row = Callable[..., None]
SLOW_ENV = {"TEST_PROCESSING_BUDGET": "20"}


def test_worker_sigkilled_mid_task_reruns_on_another_worker(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis, fault_row: Row
) -> None:
    """A task whose worker is SIGKILLed mid-run runs again (attempt 2) on another worker
    within heartbeat timeout + a few seconds; history keeps the lost and the completed run."""
    worker_a = cluster.worker("wA", concurrency=1, env=SLOW_ENV)
    cluster.beat()
    sample_app.scheduler.submit(processing(SLOW, {"sleep": 3, "complete": True}))
    first = wait_for(lambda: events(redis_client, "start", SLOW), 20, "the first start")[0]
    assert (first["worker"], first["attempt"]) == ("wA", 1)

    worker_a.kill()
    killed_at = time.monotonic()
    cluster.worker("wB", concurrency=1, env=SLOW_ENV)
    second = wait_for(
        lambda: [e for e in events(redis_client, "start", SLOW) if e["attempt"] == 2],
        HEARTBEAT_TIMEOUT + 6,
        "the second attempt on wB",
    )[0]
    recovery = time.monotonic() - killed_at
    assert second["worker"] == "wB" and second["gen"] != first["gen"]
    accepted = {("default", SLOW)}
    lost, _ = await_completion(sample_app, accepted, 10)
    fault_row(
        "worker SIGKILL mid-task",
        accepted=1,
        lost=len(lost),
        twice=len(ran_twice(redis_client)),
        allowed=1,
        recovery=recovery,
        note="kill -> rerun starts on wB (wB started after the kill)",
    )

    history = [r for r in sample_app.scheduler.history() if r.identifier == SLOW]
    assert len(history) == 2, history
    done, dead = history
    assert (done.state, done.success, done.attempt, done.worker) == ("completed", True, 2, "wB")
    assert (dead.state, dead.success, dead.attempt, dead.worker) == ("failed", False, 1, "wA")
    assert "worker lost" in dead.reason
    assert done.request_id == second["gen"] and dead.request_id == first["gen"]
    # The killed run never reached its end; the rerun did, once.
    assert [e["attempt"] for e in events(redis_client, "end", SLOW)] == [2]


def test_worker_sigkilled_with_requests_in_flight_loses_none(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis, fault_row: Row
) -> None:
    """20 requests over 5 scopes, their worker SIGKILLed at an arbitrary moment mid-way: a
    new worker completes every one at least once; only runs the kill cut short run twice
    (counted), each lost run is in history as attempt 1 on wA and ran again on wB."""
    scopes = [f"fleet-{i}" for i in range(5)]
    identifiers = HANDLED[:4]
    worker_a = cluster.worker("wA", concurrency=2)
    cluster.beat()
    for scope in scopes:
        sample_app.scheduler_for(scope).submit_many(
            processing(i, {"sleep": 0.4, "complete": True}) for i in identifiers
        )
    wait_for(lambda: len(completed_runs(sample_app, scopes)) >= 5, 30, "a few to complete")
    worker_a.kill()  # whatever wA holds now: running, received but not started, or idle
    killed_at = time.time()  # compared with the start events' times
    done_before_kill = completed_runs(sample_app, scopes)
    running_at_kill = redis_client.hlen(APP_KEYS.running)
    cluster.worker("wB", concurrency=2)
    first_on_b = wait_for(
        lambda: [e for e in events(redis_client, "start") if e["worker"] == "wB"],
        HEARTBEAT_TIMEOUT + 10,
        "a start on wB",
    )
    recovery = first_on_b[0]["t"] - killed_at

    expected = {(s, i) for s in scopes for i in identifiers}
    lost_requests, _ = await_completion(sample_app, expected, 30)
    twice = ran_twice(redis_client)
    fault_row(
        "worker SIGKILL, 20 in flight",
        accepted=len(expected),
        lost=len(lost_requests),
        twice=len(twice),
        allowed=running_at_kill,
        recovery=recovery,
        note=f"{running_at_kill} running at the kill; kill -> first start on wB (started after)",
    )
    assert not lost_requests, stuck(redis_client)
    wait_for(lambda: nothing_in_flight(redis_client, scopes), 10, "nothing left in flight")
    records = [r for s in scopes for r in sample_app.scheduler_for(s).history()]
    failed = [r for r in records if r.state != "completed"]
    lost = {(r.scope, r.identifier) for r in failed}
    per_gen, per_request = started_counts(redis_client)
    # Only what wA's two pool processes were running can be lost, each once.
    assert len(failed) == len(lost) <= 2
    assert all(
        (r.state, r.attempt, r.worker) == ("failed", 1, "wA") and "worker lost" in r.reason
        for r in failed
    )
    completed_on_a = {(r.scope, r.identifier) for r in records if r.worker == "wA"} - lost
    assert completed_on_a == done_before_kill and not lost & done_before_kill
    assert set(per_request) == expected
    assert max(per_gen.values()) == 1  # a generation never starts twice
    assert all(n <= 2 for n in per_request.values())
    # A request ran twice only if the kill cut its run short; that run was retried on wB.
    assert set(twice) <= lost
    for scope, identifier in expected:
        runs = sorted(
            (r.state, r.attempt, r.worker)
            for r in records
            if (r.scope, r.identifier) == (scope, identifier)
        )
        if (scope, identifier) in lost:
            assert runs == [("completed", 2, "wB"), ("failed", 1, "wA")]
        else:
            assert runs == [
                ("completed", 1, "wA" if (scope, identifier) in done_before_kill else "wB")
            ]


def test_worker_killed_between_receive_and_start_loses_nothing(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis, fault_row: Row
) -> None:
    """A worker SIGKILLed after its main process received a message but before a pool
    process started it (start.lua) loses nothing: once the dispatch lease lapses with the
    queue empty, beat publishes the request again and it runs on another worker within
    seconds, exactly once."""
    worker_a = cluster.worker("wA", concurrency=1)
    cluster.beat()
    pool = psutil.Process(worker_a.pid).children(recursive=True)
    assert len(pool) == 1, pool
    pool[0].suspend()  # SIGSTOP: the main process still receives, nothing can start
    identifier = HANDLED[0]
    sample_app.scheduler.submit(processing(identifier, {"complete": True}))

    # The message leaves the queue when wA's main process takes it.
    wait_for(
        lambda: published(redis_client) == set() and dispatched(redis_client),
        10,
        "wA to receive the request",
    )
    assert events(redis_client, "start") == []  # received, never started
    record = json.loads(redis_client.hget(APP_KEYS.requests("default"), identifier))
    assert record["s"] == "dispatched"

    worker_a.kill()
    killed_at = time.monotonic()
    cluster.worker("wB", concurrency=1)
    ran = wait_for(lambda: events(redis_client, "end", identifier), 10, "the request on wB")
    recovery = time.monotonic() - killed_at
    lost, _ = await_completion(sample_app, {("default", identifier)}, 10)
    fault_row(
        "worker SIGKILL between receive and start",
        accepted=1,
        lost=len(lost),
        twice=len(ran_twice(redis_client)),
        allowed=0,
        recovery=recovery,
        note="kill -> the request ran on wB (started after the kill)",
    )
    wait_for(lambda: nothing_in_flight(redis_client, ["default"]), 10, "nothing left in flight")
    starts = events(redis_client, "start")
    assert [(e["id"], e["worker"], e["attempt"]) for e in starts] == [(identifier, "wB", 1)]
    assert [e["worker"] for e in ran] == ["wB"]
    history = sample_app.scheduler.history()
    assert [(r.identifier, r.state, r.success, r.attempt, r.worker) for r in history] == [
        (identifier, "completed", True, 1, "wB")
    ]


def starts_on(client: redis.Redis, worker: str) -> list[dict[str, Any]]:
    return [e for e in events(client, "start") if e["worker"] == worker]


def redis_pid(client: redis.Redis) -> int:
    return int(client.info("server")["process_id"])


def test_worker_sigkilled_with_its_heartbeat_in_flight(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis, fault_row: Row
) -> None:
    """A worker SIGKILLed mid-heartbeat: Redis is paused (SIGSTOP, shorter than the
    heartbeat timeout) until the worker's heartbeat and run-lease renewals are sent but not
    yet applied, the worker is killed, Redis resumes and applies them after the worker's
    death. Its runs are still recovered: they run again on the live worker within the
    heartbeat timeout of that posthumous heartbeat, and nothing else runs twice."""
    worker_a = cluster.worker("wA", concurrency=2, env=SLOW_ENV)
    cluster.beat()
    accepted = {("default", SLOW), ("default", HANDLED[0])}
    sample_app.scheduler.submit_many(
        processing(i, {"sleep": 4, "complete": True}) for _, i in accepted
    )
    wait_for(lambda: len(events(redis_client, "start")) == 2, 20, "both to start on wA")
    cluster.worker("wB", concurrency=2, env=SLOW_ENV)

    server = psutil.Process(redis_pid(redis_client))
    paused_ms = server_ms(redis_client)
    server.suspend()
    try:
        paused_at = time.monotonic()
        # The pause lasts three heartbeat intervals (the fault's length, not a wait for a
        # condition): wA's heartbeat thread and both watchdogs have sent their next call
        # and wait for Redis's answer. Checked below: the heartbeat lands after the kill.
        time.sleep(3 * HEARTBEAT_INTERVAL)
        os.killpg(worker_a.pid, signal.SIGKILL)
        worker_a.popen.wait(10)
    finally:
        server.resume()
    resumed_at = time.monotonic()
    assert resumed_at - paused_at < HEARTBEAT_TIMEOUT  # the pause alone lapses nothing
    # The dead worker's last heartbeat was applied after Redis resumed, i.e. after its
    # death: one sent before the pause would lapse by paused_ms + the timeout.
    posthumous = redis_client.zscore(APP_KEYS.alive, "wA")
    assert posthumous is not None
    pause_ms = 3 * HEARTBEAT_INTERVAL * 1000
    assert posthumous > paused_ms + HEARTBEAT_TIMEOUT * 1000 + pause_ms / 2, "none in flight"

    reruns = wait_for(
        lambda: len(starts_on(redis_client, "wB")) == 2 and starts_on(redis_client, "wB"),
        HEARTBEAT_TIMEOUT + 8,
        "both runs to start again on wB",
    )
    recovery = time.monotonic() - resumed_at
    lost, _ = await_completion(sample_app, accepted, 15)
    twice = ran_twice(redis_client)
    fault_row(
        "worker SIGKILL with its heartbeat in flight",
        accepted=len(accepted),
        lost=len(lost),
        twice=len(twice),
        allowed=2,
        recovery=recovery,
        note="Redis resumed (applies the dead worker's heartbeat) -> both rerun on live wB",
    )
    assert {e["attempt"] for e in reruns} == {2}
    assert recovery <= HEARTBEAT_TIMEOUT + 3


@pytest.mark.chaos
def test_worker_frozen_past_its_heartbeat_timeout_then_resumed(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis, fault_row: Row
) -> None:
    """A whole worker frozen (SIGSTOP of its process group, as a VM pause or a long GC
    would) past the heartbeat timeout: its runs are given up and run again on the other
    worker; when it thaws (SIGCONT) it stops the runs it had lost instead of finishing
    them a second time, beats again and serves new work."""
    worker_a = cluster.worker("wA", concurrency=2, env=SLOW_ENV)
    cluster.beat()
    first = {("default", SLOW), ("default", HANDLED[0])}
    sample_app.scheduler.submit_many(
        # Still sleeping when wA thaws: wA must stop them, not complete them a second time.
        processing(i, {"sleep": 8, "complete": True})
        for _, i in first
    )
    wait_for(lambda: len(events(redis_client, "start")) == 2, 20, "both to start on wA")
    cluster.worker("wB", concurrency=2, env=SLOW_ENV)
    assert time.time() - min(e["t"] for e in events(redis_client, "start")) < 5

    os.killpg(worker_a.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        wait_for(
            lambda: len(starts_on(redis_client, "wB")) == 2,
            HEARTBEAT_TIMEOUT + 8,
            "both runs to start again on wB",
        )
        recovery = time.monotonic() - frozen_at
    finally:
        os.killpg(worker_a.pid, signal.SIGCONT)
    # Thawed, wA learns its runs were given up and stops them; it serves again.
    wait_for(lambda: cluster.worker_alive("wA"), 10, "wA to beat again")
    wait_for(
        lambda: worker_a.log().count("was given up as lost; stopping it") == 2,
        10,
        "wA to stop its lost runs",
    )
    later = {("later", i) for i in HANDLED[1:5]}
    sample_app.scheduler_for("later").submit_many(
        processing(i, {"complete": True}) for _, i in later
    )
    lost, _ = await_completion(sample_app, first | later, 20)
    twice = ran_twice(redis_client)
    fault_row(
        "worker frozen (SIGSTOP) past heartbeat timeout",
        accepted=len(first | later),
        lost=len(lost),
        twice=len(twice),
        allowed=2,
        recovery=recovery,
        note="freeze -> both rerun on wB; the thawed wA stops its lost runs",
    )
    assert worker_a.alive()
    # The frozen runs never reached their end on wA: the rerun on wB is the only end.
    ends = [(e["id"], e["worker"]) for e in events(redis_client, "end") if e["scope"] == "default"]
    assert sorted(ends) == sorted((i, "wB") for _, i in first)
    records = sample_app.scheduler.history()
    assert sorted((r.identifier, r.worker, r.state) for r in records) == sorted(
        [(i, "wA", "failed") for _, i in first] + [(i, "wB", "completed") for _, i in first]
    )
