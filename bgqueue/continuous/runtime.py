"""Running continuous tasks inside a continuous worker's pool processes.

The handler runs in the pool process's main thread, without a time budget; a watchdog
thread renews the run's lease every heartbeat interval and, from what the renewal reads
back, hands the handler mode updates and stops (`task.stopped`): the app's stop, a system
cancel, or a handover when the worker shuts down. It cancels a DATA_TRANSFER task whose
progress stalls, and terminates a handler that ignores a stop for longer than the grace
(`Limits.expiration_warning`) by killing its pool process (bgqueue/runtime/body.py).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Celery, signals

from bgqueue import runtime
from bgqueue.broker import deadletter
from bgqueue.continuous import CELERY_TASK, ContinuousTask, ContinuousTaskCancelReason
from bgqueue.model.modes import BackgroundMode
from bgqueue.runtime.body import Body, TaskTerminated

if TYPE_CHECKING:
    from bgqueue.model.context import AppContext

log = logging.getLogger("bgqueue.continuous")

HAND_BACK = -1  # continuous_end.lua's reason for a task this worker has no handler for

# The arguments of a continuous task's message, as beat sends them (keywords only).
ARGUMENTS: dict[str, deadletter.Check] = {
    "ability": deadletter.is_name,
    "gen": deadletter.is_count,
}


def add_celery_task(app: AppContext, celery: Celery) -> None:
    """Register the Celery task that runs continuous handlers, and the handover of a
    worker's continuous tasks when it shuts down."""

    def run(task: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        wrong = deadletter.message_kwargs(args, kwargs, ARGUMENTS)
        if wrong is not None:  # not a message beat sent
            return deadletter.refuse_task_message(app, task, wrong)
        return execute(app, kwargs["ability"], kwargs["gen"])

    run.__doc__ = "Runs the continuous handler of an ability"
    celery.task(name=CELERY_TASK, bind=True, acks_late=True, ignore_result=True)(run)

    def shutting_down(**_: Any) -> None:
        # Celery sends this from a signal handler of the main process: Redis is reached
        # from a thread, never from inside the handler.
        threading.Thread(target=_hand_over, args=(app,), name="bgqueue-handover").start()

    signals.worker_shutting_down.connect(shutting_down, weak=False)


def _hand_over(app: AppContext) -> None:
    """Mark this worker's running continuous tasks for handover (warm shutdown): their
    handlers see `stopped`, and when they return the tasks wait for another worker."""
    try:
        marked = app.call("continuous_handover", [app.keys.continuous], [runtime.context.name])
    except Exception as exc:
        log.warning("could not hand continuous tasks over: %s", type(exc).__name__)
        return
    if marked:
        log.info("handing %d continuous task(s) over to other workers", marked)


def execute(app: AppContext, ability: str, gen: int) -> dict[str, Any]:
    """Run one dispatched continuous task if its message is current."""
    keys = app.keys
    lease_ms = int(app.settings.heartbeat_timeout * 1000)
    args = [ability, gen, runtime.context.name, os.getpid(), lease_ms]
    raw = app.call("continuous_begin", [keys.continuous, keys.continuous_leases], args)
    if raw is None:
        return {"outcome": "stale"}
    record = json.loads(raw)
    run = ContinuousRun(app, ability, gen)
    handler = app.continuous_handlers.get(ability)
    if handler is None:
        reason = f"no continuous handler for {ability!r} on worker {runtime.context.name}"
        log.warning("%s: handed back", reason)
        run.end(HAND_BACK, reason)
        return {"outcome": "handed back", "reason": reason}
    task = ContinuousTask(
        ability,
        [BackgroundMode(m) for m in record["m"]],
        json.loads(record["pl"]),
        int(record["id"]),
        int(record["r"]),
    )
    return run.execute(handler, task)


class ContinuousRun:
    """One run of a continuous handler. Its end is recorded once, by whichever of the
    handler (returning or raising) and the watchdog (terminating it) comes first."""

    def __init__(self, app: AppContext, ability: str, gen: int) -> None:
        self.app = app
        self.ability = ability
        self.gen = gen
        self.stopped_at: float | None = None  # monotonic time `task.stopped` was set
        self.abandoned = False  # beat gave the run up (lease lapsed) and restarted the task
        self._ended = False
        self._lock = threading.Lock()
        self.body = Body()
        self._returned = self.body.returned
        self._sent_progress: tuple[int, int] | None = None

    def execute(self, handler: Callable[..., Any], task: ContinuousTask) -> dict[str, Any]:
        """Run the handler with a watchdog until it returns."""
        watchdog = threading.Thread(
            target=self._watch, args=(task,), name=f"bgqueue-continuous-{self.gen}", daemon=True
        )
        watchdog.start()
        reason, message = 0, ""
        try:
            try:
                handler(task)
            finally:
                self.body.leave()
        except TaskTerminated:
            pass
        except Exception as exc:  # the handler's failure ends the task, not the worker
            log.exception("continuous handler of %s raised", self.ability)
            reason = ContinuousTaskCancelReason.SYSTEM_CANCEL
            message = f"{type(exc).__name__}: {exc}"
        outcome = self.end(reason, message[:500])
        return {"outcome": outcome, "ability": self.ability, "restarts": task.restarts}

    def end(self, reason: int, message: str) -> str:
        """Record the end of the run (continuous_end.lua), once."""
        with self._lock:
            if self._ended:
                return "ended"
            self._ended = True
        keys = self.app.keys
        script_keys = [keys.continuous, keys.continuous_pending, keys.continuous_leases]
        args = [self.ability, self.gen, int(reason), keys.continuous_cancel, message]
        result = self.app.call("continuous_end", script_keys, args, wake=True)
        return {0: "abandoned", 1: "ended", 2: "handed over", 3: "handed back"}[int(result)]

    # -- watchdog -------------------------------------------------------------------------

    def _watch(self, task: ContinuousTask) -> None:
        interval = self.app.settings.heartbeat_interval
        grace = self.app.limits.expiration_warning
        stall = self.app.limits.data_transfer_stall
        while not self._returned.wait(interval):
            self._check_in(task)
            now = time.monotonic()
            if (
                self.stopped_at is None
                and BackgroundMode.DATA_TRANSFER in task.modes
                and now - task.last_progress >= stall
            ):
                reason = ContinuousTaskCancelReason.SYSTEM_CANCEL_DATA_TRANSFER_LOW_SPEED
                self._cancel(task, reason, f"DATA_TRANSFER with no progress for {stall:g} s")
            if self.stopped_at is not None and now - self.stopped_at >= grace:
                self._terminate(f"did not return within {grace:g} s of being stopped")
                return

    def _check_in(self, task: ContinuousTask) -> None:
        """Renew the run's lease and report progress; take in new modes, a stop or a cancel
        (state 'stopping'), a handover, or that beat gave the run up."""
        keys = self.app.keys
        lease_ms = int(self.app.settings.heartbeat_timeout * 1000)
        progress = task.progress
        sent = json.dumps(progress) if progress != self._sent_progress else ""
        args = [self.ability, self.gen, lease_ms, sent]
        try:
            raw = self.app.call("continuous_renew", [keys.continuous, keys.continuous_leases], args)
        except Exception as exc:  # a broker blip must not kill the watchdog
            log.warning("could not renew continuous task %s: %s", self.ability, type(exc).__name__)
            return
        self._sent_progress = progress
        if raw is None:
            if not self.abandoned:
                log.warning(
                    "continuous run %s of %s was given up; stopping it", self.gen, self.ability
                )
                self.abandoned = True
            self._stop(task, None)
            return
        record = json.loads(raw)
        modes = [BackgroundMode(m) for m in record["m"]]
        if modes != task.modes:
            task._update_modes(modes)
        if record["s"] == "stopping":
            reason = int(record.get("why") or 0)
            self._stop(task, ContinuousTaskCancelReason(reason) if reason else None)
        elif record.get("ho"):
            self._stop(task, None)

    def _stop(self, task: ContinuousTask, reason: ContinuousTaskCancelReason | None) -> None:
        if self.stopped_at is not None:
            return
        task.cancel_reason = reason
        self.stopped_at = time.monotonic()
        task.stopped.set()

    def _cancel(self, task: ContinuousTask, reason: ContinuousTaskCancelReason, why: str) -> None:
        """Cancel the task for the system: announced to the app's cancel callbacks."""
        keys = self.app.keys
        script_keys = [keys.continuous, keys.continuous_pending, keys.continuous_leases]
        args = [self.ability, self.gen, int(reason), keys.continuous_cancel, why]
        log.warning("cancelling continuous task %s: %s", self.ability, why)
        try:
            cancelled = self.app.call("continuous_stop", script_keys, args)
        except Exception as exc:
            log.warning("could not cancel continuous task %s: %s", self.ability, type(exc).__name__)
            return
        if cancelled:
            self._stop(task, reason)

    def _terminate(self, why: str) -> None:
        if self._returned.is_set():
            return
        log.warning("terminating continuous task %s (run %s): %s", self.ability, self.gen, why)
        if not self.abandoned:
            self.end(0, why)
        if not self._returned.is_set():
            self.body.kill()
