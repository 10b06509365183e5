"""Transient delays (HarmonyOS requestSuspendDelay) end to end: real `bgqueue worker` and
`bgqueue beat` processes run the handlers of tests/apps/transient_app.py, which request,
query and cancel delays as their payload says and record what happened in Redis.

The app's limits (seconds): a 2 s task budget with the expiration handler 0.4 s before
the deadline, delays of at most 4 s with their callback 0.8 s before they end, 3 delays
at once and 5 s of delay per scope in a rolling 24 hours. Every wait polls a condition
with a deadline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import redis

import bgqueue as bg
from tests.apps import transient_app
from tests.apps.transient_app import APP_ID, EVENTS, SIGNALS
from tests.harness import Cluster, wait_for

APP = "tests.apps.transient_app:app"
A, B, C = (f"{APP_ID}.{name}" for name in "abc")
QUOTA = 5000  # ms
BUDGET, LEAD = 2.0, 0.4  # the task budget and its expiration lead, s
DELAY, DELAY_LEAD = 4.0, 0.8  # the longest delay and its callback's lead, s
MS_SLACK = 150  # ms of quota that timing on a loaded machine may move
SLACK = 0.3  # s of lateness allowed for a callback or a kill
UNKNOWN, REFUSED, BAD = 9900001, 9900002, 401


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture
def tapp(redis_url: str) -> bg.BackgroundApp:
    """The transient test app as a producer sees it, on the test Redis."""
    transient_app.app._client = None  # a previous test's connection: drop it
    transient_app.app.use_broker(redis_url)
    return transient_app.app


@pytest.fixture(autouse=True)
def _kill_processes_at_teardown(cluster: Cluster) -> Iterator[None]:
    """SIGKILL the test's processes at once when it is done: a graceful Celery shutdown
    is slow and not what these tests check."""
    yield
    cluster.kill_all()


def start(cluster: Cluster, *names: str, concurrency: int = 2) -> None:
    """Beat and one worker per name, on the transient app."""
    cluster.beat()
    for name in names:
        cluster.worker(name, concurrency=concurrency, app=APP, app_id=APP_ID)


# --- helpers --------------------------------------------------------------------------


def submit(app: bg.BackgroundApp, scope: str, identifier: str, **payload: Any) -> None:
    app.scheduler_for(scope).submit(bg.ProcessingTaskRequest(identifier, payload=payload))


def events(client: redis.Redis, scope: str, event: str | None = None) -> list[dict[str, Any]]:
    """Events recorded by the scope's handlers, oldest first."""
    found = [json.loads(raw) for raw in client.lrange(EVENTS, 0, -1)]
    return [e for e in found if e["scope"] == scope and event in (None, e["event"])]


def first(client: redis.Redis, scope: str, event: str, **match: Any) -> dict[str, Any]:
    """Wait for the first event of a kind (with these fields) in a scope."""

    def find() -> dict[str, Any] | None:
        for e in events(client, scope, event):
            if all(e.get(k) == v for k, v in match.items()):
                return e
        return None

    return wait_for(find, 15, f"{event} {match} in {scope}")


def errors(client: redis.Redis, scope: str) -> dict[int, int]:
    """Error codes the scope's handlers met, by step index."""
    return {e["step"]: e["code"] for e in events(client, scope, "error")}


def finished(app: bg.BackgroundApp, scope: str, timeout: float = 15) -> bg.TaskRecord:
    """Wait for the scope's first history record."""
    return wait_for(
        lambda: app.scheduler_for(scope).history(), timeout, f"a run in {scope} to end"
    )[-1]


def signal_count(client: redis.Redis, name: str) -> int:
    return int(client.get(SIGNALS + name) or 0)


def awaited(client: redis.Redis, name: str, count: int = 1) -> None:
    wait_for(lambda: signal_count(client, name) >= count, 15, f"signal {name}")


def send(client: redis.Redis, name: str) -> None:
    client.incr(SIGNALS + name)


def duration(record: bg.TaskRecord) -> float:
    assert record.started_at is not None and record.finished_at is not None
    return (record.finished_at - record.started_at).total_seconds()


