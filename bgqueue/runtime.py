"""Running one request inside a worker's pool process, under its time budget.

Three kinds of thread share a run, so that no user code can hold up the system's lines:

- the *body* (the pool process's main thread) runs the launch handler (bgqueue/body.py);
- the *watchdog* renews the run's lease and, at the times the deadline sets, moves the run
  through its phases and stops the body; it never runs user code. It is one thread per pool
  process (`Watchdog`), kept between runs and woken only when a run has something due: a
  short run ends before its first event and costs no thread switch at all;
- *callback threads* run the user's expiration handler and suspend-delay callbacks
  (bgqueue/threads.py): one still running at the deadline does not move it.

A run is one small state machine (`Phase`); every transition is taken under the run's
lock by whichever thread gets there first, so its outcome is recorded exactly once:

    RUNNING --deadline - lead--> WARNED     the expiration handler goes to a callback thread
    RUNNING --deadline - lead--> ENDED      no expiration handler: completed, unsuccessful;
                                            the body is interrupted at once
    RUNNING, WARNED --outcome--> ENDED      set_task_completed (from any thread), or the body
                                            returned (completed) or raised (failed)
    RUNNING, WARNED --deadline--> ENDED     recorded expired; the body is interrupted
    RUNNING, WARNED --lease lost--> ENDED   beat gave the run up and recorded it; the body
                                            is interrupted (it will run again elsewhere)
    ENDED --deadline--> ENDED               a body still in the handler is interrupted
    interrupted --INTERRUPT_GRACE--> the pool process is killed
    any --the body leaves the handler--> RETURNED   the watchdog's work is over

The deadline is start + budget (continued processing: last progress + stall window),
held later by transient delays and pulled earlier by a forced expiration (simulated, or
the worker stopped satisfying the request's requirements). Once the run has ENDED its
lease is gone with its running record, so the watchdog no longer renews it.
"""

from __future__ import annotations

import contextvars
import enum
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from bgqueue import conditions, efficiency, logs, metrics, tracing
from bgqueue.body import INTERRUPT_GRACE, Body, TaskTerminated
from bgqueue.requests import Kind, State
from bgqueue.tasks import TASK_CLASSES, BGTask, ContinuedProcessingTask
from bgqueue.threads import call_user
from bgqueue.transient import RunDelays

if TYPE_CHECKING:
    from bgqueue.app import BackgroundApp

log = logging.getLogger("bgqueue.runtime")

__all__ = ["TaskTerminated", "context", "execute", "finish", "release"]

Ending = tuple[State, bool, str]  # a run's end state, success, and reason


@dataclass
class WorkerContext:
    """What a pool process knows of its worker; set in the worker's main process before
    the pool forks, so every pool process inherits it."""

    name: str = "worker"
    overrides: dict[str, str] = field(default_factory=dict)
    offset: float = 0.0  # Redis's clock minus this machine's, seconds (from heartbeats)
    _offset_rtt: float = math.inf  # the round trip the offset was measured over
    _offset_at: float = 0.0
    _probed: dict[str, str] = field(default_factory=dict)
    _probed_at: float = 0.0

    def clock_read(self, server_ms: int, sent: float, received: float) -> None:
        """Take in one reading of Redis's clock (whole ms), made between `sent` and
        `received` on this machine's clock: their midpoint errs by at most half the round
        trip. A slow round trip (the process was busy) would skew the ETAs of every run by
        tens of ms, so a reading replaces the estimate only if its round trip is not much
        slower than the estimate's, or the estimate is a minute old."""
        rtt = received - sent
        if rtt > 2 * self._offset_rtt + 0.001 and received - self._offset_at < 60:
            return
        self.offset = (server_ms + 0.5) / 1000 - (sent + received) / 2
        self._offset_rtt, self._offset_at = rtt, received

    def conditions(self, max_age: float) -> dict[str, str]:
        """Current conditions, probed at most every `max_age` seconds."""
        if time.monotonic() - self._probed_at > max_age:
            self._probed = conditions.current(self.overrides)
            self._probed_at = time.monotonic()
        return self._probed


