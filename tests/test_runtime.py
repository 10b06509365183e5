"""End to end: requests run by real `bgqueue worker` and `bgqueue beat` processes.

Covers the not-before date, requirement routing (power, network, data protection),
time budgets (expiration handler timing, termination of an overrunning body, no
expiration handler), outcomes (failed, unsuccessful, returned), simulated launch and
expiration, continued processing (FAIL/QUEUE strategies, progress and stalls) and the
fields of history records. Every wait polls a condition with a deadline.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil
import pytest
import redis

import bgqueue as bg
from bgqueue import runtime, status
from bgqueue.beat import Beat
from bgqueue.metrics import pending_requests
from tests.harness import APP_ID, Cluster, events, wait_for

PREFIX = "com.bgqueue.test."
A, B, C = PREFIX + "a", PREFIX + "b", PREFIX + "c"
REFRESH, PROCESS, HEALTH = PREFIX + "refresh", PREFIX + "process", PREFIX + "health"
CONTINUED, SLOW = PREFIX + "continued", PREFIX + "slow"

# Short budgets for the budget tests (read by the worker, not by the producer).
REFRESH_BUDGET = 3.0
WARNING = 1.0
# DESIGN §4: the handler runs `expiration_warning` before the deadline, at most a fifth
# of the budget: min(1, 3 / 5) = 0.6 s, so at 2.4 s into a 3 s budget.
WARN_AT = REFRESH_BUDGET - min(WARNING, REFRESH_BUDGET / 5)
BUDGET_ENV = {
    "TEST_REFRESH_BUDGET": str(REFRESH_BUDGET),
    "TEST_EXPIRATION_WARNING": str(WARNING),
}
STALL = 2.0
STALL_ENV = {"TEST_STALL": str(STALL), "TEST_EXPIRATION_WARNING": str(WARNING)}
HEARTBEAT_INTERVAL = 0.2  # tests.harness.FAST
CLOCK_SLACK = 0.005  # ms-rounded dates and timestamps


# --- fast teardown ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _kill_processes_at_teardown(cluster: Cluster) -> Iterator[None]:
    """Once a test's assertions are done, SIGKILL its processes all at once: a graceful
    Celery shutdown takes about 1.5 s per worker and is not what these tests check. The
    harness's own stop then finds nothing left to stop."""
    yield
    cluster.kill_all()


# --- helpers ------------------------------------------------------------------------


def runs(scheduler: Any, identifier: str) -> list[bg.TaskRecord]:
    """History records of one identifier in the scheduler's scope, newest first."""
    return [r for r in scheduler.history(limit=1000) if r.identifier == identifier]


def finished(scheduler: Any, identifier: str, timeout: float = 15) -> bg.TaskRecord:
    """Wait for the first history record of `identifier` and return it."""
    found = wait_for(
        lambda: runs(scheduler, identifier), timeout, f"a history record of {identifier}"
    )
    return found[-1]


def started(client: redis.Redis, identifier: str, scope: str = "default") -> dict[str, Any]:
    """Wait for the start event of `identifier` in `scope` and return it."""
    return wait_for(
        lambda: next((e for e in events(client, "start", identifier) if e["scope"] == scope), None),
        15,
        f"{identifier} to start",
    )


def events_of(client: redis.Redis, event: str, identifier: str, gen: int) -> list[dict[str, Any]]:
    """Events of one run (a request id) of `identifier`."""
    return [e for e in events(client, event, identifier) if e["gen"] == gen]


def raw_record(client: redis.Redis, identifier: str, scope: str = "default") -> dict[str, Any]:
    """The Redis record of a not-yet-started request, or {} if there is none."""
    raw = client.hget(f"bgqueue:{{{APP_ID}}}:req:{scope}", identifier)
    return json.loads(raw) if raw else {}


