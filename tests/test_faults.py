"""Fault injection with real processes and a real Redis: SIGKILLed workers and beats,
two beats at once, a claim never published, a Redis SIGKILL + AOF restart, and an
unreachable broker. Every scenario counts: zero accepted requests may be lost, and a
request runs twice only where a process died mid-run (at-least-once), counted."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

import bgqueue as bg
from bgqueue import keys
from bgqueue.embedded import HOST, RedisServer, free_port
from bgqueue.scripts import Scripts
from tests.harness import APP_ID, FAST, Cluster, events, wait_for

PREFIX = "com.bgqueue.test."
SLOW = PREFIX + "slow"
# Identifiers with a launch handler in tests/apps/sample.py (the worker's app).
HANDLED = [PREFIX + n for n in ("a", "b", "c", "process", "refresh", "health", "continued", "slow")]
HEARTBEAT_TIMEOUT = float(FAST["BGQUEUE_HEARTBEAT_TIMEOUT"])
BEAT_LEASE = float(FAST["BGQUEUE_BEAT_LEASE"])
CLAIM_LEASE = float(FAST["BGQUEUE_CLAIM_LEASE"])
CLAIM_LEASE_MS = int(CLAIM_LEASE * 1000)
APP_KEYS = keys.AppKeys(APP_ID)


def producer(url: str) -> bg.BackgroundApp:
    """A producer-side app with the sample app's id, on `url` (its own connection)."""
    return bg.BackgroundApp(APP_ID, permitted_identifiers=[PREFIX + "*"], broker_url=url)


def processing(identifier: str, payload: Any, begin: datetime | None = None) -> bg.BGTaskRequest:
    return bg.ProcessingTaskRequest(identifier, earliest_begin_date=begin, payload=payload)


PerGen = Counter[tuple[str, str, int]]
PerRequest = Counter[tuple[str, str]]


def started_counts(client: redis.Redis) -> tuple[PerGen, PerRequest]:
    """Start events per (scope, identifier, generation) and per (scope, identifier)."""
    starts = events(client, "start")
    per_gen = Counter((e["scope"], e["id"], e["gen"]) for e in starts)
    per_request = Counter((e["scope"], e["id"]) for e in starts)
    return per_gen, per_request


def ended(client: redis.Redis) -> set[tuple[str, str]]:
    """(scope, identifier) of every run whose handler reached its end."""
    return {(e["scope"], e["id"]) for e in events(client, "end")}


def nothing_in_flight(client: redis.Redis, scopes: list[str]) -> bool:
    """No request left pending, dispatched or running: nothing more can run."""
    with client.pipeline(transaction=False) as pipe:
        pipe.zcard(APP_KEYS.leases)
        pipe.hlen(APP_KEYS.running)
        for due in APP_KEYS.due_all:
            pipe.zcard(due)
        for scope in scopes:
            pipe.hkeys(APP_KEYS.requests(scope))
        counts = pipe.execute()
    waiting = [f for fields in counts[18:] for f in fields if not f.startswith(b"#")]
    return sum(counts[:18]) == 0 and not waiting


def completed_runs(app: bg.BackgroundApp, scopes: list[str]) -> set[tuple[str, str]]:
    """(scope, identifier) of every request whose history has a successful completion."""
    return {
        (r.scope, r.identifier)
        for scope in scopes
        for r in app.scheduler_for(scope).history()
        if r.state == "completed" and r.success
    }


def beat_holder(client: redis.Redis) -> str:
    raw = client.get(keys.BEAT_LEASE)
    return raw.decode() if raw else ""


def holds_lease(client: redis.Redis, pid: int) -> bool:
    """Whether the beat process with this pid holds the lease (token host:pid:nonce)."""
    return beat_holder(client).split(":")[1:2] == [str(pid)]


def stuck(client: redis.Redis) -> str:
    """Why dispatched requests have not run: each one's state, how soon its dispatch lease
    lapses, and whether its message is queued or held by a worker (kombu's unacked hash)."""
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros / 1000
    held = {
        (kwargs["scope"], body["headers"]["task"])
        for raw in client.hvals("unacked")
        for body in [json.loads(raw)[0]]
        for kwargs in [json.loads(base64.b64decode(body["body"]))[1]]
    }
    lines = []
    for raw_member, score in client.zrange(APP_KEYS.leases, 0, -1, withscores=True):
        scope, identifier = keys.split_member(raw_member.decode())
        raw = client.hget(APP_KEYS.requests(scope), identifier)
        state = json.loads(raw)["s"] if raw else "gone"
        where = "held by a worker" if (scope, identifier) in held else "not held by any worker"
        lines.append(
            f"{scope}/{identifier} {state}, lease lapses in {(score - now_ms) / 1000:.1f}s, "
            f"message {where}"
        )
    queued = sum(client.llen(name) for p in range(16) for name in APP_KEYS.queue_lists(p))
    return f"{'; '.join(lines) or 'no dispatched request'}; {queued} message(s) queued"