context = WorkerContext()


def budget_of(app: BackgroundApp, kind: Kind) -> float:
    """Seconds a task of this kind may run (continued processing: its stall window)."""
    limits = app.limits
    return {
        Kind.REFRESH: limits.refresh_time_budget,
        Kind.PROCESSING: limits.processing_time_budget,
        Kind.HEALTH_RESEARCH: limits.health_research_time_budget,
        Kind.CONTINUED_PROCESSING: limits.continued_processing_stall,
    }[kind]


def execute(
    app: BackgroundApp, identifier: str, scope: str, gen: int, profile: int
) -> dict[str, Any]:
    """Run one dispatched request if its message is current; returns a summary for Celery.
    Every line logged meanwhile names the request (bgqueue.logs)."""
    with logs.request(app.app_id, scope, identifier, gen):
        return _execute(app, identifier, scope, gen, profile)


def _execute(
    app: BackgroundApp, identifier: str, scope: str, gen: int, profile: int
) -> dict[str, Any]:
    settings = app.settings
    if not conditions.satisfies(context.conditions(settings.heartbeat_interval), profile):
        release(app, identifier, scope, gen, profile)
        return {"outcome": "released", "reason": "requirements no longer hold on this worker"}
    raw = _start(app, scope, identifier, gen)
    if raw is None:
        return {"outcome": "stale"}
    record = json.loads(raw)
    kind = Kind(record["k"])
    task_args = (identifier, scope, json.loads(record["pl"]), gen, int(record["a"]) + 1)
    if kind is Kind.CONTINUED_PROCESSING:
        task: BGTask = ContinuedProcessingTask(
            *task_args, title=record["ti"], subtitle=record["su"]
        )
    else:
        task = TASK_CLASSES[kind](*task_args)
    run = Run(app, task, kind, gen, profile)
    with tracing.running(run, record):  # the run's span, while tracing is on
        return run.execute(app.handlers[identifier])


def release(app: BackgroundApp, identifier: str, scope: str, gen: int, profile: int) -> bool:
    """Hand a dispatched request back to pending, unharmed (lua/release.lua): this worker
    cannot run it now. False if the message was stale."""
    k = app.keys
    script_keys = [
        k.requests(scope),
        k.leases,
        k.sched(profile, scope),
        k.due(profile),
        k.counts,
        k.deadletter,
    ]
    return bool(app.call("release", script_keys, [scope, identifier, gen], wake=True))


_run_clients: dict[str, tuple[int, Any]] = {}  # app id -> (pid, client)


def _run_call(app: BackgroundApp, script: str, script_keys: list[str], args: list[Any]) -> Any:
    """Call one of the run's scripts (start, finish) on this process's own connection to
    Redis: a redis-py client with a single connection, held for good, skips the pool's
    checkout and the check for unread data it makes before every command (three system
    calls of each run's two round trips)."""
    held = _run_clients.get(app.app_id)
    if held is None or held[0] != os.getpid():
        pool = app.client.connection_pool
        client = redis.Redis(connection_pool=pool, single_connection_client=True)
        held = _run_clients[app.app_id] = (os.getpid(), client)
    with app.service():
        return getattr(app.scripts, script)(keys=script_keys, args=args, client=held[1])


def _start(app: BackgroundApp, scope: str, identifier: str, gen: int) -> Any:
    """start.lua: the running record's JSON, or None if the message is stale. A worker whose
    clock runs ahead of Redis's waits for the request's date on Redis's clock."""
    k = app.keys
    script_keys = [k.requests(scope), k.leases, k.running, k.runleases, k.counts, k.deadletter]
    lease_ms = int(app.settings.heartbeat_timeout * 1000)
    args = [scope, identifier, gen, context.name, lease_ms]
    while isinstance(raw := _run_call(app, "start", script_keys, args), int):
        time.sleep(raw / 1000)
    return raw or None


