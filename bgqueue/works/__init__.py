"""The work scheduler (HarmonyOS `@ohos.resourceschedule.workScheduler`): conditional,
optionally repeating works run by `WorkSchedulerExtension` handlers.

A work lives in Redis (`AppKeys.work_all`, one `work_*.lua` script per change) as
waiting → dispatched → running → waiting again (next cycle) or removed (no runs left).
Beat matches due works against its live workers' heartbeat conditions and sends each
to the own queue of the least busy matching worker; the worker calls `on_work_start`
and a watchdog renews the run's lease and calls `on_work_stop` at the run limit or on
`stop_work`. A run whose lease lapses (its worker died) is run again. Works with
`is_persisted=False` end with the Redis process that accepted them (docs/harmony.md).
"""

from __future__ import annotations

import json
import logging
import math
import time
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any, TypeVar

from bgqueue import efficiency
from bgqueue.broker import messages
from bgqueue.errors import ParameterError, StartWorkFailed, WorkInfoCheckFailed
from bgqueue.model.conditions import SAFE_DEFAULTS
from bgqueue.model.requests import MAX_PAYLOAD_BYTES, check_name

if TYPE_CHECKING:
    from bgqueue.model.context import AppContext, BeatContext
    from bgqueue.model.keys import AppKeys

log = logging.getLogger("bgqueue.works")

WORK_TASK = "bgqueue.work"  # the Celery task that runs every work's extension
MAX_WORK_ID = 2**31 - 1  # HarmonyOS work ids are 32-bit
MAX_MS = 2**53  # largest millisecond value JSON carries exactly


class NetworkType(IntEnum):
    """The network a work needs (HarmonyOS values); matched against a worker's `network`."""

    ANY = 0
    MOBILE = 1
    WIFI = 2
    BLUETOOTH = 3
    WIFI_P2P = 4
    ETHERNET = 5


class ChargingType(IntEnum):
    """The charger a charging work needs; matched against a worker's `charger`."""

    ANY = 0
    AC = 1
    USB = 2
    WIRELESS = 3


class BatteryStatus(IntEnum):
    """The battery status a work needs; matched against a worker's `battery_status`."""

    LOW = 0
    OKAY = 1
    LOW_OR_OKAY = 2


class StorageRequest(IntEnum):
    """The storage status a work needs; matched against a worker's `storage`."""

    LOW = 0
    OKAY = 1
    LOW_OR_OKAY = 2


ENUM_FIELDS: dict[str, type[IntEnum]] = {
    "network_type": NetworkType,
    "charger_type": ChargingType,
    "battery_status": BatteryStatus,
    "storage_request": StorageRequest,
}
BOOL_FIELDS = ("is_charging", "is_repeat", "is_persisted", "is_deep_idle")
# Optional whole numbers: (lowest, highest) accepted.
INT_FIELDS: dict[str, tuple[int, int]] = {
    "battery_level": (0, 100),
    "repeat_cycle_time": (1, MAX_MS),
    "repeat_count": (1, MAX_WORK_ID),
    "idle_wait_time": (0, MAX_MS),
}


