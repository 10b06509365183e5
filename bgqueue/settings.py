"""Process-wide intervals and leases, read from the environment in one place.

These are operational timings, not product quotas (those are `Limits`); tests
shorten them through `BGQUEUE_*` variables so that recovery takes seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
    """Heartbeats, leases and batch sizes shared by beat, workers and producers."""

    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    beat_lease: float = 5.0
    claim_lease: float = 5.0
    # A dispatched request not started within this is published again, but only once its
    # queue is empty: then its message was either lost or is held by a worker about to start.
    dispatch_lease: float = 5.0
    sweep_interval: float = 1.0
    claim_batch: int = 500
    history_limit: int = 1000
    max_attempts: int = 5

    @classmethod
    def from_env(cls) -> Settings:
        """Settings with any `BGQUEUE_<FIELD>` environment override applied."""
        base = cls()
        return cls(
            heartbeat_interval=_seconds("BGQUEUE_HEARTBEAT_INTERVAL", base.heartbeat_interval),
            heartbeat_timeout=_seconds("BGQUEUE_HEARTBEAT_TIMEOUT", base.heartbeat_timeout),
            beat_lease=_seconds("BGQUEUE_BEAT_LEASE", base.beat_lease),
            claim_lease=_seconds("BGQUEUE_CLAIM_LEASE", base.claim_lease),
            dispatch_lease=_seconds("BGQUEUE_DISPATCH_LEASE", base.dispatch_lease),
            sweep_interval=_seconds("BGQUEUE_SWEEP_INTERVAL", base.sweep_interval),
            claim_batch=int(_seconds("BGQUEUE_CLAIM_BATCH", base.claim_batch)),
            history_limit=int(_seconds("BGQUEUE_HISTORY_LIMIT", base.history_limit)),
            max_attempts=int(_seconds("BGQUEUE_MAX_ATTEMPTS", base.max_attempts)),
        )
