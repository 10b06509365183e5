"""Running one request inside a worker's pool process, under its time budget.

The body runs in the pool process's main thread; a watchdog thread renews the run's
lease, calls the expiration handler before the deadline, and terminates a body that
overruns it. Terminating means raising `TaskTerminated` in the body from a signal
handler (so even a sleep or a blocking read ends), letting the Celery task report the
outcome (Flower shows `TaskExpired`), and then retiring the pool process, which
Celery's prefork pool replaces; a body that has not returned a second after the
signal has its pool process killed instead: Python cannot stop a thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bgqueue import conditions, efficiency, logs, metrics
from bgqueue.requests import Kind, State
from bgqueue.tasks import TASK_CLASSES, BGTask, ContinuedProcessingTask
from bgqueue.transient import RunDelays

if TYPE_CHECKING:
    from bgqueue.app import BackgroundApp

log = logging.getLogger("bgqueue.runtime")


class TaskTerminated(BaseException):
    """Raised into a body that must stop (it overran its deadline, or its run was given up as
    lost); a BaseException, so that a body's `except Exception` does not swallow it."""


# Stopping a body in a pool process: the watchdog sends the body's (main) thread
# INTERRUPT_SIGNAL, whose handler raises TaskTerminated; it is billiard's soft-time-limit
# signal, whose handler stays in charge of any other SIGUSR1. A body that has not returned
# INTERRUPT_GRACE seconds later has its process killed. Once a stopped run's outcome has
# reached the worker's main process, that process sends RETIRE_SIGNAL, and the pool process
# leaves as billiard recycles one (EX_RECYCLE, replaced at once): whatever the stopped body
# left behind (threads, half-changed state) goes with it.
INTERRUPT_SIGNAL = signal.SIGUSR1
RETIRE_SIGNAL = signal.SIGUSR2
INTERRUPT_GRACE = 1.0
EX_RECYCLE = 0x9B  # billiard.pool.EX_RECYCLE: the parent replaces the process without a warning


class _Interrupts:
    """A pool process's handlers of INTERRUPT_SIGNAL and RETIRE_SIGNAL, installed once from
    its main thread (signal handlers run there, and only there can they be installed)."""

    def __init__(self) -> None:
        self.installed = False
        self.previous: Any = None
        self.run: Run | None = None  # the run whose body a watchdog may interrupt
        self.sent = False  # a watchdog sent INTERRUPT_SIGNAL, not yet handled

    def install(self) -> bool:
        """Install the handlers in a pool process's main thread; whether they are installed."""
        main = threading.current_thread() is threading.main_thread()
        if not self.installed and context.pool_process and main:
            self.previous = signal.signal(INTERRUPT_SIGNAL, self._interrupt)
            signal.signal(RETIRE_SIGNAL, _retire)
            self.installed = True
        return self.installed

    def _interrupt(self, signum: int, frame: Any) -> None:
        if not self.sent:  # not a watchdog's: Celery's soft time limit, if one is set
            if callable(self.previous):
                self.previous(signum, frame)
            return
        self.sent = False
        if self.run is not None:
            self.run._interrupted()


_interrupts = _Interrupts()


def _retire(signum: int, frame: Any) -> None:
    """RETIRE_SIGNAL: the pool process is idle (its last run's outcome has been reported and
    consumed), so it leaves at once, with the exit code of a recycled process; the parent
    notices the exit and forks a replacement."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EX_RECYCLE)


def retire_pool_process(pid: int | None) -> None:
    """In the worker's main process: retire the pool process `pid`, whose run's body had to
    be stopped, once that run's outcome has been reported (see INTERRUPT_SIGNAL)."""
    if not pid or pid == os.getpid():  # a solo pool runs tasks in the worker itself
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, RETIRE_SIGNAL)


@dataclass
class WorkerContext:
    """What a pool process knows of its worker; set in the worker's main process before
    the pool forks, so every pool process inherits it."""

    name: str = "worker"
    overrides: dict[str, str] = field(default_factory=dict)
    # True in prefork pool processes, where a body is stopped by a signal (INTERRUPT_SIGNAL).
    pool_process: bool = False
    _probed: dict[str, str] = field(default_factory=dict)
    _probed_at: float = 0.0

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
        req_keys = [
            app.keys.requests(scope),
            app.keys.leases,
            app.keys.due(profile),
            app.keys.counts,
        ]
        app.call("release", req_keys, [scope, identifier, gen], wake=True)
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
    return Run(app, task, kind, gen, profile).execute(app.handlers[identifier])