def finish(
    app: BackgroundApp, scope: str, identifier: str, kind: Kind, gen: int, ended: Ending
) -> bool:
    """Record how a run ended (lua/finish.lua); False if it had already been given up as
    lost (it ran twice: at-least-once)."""
    k = app.keys
    script_keys = [k.running, k.runleases, k.history(scope), k.expire, k.deadletter]
    state, success, reason = ended
    args = [gen, str(state), int(success), *app.settings.history, reason, identifier, kind, scope]
    return bool(_run_call(app, "finish", script_keys, args))


class Phase(enum.Enum):
    """Where a run is (see the module's docstring for the transitions)."""

    RUNNING = "running"
    WARNED = "warned"
    ENDED = "ended"
    RETURNED = "returned"


LIVE = (Phase.RUNNING, Phase.WARNED)  # no outcome recorded yet


class Run:
    """One run of a handler: the body, its watchdog, and the phase they share."""

    span: Any = None  # its OpenTelemetry span while tracing is on (bgqueue/tracing.py)

    def __init__(
        self, app: BackgroundApp, task: BGTask, kind: Kind, gen: int, profile: int
    ) -> None:
        self.app = app
        self.task = task
        self.kind = kind
        self.gen = gen
        self.profile = profile
        self.phase = Phase.RUNNING
        self.context = contextvars.Context()  # the body's, once watched (Watchdog.watch)
        self.outcome: tuple[str, bool] | None = None
        self.reason = ""
        self._lock = threading.Lock()
        self.body = Body()
        self._stopped_at = math.inf  # monotonic time the body was interrupted
        self._start = time.monotonic()
        self._budget = budget_of(app, kind)
        self._base = self._start + self._budget
        self._forced = math.inf
        self._interval = app.settings.heartbeat_interval
        self._next_renew = self._start + self._interval
        self._lead = efficiency.warning_lead(app, self._budget)  # CPU lifts the budget/5 cap
        self.delays = RunDelays(app, task.scope, gen, self._base_deadline, watchdog.changed)
        task.app = app
        task.delays = self.delays
        task.guard = self.body.shielded
        task.on_completed = self._completed

    # -- transitions ----------------------------------------------------------------

    def _take(self, to: Phase, state: State | None = None, success: bool = False) -> bool:
        """Move from a live phase to `to`, noting the outcome; False if the run had left the
        live phases already (someone else recorded its outcome)."""
        with self._lock:
            if self.phase not in LIVE:
                return False
            self.phase = to
            if state is not None:
                self.outcome = (str(state), success)
            return True

    def _end(self, state: State, success: bool, reason: str = "") -> bool:
        """Record the outcome (LIVE -> ENDED) unless one is recorded already."""
        if not self._take(Phase.ENDED, state, success):
            return False
        self.reason = reason
        # The run's transient delays end with it, before the outcome is recorded (a dead
        # process settles nothing). A body still holding one gets the warning lead to return.
        self.delays.settle(grace=self.app.limits.warning_lead(self._budget))
        task = self.task
        if finish(
            self.app, task.scope, task.identifier, self.kind, self.gen, (state, success, reason)
        ):
            metrics.count_run(self.app.app_id, self.kind, state, success)
        else:  # counted by beat, which recorded it as lost
            log.warning(
                "run %s of %s had been given up as lost; it ran twice",
                self.gen,
                self.task.identifier,
            )
        return True

    def _completed(self, success: bool) -> None:
        self._end(State.COMPLETED, success)

    def _stop_body(self, why: str) -> None:
        """Interrupt a body that must not go on; the watchdog kills it after the grace."""
        if self.body.returned.is_set() or self.body.interrupt_sent:
            return
        log.warning("terminating %s (run %s): %s", self.task.identifier, self.gen, why)
        tracing.event(self.span, "terminated", {tracing.REASON: why})
        self._stopped_at = time.monotonic()
        self.body.interrupt()

    # -- the body ---------------------------------------------------------------------

    def execute(self, handler: Any) -> dict[str, Any]:
        """Run the handler with a watchdog; returns the recorded outcome."""
        watchdog.watch(self)
        failure = ""
        try:
            try:
                handler(self.task)
            finally:
                self.body.leave()
        except TaskTerminated:
            pass
        except Exception as exc:  # the handler's failure is an outcome, not a worker crash
            failure = f"{type(exc).__name__}: {exc}"[:500]
        if failure:
            self._end(State.FAILED, False, failure)
        elif self.task.success is not None:
            self._end(State.COMPLETED, self.task.success)
        else:
            # Returning without set_task_completed is taken as done: nothing is left to wait for.
            self._end(State.COMPLETED, True, "handler returned without set_task_completed")
        with self._lock:
            self.phase = Phase.RETURNED  # the watchdog lets the run go when it next looks
        state, success = self.outcome or ("completed", True)
        summary: dict[str, Any] = {"outcome": state, "success": success, "scope": self.task.scope}
        if self.reason:
            summary["reason"] = self.reason
        if self.body.interrupt_sent:  # the worker retires this pool process once reported
            summary["stopped"] = True
        return summary

    # -- the watchdog -------------------------------------------------------------------

    def plan(self) -> float:
        """When the watchdog next has to look at this run (monotonic)."""
        wake_at = self._next_event(self._lead)
        if self.phase in LIVE:  # once ENDED the lease is gone with the running record
            wake_at = min(wake_at, self._next_renew)
        return wake_at

    def tick(self, now: float) -> bool:
        """The watchdog's look at the run: take what is due. True once the run needs no
        more looks (the body left the handler, or was killed)."""
        if self.phase is Phase.RETURNED:
            return True
        if self.phase in LIVE and now >= self._next_renew:
            self._next_renew = now + self._interval
            self._check_in(now, self._lead)
        for callback in self.delays.due_callbacks(now):
            call_user(f"suspend-delay callback of {self.task.identifier}", callback)
        if self._stopped_at + INTERRUPT_GRACE <= now:
            self._kill()
            return True
        self._on_time(now, self._lead)
        return False

    def _next_event(self, lead: float) -> float:
        """When the watchdog next has something to do, apart from renewing the lease."""
        deadline = self._deadline()
        if self._stopped_at < math.inf:
            return self._stopped_at + INTERRUPT_GRACE
        at = deadline - lead if self.phase is Phase.RUNNING else deadline
        return min(at, self.delays.next_warning())

    def _kill(self) -> None:
        if self.body.returned.is_set():
            return
        log.warning(
            "%s (run %s) did not stop within %ss of being interrupted; killing it",
            self.task.identifier,
            self.gen,
            INTERRUPT_GRACE,
        )
        self.body.kill()

    def _on_time(self, now: float, lead: float) -> None:
        """Take the transitions whose time has come."""
        deadline = self._deadline()
        if self.phase is Phase.RUNNING and now >= deadline - lead:
            self._warn()
        elif self.phase is not Phase.RETURNED and now >= deadline:
            self._end(State.EXPIRED, False, "did not complete by its deadline")
            self._stop_body("it did not complete by its deadline")

    def _warn(self) -> None:
        handler = self.task.expiration_handler
        forced = self._forced < math.inf  # simulated, or the requirements stopped holding
        tracing.event(self.span, "expiration", tracing.expiration(handler is not None, forced))
        if handler is None:
            if self._end(State.COMPLETED, False, "no expiration handler set; ended unsuccessful"):
                self._stop_body("no expiration handler set")
            return
        if self._take(Phase.WARNED):
            metrics.count_expiration(self.app.app_id, self.kind)
            call_user(f"expiration handler of {self.task.identifier}", handler)

    def _base_deadline(self) -> float:
        """The deadline without delays (monotonic). Continued processing lives as long as it
        keeps reporting progress, until its expiration handler has been called."""
        if isinstance(self.task, ContinuedProcessingTask) and self.phase is Phase.RUNNING:
            self._base = max(self._start, self.task.progress.last_change) + self._budget
        return self._base

    def _deadline(self) -> float:
        """The deadline now: the base one or the end of the latest transient delay,
        whichever is later, unless an expiration was forced."""
        return min(max(self._base_deadline(), self.delays.holds_until()), self._forced)

    def _check_in(self, now: float, lead: float) -> None:
        """Renew the run's lease. As WorkManager stops work whose constraints fail, a task
        whose requirements stop holding here (or whose expiration is simulated) gets its
        expiration handler now."""
        app = self.app
        lease_ms = int(app.settings.heartbeat_timeout * 1000)
        try:
            k = app.keys
            alive, expire = app.call(
                "renew", [k.runleases, k.expire, k.running, k.deadletter], [self.gen, lease_ms]
            )
        except Exception as exc:  # a broker blip must not kill the watchdog
            log.warning("could not renew run %s: %s", self.gen, type(exc).__name__)
            return
        if not alive:
            self._abandon()
            return
        why = "expiration simulated" if expire else None
        held = context.conditions(app.settings.heartbeat_interval)
        if why is None and not conditions.satisfies(held, self.profile):
            why = "its requirements no longer hold on this worker"
        if why and self.phase is Phase.RUNNING and self._forced == math.inf:
            log.info("expiring %s now: %s", self.task.identifier, why)
            self._forced = now + lead

    def _abandon(self) -> None:
        """Beat gave the run up as lost (its lease lapsed, e.g. the worker stalled) and
        recorded it: the request already waits to run again, so going on would only run it
        twice."""
        reason = "given up as lost (its run lease lapsed); it will run again"
        if not self._take(Phase.ENDED, State.FAILED, False):
            return
        self.reason = reason
        self.delays.settle()
        self._stop_body("its run was given up as lost")


