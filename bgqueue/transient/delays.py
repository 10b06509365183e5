"""The run's half of transient delays: the delays of one run, on its worker.

Grants, cancels and the final settlement go through the scope's ledger in Redis
(`lua/transient_delays.lua`, which alone charges, on Redis's clock). The run keeps its own
delays here as well, timed on the worker's monotonic clock from before each grant was
asked, so that the watchdog (bgqueue/runtime/) reads the deadline they hold and the
callbacks due without a round trip, and never holds a run longer than Redis reserved. The
worker sends Redis durations only (how far its base deadline is from now), never times
of its own clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bgqueue import tracing
from bgqueue.errors import (
    ParameterError,
    TransientTaskCallerVerificationFailed,
    TransientTaskVerificationFailed,
)
from bgqueue.transient import MAX_REASON, SCRIPT, DelaySuspendInfo, ms, script_keys

if TYPE_CHECKING:
    from bgqueue.model.context import AppContext

log = logging.getLogger("bgqueue.transient")


def _check_request_id(request_id: object) -> int:
    if isinstance(request_id, bool) or not isinstance(request_id, int):
        raise ParameterError(f"request_id must be an integer, got {type(request_id).__name__}")
    return request_id


@dataclass
class _Delay:
    """A granted delay as its worker times it (monotonic clock)."""

    ends: float
    warn_at: float
    callback: Callable[[], None]
    warned: bool = False


class RunDelays:
    """The delays of one run, on its worker. Grants, cancels and the final settlement go
    through Redis; the deadline they hold and the callbacks due are read here.

    `base_deadline` returns the run's deadline without delays (monotonic); `changed` wakes
    the watchdog when the delays change.
    """

    span: Any = None  # the run's OpenTelemetry span while tracing is on (bgqueue/tracing.py)

    def __init__(
        self,
        app: AppContext,
        scope: str,
        gen: int,
        base_deadline: Callable[[], float],
        changed: Callable[[], None],
    ) -> None:
        self.app = app
        self.scope = scope
        self.gen = gen
        self._base_deadline = base_deadline
        self._changed = changed
        self._delays: dict[int, _Delay] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._grace_until = float("-inf")  # after settling, until the body may return

    def _call(self, *args: Any) -> Any:
        return self.app.call(SCRIPT, script_keys(self.app.keys, self.scope), args)

    def _to_base_ms(self) -> int:
        return ms(self._base_deadline() - time.monotonic())

    # -- the handler's calls --------------------------------------------------

    def request(self, reason: str, callback: Callable[[], None]) -> DelaySuspendInfo:
        """Grant a delay from the scope's quota, or raise TransientTaskVerificationFailed."""
        if not isinstance(reason, str) or not reason.strip():
            raise ParameterError("reason must be a non-empty string")
        if not callable(callback):
            raise ParameterError("callback must be callable")
        limits = self.app.limits
        with self._lock:
            if self._closed:
                raise TransientTaskCallerVerificationFailed(
                    "the task has ended; only a running task can request a suspend delay"
                )
            asked = time.monotonic()
            reply = self._call(
                "grant",
                self.gen,
                self._to_base_ms(),
                limits.transient_max_concurrent,
                ms(limits.transient_max_delay),
                ms(limits.transient_daily_quota),
                reason[:MAX_REASON],
                self.scope,
            )
            self._refused(reply)
            request_id, actual = int(reply[1]), int(reply[2])
            # Timed from before the call: the worker's deadline never outlasts Redis's.
            ends = asked + actual / 1000
            lead = limits.warning_lead(actual / 1000)
            self._delays[request_id] = _Delay(ends, ends - lead, callback)
        tracing.event(self.span, "suspend_delay", tracing.delay(request_id, actual, reason))
        self._changed()
        return DelaySuspendInfo(request_id, actual)

    def _refused(self, reply: list[Any]) -> None:
        status = reply[0].decode()
        limits = self.app.limits
        if status == "gone":
            raise TransientTaskCallerVerificationFailed(
                f"run {self.gen} is no longer running (it was given up as lost)"
            )
        if status == "limit":
            raise TransientTaskVerificationFailed(
                f"scope {self.scope!r} already has {int(reply[1])} suspend delays; at most "
                f"{limits.transient_max_concurrent} at once: cancel one first"
            )
        if status == "quota":
            raise TransientTaskVerificationFailed(
                f"scope {self.scope!r} has used its daily suspend-delay quota of "
                f"{limits.transient_daily_quota:g} s (rolling 24 hours); try again later"
            )

    def remaining(self, request_id: int) -> int:
        """Milliseconds left of one of this run's delays (0 once it has run out)."""
        request_id = _check_request_id(request_id)
        with self._lock:
            delay = self._delays.get(request_id)
            if delay is None:
                raise self._unknown(request_id)
            return max(0, ms(delay.ends - time.monotonic()))

    def cancel(self, request_id: int) -> None:
        """End one of this run's delays now: the time it held is charged, the rest refunded."""
        request_id = _check_request_id(request_id)
        with self._lock:
            if request_id not in self._delays:
                raise self._unknown(request_id)
            # 0 means the run's delays were settled already (it was given up as lost): the
            # delay is over either way.
            self._call("cancel", self.gen, self._to_base_ms(), request_id)
            del self._delays[request_id]
        tracing.event(self.span, "suspend_delay_cancelled", {tracing.DELAY_ID: request_id})
        self._changed()

    def _unknown(self, request_id: int) -> TransientTaskCallerVerificationFailed:
        return TransientTaskCallerVerificationFailed(
            f"no suspend delay {request_id} of this task: it was never granted to it, "
            "was cancelled, or the task has ended"
        )

    # -- the watchdog's view ----------------------------------------------------

    def holds_until(self) -> float:
        """The latest end of this run's delays (monotonic); -inf with none ever granted."""
        with self._lock:
            return max((d.ends for d in self._delays.values()), default=self._grace_until)

    def next_warning(self) -> float:
        """When the next delay callback is due (monotonic), or inf."""
        with self._lock:
            pending = [d.warn_at for d in self._delays.values() if not d.warned]
        return min(pending, default=float("inf"))

    def due_callbacks(self, now: float) -> list[Callable[[], None]]:
        """Callbacks of delays about to end, each returned once."""
        with self._lock:
            due = [d for d in self._delays.values() if not d.warned and d.warn_at <= now]
            for delay in due:
                delay.warned = True
        return [d.callback for d in due]

    def settle(self, grace: float = 0.0) -> None:
        """The run ends: no more delays; charge what its delays held and refund the rest.
        A body that still held a delay may go on for `grace` seconds (uncharged) to return."""
        with self._lock:
            self._closed = True
            if not self._delays:
                return
            self._delays.clear()
            self._grace_until = time.monotonic() + grace
            try:
                charged = self._call("settle", self.gen)
            except Exception as exc:  # settled later by the next call on the scope
                log.warning("could not settle delays of run %s: %s", self.gen, exc)
                return
        log.info("run %s: suspend delays settled, %s ms charged", self.gen, charged)
