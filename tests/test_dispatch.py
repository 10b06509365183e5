"""Beat shares itself fairly and keeps dates: a burst in one requirement profile, or in one
app, makes no other profile's or app's requests late; a request due within the dispatch
window is sent ahead and started on its date by the worker, while a cancel or a replace
inside the window still wins; an app beat has forgotten is known again by submitting, or
found by the next beat to lead when it submitted while none led.

Real beat and worker processes on the test Redis; lateness is a start event's time (the
worker's clock, this machine) less the request's earliest-begin date.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

import bgqueue as bg
from bgqueue.model import keys
from tests.apps import punctual
from tests.harness import APP_ID, Cluster, events, wait_for

P = "com.bgqueue.test."
PUNCTUAL = "tests.apps.punctual:app"


@pytest.fixture(autouse=True)
def _kill_processes_at_teardown(cluster: Cluster) -> Iterator[None]:
    """SIGKILL the test's processes at once: a graceful stop of a worker with thousands
    of requests queued is not what these tests check."""
    yield
    cluster.kill_all()


def producer(url: str, app_id: str = APP_ID, **limits: Any) -> bg.BackgroundApp:
    return bg.BackgroundApp(
        app_id, permitted_identifiers=[f"{app_id}.*"], broker_url=url, limits=bg.Limits(**limits)
    )


def punctual_starts(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(punctual.STARTS, 0, -1)]


def at(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def test_a_burst_in_one_profile_makes_no_other_profile_late(
    cluster: Cluster, redis_url: str, redis_client: redis.Redis
) -> None:
    """1,600 requests due at once in the external-power profile (several claim batches)
    and one due half a second later in the network profile, each served by its own worker:
    the network request starts within 50 ms of its date. (When a full batch narrowed
    beat's next pass to the busy profile, it forgot the other profile's next date and
    started it 200-550 ms late.)"""
    app = producer(redis_url, max_pending_processing=2000)
    cluster.worker("mains", ["external_power=true", "network=none"], concurrency=1)
    cluster.worker("laptop", ["external_power=false", "network=wifi"], concurrency=1)
    cluster.beat()
    app.scheduler.submit(bg.ProcessingTaskRequest(P + "a", requires_network_connectivity=True))
    wait_for(lambda: events(redis_client, "end", P + "a"), 15, "beat and workers serving")
    burst = [
        bg.ProcessingTaskRequest(f"{P}b.{i}", requires_external_power=True) for i in range(1600)
    ]
    date = at(0.5)
    app.scheduler_for("burst").submit_many(burst)
    app.scheduler_for("other").submit(
        bg.ProcessingTaskRequest(
            P + "c", earliest_begin_date=date, requires_network_connectivity=True
        )
    )
    start = wait_for(lambda: events(redis_client, "start", P + "c"), 15, "the network request")
    late = start[0]["t"] - date.timestamp()
    print(f"\nnetwork request started {late * 1000:.1f} ms after its date")
    assert start[0]["worker"] == "laptop"
    assert -0.005 <= late < 0.05, f"started {late * 1000:.0f} ms after its date"


def test_a_burst_in_one_app_makes_no_other_app_late(
    cluster: Cluster, redis_url: str, redis_client: redis.Redis
) -> None:
    """20,000 requests of one app due at once, and five of another app due 200 ms later,
    served by its own idle worker: beat takes the apps in turn, a bounded batch each, so
    the five start within a few hundred milliseconds of their date. (When beat drained one
    app's whole backlog before looking at the next, they started 3.3-4.4 s late.)"""
    busy = producer(redis_url, max_pending_processing=20_000)
    other = producer(redis_url, punctual.APP_ID)
    cluster.worker("busy", concurrency=1)
    cluster.worker("idle", concurrency=2, app=PUNCTUAL, app_id=punctual.APP_ID)
    cluster.beat()
    other.scheduler_for("warm-up").submit(bg.ProcessingTaskRequest(punctual.JOB))
    wait_for(lambda: punctual_starts(redis_client), 15, "beat and the idle worker serving")
    busy.scheduler_for("burst").submit_many(
        bg.ProcessingTaskRequest(f"{P}b.{i}") for i in range(20_000)
    )
    date = at(0.2)
    for n in range(5):
        other.scheduler_for(f"s{n}").submit(
            bg.ProcessingTaskRequest(punctual.JOB, earliest_begin_date=date)
        )
    wait_for(lambda: len(punctual_starts(redis_client)) == 6, 15, "the five to start")
    late = sorted(s["t"] - date.timestamp() for s in punctual_starts(redis_client)[1:])
    print(f"\nthe other app's requests started {[round(x * 1000) for x in late]} ms late")
    assert late[0] >= -0.005 and late[-1] < 0.5, late
    assert redis_client.zcard(busy.keys.due(0)), "the burst was still being dispatched"


def test_a_cancel_or_replace_inside_the_dispatch_window_wins(
    cluster: Cluster, redis_url: str, redis_client: redis.Redis
) -> None:
    """Requests due within the dispatch window are sent ahead to the worker, which holds
    them until their date: each starts on its date; one cancelled, and one replaced, after
    being sent never run in their old form (the start checks the generation)."""
    app = producer(redis_url)
    cluster.worker("w1", concurrency=2)
    cluster.beat()
    app.scheduler.submit(bg.ProcessingTaskRequest(P + "a"))
    wait_for(lambda: events(redis_client, "end", P + "a"), 15, "beat and the worker serving")
    date = at(0.8)
    for name in ("b", "c", "process"):
        app.scheduler.submit(
            bg.ProcessingTaskRequest(P + name, earliest_begin_date=date, payload={"v": 1})
        )
    sent = wait_for(lambda: len(redis_client.zrange(app.keys.leases, 0, -1)) == 3, 5, "sent")
    assert sent and datetime.now(UTC) < date, "sent ahead of the date"
    assert app.scheduler.cancel(P + "b")
    app.scheduler.submit(
        bg.ProcessingTaskRequest(P + "c", earliest_begin_date=date, payload={"v": 2})
    )
    wait_for(lambda: len(events(redis_client, "end")) == 3, 10, "process and the new c")
    started = {e["id"]: e for e in events(redis_client, "start")}
    assert set(started) == {P + "a", P + "c", P + "process"}
    assert started[P + "c"]["payload"] == {"v": 2}
    late = started[P + "process"]["t"] - date.timestamp()
    print(f"\nsent-ahead request started {late * 1000:.1f} ms after its date")
    assert -0.005 <= late < 0.05, late
    time.sleep(0.3)  # a stale copy of b or the old c would start about now
    assert len(events(redis_client, "start")) == 3


def test_submitting_makes_an_app_known_to_beat(
    cluster: Cluster, redis_url: str, redis_client: redis.Redis
) -> None:
    """An app whose entry in bgqueue:apps was lost (a restore, a hand-edit) is served again
    as soon as it submits: beat learns it from the wake-up (or still knows it) and names it
    there again. (Before, beat ignored its requests until some process of the app restarted.)"""
    app = producer(redis_url)
    cluster.worker("w1", concurrency=1)
    cluster.beat()
    app.scheduler.submit(bg.ProcessingTaskRequest(P + "a"))
    wait_for(lambda: events(redis_client, "end", P + "a"), 15, "the first request")
    redis_client.srem(keys.APPS, APP_ID)
    app.scheduler.submit(bg.ProcessingTaskRequest(P + "b"))
    wait_for(lambda: events(redis_client, "end", P + "b"), 5, "the request after the loss")
    wait_for(lambda: redis_client.sismember(keys.APPS, APP_ID), 5, "the app named again")


def test_a_beat_taking_the_lead_finds_apps_that_submitted_while_none_led(
    cluster: Cluster, redis_url: str, redis_client: redis.Redis
) -> None:
    """A producer names its app in bgqueue:apps once per process, and beat forgets idle
    apps. A submit made after beat forgot the app, while no beat led, wakes nobody; the
    next beat to lead finds the app by its waiting requests, before any worker of the app
    names it, and serves them. (Without that discovery, the app stayed unknown until some
    process of it started.)"""
    app = producer(redis_url)
    beat = cluster.beat(env={"BGQUEUE_FORGET_AFTER": "0.3"})
    app.scheduler.submit(bg.ProcessingTaskRequest(P + "a"))  # names the app, once
    assert redis_client.sismember(keys.APPS, APP_ID)
    assert app.scheduler.cancel(P + "a")
    wait_for(lambda: not redis_client.sismember(keys.APPS, APP_ID), 15, "beat to forget the app")
    beat.kill()
    app.scheduler.submit(bg.ProcessingTaskRequest(P + "b"))
    assert not redis_client.sismember(keys.APPS, APP_ID)  # this process named it already
    cluster.beat("beat-2")
    wait_for(lambda: redis_client.sismember(keys.APPS, APP_ID), 15, "the next leader to find it")
    cluster.worker("w1", concurrency=1)
    wait_for(lambda: events(redis_client, "end", P + "b"), 15, "the request submitted meanwhile")


# --- a request due now, dispatched by its submit -----------------------------------------


def routed(cluster: Cluster, redis_url: str, redis_client: redis.Redis) -> bg.BackgroundApp:
    """A worker and a beat that has written the routes (a first request ran), then beat
    SIGKILLed: what happens next is the submit's alone."""
    app = producer(redis_url)
    cluster.worker("w1", concurrency=1)
    beat = cluster.beat()
    app.scheduler.submit(bg.ProcessingTaskRequest(P + "a"))
    wait_for(lambda: events(redis_client, "end", P + "a"), 15, "the first request")
    beat.kill()
    return app


def test_a_request_due_now_reaches_a_live_worker_without_beat(
    cluster: Cluster, redis_url: str, redis_client: redis.Redis
) -> None:
    """A request due now whose handler a live worker class has is dispatched by the submit
    itself, as beat would (a generation, a class, a dispatch lease): it runs once with no
    beat running. (Before, it waited for beat's next round: forever here.)"""
    app = routed(cluster, redis_url, redis_client)
    app.scheduler.submit(bg.ProcessingTaskRequest(P + "b"))
    wait_for(lambda: events(redis_client, "end", P + "b"), 5, "the request, with no beat")
    time.sleep(0.5)
    assert len(events(redis_client, "start", P + "b")) == 1
    assert not redis_client.exists(app.keys.counts)  # nothing counted as waiting


def test_a_submit_leaves_to_beat_what_is_due_ahead_of_it_or_has_no_live_worker(
    cluster: Cluster, redis_url: str, redis_client: redis.Redis
) -> None:
    """A submit dispatches nothing while something of the request's profile is due ahead
    of it (beat serves those in date order), nor to a class whose workers' heartbeats have
    lapsed: both wait for beat, which then runs them in date order, once each."""
    app = routed(cluster, redis_url, redis_client)
    app.scheduler_for("s1").submit(bg.ProcessingTaskRequest(P + "b", earliest_begin_date=at(0.2)))
    time.sleep(0.4)  # b is due; no beat claims it
    app.scheduler_for("s2").submit(bg.ProcessingTaskRequest(P + "c", earliest_begin_date=at(0)))
    time.sleep(1.0)
    assert not events(redis_client, "start", P + "c")
    pending = {
        r.identifier for s in ("s1", "s2") for r in app.scheduler_for(s).pending_task_requests()
    }
    assert pending == {P + "b", P + "c"}
    cluster.kill_all()  # the worker too: its class lapses with its heartbeat
    wait_for(lambda: not cluster.worker_alive("w1"), 10, "the worker's heartbeat to lapse")
    app.scheduler_for("s3").submit(bg.ProcessingTaskRequest(P + "process"))
    record = json.loads(redis_client.hget(app.keys.requests("s3"), P + "process"))
    assert record["s"] == "pending", record
    cluster.worker("w2", concurrency=1)
    cluster.beat("beat-2")
    for name in ("b", "c", "process"):
        wait_for(lambda n=name: events(redis_client, "end", P + n), 15, f"{name} to run")
    starts = [e["id"] for e in events(redis_client, "start")]
    assert starts.count(P + "b") == starts.count(P + "c") == starts.count(P + "process") == 1
    assert starts.index(P + "b") < starts.index(P + "c")