class Watchdog:
    """A pool process's watchdog: one thread, kept between runs, serving the run in
    progress (a pool process runs one at a time). It sleeps until that run's next event
    (`Run.plan`) and then takes what is due (`Run.tick`); between runs it looks every IDLE
    seconds. A run whose first event is later than the watchdog's next look does not wake
    it, so a short run costs no thread switch."""

    IDLE = 1.0  # seconds between looks while no run is in progress

    def __init__(self) -> None:
        self._pid = 0
        self._fresh()

    def _fresh(self) -> None:
        self._cond = threading.Condition()
        self._run: Run | None = None
        self._wake_at = math.inf  # when the thread next looks on its own

    def watch(self, run: Run) -> None:
        """Watch `run` from now on (the previous run has returned). The watchdog looks at it
        in the caller's context, so that its log lines name the request."""
        run.context = contextvars.copy_context()
        if self._pid != os.getpid():  # forked: the parent's thread did not come along
            self._fresh()
            self._pid = os.getpid()
            threading.Thread(target=self._loop, name="bgqueue-watchdog", daemon=True).start()
        with self._cond:
            self._run = run
            if run.plan() < self._wake_at:
                self._cond.notify()

    def changed(self) -> None:
        """The run's plan changed (its delays did): look again now."""
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._run is not None and self._run.phase is Phase.RETURNED:
                    self._run = None
                run = self._run
                self._wake_at = run.plan() if run else time.monotonic() + self.IDLE
                self._cond.wait(max(0.0, self._wake_at - time.monotonic()))
                run, self._wake_at = self._run, -math.inf  # awake: nobody needs to notify
            if run is None:
                continue
            try:
                done = run.context.run(run.tick, time.monotonic())
            except Exception:  # the watchdog must outlive any one run's trouble
                log.exception("watchdog of run %s failed", run.gen)
                done = True
            if done:
                with self._cond:
                    if self._run is run:
                        self._run = None


watchdog = Watchdog()
