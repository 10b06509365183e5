"""Transient delays (HarmonyOS `requestSuspendDelay`): a running task borrows time past its
deadline from its scope's rolling 24-hour quota.

The quota is kept in Redis and shared by every worker: each grant, cancel and settlement is
one call of `lua/transient_delays.lua`, so two workers racing for the last seconds of a
scope's quota cannot both get them. A worker keeps its run's own delays in memory
(`RunDelays`) so that the watchdog knows the deadline they hold and when their callbacks are
due without asking Redis.

The API speaks milliseconds, as HarmonyOS does; `Limits` holds seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bgqueue import tracing
from bgqueue.errors import (
    ParameterError,
    TransientTaskCallerVerificationFailed,
    TransientTaskVerificationFailed,
)

if TYPE_CHECKING:
    from bgqueue.app import BackgroundApp
    from bgqueue.keys import AppKeys

log = logging.getLogger("bgqueue.transient")

SCRIPT = "transient_delays"
MAX_REASON = 200  # characters of a reason kept in Redis (it is only for people to read)


@dataclass(frozen=True)
class DelaySuspendInfo:
    """A delay: its request id and how long it keeps the task alive, in ms (when granted:
    the whole delay; in `TransientTaskInfo`: what is left of it)."""

    request_id: int
    actual_delay_time: int


@dataclass(frozen=True)
class TransientTaskInfo:
    """A scope's quota left for new delays today (ms) and its live delays."""

    remaining_quota: int
    transient_tasks: list[DelaySuspendInfo] = field(default_factory=list)


def script_keys(k: AppKeys, scope: str) -> list[str]:
    """The KEYS of `lua/transient_delays.lua` for one scope of an app."""
    return [
        k.transient_delays(scope),
        k.transient_runs(scope),
        k.transient_ledger(scope),
        k.running,
        k.transient_seq,
        k.transient_scopes,
    ]


def _script_keys(app: BackgroundApp, scope: str) -> list[str]:
    return script_keys(app.keys, scope)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def info(app: BackgroundApp, scope: str) -> TransientTaskInfo:
    """The scope's remaining quota and live delays; settles delays of runs lost with their
    worker on the way (see `lua/transient_delays.lua`)."""
    raw = app.call(
        SCRIPT, _script_keys(app, scope), ["info", _ms(app.limits.transient_daily_quota)]
    )
    return parse_info(raw)


def parse_info(raw: list[Any]) -> TransientTaskInfo:
    """A TransientTaskInfo from the reply of the script's `info` operation."""
    delays = [DelaySuspendInfo(int(raw[i]), int(raw[i + 1])) for i in range(1, len(raw), 2)]
    return TransientTaskInfo(int(raw[0]), sorted(delays, key=lambda d: d.request_id))


DAY_MS = 86_400_000


def quota_used(client: Any, k: AppKeys, now_ms: int) -> dict[str, int]:
    """Ms of delay charged in the rolling 24 hours, by scope, for the scopes in the app's
    index (the ledger's members end in their charge, `"<ms>:<charged ms>"`). Reads
    only: live reservations and runs lost unsettled are not charges yet."""
    scopes = [raw.decode() for raw in client.zrange(k.transient_scopes, 0, -1)]
    with client.pipeline(transaction=False) as pipe:
        for scope in scopes:
            pipe.zrangebyscore(k.transient_ledger(scope), f"({now_ms - DAY_MS}", "+inf")
        ledgers = pipe.execute()
    return {
        scope: sum(int(entry.rpartition(b":")[2]) for entry in ledger)
        for scope, ledger in zip(scopes, ledgers, strict=True)
    }


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
        app: BackgroundApp,
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
        return self.app.call(SCRIPT, _script_keys(self.app, self.scope), args)

    def _to_base_ms(self) -> int:
        return _ms(self._base_deadline() - time.monotonic())

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
                _ms(limits.transient_max_delay),
                _ms(limits.transient_daily_quota),
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
            return max(0, _ms(delay.ends - time.monotonic()))

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