def _whole(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ParameterError(f"{what} must be a whole number from {low} to {high}, got {value!r}")
    return value


def _member(value: object, enum: type[IntEnum], what: str) -> IntEnum | None:
    if value is None or isinstance(value, enum):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return enum(value)
        except ValueError:
            pass
    names = ", ".join(f"{enum.__name__}.{m.name}" for m in enum)
    raise ParameterError(f"{what} must be one of {names}, got {value!r}")


def _parameters(value: object) -> dict[str, int | float | str | bool]:
    """A copy of WorkInfo.parameters: string keys, number/string/boolean values (as there)."""
    if not isinstance(value, dict):
        raise ParameterError(f"parameters must be a dict, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(key, str):
            raise ParameterError(f"parameters keys must be strings, got {key!r}")
        plain = isinstance(item, bool | int | str) or (
            isinstance(item, float) and math.isfinite(item)
        )
        if not plain:
            raise ParameterError(
                f"parameters[{key!r}] must be a number, string or boolean, got {item!r}"
            )
    size = len(json.dumps(value).encode())
    if size > MAX_PAYLOAD_BYTES:
        raise ParameterError(
            f"parameters are {size} bytes of JSON; the limit is {MAX_PAYLOAD_BYTES}"
        )
    return dict(value)


@dataclass
class WorkInfo:
    """A work (HarmonyOS WorkInfo): which handler runs it, under which conditions, how often.

    Times are in milliseconds, as on HarmonyOS. `is_repeat=True` repeats every
    `repeat_cycle_time` (forever, or `repeat_count` runs in all); `repeat_count` alone also
    repeats. At least one condition is required: a network type, charging, a battery level
    or status, a storage status, deep idle, or a repeat cycle. `bundle_name` is the app id
    (filled in on the copies bgqueue returns; another app's id is refused).
    """

    work_id: int
    ability_name: str
    bundle_name: str | None = None
    network_type: NetworkType | None = None
    is_charging: bool = False
    charger_type: ChargingType | None = None
    battery_level: int | None = None
    battery_status: BatteryStatus | None = None
    storage_request: StorageRequest | None = None
    is_repeat: bool = False
    repeat_cycle_time: int | None = None
    repeat_count: int | None = None
    is_persisted: bool = False
    is_deep_idle: bool = False
    idle_wait_time: int | None = None
    parameters: dict[str, int | float | str | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ParameterError for anything start_work would refuse (WorkInfo is mutable)."""
        _whole(self.work_id, "work_id", 0, MAX_WORK_ID)
        check_name(self.ability_name, "ability_name")
        if self.bundle_name is not None:
            check_name(self.bundle_name, "bundle_name")
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ParameterError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, enum in ENUM_FIELDS.items():
            setattr(self, name, _member(getattr(self, name), enum, name))
        for name, (low, high) in INT_FIELDS.items():
            if getattr(self, name) is not None:
                _whole(getattr(self, name), name, low, high)
        self.parameters = _parameters(self.parameters)
        self._check_combination()

    def _check_combination(self) -> None:
        if self.charger_type is not None and not self.is_charging:
            raise ParameterError("charger_type needs is_charging=True")
        if self.idle_wait_time is not None and not self.is_deep_idle:
            raise ParameterError("idle_wait_time needs is_deep_idle=True")
        if self.repeats != (self.repeat_cycle_time is not None):
            raise ParameterError(
                "a repeating work (is_repeat=True or a repeat_count) needs a repeat_cycle_time, "
                "and a repeat_cycle_time needs is_repeat=True or a repeat_count"
            )
        if not self.has_condition:
            raise ParameterError(
                "a work needs at least one condition: network_type, is_charging, battery_level, "
                "battery_status, storage_request, is_deep_idle or a repeat cycle"
            )

    @property
    def repeats(self) -> bool:
        """Whether the work runs more than once."""
        return self.is_repeat or self.repeat_count is not None

    @property
    def has_condition(self) -> bool:
        """Whether any condition is set (HarmonyOS refuses a work with none)."""
        wanted = (self.network_type, self.battery_level, self.battery_status, self.storage_request)
        return self.is_charging or self.is_deep_idle or self.repeats or wanted != (None,) * 4

    @property
    def total_runs(self) -> int:
        """Runs the work has in all; 0 means unlimited."""
        if self.repeat_count is not None:
            return self.repeat_count
        return 0 if self.is_repeat else 1

    def to_json(self) -> str:
        """The WorkInfo as JSON text (enums as their HarmonyOS numbers, no bundle name)."""
        data = asdict(self)
        del data["bundle_name"]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, bundle_name: str) -> WorkInfo:
        """A fresh WorkInfo (a copy) from `to_json` text."""
        return cls(**json.loads(text), bundle_name=bundle_name)


class WorkSchedulerExtension:
    """Base of work handlers (HarmonyOS WorkSchedulerExtensionAbility), registered with
    `@app.work(ability_name)`. A worker makes one instance per run and calls
    `on_work_start` in the run's thread; `on_work_stop` comes from a watchdog thread."""

    def on_work_start(self, work: WorkInfo) -> None:
        """The work runs now; returning ends the run in time."""

    def on_work_stop(self, work: WorkInfo) -> None:
        """The run limit is reached or stop_work stopped the run: wrap up. The run ends when
        this returns; a body still running `STOP_GRACE` later is terminated."""


Extension = TypeVar("Extension", bound=type[WorkSchedulerExtension])


# -- a worker's conditions against a work's (DESIGN.md §2's table) ------------------------


def matches_work(conditions: Mapping[str, Any], work: WorkInfo) -> bool:
    """Whether a worker with these conditions may run a work (DESIGN.md §2's table).

    WorkInfo's enums map to condition values by member name (NetworkType.WIFI → 'wifi',
    ChargingType.USB → 'usb', StorageRequest.LOW → 'low'); ANY and LOW_OR_OKAY accept every
    value, though NetworkType.ANY still needs a network. A key the worker does not report
    counts as its safe value, and a worker on external power that names no charger is on
    mains ('ac'). `idle_wait_time` is timed by beat (`dispatch`), not matched here.
    """
    have = {**SAFE_DEFAULTS, **conditions}
    return (
        _network_matches(have["network"], work.network_type)
        and _power_matches(have, work)
        and _level_at_least(have["battery_level"], work.battery_level)
        and _status_matches(have["battery_status"], work.battery_status)
        and _status_matches(have["storage"], work.storage_request)
        and (not work.is_deep_idle or have["idle"] == "true")
    )


def _network_matches(have: str, wanted: Enum | None) -> bool:
    if wanted is None:
        return True
    name = wanted.name.lower()
    return have != "none" and (name == "any" or have == name)


def _power_matches(have: Mapping[str, Any], work: WorkInfo) -> bool:
    # charger_type is accepted only together with is_charging=True (WorkInfo.validate).
    if not work.is_charging:
        return True
    if have["external_power"] != "true":
        return False
    wanted = work.charger_type
    return (
        wanted is None or wanted.name == "ANY" or have.get("charger", "ac") == wanted.name.lower()
    )


def _level_at_least(have: str, wanted: int | None) -> bool:
    if wanted is None:
        return True
    try:
        return int(have) >= wanted
    except ValueError:
        return False


def _status_matches(have: str, wanted: Enum | None) -> bool:
    return wanted is None or wanted.name == "LOW_OR_OKAY" or have == wanted.name.lower()


# -- producer side (BackgroundApp's work methods) -----------------------------------------


def _checked_id(work_id: object) -> int:
    return _whole(work_id, "work_id", 0, MAX_WORK_ID)


def _record(work: WorkInfo) -> str:
    """The Redis record of a new work (see lua/work_start.lua and work_end.lua)."""
    record = {
        "info": work.to_json(),
        "p": work.is_persisted,
        "s": "waiting",
        "cy": work.repeat_cycle_time or 0,
        "cnt": work.total_runs,
        "n": 0,  # runs ended
        "a": 0,  # runs lost to dead workers in a row
    }
    return json.dumps(record, separators=(",", ":"))


def _check_owner(app: AppContext, work: WorkInfo) -> None:
    if work.bundle_name is not None and work.bundle_name != app.app_id:
        raise WorkInfoCheckFailed(
            f"work {work.work_id} names bundle {work.bundle_name!r}, not this app {app.app_id!r}"
        )


def start_work(app: AppContext, work: WorkInfo) -> None:
    """Add a work; it runs when a live worker matches its conditions (startWork)."""
    if not isinstance(work, WorkInfo):
        raise ParameterError(f"start_work takes a bgqueue.WorkInfo, got {type(work).__name__}")
    work.validate()
    _check_owner(app, work)
    minimum_ms = app.limits.min_repeat_interval * 1000
    short = work.repeat_cycle_time is not None and work.repeat_cycle_time < minimum_ms
    if short and not efficiency.granted(app, efficiency.ResourceType.TIMER):
        raise StartWorkFailed(
            f"work {work.work_id}: repeat_cycle_time {work.repeat_cycle_time} ms is under the "
            f"minimum of {minimum_ms:g} ms (Limits.min_repeat_interval); "
            "only a TIMER efficiency resource lifts it"
        )
    args = [work.work_id, _record(work), app.limits.max_works]
    result = app.call("work_start", app.keys.work_all, args, wake=True)
    if result == b"exists":
        raise StartWorkFailed(
            f"work {work.work_id} already exists; stop_work(work, need_cancel=True) it first"
        )
    if result == b"full":
        raise StartWorkFailed(
            f"the app already has {app.limits.max_works} works (Limits.max_works); "
            f"work {work.work_id} was not started"
        )
    app.announce()


def stop_work(app: AppContext, work: WorkInfo | int, need_cancel: bool = False) -> None:
    """Stop the work's running run (its on_work_stop is called); with `need_cancel`, also
    remove the work. A repeating work that is not cancelled runs again at its next cycle."""
    if isinstance(work, WorkInfo):
        work.validate()
        _check_owner(app, work)
        work_id = work.work_id
    else:
        work_id = _checked_id(work)
    if not isinstance(need_cancel, bool):
        raise ParameterError(f"need_cancel must be True or False, got {need_cancel!r}")
    if not app.call("work_stop", app.keys.work_all, [int(need_cancel), work_id]):
        raise WorkInfoCheckFailed(f"work {work_id} does not exist in app {app.app_id!r}")


def stop_and_clear_works(app: AppContext) -> None:
    """Stop every running work and remove every work of the app (stopAndClearWorks)."""
    app.call("work_stop", app.keys.work_all, [1])


def _read_one(app: AppContext, work_id: object) -> tuple[Any, Any]:
    """The work's record and its last run, each raw JSON or None."""
    raw, last = app.call("work_read", app.keys.work_all, [_checked_id(work_id)])
    return raw, last


def get_work_status(app: AppContext, work_id: int) -> WorkInfo:
    """A copy of the work's WorkInfo (getWorkStatus); WorkInfoCheckFailed if there is none."""
    raw, _ = _read_one(app, work_id)
    if raw is None:
        raise WorkInfoCheckFailed(f"work {work_id} does not exist in app {app.app_id!r}")
    return WorkInfo.from_json(json.loads(raw)["info"], app.app_id)


def obtain_all_works(app: AppContext) -> list[WorkInfo]:
    """Copies of every work of the app, by work id (obtainAllWorks)."""
    flat = app.call("work_read", app.keys.work_all, [""])
    works = [WorkInfo.from_json(json.loads(raw)["info"], app.app_id) for raw in flat[1::2]]
    return sorted(works, key=lambda work: work.work_id)


def is_last_work_time_out(app: AppContext, work_id: int) -> bool:
    """Whether the work's last run reached its run limit (isLastWorkTimeOut). Answers for
    an existing work (False before its first run) and for a finished one-shot work."""
    raw, last = _read_one(app, work_id)
    if last is not None:
        return bool(json.loads(last)["to"])
    if raw is None:
        raise WorkInfoCheckFailed(f"work {work_id} does not exist in app {app.app_id!r}")
    return False


# -- beat side (bgqueue.beat.EXTENSIONS) ----------------------------------------------------


class IdleClock:
    """Since when (server ms) beat has seen each live worker idle, for `idle_wait_time`.

    Each beat keeps its own in memory: a beat that takes over starts every clock again,
    so a work may wait longer than its idle_wait_time, never less.
    """

    def __init__(self) -> None:
        self.since: dict[tuple[str, str], int] = {}

    def observe(self, app_id: str, live: dict[str, dict[str, Any]], now: int) -> None:
        """Start the clock of workers newly idle; drop those busy, gone or dead."""
        idle = {
            (app_id, name)
            for name, beat in live.items()
            if beat.get("conditions", {}).get("idle") == "true"
        }
        for key in [k for k in self.since if k[0] == app_id and k not in idle]:
            del self.since[key]
        for key in idle:
            self.since.setdefault(key, now)

    def idle_ms(self, app_id: str, worker: str, now: int) -> int:
        """How long the worker has been idle, as far as this beat has seen."""
        return now - self.since.get((app_id, worker), now)


_clocks: weakref.WeakKeyDictionary[Any, IdleClock] = weakref.WeakKeyDictionary()


def _clock(beat: BeatContext) -> IdleClock:
    if beat not in _clocks:
        _clocks[beat] = IdleClock()
    return _clocks[beat]


def dispatch(beat: BeatContext, app: AppKeys) -> float:
    """Send every due work to a matching live worker that has its handler; seconds until
    one is next due. Live workers are read only when a work is due."""
    raw = beat.scripts.work_due(keys=[app.works, app.work_due], args=[])
    now = int(raw[0])
    if len(raw) < 3:
        return float("inf")
    if float(raw[2]) > now:  # earliest first: nothing is due yet
        return (float(raw[2]) - now) / 1000
    live = beat.live_workers(app)
    handlers = {name: beat.class_of(app, heartbeat)["w"] for name, heartbeat in live.items()}
    clock = _clock(beat)
    clock.observe(app.app_id, live, now)
    load = {name: float(hb.get("busy", 0)) for name, hb in live.items()}
    picks: dict[str, str] = {}
    next_due = float("inf")
    for i in range(1, len(raw), 3):
        work_id, due = raw[i].decode(), float(raw[i + 1])
        if due > now:
            next_due = min(next_due, (due - now) / 1000)
            break  # earliest first: the rest are later still
        info = _info(app, work_id, raw[i + 2]) if live else None
        if info is None:
            continue
        able = {name: hb for name, hb in live.items() if info.ability_name in handlers[name]}
        worker, wait = _pick(info, able, load, clock, app.app_id, now)
        next_due = min(next_due, wait)
        if worker is not None:
            picks[work_id] = worker
            load[worker] += 1
    if picks:
        _claim_and_publish(beat, app, picks)
    return next_due


def _info(app: AppKeys, work_id: str, raw: bytes) -> WorkInfo | None:
    try:
        return WorkInfo.from_json(json.loads(raw)["info"], app.app_id)
    except (ValueError, KeyError, TypeError) as exc:  # written by another version?
        log.error("work %s of %s has an unreadable record: %s", work_id, app.app_id, exc)
        return None


def _pick(
    info: WorkInfo,
    live: dict[str, dict[str, Any]],
    load: dict[str, float],
    clock: IdleClock,
    app_id: str,
    now: int,
) -> tuple[str | None, float]:
    """The least busy live worker that matches the work now, and else seconds until one
    will have been idle long enough (inf if none will by waiting alone)."""
    ready: list[str] = []
    wait = float("inf")
    for name, beat in live.items():
        if not matches_work(beat.get("conditions", {}), info):
            continue
        left = (info.idle_wait_time or 0) - clock.idle_ms(app_id, name, now)
        if left > 0:
            wait = min(wait, left / 1000)
        else:
            ready.append(name)
    if not ready:
        return None, wait
    best = min(ready, key=lambda n: (load[n] / max(1, int(live[n].get("concurrency", 1))), n))
    return best, float("inf")


def _claim_and_publish(beat: BeatContext, app: AppKeys, picks: dict[str, str]) -> None:
    lease_ms = int(beat.settings.dispatch_lease * 1000)
    args: list[Any] = [lease_ms]
    for work_id, worker in picks.items():
        args += [work_id, worker]
    claimed = beat.scripts.work_claim(keys=app.work_all, args=args)
    if not claimed:
        return
    sent = []
    for i in range(0, len(claimed), 2):
        work_id, gen = claimed[i].decode(), int(claimed[i + 1])
        kwargs = {"work_id": int(work_id), "gen": gen}
        sent.append(messages.task_message(app.worker_queue(picks[work_id]), WORK_TASK, kwargs))
    messages.push(beat.client, sent)


_pruned: weakref.WeakKeyDictionary[Any, dict[str, float]] = weakref.WeakKeyDictionary()


def prune_last_runs(beat: BeatContext, app: AppKeys) -> None:
    """Forget the last runs of works gone for longer than the history retention (a one-shot
    work's last run stays answerable by is_last_work_time_out that long). At most once per
    `forget_after` per app: it reads the whole hash."""
    seen = _pruned.setdefault(beat, {})
    if time.monotonic() - seen.get(app.app_id, -math.inf) < beat.settings.forget_after:
        return
    seen[app.app_id] = time.monotonic()
    last = beat.client.hgetall(app.work_last)
    if not last:
        return
    ids = list(last)
    exists = beat.client.hmget(app.works, ids)
    oldest = beat.server_ms() - beat.settings.history_retention * 1000
    stale = []
    for work_id, raw, present in zip(ids, last.values(), exists, strict=True):
        try:
            ended = float(json.loads(raw).get("fa") or 0)
        except (ValueError, AttributeError):
            ended = 0.0  # not bgqueue's: nothing to keep it for
        if present is None and ended < oldest:
            stale.append(work_id)
    if stale:
        beat.client.hdel(app.work_last, *stale)


def sweep(beat: BeatContext, app: AppKeys, live: dict[str, dict[str, Any]]) -> None:
    """Recover works whose lease lapsed: not started in time, or their worker died; forget
    the last runs of works long gone."""
    prune_last_runs(beat, app)
    _clock(beat).observe(app.app_id, live, beat.server_ms())
    lapsed = beat.client.zrangebyscore(app.work_leases, "-inf", beat.server_ms())
    if not lapsed:
        return
    records = beat.client.hmget(app.works, lapsed)
    waiting = _queued(beat, app, live, records)
    renew: list[bytes] = []
    recover: list[bytes] = []
    for work_id, raw in zip(lapsed, records, strict=True):
        record = json.loads(raw) if raw else {}
        # A message waiting behind others on a live worker's queue is not lost.
        queued = record.get("s") == "dispatched" and record.get("w") in waiting
        (renew if queued else recover).append(work_id)
    if renew:
        until = beat.server_ms() + int(beat.settings.dispatch_lease * 1000)
        beat.client.zadd(app.work_leases, {work_id: until for work_id in renew}, xx=True)
    if recover:
        out = beat.scripts.work_recover(
            keys=app.work_all, args=[beat.settings.max_attempts, *recover]
        )
        for i in range(0, len(out), 2):
            log.warning(
                "work %s of %s: lease lapsed, %s", out[i].decode(), app.app_id, out[i + 1].decode()
            )


def _queued(
    beat: BeatContext, app: AppKeys, live: dict[str, dict[str, Any]], records: list[Any]
) -> set[str]:
    """Live workers, among those of dispatched works, whose own queue is not empty."""
    workers = sorted({json.loads(raw).get("w") for raw in records if raw} & set(live))
    busy = beat.queued(app, [app.worker_queue(worker) for worker in workers])
    return {worker for worker in workers if app.worker_queue(worker) in busy}