# --- workers killed ------------------------------------------------------------------


def test_worker_sigkilled_mid_task_reruns_on_another_worker(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A task whose worker is SIGKILLed mid-run runs again (attempt 2) on another worker
    within heartbeat timeout + a few seconds; history keeps the lost and the completed run."""
    slow_env = {"TEST_PROCESSING_BUDGET": "20"}
    worker_a = cluster.worker("wA", concurrency=1, env=slow_env)
    cluster.beat()
    sample_app.scheduler.submit(processing(SLOW, {"sleep": 3, "complete": True}))
    first = wait_for(lambda: events(redis_client, "start", SLOW), 20, "the first start")[0]
    assert (first["worker"], first["attempt"]) == ("wA", 1)

    worker_a.kill()
    killed_at = time.monotonic()
    cluster.worker("wB", concurrency=1, env=slow_env)
    second = wait_for(
        lambda: [e for e in events(redis_client, "start", SLOW) if e["attempt"] == 2],
        HEARTBEAT_TIMEOUT + 6,
        "the second attempt on wB",
    )[0]
    recovery = time.monotonic() - killed_at
    print(f"\nworker kill -> rerun started after {recovery:.2f}s")
    assert second["worker"] == "wB" and second["gen"] != first["gen"]

    def slow_history() -> list[bg.TaskRecord] | None:
        records = [r for r in sample_app.scheduler.history() if r.identifier == SLOW]
        return records if any(r.state == "completed" for r in records) else None

    history = wait_for(slow_history, 10, "the completed run in history")
    assert len(history) == 2, history
    done, lost = history
    assert (done.state, done.success, done.attempt, done.worker) == ("completed", True, 2, "wB")
    assert (lost.state, lost.success, lost.attempt, lost.worker) == ("failed", False, 1, "wA")
    assert "worker lost" in lost.reason
    assert done.request_id == second["gen"] and lost.request_id == first["gen"]
    # The killed run never reached its end; the rerun did, once.
    assert [e["attempt"] for e in events(redis_client, "end", SLOW)] == [2]


def test_worker_sigkilled_with_requests_in_flight_loses_none(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
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
    killed_at = time.monotonic()
    done_before_kill = completed_runs(sample_app, scopes)
    running_at_kill = redis_client.hlen(APP_KEYS.running)
    cluster.worker("wB", concurrency=2)

    expected = {(s, i) for s in scopes for i in identifiers}
    try:
        wait_for(lambda: completed_runs(sample_app, scopes) == expected, 30, "all 20 to complete")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {stuck(redis_client)}") from None
    recovered = time.monotonic() - killed_at
    wait_for(lambda: nothing_in_flight(redis_client, scopes), 10, "nothing left in flight")
    records = [r for s in scopes for r in sample_app.scheduler_for(s).history()]
    failed = [r for r in records if r.state != "completed"]
    lost = {(r.scope, r.identifier) for r in failed}
    per_gen, per_request = started_counts(redis_client)
    twice = sorted(k for k, n in per_request.items() if n > 1)
    print(
        f"\n{len(done_before_kill)} done before the kill, {running_at_kill} running at it; "
        f"all done {recovered:.2f}s after it; runs lost: {len(lost)}; "
        f"ran twice: {len(twice)} {twice}"
    )
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
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
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

    # kombu keeps a message a worker has taken but not acknowledged in its `unacked` hash.
    wait_for(lambda: redis_client.hlen("unacked") == 1, 10, "wA to receive the request")
    assert events(redis_client, "start") == []  # received, never started
    record = json.loads(redis_client.hget(APP_KEYS.requests("default"), identifier))
    assert record["s"] == "dispatched"

    worker_a.kill()
    killed_at = time.monotonic()
    cluster.worker("wB", concurrency=1)
    ran = wait_for(lambda: events(redis_client, "end", identifier), 10, "the request on wB")
    recovery = time.monotonic() - killed_at
    print(f"\nkill between receive and start -> ran on wB after {recovery:.2f}s")
    assert recovery < 10
    wait_for(lambda: nothing_in_flight(redis_client, ["default"]), 10, "nothing left in flight")
    starts = events(redis_client, "start")
    assert [(e["id"], e["worker"], e["attempt"]) for e in starts] == [(identifier, "wB", 1)]
    assert [e["worker"] for e in ran] == ["wB"]
    history = sample_app.scheduler.history()
    assert [(r.identifier, r.state, r.success, r.attempt, r.worker) for r in history] == [
        (identifier, "completed", True, 1, "wB")
    ]


# --- beats ---------------------------------------------------------------------------


def test_two_beats_at_once_dispatch_each_request_exactly_once(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """Two beat processes, the lease deleted every 0.15 s so leadership keeps changing hands
    mid-dispatch (a deposed leader dispatches on until its next renewal): 200 requests over
    25 scopes all complete, and each request and each generation starts exactly once."""
    scopes = [f"s{i:02d}" for i in range(25)]
    cluster.worker("w1", concurrency=4)
    cluster.beat("beat-1")
    cluster.beat("beat-2")
    wait_for(lambda: beat_holder(redis_client), 15, "a beat to lead")

    stop = threading.Event()
    holders: set[str] = set()

    def split_brain() -> None:
        # Deleting the lease lets the standby lead while the old leader still dispatches
        # until its next renewal: a window with two leaders.
        client = redis.Redis.from_url(cluster.redis_url)
        while not stop.wait(0.15):
            holder = beat_holder(client)
            if holder:
                holders.add(holder)
            client.delete(keys.BEAT_LEASE)
        client.close()

    yanker = threading.Thread(target=split_brain, daemon=True)
    yanker.start()
    try:
        wait_for(lambda: len(holders) == 2, 15, "both beats to have led")
        for scope in scopes:
            sample_app.scheduler_for(scope).submit_many(
                processing(i, {"complete": True}) for i in HANDLED
            )
        expected = {(s, i) for s in scopes for i in HANDLED}
        wait_for(lambda: ended(redis_client) == expected, 60, "all 200 requests to complete")
    finally:
        stop.set()
        yanker.join(5)
    wait_for(lambda: nothing_in_flight(redis_client, scopes), 10, "nothing left in flight")
    per_gen, per_request = started_counts(redis_client)
    assert len(per_request) == 200 and set(per_request) == expected
    assert set(per_gen.values()) == {1} and set(per_request.values()) == {1}
    for scope in scopes:
        states = Counter(r.state for r in sample_app.scheduler_for(scope).history())
        assert states == {"completed": len(HANDLED)}


def test_beat_sigkilled_standby_takes_over(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """With the leading beat SIGKILLed, the standby takes the lease within the beat lease
    + a few seconds, and requests submitted after the kill run."""
    cluster.worker("w1", concurrency=2)
    beat_a = cluster.beat("beat-a")
    wait_for(lambda: holds_lease(redis_client, beat_a.pid), 15, "beat A to lead")
    beat_b = cluster.beat("beat-b")
    wait_for(lambda: "beat " in beat_b.log(), 15, "beat B to start")
    assert holds_lease(redis_client, beat_a.pid)  # B stands by

    beat_a.kill()
    killed_at = time.monotonic()
    sample_app.scheduler.submit_many(processing(i, {"complete": True}) for i in HANDLED[:4])
    wait_for(lambda: holds_lease(redis_client, beat_b.pid), BEAT_LEASE + 3, "beat B to lead")
    takeover = time.monotonic() - killed_at
    expected = {("default", i) for i in HANDLED[:4]}
    wait_for(lambda: ended(redis_client) == expected, BEAT_LEASE + 5, "the requests to run")
    served = time.monotonic() - killed_at
    print(f"\nbeat kill -> standby leads after {takeover:.2f}s, requests done after {served:.2f}s")
    _, per_request = started_counts(redis_client)
    assert set(per_request.values()) == {1}
    assert beat_b.alive()


def test_claim_never_published_is_published_again_and_runs_once(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """Requests claimed by a beat that died before publishing (claim.lua run, no message
    sent) are published again by a new beat once the claim lease lapses, and run once each."""
    identifiers = HANDLED[:3]
    cluster.worker("w1", concurrency=2)
    sample_app.scheduler.submit_many(processing(i, {"complete": True}) for i in identifiers)
    members = [keys.member("default", i) for i in identifiers]
    # Exactly what Beat._claim_and_publish does, minus the publish.
    script_keys = [APP_KEYS.due(0), APP_KEYS.leases, APP_KEYS.seq, APP_KEYS.counts]
    script_keys += [APP_KEYS.requests("default") for _ in members]
    raw = Scripts(redis_client).claim(keys=script_keys, args=[CLAIM_LEASE_MS, *members])
    claimed = {raw[i].decode(): int(raw[i + 1]) for i in range(0, len(raw), 3)}
    assert set(claimed) == set(members)
    assert redis_client.zcard(APP_KEYS.due(0)) == 0  # no longer pending: only the sweep can help
    assert len(sample_app.scheduler.pending_task_requests()) == 3  # dispatched, still listed

    cluster.beat()
    expected = {("default", i) for i in identifiers}
    wait_for(lambda: ended(redis_client) == expected, 15, "the lapsed claims to run")
    wait_for(lambda: nothing_in_flight(redis_client, ["default"]), 10, "nothing left in flight")
    per_gen, per_request = started_counts(redis_client)
    assert set(per_request.values()) == {1}
    # Published again with the generation of the original claim, not a new one.
    assert set(per_gen) == {("default", keys.split_member(m)[1], g) for m, g in claimed.items()}
    assert all(e["attempt"] == 1 for e in events(redis_client, "start"))


# --- Redis ---------------------------------------------------------------------------


def test_redis_sigkill_and_aof_restart_loses_nothing_and_processes_reconnect(
    make_redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    """Redis SIGKILLed and restarted from its AOF (appendfsync always): 50 future and 8
    immediate requests all complete as submitted, and the running worker and beat (never
    restarted) serve new requests within 10 s of the restart."""
    server = make_redis_server(appendfsync="always")
    group = Cluster(server.url, tmp_path)
    try:
        worker = group.worker("w1", concurrency=4)
        beat = group.beat()
        client = group.client
        wait_for(lambda: beat_holder(client), 15, "beat to lead")
        app = producer(server.url)
        begin = datetime.now(UTC) + timedelta(seconds=3)
        future_scopes = [f"later-{i}" for i in range(10)]
        submitted: dict[tuple[str, str], tuple[dict[str, Any], datetime | None]] = {}
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

        server.kill()
        server.restart()
        restarted_at = time.monotonic()
        fresh = redis.Redis.from_url(server.url)
        # Every accepted future request survived the SIGKILL (they cannot have run yet).
        assert all(fresh.hexists(APP_KEYS.requests(s), i) for s, i in submitted if s != "now")

        # The same worker process beats again, the same beat leads again.
        wait_for(lambda: group.worker_alive("w1"), 10, "the worker's heartbeat after the restart")
        # New work submitted after the restart is served by the same processes.
        after = producer(server.url)
        # The producer connected before the outage submits again without being rebuilt.
        app.scheduler_for("after").submit(processing(HANDLED[0], {"complete": True}))
        wait_for(
            lambda: ("after", HANDLED[0]) in ended(fresh), 10, "service within 10 s of the restart"
        )
        print(f"\nRedis restart -> new request served after {time.monotonic() - restarted_at:.2f}s")
        assert worker.alive(), worker.log()[-3000:]
        assert beat.alive(), beat.log()[-3000:]

        scopes = sorted({s for s, _ in submitted})
        wait_for(
            lambda: completed_runs(after, scopes) == set(submitted), 30, "every request to run"
        )
        starts = events(fresh, "start")
        for (scope, identifier), (payload, at) in submitted.items():
            runs = [e for e in starts if (e["scope"], e["id"]) == (scope, identifier)]
            assert runs and all(e["payload"] == payload for e in runs), (scope, identifier)
            if at is not None:
                assert min(e["t"] for e in runs) >= at.timestamp() - 0.01, "ran before its date"
        records = [r for scope in scopes for r in after.scheduler_for(scope).history()]
        # Anything not completed is a run lost to the outage and retried (at-least-once).
        assert all("worker lost" in r.reason for r in records if r.state != "completed")
        per_request = Counter((e["scope"], e["id"]) for e in starts)
        twice = sorted(k for k, n in per_request.items() if n > 1)
        print(f"ran twice across the Redis restart: {len(twice)} {twice}")
        print(f"history: {Counter((r.state, r.reason) for r in records)}")
        # Only an immediate request caught running by the restart may have run twice.
        assert all(scope == "now" for scope, _ in twice)
        fresh.close()
    finally:
        group.stop_all()


def test_unreachable_broker_is_a_service_error_without_the_password() -> None:
    """Submitting to a closed port raises ServiceError 9800004 within 5 s, naming
    127.0.0.1:<port> and never the password."""
    port = free_port()  # nothing listens there
    app = bg.BackgroundApp(
        "com.bgqueue.unreachable",
        permitted_identifiers=["com.bgqueue.unreachable.*"],
        broker_url=f"redis://:secret@{HOST}:{port}/0",
    )
    started = time.monotonic()
    with pytest.raises(bg.ServiceError) as caught:
        app.scheduler.submit(bg.ProcessingTaskRequest("com.bgqueue.unreachable.job"))
    assert time.monotonic() - started < 5
    assert caught.value.code == 9800004
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "secret" not in str(caught.value) and "secret" not in repr(caught.value.args)
