"""Transient delays (HarmonyOS `requestSuspendDelay`): a running task borrows time past its
deadline from its scope's rolling 24-hour quota.

Two halves, one ledger. The scope's quota is kept in Redis and shared by every worker: each
grant, cancel and settlement, and each read of what is left, is one call of
`lua/transient_delays.lua` (bgqueue/model/lua/), so two workers racing for the last seconds
of a scope's quota cannot both get them, and only Redis's clock charges. This module is the
scope's half: the quota left and the live delays (`info`, for `app.transient_task_info`
and `bgqueue status`), and what was charged (`quota_used`, for metrics). `delays.py` is the
run's half, on its worker: the delays of one run, kept in memory too, so that the watchdog
knows the deadline they hold and when their callbacks are due without asking Redis.

The API speaks milliseconds, as HarmonyOS does; `Limits` holds seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bgqueue.model.context import AppContext
    from bgqueue.model.keys import AppKeys

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


def ms(seconds: float) -> int:
    """Seconds (as `Limits` holds them) in the whole milliseconds the API and script speak."""
    return int(seconds * 1000)


def info(app: AppContext, scope: str) -> TransientTaskInfo:
    """The scope's remaining quota and live delays; settles delays of runs lost with their
    worker on the way (see `lua/transient_delays.lua`)."""
    raw = app.call(
        SCRIPT, script_keys(app.keys, scope), ["info", ms(app.limits.transient_daily_quota)]
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
