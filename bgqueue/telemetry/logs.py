"""Log lines of beat and workers: plain text, or one JSON object per line.

A JSON line has `time`, `level`, `logger`, `message` and `pid`; a line logged about a
request also has `app`, `scope`, `identifier` and `request_id` (the run's generation).
Those come from `request(...)`, which the worker holds around a run (its watchdog thread
too) and beat around what it logs about a request, so the code that logs need not pass
them.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

FORMAT_ENV = "BGQUEUE_LOG_FORMAT"
FORMATS = ("text", "json")
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(name)s] %(message)s"  # as Celery's worker

_request: ContextVar[dict[str, Any] | None] = ContextVar("bgqueue_request", default=None)


@contextmanager
def request(app_id: str, scope: str, identifier: str, request_id: int) -> Iterator[None]:
    """Name this request in every line logged inside the block (in this thread, and in
    threads started with a copy of its context)."""
    token = _request.set(
        {"app": app_id, "scope": scope, "identifier": identifier, "request_id": request_id}
    )
    try:
        yield
    finally:
        _request.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; exceptions go in `exception`, never across lines."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        entry.update(_request.get() or {})
        task = _celery_task()
        if task is not None:  # Celery's own lines about a task, in the pool process
            entry["task_id"] = task.request.id
            kwargs = task.request.kwargs or {}
            if {"scope", "gen", "requires"} <= kwargs.keys():  # a request's message
                entry.setdefault("app", task.app.main)
                entry.setdefault("scope", kwargs["scope"])
                entry.setdefault("identifier", task.name)
                entry.setdefault("request_id", kwargs["gen"])
            else:
                entry.setdefault("task", task.name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _celery_task() -> Any:
    """The Celery task this pool process is running, if any (for Celery's own lines)."""
    celery_state = sys.modules.get("celery._state")
    if celery_state is None:
        return None
    task = celery_state.get_current_task()
    return task if task is not None and task.request.id else None


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of a `--log-format` value."""
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure(log_format: str, level: str) -> None:
    """Log to stderr in this format (beat: nothing else sets up its logging)."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def use_in_celery(log_format: str, level: str) -> None:
    """Give the handlers Celery's worker sets up (its own and its task logger's, in the
    main process and in pool processes) this format. Text keeps Celery's own format."""
    if log_format != "json":
        return
    from celery import signals

    # Until Celery sets up its logging, and for warnings it issues before (e.g. running
    # as root): JSON too, not Python's plain stderr.
    configure(log_format, level)
    logging.captureWarnings(True)

    def apply(logger: logging.Logger, **_: Any) -> None:
        for handler in logger.handlers:
            handler.setFormatter(JsonFormatter())

    signals.after_setup_logger.connect(apply, weak=False)
    signals.after_setup_task_logger.connect(apply, weak=False)
