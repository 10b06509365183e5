"""Beats that die or overlap: two and three beats at once, the leader SIGKILLed with a
standby waiting, claims never published, and a beat SIGKILLed between claiming a batch
and publishing it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis

import bgqueue as bg
from bgqueue.beat import Beat, Claimed
from bgqueue.model import keys
from bgqueue.model.settings import Settings
from tests.faults.probes import (
    APP_KEYS,
    BEAT_LEASE,
    DISPATCH_LEASE,
    HANDLED,
    SLOW,
    Key,
    await_completion,
    beat_holder,
    dispatched,
    ended,
    holds_lease,
    nothing_in_flight,
    processing,
    published,
    ran_twice,
    started_counts,
    stuck,
    submit_grid,
)
from tests.harness import Cluster, events, wait_for

Row = Callable[..., None]


@pytest.mark.parametrize(
    "beats", [2, pytest.param(3, marks=pytest.mark.chaos)], ids=["two", "three"]
)
def test_beats_at_once_dispatch_each_request_exactly_once(
    beats: int,
    cluster: Cluster,
    sample_app: bg.BackgroundApp,
    redis_client: redis.Redis,
    fault_row: Row,
) -> None:
    """Two (three) beat processes, the lease deleted every 0.15 s so leadership keeps
    changing hands mid-dispatch (a deposed leader dispatches on until its next renewal):
    200 requests over 25 scopes all complete, and each request and each generation starts
    exactly once."""
    scopes = [f"s{i:02d}" for i in range(25)]
    cluster.worker("w1", concurrency=4)
    for n in range(beats):
        cluster.beat(f"beat-{n + 1}")
    wait_for(lambda: beat_holder(redis_client), 15, "a beat to lead")

    stop = threading.Event()
    holders: set[str] = set()

    def split_brain() -> None:
        # Deleting the lease lets a standby lead while the old leader still dispatches
        # until its next renewal: a window with two (or three) leaders.
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
        wait_for(lambda: len(holders) == beats, 20, f"all {beats} beats to have led")
        accepted = submit_grid(sample_app, scopes, HANDLED, {"complete": True})
        lost, took = await_completion(sample_app, accepted, 60)
    finally:
        stop.set()
        yanker.join(5)
    per_gen, per_request = started_counts(redis_client)
    fault_row(
        f"{beats} beats at once (lease yanked every 0.15 s)",
        accepted=len(accepted),
        lost=len(lost),
        twice=len(ran_twice(redis_client)),
        allowed=0,
        recovery=None,
        note=f"{len(holders)} leaders seen; all done in {took:.2f} s",
    )
    wait_for(lambda: nothing_in_flight(redis_client, scopes), 10, "nothing left in flight")
    assert set(per_request) == accepted and set(per_gen.values()) == {1}
    for scope in scopes:
        states = Counter(r.state for r in sample_app.scheduler_for(scope).history())
        assert states == {"completed": len(HANDLED)}


def test_beat_sigkilled_standby_takes_over(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis, fault_row: Row
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
    accepted = {("default", i) for i in HANDLED[:4]}
    wait_for(lambda: ended(redis_client) == accepted, BEAT_LEASE + 5, "the requests to run")
    served = time.monotonic() - killed_at
    lost, _ = await_completion(sample_app, accepted, 5)
    fault_row(
        "beat SIGKILL, standby takes over",
        accepted=len(accepted),
        lost=len(lost),
        twice=len(ran_twice(redis_client)),
        allowed=0,
        recovery=served,
        note=f"kill -> standby leads {takeover:.2f} s -> requests sent after the kill done",
    )
    assert beat_b.alive()


class DiesBeforePublishing(Beat):
    """A real Beat whose process "dies" between claim.lua and the publish: it claims like
    any beat, then sends nothing."""

    def __init__(self, broker_url: str) -> None:
        super().__init__(broker_url, Settings(dispatch_lease=DISPATCH_LEASE))  # as test beats
        self.claimed: list[Claimed] = []

    def publish(
        self, app: keys.AppKeys, claimed: list[Claimed], now: int, lane: int | None = None
    ) -> None:
        self.claimed += claimed


def test_claim_never_published_is_published_again_and_runs_once(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis, fault_row: Row
) -> None:
    """Requests claimed by a beat that died before publishing (claim.lua run, no message
    sent) are published again by a new beat once the dispatch lease lapses, and run once each."""
    identifiers = HANDLED[:3]
    cluster.worker("w1", concurrency=2)
    sample_app.scheduler.submit_many(processing(i, {"complete": True}) for i in identifiers)
    claimer = DiesBeforePublishing(cluster.redis_url)
    claimer.dispatch()
    claimed = {c.identifier: c.gen for c in claimer.claimed}
    claimer.client.close()
    assert set(claimed) == set(identifiers)
    assert redis_client.zcard(APP_KEYS.due(0)) == 0  # no longer pending: only the sweep can help
    assert len(sample_app.scheduler.pending_task_requests()) == 3  # dispatched, still listed

    cluster.beat()
    started_at = time.monotonic()
    accepted = {("default", i) for i in identifiers}
    wait_for(lambda: ended(redis_client) == accepted, 15, "the lapsed claims to run")
    recovery = time.monotonic() - started_at
    lost, _ = await_completion(sample_app, accepted, 5)
    fault_row(
        "claims never published (beat died after claim.lua)",
        accepted=len(accepted),
        lost=len(lost),
        twice=len(ran_twice(redis_client)),
        allowed=0,
        recovery=recovery,
        note="new beat started -> the claims ran",
    )
    wait_for(lambda: nothing_in_flight(redis_client, ["default"]), 10, "nothing left in flight")
    per_gen, per_request = started_counts(redis_client)
    assert set(per_request.values()) == {1}
    # Published again with the generation of the original claim, not a new one.
    assert set(per_gen) == {("default", i, g) for i, g in claimed.items()}
    assert all(e["attempt"] == 1 for e in events(redis_client, "start"))


def test_beat_sigkilled_between_claim_and_publish(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis, fault_row: Row
) -> None:
    """The leading beat claims a batch of 320 requests in one claim.lua call and is stopped
    (SIGSTOP) within a millisecond of the claim, while it publishes their messages one by
    one, then SIGKILLed: some of the batch has a message, the rest was claimed and never
    published. The standby takes over; every request runs, each exactly once, the never
    published ones as soon as the messages already sent have drained."""
    worker = cluster.worker("w1", concurrency=2, env={"TEST_PROCESSING_BUDGET": "20"})
    beat_a = cluster.beat("beat-a")
    wait_for(lambda: holds_lease(redis_client, beat_a.pid), 15, "beat A to lead")
    beat_b = cluster.beat("beat-b")
    wait_for(lambda: "beat " in beat_b.log(), 15, "beat B to start")
    # Both of the worker's slots busy: it takes no message while the batch is looked at.
    blockers = {("blockers", i) for i in (SLOW, HANDLED[0])}
    sample_app.scheduler_for("blockers").submit_many(
        processing(i, {"sleep": 4, "complete": True}) for _, i in blockers
    )
    wait_for(lambda: len(events(redis_client, "start")) == 2, 10, "the blockers to start")
    generations = int(redis_client.get(APP_KEYS.seq) or 0)

    # One batch, due at one instant: beat claims all 320 in one script, then publishes.
    begin = datetime.now(UTC) + timedelta(seconds=1.2)
    scopes = [f"batch-{n:02d}" for n in range(40)]
    for scope in scopes:
        sample_app.scheduler_for(scope).submit_many(
            processing(i, {"complete": True}, begin) for i in HANDLED
        )
    batch = {(s, i) for s in scopes for i in HANDLED}
    deadline = time.monotonic() + 10
    while int(redis_client.get(APP_KEYS.seq) or 0) == generations:
        assert time.monotonic() < deadline, "beat A never claimed the batch"
        time.sleep(0.0002)  # a poll far shorter than publishing 320 messages takes
    os.killpg(beat_a.pid, signal.SIGSTOP)  # mid-publish: the claim just returned
    claimed = dispatched(redis_client)
    sent = published(redis_client)
    never_sent = claimed - sent
    os.killpg(beat_a.pid, signal.SIGKILL)
    beat_a.popen.wait(10)
    killed_at = time.time()  # compared with the start events' times
    assert claimed == batch, f"{len(claimed)} of {len(batch)} claimed at once"
    assert never_sent, "beat A had published the whole batch before it was stopped"

    def first_start(among: set[Key]) -> float | None:
        times = [e["t"] for e in events(redis_client, "start") if (e["scope"], e["id"]) in among]
        return min(times) if times else None

    accepted = blockers | batch
    lost, _ = await_completion(sample_app, accepted, 20)
    served = first_start(never_sent)
    recovery = None if served is None else served - killed_at
    fault_row(
        "beat SIGKILL between claim and publish",
        accepted=len(accepted),
        lost=len(lost),
        twice=len(ran_twice(redis_client)),
        allowed=0,
        recovery=recovery,
        note=f"{len(sent)} of {len(batch)} sent; kill -> first never-sent one starts "
        "(once the sent ones drained)",
    )
    assert not lost, stuck(redis_client)
    assert holds_lease(redis_client, beat_b.pid) and worker.alive()
    per_gen, per_request = started_counts(redis_client)
    assert set(per_request) == accepted and set(per_gen.values()) == {1}
