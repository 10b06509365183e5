"""Prometheus metrics: bgqueue's own view of its queue, which Flower cannot give because
pending requests are Redis records, not Celery messages. Names and labels are fixed in
docs/operations.md (the deployment's dashboard and autoscaler read them).

Beat serves what it reads from Redis at each sweep (pending requests, transient quota,
live workers) and the dispatch lateness it observes as it claims. Workers count runs and
expiration handlers. A run ends in a prefork pool process, not in the worker's main
process that serves the metrics, so a worker uses prometheus_client's multiprocess mode:
every process writes its counters to files in one directory, and the main process sums
them at each scrape.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections import Counter as Tally
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bgqueue import transient
from bgqueue.model import keys
from bgqueue.model.conditions import profiles
from bgqueue.model.counts import REASONS, pending_requests
from bgqueue.model.requests import PROFILE_COUNT, Kind, State

if TYPE_CHECKING:
    from bgqueue.model.context import BeatContext

log = logging.getLogger("bgqueue.metrics")

Live = dict[str, dict[str, Any]]  # a live worker's heartbeat by name, as beat reads them
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OUTCOMES = ("success", "unsuccessful", "failed", "expired")
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class Claim(Protocol):
    """What the lateness histogram reads of a claim (`bgqueue.beat.Claimed`)."""

    profile: int
    since: int  # ms it may start: its earliest-begin date, or when it became pending


# Worker counters, unregistered: a worker serves them from the multiprocess files.
RUNS = Counter(
    "bgqueue_runs_total",
    "Finished runs by outcome (success, unsuccessful, failed, expired).",
    ["app", "kind", "outcome"],
    registry=None,
)
EXPIRATIONS = Counter(
    "bgqueue_expirations_total",
    "Expiration handlers called.",
    ["app", "kind"],
    registry=None,
)


def outcome(state: State | str, success: bool) -> str:
    """The `outcome` label of a run's end: success, unsuccessful, failed or expired."""
    if state == State.COMPLETED:
        return "success" if success else "unsuccessful"
    return str(state)


def count_run(app_id: str, kind: Kind | str, state: State | str, success: bool) -> None:
    """A run's outcome was recorded (called once per run, by whoever recorded it)."""
    RUNS.labels(app_id, str(kind), outcome(state, success)).inc()


def count_expiration(app_id: str, kind: Kind | str) -> None:
    """An expiration handler is about to be called."""
    EXPIRATIONS.labels(app_id, str(kind)).inc()


def count_from_zero(app_id: str) -> None:
    """Give the app's run and expiration counters a sample at zero before the first run.

    rate() and increase() count only what grows between two samples: a series that first
    appears at 1 hides its first run, so a dashboard would show no expired run until the
    second. Call in the worker's main process after serve_worker, before the pool forks.
    """
    for kind in Kind:
        EXPIRATIONS.labels(app_id, str(kind))
        for name in OUTCOMES:
            RUNS.labels(app_id, str(kind), name)


# -- worker exporter ------------------------------------------------------------------


def serve_worker(port: int, address: str) -> Path:
    """Serve the worker's counters, summed over its pool processes, on address:port.

    Call in the worker's main process before the pool forks: the pool processes inherit
    the directory their counters are written to. `$PROMETHEUS_MULTIPROC_DIR` is used if
    set (it is emptied: one directory per worker), else a fresh temporary directory that
    is removed when the worker exits.
    """
    from celery import signals

    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
    else:
        path = Path(tempfile.mkdtemp(prefix="bgqueue-metrics-"))
        os.environ[MULTIPROC_ENV] = str(path)
        atexit.register(_remove, path, os.getpid())
    _pick_value_class()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    prometheus_client.start_http_server(port, addr=address, registry=registry)

    def process_dead(pid: int, **_: Any) -> None:
        multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]

    signals.worker_process_shutdown.connect(process_dead, weak=False)
    return path


def _pick_value_class() -> None:
    """prometheus_client picks how values are stored (in memory, or in the files of
    `$PROMETHEUS_MULTIPROC_DIR`) when it is imported, which may have been before the
    environment was set: pick again, before any metric has a value."""
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


def _remove(path: Path, owner: int) -> None:
    # Pool processes inherit atexit handlers: only the process that made it removes it.
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


# -- beat -------------------------------------------------------------------------------


def serve_beat(port: int, address: str) -> BeatMetrics:
    """Start beat's exporter on address:port; beat then feeds the returned BeatMetrics."""
    # Beat is one process: its values live in memory, whatever the environment says.
    os.environ.pop(MULTIPROC_ENV, None)
    _pick_value_class()
    metrics = BeatMetrics()
    prometheus_client.start_http_server(port, addr=address, registry=metrics.registry)
    return metrics