def pid_gone(pid: int) -> bool:
    """Whether a process has exited (a zombie not yet reaped counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_holds(check: Callable[[], bool], seconds: float, message: str) -> None:
    """Poll `check` for `seconds`; fail as soon as it is false."""
    end = time.monotonic() + seconds
    outcome = wait_for(
        lambda: ("broken" if not check() else None) or (time.monotonic() >= end and "held"),
        seconds + 5,
        message,
    )
    assert outcome == "held", f"{message}: stopped holding"


def assert_still_pending(client: redis.Redis, identifier: str, seconds: float) -> None:
    """The request stays pending (not dispatched) and never starts for `seconds`."""
    assert_holds(
        lambda: (
            raw_record(client, identifier).get("s") == "pending"
            and not events(client, "start", identifier)
        ),
        seconds,
        f"{identifier} to stay pending",
    )


def duration(record: bg.TaskRecord) -> float:
    assert record.started_at is not None and record.finished_at is not None
    return (record.finished_at - record.started_at).total_seconds()


def in_future(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


# --- not-before ---------------------------------------------------------------------


def test_not_before_date_is_honoured(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A request with earliest_begin_date now+1.5 s never starts before it and starts within
    1 s after it, although a capable worker is idle the whole time."""
    cluster.beat()
    cluster.worker("w1")
    begin = in_future(1.5)
    sample_app.scheduler.submit(
        bg.ProcessingTaskRequest(A, earliest_begin_date=begin, payload={"complete": True})
    )
    assert raw_record(redis_client, A)["s"] == "pending"
    start = started(redis_client, A)
    late = start["t"] - begin.timestamp()
    assert late >= -CLOCK_SLACK, f"started {-late:.3f}s before its earliest begin date"
    assert late <= 1.0, f"started {late:.3f}s after its earliest begin date"
    record = finished(sample_app.scheduler, A)
    assert (record.state, record.success) == ("completed", True)
    assert record.started_at is not None and record.started_at >= begin - timedelta(
        seconds=CLOCK_SLACK
    )


# --- requirement routing ------------------------------------------------------------


