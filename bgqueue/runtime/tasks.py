"""Task objects handed to launch handlers (Apple's BGTask family).

A task carries what the handler needs (identifier, payload, scope) and the two
calls of the model: set an expiration handler, and report completion. Time
keeping lives in the run core (`bgqueue.runtime`); this module is only the handler's view.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from bgqueue import efficiency
from bgqueue.errors import ParameterError, TransientTaskCallerVerificationFailed
from bgqueue.model.requests import Kind
from bgqueue.transient import DelaySuspendInfo
from bgqueue.transient.delays import RunDelays

if TYPE_CHECKING:
    from bgqueue.model.context import AppContext


class BGTask:
    """A running background task. Call `set_task_completed` when the work is done."""

    def __init__(
        self, identifier: str, scope: str, payload: Any, request_id: int, attempt: int
    ) -> None:
        self.identifier = identifier
        self.scope = scope
        self.payload = payload
        self.request_id = request_id
        self.attempt = attempt
        self._expiration_handler: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self.completed = threading.Event()
        self.success: bool | None = None
        # Set by the runtime so an outcome is recorded the moment it is reported.
        self.on_completed: Callable[[bool], None] | None = None
        # The app the task runs for, set by the runtime (None for a task built by hand).
        self.app: AppContext | None = None
        # Wraps bgqueue's own calls from the handler's thread, set by the runtime: a
        # watchdog's interrupt waits until they are done (bgqueue/runtime/body.py).
        self.guard: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext

    @property
    def expiration_handler(self) -> Callable[[], None] | None:
        """Called from another thread shortly before the deadline; it should wind the work
        down and call `set_task_completed`. With none set, the task ends unsuccessful."""
        return self._expiration_handler

    @expiration_handler.setter
    def expiration_handler(self, handler: Callable[[], None] | None) -> None:
        if handler is not None and not callable(handler):
            raise ParameterError("expiration_handler must be callable or None")
        self._expiration_handler = handler

    def has_resource(self, resource: efficiency.ResourceType) -> bool:
        """Whether the app holds a live grant of this efficiency resource now, e.g.
        `task.has_resource(ResourceType.GPS)` (system apps only; always False otherwise)."""
        if self.app is None:
            efficiency.check_type(resource)
            return False
        with self.guard():
            return efficiency.granted(self.app, resource)

    def set_task_completed(self, success: bool) -> None:
        """Report the outcome; the first report wins, later ones are ignored."""
        if not isinstance(success, bool):
            raise ParameterError(f"success must be True or False, got {success!r}")
        with self._lock:
            if self.success is not None:
                return
            self.success = success
            self.completed.set()
        if self.on_completed is not None:
            with self.guard():
                self.on_completed(success)

    # -- transient delays (HarmonyOS requestSuspendDelay; bgqueue/transient/) --

    # The run's delays, set by the runtime while the task runs on a worker.
    delays: RunDelays | None = None

    def request_suspend_delay(self, reason: str, callback: Callable[[], None]) -> DelaySuspendInfo:
        """Keep this task alive `actual_delay_time` ms from now (at most
        `Limits.transient_max_delay`), paid from the scope's rolling daily quota; `callback`
        runs (from another thread) `expiration_warning` before the delay ends. At most
        `transient_max_concurrent` delays per scope at once, else, or with the quota used up,
        TransientTaskVerificationFailed (9900002)."""
        with self.guard():
            return self._delays().request(reason, callback)

    def get_remaining_delay_time(self, request_id: int) -> int:
        """Milliseconds left of one of this task's delays; an id that is not one of them is
        TransientTaskCallerVerificationFailed (9900001)."""
        return self._delays().remaining(request_id)

    def cancel_suspend_delay(self, request_id: int) -> None:
        """End a delay now: only the time it held the task past its deadline is charged.
        The deadline falls back to what the task would have had without it."""
        with self.guard():
            self._delays().cancel(request_id)

    def _delays(self) -> RunDelays:
        if self.delays is None:
            raise TransientTaskCallerVerificationFailed(
                "suspend delays are for tasks running on a worker"
            )
        return self.delays


class AppRefreshTask(BGTask):
    """A short refresh task."""


class ProcessingTask(BGTask):
    """A task of minutes of maintenance work."""


class HealthResearchTask(ProcessingTask):
    """Processing for a health study, on a worker that can open protected data."""


class Progress:
    """Units of work done (Apple's NSProgress, reduced): every change counts as progress."""

    def __init__(self) -> None:
        self._total = 0
        self._completed = 0
        self.last_change = time.monotonic()

    @property
    def total_unit_count(self) -> int:
        """How many units the work has."""
        return self._total

    @total_unit_count.setter
    def total_unit_count(self, value: int) -> None:
        self._total = self._count(value)
        self.last_change = time.monotonic()

    @property
    def completed_unit_count(self) -> int:
        """How many units are done."""
        return self._completed

    @completed_unit_count.setter
    def completed_unit_count(self, value: int) -> None:
        self._completed = self._count(value)
        self.last_change = time.monotonic()

    @property
    def fraction_completed(self) -> float:
        """Completed over total, 0 when the total is unknown."""
        return self._completed / self._total if self._total else 0.0

    @staticmethod
    def _count(value: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ParameterError(f"a unit count must be a non-negative integer, got {value!r}")
        return value


class ContinuedProcessingTask(BGTask):
    """User-visible work that must keep reporting `progress`, or it is expired."""

    def __init__(self, *args: Any, title: str = "", subtitle: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.title = title
        self.subtitle = subtitle
        self.progress = Progress()

    def update_title(self, title: str, subtitle: str) -> None:
        """Change what the user sees about this task."""
        if not isinstance(title, str) or not isinstance(subtitle, str):
            raise ParameterError("title and subtitle must be strings")
        self.title, self.subtitle = title, subtitle


TASK_CLASSES: dict[Kind, type[BGTask]] = {
    Kind.REFRESH: AppRefreshTask,
    Kind.PROCESSING: ProcessingTask,
    Kind.HEALTH_RESEARCH: HealthResearchTask,
    Kind.CONTINUED_PROCESSING: ContinuedProcessingTask,
}
