"""Task objects handed to launch handlers (Apple's BGTask family).

A task carries what the handler needs (identifier, payload, scope) and the two
calls of the model: set an expiration handler, and report completion. Time
keeping lives in `runtime.py`; this module is only the handler's view.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from bgqueue.errors import ParameterError
from bgqueue.requests import Kind


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
            self.on_completed(success)


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