def test_external_power_request_waits_for_a_powered_worker(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A request needing external power is not dispatched while only an unpowered worker
    is live (which does run an unconstrained request), and runs on a powered worker as soon
    as one joins."""
    cluster.beat()
    cluster.worker("unpowered", conditions=["external_power=false"])
    sample_app.scheduler.submit_many(
        [
            bg.ProcessingTaskRequest(A, requires_external_power=True, payload={"complete": True}),
            bg.ProcessingTaskRequest(B, payload={"complete": True}),
        ]
    )
    control = finished(sample_app.scheduler, B)
    assert control.worker == "unpowered" and control.success
    assert_still_pending(redis_client, A, 1.5)

    cluster.worker("powered", conditions=["external_power=true"])
    record = finished(sample_app.scheduler, A)
    assert (record.state, record.success, record.worker) == ("completed", True, "powered")
    assert started(redis_client, A)["worker"] == "powered"
    assert len(events(redis_client, "start", A)) == 1


def test_network_request_never_goes_to_an_offline_worker(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A request needing network connectivity is never given to a worker with network=none,
    and runs on a networked worker once one joins."""
    cluster.beat()
    cluster.worker("offline", conditions=["network=none"])
    sample_app.scheduler.submit_many(
        [
            bg.ProcessingTaskRequest(
                A, requires_network_connectivity=True, payload={"complete": True}
            ),
            bg.ProcessingTaskRequest(B, payload={"complete": True}),
        ]
    )
    assert finished(sample_app.scheduler, B).worker == "offline"
    assert_still_pending(redis_client, A, 1.0)

    cluster.worker("online", conditions=["network=wifi"])
    record = finished(sample_app.scheduler, A)
    assert (record.state, record.success, record.worker) == ("completed", True, "online")
    assert [e["worker"] for e in events(redis_client, "start", A)] == ["online"]


def test_data_protection_level_routes_health_research(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A health-research request needing COMPLETE protection is not run by a worker that can
    only open complete_until_first_user_authentication (which does run one needing that
    level), and is run by a worker with data_protection=complete."""
    cluster.beat()
    cluster.worker("weak", conditions=["data_protection=complete_until_first_user_authentication"])
    level = bg.FileProtectionType
    sample_app.scheduler.submit_many(
        [
            bg.HealthResearchTaskRequest(HEALTH, payload={"complete": True}),
            bg.HealthResearchTaskRequest(
                B,
                protection_type_of_required_data=level.COMPLETE_UNTIL_FIRST_USER_AUTHENTICATION,
                payload={"complete": True},
            ),
        ]
    )
    control = finished(sample_app.scheduler, B)
    assert (control.kind, control.worker) == ("health_research", "weak")
    assert_still_pending(redis_client, HEALTH, 1.0)

    cluster.worker("strong", conditions=["data_protection=complete"])
    record = finished(sample_app.scheduler, HEALTH)
    assert (record.state, record.success, record.worker) == ("completed", True, "strong")
    assert record.kind == "health_research"
    assert [e["worker"] for e in events(redis_client, "start", HEALTH)] == ["strong"]


# --- time budgets -------------------------------------------------------------------


def test_expiration_handler_runs_before_the_deadline(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """With a 3 s refresh budget and a 1 s warning, the expiration handler runs at
    budget - min(warning, budget/5) = 2.4 s; completing there records 'completed',
    unsuccessful, within the budget, and only once although the body overran."""
    cluster.beat()
    cluster.worker("w1", env=BUDGET_ENV)
    sample_app.scheduler.submit(
        bg.AppRefreshTaskRequest(REFRESH, payload={"sleep": 10, "expiration": "complete"})
    )
    start = started(redis_client, REFRESH)
    record = finished(sample_app.scheduler, REFRESH, timeout=10)
    (expiration,) = events_of(redis_client, "expiration", REFRESH, start["gen"])
    lead = expiration["t"] - start["t"]
    assert WARN_AT - 0.15 <= lead <= WARN_AT + 0.2, f"expiration handler ran at {lead:.3f}s"
    assert (record.state, record.success, record.kind) == ("completed", False, "refresh")
    assert duration(record) < REFRESH_BUDGET, f"run took {duration(record):.3f}s"
    # The body kept sleeping after it completed; it is stopped at the deadline, and the
    # outcome recorded by the handler stays the only one.
    wait_for(lambda: pid_gone(start["pid"]), REFRESH_BUDGET + 3, "the overrunning body to stop")
    assert [(r.state, r.success) for r in runs(sample_app.scheduler, REFRESH)] == [
        ("completed", False)
    ]
    assert not events_of(redis_client, "end", REFRESH, start["gen"])


def test_overrunning_body_is_terminated_and_worker_keeps_serving(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A body whose expiration handler does not complete is recorded 'expired' at the
    deadline, its pool process is killed (no 'end' event), and the same worker, still
    alive, runs the next request in a replacement pool process; the request is not rerun."""
    cluster.beat()
    worker = cluster.worker("w1", concurrency=1, env=BUDGET_ENV)
    sample_app.scheduler.submit(
        bg.AppRefreshTaskRequest(REFRESH, payload={"sleep": 10, "expiration": "record"})
    )
    start = started(redis_client, REFRESH)
    record = finished(sample_app.scheduler, REFRESH, timeout=10)
    assert (record.state, record.success, record.worker) == ("expired", False, "w1")
    took = duration(record)
    assert REFRESH_BUDGET - 0.05 <= took <= REFRESH_BUDGET + 1.0, f"expired after {took:.3f}s"
    assert len(events_of(redis_client, "expiration", REFRESH, start["gen"])) == 1
    wait_for(lambda: pid_gone(start["pid"]), 5, "the pool process to be killed")
    assert not events_of(redis_client, "end", REFRESH, start["gen"])

    sample_app.scheduler.submit(bg.ProcessingTaskRequest(A, payload={"complete": True}))
    after = finished(sample_app.scheduler, A)
    assert (after.state, after.success, after.worker) == ("completed", True, "w1")
    assert started(redis_client, A)["pid"] != start["pid"]
    assert worker.alive(), worker.log()
    assert len(events(redis_client, "start", REFRESH)) == 1
    assert len(runs(sample_app.scheduler, REFRESH)) == 1


def test_slow_expiration_handler_holds_neither_the_lease_nor_the_deadline(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """An expiration handler that takes 4 s, longer than the 1.5 s run lease, runs in a
    thread of its own: the watchdog renews the lease meanwhile and stops the body at its
    3 s deadline. The run is recorded expired at the deadline, once, and is never given up
    as lost and run again while its worker lives. (When the handler ran on the watchdog
    thread, the request started three times and its run was recorded 'worker lost'.)"""
    cluster.beat()
    cluster.worker("w1", env=BUDGET_ENV)
    payload = {"sleep": 7, "expiration": "slow", "expiration_sleep": 4}
    sample_app.scheduler.submit(bg.AppRefreshTaskRequest(REFRESH, payload=payload))
    start = started(redis_client, REFRESH)
    record = finished(sample_app.scheduler, REFRESH, timeout=10)
    assert (record.state, record.success) == ("expired", False), record.reason
    took = duration(record)
    assert REFRESH_BUDGET - 0.05 <= took <= REFRESH_BUDGET + 0.5, f"expired after {took:.3f}s"
    wait_for(lambda: pid_gone(start["pid"]), 5, "the overrunning body to stop")
    # Past the lease the blocked watchdog would have let lapse, and beat's sweep: one run.
    assert_holds(
        lambda: (
            len(events(redis_client, "start", REFRESH)) == 1
            and [r.state for r in runs(sample_app.scheduler, REFRESH)] == ["expired"]
        ),
        2.5,
        "one start and one expired record",
    )
    assert not events_of(redis_client, "end", REFRESH, start["gen"])


def test_overrun_without_expiration_handler_ends_unsuccessful(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A body with no expiration handler that overruns ends 'completed' and unsuccessful at
    the warning time (budget - lead), with a reason naming the missing handler."""
    cluster.beat()
    cluster.worker("w1", env=BUDGET_ENV)
    sample_app.scheduler.submit(bg.AppRefreshTaskRequest(REFRESH, payload={"sleep": 10}))
    start = started(redis_client, REFRESH)
    record = finished(sample_app.scheduler, REFRESH, timeout=10)
    assert (record.state, record.success) == ("completed", False)
    assert "no expiration handler" in record.reason
    took = duration(record)
    assert WARN_AT - 0.1 <= took <= WARN_AT + 0.4, f"ended after {took:.3f}s"
    wait_for(lambda: pid_gone(start["pid"]), 5, "the overrunning body to stop")
    assert not events_of(redis_client, "end", REFRESH, start["gen"])
    assert len(runs(sample_app.scheduler, REFRESH)) == 1


# --- outcomes -----------------------------------------------------------------------


def test_raising_handler_is_failed_and_worker_keeps_serving(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A handler that raises is recorded 'failed', unsuccessful, with the exception's message
    as reason; its worker (one pool process) goes on to run the next request."""
    cluster.beat()
    worker = cluster.worker("w1", concurrency=1)
    message = f"boom-{uuid.uuid4().hex[:8]}"
    sample_app.scheduler.submit(bg.ProcessingTaskRequest(A, payload={"raise": message}))
    record = finished(sample_app.scheduler, A)
    assert (record.state, record.success, record.worker) == ("failed", False, "w1")
    assert message in record.reason and "RuntimeError" in record.reason

    sample_app.scheduler.submit(bg.ProcessingTaskRequest(B, payload={"complete": True}))
    after = finished(sample_app.scheduler, B)
    assert (after.state, after.success, after.worker) == ("completed", True, "w1")
    # An exception is an outcome, not a crash: the same pool process ran both.
    assert started(redis_client, B)["pid"] == started(redis_client, A)["pid"]
    assert worker.alive()


def test_completion_outcomes(cluster: Cluster, sample_app: bg.BackgroundApp) -> None:
    """set_task_completed(success=False) within budget records 'completed' unsuccessful;
    returning without set_task_completed records 'completed' successful."""
    cluster.beat()
    cluster.worker("w1")
    sample_app.scheduler.submit_many(
        [
            bg.ProcessingTaskRequest(A, payload={"complete": False}),
            bg.ProcessingTaskRequest(B, payload={}),
            bg.ProcessingTaskRequest(C, payload={"complete": True}),
        ]
    )
    unsuccessful = finished(sample_app.scheduler, A)
    returned = finished(sample_app.scheduler, B)
    succeeded = finished(sample_app.scheduler, C)
    assert (unsuccessful.state, unsuccessful.success) == ("completed", False)
    assert (returned.state, returned.success) == ("completed", True)
    assert (succeeded.state, succeeded.success) == ("completed", True)
    assert duration(unsuccessful) < 1.0


def test_task_record_fields(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """History records carry identifier, scope, kind, state, success, aware started/finished
    datetimes matching the run (finished >= started) and the worker's --name."""
    cluster.beat()
    cluster.worker("edge-7")
    device = sample_app.scheduler_for("device-42")
    device.submit(bg.AppRefreshTaskRequest(REFRESH, payload={"sleep": 0.3, "complete": True}))
    record = finished(device, REFRESH)
    assert sample_app.scheduler.history() == []  # another scope's history is its own
    assert record.identifier == REFRESH
    assert record.scope == "device-42"
    assert record.kind == "refresh"
    assert (record.state, record.success) == ("completed", True)
    assert record.worker == "edge-7"
    assert record.attempt == 1
    assert record.started_at is not None and record.finished_at is not None
    assert record.started_at.utcoffset() == timedelta(0)
    assert record.finished_at.utcoffset() == timedelta(0)
    assert record.finished_at >= record.started_at
    start = started(redis_client, REFRESH, scope="device-42")
    (end,) = events_of(redis_client, "end", REFRESH, start["gen"])
    assert record.request_id == start["gen"]
    assert abs(record.started_at.timestamp() - start["t"]) < 0.25
    assert record.finished_at.timestamp() >= end["t"] - CLOCK_SLACK
    assert 0.3 <= duration(record) < 1.5


# --- simulate launch and expiration -------------------------------------------------


def test_simulate_launch_ignores_date_but_not_requirements(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """simulate_launch makes a request due an hour early runnable now; one needing external
    power still waits on an unpowered worker; an unknown identifier returns False."""
    cluster.beat()
    cluster.worker("unpowered", conditions=["external_power=false"])
    later = in_future(3600)
    sample_app.scheduler.submit_many(
        [
            bg.ProcessingTaskRequest(A, earliest_begin_date=later, payload={"complete": True}),
            bg.ProcessingTaskRequest(
                B, earliest_begin_date=later, requires_external_power=True, payload={}
            ),
        ]
    )
    assert raw_record(redis_client, A)["s"] == "pending"
    assert sample_app.scheduler.simulate_launch(A) is True
    assert sample_app.scheduler.simulate_launch(B) is True
    assert sample_app.scheduler.simulate_launch(C) is False
    record = finished(sample_app.scheduler, A, timeout=5)
    assert (record.state, record.success, record.worker) == ("completed", True, "unpowered")
    assert_still_pending(redis_client, B, 1.0)
    assert [r.identifier for r in sample_app.scheduler.pending_task_requests()] == [B]


def test_simulate_expiration_calls_the_handler_now(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """simulate_expiration of a running task with 30 s of budget calls its expiration handler
    within about a heartbeat interval; the handler completing ends it 'completed',
    unsuccessful. For a task not running, or another scope, it returns 0."""
    cluster.beat()
    cluster.worker("w1", env={"TEST_PROCESSING_BUDGET": "30"})
    sample_app.scheduler.submit(
        bg.ProcessingTaskRequest(PROCESS, payload={"sleep": 20, "expiration": "complete"})
    )
    start = started(redis_client, PROCESS)
    assert sample_app.scheduler.simulate_expiration(C) == 0
    assert sample_app.scheduler_for("elsewhere").simulate_expiration(PROCESS) == 0
    asked = time.time()
    assert sample_app.scheduler.simulate_expiration(PROCESS) == 1
    expiration = wait_for(
        lambda: events_of(redis_client, "expiration", PROCESS, start["gen"]), 5, "the handler"
    )[0]
    delay = expiration["t"] - asked
    assert 0 <= delay <= HEARTBEAT_INTERVAL + 0.4, f"handler ran {delay:.3f}s after the request"
    record = finished(sample_app.scheduler, PROCESS, timeout=5)
    assert (record.state, record.success) == ("completed", False)
    assert duration(record) < 10
    wait_for(lambda: pid_gone(start["pid"]), 5, "the overrunning body to stop")
    assert sample_app.scheduler.simulate_expiration(PROCESS) == 0
    assert len(runs(sample_app.scheduler, PROCESS)) == 1


def test_a_requeued_run_waits_as_retrying_outside_the_pending_limit(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """Refresh A runs and refresh B is submitted (the limit of one counts what waits, not
    what runs); A's worker dies. A comes back as a retrying request (attempt 2) beside B:
    accepted once already, it waits outside the limit, so the scope's counter still holds
    one, a third refresh is refused, and both run on the next worker. (Before, the requeue
    left two pending refresh requests counted against a limit of one.)"""
    cluster.beat()
    worker = cluster.worker("w1", concurrency=1, env={"TEST_REFRESH_BUDGET": "30"})
    payload = {"first_sleep": 30, "complete": True}
    sample_app.scheduler.submit(bg.AppRefreshTaskRequest(REFRESH, payload=payload))
    started(redis_client, REFRESH)
    sample_app.scheduler.submit(bg.AppRefreshTaskRequest(B, payload={"complete": True}))
    worker.kill()
    wait_for(lambda: raw_record(redis_client, REFRESH).get("a") == 1, 15, "A requeued")
    pending = {r.identifier for r in sample_app.scheduler.pending_task_requests()}
    assert pending == {REFRESH, B}
    counters = redis_client.hmget(f"bgqueue:{{{APP_ID}}}:req:default", "#refresh", "#processing")
    assert counters == [b"1", None]
    with pytest.raises(bg.TooManyPendingTaskRequests):
        sample_app.scheduler.submit(bg.AppRefreshTaskRequest(C))
    cluster.worker("w2", concurrency=2)
    wait_for(lambda: len(events(redis_client, "end")) == 2, 15, "A again, and B")
    assert [e["attempt"] for e in events(redis_client, "start", REFRESH)] == [1, 2]
    assert redis_client.hgetall(f"bgqueue:{{{APP_ID}}}:req:default") == {}


def test_a_second_worker_with_a_live_workers_name_refuses_to_start(
    cluster: Cluster, redis_client: redis.Redis
) -> None:
    """Two workers given the same --name (a scaled service): the second waits out the first
    one's heartbeat and, finding it live, exits with an error naming the holder; the first
    keeps its name. Once the first is gone, a worker may take the name again (a restart).
    (Before, both ran and overwrote each other's heartbeat and conditions.)"""
    first = cluster.worker("twin", concurrency=1)
    second = cluster.worker("twin", concurrency=1, wait=False)
    assert second.popen.wait(15) != 0
    assert "a live worker already has the name 'twin'" in second.log()
    assert f"pid {first.pid}" in second.log()
    holder = json.loads(redis_client.hget(f"bgqueue:{{{APP_ID}}}:workers", "twin"))
    assert holder["pid"] == first.pid and first.alive()
    first.kill()
    again = cluster.worker("twin", concurrency=1)
    assert again.alive()


# --- continued processing -----------------------------------------------------------


def request_state(client: redis.Redis) -> dict[str, Any]:
    """The app's not-yet-started requests and due sets, to show a refusal wrote nothing."""
    base = f"bgqueue:{{{APP_ID}}}"
    return {
        "requests": client.hgetall(f"{base}:req:default"),
        "due": [client.zrange(f"{base}:due:{p}", 0, -1, withscores=True) for p in range(16)],
        "leases": client.zrange(f"{base}:leases", 0, -1),
    }


def test_continued_fail_strategy_needs_a_free_worker_now(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A continued-processing request with FAIL raises ImmediateRunIneligible (code 4) and
    writes nothing when no worker is alive or the only worker is busy, and is accepted and
    run when a worker with a free slot is alive."""
    request = bg.ContinuedProcessingTaskRequest(
        CONTINUED, title="Export", strategy=bg.ContinuedProcessingStrategy.FAIL, payload={}
    )
    with pytest.raises(bg.ImmediateRunIneligible) as refused:
        sample_app.scheduler.submit(request)
    assert (refused.value.code, refused.value.domain) == (4, "BGTaskSchedulerErrorDomain")
    assert request_state(redis_client) == {"requests": {}, "due": [[]] * 16, "leases": []}
    assert sample_app.scheduler.pending_task_requests() == []

    cluster.beat()
    cluster.worker("w1", concurrency=1)
    sample_app.scheduler.submit(bg.ProcessingTaskRequest(A, payload={"sleep": 1.5}))
    started(redis_client, A)

    def busy() -> bool:
        beat = sample_app.live_workers().get("w1")
        return bool(beat) and beat["busy"] >= beat["concurrency"]

    wait_for(busy, 5, "w1 to report its slot busy")
    before = request_state(redis_client)
    with pytest.raises(bg.ImmediateRunIneligible):
        sample_app.scheduler.submit(request)
    assert request_state(redis_client) == before
    assert raw_record(redis_client, CONTINUED) == {}

    wait_for(lambda: runs(sample_app.scheduler, A) and not busy(), 10, "w1 to be free again")
    sample_app.scheduler.submit(request)
    record = finished(sample_app.scheduler, CONTINUED)
    assert (record.state, record.success, record.kind) == (
        "completed",
        True,
        "continued_processing",
    )
    assert record.worker == "w1"


def busy(app: bg.BackgroundApp, worker: str = "w1") -> bool:
    """Whether the worker's heartbeat reports every slot busy, or a run is recorded."""
    beat = app.live_workers().get(worker)
    return bool(app.client.hlen(app.keys.running)) or (
        bool(beat) and beat["busy"] >= beat["concurrency"]
    )


def test_two_producers_racing_for_the_last_slot_get_it_once(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_url: str, redis_client: redis.Redis
) -> None:
    """Two producers, each on its own connection, released together by a barrier, submit a
    FAIL continued-processing request while one slot is free: the free-slot check and the
    submit are one step (submit.lua), so exactly one is accepted and the other refused,
    every time. (When the check was a separate read, both passed it.)"""
    cluster.beat()
    cluster.worker("w1", concurrency=1)
    producers = [
        bg.BackgroundApp(APP_ID, permitted_identifiers=[PREFIX + "*"], broker_url=redis_url)
        for _ in range(2)
    ]
    for round_no in range(4):
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def submit(
            app: bg.BackgroundApp,
            scope: str,
            barrier: threading.Barrier = barrier,
            outcomes: list[str] = outcomes,
        ) -> None:
            request = bg.ContinuedProcessingTaskRequest(
                CONTINUED,
                title="Export",
                strategy=bg.ContinuedProcessingStrategy.FAIL,
                payload={"complete": True},
            )
            barrier.wait()
            try:
                app.scheduler_for(scope).submit(request)
                outcomes.append("accepted")
            except bg.ImmediateRunIneligible:
                outcomes.append("refused")

        threads = [
            threading.Thread(target=submit, args=(app, f"r{round_no}-{n}"))
            for n, app in enumerate(producers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert sorted(outcomes) == ["accepted", "refused"], (round_no, outcomes)
        wait_for(
            lambda n=round_no: len(events(redis_client, "end", CONTINUED)) == n + 1,
            10,
            "the accepted one to run",
        )
        wait_for(lambda: not busy(sample_app), 5, "w1 to report its slot free")


def test_continued_queue_strategy_waits_for_a_worker(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A continued-processing request with QUEUE is accepted with no worker alive, stays
    pending (listed with its title and strategy), and runs once a worker joins."""
    cluster.beat()
    sample_app.scheduler.submit(
        bg.ContinuedProcessingTaskRequest(
            CONTINUED,
            title="Export",
            subtitle="photos",
            strategy=bg.ContinuedProcessingStrategy.QUEUE,
            payload={"complete": True},
        )
    )
    (copy,) = sample_app.scheduler.pending_task_requests()
    assert isinstance(copy, bg.ContinuedProcessingTaskRequest)
    assert (copy.title, copy.subtitle) == ("Export", "photos")
    assert copy.strategy is bg.ContinuedProcessingStrategy.QUEUE
    assert_still_pending(redis_client, CONTINUED, 0.5)

    cluster.worker("w1")
    record = finished(sample_app.scheduler, CONTINUED)
    assert (record.state, record.success, record.worker) == ("completed", True, "w1")
    assert record.kind == "continued_processing"


def test_continued_processing_lives_by_progress(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """With a 2 s stall window, a continued task reporting progress every 0.5 s runs 4 s and
    completes; one that reports none is warned and expired about 2 s after it starts."""
    cluster.beat()
    cluster.worker("w1", env=STALL_ENV)
    queue = bg.ContinuedProcessingStrategy.QUEUE
    sample_app.scheduler.submit_many(
        [
            bg.ContinuedProcessingTaskRequest(
                CONTINUED, strategy=queue, payload={"progress": {"every": 0.5, "steps": 8}}
            ),
            bg.ContinuedProcessingTaskRequest(
                SLOW, strategy=queue, payload={"sleep": 10, "expiration": "record"}
            ),
        ]
    )
    stalled = finished(sample_app.scheduler, SLOW, timeout=10)
    assert (stalled.state, stalled.success) == ("expired", False)
    took = duration(stalled)
    assert STALL - 0.05 <= took <= STALL + 0.8, f"stalled task expired after {took:.3f}s"
    slow_start = started(redis_client, SLOW)
    assert len(events_of(redis_client, "expiration", SLOW, slow_start["gen"])) == 1

    progressing = finished(sample_app.scheduler, CONTINUED, timeout=15)
    assert (progressing.state, progressing.success) == ("completed", True)
    assert duration(progressing) >= 3.9  # 8 steps of 0.5 s: twice the stall window
    gen = started(redis_client, CONTINUED)["gen"]
    assert not events_of(redis_client, "expiration", CONTINUED, gen)
    assert len(events_of(redis_client, "end", CONTINUED, gen)) == 1


def test_rolling_deploy_offers_a_request_only_to_a_worker_with_its_handler(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """During a rolling deploy an old build without B's handler serves alone: B is never
    offered to it and waits, shown as no_handler; when a message for B reaches it anyway
    (routed by a stale view), it hands it back unharmed. A new build joins and runs B once.
    (Before, the old worker consumed B and recorded it 'failed: no launch handler'.)"""
    old = cluster.worker("old", concurrency=1, env={"TEST_OMIT": B})
    sample_app.scheduler.submit(bg.ProcessingTaskRequest(B, payload={"complete": True}))
    # A beat whose view wrongly says the old class has B's handler claims and sends it there.
    stale = Beat(cluster.redis_url)
    view = stale.view(sample_app.keys)
    [old_class] = view.classes
    view.routes[0][B] = [old_class]
    claimed = stale._claim(sample_app.keys, 0, ["default"], view, view.now)
    assert [c.identifier for c in claimed] == [B]
    stale.publish(sample_app.keys, claimed, view.now)
    wait_for(lambda: raw_record(redis_client, B).get("s") == "pending", 10, "B handed back")
    assert "handed it back" in old.log()
    assert raw_record(redis_client, B)["a"] == 0 and sample_app.scheduler.history() == []

    cluster.beat()
    sample_app.scheduler.submit(bg.ProcessingTaskRequest(A, payload={"complete": True}))
    assert finished(sample_app.scheduler, A).worker == "old"  # the old build serves the rest
    assert_holds(
        lambda: (
            raw_record(redis_client, B).get("s") == "parked"
            and not events(redis_client, "start", B)
        ),
        1.0,
        "B waits for a worker with its handler",
    )
    assert "no handler: 1" in status.report(redis_client)
    waiting = pending_requests(redis_client, sample_app.keys, set(range(16)), 0)
    assert waiting[("processing", "no_handler")] == 1

    cluster.worker("new", concurrency=1)
    record = finished(sample_app.scheduler, B)
    assert (record.state, record.success, record.worker) == ("completed", True, "new")
    assert_holds(lambda: len(events(redis_client, "start", B)) == 1, 0.5, "one run of B")
    assert sample_app.scheduler.pending_task_requests() == []


def test_a_slow_clock_reading_does_not_skew_the_eta_of_every_run() -> None:
    """The worker moves each ETA by Redis's clock minus its own, read at each heartbeat. A
    reading over a slow round trip (the worker's main process was busy) once set the
    offset to the server's time minus the reply's arrival: 100 ms late here, so every run
    would have started 100 ms late until the next heartbeat."""
    context = runtime.WorkerContext()
    context.clock_read(1_000_000, sent=1000.0, received=1000.002)  # 2 ms there and back
    assert abs(context.offset) < 0.002
    context.clock_read(1_001_050, sent=1001.0, received=1001.1)  # 100 ms: the loop was busy
    assert abs(context.offset) < 0.002
    context.clock_read(1_002_000, sent=1002.0, received=1002.001)  # fast again: taken
    assert abs(context.offset) < 0.001
    context.clock_read(1_065_000, sent=1065.0, received=1065.05)  # the estimate aged: taken
    assert abs(context.offset) < 0.03