def refuse(app: BackgroundApp, identifier: str, scope: str, gen: int, reason: str) -> bool:
    """Record a dispatched request as failed without running it (e.g. no handler here)."""
    raw = _start(app, scope, identifier, gen)
    if raw is None:
        return False
    if _finish(app, scope, gen, State.FAILED, False, reason):
        metrics.count_run(app.app_id, json.loads(raw)["k"], State.FAILED, False)
        with logs.request(app.app_id, scope, identifier, gen):
            log.error("failed without running: %s", reason)
    return True


def _start(app: BackgroundApp, scope: str, identifier: str, gen: int) -> Any:
    """start.lua: the running record's JSON, or None if the message is stale."""
    k = app.keys
    script_keys = [k.requests(scope), k.leases, k.running, k.runleases, k.counts]
    lease_ms = int(app.settings.heartbeat_timeout * 1000)
    return app.call("start", script_keys, [scope, identifier, gen, context.name, lease_ms])


def _finish(
    app: BackgroundApp, scope: str, gen: int, state: State, success: bool, reason: str
) -> bool:
    """finish.lua: False if the run had already been given up as lost."""
    script_keys = [app.keys.running, app.keys.runleases, app.keys.history(scope), app.keys.expire]
    args = [gen, str(state), int(success), app.settings.history_limit, reason]
    return bool(app.call("finish", script_keys, args))


