"""Prometheus metrics end to end: real `bgqueue beat` and `bgqueue worker` processes serve
/metrics on free loopback ports, and the tests scrape them over HTTP and read the values
(names and labels as docs/operations.md fixes them)."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psutil
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

import bgqueue as bg
from bgqueue.model import keys
from tests.apps import transient_app
from tests.harness import APP_ID, Cluster, events, wait_for

P = "com.bgqueue.test."
FAST_BUDGET = {"TEST_PROCESSING_BUDGET": "2", "TEST_EXPIRATION_WARNING": "0.4"}


@pytest.fixture(autouse=True)
def _kill_processes_at_teardown(cluster: Cluster) -> Iterator[None]:
    """SIGKILL the test's processes when it is done: these tests are not about shutdown."""
    yield
    cluster.kill_all()


# --- helpers --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples | None:
    """Every sample of the exporter on this port, (name, labels) → value; None while it
    does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(port: int, name: str, **labels: str) -> float | None:
    """One sample's value, or None if the exporter does not show it."""
    return (scrape(port) or {}).get((name, frozenset(labels.items())))


def becomes(port: int, name: str, expected: float, **labels: str) -> None:
    """Wait until a sample shows `expected`."""
    wait_for(
        lambda: value(port, name, **labels) == expected,
        20,
        f"{name}{labels} == {expected} (now {value(port, name, **labels)})",
    )


def pending(port: int, kind: str, reason: str) -> float | None:
    return value(port, "bgqueue_pending_requests", app=APP_ID, kind=kind, reason=reason)


def history(app: bg.BackgroundApp, identifier: str) -> list[bg.TaskRecord]:
    return [r for r in app.scheduler.history() if r.identifier == identifier]


def recount(client: redis.Redis, app_keys: keys.AppKeys, scopes: list[str]) -> dict[str, int]:
    """Both kinds of counter the scripts keep (bgqueue/model/counts.py), recomputed from every
    record: the app's counts, '<kind>:<place>', which metrics, status and the Pending page
    read; and each scope's pending-limit fields, '<scope> #refresh' and '<scope> #processing',
    which submit.lua reads (a requeued run, attempt > 0, waits outside them)."""
    counted: dict[str, int] = {}
    for scope in scopes:
        for field, raw in client.hgetall(app_keys.requests(scope)).items():
            if field.startswith(b"#"):
                continue
            record = json.loads(raw)
            where = record["r"] if record["s"] == "pending" else record["s"]
            names = [f"{record['k']}:{where}"]
            if record.get("a", 0) == 0:
                names.append(f"{scope} #{'refresh' if record['k'] == 'refresh' else 'processing'}")
            for name in names:
                counted[name] = counted.get(name, 0) + 1
    return counted


def kept(client: redis.Redis, app_keys: keys.AppKeys, scopes: list[str]) -> dict[str, int]:
    """Both kinds of counter as the scripts keep them, named as `recount` names them."""
    found = {f.decode(): int(v) for f, v in client.hgetall(app_keys.counts).items() if int(v)}
    for scope in scopes:
        for field, value in client.hgetall(app_keys.requests(scope)).items():
            if field.startswith(b"#") and int(value):
                found[f"{scope} {field.decode()}"] = int(value)
    return found


# --- beat -----------------------------------------------------------------------------


