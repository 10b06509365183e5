"""Process-wide intervals and leases, read from the environment in one place.

These are operational timings, not product quotas (those are `Limits`); tests
shorten them through `BGQUEUE_*` variables so that recovery takes seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from bgqueue.errors import ParameterError


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ParameterError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ParameterError(f"{name} must be positive, got {raw!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """Heartbeats, leases, windows and retention shared by beat, workers and producers."""

    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    beat_lease: float = 5.0
    # A dispatched request not started within this (past its date) is published again, but
    # only once its queue is empty: then its message was either lost or is held by a worker
    # about to start it.
    dispatch_lease: float = 5.0
    # Requests due within this window are handed to workers ahead of their date, with the
    # date as Celery's ETA: the start is timed in the worker, to the millisecond, and a
    # worker holds at most this window's worth of messages.
    dispatch_ahead: float = 1.0
    sweep_interval: float = 1.0
    claim_batch: int = 500
    # A scope's history keeps at most this many runs, none older than the retention, and
    # goes altogether once the scope has been idle that long.
    history_limit: int = 1000
    history_retention: float = 7 * 86400
    max_attempts: int = 5
    # Workers, classes and apps gone this long are forgotten (their queues deleted).
    forget_after: float = 300.0

    @property
    def history(self) -> tuple[int, int]:
        """The history scripts' arguments: the length cap and the retention in ms."""
        return self.history_limit, int(self.history_retention * 1000)

    @classmethod
    def from_env(cls) -> Settings:
        """Settings with any `BGQUEUE_<FIELD>` environment override applied."""
        base = cls()
        values: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            value = _seconds(f"BGQUEUE_{name.upper()}", getattr(base, name))
            values[name] = int(value) if isinstance(getattr(base, name), int) else value
        return cls(**values)