def seed_charge(app: bg.BackgroundApp, client: redis.Redis, scope: str, hours_ago: float) -> Any:
    """A function adding a charge of `ms` made `hours_ago` to the scope's ledger, in the
    ledger's documented form (the rolling window cannot be waited for in a test)."""
    seconds, micros = client.time()
    at = seconds * 1000 + micros // 1000 - int(hours_ago * 3600 * 1000)

    def charge(ms: int) -> None:
        client.zadd(app.keys.transient_ledger(scope), {f"0:{at}:{ms}": at})

    return charge


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- the deadline moves -----------------------------------------------------------------


def test_delay_moves_the_deadline_and_the_watchdog_follows_it(
    cluster: Cluster, tapp: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """Two 2 s tasks each get a 4 s delay at once. One works 2.6 s and completes: it
    outlives its budget, no handler is called, and the quota is charged only the time
    past its 2 s deadline. The other never completes: its delay callback runs 0.8 s and
    its expiration handler 0.4 s before the delay's end, it is killed and recorded
    expired at that end (not at 2 s; and not later, though quota is left: a delay is at
    most 4 s), and 2 s are charged, settled before the kill."""
    start(cluster, "w1")
    keep = [{"do": "request", "as": "k"}, {"do": "until", "t": 2.6}, {"do": "complete"}]
    overrun = [{"do": "request", "as": "o"}, {"do": "until", "t": 30}]
    submit(tapp, "keep", A, steps=keep, expiration="record")
    submit(tapp, "overrun", A, steps=overrun, expiration="record")

    kept = finished(tapp, "keep")
    assert (kept.state, kept.success) == ("completed", True)
    assert duration(kept) >= 2.55, "the task ended before its delay let it"
    (granted,) = events(redis_client, "keep", "granted")
    assert granted["actual"] == DELAY * 1000
    assert not events(redis_client, "keep", "expiration")
    assert not events(redis_client, "keep", "delay_warning")
    charged = QUOTA - tapp.transient_task_info("keep").remaining_quota
    assert abs(charged - (duration(kept) - BUDGET) * 1000) <= MS_SLACK, charged

    overran = finished(tapp, "overrun")
    assert (overran.state, overran.success) == ("expired", False)
    begin = first(redis_client, "overrun", "start")
    granted = first(redis_client, "overrun", "granted")
    assert granted["actual"] == DELAY * 1000
    ends = granted["asked"] + DELAY
    (warning,) = events(redis_client, "overrun", "delay_warning")
    (expiration,) = events(redis_client, "overrun", "expiration")
    for name, at, due in [
        ("delay callback", warning["t"], ends - DELAY_LEAD),
        ("expiration handler", expiration["t"], ends - LEAD),
    ]:
        assert due - 0.05 <= at <= due + SLACK, f"{name} ran {at - due:+.3f}s from its time"
    assert overran.finished_at is not None
    killed = overran.finished_at.timestamp()
    assert ends - 0.05 <= killed <= ends + SLACK, f"expired {killed - ends:+.3f}s from the end"
    wait_for(lambda: pid_gone(begin["pid"]), 5, "the body's process to be killed")
    assert not events(redis_client, "overrun", "end")
    info = tapp.transient_task_info("overrun")
    assert info.transient_tasks == []
    held = (ends - (begin["t"] + BUDGET)) * 1000  # from the 2 s deadline to the delay's end
    assert abs(QUOTA - info.remaining_quota - held) <= MS_SLACK, info


def test_slow_delay_callback_holds_neither_the_lease_nor_the_deadline(
    cluster: Cluster, tapp: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A delay callback that takes 3 s, longer than the 1.5 s run lease, runs in a thread of
    its own: the run is still expired at its delay's end, once, and never given up as lost
    and run again. (When it ran on the watchdog thread, the deadline passed unenforced and
    the lapsed lease sent the request to run a second time.)"""
    start(cluster, "w1")
    steps = [{"do": "request", "as": "s", "slow": 3}, {"do": "until", "t": 30}]
    submit(tapp, "slow", A, steps=steps, expiration="record")
    overran = finished(tapp, "slow")
    assert (overran.state, overran.success) == ("expired", False), overran.reason
    granted = first(redis_client, "slow", "granted")
    ends = granted["asked"] + DELAY
    assert overran.finished_at is not None
    killed = overran.finished_at.timestamp()
    assert ends - 0.05 <= killed <= ends + SLACK, f"expired {killed - ends:+.3f}s from the end"
    assert len(events(redis_client, "slow", "delay_warning")) == 1
    wait_for(lambda: time.time() >= ends + 2, 10, "two seconds past the delay's end")
    assert len(events(redis_client, "slow", "start")) == 1
    assert [r.state for r in tapp.scheduler_for("slow").history()] == ["expired"]


# --- request ids ----------------------------------------------------------------------


def test_remaining_time_unknown_ids_and_bad_arguments(
    cluster: Cluster, tapp: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """get_remaining_delay_time counts down from actual_delay_time; an id that is not the
    task's own (made up, another task's, cancelled) is 9900001 for both calls; a blank
    reason, a callback that cannot be called or a non-integer id is 401 (so is a bad scope
    for transient_task_info). Cancelling before
    the deadline charges nothing, and a cancelled delay's callback never runs."""
    start(cluster, "w1")
    scope = "ids"
    submit(tapp, scope, A, steps=[
        {"do": "request", "as": "d"},                  # 0
        {"do": "remaining", "of": "d"},                # 1
        {"do": "until", "t": 0.4},                     # 2
        {"do": "remaining", "of": "d"},                # 3
        {"do": "until", "t": 0.8},                     # 4
        {"do": "remaining", "of": "d"},                # 5
        {"do": "remaining", "id": 987654},             # 6  unknown
        {"do": "cancel", "id": 987654},                # 7  unknown
        {"do": "request", "as": "x", "reason": ""},    # 8  bad reason
        {"do": "request", "as": "y", "callback": 42},  # 9  bad callback
        {"do": "remaining", "id": "d"},                # 10 bad id
        {"do": "signal", "name": "a-holds"},           # 11
        {"do": "await", "name": "b-tried"},            # 12
        {"do": "remaining", "of": "d"},                # 13 still there
        {"do": "cancel", "of": "d"},                   # 14
        {"do": "remaining", "of": "d"},                # 15 cancelled
        {"do": "cancel", "of": "d"},                   # 16 cancelled
        {"do": "complete"},                            # 17
    ])  # fmt: skip
    submit(tapp, scope, B, steps=[
        {"do": "await", "name": "a-holds"},            # 0
        {"do": "remaining", "of": "d"},                # 1  A's delay
        {"do": "cancel", "of": "d"},                   # 2  A's delay
        {"do": "signal", "name": "b-tried"},           # 3
        {"do": "complete"},                            # 4
    ])  # fmt: skip
    wait_for(lambda: len(tapp.scheduler_for(scope).history()) == 2, 15, "both runs to end")
    assert {(r.state, r.success) for r in tapp.scheduler_for(scope).history()} == {
        ("completed", True)
    }
    by_task = {
        ident: [e for e in events(redis_client, scope) if e["id"] == ident] for ident in (A, B)
    }
    a_errors = {e["step"]: e["code"] for e in by_task[A] if e["event"] == "error"}
    b_errors = {e["step"]: e["code"] for e in by_task[B] if e["event"] == "error"}
    assert a_errors == {6: UNKNOWN, 7: UNKNOWN, 8: BAD, 9: BAD, 10: BAD, 15: UNKNOWN, 16: UNKNOWN}
    assert b_errors == {1: UNKNOWN, 2: UNKNOWN}

    (granted,) = [e for e in by_task[A] if e["event"] == "granted"]
    left = [e for e in by_task[A] if e["event"] == "remaining"]
    assert len(left) == 4
    assert granted["actual"] == DELAY * 1000
    values = [e["left"] for e in left]
    assert values == sorted(values, reverse=True) and len(set(values)) == 4, values
    for e in left:
        expected = DELAY * 1000 - (e["t"] - granted["asked"]) * 1000
        assert expected - 20 <= e["left"] <= expected + MS_SLACK, (e["left"], expected)
    assert not events(redis_client, scope, "delay_warning")
    assert tapp.transient_task_info(scope) == bg.TransientTaskInfo(QUOTA, [])
    with pytest.raises(bg.ParameterError):
        tapp.transient_task_info("")


# --- limits ---------------------------------------------------------------------------


def test_at_most_three_delays_at_once_per_scope(
    cluster: Cluster, tapp: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A task holding three delays fills its scope: another task's request there is
    refused with 9900002 and changes nothing, while a task in another scope gets one; once
    a delay is cancelled, the refused task's next request is granted."""
    start(cluster, "w1", concurrency=3)
    submit(tapp, "full", A, steps=[
        {"do": "request", "as": "d1"},
        {"do": "request", "as": "d2"},
        {"do": "request", "as": "d3"},
        {"do": "signal", "name": "full"},
        {"do": "await", "name": "checked"},
        {"do": "cancel", "of": "d1"},
        {"do": "signal", "name": "freed"},
        {"do": "await", "name": "b-done"},
        {"do": "complete"},
    ])  # fmt: skip
    submit(tapp, "full", B, steps=[
        {"do": "await", "name": "full"},
        {"do": "request", "as": "x1"},                 # 1 refused
        {"do": "signal", "name": "b-refused"},
        {"do": "await", "name": "freed"},
        {"do": "request", "as": "x2"},
        {"do": "signal", "name": "b-done"},
        {"do": "complete"},
    ])  # fmt: skip
    submit(tapp, "other", C, steps=[
        {"do": "await", "name": "full"},
        {"do": "request", "as": "y"},
        {"do": "complete"},
    ])  # fmt: skip

    awaited(redis_client, "full")
    full = tapp.transient_task_info("full")
    assert len(full.transient_tasks) == 3
    assert all(0 < d.actual_delay_time <= DELAY * 1000 for d in full.transient_tasks)
    awaited(redis_client, "b-refused")
    after = tapp.transient_task_info("full")
    assert after.remaining_quota == full.remaining_quota
    assert [d.request_id for d in after.transient_tasks] == [
        d.request_id for d in full.transient_tasks
    ]
    send(redis_client, "checked")

    wait_for(lambda: len(tapp.scheduler_for("full").history()) == 2, 15, "both runs to end")
    assert errors(redis_client, "full") == {1: REFUSED}
    granted = {e["alias"] for e in events(redis_client, "full", "granted")}
    assert granted == {"d1", "d2", "d3", "x2"}
    assert first(redis_client, "other", "granted", alias="y")["actual"] == DELAY * 1000
    assert errors(redis_client, "other") == {}
    assert tapp.transient_task_info("full").transient_tasks == []


def test_charges_time_used_refunds_the_rest_and_overlaps_once(
    cluster: Cluster, tapp: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A held delay reserves only how far it moves the deadline; cancelled before the
    deadline it costs nothing. A task with a delay at 0 s and one at 1 s (both past its
    2 s deadline) reserves until the later end, once; cancelling the later one at 2.5 s
    refunds its extension, and completing at 2.9 s charges the 0.9 s actually used past
    the deadline, not once per delay."""
    start(cluster, "w1")
    submit(tapp, "refund", A, steps=[
        {"do": "request", "as": "r"},
        {"do": "signal", "name": "r-held"},
        {"do": "await", "name": "r-checked"},
        {"do": "cancel", "of": "r"},
        {"do": "signal", "name": "r-cancelled"},
        {"do": "await", "name": "r-checked2"},
        {"do": "complete"},
    ])  # fmt: skip
    submit(tapp, "overlap", B, steps=[
        {"do": "request", "as": "o1"},
        {"do": "until", "t": 1.0},
        {"do": "request", "as": "o2"},
        {"do": "signal", "name": "o-both"},
        {"do": "until", "t": 2.5},
        {"do": "cancel", "of": "o2"},
        {"do": "signal", "name": "o-cancelled"},
        {"do": "until", "t": 2.9},
        {"do": "complete"},
    ])  # fmt: skip

    def used(scope: str) -> int:
        return QUOTA - tapp.transient_task_info(scope).remaining_quota

    awaited(redis_client, "r-held")
    begin = first(redis_client, "refund", "start")
    granted = first(redis_client, "refund", "granted")
    reserved = (granted["asked"] + DELAY - (begin["t"] + BUDGET)) * 1000
    assert abs(used("refund") - reserved) <= MS_SLACK, (used("refund"), reserved)
    send(redis_client, "r-checked")
    awaited(redis_client, "r-cancelled")
    assert tapp.transient_task_info("refund") == bg.TransientTaskInfo(QUOTA, [])
    send(redis_client, "r-checked2")

    awaited(redis_client, "o-both")
    begin = first(redis_client, "overlap", "start")
    deadline = begin["t"] + BUDGET
    o1 = first(redis_client, "overlap", "granted", alias="o1")
    o2 = first(redis_client, "overlap", "granted", alias="o2")
    both = used("overlap")
    reserved = (o2["asked"] + DELAY - deadline) * 1000  # to the later end, counted once
    assert abs(both - reserved) <= MS_SLACK, (both, reserved)
    assert len(tapp.transient_task_info("overlap").transient_tasks) == 2

    awaited(redis_client, "o-cancelled")
    reserved = (o1["asked"] + DELAY - deadline) * 1000  # 0.5 s used, the rest of o1 held
    assert abs(used("overlap") - reserved) <= MS_SLACK, (used("overlap"), reserved)

    record = finished(tapp, "overlap")
    assert (record.state, record.success) == ("completed", True)
    end = first(redis_client, "overlap", "end")
    charged = (end["t"] - deadline) * 1000  # about 0.9 s, once for two delays
    wait_for(lambda: not tapp.transient_task_info("overlap").transient_tasks, 5, "settled")
    assert abs(used("overlap") - charged) <= MS_SLACK, (used("overlap"), charged)
    assert not events(redis_client, "overlap", "expiration")
    assert finished(tapp, "refund").success is True


def test_two_runs_holding_the_same_time_are_charged_for_it_once(
    cluster: Cluster, tapp: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """Two runs of one scope start together, each takes a delay and completes 1.5 s past its
    2 s deadline: over the same second and a half. The scope is charged that second and a
    half once, not once per run (HarmonyOS counts the time an app's transient tasks hold
    together once). (Before, each run was charged on its own: 3.0 s.)"""
    start(cluster, "w1")
    steps = [{"do": "request", "as": "d"}, {"do": "until", "t": BUDGET + 1.5}, {"do": "complete"}]
    tapp.scheduler_for("pair").submit_many(
        bg.ProcessingTaskRequest(identifier, payload={"steps": steps}) for identifier in (A, B)
    )
    wait_for(lambda: len(tapp.scheduler_for("pair").history()) == 2, 15, "both runs to end")
    begins = sorted(e["t"] for e in events(redis_client, "pair", "start"))
    ends = sorted(r.finished_at.timestamp() for r in tapp.scheduler_for("pair").history())
    assert begins[1] - begins[0] < 0.3, "the two runs overlap"
    held = (ends[1] - (begins[0] + BUDGET)) * 1000  # from the first deadline to the last end
    charged = QUOTA - tapp.transient_task_info("pair").remaining_quota
    print(f"\nheld together {held:.0f} ms; charged {charged} ms")
    assert abs(charged - held) <= MS_SLACK, (charged, held)
    assert charged < 2000  # not 1.5 s per run


def test_rolling_daily_quota_used_up_is_refused(
    cluster: Cluster, tapp: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """Charges of the last 24 hours count and older ones do not: with 4 s charged 23 h
    ago (and 5 s 25 h ago) a scope has 1 s left, and a delay gets its task's time to its
    deadline plus that second, no more; the next request is refused with 9900002. A scope
    with 5 s charged 23 h ago is refused at once."""
    seed_charge(tapp, redis_client, "q", 25)(5000)
    seed_charge(tapp, redis_client, "q", 23)(4000)
    seed_charge(tapp, redis_client, "spent", 23)(5000)
    assert tapp.transient_task_info("q") == bg.TransientTaskInfo(1000, [])
    assert tapp.transient_task_info("spent") == bg.TransientTaskInfo(0, [])
    start(cluster, "w1")
    submit(tapp, "q", A, steps=[
        {"do": "request", "as": "q1"},
        {"do": "request", "as": "q2"},                 # 1 refused
        {"do": "signal", "name": "q-asked"},
        {"do": "await", "name": "q-checked"},
        {"do": "complete"},
    ])  # fmt: skip
    submit(tapp, "spent", A, steps=[{"do": "request", "as": "s"}, {"do": "complete"}])

    awaited(redis_client, "q-asked")
    begin = first(redis_client, "q", "start")
    granted = first(redis_client, "q", "granted", alias="q1")
    to_deadline = (begin["t"] + BUDGET - granted["asked"]) * 1000
    assert abs(granted["actual"] - (to_deadline + 1000)) <= MS_SLACK, granted
    assert granted["actual"] < DELAY * 1000
    assert errors(redis_client, "q") == {1: REFUSED}
    held = tapp.transient_task_info("q")
    assert held.remaining_quota == 0 and len(held.transient_tasks) == 1
    send(redis_client, "q-checked")

    assert finished(tapp, "q").success is True
    assert finished(tapp, "spent").success is True
    assert errors(redis_client, "spent") == {0: REFUSED}
    # Completed before its deadline: nothing charged, the second left again.
    assert tapp.transient_task_info("q") == bg.TransientTaskInfo(1000, [])
    ledger = redis_client.zrange(tapp.keys.transient_ledger("q"), 0, -1)
    assert len(ledger) == 1, "the charge older than 24 hours was not dropped"


def test_quota_race_between_two_workers(
    cluster: Cluster, tapp: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """Two tasks on two workers, in one scope with 1 s of quota left, request a delay at
    the same moment (a barrier in Redis): exactly one is granted the last second, the
    other is refused with 9900002."""
    seed_charge(tapp, redis_client, "race", 1)(4000)
    start(cluster, "w1", "w2", concurrency=1)
    steps = [
        {"do": "signal", "name": "ready"},
        {"do": "await", "name": "ready", "count": 2},
        {"do": "request", "as": "last"},
        {"do": "signal", "name": "done"},
        {"do": "await", "name": "done", "count": 2},
        {"do": "complete"},
    ]
    submit(tapp, "race", A, steps=steps)
    submit(tapp, "race", B, steps=steps)

    wait_for(lambda: len(tapp.scheduler_for("race").history()) == 2, 15, "both runs to end")
    runs = tapp.scheduler_for("race").history()
    assert {r.worker for r in runs} == {"w1", "w2"}
    assert {(r.state, r.success) for r in runs} == {("completed", True)}
    granted = events(redis_client, "race", "granted")
    refused = events(redis_client, "race", "error")
    assert len(granted) == 1 and len(refused) == 1, (granted, refused)
    assert refused[0]["code"] == REFUSED and refused[0]["id"] != granted[0]["id"]
    assert granted[0]["actual"] < DELAY * 1000  # its time to the deadline + the last second
    assert not any(e["event"] == "await_timeout" for e in events(redis_client, "race"))
    assert tapp.transient_task_info("race") == bg.TransientTaskInfo(1000, [])


# --- worker death ---------------------------------------------------------------------


def test_delays_of_a_lost_worker_are_settled(
    cluster: Cluster, tapp: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A worker killed while its task holds a delay never settles it; once beat gives the
    run up, the next call on the scope settles it: the delay is gone, and no more than
    its reservation is charged."""
    start(cluster, "w1")
    submit(tapp, "lost", A, steps=[
        {"do": "request", "as": "d"},
        {"do": "signal", "name": "held"},
        {"do": "until", "t": 30},
    ])  # fmt: skip
    awaited(redis_client, "held")
    reserved = QUOTA - tapp.transient_task_info("lost").remaining_quota
    assert 1500 <= reserved <= 2000 + MS_SLACK, reserved
    cluster.procs[-1].kill()

    record = finished(tapp, "lost")
    assert (record.state, "worker lost" in record.reason) == ("failed", True)
    info = tapp.transient_task_info("lost")
    assert info.transient_tasks == []
    assert QUOTA - reserved <= info.remaining_quota <= QUOTA, (info, reserved)
    assert redis_client.hlen(tapp.keys.transient_runs("lost")) == 0
    assert redis_client.hlen(tapp.keys.transient_delays("lost")) == 0
    assert tapp.transient_task_info("lost") == info  # settled: later calls agree