def test_beat_reports_pending_by_kind_and_reason_live_workers_and_lateness(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A future request is not_due; a due one needing external power with only an unpowered
    worker live is no_capable_worker; one published behind a busy worker is dispatched.
    Live workers are counted by each condition's value. When a powered worker arrives the
    waiting request is claimed, and its lateness counts from that worker's arrival, not
    from its earliest-begin date long before. Requests due at once that their submit
    dispatched itself (beat's routes name a live worker) are not beat's claims: they are
    not observed."""
    port = free_port()
    cluster.start(["beat", "--metrics-port", str(port)], "beat")
    cluster.worker("unpowered", ["external_power=false", "network=wifi"], concurrency=1)
    later = datetime.now(UTC) + timedelta(hours=1)
    sample_app.scheduler.submit_many(
        [
            bg.ProcessingTaskRequest(P + "a", earliest_begin_date=later),
            bg.AppRefreshTaskRequest(P + "refresh", earliest_begin_date=later),
            bg.ProcessingTaskRequest(P + "b", requires_external_power=True),
        ]
    )
    becomes(port, "bgqueue_pending_requests", 1, app=APP_ID, kind="processing", reason="not_due")
    assert pending(port, "refresh", "not_due") == 1
    assert pending(port, "processing", "no_capable_worker") == 1
    assert pending(port, "health_research", "no_capable_worker") == 0
    assert pending(port, "processing", "dispatched") == 0
    workers = {"app": APP_ID, "condition": "external_power", "value": "false"}
    assert value(port, "bgqueue_live_workers", **workers) == 1
    assert value(port, "bgqueue_live_workers", app=APP_ID, condition="network", value="wifi") == 1
    assert value(port, "bgqueue_dispatch_lateness_seconds_count", app=APP_ID) in (None, 0)

    # A busy worker: the next request is published to its queue and waits there. Both are
    # dispatched by their submits, once beat has written the routes it sees.
    wait_for(lambda: redis_client.exists(sample_app.keys.routes), 15, "beat's routes")
    sample_app.scheduler.submit(bg.ProcessingTaskRequest(P + "slow", payload={"sleep": 3}))
    wait_for(lambda: events(redis_client, "start", P + "slow"), 15, "the slow run")
    sample_app.scheduler.submit(bg.ProcessingTaskRequest(P + "c", payload={"complete": True}))
    becomes(port, "bgqueue_pending_requests", 1, app=APP_ID, kind="processing", reason="dispatched")
    assert value(port, "bgqueue_dispatch_lateness_seconds_count", app=APP_ID) == 0

    cluster.worker("powered", ["external_power=true", "network=wifi"], concurrency=1)
    wait_for(lambda: events(redis_client, "start", P + "b"), 15, "the powered run")
    becomes(
        port,
        "bgqueue_pending_requests",
        0,
        app=APP_ID,
        kind="processing",
        reason="no_capable_worker",
    )
    becomes(port, "bgqueue_dispatch_lateness_seconds_count", 1, app=APP_ID)
    total = value(port, "bgqueue_dispatch_lateness_seconds_sum", app=APP_ID)
    assert total is not None and total < 1.0, "lateness counted from before a worker could"
    becomes(port, "bgqueue_live_workers", 2, app=APP_ID, condition="network", value="wifi")
    assert value(port, "bgqueue_live_workers", **{**workers, "value": "true"}) == 1
    assert pending(port, "processing", "not_due") == 1  # "a" still waits for its hour


def test_the_first_reason_that_applies_is_reported_by_kind(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """Refresh and processing requests in one profile, some due and some not, with no
    worker able to run them: all of them wait for a capable worker, each kind counted apart
    (no capable worker comes before not due: a date passing would not start them). They
    become not_due once a capable worker is live, except those now due, which run. The
    counts kept in Redis match a recount from the records."""
    port = free_port()
    cluster.start(["beat", "--metrics-port", str(port)], "beat")
    later = datetime.now(UTC) + timedelta(hours=1)
    net = {"requires_network_connectivity": True}
    sample_app.scheduler.submit_many(
        [
            bg.AppRefreshTaskRequest(P + "refresh", **net),
            bg.ProcessingTaskRequest(P + "a", **net),
            bg.ProcessingTaskRequest(P + "b", **net),
            bg.ProcessingTaskRequest(P + "c", **net),
        ]
    )
    sample_app.scheduler_for("s2").submit_many(
        [
            bg.ProcessingTaskRequest(P + "a", earliest_begin_date=later, **net),
            bg.AppRefreshTaskRequest(P + "refresh", earliest_begin_date=later, **net),
        ]
    )
    waiting = {"app": APP_ID, "kind": "processing", "reason": "no_capable_worker"}
    becomes(port, "bgqueue_pending_requests", 4, **waiting)
    assert pending(port, "refresh", "no_capable_worker") == 2
    assert pending(port, "processing", "not_due") == 0
    scopes = ["default", "s2"]
    assert kept(redis_client, sample_app.keys, scopes) == recount(
        redis_client, sample_app.keys, scopes
    )

    cluster.worker("online", ["network=wifi"], concurrency=2)
    becomes(port, "bgqueue_pending_requests", 1, app=APP_ID, kind="processing", reason="not_due")
    assert pending(port, "refresh", "not_due") == 1
    assert pending(port, "processing", "no_capable_worker") == 0
    wait_for(lambda: len(events(redis_client, "end")) == 4, 15, "the due ones to run")


def test_counts_follow_every_transition(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """Both kinds of counter the request scripts keep (the app's counts and each scope's
    pending-limit fields) match a recount from the records in every state a request goes
    through: pending, replaced, cancelled, parked, dispatched, running, finished and
    requeued after its worker died; and are gone once nothing waits."""
    app_keys = sample_app.keys
    scopes = ["default", "s2"]

    def agree() -> dict[str, int]:
        counters = kept(redis_client, app_keys, scopes)
        assert counters == recount(redis_client, app_keys, scopes)
        return counters

    later = datetime.now(UTC) + timedelta(hours=1)
    scheduler, other = sample_app.scheduler, sample_app.scheduler_for("s2")
    scheduler.submit_many(
        [
            bg.ProcessingTaskRequest(P + "a", earliest_begin_date=later),
            bg.AppRefreshTaskRequest(P + "refresh", earliest_begin_date=later),
            bg.HealthResearchTaskRequest(P + "health", earliest_begin_date=later),
        ]
    )
    other.submit(bg.ProcessingTaskRequest(P + "b", requires_external_power=True))
    agree()
    # A replacement of another kind's profile, and a cancel.
    scheduler.submit(bg.ProcessingTaskRequest(P + "a", requires_network_connectivity=True))
    assert scheduler.cancel(P + "health")
    assert agree() == {
        "processing:1": 1,
        "refresh:0": 1,
        "processing:2": 1,
        "default #processing": 1,
        "default #refresh": 1,
        "s2 #processing": 1,
    }

    cluster.beat()
    env = {"TEST_PROCESSING_BUDGET": "60"}
    worker = cluster.worker("w1", ["external_power=true"], concurrency=1, env=env)
    wait_for(lambda: len(events(redis_client, "end")) == 2, 20, "a and b to run")
    agree()  # running, then finished: no longer counted
    # Permitted, but no live worker has its handler: parked.
    scheduler.submit(bg.ProcessingTaskRequest(P + "unhandled"))
    wait_for(lambda: kept(redis_client, app_keys, scopes).get("processing:parked"), 15, "parked")
    agree()
    scheduler.submit(bg.ProcessingTaskRequest(P + "slow", payload={"sleep": 30}))
    wait_for(lambda: events(redis_client, "start", P + "slow"), 20, "slow to start")
    agree()
    # Dispatched behind the busy worker, then replaced while dispatched.
    scheduler.submit(bg.ProcessingTaskRequest(P + "c"))
    wait_for(
        lambda: kept(redis_client, app_keys, scopes).get("processing:dispatched"),
        15,
        "c dispatched",
    )
    agree()
    scheduler.submit(bg.ProcessingTaskRequest(P + "c", earliest_begin_date=later))
    agree()
    # The worker dies mid-run: slow is requeued (attempt 1, outside the pending limit).
    worker.kill()
    wait_for(
        lambda: any(r.state == "failed" for r in history(sample_app, P + "slow")),
        20,
        "the lost run to be recovered",
    )
    counters = agree()
    assert counters["processing:0"] == 2  # slow and c
    assert counters["default #processing"] == 2  # unhandled and c: slow waits outside
    for identifier in ("slow", "c", "refresh", "unhandled"):
        assert scheduler.cancel(P + identifier)
    assert agree() == {}


def test_transient_quota_used_is_reported_per_scope(
    cluster: Cluster, redis_url: str, redis_client: redis.Redis
) -> None:
    """A task held 1 s past its 2 s budget by a suspend delay is charged about 1 s of its
    scope's daily quota; beat reports exactly what the ledger holds."""
    tapp = transient_app.app
    tapp._client = None
    tapp.use_broker(redis_url)
    port = free_port()
    cluster.start(["beat", "--metrics-port", str(port)], "beat")
    cluster.worker("w1", app="tests.apps.transient_app:app", app_id=transient_app.APP_ID)
    steps = [{"do": "request", "as": "d"}, {"do": "until", "t": 3}, {"do": "complete"}]
    tapp.scheduler_for("dev-1").submit(
        bg.ProcessingTaskRequest(f"{transient_app.APP_ID}.a", payload={"steps": steps})
    )
    ledger = tapp.keys.transient_ledger("dev-1")
    wait_for(lambda: redis_client.zcard(ledger), 20, "the delay to be charged")
    charged = sum(int(m.rpartition(b":")[2]) for m in redis_client.zrange(ledger, 0, -1))
    assert 700 <= charged <= 1500, charged
    labels = {"app": transient_app.APP_ID, "scope": "dev-1"}
    becomes(port, "bgqueue_transient_quota_used_seconds", charged / 1000, **labels)


# --- workers --------------------------------------------------------------------------


def test_worker_counts_runs_by_outcome_across_pool_processes(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """Runs end in pool processes and are summed by the worker's main process: success,
    unsuccessful, failed and expired, the last with its expiration handler counted and
    its pool process killed; a process that replaces it adds to the same counters. The
    port comes from $BGQUEUE_METRICS_PORT and binds to loopback only."""
    port = free_port()
    env = {**FAST_BUDGET, "BGQUEUE_METRICS_PORT": str(port)}
    worker = cluster.worker("w1", concurrency=2, env=env)
    cluster.beat()
    wait_for(lambda: scrape(port) is not None, 15, "the worker's exporter")
    runs = [
        (P + "a", {"complete": True}),
        (P + "b", {"complete": False}),
        (P + "c", {"raise": "boom"}),
        (P + "slow", {"sleep": 30, "expiration": "record"}),
    ]
    sample_app.scheduler.submit_many(bg.ProcessingTaskRequest(i, payload=p) for i, p in runs)
    labels = {"app": APP_ID, "kind": "processing"}
    for outcome in ("success", "unsuccessful", "failed", "expired"):
        becomes(port, "bgqueue_runs_total", 1, **labels, outcome=outcome)
    assert value(port, "bgqueue_expirations_total", **labels) == 1
    assert [r.state for r in history(sample_app, P + "slow")] == ["expired"]

    sample_app.scheduler.submit(bg.ProcessingTaskRequest(P + "a", payload={"complete": True}))
    becomes(port, "bgqueue_runs_total", 2, **labels, outcome="success")
    assert value(port, "bgqueue_runs_total", **labels, outcome="expired") == 1
    listening = [
        c.laddr
        for c in psutil.Process(worker.pid).net_connections()
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert [address.ip for address in listening] == ["127.0.0.1"]


def test_metrics_address_and_port_flags(cluster: Cluster, sample_app: bg.BackgroundApp) -> None:
    """`--metrics-port` and `--metrics-address` on the command line; a worker without them
    listens on nothing."""
    port = free_port()
    args = ["--metrics-port", str(port), "--metrics-address", "0.0.0.0"]
    beat = cluster.start(["beat", *args], "beat")
    wait_for(lambda: scrape(port) is not None, 15, "beat's exporter")
    listening = [
        c.laddr
        for c in psutil.Process(beat.pid).net_connections()
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert [address.ip for address in listening] == ["0.0.0.0"]
    worker = cluster.worker("w1")
    assert not [
        c for c in psutil.Process(worker.pid).net_connections() if c.status == psutil.CONN_LISTEN
    ]