class BeatMetrics(Collector):
    """Beat's metrics: gauges refreshed at each sweep while it leads, served as one
    snapshot (a scrape never sees half a refresh), and the lateness of its claims."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.lateness = Histogram(
            "bgqueue_dispatch_lateness_seconds",
            "Claim time minus the later of earliest-begin and when a capable worker was live, "
            "of beat's claims (a request a submit dispatches itself is not late).",
            ["app"],
            buckets=LATENESS_BUCKETS,
            registry=self.registry,
        )
        # Runs lost with their worker end in beat's sweep, not on a worker.
        self.lost = Counter(
            "bgqueue_runs_total",
            "Finished runs by outcome; on beat, runs lost with their worker (failed).",
            ["app", "kind", "outcome"],
            registry=self.registry,
        )
        self._snapshot: list[Metric] = []
        self._capable_since: dict[tuple[str, int], int] = {}
        self.registry.register(self)

    def collect(self) -> Iterable[Metric]:
        """The latest snapshot of the gauges (prometheus_client's Collector protocol)."""
        return list(self._snapshot)

    def describe(self) -> Iterable[Metric]:
        """Nothing to check at registration: the gauges are built at each refresh."""
        return []

    def clear(self) -> None:
        """Beat no longer leads: its gauges would go stale, and the new leader serves them."""
        self._snapshot = []
        self._capable_since.clear()

    # -- dispatch lateness --------------------------------------------------------------

    def note_capable(self, app_id: str, eligible: Iterable[int], now_ms: int) -> None:
        """Remember when a live worker first satisfied each profile (forgotten when none
        does): a request cannot be late before some worker could run it."""
        eligible = set(eligible)
        for profile in range(PROFILE_COUNT):
            key = (app_id, profile)
            if profile in eligible:
                self._capable_since.setdefault(key, now_ms)
            else:
                self._capable_since.pop(key, None)

    def observe_claims(self, app_id: str, claimed: Iterable[Claim], now_ms: int) -> None:
        """Observe the lateness of requests just claimed."""
        histogram = self.lateness.labels(app_id)
        for item in claimed:
            since = self._capable_since.get((app_id, item.profile), now_ms)
            histogram.observe(max(0, now_ms - max(item.since, since)) / 1000)

    def lost_run(self, app_id: str, kind: str) -> None:
        """Beat gave up a run whose worker died: recorded as failed in the history."""
        self.lost.labels(app_id, kind, "failed").inc()

    # -- gauges -------------------------------------------------------------------------

    def refresh(self, beat: BeatContext, seen: list[tuple[keys.AppKeys, Live]]) -> None:
        """Read pending requests, transient quota and live workers of every app from Redis
        and replace the snapshot. A few reads per app, of the counters the scripts keep
        (bgqueue/model/counts.py) and the transient ledgers: no request record is read.
        A failure keeps the last snapshot: metrics never stop beat from dispatching."""
        for app, _live in seen:
            self._from_zero(app.app_id)
        try:
            self._snapshot = self._read(beat, seen)
        except Exception as exc:
            log.warning("metrics not refreshed: %s: %s", type(exc).__name__, exc)

    def _from_zero(self, app_id: str) -> None:
        """Serve the app's lateness and lost runs at zero before they first grow, as the
        workers' counters are (count_from_zero). Claims made before the next scrape (a
        new app's first, or a new leader's) still escape rate(): no zero was scraped."""
        self.lateness.labels(app_id)
        for kind in Kind:
            self.lost.labels(app_id, str(kind), "failed")

    def _read(self, beat: BeatContext, seen: list[tuple[keys.AppKeys, Live]]) -> list[Metric]:
        pending = GaugeMetricFamily(
            "bgqueue_pending_requests",
            "Requests waiting, by reason: no_handler, no_capable_worker, not_due or dispatched.",
            labels=["app", "kind", "reason"],
        )
        quota = GaugeMetricFamily(
            "bgqueue_transient_quota_used_seconds",
            "Transient delay quota charged in the rolling 24 hours.",
            labels=["app", "scope"],
        )
        workers = GaugeMetricFamily(
            "bgqueue_live_workers",
            "Live workers by each condition's value.",
            labels=["app", "condition", "value"],
        )
        for app, live in seen:
            now = beat.server_ms()
            eligible = {p for hb in live.values() for p in _profiles(hb)}
            counted = pending_requests(beat.client, app, eligible, now)
            for kind in Kind:
                for reason in REASONS:
                    pending.add_metric([app.app_id, kind, reason], counted[(kind, reason)])
            for scope, ms in sorted(transient.quota_used(beat.client, app, now).items()):
                quota.add_metric([app.app_id, scope], ms / 1000)
            by_value = Tally(
                (str(name), str(value))
                for hb in live.values()
                for name, value in hb.get("conditions", {}).items()
            )
            for (name, value), count in sorted(by_value.items()):
                workers.add_metric([app.app_id, name, value], count)
        return [pending, quota, workers]


def _profiles(heartbeat: dict[str, Any]) -> list[int]:
    return list(profiles(heartbeat.get("conditions", {})))