class _Watchdogs:
    """The threads that watch runs, kept between runs: starting a thread for every run cost
    more CPU than a no-op run itself. A pool process runs one request at a time, so one
    thread serves it; a process running several at once (a threads pool) gets one per run
    in progress."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Watchdog] = []
        self._pid = os.getpid()

    def watch(self, job: Callable[[], None]) -> None:
        """Run `job` in an idle watchdog thread, in a copy of the caller's context (so its
        log lines name the request too)."""
        context = contextvars.copy_context()
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's threads did not come along
                self._idle, self._pid = [], os.getpid()
            watchdog = self._idle.pop() if self._idle else _Watchdog(self)
        watchdog.give(lambda: context.run(job))

    def done(self, watchdog: _Watchdog) -> None:
        with self._lock:
            self._idle.append(watchdog)


class _Watchdog:
    """One daemon thread running the watch jobs it is given, one after the other."""

    def __init__(self, pool: _Watchdogs) -> None:
        self._pool = pool
        self._job: Callable[[], None] | None = None
        self._given = threading.Condition()
        threading.Thread(target=self._loop, name="bgqueue-watchdog", daemon=True).start()

    def give(self, job: Callable[[], None]) -> None:
        with self._given:
            self._job = job
            self._given.notify()

    def _loop(self) -> None:
        while True:
            with self._given:
                while self._job is None:
                    self._given.wait()
                job, self._job = self._job, None
            try:
                job()
            except Exception:  # a watch that fails must not take the thread with it
                log.exception("watchdog failed")
            self._pool.done(self)


_watchdogs = _Watchdogs()


class Run:
    """One run of a handler: its outcome is recorded exactly once, by whoever ends it first."""

    def __init__(
        self, app: BackgroundApp, task: BGTask, kind: Kind, gen: int, profile: int
    ) -> None:
        self.app = app
        self.task = task
        self.kind = kind
        self.gen = gen
        self.profile = profile
        self.outcome: tuple[str, bool] | None = None
        self.reason = ""
        self._lock = threading.Lock()
        # Stopping the body (_stop_body): whether it is inside the handler, holds off an
        # interruption while recording its outcome, has one waiting, was sent one.
        self._in_body = False
        self._holding = 0
        self._pending = False
        self._stopped = False
        self._interruptible = False
        self._signal_lock = threading.Lock()
        self._returned = threading.Event()
        self._body_thread = threading.get_ident()
        task.on_completed = self._completed
        task.app = app
        # The deadline: start + budget (continued processing: last progress + stall window),
        # held later by transient delays, pulled earlier by a forced expiration.
        self._start = time.monotonic()
        self._budget = budget_of(app, kind)
        self._base = self._start + self._budget
        self._forced = math.inf
        self._warned = False
        self._wake = threading.Event()  # the body returned or the delays changed
        self.delays = RunDelays(app, task.scope, gen, self._base_deadline, self._wake.set)
        task.delays = self.delays

    def end(self, state: State, success: bool, reason: str = "") -> bool:
        """Record the outcome unless one is recorded already; True if this call recorded it."""
        # The run's transient delays end with it, before the outcome is recorded and before
        # any kill (a dead process settles nothing). A body still holding one when it
        # completes gets the warning lead to return.
        self.delays.settle(grace=self.app.limits.warning_lead(self._budget))
        with self._lock:
            if self.outcome is not None:
                return False
            self.outcome = (str(state), success)
            self.reason = reason
        if _finish(self.app, self.task.scope, self.gen, state, success, reason):
            metrics.count_run(self.app.app_id, self.kind, state, success)
        else:  # counted by beat, which recorded it as lost
            log.warning(
                "run %s of %s had been given up as lost; it ran twice",
                self.gen,
                self.task.identifier,
            )
        return True

    def _completed(self, success: bool) -> None:
        with self._uninterrupted():
            self.end(State.COMPLETED, success)

    @contextlib.contextmanager
    def _uninterrupted(self) -> Iterator[None]:
        """Hold off an interruption of the body while it records its outcome (a recording
        cut in half would be lost); one that came meanwhile is raised right after."""
        if threading.get_ident() != self._body_thread:
            yield
            return
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        if self._pending and not self._holding:
            self._pending = False
            raise TaskTerminated

    def _interrupted(self) -> None:
        """INTERRUPT_SIGNAL's handler, in the body's thread."""
        if not self._in_body:
            return  # the body returned meanwhile
        if self._holding:
            self._pending = True
            return
        raise TaskTerminated

    def execute(self, handler: Any) -> dict[str, Any]:
        """Run the handler with a watchdog; returns the recorded outcome."""
        self._interruptible = _interrupts.install()
        _interrupts.run = self
        _watchdogs.watch(self._watch)
        try:
            try:
                self._in_body = True
                handler(self.task)
            finally:
                with self._signal_lock:  # from now on no watchdog interrupts this thread
                    self._in_body = False
        except TaskTerminated:
            pass
        except Exception as exc:  # the handler's failure is an outcome, not a worker crash
            self.end(State.FAILED, False, f"{type(exc).__name__}: {exc}"[:500])
        finally:
            self._returned.set()
            self._wake.set()
        if self.task.success is not None:
            self.end(State.COMPLETED, self.task.success)
        else:
            # Returning without set_task_completed is taken as done: nothing is left to wait for.
            self.end(State.COMPLETED, True, "handler returned without set_task_completed")
        state, success = self.outcome or ("completed", True)
        summary: dict[str, Any] = {"outcome": state, "success": success, "scope": self.task.scope}
        if self.reason:
            summary["reason"] = self.reason
        if self._stopped:  # the worker retires this pool process once the outcome is reported
            summary["stopped"] = True
        return summary

    # -- watchdog -------------------------------------------------------------

    def _watch(self) -> None:
        settings = self.app.settings
        budget = budget_of(self.app, self.kind)
        lead = efficiency.warning_lead(self.app, budget)  # CPU lifts the budget/5 cap
        next_renew = self._start + settings.heartbeat_interval
        while True:
            deadline = self._deadline()
            warn_or_end = deadline if self._warned else deadline - lead
            wake_at = min(next_renew, warn_or_end, self.delays.next_warning())
            if self._sleep_until(wake_at):
                return
            now = time.monotonic()
            if now >= next_renew:
                next_renew = now + settings.heartbeat_interval
                reason = self._check_in()
                if reason and not self._warned:
                    log.info("expiring %s now: %s", self.task.identifier, reason)
                    self._forced = now + lead
            self._warn_delays(now)
            deadline = self._deadline()
            if not self._warned and now >= deadline - lead:
                self._warned = True
                self._warn()
            elif self._warned and now >= deadline:
                self._terminate(State.EXPIRED, "did not complete by its deadline")
                return

    def _base_deadline(self) -> float:
        """The deadline without delays (monotonic). Continued processing lives as long as it
        keeps reporting progress, until its expiration handler has been called."""
        if isinstance(self.task, ContinuedProcessingTask) and not self._warned:
            self._base = max(self._start, self.task.progress.last_change) + self._budget
        return self._base

    def _deadline(self) -> float:
        """The deadline now: the base one or the end of the latest transient delay,
        whichever is later, unless an expiration was forced."""
        return min(max(self._base_deadline(), self.delays.holds_until()), self._forced)

    def _sleep_until(self, wake_at: float) -> bool:
        """Wait until `wake_at` or a change of the delays; True once the body has returned."""
        self._wake.wait(max(0.0, wake_at - time.monotonic()))
        self._wake.clear()
        return self._returned.is_set()

    def _warn_delays(self, now: float) -> None:
        """Call the callbacks of delays about to end (HarmonyOS's expiration callback)."""
        for callback in self.delays.due_callbacks(now):
            if self.outcome is not None:
                return
            try:
                callback()
            except Exception:
                log.exception("suspend-delay callback of %s raised", self.task.identifier)

    def _check_in(self) -> str | None:
        """Renew the run's lease; return why the task must expire early, if it must.

        As WorkManager stops work whose constraints fail, a task whose requirements stop
        holding on this worker gets its expiration handler now.
        """
        app = self.app
        lease_ms = int(app.settings.heartbeat_timeout * 1000)
        try:
            alive, expire = app.call(
                "renew", [app.keys.runleases, app.keys.expire], [self.gen, lease_ms]
            )
        except Exception as exc:  # a broker blip must not kill the watchdog
            log.warning("could not renew run %s: %s", self.gen, type(exc).__name__)
            return None
        if not alive and self.outcome is None:
            self._abandon()
        if expire:
            return "expiration simulated"
        held = context.conditions(app.settings.heartbeat_interval)
        if not conditions.satisfies(held, self.profile):
            return "its requirements no longer hold on this worker"
        return None

    def _abandon(self) -> None:
        """Stop a run that beat gave up as lost (its lease lapsed, e.g. the worker stalled):
        the request already waits to run again, so going on would only run it twice."""
        log.warning(
            "run %s of %s was given up as lost; stopping it", self.gen, self.task.identifier
        )
        with self._lock:
            self.outcome = (str(State.FAILED), False)  # already recorded by the sweep
            self.reason = "given up as lost (its run lease lapsed); it will run again"
        self.delays.settle()
        self._stop_body()

    def _warn(self) -> None:
        if self.outcome is not None:
            return
        handler = self.task.expiration_handler
        if handler is None:
            self._terminate(State.COMPLETED, "no expiration handler set; ended unsuccessful")
            return
        metrics.count_expiration(self.app.app_id, self.kind)
        try:
            handler()
        except Exception:
            log.exception("expiration handler of %s raised", self.task.identifier)

    def _terminate(self, state: State, reason: str) -> None:
        self.end(state, False, reason)
        if self._returned.is_set():
            return
        log.warning("terminating %s (run %s): %s", self.task.identifier, self.gen, reason)
        self._stop_body()

    def _stop_body(self) -> None:
        """Stop a body that must not go on: raise TaskTerminated in it and give it
        INTERRUPT_GRACE to return; kill its pool process if it does not (it swallowed the
        exception, or is stuck in C code that does not look at signals)."""
        if self._returned.is_set():
            return
        if self._interrupt():
            if self._returned.wait(INTERRUPT_GRACE):
                return
            log.warning(
                "%s (run %s) did not stop within %ss of being interrupted",
                self.task.identifier,
                self.gen,
                INTERRUPT_GRACE,
            )
        if context.pool_process:
            os.kill(os.getpid(), signal.SIGKILL)
        # Solo or thread pools share the process: interrupt the body's thread instead.
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(self._body_thread), ctypes.py_object(TaskTerminated)
        )

    def _interrupt(self) -> bool:
        """Send the body's thread INTERRUPT_SIGNAL (once per run); False where it cannot be
        sent: outside a pool process's main thread."""
        if not self._interruptible:
            return False
        with self._signal_lock:
            if self._in_body and not self._stopped:
                self._stopped = True
                _interrupts.sent = True
                signal.pthread_kill(self._body_thread, INTERRUPT_SIGNAL)
        return True
